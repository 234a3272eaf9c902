"""`make run` (scripts/run_demo.py) end to end: PLC, the agent and the collector come
up, the demo sliver runs and answers `plapi` from inside; SIGHUP (a closed terminal)
and SIGTERM stop everything and leave nothing of the demo (process, mount, loop
device, cgroup, run directory) while a real agent's `planetlab` cgroup parents stay; a
second run reuses what the first made; a busy port gets a clear message.

State dir, run dir, ports, cgroup parent and uid pool are derived from the pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(400)]

PID = os.getpid()
REPO = Path(__file__).resolve().parents[2]
CG = Path("/sys/fs/cgroup")


def _ports() -> tuple[int, int, int]:
    base = 30000 + (PID % 2000) * 3
    return base, base + 1, base + 2


def _argv(state: Path, run: Path, plc_port: int) -> list[str]:
    _, sensors, collector = _ports()
    return [sys.executable, str(REPO / "scripts" / "run_demo.py"), "--state-dir", str(state),
            "--run-dir", str(run), "--listen", f"127.0.0.1:{plc_port}",
            "--sensors-listen", f"127.0.0.1:{sensors}",
            "--collector-listen", f"127.0.0.1:{collector}",
            "--cgroup-parent", f"pldemo-{PID}", "--uid-pool-start",
            str(2_010_000_000 + (PID % 30) * 64 * 65536)]   # the demo pool: 64 ranges


def _planetlab_parents() -> set[Path]:
    return {p for p in CG.glob("*/planetlab") if p.is_dir()} | (
        {CG / "planetlab"} if (CG / "planetlab").is_dir() else set())


def _leftovers(state: Path, run: Path) -> list[str]:
    left = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(state) in cmd and int(pid) != os.getpid():
                left.append(f"process {pid}: {cmd}")
    mounts = Path("/proc/self/mountinfo").read_text()
    left += [f"mount {line.split()[4]}" for line in mounts.splitlines()
             if str(state) in line or str(run) in line]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    left += [f"loop {line}" for line in loops.splitlines() if str(state) in line]
    left += [f"cgroup {p}" for p in [*CG.glob(f"*/pldemo-{PID}"), CG / f"pldemo-{PID}"]
             if p.exists()]
    if run.exists():
        left.append(f"run dir {run}")
    return left


def _run_until_ready(argv: list[str], out_path: Path) -> subprocess.Popen[bytes]:
    out = open(out_path, "wb")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while "Ctrl-C stops everything." not in out_path.read_text():
        assert proc.poll() is None, out_path.read_text()
        assert time.monotonic() < deadline, out_path.read_text()
        time.sleep(0.5)
    return proc


def _agent(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "--config",
                           str(state / "agent.toml"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def _get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def _collector_sees_the_node(state: Path) -> None:
    """The dashboard answers and lists the node; the node is up with the demo slice
    once the agent serves sensors (`[sensors] listen`, the sensors helper's key: an
    agent without it has no sensor server to poll)."""
    port = _ports()[2]
    assert "<html" in _get(port, "/")
    serves = "[sensors]" in (state / "agent.toml").read_text()
    deadline = time.monotonic() + 60
    while True:
        nodes = _get(port, "/api/nodes")
        if "planetlab.test" in nodes and (not serves or ("demo_slice" in
                                                           _get(port, "/api/fleet") + nodes)):
            return
        assert time.monotonic() < deadline, nodes
        time.sleep(1)


def test_make_run_comes_up_and_leaves_nothing(tmp_path: Path) -> None:
    state, run = tmp_path / "state", Path(f"/run/pldemo-test-{PID}")
    plc_port = _ports()[0]
    parents = _planetlab_parents()
    out = tmp_path / "out"
    proc = _run_until_ready(_argv(state, run, plc_port), out)
    try:
        text = out.read_text()
        assert "built the image" in text
        assert "plapi GetRSpec" in text and "ssh -i" in text and "plc shell" in text
        got = _agent(state, "enter", "-T", "demo_slice", "--", "/usr/lib/planetlab/plapi",
                     "GetRSpec")
        assert got.returncode == 0, got.stderr
        assert "<name>cpu_cap</name>" in got.stdout and "<int>50</int>" in got.stdout
        # The tour's `df` and the node admin's port: `df /` shows the sliver's disk_max
        # (the agent's default, 10,000,000 KiB); an rcap gives the slice a port.
        got = _agent(state, "enter", "-T", "demo_slice", "--", "df", "-k", "/")
        assert got.returncode == 0 and got.stdout.splitlines()[-1].split()[1] == "10000000", \
            got.stdout + got.stderr
        port = 20000 + PID % 5000
        got = _agent(state, "api", "AcquireRcap", f'{{"ports": "tcp:{port}"}}')
        assert got.returncode == 0, got.stderr
        got = _agent(state, "api", "BindRcap", "demo_slice", got.stdout.strip())
        assert got.returncode == 0 and got.stdout.strip() == "1", got.stderr
        got = _agent(state, "enter", "-T", "demo_slice", "--", "/usr/lib/planetlab/plapi",
                     "GetPorts")
        assert f"tcp:{port}" in got.stdout, got.stdout + got.stderr
        # Read-only for the sliver's root.
        got = _agent(state, "enter", "-T", "demo_slice", "--", "sh", "-c",
                     "echo x > /usr/lib/planetlab/plapi")
        assert got.returncode != 0
        _collector_sees_the_node(state)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(120) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped: PLC, the agent" in out.read_text()
    assert _leftovers(state, run) == []
    assert _planetlab_parents() >= parents, "a real agent's cgroup parents were removed"

    # A second run reuses the database, the keys and the image; SIGTERM stops it.
    out2 = tmp_path / "out2"
    proc = _run_until_ready(_argv(state, run, plc_port), out2)
    try:
        assert "built the image" not in out2.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, out2.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _leftovers(state, run) == []


def test_busy_port_is_named_with_the_option(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(_argv(tmp_path / "s", tmp_path / "r", port), capture_output=True,
                             text=True, cwd=REPO, timeout=60)
    assert out.returncode != 0
    assert f"PLC's API address 127.0.0.1:{port} is already in use" in out.stderr
    assert "--listen ADDRESS:PORT" in out.stderr
    assert not (tmp_path / "s").exists(), "nothing made before the check"


def test_make_run_nodes_3_and_sighup_leaves_nothing(tmp_path: Path) -> None:
    """`make run NODES=3`: three agents in network namespaces, the slice on each; SIGHUP
    removes the namespaces, veths, cgroup subtrees, node directories and processes."""
    state, run = tmp_path / "state", Path(f"/run/pldemo3-test-{PID}")
    plc_port = _ports()[0]
    out = tmp_path / "out"
    proc = _run_until_ready([*_argv(state, run, plc_port), "--nodes", "3"], out)
    demo = proc.pid
    try:
        text = out.read_text()
        assert text.count("demo_slice running") == 3, text
        assert len(list(Path("/run/netns").glob(f"e2e{demo}n*"))) == 3
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(120) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped: PLC, 3 nodes" in out.read_text()
    assert list(Path("/run/netns").glob(f"e2e{demo}n*")) == []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"e2h{demo}n" not in links
    assert list(CG.glob(f"*/e2e-{demo}-n*")) + list(CG.glob(f"e2e-{demo}-n*")) == []
    assert list(Path("/tmp").glob(f"e2e-node*-{demo}-*")) == []
    assert _leftovers(state, run) == []
