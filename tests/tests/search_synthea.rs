//! Search over the Synthea sample patients, on SQLite and (when configured) PostgreSQL.
//!
//! Each backend's server is started and loaded once with `haven load`; then every
//! check runs against it in turn, each a function whose name says what must hold.
//! What a search should return is computed here from the bundle files themselves,
//! never by asking the server. A failing check does not stop the others: the test
//! prints every check's outcome and fails at the end naming those that failed.
//!
//! The server gives every created resource a new id, so the test knows a patient by
//! the identifier Synthea gives it (system `https://github.com/synthetichealth/synthea`):
//! it reads that identifier from the patients the server lists, and checks that
//! `Patient?identifier=` finds the patients the checks use.
//!
//! Searches are sent with `Prefer: handling=strict`, so a parameter the server does not
//! support is an error rather than silently ignored (which would widen the results).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use haven_auth::client::{BackendServicesClient, ClientKey};
use haven_e2e::{shared_dir, spawn_haven, Haven, HavenOptions, PostgresDatabase};
use serde_json::{json, Value};

const SYNTHEA: &str = "https://github.com/synthetichealth/synthea";
const LOINC: &str = "http://loinc.org";
/// The largest page the server gives (`max_page_size`).
const BIG_PAGE: &str = "1000";
/// No search in this suite may take more pages than this.
const PAGE_LIMIT: usize = 500;

// ---------------------------------------------------------------------------
// What the bundle files hold
// ---------------------------------------------------------------------------

/// One HumanName, as the bundles give it.
#[derive(Debug, Clone, Default)]
struct Name {
    family: Option<String>,
    given: Vec<String>,
    prefix: Vec<String>,
    suffix: Vec<String>,
    text: Option<String>,
}

impl Name {
    /// Every part a string search on `name` looks at.
    fn parts(&self) -> impl Iterator<Item = &str> {
        self.family
            .iter()
            .chain(&self.given)
            .chain(&self.prefix)
            .chain(&self.suffix)
            .chain(&self.text)
            .map(String::as_str)
    }
}

#[derive(Debug)]
struct BundlePatient {
    /// The value of the Synthea identifier.
    synthea_id: String,
    names: Vec<Name>,
}

#[derive(Debug)]
struct BundleObservation {
    /// The Synthea identifier of the subject.
    patient: String,
    /// The LOINC code.
    code: String,
    /// `[low, high)` of the effective time, in microseconds since 1970.
    effective: (i64, i64),
}

/// Everything the checks need from the bundles.
#[derive(Debug)]
struct Corpus {
    patients: BTreeMap<String, BundlePatient>,
    observations: Vec<BundleObservation>,
    /// Conditions per patient (Synthea identifier).
    conditions: BTreeMap<String, usize>,
    condition_total: usize,
}

impl Corpus {
    fn read(dir: &Path) -> Result<Corpus> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        files.retain(|p| p.extension().is_some_and(|e| e == "json"));
        files.sort();
        let mut corpus = Corpus {
            patients: BTreeMap::new(),
            observations: Vec::new(),
            conditions: BTreeMap::new(),
            condition_total: 0,
        };
        for path in files {
            let bundle: Value = serde_json::from_slice(&std::fs::read(&path)?)
                .with_context(|| format!("reading {}", path.display()))?;
            let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
            // The bundle's own references name patients by their fullUrl.
            let mut by_full_url = BTreeMap::new();
            for entry in &entries {
                let resource = &entry["resource"];
                if resource["resourceType"] != "Patient" {
                    continue;
                }
                let synthea_id = synthea_identifier(resource)
                    .with_context(|| format!("a Patient without one in {}", path.display()))?;
                let full_url = entry["fullUrl"]
                    .as_str()
                    .context("an entry has no fullUrl")?;
                by_full_url.insert(full_url.to_string(), synthea_id.clone());
                let names = resource["name"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(read_name)
                    .collect();
                corpus
                    .patients
                    .insert(synthea_id.clone(), BundlePatient { synthea_id, names });
            }
            let subject_of = |resource: &Value| -> Result<String> {
                let reference = resource["subject"]["reference"]
                    .as_str()
                    .context("no subject reference")?;
                by_full_url
                    .get(reference)
                    .cloned()
                    .with_context(|| format!("{reference} is no patient of its bundle"))
            };
            for entry in &entries {
                let resource = &entry["resource"];
                match resource["resourceType"].as_str() {
                    Some("Observation") => {
                        let codes: Vec<&str> = resource["code"]["coding"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|c| c["system"] == LOINC)
                            .filter_map(|c| c["code"].as_str())
                            .collect();
                        // Synthea gives every Observation exactly one LOINC coding.
                        let [code] = codes.as_slice() else {
                            bail!("an Observation with codes {codes:?}");
                        };
                        corpus.observations.push(BundleObservation {
                            patient: subject_of(resource)?,
                            code: (*code).to_string(),
                            effective: effective_interval(resource)
                                .context("an Observation without an effective time")?,
                        });
                    }
                    Some("Condition") => {
                        *corpus.conditions.entry(subject_of(resource)?).or_insert(0) += 1;
                        corpus.condition_total += 1;
                    }
                    _ => {}
                }
            }
        }
        ensure!(
            !corpus.patients.is_empty(),
            "no patients in {}",
            dir.display()
        );
        Ok(corpus)
    }

    /// The `n` LOINC codes with the most Observations (ties by code).
    fn most_common_codes(&self, n: usize) -> Vec<String> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for o in &self.observations {
            *counts.entry(&o.code).or_insert(0) += 1;
        }
        let mut ranked: Vec<(&str, usize)> = counts.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        ranked
            .into_iter()
            .take(n)
            .map(|(c, _)| c.to_string())
            .collect()
    }

    /// The `n` patients with the most Observations (ties by identifier).
    fn busiest_patients(&self, n: usize) -> Vec<String> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for o in &self.observations {
            *counts.entry(&o.patient).or_insert(0) += 1;
        }
        let mut ranked: Vec<(&str, usize)> = counts.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        ranked
            .into_iter()
            .take(n)
            .map(|(p, _)| p.to_string())
            .collect()
    }

    fn observations_of<'a>(
        &'a self,
        patient: &'a str,
    ) -> impl Iterator<Item = &'a BundleObservation> + 'a {
        self.observations
            .iter()
            .filter(move |o| o.patient == patient)
    }

    /// The patients a string search `name=<value>` matches: any part of any name
    /// starts with the value, ignoring case and accents.
    fn patients_named(&self, value: &str) -> BTreeSet<String> {
        let wanted = fold(value);
        self.patients
            .values()
            .filter(|p| {
                p.names
                    .iter()
                    .flat_map(Name::parts)
                    .any(|part| fold(part).starts_with(&wanted))
            })
            .map(|p| p.synthea_id.clone())
            .collect()
    }
}

