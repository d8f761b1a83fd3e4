//! The composition root's builders: every client, pool and component is made here from the
//! [`Config`] and handed to the library crates by constructor.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tracing::info;
use vitals_auth::{AuthConfig, JwtVerifier};
use vitals_ingest::request::Rules;
use vitals_ingest::writer::LaneWriter;
use vitals_ingest::{Ingest, IngestConfig, Readiness};
use vitals_registry::client::{RegistryClient, SubjectState};
use vitals_schemas::codec::Codec;
use vitals_schemas::topics::{TopicRole, Topics};

use crate::config::Config;

/// Every table of `migrations/`, applied in order.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn pg_pool(cfg: &Config) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(cfg.postgres.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(cfg.postgres.url.expose())
        .await
        .map_err(|e| {
            let e = anyhow::Error::from(e);
            if tls_refused(&e) {
                e.context(PgTlsRefused)
            } else {
                e.context("connecting to PostgreSQL (postgres.url)")
            }
        })
}

/// The context of a connection attempt whose TLS was refused ([`pg_pool`]): what
/// [`pg_ready_with_tables`] stops on, and only then (TLS errors later in a session, a failover
/// tearing a connection, are outages like any other).
#[derive(Debug)]
pub struct PgTlsRefused;

impl std::fmt::Display for PgTlsRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "PostgreSQL TLS refused (postgres.url: sslmode, sslrootcert = the CA that signed the server's certificate; \
             the host must be a name the certificate carries)",
        )
    }
}

/// A TLS handshake refused (unknown CA, wrong name) or a TLS setting that cannot work: no
/// retry cures it, so roles stop at once instead of waiting it out like an outage.
pub fn tls_refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<sqlx::Error>(), Some(sqlx::Error::Tls(_) | sqlx::Error::Configuration(_)))
            || c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).is_some_and(|inner| inner.is::<rustls::Error>())
            || c.is::<rustls::Error>()
    })
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("running migrations/")
}

/// A migrated pool for a long-running worker: while PostgreSQL is unreachable (a restart, a
/// failover) it retries with backoff instead of exiting, for up to five minutes or until `stop`.
pub async fn pg_ready(cfg: &Config, stop: &std::sync::atomic::AtomicBool) -> anyhow::Result<PgPool> {
    Ok(pg_ready_then(cfg, stop, |_| async { anyhow::Ok(()) }).await?.0)
}

/// [`pg_ready`] for a sink of `projections`: those it applies (a retired base version is
/// applied no more: its table is gone and nothing reads it), their tables created when missing
/// as part of being ready.
pub async fn pg_ready_with_tables(
    cfg: &Config,
    stop: &std::sync::atomic::AtomicBool,
    projections: Vec<vitals_sinks::Projection>,
) -> anyhow::Result<(PgPool, Vec<vitals_sinks::Projection>)> {
    pg_ready_then(cfg, stop, |pool| {
        let projections = projections.clone();
        async move {
            let retired = crate::replay::retired_bases(&pool).await?;
            let (gone, applied): (Vec<_>, Vec<_>) =
                projections.iter().copied().partition(|p| p.version.is_none() && retired.iter().any(|r| r == p.name()));
            if !gone.is_empty() {
                tracing::info!(retired = ?gone, "retired base versions are not applied");
            }
            vitals_sinks::postgres::ensure_tables(&pool, &applied).await.context("creating the projection tables")?;
            anyhow::Ok(applied)
        }
    })
    .await
}

/// [`pg_ready`] with `step` (start-up work against PostgreSQL) as part of being ready: the
/// database going away between the migrations and the step is waited out like any outage.
/// Stops at once, without retrying, on what no retry cures: a refused TLS handshake and a
/// table its descriptor cannot be applied to.
pub async fn pg_ready_then<T, F, Fut>(cfg: &Config, stop: &std::sync::atomic::AtomicBool, step: F) -> anyhow::Result<(PgPool, T)>
where
    F: Fn(PgPool) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut wait = Duration::from_millis(200);
    loop {
        let attempt = async {
            let pool = pg_pool(cfg).await?;
            migrate(&pool).await?;
            let done = step(pool.clone()).await?;
            anyhow::Ok((pool, done))
        };
        match attempt.await {
            Ok(ready) => return Ok(ready),
            // A table its descriptor cannot be applied to stays so: said at once, not retried.
            Err(e)
                if e.chain().any(|c| {
                    matches!(c.downcast_ref::<vitals_sinks::postgres::TableError>(), Some(vitals_sinks::postgres::TableError::Breaking(_)))
                }) =>
            {
                return Err(e)
            }
            // A TLS handshake refused (unknown CA, wrong name) or a TLS setting that cannot work
            // is configuration: no retry cures it.
            Err(e) if e.downcast_ref::<PgTlsRefused>().is_some() => return Err(e),
            Err(e) if std::time::Instant::now() < deadline && !stop.load(std::sync::atomic::Ordering::Relaxed) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = wait.as_millis() as u64, "PostgreSQL not ready; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The descriptors of every registered processor's projection (what the sink applies and the
/// read API serves).
pub fn projections() -> Vec<&'static vitals_schemas::projection::Descriptor> {
    vitals_runtime::registry::projections().into_iter().map(|p| p.descriptor).collect()
}

/// The topics of this deployment: the lanes, the dead-letter topic and every registered
/// processor's output.
pub fn topics(cfg: &Config) -> Topics {
    Topics::with_prefix(&cfg.kafka.topic_prefix).with_projections(projections())
}

/// The consumer group of processor `name`.
pub fn processor_group(cfg: &Config, name: &str) -> String {
    format!("{}vitals-proc-{name}", cfg.kafka.topic_prefix)
}

/// The consumer group of the PostgreSQL sink.
pub fn sink_group(cfg: &Config) -> String {
    format!("{}vitals-sink-postgres", cfg.kafka.topic_prefix)
}

/// This process among its role's instances: `$VITALS_INSTANCE`, or the host name (a pod's name
/// in Kubernetes) and the process id.
pub fn instance() -> String {
    if let Ok(i) = std::env::var("VITALS_INSTANCE") {
        return i;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty());
    format!("{}-{}", host.unwrap_or_else(|| "localhost".into()), std::process::id())
}

/// The Kafka client id of a role (and processor): `vitals-<role>[-<what>]-<instance>`, what the
/// broker's logs and `kafka-consumer-groups --describe` show for each member.
pub fn client_id(role: &str, what: Option<&str>) -> String {
    match what {
        Some(w) => format!("vitals-{role}-{w}-{}", instance()),
        None => format!("vitals-{role}-{}", instance()),
    }
}

/// A client configuration with the brokers, the client id and how to connect
/// (`security.protocol`, TLS, SASL): what every Kafka client of vitals starts from.
pub fn kafka_base(cfg: &Config, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers).set("client.id", client_id).set("log_level", "4");
    kafka_security(cfg, &mut c);
    c
}

