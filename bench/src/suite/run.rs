//! One backend's measurements, in order: P3 (ingest of the 100 Synthea
//! patients), P1 (reads) and its ceiling, P2 (creates) and its ceiling, P4 at
//! 1x, P5 (tokens), the other copies of the corpus, P4 at 10x, and P6 (the
//! server's peak memory over all of it).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use haven_auth::client::ClientKey;
use haven_bench::mix::{query, Kind, Patient};
use haven_bench::process;
use haven_bench::synthea::{self, SourceBundle};
use haven_e2e::{haven_binary, spawn_haven, Haven, HavenOptions, PostgresDatabase};
use http::Request;
use http_body_util::Full;
use serde_json::{json, Value};

use crate::ceiling::{self, CeilingServer, CreateRows};
use crate::drive::{self, Load, MakeRequest, Target};
use crate::machine::Machine;
use crate::smart::{self, PatientLogin};
use crate::Args;

/// Scopes of the Backend Services client that loads, creates and searches.
const LOADER_SCOPE: &str = "system/*.cruds";
/// Scopes of the searches of P4.
const SEARCH_SCOPE: &str = "system/*.rs";
/// Scopes of the app a patient signs in to for P1.
const APP_SCOPE: &str = "launch/patient openid fhirUser patient/*.rs";
/// The Synthea identifier system, which names each patient across copies.
const SYNTHEA_ID: &str = "https://github.com/synthetichealth/synthea";
/// The configuration the server runs with: production defaults, but for the
/// token endpoint's per-address rate limit, which P5 would otherwise measure.
const CONFIG: &str = "[limits]\ntoken_requests_per_minute = 10000000\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Sqlite,
    Postgres,
}

/// What a target asks of a result.
#[derive(Debug, Clone, Copy, Default)]
pub struct Goal {
    pub min_per_second: Option<f64>,
    pub max_p99_ms: Option<f64>,
}

/// One measured line.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: String,
    pub what: String,
    pub unit: &'static str,
    pub requests: u64,
    pub errors: u64,
    pub per_second: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The row this one is compared with (its ceiling), by id.
    pub ceiling: Option<String>,
    pub goal: Goal,
    /// Cores the server (or ceiling) used during the measured time.
    pub server_cores: Option<f64>,
    /// Cores the load generator used.
    pub generator_cores: Option<f64>,
    pub first_error: Option<String>,
}

pub struct BackendReport {
    pub kind: BackendKind,
    pub rows: Vec<Row>,
    /// The server's resident memory after each phase, and its peak (`VmHWM`).
    pub memory: Vec<(String, u64)>,
    pub peak_rss_kib: u64,
    pub notes: Vec<String>,
}

pub struct Report {
    pub machine: Machine,
    pub started: String,
    pub finished: String,
    pub backends: Vec<BackendReport>,
}

pub async fn all(args: Args) -> Result<Report> {
    let started = now();
    let scratch = tempfile::Builder::new().prefix("haven-bench-").tempdir()?;
    let machine = Machine::read(scratch.path())?;
    eprintln!(
        "machine: {} cores, {} MiB, {}, {:.0} fsyncs/s; commit {}",
        machine.cores,
        machine.memory_kib / 1024,
        machine.cpu,
        machine.fsyncs_per_second,
        machine.commit
    );
    let corpus = Arc::new(
        synthea::read(&args.shared_dir().join("synthea")).with_context(|| {
            format!(
                "reading the Synthea bundles under {} (give --shared or HAVEN_SHARED)",
                args.shared_dir().display()
            )
        })?,
    );
    // Copies 1.. of the corpus, as files `haven load` reads, written once.
    let copies_dir = scratch.path().join("copies");
    write_copies(&corpus, 1..args.copies, &copies_dir)?;
    // The binary under test, built with the suite's own profile.
    let binary = release_binary()?;
    // haven-e2e runs the binary this variable names.
    std::env::set_var("HAVEN_BIN", &binary);
    let mut backends = Vec::new();
    for kind in &args.backends {
        eprintln!("== {kind:?}");
        backends.push(backend(&args, *kind, &corpus, &copies_dir).await?);
    }
    Ok(Report {
        machine,
        started,
        finished: now(),
        backends,
    })
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `haven` beside this executable (`cargo build --release -p haven` puts it there).
fn release_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let binary = exe.with_file_name("haven");
    ensure!(
        binary.is_file(),
        "{} is missing: build it with `cargo build --release -p haven -p haven-bench` (bench/run does)",
        binary.display()
    );
    Ok(binary)
}

