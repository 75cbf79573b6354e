//! Consent and security labels (R6, R7), as a SMART app's users meet them:
//! labels applied on write, clearance and masking on every way data leaves
//! (read, search, count, include, revinclude, chain, `_has`, paging, history,
//! `$everything`), Consents judged against purpose of use and actor, break the
//! glass, and the decision each AuditEvent records.
//!
//! Every story runs on SQLite and, when `HAVEN_TEST_POSTGRES_URL` names an
//! admin URL, on PostgreSQL (a fresh database per test).

mod support;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use haven_api::policy::PolicyConfig;
use haven_api::{router, ApiConfig, AppState};
use haven_auth::registry::Role;
use haven_auth::server::UserPolicy;
use haven_model::clock::{Clock, ManualClock};
use haven_policy::clearance::Clearance;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::{secured, Reply};
use tempfile::TempDir;
use time::macros::datetime;

const BASE: &str = "https://haven.test/fhir";
const SCT: &str = "http://snomed.info/sct";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
const OPIOID_ABUSE: &str = "5602001";
const MAJOR_DEPRESSION: &str = "370143000";
const PREDIABETES: &str = "15777000";
const SCOPE: &str = "user/*.cruds";

/// A clinician with the default clearance (normal data only).
const UNCLEARED: &str = "drno";
/// A clinician cleared for substance use and mental health data.
const CLEARED: &str = "dryes";
/// A clinician who may break the glass.
const EMERGENCY: &str = "drbtg";
/// An administrator, who reads the audit trail.
const ADMIN: &str = "admin";

struct Haven {
    router: Router,
    smart: secured::Smart,
    state: AppState,
    store: Arc<dyn haven_store::Store>,
    _dir: Option<TempDir>,
}

async fn spawn_on(database_url: &str, dir: Option<TempDir>, policy: PolicyConfig) -> Haven {
    let clock = Arc::new(ManualClock::new(datetime!(2026-07-01 09:00 UTC)));
    let store = haven_store::connect(database_url, clock.clone() as Arc<dyn Clock>)
        .await
        .unwrap();
    let state = AppState::new(store.clone(), clock.clone(), ApiConfig::new(BASE));
    let (state, smart) = secured::secure(state, store.clone(), clock.clone(), BASE).await;
    let state = state.with_policy(policy);
    smart
        .add_users(&[
            (UNCLEARED, Role::Practitioner, Some("Practitioner/no")),
            (CLEARED, Role::Practitioner, Some("Practitioner/yes")),
            (EMERGENCY, Role::Practitioner, Some("Practitioner/btg")),
            (ADMIN, Role::Admin, Some("Practitioner/admin")),
        ])
        .await;
    let set = |clearance: Option<&str>, break_glass: bool| UserPolicy {
        clearance: clearance.map(|c| Clearance::parse(c).unwrap()),
        break_glass,
        organization: None,
    };
    smart
        .server
        .set_user_policy(CLEARED, set(Some("R:ETH,PSY"), false))
        .await
        .unwrap();
    smart
        .server
        .set_user_policy(EMERGENCY, set(None, true))
        .await
        .unwrap();
    smart
        .server
        .set_user_policy(ADMIN, set(Some("V:*"), false))
        .await
        .unwrap();
    Haven {
        router: router(state.clone()),
        smart,
        state,
        store,
        _dir: dir,
    }
}

async fn on_sqlite_with<F, Fut>(policy: PolicyConfig, story: F)
where
    F: FnOnce(Haven) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("haven.db").display());
    story(spawn_on(&url, Some(dir), policy).await).await;
}

async fn on_postgres_with<F, Fut>(policy: PolicyConfig, story: F)
where
    F: FnOnce(Haven) -> Fut,
    Fut: Future<Output = ()>,
{
    support::postgres::with_fresh_database("haven_policy", |url| async move {
        story(spawn_on(&url, None, policy).await).await;
    })
    .await;
}

async fn on_sqlite<F, Fut>(story: F)
where
    F: FnOnce(Haven) -> Fut,
    Fut: Future<Output = ()>,
{
    on_sqlite_with(PolicyConfig::default(), story).await;
}

async fn on_postgres<F, Fut>(story: F)
where
    F: FnOnce(Haven) -> Fut,
    Fut: Future<Output = ()>,
{
    on_postgres_with(PolicyConfig::default(), story).await;
}

