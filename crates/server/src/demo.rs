//! `haven demo`: a populated, SMART-ready server in one command.
//!
//! On an empty data directory it binds, writes the generated sample into
//! `<data-dir>/sample/`, registers the demo app (served by Haven at
//! `/apps/demo/`), a patient, a practitioner and an administrator, starts
//! serving, loads the sample through the FHIR API as a Backend Services client
//! (so every resource is validated, labeled, given its Provenance and audited
//! like any other write), and prints what to do next. `<data-dir>/demo.json`
//! records what was set up, never a password; a second run on the same
//! directory finds it and serves what is there. A data directory holding a
//! server that `haven demo` did not set up is refused, so real data is never
//! mixed with the sample.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use haven_api::demo_app::{DemoApp, PATH as APP_PATH};
use haven_auth::client::ClientKey;
use haven_auth::registry::{ClientAuth, Role};
use haven_auth::server::{check_password, ClientSpec, UserPolicy};
use haven_model::clock::Clock;
use haven_sample::{Options, Sample};
use serde::{Deserialize, Serialize};

use crate::admin::{NewUser, Registrar};
use crate::config::Config;
use crate::serve::{self, Bound};

/// The file in the data directory that says a demo was set up there.
pub const MARKER: &str = "demo.json";
/// The patients `haven demo` generates unless told otherwise.
pub const DEFAULT_PATIENTS: usize = 25;

const APP_NAME: &str = "Haven demo app";
const APP_SCOPES: &str = "launch launch/patient openid fhirUser patient/*.rs";

/// One demo sign-in, without its password.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Login {
    pub username: String,
    /// `Patient/<id>` or `Practitioner/<id>`; none for the administrator.
    pub fhir_user: Option<String>,
    pub name: String,
    /// What this person shows in the demo.
    pub note: String,
}

/// What `<data-dir>/demo.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoRecord {
    /// The public URL the demo app is registered at (its redirect URI's origin).
    pub public_url: String,
    pub app_client_id: String,
    pub seed: u64,
    pub patients: usize,
    pub resources: usize,
    pub patient: Login,
    pub practitioner: Login,
    pub admin: Login,
}

/// What `haven demo` was asked for.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    pub patients: usize,
    pub seed: u64,
    pub patient_password: Option<String>,
    pub practitioner_password: Option<String>,
    pub admin_password: Option<String>,
}

fn marker_path(data_dir: &Path) -> PathBuf {
    data_dir.join(MARKER)
}

/// The demo record of a data directory, if a demo was set up there.
pub fn read_record(data_dir: &Path) -> Result<Option<DemoRecord>> {
    let path = marker_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not a demo record", path.display()))
            .map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Written whole or not at all: a half-written record would strand the data.
fn write_record(data_dir: &Path, record: &DemoRecord) -> Result<()> {
    let path = marker_path(data_dir);
    let partial = data_dir.join(format!("{MARKER}.partial"));
    let mut text = serde_json::to_string_pretty(record)?;
    text.push('\n');
    std::fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))
}

/// The demo app to serve beside the API, when this data directory has one
/// registered for the URL the server now answers at.
pub fn registered_app(bound: &Bound) -> Result<Option<DemoApp>> {
    let Some(record) = read_record(&bound.config.data_dir)? else {
        return Ok(None);
    };
    if record.public_url != bound.public_url {
        println!(
            "haven: the demo app is registered for {}; run `haven demo` to serve it at {}",
            record.public_url, bound.public_url
        );
        return Ok(None);
    }
    Ok(Some(DemoApp {
        client_id: record.app_client_id,
    }))
}

