"""plc.marshal writes exactly what the stdlib marshaller writes (XML-illegal characters
cleaned), for every value shape a method can return."""

from __future__ import annotations

import datetime
import xmlrpc.client
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plc.faults import PLCAPIError
from plc.marshal import CleanMarshaller, marshal_response


def stdlib(result: Any) -> bytes:
    """xmlrpc.client.dumps, with the encoding named in the XML declaration as the server
    always did (dumps leaves it out for utf-8)."""
    text = xmlrpc.client.dumps((result,), methodresponse=True, allow_none=True,
                               encoding="utf-8")
    head = "<?xml version='1.0'?>\n"
    assert text.startswith(head)
    return ("<?xml version='1.0' encoding='utf-8'?>\n" + text[len(head):]).encode(
        "utf-8", "replace")


def reference(result: Any) -> bytes:
    """The stdlib marshaller with illegal characters cleaned (the former server path)."""
    body = CleanMarshaller("utf-8", allow_none=True).dumps((result,))
    return ("<?xml version='1.0' encoding='utf-8'?>\n<methodResponse>\n" + body +
            "</methodResponse>\n").encode("utf-8", "replace")


LEGAL = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\ufffe\uffff"
                              + "".join(chr(c) for c in range(1, 32) if chr(c) not in "\t\n")))
ANY_TEXT = st.text()
INTS = st.integers(min_value=xmlrpc.client.MININT, max_value=xmlrpc.client.MAXINT)
SCALARS = st.one_of(st.none(), st.booleans(), INTS,
                    st.floats(allow_nan=False, allow_infinity=False))


def values(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(st.one_of(SCALARS, text),
                        lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                st.dictionaries(text, inner, max_size=5)),
                        max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(values(LEGAL))
def test_same_bytes_as_stdlib(value: Any) -> None:
    assert marshal_response(value) == stdlib(value)


@settings(max_examples=300, deadline=None)
@given(values(ANY_TEXT))
def test_illegal_characters_cleaned_like_before(value: Any) -> None:
    out = marshal_response(value)
    assert out == reference(value)
    xmlrpc.client.loads(out)  # well-formed XML whatever the strings held


def test_other_types_fall_back_to_the_stdlib() -> None:
    value = {"b": b"\x00\x01bytes", "t": ("a", 1), "d": xmlrpc.client.DateTime(
        datetime.datetime(2020, 1, 2, 3, 4, 5)), "k\x01": [1.5, True, None]}
    assert marshal_response(value) == reference(value)


def test_ints_beyond_32_bits_are_a_fault_not_an_exception() -> None:
    # the server answers an xmlrpc Fault as a fault reply; an OverflowError was an HTTP 500
    for value in ([{"x": 2 ** 31}], -2 ** 31 - 1, [10000000000]):
        with pytest.raises(PLCAPIError) as e:
            marshal_response(value)
        assert e.value.faultCode == 111 and "32 bits" in e.value.faultString


def test_errors_are_the_stdlib_errors() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(TypeError):
        marshal_response(loop)
    d: dict[str, Any] = {}
    d["d"] = d
    with pytest.raises(TypeError):
        marshal_response(d)
    with pytest.raises(TypeError):
        marshal_response({1: "not a string key"})
    with pytest.raises(TypeError):
        marshal_response(object())


def test_shared_values_are_not_recursion() -> None:
    shared = [1, 2]
    value = {"a": shared, "b": shared, "c": [shared, shared]}
    assert marshal_response(value) == stdlib(value)
