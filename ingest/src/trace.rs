//! W3C trace context: reads `traceparent` from the request (or starts a trace), and gives the
//! header value to write into every Kafka record so processors can continue the trace.

use rand::Rng;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: String,
    /// This edge's span id: the parent of whatever consumes the records.
    pub span_id: String,
    pub sampled: bool,
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..bytes).map(|_| format!("{:02x}", rng.gen::<u8>())).collect()
}

impl TraceContext {
    /// Continues the caller's trace when its `traceparent` is valid, else starts one (for the
    /// logs, where no OpenTelemetry layer makes the edge's span).
    pub fn from_header(traceparent: Option<&str>) -> TraceContext {
        if let Some(sc) = traceparent.and_then(vitals_schemas::trace::parse) {
            return TraceContext { trace_id: format!("{:032x}", sc.trace_id()), span_id: random_hex(8), sampled: sc.is_sampled() };
        }
        TraceContext { trace_id: random_hex(16), span_id: random_hex(8), sampled: true }
    }

    /// The context of the edge's own span (`traceparent` as [`vitals_schemas::trace::of`] gives it).
    pub fn of_span(traceparent: &str) -> Option<TraceContext> {
        let sc = vitals_schemas::trace::parse(traceparent)?;
        Some(TraceContext {
            trace_id: format!("{:032x}", sc.trace_id()),
            span_id: format!("{:016x}", sc.span_id()),
            sampled: sc.is_sampled(),
        })
    }

    /// The `traceparent` value naming this edge's span as parent.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, if self.sampled { "01" } else { "00" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_trace_and_starts_one_otherwise() {
        let t = TraceContext::from_header(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(t.span_id, "00f067aa0ba902b7");
        assert!(t.traceparent().starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        let fresh = TraceContext::from_header(Some("garbage"));
        assert_eq!(fresh.trace_id.len(), 32);
        let zero = TraceContext::from_header(Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
        assert_ne!(zero.trace_id, "00000000000000000000000000000000");
    }
}
