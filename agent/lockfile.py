"""The agent's pid/lock files: one running agent per state directory and per run
directory, and a way for `planetlab-agent poll` to find it.

Each file is locked with a POSIX record lock (fcntl F_SETLK, `lockf`), which the
kernel drops when the process dies and which a forked child does not inherit: a
sliver process that outlives the agent never keeps a new agent out. The file holds
the pid for people; `holder()` asks the kernel (F_GETLK) who really holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

STATE_LOCK = "agent.lock"   # in state_dir
RUN_PIDFILE = "agent.pid"   # in run_dir

# struct flock on Linux: short l_type, l_whence; off_t l_start, l_len; pid_t l_pid
# (with its padding, 32 bytes on every 64-bit ABI; room to spare on 32-bit ones).
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_SIZE = 32


class AlreadyRunning(RuntimeError):
    """Another agent holds the lock; the message names its pid and the file."""


def holder(path: Path) -> int | None:
    """The pid of the process holding `path`'s lock, or None (no file, no holder)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        query += b"\0" * (_FLOCK_SIZE - len(query))
        reply = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        l_type, _, _, _, pid = _FLOCK.unpack(reply[:_FLOCK.size])
        return None if l_type == fcntl.F_UNLCK else pid
    finally:
        os.close(fd)


class PidLock:
    """Hold the lock files of one agent for as long as the process lives (or until
    `release`). Taken before the state is opened, so a second agent changes nothing."""

    def __init__(self, state_dir: str | Path, run_dir: str | Path) -> None:
        self.paths = (Path(state_dir) / STATE_LOCK, Path(run_dir) / RUN_PIDFILE)
        self._fds: list[int] = []

    def acquire(self) -> PidLock:
        try:
            for path in self.paths:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    pid = holder(path)
                    raise AlreadyRunning(
                        f"another agent (pid {pid if pid else '?'}) holds {path}: one agent "
                        f"per state and run directory; stop it first") from None
                self._fds.append(fd)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Unlock; the pid files stay (an empty lock is no agent), their content goes."""
        for fd in self._fds:
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)
        self._fds.clear()

    def __enter__(self) -> PidLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def running_agent(run_dir: str | Path) -> int | None:
    """The pid of the agent running over `run_dir`, or None."""
    return holder(Path(run_dir) / RUN_PIDFILE)
