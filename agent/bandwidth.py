"""Bandwidth policy: sliver classes from the rspec, the byte ledger and daily budgets.

bwmon's rule (nodemanager spec §5.4), done right:

* Every `sample_s` the agent calls `account(now)`: it reads every sliver class's
  counters (kernel/tc.py), adds the *delta* since the last reading to the slice's
  ledger row and commits, reading and ledger in one transaction. Absolute counters
  are never trusted: a counter below the last reading means the class was re-created
  (count what it shows since); the agent zeroes the last reading itself whenever it
  creates a class. A counter going backwards never opens a new window (bwmon's
  defect).
* The window is per slice and rolling (`period_s`, 86400 by default): it starts when
  the slice is first seen, and again at the first pass after it ends.
* Once a slice has sent `net_thresh_kbyte` KiB in the window, its ceiling is what is
  left of `net_max_kbyte` spread over the time left, never below `net_min_rate`,
  recomputed at every pass; the window's end restores `net_max_rate`. The exempt class
  follows the same rule with the `net_i2_*` tags.
* The ledger is keyed by slice name and kept after a destroy (dead-slice memory): a
  slice destroyed and re-created within its window keeps its bytes. It lives in the
  agent's SQLite database (table `bw_ledger`, created by `ensure_tables`), so it
  survives kill -9.

The class minor of each slice is kept in the ledger too, so a restarted agent finds
its classes (`sync` adopts them: nothing is re-created, nothing blips).

Rates here are bit/s; rspec rates are kbit/s and budgets KiB (spec §3.2).
"""

from __future__ import annotations

import ipaddress
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kernel import tc

SCHEMA = """
CREATE TABLE IF NOT EXISTS bw_ledger (
    name TEXT PRIMARY KEY,       -- slice name; the row outlives the sliver
    minor INTEGER UNIQUE,        -- HTB class minor (kernel/tc.py), NULL once released
    window_start REAL NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,      -- sent in this window, capped class
    i2bytes INTEGER NOT NULL DEFAULT 0,    -- sent in this window, exempt class
    packets INTEGER NOT NULL DEFAULT 0,
    i2packets INTEGER NOT NULL DEFAULT 0,
    live INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS bw_readings (
    name TEXT NOT NULL,
    ifname TEXT NOT NULL,
    minor INTEGER NOT NULL,      -- capped minor, or minor | 0x8000 for exempt
    bytes INTEGER NOT NULL,      -- the class counters at the last pass
    packets INTEGER NOT NULL,
    PRIMARY KEY (name, ifname, minor)
);
"""

DEFAULT_SAMPLE_S = 5.0
DEFAULT_PERIOD_S = 86400
DEFAULT_LINK_RATE = 1_000_000_000
MIN_RATE_SHARE = 0.25   # bwmon: min rate <= 25 % of the node cap


class BandwidthConfigError(ValueError):
    """A `[bandwidth]` key is unusable; the message names the key."""


@dataclass(frozen=True)
class BandwidthConfig:
    """agent.toml `[bandwidth]`: shaping is off while `interfaces` is empty."""

    interfaces: tuple[str, ...] = ()
    node_rate: int = 0                # bit/s; 0: PLC's interface bwlimit, else link_rate
    link_rate: int = DEFAULT_LINK_RATE  # bit/s; the exempt tree's and the link class's
    exempt: tuple[str, ...] = ()      # IPv4/IPv6 CIDRs
    sample_s: float = DEFAULT_SAMPLE_S
    period_s: int = DEFAULT_PERIOD_S


