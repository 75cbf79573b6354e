//! Batch and transaction (R4 http.html#transaction).
//!
//! Each entry's `request` is parsed into an [`Interaction`] by the same parser
//! as a direct request and passes the pipeline's gate (authorization and
//! consent) on its own.
//!
//! - **Batch**: entries are independent; each runs as a single interaction in
//!   its own store transaction, and failures are reported per entry.
//! - **Transaction**: everything runs in one store transaction; the first
//!   failing entry fails the whole request with its status and OperationOutcome
//!   (expressions prefixed with `Bundle.entry[n]`), and nothing is written.
//!   Ids of created resources are assigned before anything is written, so every
//!   `urn:uuid:`/`urn:oid:` reference (in any `reference` element, however
//!   nested) and every conditional reference (`Patient?identifier=...`, exactly
//!   one match required) is rewritten to `Type/id` first.
//!
//! Both process entries in the order R4 prescribes (DELETE, POST, PUT/PATCH,
//! GET/HEAD) and answer in the order of the request. Entries return their
//! resource only with `Prefer: return=representation`. PATCH entries carry a JSON
//! Patch in a base64 Binary; FHIRPath Patch (a Parameters body) is not supported,
//! nor are vread and history inside a transaction, because they could not see its
//! uncommitted writes.

use std::collections::HashMap;

use haven_model::id::new_id;
use haven_model::outcome::IssueCode;
use haven_model::registry::is_resource_type;
use haven_store::StoreTx;
use http::header::LOCATION;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{json, Value};

use super::instance::{
    self, conditional_update_target, create_in, delete_in, matching, patch_in, read_in, update_in,
    Matched,
};
use super::{check_resource, execute_one, locate_in_entry, search};
use crate::error::ApiError;
use crate::interaction::{self, Interaction, RequestBody, Target};
use crate::pipeline::Exec;
use crate::response::{instant, status_line, FhirResponse};

/// Entries above which a transaction is large enough to run in a database
/// transaction of its own (see [`haven_store::Store::begin_large`]); a few dozen
/// entries share a commit with concurrent requests at little memory cost.
const LARGE_TRANSACTION_ENTRIES: usize = 32;

/// One entry, understood.
struct Entry {
    index: usize,
    full_url: Option<String>,
    interaction: Interaction,
}

/// R4 http.html#trules: DELETE, then POST, then PUT/PATCH, then GET/HEAD.
fn rank(interaction: &Interaction) -> u8 {
    match interaction {
        Interaction::Delete { .. } | Interaction::ConditionalDelete { .. } => 0,
        Interaction::Create { .. } => 1,
        Interaction::Update { .. }
        | Interaction::ConditionalUpdate { .. }
        | Interaction::Patch { .. } => 2,
        _ => 3,
    }
}