macro_rules! stories {
    ($($story:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $story() {
                    super::on_sqlite(super::$story).await;
                }
            )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_an_opt_in_site_only_patients_whose_consent_permits_are_shared() {
                super::on_sqlite_with(
                    super::opting_in(),
                    super::on_an_opt_in_site_only_patients_whose_consent_permits_are_shared,
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_site_may_answer_refused_reads_as_not_found() {
                super::on_sqlite_with(
                    super::refusing_as_missing(),
                    super::a_site_may_answer_refused_reads_as_not_found,
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_masked_view_hides_exactly_the_sensitive_elements() {
                super::on_sqlite_with(
                    super::masking_mental_health(),
                    super::a_masked_view_hides_exactly_the_sensitive_elements,
                )
                .await;
            }
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $story() {
                    super::on_postgres(super::$story).await;
                }
            )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_an_opt_in_site_only_patients_whose_consent_permits_are_shared() {
                super::on_postgres_with(
                    super::opting_in(),
                    super::on_an_opt_in_site_only_patients_whose_consent_permits_are_shared,
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_site_may_answer_refused_reads_as_not_found() {
                super::on_postgres_with(
                    super::refusing_as_missing(),
                    super::a_site_may_answer_refused_reads_as_not_found,
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_masked_view_hides_exactly_the_sensitive_elements() {
                super::on_postgres_with(
                    super::masking_mental_health(),
                    super::a_masked_view_hides_exactly_the_sensitive_elements,
                )
                .await;
            }
        }
    };
}

stories!(
    sensitive_records_are_labeled_on_write_with_the_rule_and_code_behind_each_label,
    a_clinician_without_clearance_cannot_reach_sensitive_records_by_any_search_and_with_it_can,
    a_consent_denying_research_hides_data_from_research_only_until_it_is_revoked,
    a_consent_denying_one_practitioner_hides_the_record_from_that_practitioner_only,
    break_the_glass_needs_the_permission_and_a_reason_and_leaves_a_trail,
    a_read_refused_by_policy_is_explained_by_its_request_id,
    relabeling_labels_data_stored_before_the_rules_and_records_each_change,
    a_patient_sees_their_own_sensitive_record_unless_their_clearance_says_otherwise,
    a_marketing_purpose_sees_no_sensitive_data_whatever_the_clearance,
    consent_provisions_on_type_code_instance_related_data_and_organization_apply_to_reads_and_searches_alike,
    a_transaction_labels_an_entry_that_refers_to_a_sensitive_one_written_after_it,
);

fn opting_in() -> PolicyConfig {
    PolicyConfig {
        site_default: haven_policy::consent::SiteDefault::OptIn,
        ..PolicyConfig::default()
    }
}

fn refusing_as_missing() -> PolicyConfig {
    PolicyConfig {
        hidden_as_missing: true,
        ..PolicyConfig::default()
    }
}

fn masking_mental_health() -> PolicyConfig {
    PolicyConfig::default().masking(["PSY".to_owned()])
}

// ---- requests and data ----

impl Haven {
    async fn send(&self, method: Method, path: &str, token: &str, body: Option<&Value>) -> Reply {
        self.send_with(method, path, token, body, &[]).await
    }

    async fn send_with(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let request = support::fhir_request(method, path, Some(token), body, headers);
        support::call(&self.router, request).await
    }

    async fn get(&self, path: &str, token: &str) -> Reply {
        self.send(Method::GET, path, token, None).await
    }

    async fn token(&self, user: &str) -> String {
        self.smart.token(user, SCOPE).await
    }

    async fn token_for(&self, user: &str, purpose: &str) -> String {
        self.smart
            .token_with(user, SCOPE, &[("purpose_of_use", purpose)])
            .await
            .unwrap()
    }

    /// Creates with `token`; returns the stored resource as the writer sees it.
    async fn create(&self, token: &str, resource: &Value) -> String {
        let resource_type = resource["resourceType"].as_str().unwrap();
        let reply = self
            .send_with(
                Method::POST,
                &format!("/fhir/{resource_type}"),
                token,
                Some(resource),
                &[("prefer", "return=minimal")],
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        let location = reply.header("location").unwrap();
        let path = location.split("/fhir/").nth(1).unwrap();
        path.split("/_history").next().unwrap().to_owned()
    }

    /// A search that must succeed: its matches as `Type/id`, sorted, and the Bundle.
    async fn search(&self, path: &str, token: &str) -> (Vec<String>, Value) {
        let reply = self.get(path, token).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
        let mut found: Vec<String> = reply.body["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["resource"]["resourceType"] != "OperationOutcome")
            .map(|e| {
                format!(
                    "{}/{}",
                    e["resource"]["resourceType"].as_str().unwrap(),
                    e["resource"]["id"].as_str().unwrap()
                )
            })
            .collect();
        found.sort();
        (found, reply.body)
    }

    async fn total(&self, path: &str, token: &str) -> u64 {
        let (_, bundle) = self.search(path, token).await;
        bundle["total"]
            .as_u64()
            .unwrap_or_else(|| panic!("{path}: no total"))
    }

    /// Writes a privacy Consent of `patient` as the administrator (who may);
    /// returns `Consent/id`.
    async fn consent(&self, patient: &str, provision: Value) -> String {
        let admin = self.token(ADMIN).await;
        self.create(&admin, &privacy_consent(patient, provision))
            .await
    }

    /// The AuditEvents an administrator finds with `query`.
    async fn audit(&self, query: &str) -> Vec<Value> {
        let admin = self.token(ADMIN).await;
        let (_, bundle) = self
            .search(&format!("/fhir/AuditEvent?{query}"), &admin)
            .await;
        bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["resource"].clone())
            .filter(|r| r["resourceType"] == "AuditEvent")
            .collect()
    }
}

fn decision_of(event: &Value) -> String {
    event["entity"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["type"]["code"] == "decision")
        .map(|e| e.to_string())
        .unwrap_or_default()
}

/// Whether a searchset says, in its outcome entry, that matches were withheld.
fn suppressed(bundle: &Value) -> bool {
    bundle["entry"].as_array().into_iter().flatten().any(|e| {
        e["search"]["mode"] == "outcome"
            && e["resource"]["issue"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["code"] == "suppressed" && i["severity"] == "information")
    })
}

fn sorted(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

fn patient() -> Value {
    json!({"resourceType": "Patient", "name": [{"family": "Quinn"}], "gender": "female"})
}

fn condition(patient: &str, code: &str, encounter: Option<&str>) -> Value {
    let mut c = json!({"resourceType": "Condition",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        "code": {"coding": [{"system": SCT, "code": code}], "text": format!("condition {code}")},
        "subject": {"reference": patient},
        "onsetDateTime": "2020-02-03"});
    if let Some(e) = encounter {
        c["encounter"] = json!({"reference": e});
    }
    c
}

fn encounter(patient: &str) -> Value {
    json!({"resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": patient}})
}

fn observation(patient: &str, encounter: Option<&str>) -> Value {
    let mut o = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": patient},
        "valueQuantity": {"value": 70, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}});
    if let Some(e) = encounter {
        o["encounter"] = json!({"reference": e});
    }
    o
}

fn medication_request(patient: &str, reason: &str) -> Value {
    json!({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "313782"}]},
        "subject": {"reference": patient},
        "reasonReference": [{"reference": reason}]})
}

fn labels(resource: &Value) -> Vec<String> {
    let mut out: Vec<String> = resource["meta"]["security"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{}|{}",
                c["system"].as_str().unwrap_or_default(),
                c["code"].as_str().unwrap_or_default()
            )
        })
        .collect();
    out.sort();
    out
}

