//! `haven load`: posts transaction Bundles from files to a running server.
//!
//! Synthea writes the organizations and practitioners that patient bundles refer to
//! into `hospitalInformation*` and `practitionerInformation*` files; those are loaded
//! first, and the rest only once they are in. Every bundle is its own transaction, so
//! a failed one leaves no trace and does not stop the others.
//!
//! Given a client ID and private key, every bundle carries a bearer token from the
//! server's SMART Backend Services token endpoint ([`haven_auth::client`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::{self, StreamExt};
use haven_auth::client::{BackendServicesClient, ClientKey};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{StatusCode, Url};
use serde_json::Value;

/// What `haven load` was asked to do.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub paths: Vec<PathBuf>,
    /// The FHIR base URL, e.g. `https://localhost:8443/fhir`.
    pub server: String,
    pub ca_file: Option<PathBuf>,
    pub insecure_http: bool,
    pub concurrency: usize,
    pub timeout: Duration,
    /// Without credentials, bundles are posted with no `Authorization` header.
    pub auth: Option<LoadAuth>,
}

/// The SMART Backend Services credentials `haven load` authenticates with.
#[derive(Debug, Clone)]
pub struct LoadAuth {
    pub client_id: String,
    /// A PEM private key (RSA or EC P-384) whose public key the server knows.
    pub private_key: PathBuf,
    pub scope: String,
}

/// One bundle that the server did not accept.
#[derive(Debug)]
pub struct Failure {
    pub file: PathBuf,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub bundles: usize,
    pub resources: usize,
    pub failures: Vec<Failure>,
    pub elapsed: Duration,
}

/// Loads everything and prints the summary; the returned summary says whether any
/// bundle failed.
pub async fn run(options: LoadOptions) -> Result<Summary> {
    let server = check_server_url(&options.server, options.insecure_http)?;
    let client = client(&options, &server)?;
    let files = collect_files(&options.paths)?;
    if files.is_empty() {
        bail!("no *.json files found in the given paths");
    }
    let auth = match &options.auth {
        Some(auth) => Some(backend_services(auth, &server, &client).await?),
        None => None,
    };
    let (first, rest): (Vec<_>, Vec<_>) = files.into_iter().partition(|f| loads_first(f));

    let progress = ProgressBar::new((first.len() + rest.len()) as u64);
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} bundles {msg}",
        )
        .expect("the progress template is valid"),
    );
    let started = Instant::now();
    let mut summary = Summary::default();
    for batch in [first, rest] {
        let results: Vec<_> = stream::iter(batch)
            .map(|file| {
                let client = &client;
                let server = &server;
                let auth = auth.as_ref();
                let progress = &progress;
                async move {
                    let result = post_bundle(client, server, auth, &file).await;
                    progress.inc(1);
                    (file, result)
                }
            })
            .buffer_unordered(options.concurrency.max(1))
            .collect()
            .await;
        for (file, result) in results {
            match result {
                Ok(resources) => {
                    summary.bundles += 1;
                    summary.resources += resources;
                }
                Err(err) => {
                    progress.println(format!("failed: {}: {err:#}", file.display()));
                    summary.failures.push(Failure {
                        file,
                        message: format!("{err:#}"),
                    });
                }
            }
        }
    }
    summary.elapsed = started.elapsed();
    progress.finish_and_clear();
    print_summary(&summary);
    Ok(summary)
}

fn print_summary(summary: &Summary) {
    let seconds = summary.elapsed.as_secs_f64();
    let rate = if seconds > 0.0 {
        summary.resources as f64 / seconds
    } else {
        0.0
    };
    println!(
        "loaded {} bundles, {} resources in {:.1} s ({:.0} resources/s); {} failed",
        summary.bundles,
        summary.resources,
        seconds,
        rate,
        summary.failures.len()
    );
    for failure in &summary.failures {
        println!("  {}: {}", failure.file.display(), failure.message);
    }
}

/// Plain HTTP only when asked for and only to this machine, so bundles of patient
/// data never cross a network unencrypted.
fn check_server_url(server: &str, insecure_http: bool) -> Result<Url> {
    let url = Url::parse(server.trim_end_matches('/'))
        .with_context(|| format!("--server {server:?} is not a URL"))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" => {
            let loopback = url
                .host_str()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
                .and_then(|h| h.parse::<std::net::IpAddr>().ok())
                .is_some_and(|ip| ip.is_loopback());
            if !insecure_http {
                bail!("--server {server} is plain HTTP; pass --insecure-http to allow it (loopback only)");
            }
            if !loopback {
                bail!("--insecure-http is allowed only for a server on a loopback address such as http://127.0.0.1");
            }
            Ok(url)
        }
        other => bail!("--server must be an https URL, not {other}"),
    }
}

fn client(options: &LoadOptions, server: &Url) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(options.timeout)
        .pool_max_idle_per_host(options.concurrency.max(1));
    if let Some(ca_file) = &options.ca_file {
        let pem =
            std::fs::read(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("parsing {}", ca_file.display()))?;
        builder = builder.add_root_certificate(ca);
    } else if server.scheme() == "https" {
        tracing::debug!("no --ca-file given; trusting the system's certificate authorities");
    }
    Ok(builder.build()?)
}

