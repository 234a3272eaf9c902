"""Helpers shared by method modules."""

from __future__ import annotations

import base64
import inspect
import os
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from plc.faults import PLCInvalidArgument
from plc.filters import FilterParam, ReturnFields
from plc.method import make_method
from plc.model import ObjClass
from plc.params import Mixed, Parameter

if TYPE_CHECKING:
    from plc.api import Call


def accepted(cls: ObjClass, fields: dict[str, Any], keys: Iterable[str], *,
             reject: bool = False, tags: bool = False, what: str = "") -> tuple[dict, dict]:
    """Split ``fields`` into (native accepted columns, exposed tags).

    Unknown keys are dropped silently, or fault 102 when ``reject`` (spec 11.17).
    """
    keys = list(keys)
    native: dict[str, Any] = {}
    tagvals: dict[str, Any] = {}
    bad: list[str] = []
    for k, v in fields.items():
        if k in keys:
            native[k] = v
        elif tags and k in cls.tags:
            tagvals[k] = v
        elif reject:
            bad.append(k)
    if bad:
        raise PLCInvalidArgument(f"Cannot {what or 'set'} {cls.name} with column(s) {bad}")
    return native, tagvals


def require_keys(fields: dict[str, Any], keys: Iterable[str], what: str) -> None:
    for k in keys:
        v = fields.get(k)
        if v is None or (isinstance(v, str) and not v.strip()):
            raise PLCInvalidArgument(f"{what} {k} must be specified")


def struct_of(cls: ObjClass, keys: Iterable[str] | None = None,
              tags: bool = False) -> dict[str, Any]:
    """The struct type of an Add/Update argument: declared types of ``keys``."""
    names = list(keys) if keys is not None else cls.writable()
    out: dict[str, Any] = {n: cls.fields[n].param for n in names if n in cls.fields}
    if tags:
        for t in cls.tags:
            out.setdefault(t, Parameter(str, f"{t} tag", nullok=True))
    return out


def id_or_name(cls: ObjClass, doc: str = "") -> Mixed:
    sec = cls.fields[cls.secondary] if cls.secondary else None
    alts: list[Any] = [cls.fields[cls.pk].param]
    if sec is not None:
        alts.append(sec.param)
    return Mixed(*alts, doc=doc or f"{cls.name} id or {cls.secondary}")


def new_session_id() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def rename_args(func: Callable[..., Any], names: dict[str, str]) -> None:
    """Give ``func``'s arguments the names the API shows (system.methodHelp, fault texts)
    without changing the code: API methods are only ever called positionally."""
    sig = inspect.signature(func)
    func.__signature__ = sig.replace(parameters=[  # type: ignore[attr-defined]
        p.replace(name=names.get(p.name, p.name)) for p in sig.parameters.values()])


_FILTER_NAMES = {"InitScript": "initscript", "PCUType": "pcu_type",
                 "PCUProtocolType": "protocol_type", "EventObject": "event"}


def define_get(cls: ObjClass, roles: list[str], name: str | None = None, *,
               scalars: bool = False, lists: bool = True, doc: str = "",
               strip: Iterable[str] = ()) -> None:
    """Register ``Get<Class>s(auth, filter=None, return_fields=None)`` over ``cls``.

    ``strip`` names fields never returned (secrets).
    """
    from plc.auth import Auth

    hidden = list(strip)

    def get(call: Call, auth: dict, flt: Any = None, return_fields: list | None = None) -> list:
        rows = call.get(cls, flt, return_fields)
        for r in rows:
            for h in hidden:
                r.pop(h, None)
        return rows

    # name the filter argument as legacy did (methodHelp, "Invalid <name> value" faults)
    arg = _FILTER_NAMES.get(cls.name) or re.sub(r"(?<!^)(?=[A-Z])", "_", cls.name).lower()
    rename_args(get, {"flt": f"{arg}_filter"})
    make_method(get, name=name or f"Get{cls.name}s", roles=roles,
                accepts=[Auth(), FilterParam(cls, lists=lists, scalars=scalars),
                         ReturnFields()],
                returns=Parameter([dict], f"List of {cls.name}s"),
                doc=doc or f"Returns an array of structs containing details about {cls.name}s. "
                           "If a filter is specified, only matching objects are returned; if "
                           "return_fields is specified, only those fields are returned.")
