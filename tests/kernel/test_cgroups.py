"""kernel/cgroups.py: layout detection (pure) and sliver groups on the real kernel."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.cgroups import Layout, SliverCgroup, detect_layout, ensure_net_cls
from kernel.context import Limits

HYBRID = """\
sysfs /sys sysfs rw 0 0
tmpfs /sys/fs/cgroup tmpfs rw,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""

COMOUNTED = """\
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
"""


def test_detect_hybrid_layout_from_text() -> None:
    lay = detect_layout(HYBRID)
    assert lay.mode == "v1"
    assert lay.v1["cpu"] == Path("/sys/fs/cgroup/cpu")
    assert lay.v1["memory"] == Path("/sys/fs/cgroup/memory")
    assert "systemd" not in lay.v1 and lay.v2 == Path("/sys/fs/cgroup/unified")
    assert "cgroup v1" in lay.describe()


def test_detect_comounted_and_v2_only(tmp_path: Path) -> None:
    lay = detect_layout(COMOUNTED)
    assert lay.v1["cpu"] == lay.v1["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    v2 = detect_layout(f"cgroup2 {tmp_path} cgroup2 rw 0 0\n")
    assert v2.mode == "v2" and v2.v2 == tmp_path and v2.v1 == {}
    (tmp_path / "cgroup.controllers").write_text("io\n")
    with pytest.raises(OSError, match="lacks controllers"):
        detect_layout(f"cgroup2 {tmp_path} cgroup2 rw 0 0\n")
    with pytest.raises(OSError, match="no usable cgroup"):
        detect_layout("proc /proc proc rw 0 0\n")


def test_v2_group_paths_are_one_directory(tmp_path: Path) -> None:
    cg = SliverCgroup(Layout("v2", {}, tmp_path), "s1")
    assert cg.dirs() == [tmp_path / "planetlab" / "s1"]
    assert cg.v2_path == "/planetlab/s1"
    with pytest.raises(ValueError, match="bad cgroup name"):
        SliverCgroup(Layout("v2", {}, tmp_path), "../x")


@pytest.fixture
def group() -> Iterator[SliverCgroup]:
    cg = SliverCgroup(ensure_net_cls(detect_layout()), f"cgtest{os.getpid()}")
    try:
        yield cg
    finally:
        cg.destroy()


@pytest.mark.kernel
def test_limits_written_and_updated_in_place(group: SliverCgroup) -> None:
    group.create(Limits(cpu_share=3, cpu_pct=50, mem_max=64 << 20, pids_max=20,
                        net_cls_classid=0x10005))
    lay = group.layout
    if lay.mode == "v1":
        assert (group.path("cpu") / "cpu.shares").read_text().strip() == "3072"
        assert (group.path("cpu") / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (group.path("memory") / "memory.limit_in_bytes").read_text().strip() \
            == str(64 << 20)
        assert (group.path("pids") / "pids.max").read_text().strip() == "20"
        assert (group.path("net_cls") / "net_cls.classid").read_text().strip() \
            == str(0x10005)
        assert all(d.is_dir() for d in group.dirs())
        assert group.path("unified").is_dir()
    else:
        d = group.path("cpu")
        assert (d / "cpu.weight").read_text().strip() == "300"
        assert (d / "cpu.max").read_text().split() == ["50000", "100000"]
    group.apply(Limits(cpu_share=1, cpu_pct=None, mem_max=None, pids_max=None))
    if lay.mode == "v1":
        assert (group.path("cpu") / "cpu.shares").read_text().strip() == "1024"
        assert (group.path("cpu") / "cpu.cfs_quota_us").read_text().strip() == "-1"
        assert (group.path("pids") / "pids.max").read_text().strip() == "max"
    with pytest.raises(FileExistsError):
        SliverCgroup(group.layout, group.name).create(Limits())
    assert group.exists()      # the failed second create removed nothing of ours


@pytest.mark.kernel
def test_attach_freeze_thaw_usage_destroy(group: SliverCgroup) -> None:
    group.create(Limits(pids_max=10))
    proc = subprocess.Popen(["sleep", "60"])
    try:
        group.attach(proc.pid)
        assert proc.pid in group.pids()
        assert group.usage()["pids"] == 1
        group.freeze()
        assert group.frozen()
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state in ("D", "S")     # frozen tasks sleep in the freezer
        group.thaw()
        assert not group.frozen()
        use = group.usage()
        assert use["mem_bytes"] >= 0 and use["cpu_usec"] >= 0
        group.freeze()
        group.destroy()                # kills (a frozen task too) and removes
        assert proc.wait(10) == -signal.SIGKILL
        assert not group.exists()
        group.destroy()                # idempotent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.kernel
def test_bad_limits_rejected(group: SliverCgroup) -> None:
    with pytest.raises(ValueError, match="cpu_pct"):
        group.create(Limits(cpu_pct=100000))
    assert not group.exists()


def test_v2_only_layout_writes_the_v2_files(tmp_path: Path) -> None:
    """The v2 branch, on a plain directory standing in for cgroupfs (no v2-only
    machine here): which files get which values, and where usage comes from."""
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    (tmp_path / "planetlab").mkdir()
    (tmp_path / "planetlab" / "cgroup.controllers").write_text("cpuset cpu memory pids\n")
    (tmp_path / "planetlab" / "cgroup.subtree_control").write_text("")
    cg = SliverCgroup(Layout("v2", {}, tmp_path), f"v2t{os.getpid()}", parent="planetlab")
    cg.create(Limits(cpu_share=3, cpu_pct=50, mem_max=1 << 30, pids_max=99))
    g = tmp_path / "planetlab" / cg.name
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory +pids"
    assert (tmp_path / "planetlab" / "cgroup.subtree_control").read_text() \
        == "+cpu +cpuset +memory +pids"
    assert (g / "cpu.weight").read_text() == "300"
    assert (g / "cpu.max").read_text() == "50000 100000"
    assert (g / "memory.max").read_text() == str(1 << 30)
    assert (g / "pids.max").read_text() == "99"
    cg.apply(Limits())
    assert (g / "cpu.max").read_text() == "max 100000"
    assert (g / "memory.max").read_text() == "max"
    (g / "cpu.stat").write_text("usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n")
    (g / "memory.current").write_text("4096\n")
    (g / "pids.current").write_text("3\n")
    assert cg.usage() == {"cpu_usec": 1234, "mem_bytes": 4096, "pids": 3}
    (g / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    cg.freeze(timeout=1)
    assert (g / "cgroup.freeze").read_text() == "1" and cg.frozen()
    cg.thaw()
    assert (g / "cgroup.freeze").read_text() == "0"


@pytest.mark.kernel
def test_parent_limits_keep_node_headroom() -> None:
    """F41: the node-wide parent is capped below pid_max and RAM, hierarchically."""
    import os

    from kernel.cgroups import detect_layout, limit_parent, node_budget

    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    pids, mem = node_budget(4096, 1 << 30)
    assert pids == pid_max - 4096 and 0 < mem
    layout = detect_layout()
    parent = f"plpar{os.getpid()}"
    files = limit_parent(layout, parent, pids, mem)
    try:
        assert Path(files[0]).read_text().strip() == str(pids)
        assert int(Path(files[1]).read_text().strip()) <= mem
        with pytest.raises(ValueError):
            node_budget(pid_max, 0)
    finally:
        for d in {m / parent for m in layout.v1.values()} | (
                {layout.v2 / parent} if layout.v2 is not None else set()):
            if d.is_dir():
                d.rmdir()
