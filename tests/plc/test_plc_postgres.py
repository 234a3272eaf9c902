"""PostgreSQL-specific behaviour: several front ends on one database, migrations,
the connection budget of ``plc serve --workers``, export/import between stores."""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import signal
import threading
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plc import cli
from plc.api import API
from plc.method import METHODS
from plc.server import make_server
from plc.store import SQLiteStore, Store
from plc.store import migrations as mig
from plc.store.postgres import PostgresStore
from plc.store.transfer import export, import_
from tests.plc import pgserver
from tests.plc.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, pg_copy, start_server, store_config

ADMIN = {"AuthMethod": "password", "Username": ADMIN_EMAIL, "AuthString": ADMIN_PASSWORD}


def _front_end(dsn: str, port_q: Any) -> None:
    store = PostgresStore(dsn, pool_size=16)
    cfg = store_config(store, api_threads=16)
    server = make_server(API(store, cfg), cfg)
    port_q.put(server.server_address[1])
    server.serve_forever(poll_interval=0.05)


@pytest.fixture
def pg_db(pg_server: pgserver.PGServer, pg_template: str) -> Iterator[Store]:
    yield from pg_copy(pg_server, pg_template)


@pytest.fixture
def front_ends(pg_db: PostgresStore) -> Iterator[tuple[list[str], list[Any]]]:
    """Four front-end processes (loopback) on one PostgreSQL database."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_front_end, args=(pg_db.dsn, q), daemon=True) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        urls = [f"http://127.0.0.1:{q.get(timeout=30)}/PLCAPI/" for _ in procs]
        yield urls, procs
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=10)


def _burst(urls: list[str], calls: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
    """Run the calls all at once, round robin over the front ends; results or Faults."""
    out: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def one(i: int) -> None:
        api = xmlrpc.client.ServerProxy(urls[i % len(urls)], allow_none=True)
        name, args = calls[i]
        start.wait()
        try:
            out[i] = getattr(api, name)(*args)
        except xmlrpc.client.Fault as f:
            out[i] = f
        except Exception as e:  # a dropped connection (killed front end)
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_fifty_concurrent_addslice_on_four_front_ends_respect_max_slices(
        front_ends: tuple[list[str], list[Any]]) -> None:
    urls, _ = front_ends
    api = xmlrpc.client.ServerProxy(urls[0], allow_none=True)
    api.AddSite(ADMIN, {"name": "Race", "abbreviated_name": "R", "login_base": "race",
                        "max_slices": 10})
    results = _burst(urls, [("AddSlice", (ADMIN, {"name": f"race_s{i}"})) for i in range(50)])
    ok = [r for r in results if isinstance(r, int)]
    faults = [r for r in results if isinstance(r, xmlrpc.client.Fault)]
    assert len(ok) == 10 and len(faults) == 40, results
    assert all(f.faultCode == 102 and "maximum allowable slice count" in f.faultString
               for f in faults), faults
    assert len(api.GetSlices(ADMIN, {"name": "race_*"})) == 10


def test_randomized_races_keep_every_invariant(
        front_ends: tuple[list[str], list[Any]]) -> None:
    """Many rounds of concurrent AddSlice (random site limits, duplicate names) and
    AddNode (duplicate hostnames) over the four front ends."""
    urls, _ = front_ends
    api = xmlrpc.client.ServerProxy(urls[0], allow_none=True)
    rng = random.Random(os.getpid())
    site = api.AddSite(ADMIN, {"name": "Rnd", "abbreviated_name": "R", "login_base": "rnd",
                               "max_slices": 0})
    rounds = int(os.environ.get("PLC_RACE_ROUNDS", "12"))
    calls_made = 0
    for rnd in range(rounds):
        limit = len(api.GetSlices(ADMIN, {"site_id": site}, ["slice_id"])) + rng.randint(0, 4)
        api.UpdateSite(ADMIN, site, {"max_slices": limit})
        names = [f"rnd_r{rnd}x{rng.randint(0, 5)}" for _ in range(rng.randint(4, 16))]
        results = _burst(urls, [("AddSlice", (ADMIN, {"name": n})) for n in names])
        calls_made += len(names)
        assert not [r for r in results if isinstance(r, Exception) and
                    not isinstance(r, xmlrpc.client.Fault)], results
        assert all(r.faultCode == 102 for r in results if isinstance(r, xmlrpc.client.Fault))
        live = api.GetSlices(ADMIN, {"site_id": site}, ["name"])
        assert len(live) <= limit
        assert len({s["name"] for s in live}) == len(live), live  # names unique
        ok = {n for n, r in zip(names, results, strict=True) if isinstance(r, int)}
        assert ok == {s["name"] for s in live if s["name"].startswith(f"rnd_r{rnd}x")}
        # unique node hostnames: concurrent AddNode of a few names
        hosts = [f"h{rnd}x{rng.randint(0, 3)}.rnd.example.org" for _ in range(rng.randint(4, 10))]
        results = _burst(urls, [("AddNode", (ADMIN, site, {"hostname": h})) for h in hosts])
        calls_made += len(hosts)
        made = {h for h, r in zip(hosts, results, strict=True) if isinstance(r, int)}
        assert made == set(hosts), results  # each name once...
        assert sum(isinstance(r, int) for r in results) == len(made)  # ...and only once
        assert len(api.GetNodes(ADMIN, {"hostname": f"h{rnd}x*"}, ["node_id"])) == len(made)
    assert calls_made > 0


def test_killing_a_front_end_mid_call_leaves_no_partial_write(
        front_ends: tuple[list[str], list[Any]]) -> None:
    urls, procs = front_ends
    api = xmlrpc.client.ServerProxy(urls[1], allow_none=True)
    api.AddSite(ADMIN, {"name": "Kill", "abbreviated_name": "K", "login_base": "kill",
                        "max_slices": 100})
    victim = procs[0]
    timer = threading.Timer(0.15, os.kill, (victim.pid, signal.SIGKILL))
    timer.start()
    # every call goes to the victim; each writes a slice and its hrn tag in one call
    _burst([urls[0]], [("AddSlice", (ADMIN, {"name": f"kill_s{i}", "description": "d" * 50,
                                             "url": "http://x/"})) for i in range(40)])
    timer.join()
    victim.join(timeout=10)
    for s in api.GetSlices(ADMIN, {"name": "kill_*"}, ["slice_id", "slice_tag_ids"]):
        tags = api.GetSliceTags(ADMIN, {"slice_id": s["slice_id"], "tagname": "hrn"})
        assert len(tags) == 1, s  # a slice never lacks the tag written in its call


def test_database_newer_than_the_code_is_refused(plc_store: Store,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    conn = plc_store.connect()
    try:
        conn.begin(write=True)
        conn.insert("schema_version", {"version": mig.latest() + 1, "name": "future",
                                       "applied": 0})
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(mig.SchemaError, match="newer than this PLC code"):
        plc_store.ensure_indexes()
    with pytest.raises(mig.SchemaError, match="newer than this PLC code"):
        mig.migrate(plc_store)
    url = plc_store.dsn if plc_store.dialect == "postgres" else plc_store.path  # type: ignore[attr-defined]
    assert cli.main(["serve", "--db", url, "--listen", "127.0.0.1:0"]) == 1
    assert "newer than this PLC code" in capsys.readouterr().err


def test_plc_migrate_applies_missing_migrations_once(
        plc_store: Store, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    two = mig.Migration(2, "test column", "ALTER TABLE sites ADD COLUMN motto TEXT;",
                        "ALTER TABLE sites ADD COLUMN motto TEXT;")
    monkeypatch.setattr(mig, "MIGRATIONS", [*mig.MIGRATIONS, two])
    with pytest.raises(mig.SchemaError, match="older than this PLC code.*plc migrate"):
        plc_store.ensure_indexes()
    url = plc_store.dsn if plc_store.dialect == "postgres" else plc_store.path  # type: ignore[attr-defined]
    assert cli.main(["migrate", "--db", url]) == 0
    assert "applied migrations [2]" in capsys.readouterr().out
    assert cli.main(["migrate", "--db", url]) == 0
    assert "already at schema version 2" in capsys.readouterr().out
    plc_store.ensure_indexes()
    conn = plc_store.connect()
    try:
        assert conn.rows("SELECT version FROM schema_version ORDER BY version") == [(1,), (2,)]
        assert conn.query("SELECT motto FROM sites")[0]["motto"] is None
    finally:
        conn.close()


def test_workers_beyond_the_connection_limit_fail_with_a_message(
        pg_db: PostgresStore, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["serve", "--db", pg_db.dsn, "--listen", "127.0.0.1:0",
                     "--workers", "50"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--workers 50" in err and "database connections" in err and "max_connections" in err


def _answers(store: Store) -> dict[str, Any]:
    """Every Get* method callable with only an auth struct, as the admin."""
    server, thread = start_server(store)
    try:
        host, port = server.server_address[:2]
        api = xmlrpc.client.ServerProxy(f"http://{host}:{port}/PLCAPI/", allow_none=True)
        out: dict[str, Any] = {}
        for name, m in sorted(METHODS.items()):
            if not name.startswith("Get") or m.min_args != 1 or name in ("GetSession",):
                continue
            try:
                out[name] = getattr(api, name)(ADMIN)
            except xmlrpc.client.Fault as f:
                out[name] = ("fault", f.faultCode, f.faultString)
        return out
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("world", ["sqlite"], indirect=True)   # the trip starts there
def test_export_import_sqlite_to_postgres_and_back_loses_nothing(
        world: tuple[Any, Any], pg_server: pgserver.PGServer, tmp_path: Path) -> None:
    plc, _ = world
    before = _answers(plc.store)
    assert before["GetSlices"] and before["GetNodes"] and before["GetPersons"]
    dump = io.StringIO()
    export(plc.store, dump)
    name = f"imp{os.getpid()}"
    pg = PostgresStore(pg_server.create_db(name))
    try:
        import_(pg, io.StringIO(dump.getvalue()))
        assert _answers(pg) == before
        dump2 = io.StringIO()
        export(pg, dump2)
    finally:
        pg.close()
        pg_server.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    back = SQLiteStore(tmp_path / "back.db")
    import_(back, io.StringIO(dump2.getvalue()))
    assert _answers(back) == before
    # ids continue after the highest ever handed out, in both stores
    conn = back.connect()
    try:
        assert conn.scalar("SELECT seq FROM sqlite_sequence WHERE name = 'slices'") >= \
            max(s["slice_id"] for s in before["GetSlices"])
    finally:
        conn.close()


def test_getslivers_polls_never_abort_a_serialisable_transaction(pg_db: PostgresStore) -> None:
    """GetSlivers' one write (last_contact) depends on nothing it reads, so it runs READ
    COMMITTED: a node polling cannot make another front end's serialisable transaction
    fail, nor be run again itself. The interleaving below is a read/write cycle
    (the other transaction reads the node and writes the slice GetSlivers reads):
    with both serialisable, PostgreSQL aborts one of them."""
    now = int(__import__("time").time())
    setup = pg_db.connect_direct()
    try:
        setup.begin(write=True)
        site = setup.insert("sites", {"login_base": "gs", "name": "GS", "abbreviated_name": "GS",
                                      "max_slices": 10, "date_created": now,
                                      "last_updated": now})
        node = setup.insert("nodes", {"hostname": "gs1.example.org", "site_id": site,
                                      "boot_state": "boot", "date_created": now,
                                      "last_updated": now})
        setup.insert("sessions", {"session_id": "gs-session", "expires": None})
        setup.insert("node_session", {"node_id": node, "session_id": "gs-session"})
        sl = setup.insert("slices", {"site_id": site, "name": "gs_one", "created": now,
                                     "expires": now + 86400})
        setup.insert("slice_node", {"slice_id": sl, "node_id": node})
        setup.commit()
    finally:
        setup.close()
    api = API(pg_db, store_config(pg_db))
    other = pg_db.connect_direct()
    poller = pg_db.connect_direct()
    try:
        other.begin(write=True)
        other.query("SELECT last_contact FROM nodes WHERE node_id = ?", [node])
        other.execute("UPDATE slices SET description = 'changed' WHERE slice_id = ?", [sl])
        result = api.run(poller, "GetSlivers", [{"AuthMethod": "session",
                                                 "session": "gs-session"}])
        assert [s["name"] for s in result["slivers"]] == ["gs_one"]
        other.commit()  # serialisable GetSlivers: "could not serialize access"
        assert api.retries == 0
        assert poller.scalar("SELECT last_contact FROM nodes WHERE node_id = ?", [node]) >= now
        assert poller.scalar("SELECT description FROM slices WHERE slice_id = ?",
                             [sl]) == "changed"
    finally:
        other.close()
        poller.close()
