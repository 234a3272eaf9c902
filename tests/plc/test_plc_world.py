def test_world_builds(world):
    plc, w = world
    api = plc.proxy()
    assert api.GetSlices(w.A.user, [w.slice], ["name", "node_ids", "person_ids"]) == [
        {"name": "tu_one", "node_ids": [w.node], "person_ids": [w.user]}]
    assert api.AuthCheck(w.A.node) == 1
