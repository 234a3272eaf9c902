"""PLC benchmark (issue 2): populate, GetSlivers latency, GetNodes throughput vs. a ceiling.

1. Populate a fresh `plc serve` over XML-RPC: 100 sites, 1000 nodes, 2000 slices each on
   10 nodes with 5 slice tags (batched with system.multicall, 8 clients at once).
2. GetSlivers for a node with 50 slivers (node session auth, as NodeManager polls):
   median and p99 latency of sequential calls. Target: p99 under 20 ms.
3. GetNodes (one node by hostname, all fields; session auth) calls/s with 8 concurrent
   keep-alive clients, each a process.
4. The ceiling, in the same run: a stdlib XML-RPC server (threaded, HTTP/1.1 keep-alive)
   answering GetNodes with a canned reply of the same size to the same 8 clients.
   Both servers run side by side and are measured in interleaved rounds (medians), so
   that load from other work on the machine hits both alike.
   Target: GetNodes at least 70% of the ceiling's calls/s.

Prints its figures with the reference; the last line is one JSON object.
Run as `.venv/bin/python bench/plc.py` (add `--quick` for a smaller smoke run).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

import prctl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "plc"))
from plc_live import LiveServer, remove_workdir, start_server  # noqa: E402

CLIENTS = 8
ROUNDS = 3
TAGS = (("cpu_share", "3"), ("disk_max", "5000000"), ("net_max_rate", "1000"),
        ("net_min_rate", "10"), ("vsys", "pubkey"))


def multicall(proxy: xmlrpc.client.ServerProxy, calls: list[dict[str, Any]]) -> list[Any]:
    results: Any = proxy.system.multicall(calls)
    out = []
    for call, res in zip(calls, results, strict=True):
        if isinstance(res, dict):
            raise RuntimeError(f"{call['methodName']} failed: {res.get('faultString')}")
        out.append(res[0])
    return out


def in_parallel(jobs: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def chunks(seq: list[Any], n: int) -> list[list[Any]]:
    return [seq[i::n] for i in range(n)]


def populate(srv: LiveServer, auth: dict[str, Any], sites: int, nodes_per_site: int,
             slices: int, nodes_per_slice: int, hot_slivers: int) -> tuple[float, str, int]:
    """Returns (seconds, hostname of the hot node, its number of slivers)."""
    t0 = time.perf_counter()
    api = srv.proxy()
    site_calls = [{"methodName": "AddSite", "params": [auth, {
        "name": f"Bench site {i}", "abbreviated_name": f"B{i}", "login_base": f"b{i:03d}",
        "max_slices": slices // sites + 1}]} for i in range(sites)]
    multicall(api, site_calls)
    hosts = [f"n{s:03d}-{j}.bench.example.org" for s in range(sites)
             for j in range(nodes_per_site)]

    def add_nodes(part: list[str]) -> None:
        proxy = srv.proxy()
        for i in range(0, len(part), 100):
            multicall(proxy, [{"methodName": "AddNode", "params": [
                auth, f"b{h[1:4]}", {"hostname": h}]} for h in part[i:i + 100]])

    in_parallel([functools.partial(add_nodes, p) for p in chunks(hosts, CLIENTS)])
    hot = hosts[0]
    others = hosts[1:]
    plan: list[tuple[str, list[str]]] = []
    for k in range(slices):
        nodes = [others[(k * nodes_per_slice + m) % len(others)] for m in range(nodes_per_slice)]
        if k < hot_slivers:
            nodes[0] = hot
        plan.append((f"b{k % sites:03d}_s{k}", nodes))

    def add_slices(part: list[tuple[str, list[str]]]) -> None:
        proxy = srv.proxy()
        for i in range(0, len(part), 20):
            batch = part[i:i + 20]
            multicall(proxy, [{"methodName": "AddSlice", "params": [auth, {"name": n}]}
                              for n, _ in batch])
            calls = []
            for name, nodes in batch:
                calls.append({"methodName": "AddSliceToNodes", "params": [auth, name, nodes]})
                calls += [{"methodName": "AddSliceTag", "params": [auth, name, t, v]}
                          for t, v in TAGS]
            multicall(proxy, calls)

    in_parallel([functools.partial(add_slices, p) for p in chunks(plan, CLIENTS)])
    seconds = time.perf_counter() - t0
    (node,) = api.GetNodes(auth, [hot], ["slice_ids"])  # type: ignore[misc]
    return seconds, hot, len(node["slice_ids"])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def bench_getslivers(srv: LiveServer, hostname: str, calls: int) -> dict[str, float]:
    import hashlib
    import hmac

    key = srv.node_key(hostname)
    api = srv.proxy()
    (node,) = api.GetNodes(srv.admin_auth, [hostname], ["node_id"])  # type: ignore[misc]
    digest = hmac.new(key.encode(), b"[]", hashlib.sha1).hexdigest()
    session = api.GetSession({"AuthMethod": "hmac", "node_id": node["node_id"], "value": digest})
    auth = {"AuthMethod": "session", "session": session}
    for _ in range(10):  # warm up
        result: Any = api.GetSlivers(auth)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        result = api.GetSlivers(auth)
        times.append((time.perf_counter() - t) * 1000)
    return {"slivers": len(result["slivers"]), "median_ms": statistics.median(times),
            "p99_ms": percentile(times, 99), "calls": calls}


def _client_loop(url: str, auth: Any, hostname: str, start: float, seconds: float,
                 out: Any) -> None:
    proxy = xmlrpc.client.ServerProxy(url, allow_none=True)
    proxy.GetNodes(auth, hostname)  # connect and warm up before the clock starts
    while time.time() < start:
        time.sleep(0.001)
    n = 0
    end = start + seconds
    while time.time() < end:
        proxy.GetNodes(auth, hostname)
        n += 1
    out.put(n)


def throughput(url: str, auth: Any, hostname: str, seconds: float) -> float:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start = time.time() + 1.0
    procs = [ctx.Process(target=_client_loop, args=(url, auth, hostname, start, seconds, out))
             for _ in range(CLIENTS)]
    for p in procs:
        p.start()
    try:
        total = sum(out.get(timeout=seconds + 60) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    return total / seconds


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (the forked
    workers of either server), from /proc; 0 for what has gone."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class _KeepAliveHandler(SimpleXMLRPCRequestHandler):
    protocol_version = "HTTP/1.1"
    rpc_paths = ("/PLCAPI/",)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadedXMLRPCServer(ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True


def _ceiling_server(reply: Any, ready: Any, processes: int) -> None:
    """The stdlib server, pre-forked into as many processes as `plc serve` uses, all
    accepting on one listening socket: the same use of the machine's cores as PLC."""
    server = _ThreadedXMLRPCServer(("127.0.0.1", 0), _KeepAliveHandler, allow_none=True,
                                   logRequests=False)
    server.register_function(lambda *args: reply, "GetNodes")
    children = []
    for _ in range(processes - 1):
        pid = os.fork()
        if pid == 0:
            try:
                # The parent is stopped with SIGKILL: go with it.
                prctl.set_pdeathsig(signal.SIGKILL)
                server.serve_forever()
            finally:
                os._exit(0)
        children.append(pid)
    ready.put(server.server_address[1])
    try:
        server.serve_forever()
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast smoke run")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="per server, split over the interleaved rounds")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes of `plc serve` and of the ceiling server alike")
    args = parser.parse_args(argv)
    if args.quick:
        shape = dict(sites=10, nodes_per_site=10, slices=120, nodes_per_slice=10, hot_slivers=50)
        sliver_calls, seconds = 100, 2.0
    else:
        shape = dict(sites=100, nodes_per_site=10, slices=2000, nodes_per_slice=10,
                     hot_slivers=50)
        sliver_calls, seconds = 1000, args.seconds

    load_start = os.getloadavg()[0]
    print(f"load average (1 min) at start: {load_start:.2f} on {os.cpu_count()} CPUs")
    workdir = Path(tempfile.mkdtemp(prefix=f"plc-bench-{os.getpid()}-"))
    ceiling_proc = None
    srv = None
    try:
        srv = start_server(workdir, prefix="pl", extra_args=("--workers", str(args.workers)))
        api = srv.proxy()
        session = api.GetSession(srv.admin_auth)
        auth = {"AuthMethod": "session", "session": session}
        print(f"populating {shape} ...", flush=True)
        pop_s, hot, hot_n = populate(srv, auth, **shape)
        print(f"populate: {pop_s:.1f} s "
              f"({shape['sites']} sites, {shape['sites'] * shape['nodes_per_site']} nodes, "
              f"{shape['slices']} slices x {shape['nodes_per_slice']} nodes x {len(TAGS)} tags)")
        gs = bench_getslivers(srv, hot, sliver_calls)
        print(f"GetSlivers ({hot}, {hot_n} slices bound, {gs['slivers']} slivers returned, "
              f"{sliver_calls} calls): median {gs['median_ms']:.2f} ms, "
              f"p99 {gs['p99_ms']:.2f} ms (target p99 < 20 ms)")

        host = "n050-3.bench.example.org" if not args.quick else "n005-3.bench.example.org"
        reply = api.GetNodes(auth, host)
        reply_size = len(xmlrpc.client.dumps((reply,), methodresponse=True,
                                             allow_none=True).encode())
        ctx = mp.get_context("fork")
        ready = ctx.Queue()
        ceiling_proc = ctx.Process(target=_ceiling_server, args=(reply, ready, args.workers),
                                   daemon=True)
        ceiling_proc.start()
        port = ready.get(timeout=30)
        ceiling_url = f"http://127.0.0.1:{port}/PLCAPI/"
        # Interleaved rounds, medians: the machine is shared, and load that comes and goes
        # then hits both sides alike instead of skewing the ratio.
        plc_rates, ceiling_rates = [], []
        plc_cpu, ceiling_cpu = [], []  # server CPU per call (warm-up calls included)
        assert srv.proc is not None and ceiling_proc.pid is not None
        for _ in range(ROUNDS):
            cpu0 = _cpu_seconds(srv.proc.pid)
            plc_rates.append(throughput(srv.url, auth, host, seconds / ROUNDS))
            plc_cpu.append((_cpu_seconds(srv.proc.pid) - cpu0) /
                           (plc_rates[-1] * seconds / ROUNDS + CLIENTS))
            cpu0 = _cpu_seconds(ceiling_proc.pid)
            ceiling_rates.append(throughput(ceiling_url, auth, host, seconds / ROUNDS))
            ceiling_cpu.append((_cpu_seconds(ceiling_proc.pid) - cpu0) /
                               (ceiling_rates[-1] * seconds / ROUNDS + CLIENTS))
        plc_rate = statistics.median(plc_rates)
        ceiling_rate = statistics.median(ceiling_rates)
        ratio = plc_rate / ceiling_rate if ceiling_rate else 0.0
        print(f"GetNodes (one node by hostname, all fields, {reply_size} byte reply), "
              f"{CLIENTS} clients: {plc_rate:.0f} calls/s "
              f"(rounds: {', '.join(f'{r:.0f}' for r in plc_rates)})")
        print(f"ceiling: stdlib XML-RPC server ({args.workers} processes like plc serve, "
              f"threaded, HTTP/1.1 keep-alive), canned "
              f"{reply_size} byte reply, {CLIENTS} clients: {ceiling_rate:.0f} calls/s "
              f"(rounds: {', '.join(f'{r:.0f}' for r in ceiling_rates)})")
        print(f"GetNodes / ceiling = {ratio:.0%} (target >= 70%)")
        print(f"server CPU per call (all processes; steadier than calls/s on a busy "
              f"machine): GetNodes {statistics.median(plc_cpu) * 1e6:.0f} us, ceiling "
              f"{statistics.median(ceiling_cpu) * 1e6:.0f} us")
        result = {
            "populate_s": round(pop_s, 2), "shape": shape,
            "getslivers_slivers": gs["slivers"], "getslivers_median_ms": round(gs["median_ms"], 3),
            "getslivers_p99_ms": round(gs["p99_ms"], 3), "getslivers_p99_target_ms": 20,
            "getnodes_calls_per_s": round(plc_rate, 1),
            "ceiling_calls_per_s": round(ceiling_rate, 1), "reply_bytes": reply_size,
            "getnodes_vs_ceiling": round(ratio, 3), "getnodes_vs_ceiling_target": 0.7,
            "getnodes_server_cpu_us_per_call": round(statistics.median(plc_cpu) * 1e6, 1),
            "ceiling_server_cpu_us_per_call": round(statistics.median(ceiling_cpu) * 1e6, 1),
            "clients": CLIENTS, "rounds": ROUNDS, "server_processes": args.workers,
            "loadavg_1m_start": round(load_start, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(result, sort_keys=True))
        return 0
    finally:
        if ceiling_proc is not None:
            ceiling_proc.kill()
            ceiling_proc.join()
        if srv is not None:
            srv.stop()
        remove_workdir(workdir)


if __name__ == "__main__":
    sys.exit(main())