/// Sets `security.protocol`, TLS and SASL from `[kafka]` (checked at load:
/// [`crate::config::KafkaConfig::check_security`]). Hostname verification stays on
/// (`ssl.endpoint.identification.algorithm=https`).
fn kafka_security(cfg: &Config, c: &mut ClientConfig) {
    let k = &cfg.kafka;
    c.set("security.protocol", &k.security_protocol);
    if k.security_protocol.ends_with("ssl") {
        c.set("ssl.endpoint.identification.algorithm", "https");
        if !k.ssl_ca_location.is_empty() {
            c.set("ssl.ca.location", &k.ssl_ca_location);
        }
        if !k.ssl_certificate_location.is_empty() {
            c.set("ssl.certificate.location", &k.ssl_certificate_location).set("ssl.key.location", &k.ssl_key_location);
            if !k.ssl_key_password.expose().is_empty() {
                c.set("ssl.key.password", k.ssl_key_password.expose());
            }
        }
    }
    if k.security_protocol.starts_with("sasl") {
        c.set("sasl.mechanism", &k.sasl_mechanism);
        if k.sasl_mechanism == "OAUTHBEARER" {
            if !k.sasl_oauthbearer_config.expose().is_empty() {
                c.set("sasl.oauthbearer.config", k.sasl_oauthbearer_config.expose());
            }
        } else {
            c.set("sasl.username", &k.sasl_username).set("sasl.password", k.sasl_password.expose());
        }
    }
}

/// What a client saw of its connection that no retry will cure: a TLS handshake refused
/// (unknown CA, wrong name, bad client certificate) or a SASL authentication refused.
#[derive(Default)]
struct Preflight {
    fatal: std::sync::Mutex<Option<String>>,
}

impl Preflight {
    fn saw(&self, reason: &str) {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| reason.to_owned());
    }
}

/// librdkafka's words for a connection no retry will cure (its logs and error events both). A
/// handshake cut short ("SSL handshake failed: Disconnected", a broker restarting or a load
/// balancer without backends) is an outage, not this.
fn hopeless(reason: &str) -> bool {
    if reason.contains("SSL handshake failed: Disconnected") {
        return false;
    }
    [
        "SSL handshake failed",
        "certificate verify failed",
        "incorrect security.protocol",
        "SASL authentication error",
        "Authentication failed",
    ]
    .iter()
    .any(|w| reason.contains(w))
}

impl rdkafka::ClientContext for Preflight {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, _fac: &str, message: &str) {
        if hopeless(message) {
            self.saw(message);
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if hopeless(reason) || matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::SSL | RDKafkaErrorCode::Authentication)) {
            self.saw(reason);
        }
    }
}

impl rdkafka::producer::ProducerContext for Preflight {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// Connects to the brokers once at start-up, so a role whose TLS or SASL settings cannot work
/// stops at once with the reason instead of retrying forever. Brokers that merely do not answer
/// (yet) are not an error: that is an outage, which every role waits out.
pub async fn kafka_preflight(cfg: &Config) -> anyhow::Result<()> {
    use rdkafka::producer::{BaseProducer, Producer};
    let client: BaseProducer<Preflight> =
        kafka_base(cfg, &client_id("preflight", None)).create_with_context(Preflight::default()).context("creating a Kafka client")?;
    let brokers = cfg.kafka.brokers.clone();
    let protocol = cfg.kafka.security_protocol.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            // Any broker answering means the settings work (others may be restarting).
            if client.client().fetch_metadata(None, Duration::from_millis(500)).is_ok() {
                return Ok(());
            }
            // Serves the error events into the context.
            client.poll(Duration::ZERO);
            // A refusal stops the role only when no broker answered at all for the whole window.
            if std::time::Instant::now() < deadline {
                continue;
            }
            if let Some(reason) = client.context().fatal.lock().unwrap_or_else(|p| p.into_inner()).take() {
                bail!(
                    "Kafka at {brokers} refused the connection (kafka.security_protocol = {protocol:?}): {reason}. \
                     Check kafka.ssl_ca_location (the CA that signed the brokers' certificates), that each broker's \
                     certificate names the address it is reached at, and the SASL credentials"
                );
            }
            tracing::warn!(
                %brokers,
                "Kafka does not answer yet; going on (every role waits out an outage). If these brokers listen for TLS or \
                 SASL, kafka.security_protocol ({protocol}) must say so"
            );
            return Ok(());
        }
    })
    .await
    .context("Kafka preflight thread")?
}

