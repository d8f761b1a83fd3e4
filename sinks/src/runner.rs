//! The projection sink's consumer loop.
//!
//! Exactly-once in effect: on assignment the consumer seeks to the offsets stored in PostgreSQL
//! (`sink_offsets`), and each batch commits its rows and its next offsets in one transaction, so
//! after any crash the sink resumes exactly after what it committed. Re-delivered or re-emitted
//! records (a processor's replay, a zombie) carry versions no newer than what is stored and change
//! nothing. While PostgreSQL is unreachable the batch is retried with backoff; nothing is skipped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tracing::{info, warn};
use vitals_schemas::codec::{Codec, CodecError};
use vitals_schemas::exposition::{unix_now, Histogram};
use vitals_schemas::projection::BuiltFrom;
use vitals_schemas::topics::Topics;
use vitals_schemas::vouch::{Belief, Vouches};
use vitals_schemas::DeadLetter;

use crate::postgres::{self, Applied, Batch};
use crate::{Progress, ProgressKind, Projection, Row, PROGRESS_HEADER};
use vitals_consumer::{dead_letter_of, poll_batch, Backoff, InformationalCommits};

pub use vitals_schemas::topics::{DEAD_LETTERS_HEADER, INTERVAL_HEADER, USER_HEADER, VOUCH_HEADER};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("dead-letter write not acknowledged: {0}")]
    DeadLetter(String),
    #[error("assigning partitions: {0}")]
    Assign(String),
}

/// Settings of one sink.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Its name: the key of its offsets in `sink_offsets`.
    pub name: String,
    pub topics: Topics,
    pub projections: Vec<Projection>,
    pub max_batch: usize,
    pub max_wait: Duration,
}

/// Output topic → its projection, and whether another projection is built from it.
type ByTopic = BTreeMap<String, (Projection, bool)>;

impl SinkConfig {
    /// Output topic → its projection, and whether another projection is built from it (its
    /// rows are then recorded per user as that projection's inputs, for freshness). Computed
    /// once per run.
    fn by_topic(&self) -> ByTopic {
        let chained = |p: &Projection| {
            p.version.is_none()
                && self.projections.iter().any(|q| q.version.is_none() && q.descriptor.built_from == BuiltFrom::Projection(p.name()))
        };
        self.projections.iter().map(|p| (p.topic(&self.topics), (*p, chained(p)))).collect()
    }
}

/// Counters an operator (and the tests) can read.
#[derive(Debug, Default)]
pub struct SinkMetrics {
    pub records_in: AtomicU64,
    pub rows_applied: AtomicU64,
    pub batches_committed: AtomicU64,
    pub commit_retries: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Progress markers not believed: a row they vouch for was not read before them.
    pub markers_refused: AtomicU64,
    /// What the sink is waiting for (a failed dependency), while it waits: `/readyz` says it.
    pub waiting: Mutex<Option<String>>,
    pub dead_letters: vitals_schemas::dead_letter::DeadLetterCounts,
    /// Per projection (its key, `name` or `name@version`): rows changed (upserts, retractions)
    /// and the time of the newest change ([`SinkMetrics::applied`]).
    pub projections: Mutex<BTreeMap<String, crate::metrics::ProjectionCounts>>,
    /// How long each successful batch commit (rows + offsets in one transaction) took.
    pub commit_seconds: Histogram,
    /// Per assigned (topic, partition): records behind its end, as last measured (every
    /// [`LAG_EVERY`]): what is read but not committed counts as behind.
    pub lag: Mutex<BTreeMap<(String, i32), i64>>,
    /// Per (projection key, partition) assigned: `None` when read to its end; otherwise the Unix
    /// time no record still to apply can be older than. Freshness age = now − this.
    pub behind_since: Mutex<BTreeMap<(String, i32), Option<f64>>>,
}

/// How often the sink measures its lag (each measurement asks the broker for every assigned
/// partition's end, off the poll thread).
pub const LAG_EVERY: Duration = Duration::from_secs(5);

/// What runs after each commit with the rows it changed.
pub type OnApplied = Box<dyn Fn(&[Applied]) + Send>;

/// Everything the sink is handed by the composition root.
pub struct SinkArgs {
    pub cfg: SinkConfig,
    pub consumer_config: ClientConfig,
    pub producer: FutureProducer,
    pub codec: Arc<Codec>,
    pub pool: PgPool,
    pub stop: Arc<AtomicBool>,
    pub metrics: Arc<SinkMetrics>,
    /// Called after each commit with the rows that changed (realtime push). Must not block.
    pub on_applied: OnApplied,
}

