//! The OAuth client of SMART Backend Services (SMART App Launch 2.x,
//! `backend-services.html`): a system that calls a FHIR server on its own signs a
//! short-lived JWT with its private key (RFC 7523, `private_key_jwt`) and trades it
//! for an access token with the client credentials grant.
//!
//! - [`ClientKey`]: the private key, its public JWK and the signed client assertion.
//! - [`BackendServicesClient`]: discovery of the token endpoint and a token cache
//!   that asks for a new token shortly before the old one expires.

use std::fmt;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair as _, RsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use oauth2::basic::{BasicClient, BasicTokenType};
use oauth2::{AuthType, ClientId, RequestTokenError, Scope, TokenResponse, TokenUrl};
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::pkcs8::der::asn1::{AnyRef, ContextSpecific, OctetStringRef};
use rsa::pkcs8::der::pem::{self, LineEnding};
use rsa::pkcs8::der::{Decode, Encode, Reader, SliceReader, TagNumber};
use rsa::pkcs8::{
    AlgorithmIdentifierRef, DecodePrivateKey, EncodePrivateKey, ObjectIdentifier, PrivateKeyInfo,
};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::Mutex;
use url::Url;

/// The `client_assertion_type` of a JWT client assertion (RFC 7523 §2.2).
pub const JWT_BEARER_ASSERTION_TYPE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// SMART Backend Services: the assertion's `exp` is no more than five minutes ahead.
const ASSERTION_LIFETIME_SECONDS: i64 = 300;

/// A token this close to its expiry is not handed out, so a request sent with it
/// does not arrive after it lapsed.
const RENEWAL_MARGIN: Duration = Duration::from_secs(30);

/// Backend Services servers must send `expires_in`; if one does not, the token is
/// assumed to live as long as the spec lets it (five minutes).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// RSA key sizes accepted for a client's signing key.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 4096;

/// What can go wrong on the client side of SMART Backend Services.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("unusable private key: {0}")]
    Key(String),
    #[error("invalid JWK: {0}")]
    Jwk(String),
    #[error("signing the client assertion failed: {0}")]
    Sign(String),
    #[error("SMART discovery at {url} failed: {message}")]
    Discovery { url: String, message: String },
    /// The authorization server answered with an OAuth error (RFC 6749 §5.2).
    #[error("the token endpoint {url} refused the request: {error}{}", describe(.error_description))]
    Refused {
        url: String,
        error: String,
        error_description: Option<String>,
    },
    #[error("the token request to {url} failed: {message}")]
    Token { url: String, message: String },
}

fn describe(description: &Option<String>) -> String {
    description
        .as_deref()
        .map(|d| format!(" ({d})"))
        .unwrap_or_default()
}

fn key_error(message: impl Into<String>) -> ClientError {
    ClientError::Key(message.into())
}

/// A client's private signing key: RSA signs RS384 and EC P-384 signs ES384, the
/// two algorithms SMART Backend Services requires servers to accept.
#[derive(Clone)]
pub enum ClientKey {
    /// Boxed: an RSA key with its CRT values is far larger than an EC one.
    Rsa(Box<RsaClientKey>),
    EcP384(EcP384ClientKey),
}

/// An RSA key of 2048 to 4096 bits.
#[derive(Clone)]
pub struct RsaClientKey {
    private: RsaPrivateKey,
    encoding: EncodingKey,
    jwk: Value,
}

/// An EC key on the P-384 curve, kept as PKCS#8 because that is what aws-lc-rs signs with.
#[derive(Clone)]
pub struct EcP384ClientKey {
    pkcs8: Vec<u8>,
    encoding: EncodingKey,
    jwk: Value,
}

impl fmt::Debug for ClientKey {
    /// Only the public side is shown, so a logged key leaks nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("alg", &self.alg())
            .field("kid", &self.kid())
            .finish()
    }
}

impl ClientKey {
    /// Reads the first private key in a PEM text: PKCS#8 (`BEGIN PRIVATE KEY`),
    /// PKCS#1 (`BEGIN RSA PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`). Other
    /// blocks, such as the `EC PARAMETERS` that OpenSSL writes first, are skipped.
    pub fn from_pem(text: &str) -> Result<ClientKey, ClientError> {
        let (label, der) = private_key_block(text)?;
        match label.as_str() {
            "PRIVATE KEY" => Self::from_pkcs8_der(&der),
            "RSA PRIVATE KEY" => {
                let key = RsaPrivateKey::from_pkcs1_der(&der)
                    .map_err(|e| key_error(format!("the PKCS#1 RSA key is malformed: {e}")))?;
                Self::from_rsa(key)
            }
            "EC PRIVATE KEY" => Self::from_sec1_der(&der),
            "ENCRYPTED PRIVATE KEY" => Err(key_error(
                "the private key is encrypted; decrypt it first (openssl pkcs8 -nocrypt)",
            )),
            other => Err(key_error(format!(
                "a {other} is not supported; use an RSA or EC P-384 key"
            ))),
        }
    }

    /// A new 2048-bit RSA key.
    pub fn generate_rsa() -> ClientKey {
        let key = RsaPrivateKey::new(&mut rand_core::OsRng, RSA_MIN_BITS)
            .expect("the system random source can make an RSA key");
        Self::from_rsa(key).expect("a generated 2048-bit RSA key is usable")
    }

