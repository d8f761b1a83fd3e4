//! Rust types of every record in `schemas/avro/`. Field names, order and types mirror the `.avsc`
//! files exactly; `tests` at the bottom round-trip each type through its schema to prove it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Which ingest lane a batch travelled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Lane {
    /// Recent data the app is waiting to show (sample end within the HOT window).
    #[serde(rename = "HOT")]
    Hot,
    /// Backfill: older data, or flagged as backfill by the client.
    #[serde(rename = "COLD")]
    Cold,
    /// Edits and deletions.
    #[serde(rename = "CHANGE")]
    Change,
}

/// The kind of device or app that recorded a sample; drives the default source priority
/// (manual entry > watch > phone > third-party apps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SourceKind {
    #[serde(rename = "MANUAL")]
    Manual,
    #[serde(rename = "WATCH")]
    Watch,
    #[serde(rename = "PHONE")]
    Phone,
    #[serde(rename = "THIRD_PARTY")]
    ThirdParty,
}

/// One normalised health sample. Identity = (user, `source`, `source_record_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub source: String,
    pub source_kind: SourceKind,
    pub source_record_id: String,
    pub metric: String,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Canonical unit; for category metrics the duration in minutes.
    pub value: f64,
    pub unit: String,
    pub category: Option<String>,
    pub time_zone: String,
    pub version: i64,
    pub metadata: HashMap<String, String>,
}

/// HOT / COLD lane record: accepted samples of one user from one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleBatch {
    pub request_id: String,
    pub user_id: String,
    pub received_at_ms: i64,
    pub lane: Lane,
    pub samples: Vec<Sample>,
}

/// Deletes every version of an identity up to `deleted_version` (all versions when `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletion {
    pub source: String,
    pub source_record_id: String,
    pub metric: String,
    pub deleted_version: Option<i64>,
}

/// CHANGE lane record: edits (samples with version > 1) and deletions of one user from one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeBatch {
    pub request_id: String,
    pub user_id: String,
    pub received_at_ms: i64,
    pub edits: Vec<Sample>,
    pub deletions: Vec<Deletion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DomainChangeKind {
    #[serde(rename = "SESSION_STARTED")]
    SessionStarted,
    #[serde(rename = "SESSION_ENDED")]
    SessionEnded,
    #[serde(rename = "SESSION_UPDATED")]
    SessionUpdated,
    #[serde(rename = "SESSION_DELETED")]
    SessionDeleted,
    #[serde(rename = "PRODUCT_UPSERTED")]
    ProductUpserted,
    #[serde(rename = "PRODUCT_DELETED")]
    ProductDeleted,
    #[serde(rename = "PRIVACY_UPDATED")]
    PrivacyUpdated,
    #[serde(rename = "SOURCE_PRIORITY_UPDATED")]
    SourcePriorityUpdated,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub session_id: String,
    pub product_id: Option<String>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub time_zone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub product_id: String,
    pub name: Option<String>,
    pub category: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivacySettings {
    pub health_upload_allowed: bool,
    pub blocked_metrics: Vec<String>,
}

/// One domain change; exactly the payload field matching `kind` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainChange {
    pub change_id: String,
    pub kind: DomainChangeKind,
    pub occurred_at_ms: i64,
    pub session: Option<Session>,
    pub product: Option<Product>,
    pub privacy: Option<PrivacySettings>,
    /// Ordered source names, highest priority first.
    pub source_priority: Option<Vec<String>>,
}

/// Domain-changes topic record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainChangeBatch {
    pub request_id: String,
    pub user_id: String,
    pub received_at_ms: i64,
    pub changes: Vec<DomainChange>,
}

/// A record that could not be processed, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub stage: String,
    pub code: String,
    pub reason: String,
    #[serde(with = "opt_bytes")]
    pub key: Option<Vec<u8>>,
    #[serde(with = "opt_bytes")]
    pub payload: Option<Vec<u8>>,
}

/// How far into one input partition a projection value has been computed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MetricKindRecord {
    #[serde(rename = "CUMULATIVE")]
    Cumulative,
    #[serde(rename = "DISCRETE")]
    Discrete,
    #[serde(rename = "CATEGORY")]
    Category,
    #[serde(rename = "INSTANT")]
    Instant,
}

/// Daily rollup of one metric for one user on one local date.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollupDay {
    pub user_id: String,
    pub metric: String,
    pub local_date: String,
    pub unit: String,
    pub kind: MetricKindRecord,
    pub count: i64,
    pub sum: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
    pub time_weighted_mean: Option<f64>,
    pub last: Option<f64>,
    pub category_minutes: HashMap<String, f64>,
    pub primary_source: Option<String>,
    pub version_epoch: i64,
    pub version_seq: i64,
    pub deleted: bool,
    pub source_offsets: Vec<SourceOffset>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nap {
    pub start_ms: i64,
    pub end_ms: i64,
    pub minutes: f64,
}

