"""Shared setup for collector tests: fake nodes on loopback, a collector with its HTTP
server, and a blocking GET helper (run in a thread while the loop serves)."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from typing import Any

from sensors.collecthttp import serve
from sensors.collector import Collector, Config, NodeEntry
from sensors.dashboard import make_handler
from sensors.tsstore import TSStore
from tests.sensors.fakenode import serve_fake

SITES = ("princeton", "princeton", "mit", "mit", "ucb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def fleet(tmpdir: str, n: int = 5):
    servers, entries = [], []
    for i in range(n):
        port = free_port()
        host = f"node{i}.{SITES[i % len(SITES)]}.test"
        servers.append(await serve_fake("127.0.0.1", port, host, i + 1))
        entries.append(NodeEntry(host, "127.0.0.1", port, SITES[i % len(SITES)]))
    store = await TSStore.open_path(os.path.join(tmpdir, "c.db"))
    cfg = Config(db="", timeout=2.0, nodes=entries)
    col = Collector(cfg, store)
    port = free_port()
    http = await serve(make_handler(col), "127.0.0.1", port)
    try:
        yield col, servers, port
    finally:
        http.close()
        for s in servers:
            s.close()
        await store.close()


async def get(port: int, path: str) -> tuple[int, str]:
    def run() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
    return await asyncio.to_thread(run)


def rows_of(col: Collector, kind: str) -> dict[str, dict[str, Any]]:
    return col.store.latest_values(kind)
