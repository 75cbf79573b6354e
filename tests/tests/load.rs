//! `haven load` against a running server: failures are reported per file and do not
//! stop the other bundles.

use std::process::Command;

use haven_e2e::{haven_binary, spawn_haven, Haven, HavenOptions};
use serde_json::{json, Value};

fn transaction(patient: Value) -> String {
    json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{
            "fullUrl": "urn:uuid:6a1d7a4e-3f0b-4c43-9d5e-0a4f4f6b2c11",
            "resource": patient,
            "request": {"method": "POST", "url": "Patient"}
        }]
    })
    .to_string()
}

/// The server's answer to a count of every Patient, read with a system token.
async fn patient_count(haven: &Haven) -> Value {
    let token = haven.system_token("system/*.rs").await.unwrap();
    haven
        .client()
        .get(haven.url("Patient?_count=0&_total=accurate"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_bundle_is_reported_and_the_others_still_load() {
    let haven = spawn_haven(HavenOptions::default()).await.unwrap();
    let bundles = tempfile::tempdir().unwrap();
    let good = json!({"resourceType": "Patient", "name": [{"family": "Loaded"}]});
    let bad = json!({"resourceType": "Patient", "birthDate": "not a date"});
    std::fs::create_dir_all(bundles.path().join("nested")).unwrap();
    std::fs::write(bundles.path().join("nested/good.json"), transaction(good)).unwrap();
    std::fs::write(bundles.path().join("bad.json"), transaction(bad)).unwrap();

    let loader = haven.register_backend_client("system/*.cruds").unwrap();
    let output = haven
        .load_command(bundles.path(), &loader)
        .unwrap()
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("loaded 1 bundles, 1 resources"), "{stdout}");
    assert!(stdout.contains("1 failed"), "{stdout}");
    assert!(stdout.contains("bad.json: HTTP 4"), "{stdout}");

    let found = patient_count(&haven).await;
    assert_eq!(found["total"], 1, "{found}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_without_credentials_is_refused_and_writes_nothing() {
    let haven = spawn_haven(HavenOptions::default()).await.unwrap();
    let bundles = tempfile::tempdir().unwrap();
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Anonymous"}]});
    std::fs::write(bundles.path().join("p.json"), transaction(patient)).unwrap();
    let output = Command::new(haven_binary().unwrap())
        .arg("load")
        .arg(bundles.path())
        .args(["--server", &haven.base_url, "--ca-file"])
        .arg(haven.ca_file())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("p.json: HTTP 401"), "{stdout}");
    let found = patient_count(&haven).await;
    assert_eq!(found["total"], 0, "{found}");
}

#[test]
fn load_refuses_plain_http_to_another_machine() {
    let bundles = tempfile::tempdir().unwrap();
    std::fs::write(bundles.path().join("b.json"), "{}").unwrap();
    let output = Command::new(haven_binary().unwrap())
        .arg("load")
        .arg(bundles.path())
        .args(["--server", "http://192.0.2.1/fhir", "--insecure-http"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
}
