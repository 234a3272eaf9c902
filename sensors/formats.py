"""Answer bodies: `key: value` text, JSON, slicestat lines, Prometheus text.

Pure functions over plain dicts (docs/sensors.md is the contract). Values that come
from slice data (names, ports) are hostile: a line break in one can never start a
new key, line or metric.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

_BREAKS = re.compile(r"[\r\n\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_METRIC_BAD = re.compile(r"[^a-zA-Z0-9_:]")


def text_value(value: Any) -> str:
    """One value on one line: ints as ints, floats with up to 6 decimals, lists
    space-separated, booleans 1/0; control characters become spaces."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "0"
        s = f"{value:.6f}".rstrip("0")
        return s + "0" if s.endswith(".") else s
    if isinstance(value, (list, tuple)):
        return " ".join(text_value(v) for v in value)
    return _BREAKS.sub(" ", str(value))


def key_values(values: Mapping[str, Any]) -> str:
    """`key: value` lines, in the mapping's order; None values are left out."""
    return "".join(f"{_BREAKS.sub(' ', k)}: {text_value(v)}\n"
                   for k, v in values.items() if v is not None)


def stanzas(records: Iterable[Mapping[str, Any]]) -> str:
    """`key: value` stanzas separated by one blank line."""
    return "\n".join(key_values(r) for r in records)


def json_body(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str) + "\n"


# --- slicestat ------------------------------------------------------------------------

def slicestat_line(rec: Mapping[str, Any], mem_total: int,
                   kbps: tuple[float, float, float], address: str) -> str:
    """One historic slicestat line (15 comma-separated fields, docs/sensors.md)."""
    mem = int(rec.get("memory_bytes", 0))
    name = re.sub(r"[,\s]", "_", str(rec.get("name", "")))
    fields = [
        name, str(int(rec.get("slice_id", 0) or 0)),
        f"{float(rec.get('cpu_percent', 0.0)):.1f}",
        f"{100.0 * mem / mem_total if mem_total else 0.0:.1f}",
        str(mem // 1024), "0", str(int(rec.get("processes", 0))),
        *(f"{r:.6f}" for r in kbps), "0.000000", "0.000000", "0.000000",
        re.sub(r"[,\s]", "_", address), "0",
    ]
    return ",".join(fields)


def slicestat(slivers: Mapping[str, Mapping[str, Any]], mem_total: int,
              send_kbps: Mapping[str, tuple[float, float, float]], address: str) -> str:
    return "".join(slicestat_line(rec, mem_total, send_kbps.get(name, (0.0, 0.0, 0.0)),
                                  address) + "\n"
                   for name, rec in slivers.items())


# --- Prometheus text exposition format 0.0.4 --------------------------------------------

def label_value(value: str) -> str:
    """Escape a label value: backslash, double quote and line feed (format 0.0.4)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metric_name(*parts: str) -> str:
    return _METRIC_BAD.sub("_", "_".join(parts))


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{label_value(v)}"' for k, v in labels.items()) + "}"


def _number(value: Any) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    return None


class Exposition:
    """Families in order of first use, each with HELP and TYPE, then its samples."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, help_: str, value: Any, labels: Mapping[str, str] = {},
            kind: str | None = None) -> None:
        num = _number(value)
        if num is None:
            return
        fam = self._families.get(name)
        if fam is None:
            kind = kind or ("counter" if name.endswith("_total") else "gauge")
            fam = self._families[name] = (help_, kind, [])
        fam[2].append(f"{name}{_labels(labels)} {num}")

    def text(self) -> str:
        out: list[str] = []
        for name, (help_, kind, samples) in self._families.items():
            help_ = help_.replace("\\", "\\\\").replace("\n", "\\n")
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)
        return "\n".join(out) + "\n"


def prometheus(node: Mapping[str, Mapping[str, Any]],
               slivers: Mapping[str, Mapping[str, Any]],
               collection_seconds: float | None = None) -> str:
    exp = Exposition()
    for sensor, values in node.items():
        strings = {k: v for k, v in values.items() if isinstance(v, str)}
        for key, value in values.items():
            exp.add(metric_name("planetlab_node", sensor, key),
                    f"node sensor {sensor}, key {key} (docs/sensors.md)", value)
        if strings:
            exp.add(metric_name("planetlab_node", sensor, "info"),
                    f"node sensor {sensor}: its text keys as labels", 1, strings, "gauge")
    for name, rec in slivers.items():
        lab = {"slice": name}
        for key, value in rec.items():
            if key in ("name", "slice_id") or isinstance(value, (str, list, tuple)):
                continue
            exp.add(metric_name("planetlab_sliver", key),
                    f"sliver key {key} (docs/sensors.md)", value, lab)
        if "ports" in rec:
            exp.add("planetlab_sliver_ports", "ports the slice owns on this node",
                    len(rec["ports"]), lab)
        info = {"slice": name, "state": str(rec.get("state", ""))}
        exp.add("planetlab_sliver_info", "the agent's state of the sliver", 1, info, "gauge")
    if collection_seconds is not None:
        exp.add("planetlab_sensors_collection_seconds",
                "CPU time the snapshot's collection took", collection_seconds)
    return exp.text()
