"""Regression tests for differences from ../shared/spec/plcapi.md found by probing a
running server the way legacy clients call it (plcsh, NodeManager, the web UI)."""

from __future__ import annotations

import xmlrpc.client
from typing import Any

import pytest

from tests.plc.world import NODE_KEY, hmac_of


def fault(call: Any, *args: Any) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as exc:
        call(*args)
    return exc.value


def test_getslivers_initscripts_enabled_is_boolean(world: Any) -> None:
    # spec 7: initscripts are InitScript structs, whose `enabled` is a boolean (5.15)
    plc, w = world
    api = plc.proxy()
    api.AddInitScript(w.A.admin, {"name": "is1", "enabled": True, "script": "#!/bin/sh"})
    api.AddInitScript(w.A.admin, {"name": "off", "enabled": False, "script": "#!/bin/sh"})
    scripts = api.GetSlivers(w.A.node)["initscripts"]
    assert scripts == [{"initscript_id": scripts[0]["initscript_id"], "name": "is1",
                        "enabled": True, "script": "#!/bin/sh"}]
    assert scripts[0]["enabled"] is True
    assert scripts == api.GetInitScripts(w.A.admin, {"enabled": True})


def test_node_caller_must_name_itself_in_addslicetag(world: Any) -> None:
    # spec 9.1: a node caller must pass a node argument equal to itself, else 108
    plc, w = world
    api = plc.proxy()
    node = {"AuthMethod": "hmac", "node_id": w.node,
            "value": hmac_of(NODE_KEY, w.slice, "hmac", "secret")}
    f = fault(api.AddSliceTag, node, w.slice, "hmac", "secret")
    assert f.faultCode == 108
    assert api.GetSliceTags(w.A.admin, {"tagname": "hmac"}) == []
    # with itself as the node it is a sliver tag
    tag_id = api.AddSliceTag(w.A.node, w.slice, "hmac", "secret", w.node)
    tag = api.GetSliceTags(w.A.admin, [tag_id], ["node_id", "value"])
    assert tag == [{"node_id": w.node, "value": "secret"}]
    # a slice-wide tag of a node-writable type: the node may not touch it
    wide = api.AddSliceTag(w.A.admin, w.slice, "ssh_key", "k")
    assert fault(api.UpdateSliceTag, w.A.node, wide, "x").faultCode == 108
    assert fault(api.DeleteSliceTag, w.A.node, wide).faultCode == 108
    assert api.UpdateSliceTag(w.A.node, tag_id, "other") == 1
    assert api.DeleteSliceTag(w.A.node, tag_id) == 1


def test_sort_puts_nulls_where_postgresql_does(world: Any) -> None:
    # legacy PLCAPI runs on PostgreSQL: NULL sorts after every value when ascending,
    # before every value when descending
    plc, w = world
    api = plc.proxy()
    api.SetNodeArch(w.A.admin, w.other_node, "x86_64")
    rows = api.GetNodes(w.A.admin, {"-SORT": "arch"}, ["node_id", "arch"])
    archs = [r["arch"] for r in rows]
    assert archs[0] == "x86_64" and archs[-1] is None
    rows = api.GetNodes(w.A.admin, {"-SORT": "-arch"}, ["node_id", "arch"])
    assert rows[0]["arch"] is None and rows[-1]["arch"] == "x86_64"
    rows = api.GetNodes(w.A.admin, {"-SORT": ["+last_contact", "hostname"]},
                        ["hostname", "last_contact"])
    assert [r["hostname"] for r in rows] == sorted(r["hostname"] for r in rows)


def test_missing_role_fault_names_caller_and_roles(world: Any) -> None:
    # spec 2.2: "PasswordAuth: missing role, method X has roles [...] -- caller Y has
    # roles [...]"; SessionAuth: the same text under 108
    plc, w = world
    api = plc.proxy()
    f = fault(api.AddSite, w.A.user, {})
    assert f.faultCode == 103
    assert f.faultString.endswith(
        "PasswordAuth: missing role, method AddSite has roles [admin] -- caller "
        "user@tu.example.org has roles [user]")
    session = {"AuthMethod": "session", "session": api.GetSession(w.A.user)}
    f = fault(api.AddSite, session, {})
    assert f.faultCode == 108
    assert "SessionAuth: missing role, method AddSite has roles [admin] -- caller " \
        "user@tu.example.org has roles [user]" in f.faultString
    assert api.AuthCheck(session) == 1  # session kept