/// The token client for the load, with a first token already in hand so that
/// wrong credentials stop the load before any bundle is sent.
async fn backend_services(
    auth: &LoadAuth,
    server: &Url,
    http: &reqwest::Client,
) -> Result<BackendServicesClient> {
    let pem = std::fs::read_to_string(&auth.private_key)
        .with_context(|| format!("reading {}", auth.private_key.display()))?;
    let key = ClientKey::from_pem(&pem)
        .with_context(|| format!("--private-key {}", auth.private_key.display()))?;
    let tokens = BackendServicesClient::new(
        server.clone(),
        auth.client_id.clone(),
        key,
        auth.scope.clone(),
        http.clone(),
    );
    tokens
        .access_token()
        .await
        .context("getting an access token")?;
    Ok(tokens)
}

fn loads_first(file: &Path) -> bool {
    file.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        n.starts_with("hospitalInformation") || n.starts_with("practitionerInformation")
    })
}

/// Every `*.json` file named or found below a named folder, in a stable order.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            walk(path, &mut files)?;
        } else {
            files.push(path.clone());
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            files.push(path);
        }
    }
    Ok(())
}

/// Posts one bundle; returns how many resources it carried.
async fn post_bundle(
    client: &reqwest::Client,
    server: &Url,
    auth: Option<&BackendServicesClient>,
    file: &Path,
) -> Result<usize> {
    let body = tokio::fs::read(file).await.context("reading the file")?;
    let bundle: Value = serde_json::from_slice(&body).context("the file is not JSON")?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        bail!("the file is not a FHIR Bundle");
    }
    let resources = bundle
        .get("entry")
        .and_then(Value::as_array)
        .map_or(0, |entries| entries.len());
    let response = match auth {
        None => send(client, server, body, None).await?,
        Some(auth) => {
            let token = auth
                .access_token()
                .await
                .context("getting an access token")?;
            let response = send(client, server, body.clone(), Some(&token)).await?;
            if response.status() == StatusCode::UNAUTHORIZED {
                // The server may have revoked or expired the token early; a fresh
                // one gets the bundle one more try.
                let token = auth
                    .renew_access_token(&token)
                    .await
                    .context("renewing the access token")?;
                send(client, server, body, Some(&token)).await?
            } else {
                response
            }
        }
    };
    let status = response.status();
    if status.is_success() {
        return Ok(resources);
    }
    let text = response.text().await.unwrap_or_default();
    bail!("HTTP {status}: {}", diagnostics(&text))
}

async fn send(
    client: &reqwest::Client,
    server: &Url,
    body: Vec<u8>,
    token: Option<&str>,
) -> Result<reqwest::Response> {
    let mut request = client
        .post(server.clone())
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request
        .body(body)
        .send()
        .await
        .context("sending the bundle")
}

