//! The runtime that runs a [`Processor`] on Kafka with exactly-once effects, without broker
//! transactions (see `docs/processors.md` for the argument).
//!
//! One task per input partition `p` (every keyed-by-user topic is co-partitioned, and the range
//! assignor hands a consumer the same `p` of every input topic), each with a local [`Store`]. An
//! interval is: read a batch, run the processor over it against an [`Overlay`], produce the
//! outputs (idempotent producer, `acks=all`) stamped with version `(epoch, seq)` and the source
//! offsets, wait for every ack, then commit state + next input offsets + output position in one
//! local transaction. A crash anywhere before that commit replays the interval from the previous
//! checkpoint and re-emits the same values with a higher version; consumers keep the newest
//! version per key, so the effect is exactly once. The epoch comes from PostgreSQL and is bumped
//! whenever a task takes a partition, so a previous owner's late writes always lose.
//!
//! With [`Snapshots`], each task's store is also exported to an S3-compatible store now and then
//! (after a commit), and a task that gets a partition without a local store rebuilds it from the
//! newest snapshot and replays the input from the snapshot's offsets ([`snapshot`]).

pub mod metrics;
pub mod s3;
pub mod snapshot;
pub mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::PgPool;
use tracing::{info, warn};
use vitals_schemas::codec::{Codec, CodecError};
use vitals_schemas::topics::Topics;
use vitals_schemas::{ChangeBatch, DeadLetter, DomainChangeBatch, RollupDay, SampleBatch, SessionImpact, SourceOffset};

pub use self::snapshot::Snapshots;
use self::store::{Checkpoint, Overlay, Store, UserState};
use crate::{Emitter, Input, Inputs, Invalid, Processor, State};

/// What the runtime needs of an output record: a version stamp, the source offsets, and how to
/// write a retraction of a key.
pub trait Versioned: Sized {
    fn stamp(&mut self, epoch: i64, seq: i64, offsets: Vec<SourceOffset>);
    /// A retraction of `key`, an output key of `user` (`deleted = true`). The user is given, not
    /// parsed from the key, so user ids may contain any character.
    fn tombstone(user: &str, key: &str) -> Self;
}

