//! Request bodies of the edge and their validation: a pure function from a parsed JSON body (plus
//! "now", the privacy settings and the limits) to accepted, normalised records and per-item
//! rejections. No I/O here, so every rule is unit-testable.

use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset};
use serde::Deserialize;
use serde_json::Value;
use vitals_auth::ApiError;
use vitals_schemas::catalog::Catalog;
use vitals_schemas::validate;
use vitals_schemas::{Deletion, DomainChange, DomainChangeKind, Lane, PrivacySettings, Product, Sample, Session, SourceKind};

use crate::error::ItemError;

/// Limits and clocks the validation needs.
#[derive(Debug, Clone)]
pub struct Rules {
    pub max_items: usize,
    /// Samples whose end is within this many ms of now go to HOT (unless flagged backfill).
    pub hot_window_ms: i64,
    /// Timestamps later than now + this are rejected as far-future.
    pub max_future_skew_ms: i64,
    /// Timestamps earlier than this (ms since epoch) are rejected as implausible.
    pub min_timestamp_ms: i64,
    /// A domain change's `occurred_at` later than now + this is rejected: it orders changes.
    pub max_change_future_skew_ms: i64,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            max_items: 2000,
            hot_window_ms: 48 * 3600 * 1000,
            max_future_skew_ms: 10 * 60 * 1000,
            min_timestamp_ms: 946_684_800_000, // 2000-01-01
            max_change_future_skew_ms: 60 * 1000,
        }
    }
}

/// The common envelope of every batch endpoint. It is read from the parsed body without copying
/// it: the item lists are only checked to be lists here ([`ItemList`]); the items themselves are
/// then moved out of the body as raw JSON, so that one bad item is rejected with its index and
/// field while the others go on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub request_id: String,
    /// Optional; when present it must be the token's user.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Samples only: the client marks the whole batch as backfill (COLD lane).
    #[serde(default)]
    pub backfill: bool,
    #[serde(default)]
    pub samples: Option<ItemList>,
    #[serde(default)]
    pub deletions: Option<ItemList>,
    #[serde(default)]
    pub changes: Option<ItemList>,
}

/// An items field that is present and is a JSON array (its elements are not looked at). Refuses
/// anything else with serde's own message ("invalid type: …, expected a sequence").
#[derive(Debug)]
pub struct ItemList {
    pub len: usize,
}

impl<'de> Deserialize<'de> for ItemList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ItemList, D::Error> {
        struct Seq;
        impl<'de> serde::de::Visitor<'de> for Seq {
            type Value = ItemList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ItemList, A::Error> {
                let mut len = 0;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    len += 1;
                }
                Ok(ItemList { len })
            }
        }
        d.deserialize_seq(Seq)
    }
}

/// The kinds of batch the edge takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    Samples,
    Deletions,
    DomainChanges,
}

impl BatchKind {
    pub fn endpoint(self) -> &'static str {
        match self {
            BatchKind::Samples => "samples",
            BatchKind::Deletions => "deletions",
            BatchKind::DomainChanges => "domain_changes",
        }
    }
    fn items_field(self) -> &'static str {
        match self {
            BatchKind::Samples => "samples",
            BatchKind::Deletions => "deletions",
            BatchKind::DomainChanges => "changes",
        }
    }
}

