"""Unified roots under real sliver contexts: two contexts on one shared image, seen
from inside (kernel/rootfs.py + kernel/context.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel import rootfs
from kernel.context import Context, Limits
from kernel.images import ImageStore
from tests.kernel.busybox_image import cleanup_roots, make_busybox_tree
from tests.kernel.test_context_support import unique_uid_base

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]


class Node:
    """An image store, a roots dir and a run dir; everything made is torn down."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"plrctx-{os.getpid()}-", dir="/tmp"))
        self.store = ImageStore(self.base / "images")
        self.store.import_dir("bb", make_busybox_tree(self.base / "src"))
        self.roots = self.base / "roots"
        self.run_dir = self.base / "run"
        self.contexts: list[Context] = []
        self.bases: dict[str, int] = {}

    def sliver(self, tag: str, disk_max_kib: int | None = None) -> Context:
        name = f"rc{os.getpid()}{tag}"
        base = unique_uid_base()
        root = rootfs.prepare_root(self.store, self.roots, name, "bb", base,
                                   disk_max_kib=disk_max_kib, store_size_kib=512 * 1024)
        self.bases[name] = base
        ctx = Context.create(self.run_dir, name, root, base, 65536, Limits())
        self.contexts.append(ctx)
        return ctx

    def close(self) -> None:
        try:
            for ctx in self.contexts:
                ctx.destroy()
            cleanup_roots(self.roots)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node()
    try:
        yield n
    finally:
        n.close()


def sh(ctx: Context, cmd: str, user: str = "root") -> tuple[int, str, str]:
    rc, out, err = ctx.output(["/bin/sh", "-c", cmd], user=user, timeout=60)
    return rc, out.decode(), err.decode()


def test_two_contexts_share_the_image_and_own_their_changes(node: Node) -> None:
    a, b = node.sliver("a", disk_max_kib=4096), node.sliver("b", disk_max_kib=4096)
    image = node.store.get("bb")
    assert image.users == tuple(sorted((a.name, b.name)))
    rc, out, err = sh(a, "id -u; stat -c '%u %g' / /etc/passwd /bin/busybox; "
                         "echo mine > /root/f; stat -c %u /root/f; echo x >> /etc/passwd")
    assert rc == 0, err
    assert out.split() == ["0", "0", "0", "0", "0", "0", "0", "0"]
    # From the host: A's file is A's base; the image is untouched; B sees nothing.
    root_a = node.roots / a.name
    assert (root_a / "root/f").stat().st_uid == node.bases[a.name]
    assert (root_a / "etc/passwd").stat().st_gid == node.bases[a.name]
    assert not (image.rootfs / "root/f").exists()
    assert (image.rootfs / "etc/passwd").read_text().count("\n") == 3
    rc, out, _ = sh(b, "cat /root/f; wc -l < /etc/passwd")
    assert "mine" not in out and out.split()[-1] == "3"
    # Nothing from the host or the image store is visible inside.
    rc, _, _ = sh(a, f"test -e {image.rootfs} || test -e {node.base}")
    assert rc != 0
    rc, out, _ = sh(a, "cat /proc/mounts")
    assert rc == 0 and " overlay " in out
    assert "btrfs" not in out and str(node.base) not in out
    # Root in A cannot change its root mount (the overlay belongs to the host).
    rc, out, _ = sh(a, "mount -o remount,ro / && echo remounted")
    assert rc != 0 and "remounted" not in out
    rc, _, _ = sh(a, "echo y > /etc/after")
    assert rc == 0


def test_disk_fill_inside_a_context_stops_at_disk_max(node: Node) -> None:
    a, b = node.sliver("fa", disk_max_kib=4096), node.sliver("fb", disk_max_kib=4096)
    rc, out, err = sh(a, "yes 0123456789abcdef | dd of=/big bs=65536 count=256 "
                         "iflag=fullblock conv=fsync 2>&1; ls -l /big")
    assert rc != 0 or "Disk quota exceeded" in out
    assert "Disk quota exceeded" in out
    size = (node.roots / a.name / "big").stat().st_size
    assert 3 * 1024 * 1024 <= size <= 4 * 1024 * 1024
    rc, out, err = sh(b, "yes x | dd of=/ok bs=65536 count=32 iflag=fullblock 2>&1")
    assert rc == 0, out + err
    assert (node.roots / b.name / "ok").stat().st_size == 2 * 1024 * 1024


def test_destroy_then_release_leaves_nothing(node: Node) -> None:
    a = node.sliver("d", disk_max_kib=1024)
    name = a.name
    a.destroy()
    rootfs.release_root(node.roots, name)
    with open("/proc/mounts") as f:
        assert f"/{name}" not in f.read()
    out = subprocess.run(["btrfs", "subvolume", "list", str(node.roots / ".disk/layers")],
                         capture_output=True, text=True, check=True).stdout
    assert name not in out
    assert node.store.get("bb").users == ()
