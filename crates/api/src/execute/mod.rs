//! Stage 5 of the pipeline: executing an interaction against the store.
//!
//! This module is private to the crate and only [`crate::pipeline`] calls
//! [`execute`]; batch and transaction entries come back in through
//! [`execute_one`] after passing the pipeline's gate.
//!
//! Writes are split in two layers: functions that work inside a caller's
//! [`haven_store::StoreTx`] (so a FHIR transaction can run many of them in one
//! database transaction), and the single-request wrappers that begin and commit
//! a transaction around one of them.

mod audit_trail;
mod bundle;
mod capabilities;
mod history;
mod instance;
mod search;
pub(crate) mod subsetting;
mod validation;

use haven_model::outcome::{Issue, IssueCode};
use haven_model::validate::validate_resource;
use haven_store::ResourceVersion;
use http::header::{CONTENT_LOCATION, LOCATION};
use http::StatusCode;
use serde_json::Value;

use crate::error::ApiError;
use crate::interaction::Interaction;
use crate::pipeline::{Exec, Return};
use crate::response::FhirResponse;

pub use audit_trail::{verify_trail, TrailReport};
pub(crate) use capabilities::capability_statement;
use search::Scope;

/// Runs one interaction that the pipeline admitted.
pub(crate) async fn execute(
    exec: &Exec<'_>,
    interaction: &Interaction,
) -> Result<FhirResponse, ApiError> {
    match interaction {
        Interaction::Batch { bundle } => bundle::batch(exec, bundle).await,
        Interaction::Transaction { bundle } => bundle::transaction(exec, bundle).await,
        other => execute_one(exec, other).await,
    }
}

/// Runs any interaction except a Bundle; also used for batch entries.
pub(crate) async fn execute_one(
    exec: &Exec<'_>,
    interaction: &Interaction,
) -> Result<FhirResponse, ApiError> {
    // The audit trail lives apart from resources, in the audit log.
    if interaction.resource_type() == Some("AuditEvent")
        && !matches!(interaction, Interaction::Validate { .. })
    {
        return audit_trail::execute(exec, interaction).await;
    }
    match interaction {
        Interaction::Capabilities => Ok(FhirResponse::ok(capability_statement(
            &exec.state.config,
            exec.state.auth.as_ref().map(|a| a.config()),
            exec.state.clock.now(),
        ))),
        Interaction::Read {
            resource_type,
            id,
            if_none_match,
            if_modified_since,
        } => instance::read(exec, resource_type, id, *if_none_match, *if_modified_since).await,
        Interaction::VRead {
            resource_type,
            id,
            version,
        } => instance::vread(exec, resource_type, id, *version).await,
        Interaction::Create {
            resource_type,
            resource,
            if_none_exist,
        } => instance::create(exec, resource_type, resource, if_none_exist.as_deref()).await,
        Interaction::Update {
            resource_type,
            id,
            resource,
            if_match,
        } => instance::update(exec, resource_type, id, resource, *if_match).await,
        Interaction::ConditionalUpdate {
            resource_type,
            criteria,
            resource,
            if_match,
        } => instance::conditional_update(exec, resource_type, criteria, resource, *if_match).await,
        Interaction::Patch {
            resource_type,
            target,
            patch,
            if_match,
        } => instance::patch(exec, resource_type, target, patch, *if_match).await,
        Interaction::Delete {
            resource_type,
            id,
            if_match,
        } => instance::delete(exec, resource_type, id, *if_match).await,
        Interaction::ConditionalDelete {
            resource_type,
            criteria,
        } => instance::conditional_delete(exec, resource_type, criteria).await,
        Interaction::History {
            resource_type,
            id,
            params,
        } => history::history(exec, resource_type.as_deref(), id.as_deref(), params).await,
        Interaction::Search {
            resource_type,
            params,
        } => search::search(exec, Scope::Types(resource_type.as_deref()), params, None).await,
        Interaction::CompartmentSearch {
            patient,
            resource_type,
            params,
        } => {
            let scope = Scope::Compartment {
                patient,
                resource_type,
            };
            search::search(exec, scope, params, None).await
        }
        Interaction::Everything { patient, params } => {
            search::search(exec, Scope::Everything { patient }, params, None).await
        }
        Interaction::Validate {
            resource_type,
            id,
            resource,
        } => validation::validate(exec, resource_type, id.as_deref(), resource.as_ref()).await,
        Interaction::VerifyAuditTrail => audit_trail::execute(exec, interaction).await,
        Interaction::Batch { .. } | Interaction::Transaction { .. } => Err(ApiError::invalid(
            IssueCode::NotSupported,
            "a Bundle entry cannot itself be a batch or transaction",
        )),
    }
}

