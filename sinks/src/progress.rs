//! How far each user's projection is computed *and applied*, from what the sink consumes: the
//! rule that turns a batch's progress markers into `projection_progress`. Pure, so it is tested
//! without a database.

use std::collections::BTreeMap;

use crate::Progress;

/// (user, projection, input topic, input partition): what one stored position is of.
pub type Key<'a> = (&'a str, &'a str, &'a str, i32);

/// A stored position: the owner's epoch and the next input offset it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub epoch: i64,
    pub next_offset: i64,
}

/// The positions `evidence` (the batch's markers and rows, in consumption order) moves `held`
/// to; only the keys that change. A marker raises a position to the greatest offset seen; rows
/// say nothing.
pub fn fold<'a>(held: &BTreeMap<Key<'a>, Position>, evidence: &'a [Progress]) -> BTreeMap<Key<'a>, Position> {
    let mut moved: BTreeMap<Key<'a>, Position> = BTreeMap::new();
    for p in evidence.iter().filter(|p| p.kind == crate::ProgressKind::Marker) {
        for o in &p.source_offsets {
            let key = (p.user_id.as_str(), p.projection.name(), o.topic.as_str(), o.partition);
            let seen = Position { epoch: p.epoch, next_offset: o.next_offset };
            let now = moved.get(&key).or(held.get(&key)).copied();
            if now.is_none_or(|n| n.next_offset < seen.next_offset) {
                moved.insert(key, seen);
            }
        }
    }
    moved
}