impl Versioned for RollupDay {
    fn stamp(&mut self, epoch: i64, seq: i64, offsets: Vec<SourceOffset>) {
        self.version_epoch = epoch;
        self.version_seq = seq;
        self.source_offsets = offsets;
    }
    fn tombstone(user: &str, key: &str) -> RollupDay {
        // `<user>|<metric>|<date>`: neither metric nor date contains `|`.
        let rest = key.strip_prefix(user).and_then(|k| k.strip_prefix('|')).unwrap_or(key);
        let (metric, date) = rest.rsplit_once('|').unwrap_or((rest, ""));
        RollupDay { deleted: true, ..crate::rollup_day::blank_row(user, metric, date) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("schema registry: {0}")]
    Registry(String),
    #[error("local store: {0}")]
    Store(#[from] store::StoreError),
    #[error("epoch store: {0}")]
    Epoch(#[from] sqlx::Error),
    #[error("output not acknowledged: {0}")]
    NotAcknowledged(String),
    #[error("encoding an output failed: {0}")]
    Encode(String),
}

/// Settings of one processor's runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub processor: &'static str,
    /// What it reads.
    pub inputs: Inputs,
    pub output_topic: String,
    pub topics: Topics,
    /// Where task stores live (`<data_dir>/<processor>/p<partition>.redb`).
    pub data_dir: PathBuf,
    pub max_batch: usize,
    pub max_wait: Duration,
    /// Test hook: abort the process right after this many intervals' outputs were acknowledged,
    /// before their checkpoint is committed (the worst moment to crash).
    pub crash_after_produce: Option<u64>,
    /// `false` only for the benchmark's baseline: plain at-least-once — outputs are produced
    /// without waiting for acks and nothing is checkpointed (state lives in memory).
    pub checkpointing: bool,
}

struct Task {
    store: Store,
    cp: Checkpoint,
    epoch: Option<i64>,
    /// Without checkpointing: the state, in memory only.
    unsaved: Overlay,
    /// When the task last took a snapshot (`None`: one is due), and of which checkpoint.
    snapshot_at: Option<Instant>,
    snapshot_of: Option<Checkpoint>,
    /// A snapshot of this task is being uploaded.
    snapshot_busy: Arc<AtomicBool>,
}

impl Task {
    fn new(store: Store, cp: Checkpoint, epoch: Option<i64>) -> Task {
        Task { store, cp, epoch, unsaved: Overlay::default(), snapshot_at: None, snapshot_of: None, snapshot_busy: Arc::default() }
    }
}

#[derive(Default)]
struct Shared {
    tasks: BTreeMap<i32, Task>,
    /// A store that could not be opened: the process must stop.
    fatal: Option<String>,
}

/// Consumer context: on assignment, opens each partition's store and starts reading every
/// input topic at the checkpointed offsets (the beginning when there is none). A partition with
/// no local store is first restored from its snapshot, when there is one.
struct RebalanceContext {
    shared: Arc<Mutex<Shared>>,
    dir: PathBuf,
    /// The task line's name: the processor within its topic namespace ([`task_name`]).
    processor: String,
    rt: tokio::runtime::Handle,
    pool: PgPool,
    snapshots: Option<Arc<Snapshots>>,
}

impl RebalanceContext {
    /// The task of partition `p`, which has no store at `path`: with snapshots, the epoch is
    /// bumped *first* (so no previous owner can publish a snapshot after the pointer is read
    /// below), then the published snapshot, if any, becomes the local store. Without one, the
    /// task starts empty and replays from the beginning; so it does when the restore fails,
    /// after withdrawing the snapshot it did not start from.
    fn restore(&self, snapshots: &Snapshots, p: i32, epoch: i64, path: &std::path::Path) -> Result<Task, String> {
        match self.rt.block_on(snapshots.restore(&self.processor, p, epoch, path)) {
            Ok(Some(r)) => {
                let mut task = Task::new(r.store, r.cp, Some(epoch));
                task.snapshot_at = Some(Instant::now());
                task.snapshot_of = Some(task.cp.clone());
                return Ok(task);
            }
            Ok(None) => info!(partition = p, "no local state and no snapshot: replaying from the beginning"),
            Err(e) => {
                snapshots.metrics.restore_failures.fetch_add(1, Ordering::Relaxed);
                warn!(partition = p, error = %e, "restore from snapshot failed: replaying from the beginning");
                self.rt
                    .block_on(snapshot::withdraw(&self.pool, &self.processor, p, epoch))
                    .map_err(|e| format!("withdrawing the snapshot of partition {p} after a failed restore: {e}"))?;
            }
        }
        let store = Store::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        let cp = store.checkpoint().map_err(|e| format!("reading {}: {e}", path.display()))?;
        Ok(Task::new(store, cp, Some(epoch)))
    }

    /// Takes partition `p`: bumps its epoch, then decides what the task starts from.
    ///
    /// A local store is trusted only if this instance was the partition's last owner: the store
    /// records the epoch it was last owned under, and that must be the epoch just before ours.
    /// Otherwise another owner ran in between and may have emitted values computed from less
    /// input than this store holds, with a newer epoch than this store's outputs; resuming from
    /// the store would never re-emit the keys it does not touch again, and those stale values
    /// would win. Such a store is discarded and the task restores (snapshot, or replay from the
    /// beginning), which re-emits every key past its starting point.
    fn take(&self, p: i32, path: &std::path::Path) -> Result<Task, String> {
        let epoch = self.rt.block_on(bump_epoch(&self.pool, &self.processor, p)).map_err(|e| format!("bumping the epoch of partition {p}: {e}"))?;
        info!(partition = p, epoch, "task epoch");
        if path.exists() {
            let store = Store::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
            let owned = store.owner_epoch().map_err(|e| format!("reading {}: {e}", path.display()))?;
            if owned == Some(epoch - 1) {
                store.set_owner_epoch(epoch).map_err(|e| format!("writing {}: {e}", path.display()))?;
                let cp = store.checkpoint().map_err(|e| format!("reading {}: {e}", path.display()))?;
                // It does not start from the published snapshot: withdraw that (a snapshot of
                // the local store replaces it at the first occasion).
                if self.snapshots.is_some() && self.rt.block_on(snapshot::withdraw(&self.pool, &self.processor, p, epoch)).map_err(|e| e.to_string())? {
                    info!(partition = p, "snapshot withdrawn: resuming from the local store");
                }
                return Ok(Task::new(store, cp, Some(epoch)));
            }
            warn!(partition = p, store_epoch = ?owned, epoch, "local store is stale (another owner ran since): discarding it");
            drop(store);
            std::fs::remove_file(path).map_err(|e| format!("removing stale {}: {e}", path.display()))?;
        }
        let task = match &self.snapshots {
            Some(snapshots) => self.restore(snapshots, p, epoch, path)?,
            None => {
                info!(partition = p, "no local state: replaying from the beginning");
                let store = Store::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
                let cp = store.checkpoint().map_err(|e| format!("reading {}: {e}", path.display()))?;
                Task::new(store, cp, Some(epoch))
            }
        };
        task.store.set_owner_epoch(epoch).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(task)
    }
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut start = TopicPartitionList::new();
                for el in tpl.elements() {
                    let p = el.partition();
                    let task = match sh.tasks.entry(p) {
                        std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::btree_map::Entry::Vacant(v) => {
                            let path = self.dir.join(format!("p{p}.redb"));
                            match self.take(p, &path) {
                                Ok(task) => v.insert(task),
                                Err(e) => {
                                    sh.fatal = Some(e);
                                    continue;
                                }
                            }
                        }
                    };
                    let off = task.cp.offsets.get(el.topic()).copied();
                    let _ = start.add_partition_offset(el.topic(), p, off.map(Offset::Offset).unwrap_or(Offset::Beginning));
                }
                info!(partitions = ?sh.tasks.keys().collect::<Vec<_>>(), "assigned");
                if let Err(e) = consumer.assign(&start) {
                    sh.fatal = Some(format!("assign: {e}"));
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                for el in tpl.elements() {
                    sh.tasks.remove(&el.partition());
                }
                info!("partitions revoked");
                let _ = consumer.unassign();
            }
            other => warn!(?other, "rebalance error"),
        }
    }
}

