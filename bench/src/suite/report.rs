//! The suite's results as markdown: the machine, the command, and per backend
//! a table of every measurement with its target and its ceiling.

use std::fmt::Write;

use crate::run::{BackendKind, Report, Row};
use crate::Args;

pub fn markdown(report: &Report, args: &Args) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let _ = writeln!(out, "## Run of {}\n", report.started);
    let _ = writeln!(out, "- Commit: `{}`", m.commit);
    let _ = writeln!(
        out,
        "- Machine: {} cores, {:.1} GiB memory, CPU \"{}\", kernel {}",
        m.cores,
        m.memory_kib as f64 / 1024.0 / 1024.0,
        m.cpu,
        m.kernel
    );
    let _ = writeln!(
        out,
        "- Disk: {:.0} durable 4 KiB writes per second (`write` + `fdatasync`, one at a time, in the temporary directory)",
        m.fsyncs_per_second
    );
    let _ = writeln!(
        out,
        "- Load: {} connections (HTTP/1.1 over TLS 1.3, loopback), {} s warm-up then {} s measured per run, seed {}; the load generator runs on one thread",
        args.concurrency, args.warmup_secs, args.duration_secs, args.seed
    );
    let _ = writeln!(out, "- Finished: {}", report.finished);
    let _ = writeln!(out, "- Command: `bench/run{}`\n", command_flags(args));
    for backend in &report.backends {
        let name = match backend.kind {
            BackendKind::Sqlite => "SQLite (the server's default: a file in the data directory, WAL, `synchronous=FULL`)",
            BackendKind::Postgres => "PostgreSQL (a fresh database on 127.0.0.1; the machine's server settings)",
        };
        let _ = writeln!(out, "### {name}\n");
        let _ = writeln!(
            out,
            "| | measured | rate | errors | p50 ms | p99 ms | target | met | of ceiling | server cores | generator cores |"
        );
        let _ = writeln!(out, "|:--|:--|--:|--:|--:|--:|:--|:--|--:|--:|--:|");
        for row in &backend.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.id,
                row.what.replace('|', "\\|"),
                row.per_second,
                row.unit,
                row.errors,
                opt(row.p50_ms),
                opt(row.p99_ms),
                target(row),
                met(row),
                ratio(row, &backend.rows),
                opt(row.server_cores),
                opt(row.generator_cores),
            );
        }
        let p6 = backend.peak_rss_kib as f64 / 1024.0;
        let _ = writeln!(
            out,
            "| P6 | peak resident memory of the server (`VmHWM`) over all of the above | {p6:.0} MiB | | | | < 200 MiB | {} | | | |",
            if p6 < 200.0 { "yes" } else { "**no**" }
        );
        let _ = writeln!(out);
        if let Some((one, ten)) = p50_ratio(&backend.rows) {
            let _ = writeln!(
                out,
                "P4: p50 at 10x is {:.2} times the p50 at 1x (target: at most 1.5): {}.\n",
                ten / one,
                if ten / one <= 1.5 {
                    "met"
                } else {
                    "**not met**"
                }
            );
        }
        let _ = writeln!(
            out,
            "Server memory (RSS) after each phase: {}.\n",
            backend
                .memory
                .iter()
                .map(|(phase, kib)| format!("{phase} {:.0} MiB", *kib as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join("; ")
        );
        for row in backend.rows.iter().filter(|r| r.first_error.is_some()) {
            let _ = writeln!(
                out,
                "First unexpected answer in {}: `{}`\n",
                row.id,
                row.first_error
                    .as_deref()
                    .unwrap_or_default()
                    .replace('`', "'")
            );
        }
        for note in &backend.notes {
            let _ = writeln!(out, "{note}\n");
        }
    }
    out
}

fn command_flags(args: &Args) -> String {
    let mut flags = String::new();
    let defaults = [
        (
            args.duration_secs != 10,
            format!(" --duration-secs {}", args.duration_secs),
        ),
        (
            args.warmup_secs != 3,
            format!(" --warmup-secs {}", args.warmup_secs),
        ),
        (
            args.concurrency != 16,
            format!(" --concurrency {}", args.concurrency),
        ),
        (args.copies != 10, format!(" --copies {}", args.copies)),
        (args.seed != 1, format!(" --seed {}", args.seed)),
    ];
    for (changed, flag) in defaults {
        if changed {
            flags.push_str(&flag);
        }
    }
    if args.backends.len() != 2 {
        let names: Vec<&str> = args
            .backends
            .iter()
            .map(|b| match b {
                BackendKind::Sqlite => "sqlite",
                BackendKind::Postgres => "postgres",
            })
            .collect();
        let _ = write!(flags, " --backends {}", names.join(","));
    }
    flags
}

fn opt(value: Option<f64>) -> String {
    value.map_or(String::new(), |v| format!("{v:.2}"))
}

fn target(row: &Row) -> String {
    let mut parts = Vec::new();
    if let Some(min) = row.goal.min_per_second {
        parts.push(format!("≥ {min:.0}/s"));
    }
    if let Some(max) = row.goal.max_p99_ms {
        parts.push(format!("p99 < {max:.0} ms"));
    }
    parts.join(", ")
}

fn met(row: &Row) -> &'static str {
    let goal = row.goal;
    if goal.min_per_second.is_none() && goal.max_p99_ms.is_none() {
        return "";
    }
    let fast = goal.min_per_second.is_none_or(|min| row.per_second >= min);
    let quick = goal
        .max_p99_ms
        .is_none_or(|max| row.p99_ms.is_some_and(|p| p < max));
    if fast && quick && row.errors == 0 {
        "yes"
    } else {
        "**no**"
    }
}

fn ratio(row: &Row, rows: &[Row]) -> String {
    let Some(ceiling) = row
        .ceiling
        .as_deref()
        .and_then(|id| rows.iter().find(|r| r.id == id))
    else {
        return String::new();
    };
    if ceiling.per_second <= 0.0 {
        return String::new();
    }
    format!(
        "{:.0}% of {}",
        100.0 * row.per_second / ceiling.per_second,
        ceiling.id
    )
}

/// The mix's p50 at 1x and at the larger size.
fn p50_ratio(rows: &[Row]) -> Option<(f64, f64)> {
    let all: Vec<&Row> = rows
        .iter()
        .filter(|r| r.id.starts_with("P4 ") && r.goal.min_per_second.is_some())
        .collect();
    match all.as_slice() {
        [one, ten] => Some((one.p50_ms?, ten.p50_ms?)),
        _ => None,
    }
}
