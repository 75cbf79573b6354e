//! The FHIR API as a client sees it: every interaction and every error path,
//! through `router(...)` over a fresh SQLite store per test.

mod support;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use haven_api::interaction::Interaction;
use haven_api::pipeline::{
    Authenticator, Authorizer, Principal, Recorder, RequestHead, RequestRecord,
};
use haven_api::{ApiError, SecurityStages};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::{patient, request, spawn_app, spawn_app_secured, spawn_app_with, BASE};

// ---- metadata, negotiation, routing ----

#[tokio::test]
async fn metadata_describes_an_r4_json_server_with_its_interactions() {
    let app = spawn_app().await;
    let reply = app.get("/fhir/metadata").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("content-type"),
        Some("application/fhir+json; charset=utf-8")
    );
    let cs = &reply.body;
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    assert_eq!(cs["kind"], "instance");
    assert_eq!(cs["status"], "active");
    assert_eq!(cs["software"]["name"], "Haven");
    assert_eq!(cs["implementation"]["url"], BASE);
    let rest = &cs["rest"][0];
    let patient = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .expect("Patient is listed");
    assert_eq!(patient["versioning"], "versioned-update");
    assert_eq!(patient["conditionalCreate"], true);
    assert_eq!(patient["updateCreate"], true);
    let params: Vec<&str> = patient["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(params[..2], ["_id", "_lastUpdated"]);
    for evaluated in [
        "identifier",
        "family",
        "birthdate",
        "general-practitioner",
        "_tag",
    ] {
        assert!(params.contains(&evaluated), "{evaluated} in {params:?}");
    }
    assert!(!params.contains(&"_text"), "not supported, so not promised");
    let audit = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "AuditEvent")
        .expect("AuditEvent is listed");
    assert_eq!(
        audit["interaction"],
        json!([{"code": "read"}, {"code": "vread"}, {"code": "search-type"}])
    );
    let system: Vec<&str> = rest["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    assert!(system.contains(&"transaction") && system.contains(&"batch"));
}

#[tokio::test]
async fn an_xml_accept_header_is_refused_with_406() {
    let app = spawn_app().await;
    let reply = app
        .get_with_header("/fhir/metadata", "accept", "application/fhir+xml")
        .await;
    assert_eq!(reply.status, StatusCode::NOT_ACCEPTABLE);
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
    let reply = app.get("/fhir/metadata?_format=xml").await;
    assert_eq!(reply.status, StatusCode::NOT_ACCEPTABLE);
    let reply = app.get("/fhir/metadata?_format=json").await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn an_xml_body_is_refused_with_415() {
    let app = spawn_app().await;
    let reply = app
        .send(
            request(Method::POST, "/fhir/Patient")
                .header("content-type", "application/fhir+xml")
                .body(Body::from("<Patient/>"))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(reply.issue_code(), "not-supported");
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_sane_client_one_is_echoed() {
    let app = spawn_app().await;
    let reply = app
        .get_with_header("/fhir/metadata", "x-request-id", "client-42")
        .await;
    assert_eq!(reply.header("x-request-id"), Some("client-42"));
    let reply = app.get("/fhir/Patient/unknown").await;
    assert_eq!(reply.header("x-request-id").map(str::len), Some(36));
}

#[tokio::test]
async fn an_unknown_resource_type_is_404_not_supported() {
    let app = spawn_app().await;
    let reply = app.get("/fhir/Spaceship/1").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.issue_code(), "not-supported");
}

#[tokio::test]
async fn a_path_outside_the_fhir_base_is_404_with_an_operation_outcome() {
    let app = spawn_app().await;
    let reply = app.get("/nowhere").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
    assert!(reply.header("x-request-id").is_some());
}

#[tokio::test]
async fn an_invalid_id_in_the_url_is_400() {
    let app = spawn_app().await;
    let reply = app.get("/fhir/Patient/not_valid!").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unsupported_interactions_on_valid_paths_are_405() {
    let app = spawn_app().await;
    let reply = app.put("/fhir/Patient", &patient("A", None)).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.issue_code(), "not-supported");
    let reply = app.delete("/fhir/Patient/a/_history/1").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    let reply = app.delete("/fhir/Patient").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
}

// ---- limits ----

#[tokio::test]
async fn duplicate_json_keys_are_refused_with_400() {
    let app = spawn_app().await;
    let reply = app
        .send(
            request(Method::POST, "/fhir/Patient")
                .header("content-type", "application/fhir+json")
                .body(Body::from(
                    r#"{"resourceType":"Patient","gender":"male","gender":"female"}"#,
                ))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.body["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("duplicate key"));
    assert_eq!(app.count("Patient").await, 0);
}

#[tokio::test]
async fn json_nested_too_deeply_is_refused_with_400() {
    let app = spawn_app_with(|c| c.limits.max_json_depth = 8).await;
    let mut deep = json!("x");
    for _ in 0..10 {
        deep = json!({ "extension": [deep] });
    }
    let body = json!({"resourceType": "Patient", "extension": [deep]});
    let reply = app.post("/fhir/Patient", &body).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.body["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("nesting"));
}

#[tokio::test]
async fn a_body_over_the_size_limit_is_refused_with_413() {
    let app = spawn_app_with(|c| c.limits.max_body_bytes = 1000).await;
    let mut p = patient("A", None);
    p["text"] = json!({"status": "generated", "div": format!("<div>{}</div>", "x".repeat(2000))});
    let reply = app.post("/fhir/Patient", &p).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.issue_code(), "too-long");
}

#[tokio::test]
async fn headers_over_the_size_limit_are_refused_with_431() {
    let app = spawn_app_with(|c| c.limits.max_header_bytes = 500).await;
    let reply = app
        .send(
            request(Method::GET, "/fhir/metadata")
                .header("x-filler", "y".repeat(600))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
}

#[tokio::test]
async fn a_bundle_with_too_many_entries_is_refused_with_413() {
    let app = spawn_app_with(|c| c.limits.max_bundle_entries = 2).await;
    let entry = json!({"request": {"method": "GET", "url": "metadata"}});
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [entry, entry, entry]});
    let reply = app.post("/fhir", &bundle).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
}

/// An authenticator that takes its time, to run past the request timeout.
#[derive(Debug)]
struct SlowAuthenticator;

#[async_trait::async_trait]
impl Authenticator for SlowAuthenticator {
    async fn authenticate(&self, _: &RequestHead<'_>) -> Result<Principal, ApiError> {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        Ok(Principal::default())
    }
}

#[derive(Debug)]
struct PanickingAuthenticator;

#[async_trait::async_trait]
impl Authenticator for PanickingAuthenticator {
    async fn authenticate(&self, _: &RequestHead<'_>) -> Result<Principal, ApiError> {
        panic!("a bug in a stage");
    }
}

#[tokio::test]
async fn a_panic_in_the_pipeline_is_answered_with_500_and_an_operation_outcome() {
    let security = SecurityStages {
        authenticator: Arc::new(PanickingAuthenticator),
        ..SecurityStages::allow_all()
    };
    let app = spawn_app_secured(|_| {}, security).await;
    let reply = app.get("/fhir/metadata").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
    assert_eq!(reply.issue_code(), "exception");
    assert!(!reply.body.to_string().contains("a bug in a stage"));
}

#[tokio::test]
async fn a_request_that_runs_too_long_is_503_with_a_timeout_issue() {
    let security = SecurityStages {
        authenticator: Arc::new(SlowAuthenticator),
        ..SecurityStages::allow_all()
    };
    let app = spawn_app_secured(
        |c| c.limits.request_timeout = std::time::Duration::from_millis(50),
        security,
    )
    .await;
    let reply = app.post("/fhir/Patient", &patient("Slow", None)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.issue_code(), "timeout");
    assert_eq!(app.count("Patient").await, 0);
}

// ---- the security stages ----

/// Remembers what the record stage was told.
#[derive(Debug, Default)]
struct Journal {
    seen: Mutex<Vec<(String, u16)>>,
    fail: bool,
}

#[async_trait::async_trait]
impl Recorder for Journal {
    fn store_for(
        &self,
        store: Arc<dyn haven_store::Store>,
        _: &Principal,
        _: &Interaction,
        _: &Arc<haven_api::record::RequestAudit>,
    ) -> Arc<dyn haven_store::Store> {
        store
    }

    async fn record(&self, record: &RequestRecord<'_>) -> Result<(), ApiError> {
        let name = record.interaction.map_or("-", |i| i.name()).to_owned();
        self.seen
            .lock()
            .unwrap()
            .push((name, record.status.as_u16()));
        if self.fail {
            return Err(ApiError::Internal("the audit store is down".into()));
        }
        Ok(())
    }
}

/// Refuses every Patient write, as a scope check would.
#[derive(Debug)]
struct NoPatientWrites;

#[async_trait::async_trait]
impl Authorizer for NoPatientWrites {
    async fn authorize(&self, _: &Principal, what: &Interaction) -> Result<(), ApiError> {
        if what.writes() && what.resource_type() == Some("Patient") {
            return Err(ApiError::Forbidden("no scope to write Patient".into()));
        }
        Ok(())
    }

    fn guard(&self, _: &Principal) -> Arc<dyn haven_api::guard::ContentGuard> {
        Arc::new(haven_api::guard::Unguarded)
    }
}

#[tokio::test]
async fn the_record_stage_sees_every_request_including_refused_ones() {
    let journal = Arc::new(Journal::default());
    let security = SecurityStages {
        recorder: journal.clone(),
        ..SecurityStages::allow_all()
    };
    let app = spawn_app_secured(|_| {}, security).await;
    app.get("/fhir/metadata").await;
    app.get("/fhir/Patient/nobody").await;
    app.get("/fhir/Spaceship").await;
    let seen = journal.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            ("capabilities".to_owned(), 200),
            ("read".to_owned(), 404),
            ("-".to_owned(), 404)
        ]
    );
}

#[tokio::test]
async fn a_request_whose_record_cannot_be_stored_fails() {
    let journal = Arc::new(Journal {
        fail: true,
        ..Journal::default()
    });
    let security = SecurityStages {
        recorder: journal,
        ..SecurityStages::allow_all()
    };
    let app = spawn_app_secured(|_| {}, security).await;
    let reply = app.get("/fhir/metadata").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!reply.body.to_string().contains("audit store"));
}

