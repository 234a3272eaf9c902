"""kernel/mount.py on the real kernel: mount-root detection and mountinfo parsing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from kernel import mount as m

pytestmark = pytest.mark.kernel


def test_bind_mount_of_the_same_fs_is_a_mountpoint_and_parsed_with_spaces() -> None:
    base = Path(tempfile.mkdtemp(prefix=f"plmnt-{os.getpid()}-", dir="/tmp"))
    src = base / "src"
    dst = base / "a dir\twith spaces"
    src.mkdir()
    dst.mkdir()
    try:
        assert not m.is_mountpoint(dst)
        m.mount(str(src), dst, None, m.MS_BIND)
        try:
            # Same filesystem, same st_dev: only statx's mount-root bit tells.
            assert os.stat(dst).st_dev == os.stat(base).st_dev
            assert m.is_mountpoint(dst)
            found = m.mounts_under(base)
            assert [x.mount_point for x in found] == [str(dst)]
        finally:
            m.umount(dst)
        assert not m.is_mountpoint(dst)
        assert m.mounts_under(base) == []
        assert not m.is_mountpoint(base / "missing")
        with pytest.raises(OSError, match="umount") as err:
            m.umount(dst)
        assert err.value.filename == str(dst)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_idmapped_detached_tree_shows_shifted_owners() -> None:
    """open_tree + mount_setattr(IDMAP) + move_mount: owners read shifted by the base."""
    base = Path(tempfile.mkdtemp(prefix=f"plmnt-{os.getpid()}-", dir="/tmp"))
    src, dst = base / "src", base / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("x")
    os.chown(src / "f", 1000, 1000)
    uid_base = 1_500_000_000 + (os.getpid() % 3000) * 65536
    tree = -1
    try:
        with m.IdmapUserns(uid_base) as userns:
            tree = m.open_tree(src)
            m.mount_setattr(tree, attr_set=m.MOUNT_ATTR_IDMAP | m.MOUNT_ATTR_RDONLY,
                            userns_fd=userns)
        m.move_mount(tree, dst)
        m.close_quietly(tree)  # an open fd on the mount would keep it busy
        tree = -1
        try:
            assert (dst / "f").stat().st_uid == uid_base + 1000
            assert dst.stat().st_uid == uid_base
            with pytest.raises(OSError):
                (dst / "g").write_text("read-only")
        finally:
            m.umount(dst)
    finally:
        m.close_quietly(tree)
        if m.is_mountpoint(dst):
            m.umount(dst, detach=True)
        shutil.rmtree(base, ignore_errors=True)
    with pytest.raises(ValueError, match="bad id range"):
        m.IdmapUserns(0)
