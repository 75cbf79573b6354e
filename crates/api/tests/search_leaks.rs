//! Searches must not leak what a token cannot read. The token's authorization
//! is part of the database query, so every way a search reaches data (totals,
//! paging, `_include`, `_revinclude`, chains, `_has`, system search over
//! several types) sees only the resources the token may read.
//!
//! Each story would fail if the server ran the unrestricted query (counting,
//! paging, including and chaining over everything) and only dropped the
//! forbidden rows from the page it answers with. Every story runs on SQLite and,
//! when `HAVEN_TEST_POSTGRES_URL` names an admin URL, on PostgreSQL (a fresh
//! database per test, dropped afterwards, also when the story fails).

mod support;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use haven_api::{router, ApiConfig, AppState};
use haven_auth::registry::Role;
use haven_model::clock::{Clock, ManualClock};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::{secured, Reply};
use tempfile::TempDir;
use time::macros::datetime;

const ORIGIN: &str = "https://haven.test";
const BASE: &str = "https://haven.test/fhir";

const LOINC: &str = "http://loinc.org";
const CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

/// Patient A's id; the patient user `amy` is A.
const A: &str = "patient-a";
/// Patient B's id.
const B: &str = "patient-b";
/// Patient A's family name (A is female).
const A_FAMILY: &str = "Shaw";
/// Patient B's family name (B is male).
const B_FAMILY: &str = "Field";
/// A laboratory code only B has a result for (glucose).
const B_ONLY_LAB_CODE: &str = "2345-7";
/// A vital-signs code only B has a result for (systolic blood pressure).
const B_ONLY_VITAL_CODE: &str = "8480-6";

/// The all-access user: a practitioner.
const PRACTITIONER: &str = "drjones";
/// The patient user whose patient is A.
const AMY: &str = "amy";

/// A SMART-secured, audited app over one store.
struct Haven {
    router: Router,
    /// The authorization server and the client id.
    smart: secured::Smart,
    clock: Arc<ManualClock>,
    _dir: Option<TempDir>,
}

async fn spawn_on(database_url: &str, dir: Option<TempDir>) -> Haven {
    let clock = Arc::new(ManualClock::new(datetime!(2026-07-01 09:00 UTC)));
    let store = haven_store::connect(database_url, clock.clone() as Arc<dyn Clock>)
        .await
        .unwrap();
    let state = AppState::new(store.clone(), clock.clone(), ApiConfig::new(BASE));
    let (state, smart) = secured::secure(state, store, clock.clone(), BASE).await;
    let amy_patient = format!("Patient/{A}");
    smart
        .add_users(&[
            (PRACTITIONER, Role::Practitioner, Some("Practitioner/dj")),
            (AMY, Role::Patient, Some(&amy_patient)),
        ])
        .await;
    Haven {
        router: router(state),
        smart,
        clock,
        _dir: dir,
    }
}

// ---- backends ----

async fn on_sqlite<F, Fut>(story: F)
where
    F: FnOnce(Haven) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("haven.db").display());
    story(spawn_on(&url, Some(dir)).await).await;
}

async fn on_postgres<F, Fut>(story: F)
where
    F: FnOnce(Haven) -> Fut,
    Fut: Future<Output = ()>,
{
    support::postgres::with_fresh_database("haven_leaks", |url| async move {
        story(spawn_on(&url, None).await).await;
    })
    .await;
}

/// Declares each story once per backend, as `sqlite::story` and `postgres::story`.
macro_rules! stories {
    ($($story:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $story() {
                    super::on_sqlite(super::$story).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $story() {
                    super::on_postgres(super::$story).await;
                }
            )*
        }
    };
}

stories!(
    a_patient_token_counts_only_its_own_patients_observations_in_the_total,
    paging_with_a_patient_token_visits_each_of_its_own_observations_once_and_nothing_else,
    includes_bring_in_only_patients_the_token_may_read,
    revincludes_bring_in_only_observations_the_restricted_scope_allows,
    a_chain_cannot_test_values_of_patients_the_token_cannot_read,
    a_reverse_chain_cannot_test_values_of_observations_the_token_cannot_read,
    a_category_restricted_scope_counts_and_pages_only_that_category,
    a_system_search_over_several_types_counts_only_the_patients_own_data,
    hostile_search_values_are_answered_with_an_outcome_never_a_server_error,
    a_provenance_with_a_target_the_token_cannot_read_is_neither_found_nor_usable_in_has,
    a_scope_restriction_the_content_rule_cannot_evaluate_admits_nothing,
);

