"""Packet sockets with a locked classic BPF filter, and the small socket calls the
guard needs with raw sockaddr bytes.

A sniffer is created receiving nothing (protocol 0), gets its filter attached and
locked (SO_LOCK_FILTER: no process can detach or replace it, whoever holds the
socket later), and only then is bound to ETH_P_ALL, so no packet is ever queued
on it unfiltered. Packets are read in SOCK_DGRAM ("cooked") form: the filter and
the reader see the network header at offset 0.

The filters are assembled with kernel/cbpf.py (the one classic-BPF assembler).
"""

from __future__ import annotations

import _socket
import ctypes
import errno
import os
import secrets
import socket
import struct
from collections.abc import Sequence

from kernel.cbpf import RET_K, SOCK_FILTER, fprog
from kernel.libc import function

_bind = function("bind", ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_LOCK_FILTER = 44
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD


def sock_info(fd: int) -> tuple[int, int, int]:
    """(domain, type, protocol) of socket `fd` from the kernel (SO_DOMAIN, SO_TYPE,
    SO_PROTOCOL, read by the C socket object); OSError(ENOTSOCK) if it is not a
    socket. `fd` stays open and owned by the caller."""
    sock = _socket.socket(fileno=fd)
    try:
        return sock.family, sock.type, sock.proto
    finally:
        sock.detach()


def bind_bytes(fd: int, raw: bytes) -> int:
    """bind(2) with exactly these sockaddr bytes; returns 0 or the errno."""
    if _bind(fd, raw, len(raw)) == 0:
        return 0
    return ctypes.get_errno()


def netlink_port(fd: int) -> int:
    """The port id netlink socket `fd` is bound to; 0 if it is not bound (or gone)."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, fileno=os.dup(fd)) as sock:
            return int(sock.getsockname()[0])
    except OSError:
        return 0


#: The ids the kernel's own netlink autobind falls back to: S32_MIN..-4097, as u32.
NETLINK_RANDOM_IDS = (2**31, 2**32 - 4096)


def bind_netlink_random(fd: int, tries: int = 16) -> int:
    """Bind unbound netlink socket `fd` to a random id of the kernel's fallback range
    (never the caller's pid, which a plain autobind would take first); 0 or the errno."""
    first, end = NETLINK_RANDOM_IDS
    err = errno.EADDRINUSE
    for _ in range(tries):
        port = first + secrets.randbelow(end - first)
        err = bind_bytes(fd, struct.pack("<HHII", socket.AF_NETLINK, 0, port, 0))
        if err != errno.EADDRINUSE:
            return err
    return err


def already_bound(fd: int, info: tuple[int, int, int], address: str, port: int) -> bool:
    """Is socket `fd` bound to `address`:`port` (any port if 0) already?"""
    family = info[0]
    with socket.socket(family, info[1], info[2], fileno=os.dup(fd)) as sock:
        try:
            got = sock.getsockname()
        except OSError:
            return False
    bound_port = got[1]
    return bound_port != 0 and (port == 0 or bound_port == port) and \
        socket.inet_pton(family, got[0]) == socket.inet_pton(family, address)


def attach_filter(sock: socket.socket, filter_bytes: bytes, lock: bool = True) -> None:
    """Attach a classic BPF filter and, with `lock`, make it permanent (SO_LOCK_FILTER)."""
    prog, buf = fprog(filter_bytes)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
    del buf
    if lock:
        sock.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)
        if sock.getsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER) != 1:  # read back: fail closed
            raise OSError(1, "SO_LOCK_FILTER did not stick", sock.fileno())


def open_sniffer(filter_bytes: bytes, ifname: str | None = None) -> socket.socket:
    """A cooked (SOCK_DGRAM) packet socket that only ever sees what the filter accepts.

    Needs CAP_NET_RAW in the network namespace. `ifname` None: every interface.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0)
    try:
        attach_filter(sock, filter_bytes, lock=True)
        ifindex = socket.if_nametoindex(ifname) if ifname else 0
        # struct sockaddr_ll; Python's own tuple form cannot say "every interface".
        err = bind_bytes(sock.fileno(), struct.pack("<HHiHBB8s", socket.AF_PACKET,
                                                    socket.htons(ETH_P_ALL), ifindex, 0, 0, 0,
                                                    bytes(8)))
        if err:
            raise OSError(err, f"bind packet socket to {ifname or 'every interface'}")
    except BaseException:
        sock.close()
        raise
    return sock


def accept_all() -> bytes:
    return SOCK_FILTER.pack(RET_K, 0, 0, 0x40000)


def drain(sock: socket.socket, limit: int = 10000) -> list[bytes]:
    """Everything queued on a (non-blocking) socket right now, at most `limit` packets."""
    out: list[bytes] = []
    while len(out) < limit:
        try:
            out.append(sock.recv(65536, socket.MSG_DONTWAIT))
        except BlockingIOError:
            break
    return out


__all__: Sequence[str] = (
    "attach_filter", "bind_bytes", "open_sniffer", "drain", "sock_info", "accept_all",
)