def parse_config(data: Mapping[str, Any] | None, source: str = "agent.toml") -> BandwidthConfig:
    """Validate the `[bandwidth]` table (the lead hooks this into agent/config.py)."""
    data = dict(data or {})
    known = {f for f in BandwidthConfig.__dataclass_fields__}
    for key in data:
        if key not in known:
            raise BandwidthConfigError(f"{source}: [bandwidth] has no key {key!r} "
                                       f"(known: {', '.join(sorted(known))})")

    def integer(key: str, low: int, high: int) -> int | None:
        if key not in data:
            return None
        v = data[key]
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise BandwidthConfigError(f"{source}: [bandwidth] {key} = {v!r}: "
                                       f"an integer in [{low}, {high}] is needed")
        return v

    out: dict[str, Any] = {}
    for key, low, high in (("node_rate", 0, 10**12), ("link_rate", 8000, 10**12),
                           ("period_s", 2, 366 * 86400)):
        v = integer(key, low, high)
        if v is not None:
            out[key] = v
    if "sample_s" in data:
        v = data["sample_s"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.1 <= v <= 3600:
            raise BandwidthConfigError(f"{source}: [bandwidth] sample_s = {v!r}: "
                                       "seconds in [0.1, 3600] are needed")
        out["sample_s"] = float(v)
    for key in ("interfaces", "exempt"):
        if key in data:
            v = data[key]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or len(v) > 64:
                raise BandwidthConfigError(f"{source}: [bandwidth] {key}: a list of at most "
                                           "64 strings is needed")
            out[key] = tuple(v)
    for name in out.get("interfaces", ()):
        if not 0 < len(name) < 16 or "/" in name or name in (".", ".."):
            raise BandwidthConfigError(f"{source}: [bandwidth] interfaces: {name!r} is not "
                                       "an interface name")
    for cidr in out.get("exempt", ()):
        try:
            ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            raise BandwidthConfigError(f"{source}: [bandwidth] exempt: {cidr!r}: {exc}") from None
    cfg = BandwidthConfig(**out)
    if cfg.node_rate > cfg.link_rate:
        raise BandwidthConfigError(f"{source}: [bandwidth] node_rate {cfg.node_rate} exceeds "
                                   f"link_rate {cfg.link_rate}")
    return cfg


def node_cap(cfg: BandwidthConfig, plc_bwlimit: int | None) -> int:
    """The node's cap in bit/s: agent.toml node_rate, else PLC's interface bwlimit
    (bit/s; null or negative means none), else the link rate."""
    if cfg.node_rate:
        return cfg.node_rate
    if plc_bwlimit is not None and plc_bwlimit > 0:
        return min(plc_bwlimit, cfg.link_rate)
    return cfg.link_rate


@dataclass(frozen=True)
class Rates:
    """One slice's shaping parameters in bit/s and bytes (from its rspec)."""

    min_rate: int
    max_rate: int
    share: int
    max_bytes: int
    thresh_bytes: int
    i2_min_rate: int
    i2_max_rate: int
    i2_max_bytes: int
    i2_thresh_bytes: int

    @classmethod
    def from_rspec(cls, rspec: Mapping[str, Any], cap: int, link_rate: int) -> Rates:
        """kbit/s and KiB -> bit/s and bytes, clamped as bwmon.on() clamps: max <= cap
        (a max of -1 means the cap), min <= 25 % of the cap and <= max."""
        def rate(key: str, default: int) -> int:
            v = int(rspec.get(key, default))
            return -1 if v < 0 else v * 1000

        mx = rate("net_max_rate", cap // 1000)
        mx = cap if mx < 0 else min(max(mx, 8000), cap)
        mn = min(max(rate("net_min_rate", 1), 8000), int(cap * MIN_RATE_SHARE), mx)
        i2mx = rate("net_i2_max_rate", link_rate // 1000)
        i2mx = link_rate if i2mx < 0 else min(max(i2mx, 8000), link_rate)
        i2mn = min(max(rate("net_i2_min_rate", 1), 8000), i2mx)
        return cls(
            min_rate=mn, max_rate=mx, share=max(int(rspec.get("net_share", 1)), 1),
            max_bytes=int(rspec.get("net_max_kbyte", 10_546_875)) * 1024,
            thresh_bytes=int(rspec.get("net_thresh_kbyte", 9_492_187)) * 1024,
            i2_min_rate=i2mn, i2_max_rate=i2mx,
            i2_max_bytes=int(rspec.get("net_i2_max_kbyte", 31_640_625)) * 1024,
            i2_thresh_bytes=int(rspec.get("net_i2_thresh_kbyte", 28_476_562)) * 1024)


def budget_ceiling(used: int, thresh: int, maximum: int, min_rate: int, max_rate: int,
                   window_start: float, period: float, now: float) -> int:
    """bwmon's rule: below the threshold the ceiling is max_rate; at or above it, the
    bytes left of `maximum` over the seconds left, in bit/s, within [min_rate,
    max_rate]."""
    if used < thresh:
        return max_rate
    left = max(window_start + period - now, 1.0)
    ceil = int(max(maximum - used, 0) * 8 / left)
    return max(min(ceil, max_rate), min_rate)


class ShaperLike(Protocol):
    """What the policy needs from kernel.tc.Shaper (a test may pass a real one)."""

    ifname: str

    def ensure_root(self, node_rate: int, link_rate: int) -> tc.Hierarchy: ...
    def counters(self) -> dict[int, tc.ClassInfo]: ...
    def stats(self) -> dict[int, tc.ClassInfo]: ...
    def ensure_sliver(self, minor: int, capped: tc.ClassSpec, exempt: tc.ClassSpec,
                      have: Mapping[int, tc.ClassInfo] | None = None) -> None: ...
    def set_ceil(self, minor: int, spec: tc.ClassSpec,
                 have: tc.ClassInfo | None = None) -> None: ...
    def remove_sliver(self, minor: int) -> None: ...


@dataclass
class Ceilings:
    capped: int
    exempt: int


@dataclass
class Bandwidth:
    """The policy object: one per agent, over one db connection and the shapers."""

    db: sqlite3.Connection
    cfg: BandwidthConfig
    shapers: list[ShaperLike]
    cap: int
    rates: dict[str, Rates] = field(default_factory=dict)
    # last pass, per slice: (drops, backlog) summed over interfaces and both classes
    queue: dict[str, tuple[int, int]] = field(default_factory=dict)
    applied: dict[str, Ceilings] = field(default_factory=dict)

    # --- ledger ------------------------------------------------------------------
    def _row(self, name: str) -> tuple[Any, ...] | None:
        return self.db.execute(
            "SELECT minor, window_start, bytes, i2bytes, packets, i2packets, live"
            " FROM bw_ledger WHERE name = ?", (name,)).fetchone()

    def _minor(self, name: str, now: float) -> int:
        """The slice's class minor: the one it holds, else a new one (tc.minor_for)."""
        row = self._row(name)
        if row is not None and row[0] is not None:
            return int(row[0])
        taken = {int(m): n for n, m in self.db.execute(
            "SELECT name, minor FROM bw_ledger WHERE minor IS NOT NULL")}
        minor = tc.minor_for(name, taken)
        with self.db:
            if row is None:
                self.db.execute("INSERT INTO bw_ledger (name, minor, window_start) VALUES (?, ?, ?)",
                                (name, minor, now))
            else:
                self.db.execute("UPDATE bw_ledger SET minor = ?, live = 1 WHERE name = ?",
                                (minor, name))
        return minor

    def minors(self) -> dict[str, int]:
        return {n: int(m) for n, m in self.db.execute(
            "SELECT name, minor FROM bw_ledger WHERE minor IS NOT NULL")}

    def _ceilings(self, name: str, now: float) -> Ceilings:
        r = self.rates[name]
        row = self._row(name)
        start, used, i2used = (row[1], row[2], row[3]) if row else (now, 0, 0)
        if now >= start + self.cfg.period_s:
            used = i2used = 0
        return Ceilings(
            budget_ceiling(used, r.thresh_bytes, r.max_bytes, r.min_rate, r.max_rate,
                           start, self.cfg.period_s, now),
            budget_ceiling(i2used, r.i2_thresh_bytes, r.i2_max_bytes, r.i2_min_rate,
                           r.i2_max_rate, start, self.cfg.period_s, now))

    def _specs(self, name: str, ceil: Ceilings) -> tuple[tc.ClassSpec, tc.ClassSpec]:
        r = self.rates[name]
        return (tc.ClassSpec(r.min_rate, max(ceil.capped, r.min_rate), r.share),
                tc.ClassSpec(r.i2_min_rate, max(ceil.exempt, r.i2_min_rate), r.share))

    # --- reconcile ---------------------------------------------------------------
    def sync(self, rspecs: Mapping[str, Mapping[str, Any]], now: float) -> None:
        """Make the classes match the slivers `rspecs` names: adopt what exists (changed
        in place only where it differs), create what is missing, account and remove
        classes of slices no longer there. The ledger keeps every slice's bytes."""
        for sh in self.shapers:
            sh.ensure_root(self.cap, self.cfg.link_rate)
        self.rates = {n: Rates.from_rspec(r, self.cap, self.cfg.link_rate)
                      for n, r in rspecs.items()}
        self.account(now, apply=False)  # bill traffic sent while we were away first
        have = {sh.ifname: sh.counters() for sh in self.shapers}
        for name in rspecs:
            self._ensure(name, now, have)
        owners = self.minors()
        wanted = {owners[n] for n in rspecs if n in owners}
        for sh in self.shapers:
            for minor in {m & ~tc.EXEMPT_BIT for m in have[sh.ifname]} - wanted:
                sh.remove_sliver(minor)
        gone = [n for n in owners if n not in rspecs]
        self._release(gone)

    def _ensure(self, name: str, now: float, have: Mapping[str, Mapping[int, tc.ClassInfo]]) -> None:
        minor = self._minor(name, now)
        ceil = self._ceilings(name, now)
        capped, exempt = self._specs(name, ceil)
        with self.db:
            for sh in self.shapers:
                classes = have.get(sh.ifname, {})
                for m in (minor, minor | tc.EXEMPT_BIT):
                    if m not in classes:   # a new class counts from zero
                        self.db.execute(
                            "INSERT OR REPLACE INTO bw_readings VALUES (?, ?, ?, 0, 0)",
                            (name, sh.ifname, m))
                sh.ensure_sliver(minor, capped, exempt, classes)
            self.db.execute("UPDATE bw_ledger SET live = 1 WHERE name = ?", (name,))
        self.applied[name] = ceil

    def add(self, name: str, rspec: Mapping[str, Any], now: float) -> int:
        """Create or update one sliver's classes; returns its minor (for netclass).
        Rates unchanged since its classes were made here: nothing to do (an update of
        its CPU or memory does not touch tc)."""
        rates = Rates.from_rspec(rspec, self.cap, self.cfg.link_rate)
        if self.rates.get(name) == rates and name in self.applied:
            minor = self.minors().get(name)
            if minor is not None:
                return minor
        self.rates[name] = rates
        self._ensure(name, now, {sh.ifname: sh.counters() for sh in self.shapers})
        return self.minors()[name]

    def remove(self, name: str, now: float) -> None:
        """Destroy one sliver's classes after billing their last bytes; the ledger row
        stays (dead-slice memory), its minor is released."""
        self.account(now, apply=False)
        for sh in self.shapers:
            minor = self.minors().get(name)
            if minor is not None:
                sh.remove_sliver(minor)
        self._release([name])

    def _release(self, names: Iterable[str]) -> None:
        with self.db:
            for name in names:
                self.db.execute("UPDATE bw_ledger SET minor = NULL, live = 0 WHERE name = ?",
                                (name,))
                self.db.execute("DELETE FROM bw_readings WHERE name = ?", (name,))
                self.rates.pop(name, None)
                self.applied.pop(name, None)
                self.queue.pop(name, None)

    # --- the accounting pass -----------------------------------------------------
    def account(self, now: float, apply: bool = True) -> dict[str, Ceilings]:
        """Read every class, add deltas to the ledger, roll windows over, and return
        the slices whose ceilings must change (applied too unless apply=False)."""
        owners = {m: n for n, m in self.minors().items()}
        readings = {(n, i, m): (b, p) for n, i, m, b, p in self.db.execute(
            "SELECT name, ifname, minor, bytes, packets FROM bw_readings")}
        ledger = {row[0]: list(row[1:]) for row in self.db.execute(
            "SELECT name, window_start, bytes, i2bytes, packets, i2packets FROM bw_ledger"
            " WHERE minor IS NOT NULL")}
        queue: dict[str, list[int]] = {}
        new_readings = []
        current: dict[str, dict[int, tc.ClassInfo]] = {}
        for sh in self.shapers:
            classes = sh.stats()   # the fast read: no qdisc dump (leaf_limit None)
            current[sh.ifname] = classes
            for m, info in classes.items():
                name = owners.get(m & ~tc.EXEMPT_BIT)
                if name is None:
                    continue
                last_b, last_p = readings.get((name, sh.ifname, m), (0, 0))
                # Below the last reading: the class was re-created; all it shows is new.
                db_ = info.bytes - last_b if info.bytes >= last_b else info.bytes
                dp = info.packets - last_p if info.packets >= last_p else info.packets
                row = ledger[name]
                if m & tc.EXEMPT_BIT:
                    row[2] += db_
                    row[4] += dp
                else:
                    row[1] += db_
                    row[3] += dp
                q = queue.setdefault(name, [0, 0])
                q[0] += info.drops
                q[1] += info.backlog
                new_readings.append((name, sh.ifname, m, info.bytes, info.packets))
        for row in ledger.values():
            if now >= row[0] + self.cfg.period_s:   # the window ended: a new one
                row[:] = [now, 0, 0, 0, 0]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO bw_readings VALUES (?, ?, ?, ?, ?)",
                                new_readings)
            self.db.executemany(
                "UPDATE bw_ledger SET window_start = ?, bytes = ?, i2bytes = ?, packets = ?,"
                " i2packets = ? WHERE name = ?", [(*row, name) for name, row in ledger.items()])
            self.db.execute("DELETE FROM bw_ledger WHERE live = 0 AND window_start + ? <= ?",
                            (self.cfg.period_s, now))
        self.queue = {n: (q[0], q[1]) for n, q in queue.items()}
        changes: dict[str, Ceilings] = {}
        for name in self.rates:
            if name not in ledger:
                continue
            want = self._ceilings(name, now)
            if self.applied.get(name) != want:
                changes[name] = want
        if apply:
            self.apply(changes, current)
        return changes

    def apply(self, changes: Mapping[str, Ceilings],
              current: Mapping[str, Mapping[int, tc.ClassInfo]] | None = None) -> None:
        minors = self.minors()
        for name, ceil in changes.items():
            capped, exempt = self._specs(name, ceil)
            for sh in self.shapers:
                have = (current or {}).get(sh.ifname, {})
                sh.set_ceil(minors[name], capped, have.get(minors[name]))
                sh.set_ceil(minors[name] | tc.EXEMPT_BIT, exempt,
                            have.get(minors[name] | tc.EXEMPT_BIT))
            self.applied[name] = ceil

    def observe(self) -> None:
        """Read-only: the ceilings, drops and backlog the kernel's classes have now
        (for a process other than the agent, e.g. `status`); changes nothing."""
        owners = {m: n for n, m in self.minors().items()}
        queue: dict[str, list[int]] = {}
        ceil: dict[str, list[int]] = {}
        for sh in self.shapers:
            for m, info in sh.stats().items():
                name = owners.get(m & ~tc.EXEMPT_BIT)
                if name is None:
                    continue
                q = queue.setdefault(name, [0, 0])
                q[0] += info.drops
                q[1] += info.backlog
                c = ceil.setdefault(name, [0, 0])
                c[1 if m & tc.EXEMPT_BIT else 0] = info.ceil
        self.queue = {n: (q[0], q[1]) for n, q in queue.items()}
        self.applied = {n: Ceilings(c[0], c[1]) for n, c in ceil.items()}

    # --- GetBandwidth ------------------------------------------------------------
    def report(self, name: str, now: float) -> dict[str, Any]:
        """What a slice may read about itself (the GetBandwidth answer), as of the
        last pass. KeyError when the slice has no ledger."""
        row = self._row(name)
        if row is None:
            raise KeyError(name)
        _, start, used, i2used, packets, i2packets, live = row
        r = self.rates.get(name)
        ceil = self.applied.get(name)
        drops, backlog = self.queue.get(name, (0, 0))
        return {
            "name": name, "live": bool(live),
            "window_start": start, "window_end": start + self.cfg.period_s,
            "bytes": used, "packets": packets, "i2bytes": i2used, "i2packets": i2packets,
            "budget_left": max(r.max_bytes - used, 0) if r else None,
            "i2budget_left": max(r.i2_max_bytes - i2used, 0) if r else None,
            "ceil": ceil.capped if ceil else None, "i2ceil": ceil.exempt if ceil else None,
            "capped": bool(r and ceil and ceil.capped < r.max_rate),
            "drops": drops, "backlog": backlog,
        }


def ensure_tables(db: sqlite3.Connection) -> None:
    """Create the ledger tables in the agent's database (agent/state.py's connection)."""
    with db:
        db.executescript(SCHEMA)