fn read_name(name: &Value) -> Name {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    };
    Name {
        family: name["family"].as_str().map(str::to_owned),
        given: strings(&name["given"]),
        prefix: strings(&name["prefix"]),
        suffix: strings(&name["suffix"]),
        text: name["text"].as_str().map(str::to_owned),
    }
}

fn synthea_identifier(resource: &Value) -> Option<String> {
    resource["identifier"]
        .as_array()?
        .iter()
        .find(|i| i["system"] == SYNTHEA)?["value"]
        .as_str()
        .map(str::to_owned)
}

/// The effective time of an Observation as an interval: `effectiveDateTime` at its
/// precision, or `effectivePeriod` (an open end reaches forever).
fn effective_interval(resource: &Value) -> Option<(i64, i64)> {
    if let Some(text) = resource["effectiveDateTime"].as_str() {
        return interval(text);
    }
    if let Some(text) = resource["effectiveInstant"].as_str() {
        return interval(text);
    }
    let period = resource.get("effectivePeriod")?;
    let low = match period["start"].as_str() {
        Some(start) => interval(start)?.0,
        None => i64::MIN,
    };
    let high = match period["end"].as_str() {
        Some(end) => interval(end)?.1,
        None => i64::MAX,
    };
    Some((low, high))
}

/// Lowercased and accent-folded, as string search compares. The corpus holds only
/// ASCII and the Latin-1 letters below; anything else fails loudly rather than
/// giving a wrong expectation.
fn fold(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let base = match c {
            'á' | 'à' | 'â' | 'ä' | 'ã' | 'å' | 'Á' | 'À' | 'Â' | 'Ä' | 'Ã' | 'Å' => {
                'a'
            }
            'é' | 'è' | 'ê' | 'ë' | 'É' | 'È' | 'Ê' | 'Ë' => 'e',
            'í' | 'ì' | 'î' | 'ï' | 'Í' | 'Ì' | 'Î' | 'Ï' => 'i',
            'ó' | 'ò' | 'ô' | 'ö' | 'õ' | 'Ó' | 'Ò' | 'Ô' | 'Ö' | 'Õ' => 'o',
            'ú' | 'ù' | 'û' | 'ü' | 'Ú' | 'Ù' | 'Û' | 'Ü' => 'u',
            'ñ' | 'Ñ' => 'n',
            'ç' | 'Ç' => 'c',
            'ý' | 'ÿ' | 'Ý' => 'y',
            c if c.is_ascii() => c.to_ascii_lowercase(),
            other => panic!("the test cannot fold {other:?} in {text:?}"),
        };
        out.push(base);
    }
    out
}

// ---------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;

