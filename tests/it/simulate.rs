//! The simulator end to end: realistic uploads of several people through the real edge, every item
//! accepted, and exactly what was accepted is in Kafka, keyed and co-partitioned by user.

use std::collections::BTreeMap;

use rdkafka::Message;
use vitals::simulate::{self, SimConfig, CHANGES_PATH, DELETIONS_PATH, SAMPLES_PATH};
use vitals_schemas::topics::partition_for;
use vitals_schemas::{ChangeBatch, DomainChangeBatch, SampleBatch};

use crate::harness::{key, TestEnv};

#[tokio::test]
async fn simulated_people_upload_through_the_edge_and_everything_accepted_is_in_kafka() {
    let env = TestEnv::start().await;
    let cfg = SimConfig { batch_size: 400, ..env.sim("sim", 42, 3, 3) };
    let plan = simulate::plan(&cfg);
    let planned = |path: &str| plan.iter().filter(|u| u.endpoint == path).map(|u| u.items().len() as u64).sum::<u64>();
    let (samples, deletions, changes) = (planned(SAMPLES_PATH), planned(DELETIONS_PATH), planned(CHANGES_PATH));
    assert!(
        samples > 1000 && deletions > 0 && changes > 0,
        "a realistic plan: {samples} samples, {deletions} deletions, {changes} changes"
    );

    let report = simulate::run(&cfg, &env.http).await.expect("simulated upload");
    assert_eq!(report.rejected, 0, "the simulator's data is valid: {report:?}");
    assert_eq!(report.accepted, samples + deletions + changes, "{report:?}");

    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let users: Vec<String> = (0..cfg.users).map(|i| simulate::user_id(&cfg, i)).collect();
    let mut in_kafka: BTreeMap<&str, u64> = BTreeMap::new();
    for (name, topic) in [("hot", &t.hot), ("cold", &t.cold), ("change", &t.change), ("domain", &t.domain)] {
        for m in env.read(topic).await {
            let user = key(&m);
            assert!(users.contains(&user), "record keyed by a simulated user, got {user}");
            assert_eq!(m.partition(), partition_for(user.as_bytes(), env.cfg.kafka.partitions));
            let payload = m.payload().unwrap();
            let n = match name {
                "hot" | "cold" => codec.decode::<SampleBatch>(payload).await.unwrap().samples.len(),
                "change" => {
                    let c: ChangeBatch = codec.decode(payload).await.unwrap();
                    *in_kafka.entry("deletions").or_default() += c.deletions.len() as u64;
                    c.edits.len()
                }
                _ => codec.decode::<DomainChangeBatch>(payload).await.unwrap().changes.len(),
            };
            *in_kafka.entry(name).or_default() += n as u64;
        }
    }
    let samples_in_kafka = in_kafka.get("hot").copied().unwrap_or(0)
        + in_kafka.get("cold").copied().unwrap_or(0)
        + in_kafka.get("change").copied().unwrap_or(0);
    assert_eq!(samples_in_kafka, samples, "every accepted sample once: {in_kafka:?}");
    assert_eq!(in_kafka.get("deletions").copied().unwrap_or(0), deletions);
    assert_eq!(in_kafka.get("domain").copied().unwrap_or(0), changes);
    assert!(
        in_kafka.get("hot").copied().unwrap_or(0) > 0 && in_kafka.get("cold").copied().unwrap_or(0) > 0,
        "recent days HOT, backfill COLD: {in_kafka:?}"
    );
    env.cleanup().await;
}
