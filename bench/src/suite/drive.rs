//! The load generator: a fixed number of HTTP/1.1 connections over TLS, each
//! sending one request after another (a closed loop), first for a warm-up that
//! is not counted, then for a fixed time that is.
//!
//! It runs on the suite's single-threaded runtime, so it takes at most one core
//! from the machine; the report gives what it used.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Where the load goes: an address and the CA its certificate chains to.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    connector: TlsConnector,
}

impl Target {
    /// A target whose certificate is signed by the PEM CA `ca_pem` and names
    /// the loopback address.
    pub fn new(addr: SocketAddr, ca_pem: &[u8]) -> Result<Target> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots
                .add(cert.context("parsing the CA certificate")?)
                .context("trusting the CA certificate")?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Target {
            addr,
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::IpAddress(self.addr.ip().into());
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .context("the TLS handshake")?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("the HTTP/1.1 handshake")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

/// Makes the next request of one connection; the `usize` names its kind (an
/// index into the kinds the run reports), for mixes of several queries.
pub type MakeRequest = Arc<dyn Fn(&mut fastrand::Rng) -> (usize, Request<Full<Bytes>>)>;

/// Whether an answer is what the request should get.
pub type Check = fn(StatusCode, &[u8]) -> bool;

/// How long and how hard to drive.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub seed: u64,
}

/// What one kind of request did during the measured time.
pub struct KindSample {
    pub requests: u64,
    pub errors: u64,
    /// Microseconds, from sending the request to the end of the answer's body.
    pub latency: Histogram<u64>,
}

/// What a run measured.
pub struct Sample {
    pub kinds: Vec<KindSample>,
    pub elapsed: Duration,
    /// The first unexpected answer, to say what went wrong.
    pub first_error: Option<String>,
}

impl Sample {
    /// All kinds together.
    pub fn total(&self) -> Result<KindSample> {
        let mut all = KindSample::new()?;
        for kind in &self.kinds {
            all.requests += kind.requests;
            all.errors += kind.errors;
            all.latency.add(&kind.latency)?;
        }
        Ok(all)
    }
}

impl KindSample {
    fn new() -> Result<KindSample> {
        Ok(KindSample {
            requests: 0,
            errors: 0,
            latency: Histogram::new_with_bounds(1, 120_000_000, 3)?,
        })
    }

    /// Good answers per second over `elapsed`.
    pub fn throughput(&self, elapsed: Duration) -> f64 {
        (self.requests - self.errors) as f64 / elapsed.as_secs_f64()
    }

    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Opens `load.concurrency` connections and drives them; `kinds` requests
/// kinds are reported apart.
pub async fn run(
    target: &Target,
    load: Load,
    kinds: usize,
    make: MakeRequest,
    check: Check,
) -> Result<Sample> {
    let mut senders = Vec::with_capacity(load.concurrency);
    for _ in 0..load.concurrency {
        senders.push(target.connect().await?);
    }
    let started = Instant::now();
    let measure_from = started + load.warmup;
    let measure_until = measure_from + load.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (n, sender) in senders.into_iter().enumerate() {
        let make = make.clone();
        let seed = load.seed.wrapping_mul(1_000_003).wrapping_add(n as u64);
        tasks.spawn_local(connection_loop(
            sender,
            make,
            check,
            kinds,
            seed,
            measure_from,
            measure_until,
        ));
    }
    let mut sample = Sample {
        kinds: (0..kinds)
            .map(|_| KindSample::new())
            .collect::<Result<_>>()?,
        elapsed: load.duration,
        first_error: None,
    };
    while let Some(joined) = tasks.join_next().await {
        let (kinds_seen, error) = joined.context("a connection task failed")??;
        for (total, seen) in sample.kinds.iter_mut().zip(kinds_seen) {
            total.requests += seen.requests;
            total.errors += seen.errors;
            total.latency.add(&seen.latency)?;
        }
        if sample.first_error.is_none() {
            sample.first_error = error;
        }
    }
    Ok(sample)
}

async fn connection_loop(
    mut sender: SendRequest<Full<Bytes>>,
    make: MakeRequest,
    check: Check,
    kinds: usize,
    seed: u64,
    measure_from: Instant,
    measure_until: Instant,
) -> Result<(Vec<KindSample>, Option<String>)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut seen = (0..kinds)
        .map(|_| KindSample::new())
        .collect::<Result<Vec<_>>>()?;
    let mut first_error = None;
    loop {
        let sent = Instant::now();
        if sent >= measure_until {
            break;
        }
        let (kind, request) = make(&mut rng);
        sender
            .ready()
            .await
            .map_err(|e| anyhow!("the connection closed: {e}"))?;
        let answer = sender.send_request(request).await;
        let (ok, error) = match answer {
            Ok(response) => {
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                if check(status, &body) {
                    (true, None)
                } else {
                    let text = String::from_utf8_lossy(&body[..body.len().min(400)]).into_owned();
                    (false, Some(format!("{status}: {text}")))
                }
            }
            Err(err) => (false, Some(format!("no answer: {err}"))),
        };
        let done = Instant::now();
        // Only requests sent and answered inside the measured window count.
        if sent >= measure_from && done <= measure_until {
            let sample = &mut seen[kind];
            sample.requests += 1;
            if !ok {
                sample.errors += 1;
            }
            let micros = u64::try_from(done.duration_since(sent).as_micros()).unwrap_or(u64::MAX);
            sample.latency.saturating_record(micros.max(1));
        }
        if let (Some(error), None) = (error, &first_error) {
            first_error = Some(error);
        }
        if !ok && sender.is_closed() {
            return Err(anyhow!(
                "the server closed the connection after: {}",
                first_error.unwrap_or_default()
            ));
        }
    }
    Ok((seen, first_error))
}

/// `200 OK` with a body.
pub fn ok_with_body(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::OK && !body.is_empty()
}

/// `201 Created`.
pub fn created(status: StatusCode, _body: &[u8]) -> bool {
    status == StatusCode::CREATED
}

/// `200 OK` holding a searchset Bundle.
pub fn searchset(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::OK
        && serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|b| b["resourceType"] == "Bundle" && b["type"] == "searchset")
}

/// `200 OK` holding an access token.
pub fn token(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::OK
        && serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|b| b["access_token"].is_string())
}
