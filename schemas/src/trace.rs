//! W3C trace context across every hop: the edge's request, the Kafka records it writes, a
//! processor's record, its output records, the sink's commit and the realtime envelope each
//! carry a `traceparent` (`00-<trace id>-<span id>-<flags>`) naming the span of the hop before.
//!
//! Each hop's span is a `tracing` span of target [`TARGET`]; where the composition root installs
//! tracing-opentelemetry (`vitals::init_tracing`), those spans are OpenTelemetry spans, exported
//! over OTLP when `telemetry.otlp_endpoint` is set. Without that layer (the library used
//! in-process, as the tests and benchmarks do) the helpers here do nothing and [`of`] says so.
//!
//! Span attributes never carry a health value or a user id in clear: [`user`] is what a span may
//! say of its user.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use sha2::{Digest, Sha256};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of every span that is a hop of an upload's trace (what the OpenTelemetry layer
/// exports; other spans stay in the logs).
pub const TARGET: &str = "vitals::trace";

/// The Kafka header (and envelope field) the context travels in.
pub const HEADER: &str = "traceparent";

/// A `traceparent` value, parsed: `None` when malformed (wrong version, lengths, non-hex, or an
/// all-zero id), as the W3C spec says to ignore such a header.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if parts.len() != 4 || parts[0] != "00" || !hex(parts[1], 32) || !hex(parts[2], 16) || !hex(parts[3], 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(parts[1]).ok()?;
    let span_id = SpanId::from_hex(parts[2]).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(parts[3], 16).ok()?;
    Some(SpanContext::new(trace_id, span_id, TraceFlags::new(flags & 1), true, TraceState::default()))
}

/// The `traceparent` naming `sc`.
pub fn format(sc: &SpanContext) -> String {
    format!("00-{:032x}-{:016x}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8())
}

/// Makes `span` (just created, not yet entered) a child of `traceparent` when that is valid; a
/// missing or malformed one leaves it a root. Nothing happens without the OpenTelemetry layer.
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(sc) = traceparent.and_then(parse) {
        let _ = span.set_parent(Context::new().with_remote_span_context(sc));
    }
}

/// The `traceparent` naming `span` as the parent of the next hop; `None` without the
/// OpenTelemetry layer (or for a span it does not record).
pub fn of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| format(&sc))
}

/// The name of the edge's span, the root of an upload's trace in vitals (whose sampling the edge
/// decides itself: `vitals::init_tracing`).
pub const EDGE_SPAN: &str = "ingest.batch";

static USER_KEY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// The key every role of a deployment hashes user ids with (`telemetry.user_hash_key`), set once
/// at start-up; unset, ids are hashed without one.
pub fn set_user_key(key: &[u8]) {
    let _ = USER_KEY.set(key.to_vec());
}

/// What a span may carry of a user: the first 16 hex digits of a keyed SHA-256 of the id
/// ([`set_user_key`]), enough to find one user's traces, not to read the id back — without the
/// key, not even for a guessable id (an e-mail address, a sequence number).
pub fn user(user_id: &str) -> String {
    user_keyed(USER_KEY.get().map_or(&[][..], Vec::as_slice), user_id)
}

/// [`user`] under `key` (empty: no key).
pub fn user_keyed(key: &[u8], user_id: &str) -> String {
    let mut h = Sha256::new();
    if !key.is_empty() {
        h.update((key.len() as u64).to_be_bytes());
        h.update(key);
    }
    h.update(user_id.as_bytes());
    hex::encode(&h.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_formats_and_refuses_malformed_values() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse(tp).expect("a valid traceparent");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(format(&sc), tp);
        assert!(!parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap().is_sampled());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn without_the_layer_a_span_names_no_parent() {
        let span = tracing::info_span!(target: TARGET, "x");
        continue_from(&span, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert_eq!(of(&span), None);
    }

    #[test]
    fn a_user_is_hashed() {
        let h = user("user-1");
        assert_eq!(h.len(), 16);
        assert!(!h.contains("user"));
        assert_eq!(h, user("user-1"));
        assert_ne!(h, user("user-2"));
        assert_ne!(user_keyed(b"k1", "user-1"), h, "a key changes the hash");
        assert_ne!(user_keyed(b"k1", "user-1"), user_keyed(b"k2", "user-1"));
    }
}
