//! The read API and the realtime gateway end to end, every component a real process (`vitals
//! process`, `vitals sink`, `vitals api`) on the real broker, PostgreSQL and Redis: reads are
//! `pending` before anything is processed, `stale` while uploads are not reflected and `fresh`
//! once they are; the rows equal the oracle; a WebSocket client gets its own user's envelopes and
//! none of another's; ETags, pagination, scoping and typed errors hold.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use vitals::simulate;
use vitals_processors::rollup_day;
use vitals_schemas::RollupDay;

use crate::harness::{wait_for, wait_for_every, TestEnv, VitalsProc};
use crate::process::inputs;

struct ApiClient {
    base: String,
    http: reqwest::Client,
}

impl ApiClient {
    async fn get(&self, path: &str, token: Option<&str>, etag: Option<&str>) -> (u16, Option<String>, Value) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(e) = etag {
            req = req.header("If-None-Match", e);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let tag = resp.headers().get("etag").map(|v| v.to_str().unwrap().to_owned());
        let body = resp.bytes().await.unwrap();
        (status, tag, if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap() })
    }

    /// Every page of a list, following `next_cursor`.
    async fn all(&self, path: &str, token: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let p = match &cursor {
                Some(c) => format!("{path}{sep}cursor={c}"),
                None => path.to_owned(),
            };
            let (s, _, body) = self.get(&p, Some(token), None).await;
            assert_eq!(s, 200, "{body}");
            out.extend(body["data"].as_array().unwrap().iter().cloned());
            match body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
    }

    async fn freshness(&self, token: &str, projection: &str) -> String {
        let (s, _, body) = self.get("/v1/freshness", Some(token), None).await;
        assert_eq!(s, 200, "{body}");
        body["freshness"][projection]["state"].as_str().unwrap().to_owned()
    }
}

