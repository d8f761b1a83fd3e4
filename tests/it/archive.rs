//! Issue 11, item 4: `vitals archive` writes every record of the input lanes to the S3 store,
//! sealed per user. Real processes on the real broker, PostgreSQL and S3: an archiver aborted
//! right after recording a segment, then two archivers at once while uploads continue; the
//! archive then holds every lane record exactly once, byte for byte, in contiguous segments
//! that name no user in clear, and deleting one user's key makes exactly their records
//! unreadable.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use vitals::archive::{self, Raw};
use vitals::simulate;

use crate::harness::{wait_for_every, TestEnv, VitalsProc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_holds_every_lane_record_once_across_crashes_and_two_archivers() {
    let env = TestEnv::start().await;
    let data = std::env::temp_dir().join(format!("vitals-archive-{}", uuid::Uuid::new_v4().simple()));
    let first = env.sim("arca", 41, 3, 3);
    assert_eq!(simulate::run(&first, &env.http).await.unwrap().rejected, 0);

    // Small segments, so that crashes and a second archiver meet many segment boundaries.
    let mut vars = env.child_env(&data);
    vars.push(("VITALS_ARCHIVE__MAX_RECORDS".into(), "3".into()));
    vars.push(("VITALS_ARCHIVE__MAX_WAIT_MS".into(), "300".into()));
    let mut crashing_vars = vars.clone();
    crashing_vars.push(("VITALS_ARCHIVE_CRASH_AFTER".into(), "3".into()));
    for round in 0..2 {
        let mut a = VitalsProc::new(&["archive"], crashing_vars.clone());
        a.start();
        let status = a.wait_exit(&format!("archiver {round} to abort after its third segment"), Duration::from_secs(120)).await;
        assert!(!status.success(), "aborted at the failpoint: {status:?}");
    }
    let pool = sqlx::PgPool::connect(&env.db_url).await.unwrap();
    let segments: i64 = sqlx::query_scalar("SELECT count(*) FROM archive_segments").fetch_one(&pool).await.unwrap();
    assert_eq!(segments, 6, "each aborted archiver recorded three segments");
    let crashed_records: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(records), 0)::int8 FROM archive_segments").fetch_one(&pool).await.unwrap();

    // With its store unreachable it waits and says so on /readyz.
    let port = crate::harness::free_port();
    let mut down = VitalsProc::new(
        &["archive"],
        [
            vars.clone(),
            vec![
                ("VITALS_S3__ENDPOINT".into(), "http://127.0.0.1:9".into()),
                ("VITALS_ARCHIVE__METRICS_LISTEN".into(), format!("127.0.0.1:{port}")),
            ],
        ]
        .concat(),
    );
    down.start();
    let body =
        wait_for_every("/readyz to say the archiver waits for its store", Duration::from_secs(60), Duration::from_millis(200), || async {
            let r = env.http.get(format!("http://127.0.0.1:{port}/readyz")).send().await.ok()?;
            (r.status() == 503).then_some(())?;
            r.text().await.ok()
        })
        .await;
    assert!(body.contains("waiting for the archive store"), "{body}");
    // Not ready is not dead: the liveness probe (k8s livenessProbe) still answers.
    let live = env.http.get(format!("http://127.0.0.1:{port}/healthz")).send().await.unwrap();
    assert_eq!(live.status().as_u16(), 200, "/healthz of a waiting archiver");
    down.kill9();

    // Two archivers of the same partitions at once, while more people upload.
    let port = crate::harness::free_port();
    let mut one = VitalsProc::new(
        &["archive"],
        [vars.clone(), vec![("VITALS_ARCHIVE__METRICS_LISTEN".into(), format!("127.0.0.1:{port}"))]].concat(),
    );
    let port_two = crate::harness::free_port();
    let mut two = VitalsProc::new(
        &["archive"],
        [vars.clone(), vec![("VITALS_ARCHIVE__METRICS_LISTEN".into(), format!("127.0.0.1:{port_two}"))]].concat(),
    );
    one.start();
    two.start();
    let second = env.sim("arcb", 42, 2, 2);
    assert_eq!(simulate::run(&second, &env.http).await.unwrap().rejected, 0);
    let rows = wait_for_every("every lane record to be archived", Duration::from_secs(180), Duration::from_millis(500), || {
        let cfg = env.cfg.clone();
        async move {
            let rows = archive::status(&cfg).await.ok()?;
            rows.iter().all(|r| r.behind == 0).then_some(rows)
        }
    })
    .await;
    // Their /metrics: between them, exactly the records of the segments they recorded.
    let mut recorded = 0.0;
    for port in [port, port_two] {
        let metrics = env.http.get(format!("http://127.0.0.1:{port}/metrics")).send().await.unwrap().text().await.unwrap();
        let value = |name: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name} in {metrics}"))
        };
        assert_eq!(value("vitals_archive_waiting"), 0.0, "{metrics}");
        assert_eq!(value("vitals_archive_segments_total") > 0.0, value("vitals_archive_last_segment_timestamp_seconds") > 0.0, "{metrics}");
        recorded += value("vitals_archive_records_total");
    }
    let all_records: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(records), 0)::int8 FROM archive_segments").fetch_one(&pool).await.unwrap();
    assert_eq!(recorded as i64, all_records - crashed_records, "the archivers' vitals_archive_records_total");
    one.kill9();
    two.kill9();
    assert!(rows.iter().all(|r| r.gaps == 0 && r.archived_from == Some(0)), "{rows:?}");

    // Byte for byte: every lane record, once, in order.
    let s3 = vitals::app::s3_client(&env.cfg).unwrap();
    let users: Vec<String> = (0..3).map(|i| simulate::user_id(&first, i)).chain((0..2).map(|i| simulate::user_id(&second, i))).collect();
    let mut by_user: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = 0;
    for topic in archive::lanes(&env.cfg) {
        let lane = env.read(&topic).await;
        let mut parts: BTreeMap<i32, Vec<Raw>> = BTreeMap::new();
        for m in &lane {
            parts.entry(rdkafka::Message::partition(m)).or_default().push(Raw::of(m));
            let user = rdkafka::Message::key(m).map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
            *by_user.entry(user).or_default() += 1;
        }
        for (p, want) in parts {
            let (from, to) = (want[0].offset, want.last().unwrap().offset + 1);
            let got = archive::read(&pool, &s3, None, &topic, p, from, to).await.unwrap();
            let got: Vec<Raw> = got.records.iter().map(Raw::of).collect();
            assert_eq!(got.len(), want.len(), "{topic}/{p}");
            assert!(got == want, "{topic}/{p}: the archive differs from the lane");
            total += got.len();
        }
    }
    assert!(total > 20, "the lanes held records: {total}");

    // Segments: contiguous per partition, none overlapping, each object naming no user.
    let segs: Vec<(String, i32, i64, i64, String)> = sqlx::query_as(
        "SELECT topic, partition, first_offset, next_offset, object_key FROM archive_segments ORDER BY topic, partition, first_offset",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for (topic, p, first, seg_next, object) in &segs {
        let at = next.entry((topic.clone(), *p)).or_insert(0);
        assert_eq!(first, at, "{topic}/{p}: segment {first}..{seg_next} does not start where the previous one ended");
        *at = *seg_next;
        let body = s3.get(object).await.unwrap().expect("a recorded segment is in the store");
        for u in &users {
            assert!(!body.windows(u.len()).any(|w| w == u.as_bytes()), "{object} names {u} in clear");
        }
    }

    // Erasure: without the first user's key, exactly their records are unreadable.
    let gone = &users[0];
    sqlx::query("DELETE FROM archive_keys WHERE user_id = $1").bind(gone).execute(&pool).await.unwrap();
    let (mut erased, mut readable) = (0, 0);
    for ((topic, p), to) in &next {
        let r = archive::read(&pool, &s3, None, topic, *p, 0, *to).await.unwrap();
        erased += r.erased;
        for m in &r.records {
            assert_ne!(rdkafka::Message::key(m), Some(gone.as_bytes()), "an erased user's record was read");
        }
        // Erased records keep their offsets (a reader sees no gap), and carry nothing.
        assert_eq!(r.records.len() as i64, *to, "{topic}/{p}: every offset, erased or not");
        let placeholders = r
            .records
            .iter()
            .filter(|m| {
                rdkafka::Message::headers(*m).is_some_and(|h| rdkafka::message::Headers::iter(h).any(|h| h.key == archive::ERASED_HEADER))
            })
            .count();
        assert!(r.records.iter().filter(|m| rdkafka::Message::payload(*m).is_none()).count() == placeholders);
        assert_eq!(placeholders as u64, r.erased);
        readable += r.records.len() - placeholders;
    }
    assert_eq!(erased, by_user[gone], "every record of the erased user, and only theirs");
    assert_eq!(readable as u64 + erased, total as u64);

    // A read past what is archived is never short: not yet archived is retried (the archiver
    // will get there), not a gap.
    let (topic, p) = next.keys().next().unwrap().clone();
    let e = archive::read(&pool, &s3, None, &topic, p, 0, next[&(topic.clone(), p)] + 5).await.unwrap_err();
    assert!(matches!(&e, archive::ArchiveError::Unavailable(m) if m.contains("not yet all of")), "{e:#}");
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// Issue 11's done-means: the lanes are archived, then their early records deleted from the
/// broker (DeleteRecords: what a finite retention does); `vitals replay --from <time before
/// that>` reads the archive first, then the lanes, and equals the oracle — killed (at the worst
/// moment) while it reads the archive, it resumes; a replay from the beginning does the same.
/// No record at the seam is lost (a gap stops a task) or read twice (a task passes over
/// offsets it has read), and the tables say so by equalling the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_before_the_lanes_retention_reads_the_archive_then_the_lanes() {
    use crate::replay::{oracle, table_rows, Rows};
    let env = TestEnv::start().await;
    let data = std::env::temp_dir().join(format!("vitals-rehydrate-{}", uuid::Uuid::new_v4().simple()));
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let first = env.sim("rha", 51, 3, 3);
    assert_eq!(simulate::run(&first, &env.http).await.unwrap().rejected, 0);
    let mut vars = env.child_env(&data);
    vars.push(("VITALS_ARCHIVE__MAX_RECORDS".into(), "4".into()));
    vars.push(("VITALS_ARCHIVE__MAX_WAIT_MS".into(), "300".into()));
    let mut archiver = VitalsProc::new(&["archive"], vars.clone());
    archiver.start();
    wait_for_every("the first users' records to be archived", Duration::from_secs(120), Duration::from_millis(500), || {
        let cfg = env.cfg.clone();
        async move { archive::status(&cfg).await.ok()?.iter().all(|r| r.behind == 0).then_some(()) }
    })
    .await;
    // The oracle of the first users while the broker still holds all of their records.
    let first_rows = oracle(&env).await;

    // "Retention": every lane partition loses its first half (at least one record).
    let admin = vitals::app::admin(&env.cfg).unwrap();
    let mut cut = rdkafka::TopicPartitionList::new();
    let watermarks: rdkafka::consumer::BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &env.cfg.kafka.brokers).create().unwrap();
    for topic in archive::lanes(&env.cfg) {
        for p in 0..env.cfg.kafka.partitions {
            let (low, high) = watermarks.fetch_watermarks(&topic, p, Duration::from_secs(10)).unwrap();
            if high > low {
                cut.add_partition_offset(&topic, p, rdkafka::Offset::Offset(low + ((high - low) / 2).max(1))).unwrap();
            }
        }
    }
    let done = admin.delete_records(&cut, &rdkafka::admin::AdminOptions::new()).await.expect("DeleteRecords");
    for el in done.elements() {
        assert!(el.error().is_ok(), "{}/{}: {:?}", el.topic(), el.partition(), el.error());
    }
    for el in cut.elements() {
        let (low, _) = watermarks.fetch_watermarks(el.topic(), el.partition(), Duration::from_secs(10)).unwrap();
        assert_eq!(
            rdkafka::Offset::Offset(low),
            el.offset(),
            "{}/{}: the early records are gone from the broker",
            el.topic(),
            el.partition()
        );
    }

    // More people upload after the cut; the lanes hold all of theirs.
    let second = env.sim("rhb", 52, 2, 2);
    assert_eq!(simulate::run(&second, &env.http).await.unwrap().rejected, 0);
    let later: Vec<String> = (0..2).map(|i| simulate::user_id(&second, i)).collect();
    let mut want: Rows = oracle(&env).await.into_iter().filter(|(u, _)| later.contains(u)).collect();
    assert_eq!(want.len(), 2, "the second users have rollups");
    want.extend(first_rows);
    assert_eq!(want.len(), 5);

    // From a time before everything: aborted after its 3rd interval (small intervals, so that
    // it is still reading the archive), then again to the end.
    let mut replay_vars = env.child_env(&data);
    replay_vars.retain(|(k, _)| k != "VITALS_PROCESSORS__MAX_BATCH");
    replay_vars.push(("VITALS_PROCESSORS__MAX_BATCH".into(), "3".into()));
    let t = before.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let args = ["replay", "rollup_day", "--as", "v2", "--from", &t, "--until-caught-up", "--progress", "plain", "--every", "0.3"];
    let mut crashing = VitalsProc::new(&[&args[..], &["--crash-after-produce", "3"]].concat(), replay_vars.clone());
    crashing.start();
    assert!(!crashing.wait_exit("the replay to abort while it reads the archive", Duration::from_secs(120)).await.success());
    let pool = sqlx::PgPool::connect(&env.db_url).await.unwrap();
    let start: sqlx::types::Json<Vec<vitals::replay::StartOffset>> =
        sqlx::query_scalar("SELECT start_offsets FROM projection_replays WHERE projection = 'rollup_day' AND version = 'v2'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        start.0.iter().all(|o| o.offset == 0),
        "a time before everything starts every partition at 0, below the lanes' start: {:?}",
        start.0
    );
    let out = data.with_extension("rehydrate.out");
    let mut again = VitalsProc::new(&args[..], replay_vars.clone());
    again.stdout = Some(out.clone());
    // And from the beginning, at the same time.
    let mut earliest =
        VitalsProc::new(&["replay", "rollup_day", "--as", "v3", "--until-caught-up", "--progress", "plain"], env.child_env(&data));
    again.start();
    earliest.start();
    assert!(again.wait_exit("the replay from a time to catch up", Duration::from_secs(180)).await.success());
    assert!(earliest.wait_exit("the replay from the beginning to catch up", Duration::from_secs(180)).await.success());
    archiver.kill9();
    for table in ["proj_rollup_day__v2", "proj_rollup_day__v3"] {
        let got = table_rows(&pool, table).await;
        assert!(
            got == want,
            "{table} differs from the oracle: {} users vs {}\n{}",
            got.len(),
            want.len(),
            std::fs::read_to_string(&out).unwrap_or_default()
        );
    }
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// Records deleted from a lane before the archiver reached them are lost to both: the archiver
/// records the gap (and `status` shows it), and a replay that needs them stops with an error
/// that says so instead of producing a projection from less input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_before_they_were_archived_are_a_recorded_gap_and_a_replay_across_it_stops() {
    let env = TestEnv::start().await;
    let data = std::env::temp_dir().join(format!("vitals-archive-gap-{}", uuid::Uuid::new_v4().simple()));
    let sim = env.sim("agap", 61, 2, 2);
    assert_eq!(simulate::run(&sim, &env.http).await.unwrap().rejected, 0);
    let mut vars = env.child_env(&data);
    vars.push(("VITALS_ARCHIVE__MAX_RECORDS".into(), "2".into()));
    vars.push(("VITALS_ARCHIVE__MAX_WAIT_MS".into(), "300".into()));
    let mut crashing_vars = vars.clone();
    crashing_vars.push(("VITALS_ARCHIVE_CRASH_AFTER".into(), "1".into()));
    let mut a = VitalsProc::new(&["archive"], crashing_vars);
    a.start();
    assert!(!a.wait_exit("the archiver to abort after its first segment", Duration::from_secs(120)).await.success());

    // Every lane record deleted while the archiver is down.
    let admin = vitals::app::admin(&env.cfg).unwrap();
    let mut cut = rdkafka::TopicPartitionList::new();
    for topic in archive::lanes(&env.cfg) {
        for p in 0..env.cfg.kafka.partitions {
            cut.add_partition_offset(&topic, p, rdkafka::Offset::End).unwrap();
        }
    }
    admin.delete_records(&cut, &rdkafka::admin::AdminOptions::new()).await.expect("DeleteRecords");
    let mut a = VitalsProc::new(&["archive"], vars);
    a.start();
    let rows = wait_for_every("the archiver to reach the lanes' ends", Duration::from_secs(120), Duration::from_millis(500), || {
        let cfg = env.cfg.clone();
        async move {
            let rows = archive::status(&cfg).await.ok()?;
            rows.iter().all(|r| r.behind == 0 && r.archived_to == Some(r.high)).then_some(rows)
        }
    })
    .await;
    a.kill9();
    assert!(rows.iter().any(|r| r.gaps > 0), "the records it never read are recorded as gaps: {rows:?}");

    // From a time before everything: refused before it starts, not started later than asked.
    let args = vitals::replay::ReplayArgs {
        processor: "rollup_day".into(),
        version: "v3".into(),
        from: Some(vitals::replay::From::Time(chrono::Utc::now() - chrono::Duration::days(30))),
        until_caught_up: true,
        display: vitals::replay::Display::Plain,
        every: Duration::from_millis(300),
        crash_after_produce: None,
    };
    let e = vitals::replay::replay(&env.cfg, args, std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))).await.unwrap_err();
    assert!(format!("{e:#}").contains("a replay from this time would miss records"), "{e:#}");

    let err = data.with_extension("replay.err");
    let mut replay =
        VitalsProc::new(&["replay", "rollup_day", "--as", "v2", "--until-caught-up", "--progress", "plain"], env.child_env(&data));
    replay.stderr = Some(err.clone());
    replay.start();
    let status = replay.wait_exit("the replay to stop at the gap", Duration::from_secs(120)).await;
    let text = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(!status.success(), "{text}");
    assert!(text.contains("deleted from the lane and not in the archive") && text.contains("has a gap at offsets"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
