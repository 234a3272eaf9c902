"""The guard's pure decisions: reading a bind request's sockaddr, what a slice may bind,
and how much agent CPU its requests may use. No syscalls, no root: unit-tested in
tests/agent/test_guard_decide.py. The supervisor (`agent.guard.supervisor`) acts on them.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from agent.ports.table import BindDecision

SOCKADDR_MAX = 128  # sizeof(struct sockaddr_storage); the kernel refuses more with EINVAL
ABSTRACT_PREFIX = "pl/{slice}/"  # abstract Unix names a sliver may bind: "\0pl/<slice>/..." (F35)
# The agent CPU a slice's refused and slow-path (Python, guard-bindas) notifications
# may use (F36): a share of one CPU, with a burst; beyond it the slice's listener is
# not read until its budget refills, so its callers wait in the kernel (costing the
# agent nothing) and other slices' turns come. Binds the C fast path allows are not
# charged: they cost the agent about what they cost the slice.
SLICE_CPU_SHARE, SLICE_CPU_BURST = 0.05, 0.02
# With the slice's own CPU known (its cgroup): the agent spends on it at most half of
# what it spends itself, plus 0.5% of a CPU; a resting listener looks again every
# 20 ms at most (F36).
SLICE_CPU_RATIO, SLICE_CPU_FLOOR, REST_MAX = 0.5, 0.005, 0.02

AF_INET, AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
SOCK_STREAM, SOCK_DGRAM = int(socket.SOCK_STREAM), int(socket.SOCK_DGRAM)
IPPROTO_MPTCP = 262
IPPROTO_UDPLITE = 136
IPPROTO_ICMPV6 = 58

CheckBind = Callable[[str, str, str, int], BindDecision]  # PortService.check_bind


class Denied(Exception):
    """A request answered with an errno without being performed."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err


def ip_proto(stype: int, proto: int) -> str | None:
    """The port table's protocol for an IP socket of this type and protocol."""
    if stype == SOCK_STREAM and proto in (0, socket.IPPROTO_TCP, IPPROTO_MPTCP):
        return "tcp"
    if stype == SOCK_DGRAM and proto in (0, socket.IPPROTO_UDP, IPPROTO_UDPLITE):
        return "udp"
    if stype == SOCK_DGRAM and proto in (socket.IPPROTO_ICMP, IPPROTO_ICMPV6):
        return "icmp"
    return None


def parse_ip_sockaddr(family: int, raw: bytes) -> tuple[str, int]:
    """(address text, port) of a sockaddr_in/in6 as the kernel would read it."""
    if family == socket.AF_INET:
        if len(raw) < 16:
            raise Denied(errno.EINVAL, f"sockaddr_in of {len(raw)} bytes")
        fam, port = struct.unpack_from("<H", raw)[0], struct.unpack_from("!H", raw, 2)[0]
        addr = socket.inet_ntop(socket.AF_INET, raw[4:8])
        # inet_bind's "compatibility games": AF_UNSPEC is taken for INADDR_ANY only.
        if fam != socket.AF_INET and not (fam == socket.AF_UNSPEC and addr == "0.0.0.0"):
            raise Denied(errno.EAFNOSUPPORT, f"family {fam} on an AF_INET socket")
        return addr, port
    if len(raw) < 24:  # SIN6_LEN_RFC2133
        raise Denied(errno.EINVAL, f"sockaddr_in6 of {len(raw)} bytes")
    fam, port = struct.unpack_from("<H", raw)[0], struct.unpack_from("!H", raw, 2)[0]
    if fam != socket.AF_INET6:  # inet6_bind_sk: after the length check, as here
        raise Denied(errno.EAFNOSUPPORT, f"family {fam} on an AF_INET6 socket")
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def abstract_prefix(slice_name: str) -> bytes:
    """The abstract Unix names (after the leading NUL) slice `slice_name` may bind
    (F35): a sliver shares the node's network namespace, and so its abstract
    names, with the host; a name outside this prefix could squat a host service's
    (X11's "/tmp/.X11-unix/X0", D-Bus's...) and receive its clients."""
    return ABSTRACT_PREFIX.format(slice=slice_name).encode()



def unix_abstract_name(raw: bytes) -> bytes | None:
    """The name (after the leading NUL) of an abstract sockaddr_un; None for a path
    or an autobind (2 bytes or fewer)."""
    path = raw[2:]
    return path[1:] if len(raw) > 2 and path[:1] == b"\0" else None


def abstract_allowed(slice_name: str, name: bytes) -> bool:
    """May slice `slice_name` bind the abstract name `name` (F35)?"""
    return name.startswith(abstract_prefix(slice_name))


