//! The ingest edge against the real broker, registry and PostgreSQL.

use std::time::Duration;

use chrono::Utc;
use rdkafka::Message;
use serde_json::{json, Value};
use vitals_schemas::topics::partition_for;
use vitals_schemas::{ChangeBatch, DomainChangeBatch, Lane, SampleBatch};

use crate::harness::{header, key, wait_for, OwnBroker, TestEnv};

pub(crate) const SAMPLES: &str = "/v1/health/samples:batch";
const DELETIONS: &str = "/v1/health/deletions:batch";

fn iso_ago(mins: i64) -> String {
    (Utc::now() - chrono::Duration::minutes(mins)).to_rfc3339()
}

fn hr(id: &str, bpm: Value, unit: &str, start_ago_min: i64) -> Value {
    json!({"source": "com.apple.health.watch", "source_kind": "watch", "source_record_id": id, "metric": "heart_rate",
           "start": iso_ago(start_ago_min), "end": iso_ago(start_ago_min - 1), "value": bpm, "unit": unit, "time_zone": "Europe/Berlin"})
}

fn samples_body(request_id: &str, samples: Vec<Value>) -> Value {
    json!({"request_id": request_id, "samples": samples})
}

#[tokio::test]
async fn accepted_upload_lands_in_its_lane_keyed_by_user_and_decodes_via_the_registry() {
    let env = TestEnv::start().await;
    let user = "user-lanes";
    env.consent(user, &[]).await;
    let old_start = (Utc::now() - chrono::Duration::days(30)).to_rfc3339();
    let old_end = (Utc::now() - chrono::Duration::days(30) + chrono::Duration::minutes(10)).to_rfc3339();
    let mut edit = hr("edited", json!(72), "bpm", 30);
    edit["version"] = json!(2);
    let body = samples_body(
        "req-lanes",
        vec![
            hr("recent", json!(1.0), "count/s", 10), // HOT, normalised to 60 count/min
            json!({"source": "com.apple.health.iphone", "source_kind": "phone", "source_record_id": "steps-old", "metric": "steps",
               "start": old_start, "end": old_end, "value": 1200, "unit": "count", "time_zone": "+02:00"}), // COLD
            edit,                                    // CHANGE (an edit)
        ],
    );
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = env
        .http
        .post(format!("{}{SAMPLES}", env.ingest_url))
        .bearer_auth(env.token(user))
        .header("traceparent", traceparent)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let out: Value = resp.json().await.unwrap();
    assert_eq!(out["accepted"], 3, "{out}");
    assert_eq!(out["lanes"], json!({"hot": 1, "cold": 1, "change": 1}));

    let (s, _, out) = env
        .post(
            DELETIONS,
            user,
            &json!({"request_id": "req-del", "deletions": [
        {"source": "com.apple.health.watch", "source_record_id": "recent", "metric": "heart_rate"}]}),
        )
        .await;
    assert_eq!(s, 200, "{out}");

    let topics = env.topics();
    let codec = vitals::app::codec(&env.cfg);
    let partitions = env.cfg.kafka.partitions;
    let expected_partition = partition_for(user.as_bytes(), partitions);

    let hot = env.read(&topics.hot).await;
    assert_eq!(hot.len(), 1);
    let m = &hot[0];
    assert_eq!(key(m), user);
    assert_eq!(m.partition(), expected_partition, "murmur2 partition of the user id");
    let tp = header(m, "traceparent").expect("traceparent header");
    assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "continues the caller's trace: {tp}");
    assert_eq!(header(m, "vitals-request-id").as_deref(), Some("req-lanes"));
    let batch: SampleBatch = codec.decode(m.payload().unwrap()).await.unwrap();
    assert_eq!((batch.user_id.as_str(), batch.lane, batch.samples.len()), (user, Lane::Hot, 1));
    assert_eq!((batch.samples[0].value, batch.samples[0].unit.as_str()), (60.0, "count/min"));

    let cold = env.read(&topics.cold).await;
    assert_eq!(cold.len(), 1);
    assert_eq!(cold[0].partition(), expected_partition);
    let batch: SampleBatch = codec.decode(cold[0].payload().unwrap()).await.unwrap();
    assert_eq!((batch.lane, batch.samples[0].metric.as_str(), batch.samples[0].value), (Lane::Cold, "steps", 1200.0));

    let change = env.read(&topics.change).await;
    assert_eq!(change.len(), 2, "one edit record, one deletion record");
    for m in &change {
        assert_eq!((key(m), m.partition()), (user.to_owned(), expected_partition));
    }
    let edits: ChangeBatch = codec.decode(change[0].payload().unwrap()).await.unwrap();
    let dels: ChangeBatch = codec.decode(change[1].payload().unwrap()).await.unwrap();
    assert_eq!((edits.edits.len(), edits.edits[0].version), (1, 2));
    assert_eq!((dels.deletions.len(), dels.deletions[0].source_record_id.as_str()), (1, "recent"));

    let domain = env.read(&topics.domain).await;
    assert_eq!(domain.len(), 1);
    assert_eq!(domain[0].partition(), expected_partition, "domain changes are co-partitioned with samples");
    let d: DomainChangeBatch = codec.decode(domain[0].payload().unwrap()).await.unwrap();
    assert!(d.changes[0].privacy.as_ref().unwrap().health_upload_allowed);

    // The edge remembers how far it has accepted the user's data (for freshness).
    let offsets: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT topic, partition, last_offset FROM ingest_user_offsets WHERE user_id = $1 ORDER BY topic")
            .bind(user)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(offsets.len(), 4, "{offsets:?}");
    assert!(offsets.iter().all(|(_, p, _)| *p == expected_partition));
    env.cleanup().await;
}

