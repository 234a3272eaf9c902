"""A node for agent end-to-end tests: state and run dirs, a busybox image, a config,
and a cleanup that removes every context, mount, cgroup and layer the agent made.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "plc"))

from plc_live import LiveServer, remove_workdir, start_server  # noqa: E402

from agent import config  # noqa: E402
from tests.kernel.busybox_image import make_busybox_tree  # noqa: E402

__all__ = ["LiveServer", "Node", "Site", "make_node", "plc_server", "remove_workdir",
           "start_server"]

PID = os.getpid()
_counter = iter(range(1, 10**6))


@dataclass
class Node:
    base: Path
    cfg_path: Path
    cfg: config.AgentConfig

    @property
    def state_dir(self) -> Path:
        return Path(self.cfg.state_dir)

    @property
    def contexts_dir(self) -> Path:
        return Path(self.cfg.run_dir) / "contexts"

    @property
    def roots_dir(self) -> Path:
        return self.state_dir / "roots"

    def agent_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-c", "import sys; from agent.cli import main; "
                "sys.exit(main())", "--config", str(self.cfg_path), *args]

    def start_agent(self) -> subprocess.Popen[bytes]:
        log = open(self.base / "agent.log", "ab")
        try:
            return subprocess.Popen(self.agent_argv("run"), stdout=log, stderr=subprocess.STDOUT,
                                    cwd=REPO, start_new_session=True)
        finally:
            log.close()

    def run_once(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.agent_argv("run", "--once"), capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def log_text(self) -> str:
        try:
            return (self.base / "agent.log").read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def api_answers(self) -> bool:
        """Whether the agent socket takes a connection. After a kill -9 the old socket
        file stays until the new agent, which adopts its slivers first, serves again."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.cfg.socket_path))
            except OSError:
                return False
        return True

    def wait_api(self, timeout: float = 60) -> None:
        wait_for(self.api_answers, timeout, "the agent socket", self.log_text)


