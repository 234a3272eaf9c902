"""One snapshot of the node and its slivers, shared by every concurrent request.

`Snapshots.get()` returns the last snapshot while it is younger than `ttl`; otherwise
the first caller starts one collection and every caller that comes meanwhile waits
for that same one (slicestat's request coalescing). The agent's facts are asked from
the `SliverSource` in the trio thread (they live in the agent's loop); everything
that reads the kernel runs in a worker thread (trio.to_thread), so the agent's loop
never blocks on a file or netlink read.

Cancellation: a caller cancelled while it runs the collection does not abandon it:
the collection is shielded (it is bounded: tens of ms), its result is kept for the
next caller, and the cancellation is delivered afterwards.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from sensors.readers import NodeReader, SliverReader

log = logging.getLogger("sensors")

# Facts a source may give that are used here but not published.
PRIVATE_KEYS = ("htb_minor",)
HISTORY_STEP_S = 10.0     # keep one rate sample per 10 s ...
HISTORY_SPAN_S = 15 * 60  # ... for 15 minutes (slicestat's longest average)
DISK_TTL_S = 30.0         # btrfs updates qgroup usage at commit time (~30 s) anyway
DISK_READS_PER_COLLECTION = 100


class SliverSource(Protocol):
    """What only the agent knows, per sliver, as plain data (docs/sensors.md keys):
    `slice_id`, `state`, `ports` (list of `PROTO/PORT@ADDRESS`), `sent_bytes`,
    `i2_sent_bytes`, `budget_left_bytes`, `i2_budget_left_bytes`, `window_start`,
    `ceil_bps`, `disk_used_bytes`, and `htb_minor` (read, not published). Called in
    the trio thread; must not block."""

    def __call__(self) -> Mapping[str, Mapping[str, Any]]: ...


class CollectionError(RuntimeError):
    """A collection failed; the message names the reader, never a traceback."""


@dataclass
class Snapshot:
    time: float                                   # epoch seconds
    node: dict[str, dict[str, Any]]               # sensor -> key -> value
    slivers: dict[str, dict[str, Any]]            # name -> key -> value
    send_kbps: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    address: str = ""
    cpu_seconds: float = 0.0                      # CPU time the collection took
    serial: int = 0


DiskReader = Callable[[str], int]


def btrfs_disk_reader(roots_dir: Path) -> DiskReader:
    """Bytes a sliver's own layer holds, from btrfs qgroups (kernel/disk.py)."""
    from kernel import disk

    def read(name: str) -> int:
        return disk.layer_usage_kib(roots_dir, name) * 1024
    return read