/// The checks every written resource passes: a JSON object of the type the
/// URL names, valid against R4 (R4 http.html#create: 400 for invalid content).
pub(crate) fn check_resource(resource_type: &str, resource: &Value) -> Result<(), ApiError> {
    let Some(object) = resource.as_object() else {
        return Err(ApiError::invalid(
            IssueCode::Structure,
            "the body must be a JSON object holding a resource",
        ));
    };
    match object.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == resource_type => {}
        Some(t) => {
            return Err(ApiError::invalid_at(
                IssueCode::Invalid,
                format!("the body is a {t}, but the URL names {resource_type}"),
                "resourceType",
            ))
        }
        None => {
            return Err(ApiError::invalid_at(
                IssueCode::Required,
                "the body has no resourceType",
                "resourceType",
            ))
        }
    }
    let issues = validate_resource(resource);
    if issues.iter().any(Issue::is_error) {
        return Err(ApiError::Invalid(issues));
    }
    Ok(())
}

/// `[base]/[type]/[id]/_history/[vid]`
pub(crate) fn version_url(exec: &Exec<'_>, version: &ResourceVersion) -> String {
    format!(
        "{}/{}/{}/_history/{}",
        exec.state.config.base_url, version.resource_type, version.id, version.version
    )
}

/// `[base]/[type]/[id]`
pub(crate) fn resource_url(exec: &Exec<'_>, resource_type: &str, id: &str) -> String {
    format!("{}/{}/{}", exec.state.config.base_url, resource_type, id)
}

/// The answer to a create, update or patch, shaped by `Prefer: return=`
/// (R4 http.html#ops).
pub(crate) fn written(
    exec: &Exec<'_>,
    status: StatusCode,
    version: &ResourceVersion,
    what: &str,
) -> FhirResponse {
    let location = version_url(exec, version);
    let body = match exec.prefer.return_.unwrap_or(Return::Representation) {
        Return::Representation => version.resource.clone(),
        Return::Minimal => None,
        Return::OperationOutcome => Some(haven_model::outcome::operation_outcome(&[
            Issue::information(
                IssueCode::Informational,
                format!("{what} {}/{}", version.resource_type, version.id),
            ),
        ])),
    };
    FhirResponse::new(status, body)
        .with_header(LOCATION, &location)
        .with_header(CONTENT_LOCATION, &location)
        .with_version_headers(version)
}

/// Prefixes the expressions of an entry's issues with the entry's position,
/// so `Patient.birthDate` becomes `Bundle.entry[3].resource.birthDate`.
pub(crate) fn locate_in_entry(
    error: ApiError,
    index: usize,
    resource_type: Option<&str>,
) -> ApiError {
    match error {
        ApiError::Invalid(issues) => ApiError::Invalid(
            issues
                .into_iter()
                .map(|mut issue| {
                    let prefix = format!("Bundle.entry[{index}]");
                    if issue.expression.is_empty() {
                        issue.expression.push(prefix);
                    } else {
                        for e in &mut issue.expression {
                            let inner = match resource_type.and_then(|t| e.strip_prefix(t)) {
                                Some(rest) => rest.trim_start_matches('.').to_owned(),
                                None => e.clone(),
                            };
                            *e = if inner.is_empty() {
                                format!("{prefix}.resource")
                            } else if inner.starts_with("Bundle.entry[") {
                                inner
                            } else {
                                format!("{prefix}.resource.{inner}")
                            };
                        }
                    }
                    issue
                })
                .collect(),
        ),
        other => other,
    }
}

/// A search or history result Bundle (`type` `searchset` or `history`).
pub(crate) fn result_bundle(
    exec: &Exec<'_>,
    bundle_type: &str,
    total: Option<u64>,
    links: Vec<Value>,
    entries: Vec<Value>,
) -> Value {
    let mut bundle = serde_json::json!({
        "resourceType": "Bundle",
        "id": haven_model::id::new_id(),
        "meta": {"lastUpdated": haven_model::clock::format_instant(exec.state.clock.now())},
        "type": bundle_type,
    });
    if let Some(total) = total {
        bundle["total"] = serde_json::json!(total);
    }
    bundle["link"] = Value::Array(links);
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    bundle
}
