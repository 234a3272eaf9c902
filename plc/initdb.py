"""``plc init``: create the database and its seed data (spec 5.17, 9.2, 9.4)."""

from __future__ import annotations

import base64
import os
import re
import time

from plc.passwords import hash_password
from plc.store.base import Connection, Store
from plc.tagtypes import ACCESSORS, STANDARD_TAGS

ROLES = ((10, "admin"), (20, "pi"), (30, "user"), (40, "tech"), (50, "node"))
LOOKUP_SEED = {
    "key_types": ("key_type", ("ssh",)),
    "boot_states": ("boot_state", ("boot", "safeboot", "reinstall", "disabled", "failboot",
                                   "install", "upgrade")),
    "run_levels": ("run_level", ("boot", "safeboot", "failboot", "reinstall")),
    "node_types": ("node_type", ("regular", "reservable")),
    "network_types": ("type", ("ipv4",)),
    "network_methods": ("method", ("static", "dhcp", "proxy", "tap", "ipmi", "unknown")),
    "slice_instantiations": ("instantiation", ("not-instantiated", "plc-instantiated",
                                               "delegated", "nm-controller")),
}
SCHEMA_VERSION = "1"
MAINT_EMAIL = "maint@localhost.localdomain"
_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9._-]+\.[A-Za-z]+\Z")
_LOGIN_BASE = re.compile(r"^[a-z0-9.]+\Z")


class InitError(Exception):
    pass


def role_id(conn: Connection, name: str) -> int:
    return int(conn.scalar("SELECT role_id FROM roles WHERE name = ?", [name]))


def ensure_tag_type(conn: Connection, tagname: str, category: str, description: str,
                    roles: tuple[str, ...] | list[str]) -> int:
    """Create a tag type (or sync its category, description and roles); its id."""
    row = conn.query("SELECT tag_type_id FROM tag_types WHERE tagname = ?", [tagname])
    if row:
        ttid = int(row[0]["tag_type_id"])
        conn.update("tag_types", {"tag_type_id": ttid},
                    {"category": category, "description": description})
        conn.delete("tag_type_role", {"tag_type_id": ttid})
    else:
        ttid = conn.insert("tag_types", {"tagname": tagname, "category": category,
                                         "description": description})
    for r in dict.fromkeys(roles):
        conn.insert("tag_type_role", {"tag_type_id": ttid, "role_id": role_id(conn, r)})
    return ttid


def initialise(store: Store, admin_email: str, admin_password: str, slice_prefix: str,
               site_name: str = "PlanetLab Central", hrn_root: str = "plc") -> None:
    """Create schema and seed data in an empty database."""
    if not _EMAIL.match(admin_email):
        raise InitError(f"--admin-email {admin_email!r}: not an e-mail address")
    if not admin_password:
        raise InitError("--admin-password: must not be empty")
    if not _LOGIN_BASE.match(slice_prefix) or len(slice_prefix) > 32:
        raise InitError(f"--slice-prefix {slice_prefix!r}: only a-z, 0-9 and '.', at most 32")
    if store.exists():
        where = getattr(store, "path", None) or getattr(store, "url", None) or "the database"
        raise InitError(f"{where}: a PLC database is already there (plc init makes a new "
                        "one: keep it, or remove it or choose another --db)")
    store.create_schema()
    now = int(time.time())
    with store.transaction() as conn:
        conn.insert("plc_meta", {"name": "schema_version", "value": SCHEMA_VERSION})
        for rid, name in ROLES:
            conn.insert("roles", {"role_id": rid, "name": name})
        for table, (col, values) in LOOKUP_SEED.items():
            for v in values:
                conn.insert(table, {col: v})
        for name, desc in (("Personal", "Personal address"), ("Shipping", "Shipping address"),
                           ("Billing", "Billing address")):
            conn.insert("address_types", {"name": name, "description": desc})
        site_id = conn.insert("sites", {
            "login_base": slice_prefix, "name": site_name, "abbreviated_name": "PLC",
            "max_slices": 100, "date_created": now, "last_updated": now})
        maint = conn.insert("persons", {
            "email": MAINT_EMAIL, "first_name": "Maintenance", "last_name": "Account",
            "enabled": 1, "password": "nopass", "date_created": now, "last_updated": now})
        for rid in (10, 20, 30, 40):
            conn.insert("person_role", {"person_id": maint, "role_id": rid})
        admin = conn.insert("persons", {
            "email": admin_email.lower(), "first_name": "Default", "last_name": "Administrator",
            "enabled": 1, "password": hash_password(admin_password),
            "date_created": now, "last_updated": now})
        for rid in (10, 20):
            conn.insert("person_role", {"person_id": admin, "role_id": rid})
        conn.insert("person_site", {"person_id": admin, "site_id": site_id, "is_primary": 1})
        for acc in ACCESSORS:
            ensure_tag_type(conn, acc.tagname, acc.category, acc.description, acc.set_roles)
        for tagname, category, desc, roles in STANDARD_TAGS:
            ensure_tag_type(conn, tagname, category, desc, roles)
        hrn = conn.scalar("SELECT tag_type_id FROM tag_types WHERE tagname = 'hrn'")
        conn.insert("site_tag", {"site_id": site_id, "tag_type_id": hrn,
                                 "value": f"{hrn_root}.{slice_prefix}"})


def new_node_key() -> str:
    """32 random bytes, base64, '=' stripped (the legacy NODE_KEY form, spec 2.4)."""
    return base64.b64encode(os.urandom(32)).decode().rstrip("=")


def node_key(store: Store, hostname: str) -> str:
    """The node's hmac key, created if it has none."""
    with store.transaction() as conn:
        rows = conn.query("SELECT node_id, key FROM nodes WHERE hostname = ? AND deleted = 0",
                          [hostname.lower()])
        if not rows:
            raise InitError(f"no node with hostname {hostname!r}")
        key = rows[0]["key"]
        if not key:
            key = new_node_key()
            conn.update("nodes", {"node_id": rows[0]["node_id"]}, {"key": key})
        return key
