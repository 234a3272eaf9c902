"""Desired (PLC) against actual (state + kernel) -> a plan -> idempotent actions.

`ingest` turns a validated GetSlivers reply into sliver records in the agent's state
(recorded before anything is granted). `plan` is pure: from the records, the set of
live contexts and the time, it lists what to do. `Reconciler.execute` runs the plan
with bounded concurrency; each sliver's actions run under its own lock and one failure
is recorded on that sliver only.

Safety rules (nodemanager spec §1.5, §9):
- only a good full reply removes slivers; an empty or failed poll removes nothing,
  and an empty state is never read as "destroy everything";
- a reply older than the last applied one is ignored (timestamp rule);
- expiry is checked against the sliver's `expires` only while the agent holds a
  reply, and a sliver that PLC no longer lists is destroyed only on a good reply.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from agent import rspec as rspec_mod
from agent.backend import Backend, MissingImage, SliverPlan
from agent.getslivers import Desired, SliverSpec
from agent.state import (
    EXPIRED,
    HAS_SLIVER,
    WHEN_GONE,
    WHEN_LIVE,
    SliverRecord,
    SliverState,
    State,
    Summary,
)

log = logging.getLogger("agent.reconcile")

CREATED_BY_SYNC = ("plc-instantiated", "nm-controller")

# Short names for the sliver states (agent.state.SliverState owns them). A controller
# slice (instantiation nm-controller) has no sliver on a node, only a host account
# whose login shell forwards API calls to the agent (nodemanager spec 2.1-2.2).
PENDING, CREATING, RUNNING, STOPPED = (SliverState.PENDING, SliverState.CREATING,
                                       SliverState.RUNNING, SliverState.STOPPED)
FAILED, DESTROYING, CONTROLLER = (SliverState.FAILED, SliverState.DESTROYING,
                                  SliverState.CONTROLLER)


@dataclass(frozen=True)
class Action:
    kind: str      # create | adopt | update | start | stop | destroy | stop_context
    name: str
    reason: str = ""


@dataclass
class Outcome:
    done: list[Action] = field(default_factory=list)
    failed: list[tuple[Action, str]] = field(default_factory=list)


def target_of(rspec: Mapping[str, Any]) -> str:
    # net_* (HTB classes, agent/bwservice.py): a change is an update, made in place.
    net = {k: v for k, v in rspec.items() if k.startswith("net_")}
    return json.dumps({"limits": rspec_mod.limits_kwargs(rspec),
                       "disk_max": rspec_mod.disk_max_kib(rspec), "net": net}, sort_keys=True)


def ingest(state: State, desired: Desired, default_image: str, slice_prefix: str,
           now: float, node_defaults: Mapping[str, Any] | None = None) -> list[str]:
    """Write what PLC wants into the sliver records; returns the names PLC no longer wants.

    Delegated slivers are only refreshed when they already exist (the API creates
    them); not-instantiated ones are not wanted.
    """
    for name, why in desired.skipped.items():
        log.warning("GetSlivers: sliver %r skipped: %s", name, why)
    overrides = {}
    default_slice = desired.slivers.get(f"{slice_prefix}_default")
    if default_slice is not None:
        overrides = default_slice.attributes
    records = state.slivers()
    wanted: set[str] = set()
    with state.transaction():
        for name, spec in desired.slivers.items():
            if name == f"{slice_prefix}_default":
                continue
            existing = records.get(name)
            if spec.instantiation not in CREATED_BY_SYNC and not (
                    spec.instantiation == "delegated" and existing is not None):
                continue
            wanted.add(name)
            rec = _record_from_spec(spec, overrides, desired.initscripts, default_image,
                                    existing, now, node_defaults)
            if existing is None or _differs(existing, rec):
                state.put_sliver(rec)
    removed = sorted(set(records) - wanted)
    if removed:
        state.mark_removed(removed, "no longer listed by PLC")
    return removed


def admit(state: State, spec: SliverSpec, initscripts: Mapping[str, str], default_image: str,
          now: float, node_defaults: Mapping[str, Any] | None = None,
          overrides: Mapping[str, str] | None = None) -> SliverRecord:
    """Write the record of one delegated sliver that a ticket or a delegate's Create
    instantiates: the record `ingest` would write for it (the caller holds the
    transaction). The reconciler then makes it like any other."""
    existing = state.get_sliver(spec.name)
    rec = _record_from_spec(spec, overrides or {}, initscripts, default_image, existing, now,
                            node_defaults)
    if existing is None or _differs(existing, rec):
        state.put_sliver(rec)
    return rec


def _record_from_spec(spec: SliverSpec, overrides: Mapping[str, str],
                      initscripts: Mapping[str, str], default_image: str,
                      existing: SliverRecord | None, now: float,
                      node_defaults: Mapping[str, Any] | None = None) -> SliverRecord:
    resolved = rspec_mod.resolve(spec.attributes, overrides, node_defaults)
    wire = spec.to_wire()
    wire["initscript"] = rspec_mod.initscript_of(spec.attributes, initscripts)
    image = rspec_mod.image_of(spec.attributes, default_image)
    problems = [*resolved.problems, *spec.problems]
    # A sliver keeps the image its root was made from (a pending one, never made, follows
    # its vref): re-imaging is not done in place.
    if existing is not None and existing.state != PENDING and existing.image:
        if image != existing.image:
            problems.append(f"vref asks for image {image!r}; this sliver keeps "
                            f"{existing.image!r} until it is re-created (remove the slice "
                            "from this node, then add it again)")
        image = existing.image
    return SliverRecord(
        name=spec.name, slice_id=spec.slice_id, instantiation=spec.instantiation,
        expires=spec.expires, image=image,
        spec=wire, rspec=resolved.rspec, problems=problems,
        state=CONTROLLER if spec.instantiation == "nm-controller" else
        existing.state if existing and existing.state != CONTROLLER else PENDING,
        message=existing.message if existing else "",
        want_running=bool(resolved.rspec["enabled"]),
        applied=existing.applied if existing else "",
        created_at=existing.created_at if existing else now, updated_at=now,
        target=target_of(resolved.rspec),
    )


def _differs(a: SliverRecord, b: SliverRecord) -> bool:
    return (a.spec != b.spec or a.rspec != b.rspec or a.expires != b.expires
            or a.image != b.image or a.want_running != b.want_running
            or a.problems != b.problems or a.slice_id != b.slice_id
            or a.instantiation != b.instantiation or a.target != b.target)


def plan(records: Mapping[str, Summary], live: set[str], adopted: set[str],
         removed: list[str], now: float, have_reply: bool) -> list[Action]:
    """Pure: the actions that bring the node to the records.

    `live` are the running contexts found on the node, `adopted` those this agent holds.
    `removed` are records PLC no longer lists (only given for a good full reply); records
    already marked "destroying" (a decision taken from an earlier good reply) are
    destroyed too, even while PLC is unreachable.
    """
    actions: list[Action] = []
    for name in removed:
        actions.append(Action("destroy", name, "no longer listed by PLC"))
    gone = set(removed)
    for name, rec in records.items():
        if name in gone:
            continue
        state = SliverState(rec.state)
        is_live = name in live
        step = WHEN_LIVE[state, rec.want_running] if is_live else WHEN_GONE[state]
        if have_reply and rec.expires < now and step.kind != "destroy":
            step = EXPIRED
        if is_live and state in HAS_SLIVER and step.kind != "destroy":
            if name not in adopted:
                actions.append(Action("adopt", name, "running context found"))
            if rec.applied != rec.target:
                actions.append(Action("update", name, "resource spec changed"))
        if step.kind is not None:
            actions.append(Action(step.kind, name, step.why(state)))
    return _dedupe(actions)


def _dedupe(actions: list[Action]) -> list[Action]:
    seen: set[tuple[str, str]] = set()
    out = []
    for a in actions:
        if (a.kind, a.name) not in seen:
            seen.add((a.kind, a.name))
            out.append(a)
    return out


class Reconciler:
    """Executes plans against a backend, recording each step in the state first."""

    def __init__(self, state: State, backend: Backend, *, concurrency: int,
                 uid_pool_start: int, uid_range_size: int, uid_pool_ranges: int,
                 binds: Callable[[str], tuple[tuple[str, str], ...]] = lambda name: (),
                 after_start: Callable[[str], Any] | None = None,
                 before_destroy: Callable[[str], Any] | None = None,
                 before_stop: Callable[[str], Any] | None = None,
                 new_context: Callable[[str], None] | None = None,
                 guard: Any = None, supervising: bool = False,
                 bandwidth: Any = None, rcaps: Any = None) -> None:
        self.state = state
        self.backend = backend
        self.limiter = trio.CapacityLimiter(concurrency)
        self.uid_pool_start = uid_pool_start
        self.uid_range_size = uid_range_size
        self.uid_pool_ranges = uid_pool_ranges
        self.adopted: set[str] = set()
        self._locks: dict[str, trio.Lock] = {}
        self._binds = binds
        self._after_start = after_start
        self._before_destroy = before_destroy
        self._before_stop = before_stop
        self._new_context = new_context or (lambda name: None)
        self.guard = guard   # agent.guard.GuardService, or None
        # True when the guard's service runs and takes listeners (not in `run --once`:
        # then the inits keep theirs for the next long-running agent).
        self.supervising = supervising
        # agent.bwservice.BandwidthService, or None (no [bandwidth] interfaces).
        self.bandwidth = bandwidth
        # agent.rcaps.RcapService, or None: the amounts a sliver is granted (its PLC
        # rspec as an rcap bound to it, after loans), checked before each grant.
        self.rcaps = rcaps
        if rcaps is not None:
            rcaps.attach(self)

    def rspec_of(self, rec: SliverRecord) -> dict[str, Any]:
        """What is granted to the sliver: its rspec after the rcap ledger, checked."""
        if self.rcaps is None:
            return rec.rspec
        rspec = self.rcaps.effective_rspec(rec)
        self.rcaps.check_grant(rec.name, rspec)
        return rspec

    def sync_grants(self) -> None:
        """Before any plan (a poll's, or one sliver's from the slice API): every record's
        rspec as PLC's rcap bound to its sliver, expired loans ended (agent.rcaps)."""
        if self.rcaps is not None:
            self.rcaps.sync()

    def lock(self, name: str) -> trio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = trio.Lock()
        return lock

    async def live(self) -> set[str]:
        return await trio.to_thread.run_sync(self.backend.live)

    async def reconcile(self, removed: list[str], have_reply: bool,
                        now: float | None = None) -> Outcome:
        live = await self.live()
        await self._claim_live_ranges(live)
        # Contexts this agent has not adopted yet (after a restart) are adopted first,
        # so nothing is created twice.
        self.adopted &= live
        self.sync_grants()
        actions = plan(self.state.summaries(), live, self.adopted, removed,
                       time.time() if now is None else now, have_reply)
        return await self.execute(actions)

    async def _claim_live_ranges(self, live: set[str]) -> None:
        """Record the uid range of every running context the state does not know (a
        state database lost or replaced): its sliver is adopted with its range, and no
        new sliver is given uids a running one uses."""
        known = self.state.uid_ranges()
        for name in sorted(live - set(known)):
            base = await trio.to_thread.run_sync(self.backend.uid_base_of, name)
            if base is None:
                continue
            idx, rem = divmod(base - self.uid_pool_start, self.uid_range_size)
            if rem or not 0 <= idx < self.uid_pool_ranges:
                log.error("sliver %s: runs with uids from %d, outside this agent's pool; "
                          "its range cannot be reserved", name, base)
                continue
            holder = self.state.claim_uid_range(name, idx)
            if holder is not None:
                log.error("sliver %s: runs with the uid range of %s (index %d)", name, holder,
                          idx)
            else:
                log.warning("sliver %s: running with uid range %d, which the state did not "
                            "record; recorded", name, idx)

    async def execute(self, actions: list[Action]) -> Outcome:
        outcome = Outcome()
        by_name: dict[str, list[Action]] = {}
        for a in actions:
            by_name.setdefault(a.name, []).append(a)
        async with trio.open_nursery() as nursery:
            for name, acts in by_name.items():
                nursery.start_soon(self._run_sliver, name, acts, outcome)
        return outcome

    async def _run_sliver(self, name: str, actions: list[Action], outcome: Outcome) -> None:
        try:
            await self._run_sliver_locked(name, actions, outcome)
        finally:
            lock = self._locks.get(name)
            if lock is not None and not lock.locked() and \
                    lock.statistics().tasks_waiting == 0 and self.state.get_sliver(name) is None:
                del self._locks[name]   # a destroyed sliver's lock goes with it

    async def _run_sliver_locked(self, name: str, actions: list[Action],
                                 outcome: Outcome) -> None:
        async with self.lock(name), self.limiter:
            for action in actions:
                try:
                    await self._do(action)
                except trio.Cancelled:
                    raise
                except Exception as exc:  # noqa: BLE001 - boundary: one sliver's failure
                    message = _describe(action, exc)
                    log.error("sliver %s: %s", name, message)
                    outcome.failed.append((action, message))
                    if self.state.get_sliver(name) is not None:
                        state = PENDING if isinstance(exc, MissingImage) else FAILED
                        if action.kind == "destroy":
                            state = DESTROYING   # retried by the next reconcile
                        self.state.set_sliver_state(name, state, message)
                    return
                outcome.done.append(action)
                log.info("sliver %s: %s done (%s)", name, action.kind, action.reason)

    async def _net_class(self, rec: SliverRecord) -> int | None:
        """The sliver's HTB classes made or changed in place (before its cgroup is);
        the class minor its cgroup's egress classifier names."""
        if self.bandwidth is None:
            return None
        return await trio.to_thread.run_sync(self.bandwidth.class_for, rec.name,
                                             self.rspec_of(rec))

    async def _net_release(self, name: str) -> None:
        if self.bandwidth is not None:
            await trio.to_thread.run_sync(self.bandwidth.released, name)

    def _plan_for(self, rec: SliverRecord, idx: int,
                  net_class_minor: int | None = None) -> SliverPlan:
        rspec = self.rspec_of(rec)
        limits = rspec_mod.limits_kwargs(rspec)
        if net_class_minor is not None:
            limits["net_class_minor"] = net_class_minor
        return SliverPlan(
            name=rec.name, image=rec.image,
            uid_base=self.uid_pool_start + idx * self.uid_range_size,
            uid_count=self.uid_range_size, limits=limits,
            disk_max_kib=rspec_mod.disk_max_kib(rspec), hostname=rec.name,
            binds=self._binds(rec.name),
        )

    def _guard_new_context(self, name: str, agent_end: Any) -> None:
        """Hand a new context's seccomp listener to the guard (or drop it: no guard)."""
        if self.guard is not None and self.supervising:
            self.guard.sliver_created(name, agent_end)
        else:
            agent_end.close()

    async def _do(self, action: Action) -> None:
        name = action.name
        rec = self.state.get_sliver(name)
        if action.kind == "destroy":
            if rec is not None:
                self.state.set_sliver_state(name, DESTROYING, action.reason)
            if self._before_destroy is not None:
                await self._before_destroy(name)
            await trio.to_thread.run_sync(self.backend.destroy, name)
            await self._net_release(name)
            if self.guard is not None:
                self.guard.sliver_destroyed(name)
            self.adopted.discard(name)
            self.state.delete_sliver(name)
            if self.rcaps is not None:   # its loans and rcaps end; the others' come back
                await self.rcaps.sliver_gone(name)
            return
        if rec is None:
            return
        if name in self.state.held():   # Stop holds across a re-creation too
            rec = dataclasses.replace(rec, want_running=False)
        if action.kind == "stop_context":   # the record stays (a controller's)
            if self._before_stop is not None:
                await self._before_stop(name)
            await trio.to_thread.run_sync(self.backend.destroy, name)
            await self._net_release(name)
            self._new_context(name)   # forget its initscript's runs
            self.state.set_held(name, False)
            if self.guard is not None:
                self.guard.sliver_destroyed(name)
            self.adopted.discard(name)
            self.state.release_uid_range(name)
            return
        if action.kind == "adopt":
            if await trio.to_thread.run_sync(self.backend.adopt, name):
                self.adopted.add(name)
                if self.bandwidth is not None:   # classes adopted, classifier re-attached
                    await trio.to_thread.run_sync(self.bandwidth.adopted, name,
                                                  self.rspec_of(rec))
                if self.guard is not None and self.supervising:
                    pid = await trio.to_thread.run_sync(self.backend.guarded_init, name)
                    if pid is not None:
                        # Its syscalls waited for us; the init kept the listener.
                        self.guard.sliver_adopted(name, pid)
                    else:
                        log.warning("sliver %s: runs without the guard (made so); its "
                                    "binds are not checked until it is re-created", name)
            return
        if action.kind == "create":
            if not await trio.to_thread.run_sync(self.backend.image_exists, rec.image):
                raise MissingImage(rec.image)
            # Recorded before granted: the uid range and the "creating" state first.
            idx = self.state.allocate_uid_range(name, self.uid_pool_ranges)
            try:
                self.state.set_sliver_state(name, CREATING, "")
                self._new_context(name)
                minor = await self._net_class(rec)
                # The plan saw no live context of this name (a stale one is cleared by
                # create).
                agent_end = await trio.to_thread.run_sync(self.backend.create,
                                                          self._plan_for(rec, idx, minor))
            except BaseException:
                # Nothing was made (the backend undoes its own part): the range goes
                # back to the pool, so a failed creation never holds uids; a retry
                # allocates again.
                self.state.release_uid_range(name)
                raise
            if agent_end is not None:
                self._guard_new_context(name, agent_end)
            self.adopted.add(name)
            if not rec.want_running:
                await trio.to_thread.run_sync(self.backend.stop, name)
                self.state.set_sliver_state(name, STOPPED, "disabled (enabled=0)",
                                            applied=rec.target)
                return
            self.state.set_sliver_state(name, RUNNING, "", applied=rec.target)
            if self._after_start is not None:
                await self._after_start(name)
            return
        idx_or_none = self.state.uid_range_of(name)
        if idx_or_none is None:
            raise RuntimeError("no uid range recorded for a live sliver")
        if action.kind == "update":
            plan = self._plan_for(rec, idx_or_none, await self._net_class(rec))
            if self._before_stop is not None and rec.state == RUNNING and \
                    await trio.to_thread.run_sync(self.backend.needs_restart, plan):
                await self._before_stop(name)   # its processes are about to end
            agent_end = await trio.to_thread.run_sync(self.backend.update, plan)
            state = rec.state if rec.state in (RUNNING, STOPPED) else (
                RUNNING if rec.want_running else STOPPED)
            self.state.set_sliver_state(name, state, "", applied=rec.target)
            if agent_end is not None:   # restarted in a new context (rlimits, caps)
                self._new_context(name)
                self._guard_new_context(name, agent_end)
                if state == RUNNING and self._after_start is not None:
                    await self._after_start(name)
        elif action.kind == "start":
            await trio.to_thread.run_sync(self.backend.start, name)
            self.state.set_sliver_state(name, RUNNING, "")
            if self._after_start is not None:   # a sliver made stopped: its first start
                await self._after_start(name)
        elif action.kind == "stop":
            if self._before_stop is not None:
                await self._before_stop(name)
            await trio.to_thread.run_sync(self.backend.stop, name)
            self.state.set_sliver_state(name, STOPPED, action.reason)


def _describe(action: Action, exc: Exception) -> str:
    if isinstance(exc, MissingImage):
        return (f"image {exc.args[0]!r} is not on this node; import it with "
                f"`planetlab-agent image import {exc.args[0]} DIR`")
    return f"{action.kind} failed: {type(exc).__name__}: {exc}"
