//! Requests as FHIR interactions.
//!
//! The first pipeline stage turns a method, a path under the FHIR base, a query
//! string, a few headers and a body into one [`Interaction`]. Everything after
//! that (authorization, consent, execution, auditing) works on the enum, so a
//! new interaction is a new variant that every stage's `match` must handle, and
//! no route can exist that the stages do not see. Batch and transaction entries
//! are parsed by the same function ([`parse`]), from `Bundle.entry.request`.

use std::time::SystemTime;

use haven_model::id::is_valid_id;
use haven_model::outcome::IssueCode;
use haven_model::registry::is_resource_type;
use http::{HeaderMap, Method};
use serde_json::Value;

use crate::error::ApiError;
use crate::search_params::query_pairs;

/// One FHIR interaction (R4 http.html), fully parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Interaction {
    /// `GET [base]/metadata`
    Capabilities,
    /// `GET [base]/[type]/[id]`
    Read {
        resource_type: String,
        id: String,
        if_none_match: Option<i64>,
        if_modified_since: Option<SystemTime>,
    },
    /// `GET [base]/[type]/[id]/_history/[vid]`
    VRead {
        resource_type: String,
        id: String,
        version: i64,
    },
    /// `POST [base]/[type]`, conditional with `If-None-Exist`.
    Create {
        resource_type: String,
        resource: Value,
        if_none_exist: Option<String>,
    },
    /// `PUT [base]/[type]/[id]`
    Update {
        resource_type: String,
        id: String,
        resource: Value,
        if_match: Option<i64>,
    },
    /// `PUT [base]/[type]?[criteria]`
    ConditionalUpdate {
        resource_type: String,
        criteria: String,
        resource: Value,
        if_match: Option<i64>,
    },
    /// `PATCH [base]/[type]/[id]` with a JSON Patch document.
    Patch {
        resource_type: String,
        target: Target,
        patch: Value,
        if_match: Option<i64>,
    },
    /// `DELETE [base]/[type]/[id]`
    Delete {
        resource_type: String,
        id: String,
        if_match: Option<i64>,
    },
    /// `DELETE [base]/[type]?[criteria]`
    ConditionalDelete {
        resource_type: String,
        criteria: String,
    },
    /// `GET [base]/_history`, `[base]/[type]/_history`, `[base]/[type]/[id]/_history`
    History {
        resource_type: Option<String>,
        id: Option<String>,
        params: Vec<(String, String)>,
    },
    /// `GET [base]/[type]?...`, `POST [base]/[type]/_search`, `GET [base]?...`
    Search {
        resource_type: Option<String>,
        params: Vec<(String, String)>,
    },
    /// `GET [base]/Patient/[id]/[type]?...`: a search within one patient's
    /// compartment.
    CompartmentSearch {
        patient: String,
        resource_type: String,
        params: Vec<(String, String)>,
    },
    /// `GET [base]/Patient/[id]/$everything`
    Everything {
        patient: String,
        params: Vec<(String, String)>,
    },
    /// `POST [base]` with a Bundle of type `batch`.
    Batch { bundle: Value },
    /// `POST [base]` with a Bundle of type `transaction`.
    Transaction { bundle: Value },
    /// `[base]/[type]/$validate` and `[base]/[type]/[id]/$validate`
    Validate {
        resource_type: String,
        id: Option<String>,
        resource: Option<Value>,
    },
    /// `[base]/AuditEvent/$verify`: walk the audit trail's hash chain.
    VerifyAuditTrail,
}

/// Which resource a patch applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Id(String),
    Criteria(String),
}

