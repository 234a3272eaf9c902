"""CPU grants through the agent's one path (agent.rspec -> KernelBackend create/update)
on real slivers: reservations admitted or refused with the numbers in `status` (text
and --json), weights recomputed in place for the others, cpu_freezable freezing a
sliver without cores and thawing it when it gets one (issue 10)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_node import cleanup_node, make_node

from agent import rspec
from agent.backend import KernelBackend, SliverPlan
from agent.cli_agent import cmd_status
from agent.state import SliverRecord, SliverState, State
from kernel import cgroups as cg

pytestmark = pytest.mark.kernel

PID = os.getpid()
UID0 = 1_600_000_000 + (PID % 4000) * 3 * 65536


def plan(name: str, idx: int, tags: dict[str, str]) -> SliverPlan:
    limits = rspec.limits_kwargs(rspec.resolve(tags).rspec)
    return SliverPlan(name, "bb", UID0 + idx * 65536, 65536, limits, None, name)


def weight(backend: KernelBackend, name: str) -> int:
    g = backend._context(name).cgroup
    if g.layout.mode == "v1":
        return int((g.path("cpu") / "cpu.shares").read_text()) * 100 // 1024
    return int((g.path("cpu") / "cpu.weight").read_text())


@pytest.fixture
def node() -> Iterator[tuple[Any, KernelBackend]]:
    import prctl

    was = prctl.get_child_subreaper()
    n = make_node(None, f"cpu{PID}.agent.test", cgroup_parent=f"plcpu{PID}")
    backend = KernelBackend(n.state_dir, Path(n.cfg.run_dir), cgroup_parent=f"plcpu{PID}",
                            cpu_headroom_pct=10)
    try:
        yield n, backend
    finally:
        try:
            for name in list(backend.live()):
                backend.destroy(name)
            cg.remove_parent(cg.detect_layout(), f"plcpu{PID}")
        finally:
            cleanup_node(n)
            prctl.set_child_subreaper(was)


def test_reservations_admission_in_place_and_status(node: tuple[Any, KernelBackend],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    n, backend = node
    a, b, c = f"ca{PID}", f"cb{PID}", f"cc{PID}"
    tags = {a: {"cpu_pct": "40"}, b: {"cpu_pct": "55"}, c: {"cpu_freezable": "1"}}
    backend.create(plan(a, 0, tags[a]))
    alone = weight(backend, a)
    init_a = backend._context(a).init_pid
    backend.create(plan(b, 1, tags[b]))
    grants = json.loads((Path(n.cfg.run_dir) / "cpu.json").read_text())["grants"]
    assert grants[a]["reserve_pct"] == 40 and grants[b]["reserve_pct"] == 0
    assert "cpu_pct 55 refused" in grants[b]["refused"][0]
    # a's weight was recomputed in place against b's best-effort weight.
    assert weight(backend, a) != alone and backend._context(a).init_pid == init_a
    wa, wb = weight(backend, a), weight(backend, b)
    assert wa / (wa + wb) >= 0.40   # (its share weight, 100, is the larger here)

    # cpu_freezable without cores: frozen; one whole core: thawed, in place.
    backend.create(plan(c, 2, tags[c]))
    assert backend.frozen(c)
    init_c = backend._context(c).init_pid
    tags[c] = {"cpu_freezable": "1", "cpu_cores": "1"}
    assert backend.update(plan(c, 2, tags[c])) is None
    assert not backend.frozen(c) and backend._context(c).init_pid == init_c
    core = json.loads((Path(n.cfg.run_dir) / "cpu.json").read_text())["grants"][c]["cores"]
    assert len(core) == 1
    assert backend._context(c).cgroup.cpus_effective() == str(core[0])
    grants = json.loads((Path(n.cfg.run_dir) / "cpu.json").read_text())["grants"]
    assert grants[a]["reserve_pct"] == 40          # the core did not evict it
    # A core a reservation would no longer fit beside is refused.
    tags[b] = {"cpu_cores": "1"}
    backend.update(plan(b, 1, tags[b]))
    grants = json.loads((Path(n.cfg.run_dir) / "cpu.json").read_text())["grants"]
    assert grants[b]["cores"] == [] and "cpu_cores 1 refused" in grants[b]["refused"][0]
    # b lowers its reservation: admitted in place.
    tags[b] = {"cpu_pct": "5"}
    backend.update(plan(b, 1, tags[b]))
    grants = json.loads((Path(n.cfg.run_dir) / "cpu.json").read_text())["grants"]
    assert grants[b]["reserve_pct"] == 5 and not grants[b]["refused"]

    # status shows grants and a refusal with its numbers.
    tags[b] = {"cpu_pct": "60"}
    backend.update(plan(b, 1, tags[b]))
    with State.open(n.state_dir) as st:
        for name in (a, b, c):
            r = rspec.resolve(tags[name]).rspec
            st.put_sliver(SliverRecord(name, 1, "plc-instantiated", 2**31, "bb", {}, r, [],
                                       SliverState.RUNNING, "", True, "", 0.0, 0.0))
    args = argparse.Namespace(config=str(n.cfg_path), json=False, state_dir=None)
    assert cmd_status(args) == 0
    text = capsys.readouterr().out
    assert "cpu_pct 60 refused: reservations hold 40% of the node and may hold 45%" in text
    assert "reserved=40%" in text and "(exclusive partition)" in text
    args.json = True
    assert cmd_status(args) == 0
    out = json.loads(capsys.readouterr().out)
    by = {s["name"]: s for s in out["slivers"]}
    assert by[b]["cpu"]["reserve_pct"] == 0 and by[b]["cpu"]["refused"]
    assert by[a]["cpu"]["reserve_pct"] == 40
