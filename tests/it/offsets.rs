//! Issue 11, item 3: `vitals offsets show` and what standard lag tools see — the processor
//! group's committed offsets follow its checkpoints, its members carry client ids naming role,
//! processor and instance.

use std::time::Duration;

use vitals::offsets::{self, PartitionRow};
use vitals::simulate;

use crate::harness::{wait_for, TestEnv};
use crate::process::{proc_env, Proc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_show_follows_the_checkpoints_with_owners_and_epochs() {
    let env = TestEnv::start().await;
    let data = std::env::temp_dir().join(format!("vitals-offsets-{}", uuid::Uuid::new_v4().simple()));
    let sim = env.sim("offs", 11, 3, 2);
    assert_eq!(simulate::run(&sim, &env.http).await.unwrap().rejected, 0);
    // Before the processor ever ran: nothing committed, every record is lag.
    let before = offsets::show(&env.cfg, Some("rollup_day")).await.unwrap();
    let uploaded: i64 = before.iter().map(|r| r.high).sum();
    assert!(uploaded > 0, "the uploads are in the lanes: {before:?}");
    assert!(before.iter().all(|r| r.committed.is_none() && r.lag == r.high && r.epoch.is_none()), "{}", offsets::render(&before));
    assert_eq!(before.len(), 4 * env.cfg.kafka.partitions as usize, "every lane × partition");

    let mut p = Proc { env: proc_env(&env, &data), child: None };
    p.set("VITALS_INSTANCE", "it-instance");
    p.start(None);
    // The runtime commits its checkpoints' offsets every few seconds: lag reaches 0 everywhere.
    let rows: Vec<PartitionRow> =
        wait_for("the rollup_day group's committed offsets to reach every lane's high watermark", Duration::from_secs(60), || {
            let env = &env;
            async move {
                let rows = offsets::show(&env.cfg, Some("rollup_day")).await.ok()?;
                rows.iter().all(|r| r.lag == 0 && (r.high == 0 || r.committed == Some(r.high))).then_some(rows)
            }
        })
        .await;
    let text = offsets::render(&rows);
    for r in rows.iter().filter(|r| r.high > 0) {
        assert!(r.epoch.is_some_and(|e| e >= 1), "the owner's epoch of every partition with data: {text}");
    }
    // The group's members are named by role, processor and instance (what the broker and
    // `kafka-consumer-groups` show); the owner column names them where the broker describes
    // assignments.
    let members = wait_for("the group's member list", Duration::from_secs(30), || {
        let env = &env;
        async move {
            let group = vitals::app::processor_group(&env.cfg, "rollup_day");
            let cfg = env.cfg.clone();
            tokio::task::spawn_blocking(move || {
                use rdkafka::consumer::{BaseConsumer, Consumer};
                let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", &cfg.kafka.brokers).create().ok()?;
                let list = c.fetch_group_list(Some(&group), Duration::from_secs(5)).ok()?;
                let ids: Vec<String> =
                    list.groups().iter().flat_map(|g| g.members().iter().map(|m| offsets::member_name(m.client_id(), m.id()))).collect();
                (!ids.is_empty()).then_some(ids)
            })
            .await
            .ok()
            .flatten()
        }
    })
    .await;
    assert!(members.iter().all(|id| id == "vitals-process-rollup_day-it-instance"), "client ids of the group's members: {members:?}");
    // One member: it owns every partition (from the described assignments, or as the sole member).
    for r in &rows {
        assert_eq!(r.owner.as_deref(), Some("vitals-process-rollup_day-it-instance"), "{text}");
    }
    assert!(text.contains("rollup_day: total lag 0"), "{text}");
    // The sink's group too: it commits what PostgreSQL holds, so its lag is visible.
    let mut sink = crate::harness::VitalsProc::new(&["sink"], env.child_env(&data));
    sink.start();
    let group = vitals::app::sink_group(&env.cfg);
    let projection = vec![env.topics().rollup_day];
    wait_for("the sink group's committed offsets to reach rollup_day's high watermarks", Duration::from_secs(60), || {
        let (cfg, group, projection) = (env.cfg.clone(), group.clone(), projection.clone());
        async move {
            let pos = tokio::task::spawn_blocking(move || offsets::group_positions(&cfg, &group, &projection)).await.ok()?.ok()?;
            (pos.iter().any(|p| p.3 > 0) && pos.iter().all(|p| p.3 == 0 || p.2 == Some(p.3))).then_some(())
        }
    })
    .await;
    sink.kill9();
    // An unknown processor is refused with the registered names.
    let err = offsets::show(&env.cfg, Some("nope")).await.unwrap_err().to_string();
    assert!(err.contains("rollup_day") && err.contains("nope"), "{err}");
    p.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
