"""The guard supervisor on the real kernel: harness slivers under the guard filter.

Each harness "sliver" is a Python process that installs `guard_filter()` with
NEW_LISTENER, sends the listener to the test (as the sliver init sends it to the
agent), keeps its own copy (as the init does), and then runs commands sent over a
SOCK_SEQPACKET pair: bind, a racing bind, direct raw sockets.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.guard import Guard, PortService, PortStore, listener_of, serve_guard
from agent.ports import PortRange, PortTable, read_ephemeral_range

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import ctypes, errno, json, os, socket, struct, sys, threading
sys.path.insert(0, sys.argv[2])
from kernel import seccomp
ctl = socket.socket(fileno=int(sys.argv[1]))
listener = seccomp.install(seccomp.guard_filter())
socket.send_fds(ctl, [b"L"], [listener])   # and keep our copy, as the sliver init does
libc = ctypes.CDLL(None, use_errno=True)
socks = {}

def sockaddr(host, port):
    if ":" in host:
        return struct.pack("<H", socket.AF_INET6) + struct.pack("!HI", port, 0) + \
            socket.inet_pton(socket.AF_INET6, host) + struct.pack("<I", 0)
    return struct.pack("<H", socket.AF_INET) + struct.pack("!H", port) + \
        socket.inet_aton(host) + bytes(8)

exec(sys.argv[3])  # HOSTILE: defines hostile_binds()
if len(sys.argv) > 4:  # run as this host uid (the guard binds for it all the same)
    os.setgroups([]); os.setresgid(int(sys.argv[4]), int(sys.argv[4]), int(sys.argv[4]))
    os.setresuid(int(sys.argv[4]), int(sys.argv[4]), int(sys.argv[4]))


def do(req):
    op = req["op"]
    if op == "bind":
        fam = socket.AF_INET6 if ":" in req["host"] else socket.AF_INET
        s = socket.socket(fam, getattr(socket, req.get("type", "SOCK_STREAM")),
                          req.get("proto", 0))
        try:
            s.bind((req["host"], req["port"]))
        except OSError as e:
            s.close()
            return {"errno": e.errno}
        socks[s.fileno()] = s
        return {"errno": 0, "name": list(s.getsockname()[:2]), "fd": s.fileno()}
    if op == "unix":
        s = socket.socket(socket.AF_UNIX, getattr(socket, req.get("type", "SOCK_STREAM")))
        try:
            s.bind(req["path"].replace("@", "\0", 1))
        except OSError as e:
            s.close()
            return {"errno": e.errno}
        socks[s.fileno()] = s
        return {"errno": 0, "name": repr(s.getsockname())}
    if op == "close":
        socks.pop(req["fd"]).close()
        return {}
    if op in ("listen", "accept", "recv"):
        s = socks[req["fd"]]
        try:
            if op == "listen":
                s.listen()
            else:
                s.settimeout(req["timeout"])
                got = s.accept()[0].close() if op == "accept" else s.recv(16)
        except socket.timeout:
            return {"errno": "timeout"}
        except OSError as e:
            return {"errno": e.errno}
        return {"errno": 0}
    if op == "race":
        owned, other, host = req["owned"], req["other"], req["host"]
        buf = ctypes.create_string_buffer(sockaddr(host, owned), 16)
        a, b = sockaddr(host, owned), sockaddr(host, other)
        stop = False
        def flip():
            while not stop:
                ctypes.memmove(buf, b, 16)
                ctypes.memmove(buf, a, 16)
        t = threading.Thread(target=flip)
        t.start()
        counts = {"ok_owned": 0, "ok_other": 0, "denied": 0, "other_errors": 0}
        try:
            for _ in range(req["tries"]):
                s = socket.socket()
                if libc.bind(s.fileno(), buf, 16) == 0:
                    port = s.getsockname()[1]
                    counts["ok_owned" if port == owned else "ok_other"] += 1
                elif ctypes.get_errno() == errno.EACCES:
                    counts["denied"] += 1
                else:
                    counts["other_errors"] += 1
                s.close()
        finally:
            stop = True
            t.join()
        return counts
    if op == "hostile":
        return {"errnos": hostile_binds()}
    if op == "fdrace":
        # Another thread keeps swapping fd N between a Unix socket and an IP socket
        # while this one binds N to an unowned IP port.
        addr = sockaddr(req["host"], req["other"])
        buf = ctypes.create_string_buffer(addr, 16)
        ip_bound = swaps = 0
        for _ in range(req["tries"]):
            ip, ux = socket.socket(), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = os.dup(ux.fileno())
            stop = False
            def swap():
                nonlocal swaps
                while not stop:
                    os.dup2(ip.fileno(), target); os.dup2(ux.fileno(), target); swaps += 1
            t = threading.Thread(target=swap)
            t.start()
            try:
                for _ in range(20):
                    libc.bind(target, buf, 16)
            finally:
                stop = True
                t.join()
            if ip.getsockname()[1] != 0:
                ip_bound += 1
            os.close(target); ip.close(); ux.close()
        return {"ip_bound": ip_bound, "swaps": swaps}
    if op == "raw":
        out = {}
        for name, args in [("packet", (socket.AF_PACKET, socket.SOCK_RAW, 0)),
                           ("inet_raw", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                           ("inet6_raw", (socket.AF_INET6, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 58))]:
            try:
                socket.socket(*args).close()
                out[name] = 0
            except OSError as e:
                out[name] = e.errno
        return out
    if op == "threadbinds":
        # req["count"] threads one after another, each making one bind (port 0).
        errs = []
        def one():
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", 0))
                    errs.append(0)
                except OSError as e:
                    errs.append(e.errno)
        for _ in range(req["count"]):
            t = threading.Thread(target=one)
            t.start()
            t.join()
        return {"errnos": sorted(set(errs)), "count": len(errs)}
    if op == "exec":
        import subprocess
        p = subprocess.run(req["argv"], capture_output=True, text=True)
        return {"rc": p.returncode, "out": p.stdout}
    raise ValueError(op)

while True:
    raw = ctl.recv(65536)
    if not raw:
        break
    req = json.loads(raw)
    try:
        ctl.send(json.dumps(do(req)).encode())
    except Exception as e:
        ctl.send(json.dumps({"exception": repr(e)}).encode())
"""


