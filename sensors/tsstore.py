"""Compact time-series store for the central collector (aiosqlite).

Layout (one SQLite file):
- `series(id, kind, entity, field)`: one row per (node|slice, name, field).
- `blocks(series, hour, epoch, data)`: raw samples of one series in one hour, as one
  BLOB (`BlockWriter`): values in scaled fixed point (`SCALES`), each step a tagged
  varint (value delta, or delta of the delta, at the usual interval) and runs of
  repeated steps as one token: a gauge costs ~1 byte a sample, a constant or a
  steady counter a few bytes an hour.
  `epoch` is the writer's run number, so a restarted collector appends new rows
  instead of reading back and rewriting the old ones.
- `r5m(series, span, n, data)`, `r1h(...)`: rollups (raw 2 days, 5-minute 30 days,
  1 hour 1 year), made from the raw blocks of each closed hour. One row holds a
  series' rollup records of one span (an hour of 5-minute buckets, a day of hourly
  ones) as packed doubles (bucket, n, min, avg, max) in bucket order: a week's query
  of 1000 series reads 7000 rows and unpacks them in C (array), not 168,000 rows.
- `latest(series, ts, value)`: the current value of every series (and in memory).

Samples are buffered in memory per open (series, hour) block, already encoded, and
written by `flush()`; `append` never touches the database.
"""

from __future__ import annotations

import sys
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import aiosqlite

from sensors.fields import SCALES

RAW_KEEP = 2 * 86400
ROLL5_KEEP = 30 * 86400
ROLL1H_KEEP = 365 * 86400

# Fixed-point scale per field (value stored = round(value * scale)), declared with the
# fields in sensors/fields.py; others use 1000.
DEFAULT_SCALE = 1000

SCHEMA = """
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS series(id INTEGER PRIMARY KEY, kind TEXT NOT NULL,
    entity TEXT NOT NULL, field TEXT NOT NULL, UNIQUE(kind, entity, field));
CREATE TABLE IF NOT EXISTS blocks(series INTEGER NOT NULL, hour INTEGER NOT NULL,
    epoch INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY(series, hour, epoch))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS r5m(series INTEGER NOT NULL, span INTEGER NOT NULL,
    n INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY(series, span)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS r1h(series INTEGER NOT NULL, span INTEGER NOT NULL,
    n INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY(series, span)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS latest(series INTEGER PRIMARY KEY, ts INTEGER, value REAL);
"""


# rollup table -> (bucket seconds, span seconds, keep seconds)
ROLLUPS: dict[str, tuple[int, int, int]] = {"roll5m": (300, 3600, ROLL5_KEEP),
                                            "roll1h": (3600, 86400, ROLL1H_KEEP)}
_ROLL_TABLE = {"roll5m": "r5m", "roll1h": "r1h"}
Rollup = tuple[int, int, float, float, float]     # bucket, n, min, avg, max


def pack_rollups(records: Iterable[Rollup]) -> bytes:
    a = array("d")
    for rec in sorted(records):
        a.extend(float(x) for x in rec)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def unpack_rollups(data: bytes) -> array[float]:
    a = array("d")
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def scale_of(name: str) -> int:
    return SCALES.get(name, DEFAULT_SCALE)


# --- codec -----------------------------------------------------------------------

MARK = b"\x00\x02"    # a block of the second codec (the first never starts so: ts 0)


def _zz(n: int) -> int:
    return n << 1 if n >= 0 else (-n << 1) - 1


def _uvar(buf: bytearray, u: int) -> None:
    """Append unsigned u (any size) as a varint."""
    while u >= 0x80:
        buf.append((u & 0x7F) | 0x80)
        u >>= 7
    buf.append(u)


