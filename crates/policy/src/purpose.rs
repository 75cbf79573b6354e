//! Purpose of use (v3 ActReason, the PurposeOfUse value set): why a token's
//! holder asks for data. Consent provisions and audit records speak of it.

/// v3 ActReason, where PurposeOfUse codes live.
pub const PURPOSE_OF_USE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// Break the glass: emergency access that overrides consent and labels.
pub const BREAK_THE_GLASS: &str = "BTG";
/// Treatment: the purpose a token has when none was asked for.
pub const TREATMENT: &str = "TREAT";

/// The PurposeOfUse codes Haven accepts, with their displays.
pub const PURPOSES: &[(&str, &str)] = &[
    ("TREAT", "treatment"),
    ("ETREAT", "emergency treatment"),
    ("BTG", "break the glass"),
    ("HPAYMT", "healthcare payment"),
    ("COVERAGE", "coverage under policy or program"),
    ("HOPERAT", "healthcare operations"),
    ("HRESCH", "healthcare research"),
    ("CLINTRL", "clinical trial research"),
    ("PUBHLTH", "public health"),
    ("HMARKT", "healthcare marketing"),
    ("HLEGAL", "legal"),
    ("PATRQT", "patient requested"),
    ("FAMRQT", "family requested"),
    ("PWATRNY", "power of attorney"),
    ("HSYSADMIN", "health system administration"),
    ("HDIRECT", "directory"),
];

/// The display of a known purpose; `None` for a code Haven does not accept.
pub fn display(code: &str) -> Option<&'static str> {
    PURPOSES.iter().find(|(c, _)| *c == code).map(|(_, d)| *d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_purposes_have_displays_and_others_do_not() {
        assert_eq!(display("HRESCH"), Some("healthcare research"));
        assert_eq!(display("BTG"), Some("break the glass"));
        assert_eq!(display("treat"), None);
    }
}
