//! Haven's sample data, made by the project itself: a seeded, deterministic
//! generator of patients as FHIR R4 transaction Bundles. No network, no copied
//! records; the same seed gives byte-identical files on every machine.
//!
//! Every patient has demographics, visits (Encounters) with vital signs, long-
//! standing and short illnesses (Conditions), medications, laboratory results,
//! allergies and immunizations. The first patients carry sensitive conditions
//! (mental health, substance use, reproductive health) and privacy Consents (an
//! opt-out of research use, a denial for one practitioner), so labels and consent
//! are visible from the first minute. One Bundle holds the organization and its
//! practitioners; it is named so that `haven load` loads it first.
//!
//! Every entry is a `PUT` of a resource whose id the generator chose, so loading
//! a sample twice stores no duplicates and the ids are known before loading.

use serde_json::{json, Value};
use time::{Date, Duration, Month};

mod catalog;
mod rng;

use catalog::*;
pub use rng::Rng;

/// The seed `haven sample` and `haven demo` use unless given another.
pub const DEFAULT_SEED: u64 = 1;

/// The day the sample's history ends. Fixed, so that output depends on the seed
/// alone and not on when it was made.
pub const AS_OF: Date = match Date::from_calendar_date(2026, Month::June, 30) {
    Ok(date) => date,
    Err(_) => panic!("a valid date"),
};

const CONSENT_SCOPE: &str = "http://terminology.hl7.org/CodeSystem/consentscope";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
const PARTICIPATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const MRN_SYSTEM: &str = "urn:haven:sample:mrn";
const NPI_SYSTEM: &str = "http://hl7.org/fhir/sid/us-npi";
const PRACTITIONERS: usize = 4;

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub patients: usize,
    pub seed: u64,
}

/// One file of the sample: a transaction Bundle and the name to write it under.
#[derive(Debug, Clone)]
pub struct SampleFile {
    pub name: String,
    pub bundle: Value,
}

impl SampleFile {
    /// The file's bytes: pretty JSON, keys in the order written, a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(&self.bundle).expect("JSON values serialize");
        bytes.push(b'\n');
        bytes
    }

    pub fn resources(&self) -> usize {
        self.bundle["entry"].as_array().map_or(0, Vec::len)
    }
}

/// A person in the sample, as a reference and a name to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// `Patient/<id>` or `Practitioner/<id>`.
    pub reference: String,
    pub name: String,
}

/// A patient, with what makes them interesting to a demo.
#[derive(Debug, Clone)]
pub struct SamplePatient {
    pub person: Person,
    /// The sensitivity categories of their sensitive conditions (PSY, ETH, SEX).
    pub sensitive: Vec<&'static str>,
    /// Their privacy Consents, in words.
    pub consents: Vec<String>,
}

/// The generated sample.
#[derive(Debug, Clone)]
pub struct Sample {
    pub files: Vec<SampleFile>,
    pub organization: Person,
    pub practitioners: Vec<Person>,
    pub patients: Vec<SamplePatient>,
}

impl Sample {
    pub fn resources(&self) -> usize {
        self.files.iter().map(SampleFile::resources).sum()
    }
}

/// Generates `options.patients` patients and their clinic.
pub fn generate(options: Options) -> Sample {
    let clinic = Clinic::new(options.seed);
    let mut files = vec![clinic.bundle()];
    let mut patients = Vec::with_capacity(options.patients);
    for index in 0..options.patients {
        let (file, patient) = PatientBuilder::new(options.seed, index, &clinic).build();
        files.push(file);
        patients.push(patient);
    }
    Sample {
        files,
        organization: clinic.organization.clone(),
        practitioners: clinic
            .practitioners
            .iter()
            .map(|p| p.person.clone())
            .collect(),
        patients,
    }
}

/// A transaction entry that stores `resource` under the id it carries.
fn put(resource: Value) -> Value {
    let kind = resource["resourceType"].as_str().expect("a resource type");
    let id = resource["id"].as_str().expect("an id");
    json!({
        "fullUrl": format!("urn:uuid:{id}"),
        "resource": resource,
        "request": {"method": "PUT", "url": format!("{kind}/{id}")}
    })
}

