//! `haven serve`: opens the store, builds the API and serves it over HTTPS (or, when
//! asked, plain HTTP on loopback) until SIGTERM or Ctrl-C.
//!
//! Connections are accepted here rather than by `axum::serve` because TLS, the
//! handshake timeout and the hyper-level header limits all live at the connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use haven_model::clock::Clock;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::config::Config;
use crate::signing_keys;
use crate::tls;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Refuses any address off this machine for plain HTTP: tokens and passwords
/// must not cross a network unencrypted.
pub fn check_loopback(addr: SocketAddr) -> Result<()> {
    if !addr.ip().is_loopback() {
        bail!(
            "refusing to serve plain HTTP on {addr}: --insecure-http is for loopback \
             addresses only (127.0.0.0/8 or ::1); serve HTTPS to listen on the network"
        );
    }
    Ok(())
}

/// The public URL clients use when none is configured: `localhost` for loopback,
/// with the port actually bound.
fn derived_public_url(scheme: &str, bound: SocketAddr) -> String {
    let host = if bound.ip().is_loopback() {
        "localhost".to_string()
    } else {
        match bound {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        }
    };
    format!("{scheme}://{host}:{}", bound.port())
}

pub async fn run(config: Config, clock: Arc<dyn Clock>) -> Result<()> {
    let bound = bind(config, clock).await?;
    let demo_app = crate::demo::registered_app(&bound)?;
    bound.serve(demo_app).await
}

/// A server with its store open and its address bound, not yet answering: what
/// `haven demo` needs to register its app at the public URL before serving.
pub struct Bound {
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub store: Arc<dyn haven_store::Store>,
    pub auth: Arc<haven_auth::AuthServer>,
    /// E.g. `https://localhost:8443`.
    pub public_url: String,
    /// `<public_url>/fhir`.
    pub base_url: String,
    /// The CA file clients trust, when the server made its own certificate.
    pub ca_file: Option<std::path::PathBuf>,
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    scheme: &'static str,
}

/// Opens the store, makes or reads the TLS files and signing keys, and binds.
pub async fn bind(config: Config, clock: Arc<dyn Clock>) -> Result<Bound> {
    if config.insecure_http {
        check_loopback(config.listen)?;
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;

    let mut ca_file = None;
    let acceptor = if config.insecure_http {
        tracing::warn!(
            "serving plain HTTP without TLS (--insecure-http); only for local development"
        );
        None
    } else {
        let (cert, key) = match &config.tls {
            Some((cert, key)) => (cert.clone(), key.clone()),
            None => {
                let (files, created) =
                    tls::ensure_local_ca(&config.data_dir.join("tls"), clock.now())?;
                let verb = if created { "created" } else { "using" };
                println!(
                    "haven {verb} its local certificate authority; clients trust it with: {}",
                    files.ca_cert.display()
                );
                ca_file = Some(files.ca_cert.clone());
                (files.server_cert, files.server_key)
            }
        };
        let server_config = tls::server_config(&cert, &key)?;
        Some(TlsAcceptor::from(Arc::new(server_config)))
    };

    let store = haven_store::connect(&config.database_url, clock.clone())
        .await
        .with_context(|| format!("opening the database {}", redact(&config.database_url)))?;

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let bound = listener.local_addr()?;
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| derived_public_url(scheme, bound));
    let base_url = format!("{public_url}/fhir");

    let (keys, created) = signing_keys::ensure(&config.data_dir, clock.now())?;
    if created {
        println!(
            "haven created its token signing key in {}",
            config.data_dir.join("keys").display()
        );
    }
    let mut auth_config = haven_auth::AuthConfig::new(&base_url);
    auth_config.clearances = config.policy.clearances.clone();
    auth_config.token_requests_per_minute = config.token_requests_per_minute;
    let auth = Arc::new(haven_auth::AuthServer::new(
        auth_config,
        store.clone(),
        clock.clone(),
        keys,
    ));
    Ok(Bound {
        config,
        clock,
        store,
        auth,
        public_url,
        base_url,
        ca_file,
        listener,
        acceptor,
        scheme,
    })
}

