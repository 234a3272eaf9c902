"""Generated Get/Set accessors of tags (spec 9.2), from plc.tagtypes.ACCESSORS."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.initdb import ensure_tag_type
from plc.method import make_method
from plc.methods._tags import get_tag, set_tag
from plc.methods._util import id_or_name
from plc.methods.slicetags import may_write_slice_tag
from plc.methods.tags import may_write
from plc.model import CLASSES
from plc.params import Parameter
from plc.tagtypes import ACCESSORS, Accessor

if TYPE_CHECKING:
    from plc.api import Call


def _object_id(call: Call, cls_name: str, id_or_name_: Any, must: bool) -> int | None:
    cls = CLASSES[cls_name]
    key = id_or_name_.lower() if isinstance(id_or_name_, str) and cls.lowercase_secondary \
        else id_or_name_
    rows = call.get(cls, [key], [cls.pk])
    if not rows:
        if must:
            call.one(cls, key, [cls.pk], what=cls_name.lower())  # raises 102 No such ...
        return None
    return int(rows[0][cls.pk])


def _tag_type_id(call: Call, acc: Accessor) -> int:
    row = call.conn.query("SELECT tag_type_id FROM tag_types WHERE tagname = ?", [acc.tagname])
    if row:
        return int(row[0]["tag_type_id"])
    # created lazily on first use (spec 9.2)
    return ensure_tag_type(call.conn, acc.tagname, acc.category, acc.description,
                           acc.set_roles)


def _define(acc: Accessor, cls_name: str) -> None:
    cls = CLASSES[cls_name]

    def getter(call: Call, auth: dict, id_or_name_: Any) -> str | None:
        oid = _object_id(call, cls_name, id_or_name_, must=False)
        return None if oid is None else get_tag(call, cls_name, oid, acc.tagname)

    def setter(call: Call, auth: dict, id_or_name_: Any, value: str) -> str:
        oid = _object_id(call, cls_name, id_or_name_, must=True)
        assert oid is not None
        ttid = _tag_type_id(call, acc)
        if cls_name == "Slice":
            s = call.one(cls, oid, ["slice_id", "name", "site_id", "node_ids", "person_ids"])
            may_write_slice_tag(call, s, ttid, None, None)
        else:
            may_write(call, cls_name, oid, ttid)
        set_tag(call, cls_name, oid, acc.tagname, value)
        call.log(f"{cls_name} {oid}: {acc.tagname} set", **{cls_name: oid})
        return value

    what = f"{acc.tagname} tag of a {cls_name.lower()}"
    make_method(getter, name=f"Get{cls_name}{acc.suffix}", roles=list(acc.get_roles),
                accepts=[Auth(), id_or_name(cls)],
                returns=Parameter(str, f"the {what}", nullok=True),
                doc=f"Accessor: returns the {what} ({acc.description}), or nil.")
    make_method(setter, name=f"Set{cls_name}{acc.suffix}", roles=list(acc.set_roles),
                accepts=[Auth(), id_or_name(cls), Parameter(str, "New value")],
                returns=Parameter(str, f"the {what}"),
                doc=f"Accessor: sets the {what} ({acc.description}).")


for _acc in ACCESSORS:
    for _cls in _acc.classes:
        _define(_acc, _cls)