#[tokio::test]
async fn duplicate_requests_are_idempotent() {
    let env = TestEnv::start().await;
    let user = "user-idem";
    env.consent(user, &[]).await;
    let body = samples_body("req-1", vec![hr("a", json!(61), "bpm", 5), hr("b", json!(62), "bpm", 6)]);
    let (s1, h1, r1) = env.post(SAMPLES, user, &body).await;
    assert_eq!(s1, 200, "{r1}");
    assert!(h1.get("idempotent-replay").is_none());
    // Same id, same payload with a number spelled differently (61 vs 61.0): the original answer,
    // nothing new written.
    let text = serde_json::to_string(&body).unwrap();
    assert!(text.contains("\"value\":61}"));
    let respelled: Value = serde_json::from_str(&text.replace("\"value\":61}", "\"value\":61.0}")).unwrap();
    assert_ne!(serde_json::to_string(&respelled).unwrap(), text, "a different spelling of the same payload");
    let (s2, h2, r2) = env.post(SAMPLES, user, &respelled).await;
    assert_eq!((s2, &r2), (200, &r1));
    assert_eq!(h2.get("idempotent-replay").unwrap(), "true");
    assert_eq!(env.read(&env.topics().hot).await.len(), 1, "the replay wrote nothing");

    // Same id, different payload: 422.
    let other = samples_body("req-1", vec![hr("a", json!(99), "bpm", 5)]);
    let (s3, _, r3) = env.post(SAMPLES, user, &other).await;
    assert_eq!((s3, r3["error"]["code"].as_str()), (422, Some("idempotency_key_reused")));

    // Another user may use the same request id: ids are per user.
    env.consent("user-idem-2", &[]).await;
    let (s4, _, _) = env.post(SAMPLES, "user-idem-2", &body).await;
    assert_eq!(s4, 200);

    // A retry while the original is in flight: 409. (The in-flight claim is made the way the edge
    // makes it, with the payload's canonical hash.)
    let inflight = samples_body("req-inflight", vec![hr("c", json!(63), "bpm", 5)]);
    let hash = vitals_schemas::hash::payload_hash(&inflight);
    let claim = vitals_ingest::store::claim(&env.pool, user, "req-inflight", "samples", &hash, Duration::from_secs(60)).await.unwrap();
    assert_eq!(claim.begin, vitals_ingest::store::Begin::Proceed);
    assert_eq!(claim.privacy.map(|p| p.health_upload_allowed), Some(true), "the claim reads the user's privacy settings too");
    let (s5, _, r5) = env.post(SAMPLES, user, &inflight).await;
    assert_eq!((s5, r5["error"]["code"].as_str()), (409, Some("request_in_flight")));
    // Once the claim's lease has expired (a crashed edge), a retry takes the request over.
    sqlx::query("UPDATE ingest_requests SET lease_until = now() - interval '1 second' WHERE request_id = 'req-inflight'")
        .execute(&env.pool)
        .await
        .unwrap();
    let (s6, _, _) = env.post(SAMPLES, user, &inflight).await;
    assert_eq!(s6, 200);

    // Refused for want of consent (the claim and the privacy read are one statement): the id is
    // not left claimed, so the same request succeeds once consent is given.
    let late = "user-idem-late-consent";
    let (s7, _, r7) = env.post(SAMPLES, late, &body).await;
    assert_eq!((s7, r7["error"]["code"].as_str()), (403, Some("health_upload_not_allowed")));
    env.consent(late, &[]).await;
    let (s8, h8, r8) = env.post(SAMPLES, late, &body).await;
    assert_eq!(s8, 200, "{r8}");
    assert!(h8.get("idempotent-replay").is_none());
    env.cleanup().await;
}