    /// A new EC P-384 key.
    pub fn generate_ec_p384() -> ClientKey {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &SystemRandom::new())
                .expect("the system random source can make an EC key");
        Self::from_p384_pkcs8(pkcs8.as_ref().to_vec()).expect("a generated P-384 key is usable")
    }

    /// The private key as PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    pub fn to_pem(&self) -> String {
        match self {
            ClientKey::Rsa(key) => key
                .private
                .to_pkcs8_pem(LineEnding::LF)
                .expect("an RSA key encodes as PKCS#8")
                .to_string(),
            ClientKey::EcP384(key) => pem::encode_string("PRIVATE KEY", LineEnding::LF, &key.pkcs8)
                .expect("DER encodes as PEM"),
        }
    }

    /// The JWS algorithm this key signs with.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            ClientKey::Rsa(_) => Algorithm::RS384,
            ClientKey::EcP384(_) => Algorithm::ES384,
        }
    }

    /// The algorithm's JWS name, `RS384` or `ES384`.
    pub fn alg(&self) -> &'static str {
        match self {
            ClientKey::Rsa(_) => "RS384",
            ClientKey::EcP384(_) => "ES384",
        }
    }

    /// The public JWK to register with a server, with `kid` set to its thumbprint.
    pub fn public_jwk(&self) -> Value {
        match self {
            ClientKey::Rsa(key) => key.jwk.clone(),
            ClientKey::EcP384(key) => key.jwk.clone(),
        }
    }

    /// The key ID: the RFC 7638 thumbprint of the public key, so the same key
    /// always has the same ID wherever it is loaded.
    pub fn kid(&self) -> String {
        self.jwk_ref()["kid"]
            .as_str()
            .expect("the JWK is built with a kid")
            .to_string()
    }

    /// The public key as a JWK Set, as served from a client's `jwks_uri`.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.public_jwk()] })
    }

    /// A signed client assertion for the token endpoint (SMART Backend Services,
    /// RFC 7523 §3): `iss` = `sub` = the client ID, `aud` = the token URL, and an
    /// `exp` five minutes after `now`. `jti` must not repeat while the JWT is valid.
    pub fn client_assertion(
        &self,
        client_id: &str,
        token_url: &str,
        now: OffsetDateTime,
        jti: &str,
    ) -> Result<String, ClientError> {
        let mut header = Header::new(self.algorithm());
        header.typ = Some("JWT".to_string());
        header.kid = Some(self.kid());
        let iat = now.unix_timestamp();
        let claims = json!({
            "iss": client_id,
            "sub": client_id,
            "aud": token_url,
            "exp": iat + ASSERTION_LIFETIME_SECONDS,
            "iat": iat,
            "jti": jti,
        });
        jsonwebtoken::encode(&header, &claims, self.encoding())
            .map_err(|e| ClientError::Sign(e.to_string()))
    }

    fn jwk_ref(&self) -> &Value {
        match self {
            ClientKey::Rsa(key) => &key.jwk,
            ClientKey::EcP384(key) => &key.jwk,
        }
    }

    fn encoding(&self) -> &EncodingKey {
        match self {
            ClientKey::Rsa(key) => &key.encoding,
            ClientKey::EcP384(key) => &key.encoding,
        }
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<ClientKey, ClientError> {
        let info = PrivateKeyInfo::try_from(der)
            .map_err(|e| key_error(format!("the PKCS#8 key is malformed: {e}")))?;
        let oid = info.algorithm.oid;
        if oid == RSA_ENCRYPTION {
            let key = RsaPrivateKey::from_pkcs8_der(der)
                .map_err(|e| key_error(format!("the PKCS#8 RSA key is malformed: {e}")))?;
            return Self::from_rsa(key);
        }
        if oid == EC_PUBLIC_KEY {
            let curve = info
                .algorithm
                .parameters_oid()
                .map_err(|_| key_error("the EC key does not name its curve"))?;
            check_curve(curve)?;
            return Self::from_p384_pkcs8(der.to_vec());
        }
        Err(key_error(format!(
            "{} keys are not supported; use an RSA or EC P-384 key",
            algorithm_name(oid)
        )))
    }

    /// SEC1 (RFC 5915) holds the bare EC key; wrapping it in PKCS#8 lets aws-lc-rs read it.
    fn from_sec1_der(der: &[u8]) -> Result<ClientKey, ClientError> {
        let curve = sec1_curve(der)
            .map_err(|e| key_error(format!("the SEC1 EC key is malformed: {e}")))?
            .ok_or_else(|| key_error("the SEC1 EC key does not name its curve"))?;
        check_curve(curve)?;
        let algorithm = AlgorithmIdentifierRef {
            oid: EC_PUBLIC_KEY,
            parameters: Some(AnyRef::from(&SECP384R1)),
        };
        let pkcs8 = PrivateKeyInfo::new(algorithm, der)
            .to_der()
            .map_err(|e| key_error(format!("re-encoding the SEC1 key as PKCS#8 failed: {e}")))?;
        Self::from_p384_pkcs8(pkcs8)
    }

    fn from_rsa(private: RsaPrivateKey) -> Result<ClientKey, ClientError> {
        let bits = private.size() * 8;
        if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
            return Err(key_error(format!(
                "the RSA key has {bits} bits; RS384 signing needs {RSA_MIN_BITS} to {RSA_MAX_BITS}"
            )));
        }
        let pkcs1 = private
            .to_pkcs1_der()
            .map_err(|e| key_error(format!("encoding the RSA key failed: {e}")))?;
        // aws-lc-rs signs for jsonwebtoken; asking it now turns a bad key into an error
        // here rather than at the first token request.
        RsaKeyPair::from_der(pkcs1.as_bytes())
            .map_err(|e| key_error(format!("the RSA key cannot sign: {e}")))?;
        let jwk = with_kid(json!({
            "kty": "RSA",
            "n": URL_SAFE_NO_PAD.encode(private.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(private.e().to_bytes_be()),
            "alg": "RS384",
            "use": "sig",
        }));
        let encoding = EncodingKey::from_rsa_der(pkcs1.as_bytes());
        Ok(ClientKey::Rsa(Box::new(RsaClientKey {
            private,
            encoding,
            jwk,
        })))
    }

    fn from_p384_pkcs8(pkcs8: Vec<u8>) -> Result<ClientKey, ClientError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &pkcs8)
            .map_err(|e| key_error(format!("the EC P-384 key cannot sign: {e}")))?;
        // An uncompressed point: 0x04, then x and y of 48 bytes each (SEC1 §2.3.3).
        let point = pair.public_key().as_ref();
        if point.len() != 97 || point[0] != 4 {
            return Err(key_error(
                "the EC P-384 public key is not an uncompressed point",
            ));
        }
        let jwk = with_kid(json!({
            "kty": "EC",
            "crv": "P-384",
            "x": URL_SAFE_NO_PAD.encode(&point[1..49]),
            "y": URL_SAFE_NO_PAD.encode(&point[49..]),
            "alg": "ES384",
            "use": "sig",
        }));
        let encoding = EncodingKey::from_ec_der(&pkcs8);
        Ok(ClientKey::EcP384(EcP384ClientKey {
            pkcs8,
            encoding,
            jwk,
        }))
    }
}

