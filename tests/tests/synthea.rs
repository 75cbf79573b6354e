//! The Synthea sample patients load through `haven load` and every resource arrives.

use std::collections::BTreeMap;
use std::path::Path;

use haven_e2e::{shared_dir, spawn_haven, HavenOptions, PostgresDatabase};
use serde_json::Value;

/// How many resources of each type the bundles in a folder carry.
fn counts_in_bundles(dir: &Path) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let bundle: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            let resource_type = entry["resource"]["resourceType"].as_str().unwrap();
            *counts.entry(resource_type.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

async fn the_synthea_patients_load_completely(database_url: Option<String>) {
    let Some(shared) = shared_dir() else {
        println!("not run: HAVEN_SHARED is not set");
        return;
    };
    let synthea = shared.join("synthea");
    assert!(synthea.is_dir(), "{} is missing", synthea.display());
    let haven = spawn_haven(HavenOptions {
        database_url,
        ..HavenOptions::default()
    })
    .await
    .unwrap();

    // The loader signs in through SMART Backend Services, as a production loader would.
    let loader = haven.register_backend_client("system/*.cruds").unwrap();
    let mut load = haven.load_command(&synthea, &loader).unwrap();
    let output = tokio::task::spawn_blocking(move || load.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "haven load failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        haven.log()
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");

    let expected = counts_in_bundles(&synthea);
    let client = haven.client();
    // Cleared for everything: contraception and pregnancy records are labeled SEX.
    let token = haven
        .system_token_with("system/*.rs", &["--clearance", "V:*"])
        .await
        .unwrap();
    let mut stored = BTreeMap::new();
    for resource_type in expected.keys() {
        let bundle: Value = client
            .get(haven.url(&format!("{resource_type}?_count=0&_total=accurate")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        let total = bundle["total"]
            .as_u64()
            .unwrap_or_else(|| panic!("no total for {resource_type}: {bundle}"));
        stored.insert(resource_type.clone(), total);
    }
    assert_eq!(stored, expected);

    // Every version written has the one Provenance the server made for it: each
    // resource loaded, and the new version of each Encounter that took the labels
    // of a Procedure or Condition recorded in it.
    let encounter_history: Value = client
        .get(haven.url("Encounter/_history?_count=1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let relabeled = encounter_history["total"].as_u64().unwrap() - expected["Encounter"];
    let provenance: Value = client
        .get(haven.url("Provenance?_count=0&_total=accurate&_tag=urn:haven:provenance|server"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        provenance["total"].as_u64(),
        Some(expected.values().sum::<u64>() + relabeled),
        "{provenance}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_synthea_patients_load_completely_on_sqlite() {
    the_synthea_patients_load_completely(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_synthea_patients_load_completely_on_postgres() {
    if shared_dir().is_none() {
        println!("not run: HAVEN_SHARED is not set");
        return;
    }
    let database = match PostgresDatabase::create().unwrap() {
        Ok(database) => database,
        Err(reason) => {
            println!("not run: {reason}");
            return;
        }
    };
    the_synthea_patients_load_completely(Some(database.url.clone())).await;
}
