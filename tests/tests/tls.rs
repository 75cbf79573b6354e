//! Requirement R1: HTTPS by default, TLS 1.2 and 1.3 only.

use std::process::{Command, Stdio};
use std::sync::Arc;

use haven_e2e::{spawn_haven, Haven, HavenOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, SupportedProtocolVersion};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Connects with a client that offers only the given TLS versions.
async fn handshake(
    haven: &Haven,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> anyhow::Result<(ProtocolVersion, Option<Vec<u8>>)> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(haven.ca_pem.as_deref().expect("TLS server")) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(haven.addr).await?;
    let tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (_, session) = tls.get_ref();
    Ok((
        session.protocol_version().expect("handshake done"),
        session.alpn_protocol().map(<[u8]>::to_vec),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_1_2_client_connects() {
    let haven = spawn_haven(HavenOptions::default()).await.unwrap();
    let (version, _) = handshake(&haven, &[&rustls::version::TLS12], &[])
        .await
        .unwrap();
    assert_eq!(version, ProtocolVersion::TLSv1_2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_1_3_client_connects_and_gets_http2_when_it_asks() {
    let haven = spawn_haven(HavenOptions::default()).await.unwrap();
    let (version, alpn) = handshake(&haven, &[&rustls::version::TLS13], &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(version, ProtocolVersion::TLSv1_3);
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (_, alpn) = handshake(&haven, &[&rustls::version::TLS13], &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_certificate_is_trusted_through_the_generated_ca() {
    let haven = spawn_haven(HavenOptions::default()).await.unwrap();
    let response = haven
        .client()
        .get(haven.url("metadata"))
        .send()
        .await
        .unwrap();
    // The TLS part is what matters here; any HTTP answer proves the chain verified.
    assert!(response.status().as_u16() > 0);
    let stdout = haven.stdout().join("\n");
    assert!(
        stdout.contains(&haven.ca_file().display().to_string()),
        "the CA path is printed: {stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_limited_to_tls_1_1_is_refused() {
    if Command::new("openssl").arg("version").output().is_err() {
        println!("not run: openssl is not installed, and rustls clients cannot offer TLS 1.1");
        return;
    }
    let haven = spawn_haven(HavenOptions::default()).await.unwrap();
    let connect = haven.addr.to_string();
    let run = |version: &str| {
        Command::new("openssl")
            .args(["s_client", version, "-connect", &connect])
            .args(["-servername", "localhost"])
            // Lets this OpenSSL offer old versions at all, so the refusal is the server's.
            .args(["-cipher", "DEFAULT:@SECLEVEL=0"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // The same command with TLS 1.2 succeeds, so a failure below is a real refusal.
    let tls12 = run("-tls1_2");
    assert!(
        tls12.status.success(),
        "openssl with TLS 1.2 should connect: {}",
        String::from_utf8_lossy(&tls12.stderr)
    );
    for old in ["-tls1_1", "-tls1"] {
        let output = run(old);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            !output.status.success(),
            "openssl {old} connected:\n{stdout}"
        );
        // A failed handshake still prints a session summary, but with no cipher.
        assert!(!stdout.contains("New, TLSv1"), "{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_to_the_tls_port_gets_no_answer() {
    let haven = spawn_haven(HavenOptions::default()).await.unwrap();
    let plain = reqwest::Client::new();
    let result = plain
        .get(format!("http://{}/fhir/metadata", haven.addr))
        .send()
        .await;
    match result {
        Err(_) => {}
        Ok(response) => assert!(
            !response.status().is_success(),
            "plain HTTP got {}",
            response.status()
        ),
    }
}
