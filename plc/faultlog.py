"""Logging each fault PLC answers (issue 15) without letting a caller flood the log:
per source address at most `burst` lines per `window` seconds; the faults not logged
are counted and said on the next line logged for that address."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

MAX_SOURCES = 10_000   # addresses remembered at once (a spoofing-free TCP peer each)


class FaultLog:
    def __init__(self, logger: logging.Logger, burst: int = 20, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        # address -> [window start, lines logged in it, faults not logged]
        self._seen: dict[str, list[float]] = {}

    def admit(self, host: str) -> int | None:
        """None if `host` (the caller's IP) is over its budget (the fault is counted);
        else how many of its faults were not logged since its last line."""
        now = self.clock()
        with self._lock:
            entry = self._seen.get(host)
            if entry is None or now - entry[0] >= self.window:
                if entry is None and len(self._seen) >= MAX_SOURCES:
                    self._seen.clear()
                entry = self._seen[host] = [now, 0, entry[2] if entry else 0]
            if entry[1] >= self.burst:
                entry[2] += 1
                return None
            entry[1] += 1
            dropped, entry[2] = int(entry[2]), 0
            return dropped

    def fault(self, host: str, address: str, code: int, caller: Callable[[], str],
              message: Callable[[], str]) -> bool:
        """Log one fault unless `host` is over its budget; `address` is what the line
        says (host and port); the texts are made only when logged. True if logged."""
        dropped = self.admit(host)
        if dropped is None:
            return False
        more = f" ({dropped} earlier faults to this address not logged)" if dropped else ""
        self.logger.warning("fault %d to %s at %s: %s%s", code, caller(), address, message(),
                            more)
        return True
