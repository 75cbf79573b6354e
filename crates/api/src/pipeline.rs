//! The request pipeline: the one way into Haven's FHIR API.
//!
//! Every FHIR request, whatever its path, is handled by [`handle`], which runs
//! these stages in this order:
//!
//! 1. **Admit**: request id (`X-Request-Id`), limits (header size 431, body size
//!    413, JSON depth and duplicate keys 400, time 503), content negotiation
//!    (406/415), and parsing into an [`Interaction`].
//! 2. **Authenticate** ([`Authenticator`]).
//! 3. **Authorize** ([`Authorizer`]).
//! 4. **Consent and labels** ([`ConsentGate`]).
//! 5. **Execute** (the private `execute` module: reachable only from here).
//! 6. **Label results** ([`ResultLabeler`]).
//! 7. **Record** ([`Recorder`]): runs for every request, including refused and
//!    timed-out ones, and fails the request if it fails (fail closed).
//!
//! Stages 2, 3, 4, 6 and 7 are trait objects in [`SecurityStages`]: the SMART
//! stages (`crate::smart`) authenticate and authorize; consent, labels and audit
//! are still [`AllowAll`]. With no stages given, everything is refused
//! ([`DenyAll`]). After authentication the execute stage sees the store only
//! through the authorizer's guard (`crate::guard`). Batch and transaction entries are parsed into interactions too and pass
//! stages 3 and 4 one by one ([`Gate`]), so a Bundle cannot smuggle in what a
//! direct request could not do.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use haven_auth::AccessContext;
use haven_store::Store;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::error::ApiError;
use crate::guard::{BothGuards, ContentGuard, GuardedStore, Unguarded};
use crate::interaction::{self, Interaction, RequestBody};
use crate::negotiation;
use crate::record::RequestAudit;
use crate::response::FhirResponse;
use crate::{execute, AppState};

/// The header carrying the request id, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// Who is asking: anonymous, or what a verified access token says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Principal {
    /// The token's subject (user or client); `None` for an anonymous caller.
    pub subject: Option<String>,
    /// The verified access token: scopes, client, patient in context.
    pub access: Option<AccessContext>,
}

/// The consent stage's verdict on a permitted request; a denial is an
/// [`ApiError::Forbidden`] instead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessDecision {
    /// Why access was granted (Consent ids, policies), for the audit record.
    pub reasons: Vec<String>,
    /// Whether results must be redacted by the labeling stage.
    pub redact: bool,
}

/// The parts of a request the security stages may look at.
#[derive(Debug)]
pub struct RequestHead<'a> {
    pub request_id: &'a str,
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

/// What the record stage learns about a finished request.
#[derive(Debug)]
pub struct RequestRecord<'a> {
    pub request_id: &'a str,
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub at: OffsetDateTime,
    /// `None` when the request was refused before it was understood.
    pub interaction: Option<&'a Interaction>,
    pub principal: Option<&'a Principal>,
    pub decision: Option<&'a AccessDecision>,
    pub status: StatusCode,
    /// Why the request failed, in words fit for the audit trail.
    pub failure: Option<&'a str>,
    /// What the request touched, and whether its writes already recorded it.
    pub audit: &'a RequestAudit,
    /// The answer's body (a batch-response tells how each entry ended).
    pub body: Option<&'a serde_json::Value>,
}

/// Stage 2: verify the bearer token (pinned
/// algorithms, expiry, audience, revocation); 401 otherwise.
#[async_trait]
pub trait Authenticator: Send + Sync + Debug {
    async fn authenticate(&self, head: &RequestHead<'_>) -> Result<Principal, ApiError>;
}

/// Stage 3: scopes (v1/v2), launch context and role decide whether this
/// interaction on this type is allowed (403 otherwise), and the guard decides
/// which resource content the request may touch once it runs.
#[async_trait]
pub trait Authorizer: Send + Sync + Debug {
    async fn authorize(&self, who: &Principal, what: &Interaction) -> Result<(), ApiError>;

    /// The guard placed over the store for this caller's whole request.
    fn guard(&self, who: &Principal) -> Arc<dyn ContentGuard>;
}

/// Stage 4. The consent requirement fills it: the patient's Consents and the
/// data's labels against purpose of use and clearance.
#[async_trait]
pub trait ConsentGate: Send + Sync + Debug {
    async fn decide(&self, who: &Principal, what: &Interaction)
        -> Result<AccessDecision, ApiError>;

    /// The guard the policy adds over the store for this caller's whole
    /// request, built from what the store holds now (the active Consents), so
    /// a changed Consent takes effect on the next request. `store` is the
    /// unguarded store; `audit` collects what decided.
    async fn guard(
        &self,
        _who: &Principal,
        _store: &dyn Store,
        _audit: &Arc<RequestAudit>,
        _at: OffsetDateTime,
    ) -> Result<Arc<dyn ContentGuard>, ApiError> {
        Ok(Arc::new(Unguarded))
    }