/// The idempotent producer every writer uses: `acks=all`, bounded queue, bounded delivery time,
/// Kafka's murmur2 partitioner (so all producers co-partition by user).
pub fn producer(cfg: &Config, client_id: &str) -> anyhow::Result<FutureProducer> {
    kafka_base(cfg, client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", cfg.kafka.produce_timeout_ms.to_string())
        .set("queue.buffering.max.messages", cfg.kafka.queue_max_messages.to_string())
        .set("queue.buffering.max.kbytes", cfg.kafka.queue_max_kbytes.to_string())
        .set("linger.ms", cfg.kafka.linger_ms.to_string())
        .set("partitioner", "murmur2_random")
        .create()
        .context("creating the Kafka producer")
}

pub fn admin(cfg: &Config) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    kafka_base(cfg, "vitals-admin").create().context("creating the Kafka admin client")
}

/// Creates every topic with its partitions, retention and cleanup policy. Idempotent: existing
/// topics are checked to have the configured partition count (co-partitioning) and left alone.
pub async fn create_topics(cfg: &Config) -> anyhow::Result<Vec<String>> {
    create_specs(cfg, &topics(cfg).specs()).await
}

/// Creates the topics of `specs` ([`create_topics`]).
pub async fn create_specs(cfg: &Config, specs: &[vitals_schemas::topics::TopicSpec]) -> anyhow::Result<Vec<String>> {
    let admin = admin(cfg)?;
    let configs: Vec<Vec<(&str, String)>> = specs.iter().map(|s| topic_configs(cfg, s.role)).collect();
    let new: Vec<NewTopic> = specs
        .iter()
        .zip(&configs)
        .map(|(s, configs)| {
            configs
                .iter()
                .fold(NewTopic::new(&s.name, cfg.kafka.partitions, TopicReplication::Fixed(cfg.kafka.replication_factor)), |t, (k, v)| {
                    t.set(k, v)
                })
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(new.iter(), &opts).await.context("CreateTopics")?;
    let mut report = Vec::new();
    for r in results {
        match r {
            Ok(name) => report.push(format!("created {name}")),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => report.push(format!("exists  {name}")),
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    // Every keyed topic must have the same partition count, or a user's data would be split
    // across processor tasks.
    let found = topic_partitions(cfg, &specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>()).await?;
    for s in specs {
        match found.iter().find(|(n, _)| n == &s.name) {
            Some((_, n)) if *n as i32 == cfg.kafka.partitions => {}
            Some((_, n)) => bail!("topic {} has {n} partitions, expected {} (co-partitioning)", s.name, cfg.kafka.partitions),
            None => bail!("topic {} is not in the broker's metadata after creation", s.name),
        }
    }
    Ok(report)
}

/// The configuration a topic of `role` is created with: its cleanup policy and retention, and
/// `min.insync.replicas` from `kafka.min_insync_replicas`, so that a producer's `acks=all` (what a
/// 2xx from the edge rests on) means that many replicas, whatever the broker's default.
pub fn topic_configs(cfg: &Config, role: TopicRole) -> Vec<(&'static str, String)> {
    let mut c = vec![("min.insync.replicas", cfg.kafka.min_insync_replicas.to_string())];
    match role {
        TopicRole::Input => c.extend([("cleanup.policy", "delete".into()), ("retention.ms", cfg.topics.input_retention_ms.to_string())]),
        TopicRole::Projection => c.push(("cleanup.policy", "compact".into())),
        TopicRole::DeadLetter => {
            c.extend([("cleanup.policy", "delete".into()), ("retention.ms", cfg.topics.dead_letter_retention_ms.to_string())])
        }
    }
    c
}

/// Every topic the broker lists.
pub async fn topic_names(cfg: &Config) -> anyhow::Result<Vec<String>> {
    let client: rdkafka::consumer::BaseConsumer = kafka_base(cfg, "vitals-metadata").create().context("creating a metadata client")?;
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        let md = client.fetch_metadata(None, Duration::from_secs(10)).context("fetching metadata")?;
        Ok(md.topics().iter().map(|t| t.name().to_owned()).collect())
    })
    .await
    .context("metadata task")?
}

/// Partition counts of `names` as the broker reports them.
pub async fn topic_partitions(cfg: &Config, names: &[String]) -> anyhow::Result<Vec<(String, usize)>> {
    let client: rdkafka::consumer::BaseConsumer = kafka_base(cfg, "vitals-metadata").create().context("creating a metadata client")?;
    let names = names.to_vec();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        let md = client.fetch_metadata(None, Duration::from_secs(10)).context("fetching metadata")?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| names.iter().any(|n| n == t.name()))
            .map(|t| (t.name().to_owned(), t.partitions().len()))
            .collect())
    })
    .await
    .context("metadata task")?
}

/// The registry's access rules from `[registry]` (for `vitals registry`).
pub fn registry_access(cfg: &Config) -> anyhow::Result<vitals_registry::Access> {
    use vitals_registry::{Access, Credential};
    let r = &cfg.registry;
    let access = Access {
        admin: Credential::new(&r.admin_user, r.admin_password.expose()),
        reader: Credential::new(&r.reader_user, r.reader_password.expose()),
        anonymous_reads: r.anonymous_reads,
    };
    if access.admin.is_none() && access.reader.is_none() && !access.anonymous_reads {
        bail!("the registry would refuse every request: set registry.admin_user and/or registry.reader_user (or anonymous_reads)");
    }
    if access.admin.is_some() && access.admin.as_ref().map(|c| &c.user) == access.reader.as_ref().map(|c| &c.user) {
        bail!("registry.admin_user and registry.reader_user must differ");
    }
    for (key, password) in [("admin_password", &r.admin_password), ("reader_password", &r.reader_password)] {
        if password.expose().ends_with("-change-me") {
            tracing::warn!(key = %format!("registry.{key}"), "the schema registry uses the development password from config/default.toml: set your own outside development");
        }
    }
    Ok(access)
}

