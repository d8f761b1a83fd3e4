//! Issue 11, item 2: a processor replayed as a new version beside the live one, every component
//! a real process on the real broker, registry and PostgreSQL. `rollup_day` runs live (v1);
//! `vitals replay rollup_day --as v2` starts from the beginning while uploads continue, is
//! aborted at the worst moment (outputs acknowledged, checkpoint not committed) and started
//! again, resumes from its checkpoints, and catches up; `vitals promote` switches reads while
//! a reader reads every user, and no read marked fresh differs from the oracle; the promoted
//! table equals the oracle; `vitals retire` removes v1 and refuses to remove what is served.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use vitals::simulate;
use vitals_schemas::RollupDay;

use crate::harness::{wait_for, wait_for_every, TestEnv, VitalsProc};
use crate::pipeline::Out;

pub(crate) type Rows = BTreeMap<String, Vec<RollupDay>>;

/// One user's rollups as the API serves them (every page), and the freshness state.
async fn read(http: &reqwest::Client, base: &str, token: &str) -> (String, Vec<RollupDay>) {
    let body: Value =
        http.get(format!("{base}/v1/projections/rollup_day?limit=1000")).bearer_auth(token).send().await.unwrap().json().await.unwrap();
    let state = body["freshness"]["state"].as_str().unwrap_or_else(|| panic!("{body}")).to_owned();
    assert!(body["next_cursor"].is_null(), "one page holds the test's rows: {body}");
    let mut rows: Vec<RollupDay> = body["data"].as_array().unwrap().iter().map(|v| serde_json::from_value(v.clone()).unwrap()).collect();
    for r in &mut rows {
        r.strip();
    }
    rows.sort_by(|a, b| (&a.metric, &a.local_date).cmp(&(&b.metric, &b.local_date)));
    (state, rows)
}

