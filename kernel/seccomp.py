"""seccomp(2) filters and user notification, as thin wrappers over the kernel ABI.

The filter is assembled here as raw `struct sock_filter[]` bytes so that a C sliver
init can install exactly the same program (it only needs the bytes, see
docs/guard.md). The notification structures mirror <linux/seccomp.h>:

    struct seccomp_data        { int nr; __u32 arch; __u64 ip; __u64 args[6]; }  64 bytes
    struct seccomp_notif       { __u64 id; __u32 pid; __u32 flags; seccomp_data }  80 bytes
    struct seccomp_notif_resp  { __u64 id; __s64 val; __s32 error; __u32 flags; }  24 bytes
    struct seccomp_notif_addfd { __u64 id; __u32 flags, srcfd, newfd, newfd_flags; } 24

No policy lives here: which syscalls are guarded is the caller's choice (see
`guard_filter`, the program the agent uses).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import os
import struct
from collections.abc import Iterable
from typing import NamedTuple

from kernel.cbpf import ALU_AND_K, JEQ_K, JGE_K, JSET_K, Asm, fprog
from kernel.libc import (
    LIBC,
    NR_ADD_KEY,
    NR_BIND,
    NR_CLONE,
    NR_CLONE3,
    NR_IO_URING_ENTER,
    NR_IO_URING_REGISTER,
    NR_IO_URING_SETUP,
    NR_KEYCTL,
    NR_REQUEST_KEY,
    NR_SECCOMP,
    NR_SETSOCKOPT,
    NR_SOCKET,
    NR_SOCKETPAIR,
    NR_UNSHARE,
    NR_USTAT,
    PR_SET_NO_NEW_PRIVS,
    check,
)

CLONE_NEWUSER = 0x10000000
X32_SYSCALL_BIT = 0x40000000

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003

# seccomp(2) operations and flags.
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1 << 0
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3

# Filter return values (upper 16 bits action, lower 16 data).
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ALLOW = 0x7FFF0000

# Ioctls on the listener: _IOWR('!', 0, seccomp_notif) and friends.
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103
# Missing from Debian 12's headers; the flag is passed by value, not by pointer.
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x40082104
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SETFD = 1
SECCOMP_ADDFD_FLAG_SEND = 2

# Offsets in struct seccomp_data (little endian: low word of an argument first).
DATA_NR = 0
DATA_ARCH = 4


def data_arg_lo(index: int) -> int:
    """Offset of the low 32 bits of syscall argument `index` in seccomp_data."""
    if not 0 <= index < 6:
        raise ValueError(f"seccomp_data has arguments 0..5, not {index}")
    return 16 + 8 * index


NOTIF = struct.Struct("<QIIiIQ6Q")
NOTIF_RESP = struct.Struct("<QqiI")
NOTIF_ADDFD = struct.Struct("<QIIII")
assert NOTIF.size == 80 and NOTIF_RESP.size == 24 and NOTIF_ADDFD.size == 24


def errno_ret(err: int) -> int:
    """The filter return value that fails a syscall with `err`."""
    return SECCOMP_RET_ERRNO | (err & 0xFFFF)


# Socket families a sliver may create (docs/guard.md). Everything else fails with
# EAFNOSUPPORT: AF_VSOCK is not network-namespaced (it reaches the hypervisor), and
# other families would sit outside the port table.
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET = 1, 2, 10, 16, 17
NETLINK_ROUTE = 0
ALLOWED_SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)
SOL_PACKET = 263


def _socket_block(a: Asm, eperm: int, sockd: bool = False) -> None:
    """socket(domain, type, protocol), A holding nr == socket: an allowlist of
    families (F12). AF_PACKET, raw/packet-type and SCTP IP sockets: EPERM; netlink
    other than NETLINK_ROUTE: EPROTONOSUPPORT (what the kernel says for a netlink
    protocol it lacks); any other family: EAFNOSUPPORT. With `sockd`, the IP and
    netlink sockets allowed are notified (the supervisor has the sliver's sockd make
    them in the node's network namespace, F38); AF_UNIX ones are made by the caller."""
    allow, inet, netlink, refuse = "s_allow", "s_inet", "s_netlink", "s_eperm"
    made = "s_sockd" if sockd else allow
    a.ld(data_arg_lo(0))                                  # domain
    a.op(JEQ_K, AF_UNIX, allow, 0)
    a.op(JEQ_K, AF_INET, inet, 0)
    a.op(JEQ_K, AF_INET6, inet, 0)
    a.op(JEQ_K, AF_NETLINK, netlink, 0)
    a.op(JEQ_K, AF_PACKET, refuse, 0)
    a.ret(errno_ret(_errno.EAFNOSUPPORT))
    a.label(netlink)
    a.ld(data_arg_lo(2))                                  # protocol
    a.op(JEQ_K, NETLINK_ROUTE, made, 0)
    a.ret(errno_ret(_errno.EPROTONOSUPPORT))
    a.label(inet)
    a.ld(data_arg_lo(2))                                  # protocol
    a.op(JEQ_K, 132, refuse, 0)                           # IPPROTO_SCTP
    a.ld(data_arg_lo(1))                     # type (with SOCK_NONBLOCK|SOCK_CLOEXEC)
    a.op(ALU_AND_K, 0xF)                                  # SOCK_TYPE_MASK
    a.op(JEQ_K, 3, refuse, 0)                             # SOCK_RAW
    a.op(JEQ_K, 10, refuse, made)                         # SOCK_PACKET
    a.label(refuse)
    a.ret(eperm)
    if sockd:
        a.label(made)
        a.ret(SECCOMP_RET_USER_NOTIF)
    a.label(allow)
    a.ret(SECCOMP_RET_ALLOW)


def guard_filter(
    notify: Iterable[int] = (NR_BIND,),
    refuse: Iterable[tuple[int, int]] = (
        (NR_IO_URING_SETUP, _errno.EPERM),
        (NR_IO_URING_ENTER, _errno.EPERM),
        (NR_IO_URING_REGISTER, _errno.EPERM),
        (NR_ADD_KEY, _errno.ENOSYS),
        (NR_REQUEST_KEY, _errno.ENOSYS),
        (NR_KEYCTL, _errno.ENOSYS),
        (NR_USTAT, _errno.ENOSYS),
    ),
    guard_sockets: bool = True,
    refuse_userns: bool = True,
    sockd: bool = False,
) -> bytes:
    """The sliver guard program.

    In order:
    1. any architecture but native x86-64 (i386 by `int 0x80`) fails with ENOSYS;
    2. x32 syscall numbers (bit 30 set) fail with EPERM (this kernel has no x32 ABI
       and would say ENOSYS itself: EPERM shows the filter refused them);
    3. syscalls in `notify` go to the supervisor (user notification);
    4. syscalls in `refuse` fail with the given errno: by default io_uring (its
       SOCKET and BIND operations would bypass this filter), EPERM, and the kernel
       keyring calls (keys are charged to host uids, not to the sliver's memory
       cgroup: a sliver switching among its 65536 uids could pin gigabytes of kernel
       memory), ENOSYS: "no keyrings here", which pam_keyinit and the like accept;
       and ustat(2), ENOSYS (glibc dropped it; it would report the store's free
       space where statfs, answered by the guard, shows the sliver's disk_max);
    5. socket(): only AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK (NETLINK_ROUTE
       only); AF_PACKET, and AF_INET/AF_INET6 with SOCK_RAW or SOCK_PACKET or
       IPPROTO_SCTP (it binds through setsockopt, which this filter does not
       inspect) fail with EPERM, decided from registers alone; other netlink
       protocols EPROTONOSUPPORT; other families EAFNOSUPPORT (`_socket_block`);
       socketpair() only for AF_UNIX; with `sockd`, the IP and NETLINK_ROUTE
       sockets it allows are notified instead (F38, kernel/native/sockd.h);
       setsockopt() at level SOL_PACKET fails with EPERM (no packet socket should
       ever reach a sliver; if one did, PACKET_QDISC_BYPASS would skip the shaper's
       qdisc, docs/bandwidth.md);
    6. with `refuse_userns`: no nested user namespace, whose owner would regain
       every capability the bounding set dropped (mount, netns admin, tc; F39).
       clone() and unshare() with CLONE_NEWUSER in their flags (argument 0, read
       from the register) fail with EPERM; clone3() passes its flags in memory,
       which a filter cannot read, so it fails with ENOSYS and libc falls back to
       clone() (as container runtimes do). i386 is refused whole by step 1;
    7. everything else is allowed.
    """
    notify = sorted(set(notify))
    refuse = sorted(set(refuse))
    enosys = errno_ret(_errno.ENOSYS)
    eperm = errno_ret(_errno.EPERM)
    a = Asm()
    a.ld(DATA_ARCH)
    a.op(JEQ_K, AUDIT_ARCH_X86_64, 1, 0)
    a.ret(enosys)
    a.ld(DATA_NR)
    a.op(JGE_K, X32_SYSCALL_BIT, 0, 1)
    a.ret(eperm)
    for nr in notify:
        a.op(JEQ_K, nr, 0, 1)
        a.ret(SECCOMP_RET_USER_NOTIF)
    for nr, err in refuse:
        a.op(JEQ_K, nr, 0, 1)
        a.ret(errno_ret(err))
    if refuse_userns:
        # A holds nr; the flag check loads argument 0, so nr is loaded again after.
        a.op(JEQ_K, NR_CLONE3, 0, 1)
        a.ret(enosys)
        a.op(JEQ_K, NR_CLONE, "u_flags", 0)
        a.op(JEQ_K, NR_UNSHARE, "u_flags", "u_done")
        a.label("u_flags")
        a.ld(data_arg_lo(0))
        a.op(JSET_K, CLONE_NEWUSER, 0, "u_reload")
        a.ret(eperm)
        a.label("u_reload")
        a.ld(DATA_NR)
        a.label("u_done")
    if guard_sockets:
        # A holds nr.
        a.op(JEQ_K, NR_SETSOCKOPT, 0, "not_setsockopt")
        a.ld(data_arg_lo(1))                              # level
        a.op(JEQ_K, SOL_PACKET, 0, "other")
        a.ret(eperm)
        a.label("not_setsockopt")
        a.op(JEQ_K, NR_SOCKET, "socket", 0)
        a.op(JEQ_K, NR_SOCKETPAIR, 0, "other")
        a.ld(data_arg_lo(0))
        a.op(JEQ_K, AF_UNIX, "other", 0)
        a.ret(errno_ret(_errno.EAFNOSUPPORT))
        a.label("socket")
        _socket_block(a, eperm, sockd)
        a.label("other")
    a.ret(SECCOMP_RET_ALLOW)
    return a.assemble()


def install(filter_bytes: bytes, flags: int = SECCOMP_FILTER_FLAG_NEW_LISTENER) -> int:
    """Set no_new_privs and install `filter_bytes` on the calling thread.

    With SECCOMP_FILTER_FLAG_NEW_LISTENER (the default) returns the listener fd,
    otherwise 0. Irreversible for this process and every child it creates.
    """
    prog, buf = fprog(filter_bytes)
    check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    prog_buf = ctypes.create_string_buffer(prog, len(prog))
    ret = LIBC.syscall(
        ctypes.c_long(NR_SECCOMP), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(flags), prog_buf,
    )
    del buf  # the filter's bytes had to live until the syscall copied them
    return check(ret, "seccomp(SECCOMP_SET_MODE_FILTER)")


class Notification(NamedTuple):
    """One `struct seccomp_notif` as received from the listener (a tuple: cheap to
    build on the guard's per-notification path)."""

    id: int
    pid: int
    flags: int
    nr: int
    arch: int
    instruction_pointer: int
    args: tuple[int, ...]

    @classmethod
    def unpack(cls, raw: bytes | bytearray) -> Notification:
        v = NOTIF.unpack_from(raw)
        return _tuple_new(cls, (v[0], v[1], v[2], v[3], v[4], v[5], v[6:]))


# tuple.__new__ straight: the NamedTuple's generated __new__ is a Python-level call.
_tuple_new = tuple.__new__
_NOTIF_ZERO = bytes(NOTIF.size)
_U64 = struct.Struct("<Q")


class ListenerIO:
    """RECV and SEND on one listener through preallocated buffers (the guard's
    per-notification path: no buffer is allocated per call).

    `raw` holds the last `struct seccomp_notif` received, exactly as the kernel wrote
    it (the guard journals these bytes). Not for concurrent use.
    """

    __slots__ = ("fd", "raw", "_resp")

    def __init__(self, listener: int) -> None:
        self.fd = listener
        self.raw = bytearray(NOTIF.size)
        self._resp = bytearray(NOTIF_RESP.size)

    def recv(self) -> Notification:
        """As `notif_recv` (the same blocking caveat)."""
        raw = self.raw
        raw[:] = _NOTIF_ZERO  # the kernel refuses a struct that is not zeroed (EINVAL)
        fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_RECV, raw, True)
        v = NOTIF.unpack_from(raw)
        return _tuple_new(Notification, (v[0], v[1], v[2], v[3], v[4], v[5], v[6:]))

    def send(self, nid: int, error: int = 0) -> None:
        """As `notif_send(listener, nid, 0, error)`."""
        if error < 0:
            raise ValueError(f"errno must be positive, not {error}")
        NOTIF_RESP.pack_into(self._resp, 0, nid, 0, -error, 0)
        fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_SEND, self._resp, False)


