"""The node sensor server: HTTP/1.1 over trio, parsed by h11 (never by hand).

GET and HEAD only (405 otherwise), 404 for unknown paths, a request head above
`head_max` bytes is 431 (h11's receive-buffer cap), a request that is not answered
within `deadline` seconds (head read, snapshot, body sent) is dropped (408 when its
head never completed), and at most `max_connections` connections are served at once:
beyond that a connection gets a 503 within one second, or, past twice the cap, is
closed at once. So a slow or hostile client holds one connection slot for at most
`deadline` and never delays the agent or another client.

Answers are rendered and encoded once per snapshot, on their first request, and kept
(`_Rendered`: body bytes, and the headers that depend only on the snapshot), so a
later request costs parsing its head, h11 framing the kept headers and one send of
the kept body. Large answers (/metrics, /slices, /slicestat) are rendered in a worker
thread, so a /metrics of 1000 slivers never blocks the loop, and are gzipped (once per
snapshot, also in a worker thread) for a client whose Accept-Encoding takes gzip, as
Prometheus's does.
"""

from __future__ import annotations

import gzip
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

import h11
import trio

from sensors import formats
from sensors.snapshot import CollectionError, Snapshot, Snapshots

log = logging.getLogger("sensors")

DEFAULT_PORT = 3100
HEAD_MAX = 8192
DEADLINE_S = 5.0
MAX_CONNECTIONS = 64
RECV_CHUNK = 8192
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
NODE_SENSORS = ("load", "cpu", "memory", "swap", "disk", "network", "uptime", "kernel",
                "processes")
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found",
            405: b"Method Not Allowed", 408: b"Request Timeout",
            431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
            503: b"Service Unavailable"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


GZIP_LEVEL = 1            # /metrics of 1000 slivers: 2 MB -> ~0.1 MB in ~10 ms, once


@dataclass(frozen=True)
class _Answer:
    """One encoded answer: its headers (all but Connection) and body bytes."""
    headers: list[tuple[bytes, bytes]]
    body: bytes


_Key = tuple[str, str, bool]     # path, format, gzipped


class _Rendered:
    """Answers of one snapshot by (path, format, gzip); concurrent askers share one
    render. Bounded: a few entries per path, and per sliver for /slices/NAME."""

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.answers: dict[_Key, _Answer] = {}
        self.pending: dict[_Key, trio.Event] = {}


def accepts_gzip(request: h11.Request) -> bool:
    """Whether the request's Accept-Encoding takes gzip (RFC 9110 12.5.3; q=0 refuses)."""
    for name, value in request.headers:
        if name != b"accept-encoding":
            continue
        for item in value.split(b","):
            coding, _, params = item.partition(b";")
            if coding.strip().lower() not in (b"gzip", b"x-gzip", b"*"):
                continue
            q = params.strip().lower()
            if q.startswith(b"q="):
                try:
                    return float(q[2:]) > 0
                except ValueError:
                    return False
            return True
    return False


def encode(snap: Snapshot, path: str, fmt: str, gzipped: bool) -> _Answer:
    """Render and encode one answer (HTTPError(404) for an unknown path)."""
    ctype, text = render(snap, path, fmt)
    body = text.encode()
    headers = [(b"Content-Type", ctype.encode())]
    if gzipped:
        body = gzip.compress(body, GZIP_LEVEL, mtime=0)
        headers.append((b"Content-Encoding", b"gzip"))
    if path in _BIG:
        headers.append((b"Vary", b"Accept-Encoding"))
    headers += [(b"Content-Length", b"%d" % len(body)),
                (b"X-Snapshot-Time", f"{snap.time:.3f}".encode()),
                (b"Cache-Control", b"no-cache")]
    return _Answer(headers, body)


def paths() -> list[str]:
    return (["/", "/slices", "/slicestat", "/metrics", "/sensors/node"]
            + [f"/sensors/{s}" for s in NODE_SENSORS])