struct SeekContext {
    pool: PgPool,
    sink: String,
    rt: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
    fatal: Arc<Mutex<Option<String>>>,
    metrics: Arc<SinkMetrics>,
    /// The rows read of attempts whose markers are still to come, of the assigned partitions.
    vouches: Arc<Mutex<Vouches>>,
    /// Bumped by every rebalance: what a batch polled before one is read again from the stored
    /// offsets, and counted again against the reloaded vouches, so it is dropped.
    generation: Arc<AtomicU64>,
}

impl ClientContext for SeekContext {}

impl SeekContext {
    /// The stored offsets of the assigned partitions; retried (with backoff) while PostgreSQL
    /// is down, since starting anywhere else would either skip or redo work.
    /// The counts of open attempts ([`Vouches`]) of those partitions are loaded with them.
    fn stored(&self, tpl: &TopicPartitionList) -> Option<BTreeMap<(String, i32), i64>> {
        let mut wait = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let assigned: std::collections::BTreeSet<(String, i32)> =
            tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        loop {
            let result: Result<_, sqlx::Error> = self.rt.block_on(async {
                let mut out = BTreeMap::new();
                let mut open = Vec::new();
                let topics: std::collections::BTreeSet<&String> = assigned.iter().map(|(t, _)| t).collect();
                for t in topics {
                    for (p, o) in postgres::stored_offsets(&self.pool, &self.sink, t).await? {
                        out.insert((t.clone(), p), o);
                    }
                    open.extend(
                        postgres::stored_vouches(&self.pool, &self.sink, t)
                            .await?
                            .into_iter()
                            .filter(|(k, _, _)| assigned.contains(&(k.0.clone(), k.1))),
                    );
                }
                Ok((out, open))
            });
            match result {
                Ok((o, open)) => {
                    self.metrics.wait_over();
                    let mut v = self.vouches.lock().unwrap_or_else(|p| p.into_inner());
                    for (t, p) in &assigned {
                        v.forget(t, *p);
                    }
                    v.load(open);
                    return Some(o);
                }
                Err(e) if !self.stop.load(Ordering::Relaxed) => {
                    warn!(error = %e, "reading stored offsets failed; retrying");
                    self.metrics.wait(format!("PostgreSQL (reading the stored offsets): {e}"));
                    std::thread::sleep(wait.next_wait());
                }
                Err(_) => return None,
            }
        }
    }
}

impl ConsumerContext for SeekContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let Some(stored) = self.stored(tpl) else { return };
                let mut start = TopicPartitionList::new();
                for el in tpl.elements() {
                    let off = stored.get(&(el.topic().to_owned(), el.partition())).copied();
                    let _ = start.add_partition_offset(el.topic(), el.partition(), off.map(Offset::Offset).unwrap_or(Offset::Beginning));
                }
                info!(partitions = tpl.count(), "sink assigned");
                if let Err(e) = consumer.assign(&start) {
                    *self.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                info!("sink partitions revoked");
                let mut v = self.vouches.lock().unwrap_or_else(|p| p.into_inner());
                for el in tpl.elements() {
                    v.forget(el.topic(), el.partition());
                }
                let _ = consumer.unassign();
            }
            other => warn!(?other, "rebalance error"),
        }
    }
}

/// A consumer configuration for a sink group, on `base`: the brokers, the client id and how to
/// connect (TLS, SASL), as the composition root sets them for every client.
pub fn consumer_config(mut base: ClientConfig, group_id: &str) -> ClientConfig {
    base.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        // The rebalance timeout too: a killed member stalls a rebalance at most this long.
        .set("max.poll.interval.ms", "20000");
    base
}

enum Decoded {
    Row(Row),
    Progress(Progress),
}

fn header<'m>(m: &'m OwnedMessage, key: &str) -> Option<&'m str> {
    m.headers()?.iter().find(|h| h.key == key).and_then(|h| std::str::from_utf8(h.value?).ok())
}

