"""Store read paths: the indexes of indexes.sql (new and older databases), and
Connection.rows()."""

from __future__ import annotations

import pytest

from plc.store import DBError, SQLiteStore, Store

INDEXES = {"slice_node_node_slice", "conf_file_node_node", "pcu_node_node", "nodegroups_tag",
           "slices_instantiation"}


def indexes(store: Store) -> set[str]:
    db = store.connect()
    try:
        if store.dialect == "postgres":
            return {r[0] for r in db.rows("SELECT indexname FROM pg_indexes")}
        return {r[0] for r in db.rows("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        db.close()


def test_new_database_has_the_indexes(plc_store: Store) -> None:
    assert INDEXES <= indexes(plc_store)


def test_older_database_gets_them_and_again_is_harmless(plc_store: Store) -> None:
    # a database made before migrations were numbered (no schema_version) and before
    # these indexes: serving it stamps it version 1 and adds them
    db = plc_store.connect()
    try:
        db.begin(write=True)
        for name in INDEXES:
            db.execute(f"DROP INDEX {name}")
        db.execute("DROP TABLE schema_version")
        db.commit()
    finally:
        db.close()
    assert not INDEXES & indexes(plc_store)
    plc_store.ensure_indexes()
    plc_store.ensure_indexes()
    assert INDEXES <= indexes(plc_store)


def test_rows_are_tuples_in_select_order(plc_store: SQLiteStore) -> None:
    conn = plc_store.connect()
    try:
        rows = conn.rows("SELECT name, role_id FROM roles WHERE role_id IN (10, 20) "
                         "ORDER BY role_id")
        assert rows == [("admin", 10), ("pi", 20)]
        assert conn.query("SELECT name, role_id FROM roles WHERE role_id = 10") == [
            {"name": "admin", "role_id": 10}]
        with pytest.raises(DBError):
            conn.rows("SELECT no_such_column FROM roles")
    finally:
        conn.close()
