"""The rcap ledger in the agent: loaded from the state, changed by the slice API
(agent/sliceapi/rcaps.py) and by the reconciler (a PLC sliver's rspec is an rcap bound
to it), written before anything is granted, and applied in place: a slice whose
effective amounts change gets a new target and an `update` (cgroups by the backend, HTB
classes by agent/bwservice.py). Loans end at their expiry by `serve`, a task of the
agent's background nursery."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from agent.ports.table import FIRST_UNPRIVILEGED, Key, PortError, PortRange, parse_ports_tag
from agent.rcaps import store
from agent.rcaps.ledger import Ledger
from agent.rcaps.model import (
    NO_PORTS,
    PORTS,
    RESOURCES,
    UNLIMITED_AT_ZERO,
    Amounts,
    LedgerError,
    Ports,
    port_ranges,
    port_text,
    zero,
)
from agent.state import HAS_SLIVER, SliverRecord, State

log = logging.getLogger("agent.rcaps")

MAX_SLEEP = 60.0     # the expiry task looks at the clock at least this often
RELEASED_META = "rcap_released:"   # + slice: the rcap/tag ports it gave up (ReleasePort)


class GrantRefused(LedgerError):
    """A grant (cgroup values, HTB class) beyond what the slice's rcaps and loans give."""


class PortNotGiven(PortError):
    """ReservePort of a port neither the slice's rspec (`ports` tag) nor its rcaps and
    loans give it (fault 102, as the port table's refusals)."""


def node_capacity(state_dir: str | Path, store_kib: int = 0, link_kbit: int = 0) -> Amounts:
    """The node's free pool before any rcap is acquired from it: cpu_share the cgroup
    weight range (10,000), cpu_pct 100 (% of the node), bandwidth the shaped link's
    rate (kbit/s; 1 Gbit/s without shaping), memory from /proc/meminfo, disk the layer
    store (or the state directory's file system), processes the kernel's pid_max."""
    cap = zero()
    cap["cpu_share"], cap["cpu_pct"] = 10_000, 100
    cap["net_min_rate"] = cap["net_max_rate"] = link_kbit or 1_000_000
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                cap["mem_max"] = int(line.split()[1])
    except OSError:
        pass
    if store_kib:
        cap["disk_max"] = store_kib
    else:
        st = os.statvfs(state_dir)
        cap["disk_max"] = st.f_blocks * st.f_frsize // 1024
    try:
        cap["pids_max"] = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        cap["pids_max"] = 32768
    return cap


def plc_amounts(rspec: Mapping[str, Any]) -> Amounts:
    out = zero()
    for k in RESOURCES:
        try:
            out[k] = max(0, int(rspec.get(k, 0)))
        except (TypeError, ValueError):
            out[k] = 0
    return out


