//! The server's configuration: one typed struct, layered from `haven.toml`, then
//! `HAVEN_*` environment variables, then command-line flags (each layer wins over the
//! one before).
//!
//! Every layer has the same shape, [`Layer`], whose fields are all optional; the
//! resolved [`Config`] fills whatever no layer set with a default. The environment is
//! read as a list of pairs handed in by `main`, so nothing here touches process-wide
//! state and the layering can be tested directly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The name of the configuration file looked up in the data directory.
pub const CONFIG_FILE_NAME: &str = "haven.toml";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// One source of settings; `None` means "this source says nothing".
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub listen: Option<SocketAddr>,
    pub public_url: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure_http: Option<bool>,
    pub log_format: Option<LogFormat>,
    /// A `RUST_LOG`-style filter, e.g. `info,haven_store=debug`.
    pub log: Option<String>,
    #[serde(default)]
    pub limits: LimitsLayer,
    pub default_page_size: Option<u32>,
    pub max_page_size: Option<u32>,
    #[serde(default)]
    pub policy: PolicyLayer,
}

/// The consent and label policy of one source.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyLayer {
    /// `opt-out` (shared unless a Consent denies) or `opt-in`.
    pub consent_default: Option<String>,
    /// Sensitivity categories masked instead of denied (e.g. `["PSY"]`).
    pub mask: Option<Vec<String>>,
    /// `forbidden` (403) or `not-found` (404) for a read the policy refuses.
    pub refused_reads: Option<String>,
    /// Whether a search the policy narrowed says so (an informational issue).
    pub report_suppressed: Option<bool>,
    /// Clearances (`N`, `R:ETH,PSY`, `V:*`) by role, where a user or client has none.
    pub patient_clearance: Option<String>,
    pub practitioner_clearance: Option<String>,
    pub admin_clearance: Option<String>,
    pub backend_clearance: Option<String>,
}

/// The resolved consent and label policy.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub consent_default: haven_policy::consent::SiteDefault,
    pub mask: Vec<String>,
    pub hidden_as_missing: bool,
    pub report_suppressed: bool,
    pub clearances: haven_auth::server::RoleClearances,
}

impl PolicySettings {
    /// The API's policy configuration.
    pub fn api_config(&self) -> haven_api::policy::PolicyConfig {
        let mut config = haven_api::policy::PolicyConfig::default().masking(self.mask.clone());
        config.site_default = self.consent_default;
        config.hidden_as_missing = self.hidden_as_missing;
        config.report_suppressed = self.report_suppressed;
        config
    }
}

/// The request limits of one source.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsLayer {
    pub max_body_bytes: Option<usize>,
    pub max_json_depth: Option<usize>,
    pub max_header_bytes: Option<usize>,
    pub request_timeout_secs: Option<u64>,
    pub max_bundle_entries: Option<usize>,
    pub token_requests_per_minute: Option<u32>,
}

/// The resolved configuration that `serve` and `migrate` run with.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub database_url: String,
    pub listen: SocketAddr,
    /// Where clients reach the server; `None` derives it from the bound address.
    pub public_url: Option<String>,
    /// Both set: serve this certificate; both unset: use the generated local one.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub insecure_http: bool,
    pub log_format: LogFormat,
    pub log: String,
    pub limits: haven_api::Limits,
    /// Token, introspection and revocation requests per caller address and minute.
    pub token_requests_per_minute: u32,
    pub default_page_size: u32,
    pub max_page_size: u32,
    pub policy: PolicySettings,
}

pub const DEFAULT_DATA_DIR: &str = "./haven-data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";

