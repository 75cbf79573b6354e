//! The authorization code flow driven through the server's API: PKCE and
//! redirect URI rules at the authorization endpoint, then codes, refresh
//! tokens, client authentication, ID tokens, introspection and revocation at
//! the token side.

mod support;

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use haven_auth::registry::{ClientAuth, Role, UserRecord};
use haven_auth::server::{AuthorizeError, ClientSpec, Pending, UserPolicy};
use haven_auth::TokenRejection;
use haven_policy::clearance::Clearance;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use support::{form, harness, refused, Harness, FHIR_BASE};

const REDIRECT: &str = "https://app.example/callback";
const OTHER_REDIRECT: &str = "https://app.example/other-callback";
const STATE: &str = "af0ifjsldkj";
const VERIFIER: &str = "a-pkce-verifier-long-enough-for-rfc-7636-0123456789";
const APP_SCOPES: &str =
    "openid fhirUser profile launch/patient offline_access online_access patient/*.rs user/*.rs";
/// What the flows below ask for, with the practitioner choosing patient p42.
const SCOPE: &str = "openid fhirUser launch/patient patient/*.rs offline_access";
const PATIENT: &str = "p42";

fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        verifier.as_bytes(),
    ))
}

fn spec(name: &str, auth: Option<ClientAuth>) -> ClientSpec {
    ClientSpec {
        name: name.into(),
        redirect_uris: vec![REDIRECT.into(), OTHER_REDIRECT.into()],
        scopes: APP_SCOPES.into(),
        auth,
        ..ClientSpec::default()
    }
}

async fn public_app(h: &Harness) -> String {
    let (client, _) = h
        .server
        .add_client(spec("Growth charts", None))
        .await
        .expect("a public app");
    assert_eq!(client.auth, ClientAuth::None);
    client.client_id
}

/// A confidential app's id and secret.
async fn confidential_app(h: &Harness) -> (String, String) {
    let (client, secret) = h
        .server
        .add_client(spec("Care planner", Some(ClientAuth::ClientSecretBasic)))
        .await
        .expect("a confidential app");
    (client.client_id, secret.expect("a secret"))
}

async fn practitioner(h: &Harness) -> UserRecord {
    h.server
        .add_user(
            "dana",
            "a long enough password",
            Role::Practitioner,
            Some("Practitioner/d1".into()),
            Some("Dana Reyes".into()),
        )
        .await
        .expect("a practitioner")
}

async fn patient_user(h: &Harness) -> UserRecord {
    h.server
        .add_user(
            "amy",
            "a long enough password",
            Role::Patient,
            Some("Patient/p1".into()),
            None,
        )
        .await
        .expect("a patient user")
}

fn authorize_params(client_id: &str, scope: &str) -> HashMap<String, String> {
    form(&[
        ("client_id", client_id),
        ("redirect_uri", REDIRECT),
        ("response_type", "code"),
        ("scope", scope),
        ("state", STATE),
        ("aud", FHIR_BASE),
        ("code_challenge", &challenge(VERIFIER)),
        ("code_challenge_method", "S256"),
    ])
}

fn query(url: &str) -> HashMap<String, String> {
    url::Url::parse(url)
        .expect("an absolute URL")
        .query_pairs()
        .into_owned()
        .collect()
}

/// The refusal must go back to the client's redirect URI with `error` and `state`.
#[track_caller]
fn assert_redirected(result: Result<Pending, AuthorizeError>, error: &str) {
    match result {
        Err(AuthorizeError::Redirect(url)) => {
            assert!(url.starts_with(REDIRECT), "{url}");
            let query = query(&url);
            assert_eq!(query.get("error").map(String::as_str), Some(error), "{url}");
            assert_eq!(query.get("state").map(String::as_str), Some(STATE), "{url}");
        }
        other => panic!("expected a redirect with {error}, got {other:?}"),
    }
}

#[track_caller]
fn assert_error_page(result: Result<Pending, AuthorizeError>) {
    assert!(
        matches!(result, Err(AuthorizeError::Page(_))),
        "expected an error page, got {result:?}"
    );
}

/// Runs the authorization endpoint to a code: request, sign-in, patient choice, consent.
async fn code_with(
    h: &Harness,
    params: &HashMap<String, String>,
    user: &UserRecord,
    patient: Option<&str>,
) -> String {
    let pending = h
        .server
        .begin_authorization(params)
        .await
        .expect("the authorization request is accepted");
    let mut pending = h
        .server
        .attach_user(pending, user, "cookie-value")
        .await
        .expect("signed in");
    if let Some(patient) = patient {
        pending = h
            .server
            .choose_patient(pending, patient)
            .await
            .expect("a patient chosen");
    }
    let url = h
        .server
        .approve(&pending, &pending.scopes.clone())
        .await
        .expect("approved");
    assert!(url.starts_with(REDIRECT), "{url}");
    let query = query(&url);
    assert_eq!(query.get("state").map(String::as_str), Some(STATE));
    query.get("code").expect("a code").clone()
}

