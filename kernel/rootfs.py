"""Unified copy-on-write roots: a shared read-only image, idmapped to the sliver's uid
range, under the sliver's own writable layer, limited to disk_max.

For sliver NAME under roots_dir:

    <roots_dir>/NAME                       the merged root (one overlay mount)
    <roots_dir>/.disk/layers/NAME/upper    its writes (a btrfs subvolume, see disk.py)
    <roots_dir>/.disk/layers/NAME/work     overlayfs' work dir
    <roots_dir>/.state/NAME.json           what was prepared (image, uid range, limit)

How the merged root is made (all with the fd-based mount API, kernel 6.8+):
 1. open_tree(OPEN_TREE_CLONE) of the image's rootfs: a detached copy of the mount;
 2. mount_setattr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY) with a user namespace mapped
    0 -> uid_base: files owned by 0 in the image read as owned by uid_base, and the
    mount cannot be written at all;
 3. fsopen("overlay") with that detached mount as "lowerdir+" and the layer's
    upper/work dirs as "upperdir"/"workdir", all by fd (kernel 6.13+), so no layer
    appears in any mount table and no host path shows in the sliver's
    /proc/mounts; then fsmount with nodev and move_mount onto <roots_dir>/NAME.
Copy-up keeps the ids the lower layer shows, so a file root-in-the-sliver changes is
stored in the layer owned by uid_base; the upper dir itself is owned by uid_base.
The state file is written before anything is made, so release_root (or a restarted
agent) can always find and undo what exists.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from kernel import disk
from kernel import mount as m
from kernel.images import ImageStore, remove_user_marker

SLIVER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_ID = 2**32 - 2


class RootError(RuntimeError):
    """Preparing or releasing a sliver root failed; the message says which and why."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not SLIVER_NAME_RE.match(name):
        raise ValueError(f"bad sliver name {name!r}: use 1-64 letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    return name


def _check_range(name: str, uid_base: int, uid_count: int) -> None:
    if (not isinstance(uid_base, int) or not isinstance(uid_count, int) or uid_base < 1
            or uid_count < 1 or uid_base + uid_count > MAX_ID):
        raise ValueError(f"bad uid range for sliver {name!r}: base {uid_base!r}, count "
                         f"{uid_count!r} (base >= 1, base + count <= {MAX_ID})")


def _state_path(roots_dir: Path, name: str) -> Path:
    return Path(roots_dir) / ".state" / f"{name}.json"


def read_state(roots_dir: Path, name: str) -> dict | None:
    try:
        data = json.loads(_state_path(roots_dir, name).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RootError(f"state of sliver root {name!r} is unreadable ({exc})") from None
    return data if isinstance(data, dict) else None


def _write_state(roots_dir: Path, name: str, state: dict) -> None:
    p = _state_path(roots_dir, name)
    p.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, p)


@contextlib.contextmanager
def _roots_lock(roots_dir: Path) -> Iterator[None]:
    """One lock per roots dir: prepare and release of different slivers are quick,
    and serialising them keeps the store's mount and qgroup bookkeeping simple."""
    Path(roots_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(roots_dir) / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def prepare_root(store: ImageStore, roots_dir: Path, name: str, image: str,
                 uid_base: int, uid_count: int = 65536, disk_max_kib: int | None = None,
                 *, store_size_kib: int | None = None) -> Path:
    """Make (or find again) sliver `name`'s merged root and return its host path.

    Idempotent: for an existing root of the same image and uid range it remounts
    what is missing (after a reboot) and applies `disk_max_kib`; a different image or
    range is an error. On failure, everything this call made is undone.
    `store_size_kib` sizes the node's layer store when this call creates it.
    """
    _check_name(name)
    _check_range(name, uid_base, uid_count)
    disk._check_kib(disk_max_kib, name)
    roots_dir = Path(roots_dir)
    img = store.get(image, with_users=False)
    if not img.rootfs.is_dir() or img.rootfs.is_symlink():
        raise RootError(f"image {image!r} is damaged ({img.rootfs} is missing): remove it "
                        "and import it again")
    merged = roots_dir / name
    with _roots_lock(roots_dir):
        # Root only: a merged root holds files the sliver made setuid (its own root,
        # uid_base on the host); no host user may reach them by path.
        os.chmod(roots_dir, 0o700)
        old = read_state(roots_dir, name)
        if old is not None and (old.get("image") != image or old.get("uid_base") != uid_base
                                or old.get("uid_count") != uid_count):
            raise RootError(f"sliver {name!r} already has a root from image "
                            f"{old.get('image')!r} with uids {old.get('uid_base')}+"
                            f"{old.get('uid_count')}: release it first")
        with contextlib.ExitStack() as undo:
            if not disk.store_mounted(roots_dir):
                # Made (or mounted) by this call: a failure takes it down again, unless
                # it holds other slivers' layers (after a reboot).
                fresh = not disk.store_exists(roots_dir)
                disk.ensure_store(roots_dir, store_size_kib)
                undo.callback(_undo_store, roots_dir, fresh)
            else:
                disk.ensure_store(roots_dir, store_size_kib)
            disk.reap_qgroups(roots_dir)
            state = {"name": name, "image": image, "image_dir": str(img.path),
                     "uid_base": uid_base, "uid_count": uid_count,
                     "disk_max_kib": disk_max_kib}
            _write_state(roots_dir, name, state)
            if old is None:
                undo.callback(_state_path(roots_dir, name).unlink, missing_ok=True)
            store.add_user(image, roots_dir, name)
            if old is None:
                undo.callback(remove_user_marker, roots_dir, name, img.path)
            layer = disk.layers_dir(roots_dir) / name
            if not disk.is_subvolume(layer):
                mode = os.stat(img.rootfs).st_mode & 0o7777
                disk.create_layer(roots_dir, name, uid_base, mode, disk_max_kib)
                undo.callback(disk.delete_layer, roots_dir, name)
            else:
                disk.set_layer_limit(roots_dir, name, disk_max_kib)
            if not merged.is_dir():
                merged.mkdir(mode=0o755)
                undo.callback(_rmdir_quiet, merged)
            if not m.is_mountpoint(merged):
                _mount_overlay(img.rootfs, layer, merged, uid_base, uid_count)
                undo.callback(m.umount, merged, detach=True)
            undo.pop_all()
    return merged


def _mount_overlay(lower: Path, layer: Path, target: Path, uid_base: int,
                   uid_count: int) -> None:
    tree = fs = mnt = ltree = upper = work = -1
    try:
        with m.IdmapUserns(uid_base, uid_count) as userns:
            tree = m.open_tree(lower, clone=True)
            m.mount_setattr(tree, attr_set=m.MOUNT_ATTR_IDMAP | m.MOUNT_ATTR_RDONLY,
                            userns_fd=userns, subject=lower)
        # The layer's dirs are passed as fds on one detached clone of the layer (upper
        # and work must share a mount): the sliver's /proc/mounts then shows "/" for
        # every layer instead of host paths.
        ltree = m.open_tree(layer, clone=True)
        upper = os.open("upper", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=ltree)
        work = os.open("work", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=ltree)
        fs = m.fsopen("overlay")
        m.fsconfig(fs, m.FSCONFIG_SET_FD, "lowerdir+", None, tree)
        m.fsconfig(fs, m.FSCONFIG_SET_FD, "upperdir", None, upper)
        m.fsconfig(fs, m.FSCONFIG_SET_FD, "workdir", None, work)
        m.fsconfig(fs, m.FSCONFIG_CMD_CREATE)
        mnt = m.fsmount(fs, m.MOUNT_ATTR_NODEV)
        m.move_mount(mnt, target)
    except OSError as exc:
        raise RootError(f"cannot mount the root of {target.name!r} on {target}: "
                        f"{exc.strerror} ({exc.filename})") from exc
    finally:
        for fd in (mnt, fs, work, upper, ltree, tree):
            m.close_quietly(fd)


def _mount_existing_store(roots_dir: Path) -> None:
    """After a reboot the store file exists but is not mounted: mount it, so that
    layers can be found, changed and deleted."""
    if disk.store_exists(roots_dir) and not disk.store_mounted(roots_dir):
        disk.ensure_store(roots_dir)


def _undo_store(roots_dir: Path, remove: bool) -> None:
    if any(disk.layers_dir(roots_dir).iterdir()):
        return  # other slivers' layers: the store stays
    disk.unmount_store(roots_dir, remove=remove)


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass


def release_root(roots_dir: Path, name: str) -> None:
    """Unmount the sliver's root (and anything mounted under it), delete its layer
    and limit, and forget it. Idempotent; works from what exists on disk, so a
    restarted agent can release roots it did not prepare itself."""
    _check_name(name)
    roots_dir = Path(roots_dir)
    if not roots_dir.is_dir():
        return
    merged = roots_dir / name
    with _roots_lock(roots_dir):
        state = read_state(roots_dir, name)
        _mount_existing_store(roots_dir)
        # A lazy unmount of the root takes every mount under it along (the agent's
        # binds); mountinfo is scanned only when the root itself is not mounted.
        if m.is_mountpoint(merged):
            for _ in range(16):  # a few stacked mounts at most
                m.umount(merged, detach=True)
                if not m.is_mountpoint(merged):
                    break
        elif merged.is_dir():
            for info in m.mounts_under(merged):
                m.umount(info.mount_point, detach=True)
        if merged.is_dir() and not merged.is_symlink():
            _rmdir_quiet(merged)
        disk.delete_layer(roots_dir, name)
        if state is not None and state.get("image_dir"):
            remove_user_marker(roots_dir, name, Path(state["image_dir"]))
        _state_path(roots_dir, name).unlink(missing_ok=True)


def list_roots(roots_dir: Path) -> list[str]:
    """Every sliver with something under roots_dir: a state file, a layer or a mount."""
    roots_dir = Path(roots_dir)
    names: set[str] = set()
    sdir = roots_dir / ".state"
    if sdir.is_dir():
        names.update(p.name[:-5] for p in sdir.iterdir() if p.name.endswith(".json"))
    ldir = disk.layers_dir(roots_dir)
    if disk.store_exists(roots_dir) and not disk.store_mounted(roots_dir):
        with _roots_lock(roots_dir):
            _mount_existing_store(roots_dir)
    if disk.store_mounted(roots_dir):
        names.update(p.name for p in ldir.iterdir())
    if roots_dir.is_dir():
        names.update(p.name for p in roots_dir.iterdir()
                     if not p.name.startswith(".") and p.is_dir())
    return sorted(n for n in names if SLIVER_NAME_RE.match(n))


def set_disk_limit(roots_dir: Path, name: str, disk_max_kib: int | None) -> None:
    """Change the sliver's disk_max in place (None removes the limit)."""
    _check_name(name)
    with _roots_lock(Path(roots_dir)):
        _mount_existing_store(Path(roots_dir))
        disk.set_layer_limit(Path(roots_dir), name, disk_max_kib)
        state = read_state(Path(roots_dir), name)
        if state is not None:
            state["disk_max_kib"] = disk_max_kib
            _write_state(Path(roots_dir), name, state)


def disk_usage_kib(roots_dir: Path, name: str, *, sync: bool = False) -> int:
    """KiB the sliver has written (its own layer only; the shared image is free)."""
    _check_name(name)
    if not disk.store_mounted(Path(roots_dir)):
        with _roots_lock(Path(roots_dir)):
            _mount_existing_store(Path(roots_dir))
    return disk.layer_usage_kib(Path(roots_dir), name, sync=sync)


def unmount_all(roots_dir: Path) -> list[str]:
    """Unmount every sliver root and then the layer store, whose loop device goes with
    it (autoclear); the layers stay in the store's image file. For a node leaving
    (`planetlab-agent decommission`): the slivers must be gone. Returns the mount
    points unmounted, deepest first; idempotent."""
    roots_dir = Path(roots_dir)
    if not roots_dir.is_dir():
        return []
    done: list[str] = []
    with _roots_lock(roots_dir):
        for info in m.mounts_under(roots_dir):
            if info.mount_point == os.path.realpath(roots_dir):
                continue    # roots_dir itself (a bind the operator made) is not ours
            try:
                m.umount(info.mount_point, detach=True)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOENT):
                    raise   # EINVAL/ENOENT: gone with a parent's lazy unmount
            done.append(info.mount_point)
    return done