fn entries(bundle: &Value) -> &[Value] {
    bundle
        .get("entry")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Parses `Bundle.entry[index]` into an interaction.
fn parse_entry(exec: &Exec<'_>, index: usize, entry: &Value) -> Result<Entry, ApiError> {
    let at = |field: &str| format!("Bundle.entry[{index}].{field}");
    let request = entry.get("request").ok_or_else(|| {
        ApiError::invalid_at(
            IssueCode::Required,
            "the entry has no request",
            at("request"),
        )
    })?;
    let method = match request.get("method").and_then(Value::as_str) {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        Some("POST") => Method::POST,
        Some("PUT") => Method::PUT,
        Some("DELETE") => Method::DELETE,
        Some("PATCH") => Method::PATCH,
        _ => {
            return Err(ApiError::invalid_at(
                IssueCode::Required,
                "the entry's request.method must be GET, HEAD, POST, PUT, PATCH or DELETE",
                at("request.method"),
            ))
        }
    };
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            ApiError::invalid_at(
                IssueCode::Required,
                "the entry has no request.url",
                at("request.url"),
            )
        })?;
    let base = &exec.state.config.base_url;
    let relative = match url.strip_prefix(base.as_str()) {
        Some(rest) => rest.trim_start_matches('/'),
        None if url.split('?').next().unwrap_or("").contains("://") => {
            return Err(ApiError::invalid_at(
                IssueCode::NotSupported,
                format!("'{url}' is not on this server"),
                at("request.url"),
            ))
        }
        None => url.trim_start_matches('/'),
    };
    let (path, query) = match relative.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (relative, None),
    };
    let mut headers = HeaderMap::new();
    for (field, header) in [
        ("ifMatch", "if-match"),
        ("ifNoneMatch", "if-none-match"),
        ("ifNoneExist", "if-none-exist"),
    ] {
        if let Some(v) = request.get(field).and_then(Value::as_str) {
            let v = HeaderValue::from_str(v).map_err(|_| {
                ApiError::invalid_at(
                    IssueCode::Value,
                    "not a valid value",
                    at(&format!("request.{field}")),
                )
            })?;
            headers.insert(header, v);
        }
    }
    if let Some(since) = request.get("ifModifiedSince").and_then(Value::as_str) {
        let t = time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
            .map_err(|_| {
                ApiError::invalid_at(
                    IssueCode::Value,
                    "not an instant",
                    at("request.ifModifiedSince"),
                )
            })?;
        if let Ok(v) = HeaderValue::from_str(&crate::response::http_date(t)) {
            headers.insert("if-modified-since", v);
        }
    }
    let body = match (&method, entry.get("resource")) {
        (&Method::POST | &Method::PUT, Some(resource)) => RequestBody::Resource(resource.clone()),
        (&Method::PATCH, resource) => {
            RequestBody::JsonPatch(patch_from_binary(exec, resource, &at)?)
        }
        _ => RequestBody::None,
    };
    let interaction = interaction::parse(&method, path, query, &headers, body)?;
    Ok(Entry {
        index,
        full_url: entry
            .get("fullUrl")
            .and_then(Value::as_str)
            .map(str::to_owned),
        interaction,
    })
}

/// R4 http.html#transaction: a PATCH entry carries its JSON Patch document as a
/// Binary resource, base64-encoded in `data`.
fn patch_from_binary(
    exec: &Exec<'_>,
    resource: Option<&Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<Value, ApiError> {
    use base64::Engine as _;
    let binary = resource
        .filter(|r| r["resourceType"] == "Binary")
        .ok_or_else(|| {
            ApiError::invalid_at(
                IssueCode::Required,
                "a PATCH entry needs a Binary resource holding the JSON Patch",
                at("resource"),
            )
        })?;
    if binary["contentType"].as_str() != Some("application/json-patch+json") {
        return Err(ApiError::invalid_at(
            IssueCode::NotSupported,
            "only JSON Patch (application/json-patch+json) is supported",
            at("resource.contentType"),
        ));
    }
    let not_a_patch = || {
        ApiError::invalid_at(
            IssueCode::Value,
            "Binary.data must be a base64-encoded JSON Patch document",
            at("resource.data"),
        )
    };
    let data = binary["data"].as_str().ok_or_else(not_a_patch)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| not_a_patch())?;
    crate::strict_json::parse(&bytes, exec.state.config.limits.max_json_depth)
        .map_err(|_| not_a_patch())
}

/// `Bundle.entry.response` (and `resource`) for one answered entry.
fn response_entry(exec: &Exec<'_>, response: FhirResponse) -> Value {
    let mut out = json!({"status": status_line(response.status)});
    if let Some(location) = response.header(&LOCATION) {
        out["location"] = json!(location);
    }
    if let Some(etag) = response.header(&http::header::ETAG) {
        out["etag"] = json!(etag);
    }
    if let Some(t) = response.last_modified {
        out["lastModified"] = json!(instant(t));
    }
    let mut entry = json!({});
    if let Some(location) = response.header(&LOCATION) {
        // `[base]/Type/id/_history/n` names the resource as `[base]/Type/id`.
        if let Some((resource, _)) = location.split_once("/_history/") {
            entry["fullUrl"] = json!(resource);
        }
    }
    match response.body {
        Some(body)
            if body.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome") =>
        {
            out["outcome"] = body;
        }
        Some(body) => entry["resource"] = body,
        None => {}
    }
    let _ = exec;
    entry["response"] = out;
    entry
}