HOSTILE = r'''
def hostile_binds():
    # bind(2) with bad arguments; the errno of each (0 = bound)
    import ctypes, errno, os, socket, struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.bind.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    sin = struct.pack("<H", 2) + bytes(14)
    sin6 = struct.pack("<H", 10) + bytes(26)
    sun = struct.pack("<H", 1) + b"\0hostile" + bytes(4)
    unspec = struct.pack("<H", 0) + bytes(14)
    # another family in sockaddr_in6-sized bytes on an AF_INET6 socket (EAFNOSUPPORT
    # after inet6's length check), stream and datagram
    v4in6 = struct.pack("<H", 2) + bytes(26)
    unspec6 = struct.pack("<H", 0) + bytes(22)
    odd6 = struct.pack("<H", 0xFFFF) + bytes(126)
    r, w = os.pipe()
    cases = []
    def new(fam=socket.AF_INET, kind=socket.SOCK_DGRAM):
        s = socket.socket(fam, kind)
        cases.append(s)
        return s.fileno()
    keep = []
    def buf(b):
        cb = ctypes.create_string_buffer(b, len(b))
        keep.append(cb)
        return ctypes.addressof(cb)
    calls = [
        (-1, buf(sin), 16), (9999, buf(sin), 16), (r, buf(sin), 16),
        (new(), None, 16), (new(), 0xDEAD0000, 16), (new(), buf(sin), -1),
        (new(), buf(sin), 200), (new(), buf(sin), 0), (new(), buf(sin6), 28),
        (new(socket.AF_INET6), buf(sin), 16), (new(), buf(unspec), 16),
        (new(), buf(sun), len(sun)), (new(), buf(sin), 8),
        (new(socket.AF_INET6), buf(v4in6), 28), (new(socket.AF_INET6), buf(unspec6), 24),
        (new(socket.AF_INET6), buf(odd6), 128), (new(socket.AF_INET6), buf(v4in6), 23),
        (new(socket.AF_INET6, socket.SOCK_STREAM), buf(v4in6), 28),
        (new(socket.AF_INET6, socket.SOCK_STREAM), buf(unspec6), 24),
    ]
    out = []
    for fd, addr, length in calls:
        out.append(0 if libc.bind(fd, addr, length) == 0 else ctypes.get_errno())
    for s in cases:
        s.close()
    os.close(r); os.close(w)
    return out
'''


class Sliver:
    """A harness process under the guard filter (see the module docstring)."""

    def __init__(self, name: str, uid: int | None = None) -> None:
        self.name = name
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ctl = mine
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(theirs.fileno()), str(ROOT), HOSTILE]
            + ([] if uid is None else [str(uid)]), pass_fds=(theirs.fileno(),))
        theirs.close()
        try:
            mine.settimeout(20)
            _, fds, _, _ = socket.recv_fds(mine, 16, 1)
            self.listener = fds[0]
        except BaseException:
            self.kill()
            raise

    def call(self, **req: Any) -> dict[str, Any]:
        self.ctl.send(json.dumps(req).encode())
        reply = json.loads(self.ctl.recv(65536))
        assert "exception" not in reply, reply
        return reply

    async def acall(self, **req: Any) -> dict[str, Any]:
        return await trio.to_thread.run_sync(lambda: self.call(**req))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.ctl.close()


@pytest.fixture
def slivers() -> Iterator[Any]:
    made: list[Sliver] = []

    def make(name: str, uid: int | None = None) -> Sliver:
        s = Sliver(f"{name}{os.getpid()}", uid)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.kill()


def free_ports(count: int) -> list[int]:
    """Ports below the ephemeral range that nobody on the node has bound right now."""
    lo = read_ephemeral_range()[0]
    out: list[int] = []
    port = 20000 + (os.getpid() * 7) % (lo - 21000)
    while len(out) < count:
        port = port + 1 if port + 1 < lo else 20000
        try:
            for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(fam, kind) as s:
                        s.bind((host, port))
        except OSError:
            continue
        out.append(port)
    return out


