"""A tiny test image built from Debian's busybox-static package.

`make_busybox_tree(dest)` fills `dest` with a minimal root filesystem: the static
`/bin/busybox`, a symlink for every applet it provides (`busybox --list-full`), the
usual empty top-level directories, and `/etc/passwd`, `/etc/group` with `root` and
one ordinary user (`user`, uid/gid 1000). It is about 2 MiB and builds in a few
milliseconds, so every test can make its own.

Use it from any test (run from the repository root with `python -m pytest`):

    from tests.kernel.busybox_image import make_busybox_tree
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")

USER_NAME = "user"
USER_UID = 1000
USER_GID = 1000

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    f"{USER_NAME}:x:{USER_UID}:{USER_GID}:{USER_NAME}:/home/{USER_NAME}:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = (
    "root:x:0:\n"
    f"{USER_NAME}:x:{USER_GID}:\n"
    "nogroup:x:65534:\n"
)

# Directories a context expects to mount on or write into, with their modes.
DIRS = {
    "bin": 0o755, "sbin": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
    "etc": 0o755, "proc": 0o555, "sys": 0o555, "dev": 0o755, "tmp": 0o1777,
    "root": 0o700, "home": 0o755, f"home/{USER_NAME}": 0o755, "var": 0o755,
    "var/tmp": 0o1777, "run": 0o755,
}


def _applets() -> list[str]:
    """Relative paths of every applet, e.g. 'bin/sh', 'usr/bin/env'."""
    out = subprocess.run(
        [str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True
    ).stdout
    return [line.strip().lstrip("/") for line in out.splitlines() if line.strip()]


def make_busybox_tree(dest: Path) -> Path:
    """Build the busybox root filesystem in `dest` (created if missing) and return it.

    Raises FileNotFoundError naming /bin/busybox when busybox-static is not installed.
    """
    if not BUSYBOX.is_file():
        raise FileNotFoundError(
            f"{BUSYBOX} not found: install Debian's busybox-static package"
        )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for rel, mode in DIRS.items():
        d = dest / rel
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, mode)
    shutil.copy2(BUSYBOX, dest / "bin/busybox")
    os.chmod(dest / "bin/busybox", 0o755)
    for rel in _applets():
        link = dest / rel
        if rel == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    (dest / "etc/passwd").write_text(PASSWD)
    (dest / "etc/group").write_text(GROUP)
    (dest / "etc/hostname").write_text("sliver\n")
    os.chown(dest / f"home/{USER_NAME}", USER_UID, USER_GID)
    return dest


_CLONE_NEWUSER = 0x10000000


def run_in_userns(uid_base: int, argv: list[str], *, uid: int = 0, gid: int = 0,
                  count: int = 65536, root: Path | None = None,
                  timeout: float = 30.0) -> tuple[int, str, str]:
    """Run `argv` as `uid`/`gid` of a fresh user namespace mapped 0 -> `uid_base`
    (`count` ids) and return (exit status, stdout, stderr).

    This is what a sliver's root (or user) is, as far as files are concerned, before
    contexts exist: its host uid is uid_base + uid and it has no supplementary groups.
    With `root`, the child chroots there first (as host root), so `argv` and its
    paths are those of the sliver's root. The child unshares, the parent writes the
    maps, then the child takes the ids and execs. -1 is returned as status if the command was killed by a signal.
    """
    import ctypes
    import select
    import signal
    import time

    libc = ctypes.CDLL(None, use_errno=True)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish calls until exec
        try:
            os.setsid()  # its own process group: teardown kills pipelines too
            # Python ignores SIGPIPE; an exec'd shell pipeline needs the default back.
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            os.close(ready_r)
            os.close(go_w)
            os.close(out_r)
            os.close(err_r)
            # Open the root now, as host root; chroot once in the new namespace (a
            # chrooted process may not create a user namespace).
            root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY) if root is not None else -1
            if libc.unshare(_CLONE_NEWUSER) != 0:
                os._exit(120)
            os.write(ready_w, b"u")
            if os.read(go_r, 1) != b"g":
                os._exit(121)
            if root_fd >= 0:
                os.fchdir(root_fd)
                os.chroot(".")
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.chdir("/")
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.close(ready_w)
    os.close(go_r)
    os.close(out_w)
    os.close(err_w)
    try:
        if os.read(ready_r, 1) != b"u":
            raise OSError("run_in_userns: child could not create a user namespace")
        for kind in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{kind}", "w") as f:
                f.write(f"0 {uid_base} {count}\n")
        os.write(go_w, b"g")
        chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
        open_fds = [out_r, err_r]
        deadline = time.monotonic() + timeout
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(pid, signal.SIGKILL)
                break
            readable, _, _ = select.select(open_fds, [], [], left)
            for fd in readable:
                data = os.read(fd, 65536)
                if data:
                    chunks[fd].append(data)
                else:
                    open_fds.remove(fd)
    except BaseException:
        os.killpg(pid, signal.SIGKILL)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
        try:  # whatever the command left running in its group goes too
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for fd in (ready_r, go_w, out_r, err_r):
            os.close(fd)
    code = os.waitstatus_to_exitcode(status)
    return (code if code >= 0 else -1,
            b"".join(chunks[out_r]).decode(errors="replace"),
            b"".join(chunks[err_r]).decode(errors="replace"))


def cleanup_roots(roots_dir: Path) -> None:
    """Release every sliver root under `roots_dir` and take the layer store down
    (unmount, free its loop device, delete its file). For test teardown."""
    from kernel import disk, rootfs

    errors = []
    for name in rootfs.list_roots(roots_dir):
        try:
            rootfs.release_root(roots_dir, name)
        except Exception as exc:  # noqa: BLE001 - keep cleaning, report at the end
            errors.append(f"{name}: {exc}")
    try:
        disk.unmount_store(roots_dir, remove=True)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"store: {exc}")
    if errors:
        raise RuntimeError("cleanup of " + str(roots_dir) + " failed: " + "; ".join(errors))


@contextlib.contextmanager
def image_node(prefix: str) -> Iterator[tuple[Any, Path]]:
    """An image store with the busybox image 'bb' and an empty roots dir, in a
    directory every uid may traverse (as a node's state dir is), so that only the
    code's own permissions are what tests see. Everything goes at the end."""
    from kernel.images import ImageStore

    base = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir="/tmp"))
    os.chmod(base, 0o755)
    roots = base / "roots"
    try:
        store = ImageStore(base / "images")
        store.import_dir("bb", make_busybox_tree(base / "src"))
        yield store, roots
    finally:
        try:
            cleanup_roots(roots)
        finally:
            shutil.rmtree(base, ignore_errors=True)
