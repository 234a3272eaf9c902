"""The agent's persistent state: one SQLite database, `<state_dir>/agent.db`.

Every resource a sliver holds is written here *before* it is granted (architecture,
"Rules of the house"), so that a restarted agent can find, re-adopt or release it. No
module-level state: a `State` object is opened by the program and passed around.

SQLite in WAL mode with synchronous=NORMAL: a committed transaction survives an agent
crash (kill -9), which is what we need; a power loss may lose the last commits, which
the next poll repairs. Calls are short (well under a millisecond each), so they run on
the trio thread; nothing here waits on the network or the kernel.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS slivers (
    name TEXT PRIMARY KEY,
    slice_id INTEGER NOT NULL,
    instantiation TEXT NOT NULL,
    expires INTEGER NOT NULL,
    image TEXT NOT NULL,
    spec TEXT NOT NULL,          -- JSON: the GetSlivers entry as PLC sent it (validated)
    rspec TEXT NOT NULL,         -- JSON: the resolved rspec
    problems TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL,         -- a SliverState value
    message TEXT NOT NULL DEFAULT '',
    want_running INTEGER NOT NULL DEFAULT 1,
    applied TEXT NOT NULL DEFAULT '',  -- JSON of what was last applied to the kernel
    target TEXT NOT NULL DEFAULT '',   -- JSON of what should be applied (same form)
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS uid_ranges (
    idx INTEGER PRIMARY KEY,     -- range number in the pool
    name TEXT NOT NULL UNIQUE,
    allocated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ports (
    address TEXT NOT NULL,
    proto TEXT NOT NULL,
    port INTEGER NOT NULL,
    name TEXT NOT NULL,
    source TEXT NOT NULL,        -- 'plc' or 'runtime'
    PRIMARY KEY (address, proto, port)
);
CREATE TABLE IF NOT EXISTS loans (
    lender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    resource TEXT NOT NULL,
    amount INTEGER NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (lender, position)
);
-- byte_counters (never used: the daily budgets live in bw_ledger, agent/bandwidth.py)
DROP TABLE IF EXISTS byte_counters;
"""


# Migrations: MIGRATIONS[n] brings a database of version n to n + 1 (in one transaction).
# Version 2: the rcap ledger (agent/rcaps/): rcaps (only the sha256 of each rcap string
# is stored) and loans between slices.
RCAP_TABLES = """
CREATE TABLE IF NOT EXISTS rcaps (
    id TEXT PRIMARY KEY,         -- sha256 hex of the rcap string (the string is never stored)
    parent TEXT,                 -- the rcap it was split off, NULL for a root
    amounts TEXT NOT NULL,       -- JSON {resource: amount}
    holder TEXT NOT NULL,        -- who acquired it ('' the node admin, plc:<slice> PLC's)
    origin TEXT NOT NULL,        -- node | plc | split
    bound TEXT,                  -- the slice it is bound to, if any
    created REAL NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rcap_loans (
    id INTEGER PRIMARY KEY,
    lender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    resource TEXT NOT NULL,
    amount INTEGER NOT NULL,
    expires REAL NOT NULL,       -- unix time, 0: none
    relend INTEGER NOT NULL,
    parent INTEGER,              -- the loan it was lent on
    created REAL NOT NULL
);
"""
# Version 3: a loan of ports names them (rcap_loans.ports, the ports tag syntax; an
# rcap's ports are in its amounts JSON under "ports").
LOAN_PORTS = "ALTER TABLE rcap_loans ADD COLUMN ports TEXT NOT NULL DEFAULT '';"
MIGRATIONS: dict[int, str] = {1: RCAP_TABLES, 2: LOAN_PORTS}


class StateError(RuntimeError):
    """The state database cannot be used (wrong schema, full pool, ...)."""


class SliverState(StrEnum):
    """A sliver's state. The values are what the `slivers.state` column holds (the
    strings written before this enum existed), so older databases load unchanged."""

    PENDING = "pending"          # recorded from PLC, not made yet (or its image is missing)
    CREATING = "creating"        # its uid range taken, its context being made
    RUNNING = "running"
    STOPPED = "stopped"          # frozen: enabled=0, or held by the slice API's Stop
    FAILED = "failed"            # the last action failed; the next reconcile tries again
    DESTROYING = "destroying"    # removal decided from a good reply; finished even offline
    CONTROLLER = "controller"    # nm-controller: no sliver, a host account only


