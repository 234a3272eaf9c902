"""`planetlab-agent image import | build | list | remove`: the node's reference images.

Images live under <state_dir>/images (kernel/images.py). An image is refused removal
while a sliver root uses it (markers kept by kernel/rootfs.py) or while the agent's
database has a sliver recorded on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from agent.cli import DEFAULT_STATE_DIR
from agent.cli_agent import load_config
from agent.state import State
from kernel.images import ImageError, ImageStore


def register(sub: Any) -> None:
    p = sub.add_parser("image", help="reference images: import, build, list, remove")
    isub = p.add_subparsers(dest="image_command", metavar="ACTION", required=True)

    q = isub.add_parser("import", help="import an image from a directory or a tarball")
    q.add_argument("name", metavar="NAME")
    q.add_argument("source", metavar="DIR|TARBALL")
    q.set_defaults(func=cmd_import)

    q = isub.add_parser("build", help="build an image with debootstrap (needs a mirror)")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--debootstrap", metavar="SUITE", required=True,
                   help="Debian suite, e.g. bookworm")
    q.add_argument("--mirror", metavar="URL", help="Debian mirror (debootstrap's default)")
    q.add_argument("--variant", default="minbase", help="debootstrap variant (minbase)")
    q.set_defaults(func=cmd_build)

    q = isub.add_parser("list", help="images: name, size, created, slivers using it")
    q.add_argument("--json", action="store_true", help="one JSON array")
    q.set_defaults(func=cmd_list)

    q = isub.add_parser("remove", help="remove an image (refused while a sliver uses it)")
    q.add_argument("name", metavar="NAME")
    q.set_defaults(func=cmd_remove)


def _state_dir(args: argparse.Namespace) -> Path:
    """--state-dir, else the config's state_dir, else the default."""
    if getattr(args, "state_dir", None):
        return Path(args.state_dir)
    if getattr(args, "config", None):
        return Path(load_config(args).state_dir)
    return Path(DEFAULT_STATE_DIR)


def _store(args: argparse.Namespace) -> Any:
    return ImageStore(_state_dir(args) / "images")


def _fail(what: str, exc: BaseException) -> int:
    print(f"planetlab-agent image {what}: {exc}", file=sys.stderr)
    return 1


def cmd_import(args: argparse.Namespace) -> int:
    src = Path(args.source)
    try:
        store = _store(args)
        if src.is_dir():
            img = store.import_dir(args.name, src)
        elif src.is_file():
            img = store.import_tarball(args.name, src)
        else:
            raise ImageError(f"{src} is neither a directory nor a tarball")
    except (ImageError, OSError) as exc:
        return _fail("import", exc)
    print(f"imported {img.name}: {img.size_kib} KiB")
    return 0


class ProgressBar:
    """A one-line progress display on a terminal; plain lines otherwise (logs)."""

    def __init__(self, out: TextIO, width: int = 30) -> None:
        self.out = out
        self.tty = out.isatty()
        self.width = width
        self.last = ""
        self.started = time.monotonic()

    def __call__(self, done: int, total: int, what: str) -> None:
        frac = min(1.0, max(0.0, done / total)) if total > 0 else 0.0
        elapsed = int(time.monotonic() - self.started)
        if self.tty:
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            line = f"\r[{bar}] {frac * 100:5.1f}% {elapsed:4d}s {what[:60]:<60}"
            self.out.write(line)
            self.out.flush()
        elif what != self.last:
            self.out.write(f"{frac * 100:5.1f}% {what}\n")
            self.out.flush()
        self.last = what

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def cmd_build(args: argparse.Namespace) -> int:
    bar = ProgressBar(sys.stderr)
    try:
        img = _store(args).build_debootstrap(args.name, args.debootstrap, bar,
                                             mirror=args.mirror, variant=args.variant)
    except (ImageError, OSError) as exc:
        bar.finish()
        return _fail("build", exc)
    bar.finish()
    print(f"built {img.name} ({args.debootstrap}): {img.size_kib} KiB")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    try:
        images = _store(args).list()
    except (ImageError, OSError) as exc:
        return _fail("list", exc)
    if args.json:
        print(json.dumps([{"name": i.name, "size_kib": i.size_kib, "created": i.created,
                           "source": i.source, "users": list(i.users)} for i in images]))
        return 0
    print(f"{'NAME':<20} {'SIZE':>10} {'CREATED':<20} USERS")
    for i in images:
        users = ",".join(i.users) if i.users else "-"
        print(f"{i.name:<20} {_human(i.size_kib):>10} {i.created:<20} {users}")
    return 0


def _human(kib: int) -> str:
    size = float(kib)
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "KiB" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{kib} KiB"


def _agent_records_use(state_dir: Path) -> Any:
    """in_use(name) from the agent's database: a sliver recorded on the image."""
    db = state_dir / "agent.db"

    def in_use(name: str) -> bool:
        if not db.exists():
            return False
        with State.open(state_dir) as st:
            return any(rec.image == name for rec in st.slivers().values())

    return in_use


def cmd_remove(args: argparse.Namespace) -> int:
    try:
        _store(args).remove(args.name, _agent_records_use(_state_dir(args)))
    except (ImageError, OSError) as exc:
        return _fail("remove", exc)
    print(f"removed {args.name}")
    return 0
