"""A fake node sensor server for the collector tests and benchmark: answers
`/sensors/node?format=json` and `/slices?format=json` in the node sensor server's
shapes and key names (docs/sensors.md; translated by sensors/fields.py, whose table
tests/sensors/test_fields.py checks against the real server). Figures (collector
names) are a pure function of (seed, k), k counting the node requests served, so a
test can recompute what a node said.

In-process: `await serve_fake(host, port, hostname, seed)`; as a program (inside a
network namespace): `python tests/sensors/fakenode.py HOST PORT HOSTNAME SEED`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sensors.collecthttp import Request, Response, serve  # noqa: E402
from sensors.fields import to_wire_node, to_wire_slivers  # noqa: E402

SLICES = ("pl_alpha", "pl_beta", "pl_gamma")


def node_figures(hostname: str, seed: int, k: int) -> dict[str, object]:
    return {
        "hostname": hostname, "load1": round(0.25 * ((seed + k) % 8), 2),
        "load5": round(0.5 + 0.1 * (seed % 5), 2), "load15": 0.75,
        "cpu_pct": round(10.0 + (seed * 7 + k) % 50, 1),
        "mem_total": 8 << 30, "mem_used": (2 << 30) + (seed + k) * 4096,
        "swap_total": 1 << 30, "swap_used": seed * 1024,
        "disk_total": 100 << 30, "disk_used": (40 + seed) << 30,
        "rx_bytes": 1_000_000 * seed + 50_000 * k, "tx_bytes": 2_000_000 * seed + 80_000 * k,
        "uptime": 1000 + 60 * k, "kernel": "6.1.0-fake", "procs": 100 + seed + k % 3,
        "cpu_mhz": 2400,
    }


def slice_figures(seed: int, k: int) -> list[dict[str, object]]:
    out = []
    for i, name in enumerate(SLICES[: 1 + seed % 3]):
        out.append({"name": name, "cpu_s": 10.0 * (i + 1) * k + seed,
                    "mem_bytes": (i + 1) * (64 << 20), "procs": i + 1,
                    "tx_bytes": (i + 1) * 10_000 * k, "budget_left": 10**9 - k * 1000,
                    "ports": [8000 + i], "disk_bytes": (1 << 20) * (i + 1), "state": "running",
                    "pressure": 0.5 * i})
    return out


async def serve_fake(host: str, port: int, hostname: str, seed: int) -> asyncio.Server:
    count = {"node": 0, "slices": 0}

    async def handle(req: Request) -> Response:
        if req.path == "/sensors/node":
            count["node"] += 1
            return Response.json(to_wire_node(node_figures(hostname, seed, count["node"]),
                                              time.time()))
        if req.path == "/slices":
            count["slices"] += 1
            return Response.json(to_wire_slivers(slice_figures(seed, count["slices"]),
                                                 time.time()))
        return Response.text("not found\n", 404)
    return await serve(handle, host, port)


async def _main(host: str, port: int, hostname: str, seed: int) -> None:
    server = await serve_fake(host, port, hostname, seed)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
