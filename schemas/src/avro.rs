//! The Avro schemas, embedded from `schemas/avro/`, and the mapping of topic → value schema.

use apache_avro::Schema;

/// One `.avsc` file: its name (also the registry subject suffix) and text.
#[derive(Debug, Clone, Copy)]
pub struct AvroFile {
    pub name: &'static str,
    pub text: &'static str,
}

macro_rules! avsc {
    ($name:literal) => {
        AvroFile { name: $name, text: include_str!(concat!("../avro/", $name, ".avsc")) }
    };
}

pub const SAMPLE_BATCH: AvroFile = avsc!("sample_batch");
pub const CHANGE_BATCH: AvroFile = avsc!("change_batch");
pub const DOMAIN_CHANGE_BATCH: AvroFile = avsc!("domain_change_batch");
pub const DEAD_LETTER: AvroFile = avsc!("dead_letter");
pub const REALTIME_ENVELOPE: AvroFile = avsc!("realtime_envelope");

/// Every hand-written schema the project owns (projection records' schemas are derived from their
/// descriptors, [`crate::projection`]; `rollup_day.avsc` and its three siblings are kept as
/// their reviewed snapshot).
pub const ALL: &[AvroFile] = &[SAMPLE_BATCH, CHANGE_BATCH, DOMAIN_CHANGE_BATCH, DEAD_LETTER, REALTIME_ENVELOPE];

impl AvroFile {
    /// Parses the embedded text. The files are tested to parse, so this only fails if the crate is broken.
    pub fn schema(&self) -> Schema {
        Schema::parse_str(self.text).unwrap_or_else(|e| panic!("embedded schema {} does not parse: {e}", self.name))
    }
}

/// Confluent's TopicNameStrategy: the value subject of `topic`.
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// Proves the Rust types in [`crate::records`] and the `.avsc` files agree: each type's fields (names
/// and order) equal its schema's, and fully populated and minimal values round-trip through the
/// Confluent framing with the schema.
#[cfg(test)]
mod agreement {
    use std::collections::HashMap;

    use apache_avro::types::Value;
    use serde::de::DeserializeOwned;
    use serde::Serialize;

    use super::*;
    use crate::codec::{decode_own, encode_own, encode_with_id, AvroRecord};
    use crate::records::*;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(file: AvroFile, value: T) {
        let schema = file.schema();
        let Schema::Record(rs) = &schema else { panic!("{} is not a record", file.name) };
        let Value::Record(fields) = apache_avro::to_value(&value).unwrap() else { panic!("{} is not a struct", file.name) };
        let rust: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        let avro: Vec<&str> = rs.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(rust, avro, "{}: field names/order differ between Rust and .avsc", file.name);

        let framed = encode_with_id(&schema, 7, &value).unwrap_or_else(|e| panic!("{}: {e}", file.name));
        assert_eq!(&framed[..5], &[0, 0, 0, 0, 7], "Confluent framing");
        #[allow(deprecated)]
        let decoded = apache_avro::from_avro_datum(&schema, &mut &framed[5..], None).unwrap();
        let back: T = apache_avro::from_value(&decoded).unwrap_or_else(|e| panic!("{}: {e}", file.name));
        assert_eq!(back, value, "{}: round trip", file.name);
        fast_agrees(file, &value, &framed);
    }

    /// What vitals writes and reads (serde_avro_fast) is what apache-avro writes and reads.
    fn fast_agrees<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(file: AvroFile, value: &T, reference: &[u8]) {
        let fast = encode_own(file, 7, value).unwrap_or_else(|e| panic!("{}: {e}", file.name));
        assert_eq!(fast, reference, "{}: serde_avro_fast bytes differ from apache-avro's", file.name);
        let back: T = decode_own(file, &reference[5..]).unwrap_or_else(|e| panic!("{}: {e}", file.name));
        assert_eq!(&back, value, "{}: serde_avro_fast round trip", file.name);
        let mut longer = reference[5..].to_vec();
        longer.push(0);
        assert!(decode_own::<T>(file, &longer).unwrap_err().contains("1 bytes after the end"), "{}: trailing bytes refused", file.name);
        if reference.len() > 6 {
            assert!(decode_own::<T>(file, &reference[5..reference.len() - 1]).is_err(), "{}: a truncated body is refused", file.name);
        }
    }

    fn sample(v: i64, category: Option<&str>) -> Sample {
        Sample {
            source: "com.apple.health.watch".into(),
            source_kind: SourceKind::Watch,
            source_record_id: format!("r-{v}"),
            metric: "heart_rate".into(),
            start_ms: 1_700_000_000_000,
            end_ms: 1_700_000_060_000,
            value: 61.5,
            unit: "count/min".into(),
            category: category.map(str::to_owned),
            time_zone: "Europe/Berlin".into(),
            version: v,
            metadata: HashMap::from([("device".into(), "Watch7,1".into())]),
        }
    }

    fn offsets() -> Vec<SourceOffset> {
        vec![SourceOffset { topic: "vitals.health.hot".into(), partition: 3, next_offset: 42 }]
    }

