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
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                    out.push_str(&(f as i64).to_string());
                } else {
                    out.push_str(&format!("{f:e}"));
                }
            }
        }
        Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
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
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&map[k], out);
            }
            out.push('}');
        }
    }
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
