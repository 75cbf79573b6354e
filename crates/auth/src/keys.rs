//! The server's signing keys. The current RSA key signs ID tokens (RS256, which
//! OpenID Connect Core §15.1 requires servers to support). Access tokens are
//! signed with an Ed25519 key derived from it (EdDSA, RFC 8037): apps treat
//! them as opaque and only this server verifies them, and an Ed25519 signature
//! costs a small fraction of an RSA one, which was a quarter of the token
//! endpoint's CPU. Both are in the JWKS; retired ones stay there, verify-only,
//! until every token they signed has expired.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::collections::BTreeSet;
use std::sync::Arc;

use aws_lc_rs::hkdf;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, RsaKeyPair, RSA_PKCS1_SHA256};
use jsonwebtoken::{Algorithm, DecodingKey};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::client::jwk_thumbprint;

/// What ID tokens are signed with.
pub const ID_TOKEN_ALGORITHM: Algorithm = Algorithm::RS256;
/// What access tokens are signed with, and the only algorithm accepted for them.
pub const ACCESS_TOKEN_ALGORITHM: Algorithm = Algorithm::EdDSA;
/// HKDF (RFC 5869) inputs that derive the access-token key from the RSA key:
/// one secret file, and a rotation replaces both keys together.
const ACCESS_KEY_SALT: &[u8] = b"haven key set";
const ACCESS_KEY_INFO: &[u8] = b"access token signing key, Ed25519";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the signing key is not a PKCS#8 RSA private key: {0}")]
    BadKey(String),
    #[error("a retired key is not a usable RSA or Ed25519 JWK: {0}")]
    BadRetiredKey(String),
    #[error("signing failed: {0}")]
    Signing(String),
}

/// A public key that verifies tokens, with its JWK and the one algorithm it
/// verifies.
#[derive(Clone)]
struct VerifyingKey {
    kid: String,
    jwk: Value,
    algorithm: Algorithm,
    decoding: DecodingKey,
}

/// One private key, parsed once, and the protected header (base64url) of what
/// it signs: RFC 7515 §3.1's compact form signs BASE64URL(header) '.'
/// BASE64URL(payload).
struct Signer<K> {
    kid: String,
    key: K,
    encoded_header: String,
}

impl<K> Signer<K> {
    fn new(key: K, kid: String, algorithm: &str) -> Self {
        let header = json!({"alg": algorithm, "kid": kid, "typ": "JWT"});
        Self {
            encoded_header: URL_SAFE_NO_PAD.encode(header.to_string()),
            kid,
            key,
        }
    }

    /// `header.payload`, to be signed.
    fn signing_input(&self, claims: &impl Serialize) -> Result<String, KeyError> {
        let payload = serde_json::to_vec(claims).map_err(|e| KeyError::Signing(e.to_string()))?;
        let mut token = self.encoded_header.clone();
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);
        Ok(token)
    }
}

/// A key taken out of signing, kept for verification until `retired_at` plus the
/// longest token lifetime.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetiredKey {
    pub jwk: Value,
    #[serde(with = "time::serde::rfc3339")]
    pub retired_at: OffsetDateTime,
}

/// The current keys and the retired keys still trusted.
#[derive(Clone)]
pub struct KeySet {
    /// Parsed once: setting up an RSA private key (its Montgomery constants)
    /// costs about as much as a signature, so it is not redone per token.
    id_tokens: Arc<Signer<RsaKeyPair>>,
    access_tokens: Arc<Signer<Ed25519KeyPair>>,
    random: SystemRandom,
    verifying: Vec<VerifyingKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kid", &self.id_tokens.kid)
            .field("access_kid", &self.access_tokens.kid)
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

/// The public JWKs of a PEM signing key: the RSA key and the Ed25519 key
/// derived from it, each `kid` being its RFC 7638 thumbprint.
pub fn public_jwks(private_pem: &str) -> Result<Vec<Value>, KeyError> {
    let (rsa, _, ed25519) = private_keys(private_pem)?;
    Ok(vec![rsa_jwk(&rsa.to_public_key())?, ed25519_jwk(&ed25519)?])
}

/// The RSA key of a PEM, its PKCS#8 DER, and the Ed25519 key derived from it.
fn private_keys(
    private_pem: &str,
) -> Result<(RsaPrivateKey, rsa::pkcs8::SecretDocument, Ed25519KeyPair), KeyError> {
    let rsa =
        RsaPrivateKey::from_pkcs8_pem(private_pem).map_err(|e| KeyError::BadKey(e.to_string()))?;
    let der = rsa
        .to_pkcs8_der()
        .map_err(|e| KeyError::BadKey(e.to_string()))?;
    let mut seed = [0u8; 32];
    hkdf::Salt::new(hkdf::HKDF_SHA256, ACCESS_KEY_SALT)
        .extract(der.as_bytes())
        .expand(&[ACCESS_KEY_INFO], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut seed))
        .map_err(|_| KeyError::BadKey("deriving the access-token key failed".into()))?;
    let ed25519 =
        Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|e| KeyError::BadKey(e.to_string()))?;
    Ok((rsa, der, ed25519))
}

