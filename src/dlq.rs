//! `vitals dlq list | show | replay`: the dead-letter topic for an operator.
//!
//! * `list` reads the dead-letter topic from its beginning to its current end and prints the dead
//!   letters a [`Selector`] picks, then a count per (stage, code).
//! * `show` prints one dead letter in full, the payload decoded with the registry when it decodes.
//! * `replay` writes the original key, payload and headers of the selected dead letters back to
//!   their source lane, on the partition the edge would choose ([`partition_for`] of the key), each
//!   source record **at most once**: the ledger `dlq_replays` (migration 0007) holds one row per
//!   source record replayed, inserted as an intent before the produce and completed after its
//!   acknowledgement; a run that finds an intent still open (a crash in between) looks for the
//!   copy's [`REPLAY_OF_HEADER`] in the target partition from where it ended before the produce,
//!   and only replays again what is not there. Runs on one dead-letter topic are serialised by a
//!   PostgreSQL advisory lock.
//!
//! Only records of an input lane are replayable. Projection topics (the sink's and the chained
//! processors' inputs) are compacted and owned by the processor that writes them: an old version
//! written back would become the last record of its key, which compaction keeps, and the owner
//! could not tell it from its own writes; those dead letters are reported as not replayable.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;
use sqlx::PgPool;
use vitals_schemas::codec::{Codec, CodecError};
use vitals_schemas::dead_letter::{
    replay_of, REASON_HEADER, REPLAY_DLQ_HEADER, REPLAY_OF_HEADER, SOURCE_OFFSET_HEADER, SOURCE_PARTITION_HEADER, SOURCE_TOPIC_HEADER,
};
use vitals_schemas::topics::{partition_for, TopicRole, Topics};
use vitals_schemas::DeadLetter;

use crate::app;
use crate::config::Config;

/// Which dead letters: every condition given must hold (none given: all of them).
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// The source topic's full name (see [`resolve_topic`]).
    pub topic: Option<String>,
    pub partition: Option<i32>,
    /// Source offsets, both inclusive.
    pub from_offset: Option<i64>,
    pub to_offset: Option<i64>,
    pub code: Option<String>,
    /// A stage (`processor:rollup_day`), its name (`rollup_day`) or its kind (`processor`, `sink`).
    pub stage: Option<String>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.topic.is_none()
            && self.partition.is_none()
            && self.from_offset.is_none()
            && self.to_offset.is_none()
            && self.code.is_none()
            && self.stage.is_none()
    }

    fn source_matches(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.topic.as_ref().is_none_or(|t| t == topic)
            && self.partition.is_none_or(|p| p == partition)
            && self.from_offset.is_none_or(|a| offset >= a)
            && self.to_offset.is_none_or(|b| offset <= b)
    }

    pub fn matches(&self, d: &DeadLetter) -> bool {
        self.source_matches(&d.source_topic, d.source_partition, d.source_offset)
            && self.code.as_ref().is_none_or(|c| *c == d.code)
            && self
                .stage
                .as_ref()
                .is_none_or(|s| *s == d.stage || d.stage.split_once(':').is_some_and(|(kind, name)| kind == s || name == s))
    }

    /// What can be decided from a dead letter's headers alone (before decoding it): `false` only
    /// if they prove it is not selected.
    fn headers_may_match(&self, m: &OwnedMessage) -> bool {
        let (Some(t), Some(p), Some(o)) =
            (header(m, SOURCE_TOPIC_HEADER), header(m, SOURCE_PARTITION_HEADER), header(m, SOURCE_OFFSET_HEADER))
        else {
            return true;
        };
        let (Ok(p), Ok(o)) = (p.parse(), o.parse()) else { return true };
        self.source_matches(&t, p, o)
    }
}

/// A topic named on the command line: a lane or projection alias (`hot`, `cold`, `change`,
/// `domain`, `rollup_day`, …), a full name, or a name without `kafka.topic_prefix`.
pub fn resolve_topic(t: &Topics, s: &str) -> String {
    let alias = match s {
        "hot" => Some(&t.hot),
        "cold" => Some(&t.cold),
        "change" => Some(&t.change),
        "domain" => Some(&t.domain),
        _ => None,
    };
    if let Some(a) = alias {
        return a.clone();
    }
    if let Some(d) = t.projections.iter().find(|d| d.name == s) {
        return t.output(d.name);
    }
    let specs = t.specs();
    let prefixed = format!("{}{s}", t.prefix);
    if !specs.iter().any(|x| x.name == s) && specs.iter().any(|x| x.name == prefixed) {
        return prefixed;
    }
    s.to_owned()
}

/// One record of the dead-letter topic.
#[derive(Debug, Clone)]
pub struct Entry {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub dead: DeadLetter,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Why the dead letter itself does not decode; its fields then come from its headers.
    pub broken: Option<String>,
}

impl Entry {
    fn at(&self) -> String {
        format!("{}:{}", self.partition, self.offset)
    }
    fn source(&self) -> String {
        replay_of(&self.dead.source_topic, self.dead.source_partition, self.dead.source_offset)
    }
    fn user(&self) -> String {
        self.dead.key.as_deref().map(printable).unwrap_or_else(|| "-".into())
    }
    fn time(&self) -> String {
        self.timestamp_ms
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_else(|| "-".into())
    }
}

