"""Per-sliver disk limits: one loop-backed btrfs filesystem per node holds every
sliver's copy-on-write layer as a subvolume with a quota group limit.

Why this mechanism (see docs/kernel-images.md): this kernel has no ext4/XFS quota
formats, so the choice is between one btrfs filesystem with a qgroup limit per
subvolume and one filesystem image per sliver on its own loop device. The first costs
one loop device per node instead of one per sliver, about 16 KiB of metadata per
empty sliver instead of a whole filesystem's, and a limit that changes in place with
one ioctl. Simple quotas (kernel 6.7+) keep qgroup accounting cheap with many
subvolumes.

The lower half of this module is thin ctypes wrappers over the btrfs ioctls (struct
sizes and numbers mirror <linux/btrfs.h>); every ioctl takes an fd of a directory on
the filesystem, and errors raise OSError(errno, "<op>: ...", <path>).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import uuid
from pathlib import Path

from kernel.libc import LIBC, check

BTRFS_IOCTL_MAGIC = 0x94
BTRFS_PATH_NAME_MAX = 4087
BTRFS_INO_LOOKUP_PATH_MAX = 4080
BTRFS_FIRST_FREE_OBJECTID = 256  # inode number of a subvolume's root directory

BTRFS_QUOTA_CTL_ENABLE = 1
BTRFS_QUOTA_CTL_DISABLE = 2
BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA = 4

BTRFS_QGROUP_LIMIT_MAX_RFER = 1 << 0
BTRFS_QGROUP_LIMIT_MAX_EXCL = 1 << 1
CLEAR_LIMIT = 2**64 - 1  # a limit of (u64)-1 removes it (fs/btrfs/qgroup.c)


class VolArgs(ctypes.Structure):
    """struct btrfs_ioctl_vol_args (4096 bytes)."""

    _fields_ = [("fd", ctypes.c_int64), ("name", ctypes.c_char * (BTRFS_PATH_NAME_MAX + 1))]


class InoLookupArgs(ctypes.Structure):
    """struct btrfs_ioctl_ino_lookup_args (4096 bytes)."""

    _fields_ = [("treeid", ctypes.c_uint64), ("objectid", ctypes.c_uint64),
                ("name", ctypes.c_char * BTRFS_INO_LOOKUP_PATH_MAX)]


class QuotaCtlArgs(ctypes.Structure):
    """struct btrfs_ioctl_quota_ctl_args."""

    _fields_ = [("cmd", ctypes.c_uint64), ("status", ctypes.c_uint64)]


class QgroupLimit(ctypes.Structure):
    """struct btrfs_qgroup_limit."""

    _fields_ = [("flags", ctypes.c_uint64), ("max_rfer", ctypes.c_uint64),
                ("max_excl", ctypes.c_uint64), ("rsv_rfer", ctypes.c_uint64),
                ("rsv_excl", ctypes.c_uint64)]


class QgroupLimitArgs(ctypes.Structure):
    """struct btrfs_ioctl_qgroup_limit_args."""

    _fields_ = [("qgroupid", ctypes.c_uint64), ("lim", QgroupLimit)]


class QgroupCreateArgs(ctypes.Structure):
    """struct btrfs_ioctl_qgroup_create_args."""

    _fields_ = [("create", ctypes.c_uint64), ("qgroupid", ctypes.c_uint64)]


class FsInfoArgs(ctypes.Structure):
    """struct btrfs_ioctl_fs_info_args (1024 bytes); we read the fsid only."""

    _fields_ = [("max_id", ctypes.c_uint64), ("num_devices", ctypes.c_uint64),
                ("fsid", ctypes.c_uint8 * 16), ("rest", ctypes.c_uint8 * (1024 - 32))]


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr


_W, _R, _RW = 1, 2, 3
BTRFS_IOC_RESIZE = _ioc(_W, 3, ctypes.sizeof(VolArgs))
BTRFS_IOC_SUBVOL_CREATE = _ioc(_W, 14, ctypes.sizeof(VolArgs))
BTRFS_IOC_SNAP_DESTROY = _ioc(_W, 15, ctypes.sizeof(VolArgs))
BTRFS_IOC_INO_LOOKUP = _ioc(_RW, 18, ctypes.sizeof(InoLookupArgs))
BTRFS_IOC_FS_INFO = _ioc(_R, 31, ctypes.sizeof(FsInfoArgs))
BTRFS_IOC_QUOTA_CTL = _ioc(_RW, 40, ctypes.sizeof(QuotaCtlArgs))
BTRFS_IOC_QGROUP_CREATE = _ioc(_W, 42, ctypes.sizeof(QgroupCreateArgs))
BTRFS_IOC_QGROUP_LIMIT = _ioc(_R, 43, ctypes.sizeof(QgroupLimitArgs))


def _ioctl(path: Path, request: int, arg: ctypes.Structure, op: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, arg)  # type: ignore[call-overload]
    except OSError as exc:
        raise OSError(exc.errno, f"{op}: {os.strerror(exc.errno or 0)}", str(path)) from None
    finally:
        os.close(fd)


def _name(name: str) -> bytes:
    raw = os.fsencode(name)
    if not raw or b"/" in raw or raw in (b".", b"..") or len(raw) > BTRFS_PATH_NAME_MAX:
        raise ValueError(f"bad subvolume name {name!r}")
    return raw


def subvol_create(parent: Path, name: str) -> None:
    """Create subvolume `parent/name` (EEXIST if the name is taken)."""
    args = VolArgs(0, _name(name))
    _ioctl(parent, BTRFS_IOC_SUBVOL_CREATE, args, "create btrfs subvolume")


def subvol_delete(parent: Path, name: str) -> None:
    """Delete subvolume `parent/name` with everything in it (root only).

    The space is given back asynchronously by the filesystem's cleaner thread.
    """
    args = VolArgs(0, _name(name))
    _ioctl(parent, BTRFS_IOC_SNAP_DESTROY, args, "delete btrfs subvolume")


def resize_max(fs_path: Path) -> None:
    """Grow the filesystem to the whole size of its (single) device."""
    args = VolArgs(0, b"max")
    _ioctl(fs_path, BTRFS_IOC_RESIZE, args, "resize btrfs filesystem")


LOOP_SET_CAPACITY = 0x4C07


def loop_set_capacity(device: str) -> None:
    """Make a loop device re-read the size of its backing file."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
    except OSError as exc:
        raise OSError(exc.errno, f"loop set capacity: {os.strerror(exc.errno or 0)}",
                      device) from None
    finally:
        os.close(fd)


