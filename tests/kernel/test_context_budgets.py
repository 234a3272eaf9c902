"""Kernel budgets a sliver must not be able to take from the node or other slivers.

- What is made in a user namespace (inotify instances, nested namespaces) is charged at
  the host level to the namespace's owner: slivers' namespaces are owned by their own
  base uid, so a sliver exhausting its budget leaves host root's and other slivers'.
- Kernel keys are charged to host uids and not to the sliver's memory cgroup: the
  sliver filter refuses the keyring calls, with the guard and without it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.context import Context, GuardSpec
from kernel.seccomp import guard_filter
from tests.kernel.test_context_support import Slivers

pytestmark = pytest.mark.kernel

PROBE_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "inotify") == 0) {   /* take all we may, then hold */
        int n = 0;
        while (inotify_init1(IN_CLOEXEC) >= 0) n++;
        printf("%d %d\n", n, errno);
        fflush(stdout);
        char c;
        while (read(0, &c, 1) > 0) ;
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "addkey") == 0) {
        long r = syscall(SYS_add_key, "user", "k", "v", 1, -3 /* session keyring */);
        printf("%ld %d\n", r, r < 0 ? errno : 0);
        r = syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3, 1);
        printf("%ld %d\n", r, r < 0 ? errno : 0);
        return 0;
    }
    return 2;
}
"""

NS_GET_OWNER_UID = 0xB704   # _IO(0xb7, 0x4)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("budgets")
    (d / "probe.c").write_text(PROBE_C)
    subprocess.run(["gcc", "-O2", "-static", "-o", str(d / "probe"), str(d / "probe.c")],
                   check=True, timeout=120)
    return d / "probe"


@pytest.fixture
def slivers() -> Iterator[Slivers]:
    sl = Slivers()
    try:
        yield sl
    finally:
        sl.close()


def install(ctx: Context, probe: Path) -> None:
    dest = Path(ctx.root) / "bin" / "probe"
    dest.write_bytes(probe.read_bytes())
    dest.chmod(0o755)


def userns_owner(pid: int) -> int:
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, NS_GET_OWNER_UID, buf, True)
        return int(struct.unpack("I", buf)[0])
    finally:
        os.close(fd)


def host_inotify_ok() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        return False
    os.close(fd)
    return True


def test_a_sliver_owns_its_user_namespace_and_its_budgets(slivers: Slivers,
                                                          probe: Path) -> None:
    a, b = slivers.create(), slivers.create()
    for ctx in (a, b):
        assert userns_owner(ctx.init_pid) == ctx.uid_base
        install(ctx, probe)
    hog = a.spawn(["/bin/probe", "inotify"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert hog.stdout is not None
        count, err = hog.stdout.readline().split()
        assert int(count) > 0 and int(err) == errno.EMFILE   # A reached its own limit
        assert host_inotify_ok(), "host root's inotify budget was taken by a sliver"
        rc, out, _ = b.output(["/bin/sh", "-c", "/bin/probe inotify </dev/null"], timeout=30)
        assert rc == 0 and int(out.split()[0]) > 0, out   # and B has its own
    finally:
        hog.kill()
        hog.wait()


@pytest.mark.parametrize("guarded", [True, False], ids=["guard", "no_guard"])
def test_keyring_calls_are_refused(slivers: Slivers, probe: Path, guarded: bool) -> None:
    import socket

    kw: dict[str, object] = {}
    ends: list[socket.socket] = []
    if guarded:
        agent_end, sink = socket.socketpair()
        ends += [agent_end, sink]
        kw["guard"] = GuardSpec(filter=guard_filter(), listener_sink=sink.fileno())
    try:
        ctx = slivers.create(**kw)
        install(ctx, probe)
        rc, out, _ = ctx.output(["/bin/probe", "addkey"], timeout=30)
        lines = [ln.split() for ln in out.decode().splitlines()]
        assert lines == [["-1", str(errno.ENOSYS)], ["-1", str(errno.ENOSYS)]], out
        # and without a guard the filter still refuses foreign architectures etc.
        status = Path(f"/proc/{ctx.init_pid}/status").read_text()
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
    finally:
        for s in ends:
            s.close()


def test_a_sliver_stopping_everything_cannot_wedge_its_init(slivers: Slivers) -> None:
    """Root in a sliver can SIGSTOP every process it may signal, and so a process the
    init forks before its exec: the init gives up on it (and goes on serving and
    reaping) instead of waiting for ever, and the caller gets an error."""
    import time

    from kernel.context import ContextError

    ctx = slivers.create()
    hog = ctx.spawn(["/bin/sh", "-c", "while :; do kill -STOP -1 2>/dev/null; done"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        refused = None
        for _ in range(20):
            t0 = time.monotonic()
            try:
                ctx.output(["/bin/true"], timeout=3)
            except subprocess.TimeoutExpired:
                continue   # it won the race, exec'd, and was stopped after: try again
            except ContextError as exc:
                refused = exc
                break
        assert refused is not None and "stopped before its exec" in str(refused)
        assert time.monotonic() - t0 < 30
    finally:
        hog.kill()
        hog.wait()
    rc, out, _ = ctx.output(["/bin/echo", "still-serving"], timeout=30)
    assert rc == 0 and out == b"still-serving\n"


def test_planted_symlinks_do_not_redirect_the_next_setup(slivers: Slivers,
                                                         tmp_path: Path) -> None:
    """A sliver's root outlives its context (a restart makes a new one on it): /proc and
    /dev replaced by symlinks to host paths are real directories again at setup."""
    from kernel.context import Limits

    ctx = slivers.create()
    root, base, name = Path(ctx.root), ctx.uid_base, ctx.name
    ctx.destroy()
    slivers.contexts.remove(ctx)
    target = tmp_path / "host-dir"
    target.mkdir()
    for d in ("proc", "dev"):
        os.rmdir(root / d)
        (root / d).symlink_to(target)
    again = Context.create(slivers.run_dir, name, root, base, limits=Limits())
    slivers.contexts.append(again)
    for d in ("proc", "dev"):
        assert (root / d).is_dir() and not (root / d).is_symlink()
    rc, out, _ = again.output(["/bin/sh", "-c", "cat /proc/1/comm; ls /dev/null"], timeout=30)
    assert rc == 0 and out.split() == [b"sliver-init", b"/dev/null"], out
    assert list(target.iterdir()) == []
