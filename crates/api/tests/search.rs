//! Search as R4 search.html describes it, through HTTP: every parameter type
//! with its modifiers and prefixes, chains and reverse chains, sorting,
//! includes, `_summary` and `_elements`, stable paging, compartment search,
//! `Patient/{id}/$everything`, system search, and the errors of each.
//!
//! Each story makes its own data in a fresh store and looks only at status
//! codes and bodies. Most run on an app without security stages; the stories
//! about tokens run on a SMART-secured, audited app. Every story runs on SQLite
//! and, when `HAVEN_TEST_POSTGRES_URL` names an admin URL, on PostgreSQL (a
//! fresh database per story, dropped afterwards, also when the story fails).

mod support;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use haven_api::{router, ApiConfig, AppState, SecurityStages};
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
const SNOMED: &str = "http://snomed.info/sct";
const UCUM: &str = "http://unitsofmeasure.org";
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// The practitioner user, with no patient in context.
const PRACTITIONER: &str = "drjones";
/// The patient user, whose patient is [`A`].
const AMY: &str = "amy";
/// Amy's patient.
const A: &str = "patient-a";
/// Another patient.
const B: &str = "patient-b";

// ---- the harness ----

/// Which security stages the app runs.
#[derive(Debug, Clone, Copy)]
enum Security {
    /// None: every request is allowed.
    Open,
    /// SMART tokens and the audit recorder.
    Smart,
}

/// An app over one store.
struct Haven {
    router: Router,
    clock: Arc<ManualClock>,
    /// The authorization server and the client id, when SMART is on.
    auth: Option<secured::Smart>,
    /// What requests carry unless told otherwise: an all-access token when
    /// SMART is on.
    token: Option<String>,
    _dir: Option<TempDir>,
}

async fn spawn_on(database_url: &str, dir: Option<TempDir>, security: Security) -> Haven {
    let clock = Arc::new(ManualClock::new(datetime!(2026-07-01 09:00 UTC)));
    let store = haven_store::connect(database_url, clock.clone() as Arc<dyn Clock>)
        .await
        .expect("store");
    let state = AppState::new(store.clone(), clock.clone(), ApiConfig::new(BASE));
    match security {
        Security::Open => Haven {
            router: router(state.with_security(SecurityStages::allow_all())),
            clock,
            auth: None,
            token: None,
            _dir: dir,
        },
        Security::Smart => {
            let (state, smart) = secured::secure(state, store, clock.clone(), BASE).await;
            let amy_patient = format!("Patient/{A}");
            smart
                .add_users(&[
                    (PRACTITIONER, Role::Practitioner, Some("Practitioner/dj")),
                    (AMY, Role::Patient, Some(&amy_patient)),
                ])
                .await;
            let mut haven = Haven {
                router: router(state),
                clock,
                auth: Some(smart),
                token: None,
                _dir: dir,
            };
            haven.token = Some(haven.token_for(PRACTITIONER, "user/*.cruds").await);
            haven
        }
    }
}

async fn on_sqlite<F, Fut>(security: Security, story: F)
where
    F: FnOnce(Haven) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("haven.db").display());
    story(spawn_on(&url, Some(dir), security).await).await;
}

async fn on_postgres<F, Fut>(security: Security, story: F)
where
    F: FnOnce(Haven) -> Fut,
    Fut: Future<Output = ()>,
{
    support::postgres::with_fresh_database("haven_search", |url| async move {
        story(spawn_on(&url, None, security).await).await;
    })
    .await;
}

/// Declares each story once per backend, as `sqlite::story` and
/// `postgres::story`: the `open` ones without security stages, the `smart`
/// ones with SMART tokens.
macro_rules! stories {
    (open: [$($open:ident),* $(,)?], smart: [$($smart:ident),* $(,)?] $(,)?) => {
        mod sqlite {
            use super::Security::{Open, Smart};
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $open() {
                    super::on_sqlite(Open, super::$open).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $smart() {
                    super::on_sqlite(Smart, super::$smart).await;
                }
            )*
        }
        mod postgres {
            use super::Security::{Open, Smart};
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $open() {
                    super::on_postgres(Open, super::$open).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $smart() {
                    super::on_postgres(Smart, super::$smart).await;
                }
            )*
        }
    };
}

stories!(
    open: [
        a_string_search_matches_the_start_of_a_name_ignoring_case_and_accents,
        an_exact_string_search_matches_the_whole_value_with_its_case_and_accents,
        a_contains_string_search_matches_anywhere_in_the_value,
        a_token_search_understands_system_and_code_no_system_and_any_code,
        not_and_text_modifiers_on_a_token_negate_the_code_and_search_its_display,
        an_identifier_search_of_type_needs_the_type_system_the_type_code_and_the_value,
        a_reference_search_takes_type_and_id_a_bare_id_a_url_on_this_server_and_a_type_modifier,
        a_relative_reference_search_does_not_match_a_reference_to_another_server,
        date_prefixes_compare_the_effective_date_at_the_precision_given,
        number_prefixes_compare_a_risk_assessments_probability,
        a_quantity_search_compares_the_value_and_respects_the_system_and_unit,
        uri_below_and_above_match_urls_under_and_over_the_value,
        a_composite_search_ties_the_code_to_the_value_of_the_same_observation,
        missing_finds_resources_with_and_without_a_value,
        commas_are_alternatives_and_a_repeated_parameter_must_hold_each_time,
        a_chain_finds_observations_by_their_patients_name,
        a_two_level_chain_reaches_the_name_of_the_patients_general_practitioner,
        a_reverse_chain_finds_patients_by_the_code_of_their_observations,
        sorting_by_family_then_birthdate_descending_orders_the_matches,
        sorting_by_last_updated_descending_puts_the_newest_first_and_an_unknown_sort_is_400,
        include_adds_each_referenced_patient_once_as_an_include_entry,
        revinclude_adds_the_observations_that_refer_to_the_matched_patient,
        include_iterate_follows_the_included_patients_to_their_organizations,
        include_star_adds_every_resource_the_matches_refer_to,
        summary_count_gives_the_total_and_no_entries,
        summary_true_removes_the_elements_outside_the_summary_and_tags_the_resource_subsetted,
        elements_keeps_only_the_named_elements_and_cannot_be_combined_with_summary,
        next_links_are_absolute_carry_a_page_id_and_visit_each_match_once,
        a_patient_created_while_paging_does_not_change_the_remaining_pages,
        previous_links_lead_back_to_the_same_matches,
        a_tampered_page_id_is_410,
        a_compartment_search_returns_only_that_patients_observations_with_the_code,
        a_compartment_search_of_a_type_outside_the_compartment_returns_nothing,
        everything_returns_the_patients_record_and_the_practitioners_and_organizations_it_refers_to,
        everything_narrowed_by_type_returns_only_resources_of_that_type,
        everything_since_an_instant_returns_only_what_changed_after_it,
        everything_pages_with_next_links_that_visit_each_resource_once,
        everything_refuses_an_unknown_parameter_with_400,
        a_system_search_over_two_types_returns_both_and_no_other,
        a_system_search_of_an_unknown_type_is_404,
        an_unknown_parameter_is_reported_in_an_outcome_entry_or_refused_when_strict,
        malformed_values_are_400_with_an_operation_outcome_never_500,
        a_chain_to_a_parameter_no_target_has_is_reported_or_refused_when_strict,
    ],
    smart: [
        a_page_link_made_by_one_token_is_403_for_another_token,
        a_compartment_search_of_another_patient_with_a_patient_token_is_403,
        everything_of_another_patient_with_a_patient_token_is_403,
        a_patient_token_does_not_reach_data_about_another_servers_patient_with_the_same_id,
    ],
);

// ---- requests, tokens and bundles ----

/// `path?pairs`, with the pairs percent-encoded.
fn url(path: &str, pairs: &[(&str, &str)]) -> String {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("{path}?{query}")
}

/// The decoded query pairs of a URL.
fn query_of(url: &str) -> Vec<(String, String)> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// The path and query of a link, which must be an absolute URL of this server.
fn path_of(link: &str) -> String {
    link.strip_prefix(ORIGIN)
        .filter(|rest| rest.starts_with("/fhir"))
        .unwrap_or_else(|| panic!("a link outside the server's base: {link}"))
        .to_owned()
}

/// The id of `Type/id`.
fn id(reference: &str) -> &str {
    reference.split_once('/').map_or(reference, |(_, id)| id)
}

/// `Type/id` of the entries with this search mode, sorted, repeats kept.
fn entries(bundle: &Value, mode: &str) -> Vec<String> {
    let mut found = entries_in_order(bundle, mode);
    found.sort();
    found
}

/// `Type/id` of the entries with this search mode, in the Bundle's order.
fn entries_in_order(bundle: &Value, mode: &str) -> Vec<String> {
    bundle["entry"]
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
        .collect()
}

fn matches(bundle: &Value) -> Vec<String> {
    entries(bundle, "match")
}

fn includes(bundle: &Value) -> Vec<String> {
    entries(bundle, "include")
}

/// Every `Type/id` a Bundle holds, whatever the mode.
fn everything_in(bundle: &Value) -> Vec<String> {
    let mut found: Vec<String> = ["match", "include"]
        .into_iter()
        .flat_map(|mode| entries(bundle, mode))
        .collect();
    found.sort();
    found
}

/// One reference, as [`matches`] and [`includes`] return it.
fn only(reference: &str) -> Vec<String> {
    vec![reference.to_owned()]
}

