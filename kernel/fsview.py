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
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

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


def open_as_seen_by(tid: int, path: bytes) -> int:
    """An O_PATH fd of what `path` names for thread `tid` (following a final symlink,
    as statfs(2) does), resolved inside its root only (see the module docstring)."""
    if not path or b"\0" in path:
        raise OSError(errno.ENOENT, "empty path or NUL inside", tid)
    full = path_in_root(tid, path)
    if len(full) >= PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, "path too long", tid)
    root = os.open(f"/proc/{tid}/root", os.O_PATH | os.O_CLOEXEC)
    try:
        return openat2(root, full, os.O_PATH | os.O_CLOEXEC,
                       RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    finally:
        os.close(root)

