"""CoMon's query interface: `GET /status/tabulator.cgi`.

Parameters (as CoMon took them, so the public node-picking scripts run unchanged):
- `table=table_nodeviewshort` (also `table_nodeview`) or `table=table_slicestat`;
- `format=nameonly` (one name a line), `formatcsv` (header then rows, fields joined
  by ", " as CoMon did), `formatspaces` (space-aligned columns); no format: an HTML table;
- `select='EXPR'` a filter in CoMon's expression syntax (sensors/selectexpr.py),
  quotes optional and the closing quote may be missing, as in old scripts;
- `dumpcols='a,b,c'` the columns to print (default: all, `name` always first);
- `persite=N` at most N nodes of each site (the best by resptime, then name);
- `sort=COL` and `sortdir=up|down`.
Column names and units are CoMon's (see docs/sensors-collector.md for the mapping).
"""

from __future__ import annotations

import html
import ipaddress
import time
from typing import TYPE_CHECKING, Any

from sensors import query, selectexpr
from sensors.collecthttp import Request, Response

if TYPE_CHECKING:
    from sensors.collector import Collector

NODE_COLS = ("name", "address", "location", "resptime", "sshstatus", "uptime", "lastcotop",
             "1 minload", "5 minload", "15 minload", "cpu", "liveslices", "numslices",
             "cpuspeed", "memsize", "freemem", "swapused", "disksize", "gbfree",
             "diskused", "txrate", "rxrate", "drift", "dns1udp", "dns2udp", "kernver",
             "keyok", "bootstate", "filerw", "numprocs")
SLICE_COLS = ("name", "nodes", "cpu", "mem", "procs", "txrate", "disk", "ports",
              "budgetleft", "pressure")
MB = 1 << 20
GB = 1 << 30


def _ip_int(addr: str) -> int | None:
    try:
        return int(ipaddress.IPv4Address(addr))
    except ValueError:
        return None


def _div(v: Any, d: float, nd: int = 2) -> float | None:
    return None if v is None else round(v / d, nd)


def comon_node_rows(col: Collector) -> list[dict[str, Any]]:
    now = time.time()
    out = []
    for r in query.cached_rows(col, "nodes", query.node_rows):
        st = col.nodes[r["name"]]
        up = bool(r["up"])
        mt, mu = r["mem_total"], r["mem_used"]
        dt, du = r["disk_total"], r["disk_used"]
        out.append({
            "name": r["name"], "address": _ip_int(r["address"] or ""), "location": r["site"],
            "resptime": round(r["resptime"] or 0.0, 3) if up else 0,
            # seconds since the node last answered the collector (0 while it does)
            "sshstatus": 0 if up and st.fails == 0 else
            (round(now - st.last_ok) if st.last_ok else None),
            "uptime": r["uptime"], "lastcotop": round(now - st.last_ok) if st.last_ok else None,
            "1 minload": r["load1"], "5 minload": r["load5"], "15 minload": r["load15"],
            "cpu": r["cpu_pct"], "liveslices": r["liveslices"], "numslices": r["slices"],
            "cpuspeed": _div(st.info.get("cpu_mhz"), 1000.0), "memsize": _div(mt, MB, 0),
            "freemem": None if mt is None or mu is None else round((mt - mu) / MB),
            "swapused": _div(r["swap_used"], MB, 0), "disksize": _div(dt, GB, 1),
            "gbfree": None if dt is None or du is None else round((dt - du) / GB, 1),
            "diskused": None if not dt or du is None else round(100.0 * du / dt, 1),
            "txrate": _div(r["tx_rate"], 125.0), "rxrate": _div(r["rx_rate"], 125.0),
            "drift": st.info.get("drift"), "dns1udp": None, "dns2udp": None,
            "kernver": r["kernel"], "keyok": None, "bootstate": None, "filerw": None,
            "numprocs": r["procs"], "_site": r["site"],
        })
    return out


