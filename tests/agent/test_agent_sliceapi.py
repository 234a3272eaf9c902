"""The slice API socket: identity from SO_PEERCRED, own data only, bounded, rate-limited.

Callers are real processes running under the host uids of sliver ranges (the identity
the kernel reports for a sliver's processes), so SO_PEERCRED is exercised for real.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
import trio
from agent_fakes import FakeBackend, reply, sliver

from agent import config, getslivers
from agent.faults import FAULT_UNSUPPORTED
from agent.main import Agent, build
from agent.reconcile import ingest
from agent.sliceapi import client

POOL = 1_000_000
SIZE = 65536

@pytest.fixture
def api_env():
    d = Path(tempfile.mkdtemp(prefix=f"agent-api-{os.getpid()}-"))
    os.chmod(d, 0o755)
    cfg = config.from_mapping({
        "state_dir": str(d / "state"), "run_dir": str(d / "run"),
        "socket_path": str(d / "agent.sock"), "uid_pool_start": POOL, "uid_range_size": SIZE,
        "api_rate": 5.0, "api_burst": 10, "node_id": 1, "node_key": "k", "host_accounts": 0,
        "plc_url": "http://127.0.0.1:9/PLCAPI/"}, "test")
    agent = build(cfg, backend=FakeBackend())
    try:
        yield agent, d
    finally:
        agent.close()
        shutil.rmtree(d, ignore_errors=True)


async def _setup(agent: Agent) -> None:
    desired = getslivers.parse(reply([sliver("pl_a", cpu_share="11"),
                                      sliver("pl_b", cpu_share="22")]))
    removed = ingest(agent.state, desired, "base", "pl", time.time())
    await agent.reconciler.reconcile(removed, have_reply=True)


def _call_as(uid: int, sock: str, method: str, args: str = "[]") -> dict:
    """Make one call from a forked child running as `uid` (what SO_PEERCRED reports for
    a process of a sliver whose range holds that uid)."""
    import json

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to uid, call, report, exit without cleanup handlers
        code = 0
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                res = {"ok": getattr(client(sock), method)(*json.loads(args))}
            except xmlrpc.client.Fault as f:
                res = {"fault": f.faultCode, "msg": f.faultString}
            os.write(wfd, json.dumps(res).encode())
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            os.write(wfd, json.dumps({"error": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    data = b""
    while chunk := os.read(rfd, 65536):
        data += chunk
    os.close(rfd)
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result
    return result


async def _serving(agent: Agent, fn):
    api = agent.api
    async with trio.open_nursery() as nursery:
        await nursery.start(api.serve)
        try:
            return await trio.to_thread.run_sync(fn)
        finally:
            nursery.cancel_scope.cancel()


async def test_sliver_sees_only_its_own_rspec(api_env) -> None:
    agent, d = api_env
    await _setup(agent)
    idx_a = agent.state.uid_range_of("pl_a")
    idx_b = agent.state.uid_range_of("pl_b")
    uid_a = POOL + idx_a * SIZE
    uid_b = POOL + idx_b * SIZE + 1000   # the slice's user inside, not only its root
    inner = str(agent.api.api_dir / "agent.sock")

    def calls():
        return (_call_as(uid_a, inner, "GetRSpec"),
                _call_as(uid_b, inner, "GetRSpec"),
                # A forged name is ignored: the caller still gets its own rspec.
                _call_as(uid_a, inner, "GetRSpec", '["pl_b"]'),
                _call_as(uid_a, str(d / "agent.sock"), "GetRecord"),
                _call_as(uid_b, inner, "GetEffectiveRSpec", '["pl_a"]'))

    ra, rb, forged, record, eff = await _serving(agent, calls)
    assert ra["ok"]["cpu_share"] == 11
    assert rb["ok"]["cpu_share"] == 22
    assert forged["ok"]["cpu_share"] == 11
    assert record["ok"]["name"] == "pl_a"
    assert eff["ok"]["cpu_share"] == 22


async def test_host_callers(api_env) -> None:
    agent, d = api_env
    await _setup(agent)
    sock = str(d / "agent.sock")

    def calls():
        c = client(sock)
        as_root = c.GetRSpec("pl_b")
        with pytest.raises(xmlrpc.client.Fault) as missing:
            c.GetRSpec("pl_zz")
        xids = c.GetXIDs()
        keys = c.GetSSHKeys()
        with pytest.raises(xmlrpc.client.Fault) as unknown:
            c.NoSuchCall()
        with pytest.raises(xmlrpc.client.Fault) as unsupported:
            c.Ticket("x")
        other = _call_as(65534, sock, "GetRSpec", '["pl_a"]')
        public = _call_as(65534, sock, "GetXIDs")
        return as_root, missing.value, xids, keys, unknown.value, unsupported.value, other, public

    as_root, missing, xids, keys, unknown, unsupported, other, public = await _serving(agent, calls)
    assert as_root["cpu_share"] == 22
    assert missing.faultCode == 102 and "pl_zz" in missing.faultString
    assert set(xids) == {"pl_a", "pl_b"} and min(xids.values()) == POOL
    assert keys["pl_a"] == "ssh-ed25519 AAAA pl_a"
    assert unknown.faultCode == 100
    assert unsupported.faultCode == 102 and "malformed" in unsupported.faultString
    assert other["fault"] == 108
    assert set(public["ok"]) == {"pl_a", "pl_b"}


async def test_rate_limit_and_hostile_clients(api_env) -> None:
    agent, d = api_env
    await _setup(agent)
    sock = str(d / "agent.sock")

    def calls():
        import socket

        # A client that connects and says nothing, one that sends garbage, one that
        # announces a huge body: none of them stops the agent serving others.
        idle = socket.socket(socket.AF_UNIX)
        idle.connect(sock)
        junk = socket.socket(socket.AF_UNIX)
        junk.connect(sock)
        junk.sendall(b"\x00" * 20000)
        big = socket.socket(socket.AF_UNIX)
        big.connect(sock)
        big.sendall(b"POST / HTTP/1.0\r\nContent-Length: 999999999\r\n\r\n")
        big_answer = big.recv(100)
        bad_xml = socket.socket(socket.AF_UNIX)
        bad_xml.connect(sock)
        bad_xml.sendall(b"POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\n<a><b")
        bad_answer = bad_xml.recv(4096)
        c = client(sock)
        results: list[Any] = []
        for _ in range(15):
            try:
                c.GetXIDs()
                results.append("ok")
            except xmlrpc.client.Fault as f:
                results.append(f.faultCode)
        for s in (idle, junk, big, bad_xml):
            s.close()
        return big_answer, bad_answer, results

    big_answer, bad_answer, results = await _serving(agent, calls)
    assert b"413" in big_answer
    assert b"faultCode" in bad_answer and b"malformed" in bad_answer
    # burst 10, of which the malformed request used one
    assert results.count("ok") in (9, 10) and 105 in results


async def test_one_slice_cannot_hold_every_connection(api_env) -> None:
    """A sliver opening many idle connections gets at most a few; the others are closed
    at once, and another sliver is served meanwhile [F4]."""
    agent, d = api_env
    await _setup(agent)
    inner = str(agent.api.api_dir / "agent.sock")
    uid_a = POOL + agent.state.uid_range_of("pl_a") * SIZE  # type: ignore[operator]
    uid_b = POOL + agent.state.uid_range_of("pl_b") * SIZE  # type: ignore[operator]

    def hog_and_call() -> tuple[bytes, dict, float]:
        import socket

        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(uid_a)
                os.setuid(uid_a)
                socks = []
                for _ in range(30):
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(inner)
                    socks.append(s)
                last = socks[-1]
                last.settimeout(1.5)
                try:
                    verdict = b"closed" if last.recv(1) == b"" else b"open"
                except TimeoutError:
                    verdict = b"open"
                os.write(wfd, verdict)
                time.sleep(4)
            finally:
                os._exit(0)
        os.close(wfd)
        verdict = os.read(rfd, 16)
        os.close(rfd)
        t0 = time.monotonic()
        res = _call_as(uid_b, inner, "GetRSpec")
        took = time.monotonic() - t0
        os.waitpid(pid, 0)
        return verdict, res, took

    verdict, res, took = await _serving(agent, hog_and_call)
    assert verdict == b"closed"
    assert res["ok"]["cpu_share"] == 22 and took < 1.5


async def test_a_failing_lookup_ends_one_connection_not_the_agent(api_env, monkeypatch) -> None:
    """An exception where the caller is looked up (here a locked state database) closes
    that connection; the service goes on answering."""
    import sqlite3

    agent, d = api_env
    await _setup(agent)
    sock = str(d / "agent.sock")
    real = agent.state.uid_ranges
    failing = [True]

    def uid_ranges(*a: Any, **k: Any) -> Any:
        if failing[0]:
            raise sqlite3.OperationalError("database is locked")
        return real(*a, **k)

    monkeypatch.setattr(agent.state, "uid_ranges", uid_ranges)

    def calls():
        with pytest.raises((OSError, xmlrpc.client.ProtocolError, EOFError)):
            client(sock).GetXIDs()
        failing[0] = False
        return client(sock).GetXIDs()

    xids = await _serving(agent, calls)
    assert set(xids) == {"pl_a", "pl_b"}


async def test_stop_holds_until_start(api_env) -> None:
    """The local API's Stop lasts until Start (nodemanager spec §2.5), not until the
    next reconcile; the node admin may call both."""
    agent, d = api_env
    await _setup(agent)
    sock = str(d / "agent.sock")
    be: FakeBackend = agent.backend
    api = agent.api
    async with trio.open_nursery() as nursery:
        await nursery.start(api.serve)
        assert await trio.to_thread.run_sync(lambda: client(sock).Stop("pl_a")) == 1
        assert be.contexts["pl_a"]["frozen"]
        await agent.reconcile_now()
        assert be.contexts["pl_a"]["frozen"] and not be.contexts["pl_b"]["frozen"]
        rec = agent.state.get_sliver("pl_a")
        assert rec is not None and rec.state == "stopped" and "until Start" in rec.message
        del be.contexts["pl_a"]             # its context died: re-made, still held
        await agent.reconcile_now()
        assert be.contexts["pl_a"]["frozen"]
        assert await trio.to_thread.run_sync(lambda: client(sock).Start("pl_a")) == 1
        await agent.reconcile_now()
        assert not be.contexts["pl_a"]["frozen"]
        assert agent.state.held() == set()
        nursery.cancel_scope.cancel()


AMBIGUOUS = [
    # two Content-Length: the old hand parser let the last one win (request smuggling)
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 200\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 200\r\n\r\n",
    # Transfer-Encoding with Content-Length: the old parser ignored Transfer-Encoding
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    # Transfer-Encoding alone: the API takes only bodies of an announced length
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n<a/>x\r\n0\r\n\r\n",
    b"POST / HTTP/1.0\r\n\r\n<a/>",   # no length at all
    b"POST / HTTP/1.0\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.0\r\nContent Length: 5\r\n\r\n<a/>x",   # not a header name
]


@pytest.mark.parametrize("request_bytes", AMBIGUOUS)
async def test_ambiguous_requests_are_refused_with_400(api_env, request_bytes) -> None:
    """HTTP on the socket is parsed by h11: a request with two framings is refused before
    any call runs, and the agent goes on serving."""
    agent, d = api_env
    await _setup(agent)
    sock = str(d / "agent.sock")
    body = xmlrpc.client.dumps((), "GetXIDs").encode()

    def calls():
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.settimeout(15)
        s.connect(sock)
        s.sendall(request_bytes + body)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        s.close()
        return answer, client(sock).GetXIDs()

    answer, xids = await _serving(agent, calls)
    assert answer.startswith(b"HTTP/1.0 400 "), answer[:100]
    assert b"methodResponse" not in answer
    assert set(xids) == {"pl_a", "pl_b"}


async def test_one_post_per_connection_with_its_length(api_env) -> None:
    """A well-framed POST (HTTP/1.1 or 1.0, duplicate equal Content-Length is one
    length) is answered once, HTTP/1.0 with Connection: close, whatever follows it."""
    agent, d = api_env
    await _setup(agent)
    sock = str(d / "agent.sock")
    body = xmlrpc.client.dumps((), "GetXIDs").encode()
    head = (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nContent-Length: %d\r\n\r\n"
            % (len(body), len(body)))

    def call():
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.settimeout(15)
        s.connect(sock)
        s.sendall(head + body + head + body)   # a second, pipelined request is not served
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        s.close()
        return answer

    answer = await _serving(agent, call)
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Connection: close\r\n" in answer
    assert answer.count(b"methodResponse") == 2   # one response (open and close tags)
    assert b"pl_a" in answer


async def test_get_bandwidth_without_shaping_is_a_clear_fault(api_env) -> None:
    agent, d = api_env
    await _setup(agent)
    uid_a = POOL + agent.state.uid_range_of("pl_a") * SIZE
    inner = str(agent.api.api_dir / "agent.sock")
    (got,) = await _serving(agent, lambda: (_call_as(uid_a, inner, "GetBandwidth"),))
    assert got["fault"] == FAULT_UNSUPPORTED and "[bandwidth] interfaces" in got["msg"]
