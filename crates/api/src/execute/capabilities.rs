//! The CapabilityStatement (R4 capabilitystatement.html): exactly what this
//! server implements, built from the registry the interactions use (every
//! resource type it knows; `identifier` only where R4 defines it; the other
//! parameters exactly where the search parser evaluates them), so it cannot
//! promise more than the code does.

use haven_model::clock::format_instant;
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::ApiConfig;
use haven_model::registry::{self, resource_types};

const SEARCH_PARAM_DEFS: &str = "http://hl7.org/fhir/SearchParameter/";

fn search_param(name: &str, kind: &str, definition: Option<&str>, doc: &str) -> Value {
    let mut param = json!({"name": name});
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
    // The R4 parameters of the type that are indexed and searchable; the
    // parser reports the rest (those with no expression, `near`) as ignored.
    for param in registry::search_params(resource_type) {
        if matches!(param.code.as_str(), "_id" | "_lastUpdated")
            || UNSUPPORTED_PARAMETERS.contains(&param.code.as_str())
            || param.expression.is_none()
            || param.kind == registry::SearchParamType::Special
        {
            continue;
        }
        params.push(search_param(
            &param.code,
            param.kind.as_str(),
            param.url.strip_prefix(SEARCH_PARAM_DEFS),
            "Indexed at write time; the modifiers and prefixes of its type apply.",
        ));
    }
    let reference_params: Vec<&str> = registry::search_params(resource_type)
        .into_iter()
        .filter(|p| p.kind == registry::SearchParamType::Reference)
        .map(|p| p.code.as_str())
        .collect();
    let mut includes: Vec<String> = reference_params
        .iter()
        .map(|p| format!("{resource_type}:{p}"))
        .collect();
    includes.push("*".into());
    if resource_type == "AuditEvent" {
        return audit_event_entry();
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
        "searchInclude": includes,
        "searchRevInclude": rev_includes(resource_type),
        "searchParam": params,
        "operation": operations(resource_type),
    })
}

/// The parameters R4 defines that this server does not evaluate; searches
/// report them as ignored.
const UNSUPPORTED_PARAMETERS: [&str; 5] = ["_text", "_content", "_list", "_query", "_filter"];

/// `Type:param` for every reference parameter of any type that can point at
/// `resource_type`.
fn rev_includes(resource_type: &str) -> Vec<String> {
    let mut found = Vec::new();
    for source in resource_types() {
        for param in registry::search_params(source) {
            if param.kind == registry::SearchParamType::Reference
                && (param
                    .target
                    .iter()
                    .any(|t| t == resource_type || t == "Resource"))
            {
                found.push(format!("{source}:{}", param.code));
            }
        }
    }
    found
}

fn operations(resource_type: &str) -> Vec<Value> {
    let mut operations = vec![json!({
        "name": "validate",
        "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
    })];
    if resource_type == "Patient" {
        operations.push(json!({
            "name": "everything",
            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
        }));
    }
    operations
}

/// The audit trail: read and searched, never written (R5), and verified.
fn audit_event_entry() -> Value {
    let mut params = vec![search_param(
        "_id",
        "token",
        Some("Resource-id"),
        "One or more logical ids, comma separated.",
    )];
    for (name, kind, definition, doc) in [
        (
            "date",
            "date",
            "AuditEvent-date",
            "When the event was recorded.",
        ),
        (
            "agent",
            "reference",
            "AuditEvent-agent",
            "A user's fhirUser or an agent's identifier (username, client id).",
        ),
        (
            "patient",
            "reference",
            "AuditEvent-patient",
            "The patient whose data the event is about.",
        ),
        (
            "entity",
            "reference",
            "AuditEvent-entity",
            "The data touched, with or without its version.",
        ),
        ("outcome", "token", "AuditEvent-outcome", "0, 4, 8 or 12."),
        ("action", "token", "AuditEvent-action", "C, R, U, D or E."),
        (
            "type",
            "token",
            "AuditEvent-type",
            "The event type, e.g. rest.",
        ),
        (
            "subtype",
            "token",
            "AuditEvent-subtype",
            "The interaction, e.g. read.",
        ),
        (
            "policy",
            "uri",
            "AuditEvent-policy",
            "A policy the requester acted under: a Consent, or urn:haven:policy:break-the-glass.",
        ),
    ] {
        params.push(search_param(name, kind, Some(definition), doc));
    }
    params.push(search_param(
        "request",
        "token",
        None,
        "The X-Request-Id of the request the event records (Haven's own parameter).",
    ));
    json!({
        "type": "AuditEvent",
        "profile": "http://hl7.org/fhir/StructureDefinition/AuditEvent",
        "documentation": "Written by the server only, append-only and hash-chained.",
        "interaction": [{"code": "read"}, {"code": "vread"}, {"code": "search-type"}],
        "versioning": "versioned",
        "readHistory": false,
        "updateCreate": false,
        "conditionalCreate": false,
        "conditionalUpdate": false,
        "conditionalDelete": "not-supported",
        "searchParam": params,
        "operation": [{
            "name": "verify",
            "definition": "urn:haven:operation:audit-verify",
            "documentation": "Walks the hash chain; names the first changed, removed or inserted record.",
        }],
    })
}

/// `rest.security` for SMART on FHIR: the service code and the `oauth-uris`
/// extension, which some clients read instead of `.well-known/smart-configuration`.
fn security(auth: &haven_auth::AuthConfig) -> Value {
    json!({
        "cors": true,
        "service": [{
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR",
                "display": "SMART-on-FHIR",
            }],
            "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)",
        }],
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [
                {"url": "authorize", "valueUri": auth.endpoint("authorize")},
                {"url": "token", "valueUri": auth.token_endpoint()},
                {"url": "introspect", "valueUri": auth.endpoint("introspect")},
                {"url": "revoke", "valueUri": auth.endpoint("revoke")},
                {"url": "register", "valueUri": auth.endpoint("register")},
                {"url": "manage", "valueUri": auth.endpoint("launcher")},
            ],
        }],
    })
}

/// The statement for this deployment.
pub(crate) fn capability_statement(
    config: &ApiConfig,
    auth: Option<&haven_auth::AuthConfig>,
    now: OffsetDateTime,
) -> Value {
    let resources: Vec<Value> = resource_types().map(resource_entry).collect();
    let version = env!("CARGO_PKG_VERSION");
    let mut statement = json!({
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
    });
    if let Some(auth) = auth {
        statement["rest"][0]["security"] = security(auth);
    }
    statement
}
