//! SMART on FHIR through the HTTP API: discovery, the pages of a launch, the
//! token endpoint's answers, scopes enforced on every FHIR interaction, and
//! the audit record every authentication and authorization event leaves.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::Router;
use haven_api::{router, ApiConfig, AppState};
use haven_auth::keys::{generate_signing_key, KeySet};
use haven_auth::registry::{ClientAuth, Role};
use haven_auth::server::{pkce_s256, ClientSpec};
use haven_auth::{AuthConfig, AuthServer};
use haven_model::clock::{Clock, ManualClock};
use haven_store::Store;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tempfile::TempDir;
use time::macros::datetime;
use tower::ServiceExt;

const BASE: &str = "https://haven.test/fhir";
const REDIRECT: &str = "https://app.test/callback";
const VERIFIER: &str = "a-verifier-of-more-than-forty-three-characters-0123456789";
const PASSWORD: &str = "correct horse battery";

fn signing_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| generate_signing_key().unwrap())
}

fn key_set(clock: &ManualClock) -> KeySet {
    KeySet::new(signing_key(), &[], clock.now(), time::Duration::hours(1)).unwrap()
}

struct Smart {
    router: Router,
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    server: Arc<AuthServer>,
    /// A public app allowed patient, user and launch scopes.
    app: String,
    /// The cookies of the one browser the test plays.
    jar: std::sync::Mutex<Vec<(String, String)>>,
    _dir: TempDir,
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|_| panic!("not JSON: {}", self.text))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn location(&self) -> &str {
        self.header("location").expect("a Location header")
    }

    /// The value of the session cookie this reply sets.
    fn session(&self) -> String {
        let cookie = self.header("set-cookie").expect("a session cookie");
        cookie
            .split(';')
            .next()
            .and_then(|c| c.strip_prefix("haven_session="))
            .expect("the session cookie")
            .to_string()
    }
}

fn query_of(url: &str) -> HashMap<String, String> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        out.append_pair(k, v);
    }
    out.finish()
}

async fn spawn() -> Smart {
    spawn_with(|store| store).await
}

/// An app whose FHIR side and audit trail see the store through `wrap`; the
/// authorization server and the test keep the real one.
async fn spawn_with(wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>) -> Smart {
    spawn_wrapping(wrap, |store| store).await
}

/// As [`spawn_with`], and the authorization server sees the store through
/// `wrap_server`.
async fn spawn_wrapping(
    wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    wrap_server: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
) -> Smart {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(datetime!(2026-05-01 09:00 UTC)));
    let store = haven_store::connect(
        &format!("sqlite:{}", dir.path().join("haven.db").display()),
        clock.clone() as Arc<dyn Clock>,
    )
    .await
    .unwrap();
    let server = Arc::new(AuthServer::new(
        AuthConfig::new(BASE),
        wrap_server(store.clone()),
        clock.clone(),
        key_set(&clock),
    ));
    let state = AppState::new(wrap(store.clone()), clock.clone(), ApiConfig::new(BASE))
        .with_audit("haven@haven.test")
        .with_smart(server.clone());
    let (app, _) = server
        .add_client(ClientSpec {
            name: "Growth Chart".into(),
            redirect_uris: vec![REDIRECT.into()],
            scopes: "launch launch/patient openid fhirUser profile offline_access patient/*.cruds user/*.cruds".into(),
            auth: Some(ClientAuth::None),
            launch_uri: Some("https://app.test/launch".into()),
            ..ClientSpec::default()
        })
        .await
        .unwrap();
    let smart = Smart {
        router: router(state),
        store,
        clock,
        server,
        app: app.client_id,
        jar: std::sync::Mutex::new(Vec::new()),
        _dir: dir,
    };
    smart.seed().await;
    smart
}

fn observation(id: &str, patient: &str, category: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": category
        }]}],
        "code": {"text": "a measurement"},
        "subject": {"reference": format!("Patient/{patient}")}
    })
}

