"""XML-RPC client for PLC with node authentication (plcapi spec §2.3, §2.4).

Calls use the node's session (`{'AuthMethod': 'session', 'session': S}`) kept in
`<state_dir>/session`. When there is no session, or PLC answers a call with an
authentication fault (103), the client asks for a new session with one HMAC-signed
`GetSession()` call made with the node key, stores it, and retries once.

The blocking `xmlrpc.client` runs in a worker thread (`trio.to_thread.run_sync`) with a
socket timeout, so a hung PLC never blocks the agent's other tasks; the trio side is
also cancellable. HTTPS is verified against `ca_file` (or the system CAs).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import os
import socket
import ssl
import urllib.parse
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from agent.ports import is_loopback_url

log = logging.getLogger("agent.plc")

FAULT_AUTH = 103
MAX_REPLY = 256 << 20   # a GetSlivers reply for thousands of slivers is a few MB


class PLCError(Exception):
    """A call to PLC failed. `kind` is 'unreachable', 'fault' or 'protocol'."""

    def __init__(self, kind: str, message: str, fault_code: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.fault_code = fault_code


#: ssl.SSLError reasons of a TLS client talking to a plain-HTTP server (OpenSSL 1.1 to 3.x).
PLAIN_HTTP_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                                "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"})


def _flatten(value: Any, out: list[str]) -> None:
    if isinstance(value, (list, tuple)):
        for item in value:
            _flatten(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _flatten(item, out)
    else:
        out.append(str(value))


def hmac_message(args: tuple[Any, ...]) -> str:
    """The canonical message of plcapi §2.4: the call's arguments after the auth struct,
    flattened (dict values only, recursively), str()'d, sorted, concatenated, bracketed."""
    parts: list[str] = []
    _flatten(list(args), parts)
    parts.sort()
    return "[" + "".join(parts) + "]"


def hmac_auth(node_id: int, node_key: str, args: tuple[Any, ...]) -> dict[str, Any]:
    """BootAuth struct; the key is used as UTF-8 bytes (the Python 3 NM passed a str: §1.2)."""
    digest = hmac.new(node_key.encode("utf-8"), hmac_message(args).encode("utf-8"),
                      hashlib.sha1).hexdigest()
    return {"AuthMethod": "hmac", "node_id": node_id, "value": digest}


class _TimeoutTransport(xmlrpc.client.Transport):
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


