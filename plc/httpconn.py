"""Client connections between requests: one selector thread reads every request whole
(head and body) before a worker thread sees it.

A thread per connection let 1200 connections sending one byte every 10 s hold every
slot (issue 9). Here a connection costs a worker only while its complete request is
being answered; while it is idle, handshaking or trickling its request it is a socket
in the selector, held to deadlines:

* the whole head (TLS handshake included) within ``head_timeout`` seconds of its first
  byte; the body within ``head_timeout + length / body_min_rate`` seconds after that;
  an idle keep-alive connection at most ``IDLE_TIMEOUT`` seconds;
* at most ``max_per_source`` connections per client address (more: 503 and closed);
* at most ``max_connections`` connections: a new one evicts the connection that has
  waited longest (so a crowd of slow clients cannot keep a new one out);
* request bodies buffered at once at most ``max_buffered`` bytes in all (more: 503).

Complete requests go to a pool of at most ``threads`` worker threads (created as
needed); ``handle`` answers one and says whether to keep the connection, which the
worker then puts back in the epoll set with any pipelined bytes. A worker goes on with
the next parked request of the same source, or with the connection's own next request
if it arrives whole within ``LINGER`` (2 ms: a client calling in a loop is answered
by one thread, without a hand-over per call); a request costs one hand-over between
threads at most (selector to worker). Sockets stay non-blocking throughout: the
handler writes with ``send_all``, which polls only when the client's window is full
(no mode switch, no poll before every send).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from typing import Any

from plc.httphead import MAX_HEAD, FramingError, framing, head_end

log = logging.getLogger("plc.httpconn")

IDLE_TIMEOUT = 120.0   # an idle keep-alive connection
WRITE_TIMEOUT = 30.0   # a worker writing a reply to a client that does not read it
_SCAN = 0.25           # how often deadlines are looked at
_RECV = 256 * 1024
INFLIGHT_PER_SOURCE = 1  # requests of one client address answered at once
LINGER = 0.002         # how long a worker waits for a kept connection's next request


class Waiting:
    """A connection in the selector: its bytes so far and its deadline."""

    __slots__ = ("sock", "addr", "source", "buf", "since", "deadline", "started", "need",
                 "length", "expect", "reserved", "handshaken")

    def __init__(self, sock: socket.socket, addr: Any, now: float, tls: bool) -> None:
        self.sock = sock
        self.addr = addr
        self.source = addr[0]
        self.buf = bytearray()
        self.handshaken = not tls
        self.since = now
        self.started = False      # first byte of the current request seen
        self.deadline = now + IDLE_TIMEOUT
        self.need = -1            # head + body size once the head is complete
        self.length: int | None = None
        self.expect = False
        self.reserved = 0

    def reset(self, now: float) -> None:
        self.since, self.started, self.need, self.length = now, False, -1, None
        self.expect, self.deadline = False, now + IDLE_TIMEOUT


class Limits:
    def __init__(self, max_connections: int, max_per_source: int, threads: int,
                 head_timeout: float, body_min_rate: int, max_buffered: int,
                 max_body: int) -> None:
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self.threads = threads
        self.head_timeout = head_timeout
        self.body_min_rate = body_min_rate
        self.max_buffered = max_buffered
        self.max_body = max_body


class Reception:
    """The selector loop and the worker pool of one process (built after any fork:
    its epoll set, pipe and threads are its own).

    The connection table (``waiting``, ``per_source``, ``serving``, ``parked``,
    ``buffered``) is shared by the selector thread and the workers under ``state``:
    a worker that has answered takes the next parked request of its source itself and
    puts its connection back in the epoll set itself, so a request costs one hand-over
    (selector to worker) instead of a round trip through a wake-up pipe."""

    def __init__(self, listener: socket.socket, limits: Limits, handle: Any) -> None:
        self.listener = listener
        self.limits = limits
        self.handle = handle  # (sock, addr, request bytes, length) -> keep connection?
        self.tls = isinstance(listener, ssl.SSLSocket)
        self.epoll = select.epoll()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.state = threading.Lock()             # the connection table below
        self.waiting: dict[int, Waiting] = {}     # fd -> connection in the epoll set
        self.per_source: dict[str, int] = {}      # open connections (waiting or served)
        self.serving: dict[str, int] = {}         # requests with a worker, per source
        self.parked: dict[str, collections.deque[Waiting]] = {}  # and waiting for one
        self.buffered = 0
        self.jobs: queue.SimpleQueue[Waiting | None] = queue.SimpleQueue()
        self.lock = threading.Lock()              # the worker counts below
        self.workers = 0
        self.idle_workers = 0
        self.stopping = False
        self.next_scan = 0.0

    # -- the selector thread ------------------------------------------------------------
    def run(self, stop: threading.Event, poll_interval: float) -> None:
        self.listener.setblocking(False)
        listen_fd = self.listener.fileno()
        self.epoll.register(listen_fd, select.EPOLLIN)
        self.epoll.register(self.wake_r, select.EPOLLIN)
        try:
            while not stop.is_set():
                events = self.epoll.poll(min(poll_interval, _SCAN))
                with self.state:
                    for fd, _ in events:
                        if fd == listen_fd:
                            self._accept()
                        elif fd == self.wake_r:
                            self._drain_wake()
                        else:
                            conn = self.waiting.get(fd)
                            if conn is not None:  # else: left the set since the poll
                                self._readable(conn)
                    now = time.monotonic()
                    if now >= self.next_scan:
                        self.next_scan = now + _SCAN
                        self._expire(now)
        finally:
            self.close()

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wakeup is pending already, or shutting down

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, ssl.SSLError, OSError):
                return
            self._admit(sock, addr)

    def _admit(self, sock: socket.socket, addr: Any) -> None:
        lim = self.limits
        source = addr[0]
        if self.per_source.get(source, 0) >= lim.max_per_source:
            _refuse(sock, 503, "Service Unavailable (too many connections from your address)")
            return
        if len(self.waiting) + self.busy() >= lim.max_connections and not self._evict():
            _refuse(sock, 503, "Service Unavailable")
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        except OSError:
            sock.close()
            return
        conn = Waiting(sock, addr, time.monotonic(), self.tls)
        if self.tls:  # the handshake counts towards the head's deadline
            conn.started = True
            conn.deadline = conn.since + lim.head_timeout
        self.per_source[source] = self.per_source.get(source, 0) + 1
        self._wait(conn)

    def busy(self) -> int:
        return sum(self.per_source.values()) - len(self.waiting)

    def _evict(self) -> bool:
        """Close the connection that has waited longest; False if none waits."""
        if not self.waiting:
            return False
        oldest = min(self.waiting.values(), key=lambda c: c.since)
        self._close(oldest, 503 if oldest.started else 0, "Service Unavailable")
        return True

    def _wait(self, conn: Waiting) -> None:
        fd = conn.sock.fileno()
        self.waiting[fd] = conn
        self.epoll.register(fd, select.EPOLLIN)
        if conn.buf:  # pipelined: the next request may be complete already
            self._advance(conn, time.monotonic())

    def _unwait(self, conn: Waiting) -> None:
        fd = conn.sock.fileno()
        if self.waiting.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    def _close(self, conn: Waiting, status: int = 0, text: str = "") -> None:
        self._unwait(conn)
        self._unreserve(conn)
        count = self.per_source.get(conn.source, 1) - 1
        if count:
            self.per_source[conn.source] = count
        else:
            self.per_source.pop(conn.source, None)
        _refuse(conn.sock, status, text)

    def _unreserve(self, conn: Waiting) -> None:
        self.buffered -= conn.reserved
        conn.reserved = 0

    def _readable(self, conn: Waiting) -> None:
        try:
            data = _receive(conn)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (OSError, ValueError):
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.buf += data
        self._advance(conn, time.monotonic())

    def _advance(self, conn: Waiting, now: float) -> None:
        lim = self.limits
        if not conn.started:
            while conn.buf[:2] == b"\r\n":  # RFC 9112 2.2: empty lines before a request
                del conn.buf[:2]
            if not conn.buf:
                return
            conn.started = True
            conn.deadline = now + lim.head_timeout
        if conn.need < 0:
            end = head_end(conn.buf)
            if end < 0:
                if len(conn.buf) > MAX_HEAD:
                    self._close(conn, 431, "Request Header Fields Too Large")
                return
            try:
                length, expect = framing(bytes(conn.buf[:end]))
            except FramingError as e:
                self._close(conn, e.status, e.text)
                return
            size = length or 0
            if size > lim.max_body:
                self._close(conn, 413, f"Payload Too Large (limit {lim.max_body} bytes)")
                return
            if self.buffered + size > lim.max_buffered:
                self._close(conn, 503, "Service Unavailable (too many bodies in transit)")
                return
            conn.reserved = size
            self.buffered += size
            conn.need, conn.length, conn.expect = end + size, length, expect
            conn.deadline = now + lim.head_timeout + size / lim.body_min_rate
            if expect:  # as http.server does: even when the body came along
                first = bytes(conn.buf[:conn.buf.find(b"\n")])
                if first.rstrip().endswith(b"HTTP/1.1"):
                    try:
                        conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    except (OSError, ssl.SSLError):
                        pass
        if len(conn.buf) < conn.need:
            return
        self._unwait(conn)
        self._dispatch(conn)

    def _expire(self, now: float) -> None:
        late = [c for c in self.waiting.values() if c.deadline <= now]
        for conn in late:
            if conn.started:
                self._close(conn, 408, "Request Timeout")
            else:
                self._close(conn)

    # -- the workers ----------------------------------------------------------------------
    def _dispatch(self, conn: Waiting) -> None:
        """Hand a complete request to a worker; a source with ``INFLIGHT_PER_SOURCE``
        requests being answered waits its turn, so one client's flood cannot take every
        worker (and the interpreter lock) from the others. (Under ``state``.)"""
        source = conn.source
        if self.serving.get(source, 0) >= INFLIGHT_PER_SOURCE:
            self.parked.setdefault(source, collections.deque()).append(conn)
            return
        self.serving[source] = self.serving.get(source, 0) + 1
        with self.lock:
            spawn = self.idle_workers == 0 and self.workers < self.limits.threads
            if spawn:
                self.workers += 1
        if spawn:
            threading.Thread(target=self._work, name="plc-worker", daemon=True).start()
        self.jobs.put(conn)

    def _give_back(self, conn: Waiting, keep: bool) -> Waiting | None:
        """A worker is done with ``conn``: back into the epoll set (or closed), and the
        next parked request of the same source, which the worker answers in the same
        turn, or None (the turn ends). (Under ``state``.)"""
        self._unreserve(conn)
        nxt = None
        queue_ = self.parked.get(conn.source)
        if queue_:
            nxt = queue_.popleft()
            if not queue_:
                del self.parked[conn.source]
        else:
            count = self.serving.get(conn.source, 1) - 1
            if count:
                self.serving[conn.source] = count
            else:
                self.serving.pop(conn.source, None)
        if not keep or self.stopping:
            self._close(conn)
        else:
            conn.reset(time.monotonic())
            self._wait(conn)
        return nxt

    def _work(self) -> None:
        while True:
            with self.lock:
                self.idle_workers += 1
            conn = self.jobs.get()
            with self.lock:
                self.idle_workers -= 1
            if conn is None:
                with self.lock:
                    self.workers -= 1
                return
            while conn is not None:
                keep = True
                try:
                    while keep:
                        keep = self._answer(conn)
                        if not keep or not self._next_is_here(conn):
                            break
                finally:
                    with self.state:
                        conn = self._give_back(conn, keep)

    def _answer(self, conn: Waiting) -> bool:
        """Answer the complete request at the head of ``conn.buf``; keep the connection?"""
        request = bytes(conn.buf[:conn.need])
        del conn.buf[:conn.need]
        try:  # the socket stays non-blocking (the handler's promise)
            return bool(self.handle(conn.sock, conn.addr, request, conn.length))
        except Exception:  # the handler answers its own errors; this is a bug
            log.exception("unexpected error answering %s", conn.source)
            return False

    def _next_is_here(self, conn: Waiting) -> bool:
        """After an answer on a keep-alive connection: is the client's next request here
        (whole) within ``LINGER`` seconds? Then this worker answers it too, sparing the
        hand-over to the selector thread (whose wake-up and interpreter-lock ping-pong
        cost a client calling in a loop ~25% more CPU per call). Anything else (nothing
        yet, part of a request, a request the selector must judge: framing errors,
        ``Expect``, a large body) goes back to the selector with the bytes read, under
        its deadlines; so a client holds a worker at most ``LINGER`` beyond its answer,
        and only one that sent a whole request. The worker lingers only when no other
        request of its source waits (one request at a time per source, in turn) and no
        request waits for a worker (one arriving meanwhile gets a new worker thread
        while there are fewer than ``threads``, or waits ``LINGER`` at most)."""
        if self.stopping or self.parked.get(conn.source) or not self.jobs.empty():
            return False
        try:
            if not conn.buf:
                if not _poll_in(conn.sock, LINGER):
                    return False
                data = _receive(conn)
                if not data:
                    return False  # closed: the selector sees it again and closes
                conn.buf += data
        except (OSError, ValueError):  # SSL wants more, or the socket broke: selector
            return False
        return self._complete(conn)

    def _complete(self, conn: Waiting) -> bool:
        """Frame the plain, whole request at the head of ``conn.buf`` (no reservation:
        its bytes are read already, one receive at most); False for anything else."""
        buf = conn.buf
        end = head_end(buf)
        if end <= 0 or buf[:2] == b"\r\n":
            return False
        try:
            length, expect = framing(bytes(buf[:end]))
        except FramingError:
            return False
        need = end + (length or 0)
        if expect or (length or 0) > self.limits.max_body or len(buf) < need:
            return False
        conn.need, conn.length, conn.expect = need, length, expect
        return True

    # -- shutdown -------------------------------------------------------------------------
    def close(self) -> None:
        with self.state:  # workers still answering close their connections on return
            self.stopping = True
            for conn in list(self.waiting.values()):
                self._close(conn)
            for parked in self.parked.values():
                for conn in parked:
                    self._close(conn)
            self.parked.clear()
            self.epoll.close()
        with self.lock:
            n = self.workers
        for _ in range(n):
            self.jobs.put(None)
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


def _receive(conn: Waiting) -> bytes:
    """What a non-blocking socket has (a TLS handshake first if due); b"" at its end."""
    sock = conn.sock
    if not conn.handshaken:
        sock.do_handshake()  # type: ignore[attr-defined]
        conn.handshaken = True
    data = sock.recv(_RECV)
    while data and isinstance(sock, ssl.SSLSocket) and sock.pending():
        data += sock.recv(sock.pending())
    return data


def _poll_in(sock: socket.socket, timeout: float) -> bool:
    """Has ``sock`` bytes to read (or an end) within ``timeout`` seconds?"""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def send_all(sock: socket.socket, data: bytes, timeout: float) -> None:
    """Send all of ``data`` on the non-blocking ``sock`` (plain or TLS) within
    ``timeout`` seconds (TimeoutError after); no syscall beyond the send when the
    socket buffer takes it, as it usually does."""
    view = memoryview(data)
    deadline = 0.0
    while view:
        try:
            view = view[sock.send(view):]
            continue
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except (BlockingIOError, ssl.SSLWantWriteError):
            events = select.POLLOUT
        now = time.monotonic()
        if not deadline:
            deadline = now + timeout
        if now >= deadline:
            raise TimeoutError("client did not read its reply")
        poller = select.poll()
        poller.register(sock, events)
        poller.poll((deadline - now) * 1000)


def _refuse(sock: socket.socket, status: int, text: str) -> None:
    """Best effort: a short error answer (status 0: none), then close."""
    if status:
        body = f"{status} {text}\n".encode()
        reason = text.split(" (")[0]
        try:
            sock.setblocking(False)
            sock.send(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8"
                      f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                      .encode() + body)
        except (OSError, ssl.SSLError, ValueError):
            pass
    try:
        sock.close()
    except OSError:
        pass