def notif_recv(listener: int) -> Notification:
    """SECCOMP_IOCTL_NOTIF_RECV. Raises OSError(ENOENT) if the caller went away.

    The ioctl blocks until a notification is pending whatever O_NONBLOCK says, so
    call it only after the listener polled readable.
    """
    buf = bytearray(NOTIF.size)
    fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
    return Notification.unpack(buf)


def notif_send(listener: int, nid: int, val: int = 0, error: int = 0, flags: int = 0) -> None:
    """SECCOMP_IOCTL_NOTIF_SEND: the syscall returns `val`, or fails with `error`.

    `error` is a positive errno here (the kernel wants it negated); 0 means success.
    Raises OSError(ENOENT) if the caller is gone or was interrupted.
    """
    if error < 0:
        raise ValueError(f"errno must be positive, not {error}")
    fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, NOTIF_RESP.pack(nid, val, -error, flags),
                False)


def notif_continue(listener: int, nid: int) -> None:
    """Let the syscall run as is. Only for decisions made from registers alone."""
    notif_send(listener, nid, flags=SECCOMP_USER_NOTIF_FLAG_CONTINUE)


def notif_id_valid(listener: int, nid: int) -> bool:
    """SECCOMP_IOCTL_NOTIF_ID_VALID: is the caller still waiting on `nid`?"""
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, _U64.pack(nid))
    except OSError as exc:
        if exc.errno == _errno.ENOENT:
            return False
        raise
    return True


