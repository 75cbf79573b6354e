//! Tokens obtained the way real clients obtain them: a patient signs in on the
//! server's pages for an app (authorization code with PKCE), and a Backend
//! Services client posts a signed assertion.

use std::collections::HashMap;

use anyhow::{anyhow, bail, ensure, Result};
use haven_auth::client::ClientKey;
use regex::Regex;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::Value;

/// Where the app's browser is sent back to; nothing listens there, the code is
/// read off the redirect.
pub const APP_REDIRECT: &str = "https://app.bench.invalid/callback";

/// A client that does not follow redirects, as each step must be seen.
pub fn http_client(ca_pem: &[u8]) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem)?)
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// The token endpoint the server announces; client assertions name it as `aud`.
pub async fn token_endpoint(http: &reqwest::Client, base: &str) -> Result<String> {
    let config: Value = http
        .get(format!("{base}/.well-known/smart-configuration"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    config["token_endpoint"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the SMART configuration names no token endpoint"))
}

/// The form body of a Backend Services token request with a fresh assertion.
pub fn client_credentials_form(
    key: &ClientKey,
    client_id: &str,
    token_url: &str,
    scope: &str,
) -> Result<String> {
    let jti = uuid::Uuid::new_v4().simple().to_string();
    let assertion =
        key.client_assertion(client_id, token_url, time::OffsetDateTime::now_utc(), &jti)?;
    Ok(form(&[
        ("grant_type", "client_credentials"),
        ("scope", scope),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", &assertion),
    ]))
}

/// A Backend Services access token.
pub async fn backend_token(
    http: &reqwest::Client,
    origin: &str,
    token_url: &str,
    key: &ClientKey,
    client_id: &str,
    scope: &str,
) -> Result<String> {
    let body = request_token(
        http,
        origin,
        client_credentials_form(key, client_id, token_url, scope)?,
    )
    .await?;
    body["access_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no access_token in {body}"))
}

/// Posts a form to the token endpoint; the answer, which must be a 200 with
/// an access token.
async fn request_token(http: &reqwest::Client, origin: &str, form: String) -> Result<Value> {
    let answer = http
        .post(format!("{origin}/auth/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await?;
    let status = answer.status();
    let body: Value = answer.json().await?;
    ensure!(
        status == StatusCode::OK && body["access_token"].is_string(),
        "the token endpoint answered {status}: {body}"
    );
    Ok(body)
}

/// A browser's cookies for the server's pages.
#[derive(Default)]
struct Cookies(HashMap<String, String>);

impl Cookies {
    fn take(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all(SET_COOKIE) {
            let Ok(text) = value.to_str() else { continue };
            let pair = text.split(';').next().unwrap_or_default();
            if let Some((name, value)) = pair.split_once('=') {
                if value.is_empty() {
                    self.0.remove(name.trim());
                } else {
                    self.0.insert(name.trim().to_owned(), value.to_owned());
                }
            }
        }
    }

    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The inputs of a page's first form with the given action, as a browser
/// would send them: hidden values and checked boxes.
fn form_fields(html: &str, action: &str) -> Result<Vec<(String, String)>> {
    let start = html
        .find(&format!("action=\"{action}\""))
        .ok_or_else(|| anyhow!("no form posting to {action} on the page: {html}"))?;
    let end = html[start..]
        .find("</form>")
        .map_or(html.len(), |e| start + e);
    let inputs = Regex::new(r"<input ([^>]*)>")?;
    let attribute = Regex::new(r#"([a-z]+)="([^"]*)""#)?;
    let mut fields = Vec::new();
    for input in inputs.captures_iter(&html[start..end]) {
        let attrs: HashMap<&str, String> = attribute
            .captures_iter(&input[1])
            .map(|a| (a.get(1).map_or("", |m| m.as_str()), unescape(&a[2])))
            .collect();
        let kind = attrs.get("type").map_or("text", String::as_str);
        let Some(name) = attrs.get("name") else {
            continue;
        };
        let checked = input[1].contains(" checked");
        if kind == "hidden" || (kind == "checkbox" && checked) {
            fields.push((
                name.clone(),
                attrs.get("value").cloned().unwrap_or_default(),
            ));
        }
    }
    Ok(fields)
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        out.append_pair(k, v);
    }
    out.finish()
}

/// What a patient's sign-in needs.
pub struct PatientLogin<'a> {
    pub origin: &'a str,
    /// The FHIR base the token is for (`aud`).
    pub base: &'a str,
    pub client_id: &'a str,
    pub scope: &'a str,
    pub username: &'a str,
    pub password: &'a str,
}

/// A standalone launch: the app sends the browser to the authorization
/// endpoint with PKCE, the patient signs in and approves, and the app
/// exchanges the code. Returns the access token and its patient.
pub async fn patient_token(
    http: &reqwest::Client,
    login: &PatientLogin<'_>,
) -> Result<(String, String)> {
    let verifier = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let challenge = haven_auth::server::pkce_s256(&verifier);
    let mut cookies = Cookies::default();
    let query = form(&[
        ("response_type", "code"),
        ("client_id", login.client_id),
        ("redirect_uri", APP_REDIRECT),
        ("scope", login.scope),
        ("state", "bench"),
        ("aud", login.base),
        ("code_challenge", &challenge),
        ("code_challenge_method", "S256"),
    ]);
    let mut response = http
        .get(format!("{}/auth/authorize?{query}", login.origin))
        .send()
        .await?;
    let mut signed_in = false;
    for _ in 0..8 {
        cookies.take(&response);
        if let Some(location) = response.headers().get(LOCATION) {
            let location = location.to_str()?.to_owned();
            if let Some(query) = location.strip_prefix(&format!("{APP_REDIRECT}?")) {
                let code = form_urlencoded::parse(query.as_bytes())
                    .find(|(k, _)| k == "code")
                    .map(|(_, v)| v.into_owned())
                    .ok_or_else(|| anyhow!("the redirect carries no code: {location}"))?;
                return exchange(http, login, &code, &verifier).await;
            }
            let url = if location.starts_with('/') {
                format!("{}{location}", login.origin)
            } else {
                location
            };
            response = http
                .get(url)
                .header(COOKIE, cookies.header())
                .send()
                .await?;
            continue;
        }
        let status = response.status();
        let html = response.text().await?;
        ensure!(
            status == StatusCode::OK,
            "the sign-in page answered {status}: {html}"
        );
        let (action, mut fields) = if !signed_in && html.contains("action=\"/auth/login\"") {
            signed_in = true;
            let mut fields = form_fields(&html, "/auth/login")?;
            fields.push(("username".into(), login.username.into()));
            fields.push(("password".into(), login.password.into()));
            ("/auth/login", fields)
        } else if html.contains("action=\"/auth/consent\"") {
            ("/auth/consent", form_fields(&html, "/auth/consent")?)
        } else {
            bail!("an unexpected page: {html}");
        };
        if action == "/auth/consent" {
            fields.push(("decision".into(), "approve".into()));
        }
        let body = {
            let mut out = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &fields {
                out.append_pair(k, v);
            }
            out.finish()
        };
        response = http
            .post(format!("{}{action}", login.origin))
            .header(COOKIE, cookies.header())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await?;
    }
    bail!("the sign-in did not end in a redirect to the app")
}

async fn exchange(
    http: &reqwest::Client,
    login: &PatientLogin<'_>,
    code: &str,
    verifier: &str,
) -> Result<(String, String)> {
    let body = request_token(
        http,
        login.origin,
        form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", APP_REDIRECT),
            ("client_id", login.client_id),
            ("code_verifier", verifier),
        ]),
    )
    .await?;
    let token = body["access_token"].as_str().unwrap_or_default();
    let patient = body["patient"]
        .as_str()
        .ok_or_else(|| anyhow!("no patient in {body}"))?;
    Ok((token.to_owned(), patient.to_owned()))
}
