//! `vitals-schemas`: the single source of truth for every record vitals puts on the wire.
//!
//! * [`avro`] — the Avro schemas (`schemas/avro/*.avsc`, embedded) and which topic's value each one is.
//! * [`records`] — the Rust types of those records; a test proves they agree with the `.avsc` files.
//! * [`codec`] — the Confluent-framed (magic byte + schema id) codec over a schema registry.
//! * [`dead_letter`] — the dead-letter topic's headers, the replay header, the per-reason counter.
//! * [`exposition`] — what every role's `/metrics` is written with: histograms in seconds, HTTP
//!   responses by route.
//! * [`catalog`] — the metric catalog: kind, canonical unit, exact unit conversions, plausible range.
//! * [`projection`] — projection descriptors: a processor's output declared once, its schema,
//!   topic, table and read endpoint derived from it.
//! * [`hash`] — the canonical payload hash used for request idempotency.
//! * [`topics`] — topic names, their specs, and the key partitioner every producer shares.
//! * [`trace`] — W3C trace context through every hop, and what a span may say of a user.
//! * [`vouch`] — when a progress marker may be believed: every row it vouches for read before it.

pub mod avro;
pub mod catalog;
pub mod codec;
pub mod dead_letter;
pub mod exposition;
pub mod hash;
pub mod projection;
pub mod records;
pub mod topics;
pub mod trace;
pub mod validate;
pub mod vouch;

pub use catalog::{Catalog, MetricKind, MetricSpec};
pub use records::*;
