"""Where port ownership is kept: the port table with persistence (`PortService`) and
its stores. Every change is recorded before it is granted; the callbacks then tell
the guard (close revoked sockets, F20) and the raw socket service (close sniffers, F13).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.ports.table import (
    BindDecision,
    Key,
    PortRange,
    PortTable,
    format_ports_tag,
    parse_ports_tag,
)

log = logging.getLogger("agent.ports")


class PortStore:
    """Where port ownership is recorded (before it is granted). The default keeps
    nothing; `StatePortStore` writes the agent's SQLite state."""

    def load(self) -> list[tuple[str, str, PortRange]]:
        return []

    def save(self, entries: list[tuple[str, str, PortRange]]) -> None:
        pass


class StatePortStore(PortStore):
    """The `ports` table of `agent.state.State` (sources 'plc' = tag, 'runtime' = reserve)."""

    _TO_DB = {"tag": "plc", "reserve": "runtime", "rcap": "rcap"}
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
        self.host: Any = None  # agent.ports.host.HostPorts: ports the host holds (F30)
        # Called with (slice, ranges) before a ReservePort: raises PortError if the
        # slice is not given them (agent.rcaps.RcapService.check_port_grant).
        self.grant_check: Callable[[str, list[PortRange]], None] | None = None
        # Called with (slice, keys) after a ReleasePort gave up keys it owned, and after
        # a ReservePort took keys (agent.rcaps: a released rcap port stays released).
        self.on_released: Callable[[str, set[Key]], None] | None = None
        self.on_reserved: Callable[[str, set[Key]], None] | None = None
        # The ranges each slice's `ports` tag was last granted (host-held ports left
        # out), before any `without`: what its PLC rcap names (agent.rcaps).
        self.tag_ranges: dict[str, list[PortRange]] = {}
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
        if self.grant_check is not None:
            self.grant_check(slice_name, ranges)   # PortError: not given to the slice
        self._commit(lambda t: t.grant(slice_name, ranges, "reserve"))
        log.info("slice %s reserved %s", slice_name, format_ports_tag(ranges))
        if self.on_reserved is not None:
            self.on_reserved(slice_name, self.table.expand(ranges))

    def release(self, slice_name: str, spec: str) -> None:
        ranges = parse_ports_tag(spec)
        before = self.table.keys_of(slice_name)
        self._commit(lambda t: t.release(slice_name, ranges))
        log.info("slice %s released %s", slice_name, format_ports_tag(ranges))
        gone = before - self.table.keys_of(slice_name)
        if gone and self.on_released is not None:
            self.on_released(slice_name, gone)

    def set_tag_ports(self, slice_name: str, tag_value: str,
                      without: frozenset[Key] | set[Key] = frozenset()) -> None:
        """The slice's `ports` tag granted, less the keys `without` (PortTable)."""
        ranges = parse_ports_tag(tag_value)
        if self.host is not None:  # F30: host-held ports skipped, logged
            ranges = self.host.without_held(slice_name, ranges)
        self._commit(lambda t: t.set_tag_ports(slice_name, ranges, without))
        self.tag_ranges[slice_name] = list(ranges)

    def set_rcap_ports(self, wanted: dict[str, set[Key]],
                       unreserve: dict[str, set[Key]] | None = None,
                       untag: dict[str, set[Key]] | None = None) -> None:
        """The ports the slices' rcaps and loans give them, in one recorded change
        (PortTable.set_rcap_ports); the ports taken are revoked as any (F20, F13)."""
        self._commit(lambda t: t.set_rcap_ports(wanted, unreserve, untag))

    def release_slice(self, slice_name: str) -> None:
        self._commit(lambda t: t.release_slice(slice_name))
        self.tag_ranges.pop(slice_name, None)
        log.info("slice %s: all ports released", slice_name)

    def check_bind(self, slice_name: str, proto: str, address: str, port: int) -> BindDecision:
        return self.table.check_bind(slice_name, proto, address, port)

