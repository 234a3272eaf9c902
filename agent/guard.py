"""The guard supervisor: answers the seccomp user notifications of every sliver.

Each sliver's init installs `kernel.seccomp.guard_filter()` before its first child
and hands the listener fd to the agent. `serve_guard` runs one task per listener in
the agent's trio loop. Only bind(2) is notified; for it the guard

1. takes a copy of the caller's socket (pidfd_getfd) and reads the sockaddr from the
   caller's memory (process_vm_readv) into the agent's own buffer;
2. checks the caller is still waiting (SECCOMP_IOCTL_NOTIF_ID_VALID);
3. decides: IP sockets by the port table (`agent.ports`), others by family;
4. performs the bind itself on its copy with its own buffer, and replies with the
   result. It never answers CONTINUE, so a thread of the caller that rewrites the
   sockaddr (or swaps the fd) after the check cannot change what is bound.

IP binds run as the agent (root), so an owned port below 1024 works for a sliver
whose root is not the node's. Abstract Unix addresses and netlink sockets without
multicast groups are bound by the agent directly (no privilege is involved); every
other bind (Unix socket paths, netlink groups, other families) runs in the helper
`kernel/bin/guard-bindas`, which takes on the caller's namespaces, root, cwd and
credentials first.

Restarts: before handling a notification its id and registers are written to a small
journal file per listener (`<run_dir>/<slice>.inflight`); a new supervisor that picks
the listener up (from the sliver's init, with pidfd_getfd) redoes a journaled request
whose caller still waits. A bind that the dead supervisor had already done is
recognised (the socket is bound to the requested address) and answered 0.

A malformed or hostile request is denied (EPERM if nothing better fits); nothing a
caller sends can stop the loop.

Fast path: the same sequence of syscalls costs more from Python than the decision
does, so once the guard has allowed and performed an IP bind, it hands that exact key
(socket family, type, protocol, sockaddr bytes) to `kernel.guardfast` (a small C
library called in this loop), which answers later binds of the same key itself, doing
the same steps 1-4 with its own copy of the bytes. It holds no policy: every other
request comes back here, and its memo is emptied whenever the port table changes.
"""

from __future__ import annotations

import errno
import logging
import math
import mmap
import os
import select
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import trio

from agent.config import defaults
from agent.faults import FAULT_RATE, APIFault, FdReply
from agent.hostports import HostPorts, state_uid_owner
from agent.ports import (
    BindDecision,
    Key,
    PortConflict,
    PortError,
    PortRange,
    PortTable,
    format_ports_tag,
    parse_ports_tag,
    read_ephemeral_range,
)
from agent.rawsock import RawSendRefused, RawSockets
from agent.tokenbucket import TokenBuckets
from kernel import guardfast, seccomp, sockdiag
from kernel.cgroups import PARENT, SliverCgroup, detect_layout
from kernel.packet import bind_bytes, sock_info
from kernel.pidfd import RemoteReader, pidfd_getfd, pidfd_open

log = logging.getLogger("agent.guard")

PIDFD_THREAD = os.O_EXCL  # pidfd of a thread, not only of a thread-group leader (6.9+)
SOCKADDR_MAX = 128  # sizeof(struct sockaddr_storage); the kernel refuses more with EINVAL
BINDAS = Path(__file__).resolve().parent.parent / "kernel" / "bin" / "guard-bindas"
BINDAS_TIMEOUT = 5.0
JOURNAL_V1 = struct.Struct("<QIi6Q")  # id, pid, nr, args (journals of earlier agents)
JOURNAL_SIZE = seccomp.NOTIF.size  # the journal: the struct seccomp_notif as received
DECISIONS = 1024  # cached port table decisions per Guard (cleared when full)
BATCH = 32  # notifications handled per scheduler turn of one listener
PIDFD_CACHE = 1024  # cached caller pidfds, all slices together (LRU; F22)
REFUSAL_LOG_RATE, REFUSAL_LOG_BURST = 5.0, 20  # refusal log lines per slice
# The agent CPU a slice's refused and slow-path (Python, guard-bindas) notifications
# may use (F36): a share of one CPU, with a burst; beyond it the slice's listener is
# not read until its budget refills, so its callers wait in the kernel (costing the
# agent nothing) and other slices' turns come. Binds the C fast path allows are not
# charged: they cost the agent about what they cost the slice.
SLICE_CPU_SHARE, SLICE_CPU_BURST = 0.05, 0.02
BINDAS_CHARGE = 0.002  # agent CPU charged per guard-bindas run (spawn and wait)
REVOKE_BUDGET = 5.0  # seconds one revocation may spend looking for holders (F32)
ABSTRACT_PREFIX = "pl/{slice}/"  # abstract Unix names a sliver may bind: "\0pl/<slice>/..." (F35)

AF_INET, AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
SOCK_STREAM, SOCK_DGRAM = int(socket.SOCK_STREAM), int(socket.SOCK_DGRAM)
IPPROTO_MPTCP = 262
IPPROTO_UDPLITE = 136
IPPROTO_ICMPV6 = 58


# -- ports: the table plus persistence ------------------------------------------------------

class PortStore:
    """Where port ownership is recorded (before it is granted). The default keeps
    nothing; `StatePortStore` writes the agent's SQLite state."""

    def load(self) -> list[tuple[str, str, PortRange]]:
        return []

    def save(self, entries: list[tuple[str, str, PortRange]]) -> None:
        pass


class StatePortStore(PortStore):
    """The `ports` table of `agent.state.State` (sources 'plc' = tag, 'runtime' = reserve)."""

    _TO_DB = {"tag": "plc", "reserve": "runtime"}
    _FROM_DB = {v: k for k, v in _TO_DB.items()}

    def __init__(self, state: Any) -> None:
        self.state = state

    def load(self) -> list[tuple[str, str, PortRange]]:
        with self.state.transaction() as db:
            rows = db.execute("SELECT address, proto, port, name, source FROM ports").fetchall()
        return [(name, self._FROM_DB.get(src, "reserve"), PortRange(proto, port, port, addr))
                for addr, proto, port, name, src in rows]

    def save(self, entries: list[tuple[str, str, PortRange]]) -> None:
        with self.state.transaction() as db:
            db.execute("DELETE FROM ports")
            db.executemany(
                "INSERT INTO ports (address, proto, port, name, source) VALUES (?, ?, ?, ?, ?)",
                [(r.address, r.proto, r.lo, s, self._TO_DB[src]) for s, src, r in entries])