/// Parses and checks the envelope: strict JSON, known fields, the items list of this endpoint,
/// a usable request id, the batch length limit and the user. Returns the envelope, the
/// payload's canonical hash and the items (moved out of the parsed body, not copied).
pub fn parse_envelope(body: &[u8], kind: BatchKind, user: &str, rules: &Rules) -> Result<(Envelope, String, Vec<Value>), ApiError> {
    let (mut value, duplicate) = crate::json::parse_value(body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e} (NaN and Infinity are not JSON)")))?;
    // `Value` keeps the last of two equal keys without a word; the client meant one of them.
    if duplicate {
        let path = crate::json::first_duplicate_key(body).unwrap_or_default();
        let path = crate::error::printable(&path);
        return Err(ApiError::bad_request("duplicate_key", format!("`{path}` appears more than once in one object")).field(path));
    }
    let env: Envelope = deserialize_at(&value)
        .map_err(|(field, msg)| ApiError::bad_request("invalid_request", format!("invalid request body: {msg}")).field(field))?;
    if env.request_id.is_empty() || env.request_id.len() > 128 || env.request_id.chars().any(|c| c.is_control()) {
        return Err(ApiError::bad_request("invalid_request_id", "request_id must be 1..=128 printable characters").field("request_id"));
    }
    if let Some(u) = &env.user_id {
        if u != user {
            return Err(
                ApiError::new(http::StatusCode::FORBIDDEN, "forbidden_user", "a user can only write their own data").field("user_id")
            );
        }
    }
    let field = kind.items_field();
    let others = [("samples", env.samples.is_some()), ("deletions", env.deletions.is_some()), ("changes", env.changes.is_some())];
    if let Some((other, _)) = others.iter().find(|(n, present)| *present && *n != field) {
        return Err(ApiError::bad_request("invalid_request", format!("`{other}` does not belong on this endpoint")).field(*other));
    }
    if env.backfill && kind != BatchKind::Samples {
        return Err(ApiError::bad_request("invalid_request", "`backfill` applies to samples only").field("backfill"));
    }
    let len = match kind {
        BatchKind::Samples => env.samples.as_ref(),
        BatchKind::Deletions => env.deletions.as_ref(),
        BatchKind::DomainChanges => env.changes.as_ref(),
    }
    .ok_or_else(|| ApiError::unprocessable("missing_field", format!("`{field}` is required")).field(field))?
    .len;
    if len == 0 {
        return Err(ApiError::unprocessable("empty_batch", format!("`{field}` must not be empty")).field(field));
    }
    if len > rules.max_items {
        return Err(ApiError::unprocessable(
            "too_many_items",
            format!("at most {} items per request, got {len}; split the batch", rules.max_items),
        )
        .field(field));
    }
    let hash = vitals_schemas::hash::payload_hash(&value);
    let items = match value.as_object_mut().and_then(|m| m.remove(field)) {
        Some(Value::Array(items)) => items,
        // Cannot happen (the envelope has just read it as an array); a 4xx all the same.
        _ => return Err(ApiError::unprocessable("missing_field", format!("`{field}` is required")).field(field)),
    };
    Ok((env, hash, items))
}

/// Deserializes with the path of the failing field.
fn deserialize_at<'a, T: Deserialize<'a>, D: serde::Deserializer<'a>>(v: D) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        // For unknown/missing fields serde names the field in the message, not the path.
        let field = if path == "." { extract_quoted(&msg).unwrap_or_default() } else { path };
        (field, msg)
    })
}

fn extract_quoted(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let end = start + msg[start..].find('`')?;
    Some(msg[start..end].to_owned())
}

/// What the client sends for one sample (HealthKit / Health Connect shaped).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SampleIn {
    source: String,
    #[serde(default = "default_source_kind")]
    source_kind: SourceKindIn,
    source_record_id: String,
    metric: String,
    /// RFC 3339 with an offset.
    start: String,
    /// Defaults to `start` (instantaneous samples).
    #[serde(default)]
    end: Option<String>,
    #[serde(default)]
    value: Option<f64>,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    category: Option<String>,
    time_zone: String,
    #[serde(default = "one")]
    version: i64,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SourceKindIn {
    Manual,
    Watch,
    Phone,
    ThirdParty,
}

fn default_source_kind() -> SourceKindIn {
    SourceKindIn::ThirdParty
}
fn one() -> i64 {
    1
}

impl From<SourceKindIn> for SourceKind {
    fn from(k: SourceKindIn) -> SourceKind {
        match k {
            SourceKindIn::Manual => SourceKind::Manual,
            SourceKindIn::Watch => SourceKind::Watch,
            SourceKindIn::Phone => SourceKind::Phone,
            SourceKindIn::ThirdParty => SourceKind::ThirdParty,
        }
    }
}

fn item_err(index: usize, field: impl Into<String>, code: &str, message: impl Into<String>) -> ItemError {
    ItemError { index, field: field.into(), code: code.to_owned(), message: message.into() }
}

fn parse_ts(index: usize, field: &str, s: &str, rules: &Rules, now_ms: i64) -> Result<i64, ItemError> {
    let t: DateTime<FixedOffset> = DateTime::parse_from_rfc3339(s)
        .map_err(|e| item_err(index, field, "invalid_timestamp", format!("`{field}` must be RFC 3339 with an offset: {e}")))?;
    let ms = t.timestamp_millis();
    if ms > now_ms + rules.max_future_skew_ms {
        return Err(item_err(index, field, "timestamp_in_future", format!("`{field}` is in the future ({s})")));
    }
    if ms < rules.min_timestamp_ms {
        return Err(item_err(index, field, "timestamp_too_old", format!("`{field}` is before 2000-01-01 ({s})")));
    }
    Ok(ms)
}

