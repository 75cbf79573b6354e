//! The audit trail and Provenance through the HTTP API, with SMART and audit on
//! as a server runs them: every request leaves AuditEvents, every write its
//! Provenance, and nothing is answered or written when the audit record cannot
//! be stored.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::Router;
use base64::Engine;
use haven_api::{router, ApiConfig, AppState};
use haven_auth::client::ClientKey;
use haven_auth::registry::Role;
use haven_auth::server::{pkce_s256, ClientSpec};
use haven_auth::AuthServer;
use haven_model::clock::{Clock, ManualClock};
use haven_store::{SearchQuery, Store};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::secured::{self, REDIRECT, VERIFIER};
use tempfile::TempDir;
use time::macros::datetime;
use tower::ServiceExt;

const BASE: &str = "https://haven.test/fhir";

fn backend_key() -> &'static ClientKey {
    static KEY: OnceLock<ClientKey> = OnceLock::new();
    KEY.get_or_init(ClientKey::generate_rsa)
}

struct Audited {
    router: Router,
    store: Arc<dyn Store>,
    server: Arc<AuthServer>,
    app: String,
    backend: String,
    database_url: String,
    _dir: Option<TempDir>,
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    request_id: String,
    body: Value,
}

/// An audited app on a fresh SQLite store.
async fn spawn() -> Audited {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("haven.db").display());
    spawn_on(url, Some(dir)).await
}

async fn spawn_on(database_url: String, dir: Option<TempDir>) -> Audited {
    let clock = Arc::new(ManualClock::new(datetime!(2026-06-01 09:00 UTC)));
    let store = haven_store::connect(&database_url, clock.clone() as Arc<dyn Clock>)
        .await
        .unwrap();
    let state = AppState::new(store.clone(), clock.clone(), ApiConfig::new(BASE));
    let (state, smart) = secured::secure(state, store.clone(), clock, BASE).await;
    let server = smart.server.clone();
    let (backend, _) = server
        .add_client(ClientSpec {
            name: "Loader".into(),
            scopes: "system/*.cruds".into(),
            jwks: Some(backend_key().jwks()),
            backend: true,
            organization: Some("Example Hospital".into()),
            contacts: vec!["mailto:ops@hospital.example".into()],
            ..ClientSpec::default()
        })
        .await
        .unwrap();
    smart
        .add_users(&[
            ("drwho", Role::Practitioner, Some("Practitioner/dr")),
            ("amy", Role::Patient, Some("Patient/a")),
            ("root", Role::Admin, None),
        ])
        .await;
    Audited {
        router: router(state),
        store,
        server,
        app: smart.client_id,
        backend: backend.client_id,
        database_url,
        _dir: dir,
    }
}

fn patient(id: &str, family: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]})
}

fn observation(id: &str, patient: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "code": {"text": "heart rate"},
        "subject": {"reference": format!("Patient/{patient}")},
    })
}

