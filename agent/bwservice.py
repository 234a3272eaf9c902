"""The bandwidth service: agent/bandwidth.py's policy over the node's interfaces,
wired into the agent (issue 10, bandwidth half; docs/bandwidth.md).

One object per agent, built by agent/main.py when `[bandwidth] interfaces` names
any. It owns:
- one `kernel.tc.Shaper` per interface (HTB tree, sliver classes, exempt filter);
- its own SQLite connection to the agent's database (the `bw_ledger` tables), used
  only under `self._lock`, from worker threads: every call here blocks on netlink and
  SQLite, so the agent calls the async wrappers (`trio.to_thread`).

Sliver lifecycle (agent/reconcile.py calls these):
- `class_for(name, rspec)` before a context is created or updated: makes or changes
  the sliver's classes in place and returns the class minor, which goes into the
  kernel Limits (`net_class_minor`) so kernel/cgroups.py attaches the egress
  classifier in the step that makes the cgroup, before its first process;
- `adopted(name, rspec)` after a running context is adopted (agent restart): the
  classes are adopted as found and the classifier re-attached (an exclusive attach
  replaces the old program: no gap);
- `released(name)` after a context is destroyed: its last bytes are billed and its
  classes removed (the program went with the cgroup; the ledger row stays until its
  window ends).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from agent.bandwidth import Bandwidth, BandwidthConfig, Rates, ensure_tables, node_cap
from kernel import netclass, tc
from kernel.cgroups import SliverCgroup, detect_layout

log = logging.getLogger("agent.bandwidth")

EXEMPT_FILTER_NAME = "pl_exempt"


def open_ledger(db_path: str | Path) -> sqlite3.Connection:
    """A connection of our own to the agent's database: the ledger commits reading and
    ledger in one transaction (default isolation), from worker threads."""
    db = sqlite3.connect(db_path, timeout=30, check_same_thread=False)
    ensure_tables(db)
    return db


class BandwidthService:
    def __init__(self, cfg: BandwidthConfig, db_path: str | Path, cgroup_parent: str,
                 plc_bwlimit: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.cgroup_parent = cgroup_parent
        self.clock = clock
        self._lock = threading.Lock()
        self.db = open_ledger(db_path)
        self.shapers: list[tc.Shaper] = []
        try:
            for ifname in cfg.interfaces:
                self.shapers.append(tc.Shaper(ifname))
        except BaseException:
            self.close()
            raise
        self.bw = Bandwidth(self.db, cfg, list(self.shapers), cap=node_cap(cfg, plc_bwlimit))
        # name -> class minor of every live sliver: read without the lock (RawSend
        # looks it up on the trio thread while a pass may hold the lock).
        self._minors: dict[str, int] = {}
        self._rspecs: dict[str, Mapping[str, Any]] = {}   # of the slivers with classes
        self.plc_bwlimit = plc_bwlimit
        self.passes = 0
        self.last_pass_s = 0.0

    def close(self) -> None:
        for sh in self.shapers:
            sh.close()
        self.db.close()

    # --- blocking work (worker threads) -----------------------------------------------
    def start(self, rspecs: Mapping[str, Mapping[str, Any]]) -> None:
        """The tree on every interface (adopted as found: no blip), the exempt filter,
        and the classes of the slivers the state holds; classes of slivers no longer
        there are billed and removed."""
        with self._lock:
            self.bw.sync(rspecs, self.clock())
            self._rspecs = dict(rspecs)
            self._minors = {n: m for n, m in self.bw.minors().items() if n in rspecs}
            for sh in self.shapers:
                if self.cfg.exempt:
                    fd = netclass.load_exempt_program(self.cfg.exempt)
                    try:
                        sh.install_exempt_filter(fd, EXEMPT_FILTER_NAME)
                    finally:
                        os.close(fd)
                elif sh.exempt_filter_name() is not None:
                    sh.remove_exempt_filter()

    def class_for(self, name: str, rspec: Mapping[str, Any]) -> int:
        """Create or change in place the sliver's classes; its class minor."""
        with self._lock:
            minor = self.bw.add(name, rspec, self.clock())
            self._minors = {**self._minors, name: minor}
            self._rspecs[name] = rspec
            return minor

    def set_plc_bwlimit(self, bwlimit: int | None) -> bool:
        """PLC's interface `bwlimit` (bit/s) from the last good GetSlivers: when
        agent.toml sets no node_rate it is the node's cap, so a change moves the root
        class and every sliver's clamped rates in place. True when the cap changed."""
        with self._lock:
            self.plc_bwlimit = bwlimit
            cap = node_cap(self.cfg, bwlimit)
            if cap == self.bw.cap:
                return False
            log.info("bandwidth: node cap %d -> %d bit/s (PLC bwlimit %s)", self.bw.cap, cap,
                     bwlimit)
            self.bw.cap = cap
            self.bw.sync(self._rspecs, self.clock())
            return True

    def adopted(self, name: str, rspec: Mapping[str, Any]) -> int:
        """A running sliver found at start: its classes as they are, its classifier
        attached again (replacing the one there)."""
        minor = self.class_for(name, rspec)
        cg = SliverCgroup(detect_layout(), name, self.cgroup_parent).v2_dir()
        if cg is not None and cg.is_dir():
            netclass.classify_cgroup(cg, minor)
        return minor

    def released(self, name: str) -> None:
        with self._lock:
            self._minors = {n: m for n, m in self._minors.items() if n != name}
            self._rspecs.pop(name, None)
            self.bw.remove(name, self.clock())

    def minor_of(self, name: str) -> int | None:
        return self._minors.get(name)

    def priority_of(self, name: str) -> int | None:
        """skb->priority that puts a packet in the slice's capped class (for sockets
        the agent sends from on a slice's behalf: RawSend), None without a class."""
        minor = self.minor_of(name)
        return None if minor is None else tc.handle(tc.MAJOR, minor)

    def account(self) -> None:
        """One accounting pass (bandwidth.Bandwidth.account)."""
        t0 = time.process_time()
        with self._lock:
            self.bw.account(self.clock())
        self.passes += 1
        self.last_pass_s = time.process_time() - t0

    def report(self, name: str) -> dict[str, Any]:
        """GetBandwidth's answer for one slice (KeyError: no ledger for it)."""
        with self._lock:
            return self.bw.report(name, self.clock())

    # --- the agent's task ---------------------------------------------------------------
    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Sample every class's bytes every `sample_s`."""
        task_status.started()
        while True:
            await trio.sleep(self.cfg.sample_s)
            try:
                await trio.to_thread.run_sync(self.account)
            except Exception:  # noqa: BLE001 - boundary: accounting must go on
                log.exception("bandwidth accounting pass failed")


def observe(cfg: BandwidthConfig, db_path: str | Path,
            rspecs: Mapping[str, Mapping[str, Any]], plc_bwlimit: int | None = None,
            now: float | None = None) -> dict[str, dict[str, Any]]:
    """Read-only per-sliver figures for `status` (another process than the agent):
    the ledger as of the agent's last pass, the ceilings and queues the kernel has now."""
    db = open_ledger(db_path)
    shapers: list[tc.Shaper] = []
    try:
        for ifname in cfg.interfaces:
            shapers.append(tc.Shaper(ifname))
        bw = Bandwidth(db, cfg, list(shapers), cap=node_cap(cfg, plc_bwlimit))
        bw.rates = {n: Rates.from_rspec(r, bw.cap, cfg.link_rate) for n, r in rspecs.items()}
        bw.observe()
        out: dict[str, dict[str, Any]] = {}
        for name in rspecs:
            try:
                out[name] = bw.report(name, time.time() if now is None else now)
            except KeyError:
                continue
        return out
    finally:
        for sh in shapers:
            sh.close()
        db.close()