    #[test]
    fn every_schema_parses_and_is_listed_once() {
        let mut names: Vec<_> = ALL.iter().map(|f| f.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for f in ALL {
            f.schema();
        }
    }

    #[test]
    fn ingest_records_agree() {
        for lane in [Lane::Hot, Lane::Cold] {
            round_trip(
                SAMPLE_BATCH,
                SampleBatch {
                    request_id: "req-1".into(),
                    user_id: "u1".into(),
                    received_at_ms: 1_700_000_100_000,
                    lane,
                    samples: vec![sample(1, None), sample(2, Some("deep")), Sample { metadata: HashMap::new(), ..sample(3, None) }],
                },
            );
        }
        round_trip(
            CHANGE_BATCH,
            ChangeBatch {
                request_id: "req-2".into(),
                user_id: "u1".into(),
                received_at_ms: 1,
                edits: vec![sample(2, None)],
                deletions: vec![
                    Deletion { source: "s".into(), source_record_id: "r".into(), metric: "steps".into(), deleted_version: None },
                    Deletion { source: "s".into(), source_record_id: "q".into(), metric: "steps".into(), deleted_version: Some(4) },
                ],
            },
        );
        round_trip(
            DOMAIN_CHANGE_BATCH,
            DomainChangeBatch {
                request_id: "req-3".into(),
                user_id: "u1".into(),
                received_at_ms: 1,
                changes: vec![
                    DomainChange {
                        change_id: "c1".into(),
                        kind: DomainChangeKind::SessionStarted,
                        occurred_at_ms: 5,
                        session: Some(Session {
                            session_id: "s1".into(),
                            product_id: Some("p1".into()),
                            start_ms: Some(5),
                            end_ms: None,
                            time_zone: Some("UTC".into()),
                        }),
                        product: None,
                        privacy: None,
                        source_priority: None,
                    },
                    DomainChange {
                        change_id: "c2".into(),
                        kind: DomainChangeKind::PrivacyUpdated,
                        occurred_at_ms: 6,
                        session: None,
                        product: Some(Product { product_id: "p1".into(), name: None, category: Some("tea".into()) }),
                        privacy: Some(PrivacySettings { health_upload_allowed: true, blocked_metrics: vec!["blood_glucose".into()] }),
                        source_priority: Some(vec!["manual".into(), "watch".into()]),
                    },
                ],
            },
        );
        round_trip(
            DEAD_LETTER,
            DeadLetter {
                source_topic: "t".into(),
                source_partition: 1,
                source_offset: 2,
                stage: "processor:rollup_day".into(),
                code: "undecodable".into(),
                reason: "bad magic byte".into(),
                key: Some(b"u1".to_vec()),
                payload: None,
            },
        );
    }

    #[test]
    fn the_sample_record_is_the_same_on_every_lane() {
        let field = |f: AvroFile, i: usize| {
            let Schema::Record(r) = f.schema() else { unreachable!() };
            let Schema::Array(a) = &r.fields[i].schema else { panic!("{}: field {i} is not an array", f.name) };
            a.items.as_ref().clone()
        };
        assert_eq!(field(SAMPLE_BATCH, 4), field(CHANGE_BATCH, 3));
    }

    #[test]
    fn projection_records_agree() {
        round_trip(
            RollupDay::file(),
            RollupDay {
                user_id: "u1".into(),
                metric: "steps".into(),
                local_date: "2026-03-29".into(),
                unit: "count".into(),
                kind: MetricKindRecord::Cumulative,
                count: 3,
                sum: Some(1234.0),
                min: None,
                max: Some(900.0),
                mean: None,
                time_weighted_mean: None,
                last: None,
                category_minutes: HashMap::new(),
                primary_source: Some("watch".into()),
                version_epoch: 2,
                version_seq: 17,
                deleted: false,
                source_offsets: offsets(),
            },
        );
        round_trip(
            SleepNight::file(),
            SleepNight {
                user_id: "u1".into(),
                night_date: "2026-03-29".into(),
                source: "watch".into(),
                in_bed_start_ms: 1,
                in_bed_end_ms: 2,
                sleep_onset_ms: 1,
                final_wake_ms: 2,
                stage_minutes: HashMap::from([("deep".into(), 60.0)]),
                total_sleep_minutes: 420.0,
                efficiency: 0.93,
                awakenings: 2,
                naps: vec![Nap { start_ms: 5, end_ms: 6, minutes: 20.0 }],
                version_epoch: 1,
                version_seq: 1,
                deleted: true,
                source_offsets: offsets(),
            },
        );
        let stats = WindowStats { n: 3, mean: 70.0, min: 60.0, max: 80.0, total: 210.0 };
        round_trip(
            SessionImpact::file(),
            SessionImpact {
                user_id: "u1".into(),
                session_id: "s1".into(),
                product_id: None,
                start_ms: 1,
                end_ms: Some(2),
                status: ImpactStatus::Final,
                metrics: vec![WindowedMetric {
                    metric: "heart_rate".into(),
                    before: Some(stats.clone()),
                    during: None,
                    after: Some(stats),
                    delta_during: None,
                    delta_after: Some(0.0),
                }],
                version_epoch: 1,
                version_seq: 2,
                deleted: false,
                source_offsets: offsets(),
            },
        );
        round_trip(
            ProductImpact::file(),
            ProductImpact {
                user_id: "u1".into(),
                product_id: "p1".into(),
                sessions: 4,
                metrics: vec![DeltaSummary {
                    metric: "heart_rate".into(),
                    n: 4,
                    mean_delta_during: Some(3.5),
                    sd_delta_during: Some(1.2),
                    mean_delta_after: None,
                    sd_delta_after: None,
                }],
                version_epoch: 1,
                version_seq: 3,
                deleted: false,
                source_offsets: vec![],
            },
        );
        round_trip(
            REALTIME_ENVELOPE,
            RealtimeEnvelope {
                v: 1,
                user_id: "u1".into(),
                event_type: "rollup_day.upserted".into(),
                entity_id: "steps|2026-03-29".into(),
                version_epoch: 1,
                version_seq: 3,
                payload: "{}".into(),
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            },
        );
    }

    mod random {
        use proptest::prelude::*;

        use super::*;

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![Just(String::new()), "[a-z0-9._-]{1,12}", any::<String>()]
        }

        fn sample() -> impl Strategy<Value = Sample> {
            (
                (text(), 0..4u8, text(), text(), any::<i64>(), any::<i64>()),
                (
                    any::<f64>().prop_filter("NaN is never equal to itself", |v| !v.is_nan()),
                    text(),
                    proptest::option::of(text()),
                    text(),
                    any::<i64>(),
                ),
                proptest::collection::hash_map(text(), text(), 0..4),
            )
                .prop_map(
                    |((source, kind, rid, metric, start_ms, end_ms), (value, unit, category, time_zone, version), metadata)| Sample {
                        source,
                        source_kind: [SourceKind::Manual, SourceKind::Watch, SourceKind::Phone, SourceKind::ThirdParty][kind as usize],
                        source_record_id: rid,
                        metric,
                        start_ms,
                        end_ms,
                        value,
                        unit,
                        category,
                        time_zone,
                        version,
                        metadata,
                    },
                )
        }

        fn cross_check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
            file: AvroFile,
            value: &T,
            comparable: bool,
        ) -> Result<(), TestCaseError> {
            let reference = encode_with_id(&file.schema(), 7, value).unwrap();
            let fast = encode_own(file, 7, value).unwrap();
            if comparable {
                prop_assert_eq!(&fast, &reference);
            }
            let by_fast: T = decode_own(file, &reference[5..]).unwrap();
            prop_assert_eq!(&by_fast, value);
            #[allow(deprecated)]
            let datum = apache_avro::from_avro_datum(&file.schema(), &mut &fast[5..], None).unwrap();
            let by_apache: T = apache_avro::from_value(&datum).unwrap();
            prop_assert_eq!(&by_apache, value);
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// Byte-compatibility over arbitrary values: any string (unicode, empty), any i64,
            /// any f64 (NaN compared by bits through the bytes), maps of any size.
            #[test]
            fn serde_avro_fast_writes_and_reads_what_apache_avro_does(
                request_id in text(), user_id in text(), received_at_ms in any::<i64>(), lane in 0..3u8,
                samples in proptest::collection::vec(sample(), 0..6),
                deleted_version in proptest::option::of(any::<i64>()),
            ) {
                let lane = [Lane::Hot, Lane::Cold, Lane::Change][lane as usize];
                // Map entries have no order in Avro, and apache-avro re-hashes maps into its own
                // `HashMap`: bytes are comparable only where no map has two entries. Everywhere,
                // each library reads what the other wrote.
                let comparable = samples.iter().all(|s| s.metadata.len() < 2);
                let batch = SampleBatch { request_id: request_id.clone(), user_id: user_id.clone(), received_at_ms, lane, samples: samples.clone() };
                cross_check(SAMPLE_BATCH, &batch, comparable)?;
                let deletions = samples.iter().map(|s| Deletion { source: s.source.clone(), source_record_id: s.source_record_id.clone(), metric: s.metric.clone(), deleted_version }).collect();
                cross_check(CHANGE_BATCH, &ChangeBatch { request_id, user_id, received_at_ms, edits: samples, deletions }, comparable)?;
            }

            /// Arbitrary bytes never panic the decoder, and it accepts exactly the bodies that
            /// apache-avro reads in full.
            #[test]
            fn arbitrary_bodies_are_accepted_as_apache_avro_accepts_them(body in proptest::collection::vec(any::<u8>(), 0..200)) {
                let fast = decode_own::<SampleBatch>(SAMPLE_BATCH, &body);
                let mut rest = &body[..];
                #[allow(deprecated)]
                let reference = apache_avro::from_avro_datum(&SAMPLE_BATCH.schema(), &mut rest, None)
                    .ok()
                    .filter(|_| rest.is_empty())
                    .and_then(|v| apache_avro::from_value::<SampleBatch>(&v).ok());
                prop_assert_eq!(fast.is_ok(), reference.is_some(), "fast: {:?}", fast.as_ref().err());
            }
        }
    }
}
