//! The hash chain over stored audit records (issue 4, tamper evidence).
//!
//! Each record is stored with the hash of its predecessor and its own hash:
//!
//! ```text
//! hash = lowercase hex SHA-256( previous_hash || 0x0A || canonical_json(record) )
//! ```
//!
//! The first record's predecessor is [`GENESIS`]. Changing, removing or
//! inserting a record breaks the chain at that point, and [`verify`] names the
//! first position where it breaks.
//!
//! The chain alone cannot catch an attacker who rewrites a record and then
//! recomputes every later hash: the result is a valid chain. That is caught by
//! anchoring the head hash outside the database (a log line, a signed export, a
//! second system) and comparing the verified head with the anchor.

use aws_lc_rs::digest::{digest, SHA256};
use serde_json::Value;

use crate::canonical::canonical_json;

/// The predecessor hash of the first record: 64 zeros, the width of a SHA-256 in hex.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One stored audit record with its place in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredLink {
    /// The record's position; the store gives consecutive positions.
    pub position: u64,
    pub record: Value,
    /// The `hash` of the record before this one, or [`GENESIS`].
    pub previous_hash: String,
    pub hash: String,
}

/// How the chain is broken at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakKind {
    /// The record (or its stored predecessor hash) does not hash to its stored hash.
    Changed,
    /// Records are missing before this one: its position skips and its
    /// predecessor hash is not the hash of the record before it.
    Removed,
    /// This record does not follow the one before it although the positions
    /// are contiguous, or its position repeats one already seen.
    Inserted,
}

/// The first position at which a chain does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the audit chain breaks at position {position}: {}", describe(*.kind))]
pub struct ChainBreak {
    pub position: u64,
    pub kind: BreakKind,
}

fn describe(kind: BreakKind) -> &'static str {
    match kind {
        BreakKind::Changed => "the record was changed",
        BreakKind::Removed => "records before it were removed",
        BreakKind::Inserted => "the record was inserted",
    }
}

/// The hash of a record given its predecessor's hash and its canonical form.
pub fn link_hash(previous_hash: &str, canonical_record: &str) -> String {
    let mut input = Vec::with_capacity(previous_hash.len() + 1 + canonical_record.len());
    input.extend_from_slice(previous_hash.as_bytes());
    // The separator keeps the boundary between the two parts unambiguous.
    input.push(b'\n');
    input.extend_from_slice(canonical_record.as_bytes());
    hex(digest(&SHA256, &input).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Links `record` after `previous` (or after [`GENESIS`] when it is the first).
pub fn append(previous: Option<&StoredLink>, position: u64, record: Value) -> StoredLink {
    let previous_hash = previous.map_or(GENESIS, |p| p.hash.as_str()).to_owned();
    let hash = link_hash(&previous_hash, &canonical_json(&record));
    StoredLink {
        position,
        record,
        previous_hash,
        hash,
    }
}

/// Walks a whole chain, given in position order from its first record, and
/// returns how many records verified, or the first break.
///
/// Each link is checked against the link before it, in this order:
///
/// 1. Its position repeats or goes back (not greater than the previous one):
///    [`BreakKind::Inserted`].
/// 2. Its position skips (more than one past the previous one) and its
///    `previous_hash` is not the previous link's `hash`: [`BreakKind::Removed`].
///    A skip whose hashes still link is only a gap in numbering and passes.
/// 3. Its record does not hash, with its own `previous_hash`, to its `hash`:
///    [`BreakKind::Changed`].
/// 4. Its `previous_hash` is not the previous link's `hash` (for the first link,
///    not [`GENESIS`]): [`BreakKind::Inserted`] — except for the first link,
///    where it means the start of the chain is gone: [`BreakKind::Removed`].
pub fn verify<'a>(links: impl IntoIterator<Item = &'a StoredLink>) -> Result<u64, ChainBreak> {
    let mut verifier = Verifier::default();
    for link in links {
        verifier.push(link)?;
    }
    Ok(verifier.verified())
}

/// [`verify`] one link at a time, for chains read page by page: it keeps only
/// the position and hash of the last link.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    before: Option<(u64, String)>,
    verified: u64,
}

impl Verifier {
    /// Checks the next link; after a break the verifier must not be used again.
    pub fn push(&mut self, link: &StoredLink) -> Result<(), ChainBreak> {
        let broken = |kind| ChainBreak {
            position: link.position,
            kind,
        };
        let expected_previous = self.before.as_ref().map_or(GENESIS, |(_, h)| h.as_str());
        let follows = link.previous_hash == expected_previous;
        if let Some((position, _)) = &self.before {
            if link.position <= *position {
                return Err(broken(BreakKind::Inserted));
            }
            if link.position > position + 1 && !follows {
                return Err(broken(BreakKind::Removed));
            }
        }
        if link_hash(&link.previous_hash, &canonical_json(&link.record)) != link.hash {
            return Err(broken(BreakKind::Changed));
        }
        if !follows {
            let kind = if self.before.is_some() {
                BreakKind::Inserted
            } else {
                BreakKind::Removed
            };
            return Err(broken(kind));
        }
        self.before = Some((link.position, link.hash.clone()));
        self.verified += 1;
        Ok(())
    }