/// The references given, sorted: what [`matches`] and [`includes`] return.
fn these(references: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = references.iter().map(|r| (*r).to_owned()).collect();
    all.sort();
    all
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

fn outcome_entries(bundle: &Value) -> Vec<&Value> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] == "outcome")
        .collect()
}

/// The entry of `reference` in a Bundle.
fn entry<'b>(bundle: &'b Value, reference: &str) -> &'b Value {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| {
            format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap_or_default(),
                e["resource"]["id"].as_str().unwrap_or_default()
            ) == reference
        })
        .unwrap_or_else(|| panic!("{reference} is not in {bundle}"))
}

fn has_subsetted_tag(resource: &Value) -> bool {
    resource["meta"]["tag"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["system"] == SUBSETTED_SYSTEM && t["code"] == "SUBSETTED")
}

fn reference(to: &str) -> Value {
    json!({"reference": to})
}

fn patient_named(family: &str, given: &[&str]) -> Value {
    let mut name = json!({"family": family});
    if !given.is_empty() {
        name["given"] = json!(given);
    }
    json!({"resourceType": "Patient", "name": [name]})
}

fn coded_observation(system: Option<&str>, code: &str, display: Option<&str>) -> Value {
    let mut coding = json!({"code": code});
    if let Some(system) = system {
        coding["system"] = json!(system);
    }
    if let Some(display) = display {
        coding["display"] = json!(display);
    }
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [coding]},
    })
}

/// An Observation of `subject` with a LOINC code.
fn observation_of(subject: &str, loinc: &str) -> Value {
    let mut observation = coded_observation(Some(LOINC), loinc, None);
    observation["subject"] = reference(subject);
    observation
}

fn condition_of(subject: &str, text: &str) -> Value {
    json!({
        "resourceType": "Condition",
        "code": {"text": text},
        "subject": reference(subject),
    })
}

fn encounter_of(subject: &str, provider: &str) -> Value {
    json!({
        "resourceType": "Encounter",
        "status": "finished",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "AMB",
        },
        "subject": reference(subject),
        "serviceProvider": reference(provider),
    })
}