async fn code(h: &Harness, client_id: &str, user: &UserRecord) -> String {
    code_with(h, &authorize_params(client_id, SCOPE), user, Some(PATIENT)).await
}

fn exchange(client_id: &str, code: &str) -> HashMap<String, String> {
    form(&[
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", REDIRECT),
        ("client_id", client_id),
        ("code_verifier", VERIFIER),
    ])
}

fn refresh(client_id: &str, refresh_token: &str) -> HashMap<String, String> {
    form(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
        ("client_id", client_id),
    ])
}

/// The token response of a whole flow for a public app.
async fn tokens(h: &Harness, client_id: &str, user: &UserRecord) -> Value {
    let code = code(h, client_id, user).await;
    h.server
        .token(&exchange(client_id, &code), None)
        .await
        .expect("tokens")
}

fn text<'a>(response: &'a Value, name: &str) -> &'a str {
    response[name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {response}"))
}

// ----- PKCE ----------------------------------------------------------------

#[tokio::test]
async fn an_authorization_request_without_a_code_challenge_is_redirected_with_invalid_request() {
    let h = harness().await;
    let app = public_app(&h).await;
    let mut params = authorize_params(&app, SCOPE);
    params.remove("code_challenge");

    assert_redirected(
        h.server.begin_authorization(&params).await,
        "invalid_request",
    );
}

#[tokio::test]
async fn a_blank_code_challenge_is_redirected_with_invalid_request() {
    let h = harness().await;
    let app = public_app(&h).await;
    let mut params = authorize_params(&app, SCOPE);
    params.insert("code_challenge".into(), "   ".into());

    assert_redirected(
        h.server.begin_authorization(&params).await,
        "invalid_request",
    );
}

#[tokio::test]
async fn the_plain_challenge_method_is_redirected_with_invalid_request() {
    let h = harness().await;
    let app = public_app(&h).await;
    let mut params = authorize_params(&app, SCOPE);
    params.insert("code_challenge".into(), VERIFIER.into());
    params.insert("code_challenge_method".into(), "plain".into());

    assert_redirected(
        h.server.begin_authorization(&params).await,
        "invalid_request",
    );
}

#[tokio::test]
async fn a_missing_challenge_method_is_redirected_with_invalid_request() {
    let h = harness().await;
    let app = public_app(&h).await;
    let mut params = authorize_params(&app, SCOPE);
    params.remove("code_challenge_method");

    assert_redirected(
        h.server.begin_authorization(&params).await,
        "invalid_request",
    );
}

#[tokio::test]
async fn a_wrong_code_verifier_is_an_invalid_grant() {
    let h = harness().await;
    let app = public_app(&h).await;
    let code = code(&h, &app, &practitioner(&h).await).await;
    let mut form = exchange(&app, &code);
    form.insert(
        "code_verifier".into(),
        "another-verifier-also-long-enough-for-rfc-7636-000".into(),
    );

    refused(h.server.token(&form, None).await, 400, "invalid_grant");
}

#[tokio::test]
async fn a_missing_code_verifier_is_an_invalid_grant() {
    let h = harness().await;
    let app = public_app(&h).await;
    let code = code(&h, &app, &practitioner(&h).await).await;
    let mut form = exchange(&app, &code);
    form.remove("code_verifier");

    refused(h.server.token(&form, None).await, 400, "invalid_grant");
}

// ----- Redirect URIs, audience and clients -----------------------------------

#[tokio::test]
async fn a_redirect_uri_differing_in_any_way_from_a_registered_one_gets_a_page_not_a_redirect() {
    let h = harness().await;
    let app = public_app(&h).await;
    for uri in [
        "https://evil.example/callback",
        "https://app.example/callback/",
        "https://APP.example/callback",
        "https://app.example/callback?next=1",
    ] {
        let mut params = authorize_params(&app, SCOPE);
        params.insert("redirect_uri".into(), uri.into());

        assert_error_page(h.server.begin_authorization(&params).await);
    }
}

#[tokio::test]
async fn another_redirect_uri_at_the_token_endpoint_is_an_invalid_grant() {
    let h = harness().await;
    let app = public_app(&h).await;
    let user = practitioner(&h).await;
    let first = code(&h, &app, &user).await;
    // Registered too, but not the one the code was issued for.
    let mut form = exchange(&app, &first);
    form.insert("redirect_uri".into(), OTHER_REDIRECT.into());
    refused(h.server.token(&form, None).await, 400, "invalid_grant");

    let second = code(&h, &app, &user).await;
    let mut form = exchange(&app, &second);
    form.remove("redirect_uri");
    refused(h.server.token(&form, None).await, 400, "invalid_grant");
}

