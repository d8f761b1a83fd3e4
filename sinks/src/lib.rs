//! `vitals-sinks`: the processors' output topics into PostgreSQL projection tables, exactly-once
//! in effect, and realtime envelopes for what changed.
//!
//! * [`Row`] is one projection record in table form, from any projection's record, by its
//!   descriptor ([`vitals_schemas::projection`]): the sink knows no projection by name.
//! * [`postgres`] applies a batch of rows and the consumed offsets in one transaction; a row only
//!   replaces one with an older version, and a retraction keeps its version.
//! * [`progress`] is the rule that turns what the sink consumed into each user's progress.
//! * [`runner`] is the consumer loop: seeks to the offsets stored in PostgreSQL on assignment,
//!   retries a batch with backoff while PostgreSQL is down, dead-letters what it cannot decode.
//! * [`metrics`] renders the runner's counters (dead letters by stage and reason among them).

pub mod metrics;
pub mod postgres;
pub mod progress;
pub mod realtime;
pub mod runner;

use serde_json::Value;
use vitals_schemas::SourceOffset;

/// A projection the sink applies (its descriptor and its records' decoder), handed over by the
/// composition root from the processors' registry.
pub use vitals_schemas::projection::Projection;

/// One projection record in table form.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub projection: Projection,
    pub user_id: String,
    /// The key within the user: the descriptor's key fields joined by `|` (`metric|date`, the
    /// night date, the session id, the product id).
    pub entity_id: String,
    /// The descriptor's group field (rollups' metric, sessions' product).
    pub metric: Option<String>,
    /// The descriptor's day field.
    pub day: Option<chrono::NaiveDate>,
    /// The descriptor's time field.
    pub at_ms: Option<i64>,
    pub version: (i64, i64),
    pub deleted: bool,
    /// The record as JSON: what reads return.
    pub body: Value,
    pub source_offsets: Vec<SourceOffset>,
    /// The `traceparent` of the sink's span applying it (set by the runner), if traced.
    pub trace: Option<String>,
}

impl Row {
    /// The row of `body`, a record of `projection` as JSON, by its descriptor. Fails only when
    /// the record lacks what every projection record has (the envelope) or what its descriptor
    /// names: a record that decoded with the projection's own schema never does.
    pub fn of(projection: Projection, body: Value) -> Result<Row, String> {
        let d = projection.descriptor;
        let field = |name: &str| body.get(name).filter(|v| !v.is_null());
        let missing = |what: &str| format!("{}: a record without {what}", d.name);
        let text = |name: Option<&str>| name.and_then(field).and_then(Value::as_str).map(str::to_owned);
        Ok(Row {
            projection,
            user_id: field("user_id").and_then(Value::as_str).ok_or_else(|| missing("user_id"))?.to_owned(),
            entity_id: d.row_key(&body).ok_or_else(|| missing("its key fields"))?,
            metric: text(d.group),
            day: text(d.day).and_then(|s| s.parse().ok()),
            at_ms: d.at.and_then(field).and_then(Value::as_i64),
            version: (
                field("version_epoch").and_then(Value::as_i64).ok_or_else(|| missing("version_epoch"))?,
                field("version_seq").and_then(Value::as_i64).ok_or_else(|| missing("version_seq"))?,
            ),
            deleted: field("deleted").and_then(Value::as_bool).ok_or_else(|| missing("deleted"))?,
            source_offsets: field("source_offsets")
                .map(|v| serde_json::from_value(v.clone()))
                .transpose()
                .map_err(|e| format!("{}: source_offsets: {e}", d.name))?
                .ok_or_else(|| missing("source_offsets"))?,
            trace: None,
            body,
        })
    }
}

/// What one consumed record says about how far its user's projection has been computed: every
/// output record carries its owner's epoch and the task's input position (`source_offsets`).
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub projection: Projection,
    pub user_id: String,
    pub kind: ProgressKind,
    /// The epoch of the processor owner that wrote the record (`version_epoch`).
    pub epoch: i64,
    pub source_offsets: Vec<SourceOffset>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressKind {
    /// A processor's per-user progress marker (Kafka header `vitals-progress`): everything of
    /// the user up to `source_offsets` has been processed and its outputs precede the marker in
    /// the same partition.
    Marker,
    /// A row: its owner had reached `source_offsets` when it computed it, but other rows of the
    /// same interval may follow it.
    Row,
}

