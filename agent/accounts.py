"""Accounts and initscripts: ssh keys into slivers, node accounts, slice initscripts.

Files inside a sliver root are written through agent/rootfiles.py (no symlink below
the root is followed), then chowned to the sliver's own uid range.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import trio

from agent.backend import Backend, split_dropped
from agent.config import AgentConfig
from agent.getslivers import Desired
from agent.rootfiles import _parent_fd_close, read_in_root, remove_in_root, write_in_root
from agent.state import SliverState, State
from agent.tasks import BackgroundTasks

log = logging.getLogger("agent.accounts")

# The states whose slice gets its keys (and host account): made, or a controller.
_KEYED = (SliverState.RUNNING, SliverState.STOPPED, SliverState.CONTROLLER)

MARK_BEGIN = "# --- planetlab-agent managed keys (do not edit below) ---"
MARK_END = "# --- end of planetlab-agent managed keys ---"
LOG_LINES = 200   # of an initscript's output tail (agent.backend.OUTPUT_TAIL bytes)
INITSCRIPT_SLOTS = 8        # initscripts running at once in the long-running agent
INITSCRIPT_TIMEOUT = 3600.0  # seconds a background initscript may run
ONCE_TIMEOUT = 60.0          # ... and one run inline by `run --once`
HOST_NAME_MAX = 32            # useradd's longest user name
STOP_TIMEOUT = 10.0          # `initscript stop` before a sliver is frozen or destroyed


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
        self.cfg = cfg
        self.state = state
        self.backend = backend
        self._installed: dict[str, str] = {}
        self._pending: set[str] = set()   # key installs that failed, retried each poll
        self._background = background
        self._initscript_slots = trio.CapacityLimiter(INITSCRIPT_SLOTS)
        self._stop_slots = trio.CapacityLimiter(64)   # `stop` runs: short, never queued
        self._generation: dict[str, int] = {}   # per sliver, see _bump
        self._last_generation = 0
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

    async def before_destroy(self, name: str) -> None:
        try:
            await self.before_stop(name)
        except Exception as exc:  # noqa: BLE001 - the sliver goes all the same
            log.warning("sliver %s: initscript stop: %s", name, exc)
        self._generation.pop(name, None)
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

    # -- initscripts ------------------------------------------------------------------------
    #
    # The slice's initscript (nodemanager spec §2.8: `initscript_code`, or the named entry
    # of GetSlivers `initscripts`) is written to /etc/planetlab/initscript in the sliver
    # and run there as `initscript start|restart|stop SLICE`. The agent records, per
    # sliver, the digest of the script it last ran in the current context
    # (meta `initscript_ran:NAME`, cleared when a context is made): a new context runs
    # `start` once it runs, a changed script on a running sliver runs `restart`, a
    # destroyed one runs `stop` first. In the long-running agent scripts run in the
    # background (INITSCRIPT_SLOTS at a time, up to INITSCRIPT_TIMEOUT each), never
    # holding a sliver's lock; `run --once` runs them inline, up to ONCE_TIMEOUT.

    def new_context(self, name: str) -> None:
        """A context is being made for `name`: its initscript has not run in it, and
        runs queued for its previous context are void."""
        self._bump(name)
        self.state.delete_meta(f"initscript_ran:{name}")

    def _bump(self, name: str) -> int:
        """A new generation of `name`'s initscript runs: queued older ones are skipped."""
        self._last_generation += 1   # node-wide: a number is never used twice
        self._generation[name] = self._last_generation
        return self._last_generation

    async def after_start(self, name: str) -> Any:
        """Keys, then the slice's initscript (`start NAME`) if it has not run in this
        context yet."""
        rec = self.state.get_sliver(name)
        if rec is None:
            return
        await self._install(name, list(rec.spec.get("keys", [])))
        if self.state.get_meta(f"initscript_ran:{name}") is None:
            await self._initscript(name, rec.spec.get("initscript") or "", "start")

    async def sync_initscripts(self) -> None:
        """A running sliver whose initscript changed since it last ran: `restart`. One
        sliver's failure (say, its /etc/planetlab made a symlink) stays with it."""
        ran = self.state.meta_with_prefix("initscript_ran:")
        for name, rec in self.state.slivers().items():
            last = ran.get(name)
            if rec.state != SliverState.RUNNING or last is None:
                continue
            script = rec.spec.get("initscript") or ""
            if _digest(script) != last:
                try:
                    await self._initscript(name, script, "restart")
                except Exception as exc:  # noqa: BLE001 - boundary: one sliver
                    log.warning("sliver %s: initscript not installed: %s", name, exc)

    async def _initscript(self, name: str, script: str, action: str) -> None:
        root = self.backend.root_of(name)
        base = self._uid_base(name)
        if root is None or base is None:
            return
        self.state.set_meta(f"initscript_ran:{name}", _digest(script))
        gen = self._bump(name)   # a newer script supersedes runs still queued
        if not script:
            await trio.to_thread.run_sync(remove_in_root, root, "etc/planetlab/initscript")
            return
        await trio.to_thread.run_sync(
            write_in_root, root, "etc/planetlab/initscript", script.encode(), 0o755, base, base,
            0o755)
        if self._background is None:
            await self._run_initscript(name, action, ONCE_TIMEOUT, gen)
        else:
            self._background.start_soon(self._run_initscript, name, action, INITSCRIPT_TIMEOUT,
                                        gen, name=f"initscript:{name}")

    async def _run_initscript(self, name: str, action: str, timeout: float, gen: int,
                              limiter: trio.CapacityLimiter | None = None) -> None:
        """Run the script unless a newer generation superseded this run (a newer
        script, a new context, a stop or destroy); never raises."""
        try:
            async with limiter or self._initscript_slots:
                if self._generation.get(name) != gen:
                    return   # superseded while it waited for a slot
                code, output = await trio.to_thread.run_sync(
                    self.backend.run, name,
                    ["/bin/sh", "/etc/planetlab/initscript", action, name], "root", timeout,
                    abandon_on_cancel=True)
            self._log_output(name, action, code, output)
            if self._generation.get(name) == gen and self.state.get_sliver(name) is not None:
                self.state.set_meta(f"initscript_status:{name}", str(code))
        except Exception as exc:  # noqa: BLE001 - the sliver may be gone meanwhile
            log.warning("sliver %s: initscript %s could not run: %s", name, action, exc)

    @staticmethod
    def _log_output(name: str, action: str, code: int, output: str) -> None:
        dropped, output = split_dropped(output)
        lines = output.splitlines()
        if dropped:
            log.info("sliver %s: initscript output: %d earlier bytes dropped, its last %d "
                     "bytes kept", name, dropped, len(output.encode()))
        if len(lines) > LOG_LINES:
            log.info("sliver %s: initscript output: its last %d of %d lines follow", name,
                     LOG_LINES, len(lines))
        for line in lines[-LOG_LINES:]:
            log.info("sliver %s initscript: %s", name, line)
        log.info("sliver %s: initscript %s exited with %d", name, action, code)

    async def before_stop(self, name: str) -> None:
        """`stop` for the initscript of a sliver about to be frozen or destroyed: runs
        queued for it are void, and `stop` itself runs at once (not behind the slots
        of start/restart runs) for STOP_TIMEOUT at most."""
        gen = self._bump(name)
        if self.state.get_meta(f"initscript_ran:{name}") in (None, _digest("")):
            return
        if not await trio.to_thread.run_sync(self.backend.frozen, name):  # it would wait
            await self._run_initscript(name, "stop", STOP_TIMEOUT, gen, self._stop_slots)


def _digest(script: str) -> str:
    return hashlib.sha256(script.encode()).hexdigest()[:32]