@pytest.mark.parametrize("method, args", [
    ("GetNodes", ({"key": "0123*"},)),
    ("GetNodes", ({"~session": None},)),
    ("GetNodes", ({"-SORT": ["hostname", "-boot_nonce"]},)),
    ("GetWhitelist", ({"key": "0*"},)),
    ("RetrieveSliceSliverKeys", ("tu_one", {"key": "0123*"})),
    ("RetrieveSlicePersonKeys", ("tu_one", {"password": "*"})),
    ("RetrieveSlicePersonKeys", ("tu_one", {">verification_expires": 0})),
])
def test_hidden_fields_are_no_filter_oracle(world: Any, method: str, args: tuple) -> None:
    # spec 4.6: key/session/boot_nonce and password/verification_* are never returned to
    # non-admins; a pattern filter or a sort on them would read them out anyway
    plc, w = world
    api = plc.proxy()
    for auth in (w.A.anon, w.A.user, w.A.node):
        try:
            f = fault(getattr(api, method), auth, *args)
        except pytest.fail.Exception:
            raise AssertionError(f"{method}{args} answered {auth['AuthMethod']}") from None
        assert f.faultCode in (102, 103, 108), f.faultString
    f = fault(getattr(api, method), w.A.user, *args)
    assert f.faultCode == 102 and "Invalid filter field" in f.faultString


