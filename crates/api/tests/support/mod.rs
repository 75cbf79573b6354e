//! The test harness: a router over a fresh SQLite store in a temporary directory,
//! and request helpers that return what a client would see.

#![allow(dead_code)]

pub mod postgres;
pub mod secured;

use std::sync::Arc;

use axum::body::Body;
use axum::Router;
use haven_api::{router, ApiConfig, AppState, SecurityStages};
use haven_model::clock::{Clock, ManualClock};
use haven_store::Store;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tempfile::TempDir;
use time::macros::datetime;
use tower::ServiceExt;

pub const BASE: &str = "http://haven.test/fhir";

pub struct App {
    pub router: Router,
    pub store: Arc<dyn Store>,
    pub clock: Arc<ManualClock>,
    _dir: TempDir,
}

/// What a client sees.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// `Value::Null` when there is no body.
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The first issue's code, for error answers.
    pub fn issue_code(&self) -> &str {
        self.body["issue"][0]["code"].as_str().unwrap_or("")
    }
}

pub async fn spawn_app() -> App {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut ApiConfig)) -> App {
    spawn_app_secured(configure, SecurityStages::allow_all()).await
}

/// An app whose security stages are replaced, to watch the pipeline run them.
pub async fn spawn_app_secured(
    configure: impl FnOnce(&mut ApiConfig),
    security: SecurityStages,
) -> App {
    let dir = tempfile::tempdir().expect("temporary directory");
    let clock = Arc::new(ManualClock::new(datetime!(2026-01-01 12:00 UTC)));
    let path = dir.path().join("haven.db");
    let store = haven_store::connect(
        &format!("sqlite:{}", path.display()),
        clock.clone() as Arc<dyn Clock>,
    )
    .await
    .expect("SQLite store");
    let mut config = ApiConfig::new(BASE);
    configure(&mut config);
    let state = AppState::new(store.clone(), clock.clone(), config).with_security(security);
    App {
        router: router(state),
        store,
        clock,
        _dir: dir,
    }
}

pub fn request(method: Method, path: &str) -> http::request::Builder {
    Request::builder().method(method).uri(path)
}

/// A request with an optional bearer token, extra headers and FHIR JSON body.
pub fn fhir_request(
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Request<Body> {
    let mut request = request(method, path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    match body {
        Some(body) => request
            .header("content-type", "application/fhir+json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    }
    .expect("a well-formed request")
}

/// Sends a request through a router and reads the whole answer.
pub async fn call(router: &Router, request: Request<Body>) -> Reply {
    let path = request.uri().to_string();
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("the router never fails");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{path}: not JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    Reply {
        status,
        headers,
        body,
    }
}

impl App {
    pub async fn send(&self, request: Request<Body>) -> Reply {
        call(&self.router, request).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(request(Method::GET, path).body(Body::empty()).unwrap())
            .await
    }

    /// A GET with one extra request header.
    pub async fn get_with_header(&self, path: &str, name: &str, value: &str) -> Reply {
        self.send(
            request(Method::GET, path)
                .header(name, value)
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }

    pub async fn send_json(&self, method: Method, path: &str, body: &Value) -> Reply {
        self.send(
            request(method, path)
                .header("content-type", "application/fhir+json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.send_json(Method::POST, path, body).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Reply {
        self.send_json(Method::PUT, path, body).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(request(Method::DELETE, path).body(Body::empty()).unwrap())
            .await
    }

    /// Creates a resource and returns its id.
    pub async fn create(&self, resource: &Value) -> String {
        let t = resource["resourceType"].as_str().unwrap();
        let reply = self.post(&format!("/fhir/{t}"), resource).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
        reply.body["id"].as_str().unwrap().to_owned()
    }

    pub async fn count(&self, resource_type: &str) -> u64 {
        self.store
            .count_by_type()
            .await
            .unwrap()
            .into_iter()
            .find(|(t, _)| t == resource_type)
            .map_or(0, |(_, n)| n)
    }
}

pub fn patient(family: &str, identifier: Option<(&str, &str)>) -> Value {
    let mut p = serde_json::json!({
        "resourceType": "Patient",
        "name": [{"family": family}],
    });
    if let Some((system, value)) = identifier {
        p["identifier"] = serde_json::json!([{"system": system, "value": value}]);
    }
    p
}

/// `$HAVEN_SHARED`, a relative path taken from the workspace root (as `.ci/run`
/// sets it), or `None` when the variable is unset.
pub fn shared_dir() -> Option<std::path::PathBuf> {
    let shared = std::path::PathBuf::from(std::env::var_os("HAVEN_SHARED")?);
    Some(if shared.is_absolute() {
        shared
    } else {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(shared)
    })
}
