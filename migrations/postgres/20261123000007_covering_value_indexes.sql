-- A list of the resources holding a value (a code, a date range) reads the value
-- index and needs each row's id. With the id in the index the list reads only
-- the index; without it a planner may prefer the per-resource probe index,
-- which is covering but matches on the type alone and so reads every index row
-- of the type.
DROP INDEX search_token_value;
CREATE INDEX search_token_value ON search_token (resource_type, param, code, system, id);

DROP INDEX search_date_value;
CREATE INDEX search_date_value ON search_date (resource_type, param, low, high, id);
