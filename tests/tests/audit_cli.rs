//! The audit trail of the real binary: `haven audit verify` and
//! `AuditEvent/$verify` on a trail left by real requests, untouched and then
//! tampered with in the SQLite file by someone who can write to it, and the
//! administration commands (`haven keys rotate`, `haven clients add`, `haven
//! clients registration-token`, `haven users add`) leaving their records.
//!
//! The tampering goes through Python's `sqlite3` module, the SQLite client the
//! CI machine is sure to have. Like an attacker with access to the file, it
//! first drops the triggers that keep the audit tables append-only.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use haven_e2e::{haven_binary, run_haven, spawn_haven, Haven, HavenOptions};
use serde_json::{json, Value};

const SCOPE: &str = "system/Patient.cruds system/AuditEvent.rs";

/// The attacker: drops the append-only triggers, then changes, removes or
/// inserts the record at a position. `query` reads and `exec` runs SQL as given.
const TAMPER: &str = r#"
import hashlib, json, sqlite3, sys

db, action = sys.argv[1], sys.argv[2]
con = sqlite3.connect(db)
if action == "query":
    print(json.dumps([list(row) for row in con.execute(sys.argv[3])]))
    sys.exit(0)
if action == "exec":
    con.executescript(sys.argv[3])
    con.commit()
    sys.exit(0)
for trigger in ("audit_events_no_update", "audit_events_no_delete",
                "audit_index_no_update", "audit_index_no_delete"):
    con.execute("DROP TRIGGER IF EXISTS " + trigger)
k = int(sys.argv[3])
if action == "change":
    con.execute("UPDATE audit_events SET event = json_set(event, '$.outcome', '8') "
                "WHERE position = ?", (k,))
elif action == "remove":
    con.execute("DELETE FROM audit_index WHERE position = ?", (k,))
    con.execute("DELETE FROM audit_events WHERE position = ?", (k,))
