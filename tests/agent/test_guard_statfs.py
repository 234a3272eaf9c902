"""statfs/fstatfs in a guarded sliver report its own disk limit (issue 15: `df`
inside a sliver shows disk_max; agent.guard.statfs), through real slivers on the
node's btrfs layer store with the agent's filter, guard and probes."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import prctl
import pytest
import trio

from agent.guard import Guard, PortService, recv_guard_fds, sockd_of
from agent.guard.service import GuardService
from agent.guard.statfs import USAGE_TTL, sliver_disks
from agent.ports import PortTable, read_ephemeral_range
from kernel import disk, rootfs
from kernel.context import Context, GuardSpec
from kernel.fsview import OVERLAYFS_SUPER_MAGIC
from tests.kernel.test_context_support import Slivers, slivers

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]

PROBE = Path(__file__).resolve().parents[2] / "kernel" / "bin" / "guard-probe"
PROC_SUPER_MAGIC = 0x9FA0


@pytest.fixture
def sl() -> Iterator[Slivers]:
    if not PROBE.exists():
        pytest.fail(f"{PROBE} missing: run `make native`")
    was = prctl.get_child_subreaper()
    try:
        with slivers(images=True) as s:
            yield s
    finally:
        prctl.set_child_subreaper(was)


def guarded(sl: Slivers, tag: str, disk_max_kib: int | None) -> tuple[Context, int, int]:
    """A sliver on the layer store with the agent's own filter: (ctx, listener, sockd)."""
    agent_end, sink = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        ctx = sl.create(sl.name(tag), guard=GuardSpec(filter=GuardService.filter(),
                                                      listener_sink=sink.fileno()),
                        disk_max_kib=disk_max_kib)
        listener, chan = recv_guard_fds(agent_end)
        assert chan is not None
        os.close(chan)
    finally:
        agent_end.close()
        sink.close()
    shutil.copy(PROBE, ctx.root / "bin" / "guard-probe")
    os.chmod(ctx.root / "bin" / "guard-probe", 0o755)
    chan = sockd_of(ctx.init_pid)
    assert chan is not None
    return ctx, listener, chan


def guard_for(sl: Slivers, tmp_path: Path, *ctxs: Context) -> Guard:
    by_name = {c.name: c for c in ctxs}
    return Guard(PortService(PortTable([], read_ephemeral_range())), tmp_path / "guard",
                 lambda n: (by_name[n].uid_base, 65536) if n in by_name else None,
                 lambda n: by_name[n].cgroup.dirs() if n in by_name else [],
                 sliver_disks(sl.roots_dir))


async def supervise(nursery: trio.Nursery, guard: Guard, ctx: Context, listener: int,
                    chan: int) -> None:
    guard.set_sockd(ctx.name, chan)
    await nursery.start(guard.supervise, ctx.name, listener)


async def sh(ctx: Context, cmd: str, user: str = "root") -> str:
    rc, out, err = await trio.to_thread.run_sync(
        lambda: ctx.output(["/bin/sh", "-c", cmd], user, timeout=60))
    assert rc == 0, (cmd, rc, out, err)
    return out.decode()


async def statfs(ctx: Context, path: str, call: str = "statfs", cwd: str = "/",
                 user: str = "root") -> list[int]:
    """[errno, f_type, f_bsize, f_frsize, f_blocks, f_bfree, f_bavail, f_files]."""
    words = (await sh(ctx, f"cd {cwd} && /bin/guard-probe {call} '{path}'", user)).split()
    assert words[0] == call, words
    return [int(words[1]), *(int(w, 16 if i == 0 else 10) for i, w in enumerate(words[2:]))]


async def df_kib(ctx: Context, cwd: str = "/") -> tuple[int, int, int]:
    """(total, used, available) KiB of `df -k .` (busybox) run in `cwd`."""
    line = (await sh(ctx, f"cd {cwd} && df -k .")).splitlines()[-1].split()
    return int(line[1]), int(line[2]), int(line[3])


def used_kib(sl: Slivers, ctx: Context) -> int:
    layer = disk.layers_dir(sl.roots_dir) / ctx.name
    return disk.qgroup_usage(layer, disk.subvol_id(layer))[0] // 1024


async def settle() -> None:
    await trio.sleep(USAGE_TTL + 0.1)   # the guard's cached figures expire


