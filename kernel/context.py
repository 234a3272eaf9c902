"""Slivers as Linux contexts: create, run in, freeze, thaw, adopt, destroy.

A context is a tree of processes under one small static init
(kernel/native/sliver-init.c, built to kernel/bin/sliver-init): its own user
namespace mapped to a host uid/gid range, mount, PID, UTS, IPC and cgroup
namespaces, a pivot_root into the prepared root, a fresh /proc, a minimal /dev, the
capability bounding set and rlimits asked for, no_new_privs, and optionally the
seccomp guard. Limits are cgroups (kernel/cgroups.py).

Everything runs in a sliver by asking its init over a root-only control socket
(<run_dir>/<name>/ctl), so every process of the sliver descends from the init and is
covered by the guard filter the init installed before its first child.

On the host a context is a directory <run_dir>/<name>/ with `ctl` and `state.json`
(init pid and start time, uid range, root, limits); `adopt` finds a running context
again from it after the caller restarts. `destroy` kills the PID namespace (SIGKILL
to the init), waits for it, removes the cgroups and that directory: the namespaces
and every mount made inside die with the last process.

These calls block (they wait on the init); from trio call them with trio.to_thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeAlias

import prctl

from kernel import caps as _caps
from kernel import seccomp as _seccomp
from kernel.cgroups import PARENT, Layout, SliverCgroup, detect_layout, ensure_net_cls

INIT_BIN = Path(__file__).resolve().parent / "bin" / "sliver-init"

#: The fd at which every sliver init keeps its own copy of the seccomp listener, so
#: the agent can take it back with pidfd_getfd(init_pid, GUARD_LISTENER_FD) after a
#: restart (kernel/native/sliver-init.c GUARD_FD).
GUARD_LISTENER_FD = 4

UID_COUNT = 65536
NAME_RE = re.compile(r"^[a-z0-9][A-Za-z0-9_.-]{0,62}\Z")   # also fits a hostname (64 bytes)
RLIMITS = ("as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
           "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack")
RLIM_INFINITY = 2**64 - 1

#: /dev/shm of a sliver without mem_max (with one: half of it, see shm_size).
SHM_DEFAULT = 64 << 20
#: Every process of a sliver starts with this oom_score_adj, also its floor (the init
#: sets it as host root): the OOM killer takes a sliver before the node's own processes.
SLIVER_OOM_SCORE_ADJ = 500
#: What a process the init starts has above it (kernel/native/sliver-init.c): at its
#: memory limit, a sliver loses that process before its init and sockd.
CHILD_OOM_STEP = 100

SETUP_TIMEOUT = 10.0
START_TIMEOUT = 30.0   # for the init to start a process (it gives up on an exec after 10 s)

#: Tests only: the launcher lingers this many ms after forking the init, to show that
#: the launch handshake does not depend on when the launcher runs (sliver-init.c).
_LAUNCHER_DELAY_MS = 0

# Control protocol (see sliver-init.c): request header and reply.
REQ_MAGIC = 0x534C5652
REQ_TTY = 1
REQ_MAX = 262144          # sliver-init.c REQ_MAX
REQ_HDR = struct.Struct("<IIIHH")
REPLY = struct.Struct("<ii120s")
R_STARTED, R_EXITED, R_ERROR = 1, 2, 3

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
StdSpec: TypeAlias = "int | IO[Any] | None"


class ContextError(RuntimeError):
    """A context operation failed; the message names the sliver and the step."""


@dataclass(frozen=True)
class Limits:
    """A sliver's limits. cgroup ones can change in place (update_limits); rlimits
    and capabilities are fixed when the context is created."""

    cpu_share: int = 1                     # relative weight (PlanetLab cpu_share)
    cpu_pct: int | None = None             # cap, percent of one CPU
    mem_max: int | None = None             # bytes
    pids_max: int | None = None
    net_cls_classid: int | None = None
    inet_sockets_max: int | None = None    # INET sockets open at once (kernel/sockcap.py)
    net_class_minor: int | None = None     # HTB class 1:minor of its egress (kernel/netclass.py)
    rlimits: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # -1 = unlimited
    capabilities: tuple[str, ...] | None = None   # bounding set; None = caps.DEFAULT_CAPS
    cpus: str | None = None                # cpuset, e.g. "0" or "0-1"; None = all
    cpu_weight: int | None = None          # cgroup v2 cpu.weight 1..10000; None: share x 100
    cpu_partition: bool = False            # `cpus` exclusive: a cpuset partition (v2)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.cpu_share, int) or self.cpu_share < 1:
            raise ValueError(f"cpu_share must be an integer >= 1, not {self.cpu_share!r}")
        ncpu = os.cpu_count() or 1
        if self.cpu_pct is not None and not 1 <= self.cpu_pct <= 100 * ncpu:
            raise ValueError(f"cpu_pct must be 1..{100 * ncpu}, not {self.cpu_pct!r}")
        for key in ("mem_max", "pids_max", "net_cls_classid", "inet_sockets_max",
                    "net_class_minor"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{key} must be a positive integer, not {v!r}")
        for name, pair in self.rlimits.items():
            if name not in RLIMITS:
                raise ValueError(f"unknown rlimit {name!r}; known: {', '.join(RLIMITS)}")
            soft, hard = pair
            s, h = _rlim(soft), _rlim(hard)
            if s > h:
                raise ValueError(f"rlimit {name}: soft {soft} above hard {hard}")
        if self.cpu_weight is not None and (not isinstance(self.cpu_weight, int)
                                            or not 1 <= self.cpu_weight <= 10000):
            raise ValueError(f"cpu_weight must be 1..10000, not {self.cpu_weight!r}")
        if self.cpu_partition and not self.cpus:
            raise ValueError("cpu_partition needs cpus")
        if self.cpus is not None and not re.fullmatch(r"[0-9]+([-,][0-9]+)*", self.cpus):
            raise ValueError(f"cpus must look like '0' or '0-1,3', not {self.cpus!r}")
        _caps.bounding_mask(self.capabilities)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rlimits"] = {k: list(v) for k, v in self.rlimits.items()}
        d["capabilities"] = None if self.capabilities is None else list(self.capabilities)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Limits:
        d = dict(d)
        d["rlimits"] = {k: (int(v[0]), int(v[1])) for k, v in d.get("rlimits", {}).items()}
        if d.get("capabilities") is not None:
            d["capabilities"] = tuple(d["capabilities"])
        return cls(**d)


@dataclass(frozen=True)
class GuardSpec:
    """Seccomp user-notification guard for a context (kernel/seccomp.py builds it)."""

    filter: bytes          # struct sock_filter[] as raw bytes
    listener_sink: int     # fd of a connected AF_UNIX socket; the listener is sent over
                           # it with SCM_RIGHTS once the filter is installed


def shm_size(limits: Limits) -> int:
    """Bytes of the sliver's /dev/shm tmpfs: half of mem_max (as the kernel's default
    is half of RAM), else SHM_DEFAULT; never the host-wide default (F34)."""
    if limits.mem_max:
        return max(1 << 20, limits.mem_max // 2)
    return SHM_DEFAULT


def _rlim(v: int) -> int:
    return RLIM_INFINITY if v < 0 else int(v)


def _proc_starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): with the pid it
    identifies a process across pid reuse. None if there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = data.rsplit(")", 1)[1].split()
    if rest[0] == "Z":    # exited, waiting for its reaper
        return None
    return int(rest[19])


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"bad sliver name {name!r}: use 1-63 of A-Z a-z 0-9 _ . - "
                         "starting with a lower-case letter or digit")


class _SyncReader:
    """Lines from the init's sync socket, with a deadline."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock, self.name, self.buf = sock, name, b""

    def line(self, deadline: float) -> str:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ContextError(f"create {self.name}: init did not answer in "
                                   f"{SETUP_TIMEOUT}s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(512)
            except TimeoutError:
                continue
            if not chunk:
                raise ContextError(f"create {self.name}: init exited during setup"
                                   + (f" ({self.buf.decode(errors='replace')})"
                                      if self.buf else ""))
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        text = line.decode(errors="replace")
        if text.startswith("error "):
            raise ContextError(f"create {self.name}: {text[6:]}")
        return text

    def expect(self, word: str, deadline: float) -> str:
        text = self.line(deadline)
        if not text.startswith(word):
            raise ContextError(f"create {self.name}: init said {text!r}, expected {word!r}")
        return text[len(word):].strip()


class Context:
    """A running (or frozen) sliver context. Get one from create() or adopt()."""

    def __init__(self, run_dir: Path, name: str, state: dict[str, Any],
                 layout: Layout | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.name = name
        self.state = state
        self.init_pid: int = state["init_pid"]
        self.uid_base: int = state["uid_base"]
        self.uid_count: int = state["uid_count"]
        self.root = Path(state["root"])
        self.limits = Limits.from_json(state["limits"])
        self.cgroup = SliverCgroup(layout or detect_layout(), name,
                                   state.get("cgroup_parent", PARENT))

    # -- paths --
    @property
    def dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def ctl_path(self) -> Path:
        return self.dir / "ctl"

    # -- construction --
    @classmethod
    def create(cls, run_dir: Path, name: str, root: Path, uid_base: int,
               uid_count: int = UID_COUNT, limits: Limits | None = None,
               hostname: str | None = None, guard: GuardSpec | None = None,
               cgroup_parent: str = PARENT) -> Context:
        """Start a new context. On any failure nothing is left behind (no process,
        cgroup, or directory) and ContextError/ValueError/OSError names the step.

        `cgroup_parent`: the node-wide group the sliver's groups go under (one per
        agent when several share a kernel, e.g. in tests)."""
        limits = limits or Limits()
        run_dir = Path(run_dir)
        _check_name(name)
        hostname = hostname or name
        if not isinstance(uid_base, int) or uid_base < 1 or uid_base + uid_count > 2**32 - 1:
            raise ValueError(f"bad uid range base {uid_base!r} count {uid_count!r}")
        if uid_count < 1:
            raise ValueError(f"bad uid count {uid_count!r}")
        root = Path(root)
        if not root.is_absolute() or not root.is_dir():
            raise FileNotFoundError(errno.ENOENT, f"create {name}: root is not a directory",
                                    str(root))
        if not (root / "bin/sh").exists() and not any(root.iterdir()):
            raise FileNotFoundError(errno.ENOENT, f"create {name}: root is empty", str(root))
        limits.validate()
        capmask = _caps.bounding_mask(limits.capabilities)
        if not INIT_BIN.is_file():
            raise FileNotFoundError(errno.ENOENT, "sliver init not built: run `make native`",
                                    str(INIT_BIN))
        if len(str(run_dir / name / "ctl")) > 107:
            raise ValueError(f"run dir {run_dir} too long for a unix socket path")
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if (run_dir / name).exists():
            raise FileExistsError(errno.EEXIST, f"create {name}: the name is taken",
                                  str(run_dir / name))
        layout = ensure_net_cls(detect_layout()) if limits.net_cls_classid else detect_layout()
        cg = SliverCgroup(layout, name, cgroup_parent)
        # Creating a file is slow on some filesystems (about 0.7 ms on this VM's ext4
        # /run): the run dir, the control socket and state.json are made while the
        # launcher and the init do their part.
        with contextlib.ExitStack() as undo, contextlib.ExitStack() as fds:
            _claim_uids(run_dir, name, uid_base, uid_count)
            undo.callback(_release_uids, run_dir, name)
            d = run_dir / name
            try:
                cg.create(limits)
            except FileExistsError:
                raise FileExistsError(errno.EEXIST, f"create {name}: a cgroup of that name "
                                      "exists (another sliver, or left by a crash)",
                                      str(cg.dirs()[0])) from None
            undo.callback(cg.destroy)

            host_end, init_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fds.enter_context(host_end)
            fds.enter_context(init_end)
            argv = [str(INIT_BIN), f"--sync={init_end.fileno()}",
                    f"--root={root}", f"--hostname={hostname}", f"--capbset={capmask:x}"]
            argv += [f"--cgroup={g}" for g in cg.dirs()]
            if _LAUNCHER_DELAY_MS:
                argv.append(f"--launcher-delay-ms={int(_LAUNCHER_DELAY_MS)}")
            for rname, (soft, hard) in sorted(limits.rlimits.items()):
                argv.append(f"--rlimit={rname}:{_rlim(soft)}:{_rlim(hard)}")
            # The user namespace is made as the sliver's base uid (see sliver-init.c):
            # what the sliver makes inside it is charged to that uid, not to root.
            argv.append(f"--owner={uid_base}")
            argv.append(f"--shm-size={shm_size(limits)}")
            argv.append(f"--oom-score-adj={SLIVER_OOM_SCORE_ADJ}")
            pass_fds = [init_end.fileno()]
            # Without a guard the same filter still hardens the sliver (foreign
            # architectures, raw sockets, io_uring, keyrings), notifying nothing.
            filt = guard.filter if guard is not None else _seccomp.guard_filter(notify=())
            if not filt or len(filt) % 8 or len(filt) > 4096 * 8:
                raise ValueError(f"create {name}: guard filter of {len(filt)} "
                                 "bytes is not 1..4096 sock_filter entries")
            rfd, wfd = os.pipe()
            fds.callback(os.close, rfd)
            try:
                os.write(wfd, filt)   # at most 32 KiB: fits the pipe buffer
            finally:
                os.close(wfd)
            argv.append(f"--guard-filter={rfd}")
            pass_fds.append(rfd)
            if guard is not None:
                argv.append(f"--guard-sink={guard.listener_sink}")
                pass_fds.append(guard.listener_sink)
            launcher = subprocess.Popen(argv, pass_fds=pass_fds, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
            undo.callback(_reap, launcher)
            init_end.close()
            # While the launcher starts: the run dir and the control socket (root
            # only: mode 0600 in a 0700 directory), sent to the launcher with 'm'.
            # No umask games: the umask is the whole process's, and concurrent
            # creates (threads) once left it at 0177 for everyone (files of other
            # threads made 0600). The 0700 directory keeps everyone out meanwhile.
            d.mkdir(mode=0o700)   # FileExistsError if a racing create took the name
            undo.callback(shutil.rmtree, d, True)
            ctl = fds.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            ctl.bind(str(d / "ctl"))
            os.chmod(d / "ctl", 0o600)
            ctl.listen(128)
            deadline = time.monotonic() + SETUP_TIMEOUT
            sync = _SyncReader(host_end, name)
            init_pid: int | None = None
            try:
                sync.expect("userns", deadline)
                for which in ("uid_map", "gid_map"):
                    with open(f"/proc/{launcher.pid}/{which}", "w") as f:
                        f.write(f"0 {uid_base} {uid_count}\n")
                host_end.sendmsg([b"m"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            struct.pack("i", ctl.fileno()))])
                # sockd (kernel/native/sockd.h): the sliver's socket maker, outside
                # its PID namespace; killed with the sliver's cgroup, reaped here.
                sockd_pid = int(sync.expect("sockd", deadline))
                undo.callback(_kill_and_reap, sockd_pid)
                # Make the state file now (slow on some filesystems), fill it in
                # (cheap) once the init's pid is known.
                state_fd = os.open(d / "state.json",
                                   os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                fds.callback(os.close, state_fd)
                init_pid = int(sync.expect("pid", deadline))
                undo.callback(_kill_and_reap, init_pid)
                start = _proc_starttime(init_pid)
                if start is None:
                    # It failed a step right after reporting its pid: its "error STEP"
                    # line follows on the sync socket (line() raises with it).
                    sync.line(deadline)
                    raise ContextError(f"create {name}: init {init_pid} died during setup")
                state = {
                    "name": name, "init_pid": init_pid, "init_start": start,
                    "uid_base": uid_base, "uid_count": uid_count, "root": str(root),
                    "hostname": hostname, "limits": limits.to_json(),
                    "guard": guard is not None, "created": time.time(),
                    "cgroup_parent": cgroup_parent,
                    "sockd_pid": sockd_pid, "sockd_start": _proc_starttime(sockd_pid),
                }
                os.write(state_fd, json.dumps(state, sort_keys=True).encode())
                launcher.wait()       # it exited after forking the init
                sync.expect("ready", deadline)
            except OSError as exc:
                if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                    raise ContextError(f"create {name}: init exited during setup") from None
                raise
            undo.pop_all()
        return cls(run_dir, name, state, layout)

    @staticmethod
    def read_state(run_dir: Path, name: str) -> dict[str, Any] | None:
        """The context's recorded state; None if there is none, or none yet: create()
        makes state.json empty early and fills it once the init's pid is known (an
        empty file stays if the creator died in between)."""
        try:
            text = (Path(run_dir) / name / "state.json").read_text()
        except FileNotFoundError:
            return None
        return json.loads(text) if text else None

    @classmethod
    def adopt(cls, run_dir: Path, name: str) -> Context:
        """The running context `name` (after the caller restarted).

        ProcessLookupError if its init is gone (clean up with `destroy_stale`)."""
        _check_name(name)
        state = cls.read_state(run_dir, name)
        if state is None:
            raise FileNotFoundError(errno.ENOENT, f"no context {name}", str(Path(run_dir) / name))
        ctx = cls(run_dir, name, state)
        if not ctx.alive():
            raise ProcessLookupError(f"context {name}: its init {state['init_pid']} is gone")
        return ctx

    @classmethod
    def list(cls, run_dir: Path) -> list[str]:
        """Names of the contexts recorded under run_dir (running, frozen or stale)."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            return []
        return sorted(p.name for p in run_dir.iterdir()
                      if NAME_RE.match(p.name) and (p / "state.json").exists())

    @classmethod
    def destroy_stale(cls, run_dir: Path, name: str, cgroup_parent: str = PARENT) -> None:
        """Remove what a context whose init is gone left: cgroups, its directory.
        (A running one is destroyed too.) `cgroup_parent` is used only when its
        state file is gone too."""
        _check_name(name)
        state = cls.read_state(run_dir, name)
        if state is not None:
            ctx = cls(run_dir, name, state)
            ctx.destroy()
            return
        SliverCgroup(detect_layout(), name, cgroup_parent).destroy()
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)
        _release_uids(run_dir, name)

    # -- state --
    def alive(self) -> bool:
        return _proc_starttime(self.init_pid) == self.state["init_start"]

    def frozen(self) -> bool:
        return self.cgroup.frozen()

    def start(self) -> None:
        """Thaw the context if it is frozen."""
        self._require_alive("start")
        self.cgroup.thaw()

    def stop(self) -> None:
        """Freeze every process of the context (the init too)."""
        self._require_alive("stop")
        self.cgroup.freeze()

    def update_limits(self, limits: Limits) -> None:
        """Change the cgroup limits in place. rlimits and capabilities are fixed at
        creation; asking to change them is an error naming them."""
        limits.validate()
        if dict(limits.rlimits) != dict(self.limits.rlimits) or \
                limits.capabilities != self.limits.capabilities:
            raise ValueError(f"update {self.name}: rlimits and capabilities apply from "
                             "creation only; recreate the sliver to change them")
        if limits.net_cls_classid and "net_cls" not in self.cgroup.layout.v1 \
                and self.cgroup.layout.mode == "v1":
            raise ValueError(f"update {self.name}: net_cls was not mounted at creation")
        self.cgroup.apply(limits, prev=self.limits)
        if limits != self.limits:
            self.limits = limits
            self.state["limits"] = limits.to_json()
            _write_json(self.dir / "state.json", self.state)

    def usage(self) -> dict[str, int]:
        """cpu_usec, mem_bytes, pids of the whole context."""
        return self.cgroup.usage()

    def _thaw_quietly(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.cgroup.thaw()

    def _require_alive(self, op: str) -> None:
        if not self.alive():
            raise ProcessLookupError(f"{op} {self.name}: its init {self.init_pid} is gone")

    # -- running commands --
    def spawn(self, argv: Sequence[str], user: str = "root",
              env: Mapping[str, str] | None = None, tty: bool = False,
              stdin: StdSpec = None, stdout: StdSpec = None, stderr: StdSpec = None,
              cwd: str | None = None, winsize: tuple[int, int] | None = None) -> SliverProcess:
        """Start `argv` inside the context as `user` (a name from its /etc/passwd).

        stdin/stdout/stderr: None inherits the caller's, DEVNULL, PIPE, an fd or a
        file object; none of them may be a terminal (ContextError: the host's
        terminal is never handed into a sliver; relay it through pipes or use tty). With tty=True a pty is made inside (its devpts) and the master
        is `proc.master` on the host side; std* are then ignored. An empty argv runs
        the user's shell. Raises ContextError naming the step if it cannot start.
        """
        self._require_alive("enter")
        if self.frozen():
            raise ContextError(f"enter {self.name}: the context is stopped; start it first")
        payload = bytearray()
        for tag, items in (("u", [user]), ("c", [cwd] if cwd else []), ("a", list(argv)),
                           ("e", [f"{k}={v}" for k, v in (env or {}).items()])):
            for item in items:
                b = item.encode()
                if b"\0" in b:
                    raise ValueError(f"enter {self.name}: NUL byte in {item!r}")
                payload += tag.encode() + b + b"\0"
        if len(payload) > REQ_MAX:
            raise ValueError(f"enter {self.name}: command, environment and user take "
                             f"{len(payload)} bytes, more than the init takes ({REQ_MAX})")
        rows, cols = winsize or (0, 0)
        hdr = REQ_HDR.pack(REQ_MAGIC, REQ_TTY if tty else 0, len(payload), rows, cols)

        proc = SliverProcess(self.name)
        close_after: list[int] = []
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            proc._sock = sock
            # The init answers within its own exec deadline (10 s); a frozen or wedged
            # one must not hold the caller (an agent thread) for ever.
            sock.settimeout(START_TIMEOUT)
            try:
                sock.connect(str(self.ctl_path))
            except OSError as exc:
                raise ContextError(f"enter {self.name}: cannot reach its init at "
                                   f"{self.ctl_path}: {exc.strerror}") from None
            passfds: list[int] = []
            if not tty:
                for i, spec in enumerate((stdin, stdout, stderr)):
                    fd, ours, keep = _std_fd(i, spec)
                    passfds.append(fd)
                    if ours:
                        close_after.append(fd)
                    if os.isatty(fd):
                        # A host terminal inside the sliver stays there: any of its
                        # processes can take it (pidfd_getfd) and read what is typed
                        # in it later (docs/dev/findings-security.md F10).
                        raise ContextError(
                            f"enter {self.name}: {('stdin', 'stdout', 'stderr')[i]} "
                            f"(fd {fd}) is a terminal; a host terminal is never passed "
                            "into a sliver: use tty=True (a pty inside) or pipes")
                    if keep is not None:
                        setattr(proc, ("stdin", "stdout", "stderr")[i], keep)
            sock.sendmsg([hdr], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  struct.pack(f"{len(passfds)}i", *passfds))] if passfds else [])
            sock.sendall(bytes(payload))
            try:
                rtype, value, msg, fds = proc._recv_reply()
            except TimeoutError:
                raise ContextError(f"enter {self.name}: its init did not answer within "
                                   f"{START_TIMEOUT:g} s (is the sliver stopped?)") from None
            sock.settimeout(None)
            if rtype == R_ERROR:
                raise ContextError(f"enter {self.name}: {msg}: {os.strerror(value)}"
                                   + (f" ({argv[0]})" if argv and msg == "exec" else ""))
            if rtype != R_STARTED:
                raise ContextError(f"enter {self.name}: init answered {rtype}")
            proc.pid = value
            if tty:
                if not fds:
                    raise ContextError(f"enter {self.name}: init sent no pty")
                proc.master = fds[0]
            return proc
        except BaseException:
            proc._close_all()
            raise
        finally:
            for fd in close_after:
                os.close(fd)

    def run(self, argv: Sequence[str], user: str = "root",
            env: Mapping[str, str] | None = None, tty: bool = False,
            stdin: StdSpec = None, stdout: StdSpec = None, stderr: StdSpec = None,
            cwd: str | None = None, timeout: float | None = None) -> int:
        """spawn() and wait: the exit code, or -N if killed by signal N."""
        proc = self.spawn(argv, user, env, tty, stdin, stdout, stderr, cwd)
        try:
            return proc.wait(timeout)
        finally:
            proc._close_all()

    def output(self, argv: Sequence[str], user: str = "root", input: bytes | None = None,
               timeout: float | None = 60) -> tuple[int, bytes, bytes]:
        """Run and capture: (exit code, stdout, stderr)."""
        proc = self.spawn(argv, user, stdin=PIPE if input is not None else DEVNULL,
                          stdout=PIPE, stderr=PIPE)
        out, err = proc.communicate(input, timeout)
        return proc.returncode if proc.returncode is not None else -1, out, err

    # -- destruction --
    def destroy(self, timeout: float = 10.0) -> None:
        """Kill every process, then remove the cgroups and the run directory.
        Idempotent; the namespaces and the mounts inside die with the processes."""
        if self.alive():
            # A frozen task dies of SIGKILL only once thawed: thaw after signalling.
            _kill_init(self.init_pid, timeout, then=self._thaw_quietly)
            _reap_init(self.init_pid, self.state["init_start"], timeout)
        elif _proc_starttime_any(self.init_pid) == self.state["init_start"]:
            # It died on its own (crash, OOM) and is a zombie: reap it if it is ours.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.init_pid, os.WNOHANG)
        self.cgroup.destroy(timeout)
        self._reap_sockd()
        shutil.rmtree(self.dir, ignore_errors=True)
        _release_uids(self.run_dir, self.name)


    def _reap_sockd(self) -> None:
        """Reap the sliver's sockd (the cgroup removal killed it) if this process is
        its reaper (the launcher's orphans come to a subreaper); others' do it."""
        pid = self.state.get("sockd_pid")
        if pid and _proc_starttime_any(pid) == self.state.get("sockd_start"):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


class SliverProcess:
    """A command running in a context (Popen-like). `pid` is its pid inside."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid: int = 0
        self.returncode: int | None = None
        self.master: int | None = None
        self.stdin: IO[bytes] | None = None
        self.stdout: IO[bytes] | None = None
        self.stderr: IO[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""

    def fileno(self) -> int:
        """Readable when the command has exited (for trio.lowlevel.wait_readable)."""
        assert self._sock is not None
        return self._sock.fileno()

    def _recv_reply(self, block: bool = True) -> tuple[int, int, str, list[int]]:
        assert self._sock is not None
        fds: list[int] = []
        while len(self._buf) < REPLY.size:
            # (socket.recv_fds ignores its flags argument: use recvmsg.)
            data, anc, _, _ = self._sock.recvmsg(
                REPLY.size - len(self._buf), socket.CMSG_SPACE(4),
                socket.MSG_CMSG_CLOEXEC | (0 if block else socket.MSG_DONTWAIT))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    n = len(payload) // 4
                    fds += list(struct.unpack(f"{n}i", payload[:4 * n]))
            if not data:
                raise EOFError
            self._buf += data
        rtype, value, msg = REPLY.unpack(self._buf[:REPLY.size])
        self._buf = self._buf[REPLY.size:]
        return rtype, value, msg.rstrip(b"\0").decode(errors="replace"), fds

    def _finish(self, block: bool, timeout: float | None = None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        assert self._sock is not None
        if timeout is not None:
            self._sock.settimeout(timeout)
        try:
            rtype, status, _, fds = self._recv_reply(block)
        except (BlockingIOError, TimeoutError):
            if timeout is not None:
                raise subprocess.TimeoutExpired(f"{self.name} pid {self.pid}", timeout) from None
            return None
        except (EOFError, ConnectionResetError):
            # The init went away (the context was destroyed): everything was killed.
            self.returncode = -signal.SIGKILL
            return self.returncode
        finally:
            self._sock.settimeout(None)
        for fd in fds:
            os.close(fd)
        if rtype != R_EXITED:
            raise ContextError(f"{self.name}: unexpected reply {rtype} from init")
        self.returncode = os.waitstatus_to_exitcode(status)
        self._sock.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._finish(block=False)

    def wait(self, timeout: float | None = None) -> int:
        rc = self._finish(block=True, timeout=timeout)
        assert rc is not None
        return rc

    def send_signal(self, sig: int) -> None:
        """Deliver `sig` to the command; nothing if it has exited (as Popen does)."""
        if self.returncode is None and self._sock is not None:
            try:
                self._sock.sendall(struct.pack("<i", int(sig)))
            except (BrokenPipeError, ConnectionResetError):
                self.poll()          # it ended and the init closed the stream

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input: bytes | None = None,
                    timeout: float | None = None) -> tuple[bytes, bytes]:
        """Feed input, read stdout/stderr pipes to EOF, wait. (b"" for non-pipes.)"""
        deadline = None if timeout is None else time.monotonic() + timeout
        out: dict[int, bytearray] = {}
        sel = selectors.DefaultSelector()
        pending = memoryview(input or b"")
        if self.stdin is not None:
            if pending:
                os.set_blocking(self.stdin.fileno(), False)
                sel.register(self.stdin.fileno(), selectors.EVENT_WRITE)
            else:
                self.stdin.close()
                self.stdin = None
        for f in (self.stdout, self.stderr):
            if f is not None:
                out[f.fileno()] = bytearray()
                sel.register(f.fileno(), selectors.EVENT_READ)
        try:
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(f"{self.name} pid {self.pid}", timeout or 0)
                for key, _ in sel.select(left):
                    if key.events & selectors.EVENT_WRITE:
                        try:
                            n = os.write(key.fd, pending[:65536])
                        except BrokenPipeError:
                            n = len(pending)
                        pending = pending[n:]
                        if not pending:
                            sel.unregister(key.fd)
                            assert self.stdin is not None
                            self.stdin.close()
                            self.stdin = None
                    else:
                        chunk = os.read(key.fd, 65536)
                        if chunk:
                            out[key.fd] += chunk
                        else:
                            sel.unregister(key.fd)
        finally:
            sel.close()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.wait(left)
        res = [bytes(out.get(f.fileno(), b"")) if f is not None else b""
               for f in (self.stdout, self.stderr)]
        self._close_all()
        return res[0], res[1]

    def _close_all(self) -> None:
        for attr in ("stdin", "stdout", "stderr"):
            f = getattr(self, attr)
            if f is not None:
                f.close()
                setattr(self, attr, None)
        if self.master is not None:
            os.close(self.master)
            self.master = None
        if self._sock is not None and self.returncode is not None:
            self._sock.close()

    def close(self) -> None:
        """Release the host side; the command runs on if it has not exited."""
        self._close_all()
        if self._sock is not None:
            self._sock.close()


def _std_fd(i: int, spec: StdSpec) -> tuple[int, bool, IO[bytes] | None]:
    """(fd to send, whether the fd is ours to close once sent, the parent's end)."""
    if spec is None:
        return i, False, None
    if spec == DEVNULL:
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC), True, None
    if spec == PIPE:
        r, w = os.pipe2(os.O_CLOEXEC)
        if i == 0:
            return r, True, open(w, "wb", buffering=0)
        return w, True, open(r, "rb", buffering=0)
    if isinstance(spec, int):
        return spec, False, None
    return spec.fileno(), False, None


def _reap(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


def become_subreaper() -> None:
    """Make the calling process the reaper of the inits it creates.

    A sliver init is orphaned when its launcher exits. Without this it goes to the
    host's PID 1, which may reap late (this VM's PID 1 polls about every 2 s), so a
    destroyed init lingers as a zombie. A long-lived caller (the agent, tests, the
    benchmark) should call this once at startup; destroy() then reaps at once.
    """
    prctl.set_child_subreaper(1)


def _reap_init(pid: int, start: int, timeout: float) -> None:
    """Wait until the SIGKILLed init `pid` is dead: reap it if we are its parent, else
    wait only until it is a zombie (its pidfd is readable), not until its reaper
    collects it. The host's PID 1, which adopts the inits after an agent restart, may
    reap seconds late (this VM's polls about every 2 s). Once the init is a zombie no
    process of the sliver is left (the kernel reaps the rest of its PID namespace
    before the init exits), nor a mount, a cgroup membership or a namespace but the
    user namespace its credentials hold until it is reaped; so destroy goes on."""
    try:
        os.waitpid(pid, 0)
        return
    except ChildProcessError:
        pass
    try:
        pfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if _proc_starttime_any(pid) != start:
            return      # the pid was reused: ours is gone
        poller = select.poll()
        poller.register(pfd, select.POLLIN)
        if not poller.poll(max(0.0, timeout) * 1000):
            raise ContextError(f"init {pid} did not exit within {timeout}s")
    finally:
        os.close(pfd)


def _proc_starttime_any(pid: int) -> int | None:
    """Start time of `pid` whether it runs or is a zombie; None if there is none."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(data.rsplit(")", 1)[1].split()[19])


def _kill_init(pid: int, timeout: float = 10.0, then: Any = None) -> None:
    """SIGKILL a sliver init (so the kernel kills its whole PID namespace) and wait
    until it has exited. Uses a pidfd so a reused pid is never signalled."""
    try:
        pfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        try:
            signal.pidfd_send_signal(pfd, signal.SIGKILL)
        except ProcessLookupError:
            return
        if then is not None:
            then()
        poller = select.poll()
        poller.register(pfd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise ContextError(f"init {pid} did not die within {timeout}s of SIGKILL")
    finally:
        os.close(pfd)


def _kill_and_reap(pid: int) -> None:
    start = _proc_starttime(pid)
    _kill_init(pid)
    if start is not None:
        _reap_init(pid, start, 10.0)
    else:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


# The uid ranges of the contexts under a run dir: one line "BASE COUNT NAME" each in
# <run_dir>/.uid-ranges, read and changed under an flock on it. A create reads one
# small file (not every context's state) and creates no inode for it (creating a
# file costs about 0.7 ms on this VM's ext4).
def _uid_ranges_file(run_dir: Path) -> Path:
    return Path(run_dir) / ".uid-ranges"


@contextlib.contextmanager
def _uid_ranges(run_dir: Path) -> Iterator[list[tuple[int, int, str]]]:
    """The ranges, locked; the list as left by the caller is written back."""
    fd = os.open(_uid_ranges_file(run_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with open(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        ranges = []
        for line in f.read().splitlines():
            try:     # a line torn by a crash is dropped, not fatal to every create
                b, c, n = line.split(" ", 2)
                ranges.append((int(b), int(c), n))
            except ValueError:
                continue
        before = list(ranges)
        yield ranges
        if ranges != before:
            f.seek(0)
            f.write("".join(f"{b} {c} {n}\n" for b, c, n in ranges))
            f.truncate()


def _claim_uids(run_dir: Path, name: str, base: int, count: int) -> None:
    with _uid_ranges(run_dir) as ranges:
        for lo, n, other in ranges:
            if other == name:
                if (lo, n) == (base, count):
                    return      # reserved for this create by reserve_uid_range
                raise FileExistsError(errno.EEXIST, f"create {name}: the name is taken",
                                      str(Path(run_dir) / name))
            if base < lo + n and lo < base + count:
                raise ValueError(f"create {name}: uid range {base}..{base + count - 1}"
                                 f" overlaps sliver {other}'s {lo}..{lo + n - 1}")
        ranges.append((base, count, name))


def reserve_uid_range(run_dir: Path, name: str, count: int = UID_COUNT, *,
                      base: int | None = None, lowest: int = 1,
                      highest: int = 2**32 - 1,
                      avoid: Sequence[tuple[int, int]] = ()) -> int:
    """Record a uid range for `name` in the run dir's index, the one every
    Context.create under that run dir checks, and return its base.

    With `base` that range is checked, else the lowest free one in lowest..highest
    is chosen; `avoid` are more (base, count) ranges to keep clear of (e.g. ranges of
    slivers that are not running now). Checking and recording happen under the
    index's lock, so two callers never get the same range. Context.create(run_dir,
    name, root, base, count) then takes the reservation; release_uid_range drops it
    if the create never happens. ValueError names the overlap or the exhausted span;
    FileExistsError if `name` holds a different range."""
    _check_name(name)
    if count < 1 or lowest < 1 or highest > 2**32 - 1 or lowest + count - 1 > highest:
        raise ValueError(f"bad uid span {lowest}..{highest} for {count} uids")
    if base is not None and (base < 1 or base + count > 2**32 - 1):
        raise ValueError(f"bad uid range base {base!r} count {count!r}")
    Path(run_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    with _uid_ranges(run_dir) as ranges:
        taken = [(lo, n, other) for lo, n, other in ranges if other != name]
        if any(other == name for _, _, other in ranges):
            mine = next((lo, n) for lo, n, other in ranges if other == name)
            if base is None or mine != (base, count):
                raise FileExistsError(errno.EEXIST, f"reserve {name}: the name holds uids "
                                      f"{mine[0]}..{mine[0] + mine[1] - 1} already",
                                      str(Path(run_dir) / name))
            return base
        taken += [(lo, n, "(not running)") for lo, n in avoid]
        if base is not None:
            for lo, n, other in taken:
                if base < lo + n and lo < base + count:
                    raise ValueError(f"uid range {base}..{base + count - 1} overlaps "
                                     f"sliver {other}'s {lo}..{lo + n - 1}")
        else:
            cand = lowest
            for lo, n, _ in sorted(taken):
                if cand + count <= lo:
                    break
                cand = max(cand, lo + n)
            if cand + count - 1 > highest:
                raise ValueError(f"no free range of {count} uids left in "
                                 f"{lowest}..{highest}")
            base = cand
        ranges.append((base, count, name))
        return base


def release_uid_range(run_dir: Path, name: str) -> None:
    """Drop `name`'s entry from the run dir's uid index (a reservation never used,
    or the record of a context whose directory is gone)."""
    _check_name(name)
    _release_uids(Path(run_dir), name)


def _release_uids(run_dir: Path, name: str) -> None:
    if not _uid_ranges_file(run_dir).exists():
        return
    with _uid_ranges(run_dir) as ranges:
        ranges[:] = [r for r in ranges if r[2] != name]