/// The human-readable part of an OperationOutcome, or the body as it came.
fn diagnostics(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let issues = parsed
        .as_ref()
        .and_then(|v| v.get("issue"))
        .and_then(Value::as_array);
    let Some(issues) = issues else {
        let mut text: String = body.chars().take(500).collect();
        if text.is_empty() {
            text = "(empty response body)".into();
        }
        return text;
    };
    let messages: Vec<String> = issues
        .iter()
        .map(|issue| {
            let text = issue
                .get("diagnostics")
                .and_then(Value::as_str)
                .or_else(|| issue.pointer("/details/text").and_then(Value::as_str))
                .unwrap_or("(no diagnostics)");
            let code = issue.get("code").and_then(Value::as_str).unwrap_or("?");
            match issue.get("expression").and_then(Value::as_array) {
                Some(expr) if !expr.is_empty() => {
                    let at: Vec<&str> = expr.iter().filter_map(Value::as_str).collect();
                    format!("[{code}] {text} (at {})", at.join(", "))
                }
                _ => format!("[{code}] {text}"),
            }
        })
        .collect();
    messages.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hospital_and_practitioner_bundles_load_first() {
        assert!(loads_first(Path::new("/x/hospitalInformation123.json")));
        assert!(loads_first(Path::new("practitionerInformation1.json")));
        assert!(!loads_first(Path::new("/x/Agustin_Fonseca.json")));
    }

    #[test]
    fn folders_are_searched_recursively_for_json_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("one.json"), "{}").unwrap();
        std::fs::write(dir.path().join("a/b/two.json"), "{}").unwrap();
        std::fs::write(dir.path().join("a/notes.txt"), "").unwrap();
        let files = collect_files(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(files.len(), 2);
    }

    #[test]
    fn plain_http_is_allowed_only_to_loopback_and_only_when_asked() {
        assert!(check_server_url("https://fhir.example/fhir", false).is_ok());
        assert!(check_server_url("http://127.0.0.1:8080/fhir", false).is_err());
        assert!(check_server_url("http://127.0.0.1:8080/fhir", true).is_ok());
        assert!(check_server_url("http://[::1]:8080/fhir", true).is_ok());
        assert!(check_server_url("http://fhir.example/fhir", true).is_err());
    }

    #[test]
    fn operation_outcome_diagnostics_are_reported() {
        let body = r#"{"resourceType":"OperationOutcome","issue":[
            {"severity":"error","code":"invalid","diagnostics":"bad date","expression":["Patient.birthDate"]},
            {"severity":"error","code":"processing","details":{"text":"other"}}]}"#;
        assert_eq!(
            diagnostics(body),
            "[invalid] bad date (at Patient.birthDate); [processing] other"
        );
        assert_eq!(diagnostics("oops"), "oops");
    }

    /// A FHIR server that wants a bearer token, refuses the first one it is
    /// shown, and records the `Authorization` header of every bundle post.
    mod fake_server {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};

        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::{get, post};
        use axum::{Json, Router};
        use serde_json::{json, Value};

        #[derive(Clone, Default)]
        pub struct Seen {
            pub authorizations: Arc<Mutex<Vec<Option<String>>>>,
            tokens: Arc<AtomicU64>,
            origin: Arc<Mutex<String>>,
        }

        /// The FHIR base URL and what the server saw.
        pub async fn start() -> (String, Seen) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let origin = format!("http://{}", listener.local_addr().unwrap());
            let seen = Seen::default();
            *seen.origin.lock().unwrap() = origin.clone();
            let app = Router::new()
                .route("/fhir/.well-known/smart-configuration", get(configuration))
                .route("/auth/token", post(token))
                .route("/fhir", post(bundle))
                .with_state(seen.clone());
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            (format!("{origin}/fhir"), seen)
        }

        async fn configuration(State(seen): State<Seen>) -> Json<Value> {
            let origin = seen.origin.lock().unwrap().clone();
            Json(json!({
                "token_endpoint": format!("{origin}/auth/token"),
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            }))
        }

        async fn token(State(seen): State<Seen>) -> Json<Value> {
            let n = seen.tokens.fetch_add(1, Ordering::SeqCst) + 1;
            Json(json!({
                "access_token": format!("token-{n}"),
                "token_type": "bearer",
                "expires_in": 300,
            }))
        }

        async fn bundle(State(seen): State<Seen>, headers: HeaderMap) -> (StatusCode, Json<Value>) {
            let authorization = headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string());
            seen.authorizations
                .lock()
                .unwrap()
                .push(authorization.clone());
            match authorization.as_deref() {
                Some("Bearer token-1") => (StatusCode::UNAUTHORIZED, Json(json!({}))),
                _ => (
                    StatusCode::OK,
                    Json(json!({"resourceType": "Bundle", "type": "transaction-response"})),
                ),
            }
        }
    }

    fn write_bundle(dir: &Path) -> PathBuf {
        let file = dir.join("bundle.json");
        let bundle = r#"{"resourceType":"Bundle","type":"transaction","entry":[{},{}]}"#;
        std::fs::write(&file, bundle).unwrap();
        file
    }

    fn options(server: String, paths: Vec<PathBuf>, auth: Option<LoadAuth>) -> LoadOptions {
        LoadOptions {
            paths,
            server,
            ca_file: None,
            insecure_http: true,
            concurrency: 2,
            timeout: Duration::from_secs(30),
            auth,
        }
    }

    #[tokio::test]
    async fn with_credentials_bundles_carry_a_token_and_a_refused_one_is_renewed_once() {
        let (server, seen) = fake_server::start().await;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, ClientKey::generate_ec_p384().to_pem()).unwrap();
        let bundle = write_bundle(dir.path());
        let auth = LoadAuth {
            client_id: "loader".into(),
            private_key: key,
            scope: "system/*.cruds".into(),
        };
        let summary = run(options(server, vec![bundle], Some(auth)))
            .await
            .unwrap();
        assert!(summary.failures.is_empty(), "{:?}", summary.failures);
        assert_eq!((summary.bundles, summary.resources), (1, 2));
        let authorizations = seen.authorizations.lock().unwrap().clone();
        assert_eq!(
            authorizations,
            [
                Some("Bearer token-1".to_string()),
                Some("Bearer token-2".to_string())
            ]
        );
    }

    #[tokio::test]
    async fn without_credentials_bundles_carry_no_authorization_header() {
        let (server, seen) = fake_server::start().await;
        let dir = tempfile::tempdir().unwrap();
        let bundle = write_bundle(dir.path());
        let summary = run(options(server, vec![bundle], None)).await.unwrap();
        assert!(summary.failures.is_empty(), "{:?}", summary.failures);
        assert_eq!(*seen.authorizations.lock().unwrap(), [None]);
    }

    #[tokio::test]
    async fn an_unreadable_private_key_stops_the_load_before_any_bundle() {
        let (server, seen) = fake_server::start().await;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "not a key").unwrap();
        let bundle = write_bundle(dir.path());
        let auth = LoadAuth {
            client_id: "loader".into(),
            private_key: key,
            scope: "system/*.cruds".into(),
        };
        let err = run(options(server, vec![bundle], Some(auth)))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("--private-key"), "{err:#}");
        assert!(seen.authorizations.lock().unwrap().is_empty());
    }
}