async fn decode(codec: &Codec, p: Projection, m: &OwnedMessage) -> Result<Decoded, CodecError> {
    let payload = m.payload().ok_or_else(|| CodecError::Undecodable("empty payload".into()))?;
    let body = (p.decode_json)(codec, payload).await?;
    let row = Row::of(p, body).map_err(CodecError::Undecodable)?;
    let is_progress = m.headers().is_some_and(|h| h.iter().any(|h| h.key == PROGRESS_HEADER));
    Ok(if is_progress {
        Decoded::Progress(Progress {
            projection: p,
            user_id: row.user_id,
            kind: ProgressKind::Marker,
            epoch: row.version.0,
            source_offsets: row.source_offsets,
        })
    } else {
        Decoded::Row(row)
    })
}

/// Runs the sink until `stop` is set. Blocking: call it from a dedicated thread; it uses the
/// current tokio runtime for I/O.
pub fn run(args: SinkArgs) -> Result<(), SinkError> {
    let SinkArgs { cfg, consumer_config, producer, codec, pool, stop, metrics, on_applied } = args;
    let rt = tokio::runtime::Handle::current();
    let fatal = Arc::new(Mutex::new(None));
    let vouches = Arc::new(Mutex::new(Vouches::default()));
    let generation = Arc::new(AtomicU64::new(0));
    let ctx = SeekContext {
        pool: pool.clone(),
        sink: cfg.name.clone(),
        rt: rt.clone(),
        stop: Arc::clone(&stop),
        fatal: Arc::clone(&fatal),
        metrics: Arc::clone(&metrics),
        vouches: Arc::clone(&vouches),
        generation: Arc::clone(&generation),
    };
    let consumer: BaseConsumer<SeekContext> = consumer_config.create_with_context(ctx)?;
    // The projections, and the dead letters (freshness says `degraded` over them).
    let by_topic = cfg.by_topic();
    let mut topics: Vec<String> = by_topic.keys().cloned().collect();
    topics.push(cfg.topics.dead_letter.clone());
    consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    info!(sink = %cfg.name, ?topics, "sink started");
    metrics.declare(cfg.projections.iter().map(|p| p.key()));
    // Informational commits of what PostgreSQL holds as committed (see below).
    // The offsets PostgreSQL holds, committed to the group now and then (idle or not) so that
    // standard lag tools see the sink; never read back (the sink seeks to `sink_offsets`).
    let (mut commits, mut positions) = (InformationalCommits::default(), BTreeMap::<(String, i32), i64>::new());
    let mut lag = LagWatch::start(&consumer_config, &stop, &by_topic, &metrics)?;
    // (Only what moved since the last commit: a partition that went to another instance is
    // not committed again with its old offset.)
    while !stop.load(Ordering::Relaxed) {
        // A rebalance inside a poll seeks every assigned partition back to its stored offset and
        // reloads the vouches: what was polled before it comes again, and is dropped here (kept,
        // its rows would count twice against their marker, which would then be refused).
        let mut seen = generation.load(Ordering::Relaxed);
        let msgs: Vec<OwnedMessage> = poll_batch(
            |left| consumer.poll(left).map(|r| r.map(|m| m.detach())),
            || generation.load(Ordering::Relaxed),
            &mut seen,
            cfg.max_batch,
            cfg.max_wait,
        );
        if let Some(f) = fatal.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(SinkError::Assign(f));
        }
        if msgs.is_empty() {
            metrics.wait_over(); // nothing to apply: waiting for nothing
            commits.offer(&consumer, || std::mem::take(&mut positions));
            lag.measure(&consumer, generation.load(Ordering::Relaxed));
            continue;
        }
        lag.polled(seen, &msgs);
        // The registry being down is not the records' fault: wait and decode again.
        let mut wait = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        // Each decoding reads the open counts on a copy, which becomes the sink's once the batch
        // commits.
        let (batch, work) = loop {
            let mut work = vouches.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match decode_batch(&rt, &producer, &codec, &cfg, &by_topic, &metrics, &msgs, &mut work, &stop)? {
                Some(b) => break (b, work),
                None => {
                    // Waiting ages what waits: the freshness age goes on being measured.
                    lag.measure(&consumer, generation.load(Ordering::Relaxed));
                    if !wait_or_stop(&stop, wait.next_wait()) {
                        return Ok(());
                    }
                }
            }
        };
        metrics.records_in.fetch_add(msgs.len() as u64, Ordering::Relaxed);
        let (mut batch, mut row_msgs) = batch;
        // A row of an upload's trace is a hop of it (vitals_schemas::trace): a span from here to
        // its commit, the parent of its realtime envelope.
        let spans: Vec<tracing::Span> = batch
            .rows
            .iter_mut()
            .zip(&row_msgs)
            .filter_map(|(row, i)| {
                let m = &msgs[*i];
                let tp = header(m, vitals_schemas::trace::HEADER)?;
                let span = tracing::trace_span!(
                    target: vitals_schemas::trace::TARGET,
                    "sink.apply",
                    sink = cfg.name.as_str(),
                    projection = %row.projection.key(),
                    partition = m.partition(),
                    offset = m.offset(),
                    user = vitals_schemas::trace::user(&row.user_id).as_str()
                );
                vitals_schemas::trace::continue_from(&span, Some(tp));
                row.trace = vitals_schemas::trace::of(&span);
                Some(span)
            })
            .collect();
        let mut wait = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let applied = loop {
            let committing = Instant::now();
            match rt.block_on(postgres::apply(&pool, &cfg.name, &batch)) {
                Ok(a) => {
                    metrics.commit_seconds.observe(committing.elapsed());
                    break a;
                }
                // PostgreSQL refuses a row itself (a NUL, an index row too large): the same on
                // every retry, so the rows at fault are found, dead-lettered, and the rest of the
                // batch is applied. One bad record never halts the other users.
                Err(e) if postgres::is_refused_data(&e) => {
                    let refused = match rt.block_on(postgres::refused_rows(&pool, &batch.rows)) {
                        Ok(r) => r,
                        Err(e) => {
                            warn!(error = %e, "finding the rows PostgreSQL refuses failed; retrying");
                            if !wait_or_stop(&stop, wait.next_wait()) {
                                return Ok(());
                            }
                            continue;
                        }
                    };
                    if refused.is_empty() {
                        warn!(error = %e, "PostgreSQL refused the batch but no row on its own; retrying");
                        if !wait_or_stop(&stop, wait.next_wait()) {
                            return Ok(());
                        }
                        continue;
                    }
                    let mut dead = Vec::new();
                    for (i, reason) in refused.iter().rev() {
                        let row = batch.rows.remove(*i);
                        let m = &msgs[row_msgs.remove(*i)];
                        // Its progress goes too: a refused row never counts as applied.
                        let of_row = Progress::of_row(&row);
                        if let Some(at) = batch.progress.iter().position(|p| *p == of_row) {
                            batch.progress.remove(at);
                        }
                        dead.push((m, "refused_by_database", reason.clone()));
                    }
                    dead_letter_all(&rt, &producer, &codec, &cfg, &metrics, &dead, &stop)?;
                }
                Err(e) => {
                    metrics.commit_retries.fetch_add(1, Ordering::Relaxed);
                    metrics.wait(format!("PostgreSQL: {e}"));
                    lag.measure(&consumer, generation.load(Ordering::Relaxed));
                    let d = wait.next_wait();
                    warn!(error = %e, retry_in_ms = d.as_millis() as u64, "committing the batch failed; retrying");
                    if !wait_or_stop(&stop, d) {
                        return Ok(()); // stopping: nothing of this batch was committed
                    }
                }
            }
        };
        metrics.wait_over();
        *vouches.lock().unwrap_or_else(|p| p.into_inner()) = work;
        positions.extend(batch.offsets.iter().map(|(k, o)| (k.clone(), *o)));
        commits.offer(&consumer, || std::mem::take(&mut positions));
        lag.applied(&batch.offsets, &msgs);
        lag.measure(&consumer, generation.load(Ordering::Relaxed));
        metrics.rows_applied.fetch_add(applied.len() as u64, Ordering::Relaxed);
        metrics.applied(&applied);
        metrics.batches_committed.fetch_add(1, Ordering::Relaxed);
        drop(spans); // committed: the rows' spans end
        if !applied.is_empty() {
            on_applied(&applied);
        }
    }
    Ok(())
}

