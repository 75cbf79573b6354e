//! The API's one error type and its single mapping to HTTP.
//!
//! Every failure a client can see is an [`ApiError`]; [`ApiError::status`] and
//! [`ApiError::issues`] are the only places that decide what the client learns.
//! Store failures keep their details in the server log (which carries the request
//! id through the request's tracing span); clients get a generic message.
//!
//! | error                                   | HTTP | issue code         |
//! |-----------------------------------------|------|--------------------|
//! | `Invalid` (bad JSON, bad resource, ...)  | 400  | from each issue    |
//! | `Unauthenticated`, `InvalidToken`       | 401  | `login`            |
//! | `Forbidden`                             | 403  | `forbidden`        |
//! | `NotFound`                              | 404  | `not-found`        |
//! | `UnknownType`                           | 404  | `not-supported`    |
//! | `MethodNotAllowed`                      | 405  | `not-supported`    |
//! | `NotAcceptable`                         | 406  | `not-supported`    |
//! | `Conflict`                              | 409  | `conflict`         |
//! | `Gone`                                  | 410  | `deleted`          |
//! | `PreconditionFailed`                    | 412  | given (`conflict`, `multiple-matches`) |
//! | `PayloadTooLarge`                       | 413  | `too-long`         |
//! | `UnsupportedMediaType`                  | 415  | `not-supported`    |
//! | `Unprocessable` (patch cannot apply)    | 422  | `processing`       |
//! | `HeadersTooLarge`                       | 431  | `too-long`         |
//! | `Timeout`                               | 503  | `timeout`          |
//! | `Store(AlreadyExists)`                  | 409  | `duplicate`        |
//! | `Store(Refused)`                        | 403  | `forbidden`        |
//! | `Store(VersionConflict)`                | 412  | `conflict` (409 when the server, not the client, asked for the version: see [`ApiError::concurrent_change`]) |
//! | `Store(Unavailable)`                    | 503  | `exception`        |
//! | `Store(TooComplex)`                      | 400  | `too-costly`       |
//! | `Store(Database)`, `Store(Unsupported)`, `Internal` | 500 | `exception`, generic text |

use axum::response::{IntoResponse, Response};
use haven_model::outcome::{operation_outcome, Issue, IssueCode};
use haven_store::StoreError;
use http::StatusCode;