    /// The store writes go through, under the guard: where labels are added.
    fn labeling_store(&self, store: Arc<dyn Store>) -> Arc<dyn Store> {
        store
    }
}

/// Stage 6. The labeling requirement fills it: Bundles carry the highest
/// confidentiality of their entries; redaction where the decision says so.
#[async_trait]
pub trait ResultLabeler: Send + Sync + Debug {
    async fn label(
        &self,
        who: &Principal,
        decision: &AccessDecision,
        guard: &dyn ContentGuard,
        response: &mut FhirResponse,
    ) -> Result<(), ApiError>;
}

/// Stage 7: an AuditEvent committed before the response leaves; an error here
/// fails the request. It also gives the store the execute stage writes through
/// (under the guard), so that writes carry their Provenance and AuditEvent into
/// their own transaction.
#[async_trait]
pub trait Recorder: Send + Sync + Debug {
    fn store_for(
        &self,
        store: Arc<dyn Store>,
        principal: &Principal,
        interaction: &Interaction,
        audit: &Arc<RequestAudit>,
    ) -> Arc<dyn Store>;

    async fn record(&self, record: &RequestRecord<'_>) -> Result<(), ApiError>;
}

/// Lets everything through: for tests of the FHIR behaviour itself, never for
/// a server (which runs the SMART stages).
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

/// Refuses every request: what a server without configured security does.
#[derive(Debug, Default, Clone, Copy)]
pub struct DenyAll;

#[async_trait]
impl Authenticator for DenyAll {
    async fn authenticate(&self, _: &RequestHead<'_>) -> Result<Principal, ApiError> {
        Err(ApiError::Unauthenticated(
            "this server has no means of authentication configured".into(),
        ))
    }
}

#[async_trait]
impl Authenticator for AllowAll {
    async fn authenticate(&self, _: &RequestHead<'_>) -> Result<Principal, ApiError> {
        Ok(Principal::default())
    }
}

#[async_trait]
impl Authorizer for AllowAll {
    async fn authorize(&self, _: &Principal, _: &Interaction) -> Result<(), ApiError> {
        Ok(())
    }

    fn guard(&self, _: &Principal) -> Arc<dyn ContentGuard> {
        Arc::new(Unguarded)
    }
}

#[async_trait]
impl ConsentGate for AllowAll {
    async fn decide(&self, _: &Principal, _: &Interaction) -> Result<AccessDecision, ApiError> {
        Ok(AccessDecision::default())
    }
}

#[async_trait]
impl ResultLabeler for AllowAll {
    async fn label(
        &self,
        _: &Principal,
        _: &AccessDecision,
        _: &dyn ContentGuard,
        _: &mut FhirResponse,
    ) -> Result<(), ApiError> {
        Ok(())
    }
}

#[async_trait]
impl Recorder for AllowAll {
    fn store_for(
        &self,
        store: Arc<dyn Store>,
        _: &Principal,
        _: &Interaction,
        _: &Arc<RequestAudit>,
    ) -> Arc<dyn Store> {
        store
    }

    async fn record(&self, _: &RequestRecord<'_>) -> Result<(), ApiError> {
        Ok(())
    }
}

/// The security stages the pipeline runs.
#[derive(Debug, Clone)]
pub struct SecurityStages {
    pub authenticator: Arc<dyn Authenticator>,
    pub authorizer: Arc<dyn Authorizer>,
    pub consent: Arc<dyn ConsentGate>,
    pub labeler: Arc<dyn ResultLabeler>,
    pub recorder: Arc<dyn Recorder>,
}

impl SecurityStages {
    /// Every stage lets everything through: for tests of FHIR behaviour only.
    pub fn allow_all() -> Self {
        Self {
            authenticator: Arc::new(AllowAll),
            authorizer: Arc::new(AllowAll),
            consent: Arc::new(AllowAll),
            labeler: Arc::new(AllowAll),
            recorder: Arc::new(AllowAll),
        }
    }

    /// Default deny: nothing is authenticated, so nothing is answered but errors.
    pub fn deny_all() -> Self {
        Self {
            authenticator: Arc::new(DenyAll),
            ..Self::allow_all()
        }
    }
}

/// Stages 3 and 4 for one interaction; Bundle entries pass through it again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gate<'a> {
    pub stages: &'a SecurityStages,
    pub principal: &'a Principal,
    /// The request's guard: the scopes' and the policy's.
    pub guard: &'a Arc<dyn ContentGuard>,
}

impl Gate<'_> {
    /// Whether the caller may read this content (for reads made inside a
    /// write transaction, whose store allows what may be changed).
    pub fn may_read(&self, resource: &serde_json::Value) -> bool {
        self.guard
            .rule(haven_auth::scope::Permission::Read)
            .admits(resource)
    }

