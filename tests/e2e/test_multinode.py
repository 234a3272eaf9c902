"""Three nodes, each a real `planetlab-agent run` in its own network namespace (its
egress shaped, its sensor server on when the agent has one), a real `plc serve` on the
host and the sensors collector, driven through PLC's XML-RPC API as a legacy client
would (issue 15: `make run NODES=3` as a test).

One PLC and three nodes for the module (tests/e2e/netnode.py explains what is per node);
everything (agents, slivers, mounts, cgroups, netns, veths) is removed at the end,
also when a test fails.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.netnode import AgentNode, Link, Plc

pytestmark = [pytest.mark.multinode, pytest.mark.kernel, pytest.mark.timeout(170)]

PID = os.getpid()
REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "kernel" / "bin" / "guard-probe"
PORT = 24000 + PID % 3000          # below the ephemeral range, unique per test process
NODES = 3
RATE_KBIT = 4000                    # the slice's net_max_rate on every node
SENSORS_PORT = 3100


def agent_serves_sensors() -> bool:
    """Whether this agent has the node sensor server (`[sensors] listen`)."""
    from agent import config

    try:
        config.from_mapping({"sensors": {"listen": f"127.0.0.1:{SENSORS_PORT}"}}, "probe")
        return True
    except config.ConfigError:
        return False


@dataclass
class Cluster:
    plc: Plc
    nodes: list[AgentNode]
    api: Any
    login_base: str
    node_ids: list[int]

    @property
    def admin(self) -> dict[str, Any]:
        return self.plc.admin_auth

    def add_slice(self, suffix: str, node_ids: list[int], **tags: str) -> str:
        name = f"{self.login_base}_{suffix}"
        self.api.AddSlice(self.admin, {"name": name, "url": "http://e2e.test/",
                                       "description": "e2e", "instantiation":
                                       "plc-instantiated"})
        for tag, value in tags.items():
            self.api.AddSliceTag(self.admin, name, tag, value)
        self.api.AddSliceToNodes(self.admin, name, node_ids)
        return name


def _setup_plc(plc: Plc) -> tuple[str, list[int]]:
    api = plc.proxy()
    admin = plc.admin_auth
    if not api.GetTagTypes(admin, {"tagname": "ports"}):
        api.AddTagType(admin, {"tagname": "ports", "category": "slice/rspec",
                               "description": "ports owned by the slice (docs/guard.md)"})
    login_base = f"e2e{PID % 100000}"
    site_id = api.AddSite(admin, {"name": f"E2E site {PID}", "abbreviated_name": "e2e",
                                  "login_base": login_base, "max_slices": 20,
                                  "max_slivers": 100, "enabled": True, "is_public": False})
    ids = [api.AddNode(admin, site_id, {"hostname": f"node{i}-{PID}.e2e.test"})
           for i in range(1, NODES + 1)]
    return login_base, ids


def _add_interface(plc: Plc, node_id: int, addr: str, gateway: str) -> None:
    """The node's primary interface, where the collector finds its sensor server."""
    plc.proxy().AddInterface(plc.admin_auth, node_id, {
        "type": "ipv4", "method": "static", "ip": addr, "netmask": "255.255.255.252",
        "network": addr.rsplit(".", 1)[0] + "." + str(int(addr.rsplit(".", 1)[1]) - 2),
        "broadcast": addr.rsplit(".", 1)[0] + "." + str(int(addr.rsplit(".", 1)[1]) + 1),
        "gateway": gateway, "dns1": gateway, "is_primary": True})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not PROBE.exists():
        pytest.fail(f"{PROBE} missing: run `make native`")
    work = Path(tempfile.mkdtemp(prefix=f"e2e-plc-{PID}-", dir="/tmp"))
    links: list[Link] = []
    nodes: list[AgentNode] = []
    plc: Plc | None = None
    try:
        for i in range(1, NODES + 1):
            links.append(Link.create(PID, i))
        plc = Plc.start(work, links[0].host_addr)   # the others reach it through the host
        login_base, node_ids = _setup_plc(plc)
        for i, link in enumerate(links, 1):
            _add_interface(plc, node_ids[i - 1], link.node_addr, link.host_addr)
            tables = f'[bandwidth]\ninterfaces = ["{link.node_if}"]\nsample_s = 1\n'
            if agent_serves_sensors():
                tables += f'[sensors]\nlisten = "{link.node_addr}:{SENSORS_PORT}"\n'
            nodes.append(AgentNode.create(i, link, plc, f"node{i}-{PID}.e2e.test", tables))
        for n in nodes:
            n.start_agent()
        yield Cluster(plc, nodes, plc.proxy(), login_base, node_ids)
    finally:
        errors = []
        for n in nodes:
            try:
                n.close()
            except Exception as exc:  # noqa: BLE001 - clean up the rest, then report
                errors.append(str(exc))
        if plc is not None:
            plc.stop()
        for link in links:
            link.close()
        shutil.rmtree(work, ignore_errors=True)
        if errors:
            raise RuntimeError("; ".join(errors))


