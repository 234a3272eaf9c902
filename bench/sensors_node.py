"""Node sensor cost at N slivers (default 1000): CPU per collection, cached answer p99.

Makes N real sliver cgroups (kernel/cgroups.py, under a parent named by pid, each with
one sleeping process in every 10th), collects snapshots over them with the agent's
per-sliver facts given as a plain source, then serves them over loopback HTTP and
times cached answers, over a new connection each and over one keep-alive connection
(as Prometheus scrapes), /metrics also with Accept-Encoding: gzip.

Targets (issue 11): <= 20 ms CPU per collection, cached p99 <= 5 ms.

    bench/sensors_node.py [N] [--compare REF]

--compare REF (default: the commit before the sensors-perf work) runs the same
measurement on this tree and on REF's sensors/ (git archive into a temp dir),
alternating old, new, old, new, and prints both side by side. Last line: one JSON
object.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("SENSORS_BENCH_TREE", str(ROOT)))

import trio  # noqa: E402

from kernel import cgroups  # noqa: E402
from sensors.nodeserver import NodeServer  # noqa: E402
from sensors.readers import SliverReader  # noqa: E402
from sensors.snapshot import Snapshots  # noqa: E402

BASELINE = "d239053"     # the node-sensor work before the issue 11 cost work
PATHS = ("/sensors/load", "/slices/s00001", "/metrics", "/slices?format=json")
REQUESTS = 200


@dataclass(frozen=True)
class NoLimits:
    cpu_share: int = 1
    cpu_pct: int | None = None
    mem_max: int | None = None
    pids_max: int | None = None
    net_cls_classid: int | None = None


def _median_p90(xs: list[float]) -> tuple[float, float]:
    xs = sorted(x * 1000 for x in xs)
    return round(statistics.median(xs), 2), round(xs[int(0.9 * len(xs)) - 1], 2)


def measure(n: int) -> dict[str, object]:
    """One run on the sensors package on sys.path."""
    rounds = 30
    layout = cgroups.detect_layout()
    parent = f"sensbench{os.getpid()}"
    groups = [cgroups.SliverCgroup(layout, f"s{i:05d}", parent) for i in range(n)]
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.monotonic()
    try:
        for i, g in enumerate(groups):
            g.create(NoLimits())
            if i % 10 == 0:
                p = subprocess.Popen(["sleep", "600"])
                g.attach(p.pid)
                procs.append(p)
        setup_s = time.monotonic() - t0
        facts = {g.name: {"state": "running", "slice_id": i, "ports": [f"tcp/{10000 + i}@0.0.0.0"],
                          "sent_bytes": i * 1000, "budget_left_bytes": 10**9}
                 for i, g in enumerate(groups)}
        reader = SliverReader(layout, parent)
        snaps = Snapshots(lambda: facts, sliver_reader=reader, ttl=3600)
        steady, full = [], []
        for _ in range(rounds):
            t = time.thread_time()
            snap = snaps.collect_sync(facts)
            steady.append(time.thread_time() - t)
        if hasattr(reader, "pressure_max_age"):   # every pressure file due (sparse requests)
            reader.pressure_max_age = 0.0
            for _ in range(10):
                t = time.thread_time()
                snaps.collect_sync(facts)
                full.append(time.thread_time() - t)
            reader.pressure_max_age = 10.0
        else:
            full = steady
        assert len(snap.slivers) == n and "cpu_seconds_total" in snap.slivers[groups[0].name]
        psi = any(k.startswith("pressure_") for k in snap.slivers[groups[0].name])
        lat = trio.run(serve_and_time, snaps)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for g in groups:
            g.destroy()
        for d in {str(g.dirs()[0].parent) for g in groups} | {
                str(d.parent) for g in groups[:1] for d in g.dirs()}:
            try:
                os.rmdir(d)
            except OSError:
                pass
    med, p90 = _median_p90(steady)
    fmed, fp90 = _median_p90(full)
    return {"slivers": n, "layout": layout.mode, "pressure": psi, "setup_s": round(setup_s, 2),
            "collection_cpu_ms_median": med, "collection_cpu_ms_p90": p90,
            "collection_all_pressure_cpu_ms_median": fmed,
            "collection_all_pressure_cpu_ms_p90": fp90, **lat}


async def serve_and_time(snaps: Snapshots) -> dict[str, float]:
    server = NodeServer(snaps)
    out: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, "127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]
        cases = [(p, "") for p in PATHS] + [("/metrics", "Accept-Encoding: gzip\r\n")]
        for path, extra in cases:
            key = path.strip("/").replace("/", "_").replace("?format=", "_")
            key += "_gzip" if extra else ""
            await fetch_new(port, path, extra)      # the first answer renders and caches
            times = []
            for _ in range(REQUESTS):
                t = time.perf_counter()
                body = await fetch_new(port, path, extra)
                times.append((time.perf_counter() - t) * 1000)
            times.sort()
            out[f"p99_ms_new_conn_{key}"] = round(times[int(0.99 * len(times)) - 1], 3)
            s = await trio.open_tcp_stream("127.0.0.1", port)
            async with s:
                buf = bytearray()
                times = []
                for _ in range(REQUESTS):
                    t = time.perf_counter()
                    await s.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
                    body = await read_response(s, buf)
                    times.append((time.perf_counter() - t) * 1000)
            times.sort()
            out[f"p99_ms_keepalive_{key}"] = round(times[int(0.99 * len(times)) - 1], 3)
            out[f"bytes_{key}"] = len(body)
        nursery.cancel_scope.cancel()
    return out


async def read_response(s: trio.SocketStream, buf: bytearray) -> bytes:
    """One Content-Length framed response from a keep-alive stream (buf: leftovers)."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        buf += await s.receive_some(1 << 20)
    head = bytes(buf[:end]).lower()
    assert head.startswith(b"http/1.1 200"), head[:100]
    i = head.index(b"content-length:") + len(b"content-length:")
    length = int(head[i:head.index(b"\r\n", i)])
    while len(buf) < end + 4 + length:
        buf += await s.receive_some(1 << 20)
    body = bytes(buf[end + 4:end + 4 + length])
    del buf[:end + 4 + length]
    return body


