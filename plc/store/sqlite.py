"""SQLite backend (WAL mode; one connection per thread)."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import stat
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from plc.store.base import Connection, DBError, Store, check_ident

log = logging.getLogger("plc.store")


@lru_cache(maxsize=4096)
def _pattern(pattern: str) -> re.Pattern[str]:
    out = []
    for ch in pattern:
        if ch in "*%":
            out.append(".*")
        elif ch == "_":
            out.append(".")  # [quirk] _ stays the SQL single-character wildcard
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out), re.IGNORECASE | re.DOTALL)


def plc_ilike(value: Any, pattern: Any) -> int | None:
    """Case-insensitive LIKE with * and % as wildcards (the legacy ILIKE filter)."""
    if value is None or pattern is None:
        return None
    return 1 if _pattern(str(pattern)).fullmatch(str(value)) else 0


class SQLiteConnection(Connection):
    def __init__(self, path: str) -> None:
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30.0,
                                       check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._db.create_function("plc_ilike", 2, plc_ilike, deterministic=True)
        except sqlite3.Error as e:
            raise DBError(f"cannot open database {path}: {e}") from None
        self._in_tx = False

    def begin(self, write: bool, serializable: bool = True) -> None:
        # IMMEDIATE takes the write lock up front: two writers never deadlock on a
        # read-to-write upgrade, the second waits (busy_timeout) for the first.
        self._run("BEGIN IMMEDIATE" if write else "BEGIN")
        self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self._in_tx = False
            self._run("COMMIT")

    def rollback(self) -> None:
        if self._in_tx:
            self._in_tx = False
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def close(self) -> None:
        self.rollback()
        self._db.close()

    def _run(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as e:
            raise DBError(str(e)) from None
        except OverflowError:
            raise DBError("integer out of range") from None

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self._run(sql, params).fetchall()]

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self._db.cursor()
        cur.row_factory = None  # plain tuples
        try:
            return cur.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise DBError(str(e)) from None
        except OverflowError:
            raise DBError("integer out of range") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._run(sql, params).rowcount

    def insert(self, table: str, values: dict[str, Any]) -> int:
        cols = ", ".join(check_ident(c) for c in values)
        marks = ", ".join("?" * len(values))
        sql = f"INSERT INTO {check_ident(table)} ({cols}) VALUES ({marks})" if values else \
            f"INSERT INTO {check_ident(table)} DEFAULT VALUES"
        return self._run(sql, list(values.values())).lastrowid or 0

    def executescript(self, script: str) -> None:
        try:
            self._db.executescript(script)
        except sqlite3.Error as e:
            raise DBError(str(e)) from None


#: the files SQLite keeps beside the database; it creates them with the database's mode
_COMPANIONS = ("", "-wal", "-shm", "-journal")


def make_private(path: str) -> None:
    """Create the database file 0600 whatever the umask (SQLite would make it 0644, and
    its WAL and shared-memory files inherit the database's mode: node keys and password
    hashes readable by any local user, issue 9); take the world's bits off existing
    files."""
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    except OSError:
        return  # no directory, read-only place...: sqlite3 reports it
    else:
        os.fchmod(fd, 0o600)
        os.close(fd)
    for suffix in _COMPANIONS:
        name = path + suffix
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
            if mode & 0o007:
                os.chmod(name, mode & 0o770)
                log.warning("%s was readable by every user (mode %o); now %o",
                            name, mode, mode & 0o770)
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("%s: cannot restrict its mode: %s", name, e)


class SQLiteStore(Store):
    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.url = f"sqlite://{self.path}"
        self._private = False

    def connect(self) -> SQLiteConnection:
        if self.path not in (":memory:", "") and not self._private:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass  # sqlite3 reports it
            make_private(self.path)
            self._private = True
        return SQLiteConnection(self.path)

    def exists(self) -> bool:
        if self.path != ":memory:" and not Path(self.path).exists():
            return False
        conn = self.connect()
        try:
            return bool(conn.query(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'plc_meta'"))
        finally:
            conn.close()

    def run_script(self, conn: Connection, script: str) -> None:
        """Statement by statement inside the caller's transaction (executescript would
        commit it first)."""
        stmt = ""
        for line in script.splitlines(keepends=True):
            stmt += line
            if sqlite3.complete_statement(stmt):
                if stmt.strip().strip(";").strip():
                    conn.execute(stmt)
                stmt = ""
        if stmt.strip():
            conn.execute(stmt)
