//! SMART Backend Services at the authorization server: `client_credentials`
//! with RS384 and ES384 client assertions, everything a forged or stale
//! assertion should be refused for, and RFC 7591 registration of backend clients.

mod support;

use std::collections::HashMap;
use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use haven_auth::client::{ClientKey, JWT_BEARER_ASSERTION_TYPE};
use haven_auth::server::ClientSpec;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{form, harness, refused, Harness, TOKEN_URL};
use time::Duration;

/// RSA generation is slow: one registered key and one impostor for the binary.
fn rsa_key() -> &'static ClientKey {
    static KEY: OnceLock<ClientKey> = OnceLock::new();
    KEY.get_or_init(ClientKey::generate_rsa)
}

fn impostor_rsa_key() -> &'static ClientKey {
    static KEY: OnceLock<ClientKey> = OnceLock::new();
    KEY.get_or_init(ClientKey::generate_rsa)
}

/// A backend client registered for `system/*.rs` and, so that only the
/// system-only rule can drop it, `launch/patient`.
async fn backend_client(h: &Harness, key: &ClientKey) -> String {
    let (client, secret) = h
        .server
        .add_client(ClientSpec {
            name: "Nightly export".into(),
            scopes: "system/*.rs launch/patient".into(),
            jwks: Some(key.jwks()),
            backend: true,
            organization: Some("Example Lab".into()),
            contacts: vec!["mailto:ops@lab.example".into()],
            ..ClientSpec::default()
        })
        .await
        .expect("a backend client");
    assert!(secret.is_none());
    client.client_id
}

fn jti() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The claims of a valid assertion at the server's current time.
fn claims(h: &Harness, client_id: &str) -> Value {
    let now = h.now().unix_timestamp();
    json!({
        "iss": client_id,
        "sub": client_id,
        "aud": TOKEN_URL,
        "exp": now + 300,
        "iat": now,
        "jti": jti(),
    })
}

/// Signs `claims` with `key`, naming `kid` in the header.
fn sign(key: &ClientKey, kid: &str, claims: &Value) -> String {
    let pem = key.to_pem();
    let encoding = match key.algorithm() {
        Algorithm::RS384 => EncodingKey::from_rsa_pem(pem.as_bytes()),
        _ => EncodingKey::from_ec_pem(pem.as_bytes()),
    }
    .expect("an encoding key");
    let mut header = Header::new(key.algorithm());
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &encoding).expect("a signed assertion")
}

/// An assertion made by Haven's own Backend Services client.
fn assertion(h: &Harness, key: &ClientKey, client_id: &str) -> String {
    key.client_assertion(client_id, TOKEN_URL, h.now(), &jti())
        .expect("a client assertion")
}

/// The token endpoint refuses the assertion as RFC 7523 says: 401 invalid_client.
async fn refused_as_invalid_client(h: &Harness, assertion: &str) {
    let result = h
        .server
        .token(&credentials(assertion, "system/*.rs"), None)
        .await;
    refused(result, 401, "invalid_client");
}

fn credentials(assertion: &str, scope: &str) -> HashMap<String, String> {
    form(&[
        ("grant_type", "client_credentials"),
        ("scope", scope),
        ("client_assertion_type", JWT_BEARER_ASSERTION_TYPE),
        ("client_assertion", assertion),
    ])
}

#[tokio::test]
async fn an_rs384_assertion_gets_a_short_system_only_token_without_a_refresh_token() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let form = credentials(
        &assertion(&h, key, &client_id),
        "system/*.rs launch/patient bogus",
    );

    let response = h.server.token(&form, None).await.expect("a token");

    assert_eq!(response["token_type"], "Bearer");
    let expires_in = response["expires_in"].as_i64().expect("expires_in");
    assert_eq!(expires_in, 300);
    // Unknown and non-system scopes are dropped, not fatal.
    assert_eq!(response["scope"], "system/*.rs");
    assert!(response.get("refresh_token").is_none(), "{response}");
    let token = response["access_token"].as_str().expect("access_token");
    let access = h.server.verify_access_token(token).await.expect("verifies");
    assert_eq!(access.scopes.to_string(), "system/*.rs");
    assert_eq!(access.client_id, client_id);
    assert_eq!(access.subject, client_id);
    assert_eq!(access.patient, None);
    assert_eq!(access.expires_at, h.now() + Duration::seconds(300));
}

