"""The rcap ledger's vocabulary: its resources and amounts, rcaps, loans, the error it
raises, and rcap tokens (docs/rcaps.md). No rules here: those are `ledger`'s."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.ports.table import PortError, PortRange, parse_ports_tag

# Ledger resources: rspec keys (agent/rspec.py units: cpu_share a weight, cpu_pct a
# reserved percentage, net_* kbit/s, mem_max and disk_max KiB, pids_max processes).
RESOURCES: tuple[str, ...] = ("cpu_share", "cpu_pct", "net_min_rate", "net_max_rate",
                              "mem_max", "disk_max", "pids_max")
RENEWABLE = frozenset({"cpu_share", "cpu_pct", "net_min_rate", "net_max_rate"})
# What a holder keeps whatever it lends (nodemanager spec §4.1), and 1 process.
MINIMUM: dict[str, int] = {"cpu_share": 1, "net_max_rate": 8, "pids_max": 1}
# 0 means "no limit" for these rspec keys: a slice holding 0 is unlimited; it has
# nothing to lend, and what it receives leaves it unlimited.
UNLIMITED_AT_ZERO = frozenset({"mem_max", "disk_max"})
MAX_AMOUNT = 2**53

Amounts = dict[str, int]

# Ports are the one resource that is a set, not an amount: (proto, port, address), ""
# for every node address, as the `ports` tag names them (agent/ports/table.py). Within
# the ledger a port is in at most one rcap's remainder: split-off parts are disjoint
# subsets of the parent's set.
PORTS = "ports"
MAX_RCAP_PORTS = 4096      # ports one request (AcquireRcap, SplitRcap, a loan) names
PortKey = tuple[str, int, str]
Ports = frozenset[PortKey]
NO_PORTS: Ports = frozenset()

ORIGIN_NODE = "node"     # a root acquired from the node's free pool
ORIGIN_PLC = "plc"       # a root minted from a PLC sliver's rspec (PLC admitted it)
ORIGIN_SPLIT = "split"   # a child of another rcap


class LedgerError(Exception):
    """A refused ledger operation; `kind` says which rule (docs/rcaps.md, "Errors")
    and `resource` names the resource where one is at fault."""

    def __init__(self, kind: str, message: str, resource: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.resource = resource


def zero() -> Amounts:
    return dict.fromkeys(RESOURCES, 0)


def ports_of(value: object, *, limit: int | None = MAX_RCAP_PORTS) -> Ports:
    """The port set a `ports` value names (tag syntax: "tcp:8080,udp:5000-5010@ADDR");
    LedgerError naming the item if malformed."""
    if not isinstance(value, str):
        raise LedgerError("bad_request", "ports: a string in the ports tag syntax, e.g. "
                          "\"tcp:8080,udp:5000-5010\"", PORTS)
    try:
        ranges = parse_ports_tag(value)
    except PortError as exc:
        raise LedgerError("bad_request", f"ports: {exc}", PORTS) from None
    out = {(r.proto, n, r.address or "") for r in ranges for n in range(r.lo, r.hi + 1)}
    if limit is not None and len(out) > limit:
        raise LedgerError("bad_request", f"ports: {len(out)} ports; at most {limit} in one "
                          "request", PORTS)
    return frozenset(out)


def port_text(key: PortKey) -> str:
    proto, port, address = key
    return f"{proto}:{port}" + (f"@{address}" if address else "")


def port_ranges(ports: Ports) -> list[PortRange]:
    """The set as maximal ranges per (protocol, address)."""
    out: list[PortRange] = []
    for proto, port, address in sorted(ports, key=lambda k: (k[0], k[2], k[1])):
        last = out[-1] if out else None
        if last is not None and last.proto == proto and (last.address or "") == address \
                and last.hi == port - 1 and last.hi - last.lo + 1 < MAX_RCAP_PORTS:
            out[-1] = PortRange(proto, last.lo, port, last.address)
        else:
            out.append(PortRange(proto, port, port, address or None))
    return out


def format_ports(ports: Ports) -> str:
    return ",".join(str(r) for r in port_ranges(ports))


def amounts_of(spec: Mapping[str, object]) -> Amounts:
    """A request {resource: int} to full Amounts; unknown keys or bad values refused."""
    if not isinstance(spec, Mapping):
        raise LedgerError("bad_request", "an rspec is a struct {resource: integer}")
    out = zero()
    for key, value in spec.items():
        if key not in RESOURCES:
            raise LedgerError("bad_request", f"{str(key)[:40]!r} is not a resource an rcap "
                              f"names; known: {', '.join(RESOURCES)}", str(key)[:40])
        if isinstance(value, str) and value.isdigit():
            value = int(value)          # XML-RPC ints beyond 32 bits travel as strings
        if not isinstance(value, int) or isinstance(value, bool) or \
                not 0 <= value <= MAX_AMOUNT:
            raise LedgerError("bad_request", f"{key}: amount must be an integer in "
                              f"[0, 2**53], not {str(value)[:40]!r}", key)
        out[key] = value
    return out


def request_of(spec: Mapping[str, object]) -> tuple[Amounts, Ports]:
    """An AcquireRcap/SplitRcap request: its amounts and its ports."""
    if not isinstance(spec, Mapping):
        raise LedgerError("bad_request", "an rspec is a struct {resource: integer}")
    rest = {k: v for k, v in spec.items() if k != PORTS}
    return amounts_of(rest), ports_of(spec[PORTS]) if PORTS in spec else NO_PORTS


def new_token() -> tuple[str, str]:
    """(rcap string shown once to its acquirer, its id: the sha256 stored)."""
    token = secrets.token_bytes(16).hex()
    return token, token_id(token)


def token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Rcap:
    id: str
    parent: str | None
    amounts: Amounts
    holder: str           # who acquired it: a slice name, "" for the node admin
    origin: str
    bound: str | None = None
    created: float = 0.0
    seq: int = 0          # creation order (given by the ledger)
    ports: Ports = field(default=NO_PORTS)


@dataclass
class Loan:
    id: int
    lender: str
    recipient: str
    resource: str
    amount: int
    expires: float = 0.0      # unix time; 0: until revoked or either sliver goes
    relend: bool = False      # the recipient may lend on it
    parent: int | None = None  # the loan it was lent on (None: the lender's own holdings)
    created: float = 0.0
    ports: Ports = field(default=NO_PORTS)   # a loan of PORTS: the ports (amount = count)

    def key(self) -> tuple[str, str, int, float, bool, Ports]:
        return (self.recipient, self.resource, self.amount, self.expires, self.relend,
                self.ports)

    def wire(self) -> list[object]:
        amount: object = format_ports(self.ports) if self.resource == PORTS else self.amount
        return [self.recipient, self.resource, amount, int(self.expires), self.relend]


def nonzero(want: Amounts, ports: Ports = NO_PORTS) -> None:
    """Refuse a request that names no positive amount and no port."""
    if not any(want.values()) and not ports:
        raise LedgerError("bad_request", "an rcap names at least one positive amount "
                          "or port")
