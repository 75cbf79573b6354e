//! The harness for Haven's end-to-end tests: it runs the real `haven` binary.
//!
//! Cargo gives integration tests the path of a binary only within the binary's own
//! package, so the harness finds `haven` beside the test executable: a test runs
//! from `<target>/debug/deps/`, and the binary is `<target>/debug/haven`. Each test
//! process first runs `cargo build -p haven` once (a no-op when it is up to date), so
//! a stale binary is never tested. `HAVEN_BIN` names another binary instead.
//!
//! [`spawn_haven`] starts a server on `127.0.0.1:0` with its own data directory, waits
//! for the line it prints once ready, reads the port from it, and returns a [`Haven`]
//! whose HTTPS client trusts the server's generated CA. Dropping a [`Haven`] kills the
//! process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// How long a server may take to open its database and start listening.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// The workspace root, for resolving relative paths given in the environment.
/// The resource types the server labels (the list and the other
/// clinical types whose codes or references tell the same story).
pub const LABELED_TYPES: &[&str] = &[
    "Condition",
    "Observation",
    "Procedure",
    "MedicationRequest",
    "MedicationStatement",
    "MedicationAdministration",
    "DiagnosticReport",
    "Encounter",
    "CarePlan",
    "CareTeam",
    "Goal",
    "Claim",
    "ExplanationOfBenefit",
    "DocumentReference",
];

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test package lives inside the workspace")
        .to_path_buf()
}

/// The `haven` binary under test, brought up to date on first use.
pub fn haven_binary() -> Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| build_binary().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("HAVEN_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("HAVEN_BIN={} does not exist", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("finding the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not in <target>/<profile>/deps")?;
    let binary = profile_dir.join("haven");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "-q", "-p", "haven"])
        .current_dir(workspace_root());
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().context("running cargo build -p haven")?;
    if !status.success() || !binary.is_file() {
        bail!(
            "`cargo build -p haven` did not produce {}",
            binary.display()
        );
    }
    Ok(binary)
}

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct HavenOptions {
    /// Reuse this data directory (for restarts); a fresh temporary one otherwise.
    pub data_dir: Option<PathBuf>,
    /// `--database-url`; SQLite in the data directory otherwise.
    pub database_url: Option<String>,
    pub insecure_http: bool,
    /// `--listen`; `127.0.0.1:0` otherwise.
    pub listen: Option<String>,
    /// Further arguments for `haven serve`.
    pub extra_args: Vec<String>,
    /// `demo` runs `haven demo` instead of `haven serve`, and waits until it
    /// says the sample is in.
    pub command: Option<String>,
}

/// The line `haven demo` prints once its data is loaded.
pub const DEMO_READY: &str = "haven demo ready";

/// A running `haven serve`.
pub struct Haven {
    child: Child,
    /// Kept so the directory lives as long as the server.
    _temp_dir: Option<tempfile::TempDir>,
    pub data_dir: PathBuf,
    /// `--database-url` when not the SQLite file in the data directory.
    pub database_url: Option<String>,
    /// The address the server bound.
    pub addr: std::net::SocketAddr,
    /// The FHIR base URL through the bound address, e.g. `https://127.0.0.1:43121/fhir`.
    pub base_url: String,
    /// The FHIR base URL the server announced (its public URL).
    pub announced_base_url: String,
    /// The CA certificate (PEM) that signed the server's certificate; `None` over HTTP.
    pub ca_pem: Option<Vec<u8>>,
    log_path: PathBuf,
    stdout_lines: std::sync::Arc<Mutex<Vec<String>>>,
}

impl Haven {
    /// An HTTP client that trusts the server's CA and nothing else.
    pub fn client(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(300));
        if let Some(pem) = &self.ca_pem {
            let ca = reqwest::Certificate::from_pem(pem).expect("the CA file is PEM");
            builder = builder.add_root_certificate(ca);
        }
        builder.build().expect("the client configuration is valid")
    }

    /// `base_url` joined with a path such as `Patient/123`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base_url, path.trim_start_matches('/'))
    }

    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("tls").join("ca.pem")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process at once (SIGKILL), as a crash or power loss would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                bail!("haven did not stop within {timeout:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the server wrote to standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Everything the server printed on standard output so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout_lines.lock().expect("not poisoned").clone()
    }

    /// Hands the temporary data directory to the caller, so it outlives this server
    /// and a restart can use it.
    pub fn keep_data_dir(&mut self) -> Option<tempfile::TempDir> {
        self._temp_dir.take()
    }
}

/// A registered SMART Backend Services client: its id and private key file.
#[derive(Debug, Clone)]
pub struct BackendClient {
    pub client_id: String,
    pub key_file: PathBuf,
}

impl Haven {
    /// Registers a Backend Services client allowed `scope` (e.g. `system/*.cruds`)
    /// with `haven clients add`, its RS384 key pair kept in the data directory.
    pub fn register_backend_client(&self, scope: &str) -> Result<BackendClient> {
        self.register_backend_client_with(scope, &[])
    }

