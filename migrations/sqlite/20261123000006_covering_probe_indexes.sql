-- A search's later conjuncts are probed per candidate through the index rows of
-- that one resource. With the tested values in the index, a probe of a code or
-- a date reads only the index, not a table row per index entry.
DROP INDEX search_token_resource;
CREATE INDEX search_token_resource ON search_token (resource_type, id, param, code, system);

DROP INDEX search_date_resource;
CREATE INDEX search_date_resource ON search_date (resource_type, id, param, low, high);