def is_subvolume(path: Path) -> bool:
    """True if `path` is the root directory of a btrfs subvolume."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return st.st_ino == BTRFS_FIRST_FREE_OBJECTID and _is_btrfs(path)


def _is_btrfs(path: Path) -> bool:
    BTRFS_SUPER_MAGIC = 0x9123683E
    buf = (ctypes.c_long * 16)()
    if LIBC.statfs(os.fsencode(path), buf) != 0:
        return False
    return (buf[0] & 0xFFFFFFFF) == BTRFS_SUPER_MAGIC


def subvol_id(path: Path) -> int:
    """The subvolume (tree) id that `path` lives in."""
    args = InoLookupArgs(0, BTRFS_FIRST_FREE_OBJECTID, b"")
    _ioctl(path, BTRFS_IOC_INO_LOOKUP, args, "look up btrfs subvolume id")
    return int(args.treeid)


def fsid(path: Path) -> str:
    """The filesystem's UUID, as named under /sys/fs/btrfs/."""
    args = FsInfoArgs()
    _ioctl(path, BTRFS_IOC_FS_INFO, args, "read btrfs filesystem info")
    return str(uuid.UUID(bytes=bytes(args.fsid)))


def quota_enable(path: Path, *, simple: bool = True) -> str:
    """Enable quota accounting; return "simple" or "full".

    Simple quotas (kernel 6.7+) charge each extent to the subvolume that wrote it and
    skip the backref walks that make full qgroups slow with many subvolumes; when the
    kernel refuses them we fall back to full qgroups.
    """
    if simple:
        try:
            _ioctl(path, BTRFS_IOC_QUOTA_CTL, QuotaCtlArgs(BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA, 0),
                   "enable btrfs simple quotas")
            return "simple"
        except OSError as exc:
            if exc.errno not in (22, 95):  # EINVAL, EOPNOTSUPP: kernel too old
                raise
    _ioctl(path, BTRFS_IOC_QUOTA_CTL, QuotaCtlArgs(BTRFS_QUOTA_CTL_ENABLE, 0),
           "enable btrfs quotas")
    return "full"


