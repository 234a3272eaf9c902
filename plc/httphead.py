"""Reading an HTTP request head without the email parser, for the common request.

``http.server`` parses every request's headers with ``email.parser`` (about 18 us a
request, as much as the XML-RPC body). A client such as xmlrpc.client sends a head
that is already in the read buffer and made of plain ``Name: value`` lines; for such a
head, ``buffered_headers`` builds the same ``HTTPMessage`` (same header list, same
values, empty payload) directly. Any other head (folded or odd lines, bare LF line
ends, control or non-ASCII bytes, more than 100 lines, not yet fully received) is left
to the stdlib parser, which then reads it exactly as before.
"""

from __future__ import annotations

import email.utils
import re
import time
from http.client import HTTPMessage
from typing import Any

MAX_HEADERS = 100   # http.client._MAXHEADERS: more lines are refused by the stdlib path
MAX_HEAD = 65536    # http.client._MAXLINE
# a header name is what email.feedparser accepts (printable ASCII but ':'); the value is
# everything after the colon and the spaces/tabs that follow it (compat32 policy)
_LINE = re.compile(rb"([\x21-\x39\x3b-\x7e]+):[ \t]*([\x20-\x7e\t]*)\r\n")
_HEAD = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+:[\x20-\x7e\t]*\r\n)*")


def buffered_headers(rfile: Any, message_class: type[HTTPMessage] = HTTPMessage) \
        -> HTTPMessage | None:
    """The headers of the request head waiting in ``rfile``'s buffer, consumed; or None
    (nothing consumed) when the stdlib parser must read them."""
    peek = getattr(rfile, "peek", None)
    if peek is None:
        return None
    buf = peek()
    if buf.startswith(b"\r\n"):
        head, size = b"", 2
    else:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head, size = buf[:end + 2], end + 4
    if size > MAX_HEAD or head.count(b"\n") > MAX_HEADERS or not _HEAD.fullmatch(head):
        return None
    msg = message_class()
    for name, value in _LINE.findall(head):
        msg.set_raw(name.decode("ascii"), value.decode("ascii"))
    msg.set_payload("")
    rfile.read(size)
    return msg


_API_POST = re.compile(rb"POST /PLCAPI/ HTTP/1\.([01])\r\n")
_CONNECTION = re.compile(rb"\r\nconnection:[ \t]*([\x20-\x7e\t]*)\r\n", re.IGNORECASE)


def api_post(request: bytes) -> tuple[int, bool] | None:
    """(offset of the body, close the connection after it?) of the usual API call:
    ``POST /PLCAPI/ HTTP/1.x`` with a plain head (what ``buffered_headers`` reads); None
    for any other request, which then goes through the full request handler.

    "close" is what http.server decides for such a request: HTTP/1.0 closes unless the
    first Connection header says keep-alive, HTTP/1.1 keeps unless it says close."""
    line = _API_POST.match(request)
    if line is None:
        return None
    start = line.end()
    if request.startswith(b"\r\n", start):
        end = start
        size = 2
    else:
        end = request.find(b"\r\n\r\n", start)
        if end < 0:
            return None
        end += 2
        size = end + 2 - start
    if (size > MAX_HEAD or request.count(b"\n", start, end) > MAX_HEADERS
            or not _HEAD.fullmatch(request, start, end)):
        return None
    close = line.group(1) == b"0"
    conn = _CONNECTION.search(request, start - 2, end)
    if conn is not None:
        value = conn.group(1).lower()
        if value == b"close":
            close = True
        elif value == b"keep-alive":
            close = False
    return start + size, close


class FramingError(Exception):
    """A request head whose body cannot be delimited: answered ``status`` and closed."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


_HEAD_END = re.compile(rb"\r?\n\r?\n")
# a header line whose name (ASCII whitespace around it ignored) matters for framing
_FRAMING = re.compile(rb"\n[ \t\r\x0b\x0c]*(content-length|transfer-encoding|expect)"
                      rb"[ \t\r\x0b\x0c]*:([^\n]*)", re.IGNORECASE)
_DIGITS = re.compile(rb"[0-9]{1,18}")


def head_end(buf: bytes | bytearray) -> int:
    """The offset just past the blank line that ends the head in ``buf``, or -1."""
    m = _HEAD_END.search(buf)
    return m.end() if m else -1


def framing(head: bytes) -> tuple[int | None, bool]:
    """(body length, Expect: 100-continue) of a request head (request line included).

    The length is None without Content-Length. RFC 9112 section 6.3: a Content-Length
    that is not ASCII digits, or several that differ, make the framing invalid (400;
    ``int()`` would take "²" or " 1_0"); identical repeated values are one value.
    Transfer-Encoding is not accepted (411), as before.
    """
    lengths: set[bytes] = set()
    expect = False
    for match in _FRAMING.finditer(head):  # the lines after the request line
        name = match.group(1).lower()
        value = match.group(2)
        if name == b"content-length":
            for item in value.split(b","):
                item = item.strip(b" \t\r")
                if not _DIGITS.fullmatch(item):
                    raise FramingError(400, "Bad Request (invalid Content-Length)")
                lengths.add(item.lstrip(b"0") or b"0")
        elif name == b"transfer-encoding":
            raise FramingError(411, "Length Required (chunked bodies are not accepted)")
        elif name == b"expect":
            expect = value.strip(b" \t\r").lower() == b"100-continue"
    if len(lengths) > 1:
        raise FramingError(400, "Bad Request (conflicting Content-Length headers)")
    length = int(lengths.pop()) if lengths else None
    return length, expect


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """email.utils.formatdate(now, usegmt=True), formatted once per second."""
    global _date
    now = time.time()
    second = int(now)
    cached = _date
    if cached[0] != second:
        cached = _date = (second, email.utils.formatdate(now, usegmt=True))
    return cached[1]
