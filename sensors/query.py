"""`GET /query?table=nodes|sites|slices&select=F,..&where=EXPR&since=T&until=T&format=json|csv`

Without `since` the answer is the current value of every entity (one row each); with
`since` (and optional `until`, default now) it is the stored time series: one row per
(entity, timestamp). Resolution `res=raw|5m|1h|auto` (auto: raw inside the raw
retention window, else 5-minute rollups inside 30 days, else 1-hour rollups; rollup
rows carry the bucket average). `where` uses the CoMon expression syntax
(sensors/selectexpr.py) over the table's current values; it picks the entities.
Times: epoch seconds, `now`, or relative `-90s`, `-15m`, `-6h`, `-7d`.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any

from sensors import selectexpr
from sensors.collecthttp import Request, Response
from sensors.tsstore import RAW_KEEP, ROLL5_KEEP, SeriesKey

if TYPE_CHECKING:
    from sensors.collector import Collector

NODE_FIELDS = ("name", "site", "address", "up", "resptime", "load1", "load5", "load15",
               "cpu_pct", "mem_total", "mem_used", "swap_total", "swap_used", "disk_total",
               "disk_used", "rx_bytes", "tx_bytes", "rx_rate", "tx_rate", "uptime", "procs",
               "slices", "liveslices", "kernel", "last_ok")
SLICE_FIELDS = ("name", "nodes", "cpu_pct", "mem_bytes", "procs", "tx_rate", "tx_bytes",
                "disk_bytes", "ports", "budget_left", "pressure")
SITE_FIELDS = ("name", "nodes", "up", "load1", "cpu_pct", "rx_rate", "tx_rate", "slices")
TABLES = {"nodes": NODE_FIELDS, "slices": SLICE_FIELDS, "sites": SITE_FIELDS}
TEXT_FIELDS = {"name", "site", "address", "kernel"}
# how a slice / site aggregates its members' values
SLICE_AGG = {"cpu_pct": "sum", "mem_bytes": "sum", "procs": "sum", "tx_rate": "sum",
             "tx_bytes": "sum", "disk_bytes": "sum", "ports": "sum", "budget_left": "min",
             "pressure": "max"}
SITE_AGG = {"up": "sum", "load1": "avg", "cpu_pct": "avg", "rx_rate": "sum",
            "tx_rate": "sum", "slices": "sum"}


class QueryError(ValueError):
    pass


def parse_time(text: str | None, now: float, default: float | None) -> float | None:
    if text is None or text == "":
        return default
    if text == "now":
        return now
    m = re.fullmatch(r"-(\d+)([smhd])", text)
    if m:
        return now - int(m.group(1)) * selectexpr.UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        raise QueryError(f"bad time {text!r}: use epoch seconds, now or -N[smhd]") from None


def _agg(kind: str, vals: list[float]) -> float | None:
    if not vals:
        return None
    if kind == "sum":
        return sum(vals)
    if kind == "min":
        return min(vals)
    if kind == "max":
        return max(vals)
    return sum(vals) / len(vals)


def node_rows(col: Collector) -> list[dict[str, Any]]:
    latest = col.store.latest_values("node")
    rows = []
    for host, st in sorted(col.nodes.items()):
        row: dict[str, Any] = {f: None for f in NODE_FIELDS}
        row.update(latest.get(host, {}))
        row.update({k: v for k, v in st.info.items() if k in ("kernel",)})
        row.update(name=host, site=st.entry.site, address=st.entry.address,
                   up=1 if st.up else 0, resptime=st.resptime if st.up else 0.0,
                   last_ok=st.last_ok or None)
        rows.append(row)
    return rows


def slice_rows(col: Collector) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for st in col.nodes.values():
        if st.up:
            for s in st.slices:
                groups.setdefault(s["name"], []).append(s)
    rows = []
    for name, slivers in sorted(groups.items()):
        row: dict[str, Any] = {"name": name, "nodes": len(slivers)}
        for f, how in SLICE_AGG.items():
            row[f] = _agg(how, [s[f] for s in slivers if s.get(f) is not None])
        rows.append(row)
    return rows


def site_rows(col: Collector) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in node_rows(col):
        groups.setdefault(r["site"] or "", []).append(r)
    rows = []
    for site, members in sorted(groups.items()):
        row: dict[str, Any] = {"name": site, "nodes": len(members)}
        for f, how in SITE_AGG.items():
            row[f] = _agg(how, [m[f] for m in members
                                if m.get(f) is not None and (f == "up" or m["up"])])
        rows.append(row)
    return rows


ROWS = {"nodes": node_rows, "slices": slice_rows, "sites": site_rows}


def cached_rows(col: Collector, name: str, build: Any) -> list[dict[str, Any]]:
    """Current-value rows, built once per collector generation (every round and node
    list change bumps it) and shared by all queries until the next one."""
    hit = col.views.get(name)
    if hit is not None and hit[0] == col.generation:
        return hit[1]
    rows = build(col)
    col.views[name] = (col.generation, rows)
    return rows


def render(rows: list[dict[str, Any]], fields: list[str], fmt: str) -> Response:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(fields)
        for r in rows:
            w.writerow(["" if r.get(f) is None else r.get(f) for f in fields])
        return Response.text(buf.getvalue(), ctype="text/csv; charset=utf-8")
    if fmt != "json":
        raise QueryError(f"bad format {fmt!r}: use json or csv")
    return Response.json([{f: r.get(f) for f in fields} for r in rows])


Points = tuple[Sequence[float], Sequence[float]]    # timestamps, values (same length)


async def series_points(col: Collector, table: str, entities: list[str], fields: list[str],
                        since: float, until: float, res: str
                        ) -> tuple[dict[tuple[str, str, str], int], dict[int, Points]]:
    """The series of `fields` for `entities` of `table` ({(entity, member, field):
    series id}) and their points in [since, until] at resolution `res`."""
    now = time.time()
    if res == "auto":
        res = "raw" if since >= now - RAW_KEEP else "5m" if since >= now - ROLL5_KEEP else "1h"
    if res not in ("raw", "5m", "1h"):
        raise QueryError(f"bad res {res!r}: use raw, 5m, 1h or auto")
    num = [f for f in fields if f not in TEXT_FIELDS and f != "nodes"]
    # members: entity -> list of (store kind, store entity)
    members: dict[str, list[tuple[str, str]]] = {}
    if table == "nodes":
        members = {e: [("node", e)] for e in entities}
    elif table == "sites":
        for h, st in col.nodes.items():
            if st.entry.site in entities:
                members.setdefault(st.entry.site, []).append(("node", h))
    else:
        want = set(entities)
        for k in col.store.ids:
            if k.kind == "slice":
                sl = k.entity.split("@", 1)[0]
                if sl in want and ("slice", k.entity) not in members.get(sl, []):
                    members.setdefault(sl, []).append(("slice", k.entity))
    sid_of: dict[tuple[str, str, str], int] = {}
    for ent, mem in members.items():
        for kind, e in mem:
            for f in num:
                sid = col.store.ids.get(SeriesKey(kind, e, f))
                if sid is not None:
                    sid_of[(ent, e, f)] = sid
    lo, hi = int(since), int(until)
    pts: dict[int, Points] = {}
    if res == "raw":
        data = await col.store.raw(sid_of.values(), lo, hi)
        for sid, samples in data.items():
            samples.sort()   # blocks of one hour from two collector runs may interleave
            pts[sid] = ([t for t, _ in samples], [v for _, v in samples])
    else:
        arrays = await col.store.rollup_arrays("roll5m" if res == "5m" else "roll1h",
                                               sid_of.values(), lo, hi)
        pts.update(arrays)
    return sid_of, pts


async def series_rows(col: Collector, table: str, entities: list[str], fields: list[str],
                      since: float, until: float, res: str) -> list[dict[str, Any]]:
    """Time-series rows of `fields` for `entities` of `table` in [since, until]."""
    sid_of, pts = await series_points(col, table, entities, fields, since, until, res)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    if table == "nodes":   # one member per entity: no aggregation
        for (ent, _e, f), sid in sid_of.items():
            ts, vs = pts.get(sid, ((), ()))
            for t, v in zip(ts, vs, strict=True):
                row = rows.get((ent, int(t)))
                if row is None:
                    row = rows[(ent, int(t))] = {"name": ent, "ts": int(t)}
                row[f] = v
        return [rows[k] for k in sorted(rows)]
    agg = SLICE_AGG if table == "slices" else SITE_AGG
    acc: dict[tuple[str, int, str], list[float]] = {}
    for (ent, _e, f), sid in sid_of.items():
        ts, vs = pts.get(sid, ((), ()))
        for t, v in zip(ts, vs, strict=True):
            acc.setdefault((ent, int(t), f), []).append(v)
    for (ent, t, f), vals in acc.items():
        row = rows.setdefault((ent, t), {"name": ent, "ts": t})
        row[f] = _agg(agg.get(f, "avg"), vals)
    return [rows[k] for k in sorted(rows)]


async def node_series_answer(col: Collector, entities: list[str], fields: list[str],
                             since: float, until: float, res: str, fmt: str) -> Response:
    """The nodes table's time series, written straight from the stored arrays: the
    same rows and bytes as render(series_rows(...)) (test_collector_query checks),
    without a dict per row. A week of 1000 nodes is 168,000 rows."""
    if fmt not in ("json", "csv"):
        raise QueryError(f"bad format {fmt!r}: use json or csv")
    sid_of, pts = await series_points(col, "nodes", entities, fields, since, until, res)
    by_ent: dict[str, dict[str, int]] = {}
    for (ent, _e, f), sid in sid_of.items():
        by_ent.setdefault(ent, {})[f] = sid
    value_fields = fields[2:]     # after name, ts
    parts: list[str] = []
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(fields)
        parts.append(buf.getvalue())
    for ent in sorted(by_ent):
        have = by_ent[ent]
        if fmt == "json":
            head = "{" + json.dumps("name") + ": " + json.dumps(ent) + ', "ts": '
        else:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="").writerow([ent])
            head = buf.getvalue() + ","
        cols = [f for f in value_fields if f in have]
        if len(cols) == 1 and len(value_fields) == 1:   # the common case: one series
            ts, vs = pts.get(have[cols[0]], ((), ()))
            head = head.replace("%", "%%")
            if fmt == "json":
                head += "%d, " + json.dumps(cols[0]).replace("%", "%%") + ": "
                tail = "}"
            else:
                head += "%d,"
                tail = ""
            # one head string per timestamp, then head + repr(value) + tail: the
            # timestamps repeat over entities (rollup buckets), the strings are made once
            heads = {}
            for t in ts:
                if t not in heads:
                    heads[t] = head % t
            rows = map(str.__add__, map(heads.__getitem__, ts), map(repr, vs))
            parts.extend(map(str.__add__, rows, repeat(tail)) if tail else rows)
            continue
        merged: dict[int, dict[str, float]] = {}
        for f in cols:
            ts, vs = pts.get(have[f], ((), ()))
            for t, v in zip(ts, vs, strict=True):
                merged.setdefault(int(t), {})[f] = v
        for t in sorted(merged):
            row = merged[t]
            if fmt == "json":
                parts.append(head + str(t) + "".join(
                    ", " + json.dumps(f) + ": " + (repr(row[f]) if f in row else "null")
                    for f in value_fields) + "}")
            else:
                parts.append(head + str(t) + "".join(
                    "," + (repr(row[f]) if f in row else "") for f in value_fields))
    if fmt == "json":
        return Response(200, ("[" + ", ".join(parts) + "]").encode(), "application/json")
    return Response(200, (parts[0] + "".join(p + "\n" for p in parts[1:])).encode(),
                    "text/csv; charset=utf-8")


async def handle_query(col: Collector, req: Request) -> Response:
    try:
        q = req.query
        table = q.get("table", "nodes")
        if table not in TABLES:
            raise QueryError(f"bad table {table!r}: use nodes, sites or slices")
        cols = TABLES[table]
        fields = [f.strip() for f in q.get("select", "").split(",") if f.strip()] or list(cols)
        for f in fields:
            if f not in cols and f != "ts":
                raise QueryError(f"unknown field {f!r} in table {table}")
        try:
            where = selectexpr.parse(q.get("where", "").strip().strip("'"), cols)
        except selectexpr.ExprError as e:
            raise QueryError(f"bad where: {e}") from None
        now = time.time()
        since = parse_time(q.get("since"), now, None)
        until = parse_time(q.get("until"), now, now)
        keep = selectexpr.predicate(where)
        rows = [r for r in cached_rows(col, table, ROWS[table]) if keep(r)]
        fmt = q.get("format", "json")
        if since is None:
            return render(rows, fields, fmt)
        assert until is not None
        names = [r["name"] for r in rows]
        out_fields = ["name", "ts"] + [f for f in fields if f not in ("name", "ts")]
        if table == "nodes":
            return await node_series_answer(col, names, out_fields, since, until,
                                            q.get("res", "auto"), fmt)
        srows = await series_rows(col, table, names, out_fields, since, until,
                                  q.get("res", "auto"))
        return render(srows, out_fields, fmt)
    except QueryError as e:
        return Response.text(f"{e}\n", 400)
