//! `vitals archive`: the raw archive of the input lanes (issue 11, item 4).
//!
//! Every record of the four input lanes (HOT, COLD, CHANGE, domain changes) is written to the
//! S3-compatible store as it was in Kafka — offset, timestamp, key, headers, payload — in
//! segments: Avro object container files of one partition's consecutive offsets of one UTC day
//! (of the records' timestamps), under
//! `<archive.prefix><topic>/date=<YYYY-MM-DD>/p<partition>/<first>-<next>.avro`, with the
//! offsets they cover in their metadata and in `archive_segments`. Once a lane's records are
//! archived its retention may be finite: `vitals archive status` says up to where.
//!
//! **Exactly once, and never a gap unsaid.** A segment is uploaded first and recorded second:
//! the transaction that records it advances the partition's `archive_positions.next_offset` by
//! compare-and-set from the segment's first offset, so a crash leaves at most an unrecorded
//! object (rewritten or ignored; readers list `archive_segments`, not the bucket) and a second
//! archiver of the same partition fails its compare-and-set and starts again from the recorded
//! position. Offsets the lane no longer holds when the archiver reaches them (deleted before
//! they were archived) are recorded in `archive_gaps`, logged and counted, and a read across
//! them is refused.
//!
//! **Erasable per user.** Each record's key, headers and payload are sealed (XChaCha20-Poly1305,
//! bound to topic, partition and offset) with a data key of the record's user
//! (`archive_keys`); the object names only the key's random id. Deleting a user's key makes all
//! of their archived records unreadable without touching an object (the erasure feature itself
//! is a later issue); readers count such records as erased and skip them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use apache_avro::types::Value;
use apache_avro::Schema;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::{Message, Offset, Timestamp, TopicPartitionList};
use sqlx::PgPool;
use tracing::{error, info, warn};

use crate::app;
use crate::config::Config;

/// The container's record: what is readable without a key, and the sealed rest.
const SEGMENT_SCHEMA: &str = r#"{"type": "record", "name": "ArchivedRecord", "namespace": "vitals.archive", "fields": [
  {"name": "offset", "type": "long"},
  {"name": "timestamp_ms", "type": "long"},
  {"name": "key_id", "type": "string"},
  {"name": "nonce", "type": "bytes"},
  {"name": "sealed", "type": "bytes"}
]}"#;

/// What a record's seal holds.
const SEALED_SCHEMA: &str = r#"{"type": "record", "name": "Sealed", "namespace": "vitals.archive", "fields": [
  {"name": "key", "type": ["null", "bytes"]},
  {"name": "headers", "type": {"type": "array", "items": {"type": "record", "name": "Header", "fields": [
    {"name": "key", "type": "string"}, {"name": "value", "type": ["null", "bytes"]}]}}},
  {"name": "payload", "type": ["null", "bytes"]}
]}"#;

fn schemas() -> &'static (Schema, Schema) {
    static S: std::sync::OnceLock<(Schema, Schema)> = std::sync::OnceLock::new();
    S.get_or_init(|| (Schema::parse_str(SEGMENT_SCHEMA).expect("segment schema"), Schema::parse_str(SEALED_SCHEMA).expect("sealed schema")))
}

/// One record as it was in its lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raw {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub payload: Option<Vec<u8>>,
}

impl Raw {
    pub fn of(m: &OwnedMessage) -> Raw {
        let headers = m.headers().map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect()).unwrap_or_default();
        Raw {
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
            key: m.key().map(<[u8]>::to_vec),
            headers,
            payload: m.payload().map(<[u8]>::to_vec),
        }
    }

    /// The record as a consumer would have read it from `topic`/`partition`.
    pub fn message(&self, topic: &str, partition: i32) -> OwnedMessage {
        let headers = (!self.headers.is_empty()).then(|| {
            self.headers
                .iter()
                .fold(OwnedHeaders::new_with_capacity(self.headers.len()), |h, (k, v)| h.insert(Header { key: k, value: v.as_deref() }))
        });
        OwnedMessage::new(
            self.payload.clone(),
            self.key.clone(),
            topic.to_owned(),
            Timestamp::CreateTime(self.timestamp_ms),
            partition,
            self.offset,
            headers,
        )
    }

    fn bytes(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + self.headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum::<usize>()
    }
}

/// A user's data key.
#[derive(Clone)]
pub struct DataKey {
    pub id: uuid::Uuid,
    key: [u8; 32],
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey({})", self.id)
    }
}

impl DataKey {
    pub fn generate() -> DataKey {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        DataKey { id: uuid::Uuid::new_v4(), key }
    }
    fn from_row(id: uuid::Uuid, bytes: &[u8]) -> anyhow::Result<DataKey> {
        let key: [u8; 32] = bytes.try_into().map_err(|_| anyhow::anyhow!("archive key {id} is {} bytes, not 32", bytes.len()))?;
        Ok(DataKey { id, key })
    }
}

/// What binds a seal to its place: a sealed record moved to another offset does not open.
fn aad(topic: &str, partition: i32, offset: i64) -> Vec<u8> {
    format!("vitals-archive/{topic}/{partition}/{offset}").into_bytes()
}

fn opt_bytes(v: &Option<Vec<u8>>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(b) => Value::Union(1, Box::new(Value::Bytes(b.clone()))),
    }
}

fn take_opt_bytes(v: Value) -> anyhow::Result<Option<Vec<u8>>> {
    match v {
        Value::Union(_, b) => match *b {
            Value::Null => Ok(None),
            Value::Bytes(b) => Ok(Some(b)),
            other => bail!("expected bytes, found {other:?}"),
        },
        other => bail!("expected a union, found {other:?}"),
    }
}

