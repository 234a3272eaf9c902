"""Slice queries outside the CORE set (spec 6.1 Slices): GetSliceKeys, ResolveSlices,
RetrieveSlicePersonKeys, RetrieveSliceSliverKeys; and GetPeers, GetPeerName for a PLC
without peers (GetEvents and GetEventObjects are the core's). GetSliceTicket is x_tickets.py's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCInvalidArgument
from plc.filters import FilterParam, ReturnFields
from plc.methods._util import id_or_name
from plc.methods._xtra import xmethod
from plc.model import Node, Peer, Person, Slice
from plc.params import Parameter

if TYPE_CHECKING:
    from plc.api import Call

SLICE_KEY_FIELDS = ("slice_id", "name", "person_id", "email", "key")


def _marks(values: list[Any]) -> str:
    return ", ".join("?" * len(values)) or "NULL"


@xmethod(roles=["admin", "pi", "user", "node"],
         accepts=[Auth(), FilterParam(Slice), ReturnFields()],
         returns=Parameter([dict], "List of {slice_id, name, person_id, email, key}"))
def GetSliceKeys(call: Call, auth: dict, slice_filter: Any = None,
                 return_fields: list | None = None) -> list:
    """Returns one struct per (slice, member, key) for the slices matching the filter:
    slice_id, name, person_id, email and key. Non-admin persons see the slices they are
    members of, and PIs also every slice of their sites."""
    fields = list(SLICE_KEY_FIELDS) if return_fields is None else list(return_fields)
    bad = [f for f in fields if f not in SLICE_KEY_FIELDS]
    if bad or not fields:
        raise PLCInvalidArgument(f"unknown column(s) specified {bad} in SliceKey")
    where, params = "", []
    if call.caller_kind == "person" and not call.is_admin:
        mine = [r["slice_id"] for r in call.conn.query(
            "SELECT slice_id FROM slice_person WHERE person_id = ?", [call.person_id])]
        sites = call.caller_site_ids() if call.has_role("pi") else []
        where = f"(o.slice_id IN ({_marks(mine)}) OR o.site_id IN ({_marks(sites)}))"
        params = [*mine, *sites]
    slices = call.get(Slice, slice_filter, ["slice_id", "name"], where=where, params=params)
    if not slices:
        return []
    by_id = {s["slice_id"]: s["name"] for s in slices}
    ids = list(by_id)
    rows = call.conn.query(
        "SELECT sp.slice_id, p.person_id, p.email, k.key FROM slice_person sp "
        "JOIN persons p ON p.person_id = sp.person_id AND p.deleted = 0 "
        "JOIN person_key pk ON pk.person_id = p.person_id "
        "JOIN keys k ON k.key_id = pk.key_id AND k.is_blacklisted = 0 "
        f"WHERE sp.slice_id IN ({_marks(ids)}) ORDER BY sp.slice_id, p.person_id, k.key_id",
        ids)
    out = []
    for r in rows:
        full = {"slice_id": r["slice_id"], "name": by_id[r["slice_id"]],
                "person_id": r["person_id"], "email": r["email"], "key": r["key"]}
        out.append({f: full[f] for f in fields})
    return out


@xmethod(roles=["admin", "pi", "user", "tech", "anonymous"],
         accepts=[Auth(), FilterParam(Slice, scalars=True)],
         returns=Parameter([dict], "List of {slice_id, name, expires}"))
def ResolveSlices(call: Call, auth: dict, slice_filter: Any = None) -> list:
    """Returns slice_id, name and expires of the matching slices, expired ones included
    (the only call that shows them); deleted slices are not returned."""
    return call.get(Slice, slice_filter, ["slice_id", "name", "expires"],
                    where="o.deleted = 0", live=False)


@xmethod(roles=["admin", "pi", "user", "tech", "anonymous"],
         accepts=[Auth(), id_or_name(Slice), FilterParam(Person)],
         returns=Parameter(dict, "{email: [ssh keys]} of the slice's members"))
def RetrieveSlicePersonKeys(call: Call, auth: dict, slice_id_or_name: int | str,
                            person_filter: Any = None) -> dict:
    """Returns, for each member of the slice matching the person filter, its e-mail
    address mapped to the list of its (non-blacklisted) keys."""
    sl = call.one(Slice, slice_id_or_name, ["slice_id", "person_ids"], what="slice")
    members = sl["person_ids"]
    persons = call.get(Person, person_filter, ["person_id", "email"],
                       where=f"o.person_id IN ({_marks(members)})", params=members)
    out: dict[str, list[str]] = {}
    for p in persons:
        out[p["email"]] = [r["key"] for r in call.conn.query(
            "SELECT k.key FROM person_key pk JOIN keys k ON k.key_id = pk.key_id "
            "WHERE pk.person_id = ? AND k.is_blacklisted = 0 ORDER BY k.key_id",
            [p["person_id"]])]
    return out


@xmethod(roles=["admin", "pi", "user", "tech", "anonymous"],
         accepts=[Auth(), id_or_name(Slice), FilterParam(Node)],
         returns=Parameter(dict, "{hostname: sliver ssh key}"))
def RetrieveSliceSliverKeys(call: Call, auth: dict, slice_id_or_name: int | str,
                            node_filter: Any = None) -> dict:
    """Returns, for each node of the slice matching the node filter that has one, its
    hostname mapped to the sliver's ssh key (the node-scoped ``ssh_key`` slice tag the
    node agent publishes)."""
    sl = call.one(Slice, slice_id_or_name, ["slice_id", "node_ids"], what="slice")
    node_ids = sl["node_ids"]
    nodes = call.get(Node, node_filter, ["node_id", "hostname"],
                     where=f"o.node_id IN ({_marks(node_ids)})", params=node_ids)
    out: dict[str, str] = {}
    for n in nodes:
        key = call.conn.scalar(
            "SELECT t.value FROM slice_tag t JOIN tag_types tt ON tt.tag_type_id = "
            "t.tag_type_id WHERE t.slice_id = ? AND t.node_id = ? AND tt.tagname = 'ssh_key' "
            "ORDER BY t.slice_tag_id LIMIT 1", [sl["slice_id"], n["node_id"]])
        if key:
            out[n["hostname"]] = key
    return out


# -- peers -------------------------------------------------------------------------
@xmethod(roles=["admin", "node", "pi", "user"],
         accepts=[Auth(), FilterParam(Peer), ReturnFields()],
         returns=Parameter([dict], "List of peers"))
def GetPeers(call: Call, auth: dict, peer_filter: Any = None,
             return_fields: list | None = None) -> list:
    """Returns the peers (federated PLCs) matching the filter; non-admins do not get
    their key and cacert. This PLC does not peer, so the list is normally empty."""
    rows = call.get(Peer, peer_filter, return_fields)
    if not call.is_admin:
        for r in rows:
            r.pop("key", None)
            r.pop("cacert", None)
    return rows


@xmethod(roles=["admin", "peer", "node"], accepts=[Auth()],
         returns=Parameter(str, "Peer name (PLC_NAME)"))
def GetPeerName(call: Call, auth: dict) -> str:
    """Returns this PLC's name, as it is known to peers."""
    return str(call.config.get("plc", "name"))
