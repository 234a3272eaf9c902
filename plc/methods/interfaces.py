"""Interfaces of nodes (spec 5.5, 6.3)."""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCInvalidArgument
from plc.filters import FilterParam, ReturnFields
from plc.method import ALL_ROLES, api_method
from plc.methods._tags import set_tag, tag_type
from plc.methods._util import accepted, id_or_name, struct_of
from plc.methods.nodes import check_lookup, node_for_update, valid_hostname
from plc.methods.tags import may_write
from plc.model import Interface, Node
from plc.params import Parameter

if TYPE_CHECKING:
    from plc.api import Call

KEYS = ("is_primary", "type", "method", "ip", "mac", "gateway", "network", "broadcast",
        "netmask", "dns1", "dns2", "bwlimit", "hostname")
IP_KEYS = ("ip", "gateway", "network", "broadcast", "netmask", "dns1", "dns2")
MAC = re.compile(r"^[0-9a-f]{1,2}([:-][0-9a-f]{1,2}){5,}\Z", re.IGNORECASE)


def _ip(value: str, key: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise PLCInvalidArgument(f"Invalid IP address {value!r}", key) from None


def validate_interface(call: Call, row: dict[str, Any], interface_id: int | None) -> None:
    """Check a complete interface row (spec 5.5 rules); normalises mac in place."""
    for k in ("type", "method"):
        if not row.get(k):
            raise PLCInvalidArgument(f"Interface {k} must be specified")
    check_lookup(call, "network_types", row["type"], "type")
    check_lookup(call, "network_methods", row["method"], "method")
    for k in IP_KEYS:
        if row.get(k):
            _ip(row[k], k)
    if row.get("mac"):
        if not MAC.match(row["mac"]):
            raise PLCInvalidArgument(f"Invalid MAC address {row['mac']!r}", "mac")
        row["mac"] = ":".join(f"{int(o, 16):02x}" for o in re.split("[:-]", row["mac"]))
    if row.get("bwlimit") and row["bwlimit"] < 500000:
        raise PLCInvalidArgument("Minimum bw is 500 kbs", "bwlimit")
    if row.get("hostname") and not valid_hostname(row["hostname"].lower()):
        raise PLCInvalidArgument("Invalid hostname", "hostname")
    method, v6 = row["method"], bool(row.get("ip")) and ":" in row["ip"]
    if method == "static":
        required: tuple[str, ...] = ("ip", "gateway") if v6 else \
            ("ip", "network", "broadcast", "netmask")
        if row.get("is_primary") and not v6:
            required += ("gateway", "dns1")
        for k in required:
            if not row.get(k):
                raise PLCInvalidArgument(f"{k} is required for a static interface", k)
        if not v6:
            try:
                net = ipaddress.ip_network(f"{row['network']}/{row['netmask']}")
            except ValueError:
                raise PLCInvalidArgument("network and netmask are inconsistent",
                                         "network") from None
            for k in ("ip", "broadcast"):
                if _ip(row[k], k) not in net:
                    raise PLCInvalidArgument(f"{k} is not in the network", k)
            if row.get("gateway") and _ip(row["gateway"], "gateway") not in net:
                raise PLCInvalidArgument("gateway is not reachable", "gateway")
    elif method in ("proxy", "tap", "ipmi"):
        if not row.get("ip"):
            raise PLCInvalidArgument(f"ip is required for method {method}", "ip")
        if method in ("proxy", "tap") and row.get("mac"):
            raise PLCInvalidArgument(f"mac is not allowed for method {method}", "mac")
        if method == "tap" and not row.get("gateway"):
            raise PLCInvalidArgument("gateway is required for method tap", "gateway")
    if row.get("is_primary"):
        others = call.conn.query("SELECT interface_id FROM interfaces WHERE node_id = ? AND "
                                 "is_primary = 1", [row["node_id"]])
        if any(r["interface_id"] != interface_id for r in others):
            raise PLCInvalidArgument("Node already has a primary interface", "is_primary")


@api_method(roles=ALL_ROLES + ["anonymous"],
            accepts=[Auth(), FilterParam(Interface, scalars=True), ReturnFields()],
            returns=Parameter([dict], "List of interfaces"))
def GetInterfaces(call: Call, auth: dict, interface_filter: Any = None,
                  return_fields: list | None = None) -> list:
    """Returns an array of structs containing details about network interfaces. If
    interface_filter is specified and is an array of interface identifiers or IPs, or
    a struct of interface attributes, only matching interfaces are returned."""
    return call.get(Interface, interface_filter, return_fields)


def _set_tags(call: Call, interface_id: int, tags: dict[str, Any]) -> None:
    for name, value in tags.items():
        may_write(call, "Interface", interface_id, tag_type(call, name)["tag_type_id"])
        set_tag(call, "Interface", interface_id, name, value)


@api_method(roles=["admin", "pi", "tech"],
            accepts=[Auth(), id_or_name(Node), struct_of(Interface, KEYS, tags=True)],
            returns=Parameter(int, "New interface_id (> 0) if successful"))
def AddInterface(call: Call, auth: dict, node_id_or_hostname: int | str,
                 interface_fields: dict) -> int:
    """Adds a new network interface to the specified node. The first interface of a
    node becomes its primary one. PIs and techs may only add interfaces to nodes at
    their sites."""
    native, tags = accepted(Interface, interface_fields, KEYS, reject=True, tags=True,
                            what="add")
    node = node_for_update(call, node_id_or_hostname, ["interface_ids"])
    row = {**native, "node_id": node["node_id"]}
    if not node["interface_ids"]:
        row["is_primary"] = True
    validate_interface(call, row, None)
    row["is_primary"] = int(bool(row.get("is_primary")))
    interface_id = call.insert("interfaces", {**row, "last_updated": call.now})
    _set_tags(call, interface_id, tags)
    call.log(f"Interface {interface_id} added to node {node['node_id']}",
             Node=node["node_id"], Interface=interface_id)
    return interface_id


def interface_for_update(call: Call, interface_id: int) -> dict[str, Any]:
    iface = call.one(Interface, interface_id, list(Interface.fields), what="interface")
    node_for_update(call, iface["node_id"])
    return iface


@api_method(roles=["admin", "pi", "tech"],
            accepts=[Auth(), Interface.fields["interface_id"].param,
                     struct_of(Interface, KEYS, tags=True)],
            returns=Parameter(int, "1 if successful"))
def UpdateInterface(call: Call, auth: dict, interface_id: int, interface_fields: dict) -> int:
    """Updates an existing interface network. Any values specified in interface_fields
    are used, otherwise defaults are used; the whole row is validated again."""
    iface = interface_for_update(call, interface_id)
    native, tags = accepted(Interface, interface_fields, KEYS, reject=True, tags=True,
                            what="update")
    row = {k: iface[k] for k in KEYS}
    row.update(native)
    row["node_id"] = iface["node_id"]
    validate_interface(call, row, interface_id)
    changes = {k: row[k] for k in native}
    if "is_primary" in changes:
        changes["is_primary"] = int(bool(changes["is_primary"]))
    if "mac" in changes:
        changes["mac"] = row["mac"]
    call.update("interfaces", {"interface_id": interface_id},
                {**changes, "last_updated": call.now})
    _set_tags(call, interface_id, tags)
    call.log(f"Interface {interface_id} updated", Interface=interface_id)
    return 1


@api_method(roles=["admin", "pi", "tech"], accepts=[Auth(), Interface.fields["interface_id"].param],
            returns=Parameter(int, "1 if successful"))
def DeleteInterface(call: Call, auth: dict, interface_id: int) -> int:
    """Deletes an existing interface, with its tags and ilinks."""
    interface_for_update(call, interface_id)
    call.delete("interface_tag", {"interface_id": interface_id})
    call.delete("ilinks", {"src_interface_id": interface_id})
    call.delete("ilinks", {"dst_interface_id": interface_id})
    call.delete("interfaces", {"interface_id": interface_id})
    call.log(f"Interface {interface_id} deleted", Interface=interface_id)
    return 1