#[tokio::test]
async fn an_audience_of_another_server_is_redirected_with_invalid_request() {
    let h = harness().await;
    let app = public_app(&h).await;
    let mut params = authorize_params(&app, SCOPE);
    params.insert("aud".into(), "https://other.example/fhir".into());

    assert_redirected(
        h.server.begin_authorization(&params).await,
        "invalid_request",
    );
}

#[tokio::test]
async fn an_unknown_client_gets_an_error_page_at_the_authorization_endpoint() {
    let h = harness().await;

    assert_error_page(
        h.server
            .begin_authorization(&authorize_params("no-such-client", SCOPE))
            .await,
    );
}

#[tokio::test]
async fn an_unknown_client_at_the_token_endpoint_is_an_invalid_client() {
    let h = harness().await;
    let app = public_app(&h).await;
    let code = code(&h, &app, &practitioner(&h).await).await;

    let result = h
        .server
        .token(&exchange("no-such-client", &code), None)
        .await;

    refused(result, 401, "invalid_client");
}

#[tokio::test]
async fn the_password_grant_is_an_unsupported_grant_type() {
    let h = harness().await;
    let app = public_app(&h).await;
    let form = form(&[
        ("grant_type", "password"),
        ("client_id", &app),
        ("username", "dana"),
        ("password", "a long enough password"),
    ]);

    refused(
        h.server.token(&form, None).await,
        400,
        "unsupported_grant_type",
    );
}

// ----- Codes -------------------------------------------------------------------

#[tokio::test]
async fn a_replayed_code_is_an_invalid_grant_and_revokes_what_the_first_exchange_issued() {
    let h = harness().await;
    let app = public_app(&h).await;
    let code = code(&h, &app, &practitioner(&h).await).await;
    let first = h
        .server
        .token(&exchange(&app, &code), None)
        .await
        .expect("the first exchange");
    let access = text(&first, "access_token");
    assert!(h.server.verify_access_token(access).await.is_ok());

    let second = h.server.token(&exchange(&app, &code), None).await;

    refused(second, 400, "invalid_grant");
    assert_eq!(
        h.server.verify_access_token(access).await,
        Err(TokenRejection::Revoked)
    );
    let result = h
        .server
        .token(&refresh(&app, text(&first, "refresh_token")), None)
        .await;
    refused(result, 400, "invalid_grant");
}

#[tokio::test]
async fn a_code_redeemed_after_sixty_one_seconds_is_an_invalid_grant() {
    let h = harness().await;
    let app = public_app(&h).await;
    let code = code(&h, &app, &practitioner(&h).await).await;
    h.advance(61);

    refused(
        h.server.token(&exchange(&app, &code), None).await,
        400,
        "invalid_grant",
    );
}

#[tokio::test]
async fn a_code_issued_to_one_client_is_an_invalid_grant_for_another() {
    let h = harness().await;
    let app = public_app(&h).await;
    let other = public_app(&h).await;
    let code = code(&h, &app, &practitioner(&h).await).await;

    refused(
        h.server.token(&exchange(&other, &code), None).await,
        400,
        "invalid_grant",
    );
    // The other client's attempt neither used the code up nor revoked anything.
    h.server
        .token(&exchange(&app, &code), None)
        .await
        .expect("the rightful client still exchanges its code");
}

// ----- Refresh tokens --------------------------------------------------------------

#[tokio::test]
async fn a_refresh_token_is_rotated_on_use() {
    let h = harness().await;
    let app = public_app(&h).await;
    let first = tokens(&h, &app, &practitioner(&h).await).await;
    let old = text(&first, "refresh_token");

    let renewed = h
        .server
        .token(&refresh(&app, old), None)
        .await
        .expect("refreshed");

    let new = text(&renewed, "refresh_token");
    assert_ne!(new, old);
    assert_eq!(renewed["scope"], first["scope"]);
    assert_eq!(renewed["patient"], PATIENT);
    assert!(renewed.get("id_token").is_none(), "{renewed}");
    let access = h
        .server
        .verify_access_token(text(&renewed, "access_token"))
        .await
        .expect("the new access token verifies");
    assert_eq!(access.patient.as_deref(), Some(PATIENT));
    assert!(h.server.token(&refresh(&app, new), None).await.is_ok());
}

#[tokio::test]
async fn a_refresh_token_presented_by_another_client_is_an_invalid_grant() {
    let h = harness().await;
    let app = public_app(&h).await;
    let other = public_app(&h).await;
    let first = tokens(&h, &app, &practitioner(&h).await).await;
    let token = text(&first, "refresh_token");

    let result = h.server.token(&refresh(&other, token), None).await;

    refused(result, 400, "invalid_grant");
    // The attempt neither used up nor revoked the owner's token.
    assert!(h.server.token(&refresh(&app, token), None).await.is_ok());
}

