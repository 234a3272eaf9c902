"""Classifying a sliver's packets into its HTB class with eBPF (no cls_cgroup here).

Two programs, both generated here as instruction lists:

* `cgroup_egress_program(minor)`: a BPF_PROG_TYPE_CGROUP_SKB program attached at
  BPF_CGROUP_INET_EGRESS of the sliver's cgroup v2 directory. It sets
  `skb->priority = TC_H_MAKE(1, minor)` on every IP packet the sliver's sockets send,
  and lets the packet pass. HTB then enqueues it straight into class 1:minor
  (kernel/tc.py). Sockets keep the cgroup they were created in, so a socket the agent
  creates for a sliver must be created from a thread that is in the sliver's cgroup
  (or its cgroup changed with the sk's cgroup at creation) to be billed to it.
  Attached without BPF_F_ALLOW_OVERRIDE/MULTI, so nothing below the sliver's cgroup
  can attach its own egress program and escape; a second attach replaces the first
  (which is how an agent restart re-attaches without a gap). The attachment belongs
  to the cgroup, not to our fd: it outlives the agent and dies with the cgroup, and
  a re-created cgroup (new id) needs a new attach.
* `exempt_egress_program(l3_offset, cidrs)`: a BPF_PROG_TYPE_SCHED_CLS program for
  the interface's clsact egress hook (direct action). When `skb->priority` names a
  sliver's capped class of HTB 1: and the destination address is in one of the
  exempt CIDRs (IPv4 or IPv6), it sets bit 15 of the minor: the exempt twin class.

Packet sockets (AF_PACKET) do not pass through the IP output path, so the cgroup hook
does not see them: their packets land in the default class, and PACKET_QDISC_BYPASS
(which would skip the qdisc altogether) must be refused by the guard.

The bpf(2) wrappers at the end (`prog_load`, `prog_attach`, `prog_detach`) are the
minimum these programs need; they are to be merged onto kernel/ebpf.py.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

# --- instruction encoding (<linux/bpf_common.h>, <linux/bpf.h>) -------------------
BPF_LDX, BPF_STX, BPF_ALU, BPF_JMP, BPF_JMP32, BPF_ALU64 = 0x01, 0x03, 0x04, 0x05, 0x06, 0x07
BPF_W, BPF_MEM = 0x00, 0x60
BPF_K, BPF_X = 0x00, 0x08
BPF_ADD, BPF_OR, BPF_AND, BPF_RSH, BPF_MOV = 0x00, 0x40, 0x50, 0x70, 0xB0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JNE, BPF_JLT, BPF_CALL, BPF_EXIT = (
    0x00, 0x10, 0x20, 0x50, 0xA0, 0x80, 0x90)
BPF_FUNC_skb_load_bytes = 26

# struct __sk_buff offsets: len, pkt_type, mark, queue_mapping, protocol, vlan_present,
# vlan_tci, vlan_proto, priority
SKB_PROTOCOL = 16
SKB_PRIORITY = 32
ETH_P_IP_BE = 0x0008       # htons(0x0800) as the u32 the context holds (little endian)
ETH_P_IPV6_BE = 0xDD86     # htons(0x86dd)
TC_ACT_OK = 0

HTB_MAJOR = 0x1
EXEMPT_BIT = 0x8000
FIRST_SLIVER_MINOR = 0x10
LAST_SLIVER_MINOR = 0x7FFE

INSN = struct.Struct("<BBhi")


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


@dataclass
class Asm:
    """A few eBPF instructions with forward labels; `code()` resolves them."""

    insns: list[tuple[int, int, int, int, str | None]] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def op(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0,
           target: str | None = None) -> None:
        self.insns.append((code, (src << 4) | dst, off, _s32(imm), target))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def mov(self, dst: int, imm: int) -> None:
        self.op(BPF_ALU | BPF_MOV | BPF_K, dst, imm=imm)            # 32-bit, zero-extends

    def movr(self, dst: int, src: int) -> None:
        self.op(BPF_ALU64 | BPF_MOV | BPF_X, dst, src)

    def alu32(self, opcode: int, dst: int, imm: int) -> None:
        self.op(BPF_ALU | opcode | BPF_K, dst, imm=imm)

    def add64(self, dst: int, imm: int) -> None:
        self.op(BPF_ALU64 | BPF_ADD | BPF_K, dst, imm=imm)

    def ldxw(self, dst: int, src: int, off: int) -> None:
        self.op(BPF_LDX | BPF_MEM | BPF_W, dst, src, off)

    def stxw(self, dst: int, off: int, src: int) -> None:
        self.op(BPF_STX | BPF_MEM | BPF_W, dst, src, off)

    def jmp32(self, opcode: int, dst: int, imm: int, target: str) -> None:
        self.op(BPF_JMP32 | opcode | BPF_K, dst, imm=imm, target=target)

    def ja(self, target: str) -> None:
        self.op(BPF_JMP | BPF_JA, target=target)

    def call(self, func: int) -> None:
        self.op(BPF_JMP | BPF_CALL, imm=func)

    def exit(self) -> None:
        self.op(BPF_JMP | BPF_EXIT)

    def code(self) -> bytes:
        out = bytearray()
        for pc, (code, regs, off, imm, target) in enumerate(self.insns):
            if target is not None:
                off = self.labels[target] - pc - 1
            out += INSN.pack(code, regs, off, imm)
        return bytes(out)


def cgroup_egress_program(minor: int, major: int = HTB_MAJOR) -> bytes:
    """skb->priority = TC_H_MAKE(major, minor); allow."""
    if not FIRST_SLIVER_MINOR <= minor <= LAST_SLIVER_MINOR:
        raise ValueError(f"class minor {minor:#x} is outside the sliver range")
    a = Asm()
    a.mov(2, (major << 16) | minor)
    a.stxw(1, SKB_PRIORITY, 2)
    a.mov(0, 1)
    a.exit()
    return a.code()


def _words(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[tuple[int, int]]:
    """(value, mask) per 32-bit word as the little-endian loads of the packet see it."""
    addr, mask = net.network_address.packed, net.netmask.packed
    return [(int.from_bytes(addr[i:i + 4], "little"), int.from_bytes(mask[i:i + 4], "little"))
            for i in range(0, len(addr), 4)]


def exempt_egress_program(cidrs: Iterable[str], l3_offset: int = 14,
                          major: int = HTB_MAJOR) -> bytes:
    """The clsact egress classifier: sliver class 1:m -> 1:(m|0x8000) for exempt
    destinations. `l3_offset` is the link header length (14 on Ethernet)."""
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    a = Asm()
    if not nets:  # the verifier refuses unreachable code: a program that does nothing
        a.mov(0, TC_ACT_OK)
        a.exit()
        return a.code()
    a.movr(6, 1)                                   # r6 = ctx
    a.ldxw(7, 6, SKB_PRIORITY)                     # r7 = priority
    a.movr(2, 7)
    a.alu32(BPF_RSH, 2, 16)
    a.jmp32(BPF_JNE, 2, major, "out")
    a.movr(2, 7)
    a.alu32(BPF_AND, 2, 0xFFFF)
    a.jmp32(BPF_JLT, 2, FIRST_SLIVER_MINOR, "out")
    a.jmp32(BPF_JGT, 2, LAST_SLIVER_MINOR, "out")  # also: already exempt
    a.ldxw(8, 6, SKB_PROTOCOL)
    a.jmp32(BPF_JEQ, 8, ETH_P_IP_BE, "v4")
    a.jmp32(BPF_JEQ, 8, ETH_P_IPV6_BE, "v6")
    a.ja("out")
    for version, daddr, size in ((4, 16, 4), (6, 24, 16)):
        a.label(f"v{version}")
        a.movr(1, 6)
        a.mov(2, l3_offset + daddr)
        a.movr(3, 10)
        a.add64(3, -16)
        a.mov(4, size)
        a.call(BPF_FUNC_skb_load_bytes)
        a.jmp32(BPF_JNE, 0, 0, "out")
        for n, net in enumerate(x for x in nets if x.version == version):
            if net.prefixlen == 0:   # matches everything: later CIDRs are unreachable
                break
            miss = f"v{version}_miss{n}"
            for i, (value, mask) in enumerate(_words(net)):
                if mask == 0:
                    continue
                a.ldxw(3, 10, -16 + 4 * i)
                a.alu32(BPF_AND, 3, mask)
                a.jmp32(BPF_JNE, 3, value, miss)
            a.ja("hit")
            a.label(miss)
        else:
            a.ja("out")
            continue
        a.ja("hit")
    a.label("hit")
    a.alu32(BPF_OR, 7, EXEMPT_BIT)
    a.stxw(6, SKB_PRIORITY, 7)
    a.label("out")
    a.mov(0, TC_ACT_OK)
    a.exit()
    return a.code()


# --- bpf(2): the minimum, to be merged onto kernel/ebpf.py ------------------------
SYS_bpf = 321  # x86-64
BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH, BPF_PROG_QUERY = 5, 8, 9, 16
BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_CGROUP_SKB = 3, 8
BPF_CGROUP_INET_EGRESS = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    ret = _libc.syscall(ctypes.c_long(SYS_bpf), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


def prog_load(prog_type: int, code: bytes, name: str, expected_attach_type: int = 0) -> int:
    """BPF_PROG_LOAD; returns the program fd. The verifier's log is in the error."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIQQIIQII16sII", attr, 0, prog_type, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_), 1, len(log),
                     ctypes.addressof(log), 0, 0, name.encode()[:15], 0, expected_attach_type)
    try:
        return _bpf(BPF_PROG_LOAD, attr, f"bpf prog load {name!r}")
    except OSError as exc:
        text = log.value.decode(errors="replace").strip()
        raise OSError(exc.errno, f"{exc.strerror}; verifier: {text[-2000:]}") from None


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = 0) -> None:
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIII", attr, 0, target_fd, prog_fd, attach_type, flags)
    _bpf(BPF_PROG_ATTACH, attr, "bpf prog attach")


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIII", attr, 0, target_fd, prog_fd, attach_type, 0)
    _bpf(BPF_PROG_DETACH, attr, "bpf prog detach")


