"""statfs(2) and fstatfs(2) of a guarded sliver: its root filesystem reports its own
disk limit (issue 15: `df /` inside a sliver shows disk_max, docs/guard.md).

The sliver's root is an overlay whose upper layer is a btrfs subvolume limited by a
qgroup (kernel/disk.py); overlayfs answers statfs from the upper filesystem and
btrfs ignores qgroups, so the kernel's answer is the node's whole store. The guard
filter notifies both calls; for each, `StatfsAnswers.answer`:

1. finds what the caller names, as the caller sees it and nothing else: for
   fstatfs an O_PATH open of /proc/TID/fd/N (no open of the file itself: no device,
   FIFO or lock side effect); for statfs the path read from the caller's memory
   (NUL within PATH_MAX) resolved by openat2 in the caller's root with
   RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS (kernel/fsview.py): no host path is ever
   looked up on the sliver's behalf;
2. if that is on the sliver's overlay (f_type overlayfs and the f_fsid of the
   sliver's root: btrfs mixes the layer subvolume's id into it, so it is this
   sliver's own) and the layer has a limit: the real figures of the overlay with
   f_blocks = limit and f_bfree = f_bavail = limit - used (the qgroup's referenced
   bytes, what the limit applies to; as of the last btrfs commit, read at most once
   a second per sliver), written to the caller's buffer through /proc/TID/mem after
   NOTIF_ID_VALID (the seccomp_unotify(2) order), or EFAULT if the buffer is not
   writable memory of the caller;
3. in every other case (another filesystem, no limit, an unreadable path, a path
   that does not resolve, any error), CONTINUE: the kernel makes the call itself,
   with its own errors. Safe because nothing is authorised by it: a caller racing
   its own path or memory only changes which figures it sees of its own view.

The lookup runs under the caller's filesystem ids (kernel/fsview.py), so it finds
only what the caller may reach itself; where it would need a capability, the kernel
answers.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from agent.guard.decide import Outcome
from kernel import disk, seccomp
from kernel.fsview import (
    OVERLAYFS_SUPER_MAGIC,
    PATH_MAX,
    STATFS,
    fstatfs_raw,
    open_as_seen_by,
)
from kernel.libc import NR_FSTATFS, NR_STATFS
from kernel.pidfd import open_memory, read_cstring, writable

#: The answer that lets the kernel make the call itself (SECCOMP_USER_NOTIF_FLAG_CONTINUE).
CONTINUED = Outcome(0, "statfs: the kernel's own answer")
USAGE_TTL = 1.0   # seconds a sliver's root fsid, usage and limit are reused
NOTIFIED = (NR_STATFS, NR_FSTATFS)


class SliverDisk(NamedTuple):
    """Where a sliver's disk is, as the host sees it."""

    root: Path    # the overlay mount (<roots_dir>/NAME)
    layer: Path   # its btrfs subvolume, whose qgroup holds the limit


DiskOf = Callable[[str], "SliverDisk | None"]


def sliver_disks(roots_dir: Path) -> DiskOf:
    """`disk_of` for `StatfsAnswers` over the agent's roots dir (kernel/rootfs.py)."""
    layers = disk.layers_dir(Path(roots_dir))

    def disk_of(name: str) -> SliverDisk | None:
        layer = layers / name
        return SliverDisk(Path(roots_dir) / name, layer) if layer.is_dir() else None
    return disk_of


class _Figures(NamedTuple):
    stamp: float
    fsid: tuple[int, int]
    used: int
    limit: int | None


class StatfsAnswers:
    """Answers the statfs/fstatfs notifications (see the module docstring)."""

    def __init__(self, disk_of: DiskOf | None) -> None:
        self.disk_of = disk_of
        self._figures: dict[str, _Figures] = {}
        self.answered = 0   # calls answered with the sliver's limit

    def forget(self, slice_name: str) -> None:
        self._figures.pop(slice_name, None)

    def figures(self, slice_name: str) -> _Figures | None:
        """The sliver's root fsid, usage and limit (bytes), at most USAGE_TTL old."""
        now = time.monotonic()
        f = self._figures.get(slice_name)
        if f is not None and now - f.stamp < USAGE_TTL:
            return f
        where = self.disk_of(slice_name) if self.disk_of is not None else None
        if where is None:
            return None
        fd = os.open(where.root, os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY)
        try:
            st = STATFS.unpack(fstatfs_raw(fd))
        finally:
            os.close(fd)
        if st[0] != OVERLAYFS_SUPER_MAGIC:   # not mounted (any more)
            return None
        used, limit = disk.qgroup_usage(where.layer, disk.subvol_id(where.layer))
        f = self._figures[slice_name] = _Figures(now, (st[7], st[8]), used, limit)
        return f

    def answer(self, slice_name: str, listener: int, n: seccomp.Notification) -> Outcome:
        try:
            fd = self._target(n)
        except (OSError, ValueError):
            return CONTINUED
        try:
            st = STATFS.unpack(fstatfs_raw(fd))
            if st[0] != OVERLAYFS_SUPER_MAGIC:
                return CONTINUED
            f = self.figures(slice_name)
        except OSError:
            return CONTINUED
        finally:
            os.close(fd)
        if f is None or f.limit is None or (st[7], st[8]) != f.fsid:
            return CONTINUED
        unit = st[10] or st[1]   # f_frsize, else f_bsize
        free = max(0, f.limit - f.used) // unit
        mine = STATFS.pack(st[0], st[1], f.limit // unit, free, free, *st[5:])
        return self._write(listener, n, n.args[1], mine)

    @staticmethod
    def _target(n: seccomp.Notification) -> int:
        """An O_PATH fd of what the call names (OSError: let the kernel say)."""
        if n.nr == NR_FSTATFS:
            fdnum = n.args[0] & 0xFFFFFFFF
            if fdnum >= 2**31:
                raise OSError(errno.EBADF, "negative fd")
            return os.open(f"/proc/{n.pid}/fd/{fdnum}", os.O_PATH | os.O_CLOEXEC)
        if n.nr != NR_STATFS:
            raise ValueError(f"syscall {n.nr}")
        return open_as_seen_by(n.pid, read_cstring(n.pid, n.args[0], PATH_MAX))

    def _write(self, listener: int, n: seccomp.Notification, buf: int, data: bytes) -> Outcome:
        try:
            mem = open_memory(n.pid)
        except OSError:
            return CONTINUED   # gone: the reply fails too
        try:
            with open(f"/proc/{n.pid}/maps", "rb", buffering=0) as maps:
                # Both files are of this thread's mm from here on; is it still the caller?
                if not seccomp.notif_id_valid(listener, n.id):
                    return Outcome(errno.ESRCH, "statfs: caller no longer waiting")
                if writable(maps.fileno(), buf, len(data)) is False:
                    return Outcome(errno.EFAULT, "statfs: buffer not writable")
            if os.pwrite(mem, data, buf) != len(data):
                return Outcome(errno.EFAULT, "statfs: short write")
        except (OSError, OverflowError):
            return Outcome(errno.EFAULT, "statfs: buffer not writable")
        finally:
            os.close(mem)
        self.answered += 1
        return Outcome(0, "statfs: the sliver's disk_max")
