//! Haven's HTTP API: the axum application.
//!
//! Every request enters through one handler, [`pipeline`]'s runner, installed as
//! the router's only route (its fallback), and passes the stages of the pipeline
//! in order; no interaction can be reached around them. Requests become an
//! [`interaction::Interaction`] first; executing one is private to the crate and
//! only the pipeline calls it.
//!
//! Design choices:
//! - Interactions answer a [`response::FhirResponse`] (status, headers, JSON) so
//!   later stages can label it and Bundle entries can reuse the same code.
//! - Errors are one [`error::ApiError`], mapped to HTTP in one place.
//! - Request bodies are read with a strict JSON parser ([`strict_json`]) that
//!   refuses duplicate keys and excessive nesting.
//! - Writes run in one store transaction each; a FHIR transaction runs all its
//!   entries in one.

use std::sync::Arc;
use std::time::Duration;

use haven_model::clock::Clock;
use haven_store::Store;

pub mod demo_app;
pub mod error;
mod execute;
pub use execute::{verify_trail, TrailReport};
pub mod guard;
pub mod interaction;
pub mod negotiation;
mod oauth;
mod pages;
pub mod pipeline;
pub mod policy;
pub mod record;
pub mod response;
pub mod search_params;
pub mod smart;
pub mod strict_json;

pub use error::ApiError;
pub use pipeline::SecurityStages;

/// Limits enforced by the first pipeline stage; each answers with an OperationOutcome.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted (413 beyond it).
    pub max_body_bytes: usize,
    /// Deepest JSON nesting accepted (400 beyond it).
    pub max_json_depth: usize,
    /// Largest total size of request headers (431 beyond it).
    pub max_header_bytes: usize,
    /// Longest a request may run (503 with a timeout issue beyond it).
    pub request_timeout: Duration,
    /// Most entries a batch or transaction Bundle may carry (413 beyond it).
    pub max_bundle_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            max_json_depth: 64,
            max_header_bytes: 32 * 1024,
            request_timeout: Duration::from_secs(60),
            max_bundle_entries: 10_000,
        }
    }
}

/// What the API needs to know about its deployment.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The public FHIR base URL without a trailing slash, e.g. `https://localhost:8443/fhir`.
    /// Used in `Location`, `fullUrl` and paging links.
    pub base_url: String,
    pub limits: Limits,
    /// `_count` when the client gives none.
    pub default_page_size: u32,
    /// The largest `_count` honoured; larger requests are cut to it.
    pub max_page_size: u32,
    /// The demo SMART app, served at `/apps/demo/` when registered.
    pub demo_app: Option<demo_app::DemoApp>,
}

impl ApiConfig {
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            limits: Limits::default(),
            default_page_size: 50,
            max_page_size: 1000,
            demo_app: None,
        }
    }
}

/// Shared state of the application.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub config: Arc<ApiConfig>,
    /// Stages 2, 3, 4, 6 and 7 of the pipeline; everything is refused by default.
    pub security: Arc<SecurityStages>,
    /// The built-in authorization server, when SMART on FHIR is on.
    pub auth: Option<Arc<haven_auth::AuthServer>>,
    /// The audit recorder, when audit is on; the authorization server's
    /// endpoints record their events through it.
    pub audit: Option<Arc<record::AuditRecorder>>,
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, config: ApiConfig) -> Self {
        Self {
            store,
            clock,
            config: Arc::new(config),
            security: Arc::new(SecurityStages::deny_all()),
            auth: None,
            audit: None,
        }
    }

    /// Audit on: every request leaves AuditEvents, every write its Provenance,
    /// committed before the answer leaves (fail closed). `observer` names this
    /// server instance in `AuditEvent.source.observer`.
    pub fn with_audit(mut self, observer: impl Into<String>) -> Self {
        let recorder = Arc::new(record::AuditRecorder::new(
            haven_store::AuditWriter::start(self.store.clone()),
            self.clock.clone(),
            self.config.base_url.clone(),
            observer,
        ));
        let mut security = (*self.security).clone();
        security.recorder = recorder.clone();
        self.security = Arc::new(security);
        self.audit = Some(recorder);
        self
    }

    /// SMART on FHIR: the authorization server's routes and pages, and bearer
    /// tokens with their scopes as stages 2 and 3 of the pipeline.
    pub fn with_smart(mut self, server: Arc<haven_auth::AuthServer>) -> Self {
        let mut security = (*self.security).clone();
        security.authenticator = Arc::new(smart::SmartAuthenticator {
            server: server.clone(),
        });
        security.authorizer = Arc::new(smart::SmartAuthorizer);
        // Consent and labels come with authorization: a secured server enforces them.
        let policy = Arc::new(policy::PolicyStage::default());
        security.consent = policy.clone();
        security.labeler = policy;
        self.security = Arc::new(security);
        self.auth = Some(server);
        self
    }

    /// The site's consent and label policy (after [`AppState::with_smart`]).
    pub fn with_policy(mut self, config: policy::PolicyConfig) -> Self {
        let mut security = (*self.security).clone();
        let policy = Arc::new(policy::PolicyStage {
            config: Arc::new(config),
        });
        security.consent = policy.clone();
        security.labeler = policy;
        self.security = Arc::new(security);
        self
    }

    /// Replaces the security stages (authentication, authorization, consent,
    /// labeling, recording).
    pub fn with_security(mut self, security: SecurityStages) -> Self {
        self.security = Arc::new(security);
        self
    }
}

/// Browser apps on other origins call the FHIR API and the token endpoint with
/// bearer tokens, never cookies, so any origin may; preflights are answered here.
fn cors() -> tower_http::cors::CorsLayer {
    use http::{header, HeaderName, Method};
    tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            HeaderName::from_static("if-none-exist"),
            HeaderName::from_static("prefer"),
            HeaderName::from_static(pipeline::REQUEST_ID),
        ])
        .expose_headers([
            header::LOCATION,
            header::CONTENT_LOCATION,
            header::ETAG,
            header::LAST_MODIFIED,
            HeaderName::from_static(pipeline::REQUEST_ID),
        ])
        .max_age(std::time::Duration::from_secs(3600))
}

/// The whole application: `/fhir/...`, the authorization server's `/auth/...`
/// and, when registered, the demo app's files under `/apps/demo/`. Every other
/// request, including unknown paths, is answered by the pipeline, so even a 404
/// is an OperationOutcome with a request id.
pub fn router(state: AppState) -> axum::Router {
    let auth_routes = state.auth.clone().map(|server| {
        oauth::routes(oauth::AuthState {
            server,
            store: state.store.clone(),
            audit: state.audit.clone(),
        })
    });
    let demo_routes = state
        .config
        .demo_app
        .as_ref()
        .map(|app| demo_app::routes(app, &state.config.base_url));
    let fhir = axum::Router::new()
        .fallback(pipeline::handle)
        .with_state(state);
    let mut app = match auth_routes {
        Some(routes) => routes.merge(fhir),
        None => fhir,
    };
    if let Some(routes) = demo_routes {
        app = app.merge(routes);
    }
    app.layer(cors())
        // A bug must still get a FHIR answer, never a dropped connection; the
        // transaction it was in rolls back when its task unwinds.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                tracing::error!("a request handler panicked");
                axum::response::IntoResponse::into_response(ApiError::Internal(
                    "handler panicked".into(),
                ))
            },
        ))
}
