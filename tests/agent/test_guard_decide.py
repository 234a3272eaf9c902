"""The guard's pure decisions (agent.guard.decide), without root or a sliver: reading
a bind's sockaddr bytes (IPv4, IPv6, Unix paths and abstract names, netlink; short
and odd lengths), what a slice may bind (ports it owns, the ephemeral range, the
abstract name prefix `pl/<slice>/`), and the per-slice CPU budget."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from agent.guard.decide import (
    IPPROTO_ICMPV6,
    IPPROTO_MPTCP,
    IPPROTO_UDPLITE,
    CpuBudget,
    Denied,
    Outcome,
    abstract_allowed,
    abstract_prefix,
    ip_decision,
    ip_proto,
    netlink_keep_port,
    netlink_unicast_pid,
    parse_ip_sockaddr,
    refused_for_any_socket,
    unix_abstract_name,
)
from agent.ports import PortRange, PortTable

AF_INET, AF_INET6, AF_UNIX = int(socket.AF_INET), int(socket.AF_INET6), int(socket.AF_UNIX)
STREAM, DGRAM, RAW = int(socket.SOCK_STREAM), int(socket.SOCK_DGRAM), int(socket.SOCK_RAW)
EPH = (32768, 60999)


def sin(address: str, port: int, family: int = AF_INET, size: int = 16) -> bytes:
    raw = struct.pack("<H", family) + struct.pack("!H", port) + socket.inet_aton(address)
    return raw.ljust(size, b"\0")[:size]


def sin6(address: str, port: int, family: int = AF_INET6, size: int = 28) -> bytes:
    raw = struct.pack("<H", family) + struct.pack("!HI", port, 0) + \
        socket.inet_pton(socket.AF_INET6, address)
    return raw.ljust(size, b"\0")[:size]


def sun(path: bytes) -> bytes:
    return struct.pack("<H", AF_UNIX) + path


def snl(nl_pid: int, groups: int) -> bytes:
    return struct.pack("<HHII", socket.AF_NETLINK, 0, nl_pid, groups)


def denied(call: object, *args: object) -> int:
    with pytest.raises(Denied) as info:
        call(*args)  # type: ignore[operator]
    return info.value.errno


# -- sockaddr parsing ------------------------------------------------------------------------

def test_sockaddr_in_is_read_as_the_kernel_reads_it() -> None:
    assert parse_ip_sockaddr(AF_INET, sin("10.0.0.1", 8080)) == ("10.0.0.1", 8080)
    # longer than sockaddr_in (up to sockaddr_storage) is fine: the rest is ignored
    assert parse_ip_sockaddr(AF_INET, sin("10.0.0.1", 80, size=128)) == ("10.0.0.1", 80)
    # inet_bind's compatibility: AF_UNSPEC means AF_INET for INADDR_ANY only
    assert parse_ip_sockaddr(AF_INET, sin("0.0.0.0", 53, family=0)) == ("0.0.0.0", 53)
    assert denied(parse_ip_sockaddr, AF_INET, sin("10.0.0.1", 53, family=0)) == errno.EAFNOSUPPORT
    assert denied(parse_ip_sockaddr, AF_INET, sin("10.0.0.1", 53, family=AF_INET6)) \
        == errno.EAFNOSUPPORT


@pytest.mark.parametrize("size", [0, 1, 2, 4, 8, 15])
def test_short_sockaddr_in_is_einval(size: int) -> None:
    assert denied(parse_ip_sockaddr, AF_INET, sin("10.0.0.1", 80)[:size]) == errno.EINVAL


def test_sockaddr_in6_is_read_as_the_kernel_reads_it() -> None:
    assert parse_ip_sockaddr(AF_INET6, sin6("2001:db8::1", 443)) == ("2001:db8::1", 443)
    # SIN6_LEN_RFC2133: 24 bytes (no scope id) are accepted
    assert parse_ip_sockaddr(AF_INET6, sin6("::1", 22, size=24)) == ("::1", 22)
    assert parse_ip_sockaddr(AF_INET6, sin6("::ffff:10.0.0.1", 80)) == ("::ffff:10.0.0.1", 80)
    assert denied(parse_ip_sockaddr, AF_INET6, sin6("::1", 22, size=23)) == errno.EINVAL
    assert denied(parse_ip_sockaddr, AF_INET6, b"") == errno.EINVAL
    # another family on an AF_INET6 socket: EAFNOSUPPORT as inet6_bind_sk says, but
    # only once the length is long enough (shorter: EINVAL first, as the kernel)
    assert denied(parse_ip_sockaddr, AF_INET6,
                  sin6("::1", 22, family=AF_INET)) == errno.EAFNOSUPPORT
    assert denied(parse_ip_sockaddr, AF_INET6, sin6("::1", 22, family=0)) == errno.EAFNOSUPPORT
    assert denied(parse_ip_sockaddr, AF_INET6,
                  sin6("::1", 22, family=0xFFFF, size=24)) == errno.EAFNOSUPPORT
    assert denied(parse_ip_sockaddr, AF_INET6,
                  sin6("::1", 22, family=AF_INET, size=23)) == errno.EINVAL


def test_ip_protocols_of_socket_types() -> None:
    for proto in (0, socket.IPPROTO_TCP, IPPROTO_MPTCP):
        assert ip_proto(STREAM, proto) == "tcp"
    for proto in (0, socket.IPPROTO_UDP, IPPROTO_UDPLITE):
        assert ip_proto(DGRAM, proto) == "udp"
    for proto in (socket.IPPROTO_ICMP, IPPROTO_ICMPV6):
        assert ip_proto(DGRAM, proto) == "icmp"
    assert ip_proto(STREAM, socket.IPPROTO_UDP) is None
    assert ip_proto(RAW, 0) is None
    assert ip_proto(int(socket.SOCK_SEQPACKET), 0) is None


def test_unix_addresses_autobind_path_and_abstract() -> None:
    assert unix_abstract_name(sun(b"")) is None               # autobind (addrlen 2)
    assert unix_abstract_name(sun(b"")[:1]) is None           # too short
    assert unix_abstract_name(sun(b"/tmp/x.sock")) is None    # a path
    assert unix_abstract_name(sun(b"\0")) == b""              # the empty abstract name
    assert unix_abstract_name(sun(b"\0pl/a/db")) == b"pl/a/db"
    assert unix_abstract_name(sun(b"\0pl/a/\0x")) == b"pl/a/\0x"  # NULs are part of it


def test_netlink_binds_without_groups_only() -> None:
    assert netlink_unicast_pid(snl(0, 0)) == 0           # autobind
    assert netlink_unicast_pid(snl(4321, 0)) == 4321
    assert netlink_unicast_pid(snl(0, 1)) is None        # a multicast group: as the caller
    assert netlink_unicast_pid(snl(0, 0xFFFFFFFF)) is None
    for size in (0, 2, 8, 11):
        assert netlink_unicast_pid(snl(0, 0)[:size]) is None
    assert netlink_unicast_pid(snl(7, 0) + b"\xff" * 4) == 7   # longer: the rest ignored


def test_netlink_binds_keep_the_sockets_own_port_id() -> None:
    """Whatever nl_pid the sliver names, the bind asks for the id the socket has."""
    assert netlink_keep_port(snl(4321, 0), 99) == snl(99, 0)
    assert netlink_keep_port(snl(4321, 5), 0) == snl(0, 5)          # groups kept
    assert netlink_keep_port(snl(1, 2) + b"tail", 3) == snl(3, 2) + b"tail"
    assert netlink_keep_port(snl(0, 0)[:6], 3) == snl(0, 0)[:6]     # too short: EINVAL
    assert netlink_keep_port(snl(7, 0), 2**32 - 4097) == snl(2**32 - 4097, 0)  # the rover


# -- what a slice may bind -------------------------------------------------------------------

def table() -> PortTable:
    t = PortTable(["10.0.0.1", "2001:db8::1"], EPH)
    t.grant("a", [PortRange("tcp", 8080, 8081)])               # every node address
    t.grant("a", [PortRange("udp", 5000, 5000, "10.0.0.1")])   # one address
    t.grant("b", [PortRange("icmp", 7, 7)])
    return t


def decide(slice_name: str, info: tuple[int, int, int], raw: bytes) -> int:
    return ip_decision(table().check_bind, slice_name, info, raw).decision.errno


def test_owned_ports_bind_others_do_not() -> None:
    d = ip_decision(table().check_bind, "a", (AF_INET, STREAM, 0), sin("10.0.0.1", 8080))
    assert d.decision.allowed and (d.proto, d.address, d.port) == ("tcp", "10.0.0.1", 8080)
    assert d.ok == Outcome(0, "tcp")
    assert decide("a", (AF_INET6, STREAM, 0), sin6("2001:db8::1", 8081)) == 0
    assert decide("a", (AF_INET6, STREAM, 0), sin6("::ffff:10.0.0.1", 8081)) == 0
    assert decide("a", (AF_INET, STREAM, 0), sin("127.0.0.9", 8080)) == 0   # all of 127/8
    assert decide("b", (AF_INET, STREAM, 0), sin("10.0.0.1", 8080)) == errno.EADDRINUSE
    assert decide("a", (AF_INET, DGRAM, 0), sin("10.0.0.1", 8080)) == errno.EACCES  # udp
    assert decide("a", (AF_INET, STREAM, 0), sin("10.0.0.1", 8082)) == errno.EACCES
    assert decide("a", (AF_INET, STREAM, 0), sin("192.0.2.1", 8080)) == errno.EADDRNOTAVAIL
    assert decide("b", (AF_INET, DGRAM, socket.IPPROTO_ICMP), sin("10.0.0.1", 7)) == 0
    assert decide("a", (AF_INET, DGRAM, socket.IPPROTO_ICMP), sin("10.0.0.1", 7)) \
        == errno.EADDRINUSE


def test_wildcards_need_the_port_on_every_address_they_cover() -> None:
    assert decide("a", (AF_INET, STREAM, 0), sin("0.0.0.0", 8080)) == 0
    assert decide("a", (AF_INET6, STREAM, 0), sin6("::", 8080)) == 0
    assert decide("a", (AF_INET, DGRAM, 0), sin("10.0.0.1", 5000)) == 0
    assert decide("a", (AF_INET, DGRAM, 0), sin("0.0.0.0", 5000)) == errno.EACCES  # loopback


def test_port_zero_is_free_and_explicit_ephemeral_ports_are_not() -> None:
    for who in ("a", "b", "nobody"):
        assert decide(who, (AF_INET, STREAM, 0), sin("0.0.0.0", 0)) == 0
        assert decide(who, (AF_INET6, DGRAM, 0), sin6("::", 0)) == 0
    d = ip_decision(table().check_bind, "a", (AF_INET, STREAM, 0), sin("10.0.0.1", EPH[0]))
    assert d.decision.errno == errno.EACCES and "ephemeral" in d.decision.reason
    assert decide("a", (AF_INET, DGRAM, 0), sin("10.0.0.1", EPH[1])) == errno.EACCES
    assert decide("a", (AF_INET, STREAM, 0), sin("10.0.0.1", EPH[0] - 1)) == errno.EACCES


def test_sockets_outside_the_port_table_and_bad_bytes_are_denied() -> None:
    assert denied(ip_decision, table().check_bind, "a", (AF_INET, RAW, 0),
                  sin("10.0.0.1", 8080)) == errno.EACCES
    assert denied(ip_decision, table().check_bind, "a", (AF_INET, STREAM, 0),
                  sin("10.0.0.1", 8080)[:12]) == errno.EINVAL
    assert denied(ip_decision, table().check_bind, "a", (AF_INET6, STREAM, 0),
                  sin("10.0.0.1", 8080)) == errno.EINVAL


def test_refusals_that_hold_for_any_socket() -> None:
    check = table().check_bind
    nobody = ip_decision(check, "c", (AF_INET, STREAM, 0), sin("10.0.0.1", 9000))
    assert refused_for_any_socket(check, "c", nobody, errno.EACCES)
    elsewhere = ip_decision(check, "c", (AF_INET, STREAM, 0), sin("192.0.2.1", 9000))
    assert refused_for_any_socket(check, "c", elsewhere, errno.EADDRNOTAVAIL)
    # b is refused tcp 8080 with EADDRINUSE, but udp 8080 with EACCES: depends on the socket
    mixed = ip_decision(check, "b", (AF_INET, STREAM, 0), sin("10.0.0.1", 8080))
    assert not refused_for_any_socket(check, "b", mixed, errno.EADDRINUSE)
    owned = ip_decision(check, "a", (AF_INET, STREAM, 0), sin("10.0.0.1", 8080))
    assert not refused_for_any_socket(check, "a", owned, errno.EACCES)


def test_abstract_names_only_under_the_slice_prefix() -> None:
    assert abstract_prefix("princeton_x") == b"pl/princeton_x/"
    assert abstract_allowed("a", b"pl/a/db.sock")
    assert abstract_allowed("a", b"pl/a/")
    assert not abstract_allowed("a", b"pl/a")            # the slash is part of the prefix
    assert not abstract_allowed("a", b"pl/ab/db.sock")   # another slice whose name starts so
    assert not abstract_allowed("ab", b"pl/a/b/db.sock")
    assert not abstract_allowed("a", b"pl/b/db.sock")
    assert not abstract_allowed("a", b"/tmp/.X11-unix/X0")
    assert not abstract_allowed("a", b"")
    assert not abstract_allowed("a", b"\0pl/a/x")


# -- the CPU budget of a slice (F36) ----------------------------------------------------------

def test_cpu_budget_rests_a_slice_that_overdraws_and_refills_to_the_burst() -> None:
    now = [100.0]
    budget = CpuBudget(share=0.05, burst=0.02, clock=lambda: now[0])
    assert budget.rest() == 0.0
    budget.charge(0.01)
    assert budget.rest() == 0.0                 # 10 ms of 20 left
    budget.charge(0.03)                         # 20 ms overdrawn
    assert budget.rest() == pytest.approx(0.02 / 0.05, abs=1e-3)
    now[0] += 0.2                               # half the wait: still overdrawn
    assert budget.rest() == pytest.approx(0.2, abs=1e-3)
    now[0] += 0.21
    assert budget.rest() == 0.0
    now[0] += 1000                              # a long pause refills to the burst only
    budget.charge(0.02)
    assert budget.rest() > 0


def test_cpu_budget_earned_from_the_slice_never_exceeds_half_its_cpu_plus_floor() -> None:
    """With the slice's own CPU known, the agent's spending on it is bounded by half of
    it plus the floor, whatever the time share would allow (F36)."""
    now, used = [100.0], [5.0]
    budget = CpuBudget(share=0.05, burst=0.02, clock=lambda: now[0],
                       earned=lambda: used[0], ratio=0.5, floor=0.005)
    budget.charge(0.02)                          # the burst is gone
    spent = 0.0
    for _ in range(1000):                        # 10 s of a flooder using 1% of a CPU
        now[0] += 0.01
        used[0] += 0.0001
        if budget.rest() == 0.0:
            budget.charge(0.001)
            spent += 0.001
    # time share alone: 0.5 s; earned: 0.5 * 0.1 s + 0.005 * 10 s = 0.1 s (+ one turn)
    assert spent <= 0.1 + 0.002, spent
    assert spent >= 0.09, spent                  # and it does get that
    # a resting listener looks again within REST_MAX, not after floor-rate seconds
    budget.charge(1.0)
    assert 0 < budget.rest() <= 0.02
