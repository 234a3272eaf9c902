"""Closing the sockets of ports taken from a slice (F20), off the agent's loop (F32).

`PortService.on_revoked` calls `Revoker.close_revoked` in the trio thread; it queues
the change for the `revoker` task, which runs each revocation in a worker thread:
a sock_diag dump of the ports, SOCK_DESTROY of the old owner's sockets there, and
for UDP ones a locked drop-all filter through a copy taken from a holder among the
sliver's processes, within REVOKE_BUDGET seconds.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from agent.guard.stats import GuardStats
from agent.ports.store import PortService
from agent.ports.table import Key
from kernel import sockdiag
from kernel.pidfd import pidfd_getfd, pidfd_open

log = logging.getLogger("agent.guard")

REVOKE_BUDGET = 5.0  # seconds one revocation may spend looking for holders (F32)


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



class Revoker:
    """The revocations of one guard (`Guard.revocations`)."""

    def __init__(self, ports: PortService, stats: GuardStats,
                 uid_range: Callable[[str], tuple[int, int] | None] | None = None,
                 cgroups: Callable[[str], list[Path]] | None = None) -> None:
        """`uid_range(slice)`: the slice's host uids as (first, count), or None if
        unknown; without it nothing is closed. `cgroups(slice)`: the sliver's cgroup
        directories, in which the holders of a revoked UDP socket are looked for
        (without: every process of the node with a uid of the slice)."""
        self.ports = ports
        self.stats = stats
        self.uid_range = uid_range
        self.cgroups = cgroups
        # Revocations queued by close_revoked (trio thread) for `revoker` (F32).
        self._revoke_send, self._revoke_recv = trio.open_memory_channel[dict[Key, str]](
            math.inf)
        self._revoking = 0   # queued or running
        self._revoked_idle = trio.Event()
        self._revoked_idle.set()
        ports.on_revoked.append(self.close_revoked)

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
            listeners: set[int] = set()   # MPTCP listeners, by socket inode
            try:  # one dump of the span, whatever the number of ports
                found = sockdiag.find(proto, min(ports), max(ports))
            except OSError as exc:
                log.error("guard: finding %s's %s sockets on ports %s failed: %s",
                          owner, proto, sorted(ports), exc)
                continue
            for sock in found:
                addresses = ports.get(sock.port)
                if not (addresses and first <= sock.uid < first + count and
                        addresses.intersection(table.covered(sock.local))):
                    continue
                try:
                    if sockdiag.destroy(sock):
                        closed += 1
                        if proto == "udp":
                            aborted.add(sock.inode)
                except OSError as exc:   # one socket's failure stops no other's
                    if exc.errno == errno.EINVAL and sock.state == sockdiag.TCP_LISTEN:
                        # The listening subflow of an MPTCP socket: the kernel will not
                        # destroy it (tcp_abort_override); shut the MPTCP socket instead.
                        listeners.add(sock.inode)
                    else:
                        log.error("guard: closing %s's %s socket on port %d failed: %s",
                                  owner, proto, sock.port, exc)
            if aborted:
                self._deafen(owner, aborted, first, count, deadline)
            if listeners:
                closed += self._through_holders(owner, listeners, first, count, deadline,
                                                sockdiag.stop_listening, "MPTCP listener")
        if closed:
            log.info("guard: closed %d socket(s) on ports taken from %s", closed,
                     ", ".join(sorted({o for o, _ in wanted})))
        return closed

    def _deafen(self, owner: str, inodes: set[int], first: int, count: int,
                deadline: float) -> None:
        """A destroyed UDP socket keeps its port and would go on receiving after its
        one ECONNABORTED: make it drop everything (a locked filter), through a copy
        of it taken from a process of `owner` that holds it."""
        self.stats.deafened += self._through_holders(owner, inodes, first, count, deadline,
                                                     sockdiag.deafen, "destroyed UDP socket")

    def _through_holders(self, owner: str, inodes: set[int], first: int, count: int,
                         deadline: float, act: Callable[[int], None], what: str) -> int:
        """`act` on a copy of each socket of `inodes`, taken from a process of `owner`
        that holds it; how many. Holders are looked for among the sliver's processes
        only (its `cgroups`), by socket inode, stopping once each inode has one, or at
        `deadline`."""
        pids = None
        if self.cgroups is not None:
            try:
                dirs = self.cgroups(owner)
                pids = cgroup_pids(dirs) if dirs else None
            except (OSError, ValueError) as exc:
                log.warning("guard: %s: its processes are unknown (%s)", owner, exc)
        found = sockdiag.holders(inodes, first, count, pids, deadline)
        if len(found) < len(inodes):
            log.warning("guard: %s: no holder found in time for %d %s(s); they keep "
                        "working", owner, len(inodes) - len(found), what)
        done = 0
        for inode, (pid, fdnum) in found.items():
            try:
                pidfd = pidfd_open(pid)
                try:
                    fd = pidfd_getfd(pidfd, fdnum)
                finally:
                    os.close(pidfd)
                try:
                    if os.fstat(fd).st_ino == inode:  # not a reused pid or fd number
                        act(fd)
                        done += 1
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("guard: %s: could not silence %s %d of pid %d: %s",
                            owner, what, inode, pid, exc)
        return done
