//! The pieces every role's `/metrics` is written with (Prometheus text exposition, version
//! 0.0.4): a latency histogram in seconds, and HTTP responses by route and status class. Each
//! role renders its families once per exposition (`# HELP`/`# TYPE` then every sample), which is
//! what `promtool check metrics` holds the tests to.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

pub use crate::dead_letter::label;

/// Upper bounds (seconds) of every vitals latency histogram: 1 ms to 30 s, roughly ×2.5 apart —
/// a checkpoint commit (sub-millisecond to tens of ms), an acknowledgement wait (ms to seconds
/// under a slow broker) and a PostgreSQL batch commit (ms to seconds) all fall inside.
pub const SECONDS_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A histogram of durations in seconds over [`SECONDS_BUCKETS`], lock-free to observe.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is above every bound (`+Inf`).
    counts: [AtomicU64; SECONDS_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = SECONDS_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(SECONDS_BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn sum_secs(&self) -> f64 {
        self.sum_nanos.load(Relaxed) as f64 / 1e9
    }

    /// The family's `# HELP` and `# TYPE` lines, once per exposition before its samples.
    pub fn render_header(out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    }

    /// This histogram's series: `labels` is the label list without braces (`processor="x"`), or
    /// empty. The buckets are cumulative and `+Inf` equals `_count`, as the format requires.
    pub fn render_samples(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Relaxed);
            let le = SECONDS_BUCKETS.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum_secs());
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// HTTP responses of a server by route (the matched route pattern, never the raw path: the
/// series stay few and carry no user id) and status class, with their durations.
#[derive(Debug, Default)]
pub struct HttpMetrics(Mutex<BTreeMap<String, RouteMetrics>>);

#[derive(Debug, Default)]
struct RouteMetrics {
    /// Responses by class: 1xx … 5xx.
    classes: [u64; 5],
    seconds: Histogram,
}

impl HttpMetrics {
    /// One response to `route` (`"unmatched"` for a path no route matched).
    pub fn record(&self, route: &str, status: u16, took: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let r = m.entry(route.to_owned()).or_default();
        r.classes[class] += 1;
        r.seconds.observe(took);
    }

    /// Responses of one status class (1 … 5), every route together.
    pub fn class_count(&self, class: usize) -> u64 {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.values().map(|r| r.classes[class.clamp(1, 5) - 1]).sum()
    }

    /// `{prefix}_responses_total{route,class}` and `{prefix}_request_seconds{route}`.
    pub fn render(&self, out: &mut String, prefix: &str) {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "# HELP {prefix}_responses_total HTTP responses by route and status class.\n# TYPE {prefix}_responses_total counter"
        );
        for (route, r) in m.iter() {
            for (i, n) in r.classes.iter().enumerate() {
                let _ = writeln!(out, "{prefix}_responses_total{{route=\"{}\",class=\"{}xx\"}} {n}", label(route), i + 1);
            }
        }
        let name = format!("{prefix}_request_seconds");
        Histogram::render_header(out, &name, "Time from a request's arrival to its response, by route.");
        for (route, r) in m.iter() {
            r.seconds.render_samples(out, &name, &format!("route=\"{}\"", label(route)));
        }
    }
}

/// Now as Unix seconds (what `*_timestamp_seconds` gauges and ages are measured against).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_inf_is_the_count() {
        let h = Histogram::default();
        for ms in [0, 2, 2, 40, 31_000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        Histogram::render_header(&mut out, "x_seconds", "help");
        h.render_samples(&mut out, "x_seconds", "p=\"a\"");
        for want in [
            "# TYPE x_seconds histogram\n",
            "x_seconds_bucket{p=\"a\",le=\"0.001\"} 1\n",
            "x_seconds_bucket{p=\"a\",le=\"0.0025\"} 3\n",
            "x_seconds_bucket{p=\"a\",le=\"0.05\"} 4\n",
            "x_seconds_bucket{p=\"a\",le=\"30\"} 4\n",
            "x_seconds_bucket{p=\"a\",le=\"+Inf\"} 5\n",
            "x_seconds_sum{p=\"a\"} 31.044\n",
            "x_seconds_count{p=\"a\"} 5\n",
        ] {
            assert!(out.contains(want), "{want}--\n{out}");
        }
        let mut bare = String::new();
        h.render_samples(&mut bare, "y", "");
        assert!(bare.contains("y_bucket{le=\"+Inf\"} 5\n") && bare.contains("y_count 5\n"), "{bare}");
    }

    #[test]
    fn responses_by_route_and_class() {
        let m = HttpMetrics::default();
        m.record("/v1/x", 200, Duration::from_millis(3));
        m.record("/v1/x", 401, Duration::from_millis(1));
        m.record("unmatched", 404, Duration::from_millis(1));
        let mut out = String::new();
        m.render(&mut out, "vitals_t");
        assert!(out.contains("vitals_t_responses_total{route=\"/v1/x\",class=\"2xx\"} 1\n"), "{out}");
        assert!(out.contains("vitals_t_responses_total{route=\"/v1/x\",class=\"4xx\"} 1\n"), "{out}");
        assert!(out.contains("vitals_t_request_seconds_count{route=\"/v1/x\"} 2\n"), "{out}");
        assert_eq!(m.class_count(4), 2);
    }
}
