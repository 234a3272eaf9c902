"""eBPF from Python: an assembler for the instructions we use, and bpf(2) wrappers.

No compiler and no libbpf: programs are a few dozen instructions, written with the
helpers below (the names follow the kernel's `BPF_*` macros in
include/linux/filter.h), and loaded with the raw bpf(2) commands. Everything returns
or takes plain fds (`Fd`, closed with `close()` or as a context manager).

Lifetime (docs/ebpf.md): a program attached to a cgroup with `prog_attach` stays
attached after every fd to it is closed, until it is detached or the cgroup is
freed; the maps it uses live as long as it does. So nothing here must stay open
for enforcement to go on; after a restart the caller finds its program again with
`prog_query` on the cgroup, `prog_info` (name, map ids) and `map_fd_by_id`.

Layouts mirror <linux/bpf.h> (union bpf_attr, struct bpf_prog_info, bpf_map_info,
struct bpf_insn) and <linux/btf.h>; only the fields used are set, the rest zero.
Errors are OSError with the errno and the command; a refused program load carries
the verifier's log in its message.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kernel.libc import LIBC, NR_BPF, check

# bpf(2) commands.
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM = 0, 1, 2
PROG_LOAD, PROG_ATTACH, PROG_DETACH = 5, 8, 9
PROG_GET_NEXT_ID, MAP_GET_NEXT_ID = 11, 12
PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID = 13, 14
OBJ_GET_INFO_BY_FD, PROG_QUERY, BTF_LOAD = 15, 16, 18

# Map types, program types, attach types (enum bpf_map_type, bpf_prog_type, ...).
MAP_TYPE_HASH, MAP_TYPE_ARRAY, MAP_TYPE_SK_STORAGE = 1, 2, 24
PROG_TYPE_SCHED_CLS, PROG_TYPE_CGROUP_SKB, PROG_TYPE_CGROUP_SOCK = 3, 8, 9
CGROUP_INET_INGRESS, CGROUP_INET_EGRESS, CGROUP_INET_SOCK_CREATE = 0, 1, 2
CGROUP_INET_SOCK_RELEASE = 34

# Flags.
F_ALLOW_MULTI = 1 << 1          # attach: several programs per cgroup and hook
F_EXCLUSIVE = 0                 # attach: the only program at the hook; nothing below
                                # may attach its own; a second attach replaces it
F_NO_PREALLOC = 1 << 0          # map create
ANY, NOEXIST, EXIST = 0, 1, 2   # map update
SK_STORAGE_GET_F_CREATE = 1

# Helper function ids (enum bpf_func_id).
FUNC_MAP_LOOKUP_ELEM = 1
FUNC_MAP_UPDATE_ELEM = 2
FUNC_MAP_DELETE_ELEM = 3
FUNC_SKB_LOAD_BYTES = 26
FUNC_GET_CURRENT_CGROUP_ID = 80
FUNC_SK_STORAGE_GET = 107

OBJ_NAME_LEN = 16
_ATTR_SIZE = 144                # sizeof(union bpf_attr) in the 6.1 headers; the
                                # kernel accepts any size whose tail it does not know is 0


# ---------------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------------

# Classes, sizes, modes, sources, operations (include/uapi/linux/bpf_common.h, bpf.h).
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = 0, 1, 2, 3, 4, 5, 6, 7
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM, ATOMIC = 0x00, 0x60, 0xC0
K, X = 0x00, 0x08
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR, MOV = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0)
JA, JEQ, JGT, JGE, JSET, JNE, JSGT, JSGE, CALL, EXIT, JLT, JLE, JSLT, JSLE = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0)
FETCH = 0x01                    # atomic: the old value comes back in the source reg
PSEUDO_MAP_FD = 1               # ld_imm64 src: imm is a map fd

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
INSN = struct.Struct("<BBhi")


@dataclass(frozen=True)
class Insn:
    """One eBPF instruction slot. `off` may be a label (str) for jumps; `assemble`
    resolves it to the relative slot count."""

    code: int
    dst: int = 0
    src: int = 0
    off: int | str = 0
    imm: int = 0

    def pack(self) -> bytes:
        assert isinstance(self.off, int)
        if not (0 <= self.dst <= 10 and 0 <= self.src <= 10):
            raise ValueError(f"bad register in {self}")
        if not -(2**15) <= self.off < 2**15:
            raise ValueError(f"jump offset out of range in {self}")
        imm = self.imm & 0xFFFFFFFF
        return INSN.pack(self.code, (self.src << 4) | self.dst, self.off,
                         imm - (1 << 32) if imm >= 1 << 31 else imm)


@dataclass(frozen=True)
class Label:
    """A jump target: `Label("out")` placed in a program, `jmp_imm(JEQ, R0, 0, "out")`."""

    name: str


Program = Sequence["Insn | Label | tuple[Insn, Insn]"]


def mov64_reg(dst: int, src: int) -> Insn:
    return Insn(ALU64 | MOV | X, dst, src)


def mov64_imm(dst: int, imm: int) -> Insn:
    return Insn(ALU64 | MOV | K, dst, 0, 0, imm)


def alu64_imm(op: int, dst: int, imm: int) -> Insn:
    return Insn(ALU64 | op | K, dst, 0, 0, imm)


def alu64_reg(op: int, dst: int, src: int) -> Insn:
    return Insn(ALU64 | op | X, dst, src)


def mov32_imm(dst: int, imm: int) -> Insn:
    """dst = (u32)imm, zero-extended to 64 bits."""
    return Insn(ALU | MOV | K, dst, 0, 0, imm)


def alu32_imm(op: int, dst: int, imm: int) -> Insn:
    """32-bit ALU on the low half of dst (the result is zero-extended)."""
    return Insn(ALU | op | K, dst, 0, 0, imm)


def ldx_mem(size: int, dst: int, src: int, off: int) -> Insn:
    """dst = *(size *)(src + off)"""
    return Insn(LDX | size | MEM, dst, src, off)


def stx_mem(size: int, dst: int, src: int, off: int) -> Insn:
    """*(size *)(dst + off) = src"""
    return Insn(STX | size | MEM, dst, src, off)


def st_mem(size: int, dst: int, off: int, imm: int) -> Insn:
    """*(size *)(dst + off) = imm"""
    return Insn(ST | size | MEM, dst, 0, off, imm)


def atomic_add(size: int, dst: int, src: int, off: int, fetch: bool = False) -> Insn:
    """lock *(size *)(dst + off) += src; with `fetch` src gets the old value."""
    if size not in (W, DW):
        raise ValueError("atomic operations are 32 or 64 bits")
    return Insn(STX | size | ATOMIC, dst, src, off, ADD | (FETCH if fetch else 0))


def jmp_imm(op: int, dst: int, imm: int, target: str) -> Insn:
    return Insn(JMP | op | K, dst, 0, target, imm)


def jmp_reg(op: int, dst: int, src: int, target: str) -> Insn:
    return Insn(JMP | op | X, dst, src, target)


def jmp32_imm(op: int, dst: int, imm: int, target: str) -> Insn:
    """Compare the low 32 bits of dst with imm."""
    return Insn(JMP32 | op | K, dst, 0, target, imm)


def ja(target: str) -> Insn:
    return Insn(JMP | JA, 0, 0, target)


def call(func: int) -> Insn:
    return Insn(JMP | CALL, 0, 0, 0, func)


def exit_insn() -> Insn:
    return Insn(JMP | EXIT)


def ld_map_fd(dst: int, map_fd: int) -> tuple[Insn, Insn]:
    """dst = the map whose fd is `map_fd` (a two-slot ld_imm64; the verifier turns the
    fd into the map's address and takes a reference on the map)."""
    return (Insn(LD | DW | IMM, dst, PSEUDO_MAP_FD, 0, map_fd), Insn(0))


def ld_imm64(dst: int, value: int) -> tuple[Insn, Insn]:
    value &= 0xFFFFFFFFFFFFFFFF
    return (Insn(LD | DW | IMM, dst, 0, 0, value & 0xFFFFFFFF), Insn(0, 0, 0, 0, value >> 32))


def assemble(program: Program) -> bytes:
    """The raw `struct bpf_insn[]` for `program`, labels resolved."""
    slots: list[Insn] = []
    labels: dict[str, int] = {}
    for item in program:
        if isinstance(item, Label):
            if item.name in labels:
                raise ValueError(f"label {item.name!r} placed twice")
            labels[item.name] = len(slots)
        elif isinstance(item, tuple):
            slots.extend(item)
        else:
            slots.append(item)
    out = bytearray()
    for i, ins in enumerate(slots):
        if isinstance(ins.off, str):
            if ins.off not in labels:
                raise ValueError(f"jump to unknown label {ins.off!r}")
            ins = Insn(ins.code, ins.dst, ins.src, labels[ins.off] - i - 1, ins.imm)
        out += ins.pack()
    return bytes(out)


# ---------------------------------------------------------------------------------
# bpf(2)
# ---------------------------------------------------------------------------------

def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    return int(check(LIBC.syscall(ctypes.c_long(NR_BPF), ctypes.c_long(cmd), attr,
                                  ctypes.c_long(len(attr))), f"bpf {what}"))


def _attr(fields: Sequence[tuple[str, int, int | bytes]]) -> ctypes.Array[ctypes.c_char]:
    """A zeroed bpf_attr with `fields` (struct format, offset, value) packed in."""
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    for fmt, off, value in fields:
        struct.pack_into("<" + fmt, buf, off, value)
    return buf


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


class Fd:
    """An owned bpf object fd (map, program, BTF). Close it, or use `with`."""

    def __init__(self, fd: int, kind: str) -> None:
        self.fd = fd
        self.kind = kind

    def fileno(self) -> int:
        if self.fd < 0:
            raise ValueError(f"{self.kind} fd is closed")
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:      # a forgotten fd must not pin a map for ever
        try:
            self.close()
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"<bpf {self.kind} fd {self.fd}>"


def _name(name: str) -> bytes:
    raw = name.encode()
    if len(raw) >= OBJ_NAME_LEN or not all(c.isalnum() or c in "_." for c in name):
        raise ValueError(f"bpf object name {name!r}: at most 15 of [A-Za-z0-9_.]")
    return raw


def btf_int_only() -> bytes:
    """The smallest BTF blob: one type, [1] `int` (32-bit signed). Some maps (socket
    storage) must be described by BTF; key and value both of type 1 then."""
    strings = b"\0int\0"
    types = struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", (1 << 24) | 32)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                      len(strings))
    return hdr + types + strings


def btf_load(blob: bytes) -> Fd:
    """Load a BTF blob; the kernel's log is in the error on refusal."""
    data = ctypes.create_string_buffer(blob, len(blob))
    log = ctypes.create_string_buffer(4096)
    attr = _attr([("Q", 0, _addr(data)), ("Q", 8, _addr(log)), ("I", 16, len(blob)),
                  ("I", 20, len(log)), ("I", 24, 1)])
    try:
        return Fd(_bpf(BTF_LOAD, attr, "BTF_LOAD"), "btf")
    except OSError as exc:
        text = log.value.decode(errors="replace").strip()
        raise OSError(exc.errno, f"{exc.strerror}; BTF log: {text or '(empty)'}") from None


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str = "", flags: int = 0, btf: tuple[Fd, int, int] | None = None) -> Fd:
    """A new map. `btf`: (BTF fd, key type id, value type id) for maps that need it."""
    fields: list[tuple[str, int, int | bytes]] = [
        ("I", 0, map_type), ("I", 4, key_size), ("I", 8, value_size),
        ("I", 12, max_entries), ("I", 16, flags), ("16s", 28, _name(name))]
    if btf is not None:
        fields += [("I", 48, btf[0].fileno()), ("I", 52, btf[1]), ("I", 56, btf[2])]
    return Fd(_bpf(MAP_CREATE, _attr(fields), f"MAP_CREATE {name or map_type}"), "map")