class PortService:
    """The port table with persistence: every change is saved before it takes effect.

    `on_lost` callbacks get the set of slices that lost any (protocol, address,
    port) in a change (release, tag change, a tag overriding a reservation, the
    sliver destroyed): the raw socket service closes their sniffers (F13).
    """

    def __init__(self, table: PortTable, store: PortStore | None = None) -> None:
        self.table = table
        self.store = store or PortStore()
        self.on_lost: list[Callable[[set[str]], None]] = []
        # Called with every (proto, address, port) a change took from a slice, and
        # that slice (F20: the guard then closes the old owner's sockets there).
        self.on_revoked: list[Callable[[dict[Key, str]], object]] = []
        self.host: Any = None  # agent.hostports.HostPorts: ports the host holds (F30)
        dropped = self.table.load(self.store.load())
        if dropped:
            log.warning("ports: recorded ownership no longer allowed, dropped: %s",
                        format_ports_tag(dropped))

    def _commit(self, change: Callable[[PortTable], object]) -> None:
        trial = self.table.copy()
        change(trial)                    # raises before anything is recorded or granted
        self.store.save(trial.entries())  # recorded ...
        before, after = self.table.ownership(), trial.ownership()
        self.table = trial               # ... then granted
        revoked = {k: s for k, s in before.items() if after.get(k) != s}
        lost = set(revoked.values())
        for callback in self.on_lost if lost else ():
            try:
                callback(lost)
            except Exception:  # boundary: the table change itself has happened
                log.exception("ports: on_lost callback failed for %s", sorted(lost))
        for revoke in self.on_revoked if revoked else ():
            try:
                revoke(revoked)
            except Exception:  # boundary, as above
                log.exception("ports: on_revoked callback failed for %s", sorted(lost))

    def reserve(self, slice_name: str, spec: str) -> None:
        ranges = parse_ports_tag(spec)
        if self.host is not None:
            self.host.refuse_held(ranges)  # F30: HostPortError, fault 102
        self._commit(lambda t: t.grant(slice_name, ranges, "reserve"))
        log.info("slice %s reserved %s", slice_name, format_ports_tag(ranges))

    def release(self, slice_name: str, spec: str) -> None:
        ranges = parse_ports_tag(spec)
        self._commit(lambda t: t.release(slice_name, ranges))
        log.info("slice %s released %s", slice_name, format_ports_tag(ranges))

    def set_tag_ports(self, slice_name: str, tag_value: str) -> None:
        ranges = parse_ports_tag(tag_value)
        if self.host is not None:  # F30: host-held ports skipped, logged
            ranges = self.host.without_held(slice_name, ranges)
        self._commit(lambda t: t.set_tag_ports(slice_name, ranges))

    def release_slice(self, slice_name: str) -> None:
        self._commit(lambda t: t.release_slice(slice_name))
        log.info("slice %s: all ports released", slice_name)

    def check_bind(self, slice_name: str, proto: str, address: str, port: int) -> BindDecision:
        return self.table.check_bind(slice_name, proto, address, port)


# -- reading a bind request ------------------------------------------------------------------

class Denied(Exception):
    """A request answered with an errno without being performed."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err


def _ip_proto(stype: int, proto: int) -> str | None:
    """The port table's protocol for an IP socket of this type and protocol."""
    if stype == SOCK_STREAM and proto in (0, socket.IPPROTO_TCP, IPPROTO_MPTCP):
        return "tcp"
    if stype == SOCK_DGRAM and proto in (0, socket.IPPROTO_UDP, IPPROTO_UDPLITE):
        return "udp"
    if stype == SOCK_DGRAM and proto in (socket.IPPROTO_ICMP, IPPROTO_ICMPV6):
        return "icmp"
    return None


def parse_ip_sockaddr(family: int, raw: bytes) -> tuple[str, int]:
    """(address text, port) of a sockaddr_in/in6 as the kernel would read it."""
    if family == socket.AF_INET:
        if len(raw) < 16:
            raise Denied(errno.EINVAL, f"sockaddr_in of {len(raw)} bytes")
        fam, port = struct.unpack_from("<H", raw)[0], struct.unpack_from("!H", raw, 2)[0]
        addr = socket.inet_ntop(socket.AF_INET, raw[4:8])
        # inet_bind's "compatibility games": AF_UNSPEC is taken for INADDR_ANY only.
        if fam != socket.AF_INET and not (fam == socket.AF_UNSPEC and addr == "0.0.0.0"):
            raise Denied(errno.EAFNOSUPPORT, f"family {fam} on an AF_INET socket")
        return addr, port
    if len(raw) < 24:  # SIN6_LEN_RFC2133
        raise Denied(errno.EINVAL, f"sockaddr_in6 of {len(raw)} bytes")
    fam, port = struct.unpack_from("<H", raw)[0], struct.unpack_from("!H", raw, 2)[0]
    if fam != socket.AF_INET6:
        raise Denied(errno.EINVAL, f"family {fam} on an AF_INET6 socket")
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def abstract_prefix(slice_name: str) -> bytes:
    """The abstract Unix names (after the leading NUL) slice `slice_name` may bind
    (F35): a sliver shares the node's network namespace, and so its abstract
    names, with the host; a name outside this prefix could squat a host service's
    (X11's "/tmp/.X11-unix/X0", D-Bus's...) and receive its clients."""
    return ABSTRACT_PREFIX.format(slice=slice_name).encode()


def _already_bound(fd: int, info: tuple[int, int, int], address: str, port: int) -> bool:
    """Is socket `fd` bound to `address`:`port` (any port if 0) already?"""
    family = info[0]
    with socket.socket(family, info[1], info[2], fileno=os.dup(fd)) as sock:
        try:
            got = sock.getsockname()
        except OSError:
            return False
    bound_port = got[1]
    return bound_port != 0 and (port == 0 or bound_port == port) and \
        socket.inet_pton(family, got[0]) == socket.inet_pton(family, address)


class Outcome(NamedTuple):
    """The reply for one notification and what happened (for the log and tests)."""

    error: int
    what: str


class _AsCaller(NamedTuple):
    """A bind to run in guard-bindas (awaited outside the synchronous fast path)."""

    pid: int
    fd: int  # a duplicate owned by this object
    raw: bytes
    what: str
    pidfd: int  # the caller's (thread) pidfd, owned by this object (F8)
    cgroups: tuple[str, ...] = ()  # the slice's cgroup directories: the helper joins them


