"""The plcsh-style stress run (tests/plc/stress.py) at its small default size, with
every object checked after each phase; bench/plc_stress.py runs the large size."""

from __future__ import annotations

from typing import Any

from tests.plc.stress import DEFAULT, Sizes, Stress


def test_stress_default_size_checks_every_phase(plc: Any) -> None:
    run = Stress(plc.proxy(), plc.admin, DEFAULT, seed=7)
    run.run()
    assert [p for p, _ in run.phases] == ["add", "update", "leave and rejoin nodes", "delete"]
    assert run.calls > 500


def test_sliver_tags_survive_leaving_and_rejoining_a_node(plc: Any) -> None:
    # the step the legacy stress test failed at ("UpdateSliceTag: No such slice tag")
    run = Stress(plc.proxy(), plc.admin, Sizes(sites=1, persons_per_site=1, nodes_per_site=2,
                                                slices_per_site=1, tags_per_slice=1,
                                                nodes_per_slice=2), seed=3)
    run.add()
    api, admin = plc.proxy(), plc.admin
    (sid,) = run.x.slices
    sliver = {tid: t for tid, t in run.x.slice_tags.items() if t["node_id"] is not None}
    assert len(sliver) == 2
    nodes = sorted(run.x.slices[sid]["node_ids"])
    api.DeleteSliceFromNodes(admin, sid, nodes[:1])
    api.UpdateSlice(admin, sid, {"nodes": []})
    assert api.GetSlices(admin, [sid], ["node_ids"])[0]["node_ids"] == []
    left = api.GetSliceTags(admin, sorted(sliver), ["slice_tag_id", "node_id", "value"])
    assert {t["slice_tag_id"]: t["node_id"] for t in left} == \
        {tid: t["node_id"] for tid, t in sliver.items()}
    for tid in sliver:
        assert api.UpdateSliceTag(admin, tid, "kept") == 1
    api.AddSliceToNodes(admin, sid, nodes)
    assert {t["value"] for t in api.GetSliceTags(admin, sorted(sliver), ["value"])} == {"kept"}
