"""Queries and CoMon tabulator answers against what the collector stored."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import tempfile
import time
from urllib.parse import quote

import pytest

from sensors import selectexpr
from tests.sensors.collector_fixture import fleet, get
from tests.sensors.fakenode import SLICES, node_figures, slice_figures

ROUNDS = 3


def test_selectexpr_comon_scripts() -> None:
    cols = ("resptime", "1 minload", "liveslices", "drift", "dns1udp", "dns2udp",
            "gbfree", "sshstatus", "address", "name", "keyok")
    row = {"resptime": 3.0, "1 minload": 2.0, "liveslices": 2, "drift": 10, "dns1udp": None,
           "dns2udp": None, "gbfree": 50, "sshstatus": 0, "address": 167772162,
           "name": "a.b", "keyok": None}
    ok = lambda e, r=row: selectexpr.matches(selectexpr.parse(e, cols), r)  # noqa: E731
    assert ok("resptime>0&&1 minload<5&&liveslices<=5")
    assert ok("resptime > 0 && ((drift > 1m || (dns1udp > 80 && dns2udp > 80) || "
              "gbfree < 5 || sshstatus > 2h) == 0)")
    assert not ok("resptime > 0 && ((drift > 1m || gbfree < 5) == 0)", {**row, "drift": 61})
    assert ok("address==167772161||address==167772162")
    assert ok('name == "a.b"') and ok("keyok==null") and not ok("dns1udp > 0")
    assert ok("!(resptime == 0)") and ok("-resptime < 0") and ok("1 minload * 2 == 4")
    for bad in ("__import__('os')", "resptime >", "(resptime", "foo > 1", "resptime $ 1"):
        with pytest.raises(selectexpr.ExprError):
            selectexpr.parse(bad, cols)


async def _collect(tmpdir: str):
    async with fleet(tmpdir) as (col, _servers, port):
        t0 = int(time.time()) - 10 * ROUNDS
        for r in range(ROUNDS):
            await col.poll_round(now=t0 + 10 * r)
        results = {}
        q = {
            "latest": "/query?table=nodes&format=json",
            "latest_csv": "/query?table=nodes&select=name,load1,cpu_pct&format=csv",
            "where": "/query?table=nodes&select=name,load1&where=" +
                     quote("load1 >= 1 && site == \"princeton\""),
            "series": f"/query?table=nodes&select=load1,tx_rate&since={t0}&until={t0 + 100}",
            "slices": "/query?table=slices&format=json",
            "slice_series": f"/query?table=slices&select=cpu_pct,mem_bytes&since={t0}",
            "sites": "/query?table=sites",
            "names": "/status/tabulator.cgi?table=table_nodeviewshort&format=nameonly"
                     "&select=" + quote("'resptime>0&&1 minload<5&&liveslices<=5'"),
            "noclose": "/status/tabulator.cgi?table=table_nodeviewshort&format=nameonly"
                       "&persite=1&select=" + quote("'resptime>0"),
            "csv": "/status/tabulator.cgi?table=table_nodeviewshort&format=formatcsv"
                   "&dumpcols=" + quote("'name,1 minload,memsize,gbfree,address'"),
            "spaces": "/status/tabulator.cgi?table=table_slicestat&format=formatspaces",
            "html": "/status/tabulator.cgi?table=table_nodeviewshort",
            "bad_field": "/query?select=nope",
            "bad_where": "/query?where=" + quote("load1 >"),
            "bad_table": "/status/tabulator.cgi?table=x",
            "bad_col": "/status/tabulator.cgi?dumpcols=nope",
        }
        for k, path in q.items():
            results[k] = await get(port, path)
        raw = {}
        for host in col.nodes:
            sids = [col.store.ids[k] for k in col.store.ids
                    if k.kind == "node" and k.entity == host and k.field in ("load1", "tx_rate")]
            data = await col.store.raw(sids, t0, t0 + 100)
            raw[host] = {col.store.keys[s].field: v for s, v in data.items()}
        return t0, results, raw, {h: st.entry.site for h, st in col.nodes.items()}


def test_queries_and_tabulator_match_stored_samples() -> None:
    with tempfile.TemporaryDirectory(prefix=f"scq{os.getpid()}") as d:
        t0, res, raw, sites = asyncio.run(_collect(d))
    hosts = sorted(sites)
    seed = {h: int(h[4]) + 1 for h in hosts}
    st, body = res["latest"]
    assert st == 200
    latest = {r["name"]: r for r in json.loads(body)}
    assert sorted(latest) == hosts
    for h in hosts:
        fig = node_figures(h, seed[h], ROUNDS)
        assert latest[h]["load1"] == fig["load1"] and latest[h]["cpu_pct"] == fig["cpu_pct"]
        assert latest[h]["up"] == 1 and latest[h]["site"] == sites[h]
        assert latest[h]["tx_rate"] == 80_000 / 10 and latest[h]["kernel"] == "6.1.0-fake"
    st, body = res["latest_csv"]
    rows = list(csv.reader(io.StringIO(body)))
    assert rows[0] == ["name", "load1", "cpu_pct"] and len(rows) == 1 + len(hosts)
    st, body = res["where"]
    want = sorted(h for h in hosts if latest[h]["load1"] >= 1 and sites[h] == "princeton")
    assert sorted(r["name"] for r in json.loads(body)) == want
    # time series: exactly the stored raw samples, ROUNDS per node for load1
    st, body = res["series"]
    series = json.loads(body)
    for h in hosts:
        mine = [r for r in series if r["name"] == h]
        assert [(r["ts"], r["load1"]) for r in mine] == raw[h]["load1"]
        assert [r["ts"] for r in mine] == [t0 + 10 * r for r in range(ROUNDS)]
        assert [node_figures(h, seed[h], k)["load1"] for k in (1, 2, 3)] == \
            [r["load1"] for r in mine]
        assert [r["tx_rate"] for r in mine if r.get("tx_rate") is not None] == \
            [v for _, v in raw[h]["tx_rate"]] == [8000.0, 8000.0]
    # slices: aggregates over the slivers of up nodes
    st, body = res["slices"]
    sl = {r["name"]: r for r in json.loads(body)}
    for i, name in enumerate(SLICES):
        on = [h for h in hosts if len(slice_figures(seed[h], 1)) > i]
        assert sl[name]["nodes"] == len(on)
        assert sl[name]["mem_bytes"] == len(on) * (i + 1) * (64 << 20)
        assert sl[name]["cpu_pct"] == pytest.approx(len(on) * 10.0 * (i + 1) / 10 * 100)
    st, body = res["slice_series"]
    ss = [r for r in json.loads(body) if r["name"] == "pl_alpha"]
    assert [r["ts"] for r in ss] == [t0 + 10 * r for r in range(ROUNDS)]
    assert all(r["mem_bytes"] == len(hosts) * (64 << 20) for r in ss)
    st, body = res["sites"]
    si = {r["name"]: r for r in json.loads(body)}
    assert si["princeton"]["nodes"] == 2 and si["princeton"]["up"] == 2
    assert si["mit"]["load1"] == pytest.approx(
        sum(latest[h]["load1"] for h in hosts if sites[h] == "mit") / 2)
    # tabulator
    st, body = res["names"]
    want = sorted(h for h in hosts if latest[h]["load1"] < 5 and latest[h]["liveslices"] <= 5)
    assert st == 200 and body.split() == want
    st, body = res["noclose"]
    assert st == 200 and len(body.split()) == len(set(sites.values()))
    st, body = res["csv"]
    lines = body.strip().split("\n")
    assert lines[0] == "name, 1 minload, memsize, gbfree, address"
    first = dict(zip(lines[0].split(", "), lines[1].split(", "), strict=True))
    h = first["name"]
    assert float(first["1 minload"]) == latest[h]["load1"]
    assert first["memsize"] == "8192" and first["address"] == "2130706433"
    assert float(first["gbfree"]) == 100 - (40 + seed[h])
    st, body = res["spaces"]
    assert body.split("\n")[0].split()[:3] == ["name", "nodes", "cpu"]
    assert [ln.split()[0] for ln in body.strip().split("\n")[1:]] == sorted(SLICES)
    st, body = res["html"]
    assert st == 200 and "<table>" in body and hosts[0] in body
    for k in ("bad_field", "bad_where", "bad_table", "bad_col"):
        assert res[k][0] == 400, (k, res[k])
    assert "nope" in res["bad_field"][1] and "nope" in res["bad_col"][1]


def test_node_series_answer_is_render_of_series_rows() -> None:
    """The nodes table's series are written straight from the stored arrays: byte for
    byte what rendering the generic rows gives, raw and rolled up, one field or
    several (with gaps), JSON and CSV."""
    from sensors import query
    from sensors.collector import Collector, Config, NodeEntry, NodeState
    from sensors.tsstore import SeriesKey, TSStore

    async def go(path: str) -> None:
        store = await TSStore.open_path(path)
        col = Collector(Config(db=""), store)
        now = int(time.time())
        start = now - 3 * 86400
        for i, h in enumerate(("a,1.x", "b%d.x", 'c"q.x')):
            col.nodes[h] = NodeState(NodeEntry(h, "127.0.0.1", 3100, "s"))
            load = await store.series_id(SeriesKey("node", h, "load1"))
            tx = await store.series_id(SeriesKey("node", h, "tx_rate"))
            for ts in range(start, now, 600):
                store.append(load, ts, ((ts // 600 + i) % 40) / 7, 100)
                if ts % 1800:                       # tx_rate has gaps
                    store.append(tx, ts, ts % 977 + 0.5, 1)
                if ts % 3600 < 600:
                    await store.flush(ts)
        await store.flush(now)
        await store.retention(now)
        names = sorted(col.nodes)
        for res, since in (("raw", now - 86400), ("5m", start), ("1h", start)):
            for fields in (["name", "ts", "load1"], ["name", "ts", "load1", "tx_rate"],
                           ["name", "ts", "tx_rate", "address"]):
                for fmt in ("json", "csv"):
                    fast = await query.node_series_answer(col, names, fields, since, now,
                                                          res, fmt)
                    rows = await query.series_rows(col, "nodes", names, fields, since, now,
                                                   res)
                    slow = query.render(rows, fields, fmt)
                    assert rows and fast.body == slow.body, (res, fields, fmt)
                    assert fast.ctype == slow.ctype
        await store.close()
    with tempfile.TemporaryDirectory(prefix=f"scq{os.getpid()}") as d:
        asyncio.run(go(os.path.join(d, "s.db")))
