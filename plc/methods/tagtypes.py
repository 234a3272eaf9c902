"""Tag types and node groups (spec 5.9, 5.11, 6.3)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCInvalidArgument
from plc.filters import FilterParam, ReturnFields
from plc.method import ALL_ROLES, api_method
from plc.methods._tags import tag_type
from plc.methods._util import accepted, id_or_name, require_keys, struct_of
from plc.model import NodeGroup, Role, TagType
from plc.params import Parameter

if TYPE_CHECKING:
    from plc.api import Call

TT_KEYS = ("tagname", "description", "category")
TAG_TABLES = ("node_tag", "interface_tag", "slice_tag", "site_tag", "person_tag", "ilinks")


@api_method(roles=ALL_ROLES, accepts=[Auth(), FilterParam(TagType, scalars=True), ReturnFields()],
            returns=Parameter([dict], "List of tag types"))
def GetTagTypes(call: Call, auth: dict, tag_type_filter: Any = None,
                return_fields: list | None = None) -> list:
    """Returns an array of structs containing details about tag types."""
    return call.get(TagType, tag_type_filter, return_fields)


@api_method(roles=["admin"], accepts=[Auth(), struct_of(TagType, TT_KEYS)],
            returns=Parameter(int, "New tag_type_id (> 0) if successful"))
def AddTagType(call: Call, auth: dict, tag_type_fields: dict) -> int:
    """Adds a new type of tag (no roles: only admins may write it until roles are
    added with AddRoleToTagType)."""
    fields, _ = accepted(TagType, tag_type_fields, TT_KEYS)
    require_keys(fields, ("tagname",), "TagType")
    fields.setdefault("category", "general")
    # a duplicate tagname hits the UNIQUE constraint: fault 106, as legacy (spec 5.9)
    ttid = call.insert("tag_types", fields)
    return ttid


@api_method(roles=["admin"], accepts=[Auth(), id_or_name(TagType), struct_of(TagType, TT_KEYS)],
            returns=Parameter(int, "1 if successful"))
def UpdateTagType(call: Call, auth: dict, tag_type_id_or_name: int | str,
                  tag_type_fields: dict) -> int:
    """Updates the parameters of an existing tag type. Roles are changed with
    AddRoleToTagType and DeleteRoleFromTagType."""
    tt = tag_type(call, tag_type_id_or_name)
    bad = [k for k in tag_type_fields if k not in TT_KEYS]
    if bad:
        raise PLCInvalidArgument(f"Cannot update TagType column(s) {bad} (use "
                                 "AddRoleToTagType / DeleteRoleFromTagType for roles)")
    if "tagname" in tag_type_fields and not tag_type_fields["tagname"]:
        raise PLCInvalidArgument("tagname must not be empty", "tagname")
    call.update("tag_types", {"tag_type_id": tt["tag_type_id"]}, dict(tag_type_fields))
    return 1


@api_method(roles=["admin"], accepts=[Auth(), id_or_name(TagType)],
            returns=Parameter(int, "1 if successful"))
def DeleteTagType(call: Call, auth: dict, tag_type_id_or_name: int | str) -> int:
    """Deletes the specified tag type, and every tag of that type."""
    ttid = tag_type(call, tag_type_id_or_name)["tag_type_id"]
    for table in TAG_TABLES:
        call.delete(table, {"tag_type_id": ttid})
    for g in call.conn.query("SELECT nodegroup_id FROM nodegroups WHERE tag_type_id = ?",
                             [ttid]):
        call.delete("conf_file_nodegroup", {"nodegroup_id": g["nodegroup_id"]})
        call.delete("slice_tag", {"nodegroup_id": g["nodegroup_id"]})
    call.delete("nodegroups", {"tag_type_id": ttid})
    call.delete("tag_type_role", {"tag_type_id": ttid})
    call.delete("tag_types", {"tag_type_id": ttid})
    return 1


def _tag_role(call: Call, role_id_or_name: int | str, tag_type_id_or_name: int | str,
              add: bool) -> int:
    role = call.one(Role, role_id_or_name, what="role")
    ttid = tag_type(call, tag_type_id_or_name)["tag_type_id"]
    have = call.conn.query("SELECT 1 FROM tag_type_role WHERE tag_type_id = ? AND role_id = ?",
                           [ttid, role["role_id"]])
    if add and not have:
        call.insert("tag_type_role", {"tag_type_id": ttid, "role_id": role["role_id"]})
    elif not add:
        call.delete("tag_type_role", {"tag_type_id": ttid, "role_id": role["role_id"]})
    return 1


@api_method(roles=["admin"], accepts=[Auth(), id_or_name(Role), id_or_name(TagType)],
            returns=Parameter(int, "1 if successful"))
def AddRoleToTagType(call: Call, auth: dict, role_id_or_name: int | str,
                     tag_type_id_or_tagname: int | str) -> int:
    """Allows the specified role to write tags of the specified type."""
    return _tag_role(call, role_id_or_name, tag_type_id_or_tagname, True)


@api_method(roles=["admin"], accepts=[Auth(), id_or_name(Role), id_or_name(TagType)],
            returns=Parameter(int, "1 if successful"))
def DeleteRoleFromTagType(call: Call, auth: dict, role_id_or_name: int | str,
                          tag_type_id_or_tagname: int | str) -> int:
    """Stops the specified role from writing tags of the specified type."""
    return _tag_role(call, role_id_or_name, tag_type_id_or_tagname, False)


@api_method(roles=ALL_ROLES + ["anonymous"],
            accepts=[Auth(), FilterParam(NodeGroup), ReturnFields()],
            returns=Parameter([dict], "List of node groups"))
def GetNodeGroups(call: Call, auth: dict, nodegroup_filter: Any = None,
                  return_fields: list | None = None) -> list:
    """Returns an array of structs containing details about node groups. A node is in
    a group when it has a node tag of the group's type whose value equals the group's
    value."""
    return call.get(NodeGroup, nodegroup_filter, return_fields)


@api_method(roles=["admin"],
            accepts=[Auth(), NodeGroup.fields["groupname"].param, id_or_name(TagType),
                     Parameter(str, "Value of the tag that defines the group")],
            returns=Parameter(int, "New nodegroup_id (> 0) if successful"))
def AddNodeGroup(call: Call, auth: dict, groupname: str, tag_type_id_or_tagname: int | str,
                 value: str) -> int:
    """Adds a new node group: the nodes whose tag of that type has that value."""
    if not groupname.strip():
        raise PLCInvalidArgument("groupname must not be empty", "groupname")
    ttid = tag_type(call, tag_type_id_or_tagname)["tag_type_id"]
    # duplicate groupname: UNIQUE constraint, fault 106 as legacy
    ngid = call.insert("nodegroups", {"groupname": groupname, "tag_type_id": ttid,
                                      "value": value})
    call.log(f"Node group {ngid} added", NodeGroup=ngid)
    return ngid


@api_method(roles=["admin"],
            accepts=[Auth(), id_or_name(NodeGroup),
                     struct_of(NodeGroup, ("groupname", "value"))],
            returns=Parameter(int, "1 if successful"))
def UpdateNodeGroup(call: Call, auth: dict, nodegroup_id_or_name: int | str,
                    nodegroup_fields: dict) -> int:
    """Updates the name or value of a node group (other keys are ignored)."""
    g = call.one(NodeGroup, nodegroup_id_or_name, ["nodegroup_id"], what="nodegroup")
    fields, _ = accepted(NodeGroup, nodegroup_fields, ("groupname", "value"))
    call.update("nodegroups", {"nodegroup_id": g["nodegroup_id"]}, fields)
    call.log(f"Node group {g['nodegroup_id']} updated", NodeGroup=g["nodegroup_id"])
    return 1


@api_method(roles=["admin"], accepts=[Auth(), id_or_name(NodeGroup)],
            returns=Parameter(int, "1 if successful"))
def DeleteNodeGroup(call: Call, auth: dict, nodegroup_id_or_name: int | str) -> int:
    """Deletes a node group (its scoped slice tags and conf file links too)."""
    g = call.one(NodeGroup, nodegroup_id_or_name, ["nodegroup_id"], what="nodegroup")
    ngid = g["nodegroup_id"]
    call.delete("conf_file_nodegroup", {"nodegroup_id": ngid})
    call.delete("slice_tag", {"nodegroup_id": ngid})
    call.delete("nodegroups", {"nodegroup_id": ngid})
    call.log(f"Node group {ngid} deleted", NodeGroup=ngid)
    return 1
