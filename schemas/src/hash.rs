//! The canonical payload hash for request idempotency (DOMAIN.md: `request_id` + hash of the
//! canonical payload). Two bodies that differ only in key order, whitespace or number spelling
//! (`1`, `1.0`, `1e0`) hash the same; any difference in content hashes differently.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Hex SHA-256 of the canonical JSON form of `value`.
pub fn payload_hash(value: &Value) -> String {
    let mut out = String::with_capacity(256);
    canonical_json(value, &mut out);
    hex::encode(Sha256::digest(out.as_bytes()))
}

/// Writes `value` as canonical JSON: object keys sorted by code point, no whitespace, numbers in
/// one spelling (integral values below 2^53 as integers, others in shortest round-trip form).
pub fn canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            use std::fmt::Write;
            // Writing to a String cannot fail.
            let _ = if let Some(i) = n.as_i64() {
                write!(out, "{i}")
            } else if let Some(u) = n.as_u64() {
                write!(out, "{u}")
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                    write!(out, "{}", f as i64)
                } else {
                    write!(out, "{f:e}")
                }
            };
        }
        Value::String(s) => push_json_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_string(out, k);
                out.push(':');
                canonical_json(&map[k], out);
            }
            out.push('}');
        }
    }
}

/// `s` as a JSON string exactly as serde_json writes it (`"` and `\\` escaped, the control
/// characters as `\b \f \n \r \t` or `\u00xx`, everything else verbatim), without the copy
/// and allocation of going through `Value::to_string`.
fn push_json_string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        plain = i + 1;
        if short.is_empty() {
            out.push_str("\\u00");
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        } else {
            out.push_str(short);
        }
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn order_whitespace_and_number_spelling_do_not_matter() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": [1.0, 2.5, "x"], "c": {"z": null, "y": true}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"c":{"y":true,"z":null},"a":[1,2.5e0,"x"],"b":1e0}"#).unwrap();
        assert_eq!(payload_hash(&a), payload_hash(&b));
    }

    /// Stored hashes must keep matching across releases (an edge upgraded mid-retry would
    /// otherwise answer `idempotency_key_reused`): the canonical form is pinned byte for byte.
    #[test]
    fn the_canonical_form_is_pinned() {
        let v: Value = serde_json::from_str(
            r#"{"request_id": "r-\u00e9\n\"q\"", "samples": [{"value": 61.0, "big": 1e300, "neg": -0.5, "u": 18446744073709551615, "t": [true, false, null], "\u0001k": "\u001f"}], "backfill": false}"#,
        )
        .unwrap();
        let mut out = String::new();
        canonical_json(&v, &mut out);
        assert_eq!(out, "{\"backfill\":false,\"request_id\":\"r-\u{e9}\\n\\\"q\\\"\",\"samples\":[{\"\\u0001k\":\"\\u001f\",\"big\":1e300,\"neg\":-5e-1,\"t\":[true,false,null],\"u\":18446744073709551615,\"value\":61}]}");
        assert_eq!(payload_hash(&v), "eac094b32aba49c5f7cab96b9db41b5988d0c8317208383feb39a4e52d638b0b");
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let mut all: String = (0u32..0x80).filter_map(char::from_u32).collect();
        all.push_str("é€😀\u{2028}\u{fffd}");
        for s in [String::new(), all.clone(), all.chars().rev().collect(), "plain".into(), "\"\\".into()] {
            let mut out = String::new();
            push_json_string(&mut out, &s);
            assert_eq!(out, serde_json::to_string(&s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn any_content_change_changes_the_hash() {
        let base = json!({"samples": [{"value": 61, "unit": "bpm"}]});
        let other = json!({"samples": [{"value": 62, "unit": "bpm"}]});
        let reordered = json!({"samples": [{"unit": "bpm", "value": 61}]});
        assert_ne!(payload_hash(&base), payload_hash(&other));
        assert_eq!(payload_hash(&base), payload_hash(&reordered));
        assert_eq!(payload_hash(&base).len(), 64);
    }
}
