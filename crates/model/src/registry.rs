//! The R4 resource types, search parameters and compartments, generated from the
//! official definitions (see `haven-codegen`).

/// Whether `name` is an R4 resource type.
pub fn is_resource_type(name: &str) -> bool {
    matches!(name, "Patient" | "Observation")
}
