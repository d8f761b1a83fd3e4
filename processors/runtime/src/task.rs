//! The task: one processor over one input partition, without any I/O of its own. The Kafka
//! runtime ([`super::run`]) decodes records, hands them to [`Task::plan`], produces what it
//! returns, waits for every acknowledgement and then [`Task::commit`]s; the simulated cluster of
//! the takeover property test ([`super::sim`]) does the same over in-memory logs. Both run this
//! code, so what the property test proves is what runs on Kafka.
//!
//! Besides the processor's state, a task keeps what makes takeovers and zombies harmless
//! (`docs/processors.md`, "Takeovers and zombies"):
//! * the **emitted table**: the last value it emitted of every key (or nothing after a
//!   retraction), committed with the state, so it can answer "what is key k now" for any key;
//! * the **tail** of its own output partition: it reads what is written there, and every record
//!   written under an older epoch (a previous owner's work past this task's checkpoint, or a
//!   zombie's late write) is *pending* until the task's input position has reached the source
//!   offsets that record carries; then the task writes the key's current value again (its own
//!   newer value if it emitted one since, otherwise the emitted table's, or a retraction). So
//!   the newest record of every key by version is also the last by offset — what compaction
//!   keeps — and it is computed from at least as much input as anything written before it.
//! * a record written under a *newer* epoch means another task owns the partition now: this one
//!   is fenced and stops.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::warn;
use vitals_schemas::topics::Topics;
use vitals_schemas::{DeadLetter, SourceOffset};

use super::store::{Checkpoint, Overlay, Store, StoreError, UserState};

use vitals_processors::{Emitter, Input, Inputs, Invalid, Processor, State, Versioned};

/// A processor that re-arms a due timer in its own `on_timer` would otherwise spin forever.
const MAX_TIMERS_PER_RECORD: usize = 100_000;

/// The key of a user's progress marker. It starts with a NUL, which no output key does (output
/// keys start with the user id, and the edge refuses control characters in user ids), so a
/// marker can never share a key with a projection row, whatever the user ids contain.
pub fn progress_key(user: &str) -> String {
    format!("\u{0}progress|{user}")
}

/// What the task needs to know of the topics it reads.
#[derive(Debug, Clone)]
pub struct Lanes {
    pub topics: Topics,
    pub inputs: Inputs,
    /// The partition count of the input lanes, when known (the Kafka runtime): each lane record
    /// is then checked to be keyed by its user and on that user's partition.
    pub partitions: Option<i32>,
}

impl Lanes {
    /// Why a lane record breaks the producer contract (keyed by its user id, partitioned by
    /// Kafka's default murmur2 partitioner), or `None`. A record on the wrong partition would be
    /// processed by a task that does not own its user: it is dead-lettered instead.
    pub fn misrouted(&self, key: Option<&[u8]>, user: &str, partition: i32) -> Option<String> {
        let n = self.partitions?;
        match key {
            None => Some(format!("a lane record without a key: it must be keyed by its user id ({user:?})")),
            Some(k) if k != user.as_bytes() => {
                Some(format!("key {:?} is not the record's user {user:?}: lane records are keyed by user id", String::from_utf8_lossy(k)))
            }
            Some(k) => {
                let want = vitals_schemas::topics::partition_for(k, n);
                (want != partition).then(|| {
                    format!("user {user:?} belongs on partition {want} of {n} (murmur2, Kafka's default partitioner), not {partition}: the producer used another partitioner (librdkafka's default is CRC32; set partitioner=murmur2_random)")
                })
            }
        }
    }

    /// Lane order within an interval: HOT first, so a COLD backfill never delays recent data.
    fn rank(&self, topic: &str) -> u8 {
        let t = &self.topics;
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
}

/// One input record, decoded by the caller.
#[derive(Debug, Clone)]
pub struct InRecord {
    pub topic: String,
    pub offset: i64,
    /// The log timestamp (the edge's acknowledgement time): stream time.
    pub ts_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    /// The raw payload, kept for a dead letter.
    pub payload: Option<Vec<u8>>,
    /// The upload's trace context (the edge writes `traceparent` into every record).
    pub traceparent: Option<String>,
    pub body: InBody,
}

#[derive(Debug, Clone)]
pub enum InBody {
    /// An upstream processor's progress marker: not an input, only a position.
    Marker,
    /// Proven bad: it goes to the dead-letter topic with this reason.
    Undecodable(String),
    Input(Input),
}

/// What the task reads back of a record of its own output partition (from its headers).
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub offset: i64,
    pub key: String,
    pub user: String,
    pub epoch: i64,
    /// Which task incarnation wrote it (two owners can share an epoch after `processor_epochs`
    /// was lost: only the owner id tells their writes apart).
    pub owner: u64,
    /// The source offsets the record was computed from (input topic → next offset).
    pub source: BTreeMap<String, i64>,
    pub marker: bool,
}

