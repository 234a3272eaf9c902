"""Bounds on password checking (issue 9): few hashes at once, few failures per source.

A wrong password costs 50-65 ms of CPU and 16 MiB (scrypt), and system.multicall let
one request ask for thousands. ``HashGate`` lets ``slots`` verifications run at once
(a caller waits at most ``wait`` seconds, and only ``slots`` callers wait: the others
are told at once, so worker threads are not all parked behind hashes). ``Failures``
counts wrong passwords per client address; past ``limit`` in a ``window``, the address's
password calls are refused without hashing until the window ends.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Busy(Exception):
    """No hash slot became free in time."""


class HashGate:
    def __init__(self, slots: int = 0, wait: float = 1.0) -> None:
        self.slots = slots or max(1, (os.cpu_count() or 2) // 2)
        self.wait = wait
        self._sem = threading.Semaphore(self.slots)
        self._lock = threading.Lock()
        self._waiting = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._sem.acquire(blocking=False):
            with self._lock:
                if self._waiting >= self.slots:
                    raise Busy
                self._waiting += 1
            try:
                got = self._sem.acquire(timeout=self.wait)
            finally:
                with self._lock:
                    self._waiting -= 1
            if not got:
                raise Busy
        try:
            yield
        finally:
            self._sem.release()


class Failures:
    """Wrong passwords per source address in fixed windows (bounded memory)."""

    MAX_SOURCES = 65536

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[float, int]] = {}  # source -> (window start, count)

    def blocked(self, source: str | None) -> bool:
        if not self.limit or source is None:
            return False
        with self._lock:
            start, count = self._counts.get(source, (0.0, 0))
        return count >= self.limit and time.monotonic() - start < self.window

    def failed(self, source: str | None) -> None:
        if not self.limit or source is None:
            return
        now = time.monotonic()
        with self._lock:
            start, count = self._counts.get(source, (now, 0))
            if now - start >= self.window:
                start, count = now, 0
            if len(self._counts) >= self.MAX_SOURCES and source not in self._counts:
                self._counts = {s: v for s, v in self._counts.items()
                                if now - v[0] < self.window}
                if len(self._counts) >= self.MAX_SOURCES:
                    self._counts.clear()
            self._counts[source] = (start, count + 1)
