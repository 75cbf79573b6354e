//! The codes and names the sample is made of. Codes are facts of their
//! terminologies (SNOMED CT, LOINC, RxNorm, CVX, UCUM); the names are common ones.

pub const SNOMED: &str = "http://snomed.info/sct";
pub const LOINC: &str = "http://loinc.org";
pub const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
pub const CVX: &str = "http://hl7.org/fhir/sid/cvx";
pub const UCUM: &str = "http://unitsofmeasure.org";

pub const GIVEN_FEMALE: &[&str] = &[
    "Amelia", "Beatriz", "Chloe", "Dalia", "Elena", "Fatima", "Grace", "Hana", "Ingrid", "Julia",
    "Keiko", "Lucia", "Maya", "Nora", "Olivia", "Priya", "Rosa", "Sofia", "Tamar", "Yara",
];
pub const GIVEN_MALE: &[&str] = &[
    "Aaron", "Bruno", "Carlos", "Daniel", "Emeka", "Felix", "Gabriel", "Hiroshi", "Ivan", "Jonas",
    "Kwame", "Liam", "Mateo", "Noah", "Omar", "Pablo", "Rahul", "Samuel", "Tomas", "Victor",
];
pub const FAMILY: &[&str] = &[
    "Alvarez",
    "Bianchi",
    "Chen",
    "Dubois",
    "Eriksson",
    "Fernandes",
    "Garcia",
    "Haddad",
    "Ito",
    "Jensen",
    "Kowalski",
    "Lindqvist",
    "Morales",
    "Novak",
    "Okafor",
    "Petrov",
    "Quinn",
    "Rossi",
    "Schmidt",
    "Tanaka",
    "Umarov",
    "Varga",
    "Weber",
    "Yilmaz",
    "Zhang",
];
pub const STREETS: &[&str] = &[
    "Maple Avenue",
    "Oak Street",
    "Harbor Road",
    "Hillside Drive",
    "Mill Lane",
    "River Street",
    "Elm Court",
    "Station Road",
    "Orchard Way",
    "Lake View Terrace",
];
/// (city, state, postal code)
pub const CITIES: &[(&str, &str, &str)] = &[
    ("Springfield", "MA", "01103"),
    ("Worcester", "MA", "01608"),
    ("Lowell", "MA", "01852"),
    ("Salem", "MA", "01970"),
    ("Quincy", "MA", "02169"),
    ("Northampton", "MA", "01060"),
];

