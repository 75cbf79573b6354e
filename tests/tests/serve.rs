//! How `haven serve` starts, where it may listen, and how it stops.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use haven_e2e::{run_haven, spawn_haven, HavenOptions};

#[tokio::test(flavor = "multi_thread")]
async fn serve_listens_on_the_network_over_https_and_answers_data_only_with_a_token() {
    let haven = spawn_haven(HavenOptions {
        listen: Some("0.0.0.0:0".into()),
        ..HavenOptions::default()
    })
    .await
    .unwrap();
    // The generated certificate names localhost, so connect by that name.
    let base = format!("https://localhost:{}/fhir", haven.addr.port());
    let client = haven.client();
    let metadata = client.get(format!("{base}/metadata")).send().await.unwrap();
    assert_eq!(metadata.status(), 200);
    let data = client.get(format!("{base}/Patient")).send().await.unwrap();
    assert_eq!(data.status(), 401);
    assert!(data
        .headers()
        .get("www-authenticate")
        .is_some_and(|v| v.to_str().unwrap().starts_with("Bearer")));
}

#[test]
fn serve_refuses_plain_http_off_this_machine() {
    let dir = tempfile::tempdir().unwrap();
    for address in ["0.0.0.0:0", "[::]:0"] {
        let output = run_haven(&[
            "serve",
            "--insecure-http",
            "--listen",
            address,
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{address} was accepted");
        assert!(stderr.contains("loopback"), "unclear message: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn insecure_http_on_loopback_serves_with_a_warning() {
    let haven = spawn_haven(HavenOptions {
        insecure_http: true,
        ..HavenOptions::default()
    })
    .await
    .unwrap();
    assert!(haven.base_url.starts_with("http://127.0.0.1:"));
    let response = reqwest::get(haven.url("metadata")).await.unwrap();
    assert_eq!(response.status(), 200, "{}", haven.log());
    assert!(haven.log().contains("insecure-http"), "{}", haven.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_generated_ca_is_private_and_reused_after_a_restart() {
    let mut first = spawn_haven(HavenOptions::default()).await.unwrap();
    let dir = first.keep_data_dir().unwrap();
    let ca = first.ca_pem.clone().unwrap();
    for key in ["ca-key.pem", "localhost-key.pem"] {
        let mode = std::fs::metadata(dir.path().join("tls").join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let client = first.client();
    drop(first);
    let second = spawn_haven(HavenOptions {
        data_dir: Some(dir.path().to_path_buf()),
        ..HavenOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(second.ca_pem.as_ref(), Some(&ca));
    // A client that trusted the first start still trusts the second.
    client.get(second.url("metadata")).send().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_server_cleanly() {
    let mut haven = spawn_haven(HavenOptions::default()).await.unwrap();
    let status = haven.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "exit status {status}: {}", haven.log());
}

#[test]
fn migrate_creates_the_sqlite_database_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("nested");
    let output = run_haven(&["migrate", "--data-dir", data_dir.to_str().unwrap()]).unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(data_dir.join("haven.db").is_file());
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_request_headers_are_refused_over_http1_and_http2() {
    let haven = spawn_haven(HavenOptions {
        extra_args: vec!["--max-header-bytes".into(), "16384".into()],
        ..HavenOptions::default()
    })
    .await
    .unwrap();
    let ca = reqwest::Certificate::from_pem(haven.ca_pem.as_ref().unwrap()).unwrap();
    let http1 = reqwest::Client::builder()
        .add_root_certificate(ca)
        .http1_only()
        .build()
        .unwrap();
    let big = "x".repeat(64 * 1024);
    for (name, client) in [("HTTP/1.1", http1), ("HTTP/2", haven.client())] {
        let small = client
            .get(haven.url("metadata"))
            .header("x-padding", "x".repeat(4096))
            .send()
            .await
            .unwrap();
        assert_eq!(small.status(), 200, "{name}");
        match client
            .get(haven.url("metadata"))
            .header("x-padding", &big)
            .send()
            .await
        {
            Err(_) => {}
            Ok(response) => assert_eq!(response.status(), 431, "{name}"),
        }
    }
}