fn error_entry(error: &ApiError) -> Value {
    if error.is_internal() {
        tracing::error!(error = %error, "a batch entry failed");
    }
    json!({"response": {
        "status": status_line(error.status()),
        "outcome": error.outcome(None),
    }})
}

fn response_bundle(exec: &Exec<'_>, kind: &str, entries: Vec<Value>) -> FhirResponse {
    FhirResponse::ok(json!({
        "resourceType": "Bundle",
        "id": new_id(),
        "meta": {"lastUpdated": instant(exec.state.clock.now())},
        "type": kind,
        "entry": entries,
    }))
}

/// Entries answer with their resource only when asked to.
fn entry_exec<'a>(exec: &Exec<'a>) -> Exec<'a> {
    let mut e = *exec;
    e.prefer.return_ = Some(
        exec.prefer
            .return_
            .unwrap_or(crate::pipeline::Return::Minimal),
    );
    e
}

pub(crate) async fn batch(exec: &Exec<'_>, bundle: &Value) -> Result<FhirResponse, ApiError> {
    let exec = &entry_exec(exec);
    let raw = entries(bundle);
    let mut answers: Vec<Value> = vec![Value::Null; raw.len()];
    let mut parsed = Vec::new();
    for (index, entry) in raw.iter().enumerate() {
        match parse_entry(exec, index, entry) {
            Ok(e) => parsed.push(e),
            Err(error) => answers[index] = error_entry(&locate_in_entry(error, index, None)),
        }
    }
    parsed.sort_by_key(|e| rank(&e.interaction));
    for entry in parsed {
        let index = entry.index;
        let resource_type = entry.interaction.resource_type().map(str::to_owned);
        let result = async {
            exec.gate.admit(&entry.interaction).await?;
            execute_one(exec, &entry.interaction).await
        }
        .await;
        answers[index] = match result {
            Ok(response) => response_entry(exec, response),
            Err(error) => error_entry(&locate_in_entry(error, index, resource_type.as_deref())),
        };
    }
    Ok(response_bundle(exec, "batch-response", answers))
}

/// What a transaction will do for one entry, once ids are known.
enum Plan {
    /// Already answered (a conditional create that found its resource).
    Done,
    Create {
        id: String,
        resource: Value,
    },
    Update {
        id: String,
        resource: Value,
        if_match: Option<i64>,
    },
    Patch {
        id: String,
        patch: Value,
        if_match: Option<i64>,
    },
    Other,
}

