"""Classic BPF: the one assembler for seccomp filters and socket filters.

Programs are raw `struct sock_filter[]` bytes (`{u16 code; u8 jt; u8 jf; u32 k}`,
little endian), so a C sliver init can install exactly the same program. `Asm`
takes forward labels for `jt`/`jf` (and for `k` of JA, the long jump); offsets are
computed, and a jump out of range (or backwards) is an error, never a wrong program.

kernel/seccomp.py builds the guard's filter with it, agent/rawsock.py the packet
socket filters; tests/kernel/test_cbpf.py pins both programs' bytes.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

# Opcodes (linux/filter.h, linux/bpf_common.h), class | size | mode or op | source.
LD_IMM = 0x00
LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_W_IND, LD_H_IND, LD_B_IND = 0x40, 0x48, 0x50
LD_MEM, LDX_MEM, LDX_B_MSH = 0x60, 0x61, 0xB1
ST, STX = 0x02, 0x03
ALU_ADD_K, ALU_ADD_X, ALU_OR_K, ALU_AND_K, ALU_LSH_K = 0x04, 0x0C, 0x44, 0x54, 0x64
JA, JEQ_K, JGT_K, JGE_K, JSET_K = 0x05, 0x15, 0x25, 0x35, 0x45
RET_K, TAX, TXA = 0x06, 0x07, 0x87

SOCK_FILTER = struct.Struct("<HBBI")
SOCK_FPROG = struct.Struct("<HxxxxxxQ")  # struct sock_fprog {u16 len; sock_filter *filter}
BPF_MAXINSNS = 4096


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
        """A label name not used before in this program."""
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
        self.ops.append(_Op(code, jt, jf, k))

    def ld(self, offset: int) -> None:
        """A = the 32-bit word at `offset` of the packet (or of seccomp_data)."""
        self.op(LD_W_ABS, offset)

    def ret(self, value: int) -> None:
        self.op(RET_K, value)

    def drop_if(self, code: int, k: int) -> None:
        """Return 0 (drop) when the conditional jump `code k` is true."""
        self.op(code, k, 0, 1)
        self.op(RET_K, 0)

    def drop_unless(self, code: int, k: int) -> None:
        """Return 0 (drop) unless the conditional jump `code k` is true."""
        self.op(code, k, 1, 0)
        self.op(RET_K, 0)

    def _target(self, name: str, at: int) -> int:
        if name not in self.labels:
            raise ValueError(f"BPF label {name!r} not defined")
        return self.labels[name] - at - 1

    def assemble(self) -> bytes:
        """The `struct sock_filter[]` bytes."""
        if not 0 < len(self.ops) <= BPF_MAXINSNS:
            raise ValueError(f"BPF program of {len(self.ops)} instructions (1..{BPF_MAXINSNS})")
        out = []
        for i, o in enumerate(self.ops):
            jumps = []
            for j in (o.jt, o.jf):
                if isinstance(j, str):
                    j = self._target(j, i)
                if not 0 <= j <= 255:
                    raise ValueError(f"BPF jump of {j} at instruction {i} (0..255 only)")
                jumps.append(j)
            k = o.k
            if isinstance(k, str):
                k = self._target(k, i)
                if k < 0:
                    raise ValueError(f"BPF jump backwards to {o.k!r} at instruction {i}")
            out.append(SOCK_FILTER.pack(o.code, jumps[0], jumps[1], k & 0xFFFFFFFF))
        return b"".join(out)


def fprog(filter_bytes: bytes) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """`struct sock_fprog` bytes for `filter_bytes` (for SO_ATTACH_FILTER or
    seccomp(2)), and the buffer it points to: keep that alive until the call returns."""
    if not filter_bytes or len(filter_bytes) % SOCK_FILTER.size:
        raise ValueError(f"filter of {len(filter_bytes)} bytes is not a sock_filter array")
    buf = ctypes.create_string_buffer(filter_bytes, len(filter_bytes))
    return SOCK_FPROG.pack(len(filter_bytes) // SOCK_FILTER.size, ctypes.addressof(buf)), buf
