"""The node agent: one trio program, a nursery of named services.

Services: `poller` (GetSlivers every poll_interval + jitter, backoff while PLC fails),
`reconciler` (runs whenever the poller or the slice API pokes it), `sliceapi` (the Unix
socket). At start, before PLC is asked anything, running contexts are re-adopted and
every sliver the state says should run is brought up.

Cancellation: Ctrl-C or SIGTERM cancels the nursery; slivers keep running (they are
the node's, not the agent's), the state database is closed, the socket removed.
"""

from __future__ import annotations

import hashlib
import logging
import random
import resource
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from agent import getslivers, loginshell
from agent.accounts import Accounts
from agent.backend import Backend, KernelBackend
from agent.bwservice import BandwidthService
from agent.config import AgentConfig, ConfigError, read_node_key
from agent.guard import GuardService, state_uid_range
from agent.lockfile import PidLock
from agent.loginshell import install_for as install_login_shells
from agent.plcclient import PLCClient, PLCError
from agent.ports import HostPorts, PortError, fixed_host_ports, state_uid_owner
from agent.rcaps import RcapService, node_capacity
from agent.reconcile import Outcome, Reconciler, ingest
from agent.rspec import shown
from agent.sensorsource import make_sensor_server
from agent.sliceapi import SliceAPI
from agent.sliceapi.delegation import Management
from agent.state import SliverState, State
from agent.tasks import BackgroundTasks
from agent.tickets import TicketKeys
from sensors.nodeserver import NodeServer

log = logging.getLogger("agent")


@dataclass
class PollResult:
    ok: bool
    message: str
    outcome: Outcome | None = None
    removed: list[str] = field(default_factory=list)


def make_guard(cfg: AgentConfig, state: State) -> GuardService:
    """The seccomp guard and port table (agent/guard/), over this agent's uid pool."""
    addresses = [a.strip() for a in cfg.addresses.split(",") if a.strip()]
    host = HostPorts(state_uid_owner(state, cfg.uid_pool_start, cfg.uid_range_size),
                     fixed_host_ports(cfg.plc_url, [cfg.effective_hostname], addresses,
                                      sensors_port=cfg.sensors_at[1]))
    return GuardService(
        state, addresses, Path(cfg.run_dir), reserved_ports=cfg.reserved_ports,
        uid_range=state_uid_range(state, cfg.uid_pool_start, cfg.uid_range_size),
        host_ports=host, cgroup_parent=cfg.cgroup_parent,
        roots_dir=Path(cfg.state_dir) / "roots")


def make_management(cfg: AgentConfig, state: State, reconciler: Reconciler,
                    plc: PLCClient) -> Management:
    """Ticket, Create, Destroy, Start, Stop (agent/sliceapi/delegation.py), trusting
    agent.toml's plc_ticket_key or PLC's key fetched over the node session and pinned."""

    def node() -> tuple[int | None, str]:
        try:
            node_id: int | None = read_node_key(cfg)[0]
        except ConfigError:
            node_id = None
        reply = state.last_reply() or {}
        return (node_id or plc.node_id or reply.get("node_id") or None,
                cfg.effective_hostname)

    return Management(cfg, state, reconciler,
                      TicketKeys(cfg.plc_ticket_key, state, plc.get_ticket_key), node)


