//! What an interaction answers, before it becomes an HTTP response.
//!
//! Interactions return a [`FhirResponse`] (status, headers, optional JSON body)
//! rather than an axum `Response`, so the labeling and recording stages can read
//! and change it, and so batch entries can reuse the same code and be turned into
//! `Bundle.entry.response` instead.

use std::time::SystemTime;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use haven_model::clock::format_instant;
use haven_model::outcome::{operation_outcome, Issue};
use haven_store::ResourceVersion;
use http::header::{CONTENT_TYPE, ETAG, LAST_MODIFIED};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::Value;
use time::OffsetDateTime;

use crate::error::ApiError;

/// The only content type Haven answers with.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

#[derive(Debug, Clone)]
pub struct FhirResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Option<Value>,
    /// When the version this response is about was stored; Bundle entries
    /// report it as `response.lastModified` at full precision.
    pub last_modified: Option<OffsetDateTime>,
}

impl FhirResponse {
    pub fn new(status: StatusCode, body: Option<Value>) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            body,
            last_modified: None,
        }
    }

    pub fn ok(body: Value) -> Self {
        Self::new(StatusCode::OK, Some(body))
    }

    pub fn from_error(error: &ApiError, request_id: Option<&str>) -> Self {
        let response = Self::new(error.status(), Some(error.outcome(request_id)));
        // RFC 6750 §3: a 401 names the scheme, and says when the token was the problem.
        match error {
            ApiError::Unauthenticated(_) => {
                response.with_header(http::header::WWW_AUTHENTICATE, "Bearer realm=\"haven\"")
            }
            ApiError::InvalidToken(_) => response.with_header(
                http::header::WWW_AUTHENTICATE,
                "Bearer realm=\"haven\", error=\"invalid_token\"",
            ),
            _ => response,
        }
    }

    pub fn outcome(status: StatusCode, issues: &[Issue]) -> Self {
        Self::new(status, Some(operation_outcome(issues)))
    }

    /// Adds a header; values that are not valid header text are dropped, which
    /// cannot happen for the ids, versions and dates Haven writes.
    pub fn with_header(mut self, name: HeaderName, value: impl AsRef<str>) -> Self {
        if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
            self.headers.insert(name, v);
        }
        self
    }

    /// `ETag` and `Last-Modified` of a stored version.
    pub fn with_version_headers(self, version: &ResourceVersion) -> Self {
        let mut response = self
            .with_header(ETAG, etag(version.version))
            .with_header(LAST_MODIFIED, http_date(version.last_updated));
        response.last_modified = Some(version.last_updated);
        response
    }

    pub fn header(&self, name: &HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl IntoResponse for FhirResponse {
    fn into_response(self) -> Response {
        let mut response = match self.body {
            Some(body) => {
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                let mut r = Response::new(Body::from(bytes));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
                r
            }
            None => Response::new(Body::empty()),
        };
        *response.status_mut() = self.status;
        response.headers_mut().extend(self.headers);
        response
    }
}

/// A weak entity tag for a version: R4 http.html#versioning.
pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

/// An HTTP date (RFC 9110), whole seconds.
pub fn http_date(t: OffsetDateTime) -> String {
    httpdate::fmt_http_date(SystemTime::from(t))
}

/// `meta.lastUpdated`-style instant for Bundle entries.
pub fn instant(t: OffsetDateTime) -> String {
    format_instant(t)
}

/// `"201 Created"`-style status text for `Bundle.entry.response.status`.
pub fn status_line(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {}", status.as_u16(), reason),
        None => status.as_u16().to_string(),
    }
}
