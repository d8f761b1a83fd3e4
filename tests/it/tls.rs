//! TLS (and SASL) to the dependencies, against real servers with certificates signed by a CA the
//! test makes itself (`openssl`), verification on: a wrong CA or a name the certificate does not
//! carry must stop a role at start-up with a clear error, never connect.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{services_up, wait_for, wait_listening, with, OwnBroker, TestEnv, VitalsProc};

/// A certificate authority of the test's own, in its own directory.
pub struct TestCa {
    pub dir: PathBuf,
    pub cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).stdin(Stdio::null()).output().expect("running openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name} test CA"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        TestCa { cert: dir.join("ca.pem"), key: dir.join("ca.key"), dir }
    }

    /// A certificate for `sans` (e.g. `DNS:localhost`), signed by this CA: (certificate, key).
    pub fn issue(&self, name: &str, sans: &str) -> (PathBuf, PathBuf) {
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!("subjectAltName={sans}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"),
        )
        .unwrap();
        let (key, csr, cert) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        let ca_key = self.key.to_str().unwrap();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                ca_key,
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                ext.to_str().unwrap(),
            ],
        );
        (self.dir.join(cert), self.dir.join(key))
    }
}

/// A nisshi broker that serves only TLS (storage: a fresh PostgreSQL database), advertising
/// `localhost:<port>`; with `scram_user`, it first creates that SCRAM-SHA-512 user (on a
/// plaintext run of the same storage, as nisshi's `user create` speaks plaintext) and then
/// requires SASL authentication.
pub struct TlsBroker {
    pub port: u16,
    child: Child,
}

impl TlsBroker {
    pub async fn start(cert: &Path, key: &Path) -> TlsBroker {
        TlsBroker::start_with(cert, key, None).await
    }

    pub async fn start_with(cert: &Path, key: &Path, scram_user: Option<(&str, &str)>) -> TlsBroker {
        services_up();
        let (storage, pool) = crate::harness::fresh_db().await;
        pool.close().await;
        let storage = format!("{storage}?sslmode=disable");
        let port = crate::harness::free_port();
        let broker = |extra: &[&str]| {
            let mut c = Command::new(OwnBroker::binary());
            c.args(["broker", "--silent", "--group-initial-rebalance-delay", "0s", "--storage-engine", &storage])
                .arg("--listener-url")
                .arg(format!("tcp://127.0.0.1:{port}"))
                .arg("--advertised-listener-url")
                .arg(format!("tcp://localhost:{port}"))
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            c.spawn().expect("starting nisshi (built by scripts/services up)")
        };
        if let Some((user, password)) = scram_user {
            let mut plain = broker(&[]);
            wait_listening("the broker (plaintext, to create its user) to listen", &format!("127.0.0.1:{port}")).await;
            let out = Command::new(OwnBroker::binary())
                .args(["user", "create", "--broker", &format!("tcp://127.0.0.1:{port}"), "--mechanism", "scram512", user, password])
                .output()
                .expect("running nisshi user create");
            assert!(
                out.status.success(),
                "nisshi user create: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = plain.kill();
            let _ = plain.wait();
        }
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        let child = if scram_user.is_some() {
            broker(&["--cert", cert, "--key", key, "--authentication"])
        } else {
            broker(&["--cert", cert, "--key", key])
        };
        wait_listening("the TLS broker to listen", &format!("127.0.0.1:{port}")).await;
        TlsBroker { port, child }
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `vitals <args>` to completion with `env` added to this process's: (success, stdout,
/// stderr, how long it took).
fn run_vitals(env: &[(String, String)], args: &[&str]) -> (bool, String, String, Duration) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vitals"))
        .args(args)
        .envs(env.iter().cloned())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("running vitals");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr), t.elapsed())
}

/// `vitals topics stats` (a preflight, then admin and metadata requests): (success, stderr,
/// how long it took).
fn topics_stats(env: &[(String, String)]) -> (bool, String, Duration) {
    let (ok, _, stderr, took) = run_vitals(env, &["topics", "stats"]);
    (ok, stderr, took)
}

/// An upload of one heart-rate sample from five minutes ago.
fn one_sample(request_id: &str, record_id: &str) -> serde_json::Value {
    let now = chrono::Utc::now();
    json!({"request_id": request_id, "samples": [{"source": "com.apple.health.watch", "source_kind": "watch",
        "source_record_id": record_id, "metric": "heart_rate", "start": (now - chrono::Duration::minutes(5)).to_rfc3339(),
        "end": (now - chrono::Duration::minutes(4)).to_rfc3339(), "value": 61, "unit": "count/min", "time_zone": "UTC"}]})
}

