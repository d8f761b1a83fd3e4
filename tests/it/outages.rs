//! Infrastructure outages while uploads flow (issue 9, "Done means"): the processors' PostgreSQL
//! crashed and restarted (epochs and snapshot pointers live there), the snapshot store (S3) down,
//! and the sink's Redis (realtime publish) killed. Each time the outputs must afterwards equal
//! the oracle — nothing lost, nothing doubled — and nothing may be dead-lettered for an
//! infrastructure error.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vitals::simulate;
use vitals_processors::rollup_day;
use vitals_schemas::topics::PROGRESS_HEADER;
use vitals_schemas::{ProductImpact, RollupDay, SessionImpact, SleepNight};

use crate::harness::{free_port, header, key, wait_for_every, with, OwnPostgres, OwnRedis, TestEnv, VitalsProc};
use crate::pipeline::{expected, expected_products, fold};

/// Records in the four output topics (rows and progress markers).
async fn out_records(env: &TestEnv) -> usize {
    let t = env.topics();
    let mut n = 0;
    for topic in [&t.rollup_day, &t.sleep_night, &t.session_impact, &t.product_impact] {
        n += env.read(topic).await.len();
    }
    n
}

/// Waits until every processor's folded output equals its oracle.
async fn outputs_equal_the_oracle(env: &TestEnv, what: &str) {
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let want = expected(env, &codec).await;
    assert!(
        want.rollup.len() > 20 && !want.sleep.is_empty() && !want.session.is_empty(),
        "a realistic workload: {} rollups",
        want.rollup.len()
    );
    wait_for_every(what, Duration::from_secs(120), Duration::from_millis(500), || {
        let (env, codec, want, t) = (env, &codec, &want, &t);
        async move {
            let (rollup, _) = fold::<RollupDay>(env, codec, &t.rollup_day).await;
            let (sleep, _) = fold::<SleepNight>(env, codec, &t.sleep_night).await;
            let (session, _) = fold::<SessionImpact>(env, codec, &t.session_impact).await;
            let (product, _) = fold::<ProductImpact>(env, codec, &t.product_impact).await;
            let ok = rollup == want.rollup
                && sleep == want.sleep
                && session == want.session
                && !product.is_empty()
                && product == expected_products(env, codec).await;
            ok.then_some(())
        }
    })
    .await;
}

/// Waits until every key of `want` has a rollup_day output of an epoch above its partition's
/// epoch in `before`: the replay after the state was lost has re-emitted it.
async fn replayed_under_new_epochs<V>(env: &TestEnv, want: &BTreeMap<String, V>, before: &BTreeMap<i32, i64>) {
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    wait_for_every(
        "the replay to re-emit every rollup key under its new epoch",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let (codec, t) = (&codec, &t);
            async move {
                let mut newest: BTreeMap<String, i64> = BTreeMap::new();
                for m in env.read(&t.rollup_day).await {
                    if header(&m, PROGRESS_HEADER).is_some() {
                        continue;
                    }
                    let r: RollupDay = codec.decode(m.payload().unwrap()).await.unwrap();
                    if r.version_epoch > before.get(&m.partition()).copied().unwrap_or(0) {
                        newest.insert(key(&m), r.version_epoch);
                    }
                }
                want.keys().all(|k| newest.contains_key(k)).then_some(())
            }
        },
    )
    .await;
}

async fn metric(http: &reqwest::Client, url: &str, name: &str, processor: &str) -> Option<u64> {
    gauge(http, url, name, processor).await.map(|v| v as u64)
}

