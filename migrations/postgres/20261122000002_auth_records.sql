-- Small keyed records of the authorization server: clients, users, pending
-- authorizations, codes, grants, refresh tokens, used assertion ids, sessions.
-- Secrets never appear here in the clear: keys of secret things are hashes.
CREATE TABLE auth_records (
    kind       TEXT   NOT NULL,
    key        TEXT   NOT NULL,
    value      TEXT   NOT NULL,
    -- Unix seconds; NULL never expires. Expired rows count as absent.
    expires_at BIGINT,
    PRIMARY KEY (kind, key)
);

CREATE INDEX auth_records_expiry ON auth_records (expires_at);
