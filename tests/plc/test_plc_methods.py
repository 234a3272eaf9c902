"""Every core method: success, wrong role, wrong type and missing object, against a
running server on a copy of the test world (tests/plc/world.py)."""

from __future__ import annotations

import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.plc.world import NODE_KEY, hmac_of, ssh_key

NOW = int(time.time())
H = 3600
Args = Callable[[Any, Any], tuple]
Check = Callable[[Any, Any, Any], None]
EMPTY = "empty"  # a Get on a missing object answers []


@dataclass
class Case:
    method: str
    ok: Args
    check: Check | None = None
    deny: Args | None = None
    deny_code: int = 103
    bad: Args | None = None
    missing: Args | None = None
    missing_code: int | str = 102


def _eq(expected: Any) -> Check:
    def check(api: Any, w: Any, result: Any) -> None:
        assert result == expected
    return check


def _auth_bad(method: str, *rest: Any) -> Args:
    return lambda api, w: (42, *rest)


A = lambda w: w.A  # noqa: E731


def _lease(api: Any, w: Any) -> int:
    out = api.AddLeases(w.A.admin, w.rnode, w.slice, NOW + 2 * H, NOW + 4 * H)
    assert out["errors"] == []
    return out["new_ids"][0]


CASES = [
    # -- auth and sessions ---------------------------------------------------------------
    Case("AuthCheck", lambda api, w: (w.A.user,), _eq(1), deny=lambda api, w: (w.A.anon,),
         bad=lambda api, w: ("auth",),
         missing=lambda api, w: ({"AuthMethod": "password", "Username": "nobody@x.org",
                                  "AuthString": "x"},), missing_code=103),
    Case("BootCheckAuthentication", lambda api, w: (w.A.node,), _eq(1),
         deny=lambda api, w: (w.A.anon,), bad=lambda api, w: ([],),
         missing=lambda api, w: ({"AuthMethod": "session", "session": "nosuch"},),
         missing_code=103),
    Case("GetSession", lambda api, w: (w.A.user, 60),
         lambda api, w, r: (len(r) == 44 and api.AuthCheck(
             {"AuthMethod": "session", "session": r}) == 1) or pytest.fail(r),
         deny=lambda api, w: (w.A.anon,), bad=lambda api, w: (w.A.user, "long"),
         missing=lambda api, w: ({"AuthMethod": "session", "session": "x" * 44},),
         missing_code=103),
    Case("DeleteSession",
         lambda api, w: ({"AuthMethod": "session", "session": api.GetSession(w.A.user)},),
         _eq(1), deny=lambda api, w: (w.A.anon,), deny_code=102,
         bad=lambda api, w: ({"AuthMethod": "session", "session": 5},),
         missing=lambda api, w: ({"AuthMethod": "session", "session": "gone"},),
         missing_code=103),
    Case("AddSession", lambda api, w: (w.A.admin, "user@tu.example.org"),
         lambda api, w, r: api.GetSessions(w.A.admin, [r])[0]["person_id"] == w.user or
         pytest.fail(),
         deny=lambda api, w: (w.A.pi, w.user), bad=lambda api, w: (w.A.admin, 1.5),
         missing=lambda api, w: (w.A.admin, "nobody@x.org")),
    Case("GetSessions", lambda api, w: (w.A.admin, [w.user]), _eq([]),
         deny=lambda api, w: (w.A.user,), bad=lambda api, w: (w.A.admin, 1.5),
         missing=lambda api, w: (w.A.admin, ["nosuch"]), missing_code=EMPTY),
    # -- node boot and management --------------------------------------------------------
    Case("GetSlivers", lambda api, w: (w.A.node,),
         lambda api, w, r: [s["name"] for s in r["slivers"]] == ["tu_one"] or pytest.fail(r),
         deny=lambda api, w: (w.A.user,), bad=lambda api, w: (w.A.admin, 1.5),
         missing=lambda api, w: (w.A.admin, "nosuch.example.org")),
    Case("BootGetNodeDetails",
         lambda api, w: ({"AuthMethod": "hmac", "node_id": w.node, "value": hmac_of(NODE_KEY)},),
         lambda api, w, r: (r["hostname"] == "n1.tu.example.org" and r["networks"][0]["ip"]
                            == "10.1.0.10" and "" in r["networks"][0].values()) or pytest.fail(r),
         deny=lambda api, w: (w.A.user,), deny_code=102,
         bad=lambda api, w: ({"node_id": "one", "value": "x"},),
         missing=lambda api, w: ({"AuthMethod": "hmac", "node_id": 99999, "value": "x"},),
         missing_code=103),
    Case("BootUpdateNode", lambda api, w: (w.A.node, {"boot_state": "boot"}),
         lambda api, w, r: api.GetNodes(w.A.admin, w.node, ["boot_state"]) ==
         [{"boot_state": "boot"}] or pytest.fail(),
         deny=lambda api, w: ({"AuthMethod": "session", "session": api.GetSession(w.A.admin)},
                              {"boot_state": "boot"}), deny_code=108,
         bad=lambda api, w: (w.A.node, {"boot_state": 5}),
         missing=lambda api, w: (w.A.node, {"boot_state": "nosuch"})),
    Case("BootNotifyOwners", lambda api, w: (w.A.node, "no-such-template", 1, 1, 1), _eq(1),
         deny=lambda api, w: (w.A.user, "x", 1, 1, 1),
         bad=lambda api, w: (w.A.node, "x", "one", 1, 1)),
    Case("ReportRunlevel", lambda api, w: (w.A.node, {"run_level": "boot"}),
         lambda api, w, r: api.GetNodes(w.A.admin, w.node, ["run_level"]) ==
         [{"run_level": "boot"}] or pytest.fail(),
         deny=lambda api, w: (w.A.user, {"run_level": "boot"}),
         bad=lambda api, w: (w.A.node, {"run_level": 3}),
         missing=lambda api, w: (w.A.admin, {"run_level": "boot"}, "nosuch.example.org")),
    Case("GetNodeFlavour", lambda api, w: (w.A.user, w.node),
         lambda api, w, r: (r["nodefamily"] == "alpha" and r["arch"] == "x86_64" and
                            api.GetNodeArch(w.A.user, w.node) == "x86_64") or pytest.fail(r),
         deny=lambda api, w: (w.A.pi, w.node), bad=lambda api, w: (w.A.user, 1.5),
         missing=lambda api, w: (w.A.user, 99999)),
    Case("GetSliceFamily", lambda api, w: (w.A.user, w.slice), _eq("bookworm-bookworm-x86_64"),
         deny=lambda api, w: (w.A.pi, w.slice), bad=lambda api, w: (w.A.user, 1.5),
         missing=lambda api, w: (w.A.user, "tu_nosuch")),
    # -- sites ---------------------------------------------------------------------------
    Case("GetSites", lambda api, w: (w.A.anon, "tu", ["site_id", "person_ids"]),
         lambda api, w, r: r == [{"site_id": w.site, "person_ids": [w.pi, w.user, w.tech]}]
         or pytest.fail(r),
         bad=lambda api, w: (w.A.anon, 1.5), missing=lambda api, w: (w.A.anon, "nosuch"),
         missing_code=EMPTY),
    Case("AddSite", lambda api, w: (w.A.admin, {"name": "N", "abbreviated_name": "n",
                                                "login_base": "new", "junk": 1}),
         lambda api, w, r: api.GetSites(w.A.admin, r, ["login_base", "max_slices", "hrn"])
         == [{"login_base": "new", "max_slices": 0, "hrn": "plc.new"}] or pytest.fail(),
         deny=lambda api, w: (w.A.pi, {"name": "N", "abbreviated_name": "n",
                                       "login_base": "new"}),
         bad=lambda api, w: (w.A.admin, {"name": "N", "abbreviated_name": "n",
                                         "login_base": "new", "latitude": 1}),
         missing=lambda api, w: (w.A.admin, {"name": "N"})),
    Case("UpdateSite", lambda api, w: (w.A.pi, "tu", {"url": "http://u/", "max_slices": 99}),
         lambda api, w, r: api.GetSites(w.A.pi, w.site, ["url", "max_slices"]) ==
         [{"url": "http://u/", "max_slices": 10}] or pytest.fail(),
         deny=lambda api, w: (w.A.other_pi, w.site, {"url": "x"}), deny_code=108,
         bad=lambda api, w: (w.A.admin, w.site, {"latitude": 1}),
         missing=lambda api, w: (w.A.admin, "nosuch", {})),
    Case("DeleteSite", lambda api, w: (w.A.admin, w.other_site),
         lambda api, w, r: (api.GetSites(w.A.admin, w.other_site) == [] and
                            api.GetPersons(w.A.admin, w.outsider) == [] and
                            api.GetNodes(w.A.admin, w.other_node) == []) or pytest.fail(),
         deny=lambda api, w: (w.A.pi, w.site), bad=lambda api, w: (w.A.admin, 1.5),
         missing=lambda api, w: (w.A.admin, 99999)),
    Case("AddSiteAddress", lambda api, w: (w.A.pi, w.site, {
        "line1": "1 Main St", "city": "C", "state": "S", "postalcode": "1", "country": "X"}),
         lambda api, w, r: api.GetSites(w.A.pi, w.site, ["address_ids"]) ==
         [{"address_ids": [r]}] or pytest.fail(),
         deny=lambda api, w: (w.A.other_pi, w.site, {"line1": "x"}), deny_code=108,
         bad=lambda api, w: (w.A.pi, w.site, "1 Main St"),
         missing=lambda api, w: (w.A.admin, 99999, {})),
    # -- persons -------------------------------------------------------------------------
    Case("GetPersons", lambda api, w: (w.A.pi, {}, ["person_id", "password"]),
         _lambda := lambda api, w, r: sorted(p["person_id"] for p in r) ==
         [w.pi, w.user, w.tech] and all(set(p) == {"person_id"} for p in r) or pytest.fail(r),
         deny=lambda api, w: (w.A.anon,), bad=lambda api, w: (w.A.admin, 1.5),
         missing=lambda api, w: (w.A.admin, 99999), missing_code=EMPTY),
    Case("AddPerson", lambda api, w: (w.A.pi, {"first_name": "F", "last_name": "L",
                                               "email": "New@TU.example.org",
                                               "enabled": True}),
         lambda api, w, r: api.GetPersons(w.A.admin, r, ["email", "enabled", "site_ids"]) ==
         [{"email": "new@tu.example.org", "enabled": False, "site_ids": []}] or pytest.fail(),
         deny=lambda api, w: (w.A.user, {"first_name": "F", "last_name": "L",
                                         "email": "x@tu.example.org"}),
         bad=lambda api, w: (w.A.admin, {"first_name": "F", "last_name": "L", "email": 5}),
         missing=lambda api, w: (w.A.admin, {"first_name": "F", "last_name": "L",
                                             "email": "x@tu.example.org", "junk": 1})),
    Case("UpdatePerson", lambda api, w: (w.A.pi, w.user, {"title": "Dr", "password": "pw2"}),
         lambda api, w, r: api.AuthCheck({"AuthMethod": "password", "AuthString": "pw2",
                                          "Username": "user@tu.example.org"}) == 1 or pytest.fail(),
         deny=lambda api, w: (w.A.user, w.pi, {"title": "x"}), deny_code=108,
         bad=lambda api, w: (w.A.admin, w.user, {"title": 7}),
         missing=lambda api, w: (w.A.admin, 99999, {})),
    Case("DeletePerson", lambda api, w: (w.A.pi, "user@tu.example.org"),
         lambda api, w, r: (api.GetPersons(w.A.admin, w.user) == [] and
                            api.GetKeys(w.A.admin, [w.user_key]) == []) or pytest.fail(),
         deny=lambda api, w: (w.A.user, w.tech), deny_code=108,
         bad=lambda api, w: (w.A.admin, [w.user]), missing=lambda api, w: (w.A.admin, 99999)),
    Case("AddPersonToSite", lambda api, w: (w.A.admin, w.outsider, "tu"),
         lambda api, w, r: api.GetPersons(w.A.admin, w.outsider, ["site_ids"]) ==
         [{"site_ids": [w.other_site, w.site]}] or pytest.fail(),
         deny=lambda api, w: (w.A.pi, w.outsider, w.site), bad=lambda api, w: (w.A.admin, 1.5, 1),
         missing=lambda api, w: (w.A.admin, w.user, 99999)),
    Case("DeletePersonFromSite", lambda api, w: (w.A.admin, w.user, w.site),
         lambda api, w, r: api.GetPersons(w.A.admin, w.user, ["site_ids"]) ==
         [{"site_ids": []}] or pytest.fail(),
         deny=lambda api, w: (w.A.pi, w.user, w.site), bad=lambda api, w: (w.A.admin, w.user, 1.5),
         missing=lambda api, w: (w.A.admin, 99999, w.site)),
    Case("SetPersonPrimarySite",
         lambda api, w: (api.AddPersonToSite(w.A.admin, w.user, w.other_site) and
                         (w.A.user, w.user, "ot")),
         lambda api, w, r: api.GetPersons(w.A.admin, w.user, ["site_ids"]) ==
         [{"site_ids": [w.other_site, w.site]}] or pytest.fail(),
         deny=lambda api, w: (w.A.user, w.pi, w.site), deny_code=108,
         bad=lambda api, w: (w.A.user, w.user, 1.5),
         missing=lambda api, w: (w.A.user, w.user, w.other_site)),
    Case("AddRoleToPerson", lambda api, w: (w.A.pi, "tech", w.user),
         lambda api, w, r: api.GetPersons(w.A.admin, w.user, ["roles"]) ==
         [{"roles": ["user", "tech"]}] or pytest.fail(),
         deny=lambda api, w: (w.A.user, "tech", w.user), bad=lambda api, w: (w.A.admin, 1.5, 1),
         missing=lambda api, w: (w.A.admin, "nosuchrole", w.user)),
    Case("DeleteRoleFromPerson", lambda api, w: (w.A.pi, 30, w.user),
         lambda api, w, r: api.GetPersons(w.A.admin, w.user, ["roles"]) ==
         [{"roles": []}] or pytest.fail(),
         deny=lambda api, w: (w.A.tech, "user", w.user), bad=lambda api, w: (w.A.admin, 1.5, 1),
         missing=lambda api, w: (w.A.admin, "user", 99999)),
    Case("GetRoles", lambda api, w: (w.A.user,),
         lambda api, w, r: [x["name"] for x in r] == ["admin", "pi", "user", "tech", "node"]
         or pytest.fail(r), deny=lambda api, w: (w.A.anon,), bad=lambda api, w: ("x",)),
    # -- keys ----------------------------------------------------------------------------
    Case("GetKeys", lambda api, w: (w.A.user,),
         lambda api, w, r: [k["key_id"] for k in r] == [w.user_key] or pytest.fail(r),
         deny=lambda api, w: (w.A.anon,), bad=lambda api, w: (w.A.user, "ssh"),
         missing=lambda api, w: (w.A.admin, [99999]), missing_code=EMPTY),
    Case("AddPersonKey", lambda api, w: (w.A.user, w.user, {"key_type": "ssh",
                                                            "key": ssh_key("second")}),
         lambda api, w, r: api.GetPersons(w.A.user, w.user, ["key_ids"]) ==
         [{"key_ids": [w.user_key, r]}] or pytest.fail(),
         deny=lambda api, w: (w.A.user, w.pi, {"key_type": "ssh", "key": ssh_key("x")}),
         deny_code=108,
         bad=lambda api, w: (w.A.user, w.user, {"key_type": "ssh", "key": 5}),
         missing=lambda api, w: (w.A.user, w.user, {"key_type": "ssh",
                                                    "key": "ssh-ed25519 AAAA x"})),
    Case("UpdateKey", lambda api, w: (w.A.user, w.user_key, {"key": ssh_key("new")}),
         lambda api, w, r: api.GetKeys(w.A.user, [w.user_key], ["key"]) ==
         [{"key": ssh_key("new")}] or pytest.fail(),
         deny=lambda api, w: (w.A.user, w.pi_key, {"key": ssh_key("x")}), deny_code=108,
         bad=lambda api, w: (w.A.user, "one", {}), missing=lambda api, w: (w.A.admin, 99999, {})),
    Case("DeleteKey", lambda api, w: (w.A.user, w.user_key),
         lambda api, w, r: api.GetKeys(w.A.admin, [w.user_key]) == [] or pytest.fail(),
         deny=lambda api, w: (w.A.user, w.pi_key), deny_code=108,
         bad=lambda api, w: (w.A.user, "one"), missing=lambda api, w: (w.A.admin, 99999)),
    Case("BlacklistKey", lambda api, w: (w.A.admin, w.user_key),
         lambda api, w, r: (api.GetKeys(w.A.admin, [w.user_key]) == [] and
                            _fault(api.AddPersonKey, w.A.user, w.user,
                                   {"key_type": "ssh", "key": ssh_key("user")}) == 102)
         or pytest.fail(),
         deny=lambda api, w: (w.A.pi, w.user_key), bad=lambda api, w: (w.A.admin, "one"),
         missing=lambda api, w: (w.A.admin, 99999)),
    Case("GetKeyTypes", lambda api, w: (w.A.user,), _eq(["ssh"]),
         deny=lambda api, w: (w.A.anon,), bad=lambda api, w: (None,)),
    # -- nodes ---------------------------------------------------------------------------
    Case("GetNodes", lambda api, w: (w.A.anon, "N1.tu.example.org", ["node_id", "key"]),
         _eq_ids := lambda api, w, r: r == [{"node_id": w.node}] or pytest.fail(r),
         bad=lambda api, w: (w.A.anon, 1.5),
         missing=lambda api, w: (w.A.anon, "nosuch.example.org"), missing_code=EMPTY),
    Case("AddNode", lambda api, w: (w.A.tech, "tu", {"hostname": "N9.tu.example.org",
                                                     "arch": "i386"}),
         lambda api, w, r: api.GetNodes(w.A.admin, r, ["hostname", "arch", "hrn",
                                                       "boot_state"]) ==
         [{"hostname": "n9.tu.example.org", "arch": "i386", "boot_state": "reinstall",
           "hrn": "plc.tu.n9\\.tu\\.example\\.org"}] or pytest.fail(),
         deny=lambda api, w: (w.A.user, w.site, {"hostname": "n9.tu.example.org"}),
         bad=lambda api, w: (w.A.admin, w.site, {"hostname": 5}),
         missing=lambda api, w: (w.A.admin, 99999, {"hostname": "n9.tu.example.org"})),
    Case("UpdateNode", lambda api, w: (w.A.tech, w.node, {"model": "X", "key": "ignored"}),
         lambda api, w, r: api.GetNodes(w.A.admin, w.node, ["model", "key"]) ==
         [{"model": "X", "key": NODE_KEY}] or pytest.fail(),
         deny=lambda api, w: (w.A.other_pi, w.node, {"model": "x"}), deny_code=108,
         bad=lambda api, w: (w.A.admin, w.node, {"model": 5}),
         missing=lambda api, w: (w.A.admin, 99999, {})),
    Case("DeleteNode", lambda api, w: (w.A.pi, w.node),
         lambda api, w, r: (api.GetNodes(w.A.admin, w.node) == [] and
                            api.GetInterfaces(w.A.admin, w.interface) == [] and
                            api.GetSlices(w.A.admin, w.slice, ["node_ids"]) ==
                            [{"node_ids": []}]) or pytest.fail(),
         deny=lambda api, w: (w.A.other_pi, w.node), deny_code=108,
         bad=lambda api, w: (w.A.admin, 1.5), missing=lambda api, w: (w.A.admin, 99999)),
] + [
    Case(name, lambda api, w: (w.A.tech,),
         (lambda want: lambda api, w, r: r[:len(want)] == want or pytest.fail(r))(v),
         deny=lambda api, w: (w.A.anon,), bad=lambda api, w: (1,))
    for name, v in (("GetNodeTypes", ["regular", "reservable"]),
                    ("GetBootStates", ["boot", "safeboot"]),
                    ("GetNetworkMethods", ["static", "dhcp"]), ("GetNetworkTypes", ["ipv4"]),
                    ("GetSliceInstantiations", ["not-instantiated"]))
] + [
    # -- interfaces ----------------------------------------------------------------------
    Case("GetInterfaces", lambda api, w: (w.A.anon, "10.1.0.10", ["interface_id", "is_primary"]),
         lambda api, w, r: r == [{"interface_id": w.interface, "is_primary": True}]
         or pytest.fail(r),
         bad=lambda api, w: (w.A.anon, 1.5),
         missing=lambda api, w: (w.A.anon, 99999), missing_code=EMPTY),
    Case("AddInterface", lambda api, w: (w.A.tech, w.rnode, {"type": "ipv4", "method": "dhcp",
                                                             "mac": "AA-BB-CC-DD-EE-0F",
                                                             "ifname": "eth0"}),
         lambda api, w, r: api.GetInterfaces(w.A.admin, r, ["is_primary", "mac", "ifname"]) ==
         [{"is_primary": True, "mac": "aa:bb:cc:dd:ee:0f", "ifname": "eth0"}] or pytest.fail(),
         deny=lambda api, w: (w.A.other_pi, w.rnode, {"type": "ipv4", "method": "dhcp"}),
         deny_code=108,
         bad=lambda api, w: (w.A.admin, w.rnode, {"type": "ipv4", "method": "dhcp",
                                                  "bwlimit": "x"}),
         missing=lambda api, w: (w.A.admin, 99999, {"type": "ipv4", "method": "dhcp"})),
    Case("UpdateInterface", lambda api, w: (w.A.tech, w.interface, {"dns2": "10.1.0.3"}),
         lambda api, w, r: api.GetInterfaces(w.A.admin, w.interface, ["dns2"]) ==
         [{"dns2": "10.1.0.3"}] or pytest.fail(),
         deny=lambda api, w: (w.A.other_pi, w.interface, {"dns2": "10.1.0.3"}), deny_code=108,
         bad=lambda api, w: (w.A.admin, w.interface, {"dns2": 3}),
         missing=lambda api, w: (w.A.admin, 99999, {})),
    Case("DeleteInterface", lambda api, w: (w.A.tech, w.interface),
         lambda api, w, r: api.GetNodes(w.A.admin, w.node, ["interface_ids"]) ==
         [{"interface_ids": []}] or pytest.fail(),
         deny=lambda api, w: (w.A.other_pi, w.interface), deny_code=108,
         bad=lambda api, w: (w.A.admin, "one"), missing=lambda api, w: (w.A.admin, 99999)),
    Case("GetInterfaceTags", lambda api, w: (w.A.user, {"interface_id": w.interface}), _eq([]),
         deny=lambda api, w: (w.A.anon,), bad=lambda api, w: (w.A.user, 1.5),
         missing=lambda api, w: (w.A.user, [99999]), missing_code=EMPTY),
    Case("AddInterfaceTag", lambda api, w: (w.A.tech, w.interface, "ifname", "eth1"),
         lambda api, w, r: api.GetInterfaceTags(w.A.user, r, ["tagname", "value", "ip"]) ==
         [{"tagname": "ifname", "value": "eth1", "ip": "10.1.0.10"}] or pytest.fail(),
         deny=lambda api, w: (w.A.other_pi, w.interface, "ifname", "eth1"), deny_code=108,
         bad=lambda api, w: (w.A.tech, w.interface, "ifname", 5),
         missing=lambda api, w: (w.A.admin, 99999, "ifname", "x")),
    # -- slices --------------------------------------------------------------------------
    Case("GetSlices", lambda api, w: (w.A.user, "tu_one", ["slice_id", "vref"]),
         lambda api, w, r: r == [{"slice_id": w.slice, "vref": "bookworm"}] or pytest.fail(r),
         deny=lambda api, w: (w.A.tech,), bad=lambda api, w: (w.A.user, 1.5),
         missing=lambda api, w: (w.A.user, "tu_nosuch"), missing_code=EMPTY),
    Case("AddSlice", lambda api, w: (w.A.pi, {"name": "tu_new", "description": "d",
                                              "vref": "trixie"}),
         lambda api, w, r: api.GetSlices(w.A.pi, r, ["name", "site_id", "creator_person_id",
                                                     "vref", "hrn"]) ==
         [{"name": "tu_new", "site_id": w.site, "creator_person_id": w.pi, "vref": "trixie",
           "hrn": "plc.tu.new"}] or pytest.fail(),
         deny=lambda api, w: (w.A.other_pi, {"name": "tu_new"}), deny_code=108,
         bad=lambda api, w: (w.A.pi, {"name": 5}),
         missing=lambda api, w: (w.A.admin, {"name": "zz_nosite"})),
    Case("UpdateSlice", lambda api, w: (w.A.user, w.slice, {"description": "new",
                                                            "expires": NOW + 4 * 7 * 86400}),
         lambda api, w, r: api.GetSlices(w.A.user, w.slice, ["description", "expires"]) ==
         [{"description": "new", "expires": NOW + 4 * 7 * 86400}] or pytest.fail(),
         deny=lambda api, w: (w.A.outsider, w.slice, {"description": "x"}), deny_code=108,
         bad=lambda api, w: (w.A.user, w.slice, {"expires": "soon"}),
         missing=lambda api, w: (w.A.admin, "tu_nosuch", {})),
    Case("DeleteSlice", lambda api, w: (w.A.user, "tu_one"),
         lambda api, w, r: (api.GetSlices(w.A.admin, w.slice) == [] and
                            api.GetSliceTags(w.A.admin, {"slice_id": w.slice}) == [])
         or pytest.fail(),
         deny=lambda api, w: (w.A.outsider, w.slice), deny_code=108,
         bad=lambda api, w: (w.A.user, 1.5), missing=lambda api, w: (w.A.admin, "tu_nosuch")),
    Case("AddSliceToNodes", lambda api, w: (w.A.user, w.slice, ["R1.tu.example.org", 99999]),
         lambda api, w, r: api.GetSlices(w.A.user, w.slice, ["node_ids"]) ==
         [{"node_ids": [w.node, w.rnode]}] or pytest.fail(),
         deny=lambda api, w: (w.A.outsider, w.slice, [w.rnode]), deny_code=108,
         bad=lambda api, w: (w.A.user, w.slice, "r1.tu.example.org"),
         missing=lambda api, w: (w.A.user, "tu_nosuch", [w.rnode])),
    Case("DeleteSliceFromNodes", lambda api, w: (w.A.user, w.slice, [w.node]),
         lambda api, w, r: api.GetSlices(w.A.user, w.slice, ["node_ids"]) ==
         [{"node_ids": []}] or pytest.fail(),
         deny=lambda api, w: (w.A.outsider, w.slice, [w.node]), deny_code=108,
         bad=lambda api, w: (w.A.user, w.slice, w.node),
         missing=lambda api, w: (w.A.user, "tu_nosuch", [w.node])),
    Case("AddPersonToSlice", lambda api, w: (w.A.pi, "tech@tu.example.org", "tu_one"),
         lambda api, w, r: api.GetSlices(w.A.pi, w.slice, ["person_ids"]) ==
         [{"person_ids": [w.user, w.tech]}] or pytest.fail(),
         deny=lambda api, w: (w.A.other_pi, w.tech, w.slice), deny_code=108,
         bad=lambda api, w: (w.A.pi, 1.5, w.slice),
         missing=lambda api, w: (w.A.pi, 99999, w.slice)),
    Case("DeletePersonFromSlice", lambda api, w: (w.A.pi, w.user, w.slice),
         lambda api, w, r: api.GetSlices(w.A.pi, w.slice, ["person_ids"]) ==
         [{"person_ids": []}] or pytest.fail(),
         deny=lambda api, w: (w.A.other_pi, w.user, w.slice), deny_code=108,
         bad=lambda api, w: (w.A.pi, w.user, 1.5),
         missing=lambda api, w: (w.A.pi, w.user, "tu_nosuch")),
    Case("GetSliceTags", lambda api, w: (w.A.user, {"name": "tu_one"}, ["tagname", "value"]),
         lambda api, w, r: {"tagname": "vref", "value": "bookworm"} in r or pytest.fail(r),
         deny=lambda api, w: (w.A.tech,), bad=lambda api, w: (w.A.user, "tu_one"),
         missing=lambda api, w: (w.A.user, [99999]), missing_code=EMPTY),
    Case("AddSliceTag", lambda api, w: (w.A.user, w.slice, "vsys", "fd_tuntap", w.node),
         lambda api, w, r: api.GetSliceTags(w.A.user, [r], ["node_id", "tagname"]) ==
         [{"node_id": w.node, "tagname": "vsys"}] or pytest.fail(),
         deny=lambda api, w: (w.A.user, w.slice, "system", "1"), deny_code=108,
         bad=lambda api, w: (w.A.user, w.slice, "vsys", 5),
         missing=lambda api, w: (w.A.user, w.slice, "nosuchtag", "x")),
    Case("UpdateSliceTag", lambda api, w: (w.A.user, w.slice_tag, "trixie"),
         lambda api, w, r: api.GetSliceVref(w.A.user, w.slice) == "trixie" or pytest.fail(),
         deny=lambda api, w: (w.A.outsider, w.slice_tag, "x"), deny_code=108,
         bad=lambda api, w: (w.A.user, "one", "x"), missing=lambda api, w: (w.A.admin, 99999, "x")),
    Case("DeleteSliceTag", lambda api, w: (w.A.user, w.slice_tag),
         lambda api, w, r: api.GetSliceVref(w.A.user, w.slice) is None or pytest.fail(),
         deny=lambda api, w: (w.A.outsider, w.slice_tag), deny_code=108,
         bad=lambda api, w: (w.A.user, "one"), missing=lambda api, w: (w.A.admin, 99999)),
    # -- tag types, node tags, node groups -----------------------------------------------
    Case("GetTagTypes", lambda api, w: (w.A.user, "vsys", ["roles"]),
         _eq([{"roles": ["pi", "user", "tech"]}]), deny=lambda api, w: (w.A.anon,),
         bad=lambda api, w: (w.A.user, 1.5), missing=lambda api, w: (w.A.user, "nosuch"),
         missing_code=EMPTY),
    Case("AddTagType", lambda api, w: (w.A.admin, {"tagname": "color", "junk": 1}),
         lambda api, w, r: api.GetTagTypes(w.A.admin, r, ["tagname", "category", "roles"]) ==
         [{"tagname": "color", "category": "general", "roles": []}] or pytest.fail(),
         deny=lambda api, w: (w.A.pi, {"tagname": "color"}),
         bad=lambda api, w: (w.A.admin, {"tagname": 5}),
         missing=lambda api, w: (w.A.admin, {"category": "x"})),
    Case("UpdateTagType", lambda api, w: (w.A.admin, "vref", {"description": "image"}),
         lambda api, w, r: api.GetTagTypes(w.A.admin, "vref", ["description"]) ==
         [{"description": "image"}] or pytest.fail(),
         deny=lambda api, w: (w.A.pi, "vref", {}), bad=lambda api, w: (w.A.admin, "vref", {
             "category": 5}), missing=lambda api, w: (w.A.admin, "nosuch", {})),
    Case("DeleteTagType", lambda api, w: (w.A.admin, "deployment"),
         lambda api, w, r: (api.GetNodeTags(w.A.admin, [w.node_tag]) == [] and
                            api.GetNodeGroups(w.A.admin, [w.nodegroup]) == []) or pytest.fail(),
         deny=lambda api, w: (w.A.pi, "vref"), bad=lambda api, w: (w.A.admin, 1.5),
         missing=lambda api, w: (w.A.admin, "nosuch")),
    Case("AddRoleToTagType", lambda api, w: (w.A.admin, "tech", "deployment"),
         lambda api, w, r: api.GetTagTypes(w.A.admin, "deployment", ["roles"]) ==
         [{"roles": ["admin", "tech"]}] or pytest.fail(),
         deny=lambda api, w: (w.A.pi, "tech", "deployment"),
         bad=lambda api, w: (w.A.admin, 1.5, "deployment"),
         missing=lambda api, w: (w.A.admin, "tech", "nosuch")),
    Case("DeleteRoleFromTagType", lambda api, w: (w.A.admin, "user", "vsys"),
         lambda api, w, r: api.GetTagTypes(w.A.admin, "vsys", ["roles"]) ==
         [{"roles": ["pi", "tech"]}] or pytest.fail(),
         deny=lambda api, w: (w.A.pi, "user", "vsys"),
         bad=lambda api, w: (w.A.admin, 1.5, "vsys"),
         missing=lambda api, w: (w.A.admin, "user", "nosuch")),
    Case("GetNodeTags", lambda api, w: (w.A.tech, w.node_tag, ["hostname", "tagname", "value"]),
         _eq([{"hostname": "n1.tu.example.org", "tagname": "deployment", "value": "alpha"}]),
         deny=lambda api, w: (w.A.anon,), bad=lambda api, w: (w.A.tech, "x"),
         missing=lambda api, w: (w.A.tech, 99999), missing_code=EMPTY),
    Case("AddNodeTag", lambda api, w: (w.A.tech, "n1.tu.example.org", "arch", "aarch64"),
         lambda api, w, r: api.GetNodeArch(w.A.user, w.node) == "aarch64" or pytest.fail(),
         deny=lambda api, w: (w.A.other_pi, w.node, "arch", "x"), deny_code=108,
         bad=lambda api, w: (w.A.tech, w.node, "arch", 5),
         missing=lambda api, w: (w.A.admin, 99999, "arch", "x")),
    Case("UpdateNodeTag", lambda api, w: (w.A.admin, w.node_tag, "beta"),
         lambda api, w, r: api.GetNodes(w.A.admin, w.node, ["nodegroup_ids"]) ==
         [{"nodegroup_ids": []}] or pytest.fail(),
         deny=lambda api, w: (w.A.tech, w.node_tag, "beta"), deny_code=108,
         bad=lambda api, w: (w.A.admin, w.node_tag, 5), missing=lambda api, w: (w.A.admin, 99999, "x")),
    Case("DeleteNodeTag", lambda api, w: (w.A.admin, w.node_tag),
         lambda api, w, r: api.GetNodeDeployment(w.A.admin, w.node) is None or pytest.fail(),
         deny=lambda api, w: (w.A.tech, w.node_tag), deny_code=108,
         bad=lambda api, w: (w.A.admin, "x"), missing=lambda api, w: (w.A.admin, 99999)),
    Case("GetNodeGroups", lambda api, w: (w.A.anon, ["alphas"], ["node_ids", "tagname"]),
         lambda api, w, r: r == [{"node_ids": [w.node], "tagname": "deployment"}]
         or pytest.fail(r),
         bad=lambda api, w: (w.A.anon, 1.5),
         missing=lambda api, w: (w.A.anon, ["nosuch"]), missing_code=EMPTY),
    Case("AddNodeGroup", lambda api, w: (w.A.admin, "betas", "deployment", "beta"),
         lambda api, w, r: api.GetNodeGroups(w.A.admin, [r], ["groupname", "node_ids"]) ==
         [{"groupname": "betas", "node_ids": []}] or pytest.fail(),
         deny=lambda api, w: (w.A.pi, "betas", "deployment", "beta"),
         bad=lambda api, w: (w.A.admin, 5, "deployment", "beta"),
         missing=lambda api, w: (w.A.admin, "betas", "nosuch", "beta")),
    Case("UpdateNodeGroup", lambda api, w: (w.A.admin, "alphas", {"value": "beta"}),
         lambda api, w, r: api.GetNodeGroups(w.A.admin, ["alphas"], ["node_ids"]) ==
         [{"node_ids": []}] or pytest.fail(),
         deny=lambda api, w: (w.A.pi, "alphas", {}), bad=lambda api, w: (w.A.admin, 1.5, {}),
         missing=lambda api, w: (w.A.admin, "nosuch", {})),
    Case("DeleteNodeGroup", lambda api, w: (w.A.admin, "alphas"),
         lambda api, w, r: api.GetNodeGroups(w.A.admin) == [] or pytest.fail(),
         deny=lambda api, w: (w.A.pi, "alphas"), bad=lambda api, w: (w.A.admin, 1.5),
         missing=lambda api, w: (w.A.admin, "nosuch")),
    # -- leases --------------------------------------------------------------------------
    Case("GetLeases", lambda api, w: (w.A.anon, {"alive": [NOW + 3 * H, NOW + 5 * H]},
                                      ["hostname", "name"]),
         lambda api, w, r: r == [] or pytest.fail(r),
         bad=lambda api, w: (w.A.anon, "x"),
         missing=lambda api, w: (w.A.anon, [99999]), missing_code=EMPTY),
    Case("AddLeases", lambda api, w: (w.A.user, "r1.tu.example.org", "tu_one", NOW + 1, NOW + 3 * H),
         lambda api, w, r: (len(r["new_ids"]) == 1 and r["errors"] == [] and
                            api.GetLeases(w.A.anon, r["new_ids"], ["t_from", "t_until",
                                                                   "duration"]) ==
                            [{"t_from": -(-(NOW + 1) // H) * H, "t_until": (NOW + 3 * H) // H * H,
                              "duration": (NOW + 3 * H) // H * H - (-(-(NOW + 1) // H) * H)}] and
                            api.AddLeases(w.A.user, w.rnode, w.slice, NOW + H, NOW + 4 * H)[
                                "errors"]) or pytest.fail(r),
         deny=lambda api, w: (w.A.outsider, w.rnode, w.slice, NOW + H, NOW + 2 * H),
         deny_code=108, bad=lambda api, w: (w.A.user, w.rnode, w.slice, 1.5, NOW),
         missing=lambda api, w: (w.A.user, 99999, w.slice, NOW + H, NOW + 2 * H)),
    Case("UpdateLeases", lambda api, w: (w.A.user, _lease(api, w), {"duration": 3 * H}),
         lambda api, w, r: (len(r["updated_ids"]) == 1 and api.GetLeases(
             w.A.user, r["updated_ids"], ["duration"]) == [{"duration": 3 * H}])
         or pytest.fail(r),
         deny=lambda api, w: (w.A.anon, _lease(api, w), {"duration": H}),
         bad=lambda api, w: (w.A.user, "x", {}), missing=lambda api, w: (w.A.user, 99999, {})),
    Case("DeleteLeases", lambda api, w: (w.A.user, [_lease(api, w)]),
         lambda api, w, r: api.GetLeases(w.A.user) == [] or pytest.fail(),
         deny=lambda api, w: (w.A.tech, _lease(api, w)), deny_code=108,
         bad=lambda api, w: (w.A.user, "x"), missing=lambda api, w: (w.A.user, [99999])),
    Case("GetLeaseGranularity", lambda api, w: (w.A.anon,), _eq(3600),
         bad=lambda api, w: ("anonymous",)),
    # -- accessors and events ------------------------------------------------------------
    Case("SetSliceVref", lambda api, w: (w.A.user, "tu_one", "f37"),
         lambda api, w, r: (r == "f37" and api.GetSliceVref(w.A.tech, w.slice) == "f37")
         or pytest.fail(r),
         deny=lambda api, w: (w.A.tech, w.slice, "x"), bad=lambda api, w: (w.A.user, w.slice, 5),
         missing=lambda api, w: (w.A.user, "tu_nosuch", "x")),
    Case("GetNodeHrn", lambda api, w: (w.A.tech, "n1.tu.example.org"),
         _eq("plc.tu.n1\\.tu\\.example\\.org"), deny=lambda api, w: (w.A.anon, w.node),
         bad=lambda api, w: (w.A.tech, 1.5), missing=lambda api, w: (w.A.tech, 99999),
         missing_code="none"),
    Case("SetPersonColumnconf", lambda api, w: (w.A.user, w.user, "a:b"),
         lambda api, w, r: api.GetPersons(w.A.user, w.user, ["columnconf"]) ==
         [{"columnconf": "a:b"}] or pytest.fail(),
         deny=lambda api, w: (w.A.user, w.pi, "x"), deny_code=108,
         bad=lambda api, w: (w.A.user, w.user, 5), missing=lambda api, w: (w.A.admin, 99999, "x")),
    Case("GetEvents", lambda api, w: (w.A.admin, {"call_name": "AddSite"}, ["call", "object_types"]),
         lambda api, w, r: (len(r) == 2 and r[0]["object_types"] == ["Site"] and
                            "Removed by API" in r[0]["call"] and ADMIN_PW not in r[0]["call"])
         or pytest.fail(r),
         deny=lambda api, w: (w.A.pi,), bad=lambda api, w: (w.A.admin, "x"),
         missing=lambda api, w: (w.A.admin, [99999]), missing_code=EMPTY),
]

from tests.plc.conftest import ADMIN_PASSWORD as ADMIN_PW  # noqa: E402


def _fault(fn: Callable[..., Any], *args: Any) -> int:
    try:
        fn(*args)
    except xmlrpc.client.Fault as f:
        return f.faultCode
    return 0


def _call_fault(api: Any, method: str, args: tuple) -> xmlrpc.client.Fault:
    try:
        result = getattr(api, method)(*args)
    except xmlrpc.client.Fault as f:
        return f
    pytest.fail(f"{method}{args!r} succeeded with {result!r}, expected a fault")


BY_NAME = {c.method: c for c in CASES}


@pytest.mark.parametrize("name", list(BY_NAME))
def test_success(world: Any, name: str) -> None:
    plc, w = world
    api = plc.proxy()
    case = BY_NAME[name]
    result = getattr(api, name)(*case.ok(api, w))
    if case.check:
        case.check(api, w, result)


@pytest.mark.parametrize("name", [c.method for c in CASES if c.deny])
def test_wrong_role(world: Any, name: str) -> None:
    plc, w = world
    api = plc.proxy()
    case = BY_NAME[name]
    args = case.deny(api, w)  # type: ignore[misc]
    before = _snapshot(plc)
    f = _call_fault(api, name, args)
    assert f.faultCode == case.deny_code, f.faultString
    assert f": {name}: " in f.faultString
    assert _snapshot(plc) == before or name in ("DeleteSession",)


@pytest.mark.parametrize("name", [c.method for c in CASES if c.bad])
def test_wrong_type(world: Any, name: str) -> None:
    plc, w = world
    api = plc.proxy()
    f = _call_fault(api, name, BY_NAME[name].bad(api, w))  # type: ignore[misc]
    assert f.faultCode == 102, f.faultString


@pytest.mark.parametrize("name", [c.method for c in CASES if c.missing])
def test_missing_object(world: Any, name: str) -> None:
    plc, w = world
    api = plc.proxy()
    case = BY_NAME[name]
    args = case.missing(api, w)  # type: ignore[misc]
    if case.missing_code == EMPTY:
        assert getattr(api, name)(*args) == []
    elif case.missing_code == "none":
        assert getattr(api, name)(*args) is None
    else:
        f = _call_fault(api, name, args)
        assert f.faultCode == case.missing_code, f.faultString


def _snapshot(plc: Any) -> list[Any]:
    """Every row of the tables a denied call could have touched."""
    conn = plc.store.connect()
    try:
        out = []
        for t in ("sites", "persons", "person_site", "person_role", "keys", "nodes",
                  "interfaces", "slices", "slice_node", "slice_person", "slice_tag",
                  "node_tag", "tag_types", "tag_type_role", "nodegroups", "leases", "events"):
            out.append(conn.query(f"SELECT * FROM {t} ORDER BY 1"))
        return out
    finally:
        conn.close()


def test_every_core_method_is_covered() -> None:
    core = """AuthCheck BootCheckAuthentication GetSession DeleteSession AddSession GetSessions
    GetSlivers BootGetNodeDetails BootUpdateNode BootNotifyOwners ReportRunlevel GetNodeFlavour
    GetSliceFamily GetSites AddSite UpdateSite DeleteSite AddSiteAddress GetPersons
    AddPerson UpdatePerson DeletePerson AddPersonToSite DeletePersonFromSite SetPersonPrimarySite
    AddRoleToPerson DeleteRoleFromPerson GetRoles GetKeys AddPersonKey UpdateKey DeleteKey
    GetKeyTypes GetNodes AddNode UpdateNode DeleteNode GetNodeTypes GetBootStates GetInterfaces
    AddInterface UpdateInterface DeleteInterface GetInterfaceTags AddInterfaceTag
    GetNetworkMethods GetNetworkTypes GetSlices AddSlice UpdateSlice DeleteSlice AddSliceToNodes
    DeleteSliceFromNodes AddPersonToSlice DeletePersonFromSlice GetSliceTags AddSliceTag
    UpdateSliceTag DeleteSliceTag GetTagTypes AddTagType UpdateTagType DeleteTagType
    AddRoleToTagType GetNodeTags AddNodeTag UpdateNodeTag DeleteNodeTag GetNodeGroups
    AddNodeGroup DeleteNodeGroup GetLeases AddLeases DeleteLeases GetLeaseGranularity""".split()
    assert sorted(set(core) - set(BY_NAME)) == []
