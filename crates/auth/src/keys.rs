//! The server's signing keys: the current one signs access and ID tokens (RS256,
//! which OpenID Connect Core §15.1 requires servers to support); retired ones
//! stay in the JWKS, verify-only, until every token they signed has expired.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey};
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::client::jwk_thumbprint;

/// The one algorithm Haven signs with and accepts for its own tokens.
pub const SIGNING_ALGORITHM: Algorithm = Algorithm::RS256;
/// [`SIGNING_ALGORITHM`] as a JWS `alg` value (RFC 7518 §3.1).
const ALGORITHM_NAME: &str = "RS256";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the signing key is not a PKCS#8 RSA private key: {0}")]
    BadKey(String),
    #[error("a retired key is not a usable RSA JWK: {0}")]
    BadRetiredKey(String),
    #[error("signing failed: {0}")]
    Signing(String),
}

/// A public key that verifies tokens, with its JWK.
#[derive(Clone)]
struct VerifyingKey {
    kid: String,
    jwk: Value,
    decoding: DecodingKey,
}

/// A key taken out of signing, kept for verification until `retired_at` plus the
/// longest token lifetime.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetiredKey {
    pub jwk: Value,
    #[serde(with = "time::serde::rfc3339")]
    pub retired_at: OffsetDateTime,
}

/// The current signing key and the retired keys still trusted.
#[derive(Clone)]
pub struct KeySet {
    kid: String,
    /// Parsed once: setting up an RSA private key (its Montgomery constants)
    /// costs about as much as a signature, so it is not redone per token.
    signing: Arc<RsaKeyPair>,
    /// The protected header every token carries, already base64url-encoded.
    encoded_header: String,
    random: SystemRandom,
    verifying: Vec<VerifyingKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A new 2048-bit RSA signing key as PKCS#8 PEM.
pub fn generate_signing_key() -> Result<String, KeyError> {
    let key = RsaPrivateKey::new(&mut rand_core::OsRng, 2048)
        .map_err(|e| KeyError::BadKey(e.to_string()))?;
    Ok(key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::BadKey(e.to_string()))?
        .to_string())
}

/// The public JWK of a PEM signing key, `kid` being its RFC 7638 thumbprint.
pub fn public_jwk(private_pem: &str) -> Result<Value, KeyError> {
    let key =
        RsaPrivateKey::from_pkcs8_pem(private_pem).map_err(|e| KeyError::BadKey(e.to_string()))?;
    rsa_jwk(&key.to_public_key())
}

fn rsa_jwk(public: &RsaPublicKey) -> Result<Value, KeyError> {
    let n = URL_SAFE_NO_PAD.encode(public.n().to_bytes_be());
    let e = URL_SAFE_NO_PAD.encode(public.e().to_bytes_be());
    let mut jwk = json!({"kty": "RSA", "n": n, "e": e});
    let kid = jwk_thumbprint(&jwk).map_err(|e| KeyError::BadKey(e.to_string()))?;
    jwk["kid"] = json!(kid);
    jwk["alg"] = json!("RS256");
    jwk["use"] = json!("sig");
    Ok(jwk)
}

fn verifying_key(jwk: &Value) -> Result<VerifyingKey, KeyError> {
    let (Some(kid), Some(n), Some(e)) = (jwk["kid"].as_str(), jwk["n"].as_str(), jwk["e"].as_str())
    else {
        return Err(KeyError::BadRetiredKey("kid, n and e are required".into()));
    };
    let decoding = DecodingKey::from_rsa_components(n, e)
        .map_err(|e| KeyError::BadRetiredKey(e.to_string()))?;
    Ok(VerifyingKey {
        kid: kid.to_owned(),
        jwk: jwk.clone(),
        decoding,
    })
}

impl KeySet {
    /// The current key (PKCS#8 PEM) and the retired keys still within
    /// `longest_token_lifetime` of their retirement at `now`.
    pub fn new(
        current_pem: &str,
        retired: &[RetiredKey],
        now: OffsetDateTime,
        longest_token_lifetime: time::Duration,
    ) -> Result<KeySet, KeyError> {
        let private = RsaPrivateKey::from_pkcs8_pem(current_pem)
            .map_err(|e| KeyError::BadKey(e.to_string()))?;
        let der = private
            .to_pkcs8_der()
            .map_err(|e| KeyError::BadKey(e.to_string()))?;
        let signing =
            RsaKeyPair::from_pkcs8(der.as_bytes()).map_err(|e| KeyError::BadKey(e.to_string()))?;
        let jwk = rsa_jwk(&private.to_public_key())?;
        let mut verifying = vec![verifying_key(&jwk)?];
        for key in retired {
            if key.retired_at + longest_token_lifetime > now {
                verifying.push(verifying_key(&key.jwk)?);
            }
        }
        let kid = verifying[0].kid.clone();
        // RFC 7515 §3.1: the compact form signs BASE64URL(header) '.' BASE64URL(payload).
        let header = json!({"alg": ALGORITHM_NAME, "kid": kid, "typ": "JWT"});
        Ok(KeySet {
            encoded_header: URL_SAFE_NO_PAD.encode(header.to_string()),
            kid,
            signing: Arc::new(signing),
            random: SystemRandom::new(),
            verifying,
        })
    }

