"""RcapService and its store without the kernel: a grant beyond the bound rcaps is
refused naming the resource; the ledger survives a reopen of the state; a version-1
state database is migrated."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.rcaps import GrantRefused, RcapService
from agent.rcaps.model import amounts_of, token_id, zero
from agent.state import SCHEMA_VERSION, State


def capacity() -> dict[str, int]:
    return {**zero(), "cpu_share": 100, "net_max_rate": 100_000, "mem_max": 1 << 20}


def test_grant_beyond_bound_rcaps_refused_and_reloaded(tmp_path: Path) -> None:
    state = State.open(tmp_path)
    svc = RcapService(state, capacity())
    with pytest.raises(GrantRefused, match="no rcap is bound"):
        svc.check_grant("s", {"cpu_share": 1})
    token, _ = svc.led.acquire(amounts_of({"cpu_share": 30, "net_max_rate": 5000}), "")
    child, _ = svc.led.split(token_id(token), amounts_of({"cpu_share": 12}), "")
    svc.led.bind(token_id(child), "s")
    svc.check_grant("s", {"cpu_share": 12, "net_max_rate": 0})
    with pytest.raises(GrantRefused) as exc:
        svc.check_grant("s", {"cpu_share": 13})
    assert exc.value.resource == "cpu_share" and "13 is beyond the 12" in str(exc.value)
    with pytest.raises(GrantRefused, match="net_max_rate 1 is beyond the 0"):
        svc.check_grant("s", {"net_max_rate": 1})
    svc.led.mint_plc("t", amounts_of({"cpu_share": 10}))
    svc.led.lend("t", "s", "cpu_share", 4, expires=10**10)
    svc.check_grant("s", {"cpu_share": 16})
    from agent.rcaps import store
    store.flush(state, svc.led)
    state.close()

    again = RcapService(State.open(tmp_path), capacity())
    assert again.led.effective("s")["cpu_share"] == 16
    assert again.led.get(token_id(child)).bound == "s"
    assert again.led.remainder(token_id(token))["cpu_share"] == 18
    assert again.led.free_pool()["cpu_share"] == 70
    again.led.check()


def test_version_1_database_is_migrated(tmp_path: Path) -> None:
    State.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / "agent.db")
    db.executescript("DROP TABLE rcaps; DROP TABLE rcap_loans; "
                     "UPDATE meta SET value='1' WHERE key='schema_version';")
    db.commit()
    db.close()
    state = State.open(tmp_path)
    assert state.get_meta("schema_version") == str(SCHEMA_VERSION) == "2"
    RcapService(state, capacity()).led.check()
