//! Sources: the user's priority order, and how overlapping cumulative samples of several sources
//! merge (DOMAIN.md, "Metric kinds"): never summed across sources; per elementary sub-interval
//! the highest-priority source wins, an interval sample counts pro rata by time.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use vitals_schemas::{DomainChangeBatch, DomainChangeKind, Sample, SourceKind};

use crate::{Input, State, StateExt};

/// Where a processor keeps the user's priority in its state.
pub const PRIORITY_KEY: &str = "priority";

/// A source's rank: lower is better.
pub type Rank = (usize, u8, String);

/// The user's source priority as last set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Priority {
    pub sources: Vec<String>,
    /// (occurred_at_ms, change_id) of the change that set it: the greatest wins.
    pub set_by: (i64, String),
}

/// The precedence of a source kind when no list decides: manual > watch > phone > third-party
/// (lower ranks first).
pub fn kind_rank(kind: SourceKind) -> u8 {
    match kind {
        SourceKind::Manual => 0,
        SourceKind::Watch => 1,
        SourceKind::Phone => 2,
        SourceKind::ThirdParty => 3,
    }
}

impl Priority {
    /// The user's list first, in its order; then manual > watch > phone > third-party; then the
    /// source name, so the order is total.
    pub fn rank(&self, source: &str, kind: SourceKind) -> Rank {
        let listed = self.sources.iter().position(|s| s == source).unwrap_or(usize::MAX);
        (listed, kind_rank(kind), source.to_owned())
    }

    /// Folds a batch's priority changes into `self`; `true` if it changed.
    pub fn fold(&mut self, batch: &DomainChangeBatch) -> bool {
        let mut changed = false;
        for c in batch.changes.iter().filter(|c| c.kind == DomainChangeKind::SourcePriorityUpdated) {
            let by = (c.occurred_at_ms, c.change_id.clone());
            if by > self.set_by {
                *self = Priority { sources: c.source_priority.clone().unwrap_or_default(), set_by: by };
                changed = true;
            }
        }
        changed
    }

    /// The priority held in `state`.
    pub fn load(state: &dyn State) -> Priority {
        state.get_json(PRIORITY_KEY).unwrap_or_default()
    }

    /// Applies a domain batch to the priority held in `state`; `true` if it changed.
    pub fn apply(state: &mut dyn State, batch: &DomainChangeBatch) -> bool {
        let mut p = Priority::load(state);
        let changed = p.fold(batch);
        if changed {
            state.put_json(PRIORITY_KEY, &p);
        }
        changed
    }

    /// Batch: every user's final priority after `inputs`, in any order.
    pub fn oracle(inputs: &[Input]) -> BTreeMap<String, Priority> {
        let mut out: BTreeMap<String, Priority> = BTreeMap::new();
        for input in inputs {
            if let Input::Domain(b) = input {
                out.entry(b.user_id.clone()).or_default().fold(b);
            }
        }
        out
    }
}

/// The part of one cumulative sample inside a window: `[a, b)` (an instant when `a == b`), its
/// share of the value, and its source's rank.
#[derive(Debug, Clone)]
pub struct Piece {
    pub a: i64,
    pub b: i64,
    pub value: f64,
    pub rank: Rank,
}

impl Piece {
    /// The piece of `s` clipped to `[a, b)` (as computed by the caller), its value pro rata by
    /// time (an instant sample keeps its whole value).
    pub fn clipped(s: &Sample, window: (i64, i64), rank: Rank) -> Option<Piece> {
        Some(Piece::of(s.start_ms, s.end_ms, s.value, window, rank))
    }

    /// The piece of a sample `[start, end)` of `value`, clipped to `[a, b)`.
    pub fn of(start_ms: i64, end_ms: i64, value: f64, (a, b): (i64, i64), rank: Rank) -> Piece {
        let dur = (end_ms - start_ms) as f64;
        let value = if dur > 0.0 { value * (b - a) as f64 / dur } else { value };
        Piece { a, b, value, rank }
    }
}

