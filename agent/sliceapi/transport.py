"""The slice API's transport: two Unix stream sockets, one HTTP POST per connection
(parsed by h11) or one ENTER session, answered as HTTP/1.0 with `Connection: close`.

Two listening sockets serve the same calls: `socket_path` for the host, and
`<run_dir>/api/agent.sock`, whose directory is bind-mounted into every sliver at
`sliver_socket_dir` (so a restarted agent's new socket is visible in running slivers).

Hostile input is bounded: request size, header size, a deadline per connection, a
cap on open connections (per caller and in all), a token bucket per caller. A request
whose framing is ambiguous (conflicting Content-Length, Transfer-Encoding) is refused
with 400 before any call runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h11
import trio

from agent.backend import Backend
from agent.config import AgentConfig
from agent.reconcile import Reconciler
from agent.sliceapi.calls import Calls
from agent.sliceapi.enter import CONNECTION_DEADLINE, close_fds, enter_session
from agent.sliceapi.identity import Caller, peer_credentials
from agent.state import State

log = logging.getLogger("agent.sliceapi")

FIRST_BYTE_DEADLINE = 2.0
PER_CALLER_CONNECTIONS = 8
ADMIN_CONNECTIONS = 32
SLIVER_MAX_REQUEST = 64 * 1024   # every call of the local API fits in far less
MAX_CONNECTIONS = 256
MAX_HEADER_BYTES = 16 * 1024


class SliceAPI:
    """The socket servers over `Calls` (and the ENTER session)."""

    def __init__(self, cfg: AgentConfig, state: State, reconciler: Reconciler,
                 backend: Backend, api_dir: Path,
                 guard_methods: Mapping[str, Callable[..., Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic, bandwidth: Any = None,
                 management: Any = None, rcaps: Any = None) -> None:
        """`api_dir`: the directory of the sliver-side socket (bind-mounted into every
        sliver); `guard_methods`: the guard's calls (GuardService.methods()), if any;
        `management`: agent.sliceapi.delegation.Management (Ticket, Create, ...)."""
        self.cfg = cfg
        self.state = state
        self.backend = backend
        self.api_dir = api_dir
        self.calls = Calls(cfg, state, reconciler, guard_methods, clock, bandwidth=bandwidth,
                           management=management, rcaps=rcaps)
        self.max_request = cfg.api_max_request
        self._connections = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._admin_connections = trio.CapacityLimiter(ADMIN_CONNECTIONS)
        self._open: dict[str, int] = {}

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection (see _handle). Whatever goes wrong in it (a bug, a locked
        state database) ends that connection only, never the agent."""
        try:
            await self._handle(stream)
        except Exception:   # noqa: BLE001 - boundary: one connection
            log.exception("slice API: connection failed")
            with trio.move_on_after(1):
                await stream.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection: one HTTP POST answered, or one ENTER session. The caller is
        known before anything shared is taken [F4]: at most PER_CALLER_CONNECTIONS open
        connections per caller (more are closed at once), the node admin has its own
        reserve, and a request has one deadline (a short one for its first byte)."""
        try:
            pid, uid, _ = peer_credentials(stream.socket)  # type: ignore[arg-type]
            caller = self.calls.caller_of(pid, uid)
        except OSError:
            await stream.aclose()
            return
        if self._open.get(caller.name, 0) >= PER_CALLER_CONNECTIONS:
            await stream.aclose()
            return
        self._open[caller.name] = self._open.get(caller.name, 0) + 1
        limiter = self._admin_connections if caller.kind == "admin" else self._connections
        try:
            async with limiter:
                await self._serve_connection(stream, caller)
        finally:
            self._open[caller.name] -= 1
            if not self._open[caller.name]:
                del self._open[caller.name]
            with trio.move_on_after(1):
                await stream.aclose()

    async def _serve_connection(self, stream: trio.SocketStream, caller: Caller) -> None:
        fds: list[int] = []
        try:
            deadline = trio.current_time() + CONNECTION_DEADLINE
            first = b""
            with trio.move_on_after(FIRST_BYTE_DEADLINE):
                first, fds = await _receive_first(stream)
            if not first:
                return
            if first.startswith(b"ENTER1 "):
                await enter_session(stream, caller, first, fds, state=self.state,
                                    backend=self.backend, buckets=self.calls.buckets)
                return
            close_fds(fds)
            fds = []
            with trio.move_on_at(deadline):
                limit = (self.max_request if caller.kind == "admin"
                         else min(self.max_request, SLIVER_MAX_REQUEST))
                body = await read_request(stream, limit, first)
                if body is None:
                    await _send(stream, 400, b"bad request\n", "text/plain")
                    return
                if isinstance(body, int):
                    await _send(stream, body, b"request too large\n", "text/plain")
                    return
                response, socks = await self.calls.dispatch_full(caller, body)
                try:
                    await _send(stream, 200, response, "text/xml",
                                [s.fileno() for s in socks])
                finally:
                    for s in socks:
                        s.close()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            close_fds(fds)

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        paths = [Path(self.cfg.socket_path), self.api_dir / "agent.sock"]
        self.api_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.api_dir, 0o755)
        listeners = [await _unix_listener(p) for p in dict.fromkeys(paths)]
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(trio.serve_listeners, self.handle, [listener])
                task_status.started()
        finally:
            for p in dict.fromkeys(paths):
                with contextlib.suppress(OSError):
                    p.unlink()


async def _receive_first(stream: trio.SocketStream) -> tuple[bytes, list[int]]:
    """The first bytes of a connection and any fds sent with them (SCM_RIGHTS)."""
    data, anc, _, _ = await stream.socket.recvmsg(  # type: ignore[attr-defined]
        65536, socket.CMSG_SPACE(3 * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(payload) // 4
            fds += list(struct.unpack(f"{n}i", payload[:4 * n]))
    return data, fds


async def read_request(stream: trio.SocketStream, limit: int,
                       first: bytes = b"") -> bytes | int | None:
    """The body of one HTTP POST, parsed by h11; None if malformed or ambiguous (no
    Content-Length, or a Transfer-Encoding: a request has one framing), 413 if larger
    than `limit`."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    conn.receive_data(first)
    body = bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await stream.receive_some(65536)
                conn.receive_data(chunk)   # b"": the client is gone (h11 raises)
            elif isinstance(event, h11.Request):
                if event.method != b"POST":
                    return None
                names = [name for name, _ in event.headers]
                if b"transfer-encoding" in names or b"content-length" not in names:
                    return None
                length = int(dict(event.headers)[b"content-length"])
                if length > limit:
                    return 413
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:   # ConnectionClosed, or a Request's Paused: not a request we serve
                return None
    except h11.RemoteProtocolError:
        return None


async def _unix_listener(path: Path) -> trio.SocketListener:
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        await sock.bind(str(path))
        os.chmod(path, 0o666)  # anyone may connect; who they are comes from SO_PEERCRED
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def _send(stream: trio.SocketStream, status: int, body: bytes, ctype: str,
                fds: list[int] | None = None) -> None:
    """The HTTP response; fds (SCM_RIGHTS) travel with its first chunk (docs/guard.md)."""
    reason = {200: "OK", 400: "Bad Request", 413: "Payload Too Large"}.get(status, "Error")
    head = (f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    data = head + body
    if fds:
        sent = await stream.socket.sendmsg(  # type: ignore[attr-defined]
            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        data = data[sent:]
    if data:
        await stream.send_all(data)
