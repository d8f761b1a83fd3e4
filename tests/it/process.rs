//! The processor runtime against the real broker: `vitals process rollup_day` runs as a separate
//! OS process, is `kill -9`ed repeatedly (including right between producing an interval's outputs
//! and committing its checkpoint) and restarted while uploads go on; the output topic, folded by
//! key and version, must then equal the oracle computed from the inputs — every key right, none
//! missing, none extra — and every key's versions must grow strictly in the log.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::Message;
use vitals::simulate::{self, SimConfig};
use vitals_processors::rollup_day;
use vitals_processors::Input;
use vitals_schemas::codec::Codec;
use vitals_schemas::{ChangeBatch, DomainChangeBatch, RollupDay, SampleBatch};

use crate::harness::{wait_for, wait_for_every, TestEnv};

pub(crate) struct Proc {
    pub(crate) env: Vec<(String, String)>,
    pub(crate) child: Option<Child>,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
    /// Whether the process is stopped (SIGSTOP), from `/proc/<pid>/stat`.
    pub(crate) fn stopped(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // `pid (comm) state …`: the state follows the last `)`.
        stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
    }
    /// SIGSTOP / SIGCONT: freeze the process as a long GC pause or a partitioned host would.
    pub(crate) fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap().success();
        assert!(ok, "kill -{sig}");
    }
    pub(crate) fn start(&mut self, crash_after_produce: Option<u64>) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vitals"));
        without_aws_settings(&mut cmd);
        cmd.args(["process", "rollup_day"])
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(n) = crash_after_produce {
            cmd.arg("--crash-after-produce").arg(n.to_string());
        }
        self.child = Some(cmd.spawn().expect("starting vitals process"));
    }
    /// Sets (or replaces) one environment variable of the next start.
    pub(crate) fn set(&mut self, key: &str, value: impl ToString) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_string()));
    }
    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
    /// Waits for a process started with `--crash-after-produce` to abort by itself.
    async fn wait_for_abort(&mut self) {
        let c = self.child.as_mut().expect("running");
        let status = wait_for("the failpoint abort", Duration::from_secs(120), || {
            let s = c.try_wait().unwrap();
            async move { s }
        })
        .await;
        assert!(!status.success(), "aborted at the failpoint, got {status:?}");
        self.child = None;
    }
}

