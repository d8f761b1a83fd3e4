//! What an operator reads of a running processor: counters kept by the runtime, rendered in the
//! Prometheus text format by whoever serves them (`vitals process` on `processors.metrics_listen`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct RuntimeMetrics {
    /// Input records read and handled (processed, skipped as already checkpointed, or DLQ'd).
    pub records_in: AtomicU64,
    /// Projection records produced (upserts and retractions), progress markers apart.
    pub outputs: AtomicU64,
    pub progress_markers: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub timers_fired: AtomicU64,
    /// Tasks that found a newer epoch in their output partition and stopped.
    pub fenced: AtomicU64,
    /// Checkpoints committed, and the time spent committing them.
    pub commits: AtomicU64,
    pub commit_micros: AtomicU64,
    /// Time spent waiting for the broker to acknowledge outputs.
    pub ack_wait_micros: AtomicU64,
    /// Per (input topic, partition): records behind the partition's end, as last measured.
    pub lag: Mutex<BTreeMap<(String, i32), i64>>,
    /// Partitions paused because a dependency (the schema registry) failed, and why: their
    /// records wait, nothing is skipped or dead-lettered; each is retried with backoff.
    pub paused: Mutex<BTreeMap<i32, String>>,
    /// Intervals put back because a dependency failed.
    pub dependency_retries: AtomicU64,
}

impl RuntimeMetrics {
    pub fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Partition `p` waits for a dependency: `reason` says which and why.
    pub fn pause(&self, p: i32, reason: String) {
        self.paused.lock().unwrap_or_else(|e| e.into_inner()).insert(p, reason);
    }

    /// Partition `p` runs again (or is no longer owned here).
    pub fn resume(&self, p: i32) {
        self.paused.lock().unwrap_or_else(|e| e.into_inner()).remove(&p);
    }

    /// Why the processor is not ready: the paused partitions and their reasons (`None`: ready).
    pub fn not_ready(&self) -> Option<String> {
        let paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_empty() {
            return None;
        }
        Some(paused.iter().map(|(p, r)| format!("partition {p} paused: {r}")).collect::<Vec<_>>().join("; "))
    }

    /// Appends this processor's metrics (label `processor`) in the Prometheus text format.
    pub fn render(&self, processor: &str, out: &mut String) {
        let c = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP vitals_processor_{name} {help}\n# TYPE vitals_processor_{name} counter");
            let _ = writeln!(out, "vitals_processor_{name}{{processor=\"{processor}\"}} {}", v.load(Ordering::Relaxed));
        };
        c(out, "records_in_total", "Input records handled.", &self.records_in);
        c(out, "outputs_total", "Projection records produced (upserts and retractions).", &self.outputs);
        c(out, "progress_markers_total", "Per-user progress markers produced.", &self.progress_markers);
        c(out, "dead_lettered_total", "Input records sent to the dead-letter topic.", &self.dead_lettered);
        c(out, "timers_fired_total", "Stream-time timers fired.", &self.timers_fired);
        c(out, "tasks_fenced_total", "Tasks stopped because a newer owner wrote to their output partition.", &self.fenced);
        c(out, "checkpoints_total", "Checkpoints committed (state + offsets + output position).", &self.commits);
        c(out, "checkpoint_commit_microseconds_total", "Time spent committing checkpoints.", &self.commit_micros);
        c(out, "ack_wait_microseconds_total", "Time spent waiting for output acknowledgements.", &self.ack_wait_micros);
        c(out, "dependency_retries_total", "Intervals put back and retried because a dependency (the schema registry) failed.", &self.dependency_retries);
        let paused = self.paused.lock().unwrap_or_else(|e| e.into_inner()).len();
        let _ = writeln!(out, "# HELP vitals_processor_paused_partitions Partitions waiting for a failed dependency (see /readyz for why).\n# TYPE vitals_processor_paused_partitions gauge");
        let _ = writeln!(out, "vitals_processor_paused_partitions{{processor=\"{processor}\"}} {paused}");
        let _ = writeln!(out, "# HELP vitals_processor_lag_records Records behind the end of each input partition owned here.\n# TYPE vitals_processor_lag_records gauge");
        for ((topic, p), lag) in self.lag.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "vitals_processor_lag_records{{processor=\"{processor}\",topic=\"{topic}\",partition=\"{p}\"}} {lag}");
        }
    }
}