fn with_kid(mut jwk: Value) -> Value {
    let kid = jwk_thumbprint(&jwk).expect("the JWK is built with its required members");
    jwk["kid"] = Value::String(kid);
    jwk
}

fn check_curve(curve: ObjectIdentifier) -> Result<(), ClientError> {
    if curve == SECP384R1 {
        return Ok(());
    }
    Err(key_error(format!(
        "EC keys on {} are not supported; use P-384 (ES384) or RSA (RS384)",
        curve_name(curve)
    )))
}

fn curve_name(oid: ObjectIdentifier) -> String {
    match oid.to_string().as_str() {
        "1.2.840.10045.3.1.7" => "P-256".to_string(),
        "1.3.132.0.35" => "P-521".to_string(),
        "1.3.132.0.10" => "secp256k1".to_string(),
        other => format!("the curve {other}"),
    }
}

fn algorithm_name(oid: ObjectIdentifier) -> String {
    match oid.to_string().as_str() {
        "1.3.101.112" => "Ed25519".to_string(),
        "1.3.101.113" => "Ed448".to_string(),
        "1.3.101.110" => "X25519".to_string(),
        "1.2.840.113549.1.1.10" => "RSASSA-PSS".to_string(),
        "1.2.840.10040.4.1" => "DSA".to_string(),
        other => format!("algorithm {other}"),
    }
}

/// The curve named in a SEC1 `ECPrivateKey` (RFC 5915 §3), if it names one.
fn sec1_curve(der: &[u8]) -> rsa::pkcs8::der::Result<Option<ObjectIdentifier>> {
    let mut reader = SliceReader::new(der)?;
    reader.sequence(|seq| {
        let _version = u8::decode(seq)?;
        let _private_key = OctetStringRef::decode(seq)?;
        let curve = ContextSpecific::<ObjectIdentifier>::decode_explicit(seq, TagNumber::N0)?;
        // The public key that may follow is read by aws-lc-rs from the PKCS#8 form.
        let rest = seq.remaining_len();
        seq.read_slice(rest)?;
        Ok(curve.map(|field| field.value))
    })
}

/// The label and contents of the first PEM block whose label ends in `PRIVATE KEY`.
fn private_key_block(text: &str) -> Result<(String, Vec<u8>), ClientError> {
    const BEGIN: &str = "-----BEGIN ";
    let mut others = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let after = &rest[start + BEGIN.len()..];
        let Some(label_end) = after.find("-----") else {
            break;
        };
        let label = &after[..label_end];
        let end_line = format!("-----END {label}-----");
        let Some(end) = rest[start..].find(&end_line) else {
            return Err(key_error(format!("the PEM block {label} has no END line")));
        };
        let block_end = start + end + end_line.len();
        if label.ends_with("PRIVATE KEY") {
            let (label, der) = pem::decode_vec(&rest.as_bytes()[start..block_end])
                .map_err(|e| key_error(format!("the PEM block {label} is malformed: {e}")))?;
            return Ok((label.to_string(), der));
        }
        others.push(label.to_string());
        rest = &rest[block_end..];
    }
    if others.is_empty() {
        Err(key_error(
            "no PEM private key found (expected -----BEGIN PRIVATE KEY-----)",
        ))
    } else {
        Err(key_error(format!(
            "no private key among the PEM blocks ({}); expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY",
            others.join(", ")
        )))
    }
}