def free_tcp_port() -> int:
    """A TCP port free on loopback now (the kernel's pick), for a node's sensor server:
    agents of parallel tests must not all take the default 3100."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_node(plc: LiveServer | None, hostname: str, **extra: Any) -> Node:
    base = Path(tempfile.mkdtemp(prefix=f"agent-node-{os.getpid()}-", dir="/tmp"))
    os.chmod(base, 0o755)
    key_file = base / "node.key"
    if plc is not None:
        key_file.write_text(plc.node_key(hostname) + "\n")
    else:
        key_file.write_text("no-plc-key\n")
    values: dict[str, Any] = {
        "plc_url": plc.url if plc else "http://127.0.0.1:9/PLCAPI/", "hostname": hostname,
        "key_file": str(key_file), "state_dir": str(base / "state"),
        "run_dir": str(base / "run"), "socket_path": str(base / "agent.sock"),
        "default_image": "bb", "poll_interval": 2, "poll_jitter": 1, "backoff_max": 2,
        "node_accounts": "", "plc_timeout": 10, "host_accounts": 0,
        "sensors": {"listen": f"127.0.0.1:{free_tcp_port()}"},
    }
    values.update(extra)
    cfg_path = config.write_default(base / "agent.toml", values)
    cfg = config.load(cfg_path)
    from kernel.images import ImageStore

    ImageStore(base / "state" / "images").import_dir("bb", make_busybox_tree(base / "src"))
    return Node(base, cfg_path, cfg)


def cleanup_node(node: Node, agents: list[subprocess.Popen[bytes]] = ()) -> None:  # type: ignore[assignment]
    """Stop agents, destroy contexts, unmount, release roots and the layer store."""
    from kernel import disk
    from kernel import mount as m
    from kernel.context import Context
    from kernel.rootfs import list_roots, release_root

    for proc in agents:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for name in Context.list(node.contexts_dir):
        try:
            Context.adopt(node.contexts_dir, name).destroy()
        except (ProcessLookupError, FileNotFoundError):
            Context.destroy_stale(node.contexts_dir, name)
    if node.roots_dir.exists():
        for info in sorted(m.mounts_under(node.roots_dir), key=lambda i: len(str(i.mount_point)),
                           reverse=True):
            if str(info.mount_point).startswith(str(node.roots_dir) + "/") and \
                    "/run/planetlab" in str(info.mount_point):
                m.umount(info.mount_point, detach=True)
        for name in list_roots(node.roots_dir):
            release_root(node.roots_dir, name)
        disk.unmount_store(node.roots_dir, remove=True)
    shutil.rmtree(node.base, ignore_errors=True)


@contextmanager
def plc_server(tmp: Path) -> Iterator[LiveServer]:
    srv = start_server(tmp)
    try:
        yield srv
    finally:
        srv.stop()
        remove_workdir(tmp)


def wait_for(pred: Any, timeout: float, what: str, log: Any = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log()}")
        time.sleep(0.2)


class Site:
    """A site with a PI, a node, and helpers to make slices bound to that node."""

    def __init__(self, plc: LiveServer) -> None:
        self.api = plc.proxy()
        self.admin = plc.admin_auth
        n = next(_counter)
        self.login_base = f"ag{PID % 100000}x{n}"
        self.site_id = self.api.AddSite(self.admin, {
            "name": f"Agent test site {n}", "abbreviated_name": f"ats{n}",
            "login_base": self.login_base, "max_slices": 100, "max_slivers": 1000,
            "enabled": True, "is_public": False})
        self.hostname = f"node{n}-{PID}.agent.test"
        self.node_id = self.api.AddNode(self.admin, self.site_id, {"hostname": self.hostname})
        self.person_id = self.api.AddPerson(self.admin, {
            "first_name": "A", "last_name": "User", "email": f"u{n}.{PID}@agent.test",
            "password": "pw-agent-test"})
        self.api.UpdatePerson(self.admin, self.person_id, {"enabled": True})
        self.api.AddPersonToSite(self.admin, self.person_id, self.site_id)
        self.api.AddRoleToPerson(self.admin, "user", self.person_id)
        blob = b"\x00\x00\x00\x07ssh-rsa" + random.Random(PID * 1000 + n).randbytes(300)
        self.key = "ssh-rsa " + base64.b64encode(blob).decode() + f" u{n}@agent"
        self.api.AddPersonKey(self.admin, self.person_id, {"key_type": "ssh", "key": self.key})

    def add_slice(self, suffix: str, **tags: str) -> str:
        name = f"{self.login_base}_{suffix}"
        self.api.AddSlice(self.admin, {"name": name, "url": "http://agent.test/",
                                       "description": "agent test", "instantiation":
                                       "plc-instantiated"})
        self.api.AddPersonToSlice(self.admin, self.person_id, name)
        for tag, value in tags.items():
            self.api.AddSliceTag(self.admin, name, tag, value)
        self.api.AddSliceToNodes(self.admin, name, [self.node_id])
        return name

    def set_tag(self, name: str, tag: str, value: str) -> None:
        tags = self.api.GetSliceTags(self.admin, {"name": name, "tagname": tag})
        if tags:
            self.api.UpdateSliceTag(self.admin, tags[0]["slice_tag_id"], value)
        else:
            self.api.AddSliceTag(self.admin, name, tag, value)


def with_bandwidth(node: Node, ifname: str) -> Node:
    """agent.toml gets a [bandwidth] table naming the veth."""
    data = tomllib.loads(node.cfg_path.read_text())   # (init-config renders the table)
    data["bandwidth"] = {**data.get("bandwidth", {}), "interfaces": [ifname], "sample_s": 1}
    node.cfg_path.write_text(tomli_w.dumps(data))
    node.cfg = config.load(node.cfg_path)
    assert node.cfg.bandwidth.interfaces == (ifname,)
    return node
