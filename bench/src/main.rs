//! `read-heavy`: Haven's throughput on a read-heavy load with audit off and on.
//!
//! Both configurations are the `haven-api` router with SMART on, over the same
//! store; the second also has audit on, so every request waits for its
//! AuditEvents to be committed (in groups) before it is answered. Requests go
//! through the router in process: no TLS, no sockets, no HTTP parsing, so what
//! differs between the two runs is the audit trail alone.
//!
//! `read-heavy search` is the search benchmark ([`search`]): the same server
//! with audit on, a fixed mix of searches over the Synthea patients loaded once
//! and ten times over.

mod load;
mod report;
mod search;
mod setup;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use haven_store::Backend;
use tracing_subscriber::EnvFilter;

use crate::load::Load;
use crate::report::{Row, Setup};
use crate::setup::{Bench, Dataset};

/// Long enough for the router, the store's pools and the audit writer to be
/// busy before anything is counted.
const WARMUP: Duration = Duration::from_secs(1);
const OBSERVATIONS_PER_PATIENT: u32 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "read-heavy",
    about = "Haven's read-heavy throughput with audit off and on, side by side",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    read_heavy: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Search throughput and p50/p99 latency for a fixed mix of searches over
    /// the Synthea patients, loaded once and then ten times over, audit on.
    Search(search::Args),
}

/// The read-heavy benchmark's flags (no subcommand).
#[derive(Debug, clap::Args)]
struct Args {
    /// `sqlite:<path>` or `postgres://...`; default: a fresh SQLite file in a
    /// temporary directory, removed at the end.
    #[arg(long)]
    database_url: Option<String>,
    /// Length of each measured run, after one second of warm-up.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Requests in flight at once: one task each.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Patients to seed, each with three Observations.
    #[arg(long, default_value_t = 200)]
    patients: u32,
    /// Rounds of audit off then audit on, to show how stable the numbers are.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Also write the markdown result to this file.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(Command::Search(args)) = cli.command {
        return search::run(args).await;
    }
    let args = cli.read_heavy;
    ensure!(args.duration_secs > 0, "--duration-secs must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.patients > 0, "--patients must be at least 1");
    ensure!(args.rounds > 0, "--rounds must be at least 1");

    // Kept until the end so the default database outlives every run.
    let scratch = tempfile::tempdir().context("creating a temporary directory")?;
    let (database_url, database) = match &args.database_url {
        Some(url) => (url.clone(), describe(url)?),
        None => (
            format!("sqlite:{}", scratch.path().join("bench.db").display()),
            "SQLite, a fresh file in a temporary directory".to_owned(),
        ),
    };
    let duration = Duration::from_secs(args.duration_secs);
    // A token is minted per run and must last through its warm-up and run.
    let token_lifetime = time::Duration::try_from(duration + WARMUP)
        .context("--duration-secs is too large")?
        + time::Duration::minutes(1);
    let bench = Bench::start(&database_url, token_lifetime).await?;
    let data = Dataset {
        patients: args.patients,
        observations_per_patient: OBSERVATIONS_PER_PATIENT,
    };
    eprintln!(
        "seeding {} Patients and {} Observations",
        data.patients,
        data.patients * data.observations_per_patient
    );
    bench.seed(data).await?;

    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for round in 1..=args.rounds {
        for audit in [false, true] {
            let load = Load {
                concurrency: args.concurrency,
                duration,
                data,
                seed: u64::from(round),
            };
            let row = measure(&bench, round, audit, load, &mut notes).await?;
            eprintln!(
                "round {round}, audit {}: {} requests, {} errors, {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} AuditEvents",
                if audit { "on" } else { "off" },
                row.requests,
                row.errors,
                row.per_second,
                row.p50_ms,
                row.p99_ms,
                row.audit_events
            );
            rows.push(row);
        }
    }

    let setup = Setup {
        database,
        duration_secs: args.duration_secs,
        warmup_secs: WARMUP.as_secs(),
        concurrency: args.concurrency,
        patients: data.patients,
        observations: data.patients * data.observations_per_patient,
        rounds: args.rounds,
    };
    let mut text = report::markdown(&setup, &rows);
    for note in notes {
        text.push_str(&format!("\n{note}\n"));
    }
    print!("{text}");
    if let Some(path) = &args.output {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Warms up, then measures one configuration, and checks from the store that
/// audit was on or off as claimed.
async fn measure(
    bench: &Bench,
    round: u32,
    audit: bool,
    load: Load,
    notes: &mut Vec<String>,
) -> Result<Row> {
    let router = if audit {
        &bench.audit_on
    } else {
        &bench.audit_off
    };
    let label = if audit { "on" } else { "off" };
    let token = bench.token().await?;
    let warmup = load::run(
        router,
        &token,
        Load {
            duration: WARMUP,
            ..load
        },
    )
    .await?;
    if warmup.ok == 0 {
        bail!(
            "audit {label}: no request succeeded during the warm-up; first error: {}",
            warmup.first_error.as_deref().unwrap_or("none")
        );
    }
    // Every warm-up request was answered, so its AuditEvents are already stored.
    let before = bench.audit_events().await?;
    let sample = load::run(router, &token, load).await?;
    let after = bench.audit_events().await?;
    let stored = after
        .checked_sub(before)
        .context("the number of AuditEvents went down during a run")?;
    if audit && stored < sample.requests() {
        bail!(
            "audit on: {} requests were answered but only {stored} AuditEvents were stored",
            sample.requests()
        );
    }
    if !audit && stored != 0 {
        bail!("audit off: {stored} AuditEvents were stored, so audit was not off");
    }
    if let Some(error) = &sample.first_error {
        notes.push(format!(
            "Round {round}, audit {label}: {} errors {:?} (status: count); the first: {error}",
            sample.error_count(),
            sample.errors
        ));
    }
    Ok(Row::new(round, audit, &sample, stored))
}

/// The database as the report names it; never the URL, which may hold a password.
fn describe(database_url: &str) -> Result<String> {
    Ok(match haven_store::backend_of(database_url)? {
        Backend::Sqlite => "SQLite file".to_owned(),
        Backend::Postgres => "PostgreSQL".to_owned(),
    })
}
