//! Test harness: makes sure the services run, then gives each test a fresh database, a fresh
//! topic prefix, its own schema registry and ingest edge on port 0, and helpers to read topics.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use vitals::app;
use vitals::config::Config;
use vitals_schemas::topics::Topics;

pub const PG_ADMIN: &str = "postgres://postgres:postgres@127.0.0.1:5432";
pub const KAFKA: &str = "127.0.0.1:19092";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/services up` once per test process: installs and starts whatever is missing.
pub fn services_up() {
    static UP: OnceLock<()> = OnceLock::new();
    UP.get_or_init(|| {
        let out = Command::new(root().join("scripts/services"))
            .args(["up", "--no-registry"])
            .stdin(Stdio::null())
            .output()
            .expect("running scripts/services");
        assert!(out.status.success(), "scripts/services up failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    });
}

/// Polls `check` until it returns `Some`, or fails with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_for_every(what, timeout, Duration::from_millis(50), check).await
}

/// [`wait_for`] with a chosen polling interval, for checks that are expensive themselves.
pub async fn wait_for_every<T, F, Fut>(what: &str, timeout: Duration, every: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(every).await;
    }
}

fn unique(tag: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    format!("{tag}_{secs}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Creates a fresh database (and drops test databases older than an hour, left by killed runs).
pub async fn fresh_db() -> (String, PgPool) {
    let admin = PgPool::connect(&format!("{PG_ADMIN}/postgres")).await.expect("connecting to PostgreSQL");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let old: Vec<(String,)> = sqlx::query_as("SELECT datname FROM pg_database WHERE datname LIKE 'vitals_it_%'").fetch_all(&admin).await.unwrap();
    for (name,) in old {
        let created = name.split('_').nth(2).and_then(|s| s.parse::<u64>().ok()).unwrap_or(now);
        if now.saturating_sub(created) > 3600 {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await;
        }
    }
    let name = unique("vitals_it");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("creating the test database");
    admin.close().await;
    let url = format!("{PG_ADMIN}/{name}");
    let pool = PgPool::connect(&url).await.expect("connecting to the test database");
    app::migrate(&pool).await.expect("migrations");
    (url, pool)
}

pub async fn drop_db(name_url: &str) {
    let name = name_url.rsplit('/').next().unwrap().to_owned();
    if let Ok(admin) = PgPool::connect(&format!("{PG_ADMIN}/postgres")).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await;
    }
}

/// A configuration pointing at the shared services, a database and a topic prefix.
pub fn config(db_url: &str, prefix: &str, brokers: &str, overrides: &[(&str, &str)]) -> Config {
    let mut env: BTreeMap<String, String> = BTreeMap::from([
        ("VITALS_KAFKA__BROKERS".into(), brokers.into()),
        ("VITALS_KAFKA__TOPIC_PREFIX".into(), prefix.into()),
        ("VITALS_KAFKA__PARTITIONS".into(), "4".into()),
        ("VITALS_POSTGRES__URL".into(), db_url.into()),
        ("VITALS_POSTGRES__MAX_CONNECTIONS".into(), "8".into()),
    ]);
    for (k, v) in overrides {
        env.insert((*k).into(), (*v).into());
    }
    Config::from_sources(None, &env).expect("test config")
}

/// One test's world: database, registry, topics and ingest edge.
pub struct TestEnv {
    pub cfg: Config,
    pub pool: PgPool,
    pub db_url: String,
    pub ingest_url: String,
    pub http: reqwest::Client,
    tasks: Vec<JoinHandle<()>>,
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        TestEnv::start_with(KAFKA, &[]).await
    }

    /// Starts against `brokers` with extra `VITALS_*` overrides.
    pub async fn start_with(brokers: &str, overrides: &[(&str, &str)]) -> TestEnv {
        services_up();
        let (db_url, pool) = fresh_db().await;
        let mut tasks = Vec::new();

        let registry = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let registry_url = format!("http://{}", registry.local_addr().unwrap());
        let router = vitals::registry::router(pool.clone());
        tasks.push(tokio::spawn(async move {
            let _ = app::serve(registry, router, std::future::pending()).await;
        }));

        let prefix = format!("{}.", unique("it"));
        let mut all: Vec<(&str, &str)> = vec![("VITALS_REGISTRY__URL", registry_url.as_str())];
        all.extend_from_slice(overrides);
        let cfg = config(&db_url, &prefix, brokers, &all);
        app::create_topics(&cfg).await.expect("creating topics");
        app::register_schemas(&cfg).await.expect("registering schemas");

        let ingest = app::ingest(&cfg, pool.clone()).await.expect("building the edge");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ingest_url = format!("http://{}", listener.local_addr().unwrap());
        let router = vitals_ingest::router(Arc::clone(&ingest));
        tasks.push(tokio::spawn(async move {
            let _ = app::serve(listener, router, std::future::pending()).await;
        }));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        TestEnv { cfg, pool, db_url, ingest_url, http, tasks }
    }

    /// A simulator aimed at this edge: fresh user ids under `prefix`, this edge's token settings.
    pub fn sim(&self, prefix: &str, seed: u64, users: usize, days: u32) -> vitals::simulate::SimConfig {
        vitals::simulate::SimConfig {
            base_url: self.ingest_url.clone(),
            users,
            days,
            user_prefix: format!("{prefix}-{}-", uuid::Uuid::new_v4().simple()),
            seed,
            now_ms: chrono::Utc::now().timestamp_millis(),
            concurrency: 3,
            batch_size: 200,
            jwt_secret: self.cfg.auth.hs256_secret.expose().as_bytes().to_vec(),
            jwt_issuer: self.cfg.auth.issuer.clone(),
            jwt_audience: self.cfg.auth.audience.clone(),
            edits_and_deletions: true,
            ..vitals::simulate::SimConfig::default()
        }
    }

    pub fn topics(&self) -> Topics {
        app::topics(&self.cfg)
    }

    pub fn token(&self, user: &str) -> String {
        vitals_ingest::auth::mint_hs256(self.cfg.auth.hs256_secret.expose().as_bytes(), &self.cfg.auth.issuer, &self.cfg.auth.audience, user, 3600)
    }

    /// POSTs `body` (raw bytes) to `path` as `user` (no token when `None`).
    pub async fn post_raw(&self, path: &str, token: Option<&str>, body: Vec<u8>) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
        let mut req = self.http.post(format!("{}{path}", self.ingest_url)).header("content-type", "application/json").body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("HTTP request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, headers, json)
    }

    pub async fn post(&self, path: &str, user: &str, body: &serde_json::Value) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
        let t = self.token(user);
        self.post_raw(path, Some(&t), serde_json::to_vec(body).unwrap()).await
    }

    /// Sends the privacy consent every user needs before uploading samples.
    pub async fn consent(&self, user: &str, blocked: &[&str]) {
        let body = serde_json::json!({
            "request_id": format!("consent-{}", uuid::Uuid::new_v4()),
            "changes": [{"change_id": "privacy-1", "kind": "privacy_updated", "occurred_at": chrono::Utc::now().to_rfc3339(),
                         "privacy": {"health_upload_allowed": true, "blocked_metrics": blocked}}]
        });
        let (status, _, resp) = self.post("/v1/domain-changes:batch", user, &body).await;
        assert_eq!(status, 200, "consent: {resp}");
    }

    pub async fn read(&self, topic: &str) -> Vec<OwnedMessage> {
        app::read_all(&self.cfg, topic).await.expect("reading topic")
    }

    /// Drops the test's topics and database. (A failed test leaves them; stale test databases are
    /// dropped by later runs.)
    pub async fn cleanup(self) {
        use rdkafka::admin::AdminOptions;
        if let Ok(admin) = app::admin(&self.cfg) {
            let names: Vec<String> = self.topics().specs().into_iter().map(|s| s.name).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let _ = admin.delete_topics(&refs, &AdminOptions::new()).await;
        }
        for t in self.tasks {
            t.abort();
        }
        self.pool.close().await;
        drop_db(&self.db_url).await;
    }
}

pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter().find(|h| h.key == key).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

pub fn key(m: &OwnedMessage) -> String {
    String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned()
}

/// A nisshi broker of the test's own (its own port and storage database), for tests that stop it.
pub struct OwnBroker {
    pub port: u16,
    pub storage_db: String,
    child: Option<Child>,
}

impl OwnBroker {
    pub async fn start() -> OwnBroker {
        services_up();
        let (url, pool) = fresh_db().await;
        pool.close().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut b = OwnBroker { port, storage_db: url, child: None };
        b.restart().await;
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn binary() -> PathBuf {
        let cache = std::env::var("VITALS_CACHE").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/vitals"));
        cache.join("nisshi-0.8.1/bin/nisshi")
    }

    /// Starts (again) on the same port and storage, and waits until it accepts connections.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(Self::binary())
            .args(["broker", "--silent", "--listener-url", &url, "--advertised-listener-url", &url, "--group-initial-rebalance-delay", "0s"])
            .arg("--storage-engine")
            .arg(format!("{}?sslmode=disable", self.storage_db))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nisshi (built by scripts/services up)");
        self.child = Some(child);
        let addr = self.addr();
        wait_for("own nisshi broker to listen", Duration::from_secs(30), || {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ()) }
        })
        .await;
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
