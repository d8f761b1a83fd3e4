//! The runtime that runs a [`Processor`] on Kafka with exactly-once effects, without broker
//! transactions (see `docs/processors.md` for the argument).
//!
//! One task per input partition `p` (every keyed-by-user topic is co-partitioned, and the range
//! assignor hands a consumer the same `p` of every input topic), each with a local [`Store`]. An
//! interval is: read a batch, run the processor over it against an [`Overlay`], produce the
//! outputs (idempotent producer, `acks=all`) stamped with version `(epoch, seq)` and the source
//! offsets (rows, then one progress marker per user, vouching for that user's rows:
//! `vitals_schemas::vouch`), wait for every ack, then commit state + next input offsets + output position in one
//! local transaction. A crash anywhere before that commit replays the interval from the previous
//! checkpoint and re-emits the same values with a higher version; consumers keep the newest
//! version per key, so the effect is exactly once. The epoch comes from PostgreSQL and is bumped
//! whenever a task takes a partition, so a previous owner's late writes always lose.
//!
//! With [`Snapshots`], each task's store is also exported to an S3-compatible store now and then
//! (after a commit), and a task that gets a partition without a local store rebuilds it from the
//! newest snapshot and replays the input from the snapshot's offsets ([`snapshot`]).

pub mod metrics;
pub mod registry;
pub mod s3;
#[cfg(test)]
pub mod sim;
pub mod snapshot;
pub mod store;
#[cfg(test)]
mod takeovers;
pub mod task;

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
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::PgPool;
use tracing::{info, warn};
use vitals_schemas::codec::{Codec, CodecError};
use vitals_schemas::exposition::unix_now;
use vitals_schemas::topics::Topics;
use vitals_schemas::{ChangeBatch, DomainChangeBatch, SampleBatch, SessionImpact, SourceOffset};

pub use self::registry::{find, registry, Registered};
pub use self::snapshot::Snapshots;
use self::store::{Checkpoint, Store};
use self::task::{InBody, InRecord, Lanes, Out, Tail, Task};
use vitals_consumer::{poll_batch, Backoff, InformationalCommits};
use vitals_processors::{Input, Inputs, Processor, Versioned};

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
    #[error("partition {partition}: {source}")]
    Task { partition: i32, source: task::TaskError },
    #[error("the archive is unavailable: {0}")]
    Archive(String),
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
    /// Where a task that has read nothing yet starts, per (input topic, partition); any other
    /// starts at the beginning. A replay `--from` a time or an offsets file sets it; a task with
    /// a checkpoint (or a snapshot) always resumes from that.
    pub start: BTreeMap<(String, i32), i64>,
}

/// A task as the Kafka runtime runs it: the task itself and its snapshot bookkeeping.
struct Running {
    task: Task,
    /// When the task last took a snapshot (`None`: one is due), and of which checkpoint.
    snapshot_at: Option<Instant>,
    snapshot_of: Option<Checkpoint>,
    /// A snapshot of this task is being uploaded.
    snapshot_busy: Arc<AtomicBool>,
    /// The last upload or publication failed: the same checkpoint is snapshotted again when due
    /// (an idle task would otherwise keep a failed snapshot's age forever).
    snapshot_failed: Arc<AtomicBool>,
    /// The newest snapshot of this task known published (restored from, or uploaded by it): of
    /// which checkpoint, and when it was taken (Unix seconds); what the snapshot age is of.
    snapshot_published: Arc<Mutex<Option<(Checkpoint, f64)>>>,
    /// When this process took the task (Unix seconds).
    taken_at: f64,
    /// Another owner wrote to its output partition: the task must stop.
    fenced: bool,
    /// A dependency failed: the task's input is paused until then, and read again from the
    /// checkpoint (nothing of the failed interval was committed).
    paused_until: Option<Instant>,
    /// The next wait after a failure (doubling, reset by a committed interval).
    backoff: Backoff,
    /// Input topics whose lane starts past the task's next offset (records deleted by
    /// retention), with the lane's first offset: read from the archive up to it first, while
    /// the consumer's partition waits there, paused.
    from_archive: BTreeMap<String, i64>,
}

impl Running {
    fn new(task: Task) -> Running {
        Running {
            task,
            snapshot_at: None,
            snapshot_of: None,
            snapshot_busy: Arc::default(),
            snapshot_failed: Arc::default(),
            snapshot_published: Arc::default(),
            taken_at: unix_now(),
            fenced: false,
            paused_until: None,
            backoff: Backoff::new(PAUSE_FIRST, PAUSE_MAX),
            from_archive: BTreeMap::new(),
        }
    }

    /// Where the consumer reads `topic` of this task from: its checkpoint, or, while the task
    /// reads the archive, the lane's first record (where the archive hands over).
    fn consumer_offset(&self, topic: &str) -> Offset {
        match self.from_archive.get(topic) {
            Some(low) => Offset::Offset(*low),
            None => self.task.start_offset(topic),
        }
    }
}

/// Seeks the consumer's partitions of task `p` back to where the task reads them (after a pause,
/// a retake or the archive's handover) and resumes them; while the task still reads the archive
/// every lane of it stays paused, so that no lane races ahead of the archived records of the
/// others (stream time and timers see them roughly in step, as a consumer would deliver them).
fn reposition<C: ConsumerContext>(consumer: &BaseConsumer<C>, input_topics: &[String], p: i32, r: &Running) {
    for topic in input_topics {
        if let Err(e) = consumer.seek(topic, p, r.consumer_offset(topic), Duration::from_secs(5)) {
            warn!(partition = p, %topic, error = %e, "seeking back to the checkpoint");
        }
    }
    if r.from_archive.is_empty() {
        if let Err(e) = consumer.resume(&task_partitions(input_topics, p)) {
            warn!(partition = p, error = %e, "resuming the partition's fetch");
        }
    }
}

/// How often the checkpointed offsets are committed to the group (informational only).
pub use vitals_consumer::COMMIT_EVERY;
/// The first and the longest wait of a task paused on a failed dependency.
const PAUSE_FIRST: Duration = Duration::from_millis(200);
const PAUSE_MAX: Duration = Duration::from_secs(10);

impl RuntimeError {
    /// A failure of a dependency, not of the input: the interval is put back and retried.
    fn is_dependency(&self) -> bool {
        matches!(self, RuntimeError::Registry(_) | RuntimeError::Archive(_))
    }
}

/// The input partitions of task `p`.
fn task_partitions(input_topics: &[String], p: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for t in input_topics {
        tpl.add_partition(t, p);
    }
    tpl
}

#[derive(Default)]
struct Shared {
    tasks: BTreeMap<i32, Running>,
    /// A store that could not be opened: the process must stop.
    fatal: Option<String>,
    /// Bumped by every rebalance: records polled before one may belong to a task that is gone.
    generation: u64,
}

/// The headers every output record carries, so that the owner of the partition (and its
/// successors) can read the output partition without decoding a single record.
pub const EPOCH_HEADER: &str = "vitals-epoch";
pub const SOURCE_HEADER: &str = "vitals-source";
pub const OWNER_HEADER: &str = "vitals-owner";

/// `topic=next_offset,…` (Kafka topic names contain neither `=` nor `,`).
fn source_header(source: &[SourceOffset]) -> String {
    source.iter().map(|o| format!("{}={}", o.topic, o.next_offset)).collect::<Vec<_>>().join(",")
}