/// The codec every pipeline role uses: the read-only registry credential.
pub fn codec(cfg: &Config) -> Codec {
    let r = &cfg.registry;
    // The CA file was read once already at load (Config::from_sources checks every ca_file).
    let roots = ca_roots("registry.ca_file", &r.ca_file).unwrap_or_else(|e| {
        tracing::error!(error = %format!("{e:#}"), "registry.ca_file unreadable now: the registry's certificate is checked against the system's CAs only");
        Vec::new()
    });
    Codec::new(&r.url).with_roots(roots).with_basic_auth(&r.reader_user, r.reader_password.expose())
}

/// A registry client with the read-only credential (readiness, `schemas check`).
pub fn registry_reader(cfg: &Config) -> anyhow::Result<RegistryClient> {
    let r = &cfg.registry;
    RegistryClient::with_roots(&r.url, &r.reader_user, r.reader_password.expose(), &ca_roots("registry.ca_file", &r.ca_file)?)
}

/// A registry client with the admin credential (`schemas register`).
pub fn registry_admin(cfg: &Config) -> anyhow::Result<RegistryClient> {
    let r = &cfg.registry;
    RegistryClient::with_roots(&r.url, &r.admin_user, r.admin_password.expose(), &ca_roots("registry.ca_file", &r.ca_file)?)
}

/// The CA certificates of a PEM bundle named by config `key`; none when `path` is empty (the
/// system trust store alone then).
pub fn ca_roots(key: &str, path: &str) -> anyhow::Result<Vec<reqwest::Certificate>> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let pem = std::fs::read(path).with_context(|| format!("{key} = {path:?} cannot be read"))?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("{key} = {path:?} is not a PEM certificate bundle"))?;
    if roots.is_empty() {
        bail!("{key} = {path:?} holds no certificate");
    }
    Ok(roots)
}

/// Hint printed after a problem: what an operator does about it.
fn repair_hint(cfg: &Config, subject: &str, state: &SubjectState) -> String {
    let url = cfg.registry.url.trim_end_matches('/');
    match state {
        SubjectState::Current(_) => String::new(),
        SubjectState::Absent { .. } => " — run `vitals schemas register`".to_owned(),
        SubjectState::Superseded { latest, .. } => format!(
            " — if that version is not meant to be there, soft-delete it (`curl -u <admin> -X DELETE {url}/subjects/{subject}/versions/{}`); vitals' version is then the latest again",
            latest.version
        ),
    }
}

/// Registers every topic's value schema (TopicNameStrategy subjects) with the admin credential.
/// Idempotent. A subject whose latest version is not vitals' schema is reported: when vitals'
/// schema is absent it is registered (and must then be the latest); when it is an older
/// version, registering again cannot make it the latest, so that subject is an error naming
/// the latest version and vitals'. Every subject is tried before failing.
pub async fn register_schemas(cfg: &Config) -> anyhow::Result<Vec<String>> {
    register_specs(cfg, &topics(cfg).specs()).await
}

/// Registers the value schemas of `specs` ([`register_schemas`]).
pub async fn register_specs(cfg: &Config, specs: &[vitals_schemas::topics::TopicSpec]) -> anyhow::Result<Vec<String>> {
    let registry = registry_admin(cfg)?;
    let mut report = Vec::new();
    let mut problems = Vec::new();
    for s in specs {
        let subject = vitals_schemas::avro::value_subject(&s.name);
        let name = s.value_schema.name;
        let before = registry.state(&subject, s.value_schema.text).await.with_context(|| format!("checking {subject}"))?;
        let (before_line, after) = match before {
            SubjectState::Current(r) => (None, SubjectState::Current(r)),
            SubjectState::Absent { latest } => {
                let id = match registry.register(&subject, s.value_schema.text).await {
                    Ok(id) => id,
                    Err(e) => {
                        problems.push(format!("{}; registering it failed: {e:#}", before.problem(&subject, name).unwrap_or_default()));
                        continue;
                    }
                };
                let after = registry.state(&subject, s.value_schema.text).await.with_context(|| format!("checking {subject}"))?;
                let line = latest.map(|_| format!("{} — registered it as id {id}", before.problem(&subject, name).unwrap_or_default()));
                (line, after)
            }
            SubjectState::Superseded { .. } => (None, before),
        };
        if let Some(line) = before_line {
            tracing::warn!(%subject, "{line}");
            report.push(format!("note: {line}"));
        }
        match after.problem(&subject, name) {
            None => {
                let SubjectState::Current(r) = after else { unreachable!("no problem means current") };
                report.push(format!("{subject} -> id {} version {} ({name})", r.id, r.version));
            }
            Some(problem) => problems.push(format!("{problem}{}", repair_hint(cfg, &subject, &after))),
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} subject(s) do not have vitals' schema as their latest version:\n  {}\n(done: {})",
            problems.len(),
            problems.join("\n  "),
            if report.is_empty() { "nothing".to_owned() } else { report.join("; ") }
        );
    }
    Ok(report)
}

/// Checks every topic's value schema against the registry with the read-only credential:
/// vitals' schema must be the latest version of its subject, and (for a subject where it is not
/// registered yet) compatible with what the subject holds at the subject's level (BACKWARD by
/// default). Returns one line per problem, naming the subject, the latest version and id and
/// where vitals' schema is.
pub async fn check_schemas(cfg: &Config) -> anyhow::Result<Vec<String>> {
    let registry = registry_reader(cfg)?;
    let codec = codec(cfg);
    let mut bad = Vec::new();
    for s in topics(cfg).specs() {
        let subject = vitals_schemas::avro::value_subject(&s.name);
        let state = registry.state(&subject, s.value_schema.text).await.with_context(|| format!("checking {subject}"))?;
        let Some(problem) = state.problem(&subject, s.value_schema.name) else { continue };
        let compatible = match state {
            SubjectState::Absent { latest: Some(_) } => {
                if codec.is_compatible(&s.name, &s.value_schema).await.with_context(|| format!("checking {subject}"))? {
                    " (vitals' schema is compatible with it: `vitals schemas register` adds it)"
                } else {
                    " and vitals' schema is INCOMPATIBLE with what the subject holds: registering it will be refused"
                }
            }
            _ => "",
        };
        let hint = if compatible.is_empty() { repair_hint(cfg, &subject, &state) } else { String::new() };
        bad.push(format!("{problem}{compatible}{hint}"));
    }
    Ok(bad)
}