def make_guard(tmp_path: Path) -> Guard:
    table = PortTable([], read_ephemeral_range())  # loopback 127.0.0.1 and ::1
    return Guard(PortService(table, PortStore()), tmp_path / "guard")


async def start(nursery: trio.Nursery, guard: Guard, *slivers: Sliver) -> None:
    if getattr(guard, "_test_revoker", None) is not nursery:   # as serve_guard does:
        guard._test_revoker = nursery                            # revocations in a thread
        await nursery.start(guard.revoker)
    for s in slivers:
        await nursery.start(guard.supervise, s.name, os.dup(s.listener))


async def test_owner_binds_other_gets_eacces(tmp_path: Path, slivers: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="agent.guard")
    guard = make_guard(tmp_path)
    a, b = slivers("a"), slivers("b")
    port, low = free_ports(1)[0], 0
    guard.ports.reserve(a.name, f"tcp:{port}")
    async with trio.open_nursery() as nursery:
        await start(nursery, guard, a, b)
        got = await a.acall(op="bind", host="127.0.0.1", port=port)
        assert got["errno"] == 0 and got["name"] == ["127.0.0.1", port]
        assert (await b.acall(op="bind", host="::1", port=port))["errno"] == errno.EADDRINUSE
        assert (await b.acall(op="bind", host="127.0.0.1", port=port + 1))["errno"] == errno.EACCES
        # port 0 binds; an explicit port of the ephemeral range is refused (F18)
        assert (await a.acall(op="bind", host="127.0.0.1", port=0))["errno"] == 0
        eph = read_ephemeral_range()
        assert (await b.acall(op="bind", host="0.0.0.0", port=0, type="SOCK_DGRAM"))["errno"] == 0
        explicit = eph[0] + os.getpid() % (eph[1] - eph[0])
        for host, kind in (("127.0.0.1", "SOCK_STREAM"), ("::", "SOCK_DGRAM")):
            got = await b.acall(op="bind", host=host, port=explicit, type=kind)
            assert got["errno"] == errno.EACCES, (host, kind, got)
        # a port below 1024, owned by b: b binds it though it could not by itself
        for candidate in range(900, 1000):
            try:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
                low = candidate
                break
            except OSError:
                continue
        guard.ports.set_tag_ports(b.name, f"tcp:{low}@127.0.0.1")  # below 1024: by tag only
        assert (await b.acall(op="bind", host="127.0.0.1", port=low))["errno"] == 0
        assert eph[0] > 1024
        nursery.cancel_scope.cancel()
    assert guard.stats.denied == 4
    # the reasons are in the agent's log
    assert f"is owned by slice '{a.name}'" in caplog.text
    assert f"slice '{b.name}' does not own tcp port {port + 1}" in caplog.text


async def test_same_port_on_different_addresses(tmp_path: Path, slivers: Any) -> None:
    guard = make_guard(tmp_path)
    a, b = slivers("a"), slivers("b")
    port = free_ports(1)[0]
    guard.ports.reserve(a.name, f"tcp:{port}@::1,udp:{port}@::1")
    guard.ports.reserve(b.name, f"tcp:{port}@127.0.0.1")
    async with trio.open_nursery() as nursery:
        await start(nursery, guard, a, b)
        assert (await a.acall(op="bind", host="::1", port=port))["errno"] == 0
        assert (await b.acall(op="bind", host="127.0.0.1", port=port))["errno"] == 0
        assert (await a.acall(op="bind", host="::", port=port))["errno"] == errno.EADDRINUSE
        # IPv6 and wildcard: a owns udp on ::1 only, not on 127.0.0.1
        assert (await a.acall(op="bind", host="::", port=port, type="SOCK_DGRAM"))["errno"] \
            == errno.EACCES
        nursery.cancel_scope.cancel()


async def test_racing_thread_never_binds_unowned_port(tmp_path: Path, slivers: Any) -> None:
    guard = make_guard(tmp_path)
    a = slivers("a")
    owned, other = free_ports(2)
    guard.ports.reserve(a.name, f"tcp:{owned}")
    async with trio.open_nursery() as nursery:
        await start(nursery, guard, a)
        t0 = time.monotonic()
        counts = await a.acall(op="race", host="127.0.0.1", owned=owned, other=other, tries=3000)
        elapsed = time.monotonic() - t0
        nursery.cancel_scope.cancel()
    print("race", counts, elapsed, guard.stats)
    assert counts["ok_other"] == 0, counts
    # the owned bytes were answered by the C fast path too: it raced as well
    assert guard.stats.fast > 0, guard.stats
    assert counts["other_errors"] == 0, counts
    # the race really ran: the guard read both values
    assert counts["ok_owned"] > 0 and counts["denied"] > 0, counts
    assert elapsed < 30


