"""Objects that belong to a site: PCUs (spec 5.14) and addresses with their types (5.15),
plus interface links (ilinks). Non-admin callers act only on their own sites."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCInvalidArgument, PLCPermissionDenied
from plc.filters import FilterParam, ReturnFields
from plc.method import ALL_ROLES
from plc.methods._tags import tag_type, tag_type_roles
from plc.methods._util import accepted, id_or_name, require_keys, struct_of
from plc.methods._xtra import row, unique, xget, xmethod
from plc.model import PCU, Address, AddressType, Ilink, Node, Site
from plc.params import Mixed, Parameter

if TYPE_CHECKING:
    from plc.api import Call

_ONE = Parameter(int, "1 if successful")


def _own_site(call: Call, site_ids: list[int], what: str) -> None:
    """Fault 108 unless the caller is admin or a member of one of ``site_ids``."""
    if call.is_admin:
        return
    if not set(site_ids) & set(call.caller_site_ids()):
        raise PLCPermissionDenied(f"Not allowed to modify this {what} (not at your site)")


# -- PCUs --------------------------------------------------------------------------------
PCU_KEYS = ("hostname", "ip", "protocol", "username", "password", "notes", "model")


def _valid_ip(value: Any, name: str = "ip") -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise PLCInvalidArgument(f"{value!r} is not a valid IP address", name) from None


def _pcu(call: Call, pcu_id: int) -> dict[str, Any]:
    rows = call.get(PCU, [pcu_id], ["pcu_id", "site_id", "node_ids", "ports"])
    if not rows:
        raise PLCInvalidArgument(f"No such PCU {pcu_id!r}")
    return dict(rows[0])


@xmethod(roles=["admin", "pi", "tech", "node"],
         accepts=[Auth(), FilterParam(PCU), ReturnFields()],
         returns=Parameter([dict], "List of PCUs"))
def GetPCUs(call: Call, auth: dict, pcu_filter: Any = None, return_fields: list | None = None
            ) -> list:
    """Returns an array of structs containing details about power control units (PCUs).
    Non-admins (persons and nodes) only see the PCUs of their site(s)."""
    if call.is_admin:
        return call.get(PCU, pcu_filter, return_fields)
    site_ids = call.caller_site_ids()
    marks = ", ".join("?" * len(site_ids)) or "NULL"
    return call.get(PCU, pcu_filter, return_fields, where=f"o.site_id IN ({marks})",
                    params=site_ids)


@xmethod(roles=["admin", "pi", "tech"],
         accepts=[Auth(), id_or_name(Site), struct_of(PCU, PCU_KEYS)],
         returns=Parameter(int, "New pcu_id (> 0) if successful"))
def AddPCU(call: Call, auth: dict, site_id_or_login_base: int | str, pcu_fields: dict) -> int:
    """Adds a new power control unit (PCU) to a site. Non-admins only at their sites."""
    site = call.one(Site, site_id_or_login_base, ["site_id", "peer_id"], what="site")
    if site["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local site")
    _own_site(call, [site["site_id"]], "site")
    fields, _ = accepted(PCU, pcu_fields, PCU_KEYS)
    require_keys(fields, ("ip",), "PCU")
    _valid_ip(fields["ip"])
    fields.update(site_id=site["site_id"], last_updated=call.now)
    pcu_id = int(call.insert("pcus", fields))
    call.log(f"PCU {pcu_id} added to site {site['site_id']}", Site=site["site_id"], PCU=pcu_id)
    return pcu_id


@xmethod(roles=["admin", "pi", "tech"],
         accepts=[Auth(), PCU.fields["pcu_id"].param, struct_of(PCU, PCU_KEYS)], returns=_ONE)
def UpdatePCU(call: Call, auth: dict, pcu_id: int, pcu_fields: dict) -> int:
    """Updates a PCU. Non-admins only at their sites."""
    pcu = _pcu(call, pcu_id)
    _own_site(call, [pcu["site_id"]], "PCU")
    fields, _ = accepted(PCU, pcu_fields, PCU_KEYS)
    if "ip" in fields:
        _valid_ip(fields["ip"])
    fields["last_updated"] = call.now
    call.update("pcus", {"pcu_id": pcu_id}, fields)
    call.log(f"PCU {pcu_id} updated", PCU=pcu_id)
    return 1


@xmethod(roles=["admin", "pi", "tech"], accepts=[Auth(), PCU.fields["pcu_id"].param],
         returns=_ONE)
def DeletePCU(call: Call, auth: dict, pcu_id: int) -> int:
    """Deletes a PCU (and its node bindings). Non-admins only at their sites."""
    pcu = _pcu(call, pcu_id)
    _own_site(call, [pcu["site_id"]], "PCU")
    call.delete("pcu_node", {"pcu_id": pcu_id})
    call.delete("pcus", {"pcu_id": pcu_id})
    call.log(f"PCU {pcu_id} deleted", PCU=pcu_id)
    return 1


@xmethod(roles=["admin", "pi", "tech"],
         accepts=[Auth(), id_or_name(Node), PCU.fields["pcu_id"].param,
                  Parameter(int, "PCU port number", min=0)], returns=_ONE)
def AddNodeToPCU(call: Call, auth: dict, node_id_or_hostname: int | str, pcu_id: int,
                 port: int) -> int:
    """Records that a node is plugged into a port of a PCU at the same site."""
    node = call.one(Node, node_id_or_hostname, ["node_id", "site_id", "peer_id"], what="node")
    if node["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local node")
    pcu = _pcu(call, pcu_id)
    if node["site_id"] != pcu["site_id"]:
        raise PLCInvalidArgument("Node and PCU are not at the same site")
    _own_site(call, [pcu["site_id"]], "PCU")
    if node["node_id"] in pcu["node_ids"]:
        raise PLCInvalidArgument("Node already controlled by this PCU")
    if port in pcu["ports"]:
        raise PLCInvalidArgument(f"PCU port {port} already in use")
    call.insert("pcu_node", {"pcu_id": pcu_id, "node_id": node["node_id"], "port": port})
    call.log(f"Node {node['node_id']} added to PCU {pcu_id} port {port}",
             Node=node["node_id"], PCU=pcu_id)
    return 1


@xmethod(roles=["admin", "pi", "tech"],
         accepts=[Auth(), id_or_name(Node), PCU.fields["pcu_id"].param], returns=_ONE)
def DeleteNodeFromPCU(call: Call, auth: dict, node_id_or_hostname: int | str, pcu_id: int) -> int:
    """Removes a node from a PCU (idempotent)."""
    node = call.one(Node, node_id_or_hostname, ["node_id"], what="node")
    pcu = _pcu(call, pcu_id)
    _own_site(call, [pcu["site_id"]], "PCU")
    call.delete("pcu_node", {"pcu_id": pcu_id, "node_id": node["node_id"]})
    call.log(f"Node {node['node_id']} removed from PCU {pcu_id}",
             Node=node["node_id"], PCU=pcu_id)
    return 1


# -- addresses -----------------------------------------------------------------------------
ADDRESS_KEYS = ("line1", "line2", "line3", "city", "state", "postalcode", "country")
xget(Address, ALL_ROLES, "GetAddresses")
xget(AddressType, ALL_ROLES)


def _address_sites(call: Call, address_id: int) -> list[int]:
    row(call, "addresses", "address_id", address_id, "address")
    return [r["site_id"] for r in call.conn.query(
        "SELECT site_id FROM site_address WHERE address_id = ?", [address_id])]


@xmethod(roles=["admin", "pi"],
         accepts=[Auth(), Address.fields["address_id"].param,
                  struct_of(Address, ADDRESS_KEYS)], returns=_ONE)
def UpdateAddress(call: Call, auth: dict, address_id: int, address_fields: dict) -> int:
    """Updates an address. PIs only for addresses of their sites."""
    _own_site(call, _address_sites(call, address_id), "address")
    fields, _ = accepted(Address, address_fields, ADDRESS_KEYS)
    for key in ("line1", "city", "state", "postalcode", "country"):
        if key in fields:
            require_keys(fields, (key,), "Address")
    call.update("addresses", {"address_id": address_id}, fields)
    call.log(f"Address {address_id} updated", Address=address_id)
    return 1


@xmethod(roles=["admin", "pi"], accepts=[Auth(), Address.fields["address_id"].param],
         returns=_ONE)
def DeleteAddress(call: Call, auth: dict, address_id: int) -> int:
    """Deletes an address. PIs only for addresses of their sites."""
    _own_site(call, _address_sites(call, address_id), "address")
    call.delete("site_address", {"address_id": address_id})
    call.delete("address_address_type", {"address_id": address_id})
    call.delete("addresses", {"address_id": address_id})
    call.log(f"Address {address_id} deleted", Address=address_id)
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), struct_of(AddressType, ("name", "description"))],
         returns=Parameter(int, "New address_type_id (> 0) if successful"))
def AddAddressType(call: Call, auth: dict, address_type_fields: dict) -> int:
    """Adds an address type; the name must be unique."""
    fields, _ = accepted(AddressType, address_type_fields, ("name", "description"))
    require_keys(fields, ("name",), "AddressType")
    unique(call, "address_types", "name", fields["name"], "Address type")
    return int(call.insert("address_types", fields))


@xmethod(roles=["admin"], accepts=[Auth(), id_or_name(AddressType),
                                   struct_of(AddressType, ("name", "description"))],
         returns=_ONE)
def UpdateAddressType(call: Call, auth: dict, address_type_id_or_name: int | str,
                      address_type_fields: dict) -> int:
    """Updates an address type."""
    at = call.one(AddressType, address_type_id_or_name, ["address_type_id"],
                  what="address type")
    fields, _ = accepted(AddressType, address_type_fields, ("name", "description"))
    if "name" in fields:
        require_keys(fields, ("name",), "AddressType")
        unique(call, "address_types", "name", fields["name"], "Address type",
               ("address_type_id", at["address_type_id"]))
    call.update("address_types", {"address_type_id": at["address_type_id"]}, fields)
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), id_or_name(AddressType)], returns=_ONE)
def DeleteAddressType(call: Call, auth: dict, address_type_id_or_name: int | str) -> int:
    """Deletes an address type; addresses lose it."""
    at = call.one(AddressType, address_type_id_or_name, ["address_type_id"],
                  what="address type")
    call.delete("address_address_type", {"address_type_id": at["address_type_id"]})
    call.delete("address_types", {"address_type_id": at["address_type_id"]})
    return 1


@xmethod(roles=["admin", "pi"],
         accepts=[Auth(), id_or_name(AddressType), Address.fields["address_id"].param],
         returns=_ONE)
def AddAddressTypeToAddress(call: Call, auth: dict, address_type_id_or_name: int | str,
                            address_id: int) -> int:
    """Gives an address a type (idempotent). PIs only for addresses of their sites."""
    at = call.one(AddressType, address_type_id_or_name, ["address_type_id"],
                  what="address type")
    _own_site(call, _address_sites(call, address_id), "address")
    if not call.conn.query("SELECT 1 FROM address_address_type WHERE address_id = ? AND "
                           "address_type_id = ?", [address_id, at["address_type_id"]]):
        call.insert("address_address_type", {"address_id": address_id,
                                             "address_type_id": at["address_type_id"]})
    return 1


@xmethod(roles=["admin", "pi"],
         accepts=[Auth(), id_or_name(AddressType), Address.fields["address_id"].param],
         returns=_ONE)
def DeleteAddressTypeFromAddress(call: Call, auth: dict, address_type_id_or_name: int | str,
                                 address_id: int) -> int:
    """Removes a type from an address (idempotent). PIs only for their sites' addresses."""
    at = call.one(AddressType, address_type_id_or_name, ["address_type_id"],
                  what="address type")
    _own_site(call, _address_sites(call, address_id), "address")
    call.delete("address_address_type", {"address_id": address_id,
                                         "address_type_id": at["address_type_id"]})
    return 1


