"""The ledger in the agent's SQLite state (tables `rcaps`, `rcap_loans`, agent/state.py):
loaded whole at start, then each change written in one transaction before it is
applied to the kernel (recorded before granted)."""

from __future__ import annotations

import json

from agent.rcaps.ledger import Ledger
from agent.rcaps.model import (
    NO_PORTS,
    PORTS,
    RESOURCES,
    Amounts,
    Loan,
    Rcap,
    format_ports,
    ports_of,
    zero,
)
from agent.state import State


def load(state: State, capacity: Amounts) -> Ledger:
    with state.transaction() as db:
        rows = db.execute("SELECT id, parent, amounts, holder, origin, bound, created, seq "
                          "FROM rcaps ORDER BY seq").fetchall()
        loan_rows = db.execute("SELECT id, lender, recipient, resource, amount, expires, "
                               "relend, parent, created, ports FROM rcap_loans "
                               "ORDER BY id").fetchall()
    rcaps = {}
    for rid, parent, amounts, holder, origin, bound, created, seq in rows:
        got = json.loads(amounts)
        rcaps[rid] = Rcap(rid, parent, {**zero(), **{k: int(v) for k, v in got.items()
                                                     if k in RESOURCES}},
                          holder, origin, bound, created, seq,
                          _ports(got.get(PORTS, "")))
    loans = {lid: Loan(lid, lender, recipient, resource, amount, expires, bool(relend),
                       parent, created, _ports(ports))
             for lid, lender, recipient, resource, amount, expires, relend, parent, created,
             ports in loan_rows}
    return Ledger(capacity=dict(capacity), rcaps=rcaps, loans=loans)


def _ports(text: str) -> frozenset[tuple[str, int, str]]:
    return ports_of(text, limit=None) if text else NO_PORTS


def flush(state: State, led: Ledger) -> None:
    """Write the rcaps and loans changed since the last flush, in one transaction."""
    if not led.dirty_rcaps and not led.dirty_loans:
        return
    with state.transaction() as db:
        for rid in led.dirty_rcaps:
            r = led.rcaps.get(rid)
            if r is None:
                db.execute("DELETE FROM rcaps WHERE id=?", (rid,))
                continue
            db.execute(
                "INSERT INTO rcaps VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                "amounts=excluded.amounts, bound=excluded.bound",
                (r.id, r.parent, json.dumps({**{k: v for k, v in r.amounts.items() if v},
                                             **({PORTS: format_ports(r.ports)}
                                                if r.ports else {})}),
                 r.holder, r.origin, r.bound, r.created, r.seq))
        for lid in led.dirty_loans:
            loan = led.loans.get(lid)
            if loan is None:
                db.execute("DELETE FROM rcap_loans WHERE id=?", (lid,))
                continue
            db.execute("INSERT OR REPLACE INTO rcap_loans VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (loan.id, loan.lender, loan.recipient, loan.resource, loan.amount,
                        loan.expires, int(loan.relend), loan.parent, loan.created,
                        format_ports(loan.ports)))
    led.dirty_rcaps.clear()
    led.dirty_loans.clear()
