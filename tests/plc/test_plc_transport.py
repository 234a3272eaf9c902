"""Transport and authentication hardening (issue 9): slow clients, DTDs in any
encoding, paths other than /PLCAPI/, Content-Length framing, multicall length, wrong-
password floods, unexpected errors as faults, file modes, the plain-HTTP warning.

Hostile clients connect from other loopback addresses (127.0.0.2 and up, derived from
the PID) than the legitimate caller (127.0.0.1), as they would from other hosts."""

from __future__ import annotations

import http.client
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest

from plc.config import Config, write_default
from plc.initdb import initialise
from plc.marshal import BadCall, load_call
from plc.server import plain_http_warning
from plc.store import SQLiteStore
from tests.plc.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, PREFIX, start_server

PID = os.getpid()


def hostile(n: int) -> str:
    """The n-th hostile loopback address of this test run."""
    return f"127.{(PID >> 8) % 200 + 10}.{PID % 250 + 2}.{n % 250 + 2}"


def call_body(method: str, *params: Any) -> bytes:
    return xmlrpc.client.dumps(params, method, allow_none=True).encode()


def raw(host: str, port: int, data: bytes, source: str = "127.0.0.1",
        timeout: float = 10) -> bytes:
    """Send ``data``, read until the server closes or a full answer arrived."""
    with socket.create_connection((host, port), timeout=timeout,
                                  source_address=(source, 0)) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return out
            if not chunk:
                return out
            out += chunk
            head, sep, rest = out.partition(b"\r\n\r\n")
            if sep and b"HTTP/1.1 100" not in head:
                lengths = [int(h.split(b":")[1]) for h in head.split(b"\r\n")
                           if h.lower().startswith(b"content-length:")]
                if lengths and len(rest) >= lengths[0]:
                    return out


def timed_calls(url: str, n: int, auth: dict[str, Any]) -> list[float]:
    api = xmlrpc.client.ServerProxy(url, allow_none=True)
    times = []
    for _ in range(n):
        t = time.monotonic()
        assert api.AuthCheck(auth) == 1
        times.append(time.monotonic() - t)
    return times


ADMIN = {"AuthMethod": "password", "Username": ADMIN_EMAIL, "AuthString": ADMIN_PASSWORD}


@pytest.fixture
def server(plc_store: SQLiteStore, request: Any) -> Any:
    overrides = getattr(request, "param", {})
    srv, thread = start_server(plc_store, **overrides)
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def url_of(srv: Any) -> str:
    host, port = srv.server_address[:2]
    return f"http://{host}:{port}/PLCAPI/"


# -- slow clients -------------------------------------------------------------------------

@pytest.mark.parametrize("server", [{"api_max_connections": 200, "api_head_timeout": 3}],
                         indirect=True)
def test_slow_clients_do_not_lock_others_out(server: Any) -> None:
    """300 connections trickling one header byte every 0.5 s (from 10 addresses) while a
    legitimate client calls: each call is answered promptly, and the slow ones are cut
    off by the head deadline (408), not served forever."""
    host, port = server.server_address[:2]
    slow: list[socket.socket] = []
    stop = threading.Event()
    try:
        for i in range(300):
            s = socket.socket()
            s.setblocking(True)
            s.settimeout(5)
            s.bind((hostile(i % 10), 0))
            s.connect((host, port))
            s.sendall(b"P")
            slow.append(s)

        def trickle() -> None:
            while not stop.wait(0.5):
                for s in slow:
                    try:
                        s.send(b"O")
                    except OSError:
                        pass

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        started = time.monotonic()
        times = timed_calls(url_of(server), 20, ADMIN)
        assert max(times) < 2.0, times  # old code: 503 (slots all held)
        assert time.monotonic() - started < 10
        # the whole head had 3 s: every slow connection is answered 408 and closed
        time.sleep(3.5)
        stop.set()
        t.join(timeout=5)
        answers = set()
        for s in slow:
            try:
                answers.add(s.recv(100)[:12])
            except OSError:
                answers.add(b"error")
        # cut off by the deadline (408), or closed for a newer connection (503)
        assert answers <= {b"HTTP/1.1 408", b"HTTP/1.1 503", b"", b"error"}, answers
        assert b"HTTP/1.1 408" in answers
    finally:
        stop.set()
        for s in slow:
            s.close()