/// The edge's schema probe for `/readyz`: every subject the edge writes (the input lanes) must
/// hold vitals' schema as its latest version; `Err` has one line per subject that does not, or
/// the registry's error.
pub fn schema_probe(cfg: &Config) -> anyhow::Result<vitals_ingest::Probe> {
    let registry = registry_reader(cfg)?;
    let wanted: Vec<(String, vitals_schemas::avro::AvroFile)> = topics(cfg)
        .specs()
        .into_iter()
        .filter(|s| s.role == TopicRole::Input)
        .map(|s| (vitals_schemas::avro::value_subject(&s.name), s.value_schema))
        .collect();
    let wanted = Arc::new(wanted);
    Ok(Arc::new(move || {
        let (registry, wanted) = (registry.clone(), Arc::clone(&wanted));
        Box::pin(async move {
            let checks = wanted.iter().map(|(subject, file)| {
                let registry = &registry;
                async move {
                    match registry.state(subject, file.text).await {
                        Ok(state) => state.problem(subject, file.name),
                        Err(e) => Some(format!("{subject}: {e:#}")),
                    }
                }
            });
            let problems: Vec<String> = futures::future::join_all(checks).await.into_iter().flatten().collect();
            if problems.is_empty() {
                Ok(())
            } else {
                Err(problems)
            }
        })
    }))
}

/// The JWT verifier from `[auth]`: HS256 secret and/or a JWKS from a file or URL. A JWKS from a
/// URL is fetched again every `auth.jwks_refresh_secs`, and sooner (at most every
/// `auth.jwks_min_refresh_secs`) once a token names a `kid` it lacks: the identity provider
/// rotated its keys. A failed refresh keeps the keys it has.
pub async fn verifier(cfg: &Config) -> anyhow::Result<Arc<JwtVerifier>> {
    let a = &cfg.auth;
    let http = ca_roots("auth.jwks_ca_file", &a.jwks_ca_file)?
        .into_iter()
        .fold(reqwest::Client::builder().timeout(Duration::from_secs(10)), |b, r| b.add_root_certificate(r))
        .build()
        .context("building the JWKS HTTP client")?;
    let jwks = if !a.jwks_path.is_empty() {
        let text = std::fs::read_to_string(&a.jwks_path).with_context(|| format!("reading auth.jwks_path {}", a.jwks_path))?;
        Some(serde_json::from_str(&text).context("parsing the JWKS file")?)
    } else if !a.jwks_url.is_empty() {
        Some(fetch_jwks(&http, &a.jwks_url).await?)
    } else {
        None
    };
    let secret = a.hs256_secret.expose();
    let auth = AuthConfig {
        issuer: a.issuer.clone(),
        audience: a.audience.clone(),
        hs256_secret: (!secret.is_empty()).then(|| secret.as_bytes().to_vec()),
        jwks,
        leeway_secs: a.leeway_secs,
    };
    if auth.hs256_secret.is_none() && auth.jwks.is_none() {
        bail!("no way to verify tokens: set auth.hs256_secret or auth.jwks_path / auth.jwks_url");
    }
    let verifier = Arc::new(JwtVerifier::new(&auth).map_err(anyhow::Error::msg)?);
    if a.jwks_path.is_empty() && !a.jwks_url.is_empty() {
        let every = Duration::from_secs(a.jwks_refresh_secs.max(1));
        let min = Duration::from_secs(a.jwks_min_refresh_secs);
        tokio::spawn(refresh_jwks(Arc::downgrade(&verifier), http, a.jwks_url.clone(), every, min));
    }
    Ok(verifier)
}

async fn fetch_jwks(http: &reqwest::Client, url: &str) -> anyhow::Result<vitals_auth::JwkSet> {
    let r = http.get(url).send().await.with_context(|| format!("fetching auth.jwks_url {url}"))?;
    r.error_for_status().with_context(|| format!("fetching auth.jwks_url {url}"))?.json().await.context("parsing the JWKS")
}

/// Keeps a verifier's JWKS current for as long as the verifier lives.
async fn refresh_jwks(verifier: std::sync::Weak<JwtVerifier>, http: reqwest::Client, url: String, every: Duration, min: Duration) {
    let mut last = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let Some(v) = verifier.upgrade() else { return };
        let due = last.elapsed() >= every || (v.saw_unknown_kid() && last.elapsed() >= min);
        if !due {
            continue;
        }
        last = std::time::Instant::now();
        match fetch_jwks(&http, &url).await.and_then(|set| v.replace_jwks(&set).map_err(anyhow::Error::msg)) {
            Ok(keys) => tracing::info!(keys, "JWKS refreshed"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "JWKS refresh failed; keeping the keys we have"),
        }
    }
}

pub fn ingest_config(cfg: &Config) -> IngestConfig {
    let i = &cfg.ingest;
    IngestConfig {
        rules: Rules {
            max_items: i.max_items,
            hot_window_ms: i.hot_window_hours * 3600 * 1000,
            max_future_skew_ms: i.max_future_skew_secs * 1000,
            max_change_future_skew_ms: i.max_change_future_skew_secs * 1000,
            ..Rules::default()
        },
        max_body_bytes: i.max_body_bytes,
        max_items_per_record: i.max_items_per_record,
        idempotency_lease: Duration::from_secs(i.idempotency_lease_secs),
        retry_after_secs: i.retry_after_secs,
        require_consent: i.require_consent,
        max_in_flight: i.max_in_flight,
        max_in_flight_per_user: i.max_in_flight_per_user,
        body_timeout: Duration::from_millis(i.body_timeout_ms),
    }
}