/// The sink's lag and freshness age, measured by a thread of its own every second (the ends of
/// the assigned partitions fetched every [`LAG_EVERY`], each a broker round trip) from what the
/// poll thread last said of where it stands: so they go on growing while the poll thread waits
/// (PostgreSQL or the registry down, a rebalance blocked on reading the stored offsets).
struct LagWatch {
    seen: Arc<Mutex<Standing>>,
    measured: Option<Instant>,
    /// Ends the thread when the sink stops, however it returns.
    ended: Arc<AtomicBool>,
}

/// What the poll thread knows of where the sink stands.
#[derive(Default)]
struct Standing {
    /// The partitions assigned here, as last seen.
    assigned: Vec<(String, i32)>,
    /// Per partition: the next offset committed by this sink (or the first read since the last
    /// rebalance), and the Kafka timestamp (ms) of the newest record committed.
    next: BTreeMap<(String, i32), i64>,
    newest_ms: BTreeMap<(String, i32), i64>,
    /// Where the consumer stands, for partitions with nothing read since their assignment.
    position: BTreeMap<(String, i32), i64>,
    /// The rebalance generation `next` is of.
    generation: u64,
}

impl Drop for LagWatch {
    fn drop(&mut self) {
        self.ended.store(true, Ordering::Relaxed);
    }
}