fn rsa_jwk(public: &RsaPublicKey) -> Result<Value, KeyError> {
    let n = URL_SAFE_NO_PAD.encode(public.n().to_bytes_be());
    let e = URL_SAFE_NO_PAD.encode(public.e().to_bytes_be());
    with_kid(json!({"kty": "RSA", "n": n, "e": e}), "RS256")
}

/// RFC 8037 §2: an Ed25519 public key is an `OKP` JWK whose `x` is the key.
fn ed25519_jwk(key: &Ed25519KeyPair) -> Result<Value, KeyError> {
    let x = URL_SAFE_NO_PAD.encode(key.public_key().as_ref());
    with_kid(json!({"kty": "OKP", "crv": "Ed25519", "x": x}), "EdDSA")
}

fn with_kid(mut jwk: Value, algorithm: &str) -> Result<Value, KeyError> {
    let kid = jwk_thumbprint(&jwk).map_err(|e| KeyError::BadKey(e.to_string()))?;
    jwk["kid"] = json!(kid);
    jwk["alg"] = json!(algorithm);
    jwk["use"] = json!("sig");
    Ok(jwk)
}

fn verifying_key(jwk: &Value) -> Result<VerifyingKey, KeyError> {
    let text = |name: &str| jwk[name].as_str();
    let Some(kid) = text("kid") else {
        return Err(KeyError::BadRetiredKey("kid is required".into()));
    };
    let bad = |e: jsonwebtoken::errors::Error| KeyError::BadRetiredKey(e.to_string());
    let (algorithm, decoding) = match (text("kty"), text("crv"), text("x"), text("n"), text("e")) {
        (Some("RSA"), _, _, Some(n), Some(e)) => (
            Algorithm::RS256,
            DecodingKey::from_rsa_components(n, e).map_err(bad)?,
        ),
        (Some("OKP"), Some("Ed25519"), Some(x), _, _) => (
            Algorithm::EdDSA,
            DecodingKey::from_ed_components(x).map_err(bad)?,
        ),
        _ => {
            return Err(KeyError::BadRetiredKey(
                "an RSA key needs n and e, an Ed25519 key crv and x".into(),
            ))
        }
    };
    Ok(VerifyingKey {
        kid: kid.to_owned(),
        jwk: jwk.clone(),
        algorithm,
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
        let (private, der, ed25519) = private_keys(current_pem)?;
        let rsa =
            RsaKeyPair::from_pkcs8(der.as_bytes()).map_err(|e| KeyError::BadKey(e.to_string()))?;
        let rsa_key = verifying_key(&rsa_jwk(&private.to_public_key())?)?;
        let ed25519_key = verifying_key(&ed25519_jwk(&ed25519)?)?;
        let id_tokens = Signer::new(rsa, rsa_key.kid.clone(), "RS256");
        let access_tokens = Signer::new(ed25519, ed25519_key.kid.clone(), "EdDSA");
        let mut verifying = vec![rsa_key, ed25519_key];
        for key in retired {
            if key.retired_at + longest_token_lifetime > now {
                verifying.push(verifying_key(&key.jwk)?);
            }
        }
        Ok(KeySet {
            id_tokens: Arc::new(id_tokens),
            access_tokens: Arc::new(access_tokens),
            random: SystemRandom::new(),
            verifying,
        })
    }

    /// Whether `other` signs with the same keys and trusts exactly the same
    /// public keys, whole JWKs compared (a retired key's `kid` is as stored).
    pub fn same_keys(&self, other: &KeySet) -> bool {
        fn trusted(keys: &KeySet) -> BTreeSet<String> {
            keys.verifying.iter().map(|k| k.jwk.to_string()).collect()
        }
        self.kid() == other.kid()
            && self.access_kid() == other.access_kid()
            && trusted(self) == trusted(other)
    }

    /// The key id of the current RSA key, which names the key set.
    pub fn kid(&self) -> &str {
        &self.id_tokens.kid
    }

    /// The key id of the current access-token key.
    pub fn access_kid(&self) -> &str {
        &self.access_tokens.kid
    }

    /// The JWKS document: every key a token may currently be signed with.
    pub fn jwks(&self) -> Value {
        json!({"keys": self.verifying.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
    }

    /// An ID token: a JWS of the claims, signed RS256 with the current RSA key.
    pub fn sign_id_token(&self, claims: &impl Serialize) -> Result<String, KeyError> {
        let signer = &self.id_tokens;
        let mut token = signer.signing_input(claims)?;
        let mut signature = vec![0; signer.key.public_modulus_len()];
        signer
            .key
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

    /// An access token: a JWS of the claims, signed EdDSA with the current
    /// access-token key.
    pub fn sign_access_token(&self, claims: &impl Serialize) -> Result<String, KeyError> {
        let signer = &self.access_tokens;
        let mut token = signer.signing_input(claims)?;
        let signature = signer.key.sign(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
        Ok(token)
    }

    /// The decoding key for a `kid`, if it is one of ours and verifies
    /// `algorithm`: a key never verifies another algorithm's signatures.
    pub(crate) fn decoding_key(&self, kid: &str, algorithm: Algorithm) -> Option<&DecodingKey> {
        self.verifying
            .iter()
            .find(|k| k.kid == kid && k.algorithm == algorithm)
            .map(|k| &k.decoding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifetime() -> time::Duration {
        time::Duration::hours(1)
    }

    /// Verifies `token` as `algorithm` with the key its `kid` names in the JWKS.
    fn verify_with_jwks(keys: &KeySet, token: &str, algorithm: Algorithm) -> Value {
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.alg, algorithm);
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(keys.jwks()).unwrap();
        let jwk = jwks.find(header.kid.as_deref().unwrap()).unwrap();
        let key = DecodingKey::from_jwk(jwk).unwrap();
        // The claims carry no `exp`, so only the signature and algorithm are checked here.
        let mut validation = jsonwebtoken::Validation::new(algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        jsonwebtoken::decode::<Value>(token, &key, &validation)
            .unwrap()
            .claims
    }

    #[test]
    fn a_key_set_is_the_same_only_with_the_same_signing_and_trusted_keys() {
        let now = OffsetDateTime::now_utc();
        let pem = generate_signing_key().unwrap();
        let keys = KeySet::new(&pem, &[], now, lifetime()).unwrap();
        assert!(keys.same_keys(&KeySet::new(&pem, &[], now, lifetime()).unwrap()));

        let other_pem = generate_signing_key().unwrap();
        let retired: Vec<RetiredKey> = public_jwks(&other_pem)
            .unwrap()
            .into_iter()
            .map(|jwk| RetiredKey {
                jwk,
                retired_at: now,
            })
            .collect();
        let trusting_more = KeySet::new(&pem, &retired, now, lifetime()).unwrap();
        assert!(!keys.same_keys(&trusting_more));
        assert!(!trusting_more.same_keys(&keys));
        // The retired keys drop out once their tokens have expired.
        let later = now + lifetime() + time::Duration::seconds(1);
        let expired = KeySet::new(&pem, &retired, later, lifetime()).unwrap();
        assert!(keys.same_keys(&expired));

        let rotated = KeySet::new(&other_pem, &[], now, lifetime()).unwrap();
        assert!(!keys.same_keys(&rotated));
    }

    #[test]
    fn id_tokens_are_rs256_and_access_tokens_eddsa_and_the_jwks_verifies_both() {
        let pem = generate_signing_key().unwrap();
        let keys = KeySet::new(&pem, &[], OffsetDateTime::now_utc(), lifetime()).unwrap();
        let id_token = keys.sign_id_token(&json!({"sub": "x"})).unwrap();
        let access_token = keys.sign_access_token(&json!({"sub": "y"})).unwrap();
        assert_eq!(
            verify_with_jwks(&keys, &id_token, Algorithm::RS256),
            json!({"sub": "x"})
        );
        assert_eq!(
            verify_with_jwks(&keys, &access_token, Algorithm::EdDSA),
            json!({"sub": "y"})
        );
        let jwks = keys.jwks();
        let listed: Vec<(&str, &str)> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| (k["kid"].as_str().unwrap(), k["alg"].as_str().unwrap()))
            .collect();
        assert_eq!(
            listed,
            [(keys.kid(), "RS256"), (keys.access_kid(), "EdDSA")]
        );
        for key in jwks["keys"].as_array().unwrap() {
            assert!(key.get("d").is_none(), "no private parts: {key}");
        }
    }

    #[test]
    fn a_key_verifies_only_its_own_algorithm() {
        let pem = generate_signing_key().unwrap();
        let keys = KeySet::new(&pem, &[], OffsetDateTime::now_utc(), lifetime()).unwrap();
        assert!(keys.decoding_key(keys.kid(), Algorithm::RS256).is_some());
        assert!(keys.decoding_key(keys.kid(), Algorithm::EdDSA).is_none());
        assert!(keys
            .decoding_key(keys.access_kid(), Algorithm::EdDSA)
            .is_some());
        assert!(keys
            .decoding_key(keys.access_kid(), Algorithm::RS256)
            .is_none());
    }

    #[test]
    fn the_access_token_key_is_the_same_on_every_load_and_differs_between_keys() {
        let pem = generate_signing_key().unwrap();
        let now = OffsetDateTime::now_utc();
        let first = KeySet::new(&pem, &[], now, lifetime()).unwrap();
        let again = KeySet::new(&pem, &[], now, lifetime()).unwrap();
        assert_eq!(first.access_kid(), again.access_kid());
        // Ed25519 signatures are deterministic (RFC 8032 §5.1.6).
        let claims = json!({"sub": "x"});
        assert_eq!(
            first.sign_access_token(&claims).unwrap(),
            again.sign_access_token(&claims).unwrap()
        );
        let other = generate_signing_key().unwrap();
        let other = KeySet::new(&other, &[], now, lifetime()).unwrap();
        assert_ne!(first.access_kid(), other.access_kid());
        assert_ne!(first.access_kid(), first.kid());
    }

    #[test]
    fn a_token_whose_payload_was_changed_does_not_verify() {
        let pem = generate_signing_key().unwrap();
        let keys = KeySet::new(&pem, &[], OffsetDateTime::now_utc(), lifetime()).unwrap();
        let token = keys.sign_access_token(&json!({"sub": "x"})).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(br#"{"sub":"y"}"#),
            parts[2]
        );
        let mut validation = jsonwebtoken::Validation::new(ACCESS_TOKEN_ALGORITHM);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let decoding = keys
            .decoding_key(keys.access_kid(), ACCESS_TOKEN_ALGORITHM)
            .unwrap();
        assert!(jsonwebtoken::decode::<Value>(&token, decoding, &validation).is_ok());
        assert!(jsonwebtoken::decode::<Value>(&forged, decoding, &validation).is_err());
    }

    #[test]
    fn retired_keys_stay_in_the_jwks_only_until_their_tokens_expire() {
        let old = generate_signing_key().unwrap();
        let new = generate_signing_key().unwrap();
        let now = OffsetDateTime::now_utc();
        let retired: Vec<RetiredKey> = public_jwks(&old)
            .unwrap()
            .into_iter()
            .map(|jwk| RetiredKey {
                jwk,
                retired_at: now - time::Duration::minutes(30),
            })
            .collect();
        let old_keys = KeySet::new(&old, &[], now, lifetime()).unwrap();
        let token = old_keys.sign_access_token(&json!({"sub": "x"})).unwrap();
        let keys = KeySet::new(&new, &retired, now, lifetime()).unwrap();
        assert_eq!(keys.jwks()["keys"].as_array().unwrap().len(), 4);
        assert_eq!(
            verify_with_jwks(&keys, &token, Algorithm::EdDSA),
            json!({"sub": "x"}),
            "a token of the retired access-token key still verifies"
        );
        let later = now + time::Duration::minutes(31);
        let keys = KeySet::new(&new, &retired, later, lifetime()).unwrap();
        assert_eq!(keys.jwks()["keys"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_retired_key_that_is_neither_rsa_nor_ed25519_is_refused() {
        let pem = generate_signing_key().unwrap();
        let now = OffsetDateTime::now_utc();
        let retired = RetiredKey {
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": "k", "x": "AA", "y": "AA"}),
            retired_at: now,
        };
        assert!(matches!(
            KeySet::new(&pem, &[retired], now, lifetime()),
            Err(KeyError::BadRetiredKey(_))
        ));
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
