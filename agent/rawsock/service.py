"""The agent side of safe raw sockets (`RawSockets`): filtered packet sockets, their
relays to the slices, checked raw sends (see `agent.rawsock`)."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

import trio

from agent.ports.host import HostPorts, local_addresses
from agent.ports.table import Key, PortRange, PortTable, normalize_address
from agent.rawsock.checks import RawSendRefused, check_raw_packet, flow_of
from agent.rawsock.filters import error_filter, sniffer_filter
from agent.rawsock.relays import RELAY_BURST, RELAY_PPS, Relay, RelayStats, relay
from agent.tokenbucket import TokenBuckets
from kernel import packet as pk

log = logging.getLogger("agent.rawsock")

RELAYS_PER_SLICE = 4  # open sniffers and error sockets of one slice, together
RELAY_RCVBUF = 1 << 18  # the agent's packet socket queue per relay (kernel memory)
RELAY_RECHECK = 2.0  # seconds between checks that a relay's keys are still usable (F30)


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

    # Slice name -> skb priority of its HTB class (agent/bwservice.py sets it).
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
        # The packet is billed to the slice's HTB class, not to the agent's.
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
