//! Bad input and failing dependencies never stop the pipeline or drop data (issue 9): a schema
//! registry answering 500, 429 or 404 pauses the processors (their records wait; none is
//! dead-lettered) and they catch up when it answers again; a projection row PostgreSQL refuses
//! is dead-lettered alone while every other user's rows are applied.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use vitals::simulate;
use vitals_schemas::{DeadLetter, MetricKindRecord, RollupDay, SourceOffset};

use crate::harness::{free_port, header, wait_for_every, with, TestEnv, VitalsProc};
use crate::pipeline::{expected, fold};

/// A schema registry in front of the real one that answers `fault` (an HTTP status) instead of
/// forwarding while `fault` is not 0: the failure modes of a real registry (its 500 when its
/// database fails, 429 when rate limited, 404 when a subject or id was deleted).
#[derive(Clone)]
struct FaultyRegistry {
    upstream: String,
    fault: Arc<AtomicU16>,
    http: reqwest::Client,
}

async fn forward(State(r): State<FaultyRegistry>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let fault = r.fault.load(Ordering::SeqCst);
    if fault != 0 {
        let status = StatusCode::from_u16(fault).unwrap();
        return (
            status,
            [("content-type", "application/vnd.schemaregistry.v1+json")],
            format!("{{\"error_code\":{fault}01,\"message\":\"injected\"}}"),
        )
            .into_response();
    }
    let url = format!("{}{}", r.upstream, uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut req = r.http.request(method, url).body(body);
    for name in ["content-type", "authorization", "accept"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v);
        }
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status();
            let ct = resp.headers().get("content-type").cloned();
            let bytes = resp.bytes().await.unwrap_or_default();
            let mut out = (status, bytes).into_response();
            if let Some(ct) = ct {
                out.headers_mut().insert("content-type", ct);
            }
            out
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

impl FaultyRegistry {
    async fn start(upstream: &str) -> (FaultyRegistry, String) {
        let r = FaultyRegistry { upstream: upstream.to_owned(), fault: Arc::default(), http: reqwest::Client::new() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(forward).with_state(r.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (r, url)
    }
    fn answer(&self, status: u16) {
        self.fault.store(status, Ordering::SeqCst);
    }
}

/// Before: schema_registry_converter treated a 500, 429 or 404 as "undecodable" and cached it;
/// the processor dead-lettered every record, advanced past it and emitted the user's progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_registry_pauses_the_processor_and_nothing_is_dead_lettered() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let (faulty, faulty_url) = FaultyRegistry::start(&env.cfg.registry.url).await;
    let data = std::env::temp_dir().join(format!("vitals-faults-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let mut vars = with(env.child_env(&data), "VITALS_REGISTRY__URL", &faulty_url);
    vars = with(vars, "VITALS_PROCESSORS__METRICS_LISTEN", &format!("127.0.0.1:{port}"));
    // The registry fails from the start: the processor has nothing cached.
    faulty.answer(500);
    assert_eq!(simulate::run(&env.sim("a", 3, 2, 2), &env.http).await.unwrap().rejected, 0);
    let mut p = VitalsProc::new(&["process", "rollup_day"], vars);
    p.start();
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    for status in [500u16, 429, 404] {
        faulty.answer(status);
        let body = wait_for_every(
            &format!("/readyz to say why while the registry answers {status}"),
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                let (http, url) = (&env.http, &readyz);
                async move {
                    let r = http.get(url).send().await.ok()?;
                    let code = r.status().as_u16();
                    let body = r.text().await.ok()?;
                    (code == 503 && body.contains(&status.to_string())).then_some(body)
                }
            },
        )
        .await;
        assert!(body.contains("partition"), "{body}");
        assert!(p.exited().is_none(), "the processor waits, it does not exit: {:?}", p.exited());
    }
    assert!(env.read(&t.dead_letter).await.is_empty(), "nothing is dead-lettered while the registry fails");
    assert!(env.read(&t.rollup_day).await.is_empty(), "nothing is emitted (no progress marker either) while nothing was applied");
    // The waiting records age, and the processor says so (what the freshness alert reads).
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let freshness_age = || {
        let (http, url) = (&env.http, &metrics_url);
        async move {
            let text = http.get(url).send().await.ok()?.text().await.ok()?;
            let line = text.lines().find_map(|l| l.strip_prefix("vitals_processor_freshness_age_seconds{processor=\"rollup_day\"} "))?;
            line.trim().parse::<f64>().ok()
        }
    };
    wait_for_every(
        "the freshness age to grow past 3 s while the records wait",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let age = freshness_age();
            async move { age.await.filter(|a| *a >= 3.0) }
        },
    )
    .await;
    // More uploads while it fails, then it answers again: every record is processed.
    assert_eq!(simulate::run(&env.sim("b", 4, 1, 2), &env.http).await.unwrap().rejected, 0);
    faulty.answer(0);
    let want = expected(&env, &codec).await.rollup;
    assert!(want.len() > 10, "a realistic workload");
    wait_for_every(
        "the rollups to equal the oracle once the registry is back",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let (env, codec, want, t) = (&env, &codec, &want, &t);
            async move { (fold::<RollupDay>(env, codec, &t.rollup_day).await.0 == *want).then_some(()) }
        },
    )
    .await;
    wait_for_every("/readyz to say ready again", Duration::from_secs(30), Duration::from_millis(200), || {
        let (http, url) = (&env.http, &readyz);
        async move { http.get(url).send().await.ok().filter(|r| r.status() == 200).map(|_| ()) }
    })
    .await;
    assert!(env.read(&t.dead_letter).await.is_empty(), "no dead letter after the outage either");
    wait_for_every(
        "the freshness age to fall to 0 once every record is handled",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let age = freshness_age();
            async move { age.await.filter(|a| *a == 0.0).map(|_| ()) }
        },
    )
    .await;
    let metrics = env.http.get(format!("http://127.0.0.1:{port}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("vitals_processor_dependency_retries_total") && !l.ends_with(" 0")), "{metrics}");
    p.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// Before: a partition the runtime paused while the registry failed stayed paused after a
/// rebalance took it away and gave it back (librdkafka keeps an application's pause across a
/// new assignment; the task that would have resumed it was gone): those users' data never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_on_a_failing_registry_is_read_again_after_a_rebalance() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let (faulty, faulty_url) = FaultyRegistry::start(&env.cfg.registry.url).await;
    let data = std::env::temp_dir().join(format!("vitals-faults-rb-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    faulty.answer(500);
    assert_eq!(simulate::run(&env.sim("rb", 5, 3, 2), &env.http).await.unwrap().rejected, 0);
    let vars = with(env.child_env(&data), "VITALS_REGISTRY__URL", &faulty_url);
    let mut a =
        VitalsProc::new(&["process", "rollup_day"], with(vars.clone(), "VITALS_PROCESSORS__METRICS_LISTEN", &format!("127.0.0.1:{port}")));
    a.start();
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    wait_for_every(
        "the first instance to pause its partitions on the failing registry",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let (http, url) = (&env.http, &readyz);
            async move { http.get(url).send().await.ok().filter(|r| r.status() == 503).map(|_| ()) }
        },
    )
    .await;
    // A second instance joins (every partition is revoked and assigned again) and leaves (they
    // come back), all while the registry still fails.
    let mut b = VitalsProc::new(&["process", "rollup_day"], with(vars, "VITALS_PROCESSORS__DATA_DIR", data.join("b").to_str().unwrap()));
    b.start();
    let group = vitals::app::processor_group(&env.cfg, "rollup_day");
    let admin_members = |want: usize| {
        let (cfg, group) = (env.cfg.clone(), group.clone());
        async move { (vitals::replay::group_members(&cfg, &group).await.ok()? == want).then_some(()) }
    };
    wait_for_every("the second instance to join the group", Duration::from_secs(60), Duration::from_millis(300), || admin_members(2)).await;
    b.terminate(Duration::from_secs(30));
    wait_for_every("the second instance to leave the group", Duration::from_secs(60), Duration::from_millis(300), || admin_members(1))
        .await;
    // The registry answers again: every record is processed by the remaining instance.
    faulty.answer(0);
    let want = expected(&env, &codec).await.rollup;
    wait_for_every("the rollups to equal the oracle after the rebalances", Duration::from_secs(120), Duration::from_millis(500), || {
        let (env, codec, want, t) = (&env, &codec, &want, &t);
        async move { (fold::<RollupDay>(env, codec, &t.rollup_day).await.0 == *want).then_some(()) }
    })
    .await;
    assert!(env.read(&t.dead_letter).await.is_empty());
    a.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

fn rollup(user: &str, metric: &str, count: i64, topic: &str) -> RollupDay {
    RollupDay {
        user_id: user.to_owned(),
        metric: metric.to_owned(),
        local_date: "2024-03-01".to_owned(),
        unit: "count".to_owned(),
        kind: MetricKindRecord::Cumulative,
        count,
        sum: Some(count as f64),
        min: None,
        max: None,
        mean: None,
        time_weighted_mean: None,
        last: None,
        category_minutes: Default::default(),
        primary_source: Some("watch".to_owned()),
        version_epoch: 1,
        version_seq: 1,
        deleted: false,
        source_offsets: vec![SourceOffset { topic: topic.to_owned(), partition: 0, next_offset: 1 }],
    }
}

/// Before: a row PostgreSQL refuses (a NUL in text, an index row over 8191 bytes) failed the
/// sink's batch on every retry, and every other user's rows stayed unapplied for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_postgres_refuses_is_dead_lettered_alone_and_the_others_are_applied() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let producer: FutureProducer = vitals::app::producer(&env.cfg, "test").unwrap();
    let send = |key: String, r: RollupDay| {
        let (producer, codec, topic) = (&producer, &codec, t.rollup_day.clone());
        async move {
            let bytes = codec.encode(&topic, &r).await.unwrap();
            let h = OwnedHeaders::new().insert(Header { key: "vitals-user", value: Some(r.user_id.as_str()) });
            producer
                .send(FutureRecord::to(&topic).partition(0).key(&key).payload(&bytes).headers(h), Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    };
    // Written as a third-party (or pre-validation) producer could: straight to the output topic.
    send("evil|steps\0x|2024-03-01".into(), rollup("evil", "steps\0x", 1, &t.hot)).await;
    send("good|steps|2024-03-01".into(), rollup("good", "steps", 5, &t.hot)).await;
    // Incompressible, so its index entry really is over PostgreSQL's limit.
    let mut x = 0x2545f491u64;
    let huge: String = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    send("huge|x|2024-03-01".into(), rollup("huge", &huge, 2, &t.hot)).await;
    send("other|steps|2024-03-01".into(), rollup("other", "steps", 7, &t.hot)).await;
    let data = std::env::temp_dir().join(format!("vitals-faults-{}", uuid::Uuid::new_v4().simple()));
    let mut sink = VitalsProc::new(&["sink"], env.child_env(&data));
    sink.start();
    let rows: Vec<(String, i64)> =
        wait_for_every("the valid rows to be applied", Duration::from_secs(60), Duration::from_millis(200), || {
            let pool = &env.pool;
            async move {
                let rows: Vec<(String, i64)> =
                    sqlx::query_as("SELECT user_id, (body->>'count')::int8 FROM proj_rollup_day ORDER BY 1").fetch_all(pool).await.ok()?;
                (rows.len() >= 2).then_some(rows)
            }
        })
        .await;
    assert_eq!(rows, vec![("good".to_owned(), 5), ("other".to_owned(), 7)]);
    let dead = wait_for_every("both refused rows to be dead-lettered", Duration::from_secs(30), Duration::from_millis(200), || {
        let env = &env;
        async move {
            let d = env.read(&env.topics().dead_letter).await;
            (d.len() >= 2).then_some(d)
        }
    })
    .await;
    assert_eq!(dead.len(), 2, "exactly the refused rows");
    let mut users = Vec::new();
    for m in &dead {
        let dl: DeadLetter = codec.decode(m.payload().unwrap()).await.unwrap();
        assert_eq!(dl.code, "refused_by_database");
        assert!(dl.stage.starts_with("sink:"), "{}", dl.stage);
        users.push(header(m, "vitals-user").unwrap());
    }
    users.sort();
    assert_eq!(users, ["evil", "huge"]);
    assert!(sink.exited().is_none());
    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// Before: a dead-lettered record counted as processed (the processor still emitted the user's
/// progress marker), so the read said `fresh` over data that was never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_record_makes_the_read_degraded_with_the_count_and_reason() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let user = "dl-user";
    let now = chrono::Utc::now() - chrono::Duration::minutes(1);
    let body = serde_json::json!({"request_id": "r1", "samples": [{"source": "watch", "source_kind": "watch", "source_record_id": "a",
        "metric": "heart_rate", "start": now.to_rfc3339(), "end": now.to_rfc3339(), "value": 60, "unit": "count/min", "time_zone": "UTC"}]});
    env.consent(user, &[]).await;
    let (status, _, answer) = env.post(crate::ingest::SAMPLES, user, &body).await;
    assert_eq!(status, 200, "{answer}");
    // A record no producer should have written, on the user's lane partition: proven bad.
    let p = vitals_schemas::topics::partition_for(user.as_bytes(), env.cfg.kafka.partitions);
    let id = codec.own_id(&t.hot, vitals_schemas::avro::SAMPLE_BATCH).await.unwrap();
    let mut garbage = vec![0u8];
    garbage.extend_from_slice(&id.to_be_bytes());
    garbage.push(0x7f); // a string length with no string after it
    let producer: FutureProducer = vitals::app::producer(&env.cfg, "test").unwrap();
    producer
        .send(FutureRecord::to(&t.hot).partition(p).key(user).payload(&garbage), Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    let data = std::env::temp_dir().join(format!("vitals-faults-{}", uuid::Uuid::new_v4().simple()));
    let mut proc = VitalsProc::new(&["process", "rollup_day"], env.child_env(&data));
    proc.start();
    let mut sink = VitalsProc::new(&["sink"], env.child_env(&data));
    sink.start();
    let base = env.serve_api().await;
    let token = env.token(user);
    let read =
        wait_for_every("the read to say degraded, naming the dead letter", Duration::from_secs(60), Duration::from_millis(300), || {
            let (http, url, token) = (&env.http, format!("{base}/v1/rollups?metric=heart_rate"), &token);
            async move {
                let r: serde_json::Value = http.get(url).bearer_auth(token).send().await.ok()?.json().await.ok()?;
                let state = r["freshness"]["state"].as_str()?.to_owned();
                assert_ne!(state, "fresh", "fresh over a record that was not applied: {r}");
                (state == "degraded").then_some(r)
            }
        })
        .await;
    assert_eq!(read["data"].as_array().map(Vec::len), Some(1), "the valid upload is applied: {read}");
    let dead = &read["freshness"]["dead_letters"];
    assert_eq!((dead[0]["code"].as_str(), dead[0]["count"].as_i64()), (Some("undecodable"), Some(1)), "{read}");
    assert!(dead[0]["reason"].as_str().is_some_and(|r| !r.is_empty()));
    // The user's progress marker announced the dead letter (so the sink records it with the
    // progress, never after it), and the dead letter itself filled in the row.
    let markers = env.read(&t.rollup_day).await;
    assert!(
        markers.iter().any(|m| header(m, vitals_schemas::topics::PROGRESS_HEADER).is_some()
            && header(m, "vitals-dead-letters").is_some_and(|d| d.ends_with(":undecodable"))),
        "a marker names the dead letter"
    );
    wait_for_every(
        "the announced dead letter to be filled in from the dead-letter topic",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let rows: Vec<(i64, String)> = sqlx::query_as("SELECT source_offset, stage FROM projection_dead_letters WHERE user_id = $1")
                .bind(user)
                .fetch_all(&env.pool)
                .await
                .ok()?;
            (rows.len() == 1 && rows[0].0 >= 0).then_some(())
        },
    )
    .await;
    proc.kill9();
    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// Issue 9, items 1-2, end to end: hostile uploads get a typed 4xx and reach nothing; a record
/// that bypasses the edge with a valid session, a 30-hour one and a product id with NUL has
/// exactly its bad changes refused (the valid session is served, the read says degraded); and
/// another user's upload, in flight at the same time, becomes fresh within a bound. Before, the
/// NUL product id halted the sink for every user and the valid session was refused with its
/// record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sessions_harm_nothing_and_another_user_becomes_fresh() {
    use vitals_schemas::{DomainChange, DomainChangeBatch, DomainChangeKind, Session};
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let t = env.topics();
    let (evil, good) = ("hostile-user", "innocent-user");
    let at = |m: i64| (chrono::Utc::now() - chrono::Duration::minutes(m)).to_rfc3339();
    // Through the edge: each refused with its code and field, nothing written for the user.
    let ended = |id: &str, product: &str, start: String, end: String| {
        serde_json::json!({"change_id": id, "kind": "session_ended", "occurred_at": at(1),
            "session": {"session_id": id, "product_id": product, "start": start, "end": end}})
    };
    let hostile = serde_json::json!({"request_id": "h1", "changes": [
        ended("s-nul", "P\u{0}X", at(60), at(30)),
        ended("s-big", &"x".repeat(20_000), at(60), at(30)),
        ended("s-us", "co\u{1f}ffee", at(60), at(30)),
        ended("s-long", "p", at(31 * 60), at(1)),
    ]});
    let (status, _, answer) = env.post("/v1/domain-changes:batch", evil, &hostile).await;
    assert_eq!(status, 422, "{answer}");
    let fields: Vec<(&str, &str)> = answer["error"]["items"]
        .as_array()
        .or(answer["rejected"].as_array())
        .expect("per-item rejections")
        .iter()
        .map(|i| (i["field"].as_str().unwrap_or_default(), i["code"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(
        fields,
        [
            ("session.product_id", "invalid_field"),
            ("session.product_id", "invalid_field"),
            ("session.product_id", "invalid_field"),
            ("session.end", "session_too_long")
        ],
        "{answer}"
    );
    assert!(env.read(&t.domain).await.is_empty(), "nothing of a refused request reaches Kafka");

    // Bypassing the edge: one record, a valid session between the bad ones.
    let change = |id: &str, product: Option<&str>, start_min: i64, end_min: i64| {
        let now = chrono::Utc::now().timestamp_millis();
        DomainChange {
            change_id: id.into(),
            kind: DomainChangeKind::SessionEnded,
            occurred_at_ms: now,
            session: Some(Session {
                session_id: id.into(),
                product_id: product.map(Into::into),
                start_ms: Some(now - start_min * 60_000),
                end_ms: Some(now - end_min * 60_000),
                time_zone: None,
            }),
            product: None,
            privacy: None,
            source_priority: None,
        }
    };
    let batch = DomainChangeBatch {
        request_id: "bypass".into(),
        user_id: evil.into(),
        received_at_ms: chrono::Utc::now().timestamp_millis(),
        changes: vec![change("s-nul", Some("P\u{0}X"), 60, 30), change("s-ok", Some("coffee"), 60, 30), change("s-long", None, 31 * 60, 1)],
    };
    let producer: FutureProducer = vitals::app::producer(&env.cfg, "third-party").unwrap();
    let bytes = codec.encode(&t.domain, &batch).await.unwrap();
    producer.send(FutureRecord::to(&t.domain).key(evil).payload(&bytes), Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();

    let data = std::env::temp_dir().join(format!("vitals-faults-{}", uuid::Uuid::new_v4().simple()));
    let mut proc = VitalsProc::new(&["process", "--all"], env.child_env(&data));
    proc.start();
    let mut sink = VitalsProc::new(&["sink"], env.child_env(&data));
    sink.start();
    let base = env.serve_api().await;

    // Another user uploads meanwhile; their read becomes fresh within a bound.
    env.consent(good, &[]).await;
    let body = serde_json::json!({"request_id": "g1", "samples": [{"source": "watch", "source_kind": "watch", "source_record_id": "a",
        "metric": "heart_rate", "start": at(2), "end": at(2), "value": 60, "unit": "count/min", "time_zone": "UTC"}]});
    let (status, _, answer) = env.post(crate::ingest::SAMPLES, good, &body).await;
    assert_eq!(status, 200, "{answer}");
    let get = |user: &str, path: &str| {
        let (http, url, token) = (env.http.clone(), format!("{base}{path}"), env.token(user));
        async move { http.get(url).bearer_auth(token).send().await.ok()?.json::<serde_json::Value>().await.ok() }
    };
    wait_for_every("the other user's rollup to be fresh", Duration::from_secs(60), Duration::from_millis(300), || async {
        let r = get(good, "/v1/rollups?metric=heart_rate").await?;
        (r["freshness"]["state"] == "fresh" && r["data"].as_array().is_some_and(|d| d.len() == 1)).then_some(())
    })
    .await;
    // The valid session of the bypassing record is served; the read says degraded, not fresh.
    let session = wait_for_every("the valid session of the mixed record", Duration::from_secs(60), Duration::from_millis(300), || async {
        let r = get(evil, "/v1/sessions/s-ok").await?;
        r.get("data").is_some().then_some(r)
    })
    .await;
    assert_eq!(session["data"]["product_id"], "coffee", "{session}");
    let list =
        wait_for_every("the hostile user's sessions read to say degraded", Duration::from_secs(30), Duration::from_millis(300), || async {
            let r = get(evil, "/v1/sessions").await?;
            (r["freshness"]["state"] == "degraded").then_some(r)
        })
        .await;
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().filter_map(|s| s["session_id"].as_str()).collect();
    assert_eq!(ids, ["s-ok"], "{list}");
    let codes: Vec<&str> = list["freshness"]["dead_letters"].as_array().unwrap().iter().filter_map(|d| d["code"].as_str()).collect();
    assert_eq!(codes, ["invalid_field", "session_too_long"], "{list}");
    proc.kill9();
    sink.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
