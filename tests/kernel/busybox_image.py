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

import os
import shutil
import subprocess
from pathlib import Path

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
