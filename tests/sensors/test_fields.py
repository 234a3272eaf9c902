"""One source of truth for the collector's field names (sensors/fields.py): the docs
table says the same, every node key it reads is one the node server documents, and
the node server's real answers carry those keys under those names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio

from sensors import fields
from sensors.nodeserver import render
from sensors.readers import NodeReader
from sensors.snapshot import Snapshots

DOCS = Path(__file__).resolve().parents[2] / "docs"


def docs_table() -> list[tuple[str, str, str, str, str]]:
    text = (DOCS / "sensors-collector.md").read_text()
    body = text.split("<!-- fields:begin -->", 1)[1].split("<!-- fields:end -->", 1)[0]
    rows = []
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        rate = cells[4].split(" ", 1)[0].strip("`") if cells[4] else ""
        rows.append((cells[0], cells[1], cells[2], cells[3], rate))
    return rows


def code_table() -> list[tuple[str, str, str, str, str]]:
    rows = [("node", f.wire, f.name, str(f.scale), f.rate) for f in fields.NODE_FIELDS]
    rows += [("node", wire, name, "text", "") for wire, name in fields.NODE_TEXT]
    rows += [("sliver", f.wire, f.name, str(f.scale), f.rate) for f in fields.SLICE_FIELDS]
    rows += [("sliver", wire, name, "text", "") for wire, name in fields.SLICE_TEXT]
    return rows


def test_docs_table_is_the_code_table() -> None:
    assert docs_table() == code_table()


def _section(name: str) -> str:
    text = (DOCS / "sensors.md").read_text()
    return text.split(f"## {name}", 1)[1].split("\n## ", 1)[0]


def test_every_key_read_is_one_the_node_server_documents() -> None:
    node_rows = {}
    for line in _section("Node sensors").splitlines():
        m = re.match(r"\| `(\w+)` \| (.*) \|$", line)
        if m:
            node_rows[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    for f in [*(w for w, _ in fields.NODE_TEXT), *(f.wire for f in fields.NODE_FIELDS)]:
        sensor, key = f.split(".")
        assert key in node_rows.get(sensor, set()), f"{f} is not in docs/sensors.md"
    documented = set()
    for line in _section("Sliver keys").splitlines():
        if line.startswith("| `"):
            for key in re.findall(r"`([\w]+)`", line.split("|")[1]):
                documented.add(key)
    documented |= {f"pressure_{r}_{k}_avg{w}" for r in ("cpu", "memory", "io")
                   for k in ("some", "full") for w in (10, 60, 300)}
    for wire in [*(f.wire for f in fields.SLICE_FIELDS), *(w for w, _ in fields.SLICE_TEXT)]:
        assert wire in documented, f"{wire} is not in docs/sensors.md"


class Source:
    def __call__(self) -> dict[str, dict[str, object]]:
        return {"pl_one": {"slice_id": 7, "state": "running", "ports": ["tcp/80@0.0.0.0"],
                           "budget_left_bytes": 5000, "sent_bytes": 10}}


def test_node_server_answers_parse_under_the_documented_names() -> None:
    """A real snapshot (real node readers) rendered as the server sends it, read back
    with sensors/fields.py: every node figure the table names is there (cpu.mhz only
    where the kernel tells a speed), and the values are the ones sent."""
    async def main() -> tuple[str, str]:
        snaps = Snapshots(Source(), node_reader=NodeReader())
        snap = await snaps.get()
        return render(snap, "/sensors/node", "json")[1], render(snap, "/slices", "json")[1]
    node_text, slices_text = trio.run(main)
    node = json.loads(node_text)
    vals, text = fields.node_values(node)
    want = {f.name for f in fields.NODE_FIELDS} - {"cpu_pct"}   # busy % from the 2nd read
    if NodeReader().read()["cpu"].get("mhz") is None:
        want.discard("cpu_mhz")
    assert want <= set(vals), want - set(vals)
    for f in fields.NODE_FIELDS:
        if f.name in vals:
            assert vals[f.name] == pytest.approx(node[f.wire])
    assert text["kernel"] and fields.number(node["time"])
    slivers = fields.slivers_of(json.loads(slices_text))
    assert slivers is not None and set(slivers) == {"pl_one"}
    sv, stext = fields.sliver_values(slivers["pl_one"])
    assert sv == {"budget_left": 5000.0, "ports": 1.0} and stext == {"state": "running"}
    assert fields.slivers_of([{"name": "x"}]) is None