@dataclass
class BlockWriter:
    """Incremental encoder of one (series, hour) block.

    Stream: MARK, the first sample's (ts, value) as zigzag varints, then one token
    varint per step, its low 2 bits a tag, the rest zigzag x:
      0  same interval, value delta x
      3  same interval, value delta = the previous delta + x (steady counters)
      1  x + 1 samples each repeating the previous interval and value delta
         (a constant gauge or a steady counter costs one token per run)
      2  interval = the previous interval + x, then the value delta as a varint.
    A run is the last token while it grows: it is rewritten in place."""

    buf: bytearray = field(default_factory=bytearray)
    count: int = 0
    last_ts: int = 0
    last_dt: int = 0
    last_v: int = 0
    last_dv: int = 0
    run_at: int = -1
    run_n: int = 0
    dirty: bool = False

    def add(self, ts: int, v: int) -> None:
        buf = self.buf
        if self.count == 0:
            buf += MARK
            _uvar(buf, _zz(ts))
            _uvar(buf, _zz(v))
        else:
            dt = ts - self.last_ts
            if dt < 0:
                raise ValueError("samples must be appended in time order")
            dv = v - self.last_v
            if dt != self.last_dt:
                self.run_at = -1
                _uvar(buf, _zz(dt - self.last_dt) << 2 | 2)
                _uvar(buf, _zz(dv))
            elif dv == self.last_dv:
                if self.run_at >= 0:
                    del buf[self.run_at:]
                    self.run_n += 1
                else:
                    self.run_at, self.run_n = len(buf), 1
                _uvar(buf, (self.run_n - 1) << 2 | 1)
            else:
                self.run_at = -1
                plain, step = _zz(dv), _zz(dv - self.last_dv)
                _uvar(buf, step << 2 | 3 if step < plain else plain << 2)
            self.last_dt, self.last_dv = dt, dv
        self.last_ts, self.last_v = ts, v
        self.count += 1
        self.dirty = True


def _varints(data: bytes | memoryview) -> list[int]:
    nums: list[int] = []
    z = shift = 0
    for b in data:
        z |= (b & 0x7F) << shift
        if b & 0x80:
            shift += 7
            continue
        nums.append(z)
        z = shift = 0
    if shift:
        raise ValueError("truncated block")
    return nums


def decode_block(data: bytes) -> list[tuple[int, int]]:
    """(ts, scaled value) pairs of one block, in order (either codec)."""
    if data[:2] != MARK:
        return _decode_v1(data)
    nums = _varints(memoryview(data)[2:])
    if not nums:
        return []
    if len(nums) < 2:
        raise ValueError("truncated block")
    ts, v = (nums[0] >> 1) ^ -(nums[0] & 1), (nums[1] >> 1) ^ -(nums[1] & 1)
    out = [(ts, v)]
    append = out.append
    dt = dv = 0
    i, n = 2, len(nums)
    while i < n:
        t = nums[i]
        i += 1
        tag, x = t & 3, t >> 2
        if tag == 1:
            for _ in range(x + 1):
                ts += dt
                v += dv
                append((ts, v))
            continue
        x = (x >> 1) ^ -(x & 1)
        if tag == 0:
            dv = x
        elif tag == 3:
            dv += x
        else:
            if i >= n:
                raise ValueError("truncated block")
            dt += x
            z = nums[i]
            i += 1
            dv = (z >> 1) ^ -(z & 1)
        ts += dt
        v += dv
        append((ts, v))
    return out


def _decode_v1(data: bytes) -> list[tuple[int, int]]:
    """The first codec: (ts, value) absolute, then per sample the delta-of-delta of
    the timestamp and the delta of the value, zigzag varints."""
    nums = [(z >> 1) ^ -(z & 1) for z in _varints(data)]
    if len(nums) % 2:
        raise ValueError("truncated block")
    out: list[tuple[int, int]] = []
    if not nums:
        return out
    ts, v = nums[0], nums[1]
    out.append((ts, v))
    dt = 0
    for i in range(2, len(nums), 2):
        dt += nums[i]
        ts += dt
        v += nums[i + 1]
        out.append((ts, v))
    return out


# --- store -----------------------------------------------------------------------

@dataclass(frozen=True)
class SeriesKey:
    kind: str     # "node" | "slice"
    entity: str   # hostname, or slice name "@" hostname for per-node slivers
    field: str


