"""The locked BPF filters of the slices' packet sockets (see `agent.rawsock`):
`sniffer_filter` shows a slice its own traffic only, `error_filter` the ICMP errors
about it. Pure: bytes of `struct sock_filter[]` from what the slice owns."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable

from agent.ports.table import LOOPBACK4, PortRange, normalize_address
from kernel import cbpf as bpf
from kernel.cbpf import Asm

SNAPLEN = 0x40000
ICMP_ERRORS_V4 = (3, 4, 5, 11, 12)
ICMP_ERRORS_V6 = (1, 2, 3, 4)
IPPROTO = {"tcp": (6, 6), "udp": (17, 17), "icmp": (1, 58)}  # (IPv4, IPv6) protocol numbers

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
    asm.op(bpf.LD_MEM, M_PROTO)
    asm.op(bpf.JEQ_K, IPPROTO[r.proto][proto_index], 0, skip)
    for side in range(2 if both_sides else 1):
        fail = other if (side == 0 and both_sides) else skip
        if side == 1:
            asm.label(other)
        emit_address(side, fail)
        asm.op(bpf.LD_MEM, ports[side])
        asm.op(bpf.JGE_K, r.lo, 0, fail)
        asm.op(bpf.JGT_K, r.hi, fail, accept)
    asm.label(accept)
    asm.op(bpf.RET_K, SNAPLEN)
    asm.label(skip)


def _rule_v4(asm: Asm, r: PortRange, both_sides: bool) -> None:
    """`_rule` with the IPv4 addresses the prologue left in scratch memory."""
    assert r.address is not None
    _rule(asm, r, both_sides, _v4_address(asm, r.address), 0)


def _rule_v6(asm: Asm, r: PortRange, base: int, both_sides: bool) -> None:
    """`_rule` with the IPv6 addresses compared word by word in the packet at `base`
    (the IPv6 header: source at +8, destination at +24)."""
    assert r.address is not None
    _rule(asm, r, both_sides, _v6_address(asm, r.address, base), 1)


def _split(holdings: list[PortRange]) -> tuple[list[PortRange], list[PortRange]]:
    v4 = [r for r in holdings if r.address and ipaddress.ip_address(r.address).version == 4]
    v6 = [r for r in holdings if r.address and ipaddress.ip_address(r.address).version == 6]
    return v4, v6


def _dispatch(asm: Asm) -> tuple[str, str]:
    """IPv4 falls through to the label "v4" (next); IPv6 jumps far to "v6"; else drop."""
    asm.op(bpf.LD_B_ABS, 0)
    asm.op(bpf.ALU_AND_K, 0xF0)
    asm.op(bpf.JEQ_K, 0x40, 3, 0)
    asm.drop_unless(bpf.JEQ_K, 0x60)
    asm.op(bpf.JA, "v6")
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
    asm.op(bpf.LD_MEM, M_FLAGS)
    asm.op(ALU_OR_K, flag)
    asm.op(bpf.ST, M_FLAGS)


def _mark(asm: Asm, proto: int | None, side: int, flag: int,
          emit_address: Callable[[int, str], None], port: tuple[int, int, int] | None) -> None:
    """Set `flag` when the packet's side `side` (0 source, 1 destination) matches:
    protocol `proto` (None: any), the address `emit_address` compares, and
    (slot, lo, hi) `port`."""
    nomatch = asm.fresh("nomatch")
    if proto is not None:
        asm.op(bpf.LD_MEM, M_PROTO)
        asm.op(bpf.JEQ_K, proto, 0, nomatch)
    emit_address(side, nomatch)
    if port is not None:
        slot, lo, hi = port
        asm.op(bpf.LD_MEM, slot)
        asm.op(bpf.JGE_K, lo, 0, nomatch)
        asm.op(bpf.JGT_K, hi, nomatch, 0)
    _set_flag(asm, flag)
    asm.label(nomatch)


def _v4_address(asm: Asm, addr: str) -> Callable[[int, str], None]:
    mask, value = _v4_match(addr)

    def emit(side: int, fail: str) -> None:
        asm.op(bpf.LD_MEM, (M_SRC, M_DST)[side])
        asm.op(bpf.ALU_AND_K, mask)
        asm.op(bpf.JEQ_K, value, 0, fail)
    return emit


def _v6_address(asm: Asm, addr: str, base: int = 0) -> Callable[[int, str], None]:
    words = struct.unpack("!4I", ipaddress.IPv6Address(addr).packed)

    def emit(side: int, fail: str) -> None:
        off = base + (8, 24)[side]
        for i, w in enumerate(words):
            asm.op(bpf.LD_W_ABS, off + 4 * i)
            asm.op(bpf.JEQ_K, w, 0, fail)
    return emit


def _verdict(asm: Asm) -> None:
    asm.op(bpf.LD_MEM, M_FLAGS)
    for value in SHOWN_FLAGS:
        asm.op(bpf.JEQ_K, value, 0, 1)
        asm.op(bpf.RET_K, SNAPLEN)
    asm.op(bpf.RET_K, 0)


def _flag_and_verdict(asm: Asm, version: int, rules: list[PortRange], local: list[str],
                      address: Callable[[Asm, str], Callable[[int, str], None]]) -> None:
    """With the packet's protocol, addresses and ports in scratch memory: set a flag
    for each end that is one of `rules` and each end that is a `local` address of
    this node, then decide by the flags. `version` 0 for IPv4, 1 for IPv6."""
    asm.op(LD_IMM, 0)
    asm.op(bpf.ST, M_FLAGS)
    for r in rules:
        assert r.address is not None
        ports = (M_ID, M_ID) if r.proto == "icmp" else (M_SPORT, M_DPORT)
        for side, flag in ((0, F_SRC), (1, F_DST)):
            _mark(asm, IPPROTO[r.proto][version], side, flag, address(asm, r.address),
                  (ports[side], r.lo, r.hi))
    for a in local:
        for side, flag in ((0, F_SRC_LOCAL), (1, F_DST_LOCAL)):
            _mark(asm, None, side, flag, address(asm, a), None)
    _verdict(asm)


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
    asm.op(bpf.LD_H_ABS, 6)
    asm.drop_if(bpf.JSET_K, 0x1FFF)          # a later fragment: no ports to check
    for slot, off in ((M_PROTO, 9), (M_SRC, 12), (M_DST, 16)):
        asm.op(bpf.LD_B_ABS if slot == M_PROTO else bpf.LD_W_ABS, off)
        asm.op(bpf.ST, slot)
    asm.op(bpf.LDX_B_MSH, 0)                 # X = IHL * 4
    for slot, off in ((M_SPORT, 0), (M_DPORT, 2), (M_ID, 4)):
        asm.op(bpf.LD_H_IND, off)
        asm.op(bpf.ST, slot)
    _flag_and_verdict(asm, 0, v4rules, local4, _v4_address)
    asm.label(v6)
    asm.op(bpf.LD_B_ABS, 6)
    asm.op(bpf.ST, M_PROTO)
    for slot, off in ((M_SPORT, 40), (M_DPORT, 42), (M_ID, 44)):
        asm.op(bpf.LD_H_ABS, off)
        asm.op(bpf.ST, slot)
    _flag_and_verdict(asm, 1, v6rules, local6, _v6_address)
    return asm.assemble()


def error_filter(holdings: list[PortRange]) -> bytes:
    """BPF: only ICMP errors quoting a packet sent from what `holdings` owns."""
    v4rules, v6rules = _split(holdings)
    asm = Asm()
    v4, v6 = _dispatch(asm)
    asm.label(v4)
    asm.op(bpf.LD_H_ABS, 6)
    asm.drop_if(bpf.JSET_K, 0x1FFF)
    asm.op(bpf.LD_B_ABS, 9)
    asm.drop_unless(bpf.JEQ_K, 1)            # ICMP
    asm.op(bpf.LDX_B_MSH, 0)
    asm.op(bpf.LD_B_IND, 0)                  # ICMP type
    for t in ICMP_ERRORS_V4:
        asm.op(bpf.JEQ_K, t, "v4err", 0)
    asm.op(bpf.RET_K, 0)
    asm.label("v4err")
    # The quoted IP header starts 8 bytes into the ICMP message.
    asm.op(bpf.LD_B_IND, 8 + 9)
    asm.op(bpf.ST, M_PROTO)
    asm.op(bpf.LD_W_IND, 8 + 12)
    asm.op(bpf.ST, M_SRC)
    asm.op(bpf.LD_B_IND, 8)                  # quoted version/IHL
    asm.op(bpf.ALU_AND_K, 0x0F)
    asm.op(bpf.ALU_LSH_K, 2)
    asm.op(bpf.ALU_ADD_X, 0)
    asm.op(bpf.ALU_ADD_K, 8)
    asm.op(bpf.TAX)                          # X = start of the quoted transport header
    for slot, off in ((M_SPORT, 0), (M_ID, 4)):
        asm.op(bpf.LD_H_IND, off)
        asm.op(bpf.ST, slot)
    for r in v4rules:
        _rule_v4(asm, r, both_sides=False)
    asm.op(bpf.RET_K, 0)
    asm.label(v6)
    asm.op(bpf.LD_B_ABS, 6)
    asm.drop_unless(bpf.JEQ_K, 58)           # ICMPv6
    asm.op(bpf.LD_B_ABS, 40)
    asm.drop_unless(bpf.JGE_K, ICMP_ERRORS_V6[0])
    asm.drop_if(bpf.JGT_K, ICMP_ERRORS_V6[-1])
    asm.op(bpf.LD_B_ABS, 48 + 6)             # the quoted IPv6 header at 48
    asm.op(bpf.ST, M_PROTO)
    for slot, off in ((M_SPORT, 88), (M_ID, 92)):
        asm.op(bpf.LD_H_ABS, off)
        asm.op(bpf.ST, slot)
    for r in v6rules:
        _rule_v6(asm, r, 48, both_sides=False)
    asm.op(bpf.RET_K, 0)
    return asm.assemble()