/// Idempotency under concurrency: the claim is one statement reading its own snapshot, so two
/// attempts that start together must still not both proceed. Concurrent claims of one id at the
/// store, then concurrent identical uploads at the edge: one attempt per id proceeds, the others
/// are told it is in flight (409) or get its answer again, and the lane holds each upload once.
#[tokio::test]
async fn concurrent_attempts_of_one_request_id_proceed_exactly_once() {
    let env = TestEnv::start().await;
    let user = "user-idem-race";
    env.consent(user, &[]).await;

    // 16 claims of one id at once.
    let race = |id: &str, hash: &str| {
        futures::future::join_all((0..16).map(|_| {
            let (pool, id, hash) = (env.pool.clone(), id.to_owned(), hash.to_owned());
            async move { vitals_ingest::store::claim(&pool, user, &id, "samples", &hash, Duration::from_secs(60)).await.unwrap().begin }
        }))
    };
    // The store: 20 ids.
    for round in 0..20 {
        let id = format!("race-claim-{round}");
        let hash = vitals_schemas::hash::payload_hash(&samples_body(&id, vec![]));
        let claims = race(&id, &hash).await;
        let proceeded = claims.iter().filter(|b| **b == vitals_ingest::store::Begin::Proceed).count();
        assert_eq!(proceeded, 1, "round {round}: exactly one of 16 concurrent claims proceeds: {claims:?}");
        assert!(
            claims.iter().all(|b| matches!(b, vitals_ingest::store::Begin::Proceed | vitals_ingest::store::Begin::InFlight)),
            "round {round}: {claims:?}"
        );
        // The attempt that proceeded crashed: once its lease has expired, 16 retries race to
        // take the request over, and again exactly one does.
        sqlx::query("UPDATE ingest_requests SET lease_until = now() - interval '1 second' WHERE user_id = $1 AND request_id = $2")
            .bind(user)
            .bind(&id)
            .execute(&env.pool)
            .await
            .unwrap();
        let takeovers = race(&id, &hash).await;
        let took = takeovers.iter().filter(|b| **b == vitals_ingest::store::Begin::Proceed).count();
        assert_eq!(took, 1, "round {round}: exactly one of 16 concurrent retries takes an expired claim over: {takeovers:?}");
    }

    // The edge: the same upload sent 6 times at once (under the per-user limit), 10 uploads.
    let uploads = 10;
    for round in 0..uploads {
        let body = samples_body(&format!("race-upload-{round}"), vec![hr(&format!("r{round}"), json!(60 + round), "bpm", 5)]);
        let answers = futures::future::join_all((0..6).map(|_| env.post(SAMPLES, user, &body))).await;
        let ok: Vec<&Value> = answers.iter().filter(|(s, _, _)| *s == 200).map(|(_, _, b)| b).collect();
        assert!(!ok.is_empty(), "round {round}: one attempt succeeds: {answers:?}");
        assert!(ok.windows(2).all(|w| w[0] == w[1]), "round {round}: every success is the same answer: {ok:?}");
        for (status, _, b) in &answers {
            assert!(*status == 200 || (*status == 409 && b["error"]["code"] == "request_in_flight"), "round {round}: {status} {b}");
        }
        // A retry after the race gets the one answer again, marked as a replay.
        let (s, h, again) = env.post(SAMPLES, user, &body).await;
        assert_eq!((s, &again), (200, ok[0]), "round {round}");
        assert_eq!(h.get("idempotent-replay").map(|v| v.to_str().unwrap()), Some("true"), "round {round}");
    }
    let mut ids: Vec<String> =
        env.read(&env.topics().hot).await.iter().filter(|m| key(m) == user).filter_map(|m| header(m, "vitals-request-id")).collect();
    ids.sort_unstable();
    let mut want: Vec<String> = (0..uploads).map(|r| format!("race-upload-{r}")).collect();
    want.sort_unstable();
    assert_eq!(ids, want, "each upload in the lane exactly once");
    env.cleanup().await;
}

