//! Issue 9 item 5, against the test's own `vitals registry` and edge: who may write to the
//! schema registry, and what the edge's `/readyz` and `vitals schemas check|register` say when a
//! subject the pipeline needs no longer has vitals' schema as its latest version.

use reqwest::Method;
use serde_json::{json, Value};
use vitals::app;

use crate::harness::TestEnv;

/// Who sends a registry request.
#[derive(Clone, Copy, Debug)]
enum Who {
    Nobody,
    /// The read-only credential every pipeline role uses.
    Reader,
    Admin,
}

async fn registry(env: &TestEnv, who: Who, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let r = &env.cfg.registry;
    let mut request = env.http.request(method, format!("{}{path}", r.url)).header("content-type", "application/vnd.schemaregistry.v1+json");
    request = match who {
        Who::Nobody => request,
        Who::Reader => request.basic_auth(&r.reader_user, Some(r.reader_password.expose())),
        Who::Admin => request.basic_auth(&r.admin_user, Some(r.admin_password.expose())),
    };
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await.expect("registry request");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn readyz(env: &TestEnv) -> (u16, Value) {
    let response = env.http.get(format!("{}/readyz", env.ingest_url)).send().await.expect("GET /readyz");
    (response.status().as_u16(), response.json().await.expect("readiness body"))
}

/// What the registry holds, as the admin sees it: every subject with its versions, and the
/// compatibility of the hot lane's subject.
async fn snapshot(env: &TestEnv) -> Value {
    let (_, subjects) = registry(env, Who::Admin, Method::GET, "/subjects", None).await;
    let mut all = serde_json::Map::new();
    for s in subjects.as_array().expect("subjects").iter().filter_map(Value::as_str) {
        let (_, versions) = registry(env, Who::Admin, Method::GET, &format!("/subjects/{s}/versions"), None).await;
        let (_, latest) = registry(env, Who::Admin, Method::GET, &format!("/subjects/{s}/versions/latest"), None).await;
        all.insert(s.to_owned(), json!({ "versions": versions, "latest": latest }));
    }
    let hot = format!("{}-value", env.topics().hot);
    let (_, level) = registry(env, Who::Admin, Method::GET, &format!("/config/{hot}"), None).await;
    json!({ "subjects": all, "hot_level": level })
}

/// The attack — `PUT /config/<subject> NONE` then `POST .../versions "string"` — and
/// deletions, sent without credentials and with the pipeline's read-only credential: 401 / 403,
/// and the registry is unchanged, and the edge stays ready.
#[tokio::test]
async fn registry_writes_need_the_admin_credential() {
    let env = TestEnv::start().await;
    let hot = format!("{}-value", env.topics().hot);
    let before = snapshot(&env).await;
    let writes = [
        (Method::PUT, format!("/config/{hot}"), Some(json!({ "compatibility": "NONE" }))),
        (Method::POST, format!("/subjects/{hot}/versions"), Some(json!({ "schema": "\"string\"" }))),
        (Method::DELETE, format!("/subjects/{hot}/versions/1"), None),
        (Method::DELETE, format!("/subjects/{hot}"), None),
        (Method::PUT, "/config".to_owned(), Some(json!({ "compatibility": "NONE" }))),
    ];
    for (method, path, body) in &writes {
        let (status, response) = registry(&env, Who::Nobody, method.clone(), path, body.clone()).await;
        assert_eq!((status, &response["error_code"]), (401, &json!(40101)), "unauthenticated {method} {path}: {response}");
        let (status, response) = registry(&env, Who::Reader, method.clone(), path, body.clone()).await;
        assert_eq!((status, &response["error_code"]), (403, &json!(40301)), "read-only {method} {path}: {response}");
    }
    let (status, response) = registry(&env, Who::Nobody, Method::GET, "/subjects", None).await;
    assert_eq!(status, 401, "anonymous reads are off by default: {response}");
    assert_eq!(snapshot(&env).await, before, "a refused write changed the registry");
    let (status, body) = readyz(&env).await;
    assert_eq!((status, body), (200, json!({"broker": true, "schema_registry": true, "postgres": true})));
    env.cleanup().await;
}

/// A foreign schema registered as the latest version of a lane's subject (with the admin
/// credential: a mistake, or a leaked one): the edge's `/readyz` says 503 naming the subject,
/// the latest version and vitals' version; `schemas check` and `schemas register` fail saying
/// the same (registering again cannot fix it); soft-deleting the foreign version repairs it.
#[tokio::test]
async fn a_foreign_latest_version_makes_the_edge_unready_and_schemas_check_and_register_fail() {
    let env = TestEnv::start().await;
    assert_eq!(readyz(&env).await.0, 200);
    let hot = format!("{}-value", env.topics().hot);
    let (_, ours) = registry(&env, Who::Reader, Method::GET, &format!("/subjects/{hot}/versions/latest"), None).await;
    let (status, r) = registry(&env, Who::Admin, Method::PUT, &format!("/config/{hot}"), Some(json!({ "compatibility": "NONE" }))).await;
    assert_eq!(status, 200, "{r}");
    let (status, foreign) =
        registry(&env, Who::Admin, Method::POST, &format!("/subjects/{hot}/versions"), Some(json!({ "schema": "\"string\"" }))).await;
    assert_eq!(status, 200, "{foreign}");
    let (ours_version, ours_id, foreign_id) =
        (ours["version"].as_i64().unwrap(), ours["id"].as_i64().unwrap(), foreign["id"].as_i64().unwrap());
    let expected = format!(
        "{hot}: the latest version {} (id {foreign_id}) is not vitals' schema `sample_batch`, which is version {ours_version} (id {ours_id})",
        ours_version + 1
    );

    let (status, body) = readyz(&env).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["schema_registry"], json!(false), "{body}");
    assert_eq!(body["schema_problems"], json!([expected]), "{body}");
    // A freshly started edge says the same.
    let fresh = app::ingest(&env.cfg, env.pool.clone()).await.expect("a second edge");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/readyz", listener.local_addr().unwrap());
    let server = tokio::spawn(app::serve(listener, vitals_ingest::router(fresh), std::future::pending()));
    let response = env.http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.json::<Value>().await.unwrap()["schema_problems"], json!([expected]));
    server.abort();

    let problems = app::check_schemas(&env.cfg).await.expect("schemas check runs");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with(&expected), "{problems:?}");
    assert!(problems[0].contains(&format!("/subjects/{hot}/versions/{}", ours_version + 1)), "it says how to repair: {problems:?}");
    let err = app::register_schemas(&env.cfg).await.expect_err("register cannot make vitals' schema the latest again");
    let err = format!("{err:#}");
    assert!(err.contains(&expected), "{err}");

    // The repair the message names: soft-delete the foreign version.
    let (status, r) = registry(&env, Who::Admin, Method::DELETE, &format!("/subjects/{hot}/versions/{}", ours_version + 1), None).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(readyz(&env).await.0, 200);
    assert_eq!(app::check_schemas(&env.cfg).await.unwrap(), Vec::<String>::new());
    app::register_schemas(&env.cfg).await.expect("register succeeds again");
    env.cleanup().await;
}

