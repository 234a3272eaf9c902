"""Slice tickets (spec 8), signed with Ed25519 instead of GnuPG (docs/tickets.md):
GetSliceTicket, and GetTicketKey, the public key nodes verify tickets with."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from plc import tickets
from plc.auth import Auth
from plc.faults import PLCAPIError, PLCInvalidArgument, PLCPermissionDenied
from plc.methods._util import id_or_name
from plc.methods._xtra import xmethod
from plc.methods.slivers import MAX_EXPIRES, merge_attributes, slivers_of
from plc.model import Node, Slice
from plc.params import Parameter

if TYPE_CHECKING:
    from plc.api import Call

log = logging.getLogger("plc.tickets")


def _signing_key(call: Call) -> Any:
    """PLC's key; fault 111 without it (the file's path goes to the log only: callers,
    anonymous ones included, learn nothing of the server's files)."""
    try:
        return tickets.load_key(tickets.key_path(call.config))
    except tickets.TicketKeyError as exc:
        log.error("%s", exc)
        raise PLCAPIError("ticket signing key missing or unusable on this PLC (its operator "
                          "runs `plc ticket-key --create`; the log names the file)") from None


def _slice_wide_entry(call: Call, sl: dict[str, Any]) -> dict[str, Any]:
    """The slice's GetSlivers entry computed without a node: slice-wide tags only."""
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
    wide: dict[str, str] = {}
    for t in stags:
        wide.setdefault(t["tagname"], t["value"])
    cfg = call.config
    family = "-".join([wide.get("vref") or wide.get("pldistro") or cfg.flavour_slice_pldistro,
                       wide.get("fcdistro") or cfg.flavour_slice_fcdistro,
                       wide.get("arch") or cfg.flavour_slice_arch])
    return {"name": sl["name"], "slice_id": sl["slice_id"],
            "instantiation": sl["instantiation"], "expires": min(sl["expires"], MAX_EXPIRES),
            "keys": keys, "attributes": merge_attributes(stags, -1, set()),
            "GetSliceFamily": family}


def _may_have_ticket(call: Call, sl: dict[str, Any]) -> None:
    """What PLCAPI's docstring promised and its code never checked: users get tickets
    of the slices they are members of, PIs of their sites' slices, admins of any."""
    if call.caller_kind != "person" or call.is_admin:
        return
    if call.has_role("pi") and sl["site_id"] in call.caller_site_ids():
        return
    if call.person_id in sl["person_ids"]:
        return
    raise PLCPermissionDenied(f"Not a member of slice {sl['name']} (and not a PI of its "
                              "site): no ticket")


@xmethod(roles=["admin", "pi", "user", "peer"],
         accepts=[Auth(), id_or_name(Slice),
                  Parameter(id_or_name(Node), "Node id or hostname (optional)", nullok=True)],
         returns=Parameter(str, "Signed slice ticket (PLTICKET1.<payload>.<signature>)"))
def GetSliceTicket(call: Call, auth: dict, slice_id_or_name: int | str,
                   node_id_or_hostname: int | str | None = None) -> str:
    """Returns a ticket for a slice, which a node agent redeems (its local API's Ticket)
    without asking PLC: the slice's sliver description as GetSlivers gives it, the
    nodes it may be redeemed on, when it was issued and when it expires, and a random
    nonce, signed with PLC's Ed25519 ticket key. Without a node, the ticket names every
    node of the slice and carries slice-wide attributes; with one, only that node (one
    of the slice's) and the attributes GetSlivers gives that node. Users may obtain
    tickets of their slices, PIs of their sites' slices."""
    sl = call.one(Slice, slice_id_or_name, ["slice_id", "name", "instantiation", "expires",
                                            "peer_id", "site_id", "person_ids", "node_ids"],
                  what="slice")
    if sl["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local slice (only its authoritative peer issues "
                                 "tickets)")
    _may_have_ticket(call, sl)
    if node_id_or_hostname is None:
        node_ids = list(sl["node_ids"])
        entry = _slice_wide_entry(call, sl)
    else:
        key = node_id_or_hostname.lower() if isinstance(node_id_or_hostname, str) else \
            node_id_or_hostname
        node = call.one(Node, key, ["node_id"], what="node")
        if node["node_id"] not in sl["node_ids"]:
            raise PLCInvalidArgument(f"Node {node_id_or_hostname!r} is not a node of slice "
                                     f"{sl['name']} (AddSliceToNodes first)")
        node_ids = [node["node_id"]]
        found = [e for e in slivers_of(call, node["node_id"]) if e["slice_id"] == sl["slice_id"]]
        if not found:
            raise PLCInvalidArgument(f"Slice {sl['name']} has expired")
        entry = found[0]
    if not node_ids:
        raise PLCInvalidArgument(f"Slice {sl['name']} has no nodes: a ticket names the nodes "
                                 "it may be redeemed on (AddSliceToNodes first)")
    nodes = [{"node_id": n["node_id"], "hostname": n["hostname"]}
             for n in call.get(Node, node_ids, ["node_id", "hostname"])]
    signer = _signing_key(call)
    issued = int(call.now)
    expiry = min(issued + int(call.config.tickets_lifetime), int(sl["expires"]), MAX_EXPIRES)
    initscripts = call.conn.query("SELECT initscript_id, name, enabled, script FROM initscripts "
                                  "WHERE enabled = 1 ORDER BY initscript_id")
    for i in initscripts:
        i["enabled"] = bool(i["enabled"])
    content = {
        "version": 1, "key_id": tickets.key_id(tickets.public_raw(signer)),
        "issued": issued, "expiry": expiry, "nonce": os.urandom(16).hex(),
        "slice": sl["name"], "slice_id": sl["slice_id"], "nodes": nodes,
        # GetSlivers-shaped, as the original ticket was (spec 8):
        "timestamp": issued, "initscripts": initscripts, "slivers": [entry],
    }
    return tickets.sign(signer, content)


@xmethod(roles=["admin", "pi", "user", "tech", "node", "anonymous"], accepts=[Auth()],
         returns=Parameter(dict, "{algorithm, public_key (base64), key_id}"))
def GetTicketKey(call: Call, auth: dict) -> dict:
    """Returns the public key slice tickets are signed with: {algorithm: 'ed25519',
    public_key: base64 of its 32 bytes, key_id}. A node agent pins it on first use
    (or takes it from its agent.toml plc_ticket_key)."""
    signer = _signing_key(call)
    raw = tickets.public_raw(signer)
    return {"algorithm": "ed25519", "public_key": tickets.public_b64(signer),
            "key_id": tickets.key_id(raw)}