/// A record of an epoch newer than the task's own, or of its own epoch by another owner, is in
/// its output partition: another task owns the partition (or shares its epoch, which only a lost
/// `processor_epochs` allows). Either way this task must stop; if the partition stays here it is
/// taken again under an epoch above everything in the partition.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("fenced: output offset {offset} was written under epoch {theirs} by another owner, this task runs under {ours}")]
pub struct Fenced {
    pub offset: i64,
    pub theirs: i64,
    pub ours: i64,
}

/// A key another owner wrote that this task must answer once its input has caught up.
#[derive(Debug, Clone)]
struct Pending {
    user: String,
    /// Answer only once every input topic's next offset is at least this.
    need: BTreeMap<String, i64>,
    /// The earliest output offset this entry stands for: a checkpoint's tail position never
    /// passes an unanswered record.
    first: i64,
}

/// The task's reading of its own output partition.
#[derive(Debug, Clone, Default)]
pub struct Tail {
    /// The next offset of the output partition to read.
    pub next: i64,
    /// The greatest epoch seen in the output partition (below `next`, and what the checkpoint
    /// carried from before it).
    pub max_epoch: i64,
    pending: BTreeMap<String, Pending>,
}

impl Tail {
    pub fn new(next: i64, max_epoch: i64) -> Tail {
        Tail { next, max_epoch, pending: BTreeMap::new() }
    }

    /// Reads one record of the output partition as the task (`epoch`, `owner`). Records below
    /// `next` were read already.
    pub fn read(&mut self, s: &Seen, epoch: i64, owner: u64) -> Result<(), Fenced> {
        if s.offset < self.next {
            return Ok(());
        }
        if s.epoch > epoch || (s.epoch == epoch && s.owner != owner) {
            return Err(Fenced { offset: s.offset, theirs: s.epoch, ours: epoch });
        }
        self.next = s.offset + 1;
        self.max_epoch = self.max_epoch.max(s.epoch);
        if s.marker || s.epoch == epoch {
            return Ok(());
        }
        let p =
            self.pending.entry(s.key.clone()).or_insert_with(|| Pending { user: s.user.clone(), need: BTreeMap::new(), first: s.offset });
        p.first = p.first.min(s.offset);
        for (t, o) in &s.source {
            let n = p.need.entry(t.clone()).or_insert(*o);
            *n = (*n).max(*o);
        }
        Ok(())
    }

    /// Keys waiting for an answer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Where a successor must start reading: the first unanswered record, or what is not read yet.
    fn resume_at(&self) -> i64 {
        self.pending.values().map(|p| p.first).min().unwrap_or(self.next).min(self.next)
    }

    fn due<'a>(&'a self, at: &'a BTreeMap<String, i64>) -> impl Iterator<Item = (&'a String, &'a Pending)> + 'a {
        self.pending.iter().filter(move |(_, p)| p.need.iter().all(|(t, o)| at.get(t).copied().unwrap_or(0) >= *o))
    }
}

/// One record the task wants produced, in order.
#[derive(Debug, Clone)]
pub enum Out<T> {
    /// A projection record (an upsert, or a retraction: `deleted = true`), stamped `seq`.
    Row {
        key: String,
        user: String,
        seq: i64,
        retraction: bool,
        value: T,
    },
    /// A user's progress marker, after every row of that user in this interval; `rows` of them
    /// (what it vouches for: [`vitals_schemas::vouch`]).
    Marker {
        key: String,
        user: String,
        seq: i64,
        rows: u64,
        value: T,
    },
    Dead {
        dead: DeadLetter,
        reason: String,
    },
}

