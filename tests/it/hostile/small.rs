//! Item 9: the smaller ones.

use super::*;

/// A JSON object with the same key twice is refused, naming the key's path — also inside items —
/// and nothing is claimed or written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_duplicate_json_keys_are_refused() {
    let env = TestEnv::start().await;
    let user = "dup-user";
    let token = env.token(user);
    let now = Utc::now().to_rfc3339();
    let change = format!(
        r#"{{"change_id": "c1", "kind": "privacy_updated", "occurred_at": "{now}", "privacy": {{"health_upload_allowed": true, "blocked_metrics": []}}}}"#
    );
    let twice_request_id = format!(r#"{{"request_id": "a", "changes": [{change}], "request_id": "b"}}"#);
    let twice_in_item = format!(
        r#"{{"request_id": "c", "changes": [{change}, {{"change_id": "c2", "kind": "privacy_updated", "occurred_at": "{now}", "privacy": {{"health_upload_allowed": true, "health_upload_allowed": false}}}}]}}"#
    );
    for (body, field) in [(twice_request_id, "request_id"), (twice_in_item, "changes[1].privacy.health_upload_allowed")] {
        let (status, _, resp) = env.post_raw(CHANGES, Some(&token), body.into_bytes()).await;
        assert_eq!((status, code_field(&resp)), (400, ("duplicate_key".into(), Some(field.into()))), "{resp}");
    }
    assert_eq!(rows_of(&env.pool, user).await, (0, 0, 0), "nothing stored");
    assert_eq!(records_of(&env, user).await, 0, "nothing in Kafka");
    env.cleanup().await;
}

/// `Content-Type` must be `application/json` (parameters allowed), not a type that merely starts
/// with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_content_type_must_be_application_json() {
    let env = TestEnv::start().await;
    let user = "ct-user";
    let body = |id: &str| serde_json::to_vec(&json!({"request_id": id, "changes": [privacy_change("p", true, Utc::now())]})).unwrap();
    for ct in ["application/jsonfoo", "application/json-patch+json", "text/plain"] {
        let resp = env
            .http
            .post(format!("{}{CHANGES}", env.ingest_url))
            .bearer_auth(env.token(user))
            .header("content-type", ct)
            .body(body("ct-1"))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let resp: Value = resp.json().await.unwrap();
        assert_eq!((status, code_field(&resp).0.as_str()), (415, "unsupported_media_type"), "{ct}: {resp}");
    }
    assert_eq!(rows_of(&env.pool, user).await, (0, 0, 0), "nothing stored");
    assert_eq!(records_of(&env, user).await, 0, "nothing in Kafka");
    let resp = env
        .http
        .post(format!("{}{CHANGES}", env.ingest_url))
        .bearer_auth(env.token(user))
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(body("ct-2"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "parameters and case are fine");
    env.cleanup().await;
}

/// A `privacy_updated` dated in the future (beyond `ingest.max_change_future_skew_secs`) is
/// rejected (`timestamp_in_future` on `occurred_at`), so it cannot beat a later one dated now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_a_future_dated_privacy_change_cannot_win() {
    let env = TestEnv::start().await;
    let user = "future-user";
    let ahead = Utc::now() + chrono::Duration::minutes(9);
    let (status, _, resp) =
        env.post(CHANGES, user, &json!({"request_id": "p-future", "changes": [privacy_change("p1", false, ahead)]})).await;
    assert_eq!(status, 422, "a privacy change dated 9 minutes ahead: {resp}");
    assert_eq!(
        (resp["rejected"][0]["code"].as_str(), resp["rejected"][0]["field"].as_str()),
        (Some("timestamp_in_future"), Some("occurred_at")),
        "{resp}"
    );
    let (status, _, resp) =
        env.post(CHANGES, user, &json!({"request_id": "p-now", "changes": [privacy_change("p2", true, Utc::now())]})).await;
    assert_eq!(status, 200, "{resp}");
    let (status, _, resp) = env.post(SAMPLES, user, &json!({"request_id": "s-1", "samples": [hr("f1")]})).await;
    assert_eq!(status, 200, "the consent sent last (dated now) holds: {resp}");
    // Only the accepted change went to Kafka.
    let domain = env.read(&env.topics().domain).await;
    assert_eq!(domain.iter().filter(|m| key(m) == user).count(), 1);
    assert!(domain.iter().all(|m| m.payload().is_some()));
    env.cleanup().await;
}

