"""The HTTP front end against a running server: paths, bodies good and bad, keep-alive,
HTTPS, introspection, multicall, one transaction per call, 8 concurrent writers."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import threading
import xmlrpc.client
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.plc.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, start_server


def post(url: str, body: bytes, path: str = "/PLCAPI/",
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("POST", path, body, {"Content-Type": "text/xml", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def call_body(method: str, *params: Any) -> bytes:
    return xmlrpc.client.dumps(params, method, allow_none=True).encode()


def test_paths_get_page_and_slashes(plc: Any) -> None:
    body = call_body("system.listMethods")
    for path in ("/PLCAPI/", "/PLCAPI", "//PLCAPI//", "///PLCAPI"):
        status, data = post(plc.url, body, path)
        assert status == 200, path
        assert "AuthCheck" in xmlrpc.client.loads(data)[0][0]
    assert post(plc.url, body, "/other/")[0] == 404
    u = urlparse(plc.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", "/PLCAPI/")
        resp = conn.getresponse()
        assert resp.status == 200 and b"XML-RPC" in resp.read()
    finally:
        conn.close()


MALFORMED = [
    b"",
    b"not xml at all",
    b"<?xml version='1.0'?><methodCall><methodName>AuthCheck</methodName><params>",
    b"<methodCall><methodName>AuthCheck</methodName><params><param><value><int>x</int>"
    b"</value></param></params></methodCall>",
    b"<methodResponse><params><param><value><i4>1</i4></value></param></params>"
    b"</methodResponse>",
    b"<methodCall><methodName>AuthCheck</methodName><params><param><value>\xff\xfe"
    b"</value></param></params></methodCall>",
    b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;'>]>"
    b"<methodCall><methodName>AuthCheck</methodName></methodCall>",
    b"<methodCall><methodName>AuthCheck</methodName><params><param><value><dateTime.iso8601>"
    b"garbage</dateTime.iso8601></value></param></params></methodCall>",
]


@pytest.mark.parametrize("body", MALFORMED)
def test_malformed_bodies_get_4xx_and_server_keeps_serving(plc: Any, body: bytes) -> None:
    status, _ = post(plc.url, body)
    assert 400 <= status < 500
    assert plc.proxy().AuthCheck(plc.admin) == 1


def test_deep_nesting_wrong_types_unknown_method(plc: Any) -> None:
    deep: Any = "x"
    for _ in range(200):
        deep = [deep]
    status, data = post(plc.url, call_body("GetSites", plc.admin, deep))
    assert status == 200
    with pytest.raises(xmlrpc.client.Fault) as e:
        xmlrpc.client.loads(data)
    assert e.value.faultCode == 102
    api = plc.proxy()
    with pytest.raises(xmlrpc.client.Fault) as e:
        api.NoSuchMethod(plc.admin)
    assert (e.value.faultCode, e.value.faultString) == (100, "Invalid method NoSuchMethod")
    with pytest.raises(xmlrpc.client.Fault) as e:
        api.AuthCheck()
    assert e.value.faultCode == 101 and "Expected 1 arguments, got 0" in e.value.faultString
    with pytest.raises(xmlrpc.client.Fault) as e:
        api.GetSites(plc.admin, None, None, None)
    assert e.value.faultCode == 101 and "Expected 1-3 arguments, got 4" in e.value.faultString
    # binary and dateTime values are not PLCAPI types: 102, not a crash
    with pytest.raises(xmlrpc.client.Fault) as e:
        api.GetSites(plc.admin, xmlrpc.client.Binary(b"\0\1"))
    assert e.value.faultCode == 102


def test_body_limit_and_length_required(plc_store: Any) -> None:
    server, thread = start_server(plc_store, api_max_body=4096)
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}/PLCAPI/"
    try:
        status, _ = post(url, call_body("system.listMethods") + b" " * 5000)
        assert status == 413
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.putrequest("POST", "/PLCAPI/")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            conn.send(b"0\r\n\r\n")
            assert conn.getresponse().status == 411
        finally:
            conn.close()
        assert post(url, call_body("system.listMethods"))[0] == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_keep_alive_serves_many_calls_on_one_connection(plc: Any) -> None:
    u = urlparse(plc.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        for _ in range(5):
            conn.request("POST", "/PLCAPI/", call_body("AuthCheck", plc.admin))
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/xml")
            assert xmlrpc.client.loads(resp.read())[0] == (1,)
            assert not resp.will_close
    finally:
        conn.close()


def test_results_are_marshalled_with_nil_and_clean_xml(plc: Any) -> None:
    api = plc.proxy()
    sid = api.AddSite(plc.admin, {"name": "bell", "abbreviated_name": "b",
                                  "login_base": "bell"})
    conn = plc.store.connect()  # a value no XML-RPC client could have sent
    try:
        conn.execute("UPDATE sites SET name = ? WHERE site_id = ?", ["bell\x07name", sid])
    finally:
        conn.close()
    site = api.GetSites(plc.admin, sid, ["name", "latitude"])[0]
    assert site == {"name": "bell?name", "latitude": None}


def test_introspection(plc: Any) -> None:
    api = plc.proxy()
    names = api.system.listMethods()
    assert {"AuthCheck", "GetSlivers", "system.multicall", "GetSliceVref",
            "SetNodeArch"} <= set(names)
    assert "AddIpAddress" not in names
    assert api.system.methodSignature("AuthCheck") == [["int", "struct"]]
    sigs = api.system.methodSignature("GetSites")
    assert ["array", "struct"] in sigs and ["array", "struct", "struct", "array"] in sigs
    help_text = api.system.methodHelp("AddSlice")
    assert help_text.startswith("AddSlice(auth, slice_fields) -> int")
    assert "Allowed Roles:" in help_text and "admin, pi" in help_text
    with pytest.raises(xmlrpc.client.Fault) as e:
        api.system.methodHelp("Nope")
    assert e.value.faultCode == 100


def test_multicall(plc: Any) -> None:
    api = plc.proxy()
    results = api.system.multicall([
        {"methodName": "AuthCheck", "params": [plc.admin]},
        {"methodName": "GetSites", "params": [plc.admin, "nosuch"]},
        {"methodName": "AddSite", "params": [plc.admin, {"name": "x"}]},
        {"methodName": "system.multicall", "params": [[]]},
        {"methodName": "NoSuch", "params": []},
    ])
    assert results[0] == [1] and results[1] == [[]]
    assert results[2]["faultCode"] == 102
    assert results[3] == {"faultCode": -507, "faultString": "Recursive system.multicall forbidden"}
    assert results[4]["faultCode"] == 100
    with pytest.raises(xmlrpc.client.Fault) as e:
        api.system.multicall(["not a struct"])
    assert e.value.faultCode == 102


def test_a_failing_call_changes_nothing(plc: Any) -> None:
    api = plc.proxy()
    api.UpdateSite(plc.admin, "pl", {"max_slices": 5})
    before = api.GetSlices(plc.admin)
    events = api.GetEvents(plc.admin)
    # AddSlice inserts the slice, then its initscript tag fails: all is rolled back
    with pytest.raises(xmlrpc.client.Fault) as e:
        api.AddSlice(plc.admin, {"name": "pl_rollback", "initscript": "nosuch"})
    assert e.value.faultCode == 102
    assert api.GetSlices(plc.admin) == before
    assert api.GetEvents(plc.admin) == events
    conn = plc.store.connect()
    try:
        assert conn.query("SELECT 1 FROM slices WHERE name = 'pl_rollback'") == []
    finally:
        conn.close()


def test_eight_concurrent_writers_lose_nothing(plc: Any) -> None:
    api = plc.proxy()
    site = api.AddSite(plc.admin, {"name": "C", "abbreviated_name": "C", "login_base": "cc",
                                   "max_slices": 100})
    errors: list[BaseException] = []
    per_client = 12

    def writer(n: int) -> None:
        try:
            mine = xmlrpc.client.ServerProxy(plc.url, allow_none=True)
            for i in range(per_client):
                nid = mine.AddNode(plc.admin, site, {"hostname": f"w{n}-{i}.cc.example.org"})
                mine.AddNodeTag(plc.admin, nid, "arch", f"a{n}-{i}")
                mine.AddSlice(plc.admin, {"name": f"cc_w{n}_{i}"})
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    nodes = api.GetNodes(plc.admin, {"site_id": site}, ["hostname", "arch"])
    assert len(nodes) == 8 * per_client
    assert all(n["arch"] == "a" + n["hostname"].split(".")[0][1:] for n in nodes)
    assert len(api.GetSlices(plc.admin, {"name": "cc_*"})) == 8 * per_client
    assert len(set(n["hostname"] for n in nodes)) == 8 * per_client


def test_https(plc_store: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server, thread = start_server(plc_store, api_cert=str(cert), api_key=str(key))
    host, port = server.server_address[:2]
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        api = xmlrpc.client.ServerProxy(f"https://{host}:{port}/PLCAPI/", allow_none=True,
                                        context=ctx)
        assert api.AuthCheck({"AuthMethod": "password", "Username": ADMIN_EMAIL,
                              "AuthString": ADMIN_PASSWORD}) == 1
        # a plain-HTTP client on the TLS port gets nowhere, and the server survives
        try:
            post(f"http://{host}:{port}/PLCAPI/", call_body("system.listMethods"))
        except (http.client.HTTPException, OSError):
            pass
        assert api.system.listMethods()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


PID = os.getpid()


def test_store_connections_are_pooled(plc: Any) -> None:
    for _ in range(30):  # one TCP connection each, one after the other
        assert post(plc.url, call_body("GetLeaseGranularity", {"AuthMethod": "anonymous"}))[0] \
            == 200
    assert len(plc.server._all) <= 3


def test_connections_are_bounded_and_the_longest_waiting_is_dropped(plc_store: Any) -> None:
    server, thread = start_server(plc_store, api_max_connections=2)
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}/PLCAPI/"
    held: list[socket.socket] = []
    try:
        for _ in range(2):  # two clients keep idle connections open...
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(b"POST /PLCAPI/ HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (
                len(call_body("system.listMethods")), call_body("system.listMethods")))
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            held.append(s)
        # ...a third is served all the same: the one idle longest is closed for it
        assert post(url, call_body("system.listMethods"))[0] == 200
        held[0].settimeout(5)
        assert held[0].recv(100) == b""
    finally:
        for s in held:
            s.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
