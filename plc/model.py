"""The object classes of spec section 5: fields, their types and how they are read.

Each ``ObjClass`` names its table, primary key, secondary ("name") key, its fields and
the SQL expression of every field over the table aliased ``o``. Joined and computed
fields (``person_ids``, ``nodegroup_ids``...) are correlated subqueries returning JSON
arrays. Reading goes through ``plc.query.get``; filters (plc.filters) compile against
these expressions, so any field can be filtered, sorted and returned.

To add a class: declare its table in store/schema.sql, then an ``ObjClass`` here with
``register``; ``plc.query.get(conn, MyClass, filter, return_fields)`` then works, and
``FilterParam(MyClass)`` types the filter argument of its Get method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plc.params import Parameter

INT, STR, BOOL, FLOAT, INTS, STRS = "int", "str", "bool", "float", "ints", "strs"
_PY = {INT: int, STR: str, BOOL: bool, FLOAT: float, INTS: list, STRS: list}


@dataclass
class Field:
    name: str
    kind: str
    sql: str
    doc: str = ""
    max: int | None = None
    min: int | float | None = None
    nullok: bool = False
    ro: bool = False

    @property
    def param(self) -> Parameter:
        if self.kind == INTS:
            return Parameter([int], self.doc, ro=self.ro)
        if self.kind == STRS:
            return Parameter([str], self.doc, ro=self.ro)
        return Parameter(_PY[self.kind], self.doc, min=self.min, max=self.max,
                         nullok=self.nullok, ro=self.ro)

    @property
    def is_array(self) -> bool:
        return self.kind in (INTS, STRS)


@dataclass
class ObjClass:
    name: str              # "Node"
    table: str             # "nodes"
    pk: str                # "node_id"
    secondary: str | None  # "hostname"
    fields: dict[str, Field]
    live: str = "1 = 1"    # SQL condition of visible rows
    tag_table: str | None = None   # e.g. "node_tag" (exposed tags, spec 9.3)
    tags: tuple[str, ...] = ()     # exposed tag names
    lowercase_secondary: bool = False
    default_order: str = ""
    extra_from: str = ""

    def tag_sql(self, tagname: str) -> str:
        # tagname comes from the fixed list self.tags, never from a client
        assert tagname in self.tags and self.tag_table
        return (f"(SELECT t.value FROM {self.tag_table} t JOIN tag_types tt "
                f"ON tt.tag_type_id = t.tag_type_id WHERE t.{self.pk} = o.{self.pk} "
                f"AND tt.tagname = '{tagname}' ORDER BY t.{self.tag_table}_id LIMIT 1)")

    def column(self, name: str) -> Field | None:
        """The field called ``name``, exposed tags included (as strings)."""
        f = self.fields.get(name)
        if f is None and name in self.tags:
            f = Field(name, STR, self.tag_sql(name), nullok=True)
        return f

    def writable(self) -> list[str]:
        return [n for n, f in self.fields.items() if not f.ro and n != self.pk]


CLASSES: dict[str, ObjClass] = {}


def register(cls: ObjClass) -> ObjClass:
    CLASSES[cls.name] = cls
    return cls


def f(name: str, kind: str, sql: str | None = None, **kw: Any) -> Field:
    return Field(name, kind, sql or f"o.{name}", **kw)


def arr(sql: str) -> str:
    """A JSON array of the single column selected by ``sql``, in its order."""
    return f"(SELECT json_group_array(v) FROM ({sql}) AS sub)"


def ids(col: str, table: str, key: str, owner: str, extra: str = "", order: str = "") -> str:
    return arr(f"SELECT x.{col} AS v FROM {table} x WHERE x.{key} = o.{owner} {extra} "
               f"ORDER BY {order or 'x.' + col}")


def fs(*fields: Field) -> dict[str, Field]:
    return {x.name: x for x in fields}


def _tag_fields(owner_table: str, owner_pk: str, tag_pk: str, owner_name: tuple[str, str]) -> \
        list[Field]:
    oname, osql = owner_name
    return [
        f(tag_pk, INT, ro=True),
        f(owner_pk, INT),
        f(oname, STR, osql, ro=True),
        f("tag_type_id", INT),
        f("tagname", STR, "(SELECT tagname FROM tag_types tt WHERE tt.tag_type_id = o.tag_type_id)",
          ro=True),
        f("description", STR,
          "(SELECT description FROM tag_types tt WHERE tt.tag_type_id = o.tag_type_id)", ro=True),
        f("category", STR,
          "(SELECT category FROM tag_types tt WHERE tt.tag_type_id = o.tag_type_id)", ro=True),
        f("value", STR, nullok=True),
    ]


Site = register(ObjClass(
    "Site", "sites", "site_id", "login_base", fs(
        f("site_id", INT, ro=True),
        f("name", STR, max=254, min=1, doc="Full site name"),
        f("abbreviated_name", STR, max=50, min=1, doc="Abbreviated site name"),
        f("login_base", STR, max=32, min=1, doc="Site slice prefix"),
        f("is_public", BOOL, doc="Publicly viewable site"),
        f("enabled", BOOL, doc="Has been enabled"),
        f("latitude", FLOAT, min=-90.0, max=90.0, nullok=True, doc="Decimal latitude"),
        f("longitude", FLOAT, min=-180.0, max=180.0, nullok=True, doc="Decimal longitude"),
        f("url", STR, max=254, nullok=True, doc="URL of a page that describes the site"),
        f("max_slices", INT, doc="Maximum number of slices that the site is able to create"),
        f("max_slivers", INT, doc="Maximum number of slivers (never enforced)"),
        f("ext_consortium_id", INT, nullok=True, doc="external consortium id"),
        f("date_created", INT, ro=True),
        f("last_updated", INT, ro=True),
        f("person_ids", INTS, ids("person_id", "person_site", "site_id", "site_id"), ro=True),
        f("slice_ids", INTS, arr("SELECT s.slice_id AS v FROM slices s WHERE s.site_id = o.site_id"
                                 " AND s.deleted = 0 ORDER BY s.slice_id"), ro=True),
        f("address_ids", INTS, ids("address_id", "site_address", "site_id", "site_id"), ro=True),
        f("pcu_ids", INTS, ids("pcu_id", "pcus", "site_id", "site_id"), ro=True),
        f("node_ids", INTS, ids("node_id", "nodes", "site_id", "site_id", "AND x.deleted = 0"),
          ro=True),
        f("site_tag_ids", INTS, ids("site_tag_id", "site_tag", "site_id", "site_id"), ro=True),
        f("peer_id", INT, nullok=True, ro=True),
        f("peer_site_id", INT, nullok=True, ro=True),
    ), live="o.deleted = 0", tag_table="site_tag",
    tags=("hrn", "sfa_created", "disabled_registration"), lowercase_secondary=True))

Person = register(ObjClass(
    "Person", "persons", "person_id", "email", fs(
        f("person_id", INT, ro=True),
        f("first_name", STR, max=128, min=1, doc="Given name"),
        f("last_name", STR, max=128, min=1, doc="Surname"),
        f("title", STR, max=128, nullok=True, doc="Title"),
        f("email", STR, max=254, min=1, doc="Primary e-mail address"),
        f("phone", STR, max=64, nullok=True, doc="Telephone number"),
        f("url", STR, max=254, nullok=True, doc="Home page"),
        f("bio", STR, max=254, nullok=True, doc="Biography"),
        f("enabled", BOOL, doc="Has been enabled"),
        f("password", STR, max=254, doc="Account password"),
        f("verification_key", STR, max=254, nullok=True, ro=True),
        f("verification_expires", INT, nullok=True, ro=True),
        f("last_updated", INT, ro=True),
        f("date_created", INT, ro=True),
        f("role_ids", INTS, ids("role_id", "person_role", "person_id", "person_id"), ro=True),
        f("roles", STRS, arr("SELECT r.name AS v FROM person_role x JOIN roles r ON "
                             "r.role_id = x.role_id WHERE x.person_id = o.person_id "
                             "ORDER BY r.role_id"), ro=True),
        f("site_ids", INTS, ids("site_id", "person_site", "person_id", "person_id",
                                order="x.is_primary DESC, x.site_id"), ro=True),
        f("key_ids", INTS, arr("SELECT x.key_id AS v FROM person_key x JOIN keys k ON "
                               "k.key_id = x.key_id WHERE x.person_id = o.person_id AND "
                               "k.is_blacklisted = 0 ORDER BY x.key_id"), ro=True),
        f("slice_ids", INTS, arr("SELECT x.slice_id AS v FROM slice_person x JOIN slices s ON "
                                 "s.slice_id = x.slice_id WHERE x.person_id = o.person_id AND "
                                 "s.deleted = 0 ORDER BY x.slice_id"), ro=True),
        f("person_tag_ids", INTS, ids("person_tag_id", "person_tag", "person_id", "person_id"),
          ro=True),
        f("peer_id", INT, nullok=True, ro=True),
        f("peer_person_id", INT, nullok=True, ro=True),
    ), live="o.deleted = 0", tag_table="person_tag",
    tags=("hrn", "sfa_created", "columnconf", "showconf", "advanced"), lowercase_secondary=True))

Key = register(ObjClass(
    "Key", "keys", "key_id", None, fs(
        f("key_id", INT, ro=True),
        f("key_type", STR, max=20, doc="Key type"),
        f("key", STR, max=4096, doc="Key value"),
        f("person_id", INT, "(SELECT x.person_id FROM person_key x WHERE x.key_id = o.key_id)",
          nullok=True, ro=True),
        f("peer_id", INT, nullok=True, ro=True),
        f("peer_key_id", INT, nullok=True, ro=True),
    ), live="o.is_blacklisted = 0"))

Node = register(ObjClass(
    "Node", "nodes", "node_id", "hostname", fs(
        f("node_id", INT, ro=True),
        f("node_type", STR, max=20, doc="Node type"),
        f("hostname", STR, max=255, min=1, doc="Fully qualified hostname"),
        f("site_id", INT, doc="Site at which this node is located"),
        f("boot_state", STR, max=20, doc="Boot state"),
        f("run_level", STR, max=20, nullok=True, doc="Run level"),
        f("model", STR, max=255, nullok=True, doc="Make and model of the actual machine"),
        f("boot_nonce", STR, max=128, nullok=True, doc="(Admin only) Random value"),
        f("version", STR, max=64, nullok=True, doc="Apparent Boot CD version"),
        f("ssh_rsa_key", STR, max=1024, nullok=True, doc="Last known SSH host key"),
        f("key", STR, max=256, nullok=True, doc="(Admin only) Node key"),
        f("session", STR, "(SELECT x.session_id FROM node_session x WHERE x.node_id = o.node_id)",
          nullok=True, ro=True),
        f("verified", BOOL, doc="Whether the node configuration is verified correct"),
        f("date_created", INT, ro=True),
        f("last_updated", INT, ro=True),
        f("last_contact", INT, nullok=True, ro=True),
        f("last_boot", INT, nullok=True, ro=True),
        f("last_download", INT, nullok=True, ro=True),
        f("last_pcu_reboot", INT, nullok=True, ro=True),
        f("last_pcu_confirmation", INT, nullok=True, ro=True),
        f("last_time_spent_online", INT, nullok=True, ro=True),
        f("last_time_spent_offline", INT, nullok=True, ro=True),
        f("interface_ids", INTS, ids("interface_id", "interfaces", "node_id", "node_id",
                                     order="x.is_primary DESC, x.interface_id"), ro=True),
        f("conf_file_ids", INTS, ids("conf_file_id", "conf_file_node", "node_id", "node_id"),
          ro=True),
        f("slice_ids", INTS, arr("SELECT x.slice_id AS v FROM slice_node x JOIN slices s ON "
                                 "s.slice_id = x.slice_id WHERE x.node_id = o.node_id AND "
                                 "s.deleted = 0 ORDER BY x.slice_id"), ro=True),
        f("slice_ids_whitelist", INTS, ids("slice_id", "node_slice_whitelist", "node_id",
                                           "node_id"), ro=True),
        f("pcu_ids", INTS, ids("pcu_id", "pcu_node", "node_id", "node_id"), ro=True),
        f("ports", INTS, arr("SELECT x.port AS v FROM pcu_node x WHERE x.node_id = o.node_id "
                             "ORDER BY x.pcu_id"), ro=True),
        f("node_tag_ids", INTS, ids("node_tag_id", "node_tag", "node_id", "node_id"), ro=True),
        f("nodegroup_ids", INTS, arr(
            "SELECT g.nodegroup_id AS v FROM nodegroups g JOIN node_tag t ON "
            "t.tag_type_id = g.tag_type_id AND t.value = g.value WHERE t.node_id = o.node_id "
            "ORDER BY g.nodegroup_id"), ro=True),
        f("peer_id", INT, nullok=True, ro=True),
        f("peer_node_id", INT, nullok=True, ro=True),
    ), live="o.deleted = 0", tag_table="node_tag",
    tags=("arch", "pldistro", "fcdistro", "virt", "deployment", "extensions", "hrn"),
    lowercase_secondary=True))

Interface = register(ObjClass(
    "Interface", "interfaces", "interface_id", "ip", fs(
        f("interface_id", INT, ro=True),
        f("node_id", INT, doc="Node associated with this interface"),
        f("is_primary", BOOL, doc="Is the primary interface for this node"),
        f("type", STR, max=20, doc="Address type (e.g., 'ipv4')"),
        f("method", STR, max=20, doc="Addressing method (e.g., 'static' or 'dhcp')"),
        f("ip", STR, max=254, nullok=True, doc="IP address"),
        f("mac", STR, max=17, nullok=True, doc="MAC address"),
        f("gateway", STR, max=254, nullok=True, doc="IP address of primary gateway"),
        f("network", STR, max=254, nullok=True, doc="Subnet address"),
        f("broadcast", STR, max=254, nullok=True, doc="Network broadcast address"),
        f("netmask", STR, max=254, nullok=True, doc="Subnet mask"),
        f("dns1", STR, max=254, nullok=True, doc="IP address of primary DNS server"),
        f("dns2", STR, max=254, nullok=True, doc="IP address of secondary DNS server"),
        f("bwlimit", INT, min=0, nullok=True, doc="Bandwidth limit"),
        f("hostname", STR, max=255, nullok=True, doc="(Optional) Hostname"),
        f("interface_tag_ids", INTS, ids("interface_tag_id", "interface_tag", "interface_id",
                                         "interface_id"), ro=True),
        f("last_updated", INT, nullok=True, ro=True),
    ), tag_table="interface_tag", tags=("ifname",)))

Slice = register(ObjClass(
    "Slice", "slices", "slice_id", "name", fs(
        f("slice_id", INT, ro=True),
        f("site_id", INT, ro=True, doc="Identifier of the site to which this slice belongs"),
        f("name", STR, max=64, min=1, doc="Slice name"),
        f("instantiation", STR, max=64, doc="Slice instantiation state"),
        f("url", STR, max=254, nullok=True, doc="URL further describing this slice"),
        f("description", STR, max=2048, nullok=True, doc="Slice description"),
        f("max_nodes", INT, doc="Maximum number of nodes that can be assigned to this slice"),
        f("creator_person_id", INT, nullok=True, ro=True),
        f("created", INT, ro=True),
        f("expires", INT, doc="Date and time when slice expires, in seconds since UNIX epoch"),
        f("node_ids", INTS, arr("SELECT x.node_id AS v FROM slice_node x JOIN nodes n ON "
                                "n.node_id = x.node_id WHERE x.slice_id = o.slice_id AND "
                                "n.deleted = 0 ORDER BY x.node_id"), ro=True),
        f("person_ids", INTS, arr("SELECT x.person_id AS v FROM slice_person x JOIN persons p ON "
                                  "p.person_id = x.person_id WHERE x.slice_id = o.slice_id AND "
                                  "p.deleted = 0 ORDER BY x.person_id"), ro=True),
        f("slice_tag_ids", INTS, ids("slice_tag_id", "slice_tag", "slice_id", "slice_id"),
          ro=True),
        f("peer_id", INT, nullok=True, ro=True),
        f("peer_slice_id", INT, nullok=True, ro=True),
    ), live="o.deleted = 0 AND o.expires > CAST(strftime('%s', 'now') AS INTEGER)",
    tag_table="slice_tag",
    tags=("vref", "initscript", "initscript_code", "arch", "pldistro", "fcdistro", "hrn",
          "sfa_created", "omf_control", "enable_hmac", "ipv6_address")))

SliceTag = register(ObjClass(
    "SliceTag", "slice_tag", "slice_tag_id", None, fs(
        f("slice_tag_id", INT, ro=True),
        f("slice_id", INT),
        f("name", STR, "(SELECT s.name FROM slices s WHERE s.slice_id = o.slice_id)", ro=True),
        f("node_id", INT, nullok=True),
        f("nodegroup_id", INT, nullok=True),
        f("tag_type_id", INT),
        f("tagname", STR, "(SELECT tagname FROM tag_types tt WHERE tt.tag_type_id = o.tag_type_id)",
          ro=True),
        f("description", STR,
          "(SELECT description FROM tag_types tt WHERE tt.tag_type_id = o.tag_type_id)", ro=True),
        f("category", STR,
          "(SELECT category FROM tag_types tt WHERE tt.tag_type_id = o.tag_type_id)", ro=True),
        f("value", STR, nullok=True),
    ), live="EXISTS (SELECT 1 FROM slices s WHERE s.slice_id = o.slice_id AND s.deleted = 0)"))

NodeTag = register(ObjClass("NodeTag", "node_tag", "node_tag_id", None, fs(*_tag_fields(
    "nodes", "node_id", "node_tag_id",
    ("hostname", "(SELECT n.hostname FROM nodes n WHERE n.node_id = o.node_id)")))))
SiteTag = register(ObjClass("SiteTag", "site_tag", "site_tag_id", None, fs(*_tag_fields(
    "sites", "site_id", "site_tag_id",
    ("login_base", "(SELECT s.login_base FROM sites s WHERE s.site_id = o.site_id)")))))
PersonTag = register(ObjClass("PersonTag", "person_tag", "person_tag_id", None, fs(*_tag_fields(
    "persons", "person_id", "person_tag_id",
    ("email", "(SELECT p.email FROM persons p WHERE p.person_id = o.person_id)")))))
InterfaceTag = register(ObjClass("InterfaceTag", "interface_tag", "interface_tag_id", None, fs(
    *_tag_fields("interfaces", "interface_id", "interface_tag_id",
                 ("ip", "(SELECT i.ip FROM interfaces i WHERE i.interface_id = o.interface_id)")))))

TagType = register(ObjClass(
    "TagType", "tag_types", "tag_type_id", "tagname", fs(
        f("tag_type_id", INT, ro=True),
        f("tagname", STR, max=100, min=1, doc="Node tag type name"),
        f("description", STR, max=254, nullok=True, doc="Node tag type description"),
        f("category", STR, max=64, doc="Node tag type category"),
        f("role_ids", INTS, ids("role_id", "tag_type_role", "tag_type_id", "tag_type_id"),
          ro=True),
        f("roles", STRS, arr("SELECT r.name AS v FROM tag_type_role x JOIN roles r ON "
                             "r.role_id = x.role_id WHERE x.tag_type_id = o.tag_type_id "
                             "ORDER BY r.role_id"), ro=True),
    )))

Role = register(ObjClass("Role", "roles", "role_id", "name", fs(
    f("role_id", INT, doc="Role identifier"),
    f("name", STR, max=100, doc="Role"))))

NodeGroup = register(ObjClass(
    "NodeGroup", "nodegroups", "nodegroup_id", "groupname", fs(
        f("nodegroup_id", INT, ro=True),
        f("groupname", STR, max=50, min=1, doc="Node group name"),
        f("tag_type_id", INT),
        f("value", STR, doc="value that the nodegroup definition is based upon"),
        f("tagname", STR, "(SELECT tagname FROM tag_types tt WHERE tt.tag_type_id = o.tag_type_id)",
          ro=True),
        f("conf_file_ids", INTS, ids("conf_file_id", "conf_file_nodegroup", "nodegroup_id",
                                     "nodegroup_id"), ro=True),
        f("node_ids", INTS, arr(
            "SELECT t.node_id AS v FROM node_tag t JOIN nodes n ON n.node_id = t.node_id "
            "WHERE t.tag_type_id = o.tag_type_id AND t.value = o.value AND n.deleted = 0 "
            "ORDER BY t.node_id"), ro=True),
    )))

Lease = register(ObjClass(
    "Lease", "leases", "lease_id", None, fs(
        f("lease_id", INT, ro=True),
        f("t_from", INT, doc="continuous interval start, rounded up"),
        f("t_until", INT, doc="continuous interval end, rounded down"),
        f("node_id", INT),
        f("slice_id", INT),
        f("hostname", STR, "(SELECT n.hostname FROM nodes n WHERE n.node_id = o.node_id)",
          ro=True),
        f("node_type", STR, "(SELECT n.node_type FROM nodes n WHERE n.node_id = o.node_id)",
          ro=True),
        f("name", STR, "(SELECT s.name FROM slices s WHERE s.slice_id = o.slice_id)", ro=True),
        f("site_id", INT, "(SELECT s.site_id FROM slices s WHERE s.slice_id = o.slice_id)",
          ro=True),
        f("duration", INT, "(o.t_until - o.t_from)", ro=True),
        f("expired", BOOL, "(o.t_until < CAST(strftime('%s', 'now') AS INTEGER))", ro=True),
    ), live="EXISTS (SELECT 1 FROM nodes n WHERE n.node_id = o.node_id AND "
            "n.node_type = 'reservable' AND n.deleted = 0)"))

Session = register(ObjClass(
    "Session", "sessions", "session_id", None, fs(
        f("session_id", STR, ro=True),
        f("person_id", INT, "(SELECT x.person_id FROM person_session x "
                            "WHERE x.session_id = o.session_id)", nullok=True, ro=True),
        f("node_id", INT, "(SELECT x.node_id FROM node_session x "
                          "WHERE x.session_id = o.session_id)", nullok=True, ro=True),
        f("expires", INT, nullok=True),
    )))

ConfFile = register(ObjClass(
    "ConfFile", "conf_files", "conf_file_id", None, fs(
        f("conf_file_id", INT, ro=True),
        f("enabled", BOOL, doc="Configuration file is active"),
        f("source", STR, max=255, doc="Relative path on the boot server"),
        f("dest", STR, max=255, doc="Absolute path on node"),
        f("file_permissions", STR, max=20, doc="chmod(1) permissions"),
        f("file_owner", STR, max=50, doc="chown(1) owner"),
        f("file_group", STR, max=50, doc="chgrp(1) owner"),
        f("preinstall_cmd", STR, max=1024, nullok=True),
        f("postinstall_cmd", STR, max=1024, nullok=True),
        f("error_cmd", STR, max=1024, nullok=True),
        f("ignore_cmd_errors", BOOL),
        f("always_update", BOOL),
        f("node_ids", INTS, ids("node_id", "conf_file_node", "conf_file_id", "conf_file_id"),
          ro=True),
        f("nodegroup_ids", INTS, ids("nodegroup_id", "conf_file_nodegroup", "conf_file_id",
                                     "conf_file_id"), ro=True),
    )))

InitScript = register(ObjClass(
    "InitScript", "initscripts", "initscript_id", "name", fs(
        f("initscript_id", INT, ro=True),
        f("name", STR, max=254, min=1),
        f("enabled", BOOL),
        f("script", STR),
    )))

PCU = register(ObjClass(
    "PCU", "pcus", "pcu_id", None, fs(
        f("pcu_id", INT, ro=True),
        f("site_id", INT),
        f("hostname", STR, max=254, nullok=True),
        f("ip", STR, max=254),
        f("protocol", STR, max=16, nullok=True),
        f("username", STR, max=254, nullok=True),
        f("password", STR, max=254, nullok=True),
        f("notes", STR, max=254, nullok=True),
        f("model", STR, max=32, nullok=True),
        f("node_ids", INTS, ids("node_id", "pcu_node", "pcu_id", "pcu_id", order="x.node_id"),
          ro=True),
        f("ports", INTS, ids("port", "pcu_node", "pcu_id", "pcu_id", order="x.node_id"), ro=True),
        f("last_updated", INT, nullok=True, ro=True),
    )))

PCUType = register(ObjClass(
    "PCUType", "pcu_types", "pcu_type_id", "model", fs(
        f("pcu_type_id", INT, ro=True),
        f("model", STR, max=254),
        f("name", STR, max=254, nullok=True),
        f("pcu_protocol_type_ids", INTS, ids("pcu_protocol_type_id", "pcu_protocol_types",
                                             "pcu_type_id", "pcu_type_id"), ro=True),
    )))

PCUProtocolType = register(ObjClass(
    "PCUProtocolType", "pcu_protocol_types", "pcu_protocol_type_id", None, fs(
        f("pcu_protocol_type_id", INT, ro=True),
        f("pcu_type_id", INT),
        f("port", INT),
        f("protocol", STR, max=254),
        f("supported", BOOL),
    )))

Address = register(ObjClass(
    "Address", "addresses", "address_id", None, fs(
        f("address_id", INT, ro=True),
        f("line1", STR, max=254), f("line2", STR, max=254, nullok=True),
        f("line3", STR, max=254, nullok=True),
        f("city", STR, max=254), f("state", STR, max=254), f("postalcode", STR, max=64),
        f("country", STR, max=128),
        f("address_type_ids", INTS, ids("address_type_id", "address_address_type", "address_id",
                                        "address_id"), ro=True),
        f("address_types", STRS, arr(
            "SELECT t.name AS v FROM address_address_type x JOIN address_types t ON "
            "t.address_type_id = x.address_type_id WHERE x.address_id = o.address_id "
            "ORDER BY x.address_type_id"), ro=True),
    )))

AddressType = register(ObjClass(
    "AddressType", "address_types", "address_type_id", "name", fs(
        f("address_type_id", INT, ro=True),
        f("name", STR, max=20),
        f("description", STR, max=254, nullok=True),
    )))

Message = register(ObjClass(
    "Message", "messages", "message_id", None, fs(
        f("message_id", STR, max=255),
        f("subject", STR, max=255, nullok=True),
        f("template", STR, nullok=True),
        f("enabled", BOOL),
    )))

Ilink = register(ObjClass(
    "Ilink", "ilinks", "ilink_id", None, fs(
        f("ilink_id", INT, ro=True),
        f("tag_type_id", INT),
        f("src_interface_id", INT),
        f("dst_interface_id", INT),
        f("value", STR, nullok=True),
    )))

Peer = register(ObjClass(
    "Peer", "peers", "peer_id", "peername", fs(
        f("peer_id", INT, ro=True),
        f("peername", STR, max=255),
        f("peer_url", STR, max=255),
        f("key", STR, nullok=True),
        f("cacert", STR, nullok=True),
        f("shortname", STR, max=255, nullok=True),
        f("hrn_root", STR, max=255, nullok=True),
        f("site_ids", INTS, ids("site_id", "sites", "peer_id", "peer_id"), ro=True),
        f("person_ids", INTS, ids("person_id", "persons", "peer_id", "peer_id"), ro=True),
        f("key_ids", INTS, ids("key_id", "keys", "peer_id", "peer_id"), ro=True),
        f("node_ids", INTS, ids("node_id", "nodes", "peer_id", "peer_id"), ro=True),
        f("slice_ids", INTS, ids("slice_id", "slices", "peer_id", "peer_id"), ro=True),
    ), live="o.deleted = 0"))

Event = register(ObjClass(
    "Event", "events", "event_id", None, fs(
        f("event_id", INT, ro=True),
        f("person_id", INT, nullok=True),
        f("node_id", INT, nullok=True),
        f("auth_type", STR, nullok=True),
        f("fault_code", INT),
        f("call_name", STR),
        f("call", STR, nullok=True),
        f("message", STR, nullok=True),
        f("runtime", FLOAT, nullok=True),
        f("time", INT),
        f("object_ids", INTS, ids("object_id", "event_object", "event_id", "event_id",
                                  order="x.rowid"), ro=True),
        f("object_types", STRS, ids("object_type", "event_object", "event_id", "event_id",
                                    order="x.rowid"), ro=True),
    )))

EventObject = register(ObjClass(
    "EventObject", "event_object", "event_id", None, fs(
        f("event_id", INT),
        f("person_id", INT, "e.person_id", nullok=True),
        f("node_id", INT, "e.node_id", nullok=True),
        f("fault_code", INT, "e.fault_code"),
        f("call_name", STR, "e.call_name"),
        f("call", STR, "e.call", nullok=True),
        f("message", STR, "e.message", nullok=True),
        f("runtime", FLOAT, "e.runtime", nullok=True),
        f("time", INT, "e.time"),
        f("object_id", INT),
        f("object_type", STR),
    ), extra_from="JOIN events e ON e.event_id = o.event_id"))

#: lookup tables whose value is the primary key (GetNodeTypes...)
LOOKUPS = {
    "key_types": "key_type", "boot_states": "boot_state", "run_levels": "run_level",
    "node_types": "node_type", "network_types": "type", "network_methods": "method",
    "slice_instantiations": "instantiation",
}
