"""Rcaps and loans (docs/rcaps.md): `model` (resources, rcaps, loans, tokens),
`ledger` (pure: the rules and the invariant), `store` (the ledger in the agent's
SQLite state), `service` (the ledger in the agent: the reconciler's hooks, applying
changes in place, loan expiry)."""

from agent.rcaps.ledger import Ledger
from agent.rcaps.model import RESOURCES, LedgerError
from agent.rcaps.service import GrantRefused, RcapService, node_capacity

__all__ = ["RESOURCES", "GrantRefused", "Ledger", "LedgerError", "RcapService", "node_capacity"]