// ---- requests, tokens and data ----

/// `path?pairs`, with the pairs percent-encoded.
fn url(path: &str, pairs: &[(&str, &str)]) -> String {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("{path}?{query}")
}

/// What the test knows it created.
struct World {
    /// `Observation/<id>` of each patient's Observations.
    a_observations: BTreeSet<String>,
    b_observations: BTreeSet<String>,
    /// `Observation/<id>` by category, both patients.
    laboratory: BTreeSet<String>,
    vital_signs: BTreeSet<String>,
    /// `Condition/<id>` of each patient's Conditions.
    a_conditions: BTreeSet<String>,
    b_conditions: BTreeSet<String>,
    /// A token that may read and write everything.
    all: String,
}

impl World {
    fn a_vital_signs(&self) -> BTreeSet<String> {
        self.a_observations
            .intersection(&self.vital_signs)
            .cloned()
            .collect()
    }
}

fn observation(patient: &str, category: &str, loinc: &str, display: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}]},
        "subject": {"reference": format!("Patient/{patient}")},
    })
}

fn condition(patient: &str, text: &str) -> Value {
    json!({
        "resourceType": "Condition",
        "code": {"text": text},
        "subject": {"reference": format!("Patient/{patient}")},
    })
}

impl Haven {
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let request = support::fhir_request(method, path, token, body, &[]);
        support::call(&self.router, request).await
    }

    async fn get(&self, path: &str, token: &str) -> Reply {
        self.send(Method::GET, path, Some(token), None).await
    }

    /// A search that must succeed: its searchset Bundle.
    async fn search(&self, path: &str, token: &str) -> Value {
        let reply = self.get(path, token).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
        assert_eq!(reply.body["resourceType"], "Bundle", "{path}");
        assert_eq!(reply.body["type"], "searchset", "{path}");
        for entry in reply.body["entry"].as_array().into_iter().flatten() {
            let mode = entry["search"]["mode"].as_str().unwrap_or_default();
            assert!(
                matches!(mode, "match" | "include" | "outcome"),
                "{path}: an entry without a search mode: {entry}"
            );
        }
        reply.body
    }

    /// Follows `next` from `first` and returns every page; stops (failing)
    /// after `limit` pages, so that a link cycle cannot hang the test.
    async fn pages(&self, first: &str, token: &str, limit: usize) -> Vec<Value> {
        let mut pages = vec![self.search(first, token).await];
        while let Some(next) = link(pages.last().unwrap(), "next") {
            assert!(
                pages.len() < limit,
                "{first}: more than {limit} pages; next is {next}"
            );
            let path = next
                .strip_prefix(ORIGIN)
                .unwrap_or_else(|| panic!("a next link outside the server: {next}"));
            pages.push(self.search(path, token).await);
        }
        pages
    }

    /// A user's token with `scope`, through the authorization server's steps.
    /// The patient user's token has their patient in context.
    async fn token(&self, username: &str, scope: &str) -> String {
        self.smart.token(username, scope).await
    }

    /// A patient's token: Amy's, with patient A in context.
    async fn patient_token(&self, scope: &str) -> String {
        self.token(AMY, scope).await
    }

    /// A practitioner's token, with no patient in context.
    async fn user_token(&self, scope: &str) -> String {
        self.token(PRACTITIONER, scope).await
    }

    /// Creates through the API with `token`; returns `Type/id`.
    async fn create(&self, token: &str, resource: &Value) -> String {
        let resource_type = resource["resourceType"].as_str().unwrap();
        let reply = self
            .send(
                Method::POST,
                &format!("/fhir/{resource_type}"),
                Some(token),
                Some(resource),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        // Distinct lastUpdated instants keep the order of results unambiguous.
        self.clock.advance(time::Duration::seconds(1));
        format!("{resource_type}/{}", reply.body["id"].as_str().unwrap())
    }

    /// Patients A (female, Shaw) and B (male, Field); A with three Observations
    /// (two laboratory, one vital-signs) and two Conditions, B with five
    /// Observations (three laboratory, two vital-signs) and three Conditions.
    /// Everything is written with an all-access token.
    async fn seed(&self) -> World {
        let all = self.user_token("user/*.cruds").await;
        for (id, family, given, gender) in
            [(A, A_FAMILY, "Amy", "female"), (B, B_FAMILY, "Bob", "male")]
        {
            let patient = json!({
                "resourceType": "Patient",
                "id": id,
                "gender": gender,
                "birthDate": "1980-02-03",
                "name": [{"family": family, "given": [given]}],
            });
            let reply = self
                .send(
                    Method::PUT,
                    &format!("/fhir/Patient/{id}"),
                    Some(&all),
                    Some(&patient),
                )
                .await;
            assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
            self.clock.advance(time::Duration::seconds(1));
        }
        let mut world = World {
            a_observations: BTreeSet::new(),
            b_observations: BTreeSet::new(),
            laboratory: BTreeSet::new(),
            vital_signs: BTreeSet::new(),
            a_conditions: BTreeSet::new(),
            b_conditions: BTreeSet::new(),
            all,
        };
        let observations = [
            (A, "laboratory", "718-7", "Hemoglobin"),
            (A, "laboratory", "2160-0", "Creatinine"),
            (A, "vital-signs", "8867-4", "Heart rate"),
            (B, "laboratory", B_ONLY_LAB_CODE, "Glucose"),
            (B, "laboratory", "718-7", "Hemoglobin"),
            (B, "laboratory", "6690-2", "Leukocytes"),
            (
                B,
                "vital-signs",
                B_ONLY_VITAL_CODE,
                "Systolic blood pressure",
            ),
            (B, "vital-signs", "8310-5", "Body temperature"),
        ];
        for (patient, category, code, display) in observations {
            let id = self
                .create(&world.all, &observation(patient, category, code, display))
                .await;
            if patient == A {
                world.a_observations.insert(id.clone());
            } else {
                world.b_observations.insert(id.clone());
            }
            if category == "laboratory" {
                world.laboratory.insert(id);
            } else {
                world.vital_signs.insert(id);
            }
        }
        for (patient, text) in [
            (A, "Asthma"),
            (A, "Hay fever"),
            (B, "Hypertension"),
            (B, "Diabetes"),
            (B, "Gout"),
        ] {
            let id = self.create(&world.all, &condition(patient, text)).await;
            if patient == A {
                world.a_conditions.insert(id);
            } else {
                world.b_conditions.insert(id);
            }
        }
        assert!(world.a_observations.len() < world.b_observations.len());
        world
    }
}

