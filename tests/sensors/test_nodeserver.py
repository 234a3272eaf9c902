"""The node sensor server on loopback (ephemeral port) under hostile clients."""

from __future__ import annotations

import json
from typing import Any

import trio

from sensors.nodeserver import NodeServer
from sensors.readers import NodeReader
from sensors.snapshot import Snapshots


class CountingNode(NodeReader):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def read(self) -> dict[str, dict[str, Any]]:
        self.calls += 1
        return super().read()


class NoSlivers:
    def read(self, names: Any) -> dict[str, dict[str, Any]]:
        return {n: {} for n in names}

    def htb_bytes(self, minors: Any) -> dict[str, int]:
        return {}


def make(**kw: Any) -> tuple[NodeServer, CountingNode]:
    node = CountingNode()
    snaps = Snapshots(lambda: {"pl_a": {"state": "running", "slice_id": 1}}, ttl=kw.pop("ttl", 1.0),
                      node_reader=node, sliver_reader=NoSlivers())  # type: ignore[arg-type]
    return NodeServer(snaps, **kw), node


async def start(nursery: trio.Nursery, server: NodeServer) -> int:
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    return int(listeners[0].socket.getsockname()[1])


async def exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    with trio.fail_after(timeout):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        async with s:
            await s.send_all(data)
            out = b""
            while chunk := await s.receive_some(65536):
                out += chunk
            return out


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode()


