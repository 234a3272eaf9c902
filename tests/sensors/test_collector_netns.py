"""The collector against fake node servers in network namespaces, one killed mid-run:
it is marked down within two rounds, and the others lose no sample."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sensors.collector import Collector, Config, NodeEntry
from sensors.tsstore import SeriesKey, TSStore

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]

PID = os.getpid()
N = 3
PORT = 3100
FAKE = Path(__file__).with_name("fakenode.py")


def sh(*argv: str, check: bool = True) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")


def addrs(i: int) -> tuple[str, str]:
    k = PID % 16384
    net = f"10.{200 + i}.{k // 64}"
    return f"{net}.{(k % 64) * 4 + 1}", f"{net}.{(k % 64) * 4 + 2}"


@pytest.fixture
def netnodes():
    procs: list[subprocess.Popen[str]] = []
    made: list[int] = []
    try:
        for i in range(N):
            ns, hif, nif = f"sc{PID}n{i}", f"sch{PID}n{i}", f"scv{PID}n{i}"
            host, node = addrs(i)
            sh("ip", "netns", "add", ns)
            made.append(i)
            sh("ip", "link", "add", hif, "type", "veth", "peer", "name", nif)
            sh("ip", "link", "set", nif, "netns", ns)
            sh("ip", "addr", "add", f"{host}/30", "dev", hif)
            sh("ip", "link", "set", hif, "up")
            sh("ip", "-n", ns, "addr", "add", f"{node}/30", "dev", nif)
            sh("ip", "-n", ns, "link", "set", nif, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(FAKE), node,
                                  str(PORT), f"n{i}.site{i}.test", str(i + 1)],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for i in made:
            sh("ip", "link", "del", f"sch{PID}n{i}", check=False)
            sh("ip", "netns", "del", f"sc{PID}n{i}", check=False)


def test_one_node_killed_mid_run(netnodes: list[subprocess.Popen[str]]) -> None:
    hosts = [f"n{i}.site{i}.test" for i in range(N)]
    entries = [NodeEntry(hosts[i], addrs(i)[1], PORT, f"site{i}") for i in range(N)]
    states: list[tuple[bool, int]] = []

    async def go(path: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
        store = await TSStore.open_path(path)
        col = Collector(Config(db=path, timeout=1.0, nodes=entries), store)
        t0 = int(time.time())
        for r in range(8):
            if r == 3:
                netnodes[0].send_signal(signal.SIGKILL)
                netnodes[0].wait()
            await col.poll_round(now=t0 + r)
            st = col.nodes[hosts[0]]
            states.append((st.up, st.fails))
        out = {}
        for h in hosts:
            sids = {f: store.ids[SeriesKey("node", h, f)] for f in ("up", "load1")}
            data = await store.raw(sids.values(), t0, t0 + 100)
            out[h] = {f: data[s] for f, s in sids.items()}
        await store.close()
        return out

    with tempfile.TemporaryDirectory(prefix=f"scn{PID}") as d:
        got = asyncio.run(go(os.path.join(d, "c.db")))
    # round index 3 is the first failure; down at the second (index 4)
    assert [u for u, _ in states] == [True] * 4 + [False] * 4
    # backoff: once down, polled at rounds 6 and 8, skipped at round 7
    assert [f for _, f in states] == [0, 0, 0, 1, 2, 3, 3, 4]
    for h in hosts[1:]:
        assert len(got[h]["load1"]) == 8 and [v for _, v in got[h]["up"]] == [1.0] * 8
    assert len(got[hosts[0]]["load1"]) == 3
    assert [v for _, v in got[hosts[0]]["up"]] == [1.0] * 4 + [0.0] * 4