#[tokio::test]
async fn every_bad_input_gets_its_4xx_and_writes_nothing() {
    let env = TestEnv::start().await;
    let user = "user-bad";
    env.consent(user, &["blood_glucose"]).await;
    let secret = env.cfg.auth.hs256_secret.expose().as_bytes().to_vec();
    let (iss, aud) = (env.cfg.auth.issuer.clone(), env.cfg.auth.audience.clone());
    let now = Utc::now().timestamp() as u64;
    let token_with = |exp: u64, key: &[u8]| {
        let claims = json!({"sub": user, "iss": iss, "aud": aud, "exp": exp});
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(key)).unwrap()
    };
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let good = serde_json::to_vec(&samples_body("r", vec![hr("ok", json!(60), "bpm", 5)])).unwrap();
    let valid = env.token(user);

    let one = |s: Value| serde_json::to_vec(&samples_body(&uuid::Uuid::new_v4().to_string(), vec![s])).unwrap();
    let with = |field: &str, v: Value| {
        let mut s = hr("x", json!(60), "bpm", 5);
        s[field] = v;
        one(s)
    };
    // JSON has no NaN or Infinity: a client that writes them sends a body that is not JSON.
    let non_json = |literal: &str| {
        let body = String::from_utf8(with("value", json!(12345))).unwrap();
        assert!(body.contains("\"value\":12345"));
        body.replace("\"value\":12345", &format!("\"value\":{literal}")).into_bytes()
    };
    let mut end_before_start = hr("x", json!(60), "bpm", 5);
    end_before_start["end"] = json!(iso_ago(30));
    let future = Utc::now() + chrono::Duration::days(2);
    let mut far_future = hr("x", json!(60), "bpm", 5);
    far_future["start"] = json!(future.to_rfc3339());
    far_future["end"] = json!(future.to_rfc3339());
    let glucose = json!({"source": "meter", "source_record_id": "g1", "metric": "blood_glucose", "start": iso_ago(5),
                         "value": 5.5, "unit": "mmol/L", "time_zone": "UTC"});
    let too_many =
        serde_json::to_vec(&samples_body("many", (0..2001).map(|i| hr(&format!("m{i}"), json!(60), "bpm", 5)).collect())).unwrap();
    let oversize =
        serde_json::to_vec(&json!({"request_id": "big", "samples": [hr("x", json!(60), "bpm", 5)], "pad": "x".repeat(3 * 1024 * 1024)}))
            .unwrap();
    let alg_none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&format!(r#"{{"sub":"{user}","iss":"vitals-dev","aud":"vitals","exp":{}}}"#, now + 3600))
    );

    /// (case, token, body, status, code, field)
    type Case<'a> = (&'a str, Option<String>, Vec<u8>, u16, &'a str, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("malformed JSON", Some(valid.clone()), b"{\"request_id\": \"r\", \"samples\": [".to_vec(), 400, "malformed_json", None),
        ("unknown metric", Some(valid.clone()), with("metric", json!("heart_rhythm")), 422, "all_items_rejected", Some("metric")),
        ("unconvertible unit", Some(valid.clone()), with("unit", json!("kg")), 422, "all_items_rejected", Some("unit")),
        ("NaN", Some(valid.clone()), non_json("NaN"), 400, "malformed_json", None),
        ("infinity", Some(valid.clone()), non_json("1e999"), 400, "malformed_json", None),
        ("value as string", Some(valid.clone()), with("value", json!("sixty")), 422, "all_items_rejected", Some("value")),
        ("out of range", Some(valid.clone()), with("value", json!(900)), 422, "all_items_rejected", Some("value")),
        ("end before start", Some(valid.clone()), one(end_before_start), 422, "all_items_rejected", Some("end")),
        ("far-future timestamp", Some(valid.clone()), one(far_future), 422, "all_items_rejected", Some("start")),
        ("blocked metric", Some(valid.clone()), one(glucose), 422, "all_items_rejected", Some("metric")),
        ("oversize body", Some(valid.clone()), oversize, 413, "body_too_large", None),
        ("too many samples", Some(valid.clone()), too_many, 422, "too_many_items", Some("samples")),
        (
            "another user's id",
            Some(valid.clone()),
            serde_json::to_vec(&json!({"request_id": "r", "user_id": "someone-else", "samples": [hr("x", json!(60), "bpm", 5)]})).unwrap(),
            403,
            "forbidden_user",
            Some("user_id"),
        ),
        ("missing token", None, good.clone(), 401, "missing_token", None),
        ("expired token", Some(token_with(now - 3600, &secret)), good.clone(), 401, "token_expired", None),
        ("forged token", Some(token_with(now + 3600, b"not-the-secret-not-the-secret-123")), good.clone(), 401, "invalid_signature", None),
        ("alg none", Some(alg_none), good.clone(), 401, "algorithm_not_allowed", None),
    ];
    for (name, token, body, status, code, field) in cases {
        let (s, h, r) = env.post_raw(SAMPLES, token.as_deref(), body).await;
        assert_eq!(s, status, "{name}: {r}");
        assert_eq!(r["error"]["code"].as_str(), Some(code), "{name}: {r}");
        if let Some(f) = field {
            let got = r["error"]["field"].as_str().or_else(|| r["rejected"][0]["field"].as_str());
            assert_eq!(got, Some(f), "{name}: {r}");
        }
        if s == 401 {
            assert!(h.get("www-authenticate").is_some(), "{name}");
        }
    }
    // No consent at all: refused as a whole, for a user who never sent privacy settings.
    let (s, _, r) = env.post(SAMPLES, "user-without-consent", &samples_body("nc", vec![hr("x", json!(60), "bpm", 5)])).await;
    assert_eq!((s, r["error"]["code"].as_str()), (403, Some("health_upload_not_allowed")));

    // Nothing reached any lane; the domain lane holds only the consent.
    let t = env.topics();
    for lane in [&t.hot, &t.cold, &t.change] {
        assert!(env.read(lane).await.is_empty(), "{lane} must be empty");
    }
    assert_eq!(env.read(&t.domain).await.len(), 1);
    // And none of these requests left an idempotency record that would block a corrected retry.
    let stored: (i64,) =
        sqlx::query_as("SELECT count(*) FROM ingest_requests WHERE state = 'in_flight'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(stored.0, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn partial_batches_accept_the_valid_items_and_name_the_rest() {
    let env = TestEnv::start().await;
    let user = "user-partial";
    env.consent(user, &[]).await;
    let mut bad = hr("bad", json!(60), "bpm", 5);
    bad["unit"] = json!("furlongs");
    let (s, _, r) = env.post(SAMPLES, user, &samples_body("p1", vec![hr("good", json!(60), "bpm", 5), bad])).await;
    assert_eq!(s, 207, "{r}");
    assert_eq!(r["accepted"], 1);
    assert_eq!(
        r["rejected"],
        json!([{"index": 1, "field": "unit", "code": "unconvertible_unit",
        "message": "unit `furlongs` is not accepted for metric `heart_rate` (accepted: bpm, count/min, count/s)"}])
    );
    let hot = env.read(&env.topics().hot).await;
    let batch: SampleBatch = vitals::app::codec(&env.cfg).decode(hot[0].payload().unwrap()).await.unwrap();
    assert_eq!(batch.samples.iter().map(|s| s.source_record_id.as_str()).collect::<Vec<_>>(), ["good"]);
    env.cleanup().await;
}