impl Smart {
    /// Patients a and b, each with a laboratory and a vital-signs Observation and
    /// a Condition; users amy (patient a) and drjones (practitioner).
    async fn seed(&self) {
        let mut tx = self.store.begin().await.unwrap();
        for (id, family) in [("a", "Shaw"), ("b", "Field")] {
            tx.create(
                "Patient",
                id,
                json!({"resourceType": "Patient", "id": id, "name": [{"family": family, "given": ["Pat"]}]}),
            )
            .await
            .unwrap();
            tx.create(
                "Observation",
                &format!("lab-{id}"),
                observation(&format!("lab-{id}"), id, "laboratory"),
            )
            .await
            .unwrap();
            tx.create(
                "Observation",
                &format!("vit-{id}"),
                observation(&format!("vit-{id}"), id, "vital-signs"),
            )
            .await
            .unwrap();
            tx.create(
                "Condition",
                &format!("con-{id}"),
                json!({"resourceType": "Condition", "id": format!("con-{id}"), "subject": {"reference": format!("Patient/{id}")}}),
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        self.server
            .add_user(
                "amy",
                PASSWORD,
                Role::Patient,
                Some("Patient/a".into()),
                Some("Amy Shaw".into()),
            )
            .await
            .unwrap();
        self.server
            .add_user(
                "drjones",
                PASSWORD,
                Role::Practitioner,
                Some("Practitioner/dj".into()),
                None,
            )
            .await
            .unwrap();
    }

    /// Sends a request as the browser would: with its cookies (cookies the
    /// request names itself win), keeping the cookies the answer sets.
    async fn send(&self, mut request: Request<Body>) -> Reply {
        {
            let jar = self.jar.lock().unwrap();
            let explicit: Vec<(String, String)> = request
                .headers()
                .get("cookie")
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.split(';')
                        .filter_map(|c| c.trim().split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let mut cookies = explicit.clone();
            for (name, value) in jar.iter() {
                if !explicit.iter().any(|(k, _)| k == name) {
                    cookies.push((name.clone(), value.clone()));
                }
            }
            if !cookies.is_empty() {
                let header = cookies
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                request
                    .headers_mut()
                    .insert("cookie", header.parse().unwrap());
            }
        }
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        {
            let mut jar = self.jar.lock().unwrap();
            for set in headers
                .get_all("set-cookie")
                .iter()
                .filter_map(|v| v.to_str().ok())
            {
                let Some((name, value)) = set.split(';').next().and_then(|c| c.split_once('='))
                else {
                    continue;
                };
                jar.retain(|(k, _)| k != name);
                if !set.contains("Max-Age=0") {
                    jar.push((name.to_string(), value.to_string()));
                }
            }
        }
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let mut request = Request::builder().method(Method::GET).uri(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        self.send(request.body(Body::empty()).unwrap()).await
    }

    async fn get_with_cookie(&self, path: &str, session: &str) -> Reply {
        self.send(
            Request::builder()
                .uri(path)
                .header("cookie", format!("haven_session={session}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }

    async fn post_form(&self, path: &str, body: String, session: Option<&str>) -> Reply {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("content-type", "application/x-www-form-urlencoded");
        if let Some(session) = session {
            request = request.header("cookie", format!("haven_session={session}"));
        }
        self.send(request.body(Body::from(body)).unwrap()).await
    }

    /// Signs in through the form, as a browser does: load it, then post it
    /// with its hidden fields.
    async fn login(&self, fields: &[(&str, &str)]) -> Reply {
        let request = fields
            .iter()
            .find(|(k, _)| *k == "request")
            .map(|(_, v)| *v);
        let path = match request {
            Some(id) => format!("/auth/login?request={id}"),
            None => "/auth/login".to_string(),
        };
        let page = self.get(&path, None).await;
        let csrf = page
            .text
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("the sign-in form has a CSRF field")
            .to_string();
        let mut pairs = fields.to_vec();
        pairs.push(("csrf", &csrf));
        self.post_form("/auth/login", form(&pairs), None).await
    }

    /// Forgets every cookie: another browser.
    fn new_browser(&self) {
        self.jar.lock().unwrap().clear();
    }

    async fn send_json(&self, method: Method, path: &str, token: &str, body: &Value) -> Reply {
        self.send(
            Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/fhir+json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }

    fn authorize_url(&self, scope: &str, extra: &[(&str, &str)]) -> String {
        let challenge = pkce_s256(VERIFIER);
        let mut pairs = vec![
            ("response_type", "code"),
            ("client_id", self.app.as_str()),
            ("redirect_uri", REDIRECT),
            ("scope", scope),
            ("state", "st-1"),
            ("aud", BASE),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        pairs.extend_from_slice(extra);
        format!("/auth/authorize?{}", form(&pairs))
    }

    /// A code for `username` through the authorization server's steps (the
    /// pages are covered by their own tests).
    async fn code_for(&self, username: &str, scope: &str, patient: Option<&str>) -> String {
        let params = query_of(&self.authorize_url(scope, &[]));
        let pending = self.server.begin_authorization(&params).await.unwrap();
        let user = self.server.user(username).await.unwrap();
        let mut pending = self
            .server
            .attach_user(pending, &user, "cookie")
            .await
            .unwrap();
        if let Some(patient) = patient {
            pending = self.server.choose_patient(pending, patient).await.unwrap();
        }
        let url = self
            .server
            .approve(&pending, &pending.scopes)
            .await
            .unwrap();
        query_of(&url)["code"].clone()
    }

    async fn exchange(&self, code: &str) -> Reply {
        self.post_form(
            "/auth/token",
            form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
                ("client_id", &self.app),
                ("code_verifier", VERIFIER),
            ]),
            None,
        )
        .await
    }

    async fn token(&self, username: &str, scope: &str, patient: Option<&str>) -> String {
        let code = self.code_for(username, scope, patient).await;
        let reply = self.exchange(&code).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply.json()["access_token"].as_str().unwrap().to_string()
    }

    fn ids(bundle: &Value) -> Vec<String> {
        let mut ids: Vec<String> = bundle["entry"]
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|x| x["resource"]["id"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }
}

#[tokio::test]
async fn the_smart_configuration_is_json_whatever_the_client_accepts() {
    let smart = spawn().await;
    let reply = smart
        .send(
            Request::builder()
                .uri("/fhir/.well-known/smart-configuration")
                .header("accept", "application/fhir+xml")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let config = reply.json();
    assert_eq!(
        config["authorization_endpoint"],
        "https://haven.test/auth/authorize"
    );
    assert_eq!(config["token_endpoint"], "https://haven.test/auth/token");
    assert_eq!(config["code_challenge_methods_supported"], json!(["S256"]));
    for grant in ["authorization_code", "client_credentials", "refresh_token"] {
        assert!(config["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!(grant)));
    }
    for capability in [
        "launch-standalone",
        "launch-ehr",
        "client-public",
        "client-confidential-symmetric",
        "client-confidential-asymmetric",
        "sso-openid-connect",
        "context-standalone-patient",
        "context-ehr-patient",
        "permission-offline",
        "permission-patient",
        "permission-user",
        "permission-v1",
        "permission-v2",
        "authorize-post",
    ] {
        assert!(
            config["capabilities"]
                .as_array()
                .unwrap()
                .contains(&json!(capability)),
            "{capability} is missing"
        );
    }
    assert!(!config["scopes_supported"].as_array().unwrap().is_empty());

    let openid = smart
        .get("/fhir/.well-known/openid-configuration", None)
        .await
        .json();
    assert_eq!(openid["issuer"], BASE);
    assert_eq!(
        openid["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    let jwks = smart.get("/auth/jwks", None).await.json();
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "RSA");
    assert!(
        key.get("d").is_none(),
        "no private key material is published"
    );
}

#[tokio::test]
async fn the_capability_statement_names_the_oauth_endpoints_and_needs_no_token() {
    let smart = spawn().await;
    let reply = smart.get("/fhir/metadata", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let security = &reply.json()["rest"][0]["security"];
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let uris = &security["extension"][0];
    assert_eq!(
        uris["url"],
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    );
    let token = uris["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == "token")
        .unwrap();
    assert_eq!(token["valueUri"], "https://haven.test/auth/token");
}

#[tokio::test]
async fn a_request_without_a_token_is_401_with_a_bearer_challenge() {
    let smart = spawn().await;
    for path in ["/fhir/Patient/a", "/fhir/Observation", "/fhir/_history"] {
        let reply = smart.get(path, None).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(reply
            .header("www-authenticate")
            .unwrap()
            .starts_with("Bearer"));
        assert_eq!(reply.json()["issue"][0]["code"], "login");
    }
}

#[tokio::test]
async fn tampered_expired_revoked_and_foreign_tokens_are_refused_alike() {
    let smart = spawn().await;
    let token = smart.token("amy", "patient/*.rs", None).await;
    assert_eq!(
        smart.get("/fhir/Patient/a", Some(&token)).await.status,
        StatusCode::OK
    );

    // One character of the payload changed: the signature no longer matches.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let flipped = if parts[1].ends_with('A') { 'B' } else { 'A' };
    parts[1].pop();
    parts[1].push(flipped);
    let tampered = parts.join(".");

    // Signed with this server's own key, but for another server's FHIR base.
    let other = AuthServer::new(
        AuthConfig::new("https://other.test/fhir"),
        smart.store.clone(),
        smart.clock.clone(),
        key_set(&smart.clock),
    );
    let params = query_of(&smart.authorize_url("patient/*.rs", &[]).replace(
        &form(&[("aud", BASE)]),
        &form(&[("aud", "https://other.test/fhir")]),
    ));
    let pending = other.begin_authorization(&params).await.unwrap();
    let amy = other.user("amy").await.unwrap();
    let pending = other.attach_user(pending, &amy, "c").await.unwrap();
    let code = query_of(&other.approve(&pending, &pending.scopes).await.unwrap())["code"].clone();
    let foreign = other
        .token(
            &[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", REDIRECT),
                ("client_id", smart.app.as_str()),
                ("code_verifier", VERIFIER),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            None,
        )
        .await
        .unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string();

    let revoked = smart.token("amy", "patient/*.rs", None).await;
    let reply = smart
        .post_form(
            "/auth/revoke",
            form(&[("token", &revoked), ("client_id", &smart.app)]),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);

    let mut refusals = Vec::new();
    for (what, bad) in [
        ("tampered", tampered.as_str()),
        ("foreign", foreign.as_str()),
        ("revoked", revoked.as_str()),
        ("garbage", "not-a-token"),
    ] {
        let reply = smart.get("/fhir/Patient/a", Some(bad)).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer realm=\"haven\", error=\"invalid_token\""),
            "{what}"
        );
        refusals.push(reply.json()["issue"][0]["diagnostics"].clone());
    }
    // The body does not say which check failed.
    assert!(refusals.iter().all(|r| r == &refusals[0]), "{refusals:?}");

    smart.clock.advance(time::Duration::seconds(3601));
    let reply = smart.get("/fhir/Patient/a", Some(&token)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "expired");
    assert_eq!(reply.json()["issue"][0]["diagnostics"], refusals[0]);
}

#[tokio::test]
async fn a_patient_signs_in_consents_and_gets_a_token_for_their_own_record() {
    let smart = spawn().await;
    let scope =
        "launch/patient openid fhirUser offline_access patient/Observation.rs patient/Patient.rs";
    let reply = smart
        .get(&smart.authorize_url(scope, &[("nonce", "n-1")]), None)
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    let login = reply.location().to_string();
    assert!(login.starts_with("/auth/login?request="));
    let request = query_of(&login)["request"].clone();

    let page = smart.get(&login, None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("Growth Chart"));
    assert!(page.text.contains("name=\"password\""));

    let wrong = smart
        .login(&[
            ("request", &request),
            ("username", "amy"),
            ("password", "wrong"),
        ])
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.text.contains("The username or password is wrong."));

    let signed_in = smart
        .login(&[
            ("request", &request),
            ("username", "amy"),
            ("password", PASSWORD),
        ])
        .await;
    assert_eq!(signed_in.status, StatusCode::SEE_OTHER);
    let cookie = signed_in.header("set-cookie").unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax") && cookie.contains("Secure")
    );
    let session = signed_in.session();
    let consent = signed_in.location().to_string();
    assert!(consent.starts_with("/auth/consent?request="), "{consent}");

    // Another browser cannot answer this request.
    let stranger = smart.get_with_cookie(&consent, "someone-else").await;
    assert_eq!(stranger.status, StatusCode::FORBIDDEN);

    let page = smart.get_with_cookie(&consent, &session).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.text
            .contains("Read and search your Observation records"),
        "{}",
        page.text
    );
    assert!(page.text.contains("Shaw"), "the patient is named");
    assert_eq!(page.header("x-frame-options"), Some("DENY"));

    // The user unchecks the Patient scope.
    let approved = smart
        .post_form(
            "/auth/consent",
            form(&[
                ("request", &request),
                ("scope", "launch/patient"),
                ("scope", "openid"),
                ("scope", "fhirUser"),
                ("scope", "offline_access"),
                ("scope", "patient/Observation.rs"),
                ("decision", "approve"),
            ]),
            Some(&session),
        )
        .await;
    assert_eq!(approved.status, StatusCode::SEE_OTHER);
    let back = approved.location().to_string();
    assert!(back.starts_with(REDIRECT), "{back}");
    let callback = query_of(&back);
    assert_eq!(callback["state"], "st-1");

    let reply = smart.exchange(&callback["code"]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    assert_eq!(reply.header("pragma"), Some("no-cache"));
    let token = reply.json();
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["patient"], "a");
    assert!(token["expires_in"].as_i64().unwrap() <= 3600);
    assert!(token["refresh_token"].is_string());
    let granted = token["scope"].as_str().unwrap();
    assert!(granted.contains("patient/Observation.rs"));
    assert!(
        !granted.contains("patient/Patient.rs"),
        "the unchecked scope is not granted"
    );
    let id_token = token["id_token"].as_str().unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            id_token.split('.').nth(1).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["fhirUser"], format!("{BASE}/Patient/a"));
    assert_eq!(claims["nonce"], "n-1");
    assert_eq!(claims["aud"], smart.app);

    let access = token["access_token"].as_str().unwrap();
    assert_eq!(
        smart
            .get("/fhir/Observation/lab-a", Some(access))
            .await
            .status,
        StatusCode::OK
    );
    // The Patient scope was unchecked.
    assert_eq!(
        smart.get("/fhir/Patient/a", Some(access)).await.status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn the_user_can_deny_and_the_app_learns_it_with_its_state() {
    let smart = spawn().await;
    let reply = smart
        .get(&smart.authorize_url("patient/*.rs", &[]), None)
        .await;
    let request = query_of(reply.location())["request"].clone();
    let signed_in = smart
        .login(&[
            ("request", &request),
            ("username", "amy"),
            ("password", PASSWORD),
        ])
        .await;
    let denied = smart
        .post_form(
            "/auth/consent",
            form(&[("request", &request), ("decision", "deny")]),
            Some(&signed_in.session()),
        )
        .await;
    let back = query_of(denied.location());
    assert_eq!(back["error"], "access_denied");
    assert_eq!(back["state"], "st-1");
}

#[tokio::test]
async fn a_practitioner_picks_the_patient_on_the_picker_page() {
    let smart = spawn().await;
    let reply = smart
        .get(
            &smart.authorize_url("launch/patient patient/*.rs", &[]),
            None,
        )
        .await;
    let request = query_of(reply.location())["request"].clone();
    let signed_in = smart
        .login(&[
            ("request", &request),
            ("username", "drjones"),
            ("password", PASSWORD),
        ])
        .await;
    let session = signed_in.session();
    let picker = signed_in.location().to_string();
    assert!(picker.starts_with("/auth/patient?request="), "{picker}");
    let page = smart.get_with_cookie(&picker, &session).await;
    assert!(page.text.contains("Pat Shaw") && page.text.contains("Pat Field"));
    let narrowed = smart
        .get_with_cookie(&format!("{picker}&q=Field"), &session)
        .await;
    assert!(narrowed.text.contains("Pat Field") && !narrowed.text.contains("Pat Shaw"));

    // Consent cannot be given before a patient is chosen.
    let early = smart
        .post_form(
            "/auth/consent",
            form(&[
                ("request", &request),
                ("scope", "patient/*.rs"),
                ("decision", "approve"),
            ]),
            Some(&session),
        )
        .await;
    assert_eq!(early.status, StatusCode::BAD_REQUEST);

    let missing = smart
        .post_form(
            "/auth/patient",
            form(&[("request", &request), ("patient", "nobody")]),
            Some(&session),
        )
        .await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    let chosen = smart
        .post_form(
            "/auth/patient",
            form(&[("request", &request), ("patient", "b")]),
            Some(&session),
        )
        .await;
    assert!(chosen.location().starts_with("/auth/consent"));
    let approved = smart
        .post_form(
            "/auth/consent",
            form(&[
                ("request", &request),
                ("scope", "launch/patient"),
                ("scope", "patient/*.rs"),
                ("decision", "approve"),
            ]),
            Some(&session),
        )
        .await;
    let code = query_of(approved.location())["code"].clone();
    let token = smart.exchange(&code).await.json();
    assert_eq!(token["patient"], "b");
}

#[tokio::test]
async fn the_ehr_launcher_sends_a_practitioner_to_the_app_with_a_launch_the_server_resolves() {
    let smart = spawn().await;
    assert_eq!(
        smart.get("/auth/launcher", None).await.location(),
        "/auth/login"
    );
    let signed_in = smart
        .login(&[("username", "drjones"), ("password", PASSWORD)])
        .await;
    assert_eq!(signed_in.location(), "/auth/launcher");
    let session = signed_in.session();
    let page = smart.get_with_cookie("/auth/launcher", &session).await;
    assert!(page.text.contains("Growth Chart") && page.text.contains("Pat Shaw"));

    let launched = smart
        .post_form(
            "/auth/launcher",
            form(&[("patient", "a"), ("client_id", &smart.app)]),
            Some(&session),
        )
        .await;
    assert_eq!(launched.status, StatusCode::SEE_OTHER);
    let at_app = launched.location().to_string();
    assert!(at_app.starts_with("https://app.test/launch?"), "{at_app}");
    let params = query_of(&at_app);
    assert_eq!(params["iss"], BASE);

    // The app's authorization request carries the launch; the practitioner is
    // already signed in and goes straight to consent.
    let url = smart.authorize_url(
        "launch openid fhirUser patient/*.rs",
        &[("launch", &params["launch"])],
    );
    let reply = smart.get_with_cookie(&url, &session).await;
    let consent = reply.location().to_string();
    assert!(consent.starts_with("/auth/consent?request="), "{consent}");
    let request = query_of(&consent)["request"].clone();
    let approved = smart
        .post_form(
            "/auth/consent",
            form(&[
                ("request", &request),
                ("scope", "launch"),
                ("scope", "patient/*.rs"),
                ("decision", "approve"),
            ]),
            Some(&session),
        )
        .await;
    let token = smart
        .exchange(&query_of(approved.location())["code"])
        .await
        .json();
    assert_eq!(token["patient"], "a");

    // A patient cannot use the launcher.
    let patient = smart
        .login(&[("username", "amy"), ("password", PASSWORD)])
        .await;
    let refused = smart
        .get_with_cookie("/auth/launcher", &patient.session())
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_authorization_request_from_an_unknown_client_or_redirect_gets_a_page_not_a_redirect() {
    let smart = spawn().await;
    let unknown = smart
        .get(
            &smart
                .authorize_url("patient/*.rs", &[])
                .replace(&smart.app, "nobody"),
            None,
        )
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    assert!(unknown.header("location").is_none());
    assert!(unknown.text.contains("not registered"));
    for redirect in [
        "https://app.test/callback/",
        "https://APP.test/callback",
        "https://app.test/callback?x=1",
        "https://evil.test/callback",
    ] {
        let url = smart.authorize_url("patient/*.rs", &[]).replace(
            &form(&[("redirect_uri", REDIRECT)]),
            &form(&[("redirect_uri", redirect)]),
        );
        let reply = smart.get(&url, None).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{redirect}");
        assert!(reply.header("location").is_none(), "{redirect}");
    }
}

#[tokio::test]
async fn authorization_requests_without_s256_pkce_or_for_another_server_are_sent_back_with_an_error(
) {
    let smart = spawn().await;
    let challenge = pkce_s256(VERIFIER);
    let cases = [
        (
            "no challenge",
            form(&[("code_challenge", &challenge)]),
            String::new(),
        ),
        (
            "blank challenge",
            form(&[("code_challenge", &challenge)]),
            form(&[("code_challenge", " ")]),
        ),
        (
            "plain",
            form(&[("code_challenge_method", "S256")]),
            form(&[("code_challenge_method", "plain")]),
        ),
        (
            "other audience",
            form(&[("aud", BASE)]),
            form(&[("aud", "https://other.test/fhir")]),
        ),
    ];
    for (what, from, to) in cases {
        let url = smart.authorize_url("patient/*.rs", &[]).replace(&from, &to);
        let reply = smart.get(&url, None).await;
        assert_eq!(reply.status, StatusCode::SEE_OTHER, "{what}");
        let back = query_of(reply.location());
        assert!(reply.location().starts_with(REDIRECT), "{what}");
        assert_eq!(back["error"], "invalid_request", "{what}");
        assert_eq!(back["state"], "st-1", "{what}");
    }
}

#[tokio::test]
async fn the_token_endpoint_answers_errors_as_oauth_json_and_never_caches() {
    let smart = spawn().await;
    let cases = [
        (
            form(&[("grant_type", "password"), ("client_id", &smart.app)]),
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            form(&[
                ("grant_type", "authorization_code"),
                ("client_id", "nobody"),
                ("code", "x"),
            ]),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            form(&[
                ("grant_type", "authorization_code"),
                ("client_id", &smart.app),
                ("code", "forged"),
            ]),
            StatusCode::BAD_REQUEST,
            "invalid_grant",
        ),
        (
            form(&[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", "urn:other"),
                ("client_assertion", "x.y.z"),
            ]),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            "grant_type=authorization_code&grant_type=refresh_token".to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (body, status, error) in cases {
        let reply = smart.post_form("/auth/token", body.clone(), None).await;
        assert_eq!(reply.status, status, "{body}: {}", reply.text);
        assert_eq!(reply.json()["error"], error, "{body}");
        assert_eq!(reply.header("cache-control"), Some("no-store"));
    }
    let json = smart
        .send(
            Request::builder()
                .method(Method::POST)
                .uri("/auth/token")
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(json.status, StatusCode::BAD_REQUEST);
    assert_eq!(json.json()["error"], "invalid_request");
}

#[tokio::test]
async fn a_replayed_code_is_refused_and_revokes_the_tokens_it_gave() {
    let smart = spawn().await;
    let code = smart
        .code_for("amy", "patient/*.rs offline_access", None)
        .await;
    let first = smart.exchange(&code).await.json();
    let access = first["access_token"].as_str().unwrap();
    assert_eq!(
        smart.get("/fhir/Patient/a", Some(access)).await.status,
        StatusCode::OK
    );
    let replay = smart.exchange(&code).await;
    assert_eq!(replay.status, StatusCode::BAD_REQUEST);
    assert_eq!(replay.json()["error"], "invalid_grant");
    assert_eq!(
        smart.get("/fhir/Patient/a", Some(access)).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_patient_token_sees_only_its_own_patient() {
    let smart = spawn().await;
    let token = smart.token("amy", "patient/*.rs", None).await;
    let t = Some(token.as_str());
    assert_eq!(smart.get("/fhir/Patient/a", t).await.status, StatusCode::OK);
    for path in [
        "/fhir/Patient/b",
        "/fhir/Observation/lab-b",
        "/fhir/Observation?patient=b",
        "/fhir/Observation?subject=Patient/b",
        "/fhir/Patient?_id=b",
        "/fhir/Observation/lab-b/_history/1",
        "/fhir/Observation/lab-b/_history",
    ] {
        let reply = smart.get(path, t).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            reply.text
        );
        assert_eq!(reply.json()["resourceType"], "OperationOutcome");
        assert_eq!(reply.json()["issue"][0]["code"], "forbidden");
    }
    // Searches, totals and history count only the patient's own data.
    let all = smart
        .get("/fhir/Observation?_total=accurate", t)
        .await
        .json();
    assert_eq!(Smart::ids(&all), ["lab-a", "vit-a"]);
    assert_eq!(all["total"], 2);
    let history = smart.get("/fhir/Observation/_history", t).await.json();
    assert_eq!(Smart::ids(&history), ["lab-a", "vit-a"]);
    let system = smart.get("/fhir/_history", t).await.json();
    assert_eq!(Smart::ids(&system), ["a", "con-a", "lab-a", "vit-a"]);
    let own = smart.get("/fhir/Observation?patient=a", t).await;
    assert_eq!(own.status, StatusCode::OK);
}

#[tokio::test]
async fn a_patient_users_user_scopes_are_confined_to_their_own_record() {
    let smart = spawn().await;
    let token = smart.token("amy", "user/*.rs", None).await;
    let t = Some(token.as_str());
    assert_eq!(smart.get("/fhir/Patient/a", t).await.status, StatusCode::OK);
    assert_eq!(
        smart.get("/fhir/Patient/b", t).await.status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn an_observation_scope_does_not_reach_conditions() {
    let smart = spawn().await;
    let token = smart.token("amy", "patient/Observation.rs", None).await;
    let t = Some(token.as_str());
    assert_eq!(
        smart.get("/fhir/Observation/lab-a", t).await.status,
        StatusCode::OK
    );
    for path in [
        "/fhir/Condition/con-a",
        "/fhir/Condition?patient=a",
        "/fhir/Condition/_history",
    ] {
        let reply = smart.get(path, t).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(reply.json()["issue"][0]["code"], "forbidden");
    }
}

#[tokio::test]
async fn a_read_only_scope_can_neither_put_nor_delete() {
    let smart = spawn().await;
    let token = smart.token("amy", "patient/*.rs", None).await;
    let changed = observation("lab-a", "a", "laboratory");
    let put = smart
        .send_json(Method::PUT, "/fhir/Observation/lab-a", &token, &changed)
        .await;
    assert_eq!(put.status, StatusCode::FORBIDDEN);
    let delete = smart
        .send(
            Request::builder()
                .method(Method::DELETE)
                .uri("/fhir/Observation/lab-a")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(delete.status, StatusCode::FORBIDDEN);
    let current = smart
        .store
        .read("Observation", "lab-a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(current.version, 1, "nothing was written");
}

#[tokio::test]
async fn a_write_scope_cannot_write_into_another_patients_record() {
    let smart = spawn().await;
    let token = smart.token("amy", "patient/Observation.cruds", None).await;
    let own = smart
        .send_json(
            Method::POST,
            "/fhir/Observation",
            &token,
            &observation("x", "a", "laboratory"),
        )
        .await;
    assert_eq!(own.status, StatusCode::CREATED, "{}", own.text);
    let theirs = smart
        .send_json(
            Method::POST,
            "/fhir/Observation",
            &token,
            &observation("x", "b", "laboratory"),
        )
        .await;
    assert_eq!(theirs.status, StatusCode::FORBIDDEN);
    // Moving an own Observation to another patient is refused too.
    let moved = smart
        .send_json(
            Method::PUT,
            "/fhir/Observation/lab-a",
            &token,
            &observation("lab-a", "b", "laboratory"),
        )
        .await;
    assert_eq!(moved.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_laboratory_scope_reads_laboratory_results_only() {
    let smart = spawn().await;
    let token = smart
        .token("amy", "patient/Observation.rs?category=laboratory", None)
        .await;
    let t = Some(token.as_str());
    assert_eq!(
        smart.get("/fhir/Observation/lab-a", t).await.status,
        StatusCode::OK
    );
    assert_eq!(
        smart.get("/fhir/Observation/vit-a", t).await.status,
        StatusCode::FORBIDDEN
    );
    let found = smart
        .get("/fhir/Observation?_total=accurate", t)
        .await
        .json();
    assert_eq!(Smart::ids(&found), ["lab-a"]);
    assert_eq!(found["total"], 1);
}

#[tokio::test]
async fn a_transaction_with_one_entry_outside_the_scopes_commits_nothing() {
    let smart = spawn().await;
    let token = smart.token("amy", "patient/Observation.cruds", None).await;
    for outside in [
        json!({"resourceType": "Condition", "subject": {"reference": "Patient/a"}}),
        observation("z", "b", "laboratory"),
    ] {
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": observation("y", "a", "laboratory"), "request": {"method": "POST", "url": "Observation"}},
                {"resource": outside.clone(), "request": {"method": "POST", "url": outside["resourceType"].as_str().unwrap()}}
            ]
        });
        let reply = smart
            .send_json(Method::POST, "/fhir", &token, &bundle)
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text);
        let counts = smart.store.count_by_type().await.unwrap();
        let observations = counts.iter().find(|(t, _)| t == "Observation").unwrap().1;
        assert_eq!(observations, 4, "nothing was committed");
    }
}

#[tokio::test]
async fn a_batch_answers_each_entry_by_its_own_scope() {
    let smart = spawn().await;
    let token = smart.token("amy", "patient/Observation.rs", None).await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "Observation/lab-a"}},
            {"request": {"method": "GET", "url": "Condition/con-a"}},
            {"request": {"method": "GET", "url": "Observation/lab-b"}}
        ]
    });
    let reply = smart
        .send_json(Method::POST, "/fhir", &token, &bundle)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let statuses: Vec<_> = reply.json()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap().to_string())
        .collect();
    assert!(statuses[0].starts_with("200"), "{statuses:?}");
    assert!(statuses[1].starts_with("403"), "{statuses:?}");
    assert!(statuses[2].starts_with("403"), "{statuses:?}");
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_revokes_the_family() {
    let smart = spawn().await;
    let first = smart
        .exchange(
            &smart
                .code_for("amy", "patient/*.rs offline_access", None)
                .await,
        )
        .await
        .json();
    let refresh = |token: &str, scope: Option<&str>| {
        let mut pairs = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", token),
            ("client_id", smart.app.as_str()),
        ];
        if let Some(scope) = scope {
            pairs.push(("scope", scope));
        }
        form(&pairs)
    };
    let old = first["refresh_token"].as_str().unwrap();
    let wider = smart
        .post_form("/auth/token", refresh(old, Some("patient/*.cruds")), None)
        .await;
    assert_eq!(wider.status, StatusCode::BAD_REQUEST);
    assert_eq!(wider.json()["error"], "invalid_scope");

    let second = smart
        .post_form(
            "/auth/token",
            refresh(old, Some("patient/Observation.rs")),
            None,
        )
        .await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text);
    let second = second.json();
    assert_eq!(second["scope"], "patient/Observation.rs");
    let newer = second["refresh_token"].as_str().unwrap();
    assert_ne!(newer, old);
    let access = second["access_token"].as_str().unwrap();
    assert_eq!(
        smart
            .get("/fhir/Observation/lab-a", Some(access))
            .await
            .status,
        StatusCode::OK
    );

    let reused = smart
        .post_form("/auth/token", refresh(old, None), None)
        .await;
    assert_eq!(reused.status, StatusCode::BAD_REQUEST);
    assert_eq!(reused.json()["error"], "invalid_grant");
    // The whole family is gone: the newest refresh token and its access token.
    let after = smart
        .post_form("/auth/token", refresh(newer, None), None)
        .await;
    assert_eq!(after.json()["error"], "invalid_grant");
    assert_eq!(
        smart
            .get("/fhir/Observation/lab-a", Some(access))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn repeated_wrong_passwords_lock_the_sign_in_for_a_while() {
    let smart = spawn().await;
    for _ in 0..5 {
        let reply = smart
            .login(&[("username", "amy"), ("password", "guess")])
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let locked = smart
        .login(&[("username", "amy"), ("password", PASSWORD)])
        .await;
    assert_eq!(locked.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(locked.header("retry-after").is_some());
    smart.clock.advance(time::Duration::minutes(1));
    let later = smart
        .login(&[("username", "amy"), ("password", PASSWORD)])
        .await;
    assert_eq!(later.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn dynamic_registration_needs_an_initial_access_token_used_once() {
    let smart = spawn().await;
    let metadata = json!({
        "client_name": "Registered App",
        "redirect_uris": ["https://registered.test/cb"],
        "token_endpoint_auth_method": "client_secret_basic",
        "scope": "patient/*.rs openid"
    });
    let post = |token: Option<String>| {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("/auth/register")
            .header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        request.body(Body::from(metadata.to_string())).unwrap()
    };
    let anonymous = smart.send(post(None)).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.json()["error"], "invalid_token");
    let initial = smart
        .server
        .issue_registration_token(time::Duration::hours(1))
        .await
        .unwrap();
    let created = smart.send(post(Some(initial.clone()))).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let client = created.json();
    assert!(client["client_id"].is_string());
    assert!(client["client_secret"].is_string());
    assert_eq!(client["token_endpoint_auth_method"], "client_secret_basic");
    let again = smart.send(post(Some(initial))).await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn introspection_tells_an_authenticated_client_what_a_token_allows() {
    let smart = spawn().await;
    let (resource_server, secret) = smart
        .server
        .add_client(ClientSpec {
            name: "Resource server".into(),
            redirect_uris: vec!["https://rs.test/cb".into()],
            scopes: "openid".into(),
            auth: Some(ClientAuth::ClientSecretBasic),
            resource_server: true,
            ..ClientSpec::default()
        })
        .await
        .unwrap();
    let secret = secret.unwrap();
    let (other_app, other_secret) = smart
        .server
        .add_client(ClientSpec {
            name: "Another app".into(),
            redirect_uris: vec!["https://other.test/cb".into()],
            scopes: "openid".into(),
            auth: Some(ClientAuth::ClientSecretBasic),
            ..ClientSpec::default()
        })
        .await
        .unwrap();
    let token = smart
        .token("amy", "patient/*.rs fhirUser openid", None)
        .await;
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{}:{secret}", resource_server.client_id),
    );
    let introspect = |token: &str, auth: Option<&str>| {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("/auth/introspect")
            .header("content-type", "application/x-www-form-urlencoded");
        if let Some(auth) = auth {
            request = request.header("authorization", format!("Basic {auth}"));
        }
        request.body(Body::from(form(&[("token", token)]))).unwrap()
    };
    let active = smart.send(introspect(&token, Some(&basic))).await.json();
    assert_eq!(active["active"], true);
    assert_eq!(active["patient"], "a");
    assert_eq!(active["client_id"], smart.app);
    assert_eq!(active["sub"], "amy");
    assert_eq!(active["fhirUser"], format!("{BASE}/Patient/a"));
    assert!(active["exp"].is_i64());
    assert!(active["scope"].as_str().unwrap().contains("patient/*.rs"));
    let inactive = smart.send(introspect("garbage", Some(&basic))).await.json();
    assert_eq!(inactive, json!({"active": false}));
    // Another app learns nothing about tokens that are not its own.
    let other = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{}:{}", other_app.client_id, other_secret.unwrap()),
    );
    let foreign = smart.send(introspect(&token, Some(&other))).await.json();
    assert_eq!(foreign, json!({"active": false}));
    let anonymous = smart.send(introspect(&token, None)).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.json()["error"], "invalid_client");
}

#[tokio::test]
async fn browser_apps_on_other_origins_may_call_the_api_with_a_bearer_token() {
    let smart = spawn().await;
    let preflight = smart
        .send(
            Request::builder()
                .method(Method::OPTIONS)
                .uri("/fhir/Observation")
                .header("origin", "https://app.test")
                .header("access-control-request-method", "GET")
                .header("access-control-request-headers", "authorization")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert!(preflight.status.is_success());
    assert_eq!(preflight.header("access-control-allow-origin"), Some("*"));
    assert!(preflight
        .header("access-control-allow-headers")
        .unwrap()
        .contains("authorization"));
    assert!(preflight
        .header("access-control-allow-credentials")
        .is_none());
}

#[tokio::test]
async fn a_sign_in_posted_without_the_forms_token_is_refused() {
    let smart = spawn().await;
    let forged = smart
        .post_form(
            "/auth/login",
            form(&[("username", "amy"), ("password", PASSWORD)]),
            None,
        )
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert!(forged.header("set-cookie").is_none(), "no session is made");
}

#[tokio::test]
async fn another_browser_that_learns_the_request_id_cannot_sign_in_to_it() {
    let smart = spawn().await;
    let reply = smart
        .get(&smart.authorize_url("patient/*.rs", &[]), None)
        .await;
    let request = query_of(reply.location())["request"].clone();
    smart.new_browser();
    let stolen = smart
        .login(&[
            ("request", &request),
            ("username", "amy"),
            ("password", PASSWORD),
        ])
        .await;
    assert_eq!(stolen.status, StatusCode::FORBIDDEN);
    assert!(stolen.text.contains("another browser"));
}

#[tokio::test]
async fn signing_out_ends_the_session() {
    let smart = spawn().await;
    let signed_in = smart
        .login(&[("username", "drjones"), ("password", PASSWORD)])
        .await;
    assert_eq!(signed_in.location(), "/auth/launcher");
    assert_eq!(
        smart.get("/auth/launcher", None).await.status,
        StatusCode::OK
    );
    let out = smart.post_form("/auth/logout", String::new(), None).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert_eq!(
        smart.get("/auth/launcher", None).await.location(),
        "/auth/login"
    );
}

#[tokio::test]
async fn a_patient_write_that_names_another_patient_anywhere_is_refused() {
    let smart = spawn().await;
    let token = smart.token("amy", "patient/Observation.cruds", None).await;
    let mut sneaky = observation("s", "b", "laboratory");
    sneaky["performer"] = json!([{"reference": "Patient/a"}]);
    let reply = smart
        .send_json(Method::POST, "/fhir/Observation", &token, &sneaky)
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text);
    // Reading such a resource is fine: it is in the patient's compartment.
    let mut tx = smart.store.begin().await.unwrap();
    tx.create("Observation", "shared", {
        let mut o = sneaky.clone();
        o["id"] = json!("shared");
        o
    })
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        smart
            .get("/fhir/Observation/shared", Some(&token))
            .await
            .status,
        StatusCode::OK
    );
    let delete = smart
        .send(
            Request::builder()
                .method(Method::DELETE)
                .uri("/fhir/Observation/shared")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(delete.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_transaction_read_needs_read_access_even_where_writes_are_allowed() {
    let smart = spawn().await;
    let token = smart
        .token(
            "amy",
            "patient/Observation.rs?category=laboratory patient/Observation.u",
            None,
        )
        .await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "GET", "url": "Observation/vit-a"}}]
    });
    let reply = smart
        .send_json(Method::POST, "/fhir", &token, &bundle)
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text);
}

#[tokio::test]
async fn refusals_do_not_say_which_check_failed() {
    let smart = spawn().await;
    let token = smart.token("amy", "patient/Observation.rs", None).await;
    let t = Some(token.as_str());
    let mut seen = Vec::new();
    for path in [
        "/fhir/Condition/con-a",
        "/fhir/Observation/lab-b",
        "/fhir/Observation?patient=b",
    ] {
        let reply = smart.get(path, t).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
        seen.push(reply.json()["issue"][0]["diagnostics"].clone());
    }
    assert!(seen.iter().all(|d| d == &seen[0]), "{seen:?}");
}

#[tokio::test]
async fn a_caller_flooding_the_token_endpoint_is_told_to_wait() {
    let smart = spawn().await;
    let body = form(&[("grant_type", "password"), ("client_id", &smart.app)]);
    for _ in 0..120 {
        let reply = smart.post_form("/auth/token", body.clone(), None).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    }
    let flooded = smart.post_form("/auth/token", body, None).await;
    assert_eq!(flooded.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(flooded.json()["error"], "temporarily_unavailable");
    assert!(flooded.header("retry-after").is_some());
}

// ----- The audit trail of authentication events ------------------------------

/// One recorded authentication event, as a reader of the trail sees it.
struct AuthEvent(Value);

impl AuthEvent {
    fn outcome(&self) -> &str {
        self.0["outcome"].as_str().unwrap_or_default()
    }

    fn reason(&self) -> &str {
        self.0["outcomeDesc"].as_str().unwrap_or_default()
    }

    /// The `who.identifier.value` of every agent: user, client, server.
    fn agents(&self) -> Vec<&str> {
        self.0["agent"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["who"]["identifier"]["value"].as_str())
            .collect()
    }

    /// The value of the entity detail of this type (`scope`, `token-sha256`).
    fn detail(&self, kind: &str) -> Option<&str> {
        self.0["entity"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|e| e["detail"].as_array().into_iter().flatten())
            .find(|d| d["type"] == kind)
            .and_then(|d| d["valueString"].as_str())
    }

    /// The request id the event carries.
    fn request_id(&self) -> &str {
        self.0["entity"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["type"]["code"] == "XrequestId")
            .and_then(|e| e["what"]["identifier"]["value"].as_str())
            .unwrap_or_default()
    }
}

impl Smart {
    /// Every stored audit record, in the order written.
    async fn audit_trail(&self) -> Vec<Value> {
        self.store
            .audit_log()
            .chain(0, 10_000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.event)
            .collect()
    }

    /// The recorded authentication events of one kind (Haven's subtype code,
    /// e.g. `login`, `token`), oldest first.
    async fn auth_events(&self, kind: &str) -> Vec<AuthEvent> {
        self.audit_trail()
            .await
            .into_iter()
            .filter(|e| {
                e["subtype"].as_array().is_some_and(|codes| {
                    codes
                        .iter()
                        .any(|c| c["system"] == haven_audit::AUTH_EVENT_SYSTEM && c["code"] == kind)
                })
            })
            .map(AuthEvent)
            .collect()
    }

    /// The whole trail as text, to look for what must never be in it.
    async fn audit_text(&self) -> String {
        serde_json::to_string(&self.audit_trail().await).unwrap()
    }

    /// Introspects `token` as a resource server, which may see any token.
    async fn introspect_as_resource_server(&self, token: &str) -> Reply {
        let (client, secret) = self
            .server
            .add_client(ClientSpec {
                name: "Resource server".into(),
                redirect_uris: vec!["https://rs.test/cb".into()],
                scopes: "openid".into(),
                auth: Some(ClientAuth::ClientSecretBasic),
                resource_server: true,
                ..ClientSpec::default()
            })
            .await
            .unwrap();
        let basic = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{}:{}", client.client_id, secret.unwrap()),
        );
        self.send(
            Request::builder()
                .method(Method::POST)
                .uri("/auth/introspect")
                .header("content-type", "application/x-www-form-urlencoded")
                .header("authorization", format!("Basic {basic}"))
                .body(Body::from(form(&[("token", token)])))
                .unwrap(),
        )
        .await
    }
}

#[tokio::test]
async fn a_failed_sign_in_is_recorded_with_the_username_and_never_the_password() {
    let smart = spawn().await;
    let guess = "not-the-password-4711";
    let wrong = smart
        .login(&[("username", "amy"), ("password", guess)])
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);

    let events = smart.auth_events("login").await;
    assert_eq!(events.len(), 1);
    let failed = &events[0];
    assert_eq!(failed.outcome(), "8");
    assert_eq!(failed.reason(), "wrong username or password");
    assert!(failed.agents().contains(&"amy"), "{:?}", failed.agents());
    // The answer's request id finds the record.
    assert_eq!(Some(failed.request_id()), wrong.header("x-request-id"));

    let signed_in = smart
        .login(&[("username", "drjones"), ("password", PASSWORD)])
        .await;
    assert_eq!(signed_in.status, StatusCode::SEE_OTHER);
    let events = smart.auth_events("login").await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].outcome(), "0");
    assert!(events[1].agents().contains(&"drjones"));
    assert_eq!(
        events[1].0["agent"][0]["who"]["reference"],
        "Practitioner/dj"
    );

    let trail = smart.audit_text().await;
    assert!(!trail.contains(guess), "a typed password is in the trail");
    assert!(!trail.contains(PASSWORD), "a password is in the trail");
}

#[tokio::test]
async fn a_token_exchange_is_recorded_with_the_tokens_fingerprint_and_never_the_token() {
    let smart = spawn().await;
    let code = smart
        .code_for("amy", "patient/*.rs offline_access", None)
        .await;
    let reply = smart.exchange(&code).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let body = reply.json();
    let access = body["access_token"].as_str().unwrap();
    let refresh = body["refresh_token"].as_str().unwrap();

    let events = smart.auth_events("token").await;
    assert_eq!(events.len(), 1);
    let issued = &events[0];
    assert_eq!(issued.outcome(), "0");
    assert_eq!(
        issued.detail("token-sha256"),
        Some(haven_audit::token_fingerprint(access).as_str())
    );
    assert_eq!(issued.detail("scope"), body["scope"].as_str());
    let agents = issued.agents();
    assert!(
        agents.contains(&"amy") && agents.contains(&smart.app.as_str()),
        "{agents:?}"
    );
    assert_eq!(Some(issued.request_id()), reply.header("x-request-id"));

    let trail = smart.audit_text().await;
    for secret in [access, refresh, code.as_str()] {
        assert!(!trail.contains(secret), "a token or code is in the trail");
    }
}

#[tokio::test]
async fn a_refused_token_request_is_recorded_with_the_oauth_error() {
    let smart = spawn().await;
    let forged = smart
        .post_form(
            "/auth/token",
            form(&[
                ("grant_type", "authorization_code"),
                ("client_id", &smart.app),
                ("code", "forged"),
                ("redirect_uri", REDIRECT),
                ("code_verifier", VERIFIER),
            ]),
            None,
        )
        .await;
    assert_eq!(forged.json()["error"], "invalid_grant");
    let stranger = smart
        .post_form(
            "/auth/token",
            form(&[
                ("grant_type", "authorization_code"),
                ("client_id", "nobody"),
                ("code", "x"),
            ]),
            None,
        )
        .await;
    assert_eq!(stranger.json()["error"], "invalid_client");

    let events = smart.auth_events("token").await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].outcome(), "4", "a bad code is a bad request");
    assert!(
        events[0].reason().starts_with("invalid_grant: "),
        "{}",
        events[0].reason()
    );
    assert!(events[0].agents().contains(&smart.app.as_str()));
    assert_eq!(
        events[0].detail("token-sha256"),
        None,
        "no token was issued"
    );
    assert_eq!(events[1].outcome(), "8", "an unknown client is refused");
    assert!(
        events[1].reason().starts_with("invalid_client: "),
        "{}",
        events[1].reason()
    );
    assert!(events[1].agents().contains(&"nobody"));
}

#[tokio::test]
async fn a_refresh_is_recorded_as_a_refresh_with_the_new_tokens_fingerprint() {
    let smart = spawn().await;
    let first = smart
        .exchange(
            &smart
                .code_for("amy", "patient/*.rs offline_access", None)
                .await,
        )
        .await
        .json();
    let refreshed = smart
        .post_form(
            "/auth/token",
            form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", first["refresh_token"].as_str().unwrap()),
                ("client_id", &smart.app),
            ]),
            None,
        )
        .await;
    assert_eq!(refreshed.status, StatusCode::OK, "{}", refreshed.text);
    let access = refreshed.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();

    let events = smart.auth_events("refresh").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].outcome(), "0");
    assert_eq!(
        events[0].detail("token-sha256"),
        Some(haven_audit::token_fingerprint(&access).as_str())
    );
    assert_eq!(
        smart.auth_events("token").await.len(),
        1,
        "only the exchange"
    );
}

#[tokio::test]
async fn introspection_and_revocation_are_recorded_with_the_fingerprint_of_the_token_asked_about() {
    let smart = spawn().await;
    let token = smart.token("amy", "patient/*.rs", None).await;
    let fingerprint = haven_audit::token_fingerprint(&token);

    let active = smart.introspect_as_resource_server(&token).await;
    assert_eq!(active.json()["active"], true);
    let revoked = smart
        .post_form(
            "/auth/revoke",
            form(&[("token", &token), ("client_id", &smart.app)]),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK);
    let inactive = smart.introspect_as_resource_server(&token).await;
    assert_eq!(inactive.json()["active"], false);

    let introspections = smart.auth_events("introspection").await;
    assert_eq!(introspections.len(), 2);
    assert_eq!(introspections[0].outcome(), "0");
    assert_eq!(introspections[0].reason(), "the token is active");
    assert_eq!(introspections[1].reason(), "the token is not active");
    assert_eq!(
        introspections[0].detail("token-sha256"),
        Some(fingerprint.as_str())
    );
    let revocations = smart.auth_events("revocation").await;
    assert_eq!(revocations.len(), 1);
    assert_eq!(revocations[0].outcome(), "0");
    assert_eq!(
        revocations[0].detail("token-sha256"),
        Some(fingerprint.as_str())
    );
    assert!(revocations[0].agents().contains(&smart.app.as_str()));
    assert!(!smart.audit_text().await.contains(&token));
}

#[tokio::test]
async fn consent_and_refusal_are_recorded_as_authorization_decisions() {
    let smart = spawn().await;
    let reply = smart
        .get(
            &smart.authorize_url("patient/Observation.rs patient/Patient.rs", &[]),
            None,
        )
        .await;
    let request = query_of(reply.location())["request"].clone();
    let signed_in = smart
        .login(&[
            ("request", &request),
            ("username", "amy"),
            ("password", PASSWORD),
        ])
        .await;
    let approved = smart
        .post_form(
            "/auth/consent",
            form(&[
                ("request", &request),
                ("scope", "patient/Observation.rs"),
                ("decision", "approve"),
            ]),
            Some(&signed_in.session()),
        )
        .await;
    assert!(approved.location().starts_with(REDIRECT));

    let reply = smart
        .get(&smart.authorize_url("patient/*.rs", &[]), None)
        .await;
    let request = query_of(reply.location())["request"].clone();
    let denied = smart
        .post_form(
            "/auth/consent",
            form(&[("request", &request), ("decision", "deny")]),
            Some(&signed_in.session()),
        )
        .await;
    assert_eq!(query_of(denied.location())["error"], "access_denied");

    let events = smart.auth_events("authorize").await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].outcome(), "0");
    assert_eq!(events[0].detail("scope"), Some("patient/Observation.rs"));
    assert!(events[0].agents().contains(&"amy"));
    assert!(events[0].agents().contains(&smart.app.as_str()));
    assert_eq!(events[1].outcome(), "8");
    assert!(
        events[1].reason().starts_with("access_denied: "),
        "{}",
        events[1].reason()
    );
}

