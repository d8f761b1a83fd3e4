//! `vitals schemas register|check` and `vitals topics create` against the real registry and broker.

use vitals::app;
use vitals_schemas::avro::AvroFile;

use crate::harness::TestEnv;

#[tokio::test]
async fn topics_and_schemas_setup_is_idempotent_and_check_catches_incompatible_changes() {
    let env = TestEnv::start().await;
    // Second runs change nothing and succeed.
    let again = app::create_topics(&env.cfg).await.unwrap();
    assert!(again.iter().all(|l| l.starts_with("exists")), "{again:?}");
    let ids1 = app::register_schemas(&env.cfg).await.unwrap();
    let ids2 = app::register_schemas(&env.cfg).await.unwrap();
    assert_eq!(ids1, ids2, "re-registering returns the same ids");
    assert!(app::check_schemas(&env.cfg).await.unwrap().is_empty());

    // Every keyed topic has the configured partition count (co-partitioning).
    let names: Vec<String> = env.topics().specs().into_iter().map(|s| s.name).collect();
    let found = app::topic_partitions(&env.cfg, &names).await.unwrap();
    assert_eq!(found.len(), names.len());
    assert!(found.iter().all(|(_, n)| *n as i32 == env.cfg.kafka.partitions), "{found:?}");

    // A new required field without a default breaks BACKWARD compatibility: check says so.
    let codec = app::codec(&env.cfg);
    let topic = env.topics().hot;
    let broken =
        vitals_schemas::avro::SAMPLE_BATCH.text.replacen(r#""fields": ["#, r#""fields": [{"name": "device_serial", "type": "string"},"#, 1);
    let broken = AvroFile { name: "sample_batch", text: Box::leak(broken.into_boxed_str()) };
    assert!(!codec.is_compatible(&topic, &broken).await.unwrap());
    // With a default it is compatible.
    let fine = vitals_schemas::avro::SAMPLE_BATCH.text.replacen(
        r#""fields": ["#,
        r#""fields": [{"name": "device_serial", "type": "string", "default": ""},"#,
        1,
    );
    let fine = AvroFile { name: "sample_batch", text: Box::leak(fine.into_boxed_str()) };
    assert!(codec.is_compatible(&topic, &fine).await.unwrap());
    env.cleanup().await;
}

/// Issue 9, item 4. Before: processors decoded with the writer's schema only, so a compatible
/// new version that drops a defaulted field (`metadata`) made every record undecodable
/// (`missing field metadata`: dead letters); and the encoder wrote with whatever version was
/// latest under the subject, whoever registered it.
#[tokio::test]
async fn a_compatible_schema_change_decodes_and_vitals_encodes_with_its_own_schema() {
    use apache_avro::types::Value;
    use vitals_schemas::codec::{encode_with_id, frame, Codec};
    use vitals_schemas::{Lane, Sample, SampleBatch, SourceKind};

    let env = TestEnv::start().await;
    let topic = env.topics().hot;
    let r = &env.cfg.registry;
    let admin = Codec::new(&r.url).with_basic_auth(&r.admin_user, r.admin_password.expose());
    let own_id = app::codec(&env.cfg).own_id(&topic, vitals_schemas::avro::SAMPLE_BATCH).await.unwrap();
    // A third party registers a version without `metadata` (compatible: it had a default).
    let v2_text = vitals_schemas::avro::SAMPLE_BATCH.text.replacen(
        r#",
        {"name": "metadata", "type": {"type": "map", "values": "string"}, "default": {}}"#,
        "",
        1,
    );
    assert_ne!(v2_text, vitals_schemas::avro::SAMPLE_BATCH.text, "the field was removed");
    let v2 = AvroFile { name: "sample_batch", text: Box::leak(v2_text.into_boxed_str()) };
    let v2_id = admin.register(&topic, &v2).await.expect("a compatible version registers");
    assert_ne!(v2_id, own_id);

    // A record written with it, as that producer would.
    let sample = Sample {
        source: "watch".into(),
        source_kind: SourceKind::Watch,
        source_record_id: "r1".into(),
        metric: "heart_rate".into(),
        start_ms: 1_790_000_000_000,
        end_ms: 1_790_000_000_000,
        value: 61.0,
        unit: "count/min".into(),
        category: None,
        time_zone: "UTC".into(),
        version: 1,
        metadata: Default::default(),
    };
    let batch = SampleBatch { request_id: "q".into(), user_id: "u".into(), received_at_ms: 1, lane: Lane::Hot, samples: vec![sample] };
    let Value::Record(mut fields) = apache_avro::to_value(&batch).unwrap() else { panic!("a record") };
    for (name, v) in fields.iter_mut() {
        if let (true, Value::Array(samples)) = (name == "samples", v) {
            for s in samples {
                if let Value::Record(f) = s {
                    f.retain(|(n, _)| n != "metadata");
                }
            }
        }
    }
    let v2_schema = apache_avro::Schema::parse_str(v2.text).unwrap();
    let body = apache_avro::writer::datum::GenericDatumWriter::builder(&v2_schema)
        .build()
        .unwrap()
        .write_value_to_vec(Value::Record(fields))
        .unwrap();
    let mut bytes = vec![0];
    bytes.extend_from_slice(&v2_id.to_be_bytes());
    bytes.extend_from_slice(&body);
    // vitals decodes it by resolution into its own schema: metadata takes its default.
    let fresh = app::codec(&env.cfg);
    let back: SampleBatch = fresh.decode(&bytes).await.expect("a compatible writer schema resolves into ours");
    assert_eq!(back, batch);
    // And writes with its own schema, not the third party's latest.
    let written = fresh.encode(&topic, &batch).await.unwrap();
    assert_eq!(frame(&written).unwrap().0, own_id, "encoded with vitals' schema id, not the latest ({v2_id})");
    assert_eq!(written, encode_with_id(&vitals_schemas::avro::SAMPLE_BATCH.schema(), own_id, &batch).unwrap());
    env.cleanup().await;
}
