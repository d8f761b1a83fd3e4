//! A checking pass over a JSON body for keys that appear twice in one object.
//!
//! JSON (RFC 8259) only says names "SHOULD be unique"; `serde_json::Value` silently keeps the last
//! of two. Two parsers that disagree on which one counts (a proxy, a signature check, the client's
//! own log) are a classic smuggling vector, and a client that sends `request_id` twice does not
//! know which one it retried with. The edge therefore refuses such a body. This pass walks the
//! body once with serde's visitor (no tree is built) and stops at the first duplicate.

use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;

use serde_json::{Map, Number, Value};

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

/// Parses `body` as `serde_json::from_slice::<Value>` does (same tree, the last of two equal
/// keys kept, same errors), and says whether some object had a key twice — in the same single
/// pass. Only when it did is the body walked again, by [`first_duplicate_key`], for the path.
pub fn parse_value(body: &[u8]) -> Result<(Value, bool), serde_json::Error> {
    let dup = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = Build { dup: &dup }.deserialize(&mut de)?;
    de.end()?;
    Ok((value, dup.get()))
}

#[derive(Clone, Copy)]
struct Build<'a> {
    dup: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for Build<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Build<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(v) = seq.next_element_seed(self)? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(self)?;
            if out.insert(key, value).is_some() {
                self.dup.set(true);
            }
        }
        Ok(Value::Object(out))
    }
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
    use proptest::prelude::*;

    use super::*;

    /// Random JSON texts, duplicate keys, escapes, odd numbers and broken tails included.
    fn json_text() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            any::<i64>().prop_map(|v| v.to_string()),
            any::<u64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| format!("{v:e}")),
            prop_oneof![Just("1e400".to_owned()), Just("-0".to_owned()), Just("1.5E-3".to_owned()), Just("01".to_owned())],
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            prop_oneof![Just(r#""\u0061\n""#.to_owned()), Just(r#""\ud800""#.to_owned())],
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::vec(
                    (prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just("\\u0061".to_owned()), "[a-c]{0,2}"], inner),
                    0..5
                )
                .prop_map(|kv| format!("{{{}}}", kv.into_iter().map(|(k, v)| format!("\"{k}\": {v}")).collect::<Vec<_>>().join(", "))),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// One pass gives what `serde_json::from_slice` gives (tree or error), and its duplicate
        /// flag says exactly whether the walk finds a duplicate.
        #[test]
        fn parse_value_is_from_slice_plus_the_duplicate_flag(text in json_text(), tail in prop_oneof![Just(""), Just(" "), Just("}"), Just(" x")]) {
            let body = format!("{text}{tail}");
            let ours = parse_value(body.as_bytes());
            let theirs = serde_json::from_slice::<Value>(body.as_bytes());
            match (&ours, &theirs) {
                (Ok((v, dup)), Ok(w)) => {
                    prop_assert_eq!(v, w);
                    prop_assert_eq!(*dup, first_duplicate_key(body.as_bytes()).is_some());
                }
                (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                _ => prop_assert!(false, "{ours:?} vs {theirs:?}"),
            }
        }
    }

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
