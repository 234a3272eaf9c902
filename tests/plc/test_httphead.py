"""The request-head fast path (plc.httphead, Handler.parse_request): the same headers as
the stdlib parser, the stdlib path for every other head, and the same behaviour on the
wire (keep-alive, close, HTTP/1.0, 100-continue, folded and malformed heads)."""

from __future__ import annotations

import email.utils
import io
import socket
import time
import xmlrpc.client
from http.client import HTTPMessage, parse_headers
from typing import Any
from urllib.parse import urlparse

from hypothesis import given, settings
from hypothesis import strategies as st

from plc.httphead import FramingError, api_post, buffered_headers, framing, http_date


def reader(data: bytes) -> io.BufferedReader:
    return io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]


def state(msg: HTTPMessage) -> dict[str, Any]:
    return {"headers": msg.items(), "raw": list(msg.raw_items()), "payload": msg.get_payload(),
            "defects": [type(d) for d in msg.defects], "unixfrom": msg.get_unixfrom()}


NAME = st.text(st.sampled_from("abcXYZ-_09!~;:. \t\x7f\xe9"), min_size=0, max_size=8)
VALUE = st.text(st.sampled_from("ab c:\t\r\n\x00\x1f\xe9\x7f/ "), max_size=10)
LINE = st.tuples(NAME, VALUE).map(lambda nv: f"{nv[0]}:{nv[1]}")
PLAIN = st.tuples(st.text(st.sampled_from("abXY-_09!~;."), min_size=1, max_size=8),
                  st.text(st.sampled_from("ab c:\t/ ~"), max_size=10)).map(
    lambda nv: f"{nv[0]}:{nv[1]}")
FOLD = st.text(st.sampled_from(" \tab"), min_size=1, max_size=4)
END = st.sampled_from(["\r\n", "\n", "\r"])


@st.composite
def heads(draw: Any) -> bytes:
    if draw(st.booleans()):  # mostly plain lines, CRLF ends
        lines = draw(st.lists(st.one_of(PLAIN, PLAIN, PLAIN, LINE), max_size=6))
        return "".join(line + "\r\n" for line in lines + [""]).encode("latin-1")
    lines = draw(st.lists(st.one_of(PLAIN, LINE, FOLD, NAME), max_size=6))
    text = "".join(line + draw(st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"]))
                   for line in lines)
    return (text + draw(END)).encode("latin-1")


@settings(max_examples=1500, deadline=None)
@given(heads(), st.binary(max_size=20))
def test_same_message_as_the_stdlib_or_left_to_it(head: bytes, body: bytes) -> None:
    fast_in = reader(head + body)
    fast = buffered_headers(fast_in)
    if fast is None:
        assert fast_in.tell() == 0  # nothing consumed: the stdlib reads it all
        return
    slow_in = reader(head + body)
    slow = parse_headers(slow_in)
    assert state(fast) == state(slow)
    assert fast_in.read() == slow_in.read()  # the body is left where the stdlib leaves it


def test_plain_heads_take_the_fast_path() -> None:
    head = (b"Host: 127.0.0.1:8000\r\nAccept-Encoding: gzip\r\nX-Spaces:  \t v \r\n"
            b"Content-Length: 3\r\n\r\n")
    msg = buffered_headers(reader(head + b"abc"))
    assert msg is not None
    assert msg["x-spaces"] == "v " and msg.get("Content-Length") == "3"
    assert buffered_headers(reader(b"\r\nabc")) is not None  # no headers at all
    for other in (b"A: 1\r\n folded\r\n\r\n", b"A: 1\n\n", b"A: 1\r\n", b"A b: 1\r\n\r\n",
                  b"A: \xe9\r\n\r\n", b"".join(b"H%d: x\r\n" % i for i in range(101)) + b"\r\n"):
        assert buffered_headers(reader(other)) is None, other


def framing_by_lines(head: bytes) -> tuple[int | None, bool] | tuple[int, str]:
    """The reference framing: every line after the request line, split at its first
    colon, the name stripped of ASCII whitespace and lowered (as before the regex)."""
    lengths: set[bytes] = set()
    expect = False
    for line in head.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"content-length":
            for item in value.split(b","):
                item = item.strip(b" \t\r")
                if not (item.isdigit() and item.isascii() and len(item) <= 18):
                    return 400, "invalid"
                lengths.add(item.lstrip(b"0") or b"0")
        elif name == b"transfer-encoding":
            return 411, "chunked"
        elif name == b"expect":
            expect = value.strip(b" \t\r").lower() == b"100-continue"
    if len(lengths) > 1:
        return 400, "conflicting"
    return (int(lengths.pop()) if lengths else None), expect


FRAMING_NAME = st.sampled_from(["Content-Length", "content-LENGTH", " Content-Length\t",
                                "Transfer-Encoding", "Expect", "eXpect ", "X-Content-Length",
                                "Content-Length2", "Host", "\x0bexpect"])
FRAMING_VALUE = st.sampled_from(["12", " 012", "1,1", "1, 2", "", " 100-continue", "abc",
                                 "\u00b2", "9" * 19, "7\r", "Content-Length: 3"])


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.one_of(st.tuples(FRAMING_NAME, FRAMING_VALUE).map(lambda nv: ":".join(nv)),
                          LINE, NAME), max_size=6),
       st.sampled_from(["\r\n", "\n"]))