def qgroup_limit(subvol: Path, max_bytes: int | None) -> None:
    """Set (or with None clear) the referenced-bytes limit of the subvolume's qgroup.

    qgroupid 0 means "the subvolume the fd is in".
    """
    value = CLEAR_LIMIT if max_bytes is None else int(max_bytes)
    if value <= 0:
        raise ValueError(f"bad disk limit {max_bytes!r} bytes for {subvol}")
    lim = QgroupLimit(BTRFS_QGROUP_LIMIT_MAX_RFER | BTRFS_QGROUP_LIMIT_MAX_EXCL, value, value,
                      0, 0)
    _ioctl(subvol, BTRFS_IOC_QGROUP_LIMIT, QgroupLimitArgs(0, lim), "set btrfs qgroup limit")


def qgroup_destroy(fs_path: Path, subvolid: int) -> None:
    """Remove qgroup 0/<subvolid> (EBUSY while it still accounts for data)."""
    _ioctl(fs_path, BTRFS_IOC_QGROUP_CREATE, QgroupCreateArgs(0, subvolid),
           "remove btrfs qgroup")


def qgroup_sysfs(fs_path: Path, subvolid: int) -> Path:
    return Path("/sys/fs/btrfs") / fsid(fs_path) / "qgroups" / f"0_{subvolid}"


def qgroup_usage(fs_path: Path, subvolid: int) -> tuple[int, int | None]:
    """(referenced bytes, limit in bytes or None) of qgroup 0/<subvolid>, from sysfs.

    Figures are those of the last committed transaction (btrfs updates qgroup usage
    at commit time, about every 30 s or on sync).
    """
    d = qgroup_sysfs(fs_path, subvolid)
    used = int((d / "referenced").read_text())
    limit = int((d / "max_referenced").read_text())
    flags = int((d / "limit_flags").read_text())
    return used, (limit if flags & BTRFS_QGROUP_LIMIT_MAX_RFER else None)