    /// [`Haven::register_backend_client`] with more `haven clients add`
    /// arguments (e.g. `--clearance V:*`).
    pub fn register_backend_client_with(
        &self,
        scope: &str,
        extra: &[&str],
    ) -> Result<BackendClient> {
        let key = haven_auth::client::ClientKey::generate_rsa();
        let name = uuid::Uuid::new_v4().simple().to_string();
        let key_file = self.data_dir.join(format!("client-{name}.pem"));
        let jwks_file = self.data_dir.join(format!("client-{name}.jwks.json"));
        std::fs::write(&key_file, key.to_pem())?;
        std::fs::write(&jwks_file, key.jwks().to_string())?;
        let data_dir = self.data_dir.display().to_string();
        let jwks = jwks_file.display().to_string();
        let mut args = vec![
            "clients",
            "add",
            "--data-dir",
            &data_dir,
            "--name",
            "Test loader",
            "--backend",
            "--jwks",
            &jwks,
            "--scope",
            scope,
            "--organization",
            "Haven tests",
            "--contact",
            "tests@haven.invalid",
        ];
        args.extend_from_slice(extra);
        // The command must write where the server reads.
        if let Some(url) = &self.database_url {
            args.extend(["--database-url", url.as_str()]);
        }
        let output = run_haven(&args)?;
        if !output.status.success() {
            bail!(
                "haven clients add failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let client: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("haven clients add prints JSON")?;
        let client_id = client["client_id"]
            .as_str()
            .context("the printed client has an id")?
            .to_string();
        Ok(BackendClient {
            client_id,
            key_file,
        })
    }

    /// `haven load <path>` against this server as `loader`, ready to run (a
    /// long load can be moved to a blocking task); the caller judges the exit
    /// status and what was printed.
    pub fn load_command(&self, path: &Path, loader: &BackendClient) -> Result<Command> {
        let mut command = Command::new(haven_binary()?);
        command
            .arg("load")
            .arg(path)
            .args(["--server", &self.base_url, "--ca-file"])
            .arg(self.ca_file())
            .args(["--client-id", &loader.client_id, "--private-key"])
            .arg(&loader.key_file);
        Ok(command)
    }

    /// A bearer token for `scope` through SMART Backend Services.
    pub async fn system_token(&self, scope: &str) -> Result<String> {
        self.system_token_with(scope, &[]).await
    }

    /// [`Haven::system_token`] for a client registered with more `haven clients
    /// add` arguments (e.g. `--clearance V:*` to count labeled data too).
    pub async fn system_token_with(&self, scope: &str, extra: &[&str]) -> Result<String> {
        let registered = self.register_backend_client_with(scope, extra)?;
        let key = haven_auth::client::ClientKey::from_pem(&std::fs::read_to_string(
            &registered.key_file,
        )?)?;
        let client = haven_auth::client::BackendServicesClient::new(
            self.base_url.parse()?,
            registered.client_id,
            key,
            scope,
            self.client(),
        );
        client
            .access_token()
            .await
            .with_context(|| format!("getting a token; the server's log:\n{}", self.log()))
    }
}

impl Drop for Haven {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `haven` with arguments to completion, for commands that do not serve.
pub fn run_haven(args: &[&str]) -> Result<std::process::Output> {
    Command::new(haven_binary()?)
        .args(args)
        .env_remove("HAVEN_DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .context("running haven")
}

/// Starts `haven serve` and waits until it listens.
pub async fn spawn_haven(options: HavenOptions) -> Result<Haven> {
    tokio::task::spawn_blocking(move || spawn_blocking(options)).await?
}

fn spawn_blocking(options: HavenOptions) -> Result<Haven> {
    let binary = haven_binary()?;
    let (temp_dir, data_dir) = match options.data_dir {
        Some(dir) => (None, dir),
        None => {
            let dir = tempfile::Builder::new().prefix("haven-e2e-").tempdir()?;
            let path = dir.path().to_path_buf();
            (Some(dir), path)
        }
    };
    std::fs::create_dir_all(&data_dir)?;
    let log_path = data_dir.join(format!("haven-{}.log", uuid::Uuid::new_v4().simple()));
    let log = std::fs::File::create(&log_path)?;

    let subcommand = options.command.as_deref().unwrap_or("serve");
    let mut command = Command::new(&binary);
    command
        .arg(subcommand)
        .arg("--listen")
        .arg(options.listen.as_deref().unwrap_or("127.0.0.1:0"))
        .arg("--data-dir")
        .arg(&data_dir);
    if let Some(url) = &options.database_url {
        command.arg("--database-url").arg(url);
    }
    if options.insecure_http {
        command.arg("--insecure-http");
    }
    command.args(&options.extra_args);
    // The server must see only what the test gives it.
    for (key, _) in std::env::vars() {
        if key.starts_with("HAVEN_") && key != "HAVEN_LOG" {
            command.env_remove(key);
        }
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;

    let stdout = child.stdout.take().expect("stdout is piped");
    let lines = std::sync::Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = mpsc::channel();
    {
        let lines = lines.clone();
        // Keeps reading after readiness so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("haven listening on ") {
                    let _ = ready_tx.send(line.clone());
                }
                lines.lock().expect("not poisoned").push(line);
            }
        });
    }

    let start = std::time::Instant::now();
    let ready = loop {
        match ready_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => break line,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("haven exited with {status} before listening; its log:\n{log}");
        }
        if start.elapsed() > STARTUP_TIMEOUT {
            let _ = child.kill();
            bail!("haven did not start listening within {STARTUP_TIMEOUT:?}");
        }
    };
    if subcommand == "demo" {
        loop {
            let seen = lines
                .lock()
                .expect("not poisoned")
                .iter()
                .any(|l| l.starts_with(DEMO_READY));
            if seen {
                break;
            }
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("haven demo exited with {status} before it was ready; its log:\n{log}");
            }
            if start.elapsed() > STARTUP_TIMEOUT {
                let _ = child.kill();
                bail!("haven demo was not ready within {STARTUP_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let (addr, announced_base_url) = parse_ready_line(&ready)?;
    let scheme = if options.insecure_http {
        "http"
    } else {
        "https"
    };
    let ca_pem = if options.insecure_http {
        None
    } else {
        Some(std::fs::read(data_dir.join("tls").join("ca.pem")).context("reading the CA")?)
    };
    Ok(Haven {
        child,
        _temp_dir: temp_dir,
        base_url: format!("{scheme}://{addr}/fhir"),
        announced_base_url,
        addr,
        data_dir,
        database_url: options.database_url.clone(),
        ca_pem,
        log_path,
        stdout_lines: lines,
    })
}

/// Reads `haven listening on https://127.0.0.1:PORT (FHIR base URL)`.
pub fn parse_ready_line(line: &str) -> Result<(std::net::SocketAddr, String)> {
    let rest = line
        .strip_prefix("haven listening on ")
        .context("not a listening line")?;
    let (url, base) = rest
        .split_once(" (FHIR base ")
        .context("no FHIR base in the listening line")?;
    let addr = url
        .split_once("://")
        .map(|(_, a)| a)
        .context("no scheme in the listening line")?
        .parse()
        .context("no address in the listening line")?;
    Ok((addr, base.trim_end_matches(')').to_string()))
}

/// The shared data folder (`HAVEN_SHARED`), relative paths taken from the workspace
/// root; `None` when the variable is not set.
pub fn shared_dir() -> Option<PathBuf> {
    let value = std::env::var_os("HAVEN_SHARED")?;
    let path = PathBuf::from(value);
    Some(if path.is_absolute() {
        path
    } else {
        workspace_root().join(path)
    })
}

/// A PostgreSQL database created for one test and dropped when it goes out of scope.
pub struct PostgresDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl PostgresDatabase {
    /// Creates a fresh database through `HAVEN_TEST_POSTGRES_URL` with `psql`;
    /// `Ok(None)` with the reason when PostgreSQL tests are not configured.
    pub fn create() -> Result<Result<Self, String>> {
        let Ok(admin_url) = std::env::var("HAVEN_TEST_POSTGRES_URL") else {
            return Ok(Err("HAVEN_TEST_POSTGRES_URL is not set".into()));
        };
        if Command::new("psql").arg("--version").output().is_err() {
            return Ok(Err("psql is not installed".into()));
        }
        let name = format!("haven_e2e_{}", uuid::Uuid::new_v4().simple());
        psql(&admin_url, &format!("CREATE DATABASE {name}"))?;
        let url = replace_database(&admin_url, &name)?;
        Ok(Ok(Self {
            admin_url,
            name,
            url,
        }))
    }
}

impl Drop for PostgresDatabase {
    fn drop(&mut self) {
        let _ = psql(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(url: &str, sql: &str) -> Result<()> {
    let output = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .stdin(Stdio::null())
        .output()
        .context("running psql")?;
    if !output.status.success() {
        bail!(
            "psql -c {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The same server URL with another database name.
fn replace_database(url: &str, database: &str) -> Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").context("not a URL")? + 3;
    let path_start = base[authority_start..]
        .find('/')
        .map(|i| authority_start + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_the_address_and_base() {
        let (addr, base) = parse_ready_line(
            "haven listening on https://127.0.0.1:4321 (FHIR base https://localhost:4321/fhir)",
        )
        .unwrap();
        assert_eq!(addr, "127.0.0.1:4321".parse().unwrap());
        assert_eq!(base, "https://localhost:4321/fhir");
    }

    #[test]
    fn a_database_name_is_put_into_a_postgres_url() {
        assert_eq!(
            replace_database("postgres://postgres@127.0.0.1:5432/postgres", "x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            replace_database("postgres://u:p@h/db?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            replace_database("postgres://h:5432", "x").unwrap(),
            "postgres://h:5432/x"
        );
    }
}
