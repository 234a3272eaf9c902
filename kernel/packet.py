"""Packet sockets with a locked classic BPF filter, and the small socket calls the
guard needs with raw sockaddr bytes.

A sniffer is created receiving nothing (protocol 0), gets its filter attached and
locked (SO_LOCK_FILTER: no process can detach or replace it, whoever holds the
socket later), and only then is bound to ETH_P_ALL, so no packet is ever queued
on it unfiltered. Packets are read in SOCK_DGRAM ("cooked") form: the filter and
the reader see the network header at offset 0.

`Asm` is a tiny classic-BPF assembler with forward labels (jump offsets are
computed, and an out-of-range jump is an error, not a wrong program).
"""

from __future__ import annotations

import _socket
import ctypes
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_libc.bind.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.bind.restype = ctypes.c_int

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_LOCK_FILTER = 44
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_W_IND, LD_H_IND, LD_B_IND = 0x40, 0x48, 0x50
LD_MEM, LDX_MEM, LDX_B_MSH = 0x60, 0x61, 0xB1
ST, STX = 0x02, 0x03
ALU_ADD_K, ALU_ADD_X, ALU_AND_K, ALU_LSH_K = 0x04, 0x0C, 0x54, 0x64
JA, JEQ_K, JGT_K, JGE_K, JSET_K = 0x05, 0x15, 0x25, 0x35, 0x45
RET_K, TAX, TXA = 0x06, 0x07, 0x87
SOCK_FILTER = struct.Struct("<HBBI")
BPF_MAXINSNS = 4096


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
    if _libc.bind(fd, raw, len(raw)) == 0:
        return 0
    return ctypes.get_errno()


@dataclass
class _Op:
    code: int
    jt: int | str = 0
    jf: int | str = 0
    k: int | str = 0


class Asm:
    """Classic BPF with labels: `jt`/`jf` may name a later `label()`."""

    def __init__(self) -> None:
        self.ops: list[_Op] = []
        self.labels: dict[str, int] = {}
        self._n = 0

    def fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}.{self._n}"

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"BPF label {name!r} defined twice")
        self.labels[name] = len(self.ops)

    def op(self, code: int, k: int | str = 0, jt: int | str = 0, jf: int | str = 0) -> None:
        """Append one instruction; `k` may name a label only for JA (a long jump)."""
        if isinstance(k, str) and code != JA:
            raise ValueError(f"label {k!r} as k of opcode {code:#x}: only JA takes one")
        self.ops.append(_Op(code, jt, jf, k))  # type: ignore[arg-type]

    def drop_if(self, code: int, k: int) -> None:
        """Return 0 (drop) when the conditional jump `code k` is true."""
        self.op(code, k, 0, 1)
        self.op(RET_K, 0)

    def drop_unless(self, code: int, k: int) -> None:
        """Return 0 (drop) unless the conditional jump `code k` is true."""
        self.op(code, k, 1, 0)
        self.op(RET_K, 0)

    def assemble(self) -> bytes:
        if not 0 < len(self.ops) <= BPF_MAXINSNS:
            raise ValueError(f"BPF program of {len(self.ops)} instructions (1..{BPF_MAXINSNS})")
        out = []
        for i, o in enumerate(self.ops):
            jumps = []
            for j in (o.jt, o.jf):
                if isinstance(j, str):
                    if j not in self.labels:
                        raise ValueError(f"BPF label {j!r} not defined")
                    j = self.labels[j] - i - 1
                if not 0 <= j <= 255:
                    raise ValueError(f"BPF jump of {j} at instruction {i} (0..255 only)")
                jumps.append(j)
            k = o.k
            if isinstance(k, str):
                if k not in self.labels:
                    raise ValueError(f"BPF label {k!r} not defined")
                k = self.labels[k] - i - 1
                if k < 0:
                    raise ValueError(f"BPF jump backwards to {o.k!r} at instruction {i}")
            out.append(SOCK_FILTER.pack(o.code, jumps[0], jumps[1], k & 0xFFFFFFFF))
        return b"".join(out)


def _fprog(filter_bytes: bytes) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """struct sock_fprog for setsockopt, and the buffer it points to (keep it alive)."""
    if not filter_bytes or len(filter_bytes) % SOCK_FILTER.size:
        raise ValueError(f"filter of {len(filter_bytes)} bytes is not a sock_filter array")
    buf = ctypes.create_string_buffer(filter_bytes, len(filter_bytes))
    return struct.pack("<HxxxxxxQ", len(filter_bytes) // SOCK_FILTER.size,
                       ctypes.addressof(buf)), buf


def attach_filter(sock: socket.socket, filter_bytes: bytes, lock: bool = True) -> None:
    """Attach a classic BPF filter and, with `lock`, make it permanent (SO_LOCK_FILTER)."""
    prog, buf = _fprog(filter_bytes)
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


__all__: Sequence[str] = ("Asm", "attach_filter", "bind_bytes", "open_sniffer", "drain")
