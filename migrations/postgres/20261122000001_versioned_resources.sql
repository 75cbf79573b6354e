-- Every version of every resource, deletions included (body NULL).
-- seq is global and only grows: it orders system and type history and
-- is the stable cursor for history paging.
CREATE TABLE resource_versions (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    resource_type TEXT        NOT NULL,
    id            TEXT        NOT NULL,
    version       BIGINT      NOT NULL,
    last_updated  TIMESTAMPTZ NOT NULL,
    change        TEXT        NOT NULL CHECK (change IN ('create', 'update', 'delete')),
    body          JSONB,
    UNIQUE (resource_type, id, version)
);

-- Type history, newest first.
CREATE INDEX resource_versions_type_seq ON resource_versions (resource_type, seq);
-- _since and _at on system history.
CREATE INDEX resource_versions_last_updated ON resource_versions (last_updated);

-- The current version of each resource, including deletions. Updates lock this row.
CREATE TABLE current_resources (
    resource_type TEXT        NOT NULL,
    id            TEXT        NOT NULL,
    version       BIGINT      NOT NULL,
    last_updated  TIMESTAMPTZ NOT NULL,
    deleted       BOOLEAN     NOT NULL,
    PRIMARY KEY (resource_type, id)
);

-- Type and system search ordered by _lastUpdated, live resources only.
CREATE INDEX current_resources_type_updated
    ON current_resources (resource_type, last_updated, id) WHERE NOT deleted;
CREATE INDEX current_resources_updated
    ON current_resources (last_updated, resource_type, id) WHERE NOT deleted;

-- identifier (system, value) of current, non-deleted versions; system '' means none.
CREATE TABLE identifier_tokens (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    system        TEXT NOT NULL,
    value         TEXT NOT NULL,
    PRIMARY KEY (resource_type, id, system, value),
    FOREIGN KEY (resource_type, id) REFERENCES current_resources (resource_type, id)
);

CREATE INDEX identifier_tokens_value ON identifier_tokens (value, system, resource_type);
CREATE INDEX identifier_tokens_system ON identifier_tokens (system, value, resource_type);
