"""A file as another process sees it: its path resolved in that process's root,
without any step reaching outside it, and `struct statfs` raw.

    fd = open_as_seen_by(tid, b"/etc/passwd")    # an O_PATH fd, or OSError
    raw = fstatfs_raw(fd)                        # the 120 bytes statfs(2) writes

`open_as_seen_by` resolves with openat2(2) from an O_PATH fd of /proc/TID/root with
RESOLVE_IN_ROOT (absolute symlinks and ".." stay inside that root) and
RESOLVE_NO_MAGICLINKS (no /proc/N/root, /proc/N/fd/M jump elsewhere), in the
mount namespace that root belongs to. A relative path is joined to the process's
cwd, read as a path from its root (/proc/TID/cwd minus /proc/TID/root); a cwd that
is deleted or not under the root raises OSError(ENOENT).

The walk runs under the process's filesystem credentials (its fsuid, fsgid and
supplementary groups, none of root's file capabilities), switched for the calling
thread alone and back before returning: a path is found only where the process may
search every directory on the way itself. Where the process needs a capability to
get there (a sliver's root reading another user's 0700 directory), this says
EACCES and the caller lets the kernel answer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from kernel.libc import NR_OPENAT2, check, function

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

PATH_MAX = 4096
OVERLAYFS_SUPER_MAGIC = 0x794C7630

#: struct statfs on x86-64: f_type, f_bsize, f_blocks, f_bfree, f_bavail, f_files,
#: f_ffree, f_fsid[2], f_namelen, f_frsize, f_flags, f_spare[4] (120 bytes).
STATFS = struct.Struct("<qqQQQQQiiqqq4q")
assert STATFS.size == 120

_OPEN_HOW = struct.Struct("<QQQ")   # struct open_how: flags, mode, resolve
_syscall4 = function("syscall", ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_char_p,
                     ctypes.c_char_p, ctypes.c_long)
_fstatfs = function("fstatfs", ctypes.c_int, ctypes.c_int, ctypes.c_char_p)
# The thread's own ids: setfsuid/setfsgid are per thread in the kernel and glibc
# passes them straight on; setgroups is made per thread by calling the syscall
# itself (glibc's wrapper would change every thread of the agent).
NR_SETGROUPS = 116
_setfsuid = function("setfsuid", ctypes.c_int, ctypes.c_uint)
_setfsgid = function("setfsgid", ctypes.c_int, ctypes.c_uint)
_syscall2 = function("syscall", ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p)


def openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    """openat2(2) with mode 0; returns the new fd (close-on-exec is the caller's flag)."""
    how = _OPEN_HOW.pack(flags, 0, resolve)
    return check(_syscall4(NR_OPENAT2, dirfd, path, how, len(how)), "openat2", path)


def fstatfs_raw(fd: int) -> bytes:
    """The `struct statfs` fstatfs(2) fills for `fd` (an O_PATH fd will do)."""
    buf = ctypes.create_string_buffer(STATFS.size)
    check(_fstatfs(fd, buf), "fstatfs", fd)
    return buf.raw


def _deleted(link: str) -> bool:
    return link.endswith(" (deleted)") or not link.startswith("/")


def path_in_root(tid: int, path: bytes) -> bytes:
    """`path` as a path from the root of `tid` (relative ones joined to its cwd)."""
    if path.startswith(b"/"):
        return path
    root = os.readlink(f"/proc/{tid}/root")
    cwd = os.readlink(f"/proc/{tid}/cwd")
    if _deleted(root) or _deleted(cwd):
        raise OSError(errno.ENOENT, "cwd or root deleted", tid)
    if root == "/":
        rel = cwd
    elif cwd == root:
        rel = "/"
    elif cwd.startswith(root + "/"):
        rel = cwd[len(root):]
    else:
        raise OSError(errno.ENOENT, "cwd outside the root", tid)
    return os.fsencode(rel).rstrip(b"/") + b"/" + path


class FsCreds(NamedTuple):
    uid: int
    gid: int
    groups: tuple[int, ...]


def fs_creds_of(tid: int) -> FsCreds:
    """The filesystem ids and supplementary groups of thread `tid` (/proc/TID/status)."""
    uid = gid = -1
    groups: tuple[int, ...] = ()
    with open(f"/proc/{tid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Uid:"):
                uid = int(line.split()[4])
            elif line.startswith(b"Gid:"):
                gid = int(line.split()[4])
            elif line.startswith(b"Groups:"):
                groups = tuple(int(g) for g in line.split()[1:])
    if uid < 0 or gid < 0:
        raise OSError(errno.ESRCH, "no ids in status", tid)
    return FsCreds(uid, gid, groups)


def _set_groups(groups: tuple[int, ...] | list[int]) -> None:
    arr = (ctypes.c_uint * max(1, len(groups)))(*groups)
    check(_syscall2(NR_SETGROUPS, len(groups), ctypes.addressof(arr)), "setgroups")


@contextmanager
def thread_fs_creds(creds: FsCreds) -> Iterator[None]:
    """Run the body with `creds` as this thread's filesystem ids (the agent runs as
    root: it may take any). Back to root's afterwards, checked: a thread left with a
    sliver's ids would act for it, so failing to restore them aborts the process."""
    saved = os.getgroups()
    _set_groups(creds.groups)
    try:
        _setfsgid(creds.gid)
        _setfsuid(creds.uid)
        # (each returns the id it had, as an int: high ids come back negative)
        if (_setfsuid(creds.uid) & 0xFFFFFFFF != creds.uid
                or _setfsgid(creds.gid) & 0xFFFFFFFF != creds.gid):
            raise OSError(errno.EPERM, "filesystem ids not taken", creds)
        yield
    finally:
        _setfsuid(0)
        _setfsgid(0)
        try:
            _set_groups(saved)
        except OSError:
            os.abort()
        if _setfsuid(0) != 0 or _setfsgid(0) != 0:
            os.abort()


def open_as_seen_by(tid: int, path: bytes) -> int:
    """An O_PATH fd of what `path` names for thread `tid` (following a final symlink,
    as statfs(2) does), resolved inside its root only (see the module docstring)."""
    if not path or b"\0" in path:
        raise OSError(errno.ENOENT, "empty path or NUL inside", tid)
    full = path_in_root(tid, path)
    if len(full) >= PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, "path too long", tid)
    creds = fs_creds_of(tid)
    root = os.open(f"/proc/{tid}/root", os.O_PATH | os.O_CLOEXEC)   # (as root: ptrace check)
    try:
        with thread_fs_creds(creds):
            return openat2(root, full, os.O_PATH | os.O_CLOEXEC,
                           RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    finally:
        os.close(root)

