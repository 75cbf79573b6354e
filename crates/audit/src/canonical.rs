//! The canonical JSON text of a record, the form the hash chain hashes.
//!
//! It follows the JSON Canonicalization Scheme (RFC 8785) for everything a FHIR
//! resource contains:
//!
//! - object members are sorted by the UTF-16 code units of their names (§3.2.3);
//! - there is no whitespace between tokens (§3.2.1);
//! - strings escape only `"`, `\` and the control characters below U+0020, using
//!   the short forms `\b \t \n \f \r` where they exist and `\u00xx` with lowercase
//!   hex otherwise; everything else is written as UTF-8 (§3.2.2.2);
//! - numbers that are not integers take the shortest decimal digits that round
//!   trip (serde_json's), laid out as ECMAScript's `Number.prototype.toString`
//!   would (§3.2.2.3), so `1E30` becomes `1e+30` and `4.50` becomes `4.5`.
//!
//! Two departures, both deliberate:
//!
//! - Integers that serde_json holds as `i64` or `u64` are printed exactly, even
//!   beyond 2^53 where RFC 8785 would round them through a double. The record is
//!   hashed as serde_json reads it back, so exactness is what keeps it stable.
//! - FHIR decimals are kept as serde_json gives them: without the
//!   `arbitrary_precision` feature a decimal is a double, so `1.50` and `1.5`
//!   canonicalise alike. Precision written by a client is not part of the hash.
//!   What the chain needs is that reading a stored record back always gives
//!   the same double, and it does.

use serde_json::Value;
use std::fmt::Write;

/// Writes `value` in its canonical form; equal JSON values give equal text
/// whatever the order of their object members.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(members) => {
            // RFC 8785 §3.2.3 orders names by UTF-16 code units, which differs from
            // byte order for characters above U+FFFF versus U+E000..U+FFFF.
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, (name, member)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, name);
                out.push(':');
                write_value(out, member);
            }
            out.push('}');
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_number(out: &mut String, n: &serde_json::Number) {
    if n.is_i64() || n.is_u64() {
        out.push_str(&n.to_string());
        return;
    }
    match n.as_f64() {
        Some(f) => write_double(out, f),
        // Unreachable without arbitrary_precision; keep serde_json's text then.
        None => out.push_str(&n.to_string()),
    }
}

/// Lays out a finite double as ECMAScript does (ECMA-262 Number::toString),
/// starting from the shortest round-tripping digits serde_json prints.
fn write_double(out: &mut String, f: f64) {
    if f == 0.0 {
        // Covers -0, which RFC 8785 writes as 0.
        out.push('0');
        return;
    }
    let text = serde_json::Number::from_f64(f)
        .map(|n| n.to_string())
        .unwrap_or_default();
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all: String = whole.chars().chain(fraction.chars()).collect();
    let leading = all.len() - all.trim_start_matches('0').len();
    let digits = all.trim_start_matches('0').trim_end_matches('0');
    // The value is 0.<digits> x 10^point, as in ECMA-262's k, n and s.
    let point = whole.len() as i32 + exponent - leading as i32;
    let k = digits.len() as i32;

    if negative {
        out.push('-');
    }
    if k <= point && point <= 21 {
        out.push_str(digits);
        out.extend(std::iter::repeat_n('0', (point - k) as usize));
    } else if 0 < point && point <= 21 {
        out.push_str(&digits[..point as usize]);
        out.push('.');
        out.push_str(&digits[point as usize..]);
    } else if -6 < point && point <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-point) as usize));
        out.push_str(digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = point - 1;
        let _ = write!(out, "e{}{}", if e < 0 { '-' } else { '+' }, e.abs());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).expect("test JSON parses")
    }

    #[test]
    fn member_order_does_not_change_the_canonical_form() {
        let a = parse(r#"{"b": 1, "a": {"y": true, "x": null}}"#);
        let b = parse(r#"{"a": {"x": null, "y": true}, "b": 1}"#);
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":null,"y":true},"b":1}"#);
    }

    #[test]
    fn nested_arrays_keep_their_order_and_their_objects_are_sorted() {
        let value = json!({"z": [3, [2, 1], {"b": [], "a": {}}], "a": "first"});
        assert_eq!(
            canonical_json(&value),
            r#"{"a":"first","z":[3,[2,1],{"a":{},"b":[]}]}"#
        );
    }

    #[test]
    fn names_are_ordered_by_utf16_code_units_not_bytes() {
        // U+1F600 is D83D DE00 in UTF-16, so it sorts before U+FB33 (which it
        // follows in UTF-8 byte order).
        let value = json!({"\u{fb33}": 1, "\u{1f600}": 2, "a": 3});
        assert_eq!(
            canonical_json(&value),
            "{\"a\":3,\"\u{1f600}\":2,\"\u{fb33}\":1}"
        );
    }

    #[test]
    fn strings_escape_only_quotes_backslashes_and_control_characters() {
        let value = json!("q\" b\\ \u{8}\t\n\u{c}\r \u{1} \u{1f} \u{7f} é € /");
        assert_eq!(
            canonical_json(&value),
            "\"q\\\" b\\\\ \\b\\t\\n\\f\\r \\u0001 \\u001f \u{7f} é € /\""
        );
    }

    #[test]
    // The RFC's input has more digits than a double holds, on purpose.
    #[allow(clippy::excessive_precision)]
    fn the_rfc_8785_sample_canonicalises_as_the_rfc_shows() {
        // RFC 8785 §3.2.2 input and its §3.2.3 output. The numbers are built from
        // Rust literals: serde_json's default parser may land one unit in the last
        // place away from the nearest double for long decimals such as the first.
        let mut input = parse(
            r#"{
              "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
              "literals": [null, true, false]
            }"#,
        );
        input["numbers"] = json!([333333333.33333329_f64, 1E30, 4.50, 2e-3, 1e-27]);
        let expected = concat!(
            r#"{"literals":[null,true,false],"#,
            r#""numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"#,
            "\"string\":\"\u{20ac}$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"}"
        );
        assert_eq!(canonical_json(&input), expected);
    }

    #[test]
    fn numbers_follow_the_ecmascript_layout() {
        let cases = [
            ("1.0", "1"),
            ("-0.0", "0"),
            ("100", "100"),
            ("-7", "-7"),
            ("18446744073709551615", "18446744073709551615"),
            ("1e20", "100000000000000000000"),
            ("1e21", "1e+21"),
            ("123.456", "123.456"),
            ("0.000001", "0.000001"),
            ("0.0000001", "1e-7"),
            ("-1.5e-10", "-1.5e-10"),
            ("2.5e25", "2.5e+25"),
        ];
        for (input, expected) in cases {
            assert_eq!(canonical_json(&parse(input)), expected, "for {input}");
        }
    }
}