fn transaction(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

fn concept((system, code, display): Code) -> Value {
    json!({"coding": [{"system": system, "code": code, "display": display}], "text": display})
}

fn reference(person: &Person) -> Value {
    json!({"reference": person.reference, "display": person.name})
}

fn quantity(value: f64, decimals: u32, unit: &str, ucum: &str) -> Value {
    let scale = 10f64.powi(decimals as i32);
    let rounded = (value * scale).round() / scale;
    let number = if decimals == 0 {
        json!(rounded as i64)
    } else {
        json!(rounded)
    };
    json!({"value": number, "unit": unit, "system": UCUM, "code": ucum})
}

/// A date and time of day as FHIR `dateTime`, in UTC.
fn date_time(date: Date, minutes: i64) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:00Z",
        date.year(),
        date.month() as u8,
        date.day(),
        minutes / 60,
        minutes % 60
    )
}

fn day(date: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        date.month() as u8,
        date.day()
    )
}

struct Practitioner {
    person: Person,
    resource: Value,
}

/// The organization and the practitioners every patient is seen by.
struct Clinic {
    organization: Person,
    organization_resource: Value,
    practitioners: Vec<Practitioner>,
}

impl Clinic {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::derive(seed, "clinic", 0);
        let id = rng.uuid();
        let (city, state, postal) = *rng.pick(CITIES);
        let address = json!({
            "line": [format!("{} {}", rng.range(10, 990), rng.pick(STREETS))],
            "city": city, "state": state, "postalCode": postal, "country": "US"
        });
        let name = format!("{city} Family Health");
        let organization = Person {
            reference: format!("Organization/{id}"),
            name: name.clone(),
        };
        let organization_resource = json!({
            "resourceType": "Organization",
            "id": id,
            "identifier": [{"system": NPI_SYSTEM, "value": npi(&mut rng)}],
            "active": true,
            "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type",
                                  "code": "prov", "display": "Healthcare Provider"}]}],
            "name": name,
            "telecom": [{"system": "phone", "value": phone(&mut rng), "use": "work"}],
            "address": [address.clone()]
        });
        let practitioners = (0..PRACTITIONERS)
            .map(|index| {
                let mut rng = Rng::derive(seed, "practitioner", index as u64);
                let id = rng.uuid();
                let female = rng.chance(0.5);
                let given = *rng.pick(if female { GIVEN_FEMALE } else { GIVEN_MALE });
                let family = *rng.pick(FAMILY);
                let person = Person {
                    reference: format!("Practitioner/{id}"),
                    name: format!("Dr. {given} {family}"),
                };
                let resource = json!({
                    "resourceType": "Practitioner",
                    "id": id,
                    "identifier": [{"system": NPI_SYSTEM, "value": npi(&mut rng)}],
                    "active": true,
                    "name": [{"family": family, "given": [given], "prefix": ["Dr."]}],
                    "telecom": [{"system": "phone", "value": phone(&mut rng), "use": "work"}],
                    "address": [address.clone()],
                    "gender": if female { "female" } else { "male" }
                });
                Practitioner { person, resource }
            })
            .collect();
        Self {
            organization,
            organization_resource,
            practitioners,
        }
    }

    /// The Bundle of the organization and practitioners, named the way `haven
    /// load` recognizes as loading first.
    fn bundle(&self) -> SampleFile {
        let mut entries = vec![put(self.organization_resource.clone())];
        entries.extend(self.practitioners.iter().map(|p| put(p.resource.clone())));
        SampleFile {
            name: "practitionerInformation-sample.json".into(),
            bundle: transaction(entries),
        }
    }
}

fn npi(rng: &mut Rng) -> String {
    format!("1{:09}", rng.range(0, 999_999_999))
}

fn phone(rng: &mut Rng) -> String {
    format!("555-{:03}-{:04}", rng.range(200, 999), rng.range(0, 9999))
}

/// The sensitive story of patient `index`, if it has one.
fn sensitive_story(index: usize) -> Option<&'static Sensitive> {
    match index {
        0 => Some(&DEPRESSION),
        1 => Some(&OPIOID_USE),
        2 => Some(&PREGNANCY),
        3 => Some(&ALCOHOL_USE),
        i if i % 10 == 7 => Some(&ANXIETY),
        _ => None,
    }
}

/// The practitioner the second patient's Consent refuses.
pub const DENIED_PRACTITIONER: usize = 2;

/// One visit: when, why, who saw the patient.
struct Visit {
    id: String,
    date: Date,
    minutes: i64,
    check_up: bool,
}

struct PatientBuilder<'a> {
    rng: Rng,
    index: usize,
    clinic: &'a Clinic,
    person: Person,
    female: bool,
    birth: Date,
    doctor: &'a Practitioner,
    entries: Vec<Value>,
    sensitive: Vec<&'static str>,
    consents: Vec<String>,
}

