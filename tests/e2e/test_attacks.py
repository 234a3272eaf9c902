"""An attacker inside a sliver against the fence, on the real kernel.

Real processes in real slivers: two guarded contexts A and B (kernel.context over
kernel/rootfs roots of one shared busybox image, the seccomp guard installed by the
init, the agent's `Guard` supervising them in a thread), and for the agent socket a
real `planetlab-agent run` against a real `plc serve` with slivers it made. The
attacks are one static C program (tests/e2e/attacker.c) copied into the slivers.
Every check here is one that holds; the holes found are in docs/dev/findings-security.md.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from kernel.context import Context, GuardSpec, Limits

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

PID = os.getpid()
REPO = Path(__file__).resolve().parents[2]
SRC = Path(__file__).with_name("attacker.c")


@pytest.fixture(scope="module")
def attacker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"attacker{PID}") / "attacker"
    subprocess.run(["gcc", "-static", "-O2", "-pthread", "-o", str(out), str(SRC)],
                   check=True, timeout=120, capture_output=True)
    return out


@contextlib.contextmanager
def subreaper_restored() -> Iterator[None]:
    """slivers() makes this process a child subreaper; put the flag back afterwards, or
    orphans of later tests in the same run stay this process's zombies."""
    import prctl

    was = prctl.get_child_subreaper()
    try:
        yield
    finally:
        prctl.set_child_subreaper(was)


def install(root: Path, binary: Path) -> None:
    dest = root / "bin" / "attacker"
    shutil.copyfile(binary, dest)
    os.chmod(dest, 0o755)


def run(ctx: Context, *argv: str, user: str = "root", timeout: float = 60) -> list[str]:
    rc, out, err = ctx.output(["/bin/attacker", *argv], user=user, timeout=timeout)
    assert rc == 0, (argv, rc, out, err)
    return out.decode().split()


def sh(ctx: Context, cmd: str, user: str = "root") -> tuple[int, str]:
    rc, out, err = ctx.output(["sh", "-c", cmd], user=user, timeout=60)
    return rc, (out + err).decode()


# -- guarded slivers ------------------------------------------------------------------


class GuardThread:
    """The agent's Guard supervising listeners in its own trio loop, in a thread (so
    that module-scoped slivers stay guarded across tests)."""

    def __init__(self, guard: Any) -> None:
        self.guard = guard
        self.token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.ready.set()
                await trio.sleep_forever()
        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc
            self.ready.set()

    def start(self) -> None:
        self.thread.start()
        self.ready.wait(10)

    def supervise(self, name: str, listener: int) -> None:
        async def go() -> None:
            assert self.nursery is not None
            await self.nursery.start(self.guard.supervise, name, listener)
        trio.from_thread.run(go, trio_token=self.token)

    def stop(self) -> None:
        if self.token is not None and self.thread.is_alive():
            def cancel() -> None:
                assert self.nursery is not None
                self.nursery.cancel_scope.cancel()
            trio.from_thread.run_sync(cancel, trio_token=self.token)
        self.thread.join(10)


@dataclass
class Fence:
    a: Context
    b: Context
    port_a: int        # owned by A on every address
    port_free: int     # owned by nobody
    marker: Path       # a host file no sliver may read
    guard: Any


_HANDED_OUT: set[int] = set()   # ports given to a test of this module already


def free_port(start: int) -> int:
    """A port from `start` on that nobody has bound and no earlier test of this module
    was given (the tests share one agent, whose ledger keeps the ports it gave)."""
    for port in range(start, start + 2000):
        if port in _HANDED_OUT:
            continue
        try:
            with socket.socket() as s:
                s.bind(("0.0.0.0", port))
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::", port))
            _HANDED_OUT.add(port)
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


@pytest.fixture(scope="module")
def fence(attacker: Path) -> Iterator[Fence]:
    from agent.guard import Guard, PortService, recv_guard_fds
    from agent.ports import PortTable, read_ephemeral_range
    from kernel.seccomp import guard_filter
    from tests.kernel.test_context_support import slivers

    marker = Path(f"/tmp/e2e-secret-{PID}")
    marker.write_text("host secret\n")
    gt: GuardThread | None = None
    try:
        with subreaper_restored(), slivers(images=True) as sl:
            guard = Guard(PortService(PortTable([], read_ephemeral_range())),
                          sl.tmp / "guard")
            gt = GuardThread(guard)
            gt.start()
            made = []
            for tag in ("a", "b"):
                agent_end, sink = socket.socketpair()
                try:
                    ctx = sl.create(sl.name(tag), limits=Limits(pids_max=200),
                                    guard=GuardSpec(filter=guard_filter(sockd=True),
                                                    listener_sink=sink.fileno()))
                    listener, chan = recv_guard_fds(agent_end)
                    assert chan is not None
                    guard.set_sockd(ctx.name, chan)
                finally:
                    agent_end.close()
                    sink.close()
                gt.supervise(ctx.name, listener)
                install(ctx.root, attacker)
                made.append(ctx)
            port_a = free_port(21000 + PID % 4000)
            port_free = free_port(port_a + 1)
            guard.ports.reserve(made[0].name, f"tcp:{port_a}")
            yield Fence(made[0], made[1], port_a, port_free, marker, guard)
            gt.stop()
    finally:
        if gt is not None:
            gt.stop()
        marker.unlink(missing_ok=True)


# -- escaping the root ----------------------------------------------------------------


def test_host_files_unreachable_by_paths_symlinks_and_proc(fence: Fence) -> None:
    a = fence.a
    m = str(fence.marker)
    rc, out = sh(a, "ln -s / /tmp/up && ln -s /proc/1/root /tmp/initroot && "
                 "ln -s ../../../../../.. /tmp/dots && echo ok")
    assert rc == 0, out
    assert run(a, "read", "/tmp/up/etc/passwd") == ["read", "0"]   # the probe reads
    for path in (m, f"/proc/1/root{m}", f"/proc/self/root/../../..{m}", f"/tmp/up{m}",
                 f"/tmp/initroot{m}", f"/tmp/dots{m}", f"/proc/1/cwd/../..{m}"):
        # ENOENT (not in the sliver's tree) or EACCES (the init's /proc links)
        assert run(a, "read", path)[1] in (str(errno.ENOENT), str(errno.EACCES)), path
    # B's files (its COW layer on the host) are not A's either.
    (fence.b.root / "tmp" / "bfile").write_text("b only\n")
    assert run(a, "read", "/tmp/bfile") == ["read", str(errno.ENOENT)]
    assert run(a, "read", f"/proc/1/root{fence.b.root}/tmp/bfile")[1] in \
        (str(errno.ENOENT), str(errno.EACCES))


def test_open_by_handle_and_chroot_tricks_stay_inside(fence: Fence) -> None:
    a = fence.a
    out = run(a, "handle", "/etc/passwd")
    assert out[0] == "handle" and out[2] == str(errno.EPERM), out   # no CAP_DAC_READ_SEARCH
    out = run(a, "chroot", str(fence.marker))
    assert out[0] == "chroot" and out[2] == str(errno.ENOENT), out
    assert out[1] != "0" or out[3] == "1", out   # at most back to the sliver's own root


def test_no_devices_no_host_sysctls_no_cgroup_writes(fence: Fence) -> None:
    a = fence.a
    assert run(a, "mknod", "/tmp/sda") == ["mknod", str(errno.EPERM)]
    rc, _ = sh(a, "echo 1 > /proc/sys/net/ipv4/ip_forward")
    assert rc != 0
    rc, _ = sh(a, "echo 1 > /proc/sys/kernel/panic_on_oops")
    assert rc != 0
    # No cgroup filesystem to raise its own limits with: none mounted, none mountable.
    rc, out = sh(a, "mkdir -p /tmp/cg && ! test -e /sys/fs/cgroup/memory && "
                    "! mount -t cgroup -o memory none /tmp/cg && "
                    "! mount -t cgroup2 none /tmp/cg && echo refused")
    assert rc == 0 and "refused" in out, out


