"""Contexts on the real kernel: namespaces, root, /dev, caps, rlimits, enter, freeze,
adopt, destroy, error paths, and the seccomp guard path of the init."""

from __future__ import annotations

import errno
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel import caps, cbpf
from kernel import seccomp as sc
from kernel.cgroups import SliverCgroup, detect_layout
from kernel.context import (
    GUARD_LISTENER_FD,
    Context,
    ContextError,
    GuardSpec,
    Limits,
)
from kernel.ns import SLIVER_NAMESPACES, ns_ids
from tests.kernel.test_context_support import (
    Slivers,
    leftovers,
    processes_with,
    slivers,
    unique_uid_base,
)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]


@pytest.fixture
def sl() -> Iterator[Slivers]:
    with slivers() as s:
        yield s


@pytest.fixture
def ctx(sl: Slivers) -> Context:
    return sl.create()


def out(ctx: Context, cmd: str, user: str = "root") -> str:
    rc, o, e = ctx.output(["sh", "-c", cmd], user=user)
    assert rc == 0, (cmd, rc, o, e)
    return o.decode()


def test_identity_namespaces_hostname(ctx: Context) -> None:
    assert out(ctx, "id -u; id -g; hostname").split() == ["0", "0", ctx.name]
    # Outside, the init is the range's base uid, not root.
    status = Path(f"/proc/{ctx.init_pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(ctx.uid_base)] * 4
    host, mine = ns_ids(), ns_ids(ctx.init_pid)
    for kind in SLIVER_NAMESPACES:
        assert host[kind] != mine[kind], kind
    # A network namespace of its own (F38: its /proc/net shows no node socket); the
    # IP sockets it makes live in the node's (sockd, tests/kernel/test_procnet.py).
    assert host["net"] != mine["net"]
    # PID 1 inside is the init; the only other processes are our own.
    pids = out(ctx, "ls /proc | grep -E '^[0-9]+$'").split()
    assert "1" in pids and len(pids) <= 4
    # Its command line shows no host path (root, cgroups, the binary's location), only
    # what the host's tools find it by.
    cmdline = out(ctx, "cat /proc/1/cmdline | tr '\\0' ' '").split()
    assert cmdline == ["sliver-init", f"--hostname={ctx.name}"]
    assert Path(f"/proc/{ctx.init_pid}/exe").resolve() == \
        Path(__file__).resolve().parents[2] / "kernel/bin/sliver-init"
    maps = Path(f"/proc/{ctx.init_pid}/uid_map").read_text().split()
    assert maps == ["0", str(ctx.uid_base), "65536"]


def test_root_dev_and_no_host_view(ctx: Context) -> None:
    listing = set(out(ctx, "ls /").split())
    assert "work" not in listing and "bin" in listing
    mounts = out(ctx, "cat /proc/mounts")
    targets = [line.split()[1] for line in mounts.splitlines()]
    assert set(targets) == {"/", "/proc", "/dev", "/dev/null", "/dev/zero", "/dev/full",
                            "/dev/random", "/dev/urandom", "/dev/tty", "/dev/pts", "/dev/shm"}
    devs = set(out(ctx, "ls /dev").split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm"} <= devs
    assert out(ctx, "echo x > /dev/null && head -c 4 /dev/zero | wc -c").strip() == "4"
    assert out(ctx, "head -c 16 /dev/urandom | wc -c").strip() == "16"
    # /dev/full refuses writes; /dev/shm is writable; devpts is a fresh instance.
    rc, _, err = ctx.output(["sh", "-c", "echo x > /dev/full"])
    assert rc != 0 and b"space" in err.lower()
    assert out(ctx, "echo hi > /dev/shm/f && cat /dev/shm/f").strip() == "hi"
    assert out(ctx, "ls /dev/pts").split() == ["ptmx"]
    # The host's /proc is not visible: /proc/1 is our init, and no host pid exists.
    assert not out(ctx, f"ls -d /proc/{os.getpid()} 2>/dev/null || true").strip()


def test_caps_default_bounding_set_and_no_new_privs(ctx: Context) -> None:
    status = out(ctx, "cat /proc/self/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["CapBnd"], 16) == caps.bounding_mask(None)
    assert int(fields["CapBnd"], 16) & (1 << caps.CAPS["sys_module"]) == 0
    assert int(fields["CapBnd"], 16) & (1 << caps.CAPS["sys_admin"]) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    # Without sys_chroot-free... the default keeps what a userland needs:
    assert out(ctx, "chown 1000:1000 /tmp && stat -c %u /tmp").strip() == "1000"


def test_custom_capabilities_and_rlimits(sl: Slivers) -> None:
    ctx = sl.create(limits=Limits(capabilities=("kill", "CAP_CHOWN"),
                                  rlimits={"nofile": (100, 200), "core": (0, -1)}))
    status = out(ctx, "cat /proc/self/status")
    bnd = next(line for line in status.splitlines() if line.startswith("CapBnd"))
    assert int(bnd.split()[1], 16) == (1 << 5) | (1 << 0)
    assert out(ctx, "ulimit -n").strip() == "100"
    limits = out(ctx, "cat /proc/self/limits")
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    assert line.split()[3:5] == ["100", "200"]
    # Without dac_override and fowner, root inside cannot write a user's 0700 dir.
    rc, _, _ = ctx.output(["sh", "-c", "touch /home/user/x"])
    assert out(ctx, "stat -c %u /home/user").strip() == "1000"
    assert rc != 0


def test_bad_capability_and_limits_are_refused_before_anything(sl: Slivers) -> None:
    with pytest.raises(ValueError, match="unknown capability 'frobnicate'"):
        sl.create(limits=Limits(capabilities=("frobnicate",)))
    with pytest.raises(ValueError, match="unknown rlimit 'bogus'"):
        sl.create(limits=Limits(rlimits={"bogus": (1, 1)}))
    with pytest.raises(ValueError, match="cpu_pct"):
        sl.create(limits=Limits(cpu_pct=0))
    assert Context.list(sl.run_dir) == []


def test_run_as_user_env_cwd_stdin_and_signals(ctx: Context) -> None:
    assert out(ctx, "id -u; id -g; echo $HOME", user="user").split() == \
        ["1000", "1000", "/home/user"]
    rc, o, _ = ctx.output(["cat"], input=b"through stdin")
    assert (rc, o) == (0, b"through stdin")
    proc = ctx.spawn(["env"], env={"A": "b"}, cwd="/tmp", stdout=subprocess.PIPE)
    o2, _ = proc.communicate(timeout=10)
    assert o2.decode().split() == ["A=b"] and proc.returncode == 0
    assert ctx.run(["sh", "-c", "exit 7"], stdout=subprocess.DEVNULL) == 7
    with pytest.raises(ContextError, match="look up user"):
        ctx.run(["true"], user="nosuchuser")
    with pytest.raises(ContextError, match="exec"):
        ctx.run(["/no/such/program"])
    sleeper = ctx.spawn(["sleep", "60"], stdout=subprocess.DEVNULL)
    assert sleeper.pid > 1 and sleeper.poll() is None
    sleeper.terminate()
    assert sleeper.wait(10) == -15


def test_tty(ctx: Context) -> None:
    proc = ctx.spawn(["sh", "-c", "tty; stty size; echo done"], tty=True, winsize=(33, 99))
    assert proc.master is not None
    data = b""
    deadline = time.monotonic() + 10
    while b"done" not in data and time.monotonic() < deadline:
        r, _, _ = select.select([proc.master], [], [], 1)
        if r:
            try:
                data += os.read(proc.master, 1024)
            except OSError:
                break
    assert proc.wait(10) == 0
    lines = data.decode().split()
    assert lines[0].startswith("/dev/pts/") and lines[1:3] == ["33", "99"]
    proc.close()


def test_stop_freezes_everything_and_start_thaws(ctx: Context) -> None:
    hog = ctx.spawn(["sh", "-c", "while :; do :; done"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        ctx.stop()
        assert ctx.frozen()
        u0 = ctx.usage()["cpu_usec"]
        time.sleep(0.3)
        assert ctx.usage()["cpu_usec"] - u0 < 5000     # frozen: no CPU at all
        with pytest.raises(ContextError, match="stopped"):
            ctx.run(["true"])
        ctx.start()
        assert not ctx.frozen()
        u1 = ctx.usage()["cpu_usec"]
        time.sleep(0.3)
        assert ctx.usage()["cpu_usec"] - u1 > 50_000
        assert ctx.usage()["pids"] == 3                 # init, its sockd, the hog
    finally:
        hog.kill()
        hog.wait(10)


def test_adopt_and_list(sl: Slivers, ctx: Context) -> None:
    assert Context.list(sl.run_dir) == [ctx.name]
    again = Context.adopt(sl.run_dir, ctx.name)
    assert again.init_pid == ctx.init_pid and again.uid_base == ctx.uid_base
    assert again.output(["hostname"])[1].strip() == ctx.name.encode()
    again.update_limits(Limits(pids_max=77))
    assert Context.adopt(sl.run_dir, ctx.name).limits.pids_max == 77
    assert (again.cgroup.path("pids") / "pids.max").read_text().strip() == "77"
    with pytest.raises(FileNotFoundError, match="no context"):
        Context.adopt(sl.run_dir, "nosuch")


def test_destroy_leaves_nothing(sl: Slivers) -> None:
    ctx = sl.create()
    bg = ctx.spawn(["sh", "-c", "sleep 100 & sleep 100"], stdout=subprocess.DEVNULL)
    ctx.stop()     # destroy must work on a frozen context too
    inodes = set(ns_ids(ctx.init_pid)[k] for k in SLIVER_NAMESPACES)
    dirs = ctx.cgroup.dirs()
    assert all(d.exists() for d in dirs)
    ctx.destroy()
    assert bg.wait(10) == -9
    bg.close()
    assert leftovers(ctx.name, ctx.init_pid, inodes, sl.run_dir, dirs) == []
    assert processes_with(f"--hostname={ctx.name}") == []
    ctx.destroy()                 # idempotent
    with pytest.raises(FileNotFoundError):
        Context.adopt(sl.run_dir, ctx.name)


def _assert_nothing_for(sl: Slivers, name: str) -> None:
    assert not (sl.run_dir / name).exists()
    assert not SliverCgroup(detect_layout(), name).exists()
    assert processes_with(f"--hostname={name}") == []


def test_error_paths_leave_nothing(sl: Slivers) -> None:
    base = unique_uid_base()

    def create(*args: object) -> None:
        """Context.create that must fail: if it does not, the context it made is
        still destroyed at the end of the test (it is handed to the fixture)."""
        sl.contexts.append(Context.create(*args))  # type: ignore[arg-type]

    # Bad root.
    name = sl.name("bad")
    with pytest.raises(FileNotFoundError, match="root is not a directory"):
        create(sl.run_dir, name, sl.tmp / "nosuchroot", base)
    _assert_nothing_for(sl, name)
    # Bad name.
    with pytest.raises(ValueError, match="bad sliver name"):
        create(sl.run_dir, "Bad/Name", sl.tmp, base)
    # Name taken, and uid overlap.
    a = sl.create(uid_base=base)
    with pytest.raises(FileExistsError, match="name is taken"):
        create(sl.run_dir, a.name, sl.root(a.name + "x", base + 65536), base + 65536)
    assert a.alive() and a.output(["true"])[0] == 0
    name = sl.name("ovl")
    with pytest.raises(ValueError, match="overlaps"):
        create(sl.run_dir, name, sl.root(name, base), base + 100)
    _assert_nothing_for(sl, name)
    # Half-failed creation: /dev is a file in this root, in a directory the sliver's
    # root may not change (host root's), so making /dev a directory fails after the
    # namespaces, cgroups and the init exist.
    name = sl.name("half")
    root = sl.root(name, base + 65536)
    os.rmdir(root / "dev")
    (root / "dev").write_text("not a directory")
    os.chown(root, 0, 0)
    with pytest.raises(ContextError, match="mkdir /dev"):
        create(sl.run_dir, name, root, base + 65536)
    _assert_nothing_for(sl, name)


# -- the seccomp guard path --------------------------------------------------------

NR_SETHOSTNAME = 170   # without the guard, root in a sliver may set its own
AUDIT_ARCH_X86_64 = 0xC000003E


def _sethostname_filter() -> bytes:
    """Notify on sethostname(2), allow everything else (and kill a foreign arch)."""
    a = cbpf.Asm()
    a.ld(sc.DATA_ARCH)
    a.op(cbpf.JEQ_K, AUDIT_ARCH_X86_64, 1, 0)
    a.ret(sc.SECCOMP_RET_KILL_PROCESS)
    a.ld(sc.DATA_NR)
    a.op(cbpf.JEQ_K, NR_SETHOSTNAME, 0, 1)
    a.ret(sc.SECCOMP_RET_USER_NOTIF)
    a.ret(sc.SECCOMP_RET_ALLOW)
    return a.assemble()


def _recv_fd(sock: socket.socket) -> int:
    msg, fds, _, _ = socket.recv_fds(sock, 16, 1)
    assert msg == b"L" and len(fds) == 1
    return fds[0]


def test_guard_listener_sent_and_kept_and_covers_entered(sl: Slivers) -> None:
    agent_end, sink = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        ctx = sl.create(guard=GuardSpec(filter=_sethostname_filter(), listener_sink=sink.fileno()))
        sink.close()
        listener = _recv_fd(agent_end)
        seen: list[sc.Notification] = []

        def supervise(lfd: int, count: int) -> None:
            for _ in range(count):
                r, _, _ = select.select([lfd], [], [], 10)
                if not r:
                    return
                n = sc.notif_recv(lfd)
                seen.append(n)
                sc.notif_send(lfd, n.id, error=errno.EHOSTDOWN)

        t = threading.Thread(target=supervise, args=(listener, 1))
        t.start()
        rc, _, err = ctx.output(["hostname", "other"], timeout=20)
        t.join(15)
        assert len(seen) == 1 and seen[0].nr == NR_SETHOSTNAME, (rc, err)
        assert rc != 0 and b"host is down" in err.lower()      # the supervisor's answer
        assert seen[0].pid > 1
        # Entered processes descend from the init: same filter, as the user too.
        status = out(ctx, "grep Seccomp /proc/self/status", user="user")
        assert "Seccomp:\t2" in status
        os.close(listener)
        # After an "agent restart", the listener comes back from the init's fd.
        pidfd = os.pidfd_open(ctx.init_pid)
        try:
            from kernel.pidfd import pidfd_getfd
            again = pidfd_getfd(pidfd, GUARD_LISTENER_FD)
        finally:
            os.close(pidfd)
        try:
            assert os.readlink(f"/proc/self/fd/{again}") == "anon_inode:seccomp notify"
            t = threading.Thread(target=supervise, args=(again, 1))
            t.start()
            rc, _, err = ctx.output(["hostname", "again"], timeout=20)
            t.join(15)
            assert rc != 0 and len(seen) == 2 and b"host is down" in err.lower()
        finally:
            os.close(again)
    finally:
        agent_end.close()
        if sink.fileno() >= 0:
            sink.close()


def test_guard_bad_filter_refused(sl: Slivers) -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(ValueError, match="guard filter"):
            sl.create(guard=GuardSpec(filter=b"\0" * 7, listener_sink=b.fileno()))
        name = sl.name("g")
        with pytest.raises(ContextError, match="install seccomp filter"):
            Context.create(sl.run_dir, name, sl.root(name, unique_uid_base()),
                           unique_uid_base(),
                           guard=GuardSpec(filter=struct.pack("<HBBI", 0xFFFF, 0, 0, 0),
                                           listener_sink=b.fileno()))
        _assert_nothing_for(sl, name)
    finally:
        a.close()
        b.close()


def test_init_reaps_orphans_and_entered_processes_descend_from_it(ctx: Context) -> None:
    # The background sleep is orphaned when its shell exits: the init must reap it.
    assert ctx.run(["sh", "-c", "sleep 0.2 & exit 0"]) == 0
    time.sleep(0.6)
    states = out(ctx, "cat /proc/[0-9]*/stat | cut -d')' -f2 | cut -d' ' -f2")
    assert "Z" not in states.split()
    # An entered process is a child of the init on the host, in all its namespaces
    # and cgroups.
    p = ctx.spawn(["sleep", "30"], stdout=subprocess.DEVNULL)
    try:
        kids = Path(f"/proc/{ctx.init_pid}/task/{ctx.init_pid}/children").read_text().split()
        assert len(kids) == 1
        host_pid = int(kids[0])
        assert ns_ids(host_pid) == ns_ids(ctx.init_pid)
        assert host_pid in ctx.cgroup.pids()
    finally:
        p.kill()
        p.wait(10)


def _raw_sigaction(signum: int, handler: int) -> int:
    """Set a signal's handler with rt_sigaction(2) itself; return the old handler."""
    import ctypes

    class KSigaction(ctypes.Structure):
        _fields_ = [("handler", ctypes.c_ulong), ("flags", ctypes.c_ulong),
                    ("restorer", ctypes.c_ulong), ("mask", ctypes.c_uint64)]

    libc = ctypes.CDLL(None, use_errno=True)
    new, old = KSigaction(handler, 0, 0, 0), KSigaction()
    if libc.syscall(13, signum, ctypes.byref(new), ctypes.byref(old), 8) != 0:  # SYS_rt_sigaction
        raise OSError(ctypes.get_errno(), "rt_sigaction")
    return int(old.handler)


def test_caller_signal_state_does_not_leak_into_the_sliver(sl: Slivers) -> None:
    import signal as sig

    old = sig.signal(sig.SIGUSR1, sig.SIG_IGN)
    blocked = sig.pthread_sigmask(sig.SIG_BLOCK, {sig.SIGUSR2})
    # Signal 32 is one glibc keeps for itself: its signal() cannot reset it, so the
    # init must use the raw system call. Ignore it here the same raw way.
    glibc_reserved = _raw_sigaction(32, 1)  # SIG_IGN
    try:
        ctx = sl.create()
    finally:
        _raw_sigaction(32, glibc_reserved)
        sig.pthread_sigmask(sig.SIG_SETMASK, blocked)
        sig.signal(sig.SIGUSR1, old)
    rc, o, _ = ctx.output(["cat", "/proc/self/status"])
    fields = dict(line.split(":\t", 1) for line in o.decode().splitlines() if ":\t" in line)
    assert int(fields["SigIgn"], 16) == 0 and int(fields["SigBlk"], 16) == 0


def test_update_limits_in_place_and_refusals(ctx: Context) -> None:
    ctx.update_limits(Limits(cpu_share=2, cpu_pct=40, mem_max=128 << 20, pids_max=64))
    if ctx.cgroup.layout.mode == "v1":
        assert (ctx.cgroup.path("cpu") / "cpu.cfs_quota_us").read_text().strip() == "40000"
        assert (ctx.cgroup.path("cpu") / "cpu.shares").read_text().strip() == "2048"
        assert (ctx.cgroup.path("memory") / "memory.limit_in_bytes").read_text().strip() \
            == str(128 << 20)
    assert ctx.alive() and ctx.run(["true"]) == 0          # no restart
    with pytest.raises(ValueError, match="rlimits and capabilities"):
        ctx.update_limits(Limits(rlimits={"nofile": (10, 10)}))
    with pytest.raises(ValueError, match="pids_max"):
        ctx.update_limits(Limits(pids_max=0))


def test_crashed_init_is_cleaned_by_destroy_stale(sl: Slivers) -> None:
    ctx = sl.create()
    inodes = set(ns_ids(ctx.init_pid)[k] for k in SLIVER_NAMESPACES)
    dirs = ctx.cgroup.dirs()
    os.kill(ctx.init_pid, signal.SIGKILL)
    os.waitpid(ctx.init_pid, 0)               # we are its reaper (subreaper)
    with pytest.raises(ProcessLookupError, match="is gone"):
        Context.adopt(sl.run_dir, ctx.name)
    assert ctx.name in Context.list(sl.run_dir)
    Context.destroy_stale(sl.run_dir, ctx.name)
    assert leftovers(ctx.name, ctx.init_pid, inodes, sl.run_dir, dirs) == []
    assert Context.list(sl.run_dir) == []
    # The name and the uid range are free again.
    again = Context.create(sl.run_dir, ctx.name, ctx.root, ctx.uid_base)
    sl.contexts.append(again)
    assert again.run(["true"]) == 0


def test_with_a_guard_only_the_agent_binds_tcp(sl: Slivers) -> None:
    """With a guard, Landlock handles TCP bind with no rule (the guard binds for the
    sliver from outside its domain); without one the sliver binds itself."""
    port = 40000 + os.getpid() % 10000
    cmd = f"timeout 1 nc -l -p {port} 2>&1; true"
    plain = sl.create()
    assert "denied" not in out(plain, cmd).lower()
    agent_end, sink = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        guarded = sl.create(guard=GuardSpec(filter=_sethostname_filter(),
                                            listener_sink=sink.fileno()))
        os.close(_recv_fd(agent_end))
        assert "permission denied" in out(guarded, cmd).lower()
    finally:
        agent_end.close()
        sink.close()


def test_kill_after_exit_is_harmless(ctx: Context) -> None:
    p = ctx.spawn(["true"], stdout=subprocess.PIPE)
    time.sleep(0.5)
    p.kill()                         # exited, not yet polled: no error (like Popen)
    assert p.wait(10) == 0
    p.kill()
    p.close()


def test_cgroup_parent_is_chosen_by_the_caller(sl: Slivers) -> None:
    parent = f"pltest{os.getpid()}"
    ctx = sl.create(cgroup_parent=parent)
    try:
        assert all(d.parent.name == parent for d in ctx.cgroup.dirs())
        assert ctx.init_pid in ctx.cgroup.pids()
        again = Context.adopt(sl.run_dir, ctx.name)
        assert again.cgroup.dirs() == ctx.cgroup.dirs()
        ctx.destroy()
        assert not any(d.exists() for d in ctx.cgroup.dirs())
    finally:
        ctx.destroy()
        for d in ctx.cgroup.dirs():       # the test's own parent goes too
            if d.parent.exists():
                d.parent.rmdir()
    with pytest.raises(ValueError, match="bad cgroup parent"):
        sl.create(cgroup_parent="../escape")


def test_spawn_refuses_host_terminals(ctx: Context) -> None:
    """F10: a terminal of the host is never handed into the sliver (a process there
    could keep it with pidfd_getfd and read what is typed later). With tty=True the
    pty is made inside, so that stays allowed."""
    master, slave = pty.openpty()
    try:
        with open(os.ttyname(slave), "wb", buffering=0) as as_file:
            for kw in ({"stdin": slave}, {"stdout": slave}, {"stderr": as_file},
                       {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE,
                        "stderr": slave}):
                with pytest.raises(ContextError, match="is a terminal"):
                    ctx.spawn(["sleep", "30"], **kw)  # type: ignore[arg-type]
        assert ctx.usage()["pids"] == 2                 # nothing was started (init, sockd)
        proc = ctx.spawn(["tty"], tty=True, stdin=slave)   # std* ignored with a pty
        try:
            assert proc.wait(10) == 0
        finally:
            proc.close()
    finally:
        os.close(master)
        os.close(slave)


def test_read_state_of_an_empty_state_file_is_no_state(tmp_path: Path) -> None:
    """create() makes state.json empty first and fills it once the init's pid is known;
    a reader in between (or after a creator that died there) gets no state, not a
    JSON error, and adopt() says the context is not there."""
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "state.json").write_text("")
    assert Context.read_state(tmp_path, "s1") is None
    with pytest.raises(FileNotFoundError):
        Context.adopt(tmp_path, "s1")
    assert Context.read_state(tmp_path, "nothere") is None
