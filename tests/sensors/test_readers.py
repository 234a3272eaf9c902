"""Readers against real slivers (kernel.context.Context) and a real HTB class."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel import tc
from kernel.context import Context
from sensors.readers import NodeReader, SliverReader, parse_pressure
from sensors.snapshot import Snapshots, btrfs_disk_reader
from tests.kernel.test_context_support import Slivers, slivers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))
from bwnet import WIRE_V4, send_count, veth_netns  # noqa: E402

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def node() -> Iterator[Slivers]:
    with slivers(images=True) as s:
        yield s


def test_node_reader_has_every_sensor() -> None:
    r = NodeReader()
    first, second = r.read(), r.read()
    assert set(first) == set(NodeReader.SENSORS)
    assert first["memory"]["total_bytes"] > 0
    assert first["kernel"]["release"] == os.uname().release
    assert first["processes"]["total"] > 1 and first["processes"]["threads"] >= 1
    assert first["uptime"]["uptime_seconds"] > 0
    assert "busy_percent" not in first["cpu"] and 0 <= second["cpu"]["busy_percent"] <= 100


def test_pressure_parsing() -> None:
    out: dict[str, float] = {}
    parse_pressure(b"some avg10=1.50 avg60=0.25 avg300=0.00 total=2500000\n"
                   b"full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n", "io", out)
    assert out["pressure_io_some_avg10"] == 1.5
    assert out["pressure_io_some_seconds_total"] == 2.5
    assert out["pressure_io_full_seconds_total"] == 7e-6


def test_cpu_hog_and_memory_hog_show_in_their_slivers(node: Slivers) -> None:
    hog, eater, idle = (node.create(node.name(t)) for t in ("cpu", "mem", "idle"))
    reader = SliverReader()
    names = [hog.name, eater.name, idle.name]
    before = reader.read(names)
    spinner = hog.spawn(["sh", "-c", "while :; do :; done"], stdout=subprocess.DEVNULL)
    # ~39 MB of digits held in a shell variable: anonymous memory of the eater's group
    # (the last echo keeps the shell: ash would exec a last `sleep` and free x)
    grower = eater.spawn(["sh", "-c", "x=$(seq 1 5000000); echo ready ${#x}; sleep 60; echo ${#x}"],
                         stdout=subprocess.PIPE)
    try:
        assert grower.stdout is not None
        line = grower.stdout.readline()
        assert line.split()[0] == b"ready", line
        time.sleep(1.5)
        after = reader.read(names)
    finally:
        spinner.kill()
        grower.kill()
        spinner.wait(10)
        grower.wait(10)
    hog_cpu = after[hog.name]["cpu_seconds_total"] - before[hog.name]["cpu_seconds_total"]
    idle_cpu = after[idle.name]["cpu_seconds_total"] - before[idle.name]["cpu_seconds_total"]
    assert hog_cpu > 0.3, after[hog.name]
    assert idle_cpu < 0.1, after[idle.name]
    assert after[eater.name]["memory_bytes"] > before[eater.name]["memory_bytes"] + 35_000_000, \
        (line, after[eater.name])
    assert after[idle.name]["memory_bytes"] < 20_000_000
    assert after[hog.name]["processes"] >= 2      # init and the spinner
    if Path("/sys/fs/cgroup/unified/cpu.pressure").exists() or \
            Path("/sys/fs/cgroup/cpu.pressure").exists():
        assert "pressure_cpu_some_seconds_total" in after[hog.name]


def test_gone_sliver_reads_empty(node: Slivers) -> None:
    reader = SliverReader()
    assert reader.read([f"t{os.getpid()}nosuch"]) == {f"t{os.getpid()}nosuch": {}}


def test_snapshot_merges_agent_facts_cgroups_and_disk(node: Slivers) -> None:
    ctx: Context = node.create(node.name("snap"))
    ctx.run(["sh", "-c", "head -c 3000000 /dev/urandom > /root/blob; sync"])
    snaps = Snapshots(lambda: {ctx.name: {"state": "running", "slice_id": 9}},
                      disk_reader=btrfs_disk_reader(node.roots_dir))
    from kernel import disk
    disk.sync_fs(node.roots_dir)
    snap = snaps.collect_sync({ctx.name: {"state": "running", "slice_id": 9}})
    rec = snap.slivers[ctx.name]
    assert rec["state"] == "running" and rec["slice_id"] == 9
    assert rec["cpu_seconds_total"] > 0 and rec["processes"] >= 1
    assert rec["disk_used_bytes"] >= 2_900_000
    assert snap.cpu_seconds > 0


def test_traffic_shows_as_its_htb_bytes() -> None:
    minor = 0x20 + os.getpid() % 0x100
    with veth_netns("s") as net, tc.Shaper(net.host) as shaper:
        shaper.ensure_root(node_rate=100_000_000, link_rate=1_000_000_000)
        spec = tc.ClassSpec(100_000, 50_000_000)
        shaper.ensure_sliver(minor, spec, spec)
        reader = SliverReader(interfaces=[net.host])
        try:
            before = reader.htb_bytes({"pl_sender": minor, "pl_quiet": minor + 1})
            send_count(net.sink4, tc.handle(tc.MAJOR, minor), 50)
            after = reader.htb_bytes({"pl_sender": minor, "pl_quiet": minor + 1})
        finally:
            reader.close()
    assert after["pl_sender"] - before.get("pl_sender", 0) == 50 * WIRE_V4
    assert "pl_quiet" not in after       # no class: no figure, not 0


class _NoLimits:
    cpu_share, cpu_pct, mem_max, pids_max, net_cls_classid = 1, None, None, None, None


class _CountingReader(SliverReader):
    """Counts the pressure files read, per sliver group."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.pressure_reads: list[bytes] = []

    def _get(self, path: bytes) -> bytes | None:
        if path.endswith(b".pressure"):
            self.pressure_reads.append(path)
        return super()._get(path)


def test_pressure_is_read_on_its_turn_or_when_too_old() -> None:
    from kernel import cgroups
    layout = cgroups.detect_layout()
    if layout.v2 is None or not (layout.v2 / "cpu.pressure").exists():
        pytest.skip("no PSI on this kernel")
    parent = f"senspsi{os.getpid()}"
    groups = [cgroups.SliverCgroup(layout, f"p{i}", parent) for i in range(6)]
    names = [g.name for g in groups]
    try:
        for g in groups:
            g.create(_NoLimits())
        reader = _CountingReader(layout, parent, pressure_spread=3, pressure_max_age=0.5)
        first = reader.read(names)
        assert len(reader.pressure_reads) == 6 * 3          # never read: all of them
        for _ in range(3):      # then a third per collection, their values kept between
            reader.pressure_reads.clear()
            out = reader.read(names)
            assert len(reader.pressure_reads) == 2 * 3, reader.pressure_reads
            assert all("pressure_cpu_some_avg10" in out[n] for n in names)
            assert all(out[n]["memory_bytes"] >= 0 and "processes" in out[n] for n in names)
        assert set(first[names[0]]) == set(out[names[0]])
        time.sleep(0.6)         # older than pressure_max_age: every sliver again
        reader.pressure_reads.clear()
        reader.read(names)
        assert len(reader.pressure_reads) == 6 * 3
        reader.close()
    finally:
        for g in groups:
            g.destroy()
        for d in {str(d.parent) for d in groups[0].dirs()}:
            try:
                os.rmdir(d)
            except OSError:
                pass
