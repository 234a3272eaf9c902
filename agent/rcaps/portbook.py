"""The port half of the rcap ledger (docs/rcaps.md "Ports"): the views of what port
sets rcaps and loans give, the index keeping roots' ports from overlapping, and the
port rules of the invariant. A mixin of `Ledger` (agent/rcaps/ledger.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.rcaps.model import NO_PORTS, ORIGIN_NODE, PORTS, Ports, port_text

if TYPE_CHECKING:
    _Base = Any
else:
    _Base = object


class PortBook(_Base):
    """Port sets; see the module docstring."""

    def _index_root_ports(self, rid: str, ports: Ports, *, add: bool) -> None:
        for proto, port, address in ports:
            at = self._root_ports.setdefault((proto, port), {})
            if add:
                at[address] = rid
            elif at.get(address) == rid:
                del at[address]
                if not at:
                    del self._root_ports[(proto, port)]

    def root_clash(self, key: tuple[str, int, str], own: str | None = None) -> str | None:
        """The root rcap (not `own`) holding a port that overlaps `key` (the same port
        on the same address, or either on every address), if any."""
        proto, port, address = key
        for addr, rid in self._root_ports.get((proto, port), {}).items():
            if rid != own and (addr == address or not addr or not address):
                return rid
        return None

    # -- ports ------------------------------------------------------------------------------

    def remainder_ports(self, rcap_id: str) -> Ports:
        r = self.rcaps[rcap_id]
        if not r.ports:
            return NO_PORTS
        off: set[tuple[str, int, str]] = set()
        for c in self._children.get(rcap_id, ()):
            off |= self.rcaps[c].ports
        return r.ports - off

    def holdings_ports(self, name: str) -> Ports:
        out: set[tuple[str, int, str]] = set()
        for rid in self._bound.get(name, ()):
            out |= self.remainder_ports(rid)
        return frozenset(out)

    def lent_own_ports(self, name: str) -> Ports:
        out: set[tuple[str, int, str]] = set()
        for lid in self._lent.get(name, ()):
            loan = self.loans[lid]
            if loan.parent is None and loan.resource == PORTS:
                out |= loan.ports
        return frozenset(out)

    def sublent_ports(self, loan_id: int) -> Ports:
        out: set[tuple[str, int, str]] = set()
        for c in self._loan_children.get(loan_id, ()):
            out |= self.loans[c].ports
        return frozenset(out)

    def effective_ports(self, name: str) -> Ports:
        """The ports slice `name` is given: what its bound rcaps hold less what it lent of
        them, plus the port loans it received less what it lent on them."""
        out = set(self.holdings_ports(name) - self.lent_own_ports(name))
        for lid in self._received.get(name, ()):
            loan = self.loans[lid]
            if loan.resource == PORTS:
                out |= loan.ports - self.sublent_ports(lid)
        return frozenset(out)

    def ported_slices(self) -> set[str]:
        """Slices that may be given ports by the ledger (a bound rcap with ports or a
        port loan received)."""
        out = {loan.recipient for loan in self.loans.values() if loan.resource == PORTS}
        for name, ids in self._bound.items():
            if any(self.rcaps[i].ports for i in ids):
                out.add(name)
        return out

    def plc_ports(self, name: str) -> Ports:
        """The ports of slice `name`'s PLC rcap (from its `ports` tag)."""
        rid = self._plc.get(name)
        return self.rcaps[rid].ports if rid is not None else NO_PORTS

    def _check_ports(self) -> None:
        """The port rules: split-off parts disjoint subsets of their parent, roots (node
        and PLC) without overlapping ports, own port loans disjoint subsets of the
        lender's holdings, loans lent on a port loan disjoint subsets of it, and no port
        given to two slices."""
        def disjoint_within(parts: list[Ports], whole: Ports | None, what: str) -> None:
            seen: set[tuple[str, int, str]] = set()
            for p in parts:
                assert not seen & p, f"{what}: a port in two parts"
                seen |= p
            assert whole is None or seen <= whole, f"{what}: parts beyond the whole"
        for r in self.rcaps.values():
            disjoint_within([self.rcaps[c].ports for c in self._children.get(r.id, ())],
                            r.ports, f"rcap {r.id[:8]}")
        roots = [r.ports for r in self.rcaps.values() if r.origin == ORIGIN_NODE]
        assert set().union(*roots) == self._pool_ports, "the pool's ports drifted"
        every: dict[tuple[str, int], dict[str, str]] = {}
        for r in self.rcaps.values():
            if r.parent is None:
                for proto, port, address in r.ports:
                    at = every.setdefault((proto, port), {})
                    assert not any(address == a or not a or not address for a in at), \
                        f"roots {r.id[:8]} and {at.get(address, '?')[:8]} overlap at " \
                        f"{port_text((proto, port, address))}"
                    at[address] = r.id
        assert every == self._root_ports, "the roots' port index drifted"
        for name in set(self._lent):
            own = [self.loans[i].ports for i in self._lent[name]
                   if self.loans[i].resource == PORTS and self.loans[i].parent is None]
            disjoint_within(own, self.holdings_ports(name), f"{name}'s port loans")
        for loan in self.loans.values():
            if loan.resource == PORTS:
                assert loan.ports and loan.amount == len(loan.ports), f"loan {loan.id}"
                disjoint_within([self.loans[c].ports
                                 for c in self._loan_children.get(loan.id, ())],
                                loan.ports, f"port loan {loan.id}")
            else:
                assert not loan.ports, f"loan {loan.id}: ports on a loan of {loan.resource}"
        given: dict[tuple[str, int, str], str] = {}
        for name in self.slices() | {x.recipient for x in self.loans.values()}:
            for key in self.effective_ports(name):
                assert key not in given, f"{port_text(key)} given to {given[key]} and {name}"
                given[key] = name
