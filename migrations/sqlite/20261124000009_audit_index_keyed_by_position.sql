-- Every audit search plan walks audit_events newest first and probes each
-- event's index rows by position; none reads the rows by value. Keying the
-- table by (position, param, value, system) keeps each row once, appended at
-- the end, instead of twice, one copy inserted at a random place in a
-- value-ordered tree; a probe reads the same rows through the key.
CREATE TABLE audit_index_by_position (
    position INTEGER NOT NULL,
    param    TEXT    NOT NULL,
    value    TEXT    NOT NULL,
    system   TEXT    NOT NULL,
    PRIMARY KEY (position, param, value, system)
) WITHOUT ROWID;

INSERT INTO audit_index_by_position (position, param, value, system)
SELECT position, param, value, system FROM audit_index ORDER BY position, param, value, system;

DROP TABLE audit_index;

ALTER TABLE audit_index_by_position RENAME TO audit_index;

-- Append-only, as before.
CREATE TRIGGER audit_index_no_update BEFORE UPDATE ON audit_index
BEGIN
    SELECT RAISE(ABORT, 'the audit trail is append-only');
END;

CREATE TRIGGER audit_index_no_delete BEFORE DELETE ON audit_index
BEGIN
    SELECT RAISE(ABORT, 'the audit trail is append-only');
END;