/// The oracle over everything the edge accepted, per user, as the API would list it.
pub(crate) async fn oracle(env: &TestEnv) -> Rows {
    let codec = vitals::app::codec(&env.cfg);
    let mut by_user = Rows::new();
    for r in crate::pipeline::expected(env, &codec).await.rollup.into_values().filter(|r| !r.deleted) {
        by_user.entry(r.user_id.clone()).or_default().push(r);
    }
    for rows in by_user.values_mut() {
        rows.sort_by(|a, b| (&a.metric, &a.local_date).cmp(&(&b.metric, &b.local_date)));
    }
    by_user
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_resumes_after_a_crash_catches_up_and_is_promoted_without_a_stale_fresh_read() {
    let env = TestEnv::start().await;
    let data = std::env::temp_dir().join(format!("vitals-replay-{}", uuid::Uuid::new_v4().simple()));
    let base = env.serve_api().await;
    let http = reqwest::Client::new();
    let first = env.sim("rpa", 21, 3, 5);
    assert_eq!(simulate::run(&first, &env.http).await.unwrap().rejected, 0);

    // v1, live.
    let mut v1 = VitalsProc::new(&["process", "rollup_day"], env.child_env(&data));
    v1.start();
    let mut sink = VitalsProc::new(&["sink"], env.child_env(&data));
    sink.start();
    let users: Vec<String> = (0..3).map(|i| simulate::user_id(&first, i)).collect();
    for u in &users {
        let token = env.token(u);
        wait_for_every("v1 to be fresh", Duration::from_secs(120), Duration::from_millis(200), || async {
            (read(&http, &base, &token).await.0 == "fresh").then_some(())
        })
        .await;
    }

    // v2: aborted right after its 4th interval's outputs were acknowledged, before that
    // checkpoint: small intervals so that the earlier ones committed.
    let out = data.with_extension("replay.out");
    let mut replay_env = env.child_env(&data);
    replay_env.push(("VITALS_PROCESSORS__MAX_BATCH".into(), "10".into()));
    let args = ["replay", "rollup_day", "--as", "v2", "--progress", "plain", "--every", "0.3"];
    let mut crashing = VitalsProc::new(&[&args[..], &["--crash-after-produce", "4"]].concat(), replay_env.clone());
    crashing.stdout = Some(out.clone());
    crashing.start();
    let status = crashing.wait_exit("the replay to abort after its 4th interval", Duration::from_secs(120)).await;
    assert!(!status.success(), "aborted: {status:?}");
    // Three intervals of at most ten records are not all of v1's input: v2 is behind.
    let e = vitals::replay::promote(&env.cfg, "rollup_day", "v2", false).await.unwrap_err();
    assert!(format!("{e:#}").contains("v2 is behind v1"), "{e:#}");

    // Uploads continue while the replay runs again.
    let second = env.sim("rpb", 22, 2, 3);
    let uploads = {
        let (sim, http) = (second.clone(), env.http.clone());
        tokio::spawn(async move { simulate::run(&sim, &http).await.unwrap().rejected })
    };
    let mut replay = VitalsProc::new(&args, replay_env);
    replay.stdout = Some(out.clone());
    replay.start();
    assert_eq!(uploads.await.unwrap(), 0);
    let users: Vec<String> = users.into_iter().chain((0..2).map(|i| simulate::user_id(&second, i))).collect();
    let expected = oracle(&env).await;
    assert_eq!(expected.len(), users.len(), "every user has rollups");

    // A reader of every user, through the promotion: a read that says fresh equals the oracle
    // (every upload is in by now); each read is one snapshot of one version.
    let done = Arc::new(AtomicBool::new(false));
    let (reads, fresh_reads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let reader = {
        let (http, base, done, reads, fresh_reads, expected) =
            (http.clone(), base.clone(), Arc::clone(&done), Arc::clone(&reads), Arc::clone(&fresh_reads), expected.clone());
        let tokens: Vec<(String, String)> = users.iter().map(|u| (u.clone(), env.token(u))).collect();
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                for (u, token) in &tokens {
                    let (state, rows) = read(&http, &base, token).await;
                    reads.fetch_add(1, Ordering::Relaxed);
                    if state == "fresh" {
                        fresh_reads.fetch_add(1, Ordering::Relaxed);
                        assert_eq!(&rows, &expected[u], "a read of {u} marked fresh differs from the oracle");
                    }
                }
            }
        })
    };

    // Forced while v2 is still behind (its restart waits for the group to hand the partitions
    // over): reads switch to v2 at once and say how far behind it is, never fresh.
    let promoted = vitals::replay::promote(&env.cfg, "rollup_day", "v2", true).await.unwrap();
    assert!(promoted.contains("reads now serve v2"), "{promoted}");
    // Every user fresh after the switch, then the reader stops.
    for u in &users {
        let token = env.token(u);
        wait_for_every("every user fresh on v2", Duration::from_secs(120), Duration::from_millis(200), || async {
            let (state, rows) = read(&http, &base, &token).await;
            (state == "fresh" && rows == expected[u]).then_some(())
        })
        .await;
    }
    let n_users = users.len();
    // Back to v1 and forward to v2 again, unforced: neither is behind the other now.
    for v in ["v1", "v2"] {
        let m = wait_for_every("an unforced promotion", Duration::from_secs(60), Duration::from_millis(300), || {
            let cfg = env.cfg.clone();
            async move { vitals::replay::promote(&cfg, "rollup_day", v, false).await.ok() }
        })
        .await;
        assert!(m.contains(&format!("reads now serve {v}")), "{m}");
        let at = reads.load(Ordering::Relaxed);
        wait_for("the reader to read after the promotion", Duration::from_secs(60), || {
            let n = reads.load(Ordering::Relaxed);
            async move { (n > at + n_users).then_some(()) }
        })
        .await;
    }
    done.store(true, Ordering::Relaxed);
    reader.await.expect("no fresh read differed from the oracle");
    assert!(fresh_reads.load(Ordering::Relaxed) > 0, "some reads were fresh");

    // The promoted table itself equals the oracle (not v1's table read through another name).
    let pool = sqlx::PgPool::connect(&env.db_url).await.unwrap();
    let bodies: Vec<(sqlx::types::Json<RollupDay>,)> =
        sqlx::query_as("SELECT body FROM proj_rollup_day__v2 WHERE NOT deleted").fetch_all(&pool).await.unwrap();
    let mut table = Rows::new();
    for (mut r,) in bodies.into_iter().map(|(b,)| (b.0,)) {
        r.strip();
        table.entry(r.user_id.clone()).or_default().push(r);
    }
    for rows in table.values_mut() {
        rows.sort_by(|a, b| (&a.metric, &a.local_date).cmp(&(&b.metric, &b.local_date)));
    }
    assert_eq!(table, expected, "proj_rollup_day__v2 equals the oracle");

    // The restarted replay resumed from its checkpoints (some partition taken past 0), and the
    // plain display says where each partition stands.
    let text = wait_for("the replay's display to say it caught up", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&out).unwrap();
        async move { text.split("resuming rollup_day v2").nth(1).is_some_and(|r| r.contains("rollup_day v2 caught up")).then_some(text) }
    })
    .await;
    let resumed = text.split("resuming rollup_day v2").nth(1).unwrap();
    let taken: Vec<i64> = resumed.lines().filter_map(|l| l.split(", from ").nth(1)?.split(')').next()?.parse().ok()).collect();
    assert!(taken.iter().any(|o| *o > 0), "a partition resumed past its start: {resumed}");

    // Retire: what is served is refused; v1 once its processor is stopped.
    let e = vitals::replay::retire(&env.cfg, "rollup_day", "v2", true).await.unwrap_err();
    assert!(e.to_string().contains("is the version reads are served from"), "{e:#}");
    let e = vitals::replay::retire(&env.cfg, "rollup_day", "v1", true).await.unwrap_err();
    assert!(e.to_string().contains("member"), "v1's processor still runs: {e:#}");
    v1.terminate(Duration::from_secs(30));
    let report = wait_for_every("v1's group to be empty and v1 retired", Duration::from_secs(60), Duration::from_millis(500), || {
        let cfg = env.cfg.clone();
        async move { vitals::replay::retire(&cfg, "rollup_day", "v1", true).await.ok() }
    })
    .await;
    assert!(report.iter().any(|l| l.starts_with("dropped table proj_rollup_day;")), "{report:?}");
    let gone: bool = sqlx::query_scalar("SELECT to_regclass('proj_rollup_day') IS NULL").fetch_one(&pool).await.unwrap();
    assert!(gone, "{report:?}");
    // Reads go on from v2, fresh and equal.
    for u in &users {
        assert_eq!(read(&http, &base, &env.token(u)).await, ("fresh".to_owned(), expected[u].clone()));
    }
    let mut again = VitalsProc::new(&["process", "rollup_day"], env.child_env(&data));
    again.start();
    let status = again.wait_exit("the retired base version to refuse to run", Duration::from_secs(60)).await;
    assert!(!status.success());
    replay.terminate(Duration::from_secs(30));
    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// The rows of `table` (a version's shadow table), per user, as the oracle lists them.
