"""The guard's slice API calls (GuardAPI) with callers as the slice API makes them."""

from __future__ import annotations

import socket
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import trio

from agent.faults import APIFault, FdReply
from agent.guard import Guard, GuardAPI, PortService
from agent.ports import PortError, PortTable
from agent.rawsock import RawSockets


class Caller(NamedTuple):
    kind: str
    name: str
    pid: int = 1
    uid: int = 1


A, B = Caller("sliver", "a"), Caller("sliver", "b")
ADMIN, HOST = Caller("admin", "root"), Caller("host", "uid:1000")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[GuardAPI]:
    guard = Guard(PortService(PortTable(["192.0.2.1"], (32768, 60999))), tmp_path)
    raw = RawSockets(lambda: guard.ports.table)
    try:
        yield GuardAPI(guard, raw)
    finally:
        raw.close()


def fault(fn, *args) -> APIFault:  # type: ignore[no-untyped-def]
    with pytest.raises(APIFault) as exc:
        fn(*args)
    return exc.value


def test_reserve_release_get(api: GuardAPI) -> None:
    assert api.ReservePort(A, "tcp:8080,udp:5000-5001@127.0.0.1") == 1
    assert "tcp:8080@192.0.2.1" in api.GetPorts(A).split(",")
    f = fault(api.ReservePort, B, "tcp:8080@127.0.0.1")
    assert f.code == 102 and "owned by slice 'a'" in f.message
    assert fault(api.ReservePort, A, "tcp:40000").code == 102     # ephemeral
    assert fault(api.ReservePort, A, "bogus").code == 102
    assert api.ReleasePort(A, "tcp:8080") == 1
    assert api.GetPorts(A) == "udp:5000-5001@127.0.0.1"
    # the admin names the slice; a host user may not call at all
    assert api.ReservePort(ADMIN, "b", "tcp:9000@::1") == 1
    assert api.GetPorts(ADMIN, "b") == "tcp:9000@::1"
    assert fault(api.ReservePort, HOST, "x", "tcp:1").code == 108
    assert fault(api.GetPorts, A, "extra").code == 101


def test_reservation_cap(api: GuardAPI) -> None:
    api.ReservePort(A, "udp:3000-3199@127.0.0.1")
    assert "at most" in fault(api.ReservePort, A, "udp:4000-4099@127.0.0.1").message


def test_privileged_and_host_ports_not_reservable(tmp_path: Path) -> None:
    """F16, as the agent builds the guard (the config's default reserved_ports)."""
    from agent.config import defaults
    from agent.guard import GuardService
    svc = GuardService(None, ["192.0.2.1"], tmp_path, ephemeral=(32768, 60999))
    assert "tcp:22" in defaults().reserved_ports.split(",")
    for spec in ("tcp:22@127.0.0.1", "udp:53", "tcp:999", "udp:123@192.0.2.1", "tcp:1-2000"):
        assert fault(svc.api.ReservePort, A, spec).code == 102, spec
        assert fault(svc.api.ReservePort, ADMIN, "a", spec).code == 102, spec
    assert svc.api.GetPorts(A) == ""
    with pytest.raises(PortError, match="reserved for the host"):
        svc.set_tag_ports("b", "tcp:22")
    svc.set_tag_ports("b", "tcp:80@127.0.0.1")         # privileged: by PLC tag only
    # a squatter's reservation gives way to PLC's tag
    assert svc.api.ReservePort(A, "tcp:2222,udp:2222") == 1
    svc.set_tag_ports("b", "tcp:80@127.0.0.1,tcp:2222")
    assert svc.api.GetPorts(A) == "udp:2222@127.0.0.1,udp:2222@192.0.2.1,udp:2222@::1"
    assert "owned by slice 'b'" in fault(svc.api.ReservePort, A, "tcp:2222@::1").message


@pytest.mark.kernel
async def test_sniffer_and_raw_send_calls(api: GuardAPI) -> None:
    assert fault(api.OpenSniffer, A).code == 102   # owns nothing yet
    api.ReservePort(A, "udp:5555@127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(api.raw.run)
        for call in (api.OpenSniffer, api.OpenErrorSocket):
            reply = call(A)
            assert isinstance(reply, FdReply) and reply.value == 1 and len(reply.socks) == 1
            assert reply.socks[0].family == socket.AF_UNIX
            reply.socks[0].close()
        nursery.cancel_scope.cancel()
    packet = bytes.fromhex("45000000000000004011000000000000") + socket.inet_aton("127.0.0.1")
    packet = packet[:12] + socket.inet_aton("127.0.0.1") + socket.inet_aton("127.0.0.1")
    packet += bytes.fromhex("15b315b3000a0000") + b"hi"
    assert api.RawSend(A, xmlrpc.client.Binary(packet)) == len(packet)
    assert "owned by 'a'" in fault(api.RawSend, B, xmlrpc.client.Binary(packet)).message
    assert fault(api.RawSend, A, "not base64").code == 102


def test_release_port_is_rate_limited_per_slice(tmp_path: Path) -> None:
    """F32: each ReleasePort may start a revocation; a sliver gets RELEASE_BURST at
    once, then RELEASE_RATE a second (fault 105), other slices and the admin unaffected."""
    now = [0.0]
    guard = Guard(PortService(PortTable(["192.0.2.1"], (32768, 60999))), tmp_path)
    api = GuardAPI(guard, None, clock=lambda: now[0])
    api.ReservePort(A, "udp:5000-5099@127.0.0.1")
    for i in range(GuardAPI.RELEASE_BURST):
        assert api.ReleasePort(A, f"udp:{5000 + i}@127.0.0.1") == 1
    f = fault(api.ReleasePort, A, "udp:5050@127.0.0.1")
    assert f.code == 105 and "rate limit" in f.message and "slice a" in f.message
    assert api.GetPorts(A) == "udp:5010-5099@127.0.0.1"   # nothing more released
    api.ReservePort(B, "udp:6000@127.0.0.1")
    assert api.ReleasePort(B, "udp:6000@127.0.0.1") == 1          # another slice
    assert api.ReleasePort(ADMIN, "a", "udp:5051@127.0.0.1") == 1   # the admin
    now[0] += 1.0 / GuardAPI.RELEASE_RATE
    assert api.ReleasePort(A, "udp:5050@127.0.0.1") == 1
