//! Contract tests of the registry over real HTTP against a real PostgreSQL: each test creates
//! its own database `vitals_registry_test_<random>` (dropped again when the test ends, even on
//! failure), applies `migrations/0002_registry.sql`, serves [`super::router`] on 127.0.0.1:0 and
//! talks to it with reqwest, or with schema_registry_converter itself. The server is reached
//! through `VITALS_TEST_POSTGRES_URL` (default `postgres://postgres:postgres@127.0.0.1:5432/postgres`).

use std::collections::HashSet;
use std::error::Error as _;

use reqwest::Method;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

const READING_V1: &str = r#"{"type":"record","name":"Reading","namespace":"vitals","fields":[{"name":"bpm","type":"int"}]}"#;

/// `Reading` with `extra` fields appended after `bpm` (`extra` starts with a comma).
fn reading(extra: &str) -> String {
    format!(r#"{{"type":"record","name":"Reading","namespace":"vitals","fields":[{{"name":"bpm","type":"int"}}{extra}]}}"#)
}

fn with_spo2_default() -> String {
    reading(r#",{"name":"spo2","type":"int","default":98}"#)
}

fn with_spo2_required() -> String {
    reading(r#",{"name":"spo2","type":"int"}"#)
}

fn admin_url() -> String {
    std::env::var("VITALS_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".to_owned())
}

fn database_url(name: &str) -> String {
    let admin = admin_url();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(base, _)| base);
    format!("{base}/{name}")
}

/// A throwaway database, dropped (with its connections) when this value is dropped.
struct TestDatabase {
    name: String,
}

impl TestDatabase {
    async fn create() -> (TestDatabase, PgPool) {
        let name = format!("vitals_registry_test_{:016x}", rand::random::<u64>());
        let mut admin =
            PgConnection::connect(&admin_url()).await.expect("PostgreSQL must be reachable at VITALS_TEST_POSTGRES_URL or 127.0.0.1:5432");
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#)).execute(&mut admin).await.expect("create test database");
        admin.close().await.expect("close admin connection");
        let database = TestDatabase { name };
        let pool = PgPoolOptions::new().max_connections(10).connect(&database_url(&database.name)).await.expect("connect to test database");
        sqlx::raw_sql(include_str!("../../../migrations/0002_registry.sql"))
            .execute(&pool)
            .await
            .expect("apply migrations/0002_registry.sql");
        (database, pool)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on: use a fresh one.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url()).await?;
                sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#)).execute(&mut admin).await?;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// The credentials the test registries are configured with.
const ADMIN: (&str, &str) = ("test-admin", "admin-secret-1");
const READER: (&str, &str) = ("test-reader", "reader-secret-1");

/// A registry served over HTTP on a free local port. Its helpers send the admin credential
/// unless a test says otherwise ([`Registry::send_as`]).
struct Registry {
    base: String,
    http: reqwest::Client,
    pool: PgPool,
    _database: TestDatabase,
}

impl Registry {
    async fn start() -> Registry {
        Registry::start_with(false).await
    }

    /// With [`ADMIN`] and [`READER`] configured; `anonymous_reads` as given.
    async fn start_with(anonymous_reads: bool) -> Registry {
        let (database, pool) = TestDatabase::create().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        let access = super::Access {
            admin: super::Credential::new(ADMIN.0, ADMIN.1),
            reader: super::Credential::new(READER.0, READER.1),
            anonymous_reads,
        };
        let router = super::router(pool.clone(), access);
        tokio::spawn(async move { axum::serve(listener, router).await });
        Registry {
            base: format!("http://{address}"),
            http: reqwest::Client::builder().no_proxy().build().expect("http client"),
            pool,
            _database: database,
        }
    }

    /// Sends a JSON body as `who` (`None`: no `Authorization` header; `Some(raw)`: that header
    /// value verbatim); returns status, `WWW-Authenticate` and the body.
    async fn send_as(&self, who: Option<&str>, method: Method, path: &str, body: Option<Value>) -> (u16, Option<String>, Value) {
        let mut request =
            self.http.request(method, format!("{}{path}", self.base)).header("content-type", "application/vnd.schemaregistry.v1+json");
        if let Some(header) = who {
            request = request.header("authorization", header);
        }
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let challenge = response.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bytes = response.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, challenge, body)
    }

    /// Sends a raw body with an optional content type; returns status, content type and body
    /// (as JSON, or as a JSON string when the body is not JSON).
    async fn send_raw(&self, method: Method, path: &str, content_type: Option<&str>, body: Option<String>) -> (u16, String, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).basic_auth(ADMIN.0, Some(ADMIN.1));
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let bytes = response.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, content_type, body)
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, _, body) =
            self.send_raw(method, path, Some("application/vnd.schemaregistry.v1+json"), body.map(|b| b.to_string())).await;
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::PUT, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(Method::DELETE, path, None).await
    }

    async fn register(&self, subject: &str, schema: &str) -> (u16, Value) {
        self.post(&format!("/subjects/{subject}/versions"), json!({ "schema": schema })).await
    }

    /// Registers a schema that must be accepted; returns its id.
    async fn registered_id(&self, subject: &str, schema: &str) -> i64 {
        let (status, body) = self.register(subject, schema).await;
        assert_eq!(status, 200, "registering under {subject}: {body}");
        body["id"].as_i64().expect("numeric id")
    }

    async fn set_level(&self, subject: Option<&str>, level: &str) {
        let path = subject.map_or("/config".to_owned(), |s| format!("/config/{s}"));
        let (status, body) = self.put(&path, json!({ "compatibility": level })).await;
        assert_eq!((status, body), (200, json!({ "compatibility": level })));
    }
}