/// Days from 1970-01-01 to a civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The half-open interval `[low, high)`, in microseconds since 1970 UTC, that a FHIR
/// date or dateTime covers at its precision. Without a zone, UTC.
fn interval(text: &str) -> Option<(i64, i64)> {
    let (date, time) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let fields: Vec<&str> = date.split('-').collect();
    let number = |s: &str, len: usize| -> Option<i64> {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let year = number(fields.first()?, 4)?;
    match (fields.len(), time) {
        (1, None) => {
            let low = days_from_civil(year, 1, 1);
            let high = days_from_civil(year + 1, 1, 1);
            Some((low * MICROS_PER_DAY, high * MICROS_PER_DAY))
        }
        (2, None) => {
            let month = number(fields[1], 2)?;
            let low = days_from_civil(year, month, 1);
            let high = if month == 12 {
                days_from_civil(year + 1, 1, 1)
            } else {
                days_from_civil(year, month + 1, 1)
            };
            Some((low * MICROS_PER_DAY, high * MICROS_PER_DAY))
        }
        (3, None) => {
            let low = days_from_civil(year, number(fields[1], 2)?, number(fields[2], 2)?);
            Some((low * MICROS_PER_DAY, (low + 1) * MICROS_PER_DAY))
        }
        (3, Some(time)) => {
            let day = days_from_civil(year, number(fields[1], 2)?, number(fields[2], 2)?);
            // The zone: Z, +hh:mm or -hh:mm; none means UTC.
            let (clock, offset) = if let Some(clock) = time.strip_suffix('Z') {
                (clock, 0)
            } else if let Some(at) = time.rfind(['+', '-']) {
                let (clock, zone) = time.split_at(at);
                let sign = if zone.starts_with('-') { -1 } else { 1 };
                let (h, m) = zone[1..].split_once(':')?;
                (clock, sign * (number(h, 2)? * 3600 + number(m, 2)? * 60))
            } else {
                (time, 0)
            };
            let (hms, fraction) = match clock.split_once('.') {
                Some((hms, f)) => (hms, Some(f)),
                None => (clock, None),
            };
            let parts: Vec<&str> = hms.split(':').collect();
            let (h, m) = (number(parts.first()?, 2)?, number(parts.get(1)?, 2)?);
            let (s, mut width) = match parts.get(2) {
                Some(s) => (number(s, 2)?, MICROS_PER_SECOND),
                None => (0, 60 * MICROS_PER_SECOND),
            };
            let mut micros = 0;
            if let Some(f) = fraction {
                if f.is_empty() || f.len() > 6 || !f.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let scale = 10_i64.pow(6 - f.len() as u32);
                micros = f.parse::<i64>().ok()? * scale;
                width = scale;
            }
            let low = day * MICROS_PER_DAY
                + (h * 3600 + m * 60 + s - offset) * MICROS_PER_SECOND
                + micros;
            Some((low, low + width))
        }
        _ => None,
    }
}

/// Whether a resource's interval satisfies one date criterion such as `ge2015-01-01`,
/// by the rules the server implements for `[vl, vh)` against `[rl, rh)`.
fn date_matches(resource: (i64, i64), criterion: &str) -> bool {
    let (prefix, value) = match criterion.get(..2) {
        Some(p @ ("eq" | "ne" | "gt" | "ge" | "lt" | "le")) => (p, &criterion[2..]),
        _ => ("eq", criterion),
    };
    let (vl, vh) = interval(value).unwrap_or_else(|| panic!("not a date: {value}"));
    let (rl, rh) = resource;
    match prefix {
        "ge" => rh > vl,
        "gt" => rh > vh,
        "lt" => rl < vl,
        "le" => rl < vh,
        "eq" => rl >= vl && rh <= vh,
        "ne" => !(rl >= vl && rh <= vh),
        _ => unreachable!(),
    }
}

// ---------------------------------------------------------------------------
// A loaded server
// ---------------------------------------------------------------------------

/// A server with the corpus loaded, and what the test learnt about its ids.
struct Server {
    haven: Haven,
    http: reqwest::Client,
    auth: BackendServicesClient,
    /// Synthea identifier → the server's Patient id.
    server_ids: BTreeMap<String, String>,
    /// The server's Patient id → Synthea identifier.
    synthea_ids: BTreeMap<String, String>,
    /// For the comparison of backends: a label per `_sort` query and the order
    /// of results it gave, as fingerprints that do not depend on server ids.
    sorted: Mutex<BTreeMap<String, Vec<String>>>,
    /// Declared last, so the server stops before its database is dropped.
    _database: Option<PostgresDatabase>,
}

impl Server {
    /// Starts a server, loads the Synthea folder with `haven load` and learns the
    /// server id of every patient.
    async fn start(
        backend: &'static str,
        database: Option<PostgresDatabase>,
        synthea: &Path,
    ) -> Result<Server> {
        let haven = spawn_haven(HavenOptions {
            database_url: database.as_ref().map(|d| d.url.clone()),
            ..HavenOptions::default()
        })
        .await?;

        let started = Instant::now();
        let loader = haven.register_backend_client("system/*.cruds")?;
        let mut load = haven.load_command(synthea, &loader)?;
        let output = tokio::task::spawn_blocking(move || load.output()).await??;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success() && stdout.contains(" 0 failed"),
            "haven load failed:\n{stdout}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            haven.log()
        );
        println!(
            "[{backend}] loaded in {:.1?}: {}",
            started.elapsed(),
            stdout.trim()
        );

        // An administrator's view: a Backend Services client that may do
        // anything and is cleared for every label.
        let scope = "system/*.cruds";
        let registered = haven.register_backend_client_with(scope, &["--clearance", "V:*"])?;
        let key = ClientKey::from_pem(&std::fs::read_to_string(&registered.key_file)?)?;
        let auth = BackendServicesClient::new(
            haven.base_url.parse()?,
            registered.client_id,
            key,
            scope,
            haven.client(),
        );
        let mut server = Server {
            http: haven.client(),
            haven,
            auth,
            server_ids: BTreeMap::new(),
            synthea_ids: BTreeMap::new(),
            sorted: Mutex::new(BTreeMap::new()),
            _database: database,
        };
        for patient in server
            .search_all("Patient", &[("_count", BIG_PAGE.into())])
            .await
            .context("listing the patients")?
        {
            let resource = &patient["resource"];
            let id = resource["id"].as_str().context("a Patient without id")?;
            let synthea_id =
                synthea_identifier(resource).context("a Patient without its identifier")?;
            server.server_ids.insert(synthea_id.clone(), id.to_string());
            server.synthea_ids.insert(id.to_string(), synthea_id);
        }
        Ok(server)
    }

    async fn token(&self) -> Result<String> {
        self.auth
            .access_token()
            .await
            .with_context(|| format!("getting a token; the server's log:\n{}", self.log_tail()))
    }

    fn log_tail(&self) -> String {
        let log = self.haven.log();
        let start = log.len().saturating_sub(3000);
        let start = (start..log.len())
            .find(|i| log.is_char_boundary(*i))
            .unwrap_or(0);
        log[start..].to_string()
    }

    /// `path` under the FHIR base (`Patient?...`), or an absolute URL as is.
    fn url(&self, path: &str) -> String {
        if path.starts_with("https://") || path.starts_with("http://") {
            path.to_string()
        } else {
            self.haven.url(path)
        }
    }

    /// A GET that must succeed, answered with JSON.
    async fn get(&self, path: &str) -> Result<Value> {
        let url = self.url(path);
        let mut token = self.token().await?;
        for attempt in 0..2 {
            let response = self
                .http
                .get(&url)
                .bearer_auth(&token)
                .header("Accept", "application/fhir+json")
                .header("Prefer", "handling=strict")
                .send()
                .await
                .with_context(|| format!("GET {url}"))?;
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            if status == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                token = self.auth.renew_access_token(&token).await?;
                continue;
            }
            ensure!(
                status.is_success(),
                "GET {url} answered {status}: {}",
                excerpt(&body)
            );
            return serde_json::from_str(&body)
                .with_context(|| format!("GET {url} answered no JSON: {}", excerpt(&body)));
        }
        unreachable!("the loop returns")
    }

    /// `resource_type?pairs`, the pairs form-encoded.
    fn query(resource_type: &str, pairs: &[(&str, String)]) -> String {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())))
            .finish();
        format!("{resource_type}?{query}")
    }

    /// One page of a search.
    async fn search(&self, resource_type: &str, pairs: &[(&str, String)]) -> Result<Value> {
        let bundle = self.get(&Self::query(resource_type, pairs)).await?;
        ensure!(
            bundle["resourceType"] == "Bundle" && bundle["type"] == "searchset",
            "not a searchset: {}",
            excerpt(&bundle.to_string())
        );
        Ok(bundle)
    }

    /// Every entry of every page of a search, following `next`.
    async fn search_all(
        &self,
        resource_type: &str,
        pairs: &[(&str, String)],
    ) -> Result<Vec<Value>> {
        let mut bundle = self.search(resource_type, pairs).await?;
        let mut entries = Vec::new();
        for _ in 0..PAGE_LIMIT {
            entries.extend(bundle["entry"].as_array().cloned().unwrap_or_default());
            match link(&bundle, "next") {
                Some(next) => bundle = self.get(&next).await?,
                None => return Ok(entries),
            }
        }
        bail!("{resource_type} search took more than {PAGE_LIMIT} pages")
    }

    /// `total` of a search, which must be given.
    async fn total(&self, resource_type: &str, pairs: &[(&str, String)]) -> Result<u64> {
        let mut pairs = pairs.to_vec();
        pairs.push(("_total", "accurate".into()));
        pairs.push(("_count", "0".into()));
        let bundle = self.search(resource_type, &pairs).await?;
        bundle["total"].as_u64().with_context(|| {
            format!(
                "no total for {}: {}",
                Self::query(resource_type, &pairs),
                excerpt(&bundle.to_string())
            )
        })
    }

    async fn create(&self, resource: &Value) -> Result<Value> {
        let resource_type = resource["resourceType"].as_str().context("no type")?;
        let response = self
            .http
            .post(self.haven.url(resource_type))
            .bearer_auth(self.token().await?)
            .header("Content-Type", "application/fhir+json")
            .header("Accept", "application/fhir+json")
            .header("Prefer", "return=representation")
            .body(resource.to_string())
            .send()
            .await?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        ensure!(
            status == reqwest::StatusCode::CREATED,
            "POST {resource_type} answered {status}: {}",
            excerpt(&body)
        );
        Ok(serde_json::from_str(&body)?)
    }

    async fn delete(&self, path: &str) -> Result<()> {
        let response = self
            .http
            .delete(self.haven.url(path))
            .bearer_auth(self.token().await?)
            .send()
            .await?;
        let status = response.status();
        ensure!(
            status.is_success(),
            "DELETE {path} answered {status}: {}",
            excerpt(&response.text().await.unwrap_or_default())
        );
        Ok(())
    }

    fn server_id(&self, synthea_id: &str) -> Result<&str> {
        self.server_ids
            .get(synthea_id)
            .map(String::as_str)
            .with_context(|| format!("the server has no patient {synthea_id}"))
    }

    /// `Patient/<server id>` for a Synthea identifier.
    fn patient_reference(&self, synthea_id: &str) -> Result<String> {
        Ok(format!("Patient/{}", self.server_id(synthea_id)?))
    }

    /// A resource as text without anything the server chose: no id or meta, and
    /// references to patients by their Synthea identifier, other references blanked.
    fn fingerprint(&self, resource: &Value) -> String {
        fn walk(value: &mut Value, patients: &BTreeMap<String, String>) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(reference)) = map.get_mut("reference") {
                        *reference = match reference
                            .strip_prefix("Patient/")
                            .and_then(|id| patients.get(id))
                        {
                            Some(synthea_id) => format!("Patient#{synthea_id}"),
                            None => "(reference)".into(),
                        };
                    }
                    for v in map.values_mut() {
                        walk(v, patients);
                    }
                }
                Value::Array(items) => items.iter_mut().for_each(|v| walk(v, patients)),
                _ => {}
            }
        }
        let mut copy = resource.clone();
        if let Some(map) = copy.as_object_mut() {
            map.remove("id");
            map.remove("meta");
        }
        walk(&mut copy, &self.synthea_ids);
        canonical(&copy)
    }

    /// Keeps the order a `_sort` query gave, for comparing the backends.
    fn remember_order(&self, label: String, fingerprints: Vec<String>) {
        self.sorted
            .lock()
            .expect("not poisoned")
            .insert(label, fingerprints);
    }
}