def netlink_unicast_pid(raw: bytes) -> int | None:
    """The nl_pid of a sockaddr_nl that asks for no multicast group (the agent may bind
    it directly); None if it asks for groups or is too short to say."""
    if len(raw) < 12:
        return None
    nl_pid, groups = struct.unpack_from("<II", raw, 4)
    return nl_pid if groups == 0 else None


def netlink_keep_port(raw: bytes, port: int) -> bytes:
    """A sockaddr_nl asking for the port id `port` (the socket's own; 0 if it has
    none yet, which asks the kernel to choose) instead of the one the caller named.
    The kernel takes this bind as a check when the socket is bound (the same id) and
    as autobind when it is not; either way the caller chooses no id. Too short to
    hold an nl_pid: unchanged (the kernel's EINVAL)."""
    if len(raw) < 8:
        return raw
    return raw[:4] + struct.pack("<I", port) + raw[8:]


class Outcome(NamedTuple):
    """The reply for one notification and what happened (for the log and tests)."""

    error: int
    what: str



class IPDecision(NamedTuple):
    """What the port table said about one IP bind request."""

    proto: str
    address: str
    port: int
    decision: BindDecision
    ok: Outcome  # the reply when the bind then succeeds



def ip_decision(check_bind: CheckBind, slice_name: str, info: tuple[int, int, int],
                raw: bytes) -> IPDecision:
    """The port table's decision (`check_bind`) on `slice_name` binding the sockaddr
    bytes `raw` on an IP socket of `info` (family, type, protocol); raises Denied for
    bytes the kernel would refuse or a socket type no port table entry covers."""
    family, stype, sproto = info
    proto = ip_proto(stype, sproto)
    address, port = parse_ip_sockaddr(family, raw)
    if proto is None:
        raise Denied(errno.EACCES, f"bind of socket type {stype} proto {sproto}")
    decision = check_bind(slice_name, proto, address, port)
    return IPDecision(proto, address, port, decision, Outcome(0, proto))


def refused_for_any_socket(check_bind: CheckBind, slice_name: str, d: IPDecision,
                           err: int) -> bool:
    """Would the slice be refused these sockaddr bytes, with `err`, whatever its
    socket (TCP, UDP or ICMP)? Then the fast path may refuse them without looking
    at the socket (a refusal lets nothing through; only the errno of a nonsense
    call, a non-IP socket with IP bytes, differs from the kernel's)."""
    return all(check_bind(slice_name, proto, d.address, d.port).errno == err
               for proto in ("tcp", "udp", "icmp"))


class CpuBudget:
    """The agent CPU one slice's notifications may use (F36), charged after the fact
    (a turn may overdraw it; the listener then rests until it is positive again).

    It refills by `share` of a CPU over time, up to `burst` seconds. With `earned` (the
    slice's own CPU seconds so far, from its cgroup) the refill is at most `ratio` of
    the CPU the slice used since the last refill, plus a `floor` share of a CPU that
    keeps an idle slice's occasional binds going: a slice cannot make the agent spend
    more on it than it spends itself. Its flooding threads then wait in the kernel
    (back-pressure) instead of the agent working for them."""

    def __init__(self, share: float = SLICE_CPU_SHARE, burst: float = SLICE_CPU_BURST,
                 clock: Callable[[], float] = time.monotonic,
                 earned: Callable[[], float | None] | None = None,
                 ratio: float = SLICE_CPU_RATIO, floor: float = SLICE_CPU_FLOOR) -> None:
        self.share, self.burst, self.clock = share, burst, clock
        self.earned, self.ratio, self.floor = earned, ratio, floor
        self.left = burst
        self.stamp = clock()
        self.spent_by_slice = earned() if earned is not None else None

    def _refill(self) -> None:
        now = self.clock()
        gain = (now - self.stamp) * self.share
        if self.earned is not None:
            spent = self.earned()
            if spent is not None and self.spent_by_slice is not None:
                gain = min(gain, max(0.0, spent - self.spent_by_slice) * self.ratio +
                           (now - self.stamp) * self.floor)
            if spent is not None:
                self.spent_by_slice = spent
        self.left = min(self.burst, self.left + gain)
        self.stamp = now

    def charge(self, seconds: float) -> None:
        self._refill()
        self.left -= seconds

    def rest(self) -> float:
        """Seconds to wait before handling more (0: go on)."""
        self._refill()
        if self.left > 0:
            return 0.0
        rate = self.floor if self.earned is not None else self.share
        # with `earned`, the slice's own CPU may refill it sooner: look again soon
        wait = -self.left / rate + 1e-4
        return min(wait, REST_MAX) if self.earned is not None else wait