async def test_fast_path_replays_only_decisions_of_the_current_table(
        tmp_path: Path, slivers: Any) -> None:
    """Repeated binds of one allowed key are answered in C; any change of the port
    table voids what it remembers, so a released port is refused at once."""
    guard = make_guard(tmp_path)
    assert guard.fast.enabled, "kernel/bin/libguardfast.so is built by make"
    a, b = slivers("a"), slivers("b")
    port = free_ports(1)[0]
    guard.ports.reserve(a.name, f"tcp:{port}")

    async def bind_close(s: Sliver, kind: str = "SOCK_STREAM") -> int:
        got = await s.acall(op="bind", host="127.0.0.1", port=port, type=kind)
        if got["errno"] == 0:
            await s.acall(op="close", fd=got["fd"])
        return int(got["errno"])

    async with trio.open_nursery() as nursery:
        await start(nursery, guard, a, b)
        for _ in range(20):
            assert await bind_close(a) == 0
        assert guard.stats.fast >= 19, guard.stats   # all but the first
        # another kind of socket is another key: decided in Python (udp not owned)
        assert await bind_close(a, "SOCK_DGRAM") == errno.EACCES
        # the other slice never profits from a's memo
        assert await bind_close(b) == errno.EADDRINUSE
        fast = guard.stats.fast
        guard.ports.release(a.name, f"tcp:{port}")
        assert await bind_close(a) == errno.EACCES
        guard.ports.reserve(b.name, f"tcp:{port}")
        assert await bind_close(a) == errno.EADDRINUSE
        assert await bind_close(b) == 0 and await bind_close(b) == 0
        assert guard.stats.fast == fast + 1, guard.stats
        nursery.cancel_scope.cancel()
    assert guard.stats.handled == 20 + 1 + 1 + 2 + 2
    assert guard.fast.by_listener == {}   # closed with their supervisors


async def test_racing_fd_swap_never_binds_unowned_port(tmp_path: Path, slivers: Any) -> None:
    guard = make_guard(tmp_path)
    a = slivers("a")
    other = free_ports(1)[0]
    async with trio.open_nursery() as nursery:
        await start(nursery, guard, a)
        got = await a.acall(op="fdrace", host="127.0.0.1", other=other, tries=50)
        nursery.cancel_scope.cancel()
    assert got["swaps"] > 0
    assert got["ip_bound"] == 0, got


async def test_direct_raw_and_packet_sockets_fail(slivers: Any) -> None:
    a = slivers("a")
    # The harness runs as node root, so only the filter can refuse these.
    assert await a.acall(op="raw") == {"packet": errno.EPERM, "inet_raw": errno.EPERM,
                                      "inet6_raw": errno.EPERM}
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0):
        pass  # outside the filter the same call works


async def test_unix_binds_are_performed_for_the_caller(tmp_path: Path, slivers: Any) -> None:
    from agent.guard import BINDAS
    assert BINDAS.exists(), f"{BINDAS} missing: run `make native`"
    guard = make_guard(tmp_path)
    a = slivers("a")
    path = tmp_path / "sock"
    async with trio.open_nursery() as nursery:
        await start(nursery, guard, a)
        got = await a.acall(op="unix", path=str(path))
        assert got["errno"] == 0 and path.is_socket()
        got = await a.acall(op="unix", path=f"@pl/{a.name}/guard-test")
        assert got["errno"] == 0 and f"pl/{a.name}/guard-test" in got["name"]
        got = await a.acall(op="unix", path=str(tmp_path / "missing" / "sock"))
        assert got["errno"] == errno.ENOENT
        nursery.cancel_scope.cancel()


async def test_supervisor_ends_when_sliver_goes(tmp_path: Path, slivers: Any) -> None:
    guard = make_guard(tmp_path)
    a = slivers("a")
    send, recv = trio.open_memory_channel[tuple[str, int]](1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_guard, guard, recv)
            await send.send((a.name, os.dup(a.listener)))
            await send.aclose()
            await trio.sleep(0.1)
            assert a.name in guard.listening
            os.close(a.listener)
            a.kill()
    assert a.name not in guard.listening  # the task saw POLLHUP and returned


async def test_hostile_binds_answered_as_the_kernel_would(tmp_path: Path, slivers: Any) -> None:
    """Bad fds, pointers, lengths and families: the guard gives the kernel's own errno
    (compared with the same calls made without the filter) and keeps running."""
    guard = make_guard(tmp_path)
    a = slivers("a")
    namespace: dict[str, Any] = {}
    exec(HOSTILE, namespace)
    unguarded = namespace["hostile_binds"]()
    async with trio.open_nursery() as nursery:
        await start(nursery, guard, a)
        guarded = (await a.acall(op="hostile"))["errnos"]
        # again, now that the fast path knows the keys of the binds that succeeded
        fast = guard.stats.fast
        again = (await a.acall(op="hostile"))["errnos"]
        assert guard.stats.fast > fast
        assert (await a.acall(op="bind", host="127.0.0.1", port=0))["errno"] == 0  # still up
        nursery.cancel_scope.cancel()
    print("hostile", guarded)
    assert guarded == unguarded
    assert again == unguarded
    assert errno.EBADF in guarded and errno.EFAULT in guarded and errno.ENOTSOCK in guarded
    assert guard.stats.errors == 0