/// Bytes as text an operator's terminal can show safely: invalid UTF-8 replaced, control
/// characters (a hostile key or reason) escaped.
fn printable(b: &[u8]) -> String {
    String::from_utf8_lossy(b).chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
}

fn truncated(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(max - 1).collect::<String>())
    }
}

fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    m.headers()?.iter().find(|h| h.key == key)?.value.map(|v| String::from_utf8_lossy(v).into_owned())
}

fn headers_of(m: &OwnedMessage) -> Vec<(String, Option<Vec<u8>>)> {
    m.headers().map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect()).unwrap_or_default()
}

/// A consumer outside any group, for reading offset ranges.
fn reader(cfg: &Config) -> anyhow::Result<StreamConsumer> {
    app::kafka_base(cfg, "vitals-dlq")
        .set("group.id", "vitals-dlq-unused")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("log_level", "4")
        .create()
        .context("creating a Kafka reader")
}

fn metadata_client(cfg: &Config) -> anyhow::Result<BaseConsumer> {
    app::kafka_base(cfg, "vitals-dlq").create().context("creating a Kafka metadata client")
}

/// The partitions of `topic`, or an error if the broker does not know it.
async fn partitions(cfg: &Config, topic: &str) -> anyhow::Result<Vec<i32>> {
    let client = metadata_client(cfg)?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let md = client.fetch_metadata(Some(&topic), Duration::from_secs(10)).with_context(|| format!("metadata of {topic}"))?;
        let parts: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        anyhow::ensure!(!parts.is_empty(), "topic {topic} does not exist (run `vitals topics create`, or check kafka.topic_prefix)");
        Ok(parts)
    })
    .await
    .context("metadata task")?
}

/// Low and high watermark of each of `parts`.
async fn watermarks(cfg: &Config, topic: &str, parts: &[i32]) -> anyhow::Result<BTreeMap<i32, (i64, i64)>> {
    let client = metadata_client(cfg)?;
    let (topic, parts) = (topic.to_owned(), parts.to_vec());
    tokio::task::spawn_blocking(move || {
        let mut out = BTreeMap::new();
        for p in parts {
            out.insert(
                p,
                client.fetch_watermarks(&topic, p, Duration::from_secs(10)).with_context(|| format!("watermarks of {topic} [{p}]"))?,
            );
        }
        Ok(out)
    })
    .await
    .context("watermarks task")?
}

/// The records of `topic` in each partition's `[from, to)` (clamped to what the partition holds
/// now) that `keep` accepts, in offset order per partition.
async fn read_ranges(
    cfg: &Config,
    topic: &str,
    ranges: &BTreeMap<i32, (i64, i64)>,
    mut keep: impl FnMut(&OwnedMessage) -> bool,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let marks = watermarks(cfg, topic, &ranges.keys().copied().collect::<Vec<_>>()).await?;
    let mut tpl = TopicPartitionList::new();
    let mut open: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for (p, (from, to)) in ranges {
        let (lo, hi) = marks[p];
        let (from, to) = ((*from).max(lo), (*to).min(hi));
        if from < to {
            tpl.add_partition_offset(topic, *p, Offset::Offset(from))?;
            open.insert(*p, (from, to));
        }
    }
    let mut out = Vec::new();
    if open.is_empty() {
        return Ok(out);
    }
    let consumer = reader(cfg)?;
    consumer.assign(&tpl)?;
    const STALL: Duration = Duration::from_secs(60);
    let mut progress = Instant::now();
    while !open.is_empty() {
        match tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
            Err(_) => anyhow::ensure!(
                progress.elapsed() < STALL,
                "reading {topic}: partitions {:?} made no progress for {STALL:?}",
                open.keys().collect::<Vec<_>>()
            ),
            Ok(Ok(m)) => {
                progress = Instant::now();
                let (p, offset) = (m.partition(), m.offset());
                let Some(&(from, to)) = open.get(&p) else { continue };
                if offset < from {
                    continue;
                }
                if offset < to {
                    let m = m.detach();
                    if keep(&m) {
                        out.push(m);
                    }
                }
                if offset + 1 >= to {
                    open.remove(&p);
                }
            }
            Ok(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Ok(Err(e)) => return Err(e).with_context(|| format!("reading {topic}")),
        }
    }
    Ok(out)
}

/// The dead letters `sel` picks, in (partition, offset) order of the dead-letter topic.
pub async fn scan(cfg: &Config, codec: &Codec, sel: &Selector) -> anyhow::Result<Vec<Entry>> {
    let topic = app::topics(cfg).dead_letter;
    let ranges = partitions(cfg, &topic).await?.into_iter().map(|p| (p, (0, i64::MAX))).collect();
    let mut out = Vec::new();
    for m in read_ranges(cfg, &topic, &ranges, |m| sel.headers_may_match(m)).await? {
        let e = entry(codec, &m).await?;
        if sel.matches(&e.dead) {
            out.push(e);
        }
    }
    Ok(out)
}

