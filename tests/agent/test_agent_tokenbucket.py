"""Token buckets: burst, refill, per-key isolation, bounded memory."""

from __future__ import annotations

import pytest

from agent.tokenbucket import TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_burst_then_refill() -> None:
    clock = Clock()
    tb = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [tb.take("a") for _ in range(4)] == [True, True, True, False]
    clock.t += 0.5
    assert tb.take("a") and not tb.take("a")
    clock.t += 100
    assert [tb.take("a") for _ in range(4)] == [True, True, True, False]


def test_keys_are_independent() -> None:
    clock = Clock()
    tb = TokenBuckets(rate=1.0, burst=1, clock=clock)
    assert tb.take("a") and not tb.take("a")
    assert tb.take("b")


def test_memory_bounded() -> None:
    clock = Clock()
    tb = TokenBuckets(rate=1.0, burst=1, clock=clock, max_keys=10)
    for i in range(100):
        tb.take(f"k{i}")
    assert len(tb) <= 10


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBuckets(rate=0, burst=1, clock=Clock())
