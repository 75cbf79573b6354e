//! The application under test: one store, one authorization server, and two
//! routers over them that differ only in whether audit is on.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use axum::Router;
use haven_api::{router, ApiConfig, AppState};
use haven_auth::client::ClientKey;
use haven_auth::keys::{generate_signing_key, KeySet};
use haven_auth::server::ClientSpec;
use haven_auth::{AuthConfig, AuthServer};
use haven_model::clock::{Clock, SystemClock};
use haven_store::{AuditQuery, Store};
use serde_json::{json, Value};

/// The FHIR base the tokens are issued for; requests never leave the process.
pub const BASE: &str = "https://localhost/fhir";
/// Names this server in `AuditEvent.source.observer`.
const OBSERVER: &str = "haven-bench";
/// Read-only system access: everything the load sends and nothing more.
const SCOPE: &str = "system/*.rs";

/// The seeded data: patients `p0`, `p1`, ... and, for each, Observations
/// `p0-o0`, `p0-o1`, ...
#[derive(Debug, Clone, Copy)]
pub struct Dataset {
    pub patients: u32,
    pub observations_per_patient: u32,
}

impl Dataset {
    pub fn patient_id(index: u32) -> String {
        format!("p{index}")
    }

    pub fn observation_id(patient: u32, index: u32) -> String {
        format!("p{patient}-o{index}")
    }
}

pub struct Bench {
    pub store: Arc<dyn Store>,
    server: Arc<AuthServer>,
    client_id: String,
    key: ClientKey,
    clock: Arc<dyn Clock>,
    /// SMART only.
    pub audit_off: Router,
    /// SMART and audit, as `haven serve` runs.
    pub audit_on: Router,
}

impl Bench {
    /// Connects to the database (running its migrations) and builds both routers.
    /// Backend Services tokens must outlive one warm-up and measured run.
    pub async fn start(database_url: &str, token_lifetime: time::Duration) -> Result<Self> {
        // The real clock: tokens carry real times and are checked against it.
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = haven_store::connect(database_url, clock.clone())
            .await
            .context("connecting to the database")?;
        let signing = generate_signing_key().context("generating a signing key")?;
        let keys = KeySet::new(&signing, &[], clock.now(), time::Duration::hours(1))
            .context("loading the signing key")?;
        let mut config = AuthConfig::new(BASE);
        config.backend_token_lifetime = config.backend_token_lifetime.max(token_lifetime);
        let server = Arc::new(AuthServer::new(config, store.clone(), clock.clone(), keys));
        // EC keys sign assertions faster than RSA ones; signing is not measured anyway.
        let key = ClientKey::generate_ec_p384();
        let (client, _) = server
            .add_client(ClientSpec {
                name: format!("read-heavy benchmark {}", uuid::Uuid::new_v4()),
                scopes: SCOPE.into(),
                jwks: Some(key.jwks()),
                backend: true,
                organization: Some("Haven benchmarks".into()),
                contacts: vec!["mailto:bench@localhost".into()],
                ..ClientSpec::default()
            })
            .await
            .map_err(|e| anyhow!("registering the benchmark client: {e}"))?;
        let state = || AppState::new(store.clone(), clock.clone(), ApiConfig::new(BASE));
        let audit_off = router(state().with_smart(server.clone()));
        let audit_on = router(state().with_smart(server.clone()).with_audit(OBSERVER));
        Ok(Self {
            store,
            server,
            client_id: client.client_id,
            key,
            clock,
            audit_off,
            audit_on,
        })
    }

    /// Stores the dataset straight through the store, in one transaction: seeding
    /// is not what is measured. Updates rather than creates, so a database used
    /// before can be seeded again.
    pub async fn seed(&self, data: Dataset) -> Result<()> {
        let mut tx = self.store.begin().await?;
        for p in 0..data.patients {
            let patient = Dataset::patient_id(p);
            tx.update("Patient", &patient, patient_json(&patient, p), None)
                .await
                .with_context(|| format!("seeding Patient/{patient}"))?;
            for o in 0..data.observations_per_patient {
                let id = Dataset::observation_id(p, o);
                tx.update("Observation", &id, observation_json(&id, &patient, o), None)
                    .await
                    .with_context(|| format!("seeding Observation/{id}"))?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// A fresh `system/*.rs` Backend Services access token, minted as the token
    /// endpoint would for a signed client assertion.
    pub async fn token(&self) -> Result<String> {
        self.backend_token(&self.client_id, &self.key, SCOPE).await
    }

    /// A Backend Services access token for another registered client of this
    /// server (see [`Bench::server`]), minted the same way.
    pub async fn backend_token(
        &self,
        client_id: &str,
        key: &ClientKey,
        scope: &str,
    ) -> Result<String> {
        let token_url = self.server.config().token_endpoint();
        let assertion = key
            .client_assertion(
                client_id,
                &token_url,
                self.clock.now(),
                &uuid::Uuid::new_v4().to_string(),
            )
            .map_err(|e| anyhow!("signing the client assertion: {e}"))?;
        let form: HashMap<String, String> = [
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
            ("scope", scope),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let answer = self
            .server
            .token(&form, None)
            .await
            .map_err(|e| anyhow!("minting a token: {e}"))?;
        answer["access_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("the token answer has no access_token"))
    }

    /// The authorization server both routers verify tokens with, for benchmarks
    /// that need clients or users of their own.
    pub fn server(&self) -> &Arc<AuthServer> {
        &self.server
    }

    /// How many AuditEvents the store holds.
    pub async fn audit_events(&self) -> Result<u64> {
        let page = self
            .store
            .audit_log()
            .search(&AuditQuery {
                count: 0,
                total: true,
                ..AuditQuery::default()
            })
            .await
            .context("counting AuditEvents")?;
        page.total
            .ok_or_else(|| anyhow!("the audit search gave no total"))
    }
}

fn patient_json(id: &str, index: u32) -> Value {
    let gender = ["female", "male"][(index % 2) as usize];
    json!({
        "resourceType": "Patient",
        "id": id,
        "active": true,
        "name": [{"family": format!("Bench{index}"), "given": ["Pat"]}],
        "gender": gender,
        "birthDate": format!("19{:02}-01-15", 40 + index % 60),
    })
}

fn observation_json(id: &str, patient: &str, index: u32) -> Value {
    json!({
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs"
        }]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Heart rate"},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": format!("2026-01-{:02}T08:00:00Z", 1 + index % 28),
        "valueQuantity": {
            "value": 60 + index % 40,
            "unit": "beats/minute",
            "system": "http://unitsofmeasure.org",
            "code": "/min"
        },
    })
}