impl Layer {
    /// Reads a `haven.toml`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading configuration file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in configuration file {}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// Picks the `HAVEN_*` variables out of an environment listing.
    pub fn from_env<I, K, V>(vars: I) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut layer = Layer::default();
        for (key, value) in vars {
            let (key, value) = (key.as_ref(), value.as_ref());
            let Some(name) = key.strip_prefix("HAVEN_") else {
                continue;
            };
            let mut parsed = || -> Result<()> {
                let l = &mut layer.limits;
                match name {
                    "DATA_DIR" => layer.data_dir = Some(value.into()),
                    "DATABASE_URL" => layer.database_url = Some(value.into()),
                    "LISTEN" => layer.listen = Some(value.parse()?),
                    "PUBLIC_URL" => layer.public_url = Some(value.into()),
                    "TLS_CERT" => layer.tls_cert = Some(value.into()),
                    "TLS_KEY" => layer.tls_key = Some(value.into()),
                    "INSECURE_HTTP" => layer.insecure_http = Some(parse_bool(value)?),
                    "LOG_FORMAT" => {
                        layer.log_format = Some(
                            <LogFormat as clap::ValueEnum>::from_str(value, true)
                                .map_err(anyhow::Error::msg)?,
                        )
                    }
                    "LOG" => layer.log = Some(value.into()),
                    "MAX_BODY_BYTES" => l.max_body_bytes = Some(value.parse()?),
                    "MAX_JSON_DEPTH" => l.max_json_depth = Some(value.parse()?),
                    "MAX_HEADER_BYTES" => l.max_header_bytes = Some(value.parse()?),
                    "REQUEST_TIMEOUT_SECS" => l.request_timeout_secs = Some(value.parse()?),
                    "MAX_BUNDLE_ENTRIES" => l.max_bundle_entries = Some(value.parse()?),
                    "TOKEN_REQUESTS_PER_MINUTE" => {
                        l.token_requests_per_minute = Some(value.parse()?)
                    }
                    "DEFAULT_PAGE_SIZE" => layer.default_page_size = Some(value.parse()?),
                    "MAX_PAGE_SIZE" => layer.max_page_size = Some(value.parse()?),
                    "CONSENT_DEFAULT" => layer.policy.consent_default = Some(value.into()),
                    "MASK" => {
                        layer.policy.mask = Some(
                            value
                                .split(',')
                                .map(str::trim)
                                .filter(|c| !c.is_empty())
                                .map(str::to_owned)
                                .collect(),
                        )
                    }
                    "REFUSED_READS" => layer.policy.refused_reads = Some(value.into()),
                    "REPORT_SUPPRESSED" => {
                        layer.policy.report_suppressed = Some(parse_bool(value)?)
                    }
                    "PATIENT_CLEARANCE" => layer.policy.patient_clearance = Some(value.into()),
                    "PRACTITIONER_CLEARANCE" => {
                        layer.policy.practitioner_clearance = Some(value.into())
                    }
                    "ADMIN_CLEARANCE" => layer.policy.admin_clearance = Some(value.into()),
                    "BACKEND_CLEARANCE" => layer.policy.backend_clearance = Some(value.into()),
                    // Other HAVEN_* variables belong to tests and tools, not the server.
                    _ => {}
                }
                Ok(())
            };
            parsed().with_context(|| format!("environment variable {key}={value:?}"))?;
        }
        Ok(layer)
    }

    /// `other` wins wherever it says something.
    pub fn overlay(self, other: Layer) -> Layer {
        let l = self.limits;
        let o = other.limits;
        Layer {
            data_dir: other.data_dir.or(self.data_dir),
            database_url: other.database_url.or(self.database_url),
            listen: other.listen.or(self.listen),
            public_url: other.public_url.or(self.public_url),
            tls_cert: other.tls_cert.or(self.tls_cert),
            tls_key: other.tls_key.or(self.tls_key),
            insecure_http: other.insecure_http.or(self.insecure_http),
            log_format: other.log_format.or(self.log_format),
            log: other.log.or(self.log),
            limits: LimitsLayer {
                max_body_bytes: o.max_body_bytes.or(l.max_body_bytes),
                max_json_depth: o.max_json_depth.or(l.max_json_depth),
                max_header_bytes: o.max_header_bytes.or(l.max_header_bytes),
                request_timeout_secs: o.request_timeout_secs.or(l.request_timeout_secs),
                max_bundle_entries: o.max_bundle_entries.or(l.max_bundle_entries),
                token_requests_per_minute: o
                    .token_requests_per_minute
                    .or(l.token_requests_per_minute),
            },
            default_page_size: other.default_page_size.or(self.default_page_size),
            max_page_size: other.max_page_size.or(self.max_page_size),
            policy: {
                let (p, o) = (self.policy, other.policy);
                PolicyLayer {
                    consent_default: o.consent_default.or(p.consent_default),
                    mask: o.mask.or(p.mask),
                    refused_reads: o.refused_reads.or(p.refused_reads),
                    report_suppressed: o.report_suppressed.or(p.report_suppressed),
                    patient_clearance: o.patient_clearance.or(p.patient_clearance),
                    practitioner_clearance: o.practitioner_clearance.or(p.practitioner_clearance),
                    admin_clearance: o.admin_clearance.or(p.admin_clearance),
                    backend_clearance: o.backend_clearance.or(p.backend_clearance),
                }
            },
        }
    }

    /// Fills in defaults and checks that the settings fit together.
    pub fn resolve(self) -> Result<Config> {
        let data_dir = self.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        let database_url = match self.database_url {
            Some(url) => url,
            None => default_database_url(&data_dir)?,
        };
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => bail!("--tls-cert and --tls-key must be given together"),
        };
        let insecure_http = self.insecure_http.unwrap_or(false);
        if insecure_http && tls.is_some() {
            bail!("--insecure-http cannot be combined with --tls-cert/--tls-key");
        }
        let defaults = haven_api::Limits::default();
        let l = self.limits;
        let limits = haven_api::Limits {
            max_body_bytes: l.max_body_bytes.unwrap_or(defaults.max_body_bytes),
            max_json_depth: l.max_json_depth.unwrap_or(defaults.max_json_depth),
            max_header_bytes: l.max_header_bytes.unwrap_or(defaults.max_header_bytes),
            request_timeout: l
                .request_timeout_secs
                .map(Duration::from_secs)
                .unwrap_or(defaults.request_timeout),
            max_bundle_entries: l.max_bundle_entries.unwrap_or(defaults.max_bundle_entries),
        };
        let token_requests_per_minute = l
            .token_requests_per_minute
            .unwrap_or(haven_auth::server::DEFAULT_TOKEN_REQUESTS_PER_MINUTE);
        if token_requests_per_minute == 0 {
            anyhow::bail!("token_requests_per_minute must be at least 1");
        }
        let api_defaults = haven_api::ApiConfig::new("");
        let policy = resolve_policy(self.policy)?;
        Ok(Config {
            data_dir,
            database_url,
            listen: self
                .listen
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("the default address parses")),
            public_url: self.public_url.map(|u| u.trim_end_matches('/').to_string()),
            tls,
            insecure_http,
            log_format: self.log_format.unwrap_or(LogFormat::Human),
            log: self.log.unwrap_or_else(|| "info".into()),
            limits,
            token_requests_per_minute,
            default_page_size: self
                .default_page_size
                .unwrap_or(api_defaults.default_page_size),
            max_page_size: self.max_page_size.unwrap_or(api_defaults.max_page_size),
            policy,
        })
    }
}

