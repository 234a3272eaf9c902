"""Slice initscripts: a service of their own.

The slice's initscript (nodemanager spec §2.8: `initscript_code`, or the named entry of
GetSlivers `initscripts`) is written to /etc/planetlab/initscript in the sliver and run
there as `initscript start|restart|stop SLICE`. The agent records, per sliver, the
digest of the script it last ran in the current context (meta `initscript_ran:NAME`,
cleared when a context is made): a new context runs `start` once it runs, a changed
script on a running sliver runs `restart`, a sliver about to be frozen or destroyed
runs `stop` first. In the long-running agent scripts run in the background
(INITSCRIPT_SLOTS at a time, up to INITSCRIPT_TIMEOUT each), never holding a sliver's
lock; `run --once` runs them inline, up to ONCE_TIMEOUT.

Each run carries a generation number: a newer script, a new context, a stop or a
destroy bumps the sliver's, and a queued run of an older generation is skipped.
"""

from __future__ import annotations

import hashlib
import logging

import trio

from agent.backend import Backend, split_dropped
from agent.config import AgentConfig
from agent.rootfiles import remove_in_root, write_in_root
from agent.state import SliverState, State
from agent.tasks import BackgroundTasks

log = logging.getLogger("agent.initscripts")

LOG_LINES = 200   # of an initscript's output tail (agent.backend.OUTPUT_TAIL bytes)
INITSCRIPT_SLOTS = 8        # initscripts running at once in the long-running agent
INITSCRIPT_TIMEOUT = 3600.0  # seconds a background initscript may run
ONCE_TIMEOUT = 60.0          # ... and one run inline by `run --once`
STOP_TIMEOUT = 10.0          # `initscript stop` before a sliver is frozen or destroyed
SCRIPT = "etc/planetlab/initscript"   # in the sliver's root


def digest(script: str) -> str:
    return hashlib.sha256(script.encode()).hexdigest()[:32]


class Initscripts:
    def __init__(self, cfg: AgentConfig, state: State, backend: Backend,
                 background: BackgroundTasks | None = None) -> None:
        """`background`: where runs go as tasks (None: inline, `run --once`)."""
        self.cfg = cfg
        self.state = state
        self.backend = backend
        self._background = background
        self._slots = trio.CapacityLimiter(INITSCRIPT_SLOTS)
        self._stop_slots = trio.CapacityLimiter(64)   # `stop` runs: short, never queued
        self._generation: dict[str, int] = {}   # per sliver, see _bump
        self._last_generation = 0

    def _uid_base(self, name: str) -> int | None:
        idx = self.state.uid_range_of(name)
        if idx is None:
            return None
        return self.cfg.uid_pool_start + idx * self.cfg.uid_range_size

    def new_context(self, name: str) -> None:
        """A context is being made for `name`: its initscript has not run in it, and
        runs queued for its previous context are void."""
        self._bump(name)
        self.state.delete_meta(f"initscript_ran:{name}")

    def _bump(self, name: str) -> int:
        """A new generation of `name`'s runs: queued older ones are skipped."""
        self._last_generation += 1   # node-wide: a number is never used twice
        self._generation[name] = self._last_generation
        return self._last_generation

    async def after_start(self, name: str) -> None:
        """`start` if the script has not run in this context yet."""
        rec = self.state.get_sliver(name)
        if rec is not None and self.state.get_meta(f"initscript_ran:{name}") is None:
            await self.install(name, rec.spec.get("initscript") or "", "start")

    async def sync(self) -> None:
        """A running sliver whose initscript changed since it last ran: `restart`. One
        sliver's failure (say, its /etc/planetlab made a symlink) stays with it."""
        ran = self.state.meta_with_prefix("initscript_ran:")
        for name, rec in self.state.slivers().items():
            last = ran.get(name)
            if rec.state != SliverState.RUNNING or last is None:
                continue
            script = rec.spec.get("initscript") or ""
            if digest(script) != last:
                try:
                    await self.install(name, script, "restart")
                except Exception as exc:  # noqa: BLE001 - boundary: one sliver
                    log.warning("sliver %s: initscript not installed: %s", name, exc)

    async def install(self, name: str, script: str, action: str) -> None:
        """Write `script` into the sliver (or remove it: empty) and run `action`."""
        root = self.backend.root_of(name)
        base = self._uid_base(name)
        if root is None or base is None:
            return
        self.state.set_meta(f"initscript_ran:{name}", digest(script))
        gen = self._bump(name)   # a newer script supersedes runs still queued
        if not script:
            await trio.to_thread.run_sync(remove_in_root, root, SCRIPT)
            return
        await trio.to_thread.run_sync(
            write_in_root, root, SCRIPT, script.encode(), 0o755, base, base, 0o755)
        if self._background is None:
            await self._run(name, action, ONCE_TIMEOUT, gen)
        else:
            self._background.start_soon(self._run, name, action, INITSCRIPT_TIMEOUT, gen,
                                        name=f"initscript:{name}")

    async def _run(self, name: str, action: str, timeout: float, gen: int,
                   limiter: trio.CapacityLimiter | None = None) -> None:
        """Run the script unless a newer generation superseded this run; never raises."""
        try:
            async with limiter or self._slots:
                if self._generation.get(name) != gen:
                    return   # superseded while it waited for a slot
                code, output = await trio.to_thread.run_sync(
                    self.backend.run, name, ["/bin/sh", "/" + SCRIPT, action, name], "root",
                    timeout, abandon_on_cancel=True)
            _log_output(name, action, code, output)
            if self._generation.get(name) == gen and self.state.get_sliver(name) is not None:
                self.state.set_meta(f"initscript_status:{name}", str(code))
        except Exception as exc:  # noqa: BLE001 - the sliver may be gone meanwhile
            log.warning("sliver %s: initscript %s could not run: %s", name, action, exc)

    async def before_stop(self, name: str) -> None:
        """`stop` for a sliver about to be frozen or destroyed: runs queued for it are
        void, and `stop` itself runs at once (not behind the slots of start/restart
        runs) for STOP_TIMEOUT at most."""
        gen = self._bump(name)
        if self.state.get_meta(f"initscript_ran:{name}") in (None, digest("")):
            return
        if not await trio.to_thread.run_sync(self.backend.frozen, name):  # it would wait
            await self._run(name, "stop", STOP_TIMEOUT, gen, self._stop_slots)

    async def before_destroy(self, name: str) -> None:
        """`stop`, then forget the sliver; never raises (the sliver goes all the same)."""
        try:
            await self.before_stop(name)
        except Exception as exc:  # noqa: BLE001 - the sliver goes all the same
            log.warning("sliver %s: initscript stop: %s", name, exc)
        self._generation.pop(name, None)


def _log_output(name: str, action: str, code: int, output: str) -> None:
    dropped, output = split_dropped(output)
    lines = output.splitlines()
    if dropped:
        log.info("sliver %s: initscript output: %d earlier bytes dropped, its last %d "
                 "bytes kept", name, dropped, len(output.encode()))
    if len(lines) > LOG_LINES:
        log.info("sliver %s: initscript output: its last %d of %d lines follow", name,
                 LOG_LINES, len(lines))
    for line in lines[-LOG_LINES:]:
        log.info("sliver %s initscript: %s", name, line)
    log.info("sliver %s: initscript %s exited with %d", name, action, code)
