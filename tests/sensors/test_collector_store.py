"""TSStore: codec, compactness, exact reads, restart, and the retention pass."""

from __future__ import annotations

import asyncio
import os
import random
import tempfile

from sensors.tsstore import (
    RAW_KEEP,
    ROLL1H_KEEP,
    ROLL5_KEEP,
    BlockWriter,
    SeriesKey,
    TSStore,
    decode_block,
)


def test_codec_roundtrip_random() -> None:
    rng = random.Random(11)
    for _ in range(200):
        w = BlockWriter()
        ts = rng.randrange(0, 2**40)
        pts = []
        for _ in range(rng.randrange(1, 200)):
            ts += rng.choice([0, 1, 60, 60, 60, rng.randrange(0, 10**6)])
            v = rng.choice([0, -1, rng.randrange(-2**62, 2**62), rng.randrange(-100, 100)])
            w.add(ts, v)
            pts.append((ts, v))
        assert decode_block(bytes(w.buf)) == pts


def test_codec_runs_and_steady_counters() -> None:
    rng = random.Random(5)
    for _ in range(200):
        w = BlockWriter()
        ts, v, pts = 1_700_000_000, rng.randrange(10**9), []
        step, dv = 60, rng.choice([0, 1, 4096, -3])
        for _ in range(rng.randrange(1, 120)):
            if rng.random() < 0.1:
                step = rng.choice([0, 30, 60, 61])
            if rng.random() < 0.1:
                dv = rng.randrange(-50, 50)
            ts, v = ts + step, v + dv
            w.add(ts, v)
            pts.append((ts, v))
        assert decode_block(bytes(w.buf)) == pts
    const, counter = BlockWriter(), BlockWriter()
    for i in range(60):
        const.add(1_700_000_000 + 60 * i, 8 << 30)
        counter.add(1_700_000_000 + 60 * i, 10**9 + 50_000 * i)
    assert len(const.buf) <= 18 and len(counter.buf) <= 20   # vs ~2 bytes a sample


def test_first_codec_blocks_still_read() -> None:
    def put(buf: bytearray, n: int) -> None:
        z = (n << 1) ^ (n >> 63)
        while z >= 0x80:
            buf.append((z & 0x7F) | 0x80)
            z >>= 7
        buf.append(z)
    pts = [(1_700_000_000 + 60 * i, 150 + i % 3) for i in range(10)]
    buf = bytearray()
    put(buf, pts[0][0])
    put(buf, pts[0][1])
    last_dt = 0
    for (t0, v0), (t1, v1) in zip(pts, pts[1:], strict=False):
        put(buf, (t1 - t0) - last_dt)
        put(buf, v1 - v0)
        last_dt = t1 - t0
    assert decode_block(bytes(buf)) == pts


def test_steady_series_costs_few_bytes() -> None:
    w = BlockWriter()
    for i in range(60):
        w.add(1_700_000_000 + 60 * i, 150 + (i % 5) - 2)   # load ~1.5 at scale 100
    assert len(w.buf) / 60 <= 1.1


def _run(coro):  # the repo's pytest runs trio; the collector is asyncio
    return asyncio.run(coro)


def test_raw_reads_exact_and_restart_appends() -> None:
    async def go(path: str) -> None:
        st = await TSStore.open_path(path)
        sid = await st.series_id(SeriesKey("node", "n1", "load1"))
        t0 = 1_700_000_000
        for i in range(100):
            st.append(sid, t0 + 30 * i, i * 0.01, 100)
        await st.close()
        st = await TSStore.open_path(path)   # restart: new epoch, appends new rows
        assert st.epoch == 2
        sid2 = st.ids[SeriesKey("node", "n1", "load1")]
        assert sid2 == sid and st.latest[sid][1] == 0.99
        for i in range(100, 120):
            st.append(sid, t0 + 30 * i, i * 0.01, 100)
        got = (await st.raw([sid], t0, t0 + 30 * 200))[sid]
        assert [t for t, _ in got] == [t0 + 30 * i for i in range(120)]
        assert [round(v, 2) for _, v in got] == [round(i * 0.01, 2) for i in range(120)]
        part = (await st.raw([sid], t0 + 300, t0 + 600))[sid]
        assert [t for t, _ in part] == [t0 + 30 * i for i in range(10, 21)]
        await st.close()
    with tempfile.TemporaryDirectory(prefix=f"tss{os.getpid()}") as d:
        _run(go(os.path.join(d, "c.db")))


