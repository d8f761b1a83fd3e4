//! The one set of validation rules for what vitals accepts, used by the ingest edge (a rejected
//! item is a 4xx naming its field) and by every processor (a record that reaches a lane without
//! going through the edge, or written before a rule existed, has exactly its bad units refused:
//! one sample, one deletion, one change — the rest of the record is kept).
//!
//! The rules are about one unit on its own (no clock, no user state): identifiers, text,
//! intervals, time zones, the catalog. What depends on "now" (timestamps in the future, before
//! 2000) stays at the edge.

use crate::catalog::Catalog;
use crate::{Deletion, DomainChange, DomainChangeKind, Sample};

/// The longest interval one sample may cover, and one session: 24 hours. A longer sample is a
/// client bug (a steps sample "since 2000") that no daily figure could use honestly.
pub const MAX_SAMPLE_MS: i64 = 24 * 3600 * 1000;
pub const MAX_SESSION_MS: i64 = 24 * 3600 * 1000;
/// Identifiers (sources, record, change, session and product ids): 1..=256 bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Free text (product names and categories, metadata values): at most 256 bytes.
pub const MAX_TEXT_BYTES: usize = 256;
/// Metadata: at most 32 entries, keys of at most 64 bytes.
pub const MAX_METADATA_ENTRIES: usize = 32;
pub const MAX_METADATA_KEY_BYTES: usize = 64;

/// Why one unit is refused: a stable code, the field at fault (relative to the unit, e.g.
/// `session.product_id`), and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message} ({code})")]
pub struct Violation {
    pub field: String,
    pub code: &'static str,
    pub message: String,
}

fn violation(field: &str, code: &'static str, message: impl Into<String>) -> Violation {
    Violation { field: field.to_owned(), code, message: message.into() }
}

/// Text holds no control character (C0, DEL, C1: NUL, U+001F, ...): they break storage (a NUL
/// is not valid in PostgreSQL text) and vitals' own key separators.
fn printable(s: &str) -> bool {
    // The common case first: printable ASCII only, a byte test (no UTF-8 decoding).
    s.bytes().all(|b| (0x20..0x7f).contains(&b)) || !s.chars().any(char::is_control)
}

/// An identifier: 1..=256 bytes, no control characters.
pub fn id(field: &str, s: &str) -> Result<(), Violation> {
    if s.is_empty() || s.len() > MAX_ID_BYTES || !printable(s) {
        return Err(violation(field, "invalid_field", format!("`{field}` must be 1..={MAX_ID_BYTES} bytes of printable characters")));
    }
    Ok(())
}

/// Optional free text: at most 256 bytes, no control characters.
pub fn text(field: &str, s: &str) -> Result<(), Violation> {
    if s.len() > MAX_TEXT_BYTES || !printable(s) {
        return Err(violation(field, "invalid_field", format!("`{field}` must be at most {MAX_TEXT_BYTES} bytes of printable characters")));
    }
    Ok(())
}

/// A zone: an IANA name known to the tz database, `UTC`/`Z`, or a fixed offset `±HH:MM`.
pub fn valid_time_zone(tz: &str) -> bool {
    if tz == "UTC" || tz == "Z" {
        return true;
    }
    if tz.parse::<chrono_tz::Tz>().is_ok() {
        return true;
    }
    let b = tz.as_bytes();
    b.len() == 6
        && (b[0] == b'+' || b[0] == b'-')
        && b[3] == b':'
        && tz[1..3].parse::<u32>().is_ok_and(|h| h <= 14)
        && tz[4..6].parse::<u32>().is_ok_and(|m| m < 60)
}

fn time_zone(field: &str, tz: &str) -> Result<(), Violation> {
    if !valid_time_zone(tz) {
        return Err(invalid_time_zone(field, tz));
    }
    Ok(())
}

fn invalid_time_zone(field: &str, tz: &str) -> Violation {
    violation(field, "invalid_time_zone", format!("`{tz}` is not an IANA zone or ±HH:MM offset"))
}

