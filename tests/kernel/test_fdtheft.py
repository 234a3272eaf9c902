"""A sliver's processes cannot take the fds of its init or its sockd (F42 and
"Attacks tried and held" in docs/dev/findings-security.md).

The init holds the guard's seccomp listener (fd 4: whoever has it answers the
sliver's binds, e.g. with CONTINUE, past the port table), sockd's request socket
(fd 5: forged socket requests) and the control socket (fd 3: the host's `enter`
sessions). A static probe (fdthief.c) tries pidfd_getfd, /proc/1/fd, kcmp,
/proc/1/mem and environ, process_vm_readv/writev, PTRACE_SEIZE and PTRACE_ATTACH
against PID 1, as the sliver's root and as an ordinary user, and looks for sockd
or any seccomp listener among the pids it can see. Real contexts, this kernel."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.guard import recv_guard_fds
from kernel.caps import DEFAULT_CAPS
from kernel.context import Context, GuardSpec, Limits
from kernel.seccomp import guard_filter
from tests.kernel.test_context_support import Slivers

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]

INIT_FDS = ("3", "4", "5")
#: Every attempt the probe makes; each must fail.
ATTEMPTS = {f"{a}/{fd}" for a in ("pidfd_getfd", "open_proc_fd", "readlink_proc_fd", "kcmp")
            for fd in INIT_FDS} | {
    "opendir_proc_fd", "open_proc_mem", "open_proc_environ", "process_vm_readv",
    "process_vm_writev", "ptrace_seize", "ptrace_attach"}


@pytest.fixture(scope="module")
def thief(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"fdthief{os.getpid()}") / "fdthief"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out),
                    str(Path(__file__).with_name("fdthief.c"))], check=True)
    return out


@pytest.fixture
def node() -> Iterator[Slivers]:
    sl = Slivers()
    try:
        yield sl
    finally:
        sl.close()


def guarded(sl: Slivers, limits: Limits | None = None) -> tuple[Context, list[int]]:
    """A sliver made as the agent makes one (guard filter with sockd); the agent's
    fds (listener, request socket) are returned for closing."""
    agent_end, sink = socket.socketpair()
    try:
        ctx = sl.create(limits=limits, guard=GuardSpec(filter=guard_filter(sockd=True),
                                                       listener_sink=sink.fileno()))
        lis, chan = recv_guard_fds(agent_end)
    finally:
        agent_end.close()
        sink.close()
    return ctx, [lis] + ([chan] if chan is not None else [])


def run_thief(ctx: Context, thief: Path, argv: str, user: str) -> dict[str, str]:
    """Run the probe; its output goes to a file so that a probe that wedged the init
    (it did, once it could ptrace it) fails the test instead of hanging it."""
    dest = ctx.root / "bin" / "fdthief"
    shutil.copy(thief, dest)
    os.chmod(dest, 0o755)
    out = ctx.root / "tmp" / f"fdthief.{user}"
    out.unlink(missing_ok=True)
    proc = ctx.spawn(["sh", "-c", f"/bin/fdthief {argv} > /tmp/fdthief.{user}.part 2>&1; "
                      f"mv /tmp/fdthief.{user}.part /tmp/fdthief.{user}"], user=user)
    deadline = time.monotonic() + 30
    while not out.exists():
        assert time.monotonic() < deadline, ("the probe did not finish (the init wedged?)",
                                             (ctx.root / "tmp" / f"fdthief.{user}.part")
                                             .read_text(errors="replace")
                                             if (ctx.root / "tmp" / f"fdthief.{user}.part")
                                             .exists() else "")
        time.sleep(0.05)
    proc.wait(30)
    lines = out.read_text().split("\n")
    return dict(line.split(" ", 1) for line in lines if " " in line)


def assert_nothing_taken(ctx: Context, thief: Path) -> None:
    for user in ("root", "user"):
        got = run_thief(ctx, thief, "1 " + " ".join(INIT_FDS), user)
        assert got.get("pidfd_open") == "ok", got   # it may name its init ...
        taken = {k: v for k, v in got.items() if k in ATTEMPTS and v == "ok"}
        assert not taken, (user, taken)             # ... and take nothing of it
        assert ATTEMPTS <= got.keys(), (user, got)


def test_sliver_cannot_take_its_inits_fds_nor_see_sockd(node: Slivers, thief: Path) -> None:
    ctx, fds = guarded(node)
    try:
        # the init really holds them (the host's view)
        links = {n: os.readlink(f"/proc/{ctx.init_pid}/fd/{n}") for n in INIT_FDS}
        assert links["4"] == "anon_inode:seccomp notify", links
        assert links["3"].startswith("socket:") and links["5"].startswith("socket:"), links
        assert_nothing_taken(ctx, thief)
        seen = run_thief(ctx, thief, "scan", "root")
        assert "sockd" not in seen and "listener" not in seen, seen
        assert seen.get("pid") == "1" or "pid" in seen
        # the init still serves
        assert ctx.output(["true"], timeout=30)[0] == 0
    finally:
        for fd in fds:
            os.close(fd)


def test_init_fds_safe_whatever_suid_dumpable_with_sys_ptrace(node: Slivers,
                                                               thief: Path) -> None:
    """F42: with fs.suid_dumpable = 1 (a node setting for core dumps of setuid
    programs) the kernel left the init dumpable after its id changes, and a slice
    given CAP_SYS_PTRACE by its `capabilities` tag took fd 4, 5 and 3 of its init
    (pidfd_getfd), read and wrote its memory and wedged it. The sysctl is global:
    it is 1 only while the sliver is created (when the init's dumpable flag is set),
    and put back at once."""
    knob = Path("/proc/sys/fs/suid_dumpable")
    old = knob.read_text().strip()
    limits = Limits(capabilities=DEFAULT_CAPS + ("sys_ptrace",))
    knob.write_text("1")
    try:
        ctx, fds = guarded(node, limits)
    finally:
        knob.write_text(old)
    try:
        assert_nothing_taken(ctx, thief)
        assert ctx.output(["true"], timeout=30)[0] == 0
    finally:
        for fd in fds:
            os.close(fd)