impl Bound {
    /// The address actually bound (its port, when asked for port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until SIGTERM or Ctrl-C; `demo_app` adds the demo app's files.
    pub async fn serve(self, demo_app: Option<haven_api::demo_app::DemoApp>) -> Result<()> {
        let Bound {
            config,
            clock,
            store,
            auth,
            base_url,
            listener,
            acceptor,
            scheme,
            ..
        } = self;
        let mut api_config = haven_api::ApiConfig::new(base_url.clone());
        api_config.limits = config.limits.clone();
        api_config.default_page_size = config.default_page_size;
        api_config.max_page_size = config.max_page_size;
        api_config.demo_app = demo_app;
        tokio::spawn(reload_signing_keys(
            auth.clone(),
            config.data_dir.clone(),
            clock.clone(),
        ));
        // Every FHIR request and every auth event leaves an AuditEvent.
        let state = haven_api::AppState::new(store, clock, api_config)
            .with_audit(crate::admin::observer(&base_url))
            .with_smart(auth)
            .with_policy(config.policy.api_config());
        let app = haven_api::router(state);

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        // The handlers are installed before "listening" is announced, so a signal
        // sent as soon as the server says it listens is never missed.
        let signals = ShutdownSignals::install();
        tokio::spawn(async move {
            signals.wait().await;
            tracing::info!("shutdown requested; finishing open requests");
            let _ = shutdown_tx.send(true);
        });

        let bound = listener.local_addr()?;
        tracing::info!(address = %bound, base = %base_url, "listening");
        println!("haven listening on {scheme}://{bound} (FHIR base {base_url})");

        let settings = Arc::new(ConnectionSettings {
            max_header_bytes: config.limits.max_header_bytes,
        });
        accept_loop(listener, acceptor, app, settings, shutdown_rx).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// How often the signing keys are read again from the data directory.
const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(60);

/// Picks up `haven keys rotate` without a restart, and lets retired keys drop
/// out of the JWKS once their tokens have expired.
async fn reload_signing_keys(
    auth: Arc<haven_auth::AuthServer>,
    data_dir: std::path::PathBuf,
    clock: Arc<dyn Clock>,
) {
    let mut ticks = tokio::time::interval(KEY_RELOAD_INTERVAL);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let dir = data_dir.clone();
        let now = clock.now();
        match tokio::task::spawn_blocking(move || signing_keys::ensure(&dir, now)).await {
            Ok(Ok((keys, _))) => {
                if keys.kid() != auth.signing_kid() {
                    tracing::info!(kid = keys.kid(), "signing with a rotated key");
                }
                auth.replace_keys(keys);
            }
            Ok(Err(e)) => tracing::error!(error = %e, "the signing keys could not be read again"),
            Err(e) => tracing::error!(error = %e, "reading the signing keys failed"),
        }
    }
}

/// Hides the password of a database URL before it reaches a log or an error.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

struct ConnectionSettings {
    max_header_bytes: usize,
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    app: axum::Router,
    settings: Arc<ConnectionSettings>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Running out of file descriptors and the like is temporary; keep serving.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
        let acceptor = acceptor.clone();
        let app = app.clone();
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _ = stream.set_nodelay(true);
            match acceptor {
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(tls)) => {
                            serve_connection(tls, remote, app, &settings, shutdown).await
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%remote, error = %err, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                    }
                }
                None => serve_connection(stream, remote, app, &settings, shutdown).await,
            }
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still open after the drain timeout; closing them");
        connections.abort_all();
    }
}

async fn serve_connection<S>(
    io: S,
    remote: SocketAddr,
    app: axum::Router,
    settings: &ConnectionSettings,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Handlers can learn the peer address the way axum's own server provides it.
    let service = app.map_request(move |mut request: http::Request<Incoming>| {
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(remote));
        request
    });
    let service = TowerToHyperService::new(service);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(settings.max_header_bytes.max(8192))
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    builder
        .http2()
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.changed() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%remote, error = %err, "connection ended with an error");
    }
}

/// SIGINT and SIGTERM, listened for from the moment of installing.
struct ShutdownSignals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    async fn wait(mut self) {
        async fn next(signal: Option<&mut tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            _ = next(self.interrupt.as_mut()) => {},
            _ = next(self.terminate.as_mut()) => {},
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_are_accepted_and_others_refused() {
        for ok in ["127.0.0.1:8443", "127.1.2.3:1", "[::1]:8443"] {
            check_loopback(ok.parse().unwrap()).unwrap();
        }
        for refused in ["0.0.0.0:8443", "192.168.1.5:8443", "[::]:8443"] {
            assert!(check_loopback(refused.parse().unwrap()).is_err());
        }
    }

    #[test]
    fn the_public_url_is_derived_from_the_bound_port() {
        let url = derived_public_url("https", "127.0.0.1:9443".parse().unwrap());
        assert_eq!(url, "https://localhost:9443");
    }

    #[test]
    fn database_passwords_are_hidden() {
        assert_eq!(
            redact("postgres://haven:secret@db:5432/haven"),
            "postgres://haven:***@db:5432/haven"
        );
        assert_eq!(redact("sqlite:/data/haven.db"), "sqlite:/data/haven.db");
    }
}
