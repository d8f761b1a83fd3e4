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
    // (Running: its loop started, not still starting after the last restart.)
    wait_for_every("the restarted sink to be ready", Duration::from_secs(60), Duration::from_millis(100), || ready(200, "ready")).await;
    let before = committed(&sink_pool).await;
    sink_pool.close().await;
    pg.crash();
    assert_eq!(simulate::run(&sim("c", 20, 2, 2), &env.http).await.unwrap().rejected, 0);
    assert!(sink.exited().is_none(), "the sink must survive its database being down: {:?}", sink.exited());
    // Its /readyz says what it waits for.
    wait_for_every("the sink's /readyz to say it waits for PostgreSQL", Duration::from_secs(60), Duration::from_millis(200), || {
        ready(503, "PostgreSQL")
    })
    .await;
    // What waits ages, and /metrics says so while the sink retries (what the freshness alert reads).
    let metrics_url = format!("http://127.0.0.1:{sink_port}/metrics");
    wait_for_every(
        "the sink's freshness age of rollup_day to pass 3 s during the outage",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let (http, url) = (&env.http, &metrics_url);
            async move {
                let text = http.get(url).send().await.ok()?.text().await.ok()?;
                let age: f64 = text
                    .lines()
                    .find(|l| l.starts_with("vitals_sink_freshness_age_seconds{") && l.contains("projection=\"rollup_day\"}"))?
                    .rsplit_once(' ')?
                    .1
                    .parse()
                    .ok()?;
                (age >= 3.0).then_some(())
            }
        },
    )
    .await;
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
            let ok = rollup == want.rollup
                && sleep == want.sleep
                && session == want.session
                && !product.is_empty()
                && product == expected_products(env, codec).await;
            ok.then_some(rollup)
        }
    })
    .await;
    assert_eq!(got.len(), want.rollup.len());
    assert!(committed(&sink_pool).await > before, "the sink committed after PostgreSQL came back");
    wait_for_every("the sink's /readyz to say ready again", Duration::from_secs(30), Duration::from_millis(200), || ready(200, "ready"))
        .await;
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

