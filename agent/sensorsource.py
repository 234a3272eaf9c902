"""The agent's side of the node sensors: its per-sliver facts as plain dicts, and the
sensor server built over them (sensors/nodeserver.py, docs/sensors.md).

The source runs in the agent's trio thread (the state database and the bandwidth
ledger belong to the loop) and does bounded work per sliver: one summaries query,
one ports query, one ledger row per sliver; a sliver's slice id is read (with its
JSON record) only when its record changed. The bandwidth facts come from the agent's
`BandwidthService` (agent/bwservice.py: `report` under its lock, `minor_of` from its
in-memory table), as GetBandwidth reads them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from agent.state import State
from sensors.nodeserver import DEFAULT_PORT, NodeServer
from sensors.readers import NodeReader, SliverReader
from sensors.snapshot import Snapshots, btrfs_disk_reader


class SensorConfigError(ValueError):
    """`[sensors] listen` is unusable; the message names the key."""


def parse_listen(value: Any, source: str = "agent.toml") -> tuple[str, int]:
    """`[sensors] listen = "ADDR:PORT"` (`[v6addr]:port`; `ADDR` alone means port
    3100) -> (host, port)."""
    if not isinstance(value, str) or not value.strip():
        raise SensorConfigError(f"{source}: [sensors] listen must be \"ADDR:PORT\", "
                                f"got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            host = ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    try:
        ipaddress.ip_address(host)
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise SensorConfigError(f"{source}: [sensors] listen {value!r}: want an IP address "
                                "and a port, e.g. \"0.0.0.0:3100\"") from None
    if not 0 < port < 65536:
        raise SensorConfigError(f"{source}: [sensors] listen {value!r}: port out of range "
                                "1..65535")
    return host, port


class BandwidthFacts(Protocol):
    """What the source reads of agent/bwservice.py's BandwidthService."""

    def report(self, name: str) -> dict[str, Any]: ...

    def minor_of(self, name: str) -> int | None: ...


class AgentSensorSource:
    """The SliverSource of sensors/snapshot.py over the agent's state and ledger."""

    def __init__(self, state: State, bandwidth: BandwidthFacts | None = None) -> None:
        self.state = state
        self.bandwidth = bandwidth
        self._ids: dict[str, tuple[int, int]] = {}   # name -> (hash of applied, id)

    def _slice_id(self, name: str, applied: str) -> int | None:
        seen = self._ids.get(name)
        if seen is not None and seen[0] == hash(applied):
            return seen[1]
        rec = self.state.get_sliver(name)
        if rec is None:
            return None
        self._ids[name] = (hash(applied), rec.slice_id)
        return rec.slice_id

    def __call__(self) -> dict[str, dict[str, Any]]:
        ports = self.state.owned_ports()
        out: dict[str, dict[str, Any]] = {}
        summaries = self.state.summaries()
        for gone in set(self._ids) - set(summaries):
            del self._ids[gone]
        for name, s in sorted(summaries.items()):
            rec: dict[str, Any] = {"slice_id": self._slice_id(name, s.applied),
                                   "state": s.state,
                                   "ports": [f"{proto}/{port}@{addr}"
                                             for proto, port, addr, _ in ports.get(name, [])]}
            if self.bandwidth is not None:
                try:
                    bw = self.bandwidth.report(name)
                except KeyError:
                    bw = None
                if bw is not None:
                    rec.update(sent_bytes=bw["bytes"], i2_sent_bytes=bw["i2bytes"],
                               window_start=bw["window_start"])
                    for key, theirs in (("budget_left_bytes", "budget_left"),
                                        ("i2_budget_left_bytes", "i2budget_left"),
                                        ("ceil_bps", "ceil")):
                        if bw[theirs] is not None:
                            rec[key] = bw[theirs]
                minor = self.bandwidth.minor_of(name)
                if minor is not None:
                    rec["htb_minor"] = minor
            out[name] = rec
        return out


def make_sensor_server(state: State, *, cgroup_parent: str, roots_dir: str | Path | None,
                       bandwidth: BandwidthFacts | None = None,
                       interfaces: Sequence[str] = (), address: str = "",
                       ttl: float = 1.0) -> NodeServer:
    """The node sensor server of this agent (serve it with nursery.start(server.serve,
    host, port))."""
    snapshots = Snapshots(
        AgentSensorSource(state, bandwidth), ttl=ttl, node_reader=NodeReader(),
        sliver_reader=SliverReader(parent=cgroup_parent, interfaces=interfaces),
        disk_reader=btrfs_disk_reader(Path(roots_dir)) if roots_dir else None,
        address=address)
    return NodeServer(snapshots)
