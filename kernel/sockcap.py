"""A cap on the INET sockets one cgroup v2 group holds open, enforced in the kernel.

Why: every UDP socket bound to port 0 (explicitly, or by `sendto`/`connect`
autobind) takes a port from the node's ephemeral range (28,232 by default); one
sliver looping on socket()+bind() drained it and the node's resolver and every UDP
client failed (docs/dev/findings-security.md F33). pids.max and RLIMIT_NOFILE do not
bound this (many processes x 1024 fds each).

How: two cgroup programs (kernel/ebpf.py) attached to the sliver's cgroup v2 group
with BPF_F_ALLOW_MULTI, sharing two maps of their own:

- `sockcap_cnt`, an array of two u64: [0] sockets counted now, [1] the limit;
- `sockcap_mark`, socket-local storage: 1 on each socket that was counted.

`sockcap_create` (BPF_CGROUP_INET_SOCK_CREATE: every socket(AF_INET/AF_INET6, ...)
of a process in the group or a group below it) adds 1 with an atomic fetch-add; if
the old count was already at the limit it takes the 1 back and refuses (socket()
fails with EPERM); else it marks the socket. `sockcap_release`
(BPF_CGROUP_INET_SOCK_RELEASE, runs in the cgroup the socket was made in, whoever
closes it) takes 1 off only for a marked socket, so sockets made before the
programs were attached, or accepted from a listener (accept() makes no socket
through the create hook), never drive the count down; it also never goes below 0.

The programs stay attached when the fds here are closed and until the group is
removed (the kernel frees them once the group and every socket made in it are
gone), so enforcement outlives the caller. `apply` finds them again by name on the
group (BPF_PROG_QUERY) to change the limit in place, e.g. after an agent restart.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from kernel import ebpf as B

CREATE_NAME = "sockcap_create"
RELEASE_NAME = "sockcap_release"
COUNT_MAP = "sockcap_cnt"
MARK_MAP = "sockcap_mark"
UNLIMITED = 2**64 - 1      # the limit word when counting without a cap
MAX_LIMIT = 2**32          # a sane upper bound for a requested cap

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _create_program(cnt: int, mark: int) -> B.Program:
    """sock_create: count, refuse above the limit, mark what was counted."""
    return [
        B.mov64_reg(B.R6, B.R1),                        # r6 = ctx (struct bpf_sock *)
        B.st_mem(B.W, B.R10, -4, 0),
        B.ld_map_fd(B.R1, cnt), B.mov64_reg(B.R2, B.R10), B.alu64_imm(B.ADD, B.R2, -4),
        B.call(B.FUNC_MAP_LOOKUP_ELEM),
        B.jmp_imm(B.JEQ, B.R0, 0, "allow"),             # (index 0 of an array: never)
        B.mov64_reg(B.R7, B.R0),                        # r7 = &count
        B.st_mem(B.W, B.R10, -4, 1),
        B.ld_map_fd(B.R1, cnt), B.mov64_reg(B.R2, B.R10), B.alu64_imm(B.ADD, B.R2, -4),
        B.call(B.FUNC_MAP_LOOKUP_ELEM),
        B.jmp_imm(B.JEQ, B.R0, 0, "allow"),
        B.ldx_mem(B.DW, B.R9, B.R0, 0),                 # r9 = limit
        B.mov64_imm(B.R8, 1),
        B.atomic_add(B.DW, B.R7, B.R8, 0, fetch=True),  # r8 = count++ (old value)
        B.jmp_reg(B.JGE, B.R8, B.R9, "undo"),           # old >= limit: over the cap
        B.ld_map_fd(B.R1, mark), B.mov64_reg(B.R2, B.R6), B.mov64_imm(B.R3, 0),
        B.mov64_imm(B.R4, B.SK_STORAGE_GET_F_CREATE),
        B.call(B.FUNC_SK_STORAGE_GET),
        B.jmp_imm(B.JEQ, B.R0, 0, "undo"),              # cannot mark: do not count it
        B.st_mem(B.W, B.R0, 0, 1),
        B.mov64_imm(B.R0, 1),
        B.exit_insn(),
        B.Label("undo"),
        B.mov64_imm(B.R8, -1),
        B.atomic_add(B.DW, B.R7, B.R8, 0),
        B.mov64_imm(B.R0, 0),                           # refuse: socket() -> EPERM
        B.exit_insn(),
        B.Label("allow"),
        B.mov64_imm(B.R0, 1),
        B.exit_insn(),
    ]


def _release_program(cnt: int, mark: int) -> B.Program:
    """sock_release: uncount a socket that was counted (marked), never below 0."""
    return [
        B.mov64_reg(B.R6, B.R1),
        B.ld_map_fd(B.R1, mark), B.mov64_reg(B.R2, B.R6), B.mov64_imm(B.R3, 0),
        B.mov64_imm(B.R4, 0),
        B.call(B.FUNC_SK_STORAGE_GET),
        B.jmp_imm(B.JEQ, B.R0, 0, "out"),
        B.ldx_mem(B.W, B.R1, B.R0, 0),
        B.jmp_imm(B.JEQ, B.R1, 0, "out"),
        B.st_mem(B.W, B.R0, 0, 0),                      # uncounted once only
        B.st_mem(B.W, B.R10, -4, 0),
        B.ld_map_fd(B.R1, cnt), B.mov64_reg(B.R2, B.R10), B.alu64_imm(B.ADD, B.R2, -4),
        B.call(B.FUNC_MAP_LOOKUP_ELEM),
        B.jmp_imm(B.JEQ, B.R0, 0, "out"),
        B.mov64_imm(B.R1, -1),
        B.atomic_add(B.DW, B.R0, B.R1, 0, fetch=True),  # r1 = count-- (old value)
        B.jmp_imm(B.JSGT, B.R1, 0, "out"),
        B.mov64_imm(B.R1, 1),                           # it was 0: back to 0
        B.atomic_add(B.DW, B.R0, B.R1, 0),
        B.Label("out"),
        B.mov64_imm(B.R0, 1),
        B.exit_insn(),
    ]


@dataclass(frozen=True)
class Installed:
    """The programs and maps on one group (ids, valid while the group lives)."""

    create_prog: int
    release_prog: int
    count_map: int
    mark_map: int


_btf: list[B.Fd] = []      # one BTF object for every mark map this process makes


def _int_btf() -> B.Fd:
    if not _btf:
        _btf.append(B.btf_load(B.btf_int_only()))
    return _btf[0]


def _check_limit(limit: int | None) -> int:
    if limit is None:
        return UNLIMITED
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"inet_sockets_max must be 1..{MAX_LIMIT} or None, not {limit!r}")
    return limit


def install(group: Path, limit: int | None) -> Installed:
    """Attach a fresh pair of programs to `group` (a cgroup v2 directory) with count 0
    and `limit` (None: count only). Attach it before any process is in the group:
    sockets made earlier are not counted. Nothing is left attached on failure."""
    word = _check_limit(limit)
    cg = B.cgroup_fd(group)
    try:
        with B.map_create(B.MAP_TYPE_ARRAY, 4, 8, 2, COUNT_MAP) as cnt, \
                B.map_create(B.MAP_TYPE_SK_STORAGE, 4, 4, 0, MARK_MAP,
                             flags=B.F_NO_PREALLOC, btf=(_int_btf(), 1, 1)) as mark:
            B.map_update(cnt, _U32.pack(1), _U64.pack(word))
            with B.prog_load(B.PROG_TYPE_CGROUP_SOCK,
                             _create_program(cnt.fileno(), mark.fileno()),
                             CREATE_NAME, B.CGROUP_INET_SOCK_CREATE) as create, \
                    B.prog_load(B.PROG_TYPE_CGROUP_SOCK,
                                _release_program(cnt.fileno(), mark.fileno()),
                                RELEASE_NAME, B.CGROUP_INET_SOCK_RELEASE) as release:
                # Release first: a socket counted by create is always uncounted.
                B.prog_attach(cg, release, B.CGROUP_INET_SOCK_RELEASE)
                try:
                    B.prog_attach(cg, create, B.CGROUP_INET_SOCK_CREATE)
                except BaseException:
                    B.prog_detach(cg, release, B.CGROUP_INET_SOCK_RELEASE)
                    raise
                return Installed(B.prog_info(create).id, B.prog_info(release).id,
                                 B.map_info(cnt).id, B.map_info(mark).id)
    except OSError as exc:
        raise OSError(exc.errno, f"socket cap on {group}: {exc.strerror}",
                      str(group)) from None
    finally:
        os.close(cg)


def find(group: Path) -> Installed | None:
    """The socket cap attached to `group` itself, or None (also when `group` is gone
    or is not a cgroup v2 directory: nothing can be attached there)."""
    try:
        cg = B.cgroup_fd(group)
    except FileNotFoundError:
        return None
    try:
        create = _find_prog(cg, B.CGROUP_INET_SOCK_CREATE, CREATE_NAME)
        release = _find_prog(cg, B.CGROUP_INET_SOCK_RELEASE, RELEASE_NAME)
    except OSError as exc:
        if exc.errno == errno.EBADF:     # the kernel's answer for a non-cgroup fd
            return None
        raise
    finally:
        os.close(cg)
    if create is None or release is None:
        return None
    maps: dict[str, int] = {}
    for mid in create.map_ids:
        with B.map_fd_by_id(mid) as m:
            maps[B.map_info(m).name] = mid
    if COUNT_MAP not in maps or MARK_MAP not in maps:
        return None
    return Installed(create.id, release.id, maps[COUNT_MAP], maps[MARK_MAP])


def _find_prog(cg: int, attach_type: int, name: str) -> B.ProgInfo | None:
    for pid in B.prog_query(cg, attach_type):
        try:
            with B.prog_fd_by_id(pid) as p:
                info = B.prog_info(p)
        except FileNotFoundError:
            continue       # detached and freed meanwhile
        if info.name == name:
            return info
    return None


def usage(group: Path) -> tuple[int, int | None] | None:
    """(sockets counted now, limit or None) of `group`, or None without a cap."""
    found = find(group)
    if found is None:
        return None
    with B.map_fd_by_id(found.count_map) as cnt:
        count = _U64.unpack(B.map_lookup(cnt, _U32.pack(0), 8) or bytes(8))[0]
        word = _U64.unpack(B.map_lookup(cnt, _U32.pack(1), 8) or bytes(8))[0]
    return count, None if word == UNLIMITED else word


def apply(group: Path | None, limit: int | None) -> None:
    """Make `group`'s cap `limit`: install it on first use, else change the limit in
    place (sockets open above a lowered limit stay; new ones fail until under it).
    None with no cap installed does nothing; None on an installed cap leaves it
    counting without a limit, so a later limit counts what is open.

    `group` None means the node has no cgroup v2 hierarchy: an error if a limit is
    asked for."""
    word = _check_limit(limit)
    if group is None:
        if limit is None:
            return
        raise OSError(errno.ENOTSUP, "inet_sockets_max needs a cgroup v2 hierarchy "
                      "(mount cgroup2, e.g. at /sys/fs/cgroup/unified)")
    found = find(group)
    if found is None:
        if limit is not None:
            install(group, limit)
        return
    try:
        with B.map_fd_by_id(found.count_map) as cnt:
            B.map_update(cnt, _U32.pack(1), _U64.pack(word))
    except OSError as exc:
        raise OSError(exc.errno, f"socket cap on {group}: {exc.strerror}",
                      str(group)) from None