/// `Type/id` of the entries of a Bundle with this search mode.
fn entries(bundle: &Value, mode: &str) -> Vec<String> {
    let mut found: Vec<String> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] == mode)
        .map(|e| {
            format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap_or_default(),
                e["resource"]["id"].as_str().unwrap_or_default()
            )
        })
        .collect();
    found.sort();
    found
}

fn matches(bundle: &Value) -> Vec<String> {
    entries(bundle, "match")
}

fn includes(bundle: &Value) -> Vec<String> {
    entries(bundle, "include")
}

fn sorted(set: &BTreeSet<String>) -> Vec<String> {
    set.iter().cloned().collect()
}

fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["relation"] == relation)
        .and_then(|l| l["url"].as_str())
        .map(str::to_owned)
}

fn total(bundle: &Value) -> &Value {
    &bundle["total"]
}

// ---- the stories ----

/// `_total` counts what the token may read, not every Observation.
async fn a_patient_token_counts_only_its_own_patients_observations_in_the_total(h: Haven) {
    let world = h.seed().await;
    let token = h.patient_token("patient/Observation.rs").await;

    let found = h
        .search(&url("/fhir/Observation", &[("_total", "accurate")]), &token)
        .await;
    assert_eq!(
        total(&found),
        world.a_observations.len(),
        "A's Observations only, not A's and B's: {found}"
    );
    assert_eq!(matches(&found), sorted(&world.a_observations));
    assert!(includes(&found).is_empty());
    assert!(link(&found, "next").is_none(), "{found}");

    // The all-access token counts both patients: the data is there.
    let everything = h
        .search(
            &url("/fhir/Observation", &[("_total", "accurate")]),
            &world.all,
        )
        .await;
    assert_eq!(
        total(&everything),
        world.a_observations.len() + world.b_observations.len()
    );
}

