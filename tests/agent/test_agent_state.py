"""SQLite state: records survive reopening, uid ranges are stable and reused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.state import SliverRecord, State, StateError


def record(name: str) -> SliverRecord:
    return SliverRecord(name=name, slice_id=1, instantiation="plc-instantiated", expires=10,
                        image="base", spec={"name": name}, rspec={"cpu_share": 1},
                        problems=[], state="creating", message="", want_running=True,
                        applied="", created_at=1.0, updated_at=1.0)


def test_slivers_persist(tmp_path: Path) -> None:
    with State.open(tmp_path) as st:
        st.put_sliver(record("a"))
        st.set_sliver_state("a", "running", "ok", applied="x")
    assert (tmp_path / "agent.db").stat().st_mode & 0o777 == 0o600
    with State.open(tmp_path) as st:
        rec = st.get_sliver("a")
        assert rec is not None and rec.state == "running" and rec.applied == "x"
        assert rec.spec == {"name": "a"}
        assert list(st.slivers()) == ["a"]
        st.delete_sliver("a")
        assert st.get_sliver("a") is None


def test_uid_ranges(tmp_path: Path) -> None:
    with State.open(tmp_path) as st:
        assert st.allocate_uid_range("a", 3) == 0
        assert st.allocate_uid_range("b", 3) == 1
        assert st.allocate_uid_range("a", 3) == 0
        assert st.allocate_uid_range("c", 3) == 2
        with pytest.raises(StateError, match="exhausted.*'d'"):
            st.allocate_uid_range("d", 3)
        st.release_uid_range("b")
        assert st.allocate_uid_range("d", 3) == 1
        st.release_uid_range("a")
        assert st.allocate_uid_range("e", 3) == 0
        assert st.uid_ranges() == {"e": 0, "d": 1, "c": 2}


def test_last_reply(tmp_path: Path) -> None:
    with State.open(tmp_path) as st:
        assert st.last_reply() is None
        st.save_reply({"timestamp": 5, "slivers": {}})
    with State.open(tmp_path) as st:
        assert st.last_reply() == {"timestamp": 5, "slivers": {}}


def test_schema_version_mismatch_refused(tmp_path: Path) -> None:
    State.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / "agent.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="schema version 99"):
        State.open(tmp_path)


def test_transaction_rolls_back(tmp_path: Path) -> None:
    with State.open(tmp_path) as st:
        with pytest.raises(RuntimeError):
            with st.transaction():
                st.put_sliver(record("z"))
                raise RuntimeError("boom")
        assert st.get_sliver("z") is None
