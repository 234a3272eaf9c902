"""Reading objects: ``get(conn, cls, filter, return_fields)`` -> list of dicts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from plc.faults import PLCInvalidArgument
from plc.filters import compile_filter
from plc.model import BOOL, ObjClass
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


def _converters(cls: ObjClass) -> tuple[frozenset[str], frozenset[str]]:
    """(array fields, bool fields) of a class, computed once."""
    conv = _CONVERTERS.get(cls.name)
    if conv is None or conv[2] is not cls:
        arrays = frozenset(n for n, f in cls.fields.items() if f.is_array)
        bools = frozenset(n for n, f in cls.fields.items() if f.kind == BOOL)
        conv = _CONVERTERS[cls.name] = (arrays, bools, cls)
    return conv[0], conv[1]


_CONVERTERS: dict[str, tuple[frozenset[str], frozenset[str], ObjClass]] = {}
_loads = json.loads


def decode(cls: ObjClass, row: dict[str, Any]) -> dict[str, Any]:
    arrays, bools = _converters(cls)
    for name in arrays.intersection(row):
        value = row[name]
        row[name] = _loads(value) if value else []
    for name in bools.intersection(row):
        if row[name] is not None:
            row[name] = bool(row[name])
    return row


@lru_cache(maxsize=1024)
def _select_cached(cls_name: str, cls_id: int, cols: tuple[str, ...]) -> str:
    cls = _BY_ID[cls_id]
    return ", ".join(f'{cls.column(n).sql} AS "{n}"' for n in cols)  # type: ignore[union-attr]


_BY_ID: dict[int, ObjClass] = {}


def _select(cls: ObjClass, cols: tuple[str, ...]) -> str:
    """The select list of ``cols`` (built once per class and column list)."""
    _BY_ID.setdefault(id(cls), cls)
    return _select_cached(cls.name, id(cls), cols)


def get(conn: Connection, cls: ObjClass, flt: Any = None,
        return_fields: Sequence[str] | None = None, where: str = "",
        params: Sequence[Any] = (), live: bool = True) -> list[dict[str, Any]]:
    """Objects of ``cls`` matching ``flt`` (spec 4), with extra SQL ``where``/``params``."""
    cols = columns(cls, return_fields)
    c = compile_filter(cls, flt)
    select = _select(cls, tuple(cols))
    conds = [c.where]
    if live:
        conds.insert(0, cls.live)
    if where:
        conds.append(f"({where})")
    sql = f"SELECT {select} FROM {cls.table} o {cls.extra_from} WHERE {' AND '.join(conds)}"
    order = c.order + [f"{cls.fields[cls.pk].sql} ASC"]
    sql += " ORDER BY " + ", ".join(order)
    all_params = [*c.params, *params]
    if c.limit is not None or c.offset is not None:
        sql += " LIMIT ? OFFSET ?"
        all_params += [c.limit if c.limit is not None else -1, c.offset or 0]
    return [decode(cls, r) for r in conn.query(sql, all_params)]


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