/// A coded thing: system, code, display.
pub type Code = (&'static str, &'static str, &'static str);

/// A long-standing condition, with the medication that treats it and the
/// laboratory test that follows it, if any.
pub struct Chronic {
    pub condition: Code,
    pub medication: Option<Code>,
    pub lab: Option<Lab>,
    /// How likely a patient is to have it.
    pub prevalence: f64,
}

/// A laboratory test: its code, unit, typical value and spread, decimals shown.
#[derive(Clone, Copy)]
pub struct Lab {
    pub code: Code,
    pub unit: &'static str,
    pub mean: f64,
    pub spread: f64,
    pub decimals: u32,
}

pub const HBA1C: Lab = Lab {
    code: (LOINC, "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"),
    unit: "%",
    mean: 7.2,
    spread: 0.9,
    decimals: 1,
};
pub const CHOLESTEROL: Lab = Lab {
    code: (
        LOINC,
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
    ),
    unit: "mg/dL",
    mean: 215.0,
    spread: 30.0,
    decimals: 0,
};
pub const HEMOGLOBIN: Lab = Lab {
    code: (LOINC, "718-7", "Hemoglobin [Mass/volume] in Blood"),
    unit: "g/dL",
    mean: 11.2,
    spread: 1.0,
    decimals: 1,
};

pub const CHRONIC: &[Chronic] = &[
    Chronic {
        condition: (SNOMED, "38341003", "Hypertension"),
        medication: Some((RXNORM, "316049", "Hydrochlorothiazide 25 MG")),
        lab: None,
        prevalence: 0.35,
    },
    Chronic {
        condition: (SNOMED, "44054006", "Diabetes mellitus type 2"),
        medication: Some((
            RXNORM,
            "860975",
            "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet",
        )),
        lab: Some(HBA1C),
        prevalence: 0.15,
    },
    Chronic {
        condition: (SNOMED, "15777000", "Prediabetes"),
        medication: None,
        lab: None,
        prevalence: 0.15,
    },
    Chronic {
        condition: (SNOMED, "55822004", "Hyperlipidemia"),
        medication: None,
        lab: Some(CHOLESTEROL),
        prevalence: 0.2,
    },
    Chronic {
        condition: (SNOMED, "446096008", "Perennial allergic rhinitis"),
        medication: Some((RXNORM, "311372", "Loratadine 10 MG Oral Tablet")),
        lab: None,
        prevalence: 0.15,
    },
    Chronic {
        condition: (SNOMED, "239872002", "Osteoarthritis of hip"),
        medication: Some((RXNORM, "198014", "Naproxen 500 MG Oral Tablet")),
        lab: None,
        prevalence: 0.1,
    },
    Chronic {
        condition: (SNOMED, "271737000", "Anemia"),
        medication: None,
        lab: Some(HEMOGLOBIN),
        prevalence: 0.08,
    },
];

/// Short illnesses that a visit may be for.
pub const ACUTE: &[Code] = &[
    (SNOMED, "444814009", "Viral sinusitis"),
    (SNOMED, "10509002", "Acute bronchitis"),
    (SNOMED, "195662009", "Acute viral pharyngitis"),
    (SNOMED, "44465007", "Sprain of ankle"),
];

/// (code, category)
pub const ALLERGIES: &[(Code, &str)] = &[
    ((SNOMED, "417532002", "Allergy to fish"), "food"),
    ((SNOMED, "300913006", "Shellfish allergy"), "food"),
    (
        (SNOMED, "419263009", "Allergy to tree pollen"),
        "environment",
    ),
    (
        (SNOMED, "232347008", "Dander (animal) allergy"),
        "environment",
    ),
    ((SNOMED, "424213003", "Allergy to bee venom"), "environment"),
];

pub const FLU_VACCINE: Code = (
    CVX,
    "140",
    "Influenza, seasonal, injectable, preservative free",
);
pub const TD_VACCINE: Code = (CVX, "113", "Td (adult) preservative free");

pub const CHECK_UP: Code = (SNOMED, "185349003", "Encounter for check up");
pub const PROBLEM_VISIT: Code = (SNOMED, "185345009", "Encounter for symptom");

pub const HEIGHT: Code = (LOINC, "8302-2", "Body height");
pub const WEIGHT: Code = (LOINC, "29463-7", "Body weight");
pub const BMI: Code = (LOINC, "39156-5", "Body mass index (BMI) [Ratio]");
pub const HEART_RATE: Code = (LOINC, "8867-4", "Heart rate");
pub const BLOOD_PRESSURE: Code = (
    LOINC,
    "85354-9",
    "Blood pressure panel with all children optional",
);
pub const SYSTOLIC: Code = (LOINC, "8480-6", "Systolic blood pressure");
pub const DIASTOLIC: Code = (LOINC, "8462-4", "Diastolic blood pressure");

/// A sensitive story one of the first patients carries, so that labels and
/// consent show from the first minute. Its codes are in `profiles/sensitivity/`.
pub struct Sensitive {
    pub category: &'static str,
    pub condition: Code,
    pub medication: Option<Code>,
}

pub const DEPRESSION: Sensitive = Sensitive {
    category: "PSY",
    condition: (SNOMED, "370143000", "Major depressive disorder"),
    medication: Some((RXNORM, "328670", "sertraline 100 MG")),
};
pub const OPIOID_USE: Sensitive = Sensitive {
    category: "ETH",
    condition: (SNOMED, "5602001", "Opioid abuse"),
    medication: Some((RXNORM, "1819", "buprenorphine")),
};
pub const PREGNANCY: Sensitive = Sensitive {
    category: "SEX",
    condition: (SNOMED, "72892002", "Normal pregnancy"),
    medication: None,
};
pub const ALCOHOL_USE: Sensitive = Sensitive {
    category: "ETH",
    condition: (SNOMED, "7200002", "Alcoholism"),
    medication: None,
};
pub const ANXIETY: Sensitive = Sensitive {
    category: "PSY",
    condition: (SNOMED, "197480006", "Anxiety disorder"),
    medication: None,
};
