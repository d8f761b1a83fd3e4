//! Dead-letter tooling against the real broker, registry and PostgreSQL: records dead-lettered by
//! real processors (`vitals process`) and by the real sink (`vitals sink`) are found with
//! `vitals dlq list`, inspected with `vitals dlq show`, and written back with `vitals dlq replay`
//! exactly once per source record — again and again, and after a replay interrupted between its
//! ledger and its produce on either side; `/metrics` counts them by stage and reason.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::Message;
use vitals_schemas::dead_letter::REPLAY_OF_HEADER;
use vitals_schemas::topics::partition_for;
use vitals_schemas::{DeadLetter, SampleBatch};

use crate::harness::{free_port, header, wait_for_every, TestEnv, VitalsProc};

/// Runs `vitals <args>` in this test's world to completion: (success, stdout, stderr).
async fn vitals(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let data = std::env::temp_dir().join("vitals-dlq-cli-unused");
    let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_vitals"))
        .args(args)
        .envs(env.child_env(&data))
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), cmd)
        .await
        .unwrap_or_else(|_| panic!("`vitals {}` did not finish within 120 s", args.join(" ")))
        .expect("running vitals");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `vitals <args>` must succeed; its stdout.
async fn ok(env: &TestEnv, args: &[&str]) -> String {
    let (success, stdout, stderr) = vitals(env, args).await;
    assert!(success, "`vitals {}` failed:\n{stdout}\n{stderr}", args.join(" "));
    stdout
}

async fn metrics(port: u16) -> Option<String> {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.ok()?.text().await.ok()
}

