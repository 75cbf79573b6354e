-- A token's system is found through the position index (newest events first)
-- or the primary key (param, then a filter on system), as a value is.
-- Dropping the (param, system, position) index spares every append a third
-- copy of each index row.
DROP INDEX audit_index_system;
