//! Issue 11, item 4: `vitals archive` writes every record of the input lanes to the S3 store,
//! sealed per user. Real processes on the real broker, PostgreSQL and S3: an archiver aborted
//! right after recording a segment, then two archivers at once while uploads continue; the
//! archive then holds every lane record exactly once, byte for byte, in contiguous segments
//! that name no user in clear, and deleting one user's key makes exactly their records
//! unreadable.

use std::collections::BTreeMap;
use std::time::Duration;

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

    // Two archivers of the same partitions at once, while more people upload.
    let mut one = VitalsProc::new(&["archive"], vars.clone());
    let mut two = VitalsProc::new(&["archive"], vars.clone());
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
            let got = archive::read(&pool, &s3, &topic, p, from, to).await.unwrap();
            let got: Vec<Raw> = got.records.iter().map(Raw::of).collect();
            assert_eq!(got.len(), want.len(), "{topic}/{p}");
            assert!(got == want, "{topic}/{p}: the archive differs from the lane");
            total += got.len();
        }
    }
    assert!(total > 20, "the lanes held records: {total}");

    // Segments: contiguous per partition, none overlapping, each object naming no user.
    let segs: Vec<(String, i32, i64, i64, String)> =
        sqlx::query_as("SELECT topic, partition, first_offset, next_offset, object_key FROM archive_segments ORDER BY topic, partition, first_offset").fetch_all(&pool).await.unwrap();
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
        let r = archive::read(&pool, &s3, topic, *p, 0, *to).await.unwrap();
        erased += r.erased;
        for m in &r.records {
            assert_ne!(rdkafka::Message::key(m), Some(gone.as_bytes()), "an erased user's record was read");
        }
        readable += r.records.len();
    }
    assert_eq!(erased, by_user[gone], "every record of the erased user, and only theirs");
    assert_eq!(readable as u64 + erased, total as u64);

    // A read past what is archived is refused, never short.
    let (topic, p) = next.keys().next().unwrap().clone();
    let e = archive::read(&pool, &s3, &topic, p, 0, next[&(topic.clone(), p)] + 5).await.unwrap_err();
    assert!(e.to_string().contains("not all of"), "{e:#}");
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
