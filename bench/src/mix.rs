//! The search mix: four queries a clinical app sends, about patients whose
//! codes, years and names are known from the data loaded.

use std::fmt::Write;

/// Characters of a family name that `Patient?name=` asks for.
const NAME_PREFIX_CHARS: usize = 4;

/// The queries of the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    ObservationByCode,
    ObservationByDate,
    ConditionByPatient,
    PatientByName,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::ObservationByCode,
        Kind::ObservationByDate,
        Kind::ConditionByPatient,
        Kind::PatientByName,
    ];
    /// The queries about one patient, which a `patient/` token may send.
    pub const PATIENT_SCOPED: [Kind; 3] = [
        Kind::ObservationByCode,
        Kind::ObservationByDate,
        Kind::ConditionByPatient,
    ];

    pub fn template(self) -> &'static str {
        match self {
            Kind::ObservationByCode => {
                "Observation?subject=Patient/{id}&code=http://loinc.org|{code}"
            }
            Kind::ObservationByDate => {
                "Observation?subject=Patient/{id}&date=ge{y}-01-01&date=lt{y+1}-01-01"
            }
            Kind::ConditionByPatient => "Condition?subject=Patient/{id}",
            Kind::PatientByName => "Patient?name={first 4 letters of a family name}",
        }
    }
}

/// A loaded patient and what the queries may ask about them.
#[derive(Debug, Clone)]
pub struct Patient {
    pub id: String,
    pub family: String,
    pub codes: Vec<String>,
    pub years: Vec<i32>,
}

/// One request's path: `kind` about `patient`, the code or year drawn from
/// the patient's own Observations.
pub fn query(kind: Kind, patient: &Patient, rng: &mut fastrand::Rng) -> String {
    let id = &patient.id;
    match kind {
        Kind::ObservationByCode => {
            let code = &patient.codes[rng.usize(..patient.codes.len())];
            format!(
                "/fhir/Observation?subject=Patient/{id}&code={}",
                encode(&format!("http://loinc.org|{code}"))
            )
        }
        Kind::ObservationByDate => {
            let year = patient.years[rng.usize(..patient.years.len())];
            format!(
                "/fhir/Observation?subject=Patient/{id}&date=ge{year}-01-01&date=lt{}-01-01",
                year + 1
            )
        }
        Kind::ConditionByPatient => format!("/fhir/Condition?subject=Patient/{id}"),
        Kind::PatientByName => {
            let prefix: String = patient.family.chars().take(NAME_PREFIX_CHARS).collect();
            format!("/fhir/Patient?name={}", encode(&prefix))
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
