"""Fixtures for PLC tests: a fresh database and an in-process server on a free
loopback port; both cleaned up even when a test fails."""

from __future__ import annotations

import os
import threading
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from plc.api import API
from plc.config import Config
from plc.initdb import initialise
from plc.server import PLCServer, make_server
from plc.store import SQLiteStore, Store
from tests.plc import pgserver

ADMIN_EMAIL = "admin@test.example.org"
ADMIN_PASSWORD = "admin-secret-pw"
PREFIX = "pl"


@dataclass
class PLC:
    """A running test server."""

    url: str
    store: Store
    api: API
    server: PLCServer
    admin: dict[str, Any]

    def proxy(self) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy(self.url, allow_none=True)

    def password_auth(self, email: str, password: str) -> dict[str, Any]:
        return {"AuthMethod": "password", "Username": email, "AuthString": password}


#: the stores every PLC test runs on (PLC_TEST_STORES=sqlite limits it to one)
STORES = [s for s in os.environ.get("PLC_TEST_STORES", "sqlite,postgres").split(",") if s]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgserver.PGServer]:
    """One PostgreSQL for the session (temp dir, Unix socket, user nobody), stopped and
    removed at the end even when tests fail."""
    try:
        server = pgserver.start(name="t")
    except RuntimeError as e:
        pytest.fail(f"cannot start PostgreSQL for the PLC tests: {e}")
    try:
        yield server
    finally:
        server.stop()


_db_counter = iter(range(1, 1 << 30))


@pytest.fixture(scope="session")
def pg_template(pg_server: pgserver.PGServer) -> str:
    """An initialised PLC database to copy (CREATE DATABASE ... TEMPLATE)."""
    from plc.store.postgres import PostgresStore

    name = "plc_template"
    store = PostgresStore(pg_server.create_db(name))
    initialise(store, ADMIN_EMAIL, ADMIN_PASSWORD, PREFIX)
    store.close()
    return name


#: per template, a copy that its last test left exactly as it was made (see pg_copy)
_unchanged_copy: dict[tuple[str, str], str] = {}


def _pg_mark(server: pgserver.PGServer, name: str) -> tuple[Any, ...]:
    """What changes when anything is written: the cluster's next transaction id (every
    row written, in any database, takes one) and the copy's sequences (nextval takes
    none). Other sessions on the copy are ended first, so none writes after the look."""
    import psycopg

    with psycopg.connect(server.url(name), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        xid = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())").fetchone()
        seqs = conn.execute("SELECT schemaname, sequencename, last_value FROM pg_sequences "
                            "ORDER BY 1, 2").fetchall()
    return (xid, tuple(seqs))


def pg_copy(server: pgserver.PGServer, template: str) -> Iterator[Store]:
    """A database equal to ``template``: a new copy (CREATE DATABASE ... TEMPLATE, most of
    a PostgreSQL test's setup), or the copy the previous test of this template was given
    if that test wrote nothing at all (checked by ``_pg_mark``: nothing in the cluster
    took a transaction id and no sequence moved); a copy a test wrote to is dropped."""
    from plc.store.postgres import PostgresStore

    key = (server.dir, template)
    name = _unchanged_copy.pop(key, None)
    if name is None:
        name = f"t{os.getpid()}_{next(_db_counter)}"
        server.create_db(name, template)
    mark = _pg_mark(server, name)
    store = PostgresStore(server.url(name), pool_size=16)
    keep = False
    try:
        try:
            yield store
        except GeneratorExit:  # world's teardown closes the generator
            pass
        store.close()
        keep = key not in _unchanged_copy and _pg_mark(server, name) == mark
    finally:
        store.close()
        if keep:
            _unchanged_copy[key] = name
        else:
            server.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=STORES)
def plc_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh initialised database: SQLite, then PostgreSQL (every test that uses a
    store, directly or through ``plc``/``world``, runs on both)."""
    if request.param == "postgres":
        server = request.getfixturevalue("pg_server")
        template = request.getfixturevalue("pg_template")
        yield from pg_copy(server, template)
        return
    store = SQLiteStore(tmp_path / f"plc-{os.getpid()}.db")
    initialise(store, ADMIN_EMAIL, ADMIN_PASSWORD, PREFIX)
    yield store


def store_config(store: Store, **overrides: Any) -> Config:
    if store.dialect == "postgres":
        return Config().replace(api_listen="127.0.0.1:0", database_url=store.dsn,  # type: ignore[attr-defined]
                                **overrides)
    return Config().replace(api_listen="127.0.0.1:0", db_path=store.path,  # type: ignore[attr-defined]
                            **overrides)


def start_server(store: Store, **overrides: Any) -> tuple[PLCServer, threading.Thread]:
    cfg = store_config(store, **overrides)
    server = make_server(API(store, cfg), cfg)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              name="plc-test-server", daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def plc(plc_store: SQLiteStore) -> Iterator[PLC]:
    server, thread = start_server(plc_store, api_maintenance_password="maint-pw")
    host, port = server.server_address[:2]
    try:
        yield PLC(f"http://{host}:{port}/PLCAPI/", plc_store, server.api, server,
                  {"AuthMethod": "password", "Username": ADMIN_EMAIL,
                   "AuthString": ADMIN_PASSWORD})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _build_world(store: Store) -> Any:
    from tests.plc.world import build

    initialise(store, ADMIN_EMAIL, ADMIN_PASSWORD, PREFIX)
    server, thread = start_server(store)
    try:
        host, port = server.server_address[:2]
        api = xmlrpc.client.ServerProxy(f"http://{host}:{port}/PLCAPI/", allow_none=True)
        return build(api, {"AuthMethod": "password", "Username": ADMIN_EMAIL,
                           "AuthString": ADMIN_PASSWORD})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def world_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A database holding tests/plc/world.py's world, built once per session."""
    path = tmp_path_factory.mktemp(f"plc-world-{os.getpid()}") / "world.db"
    store = SQLiteStore(path)
    world = _build_world(store)
    conn = store.connect()
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return path, world


@pytest.fixture(scope="session")
def pg_world_template(pg_server: pgserver.PGServer) -> tuple[str, Any]:
    """The same world in a PostgreSQL database, to copy per test."""
    from plc.store.postgres import PostgresStore

    name = "plc_world"
    store = PostgresStore(pg_server.create_db(name), pool_size=16)
    world = _build_world(store)
    store.close()
    return name, world


@pytest.fixture(params=STORES)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[PLC, Any]]:
    """A running server on a private copy of the world database (each store)."""
    import shutil

    if request.param == "postgres":
        name, w = request.getfixturevalue("pg_world_template")
        gen = pg_copy(request.getfixturevalue("pg_server"), name)
        store: Store = next(gen)
    else:
        src, w = request.getfixturevalue("world_template")
        dst = tmp_path / f"world-{os.getpid()}.db"
        shutil.copyfile(src, dst)
        store, gen = SQLiteStore(dst), None
    server, thread = start_server(store, api_maintenance_password="maint-pw")
    host, port = server.server_address[:2]
    try:
        yield PLC(f"http://{host}:{port}/PLCAPI/", store, server.api, server, w.auth["admin"]), w
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        if gen is not None:
            gen.close()
