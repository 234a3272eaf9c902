-- Indexes of the read paths (GetNodes fields, GetSlivers), SQLite dialect.
-- Every statement is idempotent: run after schema.sql by `plc init`, and again when
-- `plc serve` starts, so that databases created before an index was added get it too.

-- Node.slice_ids in slice_id order without a sort; GetSlivers' slices of a node
CREATE INDEX IF NOT EXISTS slice_node_node_slice ON slice_node (node_id, slice_id);
-- Node.conf_file_ids, Node.pcu_ids and Node.ports (the primary keys lead with the other id)
CREATE INDEX IF NOT EXISTS conf_file_node_node ON conf_file_node (node_id, conf_file_id);
CREATE INDEX IF NOT EXISTS pcu_node_node ON pcu_node (node_id, pcu_id);
-- Node.nodegroup_ids and GetSlivers' groups (else SQLite builds an automatic index per call)
CREATE INDEX IF NOT EXISTS nodegroups_tag ON nodegroups (tag_type_id, value);
-- GetSlivers: nm-controller and delegated slices are on every node
CREATE INDEX IF NOT EXISTS slices_instantiation ON slices (instantiation);