class TSStore:
    def __init__(self, db: aiosqlite.Connection, epoch: int) -> None:
        self.db = db
        self.epoch = epoch
        self.ids: dict[SeriesKey, int] = {}
        self.keys: dict[int, SeriesKey] = {}
        self.open: dict[tuple[int, int], BlockWriter] = {}
        self.latest: dict[int, tuple[int, float]] = {}
        # kind -> entity -> field -> current value (the index the queries read)
        self.latest_by: dict[str, dict[str, dict[str, float]]] = {}
        self._latest_dirty: set[int] = set()
        self.samples_appended = 0

    @classmethod
    async def open_path(cls, path: str) -> TSStore:
        db = await aiosqlite.connect(path)
        await db.executescript(SCHEMA)
        cur = await db.execute("SELECT value FROM meta WHERE key='epoch'")
        row = await cur.fetchone()
        epoch = int(row[0]) + 1 if row else 1
        await db.execute("INSERT OR REPLACE INTO meta VALUES('epoch', ?)", (str(epoch),))
        await db.commit()
        store = cls(db, epoch)
        async with db.execute("SELECT id, kind, entity, field FROM series") as cur:
            async for sid, kind, entity, fld in cur:
                k = SeriesKey(kind, entity, fld)
                store.ids[k] = sid
                store.keys[sid] = k
        await store._migrate_row_rollups()
        async with db.execute("SELECT series, ts, value FROM latest") as cur:
            async for sid, ts, value in cur:
                store.latest[sid] = (ts, value)
                k = store.keys[sid]
                store.latest_by.setdefault(k.kind, {}).setdefault(k.entity, {})[k.field] = value
        return store

    async def _migrate_row_rollups(self) -> None:
        """A database of the first layout (one rollup per row in roll5m / roll1h): its
        rollups move into the packed tables, once."""
        for table in ROLLUPS:
            cur = await self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,))
            if await cur.fetchone() is None:
                continue
            rows = await self.db.execute_fetchall(
                f"SELECT series, bucket, n, min, avg, max FROM {table}")
            await self.put_rollups(table, [(r[0], (r[1], r[2], r[3], r[4], r[5]))
                                           for r in rows])
            await self.db.execute(f"DROP TABLE {table}")
            await self.db.commit()

    async def close(self) -> None:
        await self.flush()
        await self.db.close()

    async def series_id(self, key: SeriesKey) -> int:
        sid = self.ids.get(key)
        if sid is None:
            cur = await self.db.execute(
                "INSERT INTO series(kind, entity, field) VALUES(?,?,?)",
                (key.kind, key.entity, key.field))
            sid = cur.lastrowid
            assert sid is not None
            self.ids[key] = sid
            self.keys[sid] = key
        return sid

    async def append_many(self, kind: str, entity: str, ts: int,
                          values: dict[str, float]) -> int:
        """Buffer one sample per field; returns the number of samples taken."""
        n = 0
        for name, value in values.items():
            if not isinstance(value, (int, float)):
                continue
            key = SeriesKey(kind, entity, name)
            sid = self.ids.get(key)
            if sid is None:
                sid = await self.series_id(key)
            self.append(sid, ts, float(value), scale_of(name))
            n += 1
        return n

    def append(self, sid: int, ts: int, value: float, scale: int) -> None:
        hour = ts - ts % 3600
        w = self.open.get((sid, hour))
        if w is None:
            w = self.open[(sid, hour)] = BlockWriter()
        w.add(ts, round(value * scale))
        self.latest[sid] = (ts, value)
        k = self.keys[sid]
        by = self.latest_by.get(k.kind)
        if by is None:
            by = self.latest_by[k.kind] = {}
        ent = by.get(k.entity)
        if ent is None:
            ent = by[k.entity] = {}
        ent[k.field] = value
        self._latest_dirty.add(sid)
        self.samples_appended += 1

    async def flush(self, now: float | None = None) -> None:
        """Write dirty blocks and latest values; forget blocks of past hours."""
        now = time.time() if now is None else now
        rows = [(sid, hour, self.epoch, bytes(w.buf))
                for (sid, hour), w in self.open.items() if w.dirty]
        await self.db.executemany(
            "INSERT OR REPLACE INTO blocks(series, hour, epoch, data) VALUES(?,?,?,?)", rows)
        lat = [(sid, *self.latest[sid]) for sid in self._latest_dirty]
        await self.db.executemany("INSERT OR REPLACE INTO latest VALUES(?,?,?)", lat)
        await self.db.commit()
        for w in self.open.values():
            w.dirty = False
        self._latest_dirty.clear()
        cutoff = now - now % 3600 - 3600  # keep the current and previous hour open
        for k in [k for k in self.open if k[1] < cutoff]:
            del self.open[k]

    # --- reads --------------------------------------------------------------------

    def latest_values(self, kind: str) -> dict[str, dict[str, float]]:
        """{entity: {field: value}} of current values for one kind."""
        return self.latest_by.get(kind, {})

    async def raw(self, sids: Iterable[int], since: int, until: int
                  ) -> dict[int, list[tuple[int, float]]]:
        """Raw samples per series in [since, until] (flushes first, so it is exact)."""
        await self.flush()
        ids = list(sids)
        out: dict[int, list[tuple[int, float]]] = {s: [] for s in ids}
        if not ids:
            return out
        lo = since - since % 3600
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = ("SELECT series, data FROM blocks WHERE series IN ({}) AND hour BETWEEN ? "
                 "AND ? ORDER BY series, hour, epoch".format(",".join("?" * len(chunk))))
            async with self.db.execute(q, (*chunk, lo, until)) as cur:
                for sid, data in await cur.fetchall():
                    sc = scale_of(self.keys[sid].field)
                    out[sid].extend((t, v / sc) for t, v in decode_block(data)
                                    if since <= t <= until)
        return out

    async def rollup_arrays(self, table: str, sids: Iterable[int], since: int, until: int
                            ) -> dict[int, tuple[array[float], array[float]]]:
        """(buckets, averages) per series of rollup `table` in [since, until], as
        arrays in bucket order: the query path (no per-record Python objects)."""
        if table not in ROLLUPS:
            raise ValueError(f"no rollup table {table!r}")
        _bucket, span, _keep = ROLLUPS[table]
        ids = list(sids)
        out: dict[int, tuple[array[float], array[float]]] = {
            s: (array("d"), array("d")) for s in ids}
        lo = since - since % span
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = (f"SELECT series, data FROM {_ROLL_TABLE[table]} WHERE series IN "
                 f"({','.join('?' * len(chunk))}) AND span BETWEEN ? AND ? "
                 "ORDER BY series, span")
            async with self.db.execute(q, (*chunk, lo, until)) as cur:
                rows = await cur.fetchall()
            for sid, data in rows:
                a = unpack_rollups(data)
                b, avg = a[0::5], a[3::5]
                if b and (b[0] < since or b[-1] > until):
                    keep = [k for k, t in enumerate(b) if since <= t <= until]
                    if not keep:
                        continue
                    b, avg = b[keep[0]:keep[-1] + 1], avg[keep[0]:keep[-1] + 1]
                ob, oa = out[sid]
                ob.extend(b)
                oa.extend(avg)
        return out

    async def rollups(self, table: str, sids: Iterable[int], since: int, until: int
                      ) -> dict[int, list[Rollup]]:
        """(bucket, n, min, avg, max) records per series of `table` in [since, until]."""
        if table not in ROLLUPS:
            raise ValueError(f"no rollup table {table!r}")
        _bucket, span, _keep = ROLLUPS[table]
        ids = list(sids)
        out: dict[int, list[Rollup]] = {s: [] for s in ids}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = (f"SELECT series, data FROM {_ROLL_TABLE[table]} WHERE series IN "
                 f"({','.join('?' * len(chunk))}) AND span BETWEEN ? AND ? "
                 "ORDER BY series, span")
            async with self.db.execute(q, (*chunk, since - since % span, until)) as cur:
                for sid, data in await cur.fetchall():
                    a = unpack_rollups(data)
                    out[sid].extend((int(a[k]), int(a[k + 1]), a[k + 2], a[k + 3], a[k + 4])
                                    for k in range(0, len(a), 5) if since <= a[k] <= until)
        return out

    async def put_rollups(self, table: str, records: Sequence[tuple[int, Rollup]]) -> int:
        """Merge (series, record) into `table`: a record replaces one of the same
        bucket. Returns the number of records written."""
        _bucket, span, _keep = ROLLUPS[table]
        name = _ROLL_TABLE[table]
        per: dict[tuple[int, int], dict[int, Rollup]] = {}
        for sid, rec in records:
            per.setdefault((sid, rec[0] - rec[0] % span), {})[rec[0]] = rec
        by_span: dict[int, list[int]] = {}
        for sid, sp in per:
            by_span.setdefault(sp, []).append(sid)
        for sp, sids in by_span.items():
            for i in range(0, len(sids), 500):
                chunk = sids[i:i + 500]
                q = (f"SELECT series, data FROM {name} WHERE span = ? AND series IN "
                     f"({','.join('?' * len(chunk))})")
                async with self.db.execute(q, (sp, *chunk)) as cur:
                    for sid, data in await cur.fetchall():
                        a = unpack_rollups(data)
                        have = per[(sid, sp)]
                        for k in range(0, len(a), 5):
                            have.setdefault(int(a[k]), (int(a[k]), int(a[k + 1]), a[k + 2],
                                                        a[k + 3], a[k + 4]))
        await self.db.executemany(
            f"INSERT OR REPLACE INTO {name}(series, span, n, data) VALUES(?,?,?,?)",
            [(sid, sp, len(recs), pack_rollups(recs.values()))
             for (sid, sp), recs in per.items()])
        return len(records)

    async def drop_rollups(self, table: str, cutoff: int) -> int:
        """Drop the records of `table` whose bucket ended at or before `cutoff`;
        returns how many."""
        bucket, span, _keep = ROLLUPS[table]
        name = _ROLL_TABLE[table]
        # whole spans: [span, span + span_len) ended by the cutoff
        cur = await self.db.execute(f"SELECT coalesce(sum(n), 0) FROM {name} WHERE span <= ?",
                                    (cutoff - span,))
        dropped = int((await cur.fetchone() or (0,))[0])
        await self.db.execute(f"DELETE FROM {name} WHERE span <= ?", (cutoff - span,))
        # the span the cutoff falls in: trim its records
        edge = cutoff - cutoff % span
        rows = await self.db.execute_fetchall(
            f"SELECT series, data FROM {name} WHERE span = ?", (edge,))
        writes, deletes = [], []
        for sid, data in rows:
            a = unpack_rollups(data)
            recs = [(int(a[k]), int(a[k + 1]), a[k + 2], a[k + 3], a[k + 4])
                    for k in range(0, len(a), 5) if a[k] + bucket > cutoff]
            if len(recs) * 5 != len(a):
                dropped += len(a) // 5 - len(recs)
                if recs:
                    writes.append((sid, edge, len(recs), pack_rollups(recs)))
                else:
                    deletes.append((sid, edge))
        await self.db.executemany(
            f"INSERT OR REPLACE INTO {name}(series, span, n, data) VALUES(?,?,?,?)", writes)
        await self.db.executemany(f"DELETE FROM {name} WHERE series = ? AND span = ?", deletes)
        return dropped

    # --- retention ----------------------------------------------------------------

    async def retention(self, now: float | None = None) -> dict[str, int]:
        """Roll every closed hour not rolled yet into 5-minute and 1-hour rollups; drop
        raw blocks older than 2 days, 5-minute rollups older than 30 days and 1-hour
        ones older than a year. Returns counts of what was written and dropped.
        Rolling at close (not at drop) lets a week's query read 1-hour rollups for the
        recent days too. Samples arriving for an hour already rolled are not rolled."""
        now = int(time.time() if now is None else now)
        await self.flush(now)
        raw_cut = now - RAW_KEEP
        cur_hour = now - now % 3600
        cur = await self.db.execute("SELECT value FROM meta WHERE key='rolled_until'")
        row = await cur.fetchone()
        rolled = int(row[0]) if row else 0
        stats = {"blocks_dropped": 0, "roll5m_written": 0, "roll1h_written": 0,
                 "roll5m_dropped": 0, "roll1h_dropped": 0}
        cur = await self.db.execute(
            "SELECT series, hour, data FROM blocks WHERE hour >= ? AND hour < ?",
            (rolled, cur_hour))
        per: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for sid, hour, data in await cur.fetchall():
            per.setdefault((sid, hour), []).extend(decode_block(data))
        r5: list[tuple[int, Rollup]] = []
        r1: list[tuple[int, Rollup]] = []
        for (sid, hour), samples in per.items():
            sc = scale_of(self.keys[sid].field)
            buckets: dict[int, list[float]] = {}
            for t, v in samples:
                buckets.setdefault(t - t % 300, []).append(v / sc)
            for b, vals in buckets.items():
                if b + 300 > now - ROLL5_KEEP:
                    r5.append((sid, (b, len(vals), min(vals), sum(vals) / len(vals),
                                     max(vals))))
            vals = [v / sc for _t, v in samples]
            if vals and hour + 3600 > now - ROLL1H_KEEP:
                r1.append((sid, (hour, len(vals), min(vals), sum(vals) / len(vals),
                                 max(vals))))
        await self.put_rollups("roll5m", r5)
        await self.put_rollups("roll1h", r1)
        await self.db.execute("INSERT OR REPLACE INTO meta VALUES('rolled_until', ?)",
                              (str(max(rolled, cur_hour)),))
        stats["roll5m_written"], stats["roll1h_written"] = len(r5), len(r1)
        # a block covers [hour, hour+3600): only whole blocks older than the cut go
        cur = await self.db.execute("DELETE FROM blocks WHERE hour + 3600 <= ?", (raw_cut,))
        stats["blocks_dropped"] = cur.rowcount
        stats["roll5m_dropped"] = await self.drop_rollups("roll5m", now - ROLL5_KEEP)
        stats["roll1h_dropped"] = await self.drop_rollups("roll1h", now - ROLL1H_KEEP)
        await self.db.commit()
        return stats
