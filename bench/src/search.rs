//! `search`: search throughput and latency over the Synthea patients, at one
//! and at ten times the data.
//!
//! The server is the one `read-heavy` measures: the `haven-api` router with
//! SMART and audit on, over one store, requests sent in process. The Synthea
//! transaction Bundles are loaded once (copy 0, the 1x data set), a fixed mix
//! of searches is measured, then the same bundles are loaded again under new
//! ids until there are `--copies` copies (the 10x data set) and the same mix
//! is measured again. Each mix runs twice per data set: every query with a
//! `system/*.rs` token, and the patient-scoped queries with `patient/*.rs`
//! tokens of the patients they ask about.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use axum::body::Body;
use axum::Router;
use haven_auth::client::ClientKey;
use haven_auth::registry::{ClientAuth, Role, UserRecord};
use haven_auth::server::{pkce_s256, ClientSpec};
use hdrhistogram::Histogram;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::load::{process_cpu, HIGHEST_MICROS, LOWEST_MICROS, SIGNIFICANT_DIGITS};
use crate::setup::{Bench, BASE};
use haven_bench::mix::{query, Kind, Patient};
use haven_bench::synthea;
use synthea::SourceBundle;

/// What the bundles are loaded with when they go through the API.
const LOADER_SCOPE: &str = "system/*.cruds";
/// What the patient-context tokens are asked for.
const PATIENT_SCOPE: &str = "launch/patient patient/*.rs";
const APP_REDIRECT: &str = "https://app.example/callback";
const PKCE_VERIFIER: &str = "haven-bench-search-pkce-verifier-0123456789abcdef";
/// Loading tasks re-mint their token this often; Backend Services tokens live
/// at least five minutes.
const LOADER_TOKEN_AGE: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// `sqlite:<path>` or `postgres://...` naming an empty database; default:
    /// a fresh SQLite file in a temporary directory, removed at the end.
    #[arg(long)]
    database_url: Option<String>,
    /// The shared data folder; the Synthea bundles are in its `synthea/`.
    #[arg(long, env = "HAVEN_SHARED", default_value = "../shared")]
    shared: PathBuf,
    /// Copies of the corpus in the large data set (the small one is one copy).
    #[arg(long, default_value_t = 10)]
    copies: u32,
    /// Length of each measured run.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Warm-up before each measured run, not counted.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Requests in flight at once: one task each.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Patients drawn for the `patient/*.rs` runs, one token each.
    #[arg(long, default_value_t = 16)]
    patient_tokens: u32,
    /// Seeds every random choice: patients, codes, years, kinds.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How the bundles are loaded: `api` posts each transaction Bundle through
    /// the audited router (as `haven load` does, with Provenance and
    /// AuditEvents); `store` writes the resources straight through the store,
    /// one transaction per bundle, as `read-heavy` seeds.
    #[arg(long, value_enum, default_value_t = LoadVia::Api)]
    load_via: LoadVia,
    /// Bundles loaded at once.
    #[arg(long, default_value_t = 2)]
    load_concurrency: u32,
    /// Pause after each load before measuring. PostgreSQL's autovacuum
    /// analyzes freshly loaded tables within about a minute
    /// (`autovacuum_naptime`); until then its plans may be far slower.
    #[arg(long, default_value_t = 0)]
    settle_secs: u64,
    /// Also write the markdown result to this file.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadVia {
    Api,
    Store,
}

/// Who sends requests in a run: a token and the patients its queries are about.
struct Caller {
    authorization: Arc<str>,
    patients: Vec<usize>,
}

/// What one kind of query measured in one run.
#[derive(Debug)]
pub struct KindSample {
    /// 200 answers holding a searchset Bundle.
    pub ok: u64,
    /// Everything else, by what it was ("403", "200 but not a Bundle", ...).
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    /// Latency of every answered request, in microseconds.
    pub latency: Histogram<u64>,
    /// `match` entries in the Bundles of the ok answers.
    pub matches: u64,
}

