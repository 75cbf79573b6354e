//! The sample is valid FHIR, deterministic, and carries the sensitive data and
//! Consents that make labels and consent visible.

use std::collections::BTreeSet;

use haven_model::validate::validate_resource;
use haven_policy::consent::ConsentRule;
use haven_policy::label::Labeler;
use haven_sample::{generate, Options, DENIED_PRACTITIONER};
use serde_json::Value;

fn resources(sample: &haven_sample::Sample) -> impl Iterator<Item = &Value> {
    sample
        .files
        .iter()
        .flat_map(|f| f.bundle["entry"].as_array().unwrap())
        .map(|e| &e["resource"])
}

#[test]
fn the_same_seed_gives_byte_identical_files_and_another_seed_does_not() {
    let bytes = |seed| -> Vec<(String, Vec<u8>)> {
        generate(Options { patients: 12, seed })
            .files
            .iter()
            .map(|f| (f.name.clone(), f.to_bytes()))
            .collect()
    };
    assert_eq!(bytes(7), bytes(7));
    assert_ne!(bytes(7), bytes(8));
}

#[test]
fn a_patient_is_the_same_whatever_the_number_asked_for() {
    let small = generate(Options {
        patients: 3,
        seed: 5,
    });
    let large = generate(Options {
        patients: 30,
        seed: 5,
    });
    for (a, b) in small.files.iter().zip(&large.files) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.to_bytes(), b.to_bytes());
    }
    assert_eq!(large.files.len(), 31, "the clinic and one file per patient");
}

#[test]
fn every_resource_passes_the_structural_validator_and_every_id_is_unique() {
    let sample = generate(Options {
        patients: 40,
        seed: 3,
    });
    let mut ids = BTreeSet::new();
    let mut types = BTreeSet::new();
    for resource in resources(&sample) {
        let issues = validate_resource(resource);
        assert!(issues.is_empty(), "{issues:?} in {resource:#}");
        let id = resource["id"].as_str().unwrap();
        assert!(ids.insert(id.to_owned()), "{id} twice");
        types.insert(resource["resourceType"].as_str().unwrap().to_owned());
    }
    for expected in [
        "Organization",
        "Practitioner",
        "Patient",
        "Encounter",
        "Observation",
        "Condition",
        "MedicationRequest",
        "AllergyIntolerance",
        "Immunization",
        "Consent",
    ] {
        assert!(types.contains(expected), "no {expected} in {types:?}");
    }
    for file in &sample.files {
        assert_eq!(file.bundle["type"], "transaction");
        for entry in file.bundle["entry"].as_array().unwrap() {
            let url = format!(
                "{}/{}",
                entry["resource"]["resourceType"].as_str().unwrap(),
                entry["resource"]["id"].as_str().unwrap()
            );
            assert_eq!(entry["request"]["method"], "PUT");
            assert_eq!(entry["request"]["url"], url);
        }
    }
}

#[test]
fn observations_carry_loinc_codes_and_ucum_units() {
    let sample = generate(Options {
        patients: 5,
        seed: 1,
    });
    let observations: Vec<&Value> = resources(&sample)
        .filter(|r| r["resourceType"] == "Observation")
        .collect();
    assert!(observations.len() > 50, "{}", observations.len());
    for observation in observations {
        assert_eq!(
            observation["code"]["coding"][0]["system"],
            "http://loinc.org"
        );
        let quantities: Vec<&Value> = match observation["component"].as_array() {
            Some(components) => components.iter().map(|c| &c["valueQuantity"]).collect(),
            None => vec![&observation["valueQuantity"]],
        };
        for quantity in quantities {
            assert_eq!(
                quantity["system"], "http://unitsofmeasure.org",
                "{observation}"
            );
            assert!(quantity["value"].is_number(), "{observation}");
        }
    }
}

#[test]
fn the_first_patients_have_conditions_the_labeler_marks_sensitive() {
    let sample = generate(Options {
        patients: 20,
        seed: 11,
    });
    let labeler = Labeler::built_in();
    let categories_of = |patient: &str| -> BTreeSet<String> {
        resources(&sample)
            .filter(|r| r["subject"]["reference"] == patient)
            .flat_map(|r| labeler.own_labels(r).categories.into_keys())
            .collect()
    };
    let expected: [&[&str]; 4] = [&["PSY"], &["ETH"], &["SEX"], &["ETH"]];
    for (patient, categories) in sample.patients.iter().zip(expected) {
        let got = categories_of(&patient.person.reference);
        let want: BTreeSet<String> = categories.iter().map(|c| c.to_string()).collect();
        assert_eq!(got, want, "{}", patient.person.name);
        assert_eq!(patient.sensitive, categories);
    }
    // Most patients have nothing sensitive.
    let plain = sample.patients[4..]
        .iter()
        .filter(|p| categories_of(&p.person.reference).is_empty())
        .count();
    assert!(plain >= 14, "{plain} of 16 without sensitive data");
}

#[test]
fn the_consents_parse_as_privacy_consents_that_refuse_research_and_one_practitioner() {
    let sample = generate(Options {
        patients: 4,
        seed: 2,
    });
    let consents: Vec<&Value> = resources(&sample)
        .filter(|r| r["resourceType"] == "Consent")
        .collect();
    assert_eq!(consents.len(), 2);
    for (consent, patient) in consents.iter().zip(&sample.patients) {
        let rule = ConsentRule::parse(consent)
            .expect("a valid Consent")
            .expect("an enforced privacy Consent");
        assert_eq!(
            format!("Patient/{}", rule.patient),
            patient.person.reference
        );
    }
    assert_eq!(
        consents[0]["provision"]["provision"][0]["purpose"][0]["code"],
        "HRESCH"
    );
    assert_eq!(
        consents[1]["provision"]["provision"][0]["actor"][0]["reference"]["reference"],
        sample.practitioners[DENIED_PRACTITIONER].reference
    );
    assert_eq!(sample.patients[0].consents, ["research use refused"]);
    assert!(sample.patients[2].consents.is_empty());
}