/// What the task needs of a record of its output partition, from its headers; `None` for a
/// record without them (not written by this runtime).
fn seen_of<M: Message>(m: &M) -> Option<task::Seen> {
    let h = |k: &str| m.headers()?.iter().find(|h| h.key == k)?.value.map(|v| String::from_utf8_lossy(v).into_owned());
    let epoch = h(EPOCH_HEADER)?.parse().ok()?;
    let user = h(USER_HEADER)?;
    let source = h(SOURCE_HEADER)?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|kv| kv.rsplit_once('=').and_then(|(t, o)| Some((t.to_owned(), o.parse().ok()?))))
        .collect::<Option<BTreeMap<String, i64>>>()?;
    let owner = h(OWNER_HEADER).and_then(|o| o.parse().ok()).unwrap_or(0);
    let key = String::from_utf8_lossy(m.key()?).into_owned();
    Some(task::Seen { offset: m.offset(), key, user, epoch, owner, source, marker: h(PROGRESS_HEADER).is_some() })
}

/// Consumer context: on assignment, takes each partition (epoch, store, the tail of its output
/// partition) and starts reading every input topic at the checkpointed offsets.
struct RebalanceContext {
    shared: Arc<Mutex<Shared>>,
    dir: PathBuf,
    /// The task line's name: the processor within its topic namespace ([`task_name`]).
    processor: String,
    rt: tokio::runtime::Handle,
    pool: PgPool,
    snapshots: Option<Arc<Snapshots>>,
    /// For reading the output partition at takeover.
    tail_config: ClientConfig,
    /// A connected client of the output topic, for its watermarks (no new connection per take).
    watermarks: BaseConsumer,
    output_topic: String,
    checkpointing: bool,
    /// The layout of the processor's state this build reads ([`vitals_processors::Processor::STATE_FORMAT`]).
    state_format: i64,
    /// [`RuntimeConfig::start`].
    start: BTreeMap<(String, i32), i64>,
    metrics: Arc<metrics::RuntimeMetrics>,
}

/// Refuses a store that holds state of another layout than `want` (a build that laid its state
/// out differently wrote it); a store with nothing read yet takes `want`.
fn adopt_state_format(store: &Store, want: i64) -> Result<(), String> {
    let format = store.state_format().map_err(|e| e.to_string())?;
    let fresh = store.checkpoint().map_err(|e| e.to_string())?.offsets.is_empty();
    if format != want && !fresh {
        return Err(format!(
            "the state is of format {format}, this build reads format {want}: stop every instance of the processor, delete its local stores and snapshots, and replay from the beginning of the input"
        ));
    }
    store.set_state_format(want).map_err(|e| e.to_string())
}

/// How long a takeover may take to read its output partition up to its end.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);

impl RebalanceContext {
    /// The store of partition `p`, which has none at `path`: with snapshots, the published one,
    /// if any (the epoch was bumped before, so no previous owner can publish after the pointer
    /// is read). Without one, the task starts empty and replays from the beginning; so it does
    /// when the restore fails, after withdrawing the snapshot it did not start from.
    fn restore(&self, p: i32, epoch: i64, path: &std::path::Path) -> Result<(Store, bool), String> {
        if let Some(snapshots) = &self.snapshots {
            match self.rt.block_on(snapshots.restore(&self.processor, p, epoch, path)) {
                Ok(Some(r)) => return Ok((r.store, true)),
                Ok(None) => info!(partition = p, "no local state and no snapshot: replaying from the beginning"),
                Err(e) => {
                    snapshots.metrics.restore_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(partition = p, error = %e, "restore from snapshot failed: replaying from the beginning");
                }
            }
        } else {
            info!(partition = p, "no local state: replaying from the beginning");
        }
        self.withdraw(p, epoch)?;
        Ok((Store::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?, false))
    }

    /// Withdraws the published snapshot of `p`, which this owner does not start from. Every
    /// instance does this, snapshots enabled or not: the snapshot argument needs every owner
    /// newer than the published snapshot to have started from it.
    fn withdraw(&self, p: i32, epoch: i64) -> Result<(), String> {
        let withdrawn = self
            .rt
            .block_on(snapshot::withdraw(&self.pool, &self.processor, p, epoch))
            .map_err(|e| format!("withdrawing the snapshot of partition {p}: {e}"))?;
        if withdrawn {
            info!(partition = p, "snapshot withdrawn: this owner does not start from it");
        }
        Ok(())
    }

    /// Takes partition `p`: bumps its epoch, decides what the task starts from, then reads its
    /// output partition from the checkpoint's tail position to the end (every key written there
    /// since is answered once the input has caught up), and raises the epoch above every epoch
    /// found there, so a lost `processor_epochs` cannot make new versions lose.
    ///
    /// A local store is trusted only if this instance was the partition's last owner: the store
    /// records the epoch it was last owned under, and that must be the epoch just before ours.
    /// Otherwise another owner ran in between; the store is discarded and the task restores
    /// (snapshot, or replay from the beginning).
    fn take(&self, p: i32, path: &std::path::Path) -> Result<Running, String> {
        let mut epoch = self
            .rt
            .block_on(bump_epoch(&self.pool, &self.processor, p, 0))
            .map_err(|e| format!("bumping the epoch of partition {p}: {e}"))?;
        let mut store = None;
        let mut restored = false;
        snapshot::remove_leftovers(path);
        if path.exists() {
            let s = Store::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
            let owned = s.owner_epoch().map_err(|e| format!("reading {}: {e}", path.display()))?;
            if owned == Some(epoch - 1) {
                self.withdraw(p, epoch)?;
                store = Some(s);
            } else {
                warn!(partition = p, store_epoch = ?owned, epoch, "local store is stale (another owner ran since): discarding it");
                drop(s);
                std::fs::remove_file(path).map_err(|e| format!("removing stale {}: {e}", path.display()))?;
            }
        }
        let store = match store {
            Some(s) => s,
            None => {
                let (s, r) = self.restore(p, epoch, path)?;
                restored = r;
                s
            }
        };
        // A store (or snapshot) of another state layout is refused, never read as "nothing held".
        adopt_state_format(&store, self.state_format)
            .map_err(|e| format!("partition {p} of {} ({}): {e}", self.processor, path.display()))?;
        let mut task = Task::new(store, p, epoch, Task::new_owner_id()).map_err(|e| format!("reading {}: {e}", path.display()))?;
        // A task that has read nothing starts where it was told to (committed with its first
        // checkpoint; until then every restart starts there again).
        if task.cp.offsets.is_empty() {
            task.cp.offsets.extend(self.start.iter().filter(|((_, q), _)| *q == p).map(|((t, _), o)| (t.clone(), *o)));
        }
        if !self.checkpointing {
            task = task.in_memory();
        }
        let t0 = Instant::now();
        let (tail, read) = self.catch_up(p, task.tail.clone())?;
        if tail.max_epoch >= epoch {
            warn!(
                partition = p,
                epoch,
                greatest_in_output = tail.max_epoch,
                "the output partition holds newer epochs than processor_epochs: raising the epoch above them"
            );
            epoch = self
                .rt
                .block_on(bump_epoch(&self.pool, &self.processor, p, tail.max_epoch + 1))
                .map_err(|e| format!("raising the epoch of partition {p}: {e}"))?;
            self.withdraw(p, epoch)?;
        }
        task.epoch = epoch;
        task.tail = tail;
        task.store.set_owner_epoch(epoch).map_err(|e| format!("writing {}: {e}", path.display()))?;
        info!(partition = p, epoch, from = ?task.cp.offsets, output_read = read, pending = task.tail.pending(), ms = t0.elapsed().as_millis() as u64, "task taken");
        self.metrics.taken.lock().unwrap_or_else(|e| e.into_inner()).extend(task.cp.offsets.iter().map(|(t, o)| ((t.clone(), p), *o)));
        let mut r = Running::new(task);
        if restored {
            r.snapshot_at = Some(Instant::now());
            r.snapshot_of = Some(r.task.cp.clone());
            *r.snapshot_published.lock().unwrap_or_else(|e| e.into_inner()) = Some((r.task.cp.clone(), unix_now()));
        }
        Ok(r)
    }

