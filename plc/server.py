"""The HTTP(S) front end: POST /PLCAPI/ (slashes collapsed), XML-RPC with nil.

A ThreadingHTTPServer speaking HTTP/1.1 with keep-alive; each thread keeps its own
store connection. Bodies are bounded (413), must be XML-RPC (400 otherwise), and a
call's fault or result is marshalled inside its transaction's lifetime; unexpected
errors answer 500 without details. Only the method name, the caller and the fault
code are logged, never arguments (passwords).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import socket
import ssl
import threading
import xmlrpc.client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from plc.api import API, InternalError
from plc.config import Config, parse_listen
from plc.httphead import buffered_headers, http_date
from plc.marshal import marshal_response
from plc.store import Store
from plc.store.base import Connection

log = logging.getLogger("plc.server")

GET_PAGE = (b"<html><head><title>PLCAPI</title></head><body>"
            b"<h1>PLCAPI</h1><p>Please use XML-RPC or SOAP to access the PLCAPI.</p>"
            b"</body></html>\n")
_API_PATH = re.compile(r"^/PLCAPI/?$")
IDLE_TIMEOUT = 120.0
MAX_CONNECTIONS = 512
POOL_IDLE = 32


class PLCServer(ThreadingHTTPServer):
    """One thread per client connection (at most ``max_connections`` at once; more are
    answered 503). Store connections are pooled: a thread takes one for its client's
    lifetime and gives it back, so connections are neither leaked nor reopened."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, api: API, address: tuple[str, int], max_body: int,
                 ssl_context: ssl.SSLContext | None = None,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.api = api
        self.max_body = max_body
        self.local = threading.local()
        self._idle: list[Connection] = []
        self._all: set[Connection] = set()
        self._pool_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True,
                                                  do_handshake_on_connect=False)

    def connection(self) -> Connection:
        """The store connection of the calling thread (taken from the pool)."""
        conn = getattr(self.local, "conn", None)
        if conn is None:
            with self._pool_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self.api.store.connect()
                with self._pool_lock:
                    self._all.add(conn)
            self.local.conn = conn
        return conn

    def _release(self) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            return
        self.local.conn = None
        conn.rollback()
        with self._pool_lock:
            if len(self._idle) < POOL_IDLE:
                self._idle.append(conn)
                return
            self._all.discard(conn)
        conn.close()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()
            self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        with self._pool_lock:
            conns, self._all, self._idle = list(self._all), set(), []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # closing at shutdown: nothing left to do
                pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # buffered: status line, headers and body leave in one send (http.server flushes
    # wfile after each request)
    wbufsize = 64 * 1024
    server: PLCServer
    server_version = "PLCAPI"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms ACK stall
    timeout = IDLE_TIMEOUT
    raw_requestline: bytes  # set by BaseHTTPRequestHandler.handle_one_request

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", self.client_address[0], format % args)

    def date_time_string(self, timestamp: float | None = None) -> str:
        return http_date() if timestamp is None else super().date_time_string(timestamp)

    def parse_request(self) -> bool:
        """BaseHTTPRequestHandler.parse_request, with a fast path for the usual request
        ("METHOD PATH HTTP/1.x" and a plain head already received, see plc.httphead);
        every other request goes through the stdlib code unchanged."""
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            return super().parse_request()
        headers = buffered_headers(self.rfile, self.MessageClass)
        if headers is None:
            return super().parse_request()
        # what the stdlib sets for such a request line (this server speaks HTTP/1.1)
        self.requestline = requestline
        self.command, path, self.request_version = words
        self.close_connection = words[2] == "HTTP/1.0"
        self.path = "/" + path.lstrip("/") if path.startswith("//") else path
        self.headers = headers
        conntype = headers.get("Connection", "").lower()
        if conntype == "close":
            self.close_connection = True
        elif conntype == "keep-alive":
            self.close_connection = False
        if headers.get("Expect", "").lower() == "100-continue" and \
                self.request_version >= "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def _send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8",
              close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, text: str) -> None:
        self._send(status, f"{status} {text}\n".encode(), "text/plain; charset=utf-8",
                   close=status in (411, 413) or status >= 500)

    def do_GET(self) -> None:
        self._send(200, GET_PAGE)

    # legacy plc.wsgi answers every non-POST method with the page (spec 1.1)
    do_HEAD = do_GET
    do_PUT = do_GET
    do_DELETE = do_GET
    do_OPTIONS = do_GET
    do_PATCH = do_GET

    def do_POST(self) -> None:
        path = self.path
        if path != "/PLCAPI/":
            path = re.sub(r"/+", "/", path.split("?", 1)[0])
        if not _API_PATH.match(path):
            self._error(404, "Not Found (the API is at /PLCAPI/)")
            return
        if self.headers.get("Transfer-Encoding"):
            self._error(411, "Length Required (chunked bodies are not accepted)")
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.strip().isdigit():
            self._error(411, "Length Required")
            return
        length = int(length_text)
        if length > self.server.max_body:
            self._error(413, f"Payload Too Large (limit {self.server.max_body} bytes)")
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return
        reply = self._dispatch(body)
        if reply is not None:
            self._send(200, reply, "text/xml; charset=utf-8")

    def _dispatch(self, body: bytes) -> bytes | None:
        if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
            self._error(400, "Bad Request (DTDs are not accepted)")
            return None
        try:
            params, method = xmlrpc.client.loads(body, use_builtin_types=True)
        except Exception:  # expat, value and type errors of malformed XML-RPC
            self._error(400, "Bad Request (not an XML-RPC methodCall)")
            return None
        if method is None:
            self._error(400, "Bad Request (not an XML-RPC methodCall)")
            return None
        api = self.server.api
        try:
            conn = self.server.connection()
            result = api.run(conn, method, params, self.client_address[:2])
            return marshal_response(result)
        except xmlrpc.client.Fault as fault:
            log.info("%s: fault %s", method, fault.faultCode)
            fault.faultString = _clean(fault.faultString)
            return xmlrpc.client.dumps(fault, methodresponse=True, allow_none=True,
                                       encoding="utf-8").encode("utf-8", "replace")
        except InternalError:
            self._error(500, "Internal Server Error")
            return None
        except Exception:
            log.exception("unexpected error serving %s", method)
            self._error(500, "Internal Server Error")
            return None


def _clean(text: str) -> str:
    return re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]", "?", text)


def make_server(api: API, config: Config) -> PLCServer:
    host, port = parse_listen(config.api_listen, "[api] listen")
    context = None
    if config.api_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(config.api_cert, config.api_key)
    return PLCServer(api, (host, port), config.api_max_body, context,
                     config.api_max_connections)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG (prctl(2)): a worker gets SIGTERM if the parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def serve(store: Store, config: Config, ready: threading.Event | None = None) -> None:
    """Serve until interrupted (KeyboardInterrupt). With more than one worker, the
    listening socket is shared by forked worker processes (each threaded, each with its
    own store connections), so requests use every core instead of one GIL; the parent
    serves too, and on its way out terminates and reaps every worker."""
    api = API(store, config)
    server = make_server(api, config)
    scheme = "https" if config.api_cert else "http"
    host, port = server.server_address[:2]
    workers = config.api_workers or os.cpu_count() or 1
    children: list[int] = []
    for _ in range(workers - 1):
        pid = os.fork()  # before any thread or store connection exists
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _die_with_parent()
                server.serve_forever()
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    log.info("PLCAPI serving on %s://%s:%s/PLCAPI/ (%d processes)", scheme, host, port, workers)
    if ready is not None:
        ready.set()
    try:
        server.serve_forever()
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        server.server_close()