async def test_df_shows_the_disk_max_and_its_free_space(sl: Slivers, tmp_path: Path) -> None:
    a, la, ca = guarded(sl, "d", 8192)
    guard = guard_for(sl, tmp_path, a)
    async with trio.open_nursery() as nursery:
        await supervise(nursery, guard, a, la, ca)
        await sh(a, "sync")
        await settle()
        total, used, avail = await df_kib(a)
        assert total == 8192
        assert abs(avail - (8192 - used_kib(sl, a))) <= 4, (total, used, avail)
        # Every way of naming the root filesystem says the same: a lower-layer file by
        # fd, a relative path, a directory the sliver wrote (an upper-layer one).
        for path, call in (("/etc/passwd", "fstatfs"), ("/bin", "statfs"),
                           ("/root", "statfs")):
            got = await statfs(a, path, call)
            assert got[0] == 0 and got[1] == OVERLAYFS_SUPER_MAGIC, (path, got)
            assert got[4] * got[3] == 8192 * 1024 and got[5] == got[6], (path, got)
        assert (await df_kib(a, "/etc"))[0] == 8192
        assert (await statfs(a, "../bin", cwd="/etc"))[4] * 4096 == 8192 * 1024
        assert (await statfs(a, "self", cwd="/proc"))[1] == PROC_SUPER_MAGIC
        # Writing 2 MiB takes about that much off what df says is free.
        await sh(a, "dd if=/dev/urandom of=/big bs=1024 count=2048 2>/dev/null; sync")
        await settle()
        _, _, after = await df_kib(a)
        assert 2048 - 128 <= avail - after <= 2048 + 256, (avail, after)
        # Other filesystems are the kernel's answer (CONTINUE).
        proc = await statfs(a, "/proc")
        assert proc[:2] == [0, PROC_SUPER_MAGIC]
        for path in ("/dev", "/tmp"):
            got = await statfs(a, path)
            assert got[0] == 0
            if got[1] == OVERLAYFS_SUPER_MAGIC:   # part of the root fs: its limit
                assert got[4] * got[3] == 8192 * 1024
            else:
                assert got[4] * got[3] != 8192 * 1024, (path, got)
        # disk_max changed in place: the next answer has it; removed: the store's.
        rootfs.set_disk_limit(sl.roots_dir, a.name, 16384)
        await settle()
        assert (await df_kib(a))[0] == 16384
        rootfs.set_disk_limit(sl.roots_dir, a.name, None)
        await settle()
        store = os.statvfs(disk.layers_dir(sl.roots_dir))
        assert (await df_kib(a))[0] == store.f_blocks * store.f_frsize // 1024
        assert guard.statfs.answered >= 6
        nursery.cancel_scope.cancel()


async def test_a_sliver_without_a_limit_sees_the_store(sl: Slivers, tmp_path: Path) -> None:
    a, la, ca = guarded(sl, "n", None)
    guard = guard_for(sl, tmp_path, a)
    async with trio.open_nursery() as nursery:
        await supervise(nursery, guard, a, la, ca)
        store = os.statvfs(disk.layers_dir(sl.roots_dir))
        assert (await df_kib(a))[0] == store.f_blocks * store.f_frsize // 1024
        assert guard.statfs.answered == 0
        nursery.cancel_scope.cancel()


async def test_paths_resolve_in_the_sliver_and_bad_buffers_fault(
        sl: Slivers, tmp_path: Path) -> None:
    """Attacks: symlinks to host paths, "..", /proc magic links, bad buffers, paths
    with no NUL: nothing is resolved outside the sliver, nothing reaches the host's
    figures, and the errors are the kernel's."""
    a, la, ca = guarded(sl, "x", 8192)
    guard = guard_for(sl, tmp_path, a)
    host_only = sl.tmp   # exists on the host, not in the sliver
    async with trio.open_nursery() as nursery:
        await supervise(nursery, guard, a, la, ca)
        await sh(a, f"ln -s {host_only} /tohost; ln -s /etc /toetc; "
                    "ln -s ../../../../../../.. /etc/up; mkdir -p /d/e")
        # An absolute symlink is the sliver's: a host-only target does not exist...
        assert (await statfs(a, "/tohost"))[0] == 2
        assert (await statfs(a, f"{host_only}"))[0] == 2
        # ...and one to a path both have is the sliver's own (its limit).
        for path in ("/toetc", "/etc/up", "/../../..", "/etc/up/tohost/..", "d/../d/e"):
            got = await statfs(a, path)
            if path == "/etc/up/tohost/..":   # a dangling component: the kernel's ENOENT
                assert got[0] == 2, (path, got)
                continue
            assert got[0] == 0 and got[4] * got[3] == 8192 * 1024, (path, got)
        # Magic links are not followed by the guard: the kernel answers in the
        # sliver's view (its root's store figures), never the host's root fs; the
        # sliver's init is not the caller's to look into (EACCES, the kernel's).
        assert (await statfs(a, "/proc/1/root"))[0] == 13
        for path in ("/proc/self/root/etc", "/proc/self/cwd"):
            got = await statfs(a, path)
            assert got[0] == 0 and got[1] == OVERLAYFS_SUPER_MAGIC, (path, got)
        # Buffers: NULL, read-only, the text segment: EFAULT as from the kernel; a path
        # with no NUL in PATH_MAX: ENAMETOOLONG; one running into an unmapped page: EFAULT.
        out = dict(line.split() for line in (await sh(a, "/bin/guard-probe statfs-bad /"))
                   .splitlines())
        assert out == {"null": "14", "readonly": "14", "text": "14", "toolong": "36",
                       "unterminated": "14"}, out
        nursery.cancel_scope.cancel()


