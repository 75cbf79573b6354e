//! Instance interactions: read, vread, create, update, patch, delete, and their
//! conditional forms (R4 http.html).
//!
//! Choices the specification leaves open:
//! - Delete answers 200 with an OperationOutcome (and the deletion's `ETag`)
//!   when a version was written, and 204 when there was nothing to delete
//!   (unknown, already deleted, or a conditional delete matching nothing).
//! - Conditional delete and conditional update refuse several matches with 412
//!   (`conditionalDelete: single`).
//! - A patch that cannot be applied (a failed `test`, a missing path) is 422;
//!   a patch whose result is not a valid resource is 400.

use std::time::SystemTime;

use haven_model::id::{is_valid_id, new_id};
use haven_model::outcome::{Issue, IssueCode};
use haven_store::{ResourceVersion, StoreTx};
use http::header::CONTENT_LOCATION;
use http::StatusCode;
use serde_json::Value;

use super::{check_resource, resource_url, version_url, written};
use crate::error::ApiError;
use crate::interaction::Target;
use crate::pipeline::Exec;
use crate::response::FhirResponse;
use crate::search_params::{parse_criteria, SearchContext};

/// How many resources a condition matched.
pub(crate) enum Matched {
    None,
    One(ResourceVersion),
    Many,
}

/// Evaluates a condition inside a transaction, so the answer holds until commit.
pub(crate) async fn matching(
    exec: &Exec<'_>,
    tx: &mut dyn StoreTx,
    resource_type: &str,
    criteria: &str,
) -> Result<Matched, ApiError> {
    let cx = SearchContext {
        base_url: exec.state.config.base_url.trim_end_matches('/'),
        now: exec.state.clock.now(),
        default_count: 2,
        max_count: 2,
        strict: true,
    };
    let mut query = parse_criteria(resource_type, criteria, &cx)?;
    query.local_base = Some(format!("{}/", cx.base_url));
    let mut page = tx.search(&query).await?;
    Ok(match page.resources.len() {
        0 => Matched::None,
        1 => Matched::One(page.resources.remove(0)),
        _ => Matched::Many,
    })
}

pub(crate) fn many_matches(what: &str, criteria: &str) -> ApiError {
    ApiError::precondition(
        IssueCode::MultipleMatches,
        format!("{what}: the criteria '{criteria}' match more than one resource"),
    )
}

fn not_found(resource_type: &str, id: &str) -> ApiError {
    ApiError::NotFound(format!("{resource_type}/{id} is not known"))
}

fn gone(resource_type: &str, id: &str) -> ApiError {
    ApiError::Gone(format!("{resource_type}/{id} has been deleted"))
}

pub(crate) async fn read(
    exec: &Exec<'_>,
    resource_type: &str,
    id: &str,
    if_none_match: Option<i64>,
    if_modified_since: Option<SystemTime>,
) -> Result<FhirResponse, ApiError> {
    let current = exec
        .state
        .store
        .read(resource_type, id)
        .await?
        .ok_or_else(|| not_found(resource_type, id))?;
    read_answer(exec, current, if_none_match, if_modified_since)
}

/// The answer to a read of `current`, honouring conditional reads
/// (R4 http.html#cread: 304 when the client's copy is current).
pub(crate) fn read_answer(
    exec: &Exec<'_>,
    mut current: ResourceVersion,
    if_none_match: Option<i64>,
    if_modified_since: Option<SystemTime>,
) -> Result<FhirResponse, ApiError> {
    if current.is_deleted() {
        return Err(gone(&current.resource_type, &current.id));
    }
    let unchanged_since = if_modified_since.is_some_and(|since| {
        // HTTP dates have whole seconds; compare at that precision.
        let stored = current.last_updated.unix_timestamp();
        let since = time::OffsetDateTime::from(since).unix_timestamp();
        stored <= since
    });
    let not_modified = match if_none_match {
        Some(v) => v == current.version,
        None => unchanged_since,
    };
    let status = if not_modified {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    // The answer owns the version, so its body moves into the response uncopied.
    let body = if not_modified {
        None
    } else {
        current.resource.take()
    };
    Ok(FhirResponse::new(status, body)
        .with_header(CONTENT_LOCATION, version_url(exec, &current))
        .with_version_headers(&current))
}

pub(crate) async fn vread(
    exec: &Exec<'_>,
    resource_type: &str,
    id: &str,
    version: i64,
) -> Result<FhirResponse, ApiError> {
    let mut found = exec
        .state
        .store
        .vread(resource_type, id, version)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("{resource_type}/{id} has no version {version}"))
        })?;
    if found.is_deleted() {
        return Err(ApiError::Gone(format!(
            "version {version} of {resource_type}/{id} is a deletion"
        )));
    }
    let body = found.resource.take().unwrap_or(Value::Null);
    Ok(FhirResponse::ok(body).with_version_headers(&found))
}