def test_retention_rolls_up_and_drops_exactly() -> None:
    now = 1_800_000_000 - 1_800_000_000 % 3600 + 1234
    hours = [now - RAW_KEEP - 3 * 3600, now - RAW_KEEP - 3600 - 1,   # old enough
             now - RAW_KEEP + 10]                                   # still raw
    async def go(path: str) -> None:
        st = await TSStore.open_path(path)
        sid = await st.series_id(SeriesKey("node", "n1", "cpu_pct"))
        samples: dict[int, list[tuple[int, float]]] = {}
        for h in hours:
            base = h - h % 3600
            for i in range(0, 3600, 100):
                v = round(((base // 3600) % 7) * 3 + i / 1000, 1)
                st.append(sid, base + i, v, 10)
                samples.setdefault(base, []).append((base + i, v))
        # pre-existing old rollups: one 5m beyond 30 days, one 1h beyond a year, and
        # ones just inside their windows
        await st.put_rollups("roll5m", [(sid, (now - ROLL5_KEEP - 300, 1, 1, 1, 1)),
                                        (sid, (now - ROLL5_KEEP - 299, 1, 2, 2, 2))])
        await st.put_rollups("roll1h", [(sid, (now - ROLL1H_KEEP - 3600, 1, 1, 1, 1)),
                                        (sid, (now - ROLL1H_KEEP - 3599, 1, 2, 2, 2)),
                                        (sid, (now - ROLL1H_KEEP - 3 * 86400, 1, 1, 1, 1))])
        await st.flush(now)
        stats = await st.retention(now)
        old = [b for b in samples if b + 3600 <= now - RAW_KEEP]
        assert len(old) == 2 and stats["blocks_dropped"] == 2
        assert stats["roll5m_dropped"] == 1 and stats["roll1h_dropped"] == 2
        cur = await st.db.execute("SELECT hour FROM blocks")
        assert [r[0] for r in await cur.fetchall()] == [b for b in samples if b not in old]
        r5 = (await st.rollups("roll5m", [sid], 0, now))[sid]
        r1 = (await st.rollups("roll1h", [sid], 0, now))[sid]
        exp5, exp1 = [], []
        for b in sorted(samples):   # every closed hour is rolled, dropped or not
            for q in range(b, b + 3600, 300):
                vals = [v for t, v in samples[b] if q <= t < q + 300]
                exp5.append((q, len(vals), min(vals), sum(vals) / len(vals), max(vals)))
            vals = [v for _, v in samples[b]]
            exp1.append((b, len(vals), min(vals), sum(vals) / len(vals), max(vals)))
        kept5 = [r for r in r5 if r[0] != now - ROLL5_KEEP - 299]
        kept1 = [r for r in r1 if r[0] != now - ROLL1H_KEEP - 3599]
        assert len(kept5) == len(r5) - 1 and len(kept1) == len(r1) - 1
        assert [(b, n, round(a, 6), round(m, 6), round(x, 6)) for b, n, a, m, x in kept5] == \
            [(b, n, round(a, 6), round(m, 6), round(x, 6)) for b, n, a, m, x in exp5]
        assert [(b, n, round(a, 6), round(m, 6), round(x, 6)) for b, n, a, m, x in kept1] == \
            [(b, n, round(a, 6), round(m, 6), round(x, 6)) for b, n, a, m, x in exp1]
        # idempotent: a second pass at the same time drops and writes nothing
        again = await st.retention(now)
        assert again == {k: 0 for k in again}
        await st.close()
    with tempfile.TemporaryDirectory(prefix=f"tss{os.getpid()}") as d:
        _run(go(os.path.join(d, "c.db")))


def test_rollups_of_the_row_layout_are_migrated() -> None:
    """A database written by the first layout (a row per rollup) opens with its
    rollups readable, and the old tables gone."""
    import sqlite3

    async def go(path: str) -> None:
        con = sqlite3.connect(path)
        con.executescript(
            "CREATE TABLE series(id INTEGER PRIMARY KEY, kind TEXT NOT NULL, entity TEXT "
            "NOT NULL, field TEXT NOT NULL, UNIQUE(kind, entity, field));"
            "INSERT INTO series VALUES(1, 'node', 'n1', 'load1');"
            "CREATE TABLE roll5m(series INTEGER, bucket INTEGER, n INTEGER, min REAL, "
            "avg REAL, max REAL, PRIMARY KEY(series, bucket)) WITHOUT ROWID;"
            "CREATE TABLE roll1h(series INTEGER, bucket INTEGER, n INTEGER, min REAL, "
            "avg REAL, max REAL, PRIMARY KEY(series, bucket)) WITHOUT ROWID;"
            "INSERT INTO roll5m VALUES(1, 7200, 3, 1.0, 2.0, 3.0), (1, 7500, 1, 4.0, 4.0, 4.0);"
            "INSERT INTO roll1h VALUES(1, 7200, 4, 1.0, 2.5, 4.0);")
        con.close()
        st = await TSStore.open_path(path)
        assert (await st.rollups("roll5m", [1], 0, 10**9))[1] == [
            (7200, 3, 1.0, 2.0, 3.0), (7500, 1, 4.0, 4.0, 4.0)]
        assert (await st.rollups("roll1h", [1], 0, 10**9))[1] == [(7200, 4, 1.0, 2.5, 4.0)]
        cur = await st.db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'roll%'")
        assert await cur.fetchall() == []
        await st.close()
    with tempfile.TemporaryDirectory(prefix=f"tss{os.getpid()}") as d:
        _run(go(os.path.join(d, "old.db")))