def map_update(map_fd: Fd | int, key: bytes, value: bytes, flags: int = ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    fd = map_fd if isinstance(map_fd, int) else map_fd.fileno()
    _bpf(MAP_UPDATE_ELEM, _attr([("I", 0, fd), ("Q", 8, _addr(k)), ("Q", 16, _addr(v)),
                                 ("Q", 24, flags)]), "MAP_UPDATE_ELEM")


def map_lookup(map_fd: Fd | int, key: bytes, value_size: int) -> bytes | None:
    """The value under `key`, or None if there is none."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    fd = map_fd if isinstance(map_fd, int) else map_fd.fileno()
    try:
        _bpf(MAP_LOOKUP_ELEM, _attr([("I", 0, fd), ("Q", 8, _addr(k)),
                                     ("Q", 16, _addr(v))]), "MAP_LOOKUP_ELEM")
    except OSError as exc:
        if exc.errno == _errno.ENOENT:
            return None
        raise
    return v.raw


def prog_load(prog_type: int, program: Program | bytes, name: str = "",
              expected_attach_type: int = 0, license: str = "GPL") -> Fd:
    """Verify and load a program. A refusal raises OSError whose message holds the
    verifier's log (loaded again with the log on, so a success costs no log)."""
    code = program if isinstance(program, bytes) else assemble(program)
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(license.encode())

    def attempt(log: ctypes.Array[ctypes.c_char] | None) -> int:
        fields: list[tuple[str, int, int | bytes]] = [
            ("I", 0, prog_type), ("I", 4, len(code) // INSN.size), ("Q", 8, _addr(insns)),
            ("Q", 16, _addr(lic)), ("16s", 48, _name(name)),
            ("I", 68, expected_attach_type)]
        if log is not None:
            fields += [("I", 24, 1), ("I", 28, len(log)), ("Q", 32, _addr(log))]
        return _bpf(PROG_LOAD, _attr(fields), f"PROG_LOAD {name or prog_type}")

    try:
        return Fd(attempt(None), "prog")
    except OSError as first:
        log = ctypes.create_string_buffer(1 << 16)
        try:
            return Fd(attempt(log), "prog")
        except OSError as exc:
            text = log.value.decode(errors="replace").strip()
            raise OSError(exc.errno, f"{exc.strerror}; verifier log:\n{text or '(empty)'}"
                          ) from first


def prog_attach(cgroup_fd: int, prog: Fd, attach_type: int,
                flags: int = F_ALLOW_MULTI) -> None:
    """Attach to a cgroup v2 directory fd. Stays attached when `prog` is closed."""
    _bpf(PROG_ATTACH, _attr([("I", 0, cgroup_fd), ("I", 4, prog.fileno()),
                             ("I", 8, attach_type), ("I", 12, flags)]),
         f"PROG_ATTACH type {attach_type}")


def prog_detach(cgroup_fd: int, prog: Fd | None, attach_type: int) -> None:
    """Detach `prog`; with None, whatever single (non-MULTI) program is attached
    at the hook (ENOENT when there is none)."""
    _bpf(PROG_DETACH, _attr([("I", 0, cgroup_fd), ("I", 4, 0 if prog is None else prog.fileno()),
                             ("I", 8, attach_type)]), f"PROG_DETACH type {attach_type}")


def prog_query(cgroup_fd: int, attach_type: int, room: int = 64) -> list[int]:
    """Ids of the programs attached to the cgroup itself at `attach_type` (not the
    ones it inherits)."""
    ids = ctypes.create_string_buffer(4 * room)
    attr = _attr([("I", 0, cgroup_fd), ("I", 4, attach_type), ("Q", 16, _addr(ids)),
                  ("I", 24, room)])
    _bpf(PROG_QUERY, attr, f"PROG_QUERY type {attach_type}")
    cnt = struct.unpack_from("<I", attr, 24)[0]
    return list(struct.unpack_from(f"<{min(cnt, room)}I", ids))


def prog_fd_by_id(prog_id: int) -> Fd:
    return Fd(_bpf(PROG_GET_FD_BY_ID, _attr([("I", 0, prog_id)]),
                   f"PROG_GET_FD_BY_ID {prog_id}"), "prog")


def map_fd_by_id(map_id: int) -> Fd:
    return Fd(_bpf(MAP_GET_FD_BY_ID, _attr([("I", 0, map_id)]),
                   f"MAP_GET_FD_BY_ID {map_id}"), "map")


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def _info(fd: Fd, size: int, extra: Sequence[tuple[str, int, int]] = ()
          ) -> ctypes.Array[ctypes.c_char]:
    info = ctypes.create_string_buffer(size)
    for fmt, off, value in extra:
        struct.pack_into("<" + fmt, info, off, value)
    _bpf(OBJ_GET_INFO_BY_FD, _attr([("I", 0, fd.fileno()), ("I", 4, size),
                                    ("Q", 8, _addr(info))]), f"OBJ_GET_INFO {fd.kind}")
    return info


def prog_info(prog: Fd) -> ProgInfo:
    ids = ctypes.create_string_buffer(4 * 64)
    info = _info(prog, 232, [("I", 52, 64), ("Q", 56, _addr(ids))])
    ptype, pid = struct.unpack_from("<II", info, 0)
    nmaps = min(64, struct.unpack_from("<I", info, 52)[0])
    name = struct.unpack_from("16s", info, 64)[0].rstrip(b"\0").decode()
    return ProgInfo(pid, ptype, name, struct.unpack_from(f"<{nmaps}I", ids))


def map_info(map_fd: Fd) -> MapInfo:
    info = _info(map_fd, 88)
    mtype, mid, ks, vs, me = struct.unpack_from("<IIIII", info, 0)
    name = struct.unpack_from("16s", info, 24)[0].rstrip(b"\0").decode()
    return MapInfo(mid, mtype, ks, vs, me, name)


def _ids(cmd: int) -> Iterator[int]:
    start = 0
    while True:
        attr = _attr([("I", 0, start)])
        try:
            _bpf(cmd, attr, "GET_NEXT_ID")
        except OSError as exc:
            if exc.errno == _errno.ENOENT:
                return
            raise
        start = struct.unpack_from("<I", attr, 4)[0]
        yield start


def prog_ids() -> list[int]:
    """Ids of every program loaded in the kernel (for leak checks)."""
    return list(_ids(PROG_GET_NEXT_ID))


def map_ids() -> list[int]:
    """Ids of every map in the kernel (for leak checks)."""
    return list(_ids(MAP_GET_NEXT_ID))


def cgroup_fd(path: str | os.PathLike[str]) -> int:
    """An O_RDONLY directory fd on a cgroup v2 group, for attach and query."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