fn eth_r() -> Vec<String> {
    sorted(&[&format!("{ACT_CODE}|ETH"), &format!("{CONFIDENTIALITY}|R")])
}

/// One patient with an opioid-abuse Condition diagnosed in an Encounter, a
/// MedicationRequest for it, a heart-rate Observation in that Encounter and a
/// prediabetes Condition. Returns (patient, sensitive condition, encounter,
/// medication request, observation, plain condition).
async fn sensitive_chart(haven: &Haven) -> [String; 6] {
    let writer = haven.token(CLEARED).await;
    let p = haven.create(&writer, &patient()).await;
    let e = haven.create(&writer, &encounter(&p)).await;
    let c = haven
        .create(&writer, &condition(&p, OPIOID_ABUSE, Some(&e)))
        .await;
    let m = haven.create(&writer, &medication_request(&p, &c)).await;
    let o = haven.create(&writer, &observation(&p, Some(&e))).await;
    let plain = haven
        .create(&writer, &condition(&p, PREDIABETES, None))
        .await;
    [p, c, e, m, o, plain]
}

// ---- stories ----

async fn sensitive_records_are_labeled_on_write_with_the_rule_and_code_behind_each_label(
    haven: Haven,
) {
    let [p, c, e, m, o, plain] = sensitive_chart(&haven).await;
    let admin = haven.token(ADMIN).await;
    let read = |path: String| {
        let haven = &haven;
        let admin = admin.clone();
        async move {
            let reply = haven.get(&format!("/fhir/{path}"), &admin).await;
            assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
            reply.body
        }
    };
    let condition = read(c.clone()).await;
    assert_eq!(labels(&condition), eth_r());
    let basis = condition["meta"]["security"].to_string();
    assert!(
        basis.contains(&format!(
            "rule substance-use: {SCT}|{OPIOID_ABUSE} in Condition.code"
        )),
        "{basis}"
    );
    // The medication for it inherits; the Encounter it was diagnosed in gets
    // a new version with the label.
    let medication = read(m).await;
    assert_eq!(labels(&medication), eth_r());
    assert!(medication["meta"]["security"]
        .to_string()
        .contains(&format!("inherited from {c}")));
    let enc = read(e.clone()).await;
    assert_eq!(labels(&enc), eth_r());
    assert_eq!(enc["meta"]["versionId"], "2");
    // Ordinary data gets no label.
    assert!(labels(&read(plain).await).is_empty());
    assert!(labels(&read(o).await).is_empty());
    assert!(labels(&read(p.clone()).await).is_empty());
    // A label the client sends is kept; an update never lowers labels.
    let writer = haven.token(CLEARED).await;
    let mut hiv = observation(&p, None);
    hiv["meta"] = json!({"security": [{"system": ACT_CODE, "code": "HIV"}, {"system": CONFIDENTIALITY, "code": "V"}]});
    let hiv_ref = haven.create(&writer, &hiv).await;
    let stored = read(hiv_ref.clone()).await;
    assert_eq!(
        labels(&stored),
        sorted(&[&format!("{ACT_CODE}|HIV"), &format!("{CONFIDENTIALITY}|V")])
    );
    let mut lowered = condition.clone();
    lowered["meta"] = json!({"security": [{"system": CONFIDENTIALITY, "code": "N"}]});
    lowered["code"] = json!({"coding": [{"system": SCT, "code": PREDIABETES}]});
    let reply = haven
        .send(Method::PUT, &format!("/fhir/{c}"), &writer, Some(&lowered))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(labels(&read(c).await), eth_r());
}