#[tokio::test]
async fn a_refresh_asking_for_wider_scopes_is_an_invalid_scope() {
    let h = harness().await;
    let app = public_app(&h).await;
    let first = tokens(&h, &app, &practitioner(&h).await).await;
    let mut form = refresh(&app, text(&first, "refresh_token"));
    form.insert("scope".into(), "patient/*.cruds offline_access".into());

    refused(h.server.token(&form, None).await, 400, "invalid_scope");
}

#[tokio::test]
async fn a_refresh_asking_for_narrower_scopes_gets_just_those() {
    let h = harness().await;
    let app = public_app(&h).await;
    let first = tokens(&h, &app, &practitioner(&h).await).await;
    let mut form = refresh(&app, text(&first, "refresh_token"));
    form.insert(
        "scope".into(),
        "launch/patient patient/Observation.rs offline_access".into(),
    );

    let renewed = h.server.token(&form, None).await.expect("refreshed");

    assert_eq!(
        renewed["scope"],
        "launch/patient patient/Observation.rs offline_access"
    );
    let access = h
        .server
        .verify_access_token(text(&renewed, "access_token"))
        .await
        .expect("verifies");
    assert_eq!(
        access.scopes.to_string(),
        "launch/patient patient/Observation.rs offline_access"
    );
    assert_eq!(access.patient.as_deref(), Some(PATIENT));
    // RFC 6749 §6: the new refresh token keeps the scopes of the one it replaced.
    let again = h
        .server
        .token(&refresh(&app, text(&renewed, "refresh_token")), None)
        .await
        .expect("refreshed again");
    assert_eq!(again["scope"], first["scope"]);
}

#[tokio::test]
async fn a_rotated_refresh_token_expires_with_its_grant() {
    let h = harness().await;
    let app = public_app(&h).await;
    let first = tokens(&h, &app, &practitioner(&h).await).await;
    // offline_access grants last 30 days from the code exchange.
    h.advance(29 * 86_400);
    let renewed = h
        .server
        .token(&refresh(&app, text(&first, "refresh_token")), None)
        .await
        .expect("refreshed within the grant's lifetime");
    h.advance(2 * 86_400);

    let result = h
        .server
        .token(&refresh(&app, text(&renewed, "refresh_token")), None)
        .await;

    refused(result, 400, "invalid_grant");
}

#[tokio::test]
async fn reusing_a_rotated_refresh_token_is_an_invalid_grant_and_revokes_the_whole_family() {
    let h = harness().await;
    let app = public_app(&h).await;
    let first = tokens(&h, &app, &practitioner(&h).await).await;
    let old = text(&first, "refresh_token");
    let renewed = h
        .server
        .token(&refresh(&app, old), None)
        .await
        .expect("refreshed");

    let reuse = h.server.token(&refresh(&app, old), None).await;

    refused(reuse, 400, "invalid_grant");
    let newest = h
        .server
        .token(&refresh(&app, text(&renewed, "refresh_token")), None)
        .await;
    refused(newest, 400, "invalid_grant");
    for response in [&first, &renewed] {
        assert_eq!(
            h.server
                .verify_access_token(text(response, "access_token"))
                .await,
            Err(TokenRejection::Revoked)
        );
    }
}

// ----- Confidential clients ----------------------------------------------------------

#[tokio::test]
async fn a_confidential_client_authenticates_with_http_basic() {
    let h = harness().await;
    let (app, secret) = confidential_app(&h).await;
    let code = code(&h, &app, &practitioner(&h).await).await;
    let mut form = exchange(&app, &code);
    form.remove("client_id");

    let response = h.server.token(&form, Some((app.clone(), secret))).await;

    let response = response.expect("tokens");
    let access = h
        .server
        .verify_access_token(text(&response, "access_token"))
        .await
        .expect("verifies");
    assert_eq!(access.client_id, app);
}

#[tokio::test]
async fn a_confidential_client_authenticates_with_a_form_secret() {
    let h = harness().await;
    let (app, secret) = confidential_app(&h).await;
    let code = code(&h, &app, &practitioner(&h).await).await;
    let mut form = exchange(&app, &code);
    form.insert("client_secret".into(), secret);

    assert!(h.server.token(&form, None).await.is_ok());
}

#[tokio::test]
async fn a_confidential_client_with_a_wrong_or_no_secret_is_an_invalid_client() {
    let h = harness().await;
    let (app, _) = confidential_app(&h).await;
    let code = code(&h, &app, &practitioner(&h).await).await;
    let mut form = exchange(&app, &code);

    let basic = Some((app.clone(), "not-the-secret".to_string()));
    refused(h.server.token(&form, basic).await, 401, "invalid_client");
    // A confidential client cannot pass as a public one.
    refused(h.server.token(&form, None).await, 401, "invalid_client");
    form.insert("client_secret".into(), "not-the-secret".into());
    refused(h.server.token(&form, None).await, 401, "invalid_client");
}

// ----- ID tokens ---------------------------------------------------------------------