/// Merges overlapping pieces: per elementary sub-interval only the best-ranked pieces count
/// (pieces of equal rank, i.e. the same source, add up); an instant counts unless a better-ranked
/// interval covers it. Returns (total, how many pieces contributed), `None` for no pieces.
pub fn merge_cumulative(pieces: &[Piece]) -> Option<(f64, usize)> {
    if pieces.is_empty() {
        return None;
    }
    let mut cuts: Vec<i64> = pieces.iter().filter(|p| p.b > p.a).flat_map(|p| [p.a, p.b]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    // A sweep over the elementary windows `[x, y)` between cuts: a piece covers a window iff
    // `a <= x < b` (its ends are cuts). The active set is kept in piece order, so the additions
    // happen in exactly the order of the direct definition (window by window, then piece by
    // piece): the same floating-point sum, in O(pieces × overlap) instead of O(cuts × pieces).
    let mut by_start: Vec<usize> = (0..pieces.len()).filter(|&i| pieces[i].b > pieces[i].a).collect();
    by_start.sort_by_key(|&i| pieces[i].a);
    let mut next = 0;
    let mut active: BTreeSet<usize> = BTreeSet::new();
    let mut sum = 0.0;
    let mut used = vec![false; pieces.len()];
    for w in cuts.windows(2) {
        let (x, y) = (w[0], w[1]);
        while next < by_start.len() && pieces[by_start[next]].a <= x {
            active.insert(by_start[next]);
            next += 1;
        }
        active.retain(|&i| pieces[i].b > x);
        let Some(best) = active.iter().map(|&i| &pieces[i].rank).min() else { continue };
        for &i in active.iter().filter(|&&i| &pieces[i].rank == best) {
            let p = &pieces[i];
            sum += p.value * (y - x) as f64 / (p.b - p.a) as f64;
            used[i] = true;
        }
    }
    for (i, p) in pieces.iter().enumerate().filter(|(_, p)| p.b == p.a) {
        let beaten = pieces.iter().any(|q| q.b > q.a && q.a <= p.a && p.a < q.b && q.rank < p.rank);
        if !beaten {
            sum += p.value;
            used[i] = true;
        }
    }
    Some((sum, used.iter().filter(|u| **u).count()))
}

/// The direct definition [`merge_cumulative`] is proven against (tests only).
#[cfg(test)]
pub fn merge_cumulative_direct(pieces: &[Piece]) -> Option<(f64, usize)> {
    if pieces.is_empty() {
        return None;
    }
    let mut cuts: Vec<i64> = pieces.iter().filter(|p| p.b > p.a).flat_map(|p| [p.a, p.b]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut sum = 0.0;
    let mut used = BTreeSet::new();
    for w in cuts.windows(2) {
        let (x, y) = (w[0], w[1]);
        let covering = || pieces.iter().enumerate().filter(|(_, p)| p.b > p.a && p.a <= x && p.b >= y);
        let Some(best) = covering().map(|(_, p)| &p.rank).min() else { continue };
        for (i, p) in covering().filter(|(_, p)| &p.rank == best) {
            sum += p.value * (y - x) as f64 / (p.b - p.a) as f64;
            used.insert(i);
        }
    }
    for (i, p) in pieces.iter().enumerate().filter(|(_, p)| p.b == p.a) {
        let beaten = pieces.iter().any(|q| q.b > q.a && q.a <= p.a && p.a < q.b && q.rank < p.rank);
        if !beaten {
            sum += p.value;
            used.insert(i);
        }
    }
    Some((sum, used.len()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn piece() -> impl Strategy<Value = Piece> {
        (0i64..40, 0i64..12, 0.0f64..500.0, 0usize..3).prop_map(|(a, len, value, r)| Piece {
            a,
            b: a + len,
            value,
            rank: (r, 0, format!("s{r}")),
        })
    }

    proptest! {
        /// The sweep adds the same terms in the same order as the definition: bit-identical.
        #[test]
        fn the_sweep_equals_the_direct_definition(pieces in proptest::collection::vec(piece(), 0..40)) {
            let got = merge_cumulative(&pieces);
            let want = merge_cumulative_direct(&pieces);
            prop_assert_eq!(got.map(|(s, n)| (s.to_bits(), n)), want.map(|(s, n)| (s.to_bits(), n)));
        }
    }
}
