//! Freshness across a takeover (issue 8, item 4): a new processor owner (a newer epoch) that
//! replays from an older checkpoint re-emits rows computed from less input, and no read may call
//! them fresh until the replay has passed what the edge accepted for the user; a zombie's older
//! epoch changes nothing. And a read never pairs rows with progress from another moment.
//!
//! The output records are written by the test itself, so the interleavings are exact: `vitals
//! sink` runs as its own process on the real broker and PostgreSQL, and the read API runs on
//! port 0 against the same database.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use vitals_processors::rollup_day;
use vitals_schemas::codec::Codec;
use vitals_schemas::topics::{INTERVAL_HEADER, PROGRESS_HEADER, VOUCH_HEADER};
use vitals_schemas::{MetricKindRecord, RollupDay, SourceOffset};

use crate::harness::{wait_for, TestEnv, VitalsProc};

async fn get(env: &TestEnv, url: &str, token: &str) -> Value {
    let resp = env.http.get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200, "GET {url}");
    resp.json().await.unwrap()
}

/// What the edge accepted for `user`: the last offset of each lane (partition 0).
async fn accepted(env: &TestEnv, user: &str, lanes: &[(&str, i64)]) {
    for (topic, last) in lanes {
        sqlx::query(
            "INSERT INTO ingest_user_offsets (user_id, topic, partition, last_offset) VALUES ($1, $2, 0, $3)
             ON CONFLICT (user_id, topic, partition) DO UPDATE SET last_offset = EXCLUDED.last_offset, accepted_at = now()",
        )
        .bind(user)
        .bind(topic)
        .bind(last)
        .execute(&env.pool)
        .await
        .unwrap();
    }
}

/// Writes processor output records for one user into partition 0 of rollup_day's output, as an
/// owner of a given epoch would.
struct Owner<'a> {
    env: &'a TestEnv,
    codec: &'a Codec,
    producer: FutureProducer,
    user: String,
}

impl Owner<'_> {
    /// The task's input position after an interval: HOT and COLD at `hot`/`cold`, the rest at 0.
    fn at(&self, hot: i64, cold: i64) -> Vec<SourceOffset> {
        let t = self.env.topics();
        [(t.hot, hot), (t.cold, cold), (t.change, 0), (t.domain, 0)]
            .into_iter()
            .map(|(topic, next_offset)| SourceOffset { topic, partition: 0, next_offset })
            .collect()
    }

    fn rollup(&self, metric: &str, count: i64, version: (i64, i64), source_offsets: Vec<SourceOffset>) -> RollupDay {
        RollupDay {
            user_id: self.user.clone(),
            metric: metric.to_owned(),
            local_date: "2024-03-01".to_owned(),
            unit: "count".to_owned(),
            kind: MetricKindRecord::Cumulative,
            count,
            sum: Some(count as f64 * 100.0),
            min: None,
            max: None,
            mean: None,
            time_weighted_mean: None,
            last: None,
            category_minutes: HashMap::new(),
            primary_source: Some("watch".to_owned()),
            version_epoch: version.0,
            version_seq: version.1,
            deleted: false,
            source_offsets,
        }
    }

    /// Sends one record; its offset in the output partition.
    async fn send(&self, key: &str, r: &RollupDay, headers: OwnedHeaders) -> i64 {
        let topic = self.env.topics().rollup_day;
        let bytes = self.codec.encode(&topic, r).await.unwrap();
        let sent = self
            .producer
            .send(FutureRecord::to(&topic).partition(0).key(key).payload(&bytes).headers(headers), Duration::from_secs(30))
            .await;
        sent.map_err(|(e, _)| e).unwrap().offset
    }

    async fn row(&self, r: &RollupDay) -> i64 {
        self.send(&rollup_day::output_key(&r.user_id, &r.metric, r.local_date.parse().unwrap()), r, OwnedHeaders::new()).await
    }

    /// A progress marker of `epoch` at `source_offsets` (tombstone-shaped, with the header).
    async fn marker(&self, version: (i64, i64), source_offsets: Vec<SourceOffset>) -> i64 {
        self.marker_with(version, source_offsets, OwnedHeaders::new()).await
    }

    async fn marker_with(&self, version: (i64, i64), source_offsets: Vec<SourceOffset>, headers: OwnedHeaders) -> i64 {
        let mut m = self.rollup("~progress", 0, version, source_offsets);
        m.deleted = true;
        self.send(&format!("{}|~progress", self.user), &m, headers.insert(Header { key: PROGRESS_HEADER, value: Some("1") })).await
    }

    /// A row of interval attempt `interval`, as the runtime writes it.
    async fn row_of(&self, interval: &str, r: &RollupDay) -> i64 {
        let key = rollup_day::output_key(&r.user_id, &r.metric, r.local_date.parse().unwrap());
        self.send(&key, r, OwnedHeaders::new().insert(Header { key: INTERVAL_HEADER, value: Some(interval) })).await
    }

    /// A marker vouching for `rows` rows of `interval` (`vitals_schemas::vouch`).
    async fn vouching(&self, interval: &str, rows: u64, version: (i64, i64), source_offsets: Vec<SourceOffset>) -> i64 {
        let v = vitals_schemas::vouch::vouch(interval, rows);
        self.marker_with(version, source_offsets, OwnedHeaders::new().insert(Header { key: VOUCH_HEADER, value: Some(v.as_str()) })).await
    }
}