def render(snap: Snapshot, path: str, fmt: str) -> tuple[str, str]:
    """(content type, body) of one path; HTTPError(404) for an unknown one."""
    as_json = fmt == "json"
    if path == "/":
        if as_json:
            return JSON, formats.json_body({"sensors": ["node", *NODE_SENSORS],
                                            "paths": paths()})
        return TEXT, "".join(p + "\n" for p in paths())
    if path == "/metrics":
        return PROMETHEUS, formats.prometheus(snap.node, snap.slivers, snap.cpu_seconds)
    if path == "/slicestat":
        mem_total = int(snap.node.get("memory", {}).get("total_bytes", 0))
        return TEXT, formats.slicestat(snap.slivers, mem_total, snap.send_kbps, snap.address)
    if path == "/slices":
        if as_json:
            return JSON, formats.json_body({"time": snap.time, "slices": snap.slivers})
        return TEXT, formats.stanzas(snap.slivers.values())
    if path.startswith("/slices/"):
        rec = snap.slivers.get(path[len("/slices/"):])
        if rec is None:
            raise HTTPError(404, "no such sliver on this node")
        values = {"time": snap.time, **rec}
    elif path == "/sensors/node":
        values = {"time": snap.time}
        for sensor, kv in snap.node.items():
            values.update((f"{sensor}.{k}", v) for k, v in kv.items())
    elif path.startswith("/sensors/") and path[len("/sensors/"):] in snap.node:
        values = {"time": snap.time, **snap.node[path[len("/sensors/"):]]}
    else:
        raise HTTPError(404, "no such sensor; GET / lists them")
    return (JSON, formats.json_body(values)) if as_json else (TEXT, formats.key_values(values))


_BIG = ("/metrics", "/slices", "/slicestat")


def _target(request: h11.Request) -> tuple[str, str]:
    """(path, format) of a request; HTTPError(400) for a bad query or path."""
    try:
        target = request.target.decode("ascii")
    except UnicodeDecodeError:
        raise HTTPError(400, "request target must be ASCII") from None
    parts = urllib.parse.urlsplit(target)
    if not parts.path.startswith("/"):
        raise HTTPError(400, "request target must be a path")
    path = urllib.parse.unquote(parts.path)
    if path != "/" and path.endswith("/"):
        path = path.rstrip("/")
    try:
        query = urllib.parse.parse_qs(parts.query, strict_parsing=bool(parts.query),
                                      max_num_fields=8)
    except ValueError:
        raise HTTPError(400, "malformed query string") from None
    fmt = query.get("format", [""])[-1]
    if fmt not in ("", "json", "text"):
        raise HTTPError(400, "format must be json or text")
    if not fmt:
        accept = b",".join(v for k, v in request.headers if k == b"accept")
        fmt = "json" if b"application/json" in accept else "text"
    return path, fmt