def test_framing_reads_every_head_as_the_line_by_line_reference(lines: list[str],
                                                                  end: str) -> None:
    head = ("POST /PLCAPI/ HTTP/1.1" + end + "".join(x + end for x in lines) + end).encode()
    expected = framing_by_lines(head)
    try:
        got: Any = framing(head)
    except FramingError as e:
        assert (e.status, e.text.split("(")[1].split()[0]) == expected
    else:
        assert got == expected


@settings(max_examples=1000, deadline=None)
@given(heads(), st.sampled_from(["HTTP/1.1", "HTTP/1.0"]),
       st.sampled_from(["", "Connection: close\r\n", "Connection: keep-alive\r\n",
                        "connection:  Close\r\n", "Connection: close \r\n",
                        "Connection: keep-alive\r\nConnection: close\r\n"]))
def test_api_post_decides_as_the_stdlib_handler(head: bytes, version: str,
                                                 connection: str) -> None:
    request = f"POST /PLCAPI/ {version}\r\n{connection}".encode() + head + b"body"
    got = api_post(request)
    rest = reader(request[request.index(b"\n") + 1:])
    headers = buffered_headers(rest)
    if headers is None:  # the full handler's business
        assert got is None
        return
    assert got is not None
    start, close = got
    assert request[start:] == rest.read()  # the body starts where the stdlib's does
    conntype = headers.get("Connection", "").lower()
    expected = version == "HTTP/1.0"
    if conntype == "close":
        expected = True
    elif conntype == "keep-alive":
        expected = False
    assert close == expected


def test_api_post_is_only_the_plain_api_call() -> None:
    for plain in (b"POST /PLCAPI/ HTTP/1.1\r\nA: b\r\n\r\nx", b"POST /PLCAPI/ HTTP/1.1\r\n\r\nx"):
        assert api_post(plain) == (len(plain) - 1, False)
    assert api_post(b"POST /PLCAPI/ HTTP/1.0\r\n\r\nx") == (26, True)
    for other in (b"POST /PLCAPI HTTP/1.1\r\n\r\n", b"POST //PLCAPI/ HTTP/1.1\r\n\r\n",
                  b"GET /PLCAPI/ HTTP/1.1\r\n\r\n", b"POST /PLCAPI/ HTTP/1.2\r\n\r\n",
                  b"POST /PLCAPI/?x HTTP/1.1\r\n\r\n", b"POST /PLCAPI/ HTTP/1.1\n\n",
                  b"POST /PLCAPI/ HTTP/1.1\r\nA: 1\r\n b\r\n\r\n",
                  b"post /PLCAPI/ HTTP/1.1\r\n\r\n"):
        assert api_post(other) is None, other


