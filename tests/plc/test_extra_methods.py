"""The non-CORE methods (plc/methods/x_*.py), table-driven: for every method a success
(with its effect read back), a wrong role, a wrong type and, where the method names an
object, a missing object. One server for the module, reached through XML-RPC."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import re
import socket
import threading
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest

from plc.api import API
from plc.config import Config
from plc.initdb import initialise
from plc.server import make_server
from plc.store import SQLiteStore

PID = os.getpid()
ADMIN = {"AuthMethod": "password", "Username": f"admin{PID}@example.org", "AuthString": "adm-pw"}
MISSING = 987654321
BAD_AUTH = object()  # bad_type marker: the auth struct itself is of the wrong type
_n = itertools.count(1)


def uniq(prefix: str) -> str:
    return f"{prefix}{PID}x{next(_n)}"


class World:
    """Sites A and B, a PI, a tech and a user at A, a PI at B, nodes with interfaces, a
    nodegroup and a slice; factories make fresh objects for each case."""

    def __init__(self, url: str, spool: Path) -> None:
        self.api: Any = xmlrpc.client.ServerProxy(url, allow_none=True)
        self.spool = spool
        a = self.api
        self.site_a = a.AddSite(ADMIN, {"name": "A", "abbreviated_name": "A",
                                        "login_base": f"xa{PID}", "max_slices": 5})
        self.site_b = a.AddSite(ADMIN, {"name": "B", "abbreviated_name": "B",
                                        "login_base": f"xb{PID}", "max_slices": 5})
        self.auth: dict[str, dict[str, Any]] = {"admin": ADMIN}
        self.person: dict[str, int] = {}
        for role, site in (("pi", self.site_a), ("tech", self.site_a), ("user", self.site_a),
                           ("pi_b", self.site_b)):
            email = f"{role}.{PID}@example.org"
            pid = a.AddPerson(ADMIN, {"first_name": role, "last_name": "X", "email": email,
                                      "password": f"{role}-pw"})
            a.UpdatePerson(ADMIN, pid, {"enabled": True})
            a.AddPersonToSite(ADMIN, pid, site)
            a.AddRoleToPerson(ADMIN, role.split("_")[0], pid)
            self.person[role] = pid
            self.auth[role] = {"AuthMethod": "password", "Username": email,
                               "AuthString": f"{role}-pw"}
        # 127.A.B.1: a loopback address of our own, for RebootNode's UDP packet.
        self.pod_ip = f"127.{(PID >> 8) & 255}.{PID & 255}.1"
        self.node_a = a.AddNode(ADMIN, self.site_a, {"hostname": f"na-{PID}.example.org"})
        self.if_a = a.AddInterface(ADMIN, self.node_a, {"type": "ipv4", "method": "dhcp",
                                                        "ip": self.pod_ip,
                                                        "mac": "02:00:00:00:00:0A"})
        self.node_b = a.AddNode(ADMIN, self.site_b, {"hostname": f"nb-{PID}.example.org"})
        self.if_b = a.AddInterface(ADMIN, self.node_b, {"type": "ipv4", "method": "dhcp"})
        tagname = uniq("grp")
        a.AddTagType(ADMIN, {"tagname": tagname, "category": "node/config"})
        a.AddNodeTag(ADMIN, self.node_a, tagname, "yes")
        self.nodegroup = a.AddNodeGroup(ADMIN, uniq("ng"), tagname, "yes")
        self.slice_name = f"xa{PID}_extra"
        self.slice = a.AddSlice(ADMIN, {"name": self.slice_name, "url": "http://x.org",
                                        "description": "d"})
        a.AddPersonToSlice(ADMIN, self.person["user"], self.slice)
        a.AddSliceToNodes(ADMIN, self.slice, [self.node_a])
        self.user_key = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 user@x"
        a.AddPersonKey(self.auth["user"], self.person["user"],
                       {"key_type": "ssh", "key": self.user_key})
        conf = a.GenerateNodeConfFile(ADMIN, self.node_b, True)
        self.node_b_key = re.search(r'NODE_KEY="([^"]+)"', conf).group(1)  # type: ignore
        self.link_type = uniq("link")
        a.AddTagType(ADMIN, {"tagname": self.link_type, "category": "interface/ilink"})

    # -- factories -----------------------------------------------------------------
    def conf_file(self) -> int:
        return int(self.api.AddConfFile(ADMIN, {"source": "/etc/x", "dest": f"/etc/{uniq('d')}"}))

    def initscript(self) -> int:
        return int(self.api.AddInitScript(ADMIN, {"name": uniq("init"), "script": "#!/bin/sh"}))

    def pcu(self) -> int:
        return int(self.api.AddPCU(ADMIN, self.site_a, {"ip": "10.0.0.9", "model": "m"}))

    def pcu_type(self) -> int:
        return int(self.api.AddPCUType(ADMIN, {"model": uniq("model"), "name": "n"}))

    def protocol_type(self) -> int:
        return int(self.api.AddPCUProtocolType(ADMIN, self.pcu_type(),
                                               {"port": 22, "protocol": "ssh"}))

    def address(self) -> int:
        return int(self.api.AddSiteAddress(ADMIN, self.site_a, {
            "line1": "1 Main St", "city": "C", "state": "S", "postalcode": "1",
            "country": "Z"}))

    def address_type(self) -> int:
        return int(self.api.AddAddressType(ADMIN, {"name": uniq("at")[:20],
                                                   "description": "d"}))

    def message(self) -> str:
        mid = uniq("msg")
        self.api.AddMessage(ADMIN, {"message_id": mid, "subject": "s", "template": "t"})
        return mid

    def ilink(self) -> int:
        tagname = uniq("lt")
        self.api.AddTagType(ADMIN, {"tagname": tagname, "category": "interface/ilink"})
        return int(self.api.AddIlink(ADMIN, self.if_a, self.if_b, tagname, "v"))

    def lookup_value(self, add: str) -> str:
        value = uniq("v")[:20]
        getattr(self.api, add)(ADMIN, value)
        return value

    def new_person(self, enabled: bool) -> tuple[int, str]:
        email = f"{uniq('p')}@example.org"
        pid = self.api.AddPerson(ADMIN, {"first_name": "F", "last_name": "L", "email": email})
        self.api.AddPersonToSite(ADMIN, pid, self.site_a)
        self.api.AddRoleToPerson(ADMIN, "user", pid)
        if enabled:
            self.api.UpdatePerson(ADMIN, pid, {"enabled": True})
        return pid, email

    def spooled(self) -> list[Any]:
        new = self.spool / "new"
        files = sorted(new.iterdir()) if new.exists() else []
        return [message_from_bytes(p.read_bytes(), policy=policy.default) for p in files]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp(f"plc-extra-{PID}")
    store = SQLiteStore(tmp / "plc.db")
    initialise(store, ADMIN["Username"], ADMIN["AuthString"], "pl")
    cfg = Config().replace(api_listen="127.0.0.1:0", db_path=str(store.path),
                           mail_enabled=True, mail_spool_dir=str(tmp / "spool"))
    server = make_server(API(store, cfg), cfg)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield World(f"http://{host}:{port}/PLCAPI/", tmp / "spool")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def fault(w: World, method: str, auth: Any, *args: Any) -> int:
    try:
        result = getattr(w.api, method)(auth, *args)
    except xmlrpc.client.Fault as f:
        return int(f.faultCode)
    pytest.fail(f"{method}{args!r} succeeded ({result!r}); a fault was expected")


Args = Callable[[World], tuple[Any, ...]]


@dataclass
class Case:
    method: str
    ok: Args                                   # arguments of a successful call
    check: Callable[[World, tuple[Any, ...], Any], None]   # (world, args, result)
    bad_type: Args                             # a wrong-typed argument list
    missing: Args | None = None                # naming an object that does not exist
    ok_as: str = "admin"
    denied_as: str | None = "user"             # a caller whose role or site is wrong
    #                                            (None: every role may call it)


def get1(w: World, method: str, ident: Any) -> dict[str, Any]:
    rows = getattr(w.api, method)(ADMIN, [ident])
    assert len(rows) == 1, rows
    return dict(rows[0])


def gone(w: World, method: str, ident: Any) -> None:
    assert getattr(w.api, method)(ADMIN, [ident]) == []


def _conf_file_checks() -> list[Case]:
    def add_ok(w: World) -> tuple[Any, ...]:
        return ({"source": "/etc/s", "dest": f"/etc/{uniq('dst')}", "file_owner": "nobody",
                 "always_update": True, "unknown_key": 1},)

    def add_check(w: World, args: tuple[Any, ...], cid: Any) -> None:
        row = get1(w, "GetConfFiles", cid)
        assert (row["source"], row["dest"], row["file_owner"]) == \
            ("/etc/s", args[0]["dest"], "nobody")
        assert row["always_update"] is True and row["enabled"] is True
        assert row["file_permissions"] == "0644" and row["node_ids"] == []

    return [
        Case("AddConfFile", add_ok, add_check, lambda w: ({"source": 5, "dest": "/x"},)),
        Case("UpdateConfFile", lambda w: (w.conf_file(), {"dest": "/etc/new", "enabled": False}),
             lambda w, a, r: (get1(w, "GetConfFiles", a[0])["dest"] == "/etc/new" and
                              get1(w, "GetConfFiles", a[0])["enabled"] is False) or
             pytest.fail("not updated"),
             lambda w: ("1", {}), lambda w: (MISSING, {"dest": "/x"})),
        Case("DeleteConfFile", lambda w: (w.conf_file(),),
             lambda w, a, r: gone(w, "GetConfFiles", a[0]),
             lambda w: ("x",), lambda w: (MISSING,)),
        Case("AddConfFileToNode", lambda w: (w.conf_file(), w.node_a),
             lambda w, a, r: get1(w, "GetConfFiles", a[0])["node_ids"] == [w.node_a] or
             pytest.fail("not bound"),
             lambda w: (w.conf_file(), 1.5), lambda w: (w.conf_file(), MISSING)),
        Case("DeleteConfFileFromNode", _bound_conf(node=True),
             lambda w, a, r: get1(w, "GetConfFiles", a[0])["node_ids"] == [] or
             pytest.fail("still bound"),
             lambda w: (w.conf_file(), [1]), lambda w: (MISSING, w.node_a)),
        Case("AddConfFileToNodeGroup", lambda w: (w.conf_file(), w.nodegroup),
             lambda w, a, r: get1(w, "GetConfFiles", a[0])["nodegroup_ids"] == [w.nodegroup]
             or pytest.fail("not bound"),
             lambda w: (w.conf_file(), None), lambda w: (w.conf_file(), MISSING)),
        Case("DeleteConfFileFromNodeGroup", _bound_conf(node=False),
             lambda w, a, r: get1(w, "GetConfFiles", a[0])["nodegroup_ids"] == [] or
             pytest.fail("still bound"),
             lambda w: ({}, w.nodegroup), lambda w: (w.conf_file(), MISSING)),
        Case("GetConfFiles", lambda w: ([w.conf_file()],),
             lambda w, a, r: [x["conf_file_id"] for x in r] == a[0] or pytest.fail(r),
             lambda w: (1.5,), None, denied_as="user"),
    ]


def _bound_conf(node: bool) -> Args:
    def make(w: World) -> tuple[Any, ...]:
        cid = w.conf_file()
        if node:
            w.api.AddConfFileToNode(ADMIN, cid, w.node_a)
            return (cid, w.node_a)
        w.api.AddConfFileToNodeGroup(ADMIN, cid, w.nodegroup)
        return (cid, w.nodegroup)
    return make


def expect(cond: bool, what: str = "") -> None:
    assert cond, what


CASES: list[Case] = _conf_file_checks() + [
    # -- init scripts
    Case("AddInitScript", lambda w: ({"name": uniq("is"), "script": "echo hi", "x": 1},),
         lambda w, a, r: expect(get1(w, "GetInitScripts", r)["script"] == "echo hi"),
         lambda w: ({"name": 7},)),
    Case("UpdateInitScript", lambda w: (w.initscript(), {"enabled": False, "script": "new"}),
         lambda w, a, r: expect(get1(w, "GetInitScripts", a[0])["enabled"] is False),
         lambda w: (w.initscript(), {"enabled": "no"}), lambda w: (MISSING, {"script": "x"})),
    Case("DeleteInitScript", lambda w: (w.initscript(),),
         lambda w, a, r: gone(w, "GetInitScripts", a[0]),
         lambda w: (1.5,), lambda w: ("no-such-script",)),
    Case("GetInitScripts", lambda w: ([w.initscript()],),
         lambda w, a, r: expect([x["initscript_id"] for x in r] == a[0]),
         lambda w: (1.5,), ok_as="user", denied_as="anonymous"),
    # -- lookup tables and roles
    *[Case(f"Add{kind}", lambda w: (uniq("v")[:20],),
           lambda w, a, r, get=get: expect(a[0] in getattr(w.api, get)(ADMIN)),
           lambda w: (5,))
      for kind, get in (("BootState", "GetBootStates"), ("KeyType", "GetKeyTypes"),
                        ("NodeType", "GetNodeTypes"), ("NetworkMethod", "GetNetworkMethods"),
                        ("NetworkType", "GetNetworkTypes"),
                        ("SliceInstantiation", "GetSliceInstantiations"))],
    *[Case(f"Delete{kind}", lambda w, kind=kind: (w.lookup_value(f"Add{kind}"),),
           lambda w, a, r, get=get: expect(a[0] not in getattr(w.api, get)(ADMIN)),
           lambda w: ([],), lambda w: ("no-such-value",))
      for kind, get in (("BootState", "GetBootStates"), ("KeyType", "GetKeyTypes"),
                        ("NodeType", "GetNodeTypes"), ("NetworkMethod", "GetNetworkMethods"),
                        ("NetworkType", "GetNetworkTypes"),
                        ("SliceInstantiation", "GetSliceInstantiations"))],
    Case("AddRole", lambda w: (1000 + next(_n), uniq("role")),
         lambda w, a, r: expect({"role_id": a[0], "name": a[1]} in w.api.GetRoles(ADMIN)),
         lambda w: ("1000", "x")),
    Case("DeleteRole", lambda w: (_new_role(w),),
         lambda w, a, r: expect(a[0] not in [x["role_id"] for x in w.api.GetRoles(ADMIN)]),
         lambda w: (1.5,), lambda w: (MISSING,)),
    # -- messages
    Case("AddMessage", lambda w: ({"message_id": uniq("m"), "subject": "S", "template": "T"},),
         lambda w, a, r: expect(get1(w, "GetMessages", a[0]["message_id"])["template"] == "T"),
         lambda w: ({"message_id": 1},)),
    Case("UpdateMessage", lambda w: (w.message(), {"template": "new", "enabled": False}),
         lambda w, a, r: expect(get1(w, "GetMessages", a[0])["enabled"] is False),
         lambda w: (1, {}), lambda w: ("no-such-message", {"template": "x"})),
    Case("DeleteMessage", lambda w: (w.message(),),
         lambda w, a, r: gone(w, "GetMessages", a[0]), lambda w: (5,),
         lambda w: ("no-such-message",)),
    Case("GetMessages", lambda w: ([w.message()],),
         lambda w, a, r: expect([x["message_id"] for x in r] == a[0]),
         lambda w: (1.5,), denied_as="pi"),
    # -- PCU types and protocol types
    Case("AddPCUType", lambda w: ({"model": uniq("mod"), "name": "Name"},),
         lambda w, a, r: expect(get1(w, "GetPCUTypes", r)["model"] == a[0]["model"]),
         lambda w: ({"model": 5},)),
    Case("UpdatePCUType", lambda w: (w.pcu_type(), {"name": "renamed"}),
         lambda w, a, r: expect(get1(w, "GetPCUTypes", a[0])["name"] == "renamed"),
         lambda w: ("x", {}), lambda w: (MISSING, {"name": "x"})),
    Case("DeletePCUType", lambda w: (w.pcu_type(),),
         lambda w, a, r: gone(w, "GetPCUTypes", a[0]), lambda w: ([],), lambda w: (MISSING,)),
    Case("GetPCUTypes", lambda w: ([w.pcu_type()],),
         lambda w, a, r: expect([x["pcu_type_id"] for x in r] == a[0]),
         lambda w: (1.5,), ok_as="user", denied_as="anonymous"),
    Case("AddPCUProtocolType", lambda w: (w.pcu_type(), {"port": 80, "protocol": "http"}),
         lambda w, a, r: expect(get1(w, "GetPCUProtocolTypes", r)["pcu_type_id"] == a[0]),
         lambda w: (w.pcu_type(), {"port": "80"}),
         lambda w: (MISSING, {"port": 1, "protocol": "p"})),
    Case("UpdatePCUProtocolType", lambda w: (w.protocol_type(), {"supported": False}),
         lambda w, a, r: expect(get1(w, "GetPCUProtocolTypes", a[0])["supported"] is False),
         lambda w: (w.protocol_type(), {"port": 1.5}), lambda w: (MISSING, {"port": 2})),
    Case("DeletePCUProtocolType", lambda w: (w.protocol_type(),),
         lambda w, a, r: gone(w, "GetPCUProtocolTypes", a[0]),
         lambda w: ("x",), lambda w: (MISSING,)),
    Case("GetPCUProtocolTypes", lambda w: ([w.protocol_type()],),
         lambda w, a, r: expect([x["pcu_protocol_type_id"] for x in r] == a[0]),
         lambda w: (1.5,), ok_as="tech", denied_as="anonymous"),
    # -- PCUs (site scoped: the PI of site B is refused at site A)
    Case("AddPCU", lambda w: (w.site_a, {"ip": "10.1.1.1", "hostname": "pcu.example.org",
                                         "password": "pw"}),
         lambda w, a, r: expect(get1(w, "GetPCUs", r)["hostname"] == "pcu.example.org"),
         lambda w: (w.site_a, {"ip": 10}), lambda w: (MISSING, {"ip": "10.1.1.1"}),
         ok_as="tech", denied_as="pi_b"),
    Case("UpdatePCU", lambda w: (w.pcu(), {"notes": "rack 3"}),
         lambda w, a, r: expect(get1(w, "GetPCUs", a[0])["notes"] == "rack 3"),
         lambda w: (w.pcu(), {"notes": 3}), lambda w: (MISSING, {"notes": "x"}),
         ok_as="pi", denied_as="pi_b"),
    Case("DeletePCU", lambda w: (w.pcu(),), lambda w, a, r: gone(w, "GetPCUs", a[0]),
         lambda w: ("1",), lambda w: (MISSING,), ok_as="pi", denied_as="pi_b"),
    Case("AddNodeToPCU", lambda w: (w.node_a, w.pcu(), 1),
         lambda w, a, r: expect(get1(w, "GetPCUs", a[1])["node_ids"] == [w.node_a] and
                                get1(w, "GetPCUs", a[1])["ports"] == [1]),
         lambda w: (w.node_a, w.pcu(), "1"), lambda w: (MISSING, w.pcu(), 1),
         ok_as="tech", denied_as="pi_b"),
    Case("DeleteNodeFromPCU", lambda w: _pcu_with_node(w),
         lambda w, a, r: expect(get1(w, "GetPCUs", a[1])["node_ids"] == []),
         lambda w: (w.node_a, "x"), lambda w: (w.node_a, MISSING), ok_as="pi",
         denied_as="pi_b"),
    Case("GetPCUs", lambda w: ([w.pcu()],),
         lambda w, a, r: expect([x["pcu_id"] for x in r] == a[0]),
         lambda w: (1.5,), ok_as="tech", denied_as="user"),
    # -- addresses and address types
    Case("UpdateAddress", lambda w: (w.address(), {"city": "Paris"}),
         lambda w, a, r: expect(get1(w, "GetAddresses", a[0])["city"] == "Paris"),
         lambda w: (w.address(), {"city": 5}), lambda w: (MISSING, {"city": "x"}),
         ok_as="pi", denied_as="pi_b"),
    Case("DeleteAddress", lambda w: (w.address(),), lambda w, a, r: gone(w, "GetAddresses", a[0]),
         lambda w: ("1",), lambda w: (MISSING,), ok_as="pi", denied_as="pi_b"),
    Case("GetAddresses", lambda w: ([w.address()],),
         lambda w, a, r: expect([x["address_id"] for x in r] == a[0]),
         lambda w: (1.5,), ok_as="user", denied_as="anonymous"),
    Case("AddAddressType", lambda w: ({"name": uniq("t")[:20], "description": "D"},),
         lambda w, a, r: expect(get1(w, "GetAddressTypes", r)["name"] == a[0]["name"]),
         lambda w: ({"name": 1},)),
    Case("UpdateAddressType", lambda w: (w.address_type(), {"description": "new"}),
         lambda w, a, r: expect(get1(w, "GetAddressTypes", a[0])["description"] == "new"),
         lambda w: (1.5, {}), lambda w: (MISSING, {"description": "x"})),
    Case("DeleteAddressType", lambda w: (w.address_type(),),
         lambda w, a, r: gone(w, "GetAddressTypes", a[0]), lambda w: (1.5,),
         lambda w: ("no-such-type",)),
    Case("GetAddressTypes", lambda w: ([w.address_type()],),
         lambda w, a, r: expect([x["address_type_id"] for x in r] == a[0]),
         lambda w: (1.5,), ok_as="user", denied_as="anonymous"),
    Case("AddAddressTypeToAddress", lambda w: (w.address_type(), w.address()),
         lambda w, a, r: expect(get1(w, "GetAddresses", a[1])["address_type_ids"] == [a[0]]),
         lambda w: (w.address_type(), "x"), lambda w: (w.address_type(), MISSING),
         ok_as="pi", denied_as="pi_b"),
    Case("DeleteAddressTypeFromAddress", lambda w: _typed_address(w),
         lambda w, a, r: expect(get1(w, "GetAddresses", a[1])["address_type_ids"] == []),
         lambda w: (1.5, w.address()), lambda w: (MISSING, w.address()),
         ok_as="pi", denied_as="pi_b"),
    # -- ilinks
    Case("AddIlink", lambda w: (w.if_b, w.if_a, w.link_type, "10Mbps"),
         lambda w, a, r: expect(get1(w, "GetIlinks", r)["value"] == "10Mbps"),
         lambda w: (w.if_a, w.if_b, w.link_type, 10), lambda w: (MISSING, w.if_b, w.link_type,
                                                                 "v"), denied_as="pi"),
    Case("UpdateIlink", lambda w: (w.ilink(), "new"),
         lambda w, a, r: expect(get1(w, "GetIlinks", a[0])["value"] == "new"),
         lambda w: (w.ilink(), 5), lambda w: (MISSING, "v"), denied_as="pi"),
    Case("DeleteIlink", lambda w: (w.ilink(),), lambda w, a, r: gone(w, "GetIlinks", a[0]),
         lambda w: ("1",), lambda w: (MISSING,), denied_as="pi"),
    Case("GetIlinks", lambda w: ([w.ilink()],),
         lambda w, a, r: expect([x["ilink_id"] for x in r] == a[0]),
         lambda w: (1.5,), ok_as="user", denied_as="tech"),
    # -- mail
    Case("NotifyPersons", lambda w: ([w.person["pi"], w.person["tech"]], "Subj ✓", "Body"),
         lambda w, a, r: _mailed(w, "Subj ✓", {f"pi.{PID}@example.org",
                                              f"tech.{PID}@example.org"}),
         lambda w: ([w.person["pi"]], 5, "b"), lambda w: ([MISSING], "s", "b"),
         denied_as="pi"),
    Case("NotifySupport", lambda w: ("Support subject", "Body"),
         lambda w, a, r: _mailed(w, "Support subject", {"root@localhost"}),
         lambda w: ("s", ["b"]), denied_as="pi"),
    Case("ResetPassword", lambda w: (w.person["tech"],),
         lambda w, a, r: _mailed(w, None, {f"tech.{PID}@example.org"}, contains="key="),
         lambda w: (1.5,), lambda w: (MISSING,), denied_as="pi"),
    Case("VerifyPerson", lambda w: (w.new_person(enabled=False)[0],),
         lambda w, a, r: _mailed(w, None, None, contains="register.php"),
         lambda w: ({},), lambda w: ("nobody@nowhere.example.org",), denied_as="pi"),
    # -- node management
    Case("GenerateNodeConfFile", lambda w: (w.node_a, False),
         lambda w, a, r: _conf_text(w, r),
         lambda w: (w.node_a, "yes"), lambda w: (MISSING,), ok_as="tech", denied_as="pi_b"),
    Case("GetBootMedium", lambda w: (w.node_a, "node-preview", ""),
         lambda w, a, r: _conf_text(w, r),
         lambda w: (w.node_a, 5, ""), lambda w: (MISSING, "node-preview", ""),
         ok_as="pi", denied_as="pi_b"),
    Case("RebootNode", lambda w: _booted(w),
         lambda w, a, r: expect(w.api.GetEvents(ADMIN, {"call_name": "RebootNode"})[-1]
                                ["object_ids"] == [w.node_a]),
         lambda w: (1.5,), lambda w: (MISSING,), ok_as="tech", denied_as="pi_b"),
    Case("GetWhitelist", lambda w: (_whitelisted(w),),
         lambda w, a, r: expect([n["node_id"] for n in r] == a[0] and "key" in r[0]),
         lambda w: (1.5,), denied_as=None),
    # -- slices
    Case("GetSliceKeys", lambda w: ([w.slice],),
         lambda w, a, r: expect(r == [{"slice_id": w.slice, "name": w.slice_name,
                                       "person_id": w.person["user"],
                                       "email": f"user.{PID}@example.org",
                                       "key": w.user_key}]),
         lambda w: (1.5,), ok_as="user", denied_as="tech"),
    Case("ResolveSlices", lambda w: ([w.slice_name],),
         lambda w, a, r: expect(r == [{"slice_id": w.slice, "name": w.slice_name,
                                       "expires": r[0]["expires"]}]),
         lambda w: (1.5,), ok_as="tech", denied_as="node"),
    Case("RetrieveSlicePersonKeys", lambda w: (w.slice,),
         lambda w, a, r: expect(r == {f"user.{PID}@example.org": [w.user_key]}),
         lambda w: (1.5,), lambda w: (MISSING,), ok_as="user", denied_as="node"),
    Case("RetrieveSliceSliverKeys", lambda w: (w.slice_name,),
         lambda w, a, r: expect(r == {}),  # no sliver published an ssh_key yet
         lambda w: ([],), lambda w: ("nosuch_slice",), ok_as="pi", denied_as="node"),
    # -- peers
    Case("GetPeers", lambda w: (None,), lambda w, a, r: expect(r == []),
         lambda w: (1.5,), ok_as="user", denied_as="tech"),
    Case("GetPeerName", lambda w: (), lambda w, a, r: expect(isinstance(r, str) and bool(r)),
         lambda w: (BAD_AUTH,), denied_as="pi"),
]


def _new_role(w: World) -> int:
    rid = 2000 + next(_n)
    w.api.AddRole(ADMIN, rid, uniq("r"))
    return rid


def _booted(w: World) -> tuple[Any, ...]:
    """node_a with a node session, as after a successful boot (GetSession over HMAC)."""
    text = w.api.GenerateNodeConfFile(ADMIN, w.node_a, True)
    key = re.search(r'NODE_KEY="([^"]+)"', text).group(1)  # type: ignore[union-attr]
    value = hmac.new(key.encode(), b"[]", hashlib.sha1).hexdigest()
    w.api.GetSession({"AuthMethod": "hmac", "node_id": w.node_a, "value": value})
    return (w.node_a,)


def _pcu_with_node(w: World) -> tuple[Any, ...]:
    pcu = w.pcu()
    w.api.AddNodeToPCU(ADMIN, w.node_a, pcu, 7)
    return (w.node_a, pcu)


def _typed_address(w: World) -> tuple[Any, ...]:
    at, addr = w.address_type(), w.address()
    w.api.AddAddressTypeToAddress(ADMIN, at, addr)
    return (at, addr)


def _whitelisted(w: World) -> list[int]:
    w.api.AddSliceToNodesWhitelist(ADMIN, w.slice, [w.node_b])
    return [w.node_b]


def _conf_text(w: World, text: str) -> None:
    assert f'NODE_ID="{w.node_a}"' in text
    assert re.search(r'^NODE_KEY="[A-Za-z0-9+/]{40,}"$', text, re.M), text
    assert 'IP_METHOD="dhcp"' in text and 'NET_DEVICE="02:00:00:00:00:0a"' in text
    assert f'HOST_NAME="na-{PID}"' in text and 'DOMAIN_NAME="example.org"' in text


def _mailed(w: World, subject: str | None, to: set[str] | None, contains: str = "") -> None:
    msg = w.spooled()[-1]
    if subject is not None:
        assert msg["Subject"] == subject
    if to is not None:
        assert {a.strip() for a in str(msg["To"]).split(",")} == to
    assert contains in msg.get_content()


IDS = [c.method for c in CASES]


def _auth(w: World, who: str, args: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Auth struct of ``who``: a person, "anonymous", or "node" (HMAC over ``args``)."""
    if who == "anonymous":
        return {"AuthMethod": "anonymous"}
    if who == "node":
        msg = "[" + "".join(sorted(_flatten(list(args)))) + "]"
        return {"AuthMethod": "hmac", "node_id": w.node_b,
                "value": hmac.new(w.node_b_key.encode(), msg.encode(), hashlib.sha1).hexdigest()}
    return w.auth[who]


