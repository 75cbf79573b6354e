//! The Synthea corpus, and copies of it under new ids.
//!
//! A copy of a transaction Bundle gives every entry a new UUID (its `fullUrl`
//! and its `id`) and points every `urn:uuid:` reference at the new UUID of its
//! target; copies after the first also suffix every identifier value with the
//! copy's number, so that no two copies share a patient's MRN or SSN. The same
//! source bundle copied twice with different copy numbers gives two sets of
//! distinct patients with the same clinical content.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

/// One `*.json` file of the corpus.
#[derive(Debug)]
pub struct SourceBundle {
    pub name: String,
    pub bundle: Value,
    /// Entries in the bundle: resources written per copy.
    pub entries: usize,
}

/// Every `*.json` transaction Bundle in `dir`: Synthea's shared
/// `hospitalInformation*` and `practitionerInformation*` files first (as `haven
/// load` orders them), then the patients, each group by name.
pub fn read(dir: &Path) -> Result<Vec<SourceBundle>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            names.push(path);
        }
    }
    names.sort_by_key(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        (!loads_first(&name), name)
    });
    let mut bundles = Vec::with_capacity(names.len());
    for path in names {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let bundle: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        if bundle["resourceType"] != "Bundle" || bundle["type"] != "transaction" {
            bail!("{} is not a transaction Bundle", path.display());
        }
        let entries = bundle["entry"].as_array().map_or(0, Vec::len);
        bundles.push(SourceBundle {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bundle,
            entries,
        });
    }
    Ok(bundles)
}

fn loads_first(name: &str) -> bool {
    name.starts_with("hospitalInformation") || name.starts_with("practitionerInformation")
}

/// A new UUID for `old` in copy `copy` of bundle number `bundle_no`: the old
/// one XORed with a value drawn from the two numbers, as a version 4 UUID.
/// Distinct per copy and per bundle, so that the Organization a patient bundle
/// repeats from the shared files gets an id of its own, as the server's POST
/// would give it. Deterministic: the same inputs give the same ids.
fn new_uuid(old: &str, copy: u32, bundle_no: u32) -> Result<String> {
    let old = uuid::Uuid::parse_str(old).with_context(|| format!("{old:?} is not a UUID"))?;
    let seed = (u64::from(copy) << 32) | u64::from(bundle_no);
    let high = splitmix64(seed);
    let low = splitmix64(seed ^ 0x5851_f42d_4c95_7f2d);
    let mix = (u128::from(high) << 64) | u128::from(low);
    let bytes = (old.as_u128() ^ mix).to_be_bytes();
    Ok(uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string())
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Copy `copy` (0, 1, ...) of a transaction Bundle, as described in the module
/// documentation. Copy 0 keeps the identifier values as they are.
pub fn copy(bundle: &Value, copy: u32, bundle_no: u32) -> Result<Value> {
    let entries = bundle["entry"]
        .as_array()
        .ok_or_else(|| anyhow!("the bundle has no entries"))?;
    let mut ids: HashMap<String, String> = HashMap::with_capacity(entries.len());
    for entry in entries {
        let full_url = entry["fullUrl"]
            .as_str()
            .ok_or_else(|| anyhow!("an entry has no fullUrl"))?;
        let old = full_url
            .strip_prefix("urn:uuid:")
            .ok_or_else(|| anyhow!("fullUrl {full_url} is not a urn:uuid"))?;
        ids.insert(old.to_owned(), new_uuid(old, copy, bundle_no)?);
    }
    let suffix = (copy > 0).then(|| format!("-{copy}"));
    let mut out = bundle.clone();
    for entry in out["entry"].as_array_mut().into_iter().flatten() {
        let old = entry["fullUrl"]
            .as_str()
            .and_then(|u| u.strip_prefix("urn:uuid:"))
            .unwrap_or_default()
            .to_owned();
        let new = ids[&old].clone();
        entry["fullUrl"] = Value::String(format!("urn:uuid:{new}"));
        let resource = entry
            .get_mut("resource")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| anyhow!("entry {old} has no resource"))?;
        resource.insert("id".into(), Value::String(new));
        rewrite(resource, &ids, suffix.as_deref())?;
    }
    Ok(out)
}

/// Points `urn:uuid:` references at their new UUIDs and suffixes identifier
/// values, everywhere in one JSON object.
fn rewrite(
    object: &mut Map<String, Value>,
    ids: &HashMap<String, String>,
    suffix: Option<&str>,
) -> Result<()> {
    for (key, value) in object.iter_mut() {
        match (key.as_str(), value) {
            ("reference", Value::String(reference)) => {
                if let Some(old) = reference.strip_prefix("urn:uuid:") {
                    let new = ids
                        .get(old)
                        .ok_or_else(|| anyhow!("{reference} names no entry of its bundle"))?;
                    *reference = format!("urn:uuid:{new}");
                }
            }
            ("identifier", identifiers) => {
                if let Some(suffix) = suffix {
                    suffix_identifiers(identifiers, suffix);
                }
                walk(identifiers, ids, suffix)?;
            }
            (_, other) => walk(other, ids, suffix)?,
        }
    }
    Ok(())
}