SLOW_SUPERVISOR = r"""
import os, sys, time, trio
sys.path.insert(0, sys.argv[1])
from agent.guard import Guard, PortService, PortStore
from agent.ports import PortTable, read_ephemeral_range
mode, name, fd, port = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]

class Stuck(Guard):
    # "before": stuck before doing anything; "after": the bind is done, the reply not.
    def handle_now(self, slice_name, listener, n, redo=False):
        if mode == "before":
            print("stuck", flush=True)
            time.sleep(3600)
        return super().handle_now(slice_name, listener, n, redo)

    def _reply(self, slice_name, listener, n, out):
        print("stuck", flush=True)
        time.sleep(3600)

guard = Stuck(PortService(PortTable([], read_ephemeral_range())), sys.argv[6])
guard.ports.reserve(name, f"tcp:{port}")
trio.run(guard.supervise, name, fd)
"""


@pytest.mark.parametrize("mode", ["before", "after", "v1-journal"])
async def test_kill_supervisor_during_bind(tmp_path: Path, slivers: Any, mode: str) -> None:
    """kill -9 of the supervisor while it holds a bind ("after": it had bound already):
    a new supervisor takes the listener from the "init" and the bind completes.
    "v1-journal": as "before", the journal rewritten in the earlier agents' format
    (id, pid, nr, args; an agent upgrade across a restart) is still redone."""
    a = slivers("a")
    port = free_ports(1)[0]
    run_dir = tmp_path / "guard"
    fd = os.dup(a.listener)
    old_mode = "before" if mode == "v1-journal" else mode
    old = subprocess.Popen([sys.executable, "-c", SLOW_SUPERVISOR, str(ROOT), old_mode, a.name,
                            str(fd), str(port), str(run_dir)],
                           pass_fds=(fd,), stdout=subprocess.PIPE, text=True)
    os.close(fd)
    try:
        async with trio.open_nursery() as nursery:
            result: dict[str, Any] = {}

            async def bind() -> None:
                result.update(await a.acall(op="bind", host="127.0.0.1", port=port))

            nursery.start_soon(bind)
            assert old.stdout is not None
            line = await trio.to_thread.run_sync(old.stdout.readline)
            assert line.strip() == "stuck"
            old.send_signal(signal.SIGKILL)
            old.wait()
            assert not result  # the caller still waits: it is not failed with ENOSYS
            if mode == "v1-journal":
                from agent.guard import JOURNAL_V1
                from kernel.seccomp import Notification
                journal = run_dir / f"{a.name}.inflight"
                n = Notification.unpack(journal.read_bytes())
                assert n.nr == 49 and n.id != 0  # bind, journaled before it was handled
                journal.write_bytes(JOURNAL_V1.pack(n.id, n.pid, n.nr, *n.args))
            guard = make_guard(tmp_path)
            guard.ports.reserve(a.name, f"tcp:{port}")
            await nursery.start(guard.supervise, a.name, listener_of(a.proc.pid))
            with trio.fail_after(10):
                while not result:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
    assert result["errno"] == 0 and result["name"] == ["127.0.0.1", port], result


async def test_releasing_frees_ports(tmp_path: Path, slivers: Any) -> None:
    guard = make_guard(tmp_path)
    a, b = slivers("a"), slivers("b")
    port = free_ports(1)[0]
    guard.ports.reserve(a.name, f"udp:{port}")
    async with trio.open_nursery() as nursery:
        await start(nursery, guard, a, b)
        got = await a.acall(op="bind", host="127.0.0.1", port=port, type="SOCK_DGRAM")
        assert got["errno"] == 0
        await a.acall(op="close", fd=got["fd"])
        assert (await b.acall(op="bind", host="127.0.0.1", port=port, type="SOCK_DGRAM"))[
            "errno"] == errno.EADDRINUSE
        guard.release_sliver(a.name)
        assert (await b.acall(op="bind", host="127.0.0.1", port=port, type="SOCK_DGRAM"))[
            "errno"] == errno.EACCES
        guard.ports.reserve(b.name, f"udp:{port}")
        assert (await b.acall(op="bind", host="127.0.0.1", port=port, type="SOCK_DGRAM"))[
            "errno"] == 0
        nursery.cancel_scope.cancel()
    assert guard.ports.table.holdings(a.name) == []


def test_state_store_round_trip(tmp_path: Path) -> None:
    from agent.guard import StatePortStore
    from agent.state import State
    with State.open(tmp_path) as state:
        svc = PortService(PortTable(["192.0.2.1"], (32768, 60999)), StatePortStore(state))
        svc.reserve("s1", "tcp:8080,udp:5353@192.0.2.1")
        svc.set_tag_ports("s2", "tcp:443")
    with State.open(tmp_path) as state:
        again = PortService(PortTable(["192.0.2.1"], (32768, 60999)), StatePortStore(state))
        assert again.table.entries() == svc.table.entries()
        assert again.table.owner("tcp", "127.0.0.1", 443) == "s2"
        assert PortRange("udp", 5353, 5353, "192.0.2.1") in again.table.holdings("s1")


