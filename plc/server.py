"""The HTTP(S) front end: POST /PLCAPI/ (slashes collapsed), XML-RPC with nil.

HTTP/1.1 with keep-alive. plc.httpconn reads each request whole under deadlines (slow
clients cost a socket, not a thread) and hands it to a worker thread here, which takes
a pooled store connection for it. Bodies are bounded (413), must be XML-RPC without a
document type declaration (400 otherwise), and a call's fault or result is marshalled
inside its transaction's lifetime; an unexpected error answers fault 111 without
details. Only GET/POST on /PLCAPI/ is served (404 elsewhere). Only the method name,
the caller and the fault code are logged, never arguments (passwords).
"""

from __future__ import annotations

import ctypes
import io
import ipaddress
import logging
import os
import re
import signal
import socket
import ssl
import threading
import xmlrpc.client
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from plc.api import API, InternalError
from plc.config import Config, ConfigError, parse_listen
from plc.faults import PLCAPIError
from plc.httpconn import WRITE_TIMEOUT, Limits, Reception, send_all
from plc.httphead import api_post, buffered_headers, http_date
from plc.marshal import BadCall, load_call, marshal_response
from plc.store import Store
from plc.store.base import Connection

log = logging.getLogger("plc.server")

GET_PAGE = (b"<html><head><title>PLCAPI</title></head><body>"
            b"<h1>PLCAPI</h1><p>Please use XML-RPC or SOAP to access the PLCAPI.</p>"
            b"</body></html>\n")
_API_PATH = re.compile(r"^/PLCAPI/?$")
MAX_CONNECTIONS = 512
POOL_IDLE = 32


class PLCServer(HTTPServer):
    """The listening socket, the store connection pool and the limits; connections are
    read by a ``plc.httpconn.Reception`` (one selector thread) and complete requests are
    answered by its worker threads. Each worker takes a pooled store connection for
    one request and gives it back, so connections are neither leaked nor reopened."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, api: API, address: tuple[str, int], max_body: int,
                 ssl_context: ssl.SSLContext | None = None,
                 max_connections: int = MAX_CONNECTIONS, config: Config | None = None) -> None:
        cfg = config or api.config
        self.api = api
        self.max_body = max_body
        self.limits = Limits(max_connections=max_connections,
                             max_per_source=cfg.api_max_per_source,
                             threads=cfg.api_threads, head_timeout=cfg.api_head_timeout,
                             body_min_rate=cfg.api_body_min_rate,
                             max_buffered=max(cfg.api_max_buffered, max_body),
                             max_body=max_body)
        self.local = threading.local()
        self._idle: list[Connection] = []
        self._all: set[Connection] = set()
        self._pool_lock = threading.Lock()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self.reception: Reception | None = None
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)  # type: ignore[arg-type]
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True,
                                                  do_handshake_on_connect=False)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until ``shutdown()`` (the selector loop runs in the calling thread; its
        pipe and workers are made here, after any fork)."""
        self._stopped.clear()
        try:
            self.reception = Reception(self.socket, self.limits, self.answer)
            self.reception.run(self._stop, poll_interval)
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._stop.set()
        if self.reception is not None:
            self.reception.wake()
        self._stopped.wait()

    def answer(self, sock: socket.socket, addr: Any, request: bytes,
               length: int | None) -> bool:
        """Answer one complete request on the non-blocking ``sock`` (left non-blocking);
        True to keep the connection open.

        The usual call (``POST /PLCAPI/`` with a plain head and a well-formed body) is
        answered here directly with the bytes ``Handler`` would send; every other
        request goes through ``Handler`` (http.server's parsing and error answers)."""
        try:
            post = api_post(request) if length is not None else None
            if post is not None:
                start, close = post
                try:
                    params, method = load_call(request[start:start + length])  # type: ignore[operator]
                except BadCall:
                    pass  # Handler answers 400
                else:
                    reply = call_reply(self, method, params, addr)
                    send_all(sock, _reply_head(len(reply)) + reply, WRITE_TIMEOUT)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug('%s "%s" 200 -', addr[0],
                                  request[:request.find(b"\r\n")].decode("latin-1"))
                    return not close
            sock.settimeout(WRITE_TIMEOUT)
            handler = Handler(sock, addr, self, request, length)
            sock.setblocking(False)
            return not handler.close_connection
        except OSError:  # the client went away mid-answer, or did not read in time
            return False
        finally:
            self._release()

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
    """One complete request (read by the reception) answered on ``sock``."""

    protocol_version = "HTTP/1.1"
    # buffered: status line, headers and body leave in one send (http.server flushes
    # wfile after each request)
    wbufsize = 64 * 1024
    server: PLCServer
    server_version = "PLCAPI"
    raw_requestline: bytes  # set by BaseHTTPRequestHandler.handle_one_request

    def __init__(self, sock: socket.socket, addr: Any, server: PLCServer, request: bytes,
                 length: int | None) -> None:
        self._request_bytes = request
        self.body_length = length  # Content-Length as the reception read it
        super().__init__(sock, addr, server)  # type: ignore[arg-type]

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BufferedReader(io.BytesIO(self._request_bytes))  # type: ignore[arg-type]
        self.wfile = self.connection.makefile("wb", self.wbufsize)

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def handle_expect_100(self) -> bool:
        return True  # the reception sent "100 Continue" before it read the body

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", self.client_address[0], format % args)

    def date_time_string(self, timestamp: float | None = None) -> str:
        return http_date() if timestamp is None else super().date_time_string(timestamp)

    def parse_request(self) -> bool:
        """BaseHTTPRequestHandler.parse_request, with a fast path for the usual request
        ("METHOD PATH HTTP/1.x" and a plain head, see plc.httphead); every other request
        goes through the stdlib code unchanged."""
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

    def _is_api_path(self) -> bool:
        path = self.path
        if path != "/PLCAPI/":
            path = re.sub(r"/+", "/", path.split("?", 1)[0])
        return bool(_API_PATH.match(path))

    def do_GET(self) -> None:
        # legacy plc.wsgi answers every non-POST method on the API path with the page
        # (spec 1.1); any other path is not served: a NodeManager fetching a conf file
        # with `curl --fail` must not install this page as the file (issue 9)
        if self._is_api_path():
            self._send(200, GET_PAGE)
        else:
            self._error(404, "Not Found (the API is at /PLCAPI/)")

    do_HEAD = do_GET
    do_PUT = do_GET
    do_DELETE = do_GET
    do_OPTIONS = do_GET
    do_PATCH = do_GET

    def do_POST(self) -> None:
        if not self._is_api_path():
            self._error(404, "Not Found (the API is at /PLCAPI/)")
            return
        length = self.body_length
        if length is None:
            self._error(411, "Length Required")
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return
        try:
            params, method = load_call(body)
        except BadCall as e:
            self._error(400, f"Bad Request ({e})")
            return
        reply = call_reply(self.server, method, params, self.client_address)
        self._send(200, reply, "text/xml; charset=utf-8")


