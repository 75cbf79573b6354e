//! TLS for `haven serve` (requirement R1): rustls with the aws-lc-rs provider, TLS 1.2 and
//! 1.3 only, ALPN `h2` and `http/1.1`.
//!
//! Without a certificate from the operator, the first start creates a local CA and a
//! `localhost` certificate signed by it in `<data-dir>/tls/`; later starts reuse them,
//! so a client that trusts `ca.pem` once keeps trusting the server.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::version::{TLS12, TLS13};
use rustls::ServerConfig;
use time::OffsetDateTime;

/// The files of the generated local certificate authority and server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCa {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl LocalCa {
    pub fn in_dir(tls_dir: &Path) -> Self {
        Self {
            ca_cert: tls_dir.join("ca.pem"),
            ca_key: tls_dir.join("ca-key.pem"),
            server_cert: tls_dir.join("localhost.pem"),
            server_key: tls_dir.join("localhost-key.pem"),
        }
    }
}

/// The subject of the local CA; the same on every start so that a server certificate
/// re-issued from the stored CA key chains to the stored CA certificate.
fn ca_params(now: OffsetDateTime) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Haven local CA");
    name.push(DnType::OrganizationName, "Haven");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(10 * 365);
    Ok(params)
}

fn server_params(now: OffsetDateTime) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "localhost");
    params.distinguished_name = name;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - time::Duration::days(1);
    // Below the 825 days some clients accept for a server certificate.
    params.not_after = now + time::Duration::days(800);
    Ok(params)
}

/// Creates the local CA and the `localhost` certificate if they are missing and
/// returns their paths; `now` (from the clock) starts their validity. Existing
/// files are reused untouched.
pub fn ensure_local_ca(tls_dir: &Path, now: OffsetDateTime) -> Result<(LocalCa, bool)> {
    let files = LocalCa::in_dir(tls_dir);
    if files.ca_cert.is_file()
        && files.ca_key.is_file()
        && files.server_cert.is_file()
        && files.server_key.is_file()
    {
        return Ok((files, false));
    }
    fs::create_dir_all(tls_dir).with_context(|| format!("creating {}", tls_dir.display()))?;
    fs::set_permissions(tls_dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", tls_dir.display()))?;

    let (ca_key, ca_cert) = if files.ca_cert.is_file() && files.ca_key.is_file() {
        // Keep a CA that clients may already trust; only the server certificate is new.
        let pem = fs::read_to_string(&files.ca_key)
            .with_context(|| format!("reading {}", files.ca_key.display()))?;
        let key = KeyPair::from_pem(&pem)
            .with_context(|| format!("parsing {}", files.ca_key.display()))?;
        let cert = ca_params(now)?.self_signed(&key)?;
        (key, cert)
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params(now)?.self_signed(&key)?;
        write_private(&files.ca_key, &key.serialize_pem())?;
        write_public(&files.ca_cert, &cert.pem())?;
        (key, cert)
    };

    let server_key = KeyPair::generate()?;
    let server_cert = server_params(now)?.signed_by(&server_key, &ca_cert, &ca_key)?;
    write_private(&files.server_key, &server_key.serialize_pem())?;
    write_public(&files.server_cert, &server_cert.pem())?;
    Ok((files, true))
}

/// Writes a key readable by its owner only, from the moment the file exists.
pub(crate) fn write_private(path: &Path, contents: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // The mode above applies only to new files; an older file may have been wider.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

fn write_public(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// The rustls configuration for a certificate chain and key in PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificate {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13, &TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate does not match its private key")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_model::clock::{Clock, SystemClock};

    fn ensure_local_ca(tls_dir: &Path) -> Result<(LocalCa, bool)> {
        super::ensure_local_ca(tls_dir, SystemClock.now())
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_first_start_creates_a_ca_and_a_server_certificate_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (files, created) = ensure_local_ca(&dir.path().join("tls")).unwrap();
        assert!(created);
        for path in [&files.ca_cert, &files.server_cert] {
            assert!(fs::read_to_string(path)
                .unwrap()
                .contains("BEGIN CERTIFICATE"));
        }
        assert_eq!(mode(&files.ca_key), 0o600);
        assert_eq!(mode(&files.server_key), 0o600);
        server_config(&files.server_cert, &files.server_key).unwrap();
    }

    #[test]
    fn later_starts_reuse_the_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        let (files, _) = ensure_local_ca(&tls_dir).unwrap();
        let before: Vec<String> = [&files.ca_cert, &files.ca_key, &files.server_cert]
            .iter()
            .map(|p| fs::read_to_string(p).unwrap())
            .collect();
        let (again, created) = ensure_local_ca(&tls_dir).unwrap();
        assert!(!created);
        assert_eq!(files, again);
        let after: Vec<String> = [&files.ca_cert, &files.ca_key, &files.server_cert]
            .iter()
            .map(|p| fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn a_lost_server_certificate_is_reissued_under_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        let (files, _) = ensure_local_ca(&tls_dir).unwrap();
        let ca_before = fs::read_to_string(&files.ca_cert).unwrap();
        fs::remove_file(&files.server_cert).unwrap();
        let (_, created) = ensure_local_ca(&tls_dir).unwrap();
        assert!(created);
        assert_eq!(fs::read_to_string(&files.ca_cert).unwrap(), ca_before);
        assert!(files.server_cert.is_file());
    }

    #[test]
    fn a_certificate_that_does_not_match_its_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = ensure_local_ca(&dir.path().join("tls")).unwrap();
        assert!(server_config(&files.server_cert, &files.ca_key).is_err());
    }
}