elif action == "insert":
    # A forgery that knows the chain's formula: it links to the record before
    # it and hashes correctly, and the later records move up one position.
    previous, text, recorded = con.execute(
        "SELECT e.hash, n.event, n.recorded FROM audit_events e, audit_events n "
        "WHERE e.position = ? AND n.position = ?", (k - 1, k)).fetchone()
    event = json.loads(text)
    event["id"] = "forged-" + event["id"]
    event["outcomeDesc"] = "forged"
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256((previous + "\n" + canonical).encode()).hexdigest()
    # Two steps, so no position is taken twice on the way.
    con.execute("UPDATE audit_events SET position = position + 1000000 WHERE position >= ?", (k,))
    con.execute("UPDATE audit_events SET position = position - 999999 WHERE position > 1000000")
    con.execute("INSERT INTO audit_events (position, id, recorded, event, previous_hash, hash) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (k, event["id"], recorded, json.dumps(event), previous, digest))
else:
    sys.exit("unknown action " + action)
con.commit()
"#;

fn python() -> String {
    std::env::var("HAVEN_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn tamper_script(db: &Path, args: &[&str]) -> String {
    let output = Command::new(python())
        .arg("-c")
        .arg(TAMPER)
        .arg(db)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Changes, removes or inserts the record at `position`.
fn tamper(db: &Path, action: &str, position: u64) {
    tamper_script(db, &[action, &position.to_string()]);
}

/// The stored events in position order, as `(position, event)`.
fn stored_events(db: &Path) -> Vec<(u64, Value)> {
    let rows: Vec<(u64, String)> = serde_json::from_str(&tamper_script(
        db,
        &[
            "query",
            "SELECT position, event FROM audit_events ORDER BY position",
        ],
    ))
    .unwrap();
    rows.into_iter()
        .map(|(position, text)| (position, serde_json::from_str(&text).unwrap()))
        .collect()
}

/// `haven audit verify` on the database: its exit code and what it printed.
fn verify(db: &Path) -> (i32, String) {
    let url = format!("sqlite:{}", db.display());
    let output = run_haven(&["audit", "verify", "--database-url", &url]).unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().expect("an exit code"), printed)
}

/// The parameters of `AuditEvent/$verify`, by name, asked with a token for
/// this server (a restart moves the FHIR base, the tokens' audience).
async fn verify_over_http(haven: &Haven) -> Value {
    let token = haven.system_token(SCOPE).await.unwrap();
    let response = haven
        .client()
        .get(haven.url("AuditEvent/$verify"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", haven.log());
    let parameters: Value = response.json().await.unwrap();
    let mut by_name = serde_json::Map::new();
    for p in parameters["parameter"].as_array().unwrap() {
        let value = p
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, _)| k.starts_with("value"))
            .map(|(_, v)| v.clone())
            .unwrap();
        by_name.insert(p["name"].as_str().unwrap().to_owned(), value);
    }
    Value::Object(by_name)
}

/// A server's trail after a token request, two patients created, one read and
/// a search; the server is stopped.
struct History {
    dir: tempfile::TempDir,
    /// Where the record of reading the first patient is.
    read_at: u64,
}

impl History {
    fn db(&self) -> PathBuf {
        self.dir.path().join("haven.db")
    }

    async fn restart(&self) -> Haven {
        spawn_haven(HavenOptions {
            data_dir: Some(self.dir.path().to_path_buf()),
            ..HavenOptions::default()
        })
        .await
        .unwrap()
    }
}

async fn record_some_history() -> History {
    let mut haven = spawn_haven(HavenOptions::default()).await.unwrap();
    let token = haven.system_token(SCOPE).await.unwrap();
    let client = haven.client();
    let mut ids = Vec::new();
    for family in ["Shaw", "Field"] {
        let created = client
            .post(haven.url("Patient"))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .body(json!({"resourceType": "Patient", "name": [{"family": family}]}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201, "{}", haven.log());
        let body: Value = created.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let read = client
        .get(haven.url(&format!("Patient/{}", ids[0])))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let search = client
        .get(haven.url("Patient?family=Field"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(search.status(), 200);
    haven.terminate(Duration::from_secs(60)).unwrap();
    let dir = haven.keep_data_dir().unwrap();

    let read_of = format!("Patient/{}/_history/1", ids[0]);
    let read_at = stored_events(&dir.path().join("haven.db"))
        .into_iter()
        .find(|(_, e)| {
            e["subtype"][0]["code"] == "read"
                && e["entity"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["what"]["reference"] == read_of.as_str())
        })
        .map(|(position, _)| position)
        .expect("the read is on the trail");
    History { dir, read_at }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_record_is_named_by_the_command_and_by_the_verify_operation() {
    let history = record_some_history().await;
    let db = history.db();
    let stored = stored_events(&db);
    let (code, printed) = verify(&db);
    assert_eq!(code, 0, "{printed}");
    assert!(
        printed.starts_with(&format!(
            "audit trail verified: {} records, head ",
            stored.len()
        )),
        "{printed}"
    );
    let haven = history.restart().await;
    let untouched = verify_over_http(&haven).await;
    assert_eq!(untouched["verified"], true, "{untouched}");
    drop(haven);

    // The read now claims it was refused.
    tamper(&db, "change", history.read_at);
    let (code, printed) = verify(&db);
    assert_eq!(code, 1, "{printed}");
    assert!(
        printed.starts_with(&format!(
            "audit trail broken at record {}: changed",
            history.read_at
        )),
        "{printed}"
    );
    let haven = history.restart().await;
    let tampered = verify_over_http(&haven).await;
    assert_eq!(tampered["verified"], false, "{tampered}");
    assert_eq!(tampered["position"], history.read_at);
    assert_eq!(tampered["problem"], "changed");
    assert_eq!(tampered["records"], history.read_at - 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_record_is_named_at_the_record_after_the_gap() {
    let history = record_some_history().await;
    let db = history.db();
    // The read must not be the last record, or nothing would follow the gap.
    assert!(stored_events(&db).len() as u64 > history.read_at);
    tamper(&db, "remove", history.read_at);
    let (code, printed) = verify(&db);
    assert_eq!(code, 1, "{printed}");
    assert!(
        printed.starts_with(&format!(
            "audit trail broken at record {}: removed",
            history.read_at + 1
        )),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_record_slipped_into_the_middle_is_named_as_inserted() {
    let history = record_some_history().await;
    let db = history.db();
    let before = stored_events(&db).len();
    tamper(&db, "insert", history.read_at);
    let after = stored_events(&db);
    assert_eq!(after.len(), before + 1);
    assert_eq!(
        after[history.read_at as usize - 1].1["outcomeDesc"],
        "forged"
    );
    // The forgery links to the record before it, so the chain breaks at the
    // genuine record that used to follow that one.
    let (code, printed) = verify(&db);
    assert_eq!(code, 1, "{printed}");
    assert!(
        printed.starts_with(&format!(
            "audit trail broken at record {}: inserted",
            history.read_at + 1
        )),
        "{printed}"
    );
}

#[test]
fn rotating_the_signing_key_is_recorded_and_refused_when_it_cannot_be() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let db = dir.path().join("haven.db");
    let rotate = || run_haven(&["keys", "rotate", "--data-dir", data_dir]).unwrap();

    let rotated = rotate();
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let printed: Value = serde_json::from_slice(&rotated.stdout).unwrap();
    let kid = printed["kid"].as_str().unwrap();
    let events = stored_events(&db);
    let rotation = events
        .iter()
        .map(|(_, e)| e)
        .find(|e| e["subtype"][1]["code"] == "key-rotation")
        .expect("the rotation is on the trail");
    assert_eq!(rotation["outcome"], "0");
    assert!(
        rotation["outcomeDesc"].as_str().unwrap().contains(kid),
        "{rotation}"
    );
    assert_eq!(verify(&db).0, 0);

    // A trail that refuses new records, as a full disk would.
    tamper_script(
        &db,
        &[
            "exec",
            "CREATE TRIGGER refuse_all BEFORE INSERT ON audit_events \
             BEGIN SELECT RAISE(ABORT, 'disk full'); END",
        ],
    );
    let refused = rotate();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("could not be recorded"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// Runs `haven` with `stdin` as its standard input (a password).
fn run_haven_with_input(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(haven_binary().unwrap())
        .args(args)
        .env_remove("HAVEN_DATABASE_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn succeeded(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The recorded events with Haven's subtype `code`, oldest first.
fn events_of(db: &Path, code: &str) -> Vec<Value> {
    stored_events(db)
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| {
            e["subtype"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["system"] == "urn:haven:audit-event-subtype" && c["code"] == code)
        })
        .collect()
}

/// The `who.identifier.value` of every agent of an event.
fn agents(event: &Value) -> Vec<&str> {
    event["agent"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["who"]["identifier"]["value"].as_str())
        .collect()
}

#[test]
fn adding_a_client_issuing_a_registration_token_and_adding_a_user_are_recorded_in_a_trail_that_verifies(
) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let db = dir.path().join("haven.db");
    let password = "a-password-only-drjones-knows-4711";

    let client = succeeded(
        &run_haven(&[
            "clients",
            "add",
            "--data-dir",
            data_dir,
            "--name",
            "Growth Chart",
            "--redirect-uri",
            "https://app.test/callback",
            "--scope",
            "launch/patient patient/*.rs",
            "--public",
        ])
        .unwrap(),
    );
    let client_id = client["client_id"].as_str().unwrap();
    let issued = succeeded(
        &run_haven(&[
            "clients",
            "registration-token",
            "--data-dir",
            data_dir,
            "--hours",
            "2",
        ])
        .unwrap(),
    );
    let initial = issued["initial_access_token"].as_str().unwrap();
    let user = succeeded(&run_haven_with_input(
        &[
            "users",
            "add",
            "--data-dir",
            data_dir,
            "--username",
            "drjones",
            "--role",
            "practitioner",
        ],
        &format!("{password}\n"),
    ));
    assert_eq!(user["username"], "drjones");

    let registrations = events_of(&db, "client-registration");
    assert_eq!(registrations.len(), 3, "{registrations:?}");
    let added = &registrations[0];
    assert_eq!(added["outcome"], "0");
    assert_eq!(
        added["outcomeDesc"],
        format!("client added: {client_id} (Growth Chart)").as_str()
    );
    assert!(agents(added).contains(&"haven-cli"), "{added}");
    assert!(agents(added).contains(&client_id), "{added}");

    let token = &registrations[1];
    assert_eq!(
        token["outcomeDesc"],
        "initial access token issued for dynamic registration, usable for 2 hours"
    );
    let fingerprint: String =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, initial.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
    assert!(token.to_string().contains(&fingerprint), "{token}");

    let user_added = &registrations[2];
    assert_eq!(user_added["outcome"], "0");
    assert_eq!(
        user_added["outcomeDesc"],
        "user added: drjones (practitioner)"
    );
    assert!(agents(user_added).contains(&"haven-cli"), "{user_added}");

    let (code, printed) = verify(&db);
    assert_eq!(code, 0, "{printed}");
    assert!(
        printed.starts_with("audit trail verified: 3 records"),
        "{printed}"
    );
    let trail = serde_json::to_string(&stored_events(&db)).unwrap();
    assert!(!trail.contains(password), "the password is in the trail");
    assert!(
        !trail.contains(initial),
        "the initial access token is in the trail"
    );
}

#[test]
fn adding_a_user_or_a_client_fails_and_prints_no_secret_when_the_trail_refuses_records() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let db = dir.path().join("haven.db");
    // Listing the clients creates the database, and records nothing.
    succeeded(&run_haven(&["clients", "list", "--data-dir", data_dir]).unwrap());
    // A trail that refuses new records, as a full disk would.
    tamper_script(
        &db,
        &[
            "exec",
            "CREATE TRIGGER refuse_all BEFORE INSERT ON audit_events \
             BEGIN SELECT RAISE(ABORT, 'disk full'); END",
        ],
    );

    let user = run_haven_with_input(
        &[
            "users",
            "add",
            "--data-dir",
            data_dir,
            "--username",
            "nurse",
            "--role",
            "practitioner",
        ],
        "another-password-0815\n",
    );
    assert!(!user.status.success());
    let message = String::from_utf8_lossy(&user.stderr);
    assert!(
        message.contains("the user nurse was added, but the addition could not be recorded"),
        "{message}"
    );

    let client = run_haven(&[
        "clients",
        "add",
        "--data-dir",
        data_dir,
        "--name",
        "Confidential",
        "--redirect-uri",
        "https://app.test/callback",
        "--scope",
        "patient/*.rs",
        "--secret",
    ])
    .unwrap();
    assert!(!client.status.success());
    assert!(
        String::from_utf8_lossy(&client.stderr).contains("could not be recorded"),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    assert!(
        client.stdout.is_empty(),
        "something was printed: {}",
        String::from_utf8_lossy(&client.stdout)
    );
    let token = run_haven(&["clients", "registration-token", "--data-dir", data_dir]).unwrap();
    assert!(!token.status.success());
    assert!(token.stdout.is_empty());
}

#[test]
fn a_trail_that_cannot_be_read_is_not_reported_as_broken() {
    let (code, printed) = {
        let output = run_haven(&[
            "audit",
            "verify",
            "--database-url",
            "mysql://localhost/haven",
        ])
        .unwrap();
        (
            output.status.code().unwrap(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert_eq!(code, 2, "{printed}");
    assert!(printed.contains("error"), "{printed}");
}
