//! The CapabilityStatement (R4 capabilitystatement.html): exactly what this
//! server implements, built from the same tables the interactions use, so it
//! cannot promise more than the code does.

use haven_model::clock::format_instant;
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::r4::{has_identifier_parameter, supported_types};
use crate::ApiConfig;

const SEARCH_PARAM_DEFS: &str = "http://hl7.org/fhir/SearchParameter/";

fn search_param(name: &str, kind: &str, definition: Option<&str>, doc: &str) -> Value {
    let mut param = json!({"name": name});
    // R4 shares some `identifier` definitions between types under one id, so
    // the definition is given only where it is unambiguous.
    if let Some(d) = definition {
        param["definition"] = json!(format!("{SEARCH_PARAM_DEFS}{d}"));
    }
    param["type"] = json!(kind);
    param["documentation"] = json!(doc);
    param
}

fn common_params() -> Vec<Value> {
    vec![
        search_param(
            "_id",
            "token",
            Some("Resource-id"),
            "One or more logical ids, comma separated.",
        ),
        search_param(
            "_lastUpdated",
            "date",
            Some("Resource-lastUpdated"),
            "Prefixes eq, gt, ge, lt, le, sa, eb; the value covers its whole precision.",
        ),
    ]
}

fn resource_entry(resource_type: &str) -> Value {
    let mut params = common_params();
    if has_identifier_parameter(resource_type) {
        params.push(search_param(
            "identifier",
            "token",
            None,
            "system|code, |code, system| or code; comma separated values are alternatives.",
        ));
    }
    let interactions: Vec<Value> = [
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    ]
    .iter()
    .map(|code| json!({"code": code}))
    .collect();
    json!({
        "type": resource_type,
        "profile": format!("http://hl7.org/fhir/StructureDefinition/{resource_type}"),
        "interaction": interactions,
        "versioning": "versioned-update",
        "readHistory": true,
        "updateCreate": true,
        "conditionalCreate": true,
        "conditionalRead": "full-support",
        "conditionalUpdate": true,
        "conditionalDelete": "single",
        "searchParam": params,
        "operation": [{
            "name": "validate",
            "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
        }],
    })
}

/// The statement for this deployment.
pub(crate) fn capability_statement(config: &ApiConfig, now: OffsetDateTime) -> Value {
    let resources: Vec<Value> = supported_types().map(resource_entry).collect();
    let version = env!("CARGO_PKG_VERSION");
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": format_instant(now),
        "publisher": "Haven",
        "kind": "instance",
        "software": {"name": "Haven", "version": version},
        "implementation": {
            "description": "Haven FHIR R4 server",
            "url": config.base_url,
        },
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [
                {"code": "transaction"},
                {"code": "batch"},
                {"code": "history-system"},
                {"code": "search-system"},
            ],
            "searchParam": common_params(),
            "operation": [{
                "name": "validate",
                "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
            }],
        }],
    })
}