# -- ilinks ------------------------------------------------------------------------------------
xget(Ilink, ["admin", "pi", "user", "node"], scalars=True)


def _interface_site(call: Call, interface_id: int, what: str) -> int:
    site_id = call.conn.scalar(
        "SELECT n.site_id FROM interfaces i JOIN nodes n ON n.node_id = i.node_id "
        "WHERE i.interface_id = ? AND n.deleted = 0", [interface_id])
    if site_id is None:
        raise PLCInvalidArgument(f"No such {what} interface {interface_id!r}")
    return int(site_id)


def _may_write_ilink(call: Call, tag_type_id: int, src_site: int) -> None:
    """Admin, or a role in the tag type's roles and the source interface at your site."""
    if call.is_admin:
        return
    roles = tag_type_roles(call, tag_type_id)
    if not set(roles) & set(call.roles):
        raise PLCPermissionDenied(f"Not allowed to write ilinks of this type (roles {roles})")
    if src_site not in call.caller_site_ids():
        raise PLCPermissionDenied("Source interface is not at one of your sites")


@xmethod(roles=["admin", "pi", "tech", "user"],
         accepts=[Auth(), Parameter(int, "Source interface id"),
                  Parameter(int, "Destination interface id"),
                  Mixed(Parameter(int, "Tag type id"), Parameter(str, "Tag type name")),
                  Parameter(str, "Value")],
         returns=Parameter(int, "New ilink_id (> 0) if successful"))
