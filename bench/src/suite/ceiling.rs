//! The ceilings the secure path is compared with: a minimal axum endpoint over
//! the same TLS stack answering the same Patient JSON, and the database's own
//! write rate for the same rows, through the store without HTTP, tokens,
//! policy or the audit pipeline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::routing::get;
use haven_model::clock::{Clock, SystemClock};
use haven_model::id::new_time_ordered_id;
use haven_store::AuditWriter;
use hdrhistogram::Histogram;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Arguments of the `ceiling-server` subcommand, which the suite starts as a
/// process of its own so that it has the machine to itself as `haven` does.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The server certificate (PEM), e.g. `haven`'s `tls/localhost.pem`.
    #[arg(long)]
    pub cert: PathBuf,
    #[arg(long)]
    pub key: PathBuf,
    /// The JSON answered for every `GET /fhir/Patient/{id}`.
    #[arg(long)]
    pub body: PathBuf,
}

/// Serves until killed; prints `listening on ADDR` once bound.
pub fn serve(args: ServerArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let certs = CertificateDer::pem_file_iter(&args.cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&args.key)?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let body = bytes::Bytes::from(std::fs::read(&args.body)?);
        let app = axum::Router::new().route(
            "/fhir/Patient/{id}",
            get(move || {
                let body = body.clone();
                async move { ([("content-type", "application/fhir+json")], body) }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        println!("listening on {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = TowerToHyperService::new(app);
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    })
}

/// The ceiling server, started from this same binary.
pub struct CeilingServer {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl CeilingServer {
    pub fn start(
        cert: &std::path::Path,
        key: &std::path::Path,
        body: &std::path::Path,
    ) -> Result<Self> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .arg("ceiling-server")
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--body")
            .arg(body)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the ceiling server")?;
        let stdout = child.stdout.take().context("the ceiling server's output")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("the ceiling server said {line:?}"))?
            .parse()?;
        Ok(CeilingServer { child, addr })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for CeilingServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the store sustained.
pub struct WriteRate {
    pub transactions: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
}

impl WriteRate {
    pub fn per_second(&self) -> f64 {
        self.transactions as f64 / self.elapsed.as_secs_f64()
    }
}

/// Rows as the server writes them for one create: the resource, its
/// Provenance and its AuditEvent, in one transaction.
#[derive(Clone)]
pub struct CreateRows {
    pub resource: Value,
    pub provenance: Value,
    pub audit_event: Value,
}

/// `concurrency` tasks writing [`CreateRows`] (under new ids) through the
/// store of `database_url`, each one transaction after another, for
/// `duration` after `warmup`. Runs on a runtime of its own with as many
/// threads as the machine has cores, as the server does.
pub fn create_rate(
    database_url: String,
    rows: CreateRows,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<WriteRate> {
    on_store(database_url, move |store| async move {
        let rows = Arc::new(rows);
        sustained(concurrency, warmup, duration, move || {
            let store = store.clone();
            let rows = rows.clone();
            async move {
                let id = uuid::Uuid::new_v4().to_string();
                let mut resource = rows.resource.clone();
                resource["id"] = json!(id);
                let mut provenance = rows.provenance.clone();
                let provenance_id = new_time_ordered_id();
                provenance["id"] = json!(provenance_id);
                provenance["target"] =
                    json!([{ "reference": format!("Observation/{id}/_history/1") }]);
                // The store gives each AuditEvent its id.
                let event = rows.audit_event.clone();
                let mut tx = store.begin().await?;
                tx.create("Observation", &id, resource).await?;
                tx.create("Provenance", &provenance_id, provenance).await?;
                tx.append_audit(vec![event]).await?;
                tx.commit().await?;
                Ok(())
            }
        })
        .await
    })
}

/// `concurrency` tasks appending the AuditEvent one read writes (under new ids)
/// through the store's audit writer, which commits what is queued at once in
/// one transaction, as the server's does; each task waits for its event to be
/// committed before appending the next, as a request waits before answering.
pub fn audit_rate(
    database_url: String,
    event: Value,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<WriteRate> {
    on_store(database_url, move |store| async move {
        let writer = AuditWriter::start(store);
        let event = Arc::new(event);
        sustained(concurrency, warmup, duration, move || {
            let writer = writer.clone();
            // The store gives each AuditEvent its id.
            let event = Value::clone(&event);
            async move {
                writer.append(event).await?;
                Ok(())
            }
        })
        .await
    })
}

/// Runs `operation` from `concurrency` tasks, each one after another, and
/// counts those started and finished inside the `duration` after `warmup`.
async fn sustained<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    operation: F,
) -> Result<WriteRate>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let started = Instant::now();
    let measure_from = started + warmup;
    let measure_until = measure_from + duration;
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let operation = operation.clone();
        let done = done.clone();
        tasks.spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
            loop {
                let sent = Instant::now();
                if sent >= measure_until {
                    break;
                }
                operation().await?;
                let finished = Instant::now();
                if sent >= measure_from && finished <= measure_until {
                    done.fetch_add(1, Ordering::Relaxed);
                    let micros = u64::try_from((finished - sent).as_micros()).unwrap_or(u64::MAX);
                    latency.saturating_record(micros.max(1));
                }
            }
            anyhow::Ok(latency)
        });
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    while let Some(task) = tasks.join_next().await {
        latency.add(&task??)?;
    }
    Ok(WriteRate {
        transactions: done.load(Ordering::Relaxed),
        elapsed: duration,
        latency,
    })
}

/// The Synthea bundles written through the store of `database_url`, each in
/// one transaction with a Provenance per resource and an AuditEvent per
/// bundle, as the server writes them, `concurrency` bundles at a time.
/// Returns resources written and the time taken.
pub fn ingest_rate(
    database_url: String,
    bundles: Vec<Value>,
    concurrency: usize,
) -> Result<(u64, Duration)> {
    on_store(database_url, move |store| async move {
        let started = Instant::now();
        let written = Arc::new(AtomicU64::new(0));
        // The shared organizations and practitioners first, as `haven load` does.
        let (first, rest): (Vec<_>, Vec<_>) = bundles.into_iter().partition(|b| {
            !b["entry"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["resource"]["resourceType"] == "Patient"))
        });
        for group in [first, rest] {
            let queue = Arc::new(std::sync::Mutex::new(group));
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..concurrency {
                let store = store.clone();
                let queue = queue.clone();
                let written = written.clone();
                tasks.spawn(async move {
                    loop {
                        let Some(bundle) = queue.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pop() else {
                            break;
                        };
                        let mut tx = store.begin().await?;
                        let mut count = 0;
                        for (ty, id, resource) in haven_bench::synthea::resolved(&bundle)? {
                            tx.create(&ty, &id, resource).await.with_context(|| format!("creating {ty}/{id}"))?;
                            let provenance_id = new_time_ordered_id();
                            tx.create("Provenance", &provenance_id, provenance(&provenance_id, &ty, &id)).await?;
                            count += 1;
                        }
                        tx.append_audit(vec![json!({
                            "resourceType": "AuditEvent",
                            "id": uuid::Uuid::new_v4().to_string(),
                            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest" },
                            "subtype": [{ "system": "http://hl7.org/fhir/restful-interaction", "code": "transaction" }],
                            "action": "E",
                            "recorded": time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?,
                            "outcome": "0",
                            "agent": [{ "requestor": true, "who": { "identifier": { "value": "bench" } } }],
                            "source": { "observer": { "display": "haven-bench" } },
                        })]).await?;
                        tx.commit().await?;
                        written.fetch_add(count, Ordering::Relaxed);
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(task) = tasks.join_next().await {
                task??;
            }
        }
        Ok((written.load(Ordering::Relaxed), started.elapsed()))
    })
}

/// Runs `work` over the store of `database_url` on a runtime of its own, with
/// as many threads as the machine has cores, as the server has.
fn on_store<T, F, Fut>(database_url: String, work: F) -> Result<T>
where
    F: FnOnce(Arc<dyn haven_store::Store>) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = haven_store::connect(&database_url, clock).await?;
        work(store).await
    })
}

fn provenance(id: &str, ty: &str, target: &str) -> Value {
    json!({
        "resourceType": "Provenance",
        "id": id,
        "target": [{ "reference": format!("{ty}/{target}/_history/1") }],
        "recorded": time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "activity": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE" }] },
        "agent": [{ "who": { "display": "haven-bench" } }],
    })
}