/// Decodes one record of the dead-letter topic. A registry that cannot be reached is an error
/// (try again later), not a broken dead letter.
async fn entry(codec: &Codec, m: &OwnedMessage) -> anyhow::Result<Entry> {
    let (dead, broken) = match codec.decode::<DeadLetter>(m.payload().unwrap_or_default()).await {
        Ok(d) => (d, None),
        Err(CodecError::Unavailable(e)) => bail!("schema registry unavailable: {e}"),
        Err(e) => {
            let h = |k| header(m, k);
            let d = DeadLetter {
                source_topic: h(SOURCE_TOPIC_HEADER).unwrap_or_default(),
                source_partition: h(SOURCE_PARTITION_HEADER).and_then(|p| p.parse().ok()).unwrap_or(-1),
                source_offset: h(SOURCE_OFFSET_HEADER).and_then(|o| o.parse().ok()).unwrap_or(-1),
                stage: "?".into(),
                code: "?".into(),
                reason: h(REASON_HEADER).unwrap_or_default(),
                key: m.key().map(<[u8]>::to_vec),
                payload: None,
            };
            (d, Some(e.to_string()))
        }
    };
    Ok(Entry {
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        dead,
        headers: headers_of(m),
        broken,
    })
}

/// Dead letters per (stage, code).
fn counts(entries: &[Entry]) -> BTreeMap<(String, String), usize> {
    let mut c = BTreeMap::new();
    for e in entries {
        *c.entry((e.dead.stage.clone(), e.dead.code.clone())).or_default() += 1;
    }
    c
}

/// `vitals dlq list`: the text (or JSON) to print.
pub async fn list(cfg: &Config, sel: &Selector, json: bool) -> anyhow::Result<String> {
    let codec = crate::app::codec(cfg);
    let entries = scan(cfg, &codec, sel).await?;
    let counts = counts(&entries);
    let topic = app::topics(cfg).dead_letter;
    let mut out = String::new();
    if json {
        let list: Vec<_> = entries
            .iter()
            .map(|e| {
                json!({
                    "partition": e.partition, "offset": e.offset, "timestamp": e.time(),
                    "stage": e.dead.stage, "code": e.dead.code, "reason": e.dead.reason,
                    "source": {"topic": e.dead.source_topic, "partition": e.dead.source_partition, "offset": e.dead.source_offset},
                    "user": e.dead.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
                    "payload_bytes": e.dead.payload.as_ref().map(Vec::len),
                    "broken": e.broken,
                })
            })
            .collect();
        let counts: Vec<_> = counts.iter().map(|((s, c), n)| json!({"stage": s, "code": c, "count": n})).collect();
        let doc = json!({"topic": topic, "total": entries.len(), "dead_letters": list, "counts": counts});
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&doc)?);
        return Ok(out);
    }
    for e in &entries {
        let _ = writeln!(
            out,
            "{:<10} {} {:<24} {:<18} {} user={} {}",
            e.at(),
            e.time(),
            e.dead.stage,
            e.dead.code,
            e.source(),
            e.user(),
            truncated(
                &printable(
                    e.broken
                        .as_deref()
                        .map(|b| format!("(dead letter undecodable: {b}) {}", e.dead.reason))
                        .as_deref()
                        .unwrap_or(&e.dead.reason)
                        .as_bytes()
                ),
                100
            ),
        );
    }
    let _ = writeln!(out, "{} dead letters in {topic}{}", entries.len(), if sel.is_empty() { "" } else { " selected" });
    for ((stage, code), n) in &counts {
        let _ = writeln!(out, "{n:>8}  {stage:<24} {code}");
    }
    Ok(out)
}

/// `<partition>:<offset>`.
fn parse_at(at: &str) -> anyhow::Result<(i32, i64)> {
    let (p, o) = at.split_once(':').with_context(|| format!("`{at}`: expected <partition>:<offset>, as `dlq list` prints it"))?;
    Ok((p.trim().parse().with_context(|| format!("partition of `{at}`"))?, o.trim().parse().with_context(|| format!("offset of `{at}`"))?))
}

/// The one record at `offset` of `topic` [`partition`], if the partition still holds it.
async fn read_one(cfg: &Config, topic: &str, partition: i32, offset: i64) -> anyhow::Result<Option<OwnedMessage>> {
    let got = read_ranges(cfg, topic, &BTreeMap::from([(partition, (offset, offset + 1))]), |m| m.offset() == offset).await?;
    Ok(got.into_iter().next())
}

/// A payload decoded with whatever schema its registry id names, as JSON.
async fn decode_any(codec: &Codec, bytes: &[u8]) -> Result<serde_json::Value, String> {
    let value = codec.decode_value(bytes).await.map_err(|e| e.to_string())?;
    serde_json::Value::try_from(value).map_err(|e| e.to_string())
}

type Timestamp = chrono::DateTime<chrono::Utc>;

/// A row of `dlq_replays`: source topic, partition, offset, target topic, partition, offset, when.
type LedgerRow = (String, i32, i64, String, i32, Option<i64>, Option<Timestamp>);