fn fields(v: Value) -> anyhow::Result<BTreeMap<String, Value>> {
    match v {
        Value::Record(f) => Ok(f.into_iter().collect()),
        other => bail!("expected a record, found {other:?}"),
    }
}

/// Seals a record's key, headers and payload with `key`.
pub fn seal(key: &DataKey, topic: &str, partition: i32, r: &Raw) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let (_, sealed_schema) = schemas();
    let headers = r
        .headers
        .iter()
        .map(|(k, v)| Value::Record(vec![("key".into(), Value::String(k.clone())), ("value".into(), opt_bytes(v))]))
        .collect();
    let plain = Value::Record(vec![
        ("key".into(), opt_bytes(&r.key)),
        ("headers".into(), Value::Array(headers)),
        ("payload".into(), opt_bytes(&r.payload)),
    ]);
    let plain = apache_avro::writer::datum::GenericDatumWriter::builder(sealed_schema)
        .build()?
        .write_value_to_vec(plain)
        .context("encoding a record to seal")?;
    let mut nonce = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let cipher = XChaCha20Poly1305::new((&key.key).into());
    let sealed = cipher
        .encrypt(&XNonce::from(nonce), Payload { msg: &plain, aad: &aad(topic, partition, r.offset) })
        .map_err(|_| anyhow::anyhow!("sealing failed"))?;
    Ok((nonce.to_vec(), sealed))
}

/// Opens what [`seal`] sealed; an error when the key, place or bytes are not the sealed ones.
pub fn open(
    key: &DataKey,
    topic: &str,
    partition: i32,
    offset: i64,
    timestamp_ms: i64,
    nonce: &[u8],
    sealed: &[u8],
) -> anyhow::Result<Raw> {
    let nonce: [u8; 24] = nonce.try_into().map_err(|_| anyhow::anyhow!("a nonce of {} bytes", nonce.len()))?;
    let cipher = XChaCha20Poly1305::new((&key.key).into());
    let plain = cipher
        .decrypt(&XNonce::from(nonce), Payload { msg: sealed, aad: &aad(topic, partition, offset) })
        .map_err(|_| anyhow::anyhow!("{topic}/{partition}@{offset}: the seal does not open with key {}", key.id))?;
    let (_, sealed_schema) = schemas();
    let mut f = fields(
        apache_avro::reader::datum::GenericDatumReader::builder(sealed_schema)
            .build()?
            .read_value(&mut &plain[..])
            .context("decoding a sealed record")?,
    )?;
    let headers = match f.remove("headers") {
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|h| {
                let mut h = fields(h)?;
                let k = match h.remove("key") {
                    Some(Value::String(s)) => s,
                    other => bail!("header key {other:?}"),
                };
                Ok((k, take_opt_bytes(h.remove("value").unwrap_or(Value::Null))?))
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        other => bail!("headers {other:?}"),
    };
    Ok(Raw {
        offset,
        timestamp_ms,
        key: take_opt_bytes(f.remove("key").context("no key field")?)?,
        headers,
        payload: take_opt_bytes(f.remove("payload").context("no payload field")?)?,
    })
}

/// A segment's place: one partition's offsets `first..next`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentMeta {
    pub topic: String,
    pub partition: i32,
    pub first: i64,
    pub next: i64,
    pub day: chrono::NaiveDate,
}

impl SegmentMeta {
    pub fn object_key(&self, prefix: &str) -> String {
        format!("{prefix}{}/date={}/p{}/{:020}-{:020}.avro", self.topic, self.day, self.partition, self.first, self.next)
    }
}

/// One sealed record of a segment.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key_id: uuid::Uuid,
    pub nonce: Vec<u8>,
    pub sealed: Vec<u8>,
}

/// The Avro object container file of a segment.
pub fn encode_segment(meta: &SegmentMeta, records: &[Sealed]) -> anyhow::Result<Vec<u8>> {
    let (schema, _) = schemas();
    let mut w = apache_avro::Writer::new(schema, Vec::new())?;
    for (k, v) in [
        ("vitals.topic", meta.topic.clone()),
        ("vitals.partition", meta.partition.to_string()),
        ("vitals.first_offset", meta.first.to_string()),
        ("vitals.next_offset", meta.next.to_string()),
        ("vitals.day", meta.day.to_string()),
    ] {
        w.add_user_metadata(k.to_owned(), v)?;
    }
    for r in records {
        w.append_value(Value::Record(vec![
            ("offset".into(), Value::Long(r.offset)),
            ("timestamp_ms".into(), Value::Long(r.timestamp_ms)),
            ("key_id".into(), Value::String(r.key_id.to_string())),
            ("nonce".into(), Value::Bytes(r.nonce.clone())),
            ("sealed".into(), Value::Bytes(r.sealed.clone())),
        ]))?;
    }
    Ok(w.into_inner()?)
}

