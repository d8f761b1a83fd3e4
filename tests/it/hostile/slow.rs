//! Item 6: slow clients cannot hold what other users need.

use super::*;

/// Nine connections of three users trickle their bodies (more than the per-user limit, more than
/// the edge's `max_in_flight`): another user's upload is still answered 2xx, promptly; each
/// trickling user gets its extra connection refused with 429; nothing of theirs is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_slow_bodies_do_not_deny_service_to_other_users() {
    let env = TestEnv::start_with(
        KAFKA,
        &[
            ("VITALS_INGEST__MAX_IN_FLIGHT", "4"),
            ("VITALS_INGEST__MAX_IN_FLIGHT_PER_USER", "2"),
            ("VITALS_INGEST__BODY_TIMEOUT_MS", "30000"),
        ],
    )
    .await;
    let victim = "victim";
    env.consent(victim, &[]).await;
    let attackers = ["slow-a", "slow-b", "slow-c"];
    let (answers_tx, mut answers_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Option<(u16, String)>)>();
    let mut held = Vec::new();
    for a in attackers {
        let token = env.token(a);
        for _ in 0..3 {
            let mut s = slow_upload(&env.ingest_url, &token).await;
            let tx = answers_tx.clone();
            let user = a.to_owned();
            held.push(tokio::spawn(async move {
                let r = read_status(&mut s).await;
                let _ = tx.send((user, r));
                // Keep the connection open (the attacker never finishes its body).
                let mut rest = [0u8; 64];
                let _ = s.read(&mut rest).await;
            }));
        }
    }
    // Every attacking connection has reached the edge: it was answered, or it is held (its body
    // being read, or — on an edge that takes its permit first — counted in flight).
    let metrics_url = format!("{}/metrics", env.ingest_url);
    let mut answers: Vec<(String, Option<(u16, String)>)> = Vec::new();
    wait_for("all 9 slow connections to be answered or held by the edge", Duration::from_secs(15), || {
        while let Ok(a) = answers_rx.try_recv() {
            answers.push(a);
        }
        let answered = answers.len() as i64;
        let http = env.http.clone();
        let url = metrics_url.clone();
        async move {
            let text = http.get(url).send().await.ok()?.text().await.ok()?;
            let held = gauge(&text, "vitals_ingest_in_flight_requests") + gauge(&text, "vitals_ingest_body_reads_in_progress");
            (answered + held >= 9).then_some(())
        }
    })
    .await;

    // The victim's upload goes through while all of that is held, within a bound.
    let started = std::time::Instant::now();
    let body = json!({"request_id": "victim-1", "samples": [hr("v1")]});
    let (status, _, resp) = tokio::time::timeout(Duration::from_secs(10), env.post(SAMPLES, victim, &body))
        .await
        .expect("the victim's upload was not answered within 10 s");
    assert_eq!(status, 200, "another user's upload while slow bodies are held: {resp}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // Each attacker: two connections held, the third refused with 429.
    wait_for("one 429 per attacking user", Duration::from_secs(10), || {
        while let Ok(a) = answers_rx.try_recv() {
            answers.push(a);
        }
        let n = answers.len();
        async move { (n >= 3).then_some(()) }
    })
    .await;
    for (user, answer) in &answers {
        let (status, body) = answer.clone().unwrap_or_else(|| panic!("{user}: connection closed without an answer"));
        let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert_eq!((status, code_field(&body).0.as_str()), (429, "too_many_concurrent_requests"), "{user}: {body}");
    }
    for a in attackers {
        assert_eq!(answers.iter().filter(|(u, _)| u == a).count(), 1, "exactly one refusal for {a}: {answers:?}");
    }
    for h in &held {
        h.abort();
    }
    for a in attackers {
        assert_eq!(rows_of(&env.pool, a).await, (0, 0, 0), "{a}: nothing stored");
        assert_eq!(records_of(&env, a).await, 0, "{a}: nothing in Kafka");
    }
    env.cleanup().await;
}

