"""Thin ctypes wrappers over the Linux mount API (mount(2), umount2(2) and the new
fd-based calls: open_tree, mount_setattr, move_mount, fsopen, fsconfig, fsmount).

Constants and struct layouts mirror <linux/mount.h> (kernel 6.x). Every failure
raises OSError(errno, "<operation>: <reason>", <object>). No policy lives here.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kernel.libc import (
    LIBC,
    NR_FSCONFIG,
    NR_FSMOUNT,
    NR_FSOPEN,
    NR_MOUNT_SETATTR,
    NR_MOVE_MOUNT,
    NR_OPEN_TREE,
    NR_STATX,
    error,
    function,
)
from kernel.libc import check as _check_errno

# open_tree(2)
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_SYMLINK_NOFOLLOW = 0x100

# move_mount(2)
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MOVE_MOUNT_T_EMPTY_PATH = 0x00000040

# mount_setattr(2) / fsmount(2) attributes
MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_NOSUID = 0x00000002
MOUNT_ATTR_NODEV = 0x00000004
MOUNT_ATTR_NOEXEC = 0x00000008
MOUNT_ATTR_NOATIME = 0x00000010
MOUNT_ATTR_IDMAP = 0x00100000
MOUNT_ATTR_NOSYMFOLLOW = 0x00200000

# fsopen(2) / fsmount(2) / fsconfig(2)
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_BINARY = 2
FSCONFIG_SET_PATH = 3
FSCONFIG_SET_PATH_EMPTY = 4
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
FSCONFIG_CMD_RECONFIGURE = 7

# mount(2) flags and umount2(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


class MountAttr(ctypes.Structure):
    """struct mount_attr (MOUNT_ATTR_SIZE_VER0 = 32 bytes)."""

    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_syscall = LIBC.syscall
_mount = function("mount", ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                  ctypes.c_ulong, ctypes.c_void_p)
_umount2 = function("umount2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int)


def _check(ret: int, op: str, subject: object) -> int:
    return _check_errno(ret, op, str(subject))


def _b(path: str | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def open_tree(path: str | os.PathLike[str], *, clone: bool = True,
              recursive: bool = False, dirfd: int = -100) -> int:
    """Return an fd for the mount at `path`; with `clone`, a detached copy of it."""
    flags = OPEN_TREE_CLOEXEC | (OPEN_TREE_CLONE if clone else 0)
    if recursive:
        flags |= AT_RECURSIVE
    ret = _syscall(NR_OPEN_TREE, ctypes.c_int(dirfd), ctypes.c_char_p(_b(path)),
                   ctypes.c_uint(flags))
    return _check(ret, "open_tree", path)


def mount_setattr(fd: int, *, attr_set: int = 0, attr_clr: int = 0,
                  userns_fd: int | None = None, recursive: bool = False,
                  subject: object = "") -> None:
    """Change the attributes of the mount `fd` (from open_tree/fsmount).

    With `userns_fd`, MOUNT_ATTR_IDMAP makes the mount show the ids of that user
    namespace's map: a file owned by 0 on disk reads as owned by the map's host base.
    """
    attr = MountAttr(attr_set, attr_clr, 0, 0 if userns_fd is None else userns_fd)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    ret = _syscall(NR_MOUNT_SETATTR, ctypes.c_int(fd), ctypes.c_char_p(b""),
                   ctypes.c_uint(flags), ctypes.byref(attr),
                   ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(ret, "mount_setattr", subject or f"fd {fd}")


def move_mount(fd: int, target: str | os.PathLike[str]) -> None:
    """Attach the detached mount `fd` at `target`."""
    ret = _syscall(NR_MOVE_MOUNT, ctypes.c_int(fd), ctypes.c_char_p(b""),
                   ctypes.c_int(-100), ctypes.c_char_p(_b(target)),
                   ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    _check(ret, "move_mount", target)


def fsopen(fstype: str) -> int:
    """Open a filesystem context for `fstype` (e.g. "overlay")."""
    ret = _syscall(NR_FSOPEN, ctypes.c_char_p(fstype.encode()), ctypes.c_uint(FSOPEN_CLOEXEC))
    return _check(ret, "fsopen", fstype)


def _fs_log(fs_fd: int) -> str:
    """Drain the messages the kernel left on a filesystem context (read(2) on it)."""
    msgs = []
    for _ in range(16):
        try:
            data = os.read(fs_fd, 1024)
        except OSError:
            break
        if not data:
            break
        msgs.append(data.decode(errors="replace").strip())
    return "; ".join(msgs)


def fsconfig(fs_fd: int, cmd: int, key: str | None = None,
             value: str | bytes | None = None, aux: int = 0) -> None:
    """One fsconfig(2) step; on failure the kernel's own message is in the error."""
    kb = None if key is None else key.encode()
    vb = value.encode() if isinstance(value, str) else value
    ret = _syscall(NR_FSCONFIG, ctypes.c_int(fs_fd), ctypes.c_uint(cmd),
                   ctypes.c_char_p(kb), ctypes.c_char_p(vb), ctypes.c_int(aux))
    if ret < 0:
        err = ctypes.get_errno()
        log = _fs_log(fs_fd)
        what = f"fsconfig {key}" if key else f"fsconfig cmd {cmd}"
        raise OSError(err, f"{what}: {os.strerror(err)}" + (f" ({log})" if log else ""),
                      str(value) if isinstance(value, str) else what)


def fsmount(fs_fd: int, attr_flags: int = 0) -> int:
    """Turn a created filesystem context into a detached mount fd."""
    ret = _syscall(NR_FSMOUNT, ctypes.c_int(fs_fd), ctypes.c_uint(FSMOUNT_CLOEXEC),
                   ctypes.c_uint(attr_flags))
    return _check(ret, "fsmount", f"fs fd {fs_fd}")


