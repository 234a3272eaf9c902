"""The agent's poll cycle on raw replies: decoding, the unchanged-reply fast path, the
timestamp rule, removals that survive failures and PLC outages."""

from __future__ import annotations

import os
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


class _RootsBackend(FakeBackend):
    """A FakeBackend whose slivers have roots with an /etc/passwd chosen per name."""

    def __init__(self, where: Path, passwd: dict[str, bytes]) -> None:
        super().__init__()
        self.where, self.passwd = where, passwd

    def create(self, plan: Any) -> None:
        super().create(plan)
        root = self.where / plan.name
        (root / "etc").mkdir(parents=True)
        p = root / "etc" / "passwd"
        p.write_bytes(self.passwd.get(plan.name, b"root:x:0:0:root:/root:/bin/sh\n"))
        for q in (root, root / "etc", p):
            os.chown(q, plan.uid_base, plan.uid_base)

    def root_of(self, name: str) -> Path | None:
        return self.where / name if name in self.contexts else None


async def test_one_slivers_passwd_never_stops_the_agent(tmp_path: Path) -> None:
    """F31: a uid field of '²' (isdigit() but not int()) or of 5000 digits in one
    sliver's /etc/passwd: the agent goes on, the other slivers get their user, and
    the bad ones say why in their status."""
    cfg = config.from_mapping({
        "state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run"),
        "socket_path": str(tmp_path / "agent.sock"), "node_id": 1, "node_key": "k",
        "node_accounts": "", "default_image": "base", "host_accounts": 0,
        "plc_url": "http://127.0.0.1:9/PLCAPI/"}, "test")
    names = [f"s{os.getpid()}_{t}" for t in ("sup", "long", "good")]
    bad = {names[0]: f"{names[0]}:x:\u00b2:0::/:/bin/sh\n".encode(),
           names[1]: f"{names[1]}:x:{'9' * 5000}:0::/:/bin/sh\n".encode(),
           names[2]: "root:x:0:0:root:/root:/bin/sh\nother:x:\u00b2:1::/:/bin/sh\n".encode()}
    a = build(cfg, backend=_RootsBackend(tmp_path / "roots", bad))
    try:
        result = await a.apply_raw(wire(reply([sliver(n) for n in names])), 1)
        assert result.ok, result.message
        be: FakeBackend = a.backend  # type: ignore[assignment]
        assert set(be.contexts) == set(names)
        good = (tmp_path / "roots" / names[2] / "etc/passwd").read_text()
        assert f"{names[2]}:x:1000:1000:" in good     # '²' is not a taken uid
        for n in names[:2]:
            rec = a.state.get_sliver(n)
            assert rec is not None and rec.state == "running"
        # and again, from the state alone (what every start does)
        await a.bring_up_from_state()
    finally:
        a.close()


@pytest.mark.parametrize("module,value", [("agent.main", -900), ("plc.cli", -500)])
def test_agent_and_plc_lower_their_oom_score_adj(module: str, value: int) -> None:
    """F34: the agent (-900) and `plc serve` (-500) are taken after slivers (500).
    Lowering needs CAP_SYS_RESOURCE: where root lacks it (this VM) the call says so."""
    import subprocess
    import sys

    code = (f"import {module} as m; ok = m.protect_from_oom(); "
            "print(ok, open('/proc/self/oom_score_adj').read().strip())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout.split()
    capeff = int(next(line.split()[1] for line in Path("/proc/self/status").read_text()
                      .splitlines() if line.startswith("CapEff:")), 16)
    if capeff >> 24 & 1:     # CAP_SYS_RESOURCE
        assert out == ["True", str(value)]
    else:
        assert out == ["False", "0"]
