"""PLC at fleet scale: N simulated nodes polling GetSlivers every 600 s (N/600 calls/s,
each writing its node's last_contact), S slices spread over them; p50/p99 latency and
achieved rate on PostgreSQL and on SQLite (one front end each, same run), then
saturated GetSlivers throughput with 1, 2 and 4 front ends on PostgreSQL. The last
line printed is one JSON object. Not part of `make test`.

    .venv/bin/python bench/plc_scale.py [--nodes 100000] [--slices 2000] [--seconds 30]

Targets (issue 13): p99 < 50 ms at the full rate; 2 front ends >= 1.6x one. Every
throughput run uses the same 32 closed-loop clients, so only the number of front ends
changes. Each throughput run also prints the most this machine's cores could give at
the CPU per call it measured (front end, PostgreSQL and load generator together):
where 2 front ends reach that bound, the cores, not the front ends, are the limit.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import resource
import signal
import sys
import tempfile
import threading
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plc.api import API  # noqa: E402
from plc.config import Config  # noqa: E402
from plc.initdb import initialise  # noqa: E402
from plc.server import make_server  # noqa: E402
from plc.store import SQLiteStore, Store  # noqa: E402
from plc.store.postgres import PostgresStore  # noqa: E402
from plc.store.transfer import export, import_  # noqa: E402
from tests.plc import pgserver  # noqa: E402

SLICE_NODES = 50  # nodes per slice: 2000 slices x 50 = 100,000 slivers


def populate(store: Store, nodes: int, slices: int, seed: int) -> None:
    """Sites, nodes (each with a session), slices on random nodes: straight SQL."""
    rng = random.Random(seed)
    now = int(time.time())
    conn = store.connect()
    try:
        conn.begin(write=True)
        sites = max(1, nodes // 100)
        for s in range(sites):
            conn.insert("sites", {"site_id": 1000 + s, "login_base": f"s{s}", "name": f"S{s}",
                                  "abbreviated_name": f"S{s}", "max_slices": 100,
                                  "date_created": now, "last_updated": now})
        for n in range(1, nodes + 1):
            conn.insert("nodes", {"node_id": n, "hostname": f"n{n}.example.org",
                                  "site_id": 1000 + n % sites, "boot_state": "boot",
                                  "date_created": now, "last_updated": now})
            conn.insert("sessions", {"session_id": f"sess{n}", "expires": None})
            conn.insert("node_session", {"node_id": n, "session_id": f"sess{n}"})
        for sl in range(1, slices + 1):
            conn.insert("slices", {"slice_id": sl, "site_id": 1000 + sl % sites,
                                   "name": f"s{sl % sites}_x{sl}", "created": now,
                                   "expires": now + 30 * 86400})
            for n in rng.sample(range(1, nodes + 1), min(SLICE_NODES, nodes)):
                conn.insert("slice_node", {"slice_id": sl, "node_id": n})
        conn.commit()
    finally:
        conn.close()


def _front_end(url: str, q: Any) -> None:
    store = PostgresStore(url, pool_size=33) if url.startswith("postgresql") else SQLiteStore(url)
    cfg = Config().replace(api_listen="127.0.0.1:0", api_threads=32,
                           **({"database_url": url} if url.startswith("postgresql")
                              else {"db_path": url}))
    server = make_server(API(store, cfg), cfg)
    q.put(server.server_address[1])
    server.serve_forever(poll_interval=0.05)


def start_front_ends(url: str, n: int) -> tuple[list[str], list[Any]]:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_front_end, args=(url, q), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    return [f"http://127.0.0.1:{q.get(timeout=60)}/PLCAPI/" for _ in procs], procs


def stop(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(timeout=10)


def _client(urls: list[str], nodes: int, rate: float, seconds: float, clients: int,
            idx: int, out: Any) -> None:
    """One load process: open loop at ``rate`` calls/s (0 = closed loop, as fast as
    ``clients`` threads go) for ``seconds``; latencies in ms."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds
    rng = random.Random(idx)

    def worker(k: int) -> None:
        api = xmlrpc.client.ServerProxy(urls[(idx + k) % len(urls)], allow_none=True)
        interval = clients / rate if rate else 0.0
        nxt = time.monotonic() + rng.uniform(0, interval)
        while True:
            if interval:
                delay = nxt - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                nxt += interval
            t = time.monotonic()
            if t >= end:
                return
            try:
                api.GetSlivers({"AuthMethod": "session",
                                "session": f"sess{rng.randint(1, nodes)}"})
                with lock:
                    lat.append((time.monotonic() - t) * 1000)
            except Exception:
                with lock:
                    errors[0] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r = resource.getrusage(resource.RUSAGE_SELF)
    out.put((lat, errors[0], r.ru_utime + r.ru_stime))


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: set[int]) -> float:
    """CPU time (user + system) of these processes and their children."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) in pids or int(fields[1]) in pids:
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def rollbacks(server: Any, db: str) -> int:
    """Transactions rolled back in ``db`` so far (serialisation failures show here:
    GetSlivers never faults in this bench, so every rollback is a re-run)."""
    import psycopg
    with psycopg.connect(server.url(), autocommit=True) as c:
        row = c.execute("SELECT xact_rollback FROM pg_stat_database WHERE datname = %s",
                        [db]).fetchone()
    return int(row[0]) if row else 0


def load(urls: list[str], nodes: int, rate: float, seconds: float,
         procs: int = 2, clients: int = 16, watch: tuple[set[int], set[int]] | None = None,
         pg: Any = None) -> dict[str, Any]:
    """Run the load; with ``watch`` (front-end pids, PostgreSQL postmaster pid), also
    the CPU per call of the front ends and of PostgreSQL, and (``pg``) rollbacks."""
    fe0 = cpu_seconds(watch[0]) if watch else 0.0
    db0 = cpu_seconds(watch[1]) if watch else 0.0
    rb0 = rollbacks(pg, "scale") if pg else 0
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_client, args=(urls, nodes, rate / procs if rate else 0,
                                            seconds, clients, i, q)) for i in range(procs)]
    for p in ps:
        p.start()
    lat: list[float] = []
    errors = 0
    client_cpu = 0.0
    for _ in ps:
        part, err, used = q.get(timeout=seconds + 120)
        lat += part
        errors += err
        client_cpu += used
    for p in ps:
        p.join()
    elapsed = seconds  # the clients stop issuing at t0 + seconds
    lat.sort()

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else -1.0

    out = {"calls": len(lat), "errors": errors, "rate": round(len(lat) / elapsed, 1),
           "p50_ms": pct(0.50), "p99_ms": pct(0.99)}
    if lat:
        out["client_cpu_us_per_call"] = round(client_cpu / len(lat) * 1e6)
    if watch and lat:
        out["fe_cpu_us_per_call"] = round((cpu_seconds(watch[0]) - fe0) / len(lat) * 1e6)
        out["pg_cpu_us_per_call"] = round((cpu_seconds(watch[1]) - db0) / len(lat) * 1e6)
    if pg:
        out["rollbacks"] = rollbacks(pg, "scale") - rb0
    return out


def cores_bound(run: dict[str, Any], cores: int) -> float:
    """Calls per second the machine's `cores` could give at most with the CPU per call
    this run measured: front end, PostgreSQL and load generator share the same cores."""
    per_call = sum(run[k] for k in ("fe_cpu_us_per_call", "pg_cpu_us_per_call",
                                    "client_cpu_us_per_call"))
    return round(cores * 1e6 / per_call, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--slices", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--period", type=float, default=600.0, help="seconds between polls")
    args = ap.parse_args()
    rate = args.nodes / args.period
    server = pgserver.start(max_connections=300, name="bench")
    with open(f"{server.dir}/data/postmaster.pid") as f:
        postmaster = {int(f.readline())}
    result: dict[str, Any] = {"nodes": args.nodes, "slices": args.slices,
                              "target_rate": round(rate, 1), "seconds": args.seconds}
    tmp = tempfile.mkdtemp(prefix=f"plc-scale-{os.getpid()}-")
    try:
        url = server.create_db("scale")
        pg = PostgresStore(url)
        t = time.monotonic()
        initialise(pg, "admin@bench.example.org", "bench-pw", "pl")
        populate(pg, args.nodes, args.slices, seed=1)
        dump = io.StringIO()
        export(pg, dump)
        pg.close()
        lite = SQLiteStore(Path(tmp) / "scale.db")
        import_(lite, io.StringIO(dump.getvalue()))
        del dump
        result["populate_s"] = round(time.monotonic() - t, 1)
        print(f"populated in {result['populate_s']} s", flush=True)
        for name, db in (("postgres", url), ("sqlite", lite.path)):
            urls, procs = start_front_ends(db, 1)
            try:
                result[f"{name}_full_rate"] = load(
                    urls, args.nodes, rate, args.seconds,
                    watch=({p.pid for p in procs}, postmaster if name == "postgres" else set()),
                    pg=server if name == "postgres" else None)
            finally:
                stop(procs)
            print(name, result[f"{name}_full_rate"], flush=True)
        for n in (1, 2, 4):
            urls, procs = start_front_ends(url, n)
            try:
                result[f"postgres_throughput_{n}fe"] = load(urls, args.nodes, 0,
                                                            args.seconds / 2, procs=2,
                                                            clients=16,
                                                            watch=({p.pid for p in procs},
                                                                   postmaster), pg=server)
            finally:
                stop(procs)
            print(f"{n} front ends", result[f"postgres_throughput_{n}fe"], flush=True)
        one = result["postgres_throughput_1fe"]["rate"] or 1
        result["speedup_2fe"] = round(result["postgres_throughput_2fe"]["rate"] / one, 2)
        result["speedup_4fe"] = round(result["postgres_throughput_4fe"]["rate"] / one, 2)
        cores = os.cpu_count() or 1
        for n in (1, 2, 4):
            run = result[f"postgres_throughput_{n}fe"]
            run["cores_bound_rate"] = cores_bound(run, cores)
            print(f"{n} front end(s): {run['rate']} calls/s of at most "
                  f"{run['cores_bound_rate']} that {cores} cores allow at the CPU per call "
                  f"measured", flush=True)
        print(f"2 front ends / 1: {result['speedup_2fe']}x (target 1.6x)", flush=True)
        result["cpus"] = os.cpu_count()
    finally:
        server.stop()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
