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
        assert!(
            out.status.success(),
            "scripts/services up failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
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
    let old: Vec<(String,)> =
        sqlx::query_as("SELECT datname FROM pg_database WHERE datname LIKE 'vitals_it_%'").fetch_all(&admin).await.unwrap();
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

/// `vars` with `key` set to `value` (replacing it if present): a child's environment with one
/// setting changed.
pub fn with(mut vars: Vec<(String, String)>, key: &str, value: &str) -> Vec<(String, String)> {
    vars.retain(|(k, _)| k != key);
    vars.push((key.to_owned(), value.to_owned()));
    vars
}

/// A TCP port nobody listens on right now (for a child's metrics or API listener).
/// The sum of every sample of the metric family `name` in a Prometheus text exposition (over its
/// label sets; 0 when it is absent).
pub fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl TestEnv {
    /// The read API of this test's world, served in-process on port 0; its base URL.
    pub async fn serve_api(&self) -> String {
        let pool = sqlx::PgPool::connect(&self.db_url).await.unwrap();
        let api = vitals::app::api(&self.cfg, pool, false).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = app::serve(listener, vitals_api::router(api), std::future::pending()).await;
        });
        base
    }

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
        let prefix = format!("{}.", unique("it"));
        let mut all: Vec<(&str, &str)> = vec![("VITALS_REGISTRY__URL", registry_url.as_str())];
        all.extend_from_slice(overrides);
        let cfg = config(&db_url, &prefix, brokers, &all);
        // The registry takes the same credentials the roles send ([registry] in the config).
        let router = vitals_registry::router(pool.clone(), app::registry_access(&cfg).expect("registry credentials"));
        tasks.push(tokio::spawn(async move {
            let _ = app::serve(registry, router, std::future::pending()).await;
        }));

        app::create_topics(&cfg).await.expect("creating topics");
        app::register_schemas(&cfg).await.expect("registering schemas");

        let ingest = app::ingest(&cfg, pool.clone()).await.expect("building the edge");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ingest_url = format!("http://{}", listener.local_addr().unwrap());
        let router = vitals_ingest::router(Arc::clone(&ingest));
        let header_timeout = Duration::from_millis(cfg.ingest.header_timeout_ms);
        tasks.push(tokio::spawn(async move {
            let _ = app::serve_with(listener, router, std::future::pending(), header_timeout).await;
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
        vitals_auth::mint_hs256(self.cfg.auth.hs256_secret.expose().as_bytes(), &self.cfg.auth.issuer, &self.cfg.auth.audience, user, 3600)
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

/// SIGKILL a child, if any, and reap it.
fn kill_and_reap(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits (30 s at most) until something accepts TCP connections on `addr`.
pub async fn wait_listening(what: &str, addr: &str) {
    wait_for(what, Duration::from_secs(30), || async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) }).await;
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

    pub fn binary() -> PathBuf {
        let cache = std::env::var("VITALS_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/vitals"));
        cache.join("nisshi-0.8.1/bin/nisshi")
    }

    /// Starts (again) on the same port and storage, and waits until it accepts connections.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(Self::binary())
            .args([
                "broker",
                "--silent",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--group-initial-rebalance-delay",
                "0s",
            ])
            .arg("--storage-engine")
            .arg(format!("{}?sslmode=disable", self.storage_db))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nisshi (built by scripts/services up)");
        self.child = Some(child);
        let addr = self.addr();
        wait_listening("own nisshi broker to listen", &addr).await;
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `vitals <args>` child process the test can `kill -9`, freeze and restart.
pub struct VitalsProc {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where its standard output goes (appended; default: nowhere).
    pub stdout: Option<std::path::PathBuf>,
    /// Where its standard error goes (appended; default: the test's).
    pub stderr: Option<std::path::PathBuf>,
    child: Option<Child>,
}

impl VitalsProc {
    pub fn new(args: &[&str], env: Vec<(String, String)>) -> VitalsProc {
        VitalsProc { args: args.iter().map(|s| s.to_string()).collect(), env, stdout: None, stderr: None, child: None }
    }
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{:?} already running", self.args);
        let stdout = match &self.stdout {
            Some(p) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(p).expect("the child's stdout file")),
            None => Stdio::null(),
        };
        let stderr = match &self.stderr {
            Some(p) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(p).expect("the child's stderr file")),
            None => Stdio::inherit(),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_vitals"))
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("starting vitals");
        self.child = Some(child);
    }
    /// SIGTERM (a graceful stop), and reap within `timeout`.
    pub fn terminate(&mut self, timeout: std::time::Duration) {
        if let Some(c) = self.child.as_mut() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let until = std::time::Instant::now() + timeout;
            while std::time::Instant::now() < until {
                if c.try_wait().ok().flatten().is_some() {
                    self.child = None;
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        self.kill9();
    }
    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        kill_and_reap(&mut self.child);
    }
    /// `None` while running; the exit status once it has exited by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
    /// Waits (at most `timeout`) for it to exit by itself; its exit status.
    pub async fn wait_exit(&mut self, what: &str, timeout: Duration) -> std::process::ExitStatus {
        wait_for(what, timeout, || {
            let s = self.exited();
            async move { s }
        })
        .await
    }
}

impl Drop for VitalsProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl TestEnv {
    /// The environment a `vitals` child process needs to join this test's world.
    pub fn child_env(&self, data_dir: &std::path::Path) -> Vec<(String, String)> {
        vec![
            ("VITALS_KAFKA__BROKERS".into(), self.cfg.kafka.brokers.clone()),
            ("VITALS_KAFKA__TOPIC_PREFIX".into(), self.cfg.kafka.topic_prefix.clone()),
            ("VITALS_KAFKA__PARTITIONS".into(), self.cfg.kafka.partitions.to_string()),
            ("VITALS_REGISTRY__URL".into(), self.cfg.registry.url.clone()),
            ("VITALS_POSTGRES__URL".into(), self.db_url.clone()),
            ("VITALS_PROCESSORS__DATA_DIR".into(), data_dir.display().to_string()),
            ("VITALS_PROCESSORS__MAX_BATCH".into(), "50".into()),
            ("VITALS_PROCESSORS__MAX_WAIT_MS".into(), "50".into()),
            // The tests sign with the development secret committed in config/default.toml.
            ("VITALS_AUTH__ALLOW_INSECURE_DEV_SECRET".into(), "true".into()),
            ("RUST_LOG".into(), "warn".into()),
        ]
    }
}

/// A PostgreSQL server of the test's own (own data directory and port), for tests that crash
/// and restart it without disturbing the shared one other tests use.
pub struct OwnPostgres {
    pub port: u16,
    pub dir: PathBuf,
    /// Extra server options (`-c name=value ...`).
    options: String,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn as_postgres(args: &[&str]) -> std::process::Output {
    // initdb and postgres refuse to run as root; the Debian package's `postgres` user runs them.
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).args(args);
        c
    } else {
        let mut c = Command::new(args[0]);
        c.args(&args[1..]);
        c
    };
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("running {args:?}: {e}"))
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

