"""The /proc/net fence (kernel/procnet.py, F38): what can be checked on any kernel
(offsets from BTF, the program's shape), and, where the kernel accepts BPF LSM
programs, that a sliver cannot read any socket table under /proc."""

from __future__ import annotations

import errno

import pytest

from kernel import procnet

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]


def test_offsets_from_btf_and_program_shape() -> None:
    btf = procnet._BTF(procnet.BTF_PATH.read_bytes())
    off = procnet._offsets(btf)
    assert off["proc_inode.vfs_inode"] > off["proc_inode.pde"] >= 0
    assert off["proc_dir_entry.namelen"] > 0 and off["file.f_inode"] > 0
    assert btf.func_id(procnet.HOOK) > 0
    prog = procnet.program(off)
    assert len(prog) % 8 == 0 and 50 < len(prog) // 8 < 400
    with pytest.raises(procnet.ProcNetError):
        btf.offset("proc_dir_entry", "no_such_member")


def test_load_succeeds_or_is_refused_by_the_kernel() -> None:
    ok, why = procnet.available()
    if not ok:
        # This project's VM kernel: BTF-attached program types are refused.
        assert f"[Errno {errno.EPERM}]" in why, why


def test_no_path_under_proc_shows_sockets() -> None:
    ok, why = procnet.available()
    if not ok:
        pytest.skip(f"the kernel refuses BPF LSM programs: {why}")
    from tests.kernel.test_context_support import slivers

    with slivers() as node:
        ctx = node.create()
        procnet.fence(ctx.cgroup.path("unified") if ctx.cgroup.layout.mode == "v1"
                      else ctx.cgroup.path("cpu"))
        for path in ("/proc/net/tcp", "/proc/self/net/unix", "/proc/1/net/tcp6",
                     "/proc/thread-self/net/udp", "/proc/1/task/1/net/raw6",
                     "/proc/net/stat/arp_cache", "/proc/net/netlink"):
            rc, out, err = ctx.output(["cat", path])
            assert rc != 0 and out == b"", (path, out[:200])
        rc, out, _ = ctx.output(["cat", "/proc/self/status"])
        assert rc == 0 and out
