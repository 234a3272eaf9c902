"""F30: host-held ports are never granted, shown or sent as, on the real kernel
(sock_diag): host sockets are this test process's (root); the slice's sockets are made
by a forked child under a uid of the slice's range."""

from __future__ import annotations

import os
import socket
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import trio

from agent.faults import APIFault
from agent.guard import GuardService
from agent.ports import HOST_SERVICE, HostPorts, fixed_host_ports, plc_port
from tests.kernel.test_packet import free_udp_ports, ipv4_udp

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]

SLICE_UID = 3_000_000 + os.getpid() % 10_000   # "a"'s range: this one uid


class Caller(NamedTuple):
    kind: str
    name: str
    pid: int = 1
    uid: int = 1


A = Caller("sliver", "a")


def socket_as(uid: int, family: int, stype: int, addr: tuple) -> socket.socket:  # type: ignore[type-arg]
    """A socket made and bound by `uid` (its sock_diag uid), handed back by SCM_RIGHTS."""
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            s = socket.socket(family, stype)
            s.bind(addr)
            socket.send_fds(theirs, [b"s"], [s.fileno()])
        finally:
            os._exit(0)
    try:
        _, fds, _, _ = socket.recv_fds(mine, 1, 1)
    finally:
        os.waitpid(pid, 0)
        mine.close()
        theirs.close()
    return socket.socket(fileno=fds[0])


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[tuple[GuardService, int]]:
    (plc,) = free_udp_ports(1)
    host = HostPorts(lambda uid: "a" if uid == SLICE_UID else None,
                     fixed_host_ports(f"http://127.0.0.1:{plc}/PLCAPI/", [], []))
    service = GuardService(None, [], tmp_path, ephemeral=(32768, 60999), reserved_ports="",
                           host_ports=host)
    try:
        yield service, plc
    finally:
        service.raw.close()


def refused(svc: GuardService, spec: str) -> str:
    with pytest.raises(APIFault) as exc:
        svc.api.ReservePort(A, spec)
    assert exc.value.code == 102, exc.value
    return exc.value.message


def test_ports_where_host_sockets_are_bound_are_not_reservable(
        svc: tuple[GuardService, int]) -> None:
    service, plc = svc
    ports = free_udp_ports(6, avoid={plc})
    held = []
    try:
        for (fam, stype, addr), port in zip(
                [(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
                 (socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0"),
                 (socket.AF_INET6, socket.SOCK_STREAM, "::"),
                 (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1"),
                 (socket.AF_INET6, socket.SOCK_DGRAM, "::1")], ports[:5], strict=True):
            s = socket.socket(fam, stype)
            s.bind((addr, port))
            if stype == socket.SOCK_STREAM:
                s.listen()
            held.append(s)
            proto = "tcp" if stype == socket.SOCK_STREAM else "udp"
            # any address asked for, whichever address the host socket is on
            for spec in (f"{proto}:{port}", f"{proto}:{port}@127.0.0.1", f"{proto}:{port}@::1",
                         f"{proto}:{port - 1}-{port}"):
                assert HOST_SERVICE in refused(service, spec), spec
        # PLC's port: never, even with nothing listening there
        assert "PLC's port" in refused(service, f"tcp:{plc}@127.0.0.1")
        assert service.api.GetPorts(A) == ""
        # a free port is granted as before
        assert service.api.ReservePort(A, f"udp:{ports[5]}@127.0.0.1") == 1
    finally:
        for s in held:
            s.close()


def test_tags_skip_host_ports(svc: tuple[GuardService, int]) -> None:
    service, plc = svc
    busy, free = free_udp_ports(2, avoid={plc - 1, plc, plc + 1})
    with socket.socket() as s:
        s.bind(("127.0.0.1", busy))
        s.listen()
        service.set_tag_ports("a", f"tcp:{busy - 1}-{busy + 1}@127.0.0.1,tcp:{plc},udp:{free}")
    got = service.api.GetPorts(A).split(",")
    assert f"tcp:{busy - 1}@127.0.0.1" in got and f"tcp:{busy + 1}@127.0.0.1" in got
    assert not any(g.startswith((f"tcp:{busy}@", f"tcp:{plc}@")) for g in got), got
    assert f"udp:{free}@127.0.0.1" in got
    skipped = service.ports.host.skipped["a"]
    assert any(f"tcp:{busy}" in s and HOST_SERVICE in s for s in skipped), skipped
    assert any(f"tcp:{plc}" in s for s in skipped), skipped


def test_raw_send_and_sniffer_need_the_slices_own_socket(
        svc: tuple[GuardService, int]) -> None:
    service, plc = svc
    mine, other, dest = free_udp_ports(3, avoid={plc})
    service.api.ReservePort(A, f"udp:{mine}@127.0.0.1,udp:{other}@127.0.0.1,"
                               f"udp:{dest}@127.0.0.1")

    def send(sport: int, dport: int) -> int:
        return service.api.RawSend(A, xmlrpc.client.Binary(
            ipv4_udp("127.0.0.1", "127.0.0.1", sport, dport, b"f30")))

    def fault(sport: int, dport: int) -> str:
        with pytest.raises(APIFault) as exc:
            send(sport, dport)
        assert exc.value.code == 102
        return exc.value.message

    # owned by the table, but no socket of a's there: refused, and so is a sniffer
    assert "holds no socket" in fault(mine, dest)
    with pytest.raises(APIFault, match="holds no socket"):
        service.api.OpenSniffer(A)
    src = socket_as(SLICE_UID, socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", mine))
    rx = socket_as(SLICE_UID, socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", dest))
    try:
        rx.settimeout(5)
        assert send(mine, dest) > 0                     # a's socket to a's socket
        assert rx.recv(10) == b"f30"
        assert "holds no socket" in fault(other, dest)  # still none of a's on `other`
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host:
            host.bind(("127.0.0.1", 0))                 # a host socket on this node
            assert HOST_SERVICE in fault(mine, host.getsockname()[1])
    finally:
        src.close()
        rx.close()


async def test_relay_closes_when_the_slice_lets_its_socket_go(
        svc: tuple[GuardService, int], monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.rawsock import service as rawsock_service
    monkeypatch.setattr(rawsock_service, "RELAY_RECHECK", 0.1)
    service, plc = svc
    (port,) = free_udp_ports(1, avoid={plc})
    service.api.ReservePort(A, f"udp:{port}@127.0.0.1")
    held = socket_as(SLICE_UID, socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", port))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.raw.run)
        end = service.api.OpenSniffer(A).socks[0]
        held.close()             # a host service may now take the port: the relay ends
        with trio.fail_after(5):
            while service.raw.relays.get("a"):
                await trio.sleep(0.05)
        end.close()
        nursery.cancel_scope.cancel()


def test_plc_port_only_when_plc_is_local() -> None:
    assert plc_port("http://127.0.0.1:8000/PLCAPI/", [], []) == 8000
    assert plc_port("https://localhost/PLCAPI/", [], []) == 443
    assert plc_port("https://node1.example/PLCAPI/", ["node1.example"], []) == 443
    assert plc_port("http://[::1]:81/", [], []) == 81
    assert plc_port("http://10.1.2.3:80/", [], ["10.1.2.3"]) == 80
    assert plc_port("https://plc.example/PLCAPI/", ["node1.example"], ["10.1.2.3"]) is None