impl LagWatch {
    fn start(config: &ClientConfig, stop: &Arc<AtomicBool>, by_topic: &ByTopic, metrics: &Arc<SinkMetrics>) -> Result<LagWatch, SinkError> {
        // A client of its own that never joins the group (it only asks for watermarks).
        let client: BaseConsumer = config.create()?;
        let w = LagWatch { seen: Arc::default(), measured: None, ended: Arc::new(AtomicBool::new(false)) };
        let (seen, stop, ended, metrics) = (Arc::clone(&w.seen), Arc::clone(stop), Arc::clone(&w.ended), Arc::clone(metrics));
        let projection_of: BTreeMap<String, String> = by_topic.iter().map(|(t, (p, _))| (t.clone(), p.key().to_owned())).collect();
        let done = move || stop.load(Ordering::Relaxed) || ended.load(Ordering::Relaxed);
        std::thread::Builder::new()
            .name("sink-lag".into())
            .spawn(move || {
                let mut highs: BTreeMap<(String, i32), i64> = BTreeMap::new();
                let mut fetched: Option<Instant> = None;
                // Per partition: when last seen at its end, and when first seen assigned here.
                let (mut at_end, mut assigned_at) = (BTreeMap::<(String, i32), f64>::new(), BTreeMap::<(String, i32), f64>::new());
                // With nothing assigned (starting, or an assignment waiting for PostgreSQL to
                // read its stored offsets): every partition of the projections, measured from the
                // group's committed offsets (the sink's informational commits, never ahead of
                // what PostgreSQL holds), so waiting data still ages.
                let (mut committed, mut every) = (BTreeMap::<(String, i32), i64>::new(), Vec::<(String, i32)>::new());
                while !done() {
                    let mut owned = seen.lock().unwrap_or_else(|e| e.into_inner()).assigned.clone();
                    let unassigned = owned.is_empty();
                    if unassigned {
                        owned = every.clone();
                    }
                    if fetched.is_none_or(|at| at.elapsed() >= LAG_EVERY) {
                        fetched = Some(Instant::now());
                        if unassigned {
                            every = all_partitions(&client, projection_of.keys());
                            owned = every.clone();
                            committed = group_committed(&client, &owned);
                        } else {
                            committed.clear();
                        }
                        for (topic, p) in &owned {
                            // A failed fetch keeps the last known end (never "caught up" for lack
                            // of an answer).
                            if let Ok((_, high)) = client.fetch_watermarks(topic.as_str(), *p, Duration::from_secs(5)) {
                                highs.insert((topic.clone(), *p), high);
                            }
                        }
                        highs.retain(|k, _| owned.contains(k));
                    }
                    let now = unix_now();
                    at_end.retain(|k, _| owned.contains(k));
                    assigned_at.retain(|k, _| owned.contains(k));
                    let (mut lag, mut behind) = (BTreeMap::new(), BTreeMap::new());
                    {
                        let st = seen.lock().unwrap_or_else(|e| e.into_inner());
                        for k in &owned {
                            assigned_at.entry(k.clone()).or_insert(now);
                            let Some(high) = highs.get(k).copied().filter(|h| *h >= 0) else { continue };
                            let Some(next) = st.next.get(k).or_else(|| st.position.get(k)).or_else(|| committed.get(k)).copied() else {
                                continue;
                            };
                            let behind_by = (high - next).max(0);
                            lag.insert(k.clone(), behind_by);
                            // (The dead-letter topic has a lag, not a projection's freshness.)
                            let Some(projection) = projection_of.get(&k.0) else { continue };
                            let key = (projection.clone(), k.1);
                            if behind_by == 0 {
                                at_end.insert(k.clone(), now);
                                behind.insert(key, None);
                                continue;
                            }
                            // No record still to apply is older than the newest one applied, nor
                            // than the last time the partition was seen at its end; neither known:
                            // since it was assigned here.
                            let since =
                                st.newest_ms.get(k).map(|ms| *ms as f64 / 1e3).into_iter().chain(at_end.get(k).copied()).reduce(f64::max);
                            behind.insert(key, Some(since.unwrap_or_else(|| assigned_at.get(k).copied().unwrap_or(now))));
                        }
                    }
                    *metrics.lag.lock().unwrap_or_else(|e| e.into_inner()) = lag;
                    *metrics.behind_since.lock().unwrap_or_else(|e| e.into_inner()) = behind;
                    let until = Instant::now() + Duration::from_secs(1);
                    while !done() && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .map_err(|e| SinkError::Assign(format!("starting the lag thread: {e}")))?;
        Ok(w)
    }

    /// A rebalance happened: what this instance had committed of a partition may no longer be
    /// where it stands (another instance may have committed further meanwhile).
    fn sync(st: &mut Standing, generation: u64) {
        if generation != st.generation {
            st.generation = generation;
            st.next.clear();
        }
    }

    /// A batch was polled: where a partition stands is at latest its first record read since
    /// the last rebalance (the consumer sought to the stored offset), until a commit says more.
    fn polled(&mut self, generation: u64, msgs: &[OwnedMessage]) {
        let mut st = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        Self::sync(&mut st, generation);
        for m in msgs {
            st.next.entry((m.topic().to_owned(), m.partition())).or_insert(m.offset());
        }
    }

    /// A batch committed: its next offsets, and the newest timestamp of its records.
    fn applied(&mut self, offsets: &BTreeMap<(String, i32), i64>, msgs: &[OwnedMessage]) {
        let mut st = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        st.next.extend(offsets.iter().map(|(k, o)| (k.clone(), *o)));
        for m in msgs {
            if let Some(ms) = m.timestamp().to_millis().filter(|ms| *ms > 0) {
                let at = st.newest_ms.entry((m.topic().to_owned(), m.partition())).or_insert(ms);
                *at = (*at).max(ms);
            }
        }
    }

    /// Tells the lag thread what is assigned here and where the consumer stands (at most once a
    /// second; the poll thread's own calls).
    fn measure(&mut self, consumer: &BaseConsumer<SeekContext>, generation: u64) {
        if self.measured.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        self.measured = Some(Instant::now());
        let Ok(assignment) = consumer.assignment() else { return };
        let owned: Vec<(String, i32)> = assignment.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        let position: BTreeMap<(String, i32), i64> = consumer
            .position()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut st = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        Self::sync(&mut st, generation);
        st.next.retain(|k, _| owned.contains(k));
        st.newest_ms.retain(|k, _| owned.contains(k));
        st.assigned = owned;
        st.position = position;
    }
}

/// Every partition of `topics`, as the broker's metadata says (none it cannot say).
fn all_partitions<'a>(client: &BaseConsumer, topics: impl Iterator<Item = &'a String>) -> Vec<(String, i32)> {
    let mut all = Vec::new();
    for t in topics {
        if let Ok(md) = client.fetch_metadata(Some(t), Duration::from_secs(5)) {
            for mt in md.topics() {
                all.extend(mt.partitions().iter().map(|p| (mt.name().to_owned(), p.id())));
            }
        }
    }
    all
}

/// The group's committed offsets of `parts` (0 where it committed none: the sink starts there).
fn group_committed(client: &BaseConsumer, parts: &[(String, i32)]) -> BTreeMap<(String, i32), i64> {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in parts {
        tpl.add_partition(t, *p);
    }
    match client.committed_offsets(tpl, Duration::from_secs(5)) {
        Ok(c) => c
            .elements()
            .iter()
            .map(|e| {
                let at = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                ((e.topic().to_owned(), e.partition()), at)
            })
            .collect(),
        Err(_) => BTreeMap::new(),
    }
}

/// The batch's rows (with the index of each row's record in `msgs`), progress markers and next
/// offsets; undecodable records are dead-lettered. `None` when the schema registry is
/// unavailable (nothing was written: the batch is decoded again).
#[allow(clippy::too_many_arguments)]
fn decode_batch(
    rt: &tokio::runtime::Handle,
    producer: &FutureProducer,
    codec: &Codec,
    cfg: &SinkConfig,
    by_topic: &ByTopic,
    metrics: &SinkMetrics,
    msgs: &[OwnedMessage],
    vouches: &mut Vouches,
    stop: &AtomicBool,
) -> Result<Option<(Batch, Vec<usize>)>, SinkError> {
    let mut batch = Batch::default();
    let mut row_msgs = Vec::new();
    let mut dead = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        batch.offsets.insert((m.topic().to_owned(), m.partition()), m.offset() + 1);
        if m.topic() == cfg.topics.dead_letter {
            match rt.block_on(dead_row(codec, by_topic, m)) {
                Ok(Some(d)) => batch.dead_letters.push(d),
                Ok(None) => {}
                Err(CodecError::Unavailable(e)) => {
                    warn!(error = %e, "schema registry unavailable; will retry the batch");
                    metrics.wait(format!("schema registry: {e}"));
                    return Ok(None);
                }
                // A dead letter is never dead-lettered again.
                Err(e) => {
                    warn!(partition = m.partition(), offset = m.offset(), error = %e, "a dead letter that does not decode: not counted")
                }
            }
            continue;
        }
        let Some(&(p, chained)) = by_topic.get(m.topic()) else { continue };
        match rt.block_on(decode(codec, p, m)) {
            Ok(Decoded::Row(r)) => {
                // Counted under the user the processor attributed it to (its header), as the
                // marker counts it.
                vouches.row(m.topic(), m.partition(), header(m, USER_HEADER).unwrap_or(&r.user_id), header(m, INTERVAL_HEADER));
                if chained {
                    let e = batch.chained.entry((r.user_id.clone(), m.topic().to_owned(), m.partition())).or_insert(m.offset());
                    *e = (*e).max(m.offset());
                }
                batch.progress.push(Progress::of_row(&r));
                batch.rows.push(r);
                row_msgs.push(i);
            }
            Ok(Decoded::Progress(pr)) => {
                batch.dead_letters.extend(announced_dead_letters(&cfg.topics, m, &pr));
                match vouches.marker(m.topic(), m.partition(), header(m, USER_HEADER).unwrap_or(&pr.user_id), header(m, VOUCH_HEADER)) {
                    Belief::Refused => {
                        // Its interval failed part-way (the processor retries it as a new attempt):
                        // what it says of the user's progress is not proven.
                        warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), user = %pr.user_id, vouch = header(m, VOUCH_HEADER), "a progress marker without every row it vouches for: not believed");
                        metrics.markers_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Belief::Vouched | Belief::Unvouched => batch.progress.push(pr),
                }
            }
            Err(CodecError::Unavailable(e)) => {
                warn!(error = %e, "schema registry unavailable; will retry the batch");
                metrics.wait(format!("schema registry: {e}"));
                return Ok(None);
            }
            Err(e) => {
                // A row that does not decode is still a row of its attempt: it was read, and its
                // dead letter makes the user's reads `degraded`.
                if header(m, PROGRESS_HEADER).is_none() {
                    if let Some(user) = header(m, USER_HEADER) {
                        vouches.row(m.topic(), m.partition(), user, header(m, INTERVAL_HEADER));
                    }
                }
                dead.push((m, "undecodable", e.to_string()))
            }
        }
    }
    if !dead_letter_all(rt, producer, codec, cfg, metrics, &dead, stop)? {
        return Ok(None);
    }
    batch.vouches = vouches.changes();
    Ok(Some((batch, row_msgs)))
}