/// The ingest edge, wired.
pub async fn ingest(cfg: &Config, pool: PgPool) -> anyhow::Result<Arc<Ingest>> {
    let codec = Arc::new(codec(cfg));
    let ack_timeout = Duration::from_millis(cfg.kafka.produce_timeout_ms + 5_000);
    let writer = LaneWriter::new(producer(cfg, &client_id("ingest", None))?, codec, ack_timeout);
    let readiness = Readiness { schemas: schema_probe(cfg)? };
    Ok(Arc::new(Ingest::new(ingest_config(cfg), verifier(cfg).await?, writer, pool, topics(cfg), readiness)))
}

/// The header read timeout of [`serve`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` resolves, with [`DEFAULT_HEADER_TIMEOUT`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(listener, router, shutdown, DEFAULT_HEADER_TIMEOUT).await
}

/// Serves `router` (HTTP/1.1, WebSocket upgrades) on `listener` until `shutdown` resolves, then
/// lets the open connections finish. A request's header must arrive within `header_timeout` of the
/// connection (or of the previous request on it) being ready, or the connection is closed:
/// `axum::serve` sets no timer, so a client sending its header byte by byte held a connection (and
/// a task) for ever. Body deadlines are the handlers' (`ingest.body_timeout_ms`).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    header_timeout: Duration,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    info!(addr = %listener.local_addr()?, "listening");
    let (closing, closed) = tokio::sync::watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut closed = closed.clone();
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = closed.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(closed);
    let _ = closing.send(());
    closing.closed().await;
    Ok(())
}

/// Refuses to run `role` (one that verifies tokens) with the HS256 secret committed in
/// config/default.toml — anyone can sign tokens with it — unless `auth.allow_insecure_dev_secret`.
pub fn refuse_committed_secret(cfg: &Config, role: &str) -> anyhow::Result<()> {
    let committed: toml::Table = crate::config::DEFAULTS.parse().context("config/default.toml")?;
    let committed = committed.get("auth").and_then(|a| a.get("hs256_secret")).and_then(|s| s.as_str()).unwrap_or_default();
    let secret = cfg.auth.hs256_secret.expose();
    if !secret.is_empty() && secret == committed && !cfg.auth.allow_insecure_dev_secret {
        bail!(
            "`vitals {role}` will not verify tokens with the HS256 secret committed in config/default.toml: anyone can sign \
             tokens with it. Set auth.hs256_secret (VITALS_AUTH__HS256_SECRET) to a secret of your own, or verify RS256 \
             only (auth.jwks_path / auth.jwks_url, and auth.hs256_secret = \"\"). For local development only, set \
             auth.allow_insecure_dev_secret = true (VITALS_AUTH__ALLOW_INSECURE_DEV_SECRET=true)."
        );
    }
    Ok(())
}

/// Reads every record of `topic` from the beginning up to the end of each partition as it was
/// when the read started. Ends on each partition's end-of-partition event, not on a record count:
/// compacted topics have offset gaps. For benchmarks, tools and tests; processors use the
/// runtime's consumers.
pub async fn read_all(cfg: &Config, topic: &str) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = kafka_base(cfg, "vitals-reader")
        .set("group.id", "vitals-reader-unused")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .context("creating a reader")?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).context("metadata")?;
        let parts: Vec<i32> = md.topics().first().map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        // Partition → end offset at the start of the read.
        let mut ends = std::collections::HashMap::new();
        for p in &parts {
            let (lo, hi) = consumer.fetch_watermarks(&topic, *p, Duration::from_secs(10)).context("watermarks")?;
            if hi > lo {
                tpl.add_partition_offset(&topic, *p, Offset::Offset(lo))?;
                ends.insert(*p, hi);
            }
        }
        let mut out = Vec::new();
        if ends.is_empty() {
            return Ok(out);
        }
        consumer.assign(&tpl)?;
        let mut open: std::collections::HashSet<i32> = ends.keys().copied().collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !open.is_empty() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "reading {topic}: partitions {open:?} did not reach their end within 120 s"
            );
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let end = ends[&m.partition()];
                    if m.offset() < end {
                        out.push(m.detach());
                    }
                    if m.offset() + 1 >= end {
                        open.remove(&m.partition());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                }
                Some(Err(e)) => return Err(e).context("consuming"),
                None => {}
            }
        }
        Ok(out)
    })
    .await
    .context("reader task")?
}

/// Records per topic (sum over partitions of high − low watermark), for `vitals topics stats`.
pub async fn topic_counts(cfg: &Config) -> anyhow::Result<Vec<(String, usize, i64)>> {
    let client: rdkafka::consumer::BaseConsumer = kafka_base(cfg, "vitals-stats").create().context("creating a metadata client")?;
    let names: Vec<String> = topics(cfg).specs().into_iter().map(|s| s.name).collect();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        let md = client.fetch_metadata(None, Duration::from_secs(10)).context("fetching metadata")?;
        let mut out = Vec::new();
        for name in names {
            let Some(t) = md.topics().iter().find(|t| t.name() == name) else {
                out.push((name, 0, -1));
                continue;
            };
            let mut total = 0;
            for p in t.partitions() {
                let (lo, hi) = client.fetch_watermarks(&name, p.id(), Duration::from_secs(10)).context("watermarks")?;
                total += hi - lo;
            }
            out.push((name, t.partitions().len(), total));
        }
        Ok(out)
    })
    .await
    .context("stats task")?
}

