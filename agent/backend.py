"""What the reconciler needs from the node, and its implementation on `kernel/`.

`Backend` is the seam: the reconciler plans and records in the agent's state, then asks
a backend to act. `KernelBackend` does it with real contexts, images and COW roots
(docs/dev/interfaces.md); its methods block, so the reconciler calls them through
`trio.to_thread.run_sync`.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.cpugrants import CpuGrants
from kernel import caps
from kernel import mount as m
from kernel.context import (
    DEVNULL,
    PIPE,
    RLIMITS,
    Context,
    GuardSpec,
    Limits,
    become_subreaper,
)
from kernel.images import ImageStore
from kernel.rootfs import disk_usage_kib, prepare_root, release_root, set_disk_limit

log = logging.getLogger("agent.backend")


# Bytes of a command's output `KernelBackend.run` keeps (its tail), and most bytes it
# still reads once the command has exited (what a daemon it left keeps writing is not).
OUTPUT_TAIL = 64 * 1024
DRAIN_AFTER_EXIT = 1 << 20
_DROPPED_RE = re.compile(r"\[(\d+) bytes of earlier output dropped\]\Z")


def dropped_line(n: int) -> str:
    """The first line of `run`'s text when `n` bytes before the tail were dropped."""
    return f"[{n} bytes of earlier output dropped]"


def split_dropped(text: str) -> tuple[int, str]:
    """(bytes dropped, the rest) of `run`'s text."""
    first, nl, rest = text.partition("\n")
    m = _DROPPED_RE.match(first)
    return (int(m.group(1)), rest) if m and nl else (0, text)


class OutputTail:
    """The last `limit` bytes of a stream, and a count of the bytes before them.

    Memory stays under 2 * limit + one chunk: the buffer is trimmed when it reaches
    twice the limit, so each byte is moved at most once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = 0
        self._buf = bytearray()

    def add(self, chunk: bytes) -> None:
        self._buf += chunk
        if len(self._buf) >= 2 * self.limit:
            self._trim()

    def _trim(self) -> None:
        cut = len(self._buf) - self.limit
        if cut > 0:
            del self._buf[:cut]
            self.dropped += cut

    def data(self) -> bytes:
        self._trim()
        return bytes(self._buf)


def _pump(proc: Any, r: int, tail: OutputTail, timeout: float) -> int | None:
    """Read the pipe `r` into `tail` until `proc` exits (its exit code) or `timeout`
    passes (None; the command is SIGKILLed and reaped)."""
    deadline = time.monotonic() + timeout
    os.set_blocking(r, False)
    sel = selectors.DefaultSelector()
    sel.register(r, selectors.EVENT_READ, "out")
    sel.register(proc.fileno(), selectors.EVENT_READ, "exit")
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                try:
                    proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    pass
                return None
            for key, _ in sel.select(left):
                if key.data == "out":
                    if not _read_some(r, tail, OUTPUT_TAIL * 4):
                        sel.unregister(r)          # EOF: every writer is gone
                else:
                    code = proc.poll()
                    if code is not None:
                        # What it wrote before exiting is in the pipe: read that much.
                        _read_some(r, tail, DRAIN_AFTER_EXIT)
                        return int(code)
    finally:
        sel.close()


def _read_some(fd: int, tail: OutputTail, most: int) -> bool:
    """Read what `fd` has now (at most about `most` bytes) into `tail`; False at EOF."""
    got = 0
    while got < most:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        tail.add(chunk)
        got += len(chunk)
    return True


class MissingImage(LookupError):
    """The sliver's image is not on this node."""


@dataclass(frozen=True)
class SliverPlan:
    """Everything needed to create or update one sliver in the kernel."""

    name: str
    image: str
    uid_base: int
    uid_count: int
    limits: dict[str, Any]      # agent.rspec.limits_kwargs
    disk_max_kib: int | None
    hostname: str
    binds: tuple[tuple[str, str], ...] = ()  # (host path, path inside the sliver)


class Backend(Protocol):
    def image_exists(self, image: str) -> bool: ...
    def live(self) -> set[str]: ...
    def create(self, plan: SliverPlan) -> Any: ...
    def adopt(self, name: str) -> bool: ...
    def guarded_init(self, name: str) -> int | None: ...
    def update(self, plan: SliverPlan) -> socket.socket | None: ...
    def needs_restart(self, plan: SliverPlan) -> bool: ...
    def start(self, name: str) -> None: ...
    def stop(self, name: str) -> None: ...
    def destroy(self, name: str) -> None: ...
    def usage(self, name: str) -> dict[str, Any]: ...
    def run(self, name: str, argv: list[str], user: str = "root",
            timeout: float = 60.0) -> tuple[int, str]: ...
    def root_of(self, name: str) -> Path | None: ...
    def uid_base_of(self, name: str) -> int | None: ...
    def frozen(self, name: str) -> bool: ...
    def enter(self, name: str, argv: list[str], tty: bool, winsize: tuple[int, int],
              env: dict[str, str]) -> Any: ...