/// Pages are cut from what the token may read: every page holds one of A's
/// Observations, and there are exactly as many pages as A has Observations.
async fn paging_with_a_patient_token_visits_each_of_its_own_observations_once_and_nothing_else(
    h: Haven,
) {
    let world = h.seed().await;
    let token = h.patient_token("patient/Observation.rs").await;

    let first = url(
        "/fhir/Observation",
        &[("_count", "1"), ("_total", "accurate")],
    );
    let pages = h.pages(&first, &token, 20).await;
    let mut visited = Vec::new();
    for (n, page) in pages.iter().enumerate() {
        let on_page = matches(page);
        assert_eq!(
            on_page.len(),
            1,
            "page {n} holds one match, none empty but linked: {page}"
        );
        assert!(includes(page).is_empty(), "page {n}: {page}");
        assert!(link(page, "self").is_some(), "page {n} has a self link");
        if !page["total"].is_null() {
            assert_eq!(total(page), world.a_observations.len(), "page {n}");
        }
        visited.extend(on_page);
    }
    assert_eq!(
        pages.len(),
        world.a_observations.len(),
        "as many pages as A has Observations"
    );
    let unique: BTreeSet<String> = visited.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        visited.len(),
        "each visited once: {visited:?}"
    );
    assert_eq!(unique, world.a_observations);
}

/// `_include` follows references only to resources the token may read; the
/// matches and the total are A's Observations.
async fn includes_bring_in_only_patients_the_token_may_read(h: Haven) {
    let mut world = h.seed().await;
    // An Observation of A performed by B (a reference into B's record).
    let mut performed = observation(A, "laboratory", "4548-4", "Hemoglobin A1c");
    performed["performer"] = json!([{"reference": format!("Patient/{B}")}]);
    let performed = h.create(&world.all, &performed).await;
    world.a_observations.insert(performed.clone());
    world.laboratory.insert(performed.clone());
    let own = sorted(&world.a_observations);

    // With access to everything, the include does reach B.
    let everything = h
        .search(
            &url(
                "/fhir/Observation",
                &[
                    ("_id", performed.trim_start_matches("Observation/")),
                    ("_include", "Observation:performer"),
                ],
            ),
            &world.all,
        )
        .await;
    assert_eq!(includes(&everything), [format!("Patient/{B}")]);

    let token = h
        .patient_token("patient/Observation.rs patient/Patient.rs")
        .await;
    let by_performer = h
        .search(
            &url(
                "/fhir/Observation",
                &[
                    ("_include", "Observation:performer"),
                    ("_total", "accurate"),
                ],
            ),
            &token,
        )
        .await;
    assert_eq!(matches(&by_performer), own, "{by_performer}");
    assert_eq!(total(&by_performer), own.len(), "{by_performer}");
    assert!(
        includes(&by_performer).is_empty(),
        "Patient B is not included: {by_performer}"
    );
    assert!(
        !by_performer.to_string().contains(B_FAMILY),
        "nothing of B's record: {by_performer}"
    );

    let by_subject = h
        .search(
            &url(
                "/fhir/Observation",
                &[("_include", "Observation:subject"), ("_total", "accurate")],
            ),
            &token,
        )
        .await;
    assert_eq!(matches(&by_subject), own, "{by_subject}");
    assert_eq!(total(&by_subject), own.len(), "includes are not counted");
    assert_eq!(
        includes(&by_subject),
        [format!("Patient/{A}")],
        "Patient A once, as an include: {by_subject}"
    );

    // Without a Patient scope no Patient is included at all.
    let observations_only = h.patient_token("patient/Observation.rs").await;
    for include in ["Observation:subject", "Observation:performer"] {
        let found = h
            .search(
                &url(
                    "/fhir/Observation",
                    &[("_include", include), ("_total", "accurate")],
                ),
                &observations_only,
            )
            .await;
        assert_eq!(matches(&found), own, "{include}: {found}");
        assert_eq!(total(&found), own.len(), "{include}: {found}");
        assert!(
            includes(&found).is_empty(),
            "{include}: no Patient without a Patient scope: {found}"
        );
    }
}

