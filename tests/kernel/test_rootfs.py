"""Unified copy-on-write roots on the real kernel: a shared image idmapped under
per-sliver overlay layers (kernel/rootfs.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel import disk, rootfs
from kernel.images import ImageStore, UnknownImage
from tests.kernel.busybox_image import (
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
    with image_node("plroots") as n:
        yield n


def tree_digest(root: Path) -> str:
    """A digest of names, owners, modes and contents of a tree (links not followed)."""
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for n in sorted(dirs + files):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, root)} {st.st_mode} {st.st_uid} {st.st_gid}".encode())
            if os.path.islink(p):
                h.update(os.readlink(p).encode())
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def our_mounts(path: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if str(path) in line]


def our_loops(path: Path) -> str:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines() if str(path) in line)


def sh(base: int, script: str, uid: int = 0, root: Path | None = None) -> tuple[int, str, str]:
    """Run a shell script as `uid` of the sliver with range `base`, chrooted in `root`."""
    return run_in_userns(base, ["/bin/sh", "-c", script], uid=uid, gid=uid, root=root)


def test_two_slivers_share_one_image_copy_on_write(node: tuple[ImageStore, Path]) -> None:
    store, roots = node
    image = store.get("bb")
    before = tree_digest(image.rootfs)
    a = rootfs.prepare_root(store, roots, f"a{os.getpid()}", "bb", BASE_A, store_size_kib=STORE_KIB)
    b = rootfs.prepare_root(store, roots, f"b{os.getpid()}", "bb", BASE_B)

    # Root in A changes, adds and deletes files of the image.
    rc, out, err = sh(BASE_A, "echo changed >> /etc/passwd && echo new > /etc/new "
                              "&& rm /etc/hostname && chmod 600 /etc/group && id -u", root=a)
    assert rc == 0, err
    assert out.strip() == "0"
    assert (a / "etc/passwd").read_text().endswith("changed\n")

    # B and the image see none of it.
    assert "changed" not in (b / "etc/passwd").read_text()
    assert not (b / "etc/new").exists() and (b / "etc/hostname").exists()
    assert (b / "etc/group").stat().st_mode & 0o777 == 0o644
    assert tree_digest(image.rootfs) == before
    rc, out, _ = sh(BASE_B, "cat /etc/passwd; ls /etc", root=b)
    assert rc == 0 and "changed" not in out and "new" not in out.split()

    # Only the changed files were copied, into A's own layer, owned by A's base.
    upper = disk.layers_dir(roots) / a.name / "upper"
    assert sorted(os.listdir(upper / "etc")) == ["group", "hostname", "new", "passwd"]
    assert (upper / "etc/new").stat().st_uid == BASE_A
    assert (upper / "etc/passwd").stat().st_uid == BASE_A
    assert not (upper / "bin").exists()
    assert os.listdir(disk.layers_dir(roots) / b.name / "upper") == []


def test_root_inside_owns_files_outside_it_is_the_range_base(
        node: tuple[ImageStore, Path]) -> None:
    store, roots = node
    a = rootfs.prepare_root(store, roots, f"own{os.getpid()}", "bb", BASE_A,
                            store_size_kib=STORE_KIB)
    # From the host, the image's root-owned files show as owned by the base; the user
    # (uid 1000 in the image) as base + 1000.
    assert a.stat().st_uid == BASE_A
    assert (a / "bin/busybox").stat().st_uid == BASE_A
    assert (a / "home/user").stat().st_uid == BASE_A + 1000
    rc, out, err = sh(BASE_A, "touch /root/mine && mkdir /srv && stat -c '%u %g' "
                              "/root/mine /etc/passwd", root=a)
    assert rc == 0, err
    assert out.split() == ["0", "0", "0", "0"]
    assert (a / "root/mine").stat().st_uid == BASE_A
    assert (a / "srv").stat().st_gid == BASE_A
    # The ordinary user inside can write its home but not root's files.
    rc, _, _ = sh(BASE_A, "echo hi > /home/user/f", uid=1000, root=a)
    assert rc == 0 and (a / "home/user/f").stat().st_uid == BASE_A + 1000
    rc, _, err = sh(BASE_A, "echo hi >> /etc/passwd", uid=1000, root=a)
    assert rc != 0 and "Permission denied" in err


def test_image_cannot_be_written_through_a_sliver(node: tuple[ImageStore, Path]) -> None:
    store, roots = node
    image = store.get("bb")
    before = tree_digest(image.rootfs)
    a = rootfs.prepare_root(store, roots, f"ro{os.getpid()}", "bb", BASE_A,
                            store_size_kib=STORE_KIB)
    # The image tree itself is not the sliver's: its root is not root there.
    rc, _, err = sh(BASE_A, f"echo x > {image.rootfs}/etc/passwd")
    assert rc != 0 and "Permission denied" in err
    rc, _, err = sh(BASE_A, f"ls {image.path}")
    assert rc != 0 and "Permission denied" in err
    # Everything written through the root lands in the layer, even truncation and
    # renames of image files and writes through hard-linked names.
    rc, _, err = sh(BASE_A, "ln /etc/group /g2 && echo x >> /g2 && mv /etc/passwd /etc/p2 "
                            "&& rm -rf /usr && : > /etc/hostname && cp /bin/busybox /bin/bb2", root=a)
    assert rc == 0, err
    assert (a / "etc/hostname").stat().st_size == 0 and not (a / "usr").exists()
    assert tree_digest(image.rootfs) == before
    # The lower layer is an idmapped read-only detached mount: it is in no mount table.
    assert not [m for m in our_mounts(image.rootfs) if m.split()[1] != str(a)]


def test_prepare_is_idempotent_and_release_leaves_nothing(
        node: tuple[ImageStore, Path]) -> None:
    store, roots = node
    name = f"idem{os.getpid()}"
    a = rootfs.prepare_root(store, roots, name, "bb", BASE_A, disk_max_kib=4096,
                            store_size_kib=STORE_KIB)
    (a / "keep").write_text("x")
    again = rootfs.prepare_root(store, roots, name, "bb", BASE_A, disk_max_kib=8192)
    assert again == a and (a / "keep").read_text() == "x"
    assert disk.layer_limit_kib(roots, name) == 8192
    assert len([m for m in our_mounts(roots) if " overlay " in m]) == 1
    assert rootfs.list_roots(roots) == [name]
    assert store.get("bb").users == (name,)
    with pytest.raises(rootfs.RootError, match="already has a root"):
        rootfs.prepare_root(store, roots, name, "bb", BASE_B)

    # After a reboot (the root and the layer store unmounted, the loop device gone),
    # prepare mounts the store and the same layer again, limit included.
    subprocess.run(["umount", str(a)], check=True)
    subprocess.run(["umount", str(disk.layers_dir(roots))], check=True)
    assert not disk.store_mounted(roots)
    rootfs.prepare_root(store, roots, name, "bb", BASE_A, disk_max_kib=8192)
    assert (a / "keep").read_text() == "x"
    assert disk.layer_limit_kib(roots, name) == 8192

    # Something mounted inside the root (as the agent binds host dirs in) goes with it.
    (a / "mnt").mkdir()
    subprocess.run(["mount", "--bind", str(store.get("bb").rootfs / "etc"), str(a / "mnt")],
                   check=True)
    assert len(our_mounts(a)) == 2
    rootfs.release_root(roots, name)
    rootfs.release_root(roots, name)
    assert our_mounts(a) == []
    assert not a.exists()
    assert not (disk.layers_dir(roots) / name).exists()
    assert [m for m in our_mounts(roots) if " overlay " in m] == []
    assert rootfs.list_roots(roots) == []
    assert store.get("bb").users == ()


def test_release_finds_roots_after_a_restart(node: tuple[ImageStore, Path]) -> None:
    """A fresh process, knowing only the roots dir, finds and releases everything."""
    store, roots = node
    names = [f"r{os.getpid()}x{i}" for i in range(3)]
    for n in names:
        rootfs.prepare_root(store, roots, n, "bb", unique_uid_base(), store_size_kib=STORE_KIB)
    # As after a reboot: nothing is mounted any more, only the files remain.
    for n in names:
        subprocess.run(["umount", str(roots / n)], check=True)
    subprocess.run(["umount", str(disk.layers_dir(roots))], check=True)
    code = ("import sys; from pathlib import Path; from kernel import rootfs\n"
            "r = Path(sys.argv[1])\n"
            "for n in rootfs.list_roots(r): rootfs.release_root(r, n)\n"
            "print(rootfs.list_roots(r))")
    out = subprocess.run([os.sys.executable, "-c", code, str(roots)], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).parents[2]).stdout
    assert out.strip() == "[]"
    assert [m for m in our_mounts(roots) if " overlay " in m] == []
    assert store.get("bb").users == ()
    assert disk.store_mounted(roots) and list(disk.layers_dir(roots).iterdir()) == []


def _assert_nothing_left(store: ImageStore, roots: Path, name: str) -> None:
    assert our_mounts(roots / name) == []
    assert not (roots / name).exists()
    assert not (roots / ".state" / f"{name}.json").exists()
    if disk.store_mounted(roots):
        assert not (disk.layers_dir(roots) / name).exists()
        out = subprocess.run(["btrfs", "subvolume", "list", str(disk.layers_dir(roots))],
                             capture_output=True, text=True, check=True).stdout
        assert name not in out
    assert name not in store.get("bb").users


def test_failed_prepare_leaves_nothing(node: tuple[ImageStore, Path]) -> None:
    store, roots = node
    name = f"bad{os.getpid()}"
    with pytest.raises(UnknownImage, match="nope"):
        rootfs.prepare_root(store, roots, name, "nope", BASE_A, store_size_kib=STORE_KIB)
    with pytest.raises(ValueError, match="uid range"):
        rootfs.prepare_root(store, roots, name, "bb", 0)
    with pytest.raises(ValueError, match="disk_max"):
        rootfs.prepare_root(store, roots, name, "bb", BASE_A, disk_max_kib=-5)
    with pytest.raises(ValueError, match="sliver name"):
        rootfs.prepare_root(store, roots, "../etc", "bb", BASE_A)
    _assert_nothing_left(store, roots, name)

    # Half-way failure of the node's first root: the store, layer and limit are made,
    # then the mount point cannot be (a file is in the way). All of it goes, the
    # store's loop device and file included.
    roots.mkdir()
    (roots / name).write_text("in the way")
    with pytest.raises(FileExistsError):
        rootfs.prepare_root(store, roots, name, "bb", BASE_A, disk_max_kib=1024,
                            store_size_kib=STORE_KIB)
    assert not disk.store_mounted(roots) and not disk.store_exists(roots)
    assert our_loops(roots) == ""
    assert our_mounts(roots) == []

    # The same with a store that other slivers use: only this sliver's part goes.
    rootfs.prepare_root(store, roots, f"ok{os.getpid()}", "bb", BASE_B, store_size_kib=STORE_KIB)
    with pytest.raises(FileExistsError):
        rootfs.prepare_root(store, roots, name, "bb", BASE_A, disk_max_kib=1024)
    (roots / name).unlink()
    _assert_nothing_left(store, roots, name)

    # A damaged image (its tree is missing) is refused, naming it.
    broken = store.root / "broken"
    shutil.copytree(store.get("bb").path, broken, symlinks=True)
    shutil.rmtree(broken / "rootfs")
    with pytest.raises(rootfs.RootError, match="image 'broken' is damaged"):
        rootfs.prepare_root(store, roots, name, "broken", BASE_A)
    assert store.get("broken").users == ()
    _assert_nothing_left(store, roots, name)

    # Failure in the mount itself: the layer's work dir is taken away just before.
    real = disk.create_layer

    def sabotaged(roots_dir: Path, n: str, owner: int, mode: int, kib: int | None) -> Path:
        layer = real(roots_dir, n, owner, mode, kib)
        (layer / "work").rmdir()
        return layer

    disk.create_layer = sabotaged  # type: ignore[assignment]
    try:
        with pytest.raises(rootfs.RootError, match="cannot mount"):
            rootfs.prepare_root(store, roots, name, "bb", BASE_A)
    finally:
        disk.create_layer = real  # type: ignore[assignment]
    _assert_nothing_left(store, roots, name)
    assert our_loops(roots / ".disk")  # the store itself stays for the other sliver


def test_concurrent_first_prepares_share_one_store(node: tuple[ImageStore, Path]) -> None:
    """Several slivers prepared at once on a fresh node: one store, one loop device,
    every root mounted (the roots lock serialises store creation)."""
    import threading

    store, roots = node
    names = [f"cc{os.getpid()}x{i}" for i in range(4)]
    bases = [unique_uid_base() for _ in names]
    errors: list[BaseException] = []

    def one(n: str, b: int) -> None:
        try:
            rootfs.prepare_root(store, roots, n, "bb", b, disk_max_kib=2048,
                                store_size_kib=STORE_KIB)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n, b)) for n, b in zip(names, bases, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert rootfs.list_roots(roots) == sorted(names)
    assert len(our_loops(roots).splitlines()) == 1
    assert len([m for m in our_mounts(roots) if " overlay " in m]) == 4
    for n, b in zip(names, bases, strict=True):
        assert (roots / n).stat().st_uid == b