def comon_slice_rows(col: Collector) -> list[dict[str, Any]]:
    return [{"name": r["name"], "nodes": r["nodes"], "cpu": r["cpu_pct"],
             "mem": _div(r["mem_bytes"], MB, 1), "procs": r["procs"],
             "txrate": _div(r["tx_rate"], 125.0), "disk": _div(r["disk_bytes"], MB, 1),
             "ports": r["ports"], "budgetleft": r["budget_left"], "pressure": r["pressure"]}
            for r in query.cached_rows(col, "slices", query.slice_rows)]


def _fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _unquote(s: str) -> str:
    """`'expr'` -> `expr`; old scripts often drop the closing quote."""
    s = s.strip()
    if s.startswith("'"):
        s = s[1:]
        if s.endswith("'"):
            s = s[:-1]
    return s


async def handle_tabulator(col: Collector, req: Request) -> Response:
    q = req.query
    table = q.get("table", "table_nodeviewshort")
    cols: tuple[str, ...]
    if table in ("table_nodeviewshort", "table_nodeview"):
        cols, rows = NODE_COLS, query.cached_rows(col, "comon_nodes", comon_node_rows)
    elif table == "table_slicestat":
        cols, rows = SLICE_COLS, query.cached_rows(col, "comon_slices", comon_slice_rows)
    else:
        return Response.text(f"unknown table {table!r}: use table_nodeviewshort or "
                             "table_slicestat\n", 400)
    try:
        expr = selectexpr.parse(_unquote(q.get("select", "")), cols)
    except selectexpr.ExprError as e:
        return Response.text(f"bad select: {e}\n", 400)
    dump = [c.strip() for c in _unquote(q.get("dumpcols", "")).split(",") if c.strip()]
    for c in dump:
        if c not in cols:
            return Response.text(f"unknown column {c!r} in dumpcols\n", 400)
    shown = ["name"] + [c for c in (dump or cols) if c != "name"]
    rows = list(filter(selectexpr.predicate(expr), rows))
    sort = q.get("sort", "name")
    if sort not in cols:
        return Response.text(f"unknown sort column {sort!r}\n", 400)
    desc = q.get("sortdir", "up") == "down"
    rows.sort(key=lambda r: (r[sort] is None, r[sort] if r[sort] is not None else 0,
                             r["name"]), reverse=desc)
    if q.get("persite"):
        try:
            per = int(q["persite"])
        except ValueError:
            return Response.text("persite must be an integer\n", 400)
        best = sorted(rows, key=lambda r: ((r.get("resptime") or 0) <= 0,
                                           r.get("resptime") or 0, r["name"]))
        count: dict[str, int] = {}
        keep = set()
        for r in best:
            site = r.get("_site") or r["name"].split(".", 1)[-1]
            if count.get(site, 0) < per:
                count[site] = count.get(site, 0) + 1
                keep.add(r["name"])
        rows = [r for r in rows if r["name"] in keep]
    fmt = q.get("format", "")
    if fmt == "nameonly":
        return Response.text("".join(r["name"] + "\n" for r in rows))
    if fmt == "formatcsv":
        lines = [", ".join(shown)] + [", ".join(_fmt(r[c]) for c in shown) for r in rows]
        return Response.text("\n".join(lines) + "\n")
    if fmt == "formatspaces":
        cells = [shown] + [[_fmt(r[c]) for c in shown] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(shown))]
        return Response.text("".join(" ".join(v.ljust(w) for v, w in zip(row, widths, strict=False))
                                     .rstrip() + "\n" for row in cells))
    if fmt:
        return Response.text(f"unknown format {fmt!r}: use nameonly, formatcsv or "
                             "formatspaces\n", 400)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in shown)
                   + "</tr>" for r in rows)
    return Response.text(f"<!doctype html><title>{html.escape(table)}</title><table><tr>"
                         f"{head}</tr>{body}</table>\n", ctype="text/html; charset=utf-8")
