//! The demo SMART app's files, served at `/apps/demo/`: plain HTML and JavaScript
//! built into the binary. They hold no data; the app reads the FHIR API with the
//! token it gets like any other client, so every request it makes goes through
//! the pipeline. The routes exist only when the server is given the app's
//! registration (`haven demo` registers it).

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

/// Where the app lives on the server.
pub const PATH: &str = "/apps/demo/";

/// The demo app's registration, as the app needs to know it.
#[derive(Debug, Clone)]
pub struct DemoApp {
    /// The client ID `haven demo` registered for it.
    pub client_id: String,
}

#[derive(Clone)]
struct AppConfig {
    client_id: String,
    fhir_base: String,
}

pub(crate) fn routes(app: &DemoApp, fhir_base: &str) -> Router {
    let config = AppConfig {
        client_id: app.client_id.clone(),
        fhir_base: fhir_base.to_owned(),
    };
    Router::new()
        .route("/apps/demo", get(|| async { moved() }))
        .route("/apps/demo/", get(|| async { file(INDEX, HTML) }))
        .route(
            "/apps/demo/launch.html",
            get(|| async { file(LAUNCH, HTML) }),
        )
        .route("/apps/demo/app.js", get(|| async { file(SCRIPT, JS) }))
        .route("/apps/demo/style.css", get(|| async { file(STYLE, CSS) }))
        .route("/apps/demo/config.json", get(config_json))
        .with_state(config)
}

const INDEX: &str = include_str!("../demo-app/index.html");
const LAUNCH: &str = include_str!("../demo-app/launch.html");
const SCRIPT: &str = include_str!("../demo-app/app.js");
const STYLE: &str = include_str!("../demo-app/style.css");

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

fn file(body: &'static str, content_type: &'static str) -> Response {
    secured((StatusCode::OK, body).into_response(), content_type)
}

/// `/apps/demo` without its slash: the app's relative links need the slash.
fn moved() -> Response {
    let mut response = StatusCode::MOVED_PERMANENTLY.into_response();
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(PATH));
    response
}

async fn config_json(State(config): State<AppConfig>) -> Response {
    let body = json!({"client_id": config.client_id, "fhir_base": config.fhir_base}).to_string();
    secured((StatusCode::OK, body).into_response(), "application/json")
}

fn secured(mut response: Response, content_type: &'static str) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    // The authorization code arrives in the page's URL: no other site may see it.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             frame-ancestors 'none'; form-action 'self'",
        ),
    );
    response
}