fn walk(value: &mut Value, ids: &HashMap<String, String>, suffix: Option<&str>) -> Result<()> {
    match value {
        Value::Object(object) => rewrite(object, ids, suffix),
        Value::Array(items) => items.iter_mut().try_for_each(|i| walk(i, ids, suffix)),
        _ => Ok(()),
    }
}

/// `identifier` is an array of Identifiers in resources and one Identifier in
/// a Reference.
fn suffix_identifiers(identifiers: &mut Value, suffix: &str) {
    let one = |identifier: &mut Value| {
        if let Some(Value::String(value)) = identifier.get_mut("value") {
            value.push_str(suffix);
        }
    };
    match identifiers {
        Value::Array(items) => items.iter_mut().for_each(one),
        Value::Object(_) => one(identifiers),
        _ => {}
    }
}

/// A copied bundle as the store writes it, for loading straight through the
/// store: each resource with its id, and every `urn:uuid:` reference resolved
/// to `Type/id` as the server's transaction would resolve it.
pub fn resolved(copied: &Value) -> Result<Vec<(String, String, Value)>> {
    let entries = copied["entry"]
        .as_array()
        .ok_or_else(|| anyhow!("the bundle has no entries"))?;
    let mut targets: HashMap<String, String> = HashMap::with_capacity(entries.len());
    for entry in entries {
        let (ty, id) = type_and_id(&entry["resource"])?;
        if let Some(full_url) = entry["fullUrl"].as_str() {
            targets.insert(full_url.to_owned(), format!("{ty}/{id}"));
        }
    }
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let mut resource = entry["resource"].clone();
        resolve(&mut resource, &targets)?;
        let (ty, id) = type_and_id(&resource)?;
        out.push((ty.to_owned(), id.to_owned(), resource));
    }
    Ok(out)
}

fn type_and_id(resource: &Value) -> Result<(&str, &str)> {
    let ty = resource["resourceType"]
        .as_str()
        .ok_or_else(|| anyhow!("an entry's resource has no resourceType"))?;
    let id = resource["id"]
        .as_str()
        .ok_or_else(|| anyhow!("a {ty} has no id"))?;
    Ok((ty, id))
}

fn resolve(value: &mut Value, targets: &HashMap<String, String>) -> Result<()> {
    match value {
        Value::Object(object) => {
            for (key, value) in object.iter_mut() {
                match (key.as_str(), value) {
                    ("reference", Value::String(reference)) if reference.starts_with("urn:") => {
                        *reference = targets
                            .get(reference.as_str())
                            .ok_or_else(|| anyhow!("{reference} names no entry of its bundle"))?
                            .clone();
                    }
                    (_, other) => resolve(other, targets)?,
                }
            }
            Ok(())
        }
        Value::Array(items) => items.iter_mut().try_for_each(|i| resolve(i, targets)),
        _ => Ok(()),
    }
}

/// What the queries need to know of one patient bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct PatientFacts {
    /// Index of the Patient's entry in the bundle.
    pub entry: usize,
    /// The Patient's id in the (copied) bundle.
    pub bundle_id: String,
    pub family: String,
    /// The distinct LOINC codes of the patient's Observations.
    pub codes: Vec<String>,
    /// The distinct years of the patient's Observations' `effectiveDateTime`.
    pub years: Vec<i32>,
    pub observations: u32,
    pub conditions: u32,
}