#[tokio::test]
async fn signing_out_and_registering_a_client_are_recorded() {
    let smart = spawn().await;
    smart
        .login(&[("username", "drjones"), ("password", PASSWORD)])
        .await;
    let out = smart.post_form("/auth/logout", String::new(), None).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    let logins = smart.auth_events("login").await;
    assert_eq!(logins.len(), 2);
    assert_eq!(logins[1].reason(), "logout");
    assert!(logins[1].agents().contains(&"drjones"));

    let initial = smart
        .server
        .issue_registration_token(time::Duration::hours(1))
        .await
        .unwrap();
    let created = smart
        .send(
            Request::builder()
                .method(Method::POST)
                .uri("/auth/register")
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {initial}"))
                .body(Body::from(
                    json!({
                        "client_name": "Registered App",
                        "redirect_uris": ["https://registered.test/cb"],
                        "scope": "patient/*.rs"
                    })
                    .to_string(),
                ))
                .unwrap(),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let client_id = created.json()["client_id"].as_str().unwrap().to_owned();
    let registrations = smart.auth_events("client-registration").await;
    assert_eq!(registrations.len(), 1);
    assert_eq!(registrations[0].outcome(), "0");
    assert!(registrations[0].agents().contains(&client_id.as_str()));
    assert!(!smart.audit_text().await.contains(&initial));
}

/// A store with a fault: an audit trail that refuses every append, as a full
/// disk would, client assertion records whose insert runs but whose commit
/// fails, or token revocations that cannot be read.
#[derive(Debug)]
struct FaultyStore {
    inner: Arc<dyn Store>,
    fault: Fault,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    AuditRefused,
    StagedCommitFails,
    RevocationsUnreadable,
}

impl FaultyStore {
    fn with(fault: Fault) -> impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store> {
        move |inner| Arc::new(FaultyStore { inner, fault })
    }
}

#[async_trait::async_trait]
impl haven_store::AuthRecords for FaultyStore {
    async fn insert(
        &self,
        kind: &str,
        key: &str,
        value: &Value,
        expires_at: Option<time::OffsetDateTime>,
    ) -> haven_store::Result<bool> {
        self.inner
            .auth_records()
            .insert(kind, key, value, expires_at)
            .await
    }

    async fn insert_staged(
        &self,
        kind: &str,
        key: &str,
        value: &Value,
        expires_at: Option<time::OffsetDateTime>,
    ) -> haven_store::Result<haven_store::StagedInsert> {
        let staged = self
            .inner
            .auth_records()
            .insert_staged(kind, key, value, expires_at)
            .await?;
        if self.fault != Fault::StagedCommitFails {
            return Ok(staged);
        }
        Ok(haven_store::StagedInsert::new(staged.inserted, async {
            Err(haven_store::StoreError::Unavailable(
                "the disk failed".into(),
            ))
        }))
    }

    async fn put(
        &self,
        kind: &str,
        key: &str,
        value: &Value,
        expires_at: Option<time::OffsetDateTime>,
    ) -> haven_store::Result<()> {
        self.inner
            .auth_records()
            .put(kind, key, value, expires_at)
            .await
    }

    async fn get(&self, kind: &str, key: &str) -> haven_store::Result<Option<Value>> {
        if self.fault == Fault::RevocationsUnreadable && kind == "revoked" {
            return Err(haven_store::StoreError::Unavailable(
                "the disk failed".into(),
            ));
        }
        self.inner.auth_records().get(kind, key).await
    }

    async fn replace(
        &self,
        kind: &str,
        key: &str,
        expected: &Value,
        value: &Value,
    ) -> haven_store::Result<bool> {
        self.inner
            .auth_records()
            .replace(kind, key, expected, value)
            .await
    }

    async fn delete(&self, kind: &str, key: &str) -> haven_store::Result<bool> {
        self.inner.auth_records().delete(kind, key).await
    }

    async fn list(&self, kind: &str) -> haven_store::Result<Vec<(String, Value)>> {
        self.inner.auth_records().list(kind).await
    }
}

struct RefusingLog;

#[async_trait::async_trait]
impl haven_store::AuditLog for RefusingLog {
    fn stamp(&self, events: Vec<Value>) -> haven_store::Result<Vec<haven_store::StampedEvent>> {
        haven_store::StampedEvent::stamp_all(events, time::OffsetDateTime::now_utc())
    }

    async fn append(&self, _: Vec<haven_store::StampedEvent>) -> haven_store::Result<()> {
        Err(haven_store::StoreError::Unavailable(
            "the disk is full".into(),
        ))
    }

    async fn read(&self, _: &str) -> haven_store::Result<Option<haven_store::AuditRecord>> {
        Ok(None)
    }

    async fn search(
        &self,
        _: &haven_store::AuditQuery,
    ) -> haven_store::Result<haven_store::AuditPage> {
        Ok(haven_store::AuditPage {
            records: Vec::new(),
            total: None,
            more: false,
        })
    }

    async fn chain(&self, _: u64, _: u32) -> haven_store::Result<Vec<haven_store::AuditRecord>> {
        Ok(Vec::new())
    }
}

#[async_trait::async_trait]
impl Store for FaultyStore {
    fn backend(&self) -> haven_store::Backend {
        self.inner.backend()
    }

    async fn begin(&self) -> haven_store::Result<Box<dyn haven_store::StoreTx>> {
        self.inner.begin().await
    }

    async fn read(
        &self,
        resource_type: &str,
        id: &str,
    ) -> haven_store::Result<Option<haven_store::ResourceVersion>> {
        self.inner.read(resource_type, id).await
    }

    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> haven_store::Result<Option<haven_store::ResourceVersion>> {
        self.inner.vread(resource_type, id, version).await
    }

    async fn search(
        &self,
        query: &haven_store::SearchQuery,
    ) -> haven_store::Result<haven_store::SearchPage> {
        self.inner.search(query).await
    }

    async fn history(
        &self,
        query: &haven_store::HistoryQuery,
    ) -> haven_store::Result<haven_store::HistoryPage> {
        self.inner.history(query).await
    }

    async fn count_by_type(&self) -> haven_store::Result<Vec<(String, u64)>> {
        self.inner.count_by_type().await
    }

    fn auth_records(&self) -> &dyn haven_store::AuthRecords {
        match self.fault {
            Fault::StagedCommitFails | Fault::RevocationsUnreadable => self,
            Fault::AuditRefused => self.inner.auth_records(),
        }
    }

    fn audit_log(&self) -> &dyn haven_store::AuditLog {
        match self.fault {
            Fault::AuditRefused => &RefusingLog,
            Fault::StagedCommitFails | Fault::RevocationsUnreadable => self.inner.audit_log(),
        }
    }
}

#[tokio::test]
async fn when_the_audit_trail_cannot_be_written_no_token_or_session_is_handed_out() {
    let smart = spawn_with(FaultyStore::with(Fault::AuditRefused)).await;
    let code = smart.code_for("amy", "patient/*.rs", None).await;
    let reply = smart.exchange(&code).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    let body = reply.json();
    assert_eq!(body["error"], "server_error");
    assert!(body.get("access_token").is_none(), "{body}");
    assert_eq!(reply.header("cache-control"), Some("no-store"));

    let signed_in = smart
        .login(&[("username", "drjones"), ("password", PASSWORD)])
        .await;
    assert_eq!(signed_in.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(signed_in.text.contains("Try again later"));
    assert!(
        signed_in
            .headers
            .get_all("set-cookie")
            .iter()
            .all(|c| !c.to_str().unwrap().starts_with("haven_session=")),
        "no session cookie is set"
    );
}

#[tokio::test]
async fn when_token_revocations_cannot_be_read_a_request_is_503_and_nothing_is_read() {
    let smart = spawn_wrapping(
        |store| store,
        FaultyStore::with(Fault::RevocationsUnreadable),
    )
    .await;
    let token = smart.token("amy", "patient/*.rs", None).await;
    let before = smart.audit_trail().await.len();
    let reply = smart.get("/fhir/Patient/a", Some(&token)).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text
    );
    let outcome = reply.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(!reply.text.contains("\"family\""), "{}", reply.text);
    // The refusal is recorded like any other request.
    let trail = smart.audit_trail().await;
    assert_eq!(trail.len(), before + 1);
    let event = &trail[before];
    assert_eq!(event["outcome"], "12", "{event}");
    assert_eq!(event["subtype"][0]["code"], "read");
    assert_eq!(event["entity"][0]["what"]["reference"], "Patient/a");
}

/// A Backend Services client with an ES384 key, registered for `system/*.rs`.
async fn backend_client(smart: &Smart) -> (String, haven_auth::client::ClientKey) {
    let key = haven_auth::client::ClientKey::generate_ec_p384();
    let (client, _) = smart
        .server
        .add_client(ClientSpec {
            name: "Nightly export".into(),
            scopes: "system/*.rs".into(),
            jwks: Some(key.jwks()),
            backend: true,
            organization: Some("Example Lab".into()),
            contacts: vec!["mailto:ops@lab.example".into()],
            ..ClientSpec::default()
        })
        .await
        .unwrap();
    (client.client_id, key)
}

/// A `client_credentials` request with an assertion whose `jti` is `jti`.
fn client_credentials(
    smart: &Smart,
    client_id: &str,
    key: &haven_auth::client::ClientKey,
    jti: &str,
) -> String {
    let assertion = key
        .client_assertion(
            client_id,
            &smart.server.config().token_endpoint(),
            smart.clock.now(),
            jti,
        )
        .unwrap();
    form(&[
        ("grant_type", "client_credentials"),
        ("scope", "system/*.rs"),
        (
            "client_assertion_type",
            haven_auth::client::JWT_BEARER_ASSERTION_TYPE,
        ),
        ("client_assertion", &assertion),
    ])
}

/// Asks for a Backend Services token with a valid assertion and checks that
/// none is handed out: a 500 `server_error`, not cached. Returns the client.
async fn no_backend_token_is_handed_out(smart: &Smart) -> String {
    let (client_id, key) = backend_client(smart).await;
    let reply = smart
        .post_form(
            "/auth/token",
            client_credentials(smart, &client_id, &key, "jti-1"),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    let body = reply.json();
    assert_eq!(body["error"], "server_error");
    assert!(body.get("access_token").is_none(), "{body}");
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    client_id
}

#[tokio::test]
async fn a_backend_services_token_is_recorded_and_a_replay_of_its_assertion_is_refused_and_recorded(
) {
    let smart = spawn().await;
    let (client_id, key) = backend_client(&smart).await;
    let request = client_credentials(&smart, &client_id, &key, "jti-1");

    let issued = smart.post_form("/auth/token", request.clone(), None).await;
    assert_eq!(issued.status, StatusCode::OK, "{}", issued.text);
    let access = issued.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        smart.get("/fhir/Patient/a", Some(&access)).await.status,
        StatusCode::OK
    );
    let replay = smart.post_form("/auth/token", request, None).await;
    assert_eq!(replay.status, StatusCode::UNAUTHORIZED);
    assert_eq!(replay.json()["error"], "invalid_client");

    let events = smart.auth_events("token").await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].outcome(), "0");
    assert!(events[0].agents().contains(&client_id.as_str()));
    assert_eq!(
        events[0].detail("token-sha256"),
        Some(haven_audit::token_fingerprint(&access).as_str())
    );
    assert_eq!(events[1].outcome(), "8");
    assert!(
        events[1].reason().starts_with("invalid_client: "),
        "{}",
        events[1].reason()
    );
}