/// Metadata entries: at most 32, keys 1..=64 bytes, values at most 256, all printable.
pub fn metadata<'a>(entries: impl ExactSizeIterator<Item = (&'a String, &'a String)>) -> Result<(), Violation> {
    if entries.len() > MAX_METADATA_ENTRIES {
        return Err(violation("metadata", "invalid_field", format!("at most {MAX_METADATA_ENTRIES} metadata entries")));
    }
    for (k, v) in entries {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_BYTES || !printable(k) || v.len() > MAX_TEXT_BYTES || !printable(v) {
            return Err(violation(
                "metadata",
                "invalid_field",
                format!(
                    "metadata keys must be 1..={MAX_METADATA_KEY_BYTES} and values at most {MAX_TEXT_BYTES} bytes of printable characters"
                ),
            ));
        }
    }
    Ok(())
}

/// One normalised sample (as it travels on a lane).
pub fn sample(s: &Sample, catalog: &Catalog) -> Result<(), Violation> {
    sample_with(s, catalog, &mut valid_time_zone)
}

/// [`sample`] with the zone check given: e.g. one that remembers the last zone it found valid
/// (a batch's samples nearly always share one, and the tz database lookup is the check's most
/// expensive step). `valid_zone` must agree with [`valid_time_zone`].
pub fn sample_with(s: &Sample, catalog: &Catalog, valid_zone: &mut dyn FnMut(&str) -> bool) -> Result<(), Violation> {
    id("source", &s.source)?;
    id("source_record_id", &s.source_record_id)?;
    let Some(spec) = catalog.get(&s.metric) else {
        return Err(violation("metric", "unknown_metric", format!("unknown metric `{}`", s.metric)));
    };
    if s.end_ms < s.start_ms {
        return Err(violation("end", "end_before_start", "`end` is before `start`"));
    }
    if s.end_ms.saturating_sub(s.start_ms) > MAX_SAMPLE_MS {
        return Err(violation(
            "end",
            "sample_too_long",
            format!("one sample may cover at most 24 h; this one covers {} h: split it", s.end_ms.saturating_sub(s.start_ms) / 3_600_000),
        ));
    }
    if !valid_zone(&s.time_zone) {
        return Err(invalid_time_zone("time_zone", &s.time_zone));
    }
    if s.version < 1 {
        return Err(violation("version", "invalid_version", "`version` must be >= 1"));
    }
    if !s.value.is_finite() {
        return Err(violation("value", "value_not_finite", "the value is not a finite number"));
    }
    if s.unit != spec.unit {
        return Err(violation(
            "unit",
            "unconvertible_unit",
            format!("`{}` is not the canonical unit `{}` of `{}`", s.unit, spec.unit, s.metric),
        ));
    }
    match (&s.category, spec.categories.is_empty()) {
        (Some(c), false) if !spec.categories.iter().any(|k| k == c) => {
            return Err(violation(
                "category",
                "unknown_category",
                format!("category `{c}` is not one of {} for `{}`", spec.categories.join(", "), s.metric),
            ));
        }
        (None, false) => return Err(violation("category", "missing_category", format!("`{}` needs a category", s.metric))),
        (Some(_), true) => return Err(violation("category", "unexpected_field", format!("`{}` takes no category", s.metric))),
        _ => {}
    }
    metadata(s.metadata.iter())
}

/// One deletion.
pub fn deletion(d: &Deletion, catalog: &Catalog) -> Result<(), Violation> {
    id("source", &d.source)?;
    id("source_record_id", &d.source_record_id)?;
    if catalog.get(&d.metric).is_none() {
        return Err(violation("metric", "unknown_metric", format!("unknown metric `{}`", d.metric)));
    }
    if d.deleted_version.is_some_and(|v| v < 1) {
        return Err(violation("version", "invalid_version", "`version` must be >= 1"));
    }
    Ok(())
}

