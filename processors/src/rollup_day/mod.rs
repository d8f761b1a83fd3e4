//! `rollup_day`: per (user, metric, local date) aggregates, as DOMAIN.md defines them.
//!
//! * cumulative (steps, energy, distance, flights): sum; never summed across sources — per
//!   elementary sub-interval the highest-priority source wins, and an interval sample that
//!   straddles a day boundary is split pro rata by time;
//! * discrete (heart rate, HRV, …): count, min, max, mean and a time-weighted mean over every
//!   source; priority only picks `primary_source`;
//! * category (sleep stages, mindful): minutes per category from one source per day (highest
//!   priority with data that day), split at day boundaries;
//! * instant (body mass, VO2max): last value of the day, min and max from the highest-priority
//!   source with data that day.
//!
//! Days are local to each sample's own zone (23/25-hour DST days, travel). Discrete and instant
//! samples belong to the local date of their start; cumulative and category samples to every
//! date they overlap. Identity is (source, source_record_id): a higher version replaces, the same
//! or a lower one is ignored, a deletion removes the versions it names (all when it names none),
//! in whatever order they arrive. Every change recomputes the affected days from state, and a day
//! left without samples is retracted. Source priority: the user's list (from the domain-changes
//! lane, latest `occurred_at` wins) first in its order, then manual > watch > phone > third-party,
//! then source name.
//!
//! [`aggregate_day`] is the one aggregation; [`oracle`] applies it to the final sample set in one
//! batch, and the tests prove the streaming result equals it whatever the order, duplication,
//! edits and deletions.

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDate;
use serde::Deserialize;
use vitals_schemas::catalog::{Catalog, MetricKind};
use vitals_schemas::{RollupDay, Sample};

use crate::identity::{effective_samples, Identities};
use crate::sources::{merge_cumulative, Piece, Priority};
use crate::time::{dates_covered, Zone};
use crate::{Emitter, Input, Invalid, ProcessorInfo, State};

pub const INFO: ProcessorInfo = ProcessorInfo {
    name: "rollup_day",
    description: "Daily rollups per (user, metric, local date): value-kind-aware, source priority, DST, edits, deletions, late backfill",
    inputs: crate::Inputs::Lanes,
    output_topic: |t| t.rollup_day.clone(),
    run: |args| crate::runtime::run(RollupDayProcessor::new(Config::default()), args),
};

/// No tunables yet; unknown keys are refused so a typo never goes unnoticed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {}

/// A sample spanning more days than this is only counted in its first days.
const MAX_DAYS_PER_SAMPLE: usize = 31;
const SEP: char = '\u{1f}';

/// Where sample identities live in this processor's state.
const IDS: Identities = Identities { namespace: "id" };
fn ix_prefix(metric: &str, date: NaiveDate) -> String {
    format!("ix{SEP}{metric}{SEP}{date}{SEP}")
}
fn ix_key(metric: &str, date: NaiveDate, s: &str, r: &str) -> String {
    format!("{}{s}{SEP}{r}", ix_prefix(metric, date))
}
fn emitted_key(metric: &str, date: NaiveDate) -> String {
    format!("out{SEP}{metric}{SEP}{date}")
}

/// The output key of a day.
pub fn output_key(user: &str, metric: &str, date: NaiveDate) -> String {
    format!("{user}|{metric}|{date}")
}

/// The dates a sample counts on.
fn sample_dates(s: &Sample, kind: MetricKind) -> Vec<NaiveDate> {
    let z = Zone::parse(&s.time_zone);
    match kind {
        MetricKind::Discrete | MetricKind::Instant => vec![z.local_date(s.start_ms)],
        MetricKind::Cumulative | MetricKind::Category => dates_covered(&z, s.start_ms, s.end_ms, MAX_DAYS_PER_SAMPLE),
    }
}

pub struct RollupDayProcessor {
    catalog: &'static Catalog,
}

impl RollupDayProcessor {
    pub fn new(_config: Config) -> RollupDayProcessor {
        RollupDayProcessor { catalog: Catalog::embedded() }
    }
}

impl crate::Processor for RollupDayProcessor {
    type Output = RollupDay;

