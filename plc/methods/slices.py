"""Slices, their nodes and members (spec 5.6, 6.3)."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCFault, PLCInvalidArgument, PLCPermissionDenied
from plc.filters import FilterParam, ReturnFields
from plc.method import api_method
from plc.methods._tags import set_tag
from plc.methods._util import accepted, id_or_name, require_keys, struct_of
from plc.methods.persons import local_person
from plc.model import Node, Person, Slice
from plc.params import Parameter

if TYPE_CHECKING:
    from plc.api import Call

log = logging.getLogger("plc.methods.slices")

NAME = re.compile(r"^[a-z0-9.]+_[a-zA-Z0-9_.]+\Z")
ADD_KEYS = ("name", "instantiation", "url", "description", "max_nodes")
UPDATE_KEYS = ("instantiation", "url", "description", "max_nodes", "expires")
RELATED = ("persons", "nodes")
TWO_WEEKS = 14 * 24 * 3600
EIGHT_WEEKS = 8 * 7 * 24 * 3600


def delete_slice_rows(call: Call, slice_id: int) -> None:
    """The cascade of spec 5.6."""
    for table in ("slice_node", "slice_person", "slice_tag", "node_slice_whitelist", "leases"):
        call.delete(table, {"slice_id": slice_id})
    call.update("slices", {"slice_id": slice_id}, {"deleted": 1})


def slice_for_update(call: Call, slice_id_or_name: int | str,
                     fields: list[str] | None = None) -> dict[str, Any]:
    """The slice, if the caller is admin, a member, or a PI of the slice's site (108)."""
    s = call.one(Slice, slice_id_or_name, ["slice_id", "name", "site_id", "peer_id",
                                           "person_ids", "node_ids"] + (fields or []),
                 what="slice")
    if s["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local slice")
    if call.is_admin:
        return s
    if call.caller_kind == "person":
        if call.caller_id in s["person_ids"]:
            return s
        if "pi" in call.roles and s["site_id"] in call.caller_site_ids():
            return s
    raise PLCPermissionDenied("Specified slice not associated with any of your sites")


@api_method(roles=["admin", "pi", "user", "node"],
            accepts=[Auth(), FilterParam(Slice, scalars=True), ReturnFields()],
            returns=Parameter([dict], "List of slices"))
def GetSlices(call: Call, auth: dict, slice_filter: Any = None,
              return_fields: list | None = None) -> list:
    """Returns an array of structs containing details about slices. If slice_filter is
    specified and is an array of slice identifiers or slice names, or a struct of
    slice attributes, only slices matching the filter will be returned. Expired and
    deleted slices are never returned."""
    return call.get(Slice, slice_filter, return_fields)


@api_method(roles=["admin", "pi"], accepts=[Auth(), struct_of(Slice, ADD_KEYS, tags=True)],
            returns=Parameter(int, "New slice_id (> 0) if successful"))