/// The RFC 7638 thumbprint of a JWK: SHA-256 over its required members in
/// lexicographic order with no whitespace (§3.2, §3.3), base64url without padding.
pub fn jwk_thumbprint(jwk: &Value) -> Result<String, ClientError> {
    let kty = jwk
        .get("kty")
        .and_then(Value::as_str)
        .ok_or_else(|| ClientError::Jwk("no kty".to_string()))?;
    // Already sorted; OKP is RFC 8037 §2, the others RFC 7638 §3.2.
    let required: &[&str] = match kty {
        "RSA" => &["e", "kty", "n"],
        "EC" => &["crv", "kty", "x", "y"],
        "OKP" => &["crv", "kty", "x"],
        "oct" => &["k", "kty"],
        other => return Err(ClientError::Jwk(format!("unknown kty {other:?}"))),
    };
    let mut members = Vec::with_capacity(required.len());
    for name in required {
        let value = jwk.get(*name).and_then(Value::as_str).ok_or_else(|| {
            ClientError::Jwk(format!("a {kty} JWK needs the string member {name:?}"))
        })?;
        members.push(format!("\"{name}\":{}", Value::String(value.to_string())));
    }
    let canonical = format!("{{{}}}", members.join(","));
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    Ok(URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

/// A SMART Backend Services client for one FHIR server: it finds the token
/// endpoint, asks for tokens with a signed assertion and caches them.
///
/// Backend Services tokens live at most five minutes and come without a refresh
/// token, so renewing one is a new client credentials request with a new `jti`.
/// One lock covers discovery and token requests, so concurrent callers that find
/// the token stale make one request between them.
pub struct BackendServicesClient {
    fhir_base: Url,
    client_id: String,
    key: ClientKey,
    scope: String,
    http: reqwest::Client,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    token_endpoint: Option<TokenEndpoint>,
    token: Option<CachedToken>,
}

#[derive(Clone, Debug)]
struct TokenEndpoint {
    url: Url,
    /// The assertion's `aud` is the token URL as the server wrote it, since
    /// parsing may normalise it (a trailing slash, the case of the host).
    advertised: String,
}

struct CachedToken {
    value: String,
    expires_at: Instant,
}

impl CachedToken {
    fn fresh(&self) -> bool {
        self.expires_at > Instant::now() + RENEWAL_MARGIN
    }
}

impl fmt::Debug for BackendServicesClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendServicesClient")
            .field("fhir_base", &self.fhir_base.as_str())
            .field("client_id", &self.client_id)
            .field("key", &self.key)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl BackendServicesClient {
    /// `scope` is space-separated, e.g. `system/*.cruds` or
    /// `system/Patient.rs system/Observation.rs`. Nothing is fetched until the
    /// first token is asked for.
    pub fn new(
        fhir_base_url: Url,
        client_id: impl Into<String>,
        key: ClientKey,
        scope: impl Into<String>,
        http: reqwest::Client,
    ) -> BackendServicesClient {
        BackendServicesClient {
            fhir_base: fhir_base_url,
            client_id: client_id.into(),
            key,
            scope: scope.into(),
            http,
            state: Mutex::new(State::default()),
        }
    }

    pub fn key(&self) -> &ClientKey {
        &self.key
    }

    /// The token endpoint from the server's SMART configuration, fetched once.
    pub async fn token_endpoint(&self) -> Result<Url, ClientError> {
        let mut state = self.state.lock().await;
        Ok(self.discover(&mut state).await?.url)
    }

    /// A token valid for at least 30 more seconds: the cached one, or a new one.
    pub async fn access_token(&self) -> Result<String, ClientError> {
        let mut state = self.state.lock().await;
        if let Some(token) = state.token.as_ref().filter(|t| t.fresh()) {
            return Ok(token.value.clone());
        }
        self.request_token(&mut state).await
    }

    /// A token other than `rejected`, for a caller whose request was answered 401.
    /// If another caller already replaced that token, the replacement is returned
    /// rather than asking for yet another.
    pub async fn renew_access_token(&self, rejected: &str) -> Result<String, ClientError> {
        let mut state = self.state.lock().await;
        if let Some(token) = state
            .token
            .as_ref()
            .filter(|t| t.value != rejected && t.fresh())
        {
            return Ok(token.value.clone());
        }
        self.request_token(&mut state).await
    }

    async fn discover(&self, state: &mut State) -> Result<TokenEndpoint, ClientError> {
        if let Some(endpoint) = &state.token_endpoint {
            return Ok(endpoint.clone());
        }
        let url = format!(
            "{}/.well-known/smart-configuration",
            self.fhir_base.as_str().trim_end_matches('/')
        );
        let fail = |message: String| ClientError::Discovery {
            url: url.clone(),
            message,
        };
        let response = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        let config: Value = response
            .json()
            .await
            .map_err(|e| fail(format!("the answer is not JSON: {}", error_chain(&e))))?;
        let endpoint = token_endpoint_from(&config, self.key.alg()).map_err(fail)?;
        state.token_endpoint = Some(endpoint.clone());
        Ok(endpoint)
    }

    async fn request_token(&self, state: &mut State) -> Result<String, ClientError> {
        let endpoint = self.discover(state).await?;
        let fail = |message: String| ClientError::Token {
            url: endpoint.advertised.clone(),
            message,
        };
        let jti = uuid::Uuid::new_v4().to_string();
        let assertion = self.key.client_assertion(
            &self.client_id,
            &endpoint.advertised,
            OffsetDateTime::now_utc(),
            &jti,
        )?;
        // No client secret: the client authenticates with the assertion, and
        // oauth2 then puts the client ID in the body beside it (RFC 7521 §4.2).
        let oauth = BasicClient::new(ClientId::new(self.client_id.clone()))
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(TokenUrl::from_url(endpoint.url.clone()));
        let asked_at = Instant::now();
        tracing::debug!(token_endpoint = %endpoint.advertised, %jti, "requesting a Backend Services access token");
        let response = oauth
            .exchange_client_credentials()
            .add_scopes(
                self.scope
                    .split_whitespace()
                    .map(|s| Scope::new(s.to_string())),
            )
            .add_extra_param("client_assertion_type", JWT_BEARER_ASSERTION_TYPE)
            .add_extra_param("client_assertion", assertion)
            .request_async(&self.http)
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(refusal) => ClientError::Refused {
                    url: endpoint.advertised.clone(),
                    error: refusal.error().to_string(),
                    error_description: refusal.error_description().cloned(),
                },
                RequestTokenError::Request(e) => fail(error_chain(&e)),
                RequestTokenError::Parse(e, body) => fail(format!(
                    "unreadable answer ({e}): {}",
                    String::from_utf8_lossy(&body)
                        .chars()
                        .take(300)
                        .collect::<String>()
                )),
                RequestTokenError::Other(message) => fail(message),
            })?;
        if *response.token_type() != BasicTokenType::Bearer {
            return Err(fail(format!(
                "the token type is {:?}, not bearer",
                response.token_type()
            )));
        }
        let lifetime = response.expires_in().unwrap_or(DEFAULT_TOKEN_LIFETIME);
        let value = response.access_token().secret().clone();
        state.token = Some(CachedToken {
            value: value.clone(),
            expires_at: asked_at + lifetime,
        });
        Ok(value)
    }
}

