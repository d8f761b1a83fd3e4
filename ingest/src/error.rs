//! The edge's own error types beside [`vitals_auth::ApiError`] (the typed HTTP error shared
//! with the read API): a rejected item of a batch, and [`printable`] for text quoting client input.

use serde::Serialize;

/// One rejected item of a batch: which one, which field, why.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ItemError {
    pub index: usize,
    pub field: String,
    pub code: String,
    pub message: String,
}

/// `s` with every control character (NUL included) written as its `\u{..}` escape: for text that
/// quotes client input and is stored (PostgreSQL text and jsonb refuse NUL) or logged.
pub fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_control_characters_only() {
        assert_eq!(printable("heart_rate"), "heart_rate");
        assert_eq!(printable("a\u{0}b\nc\u{1f}é"), "a\\u{0}b\\u{a}c\\u{1f}é");
    }
}