class Snapshots:
    """The snapshot cache. One per server."""

    def __init__(self, source: SliverSource | None, *, ttl: float = 1.0,
                 node_reader: NodeReader | None = None,
                 sliver_reader: SliverReader | None = None,
                 disk_reader: DiskReader | None = None, address: str = "") -> None:
        self.source = source
        self.ttl = ttl
        self.node_reader = node_reader or NodeReader()
        self.sliver_reader = sliver_reader or SliverReader()
        self.disk_reader = disk_reader
        self.address = address
        self._snap: Snapshot | None = None
        self._taken = 0.0                  # monotonic time of self._snap
        self._pending: trio.Event | None = None
        self._error: str | None = None
        self._serial = 0
        self._prev: tuple[float, dict[str, float]] | None = None   # cpu seconds
        self._history: collections.deque[tuple[float, dict[str, int]]] = collections.deque()
        self._disk: dict[str, tuple[float, int]] = {}

    async def get(self) -> Snapshot:
        """The current snapshot (CollectionError if the collection failed)."""
        while True:
            if self._snap is not None and time.monotonic() - self._taken < self.ttl:
                return self._snap
            if self._pending is None:
                self._pending = done = trio.Event()
                try:
                    with trio.CancelScope(shield=True):
                        await self._collect()
                finally:
                    self._pending = None
                    done.set()
                if self._error is not None:
                    raise CollectionError(self._error)
                assert self._snap is not None
                return self._snap
            waiting = self._pending
            await waiting.wait()
            if self._error is not None:
                raise CollectionError(self._error)

    async def _collect(self) -> None:
        self._error = None
        try:
            facts = {n: dict(f) for n, f in (self.source() if self.source else {}).items()}
        except Exception:  # noqa: BLE001 - boundary: a sensor failure is an answer
            log.exception("sensors: the agent's sliver source failed")
            self._error = "the agent's sliver facts could not be read"
            return
        try:
            snap = await trio.to_thread.run_sync(self.collect_sync, facts)
        except Exception as exc:  # noqa: BLE001 - boundary, as above
            log.exception("sensors: collection failed")
            self._error = f"collection failed in {getattr(exc, 'reader', 'a reader')}"
            return
        self._snap, self._taken = snap, time.monotonic()

    def collect_sync(self, facts: dict[str, dict[str, Any]]) -> Snapshot:
        """One collection (blocking: a worker thread). Public for the benchmark."""
        cpu0 = time.thread_time()
        now, mono = time.time(), time.monotonic()
        node = _tagged("node", self.node_reader.read)
        cg = _tagged("cgroups", self.sliver_reader.read, list(facts))
        minors = {n: int(f["htb_minor"]) for n, f in facts.items()
                  if f.get("htb_minor") is not None}
        htb = _tagged("htb", self.sliver_reader.htb_bytes, minors) if minors else {}
        self._read_disks(facts, mono)
        slivers: dict[str, dict[str, Any]] = {}
        prev = self._prev
        cpu_now: dict[str, float] = {}
        empty: dict[str, Any] = {}
        for name, f in facts.items():
            rec: dict[str, Any] = {"name": name, **f}
            for k in PRIVATE_KEYS:
                rec.pop(k, None)
            rec.update(cg.get(name, empty))
            if name in htb:
                rec["htb_sent_bytes_total"] = htb[name]
            if name in self._disk:
                rec["disk_used_bytes"] = self._disk[name][1]
            cpu = rec.get("cpu_seconds_total")
            if cpu is not None:
                cpu_now[name] = cpu
                if prev is not None and name in prev[1] and mono > prev[0]:
                    rec["cpu_percent"] = round(
                        max(cpu - prev[1][name], 0.0) * 100 / (mono - prev[0]), 2)
            slivers[name] = rec
        self._prev = (mono, cpu_now)
        send_kbps = self._rates(slivers, mono)
        self._serial += 1
        return Snapshot(now, node, slivers, send_kbps, self.address,
                        time.thread_time() - cpu0, self._serial)

    def _read_disks(self, facts: Mapping[str, Any], mono: float) -> None:
        for gone in set(self._disk) - set(facts):
            del self._disk[gone]
        if self.disk_reader is None:
            return
        due = sorted((self._disk.get(n, (0.0, 0))[0], n) for n in facts
                     if "disk_used_bytes" not in facts[n]
                     and mono - self._disk.get(n, (-DISK_TTL_S, 0))[0] >= DISK_TTL_S)
        for _, name in due[:DISK_READS_PER_COLLECTION]:
            try:
                self._disk[name] = (mono, self.disk_reader(name))
            except OSError:
                self._disk.pop(name, None)   # no layer (yet): the key is left out

    def _rates(self, slivers: Mapping[str, Mapping[str, Any]],
               mono: float) -> dict[str, tuple[float, float, float]]:
        """Send rates (kbit/s) over the last 1, 5 and 15 minutes per sliver."""
        counters: dict[str, int] = {}
        for name, rec in slivers.items():
            if "htb_sent_bytes_total" in rec:
                counters[name] = int(rec["htb_sent_bytes_total"])
            elif "sent_bytes" in rec:
                counters[name] = int(rec["sent_bytes"]) + int(rec.get("i2_sent_bytes", 0))
        hist = self._history
        while hist and mono - hist[0][0] > HISTORY_SPAN_S + HISTORY_STEP_S:
            hist.popleft()
        # per span, the oldest sample inside it (samples are in time order)
        bases = [next(((t, c) for t, c in hist if mono - t <= span + HISTORY_STEP_S), None)
                 for span in (60, 300, 900)]
        out: dict[str, tuple[float, float, float]] = {}
        for name, now_bytes in counters.items():
            rates = [0.0, 0.0, 0.0]
            for i, base in enumerate(bases):
                if base is not None and name in base[1] and mono > base[0]:
                    rates[i] = max(now_bytes - base[1][name], 0) * 8 / 1000 / (mono - base[0])
            out[name] = (rates[0], rates[1], rates[2])
        if not hist or mono - hist[-1][0] >= HISTORY_STEP_S:
            hist.append((mono, counters))
        return out


def _tagged(reader: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a reader; an error carries the reader's name (for the 500 message)."""
    try:
        return fn(*args)
    except Exception as exc:
        exc.reader = reader  # type: ignore[attr-defined]
        raise
