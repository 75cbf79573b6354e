//! Every official R4 example that the official JSON schema accepts can be stored with
//! `PUT` and read back unchanged apart from the `meta` fields the server owns.

#[path = "../../model/tests/official/mod.rs"]
mod official;
mod support;

use serde_json::Value;
use support::spawn_app;

/// The resource without `meta.versionId` and `meta.lastUpdated`, which the server sets.
fn without_server_meta(resource: &Value) -> Value {
    let mut resource = resource.clone();
    if let Some(meta) = resource.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            resource.as_object_mut().map(|r| r.remove("meta"));
        }
    }
    resource
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_official_example_the_schema_accepts_is_stored_and_read_back_unchanged() {
    let Some(files) = official::example_files() else {
        println!("not run: HAVEN_SHARED is not set");
        return;
    };

    // The schema check is CPU-bound; run it off the async workers.
    let accepted: Vec<(String, Value)> = tokio::task::spawn_blocking(move || {
        let schema = official::schema().expect("HAVEN_SHARED is set");
        files
            .iter()
            .filter_map(|path| {
                let text = std::fs::read_to_string(path).ok()?;
                let resource: Value = serde_json::from_str(&text).ok()?;
                schema.is_valid(&resource).then(|| {
                    let name = path.file_name().unwrap_or_default().to_string_lossy();
                    (name.into_owned(), resource)
                })
            })
            .collect()
    })
    .await
    .expect("schema check");
    assert!(accepted.len() > 4000, "only {} examples", accepted.len());

    let app = spawn_app().await;
    let mut failures = Vec::new();
    let mut refused_audit_events = 0;
    for (name, resource) in &accepted {
        let resource_type = resource["resourceType"].as_str().expect("resourceType");
        if resource_type == "AuditEvent" {
            // The audit trail is the server's own and append-only: no client writes it.
            let reply = app.post("/fhir/AuditEvent", resource).await;
            if reply.status != http::StatusCode::METHOD_NOT_ALLOWED {
                failures.push(format!("{name}: POST AuditEvent answered {}", reply.status));
            }
            refused_audit_events += 1;
            continue;
        }
        let path = match resource.get("id").and_then(Value::as_str) {
            Some(id) => {
                let path = format!("/fhir/{resource_type}/{id}");
                let reply = app.put(&path, resource).await;
                if !reply.status.is_success() {
                    failures.push(format!("{name}: PUT {}: {}", reply.status, reply.body));
                    continue;
                }
                path
            }
            None => {
                let reply = app.post(&format!("/fhir/{resource_type}"), resource).await;
                if !reply.status.is_success() {
                    failures.push(format!("{name}: POST {}: {}", reply.status, reply.body));
                    continue;
                }
                let id = reply.body["id"].as_str().unwrap_or_default();
                format!("/fhir/{resource_type}/{id}")
            }
        };
        let read = app.get(&path).await;
        if !read.status.is_success() {
            failures.push(format!("{name}: GET {}", read.status));
            continue;
        }
        let mut sent = without_server_meta(resource);
        if let (Some(sent), Some(id)) = (sent.as_object_mut(), read.body.get("id")) {
            sent.insert("id".into(), id.clone());
        }
        if without_server_meta(&read.body) != sent {
            failures.push(format!("{name}: read back differently"));
        }
    }
    assert!(refused_audit_events > 0, "the examples include AuditEvents");
    println!(
        "{} examples accepted by the schema, {} AuditEvents refused as they must be, {} stored and read back unchanged",
        accepted.len(),
        refused_audit_events,
        accepted.len() - failures.len() - refused_audit_events
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
