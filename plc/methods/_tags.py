"""Writing tags of objects (exposed tags in Add/Update, hrn maintenance, accessors)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plc.faults import PLCInvalidArgument

if TYPE_CHECKING:
    from plc.api import Call

#: class name -> (tag table, owner column)
TAG_TABLES = {
    "Node": ("node_tag", "node_id"), "Site": ("site_tag", "site_id"),
    "Person": ("person_tag", "person_id"), "Interface": ("interface_tag", "interface_id"),
    "Slice": ("slice_tag", "slice_id"),
}


def tag_type(call: Call, tag_type_id_or_name: int | str) -> dict[str, Any]:
    col = "tag_type_id" if isinstance(tag_type_id_or_name, int) else "tagname"
    rows = call.conn.query(f"SELECT tag_type_id, tagname, category FROM tag_types "
                           f"WHERE {col} = ?", [tag_type_id_or_name])
    if not rows:
        raise PLCInvalidArgument(f"No such tag type {tag_type_id_or_name!r}")
    return rows[0]


def tag_type_roles(call: Call, tag_type_id: int) -> list[str]:
    return [r["name"] for r in call.conn.query(
        "SELECT r.name FROM tag_type_role x JOIN roles r ON r.role_id = x.role_id "
        "WHERE x.tag_type_id = ?", [tag_type_id])]


def set_tag(call: Call, cls_name: str, object_id: int, tagname: str, value: Any) -> int:
    """Create or update the first tag of ``tagname`` on the object (no permission check)."""
    table, owner = TAG_TABLES[cls_name]
    tt = tag_type(call, tagname)
    pk = f"{table}_id"
    rows = call.conn.query(f"SELECT {pk} FROM {table} WHERE {owner} = ? AND tag_type_id = ? "
                           f"ORDER BY {pk} LIMIT 1", [object_id, tt["tag_type_id"]])
    value = None if value is None else str(value)
    if rows:
        call.update(table, {pk: rows[0][pk]}, {"value": value})
        return int(rows[0][pk])
    return call.insert(table, {owner: object_id, "tag_type_id": tt["tag_type_id"],
                               "value": value})


def get_tag(call: Call, cls_name: str, object_id: int, tagname: str) -> str | None:
    table, owner = TAG_TABLES[cls_name]
    return call.conn.scalar(
        f"SELECT t.value FROM {table} t JOIN tag_types tt ON tt.tag_type_id = t.tag_type_id "
        f"WHERE t.{owner} = ? AND tt.tagname = ? ORDER BY t.{table}_id LIMIT 1",
        [object_id, tagname])


def hrn_escape(text: str) -> str:
    return text.replace(".", "\\.")
