//! Topic names, their specs (partitions, retention, cleanup policy) and the key partitioner.
//!
//! Every keyed-by-user topic has the same partition count and every producer uses the same
//! partitioner ([`partition_for`], Kafka's murmur2, as the Java client and Kafka Streams), so the
//! processor task that owns partition `p` sees all of a user's data across HOT, COLD, CHANGE and
//! domain changes.

use crate::avro::{self, AvroFile};
use crate::projection::Descriptor;

/// Which role a topic plays; decides its retention and cleanup policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRole {
    /// Raw accepted input: kept for replays (backfills, new processor versions).
    Input,
    /// Processor output: upserts per key, compacted.
    Projection,
    /// Poison records with their reason.
    DeadLetter,
}

/// One topic vitals owns.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub role: TopicRole,
    pub value_schema: AvroFile,
}

/// The names of every topic, with an optional prefix (tests use a fresh prefix per test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub hot: String,
    pub cold: String,
    pub change: String,
    pub domain: String,
    pub dead_letter: String,
    pub rollup_day: String,
    pub sleep_night: String,
    pub session_impact: String,
    pub product_impact: String,
    /// The namespace prefix every name starts with (`kafka.topic_prefix`).
    pub prefix: String,
    /// The projections whose output topics this deployment has ([`Topics::with_projections`]):
    /// their specs are listed with the rest.
    pub projections: Vec<&'static Descriptor>,
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Topics {
        let t = |s: &str| format!("{prefix}vitals.{s}");
        Topics {
            prefix: prefix.to_owned(),
            hot: t("health.hot"),
            cold: t("health.cold"),
            change: t("health.change"),
            domain: t("domain.changes"),
            dead_letter: t("dlq"),
            rollup_day: t("out.rollup_day"),
            sleep_night: t("out.sleep_night"),
            session_impact: t("out.session_impact"),
            product_impact: t("out.product_impact"),
            projections: Vec::new(),
        }
    }

    /// These names, with the output topics of `projections` (the registered processors').
    pub fn with_projections(mut self, projections: impl IntoIterator<Item = &'static Descriptor>) -> Topics {
        self.projections.extend(projections);
        self
    }

    /// The output topic of projection `name`.
    pub fn output(&self, name: &str) -> String {
        format!("{}vitals.out.{name}", self.prefix)
    }

    /// The projection whose output topic is `topic`.
    pub fn projection_of(&self, topic: &str) -> Option<&'static Descriptor> {
        self.projections.iter().copied().find(|d| self.output(d.name) == topic)
    }

    /// Every topic with its role and value schema: the input lanes, the dead-letter topic, and
    /// the registered projections' outputs.
    pub fn specs(&self) -> Vec<TopicSpec> {
        let s = |name: &String, role, value_schema| TopicSpec { name: name.clone(), role, value_schema };
        vec![
            s(&self.hot, TopicRole::Input, avro::SAMPLE_BATCH),
            s(&self.cold, TopicRole::Input, avro::SAMPLE_BATCH),
            s(&self.change, TopicRole::Input, avro::CHANGE_BATCH),
            s(&self.domain, TopicRole::Input, avro::DOMAIN_CHANGE_BATCH),
            s(&self.dead_letter, TopicRole::DeadLetter, avro::DEAD_LETTER),
        ]
        .into_iter()
        .chain(self.projections.iter().map(|d| TopicSpec {
            name: self.output(d.name),
            role: TopicRole::Projection,
            value_schema: d.avro(),
        }))
        .collect()
    }
}

/// Kafka's murmur2 hash (the Java client's `Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= (tail[2] as u32) << 16;
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` among `partitions`, exactly as Kafka's default partitioner
/// (and librdkafka's `murmur2_random` for non-empty keys) computes it.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// The Kafka header marking a processor output record as a per-user progress marker (key
/// `<user>|~progress`, a tombstone-shaped record carrying the source offsets) rather than a
/// projection row. Sinks record it as the user's freshness; chained processors skip it.
pub const PROGRESS_HEADER: &str = "vitals-progress";
/// On a record read back from the raw archive whose user's key was deleted (erased): it keeps
/// its offset and carries nothing (no key, no payload); a processor passes over it.
pub const ERASED_HEADER: &str = "vitals-erased";
/// On every processor output record (and dead letter): the user it belongs to.
pub const USER_HEADER: &str = "vitals-user";
/// On a progress marker: the interval's dead letters of the user
/// ([`crate::dead_letter::announce`]).
pub const DEAD_LETTERS_HEADER: &str = "vitals-dead-letters";
/// On every processor output row: the interval attempt that produced it ([`crate::vouch`]).
pub const INTERVAL_HEADER: &str = "vitals-interval";
/// On a progress marker: `<interval>:<rows>`, the rows of its user that attempt produced before
/// it ([`crate::vouch`]).
pub const VOUCH_HEADER: &str = "vitals-vouch";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka_reference_values() {
        // Values from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21"), -973_932_308);
        assert_eq!(murmur2(b"foobar"), -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985_981_536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1_486_304_829);
        assert_eq!(murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"), -58_897_971);
        assert_eq!(murmur2(b"abc"), 479_470_107);
    }

    #[test]
    fn topics_are_prefixed_and_complete() {
        let t = Topics::with_prefix("t1.");
        assert_eq!(t.hot, "t1.vitals.health.hot");
        assert_eq!(t.specs().len(), 5, "the lanes and the dead-letter topic");
        let d = &crate::records::descriptors::ROLLUP_DAY;
        let t = t.with_projections([d]);
        let specs = t.specs();
        assert_eq!(specs.len(), 6);
        assert!(specs.iter().all(|s| s.name.starts_with("t1.vitals.")));
        assert_eq!(t.output("rollup_day"), t.rollup_day);
        assert_eq!(t.projection_of(&t.rollup_day), Some(d));
        assert_eq!(specs[5].value_schema.text, d.avro().text);
    }
}