/// A client of the configured S3-compatible store (`[s3]`).
pub fn s3_client(cfg: &Config) -> anyhow::Result<vitals_runtime::s3::S3Client> {
    vitals_runtime::s3::S3Client::new(&vitals_runtime::s3::S3Settings {
        endpoint: cfg.s3.endpoint.clone(),
        bucket: cfg.s3.bucket.clone(),
        region: cfg.s3.region.clone(),
        access_key_id: cfg.s3.access_key_id.clone(),
        secret_access_key: cfg.s3.secret_access_key.expose().to_owned(),
        path_style: cfg.s3.path_style,
        max_attempts: cfg.s3.max_attempts,
        part_size: cfg.s3.part_size_mb.saturating_mul(1024 * 1024),
        // Checked here (a clear start-up error), read by the SDK's TLS context.
        ca_pem: match ca_roots("s3.ca_file", &cfg.s3.ca_file)?.is_empty() {
            true => None,
            false => Some(std::fs::read(&cfg.s3.ca_file).with_context(|| format!("s3.ca_file = {:?}", cfg.s3.ca_file))?),
        },
    })
    .context("the snapshot store ([s3])")
}

/// The processors' snapshot store (S3), when snapshots are on (`processors.snapshot_every_ms`);
/// objects go under `snapshots/<group>/`.
/// Its pointers go to `pool` (the role's pool, already waited for: a pool of its own, opened
/// here, would fail the role when PostgreSQL is down at that moment).
pub async fn snapshots(cfg: &Config, group: &str, pool: PgPool) -> anyhow::Result<Option<Arc<vitals_runtime::Snapshots>>> {
    use vitals_runtime as runtime;
    if cfg.processors.snapshot_every_ms == 0 {
        return Ok(None);
    }
    let s3 = s3_client(cfg)?;
    // Snapshots are an optimisation: an unreachable store is logged, never fatal (snapshots
    // then fail with warnings and tasks without local state replay from the beginning).
    if let Err(e) = s3.ensure_bucket().await {
        tracing::warn!(error = %e, bucket = %cfg.s3.bucket, "snapshot bucket not available");
    }
    Ok(Some(Arc::new(runtime::Snapshots::new(s3, pool, group, Duration::from_millis(cfg.processors.snapshot_every_ms)))))
}

/// A consumer configuration with the configured `fetch.wait.max.ms` (the processors' tail
/// readers inherit it from their consumer's).
pub fn fetch_wait(cfg: &Config, mut c: rdkafka::ClientConfig) -> rdkafka::ClientConfig {
    c.set("fetch.wait.max.ms", cfg.kafka.fetch_wait_max_ms.to_string());
    c
}

/// Which version of a processor runs, and where its tasks that have read nothing start
/// (`vitals replay`); the default is the base version from the beginning.
#[derive(Debug, Clone, Default)]
pub struct Line {
    /// `None`: the base version ([`vitals_schemas::projection::BASE_VERSION`]).
    pub version: Option<String>,
    pub start: std::collections::BTreeMap<(String, i32), i64>,
}

impl Line {
    /// The name the processor's line goes by: epochs, snapshots, state directory, dead-letter
    /// stage, metrics (`<processor>@<version>` for a replay's).
    pub fn name(&self, processor: &str) -> String {
        vitals_schemas::projection::version::key(processor, self.version.as_deref())
    }
}

/// Runs one processor until SIGTERM/Ctrl-C (or a fatal error).
pub async fn process(
    cfg: &Config,
    name: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    crash_after_produce: Option<u64>,
    metrics: Arc<vitals_runtime::metrics::RuntimeMetrics>,
) -> anyhow::Result<()> {
    process_line(cfg, name, &Line::default(), stop, crash_after_produce, metrics).await
}

/// Runs one version of one processor ([`Line`]) until stopped (or a fatal error): its own
/// consumer group, output topic, epochs, snapshots and state directory.
pub async fn process_line(
    cfg: &Config,
    name: &str,
    line: &Line,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    crash_after_produce: Option<u64>,
    metrics: Arc<vitals_runtime::metrics::RuntimeMetrics>,
) -> anyhow::Result<()> {
    use vitals_runtime::{self as runtime, RunArgs, RuntimeConfig};
    let Some(info) = vitals_runtime::find(name) else {
        let known: Vec<&str> = vitals_runtime::registry().iter().map(|p| p.name).collect();
        bail!("unknown processor `{name}` (known: {})", known.join(", "));
    };
    // The retired-base check is part of being ready: PostgreSQL going away right after the
    // migrations is waited out like any outage.
    let (pool, retired) = pg_ready_then(cfg, &stop, |pool| async move { crate::replay::base_retired(&pool, info.name).await }).await?;
    if line.version.is_none() && retired {
        let served = crate::replay::promoted(&pool, info.name).await?;
        bail!(
            "{name} {} is retired (reads serve {served}): run `vitals process {name} --as {served}`",
            vitals_schemas::projection::BASE_VERSION
        );
    }
    let t = topics(cfg);
    let line_name = line.name(info.name);
    vitals_runtime::store::set_cache_bytes(cfg.processors.store_cache_mb.saturating_mul(1024 * 1024));
    let rc = RuntimeConfig {
        processor: Box::leak(line_name.clone().into_boxed_str()),
        inputs: info.inputs,
        output_topic: info.output.at(line.version.as_deref().unwrap_or(vitals_schemas::projection::BASE_VERSION)).topic(&t),
        topics: t,
        data_dir: std::path::PathBuf::from(&cfg.processors.data_dir),
        max_batch: cfg.processors.max_batch,
        max_wait: Duration::from_millis(cfg.processors.max_wait_ms),
        crash_after_produce,
        checkpointing: true,
        start: line.start.clone(),
    };
    let group = processor_group(cfg, &line_name);
    let snapshots = snapshots(cfg, &group, pool.clone()).await?;
    let archive_pool = pool.clone();
    if let Some(s) = &snapshots {
        let _ = metrics.snapshots.set(Arc::clone(&s.metrics));
    }
    let args = RunArgs {
        cfg: rc,
        consumer_config: fetch_wait(cfg, runtime::consumer_config(kafka_base(cfg, &client_id("process", Some(&line_name))), &group)),
        producer: producer(cfg, &client_id("process", Some(&line_name)))?,
        codec: Arc::new(codec(cfg)),
        pool,
        stop,
        metrics,
        snapshots,
        archive: Some(Arc::new(crate::archive::Source {
            pool: archive_pool,
            s3: s3_client(cfg)?,
            rt: tokio::runtime::Handle::current(),
            cache: Default::default(),
        })),
    };
    tokio::task::spawn_blocking(move || (info.run)(args)).await.context("processor thread")?.context("processor runtime")
}

