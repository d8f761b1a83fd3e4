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

impl Priority {
    /// The user's list first, in its order; then manual > watch > phone > third-party; then the
    /// source name, so the order is total.
    pub fn rank(&self, source: &str, kind: SourceKind) -> Rank {
        let listed = self.sources.iter().position(|s| s == source).unwrap_or(usize::MAX);
        let kind_rank = match kind {
            SourceKind::Manual => 0,
            SourceKind::Watch => 1,
            SourceKind::Phone => 2,
            SourceKind::ThirdParty => 3,
        };
        (listed, kind_rank, source.to_owned())
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
    pub fn clipped(s: &Sample, (a, b): (i64, i64), rank: Rank) -> Option<Piece> {
        let dur = (s.end_ms - s.start_ms) as f64;
        let value = if dur > 0.0 { s.value * (b - a) as f64 / dur } else { s.value };
        Some(Piece { a, b, value, rank })
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
