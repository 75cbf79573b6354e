//! A create that was answered 201 survives the process being killed at any moment.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use haven_e2e::{spawn_haven, HavenOptions, PostgresDatabase};
use serde_json::{json, Value};

/// How many clients write at once.
const WRITERS: usize = 4;
/// Acknowledged creates to wait for before the kill, so it lands mid-stream.
const CREATES_BEFORE_KILL: usize = 40;

async fn acknowledged_creates_survive_a_kill(database_url: Option<String>) {
    let mut haven = spawn_haven(HavenOptions {
        database_url: database_url.clone(),
        ..HavenOptions::default()
    })
    .await
    .unwrap();
    let data_dir = haven.keep_data_dir().unwrap();
    let client = haven.client();
    // Signing keys live in the data directory, so the token outlives the restart.
    let token = haven.system_token("system/*.cruds").await.unwrap();
    let url = haven.url("Patient");
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let patient = json!({
                    "resourceType": "Patient",
                    "name": [{"family": "Durable", "given": [format!("w{writer}n{n}")]}]
                });
                let Ok(response) = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/fhir+json")
                    .body(patient.to_string())
                    .send()
                    .await
                else {
                    // The server is gone; nothing more can be acknowledged.
                    break;
                };
                if response.status() != 201 {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    panic!("a create answered {status}: {body}");
                }
                let Ok(body) = response.json::<Value>().await else {
                    // The answer was cut off by the kill, so it never counted as acknowledged.
                    break;
                };
                let id = body["id"].as_str().expect("the created resource has an id");
                acknowledged.lock().unwrap().push(id.to_string());
            }
        }));
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while acknowledged.lock().unwrap().len() < CREATES_BEFORE_KILL {
        assert!(
            tokio::time::Instant::now() < deadline,
            "too few creates succeeded: {}",
            haven.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // SIGKILL while the writers are still sending.
    haven.kill();
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    drop(haven);

    let ids = acknowledged.lock().unwrap().clone();
    assert!(ids.len() >= CREATES_BEFORE_KILL);
    let restarted = spawn_haven(HavenOptions {
        data_dir: Some(data_dir.path().to_path_buf()),
        database_url,
        ..HavenOptions::default()
    })
    .await
    .unwrap();
    let client = restarted.client();
    // The restart binds another port, so its FHIR base (the tokens' audience) changed.
    let token = restarted.system_token("system/*.rs").await.unwrap();
    let mut lost = Vec::new();
    for id in &ids {
        let response = client
            .get(restarted.url(&format!("Patient/{id}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if response.status() != 200 {
            lost.push((id.clone(), response.status()));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged creates were lost: {lost:?}",
        lost.len(),
        ids.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_creates_survive_a_kill_on_sqlite() {
    acknowledged_creates_survive_a_kill(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_creates_survive_a_kill_on_postgres() {
    let database = match PostgresDatabase::create().unwrap() {
        Ok(database) => database,
        Err(reason) => {
            println!("not run: {reason}");
            return;
        }
    };
    acknowledged_creates_survive_a_kill(Some(database.url.clone())).await;
}
