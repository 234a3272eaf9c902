"""Fuzz a running `plc serve` with malformed requests (issue 2, "Bad input").

Thousands of bodies: random bytes, broken and truncated XML, invalid UTF-8, deep
nesting, oversize bodies, wrong argument types, unknown methods and auth methods. Each
gets an XML-RPC fault or an HTTP 4xx, the server keeps serving, and the database file
(every table) is byte-for-byte the same afterwards.
"""

from __future__ import annotations

import http.client
import os
import sqlite3
import xmlrpc.client
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    from plc_live import LiveServer, remove_workdir, start_server
except ImportError:  # tests/plc imported as a package
    from .plc_live import LiveServer, remove_workdir, start_server  # type: ignore[no-redef]

PID = os.getpid()
FUZZ = settings(max_examples=400, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


class Client:
    """One keep-alive HTTP connection; reopened when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.requests = 0

    def post(self, body: bytes, path: str = "/PLCAPI/",
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        hdrs = {"Content-Type": "text/xml", **(headers or {})}
        for attempt in range(2):
            try:
                self.conn.request("POST", path, body, hdrs)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.conn.close()
                self.requests += 1
                return resp.status, data
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    workdir = tmp_path_factory.mktemp(f"plc-fuzz-{PID}")
    srv = start_server(workdir)
    try:
        api = srv.proxy()
        # Something in every main table, so that "unchanged" means something.
        site = api.AddSite(srv.admin_auth, {"name": "fuzz", "abbreviated_name": "fz",
                                            "login_base": f"fz{PID}", "max_slices": 5})
        api.AddNode(srv.admin_auth, site, {"hostname": f"fz-{PID}.example.org"})
        api.AddSlice(srv.admin_auth, {"name": f"fz{PID}_s"})
        yield srv
    finally:
        srv.stop()
        remove_workdir(workdir)


def db_snapshot(live: LiveServer) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read through a read-only connection."""
    con = sqlite3.connect(f"file:{live.db}?mode=ro", uri=True, timeout=30)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        return {t: sorted(con.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr)
                for t in tables}
    finally:
        con.close()


@pytest.fixture(scope="module")
def client(live: LiveServer, baseline: dict[str, list[tuple[Any, ...]]]) -> Iterator[Client]:
    """Taking the baseline first: every test that sends anything uses this client."""
    c = Client(live.port)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def baseline(live: LiveServer) -> dict[str, list[tuple[Any, ...]]]:
    return db_snapshot(live)


def assert_rejected(status: int, data: bytes) -> None:
    """A fault in a 200 response, or a 4xx; never a 5xx, a success or a dropped connection."""
    if 400 <= status < 500:
        return
    assert status == 200, f"HTTP {status}: {data[:200]!r}"
    with pytest.raises(xmlrpc.client.Fault):
        xmlrpc.client.loads(data)


def assert_alive(live: LiveServer, client: Client) -> None:
    status, data = client.post(xmlrpc.client.dumps(({"AuthMethod": "anonymous"},),
                                                   "GetLeaseGranularity").encode())
    assert status == 200
    (value,), _ = xmlrpc.client.loads(data)
    assert isinstance(value, int)
    assert live.alive()


VALID = xmlrpc.client.dumps(({"AuthMethod": "anonymous"}, {"hostname": "*"}, ["hostname"]),
                            "GetNodes").encode()


# -- strategies --------------------------------------------------------------------------
xml_fragments = st.sampled_from([
    b"<?xml version='1.0'?>", b"<methodCall>", b"</methodCall>", b"<methodName>",
    b"</methodName>", b"GetNodes", b"AddSite", b"<params>", b"</params>", b"<param>",
    b"</param>", b"<value>", b"</value>", b"<struct>", b"</struct>", b"<member>",
    b"</member>", b"<name>", b"</name>", b"<array>", b"<data>", b"</data>", b"</array>",
    b"<int>", b"</int>", b"<i4>1</i4>", b"<string>", b"</string>", b"<double>x</double>",
    b"<boolean>2</boolean>", b"<nil/>", b"<base64>!!</base64>", b"<dateTime.iso8601>",
    b"&amp;", b"&bogus;", b"<!DOCTYPE x [<!ENTITY a 'aaaa'>]>", b"&a;", b"\xff\xfe",
    b"\xc3\x28", b"\xed\xa0\x80", b"\x00", b"AuthMethod", b"password", b"]]>", b"<![CDATA[",
])


@st.composite
def broken_xml(draw: st.DrawFn) -> bytes:
    return b"".join(draw(st.lists(xml_fragments | st.binary(max_size=8), max_size=40)))


@st.composite
def mutated_valid(draw: st.DrawFn) -> bytes:
    body = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(body) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            body[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del body[i:i + draw(st.integers(1, 40))]
        else:
            body[i:i] = draw(st.binary(min_size=1, max_size=8))
        if not body:
            break
    return bytes(body)


# Values no PLCAPI parameter accepts where these are used (floats where ints, strings or
# structs are declared, binary, dates, nested garbage), so no call can succeed and write.
bad_scalar = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.binary(max_size=20).map(xmlrpc.client.Binary),
    st.just(xmlrpc.client.DateTime("20200101T00:00:00")),
)
bad_value = st.recursive(bad_scalar, lambda inner: st.lists(inner, min_size=1, max_size=3)
                         | st.dictionaries(st.text(max_size=8), inner, min_size=1, max_size=3),
                         max_leaves=8)
auths = st.one_of(
    st.just({"AuthMethod": "anonymous"}),
    st.just({"AuthMethod": "telepathy"}),
    st.just({"AuthMethod": "password", "Username": "nobody@example.org", "AuthString": "x"}),
    st.just({"AuthMethod": "session", "session": "no-such-session"}),
    st.just({"AuthMethod": "hmac", "node_id": 1, "value": "0" * 40}),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
    st.text(max_size=10),
    st.integers(-(2**31), 2**31 - 1),
)


# -- tests -------------------------------------------------------------------------------
@FUZZ
@given(body=st.binary(max_size=300))
def test_random_bytes(live: LiveServer, client: Client, body: bytes) -> None:
    assert_rejected(*client.post(body))


@FUZZ
@given(body=broken_xml())
def test_broken_xml(live: LiveServer, client: Client, body: bytes) -> None:
    assert_rejected(*client.post(body))


@FUZZ
@given(body=mutated_valid())
def test_mutated_valid_request(live: LiveServer, client: Client, body: bytes) -> None:
    status, data = client.post(body)
    if status == 200:
        try:
            xmlrpc.client.loads(data)  # a mutation may leave a valid read-only call
            return
        except xmlrpc.client.Fault:
            return
    assert 400 <= status < 500, f"HTTP {status}"


@FUZZ
@given(text=st.text(max_size=60), junk=st.binary(min_size=1, max_size=6))
def test_invalid_utf8_inside_valid_xml(live: LiveServer, client: Client, text: str,
                                       junk: bytes) -> None:
    junk = b"\xff" + junk  # 0xFF never occurs in UTF-8
    head, tail = VALID.split(b"<string>*</string>")
    body = head + b"<string>" + text.encode() + junk + b"</string>" + tail
    assert_rejected(*client.post(body))


@FUZZ
@given(auth=auths, method=st.sampled_from(["AuthCheck", "GetNodes", "AddSite", "DeleteSite",
                                           "UpdateNode", "GetSlivers", "AddSliceTag",
                                           "DeletePerson", "NoSuchMethod", "system.multicall",
                                           "system.methodHelp", "getnodes", ""]),
       args=st.lists(bad_value, min_size=1, max_size=4))
def test_wrong_types_unknown_methods_and_auth(live: LiveServer, client: Client, auth: Any,
                                              method: str, args: list[Any]) -> None:
    body = xmlrpc.client.dumps((auth, *args), method, allow_none=True).encode()
    assert_rejected(*client.post(body))


@FUZZ
@given(method=st.sampled_from(["AddSite", "DeleteSite", "UpdateSite", "AddNode", "DeleteNode",
                               "UpdateNode", "AddSlice", "DeleteSlice", "UpdateSlice",
                               "AddPerson", "DeletePerson", "AddSliceTag", "AddLeases",
                               "GetSession", "AddSession", "GetNodes", "GetSlices"]),
       args=st.lists(bad_value, min_size=1, max_size=4))
def test_wrong_types_as_admin(live: LiveServer, client: Client, method: str,
                              args: list[Any]) -> None:
    """Authenticated, so the type checks themselves are reached."""
    body = xmlrpc.client.dumps((live.admin_auth, *args), method, allow_none=True).encode()
    assert_rejected(*client.post(body))


unknown_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).map(
    lambda t: f"zz_{t}")
