//! Every processor at once (`vitals process --all`, one OS process, four runtimes, product_impact
//! chained on session_impact's output) on a realistic simulated workload, `kill -9`ed repeatedly
//! — right between producing an interval's outputs and checkpointing it, and at arbitrary
//! moments while uploads go on — and restarted. Then each output topic, folded by key and
//! version, must equal its processor's oracle: every key right, none missing, none extra, and
//! every key's versions strictly growing along the log.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::Message;
use serde::de::DeserializeOwned;
use vitals::simulate::{self, SimConfig};
use vitals_processors::readiness_baseline::{self, ReadinessBaseline};
use vitals_processors::{product_impact, rollup_day, session_impact, sleep_night, Input};
use vitals_schemas::codec::Codec;
use vitals_schemas::topics::PROGRESS_HEADER;
use vitals_schemas::{ChangeBatch, DomainChangeBatch, ProductImpact, RollupDay, SampleBatch, SessionImpact, SleepNight, SourceOffset};

use crate::harness::{header, key, wait_for_every, TestEnv, VitalsProc};

/// What the fold needs of an output record.
pub(crate) trait Out: DeserializeOwned + vitals_schemas::codec::AvroRecord + Clone + PartialEq + std::fmt::Debug {
    fn version(&self) -> (i64, i64);
    fn deleted(&self) -> bool;
    /// Drops what differs between runs (versions, offsets), leaving the figures.
    fn strip(&mut self);
}

macro_rules! out {
    ($t:ty) => {
        impl Out for $t {
            fn version(&self) -> (i64, i64) {
                (self.version_epoch, self.version_seq)
            }
            fn deleted(&self) -> bool {
                self.deleted
            }
            fn strip(&mut self) {
                self.version_epoch = 0;
                self.version_seq = 0;
                self.source_offsets = Vec::<SourceOffset>::new();
            }
        }
    };
}
out!(RollupDay);
out!(SleepNight);
out!(SessionImpact);
out!(ProductImpact);
out!(ReadinessBaseline);

/// Folds `topic` like a sink: per key the newest version; asserts versions grow strictly along
/// each partition's log per key. Returns the live rows (stripped) and how many records it read.
pub(crate) async fn fold<T: Out>(env: &TestEnv, codec: &Codec, topic: &str) -> (BTreeMap<String, T>, usize) {
    let records = env.read(topic).await;
    let mut latest: BTreeMap<String, T> = BTreeMap::new();
    let mut last: BTreeMap<String, T> = BTreeMap::new();
    let mut sorted: Vec<_> = records.iter().collect();
    sorted.sort_by_key(|m| (m.partition(), m.offset()));
    for m in sorted {
        let k = key(m);
        let r: T = codec.decode(m.payload().unwrap()).await.unwrap();
        if let Some(prev) = latest.get(&k) {
            assert!(
                r.version() > prev.version(),
                "{topic}: versions of {k} must grow along the log: {:?} after {:?}",
                r.version(),
                prev.version()
            );
        }
        latest.insert(k.clone(), r.clone());
        last.insert(k, r);
    }
    let live = |m: BTreeMap<String, T>| -> BTreeMap<String, T> {
        m.into_iter()
            .filter(|(_, r)| !r.deleted())
            .map(|(k, mut r)| {
                r.strip();
                (k, r)
            })
            .collect()
    };
    let (by_version, compacted) = (live(latest), live(last));
    // Compaction keeps the last record of every key by offset: it must be the newest version.
    assert!(by_version == compacted, "{topic}: {}", diff("compacted vs by version", &compacted, &by_version));
    (by_version, records.len())
}

/// Every input record with its partition and log timestamp.
async fn inputs_by_partition(env: &TestEnv, codec: &Codec) -> BTreeMap<i32, (Vec<Input>, i64)> {
    let t = env.topics();
    let mut out: BTreeMap<i32, (Vec<Input>, i64)> = BTreeMap::new();
    for topic in [&t.hot, &t.cold, &t.change, &t.domain] {
        for m in env.read(topic).await {
            let p = m.payload().unwrap();
            let input = if topic == &t.hot || topic == &t.cold {
                Input::Samples(codec.decode::<SampleBatch>(p).await.unwrap())
            } else if topic == &t.change {
                Input::Changes(codec.decode::<ChangeBatch>(p).await.unwrap())
            } else {
                Input::Domain(codec.decode::<DomainChangeBatch>(p).await.unwrap())
            };
            let e = out.entry(m.partition()).or_default();
            e.0.push(input);
            e.1 = e.1.max(m.timestamp().to_millis().unwrap_or(0));
        }
    }
    out
}

fn strip_all<T: Out>(m: BTreeMap<String, T>) -> BTreeMap<String, T> {
    m.into_iter()
        .map(|(k, mut v)| {
            v.strip();
            (k, v)
        })
        .collect()
}

/// The four expected projections. session_impact's status depends on stream time, which is per
/// partition (the greatest input timestamp), so its oracle runs per partition.
pub(crate) struct Expected {
    pub rollup: BTreeMap<String, RollupDay>,
    pub sleep: BTreeMap<String, SleepNight>,
    pub session: BTreeMap<String, SessionImpact>,
    pub readiness: BTreeMap<String, ReadinessBaseline>,
}

pub(crate) async fn expected(env: &TestEnv, codec: &Codec) -> Expected {
    let parts = inputs_by_partition(env, codec).await;
    let all: Vec<Input> = parts.values().flat_map(|(i, _)| i.iter().cloned()).collect();
    let mut session = BTreeMap::new();
    for (inputs, stream_time) in parts.values() {
        session.extend(session_impact::oracle(inputs, *stream_time));
    }
    Expected {
        rollup: strip_all(rollup_day::oracle(&all)),
        sleep: strip_all(sleep_night::oracle(&all)),
        session: strip_all(session),
        readiness: strip_all(readiness_baseline::oracle(&all)),
    }
}