async def fetch_new(port: int, path: str, extra: str = "") -> bytes:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    async with s:
        await s.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
                         .encode())
        return await read_response(s, bytearray())


def run_tree(tree: Path, n: int) -> dict[str, object]:
    env = {**os.environ, "SENSORS_BENCH_TREE": str(tree)}
    out = subprocess.run([sys.executable, __file__, str(n), "--child"], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(n: int, ref: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="sensbench") as tmp:
        old = Path(tmp)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "sensors", "kernel"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        runs: dict[str, list[dict[str, object]]] = {"old": [], "new": []}
        for which in ("old", "new", "old", "new"):
            runs[which].append(run_tree(old if which == "old" else ROOT, n))
    merged = {}
    for which, rs in runs.items():   # per key: the better of the two runs (less noise)
        merged[which] = {k: (min(r[k] for r in rs) if isinstance(rs[0][k], float) else rs[0][k])
                         for k in rs[0]}
    keys = [k for k in merged["new"] if isinstance(merged["new"][k], float)]
    print(f"{'':48s} {'old':>10s} {'new':>10s}")
    for k in keys:
        print(f"{k:48s} {merged['old'].get(k, float('nan')):>10} {merged['new'][k]:>10}")
    return {"bench": "sensors_node", "baseline": ref, "slivers": n,
            "collection_cpu_ms_target": 20, "cached_p99_ms_target": 5, **merged}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 1000
    if "--child" in sys.argv:
        print(json.dumps(measure(n)))
        return
    ref = sys.argv[sys.argv.index("--compare") + 1] if "--compare" in sys.argv else BASELINE
    print(json.dumps(compare(n, ref)))


if __name__ == "__main__":
    main()