pub use vitals_schemas::validate::valid_time_zone;

fn check_text(index: usize, field: &str, s: &str) -> Result<(), ItemError> {
    validate::id(field, s).map_err(|v| item_err(index, v.field, v.code, v.message))
}

/// One accepted sample and the lane it goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    pub lane: Lane,
    pub sample: Sample,
}

/// Validates and normalises samples. `privacy` is `None` when consent is not required and absent.
pub fn validate_samples(
    items: Vec<Value>,
    backfill: bool,
    privacy: Option<&PrivacySettings>,
    catalog: &Catalog,
    rules: &Rules,
    now_ms: i64,
) -> (Vec<Routed>, Vec<ItemError>) {
    let mut ok = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match validate_sample(index, item, backfill, privacy, catalog, rules, now_ms) {
            Ok(r) => ok.push(r),
            Err(e) => rejected.push(e),
        }
    }
    (ok, rejected)
}

fn validate_sample(
    index: usize,
    item: Value,
    backfill: bool,
    privacy: Option<&PrivacySettings>,
    catalog: &Catalog,
    rules: &Rules,
    now_ms: i64,
) -> Result<Routed, ItemError> {
    let s: SampleIn = deserialize_at(item).map_err(|(field, msg)| item_err(index, field, "invalid_field", msg))?;
    check_text(index, "source", &s.source)?;
    check_text(index, "source_record_id", &s.source_record_id)?;
    if catalog.get(&s.metric).is_none() {
        return Err(item_err(index, "metric", "unknown_metric", format!("unknown metric `{}`", s.metric)));
    }
    if let Some(p) = privacy {
        if p.blocked_metrics.iter().any(|m| m == &s.metric) {
            return Err(item_err(index, "metric", "metric_blocked", format!("the user has blocked uploads of `{}`", s.metric)));
        }
    }
    let start = parse_ts(index, "start", &s.start, rules, now_ms)?;
    let end = match &s.end {
        Some(e) => parse_ts(index, "end", e, rules, now_ms)?,
        None => start,
    };
    if end < start {
        return Err(item_err(index, "end", "end_before_start", "`end` is before `start`"));
    }
    if !valid_time_zone(&s.time_zone) {
        return Err(item_err(index, "time_zone", "invalid_time_zone", format!("`{}` is not an IANA zone or ±HH:MM offset", s.time_zone)));
    }
    if s.version < 1 {
        return Err(item_err(index, "version", "invalid_version", "`version` must be >= 1"));
    }
    if s.metadata.len() > 32 || s.metadata.iter().any(|(k, v)| k.len() > 64 || v.len() > 256) {
        return Err(item_err(index, "metadata", "invalid_field", "at most 32 metadata entries, keys <= 64 and values <= 256 bytes"));
    }
    let duration_min = (end - start) as f64 / 60_000.0;
    let n = catalog
        .normalise(&s.metric, s.value, s.unit.as_deref(), s.category.as_deref(), duration_min)
        .map_err(|e| item_err(index, e.field(), e.code(), e.to_string()))?;
    let lane = if s.version > 1 {
        Lane::Change
    } else if !backfill && end >= now_ms - rules.hot_window_ms {
        Lane::Hot
    } else {
        Lane::Cold
    };
    let sample = Sample {
        source: s.source,
        source_kind: s.source_kind.into(),
        source_record_id: s.source_record_id,
        metric: s.metric,
        start_ms: start,
        end_ms: end,
        value: n.value,
        unit: n.unit,
        category: n.category,
        time_zone: s.time_zone,
        version: s.version,
        metadata: s.metadata.into_iter().collect(),
    };
    // The rules every processor applies too: nothing accepted here is refused downstream.
    validate::sample(&sample, catalog).map_err(|v| item_err(index, v.field, v.code, v.message))?;
    Ok(Routed { lane, sample })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeletionIn {
    source: String,
    source_record_id: String,
    metric: String,
    /// Delete versions up to this one; all versions when absent.
    #[serde(default)]
    version: Option<i64>,
}

/// Validates deletions. Deletions are accepted whatever the privacy settings: a user can always
/// delete their data.
pub fn validate_deletions(items: Vec<Value>, catalog: &Catalog) -> (Vec<Deletion>, Vec<ItemError>) {
    let mut ok = Vec::new();
    let mut rejected = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let r = (|| {
            let d: DeletionIn = deserialize_at(item).map_err(|(f, m)| item_err(index, f, "invalid_field", m))?;
            check_text(index, "source", &d.source)?;
            check_text(index, "source_record_id", &d.source_record_id)?;
            if catalog.get(&d.metric).is_none() {
                return Err(item_err(index, "metric", "unknown_metric", format!("unknown metric `{}`", d.metric)));
            }
            if d.version.is_some_and(|v| v < 1) {
                return Err(item_err(index, "version", "invalid_version", "`version` must be >= 1"));
            }
            let d = Deletion { source: d.source, source_record_id: d.source_record_id, metric: d.metric, deleted_version: d.version };
            validate::deletion(&d, catalog).map_err(|v| item_err(index, v.field, v.code, v.message))?;
            Ok(d)
        })();
        match r {
            Ok(d) => ok.push(d),
            Err(e) => rejected.push(e),
        }
    }
    (ok, rejected)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeIn {
    change_id: String,
    kind: KindIn,
    occurred_at: String,
    #[serde(default)]
    session: Option<SessionIn>,
    #[serde(default)]
    product: Option<ProductIn>,
    #[serde(default)]
    privacy: Option<PrivacyIn>,
    #[serde(default)]
    source_priority: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum KindIn {
    SessionStarted,
    SessionEnded,
    SessionUpdated,
    SessionDeleted,
    ProductUpserted,
    ProductDeleted,
    PrivacyUpdated,
    SourcePriorityUpdated,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionIn {
    session_id: String,
    #[serde(default)]
    product_id: Option<String>,
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    end: Option<String>,
    #[serde(default)]
    time_zone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductIn {
    product_id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    category: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivacyIn {
    health_upload_allowed: bool,
    #[serde(default)]
    blocked_metrics: Vec<String>,
}

/// Validates domain changes: each kind must carry exactly the payload it needs.
pub fn validate_changes(items: Vec<Value>, catalog: &Catalog, rules: &Rules, now_ms: i64) -> (Vec<DomainChange>, Vec<ItemError>) {
    let mut ok = Vec::new();
    let mut rejected = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match validate_change(index, item, catalog, rules, now_ms) {
            Ok(c) => ok.push(c),
            Err(e) => rejected.push(e),
        }
    }
    (ok, rejected)
}

fn validate_change(index: usize, item: Value, catalog: &Catalog, rules: &Rules, now_ms: i64) -> Result<DomainChange, ItemError> {
    let c: ChangeIn = deserialize_at(item).map_err(|(f, m)| item_err(index, f, "invalid_field", m))?;
    check_text(index, "change_id", &c.change_id)?;
    let occurred_at_ms = parse_ts(index, "occurred_at", &c.occurred_at, rules, now_ms)?;
    // `occurred_at` orders a user's changes (the greatest wins: privacy, source priority, session
    // fields), so one dated ahead would beat every change sent after it: only clock skew is allowed.
    if occurred_at_ms > now_ms + rules.max_change_future_skew_ms {
        return Err(item_err(
            index,
            "occurred_at",
            "timestamp_in_future",
            format!(
                "`occurred_at` is more than {} s ahead of the server's clock ({})",
                rules.max_change_future_skew_ms / 1000,
                c.occurred_at
            ),
        ));
    }
    let need = |present: bool, field: &str| {
        if present {
            Ok(())
        } else {
            Err(item_err(index, field, "missing_field", format!("`{field}` is required for this kind")))
        }
    };
    let forbid = |present: bool, field: &str| {
        if present {
            Err(item_err(index, field, "unexpected_field", format!("`{field}` does not belong to this kind")))
        } else {
            Ok(())
        }
    };
    use KindIn::*;
    let is_session = matches!(c.kind, SessionStarted | SessionEnded | SessionUpdated | SessionDeleted);
    let is_product = matches!(c.kind, ProductUpserted | ProductDeleted);
    need(!is_session || c.session.is_some(), "session")?;
    forbid(!is_session && c.session.is_some(), "session")?;
    need(!is_product || c.product.is_some(), "product")?;
    forbid(!is_product && c.product.is_some(), "product")?;
    need(c.kind != PrivacyUpdated || c.privacy.is_some(), "privacy")?;
    forbid(c.kind != PrivacyUpdated && c.privacy.is_some(), "privacy")?;
    need(c.kind != SourcePriorityUpdated || c.source_priority.as_ref().is_some_and(|p| !p.is_empty()), "source_priority")?;
    forbid(c.kind != SourcePriorityUpdated && c.source_priority.is_some(), "source_priority")?;

    let session = match c.session {
        None => None,
        Some(s) => {
            check_text(index, "session.session_id", &s.session_id)?;
            let start = s.start.as_deref().map(|t| parse_ts(index, "session.start", t, rules, now_ms)).transpose()?;
            let end = s.end.as_deref().map(|t| parse_ts(index, "session.end", t, rules, now_ms)).transpose()?;
            if c.kind == SessionStarted && start.is_none() {
                return Err(item_err(index, "session.start", "missing_field", "a started session needs `start`"));
            }
            if c.kind == SessionEnded && end.is_none() {
                return Err(item_err(index, "session.end", "missing_field", "an ended session needs `end`"));
            }
            if let (Some(a), Some(b)) = (start, end) {
                if b < a {
                    return Err(item_err(index, "session.end", "end_before_start", "`end` is before `start`"));
                }
            }
            if let Some(tz) = &s.time_zone {
                if !valid_time_zone(tz) {
                    return Err(item_err(index, "session.time_zone", "invalid_time_zone", format!("`{tz}` is not a zone")));
                }
            }
            Some(Session { session_id: s.session_id, product_id: s.product_id, start_ms: start, end_ms: end, time_zone: s.time_zone })
        }
    };
    let product = match c.product {
        None => None,
        Some(p) => {
            check_text(index, "product.product_id", &p.product_id)?;
            Some(Product { product_id: p.product_id, name: p.name, category: p.category })
        }
    };
    let privacy = match c.privacy {
        None => None,
        Some(p) => {
            if let Some(m) = p.blocked_metrics.iter().find(|m| catalog.get(m).is_none()) {
                return Err(item_err(index, "privacy.blocked_metrics", "unknown_metric", format!("unknown metric `{m}`")));
            }
            Some(PrivacySettings { health_upload_allowed: p.health_upload_allowed, blocked_metrics: p.blocked_metrics })
        }
    };
    if let Some(list) = &c.source_priority {
        for s in list {
            check_text(index, "source_priority", s)?;
        }
    }
    let kind = match c.kind {
        SessionStarted => DomainChangeKind::SessionStarted,
        SessionEnded => DomainChangeKind::SessionEnded,
        SessionUpdated => DomainChangeKind::SessionUpdated,
        SessionDeleted => DomainChangeKind::SessionDeleted,
        ProductUpserted => DomainChangeKind::ProductUpserted,
        ProductDeleted => DomainChangeKind::ProductDeleted,
        PrivacyUpdated => DomainChangeKind::PrivacyUpdated,
        SourcePriorityUpdated => DomainChangeKind::SourcePriorityUpdated,
    };
    let change =
        DomainChange { change_id: c.change_id, kind, occurred_at_ms, session, product, privacy, source_priority: c.source_priority };
    // The rules every processor applies too: nothing accepted here is refused downstream.
    validate::change(&change, catalog).map_err(|v| item_err(index, v.field, v.code, v.message))?;
    Ok(change)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_780_000_000_000;

    fn iso(ms: i64) -> String {
        DateTime::from_timestamp_millis(ms).unwrap().to_rfc3339()
    }

    fn hr(value: Value, unit: &str, start: i64, end: i64) -> Value {
        json!({"source": "watch", "source_kind": "watch", "source_record_id": "r1", "metric": "heart_rate",
               "start": iso(start), "end": iso(end), "value": value, "unit": unit, "time_zone": "Europe/Berlin"})
    }

    fn one(item: Value) -> Result<Routed, ItemError> {
        let (mut ok, mut bad) = validate_samples(vec![item], false, None, Catalog::embedded(), &Rules::default(), NOW);
        if bad.is_empty() {
            Ok(ok.remove(0))
        } else {
            Err(bad.remove(0))
        }
    }

    #[test]
    fn normalises_and_routes_by_lane() {
        let r = one(hr(json!(1.0), "count/s", NOW - 60_000, NOW)).unwrap();
        assert_eq!((r.lane, r.sample.value, r.sample.unit.as_str()), (Lane::Hot, 60.0, "count/min"));
        let old = one(hr(json!(60), "bpm", NOW - 72 * 3600 * 1000, NOW - 71 * 3600 * 1000)).unwrap();
        assert_eq!(old.lane, Lane::Cold);
        let mut edit = hr(json!(60), "bpm", NOW - 60_000, NOW);
        edit["version"] = json!(3);
        assert_eq!(one(edit).unwrap().lane, Lane::Change);
        let (ok, _) = validate_samples(vec![hr(json!(60), "bpm", NOW - 1, NOW)], true, None, Catalog::embedded(), &Rules::default(), NOW);
        assert_eq!(ok[0].lane, Lane::Cold, "backfill flag forces COLD");
    }

    #[test]
    fn each_bad_sample_names_its_field_and_code() {
        let cases = [
            (hr(json!(60), "bpm", NOW, NOW - 1000), "end", "end_before_start"),
            (hr(json!(60), "bpm", NOW + 3_600_000, NOW + 3_600_000), "start", "timestamp_in_future"),
            (hr(json!(60), "kg", NOW - 1000, NOW), "unit", "unconvertible_unit"),
            (hr(json!(900), "bpm", NOW - 1000, NOW), "value", "value_out_of_range"),
            (hr(json!("sixty"), "bpm", NOW - 1000, NOW), "value", "invalid_field"),
        ];
        for (item, field, code) in cases {
            let e = one(item).unwrap_err();
            assert_eq!((e.field.as_str(), e.code.as_str()), (field, code), "{e:?}");
        }
        let mut unknown = hr(json!(60), "bpm", NOW - 1000, NOW);
        unknown["metric"] = json!("heart_rhythm");
        assert_eq!(one(unknown).unwrap_err().code, "unknown_metric");
        let mut extra = hr(json!(60), "bpm", NOW - 1000, NOW);
        extra["colour"] = json!("red");
        let e = one(extra).unwrap_err();
        assert_eq!((e.field.as_str(), e.code.as_str()), ("colour", "invalid_field"));
        let mut tz = hr(json!(60), "bpm", NOW - 1000, NOW);
        tz["time_zone"] = json!("Mars/Olympus");
        assert_eq!(one(tz).unwrap_err().code, "invalid_time_zone");
    }

    #[test]
    fn blocked_metrics_are_rejected() {
        let p = PrivacySettings { health_upload_allowed: true, blocked_metrics: vec!["heart_rate".into()] };
        let (ok, bad) =
            validate_samples(vec![hr(json!(60), "bpm", NOW - 1, NOW)], false, Some(&p), Catalog::embedded(), &Rules::default(), NOW);
        assert!(ok.is_empty());
        assert_eq!(bad[0].code, "metric_blocked");
    }

    #[test]
    fn envelope_rules() {
        let rules = Rules { max_items: 2, ..Rules::default() };
        let e = parse_envelope(b"{\"request_id\": \"a\", \"samples\": [NaN]}", BatchKind::Samples, "u", &rules).unwrap_err();
        assert_eq!(e.code, "malformed_json");
        let e = parse_envelope(br#"{"request_id": "a", "samples": [1,2,3]}"#, BatchKind::Samples, "u", &rules).unwrap_err();
        assert_eq!((e.code, e.status.as_u16()), ("too_many_items", 422));
        let e = parse_envelope(br#"{"request_id": "a", "user_id": "v", "samples": [1]}"#, BatchKind::Samples, "u", &rules).unwrap_err();
        assert_eq!((e.code, e.status.as_u16()), ("forbidden_user", 403));
        let e = parse_envelope(br#"{"request_id": "a", "samplez": [1]}"#, BatchKind::Samples, "u", &rules).unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), ("invalid_request", Some("samplez")));
        let e = parse_envelope(br#"{"request_id": "a", "deletions": [1]}"#, BatchKind::Samples, "u", &rules).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("deletions"));
        assert!(parse_envelope(br#"{"request_id": "a", "samples": [1]}"#, BatchKind::Samples, "u", &rules).is_ok());
    }

    /// Issue 9, items 1-2: each of these was accepted (200) by the edge and then refused by a
    /// processor or failed the sink's every retry.
    #[test]
    fn what_a_processor_or_the_sink_would_refuse_is_refused_here() {
        let c = |v: Value| validate_changes(vec![v], Catalog::embedded(), &Rules::default(), NOW);
        let ended = |product: Value, start: i64, end: i64| {
            json!({"change_id": "c", "kind": "session_ended", "occurred_at": iso(NOW),
                   "session": {"session_id": "s", "product_id": product, "start": iso(start), "end": iso(end)}})
        };
        for bad in [json!("P\u{0}X"), json!("co\u{1f}ffee"), json!("x".repeat(20_000))] {
            let (ok, bad) = c(ended(bad, NOW - 60_000, NOW));
            assert!(ok.is_empty());
            assert_eq!((bad[0].field.as_str(), bad[0].code.as_str()), ("session.product_id", "invalid_field"));
        }
        let (ok, bad) = c(ended(json!("p"), NOW - 30 * 3_600_000, NOW));
        assert!(ok.is_empty());
        assert_eq!((bad[0].field.as_str(), bad[0].code.as_str()), ("session.end", "session_too_long"));
        let (_, bad) = c(json!({"change_id": "c", "kind": "product_upserted", "occurred_at": iso(NOW),
                                "product": {"product_id": "p", "name": "n\u{0}".repeat(5000)}}));
        assert_eq!(bad[0].field, "product.name");
        let mut meta = hr(json!(60), "bpm", NOW - 1000, NOW);
        meta["metadata"] = json!({"k": "a\u{0}b"});
        assert_eq!(one(meta).unwrap_err().field, "metadata");
        let since_2000 = json!({"source": "phone", "source_record_id": "r", "metric": "steps", "start": "2000-01-01T00:00:00Z",
                                "end": iso(NOW), "value": 100000, "unit": "count", "time_zone": "UTC"});
        let e = one(since_2000).unwrap_err();
        assert_eq!((e.field.as_str(), e.code.as_str()), ("end", "sample_too_long"));
    }

    #[test]
    fn domain_changes_need_their_payload() {
        let c = |v: Value| validate_changes(vec![v], Catalog::embedded(), &Rules::default(), NOW);
        let (ok, bad) = c(json!({"change_id": "c", "kind": "session_started", "occurred_at": iso(NOW),
                                 "session": {"session_id": "s", "start": iso(NOW - 1000)}}));
        assert_eq!((ok.len(), bad.len()), (1, 0));
        let (_, bad) = c(json!({"change_id": "c", "kind": "privacy_updated", "occurred_at": iso(NOW)}));
        assert_eq!((bad[0].field.as_str(), bad[0].code.as_str()), ("privacy", "missing_field"));
        let (_, bad) = c(json!({"change_id": "c", "kind": "session_ended", "occurred_at": iso(NOW),
                                "session": {"session_id": "s", "start": iso(NOW), "end": iso(NOW - 5)}}));
        assert_eq!(bad[0].code, "end_before_start");
    }

    #[test]
    fn a_change_dated_beyond_the_skew_is_refused() {
        let c = |at: i64| {
            validate_changes(
                vec![json!({"change_id": "c", "kind": "privacy_updated", "occurred_at": iso(at),
                                                       "privacy": {"health_upload_allowed": true}})],
                Catalog::embedded(),
                &Rules::default(),
                NOW,
            )
        };
        assert_eq!(c(NOW + 60_000).0.len(), 1, "within the skew");
        let (ok, bad) = c(NOW + 9 * 60_000);
        assert!(ok.is_empty());
        assert_eq!((bad[0].field.as_str(), bad[0].code.as_str()), ("occurred_at", "timestamp_in_future"));
    }

    #[test]
    fn duplicate_keys_are_refused_with_their_path() {
        let e = parse_envelope(br#"{"request_id": "a", "samples": [1], "request_id": "b"}"#, BatchKind::Samples, "u", &Rules::default())
            .unwrap_err();
        assert_eq!((e.status.as_u16(), e.code, e.field.as_deref()), (400, "duplicate_key", Some("request_id")));
        let e = parse_envelope(br#"{"request_id": "a", "samples": [{"v": 1, "v": 2}]}"#, BatchKind::Samples, "u", &Rules::default())
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("samples[0].v"));
    }
}