fn write_copies(corpus: &[SourceBundle], copies: std::ops::Range<u32>, dir: &Path) -> Result<()> {
    for copy in copies {
        let copy_dir = dir.join(format!("copy-{copy}"));
        std::fs::create_dir_all(&copy_dir)?;
        for (no, source) in corpus.iter().enumerate() {
            let copied = synthea::copy(&source.bundle, copy, u32::try_from(no)?)
                .with_context(|| format!("copying {}", source.name))?;
            std::fs::write(copy_dir.join(&source.name), serde_json::to_vec(&copied)?)?;
        }
    }
    Ok(())
}

/// A fresh database of the backend for the store ceilings, with its URL; the
/// temporary directory holds a SQLite file.
fn raw_database(
    kind: BackendKind,
    args: &Args,
) -> Result<(Option<PostgresDatabase>, tempfile::TempDir, String)> {
    let db = database(kind, args)?;
    let scratch = tempfile::Builder::new()
        .prefix("haven-bench-raw-")
        .tempdir()?;
    let url = match &db {
        Some(db) => db.url.clone(),
        None => format!("sqlite:{}", scratch.path().join("raw.db").display()),
    };
    Ok((db, scratch, url))
}

/// A fresh database for the backend: SQLite in the data directory (the
/// server's default), or a new PostgreSQL database dropped afterwards.
fn database(kind: BackendKind, args: &Args) -> Result<Option<PostgresDatabase>> {
    match kind {
        BackendKind::Sqlite => Ok(None),
        BackendKind::Postgres => {
            std::env::set_var("HAVEN_TEST_POSTGRES_URL", &args.postgres_url);
            match PostgresDatabase::create()? {
                Ok(db) => Ok(Some(db)),
                Err(reason) => bail!("PostgreSQL is not available: {reason}"),
            }
        }
    }
}