#[tokio::test]
async fn when_a_client_assertions_use_cannot_be_stored_the_token_is_withheld_and_that_is_recorded()
{
    let smart = spawn_wrapping(|store| store, FaultyStore::with(Fault::StagedCommitFails)).await;
    let client_id = no_backend_token_is_handed_out(&smart).await;

    // The request was recorded while the use was being stored; the second
    // event says the token it names never left.
    let events = smart.auth_events("token").await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].outcome(), "0");
    let withheld = &events[1];
    assert_eq!(withheld.outcome(), "12");
    assert!(
        withheld
            .reason()
            .starts_with("server_error: the token was withheld"),
        "{}",
        withheld.reason()
    );
    assert!(withheld.agents().contains(&client_id.as_str()));
    assert_eq!(
        withheld.detail("token-sha256"),
        events[0].detail("token-sha256")
    );
}

#[tokio::test]
async fn when_a_client_assertions_use_cannot_be_stored_a_code_is_not_exchanged_at_all() {
    let smart = spawn_wrapping(|store| store, FaultyStore::with(Fault::StagedCommitFails)).await;
    let key = haven_auth::client::ClientKey::generate_ec_p384();
    let (client, _) = smart
        .server
        .add_client(ClientSpec {
            name: "Confidential App".into(),
            redirect_uris: vec![REDIRECT.into()],
            scopes: "patient/*.rs".into(),
            auth: Some(ClientAuth::PrivateKeyJwt),
            jwks: Some(key.jwks()),
            ..ClientSpec::default()
        })
        .await
        .unwrap();
    let mut params = query_of(&smart.authorize_url("patient/*.rs", &[]));
    params.insert("client_id".into(), client.client_id.clone());
    let pending = smart.server.begin_authorization(&params).await.unwrap();
    let user = smart.server.user("amy").await.unwrap();
    let pending = smart
        .server
        .attach_user(pending, &user, "cookie")
        .await
        .unwrap();
    let url = smart
        .server
        .approve(&pending, &pending.scopes)
        .await
        .unwrap();
    let code = query_of(&url)["code"].clone();
    let assertion = key
        .client_assertion(
            &client.client_id,
            &smart.server.config().token_endpoint(),
            smart.clock.now(),
            "jti-1",
        )
        .unwrap();

    let reply = smart
        .post_form(
            "/auth/token",
            form(&[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", VERIFIER),
                (
                    "client_assertion_type",
                    haven_auth::client::JWT_BEARER_ASSERTION_TYPE,
                ),
                ("client_assertion", &assertion),
            ]),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.json()["error"], "server_error");

    // Refused before the code was looked at: no token was made to withhold,
    // and the code is not used up.
    let events = smart.auth_events("token").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].outcome(), "12");
    assert_eq!(events[0].detail("token-sha256"), None);
    assert!(
        !events[0].reason().contains("withheld"),
        "{}",
        events[0].reason()
    );
    let stored = smart
        .store
        .auth_records()
        .get("code", &haven_auth::registry::token_hash(&code))
        .await
        .unwrap()
        .expect("the code's record");
    assert_eq!(stored["used"], false, "{stored}");
}

