"""Hide the host's socket tables from slivers: a BPF LSM program on `file_open`.

Slivers share the host's network namespace, so every file of `/proc/<pid>/net/`
(tcp, tcp6, udp, udp6, udplite, raw, raw6, unix, packet, netlink, icmp, ...) lists
every slice's sockets and the host's socket paths, whatever pid the path names
(`/proc/net` is a link to `/proc/self/net`; `/proc/<pid>/task/<tid>/net` and
`/proc/thread-self/net` are the same files). Mounts cannot mask them: every pid's
directory has dentries of its own, made when first looked up (docs/dev/findings-security.md
F38). So the refusal is made where every path ends: the open of the file.

The program is of type LSM attached with BPF_LSM_CGROUP to a sliver's cgroup2 group:
it runs for the processes of that group only, and the sliver cannot detach it (that
needs CAP_SYS_ADMIN of the host). It refuses (EPERM) the open of any procfs file whose
proc_dir_entry descends from a top-level entry named "net", i.e. a network
namespace's /proc/net tree (fs/proc/proc_net.c makes that tree per netns, its root a
child of proc_root, whose own parent is itself). Directory listings stay (names only).

Kernel structure offsets come from the kernel's BTF (/sys/kernel/btf/vmlinux); the
program reads kernel memory only with bpf_probe_read_kernel, so the verifier needs no
type information but the hook's BTF id.

Not wired into Context.create yet: this project's VM kernel refuses BPF LSM programs
(see `available`), so the fence cannot be checked here; docs/dev/findings-security.md F38.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

from kernel.libc import LIBC, NR_BPF, check

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_LSM = 29
BPF_LSM_CGROUP = 43
BPF_F_ALLOW_MULTI = 2
HELPER_PROBE_READ_KERNEL = 113
PROC_SUPER_MAGIC = 0x9FA0
NET_NAME = int.from_bytes(b"net\0", "little")
HOOK = "bpf_lsm_file_open"
#: proc_dir_entry levels walked up to the top-level one (net/stat/x is 3 deep).
DEPTH = 8

BTF_PATH = Path("/sys/kernel/btf/vmlinux")


class ProcNetError(OSError):
    """The fence cannot be made on this kernel; the message says what is missing."""


# ---- BTF: just enough to find a function's id and struct member offsets ----

_KIND_STRUCT, _KIND_UNION, _KIND_FUNC = 4, 5, 12


def _btf_types(data: bytes) -> tuple[list[tuple[int, int, int, int, bytes]], bytes]:
    """(name_off, kind, vlen|kflag, size_or_type, members raw) per type id (0 is void),
    and the string section."""
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
        struct.unpack_from("<HBBIIIII", data, 0)
    if magic != 0xEB9F:
        raise ProcNetError(errno.ENOEXEC, "not BTF", str(BTF_PATH))
    types = data[hdr_len + type_off: hdr_len + type_off + type_len]
    strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
    out: list[tuple[int, int, int, int, bytes]] = [(0, 0, 0, 0, b"")]
    extra = {1: 4, 3: 12, 14: 4, 17: 4}                 # INT, ARRAY, VAR, DECL_TAG
    per_member = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
    i, n = 0, len(types)
    unpack = struct.unpack_from
    while i < n:
        name_off, info, size = unpack("<III", types, i)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        i += 12
        length = extra.get(kind, 0) + per_member.get(kind, 0) * vlen
        out.append((name_off, kind, info, size,
                    types[i:i + length] if kind in (_KIND_STRUCT, _KIND_UNION) else b""))
        i += length
    return out, strings


def _name(strings: bytes, off: int) -> str:
    return strings[off:strings.index(b"\0", off)].decode()


class _BTF:
    def __init__(self, data: bytes) -> None:
        self.types, self.strings = _btf_types(data)
        self.by_name: dict[tuple[int, str], int] = {}
        for tid, (name_off, kind, *_rest) in enumerate(self.types):
            if name_off and kind in (_KIND_STRUCT, _KIND_FUNC):
                self.by_name.setdefault((kind, _name(self.strings, name_off)), tid)

    def func_id(self, name: str) -> int:
        tid = self.by_name.get((_KIND_FUNC, name))
        if tid is None:
            raise ProcNetError(errno.ENOENT, f"the kernel's BTF has no function {name} "
                               "(BPF LSM hooks missing)", str(BTF_PATH))
        return tid

    def offset(self, struct_name: str, member: str) -> int:
        """Byte offset of `member` in `struct struct_name` (anonymous members searched)."""
        tid = self.by_name.get((_KIND_STRUCT, struct_name))
        if tid is None:
            raise ProcNetError(errno.ENOENT, f"the kernel's BTF has no struct {struct_name}",
                               str(BTF_PATH))
        found = self._find(tid, member)
        if found is None:
            raise ProcNetError(errno.ENOENT, f"struct {struct_name} has no member {member} "
                               "in the kernel's BTF", str(BTF_PATH))
        return found

    def _find(self, tid: int, member: str) -> int | None:
        _name_off, kind, info, _size, raw = self.types[tid]
        kflag = info >> 31
        for k in range(info & 0xFFFF):
            m_name, m_type, m_off = struct.unpack_from("<III", raw, 12 * k)
            bits = m_off & 0xFFFFFF if kflag else m_off
            if m_name and _name(self.strings, m_name) == member:
                return bits // 8
            if not m_name:
                sub = self._resolve(m_type)
                if sub is not None:
                    inner = self._find(sub, member)
                    if inner is not None:
                        return bits // 8 + inner
        return None

    def _resolve(self, tid: int) -> int | None:
        """Follow modifiers/typedefs to a struct or union id."""
        for _ in range(16):
            _n, kind, _info, size, _raw = self.types[tid]
            if kind in (_KIND_STRUCT, _KIND_UNION):
                return tid
            if kind in (8, 9, 10, 11, 18):   # TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG
                tid = size
                continue
            return None
        return None


# ---- a tiny eBPF assembler ----

_INSN = struct.Struct("<BBhi")


class _Asm:
    def __init__(self) -> None:
        self.code: list[tuple[int, int, int, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int = 0) -> None:
        self.code.append((code, dst, src, off, imm))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, dst, src, off, imm) in enumerate(self.code):
            if isinstance(off, str):
                off = self.labels[off] - pc - 1
            out += _INSN.pack(code, dst | (src << 4), off, imm)
        return bytes(out)

    # helpers
    def mov_imm(self, dst: int, imm: int) -> None:
        self.op(0xB7, dst, imm=imm)

    def mov(self, dst: int, src: int) -> None:
        self.op(0xBF, dst, src)

    def add_imm(self, dst: int, imm: int) -> None:
        self.op(0x07, dst, imm=imm)

    def ldx_dw(self, dst: int, src: int, off: int) -> None:
        self.op(0x79, dst, src, off)

    def read(self, dst: int, base: int, add: int, size: int = 8, fail: str = "allow") -> None:
        """dst = the `size` bytes (zero-extended) at kernel address base + add."""
        self.op(0x7A, 10, 0, -8, 0)           # *(u64 *)(r10 - 8) = 0
        self.mov(3, base)                      # first: `base` may be r1 or r2
        if add:
            self.add_imm(3, add)
        self.mov(1, 10)
        self.add_imm(1, -8)
        self.mov_imm(2, size)
        self.op(0x85, imm=HELPER_PROBE_READ_KERNEL)
        self.op(0x55, 0, 0, fail, 0)           # if r0 != 0 goto fail
        self.ldx_dw(dst, 10, -8)


def program(off: dict[str, int]) -> bytes:
    """The program for the given structure offsets (keys as in `_offsets`)."""
    a = _Asm()
    a.ldx_dw(6, 1, 0)                                    # r6 = file
    a.read(7, 6, off["file.f_inode"])                   # r7 = inode
    a.op(0x15, 7, 0, "allow", 0)                         # no inode: allow
    a.read(1, 7, off["inode.i_sb"])
    a.read(1, 1, off["super_block.s_magic"])
    a.op(0x55, 1, 0, "allow", PROC_SUPER_MAGIC)          # not procfs: allow
    a.read(8, 7, off["proc_inode.pde"] - off["proc_inode.vfs_inode"])   # r8 = PDE
    a.op(0x15, 8, 0, "allow", 0)                         # not a PDE file (pid, sysctl)
    for _ in range(DEPTH):
        a.read(9, 8, off["proc_dir_entry.parent"])      # r9 = parent
        a.op(0x15, 9, 0, "allow", 0)
        a.read(1, 9, off["proc_dir_entry.parent"])      # r1 = grandparent
        a.op(0x1D, 1, 9, "top", 0)                       # parent is proc_root: r8 is top
        a.mov(8, 9)
    a.op(0x05, 0, 0, "allow", 0)                         # deeper than DEPTH: not /proc/net
    a.label("top")
    a.read(1, 8, off["proc_dir_entry.namelen"], size=1)
    a.op(0x55, 1, 0, "allow", 3)
    a.read(1, 8, off["proc_dir_entry.name"])            # r1 = name pointer
    a.read(1, 1, 0, size=4)
    a.op(0x55, 1, 0, "allow", NET_NAME)
    a.mov_imm(0, 0)                                      # a netns's /proc/net tree: deny
    a.op(0x95)
    a.label("allow")
    a.mov_imm(0, 1)
    a.op(0x95)
    return a.assemble()


def _offsets(btf: _BTF) -> dict[str, int]:
    want = [("file", "f_inode"), ("inode", "i_sb"), ("super_block", "s_magic"),
            ("proc_inode", "pde"), ("proc_inode", "vfs_inode"),
            ("proc_dir_entry", "parent"), ("proc_dir_entry", "namelen"),
            ("proc_dir_entry", "name")]
    return {f"{s}.{m}": btf.offset(s, m) for s, m in want}


# ---- bpf(2) ----

def _bpf(cmd: int, attr: bytes, what: str) -> int:
    buf = ctypes.create_string_buffer(attr, len(attr))
    return check(LIBC.syscall(ctypes.c_long(NR_BPF), ctypes.c_long(cmd), buf,
                              ctypes.c_long(len(attr))), what, exc=ProcNetError)


def _load(insns: bytes, attach_btf_id: int) -> int:
    license_ = ctypes.create_string_buffer(b"GPL")
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    log = ctypes.create_string_buffer(1 << 16)
    attr = bytearray(128)
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_LSM, len(insns) // 8,
                     ctypes.addressof(insn_buf), ctypes.addressof(license_),
                     1, len(log), ctypes.addressof(log))
    attr[48:48 + 16] = b"pl_procnet".ljust(16, b"\0")
    struct.pack_into("<I", attr, 68, BPF_LSM_CGROUP)
    struct.pack_into("<I", attr, 108, attach_btf_id)
    try:
        return _bpf(BPF_PROG_LOAD, bytes(attr), "load the /proc/net fence (BPF LSM)")
    except ProcNetError as exc:
        text = log.value.decode(errors="replace").strip().splitlines()
        raise ProcNetError(exc.errno, f"{exc.strerror}"
                           + (f"; verifier: {' | '.join(text[-3:])}" if text else "")) from None


_lock = threading.Lock()
_prog_fd: list[int] = []


def prog_fd() -> int:
    """The loaded program (loaded once per process, kept open)."""
    with _lock:
        if not _prog_fd:
            try:
                data = BTF_PATH.read_bytes()
            except OSError as exc:
                raise ProcNetError(exc.errno, f"no kernel BTF: {exc.strerror}",
                                   str(BTF_PATH)) from None
            btf = _BTF(data)
            fd = _load(program(_offsets(btf)), btf.func_id(HOOK))
            os.set_inheritable(fd, False)
            _prog_fd.append(fd)
        return _prog_fd[0]


def fence(cgroup2_dir: Path) -> None:
    """Attach the /proc/net fence to the cgroup2 group `cgroup2_dir` (a sliver's,
    before any of its processes runs). ProcNetError names what the kernel lacks."""
    fd = prog_fd()
    cg = os.open(cgroup2_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        attr = struct.pack("<IIIII", cg, fd, BPF_LSM_CGROUP, BPF_F_ALLOW_MULTI, 0).ljust(64,
                                                                                       b"\0")
        _bpf(BPF_PROG_ATTACH, attr, f"attach the /proc/net fence to {cgroup2_dir}")
    finally:
        os.close(cg)


def attached(cgroup2_dir: Path) -> Sequence[int]:
    """Program ids attached to `cgroup2_dir` for BPF_LSM_CGROUP (tests, status)."""
    cg = os.open(cgroup2_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    ids = (ctypes.c_uint32 * 64)()
    try:
        attr = bytearray(64)
        # query: target_fd, attach_type, query_flags, attach_flags, prog_ids, prog_cnt
        struct.pack_into("<IIIIQI", attr, 0, cg, BPF_LSM_CGROUP, 0, 0,
                         ctypes.addressof(ids), 64)
        buf = ctypes.create_string_buffer(bytes(attr), len(attr))
        check(LIBC.syscall(ctypes.c_long(NR_BPF), ctypes.c_long(BPF_PROG_QUERY), buf,
                           ctypes.c_long(len(attr))), f"query {cgroup2_dir}", exc=ProcNetError)
        cnt = struct.unpack_from("<I", buf.raw, 24)[0]
        return [ids[i] for i in range(min(cnt, 64))]
    finally:
        os.close(cg)


def available() -> tuple[bool, str]:
    """Whether this kernel lets the fence load, and why not. (On this project's VM
    kernel every BTF-attached program type, LSM and tracing, is refused with EPERM,
    even a two-instruction one, while kprobe and cgroup programs load: F38.)"""
    try:
        prog_fd()
        return True, ""
    except ProcNetError as exc:
        return False, str(exc)
