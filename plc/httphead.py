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