def test_hidden_fields_still_filter_for_admins_and_others_for_everyone(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    assert api.GetNodes(w.A.admin, {"key": NODE_KEY[:4] + "*"}, ["node_id"]) == \
        [{"node_id": w.node}]
    assert api.GetPersons(w.A.pi, {"-SORT": "-email", "email": "*@tu.*"}, ["email"])[0] == \
        {"email": "user@tu.example.org"}
    assert api.GetNodes(w.A.anon, {"hostname": "n1*"}, ["hostname"]) == \
        [{"hostname": "n1.tu.example.org"}]


RELEASE = """\
xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx build info
Build build-date: 2013.04.15
Build build-hostname: build.onelab.eu
Build target-arch: x86_64
Build target-distro: f18
xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx svn info
                 build-GITPATH := git://git.onelab.eu/build.git@build-5.2-5
                PLCAPI-GITPATH := git://git.onelab.eu/plcapi.git@plcapi-5.2-6
xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx rpm info
               myplc :: version=5.2 release=5.2013.04.15
# a comment

something else
"""


def test_getplcrelease_parses_the_build_systems_file(plc_store: Any, tmp_path: Any) -> None:
    # spec 6.3: {build, tags, rpms} (+unexpected) from /etc/myplc-release as the build
    # writes it; the test suite reads ['build']['target-arch']
    from tests.plc.conftest import start_server

    path = tmp_path / "myplc-release"
    path.write_text(RELEASE)
    server, thread = start_server(plc_store, release_file=str(path))
    try:
        host, port = server.server_address[:2]
        api = xmlrpc.client.ServerProxy(f"http://{host}:{port}/PLCAPI/", allow_none=True)
        r = api.GetPlcRelease({"AuthMethod": "anonymous"})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert r["build"] == {"build-date": "2013.04.15", "build-hostname": "build.onelab.eu",
                          "target-arch": "x86_64", "target-distro": "f18"}
    assert r["tags"] == {"build-GITPATH ": "git://git.onelab.eu/build.git@build-5.2-5",
                         "PLCAPI-GITPATH ": "git://git.onelab.eu/plcapi.git@plcapi-5.2-6"}
    assert r["rpms"] == {"myplc": "version=5.2 release=5.2013.04.15"}
    assert r["unexpected"] == "something else\n"


def test_node_caller_sees_whitelisted_nodes_of_its_slices(world: Any) -> None:
    # spec 4.6: a whitelisted node is shown if it is at one of the caller's sites or the
    # caller has a slice on the whitelist; a node caller "has" the slices it runs
    plc, w = world
    api = plc.proxy()
    api.AddSliceToNodesWhitelist(w.A.admin, w.slice, [w.other_node])  # tu_one runs on n1
    assert [n["node_id"] for n in api.GetNodes(w.A.node, [w.other_node], ["node_id"])] == \
        [w.other_node]
    assert [n["node_id"] for n in api.GetWhitelist(w.A.node, None, ["node_id"])] == \
        [w.other_node]
    api.DeleteSliceFromNodes(w.A.admin, w.slice, [w.node])
    assert api.GetNodes(w.A.node, [w.other_node], ["node_id"]) == []
    assert api.GetNodes(w.A.anon, [w.other_node], ["node_id"]) == []


@pytest.mark.parametrize("verb", ["GET", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_every_non_post_method_gets_the_page(plc: Any, verb: str) -> None:
    # spec 1.1: GET (any non-POST) returns HTTP 200 with a small HTML page
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(plc.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(verb, "//PLCAPI//")
        r = conn.getresponse()
        body = r.read()
    finally:
        conn.close()
    assert r.status == 200 and r.getheader("Content-Type", "").startswith("text/html")
    assert b"XML-RPC" in body


@pytest.mark.parametrize("method, arg", [("GetAddresses", "address_filter"),
                                         ("GetConfFiles", "conf_file_filter"),
                                         ("GetInitScripts", "initscript_filter"),
                                         ("GetEvents", "event_filter")])
def test_generic_getters_name_their_filter_argument(plc: Any, method: str, arg: str) -> None:
    # legacy argument names show in system.methodHelp and in 102 fault texts
    api = plc.proxy()
    assert api.system.methodHelp(method).startswith(f"{method}(auth, {arg}, return_fields)")
    f = fault(getattr(api, method), plc.admin, 5)
    assert f.faultCode == 102 and f"Invalid {arg} value" in f.faultString


def test_tag_methods_name_their_arguments(plc: Any) -> None:
    api = plc.proxy()
    assert api.system.methodHelp("GetNodeTags").startswith(
        "GetNodeTags(auth, node_tag_filter, return_fields)")
    assert api.system.methodHelp("AddNodeTag").startswith(
        "AddNodeTag(auth, node_id_or_hostname, tag_type_id_or_name, value)")
    assert api.system.methodHelp("UpdateSiteTag").startswith("UpdateSiteTag(auth, site_tag_id, value)")
    f = fault(api.DeletePersonTag, plc.admin, "x")
    assert f.faultCode == 102 and "Invalid person_tag_id value" in f.faultString


def test_upper_case_login_base_is_refused(world: Any) -> None:
    # spec 5.1: login_base only [a-z0-9.] (legacy validate_login_base refuses, it does
    # not lowercase)
    plc, w = world
    api = plc.proxy()
    site = {"name": "Upper", "abbreviated_name": "UP", "login_base": "Upper"}
    f = fault(api.AddSite, w.A.admin, site)
    assert f.faultCode == 102 and "login_base" in f.faultString
    assert api.GetSites(w.A.admin, {"login_base": "up*"}) == []
    assert fault(api.UpdateSite, w.A.admin, w.site, {"login_base": "TU2"}).faultCode == 102
    assert api.GetSites(w.A.admin, [w.site], ["login_base"]) == [{"login_base": "tu"}]
    assert api.AddSite(w.A.admin, {**site, "login_base": "upper.2"}) > 0


@pytest.mark.parametrize("sources, ok", [("", False), ("10.9.9.9", False),
                                         ("10.9.9.9 127.0.0.1", True)])
def test_maintenance_sources_list_the_allowed_clients(plc_store: Any, sources: str,
                                                      ok: bool) -> None:
    # spec 2.2: the client IP must be listed in PLC_API_MAINTENANCE_SOURCES; an empty
    # list admits nobody (it used to admit everybody)
    from tests.plc.conftest import start_server

    server, thread = start_server(plc_store, api_maintenance_password="maint-pw",
                                  api_maintenance_sources=sources)
    try:
        host, port = server.server_address[:2]
        api = xmlrpc.client.ServerProxy(f"http://{host}:{port}/PLCAPI/", allow_none=True)
        auth = {"AuthMethod": "capability", "Username": "maint@localhost.localdomain",
                "AuthString": "maint-pw", "Role": "admin"}
        if ok:
            assert api.AuthCheck(auth) == 1
        else:
            f = fault(api.AuthCheck, auth)
            assert f.faultCode == 103 and "maintenance" in f.faultString
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
