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
from plc.store import SQLiteStore

ADMIN_EMAIL = "admin@test.example.org"
ADMIN_PASSWORD = "admin-secret-pw"
PREFIX = "pl"


@dataclass
class PLC:
    """A running test server."""

    url: str
    store: SQLiteStore
    api: API
    server: PLCServer
    admin: dict[str, Any]

    def proxy(self) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy(self.url, allow_none=True)

    def password_auth(self, email: str, password: str) -> dict[str, Any]:
        return {"AuthMethod": "password", "Username": email, "AuthString": password}


@pytest.fixture
def plc_store(tmp_path: Path) -> SQLiteStore:
    store = SQLiteStore(tmp_path / f"plc-{os.getpid()}.db")
    initialise(store, ADMIN_EMAIL, ADMIN_PASSWORD, PREFIX)
    return store


def start_server(store: SQLiteStore, **overrides: Any) -> tuple[PLCServer, threading.Thread]:
    cfg = Config().replace(api_listen="127.0.0.1:0", db_path=store.path, **overrides)
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


@pytest.fixture(scope="session")
def world_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A database holding tests/plc/world.py's world, built once per session."""
    from tests.plc.world import build

    path = tmp_path_factory.mktemp(f"plc-world-{os.getpid()}") / "world.db"
    store = SQLiteStore(path)
    initialise(store, ADMIN_EMAIL, ADMIN_PASSWORD, PREFIX)
    server, thread = start_server(store)
    try:
        host, port = server.server_address[:2]
        api = xmlrpc.client.ServerProxy(f"http://{host}:{port}/PLCAPI/", allow_none=True)
        world = build(api, {"AuthMethod": "password", "Username": ADMIN_EMAIL,
                            "AuthString": ADMIN_PASSWORD})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    conn = store.connect()
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return path, world


@pytest.fixture
def world(world_template: tuple[Path, Any], tmp_path: Path) -> Iterator[tuple[PLC, Any]]:
    """A running server on a private copy of the world database."""
    import shutil

    src, w = world_template
    dst = tmp_path / f"world-{os.getpid()}.db"
    shutil.copyfile(src, dst)
    store = SQLiteStore(dst)
    server, thread = start_server(store, api_maintenance_password="maint-pw")
    host, port = server.server_address[:2]
    try:
        yield PLC(f"http://{host}:{port}/PLCAPI/", store, server.api, server, w.auth["admin"]), w
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