impl KindSample {
    fn empty() -> Result<Self> {
        Ok(Self {
            ok: 0,
            errors: BTreeMap::new(),
            first_error: None,
            latency: Histogram::new_with_bounds(LOWEST_MICROS, HIGHEST_MICROS, SIGNIFICANT_DIGITS)
                .context("creating a latency histogram")?,
            matches: 0,
        })
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn requests(&self) -> u64 {
        self.ok + self.error_count()
    }

    fn merge(&mut self, other: &KindSample) -> Result<()> {
        self.ok += other.ok;
        self.matches += other.matches;
        for (what, n) in &other.errors {
            *self.errors.entry(what.clone()).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.latency
            .add(&other.latency)
            .context("merging latency histograms")?;
        Ok(())
    }
}

/// One measured run of a mix.
#[derive(Debug)]
pub struct RunSample {
    pub kinds: BTreeMap<Kind, KindSample>,
    pub elapsed: Duration,
    pub cpu: Option<Duration>,
    /// AuditEvents the store gained during the measured run.
    pub audit_events: u64,
}

impl RunSample {
    fn all(&self) -> Result<KindSample> {
        let mut all = KindSample::empty()?;
        for sample in self.kinds.values() {
            all.merge(sample)?;
        }
        Ok(all)
    }
}

/// Runs `concurrency` tasks against `router` until `duration` has passed,
/// each choosing a caller, a kind and a patient per request.
async fn drive_all(
    router: &Router,
    callers: &Arc<Vec<Caller>>,
    kinds: &'static [Kind],
    patients: &Arc<Vec<Patient>>,
    concurrency: u32,
    duration: Duration,
    seed: u64,
) -> Result<RunSample> {
    let cpu_before = process_cpu();
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let rng = fastrand::Rng::with_seed(seed ^ (u64::from(task) << 32));
            tokio::spawn(drive(
                router.clone(),
                callers.clone(),
                kinds,
                patients.clone(),
                rng,
                deadline,
            ))
        })
        .collect();
    let mut kinds_total: BTreeMap<Kind, KindSample> = BTreeMap::new();
    for task in tasks {
        for (kind, sample) in task.await.context("a load task panicked")?? {
            match kinds_total.get_mut(&kind) {
                Some(total) => total.merge(&sample)?,
                None => {
                    kinds_total.insert(kind, sample);
                }
            }
        }
    }
    let elapsed = started.elapsed();
    Ok(RunSample {
        kinds: kinds_total,
        elapsed,
        cpu: process_cpu()
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before)),
        audit_events: 0,
    })
}

async fn drive(
    router: Router,
    callers: Arc<Vec<Caller>>,
    kinds: &'static [Kind],
    patients: Arc<Vec<Patient>>,
    mut rng: fastrand::Rng,
    deadline: Instant,
) -> Result<BTreeMap<Kind, KindSample>> {
    let mut samples = BTreeMap::new();
    for kind in kinds {
        samples.insert(*kind, KindSample::empty()?);
    }
    while Instant::now() < deadline {
        let caller = &callers[rng.usize(..callers.len())];
        let kind = kinds[rng.usize(..kinds.len())];
        let patient = &patients[caller.patients[rng.usize(..caller.patients.len())]];
        let path = query(kind, patient, &mut rng);
        let request = Request::get(path.as_str())
            .header(http::header::AUTHORIZATION, &*caller.authorization)
            .header(http::header::ACCEPT, "application/fhir+json")
            .body(Body::empty())
            .context("building a request")?;
        let sent = Instant::now();
        let response = router.clone().oneshot(request).await?;
        let status = response.status();
        // The body is read to its end: a client pays for it too.
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading a response body")?
            .to_bytes();
        let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
        let sample = samples
            .get_mut(&kind)
            .ok_or_else(|| anyhow!("no sample for {kind:?}"))?;
        sample.latency.saturating_record(micros.max(LOWEST_MICROS));
        let bundle = (status == StatusCode::OK)
            .then(|| serde_json::from_slice::<Value>(&body).ok())
            .flatten()
            .filter(|b| b["resourceType"] == "Bundle" && b["type"] == "searchset");
        match bundle {
            Some(bundle) => {
                sample.ok += 1;
                sample.matches += bundle["entry"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|e| e["search"]["mode"] == "match")
                    .count() as u64;
            }
            None => {
                let what = if status == StatusCode::OK {
                    "200 but not a searchset Bundle".to_owned()
                } else {
                    status.as_u16().to_string()
                };
                *sample.errors.entry(what).or_default() += 1;
                if sample.first_error.is_none() {
                    let text = String::from_utf8_lossy(&body);
                    let text: String = text.chars().take(300).collect();
                    sample.first_error = Some(format!("GET {path}: {status}: {text}"));
                }
            }
        }
    }
    Ok(samples)
}

/// Loading: what went in and how long it took.
#[derive(Debug, Clone)]
pub struct LoadRow {
    pub copies: Range<u32>,
    pub bundles: usize,
    pub resources: usize,
    pub patients: usize,
    pub elapsed: Duration,
}

/// The clients and the user the command registers with the authorization server.
struct Clients {
    loader_id: String,
    loader_key: ClientKey,
    app_id: String,
    practitioner: UserRecord,
}