async fn backend(
    args: &Args,
    kind: BackendKind,
    corpus: &Arc<Vec<SourceBundle>>,
    copies_dir: &Path,
) -> Result<BackendReport> {
    let db = database(kind, args)?;
    let data_dir = tempfile::Builder::new()
        .prefix("haven-bench-data-")
        .tempdir()?;
    std::fs::write(data_dir.path().join("haven.toml"), CONFIG)?;
    let haven = spawn_haven(HavenOptions {
        data_dir: Some(data_dir.path().to_path_buf()),
        database_url: db.as_ref().map(|d| d.url.clone()),
        ..HavenOptions::default()
    })
    .await?;
    let mut report = BackendReport {
        kind,
        rows: Vec::new(),
        memory: Vec::new(),
        peak_rss_kib: 0,
        notes: Vec::new(),
    };
    let result = measure(args, &haven, corpus, copies_dir, &mut report).await;
    if let Err(err) = &result {
        eprintln!("the server's log ends:\n{}", tail(&haven.log(), 40));
        return Err(anyhow!("{err:#}"));
    }
    report.peak_rss_kib = process::peak_rss_kib(haven.pid()).unwrap_or(0);
    drop(haven);
    drop(db);
    Ok(report)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A registered Backend Services client and its key.
struct Backend {
    client_id: String,
    key: ClientKey,
    key_file: PathBuf,
}

/// Runs `haven` with `args` (and the server's database), `stdin` on its input;
/// returns what it printed.
fn haven_command(haven: &Haven, args: &[&str], stdin: &str) -> Result<String> {
    let mut command = Command::new(haven_binary()?);
    command.args(args).arg("--data-dir").arg(&haven.data_dir);
    if let Some(url) = &haven.database_url {
        command.arg("--database-url").arg(url);
    }
    let mut child = command
        .env_remove("HAVEN_DATABASE_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("haven's input")?
        .write_all(stdin.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "haven {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Registers a Backend Services client with the CLI; without `clearance` it
/// has the site's default clearance for such clients.
fn register_backend(
    haven: &Haven,
    file_stem: &str,
    name: &str,
    scope: &str,
    clearance: Option<&str>,
) -> Result<Backend> {
    // EC keys sign faster than RSA ones, so that P5 measures the server, not the signing.
    let key = ClientKey::generate_ec_p384();
    let key_file = haven.data_dir.join(format!("{file_stem}.pem"));
    let jwks_file = haven.data_dir.join(format!("{file_stem}.jwks.json"));
    std::fs::write(&key_file, key.to_pem())?;
    std::fs::write(&jwks_file, key.jwks().to_string())?;
    let jwks_path = jwks_file.display().to_string();
    let mut args = vec![
        "clients",
        "add",
        "--name",
        name,
        "--backend",
        "--jwks",
        &jwks_path,
        "--scope",
        scope,
        "--organization",
        "Haven benchmarks",
        "--contact",
        "bench@haven.invalid",
    ];
    if let Some(clearance) = clearance {
        args.extend(["--clearance", clearance]);
    }
    let printed = haven_command(haven, &args, "")?;
    let client: Value = serde_json::from_str(&printed)?;
    Ok(Backend {
        client_id: client["client_id"]
            .as_str()
            .context("the printed client has an id")?
            .to_owned(),
        key,
        key_file,
    })
}

/// Registers the app and a patient user for `patient`; returns the app's id.
fn register_patient_app(haven: &Haven, patient: &str, password: &str) -> Result<String> {
    let printed = haven_command(
        haven,
        &[
            "clients",
            "add",
            "--name",
            "Benchmark app",
            "--redirect-uri",
            smart::APP_REDIRECT,
            "--scope",
            APP_SCOPE,
            "--public",
        ],
        "",
    )?;
    let app: Value = serde_json::from_str(&printed)?;
    haven_command(
        haven,
        &[
            "users",
            "add",
            "--username",
            "bench-patient",
            "--role",
            "patient",
            "--fhir-user",
            &format!("Patient/{patient}"),
        ],
        password,
    )?;
    app["client_id"]
        .as_str()
        .map(str::to_owned)
        .context("the printed app has an id")
}

/// The server as the load generator and setup steps reach it.
struct Server {
    http: reqwest::Client,
    /// `https://127.0.0.1:PORT`.
    origin: String,
    /// The FHIR base the server announces (tokens' audience).
    announced_base: String,
    target: Target,
    host: String,
    token_url: String,
    pid: u32,
}

impl Server {
    /// A Backend Services token of `client` for `scope`.
    async fn token(&self, client: &Backend, scope: &str) -> Result<String> {
        smart::backend_token(
            &self.http,
            &self.origin,
            &self.token_url,
            &client.key,
            &client.client_id,
            scope,
        )
        .await
    }

    async fn fetch(&self, path: &str, token: &str) -> Result<Value> {
        let answer = self
            .http
            .get(format!("{}{path}", self.origin))
            .bearer_auth(token)
            .send()
            .await?;
        let status = answer.status();
        let body: Value = answer.json().await?;
        ensure!(status.is_success(), "GET {path} answered {status}: {body}");
        Ok(body)
    }
}

async fn measure(
    args: &Args,
    haven: &Haven,
    corpus: &Arc<Vec<SourceBundle>>,
    copies_dir: &Path,
    report: &mut BackendReport,
) -> Result<()> {
    let ca = haven.ca_pem.clone().context("the server runs HTTPS")?;
    let http = smart::http_client(&ca)?;
    let origin = format!("https://{}", haven.addr);
    let token_url = smart::token_endpoint(&http, &haven.base_url).await?;
    let server = Server {
        http,
        origin: origin.clone(),
        announced_base: haven.announced_base_url.clone(),
        target: Target::new(haven.addr, &ca)?,
        host: haven.addr.to_string(),
        token_url,
        pid: haven.pid(),
    };
    let load = Load {
        concurrency: args.concurrency,
        warmup: args.warmup(),
        duration: args.duration(),
        seed: args.seed,
    };
    // The loader writes every resource, labeled or not, so it is cleared for all.
    let loader = register_backend(
        haven,
        "bench-loader",
        "Benchmark loader",
        LOADER_SCOPE,
        Some("V:*"),
    )?;
    // The searcher has the default clearance, so its searches leave out what
    // labels hide and say when they did, as most callers' do.
    let searcher = register_backend(
        haven,
        "bench-searcher",
        "Benchmark searcher",
        SEARCH_SCOPE,
        None,
    )?;

    // P3: the 100 patients through `haven load`.
    let synthea_dir = args.shared_dir().join("synthea");
    let resources_1x: usize = corpus.iter().map(|b| b.entries).sum();
    let mut row = ingest(
        haven,
        &loader,
        &[synthea_dir.as_path()],
        resources_1x,
        args.load_concurrency,
        "P3",
        "ingest: the Synthea bundles through `haven load` (1x)",
    )?;
    row.ceiling = Some("C3".into());
    report.rows.push(row);
    remember_memory(report, &server, "after P3 (1x loaded)");

    let search_token = server.token(&loader, SEARCH_SCOPE).await?;
    let patients = find_patients(&server, &search_token, corpus, 1).await?;
    ensure!(!patients.is_empty(), "no patients were loaded");

    // P1: a patient reads their own record through an app they signed in to.
    let reader = &patients[0];
    let password = uuid::Uuid::new_v4().simple().to_string();
    let app_id = register_patient_app(haven, &reader.id, &password)?;
    let (patient_token, token_patient) = smart::patient_token(
        &server.http,
        &PatientLogin {
            origin: &origin,
            base: &server.announced_base,
            client_id: &app_id,
            scope: APP_SCOPE,
            username: "bench-patient",
            password: &password,
        },
    )
    .await?;
    ensure!(
        token_patient == reader.id,
        "the token is for another patient"
    );
    let path: Arc<str> = format!("/fhir/Patient/{}", reader.id).into();
    let read = {
        let server_req = (server.host.clone(), patient_token.clone(), path.clone());
        Arc::new(move |_: &mut fastrand::Rng| {
            let (host, token, path) = &server_req;
            (0_usize, get_request(path, host, token))
        }) as MakeRequest
    };
    let row = single_run(
        &server.target,
        load,
        read.clone(),
        drive::ok_with_body,
        server.pid,
        Described {
            id: "P1",
            what: "read: `GET Patient/{id}`, `patient/*.rs` token of that patient".into(),
            ceiling: Some("C1"),
            goal: Goal {
                min_per_second: Some(15_000.0),
                max_p99_ms: Some(5.0),
            },
        },
    )
    .await?;
    report.rows.push(row);
    remember_memory(report, &server, "after P1");

    // C1: the same JSON from a minimal axum endpoint over the same TLS.
    let body = server
        .http
        .get(format!("{origin}{path}"))
        .bearer_auth(&patient_token)
        .send()
        .await?
        .bytes()
        .await?;
    let body_file = haven.data_dir.join("ceiling-patient.json");
    std::fs::write(&body_file, &body)?;
    let tls = haven.data_dir.join("tls");
    let ceiling_server = CeilingServer::start(
        &tls.join("localhost.pem"),
        &tls.join("localhost-key.pem"),
        &body_file,
    )?;
    let ceiling_target = Target::new(ceiling_server.addr, &ca)?;
    let row = single_run(
        &ceiling_target,
        load,
        read,
        drive::ok_with_body,
        ceiling_server.pid(),
        Described {
            id: "C1",
            what: format!(
                "ceiling of P1: minimal axum endpoint, same {} bytes of Patient JSON, same TLS, no token, no audit",
                body.len()
            ),
            ceiling: None,
            goal: Goal::default(),
        },
    )
    .await?;
    drop(ceiling_server);
    report.rows.push(row);

    // C4: the AuditEvent a read writes, appended straight through the store.
    let read_events = server
        .fetch(
            &format!(
                "/fhir/AuditEvent?entity=Patient/{}&subtype=read&_count=1",
                reader.id
            ),
            &search_token,
        )
        .await?;
    let read_event = read_events["entry"][0]["resource"].clone();
    ensure!(
        read_event.is_object(),
        "no AuditEvent of a read of Patient/{}: {read_events}",
        reader.id
    );
    let rate = on_fresh_database(report.kind, args, "C4", move |url, c, w, d| {
        ceiling::audit_rate(url, read_event, c, w, d)
    })
    .await?;
    report.rows.push(store_row(
        "C4",
        "audit ceiling of P1: the AuditEvent one read writes, appended through the store's group writer, no HTTP",
        "events/s",
        &rate,
    ));

    // P2: creates, each with its Provenance and AuditEvent, by the loader.
    let write_token = server.token(&loader, LOADER_SCOPE).await?;
    let observation = Bytes::from(serde_json::to_vec(&observation(&reader.id))?);
    let create = {
        let captured = (
            server.host.clone(),
            write_token.clone(),
            observation.clone(),
        );
        Arc::new(move |_: &mut fastrand::Rng| {
            let (host, token, body) = &captured;
            let request = Request::post("/fhir/Observation")
                .header("host", host)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/fhir+json")
                .header("prefer", "return=minimal")
                .body(Full::new(body.clone()))
                .expect("a valid request");
            (0_usize, request)
        }) as MakeRequest
    };
    let row = single_run(
        &server.target,
        load,
        create,
        drive::created,
        server.pid,
        Described {
            id: "P2",
            what: "create: `POST Observation` (`Prefer: return=minimal`), with its Provenance and AuditEvent".into(),
            ceiling: Some("C2"),
            goal: Goal {
                min_per_second: Some(3_000.0),
                max_p99_ms: None,
            },
        },
    )
    .await?;
    report.rows.push(row);
    remember_memory(report, &server, "after P2");

    // C2: the rows one create wrote, written straight through the store.
    let rows = create_rows(&server, &write_token, &observation).await?;
    let rate = on_fresh_database(report.kind, args, "C2", move |url, c, w, d| {
        ceiling::create_rate(url, rows, c, w, d)
    })
    .await?;
    report.rows.push(store_row(
        "C2",
        "ceiling of P2: the same rows (Observation, Provenance, AuditEvent) in one store transaction each, no HTTP",
        "transactions/s",
        &rate,
    ));

    // C3: the 1x bundles, with the Provenance and AuditEvents the server
    // writes for them, straight through the store.
    let (db, _scratch, url) = raw_database(report.kind, args)?;
    // Copy 0 keeps the corpus's ids but gives the Organizations that patient
    // bundles repeat (conditionally created by the server) ids of their own.
    let bundles = corpus
        .iter()
        .enumerate()
        .map(|(no, b)| synthea::copy(&b.bundle, 0, u32::try_from(no)?))
        .collect::<Result<Vec<Value>>>()?;
    let load_concurrency = args.load_concurrency;
    let (written, took) =
        tokio::task::spawn_blocking(move || ceiling::ingest_rate(url, bundles, load_concurrency))
            .await??;
    drop(db);
    eprintln!(
        "  raw ingest: {written} resources in {:.1} s",
        took.as_secs_f64()
    );
    report.rows.push(Row {
        id: "C3".into(),
        what: "ceiling of P3: the same bundles, a Provenance per resource and an AuditEvent per bundle, one store transaction per bundle, no HTTP".into(),
        unit: "resources/s",
        requests: written,
        errors: 0,
        per_second: written as f64 / took.as_secs_f64(),
        p50_ms: None,
        p99_ms: None,
        ceiling: None,
        goal: Goal::default(),
        server_cores: None,
        generator_cores: None,
        first_error: None,
    });

    // P4 at 1x, as a client with the default clearance.
    let searcher_token = server.token(&searcher, SEARCH_SCOPE).await?;
    let rows = search_mix(&server, load, &searcher_token, &patients, "1x").await?;
    report.rows.extend(rows);
    remember_memory(report, &server, "after P4 (1x)");

    // P5: Backend Services tokens, each with a freshly signed assertion.
    let tokens = {
        let captured = (
            server.host.clone(),
            loader.key.clone(),
            loader.client_id.clone(),
            server.token_url.clone(),
        );
        Arc::new(move |_: &mut fastrand::Rng| {
            let (host, key, client_id, token_url) = &captured;
            let form = smart::client_credentials_form(key, client_id, token_url, SEARCH_SCOPE)
                .expect("the assertion can be signed");
            let request = Request::post("/auth/token")
                .header("host", host)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(form)))
                .expect("a valid request");
            (0_usize, request)
        }) as MakeRequest
    };
    let row = single_run(
        &server.target,
        load,
        tokens,
        drive::token,
        server.pid,
        Described {
            id: "P5",
            what: "token: `client_credentials` with a `private_key_jwt` assertion (ES384), signed per request by the load generator".into(),
            ceiling: None,
            goal: Goal {
                min_per_second: Some(2_000.0),
                max_p99_ms: None,
            },
        },
    )
    .await?;
    report.rows.push(row);
    remember_memory(report, &server, "after P5");

    // The other copies, then P4 at 10x.
    if args.copies > 1 {
        let resources: usize = resources_1x * (args.copies as usize - 1);
        let mut row = ingest(
            haven,
            &loader,
            &[copies_dir],
            resources,
            args.load_concurrency,
            "P3",
            &format!(
                "ingest: copies 1..{} of the bundles through `haven load` (to 10x)",
                args.copies
            ),
        )?;
        row.goal = Goal::default();
        row.id = "P3b".into();
        report.rows.push(row);
        remember_memory(report, &server, &format!("after loading {}x", args.copies));
        let search_token = server.token(&loader, SEARCH_SCOPE).await?;
        let patients = find_patients(&server, &search_token, corpus, args.copies).await?;
        let searcher_token = server.token(&searcher, SEARCH_SCOPE).await?;
        let rows = search_mix(
            &server,
            load,
            &searcher_token,
            &patients,
            &format!("{}x", args.copies),
        )
        .await?;
        report.rows.extend(rows);
        remember_memory(report, &server, &format!("after P4 ({}x)", args.copies));
    }
    Ok(())
}

/// Runs a store ceiling (given the database URL, concurrency, warm-up and
/// duration) on a fresh database of the backend, off the load generator's
/// thread, and prints its rate.
async fn on_fresh_database<F>(
    kind: BackendKind,
    args: &Args,
    id: &str,
    ceiling: F,
) -> Result<ceiling::WriteRate>
where
    F: FnOnce(String, usize, Duration, Duration) -> Result<ceiling::WriteRate> + Send + 'static,
{
    let (db, _scratch, url) = raw_database(kind, args)?;
    let (concurrency, warmup, duration) = (args.concurrency, args.warmup(), args.duration());
    let rate =
        tokio::task::spawn_blocking(move || ceiling(url, concurrency, warmup, duration)).await??;
    drop(db);
    eprintln!(
        "  {id}: {} done, {:.0}/s, p50 {:.2} ms",
        rate.transactions,
        rate.per_second(),
        rate.latency.value_at_quantile(0.5) as f64 / 1000.0
    );
    Ok(rate)
}

/// A row of what the store sustained without HTTP.
fn store_row(id: &str, what: &str, unit: &'static str, rate: &ceiling::WriteRate) -> Row {
    Row {
        id: id.into(),
        what: what.into(),
        unit,
        requests: rate.transactions,
        errors: 0,
        per_second: rate.per_second(),
        p50_ms: Some(rate.latency.value_at_quantile(0.5) as f64 / 1000.0),
        p99_ms: Some(rate.latency.value_at_quantile(0.99) as f64 / 1000.0),
        ceiling: None,
        goal: Goal::default(),
        server_cores: None,
        generator_cores: None,
        first_error: None,
    }
}

fn get_request(path: &str, host: &str, token: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", host)
        .header("authorization", format!("Bearer {token}"))
        .header("accept", "application/fhir+json")
        .body(Full::new(Bytes::new()))
        .expect("a valid request")
}

fn remember_memory(report: &mut BackendReport, server: &Server, phase: &str) {
    if let Some(rss) = process::rss_kib(server.pid) {
        report.memory.push((phase.to_owned(), rss));
    }
}

/// What a run of one kind of request measures, for its row.
struct Described {
    id: &'static str,
    what: String,
    ceiling: Option<&'static str>,
    goal: Goal,
}

/// Drives a run of one kind of request; its row, as `described`.
async fn single_run(
    target: &Target,
    load: Load,
    make: MakeRequest,
    check: drive::Check,
    server_pid: u32,
    described: Described,
) -> Result<Row> {
    let mut rows = drive_row(target, load, 1, make, check, server_pid, &[described.id]).await?;
    let mut row = rows.remove(0);
    row.id = described.id.into();
    row.what = described.what;
    row.ceiling = described.ceiling.map(str::to_owned);
    row.goal = described.goal;
    Ok(row)
}

/// Drives one run and turns it into rows: one per kind, then (for several
/// kinds) one for all of them.
async fn drive_row(
    target: &Target,
    load: Load,
    kinds: usize,
    make: MakeRequest,
    check: drive::Check,
    server_pid: u32,
    names: &[&str],
) -> Result<Vec<Row>> {
    let warmup = load.warmup;
    // CPU is read at the end of the warm-up and at the end of the run.
    let at_start = tokio::task::spawn_local(async move {
        tokio::time::sleep(warmup).await;
        (
            process::cpu_time(server_pid),
            process::cpu_time(std::process::id()),
            Instant::now(),
        )
    });
    let sample = drive::run(target, load, kinds, make, check).await?;
    let (server_then, own_then, then) = at_start.await?;
    let seconds = then.elapsed().as_secs_f64();
    let cores = |before: Option<Duration>, pid: u32| {
        let after = process::cpu_time(pid)?;
        Some((after.saturating_sub(before?)).as_secs_f64() / seconds)
    };
    let server_cores = cores(server_then, server_pid);
    let generator_cores = cores(own_then, std::process::id());
    if let Some(error) = &sample.first_error {
        eprintln!("  first unexpected answer: {error}");
    }
    let mut rows = Vec::new();
    let mut push = |name: &str, kind: &drive::KindSample, with_cpu: bool| {
        let row = Row {
            id: String::new(),
            what: name.to_owned(),
            unit: "requests/s",
            requests: kind.requests,
            errors: kind.errors,
            per_second: kind.throughput(sample.elapsed),
            p50_ms: Some(kind.quantile_ms(0.5)),
            p99_ms: Some(kind.quantile_ms(0.99)),
            ceiling: None,
            goal: Goal::default(),
            server_cores: with_cpu.then_some(server_cores).flatten(),
            generator_cores: with_cpu.then_some(generator_cores).flatten(),
            first_error: sample.first_error.clone().filter(|_| kind.errors > 0),
        };
        eprintln!(
            "  {name}: {} requests, {} errors, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
            row.requests,
            row.errors,
            row.per_second,
            row.p50_ms.unwrap_or_default(),
            row.p99_ms.unwrap_or_default()
        );
        rows.push(row);
    };
    for (name, kind) in names.iter().zip(&sample.kinds) {
        push(name, kind, kinds == 1);
    }
    if kinds > 1 {
        push("all", &sample.total()?, true);
    }
    Ok(rows)
}

/// Runs `haven load` on `paths` and times it.
fn ingest(
    haven: &Haven,
    loader: &Backend,
    paths: &[&Path],
    expected: usize,
    concurrency: usize,
    id: &str,
    what: &str,
) -> Result<Row> {
    let mut command = Command::new(haven_binary()?);
    command
        .arg("load")
        .arg("--server")
        .arg(&haven.base_url)
        .arg("--ca-file")
        .arg(haven.ca_file())
        .arg("--client-id")
        .arg(&loader.client_id)
        .arg("--private-key")
        .arg(&loader.key_file)
        .arg("--scope")
        .arg(LOADER_SCOPE)
        .arg("--concurrency")
        .arg(concurrency.to_string())
        .args(paths)
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    eprintln!("  {what}");
    let started = Instant::now();
    let output = command.output().context("running haven load")?;
    let elapsed = started.elapsed();
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(output.status.success(), "haven load failed:\n{printed}");
    // "loaded N bundles, M resources in S s (R resources/s); F failed"
    let summary = printed
        .lines()
        .find(|l| l.starts_with("loaded "))
        .with_context(|| format!("haven load printed no summary:\n{printed}"))?;
    let words: Vec<&str> = summary.split_whitespace().collect();
    let resources: u64 = words.get(3).context("a resource count")?.parse()?;
    let failed: u64 = words
        .iter()
        .rev()
        .nth(1)
        .context("a failure count")?
        .parse()?;
    ensure!(
        failed == 0 && resources == expected as u64,
        "haven load wrote {resources} resources of {expected}, {failed} bundles failed:\n{printed}"
    );
    let per_second = resources as f64 / elapsed.as_secs_f64();
    eprintln!(
        "  {resources} resources in {:.1} s: {per_second:.0}/s",
        elapsed.as_secs_f64()
    );
    Ok(Row {
        id: id.into(),
        what: what.into(),
        unit: "resources/s",
        requests: resources,
        errors: failed,
        per_second,
        p50_ms: None,
        p99_ms: None,
        ceiling: None,
        goal: Goal {
            min_per_second: Some(5_000.0),
            max_p99_ms: None,
        },
        server_cores: None,
        generator_cores: None,
        first_error: None,
    })
}

/// Every loaded patient of copies `0..copies`, with what the queries may ask
/// about them (from the bundles), found by their Synthea identifier.
async fn find_patients(
    server: &Server,
    token: &str,
    corpus: &[SourceBundle],
    copies: u32,
) -> Result<Vec<Patient>> {
    let mut facts = HashMap::new();
    for source in corpus {
        let Some(found) = synthea::patient_facts(&source.bundle)? else {
            continue;
        };
        let identifier = source.bundle["entry"][found.entry]["resource"]["identifier"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["system"] == SYNTHEA_ID)
            .and_then(|i| i["value"].as_str())
            .context("a Synthea patient without its Synthea identifier")?
            .to_owned();
        for copy in 0..copies {
            let key = if copy == 0 {
                identifier.clone()
            } else {
                format!("{identifier}-{copy}")
            };
            facts.insert(key, found.clone());
        }
    }
    let mut out = Vec::new();
    let mut next = Some("/fhir/Patient?_count=500&_elements=identifier".to_owned());
    while let Some(path) = next.take() {
        let page = server.fetch(&path, token).await?;
        for entry in page["entry"].as_array().into_iter().flatten() {
            let resource = &entry["resource"];
            let Some(id) = resource["id"].as_str() else {
                continue;
            };
            let synthea_id = resource["identifier"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|i| i["system"] == SYNTHEA_ID)
                .and_then(|i| i["value"].as_str());
            if let Some(found) = synthea_id.and_then(|v| facts.get(v)) {
                if !found.codes.is_empty() && !found.years.is_empty() {
                    out.push(Patient {
                        id: id.to_owned(),
                        family: found.family.clone(),
                        codes: found.codes.clone(),
                        years: found.years.clone(),
                    });
                }
            }
        }
        next = page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(|url| match url.find("/fhir/") {
                Some(at) => url[at..].to_owned(),
                None => url.to_owned(),
            });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    eprintln!("  {} patients with Observations found", out.len());
    Ok(out)
}

/// P4: the four queries with equal odds, about patients drawn at random.
async fn search_mix(
    server: &Server,
    load: Load,
    token: &str,
    patients: &[Patient],
    data: &str,
) -> Result<Vec<Row>> {
    let patients = Arc::new(patients.to_vec());
    let captured = (server.host.clone(), token.to_owned(), patients);
    let make = Arc::new(move |rng: &mut fastrand::Rng| {
        let (host, token, patients) = &captured;
        let kind = rng.usize(..Kind::ALL.len());
        let patient = &patients[rng.usize(..patients.len())];
        let path = query(Kind::ALL[kind], patient, rng);
        (kind, get_request(&path, host, token))
    }) as MakeRequest;
    let names: Vec<String> = Kind::ALL
        .iter()
        .map(|k| format!("search {data}: `{}`", k.template()))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut rows = drive_row(
        &server.target,
        load,
        Kind::ALL.len(),
        make,
        drive::searchset,
        server.pid,
        &names,
    )
    .await?;
    for row in &mut rows {
        row.id = format!("P4 {data}");
    }
    if let Some(all) = rows.last_mut() {
        all.what = format!(
            "search {data}: the mix, `system/*.rs` token of a client with the default clearance (`N`)"
        );
        all.goal = Goal {
            min_per_second: Some(2_000.0),
            max_p99_ms: Some(20.0),
        };
    }
    Ok(rows)
}

fn observation(patient: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs"
        }] }],
        "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4", "display": "Heart rate" }] },
        "subject": { "reference": format!("Patient/{patient}") },
        "effectiveDateTime": "2026-11-22T10:00:00Z",
        "valueQuantity": { "value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min" }
    })
}