pub async fn run(config: Config, clock: Arc<dyn Clock>, options: DemoOptions) -> Result<()> {
    // Checked before anything is made, so a refusal leaves the directory unused.
    for (flag, password) in [
        ("--patient-password", &options.patient_password),
        ("--practitioner-password", &options.practitioner_password),
        ("--admin-password", &options.admin_password),
    ] {
        if let Some(Err(reason)) = password.as_deref().map(check_password) {
            bail!("{flag}: {reason}");
        }
    }
    if options.patients == 0 || options.patients > crate::sample::MAX_PATIENTS {
        bail!(
            "--patients must be between 1 and {}",
            crate::sample::MAX_PATIENTS
        );
    }
    let existing = read_record(&config.data_dir)?;
    let bound = serve::bind(config, clock).await?;
    let data_dir = bound.config.data_dir.clone();
    let registrar = Registrar {
        server: &bound.auth,
        store: &*bound.store,
        base: bound.base_url.clone(),
        clock: &*bound.clock,
    };
    let (mut record, first_start) = match existing {
        Some(record) => (record, None),
        None => {
            let registered = bound
                .auth
                .clients()
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.description))?;
            if !registered.is_empty() && data_dir.join("sample").is_dir() {
                bail!(
                    "an earlier `haven demo` in {} stopped before the sample was loaded; \
                     remove that directory and run `haven demo` again",
                    data_dir.display()
                );
            }
            if !registered.is_empty() {
                bail!(
                    "{} holds a server that `haven demo` did not set up ({} clients registered); \
                     give `haven demo` an empty --data-dir so the sample is not mixed with \
                     other data",
                    data_dir.display(),
                    registered.len()
                );
            }
            let (record, setup) = set_up(&registrar, &bound, &options).await?;
            (record, Some(setup))
        }
    };
    if record.public_url != bound.public_url {
        // The app's redirect URI must match exactly; register it for the new URL.
        record.app_client_id = register_app(&registrar, &bound.public_url).await?;
        record.public_url = bound.public_url.clone();
        write_record(&data_dir, &record)?;
    }

    let load_base = loopback_base(&bound)?;
    let ca_file = bound.ca_file.clone();
    let insecure_http = bound.config.insecure_http;
    let base_url = bound.base_url.clone();
    let app = DemoApp {
        client_id: record.app_client_id.clone(),
    };
    let server = tokio::spawn(bound.serve(Some(app)));

    let passwords = match first_start {
        Some(setup) => {
            let loaded = load(&setup, &load_base, ca_file.clone(), insecure_http).await;
            // The loader's key has done its work; it is not left lying around.
            let _ = std::fs::remove_file(&setup.loader_key);
            if let Err(e) = loaded {
                server.abort();
                return Err(e.context(format!(
                    "the sample did not load; remove {} and run `haven demo` again",
                    data_dir.display()
                )));
            }
            write_record(&data_dir, &record)?;
            Some(setup.passwords)
        }
        None => None,
    };
    println!(
        "{}",
        instructions(&record, &base_url, ca_file.as_deref(), passwords.as_ref())
    );
    server.await.context("the server task failed")?
}

/// The passwords chosen at the first start, printed once.
struct Passwords {
    patient: String,
    practitioner: String,
    admin: String,
}

/// What the first start made and still has to load.
struct Setup {
    sample_dir: PathBuf,
    loader_id: String,
    loader_key: PathBuf,
    passwords: Passwords,
}

async fn set_up(
    registrar: &Registrar<'_>,
    bound: &Bound,
    options: &DemoOptions,
) -> Result<(DemoRecord, Setup)> {
    let data_dir = &bound.config.data_dir;
    let sample_dir = data_dir.join("sample");
    let sample = crate::sample::write(
        &sample_dir,
        Options {
            patients: options.patients,
            seed: options.seed,
        },
    )?;
    let app_client_id = register_app(registrar, &bound.public_url).await?;
    let passwords = Passwords {
        patient: options
            .patient_password
            .clone()
            .unwrap_or_else(new_password),
        practitioner: options
            .practitioner_password
            .clone()
            .unwrap_or_else(new_password),
        admin: options.admin_password.clone().unwrap_or_else(new_password),
    };
    let (patient, practitioner, admin) = logins(&sample);
    let users = [
        (&patient, Role::Patient, &passwords.patient, None),
        (
            &practitioner,
            Role::Practitioner,
            &passwords.practitioner,
            Some(sample.organization.reference.clone()),
        ),
        (&admin, Role::Admin, &passwords.admin, None),
    ];
    for (login, role, password, organization) in users {
        registrar
            .add_user(NewUser {
                username: login.username.clone(),
                password: password.clone(),
                role,
                fhir_user: login.fhir_user.clone(),
                display_name: Some(login.name.clone()),
                policy: UserPolicy {
                    organization,
                    ..UserPolicy::default()
                },
            })
            .await?;
    }

    // The sample goes in through the API as a Backend Services client would
    // put it, with a key made for this one load.
    let key = ClientKey::generate_ec_p384();
    let loader = registrar
        .add_client(ClientSpec {
            name: "Haven demo loader".into(),
            scopes: "system/*.cruds".into(),
            jwks: Some(key.jwks()),
            backend: true,
            organization: Some(sample.organization.name.clone()),
            contacts: vec!["demo-admin@localhost.invalid".into()],
            ..ClientSpec::default()
        })
        .await?;
    let loader_id = loader["client_id"]
        .as_str()
        .context("the loader has a client id")?
        .to_owned();
    let loader_key = data_dir.join("demo-loader-key.pem");
    crate::tls::write_private(&loader_key, &key.to_pem())?;

    let record = DemoRecord {
        public_url: bound.public_url.clone(),
        app_client_id,
        seed: options.seed,
        patients: sample.patients.len(),
        resources: sample.resources(),
        patient,
        practitioner,
        admin,
    };
    let setup = Setup {
        sample_dir,
        loader_id,
        loader_key,
        passwords,
    };
    Ok((record, setup))
}