async fn register(bench: &Bench) -> Result<Clients> {
    let server = bench.server();
    let tag = uuid::Uuid::new_v4();
    let loader_key = ClientKey::generate_ec_p384();
    let (loader, _) = server
        .add_client(ClientSpec {
            name: format!("search benchmark loader {tag}"),
            scopes: LOADER_SCOPE.into(),
            jwks: Some(loader_key.jwks()),
            backend: true,
            organization: Some("Haven benchmarks".into()),
            contacts: vec!["mailto:bench@localhost".into()],
            ..ClientSpec::default()
        })
        .await
        .map_err(|e| anyhow!("registering the loader client: {e}"))?;
    let (app, _) = server
        .add_client(ClientSpec {
            name: format!("search benchmark app {tag}"),
            redirect_uris: vec![APP_REDIRECT.into()],
            scopes: PATIENT_SCOPE.into(),
            auth: Some(ClientAuth::None),
            ..ClientSpec::default()
        })
        .await
        .map_err(|e| anyhow!("registering the app client: {e}"))?;
    let practitioner = server
        .add_user(
            &format!("bench-{}", tag.simple()),
            &format!("bench-password-{}", uuid::Uuid::new_v4().simple()),
            Role::Practitioner,
            Some("Practitioner/bench".into()),
            None,
        )
        .await
        .map_err(|e| anyhow!("adding the practitioner: {e}"))?;
    Ok(Clients {
        loader_id: loader.client_id,
        loader_key,
        app_id: app.client_id,
        practitioner,
    })
}

/// A `patient/*.rs` token for `patient`, through the authorization server's
/// steps: the app asks (with PKCE), the practitioner signs in, picks the
/// patient and approves, the app exchanges the code.
async fn patient_token(bench: &Bench, clients: &Clients, patient: &str) -> Result<String> {
    let server = bench.server();
    let form = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let challenge = pkce_s256(PKCE_VERIFIER);
    let pending = server
        .begin_authorization(&form(&[
            ("response_type", "code"),
            ("client_id", &clients.app_id),
            ("redirect_uri", APP_REDIRECT),
            ("scope", PATIENT_SCOPE),
            ("state", "bench"),
            ("aud", BASE),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ]))
        .await
        .map_err(|e| anyhow!("authorization request: {e:?}"))?;
    let session = uuid::Uuid::new_v4().to_string();
    let pending = server
        .attach_user(pending, &clients.practitioner, &session)
        .await
        .map_err(|e| anyhow!("signing in: {e}"))?;
    let pending = server
        .choose_patient(pending, patient)
        .await
        .map_err(|e| anyhow!("choosing Patient/{patient}: {e}"))?;
    let redirect = server
        .approve(&pending, &pending.scopes)
        .await
        .map_err(|e| anyhow!("approving: {e}"))?;
    let code = redirect
        .split_once('?')
        .map_or("", |(_, q)| q)
        .split('&')
        .find_map(|pair| pair.strip_prefix("code="))
        .ok_or_else(|| anyhow!("the approval gave no code: {redirect}"))?;
    let answer = server
        .token(
            &form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", APP_REDIRECT),
                ("client_id", &clients.app_id),
                ("code_verifier", PKCE_VERIFIER),
            ]),
            None,
        )
        .await
        .map_err(|e| anyhow!("exchanging the code: {e}"))?;
    ensure!(
        answer["patient"] == patient,
        "the token is for patient {}, not {patient}",
        answer["patient"]
    );
    answer["access_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the token answer has no access_token"))
}

