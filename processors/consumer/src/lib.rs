//! What the exactly-once runtime (`vitals-runtime`) and the projection sink (`vitals-sinks`)
//! share of consuming Kafka, written once: the batching poll ([`poll_batch`]), the
//! informational offset commits that let standard lag tools see their groups
//! ([`InformationalCommits`]) and the backoff of a failed dependency ([`Backoff`]); and the dead
//! letter of a consumed record ([`dead_letter_of`]: the sink's; the runtime's task builds its own
//! from the decoded record it refuses). Each keeps its own offsets (the runtime in its
//! task stores, the sink in PostgreSQL) and its own rebalance callback: what they do on
//! assignment differs by design.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::warn;
use vitals_schemas::DeadLetter;

/// How often the offsets are committed to the group (informational only).
pub const COMMIT_EVERY: Duration = Duration::from_secs(5);

/// Polls up to `max` records for at most `max_wait`. When a rebalance ran inside a `poll` (the
/// `generation` moved), what was polled before it is dropped: it may belong to a task that was
/// replaced (restored from a snapshot behind those records, or started empty), and the new
/// assignment restarted every partition at its task's checkpoint, so those records come again.
pub fn poll_batch<M>(
    mut poll: impl FnMut(Duration) -> Option<Result<M, KafkaError>>,
    current: impl Fn() -> u64,
    generation: &mut u64,
    max: usize,
    max_wait: Duration,
) -> Vec<M> {
    let mut batch = Vec::new();
    let deadline = Instant::now() + max_wait;
    while batch.len() < max {
        // Wait (up to `max_wait`) only for the first record; then take what the consumer
        // already holds and stop when its queue is drained: an idle pipeline answers at once,
        // a loaded one still batches (its queue refills faster than an interval takes).
        let left = if batch.is_empty() { deadline.saturating_duration_since(Instant::now()) } else { Duration::ZERO };
        if left.is_zero() && batch.is_empty() {
            break;
        }
        let polled = poll(left);
        let now = current();
        if now != *generation {
            *generation = now;
            batch.clear();
        }
        match polled {
            Some(Ok(m)) => batch.push(m),
            Some(Err(e)) => warn!(error = %e, "consumer error"),
            None => break,
        }
    }
    batch
}

/// The offsets a consumer has made durable elsewhere, committed to its group now and then (idle
/// or not) so that `kafka-consumer-groups --describe` and `vitals offsets show` see the group.
/// Never read back: the runtime resumes from its checkpoints, the sink from `sink_offsets`.
pub struct InformationalCommits {
    at: Instant,
    committed: BTreeMap<(String, i32), i64>,
}

impl Default for InformationalCommits {
    fn default() -> Self {
        InformationalCommits { at: Instant::now(), committed: BTreeMap::new() }
    }
}

impl InformationalCommits {
    /// Commits `positions` (next offsets) when [`COMMIT_EVERY`] has passed since the last
    /// commit and they changed.
    pub fn offer<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, positions: impl FnOnce() -> BTreeMap<(String, i32), i64>) {
        if self.at.elapsed() < COMMIT_EVERY {
            return;
        }
        self.at = Instant::now();
        let now = positions();
        if now == self.committed || now.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &now {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
            tracing::debug!(error = %e, "informational offset commit");
        }
        self.committed = now;
    }
}

/// The dead letter of consumed record `m`, refused at `stage` for `code` (`reason` in words):
/// its source, and its original key and bytes for `vitals dlq replay`.
pub fn dead_letter_of(m: &OwnedMessage, stage: String, code: &str, reason: &str) -> DeadLetter {
    DeadLetter {
        source_topic: m.topic().to_owned(),
        source_partition: m.partition(),
        source_offset: m.offset(),
        stage,
        code: code.to_owned(),
        reason: reason.to_owned(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
    }
}

/// Waits after a failed dependency: `first`, doubling up to `max`; reset by a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max, next: first }
    }
    /// The wait now; the next one doubles.
    pub fn next_wait(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    pub fn reset(&mut self) {
        self.next = self.first;
    }
    /// Whether a failure has made it wait longer than at first.
    pub fn is_backing_off(&self) -> bool {
        self.next != self.first
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// Records 0..3 are polled for the old task; the rebalance callback runs inside the poll that
    /// returns record 10 (the new task's first, from its checkpoint): 0..3 must not reach it.
    #[test]
    fn records_polled_before_a_rebalance_are_dropped_and_those_after_kept() {
        let generation = Cell::new(1u64);
        let mut script = vec![(0, false), (1, false), (2, false), (10, true), (11, false)].into_iter();
        let poll = |_| {
            let (m, rebalance) = script.next()?;
            if rebalance {
                generation.set(generation.get() + 1);
            }
            Some(Ok(m))
        };
        let mut seen = 1;
        let batch = poll_batch(poll, || generation.get(), &mut seen, 100, Duration::from_secs(5));
        assert_eq!(batch, vec![10, 11]);
        assert_eq!(seen, 2);
    }

    /// Only the first record is waited for: then the consumer's queue is drained without waiting
    /// (an idle pipeline answers at once), and batching continues while records are queued.
    #[test]
    fn an_interval_waits_for_its_first_record_only_and_ends_when_the_queue_is_drained() {
        let waits = std::cell::RefCell::new(Vec::new());
        let mut script = vec![Some(1), Some(2), Some(3), None, Some(4)].into_iter();
        let poll = |d: Duration| {
            waits.borrow_mut().push(d);
            script.next().flatten().map(Ok)
        };
        let mut seen = 1;
        let batch = poll_batch(poll, || 1, &mut seen, 100, Duration::from_secs(5));
        assert_eq!(batch, vec![1, 2, 3], "the interval ends when the queue is drained");
        let waits = waits.into_inner();
        assert!(waits[0] > Duration::from_secs(4), "the first poll waits for a record: {waits:?}");
        assert!(waits[1..].iter().all(|d| d.is_zero()), "later polls only take what is queued: {waits:?}");
        // Under load the queue holds more than an interval: batching stops at `max`.
        let mut queued = 0..;
        let batch = poll_batch(|_| queued.next().map(Ok), || 1, &mut seen, 10, Duration::from_secs(5));
        assert_eq!(batch.len(), 10);
    }

    #[test]
    fn a_backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        let waits: Vec<u128> = (0..5).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, vec![200, 400, 800, 1000, 1000]);
        assert!(b.is_backing_off());
        b.reset();
        assert_eq!(b.next_wait(), Duration::from_millis(200));
    }
}