impl Interaction {
    /// The interaction code as in `CapabilityStatement.rest.resource.interaction`
    /// (or the operation name), for logs and audit records.
    pub fn name(&self) -> &'static str {
        match self {
            Interaction::Capabilities => "capabilities",
            Interaction::Read { .. } => "read",
            Interaction::VRead { .. } => "vread",
            Interaction::Create { .. } => "create",
            Interaction::Update { .. } | Interaction::ConditionalUpdate { .. } => "update",
            Interaction::Patch { .. } => "patch",
            Interaction::Delete { .. } | Interaction::ConditionalDelete { .. } => "delete",
            Interaction::History { id: Some(_), .. } => "history-instance",
            Interaction::History {
                resource_type: Some(_),
                ..
            } => "history-type",
            Interaction::History { .. } => "history-system",
            Interaction::Search {
                resource_type: Some(_),
                ..
            } => "search-type",
            Interaction::Search { .. } => "search-system",
            Interaction::CompartmentSearch { .. } => "search-type",
            Interaction::Everything { .. } => "$everything",
            Interaction::Batch { .. } => "batch",
            Interaction::Transaction { .. } => "transaction",
            Interaction::Validate { .. } => "$validate",
            Interaction::VerifyAuditTrail => "$verify",
        }
    }

    /// The resource type the interaction is about, if it is about one.
    pub fn resource_type(&self) -> Option<&str> {
        match self {
            Interaction::Capabilities
            | Interaction::Batch { .. }
            | Interaction::Transaction { .. } => None,
            Interaction::Read { resource_type, .. }
            | Interaction::VRead { resource_type, .. }
            | Interaction::Create { resource_type, .. }
            | Interaction::Update { resource_type, .. }
            | Interaction::ConditionalUpdate { resource_type, .. }
            | Interaction::Patch { resource_type, .. }
            | Interaction::Delete { resource_type, .. }
            | Interaction::ConditionalDelete { resource_type, .. }
            | Interaction::Validate { resource_type, .. } => Some(resource_type),
            Interaction::VerifyAuditTrail => Some("AuditEvent"),
            Interaction::CompartmentSearch { resource_type, .. } => Some(resource_type),
            Interaction::Everything { .. } => Some("Patient"),
            Interaction::History { resource_type, .. }
            | Interaction::Search { resource_type, .. } => resource_type.as_deref(),
        }
    }

    /// Whether the interaction can change stored data.
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Interaction::Create { .. }
                | Interaction::Update { .. }
                | Interaction::ConditionalUpdate { .. }
                | Interaction::Patch { .. }
                | Interaction::Delete { .. }
                | Interaction::ConditionalDelete { .. }
                | Interaction::Batch { .. }
                | Interaction::Transaction { .. }
        )
    }
}

/// A request body, already read under the limits and decoded by content type.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestBody {
    None,
    /// `application/fhir+json` or `application/json`.
    Resource(Value),
    /// `application/json-patch+json`.
    JsonPatch(Value),
    /// `application/x-www-form-urlencoded` (search by POST).
    Form(Vec<(String, String)>),
}

/// Parses a request into an interaction. `path` is what follows the FHIR base,
/// without a leading slash; `query` the raw query string.
pub fn parse(
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: RequestBody,
) -> Result<Interaction, ApiError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let query = query.unwrap_or("");
    let params = || {
        query_pairs(query)
            .into_iter()
            .filter(|(k, _)| k != "_format")
            .collect::<Vec<_>>()
    };
    let has_criteria = || params().iter().any(|(_, v)| !v.is_empty());
    let get = method == Method::GET || method == Method::HEAD;
    let not_allowed = || {
        ApiError::MethodNotAllowed(format!(
            "{method} is not supported on {}",
            if path.is_empty() { "the base" } else { path }
        ))
    };

    match segments.as_slice() {
        [] => match (get, method) {
            (true, _) => Ok(Interaction::Search {
                resource_type: None,
                params: params(),
            }),
            (false, &Method::POST) => {
                let bundle = resource_body(body)?;
                match (
                    bundle.get("resourceType").and_then(Value::as_str),
                    bundle.get("type").and_then(Value::as_str),
                ) {
                    (Some("Bundle"), Some("batch")) => Ok(Interaction::Batch { bundle }),
                    (Some("Bundle"), Some("transaction")) => {
                        Ok(Interaction::Transaction { bundle })
                    }
                    (Some("Bundle"), _) => Err(ApiError::invalid_at(
                        IssueCode::Value,
                        "only Bundles of type batch or transaction can be posted to the base",
                        "Bundle.type",
                    )),
                    _ => Err(ApiError::invalid(
                        IssueCode::Invalid,
                        "the base accepts only a batch or transaction Bundle",
                    )),
                }
            }
            _ => Err(not_allowed()),
        },
        ["metadata"] if get => Ok(Interaction::Capabilities),
        ["metadata"] => Err(not_allowed()),
        ["_history"] if get => Ok(Interaction::History {
            resource_type: None,
            id: None,
            params: params(),
        }),
        ["_history"] => Err(not_allowed()),
        ["_search"] if get || method == Method::POST => Ok(Interaction::Search {
            resource_type: None,
            params: search_params(params(), body)?,
        }),
        [first, rest @ ..] => {
            if !is_resource_type(first) {
                return Err(if first.starts_with(['$', '_']) {
                    ApiError::NotFound(format!("no operation or endpoint '{first}'"))
                } else {
                    ApiError::UnknownType((*first).to_owned())
                });
            }
            let resource_type = (*first).to_owned();
            type_level(
                method,
                get,
                resource_type,
                rest,
                params,
                has_criteria,
                query,
                headers,
                body,
            )
            .map_err(|e| match e {
                Routing::NotAllowed => not_allowed(),
                Routing::Error(e) => e,
            })
        }
    }
}