/// Loads copies `copies` of the corpus, `concurrency` bundles at a time, and
/// returns the patients loaded (in job order: deterministic).
async fn load(
    bench: &Arc<Bench>,
    clients: &Arc<Clients>,
    corpus: &Arc<Vec<SourceBundle>>,
    copies: Range<u32>,
    via: LoadVia,
    concurrency: u32,
) -> Result<(Vec<Patient>, LoadRow)> {
    let jobs: Arc<Vec<(u32, usize)>> = Arc::new(
        copies
            .clone()
            .flat_map(|copy| (0..corpus.len()).map(move |no| (copy, no)))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (bench, clients, corpus, jobs, next) = (
                bench.clone(),
                clients.clone(),
                corpus.clone(),
                jobs.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                let mut loaded: Vec<(usize, Patient)> = Vec::new();
                let mut token: Option<(String, Instant)> = None;
                let total = jobs.len();
                loop {
                    let job = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(copy, no)) = jobs.get(job) else {
                        break;
                    };
                    let source = &corpus[no];
                    let copied = synthea::copy(&source.bundle, copy, u32::try_from(no)?)
                        .with_context(|| format!("copying {}", source.name))?;
                    let facts = synthea::patient_facts(&copied)
                        .with_context(|| format!("reading {}", source.name))?;
                    let id = match via {
                        LoadVia::Api => {
                            if token
                                .as_ref()
                                .is_none_or(|(_, at)| at.elapsed() > LOADER_TOKEN_AGE)
                            {
                                let fresh = bench
                                    .backend_token(
                                        &clients.loader_id,
                                        &clients.loader_key,
                                        LOADER_SCOPE,
                                    )
                                    .await?;
                                token = Some((fresh, Instant::now()));
                            }
                            let (bearer, _) = token.as_ref().expect("minted above");
                            let answer = post_bundle(&bench.audit_on, bearer, &copied)
                                .await
                                .with_context(|| {
                                    format!("loading copy {copy} of {}", source.name)
                                })?;
                            match &facts {
                                Some(facts) => Some(patient_id(&answer, facts.entry)?),
                                None => None,
                            }
                        }
                        LoadVia::Store => {
                            write_bundle(&bench, &copied).await.with_context(|| {
                                format!("writing copy {copy} of {}", source.name)
                            })?;
                            facts.as_ref().map(|f| f.bundle_id.clone())
                        }
                    };
                    if let (Some(facts), Some(id)) = (facts, id) {
                        loaded.push((
                            job,
                            Patient {
                                id,
                                family: facts.family,
                                codes: facts.codes,
                                years: facts.years,
                            },
                        ));
                    }
                    if (job + 1) % 100 == 0 {
                        eprintln!(
                            "  {} of {total} bundles in {:.0} s",
                            job + 1,
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
                anyhow::Ok(loaded)
            })
        })
        .collect();
    let mut loaded = Vec::new();
    for worker in workers {
        loaded.extend(worker.await.context("a loading task panicked")??);
    }
    let elapsed = started.elapsed();
    loaded.sort_by_key(|(job, _)| *job);
    let patients: Vec<Patient> = loaded.into_iter().map(|(_, p)| p).collect();
    let per_copy: usize = corpus.iter().map(|b| b.entries).sum();
    let n_copies = copies.len();
    Ok((
        patients.clone(),
        LoadRow {
            copies,
            bundles: jobs.len(),
            resources: per_copy * n_copies,
            patients: patients.len(),
            elapsed,
        },
    ))
}

/// Posts one transaction Bundle through the router; every entry must be created.
async fn post_bundle(router: &Router, token: &str, bundle: &Value) -> Result<Value> {
    let body = serde_json::to_vec(bundle).context("serializing a bundle")?;
    let request = Request::post("/fhir")
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::CONTENT_TYPE, "application/fhir+json")
        .header(http::header::ACCEPT, "application/fhir+json")
        .body(Body::from(body))
        .context("building a request")?;
    let response = router.clone().oneshot(request).await?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .context("reading a response body")?
        .to_bytes();
    if status != StatusCode::OK {
        let text: String = String::from_utf8_lossy(&bytes).chars().take(500).collect();
        bail!("the transaction was answered {status}: {text}");
    }
    let answer: Value = serde_json::from_slice(&bytes).context("parsing the answer")?;
    let sent = bundle["entry"].as_array().map_or(0, Vec::len);
    let entries = answer["entry"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    ensure!(
        entries.len() == sent,
        "{} entries answered for {sent} sent",
        entries.len()
    );
    for entry in entries {
        let status = entry["response"]["status"].as_str().unwrap_or_default();
        ensure!(
            status.starts_with("201"),
            "an entry was answered {status:?}"
        );
    }
    Ok(answer)
}

/// The id the server gave the Patient of entry `index`, from its location.
fn patient_id(answer: &Value, index: usize) -> Result<String> {
    let location = answer["entry"][index]["response"]["location"]
        .as_str()
        .ok_or_else(|| anyhow!("the Patient's entry has no location"))?;
    location
        .split("Patient/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no Patient id in location {location}"))
}

/// Writes one copied bundle straight through the store, in one transaction.
async fn write_bundle(bench: &Bench, copied: &Value) -> Result<()> {
    let mut tx = bench.store.begin().await?;
    for (ty, id, resource) in synthea::resolved(copied)? {
        tx.create(&ty, &id, resource)
            .await
            .with_context(|| format!("creating {ty}/{id}"))?;
    }
    tx.commit().await?;
    Ok(())
}

