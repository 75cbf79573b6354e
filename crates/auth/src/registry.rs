//! Registered clients and users, and the secrets that go with them. Secrets are
//! kept only as hashes: argon2id for passwords and client secrets (chosen by
//! people, so they must be slow to guess), SHA-256 for the long random tokens
//! Haven mints itself (codes, refresh tokens, sessions), which cannot be guessed.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use aws_lc_rs::rand::SecureRandom;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use haven_policy::clearance::Clearance;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::scope::ScopeSet;

/// Record kinds in the store.
pub(crate) mod kind {
    pub const CLIENT: &str = "client";
    pub const USER: &str = "user";
    pub const PENDING: &str = "pending";
    pub const SESSION: &str = "session";
    pub const CODE: &str = "code";
    pub const GRANT: &str = "grant";
    pub const REFRESH: &str = "refresh";
    pub const REVOKED: &str = "revoked";
    pub const ASSERTION: &str = "assertion-jti";
    pub const LAUNCH: &str = "launch";
    pub const REGISTRATION_TOKEN: &str = "registration-token";
}

/// How a client proves who it is at the token endpoint (RFC 7591 §2 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// A public client: no secret (PKCE protects its codes).
    None,
    ClientSecretBasic,
    ClientSecretPost,
    /// A signed JWT assertion (SMART asymmetric client authentication).
    PrivateKeyJwt,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::None => "none",
            ClientAuth::ClientSecretBasic => "client_secret_basic",
            ClientAuth::ClientSecretPost => "client_secret_post",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
        }
    }

    pub fn parse(text: &str) -> Option<ClientAuth> {
        [
            ClientAuth::None,
            ClientAuth::ClientSecretBasic,
            ClientAuth::ClientSecretPost,
            ClientAuth::PrivateKeyJwt,
        ]
        .into_iter()
        .find(|a| a.as_str() == text)
    }

    pub fn uses_secret(self) -> bool {
        matches!(
            self,
            ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost
        )
    }
}

/// A registered client application.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientRecord {
    pub client_id: String,
    pub name: String,
    /// Compared by exact string (RFC 9700 §2.1).
    pub redirect_uris: Vec<String>,
    /// The most this client may ever be granted.
    pub scopes: ScopeSet,
    pub auth: ClientAuth,
    /// argon2id PHC string of the secret, for secret clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hash: Option<String>,
    /// Inline JWKS for `private_key_jwt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<Value>,
    /// Where to fetch the JWKS for `private_key_jwt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// A Backend Services client: `client_credentials` only, `system/` scopes.
    pub backend: bool,
    /// A resource server: may introspect tokens issued to other clients.
    #[serde(default)]
    pub resource_server: bool,
    /// The EHR launcher sends users here with `iss` and `launch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_uri: Option<String>,
    /// Who requests data through this client (R3: identified once, here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contacts: Vec<String>,
    /// Unix seconds.
    pub registered_at: i64,
    /// The most its tokens may see; `None`: its users' clearance (or, for a
    /// Backend Services client, the site's default for such clients).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "clearance_text"
    )]
    pub clearance: Option<Clearance>,
    /// The purposes of use (v3 PurposeOfUse codes) it may ask for; empty:
    /// treatment only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purposes: Vec<String>,
}

impl ClientRecord {
    pub fn allows_purpose(&self, purpose: &str) -> bool {
        if self.purposes.is_empty() {
            purpose == haven_policy::purpose::TREATMENT
        } else {
            self.purposes.iter().any(|p| p == purpose)
        }
    }

    /// What an administrator or a registering client may see: no secret hash.
    pub fn public_view(&self) -> Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.remove("secret_hash");
        }
        value
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees only their own record (`fhir_user` names their Patient).
    Patient,
    /// Picks patients; uses the EHR launcher.
    Practitioner,
    /// A practitioner who may also issue registration tokens.
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "patient" => Some(Role::Patient),
            "practitioner" => Some(Role::Practitioner),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Patient => "patient",
            Role::Practitioner => "practitioner",
            Role::Admin => "admin",
        }
    }
}

/// A person who can sign in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserRecord {
    pub username: String,
    pub password_hash: String,
    pub role: Role,
    /// A relative reference such as `Patient/123` or `Practitioner/9`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Their own clearance; `None`: their role's.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "clearance_text"
    )]
    pub clearance: Option<Clearance>,
    /// Whether they may break the glass (purpose BTG, with a reason).
    #[serde(default)]
    pub break_glass: bool,
    /// Their organization (`Organization/id`), which Consents may name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
}

/// Clearances are stored in their text form (`R:ETH,PSY`).
mod clearance_text {
    use haven_policy::clearance::Clearance;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Clearance>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(c) => s.serialize_str(&c.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Clearance>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| Clearance::parse(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

impl UserRecord {
    pub fn public_view(&self) -> Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.remove("password_hash");
        }
        value
    }

    /// The patient id a patient user is confined to.
    pub fn own_patient(&self) -> Option<&str> {
        if self.role != Role::Patient {
            return None;
        }
        self.fhir_user.as_deref()?.strip_prefix("Patient/")
    }
}

/// `n` random bytes, base64url: codes, tokens, ids.
pub fn random_token(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut buffer)
        .expect("the system random source works");
    URL_SAFE_NO_PAD.encode(buffer)
}

/// The storage key of a minted secret: SHA-256, base64url.
pub fn token_hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ))
}

/// An argon2id PHC string for a password or client secret.
pub fn hash_secret(secret: &str) -> String {
    let salt = SaltString::generate(&mut rand_core::OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .expect("argon2 with default parameters hashes any input")
        .to_string()
}

/// Whether `secret` matches the PHC string; a malformed hash never matches.
pub fn verify_secret(secret: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(secret.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash to check against when the user does not exist, so that an unknown
/// username costs the same time as a wrong password.
pub(crate) fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_secret(&random_token(16)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_verifies_against_its_argon2id_hash_only() {
        let hash = hash_secret("correct horse");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_secret("correct horse", &hash));
        assert!(!verify_secret("wrong horse", &hash));
        assert!(!verify_secret("correct horse", "not a hash"));
    }

    #[test]
    fn minted_tokens_are_long_random_and_hashed_deterministically() {
        let a = random_token(32);
        assert_eq!(a.len(), 43);
        assert_ne!(a, random_token(32));
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), a);
    }

    #[test]
    fn a_patient_user_is_confined_to_their_own_patient() {
        let user = UserRecord {
            username: "amy".into(),
            password_hash: String::new(),
            role: Role::Patient,
            fhir_user: Some("Patient/p1".into()),
            display_name: None,
            clearance: None,
            break_glass: false,
            organization: None,
        };
        assert_eq!(user.own_patient(), Some("p1"));
        assert!(user.public_view().get("password_hash").is_none());
        let doctor = UserRecord {
            role: Role::Practitioner,
            fhir_user: Some("Practitioner/d1".into()),
            ..user
        };
        assert_eq!(doctor.own_patient(), None);
    }
}
