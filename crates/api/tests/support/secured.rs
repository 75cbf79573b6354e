//! A SMART-secured, audited app: an authorization server over the app's store
//! and clock, the public app "Chart" registered with it, users, and their
//! tokens through the authorization code flow.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use haven_api::AppState;
use haven_auth::keys::{generate_signing_key, KeySet};
use haven_auth::registry::{ClientAuth, Role};
use haven_auth::server::{pkce_s256, ClientSpec};
use haven_auth::{AuthConfig, AuthServer};
use haven_model::clock::{Clock, ManualClock};
use haven_store::Store;

pub const REDIRECT: &str = "https://app.test/callback";
pub const VERIFIER: &str = "a-verifier-of-more-than-forty-three-characters-0123456789";
pub const PASSWORD: &str = "correct horse battery";

/// One signing key for the whole test binary.
pub fn signing_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| generate_signing_key().unwrap())
}

/// The authorization server of an app and the client id of "Chart".
pub struct Smart {
    pub server: Arc<AuthServer>,
    pub client_id: String,
    base: String,
}

/// Turns SMART and audit on in `state`, with an authorization server at `base`
/// over `store` and `clock`, and registers the public app "Chart" with it.
pub async fn secure(
    state: AppState,
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    base: &str,
) -> (AppState, Smart) {
    let keys = KeySet::new(signing_key(), &[], clock.now(), time::Duration::hours(1)).unwrap();
    let server = Arc::new(AuthServer::new(AuthConfig::new(base), store, clock, keys));
    let state = state.with_smart(server.clone()).with_audit("haven-test");
    let (app, _) = server
        .add_client(ClientSpec {
            name: "Chart".into(),
            redirect_uris: vec![REDIRECT.into()],
            scopes: "launch/patient openid fhirUser patient/*.cruds user/*.cruds".into(),
            auth: Some(ClientAuth::None),
            purposes: ["TREAT", "HRESCH", "HMARKT", "BTG"]
                .map(str::to_owned)
                .to_vec(),
            ..ClientSpec::default()
        })
        .await
        .unwrap();
    let smart = Smart {
        server,
        client_id: app.client_id,
        base: base.to_owned(),
    };
    (state, smart)
}

impl Smart {
    /// Adds users as `(name, role, fhirUser)`, each with [`PASSWORD`].
    pub async fn add_users(&self, users: &[(&str, Role, Option<&str>)]) {
        for (name, role, fhir_user) in users {
            self.server
                .add_user(name, PASSWORD, *role, fhir_user.map(str::to_owned), None)
                .await
                .unwrap();
        }
    }

    /// A user's token for "Chart" with `scope`, through the authorization
    /// server's steps. A patient user's token has their patient in context.
    pub async fn token(&self, username: &str, scope: &str) -> String {
        self.token_with(username, scope, &[]).await.unwrap()
    }

    /// A token as [`Smart::token`] gets it, with more authorization request
    /// parameters (`purpose_of_use`, `btg_reason`); the refusal's description
    /// when the authorization server refuses.
    pub async fn token_with(
        &self,
        username: &str,
        scope: &str,
        extra: &[(&str, &str)],
    ) -> Result<String, String> {
        let challenge = pkce_s256(VERIFIER);
        let mut pairs = vec![
            ("response_type", "code"),
            ("client_id", self.client_id.as_str()),
            ("redirect_uri", REDIRECT),
            ("scope", scope),
            ("state", "s"),
            ("aud", self.base.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        pairs.extend_from_slice(extra);
        let params = form(&pairs);
        let pending = self
            .server
            .begin_authorization(&params)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let user = self.server.user(username).await.unwrap();
        let pending = self
            .server
            .attach_user(pending, &user, "cookie")
            .await
            .map_err(|e| e.description)?;
        let redirect = self
            .server
            .approve(&pending, &pending.scopes)
            .await
            .unwrap();
        let query = redirect.split_once('?').map_or("", |(_, q)| q);
        let code = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "code")
            .expect("a code")
            .1
            .into_owned();
        let answer = self
            .server
            .token(
                &form(&[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", REDIRECT),
                    ("client_id", &self.client_id),
                    ("code_verifier", VERIFIER),
                ]),
                None,
            )
            .await
            .map_err(|e| e.description)?;
        Ok(answer["access_token"].as_str().unwrap().to_owned())
    }
}

fn form(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}
