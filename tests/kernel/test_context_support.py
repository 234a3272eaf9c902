"""Helpers for the context, cgroup and isolation tests (no tests here).

`sliver_root` builds a busybox root for one sliver: through the images engineer's
`prepare_root` when kernel/rootfs.py exists (shared image, idmapped, COW layer), else
a private busybox tree chowned to the sliver's uid range (what an idmapped mount
would show). `contexts` yields a factory whose contexts and roots are destroyed at
the end even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import prctl

from kernel.context import UID_COUNT, Context, Limits, become_subreaper
from tests.kernel.busybox_image import make_busybox_tree

# Disjoint uid ranges per test process: 16 ranges of 65536 per pid slot.
_BASE = 1_000_000_000
_slot = 0


def unique_uid_base() -> int:
    """A host uid range base no other test process uses at the same time."""
    global _slot
    _slot = (_slot + 1) % 16
    return _BASE + ((os.getpid() % 3000) * 16 + _slot) * UID_COUNT


def shift_tree(root: Path, base: int) -> None:
    """chown every file of `root` by +base (what an idmapped mount shows)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            os.lchown(p, base + st.st_uid, base + st.st_gid)
    st = os.lstat(root)
    os.lchown(root, base + st.st_uid, base + st.st_gid)


def private_root(where: Path, base: int) -> Path:
    root = make_busybox_tree(where)
    shift_tree(root, base)
    return root


IMAGE = "bb"
STORE_KIB = 256 * 1024


class Slivers:
    """Makes contexts under one temp run dir and destroys them all at close().

    With images=True the roots come from kernel/rootfs.prepare_root over one shared
    busybox image (as on a node); else each sliver gets a private busybox tree.
    """

    def __init__(self, images: bool = False) -> None:
        # Destroyed inits are then reaped by this process at once (not by the
        # host's PID 1 seconds later). Restored at close(): a test process left a
        # subreaper keeps every later test's orphans as its unreaped zombies.
        self._was_subreaper = bool(prctl.get_child_subreaper())
        become_subreaper()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"ctxtest{os.getpid()}-", dir="/tmp"))
        os.chmod(self.tmp, 0o755)
        self.run_dir = self.tmp / "run"
        self.contexts: list[Context] = []
        self.n = 0
        self.images = images
        self.roots_dir = self.tmp / "roots"
        self.store = None
        if images:
            from kernel.images import ImageStore

            self.store = ImageStore(self.tmp / "images")
            self.store.import_dir(IMAGE, make_busybox_tree(self.tmp / "src"))

    def name(self, tag: str = "s") -> str:
        self.n += 1
        return f"t{os.getpid()}{tag}{self.n}"

    def root(self, name: str, base: int, disk_max_kib: int | None = None) -> Path:
        if self.store is not None:
            from kernel.rootfs import prepare_root

            return prepare_root(self.store, self.roots_dir, name, IMAGE, base,
                                disk_max_kib=disk_max_kib, store_size_kib=STORE_KIB)
        return private_root(self.tmp / "private" / name, base)

    def create(self, name: str | None = None, limits: Limits | None = None,
               uid_base: int | None = None, disk_max_kib: int | None = None,
               **kw: object) -> Context:
        name = name or self.name()
        base = uid_base if uid_base is not None else unique_uid_base()
        root = self.root(name, base, disk_max_kib)
        ctx = Context.create(self.run_dir, name, root, base, limits=limits or Limits(),
                             **kw)  # type: ignore[arg-type]
        self.contexts.append(ctx)
        return ctx

    def close(self) -> None:
        errors = []
        for ctx in self.contexts:
            try:
                ctx.destroy()
            except Exception as exc:  # noqa: BLE001 - report all, clean the rest
                errors.append(exc)
        if self.images:
            from tests.kernel.busybox_image import cleanup_roots

            try:
                cleanup_roots(self.roots_dir)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if not self._was_subreaper:
            prctl.set_child_subreaper(0)
        if errors:
            raise errors[0]


@contextlib.contextmanager
def slivers(images: bool = False) -> Iterator[Slivers]:
    s = Slivers(images)
    try:
        yield s
    finally:
        s.close()


def leftovers(ctx_name: str, init_pid: int, ns_inodes: set[int], run_dir: Path,
              cgroup_dirs: list[Path]) -> list[str]:
    """What a destroyed context left behind (empty list = nothing)."""
    from kernel.ns import pinned

    found = list(pinned(ns_inodes))
    if Path(f"/proc/{init_pid}").exists():
        status = Path(f"/proc/{init_pid}/status").read_text()
        if "State:\tZ" not in status:
            found.append(f"init {init_pid} still running")
    found += [f"cgroup {d}" for d in cgroup_dirs if d.exists()]
    if (run_dir / ctx_name).exists():
        found.append(f"run dir {run_dir / ctx_name}")
    mounts = Path("/proc/self/mountinfo").read_text()
    if ctx_name in mounts:
        found.append("a mount naming the sliver")
    return found


def processes_with(text: str) -> list[int]:
    """Host pids whose command line contains `text`."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text.encode() in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


ContextFactory = Callable[..., Context]