def AddSlice(call: Call, auth: dict, slice_fields: dict) -> int:
    """Adds a new slice. Any fields specified in slice_fields are used, otherwise
    defaults are used. The slice name must start with the login_base of the site and
    an underscore; PIs may only add slices to their sites, within max_slices."""
    native, tags = accepted(Slice, slice_fields, ADD_KEYS, reject=True, tags=True, what="add")
    require_keys(native, ("name",), "Slice")
    name = native["name"]
    if not NAME.match(name):
        raise PLCInvalidArgument("Slice name must be of the form login_base_name, with only "
                                 "a-z, 0-9 and '.' in login_base", "name")
    login_base = name.split("_", 1)[0]
    sites = call.conn.query("SELECT site_id, login_base, max_slices, enabled, peer_id FROM "
                            "sites WHERE login_base = ? AND deleted = 0", [login_base])
    if not sites:
        raise PLCInvalidArgument(f"Invalid slice prefix {login_base} in {name}")
    site = sites[0]
    if not call.is_admin and site["site_id"] not in call.caller_site_ids():
        raise PLCPermissionDenied(f"Slice prefix {login_base} must be the same as the "
                                  "login_base of one of your sites")
    # expired slices are soft-deleted before any new one is made (spec 5.6)
    for r in call.conn.query("SELECT slice_id FROM slices WHERE deleted = 0 AND expires <= ?",
                             [call.now]):
        delete_slice_rows(call, r["slice_id"])
    count = call.conn.scalar("SELECT COUNT(*) FROM slices WHERE site_id = ? AND deleted = 0",
                             [site["site_id"]])
    if count >= site["max_slices"]:
        raise PLCInvalidArgument(f"Site {login_base} has reached its maximum allowable slice "
                                 f"count ({site['max_slices']})")
    if not site["enabled"]:
        raise PLCInvalidArgument(f"Site {login_base} is not enabled")
    if call.conn.query("SELECT 1 FROM slices WHERE name = ? AND deleted = 0", [name]):
        raise PLCInvalidArgument("Slice name already in use", "name")
    if "instantiation" in native and not call.conn.query(
            "SELECT 1 FROM slice_instantiations WHERE instantiation = ?",
            [native["instantiation"]]):
        raise PLCInvalidArgument(f"No such instantiation state {native['instantiation']!r}",
                                 "instantiation")
    slice_id = call.insert("slices", {**native, "site_id": site["site_id"],
                                      "creator_person_id": call.person_id,
                                      "created": call.now, "expires": call.now + TWO_WEEKS})
    set_tag(call, "Slice", slice_id, "hrn",
            f"{call.config.plc_hrn_root}.{login_base}.{name.split('_', 1)[1]}")
    for tagname, value in tags.items():
        if tagname != "hrn":
            call.invoke("AddSliceTag", slice_id, tagname, value)
    for vsys in call.config.slices_vsys_defaults.split(","):
        if vsys.strip():
            try:
                call.invoke("AddSliceTag", slice_id, "vsys", vsys.strip())
            except PLCFault as f:
                log.warning("slice %s: default vsys %s not added: %s", name, vsys, f.faultString)
    call.log(f"Slice {slice_id} created", Site=site["site_id"], Slice=slice_id)
    return slice_id


@api_method(roles=["admin", "pi", "user"],
            accepts=[Auth(), id_or_name(Slice),
                     {**struct_of(Slice, UPDATE_KEYS, tags=True),
                      **{k: Parameter(list, f"related {k}") for k in RELATED}}],
            returns=Parameter(int, "1 if successful"))