async def test_guard_service_end_to_end(tmp_path: Path, slivers: Any) -> None:
    """The agent's view: state-backed ports, listener in, API reserve, bind, destroy."""
    from agent.guard import GuardService
    from agent.state import State

    class Caller:
        kind, pid, uid = "sliver", 1, 1

        def __init__(self, name: str) -> None:
            self.name = name

    a = slivers("a")
    port = free_ports(1)[0]
    with State.open(tmp_path / "state") as state:
        svc = GuardService(state, [], tmp_path / "run")
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.serve)
            agent_end, init_end = socket.socketpair()
            with agent_end, init_end:  # as the sliver init sends it
                socket.send_fds(init_end, [b"L"], [a.listener])
                svc.sliver_created(a.name, agent_end)
            assert svc.methods()["ReservePort"](Caller(a.name), f"tcp:{port}") == 1
            assert (await a.acall(op="bind", host="127.0.0.1", port=port))["errno"] == 0
            svc.sliver_destroyed(a.name)
            assert (await a.acall(op="bind", host="127.0.0.1", port=port))["errno"] \
                == errno.EACCES
            nursery.cancel_scope.cancel()
        with state.transaction() as db:
            assert db.execute("SELECT COUNT(*) FROM ports WHERE name=?", (a.name,)).fetchone() \
                == (0,)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "python_only"])
async def test_pidfds_of_exited_threads_are_closed(tmp_path: Path, slivers: Any, fast: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """F22: short-lived threads making one bind each leave the guard's fd count bounded,
    with and without the exit watcher, and the cache never exceeds its global cap.
    With the fast path, all binds but the first are answered in C, which keeps the pidfd
    of its last caller thread only, and closes it once that thread has exited."""
    import agent.guard.pidfds
    guard = make_guard(tmp_path)
    guard.fast.enabled = fast
    a, b = slivers("a"), slivers("b")
    async with trio.open_nursery() as nursery:
        await start(nursery, guard, a, b)
        before = open_fds()
        for s in (a, b):  # no watcher: closed when the next new thread calls
            got = await s.acall(op="threadbinds", count=150)
            assert got == {"errnos": [0], "count": 150}
        # the fast path of each listener may keep a few more until the watcher runs
        from kernel.guardfast import PIDFDS_KEPT
        bound = 8 + (2 * PIDFDS_KEPT if fast else 0)
        assert open_fds() - before < bound, (before, open_fds())
        nursery.start_soon(guard.watch_exits)  # with it: closed once the thread exits
        await a.acall(op="threadbinds", count=20)
        with trio.fail_after(10):
            while open_fds() > before:
                await trio.sleep(0.02)
        assert guard.pidfds.cached == {}
        if fast:
            assert guard.stats.fast >= 2 * 150 + 20 - 2, guard.stats
            nursery.cancel_scope.cancel()
            return
        # the cap is for the whole guard: live callers beyond it are evicted LRU
        monkeypatch.setattr(agent.guard.pidfds, "PIDFD_CACHE", 1)
        for s in (a, b, a):
            assert (await s.acall(op="bind", host="127.0.0.1", port=0))["errno"] == 0
            assert list(guard.pidfds.cached) == [(s.name, s.proc.pid)]
        nursery.cancel_scope.cancel()


async def test_revoked_ports_close_the_old_owners_sockets(tmp_path: Path, slivers: Any) -> None:
    """F20: a port taken from a slice (a tag overriding its reservation, ReleasePort)
    closes its sockets there: its TCP listener's accept fails, its UDP socket is
    aborted, its MPTCP listener is shut. Sockets of other uids on the port stay."""
    first = 100_000_000 + os.getpid() * 4  # uids no other test run uses
    uids = {f"a{os.getpid()}": (first, 2), f"b{os.getpid()}": (first + 2, 2)}
    table = PortTable([], read_ephemeral_range())
    guard = Guard(PortService(table, PortStore()), tmp_path / "guard", uids.get)
    a, b = slivers("a", first + 1), slivers("b", first + 2)
    tcp, udp, last, mptcp = free_ports(4)
    guard.ports.reserve(a.name, f"tcp:{tcp},udp:{udp},tcp:{last},tcp:{mptcp}")
    host = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)  # uid 0, same UDP port
    host.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    host.bind(("::1", udp))
    async with trio.open_nursery() as nursery:
        await start(nursery, guard, a, b)
        listener = await a.acall(op="bind", host="127.0.0.1", port=tcp)
        dgram = await a.acall(op="bind", host="0.0.0.0", port=udp, type="SOCK_DGRAM")
        assert listener["errno"] == 0 and dgram["errno"] == 0
        await a.acall(op="listen", fd=listener["fd"])
        guard.ports.set_tag_ports(b.name, f"tcp:{tcp}")  # PLC's tag takes the port
        assert guard.ports.table.owner("tcp", "127.0.0.1", tcp) == b.name
        got = await a.acall(op="accept", fd=listener["fd"], timeout=2)
        assert got["errno"] == errno.EINVAL, got
        # An explicitly bound socket keeps its port while an fd refers to it (the
        # kernel's SOCK_BINDPORT_LOCK), reset or not: free once A closes it.
        got = await b.acall(op="bind", host="127.0.0.1", port=tcp)
        assert got["errno"] == errno.EADDRINUSE, got
        await a.acall(op="close", fd=listener["fd"])
        assert (await b.acall(op="bind", host="127.0.0.1", port=tcp))["errno"] == 0
        guard.ports.release(a.name, f"udp:{udp}")
        got = await a.acall(op="recv", fd=dgram["fd"], timeout=2)
        assert got["errno"] == errno.ECONNABORTED, got
        await guard.revocations_settled()   # done in a worker thread (F32)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"after", ("127.0.0.1", udp))  # and it hears nothing more
        got = await a.acall(op="recv", fd=dgram["fd"], timeout=0.5)
        assert got["errno"] == "timeout", got
        host.settimeout(0.2)  # the host's socket on that port was left alone
        with pytest.raises(socket.timeout):
            host.recv(16)
        # An MPTCP listener: the kernel refuses SOCK_DESTROY on its listening subflow
        # (EINVAL), so the guard shuts the MPTCP socket through a holder's fd.
        # A TCP listener on another address of that port comes after it in the dump:
        # the MPTCP one's refusal must not spare it.
        mp = await a.acall(op="bind", host="127.0.0.1", port=mptcp, proto=262)
        tl = await a.acall(op="bind", host="127.0.0.2", port=mptcp)
        assert mp["errno"] == 0 and tl["errno"] == 0, (mp, tl)
        await a.acall(op="listen", fd=mp["fd"])
        await a.acall(op="listen", fd=tl["fd"])
        guard.ports.release(a.name, f"tcp:{mptcp}")
        await guard.revocations_settled()
        for fd, addr in ((mp["fd"], "127.0.0.1"), (tl["fd"], "127.0.0.2")):
            got = await a.acall(op="accept", fd=fd, timeout=2)
            assert got["errno"] == errno.EINVAL, (addr, got)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((addr, mptcp), timeout=2).close()
        third = await a.acall(op="bind", host="::", port=last)  # wildcard, both families
        assert third["errno"] == 0
        await a.acall(op="listen", fd=third["fd"])
        guard.release_sliver(a.name)  # the sliver destroyed
        got = await a.acall(op="accept", fd=third["fd"], timeout=2)
        assert got["errno"] == errno.EINVAL, got
        nursery.cancel_scope.cancel()
    host.close()


