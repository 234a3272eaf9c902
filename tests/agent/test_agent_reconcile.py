"""Reconcile: plans from records, idempotence, failure isolation, no destroy on bad polls."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from agent_fakes import FakeBackend, reply, sliver

from agent import getslivers
from agent.reconcile import Reconciler, ingest, plan
from agent.state import SliverRecord, SliverState, State, Summary


@pytest.fixture
def state(tmp_path: Path):
    st = State.open(tmp_path)
    try:
        yield st
    finally:
        st.close()


def get(state: State, name: str) -> SliverRecord:
    rec = state.get_sliver(name)
    assert rec is not None, name
    return rec


def make(state: State, backend: FakeBackend) -> Reconciler:
    return Reconciler(state, backend, concurrency=4, uid_pool_start=1_000_000,
                      uid_range_size=65536, uid_pool_ranges=100)


async def apply(state: State, rec: Reconciler, r: dict, now: float | None = None):
    desired = getslivers.parse(r)
    removed = ingest(state, desired, "base", "pl", time.time())
    return await rec.reconcile(removed, have_reply=True, now=now)


async def test_create_then_idempotent(state: State) -> None:
    be = FakeBackend()
    rec = make(state, be)
    out = await apply(state, rec, reply([sliver("pl_a"), sliver("pl_b", cpu_share="5")]))
    assert sorted(a.name for a in out.done) == ["pl_a", "pl_b"] and not out.failed
    assert set(be.contexts) == {"pl_a", "pl_b"}
    assert be.contexts["pl_b"]["plan"].limits["cpu_share"] == 5
    assert get(state, "pl_a").state == "running"
    bases = {be.contexts[n]["plan"].uid_base for n in be.contexts}
    assert len(bases) == 2 and min(bases) == 1_000_000
    be.calls.clear()
    out = await apply(state, rec, reply([sliver("pl_a"), sliver("pl_b", cpu_share="5")]))
    assert out.done == [] and be.calls == []


async def test_tag_change_updates_in_place(state: State) -> None:
    be = FakeBackend()
    rec = make(state, be)
    await apply(state, rec, reply([sliver("pl_a", cpu_share="2")]))
    be.calls.clear()
    await apply(state, rec, reply([sliver("pl_a", cpu_share="9")]))
    assert be.calls == [("update", "pl_a")]
    assert be.contexts["pl_a"]["plan"].limits["cpu_share"] == 9


async def test_default_slice_overrides(state: State) -> None:
    be = FakeBackend()
    rec = make(state, be)
    await apply(state, rec, reply([sliver("pl_default", cpu_share="7", disk_max="100"),
                                   sliver("pl_a"), sliver("pl_b", cpu_share="3")]))
    assert "pl_default" not in be.contexts
    assert be.contexts["pl_a"]["plan"].limits["cpu_share"] == 7
    assert be.contexts["pl_a"]["plan"].disk_max_kib == 100
    assert be.contexts["pl_b"]["plan"].limits["cpu_share"] == 3


async def test_removed_and_expired_destroyed(state: State) -> None:
    be = FakeBackend()
    rec = make(state, be)
    await apply(state, rec, reply([sliver("pl_a"), sliver("pl_b"), sliver("pl_c")]))
    expired = sliver("pl_c")
    expired["expires"] = int(time.time()) - 10
    await apply(state, rec, reply([sliver("pl_a"), expired]))
    assert set(be.contexts) == {"pl_a"}
    assert set(state.slivers()) == {"pl_a"} and set(state.uid_ranges()) == {"pl_a"}


async def test_one_failure_does_not_stop_others(state: State) -> None:
    be = FakeBackend(fail={"pl_bad"})
    rec = make(state, be)
    out = await apply(state, rec, reply([sliver("pl_a"), sliver("pl_bad"), sliver("pl_c")]))
    assert set(be.contexts) == {"pl_a", "pl_c"}
    assert [a.name for a, _ in out.failed] == ["pl_bad"]
    bad = get(state, "pl_bad")
    assert bad.state == "failed" and "simulated failure" in bad.message
    be.fail.clear()
    await apply(state, rec, reply([sliver("pl_a"), sliver("pl_bad"), sliver("pl_c")]))
    assert "pl_bad" in be.contexts and get(state, "pl_bad").state == "running"


async def test_a_failed_creation_holds_no_uid_range(state: State) -> None:
    # item 9 of issue 9: the failure left a range behind that a later slice collided with
    be = FakeBackend(fail={"pl_bad"})
    rec = make(state, be)
    await apply(state, rec, reply([sliver("pl_bad")]))
    assert get(state, "pl_bad").state == "failed"
    assert state.uid_ranges() == {}
    await apply(state, rec, reply([sliver("pl_good")]))   # pl_bad gone from PLC
    assert set(be.contexts) == {"pl_good"} and state.uid_ranges() == {"pl_good": 0}
    assert be.contexts["pl_good"]["plan"].uid_base == rec.uid_pool_start


async def test_missing_image_stays_pending(state: State) -> None:
    be = FakeBackend()
    rec = make(state, be)
    await apply(state, rec, reply([sliver("pl_a", vref="nosuch"), sliver("pl_b")]))
    a = get(state, "pl_a")
    assert a.state == "pending" and "nosuch" in a.message and "image import" in a.message
    assert set(be.contexts) == {"pl_b"}
    be.images.add("nosuch")
    await apply(state, rec, reply([sliver("pl_a", vref="nosuch"), sliver("pl_b")]))
    assert set(be.contexts) == {"pl_a", "pl_b"}


async def test_a_vref_change_keeps_the_image_and_says_so(state: State) -> None:
    """A made sliver keeps its image (no re-imaging in place), also when failed, so a
    re-creation never loops on a root of another image; status says why."""
    be = FakeBackend(images=("base", "other"))
    rec = make(state, be)
    await apply(state, rec, reply([sliver("pl_a")]))
    await apply(state, rec, reply([sliver("pl_a", vref="other")]))
    a = get(state, "pl_a")
    assert a.image == "base" and a.state == "running"
    assert any("vref asks for image 'other'" in p for p in a.problems), a.problems
    be.fail.add("pl_a")
    del be.contexts["pl_a"]   # its context died; re-creation fails once
    await apply(state, rec, reply([sliver("pl_a", vref="other")]))
    assert get(state, "pl_a").state == "failed" and get(state, "pl_a").image == "base"
    be.fail.clear()
    await apply(state, rec, reply([sliver("pl_a", vref="other")]))
    assert be.contexts["pl_a"]["plan"].image == "base"
    await apply(state, rec, reply([sliver("pl_a")]))
    assert get(state, "pl_a").problems == []


async def test_destroyed_slivers_leave_no_lock(state: State) -> None:
    be = FakeBackend()
    rec = make(state, be)
    await apply(state, rec, reply([sliver(f"pl_{i}") for i in range(20)]))
    await apply(state, rec, reply([sliver("pl_0")]))
    assert set(rec._locks) == {"pl_0"}


async def test_disabled_is_stopped_and_restarted(state: State) -> None:
    be = FakeBackend()
    rec = make(state, be)
    await apply(state, rec, reply([sliver("pl_a")]))
    await apply(state, rec, reply([sliver("pl_a", enabled="0")]))
    assert be.contexts["pl_a"]["frozen"] and get(state, "pl_a").state == "stopped"
    await apply(state, rec, reply([sliver("pl_a")]))
    assert not be.contexts["pl_a"]["frozen"] and get(state, "pl_a").state == "running"


async def test_restart_adopts_without_double_creation(state: State) -> None:
    be = FakeBackend()
    await apply(state, make(state, be), reply([sliver("pl_a"), sliver("pl_b")]))
    be.calls.clear()
    fresh = make(state, be)  # a restarted agent: nothing adopted yet
    await fresh.reconcile([], have_reply=False)
    assert sorted(be.calls) == [("adopt", "pl_a"), ("adopt", "pl_b")]
    # A context that died while the agent was down is brought back from state alone.
    del be.contexts["pl_b"]
    be.calls.clear()
    await make(state, be).reconcile([], have_reply=False)
    assert ("create", "pl_b") in be.calls and "pl_b" in be.contexts


def test_plan_without_reply_never_destroys(state: State) -> None:
    from agent_fakes import FakeBackend  # noqa: F401 - symmetry with the async tests

    recs: dict[str, Summary] = {}
    assert plan(recs, live=set(), adopted=set(), removed=[], now=0, have_reply=False) == []


def test_plan_follows_the_state_table() -> None:
    """What plan decides for each state (agent.state WHEN_GONE / WHEN_LIVE), with the
    adopt and rspec steps of a live sliver and expiry over all but a removal."""
    S = SliverState

    def one(state: SliverState, live: bool, want: bool = True, adopted: bool = True,
            applied: str = "t", expires: int = 10, have_reply: bool = True) -> list[tuple[str, str]]:
        recs = {"s": Summary("s", state, expires, want, applied, "t")}
        return [(a.kind, a.reason) for a in plan(
            recs, live={"s"} if live else set(), adopted={"s"} if adopted else set(),
            removed=[], now=5, have_reply=have_reply)]

    assert one(S.PENDING, False) == [("create", "new")]
    assert one(S.FAILED, False) == [("create", "its context is gone (was failed)")]
    assert one(S.RUNNING, True) == []
    assert one(S.STOPPED, True, adopted=False, applied="old") == [
        ("adopt", "running context found"), ("update", "resource spec changed"),
        ("start", "enabled")]
    assert one(S.RUNNING, True, want=False) == [("stop", "disabled (enabled=0)")]
    assert one(S.CREATING, True, want=False) == [("stop", "disabled (enabled=0)")]
    assert one(S.FAILED, True) == [("update", "state failed")]
    assert one(S.FAILED, True, applied="old") == [("update", "resource spec changed")]
    assert one(S.CONTROLLER, True) == [("stop_context", "a controller slice has no sliver")]
    assert one(S.CONTROLLER, False) == []
    assert one(S.DESTROYING, True, expires=0) == [("destroy", "removal pending")]
    assert one(S.DESTROYING, False, have_reply=False) == [("destroy", "removal pending")]
    assert one(S.RUNNING, True, expires=0) == [("destroy", "expired")]
    assert one(S.CONTROLLER, False, expires=0) == [("destroy", "expired")]
    assert one(S.RUNNING, True, expires=0, have_reply=False) == []


async def test_delegated_and_not_instantiated_not_created(state: State) -> None:
    be = FakeBackend()
    rec = make(state, be)
    d = sliver("pl_del")
    d["instantiation"] = "delegated"
    n = sliver("pl_not")
    n["instantiation"] = "not-instantiated"
    c = sliver("pl_ctl")
    c["instantiation"] = "nm-controller"
    await apply(state, rec, reply([d, n, c]))
    # a controller slice gets no sliver, only its record (and a host account)
    assert set(be.contexts) == set()
    assert get(state, "pl_ctl").state == "controller"
    # a sliver that becomes a controller loses its context, not its record
    await apply(state, rec, reply([sliver("pl_x")]))
    assert "pl_x" in be.contexts
    x = sliver("pl_x")
    x["instantiation"] = "nm-controller"
    await apply(state, rec, reply([x]))
    assert "pl_x" not in be.contexts and get(state, "pl_x").state == "controller"
    assert state.uid_range_of("pl_x") is None
    await apply(state, rec, reply([sliver("pl_x")]))   # and back
    assert "pl_x" in be.contexts and get(state, "pl_x").state == "running"


async def test_expired_slivers_are_kept_without_a_reply(state: State) -> None:
    be = FakeBackend()
    rec = make(state, be)
    s = sliver("pl_a")
    s["expires"] = int(time.time()) + 1
    await apply(state, rec, reply([s]))
    await rec.reconcile([], have_reply=False, now=time.time() + 100)
    assert "pl_a" in be.contexts
