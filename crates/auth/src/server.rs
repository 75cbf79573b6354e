//! The authorization server: SMART App Launch 2.2 and Backend Services on
//! OAuth 2.0 (RFC 6749) with PKCE (RFC 7636), introspection (RFC 7662),
//! revocation (RFC 7009) and dynamic registration (RFC 7591).
//!
//! It knows nothing of HTTP frameworks: the API crate turns requests into calls
//! here and the results into responses and pages. State lives in the store's
//! auth records, keyed by hashes wherever the key is a secret.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use haven_model::clock::Clock;
use haven_policy::clearance::Clearance;
use haven_policy::purpose::{self, BREAK_THE_GLASS, TREATMENT};
use haven_store::{AuthRecords, StagedInsert, Store};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::{Duration, OffsetDateTime};

use crate::client::JWT_BEARER_ASSERTION_TYPE;
use crate::keys::{KeySet, ACCESS_TOKEN_ALGORITHM};
use crate::limits::{LoginThrottle, RateLimiter};
use crate::registry::{
    decoy_hash, hash_secret, kind, random_token, token_hash, verify_secret, ClientAuth,
    ClientRecord, Role, UserRecord,
};
use crate::scope::{self, Context, Scope, ScopeSet};
use crate::verified::VerifiedTokens;

/// Token requests per caller address and minute unless configured: enough
/// for any client, few enough to slow a flood.
pub const DEFAULT_TOKEN_REQUESTS_PER_MINUTE: u32 = 120;

/// Lifetimes and addresses of the authorization server.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The FHIR base URL: the issuer of every token and the audience of access tokens.
    pub fhir_base: String,
    /// Where `/auth/...` lives: the FHIR base's origin.
    pub auth_base: String,
    pub access_token_lifetime: Duration,
    pub backend_token_lifetime: Duration,
    pub code_lifetime: Duration,
    pub offline_refresh_lifetime: Duration,
    pub online_refresh_lifetime: Duration,
    pub pending_lifetime: Duration,
    pub session_lifetime: Duration,
    pub launch_lifetime: Duration,
    /// How long a break-the-glass token lives (no refresh token is issued).
    pub break_glass_lifetime: Duration,
    /// The clearance of each role's users, and of Backend Services clients,
    /// where the user or client has none of its own.
    pub clearances: RoleClearances,
    /// Requests each caller address may make per minute to the token,
    /// introspection and revocation endpoints (429 beyond it).
    pub token_requests_per_minute: u32,
}

/// Clearances by role, in the form `N`, `R:ETH,PSY` or `V:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleClearances {
    /// What patients see of their own record.
    pub patient: Clearance,
    pub practitioner: Clearance,
    pub admin: Clearance,
    /// Backend Services clients.
    pub backend: Clearance,
}

impl Default for RoleClearances {
    fn default() -> Self {
        Self {
            // A patient's right of access covers their whole record.
            patient: Clearance::unlimited(),
            practitioner: Clearance::default(),
            admin: Clearance::default(),
            backend: Clearance::default(),
        }
    }
}

impl AuthConfig {
    /// Endpoints under the origin of `fhir_base` (`https://host:port/auth/...`).
    pub fn new(fhir_base: &str) -> AuthConfig {
        let fhir_base = fhir_base.trim_end_matches('/').to_string();
        let origin = match fhir_base.find("://") {
            Some(i) => match fhir_base[i + 3..].find('/') {
                Some(j) => fhir_base[..i + 3 + j].to_string(),
                None => fhir_base.clone(),
            },
            None => fhir_base.clone(),
        };
        AuthConfig {
            auth_base: format!("{origin}/auth"),
            fhir_base,
            // SMART: access tokens live at most an hour; Backend Services at most five minutes.
            access_token_lifetime: Duration::hours(1),
            backend_token_lifetime: Duration::minutes(5),
            code_lifetime: Duration::seconds(60),
            offline_refresh_lifetime: Duration::days(30),
            online_refresh_lifetime: Duration::hours(12),
            pending_lifetime: Duration::minutes(15),
            session_lifetime: Duration::hours(8),
            launch_lifetime: Duration::minutes(5),
            break_glass_lifetime: Duration::minutes(15),
            clearances: RoleClearances::default(),
            token_requests_per_minute: DEFAULT_TOKEN_REQUESTS_PER_MINUTE,
        }
    }

    pub fn endpoint(&self, name: &str) -> String {
        format!("{}/{name}", self.auth_base)
    }

    pub fn token_endpoint(&self) -> String {
        self.endpoint("token")
    }
}

/// An OAuth error response (RFC 6749 §5.2, RFC 7591 §3.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub status: u16,
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    fn new(status: u16, error: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError {
            status,
            error,
            description: description.into(),
        }
    }

    fn invalid_request(description: impl Into<String>) -> OAuthError {
        OAuthError::new(400, "invalid_request", description)
    }

    /// Client authentication failed. The description stays generic so the answer
    /// does not tell which check failed.
    fn invalid_client() -> OAuthError {
        OAuthError::new(401, "invalid_client", "client authentication failed")
    }

    fn invalid_grant(description: impl Into<String>) -> OAuthError {
        OAuthError::new(400, "invalid_grant", description)
    }

    fn server_error() -> OAuthError {
        OAuthError::new(500, "server_error", "the request could not be completed")
    }

    pub fn body(&self) -> Value {
        json!({"error": self.error, "error_description": self.description})
    }
}

impl std::fmt::Display for OAuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.description)
    }
}

/// Whether a grant's record says it no longer holds: revoked, gone (expired
/// or never made) or unreadable.
fn grant_record_revoked(record: Option<Value>) -> bool {
    record.is_none_or(|value| {
        serde_json::from_value::<GrantRecord>(value)
            .map(|g| g.revoked)
            .unwrap_or(true)
    })
}

fn storage_failed(e: haven_store::StoreError) -> OAuthError {
    tracing::error!(error = %e, "auth storage failed");
    OAuthError::server_error()
}

/// The record of a client assertion's `jti`, whose insert has run but may not
/// be committed yet: what the request earned is handed out only once it is,
/// and the caller can record the request meanwhile.
#[derive(Debug, Default)]
pub struct PendingRecord(Option<StagedInsert>);

impl PendingRecord {
    /// Waits for the commit. A failure is a server error, and then the
    /// assertion may not count as used: nothing it earned may be handed out.
    pub async fn settled(self) -> Result<(), OAuthError> {
        match self.0 {
            Some(staged) => staged.committed().await.map_err(storage_failed),
            None => Ok(()),
        }
    }
}

/// How the authorization endpoint refuses a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizeError {
    /// The client or redirect URI cannot be trusted: show a page, never redirect
    /// (RFC 6749 §4.1.2.1).
    Page(String),
    /// Tell the client, at its redirect URI, with `error` and `state`.
    Redirect(String),
}

/// Launch context resolved from an EHR launch or chosen by the user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encounter: Option<String>,
    /// The purpose of use asked for (`purpose_of_use`); treatment when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Why the glass is broken, for a break-the-glass request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub break_glass_reason: Option<String>,
}

/// An authorization request between the authorize endpoint and the code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub id: String,
    pub client_id: String,
    pub client_name: String,
    pub redirect_uri: String,
    pub state: String,
    pub code_challenge: String,
    /// Requested, within what the client is registered for.
    pub scopes: ScopeSet,
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(default)]
    pub context: LaunchContext,
    /// Set once someone signed in: their username and the hash of their session.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub session: Option<String>,
    /// Whether it came from an EHR launch (the user signed in at the launcher).
    #[serde(default)]
    pub ehr_launch: bool,
    /// The hash of a secret the browser that made the request holds in a
    /// cookie: only that browser can sign in to it and answer it.
    #[serde(default)]
    pub browser: Option<String>,
}

impl Pending {
    /// Whether the user must pick a patient before consenting.
    pub fn needs_patient(&self) -> bool {
        self.context.patient.is_none()
            && (self.scopes.has(&Scope::LaunchPatient) || self.scopes.patient_scoped())
    }
}

fn error_redirect(redirect_uri: &str, error: &str, description: &str, state: &str) -> String {
    let mut url = redirect_uri.to_string();
    url.push(if url.contains('?') { '&' } else { '?' });
    let query: String = form_encode(&[
        ("error", error),
        ("error_description", description),
        ("state", state),
    ]);
    url.push_str(&query);
    url
}

/// The purpose of use a request asks for (`purpose_of_use`, treatment when
/// absent), which must be one the client is registered for, and for break the
/// glass the reason (`btg_reason`) it requires. Errors are an OAuth error code
/// and a description.
fn requested_purpose(
    params: &HashMap<String, String>,
    client: &ClientRecord,
) -> Result<(String, Option<String>), (&'static str, String)> {
    let purpose = param(params, "purpose_of_use").unwrap_or(TREATMENT);
    if purpose::display(purpose).is_none() {
        return Err((
            "invalid_request",
            format!("{purpose:?} is not a purpose of use this server knows"),
        ));
    }
    if !client.allows_purpose(purpose) {
        return Err((
            "invalid_scope",
            format!("this client is not registered for the purpose of use {purpose}"),
        ));
    }
    if purpose != BREAK_THE_GLASS {
        return Ok((purpose.to_owned(), None));
    }
    let reason = param(params, "btg_reason").unwrap_or_default().trim();
    if reason.is_empty() {
        return Err((
            "invalid_request",
            "breaking the glass requires a reason (btg_reason)".into(),
        ));
    }
    if reason.chars().count() > 500 || reason.chars().any(char::is_control) {
        return Err((
            "invalid_request",
            "btg_reason must be one line of at most 500 characters".into(),
        ));
    }
    Ok((purpose.to_owned(), Some(reason.to_owned())))
}