class NodeServer:
    """Serve one `Snapshots` over HTTP. `serve` is a trio service (nursery.start)."""

    def __init__(self, snapshots: Snapshots, *, head_max: int = HEAD_MAX,
                 deadline: float = DEADLINE_S, max_connections: int = MAX_CONNECTIONS) -> None:
        self.snapshots = snapshots
        self.head_max = head_max
        self.deadline = deadline
        self.max_connections = max_connections
        self.connections = 0
        self.rejecting = 0
        self._rendered = _Rendered(-1)

    async def serve(self, host: str, port: int = DEFAULT_PORT,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on host:port; task_status.started(the listeners) once listening."""
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        if not self.snapshots.address:    # slicestat's field 14
            self.snapshots.address = host
        async with trio.open_nursery() as nursery:
            for ln in listeners:
                nursery.start_soon(self._accept_loop, ln, nursery)
            task_status.started(listeners)

    async def _accept_loop(self, listener: trio.SocketListener,
                           nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:   # EMFILE and friends: wait, do not spin
                    log.warning("sensors: accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                if self.connections < self.max_connections:
                    self.connections += 1
                    nursery.start_soon(self._connection, stream)
                elif self.rejecting < self.max_connections:
                    self.rejecting += 1
                    nursery.start_soon(self._reject, stream)
                else:
                    await trio.aclose_forcefully(stream)

    async def _reject(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(1.0):
                body = b"too many connections; try again later\n"
                await stream.send_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                    b"Content-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                # Closing with the request unread would send RST, which can discard
                # the 503 before the client reads it: end our side, drain a little.
                await stream.send_eof()
                drained = 0
                while drained < 65536 and (chunk := await stream.receive_some(RECV_CHUNK)):
                    drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.rejecting -= 1
            await trio.aclose_forcefully(stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.head_max)
        try:
            while True:
                with trio.move_on_after(self.deadline) as scope:
                    if not await self._one_request(conn, stream):
                        return
                if scope.cancelled_caught:
                    # a head begun but not finished: 408; an idle keep-alive
                    # connection, or one cancelled mid-answer: just close it
                    if conn.our_state is h11.IDLE and (conn.their_state is not h11.IDLE
                                                       or conn.trailing_data[0]):
                        with trio.move_on_after(1.0):
                            await self._send_error(conn, stream, 408, "request timeout")
                    return
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass
        except Exception:  # noqa: BLE001 - boundary: one connection never stops the server
            log.exception("sensors: connection failed")
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _one_request(self, conn: h11.Connection, stream: trio.SocketStream) -> bool:
        """Read one request head and answer it; False when the connection must end."""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in _REASONS else 400
                await self._send_error(conn, stream, status, str(exc))
                return False
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECV_CHUNK)
                conn.receive_data(data)   # b"" is end of stream
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return False
            if isinstance(event, h11.Request):
                # A request without a body ends here; one with a body is answered
                # without reading it, and the connection closes after the answer.
                try:
                    has_body = not isinstance(conn.next_event(), h11.EndOfMessage)
                except h11.RemoteProtocolError:
                    has_body = True
                await self._answer(conn, stream, event, has_body)
                return True

    async def _answer(self, conn: h11.Connection, stream: trio.SocketStream,
                      request: h11.Request, close: bool) -> None:
        if request.method not in (b"GET", b"HEAD"):
            await self._send_error(conn, stream, 405, "only GET and HEAD",
                                   [(b"Allow", b"GET, HEAD")])
            return
        try:
            path, fmt = _target(request)
            snap = await self.snapshots.get()
            answer = await self._answer_of(snap, path, fmt,
                                           path in _BIG and accepts_gzip(request))
        except HTTPError as exc:
            await self._send_error(conn, stream, exc.status, str(exc))
            return
        except CollectionError as exc:
            await self._send_error(conn, stream, 500, str(exc))
            return
        headers = answer.headers
        if close:
            headers = [*headers, (b"Connection", b"close")]
        await self._send(conn, stream, 200, headers,
                         b"" if request.method == b"HEAD" else answer.body)

    async def _answer_of(self, snap: Snapshot, path: str, fmt: str,
                         gzipped: bool) -> _Answer:
        if path in ("/metrics", "/slicestat"):
            fmt = "text"
        r = self._rendered
        if r.serial != snap.serial:
            r = self._rendered = _Rendered(snap.serial)
        key = (path, fmt, gzipped)
        answer = r.answers.get(key)
        if answer is not None:
            return answer
        if path not in _BIG:     # small: render here, a few microseconds, and keep it
            if path.startswith("/slices/") and path[len("/slices/"):] not in snap.slivers:
                raise HTTPError(404, "no such sliver on this node")   # not kept: unbounded
            answer = r.answers[key] = encode(snap, path, fmt, False)
            return answer
        while key not in r.answers:
            pending = r.pending.get(key)
            if pending is not None:
                await pending.wait()
                continue
            r.pending[key] = done = trio.Event()
            try:
                with trio.CancelScope(shield=True):
                    r.answers[key] = await trio.to_thread.run_sync(
                        encode, snap, path, fmt, gzipped)
            except Exception:
                log.exception("sensors: rendering %s failed", path)
                raise HTTPError(500, "could not render the answer") from None
            finally:
                del r.pending[key]
                done.set()
        return r.answers[key]

    async def _send_error(self, conn: h11.Connection, stream: trio.SocketStream,
                          status: int, message: str,
                          extra: list[tuple[bytes, bytes]] | None = None) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = (message.replace("\n", " ") + "\n").encode()
        headers = [(b"Content-Type", TEXT.encode()), (b"Content-Length", b"%d" % len(body)),
                   (b"Connection", b"close"), *(extra or [])]
        await self._send(conn, stream, status, headers, body)

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, status: int,
                    headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        head = conn.send(h11.Response(status_code=status, headers=headers,
                                      reason=_REASONS.get(status, b""))) or b""
        # h11 frames the body (checks it against Content-Length) without copying it
        chunks = (conn.send_with_data_passthrough(h11.Data(data=body)) or []) if body else []
        end = conn.send(h11.EndOfMessage()) or b""
        if len(body) <= 65536:          # one send for head and a small body
            await stream.send_all(b"".join([head, *chunks, end]))
            return
        await stream.send_all(head)
        for chunk in chunks:
            await stream.send_all(chunk)
        if end:
            await stream.send_all(end)
