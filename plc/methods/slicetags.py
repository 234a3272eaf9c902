"""Slice tags at slice, nodegroup and node (sliver) scope (spec 5.7, 9.1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCInvalidArgument, PLCPermissionDenied
from plc.filters import FilterParam, ReturnFields
from plc.method import api_method
from plc.methods._tags import tag_type, tag_type_roles
from plc.methods._util import id_or_name
from plc.model import Node, NodeGroup, Slice, SliceTag, TagType
from plc.params import Mixed, Parameter
from plc.tagvalues import check_tag_value

if TYPE_CHECKING:
    from plc.api import Call


def is_system_slice(call: Call, slice_id: int) -> bool:
    return bool(call.conn.query(
        "SELECT 1 FROM slice_tag t JOIN tag_types tt ON tt.tag_type_id = t.tag_type_id "
        "WHERE t.slice_id = ? AND tt.tagname = 'system' AND t.value = '1'", [slice_id]))


def may_write_slice_tag(call: Call, s: dict[str, Any], tag_type_id: int,
                        node_id: int | None, nodegroup_id: int | None) -> None:
    """caller_may_write_slice_tag of spec 9.1 (fault 108 when refused)."""
    if call.is_admin:
        return
    roles = tag_type_roles(call, tag_type_id)
    common = set(roles) & set(call.roles)
    if not common:
        raise PLCPermissionDenied(f"Not allowed to write tags of this type (roles {roles})")
    if call.caller_kind == "node":
        # a node must name itself: without a node argument the tag would be slice-wide
        # (legacy caller_may_write_slice_tag: "wrong node caller")
        if node_id is None or node_id != call.caller_id or \
                call.caller_id not in s["node_ids"]:
            raise PLCPermissionDenied("A node may only set sliver tags of slices on itself")
        return
    if nodegroup_id is not None:
        raise PLCPermissionDenied("Only admins may set nodegroup-scoped slice tags")
    if node_id is not None and node_id not in s["node_ids"]:
        raise PLCPermissionDenied("The slice is not on that node")
    if "user" in common and call.caller_id in s["person_ids"]:
        return
    if "pi" in common and s["site_id"] in call.caller_site_ids():
        return
    raise PLCPermissionDenied("Not a member of the slice, nor a PI of its site")


def check_initscript(call: Call, tagname: str, value: str) -> None:
    check_tag_value(tagname, value)   # numeric and rlimit tags: in range (issue 15)
    if tagname == "initscript" and not call.conn.query(
            "SELECT 1 FROM initscripts WHERE name = ? AND enabled = 1", [value]):
        raise PLCInvalidArgument(f"No such enabled initscript {value!r}", "value")


def _slice(call: Call, slice_id_or_name: int | str) -> dict[str, Any]:
    return call.one(Slice, slice_id_or_name, ["slice_id", "name", "site_id", "node_ids",
                                              "person_ids"], what="slice")


@api_method(roles=["admin", "pi", "user", "node"],
            accepts=[Auth(), FilterParam(SliceTag), ReturnFields()],
            returns=Parameter([dict], "List of slice tags"))
def GetSliceTags(call: Call, auth: dict, slice_tag_filter: Any = None,
                 return_fields: list | None = None) -> list:
    """Returns an array of structs containing details about slice and sliver tags."""
    return call.get(SliceTag, slice_tag_filter, return_fields)


@api_method(roles=["admin", "pi", "user", "node"],
            accepts=[Auth(), id_or_name(Slice),
                     Mixed(TagType.fields["tag_type_id"].param, TagType.fields["tagname"].param),
                     Parameter(str, "Value of the tag"),
                     Mixed(Node.fields["node_id"].param, Node.fields["hostname"].param,
                           nullok=True, doc="Node (sliver tag), or nil"),
                     Mixed(NodeGroup.fields["nodegroup_id"].param,
                           NodeGroup.fields["groupname"].param, doc="Nodegroup")],
            returns=Parameter(int, "New slice_tag_id (> 0) if successful"))
def AddSliceTag(call: Call, auth: dict, slice_id_or_name: int | str,
                tag_type_id_or_name: int | str, value: str,
                node_id_or_hostname: int | str | None = None,
                nodegroup_id_or_name: int | str | None = None) -> int:
    """Sets the specified tag of the slice to the specified value; with a node, as a
    sliver tag on that node; with a nodegroup, for the nodes of that group. Admins
    may always; others need a role of the tag type and to be a member of the slice
    (user) or a PI of its site (pi); a node only for slivers on itself."""
    s = _slice(call, slice_id_or_name)
    tt = tag_type(call, tag_type_id_or_name)
    node_id = None
    if node_id_or_hostname is not None:
        key = node_id_or_hostname.lower() if isinstance(node_id_or_hostname, str) else \
            node_id_or_hostname
        node_id = call.one(Node, key, ["node_id"], what="node")["node_id"]
    nodegroup_id = None
    if nodegroup_id_or_name is not None:
        nodegroup_id = call.one(NodeGroup, nodegroup_id_or_name, ["nodegroup_id"],
                                what="nodegroup")["nodegroup_id"]
    may_write_slice_tag(call, s, tt["tag_type_id"], node_id, nodegroup_id)
    check_initscript(call, tt["tagname"], value)
    if node_id is not None and node_id not in s["node_ids"] and \
            not is_system_slice(call, s["slice_id"]):
        raise PLCInvalidArgument(f"The slice {s['name']} is not on node {node_id}")
    same = call.conn.query(
        "SELECT node_id, nodegroup_id FROM slice_tag WHERE slice_id = ? AND tag_type_id = ? "
        "AND value = ?", [s["slice_id"], tt["tag_type_id"], value])
    for r in same:
        if node_id is not None and r["node_id"] == node_id:
            raise PLCInvalidArgument("Sliver attribute already exists")
        if nodegroup_id is not None and r["nodegroup_id"] == nodegroup_id:
            raise PLCInvalidArgument("Slice attribute already exists for this nodegroup")
        if node_id is None and nodegroup_id is None and r["node_id"] is None and \
                r["nodegroup_id"] is None:
            raise PLCInvalidArgument("Slice attribute already exists")
    return call.insert("slice_tag", {"slice_id": s["slice_id"],
                                     "tag_type_id": tt["tag_type_id"], "value": value,
                                     "node_id": node_id, "nodegroup_id": nodegroup_id})


def _existing(call: Call, slice_tag_id: int) -> dict[str, Any]:
    tags = call.get(SliceTag, [slice_tag_id], ["slice_tag_id", "slice_id", "tag_type_id",
                                               "tagname", "node_id", "nodegroup_id"])
    if not tags:
        raise PLCInvalidArgument(f"No such slice tag {slice_tag_id}")
    t = tags[0]
    s = call.one(Slice, t["slice_id"], ["slice_id", "name", "site_id", "node_ids",
                                        "person_ids"], what="slice")
    may_write_slice_tag(call, s, t["tag_type_id"], t["node_id"], t["nodegroup_id"])
    return t


@api_method(roles=["admin", "pi", "user", "node"],
            accepts=[Auth(), SliceTag.fields["slice_tag_id"].param,
                     Parameter(str, "Value of the tag")],
            returns=Parameter(int, "1 if successful"))
def UpdateSliceTag(call: Call, auth: dict, slice_tag_id: int, value: str) -> int:
    """Updates the value of an existing slice or sliver tag (same permission rule as
    AddSliceTag, at the tag's scope)."""
    t = _existing(call, slice_tag_id)
    check_initscript(call, t["tagname"], value)
    call.update("slice_tag", {"slice_tag_id": slice_tag_id}, {"value": value})
    return 1


@api_method(roles=["admin", "pi", "user", "tech", "node"],
            accepts=[Auth(), SliceTag.fields["slice_tag_id"].param],
            returns=Parameter(int, "1 if successful"))
def DeleteSliceTag(call: Call, auth: dict, slice_tag_id: int) -> int:
    """Deletes the specified slice or sliver tag (same permission rule as AddSliceTag)."""
    _existing(call, slice_tag_id)
    call.delete("slice_tag", {"slice_tag_id": slice_tag_id})
    return 1