fn decode_id_token(h: &Harness, id_token: &str, client_id: &str) -> Value {
    let header = jsonwebtoken::decode_header(id_token).expect("a JWT header");
    assert_eq!(header.alg, Algorithm::RS256);
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_value(h.server.jwks()).expect("the server's JWKS");
    let jwk = jwks
        .find(header.kid.as_deref().expect("a kid"))
        .expect("the kid is in the JWKS");
    let key = DecodingKey::from_jwk(jwk).expect("a decoding key");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[client_id]);
    validation.set_issuer(&[FHIR_BASE]);
    // The server's clock is not the wall clock: exp is checked against it below.
    validation.validate_exp = false;
    let claims = jsonwebtoken::decode::<Value>(id_token, &key, &validation)
        .expect("the id_token verifies")
        .claims;
    assert!(claims["exp"].as_i64().expect("exp") > h.now().unix_timestamp());
    claims
}

#[tokio::test]
async fn an_id_token_names_the_fhir_user_by_absolute_url_and_echoes_the_nonce() {
    let h = harness().await;
    let app = public_app(&h).await;
    let mut params = authorize_params(&app, SCOPE);
    params.insert("nonce".into(), "n-0S6_WzA2Mj".into());
    let code = code_with(&h, &params, &practitioner(&h).await, Some(PATIENT)).await;

    let response = h
        .server
        .token(&exchange(&app, &code), None)
        .await
        .expect("tokens");

    let claims = decode_id_token(&h, text(&response, "id_token"), &app);
    assert_eq!(claims["sub"], "dana");
    assert_eq!(claims["nonce"], "n-0S6_WzA2Mj");
    assert_eq!(
        claims["fhirUser"],
        format!("{FHIR_BASE}/Practitioner/d1").as_str()
    );
}

#[tokio::test]
async fn the_access_token_is_signed_eddsa_and_an_id_token_is_not_accepted_in_its_place() {
    let h = harness().await;
    let app = public_app(&h).await;
    let response = tokens(&h, &app, &practitioner(&h).await).await;

    let access_token = text(&response, "access_token");
    let header = jsonwebtoken::decode_header(access_token).unwrap();
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert_eq!(header.kid.as_deref(), Some(h.server.access_kid().as_str()));
    let jwks = h.server.jwks();
    let listed = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == h.server.access_kid().as_str())
        .expect("the access-token key is in the JWKS");
    assert_eq!(listed["kty"], "OKP");
    assert_eq!(listed["crv"], "Ed25519");
    h.server
        .verify_access_token(access_token)
        .await
        .expect("the access token verifies");

    let id_token = text(&response, "id_token");
    assert!(matches!(
        h.server.verify_access_token(id_token).await,
        Err(TokenRejection::Invalid)
    ));
    // The same claims under an access token's header, still signed by the RSA
    // key: the kid names a key that verifies RS256 only.
    let parts: Vec<&str> = id_token.split('.').collect();
    let relabeled = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(
            json!({"alg": "EdDSA", "kid": h.server.signing_kid(), "typ": "JWT"}).to_string()
        ),
        parts[1],
        parts[2]
    );
    assert!(matches!(
        h.server.verify_access_token(&relabeled).await,
        Err(TokenRejection::Invalid)
    ));
}

#[tokio::test]
async fn an_id_token_without_the_fhir_user_scope_has_no_fhir_user_claim() {
    let h = harness().await;
    let app = public_app(&h).await;
    let params = authorize_params(&app, "openid launch/patient patient/*.rs");
    let code = code_with(&h, &params, &practitioner(&h).await, Some(PATIENT)).await;

    let response = h
        .server
        .token(&exchange(&app, &code), None)
        .await
        .expect("tokens");

    let claims = decode_id_token(&h, text(&response, "id_token"), &app);
    assert!(claims.get("fhirUser").is_none(), "{claims}");
    assert!(claims.get("nonce").is_none(), "{claims}");
}

#[tokio::test]
async fn no_id_token_is_issued_without_openid() {
    let h = harness().await;
    let app = public_app(&h).await;
    let params = authorize_params(&app, "fhirUser launch/patient patient/*.rs");
    let code = code_with(&h, &params, &practitioner(&h).await, Some(PATIENT)).await;

    let response = h
        .server
        .token(&exchange(&app, &code), None)
        .await
        .expect("tokens");

    assert!(response.get("id_token").is_none(), "{response}");
}

// ----- Introspection and revocation ------------------------------------------------------

