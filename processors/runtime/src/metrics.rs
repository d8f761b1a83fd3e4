//! What an operator reads of a running processor: counters kept by the runtime, rendered in the
//! Prometheus text format by whoever serves them (`vitals process` on `processors.metrics_listen`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use vitals_schemas::dead_letter::{label, DeadLetterCounts};
use vitals_schemas::exposition::{unix_now, Histogram};

use super::snapshot::SnapshotMetrics;

#[derive(Debug, Default)]
pub struct RuntimeMetrics {
    /// Input records read and handled (processed, skipped as already checkpointed, or DLQ'd).
    pub records_in: AtomicU64,
    /// Projection records produced (upserts and retractions), progress markers apart.
    pub outputs: AtomicU64,
    pub progress_markers: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// The same dead letters by (stage, code): `vitals_dead_letters_total`.
    pub dead_letters: DeadLetterCounts,
    pub timers_fired: AtomicU64,
    /// Tasks that found a newer epoch in their output partition and stopped.
    pub fenced: AtomicU64,
    /// Checkpoints committed, and how long each commit took.
    pub commits: AtomicU64,
    pub commit_seconds: Histogram,
    /// How long each interval waited for the broker to acknowledge its outputs.
    pub ack_wait_seconds: Histogram,
    /// Per (input topic, partition): records behind the partition's end, as last measured.
    pub lag: Mutex<BTreeMap<(String, i32), i64>>,
    /// Per owned (input topic, partition): the checkpointed next offset (every second), and
    /// the partition's end when `lag` was measured: what a replay's progress display reads.
    pub positions: Mutex<BTreeMap<(String, i32), i64>>,
    pub ends: Mutex<BTreeMap<(String, i32), i64>>,
    /// Per (input topic, partition) owned here: the Kafka timestamp (ms) of the newest record
    /// handled, kept by the intervals; what the freshness age is measured from.
    pub handled_ms: Mutex<BTreeMap<(String, i32), i64>>,
    /// Per (input topic, partition) owned here, as of the last lag measurement: `None` when the
    /// partition is read to its end; otherwise the Unix time no record still to handle can be
    /// older than (the newer of the newest handled record and the last time the partition was
    /// seen at its end). Freshness age = now − this.
    pub behind_since: Mutex<BTreeMap<(String, i32), Option<f64>>>,
    /// Per task owned here, with snapshots on: `None` while its newest published snapshot is of
    /// its checkpoint (or there is nothing to snapshot yet); otherwise the Unix time of that
    /// snapshot (or of the task's start, when it has none). Snapshot age = now − this: the
    /// processing a takeover would redo.
    pub snapshot_behind_since: Mutex<BTreeMap<i32, Option<f64>>>,
    /// Per (input topic, partition) taken here: the checkpoint's next offset it started from
    /// (what a restarted replay shows it resumed at).
    pub taken: Mutex<BTreeMap<(String, i32), i64>>,
    /// Partitions paused because a dependency (the schema registry) failed, and why: their
    /// records wait, nothing is skipped or dead-lettered; each is retried with backoff.
    pub paused: Mutex<BTreeMap<i32, String>>,
    /// Intervals put back because a dependency failed.
    pub dependency_retries: AtomicU64,
    /// The snapshot counters, when snapshots are on (set once by whoever builds the runtime).
    pub snapshots: std::sync::OnceLock<std::sync::Arc<SnapshotMetrics>>,
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

    /// An interval of partition `p` committed: the newest record's timestamp (ms) per input topic.
    pub fn handled(&self, p: i32, newest: BTreeMap<String, i64>) {
        if newest.is_empty() {
            return;
        }
        let mut handled = self.handled_ms.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, ms) in newest {
            let at = handled.entry((topic, p)).or_insert(ms);
            *at = (*at).max(ms);
        }
    }

    /// One record sent to the dead-letter topic by `stage` with reason `code`.
    pub fn dead_letter(&self, stage: &str, code: &str) {
        self.add(&self.dead_lettered, 1);
        self.dead_letters.add(stage, code);
    }

    /// Appends this processor's metrics (label `processor`) in the Prometheus text format.
    /// Only for a single processor: several go through [`render_all`], which writes each
    /// family's `# HELP`/`# TYPE` once as the text format requires.
    pub fn render(&self, processor: &str, out: &mut String) {
        render_all(&[(processor, self)], out)
    }
}

