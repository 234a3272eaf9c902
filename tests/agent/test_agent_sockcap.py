"""The agent's INET socket cap (F33) against a real `plc serve` and the real kernel.

The node's default comes from agent.toml `sockets_max`, a slice's `sockets_max` tag
overrides it, and a tag change reaches the running sliver in place. Every `run_once`
is a fresh agent process, so each step after the first is also an agent restart
finding the kernel programs it did not load. The probe runs while an agent serves the
sliver's guard (a guarded sliver's socket() waits for the agent since F38: its sockets
are made for it in the node's network namespace), and that agent is stopped again
before the next step.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from agent_node import LiveServer, Node, Site, cleanup_node, make_node, plc_server, wait_for

from kernel import sockcap
from kernel.context import Context

pytestmark = pytest.mark.kernel

PID = os.getpid()
PROBE_SRC = Path(__file__).resolve().parents[1] / "kernel" / "sockprobe.c"
EPERM = f"E{errno.EPERM}"


@pytest.fixture(scope="module")
def plc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with plc_server(tmp_path_factory.mktemp(f"agent-sockcap-plc-{PID}")) as srv:
        api = srv.proxy()
        if not api.GetTagTypes(srv.admin_auth, {"tagname": "sockets_max"}):
            api.AddTagType(srv.admin_auth, {"tagname": "sockets_max", "category":
                                            "slice/rspec", "description": "socket cap"})
        yield srv


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"sockprobe{PID}") / "sockprobe"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(PROBE_SRC)],
                   check=True, timeout=120, capture_output=True)
    return out


@contextmanager
def agent_serving(node: Node, agents: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """A long-lived agent that has adopted the node's slivers (so it serves their
    guards) for the block; stopped after it."""
    before = node.log_text().count("slivers adopted")
    agent = node.start_agent()
    agents.append(agent)
    wait_for(lambda: node.log_text().count("slivers adopted") > before, 60,
             "the agent adopting the sliver", node.log_text)
    try:
        yield
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)


def test_default_tag_and_restart_keep_the_cap(plc: LiveServer, probe: Path) -> None:
    site = Site(plc)
    node = make_node(plc, site.hostname, sockets_max=3)
    agents: list[subprocess.Popen[bytes]] = []
    try:
        name = site.add_slice("cap")
        out = node.run_once()
        assert out.returncode == 0, out.stdout + out.stderr
        state = json.loads((node.contexts_dir / name / "state.json").read_text())
        assert state["limits"]["inet_sockets_max"] == 3       # agent.toml's default
        ctx = Context.adopt(node.contexts_dir, name)
        group = ctx.cgroup.v2_dir()
        assert group is not None and sockcap.usage(group) == (0, 3)
        shutil.copyfile(probe, ctx.root / "bin" / "sockprobe")
        os.chmod(ctx.root / "bin" / "sockprobe", 0o755)

        def steps(*argv: str) -> list[str]:
            rc, o, e = ctx.output(["/bin/sockprobe", *argv], timeout=60)
            assert rc == 0, (rc, o, e)
            return o.decode().split()

        with agent_serving(node, agents):
            assert steps("u4", "t6", "send4", "u6") == ["ok", "ok", "ok", EPERM]

        site.set_tag(name, "sockets_max", "5")
        out = node.run_once()
        assert out.returncode == 0, out.stdout + out.stderr
        after = json.loads((node.contexts_dir / name / "state.json").read_text())
        assert after["init_pid"] == state["init_pid"], "the cap changes in place"
        assert sockcap.usage(group) == (0, 5)
        with agent_serving(node, agents):
            assert steps(*["u4"] * 6) == ["ok"] * 5 + [EPERM]

        site.set_tag(name, "sockets_max", "0")               # 0: no cap
        out = node.run_once()
        assert out.returncode == 0, out.stdout + out.stderr
        assert sockcap.usage(group) == (0, None)
        with agent_serving(node, agents):
            assert steps(*["u4"] * 8) == ["ok"] * 8
    finally:
        cleanup_node(node, agents)
