//! `haven`, the FHIR R4 server binary.
//!
//! This is the one place that reads the environment, configuration files and
//! certificates. It layers the configuration ([`config`]), chooses the storage backend
//! by the database URL (through `haven_store::connect`), and serves the `haven-api`
//! router over TLS ([`serve`], [`tls`]). `haven load` ([`load`]) is a client of a
//! running server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use haven_model::clock::{Clock, SystemClock};
use tracing_subscriber::EnvFilter;

// glibc's allocator took a fifth of the server's CPU during reads under load
// (bench/RESULTS.md, "P1 read: the allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod config;
mod demo;
mod load;
mod sample;
mod serve;
mod signing_keys;
mod tls;

use config::{Config, Layer, LogFormat};

#[derive(Debug, Parser)]
#[command(name = "haven", version, about = "A FHIR R4 server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the FHIR API over HTTPS.
    Serve(ServeArgs),
    /// Start a populated, SMART-ready demo server: generated patients, a demo
    /// app, and a patient, a practitioner and an administrator to sign in as.
    Demo(DemoArgs),
    /// Write generated sample patients as transaction Bundles for `haven load`.
    Sample(SampleArgs),
    /// Bring the database schema up to date and exit.
    Migrate(DatabaseArgs),
    /// Post transaction Bundles from files or folders to a running server.
    Load(LoadArgs),
    /// Register and list SMART client applications.
    Clients {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        command: admin::ClientsCommand,
    },
    /// Add users who sign in on the authorization pages.
    Users {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        command: admin::UsersCommand,
    },
    /// Manage the token signing keys.
    Keys {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        command: admin::KeysCommand,
    },
    /// Label the stored data as the sensitivity value sets say (after they change).
    Labels {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        command: admin::LabelsCommand,
    },
    /// Check the audit trail.
    Audit {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        command: admin::AuditCommand,
    },
}

/// Settings that every command touching the database shares.
#[derive(Debug, Clone, Args)]
struct DatabaseArgs {
    /// Where the server keeps its data: the SQLite database, TLS files, `haven.toml`.
    /// [env: HAVEN_DATA_DIR] [default: ./haven-data]
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// A configuration file to read instead of `<data-dir>/haven.toml`. [env: HAVEN_CONFIG]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// `sqlite:PATH` or `postgres://USER@HOST/DB`. [env: HAVEN_DATABASE_URL]
    /// [default: sqlite:<data-dir>/haven.db]
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Log line format. [env: HAVEN_LOG_FORMAT] [default: human]
    #[arg(long, value_enum, global = true)]
    log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Args)]
struct ServeArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// The address to listen on. [env: HAVEN_LISTEN]
    /// [default: 127.0.0.1:8443]
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// The URL clients reach the server at; the FHIR base is `<public-url>/fhir`.
    /// [env: HAVEN_PUBLIC_URL] [default: https://localhost:<port>]
    #[arg(long)]
    public_url: Option<String>,
    /// A PEM certificate chain to serve instead of the generated local one.
    /// [env: HAVEN_TLS_CERT]
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`. [env: HAVEN_TLS_KEY]
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve plain HTTP instead of HTTPS (loopback only, for development).
    /// [env: HAVEN_INSECURE_HTTP]
    #[arg(long)]
    insecure_http: bool,
    /// Largest accepted request body in bytes. [env: HAVEN_MAX_BODY_BYTES]
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Deepest accepted JSON nesting. [env: HAVEN_MAX_JSON_DEPTH]
    #[arg(long)]
    max_json_depth: Option<usize>,
    /// Largest accepted total size of request headers in bytes. [env: HAVEN_MAX_HEADER_BYTES]
    #[arg(long)]
    max_header_bytes: Option<usize>,
    /// Longest a request may run, in seconds. [env: HAVEN_REQUEST_TIMEOUT_SECS]
    #[arg(long)]
    request_timeout_secs: Option<u64>,
    /// Most entries a batch or transaction Bundle may carry. [env: HAVEN_MAX_BUNDLE_ENTRIES]
    #[arg(long)]
    max_bundle_entries: Option<usize>,
}

#[derive(Debug, Clone, Args)]
struct DemoArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// How many patients to generate on the first start.
    #[arg(long, default_value_t = demo::DEFAULT_PATIENTS)]
    patients: usize,
    /// The sample's seed; the same seed gives the same patients.
    #[arg(long, default_value_t = haven_sample::DEFAULT_SEED)]
    seed: u64,
    /// The demo patient's password (default: generated and printed once).
    #[arg(long)]
    patient_password: Option<String>,
    /// The demo practitioner's password (default: generated and printed once).
    #[arg(long)]
    practitioner_password: Option<String>,
    /// The demo administrator's password (default: generated and printed once).
    #[arg(long)]
    admin_password: Option<String>,
}

#[derive(Debug, Clone, Args)]
struct SampleArgs {
    /// How many patients to generate.
    #[arg(long, default_value_t = 100)]
    patients: usize,
    /// The folder to write the Bundles to (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// The same seed gives byte-identical Bundles.
    #[arg(long, default_value_t = haven_sample::DEFAULT_SEED)]
    seed: u64,
}

#[derive(Debug, Clone, Args)]
struct LoadArgs {
    /// Bundle files, or folders searched recursively for `*.json`.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// The server's FHIR base URL.
    #[arg(long, default_value = "https://localhost:8443/fhir")]
    server: String,
    /// A PEM CA certificate to trust, e.g. `<data-dir>/tls/ca.pem` of a local server.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Allow a plain `http://` server URL; only on a loopback address.
    #[arg(long)]
    insecure_http: bool,
    /// How many bundles are in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// How long one bundle may take, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Log line format.
    #[arg(long, value_enum, default_value = "human")]
    log_format: LogFormat,
    /// The SMART Backend Services client ID to get access tokens as; needs
    /// `--private-key`. Without both, bundles are sent without a token.
    #[arg(long, requires = "private_key")]
    client_id: Option<String>,
    /// The PEM private key (RSA or EC P-384) registered for `--client-id`.
    #[arg(long, requires = "client_id")]
    private_key: Option<PathBuf>,
    /// The scopes to ask for, space-separated; needs `--client-id`.
    #[arg(long, default_value = "system/*.cruds", requires = "client_id")]
    scope: String,
}