/// One night of sleep, dated by the local date of its final wake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SleepNight {
    pub user_id: String,
    pub night_date: String,
    pub source: String,
    pub in_bed_start_ms: i64,
    pub in_bed_end_ms: i64,
    pub sleep_onset_ms: i64,
    pub final_wake_ms: i64,
    pub stage_minutes: HashMap<String, f64>,
    pub total_sleep_minutes: f64,
    pub efficiency: f64,
    pub awakenings: i32,
    pub naps: Vec<Nap>,
    pub version_epoch: i64,
    pub version_seq: i64,
    pub deleted: bool,
    pub source_offsets: Vec<SourceOffset>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImpactStatus {
    #[serde(rename = "PROVISIONAL")]
    Provisional,
    #[serde(rename = "FINAL")]
    Final,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    pub n: i64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub total: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowedMetric {
    pub metric: String,
    pub before: Option<WindowStats>,
    pub during: Option<WindowStats>,
    pub after: Option<WindowStats>,
    pub delta_during: Option<f64>,
    pub delta_after: Option<f64>,
}

/// Before/during/after impact of one consumption session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionImpact {
    pub user_id: String,
    pub session_id: String,
    pub product_id: Option<String>,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
    pub status: ImpactStatus,
    pub metrics: Vec<WindowedMetric>,
    pub version_epoch: i64,
    pub version_seq: i64,
    pub deleted: bool,
    pub source_offsets: Vec<SourceOffset>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaSummary {
    pub metric: String,
    pub n: i64,
    pub mean_delta_during: Option<f64>,
    pub sd_delta_during: Option<f64>,
    pub mean_delta_after: Option<f64>,
    pub sd_delta_after: Option<f64>,
}

/// Per (user, product) summary of the sessions' deltas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductImpact {
    pub user_id: String,
    pub product_id: String,
    pub sessions: i64,
    pub metrics: Vec<DeltaSummary>,
    pub version_epoch: i64,
    pub version_seq: i64,
    pub deleted: bool,
    pub source_offsets: Vec<SourceOffset>,
}

/// Small typed event pushed to app clients when a projection changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealtimeEnvelope {
    pub v: i32,
    pub user_id: String,
    pub event_type: String,
    pub entity_id: String,
    pub version_epoch: i64,
    pub version_seq: i64,
    pub payload: String,
    /// The upload's trace: the sink's span that applied the row (`None`: not traced).
    #[serde(default)]
    pub traceparent: Option<String>,
}

/// Avro `bytes` through serde: apache-avro wants `serialize_bytes`, not a sequence of u8.
mod opt_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&Bytes(b)),
            None => s.serialize_none(),
        }
    }

    struct Bytes<'a>(&'a [u8]);
    impl serde::Serialize for Bytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        struct Opt;
        impl<'de> serde::de::Visitor<'de> for Opt {
            type Value = Option<Vec<u8>>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("optional bytes")
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_bytes(V).map(Some)
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(Some(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
                Ok(Some(v))
            }
        }
        d.deserialize_option(Opt)
    }
}

/// The descriptors of the four projection records above ([`crate::projection`]): their Avro
/// schemas, topics, tables and read endpoints derive from these.
pub mod descriptors {
    use crate::projection::{BuiltFrom, Descriptor, Enum, Field, Order, Projected, Record, Type};

    const OPT_DOUBLE: Type = Type::Optional(&Type::Double);
    const OPT_STRING: Type = Type::Optional(&Type::String);

    pub const ROLLUP_DAY: Descriptor = Descriptor {
        name: "rollup_day",
        record: "RollupDay",
        doc: "Daily rollup of one metric for one user on one local date.",
        fields: &[
            Field::new("metric", Type::String),
            Field::new("local_date", Type::String).doc("YYYY-MM-DD in each sample's own zone."),
            Field::new("unit", Type::String),
            Field::new("kind", Type::Enum(&Enum { name: "MetricKind", symbols: &["CUMULATIVE", "DISCRETE", "CATEGORY", "INSTANT"] })),
            Field::new("count", Type::Long),
            Field::new("sum", OPT_DOUBLE),
            Field::new("min", OPT_DOUBLE),
            Field::new("max", OPT_DOUBLE),
            Field::new("mean", OPT_DOUBLE),
            Field::new("time_weighted_mean", OPT_DOUBLE),
            Field::new("last", OPT_DOUBLE),
            Field::new("category_minutes", Type::Map(&Type::Double)).empty_by_default(),
            Field::new("primary_source", OPT_STRING),
        ],
        key: &["metric", "local_date"],
        group: Some("metric"),
        day: Some("local_date"),
        at: None,
        order: Order::Day,
        built_from: BuiltFrom::Lanes,
    };

    const NAP: Record = Record {
        name: "Nap",
        fields: &[Field::new("start_ms", Type::Long), Field::new("end_ms", Type::Long), Field::new("minutes", Type::Double)],
    };