/// The outcome of planning an interval: what to produce, then what to commit.
pub struct Planned<T> {
    pub records: Vec<Out<T>>,
    /// This attempt's name, unique per owner and attempt: on every row, and vouched for by the
    /// markers ([`vitals_schemas::vouch`]). A retried interval is a new attempt.
    pub interval: String,
    /// The source offsets (position) every record of this interval carries.
    pub source: Vec<SourceOffset>,
    pub epoch: i64,
    /// Records read (processed or skipped).
    pub read: u64,
    pub timers_fired: u64,
    /// Per user: the `traceparent` of the span of its newest input record in the interval, what
    /// its rows carry (an upload's trace goes on through them).
    pub traces: BTreeMap<String, String>,
    overlay: Overlay,
    cp: Checkpoint,
    answered: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record is not the next one of its lane: something was skipped.
    #[error("input gap on {topic}: expected offset {expected}, got {got}")]
    Gap { topic: String, expected: i64, got: i64 },
}

/// One task: its store, its checkpoint, its epoch and the tail of its output partition.
pub struct Task {
    pub store: Store,
    pub cp: Checkpoint,
    pub epoch: i64,
    /// This incarnation's id, written with every record (see [`Seen::owner`]).
    pub owner: u64,
    pub partition: i32,
    pub tail: Tail,
    /// The at-least-once baseline of the benchmark: state lives in this overlay, in memory only,
    /// and nothing is written to the store.
    unsaved: Option<Overlay>,
    /// Intervals planned by this incarnation (names each attempt).
    attempts: u64,
}

/// Where the emitted table keeps key `key` of `user` (a reserved key under the user's prefix).
fn emitted_key(user: &str, key: &str) -> String {
    format!("{user}{}{key}", super::store::EMITTED)
}

impl Task {
    /// A task over `store`, resuming from its checkpoint, reading its output partition from the
    /// checkpoint's tail position.
    pub fn new(store: Store, partition: i32, epoch: i64, owner: u64) -> Result<Task, StoreError> {
        let cp = store.checkpoint()?;
        let tail = Tail::new(cp.out_next, cp.max_epoch);
        Ok(Task { store, cp, epoch, owner, partition, tail, unsaved: None, attempts: 0 })
    }

