"""The guard supervisor: answers the seccomp user notifications of every sliver
(the design: `agent.guard`'s docstring and docs/guard.md). Per bind: copy the
caller's socket (pidfd_getfd), read its sockaddr (process_vm_readv), check the
caller still waits (NOTIF_ID_VALID), decide (`decide`), bind the copy with the
agent's own bytes and reply; never CONTINUE. Also: socket() to sockd (`sockd`),
statfs (`statfs`, the one CONTINUE). Parts: `pidfds` (caller pidfd cache),
`journal` (restarts), `fast` (the C fast path), `revoke` (ports taken back).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import trio

from agent.guard.decide import (
    AF_INET,
    AF_INET6,
    SOCKADDR_MAX,
    CpuBudget,
    Denied,
    IPDecision,
    Outcome,
    abstract_allowed,
    abstract_prefix,
    ip_decision,
    netlink_keep_port,
    netlink_unicast_pid,
    refused_for_any_socket,
    unix_abstract_name,
)
from agent.guard.fast import FastPaths, ListenerDone
from agent.guard.journal import Journal, journal_path
from agent.guard.pidfds import PIDFD_THREAD, PidfdCache
from agent.guard.revoke import Revoker
from agent.guard.slicecpu import slice_cpu_reader
from agent.guard.sockd import FORWARDED, SockdLinks
from agent.guard.statfs import CONTINUED, NOTIFIED, DiskOf, StatfsAnswers
from agent.guard.stats import GuardStats
from agent.ports.store import PortService
from agent.ports.table import PortTable
from agent.tokenbucket import TokenBuckets
from kernel import guardfast, seccomp
from kernel.packet import (
    already_bound,
    bind_bytes,
    bind_netlink_random,
    netlink_port,
    sock_info,
)
from kernel.pidfd import RemoteReader, pidfd_open

log = logging.getLogger("agent.guard")

BINDAS = Path(__file__).resolve().parents[2] / "kernel" / "bin" / "guard-bindas"
BINDAS_TIMEOUT = 5.0
DECISIONS = 1024  # cached port table decisions per Guard (cleared when full)
BATCH = 32  # notifications handled per scheduler turn of one listener
REFUSAL_LOG_RATE, REFUSAL_LOG_BURST = 5.0, 20  # refusal log lines per slice
BINDAS_CHARGE = 0.002  # agent CPU charged per guard-bindas run (spawn and wait)


class _AsCaller(NamedTuple):
    """A bind to run in guard-bindas (awaited outside the synchronous fast path)."""

    pid: int
    fd: int  # a duplicate owned by this object
    raw: bytes
    what: str
    pidfd: int  # the caller's (thread) pidfd, owned by this object (F8)
    cgroups: tuple[str, ...] = ()  # the slice's cgroup directories: the helper joins them



# -- the supervisor --------------------------------------------------------------------------

class Guard:
    """Handles the notifications of the slivers' listeners (see the module docstring)."""

    def __init__(self, ports: PortService, run_dir: Path,
                 uid_range: Callable[[str], tuple[int, int] | None] | None = None,
                 cgroups: Callable[[str], list[Path]] | None = None,
                 disk_of: DiskOf | None = None) -> None:
        """`uid_range(slice)`: the slice's host uids as (first, count), or None if
        unknown; with it, sockets on ports taken from a slice are closed (F20).
        `cgroups(slice)`: the sliver's cgroup directories (`sliver_cgroups`). The
        holders of a revoked UDP socket are looked for among their processes (F32;
        without: every process of the node with a uid of the slice), and the
        guard-bindas helper runs in them, charged to the slice (F36). `disk_of`:
        `agent.guard.statfs.sliver_disks` (None: statfs runs as is)."""
        self.ports = ports
        self.statfs = StatfsAnswers(disk_of)
        self.uid_range = uid_range
        self.cgroups = cgroups
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.stats = GuardStats()
        # Closing the sockets of ports taken from a slice (F20, F32): agent.guard.revoke.
        self.revocations = Revoker(ports, self.stats, uid_range, cgroups)
        self.close_revoked = self.revocations.close_revoked
        self.revoker = self.revocations.revoker
        self.revocations_settled = self.revocations.revocations_settled
        self.revoke_now = self.revocations.revoke_now
        self.listening: dict[str, int] = {}
        # Each sliver's sockd request socket (F38): socket() notifications go there.
        self.sockd = SockdLinks()
        self._reader = RemoteReader(SOCKADDR_MAX)
        self._log_budget = TokenBuckets(REFUSAL_LOG_RATE, REFUSAL_LOG_BURST, time.monotonic)
        # pidfds of callers' threads (F22), one cache for the whole guard; its epoll set
        # of exit watches also holds the pidfds the fast paths keep.
        self.fast = FastPaths(self.stats)   # the C fast path of each listener
        self.pidfds = PidfdCache(self.fast.drop_pidfd)
        # Port table decisions for IP binds, by (slice, socket info, sockaddr bytes);
        # valid for one table only: PortService replaces its table on every change,
        # so a decision is never used across a change (see _ip_decision).
        self._decisions: dict[tuple[str, tuple[int, int, int], bytes], IPDecision] = {}
        self._decisions_table: PortTable | None = None
        self._io: dict[int, seccomp.ListenerIO] = {}

    async def handle(self, slice_name: str, listener: int, n: seccomp.Notification,
                     redo: bool = False) -> Outcome:
        """Decide and perform one notified syscall; never raises for bad input."""
        out = self.handle_now(slice_name, listener, n, redo)
        return out if isinstance(out, Outcome) else await self._finish(out)

    def handle_now(self, slice_name: str, listener: int, n: seccomp.Notification,
                   redo: bool = False) -> Outcome | _AsCaller:
        """The synchronous part of `handle`: the answer, or the bind left to the helper."""
        try:
            if n.nr == seccomp.NR_SOCKET:   # made by the sliver's sockd (F38)
                return self.sockd.forward(slice_name, listener, n)
            if n.nr in NOTIFIED:   # the sliver's disk limit (agent.guard.statfs)
                return self.statfs.answer(slice_name, listener, n)
            if n.nr != seccomp.NR_BIND:
                raise Denied(errno.ENOSYS, f"syscall {n.nr} is not guarded by this agent")
            return self._bind(slice_name, listener, n, redo)
        except Denied as d:
            return Outcome(d.errno, str(d))
        except OSError as exc:  # the caller's fd or memory: its errno is the answer
            return Outcome(exc.errno or errno.EPERM, f"{exc.strerror}")
        except Exception as exc:  # boundary: a bug must not open or stop the guard
            log.exception("guard: %s: internal error on syscall %d", slice_name, n.nr)
            self.stats.errors += 1
            return Outcome(errno.EPERM, f"internal error {type(exc).__name__}")

    def _slice_cpu(self, slice_name: str) -> Callable[[], float | None] | None:
        return None if self.cgroups is None else slice_cpu_reader(self.cgroups(slice_name))

    def set_sockd(self, slice_name: str, fd: int) -> None:
        """The sliver's sockd request socket (kernel/native/sockd.h); takes `fd`."""
        self.sockd.set(slice_name, fd)

    def _bind(self, slice_name: str, listener: int, n: seccomp.Notification,
              redo: bool) -> Outcome | _AsCaller:
        args = n.args
        fdnum = args[0] & 0xFFFFFFFF
        addrlen = args[2] & 0xFFFFFFFF
        if fdnum >= 2**31:
            raise Denied(errno.EBADF, "negative fd")
        if addrlen > SOCKADDR_MAX:  # also catches a negative int
            raise Denied(errno.EINVAL, f"addrlen {addrlen}")
        fd = self.pidfds.getfd(slice_name, n.pid, fdnum)
        try:
            raw = self._reader.read(n.pid, args[1], addrlen) if addrlen else b""
            # The pid could have been reused between RECV and now: only trust what was
            # read if the caller is still the one waiting.
            if not seccomp.notif_id_valid(listener, n.id):
                raise Denied(errno.ESRCH, "caller no longer waiting")
            try:
                info = sock_info(fd)
            except OSError as exc:
                raise Denied(exc.errno or errno.ENOTSOCK, "not a socket") from exc
            return self._bind_socket(slice_name, listener, n, fd, info, raw, redo)
        finally:
            os.close(fd)

    async def _finish(self, job: _AsCaller) -> Outcome:
        try:
            return Outcome(await self._bind_as_caller(job.pid, job.fd, job.raw, job.pidfd,
                                                      job.cgroups), job.what)
        finally:
            os.close(job.fd)
            os.close(job.pidfd)

    def reap_pidfds(self) -> int:
        """Close the cached pidfds whose threads have exited; how many were closed."""
        return self.pidfds.reap()

    async def watch_exits(self) -> None:
        """Close cached pidfds as soon as their threads exit (runs until cancelled).

        Without this task they are closed at the next new caller; with it, a guard
        whose slivers stop binding holds no pidfd of a thread that is gone."""
        while True:
            await trio.lowlevel.wait_readable(self.pidfds.exits_fd())
            self.reap_pidfds()

    def _bind_socket(self, slice_name: str, listener: int, n: seccomp.Notification, fd: int,
                     info: tuple[int, int, int], raw: bytes, redo: bool) -> Outcome | _AsCaller:
        family = info[0]
        if family == AF_INET or family == AF_INET6:
            d = self._ip_decision(slice_name, info, raw)
            decision = d.decision
            fast = self.fast.current(listener, self.ports.table)
            if not decision.allowed:
                if fast is not None:   # answer this exact key in C from now on (F36)
                    fast.deny(family, info[1], info[2], raw, decision.errno)
                    if refused_for_any_socket(self.ports.check_bind, slice_name, d,
                                              decision.errno):
                        fast.deny(0, 0, 0, raw, decision.errno)
                self._refusal(slice_name, "guard: slice %s pid %d bind %s %s port %d refused "
                              "(%s): %s", slice_name, n.pid, d.proto, d.address, d.port,
                              errno.errorcode.get(decision.errno, decision.errno),
                              decision.reason)
                raise Denied(decision.errno, decision.reason)
            err = bind_bytes(fd, raw)
            if err == errno.EINVAL and redo and already_bound(fd, info, d.address, d.port):
                err = 0  # the previous supervisor did it before it died
            if err == 0 and fast is not None:
                fast.allow(family, info[1], info[2], raw)   # decided under this table
            return d.ok if err == 0 else Outcome(err, d.proto)
        if family == socket.AF_UNIX:
            if len(raw) <= 2:  # autobind (or too short: the kernel's EINVAL)
                return Outcome(bind_bytes(fd, raw), "unix autobind")
            name = unix_abstract_name(raw)
            if name is not None:  # abstract: no privilege, but only the slice's names
                if not abstract_allowed(slice_name, name):
                    prefix = abstract_prefix(slice_name)
                    self._refusal(slice_name, "guard: slice %s pid %d bind of abstract "
                                  "unix name %r refused: not under %r", slice_name, n.pid,
                                  name, prefix)
                    raise Denied(errno.EPERM, f"abstract name outside {prefix!r}")
                return Outcome(bind_bytes(fd, raw), f"unix abstract {name!r}")
        if family == socket.AF_NETLINK:
            # The port id stays the one the socket has (sockd bound it at birth): a
            # sliver never picks an id in the node's namespace (kernel/native/sockd.h).
            port = netlink_port(fd)
            if port == 0 and len(raw) >= 12:
                # Unbound (a sliver whose sockd predates F43): an id the agent picks
                # at random, as the kernel's autobind would beyond the first; the
                # autobind here would hand the sliver the agent's own pid.
                err = bind_netlink_random(fd)
                port = netlink_port(fd)   # (EINVAL: a racing bind was first; its id)
                if port == 0:
                    raise Denied(err or errno.EADDRINUSE, "netlink: no free port id")
            raw = netlink_keep_port(raw, port)
            if netlink_unicast_pid(raw) is not None:
                return Outcome(bind_bytes(fd, raw), "netlink")
        # The helper reads the caller through /proc/PID; this pidfd, taken while the
        # caller is still the one waiting, lets it check that PID was not reused (F8).
        try:
            pidfd = pidfd_open(n.pid, PIDFD_THREAD)
        except OSError as exc:
            raise Denied(errno.ESRCH, f"caller {n.pid} gone") from exc
        if not seccomp.notif_id_valid(listener, n.id):
            os.close(pidfd)
            raise Denied(errno.ESRCH, "caller no longer waiting")
        cgroups: tuple[str, ...] = ()
        if self.cgroups is not None:
            try:
                cgroups = tuple(str(d) for d in self.cgroups(slice_name))
            except (OSError, ValueError) as exc:
                log.warning("guard: %s: cgroups unknown (%s)", slice_name, exc)
        return _AsCaller(n.pid, os.dup(fd), raw, f"family {family} as caller", pidfd, cgroups)

    def _ip_decision(self, slice_name: str, info: tuple[int, int, int],
                     raw: bytes) -> IPDecision:
        """The port table's decision on binding `raw` on an IP socket of `info`.

        Cached per (slice, socket family/type/protocol, exact sockaddr bytes), and
        only for the table object it came from: PortService never changes a table in
        place but installs a new one, and a new table empties the cache.
        """
        table = self.ports.table
        cache = self._decisions
        if self._decisions_table is not table:
            cache.clear()
            self._decisions_table = table
        key = (slice_name, info, raw)
        d = cache.get(key)
        if d is None:
            d = ip_decision(self.ports.check_bind, slice_name, info, raw)
            if len(cache) >= DECISIONS:
                cache.clear()
            cache[key] = d
        return d

    async def _bind_as_caller(self, pid: int, fd: int, raw: bytes, pidfd: int,
                              cgroups: tuple[str, ...] = ()) -> int:
        """Run guard-bindas: bind with the caller's namespaces, root, cwd and credentials
        (read through /proc/`pid`; `pidfd`, the caller's, proves `pid` still is it).
        It first moves into the slice's `cgroups`, so its work is charged to the slice."""
        try:
            with trio.fail_after(BINDAS_TIMEOUT):
                done = await trio.run_process(
                    [str(BINDAS), str(pid), str(fd), str(pidfd), *cgroups], stdin=raw,
                    pass_fds=(fd, pidfd), check=False)
        except (OSError, trio.TooSlowError) as exc:
            log.warning("guard: guard-bindas for pid %d failed: %s", pid, exc)
            return errno.EPERM
        if done.returncode == 125 or done.returncode < 0:
            log.warning("guard: guard-bindas could not take on pid %d", pid)
            return errno.EPERM
        return done.returncode

    # -- the loop ----------------------------------------------------------------------------

    def _refusal(self, slice_name: str, msg: str, *args: object) -> None:
        """Log a policy refusal, at most REFUSAL_LOG_RATE a second per slice (a
        sliver looping on refused binds must not flood the agent's log)."""
        if self._log_budget.take(slice_name):
            log.warning(msg, *args)
        else:
            self.stats.logs_suppressed += 1

    def _reply(self, slice_name: str, listener: int, n: seccomp.Notification,
               out: Outcome) -> None:
        self.stats.handled += 1
        if out is FORWARDED:   # sockd answers it
            return
        if out.error:
            self.stats.denied += 1
            self.stats.by_errno[out.error] = self.stats.by_errno.get(out.error, 0) + 1
            log.debug("guard: %s pid %d %s -> %s", slice_name, n.pid, out.what,
                      errno.errorcode.get(out.error, out.error))
        try:
            io = self._io.get(listener)
            if out is CONTINUED:
                seccomp.notif_continue(listener, n.id)
            elif io is not None:
                io.send(n.id, out.error)
            else:
                seccomp.notif_send(listener, n.id, 0, out.error)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the caller was interrupted or died
                log.error("guard: %s: reply to request %d failed: %s", slice_name, n.id, exc)

    async def _recover(self, slice_name: str, listener: int, journal: Journal) -> None:
        """Redo a request the previous supervisor received but did not answer."""
        got = journal.pending()
        if got is None:
            return
        n, size = got
        nid, pid = n.id, n.pid
        if nid == 0 or not seccomp.notif_id_valid(listener, nid):
            return
        log.warning("guard: %s: redoing request %d of pid %d left by the previous agent",
                    slice_name, nid, pid)
        self._reply(slice_name, listener, n, await self.handle(slice_name, listener, n, redo=True))
        journal.clear(size)

    async def supervise(self, slice_name: str, listener: int, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer `listener` until no process uses the filter any more (or cancelled).

        Takes ownership of `listener` (closed on return). One supervisor per slice at
        a time (they share the journal). Cancellation loses nothing: a request is
        journaled before it is handled; the only await inside a request (the
        guard-bindas helper) leaves it journaled and unanswered, and the next
        supervisor redoes it.
        """
        journal = Journal(self.run_dir, slice_name)
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        self.listening[slice_name] = listener
        io = self._io[listener] = seccomp.ListenerIO(listener)
        try:
            try:
                seccomp.set_sync_wake_up(listener)
            except OSError as exc:  # older kernels: slower, still correct
                log.warning("guard: %s: SYNC_WAKE_UP unavailable: %s", slice_name, exc)
            await self._recover(slice_name, listener, journal)
            fast = self.fast.open(slice_name, listener, io, journal.map(),
                                  self.pidfds.exits_fd())
            task_status.started()
            if slice_name not in self.sockd.chans:
                return await self._serve(slice_name, listener, io, fast, poller, journal)
            try:   # with a sockd: its watcher alongside (agent.guard.sockd)
                async with trio.open_nursery() as watch:
                    watch.start_soon(self.sockd.watch, slice_name, listener)
                    await self._serve(slice_name, listener, io, fast, poller, journal)
                    watch.cancel_scope.cancel()
            except BaseExceptionGroup as group:   # the loop's own, as without one
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
        finally:
            if self.listening.get(slice_name) == listener:
                del self.listening[slice_name]
                self.pidfds.forget(slice_name)
            if self._io.get(listener) is io:
                del self._io[listener]
            self.fast.close(listener)   # unpins the journal slot
            trio.lowlevel.notify_closing(listener)
            os.close(listener)
            journal.close()

    async def _serve(self, slice_name: str, listener: int, io: seccomp.ListenerIO,
                     fast: guardfast.FastPath | None, poller: select.poll,
                     journal: Journal) -> None:
        """`supervise`'s loop: batches within the slice's CPU budget (F36)."""
        budget = CpuBudget(earned=self._slice_cpu(slice_name))
        refused_fast = 0
        while True:
            await trio.lowlevel.wait_readable(listener)
            rest = budget.rest()
            if rest:   # over its share: its callers wait in the kernel meanwhile
                self.stats.throttled += 1
            while rest:
                await trio.sleep(rest)
                rest = budget.rest()
            # Drain what is pending without a trip through the scheduler (with
            # SYNC_WAKE_UP the caller often has its next request in by the time
            # the reply returns), but yield after a bounded batch.
            left = BATCH   # notifications per turn, whoever answers them
            started = time.thread_time()
            handled0, fast0 = self.stats.handled, self.stats.fast
            while left > 0:
                try:
                    if fast is not None:
                        n, answered = self.fast.run(slice_name, fast, io, left,
                                                            self.ports.table)
                        left -= answered + 1
                    else:
                        n = self._recv(slice_name, poller, io, journal)
                        left -= 1
                except ListenerDone:
                    return
                if n is None:
                    break
                out = self.handle_now(slice_name, listener, n)
                if not isinstance(out, Outcome):
                    budget.charge(time.thread_time() - started + BINDAS_CHARGE)
                    out = await self._finish(out)
                    started = time.thread_time()
                self._reply(slice_name, listener, n, out)
            spent = time.thread_time() - started
            if fast is not None:
                refused = fast.refused()
                self.stats.denied += refused - refused_fast
                # Binds the fast path allowed cost the agent about what they
                # cost the slice: only the rest of the turn (refusals, Python)
                # is charged to the budget.
                handled = self.stats.handled - handled0
                if handled > 0:
                    free = self.stats.fast - fast0 - (refused - refused_fast)
                    spent *= (handled - free) / handled
                refused_fast = refused
            budget.charge(spent)
            await trio.lowlevel.checkpoint()

    @staticmethod
    def _recv(slice_name: str, poller: select.poll, io: seccomp.ListenerIO,
              journal: Journal) -> seccomp.Notification | None:
        """The next pending notification, journaled; None if there is none now (or
        its caller went away); raises ListenerDone when the listener is finished."""
        events = poller.poll(0)
        if not events:
            return None
        flags = events[0][1]
        if not flags & select.POLLIN:
            if flags & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                log.info("guard: %s: no process left under the filter", slice_name)
                raise ListenerDone
            return None
        try:
            n = io.recv()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):  # caller interrupted
                return None
            log.error("guard: %s: listener broken (%s); no longer supervised", slice_name, exc)
            raise ListenerDone from exc
        journal.record(io.raw)
        # No need to clear the slot afterwards: an answered id is not valid any more,
        # and ids are never reused.
        return n

    def release_sliver(self, slice_name: str) -> None:
        """The sliver went: free its ports and forget its journal."""
        self.ports.release_slice(slice_name)
        self.sockd.release(slice_name)
        self.statfs.forget(slice_name)
        try:
            journal_path(self.run_dir, slice_name).unlink()
        except FileNotFoundError:
            pass
