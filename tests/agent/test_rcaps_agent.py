"""Rcaps and loans in a real agent (issue 12): three PLC slivers on the real kernel, HTB
on a veth; loans change cpu.weight and the HTB ceilings in place and revert at expiry
and at revocation, a loan lent on a borrowed part ends with it, over-lending and
splitting beyond an rcap are refused, and kill -9 of the agent keeps rcaps and loans."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_node import (
    LiveServer,
    Node,
    Site,
    cleanup_node,
    make_node,
    plc_server,
    wait_for,
    with_bandwidth,
)

from agent.sliceapi import client
from kernel import tc
from kernel.cgroups import V1_SHARES_PER_UNIT, V2_WEIGHT_PER_UNIT

pytestmark = pytest.mark.kernel

PID = os.getpid()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "kernel"))   # tests/kernel/bwnet.py
from bwnet import veth_netns  # noqa: E402

M = 1_000_000


@pytest.fixture(scope="module")
def plc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with plc_server(tmp_path_factory.mktemp(f"agent-rcaps-plc-{PID}")) as srv:
        yield srv


def weight(node: Node, name: str) -> int:
    """The sliver's CPU weight in cpu_share units, from cpu.weight (v2) or cpu.shares."""
    from kernel.context import Context

    cpu = Context.adopt(node.contexts_dir, name).cgroup.path("cpu")
    if (cpu / "cpu.weight").exists():
        return int((cpu / "cpu.weight").read_text()) // V2_WEIGHT_PER_UNIT
    return int((cpu / "cpu.shares").read_text()) // V1_SHARES_PER_UNIT


def ceilings(ifname: str) -> dict[int, int]:
    return {c.minor: c.ceil for c in tc.dump_classes(socket.if_nametoindex(ifname))
            if tc.is_sliver_minor(c.minor) and not c.minor & tc.EXEMPT_BIT}


class Logged:
    """The agent socket; a fault 104 ("applying it ... failed") carries the agent's log."""

    def __init__(self, api: Any, node: Node) -> None:
        self._api, self._node = api, node

    def __getattr__(self, method: str) -> Any:
        def call(*args: Any) -> Any:
            try:
                return getattr(self._api, method)(*args)
            except xmlrpc.client.Fault as exc:
                if "applying it" in exc.faultString:
                    raise AssertionError(f"{exc.faultString}\n{self._node.log_text()}") from None
                raise
        return call


def fault(call: Any, *args: Any) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as exc:
        call(*args)
    return exc.value


