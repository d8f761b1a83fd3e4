//! When a progress marker may be believed: only when every row it vouches for is before it.
//!
//! A processor produces an interval's rows and then one progress marker per user, all in one go,
//! and waits for every acknowledgement once. The idempotent producer keeps them in order within the
//! output partition, but if one record fails for good (a timeout, a broker refusing it), the ones
//! after it may still land: a marker can then be stored although a row of its interval is not. The
//! task fails such an interval and never checkpoints it, but the marker is in the log. So every
//! row names its interval attempt ([`INTERVAL_HEADER`](crate::topics::INTERVAL_HEADER)), every marker
//! says how many rows of its user that attempt produced before it
//! ([`VOUCH_HEADER`](crate::topics::VOUCH_HEADER), `<interval>:<rows>`), and a reader of the
//! partition believes the marker only if it has read exactly that many. A marker without the
//! header comes from a writer that awaited its rows before writing it (the only kind there was
//! before) and is believed as it always was.
//!
//! Counting per user keeps this right under log compaction: a user's newest marker is never
//! compacted away before any row it vouches for, since a newer record of one of those keys comes
//! with a newer marker of the same user.

use std::collections::{BTreeMap, BTreeSet};

/// (topic, partition, user): the rows of one user in one output partition.
pub type Key = (String, i32, String);

/// The value of a marker's vouch header.
pub fn vouch(interval: &str, rows: u64) -> String {
    format!("{interval}:{rows}")
}

/// A vouch header's interval and row count (`None`: malformed).
pub fn parse(value: &str) -> Option<(&str, u64)> {
    let (interval, rows) = value.rsplit_once(':')?;
    (!interval.is_empty()).then_some(())?;
    Some((interval, rows.parse().ok()?))
}

/// What a reader makes of a marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Belief {
    /// Every row it vouches for was read before it.
    Vouched,
    /// No vouch header: written after its rows were acknowledged.
    Unvouched,
    /// A row it vouches for is missing (or the header is malformed): not believed.
    Refused,
}

impl Belief {
    pub fn believed(self) -> bool {
        self != Belief::Refused
    }
}

/// The rows read per user and interval attempt, since that user's last marker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Vouches {
    open: BTreeMap<Key, Vec<(String, u64)>>,
    /// Keys changed since the last [`Vouches::changes`].
    touched: BTreeSet<Key>,
    /// Keys that have entries in the persisted copy.
    persisted: BTreeSet<Key>,
}

/// What to write to the persisted copy: keys to clear, then entries to insert.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub cleared: Vec<Key>,
    pub entries: Vec<(Key, String, u64)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.cleared.is_empty() && self.entries.is_empty()
    }
}

impl Vouches {
    /// A row of `user` read from `(topic, partition)`, of interval attempt `interval` (`None`: a
    /// writer that names none).
    pub fn row(&mut self, topic: &str, partition: i32, user: &str, interval: Option<&str>) {
        let Some(interval) = interval else { return };
        let key = (topic.to_owned(), partition, user.to_owned());
        let open = self.open.entry(key.clone()).or_default();
        match open.iter_mut().find(|(i, _)| i == interval) {
            Some((_, n)) => *n += 1,
            None => open.push((interval.to_owned(), 1)),
        }
        self.touched.insert(key);
    }

    /// A marker of `user` read from `(topic, partition)` with vouch header `vouch`. It closes the
    /// user's open counts whatever it says: a later marker vouches only for rows after this one.
    pub fn marker(&mut self, topic: &str, partition: i32, user: &str, vouch: Option<&str>) -> Belief {
        let key = (topic.to_owned(), partition, user.to_owned());
        let open = self.open.remove(&key);
        if open.is_some() {
            self.touched.insert(key);
        }
        let Some(v) = vouch else { return Belief::Unvouched };
        let Some((interval, rows)) = parse(v) else { return Belief::Refused };
        let read = open.unwrap_or_default().into_iter().find(|(i, _)| i == interval).map_or(0, |(_, n)| n);
        if read == rows {
            Belief::Vouched
        } else {
            Belief::Refused
        }
    }

    /// Entries of a persisted copy (after an assignment), replacing what is held for their keys.
    pub fn load(&mut self, entries: impl IntoIterator<Item = (Key, String, u64)>) {
        for (key, interval, rows) in entries {
            self.persisted.insert(key.clone());
            let open = self.open.entry(key).or_default();
            open.retain(|(i, _)| *i != interval);
            open.push((interval, rows));
        }
    }

    /// Forgets a partition that is no longer read here (its persisted copy stays).
    pub fn forget(&mut self, topic: &str, partition: i32) {
        let of = |k: &Key| k.0 == topic && k.1 == partition;
        self.open.retain(|k, _| !of(k));
        self.touched.retain(|k| !of(k));
        self.persisted.retain(|k| !of(k));
    }

    /// What the persisted copy needs to match this one, for the keys changed since the last call;
    /// afterwards those keys count as persisted (call it for the write that commits them).
    pub fn changes(&mut self) -> Changes {
        let mut c = Changes::default();
        for key in std::mem::take(&mut self.touched) {
            if self.persisted.remove(&key) {
                c.cleared.push(key.clone());
            }
            if let Some(open) = self.open.get(&key) {
                for (i, n) in open {
                    c.entries.push((key.clone(), i.clone(), *n));
                }
                self.persisted.insert(key);
            }
        }
        c
    }