plain_values = st.one_of(st.integers(-5, 5), st.text(max_size=10), st.booleans(), st.none())


@FUZZ
@given(method=st.sampled_from(["GetNodes", "GetSites", "GetPersons", "GetSlices",
                               "GetSliceTags", "GetLeases", "GetPCUs", "GetConfFiles"]),
       field=unknown_names, value=plain_values, where=st.sampled_from(["filter", "fields"]))
def test_unknown_fields(live: LiveServer, client: Client, method: str, field: str,
                        value: Any, where: str) -> None:
    """An unknown filter field or return field is a fault, never a silent success."""
    args: tuple[Any, ...] = (({field: value},) if where == "filter" else (None, [field]))
    body = xmlrpc.client.dumps((live.admin_auth, *args), method, allow_none=True).encode()
    assert_rejected(*client.post(body))


@FUZZ
@given(method=st.sampled_from(["AddPerson", "AddNode", "AddSlice", "UpdateNode",
                               "UpdatePerson", "UpdateSlice"]),
       extra=st.dictionaries(unknown_names, plain_values, min_size=1, max_size=3))
def test_unknown_fields_in_add_and_update(live: LiveServer, client: Client, method: str,
                                          extra: dict[str, Any]) -> None:
    """Add/Update methods that refuse unknown keys (spec 11.17) refuse them before writing."""
    target = {"AddPerson": (), "AddNode": (1,), "AddSlice": ()}.get(method, (1,))
    body = xmlrpc.client.dumps((live.admin_auth, *target, extra), method,
                               allow_none=True).encode()
    assert_rejected(*client.post(body))


