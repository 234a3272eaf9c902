"""Nodes for the multi-node end-to-end tests: each one a real `planetlab-agent run`
process in its own network namespace, reached from the host over a veth pair.

On one machine several agents share a kernel, so what is node-wide on a real node
must be made per node here:
- the network: `ip netns add`, a veth pair whose host end has x.x.x.1/30 and whose
  node end x.x.x.2/30 (default route to the host). Forwarding is switched on for
  these host ends only (`net.ipv4.conf.IF.forwarding`), so node 1 reaches node 2
  through the host without touching the host's global `ip_forward`.
- the cgroup parent: kernel/cgroups.py puts every sliver under `planetlab/NAME` of
  each hierarchy, so one slice on two nodes would collide. Each node gets a holder
  process in a private mount namespace where every cgroup hierarchy is a bind of a
  per-node subgroup (`HIER/e2e-PID-nN`); its agent, CLI calls and slivers run in that
  mount namespace (`nsenter --target HOLDER --mount --net=...`).
- state dir, run dir, socket, node key and uid pool are per node (agent.toml).

Mounts the agent makes (layer store, sliver roots) live in the holder's namespace:
cleanup runs there (destroy by the CLI, then `python -m tests.e2e.nodeclean`), and
the namespace dies with the holder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

REPO = Path(__file__).resolve().parents[2]
PLC = str(Path(sys.executable).with_name("plc"))
ADMIN_PASSWORD = "E2e-adm1n-pass"
AGENT_MAIN = "import sys; from agent.cli import main; sys.exit(main())"


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def subnet(pid: int, index: int) -> tuple[str, str]:
    """(host address, node address) of node `index`'s /30: 10.(212+index).K/30,
    K from the pid so that parallel runs use different links."""
    k = pid % 16384
    third, fourth = k // 64, (k % 64) * 4
    net = f"10.{212 + index}.{third}"
    return f"{net}.{fourth + 1}", f"{net}.{fourth + 2}"


def address_in_use(addr: str) -> bool:
    out = sh("ip", "-o", "-4", "addr", "show", check=False).stdout
    return f" {addr}/" in out


@dataclass
class Link:
    """A netns with a veth pair to the host; `close()` removes both (idempotent)."""

    netns: str
    host_if: str
    node_if: str
    host_addr: str
    node_addr: str

    @classmethod
    def create(cls, pid: int, index: int) -> Link:
        host_addr, node_addr = subnet(pid, index)
        for a in (host_addr, node_addr):
            if address_in_use(a):
                raise RuntimeError(f"test address {a} is already in use on this host")
        link = cls(f"e2e{pid}n{index}", f"e2h{pid}n{index}", f"e2v{pid}n{index}",
                   host_addr, node_addr)
        try:
            sh("ip", "netns", "add", link.netns)
            sh("ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.node_if)
            sh("ip", "link", "set", link.node_if, "netns", link.netns)
            sh("ip", "addr", "add", f"{host_addr}/30", "dev", link.host_if)
            sh("ip", "link", "set", link.host_if, "up")
            sh("sysctl", "-qw", f"net.ipv4.conf.{link.host_if}.forwarding=1")
            n = ("ip", "-n", link.netns)
            sh(*n, "addr", "add", f"{node_addr}/30", "dev", link.node_if)
            sh(*n, "link", "set", link.node_if, "up")
            sh(*n, "link", "set", "lo", "up")
            sh(*n, "route", "add", "default", "via", host_addr)
        except BaseException:
            link.close()
            raise
        return link

    def close(self) -> None:
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.netns, check=False)


@dataclass
class Plc:
    """`plc init` + `plc serve` listening on a host address the nodes reach."""

    workdir: Path
    listen: str
    port: int
    prefix: str
    admin_email: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def db(self) -> Path:
        return self.workdir / "plc.db"

    @property
    def url(self) -> str:
        return f"http://{self.listen}:{self.port}/PLCAPI/"

    @property
    def admin_auth(self) -> dict[str, Any]:
        return {"AuthMethod": "password", "Username": self.admin_email,
                "AuthString": ADMIN_PASSWORD}

    def proxy(self) -> Any:
        return xmlrpc.client.ServerProxy(self.url, allow_none=True)

    def log_text(self) -> str:
        try:
            return (self.workdir / "serve.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def node_key(self, hostname: str) -> str:
        return sh(PLC, "node-key", "--db", str(self.db), hostname, timeout=60).stdout.strip()

    @classmethod
    def start(cls, workdir: Path, listen: str) -> Plc:
        import socket

        with socket.socket() as s:
            s.bind((listen, 0))
            port = int(s.getsockname()[1])
        pid = os.getpid()
        srv = cls(workdir, listen, port, f"e{pid % 100000}", f"admin{pid}@e2e.test")
        sh(PLC, "init", "--db", str(srv.db), "--admin-email", srv.admin_email,
           "--admin-password", ADMIN_PASSWORD, "--slice-prefix", srv.prefix, timeout=120)
        with open(workdir / "serve.log", "wb") as log:
            srv.proc = subprocess.Popen([PLC, "serve", "--db", str(srv.db), "--listen",
                                         f"{listen}:{port}"], stdout=log,
                                        stderr=subprocess.STDOUT, cwd=workdir)
        try:
            deadline = time.monotonic() + 30
            while True:
                if srv.proc.poll() is not None:
                    raise RuntimeError(f"plc serve exited: {srv.log_text()}")
                try:
                    srv.proxy().system.listMethods()
                    return srv
                except (OSError, xmlrpc.client.ProtocolError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"plc serve not ready: {srv.log_text()}") from None
                    time.sleep(0.1)
        except BaseException:
            srv.stop()
            raise

    def restart(self) -> None:
        """Stop `plc serve` and start it again on the same database and port."""
        self.stop()
        with open(self.workdir / "serve.log", "ab") as log:
            self.proc = subprocess.Popen([PLC, "serve", "--db", str(self.db), "--listen",
                                          f"{self.listen}:{self.port}"], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"plc serve exited: {self.log_text()}")
            try:
                self.proxy().system.listMethods()
                return
            except (OSError, xmlrpc.client.ProtocolError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"plc serve not ready: {self.log_text()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup hierarchy the contexts use (v1 ones and cgroup2)."""
    from kernel.cgroups import detect_layout

    layout = detect_layout()
    out = sorted(set(layout.v1.values()))
    if layout.v2 is not None:
        out.append(layout.v2)
    return out