def test_loans_and_rcaps_on_real_slivers(plc: LiveServer) -> None:
    site = Site(plc)
    agents: list[subprocess.Popen[bytes]] = []
    with veth_netns("k") as net:
        node = with_bandwidth(make_node(plc, site.hostname), net.host)
        try:
            a, b, c = (site.add_slice(s, cpu_share="10", net_max_rate="20000")
                       for s in ("ra", "rb", "rc"))
            agents.append(node.start_agent())
            for n in (a, b, c):
                wait_for(lambda n=n: f"{n}: create done" in node.log_text(), 90,
                         f"sliver {n}", node.log_text)
            api: Any = Logged(client(str(node.cfg.socket_path)), node)
            w = 1
            assert [weight(node, n) for n in (a, b, c)] == [10 * w] * 3
            assert sorted(ceilings(net.host).values()) == [20 * M] * 3

            def ceil_of() -> list[int]:   # by sliver, from the classes' order of creation
                return [ceilings(net.host)[m] for m in minors]
            minors = sorted(ceilings(net.host))
            by_weight = {n: weight(node, n) for n in (a, b, c)}
            assert len(set(by_weight.values())) == 1

            # A lends half its CPU share and 10 Mbit/s to B, for a few seconds.
            until = int(time.time()) + 6
            t0 = time.perf_counter()
            assert api.SetLoans(a, [[b, "cpu_share", 5, until, True],
                                    [b, "net_max_rate", 10_000, until]]) == 1
            took = time.perf_counter() - t0
            assert (weight(node, a), weight(node, b)) == (5 * w, 15 * w)
            assert sorted(ceil_of()) == [10 * M, 20 * M, 30 * M]
            assert api.GetEffectiveRSpec(b)["cpu_share"] == 15
            assert api.GetLoans(a) == [[b, "cpu_share", 5, until, True],
                                       [b, "net_max_rate", 10_000, until, False]]

            # Over-lending is refused, naming the resource; nothing changes.
            f = fault(api.SetLoans, a, [[b, "cpu_share", 5, until, True],
                                        [b, "net_max_rate", 10_000, until], [c, "cpu_share", 5]])
            assert f.faultCode == 104 and "cpu_share" in f.faultString, f.faultString
            assert "4 of its own" in f.faultString
            assert weight(node, a) == 5 * w and len(api.GetLoans(a)) == 2
            # B lends 9 of its own and 4 of the borrowed (re-lendable) part to C.
            assert api.SetLoans(b, [[c, "cpu_share", 9], [c, "cpu_share", 4]]) == 1
            assert [weight(node, n) for n in (a, b, c)] == [5 * w, 2 * w, 23 * w]
            # B's net loan from A was not re-lendable: B lends only its own.
            f = fault(api.SetLoans, b, [[c, "net_max_rate", 25_000]])
            assert "net_max_rate" in f.faultString and "0 borrowed" in f.faultString

            # Revoking A's CPU loan ends what B lent on it, not what B lent of its own.
            assert api.SetLoans(a, [[b, "net_max_rate", 10_000, until]]) == 1
            assert [weight(node, n) for n in (a, b, c)] == [10 * w, 1 * w, 19 * w]
            assert api.GetLoans(b) == [[c, "cpu_share", 9, 0, False]]
            assert sorted(ceil_of()) == [10 * M, 20 * M, 30 * M]
            # At expiry the bandwidth loan ends: the HTB classes come back.
            wait_for(lambda: sorted(ceil_of()) == [20 * M] * 3, 15, "the loan's expiry",
                     node.log_text)
            assert api.GetLoans(a) == []

            # Rcaps: acquired from the free pool, split, bound to C; beyond it refused.
            r = api.AcquireRcap({"cpu_share": 20})
            r2 = api.SplitRcap(r, {"cpu_share": 8})
            assert api.BindRcap(c, r2) == 1
            assert weight(node, c) == 27 * w
            f = fault(api.SplitRcap, r2, {"cpu_share": 9})
            assert f.faultCode == 104 and "cpu_share: asks 9, the rcap has 8 left" in \
                f.faultString
            f = fault(api.SplitRcap, r, {"cpu_share": 13})
            assert "cpu_share: asks 13, the rcap has 12 left" in f.faultString
            f = fault(api.BindRcap, a, "0" * 32)
            assert f.faultCode == 102
            loan_until = int(time.time()) + 3600
            assert api.SetLoans(a, [[b, "cpu_share", 3, loan_until]]) == 1

            # kill -9: rcaps and loans survive; the restarted agent re-applies nothing new.
            os.killpg(agents[0].pid, signal.SIGKILL)
            agents[0].wait(10)
            agents.append(node.start_agent())
            wait_for(lambda: node.log_text().count(f"{a}: adopt done") == 1, 60,
                     "the restarted agent", node.log_text)
            node.wait_api()
            api = Logged(client(str(node.cfg.socket_path)), node)
            assert api.GetLoans(a) == [[b, "cpu_share", 3, loan_until, False]]
            assert api.GetLoans(b) == [[c, "cpu_share", 9, 0, False]]
            assert api.GetRcap(r2)["bound"] == c and api.GetRcap(r)["remainder"]["cpu_share"] == 12
            assert [weight(node, n) for n in (a, b, c)] == [7 * w, 4 * w, 27 * w]

            # Releasing the rcap gives C's 8 back to the pool; C's going ends B's loan.
            assert api.ReleaseRcap(r) == 1
            assert weight(node, c) == 19 * w
            site.api.DeleteSliceFromNodes(site.admin, c, [site.node_id])
            os.killpg(agents[-1].pid, signal.SIGUSR1)
            wait_for(lambda: f"{c}: destroy done" in node.log_text(), 60, "C's destroy",
                     node.log_text)
            wait_for(lambda: weight(node, b) == 13 * w, 10,
                     "B's share back", node.log_text)
            assert api.GetLoans(b) == []
            print(f"loan applied to cgroups and HTB in {took * 1000:.1f} ms")
        finally:
            cleanup_node(node, agents)