def test_guard_service_finds_slice_uids_in_state(tmp_path: Path) -> None:
    """The default uid_range of GuardService: the state's index, the default pool."""
    from agent.config import defaults
    from agent.guard import GuardService
    from agent.state import State
    cfg = defaults()
    with State.open(tmp_path / "state") as state:
        idx = state.allocate_uid_range("s1", 8)
        svc = GuardService(state, [], tmp_path / "run", ephemeral=(32768, 60999))
        assert svc.guard.uid_range is not None
        assert svc.guard.uid_range("s1") == (
            cfg.uid_pool_start + idx * cfg.uid_range_size, cfg.uid_range_size)
        assert svc.guard.uid_range("nobody") is None


def test_one_turn_answers_at_most_a_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sliver that keeps known-key binds and other requests queued without pause gets
    at most BATCH notifications answered per scheduler turn of its listener, whether
    the C fast path or Python answers them (the agent's loop keeps its turn)."""
    import agent.guard
    from kernel import guardfast, seccomp

    per_turn: list[int] = [0]

    class QueueFullOfBinds:   # the fast path's interface, always with more pending
        def __init__(self, listener: int, out: bytearray, slot: Any, exits: int) -> None:
            self.out = out

        def run(self, budget: int) -> guardfast.RunResult:
            self.out[:] = seccomp.NOTIF.pack(1, os.getpid(), 0, 999, seccomp.AUDIT_ARCH_X86_64,
                                             0, 0, 0, 0, 0, 0, 0)
            per_turn[-1] += budget   # budget - 1 answered in C, one handed back
            return guardfast.RunResult(guardfast.PYTHON, budget - 1)

        def forget(self) -> None: ...
        def refused(self) -> int: return 0
        def close(self) -> None: ...
        def drop_pidfd(self, pidfd: int) -> bool: return False

    class Enough(Exception):
        pass

    real_checkpoint = trio.lowlevel.checkpoint

    async def checkpoint() -> None:   # the end of a turn
        if len(per_turn) >= 3:
            raise Enough
        per_turn.append(0)
        await real_checkpoint()

    monkeypatch.setattr(guardfast, "FastPath", QueueFullOfBinds)
    monkeypatch.setattr(seccomp, "set_sync_wake_up", lambda fd: None)
    monkeypatch.setattr(Guard, "_reply", lambda self, *a: None)
    guard = make_guard(tmp_path)
    guard.fast.enabled = True
    r, w = os.pipe()
    os.write(w, b"x")   # always readable
    try:
        async def main() -> None:
            monkeypatch.setattr(trio.lowlevel, "checkpoint", checkpoint)
            with pytest.raises(Enough):
                await guard.supervise("s", r)   # closes r
        trio.run(main)
    finally:
        os.close(w)
    assert len(per_turn) == 3, per_turn
    assert max(per_turn) == agent.guard.BATCH, per_turn


async def test_abstract_unix_names_only_under_the_slice_prefix(tmp_path: Path,
                                                               slivers: Any) -> None:
    """F35: a sliver binds abstract Unix names under "\\0pl/<slice>/" only (stream,
    datagram, seqpacket); elsewhere EPERM, so it cannot squat a host service's name
    (X11's) and receive the host's clients. Autobind stays allowed."""
    guard = make_guard(tmp_path)
    a, b = slivers("a"), slivers("b")
    x11 = f"@/tmp/.X11-unix/X{os.getpid()}"
    async with trio.open_nursery() as nursery:
        await start(nursery, guard, a, b)
        for kind in ("SOCK_STREAM", "SOCK_DGRAM", "SOCK_SEQPACKET"):
            mine = f"@pl/{a.name}/{kind}"
            got = await a.acall(op="unix", path=mine, type=kind)
            assert got["errno"] == 0 and f"pl/{a.name}/{kind}" in got["name"], (kind, got)
            for name in (x11, f"@pl/{b.name}/{kind}", f"@pl/{a.name}", f"@pl/{a.name}x/",
                         f"@other-{kind}"):
                got = await a.acall(op="unix", path=name, type=kind)
                assert got["errno"] == errno.EPERM, (kind, name, got)
            got = await a.acall(op="unix", path="", type=kind)   # autobind: addrlen 2
            assert got["errno"] == 0 and got["name"].startswith("b'\\x00"), (kind, got)
        # B may bind its own names; and the X11 name stays free for the host.
        assert (await b.acall(op="unix", path=f"@pl/{b.name}/x"))["errno"] == 0
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
            host.bind(x11.replace("@", "\0", 1))
        nursery.cancel_scope.cancel()


async def test_revocations_in_flight_follow_the_current_table(tmp_path: Path,
                                                              slivers: Any) -> None:
    """F32: revocations are queued and done in a worker thread, in order; one that
    starts after the slice reserved the port again leaves its socket alone, and two
    releases in flight both take effect."""
    first = 100_000_000 + os.getpid() * 4 + 2
    table = PortTable([], read_ephemeral_range())
    a = slivers("a", first)
    guard = Guard(PortService(table, PortStore()), tmp_path / "guard",
                  {a.name: (first, 2)}.get)
    p1, p2, p3 = free_ports(3)
    guard.ports.reserve(a.name, f"udp:{p1},udp:{p2},udp:{p3}")
    async with trio.open_nursery() as nursery:
        await nursery.start(guard.supervise, a.name, os.dup(a.listener))
        socks = {}
        for p in (p1, p2, p3):
            got = await a.acall(op="bind", host="127.0.0.1", port=p, type="SOCK_DGRAM")
            assert got["errno"] == 0
            socks[p] = got["fd"]
        # three changes before any revocation runs (no revoker yet): two releases,
        # and p3 released and reserved again
        guard.ports.release(a.name, f"udp:{p1}")
        guard.ports.release(a.name, f"udp:{p2}")
        guard.ports.release(a.name, f"udp:{p3}")
        guard.ports.reserve(a.name, f"udp:{p3}")
        await nursery.start(guard.revoker)
        with trio.fail_after(10):
            await guard.revocations_settled()
        for p in (p1, p2):
            got = await a.acall(op="recv", fd=socks[p], timeout=1)
            assert got["errno"] == errno.ECONNABORTED, (p, got)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"still", ("127.0.0.1", p3))
        got = await a.acall(op="recv", fd=socks[p3], timeout=2)
        assert got["errno"] == 0, got   # p3 is a's again: its socket was left alone
        assert guard.stats.deafened == 2, guard.stats
        nursery.cancel_scope.cancel()