fn strip(mut r: RollupDay) -> RollupDay {
    r.version_epoch = 0;
    r.version_seq = 0;
    r.source_offsets.clear();
    r
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(base: &str, token: &str) -> Ws {
    let url = format!("{}/v1/realtime?token={token}", base.replace("http://", "ws://"));
    tokio_tungstenite::connect_async(url).await.expect("websocket connect").0
}

/// Reads envelopes until `until` holds for what was received (bounded).
async fn receive_until(ws: &mut Ws, what: &str, until: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !until(&got) {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: not within 60 s; got {} envelopes", got.len()));
        match next {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => got.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(_)) => {}
            other => panic!("{what}: socket ended: {other:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_scoped_fresh_and_pushed_live() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let data = std::env::temp_dir().join(format!("vitals-api-{}", uuid::Uuid::new_v4().simple()));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut api_env = env.child_env(&data);
    api_env.push(("VITALS_API__LISTEN".into(), format!("127.0.0.1:{port}")));
    // /metrics on an internal port, not on the public one.
    let metrics_port = crate::harness::free_port();
    api_env.push(("VITALS_API__METRICS_LISTEN".into(), format!("127.0.0.1:{metrics_port}")));
    let mut api_proc = VitalsProc::new(&["api"], api_env);
    api_proc.start();
    // A second gateway instance, realtime only: envelopes reach a client wherever it connects.
    let gw_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut gw_env = env.child_env(&data);
    gw_env.push(("VITALS_API__LISTEN".into(), format!("127.0.0.1:{gw_port}")));
    let mut gateway = VitalsProc::new(&["realtime"], gw_env);
    gateway.start();
    let gw_base = format!("http://127.0.0.1:{gw_port}");
    wait_for("the second gateway to listen", Duration::from_secs(30), || async {
        reqwest::get(format!("{gw_base}/healthz")).await.ok().map(|_| ())
    })
    .await;
    let api = ApiClient { base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() };
    wait_for("the API to listen", Duration::from_secs(30), || async {
        api.http.get(format!("{}/healthz", api.base)).send().await.ok().map(|_| ())
    })
    .await;
    let public = api.http.get(format!("{}/metrics", api.base)).send().await.unwrap();
    assert_eq!(public.status().as_u16(), 404, "no /metrics on the public port when api.metrics_listen is set");
    let internal = api.http.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(internal.contains("vitals_api_responses_total{route=\"/healthz\",class=\"2xx\"}"), "{internal}");

    // A uploads while nothing processes: pending.
    let sim_a = env.sim("a", 1, 1, 2);
    let a = simulate::user_id(&sim_a, 0);
    assert_eq!(simulate::run(&sim_a, &env.http).await.unwrap().rejected, 0);
    let (ta, tb) = (env.token(&a), env.token("api-user-b"));
    let (s, _, body) = api.get("/v1/rollups", Some(&ta), None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["freshness"]["state"], "pending", "{body}");
    assert_eq!(body["data"], json!([]));

    // Both users watch live; then the pipeline starts.
    let mut ws_a = connect(&api.base, &ta).await;
    let mut ws_b = connect(&api.base, &tb).await;
    let mut ws_b2 = connect(&gw_base, &tb).await;
    let mut processor = VitalsProc::new(&["process", "rollup_day"], env.child_env(&data));
    processor.start();
    let mut sink = VitalsProc::new(&["sink"], env.child_env(&data));
    sink.start();
    wait_for_every("A's rollups to be fresh", Duration::from_secs(90), Duration::from_millis(200), || async {
        (api.freshness(&ta, "rollup_day").await == "fresh").then_some(())
    })
    .await;

    // The rows are the oracle's, page by page.
    let expected: BTreeMap<String, RollupDay> =
        rollup_day::oracle(&inputs(&env, &codec).await).into_iter().filter(|(_, r)| r.user_id == a).collect();
    assert!(expected.len() >= 5, "a realistic day or two: {} rows", expected.len());
    let rows = api.all("/v1/rollups?limit=7", &ta).await;
    let got: BTreeMap<String, RollupDay> = rows
        .into_iter()
        .map(|v| {
            let r: RollupDay = serde_json::from_value(v).unwrap();
            (rollup_day::output_key(&r.user_id, &r.metric, r.local_date.parse().unwrap()), strip(r))
        })
        .collect();
    assert_eq!(got, expected.into_iter().map(|(k, r)| (k, strip(r))).collect());

    // A's socket got A's envelopes, nothing else.
    let env_a = receive_until(&mut ws_a, "A's envelopes", |got| !got.is_empty()).await;
    assert!(env_a.iter().all(|e| e["user_id"] == a.as_str()), "{env_a:?}");
    assert!(env_a[0]["event_type"].as_str().unwrap().starts_with("rollup_day."), "{}", env_a[0]);

    // ETag: the same read again is a 304 with no body.
    let (s, tag, _) = api.get("/v1/rollups?metric=steps", Some(&ta), None).await;
    assert_eq!(s, 200);
    let (s, _, body) = api.get("/v1/rollups?metric=steps", Some(&ta), tag.as_deref()).await;
    assert_eq!((s, body), (304, Value::Null));

    // Scoping, auth and typed errors.
    let (s, _, body) = api.get("/v1/rollups", None, None).await;
    assert_eq!((s, body["error"]["code"].as_str()), (401, Some("missing_token")));
    let (s, _, body) = api.get("/v1/rollups", Some(&tb), None).await;
    assert_eq!((s, body["data"].clone()), (200, json!([])), "B sees none of A's rows");
    let (s, _, body) = api.get("/v1/rollups?limit=0", Some(&ta), None).await;
    assert_eq!((s, body["error"]["code"].as_str(), body["error"]["field"].as_str()), (400, Some("invalid_parameter"), Some("limit")));
    let (s, _, body) = api.get("/v1/rollups?cursor=garbage", Some(&ta), None).await;
    assert_eq!((s, body["error"]["code"].as_str()), (400, Some("invalid_cursor")));
    let (s, _, body) = api.get("/v1/sessions/nope", Some(&ta), None).await;
    assert_eq!((s, body["error"]["code"].as_str()), (404, Some("not_found")));

    // B uploads: B's socket gets B's envelopes; A's gets none of them.
    env.consent("api-user-b", &[]).await;
    let now = chrono::Utc::now();
    let sample = |id: &str, mins: i64| {
        json!({"source": "watch", "source_kind": "watch", "source_record_id": id, "metric": "heart_rate",
               "start": (now - chrono::Duration::minutes(mins)).to_rfc3339(), "end": (now - chrono::Duration::minutes(mins - 1)).to_rfc3339(),
               "value": 61, "unit": "count/min", "time_zone": "UTC"})
    };
    let (s, _, out) = env.post("/v1/health/samples:batch", "api-user-b", &json!({"request_id": "b1", "samples": [sample("b1", 5)]})).await;
    assert_eq!(s, 200, "{out}");
    let env_b = receive_until(&mut ws_b, "B's envelope", |got| !got.is_empty()).await;
    assert!(env_b.iter().all(|e| e["user_id"] == "api-user-b"), "{env_b:?}");
    let env_b2 = receive_until(&mut ws_b2, "B's envelope on the other gateway", |got| !got.is_empty()).await;
    assert_eq!(env_b2[0], env_b[0], "the same envelope, whichever gateway the client is on");
    wait_for_every("B's rollups to be fresh", Duration::from_secs(60), Duration::from_millis(200), || async {
        (api.freshness(&tb, "rollup_day").await == "fresh").then_some(())
    })
    .await;

    // A uploads while the processor is down: stale (not pending: older data is reflected).
    processor.kill9();
    let (s, _, out) = env.post("/v1/health/samples:batch", &a, &json!({"request_id": "a-late", "samples": [sample("a-late", 3)]})).await;
    assert_eq!(s, 200, "{out}");
    let (_, _, body) = api.get("/v1/rollups?metric=heart_rate", Some(&ta), None).await;
    assert_eq!(body["freshness"]["state"], "stale", "{body}");
    assert!(body["freshness"]["offsets_behind"].as_i64().unwrap() >= 1, "{body}");
    processor.start();
    wait_for_every("A's rollups fresh again", Duration::from_secs(60), Duration::from_millis(200), || async {
        (api.freshness(&ta, "rollup_day").await == "fresh").then_some(())
    })
    .await;
    // Whatever A's socket received meanwhile is A's alone.
    let more = receive_until(&mut ws_a, "A's envelope for the late sample", |got| {
        got.iter().any(|e| e["payload"].as_str().is_some_and(|p| p.contains("heart_rate")))
    })
    .await;
    assert!(more.iter().all(|e| e["user_id"] == a.as_str()), "A never sees B's envelopes: {more:?}");

    processor.kill9();
    sink.kill9();
    api_proc.kill9();
    gateway.kill9();
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}

/// Redis stopped mid-run: uploads, processing and the sink go on and the projection stays the
/// oracle's; realtime alone degrades, and recovers when Redis is back (the gateway resubscribes,
/// an open WebSocket gets envelopes again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_degrades_realtime_only() {
    let env = TestEnv::start().await;
    let mut redis = crate::harness::OwnRedis::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let data = std::env::temp_dir().join(format!("vitals-redis-{}", uuid::Uuid::new_v4().simple()));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let with_redis = |extra: Option<(&str, String)>| {
        let mut v = env.child_env(&data);
        v.push(("VITALS_REDIS__URL".into(), redis.url()));
        v.extend(extra.map(|(k, val)| (k.to_owned(), val)));
        v
    };
    let mut procs = [
        VitalsProc::new(&["api"], with_redis(Some(("VITALS_API__LISTEN", format!("127.0.0.1:{port}"))))),
        VitalsProc::new(&["process", "rollup_day"], with_redis(None)),
        VitalsProc::new(&["sink"], with_redis(None)),
    ];
    procs.iter_mut().for_each(VitalsProc::start);
    let api = ApiClient { base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() };
    wait_for("the API to listen", Duration::from_secs(30), || async {
        api.http.get(format!("{}/healthz", api.base)).send().await.ok().map(|_| ())
    })
    .await;

    let sim = env.sim("r", 3, 1, 2);
    let user = simulate::user_id(&sim, 0);
    let token = env.token(&user);
    let mut ws = connect(&api.base, &token).await;
    assert_eq!(simulate::run(&sim, &env.http).await.unwrap().rejected, 0);
    receive_until(&mut ws, "envelopes while Redis is up", |got| !got.is_empty()).await;

    // Redis goes away; more data arrives and is processed and projected all the same.
    redis.kill();
    let more = env.sim("r2", 4, 1, 2);
    let other = simulate::user_id(&more, 0);
    let other_token = env.token(&other);
    assert_eq!(simulate::run(&more, &env.http).await.unwrap().rejected, 0);
    let expected: BTreeMap<String, RollupDay> = rollup_day::oracle(&inputs(&env, &codec).await)
        .into_iter()
        .filter(|(_, r)| r.user_id == other)
        .map(|(k, r)| (k, strip(r)))
        .collect();
    let got =
        wait_for_every("the projection to equal the oracle with Redis down", Duration::from_secs(90), Duration::from_millis(300), || {
            let (api, token, expected) = (&api, &other_token, &expected);
            async move {
                let got: BTreeMap<String, RollupDay> = api
                    .all("/v1/rollups", token)
                    .await
                    .into_iter()
                    .map(|v| {
                        let r: RollupDay = serde_json::from_value(v).unwrap();
                        (rollup_day::output_key(&r.user_id, &r.metric, r.local_date.parse().unwrap()), strip(r))
                    })
                    .collect();
                (&got == expected).then_some(got)
            }
        })
        .await;
    assert!(!got.is_empty());
    for p in procs.iter_mut() {
        let exited = p.exited();
        assert!(exited.is_none(), "{:?} must keep running without Redis: {exited:?}", p.args);
    }

    // Redis is back: the same open socket gets envelopes for the next upload.
    redis.restart().await;
    let now = chrono::Utc::now();
    let body = json!({"request_id": "after-redis", "samples": [{"source": "watch", "source_kind": "watch", "source_record_id": "after-redis", "metric": "heart_rate",
        "start": (now - chrono::Duration::minutes(2)).to_rfc3339(), "end": (now - chrono::Duration::minutes(1)).to_rfc3339(), "value": 77, "unit": "count/min", "time_zone": "UTC"}]});
    // The gateway resubscribes with backoff: keep uploading (new ids) until an envelope arrives.
    let mut n = 0;
    let got = loop {
        n += 1;
        let mut b = body.clone();
        b["request_id"] = json!(format!("after-redis-{n}"));
        b["samples"][0]["source_record_id"] = json!(format!("after-redis-{n}"));
        let (s, _, out) = env.post("/v1/health/samples:batch", &user, &b).await;
        assert_eq!(s, 200, "{out}");
        match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => break serde_json::from_str::<Value>(&t).unwrap(),
            Ok(other) if !matches!(other, Some(Ok(_))) => panic!("socket ended: {other:?}"),
            _ => assert!(n < 30, "no envelope within 30 uploads after Redis came back"),
        }
    };
    assert_eq!(got["user_id"], user.as_str());
    procs.iter_mut().for_each(VitalsProc::kill9);
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