def sync_fs(path: Path) -> None:
    """syncfs(2) on the filesystem of `path` (commits the transaction)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        check(LIBC.syncfs(fd), "syncfs", str(path))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# The node's layer store: <roots_dir>/.disk/layers.btrfs mounted on .disk/layers
# ---------------------------------------------------------------------------

KIB = 1024
DEFAULT_STORE_KIB = 32 * 1024 * 1024   # 32 GiB, sparse: costs only what slivers write
MIN_STORE_KIB = 256 * 1024             # mkfs.btrfs needs about 114 MiB
MKFS = "/sbin/mkfs.btrfs"
MOUNT = "/bin/mount"


class DiskError(OSError):
    """A disk-layer operation failed; the message names the operation and the object."""


def _store_dirs(roots_dir: Path) -> tuple[Path, Path, Path]:
    base = Path(roots_dir) / ".disk"
    return base, base / "layers.btrfs", base / "layers"


def layers_dir(roots_dir: Path) -> Path:
    """Where the btrfs store is mounted (each sliver's layer is a subvolume in it)."""
    return _store_dirs(roots_dir)[2]


def store_mounted(roots_dir: Path) -> bool:
    from kernel.mount import is_mountpoint

    mnt = layers_dir(roots_dir)
    return mnt.is_dir() and is_mountpoint(mnt) and _is_btrfs(mnt)


def store_exists(roots_dir: Path) -> bool:
    """True once the store's backing file has been made (mounted or not)."""
    return _store_dirs(roots_dir)[1].is_file()


def default_store_kib(roots_dir: Path) -> int:
    """32 GiB, or half the free space of the host filesystem when that is less."""
    st = os.statvfs(Path(roots_dir))
    free_kib = st.f_bavail * st.f_frsize // KIB
    return max(MIN_STORE_KIB, min(DEFAULT_STORE_KIB, free_kib // 2))


def ensure_store(roots_dir: Path, size_kib: int | None = None) -> Path:
    """Create (first use) and mount the layer store; return its mount point.

    The image file is sparse; it is formatted under a temporary name and renamed, so
    a crash never leaves a half-made filesystem under the real name. The loop device
    is set up by mount(8) with autoclear: unmounting the store frees it.
    Idempotent. The caller holds the roots lock.
    """
    import subprocess

    base, img, mnt = _store_dirs(roots_dir)
    if store_mounted(roots_dir):
        if size_kib is not None and size_kib * KIB > os.stat(img).st_size:
            grow_store(roots_dir, size_kib)
        return mnt
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o700)
    if not img.exists():
        size = size_kib if size_kib is not None else default_store_kib(roots_dir)
        if size < MIN_STORE_KIB:
            raise DiskError(f"disk store size {size} KiB is too small "
                            f"(at least {MIN_STORE_KIB} KiB): raise disk_store_kib")
        tmp = img.with_name(img.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.truncate(size * KIB)
            res = subprocess.run([MKFS, "-q", "-f", "-m", "single", "-d", "single",
                                  "-L", "planetlab-layers", str(tmp)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise DiskError(f"mkfs.btrfs {tmp} failed: {res.stderr.strip()}")
            os.rename(tmp, img)
        finally:
            tmp.unlink(missing_ok=True)
    mnt.mkdir(exist_ok=True)
    res = subprocess.run([MOUNT, "-t", "btrfs", "-o", "loop,noatime", str(img), str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise DiskError(f"mounting the layer store {img} on {mnt} failed: {res.stderr.strip()}")
    try:
        if not qgroup_sysfs(mnt, 5).parent.is_dir():
            quota_enable(mnt)
    except BaseException:
        from kernel.mount import umount
        umount(mnt)
        raise
    return mnt


def store_size_kib(roots_dir: Path) -> int:
    """The layer store's size (its backing file's apparent size)."""
    return os.stat(_store_dirs(roots_dir)[1]).st_size // KIB


def grow_store(roots_dir: Path, size_kib: int) -> None:
    """Grow the mounted layer store in place to `size_kib`: extend the sparse file,
    have the loop device re-read its size, and resize btrfs to fill it. Slivers keep
    running. Shrinking is refused (btrfs could, but it moves data: do it offline)."""
    from kernel.mount import mountinfo

    _, img, mnt = _store_dirs(roots_dir)
    current = os.stat(img).st_size
    if size_kib * KIB < current:
        raise DiskError(f"layer store {img} is {current // KIB} KiB; shrinking it to "
                        f"{size_kib} KiB in place is not supported")
    if size_kib * KIB == current:
        return
    real = os.path.realpath(mnt)
    devices = [mi.source for mi in mountinfo() if mi.mount_point == real]
    if not devices or not devices[-1].startswith("/dev/loop"):
        raise DiskError(f"layer store {mnt} is not mounted from a loop device")
    with open(img, "r+b") as f:
        f.truncate(size_kib * KIB)
    loop_set_capacity(devices[-1])
    resize_max(mnt)


def unmount_store(roots_dir: Path, *, remove: bool = False) -> None:
    """Unmount the layer store (its loop device goes with it); with `remove`, delete
    its image file too. Refused while a sliver layer is in it. Idempotent."""
    from kernel.mount import umount

    base, img, mnt = _store_dirs(roots_dir)
    if store_mounted(roots_dir):
        live = [p.name for p in mnt.iterdir()]
        if live:
            raise DiskError(f"layer store {mnt} still holds layers {sorted(live)[:5]}: "
                            "release those roots first")
        umount(mnt)
    if remove:
        img.unlink(missing_ok=True)
        _pending_file(roots_dir).unlink(missing_ok=True)
        for p in (mnt, base):
            try:
                p.rmdir()
            except FileNotFoundError:
                pass


def _pending_file(roots_dir: Path) -> Path:
    return _store_dirs(roots_dir)[0] / "stale-qgroups"


def reap_qgroups(roots_dir: Path) -> None:
    """Remove qgroups of deleted layers once btrfs has freed their space.

    A deleted subvolume's qgroup stays busy until the cleaner thread has dropped its
    extents, so release_layer records the id and we retry here (and on every later
    create/release) rather than wait.
    """
    pending = _pending_file(roots_dir)
    if not pending.exists() or not store_mounted(roots_dir):
        return
    mnt = layers_dir(roots_dir)
    words = pending.read_text().split()
    if not words:
        return
    qdir = qgroup_sysfs(mnt, 0).parent
    left = []
    for word in words:
        sid = int(word)
        if not (qdir / f"0_{sid}").exists():
            continue
        try:
            qgroup_destroy(mnt, sid)
        except OSError as exc:
            if exc.errno == 2:   # ENOENT: gone meanwhile (btrfs drops a dropped
                continue         # subvolume's squota qgroup by itself)
            if exc.errno != 16:  # EBUSY: not freed yet
                raise
            left.append(word)
    tmp = pending.with_name(pending.name + ".tmp")
    tmp.write_text("".join(w + "\n" for w in left))
    os.replace(tmp, pending)


def create_layer(roots_dir: Path, name: str, owner: int, mode: int,
                 disk_max_kib: int | None) -> Path:
    """Create the sliver's subvolume with upper/ (owned by `owner`, the range base,
    with the image root's `mode`) and work/, and set its limit. On failure the
    subvolume is deleted again."""
    mnt = layers_dir(roots_dir)
    subvol_create(mnt, name)
    layer = mnt / name
    try:
        (layer / "upper").mkdir(mode=0o700)
        os.chown(layer / "upper", owner, owner)
        os.chmod(layer / "upper", mode)
        (layer / "work").mkdir(mode=0o700)
        if disk_max_kib is not None:
            set_layer_limit(roots_dir, name, disk_max_kib)
    except BaseException:
        delete_layer(roots_dir, name)
        raise
    return layer


def _check_kib(disk_max_kib: int | None, name: str) -> None:
    if disk_max_kib is not None and (not isinstance(disk_max_kib, int)
                                     or isinstance(disk_max_kib, bool) or disk_max_kib <= 0):
        raise ValueError(f"bad disk_max for sliver {name!r}: {disk_max_kib!r} "
                         "(a positive number of KiB, or None for no limit)")


def set_layer_limit(roots_dir: Path, name: str, disk_max_kib: int | None) -> None:
    """Set or clear (None) the sliver's disk limit, in place."""
    _check_kib(disk_max_kib, name)
    layer = layers_dir(roots_dir) / name
    if not is_subvolume(layer):
        raise DiskError(f"sliver {name!r} has no disk layer in {layers_dir(roots_dir)}")
    qgroup_limit(layer, None if disk_max_kib is None else disk_max_kib * KIB)


def delete_layer(roots_dir: Path, name: str) -> None:
    """Delete the sliver's subvolume and (now or later) its qgroup. Idempotent."""
    mnt = layers_dir(roots_dir)
    layer = mnt / name
    if not store_mounted(roots_dir) or not os.path.lexists(layer):
        return
    sid = subvol_id(layer) if is_subvolume(layer) else None
    if sid is None:  # a plain directory left by something else: refuse to guess
        raise DiskError(f"{layer} is not a btrfs subvolume; remove it by hand")
    subvol_delete(mnt, name)
    try:
        qgroup_destroy(mnt, sid)
    except OSError as exc:
        if exc.errno not in (16, 2):  # EBUSY (space not freed yet), ENOENT
            raise
        with open(_pending_file(roots_dir), "a") as f:
            f.write(f"{sid}\n")
    reap_qgroups(roots_dir)


def layer_usage_kib(roots_dir: Path, name: str, *, sync: bool = False) -> int:
    """KiB the sliver's layer holds (data and metadata it owns), as of the last
    committed transaction; `sync` commits first for an exact figure."""
    layer = layers_dir(roots_dir) / name
    if not is_subvolume(layer):
        raise DiskError(f"sliver {name!r} has no disk layer in {layers_dir(roots_dir)}")
    if sync:
        sync_fs(layer)
    used, _ = qgroup_usage(layer, subvol_id(layer))
    return (used + KIB - 1) // KIB


def layer_limit_kib(roots_dir: Path, name: str) -> int | None:
    layer = layers_dir(roots_dir) / name
    _, limit = qgroup_usage(layer, subvol_id(layer))
    return None if limit is None else limit // KIB