/// Waits until the sink has committed everything up to output offset `last` (its rows, the
/// users' progress and its position commit in one transaction).
async fn consumed(env: &TestEnv, what: &str, last: i64) {
    let topic = env.topics().rollup_day;
    wait_for(&format!("the sink to commit {what} (output offset {last})"), Duration::from_secs(60), || {
        let (pool, topic) = (&env.pool, &topic);
        async move {
            let next: Option<i64> = sqlx::query_scalar("SELECT next_offset FROM sink_offsets WHERE topic = $1 AND partition = 0")
                .bind(topic)
                .fetch_optional(pool)
                .await
                .ok()
                .flatten();
            next.is_some_and(|n| n > last).then_some(())
        }
    })
    .await;
}

/// The user's steps row as the API serves it (its `count`), and the read's freshness state.
async fn read_steps(env: &TestEnv, api: &str, token: &str) -> (Option<i64>, String, Value) {
    let body = get(env, &format!("{api}/v1/rollups?metric=steps"), token).await;
    let count = body["data"].as_array().and_then(|d| d.first()).and_then(|r| r["count"].as_i64());
    (count, body["freshness"]["state"].as_str().unwrap_or_default().to_owned(), body)
}

/// A user whose uploads the edge accepted up to HOT offset 99 and COLD offset 59, a `vitals sink`
/// running as its own process, and the read API.
struct Scene {
    env: TestEnv,
    codec: Codec,
    data: std::path::PathBuf,
    user: String,
    token: String,
    t: vitals_schemas::topics::Topics,
    api: String,
    sink: VitalsProc,
}

