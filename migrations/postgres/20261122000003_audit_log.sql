-- The audit trail: AuditEvents in a hash chain (see haven-audit's chain module).
-- Positions are consecutive from 1; each appender takes a transaction-level
-- advisory lock, reads the head and writes the next positions.
CREATE TABLE audit_events (
    position      BIGINT      PRIMARY KEY CHECK (position > 0),
    id            TEXT        NOT NULL UNIQUE,
    recorded      TIMESTAMPTZ NOT NULL,
    -- Text, not jsonb: the stored JSON comes back exactly as written.
    event         TEXT        NOT NULL,
    previous_hash TEXT        NOT NULL,
    hash          TEXT        NOT NULL
);

CREATE INDEX audit_events_recorded ON audit_events (recorded);

-- Search values of each event (agent, patient, entity, outcome, action, type,
-- subtype), written with it; system is '' except for the coded ones.
CREATE TABLE audit_index (
    position BIGINT NOT NULL,
    param    TEXT   NOT NULL,
    system   TEXT   NOT NULL,
    value    TEXT   NOT NULL,
    PRIMARY KEY (param, value, system, position)
);

CREATE INDEX audit_index_system ON audit_index (param, system, position);
CREATE INDEX audit_index_position ON audit_index (position);

-- Append-only: the database itself refuses changes and removals.
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only: % on % refused', TG_OP, TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

CREATE TRIGGER audit_index_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_index
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
