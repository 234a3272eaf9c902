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
from agent.main import Agent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    cfg = config.from_mapping({
        "state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run"),
        "socket_path": str(tmp_path / "agent.sock"), "node_id": 1, "node_key": "k",
        "node_accounts": "", "default_image": "base", "host_accounts": 0,
        "plc_url": "http://127.0.0.1:9/PLCAPI/"}, "test")
    a = Agent(cfg, backend=FakeBackend())
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
    a = Agent(cfg, backend=FakeBackend())
    try:
        idx = a.state.allocate_uid_range("pl_x", cfg.uid_pool_ranges)
        guard = a._make_guard()
        assert guard.guard.uid_range("pl_x") == (3_000_000 + idx * 70000, 70000)
        assert guard.guard.uid_range("pl_unknown") is None
    finally:
        a.close()
