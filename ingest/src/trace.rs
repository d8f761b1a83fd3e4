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

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) && s.bytes().any(|b| b != b'0')
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..bytes).map(|_| format!("{:02x}", rng.gen::<u8>())).collect()
}

impl TraceContext {
    /// Continues the caller's trace when its `traceparent` is valid, else starts one.
    pub fn from_header(traceparent: Option<&str>) -> TraceContext {
        if let Some(tp) = traceparent {
            let parts: Vec<&str> = tp.trim().split('-').collect();
            if parts.len() == 4 && parts[0] == "00" && is_hex(parts[1], 32) && is_hex(parts[2], 16) && parts[3].len() == 2 {
                let flags = u8::from_str_radix(parts[3], 16).unwrap_or(0);
                return TraceContext { trace_id: parts[1].to_owned(), span_id: random_hex(8), sampled: flags & 1 == 1 };
            }
        }
        TraceContext { trace_id: random_hex(16), span_id: random_hex(8), sampled: true }
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