#[tokio::test]
async fn introspection_by_a_confidential_client_describes_an_active_token() {
    let h = harness().await;
    let (app, secret) = confidential_app(&h).await;
    let code = code(&h, &app, &practitioner(&h).await).await;
    let basic = Some((app.clone(), secret));
    let mut exchange = exchange(&app, &code);
    exchange.remove("client_id");
    let response = h
        .server
        .token(&exchange, basic.clone())
        .await
        .expect("tokens");

    let body = h
        .server
        .introspect(&form(&[("token", text(&response, "access_token"))]), basic)
        .await
        .expect("introspected");

    assert_eq!(body["active"], true);
    assert_eq!(body["scope"], response["scope"]);
    assert_eq!(body["client_id"], app.as_str());
    assert_eq!(body["sub"], "dana");
    let exp = h.now().unix_timestamp() + response["expires_in"].as_i64().expect("expires_in");
    assert_eq!(body["exp"], exp);
    assert_eq!(
        body["fhirUser"],
        format!("{FHIR_BASE}/Practitioner/d1").as_str()
    );
    assert_eq!(body["patient"], PATIENT);
}

#[tokio::test]
async fn introspection_of_garbage_is_exactly_inactive() {
    let h = harness().await;
    let (app, secret) = confidential_app(&h).await;

    let body = h
        .server
        .introspect(&form(&[("token", "garbage")]), Some((app, secret)))
        .await
        .expect("answered");

    assert_eq!(body, json!({"active": false}));
}

#[tokio::test]
async fn introspection_by_a_public_client_is_an_invalid_client() {
    let h = harness().await;
    let app = public_app(&h).await;
    let response = tokens(&h, &app, &practitioner(&h).await).await;
    let form = form(&[
        ("token", text(&response, "access_token")),
        ("client_id", &app),
    ]);

    refused(
        h.server.introspect(&form, None).await,
        401,
        "invalid_client",
    );
}

#[tokio::test]
async fn a_revoked_access_token_stops_verifying_at_once() {
    let h = harness().await;
    let app = public_app(&h).await;
    let response = tokens(&h, &app, &practitioner(&h).await).await;
    let access = text(&response, "access_token");
    // Verified before: the revocation must win over what was checked then.
    let used = h
        .server
        .verify_access_token(access)
        .await
        .expect("verifies");
    assert_eq!(
        h.server.verify_access_token(access).await.as_ref(),
        Ok(&used)
    );

    h.server
        .revoke(&form(&[("token", access), ("client_id", &app)]), None)
        .await
        .expect("revoked");

    assert_eq!(
        h.server.verify_access_token(access).await,
        Err(TokenRejection::Revoked)
    );
}

#[tokio::test]
async fn revoking_a_refresh_token_ends_its_grants_access_tokens() {
    let h = harness().await;
    let app = public_app(&h).await;
    let response = tokens(&h, &app, &practitioner(&h).await).await;
    let refresh_token = text(&response, "refresh_token");
    h.server
        .verify_access_token(text(&response, "access_token"))
        .await
        .expect("verifies before the revocation");

    h.server
        .revoke(
            &form(&[("token", refresh_token), ("client_id", &app)]),
            None,
        )
        .await
        .expect("revoked");

    assert_eq!(
        h.server
            .verify_access_token(text(&response, "access_token"))
            .await,
        Err(TokenRejection::Revoked)
    );
    let result = h.server.token(&refresh(&app, refresh_token), None).await;
    refused(result, 400, "invalid_grant");
}

// ----- Lifetimes and patient context --------------------------------------------------------

#[tokio::test]
async fn access_tokens_live_at_most_an_hour_and_then_are_expired() {
    let h = harness().await;
    let app = public_app(&h).await;
    let response = tokens(&h, &app, &practitioner(&h).await).await;
    let expires_in = response["expires_in"].as_i64().expect("expires_in");
    assert!((1..=3600).contains(&expires_in), "{expires_in}");
    let access = text(&response, "access_token");
    let context = h
        .server
        .verify_access_token(access)
        .await
        .expect("verifies");
    assert_eq!(
        context.expires_at.unix_timestamp(),
        h.now().unix_timestamp() + expires_in
    );

    h.advance(expires_in + 1);

    assert_eq!(
        h.server.verify_access_token(access).await,
        Err(TokenRejection::Expired)
    );
}

#[tokio::test]
async fn a_patient_users_user_scopes_become_patient_scopes_on_their_own_record() {
    let h = harness().await;
    let app = public_app(&h).await;
    let amy = patient_user(&h).await;
    let params = authorize_params(&app, "user/*.rs");
    let code = code_with(&h, &params, &amy, None).await;

    let response = h
        .server
        .token(&exchange(&app, &code), None)
        .await
        .expect("tokens");

    assert_eq!(response["scope"], "patient/*.rs");
    assert_eq!(response["patient"], "p1");
    let access = h
        .server
        .verify_access_token(text(&response, "access_token"))
        .await
        .expect("verifies");
    assert_eq!(access.scopes.to_string(), "patient/*.rs");
    assert_eq!(access.patient.as_deref(), Some("p1"));
    assert_eq!(access.fhir_user.as_deref(), Some("Patient/p1"));
}