#[tokio::test]
async fn when_the_audit_trail_cannot_be_written_no_backend_services_token_is_handed_out() {
    let smart = spawn_with(FaultyStore::with(Fault::AuditRefused)).await;
    no_backend_token_is_handed_out(&smart).await;
}

#[tokio::test]
async fn the_pickers_patient_lists_the_choice_and_the_consent_page_are_recorded_with_the_patients_named(
) {
    let smart = spawn().await;
    let reply = smart
        .get(
            &smart.authorize_url("launch/patient patient/*.rs", &[]),
            None,
        )
        .await;
    let request = query_of(reply.location())["request"].clone();
    let session = smart
        .login(&[
            ("request", &request),
            ("username", "drjones"),
            ("password", PASSWORD),
        ])
        .await
        .session();
    let picker = format!("/auth/patient?request={request}");
    let all = smart.get_with_cookie(&picker, &session).await;
    assert_eq!(all.status, StatusCode::OK);
    smart
        .get_with_cookie(&format!("{picker}&q=Field"), &session)
        .await;
    let missing = smart
        .post_form(
            "/auth/patient",
            form(&[("request", &request), ("patient", "nobody")]),
            Some(&session),
        )
        .await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    let chosen = smart
        .post_form(
            "/auth/patient",
            form(&[("request", &request), ("patient", "b")]),
            Some(&session),
        )
        .await;
    let consent = chosen.location().to_string();
    assert_eq!(
        smart.get_with_cookie(&consent, &session).await.status,
        StatusCode::OK
    );

    let events = smart.auth_events("authorize").await;
    let reasons: Vec<&str> = events.iter().map(AuthEvent::reason).collect();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert!(
        reasons[0].starts_with("patient picker search for \"\": 2 patients listed: ")
            && reasons[0].contains("Patient/a")
            && reasons[0].contains("Patient/b"),
        "{}",
        reasons[0]
    );
    assert_eq!(
        reasons[1],
        "patient picker search for \"Field\": 1 patient listed: Patient/b"
    );
    assert_eq!(reasons[2], "the patient chosen does not exist: \"nobody\"");
    assert_eq!(events[2].outcome(), "4");
    assert_eq!(reasons[3], "patient chosen: Patient/b");
    assert_eq!(events[3].outcome(), "0");
    assert_eq!(
        events[3].detail("scope"),
        Some("launch/patient patient/*.rs")
    );
    assert_eq!(reasons[4], "consent page showing Patient/b");
    for event in [&events[0], &events[1], &events[3], &events[4]] {
        assert_eq!(event.outcome(), "0");
        let agents = event.agents();
        assert!(
            agents.contains(&"drjones") && agents.contains(&smart.app.as_str()),
            "{agents:?}"
        );
    }
    // The page's answer names the record of what it showed.
    assert_eq!(Some(events[0].request_id()), all.header("x-request-id"));
    // The choice and the consent page are in patient b's access log.
    let about_b = smart
        .store
        .audit_log()
        .search(&haven_store::AuditQuery {
            patient: vec!["Patient/b".into()],
            count: 50,
            ..Default::default()
        })
        .await
        .unwrap();
    let about_b: Vec<&str> = about_b
        .records
        .iter()
        .filter_map(|r| r.event["outcomeDesc"].as_str())
        .collect();
    assert!(
        about_b.contains(&"patient chosen: Patient/b"),
        "{about_b:?}"
    );
    assert!(
        about_b.contains(&"consent page showing Patient/b"),
        "{about_b:?}"
    );
}