/// One line of the results: one kind of query (or all of them) in one run.
#[derive(Debug, Clone)]
pub struct Row {
    pub data: String,
    pub token: &'static str,
    pub kind: Option<Kind>,
    pub requests: u64,
    pub errors: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub matches_per_answer: f64,
    pub cpu_cores: Option<f64>,
    pub audit_events: Option<u64>,
    pub first_error: Option<String>,
}

impl Row {
    fn new(
        data: &str,
        token: &'static str,
        kind: Option<Kind>,
        sample: &KindSample,
        run: &RunSample,
    ) -> Self {
        let ms = |q: f64| sample.latency.value_at_quantile(q) as f64 / 1000.0;
        let seconds = run.elapsed.as_secs_f64().max(f64::EPSILON);
        Self {
            data: data.to_owned(),
            token,
            kind,
            requests: sample.requests(),
            errors: sample.error_count(),
            per_second: sample.ok as f64 / seconds,
            p50_ms: ms(0.50),
            p99_ms: ms(0.99),
            matches_per_answer: sample.matches as f64 / sample.ok.max(1) as f64,
            cpu_cores: kind
                .is_none()
                .then(|| run.cpu.map(|cpu| cpu.as_secs_f64() / seconds))
                .flatten(),
            audit_events: kind.is_none().then_some(run.audit_events),
            first_error: sample.first_error.as_ref().map(|e| {
                format!(
                    "{} errors {:?}; the first: {e}",
                    sample.error_count(),
                    sample.errors
                )
            }),
        }
    }
}

/// Everything the report needs besides the rows.
#[derive(Debug, Clone)]
pub struct Setup {
    pub database: String,
    pub corpus: String,
    pub bundles_per_copy: usize,
    pub resources_per_copy: usize,
    pub patients_per_copy: usize,
    pub copies: u32,
    pub via: LoadVia,
    pub load_concurrency: u32,
    pub settle_secs: u64,
    pub duration_secs: u64,
    pub warmup_secs: u64,
    pub concurrency: u32,
    pub patient_tokens: u32,
    pub seed: u64,
}