pub(crate) async fn transaction(exec: &Exec<'_>, bundle: &Value) -> Result<FhirResponse, ApiError> {
    let exec = &entry_exec(exec);
    let raw = entries(bundle);

    // Understand, admit and validate every entry before touching the store.
    let mut parsed = Vec::with_capacity(raw.len());
    for (index, entry) in raw.iter().enumerate() {
        let e = parse_entry(exec, index, entry).map_err(|err| locate_in_entry(err, index, None))?;
        let resource_type = e.interaction.resource_type().map(str::to_owned);
        let locate = |err| locate_in_entry(err, index, resource_type.as_deref());
        exec.gate.admit(&e.interaction).await.map_err(locate)?;
        if e.interaction.resource_type() == Some("AuditEvent") {
            // The audit trail is not part of a transaction's snapshot.
            return Err(locate(ApiError::invalid(
                IssueCode::NotSupported,
                "AuditEvents are read outside transactions",
            )));
        }
        match &e.interaction {
            Interaction::Create {
                resource_type,
                resource,
                ..
            }
            | Interaction::ConditionalUpdate {
                resource_type,
                resource,
                ..
            } => check_resource(resource_type, resource).map_err(locate)?,
            Interaction::Update {
                resource_type,
                id,
                resource,
                ..
            } => instance::check_update_body(resource_type, id, resource).map_err(locate)?,
            Interaction::Batch { .. }
            | Interaction::Transaction { .. }
            | Interaction::VRead { .. }
            | Interaction::History { .. }
            | Interaction::Validate { .. }
            | Interaction::VerifyAuditTrail => {
                return Err(locate(ApiError::invalid(
                    IssueCode::NotSupported,
                    format!(
                        "{} is not supported inside a transaction",
                        e.interaction.name()
                    ),
                )))
            }
            _ => {}
        }
        parsed.push(e);
    }
    parsed.sort_by_key(|e| rank(&e.interaction));

    let mut tx = if parsed.len() > LARGE_TRANSACTION_ENTRIES {
        exec.state.store.begin_large().await?
    } else {
        exec.state.store.begin().await?
    };
    let mut answers: Vec<Option<FhirResponse>> = vec![None; raw.len()];
    let mut plans: Vec<Plan> = Vec::with_capacity(parsed.len());
    let mut ids: HashMap<String, String> = HashMap::new();

    // Deletes first; then every other entry learns its id.
    for e in &parsed {
        let locate = |err| locate_in_entry(err, e.index, e.interaction.resource_type());
        let plan = match &e.interaction {
            Interaction::Delete {
                resource_type,
                id,
                if_match,
            } => {
                answers[e.index] = Some(
                    delete_in(exec, tx.as_mut(), resource_type, id, *if_match)
                        .await
                        .map_err(locate)?,
                );
                Plan::Done
            }
            Interaction::ConditionalDelete {
                resource_type,
                criteria,
            } => {
                answers[e.index] = Some(
                    instance::conditional_delete_in(exec, tx.as_mut(), resource_type, criteria)
                        .await
                        .map_err(locate)?,
                );
                Plan::Done
            }
            Interaction::Create {
                resource_type,
                resource,
                if_none_exist,
            } => {
                let mut id = None;
                if let Some(criteria) = if_none_exist {
                    match matching(exec, tx.as_mut(), resource_type, criteria)
                        .await
                        .map_err(locate)?
                    {
                        Matched::None => {}
                        Matched::One(existing) => {
                            id = Some(existing.id.clone());
                            answers[e.index] = Some(super::written(
                                exec,
                                StatusCode::OK,
                                &existing,
                                "Found existing",
                            ));
                        }
                        Matched::Many => {
                            return Err(locate(instance::many_matches("ifNoneExist", criteria)))
                        }
                    }
                }
                let done = id.is_some();
                let id = id.unwrap_or_else(new_id);
                if let Some(full_url) = &e.full_url {
                    ids.insert(full_url.clone(), format!("{resource_type}/{id}"));
                }
                if done {
                    Plan::Done
                } else {
                    Plan::Create {
                        id,
                        resource: resource.clone(),
                    }
                }
            }
            Interaction::Update {
                resource_type,
                id,
                resource,
                if_match,
            } => {
                if let Some(full_url) = &e.full_url {
                    ids.insert(full_url.clone(), format!("{resource_type}/{id}"));
                }
                Plan::Update {
                    id: id.clone(),
                    resource: resource.clone(),
                    if_match: *if_match,
                }
            }
            Interaction::ConditionalUpdate {
                resource_type,
                criteria,
                resource,
                if_match,
            } => {
                let id =
                    conditional_update_target(exec, tx.as_mut(), resource_type, criteria, resource)
                        .await
                        .map_err(locate)?;
                if let Some(full_url) = &e.full_url {
                    ids.insert(full_url.clone(), format!("{resource_type}/{id}"));
                }
                let mut resource = resource.clone();
                resource["id"] = Value::String(id.clone());
                Plan::Update {
                    id,
                    resource,
                    if_match: *if_match,
                }
            }
            Interaction::Patch {
                resource_type,
                target,
                patch,
                if_match,
            } => {
                let id = match target {
                    Target::Id(id) => id.clone(),
                    Target::Criteria(criteria) => {
                        match matching(exec, tx.as_mut(), resource_type, criteria)
                            .await
                            .map_err(locate)?
                        {
                            Matched::One(found) => found.id,
                            Matched::None => {
                                return Err(locate(ApiError::NotFound(format!(
                                    "no {resource_type} matches '{criteria}'"
                                ))))
                            }
                            Matched::Many => {
                                return Err(locate(instance::many_matches(
                                    "conditional patch",
                                    criteria,
                                )))
                            }
                        }
                    }
                };
                Plan::Patch {
                    id,
                    patch: patch.clone(),
                    if_match: *if_match,
                }
            }
            _ => Plan::Other,
        };
        plans.push(plan);
    }

    // Rewrite references now that every id is known.
    let mut conditional: HashMap<String, String> = HashMap::new();
    for (e, plan) in parsed.iter().zip(plans.iter_mut()) {
        let locate = |err| locate_in_entry(err, e.index, e.interaction.resource_type());
        let resource = match plan {
            Plan::Create { resource, .. } | Plan::Update { resource, .. } => resource,
            // A patch's values are rewritten like a resource's; a bare string value
            // (`"path": "/subject/reference"`) that names an entry is rewritten too.
            Plan::Patch { patch, .. } => {
                rewrite_patch_strings(patch, &ids).map_err(locate)?;
                patch
            }
            _ => continue,
        };
        let mut wanted = Vec::new();
        visit_references(resource, &mut |r| {
            if is_conditional_reference(r) && !conditional.contains_key(r) {
                wanted.push(r.to_owned());
            }
        });
        for reference in wanted {
            let target = resolve_conditional(exec, tx.as_mut(), &reference)
                .await
                .map_err(locate)?;
            conditional.insert(reference, target);
        }
        let mut unresolved = None;
        rewrite_references(resource, &mut |r| {
            if r.starts_with("urn:uuid:") || r.starts_with("urn:oid:") {
                match ids.get(r) {
                    Some(target) => Some(target.clone()),
                    None => {
                        unresolved.get_or_insert_with(|| r.to_owned());
                        None
                    }
                }
            } else {
                conditional.get(r).cloned()
            }
        });
        if let Some(r) = unresolved {
            return Err(locate(ApiError::invalid(
                IssueCode::NotFound,
                format!("the reference '{r}' names no entry of this transaction"),
            )));
        }
    }

    // Writes, in processing order.
    for (e, plan) in parsed.iter().zip(plans) {
        let locate = |err| locate_in_entry(err, e.index, e.interaction.resource_type());
        let Some(resource_type) = e.interaction.resource_type() else {
            continue;
        };
        let answer = match plan {
            Plan::Create { id, resource } => {
                create_in(exec, tx.as_mut(), resource_type, resource, &id).await
            }
            Plan::Update {
                id,
                resource,
                if_match,
            } => update_in(exec, tx.as_mut(), resource_type, &id, resource, if_match).await,
            Plan::Patch {
                id,
                patch,
                if_match,
            } => patch_in(exec, tx.as_mut(), resource_type, &id, &patch, if_match).await,
            Plan::Done | Plan::Other => continue,
        };
        answers[e.index] = Some(answer.map_err(locate)?);
    }

    // Reads last, inside the transaction so they see its writes.
    for e in &parsed {
        let locate = |err| locate_in_entry(err, e.index, e.interaction.resource_type());
        let answer = match &e.interaction {
            Interaction::Read {
                resource_type,
                id,
                if_none_match,
                if_modified_since,
            } => {
                read_in(
                    exec,
                    tx.as_mut(),
                    resource_type,
                    id,
                    *if_none_match,
                    *if_modified_since,
                )
                .await
            }
            Interaction::Search {
                resource_type,
                params,
            } => {
                let scope = search::Scope::Types(resource_type.as_deref());
                search::search(exec, scope, params, Some(tx.as_mut())).await
            }
            Interaction::Capabilities => execute_one(exec, &e.interaction).await,
            _ => continue,
        };
        answers[e.index] = Some(answer.map_err(locate)?);
    }

    tx.commit().await?;
    let entries = answers
        .into_iter()
        .map(|a| match a {
            Some(response) => response_entry(exec, response),
            None => json!({"response": {"status": status_line(StatusCode::OK)}}),
        })
        .collect();
    Ok(response_bundle(exec, "transaction-response", entries))
}

