//! Access tokens whose signature, issuer and audience this server has already
//! checked, with the claims they carry. A client sends the same bearer token
//! with every request until it expires; checking its Ed25519 signature each
//! time is most of what verifying it costs.
//!
//! Only what the signature proves is remembered: expiry and revocation are
//! still checked on every request. The memory belongs to one key set and is
//! dropped with it, so a rotation that retires a key forgets every token that
//! key verified.

use std::collections::HashMap;
use std::sync::Mutex;

/// How many tokens are remembered. When full the memory starts again empty:
/// bounded, and a burst of distinct tokens costs one check each, as without it.
const CAPACITY: usize = 4096;

pub(crate) struct VerifiedTokens<C> {
    entries: Mutex<HashMap<String, C>>,
}

impl<C: Clone> VerifiedTokens<C> {
    pub(crate) fn new() -> Self {
        VerifiedTokens {
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The claims of `token` if it was verified before, compared in full.
    pub(crate) fn get(&self, token: &str) -> Option<C> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    /// Remembers a token that has just passed every check of its signature.
    pub(crate) fn insert(&self, token: &str, claims: &C) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CAPACITY && !entries.contains_key(token) {
            entries.clear();
        }
        entries.insert(token.to_owned(), claims.clone());
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_found_only_by_its_whole_text() {
        let verified = VerifiedTokens::new();
        verified.insert("aaa.bbb.ccc", &"claims".to_owned());
        assert_eq!(verified.get("aaa.bbb.ccc").as_deref(), Some("claims"));
        assert_eq!(verified.get("aaa.bbb.cc"), None);
        assert_eq!(verified.get("aaa.bbb.ccd"), None);
    }

    #[test]
    fn the_memory_never_holds_more_than_its_capacity() {
        let verified = VerifiedTokens::new();
        for n in 0..CAPACITY {
            verified.insert(&format!("token-{n}"), &n);
        }
        assert_eq!(verified.len(), CAPACITY);
        // Seen again: kept, nothing dropped.
        verified.insert("token-7", &7);
        assert_eq!(verified.len(), CAPACITY);
        verified.insert("one-more", &0);
        assert_eq!(verified.len(), 1);
        assert_eq!(verified.get("token-7"), None);
        assert_eq!(verified.get("one-more"), Some(0));
    }
}
