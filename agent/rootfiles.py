"""Files inside a sliver root, reached without following any symlink below it.

A path is walked one component at a time with O_NOFOLLOW from a directory fd (the
sliver owns its COW layer and could plant a symlink to escape, nodemanager spec §9
"security hygiene"). Moved out of agent/accounts.py verbatim.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _parent_fd(root: Path, rel: str,
               make: tuple[int, int, int] | None = None) -> tuple[int, str]:
    """An fd of the directory that holds `root/rel`, reached without following any
    symlink below `root`, and the last component of `rel`. With `make` = (mode, uid,
    gid), missing directories are made so. The caller closes the fd."""
    parts = [p for p in rel.strip("/").split("/")]
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad path inside {root}: {rel!r}")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            created = False
            if make is not None:
                try:
                    os.mkdir(part, make[0], dir_fd=fd)
                    created = True
                except FileExistsError:
                    pass
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
            if created and make is not None:
                os.fchown(fd, make[1], make[2])
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def write_in_root(root: Path, rel: str, data: bytes, mode: int, uid: int, gid: int,
                  dir_mode: int = 0o700) -> None:
    """Write `root/rel` atomically without following any symlink below `root`."""
    fd, leaf = _parent_fd(root, rel, (dir_mode, uid, gid))
    try:
        tmp = f".{leaf}.agent-tmp"
        try:
            os.unlink(tmp, dir_fd=fd)
        except FileNotFoundError:
            pass
        ffd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=fd)
        try:
            os.write(ffd, data)
            os.fchown(ffd, uid, gid)
            os.fchmod(ffd, mode)
        finally:
            os.close(ffd)
        os.rename(tmp, leaf, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)


def read_in_root(root: Path, rel: str, owners: tuple[int, ...], limit: int = 1 << 20) -> bytes:
    """The contents of `root/rel`, read without following any symlink below `root`;
    b"" if it is missing, not a regular file, owned by none of `owners`, or has other
    hard links (a user's hard link to a file it cannot read must not make the agent
    copy that file's contents into the user's own file)."""
    try:
        fd, leaf = _parent_fd(root, rel)
    except OSError:
        return b""
    try:
        try:
            ffd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except OSError:
            return b""
        try:
            st = os.fstat(ffd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners or st.st_nlink != 1:
                return b""
            return os.read(ffd, limit)
        finally:
            os.close(ffd)
    finally:
        os.close(fd)


def _parent_fd_close(root: Path, rel: str, make: tuple[int, int, int]) -> None:
    fd, _ = _parent_fd(root, rel, make)
    os.close(fd)


def remove_in_root(root: Path, rel: str) -> None:
    """Remove `root/rel` without following any symlink below `root` (gone already: fine)."""
    try:
        fd, leaf = _parent_fd(root, rel)
    except OSError:
        return
    try:
        os.unlink(leaf, dir_fd=fd)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        pass
    finally:
        os.close(fd)
