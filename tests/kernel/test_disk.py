"""Per-sliver disk limits on the real kernel: btrfs subvolume layers with qgroup
limits in one loop-backed filesystem (kernel/disk.py via kernel/rootfs.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel import disk, rootfs
from kernel.images import ImageStore
from tests.kernel.busybox_image import (
    cleanup_roots,
    image_node,
    run_in_userns,
)
from tests.kernel.test_context_support import unique_uid_base

pytestmark = pytest.mark.kernel

STORE_KIB = 512 * 1024
# Disjoint from every other test process (the contexts tests' allocator); A and B
# are two slots, and further slivers of a test take unique_uid_base() within the
# 16 slots this process owns.
BASE_A = unique_uid_base()
BASE_B = unique_uid_base()


@pytest.fixture
def node() -> Iterator[tuple[ImageStore, Path]]:
    with image_node("pldisk") as n:
        yield n


def fill(base: int, root: Path, path: str, mib: int) -> tuple[int, int, str]:
    """Write up to `mib` MiB to `path` as the sliver's root; (rc, bytes written, err)."""
    rc, _, err = run_in_userns(base, ["/bin/sh", "-c",
                                      f"yes 0123456789abcdef | dd of={path} bs=65536 "
                                      f"count={mib * 16} iflag=fullblock conv=fsync"], root=root)
    size = os.stat(root / path.lstrip("/")).st_size if (root / path.lstrip("/")).exists() else 0
    return rc, size, err


def test_fill_stops_at_disk_max_in_that_sliver_only(node: tuple[ImageStore, Path]) -> None:
    store, roots = node
    a = rootfs.prepare_root(store, roots, f"fa{os.getpid()}", "bb", BASE_A, disk_max_kib=8192,
                            store_size_kib=STORE_KIB)
    b = rootfs.prepare_root(store, roots, f"fb{os.getpid()}", "bb", BASE_B, disk_max_kib=8192)
    rc, written, err = fill(BASE_A, a, "/big", 32)
    assert rc != 0
    assert "Disk quota exceeded" in err or "No space left" in err, err
    # Stopped at the limit: not much under it, and never over it.
    assert 7 * 1024 * 1024 <= written <= 8 * 1024 * 1024, written
    used = rootfs.disk_usage_kib(roots, a.name, sync=True)
    assert 7 * 1024 <= used <= 8192 + 64, used
    # A is full; B, on the same filesystem, still writes.
    rc, written_b, err = fill(BASE_B, b, "/data", 4)
    assert rc == 0, err
    assert written_b == 4 * 1024 * 1024
    rc, _, err = run_in_userns(BASE_A, ["/bin/sh", "-c", "echo more > /more"], root=a)
    assert rc != 0
    # Deleting frees the space again for A.
    rc, _, err = run_in_userns(BASE_A, ["/bin/sh", "-c", "rm /big && sync && echo ok > /more"],
                               root=a)
    assert rc == 0, err


def test_disk_max_changes_in_place(node: tuple[ImageStore, Path]) -> None:
    store, roots = node
    name = f"fc{os.getpid()}"
    a = rootfs.prepare_root(store, roots, name, "bb", BASE_A, disk_max_kib=2048,
                            store_size_kib=STORE_KIB)
    rc, written, err = fill(BASE_A, a, "/one", 8)
    assert rc != 0 and "Disk quota exceeded" in err
    assert 1536 * 1024 <= written <= 2 * 1024 * 1024
    rootfs.set_disk_limit(roots, name, 12 * 1024)
    assert disk.layer_limit_kib(roots, name) == 12 * 1024
    assert rootfs.read_state(roots, name)["disk_max_kib"] == 12 * 1024
    rc, written, err = fill(BASE_A, a, "/two", 6)
    assert rc == 0 and written == 6 * 1024 * 1024, err
    rootfs.set_disk_limit(roots, name, None)
    assert disk.layer_limit_kib(roots, name) is None
    rc, written, err = fill(BASE_A, a, "/three", 16)
    assert rc == 0, err
    # Lowering the limit under what is used stops new writes at once.
    rootfs.set_disk_limit(roots, name, 1024)
    rc, _, err = fill(BASE_A, a, "/four", 1)
    assert rc != 0 and "Disk quota exceeded" in err
    with pytest.raises(ValueError, match="disk_max"):
        rootfs.set_disk_limit(roots, name, 0)
    with pytest.raises(disk.DiskError, match="no disk layer"):
        rootfs.set_disk_limit(roots, f"none{os.getpid()}", 1024)


