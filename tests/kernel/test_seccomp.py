"""kernel/seccomp.py on the real kernel: the guard filter's verdicts and the
notification ioctls. Children run as node root, so a refusal can only come from
the filter (each test also shows the same call working without it)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kernel import seccomp

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "kernel" / "bin" / "guard-probe"

UNDER_FILTER = r"""
import ctypes, json, os, socket, sys
sys.path.insert(0, sys.argv[1])
from kernel import seccomp
listener = seccomp.install(seccomp.guard_filter())
if len(sys.argv) > 3:
    socket.send_fds(socket.socket(fileno=int(sys.argv[3])), [b"L"], [listener])
os.close(listener)   # without a supervisor, a notified syscall fails with ENOSYS
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {}
exec(sys.argv[2])
print(json.dumps(out))
"""


def under_filter(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", UNDER_FILTER, str(ROOT), code],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def probe_lines(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


@pytest.fixture(scope="module")
def probe() -> Path:
    if not PROBE.exists():
        subprocess.run(["gcc", "-O2", "-static", "-o", str(PROBE),
                        str(ROOT / "kernel" / "native" / "guard-probe.c")], check=True)
    return PROBE


def test_i386_and_x32_syscalls_refused(probe: Path) -> None:
    outside = probe_lines(subprocess.run([probe], capture_output=True, text=True).stdout)
    assert outside["i386_getpid"] > 0  # IA-32 emulation is on: only the filter stops it
    got = under_filter(
        f"import subprocess; out.update(line.split() for line in subprocess.run("
        f"[{str(probe)!r}], capture_output=True, text=True).stdout.splitlines())")
    got = {k: int(v) for k, v in got.items()}
    assert got["i386_getpid"] == -errno.ENOSYS
    assert got["x32_getpid"] == -errno.EPERM     # the kernel alone would say ENOSYS
    assert got["native_getpid"] > 0


def test_raw_and_packet_sockets_refused_others_allowed() -> None:
    code = r"""
for name, args in [("packet", (17, 3, 0)), ("packet_dgram", (17, 2, 768)),
                   ("raw4", (2, 3 | 0o4000, 1)), ("raw6", (10, 3, 58)), ("sockpacket", (2, 10, 0)),
                   ("sctp", (2, 1, 132)), ("tcp", (2, 1, 0)), ("udp6", (10, 2, 0)),
                   ("netlink_raw", (16, 3, 0)), ("unix", (1, 1, 0)),
                   ("vsock", (40, 1, 0)), ("vsock_seq", (40, 5, 0)), ("ax25", (3, 2, 0)),
                   ("appletalk", (5, 2, 0)), ("can", (29, 3, 1)), ("bluetooth", (31, 1, 3)),
                   ("alg", (38, 5, 0)), ("xdp", (44, 3, 0)), ("tipc", (30, 5, 0)),
                   ("high_bits_vsock", (40 | (1 << 32), 1, 0)),
                   ("netlink_uevent", (16, 2, 15)), ("netlink_diag", (16, 3, 4)),
                   ("netlink_audit", (16, 3, 9)), ("netlink_netfilter", (16, 3, 12))]:
    fd = libc.socket(*args)
    out[name] = 0 if fd >= 0 else ctypes.get_errno()
    if fd >= 0: os.close(fd)
"""
    got = under_filter(code)
    for name in ("packet", "packet_dgram", "raw4", "raw6", "sockpacket", "sctp"):
        assert got[name] == errno.EPERM, (name, got)
    for name in ("tcp", "udp6", "netlink_raw", "unix"):
        assert got[name] == 0, (name, got)
    # F12: an allowlist of families; AF_VSOCK is not network-namespaced.
    for name in ("vsock", "vsock_seq", "ax25", "appletalk", "can", "bluetooth", "alg",
                 "xdp", "tipc", "high_bits_vsock"):
        assert got[name] == errno.EAFNOSUPPORT, (name, got)
    for name in ("netlink_uevent", "netlink_diag", "netlink_audit", "netlink_netfilter"):
        assert got[name] == errno.EPROTONOSUPPORT, (name, got)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP):
        pass  # the same call outside the filter
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4):  # NETLINK_SOCK_DIAG
        pass


def test_socketpair_only_for_unix() -> None:
    got = under_filter(r"""
