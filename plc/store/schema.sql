-- PLC object model (spec section 5), SQLite dialect.
-- Timestamps are INTEGER seconds since the epoch (UTC); booleans are 0/1.
-- Soft-deleted objects keep their rows with deleted = 1; names must be unique only
-- among live rows, which the API checks (spec 5.16), so there are plain indexes.

CREATE TABLE IF NOT EXISTS plc_meta (name TEXT PRIMARY KEY, value TEXT);

CREATE TABLE roles (role_id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE key_types (key_type TEXT PRIMARY KEY);
CREATE TABLE boot_states (boot_state TEXT PRIMARY KEY);
CREATE TABLE run_levels (run_level TEXT PRIMARY KEY);
CREATE TABLE node_types (node_type TEXT PRIMARY KEY);
CREATE TABLE network_types (type TEXT PRIMARY KEY);
CREATE TABLE network_methods (method TEXT PRIMARY KEY);
CREATE TABLE slice_instantiations (instantiation TEXT PRIMARY KEY);

CREATE TABLE peers (
    peer_id INTEGER PRIMARY KEY AUTOINCREMENT,
    peername TEXT NOT NULL, peer_url TEXT NOT NULL, key TEXT, cacert TEXT,
    shortname TEXT, hrn_root TEXT, deleted INTEGER NOT NULL DEFAULT 0);

CREATE TABLE sites (
    site_id INTEGER PRIMARY KEY AUTOINCREMENT,
    login_base TEXT NOT NULL, name TEXT NOT NULL, abbreviated_name TEXT NOT NULL,
    is_public INTEGER NOT NULL DEFAULT 1, enabled INTEGER NOT NULL DEFAULT 1,
    latitude REAL, longitude REAL, url TEXT,
    max_slices INTEGER NOT NULL DEFAULT 0, max_slivers INTEGER NOT NULL DEFAULT 1000,
    ext_consortium_id INTEGER,
    date_created INTEGER NOT NULL, last_updated INTEGER NOT NULL,
    peer_id INTEGER REFERENCES peers, peer_site_id INTEGER,
    deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX sites_login_base ON sites (login_base);

CREATE TABLE persons (
    person_id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL, first_name TEXT NOT NULL, last_name TEXT NOT NULL,
    title TEXT, phone TEXT, url TEXT, bio TEXT,
    enabled INTEGER NOT NULL DEFAULT 0, password TEXT NOT NULL DEFAULT 'nopass',
    verification_key TEXT, verification_expires INTEGER,
    date_created INTEGER NOT NULL, last_updated INTEGER NOT NULL,
    peer_id INTEGER REFERENCES peers, peer_person_id INTEGER,
    deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX persons_email ON persons (email);

CREATE TABLE person_site (
    person_id INTEGER NOT NULL REFERENCES persons, site_id INTEGER NOT NULL REFERENCES sites,
    is_primary INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (person_id, site_id));
CREATE INDEX person_site_site ON person_site (site_id);
CREATE TABLE person_role (
    person_id INTEGER NOT NULL REFERENCES persons, role_id INTEGER NOT NULL REFERENCES roles,
    PRIMARY KEY (person_id, role_id));

CREATE TABLE keys (
    key_id INTEGER PRIMARY KEY AUTOINCREMENT,
    key_type TEXT NOT NULL REFERENCES key_types, key TEXT NOT NULL,
    is_blacklisted INTEGER NOT NULL DEFAULT 0,
    peer_id INTEGER REFERENCES peers, peer_key_id INTEGER);
CREATE TABLE person_key (
    person_id INTEGER NOT NULL REFERENCES persons, key_id INTEGER PRIMARY KEY REFERENCES keys);
CREATE INDEX person_key_person ON person_key (person_id);

CREATE TABLE nodes (
    node_id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_type TEXT NOT NULL DEFAULT 'regular' REFERENCES node_types,
    hostname TEXT NOT NULL, site_id INTEGER NOT NULL REFERENCES sites,
    boot_state TEXT NOT NULL DEFAULT 'reinstall' REFERENCES boot_states,
    run_level TEXT REFERENCES run_levels,
    model TEXT, boot_nonce TEXT, version TEXT, ssh_rsa_key TEXT, key TEXT,
    verified INTEGER NOT NULL DEFAULT 0,
    date_created INTEGER NOT NULL, last_updated INTEGER NOT NULL,
    last_contact INTEGER, last_boot INTEGER, last_download INTEGER,
    last_pcu_reboot INTEGER, last_pcu_confirmation INTEGER,
    last_time_spent_online INTEGER, last_time_spent_offline INTEGER,
    peer_id INTEGER REFERENCES peers, peer_node_id INTEGER,
    deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX nodes_hostname ON nodes (hostname);
CREATE INDEX nodes_site ON nodes (site_id);

CREATE TABLE interfaces (
    interface_id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id INTEGER NOT NULL REFERENCES nodes,
    is_primary INTEGER NOT NULL DEFAULT 0,
    type TEXT NOT NULL REFERENCES network_types, method TEXT NOT NULL REFERENCES network_methods,
    ip TEXT, mac TEXT, gateway TEXT, network TEXT, broadcast TEXT, netmask TEXT,
    dns1 TEXT, dns2 TEXT, bwlimit INTEGER, hostname TEXT,
    last_updated INTEGER);
CREATE INDEX interfaces_node ON interfaces (node_id);

CREATE TABLE slices (
    slice_id INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id INTEGER NOT NULL REFERENCES sites, name TEXT NOT NULL,
    instantiation TEXT NOT NULL DEFAULT 'plc-instantiated' REFERENCES slice_instantiations,
    url TEXT, description TEXT, max_nodes INTEGER NOT NULL DEFAULT 100,
    creator_person_id INTEGER REFERENCES persons,
    created INTEGER NOT NULL, expires INTEGER NOT NULL,
    peer_id INTEGER REFERENCES peers, peer_slice_id INTEGER,
    deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX slices_name ON slices (name);
CREATE INDEX slices_site ON slices (site_id);

CREATE TABLE slice_node (
    slice_id INTEGER NOT NULL REFERENCES slices, node_id INTEGER NOT NULL REFERENCES nodes,
    PRIMARY KEY (slice_id, node_id));
-- slice_node by node: slice_node_node_slice in indexes.sql
CREATE TABLE slice_person (
    slice_id INTEGER NOT NULL REFERENCES slices, person_id INTEGER NOT NULL REFERENCES persons,
    PRIMARY KEY (slice_id, person_id));
CREATE INDEX slice_person_person ON slice_person (person_id);
CREATE TABLE node_slice_whitelist (
    node_id INTEGER NOT NULL REFERENCES nodes, slice_id INTEGER NOT NULL REFERENCES slices,
    PRIMARY KEY (node_id, slice_id));

CREATE TABLE tag_types (
    tag_type_id INTEGER PRIMARY KEY AUTOINCREMENT,
    tagname TEXT NOT NULL UNIQUE, description TEXT, category TEXT NOT NULL DEFAULT 'general');
CREATE TABLE tag_type_role (
    tag_type_id INTEGER NOT NULL REFERENCES tag_types, role_id INTEGER NOT NULL REFERENCES roles,
    PRIMARY KEY (tag_type_id, role_id));

CREATE TABLE nodegroups (
    nodegroup_id INTEGER PRIMARY KEY AUTOINCREMENT,
    groupname TEXT NOT NULL UNIQUE, tag_type_id INTEGER NOT NULL REFERENCES tag_types,
    value TEXT NOT NULL);

CREATE TABLE slice_tag (
    slice_tag_id INTEGER PRIMARY KEY AUTOINCREMENT,
    slice_id INTEGER NOT NULL REFERENCES slices, tag_type_id INTEGER NOT NULL REFERENCES tag_types,
    value TEXT, node_id INTEGER REFERENCES nodes, nodegroup_id INTEGER REFERENCES nodegroups);
CREATE INDEX slice_tag_slice ON slice_tag (slice_id);
CREATE INDEX slice_tag_type ON slice_tag (tag_type_id);
CREATE TABLE node_tag (
    node_tag_id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id INTEGER NOT NULL REFERENCES nodes, tag_type_id INTEGER NOT NULL REFERENCES tag_types,
    value TEXT);
CREATE INDEX node_tag_node ON node_tag (node_id);
CREATE INDEX node_tag_type ON node_tag (tag_type_id, value);
CREATE TABLE site_tag (
    site_tag_id INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id INTEGER NOT NULL REFERENCES sites, tag_type_id INTEGER NOT NULL REFERENCES tag_types,
    value TEXT);
CREATE INDEX site_tag_site ON site_tag (site_id);
CREATE TABLE person_tag (
    person_tag_id INTEGER PRIMARY KEY AUTOINCREMENT,
    person_id INTEGER NOT NULL REFERENCES persons, tag_type_id INTEGER NOT NULL REFERENCES tag_types,
    value TEXT);
CREATE INDEX person_tag_person ON person_tag (person_id);
CREATE TABLE interface_tag (
    interface_tag_id INTEGER PRIMARY KEY AUTOINCREMENT,
    interface_id INTEGER NOT NULL REFERENCES interfaces,
    tag_type_id INTEGER NOT NULL REFERENCES tag_types, value TEXT);
CREATE INDEX interface_tag_interface ON interface_tag (interface_id);

CREATE TABLE ilinks (
    ilink_id INTEGER PRIMARY KEY AUTOINCREMENT,
    tag_type_id INTEGER NOT NULL REFERENCES tag_types,
    src_interface_id INTEGER NOT NULL REFERENCES interfaces,
    dst_interface_id INTEGER NOT NULL REFERENCES interfaces, value TEXT);

CREATE TABLE conf_files (
    conf_file_id INTEGER PRIMARY KEY AUTOINCREMENT,
    enabled INTEGER NOT NULL DEFAULT 1, source TEXT NOT NULL, dest TEXT NOT NULL,
    file_permissions TEXT NOT NULL DEFAULT '0644', file_owner TEXT NOT NULL DEFAULT 'root',
    file_group TEXT NOT NULL DEFAULT 'root', preinstall_cmd TEXT, postinstall_cmd TEXT,
    error_cmd TEXT, ignore_cmd_errors INTEGER NOT NULL DEFAULT 0,
    always_update INTEGER NOT NULL DEFAULT 0);
CREATE TABLE conf_file_node (
    conf_file_id INTEGER NOT NULL REFERENCES conf_files, node_id INTEGER NOT NULL REFERENCES nodes,
    PRIMARY KEY (conf_file_id, node_id));
CREATE TABLE conf_file_nodegroup (
    conf_file_id INTEGER NOT NULL REFERENCES conf_files,
    nodegroup_id INTEGER NOT NULL REFERENCES nodegroups,
    PRIMARY KEY (conf_file_id, nodegroup_id));

CREATE TABLE initscripts (
    initscript_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE, enabled INTEGER NOT NULL DEFAULT 1, script TEXT NOT NULL);

CREATE TABLE leases (
    lease_id INTEGER PRIMARY KEY AUTOINCREMENT,
    t_from INTEGER NOT NULL, t_until INTEGER NOT NULL,
    node_id INTEGER NOT NULL REFERENCES nodes, slice_id INTEGER NOT NULL REFERENCES slices,
    CHECK (t_until > t_from));
CREATE INDEX leases_node ON leases (node_id, t_until);
-- No two non-expired leases of one node overlap (legacy trigger, spec 5.12).
CREATE TRIGGER leases_no_overlap_insert BEFORE INSERT ON leases
WHEN EXISTS (SELECT 1 FROM leases l WHERE l.node_id = NEW.node_id
             AND l.t_until >= CAST(strftime('%s', 'now') AS INTEGER)
             AND l.t_from < NEW.t_until AND NEW.t_from < l.t_until)
BEGIN SELECT RAISE(ABORT, 'lease overlaps an existing lease'); END;
CREATE TRIGGER leases_no_overlap_update BEFORE UPDATE OF t_from, t_until ON leases
WHEN EXISTS (SELECT 1 FROM leases l WHERE l.node_id = NEW.node_id AND l.lease_id <> NEW.lease_id
             AND l.t_until >= CAST(strftime('%s', 'now') AS INTEGER)
             AND l.t_from < NEW.t_until AND NEW.t_from < l.t_until)
BEGIN SELECT RAISE(ABORT, 'lease overlaps an existing lease'); END;

CREATE TABLE sessions (session_id TEXT PRIMARY KEY, expires INTEGER);
CREATE TABLE person_session (
    person_id INTEGER NOT NULL REFERENCES persons, session_id TEXT NOT NULL UNIQUE REFERENCES sessions,
    PRIMARY KEY (person_id, session_id));
CREATE TABLE node_session (
    node_id INTEGER NOT NULL UNIQUE REFERENCES nodes, session_id TEXT NOT NULL UNIQUE REFERENCES sessions);

CREATE TABLE pcu_types (
    pcu_type_id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, name TEXT);
CREATE TABLE pcu_protocol_types (
    pcu_protocol_type_id INTEGER PRIMARY KEY AUTOINCREMENT,
    pcu_type_id INTEGER NOT NULL REFERENCES pcu_types, port INTEGER NOT NULL,
    protocol TEXT NOT NULL, supported INTEGER NOT NULL DEFAULT 1);
CREATE TABLE pcus (
    pcu_id INTEGER PRIMARY KEY AUTOINCREMENT, site_id INTEGER NOT NULL REFERENCES sites,
    hostname TEXT, ip TEXT NOT NULL, protocol TEXT, username TEXT, password TEXT,
    notes TEXT, model TEXT, last_updated INTEGER);
CREATE TABLE pcu_node (
    pcu_id INTEGER NOT NULL REFERENCES pcus, node_id INTEGER NOT NULL REFERENCES nodes,
    port INTEGER NOT NULL, PRIMARY KEY (pcu_id, node_id), UNIQUE (pcu_id, port));

CREATE TABLE address_types (
    address_type_id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, description TEXT);
CREATE TABLE addresses (
    address_id INTEGER PRIMARY KEY AUTOINCREMENT,
    line1 TEXT NOT NULL, line2 TEXT, line3 TEXT, city TEXT NOT NULL, state TEXT NOT NULL,
    postalcode TEXT NOT NULL, country TEXT NOT NULL);
CREATE TABLE site_address (
    site_id INTEGER NOT NULL REFERENCES sites, address_id INTEGER NOT NULL REFERENCES addresses,
    PRIMARY KEY (site_id, address_id));
CREATE TABLE address_address_type (
    address_id INTEGER NOT NULL REFERENCES addresses,
    address_type_id INTEGER NOT NULL REFERENCES address_types,
    PRIMARY KEY (address_id, address_type_id));

CREATE TABLE messages (
    message_id TEXT PRIMARY KEY, subject TEXT, template TEXT, enabled INTEGER NOT NULL DEFAULT 1);

CREATE TABLE events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    person_id INTEGER, node_id INTEGER, auth_type TEXT, fault_code INTEGER NOT NULL DEFAULT 0,
    call_name TEXT NOT NULL, call TEXT, message TEXT, runtime REAL, time INTEGER NOT NULL);
CREATE TABLE event_object (
    event_id INTEGER NOT NULL REFERENCES events, object_id INTEGER NOT NULL,
    object_type TEXT NOT NULL DEFAULT 'Unknown');
CREATE INDEX event_object_event ON event_object (event_id);