async fn a_clinician_without_clearance_cannot_reach_sensitive_records_by_any_search_and_with_it_can(
    haven: Haven,
) {
    let [p, c, e, m, o, plain] = sensitive_chart(&haven).await;
    let pid = p.split('/').nth(1).unwrap().to_owned();
    let no = haven.token(UNCLEARED).await;
    let yes = haven.token(CLEARED).await;

    // Read: refused without clearance, for the Condition and what inherits.
    for hidden in [&c, &e, &m] {
        let reply = haven.get(&format!("/fhir/{hidden}"), &no).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{hidden}: {}",
            reply.body
        );
        let reply = haven.get(&format!("/fhir/{hidden}"), &yes).await;
        assert_eq!(reply.status, StatusCode::OK, "{hidden}");
    }
    // Search and count.
    let conditions = format!("/fhir/Condition?patient={pid}&_total=accurate");
    assert_eq!(haven.search(&conditions, &no).await.0, vec![plain.clone()]);
    assert_eq!(haven.total(&conditions, &no).await, 1);
    assert_eq!(
        haven.search(&conditions, &yes).await.0,
        sorted(&[&c, &plain])
    );
    let count = format!("/fhir/Condition?patient={pid}&_summary=count");
    assert_eq!(haven.total(&count, &no).await, 1);
    assert_eq!(haven.total(&count, &yes).await, 2);
    let by_code = format!("/fhir/Condition?code={SCT}|{OPIOID_ABUSE}&_total=accurate");
    assert_eq!(haven.total(&by_code, &no).await, 0);
    assert_eq!(haven.total(&by_code, &yes).await, 1);
    // The uncleared search says that something was left out; the cleared one
    // does not. The notice does not depend on the search's criteria, so it
    // cannot tell which hidden codes a patient has.
    let (_, bundle) = haven.search(&conditions, &no).await;
    assert!(suppressed(&bundle), "{bundle}");
    let other_code = format!("/fhir/Condition?patient={pid}&code={SCT}|44054006");
    let (_, with_code) = haven.search(&by_code, &no).await;
    let (_, without) = haven.search(&other_code, &no).await;
    assert_eq!(suppressed(&with_code), suppressed(&without));
    // The server's Provenance of a sensitive version carries its labels.
    let (provenance, bundle) = haven
        .search(&format!("/fhir/Provenance?target={c}"), &yes)
        .await;
    assert_eq!(provenance.len(), 1, "{bundle}");
    assert_eq!(labels(&bundle["entry"][0]["resource"]), eth_r());
    assert!(haven
        .search(&format!("/fhir/Provenance?target={c}"), &no)
        .await
        .0
        .is_empty());
    // A searchset carries the highest confidentiality of its entries.
    let (_, bundle) = haven.search(&conditions, &yes).await;
    assert!(!suppressed(&bundle), "{bundle}");
    assert_eq!(
        labels(&bundle),
        vec![format!("{CONFIDENTIALITY}|R")],
        "{}",
        bundle["meta"]
    );
    // _include and _revinclude.
    let include = format!("/fhir/Observation?patient={pid}&_include=Observation:encounter");
    assert_eq!(haven.search(&include, &no).await.0, vec![o.clone()]);
    assert_eq!(haven.search(&include, &yes).await.0, sorted(&[&e, &o]));
    let revinclude = format!("/fhir/Patient?_id={pid}&_revinclude=Condition:subject");
    assert_eq!(
        haven.search(&revinclude, &no).await.0,
        sorted(&[&plain, &p])
    );
    // Chains and _has cannot test values of what cannot be read.
    let chain = format!("/fhir/Observation?encounter.status=finished&patient={pid}");
    assert!(haven.search(&chain, &no).await.0.is_empty());
    assert_eq!(haven.search(&chain, &yes).await.0, vec![o.clone()]);
    let has = format!("/fhir/Patient?_has:Condition:subject:code={SCT}|{OPIOID_ABUSE}");
    assert!(haven.search(&has, &no).await.0.is_empty());
    assert_eq!(haven.search(&has, &yes).await.0, vec![p.clone()]);
    // Paging: one match per page, and only the visible one.
    let paged = format!("/fhir/Condition?patient={pid}&_count=1");
    let (found, first) = haven.search(&paged, &no).await;
    assert_eq!(found, vec![plain.clone()]);
    assert!(
        !first["link"].to_string().contains("\"next\""),
        "{}",
        first["link"]
    );
    // History and $everything.
    let (history, _) = haven.search("/fhir/Condition/_history", &no).await;
    assert!(history.iter().all(|r| r != &c), "{history:?}");
    let (everything, _) = haven
        .search(&format!("/fhir/Patient/{pid}/$everything"), &no)
        .await;
    for hidden in [&c, &e, &m] {
        assert!(!everything.contains(hidden), "{hidden} in {everything:?}");
    }
    assert!(everything.contains(&o) && everything.contains(&plain));
    // The refusal names the labels in its AuditEvent.
    let events = haven.audit(&format!("entity={c}&outcome=8")).await;
    assert!(!events.is_empty());
    let decision = decision_of(&events[0]);
    assert!(
        decision.contains("filtered") && decision.contains("ETH"),
        "{decision}"
    );
}

