"""PostgreSQL backend (psycopg 3 and psycopg_pool).

Queries arrive in the shared spelling and go through ``plc.store.dialect.to_postgres``.
Each process (``plc serve --workers N`` forks) has its own pool, made on first use, so
no socket is shared across a fork. A call that writes runs SERIALIZABLE: every check
that reads and then writes (max_slices, unique names, slice-node limits) holds under
concurrent front ends; a serialisation failure or deadlock raises ``RetryError`` and
``plc.api`` runs the call again. Read-only calls run in autocommit (each statement
sees a consistent snapshot).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors as pgerr
from psycopg_pool import ConnectionPool

from plc.store.base import Connection, DBError, RetryError, Store, check_ident
from plc.store.dialect import to_postgres

log = logging.getLogger("plc.store")

_RETRY = (pgerr.SerializationFailure, pgerr.DeadlockDetected)


def redact_url(url: str) -> str:
    """The URL without its password (for logs and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def _params(params: Sequence[Any]) -> list[Any]:
    # booleans are stored as 0/1 (one schema for both dialects)
    return [int(p) if isinstance(p, bool) else p for p in params]


class PostgresConnection(Connection):
    dialect = "postgres"

    def __init__(self, store: PostgresStore, raw: psycopg.Connection[Any],
                 pool: ConnectionPool | None) -> None:
        self._store = store
        self._raw = raw
        self._pool = pool
        self._in_tx = False
        # one cursor for every statement: each caller below consumes its result before
        # the next statement (a cursor per statement cost ~5 us each)
        self._cur = raw.cursor()

    def _run(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        cur = self._cur
        try:
            cur.execute(to_postgres(sql), _params(params))
            return cur
        except _RETRY as e:
            raise RetryError(str(e).strip()) from None
        except psycopg.Error as e:
            raise DBError(str(e).strip()) from None
        except OverflowError:
            raise DBError("integer out of range") from None

    def begin(self, write: bool, serializable: bool = True) -> None:
        if not write:
            self._run_plain("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        else:
            self._run_plain("BEGIN ISOLATION LEVEL SERIALIZABLE" if serializable
                            else "BEGIN ISOLATION LEVEL READ COMMITTED")
        self._in_tx = True

    def _run_plain(self, sql: str) -> None:
        try:
            self._raw.execute(sql)
        except _RETRY as e:
            raise RetryError(str(e).strip()) from None
        except psycopg.Error as e:
            raise DBError(str(e).strip()) from None

    def commit(self) -> None:
        if self._in_tx:
            self._in_tx = False
            self._run_plain("COMMIT")

    def rollback(self) -> None:
        if self._in_tx or self._raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self._in_tx = False
            try:
                self._raw.execute("ROLLBACK")
            except psycopg.Error:
                pass

    def close(self) -> None:
        self.rollback()
        if self._pool is not None:
            self._pool.putconn(self._raw)
        else:
            self._raw.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self._run(sql, params)
        # column names straight from the result: ``cur.description`` builds a Column
        # object per column per statement (~40% of the client's CPU for GetSlivers)
        res = cur.pgresult
        nfields = res.nfields if res is not None else 0
        if not nfields:
            return []
        rows = cur.fetchall()
        if not rows:
            return []
        names = [res.fname(i).decode() for i in range(nfields)]  # type: ignore[union-attr]
        return [dict(zip(names, r, strict=True)) for r in rows]

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self._run(sql, params)
        res = cur.pgresult
        return cur.fetchall() if res is not None and res.nfields else []

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._run(sql, params).rowcount

    def insert(self, table: str, values: dict[str, Any]) -> int:
        check_ident(table)
        cols = ", ".join(check_ident(c) for c in values)
        marks = ", ".join("?" * len(values))
        sql = f"INSERT INTO {table} ({cols}) VALUES ({marks})" if values else \
            f"INSERT INTO {table} DEFAULT VALUES"
        key = self._store.int_keys(self).get(table)
        if key is None:
            self._run(sql, list(values.values()))
            return 0
        row = self._run(sql + f" RETURNING {key}", list(values.values())).fetchone()
        return int(row[0]) if row else 0

    def raw_execute(self, sql: str) -> None:
        """A statement with no parameters and no translation (DDL scripts)."""
        self._run_plain(sql)


class PostgresStore(Store):
    dialect = "postgres"

    def __init__(self, url: str, pool_size: int = 8) -> None:
        self.dsn = url
        self.url = redact_url(url)
        self.pool_size = pool_size
        self._pools: dict[int, ConnectionPool] = {}
        self._lock = threading.Lock()
        self._keys: dict[str, str] | None = None

    # -- connections ----------------------------------------------------------------
    def _open(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.dsn, autocommit=True)
        except psycopg.Error as e:
            raise DBError(f"cannot connect to {self.url}: {str(e).strip()}") from None

    def pool(self) -> ConnectionPool:
        """This process's pool (made on first use: a forked worker makes its own)."""
        pid = os.getpid()
        with self._lock:
            pool = self._pools.get(pid)
            if pool is None:
                pool = ConnectionPool(self.dsn, min_size=1, max_size=self.pool_size,
                                      kwargs={"autocommit": True}, open=False,
                                      name=f"plc-{pid}", timeout=30.0)
                try:
                    pool.open(wait=True, timeout=30.0)
                except Exception as e:
                    raise DBError(f"cannot connect to {self.url}: {e}") from None
                self._pools[pid] = pool
            return pool

    def connect(self) -> PostgresConnection:
        pool = self.pool()
        try:
            raw = pool.getconn()
        except Exception as e:
            raise DBError(f"no database connection to {self.url}: {e}") from None
        return PostgresConnection(self, raw, pool)

    def connect_direct(self) -> PostgresConnection:
        """A connection outside the pool (administration before any fork)."""
        return PostgresConnection(self, self._open(), None)

    def close(self) -> None:
        with self._lock:
            pool = self._pools.pop(os.getpid(), None)
            self._pools.clear()  # pools inherited over a fork are not ours to close
        if pool is not None:
            pool.close()

    def int_keys(self, conn: PostgresConnection) -> dict[str, str]:
        """table -> its single-column integer primary key (for INSERT ... RETURNING)."""
        if self._keys is None:
            rows = conn._raw.execute(
                "SELECT c.table_name, MIN(k.column_name) FROM information_schema."
                "table_constraints c JOIN information_schema.key_column_usage k USING "
                "(constraint_schema, constraint_name, table_name) JOIN information_schema."
                "columns col ON col.table_schema = c.table_schema AND col.table_name = "
                "c.table_name AND col.column_name = k.column_name WHERE c.constraint_type"
                " = 'PRIMARY KEY' AND c.table_schema = current_schema() AND col.data_type "
                "IN ('bigint', 'integer') GROUP BY c.table_name HAVING COUNT(*) = 1"
            ).fetchall()
            keys = {t: k for t, k in rows}
            if not keys:
                return keys  # no schema yet: look again next time
            self._keys = keys
        return self._keys

    # -- schema ---------------------------------------------------------------------
    def exists(self) -> bool:
        conn = self.connect_direct()
        try:
            return conn.scalar("SELECT to_regclass('plc_meta') IS NOT NULL") is True
        finally:
            conn.close()

    def run_script(self, conn: Connection, script: str) -> None:
        assert isinstance(conn, PostgresConnection)
        conn.raw_execute(script)
        self._keys = None

    def connection_limit(self) -> tuple[int, int]:
        """(connections the server accepts for us, connections open now)."""
        conn = self.connect_direct()
        try:
            limit = int(conn.scalar("SELECT current_setting('max_connections')::int - "
                                    "current_setting('superuser_reserved_connections')::int"))
            used = int(conn.scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE "
                                   "backend_type = 'client backend'"))
            return limit, used
        finally:
            conn.close()