impl<'a> PatientBuilder<'a> {
    fn new(seed: u64, index: usize, clinic: &'a Clinic) -> Self {
        let mut rng = Rng::derive(seed, "patient", index as u64);
        let id = rng.uuid();
        let story = sensitive_story(index);
        let pregnant = story.is_some_and(|s| s.category == "SEX");
        let female = pregnant || rng.chance(0.5);
        let given = *rng.pick(if female { GIVEN_FEMALE } else { GIVEN_MALE });
        let family = *rng.pick(FAMILY);
        let age = if pregnant {
            rng.range(21, 38)
        } else {
            rng.range(19, 84)
        };
        let birth = AS_OF - Duration::days(age * 365 + rng.range(0, 364));
        // Nobody's doctor is the one their Consent may refuse.
        let doctor = &clinic.practitioners[index % 2];
        Self {
            rng,
            index,
            clinic,
            person: Person {
                reference: format!("Patient/{id}"),
                name: format!("{given} {family}"),
            },
            female,
            birth,
            doctor,
            entries: Vec::new(),
            sensitive: Vec::new(),
            consents: Vec::new(),
        }
    }

    fn id(&self) -> &str {
        self.person
            .reference
            .strip_prefix("Patient/")
            .expect("a patient reference")
    }

    fn subject(&self) -> Value {
        reference(&self.person)
    }

    fn build(mut self) -> (SampleFile, SamplePatient) {
        let patient = self.patient_resource();
        self.entries.push(put(patient));
        let visits = self.visits();
        for visit in &visits {
            let encounter = self.encounter(visit);
            self.entries.push(put(encounter));
        }
        self.vitals(&visits);
        self.chronic_conditions(&visits);
        self.acute_conditions(&visits);
        if let Some(story) = sensitive_story(self.index) {
            self.sensitive_condition(story, &visits);
        }
        self.allergy();
        self.immunizations(&visits);
        self.consents_of_first_patients();
        let name = format!(
            "patient-{:03}-{}.json",
            self.index + 1,
            self.person.name.replace(' ', "_")
        );
        let file = SampleFile {
            name,
            bundle: transaction(std::mem::take(&mut self.entries)),
        };
        let patient = SamplePatient {
            person: self.person,
            sensitive: self.sensitive,
            consents: self.consents,
        };
        (file, patient)
    }