impl Scene {
    async fn start(name: &str) -> Scene {
        let env = TestEnv::start().await;
        let codec = vitals::app::codec(&env.cfg);
        let data = std::env::temp_dir().join(format!("vitals-{name}-{}", uuid::Uuid::new_v4().simple()));
        let user = format!("{name}-{}", uuid::Uuid::new_v4().simple());
        let token = env.token(&user);
        let t = env.topics();
        accepted(&env, &user, &[(&t.hot, 99), (&t.cold, 59)]).await;
        let api = env.serve_api().await;
        let mut sink = VitalsProc::new(&["sink"], env.child_env(&data));
        sink.start();
        Scene { env, codec, data, user, token, t, api, sink }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_an_older_checkpoint_is_not_fresh_until_it_has_caught_up() {
    // The edge accepted the user's uploads up to HOT offset 99 and COLD offset 59.
    let Scene { env, codec, data, user, token, t, api, mut sink } = Scene::start("replay").await;
    let owner = Owner { env: &env, codec: &codec, producer: vitals::app::producer(&env.cfg, "test-owner").unwrap(), user: user.clone() };

    // Epoch 1 processed everything: its rows, then its marker past the accepted offsets.
    owner.row(&owner.rollup("steps", 10, (1, 1), owner.at(100, 60))).await;
    owner.row(&owner.rollup("heart_rate", 5, (1, 2), owner.at(100, 60))).await;
    let last = owner.marker((1, 3), owner.at(100, 60)).await;
    consumed(&env, "epoch 1's rows and marker", last).await;
    let (count, state, body) = read_steps(&env, &api, &token).await;
    assert_eq!((count, state.as_str()), (Some(10), "fresh"), "epoch 1 covers every accepted offset: {body}");

    // Epoch 2 takes over from a checkpoint at HOT 40 / COLD 20 and re-emits the steps row from
    // that much input (a newer version: it replaces epoch 1's row), then its first marker.
    let last = owner.row(&owner.rollup("steps", 4, (2, 1), owner.at(40, 20))).await;
    consumed(&env, "epoch 2's replayed row", last).await;
    let (count, state, body) = read_steps(&env, &api, &token).await;
    assert_eq!(count, Some(4), "the replayed row is what the API serves: {body}");
    assert_ne!(
        state, "fresh",
        "a row computed from input up to HOT 40 is served as fresh, though the user's accepted HOT offset is 99: {body}"
    );
    let last = owner.marker((2, 2), owner.at(40, 20)).await;
    consumed(&env, "epoch 2's first marker", last).await;
    let (_, state, body) = read_steps(&env, &api, &token).await;
    assert_eq!(state, "stale", "the replay is at HOT 40: {body}");

    // The replay catches up: the row from all the input, then a marker past the accepted offsets.
    owner.row(&owner.rollup("steps", 10, (2, 3), owner.at(100, 60))).await;
    let last = owner.marker((2, 4), owner.at(100, 60)).await;
    consumed(&env, "epoch 2's caught-up row and marker", last).await;
    let (count, state, body) = read_steps(&env, &api, &token).await;
    assert_eq!((count, state.as_str()), (Some(10), "fresh"), "epoch 2 has passed every accepted offset: {body}");

    // A zombie of epoch 1 writes late, further than epoch 2 has got: it changes nothing.
    owner.row(&owner.rollup("steps", 99, (1, 5), owner.at(200, 200))).await;
    let last = owner.marker((1, 6), owner.at(200, 200)).await;
    consumed(&env, "the zombie's row and marker", last).await;
    let positions: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT topic, epoch, next_offset FROM projection_progress WHERE user_id = $1 AND projection = 'rollup_day' AND topic = ANY($2) ORDER BY topic = $3")
            .bind(&user)
            .bind([&t.hot, &t.cold])
            .bind(&t.hot)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(positions, vec![(t.cold.clone(), 2, 60), (t.hot.clone(), 2, 100)], "epoch 2's positions, untouched by the zombie");
    // The user uploads more (HOT 150): epoch 2 has not processed it, whatever the zombie said.
    accepted(&env, &user, &[(&t.hot, 150)]).await;
    let (count, state, body) = read_steps(&env, &api, &token).await;
    assert_eq!((count, state.as_str()), (Some(10), "stale"), "the zombie's marker at HOT 200 must not make epoch 2's rows fresh: {body}");

    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// Issue 10: a processor produces an interval's rows and its markers together and waits for the
/// acknowledgements once, so a row refused for good can leave the marker after it in the log (the
/// task then fails the interval and retries it as a new attempt). Such a marker must never make
/// the user fresh; a complete attempt's marker must, also when the sink restarts between reading
/// the rows and reading the marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_is_believed_only_after_every_row_it_vouches_for() {
    let Scene { env, codec, data, user, token, api, mut sink, .. } = Scene::start("vouch").await;
    let owner = Owner { env: &env, codec: &codec, producer: vitals::app::producer(&env.cfg, "test-owner").unwrap(), user: user.clone() };

    // Attempt 1 of interval planned two rows and its marker; the heart-rate row was refused for
    // good, the records after it landed.
    owner.row_of("o.1", &owner.rollup("steps", 10, (1, 1), owner.at(100, 60))).await;
    let last = owner.vouching("o.1", 2, (1, 3), owner.at(100, 60)).await;
    consumed(&env, "attempt 1's steps row and its marker", last).await;
    let (count, state, body) = read_steps(&env, &api, &token).await;
    assert_eq!(count, Some(10), "the row that landed is applied: {body}");
    assert_ne!(state, "fresh", "a marker vouching for two rows was believed after one: the heart-rate row is missing: {body}");

    // The retry (attempt 2) lands both rows; the sink dies after committing them, before the marker.
    owner.row_of("o.2", &owner.rollup("steps", 10, (1, 4), owner.at(100, 60))).await;
    let last = owner.row_of("o.2", &owner.rollup("heart_rate", 5, (1, 5), owner.at(100, 60))).await;
    consumed(&env, "attempt 2's rows", last).await;
    sink.kill9();
    let last = owner.vouching("o.2", 2, (1, 6), owner.at(100, 60)).await;
    sink.start();
    consumed(&env, "attempt 2's marker, after a restart", last).await;
    let (count, state, body) = read_steps(&env, &api, &token).await;
    assert_eq!(
        (count, state.as_str()),
        (Some(10), "fresh"),
        "every row of attempt 2 was read before its marker (across the restart): {body}"
    );

    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// A row the sink cannot decode is still a row of its attempt: it is dead-lettered (reads say
/// `degraded`), and it counts toward its marker's vouch, so the user's progress still moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_does_not_decode_still_counts_for_its_marker() {
    let Scene { env, codec, data, user, t, mut sink, .. } = Scene::start("undecodable").await;
    let owner = Owner { env: &env, codec: &codec, producer: vitals::app::producer(&env.cfg, "test-owner").unwrap(), user: user.clone() };
    let headers = OwnedHeaders::new()
        .insert(Header { key: vitals_schemas::topics::USER_HEADER, value: Some(user.as_str()) })
        .insert(Header { key: INTERVAL_HEADER, value: Some("o.1") });
    let topic = t.rollup_day.clone();
    owner
        .producer
        .send(
            FutureRecord::to(&topic).partition(0).key(&format!("{user}|steps|2024-03-01")).payload(&b"not avro"[..]).headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    owner.row_of("o.1", &owner.rollup("heart_rate", 5, (1, 2), owner.at(100, 60))).await;
    let last = owner.vouching("o.1", 2, (1, 3), owner.at(100, 60)).await;
    consumed(&env, "the attempt's two rows (one undecodable) and its marker", last).await;
    let hot: Option<(i64, i64)> = sqlx::query_as(
        "SELECT epoch, next_offset FROM projection_progress WHERE user_id = $1 AND projection = 'rollup_day' AND topic = $2",
    )
    .bind(&user)
    .bind(&t.hot)
    .fetch_optional(&env.pool)
    .await
    .unwrap();
    assert_eq!(hot, Some((1, 100)), "the marker is believed: both rows of its attempt were read, one of them dead-lettered");
    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// A read sees its rows and its freshness as of one moment. The test holds `projection_progress`
/// locked while the API reads, so the read gets past its rows and then waits for progress; while
/// it waits, the replay catches up (row and progress, committed together). A read of rows from
/// before and progress from after would serve the replay's row as fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_pairs_rows_and_progress_of_one_moment() {
    let env = TestEnv::start().await;
    let user = format!("snapshot-{}", uuid::Uuid::new_v4().simple());
    let token = env.token(&user);
    let hot = env.topics().hot;
    accepted(&env, &user, &[(&hot, 99)]).await;
    let api = env.serve_api().await;

    // Each read endpoint, with a replayed row (count 4) and progress at HOT 40.
    let cases = [
        ("/v1/rollups", "proj_rollup_day", "rollup_day", "steps|2024-03-01"),
        ("/v1/sleep", "proj_sleep_night", "sleep_night", "2024-03-01"),
        ("/v1/sessions", "proj_session_impact", "session_impact", "s1"),
        ("/v1/sessions/s1", "proj_session_impact", "session_impact", "s1"),
    ];
    for (path, table, projection, entity) in cases {
        sqlx::query(&format!(
            "INSERT INTO {table} (user_id, entity_id, metric, day, at_ms, version_epoch, version_seq, deleted, body, source_offsets)
             VALUES ($1, $2, 'steps', '2024-03-01', 1, 2, 1, false, $3, '[]')
             ON CONFLICT (user_id, entity_id) DO UPDATE SET body = EXCLUDED.body"
        ))
        .bind(&user)
        .bind(entity)
        .bind(json!({"count": 4}))
        .execute(&env.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO projection_progress (user_id, projection, topic, partition, next_offset) VALUES ($1, $2, $3, 0, 40)
             ON CONFLICT (user_id, projection, topic, partition) DO UPDATE SET next_offset = 40",
        )
        .bind(&user)
        .bind(projection)
        .bind(&hot)
        .execute(&env.pool)
        .await
        .unwrap();

        let mut writer = env.pool.begin().await.unwrap();
        sqlx::query("LOCK TABLE projection_progress IN ACCESS EXCLUSIVE MODE").execute(&mut *writer).await.unwrap();
        let read = {
            let (http, url, token) = (env.http.clone(), format!("{api}{path}"), token.clone());
            tokio::spawn(async move { http.get(url).bearer_auth(token).send().await.unwrap().json::<Value>().await.unwrap() })
        };
        wait_for(&format!("GET {path} to wait for projection_progress"), Duration::from_secs(30), || async {
            let waiting: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = 'projection_progress'::regclass AND NOT granted)",
            )
            .fetch_one(&env.pool)
            .await
            .unwrap();
            waiting.then_some(())
        })
        .await;
        // The replay catches up while the read waits: row and progress in one transaction.
        sqlx::query(&format!("UPDATE {table} SET body = $3, version_seq = 2 WHERE user_id = $1 AND entity_id = $2"))
            .bind(&user)
            .bind(entity)
            .bind(json!({"count": 10}))
            .execute(&mut *writer)
            .await
            .unwrap();
        sqlx::query("UPDATE projection_progress SET next_offset = 100 WHERE user_id = $1 AND projection = $2")
            .bind(&user)
            .bind(projection)
            .execute(&mut *writer)
            .await
            .unwrap();
        writer.commit().await.unwrap();

        let body = tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .unwrap_or_else(|_| panic!("GET {path} did not answer within 30 s"))
            .unwrap();
        let row = if body["data"].is_array() { body["data"][0].clone() } else { body["data"].clone() };
        let seen = (row["count"].as_i64(), body["freshness"]["state"].as_str().unwrap_or_default());
        assert!(
            seen == (Some(4), "stale") || seen == (Some(10), "fresh"),
            "GET {path} paired rows and progress of different moments: {body}"
        );
    }
    env.cleanup().await;
}

/// The same rule end to end, on a real replay: the processor, the sink and the API all run; the
/// processor loses its disk (no local store, no snapshot) and replays every partition from the
/// beginning with other batch boundaries, re-emitting rows computed from less input. Throughout
/// the replay the API is polled: a read that says `fresh` must hold exactly the oracle's rows for
/// that user (everything was uploaded before), and the replay must have been seen as not fresh
/// at least once, or the test proved nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_real_replay_no_read_says_fresh_over_rows_from_less_input() {
    use std::collections::BTreeMap;
    use vitals::simulate;
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let base = env.serve_api().await;
    let data = std::env::temp_dir().join(format!("vitals-fresh-{}", uuid::Uuid::new_v4().simple()));
    let vars = |batch: &str| {
        let mut v = env.child_env(&data);
        v.retain(|(k, _)| k != "VITALS_PROCESSORS__MAX_BATCH");
        v.push(("VITALS_PROCESSORS__MAX_BATCH".into(), batch.into()));
        v.push(("VITALS_PROCESSORS__SNAPSHOT_EVERY_MS".into(), "0".into()));
        v
    };
    let sim = env.sim("r", 61, 3, 3);
    let users: Vec<String> = (0..sim.users).map(|i| simulate::user_id(&sim, i)).collect();
    assert_eq!(simulate::run(&sim, &env.http).await.unwrap().rejected, 0);
    let all = rollup_day::oracle(&crate::process::inputs(&env, &codec).await);
    let strip = |mut r: RollupDay| {
        crate::pipeline::Out::strip(&mut r);
        r
    };
    let expected: HashMap<String, BTreeMap<String, RollupDay>> = users
        .iter()
        .map(|u| (u.clone(), all.iter().filter(|(_, r)| &r.user_id == u).map(|(k, r)| (k.clone(), strip(r.clone()))).collect()))
        .collect();
    assert!(expected.values().all(|m| m.len() >= 5), "a realistic workload per user");
    // One read: the user's rows (one page) and its freshness, from one snapshot.
    let read = |user: String| {
        let (env, base) = (&env, &base);
        async move {
            let body = get(env, &format!("{base}/v1/rollups?limit=1000"), &env.token(&user)).await;
            assert!(body["next_cursor"].is_null(), "one page holds every row");
            let rows: BTreeMap<String, RollupDay> = body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| {
                    let r: RollupDay = serde_json::from_value(v.clone()).unwrap();
                    (rollup_day::output_key(&r.user_id, &r.metric, r.local_date.parse().unwrap()), strip(r))
                })
                .collect();
            (body["freshness"]["state"].as_str().unwrap().to_owned(), rows)
        }
    };
    let mut processor = VitalsProc::new(&["process", "rollup_day"], vars("50"));
    processor.start();
    let mut sink = VitalsProc::new(&["sink"], vars("50"));
    sink.start();
    for u in &users {
        wait_for(&format!("{u} fresh with the oracle's rows"), Duration::from_secs(120), || async {
            let (state, rows) = read(u.clone()).await;
            (state == "fresh" && rows == expected[u]).then_some(())
        })
        .await;
    }
    // The disk is lost; the next owner replays everything, one record per interval. The sink is
    // down meanwhile and comes back applying one record per transaction, so each user's replayed
    // rows become visible one by one over a window the polls cannot miss (a sink that keeps up
    // in large batches may apply a user's whole replay in one transaction: fresh before, fresh
    // after, and nothing tested).
    processor.kill9();
    sink.kill9();
    std::fs::remove_dir_all(&data).unwrap();
    let task = format!("{}rollup_day", env.cfg.kafka.topic_prefix);
    let epochs = || async {
        sqlx::query_as::<_, (i32, i64)>("SELECT partition, epoch FROM processor_epochs WHERE processor = $1")
            .bind(&task)
            .fetch_all(&env.pool)
            .await
            .unwrap()
            .into_iter()
            .collect::<HashMap<i32, i64>>()
    };
    let before = epochs().await;
    processor.env = vars("1");
    processor.start();
    // The new owner has taken every partition (each one's epoch bumped) before anything is judged.
    wait_for("the new owner to take every partition", Duration::from_secs(120), || async {
        let now = epochs().await;
        before.iter().all(|(p, e)| now.get(p).is_some_and(|n| n > e)).then_some(())
    })
    .await;
    let t = env.topics();
    // The replay is over once every partition with input has a marker of its current epoch at
    // the end of every lane.
    wait_for("the replay to reach the end of every lane", Duration::from_secs(120), || async {
        let current = epochs().await;
        let mut ends: HashMap<i32, HashMap<String, i64>> = HashMap::new();
        for topic in [&t.hot, &t.cold, &t.change, &t.domain] {
            for m in env.read(topic).await {
                let e = ends.entry(rdkafka::Message::partition(&m)).or_default().entry(topic.clone()).or_insert(0);
                *e = (*e).max(rdkafka::Message::offset(&m) + 1);
            }
        }
        let mut done: std::collections::HashSet<i32> = Default::default();
        for m in env.read(&t.rollup_day).await {
            if crate::harness::header(&m, PROGRESS_HEADER).is_none() {
                continue;
            }
            let r: RollupDay = codec.decode(rdkafka::Message::payload(&m).unwrap()).await.unwrap();
            let p = rdkafka::Message::partition(&m);
            let at_end = r.source_offsets.iter().all(|o| o.next_offset == ends.get(&p).and_then(|e| e.get(&o.topic)).copied().unwrap_or(0));
            if current.get(&p) == Some(&r.version_epoch) && at_end {
                done.insert(p);
            }
        }
        ends.keys().all(|p| done.contains(p)).then_some(())
    })
    .await;
    sink.env = vars("1");
    sink.start();
    // Whether every progress position of `user` is the new owner's (its partition's current epoch).
    let of_current_epoch = |user: &str| {
        let (env, task, user) = (&env, &task, user.to_owned());
        async move {
            let behind: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM projection_progress pp JOIN processor_epochs pe ON pe.processor = $2 AND pe.partition = pp.partition
                 WHERE pp.projection = 'rollup_day' AND pp.user_id = $1 AND pp.epoch < pe.epoch",
            )
            .bind(&user)
            .bind(task)
            .fetch_one(&env.pool)
            .await
            .unwrap();
            behind == 0
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let (mut reads, mut not_fresh) = (0usize, 0usize);
    let mut caught_up: std::collections::HashSet<String> = Default::default();
    while caught_up.len() < users.len() {
        assert!(std::time::Instant::now() < deadline, "the replay did not catch up within 180 s ({reads} reads, {not_fresh} not fresh)");
        for u in &users {
            let (state, rows) = read(u.clone()).await;
            reads += 1;
            if state == "fresh" {
                if rows != expected[u] {
                    let wrong: Vec<_> = expected[u].iter().filter(|(k, v)| rows.get(*k) != Some(*v)).map(|(k, _)| k).take(3).collect();
                    panic!(
                        "read {reads}: {u} is served as fresh with rows that are not the oracle's (e.g. {wrong:?}; {} rows vs {})",
                        rows.len(),
                        expected[u].len()
                    );
                }
                if of_current_epoch(u).await {
                    caught_up.insert(u.clone());
                }
            } else {
                not_fresh += 1;
            }
        }
    }
    assert!(not_fresh > 0, "the replay was never seen as not fresh in {reads} reads: the test proved nothing");
    eprintln!("{reads} reads during the replay, {not_fresh} not fresh, none fresh with other rows");
    processor.kill9();
    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
