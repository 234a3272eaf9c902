"""SQLite state: records survive reopening, uid ranges are stable and reused."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from agent.state import (
    HAS_SLIVER,
    WHEN_GONE,
    WHEN_LIVE,
    SliverRecord,
    SliverState,
    State,
    StateError,
)


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


def test_sliver_states_are_one_enum_stored_as_before(tmp_path: Path) -> None:
    """The states stored as plain strings (databases from before SliverState) load as
    the enum; a value outside it is never written, and one found is named."""
    with State.open(tmp_path) as st:
        for name, state in (("a", "destroying"), ("b", "controller"), ("c", "failed")):
            st.put_sliver(record(name))
            st._db.execute("UPDATE slivers SET state=? WHERE name=?", (state, name))
        assert {n: s.state for n, s in st.summaries().items()} == {
            "a": SliverState.DESTROYING, "b": SliverState.CONTROLLER, "c": SliverState.FAILED}
        assert st.get_sliver("a").state is SliverState.DESTROYING   # type: ignore[union-attr]
        st.set_sliver_state("c", SliverState.RUNNING)
        raw = st._db.execute("SELECT state FROM slivers WHERE name='c'").fetchone()[0]
        assert raw == "running" and type(raw) is str
        with pytest.raises(ValueError):
            st.set_sliver_state("c", "runing")
        with pytest.raises(ValueError):
            st.put_sliver(dataclasses.replace(record("d"), state="new"))   # type: ignore[arg-type]
        assert st.get_sliver("d") is None
        st._db.execute("UPDATE slivers SET state='zombie' WHERE name='c'")
        with pytest.raises(StateError, match="sliver c: unknown state 'zombie'"):
            st.slivers()


def test_the_machine_has_a_step_for_every_state() -> None:
    """Every state has a step whether its context is live or not, for either wish:
    a state added without its transitions fails here, not in a reconcile."""
    assert set(WHEN_GONE) == set(SliverState)
    assert set(WHEN_LIVE) == {(s, w) for s in SliverState for w in (True, False)}
    assert HAS_SLIVER == set(SliverState) - {SliverState.DESTROYING, SliverState.CONTROLLER}
