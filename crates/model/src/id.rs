//! Logical ids and version ids.

/// Whether `id` is a valid FHIR logical id: `[A-Za-z0-9\-\.]{1,64}` (R4 datatypes, `id`).
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A fresh server-assigned id: a v4 UUID, 36 characters, within the 64 allowed.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A fresh server-assigned id for records written in time order and never
/// renamed (AuditEvents, Provenance): a v7 UUID, whose leading bits are the
/// creation time in milliseconds, so a database's index of these ids grows at
/// one end instead of touching a random page per insert. The time it reveals
/// is already in the record (`recorded`).
pub fn new_time_ordered_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_fhir_id_pattern() {
        assert!(is_valid_id("abc-123.DEF"));
        assert!(is_valid_id(&"a".repeat(64)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(&"a".repeat(65)));
        assert!(!is_valid_id("a_b"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("é"));
    }

    #[test]
    fn new_ids_are_valid_and_distinct() {
        let a = new_id();
        let b = new_id();
        assert!(is_valid_id(&a));
        assert_ne!(a, b);
    }

    #[test]
    fn time_ordered_ids_are_valid_and_sort_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..1000).map(|_| new_time_ordered_id()).collect();
        assert!(ids.iter().all(|id| is_valid_id(id) && id.len() == 36));
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids);
    }
}
