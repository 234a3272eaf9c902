"""RcapService and its store without the kernel: a grant beyond the bound rcaps is
refused naming the resource; the ledger survives a reopen of the state; a version-1
state database is migrated."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.rcaps import GrantRefused, RcapService, store
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
    assert state.get_meta("schema_version") == str(SCHEMA_VERSION) == "3"
    RcapService(state, capacity()).led.check()



def port_service(state: State) -> Any:
    from agent.ports import PortService, PortTable, StatePortStore

    return PortService(PortTable(["10.0.0.1"], (40000, 60999)), StatePortStore(state))


def _make_slivers(state: State, *names: str, tags: dict[str, str] | None = None) -> None:
    """Live slivers in the state, each with a PLC rcap bound (as sync() mints)."""
    from agent.state import SliverRecord, SliverState

    for n in names:
        tag = (tags or {}).get(n, "")
        state.put_sliver(SliverRecord(n, 1, "plc-instantiated", 2**31, "img",
                                      {"attributes": {"ports": tag} if tag else {}},
                                      {"cpu_share": 10}, [], SliverState.RUNNING, "", True,
                                      "", 0.0, 0.0))


def test_ports_are_a_ledger_resource(tmp_path: Path) -> None:
    """An rcap with ports bound to a slice grants them in the port table; split and loan
    move them; release revokes; ReservePort and pool acquisition are checked."""
    from agent.ports import PortError
    from agent.rcaps.model import LedgerError, ports_of

    state = State.open(tmp_path)
    svc = RcapService(state, capacity())
    ps = port_service(state)
    revoked: list[dict[Any, str]] = []
    ps.on_revoked.append(revoked.append)
    svc.attach_ports(ps)
    _make_slivers(state, "a", "b", tags={"b": "tcp:2000"})
    svc.sync()
    ps.set_tag_ports("b", "tcp:2000")
    with pytest.raises(LedgerError, match="tcp:2000: tcp port 2000 on .* granted to slice 'b'"):
        svc.check_pool_ports(ports_of("tcp:2000"))
    for bad, why in (("tcp:80", "below 1024"), ("tcp:45000", "ephemeral")):
        with pytest.raises(LedgerError, match=why):
            svc.check_pool_ports(ports_of(bad))
    want = ports_of("tcp:3000-3001")
    svc.check_pool_ports(want)
    tok, _ = svc.led.acquire(zero(), "", ports=want)
    with pytest.raises(LedgerError, match="tcp:3000: another rcap"):
        svc.led.acquire(zero(), "", ports=ports_of("tcp:3000"))
    svc.led.bind(token_id(tok), "a")
    svc.apply_ports({"a"})
    assert ps.check_bind("a", "tcp", "10.0.0.1", 3000).allowed
    assert not ps.check_bind("b", "tcp", "10.0.0.1", 3000).allowed
    # a splits tcp:3001 off and binds it to b: it moves, a's is revoked
    child, touched = svc.led.acquire(zero(), "a", from_slice="a", ports=ports_of("tcp:3001"))
    with pytest.raises(LedgerError, match="tcp:3005: not among"):
        svc.led.split(token_id(tok), zero(), "", ports=ports_of("tcp:3005"))
    touched |= svc.led.bind(token_id(child), "b")
    svc.apply_ports(touched)
    assert ps.check_bind("b", "tcp", "10.0.0.1", 3001).allowed
    assert not ps.check_bind("a", "tcp", "10.0.0.1", 3001).allowed
    assert any(k[2] == 3001 and s == "a" for r in revoked for k, s in r.items())
    # ReservePort: b may re-reserve what it is given, not a port nobody gave it
    ps.release("b", "tcp:3001")
    ps.reserve("b", "tcp:3001")
    with pytest.raises(PortError, match="tcp:3002 is not among the ports"):
        ps.reserve("b", "tcp:3002")
    ps.reserve("b", "tcp:2000")          # its tag gives it
    # a loan of ports: a lends tcp:3000 to b
    t = svc.led.set_loans("a", [("b", "ports", 1, 0.0, False, ports_of("tcp:3000"))])
    svc.apply_ports(t)
    assert ps.check_bind("b", "tcp", "10.0.0.1", 3000).allowed
    assert not ps.check_bind("a", "tcp", "10.0.0.1", 3000).allowed
    with pytest.raises(LedgerError, match="tcp:3000 is neither"):
        svc.led.lend("a", "b", "ports", 1, ports=ports_of("tcp:3000"))
    svc.led.check()
    # release of the child: b's tcp:3001 (re-reserved) is revoked
    t = svc.led.release(token_id(child))
    svc.apply_ports(t)
    assert not ps.check_bind("b", "tcp", "10.0.0.1", 3001).allowed
    # both survive a reopen
    store.flush(state, svc.led)
    state.close()
    again = RcapService(State.open(tmp_path), capacity())
    assert again.led.effective_ports("b") == ports_of("tcp:3000")
    assert again.led.effective_ports("a") == ports_of("tcp:3001")
    again.led.check()



def _with_ports(tmp_path: Path, *slivers: str) -> tuple[State, RcapService, Any]:
    """A state, a rcap service with its port table attached, and these slivers."""
    state = State.open(tmp_path)
    svc = RcapService(state, capacity())
    ps = port_service(state)
    svc.attach_ports(ps)
    _make_slivers(state, *slivers)
    return state, svc, ps


def _tag(state: State, svc: RcapService, ps: Any, name: str, value: str) -> None:
    """PLC's `ports` tag of `name` set as the agent does: the sliver's spec, the port
    table (less what the slice lent, split off or released), then the reconciler's sync."""
    _make_slivers(state, name, tags={name: value})
    ps.set_tag_ports(name, value, svc.tag_withheld(name))
    svc.sync()


