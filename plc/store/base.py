"""The store interface every backend implements.

SQL written against it uses ``?`` placeholders, plain SQL-92 plus these functions,
which each backend provides: ``plc_ilike(value, pattern)`` (case-insensitive match
where ``*`` and ``%`` are any sequence and ``_`` any one character), JSON arrays
built with ``json_group_array`` and read with ``json_each`` (PostgreSQL: json_agg /
json_array_elements, mapped by its backend). Identifiers are never taken from
clients; ``check_ident`` guards the helpers that build SQL from names.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*\Z")


class DBError(Exception):
    """A database error (becomes fault 106, the call's transaction is rolled back)."""


class RetryError(DBError):
    """A transaction lost a race with a concurrent one (serialisation failure or
    deadlock): nothing it did was committed, and the whole call may be run again."""


def check_ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"bad SQL identifier {name!r}")
    return name


class Connection(ABC):
    """One connection, used by one thread; a call runs in one transaction on it."""

    #: "sqlite" or "postgres": for the few places that must know (DDL, introspection)
    dialect = "sqlite"

    @abstractmethod
    def begin(self, write: bool, serializable: bool = True) -> None:
        """Start a transaction; ``serializable=False`` (PostgreSQL: READ COMMITTED) for
        writes that depend on nothing read in it (plc.method)."""

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def rollback(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts keyed by column name."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows as tuples in the order of the select list (no per-row dict of names:
        for readers that know their columns, such as plc.query)."""
        return [tuple(r.values()) for r in self.query(sql, params)]

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows changed."""

    @abstractmethod
    def insert(self, table: str, values: dict[str, Any]) -> int:
        """Insert one row; its new integer primary key (or 0)."""

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self.query(sql, params)
        if not rows:
            return None
        return next(iter(rows[0].values()))

    def update(self, table: str, where: dict[str, Any], values: dict[str, Any]) -> int:
        if not values:
            return 0
        sets = ", ".join(f"{check_ident(k)} = ?" for k in values)
        cond, params = where_clause(where)
        return self.execute(f"UPDATE {check_ident(table)} SET {sets} WHERE {cond}",
                            [*values.values(), *params])

    def delete(self, table: str, where: dict[str, Any]) -> int:
        cond, params = where_clause(where)
        return self.execute(f"DELETE FROM {check_ident(table)} WHERE {cond}", params)

    def select(self, table: str, where: dict[str, Any],
               columns: Iterable[str] = ("*",)) -> list[dict[str, Any]]:
        cols = ", ".join(c if c == "*" else check_ident(c) for c in columns)
        cond, params = where_clause(where)
        return self.query(f"SELECT {cols} FROM {check_ident(table)} WHERE {cond}", params)


def where_clause(where: dict[str, Any]) -> tuple[str, list[Any]]:
    """``{col: value}`` -> conjunction; a list value means IN, None means IS NULL."""
    parts: list[str] = []
    params: list[Any] = []
    for col, value in where.items():
        check_ident(col)
        if value is None:
            parts.append(f"{col} IS NULL")
        elif isinstance(value, list | tuple | set | frozenset):
            values = list(value)
            if not values:
                parts.append("0 = 1")
            else:
                parts.append(f"{col} IN ({', '.join('?' * len(values))})")
                params += values
        else:
            parts.append(f"{col} = ?")
            params.append(value)
    return (" AND ".join(parts) or "1 = 1"), params


class Store(ABC):
    """A database: hands out connections, creates and migrates the schema
    (plc.store.migrations: numbered migrations recorded in ``schema_version``)."""

    dialect = "sqlite"
    #: a URL naming the database, without any password (for messages and --db)
    url = ""

    @abstractmethod
    def connect(self) -> Connection: ...

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Connection]:
        """A new connection in one transaction: committed when the block ends,
        rolled back when it raises (anything, even KeyboardInterrupt); closed after."""
        conn = self.connect()
        try:
            conn.begin(write=write)
            yield conn
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    @abstractmethod
    def exists(self) -> bool:
        """Whether the database has been initialised."""

    @abstractmethod
    def run_script(self, conn: Connection, script: str) -> None:
        """Run a DDL script (in this store's dialect) inside the open transaction."""

    def create_schema(self) -> None:
        """Create every table of the object model in an empty database (every
        migration, recorded)."""
        from plc.store.migrations import migrate
        migrate(self)

    def ensure_indexes(self) -> None:
        """Bring an existing database up to date before serving: stamp a database made
        before migrations were numbered; refuse one newer than this code, or older
        (``plc migrate`` upgrades it)."""
        from plc.store.migrations import check_current
        check_current(self)

    def close(self) -> None:  # noqa: B027  (optional: only pooled stores hold anything)
        """Release pooled resources (nothing for SQLite)."""