async fn gauge(http: &reqwest::Client, url: &str, name: &str, processor: &str) -> Option<f64> {
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    let prefix = format!("{name}{{processor=\"{processor}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

/// Users whose uploads are all acknowledged, with the oracle's rollup rows of each (stripped).
async fn final_rows(env: &TestEnv, users: &[String]) -> Vec<(String, String, BTreeMap<String, RollupDay>)> {
    let codec = vitals::app::codec(&env.cfg);
    let all = rollup_day::oracle(&crate::process::inputs(env, &codec).await);
    users
        .iter()
        .map(|u| {
            let rows: BTreeMap<String, RollupDay> = all
                .iter()
                .filter(|(_, r)| &r.user_id == u)
                .map(|(k, r)| {
                    let mut r = r.clone();
                    crate::pipeline::Out::strip(&mut r);
                    (k.clone(), r)
                })
                .collect();
            assert!(!rows.is_empty(), "{u} has rollups");
            (u.clone(), env.token(u), rows)
        })
        .collect()
}

/// One read of a user's rollups (one page) and its freshness state.
async fn read_rollups(http: &reqwest::Client, base: &str, token: &str) -> Option<(String, BTreeMap<String, RollupDay>)> {
    let body: serde_json::Value =
        http.get(format!("{base}/v1/rollups?limit=1000")).bearer_auth(token).send().await.ok()?.json().await.ok()?;
    assert!(body["next_cursor"].is_null(), "one page holds every row: {body}");
    let rows = body["data"]
        .as_array()?
        .iter()
        .map(|v| {
            let mut r: RollupDay = serde_json::from_value(v.clone()).unwrap();
            crate::pipeline::Out::strip(&mut r);
            (rollup_day::output_key(&r.user_id, &r.metric, r.local_date.parse().unwrap()), r)
        })
        .collect();
    Some((body["freshness"]["state"].as_str()?.to_owned(), rows))
}

/// Reads `users`' rollups over and over until `stop` (and until each was read fresh with the
/// oracle's rows): a read that says `fresh` with other rows is an error. Returns (reads, reads
/// that were not fresh).
fn watch_reads(
    env: &TestEnv,
    base: &str,
    users: Vec<(String, String, BTreeMap<String, RollupDay>)>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<(usize, usize), String>> {
    let (http, base) = (env.http.clone(), base.to_owned());
    tokio::spawn(async move {
        let (mut reads, mut not_fresh) = (0usize, 0usize);
        let mut seen_right = vec![false; users.len()];
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        loop {
            for (i, (user, token, want)) in users.iter().enumerate() {
                let Some((state, rows)) = read_rollups(&http, &base, token).await else { continue };
                reads += 1;
                if state == "fresh" {
                    if rows != *want {
                        let wrong = want.keys().find(|k| rows.get(*k) != want.get(*k)).cloned();
                        return Err(format!(
                            "read {reads}: {user} served as fresh with rows that are not the oracle's ({} rows vs {}, e.g. {wrong:?})",
                            rows.len(),
                            want.len()
                        ));
                    }
                    seen_right[i] = true;
                } else {
                    not_fresh += 1;
                }
            }
            if stop.load(Ordering::Relaxed) && seen_right.iter().all(|x| *x) {
                return Ok((reads, not_fresh));
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("not every watched user was read fresh with the oracle's rows within 180 s ({reads} reads)"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// The processors (`process --all`) keep their epochs and snapshot pointers in a PostgreSQL of
/// their own here, which is crashed while uploads go on (the edge, on the shared PostgreSQL,
/// keeps acknowledging them) and brought back.
///
/// What happens today: a running task needs PostgreSQL only to publish snapshot pointers (those
/// fail and are counted; processing goes on), so the outage alone changes nothing. A rebalance
/// during the outage (here: another member joins a processor's group) makes the takeover fail to
/// bump the epoch; the process exits non-zero. That is accepted: nothing of a failed takeover was
/// committed, a supervisor restarts the process, and the restarted one waits for PostgreSQL at
/// startup (`pg_ready`) instead of crash-looping. The test restarts it like a supervisor and
/// still requires the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_the_processors_loses_and_doubles_nothing() {
    let env = TestEnv::start().await;
    let pg = OwnPostgres::start().await;
    let (proc_db, proc_pool) = pg.database("processors").await;
    let t = env.topics();
    let data = std::env::temp_dir().join(format!("vitals-outage-pg-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let mut vars = with(env.child_env(&data), "VITALS_POSTGRES__URL", &proc_db);
    // Snapshots often: their pointers go to this PostgreSQL too.
    vars = with(vars, "VITALS_PROCESSORS__SNAPSHOT_EVERY_MS", "300");
    vars = with(vars, "VITALS_PROCESSORS__METRICS_LISTEN", &format!("127.0.0.1:{port}"));
    vars = with(vars, "RUST_LOG", &std::env::var("VITALS_TEST_CHILD_LOG").unwrap_or_else(|_| "warn".into()));
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let mut p = VitalsProc::new(&["process", "--all"], vars);
    // The sink and the read API use the shared PostgreSQL, like the edge.
    let mut sink = VitalsProc::new(&["sink"], env.child_env(&data.join("sink")));
    let base = env.serve_api().await;
    assert_eq!(simulate::run(&env.sim("a", 31, 2, 2), &env.http).await.unwrap().rejected, 0);
    p.start();
    sink.start();
    wait_for_every("a first snapshot pointer", Duration::from_secs(60), Duration::from_millis(200), || {
        let pool = &proc_pool;
        async move { (sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processor_snapshots").fetch_one(pool).await.ok()? > 0).then_some(()) }
    })
    .await;
    // Every processor has taken every task (its epochs bumped): the outage below is meant to hit
    // running tasks. A processor still starting would meet its first takeover without PostgreSQL,
    // which is the rebalance case further down (the process exits), not this one.
    let tasks = (vitals_runtime::registry().len() * env.cfg.kafka.partitions as usize) as i64;
    wait_for_every("every processor to take all its tasks", Duration::from_secs(60), Duration::from_millis(200), || {
        let pool = &proc_pool;
        async move { (sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processor_epochs").fetch_one(pool).await.ok()? >= tasks).then_some(()) }
    })
    .await;

    // PostgreSQL crashes; uploads go on and the running tasks go on processing them.
    let t0 = std::time::Instant::now();
    proc_pool.close().await;
    pg.crash();
    let before = out_records(&env).await;
    let wave_b = env.sim("b", 32, 2, 2);
    assert_eq!(simulate::run(&wave_b, &env.http).await.unwrap().rejected, 0);
    // From now on B's users upload nothing more: a read of theirs that says `fresh` must hold
    // exactly the oracle's rows, through the rest of the outage and the recovery.
    let stop = Arc::new(AtomicBool::new(false));
    let users: Vec<String> = (0..wave_b.users).map(|i| simulate::user_id(&wave_b, i)).collect();
    let watcher = watch_reads(&env, &base, final_rows(&env, &users).await, Arc::clone(&stop));
    wait_for_every(
        "the processors to go on emitting with their PostgreSQL down",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || {
            let env = &env;
            async move { (out_records(env).await > before).then_some(()) }
        },
    )
    .await;
    wait_for_every("failed snapshot publishes to be counted", Duration::from_secs(30), Duration::from_millis(200), || {
        let (http, url) = (&env.http, &metrics);
        async move { (metric(http, url, "vitals_processor_snapshot_failures_total", "rollup_day").await? > 0).then_some(()) }
    })
    .await;
    assert!(p.exited().is_none(), "the processors survive their PostgreSQL being down: {:?}", p.exited());

    // A rebalance during the outage: a member joins rollup_day's group. The takeover cannot bump
    // the epoch; the process exits (non-zero) and a supervisor restarts it.
    eprintln!("{:?} into the outage: the processors went on without PostgreSQL", t0.elapsed());
    let group = format!("{}vitals-proc-rollup_day", env.cfg.kafka.topic_prefix);
    let joiner: BaseConsumer =
        vitals_runtime::consumer_config(vitals::app::kafka_base(&env.cfg, "vitals-test-joiner"), &group).create().unwrap();
    joiner.subscribe(&[t.hot.as_str(), t.cold.as_str(), t.change.as_str(), t.domain.as_str()]).unwrap();
    let status = wait_for_every(
        "the processors to give up the takeover without PostgreSQL",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let _ = joiner.poll(Duration::from_millis(50));
            let s = p.exited();
            async move { s }
        },
    )
    .await;
    assert!(!status.success(), "a failed takeover exits non-zero for the supervisor: {status:?}");
    eprintln!("{:?} into the outage: the processors exited ({status}) on a takeover without PostgreSQL", t0.elapsed());
    drop(joiner);
    // The supervisor restarts it while PostgreSQL is still down: it waits for it.
    p.kill9(); // reaps the exited child
    p.start();
    let more = simulate::run(&env.sim("c", 33, 1, 2), &env.http).await.unwrap();
    assert_eq!(more.rejected, 0);
    assert!(p.exited().is_none(), "the restarted processors wait for PostgreSQL: {:?}", p.exited());

    pg.up().await;
    eprintln!("{:?}: PostgreSQL is back", t0.elapsed());
    outputs_equal_the_oracle(&env, "every output to equal its oracle after PostgreSQL came back").await;
    eprintln!("{:?}: the outputs equal the oracle", t0.elapsed());
    stop.store(true, Ordering::Relaxed);
    let (reads, not_fresh) = watcher.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{reads} reads of B's users during the outage and recovery, {not_fresh} not fresh, none fresh with other rows");
    assert!(env.read(&t.dead_letter).await.is_empty(), "nothing dead-lettered for a PostgreSQL outage");
    assert!(p.exited().is_none(), "still running: {:?}", p.exited());
    assert!(sink.exited().is_none(), "{:?}", sink.exited());
    p.kill9();
    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// Snapshots go to an S3 endpoint nobody listens on. Processing goes on (the output equals the
/// oracle while uploads flow), the failures are counted on `/metrics`, no pointer is published;
/// and a restart with no local state (and so no snapshot to restore) replays from the beginning:
/// it re-emits every key under its new epoch and still equals the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_down_under_snapshots_costs_only_the_snapshots() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let data = std::env::temp_dir().join(format!("vitals-outage-s3-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let mut vars = with(env.child_env(&data), "VITALS_S3__ENDPOINT", &format!("http://127.0.0.1:{}", free_port()));
    vars = with(vars, "VITALS_PROCESSORS__SNAPSHOT_EVERY_MS", "200");
    vars = with(vars, "VITALS_PROCESSORS__METRICS_LISTEN", &format!("127.0.0.1:{port}"));
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let mut p = VitalsProc::new(&["process", "--all"], vars);
    let mut sink = VitalsProc::new(&["sink"], env.child_env(&data.join("sink")));
    let base = env.serve_api().await;
    let (wave_a, wave_b) = (env.sim("a", 41, 2, 2), env.sim("b", 42, 2, 2));
    assert_eq!(simulate::run(&wave_a, &env.http).await.unwrap().rejected, 0);
    p.start();
    sink.start();
    let wave = {
        let (cfg, http) = (wave_b.clone(), env.http.clone());
        tokio::spawn(async move { simulate::run(&cfg, &http).await })
    };
    let failures = wait_for_every("snapshot failures on /metrics", Duration::from_secs(60), Duration::from_millis(200), || {
        let (http, url) = (&env.http, &metrics);
        async move { metric(http, url, "vitals_processor_snapshot_failures_total", "rollup_day").await.filter(|n| *n > 0) }
    })
    .await;
    // Every snapshot fails while the checkpoints move: the snapshot age (what a takeover would
    // redo) grows from the tasks' start, where an alert can see it.
    wait_for_every("the snapshot age to grow past 3 s", Duration::from_secs(60), Duration::from_millis(200), || {
        let (http, url) = (&env.http, &metrics);
        async move { gauge(http, url, "vitals_processor_snapshot_age_seconds", "rollup_day").await.filter(|a| *a >= 3.0) }
    })
    .await;
    assert_eq!(wave.await.unwrap().unwrap().rejected, 0);
    outputs_equal_the_oracle(&env, "every output to equal its oracle with S3 down").await;
    let later = metric(&env.http, &metrics, "vitals_processor_snapshot_failures_total", "rollup_day").await.unwrap();
    assert!(later >= failures, "{later} < {failures}");
    assert_eq!(metric(&env.http, &metrics, "vitals_processor_snapshots_total", "rollup_day").await, Some(0));
    let pointers: i64 = sqlx::query_scalar("SELECT count(*) FROM processor_snapshots").fetch_one(&env.pool).await.unwrap();
    assert_eq!(pointers, 0, "no pointer without an uploaded snapshot");
    assert!(p.exited().is_none(), "{:?}", p.exited());
    // Every upload is in: through the replay below, a read that says `fresh` must hold exactly
    // the oracle's rows.
    let users: Vec<String> = [&wave_a, &wave_b].iter().flat_map(|w| (0..w.users).map(|i| simulate::user_id(w, i))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_reads(&env, &base, final_rows(&env, &users).await, Arc::clone(&stop));

    // The instance loses its disk and comes back, S3 still down: no snapshot to restore, so it
    // replays every partition from the beginning.
    p.kill9();
    std::fs::remove_dir_all(&data).unwrap();
    let epochs_before: BTreeMap<i32, i64> =
        sqlx::query_as::<_, (i32, i64)>("SELECT partition, epoch FROM processor_epochs WHERE processor LIKE '%rollup_day'")
            .fetch_all(&env.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    p.start();
    let want = expected(&env, &codec).await.rollup;
    replayed_under_new_epochs(&env, &want, &epochs_before).await;
    outputs_equal_the_oracle(&env, "every output to equal its oracle after the replay").await;
    let restores: i64 = sqlx::query_scalar("SELECT count(*) FROM processor_restores").fetch_one(&env.pool).await.unwrap();
    assert_eq!(restores, 0, "nothing to restore from");
    assert_eq!(
        metric(&env.http, &metrics, "vitals_processor_snapshot_restore_failures_total", "rollup_day").await,
        Some(0),
        "no pointer: no restore attempted"
    );
    stop.store(true, Ordering::Relaxed);
    let (reads, not_fresh) = watcher.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{reads} reads through the replay, {not_fresh} not fresh, none fresh with other rows");
    assert!(env.read(&t.dead_letter).await.is_empty(), "nothing dead-lettered for an S3 outage");
    assert!(p.exited().is_none(), "{:?}", p.exited());
    p.kill9();
    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// A Redis subscriber to every user's channel (RESP over TCP), collecting what it receives.
struct Subscriber {
    stream: tokio::net::TcpStream,
    got: Vec<u8>,
}

impl Subscriber {
    async fn connect(redis: &OwnRedis) -> Subscriber {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", redis.port)).await.expect("connecting to Redis");
        stream.write_all(b"PSUBSCRIBE vitals:user:*\r\n").await.unwrap();
        let mut s = Subscriber { stream, got: Vec::new() };
        s.until("the subscription to be confirmed", Duration::from_secs(10), |g| g.windows(10).any(|w| w == b"psubscribe")).await;
        s.got.clear();
        s
    }

    /// Reads until `done` holds for everything received, or `timeout`; whether it did.
    async fn read_for(&mut self, timeout: Duration, done: impl Fn(&[u8]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 8192];
        while !done(&self.got) {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) => panic!("Redis closed the subscription"),
                Ok(Ok(n)) => self.got.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!("reading the subscription: {e}"),
                Err(_) => return false,
            }
        }
        true
    }

    async fn until(&mut self, what: &str, timeout: Duration, done: impl Fn(&[u8]) -> bool) {
        assert!(self.read_for(timeout, done).await, "timed out after {timeout:?} waiting for {what}");
    }
}

fn has_envelope_of(got: &[u8], user: &str) -> bool {
    let text = String::from_utf8_lossy(got);
    text.contains("pmessage") && text.contains(&format!("vitals:user:{user}")) && text.contains("\"event_type\"")
}

/// The sink's Redis is killed while uploads flow: every row is still committed (the four
/// projection tables equal the oracle), nothing is dead-lettered, the sink keeps running; once
/// Redis is back, new changes are published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_under_the_sink_costs_only_realtime() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let mut redis = OwnRedis::start().await;
    let data = std::env::temp_dir().join(format!("vitals-outage-redis-{}", uuid::Uuid::new_v4().simple()));
    let mut processors = VitalsProc::new(&["process", "--all"], env.child_env(&data));
    let sink_port = free_port();
    let sink_env = with(env.child_env(&data), "VITALS_REDIS__URL", &redis.url());
    let mut sink = VitalsProc::new(&["sink"], with(sink_env, "VITALS_SINK__METRICS_LISTEN", &format!("127.0.0.1:{sink_port}")));
    let sink_metrics = format!("http://127.0.0.1:{sink_port}/metrics");
    let counter = |name: &'static str| {
        let (http, url) = (env.http.clone(), sink_metrics.clone());
        async move {
            let text = http.get(&url).send().await.ok()?.text().await.ok()?;
            text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse::<u64>().ok())
        }
    };
    let mut sub = Subscriber::connect(&redis).await;
    let first = env.sim("a", 51, 2, 2);
    let user_a = simulate::user_id(&first, 0);
    assert_eq!(simulate::run(&first, &env.http).await.unwrap().rejected, 0);
    processors.start();
    sink.start();
    sub.until("an envelope while Redis is up", Duration::from_secs(60), |g| has_envelope_of(g, &user_a)).await;

    // Redis goes away; more people upload.
    redis.kill();
    let second = env.sim("b", 52, 2, 2);
    let user_b = simulate::user_id(&second, 0);
    assert_eq!(simulate::run(&second, &env.http).await.unwrap().rejected, 0);
    let base = env.serve_api().await;
    let stop = Arc::new(AtomicBool::new(false));
    let users: Vec<String> = (0..second.users).map(|i| simulate::user_id(&second, i)).collect();
    let watcher = watch_reads(&env, &base, final_rows(&env, &users).await, Arc::clone(&stop));
    let want = expected(&env, &codec).await;
    assert!(
        want.rollup.len() > 20 && !want.sleep.is_empty() && !want.session.is_empty(),
        "a realistic workload: {} rollups",
        want.rollup.len()
    );
    wait_for_every(
        "every projection table to equal its oracle with Redis down",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let (pool, want, env, codec): (&PgPool, _, _, _) = (&env.pool, &want, &env, &codec);
            async move {
                let rollup: BTreeMap<String, RollupDay> = crate::sink::rows(pool, "proj_rollup_day").await;
                let sleep: BTreeMap<String, SleepNight> = crate::sink::rows(pool, "proj_sleep_night").await;
                let session: BTreeMap<String, SessionImpact> = crate::sink::rows(pool, "proj_session_impact").await;
                let product: BTreeMap<String, ProductImpact> = crate::sink::rows(pool, "proj_product_impact").await;
                let ok = rollup == want.rollup
                    && sleep == want.sleep
                    && session == want.session
                    && !product.is_empty()
                    && product == expected_products(env, codec).await;
                ok.then_some(())
            }
        },
    )
    .await;
    assert!(env.read(&t.dead_letter).await.is_empty(), "nothing dead-lettered for a Redis outage");
    // What was not published is counted on the sink's /metrics (the alert's and the SRE's view).
    assert!(counter("vitals_realtime_envelopes_published_total").await.is_some_and(|n| n > 0), "envelopes before the outage");
    assert!(counter("vitals_realtime_envelopes_dropped_total").await.is_some_and(|n| n > 0), "envelopes dropped with Redis down");
    assert!(sink.exited().is_none(), "the sink keeps running without Redis: {:?}", sink.exited());
    assert!(processors.exited().is_none(), "{:?}", processors.exited());
    stop.store(true, Ordering::Relaxed);
    let (reads, not_fresh) = watcher.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{reads} reads of B's users with Redis down, {not_fresh} not fresh, none fresh with other rows");

    // Redis is back: the next changes are published again. The publisher reconnects with
    // backoff, so keep uploading (new samples of user B) until an envelope of B's arrives.
    redis.restart().await;
    let mut sub = Subscriber::connect(&redis).await;
    let now = chrono::Utc::now();
    let mut n = 0;
    loop {
        n += 1;
        let body = serde_json::json!({"request_id": format!("after-redis-{n}"), "samples": [{"source": "watch", "source_kind": "watch", "source_record_id": format!("after-redis-{n}"),
            "metric": "heart_rate", "start": (now - chrono::Duration::minutes(2)).to_rfc3339(), "end": (now - chrono::Duration::minutes(1)).to_rfc3339(),
            "value": 60 + n, "unit": "count/min", "time_zone": "UTC"}]});
        let (s, _, out) = env.post(crate::ingest::SAMPLES, &user_b, &body).await;
        assert_eq!(s, 200, "{out}");
        if sub.read_for(Duration::from_secs(2), |g| has_envelope_of(g, &user_b)).await {
            break;
        }
        assert!(n < 30, "no envelope within 30 uploads ({n} s) after Redis came back");
    }
    assert!(env.read(&t.dead_letter).await.is_empty());
    processors.kill9();
    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// A TCP proxy in front of the shared S3 store that can be switched off: then it drops every
/// connection it holds and every new one (the store is unreachable without stopping the shared one).
struct S3Switch {
    up: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    url: String,
}

impl S3Switch {
    async fn start() -> S3Switch {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (up, conns) = (Arc::new(AtomicBool::new(true)), Arc::new(std::sync::Mutex::new(Vec::new())));
        let (u, c) = (Arc::clone(&up), Arc::clone(&conns));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !u.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed
                }
                c.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:19000").await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        S3Switch { up, conns, url }
    }
    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

/// Snapshots are published, then S3 goes down while uploads go on: processing is unaffected and
/// the failures are counted. The instance then loses its disk: the published snapshot cannot be
/// downloaded, so the restore fails (counted), the pointer is withdrawn and the task replays from
/// the beginning — every key re-emitted under the new epoch, the output still the oracle's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_down_at_restore_falls_back_to_a_full_replay() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let s3 = S3Switch::start().await;
    let data = std::env::temp_dir().join(format!("vitals-outage-s3r-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let mut vars = with(crate::process::proc_env(&env, &data), "VITALS_S3__ENDPOINT", &s3.url);
    vars = with(vars, "VITALS_PROCESSORS__SNAPSHOT_EVERY_MS", "200");
    vars = with(vars, "VITALS_PROCESSORS__METRICS_LISTEN", &format!("127.0.0.1:{port}"));
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let mut p = VitalsProc::new(&["process", "rollup_day"], vars);
    let pointers =
        || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processor_snapshots").fetch_one(&env.pool).await.unwrap() };
    assert_eq!(simulate::run(&env.sim("a", 61, 3, 2), &env.http).await.unwrap().rejected, 0);
    p.start();
    wait_for_every("a published snapshot", Duration::from_secs(60), Duration::from_millis(200), || async {
        (pointers().await > 0).then_some(())
    })
    .await;

    s3.down();
    let failed_before = metric(&env.http, &metrics, "vitals_processor_snapshot_failures_total", "rollup_day").await.unwrap();
    assert_eq!(simulate::run(&env.sim("b", 62, 2, 2), &env.http).await.unwrap().rejected, 0);
    let want = rollup_day::oracle(&crate::process::inputs(&env, &codec).await);
    assert!(want.len() > 20, "a realistic workload: {} rollups", want.len());
    wait_for_every("the output to equal the oracle with S3 down", Duration::from_secs(90), Duration::from_millis(300), || {
        let (env, codec, want) = (&env, &codec, &want);
        async move { (crate::process::fold(env, codec).await.0 == *want).then_some(()) }
    })
    .await;
    wait_for_every("snapshot failures on /metrics", Duration::from_secs(30), Duration::from_millis(200), || {
        let (http, url) = (&env.http, &metrics);
        async move { (metric(http, url, "vitals_processor_snapshot_failures_total", "rollup_day").await? > failed_before).then_some(()) }
    })
    .await;

    p.kill9();
    std::fs::remove_dir_all(&data).unwrap();
    let epochs_before: BTreeMap<i32, i64> = sqlx::query_as::<_, (i32, i64)>("SELECT partition, epoch FROM processor_epochs")
        .fetch_all(&env.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    p.start();
    replayed_under_new_epochs(&env, &want, &epochs_before).await;
    wait_for_every("the output to equal the oracle after the full replay", Duration::from_secs(90), Duration::from_millis(300), || {
        let (env, codec, want) = (&env, &codec, &want);
        async move { (crate::process::fold(env, codec).await.0 == *want).then_some(()) }
    })
    .await;
    let restore_failures = metric(&env.http, &metrics, "vitals_processor_snapshot_restore_failures_total", "rollup_day").await.unwrap();
    assert!(restore_failures > 0, "the restores from an unreachable S3 are counted");
    let restores: i64 = sqlx::query_scalar("SELECT count(*) FROM processor_restores").fetch_one(&env.pool).await.unwrap();
    assert_eq!(restores, 0, "nothing was restored");
    assert_eq!(pointers().await, 0, "the pointers nobody started from are withdrawn");
    assert!(env.read(&t.dead_letter).await.is_empty(), "nothing dead-lettered for an S3 outage");
    assert!(p.exited().is_none(), "{:?}", p.exited());
    p.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