#[tokio::test]
async fn kafka_over_tls_carries_uploads_through_a_processor_and_refuses_a_wrong_ca_or_name() {
    let ca = TestCa::new("kafka");
    let (cert, key) = ca.issue("broker", "DNS:localhost");
    let broker = TlsBroker::start(&cert, &key).await;
    let brokers = format!("localhost:{}", broker.port);
    let ca_path = ca.cert.display().to_string();
    let tls = [("VITALS_KAFKA__SECURITY_PROTOCOL", "ssl"), ("VITALS_KAFKA__SSL_CA_LOCATION", ca_path.as_str())];

    // The whole edge over TLS: topic creation, schema registration, the producer behind a 2xx.
    let env = TestEnv::start_with(&brokers, &tls).await;
    let user = "user-tls";
    env.consent(user, &[]).await;
    let body = one_sample("req-tls", "tls-1");
    let (status, _, out) = env.post("/v1/health/samples:batch", user, &body).await;
    assert_eq!(status, 200, "upload over a TLS broker: {out}");

    // A processor (consumer group, producer, checkpoints) over TLS emits the user's rollup.
    let data = tempdir("tls-process");
    let mut child_env = env.child_env(&data);
    child_env.extend(tls.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut process = VitalsProc::new(&["process", "rollup_day"], child_env.clone());
    process.start();
    wait_for("rollup_day to emit the TLS user's day over the TLS broker", Duration::from_secs(120), || async {
        (!env.read(&env.topics().rollup_day).await.is_empty()).then_some(())
    })
    .await;
    process.terminate(Duration::from_secs(20));

    let (ok, stderr, _) = topics_stats(&child_env);
    assert!(ok, "vitals topics stats over TLS failed:\n{stderr}");

    // Another CA: the broker's certificate cannot be verified. The role stops, saying why.
    let other = TestCa::new("other");
    let (ok, stderr, took) = topics_stats(&with(child_env.clone(), "VITALS_KAFKA__SSL_CA_LOCATION", other.cert.to_str().unwrap()));
    assert!(!ok, "a broker certificate from an unknown CA was accepted:\n{stderr}");
    assert!(
        stderr.contains("refused the connection") && stderr.contains("certificate verify failed"),
        "unclear error for a wrong CA:\n{stderr}"
    );
    assert!(took < Duration::from_secs(30), "a wrong CA took {took:?} to be reported");

    // The right CA but an address the certificate does not name (it names only `localhost`).
    let (ok, stderr, _) = topics_stats(&with(child_env.clone(), "VITALS_KAFKA__BROKERS", &format!("127.0.0.1:{}", broker.port)));
    assert!(!ok, "a broker certificate for another name was accepted:\n{stderr}");
    assert!(stderr.contains("refused the connection"), "unclear error for a wrong name:\n{stderr}");

    // Plaintext against a TLS listener: librdkafka sees only silence (no handshake to fail), so
    // the role warns with the likely cause and goes on like in an outage; `topics stats` fails.
    let (ok, stderr, _) =
        topics_stats(&with(with(child_env.clone(), "VITALS_KAFKA__SECURITY_PROTOCOL", "plaintext"), "VITALS_KAFKA__SSL_CA_LOCATION", ""));
    assert!(!ok, "plaintext to a TLS listener went on:\n{stderr}");
    assert!(stderr.contains("kafka.security_protocol (plaintext) must say so"), "no hint for plaintext to a TLS listener:\n{stderr}");

    // A setting that cannot work is refused before any connection, naming the key.
    let (ok, stderr, _) = topics_stats(&with(child_env.clone(), "VITALS_KAFKA__SECURITY_PROTOCOL", "tls"));
    assert!(!ok && stderr.contains("kafka.security_protocol"), "{stderr}");
    let (ok, stderr, _) = topics_stats(&with(child_env.clone(), "VITALS_KAFKA__SSL_CA_LOCATION", "/nonexistent/ca.pem"));
    assert!(!ok && stderr.contains("kafka.ssl_ca_location"), "{stderr}");
    env.cleanup().await;
}

#[tokio::test]
async fn kafka_sasl_scram_over_tls_authenticates_and_a_wrong_password_stops_the_role() {
    let ca = TestCa::new("sasl");
    let (cert, key) = ca.issue("broker", "DNS:localhost");
    let broker = TlsBroker::start_with(&cert, &key, Some(("vitals", "s3cret-pass"))).await;
    let ca_path = ca.cert.display().to_string();
    let sasl = [
        ("VITALS_KAFKA__SECURITY_PROTOCOL", "sasl_ssl"),
        ("VITALS_KAFKA__SSL_CA_LOCATION", ca_path.as_str()),
        ("VITALS_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
        ("VITALS_KAFKA__SASL_USERNAME", "vitals"),
        ("VITALS_KAFKA__SASL_PASSWORD", "s3cret-pass"),
    ];
    let env = TestEnv::start_with(&format!("localhost:{}", broker.port), &sasl).await;
    let user = "user-sasl";
    env.consent(user, &[]).await;
    let body = one_sample("req-sasl", "sasl-1");
    let (status, _, out) = env.post("/v1/health/samples:batch", user, &body).await;
    assert_eq!(status, 200, "upload over SASL_SSL: {out}");
    assert!(!env.read(&env.topics().hot).await.is_empty(), "the upload is not in its lane");

    let mut child_env = env.child_env(&tempdir("sasl-unused"));
    child_env.extend(sasl.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let (ok, stderr, _) = topics_stats(&child_env);
    assert!(ok, "vitals topics stats over SASL_SSL failed:\n{stderr}");
    let (ok, stderr, took) = topics_stats(&with(child_env.clone(), "VITALS_KAFKA__SASL_PASSWORD", "wrong"));
    assert!(!ok, "a wrong SASL password was accepted:\n{stderr}");
    assert!(stderr.contains("refused the connection"), "unclear error for a wrong SASL password:\n{stderr}");
    assert!(took < Duration::from_secs(30), "a wrong password took {took:?} to be reported");
    let (ok, stderr, _) = topics_stats(&with(child_env.clone(), "VITALS_KAFKA__SASL_PASSWORD", ""));
    assert!(!ok && stderr.contains("kafka.sasl_password"), "{stderr}");
    env.cleanup().await;
}

#[tokio::test]
async fn postgres_over_tls_verifies_the_server_and_a_wrong_ca_or_name_stops_the_role() {
    let ca = TestCa::new("pg");
    let (cert, key) = ca.issue("postgres", "DNS:localhost");
    let pg = crate::harness::OwnPostgres::start_with(|dir| {
        std::fs::copy(&cert, dir.join("server.pem")).unwrap();
        std::fs::copy(&key, dir.join("server.key")).unwrap();
        let mut perms = std::fs::metadata(dir.join("server.key")).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
        std::fs::set_permissions(dir.join("server.key"), perms).unwrap();
        format!("-c ssl=on -c ssl_cert_file={0}/server.pem -c ssl_key_file={0}/server.key", dir.display())
    })
    .await;
    let url =
        |host: &str, ca: &Path| format!("postgres://postgres@{host}:{}/postgres?sslmode=verify-full&sslrootcert={}", pg.port, ca.display());

    // A role's pool over TLS: the server reports the connection as encrypted; migrations run.
    let cfg = crate::harness::config(&url("localhost", &ca.cert), "tls-pg.", crate::harness::KAFKA, &[]);
    let pool = vitals::app::pg_pool(&cfg).await.expect("a TLS pool");
    let (ssl,): (bool,) = sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetch_one(&pool).await.unwrap();
    assert!(ssl, "the connection is not encrypted");
    vitals::app::migrate(&pool).await.expect("migrations over TLS");
    pool.close().await;

    let migrate = |db_url: String| {
        let (ok, _, stderr, _) = run_vitals(&[("VITALS_POSTGRES__URL".into(), db_url)], &["migrate"]);
        (ok, stderr)
    };
    let (ok, stderr) = migrate(url("localhost", &ca.cert));
    assert!(ok, "vitals migrate over TLS failed:\n{stderr}");
    let other = TestCa::new("pg-other");
    let (ok, stderr) = migrate(url("localhost", &other.cert));
    assert!(!ok, "a server certificate from an unknown CA was accepted:\n{stderr}");
    assert!(stderr.contains("PostgreSQL TLS refused") && stderr.contains("UnknownIssuer"), "unclear error for a wrong CA:\n{stderr}");
    let (ok, stderr) = migrate(url("127.0.0.1", &ca.cert));
    assert!(!ok, "a server certificate for another name was accepted:\n{stderr}");
    assert!(stderr.contains("PostgreSQL TLS refused"), "unclear error for a wrong name:\n{stderr}");

    // A long-running role waits out a PostgreSQL outage, but not a refused certificate: the sink
    // stops at once, non-zero, so its supervisor shows a crash loop with the reason.
    let err_file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-sink-{}.err", uuid::Uuid::new_v4().simple()));
    let mut sink = VitalsProc::new(
        &["sink"],
        vec![
            ("VITALS_POSTGRES__URL".into(), url("localhost", &other.cert)),
            ("VITALS_KAFKA__TOPIC_PREFIX".into(), format!("tls-sink-{}.", uuid::Uuid::new_v4().simple())),
            ("VITALS_SINK__METRICS_LISTEN".into(), String::new()),
            ("RUST_LOG".into(), "warn".into()),
        ],
    );
    sink.stderr = Some(err_file.clone());
    sink.start();
    let status = sink.wait_exit("the sink to stop on a refused PostgreSQL certificate", Duration::from_secs(60)).await;
    let stderr = std::fs::read_to_string(&err_file).unwrap_or_default();
    assert!(!status.success() && stderr.contains("PostgreSQL TLS refused"), "{status:?}:\n{stderr}");
}

#[tokio::test]
async fn redis_over_tls_carries_realtime_envelopes_and_refuses_a_wrong_ca() {
    let ca = TestCa::new("redis");
    let (cert, key) = ca.issue("redis", "DNS:localhost");
    let redis = crate::harness::OwnRedis::start_tls(&cert, &key, &ca.cert).await;
    let tls_url = format!("rediss://localhost:{}", redis.port);
    let ca_path = ca.cert.display().to_string();
    let cfg = crate::harness::config(
        "postgres://unused",
        "tls-redis.",
        crate::harness::KAFKA,
        &[("VITALS_REDIS__URL", tls_url.as_str()), ("VITALS_REDIS__CA_FILE", ca_path.as_str())],
    );
    // The client the sink's publisher and the gateway's hub are built with: a message published
    // over one TLS connection reaches a subscriber on another.
    let client = vitals::app::redis_client(&cfg).expect("a TLS client");
    let mut sub = client.get_async_pubsub().await.expect("a TLS pub/sub connection");
    sub.subscribe("vitals:user:u-tls").await.unwrap();
    let mut publisher = client.get_multiplexed_async_connection().await.expect("a TLS connection");
    vitals::app::publisher(&cfg).expect("the sink's publisher over TLS");
    let mut messages = sub.on_message();
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let _: () = redis::AsyncCommands::publish(&mut publisher, "vitals:user:u-tls", "{\"hello\":\"tls\"}").await.unwrap();
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut messages)).await {
                return m.get_payload::<String>().unwrap();
            }
        }
    })
    .await
    .expect("no envelope arrived over TLS within 30 s");
    assert_eq!(got, "{\"hello\":\"tls\"}");

    let other = TestCa::new("redis-other");
    let bad = crate::harness::config(
        "postgres://unused",
        "tls-redis.",
        crate::harness::KAFKA,
        &[("VITALS_REDIS__URL", tls_url.as_str()), ("VITALS_REDIS__CA_FILE", other.cert.to_str().unwrap())],
    );
    let Err(err) = vitals::app::redis_client(&bad).unwrap().get_multiplexed_async_connection().await else {
        panic!("a Redis certificate from an unknown CA was accepted")
    };
    assert!(format!("{err}").to_lowercase().contains("certificate"), "unclear error for a wrong CA: {err}");
    let plain = crate::harness::config(
        "postgres://unused",
        "tls-redis.",
        crate::harness::KAFKA,
        &[("VITALS_REDIS__URL", "redis://localhost:1"), ("VITALS_REDIS__CA_FILE", ca_path.as_str())],
    );
    assert!(vitals::app::redis_client(&plain).is_err(), "redis.ca_file with a plaintext URL was accepted");
}