/// A hard-deleted subject: the edge is unready naming it ("absent"), `schemas check` fails
/// naming it, and `schemas register` registers vitals' schema again, after which the edge is
/// ready.
#[tokio::test]
async fn a_deleted_subject_makes_the_edge_unready_until_schemas_register_restores_it() {
    let env = TestEnv::start().await;
    let domain = format!("{}-value", env.topics().domain);
    for path in [format!("/subjects/{domain}"), format!("/subjects/{domain}?permanent=true")] {
        let (status, r) = registry(&env, Who::Admin, Method::DELETE, &path, None).await;
        assert_eq!(status, 200, "DELETE {path}: {r}");
    }
    let expected = format!("{domain}: vitals' schema `domain_change_batch` is absent (the subject has no live version)");
    let (status, body) = readyz(&env).await;
    assert_eq!((status, &body["schema_problems"]), (503, &json!([expected])), "{body}");
    let problems = app::check_schemas(&env.cfg).await.unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with(&expected) && problems[0].contains("vitals schemas register"), "{problems:?}");

    let lines = app::register_schemas(&env.cfg).await.expect("register restores the subject");
    assert!(lines.iter().any(|l| l.starts_with(&format!("{domain} -> id ")) && l.contains("version 1")), "{lines:?}");
    assert_eq!(readyz(&env).await.0, 200);
    assert!(app::check_schemas(&env.cfg).await.unwrap().is_empty());
    env.cleanup().await;
}

/// vitals' schema absent and a foreign one latest: `register` registers vitals' (it becomes the
/// latest) and says what it found.
#[tokio::test]
async fn register_adds_vitals_schema_over_a_foreign_one_and_says_so() {
    let env = TestEnv::start().await;
    let change = format!("{}-value", env.topics().change);
    for path in [format!("/subjects/{change}"), format!("/subjects/{change}?permanent=true")] {
        assert_eq!(registry(&env, Who::Admin, Method::DELETE, &path, None).await.0, 200);
    }
    let (status, r) = registry(&env, Who::Admin, Method::PUT, &format!("/config/{change}"), Some(json!({ "compatibility": "NONE" }))).await;
    assert_eq!(status, 200, "{r}");
    let (status, foreign) =
        registry(&env, Who::Admin, Method::POST, &format!("/subjects/{change}/versions"), Some(json!({ "schema": "\"string\"" }))).await;
    assert_eq!(status, 200, "{foreign}");
    let (_, latest) = registry(&env, Who::Admin, Method::GET, &format!("/subjects/{change}/versions/latest"), None).await;
    let expected = format!(
        "{change}: the latest version {} (id {}) is not vitals' schema `change_batch`, which is absent from the subject",
        latest["version"], latest["id"]
    );
    assert_eq!(readyz(&env).await.1["schema_problems"], json!([expected]));
    let problems = app::check_schemas(&env.cfg).await.unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with(&expected), "{problems:?}");

    // At level NONE (the subject's, as the attacker set it) vitals' schema can follow: register
    // adds it.
    let lines = app::register_schemas(&env.cfg).await.expect("register adds vitals' schema");
    assert!(lines.iter().any(|l| l.starts_with("note: ") && l.contains(&expected)), "it says what it found: {lines:?}");
    assert_eq!(readyz(&env).await.0, 200);
    env.cleanup().await;
}
