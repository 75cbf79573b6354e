//! The authorization server's HTTP face: discovery documents, the OAuth
//! endpoints and the browser pages. The decisions are made in `haven-auth`;
//! this module only turns requests into calls and results into responses.
//!
//! Every OAuth endpoint is rate limited per caller address, answers errors as
//! RFC 6749 JSON, and never caches token responses (RFC 6749 §5.1).
//!
//! With audit on, every sign-in, sign-out, authorization decision, token
//! request, introspection, revocation and registration leaves an AuditEvent
//! ([`audited`]), committed before the answer leaves; if it cannot be stored
//! the caller gets a 500 instead of the answer (fail closed). So do the pages
//! that show patient data: the picker's and the launcher's patient lists, the
//! consent page naming the patient in context, the choice of a patient and an
//! EHR launch. An auth event carries no entity references, so the Patients
//! such an event is about are named in its description.
//!
//! Where an action can wait, it is recorded first and done after: a sign-out,
//! the choice of a patient and a revocation the trail cannot hold do not
//! happen. Token, code, launch and client registration are stored by
//! `haven-auth` before what they hand out exists; they are recorded after, and
//! when that fails nothing is handed out. The one exception to "stored
//! before": for `client_credentials`, the client assertion's use is committed
//! while the token request is being recorded, and the token leaves only once
//! both are; if the use cannot be committed the token is withheld, and a
//! second event says so if the trail can still be written. Requests refused by the rate limit before they are read are
//! not recorded, so a flood cannot grow the trail without bound.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use haven_audit::{AuthEventKind, Outcome};
use haven_auth::limits::Rate;
use haven_auth::registry::{Role, UserRecord};
use haven_auth::scope::{self, ScopeSet};
use haven_auth::server::{AuthorizeError, LaunchContext, LoginError, Pending, PendingRecord};
use haven_auth::{AuthServer, OAuthError};
use haven_store::{Criterion, SearchQuery, SortBy, SortKey, Store, StringMatch};
use serde_json::{json, Value};
use time::Duration;

use crate::pages::{self, AppChoice, PatientChoice, ScopeChoice};
use crate::pipeline::{request_id, REQUEST_ID};
use crate::record::{AuditRecorder, AuthEventFacts};

const SESSION_COOKIE: &str = "haven_session";
/// The double-submit token of the sign-in form (login CSRF).
const CSRF_COOKIE: &str = "haven_csrf";

/// The cookie holding the secret that binds a pending request to its browser.
fn request_cookie(pending_id: &str) -> String {
    let short: String = pending_id.chars().take(12).collect();
    format!("haven_req_{short}")
}

/// What the auth routes need.
#[derive(Clone)]
pub(crate) struct AuthState {
    pub server: Arc<AuthServer>,
    pub store: Arc<dyn Store>,
    /// Records the authentication events; `None` when audit is off.
    pub audit: Option<Arc<AuditRecorder>>,
}

/// The auth routes, to be merged into the application router.
pub(crate) fn routes(state: AuthState) -> Router {
    Router::new()
        .route(
            "/fhir/.well-known/smart-configuration",
            get(smart_configuration),
        )
        .route(
            "/fhir/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/auth/jwks", get(jwks))
        .route("/auth/authorize", get(authorize).post(authorize))
        .route("/auth/login", get(login_form).post(login))
        .route("/auth/logout", axum::routing::post(logout))
        .route("/auth/patient", get(patient_picker).post(choose_patient))
        .route("/auth/consent", get(consent_form).post(consent))
        .route("/auth/launcher", get(launcher).post(launch))
        .route("/auth/token", axum::routing::post(token))
        .route("/auth/introspect", axum::routing::post(introspect))
        .route("/auth/revoke", axum::routing::post(revoke))
        .route("/auth/register", axum::routing::post(register))
        .layer(axum::middleware::from_fn(with_request_id))
        .with_state(state)
}

// ----- Plumbing --------------------------------------------------------------

fn remote(request_parts: &axum::http::Extensions) -> String {
    request_parts
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string())
}

/// Form or query pairs; a parameter given twice is an error (RFC 6749 §3.1).
fn single_valued(pairs: Vec<(String, String)>) -> Result<HashMap<String, String>, OAuthError> {
    let mut map = HashMap::new();
    for (k, v) in pairs {
        if map.insert(k.clone(), v).is_some() {
            return Err(oauth_error(
                400,
                "invalid_request",
                &format!("{k} is given more than once"),
            ));
        }
    }
    Ok(map)
}

fn oauth_error(status: u16, error: &'static str, description: &str) -> OAuthError {
    OAuthError {
        status,
        error,
        description: description.to_string(),
    }
}