/// `aud` may be an array (RFC 7519 §4.1.3): accepted when it holds our audience.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_aud_as_an_array_is_accepted_when_it_holds_the_audience() {
    let api = ApiEnv::start(&[]).await;
    let a = &api.cfg.auth;
    let exp = Utc::now().timestamp() + 3600;
    let token = |aud: Value| {
        let claims = json!({"sub": "aud-user", "iss": a.issuer, "aud": aud, "exp": exp});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(a.hs256_secret.expose().as_bytes()),
        )
        .unwrap()
    };
    let http = reqwest::Client::new();
    let get = |t: String| {
        let http = http.clone();
        let url = format!("{}/v1/freshness", api.url);
        async move {
            let r = http.get(url).bearer_auth(t).send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, body) = get(token(json!(["other", a.audience]))).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = get(token(json!(["other", "another"]))).await;
    assert_eq!((s, code_field(&body).0.as_str()), (401, "invalid_audience"), "{body}");
    api.cleanup().await;
}

/// A `vitals <role>` child whose stderr the test reads; killed when dropped.
struct Role(std::process::Child);

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn role(args: &[&str], env: &[(&str, String)]) -> Role {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vitals"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .env_remove("VITALS_AUTH__ALLOW_INSECURE_DEV_SECRET")
        .env_remove("VITALS_AUTH__HS256_SECRET")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting vitals");
    Role(child)
}

/// `vitals ingest` and `vitals api` refuse to start with the HS256 secret committed in
/// config/default.toml unless told so explicitly; with the opt-in, or their own secret, they run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_roles_refuse_the_committed_dev_secret_without_opt_in() {
    services_up();
    let (db_url, pool) = fresh_db().await;
    pool.close().await;
    let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for (role_name, listen_key) in [("ingest", "VITALS_INGEST__LISTEN"), ("api", "VITALS_API__LISTEN")] {
        let p = port();
        let base = vec![(listen_key, format!("127.0.0.1:{p}")), ("VITALS_POSTGRES__URL", db_url.clone())];
        let mut child = role(&[role_name], &base);
        let status = {
            let c = &mut child;
            wait_for(&format!("`vitals {role_name}` with the committed dev secret to exit"), Duration::from_secs(20), || {
                let r = c.0.try_wait().ok().flatten();
                async move { r }
            })
            .await
        };
        let mut stderr = String::new();
        use std::io::Read;
        child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert!(!status.success(), "{role_name} exited 0");
        assert!(stderr.contains("allow_insecure_dev_secret"), "{role_name}: the error names the opt-in: {stderr}");

        for extra in [
            ("VITALS_AUTH__ALLOW_INSECURE_DEV_SECRET", "true".to_owned()),
            ("VITALS_AUTH__HS256_SECRET", "a-secret-of-this-deployment-0123456789".to_owned()),
        ] {
            let p = port();
            let mut env = vec![(listen_key, format!("127.0.0.1:{p}")), ("VITALS_POSTGRES__URL", db_url.clone())];
            env.push(extra.clone());
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vitals"));
            cmd.arg(role_name)
                .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
                .env("RUST_LOG", "warn")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let mut running = Role(cmd.spawn().unwrap());
            let url = format!("http://127.0.0.1:{p}/healthz");
            wait_for(&format!("`vitals {role_name}` with {} to serve /healthz", extra.0), Duration::from_secs(30), || {
                let exited = running.0.try_wait().ok().flatten();
                assert!(exited.is_none(), "{role_name} with {} exited: {exited:?}", extra.0);
                let url = url.clone();
                async move { reqwest::get(url).await.ok().filter(|r| r.status().is_success()).map(drop) }
            })
            .await;
            running.0.kill().unwrap();
        }
    }
    drop_db(&db_url).await;
}
