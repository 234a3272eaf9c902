-- PostgreSQL side of the dialect layer (plc/store/dialect.py): functions the shared
-- SQL calls, and the lease triggers of schema.sql written in PL/pgSQL.

CREATE OR REPLACE FUNCTION plc_json_each(j text) RETURNS TABLE (value text)
LANGUAGE sql IMMUTABLE AS $$ SELECT json_array_elements_text(j::json) $$;

-- plc.query reads int columns clamped to 32 bits; NULL stays NULL
CREATE OR REPLACE FUNCTION plc_clamp32(v bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT AS $$ SELECT GREATEST(LEAST(v, 2147483647), -2147483648) $$;

-- the legacy ILIKE filter: * and % any sequence, _ any one character, no escapes
CREATE OR REPLACE FUNCTION plc_ilike(v anyelement, pattern text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT v::text ILIKE replace(replace(pattern, '\', '\\'), '*', '%') $$;

CREATE OR REPLACE FUNCTION leases_no_overlap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM leases l WHERE l.node_id = NEW.node_id
               AND l.lease_id <> NEW.lease_id
               AND l.t_until >= CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)
               AND l.t_from < NEW.t_until AND NEW.t_from < l.t_until) THEN
        RAISE EXCEPTION 'lease overlaps an existing lease';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER leases_no_overlap_insert BEFORE INSERT ON leases
    FOR EACH ROW EXECUTE FUNCTION leases_no_overlap();
CREATE TRIGGER leases_no_overlap_update BEFORE UPDATE OF t_from, t_until ON leases
    FOR EACH ROW EXECUTE FUNCTION leases_no_overlap();
