//! `vitals-sinks`: the processors' output topics into PostgreSQL projection tables, exactly-once
//! in effect, and realtime envelopes for what changed.
//!
//! * [`Row`] is one projection record in table form, from any of the four output records.
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

use serde::Serialize;
use vitals_schemas::{ProductImpact, RollupDay, SessionImpact, SleepNight, SourceOffset};

/// The four projections and their tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    RollupDay,
    SleepNight,
    SessionImpact,
    ProductImpact,
}

impl Projection {
    pub const ALL: [Projection; 4] = [Projection::RollupDay, Projection::SleepNight, Projection::SessionImpact, Projection::ProductImpact];

    pub fn name(self) -> &'static str {
        match self {
            Projection::RollupDay => "rollup_day",
            Projection::SleepNight => "sleep_night",
            Projection::SessionImpact => "session_impact",
            Projection::ProductImpact => "product_impact",
        }
    }

    pub fn table(self) -> &'static str {
        match self {
            Projection::RollupDay => "proj_rollup_day",
            Projection::SleepNight => "proj_sleep_night",
            Projection::SessionImpact => "proj_session_impact",
            Projection::ProductImpact => "proj_product_impact",
        }
    }

    /// The output topic it is built from.
    pub fn topic(self, t: &vitals_schemas::topics::Topics) -> String {
        match self {
            Projection::RollupDay => t.rollup_day.clone(),
            Projection::SleepNight => t.sleep_night.clone(),
            Projection::SessionImpact => t.session_impact.clone(),
            Projection::ProductImpact => t.product_impact.clone(),
        }
    }

    pub fn from_topic(t: &vitals_schemas::topics::Topics, topic: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.topic(t) == topic)
    }
}

/// One projection record in table form.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub projection: Projection,
    pub user_id: String,
    /// The key within the user: `metric|date`, the night date, the session id, the product id.
    pub entity_id: String,
    pub metric: Option<String>,
    pub day: Option<chrono::NaiveDate>,
    pub at_ms: Option<i64>,
    pub version: (i64, i64),
    pub deleted: bool,
    /// The record as JSON: what reads return.
    pub body: serde_json::Value,
    pub source_offsets: Vec<SourceOffset>,
}

fn date(s: &str) -> Option<chrono::NaiveDate> {
    s.parse().ok()
}

fn body<T: Serialize>(r: &T) -> serde_json::Value {
    serde_json::to_value(r).unwrap_or(serde_json::Value::Null)
}

impl From<RollupDay> for Row {
    fn from(r: RollupDay) -> Row {
        Row {
            projection: Projection::RollupDay,
            entity_id: format!("{}|{}", r.metric, r.local_date),
            metric: Some(r.metric.clone()),
            day: date(&r.local_date),
            at_ms: None,
            version: (r.version_epoch, r.version_seq),
            deleted: r.deleted,
            body: body(&r),
            user_id: r.user_id,
            source_offsets: r.source_offsets,
        }
    }
}

impl From<SleepNight> for Row {
    fn from(r: SleepNight) -> Row {
        Row {
            projection: Projection::SleepNight,
            entity_id: r.night_date.clone(),
            metric: None,
            day: date(&r.night_date),
            at_ms: Some(r.final_wake_ms),
            version: (r.version_epoch, r.version_seq),
            deleted: r.deleted,
            body: body(&r),
            user_id: r.user_id,
            source_offsets: r.source_offsets,
        }
    }
}

impl From<SessionImpact> for Row {
    fn from(r: SessionImpact) -> Row {
        Row {
            projection: Projection::SessionImpact,
            entity_id: r.session_id.clone(),
            metric: r.product_id.clone(),
            day: None,
            at_ms: Some(r.start_ms),
            version: (r.version_epoch, r.version_seq),
            deleted: r.deleted,
            body: body(&r),
            user_id: r.user_id,
            source_offsets: r.source_offsets,
        }
    }
}

impl From<ProductImpact> for Row {
    fn from(r: ProductImpact) -> Row {
        Row {
            projection: Projection::ProductImpact,
            entity_id: r.product_id.clone(),
            metric: None,
            day: None,
            at_ms: None,
            version: (r.version_epoch, r.version_seq),
            deleted: r.deleted,
            body: body(&r),
            user_id: r.user_id,
            source_offsets: r.source_offsets,
        }
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
        Progress { projection: r.projection, user_id: r.user_id.clone(), kind: ProgressKind::Row, epoch: r.version.0, source_offsets: r.source_offsets.clone() }
    }
}

pub use vitals_schemas::topics::PROGRESS_HEADER;