def test_tag_ports_are_lent_split_and_end_with_the_tag(tmp_path: Path) -> None:
    """A PLC sliver's `ports` tag is its PLC rcap's port set: bindable as before, lent
    (SetLoans) and split off (AcquireRcap) like any holding, the port moving in the
    table; PLC removing tag ports ends the loan and the child rcap holding them."""
    import errno

    from agent.ports import PortError
    from agent.rcaps.model import ports_of

    state, svc, ps = _with_ports(tmp_path, "b")
    _tag(state, svc, ps, "a", "tcp:80,tcp:2000-2001")
    assert svc.led.plc_ports("a") == ports_of("tcp:80,tcp:2000-2001")
    # lending nothing, nothing moved: the tag's ports are held by tag, as before
    assert ps.table.keys_of("a", ("tag",)) == ps.table.expand(ps.table.holdings("a"))
    assert not ps.table.keys_of("a", ("rcap",))
    for port in (80, 2000, 2001):
        assert ps.check_bind("a", "tcp", "10.0.0.1", port).allowed
    # a lends tcp:2000 to b (SetLoans) and splits tcp:80 off, bound to b
    t = svc.led.set_loans("a", [("b", "ports", 1, 0.0, False, ports_of("tcp:2000"))])
    tok, t2 = svc.led.acquire(zero(), "a", from_slice="a", ports=ports_of("tcp:80"))
    t |= t2 | svc.led.bind(token_id(tok), "b")
    svc.apply_ports(t)
    svc.led.check()
    for port in (80, 2000):
        assert ps.check_bind("b", "tcp", "10.0.0.1", port).allowed
        assert ps.check_bind("a", "tcp", "10.0.0.1", port).errno == errno.EADDRINUSE
    with pytest.raises(PortError, match="tcp:2000 is not among"):
        ps.reserve("a", "tcp:2000")
    # an unrelated tag change keeps them where they are (the tag path leaves them out)
    _tag(state, svc, ps, "a", "tcp:80,tcp:2000-2002")
    assert ps.check_bind("b", "tcp", "10.0.0.1", 2000).allowed
    assert ps.check_bind("a", "tcp", "10.0.0.1", 2002).allowed
    # PLC drops tcp:80 and tcp:2000: the loan and the child rcap end, b loses both
    _tag(state, svc, ps, "a", "tcp:2001-2002")
    assert not svc.led.loans_of("a") and token_id(tok) not in svc.led.rcaps
    svc.led.check()
    for port in (80, 2000):
        assert not ps.check_bind("b", "tcp", "10.0.0.1", port).allowed
        assert not ps.check_bind("a", "tcp", "10.0.0.1", port).allowed
    assert ps.check_bind("a", "tcp", "10.0.0.1", 2001).allowed
    # a loan revoked gives the port back to the lender
    t = svc.led.set_loans("a", [("b", "ports", 1, 0.0, False, ports_of("tcp:2002"))])
    svc.apply_ports(t)
    assert ps.check_bind("b", "tcp", "10.0.0.1", 2002).allowed
    svc.apply_ports(svc.led.set_loans("a", []))
    assert ps.check_bind("a", "tcp", "10.0.0.1", 2002).allowed
    assert not ps.check_bind("b", "tcp", "10.0.0.1", 2002).allowed


