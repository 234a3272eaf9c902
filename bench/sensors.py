"""Sensors bench (issue 11). Last line: one JSON object.

0. Node side: bench/sensors_node.py's measurement at 1000 slivers (node_* keys).

1. Polling: 1000 simulated node servers (tests/sensors/fakenode.py, in a child process,
   on loopback) polled by the collector for ROUNDS rounds: seconds per round.
2. Store throughput and size: SAMPLE_ROUNDS rounds of every node's figures (as the
   collector stores them, 60 s apart) appended and flushed: samples stored per second
   and bytes per stored sample (database file after VACUUM / samples). The same
   samples written as plain SQLite rows (one row per sample: series, ts, value) in
   the same run, for comparison.
3. Queries: latest values of 10,000 nodes (`/query` handler, select=name,load1,cpu_pct
   where=load1<2, and the tabulator nameonly with a CoMon select): p50/p99 ms.
   A week of load1 for 1000 nodes (5-minute samples, rolled up by the retention pass):
   `/query ... since=-7d` at res=1h and res=5m, and the plain-rows equivalent.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# BENCH_TREE: the source tree measured (default this one); bench/sensors_compare.py
# runs this same script over an older commit's tree for a side-by-side.
TREE = os.environ.get("BENCH_TREE") or str(Path(__file__).resolve().parents[1])
sys.path.insert(0, TREE)

from sensors import query, tabulator  # noqa: E402
from sensors.collecthttp import Request  # noqa: E402
from sensors.collector import Collector, Config, NodeEntry, NodeState  # noqa: E402
from sensors.tsstore import SeriesKey, TSStore  # noqa: E402
from tests.sensors.fakenode import node_figures, slice_figures  # noqa: E402

NODES = int(os.environ.get("BENCH_NODES", "1000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SAMPLE_ROUNDS = int(os.environ.get("BENCH_SAMPLE_ROUNDS", "60"))
QUERY_NODES = 10_000
WEEK = 7 * 86400
WEEK_STEP = 300

SERVERS = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from tests.sensors.fakenode import serve_fake
async def main(n):
    ports = []
    for i in range(n):
        s = await serve_fake("127.0.0.1", 0, f"n{i}.site{i // 2}.bench", i)
        ports.append(s.sockets[0].getsockname()[1])
    print(" ".join(map(str, ports)), flush=True)
    await asyncio.Event().wait()
asyncio.run(main(int(sys.argv[2])))
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def bench_poll(tmp: str) -> dict[str, float]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    proc = subprocess.Popen([sys.executable, "-c", SERVERS, TREE,
                             str(NODES)], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: resource.setrlimit(
                                resource.RLIMIT_NOFILE, (min(hard, 65536), hard)))
    try:
        assert proc.stdout is not None
        ports = [int(p) for p in proc.stdout.readline().split()]
        entries = [NodeEntry(f"n{i}.site{i // 2}.bench", "127.0.0.1", p, f"site{i // 2}")
                   for i, p in enumerate(ports)]
        store = await TSStore.open_path(os.path.join(tmp, "poll.db"))
        col = Collector(Config(db="", timeout=10.0, concurrency=1000, nodes=entries), store)
        times, stored = [], []
        for _ in range(ROUNDS):
            t0 = time.monotonic()
            stored.append(await col.poll_round())
            times.append(time.monotonic() - t0)
        down = sum(1 for st in col.nodes.values() if not st.up)
        await store.close()
    finally:
        proc.kill()
        proc.wait()
    return {"round_s_max": max(times), "round_s_median": statistics.median(times),
            "samples_per_round": stored[-1], "nodes_down": down}


def node_samples(i: int, k: int) -> tuple[dict[str, float], list[tuple[str, dict[str, float]]]]:
    fig = node_figures(f"n{i}", i, k)
    vals = {f: float(v) for f, v in fig.items() if isinstance(v, (int, float))}
    vals.update(up=1.0, resptime=2.0 + (k + i) % 3, rx_rate=50_000 / 60, tx_rate=80_000 / 60,
                slices=3.0, liveslices=3.0)
    sl = []
    for s in slice_figures(i, k):
        sv = {f: float(v) for f, v in s.items() if isinstance(v, (int, float))}
        sv["ports"] = 1.0
        sv["cpu_pct"] = 100.0 * (i % 3 + 1) / 6
        sl.append((f"{s['name']}@n{i}", sv))
    return vals, sl


async def bench_store(tmp: str) -> dict[str, float]:
    path = os.path.join(tmp, "store.db")
    store = await TSStore.open_path(path)
    t_start = 1_800_000_000 - 1_800_000_000 % 3600
    pre = [[node_samples(i, k) for i in range(NODES)] for k in range(SAMPLE_ROUNDS)]
    n = 0
    t0 = time.perf_counter()
    for k in range(SAMPLE_ROUNDS):
        ts = t_start + 60 * k
        for i, (vals, sl) in enumerate(pre[k]):
            n += await store.append_many("node", f"n{i}", ts, vals)
            for ent, sv in sl:
                n += await store.append_many("slice", ent, ts, sv)
        await store.flush(ts)
    elapsed = time.perf_counter() - t0
    await store.close()
    con = sqlite3.connect(path)
    con.execute("VACUUM")
    con.close()
    size = os.path.getsize(path)
    # the same samples as plain SQLite rows
    ppath = os.path.join(tmp, "plain.db")
    con = sqlite3.connect(ppath)
    con.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                      "CREATE TABLE samples(series TEXT, ts INTEGER, value REAL);"
                      "CREATE INDEX samples_i ON samples(series, ts);")
    t0 = time.perf_counter()
    for k in range(SAMPLE_ROUNDS):
        ts = t_start + 60 * k
        rows = []
        for i, (vals, sl) in enumerate(pre[k]):
            rows.extend((f"node/n{i}/{f}", ts, v) for f, v in vals.items())
            for ent, sv in sl:
                rows.extend((f"slice/{ent}/{f}", ts, v) for f, v in sv.items())
        con.executemany("INSERT INTO samples VALUES(?,?,?)", rows)
        con.commit()
    plain_elapsed = time.perf_counter() - t0
    con.execute("VACUUM")
    con.close()
    psize = os.path.getsize(ppath)
    return {"samples": n, "samples_per_s": n / elapsed, "bytes_per_sample": size / n,
            "plain_samples_per_s": n / plain_elapsed, "plain_bytes_per_sample": psize / n}


async def bench_latest(tmp: str) -> dict[str, float]:
    store = await TSStore.open_path(os.path.join(tmp, "latest.db"))
    col = Collector(Config(db=""), store)
    ts = int(time.time())
    for i in range(QUERY_NODES):
        h = f"n{i}.site{i // 2}.bench"
        col.nodes[h] = NodeState(NodeEntry(h, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                                           3100, f"site{i // 2}"), last_ok=ts, resptime=3.0)
        vals, _ = node_samples(i, 1)
        await store.append_many("node", h, ts, vals)
    await store.flush()
    col.generation += 1   # as at the end of a round: the next query rebuilds the views
    t0 = time.perf_counter()
    for name, build in (("nodes", query.node_rows),
                        ("comon_nodes", tabulator.comon_node_rows)):
        query.cached_rows(col, name, build)
    rebuild_ms = (time.perf_counter() - t0) * 1000
    reqs = {
        "query": Request("GET", "/query", {"select": "name,load1,cpu_pct",
                                           "where": "load1 < 2", "format": "json"}),
        "tabulator": Request("GET", "/status/tabulator.cgi", {
            "table": "table_nodeviewshort", "format": "nameonly",
            "select": "'resptime>0&&1 minload<5&&liveslices<=5'"}),
    }
    out: dict[str, float] = {"latest_views_rebuild_ms": rebuild_ms}
    for name, req in reqs.items():
        lat = []
        for _ in range(40):
            t0 = time.perf_counter()
            r = await (query.handle_query(col, req) if name == "query"
                       else tabulator.handle_tabulator(col, req))
            lat.append((time.perf_counter() - t0) * 1000)
            assert r.status == 200, r.body[:200]
        out[f"latest_{name}_p50_ms"] = pct(lat, 50)
        out[f"latest_{name}_p99_ms"] = pct(lat, 99)
    await store.close()
    return out


async def bench_week(tmp: str) -> dict[str, float]:
    path = os.path.join(tmp, "week.db")
    store = await TSStore.open_path(path)
    col = Collector(Config(db=""), store)
    now = int(time.time())
    start = now - WEEK
    hosts = [f"n{i}.site{i // 2}.bench" for i in range(NODES)]
    for i, h in enumerate(hosts):
        col.nodes[h] = NodeState(NodeEntry(h, "127.0.0.1", 3100, f"site{i // 2}"),
                                 last_ok=now)
    sids = [await store.series_id(SeriesKey("node", h, "load1")) for h in hosts]
    plain = sqlite3.connect(os.path.join(tmp, "weekplain.db"))
    plain.executescript("CREATE TABLE samples(series TEXT, ts INTEGER, value REAL);"
                        "CREATE INDEX samples_i ON samples(series, ts);")
    rows = []
    for ts in range(start, now, WEEK_STEP):
        for i, sid in enumerate(sids):
            v = ((ts // 600 + i) % 40) / 10
            store.append(sid, ts, v, 100)
            rows.append((f"node/{hosts[i]}/load1", ts, v))
        if ts % 3600 < WEEK_STEP:
            await store.flush(ts)
            plain.executemany("INSERT INTO samples VALUES(?,?,?)", rows)
            rows = []
    await store.flush(now)
    plain.executemany("INSERT INTO samples VALUES(?,?,?)", rows)
    plain.commit()
    await store.retention(now)
    out: dict[str, float] = {}
    for res, reps in (("1h", 5), ("5m", 1)):
        lat = []
        for _ in range(reps):
            req = Request("GET", "/query", {"select": "load1", "since": "-7d", "res": res})
            t0 = time.perf_counter()
            r = await query.handle_query(col, req)
            lat.append((time.perf_counter() - t0) * 1000)
            assert r.status == 200
        out[f"week_{res}_ms"] = statistics.median(lat)
        out[f"week_{res}_rows"] = len(json.loads(r.body))
    lat = []
    for _ in range(3):
        t0 = time.perf_counter()
        got = plain.execute("SELECT series, ts/3600*3600, avg(value) FROM samples WHERE ts >= ? "
                            "GROUP BY series, ts/3600", (start,)).fetchall()
        lat.append((time.perf_counter() - t0) * 1000)
    out["week_plain_sql_1h_ms"] = statistics.median(lat)
    out["week_plain_sql_rows"] = len(got)
    plain.close()
    await store.close()
    return out


async def bench_node(tmp: str) -> dict[str, float]:
    """The node side (bench/sensors_node.py, its own process: real sliver cgroups):
    CPU per collection at 1000 slivers and cached answer p99, keys prefixed node_.
    BENCH_NODE=0 skips it (it needs root and cgroups)."""
    if os.environ.get("BENCH_NODE", "1") == "0" or os.geteuid() != 0:
        return {}
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "sensors_node.py"),
                          os.environ.get("BENCH_SLIVERS", "1000"), "--child"],
                         env={**os.environ, "SENSORS_BENCH_TREE": TREE}, check=True,
                         capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    return {f"node_{k}": v for k, v in got.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


async def main() -> dict[str, float]:
    result: dict[str, float] = {"nodes": NODES}
    with tempfile.TemporaryDirectory(prefix=f"bsens{os.getpid()}") as tmp:
        for step in (bench_node, bench_poll, bench_store, bench_latest, bench_week):
            t0 = time.monotonic()
            part = await step(tmp)
            print(f"{step.__name__}: {part} ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
            result.update(part)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
