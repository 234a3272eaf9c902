"""The loan half of the rcap ledger (docs/rcaps.md): lending from a slice's own
holdings or on a received re-lendable loan, loan trees ending together, expiry,
SetLoans' all-or-nothing replacement, and settling a slice's loans when its holdings
shrink. A mixin of `Ledger` (agent/rcaps/ledger.py), whose state and views it uses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from agent.rcaps.model import (
    MAX_AMOUNT,
    MINIMUM,
    NO_PORTS,
    PORTS,
    RESOURCES,
    UNLIMITED_AT_ZERO,
    LedgerError,
    Loan,
    Ports,
    port_text,
)

if TYPE_CHECKING:
    _Base = Any
else:
    _Base = object


class LoanBook(_Base):
    """Loans; see the module docstring."""

    # The state it shares with `Ledger` (set there in __init__).
    loans: dict[int, Loan]
    dirty_loans: set[int]
    _next_loan: int
    _loan_children: dict[int, set[int]]
    _lent: dict[str, set[int]]
    _received: dict[str, set[int]]

    # -- loans ------------------------------------------------------------------------------

    def lend(self, lender: str, recipient: str, resource: str, amount: int, *,
             expires: float = 0.0, relend: bool = False, now: float = 0.0,
             ports: Ports = NO_PORTS) -> tuple[int, set[str]]:
        """A loan from `lender`'s own holdings, else from a loan it received that allows
        re-lending; refused if neither has room. A loan of PORTS names its `ports`
        (`amount` is their count)."""
        if resource not in RESOURCES and resource != PORTS:
            raise LedgerError("bad_request", f"{str(resource)[:40]!r} is not loanable; "
                              f"loanable: {', '.join(RESOURCES)}, {PORTS}",
                              str(resource)[:40])
        if resource == PORTS:
            amount = len(ports)
            if not ports:
                raise LedgerError("bad_request", "ports: a loan of ports names at least one",
                                  PORTS)
        elif ports:
            raise LedgerError("bad_request", f"{resource}: only a loan of ports names ports",
                              resource)
        if not isinstance(amount, int) or isinstance(amount, bool) or \
                not 0 < amount <= MAX_AMOUNT:
            raise LedgerError("bad_request", f"{resource}: a loan's amount is a positive "
                              "integer", resource)
        if lender == recipient:
            raise LedgerError("bad_request", "a slice cannot lend to itself")
        if recipient not in self.slices():
            raise LedgerError("unknown_slice", f"no sliver {recipient!r} holds resources "
                              "on this node")
        if expires and expires <= now:
            raise LedgerError("bad_request", "the loan's expiry is in the past")
        if resource == PORTS:
            parent = self._port_source(lender, ports)
        else:
            parent = self._amount_source(lender, resource, amount)
        lid = self._next_loan
        self._next_loan += 1
        loan = Loan(lid, lender, recipient, resource, amount, float(expires), bool(relend),
                    parent, now, ports=ports)
        self.loans[lid] = loan
        self._index_loan(loan)
        self.dirty_loans.add(lid)
        return lid, {lender, recipient}

    def _port_source(self, lender: str, ports: Ports) -> int | None:
        """None: lent from its own ports; else the received port loan it is lent on."""
        own = self.holdings_ports(lender) - self.lent_own_ports(lender)
        if ports <= own:
            return None
        for loan in self.loans_to(lender):
            if loan.resource == PORTS and loan.relend and \
                    ports <= loan.ports - self.sublent_ports(loan.id):
                return loan.id
        missing = min(ports - own)
        raise LedgerError("over_lend", f"{PORTS}: {port_text(missing)} is neither a port "
                          f"{lender} holds and has not lent, nor in a loan of ports it may "
                          "re-lend (one loan draws from one source)", PORTS)

    def _amount_source(self, lender: str, resource: str, amount: int) -> int | None:
        hold = self.holdings(lender)[resource]
        own_free = 0 if (resource in UNLIMITED_AT_ZERO and hold == 0) else max(
            0, hold - MINIMUM.get(resource, 0) - self.lent_own(lender)[resource])
        parent: int | None = None
        if amount > own_free:
            borrowed = 0
            for loan in self.loans_to(lender):
                if loan.resource != resource:
                    continue
                room = loan.amount - self.sublent(loan.id) if loan.relend else 0
                borrowed += room
                if amount <= room and parent is None:
                    parent = loan.id
            if parent is None:
                raise LedgerError("over_lend", f"{resource}: asks {amount}; {lender} has "
                                  f"{own_free} of its own to lend ({MINIMUM.get(resource, 0)} "
                                  f"kept) and {borrowed} borrowed it may re-lend", resource)
        return parent

    def end_loan(self, loan_id: int) -> set[str]:
        """End a loan and every loan lent on it."""
        touched: set[str] = set()
        stack, order = [loan_id], []
        while stack:
            lid = stack.pop()
            order.append(lid)
            stack.extend(self._loan_children.get(lid, ()))
        for lid in reversed(order):
            loan = self.loans.pop(lid)
            self.dirty_loans.add(lid)
            self._loan_children.pop(lid, None)
            if loan.parent is not None and loan.parent in self._loan_children:
                self._loan_children[loan.parent].discard(lid)
            self._lent[loan.lender].discard(lid)
            self._received[loan.recipient].discard(lid)
            touched |= {loan.lender, loan.recipient}
        return touched

    def expire(self, now: float) -> set[str]:
        touched: set[str] = set()
        for lid in sorted(i for i, loan in self.loans.items() if 0 < loan.expires <= now):
            if lid in self.loans:
                touched |= self.end_loan(lid)
        return touched

    def next_expiry(self) -> float | None:
        times = [loan.expires for loan in self.loans.values() if loan.expires > 0]
        return min(times) if times else None

    def set_loans(self, lender: str, wanted: Iterable[tuple[object, ...]],
                  now: float = 0.0) -> set[str]:
        """Replace `lender`'s loans by `wanted` (recipient, resource, amount, expires,
        relend[, ports]): unchanged ones stay, the others end (with their trees), new
        ones are made in order. All or nothing: a refused one leaves the loans as they
        were."""
        wanted = [tuple(w) if len(w) == 6 else (*w, NO_PORTS) for w in wanted]
        keep: dict[tuple[object, ...], list[int]] = {}
        for loan in self.loans_of(lender):
            keep.setdefault(loan.key(), []).append(loan.id)
        ending: list[int] = []
        fresh: list[tuple[object, ...]] = []
        for w in wanted:
            ids = keep.get(w)
            if ids:
                ids.pop(0)
            else:
                fresh.append(w)
        for ids in keep.values():
            ending.extend(ids)
        saved = self._save_loans()
        try:
            touched: set[str] = set()
            for lid in ending:
                if lid in self.loans:
                    touched |= self.end_loan(lid)
            for recipient, resource, amount, expires, relend, ports in fresh:
                _, t = self.lend(lender, recipient, resource, amount,  # type: ignore[arg-type]
                                 expires=expires, relend=relend, now=now,  # type: ignore[arg-type]
                                 ports=ports)  # type: ignore[arg-type]
                touched |= t
        except BaseException:
            self._restore_loans(saved)
            raise
        return touched

    def _save_loans(self) -> tuple[object, ...]:
        return ({k: Loan(**vars(v)) for k, v in self.loans.items()}, set(self.dirty_loans),
                self._next_loan)

    def _restore_loans(self, saved: tuple[object, ...]) -> None:
        loans, dirty, nxt = saved
        self.loans = loans  # type: ignore[assignment]
        self.dirty_loans = dirty  # type: ignore[assignment]
        self._loan_children, self._lent, self._received = {}, {}, {}
        for loan in self.loans.values():
            self._index_loan(loan)
        self._next_loan = nxt  # type: ignore[assignment]

    def _settle(self, name: str) -> set[str]:
        """End `name`'s own loans, newest first, until they fit its holdings again."""
        touched: set[str] = set()
        hold = self.holdings(name)
        for k in RESOURCES:
            mine = sorted((lid for lid in self._lent.get(name, ())
                           if self.loans[lid].resource == k and self.loans[lid].parent is None),
                          reverse=True)
            lent = sum(self.loans[i].amount for i in mine)
            while mine and lent > max(0, hold[k] - MINIMUM.get(k, 0)):
                lid = mine.pop(0)
                lent -= self.loans[lid].amount
                touched |= self.end_loan(lid)
        held_ports = self.holdings_ports(name)
        for lid in sorted(self._lent.get(name, ()), reverse=True):
            loan = self.loans.get(lid)
            if loan is not None and loan.resource == PORTS and loan.parent is None \
                    and not loan.ports <= held_ports:
                touched |= self.end_loan(lid)   # a port it lent is no longer its own
        return touched