fn pairs(bytes: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(bytes).into_owned().collect()
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn json_response(status: StatusCode, body: Value) -> Response {
    no_store((status, axum::Json(body)).into_response())
}

fn oauth_response(error: &OAuthError, basic_attempted: bool) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = json_response(status, error.body());
    if status == StatusCode::UNAUTHORIZED {
        let challenge = if basic_attempted || error.error == "invalid_client" {
            "Basic realm=\"haven\""
        } else {
            "Bearer realm=\"haven\", error=\"invalid_token\""
        };
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    response
}

/// Counts a request against its endpoint's rate for the caller's address; the
/// 429 to answer when it is over (JSON for the OAuth endpoints, a page otherwise).
fn over_rate(
    state: &AuthState,
    endpoint: &str,
    parts: &axum::http::request::Parts,
    rate: Rate,
    as_json: bool,
) -> Option<Response> {
    state
        .server
        .rate
        .check(endpoint, &remote(&parts.extensions), rate)
        .err()
        .map(|wait| too_many(wait, as_json))
}

fn too_many(wait: u64, as_json: bool) -> Response {
    let mut response = if as_json {
        json_response(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": "temporarily_unavailable", "error_description": "too many requests; retry later"}),
        )
    } else {
        (
            StatusCode::TOO_MANY_REQUESTS,
            Html(pages::error_page(
                "Too many attempts. Wait a moment and try again.",
            )),
        )
            .into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

const LOGIN_RATE: Rate = Rate {
    requests: 30,
    window: Duration::minutes(1),
};
const AUTHORIZE_RATE: Rate = Rate {
    requests: 60,
    window: Duration::minutes(1),
};
const REGISTER_RATE: Rate = Rate {
    requests: 10,
    window: Duration::minutes(1),
};

/// `Authorization: Basic` credentials (RFC 6749 §2.3.1: both parts form-encoded).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((unescape(id)?, unescape(secret)?))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn html(status: StatusCode, body: String) -> Response {
    let mut response = (status, Html(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The pages must not be framed (clickjacking of the consent button).
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self' *; frame-ancestors 'none'"),
    );
    response
}

fn redirect(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn error_page(status: StatusCode, message: &str) -> Response {
    html(status, pages::error_page(message))
}

// ----- Audit -------------------------------------------------------------------

/// The id of an auth request, given by [`with_request_id`].
#[derive(Debug, Clone)]
struct RequestId(String);

/// Gives every auth request an id (the client's `X-Request-Id` if sane) and
/// echoes it in the answer, as the FHIR pipeline does, so a caller can find
/// the audit record of its request.
async fn with_request_id(mut request: Request, next: Next) -> Response {
    let id = request_id(request.headers());
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Where an auth request came from: its request id and the peer's address,
/// for its audit record.
pub(crate) struct Origin {
    request_id: String,
    peer: Option<IpAddr>,
}

impl<S: Send + Sync> FromRequestParts<S> for Origin {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Origin {
            request_id: parts
                .extensions
                .get::<RequestId>()
                .map_or_else(|| request_id(&parts.headers), |id| id.0.clone()),
            peer: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        })
    }
}

impl Origin {
    /// A successful event from this origin; the endpoint fills in the rest.
    fn facts(&self) -> AuthEventFacts<'_> {
        let mut facts = AuthEventFacts::new(&self.request_id);
        facts.peer = self.peer;
        facts
    }

    /// A successful event from this origin by a signed-in user.
    fn facts_of<'a>(&'a self, user: &'a UserRecord) -> AuthEventFacts<'a> {
        let mut facts = self.facts();
        facts.username = Some(&user.username);
        facts.fhir_user = user.fhir_user.as_deref();
        facts
    }
}

/// How an endpoint answers: RFC 6749 JSON or an HTML page.
#[derive(Clone, Copy)]
enum Face {
    Json,
    Page,
}

/// Records one authentication event and waits for its commit: the one place
/// auth events are written. `Err` is the 500 to answer instead of the
/// endpoint's answer when the event could not be stored (fail closed).
async fn record(
    state: &AuthState,
    kind: AuthEventKind,
    mut facts: AuthEventFacts<'_>,
    face: Face,
) -> Result<(), Response> {
    let Some(recorder) = &state.audit else {
        return Ok(());
    };
    // A blank field a caller sent says nothing, and FHIR strings may not be empty.
    let present = |value: Option<&str>| value.is_some_and(|v| !v.trim().is_empty());
    for field in [
        &mut facts.username,
        &mut facts.fhir_user,
        &mut facts.client_id,
        &mut facts.scopes,
        &mut facts.token,
    ] {
        if !present(*field) {
            *field = None;
        }
    }
    recorder.record_auth(kind, facts).await.map_err(|error| {
        tracing::error!(%error, ?kind, "an auth event was not recorded; the answer is withheld");
        unrecorded(face)
    })
}

/// Records one authentication event, then lets `answer` out; when the event
/// cannot be stored, the answer (a token, a code, a cookie) is withheld.
async fn audited(
    state: &AuthState,
    kind: AuthEventKind,
    facts: AuthEventFacts<'_>,
    face: Face,
    answer: Response,
) -> Response {
    match record(state, kind, facts, face).await {
        Ok(()) => answer,
        Err(withheld) => withheld,
    }
}

fn unrecorded(face: Face) -> Response {
    match face {
        Face::Json => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "server_error", "error_description": "the request could not be completed"}),
        ),
        Face::Page => error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Something went wrong on our side. Try again later.",
        ),
    }
}

/// The audit outcome of an OAuth error code: the caller was refused (8), the
/// request was wrong (4), or the server failed (12).
fn outcome_of(error: &str) -> Outcome {
    match error {
        "invalid_client" | "unauthorized_client" | "access_denied" | "invalid_token" => {
            Outcome::Denied
        }
        "server_error" | "temporarily_unavailable" => Outcome::ServerError,
        _ => Outcome::BadInput,
    }
}

/// Marks an event as refused with an OAuth error code and its description.
fn refuse(facts: &mut AuthEventFacts<'_>, error: &str, description: &str) {
    facts.outcome = outcome_of(error);
    facts.description = Some(format!("{error}: {description}"));
}

/// Marks an event as failed for a reason given in words.
fn fail(facts: &mut AuthEventFacts<'_>, outcome: Outcome, reason: &str) {
    facts.outcome = outcome;
    facts.description = Some(reason.to_owned());
}

/// The claims of an access token this server has just signed; only read, so
/// its signature needs no check.
fn issued_claims(token: &str) -> Value {
    token
        .split('.')
        .nth(1)
        .and_then(|payload| URL_SAFE_NO_PAD.decode(payload).ok())
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(Value::Null)
}

/// The `error` and `error_description` of a redirect back to the client, if it
/// carries an error (RFC 6749 §4.1.2.1).
fn redirect_error(location: &str) -> Option<(String, String)> {
    let query = location.split_once('?')?.1;
    let pairs: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let error = pairs.get("error")?.clone();
    let description = pairs.get("error_description").cloned().unwrap_or_default();
    Some((error, description))
}

// ----- Discovery -------------------------------------------------------------

