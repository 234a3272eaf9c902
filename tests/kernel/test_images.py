"""The image store (kernel/images.py) and the `planetlab-agent image` CLI, as root."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from kernel import rootfs
from kernel.images import (
    DebootstrapProtocol,
    ImageError,
    ImageInUse,
    ImageStore,
    UnknownImage,
    UnsafeArchive,
)
from tests.kernel.busybox_image import cleanup_roots, make_busybox_tree
from tests.kernel.test_context_support import unique_uid_base

pytestmark = pytest.mark.kernel

BASE = unique_uid_base()


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=f"plimg-{os.getpid()}-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        try:
            cleanup_roots(d / "roots")
        finally:
            shutil.rmtree(d, ignore_errors=True)


def _src_tree(base: Path) -> Path:
    src = make_busybox_tree(base / "src")
    os.chmod(src / "bin/busybox", 0o4755)          # setuid survives
    os.chown(src / "home/user", 1000, 1000)
    os.link(src / "etc/passwd", src / "etc/passwd.hard")
    (src / "etc/abs").symlink_to("/etc/passwd")      # a link inside the image's root
    os.mknod(src / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(src / "run/fifo")
    return src


def test_import_dir_keeps_what_an_os_needs_and_drops_devices(base: Path) -> None:
    store = ImageStore(base / "images")
    img = store.import_dir("bb", _src_tree(base))
    r = img.rootfs
    assert stat.S_IMODE((r / "bin/busybox").stat().st_mode) == 0o4755
    assert (r / "home/user").stat().st_uid == 1000
    assert (r / "etc/passwd").stat().st_ino == (r / "etc/passwd.hard").stat().st_ino
    assert os.readlink(r / "etc/abs") == "/etc/passwd"
    assert stat.S_IMODE((r / "tmp").stat().st_mode) == 0o1777
    assert not (r / "dev/null").exists()
    assert stat.S_ISFIFO(os.lstat(r / "run/fifo").st_mode)
    assert 1000 < img.size_kib < 10_000
    assert img.created.endswith("Z") and img.users == ()
    assert [i.name for i in store.list()] == ["bb"]
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    with pytest.raises(ImageError, match="already exists"):
        store.import_dir("bb", base / "src")
    with pytest.raises(ImageError, match="bad image name"):
        store.import_dir("../x", base / "src")
    with pytest.raises(ImageError, match="not a directory"):
        store.import_dir("nothere", base / "missing")
    with pytest.raises(UnknownImage, match="'nothere'"):
        store.get("nothere")
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp")] == []
    # What a killed import left behind goes when the store is next opened; a live
    # process's staging tree stays.
    dead = store.root / ".tmp-x-999999999-1"
    live = store.root / f".tmp-y-{os.getpid()}-1"
    (dead / "rootfs").mkdir(parents=True)
    live.mkdir()
    ImageStore(base / "images")
    assert not dead.exists() and live.exists()
    live.rmdir()


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object
          ) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, data if kind == tarfile.REGTYPE else None


def test_import_tarball_keeps_owners_and_modes(base: Path) -> None:
    store = ImageStore(base / "images")
    tb = base / "ok.tar.gz"
    with tarfile.open(tb, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        tar.add(_src_tree(base), arcname=".")
    img = store.import_tarball("bbt", tb)
    r = img.rootfs
    assert stat.S_IMODE((r / "bin/busybox").stat().st_mode) == 0o4755
    assert (r / "home/user").stat().st_uid == 1000
    assert stat.S_IMODE((r / "root").stat().st_mode) == 0o700
    assert (r / "etc/passwd").stat().st_ino == (r / "etc/passwd.hard").stat().st_ino
    assert os.readlink(r / "etc/abs") == "/etc/passwd"
    assert not (r / "dev/null").exists()
    assert (r / "bin/sh").is_symlink()


@pytest.mark.parametrize("members, why", [
    ([_info("/etc/evil", data=b"x")], "absolute path"),
    ([_info("a/../../evil", data=b"x")], "'..'"),
    ([_info("link", tarfile.SYMTYPE, linkname="/tmp"), _info("link/evil", data=b"x")],
     "under a symlink"),
    ([_info("dir", tarfile.DIRTYPE), _info("dir/l", tarfile.SYMTYPE, linkname="../.."),
      _info("dir/l/evil", data=b"x")], "under a symlink"),
    ([_info("h", tarfile.LNKTYPE, linkname="../../etc/passwd")], "'..'"),
    ([_info("h", tarfile.LNKTYPE, linkname="/etc/passwd")], "absolute path"),
    ([_info("s", tarfile.SYMTYPE, linkname="/etc/shadow"),
      _info("h", tarfile.LNKTYPE, linkname="s")], "points to a symlink"),
])
def test_hostile_tarballs_are_refused_and_leave_nothing(
        base: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], why: str) -> None:
    store = ImageStore(base / "images")
    tb = _tar(base / "evil.tar.gz", members)
    with pytest.raises(UnsafeArchive, match=why):
        store.import_tarball("evil", tb)
    assert store.list() == []
    assert set(os.listdir(store.root)) <= {".lock"}  # no image, no staging tree
    assert not Path("/tmp/evil").exists() and not Path("/evil").exists()
    assert not (base / "evil").exists()


def test_tarball_device_nodes_are_dropped_and_garbage_refused(base: Path) -> None:
    store = ImageStore(base / "images")
    tb = _tar(base / "dev.tar.gz", [
        _info("dev", tarfile.DIRTYPE),
        _info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
        _info("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1),
        _info("etc", tarfile.DIRTYPE),
        _info("etc/x", data=b"hello", uid=1234, gid=4321),
    ])
    img = store.import_tarball("devs", tb)
    assert os.listdir(img.rootfs / "dev") == []
    assert (img.rootfs / "etc/x").read_bytes() == b"hello"
    assert (img.rootfs / "etc/x").stat().st_uid == 1234
    junk = base / "junk.tar"
    junk.write_bytes(b"not a tarball at all" * 100)
    with pytest.raises(ImageError, match="not a readable tarball"):
        store.import_tarball("junk", junk)
    assert [i.name for i in store.list()] == ["devs"]


def test_remove_refused_while_a_sliver_uses_the_image(base: Path) -> None:
    store = ImageStore(base / "images")
    store.import_dir("bb", make_busybox_tree(base / "src"))
    roots = base / "roots"
    name = f"u{os.getpid()}"
    rootfs.prepare_root(store, roots, name, "bb", BASE, store_size_kib=512 * 1024)
    assert store.get("bb").users == (name,)
    with pytest.raises(ImageInUse, match=name):
        store.remove("bb")
    assert (store.get("bb").rootfs / "bin/busybox").exists()
    rootfs.release_root(roots, name)
    with pytest.raises(ImageInUse, match="caller's records"):
        store.remove("bb", in_use=lambda n: n == "bb")
    store.remove("bb")
    assert store.list() == []
    with pytest.raises(UnknownImage):
        store.remove("bb")
    # A root cannot be made from an image that is gone.
    with pytest.raises(UnknownImage):
        rootfs.prepare_root(store, roots, name, "bb", BASE)


def test_cli_import_list_remove(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = base / "state"
    src = make_busybox_tree(base / "src")
    tb = base / "bb.tar"
    with tarfile.open(tb, "w") as tar:
        tar.add(src, arcname=".")
    sd = ["--state-dir", str(state)]
    assert agent_main([*sd, "image", "import", "bb", str(src)]) == 0
    assert agent_main([*sd, "image", "import", "bbt", str(tb)]) == 0
    assert "imported bbt" in capsys.readouterr().out
    assert agent_main([*sd, "image", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in listed] == ["bb", "bbt"]
    assert all(i["size_kib"] > 1000 and i["users"] == [] for i in listed)

    store = ImageStore(state / "images")
    name = f"c{os.getpid()}"
    rootfs.prepare_root(store, state / "roots", name, "bb", BASE, store_size_kib=512 * 1024)
    try:
        assert agent_main([*sd, "image", "list"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0].split() == ["NAME", "SIZE", "CREATED", "USERS"]
        assert any(line.startswith("bb ") and line.endswith(name) for line in out.splitlines())
        assert agent_main([*sd, "image", "remove", "bb"]) == 1
        assert f"in use by {name}" in capsys.readouterr().err
    finally:
        cleanup_roots(state / "roots")
    assert agent_main([*sd, "image", "remove", "bb"]) == 0
    assert agent_main([*sd, "image", "remove", "bb"]) == 1
    assert "no image 'bb'" in capsys.readouterr().err
    # A sliver the agent has recorded on an image (even with no root yet) holds it too.
    from agent.state import SliverRecord, State

    with State.open(state) as st:
        st.put_sliver(SliverRecord(name=f"rec{os.getpid()}", slice_id=1, instantiation="",
                                   expires=0, image="bbt", spec={}, rspec={}, problems=[],
                                   state="pending", message="", want_running=True, applied="",
                                   created_at=0.0, updated_at=0.0))
    assert agent_main([*sd, "image", "remove", "bbt"]) == 1
    assert "in use" in capsys.readouterr().err
    with State.open(state) as st:
        st.delete_sliver(f"rec{os.getpid()}")
    assert agent_main([*sd, "image", "remove", "bbt"]) == 0
    assert agent_main([*sd, "image", "remove", "bb"]) == 1
    assert "no image 'bb'" in capsys.readouterr().err
    assert agent_main([*sd, "image", "import", "x", str(base / "nothing")]) == 1
    assert "neither a directory nor a tarball" in capsys.readouterr().err


def test_debootstrap_protocol_drives_progress() -> None:
    seen: list[tuple[int, int, str]] = []
    proto = DebootstrapProtocol(lambda d, t, w: seen.append((d, t, w)))
    for line in ["P: 0 100 DOWNREL", "PA: bookworm", "PF: Retrieving Release for %s",
                 "I: VALIDATING", "IF: Valid Release signature", "P: 50 100 EXTRACTPKGS",
                 "PF: Extracting packages", "P: bad line", "PF: ignored",
                 "P: 100 100 BASESUCCESS", "PF: Base system installed successfully",
                 "E: COULDNT_DL", "EA: gpgv", "EF: Couldn't download %s"]:
        proto.feed(line)
    assert seen == [(0, 100, "Retrieving Release for bookworm"),
                    (50, 100, "Extracting packages"),
                    (100, 100, "Base system installed successfully")]
    assert proto.last_info == "Valid Release signature"
    assert proto.errors == ["Couldn't download gpgv"]


FAKE_DEBOOTSTRAP = """#!/bin/sh
# Speaks debootstrap's --debian-installer protocol; the real one needs a mirror.
[ "$1" = --debian-installer ] || exit 9
suite=$3; target=$4
mkdir -p "$target/etc" "$target/dev"
echo "P: 10 100 DOWNREL" >&3; echo "PA: $suite" >&3; echo "PF: Retrieving %s" >&3
echo "I: X" >&4; echo "IF: working" >&4
echo "$suite" > "$target/etc/debian_version"
mknod "$target/dev/null" c 1 3
echo "P: 100 100 DONE" >&3; echo "PF: Base system installed" >&3
[ "$suite" = failsuite ] && { echo "E: cannot reach mirror"; exit 1; }
exit 0
"""


def test_build_debootstrap_reports_progress_and_cleans_up_on_failure(base: Path) -> None:
    fake = base / "debootstrap"
    fake.write_text(FAKE_DEBOOTSTRAP)
    fake.chmod(0o755)
    store = ImageStore(base / "images")
    seen: list[tuple[int, int, str]] = []
    img = store.build_debootstrap("deb", "bookworm", lambda d, t, w: seen.append((d, t, w)),
                                  debootstrap=str(fake))
    assert seen == [(10, 100, "Retrieving bookworm"), (100, 100, "Base system installed")]
    assert (img.rootfs / "etc/debian_version").read_text() == "bookworm\n"
    assert not (img.rootfs / "dev/null").exists()
    assert img.source == "debootstrap:bookworm"
    with pytest.raises(ImageError, match="cannot reach mirror"):
        store.build_debootstrap("bad", "failsuite", debootstrap=str(fake))
    with pytest.raises(ImageError, match="suite"):
        store.build_debootstrap("bad", "../x", debootstrap=str(fake))
    assert [i.name for i in store.list()] == ["deb"]
    assert [p for p in os.listdir(store.root) if p.startswith(".tmp")] == []