def wait_for(pred: Any, timeout: float, what: str, log: Any = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log()}")
        time.sleep(0.2)


def init_pid(node: AgentNode, name: str) -> int | None:
    try:
        st = json.loads((node.contexts_dir / name / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    pid = int(st["init_pid"])
    return pid if Path(f"/proc/{pid}").exists() else None


def status(node: AgentNode) -> dict[str, Any]:
    out = node.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def sliver_status(node: AgentNode, name: str) -> dict[str, Any] | None:
    return next((s for s in status(node)["slivers"] if s["name"] == name), None)


def wait_running(node: AgentNode, name: str, timeout: float = 40) -> int:
    pid = wait_for(lambda: init_pid(node, name), timeout, f"{name} on node {node.index}",
                   node.log_text)
    s = wait_for(lambda: (x := sliver_status(node, name)) and x["state"] == "running" and x,
                 timeout, f"{name} running on node {node.index}", node.log_text)
    assert s["live"], s
    return int(pid)


def in_sliver(node: AgentNode, name: str, argv: list[str], user: str = "root",
              timeout: float = 30) -> tuple[int, str, str]:
    """Run argv in the sliver through `planetlab-agent enter` in the node's namespaces
    (the sliver's cgroups are only visible there)."""
    out = node.cli("enter", name, "-T", "--user", user, "--", *argv, timeout=timeout)
    return out.returncode, out.stdout, out.stderr


def put_probe(node: AgentNode, name: str) -> None:
    pid = init_pid(node, name)
    assert pid is not None
    dest = Path(f"/proc/{pid}/root/bin/guard-probe")   # the sliver's root, from the host
    shutil.copyfile(PROBE, dest)
    os.chmod(dest, 0o755)


@pytest.fixture(scope="module")
def both(cluster: Cluster) -> str:
    """A slice on every node that owns tcp PORT (tag) and has a bandwidth ceiling,
    running on each."""
    name = cluster.add_slice("both", cluster.node_ids, ports=f"tcp:{PORT}",
                             net_max_rate=str(RATE_KBIT))
    for n in cluster.nodes:
        wait_running(n, name)
        put_probe(n, name)
    return name


def test_slice_on_every_node_runs_on_each(cluster: Cluster, both: str) -> None:
    pids = [init_pid(n, both) for n in cluster.nodes]
    assert all(pids) and len(set(pids)) == NODES
    # Each sliver is in its own node's network: it sees that node's address only.
    for n in cluster.nodes:
        rc, out, err = in_sliver(n, both, ["ip", "-o", "-4", "addr"])
        assert rc == 0, err
        assert n.link.node_addr in out
        for other in cluster.nodes:
            if other is not n:
                assert other.link.node_addr not in out
    # The agents gave the slice disjoint host uid ranges.
    bases = sorted(int(json.loads((n.contexts_dir / both / "state.json").read_text())
                       ["uid_base"]) for n in cluster.nodes)
    assert all(b - a >= 65536 for a, b in zip(bases, bases[1:], strict=False)), bases


def test_port_owner_binds_and_other_slice_cannot(cluster: Cluster, both: str) -> None:
    n1 = cluster.nodes[0]
    other = cluster.add_slice("other", [cluster.node_ids[0]])
    wait_running(n1, other)
    put_probe(n1, other)
    rc, out, err = in_sliver(n1, both, ["/bin/guard-probe", "bind", "0.0.0.0", str(PORT)])
    assert rc == 0 and out.split() == ["bind", "0", str(PORT)], (out, err, n1.log_text())
    # The port is free again at the kernel level: only ownership can refuse it.
    for addr in ("0.0.0.0", n1.link.node_addr, "127.0.0.1"):
        rc, out, err = in_sliver(n1, other, ["/bin/guard-probe", "bind", addr, str(PORT)])
        assert out.split() == ["bind", str(errno.EADDRINUSE), "0"], (addr, out, err)
    # A port nobody owns: refused to both (below the ephemeral range).
    for name in (both, other):
        rc, out, err = in_sliver(n1, name, ["/bin/guard-probe", "bind", "0.0.0.0",
                                            str(PORT + 1)])
        assert out.split() == ["bind", str(errno.EACCES), "0"], (name, out, err)
    # Node 2 enforces the same tag on its own.
    rc, out, err = in_sliver(cluster.nodes[1], both, ["/bin/guard-probe", "bind",
                                                      cluster.nodes[1].link.node_addr,
                                                      str(PORT)])
    assert out.split() == ["bind", "0", str(PORT)], (out, err)


def test_sliver_reaches_sliver_on_other_node(cluster: Cluster, both: str) -> None:
    n1, n2 = cluster.nodes[:2]
    server = subprocess.Popen(n2.agent_argv("enter", both, "-T", "--", "timeout", "60", "nc",
                                            "-l", "-p", str(PORT)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO)
    try:
        def listening() -> bool:
            out = subprocess.run(["nsenter", f"--net=/run/netns/{n2.link.netns}", "ss", "-Hltn",
                                  f"sport = :{PORT}"], capture_output=True, text=True,
                                 timeout=30)
            return f":{PORT}" in out.stdout

        wait_for(listening, 40, "node 2's sliver to listen", n2.log_text)
        msg = f"hello from node1 {PID}"
        rc, out, err = in_sliver(n1, both, ["sh", "-c", f"echo '{msg}' | timeout 30 nc "
                                            f"{n2.link.node_addr} {PORT}"], timeout=60)
        assert rc == 0, (rc, out, err)
        got, server_err = server.communicate(timeout=60)
        assert msg in got.decode(), (got, server_err)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=60)


def test_removing_from_node2_destroys_only_that_sliver(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes[:2]
    name = cluster.add_slice("gone", cluster.node_ids)
    keep = wait_running(n1, name)
    gone = wait_running(n2, name)
    cluster.api.DeleteSliceFromNodes(cluster.admin, name, [cluster.node_ids[1]])
    wait_for(lambda: not Path(f"/proc/{gone}").exists() and
             not (n2.contexts_dir / name).exists(), 40, "node 2's sliver to go", n2.log_text)
    assert sliver_status(n2, name) is None
    mounts = subprocess.run(n2.ns_argv("cat", "/proc/self/mountinfo"), capture_output=True,
                            text=True, timeout=30).stdout
    assert f"/roots/{name}" not in mounts
    assert not any(name in p.name for p in (n2.base / "state" / "roots").iterdir())
    for sub in n2.cg_made:   # node 2's cgroups of the sliver, as the host sees them
        assert not (sub / "planetlab" / name).exists(), sub
    assert any((sub / "planetlab" / name).exists() for sub in n1.cg_made)
    # Node 1's sliver is untouched: same init, still running.
    time.sleep(2)   # a couple of node 1's polls
    assert init_pid(n1, name) == keep
    s = sliver_status(n1, name)
    assert s is not None and s["state"] == "running"


def test_bandwidth_ceiling_holds(cluster: Cluster, both: str) -> None:
    """Coarse: a flood from node 1's sliver to a sink on the host arrives at about the
    slice's net_max_rate (HTB on node 1's interface), not at veth speed."""
    import socket
    import threading

    n1 = cluster.nodes[0]
    sink = socket.socket()
    sink.bind((n1.link.host_addr, 0))
    sink.listen(1)
    sink.settimeout(30)
    port = sink.getsockname()[1]
    marks: list[tuple[float, int]] = []

    def drain() -> None:
        conn, _ = sink.accept()
        total = 0
        with conn:
            conn.settimeout(15)
            while chunk := conn.recv(65536):
                total += len(chunk)
                marks.append((time.monotonic(), total))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        rc, out, err = in_sliver(n1, both, ["sh", "-c", "dd if=/dev/zero bs=16384 count=160 "
                                            f"2>/dev/null | timeout 8 nc {n1.link.host_addr} "
                                            f"{port}"], timeout=60)
        reader.join(20)
    finally:
        sink.close()
    assert marks, (rc, out, err)
    start = marks[0][0]
    window = [b for t, b in marks if 1.0 <= t - start <= 3.0]
    assert len(window) >= 2, (marks[-1], rc, err)
    span = [t for t, _ in marks if 1.0 <= t - start <= 3.0]
    rate = (window[-1] - window[0]) * 8 / (span[-1] - span[0])
    tc = subprocess.run(["tc", "-n", n1.link.netns, "-s", "class", "show", "dev",
                         n1.link.node_if], capture_output=True, text=True).stdout
    assert 0.5 * RATE_KBIT * 1000 < rate < 1.3 * RATE_KBIT * 1000, (rate, marks[-1], tc)


def test_collector_shows_every_node_and_the_slice(cluster: Cluster, both: str) -> None:
    """The collector learns the three nodes from PLC; with the agents' sensor servers
    (`[sensors] listen`) it polls them and sees the slice on each."""
    import socket
    import urllib.request

    work = Path(tempfile.mkdtemp(prefix=f"e2e-collector-{PID}-", dir="/tmp"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = work / "sensors.toml"
    cfg.write_text(f'[collector]\ndb = "{work / "c.db"}"\nlisten = "127.0.0.1"\n'
                   f"port = {port}\ninterval = 1\ntimeout = 2\nnode_port = {SENSORS_PORT}\n"
                   f'[plc]\nurl = "{cluster.plc.url}"\nusername = "{cluster.plc.admin_email}"\n'
                   f'password = "{cluster.admin["AuthString"]}"\nrefresh = 5\n')
    log = open(work / "collector.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("planetlab-sensors")),
                             "collect", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO)

    def get(path: str) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.read().decode()
        except OSError:
            return ""

    names = [n.hostname for n in cluster.nodes]
    try:
        wait_for(lambda: all(h in get("/api/nodes") for h in names), 40,
                 "the collector to list every node",
                 lambda: (work / "collector.log").read_text()[-3000:])
        if agent_serves_sensors():
            def slice_nodes() -> int:
                """On how many nodes the collector sees the slice (its slices table
                has one row per slice, with the count of nodes it runs on)."""
                text = get("/query?table=slices&format=json")
                rows = json.loads(text) if text else []
                return max((int(r.get("nodes", 0)) for r in rows if r.get("name") == both),
                           default=0)

            wait_for(lambda: slice_nodes() == NODES, 40, "the slice on every node in the "
                     "collector", lambda: get("/query?table=slices&format=json")[:2000]
                     + (work / "collector.log").read_text()[-3000:])
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def test_agent_killed_and_plc_restarted_lose_nothing(cluster: Cluster, both: str) -> None:
    import signal

    n3 = cluster.nodes[-1]
    before = {n.index: init_pid(n, both) for n in cluster.nodes}
    assert all(before.values())
    for proc in n3.agents:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert init_pid(n3, both) == before[n3.index], "the sliver outlives its agent"
    n3.start_agent()
    cluster.plc.restart()
    # PLC kept every object; a change made after the restart reaches the nodes.
    slices = cluster.api.GetSlices(cluster.admin, [both], ["node_ids"])
    assert sorted(slices[0]["node_ids"]) == sorted(cluster.node_ids)
    late = cluster.add_slice("late", cluster.node_ids)
    for n in cluster.nodes:
        wait_running(n, late)
    # No sliver was recreated: the same init on every node, still running.
    assert {n.index: init_pid(n, both) for n in cluster.nodes} == before
    for n in cluster.nodes:
        s = sliver_status(n, both)
        assert s is not None and s["state"] == "running" and s["live"], (n.index, s)


def test_deleting_the_slice_removes_every_sliver(cluster: Cluster, both: str) -> None:
    pids = [init_pid(n, both) for n in cluster.nodes]
    cluster.api.DeleteSlice(cluster.admin, both)
    for n, pid in zip(cluster.nodes, pids, strict=True):
        wait_for(lambda n=n, pid=pid: not Path(f"/proc/{pid}").exists()
                 and not (n.contexts_dir / both).exists() and sliver_status(n, both) is None,
                 40, f"the sliver on node {n.index} to go", n.log_text)
        mounts = subprocess.run(n.ns_argv("cat", "/proc/self/mountinfo"), capture_output=True,
                                text=True, timeout=30).stdout
        assert f"/roots/{both}" not in mounts
        for sub in n.cg_made:
            assert not (sub / "planetlab" / both).exists(), sub