def AddIlink(call: Call, auth: dict, src_if_id: int, dst_if_id: int,
             tag_type_id_or_name: int | str, value: str) -> int:
    """Creates a link of a tag type between two interfaces, with a value."""
    src_site = _interface_site(call, src_if_id, "source")
    _interface_site(call, dst_if_id, "destination")
    tt = tag_type(call, tag_type_id_or_name)
    _may_write_ilink(call, tt["tag_type_id"], src_site)
    if call.conn.query("SELECT 1 FROM ilinks WHERE src_interface_id = ? AND "
                       "dst_interface_id = ? AND tag_type_id = ?",
                       [src_if_id, dst_if_id, tt["tag_type_id"]]):
        raise PLCInvalidArgument("Ilink already exists")
    return int(call.insert("ilinks", {"src_interface_id": src_if_id,
                                      "dst_interface_id": dst_if_id,
                                      "tag_type_id": tt["tag_type_id"], "value": value}))


def _ilink(call: Call, ilink_id: int) -> dict[str, Any]:
    link = row(call, "ilinks", "ilink_id", ilink_id, "ilink")
    _may_write_ilink(call, link["tag_type_id"],
                     _interface_site(call, link["src_interface_id"], "source"))
    return link


@xmethod(roles=["admin", "pi", "tech", "user"],
         accepts=[Auth(), Ilink.fields["ilink_id"].param, Parameter(str, "Value")],
         returns=_ONE)
def UpdateIlink(call: Call, auth: dict, ilink_id: int, value: str) -> int:
    """Changes the value of an ilink."""
    _ilink(call, ilink_id)
    call.update("ilinks", {"ilink_id": ilink_id}, {"value": value})
    return 1


@xmethod(roles=["admin", "pi", "user"], accepts=[Auth(), Ilink.fields["ilink_id"].param],
         returns=_ONE)
def DeleteIlink(call: Call, auth: dict, ilink_id: int) -> int:
    """Deletes an ilink."""
    _ilink(call, ilink_id)
    call.delete("ilinks", {"ilink_id": ilink_id})
    return 1