    pub async fn admit(&self, what: &Interaction) -> Result<AccessDecision, ApiError> {
        // The audit trail is append-only, whoever asks (R5).
        if what.writes() && what.resource_type() == Some("AuditEvent") {
            return Err(ApiError::MethodNotAllowed(
                "AuditEvents are written by the server only and never changed".into(),
            ));
        }
        self.stages
            .authorizer
            .authorize(self.principal, what)
            .await?;
        self.stages.consent.decide(self.principal, what).await
    }
}

/// `Prefer` (RFC 7240) as FHIR uses it: `return=` and `handling=`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prefer {
    /// `None`: the client did not say; single interactions then return the
    /// representation and Bundle entries return none.
    pub return_: Option<Return>,
    /// `handling=strict`: unknown search parameters are errors.
    pub strict: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

impl Prefer {
    fn from_headers(headers: &HeaderMap) -> Self {
        let mut prefer = Prefer::default();
        for token in headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split([',', ';']))
        {
            match token.trim().replace(' ', "").as_str() {
                "return=minimal" => prefer.return_ = Some(Return::Minimal),
                "return=representation" => prefer.return_ = Some(Return::Representation),
                "return=OperationOutcome" => prefer.return_ = Some(Return::OperationOutcome),
                "handling=strict" => prefer.strict = true,
                "handling=lenient" => prefer.strict = false,
                _ => {}
            }
        }
        prefer
    }
}

/// Everything the execute stage may use.
#[derive(Clone, Copy)]
pub(crate) struct Exec<'a> {
    pub state: &'a AppState,
    pub prefer: Prefer,
    pub gate: Gate<'a>,
}

/// What the stages learnt, kept outside the timed part so the record stage can
/// report even a request that timed out.
#[derive(Default)]
struct Trace {
    interaction: Option<Interaction>,
    principal: Option<Principal>,
    decision: Option<AccessDecision>,
}

/// The single entry point for every request (the router's fallback).
pub(crate) async fn handle(State(state): State<AppState>, request: Request) -> Response {
    let request_id = request_id(request.headers());
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    async move {
        let started = Instant::now();
        let (parts, body) = request.into_parts();
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip());
        let audit = Arc::new(RequestAudit::new(&request_id, peer));
        let mut trace = Trace::default();
        let timed = tokio::time::timeout(
            state.config.limits.request_timeout,
            run(&state, &request_id, &parts, body, &mut trace, &audit),
        )
        .await;
        let failure = match &timed {
            Ok(Ok(_)) => None,
            Ok(Err(error)) => Some(error.audit_description()),
            Err(_) => Some(ApiError::Timeout.audit_description()),
        };
        let mut response = match timed {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => error_response(&error, &request_id),
            Err(_) => error_response(&ApiError::Timeout, &request_id),
        };

        // Stage 7: record, for every outcome; failing to record fails the request.
        let record = RequestRecord {
            request_id: &request_id,
            method: &parts.method,
            uri: &parts.uri,
            at: state.clock.now(),
            interaction: trace.interaction.as_ref(),
            principal: trace.principal.as_ref(),
            decision: trace.decision.as_ref(),
            status: response.status,
            failure: failure.as_deref(),
            audit: &audit,
            body: response.body.as_ref(),
        };
        if let Err(error) = state.security.recorder.record(&record).await {
            response = error_response(&error, &request_id);
        }

        tracing::info!(
            status = response.status.as_u16(),
            interaction = trace.interaction.as_ref().map(Interaction::name),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "answered"
        );
        let mut response = response.into_response();
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID, v);
        }
        response
    }
    .instrument(span)
    .await
}

