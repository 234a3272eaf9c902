"""GetSlivers exactly as spec 7: which slices, merged attributes, keys, accounts,
leases, conf files, timestamps."""

from __future__ import annotations

import time
import xmlrpc.client
from typing import Any

import pytest

from tests.plc.world import ssh_key

DAY = 86400


def sql(plc: Any, statement: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    conn = plc.store.connect()
    try:
        if statement.lstrip().upper().startswith("SELECT"):
            return conn.query(statement, params or [])
        conn.execute(statement, params or [])
        return []
    finally:
        conn.close()


def test_getslivers_structure_and_precedence(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    a = w.A
    now = int(time.time())
    # tags at three scopes on tu_one (node n1 is in nodegroup "alphas")
    api.AddSliceTag(a.admin, w.slice, "vsys", "one")
    api.AddSliceTag(a.admin, w.slice, "vsys", "two")
    api.AddSliceTag(a.admin, w.slice, "cpu_share", "5")
    api.AddSliceTag(a.admin, w.slice, "cpu_share", "7", None, "alphas")
    api.AddSliceTag(a.admin, w.slice, "disk_max", "10", None, "alphas")
    api.AddSliceTag(a.admin, w.slice, "disk_max", "20", w.node)
    # a system slice and an nm-controller slice reach every node
    sys_id = api.AddSlice(a.admin, {"name": "pl_sys"})
    api.AddSliceTag(a.admin, sys_id, "system", "1")
    ctl = api.AddSlice(a.admin, {"name": "pl_ctl", "instantiation": "nm-controller"})
    # an expired slice on the node is not a sliver
    gone = api.AddSlice(a.admin, {"name": "tu_gone"})
    api.AddSliceToNodes(a.admin, gone, [w.node])
    sql(plc, "UPDATE slices SET expires = ? WHERE slice_id = ?", [now - 10, gone])
    # a slice expiring beyond 2038 is clamped
    sql(plc, "UPDATE slices SET expires = ? WHERE slice_id = ?", [2**33, w.slice])
    # root access for the PI, not the tech
    api.AddPersonKey(a.admin, w.tech, {"key_type": "ssh", "key": ssh_key("tech")})
    api.AddTagType(a.admin, {"tagname": "isrootonsite"})
    api.AddPersonTag(a.admin, w.pi, "isrootonsite", "true")
    api.AddPersonKey(a.admin, 2, {"key_type": "ssh", "key": ssh_key("admin")})

    r = api.GetSlivers(a.node)
    assert set(r) == {"timestamp", "node_id", "hostname", "interfaces", "groups", "conf_files",
                      "initscripts", "slivers", "accounts", "xmpp", "hrn",
                      "reservation_policy", "leases", "lease_granularity"}
    assert abs(r["timestamp"] - now) < 60 and r["node_id"] == w.node
    assert r["hostname"] == "n1.tu.example.org"
    assert [i["interface_id"] for i in r["interfaces"]] == [w.interface]
    assert "ifname" not in r["interfaces"][0] and r["interfaces"][0]["dns1"] == "10.1.0.2"
    assert r["groups"] == ["alphas"]
    assert r["hrn"] == "plc.tu.n1\\.tu\\.example\\.org"
    assert r["reservation_policy"] == "none" and r["leases"] is None
    assert r["lease_granularity"] == 3600 and r["xmpp"] == {"server": None}
    slivers = {s["name"]: s for s in r["slivers"]}
    assert sorted(slivers) == ["pl_ctl", "pl_sys", "tu_one"]
    one = slivers["tu_one"]
    assert one["expires"] == 2**31 - 1 and one["instantiation"] == "plc-instantiated"
    assert one["keys"] == [{"key_type": "ssh", "key": ssh_key("user")}]
    assert one["GetSliceFamily"] == "bookworm-bookworm-x86_64"
    # sliver tag first, then the first nodegroup tag per name, then slice-wide ones
    assert one["attributes"] == [
        {"tagname": "disk_max", "value": "20"},
        {"tagname": "cpu_share", "value": "7"},
        {"tagname": "hrn", "value": "plc.tu.one"},
        {"tagname": "vref", "value": "bookworm"},
        {"tagname": "vsys", "value": "one"},
        {"tagname": "vsys", "value": "two"},
    ]
    assert slivers["pl_ctl"]["instantiation"] == "nm-controller"
    assert slivers["pl_sys"]["attributes"] == [{"tagname": "hrn", "value": "plc.pl.sys"},
                                               {"tagname": "system", "value": "1"}]
    accounts = {acc["name"]: acc["keys"] for acc in r["accounts"]}
    assert accounts["site_admin"] == [ssh_key("pi"), ssh_key("tech")]
    assert accounts["root"] == [ssh_key("admin"), ssh_key("pi")]
    # the call recorded the node's contact
    assert abs(sql(plc, "SELECT last_contact FROM nodes WHERE node_id = ?",
                   [w.node])[0]["last_contact"] - now) < 60
    # another node gets the system and controller slices only; disabled members' keys go
    other = api.GetSlivers(a.admin, "n2.ot.example.org")
    assert sorted(s["name"] for s in other["slivers"]) == ["pl_ctl", "pl_sys"]
    assert ctl in [s["slice_id"] for s in other["slivers"]]
    api.UpdatePerson(a.admin, w.user, {"enabled": False})
    assert {s["name"]: s["keys"] for s in api.GetSlivers(a.node)["slivers"]}["tu_one"] == []


def test_getslivers_leases_conf_files_initscripts(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    a = w.A
    now = int(time.time())
    api.AddSliceToNodes(a.admin, w.slice, [w.rnode])
    soon = api.AddLeases(a.admin, w.rnode, w.slice, now + 3600, now + 3 * 3600)["new_ids"]
    api.AddLeases(a.admin, w.rnode, w.slice, now + 3 * DAY, now + 3 * DAY + 3600)
    sql(plc, "INSERT INTO conf_files (source, dest) VALUES ('g', '/etc/a')")
    sql(plc, "INSERT INTO conf_files (source, dest) VALUES ('g', '/etc/b')")
    sql(plc, "INSERT INTO conf_files (source, dest) VALUES ('n', '/etc/b')")
    sql(plc, "INSERT INTO conf_files (source, dest, enabled) VALUES ('off', '/etc/c', 0)")
    sql(plc, "INSERT INTO conf_file_node (conf_file_id, node_id) VALUES (3, ?)", [w.rnode])
    sql(plc, "INSERT INTO initscripts (name, script, enabled) VALUES ('on', '#!/bin/sh', 1)")
    sql(plc, "INSERT INTO initscripts (name, script, enabled) VALUES ('off', '#!/bin/sh', 0)")
    r = api.GetSlivers(a.admin, w.rnode)
    assert r["reservation_policy"] == "lease_or_idle"
    lease = api.GetLeases(a.admin, soon, ["t_from", "t_until"])[0]
    assert r["leases"] == [{"slice_id": w.slice, "name": "tu_one", **lease}]
    assert sorted((f["dest"], f["source"]) for f in r["conf_files"]) == [
        ("/etc/a", "g"), ("/etc/b", "n")]
    assert r["conf_files"][0]["file_permissions"] == "0644"
    assert [i["name"] for i in r["initscripts"]] == ["on"]


def test_getslivers_faults(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    with pytest.raises(xmlrpc.client.Fault) as e:
        api.GetSlivers(w.A.admin)
    assert e.value.faultCode == 102 and "'node_id_or_hostname' not specified" in \
        e.value.faultString
    with pytest.raises(xmlrpc.client.Fault) as e:
        api.GetSlivers(w.A.pi, w.node)
    assert e.value.faultCode == 103