/// A TLS-terminating proxy of the test's own (rustls) in front of a plain TCP server: what a
/// load balancer or ingress with a certificate does for the registry, S3 or an IdP's JWKS.
pub struct TlsProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    pub async fn start(cert: &Path, key: &Path, backend: String) -> TlsProxy {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, backend) = (acceptor.clone(), backend.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else { return };
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&backend).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
            }
        });
        TlsProxy { port, task }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// Multi-threaded: the proxies and the registry run in this process while a worker blocks on a
// `vitals` child.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn https_to_the_jwks_the_registry_and_s3_verifies_the_server_with_the_configured_ca() {
    let ca = TestCa::new("https");
    let other = TestCa::new("https-other");
    let (cert, key) = ca.issue("https", "DNS:localhost");
    let env = TestEnv::start().await;

    // The registry behind TLS: `vitals schemas check` (reader credential, schema reads).
    let registry = env.cfg.registry.url.trim_start_matches("http://").to_owned();
    let proxy = TlsProxy::start(&cert, &key, registry).await;
    let mut child_env = env.child_env(&tempdir("https-unused"));
    child_env.push(("VITALS_REGISTRY__URL".into(), format!("https://localhost:{}", proxy.port)));
    let run = |env: &[(String, String)], args: &[&str]| {
        let (ok, stdout, stderr, _) = run_vitals(env, args);
        (ok, format!("{stdout}{stderr}"))
    };
    let (ok, out) = run(&with(child_env.clone(), "VITALS_REGISTRY__CA_FILE", ca.cert.to_str().unwrap()), &["schemas", "check"]);
    assert!(ok, "vitals schemas check over https failed:\n{out}");
    let (ok, out) = run(&with(child_env.clone(), "VITALS_REGISTRY__CA_FILE", other.cert.to_str().unwrap()), &["schemas", "check"]);
    assert!(!ok && out.contains("certificate"), "an https registry with an unknown CA was accepted or unclear:\n{out}");
    let (ok, out) = run(&with(child_env.clone(), "VITALS_REGISTRY__CA_FILE", "/nonexistent.pem"), &["schemas", "check"]);
    assert!(!ok && out.contains("registry.ca_file"), "{out}");

    // The JWKS of an IdP behind TLS: `vitals api` fetches it at start-up.
    let jwks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_addr = jwks.local_addr().unwrap().to_string();
    let body = std::fs::read_to_string(crate::harness::root().join("auth/testdata/jwks.json")).unwrap();
    let server = tokio::spawn(async move {
        let router = axum::Router::new().route("/jwks.json", axum::routing::get(move || async move { body }));
        let _ = axum::serve(jwks, router).await;
    });
    let idp = TlsProxy::start(&cert, &key, jwks_addr).await;
    let api_port = crate::harness::free_port();
    let api_env = {
        let mut e = with(child_env.clone(), "VITALS_AUTH__JWKS_URL", &format!("https://localhost:{}/jwks.json", idp.port));
        e.push(("VITALS_API__LISTEN".into(), format!("127.0.0.1:{api_port}")));
        e
    };
    let mut api = VitalsProc::new(&["api"], with(api_env.clone(), "VITALS_AUTH__JWKS_CA_FILE", ca.cert.to_str().unwrap()));
    api.start();
    let http = reqwest::Client::new();
    wait_for("vitals api with an https JWKS to serve /healthz", Duration::from_secs(60), || {
        let (http, url) = (http.clone(), format!("http://127.0.0.1:{api_port}/healthz"));
        async move { http.get(url).send().await.ok().filter(|r| r.status().is_success()).map(drop) }
    })
    .await;
    api.terminate(Duration::from_secs(20));
    let (ok, out) = run(&with(api_env.clone(), "VITALS_AUTH__JWKS_CA_FILE", other.cert.to_str().unwrap()), &["api"]);
    assert!(!ok && out.contains("auth.jwks_url"), "an https JWKS with an unknown CA was accepted or unclear:\n{out}");
    server.abort();

    // S3 behind TLS: the snapshot store's client writes and reads an object.
    let s3 = TlsProxy::start(&cert, &key, env.cfg.s3.endpoint.trim_start_matches("http://").to_owned()).await;
    let endpoint = format!("https://localhost:{}", s3.port);
    let ca_path = ca.cert.display().to_string();
    let cfg = crate::harness::config(
        &env.db_url,
        "tls-s3.",
        crate::harness::KAFKA,
        &[("VITALS_S3__ENDPOINT", endpoint.as_str()), ("VITALS_S3__CA_FILE", ca_path.as_str())],
    );
    let client = vitals::app::s3_client(&cfg).unwrap();
    client.ensure_bucket().await.expect("the bucket over https");
    let key_name = format!("tls-test/{}", uuid::Uuid::new_v4().simple());
    client.put(&key_name, b"over tls".to_vec()).await.expect("a put over https");
    assert_eq!(client.get(&key_name).await.expect("a get over https").as_deref(), Some(&b"over tls"[..]));
    let bad = crate::harness::config(
        &env.db_url,
        "tls-s3.",
        crate::harness::KAFKA,
        &[("VITALS_S3__ENDPOINT", endpoint.as_str()), ("VITALS_S3__CA_FILE", other.cert.to_str().unwrap())],
    );
    let err = vitals::app::s3_client(&bad).unwrap().get(&key_name).await.expect_err("an https S3 with an unknown CA was accepted");
    assert!(format!("{err}").contains("certificate"), "unclear S3 error for a wrong CA: {err}");
    env.cleanup().await;
}

fn tempdir(tag: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{tag}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