impl Haven {
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let request = support::fhir_request(method, path, token, body, headers);
        support::call(&self.router, request).await
    }

    /// A GET with the app's own token (none when security is off).
    async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, self.token.as_deref(), None, &[])
            .await
    }

    async fn get_as(&self, path: &str, token: &str) -> Reply {
        self.send(Method::GET, path, Some(token), None, &[]).await
    }

    /// A search that must succeed, with `token`: its searchset Bundle.
    async fn search_as(&self, path: &str, token: Option<&str>) -> Value {
        let reply = self.send(Method::GET, path, token, None, &[]).await;
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

    /// A search that must succeed: its searchset Bundle.
    async fn search(&self, path: &str) -> Value {
        self.search_as(path, self.token.as_deref()).await
    }

    /// The matches of a search of `path` with `pairs`, sorted.
    async fn found(&self, path: &str, pairs: &[(&str, &str)]) -> Vec<String> {
        matches(&self.search(&url(path, pairs)).await)
    }

    /// A request that must be refused with `status` and an OperationOutcome.
    async fn refused(&self, path: &str, status: StatusCode) -> Reply {
        let reply = self.get(path).await;
        assert_eq!(reply.status, status, "{path}: {}", reply.body);
        assert_eq!(
            reply.body["resourceType"], "OperationOutcome",
            "{path}: {}",
            reply.body
        );
        reply
    }

    /// Follows `next` from `first` and returns every page; fails after `limit`
    /// pages, so that a link cycle cannot hang the test.
    async fn pages(&self, first: &str, limit: usize) -> Vec<Value> {
        let mut pages = vec![self.search(first).await];
        while let Some(next) = link(pages.last().unwrap(), "next") {
            assert!(
                pages.len() < limit,
                "{first}: more than {limit} pages; next is {next}"
            );
            pages.push(self.search(&path_of(&next)).await);
        }
        pages
    }

    /// Creates a resource; returns `Type/id`.
    async fn create(&self, resource: &Value) -> String {
        let resource_type = resource["resourceType"].as_str().unwrap();
        let reply = self
            .send(
                Method::POST,
                &format!("/fhir/{resource_type}"),
                self.token.as_deref(),
                Some(resource),
                &[],
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        // Distinct lastUpdated instants keep the order of results unambiguous.
        self.clock.advance(time::Duration::seconds(1));
        format!("{resource_type}/{}", reply.body["id"].as_str().unwrap())
    }

    /// Creates or updates a resource with its id; returns `Type/id`.
    async fn put(&self, resource: &Value) -> String {
        let resource_type = resource["resourceType"].as_str().unwrap();
        let id = resource["id"].as_str().unwrap();
        let path = format!("/fhir/{resource_type}/{id}");
        let reply = self
            .send(
                Method::PUT,
                &path,
                self.token.as_deref(),
                Some(resource),
                &[],
            )
            .await;
        assert!(
            matches!(reply.status, StatusCode::OK | StatusCode::CREATED),
            "{path}: {}",
            reply.body
        );
        self.clock.advance(time::Duration::seconds(1));
        format!("{resource_type}/{id}")
    }

    /// A user's token with `scope`, through the authorization server's steps;
    /// the patient user's token has their patient in context.
    async fn token_for(&self, username: &str, scope: &str) -> String {
        let smart = self.auth.as_ref().expect("a SMART app");
        smart.token(username, scope).await
    }

    /// Patients A and B, each with an Observation (LOINC 8480-6) and a
    /// Condition, written with the all-access token; returns A's and B's
    /// `Type/id`s.
    async fn seed_two_patients(&self) -> (Vec<String>, Vec<String>) {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (patient, family, record) in [(A, "Shaw", &mut a), (B, "Field", &mut b)] {
            let mut resource = patient_named(family, &["Pat"]);
            resource["id"] = json!(patient);
            record.push(self.put(&resource).await);
            let subject = format!("Patient/{patient}");
            record.push(self.create(&observation_of(&subject, "8480-6")).await);
            record.push(self.create(&condition_of(&subject, "Asthma")).await);
        }
        (a, b)
    }
}

// ---- strings ----

async fn a_string_search_matches_the_start_of_a_name_ignoring_case_and_accents(h: Haven) {
    let odon = h.create(&patient_named("Ödön", &["Kovács"])).await;
    let schmidt = h.create(&patient_named("Schmidt", &["Anna"])).await;
    let smith = h.create(&patient_named("Smith", &["Anne"])).await;
    let patients = "/fhir/Patient";

    assert_eq!(h.found(patients, &[("name", "odon")]).await, only(&odon));
    assert_eq!(h.found(patients, &[("name", "ÖDÖN")]).await, only(&odon));
    assert_eq!(h.found(patients, &[("family", "öd")]).await, only(&odon));
    assert_eq!(
        h.found(patients, &[("name", "kovacs")]).await,
        only(&odon),
        "name covers the given names too"
    );
    assert_eq!(
        h.found(patients, &[("family", "sch")]).await,
        only(&schmidt)
    );
    assert_eq!(
        h.found(patients, &[("given", "ann")]).await,
        these(&[&schmidt, &smith])
    );
    assert!(
        h.found(patients, &[("family", "midt")]).await.is_empty(),
        "not the start of the name"
    );
}

async fn an_exact_string_search_matches_the_whole_value_with_its_case_and_accents(h: Haven) {
    let odon = h.create(&patient_named("Ödön", &["Kovács"])).await;
    h.create(&patient_named("Ödönke", &["Kis"])).await;
    let patients = "/fhir/Patient";

    assert_eq!(
        h.found(patients, &[("family:exact", "Ödön")]).await,
        only(&odon),
        "not Ödönke"
    );
    for other in ["odon", "ödön", "ÖDÖN", "Ödö", "Ödön "] {
        assert!(
            h.found(patients, &[("family:exact", other)])
                .await
                .is_empty(),
            "family:exact={other}"
        );
    }
    assert_eq!(h.found(patients, &[("name:exact", "Kovács")]).await, [odon]);
}

async fn a_contains_string_search_matches_anywhere_in_the_value(h: Haven) {
    let odon = h.create(&patient_named("Ödön", &["Kovács"])).await;
    let schmidt = h.create(&patient_named("Schmidt", &["Anna"])).await;
    let smith = h.create(&patient_named("Smith", &["Anne"])).await;
    let patients = "/fhir/Patient";

    assert_eq!(
        h.found(patients, &[("family:contains", "dö")]).await,
        only(&odon)
    );
    assert_eq!(
        h.found(patients, &[("family:contains", "DON")]).await,
        [odon]
    );
    assert_eq!(
        h.found(patients, &[("family:contains", "MIDT")]).await,
        only(&schmidt)
    );
    assert_eq!(
        h.found(patients, &[("family:contains", "mit")]).await,
        only(&smith)
    );
    assert_eq!(
        h.found(patients, &[("family:contains", "s")]).await,
        these(&[&schmidt, &smith])
    );
    assert!(h
        .found(patients, &[("family:contains", "xyz")])
        .await
        .is_empty());
}

// ---- tokens ----

async fn a_token_search_understands_system_and_code_no_system_and_any_code(h: Haven) {
    let systolic = h
        .create(&coded_observation(
            Some(LOINC),
            "8480-6",
            Some("Systolic blood pressure"),
        ))
        .await;
    let hemoglobin = h
        .create(&coded_observation(Some(LOINC), "718-7", Some("Hemoglobin")))
        .await;
    let local = h.create(&coded_observation(None, "xyz", None)).await;
    let snomed = h
        .create(&coded_observation(Some(SNOMED), "8480-6", Some("Other")))
        .await;
    let observations = "/fhir/Observation";

    assert_eq!(
        h.found(observations, &[("code", "http://loinc.org|8480-6")])
            .await,
        only(&systolic)
    );
    assert_eq!(
        h.found(observations, &[("code", "8480-6")]).await,
        these(&[&systolic, &snomed]),
        "a code alone matches in any system"
    );
    assert_eq!(
        h.found(observations, &[("code", "|xyz")]).await,
        only(&local),
        "|code matches a code without a system"
    );
    assert!(
        h.found(observations, &[("code", "|8480-6")])
            .await
            .is_empty(),
        "|code does not match a code with a system"
    );
    assert_eq!(
        h.found(observations, &[("code", "http://loinc.org|")])
            .await,
        these(&[&systolic, &hemoglobin]),
        "system| matches any code of the system"
    );
    assert!(
        h.found(observations, &[("code", "8480-7")])
            .await
            .is_empty(),
        "codes compare exactly"
    );
}

async fn not_and_text_modifiers_on_a_token_negate_the_code_and_search_its_display(h: Haven) {
    let systolic = h
        .create(&coded_observation(
            Some(LOINC),
            "8480-6",
            Some("Systolic blood pressure"),
        ))
        .await;
    let hemoglobin = h
        .create(&coded_observation(Some(LOINC), "718-7", Some("Hemoglobin")))
        .await;
    let mut panel = coded_observation(None, "xyz", None);
    panel["code"]["text"] = json!("Local panel");
    let local = h.create(&panel).await;
    let snomed = h
        .create(&coded_observation(Some(SNOMED), "8480-6", Some("Other")))
        .await;
    let observations = "/fhir/Observation";

    assert_eq!(
        h.found(observations, &[("code:not", "http://loinc.org|8480-6")])
            .await,
        these(&[&hemoglobin, &local, &snomed])
    );
    assert_eq!(
        h.found(observations, &[("code:not", "8480-6")]).await,
        these(&[&hemoglobin, &local])
    );
    assert_eq!(
        h.found(observations, &[("code:text", "hemo")]).await,
        only(&hemoglobin),
        "the start of a Coding's display"
    );
    assert_eq!(
        h.found(observations, &[("code:text", "BLOOD")]).await,
        [systolic],
        "the start of a word of the display, whatever the case"
    );
    assert_eq!(
        h.found(observations, &[("code:text", "panel")]).await,
        [local],
        "the CodeableConcept's text"
    );
    assert!(h
        .found(observations, &[("code:text", "718")])
        .await
        .is_empty());
}

async fn an_identifier_search_of_type_needs_the_type_system_the_type_code_and_the_value(h: Haven) {
    let typed = |code: &str, system: &str| {
        json!({
            "resourceType": "Patient",
            "identifier": [{
                "type": {"coding": [{"system": V2_0203, "code": code}]},
                "system": system,
                "value": "12345",
            }],
        })
    };
    let mrn = h.create(&typed("MR", "http://hospital.test/mrn")).await;
    let ssn = h.create(&typed("SS", "http://ssn.test")).await;
    let patients = "/fhir/Patient";
    let of_type = |code: &str, value: &str| format!("{V2_0203}|{code}|{value}");

    assert_eq!(
        h.found(patients, &[("identifier:of-type", &of_type("MR", "12345"))])
            .await,
        only(&mrn)
    );
    assert_eq!(
        h.found(patients, &[("identifier:of-type", &of_type("SS", "12345"))])
            .await,
        only(&ssn)
    );
    assert!(h
        .found(patients, &[("identifier:of-type", &of_type("MR", "99999"))])
        .await
        .is_empty());
    assert_eq!(
        h.found(patients, &[("identifier", "12345")]).await,
        these(&[&mrn, &ssn])
    );
    assert_eq!(
        h.found(
            patients,
            &[("identifier", "http://hospital.test/mrn|12345")]
        )
        .await,
        [mrn]
    );
    assert_eq!(
        h.found(patients, &[("identifier", "http://ssn.test|")])
            .await,
        [ssn]
    );
    // Two parts are not an :of-type value.
    h.refused(
        &url(patients, &[("identifier:of-type", "MR|12345")]),
        StatusCode::BAD_REQUEST,
    )
    .await;
}

// ---- references ----

async fn a_reference_search_takes_type_and_id_a_bare_id_a_url_on_this_server_and_a_type_modifier(
    h: Haven,
) {
    let one = h.create(&patient_named("One", &[])).await;
    let two = h.create(&patient_named("Two", &[])).await;
    let first = h.create(&observation_of(&one, "8480-6")).await;
    let second = h.create(&observation_of(&one, "718-7")).await;
    let third = h.create(&observation_of(&two, "8480-6")).await;
    // A reference written as an absolute URL on this server's base.
    let absolute = h
        .create(&observation_of(&format!("{BASE}/{two}"), "718-7"))
        .await;
    let observations = "/fhir/Observation";
    let of_one = these(&[&first, &second]);
    let of_two = these(&[&third, &absolute]);

    assert_eq!(h.found(observations, &[("subject", &one)]).await, of_one);
    assert_eq!(
        h.found(observations, &[("subject", id(&one))]).await,
        of_one,
        "a bare id"
    );
    assert_eq!(
        h.found(observations, &[("subject", &format!("{BASE}/{one}"))])
            .await,
        of_one,
        "an absolute URL on this server's base"
    );
    assert_eq!(
        h.found(observations, &[("subject:Patient", id(&one))])
            .await,
        of_one,
        ":Type names the target type"
    );
    assert!(
        h.found(observations, &[("subject:Group", id(&one))])
            .await
            .is_empty(),
        "no Group has that id"
    );
    assert_eq!(
        h.found(observations, &[("patient", id(&two))]).await,
        of_two,
        "a reference stored as an absolute URL on this server's base is local"
    );
    assert_eq!(h.found(observations, &[("subject", &two)]).await, of_two);
    assert_eq!(
        h.found(observations, &[("subject", &format!("{one},{two}"))])
            .await,
        these(&[&first, &second, &third, &absolute])
    );
    assert!(h
        .found(
            observations,
            &[("subject", &format!("https://elsewhere.test/fhir/{one}"))]
        )
        .await
        .is_empty());
}

async fn a_relative_reference_search_does_not_match_a_reference_to_another_server(h: Haven) {
    let local = h.create(&patient_named("Local", &[])).await;
    let here = h.create(&observation_of(&local, "8480-6")).await;
    // The same Type/id on another server: another patient.
    let elsewhere_url = format!("https://elsewhere.test/fhir/{local}");
    let elsewhere = h.create(&observation_of(&elsewhere_url, "8480-6")).await;
    let observations = "/fhir/Observation";

    // Every way of naming this server's patient finds only the Observation
    // about it; each is checked, so that the failures name them all.
    let mut failures = Vec::new();
    for path in [
        url(observations, &[("subject", &local)]),
        url(observations, &[("subject", &format!("{BASE}/{local}"))]),
        url(observations, &[("patient", id(&local))]),
        url(observations, &[("subject:Patient.name", "local")]),
        format!("/fhir/{local}/Observation"),
    ] {
        let found = matches(&h.search(&path).await);
        if found != only(&here) {
            failures.push(format!(
                "{path}: expected only {here}, got {found:?} ({elsewhere} refers to {elsewhere_url})"
            ));
        }
    }
    let found = h.found(observations, &[("subject", &elsewhere_url)]).await;
    if found != only(&elsewhere) {
        failures.push(format!(
            "subject={elsewhere_url}: expected only {elsewhere}, got {found:?}"
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---- dates, numbers, quantities, uris, composites ----

async fn date_prefixes_compare_the_effective_date_at_the_precision_given(h: Haven) {
    let on = |when: &str| {
        let mut observation = coded_observation(Some(LOINC), "8480-6", None);
        observation["effectiveDateTime"] = json!(when);
        observation
    };
    let january = h.create(&on("2024-01-15")).await;
    let march = h.create(&on("2024-03-10T10:00:00Z")).await;
    let june = h.create(&on("2024-06-30")).await;
    let observations = "/fhir/Observation";

    for (value, expected) in [
        ("2024-03", vec![&march]),
        ("eq2024", vec![&january, &march, &june]),
        ("2024-03-10T10:00:00Z", vec![&march]),
        ("ge2024-03-01", vec![&march, &june]),
        ("gt2024-03-10", vec![&june]),
        ("lt2024-03-01", vec![&january]),
        ("le2024-03-10", vec![&january, &march]),
        ("ne2024-03-10", vec![&january, &june]),
        ("sa2024-02-01", vec![&march, &june]),
        ("eb2024-02-01", vec![&january]),
        ("gt2024-06", vec![]),
    ] {
        let expected: Vec<&str> = expected.into_iter().map(String::as_str).collect();
        assert_eq!(
            h.found(observations, &[("date", value)]).await,
            these(&expected),
            "date={value}"
        );
    }
}

async fn number_prefixes_compare_a_risk_assessments_probability(h: Haven) {
    let patient = h.create(&patient_named("Risk", &[])).await;
    let mut assessments = Vec::new();
    for probability in [0.2, 0.5, 0.8] {
        assessments.push(
            h.create(&json!({
                "resourceType": "RiskAssessment",
                "status": "final",
                "subject": reference(&patient),
                "prediction": [{"probabilityDecimal": probability}],
            }))
            .await,
        );
    }
    let [low, mid, high] = [&assessments[0], &assessments[1], &assessments[2]];
    let assessments_path = "/fhir/RiskAssessment";

    for (value, expected) in [
        ("0.5", vec![mid]),
        ("eq0.8", vec![high]),
        ("gt0.5", vec![high]),
        ("ge0.5", vec![mid, high]),
        ("lt0.5", vec![low]),
        ("le0.2", vec![low]),
        ("ne0.5", vec![low, high]),
        ("gt0.9", vec![]),
    ] {
        let expected: Vec<&str> = expected.into_iter().map(String::as_str).collect();
        assert_eq!(
            h.found(assessments_path, &[("probability", value)]).await,
            these(&expected),
            "probability={value}"
        );
    }
}

async fn a_quantity_search_compares_the_value_and_respects_the_system_and_unit(h: Haven) {
    let measured = |value: f64, unit: &str| {
        let mut observation = coded_observation(Some(LOINC), "2345-7", None);
        observation["valueQuantity"] =
            json!({"value": value, "unit": unit, "system": UCUM, "code": unit});
        observation
    };
    let three_mg = h.create(&measured(3.0, "mg")).await;
    let ten_mg = h.create(&measured(10.0, "mg")).await;
    let ten_g = h.create(&measured(10.0, "g")).await;
    let observations = "/fhir/Observation";

    for (value, expected) in [
        ("gt5|http://unitsofmeasure.org|mg", vec![&ten_mg]),
        ("gt5", vec![&ten_mg, &ten_g]),
        ("lt5||mg", vec![&three_mg]),
        ("10|http://unitsofmeasure.org|g", vec![&ten_g]),
        ("10||mg", vec![&ten_mg]),
        ("ge3|http://unitsofmeasure.org|mg", vec![&three_mg, &ten_mg]),
        ("gt5|http://other.test|mg", vec![]),
    ] {
        let expected: Vec<&str> = expected.into_iter().map(String::as_str).collect();
        assert_eq!(
            h.found(observations, &[("value-quantity", value)]).await,
            these(&expected),
            "value-quantity={value}"
        );
    }
}

async fn uri_below_and_above_match_urls_under_and_over_the_value(h: Haven) {
    let value_set = |url: &str| json!({"resourceType": "ValueSet", "status": "active", "url": url});
    let colors = h
        .create(&value_set("http://example.org/fhir/ValueSet/colors"))
        .await;
    let shapes = h
        .create(&value_set("http://example.org/fhir/ValueSet/shapes"))
        .await;
    let other = h
        .create(&value_set("http://other.example/ValueSet/colors"))
        .await;
    let value_sets = "/fhir/ValueSet";

    assert_eq!(
        h.found(
            value_sets,
            &[("url", "http://example.org/fhir/ValueSet/colors")]
        )
        .await,
        only(&colors)
    );
    assert_eq!(
        h.found(value_sets, &[("url:below", "http://example.org/fhir")])
            .await,
        these(&[&colors, &shapes])
    );
    assert_eq!(
        h.found(
            value_sets,
            &[("url:below", "http://example.org/fhir/ValueSet/colors")]
        )
        .await,
        only(&colors)
    );
    assert_eq!(
        h.found(
            value_sets,
            &[("url:above", "http://example.org/fhir/ValueSet/colors/v2")]
        )
        .await,
        only(&colors)
    );
    assert_eq!(
        h.found(
            value_sets,
            &[("url:above", "http://other.example/ValueSet/colors")]
        )
        .await,
        [other]
    );
    assert!(h
        .found(value_sets, &[("url:above", "http://example.org/fhir")])
        .await
        .is_empty());
    assert!(h
        .found(value_sets, &[("url", "http://example.org/fhir")])
        .await
        .is_empty());
}

async fn a_composite_search_ties_the_code_to_the_value_of_the_same_observation(h: Haven) {
    let pressure = |code: &str, value: f64| {
        let mut observation = coded_observation(Some(LOINC), code, None);
        observation["valueQuantity"] =
            json!({"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"});
        observation
    };
    let high_systolic = h.create(&pressure("8480-6", 120.0)).await;
    let low_systolic = h.create(&pressure("8480-6", 90.0)).await;
    let diastolic = h.create(&pressure("8462-4", 130.0)).await;
    let observations = "/fhir/Observation";

    assert_eq!(
        h.found(
            observations,
            &[("code-value-quantity", "http://loinc.org|8480-6$gt100")]
        )
        .await,
        only(&high_systolic)
    );
    assert_eq!(
        h.found(
            observations,
            &[("code-value-quantity", "http://loinc.org|8480-6$lt100")]
        )
        .await,
        [low_systolic]
    );
    assert_eq!(
        h.found(
            observations,
            &[("code-value-quantity", "http://loinc.org|8462-4$gt100")]
        )
        .await,
        [diastolic]
    );
    assert_eq!(
        h.found(
            observations,
            &[(
                "code-value-quantity",
                "8480-6$gt100|http://unitsofmeasure.org|mm[Hg]"
            )]
        )
        .await,
        [high_systolic]
    );
    assert!(h
        .found(
            observations,
            &[("code-value-quantity", "http://loinc.org|8462-4$lt100")]
        )
        .await
        .is_empty());
}

// ---- :missing, OR and AND ----

async fn missing_finds_resources_with_and_without_a_value(h: Haven) {
    let mut born = patient_named("Born", &[]);
    born["birthDate"] = json!("1990-05-06");
    born["gender"] = json!("female");
    let born = h.create(&born).await;
    let unknown = h.create(&patient_named("Unknown", &[])).await;
    let patients = "/fhir/Patient";

    assert_eq!(
        h.found(patients, &[("birthdate:missing", "true")]).await,
        only(&unknown)
    );
    assert_eq!(
        h.found(patients, &[("birthdate:missing", "false")]).await,
        only(&born)
    );
    assert_eq!(
        h.found(patients, &[("gender:missing", "true")]).await,
        [unknown]
    );
    assert_eq!(
        h.found(patients, &[("gender:missing", "false")]).await,
        [born]
    );
    h.refused(
        &url(patients, &[("birthdate:missing", "maybe")]),
        StatusCode::BAD_REQUEST,
    )
    .await;
}

async fn commas_are_alternatives_and_a_repeated_parameter_must_hold_each_time(h: Haven) {
    let ann_marie = h.create(&patient_named("Lee", &["Ann", "Marie"])).await;
    let ann = h.create(&patient_named("Park", &["Ann"])).await;
    let marie = h.create(&patient_named("Kim", &["Marie"])).await;
    let patients = "/fhir/Patient";

    assert_eq!(
        h.found(patients, &[("given", "ann,marie")]).await,
        these(&[&ann_marie, &ann, &marie])
    );
    assert_eq!(
        h.found(patients, &[("given", "ann"), ("given", "marie")])
            .await,
        only(&ann_marie)
    );
    assert_eq!(
        h.found(patients, &[("family", "lee,kim")]).await,
        these(&[&ann_marie, &marie])
    );
    assert_eq!(
        h.found(patients, &[("given", "ann"), ("family", "park,kim")])
            .await,
        [ann]
    );
    assert!(h
        .found(patients, &[("given", "marie"), ("family", "park")])
        .await
        .is_empty());
}

// ---- chains ----

async fn a_chain_finds_observations_by_their_patients_name(h: Haven) {
    let rivera = h.create(&patient_named("Rivera", &["Rosa"])).await;
    let okafor = h.create(&patient_named("Okafor", &["Obi"])).await;
    let of_rivera = h.create(&observation_of(&rivera, "8480-6")).await;
    let of_okafor = h.create(&observation_of(&okafor, "8480-6")).await;
    let observations = "/fhir/Observation";

    assert_eq!(
        h.found(observations, &[("subject:Patient.name", "rivera")])
            .await,
        only(&of_rivera)
    );
    assert_eq!(
        h.found(observations, &[("subject:Patient.name", "obi")])
            .await,
        only(&of_okafor)
    );
    assert_eq!(
        h.found(observations, &[("patient.family", "okafor")]).await,
        [of_okafor]
    );
    assert!(h
        .found(observations, &[("subject:Patient.name", "nobody")])
        .await
        .is_empty());
}

async fn a_two_level_chain_reaches_the_name_of_the_patients_general_practitioner(h: Haven) {
    let quincy = h
        .create(&json!({"resourceType": "Practitioner", "name": [{"family": "Quincy"}]}))
        .await;
    let rowan = h
        .create(&json!({"resourceType": "Practitioner", "name": [{"family": "Rowan"}]}))
        .await;
    let clinic = h
        .create(&json!({"resourceType": "Organization", "name": "Westfield Clinic"}))
        .await;
    let mut patients = Vec::new();
    for gp in [&quincy, &rowan, &clinic] {
        let mut patient = patient_named("Patient", &[]);
        patient["generalPractitioner"] = json!([reference(gp)]);
        patients.push(h.create(&patient).await);
    }
    let mut observations = Vec::new();
    for patient in &patients {
        observations.push(h.create(&observation_of(patient, "8480-6")).await);
    }
    let path = "/fhir/Observation";

    assert_eq!(
        h.found(path, &[("subject.general-practitioner.name", "quincy")])
            .await,
        only(&observations[0])
    );
    assert_eq!(
        h.found(
            path,
            &[(
                "subject:Patient.general-practitioner:Practitioner.name",
                "rowan"
            )]
        )
        .await,
        only(&observations[1])
    );
    assert_eq!(
        h.found(path, &[("subject.general-practitioner.name", "westfield")])
            .await,
        only(&observations[2]),
        "an Organization as general practitioner, by its name"
    );
    assert!(h
        .found(
            path,
            &[(
                "subject.general-practitioner:Practitioner.name",
                "westfield"
            )]
        )
        .await
        .is_empty());
}

async fn a_reverse_chain_finds_patients_by_the_code_of_their_observations(h: Haven) {
    let one = h.create(&patient_named("One", &[])).await;
    let two = h.create(&patient_named("Two", &[])).await;
    h.create(&patient_named("Three", &[])).await;
    h.create(&observation_of(&one, "8480-6")).await;
    h.create(&observation_of(&two, "718-7")).await;
    let patients = "/fhir/Patient";

    assert_eq!(
        h.found(
            patients,
            &[("_has:Observation:patient:code", "http://loinc.org|8480-6")]
        )
        .await,
        only(&one)
    );
    assert_eq!(
        h.found(patients, &[("_has:Observation:subject:code", "718-7")])
            .await,
        only(&two)
    );
    assert_eq!(
        h.found(
            patients,
            &[("_has:Observation:patient:code", "8480-6,718-7")]
        )
        .await,
        these(&[&one, &two])
    );
    assert!(h
        .found(patients, &[("_has:Observation:patient:code", "2345-7")])
        .await
        .is_empty());
}

// ---- sorting ----

async fn sorting_by_family_then_birthdate_descending_orders_the_matches(h: Haven) {
    let born = |family: &str, birth_date: &str| {
        let mut patient = patient_named(family, &[]);
        patient["birthDate"] = json!(birth_date);
        patient
    };
    let gamma = h.create(&born("Gamma", "1970-01-01")).await;
    let alpha_old = h.create(&born("Alpha", "1990-01-01")).await;
    let beta = h.create(&born("Beta", "1980-01-01")).await;
    let alpha_young = h.create(&born("Alpha", "2000-01-01")).await;

    let bundle = h
        .search(&url("/fhir/Patient", &[("_sort", "family,-birthdate")]))
        .await;
    assert_eq!(
        entries_in_order(&bundle, "match"),
        [
            alpha_young.as_str(),
            alpha_old.as_str(),
            beta.as_str(),
            gamma.as_str()
        ],
        "{bundle}"
    );
    let bundle = h
        .search(&url("/fhir/Patient", &[("_sort", "-family,birthdate")]))
        .await;
    assert_eq!(
        entries_in_order(&bundle, "match"),
        [
            gamma.as_str(),
            beta.as_str(),
            alpha_old.as_str(),
            alpha_young.as_str()
        ],
        "{bundle}"
    );
}

async fn sorting_by_last_updated_descending_puts_the_newest_first_and_an_unknown_sort_is_400(
    h: Haven,
) {
    let first = h.create(&patient_named("First", &[])).await;
    let second = h.create(&patient_named("Second", &[])).await;
    let third = h.create(&patient_named("Third", &[])).await;

    let newest_first = h
        .search(&url("/fhir/Patient", &[("_sort", "-_lastUpdated")]))
        .await;
    assert_eq!(
        entries_in_order(&newest_first, "match"),
        [third.as_str(), second.as_str(), first.as_str()]
    );
    let oldest_first = h
        .search(&url("/fhir/Patient", &[("_sort", "_lastUpdated")]))
        .await;
    assert_eq!(
        entries_in_order(&oldest_first, "match"),
        [first.as_str(), second.as_str(), third.as_str()]
    );
    // Updating the first makes it the newest.
    let mut updated = patient_named("First", &["Again"]);
    updated["id"] = json!(id(&first));
    h.put(&updated).await;
    let newest_first = h
        .search(&url("/fhir/Patient", &[("_sort", "-_lastUpdated")]))
        .await;
    assert_eq!(
        entries_in_order(&newest_first, "match"),
        [first.as_str(), third.as_str(), second.as_str()]
    );

    for bogus in ["bogus", "family,bogus", "-"] {
        h.refused(
            &url("/fhir/Patient", &[("_sort", bogus)]),
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
}

// ---- includes ----

async fn include_adds_each_referenced_patient_once_as_an_include_entry(h: Haven) {
    let one = h.create(&patient_named("One", &[])).await;
    let two = h.create(&patient_named("Two", &[])).await;
    h.create(&patient_named("Unreferenced", &[])).await;
    let observations = [
        h.create(&observation_of(&one, "8480-6")).await,
        h.create(&observation_of(&one, "718-7")).await,
        h.create(&observation_of(&two, "8480-6")).await,
    ];

    let bundle = h
        .search(&url(
            "/fhir/Observation",
            &[("_include", "Observation:subject")],
        ))
        .await;
    assert_eq!(
        matches(&bundle),
        these(&observations.iter().map(String::as_str).collect::<Vec<_>>())
    );
    assert_eq!(
        includes(&bundle),
        these(&[&one, &two]),
        "each patient once: {bundle}"
    );
    assert_eq!(bundle["total"], 3, "includes are not counted");
    for patient in [&one, &two] {
        let included = entry(&bundle, patient);
        assert_eq!(included["search"]["mode"], "include");
        assert_eq!(included["fullUrl"], format!("{BASE}/{patient}"));
    }

    // The same with the target type named.
    let bundle = h
        .search(&url(
            "/fhir/Observation",
            &[("_include", "Observation:subject:Patient")],
        ))
        .await;
    assert_eq!(includes(&bundle), these(&[&one, &two]));
    let bundle = h
        .search(&url(
            "/fhir/Observation",
            &[("_include", "Observation:subject:Group")],
        ))
        .await;
    assert!(includes(&bundle).is_empty(), "{bundle}");
}

async fn revinclude_adds_the_observations_that_refer_to_the_matched_patient(h: Haven) {
    let one = h.create(&patient_named("One", &[])).await;
    let two = h.create(&patient_named("Two", &[])).await;
    let first = h.create(&observation_of(&one, "8480-6")).await;
    let second = h.create(&observation_of(&one, "718-7")).await;
    h.create(&observation_of(&two, "8480-6")).await;
    h.create(&condition_of(&one, "Asthma")).await;

    let bundle = h
        .search(&url(
            "/fhir/Patient",
            &[("_id", id(&one)), ("_revinclude", "Observation:subject")],
        ))
        .await;
    assert_eq!(matches(&bundle), only(&one));
    assert_eq!(includes(&bundle), these(&[&first, &second]), "{bundle}");
    assert_eq!(bundle["total"], 1);
}

async fn include_iterate_follows_the_included_patients_to_their_organizations(h: Haven) {
    let clinic = h
        .create(&json!({"resourceType": "Organization", "name": "Clinic"}))
        .await;
    h.create(&json!({"resourceType": "Organization", "name": "Unrelated"}))
        .await;
    let mut patient = patient_named("Member", &[]);
    patient["managingOrganization"] = reference(&clinic);
    let patient = h.create(&patient).await;
    let observation = h.create(&observation_of(&patient, "8480-6")).await;

    let bundle = h
        .search(&url(
            "/fhir/Observation",
            &[
                ("_include", "Observation:subject"),
                ("_include:iterate", "Patient:organization"),
            ],
        ))
        .await;
    assert_eq!(matches(&bundle), only(&observation));
    assert_eq!(
        includes(&bundle),
        these(&[&patient, &clinic]),
        "Observation -> Patient -> Organization: {bundle}"
    );

    // Without :iterate the organization is not reached...
    let bundle = h
        .search(&url(
            "/fhir/Observation",
            &[("_include", "Observation:subject")],
        ))
        .await;
    assert_eq!(includes(&bundle), [patient]);
    // ...and Patient:organization on a search of Observations is refused.
    h.refused(
        &url(
            "/fhir/Observation",
            &[
                ("_include", "Observation:subject"),
                ("_include", "Patient:organization"),
            ],
        ),
        StatusCode::BAD_REQUEST,
    )
    .await;
}

async fn include_star_adds_every_resource_the_matches_refer_to(h: Haven) {
    let doctor = h
        .create(&json!({"resourceType": "Practitioner", "name": [{"family": "House"}]}))
        .await;
    h.create(&json!({"resourceType": "Practitioner", "name": [{"family": "Other"}]}))
        .await;
    let patient = h.create(&patient_named("Patient", &[])).await;
    let mut observation = observation_of(&patient, "8480-6");
    observation["performer"] = json!([reference(&doctor)]);
    let observation = h.create(&observation).await;

    let bundle = h
        .search(&url("/fhir/Observation", &[("_include", "*")]))
        .await;
    assert_eq!(matches(&bundle), [observation]);
    assert_eq!(includes(&bundle), these(&[&patient, &doctor]), "{bundle}");
    assert!(outcome_entries(&bundle).is_empty(), "{bundle}");
}

// ---- _summary and _elements ----

async fn summary_count_gives_the_total_and_no_entries(h: Haven) {
    for family in ["One", "Two", "Three"] {
        h.create(&patient_named(family, &[])).await;
    }
    let bundle = h
        .search(&url("/fhir/Patient", &[("_summary", "count")]))
        .await;
    assert_eq!(bundle["total"], 3, "{bundle}");
    assert!(
        bundle["entry"].as_array().is_none_or(Vec::is_empty),
        "{bundle}"
    );
    let bundle = h
        .search(&url(
            "/fhir/Patient",
            &[("_summary", "count"), ("family", "t")],
        ))
        .await;
    assert_eq!(bundle["total"], 2, "{bundle}");
    assert!(bundle["entry"].as_array().is_none_or(Vec::is_empty));
}

async fn summary_true_removes_the_elements_outside_the_summary_and_tags_the_resource_subsetted(
    h: Haven,
) {
    let mut full = patient_named("Summary", &["Sam"]);
    full["gender"] = json!("male");
    full["birthDate"] = json!("1970-01-01");
    full["maritalStatus"] = json!({"text": "married"});
    full["communication"] = json!([{
        "language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en"}]},
    }]);
    let patient = h.create(&full).await;

    let bundle = h
        .search(&url("/fhir/Patient", &[("_summary", "true")]))
        .await;
    let resource = &entry(&bundle, &patient)["resource"];
    assert_eq!(resource["name"], full["name"]);
    assert_eq!(resource["gender"], "male");
    assert_eq!(resource["birthDate"], "1970-01-01");
    assert!(resource.get("maritalStatus").is_none(), "{resource}");
    assert!(resource.get("communication").is_none(), "{resource}");
    assert!(has_subsetted_tag(resource), "{resource}");

    let bundle = h
        .search(&url("/fhir/Patient", &[("_summary", "false")]))
        .await;
    let resource = &entry(&bundle, &patient)["resource"];
    assert_eq!(resource["maritalStatus"], full["maritalStatus"]);
    assert!(!has_subsetted_tag(resource), "{resource}");
}

async fn elements_keeps_only_the_named_elements_and_cannot_be_combined_with_summary(h: Haven) {
    let mut full = patient_named("Elements", &["Eve"]);
    full["gender"] = json!("female");
    full["birthDate"] = json!("1980-01-01");
    let patient = h.create(&full).await;

    let bundle = h
        .search(&url("/fhir/Patient", &[("_elements", "name")]))
        .await;
    let resource = &entry(&bundle, &patient)["resource"];
    assert_eq!(resource["name"], full["name"]);
    assert_eq!(resource["id"], id(&patient));
    let mut kept: Vec<&str> = resource
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    kept.sort_unstable();
    assert_eq!(kept, ["id", "meta", "name", "resourceType"], "{resource}");
    assert!(has_subsetted_tag(resource), "{resource}");

    h.refused(
        &url(
            "/fhir/Patient",
            &[("_summary", "true"), ("_elements", "name")],
        ),
        StatusCode::BAD_REQUEST,
    )
    .await;
}

// ---- paging ----

/// Five Patients, one second apart; their `Type/id`s.
async fn five_patients(h: &Haven) -> Vec<String> {
    let mut created = Vec::new();
    for family in ["Ash", "Birch", "Cedar", "Fir", "Oak"] {
        created.push(h.create(&patient_named(family, &[])).await);
    }
    created
}

async fn next_links_are_absolute_carry_a_page_id_and_visit_each_match_once(h: Haven) {
    let created = five_patients(&h).await;

    let pages = h.pages(&url("/fhir/Patient", &[("_count", "2")]), 10).await;
    assert_eq!(pages.len(), 3, "2 + 2 + 1");
    let mut visited = Vec::new();
    for (n, page) in pages.iter().enumerate() {
        let on_page = matches(page);
        assert_eq!(on_page.len(), if n < 2 { 2 } else { 1 }, "page {n}: {page}");
        visited.extend(on_page);
        if let Some(next) = link(page, "next") {
            assert!(
                next.starts_with(&format!("{BASE}/Patient?")),
                "page {n}: an absolute next link: {next}"
            );
            assert!(
                query_of(&next)
                    .iter()
                    .any(|(k, v)| k == "_page" && !v.is_empty()),
                "page {n}: next names the result set: {next}"
            );
        }
        let own = link(page, "self").expect("a self link");
        assert!(own.starts_with(BASE), "{own}");
        if page["total"].is_number() {
            assert_eq!(page["total"], 5, "page {n}");
        }
    }
    let unique: BTreeSet<String> = visited.iter().cloned().collect();
    assert_eq!(unique.len(), visited.len(), "each once: {visited:?}");
    assert_eq!(
        unique.into_iter().collect::<Vec<_>>(),
        these(&created.iter().map(String::as_str).collect::<Vec<_>>())
    );
}

async fn a_patient_created_while_paging_does_not_change_the_remaining_pages(h: Haven) {
    let created = five_patients(&h).await;
    let orders: [&[(&str, &str)]; 3] = [
        &[("_count", "2")],
        &[("_count", "2"), ("_sort", "family")],
        &[("_count", "2"), ("_sort", "-_lastUpdated")],
    ];
    for (n, pairs) in orders.into_iter().enumerate() {
        let first = h.search(&url("/fhir/Patient", pairs)).await;
        let mut visited = entries_in_order(&first, "match");
        // A Patient that would sort first, last, or anywhere in between.
        let newcomer = h
            .create(&patient_named(["Aaron", "Zed", "Dogwood"][n], &[]))
            .await;
        let mut next = link(&first, "next");
        let mut pages = 1;
        while let Some(link_url) = next {
            pages += 1;
            assert!(pages <= 5, "{pairs:?}: too many pages");
            let page = h.search(&path_of(&link_url)).await;
            if page["total"].is_number() {
                assert_eq!(page["total"], 5 + n, "{pairs:?}: the total of the search");
            }
            visited.extend(entries_in_order(&page, "match"));
            next = link(&page, "next");
        }
        assert_eq!(
            pages,
            (5 + n).div_ceil(2),
            "{pairs:?}: the pages of the {} patients there were",
            5 + n
        );
        assert!(
            !visited.contains(&newcomer),
            "{pairs:?}: {newcomer} was not there when the search ran: {visited:?}"
        );
        let mut sorted_visits = visited.clone();
        sorted_visits.sort();
        let mut expected: Vec<String> = created.clone();
        // Those created by earlier rounds were there when this search ran.
        expected.extend(
            h.found("/fhir/Patient", &[("family:exact", "Aaron,Zed,Dogwood")])
                .await
                .into_iter()
                .filter(|p| *p != newcomer),
        );
        expected.sort();
        assert_eq!(sorted_visits, expected, "{pairs:?}: each once");
        // In the order the search had when it ran: the newcomer shifted nothing.
        let mut all_at_once: Vec<(&str, &str)> = pairs.to_vec();
        all_at_once[0] = ("_count", "50");
        let mut order = entries_in_order(
            &h.search(&url("/fhir/Patient", &all_at_once)).await,
            "match",
        );
        order.retain(|p| *p != newcomer);
        assert_eq!(visited, order, "{pairs:?}: the order of the search");
    }
}

async fn previous_links_lead_back_to_the_same_matches(h: Haven) {
    five_patients(&h).await;
    let pages = h.pages(&url("/fhir/Patient", &[("_count", "2")]), 10).await;
    assert_eq!(pages.len(), 3);
    assert!(link(&pages[0], "previous").is_none(), "{}", pages[0]);
    for n in 1..pages.len() {
        let previous = link(&pages[n], "previous")
            .unwrap_or_else(|| panic!("page {n} has a previous link: {}", pages[n]));
        assert!(previous.starts_with(BASE), "{previous}");
        let back = h.search(&path_of(&previous)).await;
        assert_eq!(
            entries_in_order(&back, "match"),
            entries_in_order(&pages[n - 1], "match"),
            "previous of page {n}"
        );
    }
}

async fn a_tampered_page_id_is_410(h: Haven) {
    five_patients(&h).await;
    let first = h.search(&url("/fhir/Patient", &[("_count", "2")])).await;
    let next = link(&first, "next").expect("a next link");
    let pairs = query_of(&next);
    let page = &pairs.iter().find(|(k, _)| k == "_page").unwrap().1;
    let mut tampered_id = page.clone();
    let last = tampered_id.pop().unwrap();
    tampered_id.push(if last == '0' { '1' } else { '0' });
    for replacement in [tampered_id.as_str(), "no-such-result-set", "../x"] {
        let tampered: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| {
                if k == "_page" {
                    (k.as_str(), replacement)
                } else {
                    (k.as_str(), v.as_str())
                }
            })
            .collect();
        let reply = h
            .refused(&url("/fhir/Patient", &tampered), StatusCode::GONE)
            .await;
        assert!(!reply.issue_code().is_empty(), "{}", reply.body);
    }
    // The link as given still works.
    let page = h.search(&path_of(&next)).await;
    assert_eq!(matches(&page).len(), 2);
}

async fn a_page_link_made_by_one_token_is_403_for_another_token(h: Haven) {
    let created = five_patients(&h).await;
    let maker = h.token.clone().unwrap();
    let other = h.token_for(PRACTITIONER, "user/*.cruds").await;
    assert_ne!(maker, other);

    let first = h
        .search_as(&url("/fhir/Patient", &[("_count", "2")]), Some(&maker))
        .await;
    let next = path_of(&link(&first, "next").expect("a next link"));
    let reply = h.get_as(&next, &other).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
    for patient in &created {
        assert!(
            !reply.body.to_string().contains(id(patient)),
            "the refusal shows no match: {}",
            reply.body
        );
    }
    // The token that made it follows it.
    let page = h.search_as(&next, Some(&maker)).await;
    assert_eq!(matches(&page).len(), 2, "{page}");
    // The other token's own search pages normally.
    let own = h
        .search_as(&url("/fhir/Patient", &[("_count", "2")]), Some(&other))
        .await;
    let own_next = path_of(&link(&own, "next").expect("a next link"));
    assert_eq!(
        matches(&h.search_as(&own_next, Some(&other)).await).len(),
        2
    );
}

/// An Observation about `https://elsewhere.test/fhir/Patient/patient-a` is
/// about another server's patient, not about this server's Patient A: A's
/// token must not read it.
async fn a_patient_token_does_not_reach_data_about_another_servers_patient_with_the_same_id(
    h: Haven,
) {
    let (a, _) = h.seed_two_patients().await;
    let elsewhere_url = format!("https://elsewhere.test/fhir/Patient/{A}");
    let elsewhere = h.create(&observation_of(&elsewhere_url, "718-7")).await;
    let amy = h.token_for(AMY, "patient/*.rs").await;

    let mut failures = Vec::new();
    for path in [
        "/fhir/Observation".to_owned(),
        format!("/fhir/Patient/{A}/Observation"),
        format!("/fhir/Patient/{A}/$everything"),
    ] {
        let bundle = h.search_as(&path, Some(&amy)).await;
        let held = everything_in(&bundle);
        if held.contains(&elsewhere) {
            failures.push(format!(
                "{path}: {elsewhere} (subject {elsewhere_url}) is in {held:?}"
            ));
        }
        if !held.contains(&a[1]) {
            failures.push(format!("{path}: A's own {} is missing: {held:?}", a[1]));
        }
    }
    let read = h.get_as(&format!("/fhir/{elsewhere}"), &amy).await;
    if read.status == StatusCode::OK {
        failures.push(format!("GET /fhir/{elsewhere}: 200 {}", read.body));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---- compartments ----

async fn a_compartment_search_returns_only_that_patients_observations_with_the_code(h: Haven) {
    let one = h.create(&patient_named("One", &[])).await;
    let two = h.create(&patient_named("Two", &[])).await;
    let systolic = h.create(&observation_of(&one, "8480-6")).await;
    let hemoglobin = h.create(&observation_of(&one, "718-7")).await;
    h.create(&observation_of(&two, "8480-6")).await;
    h.create(&condition_of(&one, "Asthma")).await;

    let path = format!("/fhir/{one}/Observation");
    assert_eq!(
        h.found(&path, &[("code", "http://loinc.org|8480-6")]).await,
        only(&systolic)
    );
    assert_eq!(h.found(&path, &[]).await, these(&[&systolic, &hemoglobin]));
    let bundle = h.search(&url(&path, &[("code", "8480-6")])).await;
    assert_eq!(bundle["total"], 1);
    let own = link(&bundle, "self").unwrap();
    assert!(
        own.starts_with(&format!("{BASE}/{one}/Observation")),
        "{own}"
    );
    assert!(h
        .found(&format!("/fhir/{two}/Observation"), &[("code", "718-7")])
        .await
        .is_empty());
}

async fn a_compartment_search_of_a_type_outside_the_compartment_returns_nothing(h: Haven) {
    let doctor = h
        .create(&json!({"resourceType": "Practitioner", "name": [{"family": "House"}]}))
        .await;
    let mut patient = patient_named("Patient", &[]);
    patient["generalPractitioner"] = json!([reference(&doctor)]);
    let patient = h.create(&patient).await;
    let mut observation = observation_of(&patient, "8480-6");
    observation["performer"] = json!([reference(&doctor)]);
    h.create(&observation).await;

    let bundle = h.search(&format!("/fhir/{patient}/Practitioner")).await;
    assert!(matches(&bundle).is_empty(), "{bundle}");
    assert!(includes(&bundle).is_empty(), "{bundle}");
    if bundle["total"].is_number() {
        assert_eq!(bundle["total"], 0);
    }
}

async fn a_compartment_search_of_another_patient_with_a_patient_token_is_403(h: Haven) {
    let (a, b) = h.seed_two_patients().await;
    let amy = h.token_for(AMY, "patient/*.rs").await;

    for path in [
        format!("/fhir/Patient/{B}/Observation"),
        url(
            &format!("/fhir/Patient/{B}/Observation"),
            &[("code", "http://loinc.org|8480-6")],
        ),
        format!("/fhir/Patient/{B}/Condition"),
    ] {
        let reply = h.get_as(&path, &amy).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            reply.body
        );
        assert_eq!(reply.body["resourceType"], "OperationOutcome");
        for resource in &b {
            assert!(!reply.body.to_string().contains(id(resource)));
        }
    }
    // Her own compartment answers.
    let own = h
        .search_as(
            &url(
                &format!("/fhir/Patient/{A}/Observation"),
                &[("code", "http://loinc.org|8480-6")],
            ),
            Some(&amy),
        )
        .await;
    assert_eq!(matches(&own), only(&a[1]));
}

// ---- $everything ----

/// A patient's record for `$everything`: the Patient (managed by a clinic,
/// with a general practitioner), an Observation performed by the
/// practitioner, a Condition, an Encounter at the clinic; and another
/// patient's record with another practitioner and organization.
struct Record {
    patient: String,
    observation: String,
    condition: String,
    encounter: String,
    practitioner: String,
    organization: String,
    /// Everything of the other patient's record.
    others: Vec<String>,
}

async fn record(h: &Haven) -> Record {
    let organization = h
        .create(&json!({"resourceType": "Organization", "name": "Good Health Clinic"}))
        .await;
    let practitioner = h
        .create(&json!({"resourceType": "Practitioner", "name": [{"family": "House"}]}))
        .await;
    let other_organization = h
        .create(&json!({"resourceType": "Organization", "name": "Elsewhere"}))
        .await;
    let other_practitioner = h
        .create(&json!({"resourceType": "Practitioner", "name": [{"family": "Zhivago"}]}))
        .await;
    let with_care = |family: &str, organization: &str, practitioner: &str| {
        let mut patient = patient_named(family, &[]);
        patient["managingOrganization"] = reference(organization);
        patient["generalPractitioner"] = json!([reference(practitioner)]);
        patient
    };
    let performed = |subject: &str, practitioner: &str| {
        let mut observation = observation_of(subject, "8480-6");
        observation["performer"] = json!([reference(practitioner)]);
        observation
    };
    let patient = h
        .create(&with_care("Everything", &organization, &practitioner))
        .await;
    let other = h
        .create(&with_care(
            "Other",
            &other_organization,
            &other_practitioner,
        ))
        .await;
    let observation = h.create(&performed(&patient, &practitioner)).await;
    let condition = h.create(&condition_of(&patient, "Asthma")).await;
    let encounter = h.create(&encounter_of(&patient, &organization)).await;
    let others = vec![
        h.create(&performed(&other, &other_practitioner)).await,
        h.create(&condition_of(&other, "Gout")).await,
        h.create(&encounter_of(&other, &other_organization)).await,
        other,
        other_organization,
        other_practitioner,
    ];
    Record {
        patient,
        observation,
        condition,
        encounter,
        practitioner,
        organization,
        others,
    }
}

/// Fails if a Bundle holds anything of the other patient's record.
fn assert_nothing_of_others(bundle: &Value, record: &Record) {
    let held = everything_in(bundle);
    for other in &record.others {
        assert!(!held.contains(other), "{other} is not in {held:?}");
    }
}

async fn everything_returns_the_patients_record_and_the_practitioners_and_organizations_it_refers_to(
    h: Haven,
) {
    let r = record(&h).await;
    let bundle = h.search(&format!("/fhir/{}/$everything", r.patient)).await;
    assert_eq!(
        matches(&bundle),
        these(&[&r.patient, &r.observation, &r.condition, &r.encounter]),
        "{bundle}"
    );
    assert_eq!(
        includes(&bundle),
        these(&[&r.practitioner, &r.organization]),
        "each once, as includes: {bundle}"
    );
    assert_nothing_of_others(&bundle, &r);
    assert!(outcome_entries(&bundle).is_empty(), "{bundle}");
}

async fn everything_narrowed_by_type_returns_only_resources_of_that_type(h: Haven) {
    let r = record(&h).await;
    let path = format!("/fhir/{}/$everything", r.patient);

    let bundle = h.search(&url(&path, &[("_type", "Observation")])).await;
    assert_eq!(matches(&bundle), only(&r.observation), "{bundle}");
    let held = everything_in(&bundle);
    for absent in [&r.condition, &r.encounter] {
        assert!(!held.contains(absent), "{absent} in {bundle}");
    }
    assert_nothing_of_others(&bundle, &r);

    let bundle = h
        .search(&url(&path, &[("_type", "Observation,Condition")]))
        .await;
    assert_eq!(
        matches(&bundle),
        these(&[&r.observation, &r.condition]),
        "{bundle}"
    );
    assert!(!everything_in(&bundle).contains(&r.encounter));

    // A type outside the patient compartment narrows to nothing.
    let bundle = h.search(&url(&path, &[("_type", "Medication")])).await;
    assert!(everything_in(&bundle).is_empty(), "{bundle}");
}

async fn everything_since_an_instant_returns_only_what_changed_after_it(h: Haven) {
    let r = record(&h).await;
    h.clock.advance(time::Duration::hours(1));
    let since = "2026-07-01T09:30:00Z";
    let mut changed = condition_of(&r.patient, "Asthma, resolved");
    changed["id"] = json!(id(&r.condition));
    h.put(&changed).await;
    let later = h.create(&observation_of(&r.patient, "718-7")).await;

    let bundle = h
        .search(&url(
            &format!("/fhir/{}/$everything", r.patient),
            &[("_since", since)],
        ))
        .await;
    assert_eq!(
        matches(&bundle),
        these(&[&r.condition, &later]),
        "only what changed after {since}: {bundle}"
    );
    let held = everything_in(&bundle);
    for unchanged in [&r.observation, &r.encounter] {
        assert!(!held.contains(unchanged), "{unchanged} in {bundle}");
    }
    assert_nothing_of_others(&bundle, &r);
}

async fn everything_pages_with_next_links_that_visit_each_resource_once(h: Haven) {
    let r = record(&h).await;
    let path = format!("/fhir/{}/$everything", r.patient);
    let first_page = h.search(&url(&path, &[("_count", "2")])).await;
    let next = link(&first_page, "next").expect("a next link");
    assert!(
        next.starts_with(&format!("{BASE}{}?", &path[5..])),
        "{next}"
    );

    // Each variant is walked to its end, so that the failures name them all.
    let mut failures = Vec::new();
    for (pairs, expected) in [
        (
            &[("_count", "2")][..],
            vec![&r.patient, &r.observation, &r.condition, &r.encounter],
        ),
        (
            &[("_count", "1"), ("_type", "Observation,Condition")][..],
            vec![&r.observation, &r.condition],
        ),
        (
            &[("_count", "3"), ("_since", "2000-01-01T00:00:00Z")][..],
            vec![&r.patient, &r.observation, &r.condition, &r.encounter],
        ),
    ] {
        let expected: Vec<&str> = expected.into_iter().map(String::as_str).collect();
        let count: usize = pairs[0].1.parse().unwrap();
        let first = url(&path, pairs);
        let mut visited = Vec::new();
        let mut pages = 0;
        let mut at = Some(first.clone());
        while let Some(page_path) = at.take() {
            pages += 1;
            if pages > 10 {
                failures.push(format!("{first}: more than 10 pages"));
                break;
            }
            let reply = h.get(&page_path).await;
            if reply.status != StatusCode::OK {
                failures.push(format!(
                    "{first}: page {pages}, {page_path}: {} {}",
                    reply.status, reply.body
                ));
                break;
            }
            assert_nothing_of_others(&reply.body, &r);
            let on_page = matches(&reply.body);
            if on_page.is_empty() || on_page.len() > count {
                failures.push(format!(
                    "{first}: page {pages} holds {} matches: {}",
                    on_page.len(),
                    reply.body
                ));
            }
            visited.extend(on_page);
            at = link(&reply.body, "next").map(|next| path_of(&next));
        }
        visited.sort();
        if visited != these(&expected) {
            failures.push(format!(
                "{first}: visited {visited:?}, expected each of {:?} once",
                these(&expected)
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

async fn everything_refuses_an_unknown_parameter_with_400(h: Haven) {
    let r = record(&h).await;
    let path = format!("/fhir/{}/$everything", r.patient);
    for pairs in [
        &[("nonsense", "1")][..],
        &[("code", "8480-6")][..],
        &[("_count", "2"), ("foo", "bar")][..],
    ] {
        let reply = h.refused(&url(&path, pairs), StatusCode::BAD_REQUEST).await;
        assert!(!reply.issue_code().is_empty(), "{pairs:?}: {}", reply.body);
    }
}

async fn everything_of_another_patient_with_a_patient_token_is_403(h: Haven) {
    let (a, b) = h.seed_two_patients().await;
    let amy = h.token_for(AMY, "patient/*.rs").await;

    let path = format!("/fhir/Patient/{B}/$everything");
    let reply = h.get_as(&path, &amy).await;
    assert_eq!(
        reply.status,
        StatusCode::FORBIDDEN,
        "{path}: {}",
        reply.body
    );
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
    for resource in &b {
        assert!(!reply.body.to_string().contains(id(resource)));
    }
    // Her own record answers, with nothing of B's.
    let own = h
        .search_as(&format!("/fhir/Patient/{A}/$everything"), Some(&amy))
        .await;
    let held = everything_in(&own);
    for resource in &a {
        assert!(held.contains(resource), "{resource} in {held:?}");
    }
    for resource in &b {
        assert!(!held.contains(resource), "{resource} not in {held:?}");
    }
}

// ---- system search ----

async fn a_system_search_over_two_types_returns_both_and_no_other(h: Haven) {
    let patient = h.create(&patient_named("System", &[])).await;
    let observation = h.create(&observation_of(&patient, "8480-6")).await;
    h.create(&condition_of(&patient, "Asthma")).await;

    let bundle = h
        .search(&url(
            "/fhir",
            &[("_type", "Patient,Observation"), ("_lastUpdated", "ge2000")],
        ))
        .await;
    assert_eq!(
        matches(&bundle),
        these(&[&patient, &observation]),
        "{bundle}"
    );
    assert_eq!(bundle["total"], 2);
    assert!(outcome_entries(&bundle).is_empty(), "{bundle}");

    let bundle = h
        .search(&url(
            "/fhir",
            &[("_type", "Patient,Observation"), ("_lastUpdated", "lt2000")],
        ))
        .await;
    assert!(matches(&bundle).is_empty(), "{bundle}");
}

async fn a_system_search_of_an_unknown_type_is_404(h: Haven) {
    h.create(&patient_named("System", &[])).await;
    for types in ["Nope", "Patient,Nope"] {
        h.refused(&url("/fhir", &[("_type", types)]), StatusCode::NOT_FOUND)
            .await;
    }
}

async fn an_unknown_parameter_is_reported_in_an_outcome_entry_or_refused_when_strict(h: Haven) {
    let patient = h.create(&patient_named("Known", &[])).await;
    for path in [
        url("/fhir/Patient", &[("nonsense", "1")]),
        url("/fhir", &[("_type", "Patient"), ("nonsense", "1")]),
    ] {
        let bundle = h.search(&path).await;
        assert_eq!(matches(&bundle), only(&patient), "{path}: {bundle}");
        let outcomes = outcome_entries(&bundle);
        assert_eq!(outcomes.len(), 1, "{path}: {bundle}");
        let outcome = &outcomes[0]["resource"];
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert!(
            outcome.to_string().contains("nonsense"),
            "{path}: names the parameter: {outcome}"
        );

        let strict = h
            .send(
                Method::GET,
                &path,
                h.token.as_deref(),
                None,
                &[("prefer", "handling=strict")],
            )
            .await;
        assert_eq!(
            strict.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            strict.body
        );
        assert_eq!(strict.body["resourceType"], "OperationOutcome");
        assert!(
            strict.body.to_string().contains("nonsense"),
            "{}",
            strict.body
        );
    }
}

// ---- errors ----

async fn malformed_values_are_400_with_an_operation_outcome_never_500(h: Haven) {
    let patient = h.create(&patient_named("Valid", &[])).await;
    h.create(&observation_of(&patient, "8480-6")).await;
    let mut failures = Vec::new();
    for (path, pairs) in [
        ("/fhir/Patient", [("birthdate", "2024-13")]),
        ("/fhir/Patient", [("birthdate", "gt2024-02-30")]),
        ("/fhir/Patient", [("_count", "abc")]),
        ("/fhir/Observation", [("value-quantity", "abc")]),
        ("/fhir/Observation", [("value-quantity", "5|a|b|c")]),
        ("/fhir/Observation", [("_include", "Observation:nope")]),
        ("/fhir/Observation", [("date", "xx2024")]),
        ("/fhir/Observation", [("subject", "Patient/not an id")]),
        ("/fhir/RiskAssessment", [("probability", "gtabc")]),
        (
            "/fhir/Observation",
            [("code-value-quantity", "http://loinc.org|8480-6")],
        ),
        ("/fhir/Patient", [("_summary", "maybe")]),
        ("/fhir/Patient", [("family:sideways", "x")]),
    ] {
        let path = url(path, &pairs);
        let reply = h.get(&path).await;
        if reply.status != StatusCode::BAD_REQUEST
            || reply.body["resourceType"] != "OperationOutcome"
        {
            failures.push(format!("{path}: {} {}", reply.status, reply.body));
        }
    }
    assert!(failures.is_empty(), "not 400s: {failures:#?}");
}

async fn a_chain_to_a_parameter_no_target_has_is_reported_or_refused_when_strict(h: Haven) {
    let patient = h.create(&patient_named("Valid", &[])).await;
    h.create(&observation_of(&patient, "8480-6")).await;
    for pairs in [[("subject.nosuch", "x")], [("subject:Patient.nosuch", "x")]] {
        let path = url("/fhir/Observation", &pairs);
        // Like any unknown parameter (R4 search.html#errors): ignored and said so.
        let bundle = h.search(&path).await;
        let outcomes = outcome_entries(&bundle);
        assert_eq!(outcomes.len(), 1, "{path}: {bundle}");
        assert!(
            outcomes[0]["resource"].to_string().contains("nosuch"),
            "{path}: names the parameter: {bundle}"
        );
        let strict = h
            .send(
                Method::GET,
                &path,
                h.token.as_deref(),
                None,
                &[("prefer", "handling=strict")],
            )
            .await;
        assert_eq!(
            strict.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            strict.body
        );
        assert_eq!(strict.body["resourceType"], "OperationOutcome");
    }
}
