//! `$validate` (R4 resource-operation-validate): always 200 with an
//! OperationOutcome; the issues say whether the resource is valid. The resource
//! comes as the body, as the `resource` parameter of a Parameters body, or for an
//! instance without a body, from the store.

use haven_model::outcome::{operation_outcome, Issue, IssueCode};
use serde_json::Value;

use super::check_resource;
use crate::error::ApiError;
use crate::pipeline::Exec;
use crate::response::FhirResponse;

pub(crate) async fn validate(
    exec: &Exec<'_>,
    resource_type: &str,
    id: Option<&str>,
    body: Option<&Value>,
) -> Result<FhirResponse, ApiError> {
    let stored;
    let resource = match (body, id) {
        (Some(body), _) => unwrap_parameters(body)?,
        (None, Some(id)) => {
            let current = exec
                .state
                .store
                .read(resource_type, id)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("{resource_type}/{id} is not known")))?;
            stored = current
                .resource
                .ok_or_else(|| ApiError::Gone(format!("{resource_type}/{id} has been deleted")))?;
            &stored
        }
        (None, None) => {
            return Err(ApiError::invalid(
                IssueCode::Required,
                "$validate needs a resource",
            ))
        }
    };
    let mut issues = match check_resource(resource_type, resource) {
        Ok(()) => Vec::new(),
        Err(ApiError::Invalid(issues)) => issues,
        Err(other) => return Err(other),
    };
    if let (Some(id), Some(body_id)) = (id, resource.get("id").and_then(Value::as_str)) {
        if body_id != id {
            issues.push(
                Issue::error(
                    IssueCode::Invalid,
                    format!("the resource's id '{body_id}' differs from '{id}' in the URL"),
                )
                .at(format!("{resource_type}.id")),
            );
        }
    }
    if issues.is_empty() {
        issues.push(Issue::information(IssueCode::Informational, "no errors"));
    }
    Ok(FhirResponse::ok(operation_outcome(&issues)))
}

/// The resource of a `Parameters` body (parameter `resource`), or the body itself.
fn unwrap_parameters(body: &Value) -> Result<&Value, ApiError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Ok(body);
    }
    body.get("parameter")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|p| p.get("name").and_then(Value::as_str) == Some("resource"))
        .and_then(|p| p.get("resource"))
        .ok_or_else(|| {
            ApiError::invalid_at(
                IssueCode::Required,
                "the Parameters have no 'resource' parameter",
                "Parameters.parameter",
            )
        })
}
