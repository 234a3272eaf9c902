"""The agent's poll cycle on raw replies: decoding, the unchanged-reply fast path, the
timestamp rule, removals that survive failures and PLC outages."""

from __future__ import annotations

import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fakes import FakeBackend, reply, sliver

from agent import config
from agent.main import Agent, build, make_guard


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    cfg = config.from_mapping({
        "state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run"),
        "socket_path": str(tmp_path / "agent.sock"), "node_id": 1, "node_key": "k",
        "node_accounts": "", "default_image": "base", "host_accounts": 0,
        "plc_url": "http://127.0.0.1:9/PLCAPI/"}, "test")
    a = build(cfg, backend=FakeBackend())
    try:
        yield a
    finally:
        a.close()


def wire(r: Any) -> bytes:
    return xmlrpc.client.dumps((r,), methodresponse=True, allow_none=True).encode()


async def test_unchanged_reply_is_not_decoded_again(agent: Agent) -> None:
    be: FakeBackend = agent.backend  # type: ignore[assignment]
    res = await agent.apply_raw(wire(reply([sliver("pl_a")], timestamp=10)), 1)
    assert res.ok and res.message == "ok" and "pl_a" in be.contexts
    res = await agent.apply_raw(wire(reply([sliver("pl_a")], timestamp=20)), 1)
    assert res.ok and res.message == "ok (unchanged)"
    assert agent.state.get_meta("last_timestamp") == "20"
    # A lost context is still recreated on the fast path: reconcile always runs.
    del be.contexts["pl_a"]
    res = await agent.apply_raw(wire(reply([sliver("pl_a")], timestamp=30)), 1)
    assert res.message == "ok (unchanged)" and "pl_a" in be.contexts
    res = await agent.apply_raw(wire(reply([sliver("pl_a", cpu_share="4")], timestamp=40)), 1)
    assert res.message == "ok" and be.contexts["pl_a"]["plan"].limits["cpu_share"] == 4


async def test_older_reply_ignored(agent: Agent) -> None:
    be: FakeBackend = agent.backend  # type: ignore[assignment]
    await agent.apply_raw(wire(reply([sliver("pl_a")], timestamp=100)), 1)
    res = await agent.apply_raw(wire(reply([], timestamp=50)), 1)
    assert not res.ok and "older" in res.message and "pl_a" in be.contexts


async def test_bad_replies_rejected(agent: Agent) -> None:
    be: FakeBackend = agent.backend  # type: ignore[assignment]
    await agent.apply_raw(wire(reply([sliver("pl_a")], timestamp=100)), 1)
    for raw in (b"<not xml", wire("a string"), wire(reply([], node_id=2, timestamp=200))):
        res = await agent.apply_raw(raw, 1)
        assert not res.ok and "GetSlivers reply" in res.message
    assert "pl_a" in be.contexts and agent.state.get_sliver("pl_a") is not None


async def test_failed_destroy_is_retried_even_without_plc(agent: Agent) -> None:
    be: FakeBackend = agent.backend  # type: ignore[assignment]
    await agent.apply_raw(wire(reply([sliver("pl_a"), sliver("pl_b")], timestamp=1)), 1)
    be.fail_destroy.add("pl_b")
    await agent.apply_raw(wire(reply([sliver("pl_a")], timestamp=2)), 1)
    rec = agent.state.get_sliver("pl_b")
    assert rec is not None and rec.state == "destroying" and "busy" in rec.message
    be.fail_destroy.clear()
    await agent.bring_up_from_state()   # as at start, before PLC answers
    assert agent.state.get_sliver("pl_b") is None and "pl_b" not in be.contexts
    assert "pl_a" in be.contexts


def test_guard_finds_slice_uids_in_the_configured_pool(tmp_path: Path) -> None:
    """The guard closes a revoked port's sockets by the old owner's uids: those must come
    from this agent's uid pool, not the config defaults."""
    cfg = config.from_mapping({
        "state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run"),
        "socket_path": str(tmp_path / "agent.sock"), "node_id": 1, "node_key": "k",
        "node_accounts": "", "default_image": "base", "host_accounts": 0,
        "uid_pool_start": 3_000_000, "uid_range_size": 70000,
        "plc_url": "http://127.0.0.1:9/PLCAPI/"}, "test")
    a = build(cfg, backend=FakeBackend())
    try:
        idx = a.state.allocate_uid_range("pl_x", cfg.uid_pool_ranges)
        guard = make_guard(cfg, a.state)
        assert guard.guard.uid_range("pl_x") == (3_000_000 + idx * 70000, 70000)
        assert guard.guard.uid_range("pl_unknown") is None
    finally:
        a.close()


async def test_no_expiry_while_plc_is_away(agent: Agent) -> None:
    """Expiry is applied by the reconcile of a good poll only: the local reconciler
    between polls (PLC unreachable) keeps an expired sliver, the next good reply decides."""
    import time

    be: FakeBackend = agent.backend  # type: ignore[assignment]
    s = sliver("pl_a")
    s["expires"] = int(time.time()) + 1
    await agent.apply_raw(wire(reply([s], timestamp=1)), 1)
    time.sleep(1.2)
    await agent.reconcile_now()          # PLC away: nothing expires
    assert "pl_a" in be.contexts
    s["expires"] = int(time.time()) + 3600   # renewed at PLC meanwhile
    await agent.apply_raw(wire(reply([s], timestamp=2)), 1)
    assert "pl_a" in be.contexts
    s["expires"] = int(time.time()) - 1
    await agent.apply_raw(wire(reply([s], timestamp=3)), 1)
    assert "pl_a" not in be.contexts


