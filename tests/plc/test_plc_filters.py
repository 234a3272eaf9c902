"""Filters (spec 4): the SQL compilation against a plain Python evaluator over random
objects (hypothesis), plus the fixed forms and their errors."""

from __future__ import annotations

import json
import operator
import os
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plc.faults import PLCInvalidArgument
from plc.filters import FilterParam, compile_filter
from plc.model import BOOL, FLOAT, INT, INTS, STR, Field, ObjClass
from plc.query import get
from plc.store.sqlite import SQLiteConnection

THING = ObjClass("Thing", "things", "thing_id", "name", {
    "thing_id": Field("thing_id", INT, "o.thing_id"),
    "name": Field("name", STR, "o.name", nullok=True),
    "n": Field("n", INT, "o.n", nullok=True),
    "x": Field("x", FLOAT, "o.x", nullok=True),
    "flag": Field("flag", BOOL, "o.flag"),
    "tags": Field("tags", INTS, "o.tags"),
})

# -- the reference evaluator (SQL three-valued logic: None is "unknown") -----------------


def _like(value: Any, pattern: str) -> bool:
    rx = ""
    for ch in pattern:
        rx += ".*" if ch in "*%" else "." if ch == "_" else re.escape(ch)
    return re.fullmatch(rx, str(value), re.IGNORECASE | re.DOTALL) is not None


def _or(values: list[bool | None]) -> bool | None:
    if any(v is True for v in values):
        return True
    return None if any(v is None for v in values) else False


def _and(values: list[bool | None]) -> bool | None:
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def _not(v: bool | None) -> bool | None:
    return None if v is None else not v


OPS = {"<": operator.lt, ">": operator.gt, "[": operator.le, "]": operator.ge}


def _clause(row: dict[str, Any], key: str, value: Any) -> bool | None:
    negate, op = False, "="
    while key[0] in "~<>[]&|":
        if key[0] == "~":
            negate = not negate
        else:
            op = key[0]
        key = key[1:]
    v = row[key]
    values = value if isinstance(value, list) else [value]
    if op == "&":
        result: bool | None = all(x in v for x in values)
    elif op == "|":
        result = any(x in v for x in values)
    elif op == "=":
        parts: list[bool | None] = []
        for x in values:
            if x is None:
                parts.append(v is None)
            elif v is None:
                parts.append(None)
            elif isinstance(x, str) and ("*" in x or "%" in x):
                parts.append(_like(v, x))
            else:
                parts.append(v == x)
        result = _or(parts)
    else:
        result = _or([None if (v is None or x is None) else OPS[op](v, x) for x in values])
    return _not(result) if negate else result


def evaluate(rows: list[dict[str, Any]], flt: dict[str, Any]) -> list[int]:
    clauses = [(k, v) for k, v in flt.items() if not k.startswith("-")]
    combine = _or if "-OR" in flt else _and
    # no criteria at all selects everything, whichever the combinator
    out = [r for r in rows
           if not clauses or combine([_clause(r, k, v) for k, v in clauses]) is True]
    out.sort(key=lambda r: r["thing_id"])
    sort = flt.get("-SORT")
    if sort is not None:
        for item in reversed(sort if isinstance(sort, list) else [sort]):
            desc = item.startswith("-")
            name = item.lstrip("+-")
            # PostgreSQL order (legacy PLCAPI): NULL after every value when ascending
            out.sort(key=lambda r: (r[name] is None, r[name]), reverse=desc)
    offset = flt.get("-OFFSET", 0)
    limit = flt.get("-LIMIT")
    out = out[offset:] if limit is None else out[offset:offset + limit]
    return [r["thing_id"] for r in out]


# -- random objects and filters ------------------------------------------------------------

TEXT = st.text(alphabet="abAB.x", max_size=4)
PATTERN = st.text(alphabet="abAB._*%", min_size=1, max_size=4).filter(
    lambda s: "*" in s or "%" in s)
ROWS = st.lists(st.fixed_dictionaries({
    "name": st.none() | TEXT,
    "n": st.none() | st.integers(-3, 3),
    "x": st.none() | st.floats(-2, 2, allow_nan=False).map(lambda f: round(f, 1)),
    "flag": st.booleans(),
    "tags": st.lists(st.integers(1, 4), max_size=3, unique=True),
}), max_size=12)

PREFIX = st.sampled_from(["", "~"])
CMP = st.sampled_from(["<", ">", "[", "]"])


def _scalar_clause(field: str, values: st.SearchStrategy) -> st.SearchStrategy:
    eq = st.tuples(PREFIX, st.just(""), st.one_of(values, st.none(),
                                                  st.lists(st.none() | values, max_size=3)))
    cmp = st.tuples(PREFIX, CMP, st.one_of(values, st.lists(values, max_size=2)))
    return st.one_of(eq, cmp).map(lambda t: (f"{t[0]}{t[1]}{field}", t[2]))


