//! `haven sample` and `haven demo` through the real binary: the generated sample
//! loads with no failures on both backends, is byte-identical for one seed, and
//! `haven demo` gives a populated server that keeps its data across starts and
//! never takes over a data directory it did not set up.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use haven_e2e::{run_haven, spawn_haven, Haven, HavenOptions, PostgresDatabase};
use serde_json::Value;

/// A Backend Services token that may read everything, sensitive data included.
async fn reader_token(haven: &Haven) -> String {
    haven
        .system_token_with("system/*.rs", &["--clearance", "V:*"])
        .await
        .unwrap()
}

async fn count(haven: &Haven, token: &str, query: &str) -> u64 {
    let separator = if query.contains('?') { '&' } else { '?' };
    let response = haven
        .client()
        .get(haven.url(&format!("{query}{separator}_summary=count")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{query}");
    let body: Value = response.json().await.unwrap();
    body["total"].as_u64().unwrap()
}

/// Resources per type in the Bundles of a folder.
fn types_in(dir: &Path) -> BTreeMap<String, u64> {
    let mut types = BTreeMap::new();
    for file in std::fs::read_dir(dir).unwrap() {
        let bundle: Value =
            serde_json::from_str(&std::fs::read_to_string(file.unwrap().path()).unwrap()).unwrap();
        for entry in bundle["entry"].as_array().unwrap() {
            let kind = entry["resource"]["resourceType"].as_str().unwrap();
            *types.entry(kind.to_owned()).or_default() += 1;
        }
    }
    types
}

fn sample(dir: &Path, patients: &str, seed: &str) -> String {
    let output = run_haven(&[
        "sample",
        "--patients",
        patients,
        "--seed",
        seed,
        "--out",
        dir.to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn load(haven: &Haven, dir: &Path, client_args: &[&str]) -> String {
    let loader = haven
        .register_backend_client_with("system/*.cruds", client_args)
        .unwrap();
    let output = haven.load_command(dir, &loader).unwrap().output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "haven load failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn sample_loads_with_no_failures(database_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let printed = sample(dir.path(), "12", "3");
    assert!(printed.starts_with("wrote 13 bundles ("), "{printed}");
    let haven = spawn_haven(HavenOptions {
        database_url,
        ..HavenOptions::default()
    })
    .await
    .unwrap();
    let summary = load(&haven, dir.path(), &[]);
    assert!(summary.contains("loaded 13 bundles"), "{summary}");
    assert!(summary.trim_end().ends_with("; 0 failed"), "{summary}");

    let token = reader_token(&haven).await;
    let expected = types_in(dir.path());
    let mut total = 0;
    for (kind, n) in &expected {
        assert_eq!(count(&haven, &token, kind).await, *n, "{kind}");
        total += n;
    }
    // The sensitive conditions were labeled on the way in.
    let act_code = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
    let mut labeled = 0;
    for category in ["PSY", "ETH", "SEX"] {
        let n = count(
            &haven,
            &token,
            &format!("Condition?_security={act_code}|{category}"),
        )
        .await;
        assert!(n >= 1, "no Condition labeled {category}");
        labeled += n;
    }
    // Every version written has its Provenance: each resource, and each
    // Encounter a sensitive Condition was diagnosed in, which took its labels.
    assert_eq!(count(&haven, &token, "Provenance").await, total + labeled);
    assert_eq!(count(&haven, &token, "Consent?status=active").await, 2);

    // Loading it again stores new versions, never duplicates. Changing labeled
    // data takes a client cleared to read it.
    let again = load(&haven, dir.path(), &["--clearance", "V:*"]);
    assert!(again.trim_end().ends_with("; 0 failed"), "{again}");
    assert_eq!(count(&haven, &token, "Patient").await, expected["Patient"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sample_loads_with_no_failures_on_sqlite() {
    sample_loads_with_no_failures(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sample_loads_with_no_failures_on_postgresql() {
    let database = match PostgresDatabase::create().unwrap() {
        Ok(database) => database,
        Err(reason) => {
            println!("not run: {reason}");
            return;
        }
    };
    sample_loads_with_no_failures(Some(database.url.clone())).await;
}

#[test]
fn haven_sample_writes_byte_identical_bundles_for_the_same_seed() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    sample(a.path(), "6", "42");
    sample(b.path(), "6", "42");
    sample(c.path(), "6", "43");
    let files = |dir: &Path| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|f| {
                let path = f.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&path).unwrap())
            })
            .collect()
    };
    assert_eq!(files(a.path()).len(), 7);
    assert_eq!(files(a.path()), files(b.path()));
    assert_ne!(files(a.path()), files(c.path()));
}

fn demo_options(data_dir: Option<&Path>) -> HavenOptions {
    HavenOptions {
        command: Some("demo".into()),
        data_dir: data_dir.map(Path::to_path_buf),
        extra_args: [
            "--patients",
            "6",
            "--patient-password",
            "patient-pass-1",
            "--practitioner-password",
            "practitioner-pass-1",
            "--admin-password",
            "admin-pass-1",
        ]
        .map(String::from)
        .to_vec(),
        ..HavenOptions::default()
    }
}

fn record(data_dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data_dir.join("demo.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn haven_demo_starts_populated_and_a_second_start_keeps_the_data() {
    let mut first = spawn_haven(demo_options(None)).await.unwrap();
    let dir = first.keep_data_dir().unwrap();
    let out = first.stdout().join("\n");
    assert!(out.contains("haven demo ready: 6 patients"), "{out}");
    assert!(
        out.contains("demo-patient       password patient-pass-1"),
        "{out}"
    );
    assert!(out.contains("loaded 7 bundles"), "{out}");
    let demo = record(dir.path());
    assert!(
        !std::fs::read_to_string(dir.path().join("demo.json"))
            .unwrap()
            .contains("pass-1"),
        "no password is kept"
    );
    assert!(
        !dir.path().join("demo-loader-key.pem").exists(),
        "the loader's key is removed after the load"
    );

    // The app's files, with headers that keep its codes and tokens to itself.
    let page = first
        .client()
        .get(format!(
            "{}/apps/demo/",
            first.base_url.trim_end_matches("/fhir")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["referrer-policy"], "no-referrer");
    // Without its slash the app's relative links would break: it is redirected.
    let bare = first
        .client()
        .get(format!(
            "{}/apps/demo",
            first.base_url.trim_end_matches("/fhir")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 200);
    assert_eq!(bare.url().path(), "/apps/demo/");
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    let config: Value = first
        .client()
        .get(format!(
            "{}/apps/demo/config.json",
            first.base_url.trim_end_matches("/fhir")
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["client_id"], demo["app_client_id"]);
    assert_eq!(config["fhir_base"], first.announced_base_url);

    let token = reader_token(&first).await;
    assert_eq!(count(&first, &token, "Patient").await, 6);
    let observations = count(&first, &token, "Observation").await;
    first.terminate(Duration::from_secs(30)).unwrap();

    let second = spawn_haven(demo_options(Some(dir.path()))).await.unwrap();
    let out = second.stdout().join("\n");
    assert!(out.contains("haven demo ready: 6 patients"), "{out}");
    assert!(!out.contains("loaded "), "nothing is loaded again: {out}");
    assert!(!out.contains("patient-pass-1"), "{out}");
    assert!(out.contains("(as printed at the first start)"), "{out}");
    let token = reader_token(&second).await;
    assert_eq!(count(&second, &token, "Patient").await, 6);
    assert_eq!(count(&second, &token, "Observation").await, observations);
    // The port changed, so the app was registered again for the new address.
    let demo_again = record(dir.path());
    assert_eq!(
        demo_again["public_url"],
        second.announced_base_url.trim_end_matches("/fhir")
    );
    assert_eq!(demo_again["patient"], demo["patient"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn haven_serve_on_a_demo_directory_serves_the_demo_app_at_its_registered_address() {
    let mut demo = spawn_haven(demo_options(None)).await.unwrap();
    let dir = demo.keep_data_dir().unwrap();
    demo.terminate(Duration::from_secs(30)).unwrap();
    let public_url = record(dir.path())["public_url"]
        .as_str()
        .unwrap()
        .to_owned();

    let served = spawn_haven(HavenOptions {
        data_dir: Some(dir.path().to_path_buf()),
        extra_args: vec!["--public-url".into(), public_url],
        ..HavenOptions::default()
    })
    .await
    .unwrap();
    let origin = served.base_url.trim_end_matches("/fhir").to_owned();
    let page = served
        .client()
        .get(format!("{origin}/apps/demo/"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    drop(served);

    // Elsewhere the app's redirect URI would not match: it is not served.
    let elsewhere = spawn_haven(HavenOptions {
        data_dir: Some(dir.path().to_path_buf()),
        ..HavenOptions::default()
    })
    .await
    .unwrap();
    let origin = elsewhere.base_url.trim_end_matches("/fhir").to_owned();
    let page = elsewhere
        .client()
        .get(format!("{origin}/apps/demo/"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 404);
    assert!(
        elsewhere
            .stdout()
            .iter()
            .any(|l| l.contains("run `haven demo` to serve it at")),
        "{:?}",
        elsewhere.stdout()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn haven_demo_refuses_a_data_directory_it_did_not_set_up_and_bad_flags() {
    let mut haven = spawn_haven(HavenOptions::default()).await.unwrap();
    haven.register_backend_client("system/*.rs").unwrap();
    let dir = haven.keep_data_dir().unwrap();
    haven.terminate(Duration::from_secs(30)).unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let output = run_haven(&["demo", "--data-dir", data_dir, "--listen", "127.0.0.1:0"]).unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("holds a server that `haven demo` did not set up (1 clients registered)"),
        "{err}"
    );
    assert!(!dir.path().join("demo.json").exists());
    assert!(!dir.path().join("sample").exists());

    // A demo that stopped before its sample was in is named as such.
    std::fs::create_dir(dir.path().join("sample")).unwrap();
    let output = run_haven(&["demo", "--data-dir", data_dir, "--listen", "127.0.0.1:0"]).unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("stopped before the sample was loaded; remove that directory"),
        "{err}"
    );

    let fresh = tempfile::tempdir().unwrap();
    let fresh_dir = fresh.path().join("data");
    for (args, message) in [
        (
            vec!["--patient-password", "short"],
            "--patient-password: passwords have at least 8 characters",
        ),
        (
            vec!["--patients", "0"],
            "--patients must be between 1 and 100000",
        ),
    ] {
        let mut argv = vec!["demo", "--data-dir", fresh_dir.to_str().unwrap()];
        argv.extend(args);
        let output = run_haven(&argv).unwrap();
        assert!(!output.status.success());
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.contains(message), "{err}");
        assert!(!fresh_dir.exists(), "nothing was made before the refusal");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sample_the_server_refuses_stops_the_demo_with_what_to_do() {
    // Bundles larger than the server accepts: the two patients' are refused with 413
    // (the clinic's five entries pass).
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let output = run_haven(&[
        "demo",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--patients",
        "2",
        "--max-bundle-entries",
        "5",
    ])
    .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("the sample did not load; remove"), "{err}");
    assert!(err.contains("2 of the sample's bundles failed"), "{err}");
    assert!(err.contains("413"), "{err}");
    assert!(!data_dir.join("demo.json").exists());
    assert!(!data_dir.join("demo-loader-key.pem").exists());
}