#[tokio::test]
async fn an_es384_assertion_from_a_p384_key_gets_a_token_too() {
    let h = harness().await;
    let key = ClientKey::generate_ec_p384();
    let client_id = backend_client(&h, &key).await;
    let form = credentials(&assertion(&h, &key, &client_id), "system/*.rs");

    let response = h.server.token(&form, None).await.expect("a token");

    assert_eq!(response["scope"], "system/*.rs");
    let token = response["access_token"].as_str().expect("access_token");
    assert!(h.server.verify_access_token(token).await.is_ok());
}

// The negative tests below build their assertions this way, so this shows they
// fail for the one thing each of them breaks.
#[tokio::test]
async fn a_hand_built_assertion_like_those_below_is_accepted() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let signed = sign(key, &key.kid(), &claims(&h, &client_id));

    let response = h
        .server
        .token(&credentials(&signed, "system/*.rs"), None)
        .await;

    assert_eq!(response.expect("a token")["scope"], "system/*.rs");
}

#[tokio::test]
async fn a_wrong_client_assertion_type_is_an_invalid_client() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let mut form = credentials(&assertion(&h, key, &client_id), "system/*.rs");
    form.insert(
        "client_assertion_type".into(),
        "urn:ietf:params:oauth:client-assertion-type:saml2-bearer".into(),
    );

    refused(h.server.token(&form, None).await, 401, "invalid_client");
}

#[tokio::test]
async fn a_missing_client_assertion_is_an_invalid_client() {
    let h = harness().await;
    let client_id = backend_client(&h, rsa_key()).await;
    let type_only = form(&[
        ("grant_type", "client_credentials"),
        ("scope", "system/*.rs"),
        ("client_assertion_type", JWT_BEARER_ASSERTION_TYPE),
    ]);
    let id_only = form(&[
        ("grant_type", "client_credentials"),
        ("scope", "system/*.rs"),
        ("client_id", &client_id),
    ]);

    refused(
        h.server.token(&type_only, None).await,
        401,
        "invalid_client",
    );
    refused(h.server.token(&id_only, None).await, 401, "invalid_client");
}

#[tokio::test]
async fn an_unsigned_alg_none_assertion_is_an_invalid_client() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let header = json!({"alg": "none", "typ": "JWT", "kid": key.kid()});
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims(&h, &client_id).to_string()),
    );

    refused_as_invalid_client(&h, &unsigned).await;
}

#[tokio::test]
async fn an_hs256_assertion_keyed_with_the_clients_public_key_is_an_invalid_client() {
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};

    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let public_pem = rsa::RsaPrivateKey::from_pkcs8_pem(&key.to_pem())
        .expect("the RSA key")
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("a public PEM");
    let jwk = key.public_jwk();
    let n = jwk["n"].as_str().expect("n").to_string();
    // Whatever public form a confused verifier might use as the HMAC secret.
    for secret in [public_pem, n, jwk.to_string()] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid());
        let forged = jsonwebtoken::encode(
            &header,
            &claims(&h, &client_id),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("an HS256 JWT");

        refused_as_invalid_client(&h, &forged).await;
    }
}

#[tokio::test]
async fn an_expired_assertion_is_an_invalid_client() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let mut stale = claims(&h, &client_id);
    let now = h.now().unix_timestamp();
    stale["iat"] = json!(now - 420);
    stale["exp"] = json!(now - 120);
    let signed = sign(key, &key.kid(), &stale);

    refused_as_invalid_client(&h, &signed).await;
}

