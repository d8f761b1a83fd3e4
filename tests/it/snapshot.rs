//! Task snapshots in the S3-compatible store (moto, started by `scripts/services up`): the S3
//! client against the real server; a processor killed with `kill -9` whose local state is then
//! deleted rebuilds it from its snapshot plus a replay from the snapshot's offsets and still
//! equals the oracle; and the fence that keeps an old owner from replacing a newer snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::Message;
use vitals::simulate::{self, SimConfig};
use vitals_processors::rollup_day;
use vitals_runtime::bump_epoch;
use vitals_runtime::s3::{S3Client, S3Settings};
use vitals_runtime::snapshot::{pointer, publish, Pointer};
use vitals_schemas::RollupDay;

use crate::harness::{fresh_db, services_up, wait_for, wait_for_every, TestEnv};
use crate::process::{fold, fold_with, inputs, proc_env, Proc};

fn s3_settings(bucket: &str) -> S3Settings {
    let cfg = vitals::config::Config::from_sources(None, &BTreeMap::new()).unwrap();
    S3Settings {
        endpoint: cfg.s3.endpoint.clone(),
        bucket: bucket.to_owned(),
        region: cfg.s3.region.clone(),
        access_key_id: cfg.s3.access_key_id.clone(),
        secret_access_key: cfg.s3.secret_access_key.expose().to_owned(),
        path_style: true,
        max_attempts: 3,
        part_size: vitals_runtime::s3::MIN_PART_SIZE,
        ca_pem: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_s3_client_round_trips_objects_against_the_real_server() {
    services_up();
    let bucket = format!("vitals-it-{}", uuid::Uuid::new_v4().simple());
    let s3 = S3Client::new(&s3_settings(&bucket)).unwrap();
    assert!(!s3.bucket_exists().await.unwrap(), "a fresh bucket name");
    s3.ensure_bucket().await.unwrap();
    s3.ensure_bucket().await.expect("ensure_bucket is idempotent");
    assert!(s3.bucket_exists().await.unwrap());

    let small = b"hello snapshots".to_vec();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for (key, body) in
        [("snapshots/a/p0/000000000001-000000000002.snap", &small), ("odd keys/ü$+=&.snap", &small), ("big/object.snap", &big)]
    {
        s3.put(key, body.clone()).await.unwrap_or_else(|e| panic!("PUT {key}: {e}"));
        let got = s3.get(key).await.unwrap_or_else(|e| panic!("GET {key}: {e}")).unwrap_or_else(|| panic!("{key} missing after PUT"));
        assert!(got == *body, "{key}: {} bytes back for {}", got.len(), body.len());
    }
    s3.put("snapshots/a/p0/000000000001-000000000002.snap", b"replaced".to_vec()).await.unwrap();
    assert_eq!(s3.get("snapshots/a/p0/000000000001-000000000002.snap").await.unwrap().as_deref(), Some(&b"replaced"[..]));
    assert_eq!(s3.get("no/such/key").await.unwrap(), None, "a missing object is None, not an error");

    // Files: one PUT up to the part size, a multipart upload beyond it (parts of 5 MiB here: one
    // exactly a part, one a byte more, one of three parts with a short last one), read back
    // through a file as they arrive.
    let dir = std::env::temp_dir().join(format!("vitals-s3-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let part = vitals_runtime::s3::MIN_PART_SIZE as usize;
    for (i, len) in [0, 1, part, part + 1, 2 * part + 12_345].into_iter().enumerate() {
        let body: Vec<u8> = (0..len as u32).map(|j| (j.wrapping_mul(2_654_435_761) >> 11) as u8 ^ i as u8).collect();
        let (up, down) = (dir.join(format!("up-{i}")), dir.join(format!("down-{i}")));
        std::fs::write(&up, &body).unwrap();
        let key = format!("files/{i}.snap");
        assert_eq!(s3.put_file(&key, &up).await.unwrap_or_else(|e| panic!("put_file of {len} bytes: {e}")), len as u64);
        assert_eq!(s3.get_to_file(&key, &down).await.unwrap(), Some(len as u64), "{len} bytes");
        assert!(std::fs::read(&down).unwrap() == body, "{len} bytes came back different");
        assert_eq!(s3.get(&key).await.unwrap().map(|b| b.len()), Some(len), "the multipart object reads as one");
    }
    let absent = dir.join("absent");
    assert_eq!(s3.get_to_file("no/such/key", &absent).await.unwrap(), None);
    assert!(!absent.exists(), "nothing written for a missing object");
    let _ = std::fs::remove_dir_all(dir);
}

/// `rollup_day` runs as an OS process, snapshots its tasks every 200 ms, is `kill -9`ed while a
/// second wave of uploads goes on, and its data directory is deleted. Restarted with nothing
/// local, it restores every partition that had a snapshot (recorded in `processor_restores`),
/// resumes from the snapshot's offsets (every output of the new epoch carries source offsets at
/// or past them) and the folded output equals the oracle, versions growing strictly per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_without_local_state_restores_from_its_snapshot_and_replays() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let data = std::env::temp_dir().join(format!("vitals-proc-{}", uuid::Uuid::new_v4().simple()));
    let mut vars = proc_env(&env, &data);
    vars.retain(|(k, _)| k != "RUST_LOG");
    vars.push(("RUST_LOG".into(), "warn,vitals_runtime=info".into()));
    vars.push(("VITALS_PROCESSORS__SNAPSHOT_EVERY_MS".into(), "200".into()));
    let mut proc = Proc { env: vars, child: None };
    let pointers = || async {
        sqlx::query_as::<_, (i32, i64, i64, i64)>(
            "SELECT partition, epoch, seq, position FROM processor_snapshots WHERE processor LIKE '%rollup_day' ORDER BY partition",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap()
    };

    assert_eq!(simulate::run(&env.sim("a", 1, 3, 3), &env.http).await.unwrap().rejected, 0);
    proc.start(None);
    wait_for_every("a first snapshot pointer", Duration::from_secs(90), Duration::from_millis(200), || async {
        let p = pointers().await;
        (!p.is_empty()).then_some(())
    })
    .await;
    // A second wave while it runs; kill -9 once the output has grown past the first snapshot.
    let before = fold(&env, &codec).await.1;
    let wave = {
        let cfg = SimConfig { users: 3, days: 2, ..env.sim("b", 2, 3, 2) };
        let http = env.http.clone();
        tokio::spawn(async move { simulate::run(&cfg, &http).await })
    };
    wait_for_every("the processor to emit more", Duration::from_secs(120), Duration::from_millis(300), || {
        let (env, codec) = (&env, &codec);
        async move { (fold(env, codec).await.1 > before).then_some(()) }
    })
    .await;
    proc.kill9();
    assert_eq!(wave.await.unwrap().unwrap().rejected, 0);
    // A pointer statement sent just before the kill still completes in PostgreSQL: let it land.
    statements_settled(&env.pool).await;
    let published: Vec<(i32, i64, i64, i64)> = pointers().await;
    assert!(published.iter().any(|(_, _, seq, position)| *seq > 0 && *position > 0), "a snapshot past the start: {published:?}");

    // The instance loses its disk: no local store at all.
    std::fs::remove_dir_all(&data).unwrap();
    assert!(!data.exists());
    proc.start(None);
    type Restore = (i32, i64, i64, i64, sqlx::types::Json<BTreeMap<String, i64>>, i64, i64);
    let restores: Vec<Restore> = wait_for_every("every snapshotted partition to be restored", Duration::from_secs(90), Duration::from_millis(200), || async {
        let rows: Vec<Restore> = sqlx::query_as(
            "SELECT partition, epoch, snapshot_epoch, snapshot_seq, offsets, bytes, restore_ms FROM processor_restores WHERE processor LIKE '%rollup_day' ORDER BY partition",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        (rows.len() >= published.len()).then_some(rows)
    })
    .await;
    assert_eq!(restores.len(), published.len(), "one restore per snapshotted partition, no more");
    for ((p, epoch, snap_epoch, snap_seq, _, bytes, ms), (pp, pe, ps, _)) in restores.iter().zip(&published) {
        assert_eq!((p, snap_epoch, snap_seq), (pp, pe, ps), "partition {p} restored the snapshot published before the kill");
        assert!(epoch > snap_epoch, "partition {p}: the restoring owner has a newer epoch ({epoch} vs {snap_epoch})");
        eprintln!("restored partition {p}: snapshot ({snap_epoch}, {snap_seq}), {bytes} bytes in {ms} ms");
    }

    // It catches up; the projection is exactly the oracle (fold also checks that versions grow
    // strictly per key along the log).
    let expected = rollup_day::oracle(&inputs(&env, &codec).await);
    assert!(expected.len() > 50, "a realistic workload: {} rollup rows", expected.len());
    wait_for_every("the projection to equal the oracle after the restore", Duration::from_secs(120), Duration::from_millis(500), || {
        let (env, codec, expected) = (&env, &codec, &expected);
        async move { (fold(env, codec).await.0 == *expected).then_some(()) }
    })
    .await;
    // The restored tasks replayed from the snapshot's offsets, not from the beginning: every
    // output of the restoring epoch on that partition carries source offsets at or past them.
    let t = env.topics();
    let mut checked = 0;
    for m in env.read(&t.rollup_day).await {
        let Some((_, epoch, _, _, offsets, _, _)) = restores.iter().find(|r| r.0 == m.partition()) else { continue };
        let row: RollupDay = codec.decode(m.payload().unwrap()).await.unwrap();
        if row.version_epoch != *epoch {
            continue;
        }
        for o in &row.source_offsets {
            let from = offsets.0.get(&o.topic).copied().unwrap_or(0);
            assert!(
                o.next_offset >= from,
                "partition {}: an output of epoch {epoch} has {} at {} < the snapshot's {from}",
                m.partition(),
                o.topic,
                o.next_offset
            );
        }
        checked += 1;
    }
    let restored_partitions: BTreeSet<i32> = restores.iter().map(|r| r.0).collect();
    eprintln!("{checked} outputs of the restoring epochs checked on partitions {restored_partitions:?}");
    assert!(checked > 0, "no output of a restoring epoch was checked: the test proved nothing about where the replay started");
    proc.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// Waits until no statement of another session runs in the test's database: a pointer statement
/// sent just before a kill still completes in PostgreSQL.
async fn statements_settled(pool: &sqlx::PgPool) {
    wait_for("the killed process's statements to finish", Duration::from_secs(10), || async {
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid()",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        (active == 0).then_some(())
    })
    .await;
}

fn ptr(epoch: i64, seq: i64, position: i64) -> Pointer {
    Pointer {
        epoch,
        seq,
        position,
        object_key: format!("snapshots/t/rollup_day/p0/{epoch:012}-{seq:012}-{position:015}.snap"),
        offsets: BTreeMap::from([("hot".to_owned(), position)]),
        stream_time_ms: 1,
        bytes: 10,
    }
}

/// The pointer only moves forward, and only by the current owner: a publish with an old epoch
/// after a newer one is refused, also when it races the bump (it waits for the bump's row lock
/// and then sees the new epoch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_owner_cannot_replace_a_newer_snapshot_pointer() {
    services_up();
    let (db_url, pool) = fresh_db().await;
    let (proc_, p) = ("rollup_day", 0);
    let current = || async { pointer(&pool, proc_, p).await.unwrap().map(|x| (x.epoch, x.seq, x.position)) };

    assert!(!publish(&pool, proc_, p, &ptr(1, 1, 1)).await.unwrap(), "no epoch row yet: nobody owns the task");
    assert_eq!(bump_epoch(&pool, proc_, p, 0).await.unwrap(), 1);
    assert!(publish(&pool, proc_, p, &ptr(1, 10, 100)).await.unwrap());
    assert!(!publish(&pool, proc_, p, &ptr(1, 10, 100)).await.unwrap(), "the same snapshot again is not newer");
    assert!(!publish(&pool, proc_, p, &ptr(1, 9, 90)).await.unwrap(), "an older snapshot of the same owner");
    assert!(publish(&pool, proc_, p, &ptr(1, 10, 130)).await.unwrap(), "same seq, further in the input");
    assert!(!publish(&pool, proc_, p, &ptr(2, 1, 1)).await.unwrap(), "an epoch that is not current yet");

    assert_eq!(bump_epoch(&pool, proc_, p, 0).await.unwrap(), 2);
    assert!(!publish(&pool, proc_, p, &ptr(1, 50, 500)).await.unwrap(), "the old owner, after the bump");
    assert_eq!(current().await, Some((1, 10, 130)));
    assert!(publish(&pool, proc_, p, &ptr(2, 3, 30)).await.unwrap(), "the new owner, even from behind");
    assert!(!publish(&pool, proc_, p, &ptr(1, 99, 999)).await.unwrap(), "the old owner again");
    assert_eq!(current().await, Some((2, 3, 30)));
    let full = pointer(&pool, proc_, p).await.unwrap().unwrap();
    assert_eq!(full, ptr(2, 3, 30), "the pointer reads back whole");
    assert_eq!(pointer(&pool, proc_, 1).await.unwrap(), None);

    // The race: a new owner's bump is in flight (row locked, not committed) while the current
    // owner publishes. The publish waits for the bump and is then refused.
    let mut bump = pool.begin().await.unwrap();
    sqlx::query("UPDATE processor_epochs SET epoch = epoch + 1 WHERE processor = $1 AND partition = $2")
        .bind(proc_)
        .bind(p)
        .execute(&mut *bump)
        .await
        .unwrap();
    let racing = {
        let pool = pool.clone();
        tokio::spawn(async move { publish(&pool, "rollup_day", 0, &ptr(2, 40, 400)).await.unwrap() })
    };
    wait_for("the racing publish to wait on the epoch row's lock", Duration::from_secs(10), || async {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
                .fetch_one(&pool)
                .await
                .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    assert!(!racing.is_finished(), "the publish must wait for the bump");
    bump.commit().await.unwrap();
    assert!(!racing.await.unwrap(), "a publish that raced the bump is refused once the bump commits");
    assert_eq!(current().await, Some((2, 3, 30)));
    assert!(publish(&pool, proc_, p, &ptr(3, 1, 1)).await.unwrap(), "the new owner publishes");

    pool.close().await;
    crate::harness::drop_db(&db_url).await;
}

/// The restore the exactly-once argument has to survive: the published snapshot is *behind* the
/// outputs its owner went on to emit, and that owner is not dead but frozen (SIGSTOP) at the worst
/// moment — its next interval planned, not yet produced. A second instance with no local state
/// takes every partition over, restores the old snapshot, and must overwrite whatever the
/// frozen owner emitted after it. Then the zombie is thawed, and is asserted to have written:
/// records of its old epoch land after the new owner's. The new owner answers them, so the output
/// topic folded by version *and* as compaction keeps it, and the PostgreSQL tables the sink
/// builds, all equal the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_behind_the_outputs_overwrites_them_and_a_thawed_zombie_changes_nothing() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let base = std::env::temp_dir().join(format!("vitals-zombie-{}", uuid::Uuid::new_v4().simple()));
    let pause = base.join("pause-before-produce");
    std::fs::create_dir_all(&base).unwrap();
    let vars = |dir: &str| {
        let mut v = proc_env(&env, &base.join(dir));
        // One snapshot per task early on, then none for a minute: it stays behind the outputs.
        v.push(("VITALS_PROCESSORS__SNAPSHOT_EVERY_MS".into(), "60000".into()));
        v.push(("VITALS_TEST_PAUSE_BEFORE_PRODUCE".into(), pause.display().to_string()));
        // The thawed zombie must get its late write delivered: after a long SIGSTOP its producer
        // reconnects first, which at the end of a full suite took longer than the default 10 s
        // (MessageTimedOut, the write never happened and the test waited for it in vain).
        v.retain(|(k, _)| k != "VITALS_KAFKA__PRODUCE_TIMEOUT_MS");
        v.push(("VITALS_KAFKA__PRODUCE_TIMEOUT_MS".into(), "45000".into()));
        v
    };
    let pointers = || async {
        sqlx::query_as::<_, (i32, i64, i64)>(
            "SELECT partition, epoch, seq FROM processor_snapshots WHERE processor LIKE '%rollup_day' ORDER BY partition",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap()
    };
    let epochs = || async {
        sqlx::query_as::<_, (i32, i64)>(
            "SELECT partition, epoch FROM processor_epochs WHERE processor LIKE '%rollup_day' ORDER BY partition",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap()
    };
    // How far the output log has been written (it only grows; a record count drops under compaction).
    let written = || async { fold_with(&env, &codec, false).await.end };
    let mut sink = crate::harness::VitalsProc::new(&["sink"], env.child_env(&base.join("sink")));
    sink.start();

    assert_eq!(simulate::run(&env.sim("a", 21, 3, 2), &env.http).await.unwrap().rejected, 0);
    let mut a = Proc { env: vars("a"), child: None };
    a.start(None);
    // Every partition with input gets a snapshot (an empty one has nothing to snapshot), at the
    // first occasion after A has processed it.
    let t = env.topics();
    let first = rollup_day::oracle(&inputs(&env, &codec).await);
    wait_for_every("A to process the first wave", Duration::from_secs(90), Duration::from_millis(200), || async {
        (fold(&env, &codec).await.0 == first).then_some(())
    })
    .await;
    let mut with_input = BTreeSet::new();
    for topic in [&t.hot, &t.cold, &t.change, &t.domain] {
        with_input.extend(env.read(topic).await.iter().map(|m| m.partition()));
    }
    let n = with_input.len();
    wait_for_every("a snapshot of every partition with input", Duration::from_secs(90), Duration::from_millis(200), || async {
        (pointers().await.len() >= n).then_some(())
    })
    .await;
    let snapshots = pointers().await;
    // More uploads: A emits past its snapshots.
    let before = written().await;
    assert_eq!(simulate::run(&env.sim("b", 22, 3, 2), &env.http).await.unwrap().rejected, 0);
    wait_for_every("A to emit past its snapshots", Duration::from_secs(90), Duration::from_millis(200), || async {
        (written().await > before + 20).then_some(())
    })
    .await;
    // Freeze A right before it produces its next interval: it has read the next upload and
    // computed its outputs, and will write them whenever it wakes.
    std::fs::write(&pause, b"").unwrap();
    assert_eq!(simulate::run(&env.sim("c", 23, 2, 1), &env.http).await.unwrap().rejected, 0);
    wait_for_every("A to stop itself before producing", Duration::from_secs(60), Duration::from_millis(100), || async {
        a.stopped().then_some(())
    })
    .await;
    let a_epochs: BTreeMap<i32, i64> = epochs().await.into_iter().collect();
    let later = pointers().await;
    assert!(
        snapshots.iter().all(|s| later.contains(s)),
        "no snapshot newer than the first ones ({snapshots:?} → {later:?}): the restore will be behind the outputs"
    );

    // B starts with nothing local: once A's session expires, it owns every partition and
    // restores each from its (old) snapshot.
    let mut b = Proc { env: vars("b"), child: None };
    b.start(None);
    let expected = rollup_day::oracle(&inputs(&env, &codec).await);
    assert!(expected.len() > 50, "a realistic workload: {} rollup rows", expected.len());
    let both = || {
        let (env, codec, expected) = (&env, &codec, &expected);
        move || async move {
            let f = fold_with(env, codec, false).await;
            (f.by_version == *expected && f.compacted == *expected).then_some(())
        }
    };
    wait_for_every("B alone to bring the output to the oracle, both folds", Duration::from_secs(150), Duration::from_millis(500), both())
        .await;
    let restores: i64 = sqlx::query_scalar("SELECT count(*) FROM processor_restores WHERE processor LIKE '%rollup_day'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(restores >= n as i64, "every snapshotted partition restored from its snapshot ({restores})");
    let b_epochs: BTreeMap<i32, i64> = epochs().await.into_iter().collect();
    assert!(
        a_epochs.iter().all(|(p, e)| b_epochs.get(p).is_some_and(|b| b > e)),
        "B owns every partition under a newer epoch: {a_epochs:?} → {b_epochs:?}"
    );

    // Thaw the zombie. It writes the interval it had planned, under its old epoch.
    a.signal("CONT");
    let zombie_writes = wait_for_every("the zombie's late write", Duration::from_secs(60), Duration::from_millis(200), || async {
        let msgs = env.read(&t.rollup_day).await;
        let mut newest_seen: BTreeMap<i32, i64> = BTreeMap::new();
        let mut late = 0usize;
        let mut sorted: Vec<_> = msgs.iter().collect();
        sorted.sort_by_key(|m| (m.partition(), m.offset()));
        for m in sorted {
            let r: RollupDay = codec.decode(m.payload().unwrap()).await.unwrap();
            let p = m.partition();
            if newest_seen.get(&p).is_some_and(|e| *e > r.version_epoch) && r.version_epoch == a_epochs[&p] {
                late += 1;
            }
            let e = newest_seen.entry(p).or_insert(r.version_epoch);
            *e = (*e).max(r.version_epoch);
        }
        (late > 0).then_some(late)
    })
    .await;
    eprintln!("the zombie wrote {zombie_writes} records after the new owner's");
    wait_for_every(
        "the output to equal the oracle again, both folds, after the zombie wrote",
        Duration::from_secs(120),
        Duration::from_millis(500),
        both(),
    )
    .await;
    // The sink's tables hold the same.
    wait_for_every("proj_rollup_day to equal the oracle", Duration::from_secs(120), Duration::from_millis(500), || async {
        (crate::sink::rows::<RollupDay>(&env.pool, "proj_rollup_day").await == expected).then_some(())
    })
    .await;
    a.kill9();
    b.kill9();
    sink.kill9();
    let _ = std::fs::remove_dir_all(&base);
    env.cleanup().await;
}

/// The snapshot argument needs every owner newer than the published snapshot to have started from
/// it. An owner that resumes from its local store does not, so it withdraws the pointer — also on
/// an instance whose own snapshots are off (a rollout that mixes the setting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_without_snapshots_still_withdraws_the_pointer_it_does_not_start_from() {
    let env = TestEnv::start().await;
    let data = std::env::temp_dir().join(format!("vitals-proc-{}", uuid::Uuid::new_v4().simple()));
    let pointers = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processor_snapshots WHERE processor LIKE '%rollup_day'")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    assert_eq!(simulate::run(&env.sim("a", 71, 3, 2), &env.http).await.unwrap().rejected, 0);
    let mut proc = Proc { env: proc_env(&env, &data), child: None };
    proc.set("VITALS_PROCESSORS__SNAPSHOT_EVERY_MS", 200);
    proc.start(None);
    wait_for_every("a snapshot pointer", Duration::from_secs(90), Duration::from_millis(200), || async {
        (pointers().await > 0).then_some(())
    })
    .await;
    proc.kill9();
    // The same instance comes back with its local store (trusted: it was the last owner) and with
    // snapshots off.
    proc.set("VITALS_PROCESSORS__SNAPSHOT_EVERY_MS", 0);
    proc.start(None);
    wait_for_every("the pointers it does not start from to be withdrawn", Duration::from_secs(60), Duration::from_millis(200), || async {
        (pointers().await == 0).then_some(())
    })
    .await;
    proc.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// The memory a restoring processor may use, against a snapshot twice that size.
const MEMORY_ALLOWED: u64 = 192 * 1024 * 1024;

/// A process started in a memory cgroup of its own (`MEMORY_ALLOWED`, where the machine lets the
/// test make one: cgroup v1 here), its peak resident memory read from `/proc`.
struct Limited {
    child: std::process::Child,
    cgroup: Option<std::path::PathBuf>,
}

impl Limited {
    fn start(env: &[(String, String)]) -> Limited {
        let cgroup = std::path::PathBuf::from(format!("/sys/fs/cgroup/memory/vitals-it-{}", uuid::Uuid::new_v4().simple()));
        let cgroup = std::fs::create_dir(&cgroup)
            .and_then(|_| std::fs::write(cgroup.join("memory.limit_in_bytes"), MEMORY_ALLOWED.to_string()))
            .map(|_| cgroup.clone())
            .map_err(|e| {
                let _ = std::fs::remove_dir(&cgroup);
                eprintln!("no memory cgroup ({e}): the limit is checked on the peak resident memory only");
            })
            .ok();
        // The shell joins the cgroup, then becomes the processor: it is limited from its first
        // allocation.
        let join = match &cgroup {
            Some(g) => format!("echo $$ > {}/cgroup.procs && ", g.display()),
            None => String::new(),
        };
        let mut cmd = std::process::Command::new("sh");
        crate::process::without_aws_settings(&mut cmd);
        let child = cmd
            .arg("-c")
            .arg(format!("{join}exec \"$0\" process rollup_day"))
            .arg(env!("CARGO_BIN_EXE_vitals"))
            .envs(env.iter().cloned())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("starting vitals process");
        Limited { child, cgroup }
    }

    /// Panics if the process has died (exited or killed: in its cgroup, for lack of memory).
    fn alive(pid: u32) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let state = status.lines().find_map(|l| l.strip_prefix("State:")).unwrap_or("gone").trim().to_owned();
        assert!(!state.starts_with('Z') && state != "gone", "the limited processor died ({state}): killed for lack of memory?");
    }

    /// The peak resident memory so far (VmHWM); panics if the process has died (an OOM kill).
    fn peak(&mut self) -> u64 {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the limited processor died ({status:?}): out of memory?");
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kb * 1024
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(g) = &self.cgroup {
            let _ = std::fs::remove_dir(g);
        }
    }
}

/// A snapshot twice the size of the memory a processor is allowed: the processor restores it
/// (download and import streamed through files), goes on processing, and snapshots the big store
/// again (export and multipart upload streamed), its peak resident memory below the allowance
/// throughout — and, where the machine allows a memory cgroup, inside one that would kill it
/// beyond. Seen failing before the streaming (the whole object was held in memory twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_larger_than_the_memory_allowed_is_restored_and_taken_again() {
    use vitals_processors::State;
    use vitals_runtime::store::{Overlay, Store, UserState};
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    // On disk (the target directory), not a tmpfs /tmp: the cgroup would charge its files as
    // memory that cannot be reclaimed.
    let data = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("vitals-proc-{}", uuid::Uuid::new_v4().simple()));
    let mut vars = proc_env(&env, &data);
    vars.retain(|(k, _)| k != "RUST_LOG");
    vars.push(("RUST_LOG".into(), "warn,vitals_runtime=info".into()));
    vars.push(("VITALS_PROCESSORS__SNAPSHOT_EVERY_MS".into(), "200".into()));
    // The page cache of each store is what the operator gives it (64 MiB by default); the point
    // here is that nothing grows with the snapshot.
    vars.push(("VITALS_PROCESSORS__STORE_CACHE_MB".into(), "16".into()));
    let task = format!("{}rollup_day", env.cfg.kafka.topic_prefix);
    let pointers = || async {
        sqlx::query_as::<_, (i32, i64, i64, String, i64)>(
            "SELECT partition, epoch, seq, object_key, bytes FROM processor_snapshots WHERE processor = $1 ORDER BY partition",
        )
        .bind(&task)
        .fetch_all(&env.pool)
        .await
        .unwrap()
    };

    // A small real snapshot first, taken by a processor that is then killed.
    let wave = env.sim("a", 1, 2, 2);
    assert_eq!(simulate::run(&wave, &env.http).await.unwrap().rejected, 0);
    let mut first = Proc { env: vars.clone(), child: None };
    first.start(None);
    let (p, epoch, seq, object, _) = wait_for_every("a snapshot pointer", Duration::from_secs(90), Duration::from_millis(200), || async {
        pointers().await.into_iter().find(|x| x.2 > 0)
    })
    .await;
    let baseline = std::fs::read_to_string(format!("/proc/{}/status", first.pid())).unwrap_or_default();
    eprintln!("a processor with small stores: {}", baseline.lines().find(|l| l.starts_with("VmHWM")).unwrap_or("VmHWM ?"));
    first.kill9();
    statements_settled(&env.pool).await;
    let (p, epoch, seq, object) =
        pointers().await.into_iter().find(|x| x.0 == p).map(|x| (x.0, x.1, x.2, x.3)).unwrap_or((p, epoch, seq, object));

    // That snapshot grown to twice the allowance: ballast under a user who never uploads (so no
    // output changes), the checkpoint untouched; published in place of the real one.
    let s3 = vitals::app::s3_client(&env.cfg).unwrap();
    let work = data.with_extension("work");
    std::fs::create_dir_all(&work).unwrap();
    assert!(s3.get_to_file(&object, &work.join("small.snap")).await.unwrap().is_some());
    let store = Store::import_file(&work.join("grown.redb"), &work.join("small.snap")).unwrap();
    let cp = store.checkpoint().unwrap();
    let blob = 1024 * 1024;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in 0..(2 * MEMORY_ALLOWED / blob as u64 / 16) {
        let mut ov = Overlay::default();
        let mut ballast = UserState::new(&store, &mut ov, "ballast-user-who-never-uploads");
        for i in 0..16 {
            // Not compressible, so no layer can make it small.
            let value: Vec<u8> = (0..blob / 8)
                .flat_map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng.to_le_bytes()
                })
                .collect();
            ballast.put(&format!("blob/{chunk:04}/{i:02}"), value);
        }
        store.commit(ov, &cp).unwrap();
    }
    let grown = work.join("grown.snap");
    let size = store.export_file(&grown).unwrap();
    drop(store);
    assert!(size > 2 * MEMORY_ALLOWED - 1024 * 1024, "a snapshot of {size} bytes");
    let big_key = format!("{object}.grown");
    assert_eq!(s3.put_file(&big_key, &grown).await.unwrap(), size);
    let _ = std::fs::remove_dir_all(&work);
    sqlx::query(
        "UPDATE processor_snapshots SET object_key = $3, bytes = $4 WHERE processor = $1 AND partition = $2 AND epoch = $5 AND seq = $6",
    )
    .bind(&task)
    .bind(p)
    .bind(&big_key)
    .bind(size as i64)
    .bind(epoch)
    .bind(seq)
    .execute(&env.pool)
    .await
    .unwrap();

    // The instance loses its disk and restarts limited.
    std::fs::remove_dir_all(&data).unwrap();
    let mut limited = Limited::start(&vars);
    let pid = limited.child.id();
    let restored: i64 = wait_for_every("the big snapshot to be restored", Duration::from_secs(120), Duration::from_millis(200), || async {
        Limited::alive(pid);
        sqlx::query_scalar("SELECT bytes FROM processor_restores WHERE processor = $1 AND partition = $2 AND snapshot_seq = $3")
            .bind(&task)
            .bind(p)
            .bind(seq)
            .fetch_optional(&env.pool)
            .await
            .unwrap()
    })
    .await;
    assert_eq!(restored as u64, size, "the grown snapshot, not a replay from the beginning");
    let peak = limited.peak();
    eprintln!("restored {size} bytes with a peak resident memory of {} MiB (allowed {} MiB)", peak >> 20, MEMORY_ALLOWED >> 20);
    assert!(peak < MEMORY_ALLOWED, "restoring took {} MiB of memory, {} allowed", peak >> 20, MEMORY_ALLOWED >> 20);

    // It processes on (the same users again, so partition p gets input and its checkpoint
    // moves), and snapshots the big store again (export and multipart upload).
    assert_eq!(simulate::run(&SimConfig { seed: 2, ..wave }, &env.http).await.unwrap().rejected, 0);
    wait_for_every("a snapshot of the big store by the new owner", Duration::from_secs(120), Duration::from_millis(300), || async {
        Limited::alive(pid);
        pointers().await.into_iter().find(|x| x.0 == p && x.1 > epoch && x.4 as u64 >= size).map(|_| ())
    })
    .await;
    let expected = rollup_day::oracle(&inputs(&env, &codec).await);
    wait_for_every("the projection to equal the oracle", Duration::from_secs(120), Duration::from_millis(500), || {
        let (env, codec, expected) = (&env, &codec, &expected);
        async move { (fold(env, codec).await.0 == *expected).then_some(()) }
    })
    .await;
    let peak = limited.peak();
    eprintln!("snapshotted again with a peak resident memory of {} MiB", peak >> 20);
    assert!(peak < MEMORY_ALLOWED, "the snapshot took {} MiB of memory, {} allowed", peak >> 20, MEMORY_ALLOWED >> 20);
    drop(limited);
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// With no access key configured, the store's credentials come from the SDK's default chain —
/// here a web identity token exchanged at STS for temporary credentials, the path IRSA takes on
/// EKS (moto answers STS on the store's port) — and snapshots are published. With no source of
/// credentials at all, snapshots and restores fail, counted on /metrics, and processing goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_access_key_the_default_credential_chain_signs_for_the_store() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let base = std::env::temp_dir().join(format!("vitals-chain-{}", uuid::Uuid::new_v4().simple()));
    // No profile files, no instance metadata: only what each run below names.
    let home = base.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let token = base.join("web-identity-token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6dml0YWxzOnByb2Nlc3NvciJ9.c2ln").unwrap();
    let chain_env = |data: &std::path::Path, port: u16| {
        let mut vars = proc_env(&env, data);
        vars.extend(
            [
                ("VITALS_S3__ACCESS_KEY_ID", String::new()),
                ("VITALS_S3__SECRET_ACCESS_KEY", String::new()),
                ("VITALS_PROCESSORS__SNAPSHOT_EVERY_MS", "200".into()),
                ("VITALS_PROCESSORS__METRICS_LISTEN", format!("127.0.0.1:{port}")),
                ("HOME", home.display().to_string()),
                ("AWS_CONFIG_FILE", home.join("none").display().to_string()),
                ("AWS_SHARED_CREDENTIALS_FILE", home.join("none").display().to_string()),
                ("AWS_EC2_METADATA_DISABLED", "true".into()),
                ("AWS_REGION", env.cfg.s3.region.clone()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        vars
    };
    let task = format!("{}rollup_day", env.cfg.kafka.topic_prefix);
    let published = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processor_snapshots WHERE processor = $1")
            .bind(&task)
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    assert_eq!(simulate::run(&env.sim("a", 1, 2, 2), &env.http).await.unwrap().rejected, 0);

    // IRSA's variables: the token file and the role; STS at the store's address.
    let port = crate::harness::free_port();
    let mut vars = chain_env(&base.join("a"), port);
    vars.extend(
        [
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token.display().to_string()),
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/vitals-processor".to_owned()),
            ("AWS_ROLE_SESSION_NAME", "vitals-it".to_owned()),
            ("AWS_ENDPOINT_URL_STS", env.cfg.s3.endpoint.clone()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let mut proc = Proc { env: vars, child: None };
    proc.start(None);
    wait_for_every("a snapshot signed with web identity credentials", Duration::from_secs(90), Duration::from_millis(200), || async {
        (published().await > 0).then_some(())
    })
    .await;
    proc.kill9();

    // Nothing to sign with: a new instance without local state cannot restore (it replays from
    // the beginning instead) nor snapshot, says so on /metrics, and still computes everything.
    let port = crate::harness::free_port();
    let mut proc = Proc { env: chain_env(&base.join("b"), port), child: None };
    proc.start(None);
    wait_for_every("failed restores and snapshots without credentials", Duration::from_secs(90), Duration::from_millis(300), || async {
        let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.ok()?.text().await.ok()?;
        let restores = crate::harness::metric_sum(&body, "vitals_processor_snapshot_restore_failures_total");
        let snapshots = crate::harness::metric_sum(&body, "vitals_processor_snapshot_failures_total");
        (restores > 0.0 && snapshots > 0.0).then_some(())
    })
    .await;
    let expected = rollup_day::oracle(&inputs(&env, &codec).await);
    wait_for_every("the projection to equal the oracle without a store", Duration::from_secs(120), Duration::from_millis(500), || {
        let (env, codec, expected) = (&env, &codec, &expected);
        async move { (fold(env, codec).await.0 == *expected).then_some(()) }
    })
    .await;
    proc.kill9();
    let _ = std::fs::remove_dir_all(&base);
    env.cleanup().await;
}
