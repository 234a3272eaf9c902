"""Ports the host holds: never granted to a slice, never shown to or sent as by one (F30).

A port is the host's when
- it is fixed: the port of a `plc_url` that points at this node, and whatever the agent
  is told of its node services (`fixed`), even while nothing listens there; or
- a TCP or UDP socket that no slice owns has it as its local port, on any address
  (v4, v6, wildcard), in any state but TIME_WAIT and SYN_RECV (those carry no owner).
  "No slice owns" is decided by the socket's uid (the kernel records the creator's
  fsuid; a sliver's sockets carry a uid of its range): `owner_of_uid(uid)` names the
  slice whose range holds it, or None for a host uid.

The sockets come from netlink sock_diag (`kernel.sockdiag.find`), asked at the moment of
the decision: at grant time (ReservePort, a `ports` tag), when a sniffer is opened and
while it runs, and for every RawSend.
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from agent.ports.table import PortError, PortRange, normalize_address
from kernel import sockdiag

log = logging.getLogger("agent.ports")

TCP_SYN_RECV, TCP_TIME_WAIT, TCP_NEW_SYN_RECV = 3, 6, 12
OWNERLESS_STATES = {TCP_SYN_RECV, TCP_TIME_WAIT, TCP_NEW_SYN_RECV}
HOST_SERVICE = "a host service listens there"


class HostPortError(PortError):
    """A grant refused because the host holds the port."""


def plc_port(url: str, local_names: Iterable[str], addresses: Iterable[str]) -> int | None:
    """The TCP port of `url` if its host is this node (loopback, `localhost`, one of
    `local_names` or of `addresses`), else None. No DNS lookup: a name that is not
    listed counts as remote."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    names = {"localhost", "localhost.localdomain", "ip6-localhost"} | \
        {n.lower() for n in local_names if n}
    if host in names:
        return port
    try:
        addr = normalize_address(host)
    except PortError:
        return None
    if ipaddress.ip_address(addr).is_loopback or addr in {normalize_address(a)
                                                          for a in addresses}:
        return port
    return None


def is_loopback_url(url: str) -> bool:
    """Does `url` name a loopback host (so its traffic never leaves the node)?"""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(normalize_address(host)).is_loopback
    except (PortError, ValueError):
        return False


def state_uid_owner(state: Any, pool_start: int, range_size: int
                    ) -> Callable[[int], str | None]:
    """`owner_of_uid` from the agent state's uid range index (as agent.accounts lays
    the ranges out: pool_start + index * range_size)."""
    def owner(uid: int) -> str | None:
        if uid < pool_start:
            return None
        idx = (uid - pool_start) // range_size
        for name, i in state.uid_ranges().items():
            if i == idx:
                return str(name)
        return None
    return owner


