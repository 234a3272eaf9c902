"""Keys of persons (spec 5.3, 6.3)."""

from __future__ import annotations

import base64
import binascii
import re
import struct
from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCInvalidArgument, PLCPermissionDenied
from plc.filters import FilterParam, ReturnFields
from plc.method import ALL_PERSON_ROLES, ALL_ROLES, api_method
from plc.methods._util import accepted, id_or_name, require_keys, struct_of
from plc.methods.persons import local_person
from plc.model import Key, Person
from plc.params import Parameter

if TYPE_CHECKING:
    from plc.api import Call

KEY_KEYS = ("key_type", "key")
#: the public key types today's OpenSSH makes (legacy took only ssh-rsa and ssh-dss)
SSH_KEY_TYPES = ("ssh-rsa", "ssh-dss", "ssh-ed25519", "ecdsa-sha2-nistp256",
                 "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
                 "sk-ecdsa-sha2-nistp256@openssh.com")
# one line: optional authorized_keys options (as legacy allowed), the type, the base64
# blob, an optional comment; \Z and no control characters, so no second line rides along
_TYPES = "|".join(re.escape(t) for t in SSH_KEY_TYPES)
SSH_KEY = re.compile(r"(?:[^\x00-\x1f\x7f]*?[ \t])??(" + _TYPES + r")[ \t]+"
                     r"([A-Za-z0-9+/]+={0,2})(?:[ \t][^\x00-\x1f\x7f]*)?")


def ssh_key_error(key: str) -> str | None:
    """Why ``key`` is not an OpenSSH public key line we accept (None if it is): the type
    must be known and the blob must be base64 whose embedded type string is that type."""
    m = SSH_KEY.fullmatch(key)
    if m is None:
        return ("expected one line '<type> <base64> [comment]' with type one of "
                + ", ".join(SSH_KEY_TYPES))
    declared, blob_text = m.groups()
    try:
        blob = base64.b64decode(blob_text, validate=True)
    except (binascii.Error, ValueError):
        return "the key's base64 is malformed"
    if len(blob) < 4:
        return "the key blob is truncated"
    (size,) = struct.unpack(">I", blob[:4])
    embedded = blob[4:4 + size]
    if size > len(blob) - 4 or embedded != declared.encode():
        return (f"the key blob is of type {embedded[:64].decode('latin-1')!r}, "
                f"not {declared!r}")
    return None


def validate_key(call: Call, fields: dict[str, Any], key_id: int | None = None) -> None:
    if "key_type" in fields and not call.conn.query(
            "SELECT 1 FROM key_types WHERE key_type = ?", [fields["key_type"]]):
        raise PLCInvalidArgument(f"Invalid key type {fields['key_type']!r}", "key_type")
    if "key" in fields:
        if call.conn.query("SELECT 1 FROM keys WHERE key = ? AND is_blacklisted = 1",
                           [fields["key"]]):
            raise PLCInvalidArgument("Key is blacklisted", "key")
        key_type = fields.get("key_type")
        if key_type is None and key_id is not None:
            key_type = call.conn.scalar("SELECT key_type FROM keys WHERE key_id = ?", [key_id])
        if key_type == "ssh":
            why = ssh_key_error(fields["key"].strip())
            if why is not None:
                raise PLCInvalidArgument(f"Invalid SSH version 2 public key: {why}", "key")


@api_method(roles=ALL_ROLES, accepts=[Auth(), FilterParam(Key), ReturnFields()],
            returns=Parameter([dict], "List of keys"))
def GetKeys(call: Call, auth: dict, key_filter: Any = None,
            return_fields: list | None = None) -> list:
    """Returns an array of structures containing details about keys. Non-admin users
    only see their own keys."""
    if call.caller_kind == "person" and not call.is_admin:
        return call.get(Key, key_filter, return_fields,
                        where="o.key_id IN (SELECT key_id FROM person_key WHERE person_id = ?)",
                        params=[call.caller_id])
    return call.get(Key, key_filter, return_fields)


@api_method(roles=ALL_PERSON_ROLES, accepts=[Auth(), id_or_name(Person), struct_of(Key, KEY_KEYS)],
            returns=Parameter(int, "New key_id (> 0) if successful"))
def AddPersonKey(call: Call, auth: dict, person_id_or_email: int | str, key_fields: dict) -> int:
    """Adds a new key to the specified account. Non-admins can only modify their own
    keys."""
    person = local_person(call, person_id_or_email)
    if not call.is_admin and person["person_id"] != call.caller_id:
        raise PLCPermissionDenied("You may only modify your own keys")
    fields, _ = accepted(Key, key_fields, KEY_KEYS)
    require_keys(fields, KEY_KEYS, "Key")
    validate_key(call, fields)
    key_id = call.insert("keys", fields)
    call.insert("person_key", {"person_id": person["person_id"], "key_id": key_id})
    call.log(f"Key {key_id} added to person {person['person_id']}",
             Person=person["person_id"], Key=key_id)
    return key_id


def own_key(call: Call, key_id: int) -> dict[str, Any]:
    key = call.one(Key, key_id, ["key_id", "person_id", "peer_id"], what="key")
    if key["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local key")
    if not call.is_admin and key["person_id"] != call.caller_id:
        raise PLCPermissionDenied("Key must be associated with your account")
    return key


@api_method(roles=ALL_PERSON_ROLES,
            accepts=[Auth(), Key.fields["key_id"].param, struct_of(Key, KEY_KEYS)],
            returns=Parameter(int, "1 if successful"))
def UpdateKey(call: Call, auth: dict, key_id: int, key_fields: dict) -> int:
    """Updates the parameters of an existing key. Non-admins may only update their own
    keys."""
    key = own_key(call, key_id)
    fields, _ = accepted(Key, key_fields, KEY_KEYS)
    validate_key(call, fields, key["key_id"])
    call.update("keys", {"key_id": key["key_id"]}, fields)
    call.log(f"Key {key['key_id']} updated", Key=key["key_id"])
    return 1


@api_method(roles=ALL_PERSON_ROLES, accepts=[Auth(), Key.fields["key_id"].param],
            returns=Parameter(int, "1 if successful"))
def DeleteKey(call: Call, auth: dict, key_id: int) -> int:
    """Deletes a key. Non-admins may only delete their own keys."""
    key = own_key(call, key_id)
    call.delete("person_key", {"key_id": key["key_id"]})
    call.delete("keys", {"key_id": key["key_id"]})
    call.log(f"Key {key['key_id']} deleted", Key=key["key_id"])
    return 1


@api_method(roles=["admin"], accepts=[Auth(), Key.fields["key_id"].param],
            returns=Parameter(int, "1 if successful"))
def BlacklistKey(call: Call, auth: dict, key_id: int) -> int:
    """Blacklists a key, disassociating it and all others identical to it from all
    accounts and preventing it from ever being added again."""
    key = call.one(Key, key_id, ["key_id", "key"], what="key")
    same = [r["key_id"] for r in call.conn.query("SELECT key_id FROM keys WHERE key = ?",
                                                 [key["key"]])]
    call.delete("person_key", {"key_id": same})
    call.update("keys", {"key_id": same}, {"is_blacklisted": 1})
    call.log(f"Key {key['key_id']} blacklisted", Key=same)
    return 1
