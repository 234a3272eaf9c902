"""Fences of issue 8 checked from inside real slivers: no nested user namespace
(F39), a bounded /dev/shm and the sliver's oom_score_adj (F34), an init that never
blocks on a file of the sliver (F40)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel import context as kctx
from kernel.context import Context, Limits
from tests.kernel.test_context_support import Slivers, slivers

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

USERNS_PROBE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/sched.h>
#include <stdint.h>
static int child(void *a) { (void)a; return 0; }
static char stack[65536];
int main(void) {
    int r = unshare(CLONE_NEWUSER);
    printf("unshare %d %d\n", r, r < 0 ? errno : 0);
    pid_t p = clone(child, stack + sizeof stack, CLONE_NEWUSER | SIGCHLD, NULL);
    printf("clone %d %d\n", p < 0 ? -1 : 0, p < 0 ? errno : 0);
    if (p > 0) waitpid(p, NULL, 0);
    struct clone_args ca; memset(&ca, 0, sizeof ca);
    ca.flags = CLONE_NEWUSER; ca.exit_signal = SIGCHLD;
    long c3 = syscall(SYS_clone3, &ca, sizeof ca);
    if (c3 == 0) _exit(0);
    printf("clone3 %d %d\n", c3 < 0 ? -1 : 0, c3 < 0 ? errno : 0);
    if (c3 > 0) waitpid((pid_t)c3, NULL, 0);
    /* plain fork and threads still work (clone without NEWUSER) */
    pid_t f = fork();
    if (f == 0) _exit(7);
    int st = 0; waitpid(f, &st, 0);
    printf("fork %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    return 0;
}
"""


@pytest.fixture(scope="module")
def node() -> Iterator[Slivers]:
    with slivers() as s:
        yield s


def sh(ctx: Context, cmd: str, user: str = "root") -> tuple[int, str, str]:
    rc, o, e = ctx.output(["sh", "-c", cmd], user=user, timeout=60)
    return rc, o.decode(), e.decode()


def test_no_nested_user_namespace(node: Slivers) -> None:
    """unshare(CLONE_NEWUSER), clone(CLONE_NEWUSER) fail with EPERM, clone3 with
    ENOSYS (libc falls back to clone); fork still works; and the sliver's own
    user.max_user_namespaces is 0, which holds without the filter too."""
    ctx = node.create(limits=Limits(mem_max=256 << 20))
    src = node.tmp / "userns.c"
    src.write_text(USERNS_PROBE)
    binary = node.tmp / "userns"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(binary), str(src)], check=True)
    dest = ctx.root / "bin" / "userns"
    dest.write_bytes(binary.read_bytes())
    os.chmod(dest, 0o755)
    rc, out, err = sh(ctx, "userns")
    assert rc == 0, (out, err)
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["unshare"] == "-1 1", out          # EPERM
    assert lines["clone"] == "-1 1", out
    assert lines["clone3"] == "-1 38", out          # ENOSYS
    assert lines["fork"] == "7", out
    rc, out, _ = sh(ctx, "cat /proc/sys/user/max_user_namespaces; "
                         "echo 5 > /proc/sys/user/max_user_namespaces; "
                         "cat /proc/sys/user/max_user_namespaces")
    assert out.split()[:1] == ["0"] and out.split()[-1] == "0", out
    # busybox unshare, as a user would try it
    rc, out, err = sh(ctx, "unshare -U true")
    assert rc != 0


def test_dev_shm_bounded_by_mem_max(node: Slivers) -> None:
    mem = 64 << 20
    ctx = node.create(limits=Limits(mem_max=mem))
    rc, out, _ = sh(ctx, "grep ' /dev/shm ' /proc/mounts")
    assert rc == 0 and f"size={mem // 2 // 1024}k" in out, out
    # Filling it stops at the bound (ENOSPC), well below the sliver's memory limit;
    # the pages stay charged to the sliver's cgroup, not to the host.
    rc, out, err = sh(ctx, "dd if=/dev/zero of=/dev/shm/fill bs=1M count=100 2>&1; true")
    rc, out, _ = sh(ctx, "ls -l /dev/shm/fill")
    assert int(out.split()[4]) <= mem // 2, out
    assert ctx.usage()["mem_bytes"] <= mem
    default = node.create(limits=Limits())
    rc, out, _ = sh(default, "grep ' /dev/shm ' /proc/mounts")
    assert f"size={kctx.SHM_DEFAULT // 1024}k" in out, out


def test_sliver_oom_score_adj_is_its_floor(node: Slivers) -> None:
    """The init and sockd sit at the sliver's floor; what the init starts sits above it,
    so at the sliver's memory limit the OOM killer takes a process before the init (a
    CI run saw the init killed while socket buffers, owned by no process, filled the
    cgroup: its rss was the largest left)."""
    ctx = node.create(limits=Limits(mem_max=128 << 20))
    floor = kctx.SLIVER_OOM_SCORE_ADJ
    assert Path(f"/proc/{ctx.init_pid}/oom_score_adj").read_text().strip() == str(floor)
    sockd = ctx.state.get("sockd_pid")
    if sockd:
        assert Path(f"/proc/{sockd}/oom_score_adj").read_text().strip() == str(floor)
    rc, out, _ = sh(ctx, "cat /proc/self/oom_score_adj; echo -1000 > /proc/self/oom_score_adj;"
                         " cat /proc/self/oom_score_adj")
    vals = out.split()
    assert vals[0] == str(floor + kctx.CHILD_OOM_STEP), out
    assert vals[-1] == str(floor + kctx.CHILD_OOM_STEP), out   # below the floor: refused


@pytest.mark.parametrize("plant", ["fifo", "dir", "zero", "bad-uid"])
def test_init_never_blocks_on_etc_passwd(node: Slivers, plant: str) -> None:
    """A FIFO (or /dev/zero, a directory, a malformed uid) at the sliver's
    /etc/passwd: entering fails quickly with an error, and the init still serves
    once the file is sane again."""
    ctx = node.create()
    good = (ctx.root / "etc/passwd").read_bytes()
    rc, _, err = sh(ctx, {"fifo": "rm /etc/passwd && mkfifo /etc/passwd",
                          "dir": "rm /etc/passwd && mkdir /etc/passwd",
                          "zero": "rm /etc/passwd && ln -s /dev/zero /etc/passwd",
                          "bad-uid": "sed -i 's/^root:x:0:/root:x:\u00b2:/' /etc/passwd",
                          }[plant])
    assert rc == 0, err
    t0 = time.monotonic()
    with pytest.raises(kctx.ContextError, match="look up user"):
        ctx.output(["true"], timeout=20)
    assert time.monotonic() - t0 < 5
    p = ctx.root / "etc/passwd"
    if p.is_dir():
        p.rmdir()
    else:
        p.unlink()
    p.write_bytes(good)
    os.chown(p, ctx.uid_base, ctx.uid_base)
    rc, out, _ = ctx.output(["id", "-u"], timeout=20)
    assert (rc, out) == (0, b"0\n")