#[tokio::test]
async fn the_launchers_patient_list_and_an_ehr_launch_are_recorded_with_the_app_and_the_patient() {
    let smart = spawn().await;
    let session = smart
        .login(&[("username", "drjones"), ("password", PASSWORD)])
        .await
        .session();
    let page = smart
        .get_with_cookie("/auth/launcher?q=Shaw", &session)
        .await;
    assert_eq!(page.status, StatusCode::OK);
    let nobody = smart
        .post_form(
            "/auth/launcher",
            form(&[("patient", "nobody"), ("client_id", &smart.app)]),
            Some(&session),
        )
        .await;
    assert_eq!(nobody.status, StatusCode::BAD_REQUEST);
    let launched = smart
        .post_form(
            "/auth/launcher",
            form(&[("patient", "a"), ("client_id", &smart.app)]),
            Some(&session),
        )
        .await;
    assert_eq!(launched.status, StatusCode::SEE_OTHER);

    let events = smart.auth_events("authorize").await;
    assert_eq!(events.len(), 3);
    assert_eq!(
        events[0].reason(),
        "EHR launcher patient search for \"Shaw\": 1 patient listed: Patient/a"
    );
    assert_eq!(events[0].outcome(), "0");
    assert!(events[0].agents().contains(&"drjones"));
    assert_eq!(events[1].outcome(), "4");
    assert_eq!(
        events[1].reason(),
        "EHR launch for a patient that does not exist: \"nobody\""
    );
    let launch = &events[2];
    assert_eq!(launch.outcome(), "0");
    assert_eq!(launch.reason(), "EHR launch for Patient/a");
    let agents = launch.agents();
    assert!(
        agents.contains(&"drjones") && agents.contains(&smart.app.as_str()),
        "{agents:?}"
    );
    assert_eq!(Some(launch.request_id()), launched.header("x-request-id"));
    // The launch handed out is not in the trail.
    let launch_token = query_of(launched.location())["launch"].clone();
    assert!(!smart.audit_text().await.contains(&launch_token));
}

