"""``plc export`` / ``plc import``: a whole PLC database as one JSON document, to move
it between SQLite and PostgreSQL (either way) without losing anything: every row of
every table in insertion order, and each table's id counter (so ids are never reused
after the move, as neither store reuses them)."""

from __future__ import annotations

import json
import re
from typing import IO, Any

from plc.store.base import Connection, Store, check_ident
from plc.store.migrations import MIGRATIONS, current_version, latest

FORMAT = "plc-export-1"


def tables() -> list[str]:
    """Every table of the schema in creation order (references point backwards)."""
    names: list[str] = []
    for mig in MIGRATIONS:
        for name in re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", mig.sqlite):
            if name not in names:
                names.append(name)
    return names


def _columns(conn: Connection, table: str) -> list[str]:
    if conn.dialect == "postgres":
        rows = conn.rows("SELECT column_name FROM information_schema.columns WHERE "
                         "table_schema = current_schema() AND table_name = ? "
                         "ORDER BY ordinal_position", [table])
    else:
        rows = [(r["name"],) for r in conn.query(f"PRAGMA table_info({check_ident(table)})")]
    return [r[0] for r in rows if r[0] != "rowid"]


def _counters(conn: Connection) -> dict[str, int]:
    """table -> the last id its counter handed out."""
    out: dict[str, int] = {}
    if conn.dialect == "postgres":
        for table, col in conn.rows(
                "SELECT table_name, column_name FROM information_schema.columns WHERE "
                "table_schema = current_schema() AND is_identity = 'YES' AND "
                "column_name <> 'rowid'"):
            seq = conn.scalar("SELECT pg_get_serial_sequence(?, ?)", [table, col])
            last, called = conn.rows(f"SELECT last_value, is_called FROM {seq}")[0]
            out[table] = int(last) if called else 0
    else:
        for r in conn.query("SELECT name, seq FROM sqlite_sequence"):
            out[r["name"]] = int(r["seq"])
    return out


def export(store: Store, out: IO[str]) -> dict[str, int]:
    """Write the database to ``out``; rows per table."""
    counts: dict[str, int] = {}
    with store.transaction(write=False) as conn:
        doc: dict[str, Any] = {"format": FORMAT, "schema_version": current_version(conn),
                               "counters": _counters(conn), "tables": {}}
        for table in tables():
            cols = _columns(conn, table)
            order = "rowid"  # insertion order (an alias of the integer key where there is one)
            if conn.dialect == "postgres" and "rowid" not in _all_columns(conn, table):
                order = cols[0]
            rows = conn.rows(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {order}")
            doc["tables"][table] = {"columns": cols, "rows": [list(r) for r in rows]}
            counts[table] = len(rows)
    json.dump(doc, out)
    return counts


def _all_columns(conn: Connection, table: str) -> list[str]:
    return [r[0] for r in conn.rows(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = "
        "current_schema() AND table_name = ?", [table])]


class ImportError_(Exception):
    """An export that cannot go into this database."""


def import_(store: Store, src: IO[str]) -> dict[str, int]:
    """Create the schema in an empty database and load an export into it."""
    doc = json.load(src)
    if doc.get("format") != FORMAT:
        raise ImportError_(f"not a PLC export (format {doc.get('format')!r})")
    if doc.get("schema_version") != latest():
        raise ImportError_(f"export is of schema version {doc.get('schema_version')}, this "
                           f"code's is {latest()}: migrate the source database first")
    if store.exists():
        raise ImportError_(f"{store.url}: not empty (import only into a new database)")
    store.create_schema()
    counts: dict[str, int] = {}
    with store.transaction() as conn:
        known = set(tables())
        for table, data in doc["tables"].items():
            if table not in known or table == "schema_version":
                continue
            cols = [check_ident(c) for c in data["columns"]]
            sql = (f"INSERT INTO {check_ident(table)} ({', '.join(cols)}) "
                   f"VALUES ({', '.join('?' * len(cols))})")
            for row in data["rows"]:
                conn.execute(sql, row)
            counts[table] = len(data["rows"])
        for table, last in doc.get("counters", {}).items():
            _set_counter(conn, check_ident(table), int(last))
    return counts


def _set_counter(conn: Connection, table: str, last: int) -> None:
    if conn.dialect == "postgres":
        keys = [r[0] for r in conn.rows(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = "
            "current_schema() AND table_name = ? AND is_identity = 'YES' AND "
            "column_name <> 'rowid'", [table])]
        if not keys:
            return
        seq = conn.scalar("SELECT pg_get_serial_sequence(?, ?)", [table, keys[0]])
        top = conn.scalar(f"SELECT COALESCE(MAX({keys[0]}), 0) FROM {table}")
        value = max(last, int(top))
        conn.scalar("SELECT setval(CAST(? AS regclass), CAST(? AS BIGINT), ? = 1)",
                    [seq, max(value, 1), value > 0])
    else:
        top = conn.scalar(f"SELECT COALESCE(MAX(rowid), 0) FROM {table}")
        value = max(last, int(top))
        if conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = ?", [value, table]) == 0:
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", [table, value])