    fn process(&mut self, input: &Input, state: &mut dyn State, out: &mut dyn Emitter<RollupDay>) -> Result<(), Invalid> {
        let user = input.user_id().to_owned();
        let mut dirty: BTreeSet<(String, NaiveDate)> = BTreeSet::new();
        match input {
            Input::Samples(b) => {
                for s in &b.samples {
                    self.upsert(state, s, &mut dirty)?;
                }
            }
            Input::Changes(b) => {
                for s in &b.edits {
                    self.upsert(state, s, &mut dirty)?;
                }
                for d in &b.deletions {
                    let c = IDS.delete(state, &d.source, &d.source_record_id, d.deleted_version);
                    if !c.is_noop() {
                        self.reindex(state, c.before.as_ref(), c.after.as_ref(), &mut dirty);
                    }
                }
            }
            Input::SessionImpact(_) => {} // not an input of this processor
            Input::Domain(b) => {
                let changed = Priority::apply(state, b);
                if changed {
                    // Every day of the user may change: re-derive them all.
                    for (k, _) in state.scan(&format!("out{SEP}")) {
                        let mut parts = k.split(SEP).skip(1);
                        if let (Some(m), Some(d)) = (parts.next(), parts.next().and_then(|d| d.parse().ok())) {
                            dirty.insert((m.to_owned(), d));
                        }
                    }
                }
            }
        }
        let prio = Priority::load(state);
        for (metric, date) in dirty {
            self.recompute(&user, &metric, date, &prio, state, out);
        }
        Ok(())
    }
}

impl RollupDayProcessor {
    fn upsert(&self, state: &mut dyn State, s: &Sample, dirty: &mut BTreeSet<(String, NaiveDate)>) -> Result<(), Invalid> {
        if self.catalog.get(&s.metric).is_none() {
            return Err(Invalid { code: "unknown_metric", reason: format!("metric `{}` is not in the catalog", s.metric) });
        }
        let c = IDS.upsert(state, s);
        if !c.is_noop() {
            self.reindex(state, c.before.as_ref(), c.after.as_ref(), dirty);
        }
        Ok(())
    }

    /// Moves an identity's index entries from `before` to `after` and marks both sets of days.
    fn reindex(&self, state: &mut dyn State, before: Option<&Sample>, after: Option<&Sample>, dirty: &mut BTreeSet<(String, NaiveDate)>) {
        if let Some(b) = before {
            if let Some(spec) = self.catalog.get(&b.metric) {
                for d in sample_dates(b, spec.kind) {
                    state.delete(&ix_key(&b.metric, d, &b.source, &b.source_record_id));
                    dirty.insert((b.metric.clone(), d));
                }
            }
        }
        if let Some(a) = after {
            if let Some(spec) = self.catalog.get(&a.metric) {
                for d in sample_dates(a, spec.kind) {
                    state.put(&ix_key(&a.metric, d, &a.source, &a.source_record_id), Vec::new());
                    dirty.insert((a.metric.clone(), d));
                }
            }
        }
    }

    fn recompute(&self, user: &str, metric: &str, date: NaiveDate, prio: &Priority, state: &mut dyn State, out: &mut dyn Emitter<RollupDay>) {
        let mut samples = Vec::new();
        for (k, _) in state.scan(&ix_prefix(metric, date)) {
            let mut parts = k.split(SEP).skip(3);
            if let (Some(s), Some(r)) = (parts.next(), parts.next()) {
                if let Some(e) = IDS.get(state, s, r) {
                    samples.push(e);
                }
            }
        }
        let refs: Vec<&Sample> = samples.iter().collect();
        let ek = emitted_key(metric, date);
        match aggregate_day(user, metric, date, &refs, prio) {
            Some(row) => {
                state.put(&ek, b"1".to_vec());
                out.upsert(output_key(user, metric, date), row);
            }
            None => {
                if state.get(&ek).is_some() {
                    state.delete(&ek);
                    out.retract(output_key(user, metric, date));
                }
            }
        }
    }
}

/// A row of (user, metric, local date) with no figures yet (also the body of a retraction).
pub fn blank_row(user: &str, metric: &str, local_date: &str) -> RollupDay {
    let spec = Catalog::embedded().get(metric);
    RollupDay {
        user_id: user.to_owned(),
        metric: metric.to_owned(),
        local_date: local_date.to_owned(),
        unit: spec.map(|s| s.unit.clone()).unwrap_or_default(),
        kind: spec.map(|s| s.kind.to_record()).unwrap_or(vitals_schemas::MetricKindRecord::Cumulative),
        count: 0,
        sum: None,
        min: None,
        max: None,
        mean: None,
        time_weighted_mean: None,
        last: None,
        category_minutes: Default::default(),
        primary_source: None,
        version_epoch: 0,
        version_seq: 0,
        deleted: false,
        source_offsets: vec![],
    }
}

