"""The guard's restart journal: one slot per listener (`<run_dir>/<slice>.inflight`).

A listener's task handles one request at a time, so one slot holds the request in
hand: the struct seccomp_notif as received, written before the request is handled
(a memory copy into a shared mapping, or pwrite; no fsync: it must survive the
agent, not the node). A new supervisor redoes a journaled request whose caller still
waits. An answered id is not valid any more and ids are never reused, so the slot is
never cleared after a request.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path

from kernel import seccomp

log = logging.getLogger("agent.guard")

JOURNAL_V1 = struct.Struct("<QIi6Q")  # id, pid, nr, args (journals of earlier agents)
JOURNAL_SIZE = seccomp.NOTIF.size  # the journal: the struct seccomp_notif as received


def journal_path(run_dir: Path, slice_name: str) -> Path:
    if not slice_name or "/" in slice_name or slice_name.startswith("."):
        raise ValueError(f"bad slice name {slice_name!r}")
    return run_dir / f"{slice_name}.inflight"


class Journal:
    """The open journal of one listener's supervisor (closed by `close`)."""

    def __init__(self, run_dir: Path, slice_name: str) -> None:
        self.slice_name = slice_name
        self.fd = os.open(journal_path(run_dir, slice_name),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.slot: mmap.mmap | None = None

    def pending(self) -> tuple[seccomp.Notification, int] | None:
        """The request a previous supervisor left (and the size of its record), or None."""
        raw = os.pread(self.fd, JOURNAL_SIZE, 0)
        if len(raw) == JOURNAL_SIZE:
            return seccomp.Notification.unpack(raw), len(raw)
        if len(raw) == JOURNAL_V1.size:  # left by an agent of the previous format
            nid, pid, nr, *args = JOURNAL_V1.unpack(raw)
            return seccomp.Notification(nid, pid, 0, nr, seccomp.AUDIT_ARCH_X86_64, 0,
                                        tuple(args)), len(raw)
        return None

    def clear(self, size: int) -> None:
        """The pending request is answered."""
        os.pwrite(self.fd, bytes(size), 0)

    def map(self) -> mmap.mmap | None:
        """The journal slot as shared memory: written with a memory copy instead of a
        syscall per request. Stores to a shared file mapping are in the page cache at
        once, so a supervisor killed right after one leaves it for the next (like
        pwrite, and like pwrite it need not survive the node). None: use pwrite."""
        try:
            os.ftruncate(self.fd, JOURNAL_SIZE)
            self.slot = mmap.mmap(self.fd, JOURNAL_SIZE)
        except (OSError, ValueError) as exc:
            log.warning("guard: %s: journal not mappable (%s); using pwrite",
                        self.slice_name, exc)
        return self.slot

    def record(self, raw: bytes | bytearray) -> None:
        """Journal a request before it is handled."""
        if self.slot is not None:
            self.slot[:] = raw
        else:
            try:
                os.pwrite(self.fd, raw, 0)
            except OSError as exc:  # the request is still answered; only a restart loses it
                log.warning("guard: %s: journal: %s", self.slice_name, exc)

    def close(self) -> None:
        """Unmap and close (after the fast path that pins the slot is closed)."""
        if self.slot is not None:
            self.slot.close()
        os.close(self.fd)