/// The token endpoint of a SMART configuration (SMART App Launch,
/// `.well-known/smart-configuration`), checked against what this client can do.
fn token_endpoint_from(config: &Value, alg: &str) -> Result<TokenEndpoint, String> {
    let advertised = config
        .get("token_endpoint")
        .and_then(Value::as_str)
        .ok_or("the SMART configuration has no token_endpoint")?;
    let endpoint = Url::parse(advertised)
        .map_err(|e| format!("the token_endpoint {advertised:?} is not a URL: {e}"))?;
    if let Some(methods) = config.get("token_endpoint_auth_methods_supported") {
        let offered = methods
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m == "private_key_jwt"));
        if !offered {
            return Err(format!(
                "the server does not accept private_key_jwt client authentication (token_endpoint_auth_methods_supported: {methods})"
            ));
        }
    }
    if let Some(algs) = config.get("token_endpoint_auth_signing_alg_values_supported") {
        let offered = algs.as_array().is_some_and(|a| a.iter().any(|a| a == alg));
        if !offered {
            return Err(format!(
                "the server does not accept {alg} client assertions (token_endpoint_auth_signing_alg_values_supported: {algs})"
            ));
        }
    }
    // The assertion is a credential; it crosses a network only encrypted.
    let loopback = match endpoint.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    };
    let endpoint = TokenEndpoint {
        url: endpoint,
        advertised: advertised.to_string(),
    };
    match endpoint.url.scheme() {
        "https" => Ok(endpoint),
        "http" if loopback => Ok(endpoint),
        _ => Err(format!(
            "the token_endpoint {advertised} is not https (plain http only on a loopback address)"
        )),
    }
}

/// An error and its causes on one line; reqwest puts the useful part in the sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    use jsonwebtoken::{DecodingKey, Validation};

    fn rsa_key() -> &'static ClientKey {
        static KEY: OnceLock<ClientKey> = OnceLock::new();
        KEY.get_or_init(ClientKey::generate_rsa)
    }

    /// Verifies a JWT with the key's own public JWK, as a server would.
    fn verify(key: &ClientKey, jwt: &str, audience: &str) -> (Header, Value) {
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.public_jwk()).unwrap();
        let decoding = DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = Validation::new(key.algorithm());
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        let data = jsonwebtoken::decode::<Value>(jwt, &decoding, &validation).unwrap();
        (data.header, data.claims)
    }

    // OpenSSL's `ecparam -genkey` output: an EC PARAMETERS block, then a SEC1 key.
    const SEC1_P384: &str = "-----BEGIN EC PARAMETERS-----