def kernel_limits(limits: dict[str, Any]) -> Any:
    """kernel Limits from agent.rspec.limits_kwargs: extra capabilities are added to the
    kernel's safe default set; the CPU cap is clamped to the node's CPUs."""
    extra = tuple(limits.get("extra_capabilities", ()))
    capabilities = None
    if extra:
        capabilities = tuple(sorted(set(caps.DEFAULT_CAPS) | {caps.normalize(c) for c in extra}))
    # cpu_cap (agent.rspec); "cpu_pct" is the cap's older name in the CLI's records.
    cap = limits.get("cpu_cap", limits.get("cpu_pct"))
    if cap is not None:
        cap = max(1, min(int(cap), 100 * (os.cpu_count() or 1)))
    return Limits(
        cpu_share=int(limits["cpu_share"]), cpu_pct=cap, mem_max=limits.get("mem_max"),
        pids_max=limits.get("pids_max"), inet_sockets_max=limits.get("inet_sockets_max"),
        net_class_minor=limits.get("net_class_minor"),
        rlimits={k: tuple(v) for k, v in limits.get("rlimits", {}).items() if k in RLIMITS},
        capabilities=capabilities,
    )


class KernelBackend(CpuGrants):
    """Slivers as kernel contexts on COW roots. Holds open Context objects by name."""

    def __init__(self, state_dir: Path, run_dir: Path, cgroup_parent: str = "planetlab",
                 guard_filter: bytes | None = None,
                 node_headroom: tuple[int, int] | None = None,
                 store_size_kib: int | None = None,
                 cpu_headroom_pct: float = 10.0) -> None:
        """`guard_filter`: the seccomp filter every new context's init installs
        (`agent.guard.GuardService.filter()`), or None: contexts run unguarded.
        `node_headroom`: (tasks, bytes) the node keeps above all slivers together:
        the parent cgroup is capped at pid_max and RAM less these (F41)."""
        # Inits we create are reparented to us, so destroy() reaps them at once instead
        # of waiting for the host's PID 1 (docs/dev/interfaces.md).
        become_subreaper()

        self.images_dir = state_dir / "images"
        self.roots_dir = state_dir / "roots"
        self.run_dir = run_dir / "contexts"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.roots_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store = ImageStore(self.images_dir)
        self._contexts: dict[str, Any] = {}
        self._disk_applied: dict[str, int | None] = {}   # disk_max_kib update() set
        self.guard_filter = guard_filter
        # Where this agent's slivers' cgroups go (config cgroup_parent, F2). Adopted
        # contexts keep the parent recorded in their state file.
        self.cgroup_parent = cgroup_parent
        self.store_size_kib = store_size_kib   # config disk_store_kib (None: default)
        # CPU book (agent/cpugrants.py): every sliver's request and grant.
        self._cpu_init(self.run_dir.parent, cpu_headroom_pct)
        if node_headroom is not None:
            from kernel.cgroups import detect_layout, limit_parent, node_budget

            pids, mem = node_budget(*node_headroom)
            limit_parent(detect_layout(), cgroup_parent, pids, mem)

    def image_exists(self, image: str) -> bool:
        try:
            self.store.get(image, with_users=False)   # not the per-sliver user markers
        except (KeyError, LookupError, FileNotFoundError):
            return False
        return True

    def live(self) -> set[str]:
        """Contexts whose init is alive (running or frozen); stale ones are not live."""
        out = set()
        for name in Context.list(self.run_dir):
            ctx = self._contexts.get(name)
            if ctx is not None:
                if ctx.alive():
                    out.add(name)
                else:
                    del self._contexts[name]
                continue
            try:
                self._contexts[name] = Context.adopt(self.run_dir, name)
            except (ProcessLookupError, FileNotFoundError, ValueError, KeyError):
                continue
            out.add(name)
        for name in set(self._contexts) - out:
            del self._contexts[name]
        return out

    def _context(self, name: str) -> Any:
        ctx = self._contexts.get(name)
        if ctx is None:
            ctx = Context.adopt(self.run_dir, name)
            self._contexts[name] = ctx
        return ctx

    def create(self, plan: SliverPlan) -> socket.socket | None:
        """Make the sliver. With the guard on, returns the agent's end of the socket the
        init sends its seccomp listener over (hand it to GuardService.sliver_created)."""
        if not self.image_exists(plan.image):
            raise MissingImage(plan.image)
        if (self.run_dir / plan.name).exists():
            # A context whose init is gone (node reboot, crash): clear what it left.
            Context.destroy_stale(self.run_dir, plan.name, cgroup_parent=self.cgroup_parent)
        root = prepare_root(self.store, self.roots_dir, plan.name, plan.image, plan.uid_base,
                            plan.uid_count, plan.disk_max_kib,
                            store_size_kib=self.store_size_kib)
        try:
            for host, inside in plan.binds:
                _bind_into(root, Path(host), inside)
            limits = self._cpu_limits(plan, kernel_limits(plan.limits))
            agent_end = self._new_context(plan, root, limits)
        except BaseException:
            release_root(self.roots_dir, plan.name)
            self._cpu_forget(plan.name)
            raise
        self._cpu_settle()
        return agent_end

    def _new_context(self, plan: SliverPlan, root: Path, limits: Any) -> socket.socket | None:
        """A context for `plan` on the prepared `root`; the guard socket's agent end."""
        agent_end = sink = None
        try:
            guard = None
            if self.guard_filter is not None:
                agent_end, sink = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                guard = GuardSpec(self.guard_filter, sink.fileno())
            ctx = Context.create(self.run_dir, plan.name, root, plan.uid_base, plan.uid_count,
                                 limits, hostname=plan.hostname, guard=guard,
                                 cgroup_parent=self.cgroup_parent)
        except BaseException:
            if agent_end is not None:
                agent_end.close()
            raise
        finally:
            if sink is not None:
                sink.close()
        self._contexts[plan.name] = ctx
        return agent_end

    def adopt(self, name: str) -> bool:
        try:
            self._context(name)
        except Exception as exc:  # noqa: BLE001 - any failure means "not adoptable"
            log.info("sliver %s: not adoptable (%s)", name, exc)
            self._contexts.pop(name, None)
            return False
        return True

    def guarded_init(self, name: str) -> int | None:
        """The init pid of a sliver created with the guard (its listener can be taken
        back from it), else None."""
        ctx = self._context(name)
        return int(ctx.init_pid) if ctx.state.get("guard") else None

    def update(self, plan: SliverPlan) -> socket.socket | None:
        """`plan`'s limits in place, only what moved (None); changed rlimits or caps
        restart the sliver on its root (stopped stays so): the new guard end, as create."""
        ctx = self._context(plan.name)
        if self._disk_applied.get(plan.name, -1) != plan.disk_max_kib:
            set_disk_limit(self.roots_dir, plan.name, plan.disk_max_kib)
            self._disk_applied[plan.name] = plan.disk_max_kib
        limits = self._cpu_limits(plan, kernel_limits(plan.limits))
        if not self.needs_restart(plan):
            ctx.update_limits(limits)
            self._cpu_settle()
            return None
        limits.validate()   # refused before anything is stopped
        log.info("sliver %s: rlimits or capabilities changed; restarting it", plan.name)
        frozen = ctx.frozen()
        root = Path(ctx.root)
        ctx.destroy()
        self._contexts.pop(plan.name, None)
        agent_end = self._new_context(plan, root, limits)
        if frozen:
            self.stop(plan.name)
        self._cpu_settle()
        return agent_end

    def needs_restart(self, plan: SliverPlan) -> bool:
        """Whether `update(plan)` must restart the sliver (rlimits or capabilities)."""
        ctx = self._context(plan.name)
        limits = kernel_limits(plan.limits)
        return not (dict(limits.rlimits) == dict(ctx.limits.rlimits)
                    and limits.capabilities == ctx.limits.capabilities)

    def start(self, name: str) -> None:
        grant = self._cpu_grants.get(name)
        if grant is not None and grant.freeze:   # cpu_freezable without cores: stays frozen
            log.info("sliver %s: not thawed: cpu_freezable=1 and it holds no cores", name)
            self._context(name).stop()
            self._cpu_frozen.add(name)
            self._cpu_save()
            return
        self._context(name).start()

    def stop(self, name: str) -> None:
        self._context(name).stop()
        if name in self._cpu_frozen:   # frozen by an operator now: policy must not thaw it
            self._cpu_frozen.discard(name)
            self._cpu_save()

    def destroy(self, name: str) -> None:
        try:
            self._destroy(name)
        finally:
            self._cpu_forget(name)   # its reservation and cores go back to the node

    def _destroy(self, name: str) -> None:
        ctx = self._contexts.pop(name, None)
        self._disk_applied.pop(name, None)
        if ctx is None and name in self.live():
            ctx = Context.adopt(self.run_dir, name)
        if ctx is not None:
            ctx.destroy()
        elif (self.run_dir / name).exists():
            # Its init is gone (crash, reboot): its cgroups, directory and uid
            # reservation go too.
            Context.destroy_stale(self.run_dir, name, cgroup_parent=self.cgroup_parent)
        for mnt in _mounts_under(self.roots_dir / name, strictly=True):
            try:
                m.umount(mnt, detach=True)
            except OSError as exc:
                log.warning("sliver %s: unmounting %s: %s", name, mnt, exc)
        release_root(self.roots_dir, name)

    def usage(self, name: str) -> dict[str, Any]:
        out = dict(self._context(name).usage())
        try:
            out["disk_kib"] = disk_usage_kib(self.roots_dir, name)
        except OSError:
            pass
        return out

    def run(self, name: str, argv: list[str], user: str = "root",
            timeout: float = 60.0) -> tuple[int, str]:
        """Run `argv` in the sliver: (exit code, the tail of its stdout and stderr).

        The output is read as it comes and only its last OUTPUT_TAIL bytes are kept,
        whatever the command writes (a slice's users choose its initscript, F21); when
        some was dropped, the text starts with a `dropped_line`. Reading stops when the
        command exits (a daemon it left holding the pipe does not keep us), or at
        `timeout`, when the command is killed (code -9)."""
        ctx = self._context(name)
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            proc = ctx.spawn(argv, user=user, stdin=DEVNULL, stdout=w, stderr=w)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        tail = OutputTail(OUTPUT_TAIL)
        try:
            code = _pump(proc, r, tail, timeout)
        finally:
            os.close(r)
            proc.close()
        if code is None:
            log.warning("sliver %s: %s still running after %.0f s: killed", name, argv[0],
                        timeout)
            code = -signal.SIGKILL
        text = tail.data().decode("utf-8", "replace")
        if tail.dropped:
            text = dropped_line(tail.dropped) + "\n" + text
        return int(code), text

    def enter(self, name: str, argv: list[str], tty: bool, winsize: tuple[int, int],
              env: dict[str, str]) -> Any:
        """Start a session process in the sliver (as its root): on a new pty inside
        whose master is `proc.master`, or on pipes whose host ends are `proc.stdin`,
        `proc.stdout` and `proc.stderr`. No fd from outside the agent goes in (F37).
        Returns the SliverProcess."""
        ctx = self._context(name)
        if tty:
            return ctx.spawn(argv, user="root", env=env, tty=True,
                             winsize=winsize if all(winsize) else None)
        return ctx.spawn(argv, user="root", env=env, stdin=PIPE, stdout=PIPE, stderr=PIPE)

    def frozen(self, name: str) -> bool:
        try:
            return bool(self._context(name).frozen())
        except (ProcessLookupError, FileNotFoundError, ValueError, KeyError):
            return False

    def uid_base_of(self, name: str) -> int | None:
        """The first host uid of a live context's range (None if it is not live)."""
        try:
            return int(self._context(name).uid_base)
        except (ProcessLookupError, FileNotFoundError, ValueError, KeyError):
            return None

    def root_of(self, name: str) -> Path | None:
        ctx = self._contexts.get(name)
        root = getattr(ctx, "root", None)
        return Path(root) if root else None


def _mounts_under(path: Path, strictly: bool = False) -> list[str]:
    """Mount points at (unless strictly) or below `path`, deepest first."""
    prefix = str(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if (mnt == prefix and not strictly) or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def _bind_into(root: Path, host: Path, inside: str) -> None:
    """Bind-mount a host directory into the sliver root, without following links the
    sliver controls: the target is created with O_NOFOLLOW semantics component by
    component (a sliver could have planted a symlink in its COW layer)."""
    rel = inside.strip("/").split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in rel:
            if part in ("", ".", ".."):
                raise ValueError(f"bad path inside the sliver: {inside!r}")
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        # mount(2) on /proc/self/fd/N: the directory we opened safely, not a path the
        # sliver could change under us.
        m.mount(str(host), f"/proc/self/fd/{fd}", None, m.MS_BIND)
    finally:
        os.close(fd)