/// Dead-letters `dead` (record, code, reason): every dead letter is encoded before any is
/// produced, and a registry that is unavailable is waited out (`false`: stopped meanwhile), so
/// a dependency failure never writes a dead letter twice or skips one.
fn dead_letter_all(
    rt: &tokio::runtime::Handle,
    producer: &FutureProducer,
    codec: &Codec,
    cfg: &SinkConfig,
    metrics: &SinkMetrics,
    dead: &[(&OwnedMessage, &str, String)],
    stop: &AtomicBool,
) -> Result<bool, SinkError> {
    if dead.is_empty() {
        return Ok(true);
    }
    let mut wait = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let encoded = loop {
        match dead.iter().map(|(m, code, reason)| encode_dead_letter(rt, codec, cfg, m, code, reason)).collect::<Result<Vec<_>, _>>() {
            Ok(e) => break e,
            Err(CodecError::Unavailable(e)) => {
                warn!(error = %e, "schema registry unavailable while dead-lettering; retrying");
                metrics.wait(format!("schema registry: {e}"));
                if !wait_or_stop(stop, wait.next_wait()) {
                    return Ok(false);
                }
            }
            Err(e) => return Err(SinkError::DeadLetter(e.to_string())),
        }
    };
    for ((m, code, reason), bytes) in dead.iter().zip(encoded) {
        warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), code, reason, "dead-lettered");
        let headers = vitals_schemas::dead_letter::headers(m.topic(), m.partition(), m.offset(), reason, user_of(m).as_deref())
            .into_iter()
            .fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: Some(v.as_str()) }));
        let key = m.key().map(<[u8]>::to_vec).unwrap_or_default();
        rt.block_on(producer.send(
            FutureRecord::to(&cfg.topics.dead_letter).partition(m.partition()).key(&key).payload(&bytes).headers(headers),
            Duration::from_secs(30),
        ))
        .map_err(|(e, _)| SinkError::DeadLetter(e.to_string()))?;
        metrics.dead_letter(&format!("sink:{}", cfg.name), code);
    }
    Ok(true)
}

