"""The key tickets are checked with (agent/tickets.py TicketKeys): agent.toml's
plc_ticket_key, else PLC's key fetched once and pinned; a changed key is refused."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from agent import config
from agent.state import State
from agent.tickets import TicketError, TicketKeys, key_id
from plc import tickets as plc_tickets

PID = os.getpid()


def _pub(path: Path) -> str:
    plc_tickets.ensure_key(path)
    return plc_tickets.public_b64(plc_tickets.load_key(path))


async def test_pinned_on_first_fetch_and_a_changed_key_refused(tmp_path: Path) -> None:
    first, second = _pub(tmp_path / "a.pem"), _pub(tmp_path / "b.pem")
    offered = {"public_key": first}
    fetches = []

    async def fetch() -> dict[str, str]:
        fetches.append(1)
        return dict(offered)

    now = [0.0]
    with State.open(tmp_path / f"state-{PID}") as state:
        keys = TicketKeys("", state, fetch, clock=lambda: now[0])
        assert await keys.trusted() == base64.b64decode(first)
        assert await keys.trusted() == base64.b64decode(first) and len(fetches) == 1
        # PLC now offers another key: a ticket naming it makes one fetch, refused.
        offered["public_key"] = second
        new_id = key_id(base64.b64decode(second))
        # Within REFETCH_AFTER of the last fetch, PLC is not asked again.
        assert await keys.trusted(new_id) == base64.b64decode(first) and len(fetches) == 1
        now[0] = 700.0
        with pytest.raises(TicketError, match="not the key .* this node pinned"):
            await keys.trusted(new_id)
        assert state.get_meta("ticket_key") == first and len(fetches) == 2
        # The node's admin decides: the configured key wins over the pin.
        assert await TicketKeys(second, state, fetch).trusted(new_id) == \
            base64.b64decode(second)
        # Without a way to fetch and without a pin or a configured key: refused.
        with State.open(tmp_path / f"empty-{PID}") as empty:
            with pytest.raises(TicketError, match="no PLC ticket key"):
                await TicketKeys("", empty).trusted()


def test_plc_ticket_key_in_agent_toml_is_checked(tmp_path: Path) -> None:
    good = _pub(tmp_path / "k.pem")
    path = config.write_default(tmp_path / "ok.toml", {"plc_ticket_key": good})
    assert config.load(path).plc_ticket_key == good
    with pytest.raises(config.ConfigError, match="plc_ticket_key.*32"):
        config.write_default(tmp_path / "bad.toml", {"plc_ticket_key": "bm90IGEga2V5"})