fn sample(id: &str, metric: &str) -> vitals_schemas::Sample {
    let now = chrono::Utc::now().timestamp_millis();
    vitals_schemas::Sample {
        source: "com.apple.health.watch".into(),
        source_kind: vitals_schemas::SourceKind::Watch,
        source_record_id: id.into(),
        metric: metric.into(),
        start_ms: now,
        end_ms: now,
        value: 60.0,
        unit: "count/min".into(),
        category: None,
        time_zone: "UTC".into(),
        version: 1,
        metadata: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_lists_shows_and_replays_each_dead_lettered_record_exactly_once() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let n = env.cfg.kafka.partitions;
    let producer = vitals::app::producer(&env.cfg, "test-dlq").unwrap();
    // Written the way the edge writes: keyed by user, murmur2 partition, trace context in headers.
    let send = |user: &'static str, payload: Vec<u8>| {
        let (producer, topic) = (producer.clone(), t.hot.clone());
        async move {
            let headers = OwnedHeaders::new()
                .insert(Header { key: "traceparent", value: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") })
                .insert(Header { key: "vitals-request-id", value: Some(user) });
            let d = producer
                .send(FutureRecord::to(&topic).key(user).payload(&payload).headers(headers), Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)
                .unwrap();
            assert_eq!(d.partition, partition_for(user.as_bytes(), n));
            d.offset
        }
    };
    let batch = |user: &str, samples| SampleBatch {
        request_id: "r".into(),
        user_id: user.into(),
        received_at_ms: 0,
        lane: vitals_schemas::Lane::Hot,
        samples,
    };
    let garbage = b"\x00\x00\x00\x00\x09not avro at all".to_vec();
    let (a, b) = ("dlq-user-a", "dlq-user-b");
    let (pa, pb) = (partition_for(a.as_bytes(), n), partition_for(b.as_bytes(), n));
    // Undecodable, and an unknown metric (refused by the shared rules): both processors reading HOT dead-letter each.
    let garbage_at = send(a, garbage.clone()).await;
    let unknown_bytes = codec.encode(&t.hot, &batch(b, vec![sample("bad", "heart_rhythm")])).await.unwrap();
    let unknown_at = send(b, unknown_bytes.clone()).await;
    let good_at = send(a, codec.encode(&t.hot, &batch(a, vec![sample("good", "heart_rate")])).await.unwrap()).await;

    let data = std::env::temp_dir().join(format!("vitals-dlq-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let mut vars = env.child_env(&data);
    vars.push(("VITALS_PROCESSORS__METRICS_LISTEN".into(), format!("127.0.0.1:{port}")));
    let mut proc = VitalsProc::new(&["process", "rollup_day", "sleep_night"], vars);
    proc.start();
    // The per-reason counters, both processors' in one family.
    let wanted = [
        ("rollup_day", "undecodable"),
        ("sleep_night", "undecodable"),
        ("rollup_day", "unknown_metric"),
        ("sleep_night", "unknown_metric"),
    ]
    .map(|(s, c)| format!("vitals_dead_letters_total{{stage=\"processor:{s}\",code=\"{c}\"}} 1\n"));
    let text = wait_for_every(
        "/metrics to count the four dead letters by stage and code",
        Duration::from_secs(120),
        Duration::from_millis(300),
        || {
            let wanted = &wanted;
            async move { metrics(port).await.filter(|m| wanted.iter().all(|w| m.contains(w.as_str()))) }
        },
    )
    .await;
    assert_eq!(text.matches("# TYPE vitals_dead_letters_total counter").count(), 1, "one family for every processor:\n{text}");
    assert_eq!(text.matches("# TYPE vitals_processor_records_in_total counter").count(), 1, "one family for every processor:\n{text}");
    let dead = wait_for_every("the four dead letters in the topic", Duration::from_secs(60), Duration::from_millis(300), || {
        let env = &env;
        async move { Some(env.read(&env.topics().dead_letter).await).filter(|d| d.len() >= 4) }
    })
    .await;
    assert_eq!(dead.len(), 4);
    // Stopped, so that the copies written back are not dead-lettered again while we count.
    proc.kill9();
    let hot_before = env.read(&t.hot).await.len();
    assert_eq!(hot_before, 3);

    // list: every dead letter with its stage, code, source and user, and the counts.
    let list = ok(&env, &["dlq", "list"]).await;
    let garbage_src = format!("{}:{pa}:{garbage_at}", t.hot);
    let unknown_src = format!("{}:{pb}:{unknown_at}", t.hot);
    let lines: Vec<&str> = list.lines().filter(|l| l.contains(&garbage_src)).collect();
    assert_eq!(lines.len(), 2, "the undecodable record, dead-lettered by both processors:\n{list}");
    for stage in ["processor:rollup_day", "processor:sleep_night"] {
        assert!(
            lines.iter().any(|l| l.contains(stage) && l.contains(" undecodable ") && l.contains(&format!("user={a}"))),
            "{stage}:\n{list}"
        );
    }
    assert!(list.lines().any(|l| l.contains(&unknown_src) && l.contains("unknown_metric") && l.contains("heart_rhythm")), "{list}");
    assert!(list.contains("4 dead letters in "), "{list}");
    let summary: Vec<Vec<&str>> =
        list.lines().skip_while(|l| !l.starts_with("4 dead letters")).skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        summary,
        [
            ["1", "processor:rollup_day", "undecodable"],
            ["1", "processor:rollup_day", "unknown_metric"],
            ["1", "processor:sleep_night", "undecodable"],
            ["1", "processor:sleep_night", "unknown_metric"]
        ],
        "{list}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&env, &["dlq", "list", "--reason", "unknown_metric", "--json"]).await).unwrap();
    assert_eq!(json["total"], 2, "{json}");
    let entry = &json["dead_letters"][0];
    assert_eq!((entry["source"]["offset"].as_i64(), entry["user"].as_str()), (Some(unknown_at), Some(b)), "{json}");
    assert!(entry["stage"].as_str().is_some_and(|s| s.starts_with("processor:")), "{json}");
    let json: serde_json::Value = serde_json::from_str(&ok(&env, &["dlq", "list", "--stage", "sleep_night", "--json"]).await).unwrap();
    assert_eq!(json["total"], 2, "{json}");
    let json: serde_json::Value = serde_json::from_str(
        &ok(
            &env,
            &[
                "dlq",
                "list",
                "--topic",
                "hot",
                "--partition",
                &pa.to_string(),
                "--from-offset",
                &garbage_at.to_string(),
                "--to-offset",
                &garbage_at.to_string(),
                "--json",
            ],
        )
        .await,
    )
    .unwrap();
    assert_eq!(json["total"], 2, "{json}");
    let garbage_dlq = format!("{}:{}", json["dead_letters"][0]["partition"], json["dead_letters"][0]["offset"]);

    // show: the full record; the payload in hex, decoded when it decodes.
    let shown = ok(&env, &["dlq", "show", &format!("{}:{}", entry["partition"], entry["offset"])]).await;
    assert!(
        shown.contains("code         unknown_metric") && shown.contains("\"heart_rhythm\"") && shown.contains(&hex::encode(&unknown_bytes)),
        "{shown}"
    );
    assert!(shown.contains("replay       not replayed"), "{shown}");
    let shown = ok(&env, &["dlq", "show", &garbage_dlq]).await;
    assert!(shown.contains(&hex::encode(&garbage)) && shown.contains("does not decode") && shown.contains("traceparent"), "{shown}");

    // replay wants a selector; a dry run writes nothing.
    let (success, _, stderr) = vitals(&env, &["dlq", "replay"]).await;
    assert!(!success && stderr.contains("--all"), "{stderr}");
    let dry = ok(&env, &["dlq", "replay", "--topic", "hot", "--dry-run"]).await;
    assert!(dry.contains("4 dead letters selected, 2 source records: 2 would be replayed"), "{dry}");
    assert_eq!(env.read(&t.hot).await.len(), hot_before, "a dry run writes nothing");

    // The undecodable record: two dead letters, one copy with the original bytes and headers,
    // on the partition the edge chooses for its key.
    let out = ok(&env, &["dlq", "replay", "--topic", "hot", "--reason", "undecodable"]).await;
    assert!(out.contains("2 dead letters selected, 1 source records: 1 replayed"), "{out}");
    let hot = env.read(&t.hot).await;
    assert_eq!(hot.len(), hot_before + 1, "{out}");
    let copy = hot
        .iter()
        .find(|m| header(m, REPLAY_OF_HEADER).as_deref() == Some(garbage_src.as_str()))
        .expect("the copy carries vitals-replay-of");
    assert_eq!((copy.key(), copy.payload(), copy.partition()), (Some(a.as_bytes()), Some(garbage.as_slice()), pa));
    assert_eq!(header(copy, "traceparent").as_deref(), Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
    assert_eq!(header(copy, "vitals-request-id").as_deref(), Some(a));
    let copy_at = copy.offset();
    // Again: nothing more.
    let out = ok(&env, &["dlq", "replay", "--topic", "hot", "--reason", "undecodable"]).await;
    assert!(out.contains("0 replayed, 1 already replayed"), "{out}");
    assert_eq!(env.read(&t.hot).await.len(), hot_before + 1);
    // Everything: only the record not replayed yet, then nothing more.
    let out = ok(&env, &["dlq", "replay", "--all"]).await;
    assert!(out.contains("1 replayed, 1 already replayed"), "{out}");
    let hot = env.read(&t.hot).await;
    assert_eq!(hot.len(), hot_before + 2);
    let copy_b = hot.iter().find(|m| header(m, REPLAY_OF_HEADER).as_deref() == Some(unknown_src.as_str())).unwrap();
    assert_eq!((copy_b.key(), copy_b.payload(), copy_b.partition()), (Some(b.as_bytes()), Some(unknown_bytes.as_slice()), pb));
    let out = ok(&env, &["dlq", "replay", "--all"]).await;
    assert!(out.contains("0 replayed, 2 already replayed"), "{out}");
    assert_eq!(env.read(&t.hot).await.len(), hot_before + 2);
    let shown = ok(&env, &["dlq", "show", &garbage_dlq]).await;
    assert!(shown.contains(&format!("replay       replayed to {}:{pa}:{copy_at}", t.hot)), "{shown}");

    // A run interrupted after the broker acknowledged a copy and before the ledger said so: the
    // next run finds the copy by its header and writes nothing.
    sqlx::query("UPDATE dlq_replays SET target_offset = NULL, replayed_at = NULL WHERE source_offset = $1 AND source_partition = $2")
        .bind(garbage_at)
        .bind(pa)
        .execute(&env.pool)
        .await
        .unwrap();
    let out = ok(&env, &["dlq", "replay", "--all"]).await;
    assert!(
        out.contains("recovered") && out.contains("0 replayed, 2 already replayed") && out.contains("1 completed from an interrupted run"),
        "{out}"
    );
    assert_eq!(env.read(&t.hot).await.len(), hot_before + 2);
    let (offset,): (Option<i64>,) =
        sqlx::query_as("SELECT target_offset FROM dlq_replays WHERE source_offset = $1 AND source_partition = $2")
            .bind(garbage_at)
            .bind(pa)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(offset, Some(copy_at));

    // A run interrupted after its intent and before the produce: the copy is not on the target,
    // so the next run writes it, once. (A dead letter written directly, naming the good record.)
    let good = DeadLetter {
        source_topic: t.hot.clone(),
        source_partition: pa,
        source_offset: good_at,
        stage: "processor:test".into(),
        code: "test_refused".into(),
        reason: "refused by the test".into(),
        key: Some(a.as_bytes().to_vec()),
        payload: hot.iter().find(|m| m.partition() == pa && m.offset() == good_at).and_then(|m| m.payload()).map(<[u8]>::to_vec),
    };
    let dl_bytes = codec.encode(&t.dead_letter, &good).await.unwrap();
    let dl = producer
        .send(FutureRecord::to(&t.dead_letter).partition(pa).key(a).payload(&dl_bytes), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let hot_end = env.read(&t.hot).await.iter().filter(|m| m.partition() == pa).map(|m| m.offset() + 1).max().unwrap();
    sqlx::query(
        "INSERT INTO dlq_replays (source_topic, source_partition, source_offset, dlq_topic, dlq_partition, dlq_offset, target_topic, target_partition, scan_from)
         VALUES ($1, $2, $3, $4, $5, $6, $1, $2, $7)",
    )
    .bind(&t.hot)
    .bind(pa)
    .bind(good_at)
    .bind(&t.dead_letter)
    .bind(dl.partition)
    .bind(dl.offset)
    .bind(hot_end)
    .execute(&env.pool)
    .await
    .unwrap();
    let out = ok(&env, &["dlq", "replay", "--reason", "test_refused"]).await;
    assert!(out.contains("in doubt") && out.contains("1 replayed, 0 already replayed"), "{out}");
    assert_eq!(env.read(&t.hot).await.len(), hot_before + 3);
    let out = ok(&env, &["dlq", "replay", "--all"]).await;
    assert!(out.contains("0 replayed, 3 already replayed"), "{out}");
    assert_eq!(env.read(&t.hot).await.len(), hot_before + 3);
    assert_eq!(
        env.read(&t.dead_letter).await.len(),
        5,
        "replay never writes to the dead-letter topic (four from the processors, one from this test)"
    );

    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// The sink counts its dead letters by stage and code on its own `/metrics`; a dead letter whose
/// source is a projection topic is listed but not replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_counts_dead_letters_by_reason_and_dlq_does_not_replay_projection_records() {
    let env = TestEnv::start().await;
    let t = env.topics();
    let producer = vitals::app::producer(&env.cfg, "test-dlq-sink").unwrap();
    let garbage = b"\x00\x00\x00\x00\x09not a rollup".to_vec();
    producer
        .send(FutureRecord::to(&t.rollup_day).partition(1).key("u|steps|2026-01-01").payload(&garbage), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    let data = std::env::temp_dir().join(format!("vitals-dlq-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let mut vars = env.child_env(&data);
    vars.push(("VITALS_SINK__METRICS_LISTEN".into(), format!("127.0.0.1:{port}")));
    let mut sink = VitalsProc::new(&["sink"], vars);
    sink.start();
    let name = vitals::app::sink_name(&env.cfg);
    let wanted = format!("vitals_dead_letters_total{{stage=\"sink:{name}\",code=\"undecodable\"}} 1\n");
    let text = wait_for_every("the sink's /metrics to count the dead letter", Duration::from_secs(60), Duration::from_millis(300), || {
        let wanted = &wanted;
        async move { metrics(port).await.filter(|m| m.contains(wanted.as_str())) }
    })
    .await;
    assert!(text.contains(&format!("vitals_sink_dead_lettered_total{{sink=\"{name}\"}} 1\n")), "{text}");
    sink.kill9();

    let list = ok(&env, &["dlq", "list", "--stage", "sink"]).await;
    assert!(list.lines().any(|l| l.contains(&format!("{}:1:0", t.rollup_day)) && l.contains("undecodable")), "{list}");
    let out = ok(&env, &["dlq", "replay", "--all"]).await;
    assert!(
        out.contains("not replayable: a projection topic") && out.contains("0 replayed, 0 already replayed, 1 not replayable"),
        "{out}"
    );
    assert_eq!(env.read(&t.rollup_day).await.len(), 1, "nothing written back to the projection topic");
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