# -- seeing the host and the other slivers ---------------------------------------------


def test_kill_all_and_ptrace_reach_only_own_sliver(fence: Fence) -> None:
    a, b = fence.a, fence.b
    from kernel.context import DEVNULL

    host = subprocess.Popen(["sleep", "60"])
    victim = b.spawn(["sleep", "60"], stdout=DEVNULL, stderr=DEVNULL)
    own = a.spawn(["sleep", "60"], stdout=DEVNULL, stderr=DEVNULL)
    try:
        assert run(a, "ptrace", "1")[1] in (str(errno.EPERM),)
        assert run(a, "ptrace", str(host.pid))[1] in (str(errno.ESRCH), str(errno.EPERM))
        assert run(a, "killall") == ["killall", "0"]
        time.sleep(0.3)
        assert host.poll() is None, "a host process died of A's kill(-1)"
        assert victim.returncode is None and b.alive()
        rc, out = sh(b, "pidof sleep")
        assert rc == 0 and out.strip(), "B's process died of A's kill(-1)"
        assert own.wait(10) == -signal.SIGKILL   # A's own process did die
        assert a.alive()   # its init survives its own kill(-1)
    finally:
        own.kill()
        own.wait(10)
        host.kill()
        host.wait()
        victim.kill()
        victim.wait(10)


def test_host_sysv_ipc_invisible(fence: Fence) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x0E2E0000 + PID % 0xFFFF
    shmid = libc.shmget(key, 4096, 0o1600)   # IPC_CREAT | 0600
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    try:
        assert run(fence.a, "shm", hex(key)) == ["shm", str(errno.ENOENT)]
    finally:
        libc.shmctl(shmid, 0, None)   # IPC_RMID


def test_abstract_unix_sockets_of_host_and_other_sliver_unreachable(fence: Fence) -> None:
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.bind(f"\0e2e-host-{PID}")
    host.listen(4)
    from kernel.context import PIPE

    b_name = f"pl/{fence.b.name}/e2e-b"   # B's own prefix (F35)
    listener = fence.b.spawn(["/bin/attacker", "alisten", b_name, "30"], stdout=PIPE,
                             stderr=PIPE)
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().split() == [b"alisten", b"0"]
        out = run(fence.a, "abstract", f"e2e-host-{PID}")
        assert out[1] != "0", "A connected to the host's abstract socket"
        out = run(fence.a, "abstract", b_name)
        assert out[1] != "0", "A connected to B's abstract socket"
        # B's listener is there: B itself reaches it; the host does not find it
        # (abstract names are per sliver network namespace, F38).
        assert run(fence.b, "abstract", b_name) == ["abstract", "0"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c, \
                pytest.raises(ConnectionRefusedError):
            c.connect(f"\0{b_name}")
    finally:
        host.close()
        listener.kill()
        listener.wait(10)


def test_host_service_abstract_names_cannot_be_squatted(fence: Fence) -> None:
    """F35: a sliver binding a host service's abstract name (X11's) would receive the
    host's clients (and their cookies): refused with EPERM, as root and as a user;
    the host's service then binds it."""
    x11 = f"/tmp/.X11-unix/X{PID % 1000 + 100}"
    for who in (fence.a, fence.b):
        for user in ("root", "user"):
            out = run(who, "alisten", x11, "0", user=user)
            assert out == ["alisten", str(errno.EPERM)], (who.name, user, out)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
        host.bind(f"\0{x11}")


# -- the guard --------------------------------------------------------------------------

AF_INET, AF_INET6, AF_PACKET = 2, 10, 17
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_PACKET = 1, 2, 3, 10
SOCK_CLOEXEC, SOCK_NONBLOCK = 0o2000000, 0o4000


def test_other_architectures_raw_packet_sctp_io_uring_refused(fence: Fence) -> None:
    a = fence.a
    out = run(a, "x32")
    assert out == ["x32", str(-errno.EPERM), "i386", str(-errno.ENOSYS)], out
    for fam, typ, proto in ((AF_PACKET, SOCK_RAW, 0x0300), (AF_PACKET, SOCK_DGRAM, 0x0300),
                            (AF_INET, SOCK_RAW, 1), (AF_INET, SOCK_RAW | SOCK_CLOEXEC, 255),
                            (AF_INET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 6),
                            (AF_INET6, SOCK_RAW, 58), (AF_INET, SOCK_PACKET, 0x0300),
                            (AF_INET, SOCK_STREAM, 132), (AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC,
                                                          132)):
        for user in ("root", "user"):
            out = run(a, "socket", str(fam), str(typ), str(proto), user=user)
            assert out[1] != "0", (fam, typ, proto, user, out)
    assert run(a, "uring") == ["uring", str(errno.EPERM)]


def test_binding_others_ports_by_any_address_form(fence: Fence) -> None:
    a, b, p = fence.a, fence.b, fence.port_a
    # B, on A's port, whatever the address spelling: taken (by A) or not a node address.
    for addr, extra in (("127.0.0.1", ()), ("0.0.0.0", ()), ("::", ()), ("::", ("v6only0",)),
                        ("::1", ()), ("::ffff:127.0.0.1", ()), ("127.0.0.2", ()),
                        ("::ffff:7f00:2", ()), ("0:0:0:0:0:ffff:7f00:1", ())):
        out = run(b, "bind", addr, str(p), *extra, user="user")
        assert out == ["bind", str(errno.EADDRINUSE), "0"], (addr, extra, out)
    # the IPv4-mapped wildcard is refused outright
    out = run(b, "bind", "::ffff:0.0.0.0", str(p), user="user")
    assert out[1] != "0", out
    # Nobody's port: refused to both; a foreign address is not the node's.
    for who in (a, b):
        assert run(who, "bind", "127.0.0.1", str(fence.port_free)) == \
            ["bind", str(errno.EACCES), "0"]
    assert run(b, "bind", "10.213.255.254", str(p)) == ["bind", str(errno.EADDRNOTAVAIL), "0"]
    # The owner binds (also as its unprivileged user, also the wildcards).
    for addr in ("127.0.0.1", "0.0.0.0", "::"):
        assert run(a, "bind", addr, str(p), user="user") == ["bind", "0", str(p)], addr
    # An ephemeral bind (port 0) is anyone's and lands in the ephemeral range.
    from agent.ports import read_ephemeral_range

    lo, hi = read_ephemeral_range()
    out = run(b, "bind", "127.0.0.1", "0")
    assert out[1] == "0" and lo <= int(out[2]) <= hi, out


def test_hostile_bind_arguments_get_errors_and_the_guard_keeps_serving(fence: Fence) -> None:
    out = run(fence.a, "badbinds", str(fence.port_a))
    assert out[0] == "badbinds" and "0" not in out[1:], out
    assert out[1] == str(errno.EBADF) and out[2] == str(errno.ENOTSOCK), out
    assert out[3] == out[4] == str(errno.EFAULT) and out[6] == str(errno.EINVAL), out
    assert run(fence.a, "bind", "127.0.0.1", str(fence.port_a)) == \
        ["bind", "0", str(fence.port_a)]
    assert run(fence.b, "bind", "127.0.0.1", str(fence.port_a)) == \
        ["bind", str(errno.EADDRINUSE), "0"]


def test_racing_thread_never_binds_unowned_port(fence: Fence) -> None:
    """A thread flips the sockaddr's port between A's and a free one while the main
    thread binds: every successful bind is on A's port, thousands of tries."""
    out = run(fence.a, "race", "127.0.0.1", str(fence.port_a), str(fence.port_free), "3000",
              timeout=90)
    n, ok, other, failed = (int(x) for x in out[1:])
    assert n == 3000 and other == 0, out
    assert ok > 0 and ok + failed == n, out


def test_bind_flood_from_one_sliver_does_not_starve_another(fence: Fence) -> None:
    from kernel.context import PIPE

    flood = fence.a.spawn(["/bin/attacker", "race", "127.0.0.1", str(fence.port_a),
                           str(fence.port_free), "20000"], stdout=PIPE, stderr=PIPE)
    try:
        time.sleep(0.3)
        worst = 0.0
        for _ in range(10):
            t0 = time.monotonic()
            assert run(fence.b, "bind", "127.0.0.1", str(fence.port_a)) == \
                ["bind", str(errno.EADDRINUSE), "0"]
            worst = max(worst, time.monotonic() - t0)
        assert worst < 5, f"B's bind took {worst:.2f}s during A's flood"
    finally:
        flood.kill()
        flood.wait(30)


# -- resource abuse ---------------------------------------------------------------------


def test_fork_bomb_and_disk_fill_stay_inside(attacker: Path) -> None:
    from kernel.context import UID_COUNT
    from tests.kernel.test_context_support import slivers, unique_uid_base

    with subreaper_restored(), slivers(images=True) as sl:
        name = sl.name("r")
        base = unique_uid_base()
        root = sl.root(name, base, disk_max_kib=8192)
        ctx = Context.create(sl.run_dir, name, root, base, UID_COUNT,
                             Limits(pids_max=48, mem_max=64 << 20))
        sl.contexts.append(ctx)
        install(root, attacker)
        # No btrfs subvolume (it would have a quota group of its own) from inside: the
        # overlay does not pass the ioctl down.
        assert run(ctx, "subvol", "/tmp", "escape") == ["subvol", str(errno.ENOTTY)]
        # Fork bomb: stops at pids_max; the host still forks.
        rc, out = sh(ctx, "bomb() { bomb | bomb & }; (bomb) 2>/dev/null; sleep 1; "
                          "ls /proc | grep -c '^[0-9]'")
        assert ctx.usage()["pids"] <= 48
        assert subprocess.run(["true"]).returncode == 0
        rc, out = sh(ctx, "kill -9 -1; echo done")
        # Disk fill: stops near disk_max, the host's free space is untouched beyond it.
        before = shutil.disk_usage("/").free
        rc, out = sh(ctx, "dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>&1; echo rc=$?")
        assert "rc=0" not in out and ("space" in out or "quota" in out.lower()), out
        from kernel.rootfs import disk_usage_kib

        assert disk_usage_kib(sl.roots_dir, name) <= 8192 + 1024
        assert before - shutil.disk_usage("/").free < 32 << 20
        # Many small files: metadata counts against the same limit.
        rc, out = sh(ctx, "rm -f /tmp/fill; mkdir /tmp/many && cd /tmp/many && "
                          "seq 1 60000 | sed s/^/f/ | xargs touch 2>/dev/null; "
                          "ls | wc -l")
        assert disk_usage_kib(sl.roots_dir, name) <= 8192 + 1024, out
        assert int(out.split()[-1]) < 60000, out   # the limit stopped it
        sh(ctx, "rm -rf /tmp/many")
        # Memory: a hog inside dies of the cgroup limit, not the host's OOM of others.
        rc, out = sh(ctx, "dd if=/dev/zero bs=256M count=1 of=/dev/null 2>&1; echo rc=$?")
        assert "rc=0" not in out, out
        # Kernel memory pinned in Unix socket buffers is charged to the sliver too.
        rc, out = sh(ctx, "ulimit -n 8192; /bin/attacker sockfill 2000 1; echo rc=$?")
        filled = int(out.split()[1]) if out.startswith("sockfill") else 0
        assert filled < 64 << 20, out
        assert ctx.usage()["mem_bytes"] <= 64 << 20
        assert ctx.alive()


# -- the agent socket, from slivers the agent made ------------------------------------

SOCK_IN_SLIVER = "/run/planetlab/agent.sock"


@dataclass
class AgentSide:
    node: Any
    agent: subprocess.Popen[bytes]
    a: Context
    b: Context
    share_a: int
    share_b: int
    api: Any
    auth: dict[str, Any]
    person_id: int
    key: str

    def admin(self, timeout: float = 10.0) -> Any:
        import xmlrpc.client

        from agent.sliceapi import UnixTransport
        return xmlrpc.client.ServerProxy("http://agent/", allow_none=True,
                                         transport=UnixTransport(str(self.node.cfg.socket_path),
                                                                 timeout))

    def give(self, ctx: Context, spec: str) -> str:
        """The node admin gives slice `ctx` the ports `spec` (an rcap acquired from the
        node's pool and bound to it): ReservePort grants only ports a slice is given."""
        api = self.admin()
        rcap = api.AcquireRcap({"ports": spec})
        assert api.BindRcap(ctx.name, rcap) == 1
        return str(rcap)

    def agent_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.agent.pid}/fd"))


