"""Slice queries outside the CORE set (spec 6.1 Slices): GetSliceKeys, ResolveSlices,
RetrieveSlicePersonKeys, RetrieveSliceSliverKeys, GetSliceTicket; and GetPeers, GetPeerName for a PLC
without peers (GetEvents and GetEventObjects are the core's)."""

from __future__ import annotations

import subprocess
import xmlrpc.client
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCAPIError, PLCInvalidArgument
from plc.filters import FilterParam, ReturnFields
from plc.methods._util import id_or_name
from plc.methods._xtra import xmethod
from plc.methods.slivers import MAX_EXPIRES, merge_attributes
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


# -- slice tickets (spec 8) ---------------------------------------------------------------------
TICKET_GNUPG = "ticket-gnupg"  # GnuPG home holding PLC's signing key, next to the database
GPG_TIMEOUT = 30


def ticket_gnupg_home(call: Call) -> Path:
    """Where the ticket signing key lives: ``<database directory>/ticket-gnupg``."""
    return Path(call.config.get("db", "path")).resolve().parent / TICKET_GNUPG


def _gpg(home: Path, args: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--yes", "--quiet",
                               *args], input=data, capture_output=True, timeout=GPG_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PLCAPIError(f"ticket signing failed: gpg: {exc}") from None


def slice_ticket_data(call: Call, sl: dict[str, Any]) -> dict[str, Any]:
    """The GetSlivers-shaped content of a ticket: one sliver, slice-wide attributes."""
    keys = [{"key_type": r["key_type"], "key": r["key"]} for r in call.conn.query(
        "SELECT k.key_type, k.key FROM slice_person sp "
        "JOIN persons p ON p.person_id = sp.person_id "
        "JOIN person_key pk ON pk.person_id = p.person_id JOIN keys k ON k.key_id = pk.key_id "
        "WHERE sp.slice_id = ? AND p.enabled = 1 AND p.deleted = 0 AND k.is_blacklisted = 0 "
        "ORDER BY p.person_id, k.key_id", [sl["slice_id"]])]
    stags = call.conn.query(
        "SELECT tt.tagname, t.value, t.node_id, t.nodegroup_id FROM slice_tag t "
        "JOIN tag_types tt ON tt.tag_type_id = t.tag_type_id WHERE t.slice_id = ? "
        "AND t.node_id IS NULL AND t.nodegroup_id IS NULL ORDER BY t.slice_tag_id",
        [sl["slice_id"]])
    attributes = merge_attributes(stags, -1, set())
    wide: dict[str, str] = {}
    for t in stags:
        wide.setdefault(t["tagname"], t["value"])
    cfg = call.config
    family = "-".join([wide.get("vref") or wide.get("pldistro") or cfg.flavour_slice_pldistro,
                       wide.get("fcdistro") or cfg.flavour_slice_fcdistro,
                       wide.get("arch") or cfg.flavour_slice_arch])
    initscripts = call.conn.query("SELECT initscript_id, name, enabled, script FROM initscripts "
                                  "WHERE enabled = 1 ORDER BY initscript_id")
    for i in initscripts:
        i["enabled"] = bool(i["enabled"])
    return {"timestamp": call.now, "initscripts": initscripts, "slivers": [{
        "name": sl["name"], "slice_id": sl["slice_id"], "instantiation": sl["instantiation"],
        "expires": min(sl["expires"], MAX_EXPIRES), "keys": keys, "attributes": attributes,
        "GetSliceFamily": family}]}


@xmethod(roles=["admin", "pi", "user", "peer"], accepts=[Auth(), id_or_name(Slice)],
         returns=Parameter(str, "Signed slice ticket"))
def GetSliceTicket(call: Call, auth: dict, slice_id_or_name: int | str) -> str:
    """Returns a ticket for a slice: its sliver description (as GetSlivers gives it,
    with slice-wide attributes only) serialized as an XML-RPC methodResponse and signed
    (ASCII-armoured, attached) with PLC's GnuPG key, which a node manager redeems
    without asking PLC. The key is the secret key in ``ticket-gnupg`` next to the
    database; without it the call fails with fault 111."""
    sl = call.one(Slice, slice_id_or_name,
                  ["slice_id", "name", "instantiation", "expires", "peer_id"], what="slice")
    if sl["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local slice (only its authoritative peer issues "
                                 "tickets)")
    home = ticket_gnupg_home(call)
    if not home.is_dir():
        raise PLCAPIError(f"ticket signing key missing: no GnuPG home {home}")
    ticket = xmlrpc.client.dumps((slice_ticket_data(call, sl),), methodresponse=True,
                                 allow_none=True).encode()
    signed = _gpg(home, ["--armor", "--sign"], ticket)
    if signed.returncode != 0:
        reason = signed.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise PLCAPIError(f"ticket signing key missing or unusable in {home}: {reason[0]}")
    check = _gpg(home, ["--verify"], signed.stdout)
    if check.returncode != 0:
        raise PLCAPIError("ticket signature does not verify")
    return signed.stdout.decode()