/// `Patient?identifier=...`: a reference by search (R4 http.html#trules).
fn is_conditional_reference(reference: &str) -> bool {
    match reference.split_once('?') {
        Some((target, _)) => {
            !target.is_empty()
                && !target.starts_with('#')
                && !target.starts_with("urn:")
                && !target.contains(['/', ':'])
        }
        None => false,
    }
}

async fn resolve_conditional(
    exec: &Exec<'_>,
    tx: &mut dyn StoreTx,
    reference: &str,
) -> Result<String, ApiError> {
    let (resource_type, criteria) = reference.split_once('?').unwrap_or((reference, ""));
    if !is_resource_type(resource_type) {
        return Err(ApiError::invalid(
            IssueCode::Invalid,
            format!("the conditional reference '{reference}' names no resource type"),
        ));
    }
    match matching(exec, tx, resource_type, criteria).await? {
        Matched::One(found) => Ok(format!("{resource_type}/{}", found.id)),
        Matched::None => Err(ApiError::precondition(
            IssueCode::NotFound,
            format!("the conditional reference '{reference}' matches nothing"),
        )),
        Matched::Many => Err(ApiError::precondition(
            IssueCode::MultipleMatches,
            format!("the conditional reference '{reference}' matches more than one resource"),
        )),
    }
}

