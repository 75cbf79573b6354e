//! Loading the sensitive Synthea patients (`synthea-sensitive/`: substance use,
//! alcohol, overdose and depression) with `haven load` labels their sensitive
//! records as the value sets in `profiles/sensitivity/` say, and every label
//! names the rule and code (or the labeled resource) it came from.
//!
//! What must be labeled is worked out here from the stored resources and the
//! value set files, not asked of the server: a Condition with a listed code,
//! the Encounter it was diagnosed in, a medication with a listed code or given
//! for a labeled Condition, and so on. Runs when `HAVEN_SHARED` is set.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use haven_auth::client::{BackendServicesClient, ClientKey};
use haven_e2e::{run_haven, shared_dir, spawn_haven, workspace_root, HavenOptions, LABELED_TYPES};
use serde_json::Value;

const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
const LABEL_BASIS: &str = "urn:haven:label-basis";

/// Every other type the bundles hold.
const OTHER_TYPES: &[&str] = &[
    "Patient",
    "Organization",
    "Practitioner",
    "Immunization",
    "ImagingStudy",
    "Device",
    "AllergyIntolerance",
    "Provenance",
];

/// (system, code) -> (rule file name, category), read from the value sets.
fn value_sets() -> Result<BTreeMap<(String, String), (String, String)>> {
    let mut out = BTreeMap::new();
    let dir = workspace_root().join("profiles/sensitivity");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        let set: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let name = set["name"].as_str().context("a value set without a name")?;
        let category = set["category"].as_str().context("no category")?;
        for code in set["codes"].as_array().context("no codes")? {
            out.insert(
                (
                    code["system"].as_str().unwrap_or_default().to_owned(),
                    code["code"].as_str().unwrap_or_default().to_owned(),
                ),
                (name.to_owned(), category.to_owned()),
            );
        }
    }
    Ok(out)
}

fn codings(value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            if let (Some(Value::String(s)), Some(Value::String(c))) =
                (map.get("system"), map.get("code"))
            {
                out.push((s.clone(), c.clone()));
            }
            for (key, v) in map {
                if key != "meta" {
                    codings(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| codings(v, out)),
        _ => {}
    }
}

fn references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("reference") {
                out.push(r.clone());
            }
            map.values().for_each(|v| references(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| references(v, out)),
        _ => {}
    }
}

/// The categories and confidentiality a stored resource carries, and the
/// bases of its category labels.
fn labels_of(resource: &Value) -> (BTreeSet<String>, Option<String>, Vec<(String, String)>) {
    let mut categories = BTreeSet::new();
    let mut confidentiality = None;
    let mut bases = Vec::new();
    for coding in resource["meta"]["security"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let code = coding["code"].as_str().unwrap_or_default().to_owned();
        if coding["system"] == ACT_CODE {
            categories.insert(code.clone());
            for ext in coding["extension"].as_array().into_iter().flatten() {
                if ext["url"] == LABEL_BASIS {
                    bases.push((
                        code.clone(),
                        ext["valueString"].as_str().unwrap_or_default().to_owned(),
                    ));
                }
            }
        } else if coding["system"] == CONFIDENTIALITY {
            confidentiality = Some(code);
        }
    }
    (categories, confidentiality, bases)
}

struct Stored {
    by_reference: BTreeMap<String, Value>,
}

impl Stored {
    fn of_type<'a>(
        &'a self,
        resource_type: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Value)> {
        self.by_reference
            .iter()
            .filter(move |(_, r)| r["resourceType"] == resource_type)
    }

    fn categories(&self, reference: &str) -> BTreeSet<String> {
        self.by_reference
            .get(reference)
            .map(|r| labels_of(r).0)
            .unwrap_or_default()
    }
}

async fn fetch_all(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    resource_type: &str,
) -> Result<Vec<Value>> {
    let mut url = format!("{base}/{resource_type}?_count=1000");
    let mut out = Vec::new();
    for _ in 0..200 {
        let bundle: Value = http
            .get(&url)
            .bearer_auth(token)
            .header("Accept", "application/fhir+json")
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            if entry["search"]["mode"] == "match" {
                out.push(entry["resource"].clone());
            }
        }
        match bundle["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
        {
            Some(next) => url = next["url"].as_str().context("a next link")?.to_owned(),
            None => return Ok(out),
        }
    }
    anyhow::bail!("{resource_type}: too many pages")
}

