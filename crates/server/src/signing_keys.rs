//! The authorization server's signing keys on disk, in `<data-dir>/keys/`:
//! `signing.pem` (the current private key, readable by its owner only) and
//! `retired.json` (public keys of earlier ones, kept while their tokens live).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use haven_auth::keys::{generate_signing_key, public_jwks, KeySet, RetiredKey};
use time::OffsetDateTime;

const CURRENT: &str = "signing.pem";
const RETIRED: &str = "retired.json";

/// Access tokens live at most an hour; retired keys are kept that long.
pub const LONGEST_TOKEN_LIFETIME: time::Duration = time::Duration::hours(1);

fn keys_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("keys")
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn read_retired(dir: &Path) -> Result<Vec<RetiredKey>> {
    let path = dir.join(RETIRED);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The key set, creating the first key when there is none. Returns whether it
/// was created.
pub fn ensure(data_dir: &Path, now: OffsetDateTime) -> Result<(KeySet, bool)> {
    let dir = keys_dir(data_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let current = dir.join(CURRENT);
    let created = !current.exists();
    if created {
        write_private(&current, &generate_signing_key()?)?;
    }
    let pem = std::fs::read_to_string(&current)
        .with_context(|| format!("reading {}", current.display()))?;
    let keys = KeySet::new(&pem, &read_retired(&dir)?, now, LONGEST_TOKEN_LIFETIME)
        .with_context(|| format!("loading {}", current.display()))?;
    Ok((keys, created))
}

/// `haven keys rotate`: a new signing key; the old one's public half stays in
/// the JWKS until tokens it signed have expired. Returns the new key id.
pub fn rotate(data_dir: &Path, now: OffsetDateTime) -> Result<String> {
    let (_, _) = ensure(data_dir, now)?;
    let dir = keys_dir(data_dir);
    let current = dir.join(CURRENT);
    let old = std::fs::read_to_string(&current)
        .with_context(|| format!("reading {}", current.display()))?;
    let mut retired: Vec<RetiredKey> = read_retired(&dir)?
        .into_iter()
        .filter(|k| k.retired_at + LONGEST_TOKEN_LIFETIME > now)
        .collect();
    // Both halves of the old key set: its RSA key and its access-token key.
    retired.extend(public_jwks(&old)?.into_iter().map(|jwk| RetiredKey {
        jwk,
        retired_at: now,
    }));
    let new = generate_signing_key()?;
    // The retired list is written first: a crash in between leaves the old key
    // current and also listed, which is harmless.
    std::fs::write(dir.join(RETIRED), serde_json::to_string_pretty(&retired)?)
        .context("writing the retired keys")?;
    write_private(&current, &new)?;
    let keys = KeySet::new(&new, &retired, now, LONGEST_TOKEN_LIFETIME)?;
    Ok(keys.kid().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-05-01 09:00 UTC);

    #[test]
    fn the_first_start_creates_a_key_and_later_starts_reuse_it() {
        let dir = tempfile::tempdir().unwrap();
        let now = NOW;
        let (first, created) = ensure(dir.path(), now).unwrap();
        assert!(created);
        let (second, created) = ensure(dir.path(), now).unwrap();
        assert!(!created);
        assert_eq!(first.kid(), second.kid());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("keys/signing.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the private key is private");
        }
    }

    #[test]
    fn rotation_keeps_the_old_public_key_until_its_tokens_expire() {
        let dir = tempfile::tempdir().unwrap();
        let now = NOW;
        let (old, _) = ensure(dir.path(), now).unwrap();
        let new_kid = rotate(dir.path(), now).unwrap();
        assert_ne!(new_kid, old.kid());
        let (keys, _) = ensure(dir.path(), now).unwrap();
        assert_eq!(keys.kid(), new_kid);
        let kids: Vec<_> = keys.jwks()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect();
        assert!(kids.contains(&old.kid().to_string()));
        assert!(kids.contains(&old.access_kid().to_string()));
        assert_eq!(kids.len(), 4);
        let (later, _) = ensure(dir.path(), now + LONGEST_TOKEN_LIFETIME).unwrap();
        assert_eq!(later.jwks()["keys"].as_array().unwrap().len(), 2);
    }
}
