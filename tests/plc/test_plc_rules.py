"""Object rules of spec 5: names, uniqueness among live rows, soft deletes, max_slices,
renewal limits; debug-mode events; GetPlcRelease."""

from __future__ import annotations

import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest

from tests.plc.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, start_server

WEEK = 7 * 86400


def code(fn: Any, *args: Any) -> int:
    try:
        fn(*args)
    except xmlrpc.client.Fault as f:
        return f.faultCode
    return 0


def test_name_rules(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    a = w.A
    site = {"name": "S", "abbreviated_name": "S"}
    assert code(api.AddSite, a.admin, {**site, "login_base": "Bad_Base"}) == 102
    assert code(api.AddSite, a.admin, {**site, "login_base": "tu"}) == 102  # in use
    assert code(api.AddSite, a.admin, {**site, "login_base": "ok", "latitude": 1.5}) == 102
    assert code(api.AddSite, a.admin, {**site, "login_base": "ok", "latitude": 91.0,
                                       "longitude": 0.0}) == 102
    for bad in ("nodot", "-x.example.org", "a..example.org", "x.example.toolongtld"):
        assert code(api.AddNode, a.admin, w.site, {"hostname": bad}) == 102, bad
    assert code(api.AddNode, a.admin, w.site, {"hostname": "n1.tu.example.org"}) == 102
    person = {"first_name": "F", "last_name": "L"}
    assert code(api.AddPerson, a.admin, {**person, "email": "not-an-email"}) == 102
    assert code(api.AddPerson, a.admin, {**person, "email": "PI@tu.example.org"}) == 102
    for bad in ("tu", "tu-x_y", "TU_x", "nosite_x", "tu_one"):
        assert code(api.AddSlice, a.admin, {"name": bad}) == 102, bad
    # field bounds are UTF-8 bytes: 64 bytes max for a slice name
    assert code(api.AddSlice, a.admin, {"name": "tu_" + "é" * 31}) == 102
    assert code(api.AddSlice, a.admin, {"name": "tu_" + "x" * 61}) == 0


def test_soft_delete_frees_names_and_keeps_rows(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    a = w.A
    api.DeleteNode(a.admin, w.node)
    api.DeleteSlice(a.admin, w.slice)
    api.DeletePerson(a.admin, w.user)
    new_node = api.AddNode(a.admin, w.site, {"hostname": "n1.tu.example.org"})
    assert new_node != w.node
    assert api.AddSlice(a.admin, {"name": "tu_one"}) != w.slice
    assert api.AddPerson(a.admin, {"first_name": "U", "last_name": "T",
                                   "email": "user@tu.example.org"}) != w.user
    conn = plc.store.connect()
    try:
        assert conn.scalar("SELECT deleted FROM nodes WHERE node_id = ?", [w.node]) == 1
        assert conn.scalar("SELECT COUNT(*) FROM slices WHERE name = 'tu_one'") == 2
    finally:
        conn.close()


def test_max_slices_and_renewal(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    a = w.A
    now = int(time.time())
    api.UpdateSite(a.admin, w.site, {"max_slices": 2})
    api.AddSlice(a.pi, {"name": "tu_two"})
    f = code(api.AddSlice, a.pi, {"name": "tu_three"})
    assert f == 102  # 2 slices: the maximum
    # renewal rules (spec 6.3 UpdateSlice)
    assert code(api.UpdateSlice, a.user, w.slice, {"expires": now + 9 * WEEK}) == 102
    assert code(api.UpdateSlice, a.user, w.slice, {"expires": now - 10}) == 102
    assert code(api.UpdateSlice, a.user, "tu_two", {"expires": now + 3 * WEEK}) == 108
    assert code(api.UpdateSlice, a.pi, "tu_two", {"expires": now + 3 * WEEK}) == 102  # no url
    assert api.UpdateSlice(a.pi, "tu_two", {"expires": now + 3 * WEEK, "url": "http://x/",
                                            "description": "d"}) == 1
    assert api.UpdateSlice(a.admin, w.slice, {"expires": now + 20 * WEEK}) == 1
    api.UpdateSite(a.admin, w.site, {"max_slices": 0})
    assert code(api.UpdateSlice, a.admin, w.slice, {"expires": now + 21 * WEEK}) == 102
    assert code(api.UpdateSlice, a.user, w.slice, {"max_nodes": 5}) == 102
    assert code(api.UpdateSlice, a.user, w.slice, {"name": "tu_renamed"}) == 102
    # a disabled site cannot create slices
    api.UpdateSite(a.admin, w.site, {"max_slices": 10, "enabled": False})
    assert code(api.AddSlice, a.admin, {"name": "tu_four"}) == 102


def test_expired_slices_are_invisible_then_deleted(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    conn = plc.store.connect()
    try:
        conn.execute("UPDATE slices SET expires = 1 WHERE slice_id = ?", [w.slice])
    finally:
        conn.close()
    assert api.GetSlices(w.A.admin, w.slice) == []
    assert code(api.UpdateSlice, w.A.admin, w.slice, {}) == 102
    api.AddSlice(w.A.admin, {"name": "tu_next"})
    conn = plc.store.connect()
    try:
        assert conn.scalar("SELECT deleted FROM slices WHERE slice_id = ?", [w.slice]) == 1
    finally:
        conn.close()


def test_pi_role_limits(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    a = w.A
    assert code(api.AddRoleToPerson, a.pi, "admin", w.user) == 102
    assert code(api.AddRoleToPerson, a.pi, "pi", w.user) == 102
    assert api.AddRoleToPerson(a.pi, "node", w.user) == 1  # [quirk] node(50) > pi(20)
    assert code(api.DeleteRoleFromPerson, a.pi, "pi", w.pi) == 108
    assert code(api.UpdatePerson, a.pi, w.other_pi, {"title": "x"}) == 108


def test_debug_mode_records_faults(plc_store: Any) -> None:
    server, thread = start_server(plc_store, api_debug=True)
    host, port = server.server_address[:2]
    try:
        api = xmlrpc.client.ServerProxy(f"http://{host}:{port}/PLCAPI/", allow_none=True)
        admin = {"AuthMethod": "password", "Username": ADMIN_EMAIL,
                 "AuthString": ADMIN_PASSWORD}
        assert code(api.AddSite, admin, {"name": "x"}) == 102
        api.GetRoles(admin)
        events = api.GetEvents(admin, {"call_name": ["AddSite", "GetRoles"]},
                               ["call_name", "fault_code", "message", "call"])
        assert [(e["call_name"], e["fault_code"]) for e in events] == [("AddSite", 102),
                                                                        ("GetRoles", 0)]
        assert "Site abbreviated_name must be specified" in events[0]["message"]
        assert ADMIN_PASSWORD not in events[0]["call"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_plc_release(plc_store: Any, tmp_path: Path) -> None:
    release = tmp_path / "myplc-release"
    # the build system's format (legacy build/Makefile target myplc-release)
    release.write_text("xxxxxxxxxx build info\nBuild target-arch: x86_64\n"
                       "Build build-date: 2026\nxxxxxxxxxx svn info\nPLCAPI:= 7.1\n")
    for path, expect in ((str(tmp_path / "none"), 109), (str(release), 0)):
        server, thread = start_server(plc_store, release_file=path)
        host, port = server.server_address[:2]
        try:
            api = xmlrpc.client.ServerProxy(f"http://{host}:{port}/PLCAPI/", allow_none=True)
            anon = {"AuthMethod": "anonymous"}
            if expect:
                assert code(api.GetPlcRelease, anon) == expect
            else:
                r = api.GetPlcRelease(anon)
                assert r["build"]["target-arch"] == "x86_64" and r["tags"] == {"PLCAPI": "7.1"}
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)


@pytest.mark.parametrize("method", ["AddPerson", "AddNode", "AddSlice", "UpdateTagType"])
def test_unknown_keys_rejected_where_legacy_rejects(world: Any, method: str) -> None:
    plc, w = world
    api = plc.proxy()
    args = {"AddPerson": (w.A.admin, {"first_name": "F", "last_name": "L",
                                      "email": "q@tu.example.org", "bogus": 1}),
            "AddNode": (w.A.admin, w.site, {"hostname": "q.tu.example.org", "bogus": 1}),
            "AddSlice": (w.A.admin, {"name": "tu_q", "expires": 5}),
            "UpdateTagType": (w.A.admin, "vref", {"roles": ["user"]})}[method]
    assert code(getattr(api, method), *args) == 102