/// product_impact's oracle over session_impact's actual output (every record, not progress
/// markers): it is a function of the impacts it consumed.
pub(crate) async fn expected_products(env: &TestEnv, codec: &Codec) -> BTreeMap<String, ProductImpact> {
    let mut impacts = Vec::new();
    for m in env.read(&env.topics().session_impact).await {
        if header(&m, PROGRESS_HEADER).is_none() {
            impacts.push(codec.decode::<SessionImpact>(m.payload().unwrap()).await.unwrap());
        }
    }
    strip_all(product_impact::oracle(&impacts))
}

fn diff<T: std::fmt::Debug + PartialEq>(what: &str, got: &BTreeMap<String, T>, want: &BTreeMap<String, T>) -> String {
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).take(3).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).take(3).collect();
    let wrong: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .take(2)
        .map(|(k, v)| format!("{k}: want {v:?}\n   got {:?}", got[k]))
        .collect();
    format!("{what}: {} rows vs {} expected; missing {missing:?} extra {extra:?}\n{}", got.len(), want.len(), wrong.join("\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_processor_killed_at_any_point_equals_its_oracle() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let data = std::env::temp_dir().join(format!("vitals-all-{}", uuid::Uuid::new_v4().simple()));
    let mut vars = env.child_env(&data);
    vars.retain(|(k, _)| k != "VITALS_PROCESSORS__MAX_BATCH");
    vars.push(("VITALS_PROCESSORS__MAX_BATCH".into(), "7".into()));
    let sim = |prefix: &str, seed: u64, users: usize, days: u32| SimConfig { ..env.sim(prefix, seed, users, days) };
    assert_eq!(simulate::run(&sim("a", 1, 3, 3), &env.http).await.unwrap().rejected, 0);
    let out_records =
        || async { env.read(&t.rollup_day).await.len() + env.read(&t.sleep_night).await.len() + env.read(&t.session_impact).await.len() };

    // Crash exactly between acknowledged outputs and their checkpoint, three times.
    // Every run reads with other batch boundaries, so no replay retraces its predecessor's intervals.
    let mut sizes = [7usize, 2, 13, 4, 29, 3, 9].into_iter().cycle();
    let mut with_batch = |vars: &Vec<(String, String)>| {
        let mut v = vars.clone();
        v.retain(|(k, _)| k != "VITALS_PROCESSORS__MAX_BATCH");
        v.push(("VITALS_PROCESSORS__MAX_BATCH".into(), sizes.next().unwrap().to_string()));
        v
    };
    for n in [1u64, 2, 3] {
        let mut p = VitalsProc::new(&["process", "--all", "--crash-after-produce", &n.to_string()], with_batch(&vars));
        p.start();
        let status = p.wait_exit("the failpoint abort", Duration::from_secs(120)).await;
        assert!(!status.success(), "aborted at the failpoint: {status:?}");
    }
    // kill -9 at arbitrary moments while more people upload.
    let mut p = VitalsProc::new(&["process", "--all"], vars.clone());
    for round in 0..3u64 {
        let before = out_records().await;
        p.env = with_batch(&vars);
        p.start();
        let wave = {
            let cfg = sim(&format!("w{round}"), 10 + round, 1, 2);
            let http = env.http.clone();
            tokio::spawn(async move { simulate::run(&cfg, &http).await })
        };
        wait_for_every("the processors to emit more", Duration::from_secs(120), Duration::from_millis(300), || async {
            (out_records().await > before).then_some(())
        })
        .await;
        p.kill9();
        assert_eq!(wave.await.unwrap().unwrap().rejected, 0);
    }

    // The last run catches up: every topic equals its oracle.
    p.env = with_batch(&vars);
    p.start();
    let want = expected(&env, &codec).await;
    assert!(
        want.rollup.len() > 50 && !want.sleep.is_empty() && !want.session.is_empty(),
        "a realistic workload: {} rollups, {} nights, {} sessions",
        want.rollup.len(),
        want.sleep.len(),
        want.session.len()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (rollup, _) = fold::<RollupDay>(&env, &codec, &t.rollup_day).await;
        let (sleep, _) = fold::<SleepNight>(&env, &codec, &t.sleep_night).await;
        let (session, _) = fold::<SessionImpact>(&env, &codec, &t.session_impact).await;
        let (product, _) = fold::<ProductImpact>(&env, &codec, &t.product_impact).await;
        let want_products = expected_products(&env, &codec).await;
        let readiness_topic = vitals_schemas::projection::Projection::of::<ReadinessBaseline>().topic(&t);
        let (readiness, _) = fold::<ReadinessBaseline>(&env, &codec, &readiness_topic).await;
        let ok = [
            rollup == want.rollup,
            sleep == want.sleep,
            session == want.session,
            product == want_products && !product.is_empty(),
            readiness == want.readiness && !readiness.is_empty(),
        ];
        if ok.iter().all(|x| *x) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not equal to the oracles after 120 s ({ok:?}):\n{}\n{}\n{}\n{}\n{}",
            diff("rollup_day", &rollup, &want.rollup),
            diff("sleep_night", &sleep, &want.sleep),
            diff("session_impact", &session, &want.session),
            diff("product_impact", &product, &want_products),
            diff("readiness_baseline", &readiness, &want.readiness)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    p.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
