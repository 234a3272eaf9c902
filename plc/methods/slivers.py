"""GetSlivers: everything a node needs to run its slivers (spec section 7)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCInvalidArgument
from plc.method import api_method
from plc.methods._util import id_or_name
from plc.model import ConfFile, InitScript, Interface, Node
from plc.params import Parameter

if TYPE_CHECKING:
    from plc.api import Call

MAX_EXPIRES = 2**31 - 1
DAY = 24 * 3600
_FAMILY_TAGS = ("vref", "pldistro", "fcdistro", "arch")


def _in(ids: list[int]) -> tuple[str, str]:
    """An IN over a list of ids passed as one JSON parameter (no parameter-count limit)."""
    return "IN (SELECT CAST(value AS BIGINT) FROM json_each(?))", json.dumps(ids)


def slivers_of(call: Call, node_id: int) -> list[dict[str, Any]]:
    """The sliver entries of the node, attributes merged by precedence (spec 7)."""
    slices = call.conn.rows(
        # one IN over a UNION (not three ORed conditions): each part uses its index, so
        # the cost follows the node's slices, not every slice of the PLC (an OR made
        # both stores filter the whole slices table on every poll)
        "SELECT slice_id, name, instantiation, expires FROM slices s WHERE s.slice_id IN ("
        "SELECT slice_id FROM slice_node WHERE node_id = ? "
        "UNION SELECT slice_id FROM slices WHERE instantiation IN ('nm-controller', 'delegated') "
        "UNION SELECT t.slice_id FROM slice_tag t JOIN tag_types tt ON tt.tag_type_id = "
        "t.tag_type_id WHERE tt.tagname = 'system' AND t.value = '1') "
        "AND s.deleted = 0 AND s.expires > ? ORDER BY s.slice_id",
        [node_id, call.now])
    if not slices:
        return []
    in_sql, ids = _in([s[0] for s in slices])
    keys: dict[int, list[dict[str, str]]] = {}
    for slice_id, key_type, key in call.conn.rows(
            "SELECT sp.slice_id, k.key_type, k.key FROM slice_person sp "
            "JOIN persons p ON p.person_id = sp.person_id "
            "JOIN person_key pk ON pk.person_id = p.person_id "
            "JOIN keys k ON k.key_id = pk.key_id "
            f"WHERE sp.slice_id {in_sql} AND p.enabled = 1 AND p.deleted = 0 "
            "AND k.is_blacklisted = 0 ORDER BY sp.slice_id, p.person_id, k.key_id", [ids]):
        keys.setdefault(slice_id, []).append({"key_type": key_type, "key": key})
    groups = {r[0] for r in call.conn.rows(
        "SELECT g.nodegroup_id FROM nodegroups g JOIN node_tag t ON t.tag_type_id = "
        "g.tag_type_id AND t.value = g.value WHERE t.node_id = ?", [node_id])}
    # (slice_id, tagname, value, node_id, nodegroup_id) per slice, in slice_tag_id order
    tags: dict[int, list[tuple[Any, ...]]] = {}
    for r in call.conn.rows(
            "SELECT t.slice_id, tt.tagname, t.value, t.node_id, t.nodegroup_id FROM slice_tag t "
            "JOIN tag_types tt ON tt.tag_type_id = t.tag_type_id "
            f"WHERE t.slice_id {in_sql} AND (t.node_id IS NULL OR t.node_id = ?) "
            "ORDER BY t.slice_id, t.slice_tag_id", [ids, node_id]):
        tags.setdefault(r[0], []).append(r)
    cfg = call.config
    default_family = (cfg.flavour_slice_pldistro, cfg.flavour_slice_fcdistro,
                      cfg.flavour_slice_arch)
    out = []
    for slice_id, name, instantiation, expires in slices:
        stags = tags.get(slice_id, [])
        wide: dict[str, str] = {}
        if all(t[3] is None and t[4] is None for t in stags):
            # only slice-wide tags: merge_attributes would keep them all, in order
            attributes = [{"tagname": t[1], "value": t[2]} for t in stags]
            for t in stags:
                wide.setdefault(t[1], t[2])
        else:
            rows = [{"tagname": t[1], "value": t[2], "node_id": t[3], "nodegroup_id": t[4]}
                    for t in stags]
            attributes = merge_attributes(rows, node_id, groups)
            for t in stags:
                if t[3] is None and t[4] is None:
                    wide.setdefault(t[1], t[2])
        family = "-".join([
            wide.get("vref") or wide.get("pldistro") or default_family[0],
            wide.get("fcdistro") or default_family[1],
            wide.get("arch") or default_family[2]])
        out.append({"name": name, "slice_id": slice_id,
                    "instantiation": instantiation,
                    "expires": min(expires, MAX_EXPIRES),
                    "keys": keys.get(slice_id, []),
                    "attributes": attributes, "GetSliceFamily": family})
    return out


def merge_attributes(stags: list[dict[str, Any]], node_id: int,
                     groups: set[int]) -> list[dict[str, Any]]:
    """sliver > nodegroup (first per tagname) > slice-wide (all values), spec 7."""
    sliver = [t for t in stags if t["node_id"] == node_id]
    seen = {t["tagname"] for t in sliver}
    attrs = [{"tagname": t["tagname"], "value": t["value"]} for t in sliver]
    by_group: list[dict[str, Any]] = []
    for t in stags:
        if t["node_id"] is None and t["nodegroup_id"] in groups and t["tagname"] not in seen \
                and t["tagname"] not in {g["tagname"] for g in by_group}:
            by_group.append(t)
    attrs += [{"tagname": t["tagname"], "value": t["value"]} for t in by_group]
    seen |= {t["tagname"] for t in by_group}
    attrs += [{"tagname": t["tagname"], "value": t["value"]} for t in stags
              if t["node_id"] is None and t["nodegroup_id"] is None and t["tagname"] not in seen]
    return attrs


def _conf_files(call: Call, node_id: int, groups: list[int]) -> list[dict[str, Any]]:
    files = call.get(ConfFile, {"enabled": True})
    merged: dict[str, dict[str, Any]] = {}
    for f in files:  # global files first
        if not f["node_ids"] and not f["nodegroup_ids"]:
            merged[f["dest"]] = f
    for f in files:
        if set(f["nodegroup_ids"]) & set(groups):
            merged[f["dest"]] = f
    for f in files:
        if node_id in f["node_ids"]:
            merged[f["dest"]] = f
    return list(merged.values())


def _accounts(call: Call, site_id: int) -> list[dict[str, Any]]:
    site_people = call.conn.query(
        "SELECT DISTINCT p.person_id, (SELECT t.value FROM person_tag t JOIN tag_types tt ON "
        "tt.tag_type_id = t.tag_type_id WHERE t.person_id = p.person_id AND "
        "tt.tagname = 'isrootonsite' ORDER BY t.person_tag_id LIMIT 1) AS isroot "
        "FROM persons p JOIN person_site ps ON ps.person_id = p.person_id "
        "JOIN person_role pr ON pr.person_id = p.person_id "
        "WHERE ps.site_id = ? AND p.enabled = 1 AND p.deleted = 0 AND pr.role_id IN (20, 40) "
        "ORDER BY p.person_id", [site_id])
    admins = [r["person_id"] for r in call.conn.query(
        "SELECT DISTINCT p.person_id FROM persons p JOIN person_role pr ON "
        "pr.person_id = p.person_id WHERE pr.role_id = 10 AND p.enabled = 1 AND p.deleted = 0 "
        "AND p.peer_id IS NULL ORDER BY p.person_id")]

    def ssh_keys(person_ids: list[int]) -> list[str]:
        if not person_ids:
            return []
        in_sql, ids = _in(person_ids)
        return [r["key"] for r in call.conn.query(
            "SELECT k.key FROM person_key pk JOIN keys k ON k.key_id = pk.key_id "
            f"WHERE pk.person_id {in_sql} AND k.key_type = 'ssh' AND k.is_blacklisted = 0 "
            "ORDER BY pk.person_id, k.key_id", [ids])]

    site_admin = [r["person_id"] for r in site_people]
    root = admins + [r["person_id"] for r in site_people
                     if r["isroot"] == "true" and r["person_id"] not in admins]
    return [{"name": "site_admin", "keys": ssh_keys(site_admin)},
            {"name": "root", "keys": ssh_keys(root)}]


@api_method(roles=["admin", "node"],
            accepts=[Auth(), Parameter(id_or_name(Node), "Node id or hostname", nullok=True)],
            returns=Parameter(dict, "the node's slivers and configuration"), writes=True,
            # its one write (the node's last_contact) depends on nothing it reads: READ
            # COMMITTED, so 167 polls/s take no predicate locks and never abort (or make
            # abort) another front end's serialisable transaction
            serializable=False)
def GetSlivers(call: Call, auth: dict, node_id_or_hostname: int | str | None = None) -> dict:
    """Returns a struct containing information about the specified node (or calling
    node, if called by a node and node_id_or_hostname is not specified), including the
    current set of slivers bound to the node: system slices, nm-controller and
    delegated slices, and the slices on the node, with merged attributes."""
    if node_id_or_hostname is None:
        if call.caller_kind != "node":
            raise PLCInvalidArgument("'node_id_or_hostname' not specified")
        node_id_or_hostname = call.caller_id
    key = node_id_or_hostname.lower() if isinstance(node_id_or_hostname, str) else \
        node_id_or_hostname
    node = call.one(Node, key, ["node_id", "hostname", "site_id", "peer_id", "node_type",
                                "interface_ids", "nodegroup_ids", "hrn"], what="node")
    if node["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local node")
    nid = node["node_id"]
    call.update("nodes", {"node_id": nid}, {"last_contact": call.now})
    groups = node["nodegroup_ids"]
    groupnames = [r["groupname"] for r in call.conn.query(
        f"SELECT groupname FROM nodegroups WHERE nodegroup_id {_in(groups)[0]} "
        "ORDER BY nodegroup_id", [_in(groups)[1]])] if groups else []
    reservable = node["node_type"] == "reservable"
    leases = None
    if reservable:
        leases = call.conn.query(
            "SELECT l.slice_id, l.t_from, l.t_until, s.name FROM leases l JOIN slices s ON "
            "s.slice_id = l.slice_id WHERE l.node_id = ? AND l.t_until >= ? AND l.t_from <= ? "
            "ORDER BY l.t_from", [nid, call.now, call.now + DAY])
    cfg = call.config
    return {
        "timestamp": call.now,
        "node_id": nid,
        "hostname": node["hostname"],
        "interfaces": call.get(Interface, {"node_id": nid}),
        "groups": groupnames,
        "conf_files": _conf_files(call, nid, groups),
        "initscripts": call.get(InitScript, {"enabled": True},
                                ["initscript_id", "name", "enabled", "script"]),
        "slivers": slivers_of(call, nid),
        "accounts": _accounts(call, node["site_id"]),
        "xmpp": {"server": cfg.omf_xmpp_server if cfg.omf_enabled else None},
        "hrn": node["hrn"],
        "reservation_policy": "lease_or_idle" if reservable else "none",
        "leases": leases,
        "lease_granularity": cfg.reservation_granularity,
    }
