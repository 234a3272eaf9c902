"""The node's port table: who owns which TCP/UDP port and ICMP id on which address.

Pure and sans-IO: no sockets, no files. The guard asks `check_bind` for every
guarded bind; the slice API and the reconciler change ownership with `grant`,
`release`, `set_tag_ports` and `release_slice`; persistence is the caller's job
(`entries()` out, `load()` in).

Rules (docs/guard.md, ARCHITECTURE.md decision 5):
- keys are (protocol, node address, port); each is free or owned by one slice;
- the node addresses are the configured ones plus loopback (127.0.0.0/8 is one
  entry, 127.0.0.1, and ::1 another); IPv4-mapped IPv6 addresses are the IPv4 one;
- binding a wildcard address (0.0.0.0, or :: which also covers IPv4) needs the port
  on every node address it covers;
- port 0 is free for everyone (the kernel picks from its ephemeral range); an
  explicit TCP/UDP port inside the ephemeral range can never be owned and binding
  one is refused (EACCES): explicitly bound ports leave the kernel's pool for
  outgoing connections node-wide, so one slice could empty it (F18);
- reserved host ports (node config `reserved_ports`: sshd, DNS, NTP...) can never be
  owned, neither by tag nor by ReservePort (F16);
- ReservePort (source "reserve") only grants TCP/UDP ports >= 1024; lower ones come
  from PLC tags only; a PLC tag takes a port away from another slice's runtime
  reservation (tags take precedence), never from another slice's tag;
- a bind to a port not owned fails with EACCES, to one owned by another slice with
  EADDRINUSE, to an address that is not the node's with EADDRNOTAVAIL.

Tag syntax (slice tag `ports`): comma-separated `PROTO:PORT[-PORT][@ADDRESS]`, e.g.
`tcp:80,udp:5000-5010@10.0.0.1,icmp:7`. Without `@ADDRESS` the range is granted on
every node address.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

PROTOCOLS = ("tcp", "udp", "icmp")
MAX_PORTS_PER_RANGE = 4096  # bounds the table: a tag cannot claim 64k ports at once
MAX_TAG_LENGTH = 4096
LOOPBACK4 = "127.0.0.1"
LOOPBACK6 = "::1"
SOURCES = ("tag", "reserve", "rcap")   # rcap: given by the slice's rcaps and loans
FIRST_UNPRIVILEGED = 1024  # ReservePort grants TCP/UDP ports from here on


class PortError(ValueError):
    """A malformed port specification or address (the caller's mistake)."""


class PortConflict(Exception):
    """A grant that would take a port another slice owns."""

    def __init__(self, proto: str, address: str, port: int, owner: str) -> None:
        super().__init__(f"{proto} port {port} on {address} is owned by slice {owner!r}")
        self.proto, self.address, self.port, self.owner = proto, address, port, owner


@dataclass(frozen=True, order=True)
class PortRange:
    """`lo..hi` (inclusive) of `proto` on `address` (None: every node address)."""

    proto: str
    lo: int
    hi: int
    address: str | None = None

    def __post_init__(self) -> None:
        if self.proto not in PROTOCOLS:
            raise PortError(f"unknown protocol {self.proto!r} (use one of {', '.join(PROTOCOLS)})")
        if not (1 <= self.lo <= self.hi <= 65535):
            raise PortError(f"bad {self.proto} port range {self.lo}-{self.hi} (1..65535, lo <= hi)")
        if self.hi - self.lo + 1 > MAX_PORTS_PER_RANGE:
            raise PortError(f"{self.proto} range {self.lo}-{self.hi} is larger than "
                            f"{MAX_PORTS_PER_RANGE} ports")
        if self.address is not None:
            object.__setattr__(self, "address", normalize_address(self.address))

    def __str__(self) -> str:
        ports = str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"
        return f"{self.proto}:{ports}" + (f"@{self.address}" if self.address else "")


class BindDecision(NamedTuple):
    """The verdict for one bind: errno 0 means allowed; `reason` goes to the log."""

    errno: int
    reason: str

    @property
    def allowed(self) -> bool:
        return self.errno == 0


@functools.lru_cache(maxsize=4096)
def normalize_address(text: str) -> str:
    """Canonical text of an address: loopback folded, IPv4-mapped IPv6 unwrapped."""
    try:
        addr = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise PortError(f"bad address {text!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address) and addr in ipaddress.ip_network("127.0.0.0/8"):
        return LOOPBACK4
    return str(addr)


def parse_ports_tag(value: str) -> list[PortRange]:
    """Parse a `ports` tag value; raises PortError naming the bad item."""
    if len(value) > MAX_TAG_LENGTH:
        raise PortError(f"ports tag longer than {MAX_TAG_LENGTH} characters")
    ranges: list[PortRange] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        proto, sep, rest = item.partition(":")
        if not sep:
            raise PortError(f"ports item {item!r}: expected PROTO:PORT[-PORT][@ADDRESS]")
        ports, _, address = rest.partition("@")
        lo_text, _, hi_text = ports.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if hi_text else lo
        except ValueError:
            raise PortError(f"ports item {item!r}: ports must be numbers") from None
        try:
            ranges.append(PortRange(proto.strip().lower(), lo, hi, address.strip() or None))
        except PortError as exc:
            raise PortError(f"ports item {item!r}: {exc}") from None
    return ranges


def format_ports_tag(ranges: Iterable[PortRange]) -> str:
    return ",".join(str(r) for r in sorted(ranges))


Key = tuple[str, str, int]  # (proto, address, port)


class PortTable:
    """Ownership of (protocol, address, port); see the module docstring."""

    def __init__(self, addresses: Iterable[str], ephemeral: tuple[int, int],
                 reserved: Iterable[PortRange] = ()) -> None:
        lo, hi = ephemeral
        if not 1 <= lo <= hi <= 65535:
            raise PortError(f"bad ephemeral port range {lo}-{hi}")
        self.ephemeral = (lo, hi)
        # Host ports nobody may be granted (None address: on every address).
        self.reserved: tuple[PortRange, ...] = tuple(sorted(set(reserved)))
        addrs = {normalize_address(a) for a in addresses} | {LOOPBACK4, LOOPBACK6}
        for a in addrs:
            if ipaddress.ip_address(a).is_unspecified:
                raise PortError(f"node address {a} is a wildcard, not an address")
        self.addresses: tuple[str, ...] = tuple(sorted(addrs))
        self._owner: dict[Key, tuple[str, str]] = {}  # key -> (slice, source)
        self._covered: dict[str, tuple[str, ...]] = {}  # memo of covered(), bounded

    # -- queries -------------------------------------------------------------------

    def owner(self, proto: str, address: str, port: int) -> str | None:
        got = self._owner.get((proto, normalize_address(address), port))
        return got[0] if got else None

    def is_ephemeral(self, proto: str, port: int) -> bool:
        return proto != "icmp" and self.ephemeral[0] <= port <= self.ephemeral[1]

    def reserved_for_host(self, proto: str, address: str, port: int) -> PortRange | None:
        """The `reserved` range that keeps (proto, address, port) from every slice."""
        for r in self.reserved:
            if r.proto == proto and r.lo <= port <= r.hi and r.address in (None, address):
                return r
        return None

    def copy(self) -> PortTable:
        """An independent table with the same addresses, ranges and owners."""
        new = PortTable(self.addresses, self.ephemeral, self.reserved)
        new._owner = dict(self._owner)
        return new

    def ownership(self) -> dict[Key, str]:
        """Every owned key and its slice (a snapshot)."""
        return {k: s for k, (s, _) in self._owner.items()}

    def covered(self, address: str) -> tuple[str, ...]:
        """The node addresses a bind to `address` takes (several for a wildcard)."""
        got = self._covered.get(address)
        if got is None:
            got = self._compute_covered(address)
            if len(self._covered) < 4096:
                self._covered[address] = got
        return got

    def _compute_covered(self, address: str) -> tuple[str, ...]:
        addr = ipaddress.ip_address(address.strip("[]"))
        if addr.is_unspecified:
            if addr.version == 4:
                return tuple(a for a in self.addresses if ipaddress.ip_address(a).version == 4)
            return self.addresses
        norm = normalize_address(address)
        return (norm,) if norm in self.addresses else ()

    def check_bind(self, slice_name: str, proto: str, address: str, port: int) -> BindDecision:
        """May `slice_name` bind `proto` `address`:`port`?"""
        if proto not in PROTOCOLS:
            return BindDecision(errno.EACCES, f"protocol {proto!r} is not bindable by slices")
        if port == 0:
            return BindDecision(0, "port 0: the kernel picks an ephemeral port")
        if self.is_ephemeral(proto, port):
            # Explicit binds here would take ports out of the kernel's pool for
            # outgoing connections, node-wide (F18): bind port 0 instead.
            return BindDecision(errno.EACCES, f"{proto} port {port} is in the ephemeral range "
                                f"{self.ephemeral[0]}-{self.ephemeral[1]}: only port 0 may "
                                "be bound there")
        try:
            targets = self.covered(address)
        except ValueError:
            return BindDecision(errno.EINVAL, f"bad address {address!r}")
        if not targets:
            return BindDecision(errno.EADDRNOTAVAIL, f"{address} is not an address of this node")
        missing = []
        for a in targets:
            got = self._owner.get((proto, a, port))
            if got is None:
                missing.append(a)
            elif got[0] != slice_name:
                return BindDecision(errno.EADDRINUSE,
                                    f"{proto} port {port} on {a} is owned by slice {got[0]!r}")
        if missing:
            return BindDecision(errno.EACCES, f"slice {slice_name!r} does not own {proto} port "
                                f"{port} on {', '.join(missing)}")
        return BindDecision(0, f"{proto} port {port} on {address} owned by {slice_name!r}")

    def holdings(self, slice_name: str) -> list[PortRange]:
        """What `slice_name` owns, as maximal ranges per (protocol, address)."""
        keys = sorted((p, a, n) for (p, a, n), (s, _) in self._owner.items() if s == slice_name)
        out: list[PortRange] = []
        for p, a, n in keys:
            if out and out[-1].proto == p and out[-1].address == a and out[-1].hi == n - 1 \
                    and out[-1].hi - out[-1].lo + 1 < MAX_PORTS_PER_RANGE:
                out[-1] = PortRange(p, out[-1].lo, n, a)
            else:
                out.append(PortRange(p, n, n, a))
        return out

    def slices(self) -> set[str]:
        return {s for s, _ in self._owner.values()}

    def entries(self) -> list[tuple[str, str, PortRange]]:
        """(slice, source, single-port range) for every owned key, for persistence."""
        return sorted((s, src, PortRange(p, n, n, a))
                      for (p, a, n), (s, src) in self._owner.items())

    # -- changes ---------------------------------------------------------------------

    def _keys(self, rng: PortRange) -> list[Key]:
        if rng.proto != "icmp" and not (rng.hi < self.ephemeral[0] or rng.lo > self.ephemeral[1]):
            raise PortError(f"{rng} overlaps the ephemeral range "
                            f"{self.ephemeral[0]}-{self.ephemeral[1]}, which stays free for all")
        if rng.address is None:
            addrs = self.addresses
        elif rng.address in self.addresses:
            addrs = (rng.address,)
        else:
            raise PortError(f"{rng}: {rng.address} is not an address of this node "
                            f"({', '.join(self.addresses)})")
        keys = [(rng.proto, a, n) for a in addrs for n in range(rng.lo, rng.hi + 1)]
        for r in self.reserved:
            if r.proto == rng.proto and not (r.hi < rng.lo or r.lo > rng.hi) \
                    and (r.address is None or r.address in addrs):
                raise PortError(f"{rng} overlaps {r}, reserved for the host "
                                "(node config reserved_ports)")
        return keys

    def _claim(self, slice_name: str, source: str, ranges: Iterable[PortRange],
               replace_source: bool, skip: frozenset[Key] | set[Key] = frozenset()
               ) -> list[Key]:
        if not slice_name:
            raise PortError("empty slice name")
        if source not in SOURCES:
            raise PortError(f"unknown ownership source {source!r}")
        ranges = list(ranges)
        if source == "reserve":
            for r in ranges:
                if r.proto != "icmp" and r.lo < FIRST_UNPRIVILEGED:
                    raise PortError(f"{r}: ports below {FIRST_UNPRIVILEGED} are granted by "
                                    "PLC tag only, not by ReservePort")
        keys = [k for r in ranges for k in self._keys(r) if k not in skip]
        for k in keys:  # all-or-nothing: check everything before changing anything
            got = self._owner.get(k)
            # A PLC tag (or an rcap) takes precedence over another slice's runtime
            # reservation.
            if got is not None and got[0] != slice_name \
                    and not (source in ("tag", "rcap") and got[1] == "reserve"):
                raise PortConflict(k[0], k[1], k[2], got[0])
        return keys

    def grant(self, slice_name: str, ranges: Iterable[PortRange], source: str = "reserve") -> None:
        """Give `ranges` to `slice_name`; nothing changes if any port is another's."""
        keys = self._claim(slice_name, source, list(ranges), False)
        for k in keys:
            # A port held by tag stays a tag port; a reservation does not downgrade it.
            if self._owner.get(k, ("", ""))[1] not in ("tag", "rcap"):
                self._owner[k] = (slice_name, source)

    def set_tag_ports(self, slice_name: str, ranges: Iterable[PortRange],
                      without: frozenset[Key] | set[Key] = frozenset()) -> None:
        """Make the slice's tag-derived ports exactly `ranges` less the keys `without`
        (its tag ports it lent, split off or released: agent/rcaps), all or nothing."""
        keys = set(self._claim(slice_name, "tag", list(ranges), True, without))
        for k, (s, src) in list(self._owner.items()):
            if s == slice_name and src == "tag" and k not in keys:
                del self._owner[k]
        for k in keys:
            self._owner[k] = (slice_name, "tag")

    def keys_of(self, slice_name: str, sources: Iterable[str] = SOURCES) -> set[Key]:
        srcs = set(sources)
        return {k for k, (s, src) in self._owner.items() if s == slice_name and src in srcs}

    def expand(self, ranges: Iterable[PortRange]) -> set[Key]:
        """The keys `ranges` name (PortError as a grant of them would raise)."""
        return {k for r in ranges for k in self._keys(r)}

    def set_rcap_ports(self, wanted: dict[str, set[Key]],
                       unreserve: dict[str, set[Key]] | None = None,
                       untag: dict[str, set[Key]] | None = None) -> None:
        """Make each slice's rcap-given keys exactly `wanted[slice]` (a key it holds by
        tag stays a tag key), dropping its reservations in `unreserve[slice]` (no longer
        given to it) and its tag keys in `untag[slice]` (tag ports it lent or split
        off): first everything taken, then everything given, so a port moving between
        two slices in one change never conflicts with itself."""
        for name, keys in wanted.items():
            drop = (unreserve or {}).get(name, set())
            drop_tag = (untag or {}).get(name, set())
            for k, (s, src) in list(self._owner.items()):
                if s == name and ((src == "rcap" and k not in keys)
                                  or (src == "reserve" and k in drop)
                                  or (src == "tag" and k in drop_tag)):
                    del self._owner[k]
        for name, keys in wanted.items():
            for k in keys:   # all-or-nothing (the caller changes a copy)
                got = self._owner.get(k)
                if got is not None and got[0] != name and got[1] != "reserve":
                    raise PortConflict(k[0], k[1], k[2], got[0])
            for k in keys:
                if self._owner.get(k, ("", ""))[:2] != (name, "tag"):
                    self._owner[k] = (name, "rcap")

    def release(self, slice_name: str, ranges: Iterable[PortRange]) -> int:
        """Give up `ranges` (ports not owned by the slice are ignored); returns the count."""
        count = 0
        for r in ranges:
            for k in self._keys(r):
                if self._owner.get(k, ("",))[0] == slice_name:
                    del self._owner[k]
                    count += 1
        return count

    def release_slice(self, slice_name: str) -> int:
        """Free everything `slice_name` owns (its sliver went); returns the count."""
        keys = [k for k, (s, _) in self._owner.items() if s == slice_name]
        for k in keys:
            del self._owner[k]
        return len(keys)

    def load(self, entries: Iterable[tuple[str, str, PortRange]]) -> list[PortRange]:
        """Replace the table's contents with persisted `entries()` output.

        Entries that the current rules forbid (a port reserved for the host since,
        a reservation below 1024, a port now in the ephemeral range, an address the
        node no longer has) are left out and returned, not an error: the node's
        configuration may have changed since they were recorded.
        """
        new: dict[Key, tuple[str, str]] = {}
        dropped: list[PortRange] = []
        for slice_name, source, rng in entries:
            try:
                if source == "reserve" and rng.proto != "icmp" and rng.lo < FIRST_UNPRIVILEGED:
                    raise PortError(f"{rng} below {FIRST_UNPRIVILEGED}")
                keys = self._keys(rng)
            except PortError:
                dropped.append(rng)
                continue
            for k in keys:
                if k in new and new[k][0] != slice_name:
                    raise PortConflict(k[0], k[1], k[2], new[k][0])
                new[k] = (slice_name, source)
        self._owner = new
        return dropped


def read_ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's ephemeral port range (node-wide: slivers share the netns)."""
    with open(path) as f:
        lo, hi = (int(x) for x in f.read().split())
    return lo, hi