def http(body: bytes) -> bytes:
    return (f"POST / HTTP/1.0\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


def rspec_of(response: bytes) -> dict[str, Any]:
    """The struct an XML-RPC HTTP response carries."""
    import xmlrpc.client

    (value,), _ = xmlrpc.client.loads(response.split(b"\r\n\r\n", 1)[1])
    assert isinstance(value, dict), value
    return value


def call_from(ctx: Context, request: bytes, timeout: float = 30) -> bytes:
    rc, out, err = ctx.output(["/bin/attacker", "call", SOCK_IN_SLIVER], input=request,
                              timeout=timeout)
    assert rc == 0, (rc, out, err)
    return out


@pytest.fixture(scope="module")
def agent_side(attacker: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentSide]:
    import json

    from tests.agent.agent_node import cleanup_node, make_node, plc_server, wait_for

    with plc_server(tmp_path_factory.mktemp(f"e2e-att-plc{PID}")) as plc:
        api, admin = plc.proxy(), plc.admin_auth
        login = f"att{PID % 100000}"
        site = api.AddSite(admin, {"name": f"Attack site {PID}", "abbreviated_name": "att",
                                   "login_base": login, "max_slices": 10,
                                   "max_slivers": 10, "enabled": True, "is_public": False})
        hostname = f"att{PID}.e2e.test"
        node_id = api.AddNode(admin, site, {"hostname": hostname})
        names = []
        for suffix, share in (("a", "3"), ("b", "5")):
            name = f"{login}_{suffix}"
            api.AddSlice(admin, {"name": name, "url": "http://e2e.test/",
                                 "description": "attack", "instantiation": "plc-instantiated"})
            api.AddSliceTag(admin, name, "cpu_share", share)
            api.AddSliceToNodes(admin, name, [node_id])
            names.append(name)
        import base64
        import random

        person_id = api.AddPerson(admin, {"first_name": "A", "last_name": "Ttacker",
                                          "email": f"att{PID}@e2e.test", "password": "pw-e2e"})
        api.UpdatePerson(admin, person_id, {"enabled": True})
        api.AddPersonToSite(admin, person_id, site)
        api.AddRoleToPerson(admin, "user", person_id)
        blob = b"\x00\x00\x00\x07ssh-rsa" + random.Random(PID).randbytes(300)
        key = "ssh-rsa " + base64.b64encode(blob).decode() + f" att{PID}@e2e"
        api.AddPersonKey(admin, person_id, {"key_type": "ssh", "key": key})
        node = make_node(plc, hostname, api_rate=5.0, api_burst=10)
        agents: list[subprocess.Popen[bytes]] = []
        try:
            agents.append(node.start_agent())
            wait_for(lambda: all((node.contexts_dir / n / "state.json").exists() for n in names)
                     and Path(node.cfg.socket_path).exists(), 60, "slivers and socket",
                     node.log_text)
            ctxs = []
            for n in names:
                wait_for(lambda n=n: Context.read_state(node.contexts_dir, n), 30, n)
                ctx = Context.adopt(node.contexts_dir, n)
                root = Path(json.loads((node.contexts_dir / n / "state.json").read_text())
                            ["root"])
                install(root, attacker)
                ctxs.append(ctx)
            yield AgentSide(node, agents[0], ctxs[0], ctxs[1], 3, 5, api, admin, person_id,
                            key)
        finally:
            cleanup_node(node, agents)


def test_forged_slice_name_gets_own_rspec(agent_side: AgentSide) -> None:
    import xmlrpc.client

    s = agent_side
    for forged in (s.b.name, "root", "", "../" + s.b.name):
        out = call_from(s.a, http(xmlrpc.client.dumps((forged,), "GetRSpec").encode()))
        rspec = rspec_of(out)
        assert rspec["cpu_share"] == s.share_a, (forged, rspec)


def test_junk_bytes_and_fds_leave_agent_serving_and_leak_nothing(agent_side: AgentSide) -> None:
    s = agent_side
    before = s.agent_fds()
    out = s.a.output(["/bin/attacker", "junkfds", SOCK_IN_SLIVER, "60"], timeout=60)
    assert out[0] == 0 and out[1].split()[0] == b"junkfds", out
    time.sleep(0.5)
    assert s.admin().GetRSpec(s.b.name)["cpu_share"] == s.share_b
    assert s.agent_fds() <= before + 8, (before, s.agent_fds())
    assert s.agent.poll() is None


def test_huge_and_malformed_requests_refused_quickly(agent_side: AgentSide) -> None:
    s = agent_side
    t0 = time.monotonic()
    out = call_from(s.a, b"POST / HTTP/1.0\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 4096)
    assert out.startswith(b"HTTP/1.0 413"), out[:100]
    out = call_from(s.a, b"POST / HTTP/1.0\r\nX-Junk: " + b"a" * 40000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 400"), out[:100]
    out = call_from(s.a, b"GET / HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 400"), out[:100]
    out = call_from(s.a, http(b"<?xml version='1.0'?><methodCall><methodName>GetRSpec"))
    assert b"<fault>" in out and b"Traceback" not in out, out[:300]
    # entity expansion ("billion laughs"): refused by the parser, no blow-up
    lol = (b"<?xml version='1.0'?><!DOCTYPE m [<!ENTITY a 'aaaaaaaaaa'>"
           + b"".join(b"<!ENTITY %c '%s'>" % (98 + i, (b"&%c;" % (97 + i)) * 10)
                      for i in range(8))
           + b"]><methodCall><methodName>GetRSpec</methodName><params><param><value>"
             b"<string>&i;</string></value></param></params></methodCall>")
    out = call_from(s.a, http(lol))
    assert b"HTTP/1.0 200" in out[:20], out[:200]
    assert time.monotonic() - t0 < 20
    assert s.admin().GetRSpec(s.a.name)["cpu_share"] == s.share_a


def test_rate_limit_is_per_slice(agent_side: AgentSide) -> None:
    import xmlrpc.client

    s = agent_side
    req = http(xmlrpc.client.dumps((), "GetRSpec").encode())
    _put(s.a, "/tmp/req", req)
    rc, out, err = s.a.output(["sh", "-c", "for i in $(seq 40); do /bin/attacker call "
                               f"{SOCK_IN_SLIVER} < /tmp/req; done"], timeout=60)
    assert rc == 0, err
    assert out.count(b"<fault>") >= 20, out.count(b"<fault>")   # burst 10, 5/s
    # B is not limited by A's spending.
    out = call_from(s.b, req)
    rspec = rspec_of(out)
    assert rspec["cpu_share"] == s.share_b


def _put(ctx: Context, path: str, data: bytes) -> None:
    rc, _, err = ctx.output(["sh", "-c", f"cat > {path}"], input=data, timeout=30)
    assert rc == 0, err



def test_other_protocols_and_freebind_do_not_bypass_ports(fence: Fence) -> None:
    """MPTCP, UDP-Lite and IP_FREEBIND sockets bind through the same guarded bind."""
    a, b, p, free = fence.a, fence.b, str(fence.port_a), str(fence.port_free)
    mptcp, udplite = "262", "136"
    out = run(b, "bindp", str(SOCK_STREAM), mptcp, "127.0.0.1", p)
    assert out == ["bind", str(errno.EADDRINUSE), "0"], out
    out = run(b, "bindp", str(SOCK_STREAM), mptcp, "127.0.0.1", free)
    assert out == ["bind", str(errno.EACCES), "0"], out
    assert run(a, "bindp", str(SOCK_STREAM), mptcp, "127.0.0.1", p) == ["bind", "0", p]
    out = run(b, "bindp", str(SOCK_DGRAM), udplite, "::1", free)
    assert out[0] == "socket" or out == ["bind", str(errno.EACCES), "0"], out
    out = run(b, "bindp", str(SOCK_STREAM), "0", "10.213.254.254", free, "freebind")
    assert out[1] in (str(errno.EADDRNOTAVAIL), str(errno.EACCES)), out


def test_mptcp_subflows_are_the_slices_sockets(fence: Fence) -> None:
    """MPTCP's subflows are TCP sockets the kernel makes (the first one, of a listener,
    inside the guard's bind, by the agent). The node tells a slice's sockets from its
    own by their uid in sock_diag (host-held ports and sniffers, F30; revocation, F20):
    each subflow of a slice's MPTCP listener, of a connection it accepted and of one it
    made carries the uid of the sliver's user, never the node's root."""
    from kernel import sockdiag
    from kernel.context import PIPE

    if Path("/proc/sys/net/mptcp/enabled").read_text().strip() != "1":
        pytest.skip("MPTCP is off on this node (net.mptcp.enabled = 0)")

    def remote(d: Any) -> int:   # idiag_dport, from the dumped sockid
        return int.from_bytes(d.sockid[2:4], "big")

    def established(local: int, peer: int) -> list[Any]:
        return [d for d in sockdiag.find("tcp", local) if d.state == 1 and remote(d) == peer]

    a, port = fence.a, fence.port_a
    root = a.uid_base
    listener = a.spawn(["/bin/attacker", "mlisten", "127.0.0.1", str(port), "10"],
                       stdout=PIPE, stderr=PIPE)
    outward: Any = None
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().split() == [b"mlisten", b"0"]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262) as peer:
            peer.connect(("127.0.0.1", port))
            assert listener.stdout.readline().split() == [b"accepted", b"0"]
            peer_port = peer.getsockname()[1]
            listening = [d for d in sockdiag.find("tcp", port)
                         if d.state == 10 and d.local == "127.0.0.1"]
            accepted = established(port, peer_port)
            assert listening and accepted, (listening, accepted)
            assert {d.uid for d in listening + accepted} == {root}, (listening, accepted)
            # ...and the node's own end (this process, root) stays the node's
            theirs = established(peer_port, port)
            assert theirs and {d.uid for d in theirs} == {0}, theirs
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262) as host:
            host.bind(("127.0.0.1", 0))
            host.listen(1)
            host_port = host.getsockname()[1]
            outward = a.spawn(["/bin/attacker", "mconnect", "127.0.0.1", str(host_port), "5"],
                              stdout=PIPE, stderr=PIPE, user="user")
            assert outward.stdout is not None
            word, e, local = outward.stdout.readline().split()
            assert (word, e) == (b"mconnect", b"0")
            conn, _ = host.accept()
            with conn:
                out = established(int(local), host_port)
                assert out and {d.uid for d in out} == {root + 1000}, out
    finally:
        for proc in (listener, outward):
            if proc is not None:
                proc.kill()
                proc.wait(10)


def test_kernel_interfaces_closed_to_sliver_root(fence: Fence) -> None:
    """bpf, system-wide perf, sysrq, kcore, the kernel log, kernel addresses."""
    a = fence.a
    assert run(a, "bpf")[1] != "0"
    assert run(a, "perf")[1] != "0"
    for cmd in ("echo h > /proc/sysrq-trigger", "head -c 16 /proc/kcore > /dev/null",
                "dmesg > /dev/null", "echo 1 > /proc/sys/vm/drop_caches",
                "echo x > /sys/kernel/mm/transparent_hugepage/enabled"):
        rc, out = sh(a, cmd)
        assert rc != 0, (cmd, out)
    rc, out = sh(a, "date -s 2001-01-01")
    assert rc != 0 or "not permitted" in out, out   # no CAP_SYS_TIME over the host clock
    assert time.time() > 1.6e9
    rc, out = sh(a, "head -n 50 /proc/kallsyms | cut -d' ' -f1 | sort -u")
    assert rc == 0 and set(out.split()) <= {"0000000000000000"}, out


def test_sliver_cannot_open_enter_sessions(agent_side: AgentSide) -> None:
    """The ENTER protocol (vsh's) is only for a slice's host account; a sliver asking
    for a session, for itself or naming another, is refused and gets nothing run."""
    s = agent_side
    for req in (b"ENTER1 0 0 0 2\nxterm\0touch /tmp/pwned\0",
                b"ENTER1 1 24 80 1\n" + s.b.name.encode() + b"\0"):
        out = call_from(s.a, req)
        assert out.startswith(b"ENTER: only a slice's host account"), out[:200]
    for ctx in (s.a, s.b):
        rc, _ = sh(ctx, "test -e /tmp/pwned")
        assert rc != 0


def test_key_install_follows_no_symlink_and_one_trap_stops_nothing(
        agent_side: AgentSide) -> None:
    """A plants symlinks to a host directory where the agent writes authorized_keys; B
    plants a directory where the file goes. The agent writes nothing on the host, keeps
    serving, and installs A's keys once A's path is sane again (retrying by itself)."""
    s = agent_side
    trap = Path(f"/tmp/e2e-trap-{PID}")
    trap.mkdir(mode=0o777, exist_ok=True)
    try:
        rc, out = sh(s.a, f"rm -rf /root/.ssh /home/{s.a.name}/.ssh; mkdir -p /home/{s.a.name}"
                          f" && ln -s {trap} /root/.ssh && ln -s {trap} /home/{s.a.name}/.ssh")
        assert rc == 0, out
        rc, out = sh(s.b, "rm -rf /root/.ssh; mkdir -p /root/.ssh/authorized_keys/x")
        assert rc == 0, out
        for ctx in (s.a, s.b):
            s.api.AddPersonToSlice(s.auth, s.person_id, ctx.name)
        time.sleep(5)   # two polls at least (poll_interval 2 s)
        assert list(trap.iterdir()) == [], list(trap.iterdir())
        assert s.agent.poll() is None
        assert s.admin().GetRSpec(s.b.name)["cpu_share"] == s.share_b
        # A clears its trap: the next polls retry and install its keys in the sliver
        # (F9), with no change at PLC.
        rc, out = sh(s.a, "rm /root/.ssh && echo ok")
        assert rc == 0, out

        def installed() -> bool:
            rc, out = sh(s.a, "cat /root/.ssh/authorized_keys")
            return rc == 0 and s.key in out

        deadline = time.monotonic() + 15
        while not installed():
            assert time.monotonic() < deadline, s.node.log_text()
            time.sleep(0.5)
        assert list(trap.iterdir()) == []
    finally:
        shutil.rmtree(trap, ignore_errors=True)


def test_guard_listener_and_init_fds_cannot_be_stolen(fence: Fence) -> None:
    """With the seccomp listener a sliver could answer its own binds CONTINUE: its
    init's copy (fd 4) and control socket (fd 3) stay out of reach, and no process the
    sliver starts inherits either."""
    for fd in ("4", "3"):
        out = run(fence.a, "stealfd", "1", fd)
        assert out[1] == str(errno.EPERM), (fd, out)
    # Nor can it make a listener of its own: one per filter chain (the guard's).
    assert run(fence.a, "seccomp", user="user") == ["seccomp", str(errno.EBUSY)]
    # (ls's own directory fd and a child still setting up its fds race the listing:
    # their "cannot read link" lines are noise; both listings must be there.)
    rc, fds = sh(fence.a, "ls -l /proc/self/fd/ 2>/dev/null; sleep 1 & p=$!; sleep 0.2; "
                          "ls -l /proc/$p/fd/ 2>/dev/null; kill $p; true")
    assert rc == 0 and fds.count("total") == 2 and fds.count("pipe:[") >= 3, fds
    assert "seccomp" not in fds and "socket:" not in fds, fds


def test_shared_socket_directory_cannot_be_changed_from_a_sliver(agent_side: AgentSide) -> None:
    """/run/planetlab is the same directory in every sliver: one sliver must not remove,
    replace or add to it (its own mount namespace may hide it, for itself only)."""
    s = agent_side
    for cmd in ("rm -f /run/planetlab/agent.sock", "mv /run/planetlab/agent.sock /tmp/x",
                "touch /run/planetlab/evil", "ln -s /tmp /run/planetlab/evil",
                "chmod 000 /run/planetlab/agent.sock"):
        sh(s.a, cmd)
    api_dir = Path(s.node.cfg.run_dir) / "api"
    assert sorted(p.name for p in api_dir.iterdir()) == ["agent.sock"]
    assert (api_dir / "agent.sock").stat().st_mode & 0o777 == 0o666
    # Whatever A does to it in its own namespace (mount over it: refused), B still
    # reaches the agent.
    sh(s.a, "mount -t tmpfs none /run/planetlab")
    import xmlrpc.client

    out = call_from(s.b, http(xmlrpc.client.dumps((), "GetRSpec").encode()))
    rspec = rspec_of(out)
    assert rspec["cpu_share"] == s.share_b
    sh(s.a, "umount /run/planetlab")


def test_slow_request_is_cut_and_others_are_served_meanwhile(agent_side: AgentSide) -> None:
    """A request trickled one byte every 250 ms is dropped at the agent's deadline
    (10 s a request), and the slice's other calls are answered while it trickles."""
    import xmlrpc.client

    from kernel.context import PIPE

    s = agent_side
    slow = s.a.spawn(["/bin/attacker", "slow", SOCK_IN_SLIVER, "40"], stdout=PIPE, stderr=PIPE)
    try:
        time.sleep(1)
        t0 = time.monotonic()
        out = call_from(s.b, http(xmlrpc.client.dumps((), "GetRSpec").encode()))
        assert time.monotonic() - t0 < 2 and b"<fault>" not in out
        assert slow.wait(30) == 0
        assert slow.stdout is not None
        line = slow.stdout.read().split()
        assert line[0] == b"slow" and 5 <= int(line[1]) <= 22, line
    finally:
        if slow.returncode is None:
            slow.kill()
            slow.wait(10)


def test_sliver_requests_are_capped_and_state_is_private(agent_side: AgentSide) -> None:
    """A sliver's request body is capped far below the admin's (F7), and the agent's
    database is not readable by other local users (F15)."""
    import stat
    import xmlrpc.client

    s = agent_side
    big = http(xmlrpc.client.dumps((["x" * 64] * 2000,), "GetRSpec").encode())  # ~150 KB
    assert len(big) > 128 * 1024
    out = call_from(s.a, big)
    assert out.startswith(b"HTTP/1.0 413"), out[:200]
    db = Path(s.node.cfg.state_dir) / "agent.db"
    assert stat.S_IMODE(db.stat().st_mode) & 0o077 == 0, oct(db.stat().st_mode)


def test_many_idle_connections_from_one_slice(agent_side: AgentSide) -> None:
    """A slice opens thousands of idle connections and holds them (F4): the agent keeps
    its fds, and another slice and the node admin are still answered promptly."""
    import xmlrpc.client

    from kernel.context import PIPE

    s = agent_side
    hogs = [s.a.spawn(["sh", "-c", f"ulimit -n 8192; /bin/attacker hold {SOCK_IN_SLIVER} "
                                   "6000 15"], stdout=PIPE, stderr=PIPE) for _ in range(2)]
    try:
        for hog in hogs:
            assert hog.stdout is not None
            line = hog.stdout.readline().split()
            assert line[:1] == [b"hold"], line
        assert s.agent_fds() < 1000, s.agent_fds()
        t0 = time.monotonic()
        out = call_from(s.b, http(xmlrpc.client.dumps((), "GetRSpec").encode()), timeout=30)
        took_b = time.monotonic() - t0
        t0 = time.monotonic()
        assert s.admin(timeout=30).GetRSpec(s.b.name)["cpu_share"] == s.share_b
        took_admin = time.monotonic() - t0
        assert b"<fault>" not in out and took_b < 3 and took_admin < 3, (took_b, took_admin)
        assert s.agent_fds() < 1000, s.agent_fds()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(30)


def test_agent_made_slivers_are_guarded(agent_side: AgentSide) -> None:
    """The same fence on slivers the agent made: other architectures, io_uring, raw
    sockets refused; a port reserved over the socket binds, and the sockaddr race
    never binds the port next to it."""
    import xmlrpc.client

    s = agent_side
    assert run(s.a, "x32") == ["x32", str(-errno.EPERM), "i386", str(-errno.ENOSYS)]
    assert run(s.a, "uring") == ["uring", str(errno.EPERM)]
    assert run(s.a, "socket", str(AF_PACKET), str(SOCK_RAW), "768")[1] != "0"
    port = free_port(26000 + PID % 3000)
    nxt = free_port(port + 1)
    s.give(s.a, f"tcp:{port}@127.0.0.1")
    reply = call_from(s.a, http(xmlrpc.client.dumps((f"tcp:{port}@127.0.0.1",),
                                                    "ReservePort").encode()))
    assert b"<fault>" not in reply, reply
    assert run(s.b, "bind", "127.0.0.1", str(port)) == ["bind", str(errno.EADDRINUSE), "0"]
    out = run(s.a, "race", "127.0.0.1", str(port), str(nxt), "1000", timeout=90)
    n, ok, other, failed = (int(x) for x in out[1:])
    assert other == 0 and ok > 0 and ok + failed == n, out


def test_only_ip_unix_and_route_netlink_sockets(fence: Fence) -> None:
    """F12: vsock (not network-namespaced), AF_ALG and netlink families other than
    NETLINK_ROUTE are refused; the families a sliver needs still work."""
    for fam, typ, proto in ((40, SOCK_STREAM, 0), (40, 5, 0), (38, 5, 0), (16, SOCK_RAW, 15),
                            (16, SOCK_RAW, 4), (16, SOCK_DGRAM, 9)):
        out = run(fence.a, "socket", str(fam), str(typ), str(proto))
        assert out[1] != "0", (fam, typ, proto, out)
    for fam, typ, proto in ((1, SOCK_STREAM, 0), (1, SOCK_DGRAM, 0), (2, SOCK_STREAM, 0),
                            (10, SOCK_DGRAM, 0), (16, SOCK_RAW, 0)):
        assert run(fence.a, "socket", str(fam), str(typ), str(proto)) == ["socket", "0"], \
            (fam, typ, proto)


def test_no_netlink_port_id_of_the_node_is_the_slivers_to_pick(fence: Fence) -> None:
    """Netlink port ids are per network namespace, and a sliver's netlink sockets live in
    the node's. A sliver asking for an id by hand (libnl's and pyroute2's pid + (n << 22)
    of a node process: the agent's own are found by a bind failing), with a multicast
    group, or through the autobind of a first send (its tgid, a number it picks by
    forking), holds none: its binds succeed on ids the kernel picked, and the node's
    process that binds that id gets it."""
    from kernel.context import PIPE

    target = (os.getpid() & 0x3FFFFF) | (77 << 22)   # pyroute2 here, its 77th socket
    squat = fence.a.spawn(["/bin/attacker", "nlsquat", str(target), "10"], stdout=PIPE,
                          stderr=PIPE)
    try:
        assert squat.stdout is not None
        line = squat.stdout.readline().split()
        assert len(line) == 8 and line[0] == b"nlsquat", line
        new, e_bind, bound, e_group, grouped, sent, sliver_pid = (int(x) for x in line[1:])
        assert (e_bind, e_group) == (0, 0)            # a program inside goes on...
        ids = (new, bound, grouped, sent)             # ...on ids the kernel picked at
        assert all(2**31 <= i < 2**32 - 4096 for i in ids), ids   # random: no node pid
        assert target not in ids and sliver_pid not in ids and len(set(ids)) == 4
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as mine:
            mine.bind((target, 0))
            assert mine.getsockname()[0] == target
    finally:
        squat.kill()
        squat.wait(10)


def test_raw_send_checks_source_and_refuses_ip_options(agent_side: AgentSide) -> None:
    """RawSend from a sliver: a UDP packet from its own port goes out; with IPv4 options
    (F14), from a port it does not own, or from a foreign address it is refused."""
    import struct
    import xmlrpc.client

    s = agent_side
    port = free_port(29000 + PID % 2000)
    dest = free_port(port + 1)
    s.give(s.a, f"udp:{port}@127.0.0.1,udp:{dest}@127.0.0.1")
    reply = call_from(s.a, http(xmlrpc.client.dumps((f"udp:{port}@127.0.0.1,udp:{dest}@127.0.0.1",),
                                                    "ReservePort").encode()))
    assert b"<fault>" not in reply, reply

    def packet(src: str, sport: int, options: bytes = b"") -> bytes:
        udp = struct.pack("!HHHH", sport, dest, 8 + 4, 0) + b"e2e!"
        ihl = 5 + len(options) // 4
        hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(udp), 0, 0, 64, 17, 0,
                          socket.inet_aton(src), socket.inet_aton("127.0.0.1"))
        return hdr + options + udp

    def raw_send(pkt: bytes) -> bytes:
        return call_from(s.a, http(xmlrpc.client.dumps((xmlrpc.client.Binary(pkt),),
                                                       "RawSend").encode()))

    from kernel.context import PIPE

    # F30: not from a port A holds no socket on, even though the table grants it
    assert b"holds no socket" in raw_send(packet("127.0.0.1", port))
    holders = [s.a.spawn(["/bin/attacker", "udphold", "127.0.0.1", str(p), "8"], stdout=PIPE,
                         stderr=PIPE) for p in (port, dest)]
    try:
        for h in holders:
            assert h.stdout is not None and h.stdout.readline().split() == [b"udphold", b"0"]
        assert b"<fault>" not in raw_send(packet("127.0.0.1", port))   # A's to A's
        assert holders[1].stdout is not None
        assert holders[1].stdout.readline().split() == [b"msg", b"e2e!"]
        # F30: never to a host socket of this node (the agent's PLC session, say)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host:
            host.bind(("127.0.0.1", 0))
            to_host = packet("127.0.0.1", port)
            to_host = to_host[:22] + struct.pack("!H", host.getsockname()[1]) + to_host[24:]
            assert b"a host service listens there" in raw_send(to_host)
    finally:
        for h in holders:
            h.kill()
            h.wait(10)
    for bad in (packet("127.0.0.1", port, b"\x01\x01\x01\x00"),        # NOP options
                packet("127.0.0.1", port, b"\x83\x07\x04" + b"\x00" * 5),  # loose source route
                packet("127.0.0.1", port + 7),                          # not its port
                packet("10.213.254.254", port)):                        # not the node's
        assert b"<fault>" in raw_send(bad), bad.hex()