def _flatten(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [s for v in value for s in _flatten(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _flatten(v)]
    return [str(value)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_success(world: World, case: Case) -> None:
    args = case.ok(world)
    result = getattr(world.api, case.method)(_auth(world, case.ok_as), *args)
    case.check(world, args, result)


@pytest.mark.parametrize("case", [c for c in CASES if c.denied_as],
                         ids=[c.method for c in CASES if c.denied_as])
def test_wrong_role(world: World, case: Case) -> None:
    assert case.denied_as is not None
    args = case.ok(world)
    assert fault(world, case.method, _auth(world, case.denied_as, args), *args) in (103, 108)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_wrong_type(world: World, case: Case) -> None:
    args = case.bad_type(world)
    if args and args[0] is BAD_AUTH:
        assert fault(world, case.method, "not a struct", *args[1:]) == 102
        return
    assert fault(world, case.method, _auth(world, case.ok_as), *args) == 102


@pytest.mark.parametrize("case", [c for c in CASES if c.missing], ids=[c.method for c in CASES
                                                                       if c.missing])
def test_missing_object(world: World, case: Case) -> None:
    assert case.missing is not None
    assert fault(world, case.method, _auth(world, case.ok_as), *case.missing(world)) == 102


def test_every_extra_method_has_a_case() -> None:
    import plc.methods  # noqa: F401
    from plc.method import METHODS

    mine = {n for n, m in METHODS.items() if m.func.__module__.startswith("plc.methods.x_")}
    mine |= {n for n in ("GetConfFiles", "GetInitScripts", "GetMessages", "GetPCUTypes",
                         "GetPCUProtocolTypes", "GetAddresses", "GetAddressTypes", "GetIlinks")
             if n in METHODS}
    # Covered by their own tests: RebootNodeWithPCU (cannot succeed here, no PCU control:
    # test_reboot_with_pcu), GetSliceTicket and GetTicketKey (need a signing key:
    # tests/plc/test_plc_tickets.py).
    assert mine - set(IDS) == {"RebootNodeWithPCU", "GetSliceTicket", "GetTicketKey"}


def test_reboot_node_sends_the_session_to_port_64000(world: World) -> None:
    w = world
    pid_node = w.api.AddNode(ADMIN, w.site_a, {"hostname": f"{uniq('nn')}.example.org"})
    assert fault(w, "RebootNode", ADMIN, pid_node) == 102  # never booted: no session
    _booted(w)
    session = w.api.GetNodes(ADMIN, [w.node_a], ["session"])[0]["session"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((w.pod_ip, 64000))
        sock.settimeout(10)
        assert w.api.RebootNode(w.auth["tech"], w.node_a) == 1
        data, _ = sock.recvfrom(4096)
    assert data.decode() == session
    events = w.api.GetEvents(ADMIN, {"call_name": "RebootNode"})
    assert events and events[-1]["object_ids"] == [w.node_a]


def test_generate_node_conf_file_regenerates_the_key(world: World) -> None:
    w = world
    k1 = re.search(r'NODE_KEY="([^"]+)"', w.api.GenerateNodeConfFile(ADMIN, w.node_a))
    k2 = re.search(r'NODE_KEY="([^"]+)"', w.api.GenerateNodeConfFile(ADMIN, w.node_a, False))
    k3 = re.search(r'NODE_KEY="([^"]+)"', w.api.GenerateNodeConfFile(ADMIN, w.node_a, True))
    assert k1 and k2 and k3
    assert k1.group(1) == k2.group(1) != k3.group(1)
    assert "=" not in k3.group(1)


def test_boot_medium_actions(world: World) -> None:
    w = world
    assert fault(w, "GetBootMedium", ADMIN, w.node_a, "node-iso", "") == 109
    assert fault(w, "GetBootMedium", ADMIN, w.node_a, "explode", "") == 102
    assert fault(w, "GetBootMedium", ADMIN, w.node_a, "node-floppy", "/etc/passwd") == 102


def test_reboot_with_pcu(world: World) -> None:
    w = world
    assert fault(w, "RebootNodeWithPCU", ADMIN, w.node_b) == 102  # no PCU
    _pcu_with_node(w)
    assert fault(w, "RebootNodeWithPCU", w.auth["tech"], w.node_a) == 109
    assert fault(w, "RebootNodeWithPCU", w.auth["pi_b"], w.node_a) == 108
    assert fault(w, "RebootNodeWithPCU", w.auth["user"], w.node_a) == 103  # wrong role
    assert fault(w, "RebootNodeWithPCU", ADMIN, 1.5) == 102  # wrong type
    assert fault(w, "RebootNodeWithPCU", ADMIN, "nosuch.example.org") == 102  # missing


def test_reset_password_and_verify_person_with_keys(world: World, tmp_path: Path) -> None:
    w = world
    pid, email = w.new_person(enabled=True)
    assert w.api.ResetPassword(ADMIN, email) == 1
    key = re.search(r"key=([0-9a-f]+)", w.spooled()[-1].get_content()).group(1)  # type: ignore
    assert fault(w, "ResetPassword", ADMIN, pid, "wrong-key") == 102
    assert w.api.ResetPassword(ADMIN, pid, key) == 1
    password = w.spooled()[-1].get_content().split("reset to")[1].split()[0]
    assert w.api.AuthCheck({"AuthMethod": "password", "Username": email,
                            "AuthString": password}) == 1
    assert fault(w, "ResetPassword", ADMIN, pid, key) == 102  # used up
    # VerifyPerson: the key, then the PIs of the person's site are told.
    pid2, email2 = w.new_person(enabled=False)
    assert fault(w, "VerifyPerson", ADMIN, pid, None) == 102  # already enabled
    assert fault(w, "ResetPassword", ADMIN, pid2) == 102  # not enabled
    assert w.api.VerifyPerson(ADMIN, pid2, None, None) == 1
    key2 = re.search(r"key=([0-9a-f]+)", w.spooled()[-1].get_content()).group(1)  # type: ignore
    assert w.api.VerifyPerson(ADMIN, email2, key2) == 1
    last = w.spooled()[-1]
    assert str(last["To"]) == f"pi.{PID}@example.org" and "verified" in str(last["Subject"])
    # An expiry in the past is refused; nothing is mailed for a fault.
    before = len(w.spooled())
    assert fault(w, "VerifyPerson", ADMIN, pid2, None, 1000) == 102
    assert len(w.spooled()) == before


def test_lookup_value_in_use_is_not_deleted(world: World) -> None:
    w = world
    assert fault(w, "DeleteNodeType", ADMIN, "regular") == 102
    assert "regular" in w.api.GetNodeTypes(ADMIN)
    value = w.lookup_value("AddBootState")
    assert fault(w, "AddBootState", ADMIN, value) == 102  # duplicate


def test_pcu_rules(world: World) -> None:
    w = world
    pcu = w.pcu()
    w.api.AddNodeToPCU(ADMIN, w.node_a, pcu, 1)
    assert fault(w, "AddNodeToPCU", ADMIN, w.node_a, pcu, 2) == 102  # already on it
    assert fault(w, "AddNodeToPCU", ADMIN, w.node_b, pcu, 3) == 102  # other site
    assert fault(w, "AddPCU", ADMIN, w.site_a, {"ip": "not-an-ip"}) == 102
    # The PI of site B sees no PCU of site A.
    assert w.api.GetPCUs(w.auth["pi_b"], [pcu]) == []
    assert w.api.GetPCUs(w.auth["pi"], [pcu])[0]["pcu_id"] == pcu