/// The dead letter `m` as freshness sees it; `None` when it names no user or no projection.
async fn dead_row(codec: &Codec, by_topic: &ByTopic, m: &OwnedMessage) -> Result<Option<postgres::DeadRow>, CodecError> {
    let dl: DeadLetter = codec.decode(m.payload().unwrap_or_default()).await?;
    let Some(user) = user_of(m).or_else(|| m.key().map(|k| String::from_utf8_lossy(k).into_owned())) else { return Ok(None) };
    // `processor:<name>` withholds the record from that processor's projection; `sink:<name>`
    // from the projection of the topic it read.
    let projection = match dl.stage.split_once(':') {
        Some(("processor", name)) => Some(name.to_owned()),
        Some(("sink", _)) => by_topic.get(&dl.source_topic).map(|(p, _)| p.key().to_owned()),
        _ => None,
    };
    let Some(projection) = projection else { return Ok(None) };
    Ok(Some(postgres::DeadRow {
        dlq_topic: m.topic().to_owned(),
        dlq_partition: m.partition(),
        dlq_offset: m.offset(),
        user_id: user,
        projection,
        stage: dl.stage,
        code: dl.code,
        reason: dl.reason,
        source_topic: dl.source_topic,
        source_partition: dl.source_partition,
        source_offset: dl.source_offset,
    }))
}