#[tokio::test]
async fn an_assertion_expiring_an_hour_ahead_is_an_invalid_client() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let mut long_lived = claims(&h, &client_id);
    long_lived["exp"] = json!(h.now().unix_timestamp() + 3600);
    let signed = sign(key, &key.kid(), &long_lived);

    refused_as_invalid_client(&h, &signed).await;
}

#[tokio::test]
async fn an_assertion_for_another_audience_is_an_invalid_client() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let mut elsewhere = claims(&h, &client_id);
    elsewhere["aud"] = json!("https://other.example/auth/token");
    let signed = sign(key, &key.kid(), &elsewhere);

    refused_as_invalid_client(&h, &signed).await;
}

#[tokio::test]
async fn an_assertion_whose_subject_is_not_its_issuer_is_an_invalid_client() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let mut mismatched = claims(&h, &client_id);
    mismatched["sub"] = json!("someone-else");
    let signed = sign(key, &key.kid(), &mismatched);

    refused_as_invalid_client(&h, &signed).await;
}

#[tokio::test]
async fn a_client_id_other_than_the_assertion_issuer_is_an_invalid_client() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let other_id = backend_client(&h, key).await;
    let mut form = credentials(&assertion(&h, key, &client_id), "system/*.rs");
    form.insert("client_id".into(), other_id);

    refused(h.server.token(&form, None).await, 401, "invalid_client");
}

#[tokio::test]
async fn a_replayed_assertion_is_an_invalid_client_the_second_time() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let form = credentials(&assertion(&h, key, &client_id), "system/*.rs");

    assert!(h.server.token(&form, None).await.is_ok());
    refused(h.server.token(&form, None).await, 401, "invalid_client");
}

#[tokio::test]
async fn an_assertion_naming_an_unknown_kid_is_an_invalid_client() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let signed = sign(key, "no-such-key", &claims(&h, &client_id));

    refused_as_invalid_client(&h, &signed).await;
}

#[tokio::test]
async fn an_assertion_signed_by_another_key_under_the_registered_kid_is_an_invalid_client() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let forged = sign(impostor_rsa_key(), &key.kid(), &claims(&h, &client_id));

    refused_as_invalid_client(&h, &forged).await;
}

#[tokio::test]
async fn a_backend_client_asking_only_for_scopes_it_is_not_registered_for_gets_invalid_scope() {
    let h = harness().await;
    let key = rsa_key();
    let client_id = backend_client(&h, key).await;
    let form = credentials(&assertion(&h, key, &client_id), "system/*.cud");

    refused(h.server.token(&form, None).await, 400, "invalid_scope");
}

#[tokio::test]
async fn a_public_app_cannot_use_client_credentials() {
    let h = harness().await;
    let (app, _) = h
        .server
        .add_client(ClientSpec {
            name: "Growth charts".into(),
            redirect_uris: vec!["https://app.example/callback".into()],
            scopes: "launch/patient patient/*.rs".into(),
            ..ClientSpec::default()
        })
        .await
        .expect("a public app");
    let form = form(&[
        ("grant_type", "client_credentials"),
        ("scope", "system/*.rs"),
        ("client_id", &app.client_id),
    ]);

    refused(
        h.server.token(&form, None).await,
        400,
        "unauthorized_client",
    );
}

/// RFC 7591 metadata of a backend client, without its organization or contacts.
fn backend_metadata(key: &ClientKey) -> Value {
    json!({
        "client_name": "Registry sync",
        "grant_types": ["client_credentials"],
        "token_endpoint_auth_method": "private_key_jwt",
        "jwks": key.jwks(),
        "scope": "system/*.rs",
    })
}

fn with_organization(mut metadata: Value) -> Value {
    metadata["organization_name"] = json!("Example Lab");
    metadata["contacts"] = json!(["mailto:ops@lab.example"]);
    metadata
}

#[tokio::test]
async fn registration_without_an_initial_access_token_is_an_invalid_token() {
    let h = harness().await;
    let metadata = with_organization(backend_metadata(rsa_key()));

    refused(
        h.server.register(None, &metadata).await,
        401,
        "invalid_token",
    );
    refused(
        h.server.register(Some("made-up"), &metadata).await,
        401,
        "invalid_token",
    );
}