    /// Reads the output partition `p` from `tail.next` to its current end, as the task
    /// (`epoch`, `owner`): every record another owner wrote under an earlier epoch becomes
    /// pending; one of a newer epoch (or another owner of this one) fences the task. At
    /// takeover the epoch is not decided yet: read as (`i64::MAX`, 0), nothing fences. Returns
    /// the tail and how many records were read.
    fn catch_up(&self, p: i32, tail: Tail) -> Result<(Tail, u64), String> {
        self.read_output(p, tail, i64::MAX, 0).map_err(|e| e.to_string())
    }

    fn read_output(&self, p: i32, mut tail: Tail, epoch: i64, owner: u64) -> Result<(Tail, u64), TailError> {
        let err = |e: KafkaError| TailError::Read(format!("reading the output partition {} [{p}]: {e}", self.output_topic));
        let (low, high) = self.watermarks.fetch_watermarks(&self.output_topic, p, Duration::from_secs(10)).map_err(err)?;
        if tail.next < low {
            warn!(
                partition = p,
                from = tail.next,
                low,
                "the output partition starts later than the checkpoint's tail (deleted records): reading from its start"
            );
            tail.next = low;
        }
        if tail.next >= high {
            return Ok((tail, 0));
        }
        let consumer: BaseConsumer = self.tail_config.create().map_err(err)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.output_topic, p, Offset::Offset(tail.next)).map_err(err)?;
        consumer.assign(&tpl).map_err(err)?;
        let deadline = Instant::now() + CATCH_UP_LIMIT;
        let mut read = 0u64;
        let mut foreign = 0u64;
        while tail.next < high {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TailError::Read(format!(
                    "reading the output partition {} [{p}] up to {high} took over {CATCH_UP_LIMIT:?} (at {})",
                    self.output_topic, tail.next
                )));
            }
            match consumer.poll(left.min(Duration::from_millis(500))) {
                Some(Ok(m)) => {
                    read += 1;
                    match seen_of(&m) {
                        Some(s) => tail.read(&s, epoch, owner).map_err(TailError::Fenced)?,
                        None => {
                            foreign += 1;
                            tail.next = m.offset() + 1;
                        }
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => warn!(partition = p, error = %e, "reading the output partition"),
                None => {}
            }
        }
        if foreign > 0 {
            warn!(partition = p, records = foreign, "output records without vitals headers (not written by this runtime): not answered");
        }
        Ok((tail, read))
    }
}