impl OwnPostgres {
    pub async fn start() -> OwnPostgres {
        OwnPostgres::start_with(|_| String::new()).await
    }

    /// With extra server options, made from the server's directory (owned by `postgres`, so
    /// files the options name, such as a TLS key, can be put there).
    pub async fn start_with(options: impl FnOnce(&std::path::Path) -> String) -> OwnPostgres {
        services_up();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("vitals-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status();
        let data = dir.join("data");
        let out = as_postgres(&[&format!("{PG_BIN}/initdb"), "-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"]);
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let options = options(&dir);
        let _ = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status();
        let pg = OwnPostgres { port, dir, options };
        pg.up().await;
        pg
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub async fn up(&self) {
        let data = self.dir.join("data");
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off {}", self.port, self.dir.display(), self.options);
        let log = self.dir.join("log");
        let out = as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "-t",
            "60",
            "start",
        ]);
        assert!(out.status.success(), "pg_ctl start: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let url = format!("{}?sslmode=disable", self.url("postgres"));
        wait_for("own PostgreSQL to accept connections", Duration::from_secs(30), || {
            let url = url.clone();
            async move { PgPool::connect(&url).await.ok().map(drop) }
        })
        .await;
    }

    /// Stops it the way a crash would (`immediate`: no shutdown checkpoint; recovery at start).
    pub fn crash(&self) {
        let data = self.dir.join("data");
        let out = as_postgres(&[&format!("{PG_BIN}/pg_ctl"), "-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A migrated database on it.
    pub async fn database(&self, name: &str) -> (String, PgPool) {
        let admin = PgPool::connect(&self.url("postgres")).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
        admin.close().await;
        let url = self.url(name);
        let pool = PgPool::connect(&url).await.unwrap();
        app::migrate(&pool).await.expect("migrations");
        (url, pool)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = as_postgres(&[&format!("{PG_BIN}/pg_ctl"), "-D", data.to_str().unwrap(), "-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis server of the test's own (own port, nothing on disk), for tests that stop it.
pub struct OwnRedis {
    pub port: u16,
    /// Extra server arguments (e.g. TLS: then `port` is the TLS port and plain TCP is off).
    args: Vec<String>,
    child: Option<Child>,
}

impl OwnRedis {
    pub async fn start() -> OwnRedis {
        services_up();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut r = OwnRedis { port, args: Vec::new(), child: None };
        r.restart().await;
        r
    }
    /// A Redis serving only TLS on its port, with `cert` and `key`, not asking clients for
    /// certificates.
    pub async fn start_tls(cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path) -> OwnRedis {
        services_up();
        let port = free_port();
        let args = ["--port", "0", "--tls-port", &port.to_string(), "--tls-auth-clients", "no"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--tls-cert-file".into(), cert.display().to_string(), "--tls-key-file".into(), key.display().to_string()])
            .chain(["--tls-ca-cert-file".into(), ca.display().to_string()])
            .collect();
        let mut r = OwnRedis { port, args, child: None };
        r.restart().await;
        r
    }
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
    /// Starts (again) on the same port and waits until it accepts connections.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let mut cmd = Command::new("redis-server");
        if self.args.is_empty() {
            cmd.args(["--port", &self.port.to_string()]);
        }
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server (installed by scripts/services up)");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        wait_listening("own Redis to listen", &addr).await;
    }
    /// `kill -9`.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The read API and realtime gateway in-process on port 0 over a fresh database and the shared
/// Redis, for tests that need no broker (input validation, WebSocket limits).
pub struct ApiEnv {
    pub cfg: Config,
    pub pool: PgPool,
    pub db_url: String,
    pub url: String,
    task: JoinHandle<()>,
}

impl ApiEnv {
    pub async fn start(overrides: &[(&str, &str)]) -> ApiEnv {
        services_up();
        let (db_url, pool) = fresh_db().await;
        let cfg = config(&db_url, &format!("{}.", unique("api")), KAFKA, overrides);
        let api = app::api(&cfg, pool.clone(), true).await.expect("building the API");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let header_timeout = Duration::from_millis(cfg.api.header_timeout_ms);
        let router = vitals_api::router(api);
        let task = tokio::spawn(async move {
            let _ = app::serve_with(listener, router, std::future::pending(), header_timeout).await;
        });
        ApiEnv { cfg, pool, db_url, url, task }
    }

    pub fn token(&self, user: &str, ttl_secs: u64) -> String {
        vitals_auth::mint_hs256(
            self.cfg.auth.hs256_secret.expose().as_bytes(),
            &self.cfg.auth.issuer,
            &self.cfg.auth.audience,
            user,
            ttl_secs,
        )
    }

    pub async fn cleanup(self) {
        self.task.abort();
        self.pool.close().await;
        drop_db(&self.db_url).await;
    }
}
