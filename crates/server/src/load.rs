//! `haven load`: posts transaction Bundles from files to a running server.
//!
//! Synthea writes the organizations and practitioners that patient bundles refer to
//! into `hospitalInformation*` and `practitionerInformation*` files; those are loaded
//! first, and the rest only once they are in. Every bundle is its own transaction, so
//! a failed one leaves no trace and does not stop the others.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Url;
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
                let progress = &progress;
                async move {
                    let result = post_bundle(client, server, &file).await;
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
async fn post_bundle(client: &reqwest::Client, server: &Url, file: &Path) -> Result<usize> {
    let body = tokio::fs::read(file).await.context("reading the file")?;
    let bundle: Value = serde_json::from_slice(&body).context("the file is not JSON")?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        bail!("the file is not a FHIR Bundle");
    }
    let resources = bundle
        .get("entry")
        .and_then(Value::as_array)
        .map_or(0, |entries| entries.len());
    let response = client
        .post(server.clone())
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .body(body)
        .send()
        .await
        .context("sending the bundle")?;
    let status = response.status();
    if status.is_success() {
        return Ok(resources);
    }
    let text = response.text().await.unwrap_or_default();
    bail!("HTTP {status}: {}", diagnostics(&text))
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
}