/// Why reading the output partition stopped.
#[derive(Debug, thiserror::Error)]
enum TailError {
    #[error("{0}")]
    Read(String),
    #[error(transparent)]
    Fenced(task::Fenced),
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        sh.generation += 1;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut start = TopicPartitionList::new();
                // Partitions of tasks reading the archive first: paused until it has handed over.
                let (mut waiting, mut fetching) = (TopicPartitionList::new(), TopicPartitionList::new());
                for el in tpl.elements() {
                    let p = el.partition();
                    // A takeover failed (its dependency, PostgreSQL, is down?): the process stops;
                    // trying the next one (or the same partition again for its next input topic)
                    // would only keep the consumer in this callback, one timeout each.
                    if sh.fatal.is_some() {
                        continue;
                    }
                    let running = match sh.tasks.entry(p) {
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
                    let _ = start.add_partition_offset(el.topic(), p, running.consumer_offset(el.topic()));
                    if running.from_archive.is_empty() {
                        let _ = fetching.add_partition(el.topic(), p);
                    } else {
                        let _ = waiting.add_partition(el.topic(), p);
                    }
                }
                info!(partitions = ?sh.tasks.keys().collect::<Vec<_>>(), "assigned");
                if let Err(e) = consumer.assign(&start) {
                    sh.fatal = Some(format!("assign: {e}"));
                } else {
                    // A partition paused by the application stays paused across a revoke and a
                    // new assignment (librdkafka clears only its own pauses), while the task that
                    // paused it (a dependency's backoff, the archive) is gone: resumed here.
                    if let Err(e) = consumer.resume(&fetching) {
                        warn!(error = %e, "resuming the assigned partitions");
                    }
                    if waiting.count() > 0 {
                        if let Err(e) = consumer.pause(&waiting) {
                            sh.fatal = Some(format!("pausing the partitions read from the archive: {e}"));
                        }
                    }
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

/// Bumps and returns the epoch of (processor, partition), to at least `floor`.
pub async fn bump_epoch(pool: &PgPool, processor: &str, partition: i32, floor: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO processor_epochs (processor, partition, epoch) VALUES ($1, $2, GREATEST(1, $3))
         ON CONFLICT (processor, partition) DO UPDATE SET epoch = GREATEST(processor_epochs.epoch + 1, $3), updated_at = now()
         RETURNING epoch",
    )
    .bind(processor)
    .bind(partition)
    .bind(floor)
    .fetch_one(pool)
    .await
}

/// The raw archive of the input lanes (`vitals archive`): where a task reads the records its
/// lane no longer holds (deleted by retention) before it reads the lane itself.
pub trait Archive: Send + Sync {
    /// Every offset `from..to` of `topic`/`partition`, in order, as its lane held it; a record
    /// whose user was erased as a record with [`ERASED_HEADER`] and nothing else.
    fn read(&self, topic: &str, partition: i32, from: i64, to: i64) -> Result<Vec<OwnedMessage>, ArchiveError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The store or its index is unreachable: retried, nothing skipped.
    #[error("the archive is unavailable: {0}")]
    Unavailable(String),
    /// The archive does not hold these offsets: the task cannot go on without a gap.
    #[error("{0}")]
    Missing(String),
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
    /// Where records deleted from a lane are read from; `None`: such a lane is refused as a gap.
    pub archive: Option<Arc<dyn Archive>>,
}

/// A consumer of the output partitions, without a group: for the catch-up read at takeover.
fn tail_config(consumer_config: &ClientConfig) -> ClientConfig {
    let mut c = consumer_config.clone();
    let group = c.get("group.id").unwrap_or("vitals").to_owned();
    c.set("group.id", format!("{group}.tail")).set("enable.partition.eof", "true").set("auto.offset.reset", "earliest");
    c
}

/// How long a fenced task's partition may stay assigned here without a rebalance before it is
/// taken again (a newer epoch): long enough for the group to move it if another member owns it.
const FENCED_GRACE: Duration = Duration::from_secs(15);

/// Runs `processor` until `stop` is set or an error needs a restart. Blocking: call it from a
/// dedicated thread (`spawn_blocking`); it uses the current tokio runtime for async I/O.
pub fn run<P>(mut processor: P, args: RunArgs) -> Result<(), RuntimeError>
where
    P: Processor,
    P::Output: Versioned + vitals_schemas::codec::AvroRecord + Serialize + DeserializeOwned + Clone,
{
    let RunArgs { cfg, consumer_config, producer, codec, pool, stop, metrics, snapshots, archive } = args;
    let lane_topics = if cfg.inputs == Inputs::Lanes { cfg.inputs.topics(&cfg.topics) } else { Vec::new() };
    let rt = tokio::runtime::Handle::current();
    let shared = Arc::new(Mutex::new(Shared::default()));
    // Snapshots only exist of checkpoints.
    let snapshots = snapshots.filter(|_| cfg.checkpointing);
    let name = task_name(&cfg);
    let tail_cfg = tail_config(&consumer_config);
    let ctx = RebalanceContext {
        shared: Arc::clone(&shared),
        dir: cfg.data_dir.join(cfg.processor),
        processor: name.clone(),
        rt: rt.clone(),
        pool: pool.clone(),
        snapshots: snapshots.clone(),
        tail_config: tail_cfg.clone(),
        watermarks: tail_cfg.create()?,
        output_topic: cfg.output_topic.clone(),
        checkpointing: cfg.checkpointing,
        state_format: P::STATE_FORMAT,
        start: cfg.start.clone(),
        metrics: Arc::clone(&metrics),
    };
    let consumer: BaseConsumer<RebalanceContext> = consumer_config.create_with_context(ctx)?;
    // The lanes' partition count, for the producer-contract check of every lane record.
    let partitions = match cfg.inputs {
        Inputs::Lanes => {
            let md = consumer.fetch_metadata(Some(&cfg.topics.hot), Duration::from_secs(30))?;
            md.topics().first().map(|t| t.partitions().len() as i32).filter(|n| *n > 0)
        }
        Inputs::SessionImpacts => None,
    };
    let lanes = Lanes { topics: cfg.topics.clone(), inputs: cfg.inputs, partitions };
    let t = &cfg.topics;
    let input_topics = cfg.inputs.topics(t);
    consumer.subscribe(&input_topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    info!(processor = cfg.processor, "processor started");
    // High watermarks of the owned partitions (inputs, for lag; the output, for the tail check),
    // fetched off the poll thread: each request is a broker round trip (~0.4 s measured on nisshi
    // under load), and asking them inline blocked processing for ~10 s of every 10 s of lag
    // measurement and ~2.5 s of every 2 s of tail checks.
    let highs: Arc<Mutex<BTreeMap<(String, i32), i64>>> = Arc::default();
    // And the inputs' low watermarks (the same requests): a lane that starts past its task
    // with nothing after it to read sends no record that would show the gap.
    let lows: Arc<Mutex<BTreeMap<(String, i32), i64>>> = Arc::default();
    // The thread ends with this function, however it returns.
    struct Ends(Arc<AtomicBool>);
    impl Drop for Ends {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let ended = Ends(Arc::new(AtomicBool::new(false)));
    let input_sweeps = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let (highs, lows, shared, stop, client) =
            (Arc::clone(&highs), Arc::clone(&lows), Arc::clone(&shared), Arc::clone(&stop), tail_cfg.create::<BaseConsumer>()?);
        let ended = Arc::clone(&ended.0);
        let stop_all = move || stop.load(Ordering::Relaxed) || ended.load(Ordering::Relaxed);
        let sweeps = Arc::clone(&input_sweeps);
        let inputs = input_topics.clone();
        let output = cfg.output_topic.clone();
        std::thread::Builder::new()
            .name("watermarks".into())
            .spawn(move || {
                // The output partitions' highs every sweep (the tail check reads them every
                // `TAIL_EVERY`); the inputs' only every `LAG_EVERY`, for the lag, which is measured
                // right after each such sweep: each request here is a storage read on the broker,
                // whose polling is what loads it most (docs/benchmarks.md), and the inputs' highs
                // every 0.5 s were 24 of the 30 requests of every sweep.
                let mut inputs_at: Option<Instant> = None;
                while !stop_all() {
                    let owned: Vec<i32> = shared.lock().unwrap_or_else(|p| p.into_inner()).tasks.keys().copied().collect();
                    // (A sweep with nothing owned yet does not count: the first partitions get
                    // their lag at once.)
                    let with_inputs = !owned.is_empty() && inputs_at.is_none_or(|at| at.elapsed() >= LAG_EVERY);
                    if with_inputs {
                        inputs_at = Some(Instant::now());
                    }
                    let mut topics = vec![output.clone()];
                    if with_inputs {
                        topics.extend(inputs.iter().cloned());
                    }
                    for p in owned {
                        for topic in &topics {
                            if let Ok((low, high)) = client.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                                highs.lock().unwrap_or_else(|e| e.into_inner()).insert((topic.clone(), p), high);
                                if topic != &output {
                                    lows.lock().unwrap_or_else(|e| e.into_inner()).insert((topic.clone(), p), low);
                                }
                            }
                        }
                    }
                    if with_inputs {
                        sweeps.fetch_add(1, Ordering::Relaxed);
                    }
                    // A bounded pause between sweeps, cut short by stop.
                    for _ in 0..10 {
                        if stop_all() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
            .map_err(|e| RuntimeError::Store(store::StoreError::from_message(format!("starting the watermarks thread: {e}"))))?;
    }
    let high = |topic: &str, p: i32| highs.lock().unwrap_or_else(|e| e.into_inner()).get(&(topic.to_owned(), p)).copied();
    let mut produced = 0u64;
    let mut lag_sweep = 0u64;
    // Per input partition: when it was last seen read to its end (Unix seconds).
    let mut at_end: BTreeMap<(String, i32), f64> = BTreeMap::new();
    let mut positions_at: Option<Instant> = None;
    // Partitions whose task was fenced, and since when.
    let mut fenced: BTreeMap<i32, Instant> = BTreeMap::new();
    let mut tail_checked = Instant::now();
    let mut commits = InformationalCommits::default();
    let mut generation = shared.lock().unwrap_or_else(|p| p.into_inner()).generation;
    while !stop.load(Ordering::Relaxed) {
        // While a task reads the archive, the poll only serves the consumer's events and what
        // the other tasks have: waiting for records would cap the archive's pace.
        let rehydrating =
            shared.lock().unwrap_or_else(|p| p.into_inner()).tasks.values().any(|r| !r.from_archive.is_empty() && r.paused_until.is_none());
        let mut batch = poll_batch(
            |left| consumer.poll(left).map(|r| r.map(|m| m.detach())),
            || shared.lock().unwrap_or_else(|p| p.into_inner()).generation,
            &mut generation,
            cfg.max_batch,
            if rehydrating { cfg.max_wait.min(Duration::from_millis(10)) } else { cfg.max_wait },
        );
        let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = sh.fatal.take() {
            return Err(RuntimeError::Store(store::StoreError::from_message(f)));
        }
        if sh.generation != generation {
            // A rebalance between the last poll and this lock: the same.
            generation = sh.generation;
            batch.clear();
        }
        fenced.retain(|p, _| !sh.tasks.contains_key(p));
        // A fenced partition still assigned here long after: nobody else took it; take it again.
        let again: Vec<i32> = fenced.iter().filter(|(_, at)| at.elapsed() >= FENCED_GRACE).map(|(p, _)| *p).collect();
        for p in again {
            fenced.remove(&p);
            let assigned = consumer.assignment().map(|a| a.elements().iter().any(|e| e.partition() == p)).unwrap_or(false);
            if !assigned || sh.tasks.contains_key(&p) {
                continue;
            }
            warn!(partition = p, "fenced partition still assigned here: taking it again");
            let path = cfg.data_dir.join(cfg.processor).join(format!("p{p}.redb"));
            let r = consumer.context().take(p, &path).map_err(|e| RuntimeError::Store(store::StoreError::from_message(e)))?;
            if let Err(e) = consumer.pause(&task_partitions(&input_topics, p)) {
                warn!(partition = p, error = %e, "pausing the partition's fetch");
            }
            reposition(&consumer, &input_topics, p, &r);
            sh.tasks.insert(p, r);
        }
        // The tail: a task knows the offsets of its own writes (delivery reports), so anything
        // else in its output partition shows as a gap between them, or as an end beyond its tail
        // when idle; only then is the partition read ([`RebalanceContext::read_output`]).
        if cfg.checkpointing && tail_checked.elapsed() >= TAIL_EVERY {
            tail_checked = Instant::now();
            for r in sh.tasks.values_mut() {
                // Read only when the output partition holds more than the task's own writes
                // (a stale high just delays the check to a later sweep).
                if high(&cfg.output_topic, r.task.partition).is_some_and(|h| h > r.task.tail.next) {
                    follow_tail(consumer.context(), r)?;
                }
            }
            stop_fenced(&mut sh, &metrics, &mut fenced);
        }
        let mut by_partition: BTreeMap<i32, Vec<OwnedMessage>> = BTreeMap::new();
        for m in batch {
            // (A lane still read from the archive is paused; what was fetched before is not
            // the task's next record.)
            if sh.tasks.get(&m.partition()).is_some_and(|r| !r.from_archive.is_empty()) {
                continue;
            }
            by_partition.entry(m.partition()).or_default().push(m);
        }
        for (p, r) in sh.tasks.iter_mut() {
            if !by_partition.contains_key(p) && r.task.has_due_answers() {
                by_partition.insert(*p, Vec::new());
            }
        }
        for (p, msgs) in by_partition {
            let Some(r) = sh.tasks.get_mut(&p) else { continue };
            if r.paused_until.is_some() {
                continue; // read again from the checkpoint when the pause ends
            }
            let result = decode_all(&rt, &codec, t, msgs, false).and_then(|decoded| {
                interval(&mut processor, &cfg, &lanes, &rt, &codec, &producer, consumer.context(), r, decoded, &mut produced, &metrics)
            });
            settle(result, &consumer, &input_topics, &metrics, cfg.checkpointing, archive.as_ref().map(|_| lane_topics.as_slice()), p, r)?;
        }
        // Tasks whose lanes start later than they read: the next records of every such lane
        // from the archive (a share of an interval each, so the lanes stay in step), through
        // the same interval, until the archive has handed over to the lanes.
        if let Some(archive) = &archive {
            for (p, r) in sh.tasks.iter_mut() {
                let p = *p;
                if r.paused_until.is_some() || r.fenced || r.from_archive.is_empty() {
                    continue;
                }
                let done: Vec<String> =
                    r.from_archive.iter().filter(|(t, low)| r.task.next_offset(t) >= **low).map(|(t, _)| t.clone()).collect();
                for topic in done {
                    info!(partition = p, %topic, at = r.from_archive[&topic], "read from the archive up to the lane's start");
                    r.from_archive.remove(&topic);
                }
                if r.from_archive.is_empty() {
                    info!(partition = p, "the archive has handed over: reading the lanes");
                    reposition(&consumer, &input_topics, p, r);
                    continue;
                }
                let share = (cfg.max_batch.max(1) / r.from_archive.len()).max(1) as i64;
                let mut msgs = Vec::new();
                let mut failed = None;
                for (topic, low) in r.from_archive.clone() {
                    let from = r.task.next_offset(&topic);
                    match archive.read(&topic, p, from, low.min(from + share)) {
                        Ok(m) => msgs.extend(m),
                        Err(ArchiveError::Unavailable(e)) => {
                            failed = Some(RuntimeError::Archive(e));
                            break;
                        }
                        Err(ArchiveError::Missing(e)) => {
                            tracing::error!(partition = p, %topic, from, to = low, "the lane starts later and the archive does not hold the records before: {e}");
                            return Err(RuntimeError::Task {
                                partition: p,
                                source: task::TaskError::Gap {
                                    topic: format!("{topic} (deleted from the lane and not in the archive: {e})"),
                                    expected: from,
                                    got: low,
                                },
                            });
                        }
                    }
                }
                let result = match failed {
                    Some(e) => Err(e),
                    None => decode_all(&rt, &codec, t, msgs, true).and_then(|decoded| {
                        interval(
                            &mut processor,
                            &cfg,
                            &lanes,
                            &rt,
                            &codec,
                            &producer,
                            consumer.context(),
                            r,
                            decoded,
                            &mut produced,
                            &metrics,
                        )
                    }),
                };
                // (A gap within archived records is fatal: no other source holds them.)
                settle(result, &consumer, &input_topics, &metrics, cfg.checkpointing, None, p, r)?;
            }
        }
        // Paused tasks whose wait is over read again from their checkpoint.
        for (p, r) in sh.tasks.iter_mut() {
            if r.paused_until.is_some_and(|at| Instant::now() >= at) {
                r.paused_until = None;
                reposition(&consumer, &input_topics, *p, r);
            }
        }
        metrics.paused.lock().unwrap_or_else(|e| e.into_inner()).retain(|p, _| sh.tasks.contains_key(p));
        stop_fenced(&mut sh, &metrics, &mut fenced);
        // Measured once per sweep of the inputs' highs, right after it.
        let sweep = input_sweeps.load(Ordering::Relaxed);
        if sweep != lag_sweep {
            lag_sweep = sweep;
            let (mut lag, mut ends) = (BTreeMap::new(), BTreeMap::new());
            for (p, r) in sh.tasks.iter() {
                for topic in &input_topics {
                    if let Some(h) = high(topic, *p) {
                        lag.insert((topic.clone(), *p), (h - r.task.next_offset(topic)).max(0));
                        ends.insert((topic.clone(), *p), h);
                    }
                }
            }
            let now = unix_now();
            let behind = {
                let mut handled = metrics.handled_ms.lock().unwrap_or_else(|e| e.into_inner());
                handled.retain(|k, _| lag.contains_key(k));
                at_end.retain(|k, _| lag.contains_key(k));
                lag.iter()
                    .map(|(k, l)| {
                        if *l == 0 {
                            at_end.insert(k.clone(), now);
                            return (k.clone(), None);
                        }
                        // No record still to handle is older than the newest one handled, nor
                        // than the last time the partition was seen at its end. Neither known (a
                        // partition taken with a backlog, nothing handled yet): since it was taken.
                        let handled = handled.get(k).map(|ms| *ms as f64 / 1e3);
                        let since = handled.into_iter().chain(at_end.get(k).copied()).reduce(f64::max);
                        (k.clone(), Some(since.unwrap_or_else(|| sh.tasks.get(&k.1).map_or(now, |r| r.taken_at))))
                    })
                    .collect()
            };
            *metrics.behind_since.lock().unwrap_or_else(|e| e.into_inner()) = behind;
            if snapshots.is_some() {
                let since = sh
                    .tasks
                    .iter()
                    .map(|(p, r)| {
                        let published = r.snapshot_published.lock().unwrap_or_else(|e| e.into_inner());
                        let since = match &*published {
                            _ if r.task.cp == Checkpoint::default() => None,
                            Some((cp, _)) if *cp == r.task.cp => None,
                            Some((_, at)) => Some(*at),
                            None => Some(r.taken_at),
                        };
                        (*p, since)
                    })
                    .collect();
                *metrics.snapshot_behind_since.lock().unwrap_or_else(|e| e.into_inner()) = since;
            }
            *metrics.lag.lock().unwrap_or_else(|e| e.into_inner()) = lag;
            *metrics.ends.lock().unwrap_or_else(|e| e.into_inner()) = ends;
            if archive.is_some() {
                let lows = lows.lock().unwrap_or_else(|e| e.into_inner()).clone();
                for (p, r) in sh.tasks.iter_mut() {
                    for topic in &lane_topics {
                        if let Some(low) = lows.get(&(topic.clone(), *p)).copied() {
                            if low > r.task.next_offset(topic) && !r.from_archive.contains_key(topic) && r.paused_until.is_none() {
                                read_from_archive(&consumer, &input_topics, &lane_topics, *p, r, topic, low);
                            }
                        }
                    }
                }
            }
        }
        if positions_at.is_none_or(|at| at.elapsed() >= POSITIONS_EVERY) {
            positions_at = Some(Instant::now());
            let positions =
                sh.tasks.iter().flat_map(|(p, r)| input_topics.iter().map(move |t| ((t.clone(), *p), r.task.next_offset(t)))).collect();
            *metrics.positions.lock().unwrap_or_else(|e| e.into_inner()) = positions;
        }
        if let Some(s) = &snapshots {
            for (p, r) in sh.tasks.iter_mut() {
                maybe_snapshot(s, &name, &rt, *p, r);
            }
        }
        // Informational: the checkpoints' next offsets committed to the group now and then, so
        // standard lag tools (`kafka-consumer-groups --describe`) and `vitals offsets show` see
        // the processor groups. Never read back: a task starts from its own checkpoint.
        if cfg.checkpointing {
            commits.offer(&consumer, || {
                sh.tasks.iter().flat_map(|(p, r)| r.task.cp.offsets.iter().map(move |(t, o)| ((t.clone(), *p), *o))).collect()
            });
        }
    }
    Ok(())
}

/// What an interval's outcome means for its task: a committed interval resets the backoff; a
/// failed dependency pauses the task's input, to be read again from the checkpoint (nothing of
/// the interval was committed: a checkpointing task's state lives in its store), nothing
/// skipped, nothing dead-lettered; anything else stops the runtime.
// Every argument is a distinct part of the task loop's state that the outcome touches; a struct
// bundling them would exist for this call only.
#[allow(clippy::too_many_arguments)]
fn settle<C: ConsumerContext>(
    result: Result<(), RuntimeError>,
    consumer: &BaseConsumer<C>,
    input_topics: &[String],
    metrics: &metrics::RuntimeMetrics,
    checkpointing: bool,
    archived_lanes: Option<&[String]>,
    p: i32,
    r: &mut Running,
) -> Result<(), RuntimeError> {
    match result {
        Ok(()) => {
            if r.backoff.is_backing_off() {
                r.backoff.reset();
                metrics.resume(p);
                info!(partition = p, "dependency back: the task runs again");
            }
            Ok(())
        }
        Err(e) if e.is_dependency() && checkpointing => {
            let wait = r.backoff.next_wait();
            warn!(partition = p, error = %e, retry_in_ms = wait.as_millis() as u64, "a dependency failed: task paused, its records wait (nothing skipped, nothing dead-lettered)");
            metrics.add(&metrics.dependency_retries, 1);
            metrics.pause(p, e.to_string());
            r.paused_until = Some(Instant::now() + wait);
            if let Err(e) = consumer.pause(&task_partitions(input_topics, p)) {
                warn!(partition = p, error = %e, "pausing the partition's fetch");
            }
            Ok(())
        }
        Err(RuntimeError::Task { partition, source: task::TaskError::Gap { topic, expected, got } }) => {
            // A lane that starts past the task (records deleted by retention): from the archive,
            // when there is one. Nothing of the interval was committed.
            if let Some(lanes) = archived_lanes.filter(|l| l.contains(&topic)) {
                if let Ok((low, _)) = consumer.fetch_watermarks(&topic, partition, Duration::from_secs(5)) {
                    if low > expected {
                        read_from_archive(consumer, input_topics, lanes, p, r, &topic, low);
                        return Ok(());
                    }
                }
            }
            Err(gap_error(consumer, partition, topic, expected, got))
        }
        Err(e) => Err(e),
    }
}

/// Task `p` reads `topic` from the archive up to `low` (the lane's first record) before the
/// lane, and so every other of its `lanes` that starts past it too (asked now: this is rare);
/// the consumer's partitions of the task wait, paused, until the archive has handed over.
fn read_from_archive<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    input_topics: &[String],
    lanes: &[String],
    p: i32,
    r: &mut Running,
    topic: &str,
    low: i64,
) {
    info!(partition = p, %topic, from = r.task.next_offset(topic), to = low, "the lane starts later: reading those records from the archive first");
    r.from_archive.insert(topic.to_owned(), low);
    let others: Vec<&String> = lanes.iter().filter(|l| *l != topic && !r.from_archive.contains_key(*l)).collect();
    for other in others {
        if let Ok((low, _)) = consumer.fetch_watermarks(other, p, Duration::from_secs(5)) {
            if low > r.task.next_offset(other) {
                info!(partition = p, topic = %other, from = r.task.next_offset(other), to = low, "the lane starts later: reading those records from the archive first");
                r.from_archive.insert(other.clone(), low);
            }
        }
    }
    if let Err(e) = consumer.pause(&task_partitions(input_topics, p)) {
        warn!(partition = p, error = %e, "pausing the partition's fetch");
    }
    reposition(consumer, input_topics, p, r);
}

/// An input record that is not the next one of its lane. The input lanes are never compacted,
/// so the only way to get one is a lane whose start was deleted (retention) past what the task
/// has read: replaying it would silently skip records. That is refused, loudly.
fn gap_error<C: ConsumerContext>(consumer: &BaseConsumer<C>, partition: i32, topic: String, expected: i64, got: i64) -> RuntimeError {
    let low = consumer.fetch_watermarks(&topic, partition, Duration::from_secs(5)).map(|(l, _)| l).ok();
    let why = match low {
        Some(l) if l > expected => format!("the lane starts at offset {l}: records {expected}..{l} were deleted (retention?) before this task read them; input lanes must never be truncated"),
        _ => "a record was skipped".to_owned(),
    };
    tracing::error!(partition, %topic, expected, got, "input gap: {why}");
    RuntimeError::Task { partition, source: task::TaskError::Gap { topic: format!("{topic} ({why})"), expected, got } }
}

pub use vitals_schemas::topics::{DEAD_LETTERS_HEADER, ERASED_HEADER, INTERVAL_HEADER, PROGRESS_HEADER, USER_HEADER, VOUCH_HEADER};

fn is_progress(m: &OwnedMessage) -> bool {
    m.headers().is_some_and(|h| h.iter().any(|h| h.key == PROGRESS_HEADER))
}

/// How often an idle task looks for writes of others at the end of its output partition.
const TAIL_EVERY: Duration = Duration::from_secs(2);

/// Reads a task's output partition from its tail position to its end (nothing to read: one
/// watermark request). A record of another owner's newer epoch marks the task fenced.
fn follow_tail(ctx: &RebalanceContext, r: &mut Running) -> Result<(), RuntimeError> {
    match ctx.read_output(r.task.partition, r.task.tail.clone(), r.task.epoch, r.task.owner) {
        Ok((tail, _)) => r.task.tail = tail,
        Err(TailError::Fenced(f)) => {
            warn!(partition = r.task.partition, error = %f, "another owner wrote to the output partition");
            r.fenced = true;
        }
        Err(TailError::Read(e)) => return Err(RuntimeError::Store(store::StoreError::from_message(e))),
    }
    Ok(())
}

/// Stops every fenced task: another task owns its partition now. The group moves the partition
/// (or, if it stays here, it is taken again after [`FENCED_GRACE`]).
fn stop_fenced(sh: &mut Shared, metrics: &metrics::RuntimeMetrics, fenced: &mut BTreeMap<i32, Instant>) {
    let stopped: Vec<i32> = sh.tasks.iter().filter(|(_, r)| r.fenced).map(|(p, _)| *p).collect();
    for p in stopped {
        warn!(partition = p, "task fenced: stopping it");
        metrics.add(&metrics.fenced, 1);
        sh.tasks.remove(&p);
        fenced.insert(p, Instant::now());
    }
}

/// How often the lag of the owned partitions is measured (a watermark request per input topic
/// and partition).
const LAG_EVERY: Duration = Duration::from_secs(10);
/// How often the owned partitions' checkpointed offsets are published to the metrics (a map
/// copy, no I/O): what progress displays read.
const POSITIONS_EVERY: Duration = Duration::from_secs(1);

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

/// Decodes a partition's records for the task. A registry that is unavailable stops the
/// runtime (it restarts and reads them again); a record that does not decode is proven bad.
/// `archived`: the records were read back from the archive, whose erased records (and only
/// those: a lane record with that header is an ordinary record) are placeholders.
fn decode_all(
    rt: &tokio::runtime::Handle,
    codec: &Codec,
    t: &Topics,
    msgs: Vec<OwnedMessage>,
    archived: bool,
) -> Result<Vec<InRecord>, RuntimeError> {
    let mut out = Vec::with_capacity(msgs.len());
    for m in msgs {
        // An erased record read back from the archive keeps its offset and nothing else.
        let erased = archived && m.headers().is_some_and(|h| h.iter().any(|h| h.key == ERASED_HEADER));
        let body = if is_progress(&m) || erased {
            InBody::Marker
        } else {
            match rt.block_on(decode(codec, t, &m)) {
                Ok(i) => InBody::Input(i),
                Err(CodecError::Unavailable(e)) => return Err(RuntimeError::Registry(e)),
                Err(e) => InBody::Undecodable(e.to_string()),
            }
        };
        out.push(InRecord {
            topic: m.topic().to_owned(),
            offset: m.offset(),
            ts_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            traceparent: m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == vitals_schemas::trace::HEADER).and_then(|h| h.value))
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            body,
        });
    }
    Ok(out)
}

/// One record to produce: topic, key, bytes, headers.
type Produce = (String, String, Vec<u8>, OwnedHeaders);

#[allow(clippy::too_many_arguments)]
fn interval<P>(
    processor: &mut P,
    cfg: &RuntimeConfig,
    lanes: &Lanes,
    rt: &tokio::runtime::Handle,
    codec: &Codec,
    producer: &FutureProducer,
    ctx: &RebalanceContext,
    running: &mut Running,
    msgs: Vec<InRecord>,
    produced: &mut u64,
    metrics: &metrics::RuntimeMetrics,
) -> Result<(), RuntimeError>
where
    P: Processor,
    P::Output: Versioned + vitals_schemas::codec::AvroRecord + Serialize + DeserializeOwned + Clone,
{
    let task = &mut running.task;
    let p = task.partition;
    let t = &cfg.topics;
    // The newest record of each input topic in the interval: once it commits, the freshness age
    // is measured from them.
    let mut newest: BTreeMap<String, i64> = BTreeMap::new();
    for m in &msgs {
        if let Some(ms) = m.ts_ms.filter(|ms| *ms > 0) {
            let at = newest.entry(m.topic.clone()).or_insert(ms);
            *at = (*at).max(ms);
        }
    }
    let planned = task.plan(processor, lanes, cfg.processor, msgs).map_err(|source| match source {
        task::TaskError::Store(e) => RuntimeError::Store(e),
        source => RuntimeError::Task { partition: p, source },
    })?;
    metrics.add(&metrics.timers_fired, planned.timers_fired);
    metrics.add(&metrics.records_in, planned.read);
    fn encode_as<T: Serialize + vitals_schemas::codec::AvroRecord>(
        rt: &tokio::runtime::Handle,
        codec: &Codec,
        topic: &str,
        v: &T,
    ) -> Result<Vec<u8>, RuntimeError> {
        rt.block_on(codec.encode(topic, v)).map_err(|e| match e {
            CodecError::Unavailable(m) => RuntimeError::Registry(m),
            other => RuntimeError::Encode(other.to_string()),
        })
    }
    let encode = |topic: &str, v: &P::Output| encode_as(rt, codec, topic, v);
    let (epoch, source, owner) = (planned.epoch.to_string(), source_header(&planned.source), task.owner.to_string());
    let traces = &planned.traces;
    let stamp = |user: &str, traced: bool| {
        let h = OwnedHeaders::new()
            .insert(Header { key: EPOCH_HEADER, value: Some(epoch.as_str()) })
            .insert(Header { key: OWNER_HEADER, value: Some(owner.as_str()) })
            .insert(Header { key: USER_HEADER, value: Some(user) })
            .insert(Header { key: SOURCE_HEADER, value: Some(source.as_str()) });
        // The user's upload trace goes on through its rows (to the sink); markers are no hop.
        match traces.get(user).filter(|_| traced) {
            Some(tp) => h.insert(Header { key: vitals_schemas::trace::HEADER, value: Some(tp.as_str()) }),
            None => h,
        }
    };
    // Rows (and dead letters) first, then the markers. Each row names the interval attempt and
    // each marker how many rows of its user the attempt produced, so a reader believes a marker
    // only after reading all of them (`vitals_schemas::vouch`): a row that fails for good while
    // later records still land cannot make its marker count. Markers therefore go out with the
    // rows, one acknowledgement wait per interval — unless the interval has dead letters, whose
    // offsets (in another topic) the markers name: then the markers wait for them.
    let interval_id = planned.interval.as_str();
    let mut rows: Vec<Produce> = Vec::new();
    let mut markers: Vec<Produce> = Vec::new();
    let mut marker_users: Vec<String> = Vec::new();
    // Per row: the user and code of a dead letter (`None` for an output row).
    let mut dead_users: Vec<Option<(String, String)>> = Vec::new();
    for rec in &planned.records {
        match rec {
            Out::Row { key, user, value, .. } => {
                let headers = stamp(user, true).insert(Header { key: INTERVAL_HEADER, value: Some(interval_id) });
                rows.push((cfg.output_topic.clone(), key.clone(), encode(&cfg.output_topic, value)?, headers));
                dead_users.push(None);
                metrics.add(&metrics.outputs, 1);
            }
            Out::Marker { key, user, value, rows: n, .. } => {
                marker_users.push(user.clone());
                let vouch = vitals_schemas::vouch::vouch(interval_id, *n);
                let headers = stamp(user, false)
                    .insert(Header { key: PROGRESS_HEADER, value: Some("1") })
                    .insert(Header { key: VOUCH_HEADER, value: Some(vouch.as_str()) });
                markers.push((cfg.output_topic.clone(), key.clone(), encode(&cfg.output_topic, value)?, headers));
                metrics.add(&metrics.progress_markers, 1);
            }
            Out::Dead { dead, reason } => {
                warn!(topic = %dead.source_topic, partition = p, offset = dead.source_offset, code = %dead.code, "dead-lettered");
                metrics.dead_letter(&dead.stage, &dead.code);
                let key = String::from_utf8_lossy(dead.key.as_deref().unwrap_or_default()).into_owned();
                // Lanes are keyed by user: the dead letter counts against that user's freshness.
                let headers = vitals_schemas::dead_letter::headers(&dead.source_topic, p, dead.source_offset, reason, Some(&key))
                    .into_iter()
                    .fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: Some(v.as_str()) }));
                let bytes = encode_as(rt, codec, &t.dead_letter, dead)?;
                dead_users.push(Some((key.clone(), dead.code.clone())));
                rows.push((t.dead_letter.clone(), key, bytes, headers));
            }
        }
    }
    if !cfg.checkpointing {
        for rec in rows.iter().chain(markers.iter()) {
            // Fire and forget: the at-least-once baseline.
            drop(enqueue(producer, p, rec)?);
        }
        task.commit(planned)?;
        metrics.handled(p, newest);
        return Ok(());
    }
    if !rows.is_empty() {
        pause_before_produce();
    }
    // The offsets this task's records landed at in its output partition.
    let mut own: Vec<i64> = Vec::new();
    if !rows.is_empty() || !markers.is_empty() {
        let waiting = Instant::now();
        // Enqueued one by one, in order (a full queue is waited out before the next record is
        // enqueued, so nothing overtakes), then every acknowledgement awaited: where each landed.
        let send_all = |group: &[Produce]| -> Result<Vec<(i32, i64)>, RuntimeError> {
            let mut futs = Vec::with_capacity(group.len());
            for rec in group {
                futs.push(enqueue(producer, p, rec)?);
            }
            let mut landed = Vec::with_capacity(group.len());
            for a in rt.block_on(join_all(futs)) {
                match a {
                    Ok(Ok(delivery)) => landed.push((delivery.partition, delivery.offset)),
                    Ok(Err((e, _))) => return Err(RuntimeError::NotAcknowledged(e.to_string())),
                    Err(_) => return Err(RuntimeError::NotAcknowledged("the producer dropped a delivery".into())),
                }
            }
            Ok(landed)
        };
        let has_dead = dead_users.iter().any(Option::is_some);
        if !has_dead {
            rows.append(&mut markers);
        }
        let landed = send_all(&rows)?;
        // A user's marker names the dead letters of the interval (`partition:offset:code`), so
        // the sink records them in the same transaction as the progress they come with: a read
        // is never `fresh` over a dead-lettered record, not even until the sink reaches it in
        // the dead-letter topic.
        let mut dead_of: BTreeMap<&str, Vec<(i32, i64, &str)>> = BTreeMap::new();
        // (`rows` may hold the markers after the rows and dead letters: `dead_users` is shorter.)
        for (rec, at) in rows.iter().zip(&landed) {
            if rec.0 == cfg.output_topic {
                own.push(at.1);
            }
        }
        for (at, dead) in landed.iter().zip(&dead_users) {
            if let Some((user, code)) = dead {
                dead_of.entry(user.as_str()).or_default().push((at.0, at.1, code.as_str()));
            }
        }
        let markers: Vec<Produce> = markers
            .into_iter()
            .zip(&marker_users)
            .map(|((topic, key, bytes, headers), user)| match dead_of.get(user.as_str()) {
                Some(d) => (
                    topic,
                    key,
                    bytes,
                    headers.insert(Header { key: DEAD_LETTERS_HEADER, value: Some(vitals_schemas::dead_letter::announce(d).as_str()) }),
                ),
                None => (topic, key, bytes, headers),
            })
            .collect();
        for at in send_all(&markers)? {
            own.push(at.1);
        }
        metrics.ack_wait_seconds.observe(waiting.elapsed());
        *produced += 1;
        if cfg.crash_after_produce.is_some_and(|n| *produced >= n) {
            warn!("crash_after_produce: aborting between produce and checkpoint");
            std::process::abort();
        }
    }
    // Its own records follow its tail position without a gap, or someone else wrote in between:
    // then the partition is read (the foreign records become pending, or fence the task).
    own.sort_unstable();
    for o in own {
        if o == task.tail.next {
            task.tail.next += 1;
        } else if o > task.tail.next {
            follow_tail(ctx, running)?;
            if running.fenced {
                return Ok(());
            }
            break;
        }
    }
    let task = &mut running.task;
    // Only now, with every output acknowledged, does the interval become the checkpoint.
    let committing = Instant::now();
    task.commit(planned)?;
    metrics.commit_seconds.observe(committing.elapsed());
    metrics.add(&metrics.commits, 1);
    metrics.handled(p, newest);
    Ok(())
}