async fn a_masked_view_hides_exactly_the_sensitive_elements(haven: Haven) {
    let writer = haven.token(CLEARED).await;
    let p = haven.create(&writer, &patient()).await;
    let pid = p.split('/').nth(1).unwrap().to_owned();
    let c = haven
        .create(&writer, &condition(&p, MAJOR_DEPRESSION, None))
        .await;
    let no = haven.token(UNCLEARED).await;
    let full = haven.get(&format!("/fhir/{c}"), &writer).await.body;
    let masked = haven.get(&format!("/fhir/{c}"), &no).await;
    assert_eq!(masked.status, StatusCode::OK, "{}", masked.body);
    let masked = masked.body;
    assert_eq!(masked["code"]["extension"][0]["valueCode"], "masked");
    for kept in ["subject", "onsetDateTime", "clinicalStatus", "id"] {
        assert_eq!(masked[kept], full[kept], "{kept}");
    }
    let text = masked.to_string();
    assert!(!text.contains(MAJOR_DEPRESSION), "{text}");
    assert!(!text.contains("\"PSY\""), "{text}");
    assert!(labels(&masked).contains(
        &"http://terminology.hl7.org/CodeSystem/v3-ObservationValue|REDACTED".to_owned()
    ));
    // The stored copy is unchanged.
    let again = haven.get(&format!("/fhir/{c}"), &writer).await.body;
    assert_eq!(again["code"], full["code"]);
    assert!(again["code"].to_string().contains(MAJOR_DEPRESSION));
    // A search on what is not masked finds the masked copy; a search on the
    // masked code does not.
    let (found, bundle) = haven
        .search(&format!("/fhir/Condition?patient={pid}"), &no)
        .await;
    assert_eq!(found, vec![c.clone()]);
    assert!(!bundle.to_string().contains(MAJOR_DEPRESSION));
    let by_code = format!("/fhir/Condition?code={SCT}|{MAJOR_DEPRESSION}");
    assert!(haven.search(&by_code, &no).await.0.is_empty());
    assert_eq!(haven.search(&by_code, &writer).await.0, vec![c.clone()]);
    // A search inside a batch is masked too.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": format!("Condition?patient={pid}")}}]});
    let reply = haven.send(Method::POST, "/fhir", &no, Some(&batch)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let text = reply.body.to_string();
    assert!(text.contains("masked"), "{text}");
    assert!(!text.contains(MAJOR_DEPRESSION), "{text}");
    // What a masked copy hides cannot be tested, copied out or overwritten.
    let patch = json!([{"op": "test", "path": "/code/coding/0/code", "value": MAJOR_DEPRESSION}]);
    let request = support::fhir_request(Method::PATCH, &format!("/fhir/{c}"), Some(&no), None, &[])
        .map(|_| axum::body::Body::from(patch.to_string()));
    let (mut parts, body) = request.into_parts();
    parts.headers.insert(
        "content-type",
        "application/json-patch+json".parse().unwrap(),
    );
    let reply = support::call(&haven.router, http::Request::from_parts(parts, body)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    let reply = haven
        .send(Method::PUT, &format!("/fhir/{c}"), &no, Some(&masked))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    let reply = haven
        .send(Method::DELETE, &format!("/fhir/{c}"), &no, None)
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    let again = haven.get(&format!("/fhir/{c}"), &writer).await.body;
    assert_eq!(again["code"], full["code"]);
}

/// A provision that permits all but what `actor` (with a ParticipationType
/// role) asks for.
fn denying_actor(role: &str, actor: &str) -> Value {
    json!({"type": "permit", "provision": [{"type": "deny",
        "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": role}]},
                   "reference": {"reference": actor}}]}]})
}

fn privacy_consent(patient: &str, provision: Value) -> Value {
    json!({"resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient},
        "policyRule": {"coding": [{"system": ACT_CODE, "code": "OPTIN"}]},
        "provision": provision})
}

async fn a_consent_denying_research_hides_data_from_research_only_until_it_is_revoked(
    haven: Haven,
) {
    let writer = haven.token(CLEARED).await;
    let p = haven.create(&writer, &patient()).await;
    let pid = p.split('/').nth(1).unwrap().to_owned();
    let o = haven.create(&writer, &observation(&p, None)).await;
    let consent = privacy_consent(
        &p,
        json!({"type": "permit", "provision": [{"type": "deny",
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]}]}),
    );
    // A practitioner may not write a patient's privacy Consent.
    let reply = haven
        .send(Method::POST, "/fhir/Consent", &writer, Some(&consent))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    let admin = haven.token(ADMIN).await;
    let consent_ref = haven.create(&admin, &consent).await;
    let research = haven.token_for(UNCLEARED, "HRESCH").await;
    let treatment = haven.token_for(UNCLEARED, "TREAT").await;
    let observations = format!("/fhir/Observation?patient={pid}&_total=accurate");

    let reply = haven.get(&format!("/fhir/{o}"), &research).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    assert_eq!(haven.total(&observations, &research).await, 0);
    assert!(suppressed(&haven.search(&observations, &research).await.1));
    assert!(!suppressed(
        &haven.search(&observations, &treatment).await.1
    ));
    assert_eq!(
        haven.get(&format!("/fhir/{o}"), &treatment).await.status,
        StatusCode::OK
    );
    assert_eq!(haven.total(&observations, &treatment).await, 1);
    // Each decision names the Consent.
    let refused = haven.audit(&format!("entity={o}&outcome=8")).await;
    assert!(!refused.is_empty());
    let decision = decision_of(&refused[0]);
    assert!(
        decision.contains(&format!("{consent_ref} denied")),
        "{decision}"
    );
    assert!(decision.contains("HRESCH"), "{decision}");
    let permitted = haven
        .audit(&format!("entity={o}&outcome=0&subtype=read"))
        .await;
    assert!(permitted
        .iter()
        .any(|e| decision_of(e).contains(&format!("{consent_ref} permitted"))));

    // Revoking the Consent restores access on the next request.
    let mut revoked = haven
        .get(&format!("/fhir/{consent_ref}"), &writer)
        .await
        .body;
    revoked["status"] = json!("inactive");
    let reply = haven
        .send(
            Method::PUT,
            &format!("/fhir/{consent_ref}"),
            &writer,
            Some(&revoked),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    let reply = haven
        .send(
            Method::PUT,
            &format!("/fhir/{consent_ref}"),
            &admin,
            Some(&revoked),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        haven.get(&format!("/fhir/{o}"), &research).await.status,
        StatusCode::OK
    );
    assert_eq!(haven.total(&observations, &research).await, 1);
}

