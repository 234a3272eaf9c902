"""Node management outside the CORE set (spec 6.1 "Node boot/management", Appendix A):
GenerateNodeConfFile, GetBootMedium (configuration forms only; the image forms are out
of scope and answer fault 109), RebootNode, RebootNodeWithPCU, GetWhitelist (the whitelist
itself is written by the core's Add/DeleteSliceToNodesWhitelist)."""

from __future__ import annotations

import re
import socket
from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCInvalidArgument, PLCNotImplemented, PLCPermissionDenied
from plc.filters import FilterParam, ReturnFields
from plc.initdb import new_node_key
from plc.method import ALL_ROLES
from plc.methods._util import id_or_name
from plc.methods._xtra import xmethod
from plc.methods.nodes import caller_slice_ids
from plc.model import Interface, Node
from plc.params import Parameter

if TYPE_CHECKING:
    from plc.api import Call

_ONE = Parameter(int, "1 if successful")
POD_PORT = 64000  # the node's "ping of death" listener (legacy PLC/POD.py)
NODE_SECRETS = ("key", "session", "boot_nonce")
IMAGE_ACTIONS = ("node-iso", "node-usb", "generic-iso", "generic-usb")


def _node(call: Call, node_id_or_hostname: int | str, what: str) -> dict[str, Any]:
    """A local node the caller may manage (admin, or a PI/tech of its site)."""
    node = call.one(Node, node_id_or_hostname,
                    ["node_id", "hostname", "site_id", "peer_id", "interface_ids", "pcu_ids"],
                    what="node")
    if node["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local node")
    if not call.is_admin and node["site_id"] not in call.caller_site_ids():
        raise PLCPermissionDenied(f"Not allowed to {what} that node")
    return dict(node)


def _shell_name(text: str) -> str:
    return re.sub(r"[^A-Z0-9_]", "_", text.upper())


def node_conf_file(call: Call, node: dict[str, Any], regenerate_key: bool) -> str:
    """The plnode.txt a node's boot image carries (NODE_ID, NODE_KEY, network setup)."""
    interfaces = call.get(Interface, {"node_id": node["node_id"]})
    primary = next((i for i in interfaces if i["is_primary"]), None)
    if primary is None:
        raise PLCInvalidArgument("No primary network configured")
    host, _, domain = node["hostname"].partition(".")
    if not domain:
        raise PLCInvalidArgument("Node hostname is invalid")
    key = call.conn.scalar("SELECT key FROM nodes WHERE node_id = ?", [node["node_id"]])
    if regenerate_key or not key:
        key = new_node_key()
        call.update("nodes", {"node_id": node["node_id"]}, {"key": key})
    lines = [f'NODE_ID="{node["node_id"]}"', f'NODE_KEY="{key}"']
    if primary["mac"]:
        lines.append(f'NET_DEVICE="{primary["mac"].lower()}"')
    lines.append(f'IP_METHOD="{primary["method"]}"')
    if primary["method"] == "static":
        for var, col in (("IP_ADDRESS", "ip"), ("IP_GATEWAY", "gateway"),
                         ("IP_NETMASK", "netmask"), ("IP_NETADDR", "network"),
                         ("IP_BROADCASTADDR", "broadcast"), ("IP_DNS1", "dns1"),
                         ("IP_DNS2", "dns2")):
            lines.append(f'{var}="{primary[col] or ""}"')
    lines += [f'HOST_NAME="{host}"', f'DOMAIN_NAME="{domain}"']
    tags = call.conn.query(
        "SELECT tt.tagname, tt.category, t.value FROM interface_tag t JOIN tag_types tt "
        "ON tt.tag_type_id = t.tag_type_id WHERE t.interface_id = ? "
        "ORDER BY tt.category, t.interface_tag_id", [primary["interface_id"]])
    category = None
    for tag in tags:
        if tag["category"] != category:
            category = tag["category"]
            lines.append(f"### Category : {category}")
        lines.append(f'{_shell_name(category or "")}_{_shell_name(tag["tagname"])}='
                     f'"{tag["value"] or ""}"')
    ipmi = next((i for i in interfaces if i["method"] == "ipmi"), None)
    if ipmi is not None:
        lines.append(f'IPMI_ADDRESS="{ipmi["ip"]}"')
        if ipmi["mac"]:
            lines.append(f'IPMI_MAC="{ipmi["mac"].lower()}"')
    return "\n".join(lines) + "\n"


@xmethod(roles=["admin", "pi", "tech"],
         accepts=[Auth(), id_or_name(Node),
                  Parameter(bool, "True to generate a new node key")],
         returns=Parameter(str, "Node configuration file"))
def GenerateNodeConfFile(call: Call, auth: dict, node_id_or_hostname: int | str,
                         regenerate_node_key: bool = True) -> str:
    """Returns the configuration file (plnode.txt) for a node's boot media: node id and
    key, primary interface settings, interface tags. By default a new node key is
    generated (the old one stops working)."""
    node = _node(call, node_id_or_hostname, "generate a configuration file for")
    text = node_conf_file(call, node, bool(regenerate_node_key))
    if regenerate_node_key:
        call.log(f"Node {node['node_id']} configuration file generated, new key",
                 Node=node["node_id"])
    return text