/// Test hook (`VITALS_TEST_PAUSE_BEFORE_PRODUCE=<file>`): when the file exists, it is removed
/// and the process stops itself (SIGSTOP) right before producing an interval's rows — a zombie
/// frozen between its last look at the partition and its write, the worst moment to pause.
fn pause_before_produce() {
    static FILE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let Some(f) = FILE.get_or_init(|| std::env::var_os("VITALS_TEST_PAUSE_BEFORE_PRODUCE").map(PathBuf::from)) else { return };
    if std::fs::remove_file(f).is_ok() {
        warn!("test hook: stopping before producing an interval's outputs");
        let _ = std::process::Command::new("kill").args(["-STOP", &std::process::id().to_string()]).status();
    }
}

/// Enqueues one record on partition `p`, waiting out a full queue (the producer's own thread
/// drains it); returns its delivery future.
fn enqueue(
    producer: &FutureProducer,
    p: i32,
    (topic, key, bytes, headers): &Produce,
) -> Result<rdkafka::producer::DeliveryFuture, RuntimeError> {
    let mut rec = FutureRecord::to(topic).partition(p).key(key.as_str()).payload(bytes.as_slice()).headers(headers.clone());
    loop {
        match producer.send_result(rec) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => return Err(RuntimeError::NotAcknowledged(e.to_string())),
        }
    }
}

