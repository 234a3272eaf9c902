"""The one table of what the collector reads from a node sensor server and the name it
stores each figure under (docs/sensors-collector.md "What the collector polls" is this
table; tests/sensors/test_fields.py checks the docs, the node server's answers and
this module agree).

Node figures come from `GET /sensors/node?format=json` (flat keys `SENSOR.KEY`,
docs/sensors.md "Node sensors"), slivers from `GET /slices?format=json`
(`{"time": T, "slices": {NAME: {key: value}}}`, docs/sensors.md "Sliver keys").
A key the node omits (it cannot measure it) is simply not stored for that round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Field:
    wire: str          # the node server's key
    name: str          # the collector's field (series name, /query column)
    scale: int         # fixed point in the store: round(value * scale)
    rate: str = ""     # a cumulative counter: the per-second rate stored as `rate`
    rate_factor: float = 1.0   # rate * factor (cpu seconds/s -> % of one CPU)


NODE_FIELDS: tuple[Field, ...] = (
    Field("load.load1", "load1", 100),
    Field("load.load5", "load5", 100),
    Field("load.load15", "load15", 100),
    Field("cpu.busy_percent", "cpu_pct", 10),
    Field("cpu.mhz", "cpu_mhz", 1),
    Field("memory.total_bytes", "mem_total", 1),
    Field("memory.used_bytes", "mem_used", 1),
    Field("swap.total_bytes", "swap_total", 1),
    Field("swap.used_bytes", "swap_used", 1),
    Field("disk.total_bytes", "disk_total", 1),
    Field("disk.used_bytes", "disk_used", 1),
    Field("network.received_bytes_total", "rx_bytes", 1, rate="rx_rate"),
    Field("network.sent_bytes_total", "tx_bytes", 1, rate="tx_rate"),
    Field("uptime.uptime_seconds", "uptime", 1),
    Field("processes.total", "procs", 1),
)
NODE_TEXT: tuple[tuple[str, str], ...] = (("kernel.release", "kernel"),)

SLICE_FIELDS: tuple[Field, ...] = (
    Field("cpu_seconds_total", "cpu_s", 100, rate="cpu_pct", rate_factor=100.0),
    Field("memory_bytes", "mem_bytes", 1),
    Field("processes", "procs", 1),
    Field("htb_sent_bytes_total", "tx_bytes", 1, rate="tx_rate"),
    Field("budget_left_bytes", "budget_left", 1),
    Field("disk_used_bytes", "disk_bytes", 1),
    Field("pressure_cpu_some_avg10", "pressure", 100),
)
SLICE_TEXT: tuple[tuple[str, str], ...] = (("state", "state"),)

# Fields the collector makes itself, and their scales.
DERIVED_SCALES: dict[str, int] = {
    "up": 1, "resptime": 1, "slices": 1, "liveslices": 1, "ports": 1,
    "rx_rate": 1, "tx_rate": 1, "cpu_pct": 10,
}

NODE_NUMERIC = tuple(f.name for f in NODE_FIELDS)
SLICE_NUMERIC = tuple(f.name for f in SLICE_FIELDS)
SCALES: dict[str, int] = {**{f.name: f.scale for f in NODE_FIELDS + SLICE_FIELDS},
                          **DERIVED_SCALES}


def number(v: Any) -> float | None:
    """A JSON number as float (bools count as 0/1); None for anything else."""
    if isinstance(v, (bool, int, float)):
        return float(v)
    return None


def node_values(obj: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(numeric fields, text fields) of one `/sensors/node` answer, by collector name."""
    vals: dict[str, float] = {}
    for f in NODE_FIELDS:
        v = number(obj.get(f.wire))
        if v is not None:
            vals[f.name] = v
    text = {name: obj[wire] for wire, name in NODE_TEXT if isinstance(obj.get(wire), str)}
    return vals, text


def sliver_values(rec: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(numeric fields, text fields) of one sliver of a `/slices` answer; `ports` (a
    list on the wire) becomes its count."""
    vals: dict[str, float] = {}
    for f in SLICE_FIELDS:
        v = number(rec.get(f.wire))
        if v is not None:
            vals[f.name] = v
    ports = rec.get("ports")
    if isinstance(ports, list):
        vals["ports"] = float(len(ports))
    text = {name: rec[wire] for wire, name in SLICE_TEXT if isinstance(rec.get(wire), str)}
    return vals, text


def slivers_of(obj: Any) -> dict[str, Mapping[str, Any]] | None:
    """The slivers of a `/slices?format=json` answer by name; None if it is not that
    shape (`{"slices": {NAME: {...}}}`)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("slices"), dict):
        return None
    return {name: rec for name, rec in obj["slices"].items()
            if isinstance(name, str) and name and isinstance(rec, dict)}


def to_wire_node(values: Mapping[str, Any], time_: float) -> dict[str, Any]:
    """A `/sensors/node` answer carrying `values` (collector names): for test nodes."""
    out: dict[str, Any] = {"time": time_}
    for f in NODE_FIELDS:
        if f.name in values:
            out[f.wire] = values[f.name]
    for wire, name in NODE_TEXT:
        if name in values:
            out[wire] = values[name]
    return out


def to_wire_slivers(slivers: list[Mapping[str, Any]], time_: float) -> dict[str, Any]:
    """A `/slices` answer carrying `slivers` (collector names, each with `name` and
    `ports` as a list): for test nodes."""
    out: dict[str, dict[str, Any]] = {}
    for s in slivers:
        rec: dict[str, Any] = {}
        for f in SLICE_FIELDS:
            if f.name in s:
                rec[f.wire] = s[f.name]
        for wire, name in SLICE_TEXT:
            if name in s:
                rec[wire] = s[name]
        if "ports" in s:
            rec["ports"] = s["ports"]
        out[str(s["name"])] = rec
    return {"time": time_, "slices": out}
