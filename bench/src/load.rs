//! The load: concurrent tasks sending a fixed mix of reads and cheap searches
//! through the router until a deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::Router;
use hdrhistogram::Histogram;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::setup::Dataset;

/// Latencies are kept in microseconds, from 1 µs to 60 s, to 3 significant digits.
pub const LOWEST_MICROS: u64 = 1;
pub const HIGHEST_MICROS: u64 = 60_000_000;
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// What one request asks for, chosen per request by [`pick`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ReadPatient,
    ReadObservation,
    /// `Observation?_count=10`: the first page of the type.
    SearchFirstPage,
    /// `Observation?_id=...`: a search that goes through the index.
    SearchById,
}

/// The mix, in percent: 80 reads and 20 searches. Searches stay on `_id` and
/// `_count`, which the store answers from its tables; other parameters would be
/// evaluated on the content of every Observation.
pub const MIX: [(Kind, u32); 4] = [
    (Kind::ReadPatient, 40),
    (Kind::ReadObservation, 40),
    (Kind::SearchFirstPage, 10),
    (Kind::SearchById, 10),
];

/// One request's kind and path, drawn from `rng` over the dataset.
pub fn pick(rng: &mut fastrand::Rng, data: Dataset) -> (Kind, String) {
    let mut roll = rng.u32(0..100);
    let kind = MIX
        .iter()
        .find(|(_, share)| {
            let hit = roll < *share;
            roll = roll.saturating_sub(*share);
            hit
        })
        .map_or(Kind::ReadPatient, |(kind, _)| *kind);
    let patient = rng.u32(0..data.patients);
    let mut observation =
        || Dataset::observation_id(patient, rng.u32(0..data.observations_per_patient));
    let path = match kind {
        Kind::ReadPatient => format!("/fhir/Patient/{}", Dataset::patient_id(patient)),
        Kind::ReadObservation => format!("/fhir/Observation/{}", observation()),
        Kind::SearchFirstPage => "/fhir/Observation?_count=10".to_owned(),
        Kind::SearchById => format!("/fhir/Observation?_id={}", observation()),
    };
    (kind, path)
}

/// What one run measured.
#[derive(Debug)]
pub struct Sample {
    /// Requests answered 200.
    pub ok: u64,
    /// Other answers, by status.
    pub errors: BTreeMap<u16, u64>,
    /// The first non-200 answer, for the report.
    pub first_error: Option<String>,
    /// Latency of every answered request, in microseconds.
    pub latency: Histogram<u64>,
    /// From the start until the last task finished its last request.
    pub elapsed: Duration,
    /// CPU time the whole process used meanwhile (server and load alike), when
    /// the system tells it.
    pub cpu: Option<Duration>,
}

impl Sample {
    fn empty() -> Result<Self> {
        Ok(Self {
            ok: 0,
            errors: BTreeMap::new(),
            first_error: None,
            latency: Histogram::new_with_bounds(LOWEST_MICROS, HIGHEST_MICROS, SIGNIFICANT_DIGITS)
                .context("creating a latency histogram")?,
            elapsed: Duration::ZERO,
            cpu: None,
        })
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn requests(&self) -> u64 {
        self.ok + self.error_count()
    }

    fn merge(&mut self, other: Sample) -> Result<()> {
        self.ok += other.ok;
        for (status, n) in other.errors {
            *self.errors.entry(status).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latency
            .add(&other.latency)
            .context("merging latency histograms")?;
        Ok(())
    }
}

/// How a run is driven.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub concurrency: u32,
    pub duration: Duration,
    pub data: Dataset,
    /// Seeds the tasks' random choices, so a run can be repeated request for request.
    pub seed: u64,
}

/// Runs `load.concurrency` tasks against `router` until `load.duration` has
/// passed; a request under way at the deadline is finished and counted.
pub async fn run(router: &Router, token: &str, load: Load) -> Result<Sample> {
    let authorization: Arc<str> = format!("Bearer {token}").into();
    let cpu_before = process_cpu();
    let started = Instant::now();
    let deadline = started + load.duration;
    let tasks: Vec<_> = (0..load.concurrency)
        .map(|task| {
            let router = router.clone();
            let authorization = authorization.clone();
            let rng = fastrand::Rng::with_seed(load.seed ^ (u64::from(task) << 32));
            tokio::spawn(drive(router, authorization, rng, load.data, deadline))
        })
        .collect();
    let mut total = Sample::empty()?;
    for task in tasks {
        total.merge(task.await.context("a load task panicked")??)?;
    }
    total.elapsed = started.elapsed();
    total.cpu = process_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    Ok(total)
}

/// User plus system CPU time of this process; `None` off Linux.
pub fn process_cpu() -> Option<Duration> {
    haven_bench::process::cpu_time(std::process::id())
}

async fn drive(
    router: Router,
    authorization: Arc<str>,
    mut rng: fastrand::Rng,
    data: Dataset,
    deadline: Instant,
) -> Result<Sample> {
    let mut sample = Sample::empty()?;
    while Instant::now() < deadline {
        let (_, path) = pick(&mut rng, data);
        let request = Request::get(path.as_str())
            .header(http::header::AUTHORIZATION, &*authorization)
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
        sample.latency.saturating_record(micros.max(LOWEST_MICROS));
        if status == StatusCode::OK {
            sample.ok += 1;
        } else {
            *sample.errors.entry(status.as_u16()).or_default() += 1;
            if sample.first_error.is_none() {
                let text = String::from_utf8_lossy(&body);
                let text: String = text.chars().take(300).collect();
                sample.first_error = Some(format!("GET {path}: {status}: {text}"));
            }
        }
    }
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: Dataset = Dataset {
        patients: 5,
        observations_per_patient: 3,
    };

    #[test]
    fn the_mix_adds_up_to_one_hundred_percent_with_four_in_five_reads() {
        assert_eq!(MIX.iter().map(|(_, share)| share).sum::<u32>(), 100);
        let reads: u32 = MIX
            .iter()
            .filter(|(kind, _)| matches!(kind, Kind::ReadPatient | Kind::ReadObservation))
            .map(|(_, share)| share)
            .sum();
        assert_eq!(reads, 80);
    }

    #[test]
    fn picks_follow_the_mix_and_name_seeded_resources() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = BTreeMap::new();
        for _ in 0..20_000 {
            let (kind, path) = pick(&mut rng, DATA);
            *counts.entry(format!("{kind:?}")).or_insert(0u32) += 1;
            let id = path.rsplit(['/', '=']).next().unwrap();
            match kind {
                Kind::ReadPatient => assert!(id.starts_with('p') && !id.contains('-')),
                Kind::SearchFirstPage => assert_eq!(path, "/fhir/Observation?_count=10"),
                Kind::ReadObservation | Kind::SearchById => {
                    let (p, o) = id.split_once("-o").unwrap();
                    assert!(p[1..].parse::<u32>().unwrap() < DATA.patients);
                    assert!(o.parse::<u32>().unwrap() < DATA.observations_per_patient);
                }
            }
        }
        for (kind, share) in MIX {
            let seen = f64::from(counts[&format!("{kind:?}")]) / 200.0;
            assert!(
                (seen - f64::from(share)).abs() < 1.5,
                "{kind:?}: {seen}% for {share}%"
            );
        }
    }
}