def mount(source: str | None, target: str | os.PathLike[str], fstype: str | None,
          flags: int = 0, data: str | None = None) -> None:
    """mount(2)."""
    ret = _mount(_b(source), _b(target), None if fstype is None else fstype.encode(),
                 flags, None if data is None else ctypes.c_char_p(data.encode()))
    _check(ret, "mount", target)


def umount(target: str | os.PathLike[str], *, detach: bool = False) -> None:
    """umount2(2) without following a symlink at `target`."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    _check(_umount2(_b(target), flags), "umount", target)


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo (the fields we use)."""

    mount_id: int
    mount_point: str
    fstype: str
    source: str
    options: str
    super_options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        octal = field[i + 1:i + 4]
        if field[i] == "\\" and len(octal) == 3 and octal.isdigit():
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo(pid: str = "self") -> Iterator[MountInfo]:
    """Parse /proc/<pid>/mountinfo."""
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            lf = left.split(" ")
            rf = right.split(" ")
            yield MountInfo(int(lf[0]), _unescape(lf[4]), rf[0],
                            _unescape(rf[1]) if len(rf) > 1 else "",
                            lf[5], rf[2] if len(rf) > 2 else "")


def mounts_under(path: Path) -> list[MountInfo]:
    """Mounts at `path` or below it, deepest first (the order to unmount them in)."""
    base = os.path.realpath(path)
    prefix = base.rstrip("/") + "/"
    found = [m for m in mountinfo() if m.mount_point == base or m.mount_point.startswith(prefix)]
    return sorted(found, key=lambda m: (m.mount_point.count("/"), m.mount_id), reverse=True)


AT_FDCWD = -100
STATX_ATTR_MOUNT_ROOT = 0x00002000


class _Statx(ctypes.Structure):
    """The head of struct statx (the rest of its 256 bytes is padding here)."""

    _fields_ = [("stx_mask", ctypes.c_uint32), ("stx_blksize", ctypes.c_uint32),
                ("stx_attributes", ctypes.c_uint64), ("rest1", ctypes.c_uint8 * 40),
                ("stx_attributes_mask", ctypes.c_uint64), ("rest2", ctypes.c_uint8 * 192)]


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """True if `path` (not followed if a symlink) is the root of a mount.

    statx's STATX_ATTR_MOUNT_ROOT (kernel 5.8+) answers for bind mounts of the same
    filesystem too, which comparing st_dev with the parent cannot; mountinfo is the
    fallback where the attribute is not reported.
    """
    buf = _Statx()
    ret = _syscall(NR_STATX, ctypes.c_int(AT_FDCWD), ctypes.c_char_p(_b(path)),
                   ctypes.c_int(AT_SYMLINK_NOFOLLOW), ctypes.c_uint(0), ctypes.byref(buf))
    if ret < 0:
        exc = error("statx", str(path))
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise exc
    if buf.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT:
        return bool(buf.stx_attributes & STATX_ATTR_MOUNT_ROOT)
    base = os.path.realpath(path)
    return any(m.mount_point == base for m in mountinfo())


def close_quietly(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError as exc:  # already closed is fine; anything else is a bug
            if exc.errno != errno.EBADF:
                raise


class IdmapUserns:
    """A user namespace whose uid and gid maps are `0 -> base` for `count` ids, held
    open as an fd for MOUNT_ATTR_IDMAP.

    A throwaway process (`unshare -U`) creates the namespace; we write its maps from
    outside (as root in the parent namespace, so setgroups need not be denied), open
    /proc/<pid>/ns/user, then kill and reap the process. The fd keeps the namespace
    alive for as long as it is open; an idmapped mount keeps its own reference, so
    closing the fd after mount_setattr is safe.

    Use as a context manager: `with IdmapUserns(base) as fd: ...`.
    """

    # A static busybox starts in about half the time of util-linux's dynamic unshare
    # followed by sleep (0.7 ms against 1.4 ms here); util-linux is the fallback.
    HELPERS = (
        ("/bin/busybox", "unshare", "-U", "--", "/bin/busybox", "sleep", "60"),
        ("/usr/bin/unshare", "--user", "--", "/bin/sleep", "60"),
    )

    def __init__(self, base: int, count: int = 65536) -> None:
        if base < 1 or count < 1 or base + count > 2**32 - 1:
            raise ValueError(f"bad id range for idmapped mount: base {base}, count {count}")
        self.base = base
        self.count = count
        self.fd = -1

    def __enter__(self) -> int:
        errors = []
        for argv in self.HELPERS:
            if not os.access(argv[0], os.X_OK):
                continue
            try:
                self.fd = self._make(list(argv))
                return self.fd
            except OSError as exc:
                errors.append(f"{argv[0]}: {exc.strerror}")
        raise OSError(errno.EPERM, "cannot create a user namespace for an idmapped mount ("
                      + ("; ".join(errors) or "no unshare helper installed") + ")",
                      "unshare")

    def _make(self, argv: list[str]) -> int:
        import subprocess
        import time

        own = os.readlink("/proc/self/ns/user")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    if os.readlink(f"/proc/{proc.pid}/ns/user") != own:
                        break
                except FileNotFoundError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = b""
                    if proc.poll() is not None and proc.stderr:
                        err = proc.stderr.read()
                    raise OSError(errno.EPERM, err.decode(errors="replace").strip()
                                  or "no new user namespace", argv[0])
                time.sleep(0.0002)
            line = f"0 {self.base} {self.count}\n"
            for kind in ("uid_map", "gid_map"):
                with open(f"/proc/{proc.pid}/{kind}", "w") as f:
                    f.write(line)
            return os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()

    def __exit__(self, *exc: object) -> None:
        close_quietly(self.fd)
        self.fd = -1