class _IPDecision(NamedTuple):
    """What the port table said about one IP bind request."""

    proto: str
    address: str
    port: int
    decision: BindDecision
    ok: Outcome  # the reply when the bind then succeeds


class CpuBudget:
    """The agent CPU one slice's notifications may use: `share` of a CPU refills it
    up to `burst` seconds; handling is charged after the fact, so a turn may
    overdraw it and the listener then rests until it is positive again (F36)."""

    def __init__(self, share: float = SLICE_CPU_SHARE, burst: float = SLICE_CPU_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.share, self.burst, self.clock = share, burst, clock
        self.left = burst
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.left = min(self.burst, self.left + (now - self.stamp) * self.share)
        self.stamp = now

    def charge(self, seconds: float) -> None:
        self._refill()
        self.left -= seconds

    def rest(self) -> float:
        """Seconds to wait before handling more (0: go on)."""
        self._refill()
        return 0.0 if self.left > 0 else -self.left / self.share + 1e-4


class _ListenerDone(Exception):
    """_run_fast: the listener is finished (no process left, or broken)."""


@dataclass
class GuardStats:
    handled: int = 0
    denied: int = 0
    errors: int = 0
    logs_suppressed: int = 0
    fast: int = 0   # answered by the C fast path (also counted in handled)
    throttled: int = 0  # turns a listener waited for its slice's CPU budget (F36)
    deafened: int = 0   # revoked UDP sockets given a drop-all filter (F20/F32)
    by_errno: dict[int, int] = field(default_factory=dict)


# -- the supervisor --------------------------------------------------------------------------

class Guard:
    """Handles the notifications of the slivers' listeners (see the module docstring)."""

    def __init__(self, ports: PortService, run_dir: Path,
                 uid_range: Callable[[str], tuple[int, int] | None] | None = None,
                 cgroups: Callable[[str], list[Path]] | None = None) -> None:
        """`uid_range(slice)`: the slice's host uids as (first, count), or None if
        unknown; with it, sockets on ports taken from a slice are closed (F20).
        `cgroups(slice)`: the sliver's cgroup directories (`sliver_cgroups`). The
        holders of a revoked UDP socket are looked for among their processes (F32;
        without: every process of the node with a uid of the slice), and the
        guard-bindas helper runs in them, charged to the slice (F36)."""
        self.ports = ports
        self.uid_range = uid_range
        self.cgroups = cgroups
        # Revocations queued by close_revoked (trio thread) for `revoker` (F32).
        self._revoke_send, self._revoke_recv = trio.open_memory_channel[dict[Key, str]](
            math.inf)
        self._revoking = 0   # queued or running
        self._revoked_idle = trio.Event()
        self._revoked_idle.set()
        ports.on_revoked.append(self.close_revoked)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.stats = GuardStats()
        self.listening: dict[str, int] = {}
        self._reader = RemoteReader(SOCKADDR_MAX)
        self._log_budget = TokenBuckets(REFUSAL_LOG_RATE, REFUSAL_LOG_BURST, time.monotonic)
        # pidfds of callers' threads by (slice, tid), least recently used first (a
        # pidfd names one task for its whole life: a cached one is either that task or
        # dead, never a reused tid). One cache for the whole guard, capped at
        # PIDFD_CACHE; each cached pidfd is also in `_exits`, an epoll set in which a
        # pidfd turns readable when its thread exits, and is then closed (F22).
        self._pidfds: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._exits = select.epoll()
        self._exit_keys: dict[int, tuple[str, int]] = {}  # pidfd -> its cache key
        # Port table decisions for IP binds, by (slice, socket info, sockaddr bytes);
        # valid for one table only: PortService replaces its table on every change,
        # so a decision is never used across a change (see _ip_decision).
        self._decisions: dict[tuple[str, tuple[int, int, int], bytes], _IPDecision] = {}
        self._decisions_table: PortTable | None = None
        self._io: dict[int, seccomp.ListenerIO] = {}
        # The C fast path of each listener, and the table its memos were made under.
        self._fast: dict[int, guardfast.FastPath] = {}
        self._fast_table: PortTable | None = None
        self.use_fast_path = guardfast.load() is not None
        if not self.use_fast_path:
            log.warning("guard: no fast path (%s); every bind is handled in Python",
                        guardfast.load_error())

    # The journal: one slot per listener, since a listener's task handles one request
    # at a time. Written with pwrite (no fsync: it must survive the agent, not the node).
    def _journal_path(self, slice_name: str) -> Path:
        if not slice_name or "/" in slice_name or slice_name.startswith("."):
            raise ValueError(f"bad slice name {slice_name!r}")
        return self.run_dir / f"{slice_name}.inflight"

    async def handle(self, slice_name: str, listener: int, n: seccomp.Notification,
                     redo: bool = False) -> Outcome:
        """Decide and perform one notified syscall; never raises for bad input."""
        out = self.handle_now(slice_name, listener, n, redo)
        return out if isinstance(out, Outcome) else await self._finish(out)

    def handle_now(self, slice_name: str, listener: int, n: seccomp.Notification,
                   redo: bool = False) -> Outcome | _AsCaller:
        """The synchronous part of `handle`: the answer, or the bind left to the helper."""
        try:
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

    def _bind(self, slice_name: str, listener: int, n: seccomp.Notification,
              redo: bool) -> Outcome | _AsCaller:
        args = n.args
        fdnum = args[0] & 0xFFFFFFFF
        addrlen = args[2] & 0xFFFFFFFF
        if fdnum >= 2**31:
            raise Denied(errno.EBADF, "negative fd")
        if addrlen > SOCKADDR_MAX:  # also catches a negative int
            raise Denied(errno.EINVAL, f"addrlen {addrlen}")
        fd = self._getfd(slice_name, n.pid, fdnum)
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

    def _getfd(self, slice_name: str, tid: int, fdnum: int) -> int:
        """A copy of fd `fdnum` of thread `tid`, through a cached pidfd when possible."""
        key = (slice_name, tid)
        pidfd = self._pidfds.get(key, -1)
        if pidfd >= 0:
            try:
                fd = pidfd_getfd(pidfd, fdnum)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
                self._drop_pidfd(key)  # that task died (the tid is someone new's)
            else:
                self._pidfds.move_to_end(key)
                return fd
        self.reap_pidfds()  # a new thread: close those of threads gone meanwhile
        try:
            pidfd = pidfd_open(tid, PIDFD_THREAD)
        except OSError as exc:
            raise Denied(errno.ESRCH, f"caller {tid} gone") from exc
        try:
            fd = pidfd_getfd(pidfd, fdnum)
        except OSError:
            os.close(pidfd)
            raise
        while len(self._pidfds) >= PIDFD_CACHE:
            self._drop_pidfd(next(iter(self._pidfds)))
        try:
            self._exits.register(pidfd, select.EPOLLIN)
        except OSError:  # not watchable: do not keep it
            os.close(pidfd)
            return fd
        self._pidfds[key] = pidfd
        self._exit_keys[pidfd] = key
        return fd

    def _drop_pidfd(self, key: tuple[str, int]) -> None:
        """Close the cached pidfd of `key` (closing also removes it from `_exits`)."""
        pidfd = self._pidfds.pop(key, -1)
        if pidfd >= 0:
            del self._exit_keys[pidfd]
            os.close(pidfd)

    def reap_pidfds(self) -> int:
        """Close the cached pidfds whose threads have exited; how many were closed."""
        closed = 0
        while True:
            ready = self._exits.poll(0, 256)
            for pidfd, _ in ready:
                key = self._exit_keys.get(pidfd)
                if key is not None:
                    self._drop_pidfd(key)
                    closed += 1
                elif any(fast.drop_pidfd(pidfd) for fast in self._fast.values()):
                    closed += 1   # the one a fast path kept (closing unregisters it)
                else:   # nobody's (cannot happen): never leave it readable in the set
                    try:
                        self._exits.unregister(pidfd)
                    except (OSError, ValueError):
                        pass
            if len(ready) < 256:
                return closed

    async def watch_exits(self) -> None:
        """Close cached pidfds as soon as their threads exit (runs until cancelled).

        Without this task they are closed at the next new caller; with it, a guard
        whose slivers stop binding holds no pidfd of a thread that is gone."""
        while True:
            await trio.lowlevel.wait_readable(self._exits.fileno())
            self.reap_pidfds()

    def close_revoked(self, revoked: dict[Key, str]) -> None:
        """PortService.on_revoked: queue closing the old owners' sockets on ports taken
        from them (F20) for the `revoker` task. Called in the trio thread; returns at
        once: the work (a sock_diag dump, finding holders among the slice's
        processes) runs in a worker thread (F32)."""
        if self.uid_range is None or not revoked:
            return
        self._revoking += 1
        self._revoked_idle = trio.Event() if self._revoked_idle.is_set() else \
            self._revoked_idle
        self._revoke_send.send_nowait(dict(revoked))

    async def revoker(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                      ) -> None:
        """Carry out queued revocations one at a time, each in a worker thread (started
        by `serve_guard`; runs until cancelled). One at a time: two ReleasePorts in
        flight are done in order, and each re-reads the port table when it starts."""
        task_status.started()
        async for revoked in self._revoke_recv:
            try:
                await trio.to_thread.run_sync(self.revoke_now, revoked,
                                              abandon_on_cancel=True)
            except Exception:  # boundary: one failed revocation must not stop the next
                log.exception("guard: revocation of %s failed", sorted(revoked))
            finally:
                self._revoking -= 1
                if self._revoking == 0:
                    self._revoked_idle.set()

    async def revocations_settled(self) -> None:
        """Return once every queued revocation is done."""
        while self._revoking:
            await self._revoked_idle.wait()

    def revoke_now(self, revoked: dict[Key, str], budget: float = REVOKE_BUDGET) -> int:
        """Close the old owners' TCP and UDP sockets on ports taken from them (F20);
        blocking: runs in a worker thread (`revoker`), never in the agent's loop.

        Keys the slice owns again by now (a ReservePort after the ReleasePort) are
        skipped: the current table decides. For each (slice, proto, port) left, the
        sockets of that local port whose uid is in the slice's uid range and whose
        local address covers a revoked address (a wildcard covers them all) are
        destroyed with sock_diag SOCK_DESTROY: TCP ones are reset (a listener's accept
        fails); UDP ones get ECONNABORTED and then drop all they receive (`_deafen`,
        within `budget` seconds). Either keeps its port until its holders close it
        (the kernel's SOCK_BINDPORT_LOCK). How many were closed.
        """
        if self.uid_range is None:
            return 0
        deadline = time.monotonic() + budget
        table = self.ports.table   # installed tables are never changed in place
        now = table.ownership()
        wanted: dict[tuple[str, str], dict[int, set[str]]] = {}
        for key, owner in revoked.items():
            proto, address, port = key
            if proto in sockdiag.PROTOCOLS and now.get(key) != owner:
                wanted.setdefault((owner, proto), {}).setdefault(port, set()).add(address)
        closed = 0
        for (owner, proto), ports in sorted(wanted.items()):
            uids = self.uid_range(owner)
            if uids is None:
                log.warning("guard: %s lost %s ports %s but its uids are unknown: its "
                            "sockets there stay", owner, proto, sorted(ports))
                continue
            first, count = uids
            aborted: set[int] = set()
            try:  # one dump of the span, whatever the number of ports
                for sock in sockdiag.find(proto, min(ports), max(ports)):
                    addresses = ports.get(sock.port)
                    if addresses and first <= sock.uid < first + count and \
                            addresses.intersection(table.covered(sock.local)) and \
                            sockdiag.destroy(sock):
                        closed += 1
                        if proto == "udp":
                            aborted.add(sock.inode)
            except OSError as exc:
                log.error("guard: closing %s's %s sockets on ports %s failed: %s",
                          owner, proto, sorted(ports), exc)
            if aborted:
                self._deafen(owner, aborted, first, count, deadline)
        if closed:
            log.info("guard: closed %d socket(s) on ports taken from %s", closed,
                     ", ".join(sorted({o for o, _ in wanted})))
        return closed

    def _deafen(self, owner: str, inodes: set[int], first: int, count: int,
                deadline: float) -> None:
        """A destroyed UDP socket keeps its port and would go on receiving after its
        one ECONNABORTED: make it drop everything (a locked filter), through a copy
        of it taken from a process of `owner` that holds it. Holders are looked for
        among the sliver's processes only (its `cgroups`), by socket inode, stopping once
        each inode has one, or at `deadline`."""
        pids = None
        if self.cgroups is not None:
            try:
                dirs = self.cgroups(owner)
                pids = cgroup_pids(dirs) if dirs else None
            except (OSError, ValueError) as exc:
                log.warning("guard: %s: its processes are unknown (%s)", owner, exc)
        found = sockdiag.holders(inodes, first, count, pids, deadline)
        if len(found) < len(inodes):
            log.warning("guard: %s: no holder found in time for %d destroyed UDP "
                        "socket(s); they were aborted but may go on receiving",
                        owner, len(inodes) - len(found))
        for inode, (pid, fdnum) in found.items():
            try:
                pidfd = pidfd_open(pid)
                try:
                    fd = pidfd_getfd(pidfd, fdnum)
                finally:
                    os.close(pidfd)
                try:
                    if os.fstat(fd).st_ino == inode:  # not a reused pid or fd number
                        sockdiag.deafen(fd)
                        self.stats.deafened += 1
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("guard: %s: could not silence UDP socket %d of pid %d: %s",
                            owner, inode, pid, exc)

    def _forget_pidfds(self, slice_name: str) -> None:
        for key in [k for k in self._pidfds if k[0] == slice_name]:
            self._drop_pidfd(key)

    def _bind_socket(self, slice_name: str, listener: int, n: seccomp.Notification, fd: int,
                     info: tuple[int, int, int], raw: bytes, redo: bool) -> Outcome | _AsCaller:
        family = info[0]
        if family == AF_INET or family == AF_INET6:
            d = self._ip_decision(slice_name, info, raw)
            decision = d.decision
            fast = self._fast.get(listener)
            if fast is not None and self._fast_table is not self.ports.table:
                fast = None   # its memo is of an older table (emptied at its next run)
            if not decision.allowed:
                if fast is not None:   # answer this exact key in C from now on (F36)
                    fast.deny(family, info[1], info[2], raw, decision.errno)
                    if self._refused_for_any_socket(slice_name, d, decision.errno):
                        fast.deny(0, 0, 0, raw, decision.errno)
                self._refusal(slice_name, "guard: slice %s pid %d bind %s %s port %d refused "
                              "(%s): %s", slice_name, n.pid, d.proto, d.address, d.port,
                              errno.errorcode.get(decision.errno, decision.errno),
                              decision.reason)
                raise Denied(decision.errno, decision.reason)
            err = bind_bytes(fd, raw)
            if err == errno.EINVAL and redo and _already_bound(fd, info, d.address, d.port):
                err = 0  # the previous supervisor did it before it died
            if err == 0 and fast is not None:
                fast.allow(family, info[1], info[2], raw)   # decided under this table
            return d.ok if err == 0 else Outcome(err, d.proto)
        if family == socket.AF_UNIX:
            path = raw[2:]
            if len(raw) <= 2:  # autobind (or too short: the kernel's EINVAL)
                return Outcome(bind_bytes(fd, raw), "unix autobind")
            if path[:1] == b"\0":  # abstract: no privilege, but only the slice's names
                prefix = abstract_prefix(slice_name)
                if not path[1:].startswith(prefix):
                    self._refusal(slice_name, "guard: slice %s pid %d bind of abstract "
                                  "unix name %r refused: not under %r", slice_name, n.pid,
                                  path[1:], prefix)
                    raise Denied(errno.EPERM, f"abstract name outside {prefix!r}")
                return Outcome(bind_bytes(fd, raw), f"unix abstract {path[1:]!r}")
        if family == socket.AF_NETLINK and len(raw) >= 12:
            nl_pid, groups = struct.unpack_from("<II", raw, 4)
            if groups == 0:
                return Outcome(self._bind_netlink(n.pid, fd, raw, nl_pid), "netlink")
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

    def _refused_for_any_socket(self, slice_name: str, d: _IPDecision, err: int) -> bool:
        """Would the slice be refused these sockaddr bytes, with `err`, whatever its
        socket (TCP, UDP or ICMP)? Then the fast path may refuse them without looking
        at the socket (a refusal lets nothing through; only the errno of a nonsense
        call, a non-IP socket with IP bytes, differs from the kernel's)."""
        return all(self.ports.check_bind(slice_name, proto, d.address, d.port).errno == err
                   for proto in ("tcp", "udp", "icmp"))

    def _ip_decision(self, slice_name: str, info: tuple[int, int, int],
                     raw: bytes) -> _IPDecision:
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
            family, stype, sproto = info
            proto = _ip_proto(stype, sproto)
            address, port = parse_ip_sockaddr(family, raw)
            if proto is None:
                raise Denied(errno.EACCES, f"bind of socket type {stype} proto {sproto}")
            decision = self.ports.check_bind(slice_name, proto, address, port)
            d = _IPDecision(proto, address, port, decision, Outcome(0, proto))
            if len(cache) >= DECISIONS:
                cache.clear()
            cache[key] = d
        return d

    def _bind_netlink(self, pid: int, fd: int, raw: bytes, nl_pid: int) -> int:
        """A netlink bind without groups, as the kernel would do it for the caller.

        The kernel's autobind (nl_pid 0) takes the caller's tgid as the port id
        (netlink_autobind); done by the agent it would take the agent's, so try the
        caller's own tgid (in its pid namespace) first.
        """
        if nl_pid == 0:
            tgid = _ns_tgid(pid)
            if tgid:
                err = bind_bytes(fd, raw[:4] + struct.pack("<I", tgid) + raw[8:])
                if err != errno.EADDRINUSE:
                    return err
        return bind_bytes(fd, raw)

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
        if out.error:
            self.stats.denied += 1
            self.stats.by_errno[out.error] = self.stats.by_errno.get(out.error, 0) + 1
            log.debug("guard: %s pid %d %s -> %s", slice_name, n.pid, out.what,
                      errno.errorcode.get(out.error, out.error))
        try:
            io = self._io.get(listener)
            if io is not None:
                io.send(n.id, out.error)
            else:
                seccomp.notif_send(listener, n.id, 0, out.error)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the caller was interrupted or died
                log.error("guard: %s: reply to request %d failed: %s", slice_name, n.id, exc)

    async def _recover(self, slice_name: str, listener: int, journal: int) -> None:
        """Redo a request the previous supervisor received but did not answer."""
        raw = os.pread(journal, JOURNAL_SIZE, 0)
        if len(raw) == JOURNAL_SIZE:
            n = seccomp.Notification.unpack(raw)
        elif len(raw) == JOURNAL_V1.size:  # left by an agent of the previous format
            nid, pid, nr, *args = JOURNAL_V1.unpack(raw)
            n = seccomp.Notification(nid, pid, 0, nr, seccomp.AUDIT_ARCH_X86_64, 0, tuple(args))
        else:
            return
        nid, pid = n.id, n.pid
        if nid == 0 or not seccomp.notif_id_valid(listener, nid):
            return
        log.warning("guard: %s: redoing request %d of pid %d left by the previous agent",
                    slice_name, nid, pid)
        self._reply(slice_name, listener, n, await self.handle(slice_name, listener, n, redo=True))
        os.pwrite(journal, bytes(len(raw)), 0)

    @staticmethod
    def _map_journal(slice_name: str, journal: int) -> mmap.mmap | None:
        """The journal slot as shared memory: written with a memory copy instead of a
        syscall per request. Stores to a shared file mapping are in the page cache at
        once, so a supervisor killed right after one leaves it for the next (like
        pwrite, and like pwrite it need not survive the node). None: use pwrite."""
        try:
            os.ftruncate(journal, JOURNAL_SIZE)
            return mmap.mmap(journal, JOURNAL_SIZE)
        except (OSError, ValueError) as exc:
            log.warning("guard: %s: journal not mappable (%s); using pwrite", slice_name, exc)
            return None

    async def supervise(self, slice_name: str, listener: int, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer `listener` until no process uses the filter any more (or cancelled).

        Takes ownership of `listener` (closed on return). One supervisor per slice at
        a time (they share the journal). Cancellation loses nothing: a request is
        journaled before it is handled; the only await inside a request (the
        guard-bindas helper) leaves it journaled and unanswered, and the next
        supervisor redoes it.
        """
        journal = os.open(self._journal_path(slice_name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                          0o600)
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        self.listening[slice_name] = listener
        io = self._io[listener] = seccomp.ListenerIO(listener)
        slot: mmap.mmap | None = None
        try:
            try:
                seccomp.set_sync_wake_up(listener)
            except OSError as exc:  # older kernels: slower, still correct
                log.warning("guard: %s: SYNC_WAKE_UP unavailable: %s", slice_name, exc)
            await self._recover(slice_name, listener, journal)
            slot = self._map_journal(slice_name, journal)
            fast = self._open_fast(slice_name, listener, io, slot)
            task_status.started()
            budget = CpuBudget()
            refused_fast = 0
            while True:
                await trio.lowlevel.wait_readable(listener)
                rest = budget.rest()
                if rest:   # over its share: its callers wait in the kernel meanwhile
                    self.stats.throttled += 1
                    await trio.sleep(rest)
                # Drain what is pending without a trip through the scheduler (with
                # SYNC_WAKE_UP the caller often has its next request in by the time
                # the reply returns), but yield after a bounded batch.
                left = BATCH   # notifications per turn, whoever answers them
                started = time.thread_time()
                handled0, fast0 = self.stats.handled, self.stats.fast
                while left > 0:
                    try:
                        if fast is not None:
                            n, answered = self._run_fast(slice_name, fast, io, left)
                            left -= answered + 1
                        else:
                            n = self._recv(slice_name, poller, io, slot, journal)
                            left -= 1
                    except _ListenerDone:
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
        finally:
            if self.listening.get(slice_name) == listener:
                del self.listening[slice_name]
                self._forget_pidfds(slice_name)
            if self._io.get(listener) is io:
                del self._io[listener]
            fp = self._fast.pop(listener, None)
            if fp is not None:
                fp.close()   # unpins the journal slot
            if slot is not None:
                slot.close()
            trio.lowlevel.notify_closing(listener)
            os.close(listener)
            os.close(journal)

    @staticmethod
    def _recv(slice_name: str, poller: select.poll, io: seccomp.ListenerIO,
              slot: mmap.mmap | None, journal: int) -> seccomp.Notification | None:
        """The next pending notification, journaled; None if there is none now (or
        its caller went away); raises _ListenerDone when the listener is finished."""
        events = poller.poll(0)
        if not events:
            return None
        flags = events[0][1]
        if not flags & select.POLLIN:
            if flags & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                log.info("guard: %s: no process left under the filter", slice_name)
                raise _ListenerDone
            return None
        try:
            n = io.recv()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):  # caller interrupted
                return None
            log.error("guard: %s: listener broken (%s); no longer supervised", slice_name, exc)
            raise _ListenerDone from exc
        if slot is not None:
            slot[:] = io.raw
        else:
            try:
                os.pwrite(journal, io.raw, 0)
            except OSError as exc:  # the request is still answered; only a restart loses it
                log.warning("guard: %s: journal: %s", slice_name, exc)
        # No need to clear the slot afterwards: an answered id is not valid any more,
        # and ids are never reused.
        return n

    def _open_fast(self, slice_name: str, listener: int, io: seccomp.ListenerIO,
                   slot: mmap.mmap | None) -> guardfast.FastPath | None:
        if not self.use_fast_path or slot is None:   # no slot: journal by pwrite here
            return None
        try:
            fast = self._fast[listener] = guardfast.FastPath(listener, io.raw, slot,
                                                             self._exits.fileno())
        except Exception as exc:  # noqa: BLE001 - the Python path still guards
            log.warning("guard: %s: no fast path: %s", slice_name, exc)
            return None
        return fast

    def _run_fast(self, slice_name: str, fast: guardfast.FastPath, io: seccomp.ListenerIO,
                  budget: int) -> tuple[seccomp.Notification | None, int]:
        """Let the C fast path answer up to `budget` notifications. Returns the one it
        hands back (journaled already) or None (nothing more pending for now, budget
        used up, or a failed reply), and how many it answered; raises _ListenerDone
        when the listener is finished."""
        table = self.ports.table
        if self._fast_table is not table:   # decisions of an older table: all void
            for other in self._fast.values():
                other.forget()
            self._fast_table = table
        status, answered = fast.run(budget)
        self.stats.handled += answered
        self.stats.fast += answered
        if status == guardfast.PYTHON:
            return seccomp.Notification.unpack(io.raw), answered
        if status == guardfast.IDLE or status == guardfast.YIELD:
            return None, answered
        if status == guardfast.SEND_ERR:   # logged; the next turn goes on
            log.error("guard: %s: reply failed: %s", slice_name, os.strerror(fast.errno()))
            return None, answered
        if status == guardfast.GONE:
            log.info("guard: %s: no process left under the filter", slice_name)
        else:
            log.error("guard: %s: listener broken (%s); no longer supervised", slice_name,
                      os.strerror(fast.errno()))
        raise _ListenerDone

    def release_sliver(self, slice_name: str) -> None:
        """The sliver went: free its ports and forget its journal."""
        self.ports.release_slice(slice_name)
        try:
            self._journal_path(slice_name).unlink()
        except FileNotFoundError:
            pass


def _ns_tgid(pid: int) -> int:
    """The caller's tgid as seen in its own pid namespace (last NSpid of its leader)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            tgid = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
        with open(f"/proc/{tgid}/status") as f:
            line = next(line for line in f if line.startswith("NSpid:"))
        return int(line.split()[-1])
    except (OSError, StopIteration, ValueError):
        return 0


def listener_of(init_pid: int) -> int:
    """Take a copy of the seccomp listener the sliver's init keeps (after a restart).

    The init's fd table is searched for the one fd that is a seccomp notify file.
    """
    fds = []
    for name in os.listdir(f"/proc/{init_pid}/fd"):
        try:
            if os.readlink(f"/proc/{init_pid}/fd/{name}") == "anon_inode:seccomp notify":
                fds.append(int(name))
        except OSError:
            continue
    if len(fds) != 1:
        raise LookupError(f"init {init_pid} holds {len(fds)} seccomp listeners, expected 1")
    pidfd = pidfd_open(init_pid)
    try:
        return pidfd_getfd(pidfd, fds[0])
    finally:
        os.close(pidfd)


def recv_listener(sock: socket.socket, timeout: float = 10.0) -> int:
    """The listener fd a sliver init sent over its GuardSpec.listener_sink (SCM_RIGHTS).

    The init sends it before it reports ready, so after Context.create this does not
    wait; `timeout` bounds a broken init.
    """
    sock.settimeout(timeout)
    msg, fds, _, _ = socket.recv_fds(sock, 16, 4)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EPROTO, f"expected one seccomp listener, got {len(fds)} fds ({msg!r})")
    if os.readlink(f"/proc/self/fd/{fds[0]}") != "anon_inode:seccomp notify":
        os.close(fds[0])
        raise OSError(errno.EPROTO, "the fd received is not a seccomp listener")
    return fds[0]


class GuardAPI:
    """Slice API calls of the guard, to mount into the agent's slice API:
    `api.methods.update(GuardAPI(guard, raw).methods())`.

    Each call takes the caller first (an object with `.kind` "sliver" | "admin" |
    "host" and `.name`). A sliver always acts for itself; the node admin names the
    slice as the first argument. Calls that hand over sockets return an
    `agent.rawsock.FdReply`; the transport sends its sockets with the reply by
    SCM_RIGHTS and closes them (docs/guard.md).
    """

    MAX_RESERVED_PORTS = 256  # per slice, by ReservePort (tags are PLC's business)
    # ReleasePort calls per slice (F32): each may start a revocation (a sock_diag
    # dump, a search among the slice's processes), so a sliver may not loop on it.
    RELEASE_RATE, RELEASE_BURST = 1.0, 10

    def __init__(self, guard: Guard, raw: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.guard = guard
        self.raw = raw
        self._releases = TokenBuckets(self.RELEASE_RATE, self.RELEASE_BURST, clock)

    def methods(self) -> dict[str, Callable[..., Any]]:
        return {"ReservePort": self.ReservePort, "ReleasePort": self.ReleasePort,
                "GetPorts": self.GetPorts, "OpenSniffer": self.OpenSniffer,
                "OpenErrorSocket": self.OpenErrorSocket, "RawSend": self.RawSend}

    @staticmethod
    def _fault(code: int, message: str) -> Exception:
        return APIFault(code, message)

    def _who(self, caller: Any, args: tuple[Any, ...], nargs: int) -> tuple[str, tuple[Any, ...]]:
        if caller.kind == "sliver":
            name, rest = caller.name, args
        elif caller.kind == "admin" and args and isinstance(args[0], str):
            name, rest = args[0], args[1:]
        else:
            raise self._fault(108, "only a sliver, or the node admin naming a slice, may call this")
        if len(rest) != nargs:
            raise self._fault(101, f"expected {nargs} argument(s) after the caller, got {len(rest)}")
        return name, rest

    def ReservePort(self, caller: Any, *args: Any) -> int:
        """ReservePort(spec): own ports, e.g. "tcp:8080,udp:5000-5010@10.0.0.1"."""
        name, (spec,) = self._who(caller, args, 1)
        try:
            wanted = parse_ports_tag(str(spec))
            have = sum((r.hi - r.lo + 1) for r in self.guard.ports.table.holdings(name))
            more = sum((r.hi - r.lo + 1) for r in wanted)
            if caller.kind == "sliver" and have + more > self.MAX_RESERVED_PORTS:
                raise PortError(f"at most {self.MAX_RESERVED_PORTS} ports per slice")
            self.guard.ports.reserve(name, str(spec))
        except (PortError, PortConflict) as exc:
            raise self._fault(102, f"ReservePort {spec!r}: {exc}") from None
        return 1

    def ReleasePort(self, caller: Any, *args: Any) -> int:
        """ReleasePort(spec): give ports back (same syntax as ReservePort)."""
        name, (spec,) = self._who(caller, args, 1)
        if caller.kind == "sliver" and not self._releases.take(name):
            raise self._fault(FAULT_RATE, f"ReleasePort: rate limit: at most "
                              f"{self.RELEASE_RATE:g} a second (burst {self.RELEASE_BURST}) "
                              f"for slice {name}; retry later")
        try:
            self.guard.ports.release(name, str(spec))
        except PortError as exc:
            raise self._fault(102, f"ReleasePort {spec!r}: {exc}") from None
        return 1

    def GetPorts(self, caller: Any, *args: Any) -> str:
        """GetPorts(): what the slice owns, in the ports tag syntax."""
        name, _ = self._who(caller, args, 0)
        return format_ports_tag(self.guard.ports.table.holdings(name))

    def _open(self, caller: Any, args: tuple[Any, ...], kind: str) -> Any:
        name, _ = self._who(caller, args, 0)
        try:
            sock = self.raw.open_sniffer(name) if kind == "sniffer" else \
                self.raw.open_error_socket(name)
        except RawSendRefused as exc:
            raise self._fault(102, f"{kind}: {exc}") from None
        log.info("guard: %s socket for slice %s", kind, name)
        return FdReply(1, [sock])

    def OpenSniffer(self, caller: Any, *args: Any) -> Any:
        """OpenSniffer(): a packet socket showing only the slice's own traffic."""
        return self._open(caller, args, "sniffer")

    def OpenErrorSocket(self, caller: Any, *args: Any) -> Any:
        """OpenErrorSocket(): a packet socket showing ICMP errors about the slice's traffic."""
        return self._open(caller, args, "errors")

    def RawSend(self, caller: Any, *args: Any) -> int:
        """RawSend(packet): send one whole IP packet (base64) from an owned port."""
        name, (packet,) = self._who(caller, args, 1)
        data = getattr(packet, "data", packet)
        if not isinstance(data, bytes):
            raise self._fault(102, "RawSend: the packet must be XML-RPC base64")
        try:
            return int(self.raw.raw_send(name, data))
        except RawSendRefused as exc:
            log.warning("guard: raw send by %s refused: %s", name, exc)
            raise self._fault(102, f"RawSend: {exc}") from None


async def serve_guard(guard: Guard, listeners: trio.MemoryReceiveChannel[tuple[str, int]], *,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The agent's guard service: supervise every (slice, listener fd) received.

    Runs until cancelled (or the channel closes and every listener is done).
    """
    async with trio.open_nursery() as outer:
        outer.start_soon(guard.watch_exits, name="guard:pidfd-exits")
        await outer.start(guard.revoker, name="guard:revoker")
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for slice_name, fd in listeners:
                nursery.start_soon(_supervise_logged, guard, slice_name, fd,
                                   name=f"guard:{slice_name}")
        outer.cancel_scope.cancel()


async def _supervise_logged(guard: Guard, slice_name: str, fd: int) -> None:
    """One listener's task: a failure ends that supervision only, never the service."""
    try:
        await guard.supervise(slice_name, fd)
    except Exception:
        log.exception("guard: %s: supervisor failed; the sliver's guarded calls now wait "
                      "until it is adopted again", slice_name)


def sliver_cgroups(parent: str | None = None) -> Callable[[str], list[Path]]:
    """`cgroups` for Guard: a sliver's cgroup directories (one per hierarchy, those
    that exist) under the node-wide `parent` (None: kernel.cgroups' default)."""
    layout = detect_layout()

    def cgroups(name: str) -> list[Path]:
        return [d for d in SliverCgroup(layout, name, parent or PARENT).dirs() if d.is_dir()]
    return cgroups


def cgroup_pids(dirs: Iterable[Path]) -> list[int]:
    """Host pids of every process in these cgroups and their subgroups."""
    pids: set[int] = set()
    for top in dirs:
        for d, _, _ in os.walk(top):
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids.update(int(x) for x in f.read().split())
            except (OSError, ValueError):
                continue
    return sorted(pids)


def state_uid_range(state: Any, pool_start: int | None = None,
                    range_size: int | None = None) -> Callable[[str], tuple[int, int] | None]:
    """A slice's uids from the agent state's uid range index and the agent's
    uid_pool_start and uid_range_size (the config keys' defaults where not given),
    as agent.accounts computes them."""
    if pool_start is None or range_size is None:
        cfg = defaults()
        pool_start = cfg.uid_pool_start if pool_start is None else pool_start
        range_size = cfg.uid_range_size if range_size is None else range_size
    start, size = pool_start, range_size

    def uid_range(name: str) -> tuple[int, int] | None:
        idx = state.uid_range_of(name)
        if idx is None:
            return None
        return start + idx * size, size
    return uid_range


class GuardService:
    """Everything the agent needs from the guard, in one object (docs/guard.md).

    `serve` is the service task; the other methods are called by the reconciler and
    the slice API, from the trio thread.
    """

    def __init__(self, state: Any, addresses: list[str], run_dir: Path,
                 ephemeral: tuple[int, int] | None = None,
                 reserved_ports: str | None = None,
                 uid_range: Callable[[str], tuple[int, int] | None] | None = None,
                 host_ports: Any = None,
                 cgroup_parent: str | None = None) -> None:
        """`host_ports`: an `agent.hostports.HostPorts` (F30; None: none when `state`
        is None, else one from the state's uid ranges). `reserved_ports`: host ports
        no slice may own, in the ports tag syntax (agent config key `reserved_ports`;
        None: that key's default). `uid_range`: a slice's host uids (first, count), see
        `Guard`; None: from the state's uid_ranges table and the config keys' defaults
        (`state_uid_range`). `cgroup_parent`: where the slivers' cgroups are (config
        key; None: the default), to find a sliver's processes (`cgroup_members`)."""
        if reserved_ports is None:
            reserved_ports = defaults().reserved_ports
        if host_ports is None and state is not None:
            host_ports = HostPorts(state_uid_owner(state, defaults().uid_pool_start,
                                                   defaults().uid_range_size))
        fixed = [r for r, _ in host_ports.fixed] if host_ports is not None else []
        table = PortTable(addresses, ephemeral or read_ephemeral_range(),
                          parse_ports_tag(reserved_ports) + fixed)
        self.ports = PortService(table, StatePortStore(state) if state is not None else None)
        self.ports.host = host_ports
        if uid_range is None and state is not None:
            uid_range = state_uid_range(state)
        self.guard = Guard(self.ports, Path(run_dir) / "guard", uid_range,
                           sliver_cgroups(cgroup_parent))
        self.raw = RawSockets(lambda: self.ports.table, host_ports)
        self.ports.on_lost.append(self.raw.ports_lost)
        self.api = GuardAPI(self.guard, self.raw)
        self._send, self._recv = trio.open_memory_channel[tuple[str, int]](1024)

    @staticmethod
    def filter() -> bytes:
        """The filter bytes for `kernel.context.GuardSpec.filter`."""
        return seccomp.guard_filter()

    def sliver_created(self, name: str, agent_end: socket.socket) -> None:
        """After Context.create(..., guard=GuardSpec(filter(), sink)): take the listener
        from the other end of the sink and start supervising it."""
        self._send.send_nowait((name, recv_listener(agent_end)))

    def sliver_adopted(self, name: str, init_pid: int) -> None:
        """After an agent restart: supervise the listener the sliver's init kept."""
        self._send.send_nowait((name, listener_of(init_pid)))

    def set_tag_ports(self, name: str, tag_value: str) -> None:
        """The slice's `ports` tag (raises PortError/PortConflict, changing nothing)."""
        self.ports.set_tag_ports(name, tag_value)

    def sliver_destroyed(self, name: str) -> None:
        self.guard.release_sliver(name)

    def methods(self) -> dict[str, Callable[..., Any]]:
        return self.api.methods()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.raw.run)
            await nursery.start(serve_guard, self.guard, self._recv)
            task_status.started()


__all__ = [
    "Guard", "GuardAPI", "GuardService", "GuardStats", "recv_listener", "PortService", "PortStore", "StatePortStore", "serve_guard",
    "listener_of", "PortConflict", "PortError",
]