def test_unbound_netlink_socket_gets_a_random_id_never_the_agents_pid(tmp_path: Path) -> None:
    """A sliver whose sockd predates F43 hands the guard unbound netlink sockets. Their
    bind gets a random id of the kernel's fallback range, whatever nl_pid is named:
    never the named one, and never the agent's pid (a plain autobind done by the agent
    would take it and tell the sliver). A bound socket keeps its id."""
    import struct

    from agent.guard.decide import Outcome
    from kernel.packet import NETLINK_RANDOM_IDS
    from kernel.seccomp import Notification

    guard = make_guard(tmp_path)
    info = (socket.AF_NETLINK, socket.SOCK_RAW, 0)
    note = Notification(1, os.getpid(), 0, 49, 0, 0, (0, 0, 12, 0, 0, 0))
    named = (os.getpid() & 0x3FFFFF) | (33 << 22)
    seen = set()
    for ask in (0, os.getpid(), named):   # (a group goes through guard-bindas: e2e)
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:
            raw = struct.pack("<HHII", socket.AF_NETLINK, 0, ask, 0)
            got = guard._bind_socket("a", -1, note, s.fileno(), info, raw, False)
            assert got == Outcome(0, "netlink")
            port = s.getsockname()[0]
            assert NETLINK_RANDOM_IDS[0] <= port < NETLINK_RANDOM_IDS[1], hex(port)
            seen.add(port)
            # bound now: a second bind naming another id keeps this one (the kernel's
            # check passes), and nothing rebinds it
            again = struct.pack("<HHII", socket.AF_NETLINK, 0, named, 0)
            assert guard._bind_socket("a", -1, note, s.fileno(), info, again,
                                      False) == Outcome(0, "netlink")
            assert s.getsockname()[0] == port
    assert len(seen) == 3