/// What the ledger says of a source record.
#[derive(Debug, Clone)]
struct Replayed {
    target: String,
    target_offset: Option<i64>,
    at: Option<Timestamp>,
}

async fn ledger_row(pool: &PgPool, topic: &str, partition: i32, offset: i64) -> Result<Option<Replayed>, sqlx::Error> {
    let row: Option<(String, i32, Option<i64>, Option<Timestamp>)> = sqlx::query_as(
        "SELECT target_topic, target_partition, target_offset, replayed_at FROM dlq_replays WHERE source_topic = $1 AND source_partition = $2 AND source_offset = $3",
    )
    .bind(topic)
    .bind(partition)
    .bind(offset)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(t, p, o, at)| Replayed { target: format!("{t}:{p}"), target_offset: o, at }))
}

/// Whether a dead letter of `source_topic` can be replayed, and if not why.
fn replayable(t: &Topics, e: &Entry) -> Result<(), String> {
    if let Some(b) = &e.broken {
        return Err(format!("the dead letter itself does not decode ({b}): its original bytes are unknown"));
    }
    match t.specs().iter().find(|s| s.name == e.dead.source_topic).map(|s| s.role) {
        Some(TopicRole::Input) if e.dead.key.is_none() => Err("no key: the partition the edge would choose is unknown".into()),
        Some(TopicRole::Input) => Ok(()),
        Some(TopicRole::Projection) => Err("a projection topic: compacted and owned by its processor, which re-emits its keys; an old version written back would outlive newer ones under compaction".into()),
        Some(TopicRole::DeadLetter) => Err("the dead-letter topic itself".into()),
        None => Err(format!("not a topic of this deployment (kafka.topic_prefix = {:?})", t.prefix)),
    }
}

/// `vitals dlq show <partition>:<offset>`.
pub async fn show(cfg: &Config, at: &str, json: bool) -> anyhow::Result<String> {
    let (p, o) = parse_at(at)?;
    let t = app::topics(cfg);
    let codec = crate::app::codec(cfg);
    let Some(m) = read_one(cfg, &t.dead_letter, p, o).await? else {
        bail!("no dead letter at {p}:{o} of {} (past the end, or removed by retention)", t.dead_letter);
    };
    let e = entry(&codec, &m).await?;
    let d = &e.dead;
    let payload = d.payload.as_deref();
    let decoded = match payload {
        Some(b) => Some(decode_any(&codec, b).await),
        None => None,
    };
    let schema_id = payload.filter(|b| b.len() >= 5 && b[0] == 0).map(|b| u32::from_be_bytes([b[1], b[2], b[3], b[4]]));
    // The source record, if its topic still holds it: its headers are what a replay writes back.
    let src = read_one(cfg, &d.source_topic, d.source_partition, d.source_offset).await;
    let source = match &src {
        Ok(Some(s)) if s.key() == d.key.as_deref() && s.payload() == payload => format!("still in {} with the same bytes", d.source_topic),
        Ok(Some(_)) => "the record at that position has other bytes".to_owned(),
        Ok(None) => "gone (retention or compaction)".to_owned(),
        Err(err) => format!("not readable: {err:#}"),
    };
    let original_headers = match &src {
        Ok(Some(s)) => headers_of(s),
        _ => Vec::new(),
    };
    let replay = match replayable(&t, &e) {
        Err(why) => format!("not replayable: {why}"),
        Ok(()) => match app::pg_pool(cfg).await {
            Err(err) => format!("unknown (PostgreSQL: {err:#})"),
            Ok(pool) => match ledger_row(&pool, &d.source_topic, d.source_partition, d.source_offset).await {
                Ok(None) => "not replayed".to_owned(),
                Ok(Some(Replayed { target, target_offset: Some(to), at })) => {
                    format!("replayed to {target}:{to} at {}", at.map(|a| a.to_rfc3339()).unwrap_or_default())
                }
                Ok(Some(Replayed { target, target_offset: None, .. })) => {
                    format!("in doubt: a replay to {target} was started and not confirmed (the next `dlq replay` settles it)")
                }
                Err(err) => format!("unknown (ledger: {err})"),
            },
        },
    };
    let hdrs = |h: &[(String, Option<Vec<u8>>)]| -> Vec<(String, String)> {
        h.iter().map(|(k, v)| (k.clone(), v.as_deref().map(printable).unwrap_or_else(|| "(null)".into()))).collect()
    };
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut out = String::new();
    if json {
        let doc = json!({
            "topic": t.dead_letter, "partition": e.partition, "offset": e.offset, "timestamp": e.time(),
            "stage": d.stage, "code": d.code, "reason": d.reason, "broken": e.broken,
            "source": {"topic": d.source_topic, "partition": d.source_partition, "offset": d.source_offset, "record": source, "headers": hdrs(&original_headers)},
            "headers": hdrs(&e.headers),
            "key": d.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
            "key_hex": d.key.as_deref().map(hex::encode),
            "payload_hex": payload.map(hex::encode),
            "payload_base64": payload.map(b64),
            "schema_id": schema_id,
            "decoded": decoded.as_ref().and_then(|r| r.as_ref().ok()),
            "decode_error": decoded.as_ref().and_then(|r| r.as_ref().err()),
            "replay": replay,
        });
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&doc)?);
        return Ok(out);
    }
    let _ = writeln!(out, "dead letter  {} {}", t.dead_letter, e.at());
    let _ = writeln!(out, "time         {}", e.time());
    let _ = writeln!(out, "stage        {}", d.stage);
    let _ = writeln!(out, "code         {}", d.code);
    let _ = writeln!(out, "reason       {}", printable(d.reason.as_bytes()));
    if let Some(b) = &e.broken {
        let _ = writeln!(out, "broken       the dead letter itself does not decode: {b}");
    }
    let _ = writeln!(out, "source       {} ({source})", e.source());
    let _ = writeln!(out, "key          {} (hex {})", e.user(), d.key.as_deref().map(hex::encode).unwrap_or_default());
    for (i, (k, v)) in hdrs(&e.headers).iter().enumerate() {
        let _ = writeln!(out, "{}{k}: {v}", if i == 0 { "headers      " } else { "             " });
    }
    for (i, (k, v)) in hdrs(&original_headers).iter().enumerate() {
        let _ = writeln!(out, "{}{k}: {v}", if i == 0 { "source hdrs  " } else { "             " });
    }
    match payload {
        None => {
            let _ = writeln!(out, "payload      none");
        }
        Some(b) => {
            let _ = writeln!(out, "payload      {} bytes{}", b.len(), schema_id.map(|i| format!(", schema id {i}")).unwrap_or_default());
            let _ = writeln!(out, "  hex        {}", hex::encode(b));
            let _ = writeln!(out, "  base64     {}", b64(b));
        }
    }
    match &decoded {
        Some(Ok(v)) => {
            let _ = writeln!(out, "decoded      {}", serde_json::to_string_pretty(v)?.replace('\n', "\n             "));
        }
        Some(Err(err)) => {
            let _ = writeln!(out, "decoded      does not decode: {}", printable(err.as_bytes()));
        }
        None => {}
    }
    let _ = writeln!(out, "replay       {replay}");
    Ok(out)
}