#[tokio::test]
async fn a_revocation_refused_to_an_unknown_client_is_recorded_once_and_revokes_nothing() {
    let smart = spawn().await;
    let token = smart.token("amy", "patient/*.rs", None).await;
    let refused = smart
        .post_form(
            "/auth/revoke",
            form(&[("token", &token), ("client_id", "nobody")]),
            None,
        )
        .await;
    assert_eq!(refused.json()["error"], "invalid_client");
    let revocations = smart.auth_events("revocation").await;
    assert_eq!(revocations.len(), 1);
    assert_eq!(revocations[0].outcome(), "8");
    assert!(revocations[0].agents().contains(&"nobody"));
    assert!(smart.server.verify_access_token(&token).await.is_ok());
}

#[tokio::test]
async fn when_the_audit_trail_cannot_be_written_a_revocation_does_not_happen_and_the_token_still_works(
) {
    let smart = spawn_with(FaultyStore::with(Fault::AuditRefused)).await;
    // Issued by the authorization server itself: its token endpoint would not
    // hand out a token it cannot record.
    let code = smart.code_for("amy", "patient/*.rs", None).await;
    let exchange: HashMap<String, String> = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("client_id", smart.app.as_str()),
        ("code_verifier", VERIFIER),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let issued = smart.server.token(&exchange, None).await.unwrap();
    let token = issued["access_token"].as_str().unwrap().to_owned();

    let revoked = smart
        .post_form(
            "/auth/revoke",
            form(&[("token", &token), ("client_id", &smart.app)]),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(revoked.json()["error"], "server_error");
    let still = smart.server.verify_access_token(&token).await;
    assert!(still.is_ok(), "the token was revoked: {still:?}");
}

#[tokio::test]
async fn when_the_audit_trail_cannot_be_written_the_picker_shows_no_patient_and_neither_a_choice_nor_a_sign_out_takes_effect(
) {
    let smart = spawn_with(FaultyStore::with(Fault::AuditRefused)).await;
    // Signed in by the authorization server itself: the sign-in page would not
    // hand out a session it cannot record.
    let (session, user) = smart
        .server
        .login("drjones", PASSWORD, "192.0.2.1")
        .await
        .unwrap();
    let params = query_of(&smart.authorize_url("launch/patient patient/*.rs", &[]));
    let pending = smart.server.begin_authorization(&params).await.unwrap();
    let pending = smart
        .server
        .attach_user(pending, &user, &session)
        .await
        .unwrap();

    let picker = smart
        .get_with_cookie(&format!("/auth/patient?request={}", pending.id), &session)
        .await;
    assert_eq!(picker.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        !picker.text.contains("Pat Shaw") && !picker.text.contains("Pat Field"),
        "{}",
        picker.text
    );
    let launcher = smart.get_with_cookie("/auth/launcher", &session).await;
    assert_eq!(launcher.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!launcher.text.contains("Pat Shaw"), "{}", launcher.text);

    let chosen = smart
        .post_form(
            "/auth/patient",
            form(&[("request", &pending.id), ("patient", "b")]),
            Some(&session),
        )
        .await;
    assert_eq!(chosen.status, StatusCode::INTERNAL_SERVER_ERROR);
    let kept = smart.server.pending(&pending.id).await.unwrap();
    assert_eq!(kept.context.patient, None, "the choice was kept");

    let launched = smart
        .post_form(
            "/auth/launcher",
            form(&[("patient", "a"), ("client_id", &smart.app)]),
            Some(&session),
        )
        .await;
    assert_eq!(launched.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(launched.header("location").is_none());

    let out = smart
        .post_form("/auth/logout", String::new(), Some(&session))
        .await;
    assert_eq!(out.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        smart.server.session_user(&session).await.is_some(),
        "the session ended without a record"
    );
}
