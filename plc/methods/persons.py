"""Persons, their sites and roles (spec 5.2, 6.3)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCInvalidArgument, PLCPermissionDenied
from plc.filters import FilterParam, ReturnFields
from plc.method import ALL_PERSON_ROLES, ALL_ROLES, api_method
from plc.methods._tags import get_tag, set_tag
from plc.methods._util import accepted, id_or_name, require_keys, struct_of
from plc.model import Person, Role, Site
from plc.params import Parameter
from plc.passwords import hash_password

if TYPE_CHECKING:
    from plc.api import Call

EMAIL = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9._-]+\.[A-Za-z]+\Z")
ADD_KEYS = ("first_name", "last_name", "title", "email", "password", "phone", "url", "bio")
UPDATE_KEYS = ADD_KEYS + ("enabled",)
RELATED = ("roles", "sites", "keys", "slices")
SECRET = ("password", "verification_key", "verification_expires")


def validate_email(call: Call, email: str, person_id: int | None = None) -> str:
    email = email.lower()
    if not EMAIL.match(email):
        raise PLCInvalidArgument("Invalid e-mail address", "email")
    clash = call.conn.query("SELECT person_id FROM persons WHERE email = ? AND deleted = 0 "
                            "AND peer_id IS NULL", [email])
    if any(r["person_id"] != person_id for r in clash):
        raise PLCInvalidArgument("E-mail address already in use", "email")
    return email


def person_view(call: Call, person_id: int) -> dict[str, Any]:
    return call.one(Person, person_id, ["person_id", "email", "roles", "role_ids", "site_ids",
                                        "peer_id", "enabled"], what="person")


def can_update(call: Call, target: dict[str, Any]) -> bool:
    """Self, admin, or a PI sharing a site with a target who is neither pi nor admin."""
    if call.caller_kind != "person":
        return False
    if call.is_admin or target["person_id"] == call.caller_id:
        return True
    if "pi" not in call.roles:
        return False
    if set(target["roles"]) & {"pi", "admin"}:
        return False
    return bool(set(target["site_ids"]) & set(call.caller_site_ids()))


def local_person(call: Call, person_id_or_email: int | str) -> dict[str, Any]:
    person = call.one(Person, person_id_or_email, ["person_id"], what="person")
    view = person_view(call, person["person_id"])
    if view["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local account")
    return view


@api_method(roles=ALL_ROLES, accepts=[Auth(), FilterParam(Person, scalars=True), ReturnFields()],
            returns=Parameter([dict], "List of persons"))
def GetPersons(call: Call, auth: dict, person_filter: Any = None,
               return_fields: list | None = None) -> list:
    """Returns an array of structs containing details about users. Non-admin users see
    themselves, and PIs and techs also see the users of their sites. Passwords and
    verification keys are never returned."""
    fields = None if return_fields is None else [f for f in return_fields if f not in SECRET]
    if fields is not None and not fields and return_fields:
        fields = ["person_id"]
    if call.caller_kind == "person" and not call.is_admin:
        extra = ["person_id", "site_ids", "roles"]
        rows = call.get(Person, person_filter,
                        None if fields is None else list(dict.fromkeys(fields + extra)))
        visible = []
        mine = set(call.caller_site_ids())
        for r in rows:
            if r["person_id"] == call.caller_id or (
                    call.has_role("pi", "tech") and set(r["site_ids"]) & mine):
                if fields is not None:
                    r = {k: v for k, v in r.items() if k in fields}
                visible.append(r)
        rows = visible
    else:
        rows = call.get(Person, person_filter, fields)
    for r in rows:
        for k in SECRET:
            r.pop(k, None)
    return rows


@api_method(roles=["admin", "pi"], accepts=[Auth(), struct_of(Person, ADD_KEYS, tags=True)],
            returns=Parameter(int, "New person_id (> 0) if successful"))
def AddPerson(call: Call, auth: dict, person_fields: dict) -> int:
    """Adds a new account. Any fields specified in person_fields are used, otherwise
    defaults are used. Accounts are disabled by default: use UpdatePerson to enable."""
    fields = dict(person_fields)
    fields.pop("enabled", None)
    native, tags = accepted(Person, fields, ADD_KEYS, reject=True, tags=True, what="add")
    require_keys(native, ("email", "first_name", "last_name"), "Person")
    native["email"] = validate_email(call, native["email"])
    if native.get("password"):
        native["password"] = hash_password(native["password"])
    else:
        native.pop("password", None)
    person_id = call.insert("persons", {**native, "enabled": 0, "date_created": call.now,
                                        "last_updated": call.now})
    for name, value in tags.items():
        set_tag(call, "Person", person_id, name, value)
    call.log(f"Person {person_id} added", Person=person_id)
    return person_id


def _hrn(call: Call, person_id: int, email: str) -> str | None:
    site = call.conn.query("SELECT s.login_base FROM person_site x JOIN sites s ON "
                           "s.site_id = x.site_id WHERE x.person_id = ? "
                           "ORDER BY x.is_primary DESC, x.site_id LIMIT 1", [person_id])
    if not site:
        return None
    local = email.split("@")[0].replace(".", "_").replace("+", "_")
    return f"{call.config.plc_hrn_root}.{site[0]['login_base']}.{local}"


@api_method(roles=ALL_PERSON_ROLES,
            accepts=[Auth(), id_or_name(Person),
                     {**struct_of(Person, UPDATE_KEYS, tags=True),
                      **{k: Parameter(list, f"related {k}") for k in RELATED}}],
            returns=Parameter(int, "1 if successful"))
def UpdatePerson(call: Call, auth: dict, person_id_or_email: int | str,
                 person_fields: dict) -> int:
    """Updates a person. Only the fields specified in person_fields are updated. Users
    and techs can only update themselves; PIs can update themselves and other non-PI
    users of their sites; admins can update anyone."""
    target = local_person(call, person_id_or_email)
    if not can_update(call, target):
        raise PLCPermissionDenied("Not allowed to update specified account")
    rest = {k: v for k, v in person_fields.items() if k not in RELATED}
    native, tags = accepted(Person, rest, UPDATE_KEYS, reject=True, tags=True, what="update")
    pid = target["person_id"]
    if "email" in native:
        native["email"] = validate_email(call, native["email"], pid)
    if "password" in native:
        native["password"] = hash_password(native["password"]) if native["password"] \
            else "nopass"
    if "enabled" in native:
        native["enabled"] = int(bool(native["enabled"]))
    for k in ("first_name", "last_name"):
        if k in native and not (native[k] or "").strip():
            raise PLCInvalidArgument(f"Person {k} must be specified")
    call.update("persons", {"person_id": pid}, {**native, "last_updated": call.now})
    for name, value in tags.items():
        set_tag(call, "Person", pid, name, value)
    if "email" in native and get_tag(call, "Person", pid, "hrn") is not None:
        hrn = _hrn(call, pid, native["email"])
        if hrn:
            set_tag(call, "Person", pid, "hrn", hrn)
    _related(call, target, person_fields)
    changed = sorted(set(native) | set(tags) | (set(person_fields) & set(RELATED)))
    call.log(f"Person {pid} updated: {', '.join(changed) or 'nothing'}", Person=pid)
    return 1


def _related(call: Call, target: dict[str, Any], fields: dict[str, Any]) -> None:
    pid = target["person_id"]
    if "roles" in fields:
        wanted = [call.one(Role, r, what="role")["role_id"] for r in fields["roles"]]
        for rid in wanted:
            if rid not in target["role_ids"]:
                call.invoke("AddRoleToPerson", rid, pid)
        for rid in target["role_ids"]:
            if rid not in wanted:
                call.invoke("DeleteRoleFromPerson", rid, pid)
    if "sites" in fields:
        wanted = [call.one(Site, s, ["site_id"], what="site")["site_id"] for s in fields["sites"]]
        for sid in wanted:
            if sid not in target["site_ids"]:
                call.invoke("AddPersonToSite", pid, sid)
        for sid in target["site_ids"]:
            if sid not in wanted:
                call.invoke("DeletePersonFromSite", pid, sid)
    if "keys" in fields:
        for k in fields["keys"]:
            if isinstance(k, dict):
                call.invoke("AddPersonKey", pid, k)
    if "slices" in fields:
        current = call.one(Person, pid, ["slice_ids"])["slice_ids"]
        from plc.model import Slice
        wanted = [call.one(Slice, s, ["slice_id"], what="slice")["slice_id"]
                  for s in fields["slices"]]
        for sid in wanted:
            if sid not in current:
                call.invoke("AddPersonToSlice", pid, sid)
        for sid in current:
            if sid not in wanted:
                call.invoke("DeletePersonFromSlice", pid, sid)


def delete_person_rows(call: Call, person_id: int) -> None:
    """The cascade of spec 5.2 (person tags are kept)."""
    keys = [r["key_id"] for r in call.conn.query(
        "SELECT key_id FROM person_key WHERE person_id = ?", [person_id])]
    call.delete("person_key", {"person_id": person_id})
    if keys:
        call.delete("keys", {"key_id": keys, "is_blacklisted": 0})
    for table in ("person_role", "person_site", "slice_person"):
        call.delete(table, {"person_id": person_id})
    sessions = [r["session_id"] for r in call.conn.query(
        "SELECT session_id FROM person_session WHERE person_id = ?", [person_id])]
    call.delete("person_session", {"person_id": person_id})
    if sessions:
        call.delete("sessions", {"session_id": sessions})
    call.update("persons", {"person_id": person_id}, {"deleted": 1, "last_updated": call.now})


@api_method(roles=ALL_PERSON_ROLES, accepts=[Auth(), id_or_name(Person)],
            returns=Parameter(int, "1 if successful"))
def DeletePerson(call: Call, auth: dict, person_id_or_email: int | str) -> int:
    """Mark an existing account as deleted. Users and techs can only delete themselves;
    PIs can delete themselves and other non-PIs at their sites; admins anyone."""
    target = local_person(call, person_id_or_email)
    if not can_update(call, target):
        raise PLCPermissionDenied("Not allowed to delete specified account")
    delete_person_rows(call, target["person_id"])
    call.log(f"Person {target['person_id']} deleted", Person=target["person_id"])
    return 1


def _site(call: Call, site_id_or_login_base: int | str) -> dict[str, Any]:
    site = call.one(Site, site_id_or_login_base, ["site_id", "login_base", "peer_id"],
                    what="site")
    if site["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local site")
    return site


@api_method(roles=["admin"], accepts=[Auth(), id_or_name(Person), id_or_name(Site)],
            returns=Parameter(int, "1 if successful"))
def AddPersonToSite(call: Call, auth: dict, person_id_or_email: int | str,
                    site_id_or_login_base: int | str) -> int:
    """Adds the specified person to the specified site. If the person is already a
    member of the site, no errors are returned. Does not change the primary site."""
    person = local_person(call, person_id_or_email)
    site = _site(call, site_id_or_login_base)
    pid, sid = person["person_id"], site["site_id"]
    if sid not in person["site_ids"]:
        call.insert("person_site", {"person_id": pid, "site_id": sid,
                                    "is_primary": 0 if person["site_ids"] else 1})
        if not person["site_ids"]:
            hrn = _hrn(call, pid, person["email"])
            if hrn:
                set_tag(call, "Person", pid, "hrn", hrn)
    call.log(f"Person {pid} added to site {sid}", Person=pid, Site=sid)
    return 1


@api_method(roles=["admin"], accepts=[Auth(), id_or_name(Person), id_or_name(Site)],
            returns=Parameter(int, "1 if successful"))
def DeletePersonFromSite(call: Call, auth: dict, person_id_or_email: int | str,
                         site_id_or_login_base: int | str) -> int:
    """Removes the specified person from the specified site. If the person is not a
    member of the specified site, no error is returned."""
    person = local_person(call, person_id_or_email)
    site = _site(call, site_id_or_login_base)
    pid, sid = person["person_id"], site["site_id"]
    was_primary = call.conn.scalar("SELECT is_primary FROM person_site WHERE person_id = ? "
                                   "AND site_id = ?", [pid, sid])
    call.delete("person_site", {"person_id": pid, "site_id": sid})
    if was_primary:
        rest = call.conn.query("SELECT site_id FROM person_site WHERE person_id = ? "
                               "ORDER BY site_id LIMIT 1", [pid])
        if rest:
            call.update("person_site", {"person_id": pid, "site_id": rest[0]["site_id"]},
                        {"is_primary": 1})
    call.log(f"Person {pid} deleted from site {sid}", Person=pid, Site=sid)
    return 1


@api_method(roles=ALL_PERSON_ROLES, accepts=[Auth(), id_or_name(Person), id_or_name(Site)],
            returns=Parameter(int, "1 if successful"))
def SetPersonPrimarySite(call: Call, auth: dict, person_id_or_email: int | str,
                         site_id_or_login_base: int | str) -> int:
    """Makes the specified site the person's primary site. The person must already be
    a member of the site. Non-admins may only update their own primary site."""
    person = local_person(call, person_id_or_email)
    if not call.is_admin and person["person_id"] != call.caller_id:
        raise PLCPermissionDenied("Not allowed to update specified account")
    site = _site(call, site_id_or_login_base)
    if site["site_id"] not in person["site_ids"]:
        raise PLCInvalidArgument("Not a member of the specified site")
    call.update("person_site", {"person_id": person["person_id"]}, {"is_primary": 0})
    call.update("person_site", {"person_id": person["person_id"], "site_id": site["site_id"]},
                {"is_primary": 1})
    return 1


def _role_change(call: Call, role_id_or_name: int | str, person_id_or_email: int | str,
                 grant: bool) -> int:
    role = call.one(Role, role_id_or_name, what="role")
    person = local_person(call, person_id_or_email)
    if not can_update(call, person):
        raise PLCPermissionDenied("Not allowed to update specified account")
    if not call.is_admin:
        own = min((r["role_id"] for r in call.conn.query(
            "SELECT role_id FROM person_role WHERE person_id = ?", [call.caller_id])),
            default=1000)
        if role["role_id"] <= own:
            text = f"Not allowed to {'grant' if grant else 'revoke'} that role"
            if grant:
                raise PLCInvalidArgument(text)
            raise PLCPermissionDenied(text)
    pid, rid = person["person_id"], role["role_id"]
    if grant and rid not in person["role_ids"]:
        call.insert("person_role", {"person_id": pid, "role_id": rid})
    elif not grant:
        call.delete("person_role", {"person_id": pid, "role_id": rid})
    verb = "added to" if grant else "deleted from"
    call.log(f"Role {rid} {verb} person {pid}", Person=pid, Role=rid)
    return 1


@api_method(roles=["admin", "pi"], accepts=[Auth(), id_or_name(Role), id_or_name(Person)],
            returns=Parameter(int, "1 if successful"))
def AddRoleToPerson(call: Call, auth: dict, role_id_or_name: int | str,
                    person_id_or_email: int | str) -> int:
    """Grants the specified role to the person. PIs can only grant the roles below
    their own (user, tech, node) to users of their sites; admins any role."""
    return _role_change(call, role_id_or_name, person_id_or_email, True)


@api_method(roles=["admin", "pi"], accepts=[Auth(), id_or_name(Role), id_or_name(Person)],
            returns=Parameter(int, "1 if successful"))
def DeleteRoleFromPerson(call: Call, auth: dict, role_id_or_name: int | str,
                         person_id_or_email: int | str) -> int:
    """Revokes the specified role from the person. PIs can only revoke the roles below
    their own from users of their sites; admins any role."""
    return _role_change(call, role_id_or_name, person_id_or_email, False)


@api_method(roles=ALL_ROLES, accepts=[Auth()], returns=Parameter([dict], "List of roles"))
def GetRoles(call: Call, auth: dict) -> list:
    """Get an array of structs containing details about all roles."""
    return call.get(Role)