CLAUSES = st.one_of(
    _scalar_clause("n", st.integers(-3, 3)),
    _scalar_clause("x", st.floats(-2, 2, allow_nan=False).map(lambda f: round(f, 1))),
    st.tuples(PREFIX, st.one_of(TEXT, PATTERN, st.none(),
                                st.lists(st.none() | TEXT | PATTERN, max_size=3))).map(
        lambda t: (f"{t[0]}name", t[1])),
    st.tuples(PREFIX, CMP, TEXT).map(lambda t: (f"{t[0]}{t[1]}name", t[2])),
    st.tuples(PREFIX, st.booleans()).map(lambda t: (f"{t[0]}flag", t[1])),
    st.tuples(PREFIX, st.sampled_from("&|"),
              st.one_of(st.integers(1, 4), st.lists(st.integers(1, 4), max_size=3))).map(
        lambda t: (f"{t[0]}{t[1]}tags", t[2])),
)
SORT_FIELDS = st.sampled_from(["n", "-n", "+name", "-name", "x", "-x", "flag", "-thing_id"])


@st.composite
def filters(draw: Any) -> dict[str, Any]:
    flt: dict[str, Any] = dict(draw(st.lists(CLAUSES, max_size=4)))
    if draw(st.booleans()):
        flt["-OR"] = True
    if draw(st.booleans()):
        flt["-SORT"] = draw(st.one_of(SORT_FIELDS, st.lists(SORT_FIELDS, min_size=1,
                                                            max_size=2)))
    if draw(st.booleans()):
        flt["-LIMIT"] = draw(st.integers(0, 5))
    if draw(st.booleans()):
        flt["-OFFSET"] = draw(st.integers(0, 5))
    return flt


@pytest.fixture(scope="module")
def conn():
    c = SQLiteConnection(":memory:")
    c.execute("CREATE TABLE things (thing_id INTEGER PRIMARY KEY, name TEXT, n INTEGER, "
              "x REAL, flag INTEGER NOT NULL, tags TEXT NOT NULL)")
    try:
        yield c
    finally:
        c.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(rows=ROWS, flt=filters())
def test_sql_matches_python_evaluator(conn: SQLiteConnection, rows: list[dict[str, Any]],
                                      flt: dict[str, Any]) -> None:
    conn.execute("DELETE FROM things")
    stored = []
    for i, r in enumerate(rows, 1):
        conn.insert("things", {"thing_id": i, **r, "flag": int(r["flag"]),
                               "tags": json.dumps(r["tags"])})
        stored.append({"thing_id": i, **r})
    FilterParam(THING).check(flt, "filter")
    got = [r["thing_id"] for r in get(conn, THING, flt, ["thing_id"], live=False)]
    assert got == evaluate(stored, flt), flt


def test_list_scalar_and_empty_forms(conn: SQLiteConnection) -> None:
    conn.execute("DELETE FROM things")
    for i, name in enumerate(["alpha", "beta", "Gamma"], 1):
        conn.insert("things", {"thing_id": i, "name": name, "flag": 0, "tags": "[]"})

    def ids(flt: Any) -> list[int]:
        return [r["thing_id"] for r in get(conn, THING, flt, ["thing_id"], live=False)]

    assert ids(None) == [1, 2, 3]
    assert ids([]) == []                       # an empty list matches nothing
    assert ids({}) == [1, 2, 3]                # an empty struct matches everything
    assert ids([1, "Gamma"]) == [1, 3]         # ids and names OR-ed
    assert ids(2) == [2] and ids("beta") == [2]
    assert ids({"name": "gamma"}) == []        # equality is case-sensitive
    assert ids({"name": "GAM*"}) == [3]        # patterns are not
    assert ids({"name": "b_ta"}) == []         # no wildcard, no pattern: plain equality
    assert ids({"name": "b_t*"}) == [2]        # [quirk] _ is a wildcard inside a pattern
    assert ids({"~name": []}) == [1, 2, 3]
    # values only ever travel as parameters
    assert ids({"name": "x' OR '1'='1"}) == []


@pytest.mark.parametrize("flt, text", [
    ({"nosuch": 1}, "Invalid filter field 'nosuch'"),
    ({"~>nosuch": 1}, "Invalid filter field 'nosuch'"),
    ({"-FOO": 1}, "Invalid filter option '-FOO'"),
    ({"-SORT": "nosuch"}, "Invalid filter field 'nosuch'"),
    ({"-LIMIT": "ten"}, "-LIMIT must be a non-negative int"),
    ({"tags": [1]}, "use '&tags' or '|tags'"),
    ({"&name": "a"}, "needs an array field"),
    ([1.5], "expected a list of Thing ids"),
])
def test_bad_filters_fault_102(conn: SQLiteConnection, flt: Any, text: str) -> None:
    with pytest.raises(PLCInvalidArgument) as e:
        get(conn, THING, flt, ["thing_id"], live=False)
    assert e.value.faultCode == 102 and text in e.value.faultString


def test_type_check_of_plain_keys() -> None:
    p = FilterParam(THING, scalars=True)
    p.check({"n": [1, None, 2], "name": "a*", "~n": "unchecked"}, "f")
    for bad in ({"n": "1*"}, {"x": 1}, {"nosuch": 1}, 1.5, True):
        with pytest.raises(PLCInvalidArgument):
            p.check(bad, "f")


def test_compile_never_embeds_values() -> None:
    marker = f"needle{os.getpid()}"
    c = compile_filter(THING, {"name": [marker, f"*{marker}"], "<n": 5, "|tags": [7]})
    assert marker not in c.where
    assert marker in c.params and f"*{marker}" in c.params
