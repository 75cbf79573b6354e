//! Administration commands: `haven clients ...`, `haven users add`, `haven keys
//! rotate`, `haven audit verify`. They work on the database directly (the
//! server may be running); the first three print what they created as JSON.
//!
//! Every change they make (a client added, an initial access token issued, a
//! user added, a key rotated) appends an AuditEvent by [`CLI_USER`] before
//! anything is printed; when it cannot be stored the command fails and prints
//! no secret.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use haven_audit::{
    auth_event, token_fingerprint, AuthEventKind, AuthFacts, BreakKind, Outcome, Who,
};
use haven_auth::registry::{ClientAuth, Role};
use haven_auth::server::{ClientSpec, UserPolicy};
use haven_auth::{AuthConfig, AuthServer};
use haven_model::clock::Clock;
use haven_model::id::new_time_ordered_id;
use haven_policy::clearance::Clearance;
use haven_store::Store;
use serde_json::{json, Value};

use crate::config::Config;
use crate::signing_keys;

#[derive(Debug, Clone, Subcommand)]
pub enum ClientsCommand {
    /// Register a client application and print it (with its secret, shown once).
    Add(Box<ClientAddArgs>),
    /// List registered clients.
    List,
    /// Print a one-time initial access token for dynamic registration (RFC 7591).
    RegistrationToken {
        /// How long the token stays usable, in hours.
        #[arg(long, default_value_t = 24)]
        hours: i64,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ClientAddArgs {
    /// The name users see on the consent page.
    #[arg(long)]
    pub name: String,
    /// A redirect URI, compared by exact string; repeat for several.
    #[arg(long = "redirect-uri")]
    pub redirect_uris: Vec<String>,
    /// The most this client may be granted, space separated
    /// (e.g. "launch/patient openid fhirUser offline_access patient/*.rs").
    #[arg(long)]
    pub scope: String,
    /// A public client (no secret; PKCE protects its codes). The default for apps.
    #[arg(long, conflicts_with_all = ["secret", "jwks", "jwks_url"])]
    pub public: bool,
    /// A confidential client with a generated secret (Basic or form post).
    #[arg(long, conflicts_with_all = ["jwks", "jwks_url"])]
    pub secret: bool,
    /// A JWKS file with the client's public keys (private_key_jwt).
    #[arg(long, conflicts_with = "jwks_url")]
    pub jwks: Option<PathBuf>,
    /// A JWKS URL with the client's public keys (private_key_jwt).
    #[arg(long)]
    pub jwks_url: Option<String>,
    /// A SMART Backend Services client (client_credentials, system/ scopes).
    #[arg(long)]
    pub backend: bool,
    /// A resource server: may introspect tokens issued to other clients.
    #[arg(long)]
    pub resource_server: bool,
    /// Where the EHR launcher opens the app (with `iss` and `launch`).
    #[arg(long)]
    pub launch_url: Option<String>,
    /// The organization requesting data through this client (required for backend clients).
    #[arg(long)]
    pub organization: Option<String>,
    /// A contact (e-mail) for the client; repeat for several (required for backend clients).
    #[arg(long = "contact")]
    pub contacts: Vec<String>,
    /// The most its tokens may see, e.g. N, R:ETH,PSY or V:* (default: its users' clearance).
    #[arg(long)]
    pub clearance: Option<String>,
    /// A purpose of use it may ask for (v3 PurposeOfUse, e.g. TREAT, HRESCH, BTG); repeat
    /// for several. Default: TREAT only.
    #[arg(long = "purpose")]
    pub purposes: Vec<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum UsersCommand {
    /// Add a user who can sign in; the password is read from standard input.
    Add(UserAddArgs),
}

#[derive(Debug, Clone, Args)]
pub struct UserAddArgs {
    #[arg(long)]
    pub username: String,
    /// patient, practitioner or admin.
    #[arg(long)]
    pub role: String,
    /// The user's FHIR resource, e.g. Patient/123 or Practitioner/9.
    #[arg(long)]
    pub fhir_user: Option<String>,
    /// The name shown on pages.
    #[arg(long)]
    pub display_name: Option<String>,
    /// The user's clearance, e.g. N, R:ETH,PSY or V:* (default: their role's).
    #[arg(long)]
    pub clearance: Option<String>,
    /// The user may break the glass (purpose BTG, with a reason, audited).
    #[arg(long)]
    pub break_glass: bool,
    /// The user's organization, e.g. Organization/7, which Consents may name.
    #[arg(long)]
    pub organization: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum LabelsCommand {
    /// Give every stored resource the labels the current value sets call for.
    ///
    /// Each resource whose labels rise gets a new version, with its Provenance
    /// and AuditEvent; no label is ever removed.
    Apply,
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Start signing with a new key; the old public key stays published until
    /// the tokens it signed have expired. The rotation is recorded in the audit
    /// trail; if it cannot be, the command fails.
    Rotate,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Verify the audit trail's hash chain.
    ///
    /// Walks the chain from its first record and names the first record that
    /// was changed, removed or inserted.
    ///
    /// Exit status: 0 when the whole trail verifies; 1 when it is broken (the
    /// first broken record is named); 2 when it could not be checked (for
    /// example, the database could not be opened).
    ///
    /// The printed head hash is the last verified record's: keep it outside the
    /// database and compare it later, since rewriting a record together with
    /// every hash after it leaves a chain that verifies.
    #[command(verbatim_doc_comment)]
    Verify,
}

/// `haven audit verify`'s exit status for a broken trail.
pub const TRAIL_BROKEN: u8 = 1;
/// `haven audit verify`'s exit status when the trail could not be checked.
pub const TRAIL_UNCHECKED: u8 = 2;

/// The name of this server instance in `AuditEvent.source.observer`:
/// `haven@` and the authority of its public URL.
pub fn observer(fhir_base: &str) -> String {
    let authority = fhir_base
        .split_once("://")
        .map_or(fhir_base, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    format!("haven@{authority}")
}

fn fhir_base(config: &Config) -> String {
    let public = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("https://localhost:{}", config.listen.port()));
    format!("{public}/fhir")
}

/// The configured database, created if it does not exist yet.
async fn open_store(config: &Config, clock: Arc<dyn Clock>) -> Result<Arc<dyn Store>> {
    if let Some(dir) = crate::sqlite_parent_dir(&config.database_url) {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    haven_store::connect(&config.database_url, clock)
        .await
        .context("opening the database")
}

/// The authorization server over the configured database and keys, and that
/// database.
async fn auth_server(
    config: &Config,
    clock: Arc<dyn Clock>,
) -> Result<(AuthServer, Arc<dyn Store>)> {
    let store = open_store(config, clock.clone()).await?;
    let (keys, _) = signing_keys::ensure(&config.data_dir, clock.now())?;
    let mut auth_config = AuthConfig::new(&fhir_base(config));
    auth_config.clearances = config.policy.clearances.clone();
    auth_config.token_requests_per_minute = config.token_requests_per_minute;
    let server = AuthServer::new(auth_config, store.clone(), clock, keys);
    Ok((server, store))
}

fn refused(e: haven_auth::OAuthError) -> anyhow::Error {
    anyhow!("{}", e.description)
}

/// The name changes made on the command line are recorded under: it has no
/// signed-in user.
const CLI_USER: &str = "haven-cli";

/// What the AuditEvent of one change made on the command line says.
struct CliChange<'a> {
    kind: AuthEventKind,
    /// What was done, in words.
    description: String,
    client_id: Option<String>,
    scopes: Option<String>,
    /// A token handed out; only its fingerprint is recorded.
    token: Option<&'a str>,
}

impl CliChange<'_> {
    fn new(kind: AuthEventKind, description: String) -> Self {
        Self {
            kind,
            description,
            client_id: None,
            scopes: None,
            token: None,
        }
    }
}

/// Appends the AuditEvent of a change made on the command line and waits for
/// it; when it cannot be stored the command fails with `unrecorded`, which
/// says what was done all the same.
async fn record_change(
    store: &dyn Store,
    base: &str,
    clock: &dyn Clock,
    change: CliChange<'_>,
    unrecorded: impl FnOnce() -> String,
) -> Result<()> {
    let base = base.to_owned();
    let event = auth_event(
        change.kind,
        &AuthFacts {
            outcome: Outcome::Success,
            outcome_description: Some(change.description),
            recorded: clock.now(),
            user: Some(Who {
                username: CLI_USER.into(),
                fhir_user: None,
            }),
            client_id: change.client_id,
            server: base.clone(),
            source_observer: observer(&base),
            network_address: None,
            request_id: new_time_ordered_id(),
            scopes: change.scopes,
            token_fingerprint: change.token.map(token_fingerprint),
            patient: None,
        },
    );
    let log = store.audit_log();
    let appended = match log.stamp(vec![event]) {
        Ok(stamped) => log.append(stamped).await,
        Err(error) => Err(error),
    };
    appended.with_context(unrecorded)
}

pub async fn clients(
    config: &Config,
    clock: Arc<dyn Clock>,
    command: ClientsCommand,
) -> Result<Value> {
    let (server, store) = auth_server(config, clock.clone()).await?;
    match command {
        ClientsCommand::Add(args) => {
            let args = *args;
            let jwks = match &args.jwks {
                Some(path) => Some(
                    serde_json::from_str::<Value>(
                        &std::fs::read_to_string(path)
                            .with_context(|| format!("reading {}", path.display()))?,
                    )
                    .with_context(|| format!("{} is not JSON", path.display()))?,
                ),
                None => None,
            };
            let auth = if args.secret {
                Some(ClientAuth::ClientSecretBasic)
            } else if args.public {
                Some(ClientAuth::None)
            } else {
                None
            };
            let spec = ClientSpec {
                name: args.name,
                redirect_uris: args.redirect_uris,
                scopes: args.scope,
                auth,
                jwks,
                jwks_uri: args.jwks_url,
                backend: args.backend,
                resource_server: args.resource_server,
                launch_uri: args.launch_url,
                organization: args.organization,
                contacts: args.contacts,
                clearance: args.clearance.as_deref().map(parse_clearance).transpose()?,
                purposes: parse_purposes(args.purposes)?,
            };
            let registered = Registrar {
                server: &server,
                store: &*store,
                base: fhir_base(config),
                clock: &*clock,
            };
            registered.add_client(spec).await
        }
        ClientsCommand::List => {
            let clients = server.clients().await.map_err(refused)?;
            Ok(Value::Array(
                clients.iter().map(|c| c.public_view()).collect(),
            ))
        }
        ClientsCommand::RegistrationToken { hours } => {
            if !(1..=24 * 30).contains(&hours) {
                bail!("--hours must be between 1 and 720");
            }
            let token = server
                .issue_registration_token(time::Duration::hours(hours))
                .await
                .map_err(refused)?;
            let mut change = CliChange::new(
                AuthEventKind::ClientRegistration,
                format!("initial access token issued for dynamic registration, usable for {hours} hours"),
            );
            change.token = Some(&token);
            record_change(&*store, &fhir_base(config), &*clock, change, || {
                "an initial access token was issued, but it could not be recorded in the audit \
                 trail, so it is not shown and will expire unused"
                    .to_owned()
            })
            .await?;
            Ok(json!({"initial_access_token": token, "expires_in": hours * 3600}))
        }
    }
}

pub async fn users(config: &Config, clock: Arc<dyn Clock>, command: UsersCommand) -> Result<Value> {
    let UsersCommand::Add(args) = command;
    let role = Role::parse(&args.role)
        .ok_or_else(|| anyhow!("--role must be patient, practitioner or admin"))?;
    let mut password = String::new();
    std::io::stdin()
        .read_to_string(&mut password)
        .context("reading the password from standard input")?;
    let password = password.trim_end_matches(['\r', '\n']);
    let policy = UserPolicy {
        clearance: args.clearance.as_deref().map(parse_clearance).transpose()?,
        break_glass: args.break_glass,
        organization: args.organization,
    };
    let (server, store) = auth_server(config, clock.clone()).await?;
    let registrar = Registrar {
        server: &server,
        store: &*store,
        base: fhir_base(config),
        clock: &*clock,
    };
    let user = NewUser {
        username: args.username,
        password: password.to_owned(),
        role,
        fhir_user: args.fhir_user,
        display_name: args.display_name,
        policy,
    };
    registrar.add_user(user).await
}

/// A user to add, with their password in the clear (stored only as a hash).
pub struct NewUser {
    pub username: String,
    pub password: String,
    pub role: Role,
    pub fhir_user: Option<String>,
    pub display_name: Option<String>,
    pub policy: UserPolicy,
}

/// Adds clients and users with the AuditEvent each addition needs; shared by
/// `haven clients add`, `haven users add` and `haven demo`.
pub struct Registrar<'a> {
    pub server: &'a AuthServer,
    pub store: &'a dyn Store,
    /// The FHIR base the server announces, named in the AuditEvents.
    pub base: String,
    pub clock: &'a dyn Clock,
}

impl Registrar<'_> {
    /// Registers a client and prints nothing until its AuditEvent is stored; the
    /// client as JSON, with its secret if it has one.
    pub async fn add_client(&self, spec: ClientSpec) -> Result<Value> {
        let (record, secret) = self.server.add_client(spec).await.map_err(refused)?;
        let mut change = CliChange::new(
            AuthEventKind::ClientRegistration,
            format!("client added: {} ({})", record.client_id, record.name),
        );
        change.client_id = Some(record.client_id.clone());
        change.scopes = Some(record.scopes.to_string());
        record_change(self.store, &self.base, self.clock, change, || {
            format!(
                "the client {} was added, but the addition could not be recorded in the \
                 audit trail, so its details are not shown",
                record.client_id
            )
        })
        .await?;
        let mut out = record.public_view();
        if let Some(secret) = secret {
            out["client_secret"] = json!(secret);
        }
        Ok(out)
    }

    /// Adds a user with their policy; the user as JSON.
    pub async fn add_user(&self, user: NewUser) -> Result<Value> {
        self.server
            .add_user(
                &user.username,
                &user.password,
                user.role,
                user.fhir_user,
                user.display_name,
            )
            .await
            .map_err(refused)?;
        let added = self
            .server
            .set_user_policy(&user.username, user.policy)
            .await
            .map_err(refused)?;
        // There is no kind for user administration; ClientRegistration is the
        // Security Configuration event that creates something.
        let change = CliChange::new(
            AuthEventKind::ClientRegistration,
            format!("user added: {} ({})", added.username, added.role.as_str()),
        );
        record_change(self.store, &self.base, self.clock, change, || {
            format!(
                "the user {} was added, but the addition could not be recorded in the audit trail",
                added.username
            )
        })
        .await?;
        Ok(added.public_view())
    }
}

pub async fn labels(
    config: &Config,
    clock: Arc<dyn Clock>,
    command: LabelsCommand,
) -> Result<Value> {
    let LabelsCommand::Apply = command;
    let store = open_store(config, clock.clone()).await?;
    let base = fhir_base(config);
    let state = haven_api::AppState::new(store, clock, haven_api::ApiConfig::new(&base))
        .with_audit(observer(&base));
    let report = haven_api::policy::relabel(&state)
        .await
        .map_err(|e| anyhow!("relabeling failed: {e}"))?;
    Ok(serde_json::to_value(report)?)
}

fn parse_clearance(text: &str) -> Result<Clearance> {
    Clearance::parse(text).map_err(|e| anyhow!("--clearance: {e}"))
}

fn parse_purposes(purposes: Vec<String>) -> Result<Vec<String>> {
    for p in &purposes {
        if haven_policy::purpose::display(p).is_none() {
            bail!("--purpose {p}: not a purpose of use this server knows");
        }
    }
    Ok(purposes)
}

pub async fn keys(config: &Config, clock: Arc<dyn Clock>, command: KeysCommand) -> Result<Value> {
    let KeysCommand::Rotate = command;
    // Opened first, so an unreachable database fails before the key changes.
    let store = open_store(config, clock.clone()).await?;
    let kid = signing_keys::rotate(&config.data_dir, clock.now())?;
    let change = CliChange::new(
        AuthEventKind::KeyRotation,
        format!("new token signing key {kid}"),
    );
    record_change(&*store, &fhir_base(config), &*clock, change, || {
        format!("the signing key was rotated to {kid}, but the rotation could not be recorded in the audit trail")
    })
    .await?;
    Ok(json!({"kid": kid}))
}

/// What `haven audit verify` found.
pub enum TrailCheck {
    Verified(String),
    Broken(String),
}

pub async fn audit(
    config: &Config,
    clock: Arc<dyn Clock>,
    command: AuditCommand,
) -> Result<TrailCheck> {
    let AuditCommand::Verify = command;
    let store = open_store(config, clock).await?;
    let report = haven_api::verify_trail(store.audit_log())
        .await
        .context("reading the audit trail")?;
    Ok(describe_trail(&report))
}

/// The lines `haven audit verify` prints for a report.
fn describe_trail(report: &haven_api::TrailReport) -> TrailCheck {
    let records = |n: u64| match n {
        1 => "1 record".to_owned(),
        n => format!("{n} records"),
    };
    let Some(broken) = report.broken else {
        return TrailCheck::Verified(format!(
            "audit trail verified: {}, head {}",
            records(report.verified),
            report.head
        ));
    };
    let (problem, meaning) = match broken.kind {
        BreakKind::Changed => ("changed", "the record does not match its hash"),
        BreakKind::Removed => ("removed", "records before it are missing"),
        BreakKind::Inserted => (
            "inserted",
            "it does not follow the record before it, so a record was inserted",
        ),
    };
    let before = match report.verified {
        0 => "no record before it verified".to_owned(),
        n => format!(
            "{} before it verified, the last with hash {}",
            records(n),
            report.head
        ),
    };
    TrailCheck::Broken(format!(
        "audit trail broken at record {}: {problem} ({meaning})\n{before}",
        broken.position
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_audit::ChainBreak;

    #[test]
    fn clearances_and_purposes_on_the_command_line_are_checked() {
        assert_eq!(parse_clearance("R:ETH").unwrap().to_string(), "R:ETH");
        let err = parse_clearance("Z").unwrap_err().to_string();
        assert!(err.contains("--clearance"), "{err}");
        assert_eq!(
            parse_purposes(vec!["TREAT".into(), "BTG".into()]).unwrap(),
            vec!["TREAT".to_owned(), "BTG".to_owned()]
        );
        let err = parse_purposes(vec!["SHOPPING".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--purpose SHOPPING"), "{err}");
    }

    #[test]
    fn the_observer_names_the_public_host_and_port() {
        assert_eq!(
            observer("https://fhir.example.org:8443/fhir"),
            "haven@fhir.example.org:8443"
        );
        assert_eq!(observer("http://localhost/fhir"), "haven@localhost");
    }

    #[test]
    fn a_verified_trail_reads_as_one_line_with_its_head() {
        let report = haven_api::TrailReport {
            verified: 12,
            head: "ab".repeat(32),
            broken: None,
        };
        let TrailCheck::Verified(text) = describe_trail(&report) else {
            panic!("expected a verified trail");
        };
        assert_eq!(
            text,
            format!("audit trail verified: 12 records, head {}", "ab".repeat(32))
        );
    }

    #[test]
    fn a_broken_trail_names_the_record_and_the_problem() {
        for (kind, word) in [
            (BreakKind::Changed, "changed"),
            (BreakKind::Removed, "removed"),
            (BreakKind::Inserted, "inserted"),
        ] {
            let report = haven_api::TrailReport {
                verified: 6,
                head: "cd".repeat(32),
                broken: Some(ChainBreak { position: 7, kind }),
            };
            let TrailCheck::Broken(text) = describe_trail(&report) else {
                panic!("expected a broken trail");
            };
            assert!(
                text.starts_with(&format!("audit trail broken at record 7: {word} (")),
                "{text}"
            );
            assert!(text.contains("6 records before it verified"), "{text}");
        }
    }
}