/// The demo's three people: the first sample patient (whose record has a
/// sensitive condition), their doctor, and an administrator.
fn logins(sample: &Sample) -> (Login, Login, Login) {
    let first = &sample.patients[0];
    let mut shown: Vec<String> = first
        .sensitive
        .iter()
        .map(|c| format!("a condition labeled {c}"))
        .collect();
    shown.extend(first.consents.iter().cloned());
    let patient = Login {
        username: "demo-patient".into(),
        fhir_user: Some(first.person.reference.clone()),
        name: first.person.name.clone(),
        note: format!("their whole record ({})", shown.join("; ")),
    };
    let doctor = &sample.practitioners[0];
    let practitioner = Login {
        username: "demo-practitioner".into(),
        fhir_user: Some(doctor.reference.clone()),
        name: doctor.name.clone(),
        note: "normal data only; labeled conditions are withheld".into(),
    };
    let admin = Login {
        username: "demo-admin".into(),
        fhir_user: None,
        name: "Demo administrator".into(),
        note: "the whole audit trail and every record's normal data".into(),
    };
    (patient, practitioner, admin)
}

async fn register_app(registrar: &Registrar<'_>, public_url: &str) -> Result<String> {
    let app = registrar
        .add_client(ClientSpec {
            name: APP_NAME.into(),
            redirect_uris: vec![format!("{public_url}{APP_PATH}")],
            scopes: APP_SCOPES.into(),
            auth: Some(ClientAuth::None),
            launch_uri: Some(format!("{public_url}{APP_PATH}launch.html")),
            ..ClientSpec::default()
        })
        .await?;
    Ok(app["client_id"]
        .as_str()
        .context("the app has a client id")?
        .to_owned())
}

/// A password of 80 random bits, in groups easy to type.
fn new_password() -> String {
    let hex: String = haven_model::id::new_id()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect();
    // A UUID's 13th digit is its version, not random; it is skipped.
    let random: String = hex[..12]
        .chars()
        .chain(hex[hex.len() - 8..].chars())
        .collect();
    random
        .as_bytes()
        .chunks(5)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("-")
}

/// The FHIR base through this machine's loopback, where the loader reaches the
/// server whatever its public URL (the local certificate names `localhost`).
fn loopback_base(bound: &Bound) -> Result<String> {
    if bound.config.tls.is_some() {
        // A site certificate names the public host, not localhost.
        return Ok(bound.base_url.clone());
    }
    let scheme = if bound.config.insecure_http {
        "http"
    } else {
        "https"
    };
    Ok(format!(
        "{scheme}://localhost:{}/fhir",
        bound.local_addr()?.port()
    ))
}

async fn load(
    setup: &Setup,
    base: &str,
    ca_file: Option<PathBuf>,
    insecure_http: bool,
) -> Result<()> {
    let summary = crate::load::run(crate::load::LoadOptions {
        paths: vec![setup.sample_dir.clone()],
        server: base.to_owned(),
        ca_file,
        insecure_http,
        concurrency: 4,
        timeout: Duration::from_secs(600),
        auth: Some(crate::load::LoadAuth {
            client_id: setup.loader_id.clone(),
            private_key: setup.loader_key.clone(),
            scope: "system/*.cruds".into(),
        }),
    })
    .await?;
    if let Some(first) = summary.failures.first() {
        bail!(
            "{} of the sample's bundles failed, the first {}: {}",
            summary.failures.len(),
            first.file.display(),
            first.message
        );
    }
    Ok(())
}

