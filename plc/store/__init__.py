"""Storage behind one interface (``Store``/``Connection``); SQLite is the default.

``open_store("sqlite:///path")`` or a plain path gives a SQLiteStore. A PostgreSQL
store would implement the same two classes (see base.py for what SQL they must run).
"""

from plc.store.base import Connection, DBError, Store
from plc.store.sqlite import SQLiteStore


def open_store(url: str) -> Store:
    """A Store for ``url``: ``sqlite:///PATH`` or a file path."""
    if url.startswith("sqlite://"):
        url = url[len("sqlite://"):]
    elif "://" in url:
        raise ValueError(f"unsupported database URL {url!r}: only sqlite:///PATH (or a path)")
    return SQLiteStore(url)


__all__ = ["Connection", "DBError", "Store", "SQLiteStore", "open_store"]
