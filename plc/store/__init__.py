"""Storage behind one interface (``Store``/``Connection``): SQLite (the embedded
default) or PostgreSQL (several front ends on one database).

``open_store("sqlite:///path")`` or a plain path gives a SQLiteStore;
``open_store("postgresql://user@host/db")`` a PostgresStore. Queries are written once
(plc.store.dialect translates them); the schema is made and upgraded by numbered
migrations (plc.store.migrations).
"""

from plc.store.base import Connection, DBError, RetryError, Store
from plc.store.sqlite import SQLiteStore

_PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(url: str) -> bool:
    return url.startswith(_PG_SCHEMES)


def open_store(url: str, pool_size: int = 8) -> Store:
    """A Store for ``url``: ``sqlite:///PATH``, a file path, or ``postgresql://...``
    (``pool_size``: most connections of one process's pool)."""
    if is_postgres(url):
        from plc.store.postgres import PostgresStore
        return PostgresStore(url, pool_size=pool_size)
    if url.startswith("sqlite://"):
        url = url[len("sqlite://"):]
    elif "://" in url:
        raise ValueError(f"unsupported database URL {url!r}: sqlite:///PATH (or a path) "
                         "or postgresql://USER@HOST/DB")
    return SQLiteStore(url)


__all__ = ["Connection", "DBError", "RetryError", "Store", "SQLiteStore", "is_postgres",
           "open_store"]
