//! How far each user's projection is computed *and applied*, from what the sink consumes: the
//! rule that turns a batch's progress markers and rows into `projection_progress`. Pure, so it is
//! tested without a database.
//!
//! A position is `(epoch, next_offset)` per (user, projection, input partition), and it only
//! moves forward in that (lexicographic) order:
//! * a marker moves it to the marker's own position if that is greater: a newer owner's marker
//!   replaces it even when lower (the new owner replays from an older checkpoint, and what it
//!   says is all that is proven of the rows it has re-emitted), the same owner's takes the greater
//!   offset, an older owner's (a zombie's) changes nothing;
//! * a row of a newer owner moves it to that epoch at the lower of the two offsets: the row is
//!   visible as soon as it is applied and may be computed from less input than the previous
//!   owner's rows were, so the position drops with it, in the same transaction; and it proves no
//!   more than the previous owner had, which may have been behind;
//! * a row never raises the offset: other rows of its interval may still be in the next batch,
//!   and only the marker after them says the interval is complete.

use std::collections::BTreeMap;

use crate::{Progress, ProgressKind};

/// (user, projection, input topic, input partition): what one stored position is of.
pub type Key<'a> = (&'a str, &'a str, &'a str, i32);

/// A stored position: the owner's epoch and the next input offset it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub epoch: i64,
    pub next_offset: i64,
}

/// The positions `evidence` (the batch's markers and rows, in consumption order) moves `held`
/// to; only the keys that change. Every move is forward in `(epoch, next_offset)` order, so the
/// write can refuse to move a stored position backwards.
pub fn fold<'a>(held: &BTreeMap<Key<'a>, Position>, evidence: &'a [Progress]) -> BTreeMap<Key<'a>, Position> {
    let mut moved: BTreeMap<Key<'a>, Position> = BTreeMap::new();
    for p in evidence {
        for o in &p.source_offsets {
            let key = (p.user_id.as_str(), p.projection.key(), o.topic.as_str(), o.partition);
            let now = moved.get(&key).or(held.get(&key)).copied();
            let next = step(now, p.kind, Position { epoch: p.epoch, next_offset: o.next_offset });
            if Some(next) != now {
                moved.insert(key, next);
            }
        }
    }
    moved
}