pub(crate) async fn create(
    exec: &Exec<'_>,
    resource_type: &str,
    resource: &Value,
    if_none_exist: Option<&str>,
) -> Result<FhirResponse, ApiError> {
    check_resource(resource_type, resource)?;
    let mut tx = exec.state.store.begin().await?;
    if let Some(criteria) = if_none_exist {
        match matching(exec, tx.as_mut(), resource_type, criteria).await? {
            Matched::None => {}
            Matched::One(existing) => {
                // R4 http.html#ccreate: one match means "already there", 200.
                return Ok(written(exec, StatusCode::OK, &existing, "Found existing"));
            }
            Matched::Many => return Err(many_matches("If-None-Exist", criteria)),
        }
    }
    let response = create_in(
        exec,
        tx.as_mut(),
        resource_type,
        resource.clone(),
        &new_id(),
    )
    .await?;
    tx.commit().await?;
    Ok(response)
}

/// Stores a new resource under `id` (the server's choice: a client's id is
/// replaced, R4 http.html#create).
pub(crate) async fn create_in(
    exec: &Exec<'_>,
    tx: &mut dyn StoreTx,
    resource_type: &str,
    mut resource: Value,
    id: &str,
) -> Result<FhirResponse, ApiError> {
    resource["id"] = Value::String(id.to_owned());
    let stored = tx.create(resource_type, id, resource).await?;
    Ok(written(exec, StatusCode::CREATED, &stored, "Created"))
}

pub(crate) async fn update(
    exec: &Exec<'_>,
    resource_type: &str,
    id: &str,
    resource: &Value,
    if_match: Option<i64>,
) -> Result<FhirResponse, ApiError> {
    check_update_body(resource_type, id, resource)?;
    let mut tx = exec.state.store.begin().await?;
    let response = update_in(
        exec,
        tx.as_mut(),
        resource_type,
        id,
        resource.clone(),
        if_match,
    )
    .await?;
    tx.commit().await?;
    Ok(response)
}

/// R4 http.html#update: the body's id must equal the URL's.
pub(crate) fn check_update_body(
    resource_type: &str,
    id: &str,
    resource: &Value,
) -> Result<(), ApiError> {
    check_resource(resource_type, resource)?;
    match resource.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id == id => Ok(()),
        Some(body_id) => Err(ApiError::invalid_at(
            IssueCode::Invalid,
            format!("the body's id '{body_id}' differs from the id '{id}' in the URL"),
            format!("{resource_type}.id"),
        )),
        None => Err(ApiError::invalid_at(
            IssueCode::Required,
            "an update needs the resource's id in the body",
            format!("{resource_type}.id"),
        )),
    }
}

pub(crate) async fn update_in(
    exec: &Exec<'_>,
    tx: &mut dyn StoreTx,
    resource_type: &str,
    id: &str,
    resource: Value,
    if_match: Option<i64>,
) -> Result<FhirResponse, ApiError> {
    let (stored, created) = tx.update(resource_type, id, resource, if_match).await?;
    Ok(if created {
        written(exec, StatusCode::CREATED, &stored, "Created")
    } else {
        written(exec, StatusCode::OK, &stored, "Updated")
    })
}

pub(crate) async fn conditional_update(
    exec: &Exec<'_>,
    resource_type: &str,
    criteria: &str,
    resource: &Value,
    if_match: Option<i64>,
) -> Result<FhirResponse, ApiError> {
    check_resource(resource_type, resource)?;
    let mut tx = exec.state.store.begin().await?;
    let response = conditional_update_in(
        exec,
        tx.as_mut(),
        resource_type,
        criteria,
        resource.clone(),
        if_match,
    )
    .await?;
    tx.commit().await?;
    Ok(response)
}

