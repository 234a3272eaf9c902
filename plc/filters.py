"""Filters of Get* calls (spec section 4) compiled to parameterised SQL.

``compile_filter(cls, filter)`` turns a filter argument (None, a list of ids/names, a
scalar id/name, or a struct with prefixed keys) into a WHERE clause over the field
expressions of ``cls`` (plc.model), its parameters, ORDER BY, LIMIT and OFFSET.
Client values only ever travel as parameters; field names are looked up in the
class's declared fields, never copied into SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plc.faults import PLCInvalidArgument
from plc.model import BOOL, FLOAT, INT, INTS, STR, STRS, Field, ObjClass
from plc.params import Parameter, _value_type, check, check_scalar

PREFIXES = "~<>[]&|"

#: fields never shown to non-admin callers (spec 4.6): they may not filter or sort on
#: them either, or a pattern filter would read them out one character at a time
#: (node keys and sessions to anonymous callers, password hashes and verification
#: keys through RetrieveSlicePersonKeys...)
SECRET_FIELDS: dict[str, frozenset[str]] = {
    "Node": frozenset(("key", "session", "boot_nonce")),
    "Person": frozenset(("password", "verification_key", "verification_expires")),
}
_COMPARE = {"<": "<", ">": ">", "[": "<=", "]": ">="}


@dataclass
class Compiled:
    where: str = "1 = 1"
    params: list[Any] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    limit: int | None = None
    offset: int | None = None


def is_pattern(value: Any) -> bool:
    return isinstance(value, str) and ("*" in value or "%" in value)


def split_key(key: str) -> tuple[bool, str, str]:
    """'~>field' -> (negate, operator, field). Operator is '=', '<', '<=', '&', '|'..."""
    negate, op, i = False, "=", 0
    while i < len(key) and key[i] in PREFIXES:
        ch = key[i]
        if ch == "~":
            negate = not negate
        else:
            op = _COMPARE.get(ch, ch)
        i += 1
    return negate, op, key[i:]


def _field(cls: ObjClass, name: str) -> Field:
    f = cls.column(name)
    if f is None:
        raise PLCInvalidArgument(f"Invalid filter field '{name}'")
    return f


def _equality(f: Field, value: Any, params: list[Any]) -> str:
    """OR over a list of values / one value: equality, pattern or IS NULL."""
    values = value if isinstance(value, list | tuple) else [value]
    if not values:
        return "0 = 1"
    parts: list[str] = []
    plain = [v for v in values if v is not None and not is_pattern(v)]
    if len(plain) == 1:
        parts.append(f"{f.sql} = ?")
        params.append(plain[0])
    elif plain:
        parts.append(f"{f.sql} IN ({', '.join('?' * len(plain))})")
        params += plain
    for v in values:
        if v is None:
            parts.append(f"{f.sql} IS NULL")
        elif is_pattern(v):
            parts.append(f"plc_ilike({f.sql}, ?)")
            params.append(v)
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


def _scalars(values: Any, name: str) -> None:
    """102 for any int outside 32 bits (or a non-finite float) among filter values:
    no stored value can match one, and SQLite would refuse those beyond 64 bits."""
    for v in values if isinstance(values, list | tuple) else [values]:
        check_scalar(v, name)


def _clause(f: Field, op: str, value: Any, params: list[Any]) -> str:
    values = value if isinstance(value, list | tuple) else [value]
    _scalars(values, f.name)
    if op in ("&", "|"):
        if not f.is_array:
            raise PLCInvalidArgument(f"'{op}' needs an array field, '{f.name}' is not one")
        if not values:
            return "1 = 1" if op == "&" else "0 = 1"
        # json_each's values are text in PostgreSQL (plc.store.dialect): cast for ints
        value_sql = "CAST(value AS BIGINT)" if f.kind == INTS else "value"
        if op == "&":
            parts = []
            for v in values:
                parts.append(
                    f"EXISTS (SELECT 1 FROM json_each({f.sql}) WHERE {value_sql} = ?)")
                params.append(v)
            return "(" + " AND ".join(parts) + ")"
        params += values
        return (f"EXISTS (SELECT 1 FROM json_each({f.sql}) WHERE {value_sql} IN "
                f"({', '.join('?' * len(values))}))")
    if f.is_array:
        raise PLCInvalidArgument(
            f"Invalid filter on array field '{f.name}': use '&{f.name}' or '|{f.name}'")
    if op == "=":
        return _equality(f, value, params)
    if not values:
        return "0 = 1"
    parts = []
    for v in values:
        parts.append(f"{f.sql} {op} ?")
        params.append(v)
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


def _order(cls: ObjClass, value: Any) -> list[str]:
    items = value if isinstance(value, list | tuple) else [value]
    order = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise PLCInvalidArgument(f"Invalid -SORT value {item!r}: expected a field name")
        direction = "ASC"
        if item[0] in "+-":
            direction = "DESC" if item[0] == "-" else "ASC"
            item = item[1:]
        # PostgreSQL (legacy PLCAPI) sorts NULL as larger than any value: last when
        # ascending, first when descending; SQLite's default is the opposite
        nulls = "NULLS FIRST" if direction == "DESC" else "NULLS LAST"
        order.append(f"{_field(cls, item).sql} {direction} {nulls}")
    return order


def _int_option(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PLCInvalidArgument(f"-{name} must be a non-negative int, got {_value_type(value)}")
    check_scalar(value, f"-{name}")
    return value


def compile_struct(cls: ObjClass, flt: dict[str, Any],
                   extra: dict[str, Field] | None = None) -> Compiled:
    out = Compiled()
    joiner = " AND "
    clauses: list[str] = []
    for key, value in flt.items():
        if not isinstance(key, str) or not key:
            raise PLCInvalidArgument(f"Invalid filter field {key!r}")
        if key.startswith("-"):
            option = key[1:]
            if option == "SORT":
                out.order += _order(cls, value)
            elif option == "LIMIT":
                out.limit = _int_option(option, value)
            elif option == "OFFSET":
                out.offset = _int_option(option, value)
            elif option == "OR":
                joiner = " OR "
            elif option == "AND":
                joiner = " AND "
            else:
                raise PLCInvalidArgument(f"Invalid filter option '{key}'")
            continue
        negate, op, name = split_key(key)
        f = (extra or {}).get(name) or _field(cls, name)
        clause = _clause(f, op, value, out.params)
        clauses.append(f"NOT ({clause})" if negate else clause)
    if clauses:
        out.where = "(" + joiner.join(clauses) + ")"
    return out


def compile_filter(cls: ObjClass, flt: Any) -> Compiled:
    """Compile any accepted filter form of spec 4.1 for ``cls``."""
    if flt is None:
        return Compiled()
    if isinstance(flt, dict):
        return compile_struct(cls, flt)
    pk = cls.fields[cls.pk]
    _scalars(flt, f"{cls.name.lower()}_filter")
    if isinstance(flt, list | tuple):
        if not flt:
            return Compiled("0 = 1")
        id_values = [v for v in flt if isinstance(v, int) and not isinstance(v, bool)]
        names = [v for v in flt if isinstance(v, str)]
        if len(id_values) + len(names) != len(flt) or (names and pk.kind != STR and
                                                        not cls.secondary):
            raise PLCInvalidArgument(f"Invalid filter: expected a list of {cls.name} ids"
                                     + (f" or {cls.secondary}s" if cls.secondary else ""))
        out = Compiled()
        parts = []
        if pk.kind == STR:  # string primary key (messages, sessions...)
            parts.append(_equality(pk, list(flt), out.params))
        else:
            if id_values:
                parts.append(_equality(pk, id_values, out.params))
            if names:
                parts.append(_equality(cls.fields[cls.secondary or cls.pk], names, out.params))
        out.where = "(" + " OR ".join(parts) + ")"
        return out
    if isinstance(flt, int) and not isinstance(flt, bool):
        return Compiled(f"{pk.sql} = ?", [flt])
    if isinstance(flt, str) and (cls.secondary or pk.kind == STR):
        col = pk if pk.kind == STR else cls.fields[cls.secondary]  # type: ignore[index]
        return Compiled(f"{col.sql} = ?", [flt])
    raise PLCInvalidArgument(f"Invalid {cls.name} filter: got {_value_type(flt)}")


class FilterParam:
    """The filter argument of a Get method: which forms it accepts and their types.

    Plain struct keys are type-checked against the field (a value or a list of values;
    patterns are strings, so they fail on int fields); prefixed keys are checked when
    compiled (spec 4.3).
    """

    def __init__(self, cls: ObjClass, lists: bool = True, scalars: bool = False,
                 structs: bool = True, doc: str = "") -> None:
        self.cls, self.lists, self.scalars, self.structs = cls, lists, scalars, structs
        self.nullok = True
        self.doc = doc or f"{cls.name} filter"

    def xmlrpc_types(self) -> list[str]:
        out = []
        if self.lists:
            out.append("array")
        if self.scalars:
            out += ["int", "string"] if self.cls.secondary else ["int"]
        if self.structs:
            out.append("struct")
        return out

    def xmlrpc_type(self) -> str:
        types = self.xmlrpc_types()
        return types[0] if len(types) == 1 else "mixed"

    def _secret(self, ctx: Any) -> frozenset[str]:
        secret = SECRET_FIELDS.get(self.cls.name)
        if not secret or ctx is None or getattr(ctx, "is_admin", False):
            return frozenset()
        return secret

    def check(self, value: Any, name: str, ctx: Any = None) -> None:
        if value is None:
            return
        if isinstance(value, dict) and self.structs:
            secret = self._secret(ctx)
            for key, v in value.items():
                if not isinstance(key, str) or not key:
                    raise PLCInvalidArgument(f"Invalid filter field {key!r}")
                if secret:
                    if key == "-SORT":
                        used = [str(x).lstrip("+-")
                                for x in (v if isinstance(v, list | tuple) else [v])]
                    elif key[0] == "-":
                        used = []
                    else:
                        used = [split_key(key)[2]]
                    for field_name in used:
                        if field_name in secret:
                            raise PLCInvalidArgument(f"Invalid filter field '{field_name}'")
                if key[0] in PREFIXES or key[0] == "-":
                    continue
                f = self.cls.column(key)
                if f is None:
                    raise PLCInvalidArgument(f"Invalid filter field '{key}'")
                if f.is_array:
                    continue
                base = f.param
                one = Parameter(base.type, nullok=True)
                for item in v if isinstance(v, list | tuple) else [v]:
                    check(one, item, key, ctx)
            return
        if isinstance(value, list | tuple) and self.lists:
            for item in value:
                ok = (isinstance(item, int) and not isinstance(item, bool)) or \
                    isinstance(item, str)
                if not ok:
                    raise PLCInvalidArgument(
                        f"expected int or string items, got {_value_type(item)}", name)
                check_scalar(item, name)
            return
        if self.scalars and ((isinstance(value, int) and not isinstance(value, bool)) or
                             (isinstance(value, str) and self.cls.secondary)):
            check_scalar(value, name)
            return
        raise PLCInvalidArgument(
            f"expected {' or '.join(self.xmlrpc_types())}, got {_value_type(value)}", name)


class ReturnFields:
    """The return_fields argument: nil or an array of field names."""

    doc = "List of fields to return"
    nullok = True

    def xmlrpc_type(self) -> str:
        return "array"

    def check(self, value: Any, name: str, ctx: Any = None) -> None:
        if value is None:
            return
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise PLCInvalidArgument(f"expected array of strings, got {_value_type(value)}",
                                     name)


__all__ = ["Compiled", "FilterParam", "ReturnFields", "compile_filter", "compile_struct",
           "is_pattern", "split_key", "INT", "STR", "BOOL", "FLOAT", "INTS", "STRS"]