@pytest.mark.parametrize("server", [{"api_head_timeout": 1, "api_body_min_rate": 100000}],
                         indirect=True)
def test_a_slow_body_is_cut_off(server: Any) -> None:
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /PLCAPI/ HTTP/1.1\r\nContent-Length: 100000\r\n\r\n<")
        started = time.monotonic()
        answer = b""
        while not answer:
            time.sleep(0.2)
            s.send(b" ")
            s.settimeout(0.01)
            try:
                answer = s.recv(100)
            except TimeoutError:
                pass
            assert time.monotonic() - started < 6
        assert answer.startswith(b"HTTP/1.1 408")
    assert timed_calls(url_of(server), 1, ADMIN)


@pytest.mark.parametrize("server", [{"api_max_per_source": 5}], indirect=True)
def test_connections_per_source_are_capped(server: Any) -> None:
    host, port = server.server_address[:2]
    held = [socket.create_connection((host, port), source_address=(hostile(1), 0))
            for _ in range(5)]
    try:
        time.sleep(0.2)
        out = raw(host, port, b"GET /PLCAPI/ HTTP/1.1\r\n\r\n", source=hostile(1))
        assert out.startswith(b"HTTP/1.1 503"), out
        assert timed_calls(url_of(server), 1, ADMIN)  # another address is served
        held.pop().close()
        time.sleep(0.2)
        out = raw(host, port, b"GET /PLCAPI/ HTTP/1.1\r\n\r\n", source=hostile(1))
        assert out.startswith(b"HTTP/1.1 200"), out
    finally:
        for s in held:
            s.close()


# -- DTDs --------------------------------------------------------------------------------