/// The name a task line goes by in PostgreSQL (epochs, snapshot pointers): the processor within
/// its topic namespace, so deployments (or tests, or demo runs) with different topic prefixes
/// sharing one database never share epochs or snapshots. With no prefix: the processor's name.
pub fn task_name(cfg: &RuntimeConfig) -> String {
    format!("{}{}", cfg.topics.prefix, cfg.processor)
}

/// Bumps and returns the epoch of (processor, partition).
pub async fn bump_epoch(pool: &PgPool, processor: &str, partition: i32) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO processor_epochs (processor, partition, epoch) VALUES ($1, $2, 1)
         ON CONFLICT (processor, partition) DO UPDATE SET epoch = processor_epochs.epoch + 1, updated_at = now()
         RETURNING epoch",
    )
    .bind(processor)
    .bind(partition)
    .fetch_one(pool)
    .await
}

/// Everything the runtime is handed by the composition root.
pub struct RunArgs {
    pub cfg: RuntimeConfig,
    pub consumer_config: ClientConfig,
    pub producer: FutureProducer,
    pub codec: Arc<Codec>,
    pub pool: PgPool,
    /// Set to stop after the current interval.
    pub stop: Arc<AtomicBool>,
    /// Counters an operator reads (and the benchmark waits on).
    pub metrics: Arc<metrics::RuntimeMetrics>,
    /// Snapshots to S3 and restore from them; `None`: local stores only (a task without one
    /// replays its partition from the beginning).
    pub snapshots: Option<Arc<Snapshots>>,
}

