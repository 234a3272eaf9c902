"""The rcap/loan ledger, pure (agent/rcaps/ledger.py): the rules one by one, and a
hypothesis state machine of 10,000 random call sequences that checks the invariant
after every step."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agent.rcaps.ledger import Ledger
from agent.rcaps.model import LedgerError, amounts_of, token_id, zero


def cap(**kw: int) -> dict[str, int]:
    return {**zero(), **kw}


def ledger() -> Ledger:
    return Ledger(capacity=cap(cpu_share=100, net_max_rate=100_000, mem_max=1 << 20,
                               pids_max=1000, cpu_pct=100, net_min_rate=1000,
                               disk_max=1 << 20))


def test_acquire_split_bind_and_the_limits() -> None:
    led = ledger()
    led.mint_plc("a", cap(cpu_share=10, net_max_rate=20_000))
    token, _ = led.acquire(amounts_of({"cpu_share": 40}), "")
    rid = next(r for r in led.rcaps.values() if r.origin == "node").id
    with pytest.raises(LedgerError) as exc:
        led.acquire(amounts_of({"cpu_share": 61}), "")
    assert exc.value.resource == "cpu_share" and "free pool has 60" in str(exc.value)
    child, _ = led.split(rid, amounts_of({"cpu_share": 15}), "")
    with pytest.raises(LedgerError) as exc:
        led.split(rid, amounts_of({"cpu_share": 26}), "")
    assert exc.value.kind == "exceeds_rcap" and "25 left" in str(exc.value)
    assert led.bind(token_id(child), "a") == {"a"}
    assert led.holdings("a")["cpu_share"] == 25
    with pytest.raises(LedgerError, match="already bound"):
        led.bind(token_id(child), "a")
    led.release(rid)            # the parent and what was split off it
    assert led.holdings("a")["cpu_share"] == 10 and not led.free_pool()["cpu_share"] < 100
    led.check()
    assert token


def test_loans_tree_overlend_relend_and_expiry() -> None:
    led = ledger()
    for name in "abc":
        led.mint_plc(name, cap(cpu_share=10, net_max_rate=20_000))
    with pytest.raises(LedgerError) as exc:
        led.lend("a", "b", "cpu_share", 10)        # 1 is kept
    assert exc.value.kind == "over_lend" and "9 of its own" in str(exc.value)
    lid, _ = led.lend("a", "b", "cpu_share", 5, relend=False, expires=100, now=1)
    assert led.effective("a")["cpu_share"] == 5 and led.effective("b")["cpu_share"] == 15
    with pytest.raises(LedgerError, match="0 borrowed it may re-lend"):
        led.lend("b", "c", "cpu_share", 12)        # 9 own; the borrowed 5 not re-lendable
    led.end_loan(lid)
    lid, _ = led.lend("a", "b", "cpu_share", 5, relend=True)
    with pytest.raises(LedgerError, match="9 of its own.*5 borrowed"):
        led.lend("b", "c", "cpu_share", 12)   # one loan draws from one source
    sub, _ = led.lend("b", "c", "cpu_share", 4)     # fits b's own 9
    assert led.loans[sub].parent is None
    sub2, _ = led.lend("b", "c", "cpu_share", 5)    # own 5 left -> own
    sub3, _ = led.lend("b", "c", "cpu_share", 3)    # own exhausted -> from the loan
    assert led.loans[sub3].parent == lid
    assert led.end_loan(lid) == {"a", "b", "c"} and sub3 not in led.loans
    assert sub in led.loans and sub2 in led.loans
    lid, _ = led.lend("a", "c", "net_max_rate", 10_000, expires=50, now=1)
    assert led.expire(49) == set() and led.expire(50) == {"a", "c"}
    assert led.effective("a")["net_max_rate"] == 20_000
    led.check()


def test_sliver_gone_ends_its_loans_and_rcaps() -> None:
    led = ledger()
    for name in "ab":
        led.mint_plc(name, cap(cpu_share=10))
    led.lend("a", "b", "cpu_share", 4, relend=True)
    t, _ = led.acquire(amounts_of({"cpu_share": 3}), "a", from_slice="a")
    led.bind(token_id(t), "b")
    assert led.effective("b")["cpu_share"] == 17
    assert led.sliver_gone("a") == {"b"}
    assert led.effective("b")["cpu_share"] == 10 and not led.loans
    led.check()


def test_plc_lowering_ends_what_no_longer_fits() -> None:
    led = ledger()
    for name in "ab":
        led.mint_plc(name, cap(cpu_share=10))
    led.lend("a", "b", "cpu_share", 4)
    led.lend("a", "b", "cpu_share", 4)
    led.mint_plc("a", cap(cpu_share=6))      # 5 lendable now: the newest loan ends
    assert [loan.amount for loan in led.loans_of("a")] == [4]
    led.check()


def test_set_loans_is_all_or_nothing() -> None:
    led = ledger()
    for name in "ab":
        led.mint_plc(name, cap(cpu_share=10))
    led.set_loans("a", [("b", "cpu_share", 3, 0.0, False)])
    before = [loan.key() for loan in led.loans_of("a")]
    with pytest.raises(LedgerError):
        led.set_loans("a", [("b", "cpu_share", 3, 0.0, False), ("b", "cpu_share", 9, 0.0, False)])
    assert [loan.key() for loan in led.loans_of("a")] == before
    led.check()


# --- the property test ----------------------------------------------------------------

SLICES = ["s0", "s1", "s2", "s3"]
RES3 = ["cpu_share", "net_max_rate", "mem_max"]
PORT_KEYS = [("tcp", 5000 + n, "") for n in range(5)] + [("udp", 5000, "")]


def port_subset(i: int) -> frozenset[tuple[str, int, str]]:
    """One of the 64 subsets of PORT_KEYS (i's low bits)."""
    return frozenset(k for b, k in enumerate(PORT_KEYS) if i >> b & 1)


class Driver:
    """One random sequence's world: the ledger, a clock, the slices with a sliver.
    Each op may be refused (LedgerError); after each, the invariant must hold."""

    def __init__(self) -> None:
        self.led = Ledger(capacity=cap(cpu_share=100, net_max_rate=100, mem_max=100))
        self.now = 0.0
        self.alive: set[str] = set()

    def step(self, op: str, name: str, other: str, want: dict[str, int], i: int,
             amt: int, ttl: int, relend: bool) -> None:
        led, ids = self.led, list(self.led.rcaps)
        try:
            if op == "plc":   # a PLC rspec and `ports` tag, new or changed
                led.mint_plc(name, cap(**want), self.now, ports=port_subset(i // 3))
                self.alive.add(name)
                assert led.plc_ports(name) <= port_subset(i // 3)
            elif op == "acquire":
                led.acquire(cap(**want), "", from_slice=name if i % 2 else None, now=self.now,
                            ports=port_subset(i // 7))
            elif op == "acquire_bind" and name in self.alive:   # ports held, lendable
                tok, _ = led.acquire(cap(**want), "", now=self.now, ports=port_subset(i // 7))
                led.bind(token_id(tok), name)
            elif op == "split" and ids:
                led.split(ids[i % len(ids)], cap(**want), "", self.now,
                          ports=port_subset(i // 7))
            elif op == "bind" and ids and name in self.alive:
                led.bind(ids[i % len(ids)], name)
            elif op == "release" and ids:
                led.release(ids[i % len(ids)])
            elif op == "lend" and name in self.alive:
                led.lend(name, other, RES3[i % 3], amt, relend=relend, now=self.now,
                         expires=self.now + ttl if ttl else 0)
            elif op == "set_loans" and name in self.alive:
                led.set_loans(name, [(other, "cpu_share", amt, 0.0, True)], self.now)
            elif op == "lend_ports" and name in self.alive:
                name = next((s for s in sorted(self.alive) if led.effective_ports(s)
                             and i % 4), name)   # mostly a slice with ports to lend
                other = next((s for s in sorted(led.slices(), key=lambda x: (x != other, x))
                              if s != name and i % 3), other)    # mostly a live recipient
                have = sorted(led.effective_ports(name))   # mostly ports it may lend
                ports = frozenset(have[i % len(have):][:1 + i % 3]) if have and i % 5 \
                    else port_subset(i)
                led.lend(name, other, "ports", 0, relend=relend, now=self.now,
                         expires=self.now + ttl if ttl else 0, ports=ports)
            elif op == "revoke" and led.loans:
                led.end_loan(sorted(led.loans)[i % len(led.loans)])
            elif op == "expire":
                self.now += 1 + i % 3
                led.expire(self.now)
                assert all(not 0 < x.expires <= self.now for x in led.loans.values())
            elif op == "destroy":
                led.sliver_gone(name)
                self.alive.discard(name)
                assert not led.loans_of(name) and not led.loans_to(name)
        except LedgerError:
            pass
        led.check()


OPS = ["plc", "acquire", "split", "bind", "release", "lend", "set_loans", "revoke",
       "expire", "destroy", "lend_ports", "acquire_bind", "lend_ports"]
amount = st.integers(min_value=0, max_value=40)
small = st.fixed_dictionaries({k: amount for k in RES3})


@settings(max_examples=1_000, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**64))
def test_ledger_invariant_10000_random_sequences(seed: int) -> None:
    """10,000 sequences of 12 random calls: hypothesis draws 1,000 seeds, each drives
    10 sequences (hypothesis costs ~2.5 ms an example; the ledger ~0.1 ms a sequence)."""
    rnd = random.Random(seed)
    for _ in range(10):
        d = Driver()
        for _ in range(12):
            d.step(rnd.choice(OPS), rnd.choice(SLICES), rnd.choice(SLICES),
                   {k: rnd.randint(0, 40) for k in RES3}, rnd.randint(0, 1000),
                   rnd.randint(1, 30), rnd.choice([0, 1, 5]), rnd.random() < 0.5)


class LedgerMachine(RuleBasedStateMachine):
    """The same calls as a hypothesis state machine: fewer sequences (its generation is
    costly), but a failure shrinks to a minimal sequence of calls."""

    @initialize()
    def start(self) -> None:
        self.d = Driver()

    @rule(op=st.sampled_from(OPS), name=st.sampled_from(SLICES),
          other=st.sampled_from(SLICES), want=small, i=st.integers(0, 1000),
          amt=st.integers(1, 30), ttl=st.sampled_from([0, 1, 5]), relend=st.booleans())
    def call(self, op: str, name: str, other: str, want: dict[str, int], i: int, amt: int,
             ttl: int, relend: bool) -> None:
        self.d.step(op, name, other, want, i, amt, ttl, relend)

    @invariant()
    def holds(self) -> None:
        if hasattr(self, "d"):
            self.d.led.check()


LedgerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=12, deadline=None, database=None,
    phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
test_ledger_state_machine = LedgerMachine.TestCase
