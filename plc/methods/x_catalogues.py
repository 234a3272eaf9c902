"""Admin-managed catalogues (Appendix A): the lookup tables (boot states, key types, node
types, network methods and types, slice instantiations), roles, message templates and
PCU types with their protocol types."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plc.auth import Auth
from plc.faults import PLCInvalidArgument
from plc.method import ALL_ROLES
from plc.methods._util import accepted, require_keys, struct_of
from plc.methods._xtra import bools, row, unique, xget, xmethod
from plc.model import LOOKUPS, Message, PCUProtocolType, PCUType, Role
from plc.params import Mixed, Parameter

if TYPE_CHECKING:
    from plc.api import Call

_ONE = Parameter(int, "1 if successful")

#: where each lookup value is used, so that a value in use is not deleted under its rows
_USED_BY = {
    "boot_states": [("nodes", "boot_state", "deleted = 0")],
    "key_types": [("keys", "key_type", "1 = 1")],
    "node_types": [("nodes", "node_type", "deleted = 0")],
    "network_methods": [("interfaces", "method", "1 = 1")],
    "network_types": [("interfaces", "type", "1 = 1")],
    "slice_instantiations": [("slices", "instantiation", "deleted = 0")],
}


def _define_lookup(table: str, singular: str, what: str, maxlen: int) -> None:
    col = LOOKUPS[table]
    value_param = Parameter(str, what, min=1, max=maxlen)

    def add(call: Call, auth: dict, name: str) -> int:
        if not name.strip():
            raise PLCInvalidArgument(f"{what} must not be blank", "name")
        unique(call, table, col, name, what)
        call.insert(table, {col: name})
        return 1

    def delete(call: Call, auth: dict, name: str) -> int:
        if not call.conn.query(f"SELECT 1 FROM {table} WHERE {col} = ?", [name]):
            raise PLCInvalidArgument(f"No such {what} {name!r}")
        for user_table, user_col, live in _USED_BY[table]:
            n = call.conn.scalar(f"SELECT COUNT(*) FROM {user_table} WHERE {user_col} = ? "
                                 f"AND {live}", [name])
            if n:
                raise PLCInvalidArgument(f"{what} {name!r} is still used by {n} {user_table}")
        call.delete(table, {col: name})
        return 1

    add.__doc__ = f"Adds a new {what}."
    delete.__doc__ = f"Deletes a {what}; refused while objects still use it."
    xmethod(name=f"Add{singular}", roles=["admin"], accepts=[Auth(), value_param],
            returns=_ONE)(add)
    xmethod(name=f"Delete{singular}", roles=["admin"], accepts=[Auth(), value_param],
            returns=_ONE)(delete)


_define_lookup("boot_states", "BootState", "boot state", 20)
_define_lookup("key_types", "KeyType", "key type", 20)
_define_lookup("node_types", "NodeType", "node type", 20)
_define_lookup("network_methods", "NetworkMethod", "network method", 20)
_define_lookup("network_types", "NetworkType", "network type", 20)
_define_lookup("slice_instantiations", "SliceInstantiation", "slice instantiation", 100)


# -- roles -------------------------------------------------------------------------------
@xmethod(roles=["admin"], accepts=[Auth(), Role.fields["role_id"].param,
                                   Parameter(str, "Role name", min=1, max=100)],
         returns=_ONE)
def AddRole(call: Call, auth: dict, role_id: int, name: str) -> int:
    """Adds a new role with an explicit role_id; id and name must be unused."""
    unique(call, "roles", "role_id", role_id, "Role id")
    unique(call, "roles", "name", name, "Role name")
    call.insert("roles", {"role_id": role_id, "name": name})
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), Mixed(Role.fields["role_id"].param,
                                                 Role.fields["name"].param)], returns=_ONE)
def DeleteRole(call: Call, auth: dict, role_id_or_name: int | str) -> int:
    """Deletes a role; persons and tag types lose it."""
    role = call.one(Role, role_id_or_name, ["role_id"], what="role")
    call.delete("person_role", {"role_id": role["role_id"]})
    call.delete("tag_type_role", {"role_id": role["role_id"]})
    call.delete("roles", {"role_id": role["role_id"]})
    return 1


# -- message templates ---------------------------------------------------------------------
MESSAGE_KEYS = ("message_id", "subject", "template", "enabled")
xget(Message, ["admin", "node"])


@xmethod(roles=["admin"], accepts=[Auth(), struct_of(Message, MESSAGE_KEYS)], returns=_ONE)
def AddMessage(call: Call, auth: dict, message_fields: dict) -> int:
    """Adds a new message template (message_id mandatory and unique)."""
    fields, _ = accepted(Message, message_fields, MESSAGE_KEYS)
    require_keys(fields, ("message_id",), "Message")
    unique(call, "messages", "message_id", fields["message_id"], "Message")
    call.insert("messages", bools(fields, ("enabled",)))
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), Message.fields["message_id"].param,
                                   struct_of(Message, ("subject", "template", "enabled"))],
         returns=_ONE)
def UpdateMessage(call: Call, auth: dict, message_id: str, message_fields: dict) -> int:
    """Updates the subject, template or enabled flag of a message template."""
    row(call, "messages", "message_id", message_id, "message")
    fields, _ = accepted(Message, message_fields, ("subject", "template", "enabled"))
    call.update("messages", {"message_id": message_id}, bools(fields, ("enabled",)))
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), Message.fields["message_id"].param], returns=_ONE)
def DeleteMessage(call: Call, auth: dict, message_id: str) -> int:
    """Deletes a message template."""
    row(call, "messages", "message_id", message_id, "message")
    call.delete("messages", {"message_id": message_id})
    return 1


# -- PCU types and protocol types ----------------------------------------------------------
PCU_TYPE_KEYS = ("model", "name")
PROTOCOL_KEYS = ("pcu_type_id", "port", "protocol", "supported")
xget(PCUType, ALL_ROLES, scalars=True)
xget(PCUProtocolType, ALL_ROLES)


@xmethod(roles=["admin"], accepts=[Auth(), struct_of(PCUType, PCU_TYPE_KEYS)],
         returns=Parameter(int, "New pcu_type_id (> 0) if successful"))
def AddPCUType(call: Call, auth: dict, pcu_type_fields: dict) -> int:
    """Adds a PCU type; the model must be unique."""
    fields, _ = accepted(PCUType, pcu_type_fields, PCU_TYPE_KEYS)
    require_keys(fields, ("model",), "PCUType")
    unique(call, "pcu_types", "model", fields["model"], "PCU type model")
    pcu_type_id = int(call.insert("pcu_types", fields))
    call.log(f"PCU type {pcu_type_id} added", PCUType=pcu_type_id)
    return pcu_type_id


@xmethod(roles=["admin"], accepts=[Auth(), PCUType.fields["pcu_type_id"].param,
                                   struct_of(PCUType, PCU_TYPE_KEYS)], returns=_ONE)
def UpdatePCUType(call: Call, auth: dict, pcu_type_id: int, pcu_type_fields: dict) -> int:
    """Updates a PCU type."""
    row(call, "pcu_types", "pcu_type_id", pcu_type_id, "PCU type")
    fields, _ = accepted(PCUType, pcu_type_fields, PCU_TYPE_KEYS)
    if "model" in fields:
        require_keys(fields, ("model",), "PCUType")
        unique(call, "pcu_types", "model", fields["model"], "PCU type model",
               ("pcu_type_id", pcu_type_id))
    call.update("pcu_types", {"pcu_type_id": pcu_type_id}, fields)
    call.log(f"PCU type {pcu_type_id} updated", PCUType=pcu_type_id)
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), PCUType.fields["pcu_type_id"].param], returns=_ONE)
def DeletePCUType(call: Call, auth: dict, pcu_type_id: int) -> int:
    """Deletes a PCU type and its protocol types."""
    row(call, "pcu_types", "pcu_type_id", pcu_type_id, "PCU type")
    call.delete("pcu_protocol_types", {"pcu_type_id": pcu_type_id})
    call.delete("pcu_types", {"pcu_type_id": pcu_type_id})
    call.log(f"PCU type {pcu_type_id} deleted", PCUType=pcu_type_id)
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), Mixed(PCUType.fields["pcu_type_id"].param,
                                                 PCUType.fields["model"].param),
                                   struct_of(PCUProtocolType, PROTOCOL_KEYS)],
         returns=Parameter(int, "New pcu_protocol_type_id (> 0) if successful"))
def AddPCUProtocolType(call: Call, auth: dict, pcu_type_id_or_model: int | str,
                       protocol_type_fields: dict) -> int:
    """Adds a protocol (port, protocol name, supported) to a PCU type."""
    pcu_type = call.one(PCUType, pcu_type_id_or_model, ["pcu_type_id"], what="PCU type")
    fields, _ = accepted(PCUProtocolType, protocol_type_fields, PROTOCOL_KEYS[1:])
    require_keys(fields, ("port", "protocol"), "PCUProtocolType")
    fields["pcu_type_id"] = pcu_type["pcu_type_id"]
    return int(call.insert("pcu_protocol_types", bools(fields, ("supported",))))


@xmethod(roles=["admin"], accepts=[Auth(), Parameter(int, "PCU protocol type id"),
                                   struct_of(PCUProtocolType, PROTOCOL_KEYS)], returns=_ONE)
def UpdatePCUProtocolType(call: Call, auth: dict, protocol_type_id: int,
                          protocol_type_fields: dict) -> int:
    """Updates a PCU protocol type."""
    row(call, "pcu_protocol_types", "pcu_protocol_type_id", protocol_type_id,
        "PCU protocol type")
    fields, _ = accepted(PCUProtocolType, protocol_type_fields, PROTOCOL_KEYS)
    if "pcu_type_id" in fields:
        row(call, "pcu_types", "pcu_type_id", fields["pcu_type_id"], "PCU type")
    if "protocol" in fields:
        require_keys(fields, ("protocol",), "PCUProtocolType")
    call.update("pcu_protocol_types", {"pcu_protocol_type_id": protocol_type_id},
                bools(fields, ("supported",)))
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), Parameter(int, "PCU protocol type id")],
         returns=_ONE)
def DeletePCUProtocolType(call: Call, auth: dict, protocol_type_id: int) -> int:
    """Deletes a PCU protocol type."""
    row(call, "pcu_protocol_types", "pcu_protocol_type_id", protocol_type_id,
        "PCU protocol type")
    call.delete("pcu_protocol_types", {"pcu_protocol_type_id": protocol_type_id})
    return 1
