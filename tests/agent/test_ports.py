"""The pure port table: ownership, wildcard, ephemeral range, tag syntax."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.ports import (
    PortConflict,
    PortError,
    PortRange,
    PortTable,
    format_ports_tag,
    parse_ports_tag,
)

EPH = (32768, 60999)


def table() -> PortTable:
    return PortTable(["10.0.0.1", "2001:db8::1"], EPH)


def test_owner_binds_other_gets_eacces_and_eaddrinuse() -> None:
    t = table()
    t.grant("a", [PortRange("tcp", 8080, 8080)])
    assert t.check_bind("a", "tcp", "10.0.0.1", 8080).allowed
    assert t.check_bind("b", "tcp", "10.0.0.1", 8080).errno == errno.EADDRINUSE
    assert t.check_bind("b", "tcp", "10.0.0.1", 8081).errno == errno.EACCES
    assert t.check_bind("a", "udp", "10.0.0.1", 8080).errno == errno.EACCES  # per protocol
    assert "owned by slice 'a'" in t.check_bind("b", "tcp", "10.0.0.1", 8080).reason


def test_same_port_different_addresses() -> None:
    t = table()
    t.grant("a", [PortRange("tcp", 8080, 8080, "10.0.0.1")])
    t.grant("b", [PortRange("tcp", 8080, 8080, "127.0.0.1")])
    assert t.check_bind("a", "tcp", "10.0.0.1", 8080).allowed
    assert t.check_bind("b", "tcp", "127.0.0.5", 8080).allowed  # all of 127/8 is loopback
    assert t.check_bind("b", "tcp", "::ffff:127.0.0.1", 8080).allowed
    assert t.check_bind("a", "tcp", "127.0.0.1", 8080).errno == errno.EADDRINUSE
    # neither owns it everywhere: the wildcard is refused to both
    assert t.check_bind("a", "tcp", "0.0.0.0", 8080).errno == errno.EADDRINUSE
    with pytest.raises(PortConflict):
        t.grant("b", [PortRange("tcp", 8080, 8080)])


def test_wildcard_needs_every_address() -> None:
    t = table()
    t.grant("a", [PortRange("udp", 5000, 5000, "10.0.0.1"), PortRange("udp", 5000, 5000, "127.0.0.1")])
    assert t.check_bind("a", "udp", "0.0.0.0", 5000).allowed        # all IPv4 addresses
    assert t.check_bind("a", "udp", "::", 5000).errno == errno.EACCES  # :: covers IPv6 too
    t.grant("a", [PortRange("udp", 5000, 5000)])
    assert t.check_bind("a", "udp", "::", 5000).allowed


def test_port_zero_free_for_all_explicit_ephemeral_refused() -> None:
    t = table()
    assert t.check_bind("x", "tcp", "10.0.0.1", 0).allowed
    # F18: an explicit bind in the ephemeral range takes a port out of the kernel's
    # pool for outgoing connections node-wide: refused, port 0 is the way.
    for proto, addr, port in [("udp", "0.0.0.0", 40000), ("tcp", "127.0.0.1", 32768),
                              ("tcp", "::", 60999)]:
        got = t.check_bind("x", proto, addr, port)
        assert got.errno == errno.EACCES and "ephemeral" in got.reason, (proto, port, got)
    assert t.check_bind("x", "tcp", "127.0.0.1", 32767).errno == errno.EACCES  # not owned
    assert t.check_bind("x", "icmp", "10.0.0.1", 40000).errno == errno.EACCES
    with pytest.raises(PortError, match="ephemeral"):
        t.grant("a", [PortRange("tcp", 32000, 33000)])


def test_unknown_address_and_protocol() -> None:
    t = table()
    assert t.check_bind("a", "tcp", "192.0.2.9", 80).errno == errno.EADDRNOTAVAIL
    assert t.check_bind("a", "sctp", "10.0.0.1", 80).errno == errno.EACCES
    with pytest.raises(PortError, match="192.0.2.9"):
        t.grant("a", [PortRange("tcp", 80, 80, "192.0.2.9")])


def test_grant_is_all_or_nothing_and_release() -> None:
    t = table()
    t.grant("a", [PortRange("tcp", 1080, 1080)])
    with pytest.raises(PortConflict):
        t.grant("b", [PortRange("tcp", 1079, 1081)])
    assert t.owner("tcp", "10.0.0.1", 1079) is None
    t.grant("b", [PortRange("tcp", 1081, 1090)])
    assert t.release("b", [PortRange("tcp", 1085, 1090)]) == 6 * len(t.addresses)
    assert t.release("b", [PortRange("tcp", 1080, 1080)]) == 0  # not b's: untouched
    assert t.owner("tcp", "::1", 1080) == "a"
    assert t.release_slice("a") == len(t.addresses)
    assert t.check_bind("a", "tcp", "10.0.0.1", 1080).errno == errno.EACCES


def test_reservations_only_from_1024_privileged_ports_by_tag() -> None:
    """F16: ReservePort (source "reserve") never grants a TCP/UDP port below 1024."""
    t = table()
    for bad in ("tcp:999", "udp:53@127.0.0.1", "tcp:1000-1030"):
        with pytest.raises(PortError, match="below 1024"):
            t.grant("a", parse_ports_tag(bad))
    assert t.holdings("a") == []
    t.grant("a", parse_ports_tag("tcp:1024,icmp:7"))  # ICMP ids are not privileged
    t.set_tag_ports("a", parse_ports_tag("tcp:80@127.0.0.1"))
    assert t.check_bind("a", "tcp", "127.0.0.1", 80).allowed


def test_reserved_host_ports_granted_to_nobody() -> None:
    """F16: the node's reserved ports are refused to tags and reservations alike."""
    t = PortTable(["10.0.0.1"], EPH, parse_ports_tag("tcp:22,udp:53,tcp:8000-8010@127.0.0.1"))
    for spec in ("tcp:22", "tcp:22@10.0.0.1", "udp:50-60", "tcp:8005@127.0.0.1", "tcp:7990-8000"):
        with pytest.raises(PortError, match="reserved for the host"):
            t.set_tag_ports("a", parse_ports_tag(spec))
        with pytest.raises(PortError):
            t.grant("a", parse_ports_tag(spec))
    t.grant("a", parse_ports_tag("tcp:8005@10.0.0.1"))  # reserved on loopback only
    assert t.check_bind("a", "tcp", "127.0.0.1", 22).errno == errno.EACCES
    assert t.check_bind("a", "tcp", "0.0.0.0", 8005).errno == errno.EACCES
    assert t.check_bind("a", "tcp", "10.0.0.1", 8005).allowed
    # ownership recorded before the port became reserved is dropped on load, not fatal
    u = PortTable(["10.0.0.1"], EPH)
    u.set_tag_ports("b", parse_ports_tag("udp:53@10.0.0.1,udp:5353@10.0.0.1"))
    u.grant("c", parse_ports_tag("tcp:8005@127.0.0.1"))
    dropped = t.load(u.entries())
    assert sorted(map(str, dropped)) == ["tcp:8005@127.0.0.1", "udp:53@10.0.0.1"]
    assert t.owner("udp", "10.0.0.1", 5353) == "b" and t.owner("udp", "10.0.0.1", 53) is None


