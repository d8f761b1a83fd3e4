//! A processor's projection reaches the read API through its descriptor alone: the fifth
//! processor (`readiness_baseline`, one file and one registry line) from upload to
//! `GET /v1/projections/readiness_baseline`, every component a real process on the real broker,
//! registry and PostgreSQL. Its table is created by the sink; its rows equal the oracle; its
//! freshness, ETag, cursors, scoping and typed errors are the generic endpoint's.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use vitals::simulate;
use vitals_processors::readiness_baseline::{self, ReadinessBaseline};
use vitals_processors::Input;
use vitals_schemas::{ChangeBatch, SampleBatch};

use crate::harness::{wait_for, wait_for_every, TestEnv, VitalsProc};

async fn get(http: &reqwest::Client, url: &str, token: &str) -> (u16, Value) {
    let resp = http.get(url).bearer_auth(token).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn strip(mut r: ReadinessBaseline) -> ReadinessBaseline {
    r.version_epoch = 0;
    r.version_seq = 0;
    r.source_offsets.clear();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifth_processor_reaches_the_read_api_through_its_descriptor() {
    let env = TestEnv::start().await;
    let codec = vitals::app::codec(&env.cfg);
    let data = std::env::temp_dir().join(format!("vitals-proj-{}", uuid::Uuid::new_v4().simple()));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut api_env = env.child_env(&data);
    api_env.push(("VITALS_API__LISTEN".into(), format!("127.0.0.1:{port}")));
    let mut api = VitalsProc::new(&["api"], api_env);
    api.start();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_for("the API to listen", Duration::from_secs(30), || async { http.get(format!("{base}/healthz")).send().await.ok().map(|_| ()) })
        .await;

    // Nine days of one user: resting heart rate daily, HRV nightly — baselines of several days.
    let sim = env.sim("proj", 5, 1, 9);
    let user = simulate::user_id(&sim, 0);
    assert_eq!(simulate::run(&sim, &env.http).await.unwrap().rejected, 0);
    let token = env.token(&user);
    let list = format!("{base}/v1/projections/readiness_baseline");

    // Before the sink has created its table: an empty page that says it is pending.
    let (s, body) = get(&http, &list, &token).await;
    assert_eq!((s, body["freshness"]["state"].as_str()), (200, Some("pending")), "{body}");

    let mut processor = VitalsProc::new(&["process", "readiness_baseline"], env.child_env(&data));
    processor.start();
    let mut sink = VitalsProc::new(&["sink"], env.child_env(&data));
    sink.start();
    wait_for_every("the baselines to be fresh", Duration::from_secs(120), Duration::from_millis(200), || async {
        let (s, body) = get(&http, &list, &token).await;
        (s == 200 && body["freshness"]["state"] == "fresh").then_some(())
    })
    .await;

    // Every page, following the cursor, equals the oracle over what the edge accepted.
    let t = env.topics();
    let mut inputs = Vec::new();
    for topic in [&t.hot, &t.cold] {
        for m in env.read(topic).await {
            inputs.push(Input::Samples(codec.decode::<SampleBatch>(rdkafka::Message::payload(&m).unwrap()).await.unwrap()));
        }
    }
    for m in env.read(&t.change).await {
        inputs.push(Input::Changes(codec.decode::<ChangeBatch>(rdkafka::Message::payload(&m).unwrap()).await.unwrap()));
    }
    let expected: BTreeMap<String, ReadinessBaseline> =
        readiness_baseline::oracle(&inputs).into_iter().filter(|(_, r)| r.user_id == user).map(|(k, r)| (k, strip(r))).collect();
    assert!(expected.len() >= 12, "nine days of two metrics: {} rows", expected.len());
    assert!(expected.values().any(|r| r.z.is_some()), "some day has a full baseline: the test exercises it");
    let mut got = BTreeMap::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let url = match &cursor {
            Some(c) => format!("{list}?limit=5&cursor={c}"),
            None => format!("{list}?limit=5"),
        };
        let (s, body) = get(&http, &url, &token).await;
        assert_eq!(s, 200, "{body}");
        pages += 1;
        for v in body["data"].as_array().unwrap() {
            let r: ReadinessBaseline = serde_json::from_value(v.clone()).unwrap();
            got.insert(readiness_baseline::output_key(&r.user_id, &r.metric, r.local_date.parse().unwrap()), strip(r));
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert!(pages >= 3, "paged: {pages}");
    assert_eq!(got, expected);

    // Filtered by metric and a date range; one row by its key; ETag; scoping; typed errors.
    let (first_key, first) = expected.iter().find(|(_, r)| r.metric == "hrv_sdnn").unwrap();
    let (s, body) = get(&http, &format!("{list}?metric=hrv_sdnn&from={d}&to={d}", d = first.local_date), &token).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 1, "{body}");
    let key = first_key.strip_prefix(&format!("{user}|")).unwrap();
    let one = http.get(format!("{list}/{}", key.replace('|', "%7C"))).bearer_auth(&token).send().await.unwrap();
    let tag = one.headers().get("etag").unwrap().to_str().unwrap().to_owned();
    let body: Value = one.json().await.unwrap();
    assert_eq!(strip(serde_json::from_value(body["data"].clone()).unwrap()), first.clone());
    assert_eq!(body["freshness"]["state"], "fresh");
    let again =
        http.get(format!("{list}/{}", key.replace('|', "%7C"))).bearer_auth(&token).header("If-None-Match", &tag).send().await.unwrap();
    assert_eq!(again.status().as_u16(), 304);
    let (s, body) = get(&http, &list, &env.token("someone-else")).await;
    assert_eq!((s, body["data"].as_array().map(Vec::len)), (200, Some(0)), "another user sees none of it: {body}");
    let (s, body) = get(&http, &format!("{base}/v1/projections/nope"), &token).await;
    assert_eq!(
        (s, body["error"]["code"].as_str(), body["error"]["field"].as_str()),
        (404, Some("unknown_projection"), Some("name")),
        "{body}"
    );
    let (s, body) = get(&http, &format!("{list}?from=yesterday"), &token).await;
    assert_eq!((s, body["error"]["field"].as_str()), (400, Some("from")), "{body}");
    let (s, body) = get(&http, &format!("{base}/v1/projections/product_impact?from=2026-01-01"), &token).await;
    assert_eq!((s, body["error"]["field"].as_str()), (400, Some("from")), "key-ordered: no range: {body}");

    // Discoverable: listed with its derived schema, in the OpenAPI document, in /v1/freshness.
    let (s, body) = get(&http, &format!("{base}/v1/projections"), &token).await;
    assert_eq!(s, 200);
    let listed =
        body["data"].as_array().unwrap().iter().find(|p| p["name"] == "readiness_baseline").cloned().unwrap_or_else(|| panic!("{body}"));
    assert_eq!(listed["schema"]["name"], "ReadinessBaseline");
    let doc: Value = http.get(format!("{base}/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert!(
        doc["components"]["schemas"]["projection.readiness_baseline"]["properties"]["z"].is_object(),
        "{}",
        doc["components"]["schemas"]
    );
    assert!(doc["components"]["parameters"]["ProjectionName"]["schema"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n == "readiness_baseline"));
    let (_, body) = get(&http, &format!("{base}/v1/freshness"), &token).await;
    assert_eq!(body["freshness"]["readiness_baseline"]["state"], "fresh", "{body}");
    drop((processor, sink, api));
}