impl LoadArgs {
    /// clap has made sure the client ID and key come together.
    fn auth(&self) -> Option<load::LoadAuth> {
        let (client_id, private_key) = (self.client_id.clone()?, self.private_key.clone()?);
        Some(load::LoadAuth {
            client_id,
            private_key,
            scope: self.scope.clone(),
        })
    }
}

impl DatabaseArgs {
    fn layer(&self) -> Layer {
        Layer {
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            log_format: self.log_format,
            ..Layer::default()
        }
    }
}

impl ServeArgs {
    fn layer(&self) -> Layer {
        let mut layer = self.database.layer();
        layer.listen = self.listen;
        layer.public_url = self.public_url.clone();
        layer.tls_cert = self.tls_cert.clone();
        layer.tls_key = self.tls_key.clone();
        // An absent switch says nothing, so the file or environment may still turn it on.
        layer.insecure_http = self.insecure_http.then_some(true);
        layer.limits.max_body_bytes = self.max_body_bytes;
        layer.limits.max_json_depth = self.max_json_depth;
        layer.limits.max_header_bytes = self.max_header_bytes;
        layer.limits.request_timeout_secs = self.request_timeout_secs;
        layer.limits.max_bundle_entries = self.max_bundle_entries;
        layer
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The one time source every command takes its timestamps from.
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    match cli.command {
        Command::Serve(args) => {
            let config = config::load(args.database.config.as_deref(), &env, args.layer())?;
            init_logging(config.log_format, &config.log)?;
            runtime.block_on(serve::run(config, clock))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            let config = config::load(
                args.serve.database.config.as_deref(),
                &env,
                args.serve.layer(),
            )?;
            // Request lines would scroll the instructions away; HAVEN_LOG brings them back.
            let filter = env_value(&env, "HAVEN_LOG").unwrap_or("warn");
            init_logging(config.log_format, filter)?;
            let options = demo::DemoOptions {
                patients: args.patients,
                seed: args.seed,
                patient_password: args.patient_password,
                practitioner_password: args.practitioner_password,
                admin_password: args.admin_password,
            };
            runtime.block_on(demo::run(config, clock, options))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sample(args) => {
            let options = haven_sample::Options {
                patients: args.patients,
                seed: args.seed,
            };
            let sample = sample::write(&args.out, options)?;
            println!("{}", sample::describe(&sample, &args.out, args.seed));
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate(args) => {
            let config = config::load(args.config.as_deref(), &env, args.layer())?;
            init_logging(config.log_format, &config.log)?;
            runtime.block_on(migrate(&config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Clients { database, command } => {
            let config = config::load(database.config.as_deref(), &env, database.layer())?;
            init_logging(config.log_format, "warn")?;
            print_json(&runtime.block_on(admin::clients(&config, clock, command))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Users { database, command } => {
            let config = config::load(database.config.as_deref(), &env, database.layer())?;
            init_logging(config.log_format, "warn")?;
            print_json(&runtime.block_on(admin::users(&config, clock, command))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { database, command } => {
            let config = config::load(database.config.as_deref(), &env, database.layer())?;
            init_logging(config.log_format, "warn")?;
            print_json(&runtime.block_on(admin::keys(&config, clock, command))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Labels { database, command } => {
            let config = config::load(database.config.as_deref(), &env, database.layer())?;
            init_logging(config.log_format, "warn")?;
            print_json(&runtime.block_on(admin::labels(&config, clock, command))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { database, command } => {
            let checked = config::load(database.config.as_deref(), &env, database.layer())
                .and_then(|config| {
                    init_logging(config.log_format, "warn")?;
                    runtime.block_on(admin::audit(&config, clock, command))
                });
            Ok(match checked {
                Ok(admin::TrailCheck::Verified(report)) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Ok(admin::TrailCheck::Broken(report)) => {
                    println!("{report}");
                    ExitCode::from(admin::TRAIL_BROKEN)
                }
                // Told apart from a broken trail: nothing was verified.
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::from(admin::TRAIL_UNCHECKED)
                }
            })
        }
        Command::Load(args) => {
            let filter = env_value(&env, "HAVEN_LOG").unwrap_or("warn");
            init_logging(args.log_format, filter)?;
            let auth = args.auth();
            let options = load::LoadOptions {
                paths: args.paths,
                server: args.server,
                ca_file: args.ca_file,
                insecure_http: args.insecure_http,
                concurrency: args.concurrency,
                timeout: Duration::from_secs(args.timeout_secs),
                auth,
            };
            let summary = runtime.block_on(load::run(options))?;
            Ok(if summary.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

fn env_value<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

async fn migrate(config: &Config) -> Result<()> {
    if let Some(dir) = sqlite_parent_dir(&config.database_url) {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    haven_store::migrate(&config.database_url)
        .await
        .context("migrating the database")?;
    println!("haven: the database schema is up to date");
    Ok(())
}

/// The folder a SQLite database file will live in, so it can be created first.
pub(crate) fn sqlite_parent_dir(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("sqlite:")?;
    let path = path.trim_start_matches("//");
    let path = path.split('?').next()?;
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    PathBuf::from(path).parent().map(PathBuf::from)
}

/// Logs go to standard error, so standard output carries only what the commands
/// print for people and scripts (the listening line, the load summary).
fn init_logging(format: LogFormat, filter: &str) -> Result<()> {
    let filter = EnvFilter::try_new(filter)
        .with_context(|| format!("invalid log filter {filter:?} (HAVEN_LOG)"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn an_absent_insecure_http_switch_leaves_the_setting_to_other_layers() {
        let cli = Cli::parse_from(["haven", "serve"]);
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        assert_eq!(args.layer().insecure_http, None);
        let cli = Cli::parse_from(["haven", "serve", "--insecure-http", "--max-body-bytes", "7"]);
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        assert_eq!(args.layer().insecure_http, Some(true));
        assert_eq!(args.layer().limits.max_body_bytes, Some(7));
    }

    #[test]
    fn load_credentials_are_given_both_or_neither() {
        use clap::error::ErrorKind;
        let load = |extra: &[&str]| {
            let mut argv = vec!["haven", "load", "bundles"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Load(args) => args,
                _ => panic!("expected load"),
            })
        };
        assert!(load(&[]).unwrap().auth().is_none());
        let both = load(&["--client-id", "loader", "--private-key", "key.pem"]).unwrap();
        let auth = both.auth().unwrap();
        assert_eq!(auth.client_id, "loader");
        assert_eq!(auth.private_key, PathBuf::from("key.pem"));
        assert_eq!(auth.scope, "system/*.cruds");
        for lone in [
            &["--client-id", "loader"][..],
            &["--private-key", "key.pem"],
            &["--scope", "system/Patient.c"],
        ] {
            let err = load(lone).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument, "{lone:?}");
        }
        let scoped = load(&[
            "--client-id",
            "loader",
            "--private-key",
            "key.pem",
            "--scope",
            "system/Patient.c system/Observation.c",
        ])
        .unwrap();
        assert_eq!(
            scoped.auth().unwrap().scope,
            "system/Patient.c system/Observation.c"
        );
    }

    #[test]
    fn the_sqlite_folder_is_found_in_the_url() {
        assert_eq!(
            sqlite_parent_dir("sqlite:/data/haven.db?mode=rwc"),
            Some(PathBuf::from("/data"))
        );
        assert_eq!(sqlite_parent_dir("postgres://db/haven"), None);
    }
}