def test_http_date_is_the_stdlib_date() -> None:
    for _ in range(3):
        before = email.utils.formatdate(time.time(), usegmt=True)
        got = http_date()
        after = email.utils.formatdate(time.time(), usegmt=True)
        assert got in (before, after)


def raw_exchange(url: str, data: bytes, reads: int = 1) -> bytes:
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + 10
        while out.count(b"HTTP/1.") < reads and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
            if reads == 1 and b"\r\n\r\n" in out:
                head, _, rest = out.partition(b"\r\n\r\n")
                length = [int(h.split(b":")[1]) for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
        return out


def request(body: bytes, version: str = "HTTP/1.1", extra: str = "",
            path: str = "/PLCAPI/") -> bytes:
    return (f"POST {path} {version}\r\nHost: x\r\nContent-Type: text/xml\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_on_the_wire(plc: Any) -> None:
    body = xmlrpc.client.dumps((plc.admin,), "AuthCheck").encode()
    # keep-alive: two requests in one segment, both answered
    out = raw_exchange(plc.url, request(body) * 2, reads=2)
    assert out.count(b"HTTP/1.1 200 OK") == 2 and b"Connection: close" not in out
    assert out.count(b"<int>1</int>") == 2
    # HTTP/1.0 and Connection: close are answered, then the server closes
    for req in (request(body, "HTTP/1.0"), request(body, extra="Connection: close\r\n")):
        out = raw_exchange(plc.url, req + request(body), reads=2)
        assert out.count(b"200 OK") == 1, out
    # folded header line and bare LF line ends: the stdlib path, same answers
    folded = request(body, extra="X-Folded: a\r\n b\r\n")
    assert b"<int>1</int>" in raw_exchange(plc.url, folded)
    bare = request(body).replace(b"\r\n", b"\n")
    assert b"<int>1</int>" in raw_exchange(plc.url, bare)
    # Expect: 100-continue gets its interim answer first
    out = raw_exchange(plc.url, request(body, extra="Expect: 100-continue\r\n"), reads=2)
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n") and b"<int>1</int>" in out
    # slashes are collapsed as before; a bad header line is refused as the stdlib does
    assert b"<int>1</int>" in raw_exchange(plc.url, request(body, path="//PLCAPI//"))
    too_many = "".join(f"H{i}: x\r\n" for i in range(101))
    assert raw_exchange(plc.url, request(body, extra=too_many)).startswith(b"HTTP/1.1 431")


def without_date(reply: bytes) -> bytes:
    return b"\r\n".join(line for line in reply.split(b"\r\n") if not line.startswith(b"Date: "))


def test_the_direct_answer_is_the_handlers_answer(plc: Any) -> None:
    """A plain POST /PLCAPI/ is answered without http.server (plc.server.PLCServer.answer);
    the same call by a request only the full handler takes gets the same bytes."""
    calls = [xmlrpc.client.dumps((plc.admin,), "AuthCheck"),
             xmlrpc.client.dumps((plc.admin, {"login_base": "nosuchsite"}), "GetSites"),
             xmlrpc.client.dumps(({"AuthMethod": "password"},), "GetSites"),  # fault
             xmlrpc.client.dumps((), "NoSuchMethod")]
    for call in calls:
        body = call.encode()
        direct = raw_exchange(plc.url, request(body))
        assert direct.startswith(b"HTTP/1.1 200 OK\r\nServer: PLCAPI Python/")
        for via_handler in (request(body, path="/PLCAPI"),  # not the fast path's line
                            request(body, extra="X-Folded: a\r\n b\r\n")):
            assert without_date(raw_exchange(plc.url, via_handler)) == without_date(direct)
    # a body that is not a call: the handler's 400, from both
    bad = raw_exchange(plc.url, request(b"<methodCall>"))
    assert bad.startswith(b"HTTP/1.1 400 ") and b"Connection: close" not in bad
