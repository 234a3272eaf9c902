"""Parameter types of the declarative method definitions (spec 1.2).

A method's ``accepts`` is a list with one entry per positional argument; each entry is
one of:

* ``Parameter(type, doc, min=, max=, nullok=)`` with type int, str, bool or float;
* a bare Python type (``int``, ``str``...), the same as ``Parameter(type)``;
* ``Mixed(a, b, ...)``: any alternative;
* a ``dict`` ``{field: spec}``: an XML-RPC struct; unknown keys are ignored, declared
  keys are checked (mandatory keys are the method's business);
* a ``list`` ``[spec, ...]``: element i is checked against spec i, extra elements
  against the last spec; ``Parameter([spec], min=, max=)`` bounds the item count;
* any object with ``check(value, name, ctx)`` and ``xmlrpc_type()`` (filters; the
  auth struct is not checked here: ``Auth.authenticate`` is a step of its own).

``check`` raises PLCInvalidArgument (fault 102) naming the argument.
"""

from __future__ import annotations

import math
from typing import Any

from plc.faults import PLCInvalidArgument

_XMLRPC_NAMES: dict[type, str] = {
    int: "int", bool: "boolean", float: "double", str: "string",
    list: "array", dict: "struct", type(None): "nil",
}

#: deepest nesting of arrays/structs accepted anywhere in a call
MAX_DEPTH = 32

#: the range of an XML-RPC <int> (legacy stored ints in 32-bit PostgreSQL columns)
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def check_scalar(value: Any, name: str) -> None:
    """102 for an int outside 32 bits or a float that is NaN or infinite: values that
    legacy could not store and that no reply could carry back."""
    if type(value) is int:
        if not INT_MIN <= value <= INT_MAX:
            raise PLCInvalidArgument(
                f"{value} is outside the 32-bit integer range [{INT_MIN}, {INT_MAX}]", name)
    elif type(value) is float and not math.isfinite(value):
        raise PLCInvalidArgument(f"{value} is not a finite number", name)


class Parameter:
    """One typed value with optional bounds (string bounds are UTF-8 byte lengths)."""

    def __init__(self, type_: Any, doc: str = "", min: int | float | None = None,
                 max: int | float | None = None, nullok: bool = False,
                 ro: bool = False) -> None:
        self.type = type_
        self.doc = doc
        self.min = min
        self.max = max
        self.nullok = nullok
        self.ro = ro

    def __repr__(self) -> str:
        return f"Parameter({xmlrpc_type(self)})"


class Mixed:
    """Any one of several alternatives (only 102 faults make the next one be tried)."""

    def __init__(self, *alternatives: Any, doc: str = "", nullok: bool = False) -> None:
        self.alternatives = alternatives
        self.doc = doc
        self.nullok = nullok


def xmlrpc_type(spec: Any) -> str:
    """XML-RPC type name of a spec, as system.methodSignature reports it."""
    if hasattr(spec, "xmlrpc_type") and not isinstance(spec, type):
        return spec.xmlrpc_type()
    if isinstance(spec, Parameter):
        return xmlrpc_type(spec.type)
    if isinstance(spec, Mixed):
        return "mixed"
    if isinstance(spec, dict):
        return "struct"
    if isinstance(spec, list | tuple):
        return "array"
    if isinstance(spec, type):
        return _XMLRPC_NAMES.get(spec, spec.__name__)
    return "mixed"


def _value_type(value: Any) -> str:
    return _XMLRPC_NAMES.get(type(value), type(value).__name__)


def doc_of(spec: Any) -> str:
    return getattr(spec, "doc", "") or ""


