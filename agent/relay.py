"""The CLI's `enter` relays (moved from agent/cli_sliver.py): our stdio to a command
inside a sliver through pipes, or our terminal to a pty made inside. No host fd of
ours is handed into a sliver (F10, F37)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import termios
import tty
from typing import Any


def relay_pipes(proc: Any) -> None:
    """Copy our stdin to the command's stdin pipe and its stdout/stderr pipes to ours
    until both outputs end. Our stdin ending closes the command's. Ctrl-C here is
    passed on to the command as SIGINT (it is not in our process group)."""
    out = {proc.stdout.fileno(): 1, proc.stderr.fileno(): 2}
    src = [0] if proc.stdin is not None else []
    try:
        os.fstat(0)
    except OSError:          # no stdin at all: the command gets EOF
        src = []
    if not src and proc.stdin is not None:
        proc.stdin.close()
        proc.stdin = None
    prev = signal.signal(signal.SIGINT, lambda _s, _f: proc.send_signal(signal.SIGINT))
    try:
        _relay_loop(proc, src, out)
    finally:
        signal.signal(signal.SIGINT, prev)


def _relay_loop(proc: Any, src: list[int], out: dict[int, int]) -> None:
    """Relay until both outputs end or the command exits; then what its pipes hold is
    copied and the relay ends (a process it left behind keeping them open does not
    hold us, and cannot write through them after we close them)."""
    exited = proc.fileno()   # a pidfd: readable once the command has exited
    while out:
        r, _, _ = select.select(src + list(out) + [exited], [], [])
        if exited in r:
            for fd, dest in out.items():
                os.set_blocking(fd, False)
                with contextlib.suppress(BlockingIOError):
                    while data := os.read(fd, 65536):
                        _write_all(dest, data)
            return
        for fd in r:
            if fd in out:
                data = os.read(fd, 65536)
                if not data:
                    del out[fd]
                    continue
                _write_all(out[fd], data)
            elif fd == 0:
                data = os.read(0, 65536)
                try:
                    if data:
                        _write_all(proc.stdin.fileno(), data)
                except BrokenPipeError:
                    data = b""            # the command closed its stdin
                if not data:
                    src = []
                    proc.stdin.close()
                    proc.stdin = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relay_pty(master: int) -> None:
    """Copy our terminal to the pty master and back until the session ends."""
    old = termios.tcgetattr(0) if os.isatty(0) else None

    def winch(_sig: int, _frm: Any) -> None:
        if os.isatty(1):
            s = os.get_terminal_size(1)
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", s.lines, s.columns, 0, 0))

    prev = signal.signal(signal.SIGWINCH, winch)
    try:
        if old is not None:
            tty.setraw(0, termios.TCSANOW)   # keep what was typed ahead
        fds = [0, master]
        while True:
            try:
                r, _, _ = select.select(fds, [], [])
            except InterruptedError:
                continue
            if master in r:
                try:
                    data = os.read(master, 65536)
                except OSError:       # EIO: the session's last process closed the tty
                    data = b""
                if not data:
                    return
                os.write(1, data)
            if 0 in r:
                data = os.read(0, 65536)
                if not data:
                    fds.remove(0)     # our stdin ended; keep showing output
                else:
                    os.write(master, data)
    finally:
        if old is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, old)
        signal.signal(signal.SIGWINCH, prev)