def test_empty_sliver_costs_little_disk(node: tuple[ImageStore, Path]) -> None:
    store, roots = node
    names = [f"e{os.getpid()}x{i}" for i in range(5)]
    for n in names:
        rootfs.prepare_root(store, roots, n, "bb", unique_uid_base(), disk_max_kib=1024,
                            store_size_kib=STORE_KIB)
    image_kib = store.get("bb").size_kib
    for n in names:
        used = rootfs.disk_usage_kib(roots, n, sync=True)
        assert used < 100, (n, used)
    assert image_kib > 1000  # each sliver sees the whole image yet holds none of it
    # One loop device for the whole store, not one per sliver.
    loops = subprocess.run(["losetup", "-j", str(roots / ".disk/layers.btrfs")],
                           capture_output=True, text=True, check=True).stdout
    assert len(loops.splitlines()) == 1


def test_store_errors_and_teardown_leave_nothing(node: tuple[ImageStore, Path]) -> None:
    store, roots = node
    with pytest.raises(disk.DiskError, match="too small"):
        disk.ensure_store(roots, size_kib=1000)
    assert not (roots / ".disk/layers.btrfs").exists()
    assert not disk.store_mounted(roots)
    mnt = disk.ensure_store(roots, size_kib=STORE_KIB)
    assert disk.ensure_store(roots) == mnt  # idempotent
    img = roots / ".disk/layers.btrfs"
    assert os.stat(img).st_blocks * 512 < STORE_KIB * 1024 // 4  # sparse
    rootfs.prepare_root(store, roots, f"t{os.getpid()}", "bb", BASE_A)
    # Grown in place from config while a sliver uses it; shrinking is refused.
    before = os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize
    disk.ensure_store(roots, size_kib=STORE_KIB * 2)
    assert disk.store_size_kib(roots) == STORE_KIB * 2
    after = os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize
    assert after >= before + STORE_KIB * 1024 * 9 // 10
    with pytest.raises(disk.DiskError, match="shrinking"):
        disk.grow_store(roots, STORE_KIB)
    with pytest.raises(disk.DiskError, match="still holds layers"):
        disk.unmount_store(roots)
    cleanup_roots(roots)
    assert not img.exists()
    loops = subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True).stdout
    assert loops.strip() == ""
    with open("/proc/mounts") as f:
        assert str(roots) not in f.read()


def test_a_qgroup_gone_meanwhile_is_not_an_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """btrfs drops a dropped subvolume's simple-quota qgroup by itself: when that
    happens between the sysfs check and the ioctl (ENOENT), the pending entry is done,
    not an error that failed the sliver's destroy (seen in bench/agent.py)."""
    import errno as errno_mod

    from kernel import disk

    pending = tmp_path / "stale-qgroups"
    pending.write_text("257\n258\n")
    qdir = tmp_path / "qgroups"
    qdir.mkdir()
    (qdir / "0_257").mkdir()
    (qdir / "0_258").mkdir()
    monkeypatch.setattr(disk, "_pending_file", lambda roots: pending)
    monkeypatch.setattr(disk, "store_mounted", lambda roots: True)
    monkeypatch.setattr(disk, "qgroup_sysfs", lambda mnt, sid: qdir / f"0_{sid}")

    def destroy(mnt: Path, sid: int) -> None:
        raise OSError(errno_mod.ENOENT if sid == 257 else errno_mod.EBUSY, "qgroup")

    monkeypatch.setattr(disk, "qgroup_destroy", destroy)
    disk.reap_qgroups(tmp_path)
    assert pending.read_text() == "258\n"   # the busy one is retried later
