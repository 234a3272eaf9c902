"""HTB shaping on one interface through rtnetlink (pyroute2): mechanism, no policy.

The tree this module builds and adopts (all handles in the HTB qdisc's major, 1:)::

    1:      htb qdisc (root), default class 1:3
    1:1     link class      rate = ceil = link_rate      -- everything borrows from here
    ├─ 1:2  capped root     rate = ceil = node_rate       -- the node's cap
    │   ├─ 1:3      default class (traffic of no sliver), bfifo leaf 3:
    │   └─ 1:m      one per sliver, m in [0x0010, 0x7ffe], bfifo leaf m:
    └─ 1:4  exempt root     rate = ceil = link_rate
        └─ 1:(m|0x8000)  the same sliver's exempt class, bfifo leaf (m|0x8000):

Class ids use the full 16-bit minor space: bit 15 says "exempt", the low 15 bits
name the sliver, so 32,751 slivers fit (the original bwmon had 12 bits: uid < 4096).
`minor_for(name, taken)` maps a sliver name to its minor deterministically (a hash,
then linear probing past the minors already taken), so the mapping survives a lost
database for every name that did not collide. Leaf qdisc handles reuse the class
minor as their major (class 1:0x1234 has leaf 1234:), so they never collide either.

How a packet finds its class. HTB looks at `skb->priority` first: when it names a
leaf class of this qdisc, HTB enqueues there directly and *does not run its filters*
(net/sched/sch_htb.c, htb_classify). So the sliver's cgroup egress BPF program
(kernel/netclass.py) sets `skb->priority = 1:m`, and the exempt decision must be
taken before the qdisc: a clsact *egress* cls_bpf filter (direct action; runs in
__dev_queue_xmit before the root qdisc) sets bit 15 of the minor when the
destination is in one of the exempt CIDRs and the priority already names a sliver
class of this qdisc (`install_exempt_filter`). Packets with any other priority
(the node's own, packet sockets) go to the default class 1:3; the default class
must exist, since HTB sends unclassified packets unshaped otherwise.

Queues are byte-sized bfifos (this kernel has no fq_codel, sfq or cake): about
`QUEUE_MS` of the class's ceiling, at least `QUEUE_MIN_MTUS` MTUs and one 64 KiB GSO
packet, resized whenever the ceiling changes (`leaf_limit`).

Changes are made in place (RTM_NEWTCLASS with NLM_F_REPLACE semantics through
pyroute2's "change-class"); adoption reads the tree back and changes nothing that
already matches, so an agent restart does not interrupt traffic.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg import plugins as _tc_plugins
from pyroute2.netlink.rtnl.tcmsg import sched_pfifo

# pyroute2 0.9.7 knows "pfifo" but not "bfifo"; both take struct tc_fifo_qopt
# { __u32 limit; } (<linux/pkt_sched.h>), bfifo counting bytes. Registering the same
# layout under the kernel's name is idempotent and changes nothing else.
_tc_plugins.setdefault("bfifo", sched_pfifo)

MAJOR = 0x1
LINK_MINOR = 0x1
CAPPED_MINOR = 0x2
DEFAULT_MINOR = 0x3
EXEMPT_MINOR = 0x4
FIRST_SLIVER_MINOR = 0x10
LAST_SLIVER_MINOR = 0x7FFE   # its exempt twin 0xfffe: the leaf major 0xffff is ingress/clsact
EXEMPT_BIT = 0x8000
SLIVER_MINORS = LAST_SLIVER_MINOR - FIRST_SLIVER_MINOR + 1

TC_H_ROOT = 0xFFFFFFFF
QUEUE_MS = 30
QUEUE_MIN_MTUS = 3
#: A leaf must hold one whole GSO packet: TCP hands a veth or a TSO-capable NIC skbs of up
#: to 64 KiB (the default gso_max_size), HTB does not segment them, and a bfifo drops a
#: packet larger than its free room. Below this, every large TCP skb of a slow class was
#: dropped and TCP through a 4 Mbit/s ceiling fell to ~55 kbit/s (issue 15, multi-node).
QUEUE_MIN_BYTES = 65536 + 2 * 1514
QUANTUM_PER_SHARE = 1600           # bwmon: quantum = share x 1600 bytes
QUANTUM_MAX = 200_000              # the kernel warns above this ("quantum is big")
MIN_RATE_BPS = 64                  # 8 bytes/s: HTB cannot express less
DEFAULT_CLASS_RATE_BPS = 1_000_000  # guaranteed to the node's own traffic


def handle(major: int, minor: int) -> int:
    """TC_H_MAKE."""
    return (major << 16) | minor


def is_sliver_minor(minor: int) -> bool:
    return FIRST_SLIVER_MINOR <= (minor & ~EXEMPT_BIT) <= LAST_SLIVER_MINOR


def minor_for(name: str, taken: Mapping[int, str]) -> int:
    """The capped-class minor of sliver `name`: blake2b of the name into the sliver
    range, then the next free minor. `taken` maps minors in use to their owners; a
    name that already owns one gets it back. ValueError when the range is full."""
    for minor, owner in taken.items():
        if owner == name:
            return minor
    digest = hashlib.blake2b(name.encode(), digest_size=4).digest()
    start = int.from_bytes(digest, "big") % SLIVER_MINORS
    for step in range(SLIVER_MINORS):
        minor = FIRST_SLIVER_MINOR + (start + step) % SLIVER_MINORS
        if minor not in taken:
            return minor
    raise ValueError(f"no free HTB class id for sliver {name!r}: all {SLIVER_MINORS} in use")


def leaf_limit(ceil_bps: int, mtu: int = 1500) -> int:
    """bfifo size in bytes: QUEUE_MS of the ceiling, at least QUEUE_MIN_MTUS packets
    (with their Ethernet header) and one GSO packet (QUEUE_MIN_BYTES)."""
    return max(ceil_bps * QUEUE_MS // 8000, QUEUE_MIN_MTUS * (mtu + 14), QUEUE_MIN_BYTES)


def quantum_for(share: int) -> int:
    return min(max(share, 1) * QUANTUM_PER_SHARE, QUANTUM_MAX)


@dataclass(frozen=True)
class ClassSpec:
    """What one sliver class should be: rates in bit/s."""

    rate: int
    ceil: int
    share: int = 1


@dataclass(frozen=True)
class ClassInfo:
    """One HTB class as read back: rates in bit/s, counters since the class was made."""

    minor: int
    parent: int              # parent minor (0 for the top class)
    rate: int
    ceil: int
    quantum: int
    bytes: int
    packets: int
    drops: int
    backlog: int             # bytes queued
    qlen: int                # packets queued
    leaf_limit: int | None   # the bfifo's limit, None without a bfifo leaf


@dataclass
class Hierarchy:
    """The HTB tree found on an interface (`read`)."""

    ifindex: int
    ours: bool                               # root qdisc is our HTB 1: with default 1:3
    classes: dict[int, ClassInfo] = field(default_factory=dict)

    def slivers(self) -> dict[int, ClassInfo]:
        """Sliver capped and exempt classes by minor."""
        return {m: c for m, c in self.classes.items() if is_sliver_minor(m)}


class TcError(OSError):
    """A tc operation failed; the message names the operation, the interface and class."""


def _err(exc: NetlinkError, what: str) -> TcError:
    return TcError(exc.code, f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}")


def _bytes_per_s(bits: int) -> int:
    return max(bits, MIN_RATE_BPS) // 8


class Shaper:
    """HTB on one interface. One rtnetlink socket; close() it (or use `with`).

    Calls block on netlink for well under a millisecond each; the agent runs them
    through trio.to_thread."""

    def __init__(self, ifname: str, mtu: int | None = None) -> None:
        self.ifname = ifname
        self.ipr = IPRoute()
        try:
            found = self.ipr.link_lookup(ifname=ifname)
            if not found:
                raise TcError(errno.ENODEV, f"no network interface {ifname!r}")
            self.ifindex = found[0]
            link = self.ipr.get_links(self.ifindex)[0]
            self.mtu = mtu or link.get_attr("IFLA_MTU") or 1500
        except BaseException:
            self.ipr.close()
            raise

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self) -> Shaper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- low-level helpers -------------------------------------------------------
    def _tc(self, command: str, kind: str | None, handle_: int, what: str, **kw: Any) -> None:
        try:
            self.ipr.tc(command, kind, self.ifindex, handle_, **kw)
        except NetlinkError as exc:
            raise _err(exc, f"tc {command} {what} on {self.ifname}") from None

    def _set_class(self, minor: int, parent: int, rate: int, ceil: int, quantum: int,
                   create: bool) -> None:
        self._tc("add-class" if create else "change-class", "htb", handle(MAJOR, minor),
                 f"class 1:{minor:x}", parent=handle(MAJOR, parent),
                 rate=_bytes_per_s(rate), ceil=_bytes_per_s(max(ceil, rate)),
                 quantum=quantum, mtu=self.mtu + 14)

    def _set_leaf(self, minor: int, ceil: int, create: bool) -> None:
        self._tc("add" if create else "change", "bfifo", handle(minor, 0),
                 f"bfifo {minor:x}: of class 1:{minor:x}", parent=handle(MAJOR, minor),
                 limit=leaf_limit(ceil, self.mtu))

    # --- reading -----------------------------------------------------------------
    def read(self) -> Hierarchy:
        """The HTB tree now on the interface, with every class's counters."""
        ours = False
        limits: dict[int, int] = {}
        for q in self.ipr.get_qdiscs(index=self.ifindex):
            kind = q.get_attr("TCA_KIND")
            if q["parent"] == TC_H_ROOT and kind == "htb" and q["handle"] == handle(MAJOR, 0):
                opts = q.get_attr("TCA_OPTIONS")   # absent on a qdisc dumped without them
                init = (opts.get_attr("TCA_HTB_INIT") if opts is not None else None) or {}
                ours = init.get("defcls") == DEFAULT_MINOR
            elif kind == "bfifo" and q["parent"] >> 16 == MAJOR:
                limits[q["parent"] & 0xFFFF] = (q.get_attr("TCA_OPTIONS") or {}).get("limit", 0)
        hier = Hierarchy(self.ifindex, ours)
        if not ours:
            return hier
        for c in self.ipr.get_classes(index=self.ifindex):
            if c.get_attr("TCA_KIND") != "htb" or c["handle"] >> 16 != MAJOR:
                continue
            minor = c["handle"] & 0xFFFF
            opts = c.get_attr("TCA_OPTIONS")
            parms = opts.get_attr("TCA_HTB_PARMS")
            rate = opts.get_attr("TCA_HTB_RATE64") or parms["rate"]
            ceil = opts.get_attr("TCA_HTB_CEIL64") or parms["ceil"]
            stats = c.get_attr("TCA_STATS2")
            basic = stats.get_attr("TCA_STATS_BASIC") or {}
            queue = stats.get_attr("TCA_STATS_QUEUE") or {}
            parent = 0 if c["parent"] == TC_H_ROOT else c["parent"] & 0xFFFF
            hier.classes[minor] = ClassInfo(
                minor=minor, parent=parent, rate=rate * 8, ceil=ceil * 8,
                quantum=parms["quantum"], bytes=basic.get("bytes", 0),
                packets=basic.get("packets", 0), drops=queue.get("drops", 0),
                backlog=queue.get("backlog", 0), qlen=queue.get("qlen", 0),
                leaf_limit=limits.get(minor))
        return hier

    def counters(self) -> dict[int, ClassInfo]:
        """Sliver classes (capped and exempt) by minor, with their counters."""
        return self.read().slivers()

    def stats(self) -> dict[int, ClassInfo]:
        """Sliver classes by minor: the accounting pass's fast read. One raw
        RTM_GETTCLASS dump parsed for the handle, HTB rates and TCA_STATS2 only (no
        qdisc dump: `leaf_limit` is None, which `set_ceil` takes as "resize it")."""
        out: dict[int, ClassInfo] = {}
        for info in dump_classes(self.ifindex):
            if is_sliver_minor(info.minor):
                out[info.minor] = info
        return out

    # --- the fixed part of the tree ----------------------------------------------
    def ensure_root(self, node_rate: int, link_rate: int) -> Hierarchy:
        """Make the fixed tree (qdisc, 1:1, 1:2, 1:3, 1:4) or adopt it: classes that
        exist are changed in place only where they differ; sliver classes found are
        left alone (the caller adopts or removes them). Returns the tree as read."""
        link_rate = max(link_rate, node_rate)
        hier = self.read()
        if not hier.ours:
            # Whatever is there (noqueue, pfifo_fast, mq, someone's HTB) is replaced once.
            try:
                self.ipr.tc("del", index=self.ifindex, parent=TC_H_ROOT)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.EINVAL):
                    raise _err(exc, f"tc del root qdisc on {self.ifname}") from None
            self._tc("add", "htb", handle(MAJOR, 0), "htb root qdisc",
                     default=DEFAULT_MINOR, parent=TC_H_ROOT)
        fixed = (
            (LINK_MINOR, None, link_rate, link_rate, QUANTUM_MAX),
            (CAPPED_MINOR, LINK_MINOR, node_rate, node_rate, QUANTUM_MAX),
            (DEFAULT_MINOR, CAPPED_MINOR, min(DEFAULT_CLASS_RATE_BPS, node_rate), node_rate,
             QUANTUM_PER_SHARE),
            (EXEMPT_MINOR, LINK_MINOR, link_rate, link_rate, QUANTUM_MAX),
        )
        for minor, parent, rate, ceil, quantum in fixed:
            have = hier.classes.get(minor)
            parent_h = TC_H_ROOT if parent is None else handle(MAJOR, parent)
            if have is None or not self._same(have, rate, ceil, quantum):
                self._tc("add-class" if have is None else "change-class", "htb",
                         handle(MAJOR, minor), f"class 1:{minor:x}", parent=parent_h,
                         rate=_bytes_per_s(rate), ceil=_bytes_per_s(ceil),
                         quantum=quantum, mtu=self.mtu + 14)
        have = hier.classes.get(DEFAULT_MINOR)
        want = leaf_limit(node_rate, self.mtu)
        if have is None or have.leaf_limit != want:
            self._set_leaf(DEFAULT_MINOR, node_rate, create=have is None or have.leaf_limit is None)
        return self.read()

    @staticmethod
    def _same(have: ClassInfo, rate: int, ceil: int, quantum: int) -> bool:
        # The kernel stores bytes/s: compare at that resolution.
        return (have.rate // 8 == _bytes_per_s(rate) and have.ceil // 8 == _bytes_per_s(max(ceil, rate))
                and have.quantum == quantum)

    # --- sliver classes ----------------------------------------------------------
    def ensure_sliver(self, minor: int, capped: ClassSpec, exempt: ClassSpec,
                      have: Mapping[int, ClassInfo] | None = None) -> None:
        """Create or change in place the sliver's two classes and their bfifos.
        `have` is a recent `counters()` (saves a dump when doing many)."""
        if not FIRST_SLIVER_MINOR <= minor <= LAST_SLIVER_MINOR:
            raise ValueError(f"class minor {minor:#x} is outside the sliver range")
        if have is None:
            have = self.counters()
        for m, parent, spec in ((minor, CAPPED_MINOR, capped),
                                (minor | EXEMPT_BIT, EXEMPT_MINOR, exempt)):
            cur = have.get(m)
            quantum = quantum_for(spec.share)
            if cur is None or not self._same(cur, spec.rate, spec.ceil, quantum):
                self._set_class(m, parent, spec.rate, spec.ceil, quantum, create=cur is None)
            want = leaf_limit(max(spec.ceil, spec.rate), self.mtu)
            if cur is None or cur.leaf_limit != want:
                self._set_leaf(m, max(spec.ceil, spec.rate),
                               create=cur is None or cur.leaf_limit is None)

    def set_ceil(self, minor: int, spec: ClassSpec, have: ClassInfo | None = None) -> None:
        """Change one class (capped or exempt minor) in place and resize its bfifo."""
        parent = EXEMPT_MINOR if minor & EXEMPT_BIT else CAPPED_MINOR
        quantum = quantum_for(spec.share)
        if have is None or not self._same(have, spec.rate, spec.ceil, quantum):
            self._set_class(minor, parent, spec.rate, spec.ceil, quantum, create=False)
        want = leaf_limit(max(spec.ceil, spec.rate), self.mtu)
        if have is None or have.leaf_limit != want:
            self._set_leaf(minor, max(spec.ceil, spec.rate), create=False)

    def remove_sliver(self, minor: int) -> None:
        """Delete the sliver's two classes (their bfifos go with them). Idempotent."""
        for m in (minor, minor | EXEMPT_BIT):
            try:
                # No kind: with "htb" pyroute2 would encode class parameters.
                self.ipr.tc("del-class", None, self.ifindex, handle(MAJOR, m),
                            parent=handle(MAJOR, EXEMPT_MINOR if m & EXEMPT_BIT else CAPPED_MINOR))
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:
                    raise _err(exc, f"tc del-class 1:{m:x} on {self.ifname}") from None

    def remove_all(self) -> None:
        """Remove the root qdisc (and so every class and filter) and clsact. Idempotent."""
        for parent in (TC_H_ROOT, 0xFFFFFFF1):
            try:
                self.ipr.tc("del", index=self.ifindex, parent=parent)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.EINVAL):
                    raise _err(exc, f"tc del qdisc on {self.ifname}") from None

    # --- exempt filter -----------------------------------------------------------
    def install_exempt_filter(self, prog_fd: int, name: str) -> None:
        """Attach (or atomically replace) the clsact egress cls_bpf program that
        moves exempt-bound sliver packets into the exempt subtree (see the module
        docstring; the program is built by kernel/netclass.py)."""
        try:
            self.ipr.tc("add", "clsact", self.ifindex)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _err(exc, f"tc add clsact on {self.ifname}") from None
        self._tc("replace-filter", "bpf", 0, "exempt filter", parent=EGRESS_PARENT,
                 prio=1, protocol=ETH_P_ALL, fd=prog_fd, name=name, direct_action=True)

    def exempt_filter_name(self) -> str | None:
        """The name of the exempt filter now attached, None without one."""
        try:
            found = self.ipr.get_filters(index=self.ifindex, parent=EGRESS_PARENT)
        except NetlinkError as exc:
            if exc.code in (errno.EINVAL, errno.ENOENT):
                return None
            raise _err(exc, f"tc filter show egress on {self.ifname}") from None
        for f in found:
            opts = f.get_attr("TCA_OPTIONS")
            if f.get_attr("TCA_KIND") == "bpf" and opts:
                return opts.get_attr("TCA_BPF_NAME")
        return None

    def remove_exempt_filter(self) -> None:
        try:
            self.ipr.tc("del", index=self.ifindex, parent=0xFFFFFFF1)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL):
                raise _err(exc, f"tc del clsact on {self.ifname}") from None