/// Runs `processor` until `stop` is set or an error needs a restart. Blocking: call it from a
/// dedicated thread (`spawn_blocking`); it uses the current tokio runtime for async I/O.
pub fn run<P>(mut processor: P, args: RunArgs) -> Result<(), RuntimeError>
where
    P: Processor,
    P::Output: Versioned + Serialize + Clone,
{
    let RunArgs { cfg, consumer_config, producer, codec, pool, stop, metrics, snapshots } = args;
    let rt = tokio::runtime::Handle::current();
    let shared = Arc::new(Mutex::new(Shared::default()));
    // Snapshots only exist of checkpoints.
    let snapshots = snapshots.filter(|_| cfg.checkpointing);
    let task = task_name(&cfg);
    let ctx = RebalanceContext {
        shared: Arc::clone(&shared),
        dir: cfg.data_dir.join(cfg.processor),
        processor: task.clone(),
        rt: rt.clone(),
        pool: pool.clone(),
        snapshots: snapshots.clone(),
    };
    let consumer: BaseConsumer<RebalanceContext> = consumer_config.create_with_context(ctx)?;
    let t = &cfg.topics;
    let input_topics = cfg.inputs.topics(t);
    consumer.subscribe(&input_topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    info!(processor = cfg.processor, "processor started");
    let mut produced = 0u64;
    let mut lag_measured = Instant::now() - LAG_EVERY;
    while !stop.load(Ordering::Relaxed) {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let deadline = Instant::now() + cfg.max_wait;
        while batch.len() < cfg.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match consumer.poll(left) {
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(e)) => warn!(error = %e, "consumer error"),
                None => break,
            }
        }
        let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = sh.fatal.take() {
            return Err(RuntimeError::Store(store::StoreError::from_message(f)));
        }
        let mut by_partition: BTreeMap<i32, Vec<OwnedMessage>> = BTreeMap::new();
        for m in batch {
            by_partition.entry(m.partition()).or_default().push(m);
        }
        for (p, msgs) in by_partition {
            let Some(task) = sh.tasks.get_mut(&p) else { continue };
            let n = msgs.len() as u64;
            interval(&mut processor, &cfg, &rt, &codec, &producer, p, task, msgs, &mut produced, &metrics)?;
            metrics.add(&metrics.records_in, n);
        }
        if lag_measured.elapsed() >= LAG_EVERY {
            lag_measured = Instant::now();
            let mut lag = BTreeMap::new();
            for (p, task) in sh.tasks.iter() {
                for topic in &input_topics {
                    if let Ok((_, high)) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(1)) {
                        lag.insert((topic.clone(), *p), (high - task.cp.offsets.get(topic).copied().unwrap_or(0)).max(0));
                    }
                }
            }
            *metrics.lag.lock().unwrap_or_else(|e| e.into_inner()) = lag;
        }
        if let Some(s) = &snapshots {
            for (p, t) in sh.tasks.iter_mut() {
                maybe_snapshot(s, &task, &rt, *p, t);
            }
        }
    }
    Ok(())
}

/// Lane order within an interval: HOT first, so a COLD backfill never delays recent data.
fn lane_rank(t: &Topics, topic: &str) -> u8 {
    if topic == t.hot || topic == t.session_impact {
        0
    } else if topic == t.domain {
        1
    } else if topic == t.change {
        2
    } else {
        3
    }
}

pub use vitals_schemas::topics::PROGRESS_HEADER;
/// The key suffix of progress markers (`<user>|~progress`).
pub const PROGRESS_KEY: &str = "~progress";

fn is_progress(m: &OwnedMessage) -> bool {
    use rdkafka::message::Headers;
    m.headers().is_some_and(|h| h.iter().any(|h| h.key == PROGRESS_HEADER))
}

/// How often the lag of the owned partitions is measured (a watermark request per input topic
/// and partition).
const LAG_EVERY: Duration = Duration::from_secs(10);

/// A processor that re-arms a due timer in its own `on_timer` would otherwise spin forever.
const MAX_TIMERS_PER_RECORD: usize = 100_000;

/// One record's (or timer's) outputs, with the user they belong to.
struct Collect<'u, T> {
    user: &'u str,
    out: BTreeMap<String, (String, Option<T>)>,
}

impl<T> Emitter<T> for Collect<'_, T> {
    fn upsert(&mut self, key: String, value: T) {
        self.out.insert(key, (self.user.to_owned(), Some(value)));
    }
    fn retract(&mut self, key: String) {
        self.out.insert(key, (self.user.to_owned(), None));
    }
}