async fn a_consent_denying_one_practitioner_hides_the_record_from_that_practitioner_only(
    haven: Haven,
) {
    let writer = haven.token(CLEARED).await;
    let p = haven.create(&writer, &patient()).await;
    let pid = p.split('/').nth(1).unwrap().to_owned();
    let o = haven.create(&writer, &observation(&p, None)).await;
    let plain = haven
        .create(&writer, &condition(&p, PREDIABETES, None))
        .await;
    haven
        .consent(&p, denying_actor("PRCP", "Practitioner/no"))
        .await;
    let no = haven.token(UNCLEARED).await;
    for hidden in [&o, &plain, &p] {
        let reply = haven.get(&format!("/fhir/{hidden}"), &no).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{hidden}");
        assert_eq!(
            haven.get(&format!("/fhir/{hidden}"), &writer).await.status,
            StatusCode::OK
        );
    }
    let everything = format!("/fhir/Patient/{pid}/$everything");
    assert!(haven.search(&everything, &no).await.0.is_empty());
    let (all, _) = haven.search(&everything, &writer).await;
    for shown in [&o, &plain, &p] {
        assert!(all.contains(shown), "{shown} in {all:?}");
    }
    let (system, _) = haven
        .search("/fhir/?_type=Observation,Condition", &no)
        .await;
    assert!(system.is_empty(), "{system:?}");
}

async fn break_the_glass_needs_the_permission_and_a_reason_and_leaves_a_trail(haven: Haven) {
    let [_, c, ..] = sensitive_chart(&haven).await;
    let reason = "unconscious patient in the emergency department";
    // Not allowed to break the glass.
    let refused = haven
        .smart
        .token_with(
            UNCLEARED,
            SCOPE,
            &[("purpose_of_use", "BTG"), ("btg_reason", reason)],
        )
        .await;
    assert!(refused.unwrap_err().contains("may not break the glass"));
    // Allowed, but no reason.
    let refused = haven
        .smart
        .token_with(EMERGENCY, SCOPE, &[("purpose_of_use", "BTG")])
        .await;
    assert!(
        refused.unwrap_err().contains("btg_reason"),
        "a reason is required"
    );
    // Normally this clinician cannot read the record.
    let normal = haven.token(EMERGENCY).await;
    assert_eq!(
        haven.get(&format!("/fhir/{c}"), &normal).await.status,
        StatusCode::FORBIDDEN
    );
    let glass = haven
        .smart
        .token_with(
            EMERGENCY,
            SCOPE,
            &[("purpose_of_use", "BTG"), ("btg_reason", reason)],
        )
        .await
        .unwrap();
    let reply = haven.get(&format!("/fhir/{c}"), &glass).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // The trail: every access under it names the purpose and the reason, and
    // an administrator lists them all by the break-the-glass policy.
    let events = haven.audit("policy=urn:haven:policy:break-the-glass").await;
    assert!(!events.is_empty());
    for event in &events {
        assert_eq!(event["purposeOfEvent"][0]["coding"][0]["code"], "BTG");
        let decision = decision_of(event);
        assert!(decision.contains(reason), "{decision}");
    }
    assert!(events
        .iter()
        .any(|e| e["entity"].to_string().contains(&format!("{c}/_history"))));
    assert!(events.iter().any(|e| decision_of(e).contains("overridden")));
}

