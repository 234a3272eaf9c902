"""The rcap ledger's vocabulary: its resources and amounts, rcaps, loans, the error it
raises, and rcap tokens (docs/rcaps.md). No rules here: those are `ledger`'s."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

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

    def key(self) -> tuple[str, str, int, float, bool]:
        return (self.recipient, self.resource, self.amount, self.expires, self.relend)

    def wire(self) -> list[object]:
        return [self.recipient, self.resource, self.amount, int(self.expires), self.relend]


def nonzero(want: Amounts) -> None:
    """Refuse a request that names no positive amount."""
    if not any(want.values()):
        raise LedgerError("bad_request", "an rcap names at least one positive amount")