/// `_revinclude` brings in only Observations the restricted scope allows, and
/// the Patients matched are those the token may read.
async fn revincludes_bring_in_only_observations_the_restricted_scope_allows(h: Haven) {
    let world = h.seed().await;
    let token = h
        .patient_token("patient/Patient.rs patient/Observation.rs?category=vital-signs")
        .await;
    let vital_signs = sorted(&world.a_vital_signs());
    assert!(!vital_signs.is_empty());

    let found = h
        .search(
            &url(
                "/fhir/Patient",
                &[
                    ("_id", A),
                    ("_revinclude", "Observation:subject"),
                    ("_total", "accurate"),
                ],
            ),
            &token,
        )
        .await;
    assert_eq!(matches(&found), [format!("Patient/{A}")], "{found}");
    assert_eq!(total(&found), 1, "{found}");
    assert_eq!(
        includes(&found),
        vital_signs,
        "A's vital signs, no laboratory result: {found}"
    );

    // Without `_id` the search is over every Patient: still only A, counted once.
    let unnamed = h
        .search(
            &url(
                "/fhir/Patient",
                &[
                    ("_revinclude", "Observation:subject"),
                    ("_total", "accurate"),
                ],
            ),
            &token,
        )
        .await;
    assert_eq!(matches(&unnamed), [format!("Patient/{A}")], "{unnamed}");
    assert_eq!(total(&unnamed), 1, "{unnamed}");
    assert_eq!(includes(&unnamed), vital_signs, "{unnamed}");
}

/// A chain through `subject` cannot test the names of Patients the token does
/// not read, with no Patient scope or with one restricted to other Patients.
async fn a_chain_cannot_test_values_of_patients_the_token_cannot_read(h: Haven) {
    let world = h.seed().await;
    let by_b_name = url(
        "/fhir/Observation",
        &[("subject:Patient.name", B_FAMILY), ("_total", "accurate")],
    );
    let by_a_name = url(
        "/fhir/Observation",
        &[("subject:Patient.name", A_FAMILY), ("_total", "accurate")],
    );

    // With access to everything the chain finds B's Observations.
    let everything = h.search(&by_b_name, &world.all).await;
    assert_eq!(matches(&everything), sorted(&world.b_observations));
    assert_eq!(total(&everything), world.b_observations.len());

    // No Patient scope at all: the chain cannot look at names.
    let observations_only = h.user_token("user/Observation.rs").await;
    let found = h.search(&by_b_name, &observations_only).await;
    assert_eq!(total(&found), 0, "{found}");
    assert!(matches(&found).is_empty(), "{found}");
    assert!(includes(&found).is_empty(), "{found}");

    // Patients restricted to women: B (a man) cannot be found by name.
    let women = h
        .user_token("user/Observation.rs user/Patient.rs?gender=female")
        .await;
    let found = h.search(&by_b_name, &women).await;
    assert_eq!(total(&found), 0, "{found}");
    assert!(matches(&found).is_empty(), "{found}");
    // A (a woman) can: the chain itself works for this token.
    let found = h.search(&by_a_name, &women).await;
    assert_eq!(matches(&found), sorted(&world.a_observations), "{found}");
    assert_eq!(total(&found), world.a_observations.len(), "{found}");
}

/// `_has` cannot test the codes of Observations the token does not read, with
/// no Observation scope or with one restricted to another category.
async fn a_reverse_chain_cannot_test_values_of_observations_the_token_cannot_read(h: Haven) {
    let world = h.seed().await;
    let has = |code: &str| {
        url(
            "/fhir/Patient",
            &[
                ("_has:Observation:patient:code", &format!("{LOINC}|{code}")),
                ("_total", "accurate"),
            ],
        )
    };

    // With access to everything, B's laboratory code finds B.
    let everything = h.search(&has(B_ONLY_LAB_CODE), &world.all).await;
    assert_eq!(matches(&everything), [format!("Patient/{B}")]);
    assert_eq!(total(&everything), 1);

    // No Observation scope at all.
    let patients_only = h.user_token("user/Patient.rs").await;
    let found = h.search(&has(B_ONLY_LAB_CODE), &patients_only).await;
    assert_eq!(total(&found), 0, "{found}");
    assert!(matches(&found).is_empty(), "{found}");

    // Observations restricted to vital signs: a laboratory code finds nobody,
    // whether only B or both have a result with it...
    let vital_signs = h
        .user_token("user/Patient.rs user/Observation.rs?category=vital-signs")
        .await;
    for code in [B_ONLY_LAB_CODE, "718-7"] {
        let found = h.search(&has(code), &vital_signs).await;
        assert_eq!(total(&found), 0, "{code}: {found}");
        assert!(matches(&found).is_empty(), "{code}: {found}");
    }
    // ...while a vital-signs code does: `_has` itself works for this token.
    let found = h.search(&has(B_ONLY_VITAL_CODE), &vital_signs).await;
    assert_eq!(matches(&found), [format!("Patient/{B}")], "{found}");
    assert_eq!(total(&found), 1, "{found}");
}

