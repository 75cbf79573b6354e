//! The broken-resource corpus of `haven-model` (files named
//! `<what is wrong>@<expression>.json`), sent to the server: each is refused with 400
//! and an OperationOutcome whose issue points at the element at fault, and nothing
//! is stored.

#[path = "../../model/tests/broken/mod.rs"]
mod broken;
mod support;

use http::StatusCode;
use support::spawn_app;

#[tokio::test]
async fn every_broken_resource_is_refused_with_400_pointing_at_the_element() {
    let app = spawn_app().await;
    let mut cases = broken::cases(broken::SCHEMA_REJECTS);
    cases.extend(broken::cases(broken::BEYOND_SCHEMA));
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for broken::Case {
        name,
        expression,
        resource,
    } in &cases
    {
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
