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
    let broken = vitals_schemas::avro::SAMPLE_BATCH.text.replacen(
        r#""fields": ["#,
        r#""fields": [{"name": "device_serial", "type": "string"},"#,
        1,
    );
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
