"""Two nodes, each a real `planetlab-agent run` in its own network namespace, and a real
`plc serve` on the host, driven through PLC's XML-RPC API as a legacy client would.

One PLC and two nodes for the module (tests/e2e/netnode.py explains what is per node);
everything (agents, slivers, mounts, cgroups, netns, veths) is removed at the end,
also when a test fails.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
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
           for i in (1, 2)]
    return login_base, ids


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not PROBE.exists():
        pytest.fail(f"{PROBE} missing: run `make native`")
    work = Path(tempfile.mkdtemp(prefix=f"e2e-plc-{PID}-", dir="/tmp"))
    links: list[Link] = []
    nodes: list[AgentNode] = []
    plc: Plc | None = None
    try:
        links = [Link.create(PID, 1)]
        links.append(Link.create(PID, 2))
        plc = Plc.start(work, links[0].host_addr)   # node 2 reaches it through the host
        login_base, node_ids = _setup_plc(plc)
        for i, link in enumerate(links, 1):
            nodes.append(AgentNode.create(i, link, plc, f"node{i}-{PID}.e2e.test"))
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
    """A slice on both nodes that owns tcp PORT (tag), running on each."""
    name = cluster.add_slice("both", cluster.node_ids, ports=f"tcp:{PORT}")
    for n in cluster.nodes:
        wait_running(n, name)
        put_probe(n, name)
    return name


def test_slice_on_both_nodes_runs_on_each(cluster: Cluster, both: str) -> None:
    pids = [init_pid(n, both) for n in cluster.nodes]
    assert all(pids) and pids[0] != pids[1]
    # Each sliver is in its own node's network: it sees that node's address only.
    for n in cluster.nodes:
        rc, out, err = in_sliver(n, both, ["ip", "-o", "-4", "addr"])
        assert rc == 0, err
        assert n.link.node_addr in out
        other = cluster.nodes[2 - n.index]
        assert other.link.node_addr not in out
    # The two agents gave the slice disjoint host uid ranges.
    bases = []
    for n in cluster.nodes:
        st = json.loads((n.contexts_dir / both / "state.json").read_text())
        bases.append(int(st["uid_base"]))
    assert abs(bases[0] - bases[1]) >= 65536, bases


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
    n1, n2 = cluster.nodes
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
    n1, n2 = cluster.nodes
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