/// One domain change: its identifiers and text, its payload matching its kind, a session's
/// interval (end not before start, at most 24 h).
pub fn change(c: &DomainChange, catalog: &Catalog) -> Result<(), Violation> {
    use DomainChangeKind::*;
    id("change_id", &c.change_id)?;
    let is_session = matches!(c.kind, SessionStarted | SessionEnded | SessionUpdated | SessionDeleted);
    let is_product = matches!(c.kind, ProductUpserted | ProductDeleted);
    let payload = [
        ("session", is_session, c.session.is_some()),
        ("product", is_product, c.product.is_some()),
        ("privacy", c.kind == PrivacyUpdated, c.privacy.is_some()),
        ("source_priority", c.kind == SourcePriorityUpdated, c.source_priority.as_ref().is_some_and(|p| !p.is_empty())),
    ];
    for (field, needed, present) in payload {
        if needed && !present {
            return Err(violation(field, "missing_field", format!("`{field}` is required for this kind")));
        }
    }
    if !is_session && c.session.is_some() {
        return Err(violation("session", "unexpected_field", "`session` does not belong to this kind"));
    }
    if !is_product && c.product.is_some() {
        return Err(violation("product", "unexpected_field", "`product` does not belong to this kind"));
    }
    if c.kind != PrivacyUpdated && c.privacy.is_some() {
        return Err(violation("privacy", "unexpected_field", "`privacy` does not belong to this kind"));
    }
    if c.kind != SourcePriorityUpdated && c.source_priority.is_some() {
        return Err(violation("source_priority", "unexpected_field", "`source_priority` does not belong to this kind"));
    }
    if let Some(s) = &c.session {
        id("session.session_id", &s.session_id)?;
        if let Some(p) = &s.product_id {
            id("session.product_id", p)?;
        }
        if c.kind == SessionStarted && s.start_ms.is_none() {
            return Err(violation("session.start", "missing_field", "a started session needs `start`"));
        }
        if c.kind == SessionEnded && s.end_ms.is_none() {
            return Err(violation("session.end", "missing_field", "an ended session needs `end`"));
        }
        if let (Some(a), Some(b)) = (s.start_ms, s.end_ms) {
            if b < a {
                return Err(violation("session.end", "end_before_start", "`end` is before `start`"));
            }
            if b.saturating_sub(a) > MAX_SESSION_MS {
                return Err(violation("session.end", "session_too_long", "a session may last at most 24 h"));
            }
        }
        if let Some(tz) = &s.time_zone {
            time_zone("session.time_zone", tz)?;
        }
    }
    if let Some(p) = &c.product {
        id("product.product_id", &p.product_id)?;
        if let Some(n) = &p.name {
            text("product.name", n)?;
        }
        if let Some(k) = &p.category {
            text("product.category", k)?;
        }
    }
    if let Some(p) = &c.privacy {
        if let Some(m) = p.blocked_metrics.iter().find(|m| catalog.get(m).is_none()) {
            return Err(violation("privacy.blocked_metrics", "unknown_metric", format!("unknown metric `{m}`")));
        }
    }
    if let Some(list) = &c.source_priority {
        for s in list {
            id("source_priority", s)?;
        }
    }
    Ok(())
}

/// A unit of a record refused by [`sample`], [`deletion`] or [`change`]: where it was in its
/// record (e.g. `samples[3]`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub unit: String,
    pub violation: Violation,
}

impl Refused {
    /// `samples[3].source_record_id: ...`
    pub fn reason(&self) -> String {
        format!("{}.{}: {}", self.unit, self.violation.field, self.violation.message)
    }
}

/// Keeps the units of `items` that pass `check`, and says which did not (`what[i]`).
pub fn retain<T>(what: &str, items: &mut Vec<T>, mut check: impl FnMut(&T) -> Result<(), Violation>, refused: &mut Vec<Refused>) {
    let mut i = 0usize;
    items.retain(|item| {
        let r = check(item);
        let at = i;
        i += 1;
        match r {
            Ok(()) => true,
            Err(violation) => {
                refused.push(Refused { unit: format!("{what}[{at}]"), violation });
                false
            }
        }
    });
}

/// The valid units of a sample batch (HOT/COLD), and the refused ones.
pub fn sample_batch(b: &mut crate::SampleBatch, catalog: &Catalog) -> Vec<Refused> {
    let mut refused = Vec::new();
    retain("samples", &mut b.samples, |s| sample(s, catalog), &mut refused);
    refused
}

/// The valid units of a change batch (CHANGE lane), and the refused ones.
pub fn change_batch(b: &mut crate::ChangeBatch, catalog: &Catalog) -> Vec<Refused> {
    let mut refused = Vec::new();
    retain("edits", &mut b.edits, |s| sample(s, catalog), &mut refused);
    retain("deletions", &mut b.deletions, |d| deletion(d, catalog), &mut refused);
    refused
}