def build(cfg: AgentConfig, backend: Backend | None = None, plc: PLCClient | None = None,
          *, once: bool = False) -> Agent:
    """The composition root: every part of the agent, each built once with what it
    needs and never changed afterwards. `once` (`run --once`): no services run, so
    initscripts run inline and the guard takes no listeners (the inits keep theirs
    for the next long-running agent)."""
    state = State.open(cfg.state_dir)
    guard = make_guard(cfg, state) if cfg.guard else None
    if backend is None:
        backend = KernelBackend(Path(cfg.state_dir), Path(cfg.run_dir),
                                cgroup_parent=cfg.cgroup_parent,
                                cpu_headroom_pct=cfg.cpu_headroom_pct,
                                guard_filter=GuardService.filter() if guard else None,
                                node_headroom=(cfg.node_pids_headroom,
                                               cfg.node_mem_headroom << 20),
                                store_size_kib=cfg.disk_store_kib or None)
    if plc is None:
        plc = PLCClient(cfg.plc_url, cfg.state_dir, lambda: read_node_key(cfg),
                        ca_file=cfg.ca_file, timeout=cfg.plc_timeout,
                        hostname=cfg.effective_hostname)
    api_dir = Path(cfg.run_dir) / "api"
    api_dir.mkdir(parents=True, exist_ok=True)
    api_dir.chmod(0o755)
    background = None if once else BackgroundTasks()
    accounts = Accounts(cfg, state, backend, background=background)
    bandwidth = (BandwidthService(cfg.bandwidth, state.path, cfg.cgroup_parent,
                                  plc_bwlimit=getslivers.plc_bwlimit(state.last_reply()))
                 if cfg.bandwidth.interfaces else None)
    if bandwidth is not None and guard is not None:
        # RawSend packets leave from the agent's socket: billed to the slice's class.
        guard.raw.priority_of = bandwidth.priority_of

    rcaps = RcapService(state, node_capacity(cfg.state_dir, cfg.disk_store_kib,
                                             (cfg.bandwidth.node_rate or
                                              cfg.bandwidth.link_rate) // 1000),
                        background=background)
    if guard is not None:   # ports given by rcaps and loans; ReservePort checked
        rcaps.attach_ports(guard.ports)
    tools = loginshell.install_sliver_tools(Path(cfg.run_dir))
    tool_bind = ((str(tools), loginshell.SLIVER_TOOLS_DIR),) if tools is not None else ()

    def binds(name: str) -> tuple[tuple[str, str], ...]:
        return ((str(api_dir), cfg.sliver_socket_dir), *tool_bind)

    reconciler = Reconciler(
        state, backend, concurrency=cfg.concurrency,
        uid_pool_start=cfg.uid_pool_start, uid_range_size=cfg.uid_range_size,
        uid_pool_ranges=cfg.uid_pool_ranges, binds=binds,
        after_start=accounts.after_start, before_destroy=accounts.before_destroy,
        before_stop=accounts.before_stop, new_context=accounts.new_context,
        guard=guard, supervising=guard is not None and not once, bandwidth=bandwidth,
        rcaps=rcaps)
    api = SliceAPI(cfg, state, reconciler, backend, api_dir,
                   guard.methods() if guard is not None else {}, bandwidth=bandwidth,
                   management=make_management(cfg, state, reconciler, plc), rcaps=rcaps)
    sensors = None if once else make_sensor_server(   # docs/sensors.md
        state, cgroup_parent=cfg.cgroup_parent, roots_dir=Path(cfg.state_dir) / "roots",
        bandwidth=bandwidth, interfaces=cfg.bandwidth.interfaces,
        address=next((a.strip() for a in cfg.addresses.split(",") if a.strip()), ""))
    return Agent(cfg, state, backend, plc, accounts, guard, reconciler, api, background,
                 once=once, bandwidth=bandwidth, sensors=sensors)


class Agent:
    """The agent's services over the parts `build` made; `run` is the long-lived
    program (or one cycle, if built `once`)."""

    def __init__(self, cfg: AgentConfig, state: State, backend: Backend, plc: PLCClient,
                 accounts: Accounts, guard: GuardService | None, reconciler: Reconciler,
                 api: SliceAPI, background: BackgroundTasks | None, *,
                 once: bool, bandwidth: BandwidthService | None = None,
                 sensors: NodeServer | None = None) -> None:
        self.cfg = cfg
        self.state = state
        self.backend = backend
        self.plc = plc
        self.accounts = accounts
        self.guard = guard
        self.reconciler = reconciler
        self.api = api
        self.background = background
        self.once = once
        self.bandwidth = bandwidth
        self.sensors = sensors
        self._ports_applied: dict[str, str] = {}
        self._reconcile_lock = trio.Lock()
        # The settings a reply is ingested under: a change of them (agent.toml edited,
        # agent restarted) makes an unchanged reply be ingested again.
        self._settings_digest = hashlib.sha256(repr((
            cfg.default_image, cfg.slice_prefix, cfg.node_accounts,
            cfg.sliver_defaults)).encode()).hexdigest()[:16]
        self._poke_send, self._poke_recv = trio.open_memory_channel[str](1)
        self.failures = 0
        self.last_poll_ok: float | None = None

    def apply_port_tags(self) -> None:
        """Every sliver's `ports` tag into the port table (recorded before it binds)."""
        if self.guard is None:
            return
        records = self.state.slivers()
        for name in set(self._ports_applied) - set(records):
            del self._ports_applied[name]
        for name, rec in records.items():
            if rec.state == SliverState.DESTROYING:
                continue
            value = rec.spec.get("attributes", {}).get("ports", "")
            if self._ports_applied.get(name) == value:
                continue   # each change saves the whole table: only what changed
            rcaps = self.reconciler.rcaps
            try:   # less its tag ports it lent, split off or released (agent/rcaps)
                self.guard.set_tag_ports(name, value, rcaps.tag_withheld(name)
                                         if rcaps is not None else frozenset())
                self._ports_applied[name] = value
                skipped = self.guard.ports.host.skipped.get(name) if self.guard.ports.host else None
                self.state.set_meta(f"ports_skipped:{name}", "; ".join(skipped or ()))  # F30
            except PortError as exc:   # PortConflict is a PortError
                log.error("sliver %s: ports tag %s refused: %s", name, shown(value), exc)

    def close(self) -> None:
        if self.bandwidth is not None:
            self.bandwidth.close()
        self.state.close()

    # -- one cycle ----------------------------------------------------------------------

    async def bring_up_from_state(self) -> Outcome:
        """Adopt running contexts and bring up what the state says should run; removes
        nothing (PLC has not been asked yet)."""
        async with self._reconcile_lock:
            self.apply_port_tags()
            if self.bandwidth is not None:   # the HTB trees adopted before any sliver
                rspecs = {name: rec.rspec for name, rec in self.state.slivers().items()
                          if rec.state not in ("destroying", "controller")}
                await trio.to_thread.run_sync(self.bandwidth.start, rspecs)
            outcome = await self.reconciler.reconcile(removed=[], have_reply=False)
            await self.accounts.sync(None)
            return outcome

    async def poll_once(self) -> PollResult:
        """One GetSlivers and, if the reply is good, one reconcile."""
        try:
            node_id: int | None = read_node_key(self.cfg)[0] or self.plc.node_id
            raw = await self.plc.get_slivers_raw()
            node_id = node_id or self.plc.node_id
        except (PLCError, ConfigError) as exc:
            self.state.set_meta("last_poll_error", str(exc))
            return PollResult(False, str(exc))
        return await self.apply_raw(raw, node_id)

    async def apply_raw(self, raw: bytes, node_id: int | None) -> PollResult:
        """Validate a raw GetSlivers reply and reconcile to it. A reply identical to the
        last good one but for its timestamp is not decoded again (see raw_digest)."""
        now, skew = time.time(), self.cfg.plc_clock_skew
        last_ts = getslivers.last_applied(self.state.get_meta("last_timestamp"), now, skew)
        digest = getslivers.raw_digest(raw)
        if digest is not None and getslivers.future_timestamp(digest[0], now, skew):
            return self._stale(digest[0], last_ts, getslivers.future_timestamp(digest[0], now, skew))
        if digest is not None:   # the same reply under other settings is another input
            digest = (digest[0], f"{digest[1]}:{self._settings_digest}")
        if digest is not None and digest[1] == self.state.get_meta("last_digest"):
            if digest[0] < last_ts:
                return self._stale(digest[0], last_ts)
            async with self._reconcile_lock:
                self._mark_good(digest[0], None)
                outcome = await self.reconciler.reconcile(removed=[], have_reply=True)
                await self.accounts.sync_pending()
            self.last_poll_ok = time.time()
            return PollResult(True, "ok (unchanged)", outcome)
        try:
            reply = getslivers.decode(raw)
            desired = getslivers.parse(reply, expected_node_id=node_id)
        except getslivers.InvalidReply as exc:
            log.error("%s; keeping the last known state", exc)
            self.state.set_meta("last_poll_error", str(exc))
            return PollResult(False, str(exc))
        if desired.timestamp < last_ts or getslivers.future_timestamp(desired.timestamp, now, skew):
            return self._stale(desired.timestamp, last_ts,
                               getslivers.future_timestamp(desired.timestamp, now, skew))
        async with self._reconcile_lock:
            self.state.save_reply(reply)
            removed = ingest(self.state, desired, self.cfg.default_image,
                             self.cfg.slice_prefix, time.time(), self.cfg.sliver_defaults)
            # Only now: a reply whose ingest failed must be decoded again next time.
            self._mark_good(desired.timestamp, digest[1] if digest else "")
            self.apply_port_tags()
            if self.bandwidth is not None:   # PLC's bwlimit is the cap unless node_rate
                await trio.to_thread.run_sync(self.bandwidth.set_plc_bwlimit,
                                              getslivers.plc_bwlimit(reply))
            outcome = await self.reconciler.reconcile(removed=removed, have_reply=True)
            await self.accounts.sync(desired)
            await self.accounts.sync_initscripts()
        self.last_poll_ok = time.time()
        return PollResult(True, "ok", outcome, removed)

    def _stale(self, ts: int, last_ts: int, why: str | None = None) -> PollResult:
        msg = why or f"GetSlivers reply timestamp {ts} is older than the last applied {last_ts}; ignored"
        log.warning(msg)
        self.state.set_meta("last_poll_error", msg)
        return PollResult(False, msg)

    def _mark_good(self, ts: int, digest: str | None) -> None:
        with self.state.transaction():
            self.state.set_meta("last_timestamp", str(ts))
            self.state.set_meta("last_poll_ok", repr(time.time()))
            self.state.set_meta("last_poll_error", "")
            if digest is not None:
                self.state.set_meta("last_digest", digest)

    async def reconcile_now(self) -> Outcome:
        """A local reconcile from the state alone: brings back slivers that died, finishes
        pending removals. It never expires a sliver: expiry is applied by the reconcile
        of a good poll only, so that a PLC outage freezes the node's state (plcapi §9) and
        a slice renewed at PLC meanwhile keeps its sliver."""
        async with self._reconcile_lock:
            return await self.reconciler.reconcile(removed=[], have_reply=False)

    async def reconciler_service(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.cfg.reconcile_interval)
            try:
                outcome = await self.reconcile_now()
                await self.accounts.sync_pending()
                if outcome.done or outcome.failed:
                    log.info("local reconcile: %d done, %d failed", len(outcome.done),
                             len(outcome.failed))
            except Exception:  # noqa: BLE001 - boundary: the reconciler must go on
                log.exception("local reconcile failed")

    async def _poll_on_sigusr1(self) -> None:
        """SIGUSR1: poll PLC now (an operator who just changed something at PLC)."""
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            async for _ in signals:
                log.info("SIGUSR1: polling PLC now")
                self.poke()

    def poke(self) -> None:
        """Ask the poller for an early poll (used by the slice API); never blocks."""
        try:
            self._poke_send.send_nowait("poke")
        except trio.WouldBlock:
            pass

    # -- services --------------------------------------------------------------------

    def next_wait(self) -> float:
        if self.failures:
            return min(float(self.cfg.backoff_max), 5.0 * 2 ** (self.failures - 1)) * (
                0.5 + random.random() / 2)
        return self.cfg.poll_interval + random.uniform(0, self.cfg.poll_jitter)

    async def poller(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                result = await self.poll_once()
            except Exception as exc:  # noqa: BLE001 - boundary: the poller must go on
                log.exception("poll cycle failed")
                result = PollResult(False, f"internal error: {type(exc).__name__}: {exc}")
            if result.ok:
                if self.failures:
                    log.info("poll recovered after %d failed in a row: %s", self.failures,
                             result.message)
                self.failures = 0
            else:
                self.failures += 1
                log.warning("poll failed (%d in a row): %s", self.failures, result.message)
            # Last: `poll --wait` returns on this mark, and the log above must be there
            # for whoever reads it then.
            self.state.set_meta("last_poll_at", repr(time.time()))
            with trio.move_on_after(self.next_wait()):
                await self._poke_recv.receive()

    async def _start_sensors(self, nursery: trio.Nursery) -> None:
        """The node sensor server on `[sensors] listen`. A port it cannot take (another
        program holds it) is logged and leaves the agent running without it: monitoring
        never stops the node from serving its slices."""
        assert self.sensors is not None
        host, port = self.cfg.sensors_at
        try:
            await nursery.start(self.sensors.serve, host, port, name="sensors")
        except OSError as exc:
            log.error("sensors: cannot listen on %s port %d (%s); running without the "
                      "node sensor server", host, port, exc.strerror or exc)
            self.state.set_meta("sensors_error", f"listen {host}:{port}: {exc}")
            return
        self.state.set_meta("sensors_error", "")
        log.info("sensors: node sensor server on %s port %d", host, port)

    async def run(self, *, ready: Callable[[], Awaitable[None]] | None = None) -> int:
        """The program. Built `once`: bring up from state, poll once, exit (1 if it
        failed). Guarded syscalls of the slivers wait while no agent supervises them."""
        if self.once:
            await self.bring_up_from_state()
            result = await self.poll_once()
            if not result.ok:
                log.error("poll failed: %s", result.message)
            return 0 if result.ok else 1
        async with trio.open_nursery() as nursery:
            if self.background is not None:   # initscripts run in the background
                await nursery.start(self.background.serve, name="background")
            if self.guard is not None:
                # Takes the listeners of adopted slivers (bring_up_from_state) and of
                # every later creation.
                await nursery.start(self.guard.serve, name="guard")
            outcome = await self.bring_up_from_state()
            log.info("slivers adopted: %d%s; brought up: %d; failed: %d",
                     len(self.reconciler.adopted),
                     f" ({', '.join(sorted(self.reconciler.adopted)[:20])})"
                     if self.reconciler.adopted else "",
                     sum(1 for a in outcome.done if a.kind in ("create", "start")),
                     len(outcome.failed))
            await nursery.start(self.api.serve, name="sliceapi")
            await nursery.start(self.poller, name="poller")
            await nursery.start(self.reconciler_service, name="reconciler")
            if self.bandwidth is not None:
                await nursery.start(self.bandwidth.serve, name="bandwidth")
            if self.sensors is not None:
                await self._start_sensors(nursery)
            nursery.start_soon(_stop_on_signals, nursery.cancel_scope, name="signals")
            nursery.start_soon(self._poll_on_sigusr1, name="sigusr1")
            if ready is not None:
                await ready()
        return 0


async def _stop_on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %s: stopping the agent (slivers keep running)",
                     signal.Signals(signum).name)
            scope.cancel()
            return


def raise_nofile() -> None:
    """The agent holds fds for every sliver (listeners, pidfds, sockets): take the hard
    limit of open files as the soft one [F4]."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: The agent's own oom_score_adj: the OOM killer takes slivers (500) first (F34).
AGENT_OOM_SCORE_ADJ = -900


def protect_from_oom(value: int = AGENT_OOM_SCORE_ADJ) -> bool:
    """Lower this process's oom_score_adj; False (logged) where the kernel refuses it
    (lowering needs CAP_SYS_RESOURCE, which root lacks in some containers and VMs)."""
    try:
        Path("/proc/self/oom_score_adj").write_text(str(value))
        return True
    except OSError as exc:
        log.warning("oom_score_adj %d not set (%s): slivers' 500 still puts them first",
                    value, exc.strerror)
        return False


def startup_line(cfg: AgentConfig, once: bool) -> str:
    """The first line of every agent's log: what runs, over what, against whom."""
    from planetlab.version import version

    return (f"planetlab-agent {version()} starting{' (--once)' if once else ''}: "
            f"config {cfg.source}, state {cfg.state_dir}, run {cfg.run_dir}, "
            f"PLC {cfg.plc_url}, cgroup parent {cfg.cgroup_parent}")


def run_agent(cfg: AgentConfig, once: bool = False) -> int:
    """The agent process: its lock first (a second agent on the same state or run
    directory stops here, having changed nothing), then everything else."""
    lock = PidLock(cfg.state_dir, cfg.run_dir).acquire()
    try:
        log.info("%s", startup_line(cfg, once))
        raise_nofile()
        protect_from_oom()
        install_login_shells(cfg)
        agent = build(cfg, once=once)
        try:
            return trio.run(agent.run)
        finally:
            agent.close()
    finally:
        lock.release()