def prog_query_count(target_fd: int, attach_type: int) -> int:
    """How many programs are attached at this cgroup's hook (BPF_PROG_QUERY)."""
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIII", attr, 0, target_fd, attach_type, 0, 0)
    _bpf(BPF_PROG_QUERY, attr, "bpf prog query")
    return struct.unpack_from("=I", attr, 24)[0]


# --- the policy-free operations the agent calls -----------------------------------
def classify_cgroup(cgroup_dir: str, minor: int) -> None:
    """Attach (or replace) the sliver's egress classifier at its cgroup v2 directory."""
    prog = prog_load(BPF_PROG_TYPE_CGROUP_SKB, cgroup_egress_program(minor), f"pl_cls_{minor:x}",
                     BPF_CGROUP_INET_EGRESS)
    try:
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            prog_attach(fd, prog, BPF_CGROUP_INET_EGRESS)
        finally:
            os.close(fd)
    finally:
        os.close(prog)


def unclassify_cgroup(cgroup_dir: str) -> None:
    """Detach whatever egress program is attached at the cgroup (single-attach mode:
    BPF_PROG_DETACH with no program fd). Idempotent: ENOENT when none is."""
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            prog_detach(fd, 0, BPF_CGROUP_INET_EGRESS)
        except OSError as exc:
            if exc.errno != 2:
                raise
    finally:
        os.close(fd)


def load_exempt_program(cidrs: Iterable[str], l3_offset: int = 14) -> int:
    """Load the exempt classifier; the caller passes the fd to
    kernel.tc.Shaper.install_exempt_filter and closes it."""
    return prog_load(BPF_PROG_TYPE_SCHED_CLS, exempt_egress_program(cidrs, l3_offset),
                     "pl_exempt")