    /// A fresh owner id (random: two incarnations never share one).
    pub fn new_owner_id() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
        h.finish()
    }

    /// The benchmark's at-least-once baseline: state in memory only, never committed.
    pub fn in_memory(mut self) -> Task {
        self.unsaved = Some(Overlay::default());
        self
    }

    /// The next offset to read of every input topic (0 for a topic never read).
    pub fn next_offset(&self, topic: &str) -> i64 {
        self.cp.offsets.get(topic).copied().unwrap_or(0)
    }

    /// Where the consumer starts reading `topic`: the checkpoint's next offset, or the beginning of
    /// a topic never read (a lane that does not start at 0 is then refused as a gap).
    pub fn start_offset(&self, topic: &str) -> rdkafka::Offset {
        self.cp.offsets.get(topic).map_or(rdkafka::Offset::Beginning, |o| rdkafka::Offset::Offset(*o))
    }

    /// Whether an interval with no input would produce something: answers that are due.
    pub fn has_due_answers(&self) -> bool {
        self.tail.due(&self.cp.offsets).next().is_some()
    }

    /// Reads records of the output partition (see [`Tail::read`]).
    pub fn observe(&mut self, seen: &Seen) -> Result<(), Fenced> {
        self.tail.read(seen, self.epoch, self.owner)
    }

    /// Runs the processor over `msgs` (records of this partition, in any order: they are sorted
    /// by lane and offset) against an overlay of the store, and plans the interval's records:
    /// rows, answers to pending keys, one progress marker per user touched, dead letters.
    /// Nothing is written: [`Task::commit`] does that once every record was acknowledged.
    pub fn plan<P>(
        &mut self,
        processor: &mut P,
        lanes: &Lanes,
        processor_name: &str,
        mut msgs: Vec<InRecord>,
    ) -> Result<Planned<P::Output>, TaskError>
    where
        P: Processor,
        P::Output: Versioned + Serialize + DeserializeOwned + Clone,
    {
        let p = self.partition;
        msgs.sort_by_key(|m| (lanes.rank(&m.topic), m.offset));
        let mut cp = self.cp.clone();
        let mut overlay = self.unsaved.as_mut().map(std::mem::take).unwrap_or_default();
        let mut outputs: BTreeMap<String, (String, Option<P::Output>)> = BTreeMap::new();
        // Users with input in this interval: each gets a progress marker after its outputs.
        let mut users: BTreeSet<String> = BTreeSet::new();
        let mut dead: Vec<(DeadLetter, String)> = Vec::new();
        let mut read = 0u64;
        let mut timers_fired = 0u64;
        let mut traces: BTreeMap<String, String> = BTreeMap::new();
        // Lanes are never compacted nor truncated: every record is the next one of its lane, or
        // one already read. (A chained input is a compacted output topic: gaps are compaction.)
        let contiguous = lanes.inputs == Inputs::Lanes;
        processor.begin_interval();
        for m in &msgs {
            read += 1;
            let next = cp.offsets.get(&m.topic).copied().unwrap_or(0);
            if m.offset < next {
                continue; // already in the checkpoint
            }
            if contiguous && m.offset > next {
                return Err(TaskError::Gap { topic: m.topic.clone(), expected: next, got: m.offset });
            }
            if let Some(ts) = m.ts_ms {
                cp.stream_time_ms = cp.stream_time_ms.max(ts);
            }
            // A record of an upload's trace is a hop of it (vitals_schemas::trace): its span is a
            // child of the span that wrote it, and the parent of what this interval writes for
            // its user. (Other records, e.g. another processor's markers, get a log span.)
            let span = match m.traceparent.as_deref() {
                Some(tp) => {
                    // (At trace level: a hop for the OpenTelemetry layer, not a log line's context
                    // unless RUST_LOG asks for `vitals::trace=trace`.)
                    let span = tracing::trace_span!(
                        target: vitals_schemas::trace::TARGET,
                        "process.record",
                        processor = processor_name,
                        topic = m.topic.as_str(),
                        partition = p,
                        offset = m.offset,
                        user = tracing::field::Empty
                    );
                    vitals_schemas::trace::continue_from(&span, Some(tp));
                    span
                }
                None => tracing::debug_span!("record", topic = m.topic.as_str(), partition = p, offset = m.offset),
            };
            let _entered = span.enter();
            let mut reject = |code: &str, reason: String| {
                let dl = DeadLetter {
                    source_topic: m.topic.clone(),
                    source_partition: p,
                    source_offset: m.offset,
                    stage: format!("processor:{processor_name}"),
                    code: code.to_owned(),
                    reason: reason.clone(),
                    key: m.key.clone(),
                    payload: m.payload.clone(),
                };
                dead.push((dl, reason));
            };
            let misrouted = match &m.body {
                InBody::Input(i) if contiguous => lanes.misrouted(m.key.as_deref(), i.user_id(), p),
                _ => None,
            };
            match &m.body {
                _ if misrouted.is_some() => reject("misrouted", misrouted.clone().unwrap_or_default()),
                InBody::Marker => {}
                InBody::Undecodable(e) => {
                    if let Some(k) = m.key.as_deref().filter(|_| contiguous) {
                        users.insert(String::from_utf8_lossy(k).into_owned()); // lanes are keyed by user
                    }
                    reject("undecodable", e.clone())
                }
                InBody::Input(input) => {
                    users.insert(input.user_id().to_owned());
                    if let Some(tp) = vitals_schemas::trace::of(&span) {
                        span.record("user", vitals_schemas::trace::user(input.user_id()).as_str());
                        traces.insert(input.user_id().to_owned(), tp);
                    }
                    // Units the shared rules refuse are dead-lettered one by one; the rest of the
                    // record goes on.
                    let filtered = vitals_processors::refuse_invalid_units(input);
                    let input = match &filtered {
                        Some((kept, refused)) => {
                            for r in refused {
                                reject(r.violation.code, r.reason());
                            }
                            kept
                        }
                        None => input,
                    };
                    // A rejected record leaves no trace: its state writes and outputs are dropped.
                    let mut collect = Collect { user: input.user_id(), out: BTreeMap::new() };
                    let mut state = UserState::at(&self.store, &mut overlay, input.user_id(), cp.stream_time_ms);
                    let result = processor.process(input, &mut state, &mut collect);
                    state.check()?;
                    match result {
                        Ok(()) => outputs.extend(collect.out),
                        Err(Invalid { code, reason }) => {
                            state.rollback();
                            reject(code, reason);
                        }
                    }
                }
            }
            cp.offsets.insert(m.topic.clone(), m.offset + 1);
            // Timers that stream time has now reached fire, earliest first, before the next record.
            let mut fired = 0usize;
            while let Some((user, name)) = overlay.next_due_timer(&self.store, cp.stream_time_ms)? {
                let mut state = UserState::at(&self.store, &mut overlay, &user, cp.stream_time_ms);
                state.cancel_timer(&name);
                let mut collect = Collect { user: &user, out: BTreeMap::new() };
                processor.on_timer(&user, &name, &mut state, &mut collect);
                state.check()?;
                users.insert(user.clone());
                outputs.extend(collect.out);
                fired += 1;
                timers_fired += 1;
                if fired > MAX_TIMERS_PER_RECORD {
                    warn!(partition = p, "more than {MAX_TIMERS_PER_RECORD} timers due at once; the rest fire after the next record");
                    break;
                }
            }
        }
        // Work the processor deferred to the end of the interval (each key once).
        for user in &users {
            let mut state = UserState::at(&self.store, &mut overlay, user, cp.stream_time_ms);
            let mut collect = Collect { user, out: BTreeMap::new() };
            processor.end_interval(user, &mut state, &mut collect);
            state.check()?;
            outputs.extend(collect.out);
        }
        // Keys other owners wrote, now that this task's input has caught up with what they had
        // read: a key emitted in this interval is answered by that emission (it comes later in
        // the partition, with this epoch); any other key gets its current value again.
        let mut answered = Vec::new();
        for (key, pend) in self.tail.due(&cp.offsets) {
            answered.push(key.clone());
            if outputs.contains_key(key) {
                continue;
            }
            let held = overlay.get(&self.store, &emitted_key(&pend.user, key))?;
            let value = match held {
                Some(bytes) => Some(
                    serde_json::from_slice::<P::Output>(&bytes)
                        .map_err(|e| StoreError::from_message(format!("emitted value of {key:?} does not deserialise: {e}")))?,
                ),
                None => None,
            };
            users.insert(pend.user.clone());
            outputs.insert(key.clone(), (pend.user.clone(), value));
        }
        let source: Vec<SourceOffset> = lanes
            .inputs
            .topics(&lanes.topics)
            .into_iter()
            .map(|topic| {
                let next_offset = cp.offsets.get(&topic).copied().unwrap_or(0);
                SourceOffset { topic, partition: p, next_offset }
            })
            .collect();
        let mut records = Vec::new();
        let mut rows_of: BTreeMap<String, u64> = BTreeMap::new();
        for (key, (user, value)) in outputs {
            // The emitted table: what this key is now, for answers after a takeover.
            let ek = emitted_key(&user, &key);
            match &value {
                Some(v) => {
                    overlay.put(ek, serde_json::to_vec(v).map_err(|e| StoreError::from_message(format!("serialising an output: {e}")))?)
                }
                None => overlay.remove(ek),
            }
            cp.seq += 1;
            let retraction = value.is_none();
            let mut v = value.unwrap_or_else(|| P::Output::tombstone(&user, &key));
            v.stamp(self.epoch, cp.seq, source.clone());
            *rows_of.entry(user.clone()).or_default() += 1;
            records.push(Out::Row { key, user, seq: cp.seq, retraction, value: v });
        }
        // Progress markers: "everything of this user up to `source` is processed, and its
        // outputs are before this record in the partition".
        for user in users {
            cp.seq += 1;
            let key = progress_key(&user);
            let mut v = P::Output::tombstone(&user, &key);
            v.stamp(self.epoch, cp.seq, source.clone());
            let rows = rows_of.get(&user).copied().unwrap_or(0);
            records.push(Out::Marker { key, user, seq: cp.seq, rows, value: v });
        }
        for (dead, reason) in dead {
            records.push(Out::Dead { dead, reason });
        }
        self.attempts += 1;
        let interval = format!("{:x}.{}", self.owner, self.attempts);
        Ok(Planned { records, interval, source, epoch: self.epoch, read, timers_fired, traces, overlay, cp, answered })
    }

    /// Makes a planned interval the checkpoint (call it only once every record it planned was
    /// acknowledged): state, emitted table, next offsets, output position and the tail position a
    /// successor must read from, in one local transaction.
    pub fn commit<T>(&mut self, planned: Planned<T>) -> Result<(), StoreError> {
        let Planned { overlay, mut cp, answered, .. } = planned;
        for k in answered {
            self.tail.pending.remove(&k);
        }
        cp.out_next = self.tail.resume_at();
        cp.max_epoch = self.tail.max_epoch.max(cp.max_epoch).max(self.epoch);
        match &mut self.unsaved {
            Some(o) => *o = overlay,
            None => self.store.commit(overlay, &cp)?,
        }
        self.cp = cp;
        Ok(())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use vitals_processors::rollup_day::{Config, RollupDayProcessor};
    use vitals_schemas::{Lane, Sample, SampleBatch, SourceKind};

    fn lanes() -> Lanes {
        Lanes { topics: super::super::sim::topics(), inputs: Inputs::Lanes, partitions: None }
    }

    fn hr(id: &str, at_ms: i64, value: f64) -> Input {
        let s = Sample {
            source: "watch".into(),
            source_kind: SourceKind::Watch,
            source_record_id: id.into(),
            metric: "heart_rate".into(),
            start_ms: at_ms,
            end_ms: at_ms,
            value,
            unit: "count/min".into(),
            category: None,
            time_zone: "UTC".into(),
            version: 1,
            metadata: Default::default(),
        };
        Input::Samples(SampleBatch {
            request_id: "r".into(),
            user_id: "u".into(),
            received_at_ms: at_ms,
            lane: Lane::Hot,
            samples: vec![s],
        })
    }

    fn rec(topic: &str, offset: i64, input: Input) -> InRecord {
        InRecord {
            topic: topic.into(),
            offset,
            ts_ms: Some(offset),
            key: None,
            payload: None,
            traceparent: None,
            body: InBody::Input(input),
        }
    }

    fn task(name: &str) -> (Task, PathBuf) {
        let dir = std::env::temp_dir().join(format!("vitals-task-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (Task::new(Store::open(&dir.join("t.redb")).unwrap(), 0, 1, 7).unwrap(), dir)
    }
    use std::path::PathBuf;

    const NOON: i64 = 1_792_756_800_000; // 2026-10-23T12:00:00Z

    #[test]
    fn a_state_value_that_does_not_deserialise_stops_the_task_and_nothing_is_emitted() {
        let (mut task, dir) = task("corrupt");
        let hot = lanes().topics.hot;
        let mut p = RollupDayProcessor::new(Config::default());
        let planned = task.plan(&mut p, &lanes(), "t", vec![rec(&hot, 0, hr("a", NOON, 60.0))]).unwrap();
        assert!(planned.records.iter().any(|r| matches!(r, Out::Row { retraction: false, .. })));
        task.commit(planned).unwrap();
        // Every state entry of sample `a` becomes garbage (a torn write, a bad migration): its
        // identity and the day that holds it.
        let keys: Vec<String> = task
            .store
            .scan("u")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.ends_with("\u{1f}a") || k.contains("dheart_rate\u{1f}"))
            .collect();
        assert!(!keys.is_empty(), "found sample a's state");
        for k in &keys {
            task.store.put_raw_for_test(k, b"{not json").unwrap();
        }
        let before = task.cp.clone();
        let err = task.plan(&mut p, &lanes(), "t", vec![rec(&hot, 1, hr("b", NOON + 60_000, 70.0))]).err().expect("the task stops");
        assert!(err.to_string().contains("does not deserialise"), "{err}");
        assert_eq!(task.cp, before, "nothing committed");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_lane_record_past_the_next_offset_is_a_gap_not_a_skip() {
        let (mut task, dir) = task("gap");
        let hot = lanes().topics.hot;
        let mut p = RollupDayProcessor::new(Config::default());
        let err = task.plan(&mut p, &lanes(), "t", vec![rec(&hot, 5, hr("a", NOON, 60.0))]).err().expect("a gap");
        assert!(matches!(err, TaskError::Gap { expected: 0, got: 5, .. }), "{err}");
        // Records already in the checkpoint are skipped, the next one is taken.
        let planned = task.plan(&mut p, &lanes(), "t", vec![rec(&hot, 0, hr("a", NOON, 60.0))]).unwrap();
        task.commit(planned).unwrap();
        let planned = task.plan(&mut p, &lanes(), "t", vec![rec(&hot, 0, hr("a", NOON, 60.0)), rec(&hot, 1, hr("b", NOON, 61.0))]).unwrap();
        assert_eq!(planned.read, 2);
        task.commit(planned).unwrap();
        assert_eq!(task.next_offset(&hot), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Issue 9, item 8: records of another producer with another partitioner (or keyed by
    /// something else than the user) were processed silently by a task that does not own the user.
    #[test]
    fn a_lane_record_off_its_users_partition_or_key_is_dead_lettered() {
        let (task, dir) = task("misrouted");
        let lanes = Lanes { partitions: Some(6), ..lanes() };
        let hot = lanes.topics.hot.clone();
        let mut p = RollupDayProcessor::new(Config::default());
        let home = vitals_schemas::topics::partition_for(b"u", 6);
        let (mut task, dir) = if home == 0 {
            (task, dir)
        } else {
            drop(task);
            let _ = std::fs::remove_dir_all(&dir);
            (Task::new(Store::open(&dir.join("t.redb")).unwrap(), home, 1, 7).unwrap(), dir)
        };
        let keyed = |offset: i64, key: Option<&str>, at: i64| InRecord {
            key: key.map(|k| k.as_bytes().to_vec()),
            ..rec(&hot, offset, hr(&format!("s{offset}"), at, 60.0))
        };
        let planned =
            task.plan(&mut p, &lanes, "t", vec![keyed(0, Some("u"), NOON), keyed(1, Some("v"), NOON), keyed(2, None, NOON)]).unwrap();
        let dead: Vec<&str> = planned
            .records
            .iter()
            .filter_map(|r| match r {
                Out::Dead { dead, .. } => Some(dead.code.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(dead, ["misrouted", "misrouted"]);
        task.commit(planned).unwrap();
        // The same user's record on another partition.
        let other = (home + 1) % 6;
        let (mut wrong, dir2) = {
            let d = dir.join("other");
            (
                Task::new(
                    Store::open(&{
                        std::fs::create_dir_all(&d).unwrap();
                        d.join("t.redb")
                    })
                    .unwrap(),
                    other,
                    1,
                    7,
                )
                .unwrap(),
                d,
            )
        };
        let planned = wrong.plan(&mut p, &lanes, "t", vec![keyed(0, Some("u"), NOON)]).unwrap();
        assert!(
            matches!(&planned.records[..], [Out::Dead { dead, reason }] if dead.code == "misrouted" && reason.contains(&format!("partition {home}"))),
            "{:?}",
            planned.records.len()
        );
        let _ = std::fs::remove_dir_all(dir2);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn seen(offset: i64, key: &str, epoch: i64, hot: i64) -> Seen {
        Seen {
            offset,
            key: key.into(),
            user: "u".into(),
            epoch,
            owner: 1,
            source: BTreeMap::from([(lanes().topics.hot, hot)]),
            marker: false,
        }
    }

    #[test]
    fn an_older_owners_key_is_answered_once_the_input_has_caught_up_and_not_before() {
        let (mut task, dir) = task("answer");
        task.epoch = 3;
        let hot = lanes().topics.hot;
        let mut p = RollupDayProcessor::new(Config::default());
        // An older owner wrote a key this task never emitted, computed from 2 HOT records.
        let k = "u|heart_rate|2026-10-24";
        task.observe(&seen(7, k, 2, 2)).unwrap();
        assert_eq!(task.observe(&seen(8, k, 4, 2)), Err(Fenced { offset: 8, theirs: 4, ours: 3 }), "a newer epoch fences");
        assert_eq!(
            task.observe(&seen(8, k, 3, 2)),
            Err(Fenced { offset: 8, theirs: 3, ours: 3 }),
            "so does another owner of the same epoch"
        );
        task.observe(&Seen { owner: 7, ..seen(8, k, 3, 2) }).unwrap();
        assert!(!task.has_due_answers());
        let planned = task.plan(&mut p, &lanes(), "t", vec![rec(&hot, 0, hr("a", NOON, 60.0))]).unwrap();
        assert!(!planned.records.iter().any(|r| matches!(r, Out::Row { key, .. } if key == k)), "not answered from less input");
        task.commit(planned).unwrap();
        assert_eq!(task.cp.out_next, 7, "a successor reads the unanswered record again");
        let planned = task.plan(&mut p, &lanes(), "t", vec![rec(&hot, 1, hr("b", NOON, 61.0))]).unwrap();
        let answer: Vec<&Out<_>> = planned.records.iter().filter(|r| matches!(r, Out::Row { key, .. } if key == k)).collect();
        assert!(matches!(answer[..], [Out::Row { retraction: true, .. }]), "answered with its current value: nothing ({answer:?})");
        task.commit(planned).unwrap();
        assert_eq!((task.tail.pending(), task.cp.out_next, task.cp.max_epoch), (0, 9, 3));
        let _ = std::fs::remove_dir_all(dir);
    }
}