/// One record's effect on one position (`None`: nothing stored yet).
fn step(now: Option<Position>, kind: ProgressKind, seen: Position) -> Position {
    match (kind, now) {
        (ProgressKind::Marker, now) => now.map_or(seen, |n| n.max(seen)),
        (ProgressKind::Row, Some(n)) if n.epoch >= seen.epoch => n,
        (ProgressKind::Row, Some(n)) => Position { epoch: seen.epoch, next_offset: n.next_offset.min(seen.next_offset) },
        // Rows applied before any marker: something is applied (so not `pending`), nothing proven.
        (ProgressKind::Row, None) => Position { epoch: seen.epoch, next_offset: 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Projection;
    use vitals_schemas::SourceOffset;

    const HOT: &str = "hot";

    fn record(kind: ProgressKind, epoch: i64, next_offset: i64) -> Progress {
        Progress {
            projection: Projection::of::<vitals_schemas::RollupDay>(),
            user_id: "u".into(),
            kind,
            epoch,
            source_offsets: vec![SourceOffset { topic: HOT.into(), partition: 0, next_offset }],
        }
    }

    fn marker(epoch: i64, next_offset: i64) -> Progress {
        record(ProgressKind::Marker, epoch, next_offset)
    }

    fn row(epoch: i64, next_offset: i64) -> Progress {
        record(ProgressKind::Row, epoch, next_offset)
    }

    fn at(epoch: i64, next_offset: i64) -> Position {
        Position { epoch, next_offset }
    }

    const KEY: Key<'static> = ("u", "rollup_day", HOT, 0);

    /// The position after `records`, starting from `held` (None: nothing stored yet).
    fn after(held: Option<Position>, records: &[Progress]) -> Option<Position> {
        let held: BTreeMap<Key, Position> = held.map(|h| (KEY, h)).into_iter().collect();
        let moved = fold(&held, records);
        moved.get(&KEY).copied().or(held.get(&KEY).copied())
    }

    #[test]
    fn markers_of_one_owner_take_the_greatest_offset() {
        assert_eq!(after(None, &[marker(1, 100)]), Some(at(1, 100)));
        assert_eq!(after(Some(at(1, 100)), &[marker(1, 120)]), Some(at(1, 120)));
        assert_eq!(after(Some(at(1, 100)), &[marker(1, 80)]), Some(at(1, 100)), "a re-delivered older marker");
        assert_eq!(after(None, &[marker(1, 120), marker(1, 80)]), Some(at(1, 120)), "within a batch too");
    }

    #[test]
    fn a_newer_owner_replaces_the_position_even_when_lower() {
        assert_eq!(after(Some(at(1, 100)), &[marker(2, 40)]), Some(at(2, 40)));
        assert_eq!(after(None, &[marker(1, 100), marker(2, 40)]), Some(at(2, 40)), "within a batch too");
    }

    #[test]
    fn an_older_owner_changes_nothing() {
        assert_eq!(after(Some(at(2, 40)), &[marker(1, 200)]), Some(at(2, 40)), "a zombie's marker, however far");
        assert_eq!(after(Some(at(2, 40)), &[row(1, 200)]), Some(at(2, 40)), "a zombie's row");
        assert_eq!(after(None, &[marker(2, 40), marker(1, 200), row(1, 300)]), Some(at(2, 40)), "within a batch too");
    }

    #[test]
    fn a_row_of_a_newer_owner_drops_the_position_with_it() {
        // The row is visible once applied: the position drops in the same transaction.
        assert_eq!(after(Some(at(1, 100)), &[row(2, 40)]), Some(at(2, 40)));
        assert_eq!(after(None, &[marker(1, 100), row(2, 40)]), Some(at(2, 40)), "within a batch too");
        // It proves no more than the previous owner had: that one may have been behind.
        assert_eq!(after(Some(at(1, 30)), &[row(2, 40)]), Some(at(2, 30)));
        // Rows applied before any marker: something is applied (not pending), nothing is proven.
        assert_eq!(after(None, &[row(1, 40)]), Some(at(1, 0)));
    }

    #[test]
    fn rows_never_raise_the_position() {
        // Other rows of the same interval may still be unapplied (the next batch): only the
        // marker after them says the interval is complete.
        assert_eq!(after(Some(at(1, 40)), &[row(1, 100)]), Some(at(1, 40)));
        assert_eq!(after(Some(at(2, 40)), &[row(2, 100), marker(2, 100)]), Some(at(2, 100)));
        assert_eq!(after(Some(at(1, 100)), &[row(2, 40), row(2, 100)]), Some(at(2, 40)), "a newer owner's later rows");
    }

    #[test]
    fn a_takeover_replays_then_catches_up_and_a_zombie_writes_late() {
        // Issue 8, item 4, one record at a time and as one batch: the same result either way.
        let records = [marker(1, 100), row(2, 40), marker(2, 40), row(2, 100), marker(2, 100), row(1, 200), marker(1, 200)];
        let want = [at(1, 100), at(2, 40), at(2, 40), at(2, 40), at(2, 100), at(2, 100), at(2, 100)];
        let mut held = None;
        for (r, w) in records.iter().zip(want) {
            held = after(held, std::slice::from_ref(r));
            assert_eq!(held, Some(w), "after {:?} {} at {}", r.kind, r.epoch, r.source_offsets[0].next_offset);
        }
        assert_eq!(after(None, &records), Some(at(2, 100)));
    }

    #[test]
    fn every_input_partition_and_projection_has_its_own_position() {
        let mut two = marker(1, 100);
        two.source_offsets.push(SourceOffset { topic: "cold".into(), partition: 0, next_offset: 7 });
        let mut other = marker(5, 1);
        other.projection = Projection::of::<vitals_schemas::SleepNight>();
        let records = [two, other];
        let moved = fold(&BTreeMap::new(), &records);
        assert_eq!(moved.get(&KEY), Some(&at(1, 100)));
        assert_eq!(moved.get(&("u", "rollup_day", "cold", 0)), Some(&at(1, 7)));
        assert_eq!(moved.get(&("u", "sleep_night", HOT, 0)), Some(&at(5, 1)));
        assert_eq!(moved.len(), 3);
    }

    #[test]
    fn only_what_changes_is_written() {
        let held = BTreeMap::from([(KEY, at(2, 100))]);
        assert!(fold(&held, &[marker(2, 100), marker(1, 300), row(2, 500)]).is_empty());
    }
}