/// A v2 restriction (`?category=laboratory`) is part of the query: the total
/// counts laboratory results only and every page holds only them.
async fn a_category_restricted_scope_counts_and_pages_only_that_category(h: Haven) {
    let world = h.seed().await;
    let token = h
        .user_token("user/Observation.rs?category=laboratory")
        .await;
    assert!(world.laboratory.len() > 2, "more than one page");

    let first = url(
        "/fhir/Observation",
        &[("_total", "accurate"), ("_count", "2")],
    );
    let pages = h.pages(&first, &token, 20).await;
    assert_eq!(total(&pages[0]), world.laboratory.len(), "{}", pages[0]);
    let mut visited = Vec::new();
    for (n, page) in pages.iter().enumerate() {
        let on_page = matches(page);
        assert!(
            !on_page.is_empty() && on_page.len() <= 2,
            "page {n} holds one or two matches: {page}"
        );
        for entry in page["entry"].as_array().into_iter().flatten() {
            if entry["search"]["mode"] == "match" {
                assert_eq!(
                    entry["resource"]["category"][0]["coding"][0]["code"], "laboratory",
                    "page {n}: {entry}"
                );
            }
        }
        visited.extend(on_page);
    }
    assert_eq!(pages.len(), world.laboratory.len().div_ceil(2));
    let unique: BTreeSet<String> = visited.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        visited.len(),
        "each visited once: {visited:?}"
    );
    assert_eq!(unique, world.laboratory);
}

/// A system search over Observations and Conditions counts and returns only
/// patient A's.
async fn a_system_search_over_several_types_counts_only_the_patients_own_data(h: Haven) {
    let world = h.seed().await;
    let token = h
        .patient_token("patient/Observation.rs patient/Condition.rs")
        .await;
    let own: BTreeSet<String> = world
        .a_observations
        .union(&world.a_conditions)
        .cloned()
        .collect();

    let found = h
        .search(
            &url(
                "/fhir",
                &[("_type", "Observation,Condition"), ("_total", "accurate")],
            ),
            &token,
        )
        .await;
    assert_eq!(total(&found), own.len(), "{found}");
    assert_eq!(matches(&found), sorted(&own), "{found}");

    // Paged one by one, the pages visit exactly the same resources.
    let first = url(
        "/fhir",
        &[("_type", "Observation,Condition"), ("_count", "1")],
    );
    let pages = h.pages(&first, &token, 30).await;
    let visited: Vec<String> = pages.iter().flat_map(matches).collect();
    assert_eq!(pages.len(), own.len(), "{visited:?}");
    assert_eq!(visited.iter().cloned().collect::<BTreeSet<_>>(), own);

    // The all-access token counts both patients' data.
    let everything = h
        .search(
            &url(
                "/fhir",
                &[("_type", "Observation,Condition"), ("_total", "accurate")],
            ),
            &world.all,
        )
        .await;
    assert_eq!(
        total(&everything),
        own.len() + world.b_observations.len() + world.b_conditions.len()
    );
}

/// Malformed and hostile values are refused with a 400 and an
/// OperationOutcome that names no database; none reaches a 500. A quote and a
/// comment marker in a string value are only a string: they match nothing.
async fn hostile_search_values_are_answered_with_an_outcome_never_a_server_error(h: Haven) {
    let world = h.seed().await;
    let restricted = h.patient_token("patient/*.rs").await;
    for token in [&restricted, &world.all] {
        for path in [
            url("/fhir/Patient", &[("_sort", "name;DROP TABLE x")]),
            url("/fhir/Patient", &[("birthdate", "2024-13-45")]),
            url("/fhir/Observation", &[("_include", "Observation:nope")]),
            url("/fhir/Observation", &[("_count", "-1")]),
        ] {
            let reply = h.get(&path, token).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{path}: {}",
                reply.body
            );
            assert_eq!(reply.body["resourceType"], "OperationOutcome", "{path}");
            assert!(!reply.issue_code().is_empty(), "{path}: {}", reply.body);
            let text = reply.body.to_string().to_lowercase();
            for word in ["sqlite", "postgres", "syntax error", "select "] {
                assert!(!text.contains(word), "{path}: names the database: {text}");
            }
        }
        let quoted = url("/fhir/Patient", &[("name", "'--"), ("_total", "accurate")]);
        let reply = h.get(&quoted, token).await;
        assert_ne!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{quoted}");
        assert_eq!(reply.status, StatusCode::OK, "{quoted}: {}", reply.body);
        assert_eq!(total(&reply.body), 0, "{quoted}: {}", reply.body);
        assert!(matches(&reply.body).is_empty(), "{quoted}: {}", reply.body);
    }
    // Nothing was dropped or changed.
    let patients = h
        .search(&url("/fhir/Patient", &[("_total", "accurate")]), &world.all)
        .await;
    assert_eq!(
        matches(&patients),
        [format!("Patient/{A}"), format!("Patient/{B}")]
    );
}