/// Takes a snapshot of the task if its last one is at least `every` old (or none was taken yet)
/// and its checkpoint moved since: the export is read now, between intervals (one read
/// transaction of the committed store, so it is exactly the checkpoint `task.cp`); the upload
/// and the pointer's publication run in the background. A failure is logged and counted;
/// processing never waits for or stops on it.
fn maybe_snapshot(s: &Arc<Snapshots>, processor: &str, rt: &tokio::runtime::Handle, p: i32, r: &mut Running) {
    if r.snapshot_failed.swap(false, Ordering::AcqRel) {
        r.snapshot_of = None;
    }
    let due = r.snapshot_at.is_none_or(|at| at.elapsed() >= s.every);
    if !due || r.task.cp == Checkpoint::default() || r.snapshot_of.as_ref() == Some(&r.task.cp) || r.snapshot_busy.load(Ordering::Acquire) {
        return;
    }
    let epoch = r.task.epoch;
    r.snapshot_at = Some(Instant::now());
    let taken_at = unix_now();
    // Exported to a file beside the store, entry by entry, and uploaded from it: memory does not
    // grow with the store.
    let file = snapshot::export_path(r.task.store.path(), epoch, r.task.cp.seq);
    match r.task.store.export_file(&file) {
        Ok(_) => {}
        Err(e) => {
            s.metrics.failed.fetch_add(1, Ordering::Relaxed);
            r.snapshot_failed.store(true, Ordering::Release);
            warn!(partition = p, error = %e, "snapshot export failed");
            return;
        }
    }
    r.snapshot_of = Some(r.task.cp.clone());
    r.snapshot_busy.store(true, Ordering::Release);
    let (s, cp, busy, processor) = (Arc::clone(s), r.task.cp.clone(), Arc::clone(&r.snapshot_busy), processor.to_owned());
    let (published, failed) = (Arc::clone(&r.snapshot_published), Arc::clone(&r.snapshot_failed));
    rt.spawn(async move {
        match s.save(&processor, p, epoch, &cp, &file).await {
            Ok(true) => *published.lock().unwrap_or_else(|e| e.into_inner()) = Some((cp, taken_at)),
            Ok(false) => {} // fenced off: not this task's newest snapshot
            Err(e) => {
                s.metrics.failed.fetch_add(1, Ordering::Relaxed);
                failed.store(true, Ordering::Release);
                warn!(partition = p, error = %e, "snapshot failed; processing goes on");
            }
        }
        busy.store(false, Ordering::Release);
    });
}

