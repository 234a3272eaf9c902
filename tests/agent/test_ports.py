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


def test_ephemeral_and_port_zero_free_for_all() -> None:
    t = table()
    assert t.check_bind("x", "tcp", "10.0.0.1", 0).allowed
    assert t.check_bind("x", "udp", "0.0.0.0", 40000).allowed
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
    t.grant("a", [PortRange("tcp", 80, 80)])
    with pytest.raises(PortConflict):
        t.grant("b", [PortRange("tcp", 79, 81)])
    assert t.owner("tcp", "10.0.0.1", 79) is None
    t.grant("b", [PortRange("tcp", 81, 90)])
    assert t.release("b", [PortRange("tcp", 85, 90)]) == 6 * len(t.addresses)
    assert t.release("b", [PortRange("tcp", 80, 80)]) == 0  # not b's: untouched
    assert t.owner("tcp", "::1", 80) == "a"
    assert t.release_slice("a") == len(t.addresses)
    assert t.check_bind("a", "tcp", "10.0.0.1", 80).errno == errno.EACCES


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
                          st.integers(1, 30), st.sampled_from([None, "10.0.0.1", "127.0.0.1"])),
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