def notif_addfd(listener: int, nid: int, srcfd: int, newfd: int = 0, send: bool = False,
                cloexec: bool = False) -> int:
    """SECCOMP_IOCTL_NOTIF_ADDFD: install `srcfd` in the caller, returning its number.

    With `send`, the number is also the syscall's return value, atomically.
    """
    flags = (SECCOMP_ADDFD_FLAG_SETFD if newfd else 0) | (SECCOMP_ADDFD_FLAG_SEND if send else 0)
    newfd_flags = os.O_CLOEXEC if cloexec else 0
    # A mutable buffer makes fcntl.ioctl return the ioctl's result (the fd number).
    arg = bytearray(NOTIF_ADDFD.pack(nid, flags, srcfd, newfd, newfd_flags))
    return fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, arg, True)


def set_sync_wake_up(listener: int) -> None:
    """SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: wake the supervisor on the caller's CPU.

    Saves the cost of waking an idle CPU (about 43 -> 5 us a notification here).
    """
    check(LIBC.ioctl(ctypes.c_int(listener), ctypes.c_ulong(SECCOMP_IOCTL_NOTIF_SET_FLAGS),
                       ctypes.c_ulong(SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)),
           "ioctl(SECCOMP_IOCTL_NOTIF_SET_FLAGS)", listener)
