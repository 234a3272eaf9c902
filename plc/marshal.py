"""Marshalling a method's result into an XML-RPC methodResponse.

The output is byte for byte what ``xmlrpc.client.dumps((result,), methodresponse=True,
allow_none=True, encoding="utf-8")`` writes, except that characters XML cannot carry
are replaced by '?' in strings and struct keys (spec 1.1). The values methods return
(str, int, bool, float, None, list, dict) are written by one tight function; any other
type (bytes, DateTime, subclasses...) goes through the stdlib marshaller, so those
keep the stdlib's exact output and errors (TypeError for recursive containers and
non-string keys). An int beyond 32 bits anywhere in a result is answered with fault 111
naming it, never an exception that would become an HTTP 500: reads clamp stored ints
(plc.query) and writes refuse them (plc.params), so this is the last safety net.
"""

from __future__ import annotations

import xmlrpc.client
from typing import Any
from xml.parsers import expat

from plc.api import clean_text
from plc.faults import PLCAPIError

_MAXINT = xmlrpc.client.MAXINT
_MININT = xmlrpc.client.MININT
_HEAD = "<?xml version='1.0' encoding='utf-8'?>\n<methodResponse>\n<params>\n<param>\n"
_TAIL = "</param>\n</params>\n</methodResponse>\n"

#: "<member>\n<name>KEY</name>\n" per struct key already seen (keys are field names:
#: a small set); only keys that need no cleaning; bounded so that odd keys sent by
#: clients (echoed in results) cannot grow it without end
_MEMBER: dict[str, str] = {}
_MEMBER_MAX = 4096


def _escape(text: str) -> str:
    """xmlrpc.client.escape of ``text`` cleaned of XML-illegal characters."""
    text = clean_text(text)
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    return text


class CleanMarshaller(xmlrpc.client.Marshaller):
    """The stdlib marshaller, replacing characters XML cannot carry by '?' as it
    writes strings (the fallback for types the fast path does not handle)."""

    dispatch: dict[Any, Any] = dict(xmlrpc.client.Marshaller.dispatch)

    def dump_unicode(self, value: str, write: Any, escape: Any = xmlrpc.client.escape) -> None:
        write("<value><string>")
        write(escape(clean_text(value)))
        write("</string></value>\n")

    dispatch[str] = dump_unicode

    def dump_struct(self, value: Any, write: Any, escape: Any = xmlrpc.client.escape) -> None:
        if not all(isinstance(k, str) and k.isprintable() for k in value):
            value = {clean_text(k) if isinstance(k, str) else k: v for k, v in value.items()}
        super().dump_struct(value, write, escape)

    dispatch[dict] = dump_struct


def _dump(value: Any, out: list[str], memo: set[int]) -> None:
    w = out.append
    t = type(value)
    if t is str:
        w("<value><string>" + _escape(value) + "</string></value>\n")
    elif t is int:
        if value > _MAXINT or value < _MININT:
            raise _overflow(value)
        w("<value><int>" + str(value) + "</int></value>\n")
    elif value is None:
        w("<value><nil/></value>")
    elif t is dict:
        i = id(value)
        if i in memo:
            raise TypeError("cannot marshal recursive dictionaries")
        memo.add(i)
        start = len(out)
        w("<value><struct>\n")
        for k, v in value.items():
            head = _MEMBER.get(k) if type(k) is str else None
            if head is None:
                if not isinstance(k, str):
                    raise TypeError("dictionary key must be string")
                if clean_text(k) != k:
                    # cleaning may merge keys: marshal the cleaned struct instead, as
                    # the stdlib-based marshaller did
                    del out[start:]
                    memo.discard(i)
                    _dump({clean_text(x) if isinstance(x, str) else x: y
                           for x, y in value.items()}, out, memo)
                    return
                head = "<member>\n<name>" + _escape(k) + "</name>\n"
                if type(k) is str and len(_MEMBER) < _MEMBER_MAX:
                    _MEMBER[k] = head
            w(head)
            _dump(v, out, memo)
            w("</member>\n")
        w("</struct></value>\n")
        memo.discard(i)
    elif t is list or t is tuple:
        i = id(value)
        if i in memo:
            raise TypeError("cannot marshal recursive sequences")
        memo.add(i)
        w("<value><array><data>\n")
        for v in value:
            _dump(v, out, memo)
        w("</data></array></value>\n")
        memo.discard(i)
    elif t is bool:
        w("<value><boolean>1</boolean></value>\n" if value else
          "<value><boolean>0</boolean></value>\n")
    elif t is float:
        w("<value><double>" + repr(value) + "</double></value>\n")
    else:
        m = CleanMarshaller("utf-8", allow_none=True)
        m.memo = dict.fromkeys(memo)
        m._Marshaller__dump(value, w)  # type: ignore[attr-defined]


def _overflow(value: Any) -> PLCAPIError:
    return PLCAPIError(f"the result holds the integer {value}, outside the 32 bits "
                       "XML-RPC can carry")


def marshal_response(result: Any) -> bytes:
    """A methodResponse carrying ``result`` (nil allowed); PLCAPIError (fault 111) for
    ints beyond 32 bits, TypeError for values XML-RPC cannot carry, as the stdlib
    marshaller raises them."""
    out: list[str] = [_HEAD]
    try:
        _dump(result, out, set())
    except OverflowError as e:  # an int subclass through the stdlib marshaller
        raise PLCAPIError(f"the result holds an integer outside 32 bits ({e})") from None
    out.append(_TAIL)
    return "".join(out).encode("utf-8", "replace")


class BadCall(Exception):
    """A body that is not an acceptable XML-RPC methodCall (answered 400)."""


class _Refused(Exception):
    pass


def _refuse_dtd(*args: Any) -> None:
    raise _Refused("DTDs are not accepted")


def load_call(body: bytes) -> tuple[tuple[Any, ...], str]:
    """(params, method name) of a methodCall, as ``xmlrpc.client.loads(body,
    use_builtin_types=True)`` reads it, but a document type declaration is refused by the
    parser itself, whatever the encoding (a UTF-16 body hid "<!DOCTYPE" from a byte
    search, and expat expands internal entities: a 4 MiB body cost 0.4-0.8 GB). Without
    a DTD there are no entities, so the memory a body costs is proportional to its size
    (bounded by [api] max_body)."""
    unmarshaller = xmlrpc.client.Unmarshaller(use_builtin_types=True)
    unmarshaller.xml(None, None)  # type: ignore[arg-type]  # as xmlrpc.client.ExpatParser
    parser = expat.ParserCreate(None, None)
    parser.buffer_text = True
    parser.StartElementHandler = unmarshaller.start
    parser.EndElementHandler = unmarshaller.end
    parser.CharacterDataHandler = unmarshaller.data
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    parser.ExternalEntityRefHandler = _refuse_dtd  # type: ignore[assignment]
    try:
        parser.Parse(body, True)
        params = unmarshaller.close()
        method = unmarshaller.getmethodname()
    except _Refused as e:
        raise BadCall(str(e)) from None
    except Exception:  # expat, value and type errors of malformed XML-RPC
        raise BadCall("not an XML-RPC methodCall") from None
    if method is None:
        raise BadCall("not an XML-RPC methodCall")
    return params, method
