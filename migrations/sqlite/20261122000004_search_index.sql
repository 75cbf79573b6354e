-- Typed search index entries of the current version of every live resource,
-- from haven_model::search_index::index_values; a write replaces its resource's
-- rows in the same transaction. NULL means the value has no such part.
-- Dates are fixed-width UTC text like current_resources.last_updated, so text
-- order is time order and ranges compare.

-- Strings: lowercased and accent-folded, and as written for :exact.
CREATE TABLE search_string (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    normalized    TEXT NOT NULL,
    exact         TEXT NOT NULL,
    FOREIGN KEY (resource_type, id) REFERENCES current_resources (resource_type, id)
);
CREATE INDEX search_string_resource ON search_string (resource_type, id);

CREATE INDEX search_string_value ON search_string (resource_type, param, normalized);

-- Tokens; text is the normalized display or concept text for :text.
CREATE TABLE search_token (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    system        TEXT,
    code          TEXT,
    text          TEXT,
    FOREIGN KEY (resource_type, id) REFERENCES current_resources (resource_type, id)
);
CREATE INDEX search_token_resource ON search_token (resource_type, id);

CREATE INDEX search_token_value ON search_token (resource_type, param, code, system);

-- Identifiers through one coding of their type, for :of-type.
CREATE TABLE search_token_of_type (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    type_system   TEXT,
    type_code     TEXT,
    value         TEXT NOT NULL,
    FOREIGN KEY (resource_type, id) REFERENCES current_resources (resource_type, id)
);
CREATE INDEX search_token_of_type_resource ON search_token_of_type (resource_type, id);

CREATE INDEX search_token_of_type_value ON search_token_of_type (resource_type, param, value, type_code);

-- References: relative type and id, absolute or canonical URL and version.
CREATE TABLE search_reference (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    target_type   TEXT,
    target_id     TEXT,
    url           TEXT,
    version       TEXT,
    FOREIGN KEY (resource_type, id) REFERENCES current_resources (resource_type, id)
);
CREATE INDEX search_reference_resource ON search_reference (resource_type, id);

CREATE INDEX search_reference_target ON search_reference (resource_type, param, target_id, target_type);

CREATE INDEX search_reference_url ON search_reference (resource_type, param, url);

-- Dates as half-open UTC intervals [low, high).
CREATE TABLE search_date (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    low           TEXT NOT NULL,
    high          TEXT NOT NULL,
    FOREIGN KEY (resource_type, id) REFERENCES current_resources (resource_type, id)
);
CREATE INDEX search_date_resource ON search_date (resource_type, id);

CREATE INDEX search_date_value ON search_date (resource_type, param, low, high);

-- Numbers as the half-open interval their precision covers.
CREATE TABLE search_number (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    low           REAL NOT NULL,
    high          REAL NOT NULL,
    FOREIGN KEY (resource_type, id) REFERENCES current_resources (resource_type, id)
);
CREATE INDEX search_number_resource ON search_number (resource_type, id);

CREATE INDEX search_number_value ON search_number (resource_type, param, low, high);

-- Quantities as intervals; NULL ends are unbounded.
CREATE TABLE search_quantity (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    value_low     REAL,
    value_high    REAL,
    system        TEXT,
    code          TEXT,
    unit          TEXT,
    FOREIGN KEY (resource_type, id) REFERENCES current_resources (resource_type, id)
);
CREATE INDEX search_quantity_resource ON search_quantity (resource_type, id);

CREATE INDEX search_quantity_value ON search_quantity (resource_type, param, code, system, value_low);

-- URIs as written.
CREATE TABLE search_uri (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    uri           TEXT NOT NULL,
    FOREIGN KEY (resource_type, id) REFERENCES current_resources (resource_type, id)
);
CREATE INDEX search_uri_resource ON search_uri (resource_type, id);

CREATE INDEX search_uri_value ON search_uri (resource_type, param, uri);

-- One combination of a composite parameter's components, as a JSON array.
CREATE TABLE search_composite (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    parts         TEXT NOT NULL,
    FOREIGN KEY (resource_type, id) REFERENCES current_resources (resource_type, id)
);
CREATE INDEX search_composite_resource ON search_composite (resource_type, id);

CREATE INDEX search_composite_param ON search_composite (resource_type, param);

-- The version of the indexing rules the rows above follow; connect backfills
-- every current resource when it is behind.
CREATE TABLE search_index_state (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    version   INTEGER NOT NULL
);
INSERT INTO search_index_state (singleton, version) VALUES (1, 0);
