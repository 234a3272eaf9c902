"""Sites (spec 5.1, 6.3)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCInvalidArgument, PLCPermissionDenied
from plc.filters import FilterParam, ReturnFields
from plc.method import ALL_ROLES, api_method
from plc.methods._tags import set_tag
from plc.methods._util import accepted, id_or_name, require_keys, struct_of
from plc.model import Address, Person, Site
from plc.params import Parameter

if TYPE_CHECKING:
    from plc.api import Call

SITE_KEYS = ("name", "abbreviated_name", "login_base", "is_public", "latitude", "longitude",
             "url", "max_slices", "max_slivers", "enabled", "ext_consortium_id")
ADMIN_ONLY = ("max_slices", "max_slivers", "login_base")
LOGIN_BASE = re.compile(r"^[a-z0-9.]+\Z")
ADDRESS_KEYS = ("line1", "line2", "line3", "city", "state", "postalcode", "country")


def validate_site(call: Call, fields: dict[str, Any], site_id: int | None = None) -> None:
    for k in ("name", "abbreviated_name"):
        if k in fields and (not isinstance(fields[k], str) or not fields[k].strip()):
            raise PLCInvalidArgument(f"Site {k} must be specified")
    if "login_base" in fields:
        lb = fields["login_base"]
        if not LOGIN_BASE.match(lb):
            raise PLCInvalidArgument("Login base must consist only of lowercase ASCII "
                                     "letters, numbers or dots", "login_base")
        clash = call.conn.query("SELECT site_id FROM sites WHERE login_base = ? AND deleted = 0",
                                [lb])
        if any(r["site_id"] != site_id for r in clash):
            raise PLCInvalidArgument("login_base already in use", "login_base")
    lat = fields.get("latitude", ...)
    lon = fields.get("longitude", ...)
    if site_id is not None:
        row = call.conn.query("SELECT latitude, longitude FROM sites WHERE site_id = ?",
                              [site_id])[0]
        lat = row["latitude"] if lat is ... else lat
        lon = row["longitude"] if lon is ... else lon
    lat = None if lat is ... else lat
    lon = None if lon is ... else lon
    if (lat is None) != (lon is None):
        raise PLCInvalidArgument("latitude and longitude must be set together")


define_params = [Auth(), FilterParam(Site, scalars=True), ReturnFields()]


@api_method(roles=ALL_ROLES + ["anonymous"], accepts=define_params,
            returns=Parameter([dict], "List of sites"))
def GetSites(call: Call, auth: dict, site_filter: Any = None,
             return_fields: list | None = None) -> list:
    """Returns an array of structs containing details about sites. If site_filter is
    specified and is an array of site identifiers or hostnames, or a struct of site
    attributes, only sites matching the filter will be returned."""
    return call.get(Site, site_filter, return_fields)


@api_method(roles=["admin"], accepts=[Auth(), struct_of(Site, SITE_KEYS)],
            returns=Parameter(int, "New site_id (> 0) if successful"))
def AddSite(call: Call, auth: dict, site_fields: dict) -> int:
    """Adds a new site, and creates a node group for that site. Any fields specified in
    site_fields are used, otherwise defaults are used."""
    fields, _ = accepted(Site, site_fields, SITE_KEYS)
    require_keys(fields, ("name", "abbreviated_name", "login_base"), "Site")
    validate_site(call, fields)  # an upper-case login_base is refused, not lowercased
    for k in ("is_public", "enabled"):
        if k in fields:
            fields[k] = int(bool(fields[k]))
    site_id = call.insert("sites", {**fields, "date_created": call.now,
                                    "last_updated": call.now})
    set_tag(call, "Site", site_id, "hrn", f"{call.config.plc_hrn_root}.{fields['login_base']}")
    call.log(f"Site {site_id} created", Site=site_id)
    return site_id


def site_for_update(call: Call, site_id_or_login_base: int | str) -> dict[str, Any]:
    site = call.one(Site, site_id_or_login_base, ["site_id", "login_base", "peer_id",
                                                  "person_ids"], what="site")
    if site["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local site")
    if not call.is_admin and site["site_id"] not in call.caller_site_ids():
        raise PLCPermissionDenied("Not allowed to modify specified site")
    return site


@api_method(roles=["admin", "pi"],
            accepts=[Auth(), id_or_name(Site),
                     {**struct_of(Site, SITE_KEYS),
                      "persons": Parameter(list, "person ids or emails"),
                      "addresses": Parameter(list, "address ids or structs")}],
            returns=Parameter(int, "1 if successful"))
def UpdateSite(call: Call, auth: dict, site_id_or_login_base: int | str,
               site_fields: dict) -> int:
    """Updates a site. Only the fields specified in site_fields are updated. PIs may
    only update sites they belong to; only admins may change max_slices, max_slivers
    and login_base."""
    site = site_for_update(call, site_id_or_login_base)
    fields, _ = accepted(Site, site_fields, SITE_KEYS)
    if not call.is_admin:
        for k in ADMIN_ONLY:
            fields.pop(k, None)
    validate_site(call, fields, site["site_id"])
    for k in ("is_public", "enabled"):
        if k in fields:
            fields[k] = int(bool(fields[k]))
    call.update("sites", {"site_id": site["site_id"]}, {**fields, "last_updated": call.now})
    if "login_base" in fields and fields["login_base"] != site["login_base"]:
        set_tag(call, "Site", site["site_id"], "hrn",
                f"{call.config.plc_hrn_root}.{fields['login_base']}")
    if "persons" in site_fields:
        wanted = [call.one(Person, p, ["person_id"], what="person")["person_id"]
                  for p in site_fields["persons"]]
        current = site["person_ids"]
        for pid in wanted:
            if pid not in current:
                call.invoke("AddPersonToSite", pid, site["site_id"])
        for pid in current:
            if pid not in wanted:
                call.invoke("DeletePersonFromSite", pid, site["site_id"])
    if "addresses" in site_fields:
        for a in site_fields["addresses"]:
            if isinstance(a, dict):
                call.invoke("AddSiteAddress", site["site_id"], a)
    call.log(f"Site {site['site_id']} updated: {', '.join(sorted(fields)) or 'nothing'}",
             Site=site["site_id"])
    return 1


def delete_site_rows(call: Call, site_id: int) -> None:
    """The cascade of spec 5.1."""
    for r in call.conn.query(
            "SELECT person_id FROM person_site WHERE site_id = ? AND person_id NOT IN "
            "(SELECT person_id FROM person_site WHERE site_id <> ?)", [site_id, site_id]):
        from plc.methods.persons import delete_person_rows
        delete_person_rows(call, r["person_id"])
    for r in call.conn.query("SELECT address_id FROM site_address WHERE site_id = ?",
                             [site_id]):
        call.delete("address_address_type", {"address_id": r["address_id"]})
        call.delete("addresses", {"address_id": r["address_id"]})
    call.delete("site_address", {"site_id": site_id})
    from plc.methods.slices import delete_slice_rows
    for r in call.conn.query("SELECT slice_id FROM slices WHERE site_id = ? AND deleted = 0",
                             [site_id]):
        delete_slice_rows(call, r["slice_id"])
    for r in call.conn.query("SELECT pcu_id FROM pcus WHERE site_id = ?", [site_id]):
        call.delete("pcu_node", {"pcu_id": r["pcu_id"]})
        call.delete("pcus", {"pcu_id": r["pcu_id"]})
    from plc.methods.nodes import delete_node_rows
    for r in call.conn.query("SELECT node_id FROM nodes WHERE site_id = ? AND deleted = 0",
                             [site_id]):
        delete_node_rows(call, r["node_id"])
    call.delete("person_site", {"site_id": site_id})
    call.update("sites", {"site_id": site_id}, {"deleted": 1, "last_updated": call.now})


@api_method(roles=["admin"], accepts=[Auth(), id_or_name(Site)],
            returns=Parameter(int, "1 if successful"))
def DeleteSite(call: Call, auth: dict, site_id_or_login_base: int | str) -> int:
    """Mark an existing site as deleted. The accounts of people who are not members of
    at least one other non-deleted site are also deleted; nodes, PCUs, slices and
    addresses of the site are deleted."""
    site = call.one(Site, site_id_or_login_base, ["site_id", "peer_id"], what="site")
    if site["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local site")
    delete_site_rows(call, site["site_id"])
    call.log(f"Site {site['site_id']} deleted", Site=site["site_id"])
    return 1


@api_method(roles=["admin", "pi"],
            accepts=[Auth(), id_or_name(Site), struct_of(Address, ADDRESS_KEYS)],
            returns=Parameter(int, "New address_id (> 0) if successful"))
def AddSiteAddress(call: Call, auth: dict, site_id_or_login_base: int | str,
                   address_fields: dict) -> int:
    """Adds a new address to a site. PIs may only add addresses to their own sites."""
    site = site_for_update(call, site_id_or_login_base)
    fields, _ = accepted(Address, address_fields, ADDRESS_KEYS)
    require_keys(fields, ("line1", "city", "state", "postalcode", "country"), "Address")
    address_id = call.insert("addresses", fields)
    call.insert("site_address", {"site_id": site["site_id"], "address_id": address_id})
    call.log(f"Address {address_id} added to site {site['site_id']}",
             Site=site["site_id"], Address=address_id)
    return address_id