async def test_paths_and_formats() -> None:
    server, _ = make()
    async with trio.open_nursery() as n:
        port = await start(n, server)
        assert b"/sensors/load" in await exchange(port, get("/"))
        out = await exchange(port, get("/sensors/memory?format=json"))
        head, body = out.split(b"\r\n\r\n", 1)
        assert b"application/json" in head and json.loads(body)["total_bytes"] > 0
        out = await exchange(port, get("/sensors/memory", "Accept: application/json\r\n"))
        assert json.loads(out.split(b"\r\n\r\n", 1)[1])["total_bytes"] > 0
        assert b"\r\n\r\nname: pl_a\n" in await exchange(port, get("/slices"))
        assert b"state: running" in await exchange(port, get("/slices/pl_a"))
        assert b"pl_a,1," in await exchange(port, get("/slicestat"))
        assert b"# TYPE planetlab_node_load_load1 gauge" in await exchange(port, get("/metrics"))
        assert (await exchange(port, get("/slices/pl_nosuch"))).startswith(b"HTTP/1.1 404")
        assert (await exchange(port, get("/../../etc/passwd"))).startswith(b"HTTP/1.1 404")
        assert (await exchange(port, get("/sensors/load?format=xml"))).startswith(b"HTTP/1.1 400")
        head = await exchange(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        out = await exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert out.startswith(b"HTTP/1.1 405") and b"Allow: GET, HEAD" in out
        assert (await exchange(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        n.cancel_scope.cancel()


async def test_keep_alive_serves_several_requests() -> None:
    server, _ = make()
    async with trio.open_nursery() as n:
        port = await start(n, server)
        one = b"GET /sensors/load HTTP/1.1\r\nHost: x\r\n\r\n"
        out = await exchange(port, one + one + get("/sensors/uptime"))
        assert out.count(b"HTTP/1.1 200") == 3
        n.cancel_scope.cancel()


async def test_huge_head_is_431() -> None:
    server, _ = make(head_max=8192)
    async with trio.open_nursery() as n:
        port = await start(n, server)
        big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        try:
            out = await exchange(port, big)
        except trio.BrokenResourceError:   # closed while we still sent: also refused
            out = b"HTTP/1.1 431"
        assert out.startswith(b"HTTP/1.1 431")
        n.cancel_scope.cancel()


async def test_slowloris_is_cut_at_the_deadline_and_others_are_served() -> None:
    server, _ = make(deadline=0.5)
    async with trio.open_nursery() as n:
        port = await start(n, server)
        slow = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
        for s in slow:
            await s.send_all(b"GET / HTTP/1.1\r\nHo")    # and never more
        t0 = trio.current_time()
        assert (await exchange(port, get("/sensors/load"))).startswith(b"HTTP/1.1 200")
        assert trio.current_time() - t0 < 0.4     # not delayed by the slow ones
        with trio.fail_after(3):
            for s in slow:
                out = b""
                while chunk := await s.receive_some(4096):
                    out += chunk
                assert out.startswith(b"HTTP/1.1 408")
                await s.aclose()
        n.cancel_scope.cancel()


async def test_connection_cap_answers_503_and_frees_slots() -> None:
    server, _ = make(max_connections=4, deadline=1.0)
    async with trio.open_nursery() as n:
        port = await start(n, server)
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
        await trio.sleep(0.1)
        assert (await exchange(port, get("/"))).startswith(b"HTTP/1.1 503")
        for s in idle:
            await s.aclose()
        await trio.sleep(0.1)
        assert (await exchange(port, get("/"))).startswith(b"HTTP/1.1 200")
        n.cancel_scope.cancel()


async def test_flood_shares_one_collection() -> None:
    server, node = make(ttl=60.0, max_connections=200)
    async with trio.open_nursery() as n:
        port = await start(n, server)
        results: list[bytes] = []

        async def one(path: str) -> None:
            results.append(await exchange(port, get(path)))
        async with trio.open_nursery() as flood:
            for i in range(150):
                flood.start_soon(one, ("/metrics", "/slices", "/sensors/cpu")[i % 3])
        assert len(results) == 150
        assert all(r.startswith(b"HTTP/1.1 200") for r in results)
        assert node.calls == 1
        times = {line for r in results for line in r.split(b"\r\n")
                 if line.startswith(b"X-Snapshot-Time")}
        assert len(times) == 1
        n.cancel_scope.cancel()


async def test_answers_are_encoded_once_per_snapshot_and_gzipped_on_request(
        monkeypatch: Any) -> None:
    import gzip

    from sensors import nodeserver
    calls: list[tuple[str, bool]] = []
    real = nodeserver.encode

    def counting(snap: Any, path: str, fmt: str, gzipped: bool) -> Any:
        calls.append((path, gzipped))
        return real(snap, path, fmt, gzipped)
    monkeypatch.setattr(nodeserver, "encode", counting)
    server, _ = make(ttl=60.0)
    async with trio.open_nursery() as n:
        port = await start(n, server)
        gz = "Accept-Encoding: deflate, gzip;q=0.5\r\n"
        plain = await exchange(port, get("/metrics"))
        zipped = [await exchange(port, get("/metrics", gz)) for _ in range(3)]
        refused = await exchange(port, get("/metrics", "Accept-Encoding: gzip;q=0\r\n"))
        small = [await exchange(port, get("/sensors/load", gz)) for _ in range(3)]
        head = await exchange(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n"
                              b"Accept-Encoding: gzip\r\nConnection: close\r\n\r\n")
        n.cancel_scope.cancel()
    assert sorted(calls) == [("/metrics", False), ("/metrics", True), ("/sensors/load", False)]
    plain_head, plain_body = plain.split(b"\r\n\r\n", 1)
    z_head, z_body = zipped[0].split(b"\r\n\r\n", 1)
    assert b"Content-Encoding: gzip" in z_head and b"Vary: Accept-Encoding" in z_head
    assert b"Content-Encoding" not in plain_head and refused == plain
    assert gzip.decompress(z_body) == plain_body and len(z_body) < len(plain_body)
    assert zipped[1] == zipped[0] == zipped[2] and small[0] == small[2]
    assert b"Content-Encoding" not in small[0]           # small answers stay plain
    assert b"Content-Length: %d\r\n" % len(z_body) in head and head.endswith(b"\r\n\r\n")