/// A consumer configuration for a processor group, on `base`: the brokers, the client id and how
/// to connect (TLS, SASL), as the composition root sets them for every client.
pub fn consumer_config(mut base: ClientConfig, group_id: &str) -> ClientConfig {
    base.set("group.id", group_id)
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
        .set("max.poll.interval.ms", "20000");
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written by a build with another state layout is refused; an empty one adopts it.
    #[test]
    fn a_store_of_another_state_format_is_refused_never_read_as_empty() {
        let dir = std::env::temp_dir().join(format!("vitals-format-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir.join("s.redb")).unwrap();
        adopt_state_format(&store, 2).expect("an empty store takes the format");
        assert_eq!(store.state_format().unwrap(), 2);
        // A store of an earlier build: offsets read, no format recorded (= 1).
        let old = Store::open(&dir.join("old.redb")).unwrap();
        let cp = store::Checkpoint { offsets: [("hot".to_owned(), 5)].into(), ..Default::default() };
        old.commit(store::Overlay::default(), &cp).unwrap();
        let err = adopt_state_format(&old, 2).unwrap_err();
        assert!(err.contains("format 1") && err.contains("replay"), "{err}");
        adopt_state_format(&old, 1).expect("the same format is read");
        let _ = std::fs::remove_dir_all(dir);
    }
}
