-- The patient compartments a live resource is in, as
-- haven_model::search_value::patient_compartments computes them (a Patient is
-- in its own); param is the compartment type. Written with the other index rows.
CREATE TABLE search_compartment (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    target_id     TEXT NOT NULL,
    FOREIGN KEY (resource_type, id) REFERENCES current_resources (resource_type, id)
);
CREATE INDEX search_compartment_resource ON search_compartment (resource_type, id);

CREATE INDEX search_compartment_member ON search_compartment (resource_type, param, target_id);

CREATE INDEX search_compartment_patient ON search_compartment (target_id, param);