/// The PostgreSQL sink's name: its offsets' key in `sink_offsets`, its dead letters' stage
/// (`sink:<name>`).
pub fn sink_name(cfg: &Config) -> String {
    format!("{}postgres", cfg.kafka.topic_prefix)
}

/// The name and group of the sink of one replayed version of a projection (`<projection>@<version>`).
pub fn version_sink(cfg: &Config, key: &str) -> (String, String) {
    (format!("{}postgres-{key}", cfg.kafka.topic_prefix), format!("{}vitals-sink-{key}", cfg.kafka.topic_prefix))
}

/// Runs the PostgreSQL projection sink over every projection until `stop` (or a fatal error).
/// `on_applied` gets the rows each commit changed (the realtime push hangs off it).
pub async fn sink(
    cfg: &Config,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    metrics: std::sync::Arc<vitals_sinks::runner::SinkMetrics>,
    on_applied: vitals_sinks::runner::OnApplied,
) -> anyhow::Result<()> {
    let projections = vitals_runtime::registry::projections();
    sink_of(cfg, projections, (sink_name(cfg), sink_group(cfg)), stop, metrics, on_applied).await
}

/// Runs a PostgreSQL sink of `projections` as (`name`, consumer group) until `stop`.
pub async fn sink_of(
    cfg: &Config,
    projections: Vec<vitals_sinks::Projection>,
    (name, group): (String, String),
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    metrics: std::sync::Arc<vitals_sinks::runner::SinkMetrics>,
    on_applied: vitals_sinks::runner::OnApplied,
) -> anyhow::Result<()> {
    use vitals_sinks::runner::{self, SinkArgs, SinkConfig};
    // Not ready until the consumer loop runs (it clears this at its first poll or commit).
    metrics.wait("PostgreSQL (starting: connecting)".to_owned());
    // A descriptor that cannot make a table is a build's bug: refused at once, not retried.
    for p in &projections {
        p.descriptor.check().map_err(anyhow::Error::msg).context("a projection descriptor is not usable")?;
    }
    let (pool, projections) = pg_ready_with_tables(cfg, &stop, projections).await?;
    let args = SinkArgs {
        cfg: SinkConfig {
            name: name.clone(),
            topics: topics(cfg),
            projections,
            max_batch: cfg.processors.max_batch,
            max_wait: Duration::from_millis(cfg.processors.max_wait_ms),
        },
        consumer_config: fetch_wait(
            cfg,
            runner::consumer_config(kafka_base(cfg, &client_id("sink", Some(name.trim_start_matches(&cfg.kafka.topic_prefix)))), &group),
        ),
        producer: producer(cfg, &client_id("sink", Some(name.trim_start_matches(&cfg.kafka.topic_prefix))))?,
        codec: Arc::new(codec(cfg)),
        pool,
        stop,
        metrics,
        on_applied,
    };
    tokio::task::spawn_blocking(move || runner::run(args)).await.context("sink thread")?.context("sink")
}

/// The read API (with the dashboard and the realtime gateway) over `pool`.
pub async fn api(cfg: &Config, pool: PgPool, realtime: bool) -> anyhow::Result<Arc<vitals_api::Api>> {
    let hub = if realtime {
        Some(
            vitals_api::realtime::Hub::start(redis_client(cfg)?, cfg.api.realtime_buffer, cfg.api.max_connections_per_user)
                .context("starting the realtime hub")?,
        )
    } else {
        None
    };
    Ok(Arc::new(vitals_api::Api {
        pool,
        verifier: verifier(cfg).await?,
        realtime: hub,
        ingest_url: format!("http://{}", cfg.ingest.listen),
        projections: projections(),
        metrics: Default::default(),
    }))
}

/// The sink's realtime publisher (Redis), as the sink's `on_applied` hook.
pub fn publisher(cfg: &Config) -> anyhow::Result<vitals_sinks::realtime::Publisher> {
    vitals_sinks::realtime::Publisher::spawn(redis_client(cfg)?, cfg.api.publish_queue).context("starting the realtime publisher")
}

/// The Redis client of `redis.url`: `rediss://` is TLS (hostname verified), trusting the system
/// store or, with `redis.ca_file`, that CA bundle (PEM).
pub fn redis_client(cfg: &Config) -> anyhow::Result<redis::Client> {
    if cfg.redis.ca_file.is_empty() {
        return redis::Client::open(cfg.redis.url.expose()).context("redis.url");
    }
    if !cfg.redis.url.expose().starts_with("rediss://") {
        bail!("redis.ca_file is set but redis.url is not a rediss:// (TLS) URL");
    }
    let root_cert = std::fs::read(&cfg.redis.ca_file).with_context(|| format!("redis.ca_file = {:?} cannot be read", cfg.redis.ca_file))?;
    redis::Client::build_with_tls(cfg.redis.url.expose(), redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) })
        .context("redis.url with redis.ca_file")
}
