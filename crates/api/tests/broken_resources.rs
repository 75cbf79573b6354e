//! The broken-resource corpus of `haven-model` (files named
//! `<what is wrong>@<expression>.json`), sent to the server: each is refused with 400
//! and an OperationOutcome whose issue points at the element at fault, and nothing
//! is stored.

mod support;

use std::path::{Path, PathBuf};

use http::StatusCode;
use serde_json::Value;
use support::spawn_app;

fn corpus() -> Vec<(String, String, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/broken");
    let mut files: Vec<PathBuf> = [root.clone(), root.join("beyond-schema")]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).expect("corpus directory"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let expression = name
                .trim_end_matches(".json")
                .split_once('@')
                .map(|(_, e)| e.to_owned())
                .expect("the file names its expression");
            let text = std::fs::read_to_string(&path).expect("readable");
            (name, expression, serde_json::from_str(&text).expect("JSON"))
        })
        .collect()
}

#[tokio::test]
async fn every_broken_resource_is_refused_with_400_pointing_at_the_element() {
    let app = spawn_app().await;
    let cases = corpus();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for (name, expression, resource) in &cases {
        // An unknown or missing resourceType has no type endpoint; post to Patient.
        let resource_type = resource["resourceType"]
            .as_str()
            .filter(|t| haven_model::registry::is_resource_type(t))
            .unwrap_or("Patient");
        let reply = app.post(&format!("/fhir/{resource_type}"), resource).await;
        let pointed = reply.body["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|issue| {
                issue["expression"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| e.as_str() == Some(expression.as_str()))
            });
        if reply.status != StatusCode::BAD_REQUEST
            || reply.body["resourceType"] != "OperationOutcome"
            || !pointed
        {
            failures.push(format!("{name}: {} {}", reply.status, reply.body));
        }
    }
    let stored = app.store.count_by_type().await.expect("count");
    assert!(stored.is_empty(), "stored: {stored:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
