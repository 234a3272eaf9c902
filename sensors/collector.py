"""Central collector: learns the nodes (config or PLC GetNodes), polls every node's
sensor server concurrently each round, stores samples in the compact TSStore, marks a
node down after two failed rounds and backs off from it, and serves queries, the
CoMon tabulator and the dashboard over HTTP.

Node data polled (the node sensor server's answers, docs/sensors.md; which keys are
stored under which names: sensors/fields.py, docs/sensors-collector.md):
  GET /sensors/node?format=json   -> {"time": T, "load.load1": ..., ...}
  GET /slices?format=json         -> {"time": T, "slices": {NAME: {key: value}}}
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import tomllib
import xmlrpc.client
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sensors import fields
from sensors.collecthttp import FetchError, get_json
from sensors.tsstore import TSStore

log = logging.getLogger("sensors.collector")

DOWN_AFTER = 2           # consecutive failed rounds before a node is marked down
MAX_BACKOFF_ROUNDS = 8   # a down node is retried at least every 8 rounds

DEFAULT_CONFIG = """\
# planetlab-sensors collector configuration (TOML).

[collector]
# SQLite database of the time series (created if missing).
db = "/var/lib/planetlab-sensors/collector.db"
# Address and port of the query / tabulator / dashboard HTTP server.
listen = "127.0.0.1"
port = 3180
# Seconds between polling rounds, and per-node HTTP timeout (seconds).
interval = 60
timeout = 5
# At most this many nodes polled at the same time.
concurrency = 500
# Port of the node sensor servers (a [[nodes]] entry may override it).
node_port = 3100
# Seconds between retention passes (raw 2 days, 5-min rollups 30 days, 1-h 1 year).
retention_every = 3600

# Learn the nodes from PLC with the collector's own account (GetNodes, GetSites).
# Leave url empty to use only the [[nodes]] list below.
[plc]
url = ""
username = ""
password = ""
# AuthMethod as PLCAPI expects it: "password" (or "capability").
auth_method = "password"
# CA bundle to verify PLC's TLS certificate ("" = system default).
cafile = ""
# Seconds between refreshes of the node list from PLC.
refresh = 600

# Nodes listed by hand (merged with PLC's list; address defaults to hostname).
# [[nodes]]
# hostname = "planetlab1.example.edu"
# address = "192.0.2.10"
# port = 3100
# site = "example"
"""


@dataclass
class NodeEntry:
    hostname: str
    address: str
    port: int
    site: str = ""


@dataclass
class Config:
    db: str = "/var/lib/planetlab-sensors/collector.db"
    listen: str = "127.0.0.1"
    port: int = 3180
    interval: float = 60.0
    timeout: float = 5.0
    concurrency: int = 500
    node_port: int = 3100
    retention_every: float = 3600.0
    plc: dict[str, Any] = field(default_factory=dict)
    nodes: list[NodeEntry] = field(default_factory=list)


class ConfigError(ValueError):
    pass


def load_config(path: str | Path) -> Config:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    c = raw.get("collector", {})
    cfg = Config()
    types: dict[str, type | tuple[type, ...]] = {"db": str, "listen": str, "port": int, "interval": (int, float),
             "timeout": (int, float), "concurrency": int, "node_port": int,
             "retention_every": (int, float)}
    for key, val in c.items():
        if key not in types:
            raise ConfigError(f"{path}: unknown key collector.{key}")
        if not isinstance(val, types[key]) or isinstance(val, bool):
            raise ConfigError(f"{path}: collector.{key} has the wrong type")
        setattr(cfg, key, val)
    if cfg.interval <= 0 or cfg.timeout <= 0 or cfg.concurrency <= 0:
        raise ConfigError(f"{path}: interval, timeout and concurrency must be positive")
    cfg.plc = dict(raw.get("plc", {}))
    for i, n in enumerate(raw.get("nodes", [])):
        host = n.get("hostname")
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{path}: nodes[{i}].hostname missing")
        cfg.nodes.append(NodeEntry(host, str(n.get("address", host)),
                                   int(n.get("port", cfg.node_port)), str(n.get("site", ""))))
    return cfg


def plc_nodes(plc: dict[str, Any], node_port: int) -> list[NodeEntry]:
    """The nodes PLC knows (blocking: run in a thread). Uses GetNodes, GetSites and
    GetInterfaces with the collector's own account."""
    import ssl
    ctx = ssl.create_default_context(cafile=plc.get("cafile") or None)
    api = xmlrpc.client.ServerProxy(plc["url"], allow_none=True, context=ctx
                                    if plc["url"].startswith("https") else None)
    auth = {"AuthMethod": plc.get("auth_method", "password"),
            "Username": plc.get("username", ""), "AuthString": plc.get("password", "")}
    nodes = _records(api.GetNodes(auth, {}, ["hostname", "site_id", "interface_ids"]),
                     "GetNodes")
    sites = {s.get("site_id"): str(s.get("login_base") or "") for s in
             _records(api.GetSites(auth, {}, ["site_id", "login_base"]), "GetSites")}
    ifs = {i.get("interface_id"): i for i in _records(
        api.GetInterfaces(auth, {}, ["interface_id", "ip", "is_primary"]), "GetInterfaces")}
    out = []
    for n in nodes:
        host = n.get("hostname")
        if not isinstance(host, str) or not host:
            continue
        ip = next((str(ifs[i]["ip"]) for i in n.get("interface_ids") or []
                   if i in ifs and ifs[i].get("is_primary") and ifs[i].get("ip")), None)
        out.append(NodeEntry(host, ip or host, node_port, sites.get(n.get("site_id"), "")))
    return out