/// `application/x-www-form-urlencoded` of the pairs, skipping empty values.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if !v.is_empty() {
            out.append_pair(k, v);
        }
    }
    out.finish()
}

/// The refresh token to issue with an access token.
struct Refresh<'a> {
    /// What the refresh token may later ask for.
    scopes: &'a ScopeSet,
    /// Unix seconds; `None` starts a full lifetime.
    expires_at: Option<i64>,
    /// The sign-in session an `online_access` token is bound to.
    session: Option<String>,
}

/// Claims of Haven's access tokens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct AccessClaims {
    iss: String,
    sub: String,
    aud: String,
    exp: i64,
    iat: i64,
    jti: String,
    client_id: String,
    scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encounter: Option<String>,
    #[serde(default, rename = "fhirUser", skip_serializing_if = "Option::is_none")]
    fhir_user: Option<String>,
    /// The grant (authorization) the token came from; revoking it revokes the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grant: Option<String>,
    /// The signed-in user's role; absent for Backend Services tokens.
    #[serde(
        default,
        rename = "haven_role",
        skip_serializing_if = "Option::is_none"
    )]
    role: Option<Role>,
    /// The purpose of use (v3 PurposeOfUse).
    #[serde(
        default,
        rename = "haven_purpose",
        skip_serializing_if = "Option::is_none"
    )]
    purpose: Option<String>,
    /// The clearance (`N`, `R:ETH,PSY`, `V:*`).
    #[serde(
        default,
        rename = "haven_clearance",
        skip_serializing_if = "Option::is_none"
    )]
    clearance: Option<String>,
    #[serde(
        default,
        rename = "haven_btg_reason",
        skip_serializing_if = "Option::is_none"
    )]
    break_glass_reason: Option<String>,
    /// The user's organization, which Consents may name.
    #[serde(
        default,
        rename = "haven_organization",
        skip_serializing_if = "Option::is_none"
    )]
    organization: Option<String>,
}

/// Who an access token speaks for and what it allows.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessContext {
    pub subject: String,
    pub client_id: String,
    pub scopes: ScopeSet,
    /// The patient in context: `patient/` scopes are confined to this compartment.
    pub patient: Option<String>,
    pub encounter: Option<String>,
    pub fhir_user: Option<String>,
    /// The role of the user the token speaks for; `None` for a client's own token.
    pub role: Option<Role>,
    pub token_id: String,
    pub expires_at: OffsetDateTime,
    /// Why the holder asks (v3 PurposeOfUse code).
    pub purpose: String,
    /// The highest confidentiality and the sensitivity categories it may see.
    pub clearance: Clearance,
    /// Set for a break-the-glass token: the reason its user gave.
    pub break_glass_reason: Option<String>,
    /// The organization of the user it speaks for.
    pub organization: Option<String>,
}

/// Why a bearer token was refused. Clients only ever learn `invalid_token`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("the token is malformed or its signature does not verify")]
    Invalid,
    #[error("the token has expired")]
    Expired,
    #[error("the token is for another audience")]
    WrongAudience,
    #[error("the token was revoked")]
    Revoked,
    #[error("token storage is unavailable")]
    Unavailable,
}

/// A new client id. It never starts with `-`, which command lines (`haven load
/// --client-id <id>`) would take for an option.
fn new_client_id() -> String {
    loop {
        let id = random_token(16);
        if !id.starts_with('-') {
            return id;
        }
    }
}

/// A grant: what one authorization (or one client-credentials request) produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GrantRecord {
    client_id: String,
    revoked: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CodeRecord {
    client_id: String,
    redirect_uri: String,
    code_challenge: String,
    scopes: ScopeSet,
    username: String,
    context: LaunchContext,
    #[serde(default)]
    nonce: Option<String>,
    grant: String,
    used: bool,
    /// Unix seconds; the code works for one code lifetime from here.
    issued_at: i64,
    /// The hash of the sign-in session that approved it.
    #[serde(default)]
    session: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RefreshRecord {
    client_id: String,
    scopes: ScopeSet,
    username: String,
    context: LaunchContext,
    grant: String,
    used: bool,
    /// Unix seconds.
    expires_at: i64,
    /// For `online_access`: the sign-in session it lives no longer than.
    #[serde(default)]
    session: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SessionRecord {
    username: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LaunchRecord {
    client_id: String,
    username: String,
    context: LaunchContext,
}

/// What `haven clients add` and dynamic registration ask for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientSpec {
    pub name: String,
    pub redirect_uris: Vec<String>,
    pub scopes: String,
    pub auth: Option<ClientAuth>,
    pub jwks: Option<Value>,
    pub jwks_uri: Option<String>,
    pub backend: bool,
    /// May introspect tokens of other clients (an API gateway, say).
    pub resource_server: bool,
    pub launch_uri: Option<String>,
    pub organization: Option<String>,
    pub contacts: Vec<String>,
    /// The most its tokens may see (administrators only).
    pub clearance: Option<Clearance>,
    /// The purposes of use it may ask for (administrators only); empty: treatment.
    pub purposes: Vec<String>,
}

/// The rule every password meets; tools check it before changing anything.
pub fn check_password(password: &str) -> Result<(), &'static str> {
    if password.chars().count() < 8 {
        return Err("passwords have at least 8 characters");
    }
    Ok(())
}

/// What an administrator sets about a user beyond their sign-in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserPolicy {
    /// `None`: their role's clearance.
    pub clearance: Option<Clearance>,
    pub break_glass: bool,
    pub organization: Option<String>,
}

/// Why a sign-in failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    /// Wrong username or password: the page does not say which.
    Invalid,
    /// Too many failures; try again after this many seconds.
    Throttled(u64),
    Unavailable,
}

/// The authorization server.
pub struct AuthServer {
    config: AuthConfig,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    /// Swapped whole when the keys on disk change (`haven keys rotate`), with
    /// the tokens they verified.
    keys: std::sync::RwLock<Arc<ActiveKeys>>,
    http: reqwest::Client,
    jwks_cache: Mutex<HashMap<String, (OffsetDateTime, Value)>>,
    /// Per-endpoint request rate limits, keyed by endpoint and caller address.
    pub rate: RateLimiter,
    login_throttle: LoginThrottle,
}

/// A key set and the access tokens it has verified: replaced together, so a
/// token remembered as verified is one the current keys accept.
struct ActiveKeys {
    set: KeySet,
    verified: VerifiedTokens<AccessClaims>,
}

impl ActiveKeys {
    fn new(set: KeySet) -> Arc<ActiveKeys> {
        Arc::new(ActiveKeys {
            set,
            verified: VerifiedTokens::new(),
        })
    }
}

impl std::ops::Deref for ActiveKeys {
    type Target = KeySet;

    fn deref(&self) -> &KeySet {
        &self.set
    }
}

impl std::fmt::Debug for AuthServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthServer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The largest JWKS document fetched from a client's JWKS URL.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// A JWKS URL keys may be fetched from: https, or plain http to this machine
/// only, and never with credentials in it.
pub fn is_safe_jwks_uri(uri: &str) -> bool {
    let Ok(url) = url::Url::parse(uri) else {
        return false;
    };
    if !url.username().is_empty() || url.password().is_some() {
        return false;
    }
    match (url.scheme(), url.host()) {
        ("https", Some(_)) => true,
        ("http", Some(url::Host::Domain(host))) => host == "localhost",
        ("http", Some(url::Host::Ipv4(ip))) => ip.is_loopback(),
        ("http", Some(url::Host::Ipv6(ip))) => ip.is_loopback(),
        _ => false,
    }
}

