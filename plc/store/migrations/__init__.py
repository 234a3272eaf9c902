"""Numbered schema migrations, recorded in the database's ``schema_version`` table.

Migration 1 is the schema as first released (schema.sql + indexes.sql). A later
migration is a file ``NNNN_name.sql`` in this directory, written in the SQLite dialect
and translated for PostgreSQL by ``plc.store.dialect.ddl_to_postgres`` (a file
``NNNN_name.pg.sql`` beside it replaces the translation where it cannot do). ``plc
migrate`` applies the missing ones, in order, in one transaction; ``plc serve`` refuses
a database that is not exactly at this code's version, with a message saying which
way it is off.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from importlib import resources

from plc.store.base import Connection, DBError, Store
from plc.store.dialect import ddl_to_postgres

#: pg_advisory_xact_lock key that serialises concurrent migrations of one database
_LOCK_KEY = 0x706C63  # "plc"


class SchemaError(DBError):
    """The database's schema is not the one this code runs against."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sqlite: str
    postgres: str


def _read(package: str, name: str) -> str:
    return resources.files(package).joinpath(name).read_text()


def load() -> list[Migration]:
    """Every migration of this code, in order (versions 1..N without gaps)."""
    first = _read("plc.store", "schema.sql") + "\n" + _read("plc.store", "indexes.sql")
    out = [Migration(1, "initial schema", first,
                     ddl_to_postgres(first) + "\n" + _read("plc.store", "pg_functions.sql"))]
    here = resources.files("plc.store.migrations")
    for entry in sorted(here.iterdir(), key=lambda e: e.name):
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if not m:
            continue
        text = entry.read_text()
        pg_file = here.joinpath(entry.name[:-4] + ".pg.sql")
        pg = pg_file.read_text() if pg_file.is_file() else ddl_to_postgres(text)
        out.append(Migration(int(m.group(1)), m.group(2).replace("_", " "), text, pg))
    for i, mig in enumerate(out, 1):
        if mig.version != i:
            raise RuntimeError(f"migration numbers must run 1..N: {mig.version} at {i}")
    return out


MIGRATIONS: list[Migration] = load()


def latest() -> int:
    return MIGRATIONS[-1].version if MIGRATIONS else 0


def _has_table(conn: Connection, name: str) -> bool:
    if conn.dialect == "postgres":
        return conn.scalar("SELECT to_regclass(?) IS NOT NULL", [name]) is True
    return bool(conn.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                           [name]))


def current_version(conn: Connection) -> int:
    """The schema version of the database: 0 when empty; a database made before
    migrations were numbered (plc_meta but no schema_version) counts as 1."""
    if _has_table(conn, "schema_version"):
        return int(conn.scalar("SELECT MAX(version) FROM schema_version") or 0)
    return 1 if _has_table(conn, "plc_meta") else 0


def _too_new(store: Store, have: int) -> SchemaError:
    return SchemaError(
        f"{store.url}: database schema version {have} is newer than this PLC code "
        f"(which knows versions up to {latest()}): run a PLC release at least as new as "
        f"the one that migrated it; this code will not touch it")


_STAMP = ("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
          "name TEXT NOT NULL, applied INTEGER NOT NULL)")


def migrate(store: Store, target: int | None = None) -> list[int]:
    """Apply the missing migrations (up to ``target``) in one transaction; the
    versions applied. A database newer than the code is refused."""
    goal = latest() if target is None else target
    with store.transaction() as conn:
        if conn.dialect == "postgres":
            conn.execute("SELECT pg_advisory_xact_lock(?)", [_LOCK_KEY])
        have = current_version(conn)
        if have > latest():
            raise _too_new(store, have)
        legacy = have == 1 and not _has_table(conn, "schema_version")
        stamp = _STAMP if conn.dialect == "sqlite" else ddl_to_postgres(_STAMP + ";")
        store.run_script(conn, stamp)
        done = []
        if legacy:  # made before numbering: its indexes may lag (they are idempotent)
            store.run_script(conn, _read("plc.store", "indexes.sql"))
            conn.insert("schema_version", {"version": 1, "name": "initial schema (stamped)",
                                           "applied": int(time.time())})
        for mig in MIGRATIONS:
            if have < mig.version <= goal:
                store.run_script(conn, mig.postgres if conn.dialect == "postgres"
                                 else mig.sqlite)
                conn.insert("schema_version", {"version": mig.version, "name": mig.name,
                                               "applied": int(time.time())})
                done.append(mig.version)
        return done


def check_current(store: Store) -> None:
    """Refuse to serve a database not at this code's version (a legacy database is
    stamped first)."""
    conn = store.connect()
    try:
        have = current_version(conn)
        legacy = have == 1 and not _has_table(conn, "schema_version")
    finally:
        conn.close()
    if have > latest():
        raise _too_new(store, have)
    if legacy:
        migrate(store, 1)
        have = 1
    if have < latest():
        raise SchemaError(f"{store.url}: database schema version {have} is older than "
                          f"this PLC code ({latest()}): run `plc migrate` first")