/// Kafka Connect JDBC's auto.create / auto.evolve on the typed columns of a projection table,
/// against the real PostgreSQL: every field is a typed column generated from `body`; a field
/// added to the descriptor is added and computed for existing rows; a field widened (int →
/// long) is regenerated with its values; a breaking change is refused naming the column, and
/// the sink's start-up says so at once instead of retrying it as an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_table_gets_typed_columns_evolves_additively_and_refuses_a_breaking_change() {
    use vitals_schemas::projection::{Descriptor, Field, Projected, Projection, Type};
    use vitals_sinks::postgres::{ensure_tables, TableError};
    let env = TestEnv::start().await;
    let pool = PgPool::connect(&env.db_url).await.unwrap();
    let base = Projection::of::<RollupDay>().at("evo1");
    let table = base.table();
    let leak = |fields: Vec<Field>| -> &'static Descriptor {
        Box::leak(Box::new(Descriptor { fields: Box::leak(fields.into_boxed_slice()), ..*RollupDay::DESCRIPTOR }))
    };
    let fields = |extra: Vec<Field>| -> Vec<Field> { RollupDay::DESCRIPTOR.fields.iter().copied().chain(extra).collect() };
    let columns = |pool: PgPool, table: String| async move {
        sqlx::query_as::<_, (String, String)>("SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_name = $1 AND is_generated = 'ALWAYS' ORDER BY ordinal_position")
            .bind(table)
            .fetch_all(&pool)
            .await
            .unwrap()
    };

    // Created: one typed column per field (the metric group is the base `metric` column).
    let v1 = base.declared_as(leak(fields(vec![Field::new("score", Type::Int)])));
    ensure_tables(&pool, &[v1]).await.unwrap();
    let cols = columns(pool.clone(), table.clone()).await;
    assert_eq!(cols.len(), RollupDay::DESCRIPTOR.fields.len(), "{cols:?}");
    assert!(
        cols.contains(&("sum".into(), "double precision".into()))
            && cols.contains(&("count".into(), "bigint".into()))
            && cols.contains(&("score".into(), "integer".into())),
        "{cols:?}"
    );
    assert!(cols.contains(&("category_minutes".into(), "jsonb".into())) && cols.contains(&("kind".into(), "text".into())), "{cols:?}");
    let body = serde_json::json!({"user_id": "u1", "metric": "steps", "local_date": "2026-11-30", "unit": "count", "kind": "CUMULATIVE", "count": 3, "sum": 1234.5,
        "min": null, "max": null, "mean": null, "time_weighted_mean": null, "last": null, "category_minutes": {"rem": 5.0}, "primary_source": null, "score": 7, "bonus": 2.5});
    sqlx::query(&format!("INSERT INTO {table} (user_id, entity_id, metric, day, version_epoch, version_seq, deleted, body, source_offsets) VALUES ('u1', 'steps|2026-11-30', 'steps', '2026-11-30', 1, 1, false, $1, '[]')"))
        .bind(&body)
        .execute(&pool)
        .await
        .unwrap();
    let (sum, score, rem): (Option<f64>, Option<i32>, Option<f64>) =
        sqlx::query_as(&format!("SELECT sum, score, (category_minutes->>'rem')::float8 FROM {table}")).fetch_one(&pool).await.unwrap();
    assert_eq!((sum, score, rem), (Some(1234.5), Some(7), Some(5.0)));

    // Added: a new field's column, computed for the row already there. Widened: int → long.
    let v2 = base.declared_as(leak(fields(vec![Field::new("score", Type::Long), Field::new("bonus", Type::Optional(&Type::Double))])));
    ensure_tables(&pool, &[v2]).await.unwrap();
    let cols = columns(pool.clone(), table.clone()).await;
    assert!(cols.contains(&("bonus".into(), "double precision".into())) && cols.contains(&("score".into(), "bigint".into())), "{cols:?}");
    let (bonus, score): (Option<f64>, Option<i64>) =
        sqlx::query_as(&format!("SELECT bonus, score FROM {table}")).fetch_one(&pool).await.unwrap();
    assert_eq!((bonus, score), (Some(2.5), Some(7)));
    // An older build (score still an int) accepts the wider column: a rollback is not refused.
    ensure_tables(&pool, &[v1]).await.unwrap();
    assert!(columns(pool.clone(), table.clone()).await.contains(&("score".into(), "bigint".into())));
    // Idempotent; a field dropped from the descriptor keeps its column.
    ensure_tables(&pool, &[base.declared_as(leak(fields(vec![Field::new("score", Type::Long)])))]).await.unwrap();
    assert!(columns(pool.clone(), table.clone()).await.iter().any(|(c, _)| c == "bonus"));

    // Breaking: a string field made a number; a column of a field's name added by hand.
    let mut broken = fields(vec![Field::new("score", Type::Long)]);
    broken.iter_mut().find(|f| f.name == "unit").unwrap().ty = Type::Long;
    let e = ensure_tables(&pool, &[base.declared_as(leak(broken.clone()))]).await.unwrap_err();
    assert!(matches!(e, TableError::Breaking(_)), "{e}");
    assert!(
        e.to_string().contains(&format!("{table}.unit: the column is text, the field `unit` is now bigint"))
            && e.to_string().contains("vitals replay rollup_day --as"),
        "{e}"
    );
    sqlx::query(&format!("ALTER TABLE {table} ADD COLUMN handmade text")).execute(&pool).await.unwrap();
    let e = ensure_tables(
        &pool,
        &[base.declared_as(leak(fields(vec![Field::new("score", Type::Long), Field::new("handmade", Type::String)])))],
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains(&format!("{table}.handmade: the column is a text column not generated from body")), "{e}");
    // A new field whose values in existing rows its type cannot take: refused at once, naming
    // the table, not retried as an outage.
    sqlx::query(&format!("UPDATE {table} SET body = body || '{{\"oops\": \"text\"}}'")).execute(&pool).await.unwrap();
    let e = ensure_tables(&pool, &[base.declared_as(leak(fields(vec![Field::new("score", Type::Long), Field::new("oops", Type::Long)])))])
        .await
        .unwrap_err();
    assert!(
        matches!(e, TableError::Breaking(_)) && e.to_string().contains(&format!("{table}: evolving the table (added oops bigint) failed")),
        "{e}"
    );
    // Nothing of a refused change was applied.
    let (unit,): (String,) = sqlx::query_as(&format!("SELECT unit FROM {table}")).fetch_one(&pool).await.unwrap();
    assert_eq!(unit, "count");

    // The sink's start-up refuses it at once rather than waiting it out as an outage.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let started = std::time::Instant::now();
    let e = vitals::app::pg_ready_with_tables(&env.cfg, &stop, vec![base.declared_as(leak(broken))]).await.unwrap_err();
    assert!(format!("{e:#}").contains("breaking change"), "{e:#}");
    assert!(started.elapsed() < Duration::from_secs(20), "refused at once, not retried: {:?}", started.elapsed());
    env.cleanup().await;
}