pub async fn run(args: Args) -> Result<()> {
    ensure!(args.duration_secs > 0, "--duration-secs must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.copies > 0, "--copies must be at least 1");
    ensure!(
        args.patient_tokens > 0,
        "--patient-tokens must be at least 1"
    );
    let corpus_dir = args.shared.join("synthea");
    eprintln!("reading {}", corpus_dir.display());
    let corpus = Arc::new(synthea::read(&corpus_dir)?);
    ensure!(!corpus.is_empty(), "no bundles in {}", corpus_dir.display());

    let scratch = tempfile::tempdir().context("creating a temporary directory")?;
    let (database_url, database) = match &args.database_url {
        Some(url) => (url.clone(), crate::describe(url)?),
        None => (
            format!("sqlite:{}", scratch.path().join("bench.db").display()),
            "SQLite, a fresh file in a temporary directory".to_owned(),
        ),
    };
    let duration = Duration::from_secs(args.duration_secs);
    let warmup = Duration::from_secs(args.warmup_secs);
    let token_lifetime = time::Duration::try_from(duration + warmup)
        .context("--duration-secs is too large")?
        + time::Duration::minutes(1);
    let bench = Arc::new(Bench::start(&database_url, token_lifetime).await?);
    let clients = Arc::new(register(&bench).await?);

    let mut setup = Setup {
        database,
        corpus: corpus_dir.display().to_string(),
        bundles_per_copy: corpus.len(),
        resources_per_copy: corpus.iter().map(|b| b.entries).sum(),
        patients_per_copy: 0,
        copies: args.copies,
        via: args.load_via,
        load_concurrency: args.load_concurrency,
        settle_secs: args.settle_secs,
        duration_secs: args.duration_secs,
        warmup_secs: args.warmup_secs,
        concurrency: args.concurrency,
        patient_tokens: args.patient_tokens,
        seed: args.seed,
    };
    let mut loads = Vec::new();
    let mut rows = Vec::new();
    let mut patients: Vec<Patient> = Vec::new();
    let phases = [
        (0..1, "1x".to_owned()),
        (1..args.copies, format!("{}x", args.copies)),
    ];
    for (copies, label) in phases {
        if !copies.is_empty() {
            eprintln!(
                "loading copies {}..{} of {} bundles ({} resources each) via {:?}",
                copies.start,
                copies.end,
                corpus.len(),
                setup.resources_per_copy,
                args.load_via
            );
            let (more, row) = load(
                &bench,
                &clients,
                &corpus,
                copies.clone(),
                args.load_via,
                args.load_concurrency,
            )
            .await?;
            eprintln!(
                "loaded {} bundles, {} resources, {} patients in {:.1} s",
                row.bundles,
                row.resources,
                row.patients,
                row.elapsed.as_secs_f64()
            );
            if copies.start == 0 {
                setup.patients_per_copy = more.len();
            }
            patients.extend(more);
            loads.push(row);
            if args.settle_secs > 0 {
                eprintln!("settling for {} s", args.settle_secs);
                tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
            }
        } else if copies.start > 0 {
            // --copies 1: there is no second data set.
            continue;
        }
        let catalog: Arc<Vec<Patient>> = Arc::new(
            patients
                .iter()
                .filter(|p| !p.codes.is_empty() && !p.years.is_empty())
                .cloned()
                .collect(),
        );
        ensure!(!catalog.is_empty(), "no loaded patient has Observations");
        if catalog.len() < patients.len() {
            eprintln!(
                "{} of {} patients have no dated LOINC Observations and are not asked about",
                patients.len() - catalog.len(),
                patients.len()
            );
        }
        for variant in [Variant::System, Variant::Patient] {
            let (token, kinds, callers) = match variant {
                Variant::System => (
                    "system/*.rs",
                    &Kind::ALL[..],
                    vec![Caller {
                        authorization: format!("Bearer {}", bench.token().await?).into(),
                        patients: (0..catalog.len()).collect(),
                    }],
                ),
                Variant::Patient => {
                    let mut rng = fastrand::Rng::with_seed(args.seed);
                    let mut chosen: Vec<usize> = (0..catalog.len()).collect();
                    rng.shuffle(&mut chosen);
                    chosen.truncate(args.patient_tokens as usize);
                    chosen.sort_unstable();
                    let mut callers = Vec::with_capacity(chosen.len());
                    for index in chosen {
                        let token = patient_token(&bench, &clients, &catalog[index].id).await?;
                        callers.push(Caller {
                            authorization: format!("Bearer {token}").into(),
                            patients: vec![index],
                        });
                    }
                    ("patient/*.rs", &Kind::PATIENT_SCOPED[..], callers)
                }
            };
            let callers = Arc::new(callers);
            eprintln!(
                "{label}: {} patients, {token} ({} token(s)): warming up {} s",
                catalog.len(),
                callers.len(),
                args.warmup_secs
            );
            let seed = args.seed ^ (u64::from(variant == Variant::Patient) << 16);
            if !warmup.is_zero() {
                let warm = drive_all(
                    &bench.audit_on,
                    &callers,
                    kinds,
                    &catalog,
                    args.concurrency,
                    warmup,
                    seed ^ 0xffff,
                )
                .await?;
                let all = warm.all()?;
                if all.ok == 0 {
                    bail!(
                        "{label}, {token}: no request succeeded during the warm-up; first error: {}",
                        all.first_error.as_deref().unwrap_or("none")
                    );
                }
            }
            let before = bench.audit_events().await?;
            let mut sample = drive_all(
                &bench.audit_on,
                &callers,
                kinds,
                &catalog,
                args.concurrency,
                duration,
                seed,
            )
            .await?;
            let after = bench.audit_events().await?;
            sample.audit_events = after
                .checked_sub(before)
                .context("the number of AuditEvents went down during a run")?;
            let all = sample.all()?;
            if sample.audit_events < all.requests() {
                bail!(
                    "{label}, {token}: {} requests were answered but only {} AuditEvents were stored",
                    all.requests(),
                    sample.audit_events
                );
            }
            let overall = Row::new(&label, token, None, &all, &sample);
            eprintln!(
                "{label}, {token}: {} requests, {} errors, {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} AuditEvents",
                overall.requests,
                overall.errors,
                overall.per_second,
                overall.p50_ms,
                overall.p99_ms,
                sample.audit_events
            );
            for (kind, kind_sample) in &sample.kinds {
                let row = Row::new(&label, token, Some(*kind), kind_sample, &sample);
                eprintln!(
                    "  {kind:?}: {} requests, {} errors, {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {:.1} matches",
                    row.requests, row.errors, row.per_second, row.p50_ms, row.p99_ms, row.matches_per_answer
                );
                rows.push(row);
            }
            rows.push(overall);
        }
    }

    let text = markdown(&setup, &loads, &rows);
    print!("{text}");
    if let Some(path) = &args.output {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    System,
    Patient,
}

/// p50(large) / p50(small) above this is called out.
const RATIO_FLAG: f64 = 1.5;

pub fn markdown(setup: &Setup, loads: &[LoadRow], rows: &[Row]) -> String {
    let mut out = String::new();
    let via = match setup.via {
        LoadVia::Api => "the API: each transaction Bundle posted through the audited router with a `system/*.cruds` token, as `haven load` sends it (Provenance and AuditEvents written)",
        LoadVia::Store => "the store: each bundle's resources created in one store transaction, references resolved as the server would (no Provenance, no AuditEvents)",
    };
    let _ = writeln!(out, "Database: {}  ", setup.database);
    let _ = writeln!(
        out,
        "Data: {} ({} bundles, {} resources, {} patients per copy); 1x is copy 0, {}x adds copies 1 to {} under new ids with identifier values suffixed `-<copy>`  ",
        setup.corpus,
        setup.bundles_per_copy,
        setup.resources_per_copy,
        setup.patients_per_copy,
        setup.copies,
        setup.copies.saturating_sub(1)
    );
    let _ = writeln!(
        out,
        "Loaded through {via}, {} bundles at a time; runs start {} s after each load  ",
        setup.load_concurrency, setup.settle_secs
    );
    let _ = writeln!(
        out,
        "Load: {} tasks for {} s per run after {} s of warm-up, audit on; seed {}; `patient/*.rs` runs use the tokens of {} patients drawn with the seed",
        setup.concurrency, setup.duration_secs, setup.warmup_secs, setup.seed, setup.patient_tokens
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "| query | template |");
    let _ = writeln!(out, "|:---|:---|");
    for kind in Kind::ALL {
        // A `|` would end the table cell, even in code.
        let _ = writeln!(
            out,
            "| {kind:?} | `{}` |",
            kind.template().replace('|', "\\|")
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| loaded | bundles | resources | patients | seconds | resources/s |"
    );
    let _ = writeln!(out, "|:---|---:|---:|---:|---:|---:|");
    for load in loads {
        let _ = writeln!(
            out,
            "| copies {}..{} | {} | {} | {} | {:.1} | {:.0} |",
            load.copies.start,
            load.copies.end,
            load.bundles,
            load.resources,
            load.patients,
            load.elapsed.as_secs_f64(),
            load.resources as f64 / load.elapsed.as_secs_f64().max(f64::EPSILON)
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| data | token | query | requests | errors | req/s | p50 ms | p99 ms | matches/answer | CPU (cores) | AuditEvents stored |"
    );
    let _ = writeln!(
        out,
        "|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {} |",
            row.data,
            row.token,
            row.kind
                .map_or_else(|| "**all**".to_owned(), |k| format!("{k:?}")),
            row.requests,
            row.errors,
            row.per_second,
            row.p50_ms,
            row.p99_ms,
            row.matches_per_answer,
            row.cpu_cores
                .map_or_else(String::new, |c| format!("{c:.2}")),
            row.audit_events.map_or_else(String::new, |n| n.to_string()),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "req/s counts 200 answers holding a searchset Bundle (anything else is an error), per kind over the whole run, so the kinds add up to **all**; latencies are of every request, from sending it into the router to the end of its body; matches/answer counts `match` entries (pages hold at most 50); CPU is the whole process (server and load) per second of the run.\n"
    );
    let small = "1x";
    let large = format!("{}x", setup.copies);
    let mut flagged = Vec::new();
    if setup.copies > 1 && rows.iter().any(|r| r.data == large) {
        let _ = writeln!(
            out,
            "| token | query | p50 {small} ms | p50 {large} ms | p50 {large}/{small} | p99 {small} ms | p99 {large} ms |"
        );
        let _ = writeln!(out, "|:---|:---|---:|---:|---:|---:|---:|");
        for row in rows.iter().filter(|r| r.data == small) {
            let Some(big) = rows
                .iter()
                .find(|r| r.data == large && r.token == row.token && r.kind == row.kind)
            else {
                continue;
            };
            let ratio = big.p50_ms / row.p50_ms.max(f64::EPSILON);
            let name = row
                .kind
                .map_or_else(|| "**all**".to_owned(), |k| format!("{k:?}"));
            let shown = if ratio > RATIO_FLAG {
                if let Some(kind) = row.kind {
                    flagged.push(format!(
                        "{kind:?} with {} (`{}`): p50 {:.2} ms at {small}, {:.2} ms at {large}, {ratio:.2}x",
                        row.token,
                        kind.template(),
                        row.p50_ms,
                        big.p50_ms
                    ));
                }
                format!("**{ratio:.2}**")
            } else {
                format!("{ratio:.2}")
            };
            let _ = writeln!(
                out,
                "| {} | {name} | {:.2} | {:.2} | {shown} | {:.2} | {:.2} |",
                row.token, row.p50_ms, big.p50_ms, row.p99_ms, big.p99_ms
            );
        }
        let _ = writeln!(out);
        if flagged.is_empty() {
            let _ = writeln!(
                out,
                "No query's p50 at {large} is more than {RATIO_FLAG} times its p50 at {small}."
            );
        } else {
            let _ = writeln!(
                out,
                "p50 at {large} more than {RATIO_FLAG} times p50 at {small}:\n"
            );
            for line in flagged {
                let _ = writeln!(out, "- {line}");
            }
        }
    }
    let errors: Vec<_> = rows
        .iter()
        .filter_map(|r| {
            r.first_error
                .as_ref()
                .zip(r.kind)
                .map(|(e, k)| format!("- {}, {}, {k:?}: {e}", r.data, r.token))
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "\nErrors:\n");
        for line in errors {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patient() -> Patient {
        Patient {
            id: "abc-1".into(),
            family: "Ordóñez".into(),
            codes: vec!["8302-2".into()],
            years: vec![2016],
        }
    }

    #[test]
    fn queries_follow_their_templates() {
        let mut rng = fastrand::Rng::with_seed(1);
        let p = patient();
        assert_eq!(
            query(Kind::ObservationByCode, &p, &mut rng),
            "/fhir/Observation?subject=Patient/abc-1&code=http%3A%2F%2Floinc.org%7C8302-2"
        );
        assert_eq!(
            query(Kind::ObservationByDate, &p, &mut rng),
            "/fhir/Observation?subject=Patient/abc-1&date=ge2016-01-01&date=lt2017-01-01"
        );
        assert_eq!(
            query(Kind::ConditionByPatient, &p, &mut rng),
            "/fhir/Condition?subject=Patient/abc-1"
        );
        assert_eq!(
            query(Kind::PatientByName, &p, &mut rng),
            "/fhir/Patient?name=Ord%C3%B3"
        );
        for kind in Kind::ALL {
            let path = query(kind, &p, &mut rng);
            assert!(path.parse::<http::Uri>().is_ok(), "{path}");
        }
    }

    #[test]
    fn the_location_of_a_created_patient_gives_its_id() {
        let answer = serde_json::json!({"entry": [
            {"response": {"status": "201 Created", "location": "https://localhost/fhir/Organization/o/_history/1"}},
            {"response": {"status": "201 Created", "location": "https://localhost/fhir/Patient/p-7/_history/1"}}
        ]});
        assert_eq!(patient_id(&answer, 1).unwrap(), "p-7");
        assert!(patient_id(&answer, 0).is_err());
    }

    fn row(data: &str, kind: Option<Kind>, p50_ms: f64) -> Row {
        Row {
            data: data.into(),
            token: "system/*.rs",
            kind,
            requests: 100,
            errors: 0,
            per_second: 10.0,
            p50_ms,
            p99_ms: p50_ms * 2.0,
            matches_per_answer: 3.0,
            cpu_cores: None,
            audit_events: kind.is_none().then_some(100),
            first_error: None,
        }
    }

    #[test]
    fn the_report_gives_the_ratio_and_names_the_slow_queries() {
        let setup = Setup {
            database: "SQLite".into(),
            corpus: "shared/synthea".into(),
            bundles_per_copy: 102,
            resources_per_copy: 11863,
            patients_per_copy: 100,
            copies: 10,
            via: LoadVia::Store,
            load_concurrency: 2,
            settle_secs: 0,
            duration_secs: 10,
            warmup_secs: 2,
            concurrency: 16,
            patient_tokens: 16,
            seed: 1,
        };
        let rows = [
            row("1x", Some(Kind::ConditionByPatient), 2.0),
            row("1x", Some(Kind::PatientByName), 2.0),
            row("1x", None, 2.0),
            row("10x", Some(Kind::ConditionByPatient), 2.5),
            row("10x", Some(Kind::PatientByName), 8.0),
            row("10x", None, 5.0),
        ];
        let text = markdown(&setup, &[], &rows);
        assert!(
            text.contains("| system/*.rs | ConditionByPatient | 2.00 | 2.50 | 1.25 |"),
            "{text}"
        );
        assert!(
            text.contains("| system/*.rs | PatientByName | 2.00 | 8.00 | **4.00** |"),
            "{text}"
        );
        assert!(
            text.contains("- PatientByName with system/*.rs (`Patient?name="),
            "{text}"
        );
        assert!(!text.contains("- ConditionByPatient with"), "{text}");
    }
}