/// What went wrong, in terms a FHIR client is told about.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request")]
    Invalid(Vec<Issue>),
    #[error("authentication required: {0}")]
    Unauthenticated(String),
    /// A bearer token was given but is not acceptable (bad, expired, revoked, or
    /// for another audience); the client learns only that (RFC 6750 §3.1).
    #[error("invalid access token: {0}")]
    InvalidToken(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("unknown resource type {0}")]
    UnknownType(String),
    #[error("method not allowed: {0}")]
    MethodNotAllowed(String),
    #[error("not acceptable: {0}")]
    NotAcceptable(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("gone: {0}")]
    Gone(String),
    #[error("precondition failed: {message}")]
    PreconditionFailed { code: IssueCode, message: String },
    #[error("payload too large: {0}")]
    PayloadTooLarge(String),
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    #[error("unprocessable: {0}")]
    Unprocessable(String),
    #[error("request headers too large")]
    HeadersTooLarge,
    #[error("request timed out")]
    Timeout,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug or an unexpected state; the text is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 with one issue.
    pub fn invalid(code: IssueCode, message: impl Into<String>) -> Self {
        ApiError::Invalid(vec![Issue::error(code, message)])
    }

    /// A 400 pointing at an element.
    pub fn invalid_at(
        code: IssueCode,
        message: impl Into<String>,
        expression: impl Into<String>,
    ) -> Self {
        ApiError::Invalid(vec![Issue::error(code, message).at(expression)])
    }

    pub fn precondition(code: IssueCode, message: impl Into<String>) -> Self {
        ApiError::PreconditionFailed {
            code,
            message: message.into(),
        }
    }

    /// A version conflict the server provoked itself (an optimistic check on a
    /// read-modify-write without `If-Match`) is a 409: R4 http.html#concurrency
    /// reserves 412 for a client's failed precondition.
    pub fn concurrent_change(self) -> Self {
        match self {
            ApiError::Store(StoreError::VersionConflict { .. }) => {
                ApiError::Conflict("the resource was changed by another request; retry".into())
            }
            other => other,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) | ApiError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::UnknownType(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(e) => match e {
                StoreError::AlreadyExists { .. } => StatusCode::CONFLICT,
                StoreError::Refused(_) => StatusCode::FORBIDDEN,
                StoreError::VersionConflict { .. } => StatusCode::PRECONDITION_FAILED,
                StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                StoreError::TooComplex(_) => StatusCode::BAD_REQUEST,
                StoreError::Database(_) | StoreError::Unsupported(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The reason an audit record gives: the refusal's own words, which name the
    /// failed check (an expired token, say); never an internal error's details.
    pub fn audit_description(&self) -> String {
        if self.is_internal() {
            "the server failed to answer the request".into()
        } else {
            self.to_string()
        }
    }

    /// Whether the details must stay in the log.
    pub fn is_internal(&self) -> bool {
        self.status().is_server_error() && !matches!(self, ApiError::Timeout)
    }

    /// The client-facing issues: the one place that chooses what a client is told.
    pub fn issues(&self, request_id: Option<&str>) -> Vec<Issue> {
        let one = |code: IssueCode, text: String| vec![Issue::error(code, text)];
        match self {
            ApiError::Invalid(issues) => issues.clone(),
            ApiError::Unauthenticated(m) => one(IssueCode::Login, m.clone()),
            ApiError::InvalidToken(_) => {
                one(IssueCode::Login, "the access token is not valid".into())
            }
            ApiError::Forbidden(m) => one(IssueCode::Forbidden, m.clone()),
            ApiError::NotFound(m) => one(IssueCode::NotFound, m.clone()),
            ApiError::UnknownType(t) => one(
                IssueCode::NotSupported,
                format!("resource type '{t}' is not supported"),
            ),
            ApiError::MethodNotAllowed(m) => one(IssueCode::NotSupported, m.clone()),
            ApiError::NotAcceptable(m) => one(IssueCode::NotSupported, m.clone()),
            ApiError::Conflict(m) => one(IssueCode::Conflict, m.clone()),
            ApiError::Gone(m) => one(IssueCode::Deleted, m.clone()),
            ApiError::PreconditionFailed { code, message } => one(*code, message.clone()),
            ApiError::PayloadTooLarge(m) => one(IssueCode::TooLong, m.clone()),
            ApiError::UnsupportedMediaType(m) => one(IssueCode::NotSupported, m.clone()),
            ApiError::Unprocessable(m) => one(IssueCode::Processing, m.clone()),
            ApiError::HeadersTooLarge => one(
                IssueCode::TooLong,
                "the request headers are too large".into(),
            ),
            ApiError::Timeout => one(
                IssueCode::Timeout,
                "the request took too long and was abandoned".into(),
            ),
            ApiError::Store(StoreError::AlreadyExists { resource_type, id }) => one(
                IssueCode::Duplicate,
                format!("{resource_type}/{id} already exists"),
            ),
            ApiError::Store(StoreError::Refused(m)) => one(IssueCode::Forbidden, m.clone()),
            ApiError::Store(StoreError::VersionConflict { expected, .. }) => one(
                IssueCode::Conflict,
                format!("version {expected} is not the current version"),
            ),
            ApiError::Store(StoreError::TooComplex(m)) => one(IssueCode::TooCostly, m.clone()),
            ApiError::Store(StoreError::Unavailable(_)) => one(
                IssueCode::Exception,
                "the database is temporarily unavailable; retry later".into(),
            ),
            ApiError::Store(_) | ApiError::Internal(_) => one(
                IssueCode::Exception,
                match request_id {
                    Some(id) => format!("internal server error (request id {id})"),
                    None => "internal server error".into(),
                },
            ),
        }
    }

    /// The OperationOutcome a client sees.
    pub fn outcome(&self, request_id: Option<&str>) -> serde_json::Value {
        operation_outcome(&self.issues(request_id))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::response::FhirResponse::from_error(&self, None).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_errors_reach_clients_only_as_a_generic_message() {
        let e = ApiError::Store(StoreError::Database("syntax error near SELECT".into()));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let text = e.outcome(Some("r-1")).to_string();
        assert!(!text.contains("SELECT"));
        assert!(text.contains("r-1"));
    }

    #[test]
    fn a_version_conflict_is_412_unless_the_server_asked_for_the_version() {
        let conflict = || {
            ApiError::Store(StoreError::VersionConflict {
                expected: 1,
                current: Some(2),
            })
        };
        assert_eq!(conflict().status(), StatusCode::PRECONDITION_FAILED);
        assert_eq!(
            conflict().concurrent_change().status(),
            StatusCode::CONFLICT
        );
    }
}