    /// Open counts held (for metrics and tests).
    pub fn open(&self) -> usize {
        self.open.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_marker_is_believed_only_after_every_row_it_vouches_for() {
        let mut v = Vouches::default();
        v.row("t", 0, "u", Some("a.1"));
        assert_eq!(v.marker("t", 0, "u", Some("a.1:2")), Belief::Refused, "one row of two");
        v.row("t", 0, "u", Some("a.2"));
        v.row("t", 0, "u", Some("a.2"));
        assert_eq!(v.marker("t", 0, "u", Some("a.2:2")), Belief::Vouched);
        assert_eq!(v.marker("t", 0, "u", Some("a.3:0")), Belief::Vouched, "no rows to vouch for");
        assert_eq!(v.marker("t", 0, "u", None), Belief::Unvouched);
        assert_eq!(v.marker("t", 0, "u", Some("garbage")), Belief::Refused);
        assert_eq!(v.marker("t", 0, "u", Some(":1")), Belief::Refused);
        v.row("t", 0, "u", Some("a.4"));
        v.row("t", 1, "u", Some("a.4"));
        v.row("t", 0, "w", Some("a.4"));
        assert_eq!(v.marker("t", 0, "u", Some("a.4:2")), Belief::Refused, "rows of another partition or user do not count");
    }

    #[test]
    fn rows_of_an_earlier_attempt_do_not_count_for_a_later_one() {
        let mut v = Vouches::default();
        v.row("t", 0, "u", Some("a.1"));
        v.row("t", 0, "u", Some("a.2"));
        assert_eq!(v.marker("t", 0, "u", Some("a.2:2")), Belief::Refused);
    }

    #[test]
    fn interleaved_owners_are_counted_apart() {
        let mut v = Vouches::default();
        v.row("t", 0, "u", Some("z.1"));
        v.row("t", 0, "u", Some("l.1"));
        v.row("t", 0, "u", Some("z.1"));
        assert_eq!(v.marker("t", 0, "u", Some("l.1:1")), Belief::Vouched);
    }

    #[test]
    fn the_persisted_copy_carries_open_counts_across_a_restart() {
        let mut v = Vouches::default();
        v.row("t", 0, "u", Some("a.1"));
        let c = v.changes();
        assert_eq!(c.entries, vec![(("t".into(), 0, "u".into()), "a.1".into(), 1)]);
        assert!(c.cleared.is_empty());
        // A restart: a new reader loads what was persisted.
        let mut again = Vouches::default();
        again.load(c.entries);
        again.row("t", 0, "u", Some("a.1"));
        assert_eq!(again.marker("t", 0, "u", Some("a.1:2")), Belief::Vouched);
        let c = again.changes();
        assert_eq!(c.cleared, vec![("t".into(), 0, "u".into())]);
        assert!(c.entries.is_empty());
        assert!(again.changes().is_empty(), "nothing changed since");
        // Rows and their marker within one write need no persisted entry at all.
        let mut v = Vouches::default();
        v.row("t", 0, "u", Some("b.1"));
        assert!(v.marker("t", 0, "u", Some("b.1:1")).believed());
        assert!(v.changes().is_empty());
    }

    proptest! {
        /// Attempts of rows then markers; each attempt loses a random subset of its records
        /// (after which later ones may still land, as with a producer's permanent failure); the
        /// reader may restart from its persisted copy at any record. A marker is believed exactly
        /// when every row of its user in its attempt was read before it.
        #[test]
        fn believed_exactly_when_no_row_of_the_attempt_is_missing(
            attempts in prop::collection::vec((prop::collection::vec(0u8..3, 0..6), any::<u64>()), 1..12),
            restarts in any::<u64>(),
        ) {
            let mut log: Vec<(String, bool, u64, String)> = Vec::new(); // (user, marker, planned rows, interval)
            let mut lost_rows: BTreeSet<(String, String)> = BTreeSet::new();
            for (n, (rows, loss)) in attempts.iter().enumerate() {
                let interval = format!("o.{n}");
                let mut planned: BTreeMap<String, u64> = BTreeMap::new();
                let mut recs: Vec<(String, bool)> = rows.iter().map(|u| (format!("u{u}"), false)).collect();
                for (u, _) in &recs {
                    *planned.entry(u.clone()).or_default() += 1;
                }
                recs.extend(planned.keys().map(|u| (u.clone(), true)));
                for (i, (u, marker)) in recs.into_iter().enumerate() {
                    if loss >> (i % 64) & 1 == 1 && loss % 3 == 0 {
                        if !marker {
                            lost_rows.insert((interval.clone(), u));
                        }
                        continue;
                    }
                    let rows = planned[&u];
                    log.push((u, marker, rows, interval.clone()));
                }
            }
            let mut reader = Vouches::default();
            let mut persisted: BTreeMap<Key, Vec<(String, u64)>> = BTreeMap::new();
            for (i, (u, marker, rows, interval)) in log.iter().enumerate() {
                if !*marker {
                    reader.row("t", 0, u, Some(interval));
                } else {
                    let belief = reader.marker("t", 0, u, Some(&vouch(interval, *rows)));
                    let complete = !lost_rows.contains(&(interval.clone(), u.clone()));
                    prop_assert_eq!(belief.believed(), complete, "marker of {} in {}", u, interval);
                }
                // Each record is its own committed write; now and then the reader restarts.
                let c = reader.changes();
                for k in c.cleared {
                    persisted.remove(&k);
                }
                for (k, iv, n) in c.entries {
                    persisted.entry(k).or_default().push((iv, n));
                }
                if restarts >> (i % 64) & 1 == 1 {
                    reader = Vouches::default();
                    reader.load(persisted.iter().flat_map(|(k, v)| v.iter().map(move |(iv, n)| (k.clone(), iv.clone(), *n))));
                }
            }
        }
    }
}
