//! Key rotation at the identity provider: a JWKS fetched from a URL is fetched again when a token
//! names a `kid` it lacks (rate-limited), so a rotation costs a token at most one 401, not 401s
//! until every pod restarts.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use crate::harness::{root, wait_for, ApiEnv};

/// A fresh RSA key pair: (private key PEM, its JWK with `kid`).
fn rsa_key(kid: &str) -> (Vec<u8>, Value) {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("jwks-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key.pem");
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl genpkey: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("openssl").args(["rsa", "-noout", "-modulus", "-in"]).arg(&key).output().unwrap();
    assert!(out.status.success(), "openssl rsa: {}", String::from_utf8_lossy(&out.stderr));
    let hex_modulus = String::from_utf8(out.stdout).unwrap().trim().trim_start_matches("Modulus=").to_owned();
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hex::decode(hex_modulus).unwrap());
    (std::fs::read(&key).unwrap(), json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": n, "e": "AQAB"}))
}

fn rs256_token(pem: &[u8], kid: &str, user: &str, env: &ApiEnv) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let exp = chrono::Utc::now().timestamp() as u64 + 600;
    let claims = json!({"sub": user, "iss": env.cfg.auth.issuer, "aud": env.cfg.auth.audience, "exp": exp});
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_rsa_pem(pem).unwrap()).unwrap()
}

async fn read_with(http: &reqwest::Client, env: &ApiEnv, token: &str) -> (u16, Value) {
    let r = http.get(format!("{}/v1/freshness", env.url)).bearer_auth(token).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_jwks_is_fetched_again_on_an_unknown_kid_at_most_once_a_second() {
    // The identity provider: its JWKS (one key at first), counting fetches.
    let first: Value = serde_json::from_str(&std::fs::read_to_string(root().join("auth/testdata/jwks.json")).unwrap()).unwrap();
    let jwks = Arc::new(Mutex::new(first.clone()));
    let fetches = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (served, counted, failing) = (Arc::clone(&jwks), Arc::clone(&fetches), Arc::clone(&down));
    let server = tokio::spawn(async move {
        let router = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let (served, counted, failing) = (Arc::clone(&served), Arc::clone(&counted), Arc::clone(&failing));
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    if failing.load(Ordering::SeqCst) {
                        return Err(axum::http::StatusCode::SERVICE_UNAVAILABLE);
                    }
                    Ok(axum::Json(served.lock().unwrap().clone()))
                }
            }),
        );
        let _ = axum::serve(listener, router).await;
    });
    let env = ApiEnv::start(&[
        ("VITALS_AUTH__JWKS_URL", idp.as_str()),
        ("VITALS_AUTH__JWKS_REFRESH_SECS", "3600"),
        ("VITALS_AUTH__JWKS_MIN_REFRESH_SECS", "1"),
    ])
    .await;
    let http = reqwest::Client::new();
    let old_key = std::fs::read(root().join("auth/testdata/rs256-test-key.pem")).unwrap();
    let (status, body) = read_with(&http, &env, &rs256_token(&old_key, "test-key-1", "u-jwks", &env)).await;
    assert_eq!(status, 200, "a token of the first key: {body}");

    // A provider glitch serving an empty JWKS (or only keys vitals cannot use) replaces nothing.
    *jwks.lock().unwrap() = json!({"keys": [{"kty": "RSA", "kid": "broken", "n": "", "e": ""}]});
    // Two refreshes against it (the refresher is sequential: the second fetch means the first
    // one's answer was handled), each triggered by a token with an unknown kid.
    let before = fetches.load(Ordering::SeqCst);
    let glitch = rs256_token(&old_key, "glitch-kid", "u-jwks", &env);
    wait_for("two refreshes against the glitching provider", Duration::from_secs(30), || {
        let (http, env, glitch, fetches) = (&http, &env, &glitch, &fetches);
        async move {
            assert_eq!(read_with(http, env, glitch).await.0, 401);
            (fetches.load(Ordering::SeqCst) >= before + 2).then_some(())
        }
    })
    .await;
    let (status, body) = read_with(&http, &env, &rs256_token(&old_key, "test-key-1", "u-jwks", &env)).await;
    assert_eq!(status, 200, "a JWKS without usable keys replaced the good ones: {body}");
    *jwks.lock().unwrap() = first.clone();

    // The provider starts signing with a key its JWKS does not hold yet: 401 unknown_key, and a
    // burst of such tokens fetches the JWKS at most once a second.
    let (new_key, new_jwk) = rsa_key("rotated-key-2");
    let rotated = rs256_token(&new_key, "rotated-key-2", "u-jwks", &env);
    let before = fetches.load(Ordering::SeqCst);
    let burst = Instant::now();
    for _ in 0..30 {
        let (status, body) = read_with(&http, &env, &rotated).await;
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unknown_key")), "{body}");
    }
    let allowed = burst.elapsed().as_secs() as usize + 2;
    let fetched = fetches.load(Ordering::SeqCst) - before;
    assert!(fetched <= allowed, "{fetched} JWKS fetches for a burst of unknown kids over {:?} (at most {allowed})", burst.elapsed());

    // The JWKS now publishes the new key: the next tokens with it are accepted, without a restart.
    jwks.lock().unwrap()["keys"].as_array_mut().unwrap().push(new_jwk);
    wait_for("a token of the rotated key to be accepted", Duration::from_secs(30), || {
        let (http, env, rotated) = (&http, &env, &rotated);
        async move { (read_with(http, env, rotated).await.0 == 200).then_some(()) }
    })
    .await;
    let (status, body) = read_with(&http, &env, &rs256_token(&old_key, "test-key-1", "u-jwks", &env)).await;
    assert_eq!(status, 200, "the first key still in the JWKS still verifies: {body}");

    // The provider fails: the keys it served stay trusted (a failed refresh keeps them).
    down.store(true, Ordering::SeqCst);
    let before = fetches.load(Ordering::SeqCst);
    let (status, body) = read_with(&http, &env, &rs256_token(&new_key, "unknown-again", "u-jwks", &env)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unknown_key")));
    wait_for("a refresh attempt against the failing provider", Duration::from_secs(30), || {
        let n = fetches.load(Ordering::SeqCst);
        async move { (n > before).then_some(()) }
    })
    .await;
    let (status, _) = read_with(&http, &env, &rotated).await;
    assert_eq!(status, 200, "a failed refresh dropped the keys");
    server.abort();
    env.cleanup().await;
}