/// Reads a segment's container back: its place (from its metadata) and its records.
pub fn decode_segment(bytes: &[u8]) -> anyhow::Result<(SegmentMeta, Vec<Sealed>)> {
    let r = apache_avro::Reader::new(bytes)?;
    let md = r.user_metadata().clone();
    let get = |k: &str| -> anyhow::Result<String> {
        Ok(String::from_utf8(md.get(k).with_context(|| format!("no {k} in the segment's metadata"))?.clone())?)
    };
    let meta = SegmentMeta {
        topic: get("vitals.topic")?,
        partition: get("vitals.partition")?.parse()?,
        first: get("vitals.first_offset")?.parse()?,
        next: get("vitals.next_offset")?.parse()?,
        day: get("vitals.day")?.parse()?,
    };
    let mut out = Vec::new();
    for v in r {
        let mut f = fields(v?)?;
        let long = |v: Option<Value>| match v {
            Some(Value::Long(l)) => Ok(l),
            other => bail!("expected a long, found {other:?}"),
        };
        let bytes = |v: Option<Value>| match v {
            Some(Value::Bytes(b)) => Ok(b),
            other => bail!("expected bytes, found {other:?}"),
        };
        let key_id = match f.remove("key_id") {
            Some(Value::String(s)) => s.parse()?,
            other => bail!("key_id {other:?}"),
        };
        out.push(Sealed {
            offset: long(f.remove("offset"))?,
            timestamp_ms: long(f.remove("timestamp_ms"))?,
            key_id,
            nonce: bytes(f.remove("nonce"))?,
            sealed: bytes(f.remove("sealed"))?,
        });
    }
    Ok((meta, out))
}

/// Users' data keys, created on first use (`archive_keys`).
pub struct Keys {
    pool: PgPool,
    by_user: HashMap<Vec<u8>, DataKey>,
}

impl Keys {
    pub fn new(pool: PgPool) -> Keys {
        Keys { pool, by_user: HashMap::new() }
    }

    /// The key of the user a record is keyed by (`None`: the key of records without a user).
    pub async fn of(&mut self, user: Option<&[u8]>) -> anyhow::Result<DataKey> {
        let user = user.unwrap_or_default();
        if let Some(k) = self.by_user.get(user) {
            return Ok(k.clone());
        }
        // (Lane keys are user ids, UTF-8; anything else is kept apart, not merged by a lossy
        // conversion.)
        let name = match std::str::from_utf8(user) {
            Ok(u) => u.to_owned(),
            Err(_) => format!("hex:{}", hex::encode(user)),
        };
        let fresh = DataKey::generate();
        sqlx::query("INSERT INTO archive_keys (user_id, key_id, key) VALUES ($1, $2, $3) ON CONFLICT (user_id) DO NOTHING")
            .bind(&name)
            .bind(fresh.id.to_string())
            .bind(&fresh.key[..])
            .execute(&self.pool)
            .await?;
        let (id, bytes): (String, Vec<u8>) =
            sqlx::query_as("SELECT key_id, key FROM archive_keys WHERE user_id = $1").bind(&name).fetch_one(&self.pool).await?;
        let k = DataKey::from_row(id.parse()?, &bytes)?;
        self.by_user.insert(user.to_vec(), k.clone());
        Ok(k)
    }
}

/// What an operator reads of a running archiver (`archive.metrics_listen`: `/metrics`,
/// `/readyz`).
#[derive(Default)]
pub struct ArchiveMetrics {
    pub records: std::sync::atomic::AtomicU64,
    pub segments: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
    pub upload_retries: std::sync::atomic::AtomicU64,
    pub record_retries: std::sync::atomic::AtomicU64,
    pub gaps: std::sync::atomic::AtomicU64,
    /// Segments a second archiver had recorded first (this one started again from there).
    pub lost_races: std::sync::atomic::AtomicU64,
    /// What the archiver waits for (a failed dependency), while it waits.
    pub waiting: std::sync::Mutex<Option<String>>,
    /// Unix seconds of the newest recorded segment.
    pub last_segment: std::sync::Mutex<f64>,
}

impl ArchiveMetrics {
    fn add(c: &std::sync::atomic::AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    fn wait(&self, why: String) {
        *self.waiting.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }
    fn wait_over(&self) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
    /// Why the archiver is not ready (`None`: ready).
    pub fn not_ready(&self) -> Option<String> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// The Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let c = |out: &mut String, name: &str, help: &str, v: &std::sync::atomic::AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP vitals_archive_{name} {help}\n# TYPE vitals_archive_{name} counter\nvitals_archive_{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        c(out, "records_total", "Lane records in recorded segments.", &self.records);
        c(out, "segments_total", "Segments uploaded and recorded.", &self.segments);
        c(out, "bytes_total", "Bytes of recorded segments.", &self.bytes);
        c(out, "upload_retries_total", "Segment uploads that failed and were retried (the store unavailable).", &self.upload_retries);
        c(out, "record_retries_total", "Segment records that failed and were retried (PostgreSQL unavailable).", &self.record_retries);
        c(out, "gaps_total", "Gaps recorded: offsets the lane no longer had when the archiver reached them.", &self.gaps);
        c(out, "lost_races_total", "Segments another archiver recorded first.", &self.lost_races);
        let waiting = u8::from(self.not_ready().is_some());
        let _ = writeln!(out, "# HELP vitals_archive_waiting 1 while the archiver waits for a failed dependency (see /readyz for why).\n# TYPE vitals_archive_waiting gauge\nvitals_archive_waiting {waiting}");
        let last = *self.last_segment.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP vitals_archive_last_segment_timestamp_seconds When the newest segment was recorded (Unix time; 0: none yet).\n# TYPE vitals_archive_last_segment_timestamp_seconds gauge\nvitals_archive_last_segment_timestamp_seconds {last:.3}");
    }
}

/// The four input lanes.
pub fn lanes(cfg: &Config) -> Vec<String> {
    let t = app::topics(cfg);
    vec![t.hot, t.cold, t.change, t.domain]
}

/// A partition's segment being filled.
struct Open {
    meta: SegmentMeta,
    records: Vec<Sealed>,
    /// Offsets within it that the lane no longer had (`archive_gaps`).
    gaps: Vec<(i64, i64)>,
    bytes: usize,
    since: Instant,
}

