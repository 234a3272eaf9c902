"""Accounts: ssh keys into slivers, node accounts, host accounts (ssh SLICE@node).

The slice initscripts are their own service (agent/initscripts.py); `Accounts` holds
one and orders the two in the reconciler's hooks: keys first, then the initscript.

Files inside a sliver root are written through agent/rootfiles.py (no symlink below
the root is followed), then chowned to the sliver's own uid range.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
from pathlib import Path

import trio

from agent.backend import Backend
from agent.config import AgentConfig
from agent.getslivers import Desired
from agent.initscripts import Initscripts
from agent.rootfiles import _parent_fd_close, read_in_root, write_in_root
from agent.state import SliverState, State
from agent.tasks import BackgroundTasks

log = logging.getLogger("agent.accounts")

# The states whose slice gets its keys (and host account): made, or a controller.
_KEYED = (SliverState.RUNNING, SliverState.STOPPED, SliverState.CONTROLLER)

MARK_BEGIN = "# --- planetlab-agent managed keys (do not edit below) ---"
MARK_END = "# --- end of planetlab-agent managed keys ---"
HOST_NAME_MAX = 32            # useradd's longest user name


SLICE_UID = 1000   # the slice's user inside its sliver, where that uid is free
_ID_RE = re.compile(r"[0-9]{1,10}\Z")


def _id(field: str) -> int | None:
    """A uid/gid field of the sliver's /etc/passwd: 1-10 ASCII digits below 2**32-1,
    else None. (str.isdigit() takes '²' and int() refuses it, or 5000 digits: F31.)"""
    if not _ID_RE.match(field):
        return None
    value = int(field)
    return value if value < 2**32 - 1 else None


def ensure_slice_user(root: Path, name: str, base: int, range_size: int) -> int | None:
    """The uid (inside) of the slice's own user in its sliver, added to the sliver's
    /etc/passwd and /etc/group (uid SLICE_UID, or the lowest free one above) when the
    image lacks it; None when the sliver has no usable /etc/passwd. Files are read and
    written without following links; the sliver owns them, so whatever it wrote there
    only changes uids inside its own range."""
    limit = 1 << 20
    raw = read_in_root(root, "etc/passwd", (base,), limit)
    if not raw or len(raw) >= limit:   # none, or too big to rewrite whole: leave it
        return None
    passwd = raw.decode("latin-1")   # bytes kept exactly when written back
    users = [line.split(":") for line in passwd.splitlines() if line.count(":") >= 6]
    for u in users:
        if u[0] == name:
            have = _id(u[2])
            return have if have is not None and 0 < have < range_size else None
    taken = {i for i in (_id(u[2]) for u in users) if i is not None}
    uid = next((i for i in range(SLICE_UID, min(range_size, 65534)) if i not in taken), None)
    if uid is None:
        return None
    _parent_fd_close(root, "home/-", (0o755, base, base))   # /home, root's, if missing
    sep = "" if passwd.endswith("\n") else "\n"
    write_in_root(root, "etc/passwd",
                  f"{passwd}{sep}{name}:x:{uid}:{uid}:PlanetLab slice {name}:/home/{name}:"
                  "/bin/sh\n".encode("latin-1"), 0o644, base, base, 0o755)
    graw = read_in_root(root, "etc/group", (base,), limit)
    group = graw.decode("latin-1")
    if len(graw) < limit and not any(line.split(":")[0] == name for line in group.splitlines()):
        sep = "" if not group or group.endswith("\n") else "\n"
        write_in_root(root, "etc/group", f"{group}{sep}{name}:x:{uid}:\n".encode("latin-1"), 0o644,
                      base, base, 0o755)
    log.info("sliver %s: user %s (uid %d inside) added", name, name, uid)
    return uid


def managed_block(existing: str, keys: tuple[str, ...] | list[str]) -> str:
    """Replace the agent's block in an authorized_keys file, keeping the rest."""
    lines = existing.splitlines()
    out: list[str] = []
    skipping = False
    for line in lines:
        if line == MARK_BEGIN:
            skipping = True
            continue
        if line == MARK_END:
            skipping = False
            continue
        if not skipping:
            out.append(line)
    out.append(MARK_BEGIN)
    out.extend(keys)
    out.append(MARK_END)
    return "\n".join(out) + "\n"


class HostAccountError(RuntimeError):
    """A slice's host account cannot be made; the message says why."""


