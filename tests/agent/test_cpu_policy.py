"""agent/cpu.py: reservations as weights, admission, whole cores, freezable (pure)."""

from __future__ import annotations

import pytest

from agent.cpu import CpuRequest, allocate, cpulist, parse_cores, parse_cpulist


def share_of(grants: dict, name: str, busy: list[str]) -> float:
    return grants[name].weight / sum(grants[n].weight for n in busy)


def test_reservation_weight_against_best_effort() -> None:
    req = {f"be{i}": CpuRequest() for i in range(4)}
    req["res"] = CpuRequest(reserve_pct=30)
    g = allocate(req, [0, 1], headroom_pct=10)
    got = share_of(g, "res", list(req))
    assert 0.30 <= got <= 0.33            # 30 % plus the slack points
    assert g["res"].reserve_pct == 30 and not g["res"].refused
    # Idle best-effort slivers only raise it (work-conserving).
    assert share_of(g, "res", ["res", "be0"]) > 0.30
    # Two reservations and shares 1:3 among the rest.
    req2 = {"a": CpuRequest(share=1), "b": CpuRequest(share=3),
            "r1": CpuRequest(reserve_pct=20), "r2": CpuRequest(reserve_pct=40)}
    g2 = allocate(req2, [0, 1], 10)
    assert share_of(g2, "r1", list(req2)) >= 0.20 and share_of(g2, "r2", list(req2)) >= 0.40
    assert g2["b"].weight == 3 * g2["a"].weight


def test_admission_refuses_beyond_headroom_and_keeps_earlier() -> None:
    req = {"a": CpuRequest(reserve_pct=50), "b": CpuRequest(reserve_pct=45)}
    g = allocate(req, [0, 1], headroom_pct=10)
    assert g["a"].reserve_pct == 50 and g["b"].reserve_pct == 0
    assert "cpu_pct 45 refused" in g["b"].refused[0] and "50%" in g["b"].refused[0]
    assert "may hold 90%" in g["b"].refused[0]
    # "b" was admitted first: a newcomer "a" (earlier in name order) does not evict it.
    g = allocate(req, [0, 1], 10, previous={"b": allocate({"b": req["b"]}, [0, 1], 10)["b"]})
    assert g["b"].reserve_pct == 45 and g["a"].reserve_pct == 0 and g["a"].refused


def test_weights_stay_in_range_with_many_slivers() -> None:
    req = {f"be{i:03}": CpuRequest() for i in range(300)}
    req["res"] = CpuRequest(reserve_pct=50)
    g = allocate(req, [0, 1], 10)
    assert all(1 <= x.weight <= 10_000 for x in g.values())
    assert share_of(g, "res", list(req)) >= 0.50


def test_cores_exclusive_and_best_effort_pool() -> None:
    req = {"x": CpuRequest(cores=1, cores_pool=False), "y": CpuRequest(cores=1),
           "be": CpuRequest()}
    g = allocate(req, [0, 1, 2, 3], 10)
    assert g["x"].partition and g["x"].cpus == cpulist(g["x"].cores)
    assert not g["y"].partition and len(g["y"].cores) == 1
    pool = set(parse_cpulist(g["be"].cpus or ""))
    assert pool == {0, 1, 2, 3} - set(g["x"].cores) - set(g["y"].cores)
    assert set(parse_cpulist(g["y"].cpus or "")) == pool | set(g["y"].cores)
    # The host keeps a core: 3 of 4 at most.
    g = allocate({"big": CpuRequest(cores=4)}, [0, 1, 2, 3], 10)
    assert g["big"].cores == () and "3 of the node's 4" in g["big"].refused[0]
    assert g["big"].cpus is None
    # A holder keeps its cores when another comes.
    first = allocate({"m": CpuRequest(cores=1, cores_pool=False)}, [0, 1, 2], 10)
    again = allocate({"a": CpuRequest(cores=1, cores_pool=False),
                      "m": CpuRequest(cores=1, cores_pool=False)}, [0, 1, 2], 10, first)
    assert again["m"].cores == first["m"].cores and again["a"].cores != first["m"].cores


def test_freezable_only_without_cores() -> None:
    g = allocate({"f": CpuRequest(freezable=True), "c": CpuRequest(freezable=True, cores=1)},
                 [0, 1, 2], 10)
    assert g["f"].freeze and not g["c"].freeze


def test_parse() -> None:
    assert parse_cores("2b") == (2, True) and parse_cores("1") == (1, False)
    with pytest.raises(ValueError):
        parse_cores("x")
    assert cpulist([5, 0, 1, 2]) == "0-2,5" and parse_cpulist("0-2,5") == [0, 1, 2, 5]


def test_new_cores_never_evict_an_admitted_reservation() -> None:
    cpus = [0, 1, 2, 3]
    first = allocate({"r": CpuRequest(reserve_pct=60)}, cpus, 10)
    req = {"r": CpuRequest(reserve_pct=60), "k": CpuRequest(cores=2, cores_pool=False)}
    g = allocate(req, cpus, 10, first)
    # 2 of 4 cores taken would leave 60 % of the node on 2 CPUs: 120 % of them.
    assert g["r"].reserve_pct == 60 and g["k"].cores == ()
    assert "would no longer hold the reservations" in g["k"].refused[0]
    g = allocate({**req, "k": CpuRequest(cores=1, cores_pool=False)}, cpus, 10, first)
    assert g["r"].reserve_pct == 60 and len(g["k"].cores) == 1   # 80 % of 3 CPUs fits


def test_request_from_limits() -> None:
    r = CpuRequest.from_limits({"cpu_share": 3, "cpu_cap": 20, "cpu_reserve_pct": 30,
                                "cpu_cores": "1b", "cpu_freezable": 1})
    assert r == CpuRequest(share=3, reserve_pct=30, cap_pct=20, cores=1, cores_pool=True,
                           freezable=True)
    # The sliver CLI's records name the cap cpu_pct: a rebalance must keep it.
    assert CpuRequest.from_limits({"cpu_share": 1, "cpu_pct": 25}).cap_pct == 25
