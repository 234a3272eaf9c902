"""Issue 15 (operators) against a real agent: one agent per state directory (the
pid/lock files), `planetlab-agent poll`, `planetlab-agent decommission`, the startup
and recovery log lines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_node import (
    LiveServer,
    Node,
    Site,
    cleanup_node,
    make_node,
    plc_server,
    wait_for,
)

pytestmark = pytest.mark.kernel

PID = os.getpid()


@pytest.fixture(scope="module")
def plc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with plc_server(tmp_path_factory.mktemp(f"operator-plc-{PID}")) as srv:
        yield srv


def _cmd(node: Node, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(node.agent_argv(*args), capture_output=True, text=True,
                          timeout=timeout)


def _last_poll_ok(node: Node) -> bool:
    out = _cmd(node, "status", "--json")
    return out.returncode == 0 and bool(json.loads(out.stdout)["node"].get("last_poll_ok"))


def _remove_parent(parent: str) -> None:
    from kernel.cgroups import detect_layout, remove_parent

    remove_parent(detect_layout(), parent)


def _cgroup_dirs(parent: str) -> list[Path]:
    from kernel.cgroups import detect_layout

    layout = detect_layout()
    tops = [m / parent for m in layout.v1.values()]
    if layout.v2 is not None:
        tops.append(layout.v2 / parent)
    return [t for t in tops if t.exists()]


def test_lock_poll_and_log_lines(plc: LiveServer) -> None:
    site = Site(plc)
    parent = f"plop{PID}a"
    node = make_node(plc, site.hostname, poll_interval=600, cgroup_parent=parent)
    agents: list[subprocess.Popen[bytes]] = []
    try:
        agent = node.start_agent()
        agents.append(agent)
        wait_for(lambda: _last_poll_ok(node), 60, "the first poll", node.log_text)
        log = node.log_text()
        assert re.search(rf"planetlab-agent \S+ starting: config {re.escape(str(node.cfg_path))}"
                         rf", state {re.escape(node.cfg.state_dir)}, run "
                         rf"{re.escape(node.cfg.run_dir)}, PLC {re.escape(node.cfg.plc_url)}",
                         log), log
        assert "slivers adopted: 0" in log, log
        assert (Path(node.cfg.run_dir) / "agent.pid").read_text().strip() == str(agent.pid)

        # A second agent on the same state and run directories changes nothing.
        second = _cmd(node, "run", "--once")
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"another agent (pid {agent.pid}) holds {node.cfg.state_dir}/agent.lock" \
            in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        # ... nor on the same run directory with another state directory.
        other = node.base / "other.toml"
        other.write_text(node.cfg_path.read_text().replace(
            f'state_dir = "{node.cfg.state_dir}"', f'state_dir = "{node.base}/state2"'))
        third = subprocess.run([*node.agent_argv()[:3], "--config", str(other), "run",
                                "--once"], capture_output=True, text=True,
            timeout=120)
        assert third.returncode == 1 and "agent.pid" in third.stderr, third.stderr
        assert not (node.base / "state2" / "agent.db").exists()

        # `poll` finds the agent by its pid file and makes it poll now.
        name = site.add_slice("poll")
        out = _cmd(node, "poll", "--wait", "60")
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"asked the agent (pid {agent.pid}) to poll PLC now" in out.stdout
        assert "poll ok" in out.stdout
        wait_for(lambda: f"{name}: create done" in node.log_text(), 60,
                 "the sliver after `poll`", node.log_text)

        # `api` calls the slice API as the node admin: a port given by an rcap.
        port = 20000 + PID % 5000
        out = _cmd(node, "api", "AcquireRcap", json.dumps({"ports": f"tcp:{port}"}))
        assert out.returncode == 0 and re.fullmatch(r"[0-9a-f]{32}\n", out.stdout), out
        rcap = out.stdout.strip()
        out = _cmd(node, "api", "BindRcap", name, rcap)
        assert out.returncode == 0 and out.stdout.strip() == "1", out
        out = _cmd(node, "status", "--json")
        assert f"tcp:{port}" in out.stdout, out.stdout
        out = _cmd(node, "api", "BindRcap", name, "0" * 32)
        assert out.returncode == 1 and "fault" in out.stderr and not out.stdout, out
        out = _cmd(node, "api", "ReleaseRcap", rcap)
        assert out.returncode == 0, out

        # Restarted, the agent says which slivers it adopted; without it `poll` says so.
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        out = _cmd(node, "poll")
        assert out.returncode == 1 and "no agent runs" in out.stderr, out.stderr
        agent = node.start_agent()
        agents.append(agent)
        wait_for(lambda: "slivers adopted: 1" in node.log_text(), 60, "the restart",
                 node.log_text)
        assert f"slivers adopted: 1 ({name})" in node.log_text()
    finally:
        cleanup_node(node, agents)
        _remove_parent(parent)


def test_recovery_line(tmp_path: Path) -> None:
    """PLC away, then back: the agent says once that polls recovered."""
    from agent_node import start_server
    from plc_live import PLC

    srv = start_server(tmp_path / "plc")
    site = Site(srv)
    node = make_node(srv, site.hostname, poll_interval=600)
    agents: list[subprocess.Popen[bytes]] = []
    try:
        srv.stop()
        agents.append(node.start_agent())
        wait_for(lambda: "poll failed (1 in a row)" in node.log_text(), 60, "a failed poll",
                 node.log_text)
        with open(srv.log, "ab") as log:
            srv.proc = subprocess.Popen([PLC, "serve", "--db", str(srv.db), "--listen",
                                         f"127.0.0.1:{srv.port}"], stdout=log,
                                        stderr=subprocess.STDOUT, cwd=srv.workdir)
        wait_for(lambda: _answers(srv), 30, "PLC back", srv.log_text)
        out = _cmd(node, "poll", "--wait", "60")
        assert out.returncode == 0, out.stdout + out.stderr + node.log_text()
        assert re.search(r"poll recovered after \d+ failed in a row", node.log_text()), \
            node.log_text()
    finally:
        cleanup_node(node, agents)
        srv.stop()


def _answers(srv: LiveServer) -> bool:
    try:
        srv.proxy().system.listMethods()
        return True
    except OSError:
        return False


def test_decommission_removes_what_the_agent_made(plc: LiveServer) -> None:
    from kernel import disk

    site = Site(plc)
    parent = f"plop{PID}d"
    ifname = f"plop{PID % 1000000}"
    node = make_node(plc, site.hostname, cgroup_parent=parent)
    agents: list[subprocess.Popen[bytes]] = []
    subprocess.run(["ip", "link", "add", ifname, "type", "veth", "peer", "name", ifname + "p"],
                   check=True)
    try:
        from kernel.tc import Shaper

        with Shaper(ifname) as sh:
            sh.ensure_root(10**8, 10**9)
        name = site.add_slice("dec")
        out = node.run_once()
        assert out.returncode == 0, out.stdout + out.stderr
        init_pid = json.loads((node.contexts_dir / name / "state.json").read_text())["init_pid"]
        assert disk.store_mounted(node.roots_dir)
        img = node.roots_dir / ".disk" / "layers.btrfs"
        assert _loop_of(img), "the store is on a loop device"
        assert _cgroup_dirs(parent)

        agent = node.start_agent()
        agents.append(agent)
        wait_for(lambda: (Path(node.cfg.run_dir) / "agent.pid").read_text().strip()
                 == str(agent.pid), 60, "the agent's pid file", node.log_text)
        refused = _cmd(node, "decommission")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"another agent (pid {agent.pid})" in refused.stderr
        assert os.path.exists(f"/proc/{init_pid}"), "nothing was stopped"
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)

        out = _cmd(node, "decommission", "--interface", ifname)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"stopped sliver {name}" in out.stdout
        assert _dead(init_pid)
        assert not disk.store_mounted(node.roots_dir)
        assert not _loop_of(img), "the loop device went with the store"
        assert img.exists(), "the slivers' files stay in the state directory"
        assert not _cgroup_dirs(parent), _cgroup_dirs(parent)
        assert not Path(node.cfg.run_dir).exists()
        with Shaper(ifname) as sh:
            assert not sh.read().ours, "the shaping tree is gone"
        assert f"removed traffic shaping on {ifname}" in out.stdout
        # Idempotent: a second run finds nothing to do and succeeds.
        again = _cmd(node, "decommission")
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        subprocess.run(["ip", "link", "del", ifname], check=False)
        cleanup_node(node, agents)
        _remove_parent(parent)


def _dead(pid: int) -> bool:
    """Gone, or a zombie its parent (not ours to reap) has not collected yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def _loop_of(img: Path) -> list[str]:
    """Loop devices whose backing file is `img`."""
    found = []
    for dev in Path("/sys/block").glob("loop*"):
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing == str(img):
            found.append(dev.name)
    return found
