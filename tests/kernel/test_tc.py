"""kernel/tc.py and kernel/netclass.py on the real kernel, with real traffic on a veth."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from bwnet import WIRE_V4, WIRE_V6, Blaster, send_count, veth_netns

from kernel import netclass, tc

pytestmark = pytest.mark.kernel
M = 1_000_000


def rates(shaper: tc.Shaper, minors: list[int], seconds: float) -> dict[int, float]:
    c0, t0 = shaper.counters(), time.monotonic()
    time.sleep(seconds)
    c1, t1 = shaper.counters(), time.monotonic()
    return {m: (c1[m].bytes - c0[m].bytes) * 8 / (t1 - t0) for m in minors}


@pytest.fixture
def net():
    with veth_netns() as n:
        yield n


@pytest.fixture
def shaper(net):
    with tc.Shaper(net.host) as sh:
        yield sh


def prio(minor: int) -> int:
    return tc.handle(tc.MAJOR, minor)


def test_minor_for_is_deterministic_and_skips_taken() -> None:
    a = tc.minor_for("pl_alpha", {})
    assert tc.FIRST_SLIVER_MINOR <= a <= tc.LAST_SLIVER_MINOR
    assert tc.minor_for("pl_alpha", {}) == a
    b = tc.minor_for("pl_beta", {a: "pl_alpha"})
    assert b != a
    assert tc.minor_for("pl_alpha", {a: "pl_other"}) == (a + 1 if a < tc.LAST_SLIVER_MINOR
                                                          else tc.FIRST_SLIVER_MINOR)
    assert tc.minor_for("pl_beta", {77: "pl_beta"}) == 77
    full = {m: str(m) for m in range(tc.FIRST_SLIVER_MINOR, tc.LAST_SLIVER_MINOR + 1)}
    with pytest.raises(ValueError, match="no free HTB class id"):
        tc.minor_for("x", full)
    # More than 12 bits: 5000 names get 5000 distinct ids.
    taken: dict[int, str] = {}
    for i in range(5000):
        taken[tc.minor_for(f"s{i}", taken)] = f"s{i}"
    assert len(taken) == 5000 and max(taken) > 0xFFF


def test_leaf_limit_is_ms_of_ceiling_and_at_least_one_gso_packet() -> None:
    assert tc.leaf_limit(100 * M) == 100 * M * tc.QUEUE_MS // 8000
    assert tc.leaf_limit(8000) == tc.QUEUE_MIN_BYTES > 65536 > 3 * 1514
    assert tc.leaf_limit(4 * M) > 65536, "a 64 KiB TCP GSO packet fits a slow class"
    assert tc.leaf_limit(1000, mtu=30000) == 3 * 30014


def test_two_ceilings_hold_within_2_percent(shaper, net) -> None:
    shaper.ensure_root(node_rate=100 * M, link_rate=1000 * M)
    shaper.ensure_sliver(0x20, tc.ClassSpec(100_000, 5 * M), tc.ClassSpec(100_000, 5 * M))
    shaper.ensure_sliver(0x21, tc.ClassSpec(100_000, 20 * M), tc.ClassSpec(100_000, 20 * M))
    with Blaster([(net.sink4, prio(0x20), 8 * M), (net.sink4, prio(0x21), 30 * M)]):
        time.sleep(0.5)
        got = rates(shaper, [0x20, 0x21], 2.0)
    assert got[0x20] == pytest.approx(5 * M, rel=0.02), got
    assert got[0x21] == pytest.approx(20 * M, rel=0.02), got
    c = shaper.counters()
    assert c[0x20].drops > 0 and c[0x20].leaf_limit == tc.leaf_limit(5 * M)


def test_node_cap_is_shared_by_net_share(shaper, net) -> None:
    cap, mn = 8 * M, 100_000
    shaper.ensure_root(node_rate=cap, link_rate=1000 * M)
    shaper.ensure_sliver(0x30, tc.ClassSpec(mn, 20 * M, share=1), tc.ClassSpec(mn, 20 * M))
    shaper.ensure_sliver(0x31, tc.ClassSpec(mn, 20 * M, share=3), tc.ClassSpec(mn, 20 * M))
    with Blaster([(net.sink4, prio(0x30), 10 * M), (net.sink4, prio(0x31), 10 * M)]):
        time.sleep(0.5)
        got = rates(shaper, [0x30, 0x31], 2.0)
    spare = cap - 2 * mn
    assert got[0x30] == pytest.approx(mn + spare / 4, rel=0.05), got
    assert got[0x31] == pytest.approx(mn + spare * 3 / 4, rel=0.05), got


def test_rate_change_in_place_resizes_the_queue(shaper, net) -> None:
    shaper.ensure_root(node_rate=100 * M, link_rate=1000 * M)
    shaper.ensure_sliver(0x40, tc.ClassSpec(100_000, 4 * M), tc.ClassSpec(100_000, 4 * M))
    send_count(net.sink4, prio(0x40), 20)
    time.sleep(0.2)                                   # let the queue drain
    before = shaper.counters()[0x40]
    shaper.set_ceil(0x40, tc.ClassSpec(100_000, 12 * M))
    after = shaper.counters()[0x40]
    assert after.ceil == 12 * M and after.leaf_limit == tc.leaf_limit(12 * M)
    assert after.packets + after.drops == before.packets + before.drops == 20  # same class
    with Blaster([(net.sink4, prio(0x40), 16 * M)]):
        time.sleep(0.4)
        got = rates(shaper, [0x40], 1.5)
    assert got[0x40] == pytest.approx(12 * M, rel=0.02)


def test_remove_leaves_no_class_qdisc_or_filter(shaper, net) -> None:
    shaper.ensure_root(node_rate=100 * M, link_rate=1000 * M)
    shaper.ensure_sliver(0x50, tc.ClassSpec(100_000, 4 * M), tc.ClassSpec(100_000, 4 * M))
    shaper.ensure_sliver(0x51, tc.ClassSpec(100_000, 4 * M), tc.ClassSpec(100_000, 4 * M))
    fd = netclass.load_exempt_program([f"{net.exempt4}/32"])
    try:
        shaper.install_exempt_filter(fd, "pl_exempt_t")
    finally:
        os.close(fd)
    assert shaper.exempt_filter_name() == "pl_exempt_t"
    shaper.remove_sliver(0x50)
    shaper.remove_sliver(0x50)   # idempotent
    classes = subprocess.run(["tc", "class", "show", "dev", net.host], capture_output=True,
                             text=True, check=True).stdout
    qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", net.host], capture_output=True,
                            text=True, check=True).stdout
    assert "1:50 " not in classes and "1:8050 " not in classes and "1:51 " in classes
    assert "50:" not in qdiscs and "8050:" not in qdiscs and "51:" in qdiscs
    shaper.remove_all()
    assert shaper.exempt_filter_name() is None
    qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", net.host], capture_output=True,
                            text=True, check=True).stdout
    assert "htb" not in qdiscs and "clsact" not in qdiscs
    assert not shaper.read().ours


def test_adopt_existing_hierarchy_without_recreating(shaper, net) -> None:
    shaper.ensure_root(node_rate=50 * M, link_rate=1000 * M)
    spec = tc.ClassSpec(100_000, 6 * M, share=2)
    shaper.ensure_sliver(0x60, spec, spec)
    send_count(net.sink4, prio(0x60), 30)
    first = shaper.read()
    with tc.Shaper(net.host) as again:        # a restarted agent
        with Blaster([(net.sink4, prio(0x60), 10 * M)]):
            time.sleep(0.3)
            adopted = again.ensure_root(node_rate=50 * M, link_rate=1000 * M)
            again.ensure_sliver(0x60, spec, spec, adopted.slivers())
            mid = again.counters()[0x60]
            time.sleep(0.3)
            end = again.counters()[0x60]
    # Re-created classes would restart their counters at 0 and lose the backlog.
    assert mid.packets > first.classes[0x60].packets
    assert end.packets > mid.packets and end.drops >= mid.drops
    assert adopted.classes[tc.CAPPED_MINOR].bytes >= first.classes[tc.CAPPED_MINOR].bytes


def _in_cgroup(path: str, fn) -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_cgroup_program_and_exempt_filter_classify(shaper, net) -> None:
    cg = f"/sys/fs/cgroup/unified/bwtest{os.getpid()}"
    os.mkdir(cg)
    try:
        shaper.ensure_root(node_rate=100 * M, link_rate=1000 * M)
        spec = tc.ClassSpec(1 * M, 50 * M)
        shaper.ensure_sliver(0x1234, spec, spec)
        netclass.classify_cgroup(cg, 0x1234)
        netclass.classify_cgroup(cg, 0x1234)      # a restart re-attaches: replaces
        fd = os.open(cg, os.O_RDONLY)
        try:
            assert netclass.prog_query_count(fd, netclass.BPF_CGROUP_INET_EGRESS) == 1
        finally:
            os.close(fd)
        prog = netclass.load_exempt_program([f"{net.exempt4}/32", f"{net.exempt6}/128"])
        try:
            shaper.install_exempt_filter(prog, "pl_exempt_t")
        finally:
            os.close(prog)

        def traffic() -> None:
            send_count(net.sink4, None, 10)
            send_count(net.exempt4, None, 7)
            send_count(net.sink6, None, 5, socket.AF_INET6)
            send_count(net.exempt6, None, 3, socket.AF_INET6)
        _in_cgroup(cg, traffic)
        send_count(net.sink4, None, 4)             # not in the cgroup: default class
        c = shaper.read().classes
        assert c[0x1234].packets == 15 and c[0x1234].bytes == 10 * WIRE_V4 + 5 * WIRE_V6
        assert c[0x1234 | tc.EXEMPT_BIT].packets == 10
        assert c[tc.DEFAULT_MINOR].packets >= 4
        netclass.unclassify_cgroup(cg)
        _in_cgroup(cg, lambda: send_count(net.sink4, None, 6))
        assert shaper.counters()[0x1234].packets == 15
        netclass.unclassify_cgroup(cg)             # idempotent
    finally:
        os.rmdir(cg)


def test_exempt_program_matches_only_its_cidrs(shaper, net) -> None:
    shaper.ensure_root(node_rate=100 * M, link_rate=1000 * M)
    spec = tc.ClassSpec(1 * M, 50 * M)
    shaper.ensure_sliver(0x70, spec, spec)
    prog = netclass.load_exempt_program([f"{net.exempt4.rsplit('.', 1)[0]}.3/32", "fd42::/16"])
    try:
        shaper.install_exempt_filter(prog, "pl_exempt_t")
    finally:
        os.close(prog)
    send_count(net.sink4, prio(0x70), 5)            # not exempt
    send_count(net.exempt4, prio(0x70), 6)          # exempt
    send_count(net.sink6, prio(0x70), 2, socket.AF_INET6)   # in fd42::/16
    send_count(net.exempt4, prio(tc.DEFAULT_MINOR), 3)      # not a sliver: unchanged
    c = shaper.read().classes
    assert c[0x70].packets == 5
    assert c[0x70 | tc.EXEMPT_BIT].packets == 8
    assert c[tc.DEFAULT_MINOR].packets >= 3


def test_bad_interface_is_named() -> None:
    with pytest.raises(OSError, match="no network interface 'nosuchif0'"):
        tc.Shaper("nosuchif0")


def test_raw_stats_dump_agrees_with_the_full_read(shaper, net) -> None:
    """The accounting pass's struct-parsed RTM_GETTCLASS dump reads the same handles,
    rates, quanta and counters as pyroute2's full read (drops and backlog too)."""
    shaper.ensure_root(node_rate=100 * M, link_rate=1000 * M)
    shaper.ensure_sliver(0x60, tc.ClassSpec(100_000, 2 * M, share=3),
                         tc.ClassSpec(200_000, 7 * M))
    shaper.ensure_sliver(0x61, tc.ClassSpec(100_000, 6 * M), tc.ClassSpec(100_000, 9 * M))
    with Blaster([(net.sink4, prio(0x60), 6 * M)]):
        time.sleep(0.5)
    send_count(net.sink6, prio(0x61), 10, socket.AF_INET6)
    # At rest: the queues (one 64 KiB GSO packet at least, ~270 ms at 2 Mbit/s) drained.
    deadline = time.monotonic() + 5
    while any(c.backlog for c in shaper.counters().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)
    full, fast = shaper.counters(), shaper.stats()
    assert set(fast) == set(full) == {0x60, 0x61, 0x8060, 0x8061}
    for m, info in full.items():
        assert fast[m] == tc.ClassInfo(**{**info.__dict__, "leaf_limit": None}), m
    assert fast[0x60].drops > 0 and fast[0x60].quantum == tc.quantum_for(3)
    assert fast[0x61].packets == 10 and fast[0x61].bytes == 10 * WIRE_V6
    assert fast[0x8060].ceil == 7 * M and fast[0x8060].parent == tc.EXEMPT_MINOR
    # And on an interface without our tree: nothing, no error.
    assert tc.dump_classes(socket.if_nametoindex("lo")) == []
