//! Configuration: defaults in `config/default.toml` (embedded), optionally a file named by
//! `VITALS_CONFIG`, then `VITALS_<SECTION>__<KEY>` environment overrides. Secrets are wrapped in
//! [`Secret`] so they never print.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

pub const DEFAULTS: &str = include_str!("../config/default.toml");

/// A string that never shows up in `Debug` or in `vitals config`.
#[derive(Clone, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"[redacted]\"" })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "[redacted]" })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub postgres: PostgresConfig,
    pub registry: RegistryConfig,
    pub ingest: IngestSection,
    pub auth: AuthSection,
    pub processors: ProcessorsConfig,
    pub sink: SinkSection,
    pub redis: RedisConfig,
    pub s3: S3Config,
    pub api: ApiConfig,
    pub archive: ArchiveConfig,
    pub telemetry: TelemetryConfig,
}

/// Trace export ([`crate::init_tracing`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP base URL of a collector; empty: no export.
    pub otlp_endpoint: String,
    pub ca_file: String,
    pub sample_ratio: f64,
    pub export_delay_ms: u64,
    pub user_hash_key: Secret,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Object key prefix of the archive's segments in the `[s3]` bucket.
    pub prefix: String,
    /// A segment is closed at this many records, bytes or milliseconds open, whichever first
    /// (and always at the end of a UTC day of its records' timestamps).
    pub max_records: usize,
    pub max_bytes: usize,
    pub max_wait_ms: u64,
    /// Where `vitals archive` serves `/metrics` and `/readyz`; empty: nowhere.
    pub metrics_listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: String,
    /// Envelopes buffered per WebSocket connection before the client counts as slow.
    pub realtime_buffer: usize,
    /// Envelopes queued in the sink for Redis; beyond that they are dropped, never waited for.
    pub publish_queue: usize,
    /// WebSocket connections per user on one instance.
    pub max_connections_per_user: usize,
    /// Time allowed for a request's header.
    pub header_timeout_ms: u64,
    /// Where `vitals api` / `vitals realtime` serve `/metrics` apart from `listen`; empty: on
    /// `listen` itself.
    pub metrics_listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorsConfig {
    pub data_dir: String,
    pub max_batch: usize,
    pub max_wait_ms: u64,
    /// Least time between two S3 snapshots of a task; 0 disables snapshots and restores.
    pub snapshot_every_ms: u64,
    /// Where `vitals process` serves `/metrics` (Prometheus text); empty: nowhere.
    pub metrics_listen: String,
    /// redb's page cache per task store, MiB.
    pub store_cache_mb: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSection {
    /// Where `vitals sink` serves `/metrics` (Prometheus text); empty: nowhere.
    pub metrics_listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic_prefix: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// `min.insync.replicas` of every topic vitals creates: how many replicas `acks=all` waits
    /// for. At most `replication_factor` (checked at load); production: RF 3, 2.
    pub min_insync_replicas: i32,
    pub produce_timeout_ms: u64,
    pub queue_max_messages: u64,
    pub queue_max_kbytes: u64,
    pub linger_ms: u64,
    /// The consumers' `fetch.wait.max.ms`: how long the broker may hold a fetch that has
    /// nothing to return. It bounds how late new data is noticed (a broker that polls its
    /// storage in rounds, as nisshi does, notices it at the next round: up to half this late)
    /// against how often idle consumers cost the broker a read of every partition.
    pub fetch_wait_max_ms: u64,
    /// How every Kafka client connects ([`KafkaConfig::check_security`]): `plaintext`, `ssl`,
    /// `sasl_plaintext` or `sasl_ssl` (librdkafka's `security.protocol`).
    pub security_protocol: String,
    /// PEM file of the CA(s) that signed the brokers' certificates; empty: the system's trust
    /// store. The brokers' names are verified against their certificates (hostname checking on).
    pub ssl_ca_location: String,
    /// Client certificate and key (PEM) for mutual TLS (e.g. MSK with TLS client
    /// authentication); both or neither. `ssl_key_password` if the key is encrypted.
    pub ssl_certificate_location: String,
    pub ssl_key_location: String,
    pub ssl_key_password: Secret,
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or `OAUTHBEARER` with a `sasl_*` protocol.
    pub sasl_mechanism: String,
    pub sasl_username: String,
    pub sasl_password: Secret,
    /// OAUTHBEARER only: librdkafka's `sasl.oauthbearer.config` (its unsecured-JWT token
    /// settings, e.g. `principal=vitals scope=write`); OIDC token endpoints are not built in.
    pub sasl_oauthbearer_config: Secret,
}

impl KafkaConfig {
    /// Refuses a security setting that cannot work, naming the key: a typo here would
    /// otherwise show up only as connection failures in every role's log.
    pub fn check_security(&self) -> anyhow::Result<()> {
        let protocol = self.security_protocol.as_str();
        let (tls, sasl) = match protocol {
            "plaintext" => (false, false),
            "ssl" => (true, false),
            "sasl_plaintext" => (false, true),
            "sasl_ssl" => (true, true),
            other => bail!("kafka.security_protocol = {other:?}: expected plaintext, ssl, sasl_plaintext or sasl_ssl"),
        };
        if !tls {
            for (key, v) in [
                ("ssl_ca_location", &self.ssl_ca_location),
                ("ssl_certificate_location", &self.ssl_certificate_location),
                ("ssl_key_location", &self.ssl_key_location),
            ] {
                if !v.is_empty() {
                    bail!("kafka.{key} is set but kafka.security_protocol = {protocol:?} uses no TLS: use ssl or sasl_ssl");
                }
            }
        }
        if self.ssl_certificate_location.is_empty() != self.ssl_key_location.is_empty() {
            bail!("kafka.ssl_certificate_location and kafka.ssl_key_location go together (mutual TLS): set both or neither");
        }
        for (key, path) in [
            ("ssl_ca_location", &self.ssl_ca_location),
            ("ssl_certificate_location", &self.ssl_certificate_location),
            ("ssl_key_location", &self.ssl_key_location),
        ] {
            if !path.is_empty() {
                std::fs::metadata(path).with_context(|| format!("kafka.{key} = {path:?} cannot be read"))?;
            }
        }
        match (sasl, self.sasl_mechanism.as_str()) {
            (false, "") => {}
            (false, m) => bail!("kafka.sasl_mechanism = {m:?} needs kafka.security_protocol sasl_ssl (or sasl_plaintext)"),
            (true, "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") => {
                if self.sasl_username.is_empty() || self.sasl_password.expose().is_empty() {
                    bail!("kafka.sasl_mechanism = {:?} needs kafka.sasl_username and kafka.sasl_password", self.sasl_mechanism);
                }
            }
            (true, "OAUTHBEARER") => {}
            (true, m) => bail!("kafka.sasl_mechanism = {m:?}: expected PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER"),
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    pub input_retention_ms: i64,
    pub dead_letter_retention_ms: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub url: Secret,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    pub url: String,
    /// PEM bundle of the CA behind an https `url`; empty: the system trust store.
    pub ca_file: String,
    pub listen: String,
    /// The credential that may write (register, configure, delete): `vitals registry` accepts
    /// it, `vitals schemas register` / `setup` send it. Empty user: no admin credential.
    pub admin_user: String,
    pub admin_password: Secret,
    /// The read-only credential: `vitals registry` accepts it for reads, every pipeline role
    /// sends it. Empty user: none (clients then send no `Authorization` header).
    pub reader_user: String,
    pub reader_password: Secret,
    /// `vitals registry` answers reads without credentials (writes never).
    pub anonymous_reads: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSection {
    pub listen: String,
    pub max_body_bytes: usize,
    pub max_items: usize,
    pub max_items_per_record: usize,
    pub hot_window_hours: i64,
    pub max_future_skew_secs: i64,
    pub idempotency_lease_secs: u64,
    pub retry_after_secs: u64,
    pub require_consent: bool,
    pub max_in_flight: usize,
    pub max_in_flight_per_user: usize,
    pub header_timeout_ms: u64,
    pub body_timeout_ms: u64,
    pub max_change_future_skew_secs: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub issuer: String,
    pub audience: String,
    pub hs256_secret: Secret,
    pub jwks_path: String,
    pub jwks_url: String,
    /// PEM bundle of the CA behind an https `jwks_url`; empty: the system trust store.
    pub jwks_ca_file: String,
    /// An https/http `jwks_url` is fetched again this often (key rotation)…
    pub jwks_refresh_secs: u64,
    /// …and sooner when a token names an unknown `kid`, but at most this often.
    pub jwks_min_refresh_secs: u64,
    pub leeway_secs: u64,
    /// Lets `ingest`, `api` and `realtime` start with the secret committed in config/default.toml.
    pub allow_insecure_dev_secret: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://` or, for TLS, `rediss://` (may carry a password: secret).
    pub url: Secret,
    /// PEM bundle of the CA that signed the Redis server's certificate (`rediss://` only); empty:
    /// the system trust store.
    pub ca_file: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub endpoint: String,
    /// PEM bundle of the CA behind an https `endpoint`; empty: the system trust store.
    pub ca_file: String,
    pub bucket: String,
    pub region: String,
    /// Empty: the SDK's default credential chain (environment, profile, web identity/IRSA, ECS,
    /// instance metadata), and `secret_access_key` unused.
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub path_style: bool,
    pub max_attempts: u32,
    pub part_size_mb: u64,
}

impl Config {
    /// Defaults + `VITALS_CONFIG` file + `VITALS_*__*` environment.
    pub fn load() -> anyhow::Result<Config> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let file = match env.get("VITALS_CONFIG") {
            Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("reading VITALS_CONFIG={path}"))?),
            None => None,
        };
        Config::from_sources(file.as_deref(), &env)
    }

    /// The same, from explicit sources (for tests).
    pub fn from_sources(file: Option<&str>, env: &BTreeMap<String, String>) -> anyhow::Result<Config> {
        let mut root: toml::Table = DEFAULTS.parse().context("config/default.toml")?;
        if let Some(text) = file {
            let overlay: toml::Table = text.parse().context("VITALS_CONFIG file")?;
            merge(&mut root, overlay);
        }
        for (k, v) in env {
            let Some(rest) = k.strip_prefix("VITALS_") else { continue };
            let Some((section, key)) = rest.split_once("__") else { continue };
            let (section, key) = (section.to_lowercase(), key.to_lowercase());
            let Some(toml::Value::Table(t)) = root.get_mut(&section) else {
                bail!("{k}: there is no config section `{section}`");
            };
            let Some(old) = t.get(&key) else {
                bail!("{k}: section `{section}` has no key `{key}`");
            };
            let new = match old {
                toml::Value::String(_) => toml::Value::String(v.clone()),
                toml::Value::Integer(_) => toml::Value::Integer(v.parse().with_context(|| format!("{k} must be an integer"))?),
                toml::Value::Boolean(_) => toml::Value::Boolean(v.parse().with_context(|| format!("{k} must be true or false"))?),
                toml::Value::Float(_) => toml::Value::Float(v.parse().with_context(|| format!("{k} must be a number"))?),
                _ => bail!("{k}: only scalar keys can be overridden"),
            };
            t.insert(key, new);
        }
        let c: Config = toml::Value::Table(root).try_into().context("invalid configuration")?;
        c.kafka.check_security()?;
        if c.auth.jwks_min_refresh_secs < 1 {
            bail!("auth.jwks_min_refresh_secs must be at least 1: tokens with unknown kids, which anyone can send, trigger these fetches");
        }
        if c.kafka.min_insync_replicas < 1 || c.kafka.min_insync_replicas > c.kafka.replication_factor {
            bail!(
                "kafka.min_insync_replicas = {} must be between 1 and kafka.replication_factor ({}): more would refuse every write",
                c.kafka.min_insync_replicas,
                c.kafka.replication_factor
            );
        }
        // Every CA file is read (and parsed) at load, so a wrong path stops a role at start-up.
        for (key, path) in
            [("auth.jwks_ca_file", &c.auth.jwks_ca_file), ("registry.ca_file", &c.registry.ca_file), ("s3.ca_file", &c.s3.ca_file)]
        {
            crate::app::ca_roots(key, path)?;
        }
        if !(0.0..=1.0).contains(&c.telemetry.sample_ratio) {
            bail!("telemetry.sample_ratio = {} must be between 0.0 and 1.0", c.telemetry.sample_ratio);
        }
        let e = &c.telemetry.otlp_endpoint;
        let host = e.strip_prefix("http://").or_else(|| e.strip_prefix("https://")).unwrap_or_default();
        if !e.is_empty() && host.trim_matches('/').is_empty() {
            bail!(
                "telemetry.otlp_endpoint = {e:?} must be an http:// or https:// URL with a host (OTLP over HTTP, port 4318 by convention)"
            );
        }
        if !(10..=60_000).contains(&c.telemetry.export_delay_ms) {
            bail!("telemetry.export_delay_ms = {} must be between 10 and 60000", c.telemetry.export_delay_ms);
        }
        crate::app::ca_roots("telemetry.ca_file", &c.telemetry.ca_file)?;
        if !c.redis.ca_file.is_empty() {
            std::fs::metadata(&c.redis.ca_file).with_context(|| format!("redis.ca_file = {:?} cannot be read", c.redis.ca_file))?;
        }
        Ok(c)
    }
}

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The simulator's command-line settings, shared by `vitals simulate` and `vitals-bench`.
#[derive(clap::Args, Clone)]
pub struct SimArgs {
    #[arg(long, default_value_t = 3)]
    pub users: usize,
    #[arg(long, default_value_t = 7)]
    pub days: u32,
    /// Max requests per second overall (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Ingest base URL (default: http://<ingest.listen>).
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    #[arg(long, default_value = "sim-")]
    pub user_prefix: String,
    /// Do not send edits and deletions.
    #[arg(long)]
    pub no_edits: bool,
}

impl SimArgs {
    pub fn to_config(&self, cfg: &Config) -> vitals_simulator::SimConfig {
        vitals_simulator::SimConfig {
            base_url: self.url.clone().unwrap_or_else(|| format!("http://{}", cfg.ingest.listen)),
            users: self.users,
            days: self.days,
            user_prefix: self.user_prefix.clone(),
            seed: self.seed,
            now_ms: chrono::Utc::now().timestamp_millis(),
            rate: self.rate,
            concurrency: self.concurrency,
            batch_size: self.batch_size,
            jwt_secret: cfg.auth.hs256_secret.expose().as_bytes().to_vec(),
            jwt_issuer: cfg.auth.issuer.clone(),
            jwt_audience: cfg.auth.audience.clone(),
            edits_and_deletions: !self.no_edits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_insync_replicas_is_set_on_every_topic_and_bounded_by_the_replication_factor() {
        let env = BTreeMap::from([
            ("VITALS_KAFKA__REPLICATION_FACTOR".to_owned(), "3".to_owned()),
            ("VITALS_KAFKA__MIN_INSYNC_REPLICAS".to_owned(), "2".to_owned()),
        ]);
        let c = Config::from_sources(None, &env).unwrap();
        for role in [
            vitals_schemas::topics::TopicRole::Input,
            vitals_schemas::topics::TopicRole::Projection,
            vitals_schemas::topics::TopicRole::DeadLetter,
        ] {
            let configs = crate::app::topic_configs(&c, role);
            assert!(configs.contains(&("min.insync.replicas", "2".to_owned())), "{role:?}: {configs:?}");
        }
        let too_many = BTreeMap::from([("VITALS_KAFKA__MIN_INSYNC_REPLICAS".to_owned(), "2".to_owned())]);
        let e = Config::from_sources(None, &too_many).unwrap_err();
        assert!(format!("{e:#}").contains("kafka.min_insync_replicas"), "{e:#}");
    }

    #[test]
    fn env_overrides_are_typed_and_checked() {
        let env = BTreeMap::from([
            ("VITALS_KAFKA__BROKERS".to_owned(), "k1:9092".to_owned()),
            ("VITALS_INGEST__MAX_ITEMS".to_owned(), "10".to_owned()),
            ("VITALS_INGEST__REQUIRE_CONSENT".to_owned(), "false".to_owned()),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ]);
        let c = Config::from_sources(None, &env).unwrap();
        assert_eq!((c.kafka.brokers.as_str(), c.ingest.max_items, c.ingest.require_consent), ("k1:9092", 10, false));
        let bad = BTreeMap::from([("VITALS_INGEST__MAX_ITEMS".to_owned(), "many".to_owned())]);
        assert!(Config::from_sources(None, &bad).is_err());
        let unknown = BTreeMap::from([("VITALS_INGEST__MAX_ITEMZ".to_owned(), "1".to_owned())]);
        assert!(Config::from_sources(None, &unknown).is_err());
    }

    #[test]
    fn secrets_never_print() {
        let c = Config::from_sources(None, &BTreeMap::new()).unwrap();
        let shown = format!("{c:?} {}", toml::to_string(&c).unwrap_or_default());
        assert!(!shown.contains("change-me"), "secret leaked: {shown}");
        assert!(c.auth.hs256_secret.expose().contains("change-me"));
        assert!(!shown.contains("vitals-dev-secret"), "S3 secret leaked: {shown}");
        assert_eq!(c.s3.secret_access_key.expose(), "vitals-dev-secret");
        for secret in [&c.registry.admin_password, &c.registry.reader_password] {
            assert!(!secret.expose().is_empty());
            assert!(!shown.contains(secret.expose()), "registry password leaked: {shown}");
        }
        assert!(shown.contains(&c.registry.reader_user), "user names are not secret: {shown}");
    }

    #[test]
    fn registry_credentials_come_from_the_environment() {
        let env = BTreeMap::from([
            ("VITALS_REGISTRY__READER_PASSWORD".to_owned(), "from-env".to_owned()),
            ("VITALS_REGISTRY__ANONYMOUS_READS".to_owned(), "true".to_owned()),
        ]);
        let c = Config::from_sources(None, &env).unwrap();
        assert_eq!((c.registry.reader_password.expose(), c.registry.anonymous_reads), ("from-env", true));
    }
}