async fn decode(codec: &Codec, t: &Topics, m: &OwnedMessage) -> Result<Input, CodecError> {
    let payload = m.payload().ok_or_else(|| CodecError::Undecodable("empty payload".into()))?;
    let topic = m.topic();
    Ok(if topic == t.hot || topic == t.cold {
        Input::Samples(codec.decode::<SampleBatch>(payload).await?)
    } else if topic == t.change {
        Input::Changes(codec.decode::<ChangeBatch>(payload).await?)
    } else if topic == t.session_impact {
        Input::SessionImpact(codec.decode::<SessionImpact>(payload).await?)
    } else {
        Input::Domain(codec.decode::<DomainChangeBatch>(payload).await?)
    })
}

#[allow(clippy::too_many_arguments)]
fn interval<P>(
    processor: &mut P,
    cfg: &RuntimeConfig,
    rt: &tokio::runtime::Handle,
    codec: &Codec,
    producer: &FutureProducer,
    p: i32,
    task: &mut Task,
    mut msgs: Vec<OwnedMessage>,
    produced: &mut u64,
    metrics: &metrics::RuntimeMetrics,
) -> Result<(), RuntimeError>
where
    P: Processor,
    P::Output: Versioned + Serialize + Clone,
{
    let t = &cfg.topics;
    msgs.sort_by_key(|m| (lane_rank(t, m.topic()), m.offset()));
    let mut cp = task.cp.clone();
    let mut overlay = if cfg.checkpointing { Overlay::default() } else { std::mem::take(&mut task.unsaved) };
    let mut outputs: BTreeMap<String, (String, Option<P::Output>)> = BTreeMap::new();
    // Users with input in this interval: each gets a progress marker after its outputs.
    let mut users: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let mut dead: Vec<(DeadLetter, String)> = Vec::new();
    for m in &msgs {
        let next = cp.offsets.get(m.topic()).copied().unwrap_or(0);
        if m.offset() < next {
            continue; // already in the checkpoint
        }
        if let Some(ts) = m.timestamp().to_millis() {
            cp.stream_time_ms = cp.stream_time_ms.max(ts);
        }
        let mut reject = |code: &str, reason: String| {
            let dl = DeadLetter {
                source_topic: m.topic().to_owned(),
                source_partition: p,
                source_offset: m.offset(),
                stage: format!("processor:{}", cfg.processor),
                code: code.to_owned(),
                reason: reason.clone(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
            };
            dead.push((dl, reason));
            metrics.add(&metrics.dead_lettered, 1);
        };
        // The record's trace context (the edge writes `traceparent` into every record) continues
        // in this span, so a record's processing joins the upload's trace in the logs.
        let traceparent = m.headers().and_then(|h| h.iter().find(|h| h.key == "traceparent").and_then(|h| h.value)).map(String::from_utf8_lossy);
        let _span = tracing::debug_span!("record", topic = m.topic(), partition = p, offset = m.offset(), traceparent = traceparent.as_deref()).entered();
        let decoded = if is_progress(m) { None } else { Some(rt.block_on(decode(codec, t, m))) };
        match decoded {
            // An upstream processor's progress marker: not an input, only a position.
            None => {}
            Some(Err(CodecError::Unavailable(e))) => return Err(RuntimeError::Registry(e)),
            Some(Err(e)) => {
                if let Some(k) = m.key().filter(|_| cfg.inputs == Inputs::Lanes) {
                    users.insert(String::from_utf8_lossy(k).into_owned()); // lanes are keyed by user
                }
                reject("undecodable", e.to_string())
            }
            Some(Ok(input)) => {
                users.insert(input.user_id().to_owned());
                // A rejected record leaves no trace: its state writes and outputs are dropped.
                let mut collect = Collect { user: input.user_id(), out: BTreeMap::new() };
                let mut state = UserState::at(&task.store, &mut overlay, input.user_id(), cp.stream_time_ms);
                match processor.process(&input, &mut state, &mut collect) {
                    Ok(()) => outputs.extend(collect.out),
                    Err(Invalid { code, reason }) => {
                        state.rollback();
                        reject(code, reason);
                    }
                }
            }
        }
        cp.offsets.insert(m.topic().to_owned(), m.offset() + 1);
        // Timers that stream time has now reached fire, earliest first, before the next record.
        let mut fired = 0usize;
        while let Some((user, name)) = overlay.next_due_timer(&task.store, cp.stream_time_ms) {
            let mut state = UserState::at(&task.store, &mut overlay, &user, cp.stream_time_ms);
            state.cancel_timer(&name);
            let mut collect = Collect { user: &user, out: BTreeMap::new() };
            processor.on_timer(&user, &name, &mut state, &mut collect);
            outputs.extend(collect.out);
            fired += 1;
            metrics.add(&metrics.timers_fired, 1);
            if fired > MAX_TIMERS_PER_RECORD {
                warn!(partition = p, "more than {MAX_TIMERS_PER_RECORD} timers due at once; the rest fire after the next record");
                break;
            }
        }
    }
    let epoch = task.epoch.expect("epoch is set before a task processes");
    let offsets: Vec<SourceOffset> = cfg
        .inputs
        .topics(t)
        .into_iter()
        .map(|topic| {
            let next_offset = cp.offsets.get(&topic).copied().unwrap_or(0);
            SourceOffset { topic, partition: p, next_offset }
        })
        .collect();
    let mut records: Vec<(String, String, Vec<u8>, OwnedHeaders)> = Vec::new();
    for (key, (user, value)) in outputs {
        cp.seq += 1;
        let mut v = value.unwrap_or_else(|| P::Output::tombstone(&user, &key));
        v.stamp(epoch, cp.seq, offsets.clone());
        let bytes = rt.block_on(codec.encode(&cfg.output_topic, &v)).map_err(|e| match e {
            CodecError::Unavailable(m) => RuntimeError::Registry(m),
            other => RuntimeError::Encode(other.to_string()),
        })?;
        records.push((cfg.output_topic.clone(), key, bytes, OwnedHeaders::new()));
        metrics.add(&metrics.outputs, 1);
    }
    // Progress markers: "everything of this user up to `offsets` is processed, and its outputs
    // are before this record in the partition". Sinks turn them into the user's freshness; they
    // are tombstone-shaped records of a key no projection uses, marked by a header.
    for user in users {
        cp.seq += 1;
        let mut v = P::Output::tombstone(&user, &format!("{user}|{PROGRESS_KEY}"));
        v.stamp(epoch, cp.seq, offsets.clone());
        let bytes = rt.block_on(codec.encode(&cfg.output_topic, &v)).map_err(|e| match e {
            CodecError::Unavailable(m) => RuntimeError::Registry(m),
            other => RuntimeError::Encode(other.to_string()),
        })?;
        let headers = OwnedHeaders::new().insert(Header { key: PROGRESS_HEADER, value: Some("1") });
        records.push((cfg.output_topic.clone(), format!("{user}|{PROGRESS_KEY}"), bytes, headers));
        metrics.add(&metrics.progress_markers, 1);
    }
    for (dl, reason) in dead {
        warn!(topic = %dl.source_topic, partition = p, offset = dl.source_offset, code = %dl.code, "dead-lettered");
        let headers = OwnedHeaders::new()
            .insert(Header { key: "vitals-source-topic", value: Some(dl.source_topic.as_str()) })
            .insert(Header { key: "vitals-source-partition", value: Some(p.to_string().as_str()) })
            .insert(Header { key: "vitals-source-offset", value: Some(dl.source_offset.to_string().as_str()) })
            .insert(Header { key: "vitals-reason", value: Some(reason.as_str()) });
        let key = String::from_utf8_lossy(dl.key.as_deref().unwrap_or_default()).into_owned();
        let bytes = rt.block_on(codec.encode(&t.dead_letter, &dl)).map_err(|e| RuntimeError::Encode(e.to_string()))?;
        records.push((t.dead_letter.clone(), key, bytes, headers));
    }
    if !cfg.checkpointing {
        for (topic, key, bytes, headers) in &records {
            let rec = FutureRecord::to(topic).partition(p).key(key.as_str()).payload(bytes.as_slice()).headers(headers.clone());
            // Fire and forget (the delivery future is dropped): the at-least-once baseline. A full
            // queue is waited out; the producer's own thread drains it.
            let mut rec = rec;
            loop {
                match producer.send_result(rec) {
                    Ok(delivery) => {
                        drop(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => return Err(RuntimeError::NotAcknowledged(e.to_string())),
                }
            }
        }
        task.unsaved = overlay;
        task.cp = cp;
        return Ok(());
    }
    if !records.is_empty() {
        let waiting = Instant::now();
        let acks = rt.block_on(async {
            let futs = records.iter().map(|(topic, key, bytes, headers)| {
                producer.send(
                    FutureRecord::to(topic).partition(p).key(key.as_str()).payload(bytes.as_slice()).headers(headers.clone()),
                    Duration::from_secs(30),
                )
            });
            join_all(futs).await
        });
        for a in acks {
            a.map_err(|(e, _)| RuntimeError::NotAcknowledged(e.to_string()))?;
        }
        metrics.add(&metrics.ack_wait_micros, waiting.elapsed().as_micros() as u64);
        *produced += 1;
        if cfg.crash_after_produce.is_some_and(|n| *produced >= n) {
            warn!("crash_after_produce: aborting between produce and checkpoint");
            std::process::abort();
        }
    }
    // Only now, with every output acknowledged, does the interval become the checkpoint.
    let committing = Instant::now();
    task.store.commit(overlay, &cp)?;
    metrics.add(&metrics.commit_micros, committing.elapsed().as_micros() as u64);
    metrics.add(&metrics.commits, 1);
    task.cp = cp;
    Ok(())
}

/// Takes a snapshot of `task` if its last one is at least `every` old (or none was taken yet)
/// and its checkpoint moved since: the export is read now, between intervals (one read
/// transaction of the committed store, so it is exactly the checkpoint `task.cp`); the upload
/// and the pointer's publication run in the background. A failure is logged and counted;
/// processing never waits for or stops on it.
fn maybe_snapshot(s: &Arc<Snapshots>, processor: &str, rt: &tokio::runtime::Handle, p: i32, task: &mut Task) {
    let due = task.snapshot_at.is_none_or(|at| at.elapsed() >= s.every);
    if !due || task.cp == Checkpoint::default() || task.snapshot_of.as_ref() == Some(&task.cp) || task.snapshot_busy.load(Ordering::Acquire) {
        return;
    }
    let Some(epoch) = task.epoch else { return };
    task.snapshot_at = Some(Instant::now());
    let bytes = match task.store.export() {
        Ok(b) => b,
        Err(e) => {
            s.metrics.failed.fetch_add(1, Ordering::Relaxed);
            warn!(partition = p, error = %e, "snapshot export failed");
            return;
        }
    };
    task.snapshot_of = Some(task.cp.clone());
    task.snapshot_busy.store(true, Ordering::Release);
    let (s, cp, busy, processor) = (Arc::clone(s), task.cp.clone(), Arc::clone(&task.snapshot_busy), processor.to_owned());
    rt.spawn(async move {
        if let Err(e) = s.save(&processor, p, epoch, &cp, bytes).await {
            s.metrics.failed.fetch_add(1, Ordering::Relaxed);
            warn!(partition = p, error = %e, "snapshot failed; processing goes on");
        }
        busy.store(false, Ordering::Release);
    });
}

/// A consumer configuration for a processor group.
pub fn consumer_config(brokers: &str, group_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Range assignment hands a consumer the same partition number of every input topic.
        .set("partition.assignment.strategy", "range")
        // A small local prefetch queue: a HOT record that arrives behind a COLD backfill waits
        // for at most this much already-fetched data, not for the whole backlog.
        .set("queued.max.messages.kbytes", "2048")
        .set("fetch.max.bytes", "1048576")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        // Also the rebalance timeout a join announces: how long the coordinator may wait for a
        // member that does not rejoin (a killed process). librdkafka's 300 s default would stall a
        // restarted instance that long; no interval or restore here comes near 20 s.
        .set("max.poll.interval.ms", "20000")
        .set("log_level", "4");
    c
}