async fn smart_configuration(State(state): State<AuthState>) -> Response {
    discovery(state.server.smart_configuration())
}

async fn openid_configuration(State(state): State<AuthState>) -> Response {
    discovery(state.server.openid_configuration())
}

async fn jwks(State(state): State<AuthState>) -> Response {
    discovery(state.server.jwks())
}

/// Discovery documents are JSON whatever the Accept header says, and readable
/// from browser apps on other origins.
fn discovery(body: Value) -> Response {
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

// ----- Authorization endpoint and pages -------------------------------------------

/// Starts an authorization request. A request that starts well is recorded
/// when it is decided (consent); one refused here is recorded now.
async fn authorize(State(state): State<AuthState>, origin: Origin, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if let Some(refusal) = over_rate(&state, "authorize", &parts, AUTHORIZE_RATE, false) {
        return refusal;
    }
    let read = if parts.method == Method::POST {
        axum::body::to_bytes(body, 64 * 1024)
            .await
            .ok()
            .map(|bytes| pairs(&bytes))
    } else {
        Some(pairs(parts.uri.query().unwrap_or_default().as_bytes()))
    };
    let unreadable = read.is_none();
    let raw = read.unwrap_or_default();
    let mut facts = origin.facts();
    // What the client asked for, named even when the request is refused.
    let asked = |name: &str| raw.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    facts.client_id = asked("client_id");
    facts.scopes = asked("scope");
    let kind = AuthEventKind::Authorize;
    if unreadable {
        refuse(
            &mut facts,
            "invalid_request",
            "the request could not be read",
        );
        let answer = error_page(StatusCode::BAD_REQUEST, "The request could not be read.");
        return audited(&state, kind, facts, Face::Page, answer).await;
    }
    let params = match single_valued(raw.clone()) {
        Ok(p) => p,
        Err(e) => {
            refuse(&mut facts, e.error, &e.description);
            let answer = error_page(StatusCode::BAD_REQUEST, &e.description);
            return audited(&state, kind, facts, Face::Page, answer).await;
        }
    };
    let pending = match state.server.begin_authorization(&params).await {
        Ok(pending) => pending,
        Err(AuthorizeError::Page(message)) => {
            refuse(&mut facts, "invalid_request", &message);
            let answer = error_page(StatusCode::BAD_REQUEST, &message);
            return audited(&state, kind, facts, Face::Page, answer).await;
        }
        Err(AuthorizeError::Redirect(location)) => {
            let (error, description) = redirect_error(&location).unwrap_or_default();
            refuse(&mut facts, &error, &description);
            return audited(&state, kind, facts, Face::Page, redirect(&location)).await;
        }
    };
    let (pending, browser) = match state.server.bind_browser(pending).await {
        Ok(bound) => bound,
        Err(e) => {
            refuse(&mut facts, e.error, &e.description);
            let answer = error_page(StatusCode::SERVICE_UNAVAILABLE, &e.description);
            return audited(&state, kind, facts, Face::Page, answer).await;
        }
    };
    let binding = cookie_header(
        &state,
        &request_cookie(&pending.id),
        &browser,
        state.server.config().pending_lifetime.whole_seconds(),
    );
    // Signed in already (the EHR launcher, or an earlier app): skip the sign-in page.
    let mut response = None;
    if let Some(session) = cookie(&parts.headers, SESSION_COOKIE) {
        if let Some(user) = state.server.session_user(&session).await {
            if pending
                .username
                .as_deref()
                .is_none_or(|u| u == user.username)
            {
                response =
                    Some(continue_with(&state, &origin, pending.clone(), &user, &session).await);
            }
        }
    }
    let mut response =
        response.unwrap_or_else(|| redirect(&format!("/auth/login?request={}", pending.id)));
    response.headers_mut().append(header::SET_COOKIE, binding);
    response
}

/// After sign-in: bind the request to the user and go to the next page.
/// A refusal here is an authorization decision, and is recorded as one.
async fn continue_with(
    state: &AuthState,
    origin: &Origin,
    pending: Pending,
    user: &UserRecord,
    session: &str,
) -> Response {
    let client_id = pending.client_id.clone();
    let scopes = pending.scopes.to_string();
    let (error, description, message) = match state.server.attach_user(pending, user, session).await
    {
        Ok(pending) if pending.needs_patient() && user.role == Role::Patient => (
            "access_denied",
            "the account is not linked to a patient record".to_owned(),
            "Your account is not linked to a patient record.".to_owned(),
        ),
        Ok(pending) if pending.needs_patient() => {
            return redirect(&format!("/auth/patient?request={}", pending.id))
        }
        Ok(pending) => return redirect(&format!("/auth/consent?request={}", pending.id)),
        Err(e) => (e.error, e.description.clone(), e.description),
    };
    let mut facts = origin.facts();
    facts.username = Some(&user.username);
    facts.fhir_user = user.fhir_user.as_deref();
    facts.client_id = Some(&client_id);
    facts.scopes = Some(&scopes);
    refuse(&mut facts, error, &description);
    let answer = error_page(StatusCode::FORBIDDEN, &message);
    audited(state, AuthEventKind::Authorize, facts, Face::Page, answer).await
}

async fn login_form(
    State(state): State<AuthState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let request = query.get("request").map(String::as_str);
    let app = match request {
        Some(id) => match state.server.pending(id).await {
            Some(p) => Some(p.client_name),
            None => {
                return error_page(
                    StatusCode::BAD_REQUEST,
                    "This sign-in request has expired. Start again from the app.",
                )
            }
        },
        None => None,
    };
    login_page(&state, StatusCode::OK, request, app.as_deref(), None)
}

/// The sign-in page with a fresh double-submit token in a cookie and the form.
fn login_page(
    state: &AuthState,
    status: StatusCode,
    request: Option<&str>,
    app: Option<&str>,
    error: Option<&str>,
) -> Response {
    let csrf = haven_auth::registry::random_token(24);
    let mut response = html(status, pages::login_page(request, app, error, &csrf));
    response.headers_mut().append(
        header::SET_COOKIE,
        cookie_header(state, CSRF_COOKIE, &csrf, 3600),
    );
    response
}

/// A cookie for the auth pages only, out of reach of scripts.
fn cookie_header(state: &AuthState, name: &str, value: &str, max_age: i64) -> HeaderValue {
    let secure = if state.server.config().fhir_base.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/auth; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn session_cookie(state: &AuthState, value: &str) -> HeaderValue {
    cookie_header(
        state,
        SESSION_COOKIE,
        value,
        state.server.config().session_lifetime.whole_seconds(),
    )
}

/// Every sign-in attempt past the rate limit is recorded with the username
/// typed, never the password.
async fn login(State(state): State<AuthState>, origin: Origin, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let address = remote(&parts.extensions);
    if let Some(refusal) = over_rate(&state, "login", &parts, LOGIN_RATE, false) {
        return refusal;
    }
    let mut facts = origin.facts();
    let kind = AuthEventKind::Login;
    let Ok(bytes) = axum::body::to_bytes(body, 16 * 1024).await else {
        fail(
            &mut facts,
            Outcome::BadInput,
            "the sign-in form could not be read",
        );
        let answer = error_page(StatusCode::BAD_REQUEST, "The form could not be read.");
        return audited(&state, kind, facts, Face::Page, answer).await;
    };
    let form: HashMap<String, String> = pairs(&bytes).into_iter().collect();
    let username = form.get("username").map(String::as_str).unwrap_or_default();
    let password = form.get("password").map(String::as_str).unwrap_or_default();
    let request_id = form.get("request").map(String::as_str);
    facts.username = Some(username);
    // Login CSRF: the form's token must equal the cookie set with the form.
    let csrf_ok = matches!(
        (form.get("csrf"), cookie(&parts.headers, CSRF_COOKIE)),
        (Some(field), Some(jar)) if !field.is_empty() && *field == jar
    );
    if !csrf_ok {
        fail(
            &mut facts,
            Outcome::Denied,
            "the sign-in form's CSRF token did not match",
        );
        let answer = error_page(
            StatusCode::FORBIDDEN,
            "This sign-in form has expired. Reload the page and try again.",
        );
        return audited(&state, kind, facts, Face::Page, answer).await;
    }
    let pending = match request_id {
        Some(id) => match state.server.pending(id).await {
            Some(p) => Some(p),
            None => {
                fail(
                    &mut facts,
                    Outcome::BadInput,
                    "the sign-in request has expired",
                );
                let answer = error_page(
                    StatusCode::BAD_REQUEST,
                    "This sign-in request has expired. Start again from the app.",
                );
                return audited(&state, kind, facts, Face::Page, answer).await;
            }
        },
        None => None,
    };
    facts.client_id = pending.as_ref().map(|p| p.client_id.as_str());
    // Only the browser that made the request may sign in to it.
    if let Some(p) = &pending {
        let secret = cookie(&parts.headers, &request_cookie(&p.id));
        if !state.server.from_browser(p, secret.as_deref()) {
            fail(
                &mut facts,
                Outcome::Denied,
                "the sign-in request belongs to another browser",
            );
            let answer = error_page(
                StatusCode::FORBIDDEN,
                "This request was started in another browser. Start again from the app.",
            );
            return audited(&state, kind, facts, Face::Page, answer).await;
        }
    }
    let app = pending.as_ref().map(|p| p.client_name.clone());
    match state.server.login(username, password, &address).await {
        Ok((session, user)) => {
            facts.fhir_user = user.fhir_user.as_deref();
            // Recorded before the session is handed out.
            if let Err(withheld) = record(&state, kind, facts, Face::Page).await {
                return withheld;
            }
            let mut response = match pending {
                Some(pending) => continue_with(&state, &origin, pending, &user, &session).await,
                None => redirect("/auth/launcher"),
            };
            response
                .headers_mut()
                .append(header::SET_COOKIE, session_cookie(&state, &session));
            response
        }
        Err(LoginError::Invalid) => {
            fail(&mut facts, Outcome::Denied, "wrong username or password");
            let answer = login_page(
                &state,
                StatusCode::UNAUTHORIZED,
                request_id,
                app.as_deref(),
                Some("The username or password is wrong."),
            );
            audited(&state, kind, facts, Face::Page, answer).await
        }
        Err(LoginError::Throttled(wait)) => {
            fail(
                &mut facts,
                Outcome::Denied,
                "sign-in locked after repeated failures",
            );
            audited(&state, kind, facts, Face::Page, too_many(wait, false)).await
        }
        Err(LoginError::Unavailable) => {
            fail(
                &mut facts,
                Outcome::ServerError,
                "the sign-in could not be completed",
            );
            let answer = error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Signing in is not possible right now. Try again later.",
            );
            audited(&state, kind, facts, Face::Page, answer).await
        }
    }
}

/// The pending request named in the form or query, if this browser owns it.
async fn owned_pending(
    state: &AuthState,
    headers: &HeaderMap,
    id: Option<&str>,
) -> Result<(Pending, UserRecord), Response> {
    let expired = || {
        error_page(
            StatusCode::BAD_REQUEST,
            "This request has expired. Start again from the app.",
        )
    };
    let pending = match id {
        Some(id) => state.server.pending(id).await.ok_or_else(expired)?,
        None => return Err(expired()),
    };
    let session = cookie(headers, SESSION_COOKIE).unwrap_or_default();
    let browser = cookie(headers, &request_cookie(&pending.id));
    if !state.server.owns(&pending, &session)
        || !state.server.from_browser(&pending, browser.as_deref())
    {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "This request belongs to another sign-in.",
        ));
    }
    let user = state.server.session_user(&session).await.ok_or_else(|| {
        error_page(
            StatusCode::FORBIDDEN,
            "Your sign-in has ended. Start again from the app.",
        )
    })?;
    Ok((pending, user))
}