class RcapService:
    """The ledger, its store, and the path from a ledger change to the kernel."""

    def __init__(self, state: State, capacity: Amounts, *,
                 clock: Callable[[], float] = time.time, background: Any = None) -> None:
        self.state = state
        self.clock = clock
        self.led: Ledger = store.load(state, capacity)
        self.reconciler: Any = None          # agent.reconcile.Reconciler, by attach()
        self.ports: Any = None               # agent.ports.PortService, by attach_ports()
        self._target_of: Callable[[Mapping[str, Any]], str] | None = None
        # slice -> port table keys it gave up with ReleasePort: not granted again by a
        # ledger change or a tag change until it reserves them (ReservePort).
        self._released: dict[str, set[Key]] = {}
        for name, text in state.meta_with_prefix(RELEASED_META).items():
            try:
                self._released[name] = {(str(p), str(a), int(n)) for p, a, n in json.loads(text)}
            except (ValueError, TypeError):
                log.warning("slice %s: unreadable released ports dropped", name)
        self._wake = trio.Event()
        if background is not None:
            background.start_soon(self.serve, name="rcaps-expiry")

    def attach(self, reconciler: Any) -> None:
        from agent.reconcile import target_of  # reconcile imports nothing of ours

        self.reconciler = reconciler
        self._target_of = target_of

    def attach_ports(self, ports: Any) -> None:
        """The port table: the ports rcaps and loans give are granted there (source
        "rcap"), and its ReservePort asks `check_port_grant` first."""
        self.ports = ports
        ports.grant_check = self.check_port_grant
        ports.on_released = self.port_released
        ports.on_reserved = self.port_reserved

    # -- ports --------------------------------------------------------------------------------

    def _tag_keys(self, name: str) -> set[tuple[str, int, str]]:
        rec = self.state.get_sliver(name)
        tag = rec.spec.get("attributes", {}).get("ports", "") if rec is not None else ""
        try:
            return {(r.proto, n, r.address or "") for r in parse_ports_tag(str(tag))
                    for n in range(r.lo, r.hi + 1)}
        except PortError:
            return set()

    def tag_ports(self, name: str) -> Ports:
        """The ports of slice `name`'s `ports` tag as the port table last granted them
        (host-held ports left out, F30): what its PLC rcap names."""
        ranges = self.ports.tag_ranges.get(name) if self.ports is not None else None
        if not ranges:
            return NO_PORTS
        return frozenset((r.proto, n, r.address or "") for r in ranges
                         for n in range(r.lo, r.hi + 1))

    def tag_withheld(self, name: str) -> set[Key]:
        """The port table keys slice `name`'s tag is not to grant it: the ports of its
        PLC rcap it lent or split off, and the ones it released (ReleasePort)."""
        if self.ports is None:
            return set()
        away = self.led.plc_ports(name) - self.led.effective_ports(name)
        try:
            keys = self.ports.table.expand(port_ranges(away)) if away else set()
        except PortError:
            keys = set()
        return keys | self._released.get(name, set())

    def port_released(self, name: str, keys: set[Key]) -> None:
        """ReleasePort gave up `keys`: they stay released until reserved again."""
        self._released.setdefault(name, set()).update(keys)
        self._save_released(name)

    def port_reserved(self, name: str, keys: set[Key]) -> None:
        got = self._released.get(name)
        if got and got & keys:
            got -= keys
            self._save_released(name)

    def _save_released(self, name: str) -> None:
        got = self._released.get(name)
        if got:
            self.state.set_meta(RELEASED_META + name, json.dumps(sorted(got)))
        else:
            self._released.pop(name, None)
            self.state.delete_meta(RELEASED_META + name)

    def check_port_grant(self, name: str, ranges: list[PortRange]) -> None:
        """PortNotGiven naming the port if slice `name` asks a port neither its `ports`
        tag nor its bound rcaps and loans give it (a port on every address needs it
        given on every address). The tag's ports in its PLC rcap count only while it
        has not lent or split them off."""
        given = self.led.effective_ports(name) | \
            (self._tag_keys(name) - self.led.plc_ports(name))
        for r in ranges:
            for n in range(r.lo, r.hi + 1):
                if (r.proto, n, "") in given or (r.address and (r.proto, n, r.address) in given):
                    continue
                raise PortNotGiven(f"{name}: {port_text((r.proto, n, r.address or ''))} is "
                                   "not among the ports its rspec (ports tag), bound rcaps "
                                   "and loans give it")

    def check_pool_ports(self, ports: Ports) -> None:
        """LedgerError naming the port if a port asked of the node's free pool is one the
        node never grants (below 1024, ephemeral, reserved for the host or held by a host
        service, F30) or one the port table gives a slice already."""
        if not ports or self.ports is None:
            return
        table, host = self.ports.table, self.ports.host
        for key in sorted(ports):
            proto, port, address = key
            what = port_text(key)
            if proto != "icmp" and port < FIRST_UNPRIVILEGED:
                raise LedgerError("port_refused", f"{what}: ports below "
                                  f"{FIRST_UNPRIVILEGED} are granted by PLC tag only", PORTS)
            try:
                keys = table.expand([PortRange(proto, port, port, address or None)])
            except PortError as exc:
                raise LedgerError("port_refused", f"{what}: {exc}", PORTS) from None
            for k in sorted(keys):
                owner = table.owner(*k)
                if owner is not None:
                    raise LedgerError("port_refused", f"{what}: {proto} port {port} on "
                                      f"{k[1]} is granted to slice {owner!r}", PORTS)
            held = host.held(proto, port) if host is not None else {}
            if held:
                raise LedgerError("port_refused", f"{what}: held by the host: {held[port]}",
                                  PORTS)

    def apply_ports(self, names: set[str] | None = None) -> None:
        """The port table made to give each live slice in `names` (None: every slice the
        ledger or the table has rcap ports for) what its rcaps and loans give, in one
        recorded change; ports taken from a slice are revoked (its sockets silenced)."""
        if self.ports is None:
            return
        table = self.ports.table
        have: dict[str, set[tuple[str, str, int]]] = {}
        for k, (owner, src) in table._owner.items():
            if src == "rcap":
                have.setdefault(owner, set()).add(k)
        if names is None:
            names = self.led.ported_slices() | set(have)
        else:
            names = set(names) & (self.led.ported_slices() | set(have))
        if not names:
            return
        records = self.state.slivers()
        wanted: dict[str, set[tuple[str, str, int]]] = {}
        unreserve: dict[str, set[tuple[str, str, int]]] = {}
        untag: dict[str, set[tuple[str, str, int]]] = {}
        for name in sorted(names):
            rec = records.get(name)
            live = rec is not None and rec.state in HAS_SLIVER
            ports = self.led.effective_ports(name) if live else frozenset()
            try:
                keys = table.expand(port_ranges(ports))
                tagged = table.expand(port_ranges(self.led.plc_ports(name))) \
                    if live else set()
            except PortError as exc:
                log.error("slice %s: rcap ports not granted: %s", name, exc)
                continue
            released = self._released.get(name)
            if released:      # stays released; forgotten once no longer given
                if not released <= keys:
                    released &= keys
                    self._save_released(name)
                keys -= released
            tag_now = table.keys_of(name, ("tag",))
            lose_tag = (tag_now & tagged) - keys   # tag ports lent or split off
            drop = table.keys_of(name, ("reserve",)) - keys
            if drop:   # reservations of ports no longer given (ReleasePort, ReservePort)
                try:
                    drop -= table.expand(port_ranges(frozenset(self._tag_keys(name))))
                except PortError:
                    pass
            if not drop and not lose_tag and have.get(name, set()) == keys - tag_now:
                continue
            wanted[name] = keys
            if drop:
                unreserve[name] = drop
            if lose_tag:
                untag[name] = lose_tag
        if not wanted:
            return
        try:
            self.ports.set_rcap_ports(wanted, unreserve, untag)
        except PortError as exc:
            log.error("rcap ports of %s not granted: %s", ", ".join(sorted(wanted)), exc)

    # -- what the reconciler asks -------------------------------------------------------------

    def effective_rspec(self, rec: SliverRecord) -> dict[str, Any]:
        """The sliver's rspec with the ledger's amounts (loans given and received, rcaps
        bound or split off); PLC's rspec unchanged when the ledger changes nothing."""
        if not self.led.adjusted(rec.name):
            return rec.rspec
        eff = dict(rec.rspec)
        eff.update(self.led.effective(rec.name))
        return eff

    def check_grant(self, name: str, rspec: Mapping[str, Any]) -> None:
        """GrantRefused naming the resource if `rspec` asks more than the rcaps bound to
        slice `name` and its loans give."""
        if name not in self.led.slices():
            raise GrantRefused("grant", f"{name}: no rcap is bound to this slice; nothing "
                               "may be granted to it")
        ent = self.led.effective(name)
        for k in RESOURCES:
            want = int(rspec.get(k, 0))
            if k in UNLIMITED_AT_ZERO and ent[k] == 0:
                continue
            if want > ent[k]:
                raise GrantRefused("grant", f"{name}: {k} {want} is beyond the {ent[k]} its "
                                   "bound rcaps and loans give", k)

    def sync(self) -> set[str]:
        """Before each reconcile plan: every sliver's PLC rcap minted from its rspec
        (made, changed), slivers gone or going end their loans and rcaps, expired
        loans end; then the targets of the slices whose amounts differ from PLC's."""
        touched = self.led.expire(self.clock())
        records = self.state.slivers()
        alive = {n for n, r in records.items() if r.state in HAS_SLIVER}
        for name in sorted(self.led.slices() - alive):
            touched |= self.led.sliver_gone(name) | {name}
        for name in sorted(alive):
            touched |= self.led.mint_plc(name, plc_amounts(records[name].rspec), self.clock(),
                                         self.tag_ports(name))
        for name in set(self._released) - alive:
            del self._released[name]
            self.state.delete_meta(RELEASED_META + name)
        store.flush(self.state, self.led)
        self.apply_ports()
        self._retarget({n for n in alive if n in touched or self.led.adjusted(n)}, records)
        return touched

    def _retarget(self, names: set[str], records: Mapping[str, SliverRecord] | None = None
                  ) -> list[str]:
        """New targets for slices `names`; the live ones whose target moved."""
        if self._target_of is None:
            return []
        changed = []
        for name in sorted(names):
            rec = records.get(name) if records is not None else self.state.get_sliver(name)
            if rec is None or rec.state not in HAS_SLIVER:
                continue
            target = self._target_of(self.effective_rspec(rec))
            if target != rec.target:
                self.state.set_target(name, target)
            if target != rec.applied:
                changed.append(name)
        return changed

    async def apply(self, names: set[str]) -> list[str]:
        """Written, then applied in place: an update of every live slice in `names`
        whose effective amounts moved. Returns the names whose update failed."""
        store.flush(self.state, self.led)
        self.apply_ports(names)      # recorded, then granted (revoked ones silenced)
        changed = self._retarget(names)
        if self.reconciler is None:
            return []
        from agent.reconcile import Action

        live = [n for n in changed if n in self.reconciler.adopted]
        if not live:
            return []
        outcome = await self.reconciler.execute(
            [Action("update", n, "rcaps or loans changed") for n in live])
        return [a.name for a, _ in outcome.failed]

    async def sliver_gone(self, name: str) -> None:
        """The reconciler destroyed sliver `name`: its loans and rcaps end, and the slices
        that lent to it or borrowed from it get their amounts back."""
        touched = self.led.sliver_gone(name)
        await self.apply(touched)

    # -- expiry -------------------------------------------------------------------------------

    def loan_changed(self) -> None:
        """A loan was made: the expiry task looks at its expiry."""
        self._wake.set()

    async def expire_now(self) -> set[str]:
        touched = self.led.expire(self.clock())
        if touched:
            log.info("loans expired: slices %s get their amounts back", ", ".join(sorted(touched)))
            await self.apply(touched)
        return touched

    async def serve(self) -> None:
        while True:
            nxt = self.led.next_expiry()
            wait = MAX_SLEEP if nxt is None else min(MAX_SLEEP, max(0.0, nxt - self.clock()))
            with trio.move_on_after(wait):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.expire_now()
            except Exception:  # noqa: BLE001 - boundary: the expiry task goes on
                log.exception("loan expiry failed")