#[tokio::test]
async fn bundle_entries_pass_the_authorization_stage_one_by_one() {
    let security = SecurityStages {
        authorizer: Arc::new(NoPatientWrites),
        ..SecurityStages::allow_all()
    };
    let app = spawn_app_secured(|_| {}, security).await;
    let direct = app.post("/fhir/Patient", &patient("A", None)).await;
    assert_eq!(direct.status, StatusCode::FORBIDDEN);
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient("A", None), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "metadata"}},
    ]});
    let reply = app.post("/fhir", &batch).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.body["entry"][0]["response"]["status"],
        "403 Forbidden"
    );
    assert_eq!(reply.body["entry"][1]["response"]["status"], "200 OK");
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("A", None), "request": {"method": "POST", "url": "Patient"}},
    ]});
    assert_eq!(app.post("/fhir", &tx).await.status, StatusCode::FORBIDDEN);
    assert_eq!(app.count("Patient").await, 0);
}

// ---- create, read, vread ----

#[tokio::test]
async fn creating_a_patient_assigns_an_id_and_answers_201_with_location_and_etag() {
    let app = spawn_app().await;
    let mut p = patient("Chalmers", None);
    p["id"] = json!("client-chosen");
    let reply = app.post("/fhir/Patient", &p).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let id = reply.body["id"].as_str().unwrap();
    assert_ne!(id, "client-chosen");
    assert_eq!(
        reply.header("location").unwrap(),
        format!("{BASE}/Patient/{id}/_history/1")
    );
    assert_eq!(reply.header("etag"), Some("W/\"1\""));
    assert!(reply.header("last-modified").unwrap().ends_with("GMT"));
    assert_eq!(reply.body["meta"]["versionId"], "1");
    assert_eq!(reply.body["name"][0]["family"], "Chalmers");
}

