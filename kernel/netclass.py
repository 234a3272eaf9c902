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

Programs are written with kernel/ebpf.py's assembler and loaded with its bpf(2)
wrappers (the project's one BPF assembler).
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Iterable

from kernel import ebpf as B

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

CLASSIFY_PREFIX = "pl_cls_"
BPF_CGROUP_INET_EGRESS = B.CGROUP_INET_EGRESS


def cgroup_egress_program(minor: int, major: int = HTB_MAJOR) -> B.Program:
    """skb->priority = TC_H_MAKE(major, minor); allow."""
    if not FIRST_SLIVER_MINOR <= minor <= LAST_SLIVER_MINOR:
        raise ValueError(f"class minor {minor:#x} is outside the sliver range")
    return [
        B.mov32_imm(B.R2, (major << 16) | minor),
        B.stx_mem(B.W, B.R1, B.R2, SKB_PRIORITY),
        B.mov32_imm(B.R0, 1),
        B.exit_insn(),
    ]


def _words(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[tuple[int, int]]:
    """(value, mask) per 32-bit word as the little-endian loads of the packet see it."""
    addr, mask = net.network_address.packed, net.netmask.packed
    return [(int.from_bytes(addr[i:i + 4], "little"), int.from_bytes(mask[i:i + 4], "little"))
            for i in range(0, len(addr), 4)]


def exempt_egress_program(cidrs: Iterable[str], l3_offset: int = 14,
                          major: int = HTB_MAJOR) -> B.Program:
    """The clsact egress classifier: sliver class 1:m -> 1:(m|0x8000) for exempt
    destinations. `l3_offset` is the link header length (14 on Ethernet)."""
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    if not nets:  # the verifier refuses unreachable code: a program that does nothing
        return [B.mov32_imm(B.R0, TC_ACT_OK), B.exit_insn()]
    p: list[B.Insn | B.Label | tuple[B.Insn, B.Insn]] = [
        B.mov64_reg(B.R6, B.R1),                          # r6 = ctx
        B.ldx_mem(B.W, B.R7, B.R6, SKB_PRIORITY),         # r7 = priority
        B.mov64_reg(B.R2, B.R7),
        B.alu32_imm(B.RSH, B.R2, 16),
        B.jmp32_imm(B.JNE, B.R2, major, "out"),
        B.mov64_reg(B.R2, B.R7),
        B.alu32_imm(B.AND, B.R2, 0xFFFF),
        B.jmp32_imm(B.JLT, B.R2, FIRST_SLIVER_MINOR, "out"),
        B.jmp32_imm(B.JGT, B.R2, LAST_SLIVER_MINOR, "out"),  # also: already exempt
        B.ldx_mem(B.W, B.R8, B.R6, SKB_PROTOCOL),
        B.jmp32_imm(B.JEQ, B.R8, ETH_P_IP_BE, "v4"),
        B.jmp32_imm(B.JEQ, B.R8, ETH_P_IPV6_BE, "v6"),
        B.ja("out"),
    ]
    for version, daddr, size in ((4, 16, 4), (6, 24, 16)):
        p += [
            B.Label(f"v{version}"),
            B.mov64_reg(B.R1, B.R6),
            B.mov32_imm(B.R2, l3_offset + daddr),
            B.mov64_reg(B.R3, B.R10),
            B.alu64_imm(B.ADD, B.R3, -16),
            B.mov32_imm(B.R4, size),
            B.call(B.FUNC_SKB_LOAD_BYTES),
            B.jmp32_imm(B.JNE, B.R0, 0, "out"),
        ]
        for n, net in enumerate(x for x in nets if x.version == version):
            if net.prefixlen == 0:   # matches everything: later CIDRs are unreachable
                break
            miss = f"v{version}_miss{n}"
            for i, (value, mask) in enumerate(_words(net)):
                if mask == 0:
                    continue
                p += [B.ldx_mem(B.W, B.R3, B.R10, -16 + 4 * i),
                      B.alu32_imm(B.AND, B.R3, mask),
                      B.jmp32_imm(B.JNE, B.R3, value, miss)]
            p += [B.ja("hit"), B.Label(miss)]
        else:
            p.append(B.ja("out"))
            continue
        p.append(B.ja("hit"))
    p += [
        B.Label("hit"),
        B.alu32_imm(B.OR, B.R7, EXEMPT_BIT),
        B.stx_mem(B.W, B.R6, B.R7, SKB_PRIORITY),
        B.Label("out"),
        B.mov32_imm(B.R0, TC_ACT_OK),
        B.exit_insn(),
    ]
    return p


def prog_query_count(target_fd: int, attach_type: int) -> int:
    """How many programs are attached at this cgroup's hook."""
    return len(B.prog_query(target_fd, attach_type))


# --- the policy-free operations the agent calls -----------------------------------
def classify_cgroup(cgroup_dir: str | os.PathLike[str], minor: int) -> None:
    """Attach (or replace) the sliver's egress classifier at its cgroup v2 directory.
    Exclusive attach (no MULTI/OVERRIDE): nothing below can add its own, and a second
    attach replaces the first without a gap."""
    with B.prog_load(B.PROG_TYPE_CGROUP_SKB, cgroup_egress_program(minor),
                     f"{CLASSIFY_PREFIX}{minor:x}", B.CGROUP_INET_EGRESS) as prog:
        fd = B.cgroup_fd(cgroup_dir)
        try:
            B.prog_attach(fd, prog, B.CGROUP_INET_EGRESS, B.F_EXCLUSIVE)
        finally:
            os.close(fd)


def unclassify_cgroup(cgroup_dir: str | os.PathLike[str]) -> None:
    """Detach whatever egress program is attached at the cgroup (single-attach mode:
    BPF_PROG_DETACH with no program fd). Idempotent: ENOENT when none is."""
    fd = B.cgroup_fd(cgroup_dir)
    try:
        B.prog_detach(fd, None, B.CGROUP_INET_EGRESS)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
    finally:
        os.close(fd)


def load_exempt_program(cidrs: Iterable[str], l3_offset: int = 14) -> int:
    """Load the exempt classifier; the caller passes the fd to
    kernel.tc.Shaper.install_exempt_filter and closes it (os.close)."""
    prog = B.prog_load(B.PROG_TYPE_SCHED_CLS, exempt_egress_program(cidrs, l3_offset),
                       "pl_exempt")
    fd, prog.fd = prog.fd, -1      # the caller owns the raw fd now
    return fd
