"""The dashboard in headless Chromium (Debian package `chromium`): the page loads
offline from the collector, its tables and SVG plots show the stored data, and a
screenshot is kept (path printed; SENSORS_SCREENSHOT overrides it)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from html.parser import HTMLParser

import pytest

from tests.sensors.collector_fixture import fleet
from tests.sensors.fakenode import SLICES, node_figures, slice_figures

pytestmark = pytest.mark.timeout(90)
CHROMIUM = shutil.which("chromium")
SHOT = os.environ.get("SENSORS_SCREENSHOT",
                      os.path.join(tempfile.gettempdir(), f"sensors-dashboard-{os.getpid()}.png"))


class Cells(HTMLParser):
    """Text of the cells of each table (by id) and the polylines of each SVG."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.svgs: list[dict[str, str]] = []
        self._table: str | None = None
        self._in_td = False
        self._in_tbody = False

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table or ""] = []
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._in_tbody and self._table:
            self._in_td = True
            self.tables[self._table][-1].append("")
        elif tag == "svg":
            self.svgs.append({"points": a.get("data-points", "0")})
        elif tag == "polyline" and self.svgs:
            self.svgs[-1]["line"] = a.get("points", "")
        elif tag == "text" and self.svgs:
            self.svgs[-1].setdefault("title", "")

    def handle_endtag(self, tag):  # noqa: ANN001
        if tag == "td":
            self._in_td = False
        elif tag == "tbody":
            self._in_tbody = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data):  # noqa: ANN001
        if self._in_td and self._table:
            self.tables[self._table][-1][-1] += data
        elif self.svgs and self.svgs[-1].get("title") == "":
            self.svgs[-1]["title"] = data


async def _chromium(*args: str) -> str:
    p = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp(prefix='scd')}",
        "--virtual-time-budget=8000", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(p.communicate(), 60)
    return out.decode()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium not installed")
def test_dashboard_shows_stored_data() -> None:
    async def go(d: str):
        async with fleet(d) as (col, _servers, port):
            t0 = int(time.time()) - 60
            for r in range(4):
                await col.poll_round(now=t0 + 10 * r)
            url = (f"http://127.0.0.1:{port}/?node=node1.princeton.test&slice=pl_alpha"
                   "&sort=nodes:load1:desc&sort=slices:mem_bytes")
            dom = await _chromium("--dump-dom", url)
            await _chromium("--window-size=1200,1400", f"--screenshot={SHOT}", url)
            return dom
    with tempfile.TemporaryDirectory(prefix=f"scd{os.getpid()}") as d:
        dom = asyncio.run(go(d))
    assert 'data-ready="1"' in dom, dom[:2000]
    p = Cells()
    p.feed(dom)
    assert re.search(r'id="nodes-up">5<', dom) and re.search(r'id="nodes-total">5<', dom)
    nodes = {r[0]: r for r in p.tables["nodes"]}
    # sorted as the address asked: nodes by load1 descending, slices by memory
    loads = [float(r[3]) for r in p.tables["nodes"]]
    assert loads == sorted(loads, reverse=True)
    mems = [float(r[3]) for r in p.tables["slices"]]
    assert mems == sorted(mems)
    assert re.search(r'id="nodes"[^>]*data-sort="load1:desc"', dom)
    avg = sum(node_figures(n, int(n[4]) + 1, 4)["load1"] for n in nodes) / len(nodes)
    shown = re.search(r'id="load-avg">([^<]*)<', dom)
    assert shown and float(shown.group(1)) == pytest.approx(avg, abs=0.01)
    assert sorted(nodes) == [f"node{i}.{s}.test" for i, s in
                             enumerate(("princeton", "princeton", "mit", "mit", "ucb"))]
    for name, row in nodes.items():
        seed = int(name[4]) + 1
        assert float(row[3]) == node_figures(name, seed, 4)["load1"]   # load1 column
    assert sorted(r[0] for r in p.tables["slices"]) == sorted(SLICES)
    # cpu % of a slice = sum over its slivers of d(cpu_s)/dt * 100
    cpu = {n: 0.0 for n in SLICES}
    for name in nodes:
        seed = int(name[4]) + 1
        for a, b in zip(slice_figures(seed, 3), slice_figures(seed, 4), strict=True):
            cpu[a["name"]] += (b["cpu_s"] - a["cpu_s"]) / 10 * 100
    assert [r[0] for r in p.tables["top-cpu"]] == sorted(cpu, key=lambda n: -cpu[n])
    assert [float(r[1]) for r in p.tables["top-cpu"]] == sorted(cpu.values(), reverse=True)
    # bandwidth of a slice = sum over its slivers of d(tx_bytes)/dt
    bw = {n: 0.0 for n in SLICES}
    for name in nodes:
        seed = int(name[4]) + 1
        for a, b in zip(slice_figures(seed, 3), slice_figures(seed, 4), strict=True):
            bw[a["name"]] += (b["tx_bytes"] - a["tx_bytes"]) / 10
    assert [r[0] for r in p.tables["top-bw"]] == sorted(bw, key=lambda n: -bw[n])
    assert [float(r[1]) for r in p.tables["top-bw"]] == sorted(bw.values(), reverse=True)
    titles = {s.get("title"): s for s in p.svgs}
    load = titles["node1.princeton.test load1"]
    assert load["points"] == "4" and len(load["line"].split()) == 4
    assert titles["pl_alpha mem_bytes"]["points"] == "4"
    assert os.path.getsize(SHOT) > 10_000
    print(f"dashboard screenshot: {SHOT}")