def test_mounts_made_inside_do_not_reach_the_host(fence: Fence) -> None:
    """Sliver root has no CAP_SYS_ADMIN (default bounding set): mount is refused; and
    were it allowed, the mount would stay in the sliver's namespace."""
    tag = f"e2emnt{PID}"
    rc, out = sh(fence.a, f"mkdir -p /tmp/{tag} && mount -t tmpfs {tag} /tmp/{tag} && "
                          f"grep -c {tag} /proc/self/mountinfo")
    assert rc != 0 or out.strip() == "1", out
    assert tag not in Path("/proc/self/mountinfo").read_text()   # not on the host
    assert tag not in Path(f"/proc/{fence.b.init_pid}/mountinfo").read_text()   # nor in B
    sh(fence.a, f"umount /tmp/{tag}")


def test_cli_enter_without_pty_hands_no_terminal_to_the_sliver(agent_side: AgentSide) -> None:
    """F10: `planetlab-agent enter NAME -T -- CMD` from a terminal: a process of the
    sliver that takes CMD's stdin must not read what is typed in that terminal later."""
    import pty

    from kernel.context import PIPE

    s = agent_side
    master, slave = pty.openpty()
    try:
        enter = subprocess.Popen(s.node.agent_argv("enter", s.a.name, "-T", "--", "sleep",
                                                   "2.7"), stdin=slave,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        thief = s.a.spawn(["sh", "-c", "for i in $(seq 50); do p=$(grep -l 'sleep.2[.]7' "
                           "/proc/[0-9]*/cmdline 2>/dev/null | head -n 1 | cut -d/ -f3); "
                           "[ -n \"$p\" ] && break; sleep 0.1; done; "
                           "/bin/attacker stealfd $p 0 4"], stdout=PIPE, stderr=PIPE)
        enter.communicate(timeout=60)
        time.sleep(0.5)
        os.write(master, b"typed-after-exit\n")
        out, err = thief.communicate(timeout=30)
        # it did take the fd (now a relay pipe, not the terminal)...
        assert out.split()[:2] == [b"stealfd", b"0"], (out, err)
        assert b"typed-after-exit" not in out, out   # ...and reads nothing typed later
    finally:
        os.close(master)
        os.close(slave)


def test_reserveport_refuses_privileged_ports(agent_side: AgentSide) -> None:
    """F16: a slice cannot reserve a port below 1024 at run time."""
    import xmlrpc.client

    s = agent_side
    for spec in ("tcp:22@127.0.0.1", "udp:53", "tcp:999"):
        out = call_from(s.a, http(xmlrpc.client.dumps((spec,), "ReservePort").encode()))
        assert b"<fault>" in out, (spec, out[:300])


def test_reserveport_refuses_host_held_ports(agent_side: AgentSide) -> None:
    """F30: PLC's port on this node (the agent's own plc_url) and a port where a host
    socket listens (TCP or UDP, loopback or wildcard, v4 or v6) are never granted."""
    import urllib.parse
    import xmlrpc.client

    s = agent_side
    plc = urllib.parse.urlsplit(s.node.cfg.plc_url).port

    def call(*args: Any) -> bytes:
        time.sleep(0.25)   # within the agent's api_rate (5/s): refusals, not rate faults
        return call_from(s.a, http(xmlrpc.client.dumps(args[1:], args[0]).encode()))
    for spec in (f"tcp:{plc}@127.0.0.1", f"tcp:{plc}"):
        out = call("ReservePort", spec)
        assert b"<fault>" in out and b"a host service listens there" in out, (spec, out)
    port = free_port(31000 + PID % 1500)
    for fam, stype, addr in ((socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
                             (socket.AF_INET6, socket.SOCK_STREAM, "::"),
                             (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0")):
        with socket.socket(fam, stype) as host:
            host.bind((addr, port))
            if stype == socket.SOCK_STREAM:
                host.listen()
            proto = "tcp" if stype == socket.SOCK_STREAM else "udp"
            for spec in (f"{proto}:{port}@127.0.0.1", f"{proto}:{port}"):
                out = call("ReservePort", spec)
                assert b"<fault>" in out and b"a host service listens there" in out, (spec, out)
    out = call("GetPorts")
    assert b"<fault>" not in out
    assert str(port).encode() not in out and str(plc).encode() not in out, out
    time.sleep(2)   # the slice's API budget refills for the tests after this one


def test_explicit_ephemeral_binds_refused(fence: Fence) -> None:
    """F18: a specific port of the ephemeral range is nobody's to bind (port 0 is)."""
    from agent.ports import read_ephemeral_range

    lo, hi = read_ephemeral_range()
    p = free_port(lo + 5000 + PID % 5000)
    assert lo <= p <= hi
    assert run(fence.b, "bind", "127.0.0.1", str(p))[1] != "0"
    assert run(fence.b, "bind", "127.0.0.1", "0")[1] == "0"


def test_sniffer_stops_seeing_a_port_its_slice_gave_up(agent_side: AgentSide) -> None:
    """A reserves a port, opens a sniffer and releases the port; B is given it: A's
    sniffer must not show B's traffic (F13). Its own traffic before is seen."""
    import xmlrpc.client

    from kernel.context import PIPE

    s = agent_side
    port = free_port(28000 + PID % 2000)
    spec = f"udp:{port}@127.0.0.1"

    def api(ctx: Context, method: str, *args: str) -> bytes:
        return call_from(ctx, http(xmlrpc.client.dumps(args, method).encode()))

    rcap = s.give(s.a, spec)
    assert b"<fault>" not in api(s.a, "ReservePort", spec)
    # A sniffer covers the ports A holds a socket on (F30): A's socket talks to itself.
    # (A holds its socket 5 s: the sniffer must open while it exists, on a loaded
    # machine too; the sniffer then reads until after B's traffic.)
    own = s.a.spawn(["/bin/attacker", "udphold", "127.0.0.1", str(port), "5", f"Aown{PID}"],
                    stdout=PIPE, stderr=PIPE)
    assert own.stdout is not None and own.stdout.readline().split() == [b"udphold", b"0"]
    sniffer = s.a.spawn(["/bin/attacker", "sniff1", SOCK_IN_SLIVER, "8", f"Aown{PID}",
                         f"Bpriv{PID}"],
                        stdout=PIPE, stderr=PIPE)
    try:
        assert sniffer.stdout is not None
        assert sniffer.stdout.readline().split() == [b"sniff1", b"ready"]
        own.wait(10)
        assert b"<fault>" not in api(s.a, "ReleasePort", spec)
        assert s.admin().ReleaseRcap(rcap) == 1     # A gives the port up for good
        s.give(s.b, spec)
        assert b"<fault>" not in api(s.b, "ReservePort", spec)
        b_own = s.b.spawn(["/bin/attacker", "udphold", "127.0.0.1", str(port), "1",
                           f"Bpriv{PID}"], stdout=PIPE, stderr=PIPE)
        assert b_own.wait(10) == 0
        assert sniffer.wait(30) == 0
        out = sniffer.stdout.read().split()
        assert out[0] == b"sniff1" and int(out[1]) >= 1, out   # A's own packet...
        assert int(out[2]) == 0, out                           # ...none of B's
    finally:
        if sniffer.returncode is None:
            sniffer.kill()
            sniffer.wait(10)
        api(s.b, "ReleasePort", spec)


def test_sniffers_are_capped_per_slice(agent_side: AgentSide) -> None:
    """F17: a slice holds only a few sniffers at once, however many it asks for."""
    import xmlrpc.client

    from kernel.context import PIPE

    s = agent_side
    port = free_port(30000 + PID % 1500)
    spec = f"udp:{port}@127.0.0.1"
    s.give(s.a, spec)
    reply = call_from(s.a, http(xmlrpc.client.dumps((spec,), "ReservePort").encode()))
    assert b"<fault>" not in reply, reply
    holder = s.a.spawn(["/bin/attacker", "udphold", "127.0.0.1", str(port), "10"],
                       stdout=PIPE, stderr=PIPE)   # a sniffer needs A's own socket (F30)
    assert holder.stdout is not None and holder.stdout.readline().split() == [b"udphold", b"0"]
    hog = s.a.spawn(["/bin/attacker", "sniffers", SOCK_IN_SLIVER, "12", "3"], stdout=PIPE,
                    stderr=PIPE)
    try:
        assert hog.stdout is not None
        line = hog.stdout.readline().split()
        assert line[:1] == [b"sniffers"] and 1 <= int(line[1]) <= 4, line
    finally:
        hog.kill()
        hog.wait(10)
        holder.kill()
        holder.wait(10)
        call_from(s.a, http(xmlrpc.client.dumps((spec,), "ReleasePort").encode()))


def test_slice_chosen_image_names_cannot_leave_the_image_store(agent_side: AgentSide) -> None:
    """`vref` is a tag a slice's own users set: a path in it must not make a sliver of
    some other host directory; the sliver stays pending with a message."""
    import json

    s = agent_side
    node_id = s.api.GetNodes(s.auth, {}, ["node_id"])[0]["node_id"]
    base = s.a.name.rsplit("_", 1)[0]
    names = []
    for i, vref in enumerate(("../../../..", "bb/../../..", "/etc", ".")):
        name = f"{base}_v{i}"
        s.api.AddSlice(s.auth, {"name": name, "url": "http://e2e.test/", "description": "v",
                                "instantiation": "plc-instantiated"})
        s.api.AddSliceTag(s.auth, name, "vref", vref)
        names.append(name)
    s.api.AddSliceToNodes(s.auth, names[0], [node_id])
    for name in names[1:]:
        s.api.AddSliceToNodes(s.auth, name, [node_id])
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(s.node.agent_argv("status", "--json"), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        got = {x["name"]: x for x in json.loads(out.stdout)["slivers"]}
        if all(n in got and got[n]["message"] for n in names):
            break
        assert time.monotonic() < deadline, (got, s.node.log_text())
        time.sleep(0.5)
    for name in names:
        assert got[name]["state"] != "running" and not got[name]["live"], got[name]
        assert not (s.node.contexts_dir / name).exists()
    assert s.admin().GetRSpec(s.b.name)["cpu_share"] == s.share_b   # others unaffected


def test_rcap_ports_move_between_slices(agent_side: AgentSide) -> None:
    """Issue 12, ports as an rcap resource on the real kernel: A (given a port by the
    node admin) acquires an rcap of it from its own holdings and binds it to B: B's
    sliver binds the port through the guard and A's cannot; the rcap released, B's bind
    is refused and B's bound socket silenced (the port table's revoke path), and the
    port is A's again."""
    import xmlrpc.client

    from kernel.context import PIPE

    s = agent_side
    port = free_port(22000 + PID % 1500)
    spec = f"tcp:{port}@127.0.0.1,udp:{port}@127.0.0.1"

    def call(ctx: Context, method: str, *args: Any) -> Any:
        time.sleep(0.25)   # within the agent's api_rate (5/s)
        reply = call_from(ctx, http(xmlrpc.client.dumps(args, method).encode()))
        body = reply.split(b"\r\n\r\n", 1)[1]
        return xmlrpc.client.loads(body.decode())[0][0]

    s.give(s.a, spec)
    assert run(s.a, "bind", "127.0.0.1", str(port))[1] == "0"
    rcap = call(s.a, "AcquireRcap", {"ports": spec})     # from A's own holdings
    assert call(s.a, "BindRcap", s.b.name, rcap) == 1
    assert run(s.b, "bind", "127.0.0.1", str(port))[1] == "0"
    assert run(s.a, "bind", "127.0.0.1", str(port))[1] == str(errno.EADDRINUSE)
    holder = s.b.spawn(["/bin/attacker", "udphold", "127.0.0.1", str(port), "6",
                        f"Bheld{PID}"], stdout=PIPE, stderr=PIPE)
    assert holder.stdout is not None
    assert holder.stdout.readline().split() == [b"udphold", b"0"]
    assert holder.stdout.readline().split()[0] == b"msg"       # it hears itself
    assert call(s.a, "ReleaseRcap", rcap) == 1
    assert holder.wait(30) == 0
    heard = holder.stdout.read().split(b"\n")
    # 10 a second for 6 s unless silenced within about a second of the release
    assert sum(line.startswith(b"msg") for line in heard) < 30, heard
    assert run(s.b, "bind", "127.0.0.1", str(port))[1] != "0"
    assert run(s.a, "bind", "127.0.0.1", str(port))[1] == "0"
    time.sleep(2)   # the slice's API budget refills for the tests after this one


def test_rcap_tag_ports_lent_between_slices(agent_side: AgentSide) -> None:
    """Issue 12, a PLC sliver's `ports` tag in the ledger on the real kernel: A, given
    tcp:P by its tag, lends it to B with SetLoans: B's sliver binds P and A's gets
    EADDRINUSE; the loan revoked, P is A's again and B's bind is refused (EADDRINUSE,
    the port table names A as owner)."""
    import xmlrpc.client

    from tests.agent.agent_node import wait_for

    s = agent_side
    port = free_port(25000 + PID % 1500)

    def call(ctx: Context, method: str, *args: Any) -> Any:
        time.sleep(0.25)   # within the agent's api_rate (5/s)
        reply = call_from(ctx, http(xmlrpc.client.dumps(args, method).encode()))
        body = reply.split(b"\r\n\r\n", 1)[1]
        return xmlrpc.client.loads(body.decode())[0][0]

    def bind(ctx: Context) -> str:
        return run(ctx, "bind", "127.0.0.1", str(port))[1]

    tag_id = s.api.AddSliceTag(s.auth, s.a.name, "ports", f"tcp:{port}")
    try:
        wait_for(lambda: bind(s.a) == "0", 30, "A given its tag's port", s.node.log_text)
        assert bind(s.b) == str(errno.EADDRINUSE)     # A's
        assert call(s.a, "SetLoans", [[s.b.name, "ports", f"tcp:{port}", 0, False]]) == 1
        assert call(s.a, "GetLoans") == [[s.b.name, "ports", f"tcp:{port}", 0, False]]
        assert bind(s.b) == "0"
        assert bind(s.a) == str(errno.EADDRINUSE)
        time.sleep(5)    # polls of the unchanged tag leave the loan in place
        assert bind(s.b) == "0" and bind(s.a) == str(errno.EADDRINUSE)
        assert call(s.a, "SetLoans", []) == 1          # revoked: back to A
        assert bind(s.a) == "0"
        assert bind(s.b) == str(errno.EADDRINUSE)
    finally:
        s.api.DeleteSliceTag(s.auth, tag_id)
    wait_for(lambda: bind(s.a) != "0", 30, "the tag's port gone with the tag",
             s.node.log_text)
    time.sleep(2)   # the slice's API budget refills for the tests after this one