pair = (ctypes.c_int * 2)()
for name, dom in [("unix", 1), ("inet", 2), ("vsock", 40)]:
    r = libc.socketpair(dom, 1, 0, pair)
    out[name] = 0 if r == 0 else ctypes.get_errno()
    if r == 0: os.close(pair[0]); os.close(pair[1])
""")
    assert got == {"unix": 0, "inet": errno.EAFNOSUPPORT, "vsock": errno.EAFNOSUPPORT}


def test_io_uring_refused_and_ordinary_syscalls_run() -> None:
    # io_uring_setup(1, NULL): EFAULT means it reached the kernel, EPERM the filter.
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(425, 1, None) == -1 and ctypes.get_errno() == errno.EFAULT
    got = under_filter(r"""
out["uring"] = libc.syscall(425, 1, None) == -1 and ctypes.get_errno()
out["getpid"] = os.getpid() > 1
r, w = os.pipe(); os.write(w, b"x"); out["read"] = os.read(r, 1).decode()
out["bind_without_supervisor"] = 0
try:
    socket.socket().bind(("127.0.0.1", 0))
except OSError as e:
    out["bind_without_supervisor"] = e.errno
""")
    assert got == {"uring": errno.EPERM, "getpid": True, "read": "x",
                   "bind_without_supervisor": errno.ENOSYS}


def test_ustat_refused() -> None:
    """ustat(2) would report the store's free space (statfs is the guard's to answer)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(64)
    dev = os.stat("/").st_dev
    # reaches the kernel here (0, or EINVAL for a device no superblock has as its own)
    assert libc.syscall(136, ctypes.c_uint(dev), buf) == 0 or ctypes.get_errno() != errno.ENOSYS
    got = under_filter(f"""
buf = ctypes.create_string_buffer(64)
out["ustat"] = libc.syscall(136, ctypes.c_uint({dev}), buf) == -1 and ctypes.get_errno()
""")
    assert got == {"ustat": errno.ENOSYS}


def test_notification_recv_send_addfd_id_valid() -> None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    code = r"""
import struct
s1 = socket.socket(); s2 = socket.socket()
a = struct.pack("<H", 2) + struct.pack("!H", 9) + bytes(12)
out["first"] = libc.bind(s1.fileno(), a, 16), ctypes.get_errno()
out["second"] = libc.bind(s2.fileno(), a, 16)
"""
    # keep the listener open in the child this time: remove the close
    child = subprocess.Popen(
        [sys.executable, "-c", UNDER_FILTER.replace("os.close(listener)", "pass"), str(ROOT),
         code, str(theirs.fileno())], pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE,
        text=True)
    theirs.close()
    try:
        _, fds, _, _ = socket.recv_fds(mine, 4, 1)
        listener = fds[0]
        seccomp.set_sync_wake_up(listener)
        select.select([listener], [], [], 10)
        n = seccomp.notif_recv(listener)
        assert n.nr == seccomp.NR_BIND and n.pid == child.pid
        assert n.arch == seccomp.AUDIT_ARCH_X86_64 and n.args[2] == 16
        assert seccomp.notif_id_valid(listener, n.id)
        seccomp.notif_send(listener, n.id, error=errno.EACCES)
        assert not seccomp.notif_id_valid(listener, n.id)  # answered
        with pytest.raises(OSError) as exc:
            seccomp.notif_send(listener, n.id, error=errno.EACCES)
        assert exc.value.errno in (errno.ENOENT, errno.EINPROGRESS)  # not twice
        select.select([listener], [], [], 10)
        n2 = seccomp.notif_recv(listener)
        assert n2.id != n.id
        r, w = os.pipe()
        try:
            # ADDFD with SEND: the pipe's read end appears in the child and its number
            # is bind's return value, atomically.
            newfd = seccomp.notif_addfd(listener, n2.id, r, send=True)
            assert newfd > 2
        finally:
            os.close(r)
            os.close(w)
        out = json.loads(child.communicate(timeout=10)[0].splitlines()[-1])
        assert out["first"] == [-1, errno.EACCES]
        assert out["second"] == newfd
        os.close(listener)
    finally:
        child.kill()
        child.wait()
        mine.close()


def test_filter_assembly_checks() -> None:
    prog = seccomp.guard_filter()
    assert len(prog) % 8 == 0 and len(prog) // 8 < 64
    with pytest.raises(ValueError, match="sock_filter"):
        seccomp.install(b"\0" * 7)
    with pytest.raises(ValueError, match="positive"):
        seccomp.notif_send(0, 1, error=-1)
