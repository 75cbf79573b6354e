//! SMART's own Python client, `fhirclient` (pinned in `tests/python/requirements.txt`),
//! against a running haven: a standalone launch through the sign-in and consent
//! pages, and a Backend Services login with an RS384 key.
//!
//! The scripts in `tests/python/` run with `HAVEN_PYTHON`, the virtual environment
//! `.ci/run` prepares. Without it, or without fhirclient in it, the tests print
//! "not run" and pass, so `cargo test --workspace` works on a fresh machine.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use haven_e2e::{haven_binary, spawn_haven, workspace_root, Haven, HavenOptions};
use serde_json::{json, Value};

/// Longest one script may run; each needs about a second.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Nothing listens there: the browser stops at it and hands the URL to the app.
const REDIRECT_URI: &str = "http://127.0.0.1:9/callback";
const PASSWORD: &str = "amy-password-42";

/// The Python that can import fhirclient, or why these tests cannot run.
fn python() -> Result<PathBuf, String> {
    let Some(value) = std::env::var_os("HAVEN_PYTHON") else {
        return Err("HAVEN_PYTHON is not set".into());
    };
    let python = workspace_root().join(value);
    match Command::new(&python)
        .args(["-c", "import fhirclient"])
        .output()
    {
        Ok(probe) if probe.status.success() => Ok(python),
        Ok(probe) => Err(format!(
            "{} cannot import fhirclient: {}",
            python.display(),
            String::from_utf8_lossy(&probe.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        )),
        Err(e) => Err(format!("{} does not run: {e}", python.display())),
    }
}

/// Runs a script in `tests/python/` with `input` on standard input, trusting the
/// server's CA; it must succeed within [`SCRIPT_TIMEOUT`] and print one JSON object.
fn run_script(python: &Path, haven: &Haven, script: &str, args: &[&str], input: &str) -> Value {
    // Files rather than pipes, so a chatty script cannot block while we wait.
    let out = tempfile::tempdir().unwrap();
    let stdout_path = out.path().join("stdout");
    let stderr_path = out.path().join("stderr");
    let mut child = Command::new(python)
        .arg(workspace_root().join("tests/python").join(script))
        .args(args)
        // requests prefers this to a session's `verify`, so every session, fhirclient's
        // too, trusts exactly this CA, whatever the environment had set.
        .env("REQUESTS_CA_BUNDLE", haven.ca_file())
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > SCRIPT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{script} did not finish within {SCRIPT_TIMEOUT:?}:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        status.success(),
        "{script} failed ({status}):\n{stderr}\nhaven's log:\n{}",
        haven.log()
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{script} printed no JSON ({e}):\n{stdout}\n{stderr}"))
}

/// Runs `haven <group> --data-dir <the server's> <args>` beside the running server
/// and returns the JSON it prints.
fn admin(haven: &Haven, group: &str, args: &[&str], input: &str) -> Value {
    let mut command = Command::new(haven_binary().unwrap());
    command
        .arg(group)
        .arg("--data-dir")
        .arg(&haven.data_dir)
        .args(args);
    // Like the server, the command must see only the data directory it is given.
    for (key, _) in std::env::vars() {
        if key.starts_with("HAVEN_") && key != "HAVEN_LOG" {
            command.env_remove(key);
        }
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "haven {group} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Two patients with one Observation each, with known ids.
fn records() -> Value {
    let patient = |id: &str, given: &[&str], family: &str, born: &str| {
        json!({
            "resource": {
                "resourceType": "Patient",
                "id": id,
                "name": [{"given": given, "family": family}],
                "birthDate": born
            },
            "request": {"method": "PUT", "url": format!("Patient/{id}")}
        })
    };
    let weight = |patient: &str, kg: f64| {
        let id = format!("{patient}-weight");
        json!({
            "resource": {
                "resourceType": "Observation",
                "id": id,
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                "subject": {"reference": format!("Patient/{patient}")},
                "valueQuantity": {
                    "value": kg,
                    "unit": "kg",
                    "system": "http://unitsofmeasure.org",
                    "code": "kg"
                }
            },
            "request": {"method": "PUT", "url": format!("Observation/{id}")}
        })
    };
    json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            patient("amy", &["Amy", "V."], "Shaw", "1987-02-20"),
            patient("ben", &["Ben"], "Cole", "1990-05-01"),
            weight("amy", 61.5),
            weight("ben", 80.0)
        ]
    })
}