# --- the raw class dump (the accounting pass: ~1000 classes every few seconds) ------
NETLINK_ROUTE = 0
RTM_NEWTCLASS, RTM_GETTCLASS = 40, 42
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
TCA_KIND, TCA_OPTIONS, TCA_STATS2 = 1, 2, 7
TCA_HTB_PARMS, TCA_HTB_RATE64, TCA_HTB_CEIL64 = 1, 6, 7
TCA_STATS_BASIC, TCA_STATS_QUEUE = 1, 3
_NLMSG = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BxxxiIII")
_RTA = struct.Struct("=HH")
_HTB_OPT = struct.Struct("=8xI8xI8xI")       # rate.rate, ceil.rate, quantum (tc_htb_opt)
_BASIC = struct.Struct("=QI")                # gnet_stats_basic: bytes, packets
_QUEUE = struct.Struct("=III")               # gnet_stats_queue: qlen, backlog, drops


def _attrs(buf: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """rtattr type -> (payload start, payload end) between start and end."""
    out: dict[int, tuple[int, int]] = {}
    while start + 4 <= end:
        length, kind = _RTA.unpack_from(buf, start)
        if length < 4:
            break
        out[kind & 0x3FFF] = (start + 4, start + length)
        start += (length + 3) & ~3
    return out


def dump_classes(ifindex: int) -> list[ClassInfo]:
    """Every HTB class of major 1: on `ifindex`, from one RTM_GETTCLASS dump read
    with struct (pyroute2 decodes every attribute of every message: ~4x the CPU)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        req = _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, 0, 0)
        sock.send(_NLMSG.pack(_NLMSG.size + len(req), RTM_GETTCLASS,
                              NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
        out: list[ClassInfo] = []
        while True:
            buf = sock.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(buf):
                length, kind, _, _, _ = _NLMSG.unpack_from(buf, off)
                if length < _NLMSG.size:
                    raise TcError(errno.EPROTO, "tc class dump: bad netlink message")
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", buf, off + _NLMSG.size)[0]
                    if code:
                        raise TcError(code, f"tc class dump on ifindex {ifindex}: "
                                            f"{os.strerror(code)}")
                elif kind == RTM_NEWTCLASS:
                    info = _class_info(buf, off + _NLMSG.size, off + length)
                    if info is not None:
                        out.append(info)
                off += (length + 3) & ~3
    finally:
        sock.close()


def _class_info(buf: bytes, start: int, end: int) -> ClassInfo | None:
    _, _, handle_, parent, _ = _TCMSG.unpack_from(buf, start)
    if handle_ >> 16 != MAJOR:
        return None
    top = _attrs(buf, start + _TCMSG.size, end)
    kind = top.get(TCA_KIND)
    if kind is None or buf[kind[0]:kind[1]].rstrip(b"\0") != b"htb" or TCA_OPTIONS not in top:
        return None
    opts = _attrs(buf, *top[TCA_OPTIONS])
    if TCA_HTB_PARMS not in opts:
        return None
    rate, ceil, quantum = _HTB_OPT.unpack_from(buf, opts[TCA_HTB_PARMS][0])
    if TCA_HTB_RATE64 in opts:
        rate = struct.unpack_from("=Q", buf, opts[TCA_HTB_RATE64][0])[0]
    if TCA_HTB_CEIL64 in opts:
        ceil = struct.unpack_from("=Q", buf, opts[TCA_HTB_CEIL64][0])[0]
    nbytes = packets = qlen = backlog = drops = 0
    if TCA_STATS2 in top:
        stats = _attrs(buf, *top[TCA_STATS2])
        if TCA_STATS_BASIC in stats:
            nbytes, packets = _BASIC.unpack_from(buf, stats[TCA_STATS_BASIC][0])
        if TCA_STATS_QUEUE in stats:
            qlen, backlog, drops = _QUEUE.unpack_from(buf, stats[TCA_STATS_QUEUE][0])
    return ClassInfo(minor=handle_ & 0xFFFF,
                     parent=0 if parent == TC_H_ROOT else parent & 0xFFFF,
                     rate=rate * 8, ceil=ceil * 8, quantum=quantum, bytes=nbytes,
                     packets=packets, drops=drops, backlog=backlog, qlen=qlen,
                     leaf_limit=None)


EGRESS_PARENT = 0xFFFFFFF3   # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
ETH_P_ALL = 0x0003