def laughs(codec: str, size: int, encoding: str = "") -> bytes:
    """An XML bomb: entities ten times nested, padded to about ``size`` bytes."""
    ents = "<!ENTITY a0 'lol'>" + "".join(
        f"<!ENTITY a{i} '{f'&a{i - 1};' * 10}'>" for i in range(1, 10))
    pad = "<!-- " + "x" * max(0, size // (2 if "16" in codec else 1) - 600) + " -->"
    text = (f"<?xml version='1.0' encoding='{encoding or codec}'?><!DOCTYPE m [{ents}]>{pad}"
            f"<methodCall><methodName>AuthCheck</methodName><params><param><value>"
            f"<string>&a9;</string></value></param></params></methodCall>")
    return text.encode(codec)


@pytest.mark.parametrize("codec", ["utf-8", "utf-16", "utf-16-le", "utf-16-be"])
def test_dtds_are_refused_in_any_encoding_with_bounded_memory(server: Any,
                                                              codec: str) -> None:
    body = laughs(codec, 1 << 20, "UTF-16" if "16" in codec else "")
    tracemalloc.start()
    try:
        with pytest.raises(BadCall, match="DTD"):
            load_call(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(body), peak
    host, port = server.server_address[:2]
    out = raw(host, port, b"POST /PLCAPI/ HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
              + body)
    assert out.startswith(b"HTTP/1.1 400") and b"DTD" in out, out[:200]


def test_load_call_reads_what_the_stdlib_reads() -> None:
    for params in [(), (1, "x", None, [1.5, {"a": True}]), ({"s": "\u00e9\u4e2d"},)]:
        body = call_body("M", *params)
        assert load_call(body) == xmlrpc.client.loads(body, use_builtin_types=True)
    for bad in (b"", b"<x/>", b"<methodCall><params/></methodCall>", b"&amp;<a/>",
                b"<methodCall><methodName>A</methodName>&x;</methodCall>"):
        with pytest.raises(BadCall):
            load_call(bad)


# -- paths and framing ------------------------------------------------------------------

def test_only_the_api_path_is_served(server: Any) -> None:
    host, port = server.server_address[:2]
    for method in ("GET", "HEAD", "POST", "PUT"):
        for path in ("/", "/PlanetLabConf/sysctl.conf", "/boot/", "/PLCAPIx", "/PLCAPI/x"):
            conn = http.client.HTTPConnection(host, port, timeout=10)
            try:
                conn.request(method, path, call_body("system.listMethods")
                             if method == "POST" else None)
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 404, (method, path)
            finally:
                conn.close()
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for path in ("/PLCAPI/", "//PLCAPI", "/PLCAPI/?x"):  # keep-alive across both
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 200 and b"XML-RPC" in resp.read()
    finally:
        conn.close()


def test_curl_fail_on_another_path(server: Any, tmp_path: Path) -> None:
    host, port = server.server_address[:2]
    out = tmp_path / "conf"
    r = subprocess.run(["curl", "--fail", "-s", "-o", str(out),
                        f"http://{host}:{port}/PlanetLabConf/sysctl.conf"], timeout=30)
    assert r.returncode == 22  # HTTP error: NodeManager keeps its old file


@pytest.mark.parametrize("lengths,status", [
    (["\u00b2"], 400), (["5", "7"], 400), (["5, 7"], 400), (["+5"], 400), (["-1"], 400),
    (["0x5"], 400), ([" 5 "], 200), (["5", "5"], 200), (["5, 5"], 200), ([], 411),
])
def test_content_length_framing(server: Any, lengths: list[str], status: int) -> None:
    host, port = server.server_address[:2]
    body = call_body("system.listMethods")
    head = "".join(f"Content-Length: {v.replace('5', str(len(body)))}\r\n" for v in lengths)
    out = raw(host, port, b"POST /PLCAPI/ HTTP/1.1\r\n" + head.encode() + b"\r\n" + body)
    assert out.startswith(b"HTTP/1.1 %d" % status), out[:200]
    assert timed_calls(url_of(server), 1, ADMIN)


def test_expect_100_continue_and_pipelining_still_work(server: Any) -> None:
    host, port = server.server_address[:2]
    body = call_body("AuthCheck", ADMIN)
    req = b"POST /PLCAPI/ HTTP/1.1\r\nContent-Length: %d\r\n" % len(body)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(req + b"Expect: 100-continue\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body + (req + b"\r\n" + body) * 2)
        out = b""
        while out.count(b"<int>1</int>") < 3:
            chunk = s.recv(65536)
            assert chunk
            out += chunk
        assert out.count(b"HTTP/1.1 200 OK") == 3


@pytest.mark.parametrize("server", [{"api_max_body": 4096, "api_max_buffered": 4096}],
                         indirect=True)
def test_bodies_in_transit_are_released_after_each_answer(server: Any) -> None:
    """The body budget counts requests being read or answered, not those answered
    before on the same keep-alive connection (each used to stay counted until the
    connection closed: 4096 bytes of budget refused the 12th call of 350 bytes)."""
    host, port = server.server_address[:2]
    body = call_body("AuthCheck", ADMIN)
    assert 200 < len(body) < 4096
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for _ in range(3 * 4096 // len(body)):
            conn.request("POST", "/PLCAPI/", body)
            reply = conn.getresponse()
            assert reply.status == 200, reply.read()
            assert b"<int>1</int>" in reply.read()
    finally:
        conn.close()


@pytest.mark.parametrize("server", [{"api_head_timeout": 1}], indirect=True)
def test_a_stalled_next_request_on_a_kept_connection_times_out(server: Any) -> None:
    """The worker that answered a request may read the connection's next one; a part
    of a request it finds there is still held to the head deadline (408), and other
    clients are answered meanwhile."""
    host, port = server.server_address[:2]
    body = call_body("AuthCheck", ADMIN)
    req = b"POST /PLCAPI/ HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(req + body + b"POST /PLCAPI/ HTTP/1.1\r\nContent-")
        t0 = time.monotonic()
        assert xmlrpc.client.ServerProxy(url_of(server)).AuthCheck(ADMIN) == 1
        out = b""
        while b"408" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        assert out.count(b"HTTP/1.1 200 OK") == 1
        assert b"HTTP/1.1 408 Request Timeout" in out
        assert time.monotonic() - t0 < 5


# -- multicall and passwords -------------------------------------------------------------

def test_multicall_length_is_capped(server: Any) -> None:
    api = xmlrpc.client.ServerProxy(url_of(server), allow_none=True)
    calls = [{"methodName": "NoSuch", "params": []}] * 1000
    assert len(api.system.multicall(calls)) == 1000
    with pytest.raises(xmlrpc.client.Fault) as e:
        api.system.multicall(calls + calls[:1])
    assert e.value.faultCode == 102 and "1000" in e.value.faultString


FLOOD = textwrap.dedent("""
    import http.client, sys, threading, time, xmlrpc.client
    host, port, source, user, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], \\
        sys.argv[4], float(sys.argv[5])
    auth = {"AuthMethod": "password", "Username": user, "AuthString": "wrong"}
    if user == "-":     # the control: the same requests, no password to check
        auth = {"AuthMethod": "anonymous"}
    body = xmlrpc.client.dumps(([{"methodName": "AuthCheck", "params": [auth]}] * 50,),
                               "system.multicall").encode()
    end = time.monotonic() + seconds
    def flood():
        while time.monotonic() < end:
            c = http.client.HTTPConnection(host, port, timeout=60, source_address=(source, 0))
            try:
                c.request("POST", "/PLCAPI/", body)
                c.getresponse().read()
            except Exception:
                pass
            finally:
                c.close()
            time.sleep(0.02)
    ts = [threading.Thread(target=flood) for _ in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
""")


def test_a_wrong_password_flood_leaves_others_latency_within_2x(server: Any) -> None:
    """A flood of wrong passwords costs other callers no more than a flood of the same
    requests with nothing to check (the control, measured in the same run: on a
    2-core machine the flooding client itself takes CPU, and on PostgreSQL every one
    of the caller's round trips waits for a backend to be scheduled). Unthrottled,
    each request of the flood hashes 50 passwords: 30x the latency."""
    host, port = server.server_address[:2]
    url = url_of(server)
    api = xmlrpc.client.ServerProxy(url, allow_none=True)

    def latency(n: int) -> float:
        """Median time of a caller's GetPersons + system.listMethods (a few ms of CPU)."""
        times = []
        for _ in range(n):
            t = time.monotonic()
            api.GetPersons(ADMIN)
            api.system.listMethods()
            times.append(time.monotonic() - t)
        return statistics.median(times)

    def under_flood(source: str, user: str) -> float:
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, host, str(port), source,
                                  user, "8"])
        try:
            time.sleep(1.5)
            # The address's first wrong passwords are hashed (50-65 ms of CPU each, up
            # to the failure limit) before it is held off; on a loaded machine that
            # can run past 1.5 s. What is bounded is the flood once held off.
            deadline = time.monotonic() + 20
            while (user != "-" and not server.api.password_failures.blocked(source)
                   and time.monotonic() < deadline):
                time.sleep(0.1)
            return latency(40)
        finally:
            flood.kill()
            flood.wait(10)

    latency(3)  # warm: the admin's verified password is remembered
    base = latency(40)
    control = under_flood(hostile(8), "-")
    during = under_flood(hostile(7), ADMIN_EMAIL)
    # 8 clients sending multicalls of 50 wrong passwords: old code 30x (40 ms for 1.3 ms)
    assert during < 2 * control + 0.004, (base, control, during)  # slack: a busy machine
    with pytest.raises(xmlrpc.client.Fault) as e:  # the flooding address is held off
        raw_auth = {"AuthMethod": "password", "Username": ADMIN_EMAIL, "AuthString": "x"}
        for _ in range(30):
            api.AuthCheck(raw_auth)
    assert e.value.faultCode == 103


def test_password_failures_are_throttled_per_source(plc_store: SQLiteStore) -> None:
    srv, thread = start_server(plc_store, api_password_failures=3)
    try:
        host, port = srv.server_address[:2]
        wrong = dict(ADMIN, AuthString="wrong")
        body = call_body("system.multicall", [{"methodName": "AuthCheck",
                                               "params": [wrong]}] * 10)
        started = time.monotonic()
        out = raw(host, port, b"POST /PLCAPI/ HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                  % len(body) + body, source=hostile(3))
        results = xmlrpc.client.loads(out.partition(b"\r\n\r\n")[2])[0][0]
        texts = [r["faultString"] for r in results]
        assert all(r["faultCode"] == 103 for r in results)
        assert sum("verification failed" in t for t in texts) == 3
        assert sum("too many failed" in t for t in texts) == 7
        assert time.monotonic() - started < 3  # 7 of 10 hashes never computed
        # the right password from there is refused too; from elsewhere it works
        ok = call_body("AuthCheck", ADMIN)
        out = raw(host, port, b"POST /PLCAPI/ HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                  % len(ok) + ok, source=hostile(3))
        assert b"too many failed" in out
        assert timed_calls(url_of(srv), 1, ADMIN)
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def test_hash_gate_bounds_concurrent_verifications() -> None:
    from plc.throttle import Busy, HashGate

    gate = HashGate(1, wait=0.2)
    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with gate.slot():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(5)
    errors: list[str] = []

    def wait_for_slot() -> None:
        try:
            with gate.slot():
                pass
        except Busy:
            errors.append("busy")

    waiter = threading.Thread(target=wait_for_slot)
    waiter.start()
    time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(Busy):  # one waits already: the next is told at once
        with gate.slot():
            pass
    assert time.monotonic() - started < 0.1
    waiter.join(5)
    assert errors == ["busy"]  # the waiter gave up after 0.2 s
    release.set()
    t.join(5)
    with gate.slot():
        pass


# -- unexpected errors --------------------------------------------------------------------

@pytest.mark.parametrize("result", [2 ** 40, RuntimeError("boom")])
def test_unexpected_errors_answer_a_fault_not_500(server: Any, result: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def run(*args: Any) -> Any:
        if isinstance(result, Exception):
            raise result
        return {"x": [result]}

    monkeypatch.setattr(server.api, "run", run)
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for _ in range(2):  # and the connection is kept
            conn.request("POST", "/PLCAPI/", call_body("GetSites", ADMIN))
            resp = conn.getresponse()
            assert resp.status == 200
            with pytest.raises(xmlrpc.client.Fault) as e:
                xmlrpc.client.loads(resp.read())
            assert e.value.faultCode == 111 and "boom" not in e.value.faultString
    finally:
        conn.close()


# -- files and the plain-HTTP warning ------------------------------------------------------

def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("umask", [0, 0o022])
def test_database_and_config_files_are_private_whatever_the_umask(tmp_path: Path,
                                                                   umask: int) -> None:
    old = os.umask(umask)
    try:
        db = tmp_path / f"plc-{PID}.db"
        store = SQLiteStore(db)
        initialise(store, ADMIN_EMAIL, ADMIN_PASSWORD, PREFIX)
        conn = store.connect()
        try:
            conn.execute("UPDATE sites SET name = name")  # the WAL exists while open
            files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
            assert all(f.exists() for f in files)
            assert [mode(f) for f in files] == [0o600] * 3
        finally:
            conn.close()
        cfg = tmp_path / "plc.toml"
        write_default(cfg)
        assert mode(cfg) == 0o600
        # a database made world-readable before is tightened when opened
        os.chmod(db, 0o644)
        SQLiteStore(db).connect().close()
        assert mode(db) == 0o640
    finally:
        os.umask(old)


def test_plain_http_beyond_loopback_is_warned_about() -> None:
    def warn(listen: str, **kw: Any) -> str | None:
        return plain_http_warning(Config().replace(api_listen=listen, **kw))

    assert warn("127.0.0.1:8000") is None and warn("[::1]:8000") is None
    assert warn("localhost:8000") is None
    assert warn("0.0.0.0:8000") and "PLAIN HTTP" in (warn("192.0.2.1:80") or "")
    assert warn("0.0.0.0:8000", api_cert="c.pem", api_key="k.pem") is None


def test_serve_logs_the_warning(tmp_path: Path) -> None:
    db = tmp_path / f"w-{PID}.db"
    initialise(SQLiteStore(db), ADMIN_EMAIL, ADMIN_PASSWORD, PREFIX)
    proc = subprocess.Popen([sys.executable, "-m", "plc.cli", "serve", "--db", str(db),
                             "--listen", "0.0.0.0:0", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        seen = ""
        assert proc.stdout is not None
        while "PLCAPI serving" not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert "WARNING" in seen and "PLAIN HTTP" in seen, seen
    finally:
        proc.terminate()
        proc.wait(10)
