//! The Provenance Haven writes with every resource version (requirement R8).
//!
//! Shape per the R4 Provenance definition (<https://hl7.org/fhir/R4/provenance.html>),
//! close to US Core Provenance where it applies: the versioned target, the
//! server's `recorded` time, a v3 DataOperation activity, and agents for the
//! user and the client application.

use haven_model::clock::format_instant;
use serde_json::{json, Value};
use time::OffsetDateTime;

const DATA_OPERATION: &str = "http://terminology.hl7.org/CodeSystem/v3-DataOperation";
const PARTICIPANT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/provenance-participant-type";

/// What the write did, as a v3 DataOperation code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Create,
    Update,
    Delete,
}

impl Activity {
    fn coding(self) -> Value {
        let (code, display) = match self {
            Activity::Create => ("CREATE", "create"),
            Activity::Update => ("UPDATE", "revise"),
            Activity::Delete => ("DELETE", "delete"),
        };
        json!({"system": DATA_OPERATION, "code": code, "display": display})
    }
}

/// Builds the Provenance of one written version.
///
/// - `target_reference_versioned`: e.g. `Patient/1/_history/2`.
/// - The user, by `fhirUser`, is the `author`.
/// - The client application, by `client_id`, is the `performer`: it carried out
///   the change, and it acts `onBehalfOf` the user when there is one. Performer
///   rather than assembler because the app sends the change; it does not
///   compose a document from parts.
/// - With neither a user nor a client the one agent is an unidentified
///   performer, since R4 requires at least one agent.
/// - `previous_version` becomes an entity with role `revision`, or `removal`
///   for a delete (the version the delete retires).
pub fn provenance(
    target_reference_versioned: &str,
    activity: Activity,
    recorded: OffsetDateTime,
    user_fhir_user: Option<&str>,
    client_id: Option<&str>,
    previous_version: Option<&str>,
) -> Value {
    let mut agents = Vec::new();
    if let Some(user) = user_fhir_user {
        agents.push(json!({
            "type": participant("author", "Author"),
            "who": {"reference": user},
        }));
    }
    if let Some(client) = client_id {
        let mut agent = json!({
            "type": participant("performer", "Performer"),
            "who": {"identifier": {"value": client}},
        });
        if let Some(user) = user_fhir_user {
            agent["onBehalfOf"] = json!({"reference": user});
        }
        agents.push(agent);
    }
    if agents.is_empty() {
        agents.push(json!({
            "type": participant("performer", "Performer"),
            "who": {"display": "unidentified"},
        }));
    }

    let mut resource = json!({
        "resourceType": "Provenance",
        "target": [{"reference": target_reference_versioned}],
        "recorded": format_instant(recorded),
        "activity": {"coding": [activity.coding()]},
        "agent": agents,
    });
    if let Some(previous) = previous_version {
        let role = match activity {
            Activity::Delete => "removal",
            Activity::Create | Activity::Update => "revision",
        };
        resource["entity"] = json!([{"role": role, "what": {"reference": previous}}]);
    }
    resource
}

fn participant(code: &str, display: &str) -> Value {
    json!({"coding": [{"system": PARTICIPANT_TYPE, "code": code, "display": display}]})
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_model::validate::validate_resource;
    use time::macros::datetime;

    const WHEN: OffsetDateTime = datetime!(2026-03-01 10:00:00 UTC);

    fn assert_valid(resource: &Value) {
        let errors: Vec<_> = validate_resource(resource)
            .into_iter()
            .filter(|issue| issue.is_error())
            .collect();
        assert!(errors.is_empty(), "{errors:?} in {resource:#}");
    }

    #[test]
    fn an_update_by_a_user_through_an_app_names_both_and_the_previous_version() {
        let p = provenance(
            "Patient/1/_history/2",
            Activity::Update,
            WHEN,
            Some("Practitioner/p1"),
            Some("growth-chart"),
            Some("Patient/1/_history/1"),
        );
        assert_eq!(p["target"][0]["reference"], "Patient/1/_history/2");
        assert_eq!(p["recorded"], "2026-03-01T10:00:00.000000Z");
        assert_eq!(p["activity"]["coding"][0]["code"], "UPDATE");
        assert_eq!(p["agent"][0]["type"]["coding"][0]["code"], "author");
        assert_eq!(p["agent"][0]["who"]["reference"], "Practitioner/p1");
        assert_eq!(p["agent"][1]["type"]["coding"][0]["code"], "performer");
        assert_eq!(p["agent"][1]["who"]["identifier"]["value"], "growth-chart");
        assert_eq!(p["agent"][1]["onBehalfOf"]["reference"], "Practitioner/p1");
        assert_eq!(
            p["entity"],
            json!([{"role": "revision", "what": {"reference": "Patient/1/_history/1"}}])
        );
        assert_valid(&p);
    }

    #[test]
    fn a_system_client_acts_on_no_ones_behalf() {
        let p = provenance(
            "Observation/9/_history/1",
            Activity::Create,
            WHEN,
            None,
            Some("bulk-loader"),
            None,
        );
        assert_eq!(p["activity"]["coding"][0]["code"], "CREATE");
        assert_eq!(p["agent"].as_array().unwrap().len(), 1);
        assert!(p["agent"][0].get("onBehalfOf").is_none());
        assert!(p.get("entity").is_none());
        assert_valid(&p);
    }

    #[test]
    fn a_delete_marks_the_retired_version_as_removed() {
        let p = provenance(
            "Patient/1/_history/3",
            Activity::Delete,
            WHEN,
            Some("Practitioner/p1"),
            None,
            Some("Patient/1/_history/2"),
        );
        assert_eq!(p["activity"]["coding"][0]["code"], "DELETE");
        assert_eq!(p["entity"][0]["role"], "removal");
        assert_eq!(p["agent"].as_array().unwrap().len(), 1);
        assert_valid(&p);
    }

    #[test]
    fn a_write_with_no_known_actor_still_has_one_agent() {
        let p = provenance(
            "Patient/1/_history/1",
            Activity::Create,
            WHEN,
            None,
            None,
            None,
        );
        assert_eq!(p["agent"][0]["who"]["display"], "unidentified");
        assert_valid(&p);
    }
}