/// A Provenance whose targets include an Observation on another server is not
/// readable without an Observation scope: a search by its id finds nothing and
/// `_has` cannot reach Patients through it, while all-access finds both.
async fn a_provenance_with_a_target_the_token_cannot_read_is_neither_found_nor_usable_in_has(
    h: Haven,
) {
    let world = h.seed().await;
    let provenance = h
        .create(
            &world.all,
            &json!({
                "resourceType": "Provenance",
                "target": [
                    {"reference": format!("Patient/{A}")},
                    {"reference": "https://other.example/fhir/Observation/9"},
                ],
                "recorded": "2026-07-01T09:00:00Z",
                "agent": [{"who": {"reference": "Practitioner/x"}}],
            }),
        )
        .await;
    let id = provenance.strip_prefix("Provenance/").unwrap();
    let by_id = url("/fhir/Provenance", &[("_id", id), ("_total", "accurate")]);
    let has = url(
        "/fhir/Patient",
        &[
            ("_has:Provenance:target:agent", "Practitioner/x"),
            ("_total", "accurate"),
        ],
    );

    // With access to everything the Provenance is found, and `_has` finds A.
    let everything = h.search(&by_id, &world.all).await;
    assert_eq!(
        matches(&everything),
        std::slice::from_ref(&provenance),
        "{everything}"
    );
    assert_eq!(total(&everything), 1, "{everything}");
    let everything = h.search(&has, &world.all).await;
    assert_eq!(
        matches(&everything),
        [format!("Patient/{A}")],
        "{everything}"
    );
    assert_eq!(total(&everything), 1, "{everything}");

    // Without an Observation scope neither finds anything.
    let token = h.user_token("user/Provenance.rs user/Patient.rs").await;
    let found = h.search(&by_id, &token).await;
    assert_eq!(total(&found), 0, "{by_id}: {found}");
    assert!(matches(&found).is_empty(), "{by_id}: {found}");
    let found = h.search(&has, &token).await;
    assert_eq!(total(&found), 0, "{has}: {found}");
    assert!(matches(&found).is_empty(), "{has}: {found}");
}

/// A restriction the content rule cannot evaluate (`?date=ge2000-01-01`)
/// admits no Observation: not in a search of Observations and not through
/// `_has`, while all-access finds them.
async fn a_scope_restriction_the_content_rule_cannot_evaluate_admits_nothing(h: Haven) {
    let world = h.seed().await;
    let observations = url("/fhir/Observation", &[("_total", "accurate")]);
    // Hemoglobin: both A and B have a result with it.
    let has = url(
        "/fhir/Patient",
        &[
            ("_has:Observation:subject:code", &format!("{LOINC}|718-7")),
            ("_total", "accurate"),
        ],
    );
    let all_observations: BTreeSet<String> = world
        .a_observations
        .union(&world.b_observations)
        .cloned()
        .collect();

    let everything = h.search(&observations, &world.all).await;
    assert_eq!(matches(&everything), sorted(&all_observations));
    assert_eq!(total(&everything), all_observations.len());
    let everything = h.search(&has, &world.all).await;
    assert_eq!(
        matches(&everything),
        [format!("Patient/{A}"), format!("Patient/{B}")],
        "{everything}"
    );
    assert_eq!(total(&everything), 2, "{everything}");

    let dated = h.user_token("user/Observation.rs?date=ge2000-01-01").await;
    let found = h.search(&observations, &dated).await;
    assert_eq!(total(&found), 0, "{observations}: {found}");
    assert!(matches(&found).is_empty(), "{observations}: {found}");

    let dated = h
        .user_token("user/Patient.rs user/Observation.rs?date=ge2000-01-01")
        .await;
    let found = h.search(&has, &dated).await;
    assert_eq!(total(&found), 0, "{has}: {found}");
    assert!(matches(&found).is_empty(), "{has}: {found}");
}