def _records(value: object, call: str) -> list[dict[str, Any]]:
    """A PLC answer that must be a list of structs (xmlrpc.client.Fault if not)."""
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise xmlrpc.client.Fault(-1, f"{call}: expected a list of structs, got "
                                      f"{type(value).__name__}")
    return value


@dataclass
class NodeState:
    entry: NodeEntry
    up: bool = True           # until proven otherwise
    fails: int = 0
    next_round: int = 0       # backoff: skip polling before this round
    last_ok: float = 0.0
    resptime: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)     # latest node figures
    slices: list[dict[str, Any]] = field(default_factory=list)
    prev: dict[str, tuple[float, float]] = field(default_factory=dict)  # counters
    error: str = ""


def _rate(prev: dict[str, tuple[float, float]], key: str, ts: float, value: float | None
          ) -> float | None:
    """Per-second rate of a cumulative counter since the previous sample (None at the
    first sample or after a counter reset)."""
    if value is None:
        return None
    last = prev.get(key)
    prev[key] = (ts, value)
    if last is None or ts <= last[0] or value < last[1]:
        return None
    return (value - last[1]) / (ts - last[0])


class Collector:
    def __init__(self, cfg: Config, store: TSStore) -> None:
        self.cfg = cfg
        self.store = store
        self.nodes: dict[str, NodeState] = {}
        self.round = 0
        self.round_times: list[float] = []
        self.samples_per_round: list[int] = []
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self.generation = 0   # bumped when current values change (query caches)
        self.views: dict[str, tuple[int, Any]] = {}
        self.set_nodes(cfg.nodes)

    def set_nodes(self, entries: list[NodeEntry]) -> None:
        self.generation += 1
        for e in entries:
            st = self.nodes.get(e.hostname)
            if st is None:
                self.nodes[e.hostname] = NodeState(e)
            else:
                st.entry = e

    async def refresh_from_plc(self) -> None:
        if not self.cfg.plc.get("url"):
            return
        try:
            found = await asyncio.to_thread(plc_nodes, self.cfg.plc, self.cfg.node_port)
        except (OSError, xmlrpc.client.Error) as e:
            log.warning("PLC node list refresh failed: %s", e)
            return
        self.set_nodes(self.cfg.nodes + found)

    async def _fetch(self, st: NodeState
                     ) -> tuple[dict[str, Any], dict[str, Mapping[str, Any]], float]:
        e = st.entry
        async with self._sem:
            t0 = time.monotonic()
            node, sl = await asyncio.gather(
                get_json(e.address, e.port, "/sensors/node?format=json", self.cfg.timeout),
                get_json(e.address, e.port, "/slices?format=json", self.cfg.timeout))
            dt = time.monotonic() - t0
        if not isinstance(node, dict):
            raise FetchError(f"{e.hostname}: /sensors/node is not a JSON object")
        slivers = fields.slivers_of(sl)
        if slivers is None:
            raise FetchError(f"{e.hostname}: /slices is not {{\"slices\": {{NAME: {{...}}}}}}")
        return node, slivers, dt

    async def poll_round(self, now: float | None = None) -> int:
        """Poll every node due this round; store what answered. Returns samples stored."""
        ts = int(time.time() if now is None else now)
        self.round += 1
        r = self.round
        due = [st for st in self.nodes.values() if st.next_round <= r]
        skipped = [st for st in self.nodes.values() if st.next_round > r]
        t0 = time.monotonic()
        results = await asyncio.gather(*(self._fetch(st) for st in due),
                                       return_exceptions=True)
        stored = 0
        for st, res in zip(due, results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, (FetchError, OSError)):
                    raise res
                st.fails += 1
                st.error = str(res)
                st.resptime = 0.0
                if st.fails >= DOWN_AFTER:
                    if st.up:
                        log.info("node %s down: %s", st.entry.hostname, st.error)
                    st.up = False
                    st.next_round = r + min(2 ** (st.fails - DOWN_AFTER), MAX_BACKOFF_ROUNDS)
                stored += await self.store.append_many(
                    "node", st.entry.hostname, ts, {"up": 1.0 if st.up else 0.0,
                                                    "resptime": 0.0})
                continue
            node, slices, dt = res
            st.up, st.fails, st.next_round, st.error = True, 0, 0, ""
            st.last_ok, st.resptime = ts, max(dt * 1000.0, 0.001)
            stored += await self._store_node(st, ts, node, slices)
        for st in skipped:   # nodes skipped by backoff stay down in the series
            stored += await self.store.append_many(
                    "node", st.entry.hostname, ts, {"up": 0.0, "resptime": 0.0})
        await self.store.flush()
        self.generation += 1
        self.round_times.append(time.monotonic() - t0)
        self.samples_per_round.append(stored)
        return stored

    async def _store_node(self, st: NodeState, ts: int, node: dict[str, Any],
                          slivers: dict[str, Mapping[str, Any]]) -> int:
        vals, info = fields.node_values(node)
        for f in fields.NODE_FIELDS:
            if f.rate:
                rate = _rate(st.prev, f.name, ts, vals.get(f.name))
                if rate is not None:
                    vals[f.rate] = rate * f.rate_factor
        vals["up"] = 1.0
        vals["resptime"] = st.resptime
        vals["slices"] = float(len(slivers))
        kept = []
        for name, rec in sorted(slivers.items()):
            sv, text = fields.sliver_values(rec)
            for f in fields.SLICE_FIELDS:
                if f.rate:
                    rate = _rate(st.prev, f"{name}.{f.name}", ts, sv.get(f.name))
                    if rate is not None:
                        sv[f.rate] = rate * f.rate_factor
            kept.append((name, sv, text.get("state", "")))
        vals["liveslices"] = float(sum(1 for _n, sv, _s in kept if sv.get("procs", 0) > 0))
        node_time = fields.number(node.get("time"))
        st.info = {**vals, **info}
        if node_time is not None:
            st.info["drift"] = abs(node_time - ts)
        n = await self.store.append_many("node", st.entry.hostname, ts, vals)
        for name, sv, _state in kept:
            n += await self.store.append_many("slice", f"{name}@{st.entry.hostname}", ts, sv)
        for gone in [k for k in st.prev if "." in k and k.split(".", 1)[0] not in slivers]:
            del st.prev[gone]
        st.slices = [{**sv, "name": name, "state": state} for name, sv, state in kept]
        return n

    def status(self) -> list[dict[str, Any]]:
        return [{"hostname": h, "site": st.entry.site, "address": st.entry.address,
                 "up": st.up, "fails": st.fails, "last_ok": st.last_ok,
                 "resptime": st.resptime, "error": st.error}
                for h, st in sorted(self.nodes.items())]

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every `interval` seconds, PLC refresh and retention on their own
        periods, until `stop` is set."""
        last_plc = last_ret = 0.0
        while not stop.is_set():
            start = time.monotonic()
            if self.cfg.plc.get("url") and start - last_plc >= float(
                    self.cfg.plc.get("refresh", 600)):
                await self.refresh_from_plc()
                last_plc = start
            await self.poll_round()
            if start - last_ret >= self.cfg.retention_every:
                stats = await self.store.retention()
                log.info("retention: %s", json.dumps(stats))
                last_ret = start
            wait = max(0.0, self.cfg.interval - (time.monotonic() - start))
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                pass