def UpdateSlice(call: Call, auth: dict, slice_id_or_name: int | str, slice_fields: dict) -> int:
    """Updates the parameters of an existing slice. Users may only update slices of
    which they are members; PIs the slices of their sites. Renewal (a later expires)
    needs max_slices > 0 at the site, a description and a URL, and goes at most 8
    weeks ahead for non-admins."""
    s = slice_for_update(call, slice_id_or_name, ["expires", "description", "url",
                                                  "max_nodes", "slice_tag_ids"])
    rest = {k: v for k, v in slice_fields.items() if k not in RELATED}
    native, tags = accepted(Slice, rest, UPDATE_KEYS, reject=True, tags=True, what="update")
    sid = s["slice_id"]
    message = f"Slice {sid} updated"
    if "expires" in native:
        expires = native["expires"]
        if expires <= call.now:
            raise PLCInvalidArgument("Expiration date must be in the future", "expires")
        if expires > s["expires"]:
            max_slices = call.conn.scalar("SELECT max_slices FROM sites WHERE site_id = ?",
                                          [s["site_id"]])
            if max_slices <= 0:
                raise PLCInvalidArgument("Slice creation and renewal have been disabled for "
                                         "the site")
            if not call.is_admin and expires > call.now + EIGHT_WEEKS:
                raise PLCInvalidArgument("Cannot renew a slice beyond 8 weeks from now",
                                         "expires")
            for k in ("description", "url"):
                if not (native.get(k, s[k]) or "").strip():
                    raise PLCInvalidArgument(f"Cannot renew a slice with an empty {k}")
            message += f", renewed until {expires}"
    if "max_nodes" in native and native["max_nodes"] != s["max_nodes"] and \
            not call.has_role("admin", "pi"):
        raise PLCInvalidArgument("Only admins and PIs may update max_nodes", "max_nodes")
    if "instantiation" in native and not call.conn.query(
            "SELECT 1 FROM slice_instantiations WHERE instantiation = ?",
            [native["instantiation"]]):
        raise PLCInvalidArgument(f"No such instantiation state {native['instantiation']!r}",
                                 "instantiation")
    call.update("slices", {"slice_id": sid}, native)
    for tagname, value in tags.items():
        existing = call.conn.query(
            "SELECT t.slice_tag_id FROM slice_tag t JOIN tag_types tt ON "
            "tt.tag_type_id = t.tag_type_id WHERE t.slice_id = ? AND tt.tagname = ? AND "
            "t.node_id IS NULL AND t.nodegroup_id IS NULL ORDER BY t.slice_tag_id", [sid, tagname])
        if existing:
            call.invoke("UpdateSliceTag", existing[0]["slice_tag_id"], value)
        else:
            call.invoke("AddSliceTag", sid, tagname, value)
    if "persons" in slice_fields:
        wanted = [call.one(Person, p, ["person_id"], what="person")["person_id"]
                  for p in slice_fields["persons"]]
        for pid in wanted:
            if pid not in s["person_ids"]:
                call.invoke("AddPersonToSlice", pid, sid)
        for pid in s["person_ids"]:
            if pid not in wanted:
                call.invoke("DeletePersonFromSlice", pid, sid)
    if "nodes" in slice_fields:
        wanted_nodes = [n["node_id"] for n in call.get(
            Node, [v.lower() if isinstance(v, str) else v for v in slice_fields["nodes"]],
            ["node_id"])]
        add = [n for n in wanted_nodes if n not in s["node_ids"]]
        remove = [n for n in s["node_ids"] if n not in wanted_nodes]
        if add:
            call.invoke("AddSliceToNodes", sid, add)
        if remove:
            call.invoke("DeleteSliceFromNodes", sid, remove)
    call.log(message, Slice=sid)
    return 1


@api_method(roles=["admin", "pi", "user"], accepts=[Auth(), id_or_name(Slice)],
            returns=Parameter(int, "1 if successful"))
def DeleteSlice(call: Call, auth: dict, slice_id_or_name: int | str) -> int:
    """Deletes the specified slice. Users may only delete slices of which they are
    members; PIs the slices of their sites."""
    s = slice_for_update(call, slice_id_or_name)
    delete_slice_rows(call, s["slice_id"])
    return 1


def _nodes(call: Call, node_ids_or_hostnames: list[Any]) -> list[dict[str, Any]]:
    values = [v.lower() if isinstance(v, str) else v for v in node_ids_or_hostnames]
    return call.get(Node, values, ["node_id", "site_id", "peer_id", "slice_ids_whitelist"])


_NODE_LIST = Parameter([id_or_name(Node)], "List of node ids or hostnames")


@api_method(roles=["admin", "pi", "user"], accepts=[Auth(), id_or_name(Slice), _NODE_LIST],
            returns=Parameter(int, "1 if successful"))
def AddSliceToNodes(call: Call, auth: dict, slice_id_or_name: int | str,
                    node_id_or_hostname_list: list) -> int:
    """Adds the specified slice to the specified nodes. Unknown nodes are ignored; a
    node with a slice whitelist takes only listed slices (unless it is at one of the
    caller's sites). Adding a slice twice is not an error."""
    s = slice_for_update(call, slice_id_or_name)
    mine = set(call.caller_site_ids())
    added = []
    for node in _nodes(call, node_id_or_hostname_list):
        wl = node["slice_ids_whitelist"]
        if wl and s["slice_id"] not in wl and not call.is_admin and node["site_id"] not in mine:
            raise PLCInvalidArgument(f"{s['name']} is not on the whitelist of node "
                                     f"{node['node_id']}")
        if node["node_id"] not in s["node_ids"]:
            call.insert("slice_node", {"slice_id": s["slice_id"], "node_id": node["node_id"]})
            added.append(node["node_id"])
    call.log(f"Slice {s['slice_id']} added to nodes {added}", Slice=s["slice_id"], Node=added)
    return 1