/// Nothing of the runner's AWS settings reaches `cmd`: the S3 credentials are the test's
/// (snapshot.rs checks which credential source signs).
pub(crate) fn without_aws_settings(cmd: &mut Command) {
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AWS_")) {
        cmd.env_remove(k);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub(crate) async fn inputs(env: &TestEnv, codec: &Codec) -> Vec<Input> {
    let t = env.topics();
    let mut out = Vec::new();
    for topic in [&t.hot, &t.cold] {
        for m in env.read(topic).await {
            out.push(Input::Samples(codec.decode::<SampleBatch>(m.payload().unwrap()).await.unwrap()));
        }
    }
    for m in env.read(&t.change).await {
        out.push(Input::Changes(codec.decode::<ChangeBatch>(m.payload().unwrap()).await.unwrap()));
    }
    for m in env.read(&t.domain).await {
        out.push(Input::Domain(codec.decode::<DomainChangeBatch>(m.payload().unwrap()).await.unwrap()));
    }
    out
}

/// Folds the output topic: per key the record with the greatest version; checks versions grow
/// strictly per key along each partition's log, and that compaction (the last record per key by
/// offset) keeps the same. Returns (live rows without version fields, records).
pub(crate) async fn fold(env: &TestEnv, codec: &Codec) -> (BTreeMap<String, RollupDay>, i64) {
    let f = fold_with(env, codec, true).await;
    assert_eq!(f.by_version, f.compacted, "the last record of every key by offset is its newest version");
    (f.by_version, f.end)
}

/// The output topic folded two ways.
pub(crate) struct Folded {
    /// What a consumer keeping the newest version per key holds.
    pub(crate) by_version: BTreeMap<String, RollupDay>,
    /// What log compaction keeps: the last record of every key by offset.
    pub(crate) compacted: BTreeMap<String, RollupDay>,
    /// How far the log has been written: per partition the last offset read + 1, summed. It
    /// only grows — unlike the number of records read, which compaction lowers — so "the
    /// processor emitted more" is measured with it.
    pub(crate) end: i64,
}

fn live(m: BTreeMap<String, RollupDay>) -> BTreeMap<String, RollupDay> {
    m.into_iter()
        .filter(|(_, r)| !r.deleted)
        .map(|(k, mut r)| {
            r.version_epoch = 0;
            r.version_seq = 0;
            r.source_offsets.clear();
            (k, r)
        })
        .collect()
}

/// Folds like a sink (per key the greatest version wins) and like compaction (per key the last
/// record by offset). With `log_monotonic`, also asserts that versions only grow along the log
/// (true unless a zombie wrote late).
pub(crate) async fn fold_with(env: &TestEnv, codec: &Codec, log_monotonic: bool) -> Folded {
    let records = env.read(&env.topics().rollup_day).await;
    let mut latest: BTreeMap<String, RollupDay> = BTreeMap::new();
    let mut last: BTreeMap<String, RollupDay> = BTreeMap::new();
    let mut by_part: BTreeMap<i32, Vec<_>> = BTreeMap::new();
    for m in &records {
        by_part.entry(m.partition()).or_default().push(m);
    }
    let end = by_part.values().map(|ms| ms.iter().map(|m| m.offset() + 1).max().unwrap_or(0)).sum();
    for (_, mut ms) in by_part {
        ms.sort_by_key(|m| m.offset());
        for m in ms {
            if crate::harness::header(m, vitals_schemas::topics::PROGRESS_HEADER).is_some() {
                continue;
            }
            let key = String::from_utf8_lossy(m.key().unwrap()).into_owned();
            let r: RollupDay = codec.decode(m.payload().unwrap()).await.unwrap();
            last.insert(key.clone(), r.clone());
            if let Some(prev) = latest.get(&key) {
                if !log_monotonic {
                    if (r.version_epoch, r.version_seq) > (prev.version_epoch, prev.version_seq) {
                        latest.insert(key, r);
                    }
                    continue;
                }
                assert!(
                    (r.version_epoch, r.version_seq) > (prev.version_epoch, prev.version_seq),
                    "versions of {key} must grow along the log: {:?} after {:?}",
                    (r.version_epoch, r.version_seq),
                    (prev.version_epoch, prev.version_seq)
                );
            }
            latest.insert(key, r);
        }
    }
    Folded { by_version: live(latest), compacted: live(last), end }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollup_day_killed_at_any_point_still_equals_the_oracle() {
    let env = TestEnv::start().await;
    let data = std::env::temp_dir().join(format!("vitals-proc-{}", uuid::Uuid::new_v4().simple()));
    let mut env_vars = proc_env(&env, &data);
    // Small intervals: many checkpoints, many places to die between.
    env_vars.retain(|(k, _)| k != "VITALS_PROCESSORS__MAX_BATCH");
    env_vars.push(("VITALS_PROCESSORS__MAX_BATCH".into(), "7".into()));
    // The runtime's own progress (assignments, takeovers, catch-up) in the log: once, under a
    // full suite's load, a restarted owner emitted nothing for 120 s; a rerun must say why.
    env_vars.retain(|(k, _)| k != "RUST_LOG");
    env_vars.push(("RUST_LOG".into(), std::env::var("VITALS_TEST_CHILD_LOG").unwrap_or_else(|_| "warn,vitals_runtime=info".into())));
    let mut proc = Proc { env: env_vars, child: None };
    let sim = |prefix: &str, seed: u64| env.sim(prefix, seed, 3, 3);
    let codec = vitals::app::codec(&env.cfg);
    let first = simulate::run(&sim("a", 1), &env.http).await.unwrap();
    assert_eq!(first.rejected, 0);

    // Every run reads with other batch boundaries, so a replay never retraces its predecessor's
    // intervals (what a deletion read before or after its sample changes is then exercised).
    let mut sizes = [7usize, 2, 13, 4, 29, 3, 9, 1].into_iter().cycle();
    // Crash exactly between an interval's acknowledged outputs and its checkpoint, three times.
    for n in [1u64, 2, 3] {
        proc.set("VITALS_PROCESSORS__MAX_BATCH", sizes.next().unwrap());
        proc.start(Some(n));
        proc.wait_for_abort().await;
    }
    // kill -9 at arbitrary moments while more people upload: each round starts the processor,
    // starts a new wave of uploads, and kills the processor as soon as its output has grown.
    for round in 0..4u64 {
        let before = fold(&env, &codec).await.1;
        proc.set("VITALS_PROCESSORS__MAX_BATCH", sizes.next().unwrap());
        proc.start(None);
        let wave = {
            let cfg = SimConfig { users: 1, days: 2, ..sim(&format!("w{round}"), 10 + round) };
            let http = env.http.clone();
            tokio::spawn(async move { simulate::run(&cfg, &http).await })
        };
        wait_for_every("the processor to emit more", Duration::from_secs(120), Duration::from_millis(300), || {
            let env = &env;
            let codec = &codec;
            async move { (fold(env, codec).await.1 > before).then_some(()) }
        })
        .await;
        proc.kill9();
        let report = wave.await.unwrap().unwrap();
        assert_eq!(report.rejected, 0);
    }

    // The last run catches up; then the projection is exactly the oracle's.
    proc.set("VITALS_PROCESSORS__MAX_BATCH", sizes.next().unwrap());
    proc.start(None);
    let all_inputs = inputs(&env, &codec).await;
    let expected = rollup_day::oracle(&all_inputs);
    assert!(expected.len() > 50, "a realistic workload: {} rollup rows", expected.len());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let got = loop {
        let (got, _) = fold(&env, &codec).await;
        if got == expected {
            break got;
        }
        if std::time::Instant::now() > deadline {
            let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).take(5).collect();
            let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).take(5).collect();
            let wrong: Vec<_> = expected
                .iter()
                .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
                .take(3)
                .map(|(k, v)| format!("{k}: want {v:?}\n  got {:?}", got[k]))
                .collect();
            panic!(
                "projection != oracle after 120 s: {} rows vs {} expected\nmissing {missing:?}\nextra {extra:?}\nwrong:\n{}",
                got.len(),
                expected.len(),
                wrong.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(got.len(), expected.len());
    proc.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

pub(crate) fn proc_env(env: &TestEnv, data: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("VITALS_KAFKA__BROKERS".into(), env.cfg.kafka.brokers.clone()),
        ("VITALS_KAFKA__TOPIC_PREFIX".into(), env.cfg.kafka.topic_prefix.clone()),
        ("VITALS_KAFKA__PARTITIONS".into(), env.cfg.kafka.partitions.to_string()),
        ("VITALS_REGISTRY__URL".into(), env.cfg.registry.url.clone()),
        ("VITALS_POSTGRES__URL".into(), env.db_url.clone()),
        ("VITALS_PROCESSORS__DATA_DIR".into(), data.display().to_string()),
        ("VITALS_PROCESSORS__MAX_BATCH".into(), "5".into()),
        ("VITALS_PROCESSORS__MAX_WAIT_MS".into(), "50".into()),
        // The tests sign with the development secret committed in config/default.toml.
        ("VITALS_AUTH__ALLOW_INSECURE_DEV_SECRET".into(), "true".into()),
        ("RUST_LOG".into(), std::env::var("VITALS_TEST_CHILD_LOG").unwrap_or_else(|_| "warn".into())),
    ]
}

/// Two instances share the partitions; one is frozen mid-stream (SIGSTOP) until the other has
/// taken its partitions over, then thawed: whatever it writes late carries an older epoch and
/// changes nothing. The second instance had no local state for the partitions it took over and
/// rebuilt it by replaying them. The projection still equals the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_between_instances_and_a_frozen_zombie_change_nothing() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let base = std::env::temp_dir().join(format!("vitals-proc-{}", uuid::Uuid::new_v4().simple()));
    let sim = |prefix: &str, seed: u64, users: usize| env.sim(prefix, seed, users, 2);
    let grown = |before: i64| {
        let env = &env;
        let codec = &codec;
        move || async move { (fold_with(env, codec, false).await.end > before).then_some(()) }
    };
    assert_eq!(simulate::run(&sim("a", 1, 3), &env.http).await.unwrap().rejected, 0);

    let mut a = Proc { env: proc_env(&env, &base.join("a")), child: None };
    let mut b = Proc { env: proc_env(&env, &base.join("b")), child: None };
    a.start(None);
    let n0 = fold_with(&env, &codec, false).await.end;
    wait_for_every("instance A to emit", Duration::from_secs(60), Duration::from_millis(300), grown(n0)).await;
    // B joins: the group rebalances and the partitions are split between A and B.
    b.start(None);
    let wave = {
        let cfg = sim("b", 2, 3);
        let http = env.http.clone();
        tokio::spawn(async move { simulate::run(&cfg, &http).await })
    };
    let n1 = fold_with(&env, &codec, false).await.end;
    wait_for_every("output after B joined", Duration::from_secs(60), Duration::from_millis(300), grown(n1)).await;
    // Freeze A mid-stream. Its session expires and the group gives its partitions to B, which
    // bumps their epochs.
    let epochs = || async {
        sqlx::query_scalar::<_, i64>("SELECT coalesce(sum(epoch), 0)::bigint FROM processor_epochs").fetch_one(&env.pool).await.unwrap()
    };
    a.signal("STOP");
    let frozen_at = epochs().await;
    assert_eq!(wave.await.unwrap().unwrap().rejected, 0);
    // More people upload meanwhile (six users: some land on A's partitions).
    let mut c = sim("c", 3, 6);
    c.days = 1;
    assert_eq!(simulate::run(&c, &env.http).await.unwrap().rejected, 0);
    wait_for_every("B to take A's partitions over (epochs bumped)", Duration::from_secs(60), Duration::from_millis(300), || async {
        (epochs().await > frozen_at).then_some(())
    })
    .await;
    // While A is frozen, B alone brings the projection to the oracle: it took A's partitions
    // over (rebuilding their state by replaying them, having none locally).
    let expected = rollup_day::oracle(&inputs(&env, &codec).await);
    let equal = || {
        let env = &env;
        let codec = &codec;
        let expected = &expected;
        move || async move {
            let f = fold_with(env, codec, false).await;
            (f.by_version == *expected && f.compacted == *expected).then_some(())
        }
    };
    wait_for_every("B alone to reach the oracle", Duration::from_secs(120), Duration::from_millis(500), equal()).await;
    // Thaw the zombie: it rejoins (a rebalance bumps epochs) and may finish an interval it had
    // started, with its old epoch. Nothing it writes changes the projection.
    let before = epochs().await;
    a.signal("CONT");
    wait_for_every("the thawed instance to rejoin (epochs bumped)", Duration::from_secs(60), Duration::from_millis(300), || async {
        (epochs().await > before).then_some(())
    })
    .await;
    wait_for_every(
        "the projection to equal the oracle after the zombie woke",
        Duration::from_secs(120),
        Duration::from_millis(500),
        equal(),
    )
    .await;
    a.kill9();
    b.kill9();
    let _ = std::fs::remove_dir_all(&base);
    env.cleanup().await;
}

/// HOT is never starved by a COLD backfill: facing a large COLD backlog uploaded before it, a HOT
/// upload's rollup is emitted before the processor has worked through that partition's COLD lane
/// (the HOT row's own source offsets show COLD still behind its end), and within 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_is_not_starved_by_a_cold_backfill() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let data = std::env::temp_dir().join(format!("vitals-proc-{}", uuid::Uuid::new_v4().simple()));
    // The backfill: many people's history, all flagged backfill (COLD), uploaded before the
    // processor starts so it meets one large backlog.
    let backfill = SimConfig {
        now_ms: chrono::Utc::now().timestamp_millis() - 3 * 86_400_000,
        concurrency: 4,
        batch_size: 500,
        edits_and_deletions: false,
        ..env.sim("cold", 7, 8, 10)
    };
    assert_eq!(simulate::run(&backfill, &env.http).await.unwrap().rejected, 0);
    let t = env.topics();
    let cold = env.read(&t.cold).await;
    assert!(cold.len() > 50, "a large COLD backlog: {} records of up to 500 samples", cold.len());
    // The HOT user lives on the partition with the largest COLD backlog.
    let mut per_partition: BTreeMap<i32, usize> = BTreeMap::new();
    for m in &cold {
        *per_partition.entry(m.partition()).or_default() += 1;
    }
    let busiest = per_partition.iter().max_by_key(|(_, n)| **n).map(|(p, _)| *p).unwrap();
    let user = (0..)
        .map(|i| format!("hot-{i}-{}", uuid::Uuid::new_v4().simple()))
        .find(|u| vitals_schemas::topics::partition_for(u.as_bytes(), env.cfg.kafka.partitions) == busiest)
        .unwrap();

    env.consent(&user, &[]).await;
    let now = chrono::Utc::now();
    let body = serde_json::json!({"request_id": "hot-1", "samples": [{
        "source": "watch", "source_kind": "watch", "source_record_id": "hr-now", "metric": "heart_rate",
        "start": now.to_rfc3339(), "value": 64, "unit": "bpm", "time_zone": "UTC"}]});
    let (status, _, resp) = env.post("/v1/health/samples:batch", &user, &body).await;
    assert_eq!(status, 200, "{resp}");
    // The processor starts facing the whole COLD backlog with the HOT record already behind it
    // in arrival order; small intervals, so working through COLD takes many of them.
    let mut env_vars = proc_env(&env, &data);
    env_vars.retain(|(k, _)| k != "VITALS_PROCESSORS__MAX_BATCH");
    env_vars.push(("VITALS_PROCESSORS__MAX_BATCH".into(), "5".into()));
    let mut p = Proc { env: env_vars, child: None };
    let t0 = std::time::Instant::now();
    p.start(None);
    let key = format!("{user}|heart_rate|{}", now.date_naive());
    let row = wait_for_every("the HOT upload's rollup", Duration::from_secs(30), Duration::from_millis(200), || {
        let env = &env;
        let codec = &codec;
        let key = &key;
        async move {
            for m in env.read(&env.topics().rollup_day).await {
                if m.key() == Some(key.as_bytes()) {
                    return Some(codec.decode::<RollupDay>(m.payload().unwrap()).await.unwrap());
                }
            }
            None
        }
    })
    .await;
    let latency = t0.elapsed();
    // How far the processor had got into COLD, on the HOT row's partition, when it emitted it.
    let partition = vitals_schemas::topics::partition_for(user.as_bytes(), env.cfg.kafka.partitions);
    let cold_in_partition =
        env.read(&t.cold).await.iter().filter(|m| m.partition() == partition).map(|m| m.offset() + 1).max().unwrap_or(0);
    let cold_done = row.source_offsets.iter().find(|o| o.topic == t.cold).map(|o| o.next_offset).unwrap_or(0);
    assert!(
        cold_done < cold_in_partition,
        "the HOT row was emitted while COLD was still in flight on its partition ({cold_done} of {cold_in_partition} processed), after {latency:?}"
    );
    p.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// Poison records — bytes that are not a registered Avro record, and a well-formed batch the
/// processor refuses (unknown metric) — go to the dead-letter topic with the reason and their
/// source in headers; the records after them are processed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_go_to_the_dead_letter_topic_and_the_pipeline_goes_on() {
    use rdkafka::producer::FutureRecord;
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let user = "poisoned";
    let p = vitals_schemas::topics::partition_for(user.as_bytes(), env.cfg.kafka.partitions);
    let producer = vitals::app::producer(&env.cfg, "test-poison").unwrap();
    let send = |payload: Vec<u8>| {
        let producer = producer.clone();
        let topic = t.hot.clone();
        async move {
            producer
                .send(FutureRecord::to(&topic).partition(p).key(user).payload(&payload), Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    };
    let sample = |id: &str, metric: &str| vitals_schemas::Sample {
        source: "watch".into(),
        source_kind: vitals_schemas::SourceKind::Watch,
        source_record_id: id.into(),
        metric: metric.into(),
        start_ms: chrono::Utc::now().timestamp_millis(),
        end_ms: chrono::Utc::now().timestamp_millis(),
        value: 60.0,
        unit: "count/min".into(),
        category: None,
        time_zone: "UTC".into(),
        version: 1,
        metadata: Default::default(),
    };
    let batch =
        |samples| SampleBatch { request_id: "r".into(), user_id: user.into(), received_at_ms: 0, lane: vitals_schemas::Lane::Hot, samples };
    send(b"\x00\x00\x00\x00\x09not avro at all".to_vec()).await;
    send(codec.encode(&t.hot, &batch(vec![sample("bad", "heart_rhythm")])).await.unwrap()).await;
    send(codec.encode(&t.hot, &batch(vec![sample("good", "heart_rate")])).await.unwrap()).await;

    let data = std::env::temp_dir().join(format!("vitals-proc-{}", uuid::Uuid::new_v4().simple()));
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut vars = proc_env(&env, &data);
    vars.push(("VITALS_PROCESSORS__METRICS_LISTEN".into(), format!("127.0.0.1:{metrics_port}")));
    let mut proc = Proc { env: vars, child: None };
    proc.start(None);
    let dead = wait_for_every("two dead letters", Duration::from_secs(60), Duration::from_millis(300), || {
        let env = &env;
        let t = &t;
        async move {
            let d = env.read(&t.dead_letter).await;
            (d.len() >= 2).then_some(d)
        }
    })
    .await;
    assert_eq!(dead.len(), 2);
    let mut codes = Vec::new();
    for m in &dead {
        let dl: vitals_schemas::DeadLetter = codec.decode(m.payload().unwrap()).await.unwrap();
        assert_eq!((dl.source_topic.as_str(), dl.source_partition), (t.hot.as_str(), p));
        assert_eq!(crate::harness::header(m, "vitals-source-topic").as_deref(), Some(t.hot.as_str()));
        assert_eq!(crate::harness::header(m, "vitals-source-offset"), Some(dl.source_offset.to_string()));
        assert!(crate::harness::header(m, "vitals-reason").is_some_and(|r| !r.is_empty()));
        codes.push(dl.code);
    }
    codes.sort();
    assert_eq!(codes, ["undecodable", "unknown_metric"]);
    // The valid record after the poison ones was processed.
    let key = format!("{user}|heart_rate|{}", chrono::Utc::now().date_naive());
    wait_for_every("the valid record's rollup", Duration::from_secs(30), Duration::from_millis(300), || {
        let env = &env;
        let key = &key;
        async move { env.read(&env.topics().rollup_day).await.iter().any(|m| m.key() == Some(key.as_bytes())).then_some(()) }
    })
    .await;
    // What an operator sees on /metrics: the dead letters, the records, the checkpoints, and the
    // lag of the owned partitions (measured every 10 s) back at zero.
    let hot_lag = format!("vitals_processor_lag_records{{processor=\"rollup_day\",topic=\"{}\",partition=\"{p}\"}} 0", t.hot);
    let metrics =
        wait_for_every("the metrics to show the DLQ and a caught-up lag", Duration::from_secs(60), Duration::from_millis(500), || {
            let hot_lag = &hot_lag;
            async move {
                let body = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.ok()?.text().await.ok()?;
                body.contains(hot_lag.as_str()).then_some(body)
            }
        })
        .await;
    assert!(metrics.contains("vitals_processor_dead_lettered_total{processor=\"rollup_day\"} 2"), "{metrics}");
    let value = |name: &str| -> u64 {
        let line =
            metrics.lines().find(|l| l.starts_with(&format!("vitals_processor_{name}{{"))).unwrap_or_else(|| panic!("{name} in {metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("records_in_total") >= 3 && value("checkpoints_total") >= 1 && value("outputs_total") >= 1, "{metrics}");
    proc.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// Another owner ran between two runs of the same instance: it took the partitions over (newer
/// epochs) and wrote a value computed from less input (here: a stale value injected with that
/// owner's epoch). The instance comes back with its local store, which is further ahead than that
/// owner got; it must not trust it (resuming would never re-emit the stale key), but discard it and
/// replay, so the projection is the oracle's again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_store_is_not_trusted_after_another_owner_ran() {
    use rdkafka::producer::FutureRecord;
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let data = std::env::temp_dir().join(format!("vitals-proc-{}", uuid::Uuid::new_v4().simple()));
    let mut vars = proc_env(&env, &data);
    vars.push(("VITALS_PROCESSORS__SNAPSHOT_EVERY_MS".into(), "0".into()));
    assert_eq!(simulate::run(&env.sim("a", 5, 2, 2), &env.http).await.unwrap().rejected, 0);
    let expected = rollup_day::oracle(&inputs(&env, &codec).await);
    let equal = || async { fold(&env, &codec).await.0 == expected };
    let mut a = Proc { env: vars, child: None };
    a.start(None);
    wait_for_every("the first run to reach the oracle", Duration::from_secs(120), Duration::from_millis(300), || async {
        equal().await.then_some(())
    })
    .await;
    a.kill9();

    // The other owner: every partition's epoch bumped, one key rewritten from "less input".
    let topic = env.topics().rollup_day;
    let task = format!("{}rollup_day", env.cfg.kafka.topic_prefix);
    let victim = env
        .read(&topic)
        .await
        .into_iter()
        .rev()
        .find(|m| crate::harness::header(m, vitals_schemas::topics::PROGRESS_HEADER).is_none())
        .unwrap();
    let mut stale: RollupDay = codec.decode(victim.payload().unwrap()).await.unwrap();
    for p in 0..env.cfg.kafka.partitions {
        vitals_runtime::bump_epoch(&env.pool, &task, p, 0).await.unwrap();
    }
    let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM processor_epochs WHERE processor = $1 AND partition = $2")
        .bind(&task)
        .bind(victim.partition())
        .fetch_one(&env.pool)
        .await
        .unwrap();
    stale.count += 1000;
    (stale.version_epoch, stale.version_seq) = (epoch, 1);
    let bytes = codec.encode(&topic, &stale).await.unwrap();
    let producer = vitals::app::producer(&env.cfg, "test-other-owner").unwrap();
    // Written the way the runtime writes: with its epoch, user and source offsets in headers.
    use rdkafka::message::{Header, OwnedHeaders};
    use vitals_runtime::{EPOCH_HEADER, SOURCE_HEADER, USER_HEADER};
    let source = stale.source_offsets.iter().map(|o| format!("{}={}", o.topic, o.next_offset)).collect::<Vec<_>>().join(",");
    let headers = OwnedHeaders::new()
        .insert(Header { key: EPOCH_HEADER, value: Some(epoch.to_string().as_str()) })
        .insert(Header { key: USER_HEADER, value: Some(stale.user_id.as_str()) })
        .insert(Header { key: SOURCE_HEADER, value: Some(source.as_str()) });
    producer
        .send(
            FutureRecord::to(&topic).partition(victim.partition()).key(victim.key().unwrap()).payload(&bytes).headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    assert!(!equal().await, "the stale value now wins the fold");

    // The instance returns with its (ahead, but no longer trusted) local store.
    a.start(None);
    wait_for_every("the returning owner to re-emit past the stale value", Duration::from_secs(120), Duration::from_millis(300), || async {
        equal().await.then_some(())
    })
    .await;
    a.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// `processor_epochs` is lost under a running pipeline (a PostgreSQL restored from an old backup,
/// or replaced by a new one): the next owner of every partition would start again at epoch 1,
/// and every new version would lose to the older ones already in the output topic — the
/// projection frozen while everything looks fine. Epochs must start above the greatest epoch in
/// the output partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_processor_epochs_never_freezes_the_projection() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let data = std::env::temp_dir().join(format!("vitals-proc-{}", uuid::Uuid::new_v4().simple()));
    let mut proc = Proc { env: proc_env(&env, &data), child: None };
    let reaches_oracle = |what: &'static str| {
        let (env, codec) = (&env, &codec);
        async move {
            let expected = rollup_day::oracle(&inputs(env, codec).await);
            wait_for_every(what, Duration::from_secs(120), Duration::from_millis(300), || async {
                (fold(env, codec).await.0 == expected).then_some(())
            })
            .await;
        }
    };
    assert_eq!(simulate::run(&env.sim("a", 31, 2, 2), &env.http).await.unwrap().rejected, 0);
    // Several owners in a row, each with new uploads to write, so the epochs in the output are
    // well above 1.
    for round in 0..3u64 {
        proc.start(None);
        reaches_oracle("the projection to reach the oracle").await;
        proc.kill9();
        assert_eq!(simulate::run(&env.sim(&format!("r{round}"), 40 + round, 4, 1), &env.http).await.unwrap().rejected, 0);
    }
    proc.start(None);
    // The greatest epoch written to each output partition before the loss.
    let written = || async {
        let mut m: BTreeMap<i32, i64> = BTreeMap::new();
        for r in env.read(&env.topics().rollup_day).await {
            let row: RollupDay = codec.decode(r.payload().unwrap()).await.unwrap();
            let e = m.entry(r.partition()).or_insert(0);
            *e = (*e).max(row.version_epoch);
        }
        m
    };
    let before = written().await;
    assert!(before.values().any(|e| *e >= 3), "several owners wrote before the loss: {before:?}");
    sqlx::query("DELETE FROM processor_epochs").execute(&env.pool).await.unwrap();
    assert_eq!(simulate::run(&env.sim("b", 32, 2, 1), &env.http).await.unwrap().rejected, 0);
    reaches_oracle("uploads after the loss to reach the projection (running tasks)").await;
    // The next owner of every partition starts after the loss.
    proc.kill9();
    proc.start(None);
    assert_eq!(simulate::run(&env.sim("c", 33, 2, 1), &env.http).await.unwrap().rejected, 0);
    reaches_oracle("uploads after a takeover with lost epochs to reach the projection").await;
    let now: BTreeMap<i32, i64> = sqlx::query_as::<_, (i32, i64)>("SELECT partition, epoch FROM processor_epochs")
        .fetch_all(&env.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    for (p, e) in &before {
        assert!(
            now.get(p).is_some_and(|n| n > e),
            "partition {p}: the epoch after the loss ({:?}) is above the greatest written before ({e})",
            now.get(p)
        );
    }
    proc.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// With a producer queue so small that nearly every send waits for room, a progress marker is
/// still written after every row it vouches for: every row of an interval (same epoch, same source
/// offsets, same user) has a lower offset than that interval's marker of its user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_never_overtake_their_rows_with_a_saturated_producer_queue() {
    let env = TestEnv::start().await;
    let data = std::env::temp_dir().join(format!("vitals-proc-{}", uuid::Uuid::new_v4().simple()));
    let codec = vitals::app::codec(&env.cfg);
    assert_eq!(simulate::run(&env.sim("q", 81, 3, 2), &env.http).await.unwrap().rejected, 0);
    let mut proc = Proc { env: proc_env(&env, &data), child: None };
    proc.set("VITALS_KAFKA__QUEUE_MAX_MESSAGES", 2);
    proc.set("VITALS_PROCESSORS__MAX_BATCH", 20);
    proc.start(None);
    let expected = rollup_day::oracle(&inputs(&env, &codec).await);
    // (partition, epoch, user, source offsets) → the offset of that interval's marker.
    type Interval = (i32, i64, String, Vec<(String, i64)>);
    type Written = (BTreeMap<Interval, i64>, Vec<(Interval, i64, String)>);
    let written = || async {
        let mut markers: BTreeMap<Interval, i64> = BTreeMap::new();
        let mut rows: Vec<(Interval, i64, String)> = Vec::new();
        for m in env.read(&env.topics().rollup_day).await {
            let r: RollupDay = codec.decode(m.payload().unwrap()).await.unwrap();
            let at: Interval = (
                m.partition(),
                r.version_epoch,
                r.user_id.clone(),
                r.source_offsets.iter().map(|o| (o.topic.clone(), o.next_offset)).collect(),
            );
            if crate::harness::header(&m, vitals_schemas::topics::PROGRESS_HEADER).is_some() {
                markers.insert(at, m.offset());
            } else {
                rows.push((at, m.offset(), String::from_utf8_lossy(m.key().unwrap()).into_owned()));
            }
        }
        (markers, rows)
    };
    // The last interval's markers follow its rows by one acknowledgement: wait for them too
    // before stopping the process (killed in between, an interval's rows have no marker yet —
    // and a marker that never comes fails this wait).
    wait_for_every(
        "the projection to reach the oracle and every row's marker to be written",
        Duration::from_secs(120),
        Duration::from_millis(300),
        || async {
            if fold(&env, &codec).await.0 != expected {
                return None;
            }
            let (markers, rows): Written = written().await;
            rows.iter().all(|(at, _, _)| markers.contains_key(at)).then_some(())
        },
    )
    .await;
    proc.kill9();
    let (markers, rows): Written = written().await;
    assert!(rows.len() > 50 && !markers.is_empty(), "{} rows, {} markers", rows.len(), markers.len());
    for (at, offset, key) in &rows {
        let marker = markers.get(at).unwrap_or_else(|| panic!("no marker for the interval of {key} at {at:?}"));
        assert!(offset < marker, "the marker of {at:?} (offset {marker}) overtook its row {key} (offset {offset})");
    }
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
