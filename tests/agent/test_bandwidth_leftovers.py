"""Issue 10 bandwidth leftovers: PLC's interface bwlimit is the node cap when agent.toml
sets no node_rate (and a change moves the root class in place), init-config renders
the [bandwidth] table, and the state keeps no unused byte_counters table."""

from __future__ import annotations

import sqlite3
import sys
import tomllib
from pathlib import Path

import pytest

from agent import config, getslivers
from agent.bandwidth import BandwidthConfig
from agent.bwservice import BandwidthService
from agent.state import State
from kernel import tc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "kernel"))   # tests/kernel/bwnet.py
from bwnet import veth_netns  # noqa: E402

M = 1_000_000


def test_plc_bwlimit_prefers_the_primary_interface() -> None:
    reply = {"interfaces": [{"bwlimit": 7 * M, "is_primary": False},
                            {"bwlimit": 3 * M, "is_primary": True}]}
    assert getslivers.plc_bwlimit(reply) == 3 * M
    assert getslivers.plc_bwlimit({"interfaces": [{"bwlimit": None, "is_primary": True},
                                                  {"bwlimit": 5 * M}]}) == 5 * M
    for bad in (None, {}, {"interfaces": "x"}, {"interfaces": [{"bwlimit": True}]},
                {"interfaces": [{"bwlimit": -1, "is_primary": True}]}):
        assert getslivers.plc_bwlimit(bad) is None


@pytest.mark.kernel
def test_plc_bwlimit_is_the_node_cap_unless_node_rate(tmp_path: Path) -> None:
    with veth_netns("l") as net:
        cfg = BandwidthConfig(interfaces=(net.host,), link_rate=1000 * M)
        svc = BandwidthService(cfg, tmp_path / "agent.db", "pl-unused", plc_bwlimit=20 * M)
        try:
            svc.start({"s1": {"net_max_rate": 50_000}})

            def capped() -> tuple[int, int]:
                with tc.Shaper(net.host) as sh:
                    c = sh.read().classes[tc.CAPPED_MINOR]
                    s = sh.counters()[svc.minor_of("s1")]
                return c.ceil, s.ceil

            assert capped() == (20 * M, 20 * M)   # the sliver's ceil clamped to the cap
            assert svc.set_plc_bwlimit(8 * M) is True      # moved in place
            assert capped() == (8 * M, 8 * M)
            assert svc.set_plc_bwlimit(8 * M) is False
        finally:
            svc.close()
        fixed = BandwidthConfig(interfaces=(net.host,), link_rate=1000 * M, node_rate=30 * M)
        svc = BandwidthService(fixed, tmp_path / "agent.db", "pl-unused", plc_bwlimit=20 * M)
        try:
            svc.start({})
            assert svc.set_plc_bwlimit(5 * M) is False     # node_rate wins
            with tc.Shaper(net.host) as sh:
                assert sh.read().classes[tc.CAPPED_MINOR].ceil == 30 * M
        finally:
            svc.close()


def test_init_config_renders_the_bandwidth_table() -> None:
    text = config.render()
    data = tomllib.loads(text)
    assert set(data["bandwidth"]) == set(BandwidthConfig.__dataclass_fields__)
    assert config.from_mapping(data).bandwidth == BandwidthConfig()
    assert data["cpu_headroom_pct"] == 10


def test_state_has_no_unused_byte_counters(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "agent.db")
    db.execute("CREATE TABLE byte_counters (name TEXT PRIMARY KEY)")   # an older state
    db.close()
    State.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / "agent.db")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "byte_counters" not in tables
