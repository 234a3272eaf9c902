"""Configuration files and init scripts (spec 5.15, Appendix A): admin-managed catalogues
that GetSlivers hands to nodes. Not logged as events (spec 10)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.method import ALL_ROLES
from plc.methods._util import accepted, id_or_name, require_keys, struct_of
from plc.methods._xtra import bools, row, unique, xget, xmethod
from plc.model import ConfFile, InitScript, Node, NodeGroup
from plc.params import Mixed, Parameter

if TYPE_CHECKING:
    from plc.api import Call

CONF_KEYS = ("enabled", "source", "dest", "file_permissions", "file_owner", "file_group",
             "preinstall_cmd", "postinstall_cmd", "error_cmd", "ignore_cmd_errors",
             "always_update")
CONF_BOOLS = ("enabled", "ignore_cmd_errors", "always_update")
INITSCRIPT_KEYS = ("name", "enabled", "script")
_ONE = Parameter(int, "1 if successful")

xget(ConfFile, ["admin", "node"])
xget(InitScript, ALL_ROLES)


def _conf_file(call: Call, conf_file_id: int) -> dict[str, Any]:
    return row(call, "conf_files", "conf_file_id", conf_file_id, "configuration file")


def _node_id(call: Call, node_id_or_hostname: int | str) -> int:
    return int(call.one(Node, node_id_or_hostname, ["node_id"], what="node")["node_id"])


def _nodegroup_id(call: Call, nodegroup_id_or_name: int | str) -> int:
    return int(call.one(NodeGroup, nodegroup_id_or_name, ["nodegroup_id"],
                        what="nodegroup")["nodegroup_id"])


@xmethod(roles=["admin"], accepts=[Auth(), struct_of(ConfFile, CONF_KEYS)],
         returns=Parameter(int, "New conf_file_id (> 0) if successful"))
def AddConfFile(call: Call, auth: dict, conf_file_fields: dict) -> int:
    """Adds a new node configuration file. Unknown fields are ignored; source and dest
    are mandatory."""
    fields, _ = accepted(ConfFile, conf_file_fields, CONF_KEYS)
    require_keys(fields, ("source", "dest"), "ConfFile")
    fields = {k: v for k, v in bools(fields, CONF_BOOLS).items() if v is not None or
              k in ("preinstall_cmd", "postinstall_cmd", "error_cmd")}
    return int(call.insert("conf_files", fields))


@xmethod(roles=["admin"], accepts=[Auth(), Parameter(int, "Configuration file id"),
                                   struct_of(ConfFile, CONF_KEYS)],
         returns=_ONE)
def UpdateConfFile(call: Call, auth: dict, conf_file_id: int, conf_file_fields: dict) -> int:
    """Updates a node configuration file. Unknown fields are ignored."""
    _conf_file(call, conf_file_id)
    fields, _ = accepted(ConfFile, conf_file_fields, CONF_KEYS)
    for key in ("source", "dest", "file_permissions", "file_owner", "file_group"):
        if key in fields:
            require_keys(fields, (key,), "ConfFile")
    call.update("conf_files", {"conf_file_id": conf_file_id}, bools(fields, CONF_BOOLS))
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), Parameter(int, "Configuration file id")],
         returns=_ONE)
def DeleteConfFile(call: Call, auth: dict, conf_file_id: int) -> int:
    """Deletes a node configuration file and its node and nodegroup bindings."""
    _conf_file(call, conf_file_id)
    call.delete("conf_file_node", {"conf_file_id": conf_file_id})
    call.delete("conf_file_nodegroup", {"conf_file_id": conf_file_id})
    call.delete("conf_files", {"conf_file_id": conf_file_id})
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), Parameter(int, "Configuration file id"),
                                   id_or_name(Node)], returns=_ONE)
def AddConfFileToNode(call: Call, auth: dict, conf_file_id: int,
                      node_id_or_hostname: int | str) -> int:
    """Binds a configuration file to a node (idempotent)."""
    _conf_file(call, conf_file_id)
    node_id = _node_id(call, node_id_or_hostname)
    if not call.conn.query("SELECT 1 FROM conf_file_node WHERE conf_file_id = ? AND "
                           "node_id = ?", [conf_file_id, node_id]):
        call.insert("conf_file_node", {"conf_file_id": conf_file_id, "node_id": node_id})
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), Parameter(int, "Configuration file id"),
                                   id_or_name(Node)], returns=_ONE)
def DeleteConfFileFromNode(call: Call, auth: dict, conf_file_id: int,
                           node_id_or_hostname: int | str) -> int:
    """Unbinds a configuration file from a node (idempotent)."""
    _conf_file(call, conf_file_id)
    node_id = _node_id(call, node_id_or_hostname)
    call.delete("conf_file_node", {"conf_file_id": conf_file_id, "node_id": node_id})
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), Parameter(int, "Configuration file id"),
                                   id_or_name(NodeGroup)], returns=_ONE)
def AddConfFileToNodeGroup(call: Call, auth: dict, conf_file_id: int,
                           nodegroup_id_or_name: int | str) -> int:
    """Binds a configuration file to a nodegroup (idempotent)."""
    _conf_file(call, conf_file_id)
    ng = _nodegroup_id(call, nodegroup_id_or_name)
    if not call.conn.query("SELECT 1 FROM conf_file_nodegroup WHERE conf_file_id = ? AND "
                           "nodegroup_id = ?", [conf_file_id, ng]):
        call.insert("conf_file_nodegroup", {"conf_file_id": conf_file_id, "nodegroup_id": ng})
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), Parameter(int, "Configuration file id"),
                                   id_or_name(NodeGroup)], returns=_ONE)
def DeleteConfFileFromNodeGroup(call: Call, auth: dict, conf_file_id: int,
                                nodegroup_id_or_name: int | str) -> int:
    """Unbinds a configuration file from a nodegroup (idempotent)."""
    _conf_file(call, conf_file_id)
    ng = _nodegroup_id(call, nodegroup_id_or_name)
    call.delete("conf_file_nodegroup", {"conf_file_id": conf_file_id, "nodegroup_id": ng})
    return 1


# -- init scripts ------------------------------------------------------------------------
@xmethod(roles=["admin"], accepts=[Auth(), struct_of(InitScript, INITSCRIPT_KEYS)],
         returns=Parameter(int, "New initscript_id (> 0) if successful"))
def AddInitScript(call: Call, auth: dict, initscript_fields: dict) -> int:
    """Adds a new initscript; the name must be unique. Unknown fields are ignored."""
    fields, _ = accepted(InitScript, initscript_fields, INITSCRIPT_KEYS)
    require_keys(fields, ("name",), "InitScript")
    fields.setdefault("script", "")
    if fields["script"] is None:
        fields["script"] = ""
    unique(call, "initscripts", "name", fields["name"], "Initscript name")
    return int(call.insert("initscripts", bools(fields, ("enabled",))))


@xmethod(roles=["admin"], accepts=[Auth(), Parameter(int, "Initscript id"),
                                   struct_of(InitScript, INITSCRIPT_KEYS)], returns=_ONE)
def UpdateInitScript(call: Call, auth: dict, initscript_id: int, initscript_fields: dict) -> int:
    """Updates an initscript. Unknown fields are ignored."""
    row(call, "initscripts", "initscript_id", initscript_id, "initscript")
    fields, _ = accepted(InitScript, initscript_fields, INITSCRIPT_KEYS)
    if "name" in fields:
        require_keys(fields, ("name",), "InitScript")
        unique(call, "initscripts", "name", fields["name"], "Initscript name",
               ("initscript_id", initscript_id))
    if "script" in fields and fields["script"] is None:
        fields["script"] = ""
    call.update("initscripts", {"initscript_id": initscript_id}, bools(fields, ("enabled",)))
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), Mixed(InitScript.fields["initscript_id"].param,
                                                 InitScript.fields["name"].param)],
         returns=_ONE)
def DeleteInitScript(call: Call, auth: dict, initscript_id_or_name: int | str) -> int:
    """Deletes an initscript."""
    script = call.one(InitScript, initscript_id_or_name, ["initscript_id"], what="initscript")
    call.delete("initscripts", {"initscript_id": script["initscript_id"]})
    return 1
