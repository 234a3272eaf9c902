"""Safe raw sockets: what a slice may see and send below the socket layer.

A slice never opens a raw or packet socket itself (the guard filter refuses it).
Through the slice API it gets instead, by SCM_RIGHTS, the receive-only end of a
relay fed by an agent-held packet socket (cooked, every interface) with a locked
BPF filter:

- a sniffer: only IPv4/IPv6 packets from or to an (address, port) the slice owns,
  or ICMP echo with an ICMP id it owns (`sniffer_filter`);
- an error socket: only ICMP errors whose quoted packet was sent from an (address,
  port) or ICMP id the slice owns (`error_filter`).

And the agent sends a raw IP packet for it (`raw_send`) only after checking the
source address is the node's and the source port (or ICMP echo id) is the slice's.

The filters are compiled from what the slice owns when the socket is opened; open a
new one after reserving more ports. IPv6 extension headers are not followed (such
packets are not shown), and IPv4 fragments after the first are not shown.

Why a relay: a packet socket can also send frames whatever its filter (and
PACKET_QDISC_BYPASS skips every egress hook), so handing one out would let the slice
inject frames. The relay costs the agent a copy per packet; it is bounded per slice:
RELAYS_PER_SLICE open relays and one RELAY_PPS budget shared by them (beyond it the
packets stay in the kernel's small per-relay queue and are dropped there). A relay
whose filter passes a port its slice no longer holds is closed (`ports_lost`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import select
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from agent.hostports import HostPorts, local_addresses
from agent.ports import LOOPBACK4, PortRange, PortTable, normalize_address
from agent.tokenbucket import TokenBuckets
from kernel import packet as pk
from kernel.packet import Asm

SNAPLEN = 0x40000
ICMP_ERRORS_V4 = (3, 4, 5, 11, 12)
ICMP_ERRORS_V6 = (1, 2, 3, 4)
ICMP_ECHO_V4 = (0, 8)
ICMP_ECHO_V6 = (128, 129)
IPPROTO = {"tcp": (6, 6), "udp": (17, 17), "icmp": (1, 58)}  # (IPv4, IPv6) protocol numbers

log = logging.getLogger("agent.rawsock")

# Scratch memory slots of the filter.
M_PROTO, M_SRC, M_DST, M_SPORT, M_DPORT, M_ID = range(6)


def _v4_match(addr: str) -> tuple[int, int]:
    """(mask, value) for an IPv4 table address (loopback is all of 127/8)."""
    if addr == LOOPBACK4:
        return 0xFF000000, 0x7F000000
    return 0xFFFFFFFF, int(ipaddress.IPv4Address(addr))


def _rule(asm: Asm, r: PortRange, both_sides: bool,
          emit_address: Callable[[int, str], None], proto_index: int) -> None:
    """Accept a packet of `r`'s protocol whose source (or, with `both_sides`, whose
    destination) is `r`'s address and a port (ICMP id) in `r`'s range.
    `emit_address(side, fail)` emits the address comparison of side 0 (source) or 1
    (destination), jumping to `fail` on a mismatch; this is the only part in which
    IPv4 and IPv6 differ."""
    skip, other, accept = asm.fresh("skip"), asm.fresh("dst"), asm.fresh("acc")
    ports = (M_ID, M_ID) if r.proto == "icmp" else (M_SPORT, M_DPORT)
    asm.op(pk.LD_MEM, M_PROTO)
    asm.op(pk.JEQ_K, IPPROTO[r.proto][proto_index], 0, skip)
    for side in range(2 if both_sides else 1):
        fail = other if (side == 0 and both_sides) else skip
        if side == 1:
            asm.label(other)
        emit_address(side, fail)
        asm.op(pk.LD_MEM, ports[side])
        asm.op(pk.JGE_K, r.lo, 0, fail)
        asm.op(pk.JGT_K, r.hi, fail, accept)
    asm.label(accept)
    asm.op(pk.RET_K, SNAPLEN)
    asm.label(skip)


def _rule_v4(asm: Asm, r: PortRange, both_sides: bool) -> None:
    """`_rule` with the IPv4 addresses the prologue left in scratch memory."""
    assert r.address is not None
    mask, value = _v4_match(r.address)

    def address(side: int, fail: str) -> None:
        asm.op(pk.LD_MEM, (M_SRC, M_DST)[side])
        asm.op(pk.ALU_AND_K, mask)
        asm.op(pk.JEQ_K, value, 0, fail)
    _rule(asm, r, both_sides, address, 0)


def _rule_v6(asm: Asm, r: PortRange, base: int, both_sides: bool) -> None:
    """`_rule` with the IPv6 addresses compared word by word in the packet at `base`
    (the IPv6 header: source at +8, destination at +24)."""
    assert r.address is not None
    words = struct.unpack("!4I", ipaddress.IPv6Address(r.address).packed)

    def address(side: int, fail: str) -> None:
        off = base + (8, 24)[side]
        for i, w in enumerate(words):
            asm.op(pk.LD_W_ABS, off + 4 * i)
            asm.op(pk.JEQ_K, w, 0, fail)
    _rule(asm, r, both_sides, address, 1)


def _split(holdings: list[PortRange]) -> tuple[list[PortRange], list[PortRange]]:
    v4 = [r for r in holdings if r.address and ipaddress.ip_address(r.address).version == 4]
    v6 = [r for r in holdings if r.address and ipaddress.ip_address(r.address).version == 6]
    return v4, v6


def _dispatch(asm: Asm) -> tuple[str, str]:
    """IPv4 falls through to the label "v4" (next); IPv6 jumps far to "v6"; else drop."""
    asm.op(pk.LD_B_ABS, 0)
    asm.op(pk.ALU_AND_K, 0xF0)
    asm.op(pk.JEQ_K, 0x40, 3, 0)
    asm.drop_unless(pk.JEQ_K, 0x60)
    asm.op(pk.JA, "v6")
    return "v4", "v6"


ALU_OR_K, LD_IMM = 0x44, 0x00
F_SRC, F_DST, F_SRC_LOCAL, F_DST_LOCAL = 1, 2, 4, 8
M_FLAGS = M_ID + 1
# A packet is shown iff one end is the slice's and the other end is the slice's too
# or not an address of this node: src ours (and so local) with a remote destination,
# the mirror image, or both ours. A flow to or from a host socket on this node (the
# agent's PLC session on loopback, any host service) never passes (F30).
SHOWN_FLAGS = (F_SRC | F_SRC_LOCAL, F_DST | F_DST_LOCAL,
               F_SRC | F_DST | F_SRC_LOCAL | F_DST_LOCAL)


def _set_flag(asm: Asm, flag: int) -> None:
    asm.op(pk.LD_MEM, M_FLAGS)
    asm.op(ALU_OR_K, flag)
    asm.op(pk.ST, M_FLAGS)


def _mark(asm: Asm, proto: int | None, side: int, flag: int,
          emit_address: Callable[[int, str], None], port: tuple[int, int, int] | None) -> None:
    """Set `flag` when the packet's side `side` (0 source, 1 destination) matches:
    protocol `proto` (None: any), the address `emit_address` compares, and
    (slot, lo, hi) `port`."""
    nomatch = asm.fresh("nomatch")
    if proto is not None:
        asm.op(pk.LD_MEM, M_PROTO)
        asm.op(pk.JEQ_K, proto, 0, nomatch)
    emit_address(side, nomatch)
    if port is not None:
        slot, lo, hi = port
        asm.op(pk.LD_MEM, slot)
        asm.op(pk.JGE_K, lo, 0, nomatch)
        asm.op(pk.JGT_K, hi, nomatch, 0)
    _set_flag(asm, flag)
    asm.label(nomatch)


def _v4_address(asm: Asm, addr: str) -> Callable[[int, str], None]:
    mask, value = _v4_match(addr)

    def emit(side: int, fail: str) -> None:
        asm.op(pk.LD_MEM, (M_SRC, M_DST)[side])
        asm.op(pk.ALU_AND_K, mask)
        asm.op(pk.JEQ_K, value, 0, fail)
    return emit


def _v6_address(asm: Asm, addr: str, base: int = 0) -> Callable[[int, str], None]:
    words = struct.unpack("!4I", ipaddress.IPv6Address(addr).packed)

    def emit(side: int, fail: str) -> None:
        off = base + (8, 24)[side]
        for i, w in enumerate(words):
            asm.op(pk.LD_W_ABS, off + 4 * i)
            asm.op(pk.JEQ_K, w, 0, fail)
    return emit


def _verdict(asm: Asm) -> None:
    asm.op(pk.LD_MEM, M_FLAGS)
    for value in SHOWN_FLAGS:
        asm.op(pk.JEQ_K, value, 0, 1)
        asm.op(pk.RET_K, SNAPLEN)
    asm.op(pk.RET_K, 0)


def _locals(local: Iterable[str]) -> tuple[list[str], list[str]]:
    addrs = {normalize_address(a) for a in local} | {LOOPBACK4, "::1"}
    v4 = sorted(a for a in addrs if ipaddress.ip_address(a).version == 4)
    v6 = sorted(a for a in addrs if ipaddress.ip_address(a).version == 6)
    return v4, v6


def sniffer_filter(holdings: list[PortRange], local: Iterable[str] = ()) -> bytes:
    """BPF for a cooked packet socket: only the traffic of `holdings` whose other end
    is not a socket of this node's (`local`: its addresses; loopback always) other
    than one of `holdings` (SHOWN_FLAGS)."""
    v4rules, v6rules = _split(holdings)
    local4, local6 = _locals(local)
    asm = Asm()
    v4, v6 = _dispatch(asm)
    asm.label(v4)
    asm.op(pk.LD_H_ABS, 6)
    asm.drop_if(pk.JSET_K, 0x1FFF)          # a later fragment: no ports to check
    for slot, off in ((M_PROTO, 9), (M_SRC, 12), (M_DST, 16)):
        asm.op(pk.LD_B_ABS if slot == M_PROTO else pk.LD_W_ABS, off)
        asm.op(pk.ST, slot)
    asm.op(pk.LDX_B_MSH, 0)                 # X = IHL * 4
    for slot, off in ((M_SPORT, 0), (M_DPORT, 2), (M_ID, 4)):
        asm.op(pk.LD_H_IND, off)
        asm.op(pk.ST, slot)
    asm.op(LD_IMM, 0)
    asm.op(pk.ST, M_FLAGS)
    for r in v4rules:
        assert r.address is not None
        ports = (M_ID, M_ID) if r.proto == "icmp" else (M_SPORT, M_DPORT)
        for side, flag in ((0, F_SRC), (1, F_DST)):
            _mark(asm, IPPROTO[r.proto][0], side, flag, _v4_address(asm, r.address),
                  (ports[side], r.lo, r.hi))
    for a in local4:
        for side, flag in ((0, F_SRC_LOCAL), (1, F_DST_LOCAL)):
            _mark(asm, None, side, flag, _v4_address(asm, a), None)
    _verdict(asm)
    asm.label(v6)
    asm.op(pk.LD_B_ABS, 6)
    asm.op(pk.ST, M_PROTO)
    for slot, off in ((M_SPORT, 40), (M_DPORT, 42), (M_ID, 44)):
        asm.op(pk.LD_H_ABS, off)
        asm.op(pk.ST, slot)
    asm.op(LD_IMM, 0)
    asm.op(pk.ST, M_FLAGS)
    for r in v6rules:
        assert r.address is not None
        ports = (M_ID, M_ID) if r.proto == "icmp" else (M_SPORT, M_DPORT)
        for side, flag in ((0, F_SRC), (1, F_DST)):
            _mark(asm, IPPROTO[r.proto][1], side, flag, _v6_address(asm, r.address),
                  (ports[side], r.lo, r.hi))
    for a in local6:
        for side, flag in ((0, F_SRC_LOCAL), (1, F_DST_LOCAL)):
            _mark(asm, None, side, flag, _v6_address(asm, a), None)
    _verdict(asm)
    return asm.assemble()


def error_filter(holdings: list[PortRange]) -> bytes:
    """BPF: only ICMP errors quoting a packet sent from what `holdings` owns."""
    v4rules, v6rules = _split(holdings)
    asm = Asm()
    v4, v6 = _dispatch(asm)
    asm.label(v4)
    asm.op(pk.LD_H_ABS, 6)
    asm.drop_if(pk.JSET_K, 0x1FFF)
    asm.op(pk.LD_B_ABS, 9)
    asm.drop_unless(pk.JEQ_K, 1)            # ICMP
    asm.op(pk.LDX_B_MSH, 0)
    asm.op(pk.LD_B_IND, 0)                  # ICMP type
    for t in ICMP_ERRORS_V4:
        asm.op(pk.JEQ_K, t, "v4err", 0)
    asm.op(pk.RET_K, 0)
    asm.label("v4err")
    # The quoted IP header starts 8 bytes into the ICMP message.
    asm.op(pk.LD_B_IND, 8 + 9)
    asm.op(pk.ST, M_PROTO)
    asm.op(pk.LD_W_IND, 8 + 12)
    asm.op(pk.ST, M_SRC)
    asm.op(pk.LD_B_IND, 8)                  # quoted version/IHL
    asm.op(pk.ALU_AND_K, 0x0F)
    asm.op(pk.ALU_LSH_K, 2)
    asm.op(pk.ALU_ADD_X, 0)
    asm.op(pk.ALU_ADD_K, 8)
    asm.op(pk.TAX)                          # X = start of the quoted transport header
    for slot, off in ((M_SPORT, 0), (M_ID, 4)):
        asm.op(pk.LD_H_IND, off)
        asm.op(pk.ST, slot)
    for r in v4rules:
        _rule_v4(asm, r, both_sides=False)
    asm.op(pk.RET_K, 0)
    asm.label(v6)
    asm.op(pk.LD_B_ABS, 6)
    asm.drop_unless(pk.JEQ_K, 58)           # ICMPv6
    asm.op(pk.LD_B_ABS, 40)
    asm.drop_unless(pk.JGE_K, ICMP_ERRORS_V6[0])
    asm.drop_if(pk.JGT_K, ICMP_ERRORS_V6[-1])
    asm.op(pk.LD_B_ABS, 48 + 6)             # the quoted IPv6 header at 48
    asm.op(pk.ST, M_PROTO)
    for slot, off in ((M_SPORT, 88), (M_ID, 92)):
        asm.op(pk.LD_H_ABS, off)
        asm.op(pk.ST, slot)
    for r in v6rules:
        _rule_v6(asm, r, 48, both_sides=False)
    asm.op(pk.RET_K, 0)
    return asm.assemble()


class RawSendRefused(Exception):
    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err


def check_raw_packet(table: PortTable, slice_name: str, data: bytes) -> tuple[int, str, str]:
    """Check a whole IP packet a slice wants sent; returns (family, source, destination).

    Raises RawSendRefused naming what is wrong: not an IP packet, a fragment, a
    source address that is not the node's, a source port or ICMP id the slice does
    not own, or a protocol other than TCP, UDP and ICMP echo.
    """
    if not 20 <= len(data) <= 65535:
        raise RawSendRefused(errno.EMSGSIZE, f"packet of {len(data)} bytes")
    version = data[0] >> 4
    if version == 4:
        ihl = (data[0] & 0x0F) * 4
        if ihl < 20 or len(data) < ihl + 8:
            raise RawSendRefused(errno.EINVAL, "truncated IPv4 packet")
        if ihl != 20:  # options: source routing, record route, router alert...
            raise RawSendRefused(errno.EPERM, "IPv4 options are not sent (IHL must be 5)")
        if struct.unpack_from("!H", data, 6)[0] & 0x3FFF:
            raise RawSendRefused(errno.EPERM, "IPv4 fragments are not sent")
        proto, src, dst = data[9], data[12:16], data[16:20]
        family, l4 = socket.AF_INET, ihl
    elif version == 6:
        if len(data) < 48:
            raise RawSendRefused(errno.EINVAL, "truncated IPv6 packet")
        proto, src, dst = data[6], data[8:24], data[24:40]
        family, l4 = socket.AF_INET6, 40
    else:
        raise RawSendRefused(errno.EINVAL, f"IP version {version}")
    src_text = socket.inet_ntop(family, src)
    dst_text = socket.inet_ntop(family, dst)
    try:
        src_norm = normalize_address(src_text)
    except ValueError:
        raise RawSendRefused(errno.EINVAL, f"bad source {src_text}") from None
    if src_norm not in table.addresses:
        raise RawSendRefused(errno.EADDRNOTAVAIL, f"source {src_text} is not this node's")
    names = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}
    name = names.get(proto)
    if name is None or (name == "icmp") != (proto == (1 if version == 4 else 58)):
        raise RawSendRefused(errno.EPERM, f"IP protocol {proto} cannot be sent raw")
    if name == "icmp":
        echo = ICMP_ECHO_V4 if version == 4 else ICMP_ECHO_V6
        if data[l4] not in echo:
            raise RawSendRefused(errno.EPERM, f"ICMP type {data[l4]} cannot be sent raw")
        port = struct.unpack_from("!H", data, l4 + 4)[0]
    else:
        port = struct.unpack_from("!H", data, l4)[0]
    owner = table.owner(name, src_norm, port)
    if owner != slice_name:
        why = f"owned by {owner!r}" if owner else "not owned"
        raise RawSendRefused(errno.EACCES, f"{name} {port} on {src_text}: {why}")
    return family, src_text, dst_text


def flow_of(data: bytes) -> tuple[int, str, str, int, str, int]:
    """(family, proto name, source, source port, destination, destination port) of a
    packet `check_raw_packet` accepted (ICMP: the echo id as both ports)."""
    if data[0] >> 4 == 4:
        family, proto, l4, src, dst = socket.AF_INET, data[9], 20, data[12:16], data[16:20]
    else:
        family, proto, l4, src, dst = socket.AF_INET6, data[6], 40, data[8:24], data[24:40]
    name = {6: "tcp", 17: "udp"}.get(proto, "icmp")
    if name == "icmp":
        sport = dport = struct.unpack_from("!H", data, l4 + 4)[0]
    else:
        sport, dport = struct.unpack_from("!HH", data, l4)
    return (family, name, socket.inet_ntop(family, src), sport,
            socket.inet_ntop(family, dst), dport)



RELAY_PPS = 20000    # packets a second forwarded for one slice, all its relays together
RELAY_BURST = 2000
RELAY_BATCH = 64     # packets moved per scheduler turn
RELAY_CHECK = 5.0    # seconds between checks that the slice still holds its end
RELAYS_PER_SLICE = 4  # open sniffers and error sockets of one slice, together
RELAY_RCVBUF = 1 << 18  # the agent's packet socket queue per relay (kernel memory)
RELAY_RECHECK = 2.0  # seconds between checks that a relay's keys are still usable (F30)

Key = tuple[str, str, int]  # (proto, address, port), as in agent.ports


@dataclass
class RelayStats:
    forwarded: int = 0
    dropped: int = 0     # the slice's end was full
    throttled: int = 0   # times the slice's budget ran out (packets left to the kernel)


async def relay(source: socket.socket, sink: socket.socket, stats: RelayStats,
                pps: float = RELAY_PPS, burst: int = RELAY_BURST,
                budget: TokenBuckets | None = None, key: str = "relay") -> None:
    """Forward each packet read from `source` (the agent's filtered packet socket) as
    one message on `sink` (the agent's end of the slice's socket pair) until the
    slice closes its end.

    Each packet costs a token of `budget[key]` (a bucket shared by all relays of one
    slice; without `budget`, a bucket of `pps`/`burst` of its own). Out of tokens,
    the relay stops reading until the bucket refills: the packets wait in the
    packet socket's small queue and the kernel drops what does not fit, so a slice
    flooding its own port costs the agent at most its budget of copies (F17).
    Packets the slice has no room for are dropped and counted. Closes both sockets
    on return or cancellation.
    """
    bucket = budget if budget is not None else TokenBuckets(pps, burst, trio.current_time)
    pause = min(1.0, RELAY_BATCH / bucket.rate)
    hup = select.poll()
    hup.register(sink, select.POLLHUP)
    try:
        while True:
            with trio.move_on_after(RELAY_CHECK):
                await trio.lowlevel.wait_readable(source)
            if hup.poll(0):
                return  # the slice closed its end
            for _ in range(RELAY_BATCH):
                if not bucket.take(key):
                    stats.throttled += 1
                    await trio.sleep(pause)
                    break
                try:
                    pkt = source.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    bucket.take(key, -1.0)  # nothing read: the token goes back
                    break
                try:
                    sink.send(pkt, socket.MSG_DONTWAIT)
                    stats.forwarded += 1
                except BlockingIOError:
                    stats.dropped += 1
                except (BrokenPipeError, ConnectionResetError):
                    return
            await trio.lowlevel.checkpoint()
    finally:
        trio.lowlevel.notify_closing(source)
        source.close()
        sink.close()


@dataclass
class Relay:
    """One open sniffer or error socket of a slice, as the agent tracks it."""

    slice_name: str
    kind: str
    keys: frozenset[Key]    # what its locked filter passes
    stats: RelayStats = field(default_factory=RelayStats)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class RawSockets:
    """The agent side: filtered packet sockets, their relays to slices, checked raw sends.

    A slice does not get the packet socket itself: a packet socket can also send
    frames, whatever its filter. It gets the receive-only end of a SOCK_SEQPACKET
    pair (shut down for writing) on which `relay` delivers each packet the locked
    filter accepted, as one message starting at the network header. `run` is the
    service task that owns the relays.

    Limits per slice: RELAYS_PER_SLICE open relays, RELAY_PPS packets a second over
    all of them. A relay whose filter passes a port the slice no longer holds is
    closed (`ports_lost`, called by the port service on every change): its filter
    cannot be replaced (SO_LOCK_FILTER), so the slice opens a new one.
    """

    def __init__(self, table_of: object, host: HostPorts | None = None) -> None:
        # `table_of()` gives the current PortTable (PortService swaps tables on commit).
        self._table_of = table_of
        # F30: with `host`, a slice's sniffers and raw sends cover only the ports on
        # which it holds a socket itself and the host holds none (None: the table alone,
        # for tests of the filters).
        self._host = host
        self._senders: dict[int, socket.socket] = {}
        self._nursery: trio.Nursery | None = None
        self._relays: dict[str, list[Relay]] = {}
        self._budget = TokenBuckets(RELAY_PPS, RELAY_BURST, trio.current_time)

    @property
    def relays(self) -> dict[str, list[RelayStats]]:
        """The open relays' counters, per slice."""
        return {s: [r.stats for r in rs] for s, rs in self._relays.items()}

    def _table(self) -> PortTable:
        return self._table_of()  # type: ignore[operator, no-any-return]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Own the relays until cancelled (they close with it)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.close()

    def packet_socket(self, slice_name: str, kind: str) -> socket.socket:
        """The agent's packet socket for `kind` "sniffer" or "errors", filter locked."""
        return self._packet_socket(kind, self.usable(slice_name), slice_name)

    def usable(self, slice_name: str) -> list[PortRange]:
        """What a sniffer or raw send of `slice_name` may cover now: its ports in the
        table on which, with a HostPorts, it also holds a socket itself (one whose
        local address covers the table's address) and the host holds none (F30).
        ICMP ids are taken from the table (no inet_diag for ping sockets)."""
        table = self._table()
        holdings = table.holdings(slice_name)
        host = self._host
        if host is None:
            return holdings
        out: list[PortRange] = []
        for r in holdings:
            if r.proto == "icmp":
                out.append(r)
                continue
            bad: set[int] = set()
            mine: dict[int, set[str]] = {}
            for sock in host.sockets(r.proto, r.lo, r.hi):
                owner = host.owner_of_uid(sock.uid)
                if owner is None:
                    bad.add(sock.port)
                elif owner == slice_name:
                    mine.setdefault(sock.port, set()).update(table.covered(sock.local))
            for n in range(r.lo, r.hi + 1):
                if n in bad or host.fixed_reason(r.proto, n) or r.address not in mine.get(n, ()):
                    continue
                if out and out[-1].proto == r.proto and out[-1].address == r.address \
                        and out[-1].hi == n - 1:
                    out[-1] = PortRange(r.proto, out[-1].lo, n, r.address)
                else:
                    out.append(PortRange(r.proto, n, n, r.address))
        return out

    def _local(self) -> set[str]:
        return set(self._table().addresses) | local_addresses()

    def _packet_socket(self, kind: str, holdings: list[PortRange],
                       slice_name: str) -> socket.socket:
        if not holdings:
            raise RawSendRefused(errno.EACCES, self._nothing(slice_name))
        if kind not in ("sniffer", "errors"):
            raise ValueError(f"unknown packet socket kind {kind!r}")
        program = sniffer_filter(holdings, self._local()) if kind == "sniffer" else \
            error_filter(holdings)
        return pk.open_sniffer(program)

    def _nothing(self, slice_name: str) -> str:
        if self._host is None or not self._table().holdings(slice_name):
            return f"slice {slice_name!r} owns no port"
        return (f"slice {slice_name!r} holds no socket on a port it owns that the host "
                "does not hold: bind one first")

    def _open_relayed(self, slice_name: str, kind: str) -> socket.socket:
        holdings = self.usable(slice_name)
        if not holdings:
            raise RawSendRefused(errno.EACCES, self._nothing(slice_name))
        if self._nursery is None:
            raise RuntimeError("the raw socket service (RawSockets.run) is not running")
        if len(self._relays.get(slice_name, ())) >= RELAYS_PER_SLICE:
            raise RawSendRefused(errno.EMFILE, f"slice {slice_name!r} has "
                                 f"{RELAYS_PER_SLICE} sniffers/error sockets open "
                                 "(the most per slice): close one first")
        keys = frozenset((r.proto, r.address or "", n)
                         for r in holdings for n in range(r.lo, r.hi + 1))
        source = self._packet_socket(kind, holdings, slice_name)
        try:
            source.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RELAY_RCVBUF)
            mine, theirs = socket.socketpair(socket.AF_UNIX,
                                             socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        except BaseException:
            source.close()
            raise
        theirs.shutdown(socket.SHUT_WR)  # the slice can only receive on it
        mine.setblocking(False)
        source.setblocking(False)
        entry = Relay(slice_name, kind, keys)
        self._relays.setdefault(slice_name, []).append(entry)
        self._nursery.start_soon(self._run_relay, entry, source, mine,
                                 name=f"relay:{slice_name}:{kind}")
        return theirs

    async def _run_relay(self, entry: Relay, source: socket.socket,
                         mine: socket.socket) -> None:
        try:
            with entry.scope:
                async with trio.open_nursery() as nursery:
                    if self._host is not None:
                        nursery.start_soon(self._recheck, entry)
                    await relay(source, mine, entry.stats, budget=self._budget,
                                key=entry.slice_name)
                    nursery.cancel_scope.cancel()
        finally:
            mine.close()
            source.close()
            left = [r for r in self._relays.get(entry.slice_name, []) if r is not entry]
            if left:
                self._relays[entry.slice_name] = left
            else:
                self._relays.pop(entry.slice_name, None)

    async def _recheck(self, entry: Relay) -> None:
        """Close the relay once a key it covers is no longer usable: the slice closed
        its socket there, or a host socket took the port (F30). The filter keeps
        loopback flows of host sockets out at once; this bounds the rest to
        RELAY_RECHECK seconds."""
        while True:
            await trio.sleep(RELAY_RECHECK)
            keys = {(r.proto, r.address or "", n) for r in self.usable(entry.slice_name)
                    for n in range(r.lo, r.hi + 1)}
            if not entry.keys <= keys:
                log.info("rawsock: slice %s no longer holds every socket its %s covers, or "
                         "the host took one of its ports: closed", entry.slice_name, entry.kind)
                entry.scope.cancel()
                return

    def ports_lost(self, slices: set[str]) -> None:
        """Close the relays of `slices` whose filter passes a port the slice no longer
        holds (released, taken by a PLC tag, sliver destroyed): F13."""
        if not any(s in self._relays for s in slices):
            return
        held: dict[str, set[Key]] = {}
        for k, s in self._table().ownership().items():
            if s in slices:
                held.setdefault(s, set()).add(k)
        for s in slices:
            for r in self._relays.get(s, []):
                if not r.keys <= held.get(s, set()):
                    log.info("rawsock: slice %s lost a port its %s covers: closed", s, r.kind)
                    r.scope.cancel()

    def open_sniffer(self, slice_name: str) -> socket.socket:
        """The slice's end of a relay showing only its own traffic."""
        return self._open_relayed(slice_name, "sniffer")

    def open_error_socket(self, slice_name: str) -> socket.socket:
        """The slice's end of a relay showing ICMP errors about its own traffic."""
        return self._open_relayed(slice_name, "errors")

    # [bandwidth] slice name -> skb priority of its HTB class (agent/bwservice.py).
    priority_of: Callable[[str], int | None] | None = None

    def raw_send(self, slice_name: str, data: bytes) -> int:
        family, _, dst = check_raw_packet(self._table(), slice_name, data)
        if self._host is not None:
            self._check_flow(slice_name, data)
        sender = self._senders.get(family)
        if sender is None:
            # IPPROTO_RAW implies IP_HDRINCL: the packet goes out as given (the
            # kernel fills in the IPv4 total length and checksum).
            sender = socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   socket.IPPROTO_RAW)
            self._senders[family] = sender
        # [bandwidth] the packet is billed to the slice's HTB class, not the agent's.
        prio = self.priority_of(slice_name) if self.priority_of is not None else None
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, prio or 0)
        return sender.sendto(data, (dst, 0))

    def _check_flow(self, slice_name: str, data: bytes) -> None:
        """F30: a TCP/UDP packet goes out only from a port on which the slice holds a
        socket covering the source address (and the host none), and never to a host
        socket of this node (nor to a fixed host port such as PLC's)."""
        assert self._host is not None
        family, proto, src, sport, dst, dport = flow_of(data)
        if proto not in ("tcp", "udp"):
            return
        usable = {(r.proto, r.address, n) for r in self.usable(slice_name)
                  for n in range(r.lo, r.hi + 1) if r.proto == proto and r.lo <= sport <= r.hi}
        if (proto, normalize_address(src), sport) not in usable:
            raise RawSendRefused(errno.EACCES, f"{proto} {sport} on {src}: slice "
                                 f"{slice_name!r} holds no socket there (or the host does)")
        if normalize_address(dst) in self._local():
            held = self._host.held(proto, dport)
            if held:
                raise RawSendRefused(errno.EACCES, f"{proto} {dport} on {dst} is the "
                                     f"host's: {held[dport]}")

    def close(self) -> None:
        for s in self._senders.values():
            s.close()
        self._senders.clear()