fn resolve_policy(layer: PolicyLayer) -> Result<PolicySettings> {
    use haven_policy::clearance::Clearance;
    use haven_policy::consent::SiteDefault;
    let consent_default = match layer.consent_default.as_deref() {
        None => SiteDefault::OptOut,
        Some(text) => SiteDefault::parse(text)
            .with_context(|| format!("consent_default must be opt-out or opt-in, not {text:?}"))?,
    };
    let hidden_as_missing = match layer.refused_reads.as_deref() {
        None | Some("forbidden") => false,
        Some("not-found") => true,
        Some(other) => bail!("refused_reads must be forbidden or not-found, not {other:?}"),
    };
    let labeler = haven_policy::label::Labeler::built_in();
    let mask = layer.mask.unwrap_or_default();
    for category in &mask {
        if !labeler.rules().iter().any(|r| &r.category == category) {
            bail!("mask: {category:?} is not a sensitivity category of the value sets");
        }
    }
    let defaults = haven_auth::server::RoleClearances::default();
    let clearance = |text: Option<String>, default: Clearance, name: &str| -> Result<Clearance> {
        match text {
            None => Ok(default),
            Some(t) => Clearance::parse(&t).map_err(|e| anyhow::anyhow!("{name}: {e}")),
        }
    };
    Ok(PolicySettings {
        consent_default,
        mask,
        hidden_as_missing,
        report_suppressed: layer.report_suppressed.unwrap_or(true),
        clearances: haven_auth::server::RoleClearances {
            patient: clearance(
                layer.patient_clearance,
                defaults.patient,
                "patient_clearance",
            )?,
            practitioner: clearance(
                layer.practitioner_clearance,
                defaults.practitioner,
                "practitioner_clearance",
            )?,
            admin: clearance(layer.admin_clearance, defaults.admin, "admin_clearance")?,
            backend: clearance(
                layer.backend_clearance,
                defaults.backend,
                "backend_clearance",
            )?,
        },
    })
}