def ensure_host_account(name: str, keys: list[str], shell: str, home_base: Path,
                        socket_path: str, ours: tuple[str, ...] = ()) -> bool:
    """The host account `name` whose login shell is `shell` (vsh: enters the sliver;
    forward_api_calls: a controller's API forwarder): made if missing, its shell,
    authorized_keys and agent socket link kept current. Returns False (and leaves it
    alone) when a user of that name exists whose shell is not one of `ours` (+`shell`):
    a user this agent did not make."""
    home = home_base / name
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        pw = None
    if pw is not None and pw.pw_shell != shell:
        if pw.pw_shell not in ours:
            log.warning("host account %s: a local user of that name with shell %s exists; "
                        "not a slice account, left alone", name, pw.pw_shell)
            return False
        res = subprocess.run(["usermod", "-s", shell, name], capture_output=True, text=True,
                             timeout=60)
        if res.returncode != 0:
            raise HostAccountError(f"usermod {name} failed: {res.stderr.strip()}")
        log.info("host account %s: shell now %s", name, shell)
    if pw is None:
        home_base.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["useradd", "-M", "-d", str(home), "-s", shell, "-p", "*",
                              "-c", f"PlanetLab slice {name}", "-U", name],
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise HostAccountError(f"useradd {name} failed: {res.stderr.strip()}")
        pw = pwd.getpwnam(name)
        log.info("host account %s made (uid %d), shell %s", name, pw.pw_uid, shell)
    # Home and .ssh stay root's: the account never needs to write there (vsh runs every
    # session inside the sliver), and root never writes into a slice-owned directory
    # where a planted symlink could redirect it [F11]. sshd accepts root-owned keys.
    _root_dir(home)
    ssh = home / ".ssh"
    _root_dir(ssh)
    # `restrict,pty`: no port, agent, X11 or Unix-socket forwarding, no ~/.ssh/rc; only a
    # session, which vsh takes into the sliver [F6]. A controller's forwarder needs no pty.
    options = "restrict" if shell.endswith("/forward_api_calls") else "restrict,pty"
    text = "".join(f"{options} {k}\n" for k in keys)
    auth = ssh / "authorized_keys"
    try:
        current = auth.read_text()
    except FileNotFoundError:
        current = None
    if current != text:
        tmp = ssh / ".authorized_keys.agent-tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(auth)
    link = home / ".agent.sock"
    if not link.is_symlink() or os.readlink(link) != socket_path:
        tmp_link = home / ".agent.sock.tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(socket_path)
        tmp_link.replace(link)
    return True


def _root_dir(path: Path) -> None:
    """A root-owned 0755 directory at `path` (not a symlink)."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise HostAccountError(f"{path} is not a directory")
    if st.st_uid != 0 or st.st_gid != 0 or stat.S_IMODE(st.st_mode) != 0o755:
        os.chown(path, 0, 0, follow_symlinks=False)
        os.chmod(path, 0o755)


def remove_host_account(name: str, shells: str | tuple[str, ...], home_base: Path) -> None:
    """Remove the slice's host account (only one this agent made: its shell is one of
    `shells`) and its home."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return
    if pw.pw_shell not in ((shells,) if isinstance(shells, str) else shells):
        return
    res = subprocess.run(["userdel", name], capture_output=True, text=True, timeout=60)
    if res.returncode not in (0, 6):   # 6: no such user (raced)
        raise HostAccountError(f"userdel {name} failed: {res.stderr.strip()}")
    home = home_base / name
    if home.parent == home_base:
        shutil.rmtree(home, ignore_errors=True)
    log.info("host account %s removed", name)