pub(crate) async fn table_rows(pool: &sqlx::PgPool, table: &str) -> Rows {
    let bodies: Vec<(sqlx::types::Json<RollupDay>,)> =
        sqlx::query_as(&format!("SELECT body FROM {table} WHERE NOT deleted")).fetch_all(pool).await.unwrap();
    let mut out = Rows::new();
    for (b,) in bodies {
        let mut r = b.0;
        r.strip();
        out.entry(r.user_id.clone()).or_default().push(r);
    }
    for rows in out.values_mut() {
        rows.sort_by(|a, b| (&a.metric, &a.local_date).cmp(&(&b.metric, &b.local_date)));
    }
    out
}

/// `--from <time>` and `--from <offsets file>` (the file `vitals offsets show rollup_day --json`
/// writes once v1 has read the first users): both versions hold exactly the users uploaded
/// after that point, as the oracle computes them, and nothing of those before. Two replays run
/// at once; a bad offsets file and a `--from` other than a version's own are refused before
/// anything starts; a partial version is not promoted unforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_a_time_or_an_offsets_file_holds_exactly_what_came_after() {
    let env = TestEnv::start().await;
    let data = std::env::temp_dir().join(format!("vitals-replay-from-{}", uuid::Uuid::new_v4().simple()));
    let before = env.sim("rfa", 31, 2, 2);
    assert_eq!(simulate::run(&before, &env.http).await.unwrap().rejected, 0);

    // v1 reads the first users; its group's committed offsets then stand at the lanes' ends.
    let mut v1 = VitalsProc::new(&["process", "rollup_day"], env.child_env(&data));
    v1.start();
    let rows = wait_for_every(
        "v1's committed offsets to reach every partition's end",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let cfg = env.cfg.clone();
            async move {
                let rows = vitals::offsets::show(&cfg, Some("rollup_day")).await.ok()?;
                rows.iter().all(|r| r.committed.unwrap_or(0) == r.high && r.lag == 0).then_some(rows)
            }
        },
    )
    .await;
    assert!(rows.iter().any(|r| r.committed.is_some_and(|c| c > 0)), "v1 committed something: {rows:?}");
    let file = data.with_extension("offsets.json");
    std::fs::write(&file, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    // v1's table holds the first users (what a partial version is then behind of).
    let mut sink = VitalsProc::new(&["sink"], env.child_env(&data));
    sink.start();
    let pool = sqlx::PgPool::connect(&env.db_url).await.unwrap();
    let first_rows = oracle(&env).await;
    wait_for_every("v1's table to equal the oracle of the first users", Duration::from_secs(120), Duration::from_millis(300), || async {
        (table_rows(&pool, "proj_rollup_day").await == first_rows).then_some(())
    })
    .await;
    v1.terminate(Duration::from_secs(30));

    // A moment strictly after every record of the first users (broker timestamps are the
    // edge's produce time, in milliseconds), then the second users.
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(5);
    wait_for("the clock to pass the replay's start time", Duration::from_secs(5), || async { (chrono::Utc::now() > at).then_some(()) })
        .await;
    let after = env.sim("rfb", 32, 2, 2);
    assert_eq!(simulate::run(&after, &env.http).await.unwrap().rejected, 0);

    // Refused before anything starts: an offset past a partition's end.
    let mut bad: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    bad[0]["committed"] = serde_json::json!(1_000_000);
    let bad_file = data.with_extension("bad.json");
    std::fs::write(&bad_file, serde_json::to_string(&bad).unwrap()).unwrap();
    let run = |v: &str, from: &str| vitals::replay::ReplayArgs {
        processor: "rollup_day".into(),
        version: v.into(),
        from: Some(from.parse().unwrap()),
        until_caught_up: true,
        display: vitals::replay::Display::Plain,
        every: Duration::from_millis(300),
        crash_after_produce: None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let e = vitals::replay::replay(&env.cfg, run("v4", bad_file.to_str().unwrap()), Arc::clone(&stop)).await.unwrap_err();
    assert!(format!("{e:#}").contains("offset 1000000 is past the partition's end"), "{e:#}");

    // Two replays at once, from the time and from the file.
    let t = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    // As the replay reads it back (milliseconds).
    let at: chrono::DateTime<chrono::Utc> = t.parse().unwrap();
    let common = ["--until-caught-up", "--progress", "plain", "--every", "0.3"];
    let out = data.with_extension("replays.out");
    let mut by_time = VitalsProc::new(&[&["replay", "rollup_day", "--as", "v2", "--from", &t][..], &common].concat(), env.child_env(&data));
    let mut by_file = VitalsProc::new(
        &[&["replay", "rollup_day", "--as", "v3", "--from", file.to_str().unwrap()][..], &common].concat(),
        env.child_env(&data),
    );
    by_time.stdout = Some(out.clone());
    by_file.stdout = Some(out.clone());
    by_time.start();
    by_file.start();
    assert!(by_time.wait_exit("the replay from a time to catch up", Duration::from_secs(180)).await.success());
    assert!(by_file.wait_exit("the replay from an offsets file to catch up", Duration::from_secs(180)).await.success());

    let all = oracle(&env).await;
    let second: Vec<String> = (0..2).map(|i| simulate::user_id(&after, i)).collect();
    let first: Vec<String> = (0..2).map(|i| simulate::user_id(&before, i)).collect();
    assert!(first.iter().chain(&second).all(|u| all.contains_key(u)), "every user has rollups");
    let want: Rows = all.into_iter().filter(|(u, _)| second.contains(u)).collect();
    let text = std::fs::read_to_string(&out).unwrap();
    for table in ["proj_rollup_day__v2", "proj_rollup_day__v3"] {
        let got = table_rows(&pool, table).await;
        assert_eq!(got, want, "{table} holds exactly the users uploaded after the start point\n{text}");
    }
    assert!(text.contains(&format!("replaying rollup_day as v2 from {}", at.to_rfc3339())), "{text}");
    assert!(text.contains("replaying rollup_day as v3 from the offsets in"), "{text}");

    // A partial version is behind v1 for the first users: not promoted unforced.
    let e = vitals::replay::promote(&env.cfg, "rollup_day", "v2", false).await.unwrap_err();
    assert!(format!("{e:#}").contains("v2 is behind v1"), "{e:#}");
    // v2 resumes from its checkpoints, not from somewhere else.
    let e = vitals::replay::replay(&env.cfg, run("v2", "earliest"), stop).await.unwrap_err();
    assert!(
        format!("{e:#}")
            .contains(&format!("rollup_day v2 was started from {} and resumes from its checkpoints, not from earliest", at.to_rfc3339())),
        "{e:#}"
    );
    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