/// The one Patient of a bundle and what its Observations and Conditions are;
/// `None` for a bundle without a Patient (the shared files).
pub fn patient_facts(bundle: &Value) -> Result<Option<PatientFacts>> {
    let entries = bundle["entry"]
        .as_array()
        .ok_or_else(|| anyhow!("the bundle has no entries"))?;
    let mut patients = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e["resource"]["resourceType"] == "Patient");
    let Some((index, patient)) = patients.next() else {
        return Ok(None);
    };
    if patients.next().is_some() {
        bail!("a bundle holds more than one Patient");
    }
    let full_url = patient["fullUrl"].as_str().unwrap_or_default();
    let local = format!(
        "Patient/{}",
        patient["resource"]["id"].as_str().unwrap_or_default()
    );
    let about_patient = |resource: &Value| {
        let subject = resource["subject"]["reference"].as_str();
        subject == Some(full_url) || subject == Some(local.as_str())
    };
    let mut codes = BTreeSet::new();
    let mut years = BTreeSet::new();
    let mut observations = 0;
    let mut conditions = 0;
    for entry in entries {
        let resource = &entry["resource"];
        match resource["resourceType"].as_str() {
            Some("Observation") if about_patient(resource) => {
                observations += 1;
                for coding in resource["code"]["coding"].as_array().into_iter().flatten() {
                    if coding["system"] == "http://loinc.org" {
                        if let Some(code) = coding["code"].as_str() {
                            codes.insert(code.to_owned());
                        }
                    }
                }
                if let Some(year) = resource["effectiveDateTime"]
                    .as_str()
                    .and_then(|d| d.get(..4))
                    .and_then(|y| y.parse().ok())
                {
                    years.insert(year);
                }
            }
            Some("Condition") if about_patient(resource) => conditions += 1,
            _ => {}
        }
    }
    let family = patient["resource"]["name"][0]["family"]
        .as_str()
        .ok_or_else(|| anyhow!("the Patient of a bundle has no family name"))?
        .to_owned();
    Ok(Some(PatientFacts {
        entry: index,
        bundle_id: patient["resource"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        family,
        codes: codes.into_iter().collect(),
        years: years.into_iter().collect(),
        observations,
        conditions,
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const PATIENT: &str = "urn:uuid:27de96c6-6910-4f0f-8f10-00ce6090f447";
    const OBSERVATION: &str = "urn:uuid:23834663-ed53-3da9-b330-d6e1ecb8428e";

    fn bundle() -> Value {
        json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": PATIENT,
                    "resource": {
                        "resourceType": "Patient",
                        "id": &PATIENT[9..],
                        "identifier": [{"system": "urn:mrn", "value": "m1"}],
                        "name": [{"family": "Kutch", "given": ["Zachary"]}],
                    },
                    "request": {"method": "POST", "url": "Patient"}
                },
                {
                    "fullUrl": OBSERVATION,
                    "resource": {
                        "resourceType": "Observation",
                        "id": &OBSERVATION[9..],
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
                        "subject": {"reference": PATIENT},
                        "performer": [{"reference": "#contained"}],
                        "effectiveDateTime": "2016-03-01T10:00:00+00:00",
                    },
                    "request": {"method": "POST", "url": "Observation"}
                }
            ]
        })
    }

    #[test]
    fn copies_have_new_ids_consistent_references_and_their_own_identifiers() {
        let source = bundle();
        let first = copy(&source, 0, 7).unwrap();
        let second = copy(&source, 1, 7).unwrap();
        let again = copy(&source, 1, 7).unwrap();
        assert_eq!(second, again, "copies are deterministic");
        let patient_id = |b: &Value| b["entry"][0]["resource"]["id"].as_str().unwrap().to_owned();
        assert_ne!(patient_id(&first), &PATIENT[9..]);
        assert_ne!(patient_id(&first), patient_id(&second));
        for (copied, identifier) in [(&first, "m1"), (&second, "m1-1")] {
            let id = patient_id(copied);
            assert!(haven_model::id::is_valid_id(&id));
            assert_eq!(copied["entry"][0]["fullUrl"], format!("urn:uuid:{id}"));
            assert_eq!(
                copied["entry"][1]["resource"]["subject"]["reference"],
                format!("urn:uuid:{id}")
            );
            assert_eq!(
                copied["entry"][0]["resource"]["identifier"][0]["value"],
                identifier
            );
            assert_eq!(
                copied["entry"][1]["resource"]["performer"][0]["reference"],
                "#contained"
            );
        }
        // Another bundle's copy of the same entry gets another id.
        assert_ne!(
            patient_id(&copy(&source, 1, 8).unwrap()),
            patient_id(&second)
        );
    }

    #[test]
    fn an_unknown_urn_uuid_reference_is_refused() {
        let mut source = bundle();
        source["entry"][1]["resource"]["subject"]["reference"] =
            json!("urn:uuid:00000000-0000-4000-8000-000000000000");
        assert!(copy(&source, 1, 0).is_err());
    }

    #[test]
    fn resolved_writes_name_their_targets_by_type_and_id() {
        let copied = copy(&bundle(), 2, 0).unwrap();
        let writes = resolved(&copied).unwrap();
        assert_eq!(writes.len(), 2);
        let (ty, id, _) = &writes[0];
        assert_eq!(ty, "Patient");
        let (ty, _, observation) = &writes[1];
        assert_eq!(ty, "Observation");
        assert_eq!(observation["subject"]["reference"], format!("Patient/{id}"));
    }

    #[test]
    fn facts_are_the_patients_codes_years_and_family() {
        let copied = copy(&bundle(), 3, 0).unwrap();
        let facts = patient_facts(&copied).unwrap().unwrap();
        assert_eq!(facts.entry, 0);
        assert_eq!(facts.family, "Kutch");
        assert_eq!(facts.codes, ["8302-2"]);
        assert_eq!(facts.years, [2016]);
        assert_eq!((facts.observations, facts.conditions), (1, 0));
        assert_eq!(
            facts.bundle_id,
            copied["entry"][0]["resource"]["id"].as_str().unwrap()
        );
    }
}
