"""Nodes and the lookup lists (spec 5.4, 6.3)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCInvalidArgument, PLCPermissionDenied
from plc.filters import FilterParam, ReturnFields
from plc.method import ALL_ROLES, api_method, make_method
from plc.methods._tags import hrn_escape, set_tag
from plc.methods._util import accepted, id_or_name, require_keys, struct_of
from plc.model import LOOKUPS, Node, Site, Slice
from plc.params import Parameter

if TYPE_CHECKING:
    from plc.api import Call

HOSTNAME = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,6}\Z")
ADD_KEYS = ("hostname", "node_type", "boot_state", "model", "version")
ADMIN_KEYS = ("key", "session", "boot_nonce", "site_id")
RELATED = ("interfaces", "conf_files", "slices", "slices_whitelist")
HIDDEN = ("key", "session", "boot_nonce")


def valid_hostname(hostname: str) -> bool:
    return bool(hostname) and len(hostname) <= 255 and bool(HOSTNAME.match(hostname))


def check_lookup(call: Call, table: str, value: Any, what: str) -> None:
    col = LOOKUPS[table]
    if not call.conn.query(f"SELECT 1 FROM {table} WHERE {col} = ?", [value]):
        raise PLCInvalidArgument(f"No such {what} {value!r}", what)


def validate_node(call: Call, fields: dict[str, Any], node_id: int | None = None) -> None:
    if "hostname" in fields:
        hostname = fields["hostname"] = fields["hostname"].lower()
        if not valid_hostname(hostname):
            raise PLCInvalidArgument("Invalid hostname", "hostname")
        clash = call.conn.query("SELECT node_id FROM nodes WHERE hostname = ? AND deleted = 0",
                                [hostname])
        if any(r["node_id"] != node_id for r in clash):
            raise PLCInvalidArgument("Node name already in use", "hostname")
    if "node_type" in fields:
        check_lookup(call, "node_types", fields["node_type"], "node_type")
    if "boot_state" in fields:
        check_lookup(call, "boot_states", fields["boot_state"], "boot_state")


def node_hrn(call: Call, login_base: str, hostname: str) -> str:
    return f"{call.config.plc_hrn_root}.{login_base}.{hrn_escape(hostname)}"


@api_method(roles=ALL_ROLES + ["anonymous"],
            accepts=[Auth(), FilterParam(Node, scalars=True), ReturnFields()],
            returns=Parameter([dict], "List of nodes"))
def GetNodes(call: Call, auth: dict, node_filter: Any = None,
             return_fields: list | None = None) -> list:
    """Returns an array of structs containing details about nodes. If node_filter is
    specified and is an array of node identifiers or hostnames, or a struct of node
    attributes, only nodes matching the filter will be returned. Non-admins never see
    key, session and boot_nonce, nor whitelisted nodes they have no business with."""
    if isinstance(node_filter, str):
        node_filter = node_filter.lower()
    if call.is_admin:
        return call.get(Node, node_filter, return_fields)
    want = None if return_fields is None else [f for f in return_fields if f not in HIDDEN]
    if want is not None and not want and return_fields:
        return [{} for _ in call.get(Node, node_filter, ["node_id"])]
    extra = ["site_id", "slice_ids_whitelist"]
    rows = call.get(Node, node_filter, None if want is None else
                    list(dict.fromkeys(want + extra)))
    my_sites: set[int] | None = None
    my_slices: set[int] | None = None
    out = []
    for r in rows:
        wl = r["slice_ids_whitelist"]
        if wl:
            if my_sites is None:
                my_sites = set(call.caller_site_ids())
                my_slices = set(caller_slice_ids(call))
            if r["site_id"] not in my_sites and not set(wl) & (my_slices or set()):
                continue
        for h in HIDDEN:
            r.pop(h, None)
        if want is not None:
            r = {k: v for k, v in r.items() if k in want}
        out.append(r)
    return out


def caller_slice_ids(call: Call) -> list[int]:
    """The calling person's slices, or the slices on the calling node (legacy
    ``caller['slice_ids']``, used for whitelist visibility)."""
    if call.caller_kind == "person":
        sql = "SELECT slice_id FROM slice_person WHERE person_id = ?"
    elif call.caller_kind == "node":
        sql = "SELECT slice_id FROM slice_node WHERE node_id = ?"
    else:
        return []
    return [r["slice_id"] for r in call.conn.query(sql, [call.caller_id])]


def node_for_update(call: Call, node_id_or_hostname: int | str,
                    fields: list[str] | None = None) -> dict[str, Any]:
    node = call.one(Node, node_id_or_hostname, ["node_id", "hostname", "site_id", "peer_id"]
                    + (fields or []), what="node")
    if node["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local node")
    if not call.is_admin:
        if call.caller_kind == "node":
            if node["node_id"] != call.caller_id:
                raise PLCPermissionDenied("Not allowed to modify another node")
        elif node["site_id"] not in call.caller_site_ids():
            raise PLCPermissionDenied("Not allowed to delete nodes from specified site"
                                      if call.method.name.startswith("Delete") else
                                      "Not allowed to modify specified node")
    return node


@api_method(roles=["admin", "pi", "tech"],
            accepts=[Auth(), id_or_name(Site), struct_of(Node, ADD_KEYS, tags=True)],
            returns=Parameter(int, "New node_id (> 0) if successful"))
def AddNode(call: Call, auth: dict, site_id_or_login_base: int | str, node_fields: dict) -> int:
    """Adds a new node. Any values specified in node_fields are used, otherwise defaults
    are used. PIs and techs may only add nodes to their own sites."""
    native, tags = accepted(Node, node_fields, ADD_KEYS, reject=True, tags=True, what="add")
    require_keys(native, ("hostname",), "Node")
    site = call.one(Site, site_id_or_login_base, ["site_id", "login_base", "peer_id"],
                    what="site")
    if site["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local site")
    if not call.is_admin and site["site_id"] not in call.caller_site_ids():
        raise PLCPermissionDenied("Not allowed to add nodes to specified site")
    validate_node(call, native)
    node_id = call.insert("nodes", {**native, "site_id": site["site_id"],
                                    "date_created": call.now, "last_updated": call.now})
    set_tag(call, "Node", node_id, "hrn", node_hrn(call, site["login_base"], native["hostname"]))
    for name, value in tags.items():
        set_tag(call, "Node", node_id, name, value)
    call.log(f"Node {node_id} added at site {site['site_id']}", Site=site["site_id"],
             Node=node_id)
    return node_id


@api_method(roles=["admin", "pi", "tech"],
            accepts=[Auth(), id_or_name(Node),
                     {**struct_of(Node, ADD_KEYS + ADMIN_KEYS, tags=True),
                      "session": Parameter(str, "node session", nullok=True),
                      **{k: Parameter(list, f"related {k}") for k in RELATED}}],
            returns=Parameter(int, "1 if successful"))
def UpdateNode(call: Call, auth: dict, node_id_or_hostname: int | str, node_fields: dict) -> int:
    """Updates a node. Only the fields specified in node_fields are updated. PIs and
    techs can update only the nodes at their sites; only admins may change key,
    session, boot_nonce and site_id."""
    node = node_for_update(call, node_id_or_hostname, ["boot_state", "slice_ids",
                                                       "slice_ids_whitelist",
                                                       "conf_file_ids", "interface_ids"])
    rest = {k: v for k, v in node_fields.items() if k not in RELATED}
    if not call.is_admin:
        for k in ADMIN_KEYS:
            rest.pop(k, None)
    native, tags = accepted(Node, rest, ADD_KEYS + ADMIN_KEYS, reject=True, tags=True,
                            what="update")
    nid = node["node_id"]
    validate_node(call, native, nid)
    session = native.pop("session", None) if "session" in native else ...
    if "site_id" in native:
        call.one(Site, native["site_id"], ["site_id"], what="site")
    call.update("nodes", {"node_id": nid}, {**native, "last_updated": call.now})
    if session is not ...:
        call.delete("node_session", {"node_id": nid})
        if session:
            if not call.conn.query("SELECT 1 FROM sessions WHERE session_id = ?", [session]):
                call.insert("sessions", {"session_id": session, "expires": None})
            call.delete("person_session", {"session_id": session})
            call.delete("node_session", {"session_id": session})
            call.insert("node_session", {"node_id": nid, "session_id": session})
    if "hostname" in native or "site_id" in native:
        row = call.conn.query("SELECT s.login_base, n.hostname FROM nodes n JOIN sites s ON "
                              "s.site_id = n.site_id WHERE n.node_id = ?", [nid])[0]
        set_tag(call, "Node", nid, "hrn", node_hrn(call, row["login_base"], row["hostname"]))
    for name, value in tags.items():
        set_tag(call, "Node", nid, name, value)
    _related(call, node, node_fields)
    message = f"Node {nid} updated"
    if "boot_state" in native and native["boot_state"] != node["boot_state"]:
        message += f", boot_state {node['boot_state']} -> {native['boot_state']}"
    call.log(message, Node=nid)
    return 1


def _related(call: Call, node: dict[str, Any], fields: dict[str, Any]) -> None:
    nid = node["node_id"]
    if "slices" in fields:
        wanted = [call.one(Slice, s, ["slice_id"], what="slice")["slice_id"]
                  for s in fields["slices"]]
        for sid in wanted:
            if sid not in node["slice_ids"]:
                call.invoke("AddSliceToNodes", sid, [nid])
        for sid in node["slice_ids"]:
            if sid not in wanted:
                call.invoke("DeleteSliceFromNodes", sid, [nid])
    if "slices_whitelist" in fields:
        if not call.is_admin:
            raise PLCPermissionDenied("Only admins may change a node's slice whitelist")
        wanted = [call.one(Slice, s, ["slice_id"], what="slice")["slice_id"]
                  for s in fields["slices_whitelist"]]
        call.delete("node_slice_whitelist", {"node_id": nid})
        for sid in dict.fromkeys(wanted):
            call.insert("node_slice_whitelist", {"node_id": nid, "slice_id": sid})
    if "conf_files" in fields:
        if not call.is_admin:
            raise PLCPermissionDenied("Only admins may change a node's conf files")
        wanted = [int(c) for c in fields["conf_files"] if isinstance(c, int)]
        call.delete("conf_file_node", {"node_id": nid})
        for cid in dict.fromkeys(wanted):
            if not call.conn.query("SELECT 1 FROM conf_files WHERE conf_file_id = ?", [cid]):
                raise PLCInvalidArgument(f"No such conf file {cid}")
            call.insert("conf_file_node", {"conf_file_id": cid, "node_id": nid})
    if "interfaces" in fields:
        for i in fields["interfaces"]:
            if isinstance(i, dict):
                call.invoke("AddInterface", nid, i)


def delete_node_rows(call: Call, node_id: int) -> None:
    """The cascade of spec 5.4."""
    ifaces = [r["interface_id"] for r in call.conn.query(
        "SELECT interface_id FROM interfaces WHERE node_id = ?", [node_id])]
    if ifaces:
        call.delete("interface_tag", {"interface_id": ifaces})
        call.delete("ilinks", {"src_interface_id": ifaces})
        call.delete("ilinks", {"dst_interface_id": ifaces})
        call.delete("interfaces", {"interface_id": ifaces})
    sessions = [r["session_id"] for r in call.conn.query(
        "SELECT session_id FROM node_session WHERE node_id = ?", [node_id])]
    for table in ("slice_node", "slice_tag", "node_session", "node_slice_whitelist",
                  "node_tag", "conf_file_node", "pcu_node", "leases"):
        call.delete(table, {"node_id": node_id})
    if sessions:
        call.delete("sessions", {"session_id": sessions})
    call.update("nodes", {"node_id": node_id}, {"deleted": 1, "last_updated": call.now})


@api_method(roles=["admin", "pi", "tech"], accepts=[Auth(), id_or_name(Node)],
            returns=Parameter(int, "1 if successful"))
def DeleteNode(call: Call, auth: dict, node_id_or_hostname: int | str) -> int:
    """Mark an existing node as deleted. PIs and techs may only delete nodes at their
    own sites."""
    node = node_for_update(call, node_id_or_hostname)
    delete_node_rows(call, node["node_id"])
    call.log(f"Node {node['node_id']} deleted", Node=node["node_id"])
    return 1


def _define_lookup(name: str, table: str, doc: str) -> None:
    col = LOOKUPS[table]

    def lookup(call: Call, auth: dict) -> list:
        return [r[col] for r in call.conn.query(f"SELECT {col} FROM {table} ORDER BY rowid")]

    make_method(lookup, name=name, roles=ALL_ROLES, accepts=[Auth()],
                returns=Parameter([str], doc), doc=f"Returns an array of all valid {doc}.")


_define_lookup("GetNodeTypes", "node_types", "node types")
_define_lookup("GetBootStates", "boot_states", "node boot states")
_define_lookup("GetNetworkMethods", "network_methods", "network methods")
_define_lookup("GetNetworkTypes", "network_types", "network types")
_define_lookup("GetSliceInstantiations", "slice_instantiations", "slice instantiation states")
_define_lookup("GetKeyTypes", "key_types", "key types")