@dataclass
class AgentNode:
    """One node: its link, base dir, agent.toml, holder namespace and agent process."""

    index: int
    link: Link
    hostname: str
    base: Path
    cg_sub: str
    holder: subprocess.Popen[bytes] | None = None
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cg_made: list[Path] = field(default_factory=list)

    @property
    def cfg_path(self) -> Path:
        return self.base / "agent.toml"

    @property
    def contexts_dir(self) -> Path:
        return self.base / "run" / "contexts"

    @property
    def socket_path(self) -> Path:
        return self.base / "agent.sock"

    @classmethod
    def create(cls, index: int, link: Link, plc: Plc, hostname: str,
               tables: str = "") -> AgentNode:
        """`tables`: TOML tables merged into the node's agent.toml ([bandwidth], ...)."""
        from agent import config
        from kernel.images import ImageStore
        from tests.kernel.busybox_image import make_busybox_tree

        pid = os.getpid()
        base = Path(tempfile.mkdtemp(prefix=f"e2e-node{index}-{pid}-", dir="/tmp"))
        os.chmod(base, 0o755)
        node = cls(index, link, hostname, base, f"e2e-{pid}-n{index}")
        try:
            key_file = base / "node.key"
            key_file.write_text(plc.node_key(hostname) + "\n")
            config.write_default(node.cfg_path, {
                "plc_url": plc.url, "hostname": hostname, "key_file": str(key_file),
                # PLC over plain http across the test veth: accepted explicitly (F30)
                "insecure_plc": 1,
                "state_dir": str(base / "state"), "run_dir": str(base / "run"),
                "socket_path": str(node.socket_path), "default_image": "bb",
                "poll_interval": 1, "poll_jitter": 0, "backoff_max": 2, "plc_timeout": 10,
                "node_accounts": "", "host_accounts": 0, "slice_prefix": plc.prefix,
                "addresses": link.node_addr,   # the guard's port table
                # disjoint uid pools: 4 ranges per node, per test process
                "uid_pool_start": 1_600_000_000 + ((pid % 500) * 4 + index) * 4 * 65536,
                "uid_pool_ranges": 4,
            })
            if tables:   # merged into the tables init-config renders
                data = tomllib.loads(node.cfg_path.read_text())
                for name, table in tomllib.loads(tables).items():
                    data[name] = {**data.get(name, {}), **table}
                node.cfg_path.write_text(tomli_w.dumps(data))
            ImageStore(base / "state" / "images").import_dir("bb",
                                                              make_busybox_tree(base / "src"))
            node._start_holder()
        except BaseException:
            node.close()
            raise
        return node

    def _start_holder(self) -> None:
        binds = []
        for mnt in cgroup_mounts():
            sub = mnt / self.cg_sub
            sub.mkdir()
            self.cg_made.append(sub)
            if (mnt / "cpuset.cpus").exists():   # a v1 cpuset group starts empty
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (sub / f).write_text((mnt / f).read_text())
            binds.append(f"mount --bind {sub} {mnt}")
        script = "set -e; " + "; ".join(binds) + "; echo ready; exec sleep 100000"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        if line.strip() != b"ready":
            err = self.holder.stderr.read().decode() if self.holder.stderr else ""
            raise RuntimeError(f"node {self.index}: namespace holder failed: {err}")

    def ns_argv(self, *argv: str) -> list[str]:
        assert self.holder is not None
        return ["nsenter", f"--target={self.holder.pid}", "--mount",
                f"--net=/run/netns/{self.link.netns}", "--", *argv]

    def agent_argv(self, *args: str) -> list[str]:
        return self.ns_argv(sys.executable, "-c", AGENT_MAIN, "--config", str(self.cfg_path),
                            *args)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.agent_argv(*args), capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def start_agent(self) -> subprocess.Popen[bytes]:
        with open(self.base / "agent.log", "ab") as log:
            proc = subprocess.Popen(self.agent_argv("run"), stdout=log,
                                    stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        self.agents.append(proc)
        return proc

    def log_text(self) -> str:
        try:
            return (self.base / "agent.log").read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop_agents(self) -> None:
        for proc in self.agents:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def close(self) -> None:
        """Kill agents, destroy slivers (CLI, then a sweep in the node's namespace),
        end the namespace, remove the cgroup subgroups and the base dir."""
        errors: list[str] = []
        self.stop_agents()
        if self.holder is not None and self.holder.poll() is None:
            from kernel.context import Context

            for name in Context.list(self.contexts_dir):
                out = self.cli("sliver", "destroy", name)
                if out.returncode != 0:
                    errors.append(f"sliver destroy {name}: {out.stderr.strip()}")
            sweep = subprocess.run(self.ns_argv(sys.executable, "-m", "tests.e2e.nodeclean",
                                                str(self.base)),
                                   capture_output=True, text=True, timeout=120, cwd=REPO,
                                   env={**os.environ, "PYTHONPATH": str(REPO)})
            if sweep.returncode != 0:
                errors.append(f"sweep: {sweep.stderr.strip()}")
        if self.holder is not None:
            if self.holder.poll() is None:
                os.killpg(self.holder.pid, signal.SIGKILL)
            self.holder.wait(10)
            for f in (self.holder.stdout, self.holder.stderr):
                if f is not None:
                    f.close()
        for sub in reversed(self.cg_made):
            errors += remove_cgroup_tree(sub)
        shutil.rmtree(self.base, ignore_errors=True)
        if errors:
            raise RuntimeError(f"node {self.index} cleanup: " + "; ".join(errors))


def remove_cgroup_tree(top: Path) -> list[str]:
    """rmdir a cgroup subtree bottom-up (processes must be gone); what failed."""
    failed: list[str] = []
    if not top.exists():
        return failed
    dirs = [Path(d) for d, _, _ in os.walk(top)]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        for _ in range(50):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:   # EBUSY while the last task exits
                time.sleep(0.1)
        else:
            failed.append(f"cgroup {d} not removable")
    return failed