/// What `vitals dlq replay` did (or, with `--dry-run`, would do).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead letters the selector picked.
    pub selected: usize,
    /// Distinct source records among them (one record can have several dead letters).
    pub sources: usize,
    pub replayed: usize,
    /// Replayed by an earlier run, as the ledger says: not written again.
    pub already: usize,
    /// Open intents of an interrupted earlier run whose copy was found on its target: completed
    /// in the ledger, not written again.
    pub recovered: usize,
    pub not_replayable: usize,
    /// With `--dry-run`: what a real run would write.
    pub would_replay: usize,
    /// Writes not acknowledged: their intents stay open and the next run settles them.
    pub failed: usize,
}

type SourceKey = (String, i32, i64);

fn key_of(d: &DeadLetter) -> SourceKey {
    (d.source_topic.clone(), d.source_partition, d.source_offset)
}

/// Completes or withdraws the open intents (`target_offset IS NULL`) an interrupted run left:
/// a copy carrying the intent's `vitals-replay-of` at or after `scan_from` in the target
/// partition was written (the row is completed), otherwise it was not (the row is removed, so
/// the record is replayed again). Read-only with `dry_run`; returns the sources found written.
async fn settle(
    cfg: &Config,
    pool: &PgPool,
    dlq_topic: &str,
    dry_run: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<BTreeMap<SourceKey, (String, i32, i64)>> {
    let open: Vec<(String, i32, i64, String, i32, i64)> = sqlx::query_as(
        "SELECT source_topic, source_partition, source_offset, target_topic, target_partition, scan_from FROM dlq_replays WHERE dlq_topic = $1 AND target_offset IS NULL",
    )
    .bind(dlq_topic)
    .fetch_all(pool)
    .await
    .context("reading open replay intents")?;
    let mut by_topic: BTreeMap<String, BTreeMap<i32, (i64, i64)>> = BTreeMap::new();
    for (_, _, _, tt, tp, from) in &open {
        let r = by_topic.entry(tt.clone()).or_default().entry(*tp).or_insert((*from, i64::MAX));
        r.0 = r.0.min(*from);
    }
    let wanted: BTreeSet<String> = open.iter().map(|(t, p, o, ..)| replay_of(t, *p, *o)).collect();
    let mut found: BTreeMap<String, (String, i32, i64)> = BTreeMap::new();
    for (topic, ranges) in &by_topic {
        for m in read_ranges(cfg, topic, ranges, |m| header(m, REPLAY_OF_HEADER).is_some_and(|v| wanted.contains(&v))).await? {
            let of = header(&m, REPLAY_OF_HEADER).unwrap_or_default();
            found.entry(of).or_insert((topic.clone(), m.partition(), m.offset()));
        }
    }
    let mut written = BTreeMap::new();
    for (st, sp, so, tt, tp, _) in open {
        let of = replay_of(&st, sp, so);
        match found.get(&of) {
            Some((t, p, o)) if *t == tt && *p == tp => {
                writeln!(out, "recovered  {of} was written to {t}:{p}:{o} by an interrupted run: not written again")?;
                if !dry_run {
                    sqlx::query("UPDATE dlq_replays SET target_offset = $4, replayed_at = now() WHERE source_topic = $1 AND source_partition = $2 AND source_offset = $3")
                        .bind(&st)
                        .bind(sp)
                        .bind(so)
                        .bind(*o)
                        .execute(pool)
                        .await?;
                }
                written.insert((st, sp, so), (t.clone(), *p, *o));
            }
            _ => {
                writeln!(out, "in doubt   {of}: an interrupted run did not write it to {tt}:{tp}; it is replayed again")?;
                if !dry_run {
                    sqlx::query("DELETE FROM dlq_replays WHERE source_topic = $1 AND source_partition = $2 AND source_offset = $3 AND target_offset IS NULL")
                        .bind(&st)
                        .bind(sp)
                        .bind(so)
                        .execute(pool)
                        .await?;
                }
            }
        }
    }
    Ok(written)
}

/// The source records at `offsets` of `topic` [`partition`] that are still there, by offset.
async fn originals(cfg: &Config, topic: &str, partition: i32, offsets: &BTreeSet<i64>) -> anyhow::Result<BTreeMap<i64, OwnedMessage>> {
    // Nearby offsets are read in one pass, distant ones each on their own.
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for &o in offsets {
        match runs.last_mut() {
            Some((_, end)) if o - *end <= 256 => *end = o + 1,
            _ => runs.push((o, o + 1)),
        }
    }
    let mut out = BTreeMap::new();
    for (from, to) in runs {
        for m in read_ranges(cfg, topic, &BTreeMap::from([(partition, (from, to))]), |m| offsets.contains(&m.offset())).await? {
            out.insert(m.offset(), m);
        }
    }
    Ok(out)
}

/// One record to write back.
struct Copy {
    entry: Entry,
    topic: String,
    partition: i32,
    headers: Vec<(String, Option<Vec<u8>>)>,
    headers_recovered: bool,
}

/// `vitals dlq replay`: see the module documentation. Lines for the operator go to `out`.
pub async fn replay(cfg: &Config, sel: &Selector, dry_run: bool, out: &mut impl std::io::Write) -> anyhow::Result<ReplayReport> {
    use sqlx::Connection as _;
    let t = app::topics(cfg);
    let pool = app::pg_pool(cfg).await?;
    app::migrate(&pool).await?;
    // One replay per dead-letter topic at a time: the lock is the session's, released when the
    // connection closes, however this process ends.
    let mut lock = sqlx::PgConnection::connect(cfg.postgres.url.expose()).await.context("connecting to PostgreSQL for the replay lock")?;
    let lock_name = format!("vitals dlq replay {}", t.dead_letter);
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))").bind(&lock_name).fetch_one(&mut lock).await?;
    anyhow::ensure!(locked, "another `vitals dlq replay` of {} is running; try again when it is done", t.dead_letter);

    let mut report = ReplayReport::default();
    let settled = settle(cfg, &pool, &t.dead_letter, dry_run, out).await?;
    report.recovered = settled.len();
    let codec = crate::app::codec(cfg);
    let entries = scan(cfg, &codec, sel).await?;
    report.selected = entries.len();
    let ledger: Vec<LedgerRow> = sqlx::query_as(
        "SELECT source_topic, source_partition, source_offset, target_topic, target_partition, target_offset, replayed_at FROM dlq_replays WHERE dlq_topic = $1",
    )
    .bind(&t.dead_letter)
    .fetch_all(&pool)
    .await
    .context("reading the replay ledger")?;
    let done: BTreeMap<SourceKey, String> = ledger
        .into_iter()
        .filter_map(|(st, sp, so, tt, tp, to, at)| {
            Some(((st, sp, so), format!("{tt}:{tp}:{} at {}", to?, at.map(|a| a.to_rfc3339()).unwrap_or_default())))
        })
        .chain(settled.iter().map(|(k, (tt, tp, to))| (k.clone(), format!("{tt}:{tp}:{to} by an interrupted run"))))
        .collect();

    // One copy per source record, in source order; the first dead letter selected names it.
    let mut seen: BTreeSet<SourceKey> = BTreeSet::new();
    let mut todo: Vec<Entry> = Vec::new();
    for e in entries {
        let k = key_of(&e.dead);
        if !seen.insert(k.clone()) {
            writeln!(out, "same       dlq {:<9} {} ({}): one copy covers it", e.at(), e.source(), e.dead.stage)?;
            continue;
        }
        if let Err(why) = replayable(&t, &e) {
            report.not_replayable += 1;
            writeln!(out, "skip       dlq {:<9} {}: not replayable: {why}", e.at(), e.source())?;
            continue;
        }
        if let Some(to) = done.get(&k) {
            report.already += 1;
            writeln!(out, "already    dlq {:<9} {}: replayed to {to}", e.at(), e.source())?;
            continue;
        }
        todo.push(e);
    }
    report.sources = seen.len();
    todo.sort_by_key(|e| key_of(&e.dead));

    // Where each goes (the edge's partition for its key), with the headers the source record had.
    let mut partition_counts: BTreeMap<String, i32> = BTreeMap::new();
    let mut wanted: BTreeMap<(String, i32), BTreeSet<i64>> = BTreeMap::new();
    for e in &todo {
        if let std::collections::btree_map::Entry::Vacant(v) = partition_counts.entry(e.dead.source_topic.clone()) {
            v.insert(partitions(cfg, &e.dead.source_topic).await?.len() as i32);
        }
        wanted.entry((e.dead.source_topic.clone(), e.dead.source_partition)).or_default().insert(e.dead.source_offset);
    }
    let mut found: BTreeMap<SourceKey, OwnedMessage> = BTreeMap::new();
    for ((topic, p), offsets) in &wanted {
        for (o, m) in originals(cfg, topic, *p, offsets).await? {
            found.insert((topic.clone(), *p, o), m);
        }
    }
    let mut copies: Vec<Copy> = Vec::new();
    for e in todo {
        let k = key_of(&e.dead);
        let key = e.dead.key.as_deref().unwrap_or_default();
        let partition = partition_for(key, partition_counts[&e.dead.source_topic]);
        let original = found.get(&k).filter(|m| m.key() == e.dead.key.as_deref() && m.payload() == e.dead.payload.as_deref());
        let headers: Vec<(String, Option<Vec<u8>>)> = original
            .map(headers_of)
            .unwrap_or_default()
            .into_iter()
            .filter(|(h, _)| h != REPLAY_OF_HEADER && h != REPLAY_DLQ_HEADER)
            .collect();
        copies.push(Copy { topic: e.dead.source_topic.clone(), partition, headers, headers_recovered: original.is_some(), entry: e });
    }
    let note = |c: &Copy| {
        let mut n = String::new();
        if c.partition != c.entry.dead.source_partition {
            n.push_str(&format!(" (the source was on partition {}, not the partitioner's)", c.entry.dead.source_partition));
        }
        if !c.headers_recovered {
            n.push_str(" (the source record is gone: written without its original headers)");
        }
        n
    };
    if dry_run {
        for c in &copies {
            report.would_replay += 1;
            writeln!(out, "would      dlq {:<9} {} -> {}:{}{}", c.entry.at(), c.entry.source(), c.topic, c.partition, note(c))?;
        }
        summary(out, &report, dry_run)?;
        return Ok(report);
    }

    // Intents first, with where each target partition ends now: the copy lands at or after it.
    let mut ends: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for c in &copies {
        if let std::collections::btree_map::Entry::Vacant(v) = ends.entry((c.topic.clone(), c.partition)) {
            v.insert(watermarks(cfg, &c.topic, &[c.partition]).await?[&c.partition].1);
        }
    }
    let mut tx = pool.begin().await?;
    for c in &copies {
        let d = &c.entry.dead;
        sqlx::query(
            "INSERT INTO dlq_replays (source_topic, source_partition, source_offset, dlq_topic, dlq_partition, dlq_offset, target_topic, target_partition, scan_from)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&d.source_topic)
        .bind(d.source_partition)
        .bind(d.source_offset)
        .bind(&t.dead_letter)
        .bind(c.entry.partition)
        .bind(c.entry.offset)
        .bind(&c.topic)
        .bind(c.partition)
        .bind(ends[&(c.topic.clone(), c.partition)])
        .execute(&mut *tx)
        .await
        .context("recording a replay intent")?;
    }
    tx.commit().await.context("recording the replay intents")?;

    // Then the copies, enqueued in order (a full queue is waited out, so none overtakes another)
    // through the idempotent producer: its own retries never write a copy twice.
    let producer = app::producer(cfg, "vitals-dlq-replay")?;
    let mut acks = Vec::with_capacity(copies.len());
    for c in &copies {
        let of = c.entry.source();
        let at = c.entry.at();
        let mut headers = OwnedHeaders::new_with_capacity(c.headers.len() + 2);
        for (k, v) in &c.headers {
            headers = headers.insert(Header { key: k, value: v.as_deref() });
        }
        headers = headers
            .insert(Header { key: REPLAY_OF_HEADER, value: Some(of.as_str()) })
            .insert(Header { key: REPLAY_DLQ_HEADER, value: Some(at.as_str()) });
        let key = c.entry.dead.key.as_deref().unwrap_or_default();
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(&c.topic).partition(c.partition).key(key).headers(headers.clone());
            if let Some(p) = c.entry.dead.payload.as_deref() {
                record = record.payload(p);
            }
            match producer.send_result(record) {
                Ok(ack) => {
                    acks.push(ack);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err((e, _)) => return Err(e).context("enqueueing a replayed record (its intent stays open; run the replay again)"),
            }
        }
    }
    for (c, ack) in copies.iter().zip(acks) {
        let d = &c.entry.dead;
        match ack.await {
            Ok(Ok(delivery)) => {
                sqlx::query("UPDATE dlq_replays SET target_offset = $4, replayed_at = now() WHERE source_topic = $1 AND source_partition = $2 AND source_offset = $3")
                    .bind(&d.source_topic)
                    .bind(d.source_partition)
                    .bind(d.source_offset)
                    .bind(delivery.offset)
                    .execute(&pool)
                    .await
                    .context("completing a replay in the ledger (the next run finds the copy and completes it)")?;
                report.replayed += 1;
                writeln!(
                    out,
                    "replayed   dlq {:<9} {} -> {}:{}:{}{}",
                    c.entry.at(),
                    c.entry.source(),
                    c.topic,
                    delivery.partition,
                    delivery.offset,
                    note(c)
                )?;
            }
            Ok(Err((e, _))) => {
                report.failed += 1;
                writeln!(out, "failed     dlq {:<9} {}: not acknowledged: {e}", c.entry.at(), c.entry.source())?;
            }
            Err(_) => {
                report.failed += 1;
                writeln!(out, "failed     dlq {:<9} {}: the producer dropped the delivery", c.entry.at(), c.entry.source())?;
            }
        }
    }
    let _ = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))").bind(&lock_name).execute(&mut lock).await;
    summary(out, &report, dry_run)?;
    Ok(report)
}

