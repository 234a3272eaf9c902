"""Helpers of the x_* method modules (the non-core methods of spec 6.1 / Appendix A).

The x_ modules are imported after the core ones (modules load in name order), and
``xmethod``/``xget`` skip a name that is already registered: if a core module defines the
same method, the core definition is the one served and ours is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from plc.faults import PLCInvalidArgument
from plc.method import METHODS, api_method
from plc.methods._util import define_get
from plc.model import ObjClass

if TYPE_CHECKING:
    from plc.api import Call


def xmethod(**kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``@api_method(...)`` unless a method of that name exists already."""

    def deco(func: Callable[..., Any]) -> Callable[..., Any]:
        if (kw.get("name") or func.__name__) in METHODS:
            return func
        return api_method(**kw)(func)

    return deco


def xget(cls: ObjClass, roles: list[str], name: str | None = None, **kw: Any) -> None:
    """``define_get`` unless ``Get<Class>s`` exists already."""
    if (name or f"Get{cls.name}s") not in METHODS:
        define_get(cls, roles, name, **kw)


def bools(fields: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """Booleans as the store keeps them (0/1)."""
    return {k: (int(bool(v)) if k in names and v is not None else v) for k, v in fields.items()}


def unique(call: Call, table: str, column: str, value: Any, what: str,
           exclude: tuple[str, Any] | None = None) -> None:
    """Fault 102 if another row of ``table`` has ``column = value``."""
    sql = f"SELECT 1 FROM {table} WHERE {column} = ?"
    params: list[Any] = [value]
    if exclude is not None:
        sql += f" AND {exclude[0]} <> ?"
        params.append(exclude[1])
    if call.conn.query(sql, params):
        raise PLCInvalidArgument(f"{what} {value!r} already exists")


def row(call: Call, table: str, pk: str, ident: Any, what: str) -> dict[str, Any]:
    """One row by primary key, or fault 102 ``No such <what>``."""
    rows = call.conn.query(f"SELECT * FROM {table} WHERE {pk} = ?", [ident])
    if not rows:
        raise PLCInvalidArgument(f"No such {what} {ident!r}")
    return rows[0]
