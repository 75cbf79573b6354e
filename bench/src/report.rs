//! The markdown report: what was run, one table row per measured run, and the
//! audit-on to audit-off ratios of each round.

use std::fmt::Write;

use crate::load::{Sample, MIX};

/// The settings a reader needs to repeat the run.
#[derive(Debug, Clone)]
pub struct Setup {
    pub database: String,
    pub duration_secs: u64,
    pub warmup_secs: u64,
    pub concurrency: u32,
    pub patients: u32,
    pub observations: u32,
    pub rounds: u32,
}

/// One measured run.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub round: u32,
    pub audit: bool,
    pub requests: u64,
    pub errors: u64,
    /// 200 answers per second.
    pub per_second: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// CPU time used per second of the run: 2.0 is two cores busy.
    pub cpu_cores: Option<f64>,
    /// AuditEvents the store gained during the measured run.
    pub audit_events: u64,
}

impl Row {
    pub fn new(round: u32, audit: bool, sample: &Sample, audit_events: u64) -> Self {
        let ms = |q: f64| sample.latency.value_at_quantile(q) as f64 / 1000.0;
        Self {
            round,
            audit,
            requests: sample.requests(),
            errors: sample.error_count(),
            per_second: sample.ok as f64 / sample.elapsed.as_secs_f64().max(f64::EPSILON),
            p50_ms: ms(0.50),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            cpu_cores: sample
                .cpu
                .map(|cpu| cpu.as_secs_f64() / sample.elapsed.as_secs_f64().max(f64::EPSILON)),
            audit_events,
        }
    }
}

pub fn markdown(setup: &Setup, rows: &[Row]) -> String {
    let mut out = String::new();
    let mix = MIX
        .iter()
        .map(|(kind, share)| format!("{share}% {kind:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    // Writing to a String cannot fail.
    let _ = writeln!(out, "Database: {}  ", setup.database);
    let _ = writeln!(
        out,
        "Load: {} tasks for {} s per run after {} s of warm-up, {} round(s), audit off then on  ",
        setup.concurrency, setup.duration_secs, setup.warmup_secs, setup.rounds
    );
    let _ = writeln!(
        out,
        "Data: {} Patients, {} Observations  ",
        setup.patients, setup.observations
    );
    let _ = writeln!(out, "Mix: {mix}");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| round | audit | requests | errors | req/s | p50 ms | p95 ms | p99 ms | CPU (cores) | AuditEvents stored |"
    );
    let _ = writeln!(out, "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
            row.round,
            if row.audit { "on" } else { "off" },
            row.requests,
            row.errors,
            row.per_second,
            row.p50_ms,
            row.p95_ms,
            row.p99_ms,
            row.cpu_cores
                .map_or_else(|| "n/a".to_owned(), |cores| format!("{cores:.2}")),
            row.audit_events
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "req/s counts 200 answers; latencies are of every request, from sending it into the router to the end of its body; CPU is the whole process (server and load) per second of the run; AuditEvents stored is what the store gained during the measured run.\n"
    );
    for round in 1..=setup.rounds {
        let of = |audit| rows.iter().find(|r| r.round == round && r.audit == audit);
        if let (Some(off), Some(on)) = (of(false), of(true)) {
            let _ = writeln!(
                out,
                "Round {round}: audit on gives {:.0}% of the audit-off throughput; p50 {:+.2} ms, p99 {:+.2} ms; {:.2} AuditEvents per request.  ",
                100.0 * on.per_second / off.per_second.max(f64::EPSILON),
                on.p50_ms - off.p50_ms,
                on.p99_ms - off.p99_ms,
                on.audit_events as f64 / on.requests.max(1) as f64
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(audit: bool, per_second: f64, p50_ms: f64) -> Row {
        Row {
            round: 1,
            audit,
            requests: 1000,
            errors: 0,
            per_second,
            p50_ms,
            p95_ms: p50_ms * 2.0,
            p99_ms: p50_ms * 3.0,
            cpu_cores: audit.then_some(1.25),
            audit_events: if audit { 1500 } else { 0 },
        }
    }

    #[test]
    fn the_report_has_a_row_per_run_and_the_ratio_of_each_round() {
        let setup = Setup {
            database: "SQLite".into(),
            duration_secs: 10,
            warmup_secs: 1,
            concurrency: 16,
            patients: 200,
            observations: 600,
            rounds: 1,
        };
        let text = markdown(&setup, &[row(false, 1000.0, 1.0), row(true, 800.0, 1.5)]);
        assert!(text.contains("| 1 | off | 1000 | 0 | 1000 | 1.00 | 2.00 | 3.00 | n/a | 0 |"));
        assert!(text.contains("| 1 | on | 1000 | 0 | 800 | 1.50 | 3.00 | 4.50 | 1.25 | 1500 |"));
        assert!(text.contains("audit on gives 80% of the audit-off throughput; p50 +0.50 ms"));
        assert!(text.contains("1.50 AuditEvents per request"));
    }
}