BgUrgQQAIg==
-----END EC PARAMETERS-----
-----BEGIN EC PRIVATE KEY-----
MIGkAgEBBDBXAGBuNrXn9RY7U9dEU3M/mfviYmxj0DaZ7B+LKLmP+e/FmgTX1o6k
O298kIA4vzygBwYFK4EEACKhZANiAAQMmewU4WGvFtP18SEg0IclYJcHCEB5Y/X2
9KYU1jEIPkv3lUFQg4HUjuMr0VHSQpEuooEOXSjA3WnVNoRa7Bf5THDhK6qMp82V
jjYumgxUAVKX3jhB2FSO5kWOAUEbjBc=
-----END EC PRIVATE KEY-----
";

    const SEC1_P256: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIDFG4L7meoj7YBCcK8S7D3eiyMz6uV5OudSjdljh/oQzoAoGCCqGSM49
AwEHoUQDQgAEOKod68W5fwZ7+14W1JrdT7sLYpGbPRIELKOYZwI2w1wZ2yNHKbgA
hSnNB1OOduPdQT3phYGm9OeUjl4aDvaMUg==
-----END EC PRIVATE KEY-----
";

    #[test]
    fn the_thumbprint_of_the_rfc_7638_example_key_is_the_rfc_value() {
        // RFC 7638 §3.1; alg and kid are not required members and do not count.
        let jwk = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(
            jwk_thumbprint(&jwk).unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn a_jwk_without_its_required_members_has_no_thumbprint() {
        let err = jwk_thumbprint(&json!({"kty": "EC", "crv": "P-384", "x": "AA"})).unwrap_err();
        assert!(err.to_string().contains("\"y\""), "{err}");
        assert!(jwk_thumbprint(&json!({"n": "AA"})).is_err());
    }

    #[test]
    fn the_public_jwk_of_an_rsa_key_names_rs384_and_its_thumbprint() {
        let key = rsa_key();
        let jwk = key.public_jwk();
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(jwk["alg"], "RS384");
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["e"], "AQAB");
        assert!(jwk.get("d").is_none(), "no private member");
        assert_eq!(jwk["kid"], jwk_thumbprint(&jwk).unwrap());
        assert_eq!(key.kid(), jwk["kid"]);
        assert_eq!(key.jwks(), json!({"keys": [jwk]}));
    }

    #[test]
    fn the_public_jwk_of_an_ec_key_names_p384_and_es384() {
        let key = ClientKey::generate_ec_p384();
        let jwk = key.public_jwk();
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-384");
        assert_eq!(jwk["alg"], "ES384");
        assert_eq!(jwk["use"], "sig");
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        assert_eq!(x.len(), 48);
        assert_eq!(jwk["kid"], jwk_thumbprint(&jwk).unwrap());
    }

    #[test]
    fn the_assertion_carries_the_smart_header_and_claims_and_lives_five_minutes() {
        let key = rsa_key();
        let token_url = "https://auth.example/token";
        let now = OffsetDateTime::now_utc();
        let jwt = key
            .client_assertion("loader", token_url, now, "jti-1")
            .unwrap();
        let (header, claims) = verify(key, &jwt, token_url);
        assert_eq!(header.alg, Algorithm::RS384);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.kid, Some(key.kid()));
        assert_eq!(claims["iss"], "loader");
        assert_eq!(claims["sub"], "loader");
        assert_eq!(claims["aud"], token_url);
        assert_eq!(claims["jti"], "jti-1");
        assert_eq!(claims["iat"], now.unix_timestamp());
        let exp = claims["exp"].as_i64().unwrap();
        assert_eq!(exp - now.unix_timestamp(), 300);
        let names: Vec<&String> = claims.as_object().unwrap().keys().collect();
        assert_eq!(names, ["iss", "sub", "aud", "exp", "iat", "jti"]);
    }

    #[test]
    fn an_ec_p384_assertion_verifies_with_es384() {
        let key = ClientKey::generate_ec_p384();
        let now = OffsetDateTime::now_utc();
        let jwt = key
            .client_assertion("loader", "https://auth.example/token", now, "j")
            .unwrap();
        let (header, claims) = verify(&key, &jwt, "https://auth.example/token");
        assert_eq!(header.alg, Algorithm::ES384);
        assert_eq!(claims["sub"], "loader");
    }

    #[test]
    fn a_key_written_as_pkcs8_pem_reads_back_as_the_same_key() {
        for key in [rsa_key().clone(), ClientKey::generate_ec_p384()] {
            let pem = key.to_pem();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
            let again = ClientKey::from_pem(&pem).unwrap();
            assert_eq!(again.kid(), key.kid());
            assert_eq!(again.alg(), key.alg());
        }
    }

    #[test]
    fn a_pkcs1_rsa_key_is_read() {
        let ClientKey::Rsa(rsa) = rsa_key() else {
            unreachable!("rsa_key makes an RSA key");
        };
        let pem = rsa.private.to_pkcs1_pem(LineEnding::CRLF).unwrap();
        assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        assert_eq!(ClientKey::from_pem(&pem).unwrap().kid(), rsa_key().kid());
    }

    #[test]
    fn a_sec1_p384_key_after_openssl_ec_parameters_is_read_and_signs_es384() {
        let key = ClientKey::from_pem(SEC1_P384).unwrap();
        assert_eq!(key.algorithm(), Algorithm::ES384);
        let jwt = key
            .client_assertion("c", "https://a.example/t", OffsetDateTime::now_utc(), "j")
            .unwrap();
        verify(&key, &jwt, "https://a.example/t");
        // The same key as PKCS#8 has the same thumbprint.
        assert_eq!(ClientKey::from_pem(&key.to_pem()).unwrap().kid(), key.kid());
    }

    #[test]
    fn an_ec_key_on_another_curve_is_refused_naming_the_curve() {
        let err = ClientKey::from_pem(SEC1_P256).unwrap_err();
        assert!(err.to_string().contains("P-256"), "{err}");
        let pkcs8 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem();
        let err = ClientKey::from_pem(&pkcs8).unwrap_err();
        assert!(err.to_string().contains("P-256"), "{err}");
        assert!(err.to_string().contains("P-384"), "{err}");
    }

    #[test]
    fn an_ed25519_key_is_refused_naming_the_algorithm() {
        let pkcs8 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .unwrap()
            .serialize_pem();
        let err = ClientKey::from_pem(&pkcs8).unwrap_err();
        assert!(err.to_string().contains("Ed25519"), "{err}");
    }

    #[test]
    fn garbage_pem_and_public_keys_are_refused_clearly() {
        let err = ClientKey::from_pem("not a key").unwrap_err();
        assert!(err.to_string().contains("no PEM private key"), "{err}");
        let err = ClientKey::from_pem(
            "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("PKCS#8 key is malformed"), "{err}");
        let public = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
            .unwrap()
            .public_key_pem();
        let err = ClientKey::from_pem(&public).unwrap_err();
        assert!(err.to_string().contains("PUBLIC KEY"), "{err}");
        let err = ClientKey::from_pem(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("encrypted"), "{err}");
    }

    #[test]
    fn a_small_rsa_key_is_refused() {
        let small = RsaPrivateKey::new(&mut rand_core::OsRng, 1024).unwrap();
        let pem = small.to_pkcs8_pem(LineEnding::LF).unwrap();
        let err = ClientKey::from_pem(&pem).unwrap_err();
        assert!(err.to_string().contains("1024 bits"), "{err}");
    }

    #[test]
    fn the_debug_form_of_a_key_shows_no_private_part() {
        let text = format!("{:?}", rsa_key());
        assert!(
            text.contains("RS384") && text.contains(&rsa_key().kid()),
            "{text}"
        );
        assert!(text.len() < 120, "{text}");
    }

    #[test]
    fn discovery_needs_a_token_endpoint_and_private_key_jwt_when_methods_are_listed() {
        let ok = json!({"token_endpoint": "https://a.example/token"});
        assert_eq!(
            token_endpoint_from(&ok, "RS384").unwrap().url.as_str(),
            "https://a.example/token"
        );
        let bare = json!({"token_endpoint": "https://Auth.Example"});
        let endpoint = token_endpoint_from(&bare, "RS384").unwrap();
        assert_eq!(endpoint.url.as_str(), "https://auth.example/");
        assert_eq!(
            endpoint.advertised, "https://Auth.Example",
            "the aud to use"
        );
        let err = token_endpoint_from(&json!({}), "RS384").unwrap_err();
        assert!(err.contains("no token_endpoint"), "{err}");
        let secret_only = json!({
            "token_endpoint": "https://a.example/token",
            "token_endpoint_auth_methods_supported": ["client_secret_basic"]
        });
        let err = token_endpoint_from(&secret_only, "RS384").unwrap_err();
        assert!(err.contains("private_key_jwt"), "{err}");
        let rsa_only = json!({
            "token_endpoint": "https://a.example/token",
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384"]
        });
        assert!(token_endpoint_from(&rsa_only, "RS384").is_ok());
        assert!(token_endpoint_from(&rsa_only, "ES384")
            .unwrap_err()
            .contains("ES384"));
    }

    #[test]
    fn a_plain_http_token_endpoint_is_accepted_only_on_loopback() {
        let at = |url: &str| token_endpoint_from(&json!({ "token_endpoint": url }), "RS384");
        assert!(at("http://127.0.0.1:9000/token").is_ok());
        assert!(at("http://localhost/token").is_ok());
        assert!(at("http://auth.example/token").is_err());
    }

    #[test]
    fn the_client_can_be_shared_between_tasks() {
        fn shareable<T: Send + Sync>() {}
        shareable::<BackendServicesClient>();
        shareable::<ClientKey>();
    }

    /// A FHIR server's discovery document and token endpoint, recording each token
    /// request's form fields.
    mod fake_server {
        use std::collections::HashMap;
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};

        use axum::extract::State;
        use axum::http::StatusCode;
        use axum::routing::{get, post};
        use axum::{Form, Json, Router};
        use serde_json::{json, Value};

        pub struct Fake {
            pub base: String,
            pub requests: Arc<Mutex<Vec<HashMap<String, String>>>>,
        }

        impl Fake {
            pub fn token_url(&self) -> String {
                format!("{}/auth/token", self.base.trim_end_matches("/fhir"))
            }
        }

        #[derive(Clone)]
        struct Shared {
            base: String,
            expires_in: u64,
            refuse: bool,
            issued: Arc<AtomicU64>,
            requests: Arc<Mutex<Vec<HashMap<String, String>>>>,
        }

        pub async fn start(expires_in: u64, refuse: bool) -> Fake {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let requests = Arc::new(Mutex::new(Vec::new()));
            let shared = Shared {
                base: base.clone(),
                expires_in,
                refuse,
                issued: Arc::new(AtomicU64::new(0)),
                requests: requests.clone(),
            };
            let app = Router::new()
                .route("/fhir/.well-known/smart-configuration", get(configuration))
                .route("/auth/token", post(token))
                .with_state(shared);
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            Fake {
                base: format!("{base}/fhir"),
                requests,
            }
        }

        async fn configuration(State(shared): State<Shared>) -> Json<Value> {
            Json(json!({
                "token_endpoint": format!("{}/auth/token", shared.base),
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "grant_types_supported": ["client_credentials"],
            }))
        }

        async fn token(
            State(shared): State<Shared>,
            Form(form): Form<HashMap<String, String>>,
        ) -> (StatusCode, Json<Value>) {
            shared.requests.lock().unwrap().push(form);
            if shared.refuse {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "invalid_client", "error_description": "unknown kid"})),
                );
            }
            let n = shared.issued.fetch_add(1, Ordering::SeqCst) + 1;
            (
                StatusCode::OK,
                Json(json!({
                    "access_token": format!("token-{n}"),
                    "token_type": "bearer",
                    "expires_in": shared.expires_in,
                    "scope": "system/*.cruds",
                })),
            )
        }
    }

    fn client_for(fake: &fake_server::Fake) -> BackendServicesClient {
        BackendServicesClient::new(
            Url::parse(&fake.base).unwrap(),
            "loader",
            rsa_key().clone(),
            "system/*.cruds",
            reqwest::Client::new(),
        )
    }

    #[tokio::test]
    async fn the_client_discovers_the_endpoint_sends_a_signed_assertion_and_caches_the_token() {
        let fake = fake_server::start(300, false).await;
        let client = client_for(&fake);
        let token_url = fake.token_url();
        assert_eq!(client.token_endpoint().await.unwrap().as_str(), token_url);
        assert_eq!(client.access_token().await.unwrap(), "token-1");
        assert_eq!(client.access_token().await.unwrap(), "token-1");
        let requests = fake.requests.lock().unwrap().clone();
        assert_eq!(
            requests.len(),
            1,
            "the second call is served from the cache"
        );
        let form = &requests[0];
        assert_eq!(form["grant_type"], "client_credentials");
        assert_eq!(form["scope"], "system/*.cruds");
        assert_eq!(form["client_assertion_type"], JWT_BEARER_ASSERTION_TYPE);
        assert!(!form.contains_key("client_secret"));
        assert_eq!(
            form["client_id"], "loader",
            "the same client as the assertion's sub"
        );
        let (header, claims) = verify(rsa_key(), &form["client_assertion"], &token_url);
        assert_eq!(header.kid, Some(rsa_key().kid()));
        assert_eq!(claims["iss"], "loader");
        assert_eq!(claims["sub"], "loader");
    }

    #[tokio::test]
    async fn a_token_expiring_within_thirty_seconds_is_replaced_with_a_new_jti() {
        let fake = fake_server::start(20, false).await;
        let client = client_for(&fake);
        assert_eq!(client.access_token().await.unwrap(), "token-1");
        assert_eq!(client.access_token().await.unwrap(), "token-2");
        let requests = fake.requests.lock().unwrap().clone();
        let jtis: Vec<Value> = requests
            .iter()
            .map(|form| {
                verify(rsa_key(), &form["client_assertion"], &fake.token_url()).1["jti"].clone()
            })
            .collect();
        assert_ne!(jtis[0], jtis[1]);
    }

    #[tokio::test]
    async fn a_rejected_token_is_replaced_once_for_all_callers() {
        let fake = fake_server::start(300, false).await;
        let client = client_for(&fake);
        assert_eq!(client.access_token().await.unwrap(), "token-1");
        assert_eq!(
            client.renew_access_token("token-1").await.unwrap(),
            "token-2"
        );
        // A second caller that was also refused token-1 gets token-2 without a request.
        assert_eq!(
            client.renew_access_token("token-1").await.unwrap(),
            "token-2"
        );
        assert_eq!(client.access_token().await.unwrap(), "token-2");
        assert_eq!(fake.requests.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_token_request() {
        let fake = fake_server::start(300, false).await;
        let client = std::sync::Arc::new(client_for(&fake));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.access_token().await.unwrap() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), "token-1");
        }
        assert_eq!(fake.requests.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_refusal_carries_the_oauth_error_and_description() {
        let fake = fake_server::start(300, true).await;
        let client = client_for(&fake);
        let err = client.access_token().await.unwrap_err();
        match &err {
            ClientError::Refused {
                error,
                error_description,
                ..
            } => {
                assert_eq!(error, "invalid_client");
                assert_eq!(error_description.as_deref(), Some("unknown kid"));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(
            err.to_string().contains("invalid_client (unknown kid)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_server_without_a_smart_configuration_fails_discovery_clearly() {
        let fake = fake_server::start(300, false).await;
        let base = fake.base.replace("/fhir", "/elsewhere");
        let client = BackendServicesClient::new(
            Url::parse(&base).unwrap(),
            "loader",
            rsa_key().clone(),
            "system/*.cruds",
            reqwest::Client::new(),
        );
        let err = client.access_token().await.unwrap_err();
        assert!(matches!(err, ClientError::Discovery { .. }), "{err:?}");
        assert!(err.to_string().contains("404"), "{err}");
    }
}
