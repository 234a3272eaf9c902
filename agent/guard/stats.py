"""The guard's counters (`Guard.stats`), shared by its parts."""

from __future__ import annotations

from dataclasses import dataclass, field


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