@dataclass(frozen=True)
class Step:
    """What the reconciler does next with a sliver: an `agent.reconcile.Action` kind
    (None: nothing) and why; "{state}" in the reason names the state it was in."""

    kind: str | None
    reason: str = ""

    def why(self, state: SliverState) -> str:
        return self.reason.format(state=state.value)


_S = SliverState
_NOTHING = Step(None)
_REMAKE = Step("create", "its context is gone (was {state})")
_STOP = Step("stop", "disabled (enabled=0)")
_SETTLE = Step("update", "state {state}")
_DESTROY = Step("destroy", "removal pending")
_UNMAKE = Step("stop_context", "a controller slice has no sliver")  # made before it was one
EXPIRED = Step("destroy", "expired")

# The reconciler's machine in one place: `agent.reconcile.plan` looks each sliver up
# here (an expired one is destroyed: EXPIRED, unless its removal is pending anyway);
# the actions record the states they leave it in (agent.reconcile.Reconciler._do).
#
# The sliver's context is not live on the node:
WHEN_GONE: dict[SliverState, Step] = {
    _S.PENDING: Step("create", "new"),
    _S.CREATING: _REMAKE, _S.RUNNING: _REMAKE, _S.STOPPED: _REMAKE, _S.FAILED: _REMAKE,
    _S.DESTROYING: _DESTROY,
    _S.CONTROLLER: _NOTHING,
}
# Its context is live, by (state, whether it should run). For the states in HAS_SLIVER
# the live context is also adopted and brought to its rspec first.
WHEN_LIVE: dict[tuple[SliverState, bool], Step] = {
    (_S.RUNNING, True): _NOTHING, (_S.RUNNING, False): _STOP,
    (_S.STOPPED, True): Step("start", "enabled"), (_S.STOPPED, False): _NOTHING,
    (_S.PENDING, True): _SETTLE, (_S.PENDING, False): _STOP,
    (_S.CREATING, True): _SETTLE, (_S.CREATING, False): _STOP,
    (_S.FAILED, True): _SETTLE, (_S.FAILED, False): _STOP,
    (_S.DESTROYING, True): _DESTROY, (_S.DESTROYING, False): _DESTROY,
    (_S.CONTROLLER, True): _UNMAKE, (_S.CONTROLLER, False): _UNMAKE,
}
HAS_SLIVER = frozenset({_S.PENDING, _S.CREATING, _S.RUNNING, _S.STOPPED, _S.FAILED})


def sliver_state(value: str, name: str) -> SliverState:
    try:
        return SliverState(value)
    except ValueError:
        raise StateError(f"sliver {name}: unknown state {value!r} in the state database; "
                         f"known: {', '.join(SliverState)}") from None


@dataclass
class SliverRecord:
    name: str
    slice_id: int
    instantiation: str
    expires: int
    image: str
    spec: dict[str, Any]
    rspec: dict[str, Any]
    problems: list[str]
    state: SliverState
    message: str
    want_running: bool
    applied: str
    created_at: float
    updated_at: float
    target: str = ""


@dataclass(frozen=True)
class Summary:
    """The few fields planning needs, read without decoding any JSON."""

    name: str
    state: SliverState
    expires: int
    want_running: bool
    applied: str
    target: str


_COLUMNS = ("name, slice_id, instantiation, expires, image, spec, rspec, problems, state, "
            "message, want_running, applied, created_at, updated_at, target")


def _row_to_record(row: tuple[Any, ...]) -> SliverRecord:
    return SliverRecord(
        name=row[0], slice_id=row[1], instantiation=row[2], expires=row[3], image=row[4],
        spec=json.loads(row[5]), rspec=json.loads(row[6]), problems=json.loads(row[7]),
        state=sliver_state(row[8], row[0]), message=row[9], want_running=bool(row[10]), applied=row[11],
        created_at=row[12], updated_at=row[13], target=row[14],
    )