    pub const SLEEP_NIGHT: Descriptor = Descriptor {
        name: "sleep_night",
        record: "SleepNight",
        doc: "One night of sleep, dated by the local date of its final wake.",
        fields: &[
            Field::new("night_date", Type::String),
            Field::new("source", Type::String),
            Field::new("in_bed_start_ms", Type::Long),
            Field::new("in_bed_end_ms", Type::Long),
            Field::new("sleep_onset_ms", Type::Long),
            Field::new("final_wake_ms", Type::Long),
            Field::new("stage_minutes", Type::Map(&Type::Double)),
            Field::new("total_sleep_minutes", Type::Double),
            Field::new("efficiency", Type::Double),
            Field::new("awakenings", Type::Int),
            Field::new("naps", Type::Array(&Type::Record(&NAP))).empty_by_default(),
        ],
        key: &["night_date"],
        group: None,
        day: Some("night_date"),
        at: Some("final_wake_ms"),
        order: Order::Day,
        built_from: BuiltFrom::Lanes,
    };

    const WINDOW_STATS: Type = Type::Optional(&Type::Record(&Record {
        name: "WindowStats",
        fields: &[
            Field::new("n", Type::Long),
            Field::new("mean", Type::Double),
            Field::new("min", Type::Double),
            Field::new("max", Type::Double),
            Field::new("total", Type::Double),
        ],
    }));

    const WINDOWED_METRIC: Record = Record {
        name: "WindowedMetric",
        fields: &[
            Field::new("metric", Type::String),
            Field::new("before", WINDOW_STATS),
            Field::new("during", WINDOW_STATS),
            Field::new("after", WINDOW_STATS),
            Field::new("delta_during", OPT_DOUBLE),
            Field::new("delta_after", OPT_DOUBLE),
        ],
    };

    pub const SESSION_IMPACT: Descriptor = Descriptor {
        name: "session_impact",
        record: "SessionImpact",
        doc: "Before/during/after impact of one consumption session.",
        fields: &[
            Field::new("session_id", Type::String),
            Field::new("product_id", OPT_STRING),
            Field::new("start_ms", Type::Long),
            Field::new("end_ms", Type::Optional(&Type::Long)),
            Field::new("status", Type::Enum(&Enum { name: "ImpactStatus", symbols: &["PROVISIONAL", "FINAL"] })),
            Field::new("metrics", Type::Array(&Type::Record(&WINDOWED_METRIC))),
        ],
        key: &["session_id"],
        group: Some("product_id"),
        day: None,
        at: Some("start_ms"),
        order: Order::At,
        built_from: BuiltFrom::Lanes,
    };

    const DELTA_SUMMARY: Record = Record {
        name: "DeltaSummary",
        fields: &[
            Field::new("metric", Type::String),
            Field::new("n", Type::Long),
            Field::new("mean_delta_during", OPT_DOUBLE),
            Field::new("sd_delta_during", OPT_DOUBLE),
            Field::new("mean_delta_after", OPT_DOUBLE),
            Field::new("sd_delta_after", OPT_DOUBLE),
        ],
    };

    pub const PRODUCT_IMPACT: Descriptor = Descriptor {
        name: "product_impact",
        record: "ProductImpact",
        doc: "Per (user, product) summary of the sessions' deltas.",
        fields: &[
            Field::new("product_id", Type::String),
            Field::new("sessions", Type::Long),
            Field::new("metrics", Type::Array(&Type::Record(&DELTA_SUMMARY))),
        ],
        key: &["product_id"],
        group: None,
        day: None,
        at: None,
        order: Order::Key,
        built_from: BuiltFrom::Projection("session_impact"),
    };

    impl Projected for super::RollupDay {
        const DESCRIPTOR: &'static Descriptor = &ROLLUP_DAY;
    }
    impl Projected for super::SleepNight {
        const DESCRIPTOR: &'static Descriptor = &SLEEP_NIGHT;
    }
    impl Projected for super::SessionImpact {
        const DESCRIPTOR: &'static Descriptor = &SESSION_IMPACT;
    }
    impl Projected for super::ProductImpact {
        const DESCRIPTOR: &'static Descriptor = &PRODUCT_IMPACT;
    }

    /// The derived schemas are the ones vitals has registered all along: the `.avsc` files kept
    /// in `schemas/avro/` are their reviewed snapshot, and must stay equal to what is derived
    /// (field for field, docs and defaults included), so a descriptor change shows up in review
    /// as a schema diff.
    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn derived_schemas_equal_the_registered_avsc_files() {
            for (d, text) in [
                (ROLLUP_DAY, include_str!("../avro/rollup_day.avsc")),
                (SLEEP_NIGHT, include_str!("../avro/sleep_night.avsc")),
                (SESSION_IMPACT, include_str!("../avro/session_impact.avsc")),
                (PRODUCT_IMPACT, include_str!("../avro/product_impact.avsc")),
            ] {
                d.check().unwrap_or_else(|e| panic!("{e}"));
                let file: serde_json::Value = serde_json::from_str(text).unwrap();
                assert_eq!(d.avro_json(), file, "{}: the descriptor and schemas/avro/{}.avsc differ", d.name, d.name);
                let (derived, filed) = (d.avro().schema(), apache_avro::Schema::parse_str(text).unwrap());
                assert_eq!(derived.canonical_form(), filed.canonical_form());
            }
        }
    }
}