/// The valid units of a domain-change batch, and the refused ones.
pub fn domain_change_batch(b: &mut crate::DomainChangeBatch, catalog: &Catalog) -> Vec<Refused> {
    let mut refused = Vec::new();
    retain("changes", &mut b.changes, |c| change(c, catalog), &mut refused);
    refused
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Product, Session, SourceKind};

    proptest::proptest! {
        /// The byte fast path decides as the definition does, whatever the text.
        #[test]
        fn printable_is_no_control_character(s in proptest::prelude::any::<String>(), ascii in "[\\x00-\\x7f]{0,12}") {
            proptest::prop_assert_eq!(printable(&s), !s.chars().any(char::is_control));
            proptest::prop_assert_eq!(printable(&ascii), !ascii.chars().any(char::is_control));
        }
    }

    fn steps(start: i64, end: i64) -> Sample {
        Sample {
            source: "phone".into(),
            source_kind: SourceKind::Phone,
            source_record_id: "r".into(),
            metric: "steps".into(),
            start_ms: start,
            end_ms: end,
            value: 100.0,
            unit: Catalog::embedded().get("steps").unwrap().unit.clone(),
            category: None,
            time_zone: "UTC".into(),
            version: 1,
            metadata: Default::default(),
        }
    }

    fn session(kind: DomainChangeKind, product: Option<&str>, start: i64, end: i64) -> DomainChange {
        DomainChange {
            change_id: "c".into(),
            kind,
            occurred_at_ms: 0,
            session: Some(Session {
                session_id: "s".into(),
                product_id: product.map(Into::into),
                start_ms: Some(start),
                end_ms: Some(end),
                time_zone: None,
            }),
            product: None,
            privacy: None,
            source_priority: None,
        }
    }

    #[test]
    fn every_rule_names_its_field_and_code() {
        let c = Catalog::embedded();
        let h = 3_600_000;
        assert_eq!(sample(&steps(0, 24 * h), c), Ok(()));
        let e = sample(&steps(0, 24 * h + 1), c).unwrap_err();
        assert_eq!((e.field.as_str(), e.code), ("end", "sample_too_long"));
        let mut s = steps(0, 1);
        s.metadata.insert("k".into(), "a\0b".into());
        assert_eq!(sample(&s, c).unwrap_err().field, "metadata");
        let mut s = steps(0, 1);
        s.value = f64::NAN;
        assert_eq!(sample(&s, c).unwrap_err().code, "value_not_finite");
        let k = DomainChangeKind::SessionEnded;
        assert_eq!(change(&session(k, Some("P1"), 0, h), c), Ok(()));
        for bad in ["P\u{0}X", "co\u{1f}ffee", &"x".repeat(20_000)] {
            let e = change(&session(k, Some(bad), 0, h), c).unwrap_err();
            assert_eq!((e.field.as_str(), e.code), ("session.product_id", "invalid_field"), "{bad:?}");
        }
        let e = change(&session(k, None, 0, 30 * h), c).unwrap_err();
        assert_eq!((e.field.as_str(), e.code), ("session.end", "session_too_long"));
        let mut p = DomainChange { kind: DomainChangeKind::ProductUpserted, session: None, ..session(k, None, 0, 1) };
        p.product = Some(Product { product_id: "p".into(), name: Some("n\0".into()), category: None });
        assert_eq!(change(&p, c).unwrap_err().field, "product.name");
    }

    #[test]
    fn a_batch_keeps_its_valid_units() {
        let c = Catalog::embedded();
        let h = 3_600_000;
        let mut b = crate::DomainChangeBatch {
            request_id: "r".into(),
            user_id: "u".into(),
            received_at_ms: 0,
            changes: vec![session(DomainChangeKind::SessionEnded, None, 0, h), session(DomainChangeKind::SessionEnded, None, 0, 30 * h)],
        };
        let refused = domain_change_batch(&mut b, c);
        assert_eq!(b.changes.len(), 1);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].unit, "changes[1]");
        assert_eq!(refused[0].violation.code, "session_too_long");
    }
}