enum Routing {
    NotAllowed,
    Error(ApiError),
}

impl From<ApiError> for Routing {
    fn from(e: ApiError) -> Self {
        Routing::Error(e)
    }
}

#[allow(clippy::too_many_arguments)]
fn type_level(
    method: &Method,
    get: bool,
    resource_type: String,
    rest: &[&str],
    params: impl Fn() -> Vec<(String, String)>,
    has_criteria: impl Fn() -> bool,
    query: &str,
    headers: &HeaderMap,
    body: RequestBody,
) -> Result<Interaction, Routing> {
    let criteria = || {
        query_pairs(query)
            .into_iter()
            .filter(|(k, _)| k != "_format")
            .map(|(k, v)| format!("{}={}", encode(&k), encode(&v)))
            .collect::<Vec<_>>()
            .join("&")
    };
    match rest {
        [] => match *method {
            _ if get => Ok(Interaction::Search {
                resource_type: Some(resource_type),
                params: params(),
            }),
            Method::POST => Ok(Interaction::Create {
                resource_type,
                resource: resource_body(body)?,
                if_none_exist: header(headers, "if-none-exist")
                    .map(|c| c.trim_start_matches('?').to_owned()),
            }),
            Method::PUT if has_criteria() => Ok(Interaction::ConditionalUpdate {
                resource_type,
                criteria: criteria(),
                resource: resource_body(body)?,
                if_match: if_match(headers)?,
            }),
            Method::DELETE if has_criteria() => Ok(Interaction::ConditionalDelete {
                resource_type,
                criteria: criteria(),
            }),
            Method::PATCH if has_criteria() => Ok(Interaction::Patch {
                resource_type,
                target: Target::Criteria(criteria()),
                patch: patch_body(body)?,
                if_match: if_match(headers)?,
            }),
            _ => Err(Routing::NotAllowed),
        },
        ["_search"] if get || method == Method::POST => Ok(Interaction::Search {
            resource_type: Some(resource_type),
            params: search_params(params(), body)?,
        }),
        ["_history"] if get => Ok(Interaction::History {
            resource_type: Some(resource_type),
            id: None,
            params: params(),
        }),
        ["$validate"] if method == Method::POST => Ok(Interaction::Validate {
            resource_type,
            id: None,
            resource: Some(resource_body(body)?),
        }),
        ["$verify"] if resource_type == "AuditEvent" && (get || method == Method::POST) => {
            Ok(Interaction::VerifyAuditTrail)
        }
        ["_search" | "_history" | "$validate"] => Err(Routing::NotAllowed),
        [id, more @ ..] => {
            if id.starts_with('$') {
                return Err(ApiError::NotFound(format!("no operation '{id}'")).into());
            }
            if !is_valid_id(id) {
                return Err(ApiError::invalid(
                    IssueCode::Invalid,
                    format!("'{id}' is not a valid resource id"),
                )
                .into());
            }
            let id = (*id).to_owned();
            instance_level(method, get, resource_type, id, more, params, headers, body)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn instance_level(
    method: &Method,
    get: bool,
    resource_type: String,
    id: String,
    rest: &[&str],
    params: impl Fn() -> Vec<(String, String)>,
    headers: &HeaderMap,
    body: RequestBody,
) -> Result<Interaction, Routing> {
    match rest {
        [] => match *method {
            _ if get => Ok(Interaction::Read {
                resource_type,
                id,
                if_none_match: header(headers, "if-none-match").and_then(|v| parse_etag(&v)),
                if_modified_since: header(headers, "if-modified-since")
                    .and_then(|v| httpdate::parse_http_date(&v).ok()),
            }),
            Method::PUT => Ok(Interaction::Update {
                resource_type,
                id,
                resource: resource_body(body)?,
                if_match: if_match(headers)?,
            }),
            Method::PATCH => Ok(Interaction::Patch {
                resource_type,
                target: Target::Id(id),
                patch: patch_body(body)?,
                if_match: if_match(headers)?,
            }),
            Method::DELETE => Ok(Interaction::Delete {
                resource_type,
                id,
                if_match: if_match(headers)?,
            }),
            _ => Err(Routing::NotAllowed),
        },
        ["_history"] if get => Ok(Interaction::History {
            resource_type: Some(resource_type),
            id: Some(id),
            params: params(),
        }),
        ["_history", version] if get => {
            let version = version
                .parse::<i64>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| {
                    ApiError::invalid(
                        IssueCode::Invalid,
                        format!("'{version}' is not a version id"),
                    )
                })?;
            Ok(Interaction::VRead {
                resource_type,
                id,
                version,
            })
        }
        ["_history"] | ["_history", _] => Err(Routing::NotAllowed),
        ["$validate"] if get || method == Method::POST => Ok(Interaction::Validate {
            resource_type,
            id: Some(id),
            resource: match body {
                RequestBody::None => None,
                other => Some(resource_body(other)?),
            },
        }),
        ["$validate"] => Err(Routing::NotAllowed),
        ["$everything"] if get && resource_type == "Patient" => Ok(Interaction::Everything {
            patient: id,
            params: params(),
        }),
        [compartment_type]
            if get && resource_type == "Patient" && is_resource_type(compartment_type) =>
        {
            Ok(Interaction::CompartmentSearch {
                patient: id,
                resource_type: (*compartment_type).to_owned(),
                params: params(),
            })
        }
        ["$everything"] | [_] if resource_type == "Patient" => Err(Routing::NotAllowed),
        _ => Err(ApiError::NotFound("no such endpoint".into()).into()),
    }
}

fn resource_body(body: RequestBody) -> Result<Value, ApiError> {
    match body {
        RequestBody::Resource(v) => Ok(v),
        RequestBody::None => Err(ApiError::invalid(
            IssueCode::Required,
            "this interaction needs a resource in the body",
        )),
        RequestBody::JsonPatch(_) | RequestBody::Form(_) => Err(ApiError::UnsupportedMediaType(
            "send the resource as application/fhir+json".into(),
        )),
    }
}

fn patch_body(body: RequestBody) -> Result<Value, ApiError> {
    match body {
        RequestBody::JsonPatch(v) => Ok(v),
        RequestBody::None => Err(ApiError::invalid(
            IssueCode::Required,
            "a patch needs a JSON Patch document in the body",
        )),
        _ => Err(ApiError::UnsupportedMediaType(
            "patches must be sent as application/json-patch+json".into(),
        )),
    }
}

/// Search parameters from the query string and, for `_search` by POST, the form body.
fn search_params(
    mut params: Vec<(String, String)>,
    body: RequestBody,
) -> Result<Vec<(String, String)>, ApiError> {
    match body {
        RequestBody::None => Ok(params),
        RequestBody::Form(form) => {
            params.extend(form.into_iter().filter(|(k, _)| k != "_format"));
            Ok(params)
        }
        _ => Err(ApiError::UnsupportedMediaType(
            "search by POST takes application/x-www-form-urlencoded".into(),
        )),
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// `W/"3"` (or `"3"`, or `3` as some clients send) to 3.
pub fn parse_etag(value: &str) -> Option<i64> {
    let v = value.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    let v = v.trim_matches('"');
    v.parse().ok()
}

fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    match header(headers, "if-match") {
        None => Ok(None),
        Some(v) => parse_etag(&v).map(Some).ok_or_else(|| {
            ApiError::invalid(
                IssueCode::Invalid,
                format!("If-Match: '{v}' is not a version tag like W/\"1\""),
            )
        }),
    }
}

fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: Method, path: &str, query: Option<&str>) -> Result<Interaction, ApiError> {
        parse(&method, path, query, &HeaderMap::new(), RequestBody::None)
    }

    #[test]
    fn reads_vreads_and_histories_are_told_apart() {
        assert!(matches!(
            route(Method::GET, "Patient/a", None),
            Ok(Interaction::Read { .. })
        ));
        assert!(matches!(
            route(Method::GET, "Patient/a/_history/2", None),
            Ok(Interaction::VRead { version: 2, .. })
        ));
        assert_eq!(
            route(Method::GET, "Patient/a/_history", None)
                .unwrap()
                .name(),
            "history-instance"
        );
        assert_eq!(
            route(Method::GET, "_history", None).unwrap().name(),
            "history-system"
        );
    }

    #[test]
    fn unsupported_methods_on_valid_paths_are_405() {
        for (m, p, q) in [
            (Method::PUT, "Patient", None),
            (Method::DELETE, "Patient/a/_history/1", None),
            (Method::POST, "Patient/a", None),
            (Method::DELETE, "metadata", None),
        ] {
            let e = route(m.clone(), p, q).unwrap_err();
            assert_eq!(e.status(), http::StatusCode::METHOD_NOT_ALLOWED, "{m} {p}");
        }
    }

    #[test]
    fn unknown_types_are_404_and_bad_ids_are_400() {
        assert_eq!(
            route(Method::GET, "Nonsense/a", None).unwrap_err().status(),
            http::StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(Method::GET, "Patient/a_b", None)
                .unwrap_err()
                .status(),
            http::StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn etags_are_read_weak_or_strong() {
        assert_eq!(parse_etag("W/\"3\""), Some(3));
        assert_eq!(parse_etag("\"4\""), Some(4));
        assert_eq!(parse_etag("W/\"x\""), None);
    }
}
