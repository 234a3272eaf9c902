"""Minimal asyncio HTTP/1.1 client (GET, one request per connection) and server for
the collector. Small on purpose: the collector talks to node sensor servers and
answers GET queries; no third-party HTTP stack is needed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

MAX_BODY = 8 << 20
MAX_HEADER = 16 << 10


class FetchError(Exception):
    pass


async def http_get(host: str, port: int, path: str, timeout: float) -> bytes:
    """Body of a 200 answer to GET path; FetchError on anything else or timeout."""
    async def run() -> bytes:
        reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEADER)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                         "Accept: application/json\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or parts[1] != "200":
                raise FetchError(f"{path}: HTTP status {lines[0]!r}")
            hdrs = {k.strip().lower(): v.strip() for k, _, v in
                    (ln.partition(":") for ln in lines[1:] if ln)}
            if hdrs.get("transfer-encoding", "").lower() == "chunked":
                chunked = bytearray()
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        break
                    chunked += await reader.readexactly(size)
                    await reader.readexactly(2)
                    if len(chunked) > MAX_BODY:
                        raise FetchError(f"{path}: body too large")
                return bytes(chunked)
            if "content-length" in hdrs:
                n = int(hdrs["content-length"])
                if n > MAX_BODY:
                    raise FetchError(f"{path}: body too large")
                return await reader.readexactly(n)
            body = await reader.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise FetchError(f"{path}: body too large")
            return body
        finally:
            writer.close()
    try:
        return await asyncio.wait_for(run(), timeout)
    except FetchError:
        raise
    except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        raise FetchError(f"{host}:{port}{path}: {type(e).__name__}: {e}") from None


async def get_json(host: str, port: int, path: str, timeout: float) -> object:
    body = await http_get(host, port, path, timeout)
    try:
        return json.loads(body)
    except ValueError as e:
        raise FetchError(f"{host}:{port}{path}: not JSON: {e}") from None


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    ctype: str = "text/plain; charset=utf-8"

    @classmethod
    def json(cls, obj: object, status: int = 200) -> Response:
        return cls(status, json.dumps(obj).encode(), "application/json")

    @classmethod
    def text(cls, text: str, status: int = 200, ctype: str = "text/plain; charset=utf-8"
             ) -> Response:
        return cls(status, text.encode(), ctype)


Handler = Callable[[Request], Awaitable[Response]]
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           500: "Internal Server Error"}


def parse_target(target: str) -> tuple[str, dict[str, str]]:
    u = urlsplit(target)
    q = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
    return u.path, q


async def serve(handler: Handler, host: str, port: int) -> asyncio.Server:
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3:
                resp = Response.text("malformed request line\n", 400)
                method = "GET"
            else:
                method = parts[0]
                path, q = parse_target(parts[1])
                if method not in ("GET", "HEAD"):
                    resp = Response.text("only GET\n", 405)
                else:
                    try:
                        resp = await handler(Request(method, path, q))
                    except Exception as e:  # noqa: BLE001 - answer, keep serving
                        resp = Response.text(f"internal error: {type(e).__name__}\n", 500)
            hdr = (f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Error')}\r\n"
                   f"Content-Type: {resp.ctype}\r\nContent-Length: {len(resp.body)}\r\n"
                   "Connection: close\r\n\r\n")
            writer.write(hdr.encode() + (resp.body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
    return await asyncio.start_server(conn, host, port, limit=MAX_HEADER, backlog=1024)
