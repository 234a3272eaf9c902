"""agent/bandwidth.py: the budget rule (pure) and the ledger against real HTB classes."""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "kernel"))
from bwnet import WIRE_V4, Blaster, send_count, veth_netns  # noqa: E402

from agent import bandwidth as bw  # noqa: E402
from kernel import tc  # noqa: E402

M = 1_000_000


def test_budget_ceiling_rule() -> None:
    # below the threshold: the max rate
    assert bw.budget_ceiling(10, 100, 1000, 8000, 5 * M, 0, 100, 50) == 5 * M
    # above: bytes left over seconds left, in bit/s
    assert bw.budget_ceiling(200, 100, 10_200, 8000, 5 * M, 0, 100, 90) == 10_000 * 8 // 10
    assert bw.budget_ceiling(100_000, 50_000, 1_100_000, 8000, 5 * M, 0, 100, 60) == \
        1_000_000 * 8 // 40
    # over the max: the floor; never above the max rate
    assert bw.budget_ceiling(2000, 100, 1000, 8000, 5 * M, 0, 100, 50) == 8000
    assert bw.budget_ceiling(200, 100, 10**12, 8000, 5 * M, 0, 100, 50) == 5 * M


def test_config_is_validated_with_the_key_named() -> None:
    cfg = bw.parse_config({"interfaces": ["eth0"], "node_rate": 10 * M,
                           "exempt": ["10.0.0.0/8", "2001:db8::/32"], "sample_s": 2,
                           "period_s": 60})
    assert cfg.interfaces == ("eth0",) and cfg.period_s == 60 and cfg.sample_s == 2.0
    for bad, key in (({"node_rate": -1}, "node_rate"), ({"exempt": ["10.0.0.1/8"]}, "exempt"),
                     ({"interfaces": ["a/b"]}, "interfaces"), ({"sample_s": 0}, "sample_s"),
                     ({"bogus": 1}, "bogus"), ({"period_s": True}, "period_s")):
        with pytest.raises(bw.BandwidthConfigError, match=key):
            bw.parse_config(bad)
    assert bw.node_cap(bw.parse_config({}), 5 * M) == 5 * M
    assert bw.node_cap(bw.parse_config({"node_rate": 2 * M}), 5 * M) == 2 * M
    assert bw.node_cap(bw.parse_config({}), -1) == bw.DEFAULT_LINK_RATE


def test_rates_from_rspec_clamp_as_bwmon() -> None:
    r = bw.Rates.from_rspec({"net_min_rate": 9000, "net_max_rate": 50_000, "net_share": 0,
                             "net_max_kbyte": 10, "net_thresh_kbyte": 5}, cap=20 * M,
                            link_rate=1000 * M)
    assert r.max_rate == 20 * M and r.min_rate == 5 * M and r.share == 1
    assert r.max_bytes == 10240 and r.thresh_bytes == 5120
    assert bw.Rates.from_rspec({"net_max_rate": -1}, 20 * M, 1000 * M).max_rate == 20 * M




@pytest.fixture
def net():
    with veth_netns("a") as n:
        yield n


def make(db: sqlite3.Connection, ifname: str, period: int = 86400) -> bw.Bandwidth:
    bw.ensure_tables(db)
    cfg = bw.parse_config({"interfaces": [ifname], "period_s": period, "node_rate": 100 * M})
    return bw.Bandwidth(db, cfg, [tc.Shaper(ifname)], cap=100 * M)


def close(b: bw.Bandwidth) -> None:
    for sh in b.shapers:
        sh.close()
    b.db.close()


RSPEC = {"net_min_rate": 100, "net_max_rate": 20_000, "net_share": 1}


@pytest.mark.kernel
def test_ledger_survives_restart_counter_reset_and_recreate(net, tmp_path) -> None:
    path = tmp_path / "agent.db"
    b = make(sqlite3.connect(path), net.host)
    now = time.time()
    b.sync({"pl_a": RSPEC}, now)
    minor = b.minors()["pl_a"]
    send_count(net.sink4, tc.handle(1, minor), 10)
    b.account(time.time())
    assert b.report("pl_a", time.time())["packets"] == 10
    close(b)                                      # the agent dies (nothing else to flush)

    send_count(net.sink4, tc.handle(1, minor), 5)  # sent while the agent was away
    b = make(sqlite3.connect(path), net.host)
    b.sync({"pl_a": RSPEC}, time.time())          # adopts: class kept, 5 billed
    assert b.minors()["pl_a"] == minor
    assert b.report("pl_a", time.time())["packets"] == 15

    # Someone re-creates the class behind our back: its counter restarts lower.
    sh = b.shapers[0]
    sh.remove_sliver(minor)
    sh.ensure_sliver(minor, tc.ClassSpec(100_000, 20 * M), tc.ClassSpec(100_000, 20 * M))
    send_count(net.sink4, tc.handle(1, minor), 3)
    b.account(time.time())
    rep = b.report("pl_a", time.time())
    assert rep["packets"] == 18 and rep["bytes"] == 18 * WIRE_V4

    # Destroy and re-create within the window: the bytes stay, none counted twice.
    b.remove("pl_a", time.time())
    assert minor not in {m & 0x7FFF for m in sh.counters()}
    b.sync({"pl_a": RSPEC}, time.time())
    send_count(net.sink4, tc.handle(1, b.minors()["pl_a"]), 2)
    b.account(time.time())
    b.account(time.time())
    assert b.report("pl_a", time.time())["packets"] == 20
    sh.remove_all()
    close(b)


@pytest.mark.kernel
def test_budget_slows_after_threshold_and_period_end_restores(net, tmp_path) -> None:
    period = 6
    b = make(sqlite3.connect(tmp_path / "agent.db"), net.host, period=period)
    rspec = {**RSPEC, "net_thresh_kbyte": 400, "net_max_kbyte": 2400}
    start = time.time()
    b.sync({"pl_b": rspec}, start)
    minor = b.minors()["pl_b"]
    sh = b.shapers[0]
    seen: list[tuple[float, int, int]] = []   # (time, bytes counted, applied ceil)
    try:
        with Blaster([(net.sink4, tc.handle(1, minor), 30 * M)]):
            while time.time() < start + period + 1.2:
                now = time.time()
                b.account(now)
                rep = b.report("pl_b", now)
                seen.append((now, rep["bytes"], sh.counters()[minor].ceil))
                time.sleep(0.4)
    finally:
        sh.remove_all()
        close(b)
    capped = [(t, used, ceil) for t, used, ceil in seen if ceil < 20 * M and t < start + period]
    assert capped, seen
    for t, used, ceil in capped:
        left = max(start + period - t, 1.0)   # the rule never divides by less than 1 s
        want = max(int((2400 * 1024 - used) * 8 / left), 100_000)
        assert ceil == pytest.approx(want, rel=0.01, abs=64)
    # Slowed: the bytes sent between the first and last capped pass follow the ceilings.
    (t0, b0, _), (t1, b1, _) = capped[0], capped[-1]
    mean_ceil = sum(c for _, _, c in capped[:-1]) / max(len(capped) - 1, 1)
    assert (b1 - b0) * 8 / (t1 - t0) == pytest.approx(mean_ceil, rel=0.15)
    assert (b1 - b0) * 8 / (t1 - t0) < 10 * M
    # The next window's first pass restores the max rate (flat out, the slice passes
    # its threshold again within a fraction of a second, so later passes cap again).
    after = [ceil for t, _, ceil in seen if t >= start + period]
    assert after and after[0] == 20 * M, seen