/// SMART's PKCE rule (RFC 7636 §4.2): S256 of the verifier, base64url without padding.
pub fn pkce_s256(verifier: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// RFC 7636 §4.1: 43 to 128 unreserved characters.
fn is_pkce_string(text: &str) -> bool {
    (43..=128).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

fn param<'a>(params: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    params.get(name).map(String::as_str)
}

impl AuthServer {
    pub fn new(
        config: AuthConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        keys: KeySet,
    ) -> AuthServer {
        AuthServer {
            rate: RateLimiter::new(clock.clone()),
            login_throttle: LoginThrottle::new(clock.clone()),
            config,
            store,
            clock,
            keys: std::sync::RwLock::new(ActiveKeys::new(keys)),
            // Keys are fetched from exactly the registered URL: no redirects.
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            jwks_cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// The keys tokens are signed and checked with now.
    fn key_set(&self) -> Arc<ActiveKeys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Starts signing with `keys` (after a rotation); tokens signed by keys it
    /// still lists as retired keep working, and each is verified again once.
    /// The same keys read again change nothing, so the tokens verified with
    /// them need no second check.
    pub fn replace_keys(&self, keys: KeySet) {
        let mut active = self.keys.write().unwrap_or_else(|p| p.into_inner());
        if !active.same_keys(&keys) {
            *active = ActiveKeys::new(keys);
        }
    }

    /// The id of the current RSA key (ID tokens), which names the key set and
    /// changes with each rotation.
    pub fn signing_kid(&self) -> String {
        self.key_set().kid().to_string()
    }

    /// The id of the key new access tokens are signed with.
    pub fn access_kid(&self) -> String {
        self.key_set().access_kid().to_string()
    }

    fn records(&self) -> &dyn AuthRecords {
        self.store.auth_records()
    }

    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    // ----- Discovery -------------------------------------------------------

    /// `/.well-known/smart-configuration` (SMART App Launch 2.2 §conformance).
    pub fn smart_configuration(&self) -> Value {
        let c = &self.config;
        json!({
            "issuer": c.fhir_base,
            "jwks_uri": c.endpoint("jwks"),
            "authorization_endpoint": c.endpoint("authorize"),
            "token_endpoint": c.token_endpoint(),
            "introspection_endpoint": c.endpoint("introspect"),
            "revocation_endpoint": c.endpoint("revoke"),
            "registration_endpoint": c.endpoint("register"),
            "management_endpoint": c.endpoint("launcher"),
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported":
                ["none", "client_secret_basic", "client_secret_post", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "scopes_supported": [
                "openid", "fhirUser", "profile", "launch", "launch/patient", "launch/encounter",
                "offline_access", "online_access",
                "patient/*.cruds", "user/*.cruds", "system/*.cruds",
                "patient/*.rs", "user/*.rs", "system/*.rs",
                "patient/*.read", "user/*.read", "system/*.read",
                "patient/*.write", "user/*.write", "system/*.write",
                "patient/*.*", "user/*.*", "system/*.*"
            ],
            "code_challenge_methods_supported": ["S256"],
            "capabilities": [
                "launch-standalone", "launch-ehr", "authorize-post",
                "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
                "sso-openid-connect",
                "context-standalone-patient", "context-ehr-patient", "context-ehr-encounter",
                "permission-offline", "permission-online", "permission-patient", "permission-user",
                "permission-v1", "permission-v2"
            ]
        })
    }

    /// OpenID Connect Discovery 1.0 §3, for the same issuer.
    pub fn openid_configuration(&self) -> Value {
        let c = &self.config;
        json!({
            "issuer": c.fhir_base,
            "authorization_endpoint": c.endpoint("authorize"),
            "token_endpoint": c.token_endpoint(),
            "jwks_uri": c.endpoint("jwks"),
            "registration_endpoint": c.endpoint("register"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "fhirUser", "profile"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nonce", "fhirUser", "name", "preferred_username"],
            "token_endpoint_auth_methods_supported":
                ["none", "client_secret_basic", "client_secret_post", "private_key_jwt"],
            "code_challenge_methods_supported": ["S256"],
        })
    }

    pub fn jwks(&self) -> Value {
        self.key_set().jwks()
    }

    // ----- Registration and administration ------------------------------------

    pub async fn client(&self, client_id: &str) -> Result<Option<ClientRecord>, OAuthError> {
        let value = self
            .records()
            .get(kind::CLIENT, client_id)
            .await
            .map_err(storage_failed)?;
        Ok(value.and_then(|v| serde_json::from_value(v).ok()))
    }

    pub async fn clients(&self) -> Result<Vec<ClientRecord>, OAuthError> {
        let rows = self
            .records()
            .list(kind::CLIENT)
            .await
            .map_err(storage_failed)?;
        Ok(rows
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_value(v).ok())
            .collect())
    }

    /// Registers a client; returns it and, for secret clients, the secret (shown
    /// once, stored only as a hash).
    pub async fn add_client(
        &self,
        spec: ClientSpec,
    ) -> Result<(ClientRecord, Option<String>), OAuthError> {
        let invalid = |d: &str| OAuthError::new(400, "invalid_client_metadata", d);
        if spec.name.trim().is_empty() {
            return Err(invalid("a client needs a name"));
        }
        let auth = spec
            .auth
            .unwrap_or(if spec.jwks.is_some() || spec.jwks_uri.is_some() {
                ClientAuth::PrivateKeyJwt
            } else if spec.backend {
                return Err(invalid(
                    "a Backend Services client needs a JWKS or a JWKS URL",
                ));
            } else {
                ClientAuth::None
            });
        if auth == ClientAuth::PrivateKeyJwt {
            match (&spec.jwks, &spec.jwks_uri) {
                (Some(jwks), None) => {
                    if jwks["keys"].as_array().is_none_or(|k| k.is_empty()) {
                        return Err(invalid("the JWKS has no keys"));
                    }
                }
                (None, Some(uri)) => {
                    if !is_safe_jwks_uri(uri) {
                        return Err(invalid(
                            "the JWKS URL must be https (plain http only on loopback), without credentials",
                        ));
                    }
                }
                _ => {
                    return Err(invalid(
                        "private_key_jwt needs exactly one of a JWKS and a JWKS URL",
                    ))
                }
            }
        }
        if spec.backend {
            if auth == ClientAuth::None {
                return Err(invalid("a Backend Services client must authenticate"));
            }
            if spec
                .organization
                .as_deref()
                .is_none_or(|o| o.trim().is_empty())
                || spec.contacts.is_empty()
            {
                return Err(invalid(
                    "a Backend Services client must name its requesting organization and a contact",
                ));
            }
        } else {
            if spec.redirect_uris.is_empty() {
                return Err(OAuthError::new(
                    400,
                    "invalid_redirect_uri",
                    "at least one redirect URI is required",
                ));
            }
            for uri in &spec.redirect_uris {
                let parsed = url::Url::parse(uri).map_err(|_| {
                    OAuthError::new(
                        400,
                        "invalid_redirect_uri",
                        format!("not an absolute URL: {uri}"),
                    )
                })?;
                if parsed.fragment().is_some() {
                    return Err(OAuthError::new(
                        400,
                        "invalid_redirect_uri",
                        "redirect URIs carry no fragment",
                    ));
                }
                let loopback =
                    matches!(parsed.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
                if parsed.scheme() == "http" && !loopback {
                    return Err(OAuthError::new(
                        400,
                        "invalid_redirect_uri",
                        "redirect URIs use https, except on loopback",
                    ));
                }
            }
        }
        let scopes = ScopeSet::parse(&spec.scopes);
        if scopes.is_empty() {
            return Err(OAuthError::new(
                400,
                "invalid_scope",
                "the client needs at least one known scope",
            ));
        }
        if spec.backend
            && scopes
                .resource_scopes()
                .any(|s| s.context != Context::System)
        {
            return Err(OAuthError::new(
                400,
                "invalid_scope",
                "Backend Services clients get system/ scopes only",
            ));
        }
        let secret = auth.uses_secret().then(|| random_token(32));
        let record = ClientRecord {
            client_id: new_client_id(),
            name: spec.name.trim().to_string(),
            redirect_uris: spec.redirect_uris,
            scopes,
            auth,
            secret_hash: secret.as_deref().map(hash_secret),
            jwks: spec.jwks,
            jwks_uri: spec.jwks_uri,
            backend: spec.backend,
            resource_server: spec.resource_server,
            launch_uri: spec.launch_uri,
            organization: spec.organization,
            contacts: spec.contacts,
            registered_at: self.now().unix_timestamp(),
            clearance: spec.clearance,
            purposes: spec.purposes,
        };
        let value = serde_json::to_value(&record).map_err(|_| OAuthError::server_error())?;
        self.records()
            .put(kind::CLIENT, &record.client_id, &value, None)
            .await
            .map_err(storage_failed)?;
        Ok((record, secret))
    }

    /// A one-time token an administrator hands to someone who may register a client.
    pub async fn issue_registration_token(&self, lifetime: Duration) -> Result<String, OAuthError> {
        let token = random_token(32);
        self.records()
            .put(
                kind::REGISTRATION_TOKEN,
                &token_hash(&token),
                &json!({
                    "issued": self.now().unix_timestamp(),
                    "expires": (self.now() + lifetime).unix_timestamp(),
                }),
                Some(self.now() + lifetime),
            )
            .await
            .map_err(storage_failed)?;
        Ok(token)
    }

    /// RFC 7591 dynamic registration, with an initial access token (§3).
    pub async fn register(
        &self,
        initial_access_token: Option<&str>,
        metadata: &Value,
    ) -> Result<Value, OAuthError> {
        let Some(token) = initial_access_token else {
            return Err(OAuthError::new(
                401,
                "invalid_token",
                "an initial access token is required",
            ));
        };
        let records = self.records();
        let key = token_hash(token);
        let invalid_token = || {
            OAuthError::new(
                401,
                "invalid_token",
                "the initial access token is not valid",
            )
        };
        let Some(stored) = records
            .get(kind::REGISTRATION_TOKEN, &key)
            .await
            .map_err(storage_failed)?
        else {
            return Err(invalid_token());
        };
        let invalid = |d: &str| OAuthError::new(400, "invalid_client_metadata", d);
        let Some(meta) = metadata.as_object() else {
            return Err(invalid("the body must be a JSON object"));
        };
        let strings = |name: &str| -> Result<Vec<String>, OAuthError> {
            match meta.get(name) {
                None => Ok(Vec::new()),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|i| {
                        i.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| invalid(&format!("{name} must be strings")))
                    })
                    .collect(),
                Some(_) => Err(invalid(&format!("{name} must be an array"))),
            }
        };
        let text = |name: &str| meta.get(name).and_then(Value::as_str).map(str::to_owned);
        let grant_types = strings("grant_types")?;
        let backend = grant_types.iter().any(|g| g == "client_credentials");
        if backend && grant_types.iter().any(|g| g != "client_credentials") {
            return Err(invalid(
                "client_credentials cannot be combined with other grant types",
            ));
        }
        let auth = match text("token_endpoint_auth_method") {
            Some(method) => Some(
                ClientAuth::parse(&method)
                    .ok_or_else(|| invalid("unsupported token_endpoint_auth_method"))?,
            ),
            None => None,
        };
        let spec = ClientSpec {
            name: text("client_name").unwrap_or_default(),
            redirect_uris: strings("redirect_uris")?,
            scopes: text("scope").unwrap_or_default(),
            auth,
            jwks: meta.get("jwks").cloned(),
            jwks_uri: text("jwks_uri"),
            backend,
            // Only an administrator makes a resource server.
            resource_server: false,
            launch_uri: text("initiate_login_uri").or_else(|| text("launch_uri")),
            organization: text("organization_name"),
            contacts: strings("contacts")?,
            // Clearance and purposes beyond treatment are an administrator's to give.
            clearance: None,
            purposes: Vec::new(),
        };
        // Deleting claims the token: of two registrations racing, one wins.
        if !records
            .delete(kind::REGISTRATION_TOKEN, &key)
            .await
            .map_err(storage_failed)?
        {
            return Err(invalid_token());
        }
        let (record, secret) = match self.add_client(spec).await {
            Ok(added) => added,
            Err(refusal) => {
                // A refused registration gives the token back for a corrected one.
                let expires = stored["expires"]
                    .as_i64()
                    .and_then(|e| OffsetDateTime::from_unix_timestamp(e).ok());
                let _ = records
                    .put(kind::REGISTRATION_TOKEN, &key, &stored, expires)
                    .await;
                return Err(refusal);
            }
        };
        let mut response = json!({
            "client_id": record.client_id,
            "client_id_issued_at": record.registered_at,
            "client_name": record.name,
            "redirect_uris": record.redirect_uris,
            "grant_types": if record.backend { json!(["client_credentials"]) } else { json!(["authorization_code", "refresh_token"]) },
            "token_endpoint_auth_method": record.auth.as_str(),
            "scope": record.scopes.to_string(),
        });
        if let Some(secret) = secret {
            response["client_secret"] = json!(secret);
            response["client_secret_expires_at"] = json!(0);
        }
        for (name, value) in [
            ("jwks", record.jwks.clone()),
            ("jwks_uri", record.jwks_uri.clone().map(Value::from)),
            (
                "organization_name",
                record.organization.clone().map(Value::from),
            ),
        ] {
            if let Some(value) = value {
                response[name] = value;
            }
        }
        if !record.contacts.is_empty() {
            response["contacts"] = json!(record.contacts);
        }
        Ok(response)
    }

    /// Sets a user's clearance, break-the-glass permission and organization.
    pub async fn set_user_policy(
        &self,
        username: &str,
        policy: UserPolicy,
    ) -> Result<UserRecord, OAuthError> {
        let invalid = |d: &str| OAuthError::new(400, "invalid_request", d);
        if let Some(org) = &policy.organization {
            let valid = org
                .strip_prefix("Organization/")
                .is_some_and(haven_model::id::is_valid_id);
            if !valid {
                return Err(invalid("an organization is a reference Organization/<id>"));
            }
        }
        let Some(mut user) = self.user(username).await else {
            return Err(OAuthError::new(404, "invalid_request", "no such user"));
        };
        user.clearance = policy.clearance;
        user.break_glass = policy.break_glass;
        user.organization = policy.organization;
        let value = serde_json::to_value(&user).map_err(|_| OAuthError::server_error())?;
        self.records()
            .put(kind::USER, username, &value, None)
            .await
            .map_err(storage_failed)?;
        Ok(user)
    }

    pub async fn add_user(
        &self,
        username: &str,
        password: &str,
        role: Role,
        fhir_user: Option<String>,
        display_name: Option<String>,
    ) -> Result<UserRecord, OAuthError> {
        let invalid = |d: &str| OAuthError::new(400, "invalid_request", d);
        if username.is_empty()
            || username.len() > 64
            || !username
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
        {
            return Err(invalid(
                "usernames are 1 to 64 letters, digits, '.', '_', '-' or '@'",
            ));
        }
        if let Err(reason) = check_password(password) {
            return Err(invalid(reason));
        }
        if let Some(reference) = &fhir_user {
            let (ty, id) = reference.split_once('/').unwrap_or_default();
            let allowed = [
                "Patient",
                "Practitioner",
                "PractitionerRole",
                "RelatedPerson",
                "Person",
            ];
            if !allowed.contains(&ty) || !haven_model::id::is_valid_id(id) {
                return Err(invalid(
                    "fhirUser is a reference such as Patient/123 or Practitioner/9",
                ));
            }
        }
        if role == Role::Patient
            && !fhir_user
                .as_deref()
                .is_some_and(|r| r.starts_with("Patient/"))
        {
            return Err(invalid("a patient user needs fhirUser Patient/<id>"));
        }
        let user = UserRecord {
            username: username.to_string(),
            password_hash: hash_secret(password),
            role,
            fhir_user,
            display_name,
            clearance: None,
            break_glass: false,
            organization: None,
        };
        let value = serde_json::to_value(&user).map_err(|_| OAuthError::server_error())?;
        let inserted = self
            .records()
            .insert(kind::USER, username, &value, None)
            .await
            .map_err(storage_failed)?;
        if !inserted {
            return Err(invalid("that username is taken"));
        }
        Ok(user)
    }

    pub async fn user(&self, username: &str) -> Option<UserRecord> {
        let value = self.records().get(kind::USER, username).await.ok()??;
        serde_json::from_value(value).ok()
    }

    // ----- Browser sign-in -------------------------------------------------------

    /// Checks a password; on success returns a new session cookie value.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        remote: &str,
    ) -> Result<(String, UserRecord), LoginError> {
        if let Some(wait) = self.login_throttle.blocked(username, remote) {
            return Err(LoginError::Throttled(wait));
        }
        let user = self.user(username).await;
        let hash = user
            .as_ref()
            .map_or(decoy_hash(), |u| u.password_hash.as_str());
        let ok = verify_secret(password, hash) && user.is_some();
        let Some(user) = user.filter(|_| ok) else {
            self.login_throttle.failed(username, remote);
            return Err(LoginError::Invalid);
        };
        self.login_throttle.succeeded(username, remote);
        let cookie = random_token(32);
        self.records()
            .put(
                kind::SESSION,
                &token_hash(&cookie),
                &json!(SessionRecord {
                    username: user.username.clone()
                }),
                Some(self.now() + self.config.session_lifetime),
            )
            .await
            .map_err(|_| LoginError::Unavailable)?;
        Ok((cookie, user))
    }

    /// The signed-in user of a session cookie.
    pub async fn session_user(&self, cookie: &str) -> Option<UserRecord> {
        let value = self
            .records()
            .get(kind::SESSION, &token_hash(cookie))
            .await
            .ok()??;
        let session: SessionRecord = serde_json::from_value(value).ok()?;
        self.user(&session.username).await
    }

    pub async fn logout(&self, cookie: &str) {
        let _ = self
            .records()
            .delete(kind::SESSION, &token_hash(cookie))
            .await;
    }

    // ----- Authorization endpoint ---------------------------------------------

    /// Validates an authorization request (RFC 6749 §4.1.1 with SMART's rules)
    /// and keeps it as a pending authorization.
    pub async fn begin_authorization(
        &self,
        params: &HashMap<String, String>,
    ) -> Result<Pending, AuthorizeError> {
        let client_id = param(params, "client_id").unwrap_or_default();
        let client = match self.client(client_id).await {
            Ok(Some(client)) if !client.backend => client,
            Ok(_) => {
                return Err(AuthorizeError::Page(
                    "This application is not registered here.".into(),
                ))
            }
            Err(_) => {
                return Err(AuthorizeError::Page(
                    "The server could not check this application.".into(),
                ))
            }
        };
        let redirect_uri = param(params, "redirect_uri").unwrap_or_default();
        if !client.redirect_uris.iter().any(|u| u == redirect_uri) {
            return Err(AuthorizeError::Page(
                "The redirect address does not match what this application registered.".into(),
            ));
        }
        let state = param(params, "state").unwrap_or_default();
        let fail = |error: &str, description: &str| {
            AuthorizeError::Redirect(error_redirect(redirect_uri, error, description, state))
        };
        if param(params, "response_type") != Some("code") {
            return Err(fail(
                "unsupported_response_type",
                "response_type must be code",
            ));
        }
        if state.is_empty() {
            return Err(fail("invalid_request", "state is required"));
        }
        let aud = param(params, "aud").unwrap_or_default();
        if aud.trim_end_matches('/') != self.config.fhir_base {
            return Err(fail(
                "invalid_request",
                "aud must be this server's FHIR base URL",
            ));
        }
        let challenge = param(params, "code_challenge").unwrap_or_default();
        if challenge.trim().is_empty() {
            return Err(fail(
                "invalid_request",
                "PKCE is required: code_challenge is missing",
            ));
        }
        if param(params, "code_challenge_method") != Some("S256") {
            return Err(fail(
                "invalid_request",
                "code_challenge_method must be S256",
            ));
        }
        if !is_pkce_string(challenge) || challenge.len() != 43 {
            return Err(fail(
                "invalid_request",
                "code_challenge is not an S256 challenge",
            ));
        }
        let requested = ScopeSet::parse(param(params, "scope").unwrap_or_default());
        let mut scopes = scope::narrow(&requested, &client.scopes);
        // Apps act for a user here: no system/ scopes through a browser.
        scopes = scopes
            .iter()
            .filter(|s| s.as_resource().is_none_or(|r| r.context != Context::System))
            .cloned()
            .collect();
        if scopes.is_empty() {
            return Err(fail(
                "invalid_scope",
                "none of the requested scopes can be granted",
            ));
        }
        let mut pending = Pending {
            id: random_token(24),
            client_id: client.client_id.clone(),
            client_name: client.name.clone(),
            redirect_uri: redirect_uri.to_string(),
            state: state.to_string(),
            code_challenge: challenge.to_string(),
            scopes,
            nonce: param(params, "nonce").map(str::to_owned),
            context: LaunchContext::default(),
            username: None,
            session: None,
            ehr_launch: false,
            browser: None,
        };
        if let Some(launch) = param(params, "launch") {
            let record = self
                .records()
                .get(kind::LAUNCH, &token_hash(launch))
                .await
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_value::<LaunchRecord>(v).ok())
                .filter(|l| l.client_id == client.client_id);
            let Some(record) = record else {
                return Err(fail("invalid_request", "the launch is unknown or expired"));
            };
            pending.context = record.context;
            pending.username = Some(record.username);
            pending.ehr_launch = true;
        }
        let (purpose, reason) =
            requested_purpose(params, &client).map_err(|(error, text)| fail(error, &text))?;
        pending.context.purpose = Some(purpose);
        pending.context.break_glass_reason = reason;
        self.save_pending(&pending)
            .await
            .map_err(|_| AuthorizeError::Page("The server could not keep this request.".into()))?;
        Ok(pending)
    }

    async fn save_pending(&self, pending: &Pending) -> Result<(), OAuthError> {
        let value = serde_json::to_value(pending).map_err(|_| OAuthError::server_error())?;
        self.records()
            .put(
                kind::PENDING,
                &pending.id,
                &value,
                Some(self.now() + self.config.pending_lifetime),
            )
            .await
            .map_err(storage_failed)
    }

    pub async fn pending(&self, id: &str) -> Option<Pending> {
        let value = self.records().get(kind::PENDING, id).await.ok()??;
        serde_json::from_value(value).ok()
    }

    /// Binds a pending authorization to the user who signed in (with `session`,
    /// the hash of whose cookie must come back with every later step). Patient
    /// users get their own record as context, and their `user/` scopes become
    /// `patient/` scopes: they see nothing but their own data.
    pub async fn attach_user(
        &self,
        mut pending: Pending,
        user: &UserRecord,
        session_cookie: &str,
    ) -> Result<Pending, OAuthError> {
        if pending
            .username
            .as_deref()
            .is_some_and(|u| u != user.username)
        {
            return Err(OAuthError::new(
                403,
                "access_denied",
                "this launch belongs to another user",
            ));
        }
        if pending.context.purpose.as_deref() == Some(BREAK_THE_GLASS) && !user.break_glass {
            return Err(OAuthError::new(
                403,
                "access_denied",
                "this user may not break the glass",
            ));
        }
        pending.username = Some(user.username.clone());
        pending.session = Some(token_hash(session_cookie));
        if let Some(own) = user.own_patient() {
            pending.context.patient = Some(own.to_string());
            pending.scopes = pending
                .scopes
                .iter()
                .map(|s| match s {
                    Scope::Resource(r) if r.context == Context::User => {
                        let mut r = r.clone();
                        r.context = Context::Patient;
                        Scope::Resource(r)
                    }
                    other => other.clone(),
                })
                .collect();
        }
        self.save_pending(&pending).await?;
        Ok(pending)
    }

    /// Binds a pending request to the browser that made it; returns the secret
    /// that browser keeps in a cookie.
    pub async fn bind_browser(
        &self,
        mut pending: Pending,
    ) -> Result<(Pending, String), OAuthError> {
        let secret = random_token(24);
        pending.browser = Some(token_hash(&secret));
        self.save_pending(&pending).await?;
        Ok((pending, secret))
    }

    /// Whether a browser's secret (from its cookie) is the one the request was
    /// bound to; a request never bound accepts any browser.
    pub fn from_browser(&self, pending: &Pending, browser_secret: Option<&str>) -> bool {
        match &pending.browser {
            Some(hash) => browser_secret.is_some_and(|s| &token_hash(s) == hash),
            None => true,
        }
    }

    /// Whether this browser (by its session cookie) owns the pending request.
    pub fn owns(&self, pending: &Pending, session_cookie: &str) -> bool {
        pending.session.as_deref() == Some(token_hash(session_cookie).as_str())
    }

    pub async fn choose_patient(
        &self,
        mut pending: Pending,
        patient_id: &str,
    ) -> Result<Pending, OAuthError> {
        if !haven_model::id::is_valid_id(patient_id) {
            return Err(OAuthError::invalid_request("not a patient id"));
        }
        pending.context.patient = Some(patient_id.to_string());
        self.save_pending(&pending).await?;
        Ok(pending)
    }

    /// The user refused: back to the client with `access_denied`.
    pub async fn deny(&self, pending: &Pending) -> String {
        let _ = self.records().delete(kind::PENDING, &pending.id).await;
        error_redirect(
            &pending.redirect_uri,
            "access_denied",
            "the user did not approve",
            &pending.state,
        )
    }

    /// The user approved `approved` (a subset of what was asked): issue the code
    /// and return the redirect to the client.
    pub async fn approve(
        &self,
        pending: &Pending,
        approved: &ScopeSet,
    ) -> Result<String, OAuthError> {
        let Some(username) = pending.username.clone() else {
            return Err(OAuthError::invalid_request("nobody signed in"));
        };
        if pending.needs_patient() {
            return Err(OAuthError::invalid_request("no patient was chosen"));
        }
        // Pending requests are single-use.
        if !self
            .records()
            .delete(kind::PENDING, &pending.id)
            .await
            .map_err(storage_failed)?
        {
            return Err(OAuthError::invalid_request(
                "this request was already answered",
            ));
        }
        let granted = scope::narrow(&pending.scopes, approved);
        if granted.is_empty() {
            return Ok(error_redirect(
                &pending.redirect_uri,
                "access_denied",
                "no scopes were approved",
                &pending.state,
            ));
        }
        let grant = self.new_grant(&pending.client_id).await?;
        let code = random_token(32);
        let record = CodeRecord {
            client_id: pending.client_id.clone(),
            redirect_uri: pending.redirect_uri.clone(),
            code_challenge: pending.code_challenge.clone(),
            scopes: granted,
            username,
            context: pending.context.clone(),
            nonce: pending.nonce.clone(),
            grant,
            used: false,
            issued_at: self.now().unix_timestamp(),
            session: pending.session.clone(),
        };
        let value = serde_json::to_value(&record).map_err(|_| OAuthError::server_error())?;
        // The record outlives the code a little, so a late replay is still recognised.
        self.records()
            .put(
                kind::CODE,
                &token_hash(&code),
                &value,
                Some(self.now() + self.config.code_lifetime * 10),
            )
            .await
            .map_err(storage_failed)?;
        let mut url = pending.redirect_uri.clone();
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&form_encode(&[("code", &code), ("state", &pending.state)]));
        Ok(url)
    }

    async fn new_grant(&self, client_id: &str) -> Result<String, OAuthError> {
        let id = random_token(16);
        let value = json!(GrantRecord {
            client_id: client_id.to_string(),
            revoked: false
        });
        self.records()
            .put(kind::GRANT, &id, &value, None)
            .await
            .map_err(storage_failed)?;
        Ok(id)
    }

    async fn revoke_grant(&self, grant: &str) {
        if let Ok(Some(value)) = self.records().get(kind::GRANT, grant).await {
            if let Ok(mut record) = serde_json::from_value::<GrantRecord>(value) {
                record.revoked = true;
                let _ = self
                    .records()
                    .put(kind::GRANT, grant, &json!(record), None)
                    .await;
                tracing::warn!(
                    grant,
                    "a grant was revoked after a replayed code or refresh token"
                );
            }
        }
    }

    async fn grant_revoked(&self, grant: &str) -> Result<bool, TokenRejection> {
        match self.records().get(kind::GRANT, grant).await {
            Ok(record) => Ok(grant_record_revoked(record)),
            Err(_) => Err(TokenRejection::Unavailable),
        }
    }

    /// An EHR launch: a signed-in practitioner opens `client_id` for a patient.
    /// Returns the URL of the app's launch page with `iss` and `launch`.
    pub async fn create_launch(
        &self,
        user: &UserRecord,
        client_id: &str,
        context: LaunchContext,
    ) -> Result<String, OAuthError> {
        if user.role == Role::Patient {
            return Err(OAuthError::new(
                403,
                "access_denied",
                "only practitioners use the launcher",
            ));
        }
        let Some(client) = self.client(client_id).await? else {
            return Err(OAuthError::invalid_request("unknown application"));
        };
        let Some(launch_uri) = client.launch_uri.clone() else {
            return Err(OAuthError::invalid_request(
                "this application has no launch URL",
            ));
        };
        let launch = random_token(24);
        let record = LaunchRecord {
            client_id: client.client_id,
            username: user.username.clone(),
            context,
        };
        self.records()
            .put(
                kind::LAUNCH,
                &token_hash(&launch),
                &json!(record),
                Some(self.now() + self.config.launch_lifetime),
            )
            .await
            .map_err(storage_failed)?;
        let mut url = launch_uri;
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&form_encode(&[
            ("iss", &self.config.fhir_base),
            ("launch", &launch),
        ]));
        Ok(url)
    }

    // ----- Token endpoint ----------------------------------------------------------

    /// Authenticates the client calling the token, introspection or revocation
    /// endpoint, by whichever single method it used.
    pub async fn authenticate_client(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<ClientRecord, OAuthError> {
        let (client, pending) = self.authenticate_client_pending(form, basic).await?;
        pending.settled().await?;
        Ok(client)
    }

    /// As [`AuthServer::authenticate_client`], with the record of an
    /// assertion's use still to be waited for.
    async fn authenticate_client_pending(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<(ClientRecord, PendingRecord), OAuthError> {
        let form_id = param(form, "client_id");
        if let Some(assertion) = param(form, "client_assertion") {
            if param(form, "client_assertion_type") != Some(JWT_BEARER_ASSERTION_TYPE) {
                return Err(OAuthError::invalid_client());
            }
            let (client, pending) = self.verify_assertion(assertion).await?;
            if form_id.is_some_and(|id| id != client.client_id) {
                pending.settled().await?;
                return Err(OAuthError::invalid_client());
            }
            return Ok((client, pending));
        }
        if param(form, "client_assertion_type").is_some() {
            return Err(OAuthError::invalid_client());
        }
        let (id, secret) = match (basic, param(form, "client_secret")) {
            (Some(_), Some(_)) => return Err(OAuthError::invalid_client()),
            (Some((id, secret)), None) => (id, Some(secret)),
            (None, Some(secret)) => (
                form_id.unwrap_or_default().to_string(),
                Some(secret.to_string()),
            ),
            (None, None) => (form_id.unwrap_or_default().to_string(), None),
        };
        let client = self.client(&id).await?;
        match (client, secret) {
            (Some(client), Some(secret)) if client.auth.uses_secret() => {
                let hash = client.secret_hash.as_deref().unwrap_or(decoy_hash());
                if verify_secret(&secret, hash) {
                    Ok((client, PendingRecord::default()))
                } else {
                    Err(OAuthError::invalid_client())
                }
            }
            (Some(client), None) if client.auth == ClientAuth::None => {
                Ok((client, PendingRecord::default()))
            }
            (None, Some(secret)) => {
                // Same cost as a wrong secret, so unknown ids are not revealed by timing.
                let _ = verify_secret(&secret, decoy_hash());
                Err(OAuthError::invalid_client())
            }
            _ => Err(OAuthError::invalid_client()),
        }
    }

    /// SMART asymmetric client authentication (RFC 7523 §3 with SMART's rules):
    /// RS384 or ES384 only, the key by `kid` from the client's JWKS, `iss` =
    /// `sub` = client id, `aud` = the token URL, `exp` at most five minutes ahead,
    /// and each `jti` used once. The `jti`'s record is answered before it is
    /// committed: the caller waits for that before handing anything out.
    async fn verify_assertion(
        &self,
        assertion: &str,
    ) -> Result<(ClientRecord, PendingRecord), OAuthError> {
        let header =
            jsonwebtoken::decode_header(assertion).map_err(|_| OAuthError::invalid_client())?;
        if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
            return Err(OAuthError::invalid_client());
        }
        let claims = unverified_claims(assertion).ok_or_else(OAuthError::invalid_client)?;
        let Some(client_id) = claims["iss"].as_str() else {
            return Err(OAuthError::invalid_client());
        };
        let Some(client) = self.client(client_id).await? else {
            return Err(OAuthError::invalid_client());
        };
        if client.auth != ClientAuth::PrivateKeyJwt {
            return Err(OAuthError::invalid_client());
        }
        let Some(kid) = header.kid.as_deref() else {
            return Err(OAuthError::invalid_client());
        };
        let jwk = self.client_key(&client, kid).await?;
        let key_fits = match header.alg {
            Algorithm::RS384 => jwk["kty"] == "RSA",
            _ => jwk["kty"] == "EC" && jwk["crv"] == "P-384",
        };
        if !key_fits {
            return Err(OAuthError::invalid_client());
        }
        let jwk: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(jwk).map_err(|_| OAuthError::invalid_client())?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| OAuthError::invalid_client())?;
        let mut validation = Validation::new(header.alg);
        // Times are checked against Haven's clock below.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        validation.set_audience(&[self.config.token_endpoint()]);
        validation.set_issuer(&[client_id]);
        validation.sub = Some(client_id.to_string());
        let data = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
            .map_err(|_| OAuthError::invalid_client())?;
        let now = self.now().unix_timestamp();
        let exp = data.claims["exp"]
            .as_i64()
            .ok_or_else(OAuthError::invalid_client)?;
        // A little skew is forgiven either way; more than five minutes ahead is not.
        if exp <= now - 30 || exp > now + 300 + 30 {
            return Err(OAuthError::invalid_client());
        }
        let Some(jti) = data.claims["jti"]
            .as_str()
            .filter(|j| !j.is_empty() && j.len() <= 256)
        else {
            return Err(OAuthError::invalid_client());
        };
        let used = self
            .records()
            .insert_staged(
                kind::ASSERTION,
                &format!("{client_id}:{}", token_hash(jti)),
                &json!({}),
                OffsetDateTime::from_unix_timestamp(exp + 60).ok(),
            )
            .await
            .map_err(storage_failed)?;
        // A live record with this key is a replay, committed or about to be.
        if !used.inserted {
            return Err(OAuthError::invalid_client());
        }
        Ok((client, PendingRecord(Some(used))))
    }

    /// The client's public key with this `kid`, from its JWKS or JWKS URL.
    async fn client_key(&self, client: &ClientRecord, kid: &str) -> Result<Value, OAuthError> {
        let find = |jwks: &Value| {
            jwks["keys"]
                .as_array()
                .and_then(|keys| keys.iter().find(|k| k["kid"] == kid).cloned())
        };
        if let Some(jwks) = &client.jwks {
            return find(jwks).ok_or_else(OAuthError::invalid_client);
        }
        let Some(uri) = &client.jwks_uri else {
            return Err(OAuthError::invalid_client());
        };
        let cached = {
            let cache = self.jwks_cache.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .get(uri)
                .filter(|(at, _)| *at + Duration::minutes(5) > self.now())
                .map(|(_, jwks)| jwks.clone())
        };
        if let Some(key) = cached.as_ref().and_then(find) {
            return Ok(key);
        }
        // Unknown kid or stale cache: fetch once (keys may have been rotated).
        let fetched: Value = match self.http.get(uri).send().await {
            Ok(response)
                if response.status().is_success()
                    && response
                        .content_length()
                        .is_none_or(|n| n <= MAX_JWKS_BYTES as u64) =>
            {
                let bytes = response
                    .bytes()
                    .await
                    .map_err(|_| OAuthError::invalid_client())?;
                if bytes.len() > MAX_JWKS_BYTES {
                    return Err(OAuthError::invalid_client());
                }
                serde_json::from_slice(&bytes).map_err(|_| OAuthError::invalid_client())?
            }
            _ => return Err(OAuthError::invalid_client()),
        };
        let key = find(&fetched);
        self.jwks_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uri.clone(), (self.now(), fetched));
        key.ok_or_else(OAuthError::invalid_client)
    }

    /// The token endpoint (RFC 6749 §3.2).
    pub async fn token(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<Value, OAuthError> {
        let (body, pending) = self.token_pending(form, basic).await?;
        pending.settled().await?;
        Ok(body)
    }

    /// As [`AuthServer::token`], but a `client_credentials` answer may come
    /// while the client assertion's record is still being committed: the
    /// token in it may be handed out only once [`PendingRecord::settled`]
    /// succeeds. A refusal of a request whose assertion was accepted comes
    /// only after that commit, as the assertion is used up either way.
    pub async fn token_pending(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<(Value, PendingRecord), OAuthError> {
        let grant_type = param(form, "grant_type").unwrap_or_default();
        if !matches!(
            grant_type,
            "authorization_code" | "refresh_token" | "client_credentials"
        ) {
            // Authenticate first anyway, so probing grant types needs a client.
            self.authenticate_client(form, basic).await?;
            return Err(OAuthError::new(
                400,
                "unsupported_grant_type",
                "unsupported grant_type",
            ));
        }
        let (client, mut pending) = self.authenticate_client_pending(form, basic).await?;
        if grant_type != "client_credentials" {
            // These grants use up a code or a refresh token: the assertion's
            // use is stored first, so that a failure leaves them usable.
            std::mem::take(&mut pending).settled().await?;
        }
        let granted = match grant_type {
            "authorization_code" => self.exchange_code(&client, form).await,
            "refresh_token" => self.refresh(&client, form).await,
            _ => self.client_credentials(&client, form).await,
        };
        match granted {
            Ok(body) => Ok((body, pending)),
            Err(refusal) => {
                pending.settled().await?;
                Err(refusal)
            }
        }
    }

    async fn exchange_code(
        &self,
        client: &ClientRecord,
        form: &HashMap<String, String>,
    ) -> Result<Value, OAuthError> {
        if client.backend {
            return Err(OAuthError::new(
                400,
                "unauthorized_client",
                "this client uses client_credentials",
            ));
        }
        let code = param(form, "code").unwrap_or_default();
        let key = token_hash(code);
        let Some(value) = self
            .records()
            .get(kind::CODE, &key)
            .await
            .map_err(storage_failed)?
        else {
            return Err(OAuthError::invalid_grant("the code is invalid or expired"));
        };
        let record: CodeRecord =
            serde_json::from_value(value.clone()).map_err(|_| OAuthError::server_error())?;
        // Another client holding the code can neither use it up nor revoke its grant.
        if record.client_id != client.client_id {
            return Err(OAuthError::invalid_grant("the code is invalid or expired"));
        }
        if record.used {
            // RFC 6749 §4.1.2: a code used twice revokes what it produced.
            self.revoke_grant(&record.grant).await;
            return Err(OAuthError::invalid_grant("the code was already used"));
        }
        let mut used = record.clone();
        used.used = true;
        let claimed = self
            .records()
            .replace(kind::CODE, &key, &value, &json!(used))
            .await
            .map_err(storage_failed)?;
        if !claimed {
            self.revoke_grant(&record.grant).await;
            return Err(OAuthError::invalid_grant("the code was already used"));
        }
        // The record is kept ten code lifetimes to spot replays; it is valid for one.
        if record.issued_at + self.config.code_lifetime.whole_seconds()
            < self.now().unix_timestamp()
        {
            return Err(OAuthError::invalid_grant("the code is invalid or expired"));
        }
        if param(form, "redirect_uri") != Some(record.redirect_uri.as_str()) {
            return Err(OAuthError::invalid_grant(
                "redirect_uri does not match the authorization request",
            ));
        }
        let verifier = param(form, "code_verifier").unwrap_or_default();
        if !is_pkce_string(verifier) || pkce_s256(verifier) != record.code_challenge {
            return Err(OAuthError::invalid_grant(
                "the PKCE code_verifier does not match",
            ));
        }
        let user = self
            .user(&record.username)
            .await
            .ok_or_else(|| OAuthError::invalid_grant("the user no longer exists"))?;
        self.issue(
            client,
            &user,
            &record.scopes,
            &record.context,
            &record.grant,
            record.nonce.as_deref(),
            Some(Refresh {
                scopes: &record.scopes,
                expires_at: None,
                session: record.session.clone(),
            }),
        )
        .await
    }

    /// A user's clearance through a client: the user's own, or their role's;
    /// a client with a clearance of its own caps it.
    fn clearance_of(&self, user: &UserRecord, client: &ClientRecord) -> Clearance {
        let roles = &self.config.clearances;
        let own = user.clearance.clone().unwrap_or_else(|| match user.role {
            Role::Patient => roles.patient.clone(),
            Role::Practitioner => roles.practitioner.clone(),
            Role::Admin => roles.admin.clone(),
        });
        match &client.clearance {
            Some(cap) => own.within(cap),
            None => own,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn issue(
        &self,
        client: &ClientRecord,
        user: &UserRecord,
        scopes: &ScopeSet,
        context: &LaunchContext,
        grant: &str,
        nonce: Option<&str>,
        refresh: Option<Refresh<'_>>,
    ) -> Result<Value, OAuthError> {
        let now = self.now();
        let purpose = context
            .purpose
            .clone()
            .unwrap_or_else(|| TREATMENT.to_owned());
        let break_glass = purpose == BREAK_THE_GLASS;
        if break_glass && (!user.break_glass || context.break_glass_reason.is_none()) {
            return Err(OAuthError::new(
                403,
                "access_denied",
                "this user may not break the glass",
            ));
        }
        // A broken glass overrides the clearance where the token is used;
        // the token still says what the user's own clearance is.
        let clearance = self.clearance_of(user, client);
        let lifetime = if break_glass {
            self.config
                .break_glass_lifetime
                .min(self.config.access_token_lifetime)
        } else {
            self.config.access_token_lifetime
        };
        // A broken glass is short-lived: it is never refreshed.
        let refresh = refresh.filter(|_| !break_glass);
        let patient = scopes
            .patient_scoped()
            .then(|| context.patient.clone())
            .flatten()
            .or_else(|| {
                scopes
                    .has(&Scope::LaunchPatient)
                    .then(|| context.patient.clone())
                    .flatten()
            });
        let claims = AccessClaims {
            iss: self.config.fhir_base.clone(),
            sub: user.username.clone(),
            aud: self.config.fhir_base.clone(),
            exp: (now + lifetime).unix_timestamp(),
            iat: now.unix_timestamp(),
            jti: random_token(16),
            client_id: client.client_id.clone(),
            scope: scopes.to_string(),
            patient: patient.clone(),
            encounter: context.encounter.clone(),
            fhir_user: user.fhir_user.clone(),
            grant: Some(grant.to_string()),
            role: Some(user.role),
            purpose: Some(purpose.clone()),
            clearance: Some(clearance.to_string()),
            break_glass_reason: context.break_glass_reason.clone().filter(|_| break_glass),
            organization: user.organization.clone(),
        };
        let access_token = self.key_set().sign_access_token(&claims).map_err(|e| {
            tracing::error!(error = %e, "signing an access token failed");
            OAuthError::server_error()
        })?;
        let mut response = json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": lifetime.whole_seconds(),
            "scope": scopes.to_string(),
        });
        response["purpose_of_use"] = json!(purpose);
        if let Some(patient) = &patient {
            response["patient"] = json!(patient);
            response["need_patient_banner"] = json!(true);
        }
        if let Some(encounter) = &context.encounter {
            response["encounter"] = json!(encounter);
            response["fhirContext"] = json!([{"reference": format!("Encounter/{encounter}")}]);
        }
        if scopes.contains_openid() {
            let mut id_claims = json!({
                "iss": self.config.fhir_base,
                "sub": user.username,
                "aud": client.client_id,
                "exp": (now + lifetime).unix_timestamp(),
                "iat": now.unix_timestamp(),
            });
            if let Some(nonce) = nonce {
                id_claims["nonce"] = json!(nonce);
            }
            if let Some(fhir_user) = &user.fhir_user {
                if scopes.has(&Scope::FhirUser) {
                    id_claims["fhirUser"] = json!(format!("{}/{fhir_user}", self.config.fhir_base));
                }
            }
            if scopes.has(&Scope::Profile) {
                id_claims["preferred_username"] = json!(user.username);
                if let Some(name) = &user.display_name {
                    id_claims["name"] = json!(name);
                }
            }
            response["id_token"] = json!(self
                .key_set()
                .sign_id_token(&id_claims)
                .map_err(|_| OAuthError::server_error())?);
        }
        let refresh = refresh
            .filter(|r| r.scopes.has(&Scope::OfflineAccess) || r.scopes.has(&Scope::OnlineAccess));
        if let Some(refresh) = refresh {
            let lifetime = if refresh.scopes.has(&Scope::OfflineAccess) {
                self.config.offline_refresh_lifetime
            } else {
                self.config.online_refresh_lifetime
            };
            let expires_at = refresh
                .expires_at
                .unwrap_or_else(|| (now + lifetime).unix_timestamp());
            let refresh_token = random_token(32);
            let record = RefreshRecord {
                client_id: client.client_id.clone(),
                scopes: refresh.scopes.clone(),
                username: user.username.clone(),
                context: context.clone(),
                grant: grant.to_string(),
                used: false,
                expires_at,
                session: refresh.session,
            };
            self.records()
                .put(
                    kind::REFRESH,
                    &token_hash(&refresh_token),
                    &json!(record),
                    OffsetDateTime::from_unix_timestamp(expires_at).ok(),
                )
                .await
                .map_err(storage_failed)?;
            response["refresh_token"] = json!(refresh_token);
        }
        Ok(response)
    }

    /// RFC 6749 §6 with rotation (RFC 9700 §4.14.2): each refresh token works
    /// once; presenting a used one revokes the whole grant.
    async fn refresh(
        &self,
        client: &ClientRecord,
        form: &HashMap<String, String>,
    ) -> Result<Value, OAuthError> {
        let token = param(form, "refresh_token").unwrap_or_default();
        let key = token_hash(token);
        let Some(value) = self
            .records()
            .get(kind::REFRESH, &key)
            .await
            .map_err(storage_failed)?
        else {
            return Err(OAuthError::invalid_grant(
                "the refresh token is invalid or expired",
            ));
        };
        let record: RefreshRecord =
            serde_json::from_value(value.clone()).map_err(|_| OAuthError::server_error())?;
        if record.client_id != client.client_id {
            return Err(OAuthError::invalid_grant(
                "the refresh token is invalid or expired",
            ));
        }
        if record.used {
            self.revoke_grant(&record.grant).await;
            return Err(OAuthError::invalid_grant(
                "the refresh token was already used",
            ));
        }
        if self.grant_revoked(&record.grant).await.unwrap_or(true) {
            return Err(OAuthError::invalid_grant("the grant was revoked"));
        }
        // SMART `online_access`: refreshing works only while the user stays signed in.
        if !record.scopes.has(&Scope::OfflineAccess) {
            let signed_in = match &record.session {
                Some(session) => self
                    .records()
                    .get(kind::SESSION, session)
                    .await
                    .map_err(storage_failed)?
                    .is_some(),
                None => false,
            };
            if !signed_in {
                return Err(OAuthError::invalid_grant("the user's sign-in has ended"));
            }
        }
        let scopes = match param(form, "scope") {
            Some(text) => {
                let asked = ScopeSet::parse(text);
                if asked.is_empty() || !scope::is_within(&asked, &record.scopes) {
                    return Err(OAuthError::new(
                        400,
                        "invalid_scope",
                        "a refresh can only narrow the scopes",
                    ));
                }
                asked
            }
            None => record.scopes.clone(),
        };
        let mut used = record.clone();
        used.used = true;
        if !self
            .records()
            .replace(kind::REFRESH, &key, &value, &json!(used))
            .await
            .map_err(storage_failed)?
        {
            self.revoke_grant(&record.grant).await;
            return Err(OAuthError::invalid_grant(
                "the refresh token was already used",
            ));
        }
        let user = self
            .user(&record.username)
            .await
            .ok_or_else(|| OAuthError::invalid_grant("the user no longer exists"))?;
        // RFC 6749 §6: the new refresh token keeps the old one's scopes, and the
        // grant keeps its original lifetime: rotation does not extend it.
        let mut response = self
            .issue(
                client,
                &user,
                &scopes,
                &record.context,
                &record.grant,
                None,
                Some(Refresh {
                    scopes: &record.scopes,
                    expires_at: Some(record.expires_at),
                    session: record.session.clone(),
                }),
            )
            .await?;
        response.as_object_mut().map(|m| m.remove("id_token"));
        Ok(response)
    }

    /// SMART Backend Services: `client_credentials` with `system/` scopes only,
    /// tokens of at most five minutes and never a refresh token.
    async fn client_credentials(
        &self,
        client: &ClientRecord,
        form: &HashMap<String, String>,
    ) -> Result<Value, OAuthError> {
        if !client.backend || client.auth != ClientAuth::PrivateKeyJwt {
            return Err(OAuthError::new(
                400,
                "unauthorized_client",
                "this client may not use client_credentials",
            ));
        }
        let requested = ScopeSet::parse(param(form, "scope").unwrap_or_default());
        let granted: ScopeSet = scope::narrow(&requested, &client.scopes)
            .iter()
            .filter(|s| {
                s.as_resource()
                    .is_some_and(|r| r.context == Context::System)
            })
            .cloned()
            .collect();
        if granted.is_empty() {
            return Err(OAuthError::new(
                400,
                "invalid_scope",
                "none of the requested scopes can be granted",
            ));
        }
        let (purpose, _) = requested_purpose(form, client)
            .map_err(|(error, text)| OAuthError::new(400, error, &text))?;
        if purpose == BREAK_THE_GLASS {
            return Err(OAuthError::new(
                400,
                "invalid_request",
                "only a signed-in user may break the glass",
            ));
        }
        let clearance = match &client.clearance {
            Some(own) => own.clone(),
            None => self.config.clearances.backend.clone(),
        };
        let now = self.now();
        let lifetime = self.config.backend_token_lifetime;
        let claims = AccessClaims {
            iss: self.config.fhir_base.clone(),
            sub: client.client_id.clone(),
            aud: self.config.fhir_base.clone(),
            exp: (now + lifetime).unix_timestamp(),
            iat: now.unix_timestamp(),
            jti: random_token(16),
            client_id: client.client_id.clone(),
            scope: granted.to_string(),
            patient: None,
            encounter: None,
            fhir_user: None,
            grant: None,
            role: None,
            purpose: Some(purpose.clone()),
            clearance: Some(clearance.to_string()),
            break_glass_reason: None,
            organization: client.organization.clone(),
        };
        let access_token = self
            .key_set()
            .sign_access_token(&claims)
            .map_err(|_| OAuthError::server_error())?;
        Ok(json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": lifetime.whole_seconds(),
            "scope": granted.to_string(),
            "purpose_of_use": purpose,
        }))
    }

    // ----- Using tokens ------------------------------------------------------------------

    /// Verifies a bearer token for the FHIR API: Haven's signature with the pinned
    /// algorithm, issuer, audience = this FHIR base, expiry by Haven's clock, and
    /// neither the token nor its grant revoked.
    pub async fn verify_access_token(&self, token: &str) -> Result<AccessContext, TokenRejection> {
        let claims = self.decode_access_token(token)?;
        let now = self.now().unix_timestamp();
        if claims.exp <= now {
            return Err(TokenRejection::Expired);
        }
        // The token's revocation and its grant's, read together: one query on
        // every request rather than two.
        let mut wanted = vec![(kind::REVOKED, claims.jti.as_str())];
        if let Some(grant) = &claims.grant {
            wanted.push((kind::GRANT, grant.as_str()));
        }
        let mut found = self
            .records()
            .get_each(&wanted)
            .await
            .map_err(|_| TokenRejection::Unavailable)?
            .into_iter();
        if found.next().flatten().is_some() {
            return Err(TokenRejection::Revoked);
        }
        if claims.grant.is_some() && grant_record_revoked(found.next().flatten()) {
            return Err(TokenRejection::Revoked);
        }
        Ok(AccessContext {
            subject: claims.sub,
            client_id: claims.client_id,
            scopes: ScopeSet::parse(&claims.scope),
            patient: claims.patient,
            encounter: claims.encounter,
            fhir_user: claims.fhir_user,
            role: claims.role,
            token_id: claims.jti,
            expires_at: OffsetDateTime::from_unix_timestamp(claims.exp)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            purpose: claims.purpose.unwrap_or_else(|| TREATMENT.to_owned()),
            // A token without a clearance (or with one this server cannot
            // read) sees normal data only.
            clearance: claims
                .clearance
                .as_deref()
                .and_then(|c| Clearance::parse(c).ok())
                .unwrap_or_default(),
            break_glass_reason: claims.break_glass_reason,
            organization: claims.organization,
        })
    }

    fn decode_access_token(&self, token: &str) -> Result<AccessClaims, TokenRejection> {
        let keys = self.key_set();
        if let Some(claims) = keys.verified.get(token) {
            return Ok(claims);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRejection::Invalid)?;
        // Only an access-token key verifies: an ID token (RS256) is refused here.
        if header.alg != ACCESS_TOKEN_ALGORITHM {
            return Err(TokenRejection::Invalid);
        }
        let kid = header.kid.as_deref().ok_or(TokenRejection::Invalid)?;
        let key = keys
            .decoding_key(kid, ACCESS_TOKEN_ALGORITHM)
            .ok_or(TokenRejection::Invalid)?;
        let mut validation = Validation::new(ACCESS_TOKEN_ALGORITHM);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[&self.config.fhir_base]);
        let data = jsonwebtoken::decode::<AccessClaims>(token, key, &validation)
            .map_err(|_| TokenRejection::Invalid)?;
        if data.claims.aud != self.config.fhir_base {
            return Err(TokenRejection::WrongAudience);
        }
        keys.verified.insert(token, &data.claims);
        Ok(data.claims)
    }

    /// RFC 7662: only for authenticated clients; inactive tokens say nothing more.
    pub async fn introspect(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<Value, OAuthError> {
        let client = self.authenticate_client(form, basic).await?;
        if client.auth == ClientAuth::None {
            return Err(OAuthError::invalid_client());
        }
        let token = param(form, "token").unwrap_or_default();
        // A client learns only about its own tokens, unless it is a resource server.
        let may_see = |owner: &str| client.resource_server || owner == client.client_id;
        if let Ok(access) = self
            .verify_access_token(token)
            .await
            .map_err(|_| ())
            .and_then(|a| {
                if may_see(&a.client_id) {
                    Ok(a)
                } else {
                    Err(())
                }
            })
        {
            let mut body = json!({
                "active": true,
                "token_type": "Bearer",
                "scope": access.scopes.to_string(),
                "client_id": access.client_id,
                "sub": access.subject,
                "exp": access.expires_at.unix_timestamp(),
                "iss": self.config.fhir_base,
                "aud": self.config.fhir_base,
                "purpose_of_use": access.purpose,
                "clearance": access.clearance.to_string(),
            });
            if let Some(reason) = &access.break_glass_reason {
                body["break_glass_reason"] = json!(reason);
            }
            if let Some(user) = &access.fhir_user {
                body["fhirUser"] = json!(format!("{}/{user}", self.config.fhir_base));
            }
            if let Some(patient) = &access.patient {
                body["patient"] = json!(patient);
            }
            return Ok(body);
        }
        if let Ok(Some(value)) = self.records().get(kind::REFRESH, &token_hash(token)).await {
            if let Ok(record) = serde_json::from_value::<RefreshRecord>(value) {
                if !record.used
                    && may_see(&record.client_id)
                    && !self.grant_revoked(&record.grant).await.unwrap_or(true)
                {
                    let mut body = json!({
                        "active": true,
                        "token_type": "refresh_token",
                        "scope": record.scopes.to_string(),
                        "client_id": record.client_id,
                        "sub": record.username,
                        "exp": record.expires_at,
                    });
                    if let Some(patient) = &record.context.patient {
                        body["patient"] = json!(patient);
                    }
                    return Ok(body);
                }
            }
        }
        Ok(json!({"active": false}))
    }

    /// RFC 7009: the token stops working at once. A client can revoke only its own
    /// tokens; an unknown or foreign token is answered the same as a revoked one.
    pub async fn revoke(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<(), OAuthError> {
        let client = self.authenticate_client(form, basic).await?;
        let token = param(form, "token").unwrap_or_default();
        if let Ok(claims) = self.decode_access_token(token) {
            if claims.client_id == client.client_id {
                let until = OffsetDateTime::from_unix_timestamp(claims.exp + 60).ok();
                self.records()
                    .put(kind::REVOKED, &claims.jti, &json!({}), until)
                    .await
                    .map_err(storage_failed)?;
            }
            return Ok(());
        }
        if let Ok(Some(value)) = self.records().get(kind::REFRESH, &token_hash(token)).await {
            if let Ok(record) = serde_json::from_value::<RefreshRecord>(value) {
                if record.client_id == client.client_id {
                    // Revoking a refresh token ends its grant, access tokens included.
                    self.revoke_grant(&record.grant).await;
                }
            }
        }
        Ok(())
    }
}

/// The payload of a JWT before its signature is checked: only to learn which
/// client's keys to check it with.
fn unverified_claims(jwt: &str) -> Option<Value> {
    use base64::Engine;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> AccessClaims {
        serde_json::from_value(serde_json::json!({
            "iss": "https://fhir.example.org/fhir", "sub": "amy",
            "aud": "https://fhir.example.org/fhir", "exp": 2, "iat": 1,
            "jti": "j1", "client_id": "app", "scope": "patient/*.rs"
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn the_same_keys_read_again_keep_the_tokens_verified_with_them() {
        use haven_model::clock::SystemClock;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let now = clock.now();
        let pem = crate::keys::generate_signing_key().unwrap();
        let keys = || KeySet::new(&pem, &[], now, time::Duration::hours(1)).unwrap();
        let store = haven_store::connect("sqlite::memory:", clock.clone())
            .await
            .unwrap();
        let server = AuthServer::new(
            AuthConfig::new("https://fhir.example.org/fhir"),
            store,
            clock,
            keys(),
        );
        let before = server.key_set();
        before.verified.insert("a.verified.token", &claims());

        server.replace_keys(keys());
        let after = server.key_set();
        assert!(Arc::ptr_eq(&before, &after));
        assert!(after.verified.get("a.verified.token").is_some());

        let rotated = crate::keys::generate_signing_key().unwrap();
        server.replace_keys(KeySet::new(&rotated, &[], now, time::Duration::hours(1)).unwrap());
        let rotated = server.key_set();
        assert_ne!(rotated.kid(), before.kid());
        assert!(rotated.verified.get("a.verified.token").is_none());
    }

    #[test]
    fn client_ids_never_look_like_command_line_options() {
        for _ in 0..2000 {
            assert!(!new_client_id().starts_with('-'));
        }
    }
}