#[tokio::test]
async fn prefer_return_minimal_and_operation_outcome_shape_the_create_answer() {
    let app = spawn_app().await;
    let reply = app
        .send(
            request(Method::POST, "/fhir/Patient")
                .header("content-type", "application/fhir+json")
                .header("prefer", "return=minimal")
                .body(Body::from(patient("A", None).to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.body, Value::Null);
    assert!(reply.header("location").is_some());
    let reply = app
        .send(
            request(Method::POST, "/fhir/Patient")
                .header("content-type", "application/fhir+json")
                .header("prefer", "return=OperationOutcome")
                .body(Body::from(patient("A", None).to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
}

#[tokio::test]
async fn creating_with_a_resource_type_other_than_the_url_is_400() {
    let app = spawn_app().await;
    let reply = app.post("/fhir/Observation", &patient("A", None)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(app.count("Patient").await, 0);
}

#[tokio::test]
async fn an_invalid_resource_is_refused_with_400_and_a_fhirpath_expression() {
    let app = spawn_app().await;
    let mut p = patient("A", None);
    p["birthDate"] = json!("yesterday");
    let reply = app.post("/fhir/Patient", &p).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let expressions = reply.body["issue"][0]["expression"].to_string();
    assert!(expressions.contains("birthDate"), "{}", reply.body);
}

#[tokio::test]
async fn invalid_json_is_refused_with_400() {
    let app = spawn_app().await;
    let reply = app
        .send(
            request(Method::POST, "/fhir/Patient")
                .header("content-type", "application/fhir+json")
                .body(Body::from("{\"resourceType\": "))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
}

#[tokio::test]
async fn reading_an_unknown_patient_is_404_with_an_operation_outcome() {
    let app = spawn_app().await;
    let reply = app.get("/fhir/Patient/nobody").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.issue_code(), "not-found");
}

#[tokio::test]
async fn reading_answers_the_current_version_with_etag_and_last_modified() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let reply = app.get(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["id"], id.as_str());
    assert_eq!(reply.header("etag"), Some("W/\"1\""));
    assert_eq!(
        reply.header("last-modified"),
        Some("Thu, 01 Jan 2026 12:00:00 GMT")
    );
}

#[tokio::test]
async fn a_conditional_read_of_an_unchanged_resource_is_304() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let path = format!("/fhir/Patient/{id}");
    let reply = app.get_with_header(&path, "if-none-match", "W/\"1\"").await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    let reply = app
        .get_with_header(&path, "if-modified-since", "Thu, 01 Jan 2026 12:00:00 GMT")
        .await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    let reply = app
        .get_with_header(&path, "if-modified-since", "Wed, 31 Dec 2025 12:00:00 GMT")
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn reading_a_deleted_patient_is_410_and_its_versions_stay_readable() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let reply = app.delete(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("etag"), Some("W/\"2\""));
    let reply = app.get(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(reply.status, StatusCode::GONE);
    assert_eq!(reply.issue_code(), "deleted");
    let reply = app.get(&format!("/fhir/Patient/{id}/_history/1")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["name"][0]["family"], "A");
    let reply = app.get(&format!("/fhir/Patient/{id}/_history/2")).await;
    assert_eq!(reply.status, StatusCode::GONE);
    let reply = app.get(&format!("/fhir/Patient/{id}/_history/3")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_conditional_create_sent_twice_creates_one_resource() {
    let app = spawn_app().await;
    let send = || {
        app.send(
            request(Method::POST, "/fhir/Patient")
                .header("content-type", "application/fhir+json")
                .header("if-none-exist", "identifier=http://mrn|123")
                .body(Body::from(
                    patient("A", Some(("http://mrn", "123"))).to_string(),
                ))
                .unwrap(),
        )
    };
    let first = send().await;
    assert_eq!(first.status, StatusCode::CREATED);
    let second = send().await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body["id"], first.body["id"]);
    assert_eq!(app.count("Patient").await, 1);
}

#[tokio::test]
async fn a_conditional_create_matching_several_resources_is_412() {
    let app = spawn_app().await;
    app.create(&patient("A", Some(("http://mrn", "1")))).await;
    app.create(&patient("B", Some(("http://mrn", "1")))).await;
    let reply = app
        .send(
            request(Method::POST, "/fhir/Patient")
                .header("content-type", "application/fhir+json")
                .header("if-none-exist", "identifier=http://mrn|1")
                .body(Body::from(patient("C", None).to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(reply.issue_code(), "multiple-matches");
}

// ---- update ----

fn with_id(mut resource: Value, id: &str) -> Value {
    resource["id"] = json!(id);
    resource
}

#[tokio::test]
async fn updating_makes_a_new_version() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let reply = app
        .put(
            &format!("/fhir/Patient/{id}"),
            &with_id(patient("B", None), &id),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("etag"), Some("W/\"2\""));
    assert_eq!(reply.body["name"][0]["family"], "B");
    assert_eq!(
        reply.header("location").unwrap(),
        format!("{BASE}/Patient/{id}/_history/2")
    );
}

#[tokio::test]
async fn updating_with_a_body_id_different_from_the_url_is_400() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let reply = app
        .put(
            &format!("/fhir/Patient/{id}"),
            &with_id(patient("B", None), "other"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = app
        .put(&format!("/fhir/Patient/{id}"), &patient("B", None))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn updating_an_unknown_id_creates_it_with_201() {
    let app = spawn_app().await;
    let reply = app
        .put(
            "/fhir/Patient/chosen-1",
            &with_id(patient("A", None), "chosen-1"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.header("etag"), Some("W/\"1\""));
    assert_eq!(
        app.get("/fhir/Patient/chosen-1").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn updating_with_a_stale_if_match_is_refused_with_412() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let path = format!("/fhir/Patient/{id}");
    let put = |etag: &'static str, family: &str| {
        request(Method::PUT, &path)
            .header("content-type", "application/fhir+json")
            .header("if-match", etag)
            .body(Body::from(with_id(patient(family, None), &id).to_string()))
            .unwrap()
    };
    assert_eq!(app.send(put("W/\"1\"", "B")).await.status, StatusCode::OK);
    let stale = app.send(put("W/\"1\"", "C")).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(app.get(&path).await.body["name"][0]["family"], "B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_if_match_updates_of_one_version_give_one_200_and_one_412() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let path = format!("/fhir/Patient/{id}");
    let put = |family: &str| {
        request(Method::PUT, &path)
            .header("content-type", "application/fhir+json")
            .header("if-match", "W/\"1\"")
            .body(Body::from(with_id(patient(family, None), &id).to_string()))
            .unwrap()
    };
    let (a, b) = tokio::join!(app.send(put("B")), app.send(put("C")));
    let mut statuses = [a.status.as_u16(), b.status.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 412]);
    assert_eq!(app.get(&path).await.header("etag"), Some("W/\"2\""));
}

#[tokio::test]
async fn a_conditional_update_creates_then_updates_and_refuses_several_matches() {
    let app = spawn_app().await;
    let path = "/fhir/Patient?identifier=http://mrn|7";
    let first = app
        .put(path, &patient("A", Some(("http://mrn", "7"))))
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let second = app
        .put(path, &patient("B", Some(("http://mrn", "7"))))
        .await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body["id"], first.body["id"]);
    assert_eq!(second.header("etag"), Some("W/\"2\""));
    app.create(&patient("C", Some(("http://mrn", "7")))).await;
    let third = app
        .put(path, &patient("D", Some(("http://mrn", "7"))))
        .await;
    assert_eq!(third.status, StatusCode::PRECONDITION_FAILED);
}

#[tokio::test]
async fn a_conditional_update_matching_nothing_never_overwrites_the_bodys_existing_id() {
    let app = spawn_app().await;
    let unrelated = app.create(&patient("Unrelated", None)).await;
    let body = with_id(patient("Intruder", Some(("http://mrn", "new"))), &unrelated);
    let reply = app
        .put("/fhir/Patient?identifier=http://mrn|new", &body)
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.body);
    assert_eq!(reply.issue_code(), "conflict");
    let read = app.get(&format!("/fhir/Patient/{unrelated}")).await;
    assert_eq!(read.body["name"][0]["family"], "Unrelated");
    assert_eq!(read.header("etag"), Some("W/\"1\""));
}

#[tokio::test]
async fn a_search_with_count_zero_gives_the_total_and_no_paging_links() {
    let app = spawn_app().await;
    app.create(&patient("A", None)).await;
    app.create(&patient("B", None)).await;
    let reply = app.get("/fhir/Patient?_count=0&_total=accurate").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["total"], 2);
    assert!(reply.body.get("entry").is_none());
    let relations: Vec<&str> = reply.body["link"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["relation"].as_str().unwrap())
        .collect();
    assert_eq!(relations, ["self"]);
}

#[tokio::test]
async fn an_offset_beyond_what_a_database_can_count_is_400() {
    let app = spawn_app().await;
    let reply = app.get("/fhir/Patient?_offset=9223372036854775808").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
    let reply = app.get("/fhir/Patient?_offset=9223372036854775807").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
}

#[tokio::test]
async fn history_at_a_day_returns_every_version_current_during_that_day() {
    // The test clock starts at 2026-01-01T12:00Z.
    let app = spawn_app().await;
    let id = app.create(&patient("Morning", None)).await;
    app.clock.advance(time::Duration::hours(1));
    let reply = app
        .put(
            &format!("/fhir/Patient/{id}"),
            &with_id(patient("Afternoon", None), &id),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let versions = |reply: &support::Reply| -> Vec<String> {
        reply.body["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                e["resource"]["meta"]["versionId"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    let day = app
        .get(&format!("/fhir/Patient/{id}/_history?_at=2026-01-01"))
        .await;
    assert_eq!(day.status, StatusCode::OK);
    assert_eq!(versions(&day), ["2", "1"]);
    let instant = app
        .get(&format!(
            "/fhir/Patient/{id}/_history?_at=2026-01-01T12:30:00Z"
        ))
        .await;
    assert_eq!(versions(&instant), ["1"]);
    let before = app
        .get(&format!("/fhir/Patient/{id}/_history?_at=2025-12-31"))
        .await;
    assert!(versions(&before).is_empty());
}

// ---- patch ----

fn patch_request(path: &str, patch: Value, if_match: Option<&str>) -> http::Request<Body> {
    let mut r = request(Method::PATCH, path).header("content-type", "application/json-patch+json");
    if let Some(v) = if_match {
        r = r.header("if-match", v);
    }
    r.body(Body::from(patch.to_string())).unwrap()
}

#[tokio::test]
async fn patching_applies_a_json_patch_and_makes_a_new_version() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let path = format!("/fhir/Patient/{id}");
    let reply = app
        .send(patch_request(
            &path,
            json!([{"op": "replace", "path": "/name/0/family", "value": "Z"},
                   {"op": "add", "path": "/gender", "value": "female"}]),
            Some("W/\"1\""),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["name"][0]["family"], "Z");
    assert_eq!(reply.body["gender"], "female");
    assert_eq!(reply.header("etag"), Some("W/\"2\""));
}

#[tokio::test]
async fn patching_with_a_stale_if_match_is_412() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let reply = app
        .send(patch_request(
            &format!("/fhir/Patient/{id}"),
            json!([{"op": "add", "path": "/gender", "value": "male"}]),
            Some("W/\"9\""),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::PRECONDITION_FAILED);
}

#[tokio::test]
async fn patching_the_id_or_resource_type_is_refused() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    for op in [
        json!({"op": "replace", "path": "/id", "value": "x"}),
        json!({"op": "replace", "path": "/resourceType", "value": "Observation"}),
    ] {
        let reply = app
            .send(patch_request(
                &format!("/fhir/Patient/{id}"),
                json!([op]),
                None,
            ))
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn a_patch_producing_an_invalid_resource_is_refused() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let reply = app
        .send(patch_request(
            &format!("/fhir/Patient/{id}"),
            json!([{"op": "add", "path": "/birthDate", "value": "not a date"}]),
            None,
        ))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        app.get(&format!("/fhir/Patient/{id}")).await.header("etag"),
        Some("W/\"1\"")
    );
}

#[tokio::test]
async fn a_patch_that_cannot_apply_is_422_and_a_patch_sent_as_fhir_json_is_415() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let path = format!("/fhir/Patient/{id}");
    let reply = app
        .send(patch_request(
            &path,
            json!([{"op": "test", "path": "/gender", "value": "male"}]),
            None,
        ))
        .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    let reply = app
        .send_json(
            Method::PATCH,
            &path,
            &json!([{"op": "remove", "path": "/name"}]),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

// ---- delete ----

#[tokio::test]
async fn deleting_twice_answers_200_then_204() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let first = app.delete(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body["resourceType"], "OperationOutcome");
    let second = app.delete(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(second.status, StatusCode::NO_CONTENT);
    let unknown = app.delete("/fhir/Patient/never").await;
    assert_eq!(unknown.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_conditional_delete_deletes_one_match_and_refuses_several() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", Some(("http://mrn", "1")))).await;
    let reply = app.delete("/fhir/Patient?identifier=http://mrn|1").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        app.get(&format!("/fhir/Patient/{id}")).await.status,
        StatusCode::GONE
    );
    let reply = app.delete("/fhir/Patient?identifier=http://mrn|1").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    app.create(&patient("B", Some(("http://mrn", "2")))).await;
    app.create(&patient("C", Some(("http://mrn", "2")))).await;
    let reply = app.delete("/fhir/Patient?identifier=http://mrn|2").await;
    assert_eq!(reply.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(app.count("Patient").await, 2);
}

// ---- history ----

#[tokio::test]
async fn instance_history_lists_every_version_newest_first() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    app.clock.advance(time::Duration::seconds(1));
    app.put(
        &format!("/fhir/Patient/{id}"),
        &with_id(patient("B", None), &id),
    )
    .await;
    app.clock.advance(time::Duration::seconds(1));
    app.delete(&format!("/fhir/Patient/{id}")).await;
    let reply = app.get(&format!("/fhir/Patient/{id}/_history")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let b = &reply.body;
    assert_eq!(b["type"], "history");
    assert_eq!(b["total"], 3);
    let entries = b["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0]["request"]["method"], "DELETE");
    assert!(entries[0].get("resource").is_none());
    assert_eq!(entries[1]["request"]["method"], "PUT");
    assert_eq!(entries[1]["response"]["etag"], "W/\"2\"");
    assert_eq!(entries[2]["request"]["method"], "POST");
    assert_eq!(entries[2]["response"]["status"], "201 Created");
    assert_eq!(entries[2]["fullUrl"], format!("{BASE}/Patient/{id}"));
    assert!(entries[2]["response"]["lastModified"]
        .as_str()
        .unwrap()
        .starts_with("2026-01-01T12:00:00"));
}

#[tokio::test]
async fn history_pages_follow_next_links() {
    let app = spawn_app().await;
    for i in 0..5 {
        app.create(&patient(&format!("P{i}"), None)).await;
    }
    let mut url = "/fhir/Patient/_history?_count=2".to_owned();
    let mut seen = 0;
    let mut pages = 0;
    loop {
        let reply = app.get(&url).await;
        assert_eq!(reply.status, StatusCode::OK);
        pages += 1;
        seen += reply.body["entry"].as_array().map_or(0, Vec::len);
        let next = reply.body["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().replace(BASE, "/fhir"));
        match next {
            Some(n) => url = n,
            None => break,
        }
    }
    assert_eq!(seen, 5);
    assert_eq!(pages, 3);
}

#[tokio::test]
async fn system_history_and_since_filter_by_time() {
    let app = spawn_app().await;
    app.create(&patient("Old", None)).await;
    app.clock.advance(time::Duration::days(1));
    app.create(&json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "x"}}))
        .await;
    let all = app.get("/fhir/_history").await;
    assert_eq!(all.body["entry"].as_array().unwrap().len(), 2);
    let recent = app.get("/fhir/_history?_since=2026-01-02T00:00:00Z").await;
    let entries = recent.body["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["resource"]["resourceType"], "Observation");
    let bad = app.get("/fhir/_history?_since=soon").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn history_of_an_unknown_resource_is_404() {
    let app = spawn_app().await;
    let reply = app.get("/fhir/Patient/nobody/_history").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

// ---- search ----

fn ids_of(reply: &support::Reply) -> Vec<String> {
    reply.body["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["search"]["mode"] == "match")
                .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn searching_by_identifier_understands_every_token_shape() {
    let app = spawn_app().await;
    let a = app.create(&patient("A", Some(("http://mrn", "1")))).await;
    let b = app.create(&patient("B", Some(("http://other", "1")))).await;
    let mut none = patient("C", None);
    none["identifier"] = json!([{"value": "1"}]);
    let c = app.create(&none).await;
    let search = |q: &'static str| app.get(q);
    let mut r = ids_of(&search("/fhir/Patient?identifier=http://mrn|1").await);
    assert_eq!(r, vec![a.clone()]);
    r = ids_of(&search("/fhir/Patient?identifier=%7C1").await);
    assert_eq!(r, vec![c.clone()]);
    r = ids_of(&search("/fhir/Patient?identifier=http://other|").await);
    assert_eq!(r, vec![b.clone()]);
    let mut all = ids_of(&search("/fhir/Patient?identifier=1").await);
    all.sort();
    let mut expected = vec![a, b, c];
    expected.sort();
    assert_eq!(all, expected);
}

#[tokio::test]
async fn a_searchset_has_a_total_match_entries_and_paging_links() {
    let app = spawn_app().await;
    for i in 0..5 {
        app.create(&patient(&format!("P{i}"), None)).await;
    }
    let reply = app.get("/fhir/Patient?_count=2").await;
    assert_eq!(reply.status, StatusCode::OK);
    let b = &reply.body;
    assert_eq!(b["type"], "searchset");
    assert_eq!(b["total"], 5);
    assert_eq!(ids_of(&reply).len(), 2);
    assert!(b["entry"][0]["fullUrl"].as_str().unwrap().starts_with(BASE));
    let links = b["link"].as_array().unwrap();
    let next = links.iter().find(|l| l["relation"] == "next").unwrap()["url"]
        .as_str()
        .unwrap()
        .replace(BASE, "/fhir");
    let page2 = app.get(&next).await;
    assert_eq!(ids_of(&page2).len(), 2);
    assert!(page2.body["link"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["relation"] == "previous"));
}

#[tokio::test]
async fn count_is_capped_by_the_maximum_page_size() {
    let app = spawn_app_with(|c| c.max_page_size = 2).await;
    for i in 0..3 {
        app.create(&patient(&format!("P{i}"), None)).await;
    }
    let reply = app.get("/fhir/Patient?_count=100").await;
    assert_eq!(ids_of(&reply).len(), 2);
}

#[tokio::test]
async fn searching_by_id_and_last_updated_respects_precision() {
    let app = spawn_app().await;
    let january = app.create(&patient("Jan", None)).await;
    app.clock.advance(time::Duration::days(40));
    let february = app.create(&patient("Feb", None)).await;
    assert_eq!(
        ids_of(&app.get("/fhir/Patient?_lastUpdated=eq2026-01").await),
        vec![january.clone()]
    );
    assert_eq!(
        ids_of(&app.get("/fhir/Patient?_lastUpdated=gt2026-01").await),
        vec![february.clone()]
    );
    assert_eq!(
        ids_of(&app.get("/fhir/Patient?_lastUpdated=lt2026-02-01").await),
        vec![january.clone()]
    );
    assert_eq!(
        ids_of(&app.get(&format!("/fhir/Patient?_id={february}")).await),
        vec![february]
    );
    let bad = app.get("/fhir/Patient?_lastUpdated=eqJanuary").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unknown_search_parameters_are_reported_or_refused_when_strict() {
    let app = spawn_app().await;
    app.create(&patient("A", None)).await;
    let reply = app.get("/fhir/Patient?_text=A").await;
    assert_eq!(reply.status, StatusCode::OK);
    let outcome = reply.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .expect("an outcome entry");
    assert_eq!(outcome["resource"]["resourceType"], "OperationOutcome");
    let strict = app
        .get_with_header("/fhir/Patient?_text=A", "prefer", "handling=strict")
        .await;
    assert_eq!(strict.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn string_token_reference_and_date_parameters_narrow_a_search() {
    let app = spawn_app().await;
    app.create(&patient("Shaw", None)).await;
    app.create(&patient("Lake", None)).await;
    let reply = app.get("/fhir/Patient?family=shaw").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["total"], 1);
    assert_eq!(
        reply.body["entry"][0]["resource"]["name"][0]["family"],
        "Shaw"
    );
    let none = app.get("/fhir/Patient?family=Shaw&birthdate=ge2000").await;
    assert_eq!(none.body["total"], 0);
    let bad = app.get("/fhir/Patient?birthdate=2000-13").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn searching_by_post_reads_the_form_body() {
    let app = spawn_app().await;
    let a = app.create(&patient("A", Some(("http://mrn", "5")))).await;
    app.create(&patient("B", None)).await;
    let reply = app
        .send(
            request(Method::POST, "/fhir/Patient/_search")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from("identifier=http%3A%2F%2Fmrn%7C5"))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(ids_of(&reply), vec![a]);
}

#[tokio::test]
async fn a_system_search_with_type_finds_that_type() {
    let app = spawn_app().await;
    let a = app.create(&patient("A", None)).await;
    let reply = app.get("/fhir?_type=Patient").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(ids_of(&reply), vec![a]);
}

// ---- batch and transaction ----

fn transaction(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

#[tokio::test]
async fn a_transaction_rewrites_urn_uuid_references_to_the_assigned_ids() {
    let app = spawn_app().await;
    let bundle = transaction(vec![
        json!({"fullUrl": "urn:uuid:obs-1",
               "resource": {"resourceType": "Observation", "status": "final",
                            "code": {"text": "weight"},
                            "subject": {"reference": "urn:uuid:pat-1"},
                            "performer": [{"reference": "urn:uuid:pat-1"}]},
               "request": {"method": "POST", "url": "Observation"}}),
        json!({"fullUrl": "urn:uuid:pat-1",
               "resource": patient("A", None),
               "request": {"method": "POST", "url": "Patient"}}),
    ]);
    let reply = app.post("/fhir", &bundle).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["type"], "transaction-response");
    let entries = reply.body["entry"].as_array().unwrap();
    assert_eq!(entries[0]["response"]["status"], "201 Created");
    assert_eq!(entries[0]["response"]["etag"], "W/\"1\"");
    assert!(entries[0]["response"]["lastModified"].is_string());
    let patient_location = entries[1]["response"]["location"].as_str().unwrap();
    let patient_id = patient_location
        .trim_start_matches(&format!("{BASE}/Patient/"))
        .split('/')
        .next()
        .unwrap();
    let obs_location = entries[0]["response"]["location"]
        .as_str()
        .unwrap()
        .replace(BASE, "/fhir");
    let obs_path = obs_location.split("/_history").next().unwrap();
    let obs = app.get(obs_path).await;
    assert_eq!(
        obs.body["subject"]["reference"],
        format!("Patient/{patient_id}")
    );
    assert_eq!(
        obs.body["performer"][0]["reference"],
        format!("Patient/{patient_id}")
    );
}

#[tokio::test]
async fn a_transaction_whose_last_entry_fails_leaves_nothing_behind() {
    let app = spawn_app().await;
    let existing = app.create(&patient("Keep", None)).await;
    let mut bad = patient("Bad", None);
    bad["birthDate"] = json!("not-a-date");
    let bundle = transaction(vec![
        json!({"resource": patient("A", None), "request": {"method": "POST", "url": "Patient"}}),
        json!({"request": {"method": "DELETE", "url": format!("Patient/{existing}")}}),
        json!({"resource": bad, "request": {"method": "POST", "url": "Patient"}}),
    ]);
    let reply = app.post("/fhir", &bundle).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
    let expression = reply.body["issue"][0]["expression"][0].as_str().unwrap();
    assert_eq!(expression, "Bundle.entry[2].resource.birthDate");
    assert_eq!(app.count("Patient").await, 1);
    assert_eq!(
        app.get(&format!("/fhir/Patient/{existing}")).await.status,
        StatusCode::OK
    );
}

fn patch_binary(patch: &Value) -> Value {
    use base64::Engine as _;
    json!({
        "resourceType": "Binary",
        "contentType": "application/json-patch+json",
        "data": base64::engine::general_purpose::STANDARD.encode(patch.to_string()),
    })
}

#[tokio::test]
async fn a_transaction_applies_a_json_patch_carried_in_a_binary() {
    let app = spawn_app().await;
    let id = app.create(&patient("Before", None)).await;
    let patch = json!([{"op": "replace", "path": "/name/0/family", "value": "After"}]);
    let bundle = transaction(vec![json!({
        "resource": patch_binary(&patch),
        "request": {"method": "PATCH", "url": format!("Patient/{id}"), "ifMatch": "W/\"1\""},
    })]);
    let reply = app.post("/fhir", &bundle).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["entry"][0]["response"]["status"], "200 OK");
    assert_eq!(reply.body["entry"][0]["response"]["etag"], "W/\"2\"");
    let read = app.get(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(read.body["name"][0]["family"], "After");
}

#[tokio::test]
async fn a_transaction_rewrites_urn_uuid_references_inside_patch_entries() {
    let app = spawn_app().await;
    let observation = app
        .create(&json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}}))
        .await;
    let patch = json!([
        {"op": "add", "path": "/subject", "value": {"reference": "urn:uuid:p1"}},
        {"op": "add", "path": "/performer", "value": [{"reference": "placeholder"}]},
        {"op": "replace", "path": "/performer/0/reference", "value": "urn:uuid:p1"},
    ]);
    let bundle = transaction(vec![
        json!({"fullUrl": "urn:uuid:p1", "resource": patient("New", None),
               "request": {"method": "POST", "url": "Patient"}}),
        json!({"resource": patch_binary(&patch),
               "request": {"method": "PATCH", "url": format!("Observation/{observation}")}}),
    ]);
    let reply = app.post("/fhir", &bundle).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let location = reply.body["entry"][0]["response"]["location"]
        .as_str()
        .unwrap();
    let patient_ref = location
        .trim_start_matches(&format!("{BASE}/"))
        .split("/_history")
        .next()
        .unwrap();
    let read = app.get(&format!("/fhir/Observation/{observation}")).await;
    assert_eq!(read.body["subject"]["reference"], patient_ref);
    assert_eq!(read.body["performer"][0]["reference"], patient_ref);
}

#[tokio::test]
async fn a_patch_entry_without_a_json_patch_binary_is_400_at_the_entry() {
    let app = spawn_app().await;
    let id = app.create(&patient("Before", None)).await;
    let mut not_base64 = patch_binary(&json!([]));
    not_base64["data"] = json!("***");
    let fhirpath_patch =
        json!({"resourceType": "Parameters", "parameter": [{"name": "operation"}]});
    for (resource, expression) in [
        (not_base64, "Bundle.entry[0].resource.data"),
        (fhirpath_patch, "Bundle.entry[0].resource"),
    ] {
        let bundle = transaction(vec![json!({
            "resource": resource,
            "request": {"method": "PATCH", "url": format!("Patient/{id}")},
        })]);
        let reply = app.post("/fhir", &bundle).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
        assert_eq!(reply.body["issue"][0]["expression"][0], expression);
    }
    let read = app.get(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(read.header("etag"), Some("W/\"1\""));
}

#[tokio::test]
async fn a_transaction_failing_at_the_store_writes_nothing() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let bundle = transaction(vec![
        json!({"resource": patient("New", None), "request": {"method": "POST", "url": "Patient"}}),
        json!({"resource": with_id(patient("B", None), &id),
               "request": {"method": "PUT", "url": format!("Patient/{id}"), "ifMatch": "W/\"7\""}}),
    ]);
    let reply = app.post("/fhir", &bundle).await;
    assert_eq!(reply.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(app.count("Patient").await, 1);
}

#[tokio::test]
async fn a_large_transaction_commits_whole_or_not_at_all_while_single_creates_go_on_beside_it() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let creates = |family: &str| -> Vec<Value> {
        (0..40)
            .map(|n| {
                json!({"resource": patient(&format!("{family}{n}"), None),
                            "request": {"method": "POST", "url": "Patient"}})
            })
            .collect()
    };
    let kept = transaction(creates("Kept"));
    let mut failing = creates("Lost");
    failing.push(json!({"resource": with_id(patient("B", None), &id),
                        "request": {"method": "PUT", "url": format!("Patient/{id}"), "ifMatch": "W/\"7\""}}));
    let failing = transaction(failing);
    let (single_a, single_b) = (patient("SingleA", None), patient("SingleB", None));
    let (kept_reply, failing_reply, single_a, single_b) = tokio::join!(
        app.post("/fhir", &kept),
        app.post("/fhir", &failing),
        app.post("/fhir/Patient", &single_a),
        app.post("/fhir/Patient", &single_b),
    );
    assert_eq!(kept_reply.status, StatusCode::OK);
    assert_eq!(kept_reply.body["entry"].as_array().unwrap().len(), 40);
    assert_eq!(failing_reply.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(failing_reply.body["resourceType"], "OperationOutcome");
    assert_eq!(single_a.status, StatusCode::CREATED);
    assert_eq!(single_b.status, StatusCode::CREATED);
    assert_eq!(app.count("Patient").await, 1 + 40 + 2);
}

#[tokio::test]
async fn a_transaction_resolves_conditional_references_and_honours_if_none_exist() {
    let app = spawn_app().await;
    let known = app
        .create(&patient("Known", Some(("http://mrn", "k"))))
        .await;
    let bundle = transaction(vec![
        json!({"resource": {"resourceType": "Observation", "status": "final",
                            "code": {"text": "x"},
                            "subject": {"reference": "Patient?identifier=http://mrn|k"}},
               "request": {"method": "POST", "url": "Observation"}}),
        json!({"fullUrl": "urn:uuid:p", "resource": patient("Dup", Some(("http://mrn", "k"))),
               "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=http://mrn|k"}}),
    ]);
    let reply = app.post("/fhir", &bundle).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let entries = reply.body["entry"].as_array().unwrap();
    assert_eq!(entries[1]["response"]["status"], "200 OK");
    assert_eq!(app.count("Patient").await, 1);
    let obs = app.get("/fhir/Observation").await;
    assert_eq!(
        obs.body["entry"][0]["resource"]["subject"]["reference"],
        format!("Patient/{known}")
    );
    let unresolved = transaction(vec![json!({
        "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                     "subject": {"reference": "Patient?identifier=http://mrn|none"}},
        "request": {"method": "POST", "url": "Observation"}})]);
    let reply = app.post("/fhir", &unresolved).await;
    assert_eq!(reply.status, StatusCode::PRECONDITION_FAILED);
}

#[tokio::test]
async fn a_transaction_answers_reads_after_its_writes() {
    let app = spawn_app().await;
    let bundle = transaction(vec![
        json!({"request": {"method": "GET", "url": "Patient?identifier=http://mrn|t"}}),
        json!({"resource": patient("T", Some(("http://mrn", "t"))),
               "request": {"method": "POST", "url": "Patient"}}),
    ]);
    let reply = app.post("/fhir", &bundle).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["entry"][0]["resource"]["total"], 1);
}

#[tokio::test]
async fn a_batch_reports_each_entry_on_its_own() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let mut bad = patient("Bad", None);
    bad["birthDate"] = json!("x");
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient("B", None), "request": {"method": "POST", "url": "Patient"}},
        {"resource": bad, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": format!("Patient/{id}")}},
        {"request": {"method": "GET", "url": "Patient/missing"}},
        {"request": {"method": "DELETE", "url": format!("Patient/{id}")}},
    ]});
    let reply = app.post("/fhir", &bundle).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["type"], "batch-response");
    let e = reply.body["entry"].as_array().unwrap();
    assert_eq!(e[0]["response"]["status"], "201 Created");
    assert!(e[0]["response"]["location"].is_string());
    assert_eq!(e[1]["response"]["status"], "400 Bad Request");
    assert_eq!(
        e[1]["response"]["outcome"]["issue"][0]["expression"][0],
        "Bundle.entry[1].resource.birthDate"
    );
    // Deletes run before reads (R4 processing order).
    assert_eq!(e[2]["response"]["status"], "410 Gone");
    assert_eq!(e[3]["response"]["status"], "404 Not Found");
    assert_eq!(e[4]["response"]["status"], "200 OK");
    assert_eq!(app.count("Patient").await, 1);
}

#[tokio::test]
async fn a_bundle_of_another_type_is_refused() {
    let app = spawn_app().await;
    let reply = app
        .post(
            "/fhir",
            &json!({"resourceType": "Bundle", "type": "collection"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = app
        .post(
            "/fhir",
            &json!({"resourceType": "Bundle", "type": "transaction",
            "entry": [{"resource": patient("A", None)}]}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.body["issue"][0]["expression"][0],
        "Bundle.entry[0].request"
    );
}

#[tokio::test]
async fn a_transaction_with_a_reference_to_no_entry_is_400_and_writes_nothing() {
    let app = spawn_app().await;
    let bundle = transaction(vec![json!({
        "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                     "subject": {"reference": "urn:uuid:nowhere"}},
        "request": {"method": "POST", "url": "Observation"}})]);
    let reply = app.post("/fhir", &bundle).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.body["issue"][0]["expression"][0], "Bundle.entry[0]");
    assert_eq!(app.count("Observation").await, 0);
}

#[tokio::test]
async fn total_none_leaves_the_total_out_and_several_types_are_searched_together() {
    let app = spawn_app().await;
    app.create(&patient("A", None)).await;
    let reply = app.get("/fhir/Patient?_total=none").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.get("total").is_none());
    let reply = app
        .get("/fhir?_type=Patient,Observation&_total=accurate")
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["total"], 1);
    let reply = app.get("/fhir?_type=Patient,Nonsense").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = app
        .get("/fhir/Patient?_format=application/fhir%2Bjson")
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn a_version_that_is_not_a_number_is_400() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let reply = app
        .get(&format!("/fhir/Patient/{id}/_history/latest"))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

// ---- $validate ----

#[tokio::test]
async fn validate_answers_200_with_the_issues_or_no_errors() {
    let app = spawn_app().await;
    let reply = app
        .post("/fhir/Patient/$validate", &patient("A", None))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["issue"][0]["severity"], "information");
    let mut bad = patient("A", None);
    bad["birthDate"] = json!("x");
    let params = json!({"resourceType": "Parameters",
        "parameter": [{"name": "resource", "resource": bad}]});
    let reply = app.post("/fhir/Patient/$validate", &params).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["issue"][0]["severity"], "error");
    assert_eq!(app.count("Patient").await, 0);
}

#[tokio::test]
async fn validating_a_stored_instance_checks_what_is_stored() {
    let app = spawn_app().await;
    let id = app.create(&patient("A", None)).await;
    let reply = app.get(&format!("/fhir/Patient/{id}/$validate")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["issue"][0]["diagnostics"], "no errors");
    let reply = app.get("/fhir/Patient/unknown/$validate").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

// ---- Synthea ----

/// Drops what the server owns (`id`, `meta`) and stands every reference that
/// names another resource (`urn:uuid:...` as sent, `Type/id` as stored) in for
/// one placeholder, so a sent and a stored resource compare equal.
fn comparable(resource: &Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                for (key, value) in map.iter_mut() {
                    match value {
                        Value::String(r) if key == "reference" && !r.starts_with('#') => {
                            *r = "REF".into();
                        }
                        other => walk(other),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut v = resource.clone();
    if let Some(map) = v.as_object_mut() {
        map.remove("id");
        map.remove("meta");
    }
    walk(&mut v);
    v
}

fn references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (key, value) in map {
                match value {
                    Value::String(r) if key == "reference" => out.push(r.clone()),
                    other => references(other, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| references(i, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_synthea_bundle_loads_and_reads_back_as_sent() {
    let Some(shared) = support::shared_dir() else {
        println!("not run: HAVEN_SHARED is not set");
        return;
    };
    let dir = shared.join("synthea");
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .expect("the synthea directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    // Organizations and practitioners first: patient bundles refer to them.
    files.sort_by_key(|p| {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let shared_first = !(name.starts_with("hospital") || name.starts_with("practitioner"));
        (shared_first, name)
    });
    let app = spawn_app().await;
    let mut expected: std::collections::BTreeMap<String, u64> = Default::default();
    let mut samples: Vec<(Value, String)> = Vec::new();
    let started = std::time::Instant::now();
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        let bundle: Value = serde_json::from_slice(&bytes).unwrap();
        let sent = bundle["entry"].as_array().unwrap();
        for entry in sent {
            let t = entry["resource"]["resourceType"].as_str().unwrap();
            *expected.entry(t.to_owned()).or_default() += 1;
        }
        let reply = app
            .send(
                request(Method::POST, "/fhir")
                    .header("content-type", "application/fhir+json")
                    .body(Body::from(bytes))
                    .unwrap(),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}: {}",
            file.display(),
            reply.body
        );
        let answered = reply.body["entry"].as_array().unwrap();
        assert_eq!(answered.len(), sent.len());
        for (i, (entry, answer)) in sent.iter().zip(answered).enumerate() {
            assert_eq!(
                answer["response"]["status"],
                "201 Created",
                "{}",
                file.display()
            );
            if i % 40 == 0 {
                let location = answer["response"]["location"].as_str().unwrap();
                let path = location
                    .replace(BASE, "/fhir")
                    .split("/_history")
                    .next()
                    .unwrap()
                    .to_owned();
                samples.push((entry["resource"].clone(), path));
            }
        }
    }
    println!("loaded {} bundles in {:?}", files.len(), started.elapsed());

    let counted: std::collections::BTreeMap<String, u64> = app
        .store
        .count_by_type()
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(counted, expected);

    for (sent, path) in &samples {
        let stored = app.get(path).await;
        assert_eq!(stored.status, StatusCode::OK, "{path}");
        assert_eq!(comparable(&stored.body), comparable(sent), "{path}");
        let mut refs = Vec::new();
        references(&stored.body, &mut refs);
        for r in refs.iter().filter(|r| !r.starts_with('#')) {
            assert!(!r.starts_with("urn:"), "{path} kept {r}");
            let target = app.get(&format!("/fhir/{r}")).await;
            assert_eq!(target.status, StatusCode::OK, "{path} refers to {r}");
        }
    }
}