async fn a_read_refused_by_policy_is_explained_by_its_request_id(haven: Haven) {
    let [_, c, ..] = sensitive_chart(&haven).await;
    let no = haven.token(UNCLEARED).await;
    let reply = haven
        .send_with(
            Method::GET,
            &format!("/fhir/{c}"),
            &no,
            None,
            &[("x-request-id", "why-was-this-refused")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let events = haven.audit("request=why-was-this-refused").await;
    assert_eq!(events.len(), 1, "{events:?}");
    let decision = decision_of(&events[0]);
    for expected in [
        "\"deny\"",
        "ETH",
        "clearance",
        "\"N\"",
        "user/*.cruds",
        "TREAT",
    ] {
        assert!(decision.contains(expected), "{expected} in {decision}");
    }
}

async fn relabeling_labels_data_stored_before_the_rules_and_records_each_change(haven: Haven) {
    // Data stored without the labeling layer, as before the rules existed.
    let mut tx = haven.store.begin().await.unwrap();
    tx.create("Patient", "p1", patient()).await.unwrap();
    tx.create("Encounter", "e1", encounter("Patient/p1"))
        .await
        .unwrap();
    tx.create(
        "Condition",
        "c1",
        condition("Patient/p1", OPIOID_ABUSE, Some("Encounter/e1")),
    )
    .await
    .unwrap();
    tx.create(
        "Condition",
        "c2",
        condition("Patient/p1", PREDIABETES, None),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let no = haven.token(UNCLEARED).await;
    assert_eq!(
        haven.get("/fhir/Condition/c1", &no).await.status,
        StatusCode::OK
    );

    let report = haven_api::policy::relabel(&haven.state).await.unwrap();
    assert_eq!(
        report.relabeled, 2,
        "{report:?}: the Condition and its Encounter"
    );
    assert_eq!(
        haven.get("/fhir/Condition/c1", &no).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        haven.get("/fhir/Encounter/e1", &no).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        haven.get("/fhir/Condition/c2", &no).await.status,
        StatusCode::OK
    );
    let admin = haven.token(ADMIN).await;
    let c1 = haven.get("/fhir/Condition/c1", &admin).await.body;
    assert_eq!(labels(&c1), eth_r());
    assert_eq!(c1["meta"]["versionId"], "2");
    // Each change has its Provenance and its AuditEvent, by the command.
    let (provenance, _) = haven
        .search("/fhir/Provenance?target=Condition/c1/_history/2", &admin)
        .await;
    assert_eq!(provenance.len(), 1);
    let events = haven.audit("entity=Condition/c1/_history/2").await;
    assert!(events
        .iter()
        .any(|e| e.to_string().contains(haven_api::policy::RELABEL_ACTOR)));
    // The version stored before the labels is as sensitive as the current one.
    assert_eq!(
        haven.get("/fhir/Condition/c1/_history/1", &no).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        haven.get("/fhir/Condition/c1/_history", &no).await.status,
        StatusCode::FORBIDDEN
    );
    let (history, _) = haven.search("/fhir/Condition/_history", &no).await;
    assert_eq!(history, vec!["Condition/c2".to_owned()]);
    // Running it again changes nothing.
    let again = haven_api::policy::relabel(&haven.state).await.unwrap();
    assert_eq!(again.relabeled, 0);
}

async fn a_patient_sees_their_own_sensitive_record_unless_their_clearance_says_otherwise(
    haven: Haven,
) {
    let [p, c, ..] = sensitive_chart(&haven).await;
    haven
        .smart
        .add_users(&[("pat", Role::Patient, Some(p.as_str()))])
        .await;
    // Their own Consent denying research does not hide their record from them.
    let writer = haven.token(CLEARED).await;
    haven.consent(&p, json!({"type": "deny"})).await;
    let own = haven.smart.token("pat", "patient/*.rs").await;
    let reply = haven.get(&format!("/fhir/{c}"), &own).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // The clinician is now denied by that Consent.
    assert_eq!(
        haven.get(&format!("/fhir/{c}"), &writer).await.status,
        StatusCode::FORBIDDEN
    );
    // A site may give patients less than their whole record.
    haven
        .smart
        .server
        .set_user_policy(
            "pat",
            UserPolicy {
                clearance: Some(Clearance::parse("N").unwrap()),
                ..UserPolicy::default()
            },
        )
        .await
        .unwrap();
    let limited = haven.smart.token("pat", "patient/*.rs").await;
    assert_eq!(
        haven.get(&format!("/fhir/{c}"), &limited).await.status,
        StatusCode::FORBIDDEN
    );
}

async fn a_marketing_purpose_sees_no_sensitive_data_whatever_the_clearance(haven: Haven) {
    let [_, c, _, _, _, plain] = sensitive_chart(&haven).await;
    let marketing = haven.token_for(CLEARED, "HMARKT").await;
    assert_eq!(
        haven.get(&format!("/fhir/{c}"), &marketing).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        haven
            .get(&format!("/fhir/{plain}"), &marketing)
            .await
            .status,
        StatusCode::OK
    );
    let treatment = haven.token_for(CLEARED, "TREAT").await;
    assert_eq!(
        haven.get(&format!("/fhir/{c}"), &treatment).await.status,
        StatusCode::OK
    );
}

async fn a_site_may_answer_refused_reads_as_not_found(haven: Haven) {
    let [_, c, ..] = sensitive_chart(&haven).await;
    let no = haven.token(UNCLEARED).await;
    let reply = haven.get(&format!("/fhir/{c}"), &no).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
    let yes = haven.token(CLEARED).await;
    assert_eq!(
        haven.get(&format!("/fhir/{c}"), &yes).await.status,
        StatusCode::OK
    );
}

async fn consent_provisions_on_type_code_instance_related_data_and_organization_apply_to_reads_and_searches_alike(
    haven: Haven,
) {
    let writer = haven.token(CLEARED).await;
    let p = haven.create(&writer, &patient()).await;
    let pid = p.split('/').nth(1).unwrap().to_owned();
    let e = haven.create(&writer, &encounter(&p)).await;
    let heart = haven.create(&writer, &observation(&p, None)).await;
    let mut weight = observation(&p, None);
    weight["code"] = json!({"coding": [{"system": "http://loinc.org", "code": "29463-7"}]});
    let weight = haven.create(&writer, &weight).await;
    let in_encounter = {
        let mut o = observation(&p, Some(&e));
        o["code"] = json!({"coding": [{"system": "http://loinc.org", "code": "8302-2"}]});
        haven.create(&writer, &o).await
    };
    let named = haven
        .create(&writer, &condition(&p, PREDIABETES, None))
        .await;
    let other = haven
        .create(&writer, &condition(&p, "271737000", None))
        .await;
    haven.consent(&p, json!({"type": "permit", "provision": [
                    {"type": "deny",
                     "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}],
                     "code": [{"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}]},
                    {"type": "deny", "data": [{"meaning": "instance", "reference": {"reference": named}}]},
                    {"type": "deny", "data": [{"meaning": "related", "reference": {"reference": e}}]}
                ]})).await;
    let no = haven.token(UNCLEARED).await;
    let hidden = [&heart, &named, &e, &in_encounter];
    let shown = [&weight, &other, &p];
    for r in hidden {
        let reply = haven.get(&format!("/fhir/{r}"), &no).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{r}");
    }
    for r in shown {
        assert_eq!(
            haven.get(&format!("/fhir/{r}"), &no).await.status,
            StatusCode::OK,
            "{r}"
        );
    }
    // Searches agree with the reads (a disagreement would be a 500).
    let (observations, _) = haven
        .search(&format!("/fhir/Observation?patient={pid}"), &no)
        .await;
    assert_eq!(observations, vec![weight.clone()]);
    let (conditions, _) = haven
        .search(&format!("/fhir/Condition?patient={pid}"), &no)
        .await;
    assert_eq!(conditions, vec![other.clone()]);
    let (encounters, _) = haven
        .search(&format!("/fhir/Encounter?patient={pid}"), &no)
        .await;
    assert!(encounters.is_empty());
    let (everything, _) = haven
        .search(&format!("/fhir/Patient/{pid}/$everything"), &no)
        .await;
    for r in hidden {
        assert!(!everything.contains(r), "{r}");
    }
    for r in shown {
        assert!(everything.contains(r), "{r}");
    }

    // A Consent naming an organization hides the data from its members.
    haven
        .smart
        .server
        .set_user_policy(
            UNCLEARED,
            UserPolicy {
                organization: Some("Organization/clinic".into()),
                ..UserPolicy::default()
            },
        )
        .await
        .unwrap();
    haven
        .consent(&p, denying_actor("CST", "Organization/clinic"))
        .await;
    let member = haven.token(UNCLEARED).await;
    assert_eq!(
        haven.get(&format!("/fhir/{weight}"), &member).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        haven.get(&format!("/fhir/{weight}"), &writer).await.status,
        StatusCode::OK
    );
}

async fn on_an_opt_in_site_only_patients_whose_consent_permits_are_shared(haven: Haven) {
    let writer = haven.token(CLEARED).await;
    let silent = haven.create(&writer, &patient()).await;
    let willing = haven.create(&writer, &patient()).await;
    let silent_obs = haven.create(&writer, &observation(&silent, None)).await;
    let willing_obs = haven.create(&writer, &observation(&willing, None)).await;
    let no = haven.token(UNCLEARED).await;
    // Nobody has consented yet: no patient data is shared.
    let (found, bundle) = haven.search("/fhir/Observation", &no).await;
    assert!(found.is_empty(), "{found:?}");
    assert!(suppressed(&bundle));
    haven.consent(&willing, json!({"type": "permit"})).await;
    let (found, _) = haven.search("/fhir/Observation", &no).await;
    assert_eq!(found, vec![willing_obs.clone()]);
    assert_eq!(
        haven.get(&format!("/fhir/{silent_obs}"), &no).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        haven.get(&format!("/fhir/{willing_obs}"), &no).await.status,
        StatusCode::OK
    );
    let (patients, _) = haven.search("/fhir/Patient", &no).await;
    assert_eq!(patients, vec![willing.clone()]);
    // Data about no patient is not patient data.
    let org = haven
        .create(
            &writer,
            &json!({"resourceType": "Organization", "name": "Clinic"}),
        )
        .await;
    assert_eq!(
        haven.get(&format!("/fhir/{org}"), &no).await.status,
        StatusCode::OK
    );
}

async fn a_transaction_labels_an_entry_that_refers_to_a_sensitive_one_written_after_it(
    haven: Haven,
) {
    let writer = haven.token(CLEARED).await;
    let p = haven.create(&writer, &patient()).await;
    // The MedicationRequest comes first and names the Condition by its urn.
    let condition_urn = "urn:uuid:6f0e4d0c-0d7e-4a8c-9d3b-0b6a3f1e2c11";
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0c1b7a52-2f61-4b8e-8d0e-5a4a9f9e7d21",
         "resource": medication_request(&p, condition_urn),
         "request": {"method": "POST", "url": "MedicationRequest"}},
        {"fullUrl": condition_urn,
         "resource": condition(&p, OPIOID_ABUSE, None),
         "request": {"method": "POST", "url": "Condition"}}
    ]});
    let reply = haven
        .send(Method::POST, "/fhir", &writer, Some(&bundle))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let location = reply.body["entry"][0]["response"]["location"]
        .as_str()
        .unwrap();
    let medication = location
        .split("/fhir/")
        .nth(1)
        .unwrap()
        .split("/_history")
        .next()
        .unwrap();
    let stored = haven
        .get(&format!("/fhir/{medication}"), &writer)
        .await
        .body;
    assert_eq!(labels(&stored), eth_r(), "{stored}");
    let no = haven.token(UNCLEARED).await;
    assert_eq!(
        haven.get(&format!("/fhir/{medication}"), &no).await.status,
        StatusCode::FORBIDDEN
    );
}