/// What to do next, printed once the server answers with the data in.
fn instructions(
    record: &DemoRecord,
    base_url: &str,
    ca_file: Option<&Path>,
    passwords: Option<&Passwords>,
) -> String {
    let origin = &record.public_url;
    let password = |p: Option<&String>| match p {
        Some(p) => p.clone(),
        None => "(as printed at the first start)".into(),
    };
    let mut out = vec![
        String::new(),
        format!(
            "haven demo ready: {} patients, {} resources",
            record.patients, record.resources
        ),
        format!("  FHIR base        {base_url}"),
    ];
    if let Some(ca) = ca_file {
        out.push(format!(
            "  CA certificate   {}  (give it to clients; a browser shows a warning unless it trusts it)",
            ca.display()
        ));
    }
    out.extend([
        format!("  Demo app         {origin}{APP_PATH}  (standalone launch)"),
        format!("  EHR launcher     {origin}/auth/launcher  (sign in as the practitioner, pick a patient and the app)"),
        "  Sign in as".into(),
    ]);
    for (role, login, secret) in [
        (
            "patient",
            &record.patient,
            password(passwords.map(|p| &p.patient)),
        ),
        (
            "practitioner",
            &record.practitioner,
            password(passwords.map(|p| &p.practitioner)),
        ),
        (
            "admin",
            &record.admin,
            password(passwords.map(|p| &p.admin)),
        ),
    ] {
        out.push(format!(
            "    {role:<13} {:<18} password {secret}",
            login.username
        ));
        out.push(format!(
            "    {:<13} {}: sees {}",
            "", login.name, login.note
        ));
    }
    if passwords.is_some() {
        out.push("  The passwords are shown only now; Haven keeps only their hashes.".into());
    }
    if let Some(ca) = ca_file {
        out.push(format!(
            "  Try: curl --cacert {} {base_url}/metadata",
            ca.display()
        ));
    }
    out.push(
        "  Ctrl-C stops the server; `haven demo` on the same --data-dir serves this data again."
            .into(),
    );
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> DemoRecord {
        let sample = haven_sample::generate(Options {
            patients: 3,
            seed: 1,
        });
        let (patient, practitioner, admin) = logins(&sample);
        DemoRecord {
            public_url: "https://localhost:8443".into(),
            app_client_id: "app-1".into(),
            seed: 1,
            patients: 3,
            resources: sample.resources(),
            patient,
            practitioner,
            admin,
        }
    }

    #[test]
    fn the_record_is_written_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_record(dir.path()).unwrap(), None);
        let record = record();
        write_record(dir.path(), &record).unwrap();
        assert_eq!(read_record(dir.path()).unwrap(), Some(record));
        assert!(!dir.path().join("demo.json.partial").exists());
        let text = std::fs::read_to_string(dir.path().join(MARKER)).unwrap();
        assert!(!text.contains("password"), "{text}");
    }

    #[test]
    fn a_broken_record_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MARKER), "{").unwrap();
        let err = read_record(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not a demo record"), "{err}");
    }

    #[test]
    fn the_first_start_prints_the_passwords_and_later_ones_do_not() {
        let record = record();
        let passwords = Passwords {
            patient: "p-1".into(),
            practitioner: "p-2".into(),
            admin: "p-3".into(),
        };
        let ca = PathBuf::from("data/tls/ca.pem");
        let first = instructions(
            &record,
            "https://localhost:8443/fhir",
            Some(&ca),
            Some(&passwords),
        );
        assert!(first.contains("haven demo ready: 3 patients"), "{first}");
        assert!(first.contains("FHIR base        https://localhost:8443/fhir"));
        assert!(first.contains("CA certificate   data/tls/ca.pem"));
        assert!(first.contains("Demo app         https://localhost:8443/apps/demo/"));
        assert!(first.contains("demo-patient       password p-1"), "{first}");
        assert!(first.contains("demo-practitioner  password p-2"), "{first}");
        assert!(first.contains("a condition labeled PSY"), "{first}");
        let later = instructions(&record, "https://localhost:8443/fhir", Some(&ca), None);
        assert!(!later.contains("p-1"));
        assert!(later.contains("(as printed at the first start)"));
    }

    #[test]
    fn generated_passwords_are_long_and_differ() {
        let (a, b) = (new_password(), new_password());
        assert_ne!(a, b);
        assert_eq!(a.len(), 23, "{a}");
        assert_eq!(a.split('-').count(), 4);
    }
}
