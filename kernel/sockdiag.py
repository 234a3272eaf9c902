"""The host's TCP and UDP sockets by local port, and closing them: netlink sock_diag.

`find(proto, port)` dumps the sockets (IPv4 and IPv6) whose local port is `port`
(SOCK_DIAG_BY_FAMILY with an inet_diag bytecode filter, so the kernel does the
matching); `destroy(sock)` closes one of them by its identity and cookie
(SOCK_DESTROY: needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY). A destroyed TCP
socket is reset (a listener's accept() then fails with EINVAL, and the port is free
at once); a destroyed UDP socket gets ECONNABORTED and is unhashed (its port free).

The layouts are those of <linux/inet_diag.h> and <linux/netlink.h>; names below
follow the kernel's.

Why hand framing and not pyroute2 (a dependency of the agent): pyroute2 0.9.7's
`DiagSocket` has only `get_sock_stats(family, protocol, states, sport, dport)`. Its
`inet_diag_req` carries no attributes, so no INET_DIAG_REQ_BYTECODE: the kernel
ignores sport/dport of a dump and returns every socket of the protocol, which Python
then parses and filters. It has no SOCK_DESTROY request (the constant only), and its
marshal disables NLMSG_ERROR parsing (`error_type = -1`), so an ack or EPERM would need
framing here anyway. Measured (docs/guard.md, "sock_diag framing"), one `find` of
a TCP port on this node (1540 TCP sockets; median of 15, loaded 2-core VM):
here 8.4 ms, pyroute2 dump + filter 184 ms; with 2000 more listeners 13.4 ms
against 302 ms; importing pyroute2 costs 123 ms, this module 18 ms. The guard calls
`find` at every revocation and hostports at every grant and raw send: the kernel-side
filter is what keeps those calls cheap on a node with many sockets.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Iterable
from typing import NamedTuple

from kernel import cbpf
from kernel.packet import attach_filter

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE, INET_DIAG_BC_S_EQ = 2, 3, 11
ALL_STATES = 0xFFFFFFFF

NLMSGHDR = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
NLATTR = struct.Struct("=HH")  # nla_len, nla_type
# struct inet_diag_sockid: idiag_sport, idiag_dport (network order), idiag_src[4],
# idiag_dst[4] (network order), idiag_if, idiag_cookie[2]
SOCKID = struct.Struct("=2s2s16s16sI8s")
# struct inet_diag_req_v2: sdiag_family, sdiag_protocol, idiag_ext, pad, idiag_states, id
REQ_V2 = struct.Struct("=BBBBI" + SOCKID.format[1:])
# struct inet_diag_msg: idiag_family, idiag_state, idiag_timer, idiag_retrans, id,
# idiag_expires, idiag_rqueue, idiag_wqueue, idiag_uid, idiag_inode
DIAG_MSG = struct.Struct("=BBBB" + SOCKID.format[1:] + "IIIII")
BC_OP = struct.Struct("=BBH")  # struct inet_diag_bc_op: code, yes, no

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


class DiagSocket(NamedTuple):
    """One socket as the dump showed it (enough to name it in SOCK_DESTROY)."""

    family: int
    protocol: int
    state: int
    uid: int
    inode: int
    local: str
    port: int
    sockid: bytes  # the struct inet_diag_sockid as dumped, cookie included

    @property
    def cookie(self) -> int:
        return int.from_bytes(self.sockid[-8:], "little")


class SockDiagError(OSError):
    """A sock_diag request the kernel refused."""


def _port_filter(first: int, last: int) -> bytes:
    """Bytecode: accept iff first <= local port <= last. Each comparison is two ops
    (the second carries the port in `no`); a failed one jumps past the end, which
    rejects (inet_diag_bc_run accepts only when it lands exactly on the end)."""
    if first == last:
        return BC_OP.pack(INET_DIAG_BC_S_EQ, 8, 12) + BC_OP.pack(0, 0, first)
    return BC_OP.pack(INET_DIAG_BC_S_GE, 8, 20) + BC_OP.pack(0, 0, first) + \
        BC_OP.pack(INET_DIAG_BC_S_LE, 8, 12) + BC_OP.pack(0, 0, last)


def _attr(kind: int, payload: bytes) -> bytes:
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, kind) + payload + bytes(-length % 4)


def _message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), kind, flags, seq, 0) + payload


def _open() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                         NETLINK_SOCK_DIAG)
    sock.settimeout(5.0)
    return sock


def _messages(sock: socket.socket, seq: int) -> list[tuple[int, bytes]]:
    """The (type, payload) of every reply to request `seq`, up to DONE or an ack."""
    out: list[tuple[int, bytes]] = []
    while True:
        data = sock.recv(1 << 16)
        off = 0
        while off + NLMSGHDR.size <= len(data):
            length, kind, _, rseq, _ = NLMSGHDR.unpack_from(data, off)
            if length < NLMSGHDR.size:
                raise SockDiagError(errno.EPROTO, f"netlink message of length {length}")
            payload = data[off + NLMSGHDR.size:off + length]
            off += (length + 3) & ~3
            if rseq != seq:
                continue
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                err = -struct.unpack_from("=i", payload)[0]
                if err:
                    raise SockDiagError(err, os.strerror(err))
                out.append((kind, payload))
                return out  # an ack ends a non-dump request
            out.append((kind, payload))


def find(proto: str, port: int, last: int | None = None) -> list[DiagSocket]:
    """Every TCP or UDP socket (IPv4 and IPv6, all states) with local port `port`
    (or in `port`..`last`): one dump per family, whatever the range."""
    if proto not in PROTOCOLS:
        raise ValueError(f"sock_diag: protocol {proto!r} is not one of {sorted(PROTOCOLS)}")
    last = port if last is None else last
    if not 0 < port <= last < 65536:
        raise ValueError(f"sock_diag: bad port range {port!r}-{last!r}")
    found: list[DiagSocket] = []
    with _open() as sock:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            req = REQ_V2.pack(family, PROTOCOLS[proto], 0, 0, ALL_STATES,
                              b"\0\0", b"\0\0", bytes(16), bytes(16), 0, bytes(8))
            req += _attr(INET_DIAG_REQ_BYTECODE, _port_filter(port, last))
            sock.send(_message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, req))
            for kind, payload in _messages(sock, seq):
                if kind != SOCK_DIAG_BY_FAMILY or len(payload) < DIAG_MSG.size:
                    continue
                fam, state, _, _, sport, dport, src, dst, ifindex, cookie, \
                    _, _, _, uid, inode = DIAG_MSG.unpack_from(payload)
                addr = socket.inet_ntop(fam, src[:4] if fam == socket.AF_INET else src)
                sockid = SOCKID.pack(sport, dport, src, dst, ifindex, cookie)
                found.append(DiagSocket(fam, PROTOCOLS[proto], state, uid, inode, addr,
                                        int.from_bytes(sport, "big"), sockid))
    return found


def destroy(target: DiagSocket) -> bool:
    """Close `target` (SOCK_DESTROY). False if it is already gone (ENOENT)."""
    req = REQ_V2.pack(target.family, target.protocol, 0, 0, ALL_STATES,
                      *SOCKID.unpack(target.sockid))
    with _open() as sock:
        sock.send(_message(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 1, req))
        try:
            _messages(sock, 1)
        except SockDiagError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
    return True


DROP_ALL = cbpf.SOCK_FILTER.pack(cbpf.RET_K, 0, 0, 0)
TCP_LISTEN = 10


def stop_listening(fd: int) -> None:
    """shutdown(2) a listening socket `fd` (through a copy: the holder's fd stays open).
    For an MPTCP listener, whose listening subflow SOCK_DESTROY refuses (EINVAL), this
    closes it: connections are refused, accept() fails with EINVAL, and the port stays
    bound until the holders close it, as with a destroyed TCP listener."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def deafen(fd: int) -> None:
    """Make socket `fd` drop every packet it would receive, for good: a classic BPF
    filter "ret 0" attached and locked (SO_LOCK_FILTER: its holders cannot detach or
    replace it). Acts on the socket, whichever process's fd this is a copy of."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        attach_filter(sock, DROP_ALL, lock=True)


def holders(inodes: set[int], first_uid: int, uid_count: int,
            pids: Iterable[int] | None = None,
            deadline: float | None = None) -> dict[int, tuple[int, int]]:
    """For each socket inode in `inodes`, one (pid, fd) holding it, among processes
    whose effective uid (the owner of /proc/PID) is in first_uid .. +uid_count.

    `pids`: look only at these processes (a sliver's, from its cgroup) instead of
    every process of the node. Stops as soon as every inode has a holder, and at
    `deadline` (time.monotonic()) with what it found so far: a slice holding
    millions of fds makes this slow, and the caller bounds it (F32)."""
    links = {f"socket:[{i}]": i for i in inodes}
    found: dict[int, tuple[int, int]] = {}
    if not links:
        return found
    names = (str(p) for p in pids) if pids is not None else \
        (e.name for e in os.scandir("/proc") if e.name.isdigit())
    seen = 0
    for pid in names:
        try:
            if not first_uid <= os.stat(f"/proc/{pid}").st_uid < first_uid + uid_count:
                continue
            fds = os.scandir(f"/proc/{pid}/fd")
        except OSError:  # gone meanwhile
            continue
        with fds:
            for entry in fds:
                seen += 1
                if deadline is not None and seen % 1024 == 0 and time.monotonic() > deadline:
                    return found
                try:
                    inode = links.get(os.readlink(entry.path))
                except OSError:
                    continue
                if inode is not None and inode not in found:
                    found[inode] = (int(pid), int(entry.name))
                    if len(found) == len(links):
                        return found
    return found


__all__ = ["DiagSocket", "SockDiagError", "TCP_LISTEN", "deafen", "destroy", "find",
           "holders", "stop_listening"]
