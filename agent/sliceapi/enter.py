"""The ENTER session: `ssh SLICE@node` runs the slice's host account's login shell
(agent/native/vsh.c), which asks here for a session inside its sliver:
"ENTER1 <tty> <rows> <cols> <n>\\n" and n NUL-terminated strings (TERM, the command).

The answer is "PTY\\n" with the master of a pty made inside (tty), or "PIPES\\n" with
the host ends of the session's stdin, stdout and stderr pipes (no tty); vsh relays its
own stdio to them, and "EXIT <code>\\n" ends the session. No fd from outside ever enters
the sliver: a host terminal could be read from inside later [F10], a host file written
by a process the session left behind [F37]."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
from typing import Any

import trio

from agent.backend import Backend
from agent.sliceapi.identity import Caller
from agent.state import SliverState, State
from agent.tokenbucket import TokenBuckets

log = logging.getLogger("agent.sliceapi")

CONNECTION_DEADLINE = 10.0


async def enter_session(stream: trio.SocketStream, caller: Caller, first: bytes,
                        fds: list[int], *, state: State, backend: Backend,
                        buckets: TokenBuckets) -> None:
    """`ssh SLICE@node`: the slice's host account's login shell (agent/native/vsh.c)
    asks for a session inside its sliver. Only that account may; the slice is the
    account's, never a name sent here."""
    async def refuse(message: str) -> None:
        await stream.send_all(f"{message}\n".encode())

    if caller.kind != "account":
        await refuse("ENTER: only a slice's host account may open a session")
        return
    if not buckets.take(caller.name):
        await refuse(f"ENTER: rate limit for {caller.name}; retry later")
        return
    with trio.move_on_after(CONNECTION_DEADLINE) as scope:
        request = await _read_enter(stream, first)
    if scope.cancelled_caught or request is None:
        await refuse("ENTER: malformed request")
        return
    tty, rows, cols, strings = request
    if fds:
        # Whatever comes along stays out: the session gets a pty or pipes made here.
        await refuse("ENTER: no fd is passed into a sliver; the session gets a pty or "
                     "pipes from the agent (update vsh)")
        return
    rec = state.get_sliver(caller.name)
    if rec is None or rec.state != SliverState.RUNNING:
        await refuse(f"ENTER: the sliver {caller.name} is not running"
                     + (f" ({rec.state}: {rec.message})" if rec else ""))
        return
    term = strings[0] if strings else ""
    argv = ["/bin/sh", "-c", strings[1]] if len(strings) > 1 else []
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/planetlab",
           "HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/sh"}
    if term and term.isprintable() and len(term) < 64:
        env["TERM"] = term
    try:
        proc = await trio.to_thread.run_sync(
            backend.enter, caller.name, argv, bool(tty), (rows, cols), env)
    except Exception as exc:  # noqa: BLE001 - boundary: tell the client, log
        log.warning("ENTER %s failed: %s", caller.name, exc)
        await refuse(f"ENTER: cannot start a session in {caller.name}")
        return
    log.info("session for %s started (pid %d inside, tty=%d)", caller.name, proc.pid, tty)
    try:
        await _hand_over(stream, proc, tty)
        code = await _wait_session(proc, stream)
        await stream.send_all(f"EXIT {code & 0xff if code >= 0 else 128 - code}\n".encode())
    finally:
        if proc.returncode is None:
            with contextlib.suppress(OSError):
                proc.kill()


async def _hand_over(stream: trio.SocketStream, proc: Any, tty: int) -> None:
    """Send vsh the host side of the session: the pty master ("PTY"), or the pipes'
    ends ("PIPES": stdin's write end, stdout's and stderr's read ends). The agent
    keeps no copy: once vsh exits after "EXIT", a process the session left behind
    writing its stdout gets EPIPE, and nothing holds the session's pipes open."""
    if tty:
        line, ends = b"PTY\n", [proc.master]
        proc.master = None
    else:
        line, ends = b"PIPES\n", [os.dup(f.fileno()) for f in
                                  (proc.stdin, proc.stdout, proc.stderr)]
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
        proc.stdin = proc.stdout = proc.stderr = None
    try:
        # One short message on a fresh stream socket: it fits the socket buffer, so
        # this never waits on vsh; the deadline covers a peer that stopped reading.
        with trio.fail_after(CONNECTION_DEADLINE):
            await stream.socket.sendmsg(  # type: ignore[attr-defined]
                [line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                          struct.pack(f"{len(ends)}i", *ends))])
    finally:
        close_fds(ends)


async def _wait_session(proc: Any, stream: trio.SocketStream) -> int:
    """The session's exit code. If the client goes away first, the session is hung up
    (SIGHUP), then killed if it does not end within a few seconds."""
    async with trio.open_nursery() as nursery:
        async def client_gone() -> None:
            while True:
                data = await stream.receive_some(1024)
                if not data:
                    break
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGHUP)
            await trio.sleep(5)
            with contextlib.suppress(OSError):
                proc.kill()

        nursery.start_soon(client_gone)
        while True:
            await trio.lowlevel.wait_readable(proc.fileno())
            code = proc.poll()
            if code is not None:
                nursery.cancel_scope.cancel()
                return int(code)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def _read_enter(stream: trio.SocketStream,
                      first: bytes) -> tuple[int, int, int, list[str]] | None:
    """Parse "ENTER1 <tty> <rows> <cols> <n>\\n" + n NUL-terminated strings."""
    buf = bytearray(first)
    while b"\n" not in buf:
        if len(buf) > 256:
            return None
        more = await stream.receive_some(4096)
        if not more:
            return None
        buf += more
    head, _, rest = bytes(buf).partition(b"\n")
    try:
        _, tty, rows, cols, count = head.split(b" ")
        t, r, c, n = int(tty), int(rows), int(cols), int(count)
    except ValueError:
        return None
    if t not in (0, 1) or not 0 <= r < 10000 or not 0 <= c < 10000 or not 0 <= n <= 2:
        return None
    body = bytearray(rest)
    while body.count(b"\0") < n:
        if len(body) > 256 * 1024:
            return None
        more = await stream.receive_some(65536)
        if not more:
            return None
        body += more
    parts = bytes(body).split(b"\0")[:n]
    try:
        return t, r, c, [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError:
        return None
