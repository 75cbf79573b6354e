//! What the machine is: cores, memory, CPU, how fast its disk makes a write
//! durable, and the code measured.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

pub struct Machine {
    pub cores: usize,
    pub memory_kib: u64,
    pub cpu: String,
    pub kernel: String,
    /// 4 KiB writes made durable with `fdatasync` per second, in the data directory's file system.
    pub fsyncs_per_second: f64,
    pub commit: String,
}

impl Machine {
    pub fn read(data_dir: &Path) -> Result<Machine> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|v| v.trim().to_owned())
            .unwrap_or_default();
        Ok(Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_kib,
            cpu,
            kernel,
            fsyncs_per_second: fsync_rate(data_dir)?,
            commit: commit(),
        })
    }
}

/// Appends 4 KiB and `fdatasync`s, 200 times, as a database's log does for
/// each commit that cannot share a flush.
fn fsync_rate(dir: &Path) -> Result<f64> {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).context("creating the fsync probe")?;
    let block = [0u8; 4096];
    let rounds = 200;
    let started = Instant::now();
    for _ in 0..rounds {
        file.write_all(&block)?;
        file.sync_data()?;
    }
    let rate = f64::from(rounds) / started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// The commit measured, with `+changes` when the tree differs from it.
fn commit() -> String {
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(head) = run(&["rev-parse", "--short=10", "HEAD"]) else {
        return "unknown (not a git checkout)".into();
    };
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}+changes")
    } else {
        head
    }
}