    /// The key id of the current signing key.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWKS document: every key a token may currently be signed with.
    pub fn jwks(&self) -> Value {
        json!({"keys": self.verifying.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
    }

    /// A JWS of the claims, signed with the current key.
    pub fn sign(&self, claims: &impl Serialize) -> Result<String, KeyError> {
        let payload = serde_json::to_vec(claims).map_err(|e| KeyError::Signing(e.to_string()))?;
        let mut token = self.encoded_header.clone();
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);
        let mut signature = vec![0; self.signing.public().modulus_len()];
        self.signing
            .sign(
                &RSA_PKCS1_SHA256,
                &self.random,
                token.as_bytes(),
                &mut signature,
            )
            .map_err(|e| KeyError::Signing(e.to_string()))?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        Ok(token)
    }

    /// The decoding key for a `kid`, if it is one of ours.
    pub(crate) fn decoding_key(&self, kid: &str) -> Option<&DecodingKey> {
        self.verifying
            .iter()
            .find(|k| k.kid == kid)
            .map(|k| &k.decoding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifetime() -> time::Duration {
        time::Duration::hours(1)
    }

    #[test]
    fn a_generated_key_signs_tokens_its_jwks_verifies() {
        let pem = generate_signing_key().unwrap();
        let now = OffsetDateTime::now_utc();
        let keys = KeySet::new(&pem, &[], now, lifetime()).unwrap();
        let token = keys.sign(&json!({"sub": "x"})).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::RS256);
        assert_eq!(header.kid.as_deref(), Some(keys.kid()));
        let jwks = keys.jwks();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
        assert_eq!(jwks["keys"][0]["kid"], keys.kid());
        assert!(jwks["keys"][0].get("d").is_none(), "no private parts");
        let decoding = keys.decoding_key(keys.kid()).unwrap();
        // The claims carry no `exp`, so only the signature and algorithm are checked here.
        let mut validation = jsonwebtoken::Validation::new(SIGNING_ALGORITHM);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let claims = jsonwebtoken::decode::<Value>(&token, decoding, &validation).unwrap();
        assert_eq!(claims.claims, json!({"sub": "x"}));
    }

    #[test]
    fn a_token_whose_payload_was_changed_does_not_verify() {
        let pem = generate_signing_key().unwrap();
        let keys = KeySet::new(&pem, &[], OffsetDateTime::now_utc(), lifetime()).unwrap();
        let token = keys.sign(&json!({"sub": "x"})).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(br#"{"sub":"y"}"#),
            parts[2]
        );
        let mut validation = jsonwebtoken::Validation::new(SIGNING_ALGORITHM);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let decoding = keys.decoding_key(keys.kid()).unwrap();
        assert!(jsonwebtoken::decode::<Value>(&token, decoding, &validation).is_ok());
        assert!(jsonwebtoken::decode::<Value>(&forged, decoding, &validation).is_err());
    }

    #[test]
    fn retired_keys_stay_in_the_jwks_only_until_their_tokens_expire() {
        let old = generate_signing_key().unwrap();
        let new = generate_signing_key().unwrap();
        let now = OffsetDateTime::now_utc();
        let retired = RetiredKey {
            jwk: public_jwk(&old).unwrap(),
            retired_at: now - time::Duration::minutes(30),
        };
        let keys = KeySet::new(&new, std::slice::from_ref(&retired), now, lifetime()).unwrap();
        assert_eq!(keys.jwks()["keys"].as_array().unwrap().len(), 2);
        let later = now + time::Duration::minutes(31);
        let keys = KeySet::new(&new, &[retired], later, lifetime()).unwrap();
        assert_eq!(keys.jwks()["keys"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_key_that_is_not_pem_is_refused() {
        let now = OffsetDateTime::now_utc();
        assert!(matches!(
            KeySet::new("not a key", &[], now, lifetime()),
            Err(KeyError::BadKey(_))
        ));
    }
}