/// Stages 1 to 6.
async fn run(
    state: &AppState,
    request_id: &str,
    parts: &http::request::Parts,
    body: Body,
    trace: &mut Trace,
    audit: &Arc<RequestAudit>,
) -> Result<FhirResponse, ApiError> {
    // Stage 1: limits, negotiation, parsing.
    let limits = &state.config.limits;
    let header_bytes: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > limits.max_header_bytes {
        return Err(ApiError::HeadersTooLarge);
    }
    let Some(path) = fhir_path(parts.uri.path()) else {
        return Err(ApiError::NotFound(format!(
            "no such endpoint; the FHIR API is under {}",
            state.config.base_url
        )));
    };
    negotiation::check_acceptable(&parts.headers, parts.uri.query())?;
    let body = read_body(&parts.method, &parts.headers, body, limits.max_body_bytes).await?;
    let body = match body {
        Some(bytes) => negotiation::decode_body(&parts.headers, &bytes, limits.max_json_depth)?,
        None => RequestBody::None,
    };
    let interaction =
        interaction::parse(&parts.method, path, parts.uri.query(), &parts.headers, body)?;
    if let Interaction::Batch { bundle } | Interaction::Transaction { bundle } = &interaction {
        let entries = bundle
            .get("entry")
            .and_then(|e| e.as_array())
            .map_or(0, Vec::len);
        if entries > limits.max_bundle_entries {
            return Err(ApiError::PayloadTooLarge(format!(
                "the Bundle has {entries} entries; at most {} are accepted",
                limits.max_bundle_entries
            )));
        }
    }
    let interaction = &*trace.interaction.insert(interaction);
    let prefer = Prefer::from_headers(&parts.headers);

    // Stage 2: authenticate.
    let head = RequestHead {
        request_id,
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
    };
    let principal = &*trace
        .principal
        .insert(state.security.authenticator.authenticate(&head).await?);

    // From here on the store is seen through the caller's guard, above the
    // recorder's store, which notes what is touched and adds what writes carry.
    // The policy's guard reads the active Consents now, from the unguarded store.
    let policy = state
        .security
        .consent
        .guard(principal, &*state.store, audit, state.clock.now())
        .await?;
    let guard: Arc<dyn ContentGuard> = Arc::new(BothGuards(
        state.security.authorizer.guard(principal),
        policy,
    ));
    let recorded =
        state
            .security
            .recorder
            .store_for(state.store.clone(), principal, interaction, audit);
    let labeled = state.security.consent.labeling_store(recorded);
    let guarded = AppState {
        store: Arc::new(GuardedStore::new(labeled, guard.clone())),
        ..state.clone()
    };
    let state = &guarded;

    // Stages 3 and 4: authorize, consent and labels.
    let gate = Gate {
        stages: &state.security,
        principal,
        guard: &guard,
    };
    let decision = &*trace.decision.insert(gate.admit(interaction).await?);

    // Stage 5: execute.
    let exec = Exec {
        state,
        prefer,
        gate,
    };
    let mut response = execute::execute(&exec, interaction).await?;

    // Stage 6: label results.
    state
        .security
        .labeler
        .label(principal, decision, &*guard, &mut response)
        .await?;
    Ok(response)
}

/// The path below `/fhir`, or `None` for a path outside the FHIR API.
fn fhir_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/fhir")?;
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix('/')
    }
}

/// Reads the body of a write, refusing more than `max` bytes without buffering them.
async fn read_body(
    method: &Method,
    headers: &HeaderMap,
    body: Body,
    max: usize,
) -> Result<Option<bytes::Bytes>, ApiError> {
    if !matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        return Ok(None);
    }
    let too_large =
        || ApiError::PayloadTooLarge(format!("the request body is larger than {max} bytes"));
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(Some(collected.to_bytes())),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        Err(e) => {
            tracing::info!(error = %e, "the request body could not be read");
            Err(ApiError::invalid(
                haven_model::outcome::IssueCode::Structure,
                "the request body could not be read",
            ))
        }
    }
}

/// A client's `X-Request-Id` when it is short and plain; a fresh UUID otherwise,
/// so log lines cannot be forged or flooded through it. The fresh one is time
/// ordered: every AuditEvent indexes it, and an index of ids that grow at one
/// end is written a page at a time instead of a random page per request.
pub(crate) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=128).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        })
        .map_or_else(haven_model::id::new_time_ordered_id, str::to_owned)
}

/// An error as the client sees it; details of internal errors go to the log only.
fn error_response(error: &ApiError, request_id: &str) -> FhirResponse {
    if error.is_internal() {
        tracing::error!(error = %error, "request failed");
    } else {
        tracing::debug!(error = %error, "request refused");
    }
    FhirResponse::from_error(error, Some(request_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sane_request_ids_are_echoed_and_others_replaced() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(REQUEST_ID, HeaderValue::from_static("a b\"c"));
        let generated = request_id(&h);
        assert_eq!(generated.len(), 36);
        assert_ne!(request_id(&h), generated);
    }

    #[test]
    fn generated_request_ids_sort_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..200).map(|_| request_id(&HeaderMap::new())).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids);
    }

    #[test]
    fn only_paths_under_fhir_are_fhir_paths() {
        assert_eq!(fhir_path("/fhir"), Some(""));
        assert_eq!(fhir_path("/fhir/Patient/1"), Some("Patient/1"));
        assert_eq!(fhir_path("/fhirx"), None);
        assert_eq!(fhir_path("/other"), None);
    }

    #[test]
    fn prefer_is_read_from_all_its_tokens() {
        let mut h = HeaderMap::new();
        h.insert(
            "prefer",
            HeaderValue::from_static("return=minimal, handling=strict"),
        );
        let p = Prefer::from_headers(&h);
        assert_eq!(p.return_, Some(Return::Minimal));
        assert!(p.strict);
    }
}