/// The SQLite file `haven.db` in the data directory, as an absolute URL so that the
/// server's working directory does not matter.
fn default_database_url(data_dir: &Path) -> Result<String> {
    let dir = if data_dir.is_absolute() {
        data_dir.to_path_buf()
    } else {
        std::env::current_dir()
            .context("finding the working directory")?
            .join(data_dir)
    };
    let path = dir.join("haven.db");
    let path = path
        .to_str()
        .context("the data directory's path is not valid UTF-8")?;
    Ok(format!("sqlite:{path}"))
}

fn parse_bool(value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => bail!("expected true or false"),
    }
}

/// Where the configuration file is: `--config` (or `HAVEN_CONFIG`) if given, which must
/// exist; else `haven.toml` in the data directory, if it exists.
pub fn config_file(explicit: Option<&Path>, data_dir: &Path) -> Result<Option<PathBuf>> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("configuration file {} does not exist", path.display());
        }
        return Ok(Some(path.to_path_buf()));
    }
    let candidate = data_dir.join(CONFIG_FILE_NAME);
    Ok(candidate.is_file().then_some(candidate))
}

/// Layers file, environment and flags into one configuration.
///
/// The data directory decides where `haven.toml` is looked up, so it is taken from the
/// flags or the environment first; a file named with `--config` may still set it.
pub fn load(
    explicit_file: Option<&Path>,
    env: &[(String, String)],
    flags: Layer,
) -> Result<Config> {
    let env_layer = Layer::from_env(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    let data_dir = flags
        .data_dir
        .clone()
        .or_else(|| env_layer.data_dir.clone())
        .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
    let explicit_file = explicit_file.map(Path::to_path_buf).or_else(|| {
        env.iter()
            .find(|(k, _)| k == "HAVEN_CONFIG")
            .map(|(_, v)| PathBuf::from(v))
    });
    let file_layer = match config_file(explicit_file.as_deref(), &data_dir)? {
        Some(path) => Layer::from_file(&path)?,
        None => Layer::default(),
    };
    file_layer.overlay(env_layer).overlay(flags).resolve()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn nothing_set_gives_the_documented_defaults() {
        let config = Layer::default().resolve().unwrap();
        assert_eq!(config.listen, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("./haven-data"));
        assert!(config.database_url.starts_with("sqlite:"));
        assert!(config.database_url.ends_with("haven.db"));
        assert!(!config.insecure_http);
        assert_eq!(config.tls, None);
        assert_eq!(config.log_format, LogFormat::Human);
        assert_eq!(
            config.limits.max_body_bytes,
            haven_api::Limits::default().max_body_bytes
        );
    }

    #[test]
    fn the_environment_overrides_the_file_and_flags_override_both() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("haven.toml"),
            r#"
                listen = "127.0.0.1:1111"
                database_url = "sqlite:/from/file.db"
                public_url = "https://file.example"
                log = "debug"
                [limits]
                max_body_bytes = 100
                max_json_depth = 10
            "#,
        )
        .unwrap();
        let env = env(&[
            ("HAVEN_DATA_DIR", dir.path().to_str().unwrap()),
            ("HAVEN_LISTEN", "127.0.0.1:2222"),
            ("HAVEN_DATABASE_URL", "postgres://env/haven"),
            ("HAVEN_MAX_BODY_BYTES", "200"),
            ("PATH", "/usr/bin"),
        ]);
        let flags = Layer {
            listen: Some("127.0.0.1:3333".parse().unwrap()),
            ..Layer::default()
        };
        let config = load(None, &env, flags).unwrap();
        assert_eq!(config.listen, "127.0.0.1:3333".parse().unwrap());
        assert_eq!(config.database_url, "postgres://env/haven");
        assert_eq!(config.public_url.as_deref(), Some("https://file.example"));
        assert_eq!(config.log, "debug");
        assert_eq!(config.limits.max_body_bytes, 200);
        assert_eq!(config.limits.max_json_depth, 10);
        assert_eq!(config.data_dir, dir.path());
    }

    #[test]
    fn the_token_rate_limit_defaults_to_120_a_minute_and_is_set_from_the_file_or_environment() {
        assert_eq!(
            Layer::default()
                .resolve()
                .unwrap()
                .token_requests_per_minute,
            120
        );
        let file = Layer::from_toml("[limits]\ntoken_requests_per_minute = 600\n").unwrap();
        assert_eq!(
            file.clone().resolve().unwrap().token_requests_per_minute,
            600
        );
        let from_env =
            Layer::from_env(env(&[("HAVEN_TOKEN_REQUESTS_PER_MINUTE", "5000")])).unwrap();
        assert_eq!(
            file.overlay(from_env)
                .resolve()
                .unwrap()
                .token_requests_per_minute,
            5000
        );
        let zero = Layer::from_toml("[limits]\ntoken_requests_per_minute = 0\n").unwrap();
        let refused = zero.resolve().unwrap_err().to_string();
        assert!(refused.contains("token_requests_per_minute"), "{refused}");
    }

    #[test]
    fn an_explicit_config_file_replaces_the_one_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("haven.toml"), "log = \"warn\"\n").unwrap();
        let other = dir.path().join("other.toml");
        std::fs::write(&other, "log = \"trace\"\n").unwrap();
        let flags = Layer {
            data_dir: Some(dir.path().to_path_buf()),
            ..Layer::default()
        };
        let config = load(Some(&other), &[], flags.clone()).unwrap();
        assert_eq!(config.log, "trace");
        let config = load(None, &[], flags).unwrap();
        assert_eq!(config.log, "warn");
    }

    #[test]
    fn a_missing_explicit_config_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        assert!(load(Some(&missing), &[], Layer::default()).is_err());
    }

    #[test]
    fn the_example_configuration_parses() {
        let example = include_str!("../../../haven.toml.example");
        let uncommented: String = example
            .lines()
            .map(|line| {
                line.strip_prefix("# ")
                    .filter(|l| l.contains(" = "))
                    .unwrap_or(line)
            })
            .collect::<Vec<_>>()
            .join("\n");
        Layer::from_toml(example).unwrap();
        let layer = Layer::from_toml(&uncommented).unwrap();
        assert_eq!(layer.limits.max_json_depth, Some(64));
        let config = layer.resolve().unwrap();
        assert_eq!(config.policy.clearances.patient.to_string(), "V:*");
        assert_eq!(config.policy.clearances.practitioner.to_string(), "N");
    }

    #[test]
    fn the_policy_is_read_from_the_file_and_the_environment_and_checked() {
        let file = Layer::from_toml(
            "[policy]\nconsent_default = \"opt-in\"\nmask = [\"PSY\"]\nrefused_reads = \"not-found\"",
        )
        .unwrap();
        let env = Layer::from_env([
            ("HAVEN_PRACTITIONER_CLEARANCE", "R:ETH"),
            ("HAVEN_REPORT_SUPPRESSED", "false"),
        ])
        .unwrap();
        let config = file.overlay(env).resolve().unwrap();
        assert_eq!(
            config.policy.consent_default,
            haven_policy::consent::SiteDefault::OptIn
        );
        assert_eq!(config.policy.mask, vec!["PSY".to_owned()]);
        assert!(config.policy.hidden_as_missing);
        assert!(!config.policy.report_suppressed);
        assert_eq!(config.policy.clearances.practitioner.to_string(), "R:ETH");
        for bad in [
            "[policy]\nconsent_default = \"maybe\"",
            "[policy]\nmask = [\"XYZ\"]",
            "[policy]\nrefused_reads = \"410\"",
            "[policy]\nadmin_clearance = \"Q\"",
        ] {
            assert!(Layer::from_toml(bad).unwrap().resolve().is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_in_the_file_are_rejected() {
        assert!(Layer::from_toml("lisen = \"127.0.0.1:1\"").is_err());
    }

    #[test]
    fn a_malformed_environment_value_names_the_variable() {
        let err = Layer::from_env([("HAVEN_LISTEN", "not an address")]).unwrap_err();
        assert!(format!("{err:#}").contains("HAVEN_LISTEN"));
    }

    #[test]
    fn a_certificate_without_its_key_is_rejected() {
        let layer = Layer {
            tls_cert: Some("cert.pem".into()),
            ..Layer::default()
        };
        assert!(layer.resolve().is_err());
    }
}