def test_tags_take_precedence_over_runtime_reservations() -> None:
    """F16: a PLC tag takes a port from another slice's reservation, not from its tag."""
    t = table()
    t.grant("squatter", parse_ports_tag("tcp:5000,udp:5000"))
    t.set_tag_ports("owner", parse_ports_tag("tcp:5000"))
    assert t.owner("tcp", "10.0.0.1", 5000) == "owner"
    assert t.owner("udp", "10.0.0.1", 5000) == "squatter"
    with pytest.raises(PortConflict):
        t.grant("squatter", parse_ports_tag("tcp:5000@::1"))
    with pytest.raises(PortConflict):
        t.set_tag_ports("other", parse_ports_tag("tcp:5000"))


def test_tag_ports_replace_and_survive_reservations() -> None:
    t = table()
    t.set_tag_ports("a", parse_ports_tag("tcp:80,udp:5000-5001@10.0.0.1"))
    t.grant("a", [PortRange("tcp", 8080, 8080, "127.0.0.1")])
    t.set_tag_ports("a", parse_ports_tag("tcp:81"))
    assert t.owner("tcp", "10.0.0.1", 80) is None
    assert t.owner("udp", "10.0.0.1", 5000) is None
    assert t.owner("tcp", "10.0.0.1", 81) == "a"
    assert t.owner("tcp", "127.0.0.1", 8080) == "a"  # reservation kept
    assert format_ports_tag(t.holdings("a")) == \
        "tcp:81@10.0.0.1,tcp:81@127.0.0.1,tcp:81@2001:db8::1,tcp:81@::1,tcp:8080@127.0.0.1"


def test_persistence_round_trip() -> None:
    t = table()
    t.set_tag_ports("a", parse_ports_tag("tcp:80-82"))
    t.grant("b", [PortRange("icmp", 7, 7, "10.0.0.1")])
    u = table()
    u.load(t.entries())
    assert u.entries() == t.entries()


@pytest.mark.parametrize("bad", ["tcp", "tcp:x", "tcp:0", "tcp:9-8", "gre:5", "tcp:80@nowhere",
                                  "tcp:1-65535", "tcp:70000"])
def test_bad_tags_name_the_item(bad: str) -> None:
    with pytest.raises(PortError, match="ports item"):
        parse_ports_tag(bad)


def test_bad_table_config() -> None:
    with pytest.raises(PortError, match="wildcard"):
        PortTable(["0.0.0.0"], EPH)
    with pytest.raises(PortError, match="ephemeral"):
        PortTable([], (5, 1))


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["tcp", "udp", "icmp"]),
                          st.integers(2001, 2030),
                          st.sampled_from([None, "10.0.0.1", "127.0.0.1"])),
                max_size=30))
def test_every_key_has_at_most_one_owner(ops: list) -> None:
    t = table()
    for slice_name, proto, port, addr in ops:
        try:
            t.grant(slice_name, [PortRange(proto, port, port, addr)])
        except PortConflict:
            pass
    seen: dict = {}
    for s, _, r in t.entries():
        key = (r.proto, r.address, r.lo)
        assert key not in seen
        seen[key] = s
    for (proto, addr, port), s in seen.items():
        assert t.check_bind(s, proto, addr, port).allowed
        for other in set("abc") - {s}:
            assert t.check_bind(other, proto, addr, port).errno == errno.EADDRINUSE
