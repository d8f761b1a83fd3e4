//! A checking pass over a JSON body for keys that appear twice in one object.
//!
//! JSON (RFC 8259) only says names "SHOULD be unique"; `serde_json::Value` silently keeps the last
//! of two. Two parsers that disagree on which one counts (a proxy, a signature check, the client's
//! own log) are a classic smuggling vector, and a client that sends `request_id` twice does not
//! know which one it retried with. The edge therefore refuses such a body. This pass walks the
//! body once with serde's visitor (no tree is built) and stops at the first duplicate.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// The path of the first key that appears twice in one object (e.g.
/// `changes[1].privacy.health_upload_allowed`), or `None`. A body that is not JSON at all yields
/// `None` too: the caller's parse reports that.
pub fn first_duplicate_key(body: &[u8]) -> Option<String> {
    let mut found = None;
    let mut de = serde_json::Deserializer::from_slice(body);
    let _ = Walk { path: String::new(), found: &mut found }.deserialize(&mut de);
    found
}

struct Walk<'a> {
    path: String,
    found: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Walk { path, found } = self;
        let mut i = 0usize;
        while seq.next_element_seed(Walk { path: format!("{path}[{i}]"), found: &mut *found })?.is_some() {
            i += 1;
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Walk { path, found } = self;
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let at = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
            if !seen.insert(key) {
                *found = Some(at);
                return Err(de::Error::custom("duplicate key"));
            }
            map.next_value_seed(Walk { path: at, found: &mut *found })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_duplicate_with_its_path() {
        assert_eq!(first_duplicate_key(br#"{"a": 1, "b": [1, {"c": 2}], "d": null}"#), None);
        assert_eq!(first_duplicate_key(br#"{"request_id": "a", "x": 1, "request_id": "b"}"#).as_deref(), Some("request_id"));
        assert_eq!(first_duplicate_key(br#"{"s": [{"v": 1}, {"v": 1, "m": {"k": 1, "k": 2}}]}"#).as_deref(), Some("s[1].m.k"));
        // The same key in two different objects is fine; escapes spell the same key.
        assert_eq!(first_duplicate_key(br#"[{"a": 1}, {"a": 2}]"#), None);
        assert_eq!(first_duplicate_key(br#"{"a": 1, "\u0061": 2}"#).as_deref(), Some("a"));
        assert_eq!(first_duplicate_key(b"not json"), None);
    }
}