#[tokio::test]
async fn a_practitioner_asking_for_launch_patient_must_choose_a_patient_before_approving() {
    let h = harness().await;
    let app = public_app(&h).await;
    let pending = h
        .server
        .begin_authorization(&authorize_params(&app, "launch/patient patient/*.rs"))
        .await
        .expect("accepted");
    let pending = h
        .server
        .attach_user(pending, &practitioner(&h).await, "cookie-value")
        .await
        .expect("signed in");
    assert!(pending.needs_patient());

    refused(
        h.server.approve(&pending, &pending.scopes.clone()).await,
        400,
        "invalid_request",
    );

    let pending = h
        .server
        .choose_patient(pending, PATIENT)
        .await
        .expect("chosen");
    assert!(!pending.needs_patient());
    let url = h
        .server
        .approve(&pending, &pending.scopes.clone())
        .await
        .expect("approved once a patient is chosen");
    let code = query(&url).get("code").expect("a code").clone();
    let response = h
        .server
        .token(&exchange(&app, &code), None)
        .await
        .expect("tokens");
    assert_eq!(response["patient"], PATIENT);
}

#[tokio::test]
async fn an_online_access_refresh_token_works_only_while_the_user_stays_signed_in() {
    let h = harness().await;
    let app = public_app(&h).await;
    h.server
        .add_user(
            "dana",
            "a long enough password",
            Role::Practitioner,
            Some("Practitioner/d1".into()),
            None,
        )
        .await
        .unwrap();
    let (cookie, user) = h
        .server
        .login("dana", "a long enough password", "127.0.0.1")
        .await
        .unwrap();
    let params = authorize_params(&app, "launch/patient patient/*.rs online_access");
    let pending = h.server.begin_authorization(&params).await.unwrap();
    let pending = h.server.attach_user(pending, &user, &cookie).await.unwrap();
    let pending = h.server.choose_patient(pending, PATIENT).await.unwrap();
    let url = h
        .server
        .approve(&pending, &pending.scopes.clone())
        .await
        .unwrap();
    let code = query(&url)["code"].clone();
    let tokens = h.server.token(&exchange(&app, &code), None).await.unwrap();
    let first = tokens["refresh_token"].as_str().unwrap().to_string();

    let rotated = h.server.token(&refresh(&app, &first), None).await.unwrap();
    let second = rotated["refresh_token"].as_str().unwrap().to_string();

    h.server.logout(&cookie).await;
    refused(
        h.server.token(&refresh(&app, &second), None).await,
        400,
        "invalid_grant",
    );
}

#[tokio::test]
async fn after_a_key_rotation_new_tokens_use_the_new_key_and_old_ones_still_work() {
    use haven_auth::keys::{generate_signing_key, public_jwks, KeySet, RetiredKey};
    let h = harness().await;
    let app = public_app(&h).await;
    let user = practitioner(&h).await;
    let before = tokens(&h, &app, &user).await;
    let old_kid = h.server.signing_kid();

    let old_access_kid = h.server.access_kid();
    let retired: Vec<RetiredKey> = public_jwks(support::signing_key_pem())
        .unwrap()
        .into_iter()
        .map(|jwk| RetiredKey {
            jwk,
            retired_at: h.now(),
        })
        .collect();
    let new_pem = generate_signing_key().unwrap();
    let keys = KeySet::new(&new_pem, &retired, h.now(), time::Duration::hours(1)).unwrap();
    h.server.replace_keys(keys);

    assert_ne!(h.server.signing_kid(), old_kid);
    assert_ne!(h.server.access_kid(), old_access_kid);
    assert_eq!(h.server.jwks()["keys"].as_array().unwrap().len(), 4);
    h.server
        .verify_access_token(text(&before, "access_token"))
        .await
        .expect("a token signed before the rotation still works");
    let after = tokens(&h, &app, &user).await;
    let header = jsonwebtoken::decode_header(text(&after, "access_token")).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    assert_eq!(header.kid.as_deref(), Some(h.server.access_kid().as_str()));
}

#[tokio::test]
async fn a_token_verified_before_its_key_leaves_the_key_set_is_refused_after() {
    use haven_auth::keys::{generate_signing_key, KeySet};
    let h = harness().await;
    let app = public_app(&h).await;
    let user = practitioner(&h).await;
    let access = text(&tokens(&h, &app, &user).await, "access_token").to_owned();
    h.server
        .verify_access_token(&access)
        .await
        .expect("verifies with the key that signed it");

    // A new key, and the old one not kept as retired: no longer trusted.
    let keys = KeySet::new(
        &generate_signing_key().unwrap(),
        &[],
        h.now(),
        time::Duration::hours(1),
    )
    .unwrap();
    h.server.replace_keys(keys);

    assert_eq!(
        h.server.verify_access_token(&access).await,
        Err(TokenRejection::Invalid)
    );
    let fresh = text(&tokens(&h, &app, &user).await, "access_token").to_owned();
    h.server
        .verify_access_token(&fresh)
        .await
        .expect("a token of the new key verifies");
}