#[tokio::test]
async fn health_metrics_and_openapi_endpoints() {
    let env = TestEnv::start().await;
    let get = |p: &str| env.http.get(format!("{}{p}", env.ingest_url)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap(), json!({"broker": true, "schema_registry": true, "postgres": true}));
    env.consent("user-metrics", &[]).await;
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(metrics.contains("vitals_ingest_requests_total{endpoint=\"domain_changes\",status=\"200\"} 1"), "{metrics}");
    assert!(!metrics.contains("user-metrics"), "user ids are never metric labels");
    let doc: Value = get("/openapi.json").await.unwrap().json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in ["/v1/health/samples:batch", "/v1/health/deletions:batch", "/v1/domain-changes:batch", "/healthz", "/readyz", "/metrics"] {
        assert!(doc["paths"].get(p).is_some(), "OpenAPI documents {p}");
    }
    env.cleanup().await;
}

/// Stops the broker mid-test: uploads get 503 + Retry-After, never a 2xx for data not in Kafka;
/// after a restart every acknowledged upload is there, and the retried one lands too.
#[tokio::test]
async fn broker_down_means_503_with_retry_after_and_no_false_ack() {
    let mut broker = OwnBroker::start().await;
    let env = TestEnv::start_with(&broker.addr(), &[("VITALS_KAFKA__PRODUCE_TIMEOUT_MS", "3000")]).await;
    let user = "user-outage";
    env.consent(user, &[]).await;
    let mut acked = vec![];
    for i in 0..3 {
        let id = format!("before-{i}");
        let (s, _, r) = env.post(SAMPLES, user, &samples_body(&id, vec![hr(&id, json!(60 + i), "bpm", 5)])).await;
        assert_eq!(s, 200, "{r}");
        acked.push(id);
    }

    broker.kill();
    let down = samples_body("during-outage", vec![hr("during", json!(70), "bpm", 5)]);
    let t0 = std::time::Instant::now();
    let (s, h, r) = env.post(SAMPLES, user, &down).await;
    assert_eq!(s, 503, "{r}");
    assert_eq!(r["error"]["code"], "broker_unavailable");
    assert!(h.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()).is_some(), "Retry-After");
    assert!(t0.elapsed() < Duration::from_secs(20), "503 within the produce timeout bound, took {:?}", t0.elapsed());
    let ready = env.http.get(format!("{}/readyz", env.ingest_url)).send().await.unwrap();
    assert_eq!(ready.status(), 503);

    broker.restart().await;
    // The client retries with the same request id once the broker is back.
    let (s, _, r) = wait_for("the retried upload to be accepted", Duration::from_secs(60), || {
        let env = &env;
        let down = down.clone();
        async move {
            let r = env.post(SAMPLES, user, &down).await;
            (r.0 != 503).then_some(r)
        }
    })
    .await;
    assert_eq!(s, 200, "{r}");
    acked.push("during-outage".into());

    let codec = vitals::app::codec(&env.cfg);
    let mut present = std::collections::BTreeSet::new();
    for m in env.read(&env.topics().hot).await {
        let b: SampleBatch = codec.decode(m.payload().unwrap()).await.unwrap();
        present.insert(b.request_id);
    }
    for id in &acked {
        assert!(present.contains(id), "acknowledged request {id} is in Kafka (found {present:?})");
    }
    env.cleanup().await;
    broker.kill();
}