async def test_a_reply_whose_ingest_failed_is_ingested_again(agent: Agent,
                                                             monkeypatch: Any) -> None:
    import agent.main as main_mod

    be: FakeBackend = agent.backend  # type: ignore[assignment]
    await agent.apply_raw(wire(reply([sliver("pl_a")], timestamp=1)), 1)
    real = main_mod.ingest

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("disk full")

    monkeypatch.setattr(main_mod, "ingest", broken)
    with pytest.raises(RuntimeError):
        await agent.apply_raw(wire(reply([sliver("pl_a", cpu_share="7")], timestamp=2)), 1)
    monkeypatch.setattr(main_mod, "ingest", real)
    res = await agent.apply_raw(wire(reply([sliver("pl_a", cpu_share="7")], timestamp=3)), 1)
    assert res.message == "ok"
    assert be.contexts["pl_a"]["plan"].limits["cpu_share"] == 7


async def test_changed_settings_ingest_an_unchanged_reply_again(tmp_path: Path) -> None:
    def make(image: str) -> Agent:
        cfg = config.from_mapping({
            "state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run"),
            "socket_path": str(tmp_path / "agent.sock"), "node_id": 1, "node_key": "k",
            "node_accounts": "", "default_image": image, "host_accounts": 0,
            "plc_url": "http://127.0.0.1:9/PLCAPI/"}, "test")
        return build(cfg, backend=FakeBackend())

    a = make("base")
    try:
        assert (await a.apply_raw(wire(reply([sliver("pl_a")], timestamp=1)), 1)).message == "ok"
        assert (await a.apply_raw(wire(reply([sliver("pl_a")], timestamp=2)), 1)).message \
            == "ok (unchanged)"
    finally:
        a.close()
    b = make("other")   # agent.toml's default_image edited, agent restarted
    try:
        assert (await b.apply_raw(wire(reply([sliver("pl_a")], timestamp=3)), 1)).message == "ok"
    finally:
        b.close()


async def test_a_lost_state_database_keeps_running_slivers_ranges(tmp_path: Path) -> None:
    """The state database is gone but slivers run: their uid ranges are taken back from
    the running contexts, so they are adopted and no new sliver gets their uids."""
    be = FakeBackend()

    def make() -> Agent:
        cfg = config.from_mapping({
            "state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run"),
            "socket_path": str(tmp_path / "agent.sock"), "node_id": 1, "node_key": "k",
            "node_accounts": "", "default_image": "base", "host_accounts": 0,
            "plc_url": "http://127.0.0.1:9/PLCAPI/"}, "test")
        return build(cfg, backend=be)

    a = make()
    await a.apply_raw(wire(reply([sliver("pl_w"), sliver("pl_y")], timestamp=1)), 1)
    await a.apply_raw(wire(reply([sliver("pl_y")], timestamp=2)), 1)   # frees range 0
    y_base = be.contexts["pl_y"]["plan"].uid_base
    a.close()
    for f in (tmp_path / "state").glob("agent.db*"):
        f.unlink()
    b = make()
    try:
        await b.bring_up_from_state()
        await b.apply_raw(wire(reply([sliver("pl_x"), sliver("pl_y"), sliver("pl_z")],
                                     timestamp=3)), 1)
        y = b.state.get_sliver("pl_y")
        assert y is not None and y.state == "running", y
        bases = {n: be.contexts[n]["plan"].uid_base for n in ("pl_x", "pl_y", "pl_z")}
        assert bases["pl_y"] == y_base and len(set(bases.values())) == 3, bases
    finally:
        b.close()


async def test_reply_from_the_future_refused_and_never_recorded(agent: Agent) -> None:
    """F30: a forged reply stamped far ahead is refused (both paths: decoded and
    unchanged digest) and a later genuine reply is applied; a future timestamp recorded
    by an older agent does not hold genuine replies back either."""
    import time

    be: FakeBackend = agent.backend  # type: ignore[assignment]
    now = int(time.time())
    await agent.apply_raw(wire(reply([sliver("pl_a")], timestamp=now - 60)), 1)
    forged = now + 10 * 365 * 86400
    for r in (reply([], timestamp=forged), reply([sliver("pl_a")], timestamp=forged)):
        res = await agent.apply_raw(wire(r), 1)
        assert not res.ok and "ahead of this node's clock" in res.message, res.message
        assert agent.state.get_meta("last_timestamp") == str(now - 60)
        assert "pl_a" in be.contexts
    res = await agent.apply_raw(wire(reply([sliver("pl_a", cpu_share="4")], timestamp=now)), 1)
    assert res.ok and be.contexts["pl_a"]["plan"].limits["cpu_share"] == 4
    agent.state.set_meta("last_timestamp", str(forged))   # poisoned before the fix
    res = await agent.apply_raw(wire(reply([sliver("pl_a")], timestamp=now + 1)), 1)
    assert res.ok, res.message
    # within the allowed skew: accepted
    res = await agent.apply_raw(wire(reply([sliver("pl_a")], timestamp=now + 100)), 1)
    assert res.ok, res.message
