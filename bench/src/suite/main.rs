//! The benchmark suite: the real `haven` binary on a fresh data directory,
//! over HTTPS on loopback, with every security stage on, against the
//! machine's own ceilings. One command runs it all (see `bench/README.md`):
//! SQLite, then PostgreSQL.

// The same allocator as the server, so that the ceilings measured in this
// process (the store without HTTP) compare with the server's numbers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod ceiling;
mod drive;
mod machine;
mod report;
mod run;
mod smart;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Haven's benchmark suite: P1..P6 and their ceilings, on SQLite then PostgreSQL")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The minimal HTTPS endpoint the suite compares reads with (started by the suite).
    #[command(hide = true)]
    CeilingServer(ceiling::ServerArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Which backends to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    pub backends: Vec<run::BackendKind>,
    /// A PostgreSQL server where a fresh database may be created (and is dropped after).
    #[arg(
        long,
        env = "HAVEN_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    /// The shared folder holding `synthea/`; `$HAVEN_SHARED`, else `../shared`.
    #[arg(long)]
    pub shared: Option<PathBuf>,
    /// Length of each measured run, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Warm-up before each measured run, in seconds, not counted.
    #[arg(long, default_value_t = 3)]
    pub warmup_secs: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Copies of the Synthea corpus in the large data set of P4.
    #[arg(long, default_value_t = 10)]
    pub copies: u32,
    /// Bundles `haven load` posts at once.
    #[arg(long, default_value_t = 4)]
    pub load_concurrency: usize,
    /// Seeds every random choice of the load.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

impl Args {
    pub fn warmup(&self) -> Duration {
        Duration::from_secs(self.warmup_secs)
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_secs)
    }

    pub fn shared_dir(&self) -> PathBuf {
        self.shared
            .clone()
            .or_else(|| std::env::var_os("HAVEN_SHARED").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("../shared"))
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Command::CeilingServer(args)) = cli.command {
        return ceiling::serve(args);
    }
    // The load generator takes one core at most: a single-threaded runtime.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&runtime, run::all(cli.args.clone()))?;
    let markdown = report::markdown(&report, &cli.args);
    print!("{markdown}");
    if let Some(path) = &cli.args.output {
        std::fs::write(path, &markdown)?;
    }
    Ok(())
}