/// Which id a conditional update writes to (R4 http.html#cond-update): the one
/// match, or for no match the body's id (update as create) or a new one.
pub(crate) async fn conditional_update_target(
    exec: &Exec<'_>,
    tx: &mut dyn StoreTx,
    resource_type: &str,
    criteria: &str,
    resource: &Value,
) -> Result<String, ApiError> {
    let body_id = resource.get("id").and_then(Value::as_str);
    match matching(exec, tx, resource_type, criteria).await? {
        Matched::One(existing) => match body_id {
            Some(b) if b != existing.id => Err(ApiError::invalid_at(
                IssueCode::Invalid,
                format!(
                    "the body's id '{b}' differs from the matching resource's id '{}'",
                    existing.id
                ),
                format!("{resource_type}.id"),
            )),
            _ => Ok(existing.id),
        },
        Matched::None => match body_id {
            // R4 http.html#cond-update: no match, and the body's id names an existing
            // resource that the criteria did not match: 409, never an overwrite.
            Some(b) if is_valid_id(b) => match tx.read(resource_type, b).await? {
                Some(current) if !current.is_deleted() => Err(ApiError::Conflict(format!(
                    "no {resource_type} matches '{criteria}', but {resource_type}/{b} exists"
                ))),
                _ => Ok(b.to_owned()),
            },
            Some(b) => Err(ApiError::invalid_at(
                IssueCode::Value,
                format!("'{b}' is not a valid id"),
                format!("{resource_type}.id"),
            )),
            None => Ok(new_id()),
        },
        Matched::Many => Err(many_matches("conditional update", criteria)),
    }
}

pub(crate) async fn conditional_update_in(
    exec: &Exec<'_>,
    tx: &mut dyn StoreTx,
    resource_type: &str,
    criteria: &str,
    mut resource: Value,
    if_match: Option<i64>,
) -> Result<FhirResponse, ApiError> {
    let id = conditional_update_target(exec, tx, resource_type, criteria, &resource).await?;
    resource["id"] = Value::String(id.clone());
    update_in(exec, tx, resource_type, &id, resource, if_match).await
}

pub(crate) async fn patch(
    exec: &Exec<'_>,
    resource_type: &str,
    target: &Target,
    patch: &Value,
    if_match: Option<i64>,
) -> Result<FhirResponse, ApiError> {
    let mut tx = exec.state.store.begin().await?;
    let id = match target {
        Target::Id(id) => id.clone(),
        Target::Criteria(criteria) => {
            match matching(exec, tx.as_mut(), resource_type, criteria).await? {
                Matched::One(found) => found.id,
                Matched::None => {
                    return Err(ApiError::NotFound(format!(
                        "no {resource_type} matches '{criteria}'"
                    )))
                }
                Matched::Many => return Err(many_matches("conditional patch", criteria)),
            }
        }
    };
    let response = patch_in(exec, tx.as_mut(), resource_type, &id, patch, if_match).await?;
    tx.commit().await?;
    Ok(response)
}

/// Applies an RFC 6902 patch to the current version and stores the result.
pub(crate) async fn patch_in(
    exec: &Exec<'_>,
    tx: &mut dyn StoreTx,
    resource_type: &str,
    id: &str,
    patch: &Value,
    if_match: Option<i64>,
) -> Result<FhirResponse, ApiError> {
    let operations: json_patch::Patch = serde_json::from_value(patch.clone()).map_err(|e| {
        ApiError::invalid(
            IssueCode::Structure,
            format!("the body is not a JSON Patch document: {e}"),
        )
    })?;
    for op in &operations.0 {
        let mut paths = vec![op.path().as_str()];
        match op {
            json_patch::PatchOperation::Move(m) => paths.push(m.from.as_str()),
            json_patch::PatchOperation::Copy(c) => paths.push(c.from.as_str()),
            _ => {}
        }
        // Copying *from* id is harmless, but simpler to refuse alike.
        if paths
            .iter()
            .any(|p| p.is_empty() || *p == "/id" || p.starts_with("/id/") || *p == "/resourceType")
        {
            return Err(ApiError::invalid(
                IssueCode::Invalid,
                "a patch may not change a resource's id or resourceType",
            ));
        }
    }
    let current = tx
        .read(resource_type, id)
        .await?
        .ok_or_else(|| not_found(resource_type, id))?;
    let Some(mut document) = current.resource.clone() else {
        return Err(gone(resource_type, id));
    };
    if let Some(expected) = if_match {
        if expected != current.version {
            return Err(ApiError::precondition(
                IssueCode::Conflict,
                format!(
                    "If-Match names version {expected}, but the current version is {}",
                    current.version
                ),
            ));
        }
    }
    json_patch::patch(&mut document, &operations.0)
        .map_err(|e| ApiError::Unprocessable(format!("the patch cannot be applied: {e}")))?;
    if document.get("id").and_then(Value::as_str) != Some(id)
        || document.get("resourceType").and_then(Value::as_str) != Some(resource_type)
    {
        return Err(ApiError::invalid(
            IssueCode::Invalid,
            "a patch may not change a resource's id or resourceType",
        ));
    }
    check_resource(resource_type, &document)?;
    let (stored, _) = tx
        .update(resource_type, id, document, Some(current.version))
        .await
        .map_err(|e| {
            let e = ApiError::from(e);
            // Without If-Match the version check was ours: a race, not a precondition.
            if if_match.is_none() {
                e.concurrent_change()
            } else {
                e
            }
        })?;
    Ok(written(exec, StatusCode::OK, &stored, "Patched"))
}