/// Creates one Observation and reads back what the server stored for it: the
/// resource, its Provenance and its AuditEvent.
async fn create_rows(server: &Server, token: &str, observation: &Bytes) -> Result<CreateRows> {
    let answer = server
        .http
        .post(format!("{}/fhir/Observation", server.origin))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .body(observation.clone())
        .send()
        .await?;
    ensure!(
        answer.status() == reqwest::StatusCode::CREATED,
        "the create answered {}",
        answer.status()
    );
    let resource: Value = answer.json().await?;
    let id = resource["id"]
        .as_str()
        .context("the created id")?
        .to_owned();
    let provenance = server
        .fetch(&format!("/fhir/Provenance?target=Observation/{id}"), token)
        .await?;
    let audit = server
        .fetch(&format!("/fhir/AuditEvent?entity=Observation/{id}"), token)
        .await?;
    let first = |bundle: &Value, what: &str| {
        bundle["entry"][0]["resource"]
            .as_object()
            .map(|o| Value::Object(o.clone()))
            .ok_or_else(|| anyhow!("no {what} for Observation/{id}: {bundle}"))
    };
    Ok(CreateRows {
        resource,
        provenance: first(&provenance, "Provenance")?,
        audit_event: first(&audit, "AuditEvent")?,
    })
}