/// Calls `f` with every `reference` string, at any depth.
fn visit_references(value: &Value, f: &mut impl FnMut(&str)) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("reference", Value::String(r)) => f(r),
                    _ => visit_references(v, f),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| visit_references(v, f)),
        _ => {}
    }
}

/// Replaces every `reference` string for which `f` returns a new value.
/// Rewrites the string values of JSON Patch operations on a `.../reference` path
/// that are `urn:` references to entries of the transaction; one that names no
/// entry is an error.
fn rewrite_patch_strings(patch: &mut Value, ids: &HashMap<String, String>) -> Result<(), ApiError> {
    let operations = patch.as_array_mut().into_iter().flatten();
    let at_reference = |op: &Value| {
        op["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("/reference"))
    };
    for value in operations
        .filter(|op| at_reference(op))
        .filter_map(|op| op.get_mut("value"))
    {
        let Value::String(r) = value else { continue };
        if !(r.starts_with("urn:uuid:") || r.starts_with("urn:oid:")) {
            continue;
        }
        match ids.get(r.as_str()) {
            Some(target) => *r = target.clone(),
            None => {
                return Err(ApiError::invalid(
                    IssueCode::NotFound,
                    format!("the reference '{r}' names no entry of this transaction"),
                ))
            }
        }
    }
    Ok(())
}

fn rewrite_references(value: &mut Value, f: &mut impl FnMut(&str) -> Option<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(r) if key == "reference" => {
                        if let Some(new) = f(r) {
                            *r = new;
                        }
                    }
                    other => rewrite_references(other, f),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_references(v, f)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_rewritten_at_any_depth_and_only_in_reference_elements() {
        let mut v = json!({
            "subject": {"reference": "urn:uuid:1"},
            "identifier": [{"value": "urn:uuid:1"}],
            "contained": [{"x": [{"y": {"reference": "urn:uuid:1"}}]}],
        });
        rewrite_references(&mut v, &mut |r| {
            (r == "urn:uuid:1").then(|| "Patient/a".to_owned())
        });
        assert_eq!(v["subject"]["reference"], "Patient/a");
        assert_eq!(v["identifier"][0]["value"], "urn:uuid:1");
        assert_eq!(v["contained"][0]["x"][0]["y"]["reference"], "Patient/a");
    }

    #[test]
    fn conditional_references_are_recognised() {
        assert!(is_conditional_reference("Patient?identifier=a|b"));
        assert!(!is_conditional_reference("Patient/1"));
        assert!(!is_conditional_reference("urn:uuid:x"));
        assert!(!is_conditional_reference("http://x/Patient?a=b"));
    }
}
