"""Data validation of issue 9: ints beyond 32 bits (every route in, and stored ones on
the way out), NaN and infinities, names with a trailing newline, today's ssh key types."""

from __future__ import annotations

import http.client
import math
import xmlrpc.client
from typing import Any
from urllib.parse import urlsplit

import pytest

from plc.methods.keys import SSH_KEY_TYPES, ssh_key_error
from tests.plc.world import ssh_blob, ssh_key

BIG = 10_000_000_000   # 10 Gbit/s in bit/s


def fault_of(call: Any, *args: Any) -> xmlrpc.client.Fault:
    try:
        result = call(*args)
    except xmlrpc.client.Fault as fault:
        return fault
    pytest.fail(f"expected a fault, got {result!r}")


def raw_call(url: str, method: str, params_xml: str) -> tuple[int, Any]:
    """POST a hand-written methodCall (xmlrpc.client refuses to send ints beyond 32
    bits, other clients send them as <i8>); (HTTP status, fault or result)."""
    u = urlsplit(url)
    body = (f"<?xml version='1.0'?><methodCall><methodName>{method}</methodName>"
            f"<params>{params_xml}</params></methodCall>").encode()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("POST", u.path, body, {"Content-Type": "text/xml"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        return resp.status, None
    try:
        return 200, xmlrpc.client.loads(data)[0][0]
    except xmlrpc.client.Fault as fault:
        return 200, fault


def auth_xml(auth: dict[str, str]) -> str:
    members = "".join(f"<member><name>{k}</name><value><string>{v}</string></value></member>"
                      for k, v in auth.items())
    return f"<param><value><struct>{members}</struct></value></param>"


# -- ints beyond 32 bits ---------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["i8", "int", "i4", "biginteger"])
def test_a_64_bit_int_argument_is_fault_102_naming_the_field(world: Any, encoding: str) -> None:
    plc, w = world
    status, result = raw_call(plc.url, "UpdateInterface", auth_xml(w.A.admin) +
                              f"<param><value><int>{w.interface}</int></value></param>"
                              f"<param><value><struct><member><name>bwlimit</name><value>"
                              f"<{encoding}>{BIG}</{encoding}></value></member></struct>"
                              "</value></param>")
    assert status == 200 and isinstance(result, xmlrpc.client.Fault), result
    assert result.faultCode == 102 and "bwlimit" in result.faultString
    api = plc.proxy()
    assert api.GetInterfaces(w.A.anon, {}, ["bwlimit"])[0]["bwlimit"] is None


@pytest.mark.parametrize("value", ["<double>10000000000.0</double>", "<string>10000000000</string>"])
def test_other_encodings_of_a_big_int_are_type_faults(world: Any, value: str) -> None:
    plc, w = world
    status, result = raw_call(plc.url, "UpdateSlice", auth_xml(w.A.admin) +
                              f"<param><value><int>{w.slice}</int></value></param>"
                              f"<param><value><struct><member><name>max_nodes</name><value>"
                              f"{value}</value></member></struct></value></param>")
    assert status == 200 and result.faultCode == 102 and "max_nodes" in result.faultString


def test_a_pi_cannot_store_a_huge_max_nodes(world: Any) -> None:
    plc, w = world
    status, result = raw_call(plc.url, "UpdateSlice", auth_xml(w.A.pi) +
                              f"<param><value><int>{w.slice}</int></value></param>"
                              "<param><value><struct><member><name>max_nodes</name><value>"
                              f"<i8>{2**40}</i8></value></member></struct></value></param>")
    assert result.faultCode == 102 and "max_nodes" in result.faultString
    assert len(plc.proxy().GetSlices(w.A.admin, {})) == 2


@pytest.mark.parametrize("flt", [
    f"<struct><member><name>bwlimit</name><value><i8>{BIG}</i8></value></member></struct>",
    f"<struct><member><name>&gt;bwlimit</name><value><i8>{2**70}</i8></value></member></struct>",
    f"<struct><member><name>interface_id</name><value><i8>{2**70}</i8></value></member></struct>",
    f"<array><data><value><i8>{2**70}</i8></value></data></array>",
    f"<struct><member><name>-LIMIT</name><value><i8>{2**70}</i8></value></member></struct>",
])
def test_filters_with_ints_beyond_32_bits_are_102_not_106(world: Any, flt: str) -> None:
    plc, w = world
    status, result = raw_call(plc.url, "GetInterfaces",
                              auth_xml(w.A.anon) + f"<param><value>{flt}</value></param>")
    assert status == 200 and result.faultCode == 102, result


def test_nodes_of_updateslice_beyond_64_bits_are_102(world: Any) -> None:
    plc, w = world
    status, result = raw_call(plc.url, "UpdateSlice", auth_xml(w.A.admin) +
                              f"<param><value><int>{w.slice}</int></value></param>"
                              "<param><value><struct><member><name>nodes</name><value><array>"
                              f"<data><value><i8>{2**70}</i8></value></data></array></value>"
                              "</member></struct></value></param>")
    assert status == 200 and result.faultCode == 102, result


def test_stored_out_of_range_ints_read_back_clamped_for_everybody(world: Any) -> None:
    # a database written before the check (or by hand) holds them: no read may fail
    plc, w = world
    db = plc.store.connect()
    try:
        db.begin(write=True)
        db.execute("UPDATE interfaces SET bwlimit = ? WHERE interface_id = ?",
                   (BIG, w.interface))
        db.execute("UPDATE slices SET max_nodes = ? WHERE slice_id = ?", (2**40, w.slice))
        db.execute("UPDATE sites SET max_slices = ? WHERE site_id = ?",
                   (-(2**40), w.other_site))
        db.commit()
    finally:
        db.close()
    api = plc.proxy()
    assert api.GetInterfaces(w.A.anon, {})[0]["bwlimit"] == 2**31 - 1
    assert {s["slice_id"]: s["max_nodes"] for s in api.GetSlices(w.A.admin, {})}[w.slice] == \
        2**31 - 1
    assert {s["site_id"]: s["max_slices"] for s in api.GetSites(w.A.anon, {})}[w.other_site] \
        == -(2**31)
    sliver = api.GetSlivers(w.A.node)
    assert sliver["interfaces"][0]["bwlimit"] == 2**31 - 1
    # filters still compare with the stored value
    assert api.GetInterfaces(w.A.anon, {">bwlimit": 2**31 - 2}, ["interface_id"]) == \
        [{"interface_id": w.interface}]


# -- NaN and infinities ------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["latitude", "longitude"])
def test_non_finite_doubles_are_102(world: Any, field: str, value: float) -> None:
    plc, w = world
    api = plc.proxy()
    other = "longitude" if field == "latitude" else "latitude"
    f = fault_of(api.UpdateSite, w.A.admin, w.site, {field: value, other: 10.0})
    assert f.faultCode == 102 and field in f.faultString and "finite" in f.faultString
    assert api.GetSites(w.A.anon, [w.site], [field])[0][field] is None


def test_finite_doubles_still_pass(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    assert api.UpdateSite(w.A.admin, w.site, {"latitude": 45.5, "longitude": -73.25}) == 1
    assert api.GetSites(w.A.anon, [w.site], ["latitude"])[0]["latitude"] == 45.5


# -- names with a trailing newline ------------------------------------------------------

@pytest.mark.parametrize("name", ["tu_nl\n", "tu_nl\r\n", "tu_n l", "tu_nl\n\n"])
def test_slice_names_with_whitespace_are_102_even_from_a_pi(world: Any, name: str) -> None:
    plc, w = world
    api = plc.proxy()
    f = fault_of(api.AddSlice, w.A.pi, {"name": name, "url": "http://x/", "description": "d"})
    assert f.faultCode == 102 and "name" in f.faultString
    assert api.GetSlices(w.A.admin, {"name": name}) == []


@pytest.mark.parametrize("method,args", [
    ("AddPerson", lambda w: ({"first_name": "a", "last_name": "b",
                              "email": "nl@tu.example.org\n"},)),
    ("AddNode", lambda w: (w.site, {"hostname": "nl.tu.example.org\n"})),
    ("AddSite", lambda w: ({"name": "x", "abbreviated_name": "x", "login_base": "nl\n"},)),
    ("UpdateInterface", lambda w: (w.interface, {"mac": "0:11:22:33:44:55\n"})),
    ("AddPersonKey", lambda w: (w.user, {"key_type": "ssh", "key": ssh_key("nl") + "\n"
                                         + ssh_key("second")})),
])
def test_other_names_with_a_trailing_newline_are_102(world: Any, method: str, args: Any) -> None:
    plc, w = world
    f = fault_of(getattr(plc.proxy(), method), w.A.admin, *args(w))
    assert f.faultCode == 102, f


# -- ssh keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("key_type", SSH_KEY_TYPES)
def test_every_openssh_key_type_is_accepted(world: Any, key_type: str) -> None:
    plc, w = world
    api = plc.proxy()
    key = ssh_key(f"k-{key_type}", key_type)
    key_id = api.AddPersonKey(w.A.user, w.user, {"key_type": "ssh", "key": key})
    assert api.GetKeys(w.A.user, [key_id], ["key"])[0]["key"] == key


@pytest.mark.parametrize("key", [
    "ssh-ed25519 " + ssh_blob("ssh-rsa", b"x" * 32) + " mismatch",  # blob of another type
    "ssh-ed25519 AAAA!!!! bad-base64",
    "ssh-ed25519 AAAA",                                              # blob too short
    "ssh-foo " + ssh_blob("ssh-foo", b"x" * 32),
    "ssh-ed25519",
])
def test_bad_ssh_keys_are_refused(world: Any, key: str) -> None:
    plc, w = world
    f = fault_of(plc.proxy().AddPersonKey, w.A.user, w.user, {"key_type": "ssh", "key": key})
    assert f.faultCode == 102 and "Invalid SSH version 2 public key" in f.faultString


def test_key_lines_with_options_and_comments() -> None:
    blob = ssh_blob("ssh-ed25519", b"k" * 32)
    assert ssh_key_error(f"ssh-ed25519 {blob}") is None
    assert ssh_key_error(f'from="10.0.0.0/8" ssh-ed25519 {blob} me@host') is None
    assert ssh_key_error(f"ssh-ed25519 {blob} me@host\nssh-rsa {blob}") is not None
