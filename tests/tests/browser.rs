//! The authorization pages in a real browser: headless Chromium, driven through
//! chromedriver, signs in, consents, picks patients and launches apps as a person
//! would. Every page is kept as a screenshot under `target/test-artifacts/browser/`.
//!
//! The tests need chromedriver (`HAVEN_CHROMEDRIVER`, or `chromedriver` on PATH);
//! without it they say "not run" and pass.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use fantoccini::{Client, ClientBuilder, Locator};
use haven_e2e::{haven_binary, spawn_haven, workspace_root, Haven, HavenOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a page may take to show what a step waits for.
const PAGE_TIMEOUT: Duration = Duration::from_secs(15);

// ----- chromedriver -------------------------------------------------------------

fn find_chromedriver() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("HAVEN_CHROMEDRIVER").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("chromedriver"))
        .find(|path| path.is_file())
}

/// A chromedriver process on a free loopback port, shut down on drop.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    fn start(path: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(path)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
        let driver = Self { child, port };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "chromedriver did not listen on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A new headless Chromium session.
    async fn browser(&self, scenario: &'static str) -> Browser {
        let capabilities = json!({
            // The server's certificate comes from the private CA each test generates;
            // Chromium cannot be told to trust one CA, so it accepts this session's
            // certificates instead. Nothing else is visited.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                // no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"]
            }
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url())
            .await
            .expect("chromedriver starts a Chromium session");
        let dir = workspace_root().join("target/test-artifacts/browser");
        std::fs::create_dir_all(&dir).unwrap();
        Browser {
            client,
            scenario,
            step: 0,
            dir,
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // /shutdown also quits the browsers it started; killing chromedriver alone
        // would leave them running.
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = stream.write_all(
                b"GET /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            );
            let _ = stream.read_to_end(&mut Vec::new());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----- the browser ----------------------------------------------------------------

/// One Chromium session and the screenshots it has taken.
struct Browser {
    client: Client,
    scenario: &'static str,
    step: usize,
    dir: PathBuf,
}

impl Browser {
    async fn open(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// Waits until `css` matches an element on the page.
    async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        match self
            .client
            .wait()
            .at_most(PAGE_TIMEOUT)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(element) => element,
            Err(e) => panic!(
                "{css} did not appear on {}: {e}\n{}",
                self.url().await,
                self.client.source().await.unwrap_or_default()
            ),
        }
    }

    async fn click(&self, css: &str) {
        self.wait_for(css).await.click().await.unwrap();
    }

    /// Clicks the label showing exactly `text`, as a person picks a row.
    async fn click_label(&self, text: &str) {
        let xpath = format!("//label[normalize-space()='{text}']");
        match self
            .client
            .wait()
            .at_most(PAGE_TIMEOUT)
            .for_element(Locator::XPath(&xpath))
            .await
        {
            Ok(label) => label.click().await.unwrap(),
            Err(e) => panic!("no label {text:?} on {}: {e}", self.url().await),
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let input = self.wait_for(css).await;
        input.clear().await.unwrap();
        input.send_keys(text).await.unwrap();
    }

    async fn text(&self, css: &str) -> String {
        self.wait_for(css).await.text().await.unwrap()
    }

    /// The visible text of every element `css` matches.
    async fn texts(&self, css: &str) -> Vec<String> {
        let mut out = Vec::new();
        for element in self.client.find_all(Locator::Css(css)).await.unwrap() {
            out.push(element.text().await.unwrap());
        }
        out
    }

    async fn url(&self) -> url::Url {
        self.client.current_url().await.unwrap()
    }

    /// Waits until the browser is at a URL starting with `prefix`.
    async fn wait_for_url(&self, prefix: &str) -> url::Url {
        let start = Instant::now();
        loop {
            let url = self.url().await;
            if url.as_str().starts_with(prefix) {
                return url;
            }
            if start.elapsed() > PAGE_TIMEOUT {
                panic!("the browser stayed at {url}, not {prefix}...");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves the page as `<scenario>-<step>-<what>.png`.
    async fn screenshot(&mut self, what: &str) {
        self.step += 1;
        let png = self.client.screenshot().await.unwrap();
        let path = self
            .dir
            .join(format!("{}-{:02}-{what}.png", self.scenario, self.step));
        std::fs::write(&path, png).unwrap();
    }

    async fn sign_in(&mut self, username: &str, password: &str) {
        self.type_into("#username", username).await;
        self.type_into("#password", password).await;
        self.click("#sign-in").await;
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// The query parameters of a URL.
fn query(url: &url::Url) -> std::collections::HashMap<String, String> {
    url.query_pairs().into_owned().collect()
}

// ----- the world the browser sees ----------------------------------------------------------

const PASSWORD: &str = "password-1";
const APP_SCOPES: &str = "launch launch/patient openid fhirUser patient/*.rs";

/// A server with two patients, a patient user `amy`, a practitioner `drjones`,
/// and the public app "Growth Chart" whose pages answer on a local listener.
struct World {
    haven: Haven,
    driver: Chromedriver,
    client_id: String,
    redirect_uri: String,
    launch_url: String,
}

/// Runs a `haven` admin command, with `stdin` as its input, and returns its JSON.
fn haven_cli(args: &[&str], stdin: &str) -> Value {
    let mut command = Command::new(haven_binary().unwrap());
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars() {
        if key.starts_with("HAVEN_") && key != "HAVEN_LOG" {
            command.env_remove(key);
        }
    }
    let mut child = command.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "haven {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or(Value::Null)
}

/// Answers every request with a tiny page, standing in for the app's own pages.
async fn app_listener() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 8192];
                let mut read = 0;
                // The whole request head, so the browser never sees a reset.
                while !buffer[..read].windows(4).any(|w| w == b"\r\n\r\n") && read < buffer.len() {
                    match stream.read(&mut buffer[read..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read += n,
                    }
                }
                let body =
                    "<!doctype html><title>Growth Chart</title><h1>Growth Chart</h1><p>ok</p>";
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    origin
}

impl World {
    /// `None` (having said so) when there is no chromedriver.
    async fn start() -> Option<World> {
        let Some(chromedriver) = find_chromedriver() else {
            println!("not run: no chromedriver (set HAVEN_CHROMEDRIVER or put it on PATH)");
            return None;
        };
        let driver = Chromedriver::start(&chromedriver);
        let haven = spawn_haven(HavenOptions::default()).await.unwrap();
        let data_dir = haven.data_dir.to_str().unwrap().to_string();
        let app = app_listener().await;
        let redirect_uri = format!("{app}/callback");
        let launch_url = format!("{app}/launch");

        // Patients go in through the API, as a Backend Services loader would put them.
        let loader = haven.register_backend_client("system/*.cruds").unwrap();
        let patient = |id: &str, given: &str, family: &str, born: &str| {
            json!({
                "resource": {"resourceType": "Patient", "id": id,
                             "name": [{"given": [given], "family": family}], "birthDate": born},
                "request": {"method": "PUT", "url": format!("Patient/{id}")}
            })
        };
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                patient("amy", "Amy", "Shaw", "1987-04-12"),
                patient("bob", "Bob", "Field", "1954-11-02"),
            ]
        });
        let bundle_file = haven.data_dir.join("patients.json");
        std::fs::write(&bundle_file, bundle.to_string()).unwrap();
        let output = haven
            .load_command(&bundle_file, &loader)
            .unwrap()
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "haven load failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );

        for (username, role, fhir_user) in [
            ("amy", "patient", "Patient/amy"),
            ("drjones", "practitioner", "Practitioner/drjones"),
        ] {
            haven_cli(
                &[
                    "users",
                    "add",
                    "--data-dir",
                    &data_dir,
                    "--username",
                    username,
                    "--role",
                    role,
                    "--fhir-user",
                    fhir_user,
                ],
                PASSWORD,
            );
        }
        let app = haven_cli(
            &[
                "clients",
                "add",
                "--data-dir",
                &data_dir,
                "--name",
                "Growth Chart",
                "--redirect-uri",
                &redirect_uri,
                "--scope",
                APP_SCOPES,
                "--public",
                "--launch-url",
                &launch_url,
            ],
            "",
        );
        Some(World {
            haven,
            driver,
            client_id: app["client_id"].as_str().unwrap().to_string(),
            redirect_uri,
            launch_url,
        })
    }

    /// `https://127.0.0.1:PORT`, where the browser reaches the server.
    fn origin(&self) -> String {
        self.haven.base_url.trim_end_matches("/fhir").to_string()
    }

    /// The app's authorization request; `extra` adds e.g. `launch`.
    fn authorize_url(
        &self,
        scope: &str,
        state: &str,
        pkce: &Pkce,
        extra: &[(&str, &str)],
    ) -> String {
        let mut params = vec![
            ("response_type", "code"),
            ("client_id", &self.client_id),
            ("redirect_uri", &self.redirect_uri),
            ("scope", scope),
            ("state", state),
            // The FHIR base the server announces, which is what aud must name.
            ("aud", &self.haven.announced_base_url),
            ("code_challenge", &pkce.challenge),
            ("code_challenge_method", "S256"),
        ];
        params.extend_from_slice(extra);
        url::Url::parse_with_params(&format!("{}/auth/authorize", self.origin()), &params)
            .unwrap()
            .to_string()
    }

    /// Trades a code for tokens as the app's back end would.
    async fn exchange(&self, code: &str, pkce: &Pkce) -> Value {
        let response = self
            .haven
            .client()
            .post(format!("{}/auth/token", self.origin()))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &self.redirect_uri),
                ("client_id", &self.client_id),
                ("code_verifier", &pkce.verifier),
            ])
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }
}

struct Pkce {
    verifier: String,
    challenge: String,
}

impl Pkce {
    fn new() -> Self {
        let verifier = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
        let challenge = URL_SAFE_NO_PAD.encode(digest.as_ref());
        Self {
            verifier,
            challenge,
        }
    }
}

/// The scopes of a token response, as a sorted list.
fn scopes(token: &Value) -> Vec<String> {
    let mut out: Vec<String> = token["scope"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    out.sort();
    out
}

// ----- the scenarios -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_patient_signs_in_unchecks_a_scope_and_the_app_gets_only_the_rest() {
    let Some(world) = World::start().await else {
        return;
    };
    let mut browser = world.driver.browser("patient-standalone").await;
    let pkce = Pkce::new();
    let requested = "launch/patient openid fhirUser patient/*.rs";
    browser
        .open(&world.authorize_url(requested, "xyz", &pkce, &[]))
        .await;
    browser.wait_for("#sign-in").await;
    assert!(
        browser.text("main").await.contains("Growth Chart"),
        "the sign-in page names the app"
    );
    browser.screenshot("sign-in").await;

    browser.sign_in("amy", "wrong-password").await;
    let error = browser.text("#error").await;
    assert_eq!(error, "The username or password is wrong.");
    browser.screenshot("wrong-password").await;

    browser.sign_in("amy", PASSWORD).await;
    browser.wait_for("#approve").await;
    assert_eq!(browser.text("#patient").await, "Amy Shaw");
    let boxes = browser
        .client
        .find_all(Locator::Css("input[name=scope]"))
        .await
        .unwrap();
    let mut listed = Vec::new();
    for checkbox in &boxes {
        assert!(
            checkbox.is_selected().await.unwrap(),
            "every scope starts checked"
        );
        listed.push(checkbox.attr("value").await.unwrap().unwrap());
    }
    listed.sort();
    let mut expected: Vec<&str> = requested.split(' ').collect();
    expected.sort();
    assert_eq!(listed, expected);
    browser.screenshot("consent").await;

    browser.click("input[name=scope][value=fhirUser]").await;
    assert!(!browser
        .wait_for("input[name=scope][value=fhirUser]")
        .await
        .is_selected()
        .await
        .unwrap());
    browser.screenshot("consent-fhiruser-unchecked").await;
    browser.click("#approve").await;

    let landed = browser.wait_for_url(&world.redirect_uri).await;
    browser.screenshot("back-at-the-app").await;
    let params = query(&landed);
    assert_eq!(params.get("state").map(String::as_str), Some("xyz"));
    let code = params.get("code").expect("the redirect carries a code");
    let token = world.exchange(code, &pkce).await;
    assert_eq!(
        scopes(&token),
        ["launch/patient", "openid", "patient/*.rs"],
        "{token}"
    );
    assert_eq!(token["patient"], "amy", "{token}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_practitioner_finds_a_patient_by_name_and_the_app_gets_that_patient() {
    let Some(world) = World::start().await else {
        return;
    };
    let mut browser = world.driver.browser("practitioner-standalone").await;
    let pkce = Pkce::new();
    let scope = "launch/patient openid fhirUser patient/*.rs";
    browser
        .open(&world.authorize_url(scope, "s2", &pkce, &[]))
        .await;
    browser.wait_for("#sign-in").await;
    browser.screenshot("sign-in").await;
    browser.sign_in("drjones", PASSWORD).await;

    browser.wait_for("#choose").await;
    let mut names = browser.texts("table label").await;
    names.sort();
    assert_eq!(names, ["Amy Shaw", "Bob Field"]);
    browser.screenshot("patient-picker").await;

    browser.type_into("#q", "Bob").await;
    browser.click("#find").await;
    browser
        .wait_for_url(&format!("{}/auth/patient", world.origin()))
        .await;
    let start = Instant::now();
    while browser.texts("table label").await != ["Bob Field"] {
        assert!(
            start.elapsed() < PAGE_TIMEOUT,
            "the search did not narrow the list to Bob: {:?}",
            browser.texts("table label").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(query(&browser.url().await)
        .get("q")
        .is_some_and(|q| q == "Bob"));
    browser.screenshot("patient-search").await;

    browser.click_label("Bob Field").await;
    assert!(browser
        .wait_for("input[name=patient][value=bob]")
        .await
        .is_selected()
        .await
        .unwrap());
    browser.click("#choose").await;

    browser.wait_for("#approve").await;
    assert_eq!(browser.text("#patient").await, "Bob Field");
    browser.screenshot("consent").await;
    browser.click("#approve").await;

    let landed = browser.wait_for_url(&world.redirect_uri).await;
    browser.screenshot("back-at-the-app").await;
    let params = query(&landed);
    assert_eq!(params.get("state").map(String::as_str), Some("s2"));
    let token = world.exchange(&params["code"], &pkce).await;
    assert_eq!(token["patient"], "bob", "{token}");
    assert_eq!(
        scopes(&token),
        ["fhirUser", "launch/patient", "openid", "patient/*.rs"]
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_practitioner_launches_the_app_for_a_patient_from_the_launcher() {
    let Some(world) = World::start().await else {
        return;
    };
    let mut browser = world.driver.browser("ehr-launch").await;
    let origin = world.origin();
    browser.open(&format!("{origin}/auth/launcher")).await;
    // Not signed in yet: the launcher sends the browser to sign in first.
    browser.wait_for("#sign-in").await;
    assert_eq!(browser.url().await.path(), "/auth/login");
    browser.screenshot("sign-in").await;
    browser.sign_in("drjones", PASSWORD).await;

    browser.wait_for("#launch").await;
    assert_eq!(browser.url().await.path(), "/auth/launcher");
    let mut names = browser.texts("table label").await;
    names.sort();
    assert_eq!(names, ["Amy Shaw", "Bob Field"]);
    assert_eq!(browser.texts("ul.choices label").await, ["Growth Chart"]);
    browser.click_label("Amy Shaw").await;
    browser.click_label("Growth Chart").await;
    browser.screenshot("launcher").await;
    browser.click("#launch").await;

    let launched = browser.wait_for_url(&world.launch_url).await;
    browser.screenshot("app-launch-page").await;
    let params = query(&launched);
    assert_eq!(
        params.get("iss"),
        Some(&world.haven.announced_base_url),
        "{launched}"
    );
    let launch = params.get("launch").expect("the launch URL carries launch");

    // What the app does next: its own authorization request naming the launch.
    let pkce = Pkce::new();
    let scope = "launch openid fhirUser patient/*.rs";
    browser
        .open(&world.authorize_url(scope, "s3", &pkce, &[("launch", launch)]))
        .await;
    // Signed in already, with the patient from the launch: straight to consent.
    browser.wait_for("#approve").await;
    assert_eq!(browser.url().await.path(), "/auth/consent");
    assert_eq!(browser.text("#patient").await, "Amy Shaw");
    browser.screenshot("consent").await;
    browser.click("#approve").await;

    let landed = browser.wait_for_url(&world.redirect_uri).await;
    browser.screenshot("back-at-the-app").await;
    let params = query(&landed);
    assert_eq!(params.get("state").map(String::as_str), Some("s3"));
    let token = world.exchange(&params["code"], &pkce).await;
    assert_eq!(token["patient"], "amy", "{token}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn denying_on_the_consent_page_sends_access_denied_back_to_the_app() {
    let Some(world) = World::start().await else {
        return;
    };
    let mut browser = world.driver.browser("deny").await;
    let pkce = Pkce::new();
    browser
        .open(&world.authorize_url("openid fhirUser patient/*.rs", "s4", &pkce, &[]))
        .await;
    browser.wait_for("#sign-in").await;
    browser.screenshot("sign-in").await;
    browser.sign_in("amy", PASSWORD).await;
    browser.wait_for("#deny").await;
    browser.screenshot("consent").await;
    browser.click("#deny").await;

    let landed = browser.wait_for_url(&world.redirect_uri).await;
    browser.screenshot("back-at-the-app").await;
    let params = query(&landed);
    assert_eq!(
        params.get("error").map(String::as_str),
        Some("access_denied")
    );
    assert_eq!(params.get("state").map(String::as_str), Some("s4"));
    assert!(!params.contains_key("code"), "{landed}");
    browser.close().await;
}

// ----- haven demo and its app ---------------------------------------------------------

const DEMO_PASSWORDS: [(&str, &str); 3] = [
    ("--patient-password", "patient-pass-1"),
    ("--practitioner-password", "practitioner-pass-1"),
    ("--admin-password", "admin-pass-1"),
];

/// `haven demo` on a fresh data directory, and what it recorded in `demo.json`.
struct Demo {
    /// Kept so the server runs as long as the test.
    _haven: Haven,
    driver: Chromedriver,
    record: Value,
}

impl Demo {
    async fn start() -> Option<Demo> {
        let Some(chromedriver) = find_chromedriver() else {
            println!("not run: no chromedriver (set HAVEN_CHROMEDRIVER or put it on PATH)");
            return None;
        };
        let driver = Chromedriver::start(&chromedriver);
        let mut extra_args = vec!["--patients".to_string(), "8".to_string()];
        for (flag, password) in DEMO_PASSWORDS {
            extra_args.extend([flag.to_string(), password.to_string()]);
        }
        let haven = spawn_haven(HavenOptions {
            command: Some("demo".into()),
            extra_args,
            ..HavenOptions::default()
        })
        .await
        .unwrap();
        let record: Value = serde_json::from_str(
            &std::fs::read_to_string(haven.data_dir.join("demo.json")).unwrap(),
        )
        .unwrap();
        Some(Demo {
            _haven: haven,
            driver,
            record,
        })
    }

    /// The origin the demo registered its app at (`https://localhost:PORT`).
    fn origin(&self) -> String {
        self.record["public_url"].as_str().unwrap().to_string()
    }

    fn patient_name(&self) -> String {
        self.record["patient"]["name"].as_str().unwrap().to_string()
    }
}

/// Waits until the demo app shows a record (or an error, which fails the test).
async fn wait_for_record(browser: &Browser) {
    let start = Instant::now();
    loop {
        let status = browser
            .client
            .find(Locator::Css("#status.error"))
            .await
            .ok();
        if let Some(status) = status {
            panic!("the demo app failed: {}", status.text().await.unwrap());
        }
        let shown = browser
            .client
            .find(Locator::Css("#record:not([hidden])"))
            .await
            .is_ok();
        if shown {
            return;
        }
        assert!(
            start.elapsed() < PAGE_TIMEOUT,
            "the demo app showed no record:\n{}",
            browser.client.source().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_patient_opens_the_demo_app_and_sees_their_record_chart_and_access_log() {
    let Some(demo) = Demo::start().await else {
        return;
    };
    let mut browser = demo.driver.browser("demo-standalone").await;
    let app = format!("{}/apps/demo/", demo.origin());
    browser.open(&app).await;
    browser.wait_for("#standalone").await;
    browser.screenshot("app-start").await;
    browser.click("#standalone").await;

    browser.wait_for("#sign-in").await;
    assert!(browser.text("main").await.contains("Haven demo app"));
    browser.screenshot("sign-in").await;
    browser.sign_in("demo-patient", "patient-pass-1").await;
    browser.wait_for("#approve").await;
    assert_eq!(browser.text("#patient").await, demo.patient_name());
    browser.screenshot("consent").await;
    browser.click("#approve").await;

    browser.wait_for_url(&app).await;
    wait_for_record(&browser).await;
    assert_eq!(browser.text("#patient-name").await, demo.patient_name());
    assert!(
        !query(&browser.url().await).contains_key("code"),
        "the code is gone from the address bar"
    );
    let observations = browser.texts("#observations tbody tr").await;
    assert_eq!(observations.len(), 12, "{observations:?}");
    assert!(
        browser.texts("#plot circle").await.len() >= 3,
        "the chart has a point per measurement"
    );
    assert!(browser
        .text("#plot-caption")
        .await
        .starts_with("Body weight (kg)"));
    // The patient sees their own sensitive condition, with its label.
    let conditions = browser.texts("#conditions li").await;
    assert!(
        conditions
            .iter()
            .any(|c| c.starts_with("Major depressive disorder") && c.ends_with("PSY")),
        "{conditions:?}"
    );
    // Their access log names them, reading through this app, and the loader
    // that wrote the record.
    let log = browser.texts("#access-log tbody tr").await;
    assert!(
        log.iter()
            .any(|row| row.contains("demo-patient (you) this app read")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|row| row.contains("a system, no person signed in")),
        "{log:?}"
    );
    browser.screenshot("patient-record").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_practitioner_launches_the_app_from_the_launcher_without_the_sensitive_condition()
{
    let Some(demo) = Demo::start().await else {
        return;
    };
    let mut browser = demo.driver.browser("demo-ehr-launch").await;
    browser
        .open(&format!("{}/auth/launcher", demo.origin()))
        .await;
    browser.wait_for("#sign-in").await;
    browser.screenshot("sign-in").await;
    browser
        .sign_in("demo-practitioner", "practitioner-pass-1")
        .await;
    browser.wait_for("#launch").await;
    assert_eq!(browser.texts("ul.choices label").await, ["Haven demo app"]);
    browser.click_label(&demo.patient_name()).await;
    browser.click_label("Haven demo app").await;
    browser.screenshot("launcher").await;
    browser.click("#launch").await;

    // The app's launch page sends the browser on to authorize, signed in already.
    browser.wait_for("#approve").await;
    assert_eq!(browser.text("#patient").await, demo.patient_name());
    browser.screenshot("consent").await;
    browser.click("#approve").await;

    browser
        .wait_for_url(&format!("{}/apps/demo/", demo.origin()))
        .await;
    wait_for_record(&browser).await;
    assert_eq!(browser.text("#patient-name").await, demo.patient_name());
    assert!(!browser.texts("#observations tbody tr").await.is_empty());
    let conditions = browser.texts("#conditions li").await;
    assert!(
        !conditions.iter().any(|c| c.contains("depress")),
        "a practitioner without clearance does not see the mental health condition: {conditions:?}"
    );
    assert!(
        browser
            .text("#withheld")
            .await
            .starts_with("Some records are not shown"),
        "the app says that something was withheld"
    );
    assert_eq!(
        browser.text("#access-log-note").await,
        "The access log is shown to the patient only."
    );
    browser.screenshot("practitioner-record").await;
    browser.close().await;
}