def test_tag_conflicting_with_a_node_root_stays_out_of_the_ledger(tmp_path: Path) -> None:
    """Roots never overlap: a tag port a node root holds is not in the PLC rcap, and a
    pool acquisition of a port in a PLC rcap is refused."""
    from agent.rcaps.model import LedgerError, ports_of

    state = State.open(tmp_path)
    svc = RcapService(state, capacity())
    _make_slivers(state, "a")
    svc.led.acquire(zero(), "", ports=ports_of("tcp:3000@10.0.0.1"))
    svc.led.mint_plc("a", zero(), ports=ports_of("tcp:3000,tcp:3001"))
    assert svc.led.plc_ports("a") == ports_of("tcp:3001")
    with pytest.raises(LedgerError, match="tcp:3001@10.0.0.1: another rcap"):
        svc.led.acquire(zero(), "", ports=ports_of("tcp:3001@10.0.0.1"))
    svc.led.check()


def test_released_ports_stay_released(tmp_path: Path) -> None:
    """A port given up with ReleasePort (an rcap's or the tag's) is not granted again by
    an unrelated ledger change, a tag change or a restart; ReservePort takes it back."""
    from agent.rcaps.model import ports_of

    state, svc, ps = _with_ports(tmp_path, "b")
    _tag(state, svc, ps, "a", "tcp:2000")
    tok, _ = svc.led.acquire(zero(), "", ports=ports_of("tcp:3000-3001"))
    svc.apply_ports(svc.led.bind(token_id(tok), "a"))
    ps.release("a", "tcp:3000,tcp:2000")

    def a_has(port: int) -> bool:
        return ps.check_bind("a", "tcp", "10.0.0.1", port).allowed

    assert not a_has(3000) and not a_has(2000) and a_has(3001)
    # unrelated changes: a loan of cpu, one of ports, a tag change, the sync
    svc.apply_ports(svc.led.set_loans("a", [("b", "cpu_share", 2, 0.0, False)]))
    svc.apply_ports(svc.led.set_loans("b", [("a", "cpu_share", 1, 0.0, False)]))
    svc.apply_ports(svc.led.set_loans("a", [("b", "ports", 1, 0.0, False,
                                             ports_of("tcp:3001"))]))
    _tag(state, svc, ps, "a", "tcp:2000,tcp:2005")
    svc.apply_ports(None)
    assert not a_has(3000) and not a_has(2000) and a_has(2005)
    assert ps.check_bind("b", "tcp", "10.0.0.1", 3001).allowed
    # a restart: the released ports are remembered in the state
    store.flush(state, svc.led)
    svc2 = RcapService(state, capacity())
    svc2.attach_ports(ps)
    svc2.apply_ports(None)
    assert not a_has(3000) and not a_has(2000)
    # ReservePort takes them back, and they stay through the next change
    ps.reserve("a", "tcp:3000")
    ps.reserve("a", "tcp:2000")
    svc2.apply_ports(svc2.led.set_loans("a", []))
    assert a_has(3000) and a_has(2000) and a_has(3001)
