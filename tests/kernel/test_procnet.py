"""F38: no path under a sliver's /proc shows the node's sockets or another sliver's.

A sliver has a network namespace of its own, so /proc/net, /proc/self/net,
/proc/<pid>/net, /proc/thread-self/net and /proc/<pid>/task/<tid>/net all show that
namespace's tables; its IP and netlink sockets are made by its sockd in the node's
namespace (kernel/native/sockd.h), so they still reach the node and carry the caller's
uid. Run against real contexts on this kernel (nothing here may skip)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.context import Context, _proc_starttime_any
from tests.kernel.test_context_support import Slivers

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]

TABLES = ("tcp", "tcp6", "udp", "udp6", "udplite", "udplite6", "raw", "raw6", "icmp",
          "icmp6", "unix", "packet", "netlink")
PREFIXES = ("/proc/net", "/proc/self/net", "/proc/1/net", "/proc/thread-self/net",
            "/proc/1/task/1/net", "/proc/$$/net", "/proc/$$/task/$$/net")


@pytest.fixture(scope="module")
def node() -> Iterator[Slivers]:
    sl = Slivers()
    try:
        yield sl
    finally:
        sl.close()


def sh(ctx: Context, cmd: str, user: str = "root") -> str:
    rc, out, err = ctx.output(["sh", "-c", cmd], user=user)
    assert rc == 0, (cmd, rc, out, err)
    return out.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_tcp_uid(port: int) -> set[int]:
    """uids of the node's listening TCP sockets on `port` (the host's view)."""
    uids = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            f = line.split()
            if f[1].endswith(f":{port:04X}") and f[3] == "0A":
                uids.add(int(f[7]))
    return uids


def wait_listening(port: int, timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        uids = host_tcp_uid(port)
        if uids:
            return uids
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def test_no_path_under_proc_shows_node_or_other_sliver_sockets(node: Slivers,
                                                              tmp_path: Path) -> None:
    a, b = node.create(), node.create()
    tag = f"procnet{os.getpid()}"
    # The node's sockets: TCP v4 and v6 listeners, UDP, a Unix path and an abstract name.
    tcp4 = socket.create_server(("127.0.0.1", 0))
    tcp6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    upath = socket.socket(socket.AF_UNIX)
    upath.bind(str(tmp_path / f"{tag}.sock"))
    uabs = socket.socket(socket.AF_UNIX)
    uabs.bind(f"\0{tag}-abstract")
    # Another sliver's listener, in the node's namespace (the host sees it).
    a_port = free_port()
    sh(a, f"(nc -l -p {a_port} </dev/null >/dev/null 2>&1 &)")
    wait_listening(a_port)
    ports = {tcp4.getsockname()[1], tcp6.getsockname()[1], udp.getsockname()[1], a_port}
    try:
        paths = " ".join(f"{p}/{t}" for p in PREFIXES for t in TABLES)
        got = sh(b, f"for f in {paths}; do echo \"== $f\"; cat $f; done 2>&1")
        assert got.count("== ") == len(PREFIXES) * len(TABLES)
        assert "No such file" not in got and "Permission denied" not in got, got[:2000]
        for port in ports:
            assert f":{port:04X} " not in got, (port, got[:2000])
        assert tag not in got
        # the node's own files show the same sockets, for contrast
        assert f":{a_port:04X} " in Path("/proc/net/tcp").read_text() + \
            Path("/proc/net/tcp6").read_text()
        assert tag in Path("/proc/net/unix").read_text()
        # the sliver's process list knows no process of the node (nor its sockd)
        pids = sh(b, "ls /proc | grep -E '^[0-9]+$'").split()
        assert len(pids) <= 4, pids
        assert "sliver-sockd" not in sh(b, "cat /proc/[0-9]*/comm")
    finally:
        for s in (tcp4, tcp6, udp, upath, uabs):
            s.close()


def test_sockets_live_in_the_node_with_the_callers_uid(node: Slivers) -> None:
    ctx = node.create()
    # out: a sliver reaches a node listener
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def answer() -> None:
        conn, _ = srv.accept()
        conn.recv(4096)   # the request first: closing with it unread is a reset
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nfrom-the-node\n")
        conn.close()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        assert "from-the-node" in sh(ctx, f"wget -q -O- http://127.0.0.1:{port}/")
    finally:
        t.join(5)
        srv.close()
    # in: the node reaches a sliver's listener; the socket carries the uid of the
    # sliver's user that made it (root of the sliver: its base uid; `user`: base+1000)
    for user, uid in (("root", ctx.uid_base), ("user", ctx.uid_base + 1000)):
        p = free_port()
        sh(ctx, f"(echo hello-{user} | nc -l -p {p} >/dev/null 2>&1 &)", user=user)
        assert wait_listening(p) == {uid}
        with socket.create_connection(("127.0.0.1", p), timeout=5) as c:
            assert c.recv(100) == f"hello-{user}\n".encode()
    # netlink (NETLINK_ROUTE) sees the node's interfaces, as before
    assert "127.0.0.1" in sh(ctx, "ip addr show lo")


def test_sockd_is_outside_the_sliver_and_goes_with_it(node: Slivers) -> None:
    ctx = node.create()
    pid, start = ctx.state["sockd_pid"], ctx.state["sockd_start"]
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "sliver-sockd"
    status = Path(f"/proc/{pid}/status").read_text()
    assert f"Uid:\t{ctx.uid_base}\t" in status
    # effective capabilities: CAP_SETGID and CAP_SETUID (of the sliver's userns) only
    eff = next(ln for ln in status.splitlines() if ln.startswith("CapEff:")).split()[1]
    assert int(eff, 16) == (1 << 6) | (1 << 7)
    assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    assert os.readlink(f"/proc/{pid}/ns/user") == os.readlink(f"/proc/{ctx.init_pid}/ns/user")
    cg = Path(f"/proc/{pid}/cgroup").read_text()
    assert ctx.name in cg
    # many sockets in a row (each a notification answered by sockd)
    sh(ctx, "i=0; while [ $i -lt 50 ]; do ip addr show lo >/dev/null || exit 1; "
            "i=$((i+1)); done")
    ctx.destroy()
    assert _proc_starttime_any(pid) != start   # gone, and reaped (no zombie left)
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                         text=True).stdout
    assert "Z" not in out


@pytest.mark.parametrize("lowest_free", [62, 63, 64, 65, 66])
def test_sockd_starts_whatever_fd_numbers_the_launcher_inherits(node: Slivers,
                                                                lowest_free: int) -> None:
    """The launcher keeps the fd numbers of its caller's fds (the sync socket, the
    guard filter pipe), which are high in a busy caller (many threads creating at
    once). sockd once needed fds 64 and 65 to be free and left silently otherwise,
    so the init failed with "send sockd its listener: Broken pipe". Here every fd
    below `lowest_free` is taken, so create()'s own fds land around 64."""
    held: list[int] = []
    try:
        while True:
            fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            if fd >= lowest_free:
                os.close(fd)
                break
            held.append(fd)
        ctx = node.create()
    finally:
        for fd in held:
            os.close(fd)
    try:
        assert Path(f"/proc/{ctx.state['sockd_pid']}/comm").read_text().strip() == \
            "sliver-sockd"
        sh(ctx, "ip addr show lo >/dev/null")
    finally:
        ctx.destroy()