/// The metrics of every processor of this process, each family once with one sample per processor.
pub fn render_all(all: &[(&str, &RuntimeMetrics)], out: &mut String) {
    let c = |out: &mut String, name: &str, help: &str, v: fn(&RuntimeMetrics) -> &AtomicU64| {
        let _ = writeln!(out, "# HELP vitals_processor_{name} {help}\n# TYPE vitals_processor_{name} counter");
        for (processor, m) in all {
            let _ = writeln!(out, "vitals_processor_{name}{{processor=\"{}\"}} {}", label(processor), v(m).load(Ordering::Relaxed));
        }
    };
    c(out, "records_in_total", "Input records handled.", |m| &m.records_in);
    c(out, "outputs_total", "Projection records produced (upserts and retractions).", |m| &m.outputs);
    c(out, "progress_markers_total", "Per-user progress markers produced.", |m| &m.progress_markers);
    c(out, "dead_lettered_total", "Input records sent to the dead-letter topic.", |m| &m.dead_lettered);
    c(out, "timers_fired_total", "Stream-time timers fired.", |m| &m.timers_fired);
    c(out, "tasks_fenced_total", "Tasks stopped because a newer owner wrote to their output partition.", |m| &m.fenced);
    c(out, "checkpoints_total", "Checkpoints committed (state + offsets + output position).", |m| &m.commits);
    let h = |out: &mut String, name: &str, help: &str, v: fn(&RuntimeMetrics) -> &Histogram| {
        let name = format!("vitals_processor_{name}");
        Histogram::render_header(out, &name, help);
        for (processor, m) in all {
            v(m).render_samples(out, &name, &format!("processor=\"{}\"", label(processor)));
        }
    };
    h(out, "checkpoint_commit_seconds", "How long committing a checkpoint (state + offsets + output position) took.", |m| {
        &m.commit_seconds
    });
    h(out, "ack_wait_seconds", "How long an interval waited for the broker to acknowledge its outputs.", |m| &m.ack_wait_seconds);
    let now = unix_now();
    let _ = writeln!(out, "# HELP vitals_processor_freshness_age_seconds How old the oldest input record still to handle may be, over the partitions owned here (0: every one read to its end).\n# TYPE vitals_processor_freshness_age_seconds gauge");
    for (processor, m) in all {
        let age = oldest(m.behind_since.lock().unwrap_or_else(|e| e.into_inner()).values().copied(), now);
        let _ = writeln!(out, "vitals_processor_freshness_age_seconds{{processor=\"{}\"}} {age:.3}", label(processor));
    }
    let _ = writeln!(out, "# HELP vitals_processor_snapshot_age_seconds How old the newest snapshot of a task owned here is while its checkpoint has moved past it (what a takeover would redo; 0: up to date).\n# TYPE vitals_processor_snapshot_age_seconds gauge");
    for (processor, m) in all.iter().filter(|(_, m)| m.snapshots.get().is_some()) {
        let age = oldest(m.snapshot_behind_since.lock().unwrap_or_else(|e| e.into_inner()).values().copied(), now);
        let _ = writeln!(out, "vitals_processor_snapshot_age_seconds{{processor=\"{}\"}} {age:.3}", label(processor));
    }
    c(out, "dependency_retries_total", "Intervals put back and retried because a dependency (the schema registry) failed.", |m| {
        &m.dependency_retries
    });
    let s = |out: &mut String, name: &str, help: &str, v: fn(&SnapshotMetrics) -> &AtomicU64| {
        let _ = writeln!(out, "# HELP vitals_processor_{name} {help}\n# TYPE vitals_processor_{name} counter");
        for (processor, m) in all {
            let n = m.snapshots.get().map_or(0, |s| v(s).load(Ordering::Relaxed));
            let _ = writeln!(out, "vitals_processor_{name}{{processor=\"{}\"}} {n}", label(processor));
        }
    };
    s(out, "snapshots_total", "Task snapshots uploaded to S3 and published.", |m| &m.taken);
    s(out, "snapshot_failures_total", "Task snapshots that failed (export, S3 upload or pointer publish); processing went on.", |m| {
        &m.failed
    });
    s(out, "snapshots_fenced_total", "Task snapshots uploaded whose pointer was refused (a newer owner or snapshot).", |m| &m.fenced);
    s(out, "snapshot_restores_total", "Tasks restored from a snapshot.", |m| &m.restores);
    s(out, "snapshot_restore_failures_total", "Restores that failed and fell back to replaying from the beginning.", |m| {
        &m.restore_failures
    });
    let _ = writeln!(out, "# HELP vitals_processor_paused_partitions Partitions waiting for a failed dependency (see /readyz for why).\n# TYPE vitals_processor_paused_partitions gauge");
    for (processor, m) in all {
        let paused = m.paused.lock().unwrap_or_else(|e| e.into_inner()).len();
        let _ = writeln!(out, "vitals_processor_paused_partitions{{processor=\"{}\"}} {paused}", label(processor));
    }
    let _ = writeln!(out, "# HELP vitals_processor_lag_records Records behind the end of each input partition owned here.\n# TYPE vitals_processor_lag_records gauge");
    for (processor, m) in all {
        for ((topic, p), lag) in m.lag.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "vitals_processor_lag_records{{processor=\"{}\",topic=\"{topic}\",partition=\"{p}\"}} {lag}",
                label(processor)
            );
        }
    }
    // The stage label names the processor (`processor:<name>`): one family for all of them.
    DeadLetterCounts::render_header(out);
    for (_, m) in all {
        m.dead_letters.render_samples(out);
    }
}

/// The age (seconds before `now`) of the oldest of `since` (`None`: not behind), 0 if none is.
fn oldest(since: impl Iterator<Item = Option<f64>>, now: f64) -> f64 {
    since.flatten().map(|t| (now - t).max(0.0)).fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_declared_once_across_processors() {
        let (a, b) = (RuntimeMetrics::default(), RuntimeMetrics::default());
        a.dead_letter("processor:a", "undecodable");
        b.dead_letter("processor:b", "bad_id");
        b.dead_letter("processor:b", "bad_id");
        let mut out = String::new();
        render_all(&[("a", &a), ("b", &b)], &mut out);
        assert_eq!(out.matches("# TYPE vitals_processor_dead_lettered_total ").count(), 1, "{out}");
        assert_eq!(out.matches("# TYPE vitals_dead_letters_total ").count(), 1, "{out}");
        assert!(out.contains("vitals_processor_dead_lettered_total{processor=\"b\"} 2\n"), "{out}");
        assert!(out.contains("vitals_dead_letters_total{stage=\"processor:a\",code=\"undecodable\"} 1\n"), "{out}");
        assert!(out.contains("vitals_dead_letters_total{stage=\"processor:b\",code=\"bad_id\"} 2\n"), "{out}");
    }
}