/// JSON text with the members of every object in key order: PostgreSQL's `jsonb`
/// gives them back in its own order.
fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let members: BTreeMap<&String, String> =
                map.iter().map(|(k, v)| (k, canonical(v))).collect();
            let inner: Vec<String> = members
                .into_iter()
                .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", inner.join(","))
        }
        other => other.to_string(),
    }
}

/// The URL of a Bundle's link with this relation.
fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == relation)?["url"]
        .as_str()
        .map(str::to_owned)
}

/// The resources of the entries with this `search.mode`.
fn resources<'a>(entries: &'a [Value], mode: &str) -> Vec<&'a Value> {
    entries
        .iter()
        .filter(|e| e["search"]["mode"] == mode)
        .map(|e| &e["resource"])
        .collect()
}

fn ids(resources: &[&Value]) -> Vec<String> {
    resources
        .iter()
        .map(|r| r["id"].as_str().unwrap_or("(no id)").to_string())
        .collect()
}

fn excerpt(text: &str) -> String {
    let mut end = text.len().min(600);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = if end < text.len() { " …" } else { "" };
    format!("{}{cut}", &text[..end])
}

/// Where two texts first differ, with some context from each.
fn where_they_differ(here: &str, there: &str, other: &str) -> String {
    let at = here
        .char_indices()
        .zip(there.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(here.len().min(there.len()));
    let around = |text: &str| {
        let mut start = at.saturating_sub(80);
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = (at + 120).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.get(start..end).unwrap_or("").to_string()
    };
    format!("here …{}… on {other} …{}…", around(here), around(there))
}

/// The ids that occur more than once.
fn duplicates(ids: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut twice = BTreeSet::new();
    for id in ids {
        if !seen.insert(id) {
            twice.insert(id.clone());
        }
    }
    twice.into_iter().collect()
}

// ---------------------------------------------------------------------------
// The choices every check shares
// ---------------------------------------------------------------------------

/// Which patients and codes the checks look at, chosen from the bundles alone.
struct Picks {
    /// The three patients with the most Observations.
    patients: Vec<String>,
    /// The five most common LOINC codes.
    codes: Vec<String>,
}

impl Picks {
    fn from(corpus: &Corpus) -> Picks {
        Picks {
            patients: corpus.busiest_patients(3),
            codes: corpus.most_common_codes(5),
        }
    }
}

// ---------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------

async fn every_patient_is_found_by_its_synthea_identifier(
    server: &Server,
    corpus: &Corpus,
    picks: &Picks,
) -> Result<()> {
    ensure!(
        server.server_ids.len() == corpus.patients.len(),
        "the server lists {} patients with a Synthea identifier, the bundles hold {}",
        server.server_ids.len(),
        corpus.patients.len()
    );
    for synthea_id in &picks.patients {
        let bundle = server
            .search(
                "Patient",
                &[("identifier", format!("{SYNTHEA}|{synthea_id}"))],
            )
            .await?;
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        let found = ids(&resources(&entries, "match"));
        ensure!(
            found == [server.server_id(synthea_id)?],
            "identifier {synthea_id} found {found:?}"
        );
    }
    Ok(())
}

async fn observations_are_counted_by_patient_and_loinc_code(
    server: &Server,
    corpus: &Corpus,
    picks: &Picks,
) -> Result<()> {
    let mut wrong = Vec::new();
    for patient in &picks.patients {
        for code in &picks.codes {
            let expected = corpus
                .observations_of(patient)
                .filter(|o| &o.code == code)
                .count() as u64;
            let got = server
                .total(
                    "Observation",
                    &[
                        ("subject", server.patient_reference(patient)?),
                        ("code", format!("{LOINC}|{code}")),
                    ],
                )
                .await?;
            if got != expected {
                wrong.push(format!("{patient} {code}: {got}, expected {expected}"));
            }
        }
    }
    ensure!(wrong.is_empty(), "wrong totals: {wrong:?}");
    Ok(())
}

async fn observations_are_found_by_a_range_of_effective_dates(
    server: &Server,
    corpus: &Corpus,
    picks: &Picks,
) -> Result<()> {
    // Every Synthea time is to the second with an offset, so a whole-year range
    // only decides at midnight: make sure nothing sits within a day of it.
    let ranges = [
        ("ge2015-01-01", "lt2016-01-01"),
        ("gt2012-12-31", "le2014-06-30"),
    ];
    let mut wrong = Vec::new();
    for patient in &picks.patients {
        for (from, to) in ranges {
            for edge in [&from[2..], &to[2..]] {
                let (low, _) = interval(edge).expect("a date");
                if let Some(close) = corpus
                    .observations_of(patient)
                    .find(|o| (o.effective.0 - low).abs() < MICROS_PER_DAY)
                {
                    bail!("the range edge {edge} is ambiguous for {patient}: {close:?}");
                }
            }
            let expected = corpus
                .observations_of(patient)
                .filter(|o| date_matches(o.effective, from) && date_matches(o.effective, to))
                .count() as u64;
            let got = server
                .total(
                    "Observation",
                    &[
                        ("subject", server.patient_reference(patient)?),
                        ("date", from.to_string()),
                        ("date", to.to_string()),
                    ],
                )
                .await?;
            if got != expected {
                wrong.push(format!(
                    "{patient} date={from}&date={to}: {got}, expected {expected}"
                ));
            }
        }
    }
    ensure!(wrong.is_empty(), "wrong totals: {wrong:?}");
    Ok(())
}

async fn date_prefixes_compare_an_instant_to_the_second(
    server: &Server,
    corpus: &Corpus,
    picks: &Picks,
) -> Result<()> {
    // The search value is an effective time itself, so each prefix decides at the
    // edge of one second: eq finds exactly that second, gt excludes it, ge keeps it.
    let mut wrong = Vec::new();
    for patient in &picks.patients {
        let mut times: Vec<(i64, i64)> = corpus
            .observations_of(patient)
            .map(|o| o.effective)
            .collect();
        times.sort();
        let Some(&middle) = times.get(times.len() / 2) else {
            bail!("{patient} has no Observations");
        };
        let value = format_instant(middle.0);
        for prefix in ["eq", "gt", "ge", "lt", "le"] {
            let criterion = format!("{prefix}{value}");
            let expected = times
                .iter()
                .filter(|t| date_matches(**t, &criterion))
                .count() as u64;
            let got = server
                .total(
                    "Observation",
                    &[
                        ("subject", server.patient_reference(patient)?),
                        ("date", criterion.clone()),
                    ],
                )
                .await?;
            if got != expected {
                wrong.push(format!(
                    "{patient} date={criterion}: {got}, expected {expected}"
                ));
            }
        }
    }
    ensure!(wrong.is_empty(), "wrong totals: {wrong:?}");
    Ok(())
}

/// An instant as a FHIR dateTime to the second with a `+00:00` offset.
fn format_instant(micros: i64) -> String {
    let seconds = micros.div_euclid(MICROS_PER_SECOND);
    let days = seconds.div_euclid(86_400);
    let rest = seconds.rem_euclid(86_400);
    // civil_from_days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+00:00",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

async fn a_chain_through_the_subject_finds_the_observations_of_every_patient_so_named(
    server: &Server,
    corpus: &Corpus,
    _picks: &Picks,
) -> Result<()> {
    // The family name most patients share, as written; and the first family name
    // with an accent, searched in capitals without it.
    let mut families: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for p in corpus.patients.values() {
        for family in p.names.iter().filter_map(|n| n.family.as_deref()) {
            families
                .entry(family.to_string())
                .or_default()
                .insert(&p.synthea_id);
        }
    }
    let common = families
        .iter()
        .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
        .map(|(f, _)| f.clone())
        .context("no family names")?;
    let mut searches = vec![common];
    if let Some(accented) = families.keys().find(|f| !f.is_ascii()) {
        searches.push(fold(accented).to_uppercase());
    }

    let mut wrong = Vec::new();
    for name in searches {
        let named = corpus.patients_named(&name);
        ensure!(!named.is_empty(), "no patient is named {name}");
        // The code most common among those patients (ties by code).
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for o in corpus
            .observations
            .iter()
            .filter(|o| named.contains(&o.patient))
        {
            *counts.entry(&o.code).or_insert(0) += 1;
        }
        let code = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(c, _)| c.to_string())
            .context("those patients have no Observations")?;
        let expected = counts[code.as_str()] as u64;
        let got = server
            .total(
                "Observation",
                &[
                    ("subject:Patient.name", name.clone()),
                    ("code", format!("{LOINC}|{code}")),
                ],
            )
            .await?;
        if got != expected {
            wrong.push(format!(
                "subject:Patient.name={name}&code={code} ({} patients): {got}, expected {expected}",
                named.len()
            ));
        }
    }
    ensure!(wrong.is_empty(), "wrong totals: {wrong:?}");
    Ok(())
}

async fn has_finds_exactly_the_patients_with_such_an_observation(
    server: &Server,
    corpus: &Corpus,
    _picks: &Picks,
) -> Result<()> {
    // The code about half the patients have (ties by code): it tells them apart.
    let mut patients_by_code: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for o in &corpus.observations {
        patients_by_code
            .entry(&o.code)
            .or_default()
            .insert(&o.patient);
    }
    let half = corpus.patients.len() / 2;
    let (code, expected) = patients_by_code
        .iter()
        .min_by(|a, b| {
            a.1.len()
                .abs_diff(half)
                .cmp(&b.1.len().abs_diff(half))
                .then(a.0.cmp(b.0))
        })
        .context("no Observations")?;
    let entries = server
        .search_all(
            "Patient",
            &[
                ("_has:Observation:patient:code", format!("{LOINC}|{code}")),
                ("_count", "7".into()),
            ],
        )
        .await?;
    let found: Vec<String> = resources(&entries, "match")
        .iter()
        .map(|r| synthea_identifier(r).unwrap_or_else(|| "(no identifier)".into()))
        .collect();
    let found_set: BTreeSet<&str> = found.iter().map(String::as_str).collect();
    ensure!(
        duplicates(&found).is_empty(),
        "patients found twice: {:?}",
        duplicates(&found)
    );
    ensure!(
        &found_set == expected,
        "_has code {code}: {} patients, expected {}; missing {:?}, extra {:?}",
        found_set.len(),
        expected.len(),
        expected.difference(&found_set).collect::<Vec<_>>(),
        found_set.difference(expected).collect::<Vec<_>>()
    );
    Ok(())
}

async fn include_adds_the_subject_once_beside_the_matching_observations(
    server: &Server,
    corpus: &Corpus,
    picks: &Picks,
) -> Result<()> {
    for patient in &picks.patients {
        let code = &picks.codes[0];
        let expected = corpus
            .observations_of(patient)
            .filter(|o| &o.code == code)
            .count();
        let reference = server.patient_reference(patient)?;
        let bundle = server
            .search(
                "Observation",
                &[
                    ("subject", reference.clone()),
                    ("code", format!("{LOINC}|{code}")),
                    ("_include", "Observation:subject".into()),
                    ("_count", BIG_PAGE.into()),
                ],
            )
            .await?;
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        let matches = resources(&entries, "match");
        let included = resources(&entries, "include");
        ensure!(
            matches.len() == expected && matches.iter().all(|r| r["resourceType"] == "Observation"),
            "{patient} {code}: {} matches, expected {expected} Observations",
            matches.len()
        );
        ensure!(
            included.len() == 1
                && included[0]["resourceType"] == "Patient"
                && included[0]["id"] == server.server_id(patient)?,
            "{patient}: included {:?}, expected only {reference}",
            included
                .iter()
                .map(|r| format!("{}/{}", r["resourceType"], r["id"]))
                .collect::<Vec<_>>()
        );
        if let Some(total) = bundle["total"].as_u64() {
            ensure!(
                total == expected as u64,
                "{patient}: total {total} counts more than the matches ({expected})"
            );
        }
    }
    Ok(())
}

/// The Synthea patients have no substance use, mental health or other
/// sensitive condition: no resource of theirs gets a security label.
/// The ordinary Synthea patients hold no substance use, mental health or other
/// restricted data; only contraception and pregnancy, which the reproductive
/// health value set labels `SEX`.
async fn only_reproductive_health_is_labeled_among_the_synthea_patients(
    server: &Server,
    _: &Corpus,
    _: &Picks,
) -> Result<()> {
    let reproductive = "http://terminology.hl7.org/CodeSystem/v3-ActCode|SEX";
    for &resource_type in haven_e2e::LABELED_TYPES {
        let all = server.total(resource_type, &[]).await?;
        let labeled = server
            .total(resource_type, &[("_security:missing", "false".into())])
            .await?;
        let sex = server
            .total(resource_type, &[("_security", reproductive.into())])
            .await?;
        ensure!(
            labeled == sex,
            "{labeled} of {all} {resource_type} resources carry security labels, {sex} of them SEX"
        );
    }
    Ok(())
}

async fn revinclude_adds_exactly_the_conditions_of_the_patient(
    server: &Server,
    corpus: &Corpus,
    picks: &Picks,
) -> Result<()> {
    // The chosen patients, and the one with the most Conditions.
    let mut patients = picks.patients.clone();
    if let Some((most, _)) = corpus
        .conditions
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
    {
        patients.push(most.clone());
    }
    for patient in &patients {
        let expected = corpus.conditions.get(patient).copied().unwrap_or(0);
        let reference = server.patient_reference(patient)?;
        let bundle = server
            .search(
                "Patient",
                &[
                    ("identifier", format!("{SYNTHEA}|{patient}")),
                    ("_revinclude", "Condition:subject".into()),
                ],
            )
            .await?;
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        let matches = resources(&entries, "match");
        let included = resources(&entries, "include");
        ensure!(
            ids(&matches) == [server.server_id(patient)?],
            "{patient}: matches {:?}",
            ids(&matches)
        );
        let included_ids = ids(&included);
        ensure!(
            included.len() == expected
                && duplicates(&included_ids).is_empty()
                && included.iter().all(|r| r["resourceType"] == "Condition"
                    && r["subject"]["reference"] == reference.as_str()),
            "{patient}: included {} resources, expected {expected} Conditions of {reference}: {:?}",
            included.len(),
            included
                .iter()
                .map(|r| format!(
                    "{}/{} subject {}",
                    r["resourceType"], r["id"], r["subject"]["reference"]
                ))
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

async fn observations_sorted_by_descending_date_come_newest_first_and_are_the_same_set(
    server: &Server,
    corpus: &Corpus,
    picks: &Picks,
) -> Result<()> {
    for patient in &picks.patients {
        let code = &picks.codes[0];
        let base = [
            ("subject", server.patient_reference(patient)?),
            ("code", format!("{LOINC}|{code}")),
            ("_count", "3".into()),
        ];
        let mut sorted_pairs = base.to_vec();
        sorted_pairs.push(("_sort", "-date".into()));
        let sorted = server.search_all("Observation", &sorted_pairs).await?;
        let unsorted = server.search_all("Observation", &base).await?;
        let sorted = resources(&sorted, "match");
        let unsorted = resources(&unsorted, "match");

        let times: Vec<(i64, i64)> = sorted
            .iter()
            .map(|r| effective_interval(r).context("an Observation without an effective time"))
            .collect::<Result<_>>()?;
        if let Some(pair) = times.windows(2).position(|w| w[0].0 < w[1].0) {
            bail!(
                "{patient} {code}: {} comes before {}",
                sorted[pair]["effectiveDateTime"],
                sorted[pair + 1]["effectiveDateTime"]
            );
        }
        let mut expected: Vec<i64> = corpus
            .observations_of(patient)
            .filter(|o| &o.code == code)
            .map(|o| o.effective.0)
            .collect();
        expected.sort_by(|a, b| b.cmp(a));
        let got: Vec<i64> = times.iter().map(|t| t.0).collect();
        ensure!(
            got == expected,
            "{patient} {code}: the effective times are {} values, expected the bundles' {}",
            got.len(),
            expected.len()
        );
        let (sorted_ids, unsorted_ids) = (ids(&sorted), ids(&unsorted));
        ensure!(
            duplicates(&sorted_ids).is_empty() && duplicates(&unsorted_ids).is_empty(),
            "{patient} {code}: a resource came twice"
        );
        ensure!(
            sorted_ids.iter().collect::<BTreeSet<_>>()
                == unsorted_ids.iter().collect::<BTreeSet<_>>(),
            "{patient} {code}: sorted and unsorted give different resources"
        );
        server.remember_order(
            format!("Observation?subject={patient}&code={code}&_sort=-date"),
            canonical_runs(
                sorted
                    .iter()
                    .zip(&times)
                    .map(|(r, t)| (t.0.to_string(), server.fingerprint(r))),
            ),
        );
    }
    Ok(())
}

/// Fingerprints in result order, each run of equal sort keys put in fingerprint
/// order: the server may order ties by its own ids, which differ between backends.
fn canonical_runs(items: impl Iterator<Item = (String, String)>) -> Vec<String> {
    let mut out = Vec::new();
    let mut run: Vec<String> = Vec::new();
    let mut key: Option<String> = None;
    for (k, fingerprint) in items {
        if key.as_ref() != Some(&k) {
            run.sort();
            out.append(&mut run);
            key = Some(k);
        }
        run.push(fingerprint);
    }
    run.sort();
    out.append(&mut run);
    out
}

async fn patients_sorted_by_family_and_given_come_in_name_order(
    server: &Server,
    corpus: &Corpus,
    _picks: &Picks,
) -> Result<()> {
    let entries = server
        .search_all(
            "Patient",
            &[("_sort", "family,given".into()), ("_count", "30".into())],
        )
        .await?;
    let order: Vec<String> = resources(&entries, "match")
        .iter()
        .map(|r| synthea_identifier(r).unwrap_or_else(|| "(no identifier)".into()))
        .collect();
    ensure!(
        order.len() == corpus.patients.len() && duplicates(&order).is_empty(),
        "{} patients ({} twice), expected {}",
        order.len(),
        duplicates(&order).len(),
        corpus.patients.len()
    );
    server.remember_order("Patient?_sort=family,given".into(), order.clone());

    // A patient with two different family names (a maiden name) could sort by
    // either; compare the order of the others, which have one.
    let single = |id: &String| -> Option<(String, Vec<String>)> {
        let patient = corpus.patients.get(id)?;
        let families: BTreeSet<String> = patient
            .names
            .iter()
            .filter_map(|n| n.family.as_deref())
            .map(fold)
            .collect();
        let [family]: [String; 1] = families.into_iter().collect::<Vec<_>>().try_into().ok()?;
        let given: BTreeSet<String> = patient
            .names
            .iter()
            .flat_map(|n| n.given.iter())
            .map(|g| fold(g.as_str()))
            .collect();
        Some((family, given.into_iter().collect()))
    };
    let got: Vec<(String, Vec<String>)> = order.iter().filter_map(single).collect();
    let mut expected = got.clone();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    let families = |v: &[(String, Vec<String>)]| v.iter().map(|p| p.0.clone()).collect::<Vec<_>>();
    if families(&got) != families(&expected) {
        let at = got
            .iter()
            .zip(&expected)
            .position(|(g, e)| g.0 != e.0)
            .unwrap_or(0);
        bail!(
            "family names out of order from position {at}: got {:?}, expected {:?}",
            &families(&got)[at..(at + 5).min(got.len())],
            &families(&expected)[at..(at + 5).min(expected.len())]
        );
    }
    // Within one family name, the patients with one given name come by it.
    for pair in got.windows(2) {
        let ([a], [b]) = (pair[0].1.as_slice(), pair[1].1.as_slice()) else {
            continue;
        };
        ensure!(
            pair[0].0 != pair[1].0 || a <= b,
            "in the family {}, {a} comes before {b}",
            pair[0].0
        );
    }
    Ok(())
}

/// Checks the links of a page: `self` and `next` are absolute URLs on the server.
fn check_page_links(server: &Server, page: &Value) -> Result<()> {
    let own = url::Url::parse(&server.haven.announced_base_url)?;
    for relation in ["self", "next"] {
        let Some(href) = link(page, relation) else {
            ensure!(relation == "next", "a page without a self link");
            continue;
        };
        let parsed = url::Url::parse(&href)
            .with_context(|| format!("{relation} link {href:?} is not absolute"))?;
        ensure!(
            parsed.scheme() == own.scheme()
                && parsed.port_or_known_default() == own.port_or_known_default()
                && parsed.path().starts_with(own.path()),
            "{relation} link {href} is not under {own}"
        );
    }
    Ok(())
}

async fn every_condition_appears_exactly_once_across_pages_of_37(
    server: &Server,
    corpus: &Corpus,
    _picks: &Picks,
) -> Result<()> {
    let mut page = server
        .search(
            "Condition",
            &[("_count", "37".into()), ("_total", "accurate".into())],
        )
        .await?;
    let total = page["total"].as_u64();
    ensure!(
        total == Some(corpus.condition_total as u64),
        "total {total:?}, expected {}",
        corpus.condition_total
    );
    let mut seen: Vec<String> = Vec::new();
    for number in 1..=PAGE_LIMIT {
        check_page_links(server, &page)?;
        let entries = page["entry"].as_array().cloned().unwrap_or_default();
        let here = ids(&resources(&entries, "match"));
        ensure!(here.len() <= 37, "page {number} has {} entries", here.len());
        if number <= 2 {
            // The self link gives this same page again.
            let again = server
                .get(&link(&page, "self").context("no self link")?)
                .await?;
            let again_entries = again["entry"].as_array().cloned().unwrap_or_default();
            ensure!(
                ids(&resources(&again_entries, "match")) == here,
                "page {number}'s self link gives other resources"
            );
        }
        seen.extend(here.iter().cloned());
        match link(&page, "next") {
            Some(next) => {
                ensure!(
                    !here.is_empty(),
                    "page {number} is empty but has a next link"
                );
                page = server.get(&next).await?;
            }
            None => break,
        }
    }
    ensure!(
        duplicates(&seen).is_empty(),
        "Conditions seen twice: {:?}",
        duplicates(&seen)
    );
    ensure!(
        seen.len() == corpus.condition_total,
        "{} Conditions over all pages, expected {}",
        seen.len(),
        corpus.condition_total
    );
    Ok(())
}

/// Pages through `Condition` 37 at a time, creating a Condition after the second
/// page; every original Condition must still come exactly once.
async fn page_conditions_creating_one_midway(
    server: &Server,
    corpus: &Corpus,
    picks: &Picks,
    extra: &[(&str, String)],
) -> Result<()> {
    let originals: BTreeSet<String> = ids(&resources(
        &server
            .search_all("Condition", &[("_count", BIG_PAGE.into())])
            .await?,
        "match",
    ))
    .into_iter()
    .collect();
    ensure!(
        originals.len() == corpus.condition_total,
        "{} Conditions before paging, expected {}",
        originals.len(),
        corpus.condition_total
    );
    let mut pairs = vec![("_count", "37".to_string())];
    pairs.extend(extra.iter().cloned());
    let mut page = server.search("Condition", &pairs).await?;
    let mut seen: Vec<String> = Vec::new();
    let mut created: Option<String> = None;
    let outcome = async {
        for number in 1..=PAGE_LIMIT {
            let entries = page["entry"].as_array().cloned().unwrap_or_default();
            seen.extend(ids(&resources(&entries, "match")));
            if number == 2 {
                let condition = server
                    .create(&json!({
                        "resourceType": "Condition",
                        "clinicalStatus": {"coding": [{
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": "active"
                        }]},
                        "code": {"text": "Created while another client pages"},
                        "subject": {"reference": server.patient_reference(&picks.patients[0])?},
                    }))
                    .await?;
                created = condition["id"].as_str().map(str::to_owned);
            }
            match link(&page, "next") {
                Some(next) => page = server.get(&next).await?,
                None => return Ok::<(), anyhow::Error>(()),
            }
        }
        bail!("more than {PAGE_LIMIT} pages")
    }
    .await;
    if let Some(id) = &created {
        server.delete(&format!("Condition/{id}")).await?;
    }
    outcome?;
    ensure!(created.is_some(), "paging ended before the second page");
    let twice = duplicates(&seen);
    let seen_set: BTreeSet<String> = seen.iter().cloned().collect();
    let missing: Vec<&String> = originals.difference(&seen_set).collect();
    let strangers: Vec<&String> = seen_set
        .difference(&originals)
        .filter(|id| Some(*id) != created.as_ref())
        .collect();
    ensure!(
        twice.is_empty() && missing.is_empty() && strangers.is_empty(),
        "after a Condition was created on page 2: {} seen twice {:?}, {} missing {:?}, unknown {:?}",
        twice.len(),
        twice.iter().take(5).collect::<Vec<_>>(),
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        strangers
    );
    Ok(())
}

async fn a_condition_created_while_paging_leaves_every_other_on_exactly_one_page(
    server: &Server,
    corpus: &Corpus,
    picks: &Picks,
) -> Result<()> {
    page_conditions_creating_one_midway(server, corpus, picks, &[]).await
}

async fn a_condition_created_while_paging_newest_first_leaves_every_other_on_exactly_one_page(
    server: &Server,
    corpus: &Corpus,
    picks: &Picks,
) -> Result<()> {
    // Newest first puts the new Condition before the pages already read: paging by
    // offset alone would then show the last Condition of page 2 again on page 3.
    page_conditions_creating_one_midway(server, corpus, picks, &[("_sort", "-_lastUpdated".into())])
        .await
}

// ---------------------------------------------------------------------------
// Running the checks
// ---------------------------------------------------------------------------

/// The outcome of every check on one backend.
struct Report {
    backend: &'static str,
    passed: Vec<&'static str>,
    failed: Vec<String>,
}

impl Report {
    fn record(&mut self, name: &'static str, result: Result<()>, elapsed: Duration) {
        match result {
            Ok(()) => {
                println!("[{}] ok     {name} ({elapsed:.1?})", self.backend);
                self.passed.push(name);
            }
            Err(e) => {
                println!("[{}] FAILED {name} ({elapsed:.1?}): {e:#}", self.backend);
                self.failed.push(format!("{name}: {e:#}"));
            }
        }
    }

    fn finish(self) {
        println!(
            "[{}] {} checks passed, {} failed",
            self.backend,
            self.passed.len(),
            self.failed.len()
        );
        assert!(
            self.failed.is_empty(),
            "on {}, these checks failed:\n{}",
            self.backend,
            self.failed.join("\n")
        );
    }
}

macro_rules! check {
    ($report:expr, $check:ident, $($arg:expr),*) => {{
        let started = Instant::now();
        let result = $check($($arg),*).await;
        $report.record(stringify!($check), result, started.elapsed());
    }};
}

/// The `_sort` orders each backend gave, for the backend that finishes second.
static ORDERS: Mutex<BTreeMap<&'static str, BTreeMap<String, Vec<String>>>> =
    Mutex::new(BTreeMap::new());

fn both_backends_sort_alike(
    ours: &BTreeMap<String, Vec<String>>,
    theirs: &BTreeMap<String, Vec<String>>,
    other: &str,
) -> Result<()> {
    let mut differ = Vec::new();
    for (label, order) in ours {
        match theirs.get(label) {
            Some(their) if their == order => {}
            Some(their) => {
                let at = order
                    .iter()
                    .zip(their)
                    .position(|(a, b)| a != b)
                    .unwrap_or(order.len().min(their.len()));
                let (a, b) = (
                    order.get(at).map(String::as_str).unwrap_or(""),
                    their.get(at).map(String::as_str).unwrap_or(""),
                );
                differ.push(format!(
                    "{label}: {} results here and {} on {other}, first different at {at}: {}",
                    order.len(),
                    their.len(),
                    where_they_differ(a, b, other)
                ));
            }
            None => differ.push(format!("{label}: {other} has no result")),
        }
    }
    ensure!(!ours.is_empty(), "no _sort query succeeded here");
    ensure!(differ.is_empty(), "{}", differ.join("\n"));
    Ok(())
}

async fn search_the_synthea_patients(backend: &'static str, database: Option<PostgresDatabase>) {
    let Some(shared) = shared_dir() else {
        println!("not run: HAVEN_SHARED is not set");
        return;
    };
    let synthea = shared.join("synthea");
    assert!(synthea.is_dir(), "{} is missing", synthea.display());
    let corpus = Corpus::read(&synthea).unwrap();
    let picks = Picks::from(&corpus);
    println!(
        "[{backend}] patients {:?}, codes {:?}",
        picks.patients, picks.codes
    );
    let server = Server::start(backend, database, &synthea).await.unwrap();
    let (s, c, p) = (&server, &corpus, &picks);
    let mut report = Report {
        backend,
        passed: Vec::new(),
        failed: Vec::new(),
    };
    check!(
        report,
        every_patient_is_found_by_its_synthea_identifier,
        s,
        c,
        p
    );
    check!(
        report,
        observations_are_counted_by_patient_and_loinc_code,
        s,
        c,
        p
    );
    check!(
        report,
        observations_are_found_by_a_range_of_effective_dates,
        s,
        c,
        p
    );
    check!(
        report,
        date_prefixes_compare_an_instant_to_the_second,
        s,
        c,
        p
    );
    check!(
        report,
        a_chain_through_the_subject_finds_the_observations_of_every_patient_so_named,
        s,
        c,
        p
    );
    check!(
        report,
        has_finds_exactly_the_patients_with_such_an_observation,
        s,
        c,
        p
    );
    check!(
        report,
        include_adds_the_subject_once_beside_the_matching_observations,
        s,
        c,
        p
    );
    check!(
        report,
        only_reproductive_health_is_labeled_among_the_synthea_patients,
        s,
        c,
        p
    );
    check!(
        report,
        revinclude_adds_exactly_the_conditions_of_the_patient,
        s,
        c,
        p
    );
    check!(
        report,
        observations_sorted_by_descending_date_come_newest_first_and_are_the_same_set,
        s,
        c,
        p
    );
    check!(
        report,
        patients_sorted_by_family_and_given_come_in_name_order,
        s,
        c,
        p
    );
    check!(
        report,
        every_condition_appears_exactly_once_across_pages_of_37,
        s,
        c,
        p
    );
    // These write (and then delete) a Condition, so they come last.
    check!(
        report,
        a_condition_created_while_paging_leaves_every_other_on_exactly_one_page,
        s,
        c,
        p
    );
    check!(
        report,
        a_condition_created_while_paging_newest_first_leaves_every_other_on_exactly_one_page,
        s,
        c,
        p
    );

    // Whichever backend finishes second compares the two.
    let ours = server.sorted.lock().expect("not poisoned").clone();
    let theirs = {
        let mut orders = ORDERS.lock().expect("not poisoned");
        orders.insert(backend, ours.clone());
        orders
            .iter()
            .find(|(b, _)| **b != backend)
            .map(|(b, o)| (*b, o.clone()))
    };
    match theirs {
        Some((other, theirs)) => {
            let started = Instant::now();
            let result = both_backends_sort_alike(&ours, &theirs, other);
            report.record("both_backends_sort_alike", result, started.elapsed());
        }
        None => println!(
            "[{backend}] both_backends_sort_alike: not compared here (the other backend has not finished or does not run)"
        ),
    }
    report.finish();
    drop(server);
}

#[tokio::test(flavor = "multi_thread")]
async fn search_over_the_synthea_patients_on_sqlite() {
    search_the_synthea_patients("sqlite", None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn search_over_the_synthea_patients_on_postgres() {
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
    search_the_synthea_patients("postgres", Some(database)).await;
}

#[test]
fn dates_cover_the_interval_of_their_precision() {
    let second = interval("2015-06-03T12:34:56+00:00").unwrap();
    assert_eq!(second.1 - second.0, MICROS_PER_SECOND);
    assert_eq!(format_instant(second.0), "2015-06-03T12:34:56+00:00");
    assert_eq!(
        interval("2015-06-03T14:34:56+02:00"),
        Some(second),
        "offsets move the instant"
    );
    let year = interval("2015").unwrap();
    assert_eq!(year.0, interval("2015-01-01").unwrap().0);
    assert_eq!(year.1, interval("2016-01-01").unwrap().0);
    assert_eq!(
        interval("1970-01-01T00:00:00Z"),
        Some((0, MICROS_PER_SECOND))
    );
    assert!(date_matches(second, "ge2015-06-03T12:34:56+00:00"));
    assert!(!date_matches(second, "gt2015-06-03T12:34:56+00:00"));
    assert!(date_matches(second, "le2015-06-03T12:34:56+00:00"));
    assert!(!date_matches(second, "lt2015-06-03T12:34:56+00:00"));
    assert!(date_matches(second, "eq2015-06-03T12:34:56+00:00"));
    assert!(date_matches(second, "eq2015-06"));
    assert_eq!(fold("Ordóñez"), "ordonez");
    assert_eq!(
        canonical(&json!({"b": [{"d": 1, "c": 2}], "a": "x"})),
        r#"{"a":"x","b":[{"c":2,"d":1}]}"#
    );
}
