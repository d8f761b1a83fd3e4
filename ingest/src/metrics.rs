//! Prometheus metrics of the edge. Labels are endpoints, lanes, outcomes and codes: never user ids.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub samples: IntCounterVec,
    pub rejections: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub produce_seconds: HistogramVec,
    /// The request store's two round trips: `claim` (before producing) and `finish` (after).
    pub store_seconds: HistogramVec,
    pub in_flight: IntGauge,
    /// Request bodies being read (before a request may take an in-flight permit).
    pub body_reads: IntGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests =
            IntCounterVec::new(Opts::new("vitals_ingest_requests_total", "Requests by endpoint and status"), &["endpoint", "status"])
                .unwrap();
        let samples =
            IntCounterVec::new(Opts::new("vitals_ingest_items_total", "Items accepted per lane, or rejected"), &["endpoint", "outcome"])
                .unwrap();
        let rejections =
            IntCounterVec::new(Opts::new("vitals_ingest_rejections_total", "Rejected items and requests by code"), &["code"]).unwrap();
        // The buckets every vitals latency histogram uses (one set, so panels compare).
        let buckets = vitals_schemas::exposition::SECONDS_BUCKETS.to_vec();
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("vitals_ingest_request_seconds", "Request latency").buckets(buckets.clone()),
            &["endpoint"],
        )
        .unwrap();
        let produce_seconds = HistogramVec::new(
            HistogramOpts::new("vitals_ingest_produce_seconds", "Produce + broker ack latency").buckets(buckets.clone()),
            &["endpoint"],
        )
        .unwrap();
        let store_seconds = HistogramVec::new(
            HistogramOpts::new("vitals_ingest_store_seconds", "Request store round trip latency (PostgreSQL)").buckets(buckets),
            &["op"],
        )
        .unwrap();
        let in_flight = IntGauge::new("vitals_ingest_in_flight_requests", "Requests being processed").unwrap();
        let body_reads =
            IntGauge::new("vitals_ingest_body_reads_in_progress", "Request bodies being read (they hold no in-flight permit)").unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(samples.clone()),
            Box::new(rejections.clone()),
            Box::new(request_seconds.clone()),
            Box::new(produce_seconds.clone()),
            Box::new(store_seconds.clone()),
            Box::new(in_flight.clone()),
            Box::new(body_reads.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics { registry, requests, samples, rejections, request_seconds, produce_seconds, store_seconds, in_flight, body_reads }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

/// The mean of one labelled histogram so far, in milliseconds (0 when empty): for benchmarks
/// that run an edge in process.
pub fn mean_ms(h: &HistogramVec, label: &str) -> f64 {
    let h = h.with_label_values(&[label]);
    match h.get_sample_count() {
        0 => 0.0,
        n => h.get_sample_sum() / n as f64 * 1000.0,
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