/// A body that does not arrive in full within `ingest.body_timeout_ms` is answered 408
/// `request_timeout`; nothing is written and the user's slot is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_a_body_slower_than_the_body_timeout_gets_408() {
    let env =
        TestEnv::start_with(KAFKA, &[("VITALS_INGEST__BODY_TIMEOUT_MS", "1000"), ("VITALS_INGEST__MAX_IN_FLIGHT_PER_USER", "1")]).await;
    let user = "slow-body";
    env.consent(user, &[]).await;
    let mut s = slow_upload(&env.ingest_url, &env.token(user)).await;
    let answer =
        tokio::time::timeout(Duration::from_secs(10), read_status(&mut s)).await.expect("no answer to a trickling body within 10 s");
    let (status, body) = answer.expect("the edge closed the connection without an answer");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, code_field(&body).0.as_str()), (408, "request_timeout"), "{body}");
    // The slot is released: the same user's next upload goes through.
    let (status, _, resp) = env.post(SAMPLES, user, &json!({"request_id": "after-timeout", "samples": [hr("t1")]})).await;
    assert_eq!(status, 200, "{resp}");
    let (requests, _, _) = rows_of(&env.pool, user).await;
    assert_eq!(requests, 2, "the consent and the upload after the timeout; the timed-out one left nothing");
    env.cleanup().await;
}

/// A header that does not arrive within `ingest.header_timeout_ms` ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_a_header_slower_than_the_header_timeout_closes_the_connection() {
    let env = TestEnv::start_with(KAFKA, &[("VITALS_INGEST__HEADER_TIMEOUT_MS", "1000")]).await;
    let addr = env.ingest_url.trim_start_matches("http://").to_owned();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(format!("POST {SAMPLES} HTTP/1.1\r\nHost: {addr}\r\n").as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a connection whose header never completes is still open after 10 s");
    env.cleanup().await;
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_connect(base: &str, token: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let url = format!("{}/v1/realtime?token={token}", base.replace("http://", "ws://"));
    tokio_tungstenite::connect_async(url).await.map(|(ws, _)| ws)
}

/// One user may hold `api.max_connections_per_user` WebSocket connections; the next is refused
/// with 429 `too_many_connections`, while another user still connects. Closing one frees a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_websocket_connections_per_user_are_limited() {
    let api = ApiEnv::start(&[("VITALS_API__MAX_CONNECTIONS_PER_USER", "2")]).await;
    let token = api.token("ws-user", 3600);
    let mut first = ws_connect(&api.url, &token).await.expect("first connection");
    let _second = ws_connect(&api.url, &token).await.expect("second connection");
    match ws_connect(&api.url, &token).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap_or(Value::Null);
            assert_eq!((resp.status().as_u16(), code_field(&body).0.as_str()), (429, "too_many_connections"), "{body}");
        }
        Err(e) => panic!("third connection: unexpected error {e}"),
        Ok(_) => panic!("a third WebSocket connection of one user was accepted (limit 2)"),
    }
    ws_connect(&api.url, &api.token("ws-other", 3600)).await.expect("another user is not limited by this one");
    first.close(None).await.unwrap();
    wait_for("a slot to be free after a close", Duration::from_secs(10), || {
        let (url, token) = (api.url.clone(), token.clone());
        async move { ws_connect(&url, &token).await.ok().map(drop) }
    })
    .await;
    api.cleanup().await;
}

/// A WebSocket is closed, with a close frame saying why, when its token expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_websocket_is_closed_when_its_token_expires() {
    let api = ApiEnv::start(&[("VITALS_AUTH__LEEWAY_SECS", "0")]).await;
    let mut ws = ws_connect(&api.url, &api.token("ws-expiring", 2)).await.expect("connect with a token valid for 2 s");
    let frame = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => return f,
                Some(Ok(_)) => {}
                other => panic!("socket ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("the socket is still open 10 s after a 2 s token expired");
    let frame = frame.expect("a close frame with a code and reason");
    assert_eq!(u16::from(frame.code), 4001, "{frame:?}");
    assert!(frame.reason.contains("expired"), "{frame:?}");
    api.cleanup().await;
}