#[tokio::test]
async fn a_backend_registration_without_organization_or_contacts_is_invalid_client_metadata() {
    let h = harness().await;
    let token = h
        .server
        .issue_registration_token(Duration::hours(1))
        .await
        .expect("an initial access token");
    let bare = backend_metadata(rsa_key());
    let mut no_contacts = with_organization(bare.clone());
    no_contacts
        .as_object_mut()
        .expect("object")
        .remove("contacts");
    let mut no_organization = with_organization(bare.clone());
    no_organization
        .as_object_mut()
        .expect("object")
        .remove("organization_name");

    for metadata in [bare, no_contacts, no_organization] {
        let result = h.server.register(Some(&token), &metadata).await;
        refused(result, 400, "invalid_client_metadata");
    }
}

#[tokio::test]
async fn a_registered_backend_client_gets_a_client_id_and_then_tokens() {
    let h = harness().await;
    let key = rsa_key();
    let token = h
        .server
        .issue_registration_token(Duration::hours(1))
        .await
        .expect("an initial access token");

    let registered = h
        .server
        .register(Some(&token), &with_organization(backend_metadata(key)))
        .await
        .expect("registered");

    let client_id = registered["client_id"].as_str().expect("client_id");
    assert!(!client_id.is_empty());
    assert_eq!(registered["grant_types"], json!(["client_credentials"]));
    assert_eq!(registered["token_endpoint_auth_method"], "private_key_jwt");
    assert!(registered.get("client_secret").is_none());
    let form = credentials(&assertion(&h, key, client_id), "system/*.rs");
    assert!(h.server.token(&form, None).await.is_ok());
}

#[tokio::test]
async fn an_initial_access_token_registers_only_one_client() {
    let h = harness().await;
    let token = h
        .server
        .issue_registration_token(Duration::hours(1))
        .await
        .expect("an initial access token");
    let metadata = with_organization(backend_metadata(rsa_key()));

    assert!(h.server.register(Some(&token), &metadata).await.is_ok());
    let again = h.server.register(Some(&token), &metadata).await;

    refused(again, 401, "invalid_token");
}

#[tokio::test]
async fn a_refused_registration_leaves_the_initial_access_token_usable() {
    let h = harness().await;
    let token = h
        .server
        .issue_registration_token(Duration::hours(1))
        .await
        .expect("an initial access token");
    let bare = backend_metadata(rsa_key());

    let first = h.server.register(Some(&token), &bare).await;
    refused(first, 400, "invalid_client_metadata");

    assert!(h
        .server
        .register(Some(&token), &with_organization(bare))
        .await
        .is_ok());
}

#[tokio::test]
async fn an_expired_initial_access_token_is_an_invalid_token() {
    let h = harness().await;
    let token = h
        .server
        .issue_registration_token(Duration::minutes(10))
        .await
        .expect("an initial access token");
    h.advance(601);

    let result = h
        .server
        .register(
            Some(&token),
            &with_organization(backend_metadata(rsa_key())),
        )
        .await;

    refused(result, 401, "invalid_token");
}

#[test]
fn jwks_urls_must_be_https_or_loopback_http_without_credentials() {
    use haven_auth::server::is_safe_jwks_uri;
    for good in [
        "https://keys.example.org/jwks.json",
        "http://localhost:8080/jwks",
        "http://127.0.0.1/jwks",
        "http://[::1]:9000/jwks",
    ] {
        assert!(is_safe_jwks_uri(good), "{good}");
    }
    for bad in [
        "http://keys.example.org/jwks.json",
        "http://localhost@evil.example/jwks",
        "http://127.0.0.1.evil.example/jwks",
        "https://user:pass@keys.example.org/jwks",
        "ftp://keys.example.org/jwks",
        "not a url",
    ] {
        assert!(!is_safe_jwks_uri(bad), "{bad}");
    }
}