class State:
    """Open with `State.open(state_dir)`; close with `close()` (or use as a context manager)."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self.path = path

    @classmethod
    def open(cls, state_dir: str | Path) -> State:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = state_dir / "agent.db"
        # Only root reads the state (slice tags, keys, the last reply) [F15]; the state
        # dir itself stays traversable, since sliver roots live below it.
        old_umask = os.umask(0o077)
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        finally:
            os.umask(old_umask)
        try:
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.chmod(f"{path}{suffix}", 0o600)
                except FileNotFoundError:
                    pass
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:   # a new database: version 2's tables, then the migrations
                db.executescript(RCAP_TABLES)
                db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
                row = ("2",)
            while int(row[0]) in MIGRATIONS and int(row[0]) < SCHEMA_VERSION:
                version = int(row[0])
                db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[version]} UPDATE meta SET "
                                 f"value='{version + 1}' WHERE key='schema_version'; COMMIT;")
                row = (str(version + 1),)
            if int(row[0]) != SCHEMA_VERSION:
                raise StateError(f"{path}: schema version {row[0]}, this agent knows "
                                 f"{SCHEMA_VERSION}; move the file aside or upgrade the agent")
        except BaseException:
            db.close()
            raise
        return cls(db, path)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def delete_meta(self, key: str) -> None:
        self._db.execute("DELETE FROM meta WHERE key=?", (key,))

    def meta_with_prefix(self, prefix: str) -> dict[str, str]:
        """{key without `prefix`: value} of the meta keys starting with `prefix`."""
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._db.execute("SELECT key, value FROM meta WHERE key LIKE ? ESCAPE '\\'",
                                (like,))
        return {k[len(prefix):]: v for k, v in rows}

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                         "value=excluded.value", (key, value))

    def save_reply(self, reply: dict[str, Any]) -> None:
        """The last good (validated) GetSlivers reply, as JSON."""
        with self.transaction():
            self.set_meta("last_reply", json.dumps(reply, sort_keys=True, default=str))
            self.set_meta("last_reply_at", repr(time.time()))

    def last_reply(self) -> dict[str, Any] | None:
        text = self.get_meta("last_reply")
        return json.loads(text) if text else None

    # -- uid ranges ------------------------------------------------------------------------

    def allocate_uid_range(self, name: str, pool_ranges: int) -> int:
        """Range index for `name`: its existing one, or the lowest free one (recorded)."""
        with self.transaction() as db:
            row = db.execute("SELECT idx FROM uid_ranges WHERE name=?", (name,)).fetchone()
            if row:
                return int(row[0])
            # Lowest free index: the first gap in the sorted list.
            row = db.execute(
                "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM uid_ranges WHERE idx=0) THEN 0 ELSE "
                "(SELECT MIN(a.idx)+1 FROM uid_ranges a WHERE NOT EXISTS "
                "(SELECT 1 FROM uid_ranges b WHERE b.idx=a.idx+1)) END").fetchone()
            idx = int(row[0])
            if idx >= pool_ranges:
                raise StateError(f"uid pool exhausted: all {pool_ranges} ranges are in use "
                                 f"(raise uid_pool_ranges); cannot give one to {name!r}")
            db.execute("INSERT INTO uid_ranges VALUES (?, ?, ?)", (idx, name, time.time()))
            return idx

    def claim_uid_range(self, name: str, idx: int) -> str | None:
        """Record range `idx` for `name` (a running context found using it); returns
        the name already holding `idx`, if another one does (then nothing changes)."""
        with self.transaction() as db:
            row = db.execute("SELECT name FROM uid_ranges WHERE idx=?", (idx,)).fetchone()
            if row:
                return None if row[0] == name else str(row[0])
            db.execute("DELETE FROM uid_ranges WHERE name=?", (name,))
            db.execute("INSERT INTO uid_ranges VALUES (?, ?, ?)", (idx, name, time.time()))
            return None

    def owned_ports(self) -> dict[str, list[tuple[str, int, str, str]]]:
        """{slice: [(proto, port, address, source)]} from the ports table, sorted."""
        out: dict[str, list[tuple[str, int, str, str]]] = {}
        for addr, proto, port, name, src in self._db.execute(
                "SELECT address, proto, port, name, source FROM ports "
                "ORDER BY name, proto, address, port"):
            out.setdefault(name, []).append((proto, int(port), addr, src))
        return out

    def uid_range_of(self, name: str) -> int | None:
        row = self._db.execute("SELECT idx FROM uid_ranges WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else None

    def uid_ranges(self) -> dict[str, int]:
        return {n: int(i) for i, n in self._db.execute("SELECT idx, name FROM uid_ranges")}

    def release_uid_range(self, name: str) -> None:
        self._db.execute("DELETE FROM uid_ranges WHERE name=?", (name,))

    # -- slivers ------------------------------------------------------------------------------

    def put_sliver(self, rec: SliverRecord) -> None:
        rec.state = SliverState(rec.state)   # a value outside the enum is never written
        rec.updated_at = time.time()
        self._db.execute(
            f"INSERT INTO slivers ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(name) DO UPDATE SET slice_id=excluded.slice_id, "
            "instantiation=excluded.instantiation, expires=excluded.expires, "
            "image=excluded.image, spec=excluded.spec, rspec=excluded.rspec, "
            "problems=excluded.problems, state=excluded.state, message=excluded.message, "
            "want_running=excluded.want_running, applied=excluded.applied, "
            "updated_at=excluded.updated_at, target=excluded.target",
            (rec.name, rec.slice_id, rec.instantiation, rec.expires, rec.image,
             json.dumps(rec.spec, sort_keys=True), json.dumps(rec.rspec, sort_keys=True),
             json.dumps(rec.problems), rec.state, rec.message, int(rec.want_running),
             rec.applied, rec.created_at, rec.updated_at, rec.target),
        )

    def set_sliver_state(self, name: str, state: SliverState | str, message: str = "",
                         applied: str | None = None) -> None:
        state = SliverState(state)   # a value outside the enum is never written
        if applied is None:
            self._db.execute("UPDATE slivers SET state=?, message=?, updated_at=? WHERE name=?",
                             (state, message, time.time(), name))
        else:
            self._db.execute("UPDATE slivers SET state=?, message=?, applied=?, updated_at=? "
                             "WHERE name=?", (state, message, applied, time.time(), name))

    def set_target(self, name: str, target: str) -> None:
        """What should be applied to the sliver (agent/rcaps: its amounts after loans)."""
        self._db.execute("UPDATE slivers SET target=? WHERE name=?", (target, name))

    def get_sliver(self, name: str) -> SliverRecord | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM slivers WHERE name=?", (name,)).fetchone()
        return _row_to_record(row) if row else None

    def slivers(self) -> dict[str, SliverRecord]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM slivers ORDER BY name")
        return {row[0]: _row_to_record(row) for row in rows}

    def summaries(self) -> dict[str, Summary]:
        """What reconcile plans from; a sliver held stopped (see set_held) is not
        wanted running whatever PLC says."""
        held = self.held()
        rows = self._db.execute("SELECT name, state, expires, want_running, applied, target "
                                "FROM slivers")
        return {r[0]: Summary(r[0], sliver_state(r[1], r[0]), r[2],
                              bool(r[3]) and r[0] not in held, r[4], r[5])
                for r in rows}

    def set_held(self, name: str, held: bool) -> None:
        """Hold a sliver stopped (the local API's Stop) until released (Start)."""
        if held:
            self.set_meta(f"held:{name}", "1")
        else:
            self._db.execute("DELETE FROM meta WHERE key=?", (f"held:{name}",))

    def held(self) -> set[str]:
        return {k[len("held:"):] for (k,) in
                self._db.execute("SELECT key FROM meta WHERE key LIKE 'held:%'")}

    def mark_removed(self, names: list[str], reason: str) -> None:
        """Record the decision to destroy (taken from a good reply) before acting on it."""
        with self.transaction() as db:
            db.executemany("UPDATE slivers SET state=?, message=? WHERE name=?",
                           [(SliverState.DESTROYING, reason, n) for n in names])

    def delete_sliver(self, name: str) -> None:
        """Forget a destroyed sliver and everything it held (its counters stay)."""
        with self.transaction() as db:
            db.execute("DELETE FROM slivers WHERE name=?", (name,))
            db.execute("DELETE FROM meta WHERE key IN (?, ?, ?)",
                       (f"held:{name}", f"initscript_status:{name}", f"initscript_ran:{name}"))
            db.execute("DELETE FROM uid_ranges WHERE name=?", (name,))
            db.execute("DELETE FROM ports WHERE name=?", (name,))
            db.execute("DELETE FROM loans WHERE lender=? OR recipient=?", (name, name))

    # -- loans (read by the slice API; written by a later part) --------------------------------

    def loans_of(self, name: str) -> list[list[Any]]:
        rows = self._db.execute("SELECT recipient, resource, amount FROM loans WHERE lender=? "
                                "ORDER BY position", (name,))
        return [[r, res, amt] for r, res, amt in rows]
