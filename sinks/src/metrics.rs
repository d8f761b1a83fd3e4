//! What an operator reads of a running sink: [`SinkMetrics`] (kept by the [`runner`]) in the
//! Prometheus text format, served by `vitals sink` on `sink.metrics_listen`.
//!
//! [`runner`]: crate::runner

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use vitals_schemas::dead_letter::{label, DeadLetterCounts};
use vitals_schemas::exposition::{unix_now, Histogram};

use crate::runner::SinkMetrics;

/// One projection's changes as the sink applied them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProjectionCounts {
    pub upserts: u64,
    pub retractions: u64,
    /// Unix seconds of the newest commit that changed a row.
    pub last_change: f64,
}

impl SinkMetrics {
    /// The projections this sink applies: their series exist (at zero) from the start, so that
    /// an alert on a projection that never changes can fire.
    pub fn declare<'a>(&self, keys: impl Iterator<Item = &'a str>) {
        let mut m = self.projections.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            m.entry(k.to_owned()).or_default();
        }
    }

    /// The rows a commit changed, counted per projection.
    pub fn applied(&self, rows: &[crate::postgres::Applied]) {
        if rows.is_empty() {
            return;
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let mut m = self.projections.lock().unwrap_or_else(|e| e.into_inner());
        for r in rows {
            let c = m.entry(r.projection.key().to_owned()).or_default();
            if r.deleted {
                c.retractions += 1;
            } else {
                c.upserts += 1;
            }
            c.last_change = now;
        }
    }

    /// One record sent to the dead-letter topic by `stage` with reason `code`.
    pub fn dead_letter(&self, stage: &str, code: &str) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.dead_letters.add(stage, code);
    }

    /// The sink waits for a failed dependency (`reason`); [`SinkMetrics::wait_over`] once a
    /// batch commits again.
    pub fn wait(&self, reason: String) {
        *self.waiting.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }

    pub fn wait_over(&self) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Why the sink is not ready (`None`: ready).
    pub fn not_ready(&self) -> Option<String> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Appends this sink's metrics (label `sink`) in the Prometheus text format.
    pub fn render(&self, sink: &str, out: &mut String) {
        let sink = label(sink);
        let c = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP vitals_sink_{name} {help}\n# TYPE vitals_sink_{name} counter");
            let _ = writeln!(out, "vitals_sink_{name}{{sink=\"{sink}\"}} {}", v.load(Ordering::Relaxed));
        };
        c(out, "records_in_total", "Records of committed batches (rows, progress markers, dead letters).", &self.records_in);
        c(out, "rows_applied_total", "Projection rows that changed a table.", &self.rows_applied);
        c(out, "batches_committed_total", "Batches committed (rows + offsets in one transaction).", &self.batches_committed);
        c(out, "commit_retries_total", "Batch commits that failed and were retried (PostgreSQL unavailable).", &self.commit_retries);
        c(out, "dead_lettered_total", "Records sent to the dead-letter topic.", &self.dead_lettered);
        c(
            out,
            "markers_refused_total",
            "Progress markers not believed: a row they vouch for was not read before them (an interval that failed part-way).",
            &self.markers_refused,
        );
        let waiting = u8::from(self.not_ready().is_some());
        let _ = writeln!(out, "# HELP vitals_sink_waiting 1 while the sink waits for a failed dependency (see /readyz for why).\n# TYPE vitals_sink_waiting gauge");
        let _ = writeln!(out, "vitals_sink_waiting{{sink=\"{sink}\"}} {waiting}");
        let projections = self.projections.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(out, "# HELP vitals_sink_projection_rows_total Rows of a projection the sink changed, by change (upsert, retraction).\n# TYPE vitals_sink_projection_rows_total counter");
        for (p, c) in &projections {
            let p = label(p);
            let _ =
                writeln!(out, "vitals_sink_projection_rows_total{{sink=\"{sink}\",projection=\"{p}\",change=\"upsert\"}} {}", c.upserts);
            let _ = writeln!(
                out,
                "vitals_sink_projection_rows_total{{sink=\"{sink}\",projection=\"{p}\",change=\"retraction\"}} {}",
                c.retractions
            );
        }
        let _ = writeln!(out, "# HELP vitals_sink_projection_last_change_timestamp_seconds When the sink last changed a row of the projection (Unix time).\n# TYPE vitals_sink_projection_last_change_timestamp_seconds gauge");
        for (p, c) in &projections {
            let _ = writeln!(
                out,
                "vitals_sink_projection_last_change_timestamp_seconds{{sink=\"{sink}\",projection=\"{}\"}} {:.3}",
                label(p),
                c.last_change
            );
        }
        Histogram::render_header(out, "vitals_sink_commit_seconds", "How long a batch commit (rows + offsets in one transaction) took.");
        self.commit_seconds.render_samples(out, "vitals_sink_commit_seconds", &format!("sink=\"{sink}\""));
        let _ = writeln!(out, "# HELP vitals_sink_lag_records Records behind the end of each partition assigned here (read but not committed counts as behind).\n# TYPE vitals_sink_lag_records gauge");
        for ((topic, p), lag) in self.lag.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "vitals_sink_lag_records{{sink=\"{sink}\",topic=\"{}\",partition=\"{p}\"}} {lag}", label(topic));
        }
        // Per projection: the oldest over its partitions assigned here, 0 when none is behind.
        let now = unix_now();
        let mut age: BTreeMap<&str, f64> = projections.keys().map(|k| (k.as_str(), 0.0)).collect();
        let behind = self.behind_since.lock().unwrap_or_else(|e| e.into_inner());
        for ((projection, _), since) in behind.iter() {
            let a = age.entry(projection.as_str()).or_insert(0.0);
            if let Some(t) = since {
                *a = a.max((now - t).max(0.0));
            }
        }
        let _ = writeln!(out, "# HELP vitals_sink_freshness_age_seconds How old the oldest record still to apply to the projection may be, over its partitions assigned here (0: read to the end).\n# TYPE vitals_sink_freshness_age_seconds gauge");
        for (projection, a) in &age {
            let _ = writeln!(out, "vitals_sink_freshness_age_seconds{{sink=\"{sink}\",projection=\"{}\"}} {a:.3}", label(projection));
        }
        DeadLetterCounts::render_header(out);
        self.dead_letters.render_samples(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_counters_and_dead_letters_by_reason() {
        let m = SinkMetrics::default();
        m.dead_letter("sink:postgres", "undecodable");
        let mut out = String::new();
        m.render("postgres", &mut out);
        assert!(out.contains("vitals_sink_dead_lettered_total{sink=\"postgres\"} 1\n"), "{out}");
        assert!(out.contains("vitals_dead_letters_total{stage=\"sink:postgres\",code=\"undecodable\"} 1\n"), "{out}");
    }

    #[test]
    fn counts_changed_rows_per_projection_and_version() {
        use vitals_schemas::projection::Projection;
        let m = SinkMetrics::default();
        let row = |p: Projection, deleted: bool| crate::postgres::Applied {
            projection: p,
            user_id: "u".into(),
            entity_id: "e".into(),
            version: (1, 1),
            deleted,
            body: serde_json::json!({}),
            trace: None,
        };
        let (v1, v2) = (Projection::of::<vitals_schemas::RollupDay>(), Projection::of::<vitals_schemas::RollupDay>().at("v2"));
        m.applied(&[row(v1, false), row(v1, false), row(v1, true), row(v2, false)]);
        let mut out = String::new();
        m.render("postgres", &mut out);
        for want in [
            "vitals_sink_projection_rows_total{sink=\"postgres\",projection=\"rollup_day\",change=\"upsert\"} 2\n",
            "vitals_sink_projection_rows_total{sink=\"postgres\",projection=\"rollup_day\",change=\"retraction\"} 1\n",
            "vitals_sink_projection_rows_total{sink=\"postgres\",projection=\"rollup_day@v2\",change=\"upsert\"} 1\n",
        ] {
            assert!(out.contains(want), "{want}{out}");
        }
        assert_eq!(out.matches("# TYPE vitals_sink_projection_rows_total").count(), 1, "{out}");
        assert!(
            out.contains("vitals_sink_projection_last_change_timestamp_seconds{sink=\"postgres\",projection=\"rollup_day@v2\"} "),
            "{out}"
        );
    }
}
