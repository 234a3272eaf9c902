"""Reading objects: ``get(conn, cls, filter, return_fields)`` -> list of dicts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from plc.faults import PLCInvalidArgument
from plc.filters import compile_filter
from plc.model import BOOL, INT, Field, ObjClass
from plc.store.base import Connection


def columns(cls: ObjClass, return_fields: Sequence[str] | None) -> list[str]:
    """Validated list of columns to return (None = every native field, never tags)."""
    if return_fields is None:
        return list(cls.fields)
    unknown = [n for n in return_fields if cls.column(n) is None]
    if unknown:
        raise PLCInvalidArgument(f"unknown column(s) specified {unknown} in {cls.name}")
    out = list(dict.fromkeys(return_fields))
    if not out:
        raise PLCInvalidArgument(f"no valid return fields specified for {cls.name}")
    return out


_loads = json.loads
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # the C scanner


def _array(value: Any) -> Any:
    """A JSON array column (json_group_array) as a list; [] for NULL or ''."""
    if not value:
        return []
    try:
        obj, end = _scan(value, 0)
    except StopIteration:
        obj, end = None, -1
    # what json.loads gives (and its errors for anything that is not one JSON value)
    return obj if end == len(value) else _loads(value)


#: an int column read back clamped to the 32 bits XML-RPC can carry (NULL stays NULL)
_CLAMPED = "MAX(MIN({}, 2147483647), -2147483648)"


def _selected(f: Field) -> str:
    """The select expression of a field. Int columns are clamped: a database written by
    an older release (or by hand) may hold a value beyond 32 bits, and one such value
    would otherwise make every read that meets it unmarshallable."""
    return _CLAMPED.format(f.sql) if f.kind == INT else f.sql


class _Plan:
    """How to read ``cols`` of a class: the select list, and which positions of a row
    are JSON arrays or booleans (built once per class and column list)."""

    __slots__ = ("names", "select", "arrays", "bools")

    def __init__(self, cls: ObjClass, cols: tuple[str, ...]) -> None:
        fields = [cls.column(n) for n in cols]
        self.names = cols
        self.select = ", ".join(f'{_selected(f)} AS "{n}"'  # type: ignore[arg-type]
                                for n, f in zip(cols, fields, strict=True))
        self.arrays = tuple(i for i, f in enumerate(fields) if f.is_array)  # type: ignore[union-attr]
        self.bools = tuple(i for i, f in enumerate(fields) if f.kind == BOOL)  # type: ignore[union-attr]

    def decode(self, rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        names, arrays, bools = self.names, self.arrays, self.bools
        if not arrays and not bools:
            return [dict(zip(names, r, strict=True)) for r in rows]
        out = []
        for r in rows:
            values = list(r)
            for i in arrays:
                values[i] = _array(values[i])
            for i in bools:
                v = values[i]
                if v is not None:
                    values[i] = bool(v)
            out.append(dict(zip(names, values, strict=True)))
        return out


@lru_cache(maxsize=1024)
def _plan_cached(cls_name: str, cls_id: int, cols: tuple[str, ...]) -> _Plan:
    return _Plan(_BY_ID[cls_id], cols)


_BY_ID: dict[int, ObjClass] = {}


def _plan(cls: ObjClass, cols: tuple[str, ...]) -> _Plan:
    _BY_ID.setdefault(id(cls), cls)
    return _plan_cached(cls.name, id(cls), cols)


def get(conn: Connection, cls: ObjClass, flt: Any = None,
        return_fields: Sequence[str] | None = None, where: str = "",
        params: Sequence[Any] = (), live: bool = True) -> list[dict[str, Any]]:
    """Objects of ``cls`` matching ``flt`` (spec 4), with extra SQL ``where``/``params``."""
    cols = columns(cls, return_fields)
    c = compile_filter(cls, flt)
    plan = _plan(cls, tuple(cols))
    conds = [c.where]
    if live:
        conds.insert(0, cls.live)
    if where:
        conds.append(f"({where})")
    sql = f"SELECT {plan.select} FROM {cls.table} o {cls.extra_from} WHERE {' AND '.join(conds)}"
    order = c.order + [f"{cls.fields[cls.pk].sql} ASC"]
    sql += " ORDER BY " + ", ".join(order)
    all_params = [*c.params, *params]
    if c.limit is not None or c.offset is not None:
        sql += " LIMIT ? OFFSET ?"
        all_params += [c.limit if c.limit is not None else -1, c.offset or 0]
    return plan.decode(conn.rows(sql, all_params))


def get_one(conn: Connection, cls: ObjClass, id_or_name: Any,
            return_fields: Sequence[str] | None = None, what: str | None = None) -> dict[str, Any]:
    """One live object by id or secondary key, or fault 102 ``No such <what>``."""
    if isinstance(id_or_name, str) and cls.lowercase_secondary:
        id_or_name = id_or_name.lower()
    rows = get(conn, cls, id_or_name if isinstance(id_or_name, int | str) else [],
               return_fields)
    if len(rows) != 1:
        raise PLCInvalidArgument(f"No such {what or cls.name.lower()} {id_or_name!r}")
    return rows[0]