// ----- Purpose of use and clearance -----------------------------------------------------

#[tokio::test]
async fn introspection_shows_the_purpose_of_use_and_the_clearance_of_the_role_or_the_user() {
    let h = harness().await;
    let (app, secret) = confidential_app(&h).await;
    let dana = practitioner(&h).await;
    let basic = Some((app.clone(), secret));
    let introspect = |response: Value| {
        let h = &h;
        let basic = basic.clone();
        async move {
            h.server
                .introspect(&form(&[("token", text(&response, "access_token"))]), basic)
                .await
                .expect("introspected")
        }
    };
    let exchange_basic = |code: &str| {
        let mut e = exchange(&app, code);
        e.remove("client_id");
        e
    };
    // The role's clearance, and treatment when no purpose is asked for.
    let code = code(&h, &app, &dana).await;
    let response = h
        .server
        .token(&exchange_basic(&code), basic.clone())
        .await
        .unwrap();
    assert_eq!(response["purpose_of_use"], "TREAT");
    let body = introspect(response).await;
    assert_eq!(body["purpose_of_use"], "TREAT");
    assert_eq!(body["clearance"], "N");
    assert!(body.get("break_glass_reason").is_none());

    // The user's own clearance wins over the role's.
    h.server
        .set_user_policy(
            "dana",
            UserPolicy {
                clearance: Some(Clearance::parse("R:ETH,PSY").unwrap()),
                ..UserPolicy::default()
            },
        )
        .await
        .unwrap();
    let dana = h.server.user("dana").await.unwrap();
    let code = code_with(&h, &authorize_params(&app, SCOPE), &dana, Some(PATIENT)).await;
    let response = h
        .server
        .token(&exchange_basic(&code), basic.clone())
        .await
        .unwrap();
    assert_eq!(introspect(response).await["clearance"], "R:ETH,PSY");
}

#[tokio::test]
async fn a_purpose_of_use_the_client_is_not_registered_for_is_refused() {
    let h = harness().await;
    let app = public_app(&h).await;
    let mut params = authorize_params(&app, SCOPE);
    params.insert("purpose_of_use".into(), "HRESCH".into());
    assert_redirected(h.server.begin_authorization(&params).await, "invalid_scope");
    params.insert("purpose_of_use".into(), "NOT-A-PURPOSE".into());
    assert_redirected(
        h.server.begin_authorization(&params).await,
        "invalid_request",
    );
    // A client registered for research may ask for it.
    let (research, _) = h
        .server
        .add_client(ClientSpec {
            purposes: vec!["TREAT".into(), "HRESCH".into()],
            ..spec("Research portal", None)
        })
        .await
        .unwrap();
    let mut params = authorize_params(&research.client_id, SCOPE);
    params.insert("purpose_of_use".into(), "HRESCH".into());
    let code = code_with(&h, &params, &practitioner(&h).await, Some(PATIENT)).await;
    let response = h
        .server
        .token(&exchange(&research.client_id, &code), None)
        .await
        .unwrap();
    assert_eq!(response["purpose_of_use"], "HRESCH");
    let access = h
        .server
        .verify_access_token(text(&response, "access_token"))
        .await
        .unwrap();
    assert_eq!(access.purpose, "HRESCH");
}

#[tokio::test]
async fn a_break_the_glass_token_is_short_lived_never_refreshed_and_carries_its_reason() {
    let h = harness().await;
    let (app, _) = h
        .server
        .add_client(ClientSpec {
            purposes: vec!["TREAT".into(), "BTG".into()],
            ..spec("Emergency chart", None)
        })
        .await
        .unwrap();
    practitioner(&h).await;
    h.server
        .set_user_policy(
            "dana",
            UserPolicy {
                break_glass: true,
                ..UserPolicy::default()
            },
        )
        .await
        .unwrap();
    let dana = h.server.user("dana").await.unwrap();
    let mut params = authorize_params(&app.client_id, SCOPE);
    params.insert("purpose_of_use".into(), "BTG".into());
    assert_redirected(
        h.server.begin_authorization(&params).await,
        "invalid_request",
    );
    params.insert("btg_reason".into(), "cardiac arrest on arrival".into());
    let code = code_with(&h, &params, &dana, Some(PATIENT)).await;
    let response = h
        .server
        .token(&exchange(&app.client_id, &code), None)
        .await
        .unwrap();
    assert_eq!(response["purpose_of_use"], "BTG");
    assert_eq!(response["expires_in"], 15 * 60);
    assert!(response.get("refresh_token").is_none(), "{response}");
    let access = h
        .server
        .verify_access_token(text(&response, "access_token"))
        .await
        .unwrap();
    assert_eq!(
        access.break_glass_reason.as_deref(),
        Some("cardiac arrest on arrival")
    );
}
