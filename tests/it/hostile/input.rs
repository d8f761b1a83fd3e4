//! Item 7: client input is answered 4xx, never "503 retry later".

use super::*;

/// Each input is the client's fault: 400 with a stable code and the field, no `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_read_api_answers_bad_client_input_with_400_not_503() {
    let api = ApiEnv::start(&[]).await;
    let token = api.token("reader", 3600);
    let cursor = |k: &str, e: &str| b64(json!({"k": k, "e": e}).to_string().as_bytes());
    let cases: Vec<(String, &str, &str)> = vec![
        ("/v1/rollups?metric=steps%00".into(), "invalid_parameter", "metric"),
        ("/v1/rollups?metric=steps%1F".into(), "invalid_parameter", "metric"),
        ("/v1/sessions/%00".into(), "invalid_parameter", "id"),
        ("/v1/sessions/a%0Ab".into(), "invalid_parameter", "id"),
        (format!("/v1/rollups?cursor={}", cursor("2026-01-01\u{0}", "x")), "invalid_cursor", "cursor"),
        (format!("/v1/rollups?cursor={}", cursor("2026-01-01", "x\u{0}")), "invalid_cursor", "cursor"),
        (format!("/v1/sessions?cursor={}", cursor("\u{0}", "s")), "invalid_cursor", "cursor"),
        (format!("/v1/sleep?cursor={}", cursor("2026-01-01", "\u{0}")), "invalid_cursor", "cursor"),
        (format!("/v1/products?cursor={}", cursor("", "p\u{0}")), "invalid_cursor", "cursor"),
        ("/v1/rollups?from=-262143-01-01".into(), "invalid_parameter", "from"),
        ("/v1/rollups?to=%2B262142-12-31".into(), "invalid_parameter", "to"),
        ("/v1/sleep?from=-262143-01-01".into(), "invalid_parameter", "from"),
    ];
    let http = reqwest::Client::new();
    for (path, code, field) in cases {
        let resp = http.get(format!("{}{path}", api.url)).bearer_auth(&token).send().await.unwrap();
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").is_some();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!((status, code_field(&body)), (400, (code.to_owned(), Some(field.to_owned()))), "GET {path}: {body}");
        assert!(!retry_after, "GET {path}: a client error carries no Retry-After");
    }
    // A validly signed token whose `sub` holds NUL: 401, not a database error.
    let nul = api.token("user\u{0}x", 3600);
    let resp = http.get(format!("{}/v1/freshness", api.url)).bearer_auth(&nul).send().await.unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    assert_eq!((status, code_field(&body).0.as_str()), (401, "invalid_token"), "{body}");
    // The good path still works.
    let resp = http.get(format!("{}/v1/rollups?metric=steps&from=2026-01-01", api.url)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    api.cleanup().await;
}

/// At the edge, input holding NUL or control characters never reaches PostgreSQL where it would
/// fail the request store (a 503 the client would retry forever): each is a 4xx, and what is
/// stored is the answer, with the offending text escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_edge_never_turns_control_characters_into_503() {
    let env = TestEnv::start().await;
    let user = "nul-user";
    env.consent(user, &[]).await;
    let mut metric = hr("m1");
    metric["metric"] = json!("heart_rate\u{0}");
    let mut field = hr("m2");
    field["val\u{0}ue"] = json!(1);
    let mut meta_key = hr("m3");
    meta_key["time_zone"] = json!("Europe/\u{0}Berlin");
    for (i, item) in [metric, field, meta_key].into_iter().enumerate() {
        let body = json!({"request_id": format!("nul-{i}"), "samples": [item]});
        let (status, headers, resp) = env.post(SAMPLES, user, &body).await;
        assert_eq!(status, 422, "item {i}: {resp}");
        assert!(headers.get("retry-after").is_none());
        assert_eq!(resp["error"]["code"], "all_items_rejected", "{resp}");
    }
    let (status, _, resp) = env.post(SAMPLES, user, &json!({"request_id": "nul\u{0}id", "samples": [hr("x")]})).await;
    assert_eq!((status, code_field(&resp)), (400, ("invalid_request_id".into(), Some("request_id".into()))), "{resp}");
    let nul = env.token("edge\u{0}user");
    let (status, _, resp) =
        env.post_raw(SAMPLES, Some(&nul), serde_json::to_vec(&json!({"request_id": "t", "samples": [hr("x")]})).unwrap()).await;
    assert_eq!((status, code_field(&resp).0.as_str()), (401, "invalid_token"), "{resp}");
    // Nothing reached Kafka but the consent.
    assert_eq!(records_of(&env, user).await, 1);
    env.cleanup().await;
}