@api_method(roles=["admin", "pi", "user"], accepts=[Auth(), id_or_name(Slice), _NODE_LIST],
            returns=Parameter(int, "1 if successful"))
def DeleteSliceFromNodes(call: Call, auth: dict, slice_id_or_name: int | str,
                         node_id_or_hostname_list: list) -> int:
    """Deletes the specified slice from the specified nodes. If the slice is not
    associated with a node, no errors are returned."""
    s = slice_for_update(call, slice_id_or_name)
    for node in _nodes(call, node_id_or_hostname_list):
        # only the link goes, as legacy: the slice's sliver tags on that node (an
        # operator's per-node override, a node-managed tag) stay and apply again when
        # the slice comes back to the node
        call.delete("slice_node", {"slice_id": s["slice_id"], "node_id": node["node_id"]})
    return 1


@api_method(roles=["admin"], accepts=[Auth(), id_or_name(Slice), _NODE_LIST],
            returns=Parameter(int, "1 if successful"))
def AddSliceToNodesWhitelist(call: Call, auth: dict, slice_id_or_name: int | str,
                             node_id_or_hostname_list: list) -> int:
    """Adds the specified slice to the whitelist of the specified nodes."""
    s = call.one(Slice, slice_id_or_name, ["slice_id"], what="slice")
    for node in _nodes(call, node_id_or_hostname_list):
        if s["slice_id"] not in node["slice_ids_whitelist"]:
            call.insert("node_slice_whitelist", {"node_id": node["node_id"],
                                                 "slice_id": s["slice_id"]})
    return 1


@api_method(roles=["admin"], accepts=[Auth(), id_or_name(Slice), _NODE_LIST],
            returns=Parameter(int, "1 if successful"))
def DeleteSliceFromNodesWhitelist(call: Call, auth: dict, slice_id_or_name: int | str,
                                  node_id_or_hostname_list: list) -> int:
    """Deletes the specified slice from the whitelist of the specified nodes."""
    s = call.one(Slice, slice_id_or_name, ["slice_id"], what="slice")
    for node in _nodes(call, node_id_or_hostname_list):
        call.delete("node_slice_whitelist", {"node_id": node["node_id"],
                                             "slice_id": s["slice_id"]})
    return 1


def _membership(call: Call, person_id_or_email: int | str, slice_id_or_name: int | str,
                add: bool) -> int:
    person = local_person(call, person_id_or_email)
    s = call.one(Slice, slice_id_or_name, ["slice_id", "site_id", "peer_id", "person_ids"],
                 what="slice")
    if s["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local slice")
    if not call.is_admin and s["site_id"] not in call.caller_site_ids():
        raise PLCPermissionDenied("Specified slice not associated with any of your sites")
    pid, sid = person["person_id"], s["slice_id"]
    if add and pid not in s["person_ids"]:
        call.insert("slice_person", {"slice_id": sid, "person_id": pid})
    elif not add:
        call.delete("slice_person", {"slice_id": sid, "person_id": pid})
    return 1


@api_method(roles=["admin", "pi"], accepts=[Auth(), id_or_name(Person), id_or_name(Slice)],
            returns=Parameter(int, "1 if successful"))
def AddPersonToSlice(call: Call, auth: dict, person_id_or_email: int | str,
                     slice_id_or_name: int | str) -> int:
    """Adds the specified person to the specified slice. Non-admins may only add
    persons to slices of their sites. Adding a member twice is not an error."""
    return _membership(call, person_id_or_email, slice_id_or_name, True)


@api_method(roles=["admin", "pi"], accepts=[Auth(), id_or_name(Person), id_or_name(Slice)],
            returns=Parameter(int, "1 if successful"))
def DeletePersonFromSlice(call: Call, auth: dict, person_id_or_email: int | str,
                          slice_id_or_name: int | str) -> int:
    """Deletes the specified person from the specified slice. If the person is not a
    member of the slice, no errors are returned."""
    return _membership(call, person_id_or_email, slice_id_or_name, False)