impl Progress {
    /// What the row `r` says (its owner and input position).
    pub fn of_row(r: &Row) -> Progress {
        Progress {
            projection: r.projection,
            user_id: r.user_id.clone(),
            kind: ProgressKind::Row,
            epoch: r.version.0,
            source_offsets: r.source_offsets.clone(),
        }
    }
}

pub use vitals_schemas::topics::PROGRESS_HEADER;

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use vitals_schemas::*;

    use super::*;

    fn offsets() -> Vec<SourceOffset> {
        vec![SourceOffset { topic: "hot".into(), partition: 2, next_offset: 9 }]
    }

    fn row<T: vitals_schemas::projection::Projected + Send + 'static>(r: &T) -> Row {
        Row::of(Projection::of::<T>(), serde_json::to_value(r).unwrap()).unwrap()
    }

    /// The columns each of the four projections filled by hand before descriptors.
    #[test]
    fn rows_take_their_columns_from_the_descriptor() {
        let r = RollupDay {
            user_id: "u|1".into(),
            metric: "steps".into(),
            local_date: "2026-03-29".into(),
            unit: "count".into(),
            kind: MetricKindRecord::Cumulative,
            count: 3,
            sum: Some(12.0),
            min: None,
            max: None,
            mean: None,
            time_weighted_mean: None,
            last: None,
            category_minutes: HashMap::new(),
            primary_source: None,
            version_epoch: 4,
            version_seq: 7,
            deleted: false,
            source_offsets: offsets(),
        };
        let got = row(&r);
        assert_eq!(
            (got.user_id.as_str(), got.entity_id.as_str(), got.metric.as_deref(), got.day, got.at_ms, got.version, got.deleted),
            ("u|1", "steps|2026-03-29", Some("steps"), "2026-03-29".parse().ok(), None, (4, 7), false)
        );
        assert_eq!((got.body, got.source_offsets), (serde_json::to_value(&r).unwrap(), offsets()));

        let s = SleepNight {
            user_id: "u".into(),
            night_date: "2026-03-30".into(),
            source: "watch".into(),
            in_bed_start_ms: 1,
            in_bed_end_ms: 2,
            sleep_onset_ms: 1,
            final_wake_ms: 2,
            stage_minutes: HashMap::new(),
            total_sleep_minutes: 1.0,
            efficiency: 1.0,
            awakenings: 0,
            naps: vec![],
            version_epoch: 1,
            version_seq: 1,
            deleted: true,
            source_offsets: offsets(),
        };
        let got = row(&s);
        assert_eq!(
            (got.entity_id.as_str(), got.metric, got.day, got.at_ms, got.deleted),
            ("2026-03-30", None, "2026-03-30".parse().ok(), Some(2), true)
        );

        let i = SessionImpact {
            user_id: "u".into(),
            session_id: "s1".into(),
            product_id: Some("p1".into()),
            start_ms: 5,
            end_ms: None,
            status: ImpactStatus::Provisional,
            metrics: vec![],
            version_epoch: 1,
            version_seq: 2,
            deleted: false,
            source_offsets: offsets(),
        };
        let got = row(&i);
        assert_eq!((got.entity_id.as_str(), got.metric.as_deref(), got.day, got.at_ms), ("s1", Some("p1"), None, Some(5)));
        assert_eq!(row(&SessionImpact { product_id: None, ..i }).metric, None);

        let p = ProductImpact {
            user_id: "u".into(),
            product_id: "p1".into(),
            sessions: 2,
            metrics: vec![],
            version_epoch: 1,
            version_seq: 3,
            deleted: false,
            source_offsets: offsets(),
        };
        let got = row(&p);
        assert_eq!((got.entity_id.as_str(), got.metric, got.day, got.at_ms), ("p1", None, None, None));
    }

    #[test]
    fn a_record_without_its_envelope_is_refused_with_the_reason() {
        let p = Projection::of::<ProductImpact>();
        let e = Row::of(p, serde_json::json!({"user_id": "u", "product_id": "p"})).unwrap_err();
        assert!(e.contains("version_epoch"), "{e}");
        let e = Row::of(p, serde_json::json!({"user_id": "u"})).unwrap_err();
        assert!(e.contains("key"), "{e}");
    }
}