pub(crate) async fn delete(
    exec: &Exec<'_>,
    resource_type: &str,
    id: &str,
    if_match: Option<i64>,
) -> Result<FhirResponse, ApiError> {
    let mut tx = exec.state.store.begin().await?;
    let response = delete_in(exec, tx.as_mut(), resource_type, id, if_match).await?;
    tx.commit().await?;
    Ok(response)
}

pub(crate) async fn delete_in(
    exec: &Exec<'_>,
    tx: &mut dyn StoreTx,
    resource_type: &str,
    id: &str,
    if_match: Option<i64>,
) -> Result<FhirResponse, ApiError> {
    let _ = exec;
    match tx.delete(resource_type, id, if_match).await? {
        Some(deleted) => Ok(FhirResponse::outcome(
            StatusCode::OK,
            &[Issue::information(
                IssueCode::Informational,
                format!("deleted {resource_type}/{id}"),
            )],
        )
        .with_version_headers(&deleted)),
        None => Ok(FhirResponse::new(StatusCode::NO_CONTENT, None)),
    }
}

pub(crate) async fn conditional_delete(
    exec: &Exec<'_>,
    resource_type: &str,
    criteria: &str,
) -> Result<FhirResponse, ApiError> {
    let mut tx = exec.state.store.begin().await?;
    let response = conditional_delete_in(exec, tx.as_mut(), resource_type, criteria).await?;
    tx.commit().await?;
    Ok(response)
}

pub(crate) async fn conditional_delete_in(
    exec: &Exec<'_>,
    tx: &mut dyn StoreTx,
    resource_type: &str,
    criteria: &str,
) -> Result<FhirResponse, ApiError> {
    match matching(exec, tx, resource_type, criteria).await? {
        Matched::None => Ok(FhirResponse::new(StatusCode::NO_CONTENT, None)),
        Matched::One(found) => delete_in(exec, tx, resource_type, &found.id, None).await,
        Matched::Many => Err(many_matches("conditional delete", criteria)),
    }
}

/// A read inside a transaction (for GET entries of a FHIR transaction).
pub(crate) async fn read_in(
    exec: &Exec<'_>,
    tx: &mut dyn StoreTx,
    resource_type: &str,
    id: &str,
    if_none_match: Option<i64>,
    if_modified_since: Option<SystemTime>,
) -> Result<FhirResponse, ApiError> {
    let current = tx
        .read(resource_type, id)
        .await?
        .ok_or_else(|| not_found(resource_type, id))?;
    // The transaction's store admits what may be changed; answering needs Read.
    if current
        .resource
        .as_ref()
        .is_some_and(|r| !exec.gate.may_read(r))
    {
        return Err(ApiError::Forbidden(crate::smart::REFUSED.into()));
    }
    read_answer(exec, current, if_none_match, if_modified_since)
}

/// `fullUrl` of a resource.
pub(crate) fn full_url(exec: &Exec<'_>, resource_type: &str, id: &str) -> String {
    resource_url(exec, resource_type, id)
}