/// Asserts a Confluent error: HTTP status, error_code and a non-empty message.
fn assert_error(response: (u16, Value), status: u16, error_code: i64) {
    let (actual_status, body) = response;
    assert_eq!(actual_status, status, "{body}");
    assert_eq!(body["error_code"], json!(error_code), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

#[tokio::test]
async fn ids_are_global_and_versions_sequential() {
    let r = Registry::start().await;
    let id1 = r.registered_id("heart-value", READING_V1).await;
    assert_eq!(id1, 1);

    // Same schema with another layout and name spelling: same id, no new version.
    let relaid = r#"{ "fields": [ {"type": "int", "name": "bpm"} ], "name": "vitals.Reading", "type": "record" }"#;
    assert_eq!(r.registered_id("heart-value", relaid).await, id1);
    assert_eq!(r.get("/subjects/heart-value/versions").await, (200, json!([1])));

    // Same schema under another subject: same global id, that subject's version 1.
    assert_eq!(r.registered_id("pulse-value", READING_V1).await, id1);
    let (status, body) = r.get("/subjects/pulse-value/versions/1").await;
    assert_eq!(status, 200);
    assert_eq!((body["version"].clone(), body["id"].clone()), (json!(1), json!(id1)));

    // A new schema gets a new id and the next version.
    let id2 = r.registered_id("heart-value", &with_spo2_default()).await;
    assert_ne!(id2, id1);
    // Changing only a default is a different schema (identity keeps defaults).
    let id3 = r.registered_id("heart-value", &reading(r#",{"name":"spo2","type":"int","default":97}"#)).await;
    assert_ne!(id3, id2);
    assert_eq!(r.get("/subjects/heart-value/versions").await, (200, json!([1, 2, 3])));
    assert_eq!(r.get("/subjects").await, (200, json!(["heart-value", "pulse-value"])));
}

#[tokio::test]
async fn lookup_and_read_endpoints_return_confluent_shapes() {
    let r = Registry::start().await;
    assert_eq!(r.get("/").await, (200, json!({})));
    assert_eq!(r.get("/schemas/types").await, (200, json!(["AVRO"])));
    let id1 = r.registered_id("heart-value", READING_V1).await;
    let id2 = r.registered_id("heart-value", &with_spo2_default()).await;
    r.registered_id("pulse-value", READING_V1).await;

    let expected_v1 = json!({ "subject": "heart-value", "version": 1, "id": id1, "schema": READING_V1 });
    assert_eq!(r.post("/subjects/heart-value?deleted=false", json!({ "schema": READING_V1 })).await, (200, expected_v1.clone()));
    assert_eq!(r.get("/subjects/heart-value/versions/1").await, (200, expected_v1));
    for latest in ["latest", "-1"] {
        let (status, body) = r.get(&format!("/subjects/heart-value/versions/{latest}")).await;
        assert_eq!(status, 200);
        assert_eq!((body["version"].clone(), body["id"].clone()), (json!(2), json!(id2)));
    }
    let parsed_v1: Value = serde_json::from_str(READING_V1).unwrap();
    assert_eq!(r.get("/subjects/heart-value/versions/1/schema").await, (200, parsed_v1.clone()));
    assert_eq!(r.get(&format!("/schemas/ids/{id1}?deleted=true")).await, (200, json!({ "schema": READING_V1 })));
    assert_eq!(r.get(&format!("/schemas/ids/{id1}/schema")).await, (200, parsed_v1));
    assert_eq!(
        r.get(&format!("/schemas/ids/{id1}/versions")).await,
        (200, json!([{ "subject": "heart-value", "version": 1 }, { "subject": "pulse-value", "version": 1 }]))
    );
    assert_eq!(r.get(&format!("/schemas/ids/{id1}/subjects")).await, (200, json!(["heart-value", "pulse-value"])));

    // A subject containing '/', percent-encoded in the path as the converter does.
    r.registered_id("vitals%2Fecg-value", READING_V1).await;
    let (status, body) = r.get("/subjects/vitals%2Fecg-value/versions/latest").await;
    assert_eq!((status, body["subject"].clone()), (200, json!("vitals/ecg-value")));
    assert_eq!(r.get("/subjects?subjectPrefix=vitals").await, (200, json!(["vitals/ecg-value"])));
}

#[tokio::test]
async fn errors_carry_confluent_codes() {
    let r = Registry::start().await;
    assert_error(r.get("/subjects/nope/versions").await, 404, 40401);
    assert_error(r.get("/subjects/nope/versions/1").await, 404, 40401);
    assert_error(r.post("/subjects/nope", json!({ "schema": READING_V1 })).await, 404, 40401);
    r.registered_id("heart-value", READING_V1).await;
    assert_error(r.get("/subjects/heart-value/versions/7").await, 404, 40402);
    for bad in ["abc", "0", "-2", "99999999999"] {
        assert_error(r.get(&format!("/subjects/heart-value/versions/{bad}")).await, 422, 42202);
    }
    assert_error(r.get("/schemas/ids/999").await, 404, 40403);
    assert_error(r.get("/schemas/ids/not-a-number").await, 404, 40403);
    assert_error(r.get("/schemas/ids/999/versions").await, 404, 40403);
    assert_error(r.post("/subjects/heart-value", json!({ "schema": with_spo2_default() })).await, 404, 40403);

    for invalid in [
        json!({ "schema": r#"{"type":"record"}"# }),
        json!({ "schema": "not json at all" }),
        json!({ "schema": r#"{"type":"record","name":"R","fields":[{"name":"x","type":"Nope"}]}"# }),
        json!({ "schema": READING_V1, "schemaType": "PROTOBUF" }),
        json!({ "schema": "" }),
        json!({}),
    ] {
        assert_error(r.post("/subjects/heart-value/versions", invalid).await, 422, 42201);
    }
    let (status, _, body) =
        r.send_raw(Method::POST, "/subjects/heart-value/versions", Some("application/json"), Some("{not json".to_owned())).await;
    assert_error((status, body), 400, 400);
    let (status, _, body) =
        r.send_raw(Method::POST, "/subjects/heart-value/versions", Some("application/json"), Some(r#"{"schema": 42}"#.to_owned())).await;
    assert_error((status, body), 400, 400);

    assert_error(r.put("/config", json!({ "compatibility": "SIDEWAYS" })).await, 422, 42203);
    assert_error(r.get("/config/heart-value").await, 404, 40408);
    assert_error(r.get("/no/such/route").await, 404, 404);
    assert_error(r.call(Method::PATCH, "/subjects", None).await, 405, 405);
    assert_error(r.register("bad%01subject", READING_V1).await, 422, 42208);
}

#[tokio::test]
async fn backward_is_the_default_level() {
    let r = Registry::start().await;
    r.registered_id("heart-value", READING_V1).await;

    let (status, body) = r.register("heart-value", &with_spo2_required()).await;
    assert_error((status, body.clone()), 409, 409);
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("incompatible") && message.contains("spo2"), "{message}");

    let (status, body) =
        r.post("/compatibility/subjects/heart-value/versions/latest?verbose=true", json!({ "schema": with_spo2_required() })).await;
    assert_eq!(status, 200);
    assert_eq!(body["is_compatible"], json!(false));
    assert!(body["messages"].as_array().is_some_and(|m| !m.is_empty()), "{body}");

    assert_eq!(
        r.post("/compatibility/subjects/heart-value/versions/latest", json!({ "schema": with_spo2_default() }),).await,
        (200, json!({ "is_compatible": true }))
    );
    r.registered_id("heart-value", &with_spo2_default()).await;
    assert_eq!(r.get("/subjects/heart-value/versions").await, (200, json!([1, 2])));

    // Invalid candidates: an error, or with verbose an incompatible answer saying why.
    assert_error(r.post("/compatibility/subjects/heart-value/versions", json!({ "schema": "{" })).await, 422, 42201);
    let (status, body) = r.post("/compatibility/subjects/heart-value/versions?verbose=true", json!({ "schema": "{" })).await;
    assert_eq!((status, body["is_compatible"].clone()), (200, json!(false)));
    assert_error(r.post("/compatibility/subjects/heart-value/versions/9", json!({ "schema": READING_V1 })).await, 404, 40402);
}

#[tokio::test]
async fn forward_level_mirrors_backward() {
    let r = Registry::start().await;
    r.set_level(Some("heart-value"), "FORWARD").await;
    r.registered_id("heart-value", READING_V1).await;
    // Old readers skip a new field, default or not.
    r.registered_id("heart-value", &with_spo2_required()).await;
    // Dropping a field old readers need (they have no default for it) breaks them.
    let dropped = reading(r#",{"name":"note","type":"string","default":""}"#);
    assert_error(r.register("heart-value", &dropped).await, 409, 409);
    // The same change is fine for a BACKWARD subject with the same history.
    r.set_level(Some("pulse-value"), "BACKWARD").await;
    r.registered_id("pulse-value", &with_spo2_required()).await;
    r.registered_id("pulse-value", &dropped).await;
}

#[tokio::test]
async fn none_level_accepts_anything() {
    let r = Registry::start().await;
    r.set_level(None, "NONE").await;
    r.registered_id("heart-value", READING_V1).await;
    r.registered_id("heart-value", &with_spo2_required()).await;
    r.registered_id("heart-value", r#""string""#).await;
    assert_eq!(r.get("/subjects/heart-value/versions").await, (200, json!([1, 2, 3])));
}

#[tokio::test]
async fn transitive_levels_check_older_versions() {
    let r = Registry::start().await;
    for subject in ["transitive-value", "latest-only-value"] {
        r.registered_id(subject, READING_V1).await;
        r.registered_id(subject, &with_spo2_default()).await;
    }
    r.set_level(Some("transitive-value"), "BACKWARD_TRANSITIVE").await;
    // Readable with v2 (which writes spo2) but not with v1 (which does not).
    let candidate = json!({ "schema": with_spo2_required() });
    assert_eq!(
        r.post("/compatibility/subjects/transitive-value/versions/2", candidate.clone()).await,
        (200, json!({ "is_compatible": true }))
    );
    assert_eq!(
        r.post("/compatibility/subjects/transitive-value/versions/1", candidate.clone()).await,
        (200, json!({ "is_compatible": false }))
    );
    let (status, body) = r.post("/compatibility/subjects/transitive-value/versions?verbose=true", candidate.clone()).await;
    assert_eq!((status, body["is_compatible"].clone()), (200, json!(false)));
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(messages.len(), 1, "{body}");
    assert!(messages[0].as_str().is_some_and(|m| m.contains("oldSchemaVersion: 1")));
    assert_error(r.register("transitive-value", &with_spo2_required()).await, 409, 409);

    // Plain BACKWARD only looks at the latest version.
    r.registered_id("latest-only-value", &with_spo2_required()).await;

    // FORWARD_TRANSITIVE: the readers of every version, not only the latest, must cope.
    r.set_level(Some("forward-value"), "NONE").await;
    r.registered_id("forward-value", &with_spo2_required()).await;
    r.registered_id("forward-value", READING_V1).await;
    let candidate = json!({ "schema": reading(r#",{"name":"note","type":"string","default":""}"#) });
    r.set_level(Some("forward-value"), "FORWARD").await;
    assert_eq!(r.post("/compatibility/subjects/forward-value/versions", candidate.clone()).await, (200, json!({ "is_compatible": true })));
    r.set_level(Some("forward-value"), "FORWARD_TRANSITIVE").await;
    assert_eq!(r.post("/compatibility/subjects/forward-value/versions", candidate).await, (200, json!({ "is_compatible": false })));
}

#[tokio::test]
async fn soft_delete_hides_versions_and_permanent_delete_needs_it_first() {
    let r = Registry::start().await;
    let id1 = r.registered_id("heart-value", READING_V1).await;
    let id2 = r.registered_id("heart-value", &with_spo2_default()).await;

    assert_eq!(r.delete("/subjects/heart-value/versions/2").await, (200, json!(2)));
    assert_eq!(r.get("/subjects/heart-value/versions").await, (200, json!([1])));
    assert_eq!(r.get("/subjects/heart-value/versions?deleted=true").await, (200, json!([1, 2])));
    assert_error(r.get("/subjects/heart-value/versions/2").await, 404, 40402);
    let (status, body) = r.get("/subjects/heart-value/versions/2?deleted=true").await;
    assert_eq!((status, body["id"].clone()), (200, json!(id2)));
    let (_, latest) = r.get("/subjects/heart-value/versions/latest").await;
    assert_eq!(latest["version"], json!(1));
    // Ids stay readable so already written data can still be decoded.
    assert_eq!(r.get(&format!("/schemas/ids/{id2}")).await.0, 200);
    assert_eq!(r.get(&format!("/schemas/ids/{id2}/versions")).await, (200, json!([])));
    assert_eq!(
        r.get(&format!("/schemas/ids/{id2}/versions?deleted=true")).await,
        (200, json!([{ "subject": "heart-value", "version": 2 }]))
    );

    assert_error(r.delete("/subjects/heart-value/versions/2").await, 404, 40406);
    assert_error(r.delete("/subjects/heart-value/versions/1?permanent=true").await, 404, 40407);
    assert_eq!(r.delete("/subjects/heart-value/versions/2?permanent=true").await, (200, json!(2)));
    assert_eq!(r.get("/subjects/heart-value/versions?deleted=true").await, (200, json!([1])));
    assert_error(r.get(&format!("/schemas/ids/{id2}")).await, 404, 40403);

    // Soft-deleting the subject hides it and drops its compatibility config.
    r.set_level(Some("heart-value"), "FULL").await;
    assert_eq!(r.delete("/subjects/heart-value").await, (200, json!([1])));
    assert_error(r.get("/config/heart-value").await, 404, 40408);
    assert_eq!(r.get("/subjects").await, (200, json!([])));
    assert_eq!(r.get("/subjects?deleted=true").await, (200, json!(["heart-value"])));
    assert_eq!(r.get("/subjects?deletedOnly=true").await, (200, json!(["heart-value"])));
    assert_error(r.get("/subjects/heart-value/versions").await, 404, 40401);
    assert_error(r.post("/subjects/heart-value", json!({ "schema": READING_V1 })).await, 404, 40401);
    let (status, body) = r.post("/subjects/heart-value?deleted=true", json!({ "schema": READING_V1 })).await;
    assert_eq!((status, body["version"].clone()), (200, json!(1)));
    assert_error(r.delete("/subjects/heart-value").await, 404, 40404);

    // Registering again continues the numbering and reuses the schema's id.
    assert_eq!(r.registered_id("heart-value", READING_V1).await, id1);
    let (_, latest) = r.get("/subjects/heart-value/versions/latest").await;
    assert_eq!(latest["version"], json!(2));
    assert_error(r.delete("/subjects/heart-value?permanent=true").await, 404, 40405);
    assert_eq!(r.delete("/subjects/heart-value").await, (200, json!([2])));
    assert_eq!(r.delete("/subjects/heart-value?permanent=true").await, (200, json!([1, 2])));
    assert_eq!(r.get("/subjects?deleted=true").await, (200, json!([])));
    assert_error(r.delete("/subjects/heart-value").await, 404, 40401);
    assert_error(r.get(&format!("/schemas/ids/{id1}")).await, 404, 40403);
}

#[tokio::test]
async fn config_endpoints() {
    let r = Registry::start().await;
    assert_eq!(r.get("/config").await, (200, json!({ "compatibilityLevel": "BACKWARD" })));
    r.set_level(None, "FULL").await;
    assert_eq!(r.get("/config").await, (200, json!({ "compatibilityLevel": "FULL" })));
    assert_error(r.get("/config/heart-value").await, 404, 40408);
    assert_eq!(r.get("/config/heart-value?defaultToGlobal=true").await, (200, json!({ "compatibilityLevel": "FULL" })));
    assert_eq!(
        r.put("/config/heart-value", json!({ "compatibility": "forward_transitive" })).await,
        (200, json!({ "compatibility": "FORWARD_TRANSITIVE" }))
    );
    assert_eq!(r.get("/config/heart-value").await, (200, json!({ "compatibilityLevel": "FORWARD_TRANSITIVE" })));
    assert_error(r.put("/config/heart-value", json!({})).await, 422, 42203);
    assert_eq!(r.delete("/config/heart-value").await, (200, json!({ "compatibilityLevel": "FORWARD_TRANSITIVE" })));
    assert_error(r.delete("/config/heart-value").await, 404, 40401);
    assert_eq!(r.delete("/config").await, (200, json!({ "compatibilityLevel": "FULL" })));
    assert_eq!(r.get("/config").await, (200, json!({ "compatibilityLevel": "BACKWARD" })));
    assert_eq!(r.get("/mode").await, (200, json!({ "mode": "READWRITE" })));
}

#[tokio::test]
async fn references_resolve_and_protect_their_targets() {
    let r = Registry::start().await;
    let unit = r#"{"type":"enum","name":"Unit","namespace":"vitals","symbols":["BPM","PCT"]}"#;
    r.registered_id("unit", unit).await;
    let measurement = |extra: &str| {
        format!(
            r#"{{"type":"record","name":"Measurement","namespace":"vitals","fields":[{{"name":"unit","type":"vitals.Unit"}},{{"name":"value","type":"double"}}{extra}]}}"#
        )
    };
    let references = json!([{ "name": "vitals.Unit", "subject": "unit", "version": 1 }]);
    let request = |schema: String, references: Value| json!({ "schema": schema, "schemaType": "AVRO", "references": references });

    assert_error(r.post("/subjects/measurement-value/versions", json!({ "schema": measurement("") })).await, 422, 42201);
    assert_error(
        r.post(
            "/subjects/measurement-value/versions",
            request(measurement(""), json!([{ "name": "vitals.Unit", "subject": "unit", "version": 9 }])),
        )
        .await,
        422,
        42201,
    );
    let (status, body) = r.post("/subjects/measurement-value/versions", request(measurement(""), references.clone())).await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].clone();

    let (status, body) = r.get("/subjects/measurement-value/versions/1").await;
    assert_eq!((status, body["references"].clone()), (200, references.clone()));
    let (_, body) = r.get(&format!("/schemas/ids/{id}")).await;
    assert_eq!(body["references"], references);
    let (status, body) = r.post("/subjects/measurement-value", request(measurement(""), references.clone())).await;
    assert_eq!((status, body["id"].clone()), (200, id.clone()));
    assert_eq!(r.get("/subjects/unit/versions/1/referencedby").await, (200, json!([id])));

    // Evolution is checked with the referenced types resolved on both sides.
    let (status, body) = r
        .post(
            "/subjects/measurement-value/versions",
            request(measurement(r#",{"name":"at","type":"long","default":0}"#), references.clone()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_error(
        r.post(
            "/subjects/measurement-value/versions",
            request(measurement(r#",{"name":"target","type":"vitals.Unit"}"#), references.clone()),
        )
        .await,
        409,
        409,
    );

    assert_error(r.delete("/subjects/unit/versions/1").await, 422, 42206);
    assert_error(r.delete("/subjects/unit").await, 422, 42206);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_get_consistent_versions() {
    let r = Registry::start().await;
    let schemas: Vec<String> = (0..8).map(|i| reading(&format!(r#",{{"name":"f{i}","type":"int","default":{i}}}"#))).collect();
    let responses = futures::future::join_all(schemas.iter().map(|s| r.register("burst-value", s))).await;
    let mut ids = HashSet::new();
    for (status, body) in responses {
        assert_eq!(status, 200, "{body}");
        ids.insert(body["id"].as_i64().expect("id"));
    }
    assert_eq!(ids.len(), 8);
    assert_eq!(r.get("/subjects/burst-value/versions").await, (200, json!([1, 2, 3, 4, 5, 6, 7, 8])));
    let mut stored = HashSet::new();
    for version in 1..=8 {
        let (_, body) = r.get(&format!("/subjects/burst-value/versions/{version}")).await;
        stored.insert(body["id"].as_i64().expect("id"));
    }
    assert_eq!(stored, ids);

    // One new schema registered under many subjects at once still gets a single id.
    let subjects: Vec<String> = (0..6).map(|i| format!("fan-{i}-value")).collect();
    let shared = with_spo2_required();
    let responses = futures::future::join_all(subjects.iter().map(|subject| r.register(subject, &shared))).await;
    let ids: HashSet<i64> = responses
        .into_iter()
        .map(|(status, body)| {
            assert_eq!(status, 200, "{body}");
            body["id"].as_i64().expect("id")
        })
        .collect();
    assert_eq!(ids.len(), 1);
}

#[tokio::test]
async fn accepts_the_content_types_confluent_accepts() {
    let r = Registry::start().await;
    let body = json!({ "schema": READING_V1 }).to_string();
    let mut ids = HashSet::new();
    for content_type in [
        Some("application/vnd.schemaregistry.v1+json"),
        Some("application/vnd.schemaregistry+json"),
        Some("application/json; charset=utf-8"),
        Some("application/octet-stream"),
        None,
    ] {
        let (status, response_type, response) =
            r.send_raw(Method::POST, "/subjects/heart-value/versions", content_type, Some(body.clone())).await;
        assert_eq!(status, 200, "{content_type:?}: {response}");
        assert_eq!(response_type, "application/vnd.schemaregistry.v1+json");
        ids.insert(response["id"].clone());
    }
    assert_eq!(ids.len(), 1);
    let (status, _, response) = r.send_raw(Method::POST, "/subjects/heart-value/versions", Some("text/html"), Some(body)).await;
    assert_error((status, response), 415, 415);
}

#[tokio::test]
async fn schema_registry_converter_round_trips_through_the_registry() {
    use apache_avro::types::Value as AvroValue;
    use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
    use schema_registry_converter::async_impl::schema_registry::{get_all_subjects, get_all_versions, post_schema, SrSettings};
    use schema_registry_converter::schema_registry_common::{RawError, SchemaType, SubjectNameStrategy, SuppliedSchema};

    #[derive(serde::Serialize)]
    struct Heartbeat {
        beat: i64,
    }

    let r = Registry::start().await;
    let settings = || {
        SrSettings::new_builder(r.base.clone())
            .no_proxy()
            .set_basic_authorization(ADMIN.0, Some(ADMIN.1))
            .build()
            .expect("converter settings")
    };
    let schema = r#"{"type":"record","name":"Heartbeat","namespace":"vitals","fields":[{"name":"beat","type":"long"}]}"#;
    let registered = post_schema(&settings(), "heartbeat-value".to_owned(), SuppliedSchema::new(None, SchemaType::Avro, schema.to_owned()))
        .await
        .expect("post_schema");

    let encoder = AvroEncoder::new(settings());
    let strategy = SubjectNameStrategy::TopicNameStrategy("heartbeat".to_owned(), false);
    let bytes = encoder.encode_struct(Heartbeat { beat: 72 }, &strategy).await.expect("encode_struct");
    assert_eq!(bytes[0], 0, "magic byte");
    assert_eq!(bytes[1..5], registered.id.to_be_bytes(), "schema id");

    let decoded = AvroDecoder::new(settings()).decode(Some(&bytes)).await.expect("decode");
    assert_eq!(decoded.value, AvroValue::Record(vec![("beat".to_owned(), AvroValue::Long(72))]));

    assert_eq!(get_all_subjects(&settings()).await.expect("subjects"), vec!["heartbeat-value".to_owned()]);
    assert_eq!(get_all_versions(&settings(), "heartbeat-value".to_owned()).await.expect("versions"), vec![1]);

    // The client sees Confluent's error code for an incompatible schema.
    let incompatible =
        r#"{"type":"record","name":"Heartbeat","namespace":"vitals","fields":[{"name":"beat","type":"long"},{"name":"rr","type":"long"}]}"#;
    let error =
        post_schema(&settings(), "heartbeat-value".to_owned(), SuppliedSchema::new(None, SchemaType::Avro, incompatible.to_owned()))
            .await
            .expect_err("incompatible schema must be refused");
    let raw = error.source().and_then(|e| e.downcast_ref::<RawError>()).expect("the registry's error body");
    assert_eq!(raw.error_code, 409);
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// What the registry holds, read straight from its tables: (subject, version, deleted,
/// schema text) rows and the compatibility levels. A refused request must leave both unchanged.
async fn stored_state(pool: &PgPool) -> (Vec<(String, i32, bool, String)>, Vec<(String, String)>) {
    let versions = sqlx::query_as(
        "SELECT v.subject, v.version, v.deleted, s.schema_text FROM registry_subject_versions v \
         JOIN registry_schemas s ON s.id = v.schema_id ORDER BY v.subject, v.version",
    )
    .fetch_all(pool)
    .await
    .expect("reading versions");
    let levels = sqlx::query_as("SELECT subject, compatibility FROM registry_config ORDER BY subject")
        .fetch_all(pool)
        .await
        .expect("reading config");
    (versions, levels)
}

/// Issue 9 item 5: the registry took writes from anyone. Every write without the admin
/// credential is refused — 401 with a `WWW-Authenticate` challenge when unauthenticated (or
/// wrongly authenticated), 403 for the read-only credential — in Confluent's error shape, and
/// the stored subjects, versions and levels are exactly as before.
#[tokio::test]
async fn hostile_writes_without_the_admin_credential_are_refused_and_change_nothing() {
    let r = Registry::start().await;
    r.registered_id("reading-value", READING_V1).await;
    r.set_level(Some("reading-value"), "FULL").await;
    let before = stored_state(&r.pool).await;

    let admin = basic(ADMIN.0, ADMIN.1);
    let reader = basic(READER.0, READER.1);
    let wrong_password = basic(ADMIN.0, "guess");
    let unknown_user = basic("mallory", ADMIN.1);
    let writes: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::PUT, "/config/reading-value", Some(json!({ "compatibility": "NONE" }))),
        (Method::PUT, "/config", Some(json!({ "compatibility": "NONE" }))),
        (Method::DELETE, "/config", None),
        (Method::DELETE, "/config/reading-value", None),
        (Method::POST, "/subjects/reading-value/versions", Some(json!({ "schema": "\"string\"" }))),
        (Method::POST, "/subjects/other-value/versions", Some(json!({ "schema": "\"string\"" }))),
        (Method::DELETE, "/subjects/reading-value", None),
        (Method::DELETE, "/subjects/reading-value?permanent=true", None),
        (Method::DELETE, "/subjects/reading-value/versions/1", None),
        (Method::DELETE, "/subjects/reading-value/versions/latest", None),
    ];
    let unauthenticated = [
        None,
        Some(wrong_password.as_str()),
        Some(unknown_user.as_str()),
        Some("Basic not-base64!"),
        Some("Bearer whatever"),
        Some("Basic"),
    ];
    for (method, path, body) in &writes {
        for who in unauthenticated {
            let (status, challenge, response) = r.send_as(who, method.clone(), path, body.clone()).await;
            assert_eq!(status, 401, "{method} {path} as {who:?}: {response}");
            assert_eq!(response["error_code"], json!(40101), "{method} {path}: {response}");
            assert!(response["message"].as_str().is_some_and(|m| !m.is_empty()), "{response}");
            let challenge = challenge.unwrap_or_default();
            assert!(challenge.starts_with("Basic realm="), "{method} {path}: WWW-Authenticate {challenge:?}");
        }
        let (status, _, response) = r.send_as(Some(&reader), method.clone(), path, body.clone()).await;
        assert_eq!(status, 403, "{method} {path} with the read-only credential: {response}");
        assert_eq!(response["error_code"], json!(40301), "{response}");
        assert!(response["message"].as_str().is_some_and(|m| m.contains(READER.0)), "{response}");
    }
    assert_eq!(stored_state(&r.pool).await, before, "a refused write changed the registry");

    // Reads: the read-only credential may read, look up by content and check compatibility;
    // anonymous reads are off by default.
    let reads: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "/subjects", None),
        (Method::GET, "/subjects/reading-value/versions/latest", None),
        (Method::GET, "/schemas/ids/1", None),
        (Method::GET, "/config/reading-value", None),
        (Method::POST, "/subjects/reading-value", Some(json!({ "schema": READING_V1 }))),
        (Method::POST, "/compatibility/subjects/reading-value/versions/latest", Some(json!({ "schema": READING_V1 }))),
    ];
    for (method, path, body) in &reads {
        let (status, _, response) = r.send_as(Some(&reader), method.clone(), path, body.clone()).await;
        assert_eq!(status, 200, "{method} {path} with the read-only credential: {response}");
        let (status, challenge, response) = r.send_as(None, method.clone(), path, body.clone()).await;
        assert_eq!((status, &response["error_code"]), (401, &json!(40101)), "anonymous {method} {path}: {response}");
        assert!(challenge.is_some(), "anonymous {method} {path}: a challenge");
        let (status, _, response) = r.send_as(Some(&wrong_password), method.clone(), path, body.clone()).await;
        assert_eq!(status, 401, "{method} {path} with a wrong password: {response}");
    }
    assert_eq!(stored_state(&r.pool).await, before);

    // The admin credential still writes.
    let (status, _, response) =
        r.send_as(Some(&admin), Method::PUT, "/config/reading-value", Some(json!({ "compatibility": "NONE" }))).await;
    assert_eq!((status, response), (200, json!({ "compatibility": "NONE" })));
}

/// With `anonymous_reads`, reads need no credential, but writes still need the admin one and a
/// wrong credential is still refused; `/healthz` never needs one.
#[tokio::test]
async fn anonymous_reads_when_configured_never_anonymous_writes() {
    let r = Registry::start_with(true).await;
    r.registered_id("reading-value", READING_V1).await;
    let before = stored_state(&r.pool).await;
    let (status, _, body) = r.send_as(None, Method::GET, "/subjects", None).await;
    assert_eq!((status, body), (200, json!(["reading-value"])));
    let (status, _, body) = r.send_as(None, Method::POST, "/subjects/reading-value", Some(json!({ "schema": READING_V1 }))).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = r.send_as(Some(&basic(READER.0, "wrong")), Method::GET, "/subjects", None).await;
    assert_eq!((status, &body["error_code"]), (401, &json!(40101)), "{body}");
    for (method, path, body) in [
        (Method::PUT, "/config/reading-value", Some(json!({ "compatibility": "NONE" }))),
        (Method::POST, "/subjects/reading-value/versions", Some(json!({ "schema": "\"string\"" }))),
        (Method::DELETE, "/subjects/reading-value", None),
    ] {
        let (status, challenge, response) = r.send_as(None, method.clone(), path, body).await;
        assert_eq!((status, &response["error_code"]), (401, &json!(40101)), "anonymous {method} {path}: {response}");
        assert!(challenge.is_some());
    }
    assert_eq!(stored_state(&r.pool).await, before);

    let closed = Registry::start().await;
    let (status, _, body) = closed.send_as(None, Method::GET, "/healthz", None).await;
    assert_eq!((status, body), (200, json!({ "status": "ok" })));
}
