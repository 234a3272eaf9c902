"""The guard's slice API calls (`GuardAPI`): ReservePort, ReleasePort, GetPorts,
OpenSniffer, OpenErrorSocket, RawSend."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from agent.faults import FAULT_RATE, APIFault, FdReply
from agent.guard.supervisor import Guard
from agent.ports.table import PortConflict, PortError, format_ports_tag, parse_ports_tag
from agent.rawsock.checks import RawSendRefused
from agent.tokenbucket import TokenBuckets

log = logging.getLogger("agent.guard")


class GuardAPI:
    """Slice API calls of the guard, to mount into the agent's slice API:
    `api.methods.update(GuardAPI(guard, raw).methods())`.

    Each call takes the caller first (an object with `.kind` "sliver" | "admin" |
    "host" and `.name`). A sliver always acts for itself; the node admin names the
    slice as the first argument. Calls that hand over sockets return an
    `agent.faults.FdReply`; the transport sends its sockets with the reply by
    SCM_RIGHTS and closes them (docs/guard.md).
    """

    MAX_RESERVED_PORTS = 256  # per slice, by ReservePort (tags are PLC's business)
    # ReleasePort calls per slice (F32): each may start a revocation (a sock_diag
    # dump, a search among the slice's processes), so a sliver may not loop on it.
    RELEASE_RATE, RELEASE_BURST = 1.0, 10

    def __init__(self, guard: Guard, raw: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.guard = guard
        self.raw = raw
        self._releases = TokenBuckets(self.RELEASE_RATE, self.RELEASE_BURST, clock)

    def methods(self) -> dict[str, Callable[..., Any]]:
        return {"ReservePort": self.ReservePort, "ReleasePort": self.ReleasePort,
                "GetPorts": self.GetPorts, "OpenSniffer": self.OpenSniffer,
                "OpenErrorSocket": self.OpenErrorSocket, "RawSend": self.RawSend}

    @staticmethod
    def _fault(code: int, message: str) -> Exception:
        return APIFault(code, message)

    def _who(self, caller: Any, args: tuple[Any, ...], nargs: int) -> tuple[str, tuple[Any, ...]]:
        if caller.kind == "sliver":
            name, rest = caller.name, args
        elif caller.kind == "admin" and args and isinstance(args[0], str):
            name, rest = args[0], args[1:]
        else:
            raise self._fault(108, "only a sliver, or the node admin naming a slice, may call this")
        if len(rest) != nargs:
            raise self._fault(101, f"expected {nargs} argument(s) after the caller, got {len(rest)}")
        return name, rest

    def ReservePort(self, caller: Any, *args: Any) -> int:
        """ReservePort(spec): own ports, e.g. "tcp:8080,udp:5000-5010@10.0.0.1"."""
        name, (spec,) = self._who(caller, args, 1)
        try:
            wanted = parse_ports_tag(str(spec))
            have = sum((r.hi - r.lo + 1) for r in self.guard.ports.table.holdings(name))
            more = sum((r.hi - r.lo + 1) for r in wanted)
            if caller.kind == "sliver" and have + more > self.MAX_RESERVED_PORTS:
                raise PortError(f"at most {self.MAX_RESERVED_PORTS} ports per slice")
            self.guard.ports.reserve(name, str(spec))
        except (PortError, PortConflict) as exc:
            raise self._fault(102, f"ReservePort {spec!r}: {exc}") from None
        return 1

    def ReleasePort(self, caller: Any, *args: Any) -> int:
        """ReleasePort(spec): give ports back (same syntax as ReservePort)."""
        name, (spec,) = self._who(caller, args, 1)
        if caller.kind == "sliver" and not self._releases.take(name):
            raise self._fault(FAULT_RATE, f"ReleasePort: rate limit: at most "
                              f"{self.RELEASE_RATE:g} a second (burst {self.RELEASE_BURST}) "
                              f"for slice {name}; retry later")
        try:
            self.guard.ports.release(name, str(spec))
        except PortError as exc:
            raise self._fault(102, f"ReleasePort {spec!r}: {exc}") from None
        return 1

    def GetPorts(self, caller: Any, *args: Any) -> str:
        """GetPorts(): what the slice owns, in the ports tag syntax."""
        name, _ = self._who(caller, args, 0)
        return format_ports_tag(self.guard.ports.table.holdings(name))

    def _open(self, caller: Any, args: tuple[Any, ...], kind: str) -> Any:
        name, _ = self._who(caller, args, 0)
        try:
            sock = self.raw.open_sniffer(name) if kind == "sniffer" else \
                self.raw.open_error_socket(name)
        except RawSendRefused as exc:
            raise self._fault(102, f"{kind}: {exc}") from None
        log.info("guard: %s socket for slice %s", kind, name)
        return FdReply(1, [sock])

    def OpenSniffer(self, caller: Any, *args: Any) -> Any:
        """OpenSniffer(): a packet socket showing only the slice's own traffic."""
        return self._open(caller, args, "sniffer")

    def OpenErrorSocket(self, caller: Any, *args: Any) -> Any:
        """OpenErrorSocket(): a packet socket showing ICMP errors about the slice's traffic."""
        return self._open(caller, args, "errors")

    def RawSend(self, caller: Any, *args: Any) -> int:
        """RawSend(packet): send one whole IP packet (base64) from an owned port."""
        name, (packet,) = self._who(caller, args, 1)
        data = getattr(packet, "data", packet)
        if not isinstance(data, bytes):
            raise self._fault(102, "RawSend: the packet must be XML-RPC base64")
        try:
            return int(self.raw.raw_send(name, data))
        except RawSendRefused as exc:
            log.warning("guard: raw send by %s refused: %s", name, exc)
            raise self._fault(102, f"RawSend: {exc}") from None
