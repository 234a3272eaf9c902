"""Tags of nodes, interfaces, sites and persons: Get/Add/Update/Delete<X>Tag
(spec 5.8, 6.3). One factory makes the four methods for each class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCInvalidArgument, PLCPermissionDenied
from plc.filters import FilterParam, ReturnFields
from plc.method import make_method
from plc.methods._tags import TAG_TABLES, tag_type, tag_type_roles
from plc.methods._util import rename_args
from plc.model import (
    Interface,
    InterfaceTag,
    Node,
    NodeTag,
    ObjClass,
    Person,
    PersonTag,
    Site,
    SiteTag,
    TagType,
)
from plc.params import Mixed, Parameter

if TYPE_CHECKING:
    from plc.api import Call


def owner_site_ids(call: Call, cls_name: str, object_id: int) -> list[int]:
    if cls_name == "Node":
        sql = "SELECT site_id FROM nodes WHERE node_id = ?"
    elif cls_name == "Interface":
        sql = ("SELECT n.site_id FROM interfaces i JOIN nodes n ON n.node_id = i.node_id "
               "WHERE i.interface_id = ?")
    elif cls_name == "Site":
        return [object_id]
    else:
        sql = "SELECT site_id FROM person_site WHERE person_id = ?"
    return [r["site_id"] for r in call.conn.query(sql, [object_id])]


def may_write(call: Call, cls_name: str, object_id: int, tag_type_id: int) -> None:
    """Fault 108 unless the caller may write a tag of this type on the object."""
    if call.is_admin:
        return
    if cls_name == "Person":
        if call.caller_kind == "person" and call.caller_id == object_id:
            return
        raise PLCPermissionDenied("Not allowed to set tags on that person")
    roles = tag_type_roles(call, tag_type_id)
    if not set(roles) & set(call.roles):
        raise PLCPermissionDenied(f"Not allowed to write tags of this type (roles {roles})")
    if call.caller_kind == "node":
        node_id = object_id if cls_name == "Node" else call.conn.scalar(
            "SELECT node_id FROM interfaces WHERE interface_id = ?", [object_id])
        if node_id == call.caller_id:
            return
        raise PLCPermissionDenied("A node may only tag itself")
    if not set(owner_site_ids(call, cls_name, object_id)) & set(call.caller_site_ids()):
        raise PLCPermissionDenied(f"Not a member of the {cls_name.lower()}'s site")


def _define(cls: ObjClass, tag_cls: ObjClass, get_roles: list[str], write_roles: list[str],
            delete_roles: list[str], id_param: Any) -> None:
    name = cls.name
    table, owner = TAG_TABLES[name]
    pk = f"{table}_id"
    lname = name.lower()

    def get_tags(call: Call, auth: dict, flt: Any = None, return_fields: list | None = None):
        return call.get(tag_cls, flt, return_fields)

    def add_tag(call: Call, auth: dict, object_id_or_name: Any, tag_type_id_or_name: Any,
                value: str) -> int:
        obj = call.one(cls, object_id_or_name, [cls.pk], what=lname)
        oid = obj[cls.pk]
        tt = tag_type(call, tag_type_id_or_name)
        if call.conn.query(f"SELECT 1 FROM {table} WHERE {owner} = ? AND tag_type_id = ?",
                           [oid, tt["tag_type_id"]]):
            raise PLCInvalidArgument(f"{name} {oid} already has tag {tt['tagname']}")
        may_write(call, name, oid, tt["tag_type_id"])
        tag_id = call.insert(table, {owner: oid, "tag_type_id": tt["tag_type_id"],
                                     "value": value})
        return tag_id

    def _tag(call: Call, tag_id: int) -> dict[str, Any]:
        rows = call.conn.query(f"SELECT {pk}, {owner}, tag_type_id FROM {table} WHERE {pk} = ?",
                               [tag_id])
        if not rows:
            raise PLCInvalidArgument(f"No such {lname} tag {tag_id}")
        may_write(call, name, rows[0][owner], rows[0]["tag_type_id"])
        return rows[0]

    def update_tag(call: Call, auth: dict, tag_id: int, value: str) -> int:
        _tag(call, tag_id)
        call.update(table, {pk: tag_id}, {"value": value})
        return 1

    def delete_tag(call: Call, auth: dict, tag_id: int) -> int:
        _tag(call, tag_id)
        call.delete(table, {pk: tag_id})
        return 1

    rename_args(get_tags, {"flt": f"{lname}_tag_filter"})
    rename_args(add_tag, {"object_id_or_name": f"{lname}_id" if not isinstance(id_param, Mixed)
                          else f"{lname}_id_or_{cls.secondary}"})
    rename_args(update_tag, {"tag_id": pk})
    rename_args(delete_tag, {"tag_id": pk})
    tt_param = Mixed(TagType.fields["tag_type_id"].param, TagType.fields["tagname"].param)
    value_param = Parameter(str, "Value of the tag")
    id_doc = Parameter(int, f"{name} tag identifier")
    make_method(get_tags, name=f"Get{name}Tags", roles=get_roles,
                accepts=[Auth(), FilterParam(tag_cls, scalars=True), ReturnFields()],
                returns=Parameter([dict], f"List of {lname} tags"),
                doc=f"Returns an array of structs containing details about {lname} tags.")
    make_method(add_tag, name=f"Add{name}Tag", roles=write_roles,
                accepts=[Auth(), id_param, tt_param, value_param],
                returns=Parameter(int, f"New {pk} (> 0) if successful"),
                doc=f"Sets the specified tag of the {lname} to the specified value. Admins, "
                    f"or callers with a role of the tag type at the {lname}'s site, may.")
    make_method(update_tag, name=f"Update{name}Tag", roles=write_roles,
                accepts=[Auth(), id_doc, value_param],
                returns=Parameter(int, "1 if successful"),
                doc=f"Updates the value of an existing {lname} tag.")
    make_method(delete_tag, name=f"Delete{name}Tag", roles=delete_roles,
                accepts=[Auth(), id_doc], returns=Parameter(int, "1 if successful"),
                doc=f"Deletes the specified {lname} tag.")


_PTS = ["admin", "pi", "tech", "user"]
_define(Node, NodeTag, ["admin", "pi", "user", "tech", "node"], _PTS, ["admin", "pi", "user", "tech"],
        Mixed(Node.fields["node_id"].param, Node.fields["hostname"].param))
_define(Interface, InterfaceTag, ["admin", "pi", "user", "tech", "node"], _PTS,
        ["admin", "pi", "user", "tech"], Interface.fields["interface_id"].param)
_define(Site, SiteTag, ["admin", "pi", "user", "node"], _PTS, ["admin", "pi", "user"],
        Site.fields["site_id"].param)
_define(Person, PersonTag, ["admin", "pi", "user", "tech"], _PTS, ["admin", "pi", "user"],
        Person.fields["person_id"].param)