class HostPorts:
    """Decides whether the host holds a port; see the module docstring."""

    def __init__(self, owner_of_uid: Callable[[int], str | None],
                 fixed: Iterable[tuple[PortRange, str]] = (),
                 find: Callable[..., list[sockdiag.DiagSocket]] = sockdiag.find) -> None:
        self.owner_of_uid = owner_of_uid
        self.fixed: tuple[tuple[PortRange, str], ...] = tuple(fixed)
        self._find = find
        # What a `ports` tag asked for but the host holds, per slice (status, log).
        self.skipped: dict[str, list[str]] = {}

    # -- queries -------------------------------------------------------------------------

    def fixed_reason(self, proto: str, port: int) -> str | None:
        for r, why in self.fixed:
            if r.proto == proto and r.lo <= port <= r.hi:
                return why
        return None

    def sockets(self, proto: str, lo: int, hi: int | None = None) -> list[sockdiag.DiagSocket]:
        """Every TCP/UDP socket with a local port in lo..hi that has an owner state."""
        if proto not in sockdiag.PROTOCOLS:
            return []
        return [s for s in self._find(proto, lo, hi if hi is not None else lo)
                if not (proto == "tcp" and s.state in OWNERLESS_STATES)]

    def host_sockets(self, proto: str, lo: int, hi: int | None = None
                     ) -> list[sockdiag.DiagSocket]:
        return [s for s in self.sockets(proto, lo, hi) if self.owner_of_uid(s.uid) is None]

    def held(self, proto: str, lo: int, hi: int | None = None) -> dict[int, str]:
        """The host-held ports in lo..hi of `proto`, each with why (for the message)."""
        hi = lo if hi is None else hi
        out: dict[int, str] = {}
        for port in range(lo, hi + 1):
            why = self.fixed_reason(proto, port)
            if why:
                out[port] = why
        if proto == "icmp":
            return out
        for s in self.host_sockets(proto, lo, hi):
            out.setdefault(s.port, f"{HOST_SERVICE} (a socket of host uid {s.uid} on "
                                   f"{s.local})")
        return out

    def slice_holds(self, slice_name: str, proto: str, port: int) -> list[str]:
        """The local addresses of the sockets `slice_name` itself holds on `port`."""
        return [s.local for s in self.sockets(proto, port)
                if self.owner_of_uid(s.uid) == slice_name]

    # -- grants ----------------------------------------------------------------------------

    def refuse_held(self, ranges: Iterable[PortRange]) -> None:
        """ReservePort: HostPortError naming the first host-held port asked for."""
        for r in ranges:
            held = self.held(r.proto, r.lo, r.hi)
            if held:
                port = min(held)
                raise HostPortError(f"{r.proto} port {port}: {held[port]}")

    def without_held(self, slice_name: str, ranges: Iterable[PortRange]) -> list[PortRange]:
        """A `ports` tag: `ranges` minus the host-held ports (on every address), which
        are logged and kept in `skipped[slice]`; a tag never fails for them."""
        out: list[PortRange] = []
        skipped: list[str] = []
        for r in ranges:
            held = self.held(r.proto, r.lo, r.hi)
            lo = r.lo
            for port in sorted(held):
                if lo < port:
                    out.append(PortRange(r.proto, lo, port - 1, r.address))
                lo = port + 1
                skipped.append(f"{r.proto}:{port} ({held[port]})")
            if lo <= r.hi:
                out.append(PortRange(r.proto, lo, r.hi, r.address))
        if skipped:
            log.warning("slice %s: ports tag items held by the host, not granted: %s",
                        slice_name, "; ".join(skipped))
            self.skipped[slice_name] = skipped
        else:
            self.skipped.pop(slice_name, None)
        return out


def fixed_host_ports(plc_url: str, local_names: Iterable[str], addresses: Iterable[str],
                     sensors_port: int | None = None) -> list[tuple[PortRange, str]]:
    """The fixed host ports of an agent configuration: PLC's port when PLC is local, and
    the node sensor server's port (`[sensors] listen`, on every address: slicestat's
    3100 is the node's wherever a slice would bind it)."""
    out: list[tuple[PortRange, str]] = []
    port = plc_port(plc_url, local_names, addresses)
    if port is not None:
        out.append((PortRange("tcp", port, port),
                    f"PLC's port (plc_url {plc_url}): {HOST_SERVICE}"))
    if sensors_port is not None:
        out.append((PortRange("tcp", sensors_port, sensors_port),
                    f"the node sensor server's port ([sensors] listen): {HOST_SERVICE}"))
    return out


__all__ = ["HOST_SERVICE", "HostPortError", "HostPorts",
           "fixed_host_ports", "is_loopback_url", "local_addresses", "plc_port",
           "state_uid_owner"]


def local_addresses() -> set[str]:
    """Every address of this node now (IPv4 from /proc/net/fib_trie's local routes,
    IPv6 from /proc/net/if_inet6), normalised as the port table does."""
    out: set[str] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            last = ""
            for line in f:
                text = line.strip()
                if text.startswith("|--"):
                    last = text[3:].strip()
                elif text.startswith("/32 host LOCAL") and last:
                    out.add(normalize_address(last))
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split()[0]
                out.add(normalize_address(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr)))))
    except (OSError, ValueError, IndexError):
        pass
    return out
