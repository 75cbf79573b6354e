-- A search runs newest first through audit_events and probes each event's
-- index rows by position (audit_index_position), a token's system too; no plan
-- reads (param, system, position). Dropping it spares every append a third
-- copy of each index row and a page per parameter per commit.
DROP INDEX audit_index_system;
