"""Safe raw sockets on the real kernel (loopback): a slice's sniffer sees its traffic
and none of another slice's, its filter cannot be replaced, the error socket gets
ICMP errors about its own traffic only, what the slice holds cannot send, and raw
sends are checked."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest
import trio

from agent.ports import PortRange, PortTable, read_ephemeral_range
from agent.rawsock import RawSendRefused, RawSockets, error_filter, sniffer_filter
from kernel import cbpf
from kernel import packet as pk

pytestmark = pytest.mark.kernel


def free_udp_ports(count: int, avoid: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
    lo = read_ephemeral_range()[0]
    out: list[int] = []
    port = 20000 + (os.getpid() * 13) % (lo - 21000)
    while len(out) < count:
        port = port + 1 if port + 1 < lo else 20000
        if port in avoid:
            continue
        try:
            for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                with socket.socket(fam, socket.SOCK_DGRAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        out.append(port)
    return out


@pytest.fixture
def setup() -> Iterator[tuple[RawSockets, PortTable, list[int]]]:
    table = PortTable([], read_ephemeral_range())
    pa, pb, closed, recv = free_udp_ports(4)
    table.grant("a", [PortRange("udp", pa, pa)])
    table.grant("b", [PortRange("udp", pb, pb)])
    raw = RawSockets(lambda: table)
    try:
        yield raw, table, [pa, pb, closed, recv]
    finally:
        raw.close()


def udp_send(family: int, host: str, sport: int, dport: int, payload: bytes) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, sport))
        s.sendto(payload, (host, dport))


def collect(sock: socket.socket, settle: float = 0.2) -> list[bytes]:
    time.sleep(settle)
    return pk.drain(sock)


def test_sniffer_sees_own_traffic_only(setup: tuple[RawSockets, PortTable, list[int]]) -> None:
    """a's flows between its own ports are shown (both directions, v4 and v6); b's are
    not; and neither is a flow between a's port and a socket of this node that is not
    a's (`recv`: a host socket, say the agent's PLC session on loopback): F30."""
    raw, table, (pa, pb, closed, recv) = setup
    (pa2,) = free_udp_ports(1, avoid={pa, pb, closed, recv})
    table.grant("a", [PortRange("udp", pa2, pa2)])
    tag = str(os.getpid()).encode()
    with raw.packet_socket("a", "sniffer") as sniff:
        for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            udp_send(fam, host, pa, pa2, b"A-out-" + tag)   # a's port to a's port
            udp_send(fam, host, pa2, pa, b"A-in-" + tag)
            udp_send(fam, host, pa, recv, b"H-out-" + tag)  # a's port <-> a host socket
            udp_send(fam, host, recv, pa, b"H-in-" + tag)
            udp_send(fam, host, pb, recv, b"B-out-" + tag)
            udp_send(fam, host, recv, pb, b"B-in-" + tag)
        got = collect(sniff)
    mine = [p for p in got if tag in p]
    assert not [p for p in mine if b"B-" in p or b"H-" in p]
    v4 = {p[28:] for p in mine if p[0] >> 4 == 4}
    v6 = {p[48:] for p in mine if p[0] >> 4 == 6}
    assert v4 == v6 == {b"A-out-" + tag, b"A-in-" + tag}
    # every packet shown is to or from a's port
    for p in got:
        off = (p[0] & 15) * 4 if p[0] >> 4 == 4 else 40
        assert {pa, pa2} & set(struct.unpack_from("!HH", p, off)), p[:48]


def test_sniffer_filter_cannot_be_replaced(setup: tuple[RawSockets, PortTable, list[int]]) -> None:
    raw, _, _ = setup
    with raw.packet_socket("a", "sniffer") as sniff:
        prog, buf = cbpf.fprog(pk.accept_all())
        with pytest.raises(PermissionError):
            sniff.setsockopt(socket.SOL_SOCKET, pk.SO_ATTACH_FILTER, prog)
        with pytest.raises(PermissionError):
            sniff.setsockopt(socket.SOL_SOCKET, pk.SO_DETACH_FILTER, 0)
        with pytest.raises(PermissionError):
            sniff.setsockopt(socket.SOL_SOCKET, pk.SO_LOCK_FILTER, 0)
        del buf
    # an unlocked socket accepts the same calls: the lock is what refuses them
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        pk.attach_filter(s, pk.accept_all(), lock=False)
        s.setsockopt(socket.SOL_SOCKET, pk.SO_DETACH_FILTER, 0)


def test_error_socket_gets_own_icmp_errors(setup: tuple[RawSockets, PortTable, list[int]]) -> None:
    raw, _, (pa, pb, closed, _) = setup
    with raw.packet_socket("a", "errors") as errs:
        for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            udp_send(fam, host, pa, closed, b"to-closed")  # port unreachable, about a
            udp_send(fam, host, pb, closed, b"to-closed")  # about b
        got = collect(errs)
    quoted_sports = set()
    for p in got:
        if p[0] >> 4 == 4:
            ihl = (p[0] & 15) * 4
            assert p[9] == 1 and p[ihl] == 3  # ICMP destination unreachable
            inner = ihl + 8
            quoted_sports.add(("v4", struct.unpack_from("!H", p, inner + (p[inner] & 15) * 4)[0]))
        else:
            assert p[6] == 58 and p[40] == 1
            quoted_sports.add(("v6", struct.unpack_from("!H", p, 88)[0]))
    assert quoted_sports == {("v4", pa), ("v6", pa)}


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + udp


def with_options(packet: bytes, options: bytes) -> bytes:
    """`packet` (IHL 5) with IPv4 `options` (padded to 4 bytes) after its header."""
    options += b"\x00" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    head = bytes([0x40 | ihl, packet[1]]) + struct.pack("!H", len(packet) + len(options))
    return head + packet[4:20] + options + packet[20:]


def test_raw_send_checked(setup: tuple[RawSockets, PortTable, list[int]]) -> None:
    raw, _, (pa, pb, _, recv) = setup
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", recv))
        rx.settimeout(5)
        pkt = ipv4_udp("127.0.0.1", "127.0.0.1", pa, recv, b"raw-from-a")
        assert raw.raw_send("a", pkt) == len(pkt)
        data, peer = rx.recvfrom(100)
        assert data == b"raw-from-a" and peer[1] == pa
    for slice_name, packet, err in [
        ("a", ipv4_udp("127.0.0.1", "127.0.0.1", pb, recv, b"x"), errno.EACCES),   # b's port
        ("b", ipv4_udp("127.0.0.1", "127.0.0.1", pa, recv, b"x"), errno.EACCES),
        ("a", ipv4_udp("127.0.0.1", "127.0.0.1", 40000, recv, b"x"), errno.EACCES),  # ephemeral
        ("a", ipv4_udp("192.0.2.1", "127.0.0.1", pa, recv, b"x"), errno.EADDRNOTAVAIL),
        ("a", ipv4_udp("127.0.0.1", "127.0.0.1", pa, recv, b"x")[:9] + b"\x2f"
         + ipv4_udp("127.0.0.1", "127.0.0.1", pa, recv, b"x")[10:], errno.EPERM),   # GRE
        ("a", b"\x10" * 40, errno.EINVAL),
        # F14: IPv4 options (here a loose source route via 127.0.0.2) are refused
        ("a", with_options(ipv4_udp("127.0.0.1", "127.0.0.1", pa, recv, b"x"),
                           bytes([131, 7, 4]) + socket.inet_aton("127.0.0.2") + b"\x00"),
         errno.EPERM),
        ("a", b"\x45", errno.EMSGSIZE),
    ]:
        with pytest.raises(RawSendRefused) as exc:
            raw.raw_send(slice_name, packet)
        assert exc.value.errno == err, (slice_name, exc.value)


def test_filters_bounded_and_empty_holdings(setup: tuple[RawSockets, PortTable, list[int]]) -> None:
    raw, table, _ = setup
    with pytest.raises(RawSendRefused):
        raw.packet_socket("nobody", "sniffer")
    with pytest.raises(RuntimeError, match="not running"):
        raw.open_sniffer("a")
    many = [PortRange("udp", p, p, "127.0.0.1") for p in range(1000, 1600, 2)]
    with pytest.raises(ValueError, match="instructions"):
        sniffer_filter(many)
    assert len(error_filter(many[:50])) % 8 == 0


async def test_relay_delivers_own_traffic_and_cannot_send(
        setup: tuple[RawSockets, PortTable, list[int]]) -> None:
    raw, _, (pa, pb, _, recv) = setup
    tag = f"relay-{os.getpid()}".encode()
    async with trio.open_nursery() as nursery:
        await nursery.start(raw.run)
        held = raw.open_sniffer("a")             # what the slice gets
        assert held.type == socket.SOCK_SEQPACKET
        with pytest.raises(BrokenPipeError):
            held.send(b"\x45" + bytes(40))      # it cannot send anything
        udp_send(socket.AF_INET, "127.0.0.1", pa, pa, b"A" + tag)
        udp_send(socket.AF_INET, "127.0.0.1", pb, pb, b"B" + tag)
        got: list[bytes] = []
        with trio.fail_after(5):
            while not any(b"A" + tag in p for p in got):
                await trio.lowlevel.wait_readable(held)
                got += pk.drain(held)
        assert not any(b"B" + tag in p for p in got)
        assert all(p[0] >> 4 in (4, 6) for p in got)   # from the network header on
        stats = raw.relays["a"][0]
        assert stats.forwarded >= 1
        held.close()                                  # the slice lets go ...
        with trio.fail_after(5):
            while raw._nursery is not None and raw._nursery.child_tasks and \
                    any(t.name.startswith("relay:") for t in raw._nursery.child_tasks):
                udp_send(socket.AF_INET, "127.0.0.1", pa, pa, b"wake")
                await trio.sleep(0.05)                # ... and the relay ends
        nursery.cancel_scope.cancel()


def icmp_echo(src: str, dst: str, ident: int, payload: bytes) -> bytes:
    def csum(data: bytes) -> int:
        data += b"\0" * (len(data) % 2)
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 1, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + body


def test_icmp_ids_in_sniffer_and_raw_send(setup: tuple[RawSockets, PortTable, list[int]]) -> None:
    raw, table, _ = setup
    ida, idb = 40000 + os.getpid() % 10000, 50001 + os.getpid() % 10000
    table.grant("a", [PortRange("icmp", ida, ida, "127.0.0.1")])
    table.grant("b", [PortRange("icmp", idb, idb, "127.0.0.1")])
    tag = f"ping-{os.getpid()}".encode()
    with raw.packet_socket("a", "sniffer") as sniff:
        assert raw.raw_send("a", icmp_echo("127.0.0.1", "127.0.0.1", ida, b"A" + tag)) > 0
        assert raw.raw_send("b", icmp_echo("127.0.0.1", "127.0.0.1", idb, b"B" + tag)) > 0
        with pytest.raises(RawSendRefused):
            raw.raw_send("a", icmp_echo("127.0.0.1", "127.0.0.1", idb, b"x"))
        got = [p for p in collect(sniff) if tag in p]
    types = sorted(p[20] for p in got if b"A" + tag in p)
    assert types == [0, 8] or types == [0, 0, 8, 8]   # request and the kernel's reply
    assert not [p for p in got if b"B" + tag in p]
