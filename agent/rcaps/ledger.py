"""The rcap and loan ledger: pure, in memory, no I/O (docs/rcaps.md).

An rcap names amounts of this node's resources. It is a root (acquired from the node's
free pool by the node admin, or minted for a PLC sliver from its rspec) or a child
split off another rcap. Bound to a slice, an rcap gives that slice its *remainder*:
its amounts less what was split off it. The invariant, per rcap and resource:

    sum(children's amounts) + remainder-bound  <=  amounts      (remainder >= 0)

Loans move part of a slice's holdings to another slice until they end. A loan is drawn
from the lender's own holdings (what its bound rcaps give it) or, if the loan it
borrowed allows it (`relend`), from a loan it received: loans form trees, and a loan
ends with everything lent on it. Per slice and resource:

    sum(loans from own holdings) <= max(0, holdings - MINIMUM)
    sum(loans lent on loan L)    <= L.amount                  (only if L.relend)

Ports are a set, not an amount: an rcap's split-off parts are disjoint subsets of its
ports, the roots' port sets (node roots, and PLC roots from the `ports` tag) do not
overlap, a slice lends only ports it holds and has not lent, and a loan lent on a
port loan takes a subset of it not lent yet. So no two slices are ever given the same
port (`effective_ports`).

`check()` verifies all of it (the property test calls it after every step). Every
change marks the rcaps and loans it touched dirty, so the store writes only those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.rcaps.loans import LoanBook
from agent.rcaps.model import (
    MINIMUM,
    NO_PORTS,
    ORIGIN_NODE,
    ORIGIN_PLC,
    ORIGIN_SPLIT,
    PORTS,
    RESOURCES,
    UNLIMITED_AT_ZERO,
    Amounts,
    LedgerError,
    Loan,
    Ports,
    Rcap,
    new_token,
    nonzero,
    port_text,
    zero,
)
from agent.rcaps.portbook import PortBook


@dataclass
class Ledger(PortBook, LoanBook):
    capacity: Amounts = field(default_factory=zero)
    rcaps: dict[str, Rcap] = field(default_factory=dict)
    loans: dict[int, Loan] = field(default_factory=dict)
    dirty_rcaps: set[str] = field(default_factory=set)
    dirty_loans: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._children: dict[str, set[str]] = {}
        self._bound: dict[str, set[str]] = {}        # slice -> rcap ids bound to it
        self._plc: dict[str, str] = {}                # slice -> its PLC rcap id
        self._loan_children: dict[int, set[int]] = {}
        self._lent: dict[str, set[int]] = {}          # lender -> loan ids
        self._received: dict[str, set[int]] = {}      # recipient -> loan ids
        self._held: dict[str, int] = {}               # holder -> rcaps it acquired
        self._next_loan = 1
        self._next_seq = 1
        self._pool_used = zero()                      # what node-origin roots hold
        self._pool_ports: set[tuple[str, int, str]] = set()   # ... and their ports
        # (proto, port) -> {address: root rcap id}: every root's ports (node and PLC)
        self._root_ports: dict[tuple[str, int], dict[str, str]] = {}
        for r in list(self.rcaps.values()):
            self._next_seq = max(self._next_seq, r.seq + 1)
            self._index_rcap(r)
        for loan in list(self.loans.values()):
            self._index_loan(loan)
            self._next_loan = max(self._next_loan, loan.id + 1)

    # -- indexes --------------------------------------------------------------------------

    def _index_rcap(self, r: Rcap) -> None:
        self._children.setdefault(r.id, set())
        if r.parent is not None:
            self._children.setdefault(r.parent, set()).add(r.id)
        if r.bound is not None:
            self._bound.setdefault(r.bound, set()).add(r.id)
        if r.origin == ORIGIN_PLC and r.bound is not None:
            self._plc[r.bound] = r.id
        self._held[r.holder] = self._held.get(r.holder, 0) + 1
        if r.origin == ORIGIN_NODE:
            for k, v in r.amounts.items():
                self._pool_used[k] += v
            self._pool_ports |= r.ports
        if r.parent is None:
            self._index_root_ports(r.id, r.ports, add=True)

    def _index_loan(self, loan: Loan) -> None:
        self._loan_children.setdefault(loan.id, set())
        if loan.parent is not None:
            self._loan_children.setdefault(loan.parent, set()).add(loan.id)
        self._lent.setdefault(loan.lender, set()).add(loan.id)
        self._received.setdefault(loan.recipient, set()).add(loan.id)

    # -- reading ----------------------------------------------------------------------------

    def get(self, rcap_id: str) -> Rcap:
        r = self.rcaps.get(rcap_id)
        if r is None:
            raise LedgerError("unknown_rcap", "no such rcap on this node (released, or "
                              "never issued)")
        return r

    def held_count(self, holder: str) -> int:
        return self._held.get(holder, 0)

    def split_off(self, rcap_id: str) -> Amounts:
        out = zero()
        for c in self._children.get(rcap_id, ()):
            for k, v in self.rcaps[c].amounts.items():
                out[k] += v
        return out

    def remainder(self, rcap_id: str) -> Amounts:
        r = self.rcaps[rcap_id]
        off = self.split_off(rcap_id)
        return {k: r.amounts[k] - off[k] for k in RESOURCES}

    def holdings(self, name: str) -> Amounts:
        """What the rcaps bound to slice `name` give it."""
        out = zero()
        for rid in self._bound.get(name, ()):
            for k, v in self.remainder(rid).items():
                out[k] += v
        return out

    def lent_own(self, name: str) -> Amounts:
        out = zero()
        for lid in self._lent.get(name, ()):
            loan = self.loans[lid]
            if loan.parent is None and loan.resource != PORTS:
                out[loan.resource] += loan.amount
        return out

    def sublent(self, loan_id: int) -> int:
        return sum(self.loans[c].amount for c in self._loan_children.get(loan_id, ()))

    def effective(self, name: str) -> Amounts:
        """Holdings less what it lent of its own, plus what it received less what it
        lent on that; a resource unlimited at 0 stays 0 when held at 0."""
        hold = self.holdings(name)
        out = {k: hold[k] - v for k, v in self.lent_own(name).items()}
        for lid in self._received.get(name, ()):
            loan = self.loans[lid]
            if loan.resource != PORTS:
                out[loan.resource] += loan.amount - self.sublent(lid)
        for k in UNLIMITED_AT_ZERO:
            if hold[k] == 0:
                out[k] = 0
        return out

    def adjusted(self, name: str) -> bool:
        """Whether the slice's effective amounts may differ from its PLC rcap's."""
        bound = self._bound.get(name, set())
        plc = self._plc.get(name)
        return bool(self._lent.get(name) or self._received.get(name)
                    or bound - {plc} or (plc is not None and self._children.get(plc)))

    def loans_of(self, lender: str) -> list[Loan]:
        return sorted((self.loans[i] for i in self._lent.get(lender, ())), key=lambda x: x.id)

    def loans_to(self, recipient: str) -> list[Loan]:
        return sorted((self.loans[i] for i in self._received.get(recipient, ())),
                      key=lambda x: x.id)

    def free_pool(self) -> Amounts:
        """The node's capacity less every root acquired from it (PLC-minted roots are
        PLC's admission and outside the pool)."""
        return {k: max(0, self.capacity[k] - self._pool_used[k]) for k in RESOURCES}

    def slices(self) -> set[str]:
        return {s for s, ids in self._bound.items() if ids}

    # -- rcaps ------------------------------------------------------------------------------

    def acquire(self, want: Amounts, holder: str, *, from_slice: str | None = None,
                now: float = 0.0, ports: Ports = NO_PORTS) -> tuple[str, set[str]]:
        """A new rcap from the node's free pool (from_slice None) or from the holdings
        of `from_slice` (split off the first of its bound rcaps it fits in). Returns
        (rcap string, slices whose holdings changed). Ports from the pool: none another
        node root holds (whether the port table gives them to a slice, or the host
        holds them, is the caller's check: `RcapService.check_pool_ports`)."""
        nonzero(want, ports)
        if from_slice is None:
            free = self.free_pool()
            for k in RESOURCES:
                if want[k] > free[k]:
                    raise LedgerError("exceeds_pool", f"{k}: asks {want[k]}, the node's free "
                                      f"pool has {free[k]}", k)
            taken = [k for k in sorted(ports) if self.root_clash(k)]
            if taken:
                raise LedgerError("exceeds_pool", f"{port_text(taken[0])}: another rcap "
                                  "acquired from the node, or a PLC sliver's ports tag, "
                                  "holds this port", PORTS)
            token, rid = new_token()
            self._add(Rcap(rid, None, want, holder, ORIGIN_NODE, created=now, ports=ports))
            return token, set()
        candidates = sorted(self._bound.get(from_slice, ()),
                            key=lambda i: (self.rcaps[i].origin != ORIGIN_PLC,
                                           self.rcaps[i].seq))
        if not candidates:
            raise LedgerError("exceeds_holdings", f"{from_slice} holds no rcap to acquire from")
        last: LedgerError | None = None
        for rid in candidates:
            try:
                return self.split(rid, want, holder, now=now, ports=ports)
            except LedgerError as exc:
                last = exc
        assert last is not None
        raise last

    def split(self, rcap_id: str, want: Amounts, holder: str,
              now: float = 0.0, ports: Ports = NO_PORTS) -> tuple[str, set[str]]:
        """A child of `rcap_id` with amounts `want` and `ports`, taken from its
        remainder."""
        nonzero(want, ports)
        parent = self.get(rcap_id)
        rem = self.remainder(rcap_id)
        for k in RESOURCES:
            if want[k] > rem[k]:
                raise LedgerError("exceeds_rcap", f"{k}: asks {want[k]}, the rcap has "
                                  f"{rem[k]} left", k)
        if ports:
            missing = ports - self.remainder_ports(rcap_id)
            if missing:
                raise LedgerError("exceeds_rcap", f"{port_text(min(missing))}: not among "
                                  "the ports the rcap has left", PORTS)
        touched: set[str] = set()
        if parent.bound is not None:
            self._check_shrink(parent.bound, want, ports)
            touched.add(parent.bound)
        token, rid = new_token()
        self._add(Rcap(rid, rcap_id, want, holder, ORIGIN_SPLIT, created=now, ports=ports))
        return token, touched

    def _check_shrink(self, name: str, less: Amounts, ports: Ports = NO_PORTS) -> None:
        """Refuse taking `less` from slice `name`'s holdings if its loans would not fit."""
        hold, lent = self.holdings(name), self.lent_own(name)
        for k in RESOURCES:
            if less[k] and lent[k] and hold[k] - less[k] - lent[k] < MINIMUM.get(k, 0):
                raise LedgerError("lent", f"{k}: {name} has lent {lent[k]} of its "
                                  f"{hold[k]}; end those loans first", k)
        lent_ports = ports & self.lent_own_ports(name) if ports else NO_PORTS
        if lent_ports:
            raise LedgerError("lent", f"{port_text(min(lent_ports))}: {name} has lent this "
                              "port; end that loan first", PORTS)

    def bind(self, rcap_id: str, name: str) -> set[str]:
        r = self.get(rcap_id)
        if r.bound is not None:
            raise LedgerError("bound", f"this rcap is already bound to {r.bound}; release "
                              "it first")
        r.bound = name
        self._bound.setdefault(name, set()).add(rcap_id)
        self.dirty_rcaps.add(rcap_id)
        return {name}

    def release(self, rcap_id: str, *, force: bool = False) -> set[str]:
        """Remove an rcap and everything split off it; amounts go back to its parent.
        A PLC-minted rcap is released only by the agent (force)."""
        r = self.get(rcap_id)
        if r.origin == ORIGIN_PLC and not force:
            raise LedgerError("plc_rcap", "this rcap is PLC's grant to a sliver; it ends "
                              "with the sliver")
        touched: set[str] = set()
        for rid in self._subtree(rcap_id):
            touched |= self._remove(rid)
        parent = self.rcaps.get(r.parent) if r.parent is not None else None
        if parent is not None and parent.bound is not None:
            touched.add(parent.bound)   # its remainder grew back
        for name in sorted(touched):
            touched |= self._settle(name)
        return touched

    def mint_plc(self, name: str, want: Amounts, now: float = 0.0,
                 ports: Ports = NO_PORTS) -> set[str]:
        """The PLC rcap of sliver `name` made or set to `want` and `ports` (its `ports`
        tag, less any port another root holds: roots stay disjoint). PLC's authority:
        children holding ports no longer in it, then the newest children beyond the new
        amounts, are released, and own loans that no longer fit end."""
        rid = self._plc.get(name)
        ports = frozenset(k for k in ports if self.root_clash(k, rid) is None)
        if rid is None:
            _, rid = new_token()
            self._add(Rcap(rid, None, dict(want), f"plc:{name}", ORIGIN_PLC, name, now,
                           ports=ports))
            self._bound.setdefault(name, set()).add(rid)
            self._plc[name] = rid
            return {name}
        r = self.rcaps[rid]
        if r.amounts == want and r.ports == ports:
            return set()
        r.amounts = dict(want)
        if r.ports != ports:
            self._index_root_ports(rid, r.ports - ports, add=False)
            self._index_root_ports(rid, ports - r.ports, add=True)
            r.ports = ports
        self.dirty_rcaps.add(rid)
        touched = {name}
        kids = sorted(self._children.get(rid, ()), key=lambda i: self.rcaps[i].seq)
        for kid in [k for k in kids if not self.rcaps[k].ports <= ports]:
            kids.remove(kid)
            touched |= self.release(kid, force=True)
        while kids and any(v < 0 for v in self.remainder(rid).values()):
            touched |= self.release(kids.pop(), force=True)
        touched |= self._settle(name)
        return touched

    def _subtree(self, rcap_id: str) -> list[str]:
        """rcap_id and its descendants, children before parents."""
        out: list[str] = []
        stack = [rcap_id]
        while stack:
            rid = stack.pop()
            out.append(rid)
            stack.extend(self._children.get(rid, ()))
        return out[::-1]

    def _add(self, r: Rcap) -> None:
        r.seq = self._next_seq
        self._next_seq += 1
        self.rcaps[r.id] = r
        self._index_rcap(r)
        self.dirty_rcaps.add(r.id)

    def _remove(self, rid: str) -> set[str]:
        r = self.rcaps.pop(rid)
        self.dirty_rcaps.add(rid)
        self._children.pop(rid, None)
        if r.parent is not None and r.parent in self._children:
            self._children[r.parent].discard(rid)
        self._held[r.holder] -= 1
        if r.origin == ORIGIN_NODE:
            for k, v in r.amounts.items():
                self._pool_used[k] -= v
            self._pool_ports -= r.ports
        if r.parent is None:
            self._index_root_ports(rid, r.ports, add=False)
        if not self._held[r.holder]:
            del self._held[r.holder]
        if r.bound is not None:
            self._bound[r.bound].discard(rid)
            if not self._bound[r.bound]:
                del self._bound[r.bound]
            if self._plc.get(r.bound) == rid:
                del self._plc[r.bound]
            return {r.bound}
        return set()

    # -- slivers ----------------------------------------------------------------------------

    def sliver_gone(self, name: str) -> set[str]:
        """Slice `name` has no sliver any more: its loans (given and received, with their
        trees) end, and the rcaps bound to it are released with what was split off them."""
        touched: set[str] = set()
        for lid in sorted(self._lent.get(name, set()) | self._received.get(name, set())):
            if lid in self.loans:
                touched |= self.end_loan(lid)
        for rid in sorted(self._bound.get(name, set()), key=lambda i: self.rcaps[i].seq):
            if rid in self.rcaps:
                touched |= self.release(rid, force=True)
        touched.discard(name)
        return touched

    # -- the invariant ------------------------------------------------------------------------

    def check(self) -> None:
        """AssertionError naming the first broken rule, if any."""
        self._check_ports()
        for r in self.rcaps.values():
            off = self.split_off(r.id)
            for k in RESOURCES:
                assert r.amounts[k] >= 0, (r.id, k)
                assert off[k] <= r.amounts[k], f"rcap {r.id[:8]}: {k} split {off[k]} > {r.amounts[k]}"
            if r.parent is not None:
                assert r.parent in self.rcaps, f"rcap {r.id[:8]}: parent gone"
        used = zero()
        for r in self.rcaps.values():
            if r.origin == ORIGIN_NODE:
                for k in RESOURCES:
                    used[k] += r.amounts[k]
        assert used == self._pool_used, "the pool's running sum drifted"
        for k in RESOURCES:
            assert used[k] <= self.capacity[k], f"pool {k}: {used[k]} > {self.capacity[k]}"
        live = self.slices()
        for name in set(self._lent) | set(self._received):
            hold, lent = self.holdings(name), self.lent_own(name)
            for k in RESOURCES:
                if lent[k]:
                    assert lent[k] <= hold[k] - MINIMUM.get(k, 0), f"{name} over-lent {k}"
            eff = self.effective(name)
            assert all(v >= 0 for v in eff.values()), f"{name}: negative {eff}"
        for loan in self.loans.values():
            assert loan.lender in live and loan.recipient in live, f"loan {loan.id}: dead party"
            assert self.sublent(loan.id) <= loan.amount, f"loan {loan.id} over-relent"
            if loan.parent is not None:
                p = self.loans[loan.parent]
                assert p.relend and p.recipient == loan.lender and p.resource == loan.resource