/// Ends the browser's sign-in; `online_access` refresh tokens end with it.
/// Recorded as a Login event described as a sign-out.
async fn logout(State(state): State<AuthState>, origin: Origin, headers: HeaderMap) -> Response {
    let session = cookie(&headers, SESSION_COOKIE);
    let user = match &session {
        Some(session) => state.server.session_user(session).await,
        None => None,
    };
    let mut facts = origin.facts();
    facts.description = Some("logout".into());
    facts.username = user.as_ref().map(|u| u.username.as_str());
    facts.fhir_user = user.as_ref().and_then(|u| u.fhir_user.as_deref());
    // Recorded first: a sign-out the trail cannot hold leaves the session as it was.
    if let Err(withheld) = record(&state, AuthEventKind::Login, facts, Face::Page).await {
        return withheld;
    }
    if let Some(session) = &session {
        state.server.logout(session).await;
    }
    let mut response = redirect("/auth/login");
    response.headers_mut().append(
        header::SET_COOKIE,
        cookie_header(&state, SESSION_COOKIE, "", 0),
    );
    response
}

/// Patients for the picker and the launcher, optionally by name.
async fn patients(store: &dyn Store, name: &str) -> Vec<PatientChoice> {
    let name = name.trim().to_string();
    // Any part of any name starting with each word typed.
    let criterion = name
        .split_whitespace()
        .map(|word| Criterion::String {
            param: "name".into(),
            value: haven_model::search_index::normalize_string(word),
            how: StringMatch::StartsWith,
        })
        .fold(Criterion::Always, Criterion::and);
    let query = SearchQuery {
        types: vec!["Patient".into()],
        criterion,
        count: 50,
        sort: vec![SortKey {
            by: SortBy::LastUpdated,
            descending: true,
        }],
        ..SearchQuery::default()
    };
    let Ok(page) = store.search(&query).await else {
        return Vec::new();
    };
    page.resources
        .iter()
        .filter_map(|v| {
            let r = v.resource.as_ref()?;
            Some(PatientChoice {
                id: v.id.clone(),
                name: display_name(r),
                birth_date: r["birthDate"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// A person's name as it is usually written.
fn display_name(resource: &Value) -> String {
    let Some(name) = resource["name"].as_array().and_then(|n| n.first()) else {
        return resource["id"].as_str().unwrap_or("(no name)").to_string();
    };
    if let Some(text) = name["text"].as_str() {
        return text.to_string();
    }
    let mut parts: Vec<&str> = name["given"]
        .as_array()
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if let Some(family) = name["family"].as_str() {
        parts.push(family);
    }
    if parts.is_empty() {
        "(no name)".into()
    } else {
        parts.join(" ")
    }
}

/// The description of a patient list shown on a page: the search typed, how
/// many patients were listed, and which (an auth event carries no entity
/// references, so they are named here).
fn listed(search: &str, q: &str, list: &[PatientChoice]) -> String {
    let count = match list.len() {
        1 => "1 patient".to_owned(),
        n => format!("{n} patients"),
    };
    let references: Vec<String> = list.iter().map(|p| format!("Patient/{}", p.id)).collect();
    if references.is_empty() {
        format!("{search} for {q:?}: {count} listed")
    } else {
        format!(
            "{search} for {q:?}: {count} listed: {}",
            references.join(", ")
        )
    }
}

/// The pending request for the patient picker and its user: owned by this
/// browser, and only practitioners pick patients.
async fn picking_pending(
    state: &AuthState,
    headers: &HeaderMap,
    id: Option<&str>,
) -> Result<(Pending, UserRecord), Response> {
    let (pending, user) = owned_pending(state, headers, id).await?;
    if user.role == Role::Patient {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "Patients cannot choose another record.",
        ));
    }
    Ok((pending, user))
}

/// Whether `id` names a Patient that exists and is not deleted.
async fn patient_exists(store: &dyn Store, id: &str) -> bool {
    haven_model::id::is_valid_id(id)
        && matches!(store.read("Patient", id).await, Ok(Some(v)) if !v.is_deleted())
}

/// The picker page, whose patient list is recorded as an Authorize event.
async fn patient_picker(
    State(state): State<AuthState>,
    origin: Origin,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (pending, user) =
        match picking_pending(&state, &headers, query.get("request").map(String::as_str)).await {
            Ok(found) => found,
            Err(response) => return response,
        };
    let q = query.get("q").map(String::as_str).unwrap_or_default();
    let list = patients(&*state.store, q).await;
    let page = html(
        StatusCode::OK,
        pages::patient_picker(&pending.id, &pending.client_name, q, &list),
    );
    let mut facts = origin.facts_of(&user);
    facts.client_id = Some(&pending.client_id);
    facts.description = Some(listed("patient picker search", q, &list));
    audited(&state, AuthEventKind::Authorize, facts, Face::Page, page).await
}

/// The choice of the patient in context: an authorization decision, recorded
/// with the chosen Patient before it is kept.
async fn choose_patient(
    State(state): State<AuthState>,
    origin: Origin,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: HashMap<String, String> = pairs(&body).into_iter().collect();
    let (pending, user) =
        match picking_pending(&state, &headers, form.get("request").map(String::as_str)).await {
            Ok(found) => found,
            Err(response) => return response,
        };
    let kind = AuthEventKind::Authorize;
    let client_id = pending.client_id.clone();
    let scopes = pending.scopes.to_string();
    let mut facts = origin.facts_of(&user);
    facts.client_id = Some(&client_id);
    facts.scopes = Some(&scopes);
    let Some(patient) = form.get("patient") else {
        fail(&mut facts, Outcome::BadInput, "no patient chosen");
        let answer = error_page(StatusCode::BAD_REQUEST, "Choose a patient.");
        return audited(&state, kind, facts, Face::Page, answer).await;
    };
    if !patient_exists(&*state.store, patient).await {
        let reason = format!("the patient chosen does not exist: {patient:?}");
        fail(&mut facts, Outcome::BadInput, &reason);
        let answer = error_page(StatusCode::BAD_REQUEST, "That patient does not exist.");
        return audited(&state, kind, facts, Face::Page, answer).await;
    }
    let about = format!("patient chosen: Patient/{patient}");
    facts.description = Some(about.clone());
    facts.patient = Some(patient);
    // Recorded first: a choice the trail cannot hold is not kept.
    if let Err(withheld) = record(&state, kind, facts.clone(), Face::Page).await {
        return withheld;
    }
    match state.server.choose_patient(pending, patient).await {
        Ok(pending) => redirect(&format!("/auth/consent?request={}", pending.id)),
        Err(e) => {
            refuse(&mut facts, e.error, &format!("{about}: {}", e.description));
            let answer = error_page(StatusCode::BAD_REQUEST, &e.description);
            audited(&state, kind, facts, Face::Page, answer).await
        }
    }
}

/// The consent page; when it names the patient in context it shows patient
/// data, and is recorded as an Authorize event naming that Patient.
async fn consent_form(
    State(state): State<AuthState>,
    origin: Origin,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (pending, user) =
        match owned_pending(&state, &headers, query.get("request").map(String::as_str)).await {
            Ok(found) => found,
            Err(response) => return response,
        };
    if pending.needs_patient() {
        return redirect(&format!("/auth/patient?request={}", pending.id));
    }
    let patient = match &pending.context.patient {
        Some(id) => match state.store.read("Patient", id).await {
            Ok(Some(v)) => v.resource.as_ref().map(display_name).or(Some(id.clone())),
            _ => Some(id.clone()),
        },
        None => None,
    };
    let choices: Vec<ScopeChoice> = pending
        .scopes
        .iter()
        .map(|s| ScopeChoice {
            scope: s.to_string(),
            description: s.describe(),
        })
        .collect();
    let who = user.display_name.clone().unwrap_or(user.username.clone());
    let page = html(
        StatusCode::OK,
        pages::consent_page(
            &pending.id,
            &pending.client_name,
            &who,
            patient.as_deref(),
            &choices,
        ),
    );
    let Some(id) = &pending.context.patient else {
        return page;
    };
    let scopes = pending.scopes.to_string();
    let mut facts = origin.facts_of(&user);
    facts.client_id = Some(&pending.client_id);
    facts.scopes = Some(&scopes);
    facts.description = Some(format!("consent page showing Patient/{id}"));
    facts.patient = Some(id);
    audited(&state, AuthEventKind::Authorize, facts, Face::Page, page).await
}

/// The user's decision: recorded as an Authorize event, approved with the
/// scopes granted or denied with the scopes asked for.
async fn consent(
    State(state): State<AuthState>,
    origin: Origin,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = pairs(&body);
    let request = form
        .iter()
        .find(|(k, _)| k == "request")
        .map(|(_, v)| v.as_str());
    let (pending, user) = match owned_pending(&state, &headers, request).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let decision = form
        .iter()
        .find(|(k, _)| k == "decision")
        .map(|(_, v)| v.as_str());
    let asked = pending.scopes.to_string();
    let approved: ScopeSet = form
        .iter()
        .filter(|(k, _)| k == "scope")
        .filter_map(|(_, v)| haven_auth::scope::Scope::parse(v))
        .collect();
    let granted = scope::narrow(&pending.scopes, &approved).to_string();
    let mut facts = origin.facts_of(&user);
    facts.client_id = Some(&pending.client_id);
    let answer = if decision == Some("approve") {
        match state.server.approve(&pending, &approved).await {
            Ok(location) => {
                // Approving nothing is a denial the client learns at its redirect.
                match redirect_error(&location) {
                    Some((error, description)) => {
                        refuse(&mut facts, &error, &description);
                        facts.scopes = Some(&asked);
                    }
                    None => facts.scopes = Some(&granted),
                }
                redirect(&location)
            }
            Err(e) => {
                refuse(&mut facts, e.error, &e.description);
                facts.scopes = Some(&asked);
                error_page(StatusCode::BAD_REQUEST, &e.description)
            }
        }
    } else {
        refuse(&mut facts, "access_denied", "the user did not approve");
        facts.scopes = Some(&asked);
        redirect(&state.server.deny(&pending).await)
    };
    // Recorded after: approval stores its code in haven-auth before the redirect
    // exists; unrecorded, the redirect (and the code) is withheld.
    audited(&state, AuthEventKind::Authorize, facts, Face::Page, answer).await
}

/// The EHR launcher: a signed-in practitioner picks a patient and an app.
async fn signed_in_practitioner(
    state: &AuthState,
    headers: &HeaderMap,
) -> Result<UserRecord, Response> {
    let session = cookie(headers, SESSION_COOKIE).unwrap_or_default();
    match state.server.session_user(&session).await {
        Some(user) if user.role != Role::Patient => Ok(user),
        Some(_) => Err(error_page(
            StatusCode::FORBIDDEN,
            "The launcher is for practitioners.",
        )),
        None => Err(redirect("/auth/login")),
    }
}

/// The launcher page, whose patient list is recorded as an Authorize event.
async fn launcher(
    State(state): State<AuthState>,
    origin: Origin,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let user = match signed_in_practitioner(&state, &headers).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    let q = query.get("q").map(String::as_str).unwrap_or_default();
    let list = patients(&*state.store, q).await;
    let apps: Vec<AppChoice> = state
        .server
        .clients()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.launch_uri.is_some() && !c.backend)
        .map(|c| AppChoice {
            client_id: c.client_id,
            name: c.name,
        })
        .collect();
    let who = user.display_name.clone().unwrap_or(user.username.clone());
    let page = html(StatusCode::OK, pages::launcher_page(&who, q, &list, &apps));
    let mut facts = origin.facts_of(&user);
    facts.description = Some(listed("EHR launcher patient search", q, &list));
    audited(&state, AuthEventKind::Authorize, facts, Face::Page, page).await
}

/// An EHR launch, recorded as an Authorize event with the app and the Patient.
async fn launch(
    State(state): State<AuthState>,
    origin: Origin,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let user = match signed_in_practitioner(&state, &headers).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    let form: HashMap<String, String> = pairs(&body).into_iter().collect();
    let kind = AuthEventKind::Authorize;
    let mut facts = origin.facts_of(&user);
    facts.client_id = form.get("client_id").map(String::as_str);
    let (Some(patient), Some(client_id)) = (form.get("patient"), form.get("client_id")) else {
        fail(
            &mut facts,
            Outcome::BadInput,
            "EHR launch without a patient or an app",
        );
        let answer = error_page(StatusCode::BAD_REQUEST, "Choose a patient and an app.");
        return audited(&state, kind, facts, Face::Page, answer).await;
    };
    if !patient_exists(&*state.store, patient).await {
        let reason = format!("EHR launch for a patient that does not exist: {patient:?}");
        fail(&mut facts, Outcome::BadInput, &reason);
        let answer = error_page(StatusCode::BAD_REQUEST, "That patient does not exist.");
        return audited(&state, kind, facts, Face::Page, answer).await;
    }
    let about = format!("EHR launch for Patient/{patient}");
    facts.description = Some(about.clone());
    facts.patient = Some(patient);
    let context = LaunchContext {
        patient: Some(patient.clone()),
        ..LaunchContext::default()
    };
    let answer = match state.server.create_launch(&user, client_id, context).await {
        Ok(location) => redirect(&location),
        Err(e) => {
            refuse(&mut facts, e.error, &format!("{about}: {}", e.description));
            error_page(StatusCode::BAD_REQUEST, &e.description)
        }
    };
    // Recorded after: haven-auth stores the launch before its URL exists;
    // unrecorded, the URL is withheld and the launch expires unused.
    audited(&state, kind, facts, Face::Page, answer).await
}

// ----- Token, introspection, revocation, registration --------------------------------

/// The form of an OAuth request body and the caller's Basic credentials.
type OAuthForm = (HashMap<String, String>, Option<(String, String)>);

/// Reads a form-encoded OAuth request body and the caller's Basic credentials.
async fn oauth_form(parts: &Parts, body: axum::body::Body) -> Result<OAuthForm, OAuthError> {
    let form_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        return Err(oauth_error(
            400,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(|_| oauth_error(400, "invalid_request", "the body is too large"))?;
    let form = single_valued(pairs(&bytes))?;
    Ok((form, basic_credentials(&parts.headers)))
}

/// The client-authenticated endpoints, which share their plumbing.
#[derive(Clone, Copy)]
enum ClientCall {
    Token,
    Introspect,
    Revoke,
}

impl ClientCall {
    /// The event a call is recorded as; a refresh is told from other grants.
    fn kind(self, form: &HashMap<String, String>) -> AuthEventKind {
        match self {
            ClientCall::Token
                if form.get("grant_type").map(String::as_str) == Some("refresh_token") =>
            {
                AuthEventKind::Refresh
            }
            ClientCall::Token => AuthEventKind::Token,
            ClientCall::Introspect => AuthEventKind::Introspection,
            ClientCall::Revoke => AuthEventKind::Revocation,
        }
    }
}

async fn client_call(
    state: &AuthState,
    origin: &Origin,
    request: Request,
    call: ClientCall,
) -> Response {
    let endpoint = match call {
        ClientCall::Token => "token",
        ClientCall::Introspect => "introspect",
        ClientCall::Revoke => "revoke",
    };
    let (parts, body) = request.into_parts();
    let rate = Rate {
        requests: state.server.config().token_requests_per_minute,
        window: Duration::minutes(1),
    };
    if let Some(refusal) = over_rate(state, endpoint, &parts, rate, true) {
        return refusal;
    }
    let (form, basic) = match oauth_form(&parts, body).await {
        Ok(read) => read,
        Err(e) => {
            let mut facts = origin.facts();
            refuse(&mut facts, e.error, &e.description);
            let kind = call.kind(&HashMap::new());
            return audited(state, kind, facts, Face::Json, oauth_response(&e, false)).await;
        }
    };
    // The client the caller claims to be; replaced by the proven one on success.
    let claimed = basic
        .as_ref()
        .map(|(id, _)| id.clone())
        .or_else(|| form.get("client_id").cloned());
    let basic_attempted = basic.is_some();
    if matches!(call, ClientCall::Revoke) && !form.contains_key("client_assertion") {
        return revoke_recorded_first(state, origin, &form, basic, claimed.as_deref()).await;
    }
    let mut pending = PendingRecord::default();
    let result = match call {
        ClientCall::Token => match state.server.token_pending(&form, basic).await {
            Ok((body, record)) => {
                pending = record;
                Ok(Some(body))
            }
            Err(e) => Err(e),
        },
        ClientCall::Introspect => state.server.introspect(&form, basic).await.map(Some),
        // RFC 7009 §2.2: a revocation answers 200 with no body.
        ClientCall::Revoke => state.server.revoke(&form, basic).await.map(|()| None),
    };
    let kind = call.kind(&form);
    let issued = match (&result, call) {
        (Ok(Some(body)), ClientCall::Token) => {
            issued_claims(body["access_token"].as_str().unwrap_or_default())
        }
        _ => Value::Null,
    };
    let mut facts = origin.facts();
    facts.client_id = claimed.as_deref();
    // Introspection and revocation are about the token the caller sent.
    let subject = form.get("token").map(String::as_str);
    let answer = match &result {
        Ok(Some(body)) => {
            facts.scopes = body["scope"].as_str();
            match call {
                ClientCall::Token => {
                    facts.token = body["access_token"].as_str();
                    facts.client_id = issued["client_id"].as_str().or(facts.client_id);
                    // A client_credentials token speaks for the client, not a user.
                    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
                        facts.username = issued["sub"].as_str();
                        facts.fhir_user = issued["fhirUser"].as_str();
                    }
                }
                _ => {
                    facts.token = subject;
                    facts.description = Some(if body["active"] == true {
                        "the token is active".into()
                    } else {
                        "the token is not active".into()
                    });
                }
            }
            json_response(StatusCode::OK, body.clone())
        }
        Ok(None) => {
            facts.token = subject;
            no_store(StatusCode::OK.into_response())
        }
        Err(e) => {
            refuse(&mut facts, e.error, &e.description);
            if !matches!(call, ClientCall::Token) {
                facts.token = subject;
            }
            facts.scopes = form.get("scope").map(String::as_str);
            oauth_response(e, basic_attempted)
        }
    };
    // Recorded after: a token's grant is stored in haven-auth before the token
    // exists; unrecorded, nothing is handed out. The assertion's use (good for
    // one check only) commits meanwhile, and the token waits for it too.
    let (recorded, settled) = tokio::join!(
        record(state, kind, facts.clone(), Face::Json),
        pending.settled()
    );
    if let Err(withheld) = recorded {
        return withheld;
    }
    match settled {
        Ok(()) => answer,
        Err(e) => {
            refuse(
                &mut facts,
                e.error,
                "the token was withheld: the client assertion's use could not be stored",
            );
            audited(state, kind, facts, Face::Json, oauth_response(&e, false)).await
        }
    }
}

/// A revocation by a client that authenticates without an assertion: the
/// client is checked, the revocation recorded, and only then done, so a
/// revocation the trail cannot hold does not happen.
async fn revoke_recorded_first(
    state: &AuthState,
    origin: &Origin,
    form: &HashMap<String, String>,
    basic: Option<(String, String)>,
    claimed: Option<&str>,
) -> Response {
    let kind = AuthEventKind::Revocation;
    let basic_attempted = basic.is_some();
    let mut facts = origin.facts();
    facts.client_id = claimed;
    facts.token = form.get("token").map(String::as_str);
    let client = match state.server.authenticate_client(form, basic.clone()).await {
        Ok(client) => client,
        Err(e) => {
            refuse(&mut facts, e.error, &e.description);
            let answer = oauth_response(&e, basic_attempted);
            return audited(state, kind, facts, Face::Json, answer).await;
        }
    };
    facts.client_id = Some(&client.client_id);
    if let Err(withheld) = record(state, kind, facts.clone(), Face::Json).await {
        return withheld;
    }
    match state.server.revoke(form, basic).await {
        // RFC 7009 §2.2: a revocation answers 200 with no body.
        Ok(()) => no_store(StatusCode::OK.into_response()),
        Err(e) => {
            refuse(&mut facts, e.error, &e.description);
            let answer = oauth_response(&e, basic_attempted);
            audited(state, kind, facts, Face::Json, answer).await
        }
    }
}

async fn token(State(state): State<AuthState>, origin: Origin, request: Request) -> Response {
    client_call(&state, &origin, request, ClientCall::Token).await
}

async fn introspect(State(state): State<AuthState>, origin: Origin, request: Request) -> Response {
    client_call(&state, &origin, request, ClientCall::Introspect).await
}

async fn revoke(State(state): State<AuthState>, origin: Origin, request: Request) -> Response {
    client_call(&state, &origin, request, ClientCall::Revoke).await
}

/// Dynamic registration, recorded with the client made (or the refusal) and a
/// fingerprint of the initial access token used.
async fn register(State(state): State<AuthState>, origin: Origin, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if let Some(refusal) = over_rate(&state, "register", &parts, REGISTER_RATE, true) {
        return refusal;
    }
    let token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_string());
    let metadata = match axum::body::to_bytes(body, 64 * 1024).await {
        Err(_) => Err(oauth_error(
            400,
            "invalid_client_metadata",
            "the body is too large",
        )),
        Ok(bytes) => serde_json::from_slice::<Value>(&bytes).map_err(|_| {
            oauth_error(
                400,
                "invalid_client_metadata",
                "the body must be a JSON object",
            )
        }),
    };
    let result = match &metadata {
        Ok(metadata) => state.server.register(token.as_deref(), metadata).await,
        Err(e) => Err(e.clone()),
    };
    let mut facts = origin.facts();
    facts.token = token.as_deref();
    let answer = match &result {
        Ok(body) => {
            facts.client_id = body["client_id"].as_str();
            facts.scopes = body["scope"].as_str();
            json_response(StatusCode::CREATED, body.clone())
        }
        Err(e) => {
            refuse(&mut facts, e.error, &e.description);
            oauth_response(e, false)
        }
    };
    // Recorded after: haven-auth claims the initial token and stores the client
    // before its id exists; unrecorded, the id and secret are withheld.
    audited(
        &state,
        AuthEventKind::ClientRegistration,
        facts,
        Face::Json,
        answer,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_decoded_and_unescaped() {
        let mut headers = HeaderMap::new();
        let encoded = STANDARD.encode("my%20app:s%3Acret");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
        );
        assert_eq!(
            basic_credentials(&headers),
            Some(("my app".into(), "s:cret".into()))
        );
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(basic_credentials(&headers), None);
    }

    #[test]
    fn a_parameter_given_twice_is_refused() {
        let error =
            single_valued(vec![("a".into(), "1".into()), ("a".into(), "2".into())]).unwrap_err();
        assert_eq!(error.error, "invalid_request");
    }

    #[test]
    fn names_are_displayed_as_written() {
        assert_eq!(
            display_name(&json!({"name": [{"given": ["Amy", "V."], "family": "Shaw"}]})),
            "Amy V. Shaw"
        );
        assert_eq!(
            display_name(&json!({"name": [{"text": "Dr. Who"}]})),
            "Dr. Who"
        );
        assert_eq!(display_name(&json!({"id": "p1"})), "p1");
    }
}
