"""Black-box conformance: a legacy PlanetLab scenario through xmlrpc.client, written from
the wire contract (../shared/spec/plcapi.md), against a real `plc init` + `plc serve`.

System site, PIs, users and techs with keys, nodes with interfaces, slices with members
and tags at slice, nodegroup and node scope, nodegroups from node tags, leases,
GetSlivers for a node (HMAC and node session auth, spec 2.4 and 7), then deletes. Every
field written is read back, free-text fields with random Unicode of each column's
maximum length (UTF-8 bytes, spec 1.2). Eight concurrent writers lose nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import math
import os
import random
import threading
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    from plc_live import LiveServer, remove_workdir, start_server, utext
except ImportError:  # tests/plc imported as a package
    from .plc_live import LiveServer, remove_workdir, start_server, utext  # type: ignore[no-redef]

PID = os.getpid()
rng = random.Random(PID)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    workdir = tmp_path_factory.mktemp(f"plc-conf-{PID}")
    srv = start_server(workdir)
    try:
        yield srv
    finally:
        srv.stop()
        remove_workdir(workdir)


def fault_code(call: Any, *args: Any) -> int:
    """Call and return the fault code; fail if the call succeeds."""
    try:
        result = call(*args)
    except xmlrpc.client.Fault as fault:
        return int(fault.faultCode)
    pytest.fail(f"expected a fault, got {result!r}")


def ssh_key(comment: str, size: int = 300) -> str:
    blob = b"\x00\x00\x00\x07ssh-rsa" + rng.randbytes(size)
    return f"ssh-rsa {base64.b64encode(blob).decode()} {comment}"


def node_hmac(key: str, *args: Any) -> str:
    """The HMAC of spec 2.4, computed here independently of the server."""

    def flatten(value: Any) -> list[str]:
        if isinstance(value, (list, tuple)):
            return [s for v in value for s in flatten(v)]
        if isinstance(value, dict):
            return [s for v in value.values() for s in flatten(v)]
        return [str(value)]

    msg = "[" + "".join(sorted(flatten(list(args)))) + "]"
    return hmac.new(key.encode(), msg.encode(), hashlib.sha1).hexdigest()


def test_hmac_reference_values() -> None:
    # The worked values of spec 2.4, so the helper above is right before we rely on it.
    k = "0123456789abcdef"
    assert node_hmac(k) == "37710044f29784c98c2fc05253bac2c76a013009"
    assert node_hmac(k, {"boot_state": "boot", "ssh_rsa_key": "abc"}) == \
        "ebeba14926a44579cf2a62d5b10e684a0a50df8f"
    assert node_hmac(k, 42, [1, 2]) == "1821962b1dd6de650a2c6b975f063477b1064409"


def check_fields(obj: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    for key, value in expected.items():
        assert key in obj, f"{what}: field {key!r} missing from {sorted(obj)}"
        got = obj[key]
        if isinstance(value, float):
            assert isinstance(got, float) and math.isclose(got, value), (what, key, got, value)
        else:
            assert got == value, f"{what}.{key}: wrote {value!r}, read back {got!r}"


SITE_FIELDS = {"site_id", "name", "abbreviated_name", "login_base", "is_public", "enabled",
               "latitude", "longitude", "url", "max_slices", "max_slivers", "ext_consortium_id",
               "date_created", "last_updated", "person_ids", "slice_ids", "address_ids",
               "pcu_ids", "node_ids", "site_tag_ids", "peer_id", "peer_site_id"}
PERSON_FIELDS = {"person_id", "first_name", "last_name", "title", "email", "phone", "url", "bio",
                 "enabled", "last_updated", "date_created", "role_ids", "roles", "site_ids",
                 "key_ids", "slice_ids", "person_tag_ids", "peer_id", "peer_person_id"}
NODE_FIELDS = {"node_id", "node_type", "hostname", "site_id", "boot_state", "run_level", "model",
               "version", "ssh_rsa_key", "verified", "date_created", "last_updated",
               "last_contact", "last_boot", "last_download", "last_pcu_reboot",
               "last_pcu_confirmation", "last_time_spent_online", "last_time_spent_offline",
               "interface_ids", "conf_file_ids", "slice_ids", "slice_ids_whitelist", "pcu_ids",
               "ports", "node_tag_ids", "nodegroup_ids", "peer_id", "peer_node_id"}
NODE_SECRET_FIELDS = {"key", "session", "boot_nonce"}
INTERFACE_FIELDS = {"interface_id", "node_id", "is_primary", "type", "method", "ip", "gateway",
                    "network", "broadcast", "netmask", "dns1", "dns2", "mac", "bwlimit",
                    "hostname", "interface_tag_ids", "last_updated"}
SLICE_FIELDS = {"slice_id", "site_id", "name", "instantiation", "url", "description", "max_nodes",
                "creator_person_id", "created", "expires", "node_ids", "person_ids",
                "slice_tag_ids", "peer_id", "peer_slice_id"}
SLICE_TAG_FIELDS = {"slice_tag_id", "slice_id", "name", "node_id", "nodegroup_id", "tag_type_id",
                    "tagname", "description", "category", "value"}
NODEGROUP_FIELDS = {"nodegroup_id", "groupname", "tag_type_id", "value", "tagname",
                    "conf_file_ids", "node_ids"}
LEASE_FIELDS = {"lease_id", "t_from", "t_until", "node_id", "slice_id", "hostname", "node_type",
                "name", "site_id", "duration", "expired"}
KEY_FIELDS = {"key_id", "key_type", "key", "person_id", "peer_id", "peer_key_id"}
SLIVERS_KEYS = {"timestamp", "node_id", "hostname", "interfaces", "groups", "conf_files",
                "initscripts", "slivers", "accounts", "xmpp", "hrn", "reservation_policy",
                "leases", "lease_granularity"}


class Person:
    def __init__(self, api: Any, admin: dict[str, Any], site_id: int, role: str) -> None:
        self.email = f"{role}.{PID}.{rng.randrange(10**6)}@Example.ORG"
        self.password = f"pw-{role}-{rng.randrange(10**9)}"
        self.fields = {
            "first_name": utext(rng, 128), "last_name": utext(rng, 128),
            "title": utext(rng, 128), "phone": utext(rng, 64), "url": utext(rng, 254),
            "bio": utext(rng, 254), "email": self.email, "password": self.password,
        }
        self.person_id = api.AddPerson(admin, self.fields)
        assert isinstance(self.person_id, int)
        api.UpdatePerson(admin, self.person_id, {"enabled": True})
        assert api.AddPersonToSite(admin, self.person_id, site_id) == 1
        assert api.AddRoleToPerson(admin, role, self.person_id) == 1
        self.auth = {"AuthMethod": "password", "Username": self.email.lower(),
                     "AuthString": self.password, "Role": role}  # legacy extra key
        self.key = ssh_key(f"{role}@{PID}")
        self.key_id = api.AddPersonKey(self.auth, self.person_id,
                                       {"key_type": "ssh", "key": self.key})


def test_http_transport(live: LiveServer) -> None:
    """Spec 1.1: GET gives a page; doubled slashes and no trailing slash reach the API."""
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    try:
        conn.request("GET", "/PLCAPI/")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and b"XML-RPC" in body
        for path in ("/PLCAPI/", "//PLCAPI//", "/PLCAPI"):
            payload = xmlrpc.client.dumps(({"AuthMethod": "anonymous"},), "GetLeaseGranularity")
            conn.request("POST", path, payload.encode(), {"Content-Type": "text/xml"})
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200, path
            assert resp.getheader("Content-Type", "").startswith("text/xml")
            (value,), _ = xmlrpc.client.loads(data)
            assert isinstance(value, int) and value > 0
    finally:
        conn.close()


def test_system_methods(live: LiveServer) -> None:
    api = live.proxy()
    names = api.system.listMethods()
    for name in ("system.listMethods", "system.methodHelp", "system.methodSignature",
                 "system.multicall", "AuthCheck", "GetSlivers", "AddSliceTag", "GetNodeArch",
                 "SetSliceVref"):
        assert name in names
    assert "Allowed Roles" in api.system.methodHelp("AddSlice")
    assert ["int", "struct"] in api.system.methodSignature("AuthCheck")
    assert fault_code(api.system.methodHelp, "NoSuchMethod") == 100
    assert fault_code(api.NoSuchMethod, live.admin_auth) == 100
    assert fault_code(api.AuthCheck) == 101
    assert fault_code(api.AuthCheck, {"AuthMethod": "telepathy"}) == 102
    assert fault_code(api.AuthCheck, {"AuthMethod": "anonymous"}) == 103
    bad = dict(live.admin_auth, AuthString="wrong")
    assert fault_code(api.AuthCheck, bad) == 103
    res = api.system.multicall([
        {"methodName": "AuthCheck", "params": [live.admin_auth]},
        {"methodName": "AuthCheck", "params": [bad]},
        {"methodName": "system.multicall", "params": [[]]},
    ])
    assert res[0] == [1]
    assert res[1]["faultCode"] == 103
    assert res[2]["faultCode"] == -507


def test_legacy_scenario(live: LiveServer) -> None:
    api = live.proxy()
    admin = dict(live.admin_auth, Role="admin")
    assert api.AuthCheck(admin) == 1
    now = int(time.time())

    # -- the system site holds the admin ----------------------------------------------
    (system_site,) = api.GetSites(admin, [live.prefix])
    assert SITE_FIELDS <= set(system_site)
    (me,) = api.GetPersons(admin, [live.admin_email.lower()])
    assert "admin" in me["roles"] and 10 in me["role_ids"]
    assert system_site["site_id"] in me["site_ids"]
    assert me["person_id"] in system_site["person_ids"]
    assert {r["name"] for r in api.GetRoles(admin)} >= {"admin", "pi", "user", "tech"}
    admin_key = ssh_key("root@plc")
    api.AddPersonKey(admin, me["person_id"], {"key_type": "ssh", "key": admin_key})

    # -- a site with max-length Unicode fields -----------------------------------------
    login_base = f"s{PID}{rng.randrange(1000)}"[:20]
    site_fields = {
        "name": utext(rng, 254), "abbreviated_name": utext(rng, 50), "login_base": login_base,
        "is_public": False, "latitude": 48.8566, "longitude": -2.3522,
        "url": utext(rng, 254), "max_slices": 20, "max_slivers": 333, "enabled": True,
    }
    site_id = api.AddSite(admin, site_fields)
    (site,) = api.GetSites(admin, [site_id])
    assert SITE_FIELDS <= set(site)
    check_fields(site, site_fields, "site")
    assert site["site_id"] == site_id and site["peer_id"] is None
    assert now - 5 <= site["date_created"] <= time.time() + 5
    assert api.GetSites({"AuthMethod": "anonymous"}, login_base)[0]["site_id"] == site_id
    # A float field does not accept an int (spec 1.2), a long name is refused.
    assert fault_code(api.AddSite, admin, dict(site_fields, login_base=login_base + "x",
                                               latitude=48)) == 102
    assert fault_code(api.AddSite, admin, dict(site_fields, login_base=login_base + "y",
                                               name=utext(rng, 255))) == 102
    assert fault_code(api.AddSite, admin, dict(site_fields, login_base="Bad_Base")) == 102

    # -- PI, user and tech with keys ---------------------------------------------------
    pi = Person(api, admin, site_id, "pi")
    user = Person(api, admin, site_id, "user")
    tech = Person(api, admin, site_id, "tech")
    for p, role in ((pi, "pi"), (user, "user"), (tech, "tech")):
        assert api.AuthCheck(p.auth) == 1
        (row,) = api.GetPersons(admin, [p.person_id])
        assert PERSON_FIELDS <= set(row)
        assert not {"password", "verification_key", "verification_expires"} & set(row)
        expect = {k: v for k, v in p.fields.items() if k != "password"}
        expect["email"] = p.email.lower()  # stored lowercased (spec 5.2)
        check_fields(row, expect, role)
        assert row["enabled"] is True
        assert row["roles"] == [role] and row["site_ids"] == [site_id]
        assert row["key_ids"] == [p.key_id]
        (key,) = api.GetKeys(p.auth, [p.key_id])
        assert KEY_FIELDS <= set(key)
        check_fields(key, {"key_type": "ssh", "key": p.key, "person_id": p.person_id}, "key")
    assert fault_code(api.AddPerson, admin, dict(pi.fields, email=f"x{PID}@example.org",
                                                 first_name=utext(rng, 129))) == 102
    assert fault_code(api.AddPersonKey, user.auth, user.person_id,
                      {"key_type": "ssh", "key": "ssh-ed25519 AAAA x"}) == 102
    # A user may not add a key for somebody else.
    assert fault_code(api.AddPersonKey, user.auth, pi.person_id,
                      {"key_type": "ssh", "key": ssh_key("x")}) == 108
    (site,) = api.GetSites(admin, [site_id])
    assert set(site["person_ids"]) == {pi.person_id, user.person_id, tech.person_id}
    # The user sees only itself (spec 4.6).
    assert [p["person_id"] for p in api.GetPersons(user.auth)] == [user.person_id]

    # -- nodes with interfaces ---------------------------------------------------------
    host1 = f"Node1-{PID}.Example.org"
    node1_fields = {"hostname": host1, "node_type": "regular", "boot_state": "boot",
                    "model": utext(rng, 255), "version": utext(rng, 64)}
    node1 = api.AddNode(tech.auth, site_id, node1_fields)
    host2 = f"node2-{PID}.example.org"
    node2 = api.AddNode(pi.auth, login_base, {"hostname": host2, "node_type": "reservable"})
    assert fault_code(api.AddNode, user.auth, site_id, {"hostname": f"n3-{PID}.example.org"}) \
        in (103, 108)
    assert fault_code(api.AddNode, pi.auth, site_id, {"hostname": host1.lower()}) == 102
    assert fault_code(api.AddNode, pi.auth, site_id, {"hostname": "not a hostname"}) == 102

    if1_fields = {"type": "ipv4", "method": "static", "ip": "10.1.2.3", "netmask": "255.255.255.0",
                  "network": "10.1.2.0", "broadcast": "10.1.2.255", "gateway": "10.1.2.1",
                  "dns1": "10.1.2.53", "dns2": "10.1.2.54", "is_primary": True,
                  "mac": "02:00:0A:01:02:03", "bwlimit": 10_000_000,
                  "hostname": host1.lower()}
    if1 = api.AddInterface(tech.auth, node1, if1_fields)
    if2 = api.AddInterface(pi.auth, host2, {"type": "ipv4", "method": "dhcp"})
    (iface,) = api.GetInterfaces({"AuthMethod": "anonymous"}, [if1])
    assert INTERFACE_FIELDS <= set(iface)
    check_fields(iface, dict(if1_fields, mac="02:00:0a:01:02:03"), "interface")
    assert iface["node_id"] == node1
    (iface2,) = api.GetInterfaces(admin, {"node_id": node2})
    assert iface2["interface_id"] == if2 and iface2["is_primary"] is True  # first one
    assert api.GetInterfaces(admin, "10.1.2.3")[0]["interface_id"] == if1
    assert fault_code(api.AddInterface, tech.auth, node1,
                      dict(if1_fields, ip="10.9.9.9", is_primary=False,
                           broadcast="10.1.2.255")) == 102  # ip outside network

    (n1,) = api.GetNodes(admin, [node1])
    assert NODE_FIELDS | NODE_SECRET_FIELDS <= set(n1)
    check_fields(n1, dict(node1_fields, hostname=host1.lower()), "node")
    assert n1["site_id"] == site_id and n1["interface_ids"] == [if1]
    for who in (pi.auth, {"AuthMethod": "anonymous"}):
        (seen,) = api.GetNodes(who, host1.lower())
        assert not NODE_SECRET_FIELDS & set(seen)
    (site,) = api.GetSites(admin, [site_id])
    assert sorted(site["node_ids"]) == sorted([node1, node2])

    # -- a nodegroup from node tags ----------------------------------------------------
    tagname = f"deploy{PID}"
    tt = api.AddTagType(admin, {"tagname": tagname, "description": utext(rng, 254),
                                "category": "node/config"})
    (ttrow,) = api.GetTagTypes(admin, [tt])
    assert ttrow["tagname"] == tagname and ttrow["category"] == "node/config"
    assert fault_code(api.AddNodeTag, tech.auth, node1, tagname, "alpha") == 108  # admin only
    ntag = api.AddNodeTag(admin, node1, tagname, "alpha")
    assert fault_code(api.AddNodeTag, admin, node1, tagname, "beta") == 102  # one per type
    api.AddNodeTag(admin, node2, tagname, "beta")
    group = f"alpha{PID}"
    ng = api.AddNodeGroup(admin, group, tagname, "alpha")
    (ngrow,) = api.GetNodeGroups({"AuthMethod": "anonymous"}, [group])
    assert NODEGROUP_FIELDS <= set(ngrow)
    check_fields(ngrow, {"nodegroup_id": ng, "groupname": group, "tag_type_id": tt,
                         "value": "alpha", "tagname": tagname, "node_ids": [node1]}, "nodegroup")
    assert api.GetNodes(admin, [node1], ["nodegroup_ids"])[0]["nodegroup_ids"] == [ng]
    (nt,) = api.GetNodeTags(admin, [ntag])
    check_fields(nt, {"node_id": node1, "hostname": host1.lower(), "tagname": tagname,
                      "value": "alpha", "tag_type_id": tt}, "node tag")

    # -- a slice with members ----------------------------------------------------------
    slice_name = f"{login_base}_conf{rng.randrange(10**6)}"
    slice_fields = {"name": slice_name, "url": utext(rng, 254), "description": utext(rng, 2048),
                    "instantiation": "plc-instantiated"}
    assert fault_code(api.AddSlice, user.auth, slice_fields) in (103, 108)
    slice_id = api.AddSlice(pi.auth, slice_fields)
    assert fault_code(api.AddSlice, pi.auth, dict(slice_fields, name=slice_name + "x",
                                                  description=utext(rng, 2049))) == 102
    assert fault_code(api.AddSlice, pi.auth, dict(slice_fields, name="nosuchsite_x")) == 102
    assert fault_code(api.AddSlice, pi.auth, dict(slice_fields, name=slice_name)) == 102
    assert api.AddPersonToSlice(pi.auth, user.email.lower(), slice_name) == 1
    assert api.AddPersonToSlice(pi.auth, user.person_id, slice_id) == 1  # idempotent
    assert api.AddSliceToNodes(user.auth, slice_id, [host1.lower(), 999999]) == 1
    (sl,) = api.GetSlices(admin, [slice_name])
    assert SLICE_FIELDS <= set(sl)
    check_fields(sl, dict(slice_fields, slice_id=slice_id, site_id=site_id,
                          creator_person_id=pi.person_id, node_ids=[node1],
                          person_ids=[user.person_id]), "slice")
    assert abs(sl["expires"] - (sl["created"] + 14 * 86400)) <= 86400
    (site,) = api.GetSites(admin, [site_id])
    assert site["slice_ids"] == [slice_id]
    # Renewal beyond 8 weeks is refused to non-admins (spec 6.3 UpdateSlice).
    assert fault_code(api.UpdateSlice, user.auth, slice_id,
                      {"expires": int(time.time()) + 9 * 7 * 86400}) == 102
    new_expiry = int(time.time()) + 4 * 7 * 86400
    assert api.UpdateSlice(user.auth, slice_id, {"expires": new_expiry}) == 1
    assert api.GetSlices(admin, [slice_id], ["expires"])[0]["expires"] == new_expiry

    # -- slice tags at slice, nodegroup and node scope ---------------------------------
    long_value = utext(rng, 1000)
    t_slice = api.AddSliceTag(admin, slice_id, "cpu_share", "5")
    t_group = api.AddSliceTag(admin, slice_id, "cpu_share", "7", None, group)
    t_node = api.AddSliceTag(admin, slice_name, "cpu_share", "9", host1.lower())
    api.AddSliceTag(admin, slice_id, "disk_max", "100")
    api.AddSliceTag(admin, slice_id, "disk_max", "200", None, ng)
    # A long unicode value round-trips in a free-text tag; a numeric tag refuses it
    # (issue 15: PLC bounds the values it can know, plc/tagvalues.py).
    assert fault_code(api.AddSliceTag, admin, slice_id, "net_max_rate", long_value) == 102
    api.AddSliceTag(admin, slice_id, "codemux", long_value)
    v1 = api.AddSliceTag(user.auth, slice_id, "vsys", "pubkey")
    api.AddSliceTag(user.auth, slice_id, "vsys", "fd_tuntap")
    assert fault_code(api.AddSliceTag, user.auth, slice_id, "vsys", "pubkey") == 102  # dup
    assert fault_code(api.AddSliceTag, user.auth, slice_id, "cpu_share", "1") == 108
    assert fault_code(api.AddSliceTag, user.auth, slice_id, "vsys", "x", None, ng) == 108
    assert fault_code(api.AddSliceTag, admin, slice_id, "no_such_tag_type", "1") == 102
    assert fault_code(api.AddSliceTag, admin, 99999999, "cpu_share", "1") == 102
    (tn,) = api.GetSliceTags(admin, [t_node])
    assert SLICE_TAG_FIELDS <= set(tn)
    check_fields(tn, {"slice_id": slice_id, "name": slice_name, "node_id": node1,
                      "nodegroup_id": None, "tagname": "cpu_share", "value": "9"}, "sliver tag")
    (tg,) = api.GetSliceTags(admin, [t_group])
    check_fields(tg, {"nodegroup_id": ng, "node_id": None, "value": "7"}, "nodegroup tag")
    vsys = api.GetSliceTags(admin, {"tagname": "vsys", "name": slice_name})
    assert sorted(t["value"] for t in vsys) == ["fd_tuntap", "pubkey"]
    assert api.GetSliceTags(admin, {"value": long_value})[0]["tagname"] == "codemux"

    # -- leases on the reservable node -------------------------------------------------
    gran = api.GetLeaseGranularity({"AuthMethod": "anonymous"})
    assert isinstance(gran, int) and gran > 0
    t0 = int(time.time()) + 100
    t1 = t0 + 2 * gran + 100
    res = api.AddLeases(user.auth, [node2], slice_id, t0, t1)
    assert res["errors"] == [] and len(res["new_ids"]) == 1
    lease_id = res["new_ids"][0]
    (lease,) = api.GetLeases({"AuthMethod": "anonymous"}, lease_id)
    assert LEASE_FIELDS <= set(lease)
    want_from = -(-t0 // gran) * gran  # rounded up
    want_until = t1 // gran * gran  # rounded down
    check_fields(lease, {"t_from": want_from, "t_until": want_until, "node_id": node2,
                         "slice_id": slice_id, "hostname": host2, "node_type": "reservable",
                         "name": slice_name, "site_id": site_id,
                         "duration": want_until - want_from, "expired": False}, "lease")
    clash = api.AddLeases(user.auth, host2, slice_name, want_from, want_until)
    assert clash["new_ids"] == [] and len(clash["errors"]) == 1
    later = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(want_until + 3 * gran))
    later_end = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(want_until + 4 * gran))
    res2 = api.AddLeases(user.auth, [host2], slice_id, later, later_end)
    assert res2["errors"] == [], res2
    (lease2,) = api.GetLeases(admin, res2["new_ids"])
    assert lease2["t_from"] == want_until + 3 * gran
    assert fault_code(api.AddLeases, user.auth, [node1], slice_id, t0, t1) == 102  # regular

    # -- GetSlivers for node1: HMAC auth, then a node session --------------------------
    key = live.node_key(host1.lower())
    assert key and "=" not in key
    hmac_auth = {"AuthMethod": "hmac", "node_id": node1, "value": node_hmac(key)}
    slivers = api.GetSlivers(hmac_auth)
    bad_auth = dict(hmac_auth, value=node_hmac(key + "x"))
    assert fault_code(api.GetSlivers, bad_auth) == 103
    assert fault_code(api.GetSlivers, dict(hmac_auth, node_id=node2)) == 103
    # With an argument, the HMAC covers it (spec 2.4 step 1).
    by_name = api.GetSlivers({"AuthMethod": "hmac", "node_id": node1,
                              "value": node_hmac(key, host1.lower())}, host1.lower())
    assert by_name["node_id"] == node1

    assert SLIVERS_KEYS <= set(slivers)
    assert slivers["node_id"] == node1 and slivers["hostname"] == host1.lower()
    assert abs(slivers["timestamp"] - time.time()) < 60
    assert [i["interface_id"] for i in slivers["interfaces"]] == [if1]
    check_fields(slivers["interfaces"][0], dict(if1_fields, mac="02:00:0a:01:02:03"), "sliver if")
    assert slivers["groups"] == [group]
    assert slivers["reservation_policy"] == "none" and slivers["leases"] is None
    assert slivers["lease_granularity"] == gran
    assert slivers["xmpp"] == {"server": None}
    assert isinstance(slivers["conf_files"], list) and isinstance(slivers["initscripts"], list)
    accounts = {a["name"]: a["keys"] for a in slivers["accounts"]}
    assert sorted(accounts["site_admin"]) == sorted([pi.key, tech.key])
    assert admin_key in accounts["root"] and user.key not in accounts["root"]
    mine = [s for s in slivers["slivers"] if s["name"] == slice_name]
    assert len(mine) == 1
    sliver = mine[0]
    check_fields(sliver, {"slice_id": slice_id, "instantiation": "plc-instantiated",
                          "expires": new_expiry, "keys": [{"key_type": "ssh", "key": user.key}]},
                 "sliver")
    assert isinstance(sliver["GetSliceFamily"], str) and sliver["GetSliceFamily"].count("-") >= 2
    attrs: dict[str, list[str]] = {}
    for a in sliver["attributes"]:
        attrs.setdefault(a["tagname"], []).append(a["value"])
    assert attrs["cpu_share"] == ["9"]  # sliver beats nodegroup beats slice
    assert attrs["disk_max"] == ["200"]  # nodegroup beats slice
    assert attrs["codemux"] == [long_value]
    assert sorted(attrs["vsys"]) == ["fd_tuntap", "pubkey"]  # multi-valued kept
    # Admin asking for node2 sees the leases of the next 24 h, sorted.
    s2 = api.GetSlivers(admin, node2)
    assert s2["reservation_policy"] == "lease_or_idle"
    assert s2["leases"] == [
        {"slice_id": slice_id, "t_from": want_from, "t_until": want_until, "name": slice_name},
        {"slice_id": slice_id, "t_from": lease2["t_from"], "t_until": lease2["t_until"],
         "name": slice_name},
    ]
    assert not [s for s in s2["slivers"] if s["name"] == slice_name]  # not on node2
    assert fault_code(api.GetSlivers, pi.auth, node1) in (103, 108)
    # Node session (spec 2.3/2.4): GetSession over HMAC, then session auth.
    session = api.GetSession(hmac_auth)
    assert isinstance(session, str) and len(session) >= 32
    node_auth = {"AuthMethod": "session", "session": session}
    assert api.GetSlivers(node_auth)["node_id"] == node1
    assert api.AuthCheck(node_auth) == 1
    assert fault_code(api.AddSite, node_auth, dict(site_fields, login_base="zz")) in (103, 108)
    # last_contact was set by GetSlivers.
    assert api.GetNodes(admin, [node1], ["last_contact"])[0]["last_contact"] >= now - 5

    # -- filters (spec 4) --------------------------------------------------------------
    anon = {"AuthMethod": "anonymous"}
    both = sorted([host1.lower(), host2])
    got = api.GetNodes(anon, {"hostname": f"*-{PID}.EXAMPLE.org", "-SORT": "-hostname"},
                       ["hostname"])
    assert [n["hostname"] for n in got] == both[::-1]  # pattern: case-insensitive
    assert api.GetNodes(anon, {"hostname": f"node1-{PID}.Example.org"}) == []  # exact: not
    got = api.GetNodes(anon, {"site_id": site_id, "-SORT": "hostname", "-LIMIT": 1,
                              "-OFFSET": 1}, ["hostname"])
    assert [n["hostname"] for n in got] == both[1:]
    assert api.GetNodes(anon, []) == []
    got = api.GetPersons(admin, {"|role_ids": [20, 40], "email": f"*.{PID}.*"},
                         ["person_id"])
    assert sorted(p["person_id"] for p in got) == sorted([pi.person_id, tech.person_id])
    got = api.GetPersons(admin, {"&roles": "user", "email": f"*.{PID}.*"}, ["person_id"])
    assert [p["person_id"] for p in got] == [user.person_id]
    got = api.GetNodes(admin, {"]node_id": node2, "[node_id": node2}, ["node_id"])
    assert got == [{"node_id": node2}]  # "]" is >=, "[" is <=
    got = api.GetNodes(admin, {"-OR": True, "node_id": node1, "hostname": host2},
                       ["node_id"])
    assert sorted(n["node_id"] for n in got) == sorted([node1, node2])
    assert fault_code(api.GetNodes, admin, {"no_such_field": 1}) == 102
    assert fault_code(api.GetNodes, admin, {"-BOGUS": 1}) == 102
    assert fault_code(api.GetNodes, admin, None, ["hostname", "no_such_column"]) == 102
    assert fault_code(api.GetNodes, admin, {"node_id": "*"}) == 102  # pattern on an int

    # -- accessors and exposed tags (spec 9.2, 9.3) ------------------------------------
    assert api.SetNodeArch(admin, node1, "aarch64") == "aarch64"
    assert api.GetNodeArch(admin, host1.lower()) == "aarch64"
    assert api.GetNodes(admin, [node1], ["arch"]) == [{"arch": "aarch64"}]
    assert api.GetNodeArch(admin, 99999999) is None
    assert api.SetSliceVref(user.auth, slice_id, "bookworm") == "bookworm"
    assert api.GetSlices(admin, {"vref": "bookworm"}, ["slice_id", "vref"]) == \
        [{"slice_id": slice_id, "vref": "bookworm"}]
    assert fault_code(api.SetNodeArch, admin, 99999999, "x") == 102

    # -- slices that go to every node (spec 7 (a) and (b)) ------------------------------
    sys_name = f"{login_base}_sys{rng.randrange(10**6)}"
    sys_id = api.AddSlice(admin, {"name": sys_name})
    api.AddSliceTag(admin, sys_id, "system", "1")
    ctl_name = f"{login_base}_ctl{rng.randrange(10**6)}"
    api.AddSlice(admin, {"name": ctl_name, "instantiation": "nm-controller"})
    names = {s["name"] for s in api.GetSlivers(admin, node2)["slivers"]}
    assert {sys_name, ctl_name} <= names and slice_name not in names
    assert api.DeleteSlice(admin, sys_name) == 1 and api.DeleteSlice(admin, ctl_name) == 1

    # -- events: writes recorded, passwords never ---------------------------------------
    events = api.GetEvents(admin, {"call_name": "AddPerson"})
    assert events, "AddPerson was not recorded"
    for ev in events:
        for p in (pi, user, tech):
            assert p.password not in ev["call"]
    assert live.admin_password not in " ".join(e["call"] for e in api.GetEvents(admin))
    # ... nor in the server's log.
    log = live.log.read_text(errors="replace")
    for secret in (live.admin_password, pi.password, user.password, tech.password):
        assert secret not in log

    # -- deletes -----------------------------------------------------------------------
    assert api.DeleteSliceTag(user.auth, v1) == 1
    assert api.GetSliceTags(admin, [v1]) == []
    assert fault_code(api.DeleteSliceTag, user.auth, t_slice) == 108
    for tag_id in (t_slice, t_group, t_node):
        assert api.DeleteSliceTag(admin, tag_id) == 1
    assert api.GetSliceTags(admin, [t_slice, t_group, t_node]) == []
    assert api.DeleteLeases(user.auth, [lease_id] + res2["new_ids"]) == 1
    assert api.GetLeases(admin, [lease_id]) == []
    assert fault_code(api.DeleteLeases, user.auth, lease_id) == 102
    assert api.DeleteSliceFromNodes(user.auth, slice_id, [node1]) == 1
    assert api.GetSlices(admin, [slice_id])[0]["node_ids"] == []
    assert api.DeletePersonFromSlice(pi.auth, user.person_id, slice_id) == 1
    assert api.GetSlices(admin, [slice_id])[0]["person_ids"] == []
    assert api.DeleteSlice(pi.auth, slice_name) == 1
    assert api.GetSlices(admin, [slice_id]) == []
    assert fault_code(api.DeleteSlice, pi.auth, slice_id) == 102
    assert api.DeleteNodeGroup(admin, group) == 1
    assert api.GetNodeGroups(admin, [ng]) == []
    assert api.DeleteNodeTag(admin, ntag) == 1
    assert api.GetNodeTags(admin, [ntag]) == []
    assert api.DeleteInterface(tech.auth, if1) == 1
    assert api.GetInterfaces(admin, [if1]) == []
    assert api.GetNodes(admin, [node1])[0]["interface_ids"] == []
    assert api.DeleteNode(tech.auth, node1) == 1
    assert api.GetNodes(admin, [node1]) == []
    assert fault_code(api.DeleteNode, tech.auth, node1) == 102
    assert api.DeleteKey(user.auth, user.key_id) == 1
    assert api.GetKeys(admin, [user.key_id]) == []
    assert api.DeletePerson(admin, tech.person_id) == 1
    assert api.GetPersons(admin, [tech.person_id]) == []
    assert fault_code(api.AuthCheck, tech.auth) == 103
    assert api.DeleteTagType(admin, tt) == 1
    assert api.GetTagTypes(admin, [tt]) == []
    assert api.DeleteSite(admin, site_id) == 1
    assert api.GetSites(admin, [site_id]) == []
    assert api.GetNodes(admin, [node2]) == []  # cascade (spec 5.1)
    assert api.GetPersons(admin, [pi.person_id, user.person_id]) == []
    # Names of deleted objects can be reused (spec 5.16).
    again = api.AddSite(admin, dict(site_fields, max_slices=0))
    assert again != site_id
    assert api.DeleteSite(admin, again) == 1


@pytest.mark.parametrize("threads,per_thread", [(8, 8)])
def test_concurrent_writers_lose_nothing(live: LiveServer, threads: int, per_thread: int) -> None:
    """8 clients add persons to one site and slices to one node at once; all land."""
    api = live.proxy()
    admin = live.admin_auth
    base = f"c{PID}{rng.randrange(1000)}"[:20]
    site_id = api.AddSite(admin, {"name": "concurrency", "abbreviated_name": "cc",
                                  "login_base": base, "max_slices": threads * per_thread + 1})
    node_id = api.AddNode(admin, site_id, {"hostname": f"cc-{PID}.example.org"})
    errors: list[BaseException] = []
    made: dict[int, list[tuple[int, str, int]]] = {}
    barrier = threading.Barrier(threads)

    def writer(t: int) -> None:
        proxy = live.proxy()
        out: list[tuple[int, str, int]] = []
        try:
            barrier.wait(30)
            for i in range(per_thread):
                first = f"w{t}-{i}-ü"
                pid = proxy.AddPerson(admin, {"first_name": first, "last_name": "L",
                                              "email": f"w{t}.{i}.{PID}@example.org"})
                proxy.AddPersonToSite(admin, pid, site_id)
                sid = proxy.AddSlice(admin, {"name": f"{base}_w{t}_{i}"})
                proxy.AddSliceToNodes(admin, sid, [node_id])
                out.append((pid, first, sid))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        made[t] = out

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(240)
        assert not errors, errors[:3]
        rows = [r for t in range(threads) for r in made[t]]
        assert len(rows) == threads * per_thread
        (site,) = api.GetSites(admin, [site_id])
        assert sorted(site["person_ids"]) == sorted(r[0] for r in rows)
        assert sorted(site["slice_ids"]) == sorted(r[2] for r in rows)
        (node,) = api.GetNodes(admin, [node_id], ["slice_ids"])
        assert sorted(node["slice_ids"]) == sorted(r[2] for r in rows)
        persons = {p["person_id"]: p for p in api.GetPersons(admin, [r[0] for r in rows])}
        for pid, first, _ in rows:
            assert persons[pid]["first_name"] == first
            assert persons[pid]["site_ids"] == [site_id]
    finally:
        for w in workers:
            w.join(1)
        api.DeleteSite(admin, site_id)


def test_database_file_is_where_init_put_it(live: LiveServer) -> None:
    assert Path(live.db).exists() and live.alive()
