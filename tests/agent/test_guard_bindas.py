"""guard-bindas (F8): it reads the caller through /proc/PID, so it must refuse when
the caller's pidfd (taken by the agent while the notification was valid) shows the
caller gone: PID may then name another process (pid reuse). Real processes; the
reuse is stood for by a second live process whose PID is passed with the dead
caller's pidfd, exactly what the helper would see after a wrap-around."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]

BINDAS = Path(__file__).resolve().parents[2] / "kernel" / "bin" / "guard-bindas"
FAIL = 125


def bindas(pid: int, pidfd: int, path: Path) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        raw = socket.AF_UNIX.to_bytes(2, "little") + bytes(path) + b"\0"
        done = subprocess.run([str(BINDAS), str(pid), str(sock.fileno()), str(pidfd)],
                              input=raw, pass_fds=(sock.fileno(), pidfd), timeout=30)
        return done.returncode


def test_bindas_refuses_a_pid_that_is_no_longer_the_callers(tmp_path: Path) -> None:
    if not BINDAS.exists():
        pytest.fail(f"{BINDAS} missing: run `make native`")
    caller = subprocess.Popen(["sleep", "60"], cwd=tmp_path)
    reuser = subprocess.Popen(["sleep", "60"], cwd=tmp_path)
    pidfd = os.pidfd_open(caller.pid)
    try:
        # The caller itself, its pidfd alive: bound as it (relative path: its cwd).
        assert bindas(caller.pid, pidfd, Path("caller.sock")) == 0
        assert (tmp_path / "caller.sock").exists()
        caller.kill()
        caller.wait()
        # PID now names another process, the pidfd the dead caller: refused, nothing bound.
        assert bindas(reuser.pid, pidfd, Path("reused.sock")) == FAIL
        assert not (tmp_path / "reused.sock").exists()
        # An fd that is not a pidfd is refused too.
        null = os.open("/dev/null", os.O_RDONLY)
        try:
            assert bindas(reuser.pid, null, Path("bad.sock")) == FAIL
        finally:
            os.close(null)
        assert not (tmp_path / "bad.sock").exists()
    finally:
        os.close(pidfd)
        for p in (caller, reuser):
            p.kill()
            p.wait()
