"""KernelBackend.run on a real sliver: output tail, exit codes, timeout [F21]."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_node import cleanup_node, make_node

from agent.backend import OUTPUT_TAIL, KernelBackend, SliverPlan, split_dropped

pytestmark = pytest.mark.kernel

PID = os.getpid()


@pytest.fixture
def sliver() -> Iterator[tuple[KernelBackend, str]]:
    import prctl

    # KernelBackend makes this process a subreaper; put it back afterwards, or the inits
    # of agents that later tests run as subprocesses become our zombies when they exit.
    was_subreaper = prctl.get_child_subreaper()
    node = make_node(None, f"run{PID}.agent.test")
    name = f"brun{PID}"
    try:
        backend = KernelBackend(node.state_dir, Path(node.cfg.run_dir))
    except BaseException:
        prctl.set_child_subreaper(was_subreaper)
        cleanup_node(node)
        raise
    limits: dict[str, Any] = {"cpu_share": 1, "cpu_pct": None, "mem_max": None,
                              "pids_max": 200, "rlimits": {}, "extra_capabilities": ()}
    try:
        backend.create(SliverPlan(name, "bb", 1_500_000_000 + (PID % 9000) * 65536, 65536,
                                  limits, None, name))
        yield backend, name
    finally:
        try:
            backend.destroy(name)
        finally:
            cleanup_node(node)
            prctl.set_child_subreaper(was_subreaper)


def test_run_code_and_both_streams(sliver: tuple[KernelBackend, str]) -> None:
    backend, name = sliver
    code, text = backend.run(name, ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (code, text) == (3, "out\nerr\n")


def test_run_keeps_a_bounded_tail(sliver: tuple[KernelBackend, str]) -> None:
    backend, name = sliver
    total = 5 * OUTPUT_TAIL + 123
    code, text = backend.run(name, ["/bin/sh", "-c",
                                    f"yes abcdefg | head -c {total}; echo; echo end"])
    assert code == 0
    written = ("abcdefg\n" * (total // 8 + 1))[:total] + "\nend\n"
    dropped, rest = split_dropped(text)
    assert dropped == len(written) - OUTPUT_TAIL
    assert rest == written[-OUTPUT_TAIL:]


def test_run_timeout_kills_the_command(sliver: tuple[KernelBackend, str]) -> None:
    backend, name = sliver
    t0 = time.monotonic()
    code, text = backend.run(name, ["/bin/sh", "-c", "echo before; exec sleep 60"],
                             timeout=1.0)
    assert time.monotonic() - t0 < 10
    assert code == -signal.SIGKILL and text == "before\n"
    # The sliver is still usable afterwards.
    assert backend.run(name, ["/bin/sh", "-c", "echo again"]) == (0, "again\n")


def test_destroy_clears_a_sliver_whose_init_died(sliver: tuple[KernelBackend, str]) -> None:
    """A dead context (init killed, node crash) is destroyed whole: its directory and
    uid reservation go, not only its root (the CLI's `sliver destroy` relies on it)."""
    backend, name = sliver
    pid = backend._context(name).init_pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while name in backend.live() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert name not in backend.live()
    backend.destroy(name)
    assert not (backend.run_dir / name).exists()
    assert name not in (backend.run_dir / ".uid-ranges").read_text()
    assert not (backend.roots_dir / name).exists()