class Accounts:
    def __init__(self, cfg: AgentConfig, state: State, backend: Backend,
                 background: BackgroundTasks | None = None) -> None:
        """`background`: where initscripts run as tasks (None: inline, `run --once`)."""
        self.initscripts = Initscripts(cfg, state, backend, background)
        self.cfg = cfg
        self.state = state
        self.backend = backend
        self._installed: dict[str, str] = {}
        self._pending: set[str] = set()   # key installs that failed, retried each poll
        self._no_account: set[str] = set()   # slices whose names cannot be user names

    def _uid_base(self, name: str) -> int | None:
        idx = self.state.uid_range_of(name)
        if idx is None:
            return None
        return self.cfg.uid_pool_start + idx * self.cfg.uid_range_size

    def install_sliver_keys(self, name: str, keys: list[str]) -> bool:
        """authorized_keys for root and for the slice's user inside the sliver."""
        root = self.backend.root_of(name)
        base = self._uid_base(name)
        if root is None or base is None:
            return False
        text = "".join(k + "\n" for k in keys).encode()
        write_in_root(root, "root/.ssh/authorized_keys", text, 0o600, base, base)
        uid = ensure_slice_user(root, name, base, self.cfg.uid_range_size)
        if uid is not None:
            write_in_root(root, f"home/{name}/.ssh/authorized_keys", text, 0o600, base + uid,
                          base + uid)
        return True

    def install_node_accounts(self, accounts: dict[str, tuple[str, ...]]) -> None:
        """Honour GetSlivers `accounts` for the node's existing local users."""
        allowed = {n.strip() for n in self.cfg.node_accounts.split(",") if n.strip()}
        for name, keys in accounts.items():
            if name not in allowed:
                continue
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                log.info("node account %s: no such local user; skipped", name)
                continue
            # The user owns its home and .ssh: nothing there is followed (a planted
            # symlink must not make root write or chown a file of its choosing).
            home = Path(pw.pw_dir)
            try:
                existing = read_in_root(home, ".ssh/authorized_keys",
                                        (pw.pw_uid, 0)).decode(errors="replace")
                text = managed_block(existing, keys)
                if text != existing:
                    write_in_root(home, ".ssh/authorized_keys", text.encode(), 0o600,
                                  pw.pw_uid, pw.pw_gid)
                    log.info("node account %s: %d keys installed", name, len(keys))
            except OSError as exc:
                log.warning("node account %s: keys not installed in %s/.ssh: %s", name,
                            home, exc)

    def _shells(self) -> tuple[str, str]:
        return self.cfg.shell_path, self.cfg.controller_shell_path

    def _host_account(self, name: str, keys: list[str], controller: bool = False) -> None:
        if self.cfg.host_accounts and len(name) > HOST_NAME_MAX:
            if name not in self._no_account:   # said once, not at every poll
                self._no_account.add(name)
                log.warning("sliver %s: no host account (ssh SLICE@node): names longer "
                            "than %d characters are not Linux user names", name,
                            HOST_NAME_MAX)
            return
        if self.cfg.host_accounts:
            ensure_host_account(name, keys, self._shells()[1 if controller else 0],
                                Path(self.cfg.account_home_base), self.cfg.socket_path,
                                ours=self._shells())

    # -- the reconciler's hooks -------------------------------------------------------

    def new_context(self, name: str) -> None:
        self.initscripts.new_context(name)

    async def after_start(self, name: str) -> None:
        """Keys, then the slice's initscript (`start`) if it has not run in this context."""
        rec = self.state.get_sliver(name)
        if rec is None:
            return
        await self._install(name, list(rec.spec.get("keys", [])))
        await self.initscripts.after_start(name)

    async def before_stop(self, name: str) -> None:
        await self.initscripts.before_stop(name)

    async def sync_initscripts(self) -> None:
        await self.initscripts.sync()

    async def before_destroy(self, name: str) -> None:
        await self.initscripts.before_destroy(name)
        self._installed.pop(name, None)
        self._pending.discard(name)
        if self.cfg.host_accounts:
            await trio.to_thread.run_sync(remove_host_account, name, self._shells(),
                                          Path(self.cfg.account_home_base))

    async def sync(self, desired: Desired | None) -> None:
        """Keys of every running sliver (rewritten only when they change)."""
        for name, rec in self.state.slivers().items():
            if rec.state not in _KEYED:
                continue
            keys = list(rec.spec.get("keys", []))
            digest = f"{rec.state == SliverState.CONTROLLER}\n" + "\n".join(keys)
            if self._installed.get(name) == digest:
                continue
            await self._install(name, keys, rec.state == SliverState.CONTROLLER)
        if desired is not None:
            try:
                await trio.to_thread.run_sync(self.install_node_accounts, desired.accounts)
            except OSError as exc:
                log.error("node accounts: %s", exc)

    async def _install(self, name: str, keys: list[str], controller: bool = False) -> None:
        """The host account, and (a sliver's) the keys inside the sliver."""
        try:
            await trio.to_thread.run_sync(self._host_account, name, keys, controller)
            if controller or await trio.to_thread.run_sync(self.install_sliver_keys, name,
                                                           keys):
                self._installed[name] = f"{controller}\n" + "\n".join(keys)
                self._pending.discard(name)
                return
        except trio.Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - boundary: one sliver's data (F31)
            msg = f"installing ssh keys failed: {type(exc).__name__}: {exc}"
            log.error("sliver %s: %s", name, msg)
            rec = self.state.get_sliver(name)
            if rec is not None and not isinstance(exc, (OSError, HostAccountError,
                                                        subprocess.SubprocessError)):
                self.state.set_sliver_state(name, rec.state, msg)   # shown by status
        self._pending.add(name)

    async def sync_pending(self) -> None:
        """Retry the key installs that failed (cheap: only those) [F9]."""
        for name in sorted(self._pending):
            rec = self.state.get_sliver(name)
            if rec is None or rec.state not in _KEYED:
                self._pending.discard(name)
                continue
            await self._install(name, list(rec.spec.get("keys", [])),
                                rec.state == SliverState.CONTROLLER)