    fn patient_resource(&mut self) -> Value {
        let (given, family) = self
            .person
            .name
            .split_once(' ')
            .expect("given and family names");
        let (city, state, postal) = *self.rng.pick(CITIES);
        let mrn = format!("{:08}", self.rng.range(0, 99_999_999));
        let line = format!("{} {}", self.rng.range(1, 400), self.rng.pick(STREETS));
        let phone = phone(&mut self.rng);
        json!({
            "resourceType": "Patient",
            "id": self.id(),
            "identifier": [{
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                     "code": "MR", "display": "Medical record number"}]},
                "system": MRN_SYSTEM,
                "value": mrn
            }],
            "active": true,
            "name": [{"use": "official", "family": family, "given": [given]}],
            "telecom": [{"system": "phone", "value": phone, "use": "home"}],
            "gender": if self.female { "female" } else { "male" },
            "birthDate": day(self.birth),
            "address": [{"use": "home", "line": [line], "city": city, "state": state,
                         "postalCode": postal, "country": "US"}],
            "generalPractitioner": [reference(&self.doctor.person)],
            "managingOrganization": reference(&self.clinic.organization)
        })
    }

    /// Three to six visits over the last four years, oldest first.
    fn visits(&mut self) -> Vec<Visit> {
        let count = self.rng.range(3, 6);
        let mut days: Vec<i64> = Vec::new();
        while days.len() < count as usize {
            let back = self.rng.range(10, 4 * 365);
            if days.iter().all(|d| (d - back).abs() > 20) {
                days.push(back);
            }
        }
        days.sort_unstable_by(|a, b| b.cmp(a));
        days.into_iter()
            .enumerate()
            .map(|(n, back)| Visit {
                id: self.rng.uuid(),
                date: AS_OF - Duration::days(back),
                minutes: self.rng.range(8 * 4, 16 * 4) * 15,
                check_up: n == 0 || self.rng.chance(0.6),
            })
            .collect()
    }

    fn encounter(&mut self, visit: &Visit) -> Value {
        let kind = if visit.check_up {
            CHECK_UP
        } else {
            PROBLEM_VISIT
        };
        json!({
            "resourceType": "Encounter",
            "id": visit.id,
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                      "code": "AMB", "display": "ambulatory"},
            "type": [concept(kind)],
            "subject": self.subject(),
            "participant": [{"individual": reference(&self.doctor.person)}],
            "period": {"start": date_time(visit.date, visit.minutes),
                       "end": date_time(visit.date, visit.minutes + 30)},
            "serviceProvider": reference(&self.clinic.organization)
        })
    }

    fn observation(&mut self, visit: &Visit, category: &str, code: Code, value: Value) -> Value {
        let mut observation = json!({
            "resourceType": "Observation",
            "id": self.rng.uuid(),
            "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": category,
                "display": if category == "vital-signs" { "Vital Signs" } else { "Laboratory" }
            }]}],
            "code": concept(code),
            "subject": self.subject(),
            "encounter": {"reference": format!("Encounter/{}", visit.id)},
            "effectiveDateTime": date_time(visit.date, visit.minutes + 5),
            "issued": date_time(visit.date, visit.minutes + 25)
        });
        let object = observation.as_object_mut().expect("an object");
        match value {
            Value::Array(components) => {
                object.insert("component".into(), Value::Array(components));
            }
            quantity => {
                object.insert("valueQuantity".into(), quantity);
            }
        }
        observation
    }

    fn vitals(&mut self, visits: &[Visit]) {
        let height = if self.female {
            self.rng.around(163.0, 7.0)
        } else {
            self.rng.around(177.0, 7.0)
        };
        let mut bmi = self.rng.around(26.5, 4.5);
        let hypertensive_bias = self.rng.around(4.0, 10.0);
        for visit in visits {
            bmi += self.rng.around(0.0, 0.6);
            let weight = bmi * (height / 100.0).powi(2);
            let systolic = self.rng.around(122.0 + hypertensive_bias, 9.0);
            let diastolic = self.rng.around(78.0 + hypertensive_bias / 2.0, 6.0);
            let rate = self.rng.around(72.0, 11.0);
            let readings = [
                (HEIGHT, quantity(height, 1, "cm", "cm")),
                (WEIGHT, quantity(weight, 1, "kg", "kg")),
                (BMI, quantity(bmi, 1, "kg/m2", "kg/m2")),
                (HEART_RATE, quantity(rate, 0, "beats/minute", "/min")),
                (
                    BLOOD_PRESSURE,
                    json!([
                        {"code": concept(SYSTOLIC), "valueQuantity": quantity(systolic, 0, "mmHg", "mm[Hg]")},
                        {"code": concept(DIASTOLIC), "valueQuantity": quantity(diastolic, 0, "mmHg", "mm[Hg]")}
                    ]),
                ),
            ];
            for (code, value) in readings {
                let observation = self.observation(visit, "vital-signs", code, value);
                self.entries.push(put(observation));
            }
        }
    }

    fn condition(&mut self, code: Code, visit: &Visit, resolved_after: Option<i64>) -> String {
        let id = self.rng.uuid();
        let mut condition = json!({
            "resourceType": "Condition",
            "id": id,
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": if resolved_after.is_some() { "resolved" } else { "active" }
            }]},
            "verificationStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": "confirmed"
            }]},
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                "code": "encounter-diagnosis", "display": "Encounter Diagnosis"
            }]}],
            "code": concept(code),
            "subject": self.subject(),
            "encounter": {"reference": format!("Encounter/{}", visit.id)},
            "onsetDateTime": date_time(visit.date, visit.minutes),
            "recordedDate": date_time(visit.date, visit.minutes + 20),
            "recorder": reference(&self.doctor.person)
        });
        if let Some(days) = resolved_after {
            condition["abatementDateTime"] =
                json!(date_time(visit.date + Duration::days(days), visit.minutes));
        }
        self.entries.push(put(condition));
        id
    }

    fn medication(&mut self, code: Code, visit: &Visit, reason: &str) {
        let request = json!({
            "resourceType": "MedicationRequest",
            "id": self.rng.uuid(),
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": concept(code),
            "subject": self.subject(),
            "encounter": {"reference": format!("Encounter/{}", visit.id)},
            "authoredOn": date_time(visit.date, visit.minutes + 25),
            "requester": reference(&self.doctor.person),
            "reasonReference": [{"reference": format!("Condition/{reason}")}],
            "dosageInstruction": [{"sequence": 1, "text": "As directed"}]
        });
        self.entries.push(put(request));
    }

    fn chronic_conditions(&mut self, visits: &[Visit]) {
        for chronic in CHRONIC {
            if !self.rng.chance(chronic.prevalence) {
                continue;
            }
            let first = self.rng.range(0, (visits.len() as i64 - 1) / 2) as usize;
            let condition = self.condition(chronic.condition, &visits[first], None);
            if let Some(medication) = chronic.medication {
                self.medication(medication, &visits[first], &condition);
            }
            if let Some(lab) = chronic.lab {
                for visit in &visits[first..] {
                    let value = self.rng.around(lab.mean, lab.spread);
                    let value = quantity(value, lab.decimals, lab.unit, lab.unit);
                    let observation = self.observation(visit, "laboratory", lab.code, value);
                    self.entries.push(put(observation));
                }
            }
        }
    }

    fn acute_conditions(&mut self, visits: &[Visit]) {
        for visit in visits.iter().filter(|v| !v.check_up) {
            let code = *self.rng.pick(ACUTE);
            let days = self.rng.range(7, 21);
            self.condition(code, visit, Some(days));
        }
    }

    fn sensitive_condition(&mut self, story: &Sensitive, visits: &[Visit]) {
        let visit = &visits[visits.len() - 2];
        let condition = self.condition(story.condition, visit, None);
        if let Some(medication) = story.medication {
            self.medication(medication, visit, &condition);
        }
        self.sensitive.push(story.category);
    }

    fn allergy(&mut self) {
        if !self.rng.chance(0.35) {
            return;
        }
        let (code, category) = *self.rng.pick(ALLERGIES);
        let recorded = self.birth + Duration::days(self.rng.range(3 * 365, 15 * 365));
        let allergy = json!({
            "resourceType": "AllergyIntolerance",
            "id": self.rng.uuid(),
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                "code": "active"
            }]},
            "verificationStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                "code": "confirmed"
            }]},
            "type": "allergy",
            "category": [category],
            "criticality": "low",
            "code": concept(code),
            "patient": self.subject(),
            "recordedDate": day(recorded)
        });
        self.entries.push(put(allergy));
    }

    fn immunizations(&mut self, visits: &[Visit]) {
        let mut vaccinated_years = Vec::new();
        for (n, visit) in visits.iter().enumerate() {
            let autumn = matches!(
                visit.date.month(),
                Month::September | Month::October | Month::November | Month::December
            );
            let vaccines: Vec<Code> = [
                (n == 0).then_some(TD_VACCINE),
                (autumn && !vaccinated_years.contains(&visit.date.year())).then_some(FLU_VACCINE),
            ]
            .into_iter()
            .flatten()
            .collect();
            for vaccine in vaccines {
                if vaccine == FLU_VACCINE {
                    vaccinated_years.push(visit.date.year());
                }
                let immunization = json!({
                    "resourceType": "Immunization",
                    "id": self.rng.uuid(),
                    "status": "completed",
                    "vaccineCode": concept(vaccine),
                    "patient": self.subject(),
                    "encounter": {"reference": format!("Encounter/{}", visit.id)},
                    "occurrenceDateTime": date_time(visit.date, visit.minutes + 15),
                    "primarySource": true,
                    "performer": [{"actor": reference(&self.doctor.person)}]
                });
                self.entries.push(put(immunization));
            }
        }
    }

    /// The first patient opts out of research use; the second refuses one
    /// practitioner.
    fn consents_of_first_patients(&mut self) {
        let provision = match self.index {
            0 => {
                self.consents.push("research use refused".into());
                json!({"type": "deny", "purpose": [{
                    "system": ACT_REASON, "code": "HRESCH", "display": "healthcare research"
                }]})
            }
            1 => {
                let refused = &self.clinic.practitioners[DENIED_PRACTITIONER].person;
                self.consents
                    .push(format!("{} may not see this record", refused.name));
                json!({"type": "deny", "actor": [{
                    "role": {"coding": [{"system": PARTICIPATION, "code": "PRCP",
                                         "display": "primary information recipient"}]},
                    "reference": reference(refused)
                }]})
            }
            _ => return,
        };
        let signed = AS_OF - Duration::days(self.rng.range(30, 300));
        let consent = json!({
            "resourceType": "Consent",
            "id": self.rng.uuid(),
            "status": "active",
            "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy",
                                  "display": "Privacy Consent"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0",
                                      "display": "Patient Consent"}]}],
            "patient": self.subject(),
            "dateTime": date_time(signed, 10 * 60),
            "organization": [reference(&self.clinic.organization)],
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                       "code": "OPTIN", "display": "opt-in"}]},
            "provision": {"type": "permit", "provision": [provision]}
        });
        self.entries.push(put(consent));
    }
}