async def test_paths_resolve_with_the_callers_permissions(
        sl: Slivers, tmp_path: Path) -> None:
    """The guard looks a path up with the caller's filesystem ids, not the agent's: a
    sliver user gets the kernel's EACCES under a directory it may not search (the
    existence of what is inside is not told), while its owner gets the limit."""
    a, la, ca = guarded(sl, "p", 8192)
    guard = guard_for(sl, tmp_path, a)
    async with trio.open_nursery() as nursery:
        await supervise(nursery, guard, a, la, ca)
        await sh(a, "mkdir -m 700 /priv && mkdir /priv/sub && "
                    "echo 'u1:x:1000:1000::/:/bin/sh' >> /etc/passwd && "
                    "echo 'u1:x:1000:' >> /etc/group")
        for path in ("/priv/sub", "/priv/none"):
            got = await statfs(a, path, user="u1")
            assert got[0] == 13, (path, got)      # the kernel's EACCES, both alike
        got = await statfs(a, "/etc", user="u1")
        assert got[0] == 0 and got[4] * got[3] == 8192 * 1024, got
        got = await statfs(a, "/priv/sub")        # root of the sliver owns /priv
        assert got[0] == 0 and got[4] * got[3] == 8192 * 1024, got
        assert guard.statfs.answered >= 2
        nursery.cancel_scope.cancel()


async def test_a_statfs_flood_slows_no_other_slice(sl: Slivers, tmp_path: Path) -> None:
    """Slice A statfs()es its root from 4 processes (each call a Python answer): its
    notifications beyond its CPU budget wait in the kernel; slice B's bind latency
    (p50) moves by less than 2x (as for the bind flood, F36)."""
    from tests.agent.test_guard_context import free_port
    a, la, ca = guarded(sl, "fa", 8192)
    b, lb, cb = guarded(sl, "fb", 8192)
    guard = guard_for(sl, tmp_path, a, b)
    tcp = free_port(False) + 1
    guard.ports.reserve(b.name, f"tcp:{tcp}")
    async with trio.open_nursery() as nursery:
        await supervise(nursery, guard, a, la, ca)
        await supervise(nursery, guard, b, lb, cb)
        base = (await sh(b, f"/bin/guard-probe lat 300 127.0.0.1 {tcp}")).split()
        flood_out: list[str] = []

        async def flood() -> None:
            flood_out.extend((await sh(a, "/bin/guard-probe sflood 4 4 /")).split())
        # (counted over the whole flood: one rest may span B's whole measurement)
        throttled0 = guard.stats.throttled
        nursery.start_soon(flood)
        await trio.sleep(0.5)
        under = (await sh(b, f"/bin/guard-probe lat 300 127.0.0.1 {tcp}")).split()
        while not flood_out:
            await trio.sleep(0.1)
        throttled = guard.stats.throttled - throttled0
        nursery.cancel_scope.cancel()
    print(f"B's bind p50/p90/max us alone {base[1:4]}, under A's statfs flood {under[1:4]}; "
          f"flood statfs {flood_out[1]}; answered {guard.statfs.answered}; throttled "
          f"{throttled}; {guard.stats}")
    assert base[4] == under[4] == "0"
    assert int(flood_out[1]) > 0 and guard.statfs.answered > 0
    assert throttled > 0
    assert int(under[1]) < 2 * max(int(base[1]), 100), (base, under)