/// The dead letters a processor's progress marker announces (header `vitals-dead-letters`:
/// `partition:offset:code,…`), recorded with the progress so that the read is `degraded`, never
/// `fresh`, from the moment the progress counts; the dead letters themselves fill them in.
fn announced_dead_letters(t: &Topics, m: &OwnedMessage, pr: &Progress) -> Vec<postgres::DeadRow> {
    let Some(h) = m.headers().and_then(|h| h.iter().find(|h| h.key == DEAD_LETTERS_HEADER)).and_then(|h| h.value) else {
        return Vec::new();
    };
    vitals_schemas::dead_letter::announced(&String::from_utf8_lossy(h))
        .into_iter()
        .map(|(p, o, code)| {
            let projection = pr.projection.key().to_owned();
            postgres::DeadRow {
                dlq_topic: t.dead_letter.clone(),
                dlq_partition: p,
                dlq_offset: o,
                user_id: pr.user_id.clone(),
                stage: format!("processor:{projection}"),
                projection,
                code,
                reason: "(announced by the progress marker; the dead letter has the reason)".into(),
                source_topic: String::new(),
                source_partition: -1,
                source_offset: -1,
            }
        })
        .collect()
}

/// The user a projection record belongs to, from the header every processor output carries.
fn user_of(m: &OwnedMessage) -> Option<String> {
    let h = m.headers()?.iter().find(|h| h.key == USER_HEADER)?;
    h.value.map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Waits `d` unless stopped first; `false` if stopped.
fn wait_or_stop(stop: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
    }
    !stop.load(Ordering::Relaxed)
}

fn encode_dead_letter(
    rt: &tokio::runtime::Handle,
    codec: &Codec,
    cfg: &SinkConfig,
    m: &OwnedMessage,
    code: &str,
    reason: &str,
) -> Result<Vec<u8>, CodecError> {
    let dl = dead_letter_of(m, format!("sink:{}", cfg.name), code, reason);
    rt.block_on(codec.encode(&cfg.topics.dead_letter, &dl))
}