@xmethod(roles=["admin", "pi", "tech"],
         accepts=[Auth(), id_or_name(Node), Parameter(str, "Action mode"),
                  Parameter(str, "Empty string (files on the server are not written)"),
                  Parameter([str], "Options", nullok=True)],
         returns=Parameter(str, "Node configuration file"))
def GetBootMedium(call: Call, auth: dict, node_id_or_hostname: int | str, action: str,
                  filename: str, options: list[str] | None = None) -> str:
    """Configuration forms of the boot medium: ``node-preview`` returns the node's
    configuration file with its current key (made if it has none); ``node-floppy``
    returns it with a newly generated key. Image actions (node-iso, node-usb,
    generic-iso, generic-usb) are not provided by this PLC (fault 109)."""
    if action in IMAGE_ACTIONS:
        raise PLCNotImplemented(f"boot images ({action}) are not built by this PLC")
    if action not in ("node-preview", "node-floppy"):
        raise PLCInvalidArgument(
            f"unknown action {action!r}; allowed: node-preview, node-floppy", "action")
    if filename:
        raise PLCInvalidArgument("writing boot media on the server is not supported; "
                                 "pass an empty filename to get the contents", "filename")
    node = _node(call, node_id_or_hostname, "get boot media for")
    text = node_conf_file(call, node, regenerate_key=action == "node-floppy")
    if action == "node-floppy":
        call.log(f"Node {node['node_id']} boot medium {action}", Node=node["node_id"])
    return text


@xmethod(roles=["admin", "pi", "tech"], accepts=[Auth(), id_or_name(Node)], returns=_ONE)
def RebootNode(call: Call, auth: dict, node_id_or_hostname: int | str) -> int:
    """Sends the node a UDP "ping of death" (its session key, to port 64000 of its
    primary address, or its hostname without one), which makes a booted node reboot at
    once. Returns 1 when the packet was sent, which says nothing about the reboot."""
    node = _node(call, node_id_or_hostname, "reboot")
    session = call.conn.scalar("SELECT session_id FROM node_session WHERE node_id = ?",
                               [node["node_id"]])
    if not session:
        raise PLCInvalidArgument("No session key on record for that node (it has never "
                                 "booted successfully)")
    host = call.conn.scalar("SELECT ip FROM interfaces WHERE node_id = ? AND is_primary = 1 "
                            "AND ip IS NOT NULL", [node["node_id"]]) or node["hostname"]
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                           socket.SOCK_DGRAM) as sock:
            sock.sendto(session.strip().encode(), (host, POD_PORT))
    except OSError:
        pass  # as legacy: an unreachable node is not an API error
    call.log("RebootNode called", Node=node["node_id"])
    return 1


@xmethod(roles=["admin", "pi", "tech"],
         accepts=[Auth(), id_or_name(Node), Parameter(bool, "Test run only", nullok=True)],
         returns=Parameter(int, "1 if successful"))
def RebootNodeWithPCU(call: Call, auth: dict, node_id_or_hostname: int | str,
                      testrun: bool | None = None) -> int:
    """Power-cycles a node through its PCU. The node must have a PCU; PCU control
    (legacy pcucontrol) is not part of this PLC, so a valid request gets fault 109, as
    legacy PLCAPI answered without pcucontrol."""
    node = _node(call, node_id_or_hostname, "reboot")
    if not node["pcu_ids"]:
        raise PLCInvalidArgument("No PCU associated with this node")
    raise PLCNotImplemented("PCU control (pcucontrol) is not available on this PLC")


# -- whitelists ---------------------------------------------------------------------------
@xmethod(roles=[*ALL_ROLES, "anonymous"],
         accepts=[Auth(), FilterParam(Node), ReturnFields()],
         returns=Parameter([dict], "List of nodes with a slice whitelist"))
def GetWhitelist(call: Call, auth: dict, node_filter: Any = None,
                 return_fields: list | None = None) -> list:
    """Returns the nodes that have a non-empty slice whitelist (fields as GetNodes).
    Non-admins only see those at one of their sites or whitelisting one of their
    slices, and never the node key, session or boot nonce."""
    where = "EXISTS (SELECT 1 FROM node_slice_whitelist w WHERE w.node_id = o.node_id)"
    params: list[Any] = []
    if not call.is_admin:
        sites = call.caller_site_ids()
        slices = caller_slice_ids(call)
        site_marks = ", ".join("?" * len(sites)) or "NULL"
        slice_marks = ", ".join("?" * len(slices)) or "NULL"
        where += (f" AND (o.site_id IN ({site_marks}) OR EXISTS (SELECT 1 FROM "
                  f"node_slice_whitelist w2 WHERE w2.node_id = o.node_id AND "
                  f"w2.slice_id IN ({slice_marks})))")
        params = [*sites, *slices]
    rows = call.get(Node, node_filter, return_fields, where=where, params=params)
    if not call.is_admin:
        for r in rows:
            for secret in NODE_SECRETS:
                r.pop(secret, None)
    return rows