/// Where the archive of one partition stands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub start: i64,
    pub next: i64,
}

async fn positions(pool: &PgPool, topics: &[String]) -> anyhow::Result<BTreeMap<(String, i32), Position>> {
    let rows: Vec<(String, i32, i64, i64)> =
        sqlx::query_as("SELECT topic, partition, start_offset, next_offset FROM archive_positions WHERE topic = ANY($1)")
            .bind(topics)
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(topic, partition, start, next)| ((topic.clone(), partition), Position { topic, partition, start, next }))
        .collect())
}

/// Runs the archiver until `stop`: every partition of the input lanes, from where the archive
/// stands (a partition never archived: from the lane's first record).
pub async fn run(cfg: &Config, stop: Arc<AtomicBool>, metrics: Arc<ArchiveMetrics>) -> anyhow::Result<()> {
    let pool = app::pg_ready(cfg, &stop).await?;
    let s3 = app::s3_client(cfg)?;
    let mut backoff = Duration::from_millis(200);
    loop {
        match s3.ensure_bucket().await {
            Ok(()) => {
                metrics.wait_over();
                break;
            }
            Err(e) if !stop.load(Ordering::Relaxed) => {
                warn!(error = %e, "the archive's bucket is not reachable yet; waiting");
                metrics.wait(format!("the archive store: {e}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let topics = lanes(cfg);
    let parts = app::topic_partitions(cfg, &topics).await?;
    let consumer: StreamConsumer = app::kafka_base(cfg, &app::client_id("archive", None))
        .set("group.id", format!("{}vitals-archive", cfg.kafka.topic_prefix))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating the archive's consumer")?;
    let consumer = Arc::new(consumer);
    let a = &cfg.archive;
    let (max_records, max_bytes, max_wait) = (a.max_records.max(1), a.max_bytes.max(1), Duration::from_millis(a.max_wait_ms));
    'assign: loop {
        // Where each partition stands; a partition met for the first time starts at the lane's
        // first record.
        let mut at = positions(&pool, &topics).await?;
        for (topic, n) in &parts {
            for p in 0..*n as i32 {
                if at.contains_key(&(topic.clone(), p)) {
                    continue;
                }
                let (c, t) = (Arc::clone(&consumer), topic.clone());
                let (low, _) = tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, p, Duration::from_secs(10))).await??;
                sqlx::query("INSERT INTO archive_positions (topic, partition, start_offset, next_offset) VALUES ($1, $2, $3, $3) ON CONFLICT DO NOTHING").bind(topic).bind(p).bind(low).execute(&pool).await?;
            }
        }
        at = positions(&pool, &topics).await?;
        // A lane that now starts past where its archive stands lost those records before they
        // were archived (retention while the archiver was down or behind): recorded as a gap, and
        // the archive goes on from the lane's start.
        for ((topic, p), pos) in at.iter_mut() {
            let (c, t, q) = (Arc::clone(&consumer), topic.clone(), *p);
            let (low, _) = tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, q, Duration::from_secs(10))).await??;
            if low > pos.next {
                error!(%topic, partition = p, from = pos.next, to = low, "records deleted from the lane before they were archived: recorded as an archive gap");
                let mut tx = pool.begin().await?;
                let moved = sqlx::query("UPDATE archive_positions SET next_offset = $4, updated_at = now() WHERE topic = $1 AND partition = $2 AND next_offset = $3")
                    .bind(topic)
                    .bind(*p)
                    .bind(pos.next)
                    .bind(low)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if moved == 1 {
                    record_gap(&mut tx, topic, *p, pos.next, low).await?;
                    tx.commit().await?;
                    ArchiveMetrics::add(&metrics.gaps, 1);
                    pos.next = low;
                } else {
                    continue 'assign; // another archiver moved it: read the positions again
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), pos) in &at {
            tpl.add_partition_offset(t, *p, Offset::Offset(pos.next))?;
        }
        consumer.assign(&tpl)?;
        info!(partitions = at.len(), "archiving the input lanes");
        let mut expected: BTreeMap<(String, i32), i64> = at.iter().map(|(k, p)| (k.clone(), p.next)).collect();
        let mut open: BTreeMap<(String, i32), Open> = BTreeMap::new();
        let mut keys = Keys::new(pool.clone());
        loop {
            if stop.load(Ordering::Relaxed) {
                // Whatever is open is read again by the next run: nothing was recorded.
                return Ok(());
            }
            let polled = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await;
            if let Ok(m) = polled {
                let m = match m {
                    Ok(m) => m.detach(),
                    Err(e) => {
                        // (The broker going away and coming back: librdkafka reconnects.)
                        warn!(error = %e, "consuming the lanes");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let k = (m.topic().to_owned(), m.partition());
                let want = expected.get(&k).copied().unwrap_or(0);
                if m.offset() < want {
                    continue; // delivered again after a seek
                }
                let raw = Raw::of(&m);
                let day = chrono::DateTime::from_timestamp_millis(raw.timestamp_ms).unwrap_or_default().date_naive();
                // A segment holds one day: a record of a later day closes it first (one of an
                // earlier day, a producer's clock behind, joins it).
                if open.get(&k).is_some_and(|o| day > o.meta.day) {
                    let o = open.remove(&k).expect("open");
                    if !flush(cfg, &pool, &s3, o, &stop, &metrics).await? {
                        continue 'assign;
                    }
                }
                let o = open.entry(k.clone()).or_insert_with(|| Open {
                    meta: SegmentMeta { topic: k.0.clone(), partition: k.1, first: want, next: want, day },
                    records: Vec::new(),
                    gaps: Vec::new(),
                    bytes: 0,
                    since: Instant::now(),
                });
                if m.offset() > want {
                    // Offsets the archive will never have (deleted from the lane before they
                    // were read, or never written): a gap, recorded with the segment (only if
                    // its compare-and-set holds: a losing archiver records nothing).
                    error!(topic = %k.0, partition = k.1, from = want, to = m.offset(), "offsets missing from the lane before they were archived: recorded as an archive gap");
                    o.gaps.push((want, m.offset()));
                }
                let key = keys.of(raw.key.as_deref()).await?;
                let (nonce, sealed) = seal(&key, &k.0, k.1, &raw)?;
                o.bytes += raw.bytes() + 64;
                o.meta.next = raw.offset + 1;
                o.records.push(Sealed { offset: raw.offset, timestamp_ms: raw.timestamp_ms, key_id: key.id, nonce, sealed });
                expected.insert(k, raw.offset + 1);
            }
            // Segments full or old enough.
            let due: Vec<(String, i32)> = open
                .iter()
                .filter(|(_, o)| o.records.len() >= max_records || o.bytes >= max_bytes || o.since.elapsed() >= max_wait)
                .map(|(k, _)| k.clone())
                .collect();
            for k in due {
                let o = open.remove(&k).expect("due");
                if !flush(cfg, &pool, &s3, o, &stop, &metrics).await? {
                    continue 'assign;
                }
            }
        }
    }
}

/// Records offsets `from..to` of a partition as missing from the archive (a gap recorded again
/// from the same offset keeps the larger).
async fn record_gap(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO archive_gaps (topic, partition, from_offset, to_offset) VALUES ($1, $2, $3, $4)
         ON CONFLICT (topic, partition, from_offset) DO UPDATE SET to_offset = GREATEST(archive_gaps.to_offset, EXCLUDED.to_offset)",
    )
    .bind(topic)
    .bind(partition)
    .bind(from)
    .bind(to)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Uploads a segment and records it; `false` when the partition's recorded position is no
/// longer this segment's start (another archiver got there first: start again from it).
/// S3 or PostgreSQL failing delays the segment, never drops it: retried with backoff.
async fn flush(
    cfg: &Config,
    pool: &PgPool,
    s3: &vitals_runtime::s3::S3Client,
    o: Open,
    stop: &AtomicBool,
    metrics: &ArchiveMetrics,
) -> anyhow::Result<bool> {
    let object = o.meta.object_key(&cfg.archive.prefix);
    let body = encode_segment(&o.meta, &o.records)?;
    let bytes = body.len() as i64;
    let mut backoff = Duration::from_millis(200);
    loop {
        match s3.put(&object, body.clone()).await {
            Ok(()) => break,
            Err(e) => {
                if stop.load(Ordering::Relaxed) {
                    bail!("stopped while the archive store failed: {e}");
                }
                warn!(error = %e, %object, retry_in_ms = backoff.as_millis() as u64, "archive upload failed; retrying (nothing skipped)");
                ArchiveMetrics::add(&metrics.upload_retries, 1);
                metrics.wait(format!("the archive store: {e}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    loop {
        let recorded = async {
            let mut tx = pool.begin().await?;
            let moved = sqlx::query("UPDATE archive_positions SET next_offset = $4, updated_at = now() WHERE topic = $1 AND partition = $2 AND next_offset = $3")
                .bind(&o.meta.topic)
                .bind(o.meta.partition)
                .bind(o.meta.first)
                .bind(o.meta.next)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if moved == 0 {
                return Ok::<bool, sqlx::Error>(false);
            }
            for (from, to) in &o.gaps {
                record_gap(&mut tx, &o.meta.topic, o.meta.partition, *from, *to).await?;
            }
            sqlx::query("INSERT INTO archive_segments (topic, partition, first_offset, next_offset, records, bytes, day, object_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
                .bind(&o.meta.topic)
                .bind(o.meta.partition)
                .bind(o.meta.first)
                .bind(o.meta.next)
                .bind(o.records.len() as i32)
                .bind(bytes)
                .bind(o.meta.day)
                .bind(&object)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(true)
        }
        .await;
        match recorded {
            Ok(true) => {
                metrics.wait_over();
                ArchiveMetrics::add(&metrics.segments, 1);
                ArchiveMetrics::add(&metrics.records, o.records.len() as u64);
                ArchiveMetrics::add(&metrics.bytes, bytes as u64);
                ArchiveMetrics::add(&metrics.gaps, o.gaps.len() as u64);
                *metrics.last_segment.lock().unwrap_or_else(|e| e.into_inner()) =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
                failpoint_after_record();
                return Ok(true);
            }
            Ok(false) => {
                metrics.wait_over();
                ArchiveMetrics::add(&metrics.lost_races, 1);
                warn!(topic = %o.meta.topic, partition = o.meta.partition, first = o.meta.first, "the partition's archive moved on elsewhere (a second archiver?): starting again from its recorded position");
                return Ok(false);
            }
            Err(e) => {
                if stop.load(Ordering::Relaxed) {
                    bail!("stopped while PostgreSQL failed: {e}");
                }
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "recording an archive segment failed; retrying");
                ArchiveMetrics::add(&metrics.record_retries, 1);
                metrics.wait(format!("PostgreSQL: {e}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Test hook: `VITALS_ARCHIVE_CRASH_AFTER=<n>` aborts the process right after its n-th
/// recorded segment.
fn failpoint_after_record() {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if let Some(limit) = std::env::var("VITALS_ARCHIVE_CRASH_AFTER").ok().and_then(|v| v.parse::<u64>().ok()) {
        if N.fetch_add(1, Ordering::Relaxed) + 1 >= limit {
            std::process::abort();
        }
    }
}

/// What a read of the archive returned.
#[derive(Debug, Default)]
pub struct Read {
    /// Every offset asked for, in order, as its lane held it; an erased user's record (their
    /// key is gone) as a record with [`ERASED_HEADER`] and nothing else.
    pub records: Vec<OwnedMessage>,
    /// How many were erased.
    pub erased: u64,
}

pub use vitals_runtime::{ArchiveError, ERASED_HEADER};

fn erased_record(topic: &str, partition: i32, offset: i64, timestamp_ms: i64) -> OwnedMessage {
    let h = OwnedHeaders::new_with_capacity(1).insert(Header { key: ERASED_HEADER, value: Some(&b"1"[..]) });
    OwnedMessage::new(None, None, topic.to_owned(), Timestamp::CreateTime(timestamp_ms), partition, offset, Some(h))
}

/// What the archive's index says of offsets `from..to` of one partition: its position (start,
/// next), the recorded gaps and the segments overlapping them (first, next, object), in order.
struct Coverage {
    position: Option<(i64, i64)>,
    gaps: Vec<(i64, i64)>,
    segments: Vec<(i64, i64, String)>,
}

async fn coverage(pool: &PgPool, topic: &str, partition: i32, from: i64, to: i64) -> Result<Coverage, sqlx::Error> {
    let position = sqlx::query_as("SELECT start_offset, next_offset FROM archive_positions WHERE topic = $1 AND partition = $2")
        .bind(topic)
        .bind(partition)
        .fetch_optional(pool)
        .await?;
    // (Both: the rows overlapping from..to, $3..$4.)
    let gaps = sqlx::query_as("SELECT from_offset, to_offset FROM archive_gaps WHERE topic = $1 AND partition = $2 AND from_offset < $4 AND to_offset > $3 ORDER BY from_offset")
        .bind(topic)
        .bind(partition)
        .bind(from)
        .bind(to)
        .fetch_all(pool)
        .await?;
    let segments = sqlx::query_as("SELECT first_offset, next_offset, object_key FROM archive_segments WHERE topic = $1 AND partition = $2 AND first_offset < $4 AND next_offset > $3 ORDER BY first_offset")
        .bind(topic)
        .bind(partition)
        .bind(from)
        .bind(to)
        .fetch_all(pool)
        .await?;
    Ok(Coverage { position, gaps, segments })
}

/// Offsets `from..to` of one partition, from the archive. [`ArchiveError::Missing`] when the
/// archive does not hold all of them (it starts later, has not got that far, has a recorded
/// gap there, or an object is gone or altered); [`ArchiveError::Unavailable`] when PostgreSQL
/// or the store cannot be reached.
pub async fn read(
    pool: &PgPool,
    s3: &vitals_runtime::s3::S3Client,
    cache: Option<&SegmentCache>,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
) -> Result<Read, ArchiveError> {
    let down = |e: &dyn std::fmt::Display| ArchiveError::Unavailable(e.to_string());
    macro_rules! missing {
        ($($t:tt)*) => { return Err(ArchiveError::Missing(format!($($t)*))) };
    }
    let mut out = Read::default();
    if from >= to {
        return Ok(out);
    }
    let Coverage { position, gaps, segments } = coverage(pool, topic, partition, from, to).await.map_err(|e| down(&e))?;
    let Some((start, next)) = position else { missing!("{topic}/{partition} was never archived") };
    if from < start {
        missing!("the archive of {topic}/{partition} starts at offset {start} (archiving began after the lane lost offsets before it), not at {from}");
    }
    if to > next {
        // Not archived yet (a segment still open, the archiver behind or down): they will be.
        return Err(ArchiveError::Unavailable(format!(
            "the archive of {topic}/{partition} holds offsets up to {next} so far, not yet all of {from}..{to}"
        )));
    }
    if let Some((a, b)) = gaps.first() {
        missing!(
            "the archive of {topic}/{partition} has a gap at offsets {a}..{b}: they were deleted from the lane before they were archived"
        );
    }
    let mut at = from;
    let mut keys: HashMap<uuid::Uuid, Option<DataKey>> = HashMap::new();
    for (first, seg_next, object) in segments {
        if first > at {
            missing!("the archive of {topic}/{partition} has no segment for offsets {at}..{first}");
        }
        let records = match cache.and_then(|c| c.get(&object)) {
            Some(r) => r,
            None => {
                let Some(body) = s3.get(&object).await.map_err(|e| down(&format!("reading {object}: {e}")))? else {
                    missing!("{object} is recorded but not in the store")
                };
                let (meta, records) = match decode_segment(&body) {
                    Ok(d) => d,
                    Err(e) => missing!("decoding {object}: {e:#}"),
                };
                if meta.topic != topic || meta.partition != partition || meta.first != first || meta.next != seg_next {
                    missing!("{object} holds {meta:?}, not what is recorded");
                }
                let records = Arc::new(records);
                if let Some(c) = cache {
                    c.put(&object, Arc::clone(&records));
                }
                records
            }
        };
        let unknown: Vec<uuid::Uuid> = records
            .iter()
            .map(|r| r.key_id)
            .filter(|id| !keys.contains_key(id))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !unknown.is_empty() {
            let ids: Vec<String> = unknown.iter().map(uuid::Uuid::to_string).collect();
            let rows: Vec<(String, Vec<u8>)> = sqlx::query_as("SELECT key_id, key FROM archive_keys WHERE key_id = ANY($1)")
                .bind(&ids)
                .fetch_all(pool)
                .await
                .map_err(|e| down(&e))?;
            for id in &unknown {
                keys.insert(*id, None);
            }
            for (id, bytes) in rows {
                let key = id.parse().map_err(anyhow::Error::from).and_then(|id| DataKey::from_row(id, &bytes));
                match key {
                    Ok(k) => keys.insert(k.id, Some(k)),
                    Err(e) => missing!("archive key {id}: {e:#}"),
                };
            }
        }
        for r in records.iter() {
            if r.offset < at || r.offset >= to {
                continue;
            }
            // Every offset, in order: a hole is an unrecorded gap, never passed over.
            let want = from + out.records.len() as i64;
            if r.offset != want {
                missing!("{object}: offset {want} is missing (the next record is {})", r.offset);
            }
            match &keys[&r.key_id] {
                None => {
                    out.erased += 1;
                    out.records.push(erased_record(topic, partition, r.offset, r.timestamp_ms));
                }
                Some(k) => match open(k, topic, partition, r.offset, r.timestamp_ms, &r.nonce, &r.sealed) {
                    Ok(raw) => out.records.push(raw.message(topic, partition)),
                    Err(e) => missing!("{object}: {e:#}"),
                },
            }
        }
        at = seg_next.max(at);
        if at >= to {
            break;
        }
    }
    if at < to || out.records.len() as i64 != to - from {
        missing!("the archive of {topic}/{partition} does not hold every offset of {from}..{to} (has {} of them)", out.records.len());
    }
    Ok(out)
}

/// Decoded segments a reader goes back to (a task reads a segment in several intervals): the
/// last few, by object key.
#[derive(Default)]
pub struct SegmentCache {
    segments: std::sync::Mutex<std::collections::VecDeque<(String, Arc<Vec<Sealed>>)>>,
}

impl SegmentCache {
    const KEEP: usize = 8;
    fn get(&self, object: &str) -> Option<Arc<Vec<Sealed>>> {
        self.segments.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(k, _)| k == object).map(|(_, r)| Arc::clone(r))
    }
    fn put(&self, object: &str, records: Arc<Vec<Sealed>>) {
        let mut s = self.segments.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() >= Self::KEEP {
            s.pop_front();
        }
        s.push_back((object.to_owned(), records));
    }
}

/// The first archived offset of `topic`/`partition` below `before` whose timestamp is at or
/// after `ms` (what the broker's time index answers for the records it still holds). Segments
/// hold one UTC day each, so only those of that day and later are read.
pub async fn offset_for_time(
    pool: &PgPool,
    s3: &vitals_runtime::s3::S3Client,
    topic: &str,
    partition: i32,
    ms: i64,
    before: i64,
) -> anyhow::Result<Option<i64>> {
    let day = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().date_naive();
    let segments: Vec<String> = sqlx::query_scalar("SELECT object_key FROM archive_segments WHERE topic = $1 AND partition = $2 AND day >= $3 AND first_offset < $4 ORDER BY first_offset")
        .bind(topic)
        .bind(partition)
        .bind(day)
        .bind(before)
        .fetch_all(pool)
        .await?;
    for object in segments {
        let body = s3.get(&object).await?.with_context(|| format!("{object} is recorded but not in the store"))?;
        let (_, records) = decode_segment(&body).with_context(|| format!("decoding {object}"))?;
        if let Some(r) = records.iter().find(|r| r.timestamp_ms >= ms && r.offset < before) {
            return Ok(Some(r.offset));
        }
    }
    Ok(None)
}

/// Whether the archive holds every offset `from..to` of `topic`/`partition` (no recorded gap).
pub async fn holds(pool: &PgPool, topic: &str, partition: i32, from: i64, to: i64) -> anyhow::Result<bool> {
    let Coverage { position, gaps, segments } = coverage(pool, topic, partition, from, to).await?;
    if !(position.is_some_and(|(start, next)| start <= from && next >= to) && gaps.is_empty()) {
        return Ok(false);
    }
    let mut at = from;
    for (first, next, _) in segments {
        if first > at {
            return Ok(false);
        }
        at = at.max(next);
    }
    Ok(at >= to)
}

/// The archive's first offset of `topic`/`partition` (where archiving began), if it has one.
pub async fn start(pool: &PgPool, topic: &str, partition: i32) -> anyhow::Result<Option<i64>> {
    Ok(sqlx::query_scalar("SELECT start_offset FROM archive_positions WHERE topic = $1 AND partition = $2")
        .bind(topic)
        .bind(partition)
        .fetch_optional(pool)
        .await?)
}

/// The archive as the runtime reads it (blocking, from the runtime's thread).
pub struct Source {
    pub pool: PgPool,
    pub s3: vitals_runtime::s3::S3Client,
    pub rt: tokio::runtime::Handle,
    pub cache: SegmentCache,
}

impl vitals_runtime::Archive for Source {
    fn read(&self, topic: &str, partition: i32, from: i64, to: i64) -> Result<Vec<OwnedMessage>, ArchiveError> {
        self.rt.block_on(read(&self.pool, &self.s3, Some(&self.cache), topic, partition, from, to)).map(|r| r.records)
    }
}

/// Per input partition: what the archive holds, what the lane holds, and so up to which offset
/// the lane may be truncated without losing a record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusRow {
    pub topic: String,
    pub partition: i32,
    pub archived_from: Option<i64>,
    pub archived_to: Option<i64>,
    pub low: i64,
    pub high: i64,
    /// Records in the lane not archived yet.
    pub behind: i64,
    pub gaps: i64,
}

pub async fn status(cfg: &Config) -> anyhow::Result<Vec<StatusRow>> {
    let pool = app::pg_pool(cfg).await?;
    let topics = lanes(cfg);
    let at = positions(&pool, &topics).await?;
    let gaps: BTreeMap<(String, i32), i64> = sqlx::query_as::<_, (String, i32, i64)>(
        "SELECT topic, partition, count(*) FROM archive_gaps WHERE topic = ANY($1) GROUP BY topic, partition",
    )
    .bind(&topics)
    .fetch_all(&pool)
    .await?
    .into_iter()
    .map(|(t, p, n)| ((t, p), n))
    .collect();
    let parts = app::topic_partitions(cfg, &topics).await?;
    let client: rdkafka::consumer::BaseConsumer =
        app::kafka_base(cfg, "vitals-archive-status").set("group.id", "vitals-archive-status").create()?;
    let marks = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for (t, n) in parts {
            for p in 0..n as i32 {
                out.push((t.clone(), p, client.fetch_watermarks(&t, p, Duration::from_secs(10))?));
            }
        }
        anyhow::Ok(out)
    })
    .await??;
    Ok(marks
        .into_iter()
        .map(|(topic, partition, (low, high))| {
            let pos = at.get(&(topic.clone(), partition));
            let behind = high - pos.map_or(low, |p| p.next.max(low));
            StatusRow {
                gaps: gaps.get(&(topic.clone(), partition)).copied().unwrap_or(0),
                archived_from: pos.map(|p| p.start),
                archived_to: pos.map(|p| p.next),
                low,
                high,
                behind: behind.max(0),
                topic,
                partition,
            }
        })
        .collect())
}

/// `vitals archive status` as text.
pub fn render(rows: &[StatusRow]) -> String {
    use std::fmt::Write;
    let w = rows.iter().map(|r| r.topic.len()).max().unwrap_or(5).max(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<w$} {:>4} {:>12} {:>10} {:>10} {:>8} {:>5}",
        "topic", "part", "archived", "lane low", "lane high", "behind", "gaps"
    );
    for r in rows {
        let archived = match (r.archived_from, r.archived_to) {
            (Some(a), Some(b)) => format!("{a}..{b}"),
            _ => "-".into(),
        };
        let _ =
            writeln!(out, "{:<w$} {:>4} {:>12} {:>10} {:>10} {:>8} {:>5}", r.topic, r.partition, archived, r.low, r.high, r.behind, r.gaps);
    }
    let behind: i64 = rows.iter().map(|r| r.behind).sum();
    let _ = writeln!(out, "not archived yet: {behind} records; a lane may be truncated up to each partition's archived end");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(offset: i64) -> Raw {
        Raw {
            offset,
            timestamp_ms: 1_764_547_200_000 + offset,
            key: Some(b"user-1".to_vec()),
            headers: vec![("vitals-user".into(), Some(b"user-1".to_vec())), ("empty".into(), None)],
            payload: Some(vec![0, 1, 2, offset as u8]),
        }
    }

    #[test]
    fn a_segment_round_trips_and_names_no_user_in_clear() {
        let key = DataKey::generate();
        let records: Vec<Sealed> = (10..13)
            .map(|o| {
                let r = raw(o);
                let (nonce, sealed) = seal(&key, "t.hot", 2, &r).unwrap();
                Sealed { offset: o, timestamp_ms: r.timestamp_ms, key_id: key.id, nonce, sealed }
            })
            .collect();
        let meta = SegmentMeta { topic: "t.hot".into(), partition: 2, first: 10, next: 13, day: "2025-12-01".parse().unwrap() };
        let body = encode_segment(&meta, &records).unwrap();
        assert!(!body.windows(6).any(|w| w == b"user-1"), "the user id appears in clear");
        let (got_meta, got) = decode_segment(&body).unwrap();
        assert_eq!(got_meta, meta);
        let opened: Vec<Raw> = got.iter().map(|s| open(&key, "t.hot", 2, s.offset, s.timestamp_ms, &s.nonce, &s.sealed).unwrap()).collect();
        assert_eq!(opened, (10..13).map(raw).collect::<Vec<_>>());
        assert_eq!(meta.object_key("archive/"), "archive/t.hot/date=2025-12-01/p2/00000000000000000010-00000000000000000013.avro");
    }

    #[test]
    fn a_seal_opens_only_with_its_key_at_its_place() {
        let (key, other) = (DataKey::generate(), DataKey::generate());
        let r = raw(5);
        let (nonce, sealed) = seal(&key, "t.hot", 0, &r).unwrap();
        assert_eq!(open(&key, "t.hot", 0, 5, r.timestamp_ms, &nonce, &sealed).unwrap(), r);
        assert!(open(&other, "t.hot", 0, 5, r.timestamp_ms, &nonce, &sealed).is_err(), "another user's key");
        assert!(open(&key, "t.hot", 0, 6, r.timestamp_ms, &nonce, &sealed).is_err(), "moved to another offset");
        assert!(open(&key, "t.cold", 0, 5, r.timestamp_ms, &nonce, &sealed).is_err(), "moved to another topic");
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert!(open(&key, "t.hot", 0, 5, r.timestamp_ms, &nonce, &flipped).is_err(), "altered bytes");
    }

    #[test]
    fn a_record_read_back_is_the_message_its_lane_held() {
        let r = raw(7);
        let m = r.message("t.hot", 3);
        assert_eq!(Raw::of(&m), r);
        assert_eq!((m.topic(), m.partition(), m.offset()), ("t.hot", 3, 7));
        let bare = Raw { offset: 1, timestamp_ms: 2, key: None, headers: vec![], payload: None };
        assert_eq!(Raw::of(&bare.message("t", 0)), bare);
    }
}