#[tokio::test(flavor = "multi_thread")]
async fn loading_the_sensitive_synthea_patients_labels_what_the_rules_say_and_traces_each_label() {
    let Some(shared) = shared_dir() else {
        println!("not run: HAVEN_SHARED is not set");
        return;
    };
    let folder = shared.join("synthea-sensitive");
    let haven = spawn_haven(HavenOptions::default()).await.unwrap();
    let loader = haven.register_backend_client("system/*.cruds").unwrap();
    let output = haven
        .load_command(&folder, &loader)
        .unwrap()
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains(" 0 failed"),
        "haven load failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let reader = haven
        .register_backend_client_with("system/*.rs", &["--clearance", "V:*"])
        .unwrap();
    let key = ClientKey::from_pem(&std::fs::read_to_string(&reader.key_file).unwrap()).unwrap();
    let auth = BackendServicesClient::new(
        haven.base_url.parse().unwrap(),
        reader.client_id,
        key,
        "system/*.rs",
        haven.client(),
    );
    let token = auth.access_token().await.unwrap();
    let http = haven.client();
    let mut stored = Stored {
        by_reference: BTreeMap::new(),
    };
    for resource_type in LABELED_TYPES.iter().chain(OTHER_TYPES) {
        for resource in fetch_all(&http, &haven.base_url, &token, resource_type)
            .await
            .unwrap()
        {
            let reference = format!(
                "{resource_type}/{}",
                resource["id"].as_str().unwrap_or_default()
            );
            stored.by_reference.insert(reference, resource);
        }
    }
    let sets = value_sets().unwrap();
    let failures = check(&stored, &sets);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let mut labeled: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for resource in stored.by_reference.values() {
        for category in labels_of(resource).0 {
            *labeled
                .entry(
                    resource["resourceType"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
                .or_default()
                .entry(category)
                .or_default() += 1;
        }
    }
    println!("labeled, by type and category: {labeled:?}");
    for kind in [
        "Condition",
        "Encounter",
        "MedicationRequest",
        "CarePlan",
        "Claim",
    ] {
        assert!(labeled.contains_key(kind), "no {kind} labeled: {labeled:?}");
    }

    // The command that relabels after the rules change finds nothing to do.
    let data_dir = haven.data_dir.display().to_string();
    let output = run_haven(&["labels", "apply", "--data-dir", &data_dir]).unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["relabeled"], 0, "{report}");
    assert!(report["examined"].as_u64().unwrap() > 100, "{report}");
}

/// Every way the labels can be wrong, each as a line.
fn check(stored: &Stored, sets: &BTreeMap<(String, String), (String, String)>) -> Vec<String> {
    let mut failures = Vec::new();
    let own = |resource: &Value| -> BTreeMap<String, Vec<(String, String, String)>> {
        let mut found: BTreeMap<String, Vec<(String, String, String)>> = BTreeMap::new();
        let mut list = Vec::new();
        codings(resource, &mut list);
        for (system, code) in list {
            if let Some((rule, category)) = sets.get(&(system.clone(), code.clone())) {
                found
                    .entry(category.clone())
                    .or_default()
                    .push((rule.clone(), system, code));
            }
        }
        found
    };

    // 1. Conditions: labeled exactly when their code is in a value set.
    let mut categories_seen = BTreeSet::new();
    for (reference, condition) in stored.of_type("Condition") {
        let expected: BTreeSet<String> = own(condition).into_keys().collect();
        let (got, confidentiality, _) = labels_of(condition);
        if got != expected {
            failures.push(format!(
                "{reference}: labels {got:?}, expected {expected:?}"
            ));
        }
        if !expected.is_empty() && confidentiality.as_deref() != Some("R") {
            failures.push(format!(
                "{reference}: confidentiality {confidentiality:?}, expected R"
            ));
        }
        categories_seen.extend(got);
    }
    for (category, what) in [
        ("ETH", "substance use, alcohol and overdose"),
        ("PSY", "depression"),
    ] {
        if !categories_seen.contains(category) {
            failures.push(format!("no Condition labeled {category} ({what})"));
        }
    }
    for (code, what) in [
        ("5602001", "opioid abuse"),
        ("7200002", "alcoholism"),
        ("55680006", "drug overdose"),
        ("370143000", "major depression"),
    ] {
        let labeled = stored
            .of_type("Condition")
            .any(|(_, c)| c["code"]["coding"][0]["code"] == code && !labels_of(c).0.is_empty());
        if !labeled {
            failures.push(format!("the {what} Condition ({code}) is not labeled"));
        }
    }

    // 2. The Encounters tied to them: each Encounter a labeled Condition or
    // Procedure was recorded in carries its categories.
    for kind in ["Condition", "Procedure"] {
        for (reference, resource) in stored.of_type(kind) {
            let categories = labels_of(resource).0;
            if let Some(encounter) = resource["encounter"]["reference"].as_str() {
                let on_encounter = stored.categories(encounter);
                if !categories.is_subset(&on_encounter) {
                    failures.push(format!(
                        "{encounter}: labels {on_encounter:?} lack {categories:?} of {reference}"
                    ));
                }
            }
        }
    }
    // 3. Medications: a listed medication code, or a reason that is labeled.
    for (reference, request) in stored.of_type("MedicationRequest") {
        let mut expected: BTreeSet<String> = own(request).into_keys().collect();
        let mut reasons = Vec::new();
        references(&request["reasonReference"], &mut reasons);
        for reason in reasons {
            expected.extend(stored.categories(&reason));
        }
        let got = labels_of(request).0;
        if got != expected {
            failures.push(format!(
                "{reference}: labels {got:?}, expected {expected:?}"
            ));
        }
    }
    let labeled_medications = stored
        .of_type("MedicationRequest")
        .filter(|(_, r)| !labels_of(r).0.is_empty())
        .count();
    if labeled_medications == 0 {
        failures.push("no MedicationRequest labeled (sertraline, fluoxetine)".into());
    }

    // 4. The server's Provenance carries the labels of the version it is
    // about: those of the current version when it is about that one, never
    // more (labels only rise).
    for (reference, provenance) in stored.of_type("Provenance") {
        let categories = labels_of(provenance).0;
        let Some(target) = provenance["target"][0]["reference"].as_str() else {
            continue;
        };
        let (unversioned, version) = target.split_once("/_history/").unwrap_or((target, ""));
        let Some(current) = stored.by_reference.get(unversioned) else {
            continue;
        };
        let now = labels_of(current).0;
        let is_current = current["meta"]["versionId"] == version;
        if !categories.is_subset(&now) || (is_current && categories != now) {
            failures.push(format!(
                "{reference}: labels {categories:?}, its target {target} has {now:?}"
            ));
        }
    }

    // 5. Every label is traced to a rule and a code the resource holds, or to
    // a labeled resource it refers to or that refers to it.
    for (reference, resource) in &stored.by_reference {
        if resource["resourceType"] == "Provenance" {
            continue;
        }
        let (categories, _, bases) = labels_of(resource);
        let codes = own(resource);
        let mut refers = Vec::new();
        references(resource, &mut refers);
        for category in &categories {
            let mine: Vec<&String> = bases
                .iter()
                .filter(|(c, _)| c == category)
                .map(|(_, b)| b)
                .collect();
            if mine.is_empty() {
                failures.push(format!("{reference}: {category} has no basis"));
            }
            for basis in mine {
                let traced = if let Some(rest) = basis.strip_prefix("rule ") {
                    codes.get(category).is_some_and(|found| {
                        found.iter().any(|(rule, system, code)| {
                            rest.starts_with(&format!("{rule}: {system}|{code} in "))
                        })
                    })
                } else if let Some(from) = basis.strip_prefix("inherited from ") {
                    let linked = refers.iter().any(|r| r == from)
                        || stored.by_reference.get(from).is_some_and(|other| {
                            other["encounter"]["reference"] == reference.as_str()
                        });
                    linked && stored.categories(from).contains(category)
                } else {
                    false
                };
                if !traced {
                    failures.push(format!(
                        "{reference}: {category} basis {basis:?} is not traced"
                    ));
                }
            }
        }
        // 6. Types outside the labeled ones carry no label.
        let resource_type = resource["resourceType"].as_str().unwrap_or_default();
        if !LABELED_TYPES.contains(&resource_type) && !categories.is_empty() {
            failures.push(format!(
                "{reference}: a {resource_type} labeled {categories:?}"
            ));
        }
    }
    failures
}