class _TimeoutSafeTransport(xmlrpc.client.SafeTransport):
    def __init__(self, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPSConnection:
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


class PLCClient:
    """One node's connection to PLC. `credentials` returns (node_id, node_key) when asked,
    so a missing key file only matters once a session is really needed."""

    def __init__(self, url: str, state_dir: str | Path,
                 credentials: Callable[[], tuple[int, str]],
                 ca_file: str = "", timeout: float = 60.0, hostname: str = "") -> None:
        self.url = url
        self.hostname = hostname
        self.node_id: int | None = None
        self.session_path = Path(state_dir) / "session"
        self._credentials = credentials
        self._timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if url.startswith("https://"):
            self._ssl = ssl.create_default_context(cafile=ca_file or None)
        elif not is_loopback_url(url):
            # config.load refuses this without insecure_plc = 1 (F19, F30).
            log.warning("plc_url %s is plain http to a host that is not loopback "
                        "(insecure_plc): the node session, slices' keys and initscripts "
                        "cross the network in clear", url)

    # -- session file ----------------------------------------------------------------------

    def load_session(self) -> str | None:
        try:
            text = self.session_path.read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def _save_session(self, session: str) -> None:
        tmp = self.session_path.with_name("session.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(session + "\n")
        os.replace(tmp, self.session_path)

    # -- calls --------------------------------------------------------------------------------

    def _proxy(self) -> xmlrpc.client.ServerProxy:
        transport: xmlrpc.client.Transport
        if self._ssl is not None:
            transport = _TimeoutSafeTransport(self._timeout, self._ssl)
        else:
            transport = _TimeoutTransport(self._timeout)
        return xmlrpc.client.ServerProxy(self.url, transport=transport, allow_none=True)

    def _call_blocking(self, method: str, auth: dict[str, Any], args: tuple[Any, ...]) -> Any:
        try:
            return getattr(self._proxy(), method)(auth, *args)
        except xmlrpc.client.Fault as exc:
            raise PLCError("fault", f"PLC {method}: fault {exc.faultCode}: {exc.faultString}",
                           exc.faultCode) from None
        except xmlrpc.client.ProtocolError as exc:
            raise PLCError("protocol", self._http_text(method, exc.errcode, exc.errmsg)) from None
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, OSError) and self._handshake_failed(exc):
                raise PLCError("unreachable", self._tls_text(method, exc)) from None
            raise PLCError("unreachable", f"PLC {method} at {self.url}: {exc}") from None
        except xmlrpc.client.ResponseError as exc:
            raise PLCError("protocol", f"PLC {method}: malformed response: {exc}") from None

    def _post_blocking(self, method: str, auth: dict[str, Any], args: tuple[Any, ...]) -> bytes:
        """One call, returning the raw methodResponse body (a fault is raised decoded)."""
        parts = urllib.parse.urlsplit(self.url)
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname or "", parts.port or 443,
                                               timeout=self._timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80,
                                              timeout=self._timeout)
        body = xmlrpc.client.dumps((auth, *args), method, allow_none=True).encode()
        try:
            conn.request("POST", parts.path or "/", body, {"Content-Type": "text/xml"})
            resp = conn.getresponse()
            data = resp.read(MAX_REPLY + 1)
            if resp.status != 200:
                raise PLCError("protocol", self._http_text(method, resp.status, resp.reason))
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, OSError) and self._handshake_failed(exc):
                raise PLCError("unreachable", self._tls_text(method, exc)) from None
            raise PLCError("unreachable", f"PLC {method} at {self.url}: {exc}") from None
        finally:
            conn.close()
        if len(data) > MAX_REPLY:
            raise PLCError("protocol", f"PLC {method}: reply larger than {MAX_REPLY} bytes")
        if b"<fault>" in data[:512]:
            try:
                xmlrpc.client.loads(data)
            except xmlrpc.client.Fault as exc:
                raise PLCError("fault", f"PLC {method}: fault {exc.faultCode}: "
                               f"{exc.faultString}", exc.faultCode) from None
            except Exception:  # noqa: BLE001 - a broken fault is a protocol error
                pass
            raise PLCError("protocol", f"PLC {method}: malformed fault response")
        return data

    def _http_text(self, method: str, status: int, reason: str) -> str:
        text = f"PLC {method} at {self.url}: HTTP {status} {reason}"
        if status == 404:
            text += ("; no PLCAPI at that path: check plc_url (PLC serves it at "
                     "/PLCAPI/, as in https://plc.example.org/PLCAPI/)")
        return text

    def _tls_text(self, method: str, exc: OSError) -> str:
        text = f"PLC {method} at {self.url}: TLS failed: {exc}"
        if getattr(exc, "reason", None) in PLAIN_HTTP_REASONS or self._speaks_plain_http():
            text += ("; the server answers in plain HTTP, not HTTPS: serve PLC with [api] "
                     "cert and key, or use http:// (to loopback, or with insecure_plc = 1)")
        return text

    def _speaks_plain_http(self) -> bool:
        """Whether plc_url's host and port answer a plain HTTP request (a TLS handshake
        with a plain HTTP server fails, or hangs until it times out)."""
        parts = urllib.parse.urlsplit(self.url)
        try:
            with socket.create_connection((parts.hostname or "", parts.port or 443),
                                          timeout=min(self._timeout, 5.0)) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return sock.recv(5) == b"HTTP/"
        except OSError:
            return False

    def _handshake_failed(self, exc: OSError) -> bool:
        return self.url.startswith("https://") and (
            isinstance(exc, ssl.SSLError) or "handshake" in str(exc))

    async def call_raw(self, method: str, *args: Any) -> bytes:
        """Like `call`, but the successful reply is returned undecoded."""
        session = self.load_session()
        if session is None:
            session = await self.new_session()
        for attempt in (0, 1):
            auth = {"AuthMethod": "session", "session": session}
            try:
                return await trio.to_thread.run_sync(self._post_blocking, method, auth, args,
                                                     abandon_on_cancel=True)
            except PLCError as exc:
                if attempt or exc.kind != "fault" or exc.fault_code != FAULT_AUTH:
                    raise
                log.warning("PLC refused the session (%s); renewing it by HMAC", exc)
            session = await self.new_session()
        raise AssertionError("unreachable")

    async def _call(self, method: str, auth: dict[str, Any], args: tuple[Any, ...]) -> Any:
        return await trio.to_thread.run_sync(self._call_blocking, method, auth, args,
                                             abandon_on_cancel=True)

    async def new_session(self) -> str:
        """HMAC-authenticated GetSession(); the session is stored before it is returned."""
        node_id, node_key = self._credentials()
        if not node_id:
            node_id = await self.resolve_node_id()
        try:
            session = await self._call("GetSession", hmac_auth(node_id, node_key, ()), ())
        except PLCError as exc:
            if exc.kind == "fault" and exc.fault_code == FAULT_AUTH:
                raise PLCError("fault", f"{exc}; the node key (node_id {node_id}) is not "
                               "the one PLC has for this node: compare it with what "
                               f"`plc node-key {self.hostname or 'HOSTNAME'}` prints on "
                               "PLC", exc.fault_code) from None
            raise
        if not isinstance(session, str) or not session:
            raise PLCError("protocol", f"PLC GetSession returned {type(session).__name__}, "
                           "not a session string")
        self._save_session(session)
        log.info("new PLC session obtained with the node key (node_id %d)", node_id)
        return session

    async def resolve_node_id(self) -> int:
        """This node's id from its hostname (GetNodes may be called anonymously)."""
        if self.node_id:
            return self.node_id
        if not self.hostname:
            raise PLCError("protocol", "no node_id configured and no hostname to look it up")
        nodes = await self._call("GetNodes", {"AuthMethod": "anonymous"},
                                 ({"hostname": self.hostname}, ["node_id"]))
        if (not isinstance(nodes, list) or len(nodes) != 1 or not isinstance(nodes[0], dict)
                or not isinstance(nodes[0].get("node_id"), int)):
            raise PLCError("protocol", f"PLC knows no single node named {self.hostname!r}")
        self.node_id = int(nodes[0]["node_id"])
        return self.node_id

    async def call(self, method: str, *args: Any) -> Any:
        """Call `method` with session auth, renewing the session once if PLC refuses it."""
        session = self.load_session()
        if session is None:
            session = await self.new_session()
        try:
            return await self._call(method, {"AuthMethod": "session", "session": session}, args)
        except PLCError as exc:
            if exc.kind != "fault" or exc.fault_code != FAULT_AUTH:
                raise
            log.warning("PLC refused the session (%s); renewing it by HMAC", exc)
        session = await self.new_session()
        return await self._call(method, {"AuthMethod": "session", "session": session}, args)

    async def get_ticket_key(self) -> Any:
        """PLC's slice ticket public key ({algorithm, public_key, key_id}), over the
        node's authenticated session (agent/tickets.py pins it)."""
        return await self.call("GetTicketKey")

    async def get_slivers(self) -> Any:
        return await self.call("GetSlivers")

    async def get_slivers_raw(self) -> bytes:
        return await self.call_raw("GetSlivers")
