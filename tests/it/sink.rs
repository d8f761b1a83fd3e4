//! The PostgreSQL projection sink against the real broker and a real PostgreSQL: `vitals sink`
//! runs as its own OS process, is `kill -9`ed mid-stream and restarted, and its PostgreSQL is
//! crashed and restarted under it while uploads go on; the projection table must then equal the
//! oracle computed from the inputs — every row right, none missing, none extra.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::PgPool;
use vitals::simulate::{self, SimConfig};
use vitals_processors::rollup_day;
use vitals_schemas::{ProductImpact, RollupDay, SessionImpact, SleepNight};

use crate::harness::{wait_for_every, OwnPostgres, TestEnv, VitalsProc};
use crate::pipeline::{expected, expected_products, Out};

/// The live rows of a projection table, keyed like the processor's output, without version fields.
pub(crate) async fn rows<T: Out + Send + Unpin + 'static>(pool: &PgPool, table: &str) -> BTreeMap<String, T> {
    let rows: Vec<(String, String, sqlx::types::Json<T>)> =
        sqlx::query_as(&format!("SELECT user_id, entity_id, body FROM {table} WHERE NOT deleted")).fetch_all(pool).await.unwrap();
    rows.into_iter()
        .map(|(u, e, b)| {
            let mut r = b.0;
            r.strip();
            (format!("{u}|{e}"), r)
        })
        .collect()
}

/// How far the sink has committed (sum of its next offsets); errors (PostgreSQL down) read as 0.
async fn committed(pool: &PgPool) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets").fetch_one(pool).await.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_killed_and_its_postgres_crashed_still_equals_the_oracle() {
    let env = TestEnv::start().await;
    let pg = OwnPostgres::start().await;
    let (sink_db, sink_pool) = pg.database("sink").await;
    let codec = vitals::app::codec(&env.cfg);
    let data = std::env::temp_dir().join(format!("vitals-sink-{}", uuid::Uuid::new_v4().simple()));
    let sim = |prefix: &str, seed: u64, users: usize, days: u32| env.sim(prefix, seed, users, days);

    let mut processor = VitalsProc::new(&["process", "--all"], env.child_env(&data));
    processor.start();
    let mut sink_env = env.child_env(&data);
    sink_env.retain(|(k, _)| k != "VITALS_POSTGRES__URL" && k != "VITALS_PROCESSORS__MAX_BATCH");
    sink_env.push(("VITALS_POSTGRES__URL".into(), sink_db.clone()));
    // Small batches: many transactions to die between.
    sink_env.push(("VITALS_PROCESSORS__MAX_BATCH".into(), "20".into()));
    let sink_port = crate::harness::free_port();
    sink_env.push(("VITALS_SINK__METRICS_LISTEN".into(), format!("127.0.0.1:{sink_port}")));
    let readyz = format!("http://127.0.0.1:{sink_port}/readyz");
    let ready = |want: u16, needle: &'static str| {
        let (http, url) = (env.http.clone(), readyz.clone());
        async move {
            let r = http.get(&url).send().await.ok()?;
            let code = r.status().as_u16();
            let body = r.text().await.ok()?;
            (code == want && body.contains(needle)).then_some(body)
        }
    };
    let mut sink = VitalsProc::new(&["sink"], sink_env);
    assert_eq!(simulate::run(&sim("a", 1, 3, 3), &env.http).await.unwrap().rejected, 0);
    sink.start();

    // kill -9 the sink as soon as it has committed more, while more people upload.
    for round in 0..3u64 {
        let before = committed(&sink_pool).await;
        let wave = {
            let cfg = SimConfig { ..sim(&format!("w{round}"), 10 + round, 1, 2) };
            let http = env.http.clone();
            tokio::spawn(async move { simulate::run(&cfg, &http).await })
        };
        wait_for_every("the sink to commit more", Duration::from_secs(60), Duration::from_millis(100), || {
            let pool = &sink_pool;
            async move { (committed(pool).await > before).then_some(()) }
        })
        .await;
        sink.kill9();
        sink.start();
        assert_eq!(wave.await.unwrap().unwrap().rejected, 0);
    }

    // Crash its PostgreSQL while it runs and uploads go on; the sink must wait, not die or skip.
    let before = committed(&sink_pool).await;
    sink_pool.close().await;
    pg.crash();
    assert_eq!(simulate::run(&sim("c", 20, 2, 2), &env.http).await.unwrap().rejected, 0);
    assert!(sink.exited().is_none(), "the sink must survive its database being down: {:?}", sink.exited());
    // Its /readyz says what it waits for.
    wait_for_every("the sink's /readyz to say it waits for PostgreSQL", Duration::from_secs(60), Duration::from_millis(200), || ready(503, "PostgreSQL")).await;
    pg.up().await;
    let sink_pool = PgPool::connect(&sink_db).await.unwrap();

    let want = expected(&env, &codec).await;
    assert!(want.rollup.len() > 50 && !want.sleep.is_empty() && !want.session.is_empty(), "a realistic workload");
    let got = wait_for_every("every projection table to equal its oracle", Duration::from_secs(120), Duration::from_millis(500), || {
        let (pool, want, env, codec) = (&sink_pool, &want, &env, &codec);
        async move {
            let rollup: BTreeMap<String, RollupDay> = rows(pool, "proj_rollup_day").await;
            let sleep: BTreeMap<String, SleepNight> = rows(pool, "proj_sleep_night").await;
            let session: BTreeMap<String, SessionImpact> = rows(pool, "proj_session_impact").await;
            let product: BTreeMap<String, ProductImpact> = rows(pool, "proj_product_impact").await;
            let ok = rollup == want.rollup && sleep == want.sleep && session == want.session && !product.is_empty() && product == expected_products(env, codec).await;
            ok.then_some(rollup)
        }
    })
    .await;
    assert_eq!(got.len(), want.rollup.len());
    assert!(committed(&sink_pool).await > before, "the sink committed after PostgreSQL came back");
    wait_for_every("the sink's /readyz to say ready again", Duration::from_secs(30), Duration::from_millis(200), || ready(200, "ready")).await;
    assert!(sink.exited().is_none(), "the sink is still running");

    // Every stored version is the newest the topic holds for that key: nothing older won.
    let versions: Vec<(String, String, i64, i64)> =
        sqlx::query_as("SELECT user_id, entity_id, version_epoch, version_seq FROM proj_rollup_day").fetch_all(&sink_pool).await.unwrap();
    let mut newest: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for m in env.read(&env.topics().rollup_day).await {
        use rdkafka::Message;
        if crate::harness::header(&m, vitals_schemas::topics::PROGRESS_HEADER).is_some() {
            continue; // progress markers are not rows
        }
        let r: RollupDay = codec.decode(m.payload().unwrap()).await.unwrap();
        let k = rollup_day::output_key(&r.user_id, &r.metric, r.local_date.parse().unwrap());
        let v = newest.entry(k).or_default();
        *v = (*v).max((r.version_epoch, r.version_seq));
    }
    for (u, e, ve, vs) in versions {
        assert_eq!(newest.get(&format!("{u}|{e}")), Some(&(ve, vs)), "row {u}|{e} holds the newest version");
    }
    processor.kill9();
    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