def check(spec: Any, value: Any, name: str, ctx: Any = None) -> None:
    """Raise PLCInvalidArgument unless ``value`` fits ``spec``."""
    if hasattr(spec, "check") and not isinstance(spec, type):
        spec.check(value, name, ctx)
        return
    if isinstance(spec, Mixed):
        if value is None and spec.nullok:
            return
        last: PLCInvalidArgument | None = None
        for alt in spec.alternatives:
            try:
                check(alt, value, name, ctx)
                return
            except PLCInvalidArgument as e:
                last = e
        names = " or ".join(xmlrpc_type(a) for a in spec.alternatives)
        if last is not None and f"expected {names}" not in last.faultString and \
                not last.faultString.startswith(f"Invalid {name} value: expected"):
            raise last
        raise PLCInvalidArgument(f"expected {names}, got {_value_type(value)}", name)
    if isinstance(spec, Parameter):
        if value is None and spec.nullok:
            return
        check(spec.type, value, name, ctx)
        _check_bounds(spec, value, name)
        return
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise PLCInvalidArgument(f"expected struct, got {_value_type(value)}", name)
        for key, sub in spec.items():
            if key in value:
                check(sub, value[key], key, ctx)
        return
    if isinstance(spec, list | tuple):
        if not isinstance(value, list | tuple):
            raise PLCInvalidArgument(f"expected array, got {_value_type(value)}", name)
        if spec:
            for i, item in enumerate(value):
                check(spec[min(i, len(spec) - 1)], item, name, ctx)
        return
    if spec is None or spec is type(None):
        if value is not None:
            raise PLCInvalidArgument(f"expected nil, got {_value_type(value)}", name)
        return
    if isinstance(spec, type):
        ok = isinstance(value, spec)
        if spec is int and isinstance(value, bool):
            ok = True  # bool is an int in XML-RPC legacy checks
        if spec is float and not isinstance(value, float):
            ok = False  # [quirk] a float field rejects an XML-RPC int
        if not ok:
            raise PLCInvalidArgument(
                f"expected {xmlrpc_type(spec)}, got {_value_type(value)}", name)
        if spec is int or spec is float:
            check_scalar(value, name)
        return
    raise TypeError(f"bad parameter spec {spec!r} for {name}")


def _check_bounds(spec: Parameter, value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, str):
        size = len(value.encode("utf-8", "surrogatepass"))
        if spec.min is not None and size < spec.min:
            raise PLCInvalidArgument(f"{name} must be at least {spec.min} bytes long", name)
        if spec.max is not None and size > spec.max:
            raise PLCInvalidArgument(f"{name} must be at most {spec.max} bytes long", name)
    elif isinstance(value, list | tuple):
        if spec.min is not None and len(value) < spec.min:
            raise PLCInvalidArgument(f"{name} must have at least {spec.min} items", name)
        if spec.max is not None and len(value) > spec.max:
            raise PLCInvalidArgument(f"{name} must have at most {spec.max} items", name)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if spec.min is not None and value < spec.min:
            raise PLCInvalidArgument(f"{name} must be at least {spec.min}", name)
        if spec.max is not None and value > spec.max:
            raise PLCInvalidArgument(f"{name} must be at most {spec.max}", name)


_CONTAINERS = (list, tuple, dict)


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of arrays/structs, computed without recursion; stops past limit."""
    if not isinstance(value, _CONTAINERS):
        return 0
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        for x in (v.values() if isinstance(v, dict) else v):
            if isinstance(x, _CONTAINERS):  # only containers add depth
                stack.append((x, d + 1))
    return deepest


def describe(spec: Any, name: str = "", indent: int = 0) -> list[str]:
    """Lines for system.methodHelp (structs expanded)."""
    pad = " " * indent
    label = f"{name}: " if name else ""
    lines = [f"{pad}{label}{xmlrpc_type(spec)}" + (f", {doc_of(spec)}" if doc_of(spec) else "")]
    inner = spec.type if isinstance(spec, Parameter) else spec
    if isinstance(inner, dict):
        for key, sub in inner.items():
            lines += describe(sub, key, indent + 4)
    elif isinstance(inner, Mixed):
        for alt in inner.alternatives:
            lines += describe(alt, "", indent + 4)
    elif isinstance(inner, list | tuple):
        for sub in inner:
            lines += describe(sub, "", indent + 4)
    return lines
