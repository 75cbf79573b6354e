//! A fresh authorization server per test: a SQLite store in a temporary
//! directory, a clock that moves only when told, and one signing key shared by
//! every test in the binary.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use haven_auth::keys::{generate_signing_key, KeySet};
use haven_auth::server::{AuthConfig, AuthServer, OAuthError};
use haven_model::clock::{Clock, ManualClock};
use tempfile::TempDir;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

pub const FHIR_BASE: &str = "https://haven.test/fhir";
pub const TOKEN_URL: &str = "https://haven.test/auth/token";

pub struct Harness {
    pub server: AuthServer,
    pub clock: Arc<ManualClock>,
    // Declared last so the store is closed before its directory goes.
    _dir: TempDir,
}

impl Harness {
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub fn advance(&self, seconds: i64) {
        self.clock.advance(Duration::seconds(seconds));
    }
}

/// RSA generation is slow, so the whole binary shares one server key.
pub fn signing_key_pem() -> &'static str {
    static PEM: OnceLock<String> = OnceLock::new();
    PEM.get_or_init(|| generate_signing_key().expect("a signing key"))
}

pub async fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = Arc::new(ManualClock::new(datetime!(2026-03-02 09:30 UTC)));
    let url = format!("sqlite:{}", dir.path().join("h.db").display());
    let store = haven_store::connect(&url, clock.clone() as Arc<dyn Clock>)
        .await
        .expect("a SQLite store");
    let keys =
        KeySet::new(signing_key_pem(), &[], clock.now(), Duration::hours(1)).expect("a key set");
    let server = AuthServer::new(AuthConfig::new(FHIR_BASE), store, clock.clone(), keys);
    assert_eq!(server.config().token_endpoint(), TOKEN_URL);
    Harness {
        server,
        clock,
        _dir: dir,
    }
}

pub fn form(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The error of a refused request, once its HTTP status and OAuth code are checked.
#[track_caller]
pub fn refused<T: std::fmt::Debug>(
    result: Result<T, OAuthError>,
    status: u16,
    error: &str,
) -> OAuthError {
    match result {
        Ok(value) => panic!("expected {status} {error}, but it succeeded: {value:?}"),
        Err(e) => {
            assert_eq!(
                (e.status, e.error),
                (status, error),
                "unexpected refusal: {}",
                e.description
            );
            e
        }
    }
}
