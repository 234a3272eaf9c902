"""The guard's C fast path glue: one `kernel.guardfast.FastPath` per listener, and the
port table its memos were made under (a memo is never used across a table change)."""

from __future__ import annotations

import logging
import mmap
import os

from agent.guard.stats import GuardStats
from agent.ports.table import PortTable
from kernel import guardfast, seccomp

log = logging.getLogger("agent.guard")


class ListenerDone(Exception):
    """The listener is finished (no process left, or broken)."""


class FastPaths:
    """The fast paths of a guard's listeners (`Guard.fast`)."""

    def __init__(self, stats: GuardStats) -> None:
        self.stats = stats
        self.by_listener: dict[int, guardfast.FastPath] = {}
        self.table: PortTable | None = None
        self.enabled = guardfast.load() is not None
        if not self.enabled:
            log.warning("guard: no fast path (%s); every bind is handled in Python",
                        guardfast.load_error())

    def drop_pidfd(self, pidfd: int) -> bool:
        """Close `pidfd` if a fast path kept it (for `PidfdCache.reap`)."""
        return any(fast.drop_pidfd(pidfd) for fast in self.by_listener.values())

    def open(self, slice_name: str, listener: int, io: seccomp.ListenerIO,
             slot: mmap.mmap | None, exits_fd: int) -> guardfast.FastPath | None:
        if not self.enabled or slot is None:   # no slot: journal by pwrite here
            return None
        try:
            fast = self.by_listener[listener] = guardfast.FastPath(listener, io.raw, slot,
                                                                   exits_fd)
        except Exception as exc:  # noqa: BLE001 - the Python path still guards
            log.warning("guard: %s: no fast path: %s", slice_name, exc)
            return None
        return fast

    def current(self, listener: int, table: PortTable) -> guardfast.FastPath | None:
        """The fast path of `listener` if its memo is of `table` (else None: it is of an
        older table, and emptied at its next run)."""
        fast = self.by_listener.get(listener)
        return fast if fast is not None and self.table is table else None

    def run(self, slice_name: str, fast: guardfast.FastPath, io: seccomp.ListenerIO,
            budget: int, table: PortTable) -> tuple[seccomp.Notification | None, int]:
        """Let the C fast path answer up to `budget` notifications under `table`.
        Returns the one it hands back (journaled already) or None (nothing more
        pending for now, budget used up, or a failed reply), and how many it
        answered; raises ListenerDone when the listener is finished."""
        if self.table is not table:   # decisions of an older table: all void
            for other in self.by_listener.values():
                other.forget()
            self.table = table
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
        raise ListenerDone

    def close(self, listener: int) -> None:
        fp = self.by_listener.pop(listener, None)
        if fp is not None:
            fp.close()   # unpins the journal slot