    /// How many links verified so far.
    pub fn verified(&self) -> u64 {
        self.verified
    }

    /// The hash of the last verified link ([`GENESIS`] before any): the value
    /// to compare with an anchor kept outside the database.
    pub fn head(&self) -> &str {
        self.before.as_ref().map_or(GENESIS, |(_, h)| h.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(len: u64) -> Vec<StoredLink> {
        let mut links: Vec<StoredLink> = Vec::new();
        for position in 1..=len {
            let record = json!({"resourceType": "AuditEvent", "id": format!("a{position}")});
            let link = append(links.last(), position, record);
            links.push(link);
        }
        links
    }

    #[test]
    fn an_untouched_chain_of_one_hundred_records_verifies() {
        assert_eq!(verify(&chain(100)), Ok(100));
    }

    #[test]
    fn an_empty_chain_verifies_with_no_records() {
        assert_eq!(verify(&[]), Ok(0));
    }

    #[test]
    fn the_first_link_follows_genesis_and_hashes_match_the_formula() {
        let links = chain(2);
        assert_eq!(links[0].previous_hash, GENESIS);
        let canonical = r#"{"id":"a1","resourceType":"AuditEvent"}"#;
        assert_eq!(links[0].hash, link_hash(GENESIS, canonical));
        assert_eq!(links[1].previous_hash, links[0].hash);
        assert_eq!(links[0].hash.len(), 64);
        assert!(links[0].hash.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn link_hash_is_sha256_over_previous_newline_and_record() {
        // Expected values from `printf 'a\nb' | sha256sum` and its GENESIS analogue.
        assert_eq!(
            link_hash("a", "b"),
            "7e18f737311b2dc3b2f269dd78396b0351f14fb66efa879f768cb23181883c78"
        );
        assert_eq!(
            link_hash(GENESIS, r#"{"id":"a1"}"#),
            "821623879fe4ab21b085fc5ccb90fff1ff1dbc6d8383f3075d6d9c1004e6929e"
        );
    }

    #[test]
    fn member_order_in_a_stored_record_does_not_break_the_chain() {
        let mut links = chain(3);
        links[1].record = json!({"id": "a2", "resourceType": "AuditEvent"});
        assert_eq!(verify(&links), Ok(3));
    }

    #[test]
    fn changing_one_record_is_reported_as_changed_at_its_position() {
        let mut links = chain(100);
        links[41].record["id"] = json!("forged");
        assert_eq!(
            verify(&links),
            Err(ChainBreak {
                position: 42,
                kind: BreakKind::Changed
            })
        );
    }

    #[test]
    fn deleting_one_record_is_reported_as_removed_after_the_gap() {
        let mut links = chain(100);
        links.remove(49);
        assert_eq!(
            verify(&links),
            Err(ChainBreak {
                position: 51,
                kind: BreakKind::Removed
            })
        );
    }

    #[test]
    fn deleting_the_first_record_is_reported_as_removed() {
        let links = chain(5);
        assert_eq!(
            verify(&links[1..]),
            Err(ChainBreak {
                position: 2,
                kind: BreakKind::Removed
            })
        );
    }

    #[test]
    fn a_forged_record_with_a_wrong_predecessor_is_reported_as_inserted() {
        let mut links = chain(10);
        // A body that hashes correctly but claims the wrong predecessor, slotted in
        // at position 5 with the later records renumbered.
        let forged = append(None, 5, json!({"resourceType": "AuditEvent", "id": "x"}));
        for link in &mut links[4..] {
            link.position += 1;
        }
        links.insert(4, forged);
        assert_eq!(
            verify(&links),
            Err(ChainBreak {
                position: 5,
                kind: BreakKind::Inserted
            })
        );
    }

    #[test]
    fn a_record_that_repeats_a_position_is_reported_as_inserted() {
        let mut links = chain(10);
        let forged = append(Some(&links[6]), 7, json!({"id": "x"}));
        links.insert(7, forged);
        assert_eq!(
            verify(&links),
            Err(ChainBreak {
                position: 7,
                kind: BreakKind::Inserted
            })
        );
    }

    #[test]
    fn the_first_of_several_breaks_is_named() {
        let mut links = chain(20);
        links[15].record["id"] = json!("later");
        links.remove(7);
        assert_eq!(
            verify(&links),
            Err(ChainBreak {
                position: 9,
                kind: BreakKind::Removed
            })
        );
    }

    #[test]
    fn a_break_reads_as_a_sentence() {
        let text = ChainBreak {
            position: 3,
            kind: BreakKind::Changed,
        }
        .to_string();
        assert_eq!(
            text,
            "the audit chain breaks at position 3: the record was changed"
        );
    }
}