@pytest.mark.parametrize("depth", [200, 5000, 100000])
def test_deep_nesting(live: LiveServer, client: Client, depth: int) -> None:
    open_, close = b"<value><array><data>" * depth, b"</data></array></value>" * depth
    body = (b"<?xml version='1.0'?><methodCall><methodName>GetNodes</methodName><params>"
            b"<param><value><struct><member><name>AuthMethod</name><value>anonymous</value>"
            b"</member></struct></value></param><param>" + open_ + close +
            b"</param></params></methodCall>")
    assert_rejected(*client.post(body))
    assert_alive(live, client)


def test_oversize_bodies(live: LiveServer, client: Client) -> None:
    # Announced too large: refused from the header, before the body is read.
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    try:
        conn.putrequest("POST", "/PLCAPI/")
        conn.putheader("Content-Type", "text/xml")
        conn.putheader("Content-Length", str(64 * 1024 * 1024 * 1024))
        conn.endheaders()
        conn.send(b"<?xml version='1.0'?><methodCall>")
        resp = conn.getresponse()
        assert resp.status == 413
    finally:
        conn.close()
    # Actually sent: a 17 MiB string argument.
    big = xmlrpc.client.dumps(({"AuthMethod": "anonymous"}, "x" * (17 * 1024 * 1024)),
                              "GetNodes").encode()
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    try:
        try:
            conn.request("POST", "/PLCAPI/", big, {"Content-Type": "text/xml"})
            status = conn.getresponse().status
        except (ConnectionError, http.client.HTTPException):
            status = 413  # the server may close as soon as it has answered
        assert status == 413
    finally:
        conn.close()
    # Chunked without a length, or a negative length: refused too.
    for headers in ({"Transfer-Encoding": "chunked"}, {"Content-Length": "-5"}):
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
        try:
            conn.putrequest("POST", "/PLCAPI/", skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            if "Transfer-Encoding" in headers:
                conn.send(b"5\r\nhello\r\n0\r\n\r\n")
            status = conn.getresponse().status
            assert 400 <= status < 500 or status == 200, status
        finally:
            conn.close()
    assert_alive(live, client)


def test_server_alive_and_database_unchanged(live: LiveServer, client: Client,
                                             baseline: dict[str, list[tuple[Any, ...]]]) -> None:
    """Runs last in this module: everything above changed nothing."""
    assert_alive(live, client)
    assert client.requests > 1000, "the fuzz tests above did not run"
    after = db_snapshot(live)
    assert after.keys() == baseline.keys()
    for table, rows in baseline.items():
        assert after[table] == rows, f"table {table} changed"
