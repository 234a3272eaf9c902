"""The collector's HTTP routes: dashboard page and its static files (no CDN: the page
and its small SVG plotting script ship in sensors/static), the fleet summary, the
node status list, /query and /status/tabulator.cgi."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sensors import query, tabulator
from sensors.collecthttp import Request, Response

if TYPE_CHECKING:
    from sensors.collector import Collector

STATIC = Path(__file__).with_name("static")
CTYPES = {".html": "text/html; charset=utf-8", ".js": "application/javascript",
          ".css": "text/css"}
TOP = 10


def fleet(col: Collector) -> dict[str, object]:
    nodes = query.cached_rows(col, "nodes", query.node_rows)
    slices = query.cached_rows(col, "slices", query.slice_rows)
    up = [n for n in nodes if n["up"]]
    loads = [n["load1"] for n in up if n["load1"] is not None]
    return {
        "nodes_total": len(nodes), "nodes_up": len(up),
        "load_avg": sum(loads) / len(loads) if loads else None,
        "round": col.round,
        "top_cpu": sorted((s for s in slices if s["cpu_pct"] is not None),
                          key=lambda s: -s["cpu_pct"])[:TOP],
        "top_bw": sorted((s for s in slices if s["tx_rate"] is not None),
                         key=lambda s: -s["tx_rate"])[:TOP],
    }


def make_handler(col: Collector):  # noqa: ANN201 - returns a collecthttp.Handler
    async def handle(req: Request) -> Response:
        p = req.path
        if p == "/query":
            return await query.handle_query(col, req)
        if p in ("/status/tabulator.cgi", "/tabulator.cgi"):
            return await tabulator.handle_tabulator(col, req)
        if p == "/api/fleet":
            return Response.json(fleet(col))
        if p == "/api/nodes":
            return Response.json(col.status())
        if p == "/" or p == "/index.html":
            p = "/static/index.html"
        if p.startswith("/static/"):
            name = p[len("/static/"):]
            f = STATIC / name
            if "/" in name or name.startswith(".") or f.suffix not in CTYPES or not f.is_file():
                return Response.text("not found\n", 404)
            return Response(200, f.read_bytes(), CTYPES[f.suffix])
        return Response.text("not found\n", 404)
    return handle