fn summary(out: &mut impl std::io::Write, r: &ReplayReport, dry_run: bool) -> std::io::Result<()> {
    let mut s = format!("{} dead letters selected, {} source records: ", r.selected, r.sources);
    if dry_run {
        s.push_str(&format!("{} would be replayed (dry run: nothing written), ", r.would_replay));
    } else {
        s.push_str(&format!("{} replayed, ", r.replayed));
    }
    s.push_str(&format!("{} already replayed, {} not replayable", r.already, r.not_replayable));
    if r.recovered > 0 {
        s.push_str(&format!(", {} completed from an interrupted run", r.recovered));
    }
    if r.failed > 0 {
        s.push_str(&format!(", {} failed", r.failed));
    }
    writeln!(out, "{s}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dl(topic: &str, p: i32, o: i64, stage: &str, code: &str) -> DeadLetter {
        DeadLetter {
            source_topic: topic.into(),
            source_partition: p,
            source_offset: o,
            stage: stage.into(),
            code: code.into(),
            reason: "r".into(),
            key: Some(b"u".to_vec()),
            payload: None,
        }
    }

    #[test]
    fn selectors_pick_by_source_range_code_and_stage() {
        let d = dl("t.vitals.health.hot", 2, 10, "processor:rollup_day", "undecodable");
        assert!(Selector::default().matches(&d));
        let s = |f: fn(&mut Selector)| {
            let mut s = Selector::default();
            f(&mut s);
            s.matches(&d)
        };
        assert!(s(|s| s.topic = Some("t.vitals.health.hot".into())));
        assert!(!s(|s| s.topic = Some("t.vitals.health.cold".into())));
        assert!(s(|s| s.partition = Some(2)) && !s(|s| s.partition = Some(1)));
        assert!(s(|s| s.from_offset = Some(10)) && !s(|s| s.from_offset = Some(11)));
        assert!(s(|s| s.to_offset = Some(10)) && !s(|s| s.to_offset = Some(9)));
        assert!(s(|s| s.code = Some("undecodable".into())) && !s(|s| s.code = Some("bad_id".into())));
        for stage in ["processor:rollup_day", "rollup_day", "processor"] {
            assert!(Selector { stage: Some(stage.into()), ..Selector::default() }.matches(&d), "{stage}");
        }
        assert!(!s(|s| s.stage = Some("sink".into())));
    }

    #[test]
    fn topics_resolve_by_alias_full_name_or_without_prefix() {
        let t = Topics::with_prefix("p.");
        assert_eq!(resolve_topic(&t, "hot"), "p.vitals.health.hot");
        assert_eq!(resolve_topic(&t, "vitals.domain.changes"), "p.vitals.domain.changes");
        assert_eq!(resolve_topic(&t, "p.vitals.health.cold"), "p.vitals.health.cold");
        assert_eq!(resolve_topic(&t, "elsewhere"), "elsewhere");
    }

    #[test]
    fn only_input_lanes_with_a_key_are_replayable() {
        let t = Topics::with_prefix("p.").with_projections([&vitals_schemas::records::descriptors::ROLLUP_DAY]);
        let e = |d: DeadLetter| Entry { partition: 0, offset: 0, timestamp_ms: None, dead: d, headers: vec![], broken: None };
        assert!(replayable(&t, &e(dl(&t.hot, 0, 0, "processor:x", "c"))).is_ok());
        assert!(replayable(&t, &e(dl(&t.rollup_day, 0, 0, "sink:x", "c"))).unwrap_err().contains("a projection topic"));
        assert!(replayable(&t, &e(dl("q.vitals.health.hot", 0, 0, "processor:x", "c"))).is_err());
        assert!(replayable(&t, &e(DeadLetter { key: None, ..dl(&t.hot, 0, 0, "processor:x", "c") })).is_err());
    }

    #[test]
    fn printable_escapes_control_characters() {
        assert_eq!(printable(b"a\x00b\x1b[31m"), "a\\u{0}b\\u{1b}[31m");
        assert_eq!(truncated("abcdef", 4), "abc…");
    }
}