/// A running server with [`records`], loaded by `haven load` with a Backend
/// Services client of the harness.
async fn haven_with_records() -> Haven {
    let haven = spawn_haven(HavenOptions::default()).await.unwrap();
    let loader = haven.register_backend_client("system/*.cruds").unwrap();
    let bundle = haven.data_dir.join("records.json");
    std::fs::write(&bundle, records().to_string()).unwrap();
    let output = haven
        .load_command(&bundle, &loader)
        .unwrap()
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("4 resources"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    haven
}

fn scope_set(scope: &Value) -> std::collections::BTreeSet<&str> {
    scope.as_str().unwrap_or_default().split(' ').collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn fhirclient_completes_a_standalone_launch_through_the_sign_in_and_consent_pages() {
    let python = match python() {
        Ok(python) => python,
        Err(reason) => {
            println!("not run: {reason}");
            return;
        }
    };
    let haven = &haven_with_records().await;
    let app = admin(
        haven,
        "clients",
        &[
            "add",
            "--name",
            "Py App",
            "--redirect-uri",
            REDIRECT_URI,
            "--scope",
            "launch/patient openid fhirUser offline_access patient/*.rs",
            "--public",
        ],
        "",
    );
    admin(
        haven,
        "users",
        &[
            "add",
            "--username",
            "amy",
            "--role",
            "patient",
            "--fhir-user",
            "Patient/amy",
        ],
        PASSWORD,
    );

    let seen = run_script(
        &python,
        haven,
        "standalone_launch.py",
        &[
            "--base",
            &haven.announced_base_url,
            "--client-id",
            app["client_id"].as_str().unwrap(),
            "--redirect-uri",
            REDIRECT_URI,
            "--username",
            "amy",
            "--scope",
            "openid fhirUser offline_access patient/*.rs",
            "--other-patient",
            "ben",
        ],
        PASSWORD,
    );

    // fhirclient made the PKCE challenge and asked for the patient context itself.
    assert_eq!(
        seen["pkce"],
        json!({"method": "S256", "challenge_length": 43})
    );
    let wanted = [
        "launch/patient",
        "openid",
        "fhirUser",
        "offline_access",
        "patient/*.rs",
    ];
    assert_eq!(scope_set(&seen["requested_scope"]), wanted.into());
    let paths: Vec<&Value> = seen["pages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["path"])
        .collect();
    assert_eq!(paths, ["/auth/login", "/auth/consent"], "{seen}");
    assert_eq!(seen["pages"][1]["heading"], "Allow Py App access?");
    assert_eq!(seen["consent"]["patient"], "Amy V. Shaw");
    assert_eq!(seen["consent"]["scopes"], json!(wanted));
    let described = seen["consent"]["descriptions"].as_array().unwrap();
    assert!(
        described
            .iter()
            .all(|d| d.as_str().is_some_and(|d| !d.is_empty())),
        "{seen}"
    );
    // The browser holds its sign-in session, the sign-in form's CSRF token and
    // the secret binding the authorization request to it.
    let cookies: Vec<&str> = seen["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(cookies.contains(&"haven_session"), "{seen}");
    assert!(cookies.contains(&"haven_csrf"), "{seen}");
    assert!(
        cookies.iter().any(|c| c.starts_with("haven_req_")),
        "{seen}"
    );
    assert_eq!(seen["callback_has_code"], true);

    assert_eq!(scope_set(&seen["granted_scope"]), wanted.into());
    assert_eq!(seen["patient_id"], "amy");
    assert_eq!(seen["patient_name"], "Amy V. Shaw");
    assert_eq!(seen["birth_date"], "1987-02-20");
    // The token confines the search to Amy's compartment.
    assert_eq!(
        seen["observations"],
        json!([["amy-weight", "Patient/amy", 61.5]])
    );
    assert!(
        seen["other_patient"]
            .as_str()
            .is_some_and(|s| s.starts_with("refused")),
        "{seen}"
    );
    assert_eq!(seen["has_refresh_token"], true);
    assert_eq!(seen["refreshed"], true);
    assert_eq!(seen["name_after_refresh"], "Amy V. Shaw");
}

#[tokio::test(flavor = "multi_thread")]
async fn fhirclient_reads_with_a_backend_services_token_from_an_rs384_key() {
    let python = match python() {
        Ok(python) => python,
        Err(reason) => {
            println!("not run: {reason}");
            return;
        }
    };
    let haven = &haven_with_records().await;
    // The app makes its own key and JWK, as a third party would, and registers it.
    let keys = tempfile::tempdir().unwrap();
    let key = run_script(
        &python,
        haven,
        "backend_services.py",
        &["keygen", "--out", keys.path().to_str().unwrap()],
        "",
    );
    let client = admin(
        haven,
        "clients",
        &[
            "add",
            "--name",
            "Py Backend",
            "--backend",
            "--jwks",
            key["jwks"].as_str().unwrap(),
            "--scope",
            "system/*.rs system/*.cruds",
            "--organization",
            "Acme",
            "--contact",
            "ops@acme.test",
        ],
        "",
    );
    assert_eq!(client["jwks"]["keys"][0]["kid"], key["kid"]);

    let seen = run_script(
        &python,
        haven,
        "backend_services.py",
        &[
            "read",
            "--base",
            &haven.announced_base_url,
            "--client-id",
            client["client_id"].as_str().unwrap(),
            "--private-key",
            key["private_key"].as_str().unwrap(),
            "--patient",
            "amy",
        ],
        "",
    );

    assert_eq!(seen["token_type"], "Bearer");
    // Registered for system/*.cruds too, but granted only what was asked.
    assert_eq!(seen["granted_scope"], "system/*.rs");
    assert_eq!(seen["refresh_token"], false);
    assert_eq!(seen["patient_name"], "Amy V. Shaw");
    assert_eq!(
        seen["observations"],
        json!([["amy-weight", "Patient/amy"], ["ben-weight", "Patient/ben"]])
    );
    assert_eq!(seen["patients"], json!(["amy", "ben"]));
    assert_eq!(seen["write"], "refused with 403");
}