/// The rollup of one (user, metric, date) from the effective samples that count on that date.
/// `None` when nothing counts (the day is retracted). Deterministic in the set of samples,
/// whatever their order.
pub fn aggregate_day(user: &str, metric: &str, date: NaiveDate, samples: &[&Sample], prio: &Priority) -> Option<RollupDay> {
    let spec = Catalog::embedded().get(metric)?;
    let mut samples: Vec<&Sample> = samples.to_vec();
    samples.sort_by(|a, b| (&a.source, &a.source_record_id).cmp(&(&b.source, &b.source_record_id)));
    if samples.is_empty() {
        return None;
    }
    let rank = |s: &Sample| prio.rank(&s.source, s.source_kind);
    let best_source = samples.iter().map(|s| (rank(s), s.source.clone())).min().map(|(_, s)| s);
    let mut row = blank_row(user, metric, &date.to_string());
    row.primary_source = best_source.clone();
    // The part of each sample inside its own local day.
    let clip = |s: &Sample| -> Option<(i64, i64)> {
        let (a, b) = Zone::parse(&s.time_zone).day_bounds(date);
        if s.end_ms <= s.start_ms {
            return (s.start_ms >= a && s.start_ms < b).then_some((s.start_ms, s.start_ms));
        }
        let (x, y) = (s.start_ms.max(a), s.end_ms.min(b));
        (x < y).then_some((x, y))
    };
    match spec.kind {
        MetricKind::Cumulative => {
            let pieces: Vec<Piece> = samples.iter().filter_map(|s| Piece::clipped(s, clip(s)?, rank(s))).collect();
            let (sum, used) = merge_cumulative(&pieces)?;
            row.count = used as i64;
            row.sum = Some(sum);
        }
        MetricKind::Discrete => {
            let values: Vec<(i64, f64)> = samples.iter().map(|s| (s.start_ms, s.value)).collect();
            row.count = values.len() as i64;
            row.min = values.iter().map(|v| v.1).reduce(f64::min);
            row.max = values.iter().map(|v| v.1).reduce(f64::max);
            let mean = values.iter().map(|v| v.1).sum::<f64>() / values.len() as f64;
            row.mean = Some(mean);
            // Midpoint rule: each value holds from halfway after its predecessor to halfway
            // before its successor; a lone value is its own mean.
            let mut sorted = values.clone();
            sorted.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
            let n = sorted.len();
            let (mut wsum, mut w) = (0.0, 0.0);
            for i in 0..n {
                let lo = if i == 0 { sorted[i].0 as f64 } else { (sorted[i - 1].0 + sorted[i].0) as f64 / 2.0 };
                let hi = if i + 1 == n { sorted[i].0 as f64 } else { (sorted[i].0 + sorted[i + 1].0) as f64 / 2.0 };
                wsum += sorted[i].1 * (hi - lo);
                w += hi - lo;
            }
            row.time_weighted_mean = Some(if w > 0.0 { wsum / w } else { mean });
        }
        MetricKind::Category => {
            let source = best_source?;
            let mut minutes: BTreeMap<String, f64> = BTreeMap::new();
            let mut count = 0;
            for s in samples.iter().filter(|s| s.source == source) {
                if let Some((a, b)) = clip(s) {
                    *minutes.entry(s.category.clone().unwrap_or_default()).or_default() += (b - a) as f64 / 60_000.0;
                    count += 1;
                }
            }
            if count == 0 {
                return None;
            }
            row.count = count;
            row.category_minutes = minutes.into_iter().collect();
        }
        MetricKind::Instant => {
            let source = best_source?;
            let mine: Vec<&&Sample> = samples.iter().filter(|s| s.source == source).collect();
            row.count = mine.len() as i64;
            row.min = mine.iter().map(|s| s.value).reduce(f64::min);
            row.max = mine.iter().map(|s| s.value).reduce(f64::max);
            row.last = mine.iter().max_by(|a, b| (a.start_ms, &a.source_record_id).cmp(&(b.start_ms, &b.source_record_id))).map(|s| s.value);
        }
    }
    Some(row)
}

/// The batch oracle: the rollups the final set of inputs implies, computed in one pass with no
/// streaming state. Keys as [`output_key`].
pub fn oracle(inputs: &[Input]) -> BTreeMap<String, RollupDay> {
    let catalog = Catalog::embedded();
    let prio = Priority::oracle(inputs);
    let mut days: BTreeMap<(String, String, NaiveDate), Vec<Sample>> = BTreeMap::new();
    for (user, samples) in effective_samples(inputs) {
        for s in samples {
            let Some(spec) = catalog.get(&s.metric) else { continue };
            for d in sample_dates(&s, spec.kind) {
                days.entry((user.clone(), s.metric.clone(), d)).or_default().push(s.clone());
            }
        }
    }
    let none = Priority::default();
    days.into_iter()
        .filter_map(|((user, metric, date), samples)| {
            let refs: Vec<&Sample> = samples.iter().collect();
            let p = prio.get(&user).unwrap_or(&none);
            aggregate_day(&user, &metric, date, &refs, p).map(|r| (output_key(&user, &metric, date), r))
        })
        .collect()
}

#[cfg(test)]
mod tests;
