"""The node's image store: reference images (vrefs), each stored once, read-only.

Layout under the store root (mode 0700, root only):

    <root>/<name>/rootfs/       the image tree, owned by ids 0..65535 as in the image
    <root>/<name>/image.json    name, created (UTC ISO), size_kib, source
    <root>/<name>/users/<key>   one marker per sliver root using it (see rootfs.py)
    <root>/.lock                flock serialising import, remove and marker changes
    <root>/.tmp-*               staging trees of imports in progress

An image is made under a staging name and renamed into place, so a failed or
interrupted import leaves no image and a half-made image is never visible. Slivers
see an image only through an idmapped, read-only mount of its rootfs (rootfs.py).
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
DEBOOTSTRAP = "/usr/sbin/debootstrap"
MAX_TAR_MEMBERS = 2_000_000

# progress(done, total, what): done/total in the tool's own units (debootstrap: percent
# scale it chooses), what: a short description of the current step.
Progress = Callable[[int, int, str], None]


class ImageError(Exception):
    """An image operation failed; the message names the image and what to do."""


class UnknownImage(ImageError, LookupError):
    """No image of that name in the store."""


class ImageInUse(ImageError):
    """The image is used by a sliver and cannot be removed."""


class UnsafeArchive(ImageError):
    """A tarball member would escape the image or is not allowed in an image."""


@dataclass(frozen=True)
class Image:
    name: str
    path: Path                  # the image directory; the tree is path / "rootfs"
    created: str                # UTC, ISO 8601
    size_kib: int
    source: str
    users: tuple[str, ...] = field(default=())   # slivers using it

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"


def check_name(name: str, what: str = "image") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ImageError(f"bad {what} name {name!r}: use 1-64 letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    return name


def tree_size_kib(root: Path) -> int:
    """Disk space of a tree (allocated blocks, each hard-linked inode once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_blocks * 512
    return total // 1024


class ImageStore:
    """Reference images stored once per node. Safe to use from several processes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._reap_staging()

    def _reap_staging(self) -> None:
        """Delete staging trees (.tmp-*-<pid>-<ns>) whose process is gone: what an
        import or removal killed half-way left behind."""
        for p in self.root.iterdir():
            if not p.name.startswith(".tmp-"):
                continue
            parts = p.name.rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit() and not Path(f"/proc/{parts[1]}").exists():
                shutil.rmtree(p, ignore_errors=True)

    # -- locking and paths -------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (flock: released if the process dies)."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _dir(self, name: str) -> Path:
        return self.root / check_name(name)

    @contextlib.contextmanager
    def _staging(self, name: str) -> Iterator[Path]:
        """A fresh staging dir; removed unless the body renamed it into place."""
        stage = self.root / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
        stage.mkdir(mode=0o700)
        try:
            yield stage
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def _commit(self, name: str, stage: Path, source: str) -> Image:
        """Write the metadata and rename the staged image into place."""
        rootfs = stage / "rootfs"
        meta = {"name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "size_kib": tree_size_kib(rootfs), "source": source}
        (stage / "image.json").write_text(json.dumps(meta, indent=1) + "\n")
        (stage / "users").mkdir()
        with self.locked():
            dest = self._dir(name)
            if dest.exists():
                raise ImageError(f"image {name!r} already exists: remove it first")
            os.rename(stage, dest)
        return self.get(name)

    def _check_new(self, name: str) -> None:
        if self._dir(name).exists():
            raise ImageError(f"image {name!r} already exists: remove it first")

    # -- import ------------------------------------------------------------

    def import_dir(self, name: str, src: Path) -> Image:
        """Copy a directory tree in as image `name`, preserving ownership, modes,
        timestamps, hard links, symlinks (as links, never followed) and xattrs.
        Device nodes are dropped: a sliver's /dev is made by its context."""
        self._check_new(name)
        src = Path(src)
        if not src.is_dir() or src.is_symlink():
            raise ImageError(f"cannot import image {name!r}: {src} is not a directory")
        with self._staging(name) as stage:
            res = subprocess.run(["cp", "-a", "--one-file-system", "--no-target-directory",
                                  str(src), str(stage / "rootfs")],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise ImageError(f"cannot import image {name!r} from {src}: "
                                 f"{res.stderr.strip()}")
            _drop_devices(stage / "rootfs")
            return self._commit(name, stage, f"dir:{src.resolve()}")

    def import_tarball(self, name: str, tarball: Path) -> Image:
        """Unpack a (possibly compressed) tarball as image `name`.

        Hostile archives are refused, naming the member: absolute paths, '..'
        components, hard links leaving the image, and any member whose parent
        directory is a symlink (it would write through the link). Device nodes are
        dropped. Numeric ownership and modes (setuid included) are kept.
        """
        self._check_new(name)
        tarball = Path(tarball)
        if not tarball.is_file():
            raise ImageError(f"cannot import image {name!r}: {tarball} is not a file")
        with self._staging(name) as stage:
            rootfs = stage / "rootfs"
            rootfs.mkdir(mode=0o755)
            try:
                with tarfile.open(tarball, "r:*") as tar:
                    _safe_extract(tar, rootfs)
            except (tarfile.TarError, EOFError) as exc:
                raise ImageError(f"cannot import image {name!r}: {tarball} is not a "
                                 f"readable tarball ({exc})") from None
            return self._commit(name, stage, f"tar:{tarball.resolve()}")

    def build_debootstrap(self, name: str, suite: str, progress: Progress | None = None,
                          *, mirror: str | None = None, variant: str = "minbase",
                          debootstrap: str = DEBOOTSTRAP) -> Image:
        """Build image `name` with Debian's debootstrap, reporting progress.

        debootstrap's machine-readable protocol (--debian-installer: "P: now end
        what" progress lines on fd 3, "I:"/"IF:" info lines on fd 4) drives
        `progress`. Needs the mirror to be reachable.
        """
        self._check_new(name)
        if not re.match(r"^[a-z][a-z0-9-]{1,31}\Z", suite or ""):
            raise ImageError(f"bad debootstrap suite {suite!r} (e.g. bookworm)")
        with self._staging(name) as stage:
            rootfs = stage / "rootfs"
            argv = [debootstrap, "--debian-installer", f"--variant={variant}", suite,
                    str(rootfs)] + ([mirror] if mirror else [])
            log = run_debootstrap(argv, progress or (lambda d, t, w: None))
            if log.returncode != 0:
                tail = "\n".join(log.lines[-10:])
                raise ImageError(f"debootstrap of {suite} for image {name!r} failed "
                                 f"(exit {log.returncode}):\n{tail}")
            _drop_devices(rootfs)
            return self._commit(name, stage, f"debootstrap:{suite}")

    # -- query and removal ---------------------------------------------------

    def _load(self, d: Path, with_users: bool = True) -> Image:
        try:
            meta = json.loads((d / "image.json").read_text())
        except (OSError, ValueError) as exc:
            raise ImageError(f"image {d.name!r} is damaged ({exc}): remove it") from None
        return Image(d.name, d, meta.get("created", ""), int(meta.get("size_kib", 0)),
                     meta.get("source", ""), tuple(self.users(d.name)) if with_users else ())

    def get(self, name: str, *, with_users: bool = True) -> Image:
        """The image; `with_users=False` skips reading the user markers (one file per
        sliver), for callers that only need its tree."""
        d = self._dir(name)
        if not (d / "image.json").is_file():
            raise UnknownImage(f"no image {name!r} in {self.root} "
                               "(see `planetlab-agent image list`)")
        return self._load(d, with_users)

    def list(self) -> list[Image]:
        out = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not (d / "image.json").is_file():
                continue
            out.append(self._load(d))
        return out

    def users(self, name: str) -> builtins.list[str]:
        """Slivers whose root uses the image (markers whose root still exists)."""
        udir = self._dir(name) / "users"
        found = []
        if udir.is_dir():
            for m in sorted(udir.iterdir()):
                info = _read_marker(m)
                if info is not None and _marker_live(info, name):
                    found.append(info["name"])
        return found

    def add_user(self, name: str, roots_dir: Path, sliver: str) -> Path:
        """Record that `sliver` (under `roots_dir`) uses image `name`. Under the lock,
        so that a concurrent remove either sees the marker or has already removed
        the image (then this raises UnknownImage)."""
        with self.locked():
            d = self.get(name, with_users=False).path
            marker = d / "users" / _marker_key(roots_dir, sliver)
            tmp = marker.with_name(marker.name + ".tmp")
            tmp.write_text(json.dumps({"roots_dir": str(Path(roots_dir).resolve()),
                                       "name": sliver}))
            os.replace(tmp, marker)
            return marker

    def remove(self, name: str, in_use: Callable[[str], bool] = lambda n: False) -> None:
        """Remove image `name`; refused while a sliver uses it (a live marker, or
        `in_use(name)` from the caller's own records)."""
        with self.locked():
            img = self.get(name)
            if img.users or in_use(name):
                who = ", ".join(img.users) or "a sliver (per the caller's records)"
                raise ImageInUse(f"image {name!r} is in use by {who}: destroy those "
                                 "slivers first")
            # Rename first so that the image disappears at once even if the tree
            # takes a while to delete.
            doomed = self.root / f".tmp-rm-{name}-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(img.path, doomed)
        shutil.rmtree(doomed)


def remove_user_marker(roots_dir: Path, sliver: str, image_dir: Path) -> None:
    """Drop the marker add_user made (idempotent; the image may be gone)."""
    marker = Path(image_dir) / "users" / _marker_key(roots_dir, sliver)
    marker.unlink(missing_ok=True)


def _marker_key(roots_dir: Path, sliver: str) -> str:
    import hashlib

    h = hashlib.sha256(str(Path(roots_dir).resolve()).encode()).hexdigest()[:16]
    return f"{sliver}@{h}"


def _read_marker(m: Path) -> dict[str, str] | None:
    if m.name.endswith(".tmp"):
        return None
    try:
        info = json.loads(m.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "name" in info and "roots_dir" in info else None


def _marker_live(info: dict[str, str], image: str) -> bool:
    """A marker counts while its sliver's root state still names this image."""
    state = Path(info["roots_dir"]) / ".state" / f"{info['name']}.json"
    try:
        return json.loads(state.read_text()).get("image") == image
    except (OSError, ValueError):
        return False


def _drop_devices(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            p = os.path.join(dirpath, n)
            mode = os.lstat(p).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                os.unlink(p)


def _member_path(name: str, what: str) -> Path:
    """The member's path relative to the image root; refuses escapes."""
    rel = name
    while rel.startswith("./"):
        rel = rel[2:]
    if rel in ("", "."):
        return Path(".")
    if rel.startswith("/"):
        raise UnsafeArchive(f"tarball {what} {name!r} has an absolute path")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"tarball {what} {name!r} has a '..' component")
    return Path(*parts) if parts else Path(".")


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract member by member, checking each against the tree made so far."""
    dest = dest.resolve()
    dirs: list[tuple[tarfile.TarInfo, Path]] = []
    count = 0
    for member in tar:
        count += 1
        if count > MAX_TAR_MEMBERS:
            raise UnsafeArchive(f"tarball has more than {MAX_TAR_MEMBERS} members")
        rel = _member_path(member.name, "member")
        if member.ischr() or member.isblk():
            continue  # device nodes never come from an image
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()
                or member.isfifo()):
            raise UnsafeArchive(f"tarball member {member.name!r} has an unsupported type")
        target = dest / rel
        # Every directory on the way must be a real directory inside dest: a symlink
        # member followed by a member "under" it would otherwise write outside.
        parent = target.parent
        if os.path.realpath(parent) != str(parent):
            raise UnsafeArchive(f"tarball member {member.name!r} lies under a symlink")
        if member.islnk():
            link_rel = _member_path(member.linkname, "hard link target")
            link_target = dest / link_rel
            if os.path.realpath(link_target.parent) != str(link_target.parent):
                raise UnsafeArchive(f"tarball hard link {member.name!r} points under a "
                                    "symlink")
            # Whether link(2)/linkat(2) follows a symlink source differs by call and
            # flags; were it followed, the image would hold a hard link to a host
            # file. No image needs a hard link to a symlink: refuse it.
            if link_target.is_symlink():
                raise UnsafeArchive(f"tarball hard link {member.name!r} points to a "
                                    "symlink")
        if rel == Path("."):
            # The archive's root entry: take its mode and owner for the image root.
            os.chown(dest, member.uid, member.gid)
            os.chmod(dest, stat.S_IMODE(member.mode))
            continue
        if os.path.lexists(target) and not (member.isdir() and target.is_dir()
                                           and not target.is_symlink()):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        member.name = str(rel)
        if member.islnk():
            member.linkname = str(_member_path(member.linkname, "hard link target"))
        if member.isdir():
            dirs.append((member, target))
        kwargs: dict[str, object] = {"set_attrs": True, "numeric_owner": True}
        if hasattr(tarfile, "fully_trusted_filter"):
            # We did the checks above; the stdlib filters would also strip setuid bits
            # and ownership, which an OS image needs.
            kwargs["filter"] = "fully_trusted"
        tar.extract(member, dest, **kwargs)  # type: ignore[arg-type]
    # Directory modes and times last, deepest first (as tar(1) does), so that a
    # read-only directory did not stop its own members from being written.
    for member, target in sorted(dirs, key=lambda d: len(d[1].parts), reverse=True):
        os.chmod(target, stat.S_IMODE(member.mode))
        os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)


# -- debootstrap ---------------------------------------------------------------


@dataclass
class DebootstrapLog:
    returncode: int
    lines: list[str]


class DebootstrapProtocol:
    """Parses debootstrap's --debian-installer output (fd 3 progress, fd 4 info).

    Sans-IO: feed it lines, it calls `progress(now, end, what)` for each completed
    "P:" record (with its "PA:" args substituted into the "PF:" format).
    """

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._pending: tuple[int, int, str] | None = None
        self._args: list[str] = []
        self.last_info = ""
        self.errors: list[str] = []

    def feed(self, line: str) -> None:
        tag, _, rest = line.partition(": ")
        if tag == "P":
            bits = rest.split(" ", 2)
            try:
                now, end = int(bits[0]), int(bits[1])
            except (IndexError, ValueError):
                return
            self._pending = (now, end, bits[2] if len(bits) > 2 else "")
            self._args = []
        elif tag in ("PA", "IA", "EA", "WA"):
            self._args.append(rest)
        elif tag == "EF":
            self.errors.append(_format(rest, self._args))
            self._args = []
        elif tag in ("E", "W"):
            self._args = []
        elif tag == "WF":
            self._args = []
        elif tag == "PF" and self._pending is not None:
            now, end, what = self._pending
            self.progress(now, end, _format(rest, self._args) or what)
            self._pending = None
        elif tag == "IF":
            self.last_info = _format(rest, self._args)
            self._args = []
        elif tag == "I":
            self._args = []


def _format(fmt: str, args: list[str]) -> str:
    out = fmt
    for a in args:
        out = out.replace("%s", a, 1)
    return out.replace("%%", "%")


def run_debootstrap(argv: list[str], progress: Progress) -> DebootstrapLog:
    """Run debootstrap with fds 3 and 4 on pipes and feed its protocol to `progress`.

    The child is killed and reaped if anything (including KeyboardInterrupt) stops us.
    """
    import select

    proto = DebootstrapProtocol(progress)
    r3, w3 = os.pipe()
    r4, w4 = os.pipe()
    lines: list[str] = []
    # debootstrap writes to fds 3 and 4 by number: a shell moves our pipes there.
    # bash, not dash: dash takes only one-digit fd numbers in redirections.
    wrapper = ["/bin/bash", "-c", f'exec 3>&{int(w3)} 4>&{int(w4)} {int(w3)}>&- {int(w4)}>&-; '
               'exec "$@"', "sh", *argv]
    proc = subprocess.Popen(wrapper, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, pass_fds=(w3, w4))
    os.close(w3)
    os.close(w4)
    assert proc.stdout is not None
    bufs = {r3: b"", r4: b"", proc.stdout.fileno(): b""}
    try:
        open_fds = list(bufs)
        while open_fds:
            readable, _, _ = select.select(open_fds, [], [])
            for fd in readable:
                data = os.read(fd, 65536)
                if not data:
                    open_fds.remove(fd)
                    continue
                bufs[fd] += data
                *complete, bufs[fd] = bufs[fd].split(b"\n")
                for raw in complete:
                    text = raw.decode(errors="replace")
                    if fd == r3 or fd == r4:
                        proto.feed(text)
                    else:
                        lines.append(text)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(r3)
        os.close(r4)
        proc.stdout.close()
    if proto.last_info:
        lines.append(proto.last_info)
    lines.extend(f"E: {e}" for e in proto.errors)
    return DebootstrapLog(rc, lines)