def call_reply(server: PLCServer, method: str, params: tuple[Any, ...], addr: Any) -> bytes:
    """The methodResponse to one call: its result, or the fault it raised (an unexpected
    error is fault 111 without details)."""
    try:
        conn = server.connection()
        result = server.api.run(conn, method, params, addr[:2])
        return marshal_response(result)
    except xmlrpc.client.Fault as fault:
        log.info("%s: fault %s", method, fault.faultCode)
        return _fault_reply(fault)
    except InternalError:  # logged with its traceback by API.run
        return _fault_reply(PLCAPIError(_INTERNAL))
    except Exception:  # e.g. a result XML-RPC cannot carry (an int beyond 32 bits)
        log.exception("unexpected error serving %s", method)
        return _fault_reply(PLCAPIError(_INTERNAL))


def _reply_head(length: int) -> bytes:
    """The head ``Handler._send`` writes for a 200 XML reply of ``length`` bytes."""
    return (f"HTTP/1.1 200 OK\r\nServer: {_SERVER}\r\nDate: {http_date()}\r\n"
            f"Content-Type: text/xml; charset=utf-8\r\nContent-Length: {length}\r\n\r\n"
            ).encode("latin-1")


_INTERNAL = "unexpected error, see the server log"
_SERVER = f"{Handler.server_version} {Handler.sys_version}"


def _fault_reply(fault: xmlrpc.client.Fault) -> bytes:
    """A methodResponse carrying ``fault`` (an unexpected error never becomes HTTP 500
    or a dropped connection: issue 9)."""
    fault.faultString = _clean(str(fault.faultString))
    return xmlrpc.client.dumps(fault, methodresponse=True, allow_none=True,
                               encoding="utf-8").encode("utf-8", "replace")


def _clean(text: str) -> str:
    return re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]", "?", text)


def tls_context(config: Config) -> ssl.SSLContext:
    """The server's TLS context from [api] cert and key; a ConfigError names the key
    and the file that is missing, unreadable or not what it should be."""
    for key, path in (("cert", config.api_cert), ("key", config.api_key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{config.source}: [api] {key} = {path!r}: "
                              f"{exc.strerror}") from None
    try:   # the certificate alone first, to tell a bad certificate from a bad key
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(config.api_cert)
    except ssl.SSLError:
        raise ConfigError(f"{config.source}: [api] cert = {config.api_cert!r}: not a PEM "
                          "certificate") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.api_cert, config.api_key)
    except ssl.SSLError as exc:
        raise ConfigError(f"{config.source}: [api] key = {config.api_key!r}: not a PEM "
                          f"private key, or not the key of [api] cert {config.api_cert!r} "
                          f"({exc.reason or exc})") from None
    return context


def make_server(api: API, config: Config) -> PLCServer:
    host, port = parse_listen(config.api_listen, "[api] listen")
    context = tls_context(config) if config.api_cert else None
    try:
        return PLCServer(api, (host, port), config.api_max_body, context,
                         config.api_max_connections, config)
    except OSError as exc:
        raise ConfigError(f"{config.source}: [api] listen = {config.api_listen!r}: cannot "
                          f"bind {host} port {port}: {exc.strerror or exc}") from None


def plain_http_warning(config: Config) -> str | None:
    """The warning for serving plain HTTP beyond this host (passwords, session keys and
    node keys' HMACs would cross the network in clear), or None."""
    if config.api_cert:
        return None
    host, port = parse_listen(config.api_listen, "[api] listen")
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may be anything
    return (f"SERVING PLAIN HTTP ON {host}:{port}, NOT ONLY ON LOOPBACK: passwords and "
            f"sessions travel in clear; set [api] cert and key to serve HTTPS, or listen "
            f"on 127.0.0.1 behind a TLS proxy")


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
    warning = plain_http_warning(config)
    if warning:
        log.warning("%s", warning)
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
    from planetlab.version import version

    log.info("PLCAPI serving on %s://%s:%s/PLCAPI/ (%d processes): plc %s, config %s, "
             "database %s", scheme, host, port, workers, version(), config.source,
             getattr(store, "path", None) or store.url)
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
