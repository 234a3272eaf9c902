"""Sniffer and error-socket relays follow port ownership (F13) and are bounded per
slice (F17): real packet sockets on loopback, wired as the agent wires them
(`GuardService`: port changes close the relays of ports a slice lost)."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import pytest
import trio

from agent.faults import APIFault, FdReply
from agent.guard import GuardService
from agent.rawsock import RELAYS_PER_SLICE
from agent.tokenbucket import TokenBuckets
from kernel import packet as pk
from tests.kernel.test_packet import free_udp_ports, udp_send

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]


class Caller(NamedTuple):
    kind: str
    name: str
    pid: int = 1
    uid: int = 1


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[GuardService]:
    service = GuardService(None, [], tmp_path, ephemeral=(32768, 60999), reserved_ports="")
    async with trio.open_nursery() as nursery:
        await nursery.start(service.raw.run)
        yield service
        nursery.cancel_scope.cancel()


def open_end(svc: GuardService, who: Caller, kind: str = "sniffer") -> socket.socket:
    call = svc.api.OpenSniffer if kind == "sniffer" else svc.api.OpenErrorSocket
    reply = call(who)
    assert isinstance(reply, FdReply) and len(reply.socks) == 1
    sock = reply.socks[0]
    sock.setblocking(False)
    return sock


async def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> list[bytes]:
    """Every packet on `sock` until the agent closes its end (EOF)."""
    got: list[bytes] = []
    with trio.fail_after(timeout):
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                pkt = sock.recv(65536)
            except BlockingIOError:
                continue
            if not pkt:
                return got
            got.append(pkt)


async def sees(sock: socket.socket, port: int, payload: bytes, timeout: float = 5.0) -> bool:
    """Send `payload` from and to 127.0.0.1:`port` until it shows up on `sock` (a flow
    whose other end is a node socket not the slice's is never shown: F30)."""
    with trio.move_on_after(timeout):
        while True:
            udp_send(socket.AF_INET, "127.0.0.1", port, port, payload)
            await trio.sleep(0.05)
            if any(payload in p for p in pk.drain(sock)):
                return True
    return False


async def test_release_closes_sniffer_before_the_next_owner_talks(svc: GuardService) -> None:
    tag = os.getpid()
    a, b = Caller("sliver", f"a{tag}"), Caller("sliver", f"b{tag}")
    p, q = free_udp_ports(2)
    svc.api.ReservePort(a, f"udp:{p}@127.0.0.1")
    sniffer, errors = open_end(svc, a), open_end(svc, a, "errors")
    assert await sees(sniffer, p, b"mine-before-release")
    # a's relays of other ports are untouched by b's changes
    svc.api.ReservePort(b, f"udp:{q}@127.0.0.1")
    svc.api.ReleasePort(b, f"udp:{q}@127.0.0.1")
    assert await sees(sniffer, p, b"still-mine")
    svc.api.ReleasePort(a, f"udp:{p}@127.0.0.1")
    svc.api.ReservePort(b, f"udp:{p}@127.0.0.1")
    secret = f"b-private-{tag}".encode()
    udp_send(socket.AF_INET, "127.0.0.1", p, p, secret)   # would pass a's filter
    for sock in (sniffer, errors):
        got = await read_until_closed(sock)
        assert not any(secret in pkt for pkt in got)
        sock.close()
    assert svc.raw.relays.get(a.name) is None


async def test_tag_change_and_destroy_close_relays(svc: GuardService) -> None:
    tag = os.getpid()
    a = Caller("sliver", f"t{tag}")
    p, q = free_udp_ports(2)
    svc.set_tag_ports(a.name, f"udp:{p}@127.0.0.1,udp:{q}@127.0.0.1")
    by_tag = open_end(svc, a)
    svc.set_tag_ports(a.name, f"udp:{p}@127.0.0.1")   # q dropped from the tag at PLC
    await read_until_closed(by_tag)
    by_tag.close()
    again = open_end(svc, a)                          # covers p only: survives gaining q
    svc.set_tag_ports(a.name, f"udp:{p}@127.0.0.1,udp:{q}@127.0.0.1")
    assert await sees(again, p, b"after-gain")
    svc.sliver_destroyed(a.name)
    await read_until_closed(again)
    again.close()


async def test_relays_capped_per_slice(svc: GuardService) -> None:
    a = Caller("sliver", f"c{os.getpid()}")
    (p,) = free_udp_ports(1)
    svc.api.ReservePort(a, f"udp:{p}@127.0.0.1")
    ends = [open_end(svc, a, kind) for kind in ["sniffer", "errors"] * (RELAYS_PER_SLICE // 2)]
    try:
        with pytest.raises(APIFault) as exc:
            svc.api.OpenSniffer(a)
        assert exc.value.code == 102 and "close one" in exc.value.message
        assert len(svc.raw.relays[a.name]) == RELAYS_PER_SLICE
    finally:
        for s in ends:
            s.close()
    svc.api.ReleasePort(a, f"udp:{p}@127.0.0.1")      # closes them all at once
    with trio.fail_after(5):
        while svc.raw.relays.get(a.name):
            await trio.sleep(0.02)
    svc.api.ReservePort(a, f"udp:{p}@127.0.0.1")
    open_end(svc, a).close()


async def test_relays_of_a_slice_share_one_packet_budget(svc: GuardService) -> None:
    """Two sniffers of one slice on a flooded port forward at most the slice's budget
    together (here 100/s, burst 20); the rest never costs the agent a copy."""
    rate, burst = 100.0, 20
    svc.raw._budget = TokenBuckets(rate, burst, trio.current_time)
    a = Caller("sliver", f"f{os.getpid()}")
    (p,) = free_udp_ports(1)
    svc.api.ReservePort(a, f"udp:{p}@127.0.0.1")
    ends = [open_end(svc, a), open_end(svc, a)]
    try:
        start = trio.current_time()
        received = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.bind(("127.0.0.1", p))   # from a's port to a's port: shown (F30)
            while trio.current_time() - start < 1.0:
                for _ in range(100):
                    tx.sendto(b"flood", ("127.0.0.1", p))
                await trio.sleep(0.01)
                received += sum(len(pk.drain(s)) for s in ends)
        await trio.sleep(0.1)
        received += sum(len(pk.drain(s)) for s in ends)
        elapsed = trio.current_time() - start
        forwarded = sum(st.forwarded for st in svc.raw.relays[a.name])
        assert 0 < received <= forwarded <= burst + rate * elapsed + 5, (forwarded, elapsed)
        assert sum(st.throttled for st in svc.raw.relays[a.name]) > 0
    finally:
        for s in ends:
            s.close()