fn query_of(url: &str) -> HashMap<String, String> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn form(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl Audited {
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = match body {
            Some(body) => request
                .header("content-type", "application/fhir+json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        }
        .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Reply {
            status,
            request_id,
            body,
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, path, token, None).await
    }

    /// A Backend Services token with `scope` (system scopes only).
    async fn system_token(&self, scope: &str) -> String {
        let token_url = self.server.config().token_endpoint();
        let assertion = backend_key()
            .client_assertion(
                &self.backend,
                &token_url,
                self.server_now(),
                &uuid::Uuid::new_v4().to_string(),
            )
            .unwrap();
        let answer = self
            .server
            .token(
                &form(&[
                    ("grant_type", "client_credentials"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", &assertion),
                    ("scope", scope),
                ]),
                None,
            )
            .await
            .unwrap();
        answer["access_token"].as_str().unwrap().to_owned()
    }

    fn server_now(&self) -> time::OffsetDateTime {
        datetime!(2026-06-01 09:00 UTC)
    }

    /// A user's token through the authorization server's steps.
    async fn user_token(&self, username: &str, scope: &str, patient: Option<&str>) -> String {
        let challenge = pkce_s256(VERIFIER);
        let params = form(&[
            ("response_type", "code"),
            ("client_id", &self.app),
            ("redirect_uri", REDIRECT),
            ("scope", scope),
            ("state", "s"),
            ("aud", BASE),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ]);
        let pending = self.server.begin_authorization(&params).await.unwrap();
        let user = self.server.user(username).await.unwrap();
        let mut pending = self
            .server
            .attach_user(pending, &user, "cookie")
            .await
            .unwrap();
        if let Some(patient) = patient {
            pending = self.server.choose_patient(pending, patient).await.unwrap();
        }
        let url = self
            .server
            .approve(&pending, &pending.scopes)
            .await
            .unwrap();
        let code = query_of(&url)["code"].clone();
        let answer = self
            .server
            .token(
                &form(&[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", REDIRECT),
                    ("client_id", &self.app),
                    ("code_verifier", VERIFIER),
                ]),
                None,
            )
            .await
            .unwrap();
        answer["access_token"].as_str().unwrap().to_owned()
    }

    /// Every stored AuditEvent, oldest first.
    async fn events(&self) -> Vec<Value> {
        self.store
            .audit_log()
            .chain(0, 100_000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.event)
            .collect()
    }

    /// The AuditEvents of one request, by its request id.
    async fn events_of(&self, request_id: &str) -> Vec<Value> {
        self.events()
            .await
            .into_iter()
            .filter(|e| {
                e["entity"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|x| x["what"]["identifier"]["value"] == request_id)
            })
            .collect()
    }

    /// Every stored Provenance.
    async fn provenances(&self) -> Vec<Value> {
        self.store
            .search(&SearchQuery {
                types: vec!["Provenance".into()],
                count: 10_000,
                ..SearchQuery::default()
            })
            .await
            .unwrap()
            .resources
            .into_iter()
            .filter_map(|v| v.resource)
            .collect()
    }

    async fn put(&self, token: &str, resource: &Value) -> Reply {
        let path = format!(
            "/fhir/{}/{}",
            resource["resourceType"].as_str().unwrap(),
            resource["id"].as_str().unwrap()
        );
        self.send(Method::PUT, &path, Some(token), Some(resource))
            .await
    }
}

fn subtype(event: &Value) -> &str {
    event["subtype"][0]["code"].as_str().unwrap_or_default()
}

fn references(event: &Value) -> Vec<String> {
    event["entity"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["what"]["reference"].as_str().map(str::to_owned))
        .collect()
}

fn patient_of(event: &Value) -> Option<String> {
    event["entity"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["role"]["code"] == "1")
        .and_then(|e| e["what"]["reference"].as_str().map(str::to_owned))
}

fn agent_ids(event: &Value) -> Vec<String> {
    event["agent"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["who"]["identifier"]["value"].as_str().map(str::to_owned))
        .collect()
}

fn server_made(provenance: &Value) -> bool {
    provenance["meta"]["tag"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["system"] == "urn:haven:provenance" && t["code"] == "server")
}

fn targets(provenance: &Value) -> Vec<String> {
    provenance["target"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["reference"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn a_practitioners_read_is_audited_with_user_app_version_patient_and_request_id() {
    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    assert_eq!(
        h.put(&system, &patient("a", "Shaw")).await.status,
        StatusCode::CREATED
    );
    let token = h.user_token("drwho", "user/*.rs", None).await;

    let reply = h.get("/fhir/Patient/a", Some(&token)).await;
    assert_eq!(reply.status, StatusCode::OK);

    let events = h.events_of(&reply.request_id).await;
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!(event["type"]["code"], "rest");
    assert_eq!(subtype(event), "read");
    assert_eq!(event["action"], "R");
    assert_eq!(event["outcome"], "0");
    assert_eq!(event["recorded"], "2026-06-01T09:00:00.000000Z");
    let user = &event["agent"][0];
    assert_eq!(user["who"]["identifier"]["value"], "drwho");
    assert_eq!(user["who"]["reference"], "Practitioner/dr");
    assert_eq!(user["requestor"], true);
    assert!(agent_ids(event).contains(&h.app));
    assert!(agent_ids(event).contains(&BASE.to_owned()));
    assert_eq!(event["source"]["observer"]["display"], "haven-test");
    assert!(references(event).contains(&"Patient/a/_history/1".to_owned()));
    assert_eq!(patient_of(event).as_deref(), Some("Patient/a"));
    // The token itself is never stored.
    assert!(!event.to_string().contains(&token));
}

#[tokio::test]
async fn a_search_is_audited_with_its_query_and_the_ids_returned_one_event_per_patient() {
    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    for (p, o) in [("a", "oa"), ("b", "ob")] {
        h.put(&system, &patient(p, "X")).await;
        h.put(&system, &observation(o, p)).await;
    }

    let reply = h.get("/fhir/Observation?status=final", Some(&system)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["total"], 2);

    let events = h.events_of(&reply.request_id).await;
    assert_eq!(events.len(), 2, "{events:#?}");
    let by_patient: HashMap<String, &Value> =
        events.iter().map(|e| (patient_of(e).unwrap(), e)).collect();
    let a = by_patient["Patient/a"];
    assert_eq!(subtype(a), "search-type");
    assert_eq!(a["action"], "E");
    assert!(references(a).contains(&"Observation/oa/_history/1".to_owned()));
    assert!(!references(a).contains(&"Observation/ob/_history/1".to_owned()));
    let query = a["entity"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| e["query"].as_str())
        .unwrap();
    let query = base64::engine::general_purpose::STANDARD
        .decode(query)
        .unwrap();
    assert_eq!(
        String::from_utf8(query).unwrap(),
        "Observation?status=final"
    );
    assert!(references(by_patient["Patient/b"]).contains(&"Observation/ob/_history/1".to_owned()));
    // A backend client has no user: the client is the requestor.
    assert_eq!(a["agent"][0]["who"]["identifier"]["value"], h.backend);
    assert_eq!(a["agent"][0]["requestor"], true);
}

#[tokio::test]
async fn each_write_leaves_one_provenance_for_its_version_and_an_audit_event_in_the_same_commit() {
    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    let practitioner = h.user_token("drwho", "user/*.cruds", None).await;
    h.put(&system, &patient("a", "Shaw")).await;

    let created = h
        .send(
            Method::POST,
            "/fhir/Observation",
            Some(&practitioner),
            Some(&observation("ignored", "a")),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let mut changed = created.body.clone();
    changed["status"] = json!("amended");
    let updated = h.put(&practitioner, &changed).await;
    assert_eq!(updated.status, StatusCode::OK);
    let deleted = h
        .send(
            Method::DELETE,
            &format!("/fhir/Observation/{id}"),
            Some(&practitioner),
            None,
        )
        .await;
    assert!(deleted.status.is_success());

    let provenances = h.provenances().await;
    let of = |version: u32| {
        let target = format!("Observation/{id}/_history/{version}");
        let found: Vec<&Value> = provenances
            .iter()
            .filter(|p| server_made(p) && targets(p) == [target.clone()])
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one Provenance for {target}: {provenances:#?}"
        );
        found[0].clone()
    };
    let first = of(1);
    assert_eq!(first["activity"]["coding"][0]["code"], "CREATE");
    assert_eq!(first["agent"][0]["who"]["reference"], "Practitioner/dr");
    assert_eq!(first["agent"][1]["who"]["identifier"]["value"], h.app);
    assert_eq!(
        first["agent"][1]["onBehalfOf"]["reference"],
        "Practitioner/dr"
    );
    assert_eq!(first["recorded"], "2026-06-01T09:00:00.000000Z");
    let second = of(2);
    assert_eq!(second["activity"]["coding"][0]["code"], "UPDATE");
    assert_eq!(second["entity"][0]["role"], "revision");
    assert_eq!(
        second["entity"][0]["what"]["reference"],
        format!("Observation/{id}/_history/1")
    );
    let third = of(3);
    assert_eq!(third["activity"]["coding"][0]["code"], "DELETE");
    assert_eq!(third["entity"][0]["role"], "removal");

    for (reply, name, action, version) in [
        (&created, "create", "C", 1),
        (&updated, "update", "U", 2),
        (&deleted, "delete", "D", 3),
    ] {
        let events = h.events_of(&reply.request_id).await;
        assert_eq!(events.len(), 1, "{name}: {events:#?}");
        let e = &events[0];
        assert_eq!(subtype(e), name);
        assert_eq!(e["action"], action);
        assert_eq!(e["outcome"], "0");
        assert_eq!(e["agent"][0]["who"]["identifier"]["value"], "drwho");
        assert!(references(e).contains(&format!("Observation/{id}/_history/{version}")));
        assert_eq!(patient_of(e).as_deref(), Some("Patient/a"));
    }
}

#[tokio::test]
async fn a_transaction_gets_a_provenance_per_entry_and_keeps_the_clients_own_linked() {
    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:11111111-1111-1111-1111-111111111111",
             "resource": {"resourceType": "Patient", "name": [{"family": "Lake"}]},
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "urn:uuid:22222222-2222-2222-2222-222222222222",
             "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                          "subject": {"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"}},
             "request": {"method": "POST", "url": "Observation"}},
            {"resource": {"resourceType": "Provenance",
                          "target": [{"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"},
                                     {"reference": "urn:uuid:22222222-2222-2222-2222-222222222222"}],
                          "recorded": "2026-05-01T00:00:00Z",
                          "agent": [{"who": {"display": "the sending system"}}]},
             "request": {"method": "POST", "url": "Provenance"}}
        ]
    });
    let reply = h
        .send(Method::POST, "/fhir", Some(&system), Some(&bundle))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:#}", reply.body);
    let locations: Vec<String> = reply.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["location"].as_str().unwrap().to_owned())
        .collect();
    let [patient_at, observation_at, client_at] = &locations[..] else {
        panic!("three entries")
    };

    let provenances = h.provenances().await;
    let server: Vec<&Value> = provenances.iter().filter(|p| server_made(p)).collect();
    assert_eq!(
        server.len(),
        3,
        "one per entry, the client's Provenance too"
    );
    let client: Vec<&Value> = provenances.iter().filter(|p| !server_made(p)).collect();
    assert_eq!(client.len(), 1, "the client's Provenance is kept");
    assert_eq!(
        client[0]["agent"][0]["who"]["display"],
        "the sending system"
    );
    let client_id = client[0]["id"].as_str().unwrap();
    assert!(client_at.contains(client_id));
    for at in [patient_at, observation_at] {
        let versioned = at.split_once("/fhir/").map_or(at.as_str(), |(_, r)| r);
        let p = server
            .iter()
            .find(|p| targets(p) == [versioned.to_owned()])
            .unwrap_or_else(|| panic!("a Provenance for {versioned}"));
        assert_eq!(p["entity"][0]["role"], "source");
        assert_eq!(
            p["entity"][0]["what"]["reference"],
            format!("Provenance/{client_id}")
        );
    }

    let events = h.events_of(&reply.request_id).await;
    assert!(!events.is_empty());
    assert!(events
        .iter()
        .all(|e| subtype(e) == "transaction" && e["outcome"] == "0"));
    let all: Vec<String> = events.iter().flat_map(references).collect();
    for at in &locations {
        let versioned = at.split_once("/fhir/").map_or(at.as_str(), |(_, r)| r);
        assert!(
            all.contains(&versioned.to_owned()),
            "{versioned} in {all:?}"
        );
    }
}

#[tokio::test]
async fn a_batch_records_each_written_entry_and_the_batch_itself() {
    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    h.put(&system, &patient("a", "Shaw")).await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": observation("x", "a"), "request": {"method": "PUT", "url": "Observation/x"}},
            {"resource": {"resourceType": "Patient", "name": [{"family": "Lake"}]},
             "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/a"}},
            {"request": {"method": "GET", "url": "Patient/missing"}}
        ]
    });
    let reply = h
        .send(Method::POST, "/fhir", Some(&system), Some(&bundle))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:#}", reply.body);
    let events = h.events_of(&reply.request_id).await;
    let by: Vec<(&str, String)> = events
        .iter()
        .map(|e| {
            (
                subtype(e),
                e["action"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    // The PUT created Observation/x: both writes are creates.
    let creates = by.iter().filter(|b| **b == ("create", "C".into())).count();
    assert_eq!(creates, 2, "{by:?}");
    let batch: Vec<&Value> = events.iter().filter(|e| subtype(e) == "batch").collect();
    assert!(!batch.is_empty());
    let listed: Vec<String> = batch.iter().flat_map(|e| references(e)).collect();
    assert!(listed.contains(&"Observation/x/_history/1".to_owned()));
    assert!(
        listed.contains(&"Patient/a/_history/1".to_owned()),
        "the read entry"
    );
    let created = h.provenances().await.len();
    assert_eq!(created, 3, "Patient a, Observation x, the new Patient");
    // The entry that failed is on the trail on its own.
    let failed: Vec<&Value> = events.iter().filter(|e| e["outcome"] == "4").collect();
    assert_eq!(failed.len(), 1, "{events:#?}");
    assert_eq!(subtype(failed[0]), "read");
    assert!(references(failed[0]).contains(&"Patient/missing".to_owned()));
}

#[tokio::test]
async fn no_client_may_write_the_marks_of_a_server_made_provenance() {
    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    h.put(&system, &patient("a", "Shaw")).await;
    let forged = json!({
        "resourceType": "Provenance",
        "meta": {"tag": [{"system": "urn:haven:provenance", "code": "server"}]},
        "target": [{"reference": "Patient/a"}],
        "recorded": "2026-01-01T00:00:00Z",
        "agent": [{"who": {"display": "someone"}}],
    });
    let reply = h
        .send(
            Method::POST,
            "/fhir/Provenance",
            Some(&system),
            Some(&forged),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{:#}", reply.body);
    let mut extension = forged.clone();
    extension.as_object_mut().unwrap().remove("meta");
    extension["extension"] = json!([{
        "url": "urn:haven:provenance-target-patient",
        "valueReference": {"reference": "Patient/a"},
    }]);
    let reply = h
        .send(
            Method::POST,
            "/fhir/Provenance",
            Some(&system),
            Some(&extension),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let mut plain = forged.clone();
    plain.as_object_mut().unwrap().remove("meta");
    let kept = h
        .send(
            Method::POST,
            "/fhir/Provenance",
            Some(&system),
            Some(&plain),
        )
        .await;
    assert_eq!(
        kept.status,
        StatusCode::CREATED,
        "a client's own Provenance is kept"
    );
}

#[tokio::test]
async fn searches_by_post_and_in_bundles_are_audited_with_their_query() {
    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    h.put(&system, &patient("a", "Shaw")).await;
    let reply = h
        .router
        .clone()
        .oneshot(
            Request::builder()
                .method(Method::POST)
                .uri("/fhir/Patient/_search")
                .header("authorization", format!("Bearer {system}"))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-request-id", "post-search-1")
                .body(Body::from("family=Shaw"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let events = h.events_of("post-search-1").await;
    let query = events[0]["entity"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| e["query"].as_str())
        .expect("a query entity");
    let query = base64::engine::general_purpose::STANDARD
        .decode(query)
        .unwrap();
    assert_eq!(String::from_utf8(query).unwrap(), "Patient?family=Shaw");

    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": "AuditEvent?outcome=0"}}
    ]});
    let refused = h
        .send(Method::POST, "/fhir", Some(&system), Some(&bundle))
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_401_a_403_and_a_400_each_leave_an_audit_event_with_their_outcome() {
    let h = spawn().await;
    let practitioner = h.user_token("drwho", "user/Patient.rs", None).await;

    let anonymous = h.get("/fhir/Patient/a", None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let garbage = h.get("/fhir/Patient/a", Some("not-a-token")).await;
    assert_eq!(garbage.status, StatusCode::UNAUTHORIZED);
    let forbidden = h.get("/fhir/Observation/o", Some(&practitioner)).await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    let system = h.system_token("system/*.cruds").await;
    let bad = h
        .send(
            Method::POST,
            "/fhir/Patient",
            Some(&system),
            Some(&json!({"resourceType": "Patient", "gender": 7})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    for (reply, outcome) in [
        (&anonymous, "8"),
        (&garbage, "8"),
        (&forbidden, "8"),
        (&bad, "4"),
    ] {
        let events = h.events_of(&reply.request_id).await;
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0]["outcome"], outcome);
        assert!(events[0]["outcomeDesc"]
            .as_str()
            .is_some_and(|d| !d.is_empty()));
    }
    let garbage_event = &h.events_of(&garbage.request_id).await[0];
    assert!(!garbage_event.to_string().contains("not-a-token"));
    let forbidden_event = &h.events_of(&forbidden.request_id).await[0];
    assert_eq!(
        forbidden_event["agent"][0]["who"]["identifier"]["value"],
        "drwho"
    );
    assert!(references(forbidden_event).contains(&"Observation/o".to_owned()));
}

#[tokio::test]
async fn audit_events_cannot_be_created_changed_or_deleted_and_the_attempt_is_audited() {
    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    h.get("/fhir/metadata", None).await;
    let existing = h.events().await[0]["id"].as_str().unwrap().to_owned();
    let event = json!({"resourceType": "AuditEvent", "id": existing});
    let before = h.events().await.len();

    let attempts = [
        h.send(
            Method::POST,
            "/fhir/AuditEvent",
            Some(&system),
            Some(&event),
        )
        .await,
        h.send(
            Method::PUT,
            &format!("/fhir/AuditEvent/{existing}"),
            Some(&system),
            Some(&event),
        )
        .await,
        h.send(
            Method::DELETE,
            &format!("/fhir/AuditEvent/{existing}"),
            Some(&system),
            None,
        )
        .await,
        h.send(
            Method::DELETE,
            "/fhir/AuditEvent?outcome=0",
            Some(&system),
            None,
        )
        .await,
    ];
    for reply in &attempts {
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{:#}",
            reply.body
        );
        let events = h.events_of(&reply.request_id).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["outcome"], "4");
    }
    assert_eq!(h.events().await.len(), before + attempts.len());
    let read = h
        .get(&format!("/fhir/AuditEvent/{existing}"), Some(&system))
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body["subtype"][0]["code"], "capabilities");
}

#[tokio::test]
async fn a_patient_sees_who_read_their_record_and_no_one_elses_log() {
    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    for (p, o) in [("a", "oa"), ("b", "ob")] {
        h.put(&system, &patient(p, "X")).await;
        h.put(&system, &observation(o, p)).await;
    }
    let practitioner = h.user_token("drwho", "user/*.rs", None).await;
    assert_eq!(
        h.get("/fhir/Observation/oa", Some(&practitioner))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        h.get("/fhir/Observation/ob", Some(&practitioner))
            .await
            .status,
        StatusCode::OK
    );
    let search = h
        .get(
            "/fhir/Observation?subject=Patient/a,Patient/b",
            Some(&practitioner),
        )
        .await;
    assert_eq!(search.body["total"], 2);

    let amy = h.user_token("amy", "patient/*.rs", Some("a")).await;
    let log = h
        .get("/fhir/AuditEvent?patient=Patient/a&action=R", Some(&amy))
        .await;
    assert_eq!(log.status, StatusCode::OK, "{:#}", log.body);
    let entries: Vec<&Value> = log.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .collect();
    let seen_by_doctor = entries.iter().find(|e| {
        e["agent"][0]["who"]["reference"] == "Practitioner/dr"
            && references(e).contains(&"Observation/oa/_history/1".to_owned())
    });
    let seen = seen_by_doctor.expect("the practitioner's read of amy's Observation");
    assert!(agent_ids(seen).contains(&h.app), "from which app");
    assert!(seen["recorded"].is_string(), "when");
    // Nothing in amy's log names the other patient's data.
    for e in &entries {
        assert_eq!(patient_of(e).as_deref(), Some("Patient/a"), "{e:#}");
        assert!(!e.to_string().contains("Observation/ob"));
    }

    let all = h.get("/fhir/AuditEvent", Some(&amy)).await;
    assert_eq!(all.status, StatusCode::OK);
    for e in all.body["entry"].as_array().into_iter().flatten() {
        // About amy's record, or made by amy herself.
        let e = &e["resource"];
        // Not even through a query someone else made.
        assert!(
            e["entity"]
                .as_array()
                .unwrap()
                .iter()
                .all(|x| x.get("query").is_none()),
            "{e:#}"
        );
        assert!(
            patient_of(e).as_deref() == Some("Patient/a")
                || e["agent"][0]["who"]["reference"] == "Patient/a",
            "{e:#}"
        );
    }
    let other = h
        .get("/fhir/AuditEvent?patient=Patient/b", Some(&amy))
        .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    let b_event = h
        .events()
        .await
        .into_iter()
        .find(|e| patient_of(e).as_deref() == Some("Patient/b"))
        .unwrap();
    let direct = h
        .get(
            &format!("/fhir/AuditEvent/{}", b_event["id"].as_str().unwrap()),
            Some(&amy),
        )
        .await;
    assert_eq!(direct.status, StatusCode::FORBIDDEN);

    // A practitioner does not read the audit trail; an administrator does.
    let denied = h.get("/fhir/AuditEvent", Some(&practitioner)).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let admin = h.user_token("root", "user/AuditEvent.rs", None).await;
    let everything = h
        .get("/fhir/AuditEvent?patient=Patient/b", Some(&admin))
        .await;
    assert_eq!(everything.status, StatusCode::OK);
    assert!(everything.body["total"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn an_administrator_searches_the_trail_by_date_agent_entity_outcome_action_and_type() {
    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    h.put(&system, &patient("a", "Shaw")).await;
    let practitioner = h.user_token("drwho", "user/*.rs", None).await;
    h.get("/fhir/Patient/a", Some(&practitioner)).await;
    h.get("/fhir/Patient/zz", Some(&practitioner)).await;
    let admin = h.user_token("root", "user/AuditEvent.rs", None).await;

    let count = |q: &'static str| {
        let h = &h;
        let admin = admin.clone();
        async move {
            let reply = h.get(&format!("/fhir/AuditEvent?{q}"), Some(&admin)).await;
            assert_eq!(reply.status, StatusCode::OK, "{q}: {:#}", reply.body);
            reply.body["total"].as_u64().unwrap()
        }
    };
    assert_eq!(count("agent=drwho&subtype=read").await, 2);
    assert_eq!(count("agent=Practitioner/dr&outcome=4").await, 1);
    assert_eq!(count("entity=Patient/a&action=R").await, 1);
    assert_eq!(count("entity=Patient/a/_history/1&action=R").await, 1);
    assert_eq!(count("entity=Patient/a&action=C").await, 1, "the write");
    // The administrator's own searches of Patient/a's events are about Patient/a too.
    assert!(count("entity=Patient/a").await >= 2);
    assert_eq!(
        count("type=rest&action=C").await,
        1,
        "the PUT that created Patient/a"
    );
    assert_eq!(count("date=2026-06-01&agent=drwho").await, 2);
    assert_eq!(count("date=lt2026-05-01").await, 0);
    assert_eq!(
        count("subtype=http://hl7.org/fhir/restful-interaction|read&patient=a").await,
        1
    );
    let bad = h.get("/fhir/AuditEvent?outcome=3", Some(&admin)).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn provenance_is_searched_by_target_agent_recorded_and_patient_under_its_targets_rules() {
    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    for (p, o) in [("a", "oa"), ("b", "ob")] {
        h.put(&system, &patient(p, "X")).await;
        h.put(&system, &observation(o, p)).await;
    }
    let total = |reply: &Reply| reply.body["total"].as_u64().unwrap();

    let by_target = h
        .get(
            "/fhir/Provenance?target=Observation/oa/_history/1",
            Some(&system),
        )
        .await;
    assert_eq!(by_target.status, StatusCode::OK, "{:#}", by_target.body);
    assert_eq!(total(&by_target), 1);
    let practitioner = h.user_token("drwho", "user/*.cruds", None).await;
    let created = h
        .send(
            Method::POST,
            "/fhir/Observation",
            Some(&practitioner),
            Some(&observation("new", "a")),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let by_agent = h
        .get("/fhir/Provenance?agent=Practitioner/dr", Some(&system))
        .await;
    assert_eq!(total(&by_agent), 1, "{:#}", by_agent.body);
    let recorded = h
        .get("/fhir/Provenance?recorded=2026-06-01", Some(&system))
        .await;
    assert_eq!(total(&recorded), 5);
    let none = h
        .get("/fhir/Provenance?recorded=lt2026-01-01", Some(&system))
        .await;
    assert_eq!(total(&none), 0);
    let of_a = h
        .get(
            "/fhir/Provenance?patient=Patient/a/_history/1",
            Some(&system),
        )
        .await;
    assert_eq!(total(&of_a), 3, "the Patient's and the two Observations'");

    let amy = h.user_token("amy", "patient/*.rs", Some("a")).await;
    let mine = h.get("/fhir/Provenance", Some(&amy)).await;
    assert_eq!(mine.status, StatusCode::OK);
    assert_eq!(total(&mine), 3);
    // Provenance tells of its target: a scope for Provenance alone does not reach it.
    let provenance_only = h
        .user_token("drwho", "user/Provenance.rs user/Patient.rs", None)
        .await;
    let hidden = h
        .get("/fhir/Provenance?patient=a", Some(&provenance_only))
        .await;
    assert_eq!(hidden.status, StatusCode::OK);
    assert_eq!(
        total(&hidden),
        1,
        "only the Patient's, not the Observations'"
    );
    let of_b = h
        .provenances()
        .await
        .into_iter()
        .find(|p| targets(p) == ["Observation/ob/_history/1"])
        .unwrap();
    let read = h
        .get(
            &format!("/fhir/Provenance/{}", of_b["id"].as_str().unwrap()),
            Some(&amy),
        )
        .await;
    assert_eq!(read.status, StatusCode::FORBIDDEN);

    // Server-made Provenance is part of the record.
    let change = h
        .send(
            Method::DELETE,
            &format!("/fhir/Provenance/{}", of_b["id"].as_str().unwrap()),
            Some(&system),
            None,
        )
        .await;
    assert_eq!(change.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_trail_verifies_over_http_for_system_clients_and_administrators_only() {
    let h = spawn().await;
    let system = h.system_token("system/AuditEvent.rs").await;
    h.get("/fhir/metadata", None).await;
    let reply = h.get("/fhir/AuditEvent/$verify", Some(&system)).await;
    assert_eq!(reply.status, StatusCode::OK, "{:#}", reply.body);
    let parameter = |name: &str| {
        reply.body["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(parameter("verified")["valueBoolean"], true);
    assert!(parameter("records")["valueInteger"].as_u64().unwrap() >= 1);
    assert_eq!(parameter("head")["valueString"].as_str().unwrap().len(), 64);

    let amy = h.user_token("amy", "patient/*.rs", Some("a")).await;
    assert_eq!(
        h.get("/fhir/AuditEvent/$verify", Some(&amy)).await.status,
        StatusCode::FORBIDDEN
    );
}

// ---- fail closed ----

/// Makes the audit table refuse inserts, as a full disk or a broken database
/// would, straight in the database.
async fn break_audit_table(database_url: &str) {
    use sqlx::Connection;
    let mut connection = sqlx::SqliteConnection::connect(database_url).await.unwrap();
    sqlx::query(
        "CREATE TRIGGER audit_refused BEFORE INSERT ON audit_events \
         BEGIN SELECT RAISE(ABORT, 'the audit table is unwritable'); END",
    )
    .execute(&mut connection)
    .await
    .unwrap();
}

#[tokio::test]
async fn with_the_audit_table_unwritable_a_read_returns_no_data_and_a_write_commits_nothing() {
    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    h.put(&system, &patient("a", "Secret")).await;
    break_audit_table(&h.database_url).await;
    nothing_is_answered_or_written(&h, &system).await;
}

#[tokio::test]
async fn on_postgresql_a_revoked_insert_privilege_on_the_audit_table_fails_closed_too() {
    use sqlx::Connection;
    let Ok(admin_url) = std::env::var("HAVEN_TEST_POSTGRES_URL") else {
        println!("not run: HAVEN_TEST_POSTGRES_URL is not set");
        return;
    };
    let name = format!("haven_audit_{}", uuid::Uuid::new_v4().simple());
    let role = format!("haven_app_{}", uuid::Uuid::new_v4().simple());
    let password = uuid::Uuid::new_v4().simple().to_string();
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    let owner_url = format!("{base}/{name}");
    // The schema is made by the owner; the server runs as a role with data rights only.
    haven_store::migrate(&owner_url).await.unwrap();
    let mut owner = sqlx::PgConnection::connect(&owner_url).await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{password}'; \
         GRANT USAGE, CREATE ON SCHEMA public TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role};"
    ))
    .execute(&mut owner)
    .await
    .unwrap();
    let host = base
        .rsplit_once('@')
        .map_or(base.trim_start_matches("postgres://"), |(_, h)| h);
    let app_url = format!("postgres://{role}:{password}@{host}/{name}");

    let revoke = format!("REVOKE INSERT ON audit_events FROM {role}");
    // Caught, so that the database and role are dropped whatever happens.
    let story = std::panic::AssertUnwindSafe(async {
        let h = spawn_on(app_url, None).await;
        let system = h.system_token("system/*.cruds").await;
        assert_eq!(
            h.put(&system, &patient("a", "Secret")).await.status,
            StatusCode::CREATED
        );
        sqlx::raw_sql(&revoke).execute(&mut owner).await.unwrap();
        nothing_is_answered_or_written(&h, &system).await;
    });
    let story = futures::FutureExt::catch_unwind(story).await;
    drop(owner);
    for statement in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("DROP ROLE IF EXISTS {role}"),
    ] {
        sqlx::raw_sql(&statement).execute(&mut admin).await.unwrap();
    }
    if let Err(failure) = story {
        std::panic::resume_unwind(failure);
    }
}

/// With audit records refused by the database: reads and searches answer 500
/// without the data, and writes leave no trace.
async fn nothing_is_answered_or_written(h: &Audited, system: &str) {
    let before = h.provenances().await.len();
    let read = h.get("/fhir/Patient/a", Some(system)).await;
    assert_eq!(read.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(read.body["resourceType"], "OperationOutcome");
    assert!(!read.body.to_string().contains("Secret"));

    let search = h.get("/fhir/Patient?name=Secret", Some(system)).await;
    assert_eq!(search.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!search.body.to_string().contains("Secret"));

    let write = h.put(system, &patient("b", "Other")).await;
    assert_eq!(write.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(h.store.read("Patient", "b").await.unwrap().is_none());
    assert_eq!(h.provenances().await.len(), before);

    let update = h.put(system, &patient("a", "Changed")).await;
    assert_eq!(update.status, StatusCode::INTERNAL_SERVER_ERROR);
    let current = h.store.read("Patient", "a").await.unwrap().unwrap();
    assert_eq!(current.version, 1);
}

// ---- the Synthea corpus ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_a_synthea_bundle_leaves_one_provenance_per_created_version_and_its_audit_events() {
    let Some(shared) = support::shared_dir() else {
        println!("not run: HAVEN_SHARED is not set");
        return;
    };
    let dir = shared.join("synthea");
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .expect("the synthea directory")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("hospital") || name.starts_with("practitioner")
        })
        .collect();
    files.sort();
    // The patient bundles refer to the hospitals and practitioners loaded first.
    files.push(dir.join("Clemente_Kreiger_1484a42d-0eaf-4654-9cbf-6b050a5cd73b.json"));

    let h = spawn().await;
    let system = h.system_token("system/*.cruds").await;
    let mut created: Vec<String> = Vec::new();
    let mut last = None;
    for file in &files {
        let bundle: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        let reply = h
            .send(Method::POST, "/fhir", Some(&system), Some(&bundle))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", file.display());
        for answer in reply.body["entry"].as_array().unwrap() {
            assert_eq!(answer["response"]["status"], "201 Created");
            let location = answer["response"]["location"].as_str().unwrap();
            created.push(location.trim_start_matches(&format!("{BASE}/")).to_owned());
        }
        last = Some((reply, bundle));
    }

    let provenances = h.provenances().await;
    assert_eq!(
        provenances.len(),
        created.len(),
        "one Provenance per created resource"
    );
    let mut targeted: Vec<String> = provenances
        .iter()
        .inspect(|p| {
            assert!(server_made(p));
            assert_eq!(p["activity"]["coding"][0]["code"], "CREATE");
            assert_eq!(p["agent"][0]["who"]["identifier"]["value"], h.backend);
        })
        .flat_map(targets)
        .collect();
    targeted.sort();
    let mut expected = created.clone();
    expected.sort();
    assert_eq!(targeted, expected, "each targets the version created");

    let (reply, bundle) = last.unwrap();
    let patient_id = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reply.body["entry"].as_array().unwrap())
        .find(|(sent, _)| sent["resource"]["resourceType"] == "Patient")
        .and_then(|(_, answer)| answer["response"]["location"].as_str())
        .map(|l| {
            l.trim_start_matches(&format!("{BASE}/"))
                .split('/')
                .nth(1)
                .unwrap()
                .to_owned()
        })
        .unwrap();
    let events = h.events_of(&reply.request_id).await;
    assert!(events
        .iter()
        .all(|e| subtype(e) == "transaction" && e["action"] == "E"));
    let about_patient: Vec<&Value> = events
        .iter()
        .filter(|e| patient_of(e) == Some(format!("Patient/{patient_id}")))
        .collect();
    assert_eq!(about_patient.len(), 1, "one event for the patient's record");
    let listed: Vec<String> = events.iter().flat_map(references).collect();
    for answer in reply.body["entry"].as_array().unwrap() {
        let location = answer["response"]["location"].as_str().unwrap();
        let versioned = location.trim_start_matches(&format!("{BASE}/"));
        assert!(
            listed.iter().any(|r| r == versioned),
            "{versioned} is in the audit record"
        );
    }
    let verify = h.get("/fhir/AuditEvent/$verify", Some(&system)).await;
    assert_eq!(verify.body["parameter"][0]["valueBoolean"], true);
}
