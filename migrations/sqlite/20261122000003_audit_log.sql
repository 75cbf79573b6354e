-- The audit trail: AuditEvents in a hash chain (see haven-audit's chain module).
-- Positions are consecutive from 1; each appender takes the write lock
-- (BEGIN IMMEDIATE), reads the head and writes the next positions.
CREATE TABLE audit_events (
    position      INTEGER PRIMARY KEY CHECK (position > 0),
    id            TEXT    NOT NULL UNIQUE,
    -- The event's recorded instant, formatted as last_updated is in resource_versions.
    recorded      TEXT    NOT NULL,
    -- The stored JSON text; the chain hashes its canonical form.
    event         TEXT    NOT NULL,
    previous_hash TEXT    NOT NULL,
    hash          TEXT    NOT NULL
);

CREATE INDEX audit_events_recorded ON audit_events (recorded);

-- Search values of each event (agent, patient, entity, outcome, action, type,
-- subtype), written with it; system is '' except for the coded ones.
CREATE TABLE audit_index (
    position INTEGER NOT NULL,
    param    TEXT    NOT NULL,
    system   TEXT    NOT NULL,
    value    TEXT    NOT NULL,
    PRIMARY KEY (param, value, system, position)
) WITHOUT ROWID;

CREATE INDEX audit_index_system ON audit_index (param, system, position);
CREATE INDEX audit_index_position ON audit_index (position);

-- Append-only: the database itself refuses changes and removals.
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'the audit trail is append-only');
END;

CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'the audit trail is append-only');
END;

CREATE TRIGGER audit_index_no_update BEFORE UPDATE ON audit_index
BEGIN
    SELECT RAISE(ABORT, 'the audit trail is append-only');
END;

CREATE TRIGGER audit_index_no_delete BEFORE DELETE ON audit_index
BEGIN
    SELECT RAISE(ABORT, 'the audit trail is append-only');
END;
