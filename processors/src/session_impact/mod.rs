//! `session_impact`: what one consumption session did to the user's vitals (DOMAIN.md, "Sessions
//! and their impact"): per metric, the samples before, during and after the session, and the
//! deltas of the means.
//!
//! **Sessions.** A session is the fold of its domain changes (SESSION_STARTED / UPDATED / ENDED /
//! DELETED), whatever order they arrive in:
//! * every session change sets the fields it carries (`product_id`, `start_ms`, `end_ms`; the kind
//!   is informational); per field the change with the greatest `(occurred_at_ms, change_id)`
//!   wins (ties, which only a malformed producer can cause, go to the greater value). A field
//!   is never cleared: a change that leaves it out leaves it as it is;
//! * SESSION_DELETED wins outright: once any deletion of a session id has been seen, the session
//!   is retracted and every change of that id, earlier or later, is ignored (ids are never reused;
//!   a device with a skewed clock cannot resurrect a session the user deleted);
//! * a session without a start is not emitted (yet); a session whose folded end is before its
//!   start, or that is longer than `max_session_min`, is not emitted either (and retracted if it
//!   was). A single change that carries both bounds in that state is refused as invalid
//!   (`session_end_before_start`, `session_too_long`), as is a session change without a session
//!   or with an empty id (`missing_session`). A sample is refused for an unknown metric
//!   (`unknown_metric`), a non-finite value (`value_not_finite`) or an interval that ends before
//!   it starts (`bad_sample_interval`); a refused record is refused whole;
//! * a session without an end is ongoing: it is emitted PROVISIONAL with `end_ms = None` and only
//!   its `before` window (no `during`, no `after`, no deltas, no timer) — the during window of an
//!   open session would depend on the wall clock. Its during/after appear with its end.
//!
//! **Windows** (`Config`, defaults): before = [start − 60 min, start), during = [start, end),
//! after = [end, end + 120 min). Only discrete and cumulative metrics count (category and instant
//! metrics are ignored). For each metric with data in some window one [`WindowedMetric`]:
//! * discrete (heart rate, HRV, …): a sample belongs to the window holding its `start_ms`; every
//!   source counts. [`WindowStats`]: `n` samples, `mean`, `min`, `max` of their values, `total` =
//!   the sum of the values (n × mean);
//! * cumulative (steps, energy, …): the window's total by [`merge_cumulative`] — never summed
//!   across sources, per sub-interval the best-ranked source wins, a sample straddling a window
//!   bound counts pro rata by time. `total` = that total, `n` = the sample pieces that
//!   contributed, `mean` = the rate per minute of the window (total ÷ window minutes: the windows
//!   have different lengths, the rates compare), `min` = `max` = `mean` (one figure per window).
//!   A window without samples has no stats (no data is not zero: the device may not have been
//!   worn);
//! * `delta_during` = during.mean − before.mean, `delta_after` = after.mean − before.mean, when
//!   both windows have stats (for cumulative metrics a difference of rates per minute).
//!
//! **Status.** PROVISIONAL until stream time ≥ end + after + grace (30 min), then FINAL. A timer
//! named after the session is armed at that instant and re-emits the impact as FINAL when stream
//! time reaches it. Every (re)computation takes the status from the current stream time, so a
//! final session whose end moves later becomes provisional again until its new time; late samples
//! after that point still update the figures (and the status stays FINAL). The emitted value is
//! therefore a pure function of (the final inputs, the final stream time): [`oracle`] computes
//! exactly that, and the tests prove the streaming projection equals it.
//!
//! **Samples.** Identity, edits and deletions through [`Identities`]. Effective discrete and
//! cumulative samples are indexed in state by hour bucket (a discrete sample in the bucket of its
//! start, a cumulative one in every bucket it overlaps, at most [`MAX_SAMPLE_BUCKETS`]), and the
//! sessions by the buckets of [start − before, end + after) (ongoing: of the before window); a
//! sample change re-derives only the sessions indexed in its buckets, and a session that arrives
//! after its samples (backfill) gathers them from its buckets. A sample is a candidate of a
//! session when one of its buckets is one of the session's. Source priority comes from the
//! domain-changes lane (as in `rollup_day`); a change of it re-derives every session. Records only
//! mark sessions dirty: each is re-derived once at the end of the interval, however many records
//! touched it (see [`SessionImpactProcessor`]); a due timer re-derives its session at once.
//!
//! An unchanged recomputation emits nothing. State grows with the user's samples and sessions
//! (deleted sessions leave a small tombstone): samples can be edited, and sessions created for the
//! past, at any time.
//!
//! Output key `"{user}|{session_id}"`; a retraction is a tombstone with `deleted = true`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use vitals_schemas::catalog::{Catalog, MetricKind};
use vitals_schemas::{DomainChange, DomainChangeKind, ImpactStatus, Sample, SessionImpact, SourceOffset, WindowStats, WindowedMetric};

use crate::identity::{effective_samples, Identities, Keep};
use crate::keys::Sources;
use crate::sources::{merge_cumulative, Piece, Priority};
use crate::{Emitter, Input, Invalid, ProcessorInfo, State, StateExt};

pub const INFO: ProcessorInfo = ProcessorInfo {
    name: "session_impact",
    description: "Per session: before/during/after window stats per metric and their deltas; provisional until the after-window plus grace has passed",
    inputs: crate::Inputs::Lanes,
};

/// Built with its default [`Config`] (what the registry runs).
impl Default for SessionImpactProcessor {
    fn default() -> Self {
        SessionImpactProcessor::new(Config::default())
    }
}

/// Window lengths, in minutes. Negative values count as 0. Unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// before = [start − before_min, start).
    pub before_min: i64,
    /// after = [end, end + after_min).
    pub after_min: i64,
    /// The impact is final once stream time ≥ end + after_min + grace_min.
    pub grace_min: i64,
    /// A session longer than this is not a consumption session (and would make the windows huge).
    pub max_session_min: i64,
}

impl Default for Config {
    fn default() -> Config {
        Config { before_min: 60, after_min: 120, grace_min: 30, max_session_min: 24 * 60 }
    }
}

const MIN_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
/// A cumulative sample is indexed in at most this many hour buckets (its first ones).
pub const MAX_SAMPLE_BUCKETS: usize = 48;
const SEP: char = '\u{1f}';

fn minutes(m: i64) -> i64 {
    m.max(0).saturating_mul(MIN_MS)
}

impl Config {
    /// When the impact of a session ending at `end_ms` becomes final.
    pub fn final_at(&self, end_ms: i64) -> i64 {
        end_ms.saturating_add(minutes(self.after_min)).saturating_add(minutes(self.grace_min))
    }

    /// The windows of a session: before, and (once it has an end) during and after.
    pub fn windows(&self, s: &Resolved) -> Windows {
        let before = (s.start_ms.saturating_sub(minutes(self.before_min)), s.start_ms);
        match s.end_ms {
            Some(e) => Windows { before, during: Some((s.start_ms, e)), after: Some((e, e.saturating_add(minutes(self.after_min)))) },
            None => Windows { before, during: None, after: None },
        }
    }

    /// The hour buckets (first, last, inclusive) of everything the windows cover; `None` if empty.
    pub fn buckets(&self, s: &Resolved) -> Option<(i64, i64)> {
        let w = self.windows(s);
        let hi = w.after.map(|a| a.1).unwrap_or(w.before.1);
        (hi > w.before.0).then(|| (bucket(w.before.0), bucket(hi - 1)))
    }
}

/// `[a, b)` of each window, in ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Windows {
    pub before: (i64, i64),
    pub during: Option<(i64, i64)>,
    pub after: Option<(i64, i64)>,
}

fn bucket(t: i64) -> i64 {
    t.div_euclid(HOUR_MS)
}

/// The hour buckets a sample is indexed in: discrete in the bucket of its start, cumulative in
/// those it overlaps (an instant: its start's), other kinds in none.
pub fn sample_buckets(s: &Sample, kind: MetricKind) -> Vec<i64> {
    match kind {
        MetricKind::Discrete => vec![bucket(s.start_ms)],
        MetricKind::Cumulative if s.end_ms <= s.start_ms => vec![bucket(s.start_ms)],
        MetricKind::Cumulative => (bucket(s.start_ms)..=bucket(s.end_ms - 1)).take(MAX_SAMPLE_BUCKETS).collect(),
        MetricKind::Category | MetricKind::Instant => Vec::new(),
    }
}

// ---- sessions --------------------------------------------------------------------------------

/// One field of a session as last set: the change that set it, and the value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Field<T> {
    pub by: (i64, String),
    pub value: T,
}

fn set_field<T: Ord + Clone>(slot: &mut Option<Field<T>>, by: &(i64, String), value: Option<&T>) -> bool {
    let Some(value) = value else { return false };
    if slot.as_ref().is_some_and(|f| (&f.by, &f.value) >= (by, value)) {
        return false;
    }
    *slot = Some(Field { by: by.clone(), value: value.clone() });
    true
}

/// The fold of one session's changes (order-independent; see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionFold {
    pub product_id: Option<Field<String>>,
    pub start_ms: Option<Field<i64>>,
    pub end_ms: Option<Field<i64>>,
    /// A deletion was seen: the session is gone for good.
    pub deleted: bool,
}

/// A session as it is emitted.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub product_id: Option<String>,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
}

fn is_session_change(kind: DomainChangeKind) -> bool {
    matches!(kind, DomainChangeKind::SessionStarted | DomainChangeKind::SessionUpdated | DomainChangeKind::SessionEnded | DomainChangeKind::SessionDeleted)
}

impl SessionFold {
    /// Folds one (valid) change of this session in; `true` if the fold changed.
    pub fn apply(&mut self, c: &DomainChange) -> bool {
        if self.deleted {
            return false;
        }
        let Some(s) = &c.session else { return false };
        if c.kind == DomainChangeKind::SessionDeleted {
            *self = SessionFold { deleted: true, ..SessionFold::default() };
            return true;
        }
        let by = (c.occurred_at_ms, c.change_id.clone());
        let a = set_field(&mut self.product_id, &by, s.product_id.as_ref());
        let b = set_field(&mut self.start_ms, &by, s.start_ms.as_ref());
        let e = set_field(&mut self.end_ms, &by, s.end_ms.as_ref());
        a || b || e
    }

    /// The session to emit, `None` when there is none (deleted, no start, end before start, too long).
    pub fn resolve(&self, cfg: &Config) -> Option<Resolved> {
        if self.deleted {
            return None;
        }
        let start_ms = self.start_ms.as_ref()?.value;
        let end_ms = self.end_ms.as_ref().map(|f| f.value);
        if let Some(e) = end_ms {
            if e < start_ms || e.saturating_sub(start_ms) > minutes(cfg.max_session_min) {
                return None;
            }
        }
        Some(Resolved { product_id: self.product_id.as_ref().map(|f| f.value.clone()), start_ms, end_ms })
    }
}

// ---- validation ------------------------------------------------------------------------------

fn check_sample(s: &Sample) -> Result<(), Invalid> {
    if Catalog::embedded().get(&s.metric).is_none() {
        return Err(Invalid { code: "unknown_metric", reason: format!("metric `{}` is not in the catalog", s.metric) });
    }
    if s.end_ms.checked_sub(s.start_ms).is_none_or(|d| d < 0) {
        return Err(Invalid { code: "bad_sample_interval", reason: format!("sample {}/{} ends before it starts", s.source, s.source_record_id) });
    }
    if !s.value.is_finite() {
        return Err(Invalid { code: "value_not_finite", reason: format!("sample {}/{} has a non-finite value", s.source, s.source_record_id) });
    }
    Ok(())
}

fn check_change(cfg: &Config, c: &DomainChange) -> Result<(), Invalid> {
    let Some(s) = c.session.as_ref().filter(|s| !s.session_id.is_empty()) else {
        return Err(Invalid { code: "missing_session", reason: format!("change {} ({:?}) names no session", c.change_id, c.kind) });
    };
    if let (Some(a), Some(b)) = (s.start_ms, s.end_ms) {
        if b < a {
            return Err(Invalid { code: "session_end_before_start", reason: format!("session {}: end {b} is before start {a}", s.session_id) });
        }
        if b.saturating_sub(a) > minutes(cfg.max_session_min) {
            return Err(Invalid { code: "session_too_long", reason: format!("session {} lasts more than {} min", s.session_id, cfg.max_session_min) });
        }
    }
    Ok(())
}

/// Whether this processor accepts `input` (a pure function of the record alone: the oracle skips
/// exactly the records the processor refuses).
pub fn validate(cfg: &Config, input: &Input) -> Result<(), Invalid> {
    match input {
        Input::Samples(b) => b.samples.iter().try_for_each(check_sample),
        Input::Changes(b) => b.edits.iter().try_for_each(check_sample),
        Input::Domain(b) => b.changes.iter().filter(|c| is_session_change(c.kind)).try_for_each(|c| check_change(cfg, c)),
        Input::SessionImpact(_) => Ok(()),
    }
}

// ---- the aggregation -------------------------------------------------------------------------

fn discrete_stats(samples: &[&Sample], (a, b): (i64, i64)) -> Option<WindowStats> {
    let values: Vec<f64> = samples.iter().filter(|s| s.start_ms >= a && s.start_ms < b).map(|s| s.value).collect();
    let (min, max) = (values.iter().copied().reduce(f64::min)?, values.iter().copied().reduce(f64::max)?);
    let total: f64 = values.iter().sum();
    let n = values.len() as i64;
    Some(WindowStats { n, mean: total / n as f64, min, max, total })
}

fn cumulative_stats(samples: &[&Sample], (a, b): (i64, i64), prio: &Priority) -> Option<WindowStats> {
    let pieces: Vec<Piece> = samples
        .iter()
        .filter_map(|s| {
            let clip = if s.end_ms <= s.start_ms {
                (s.start_ms >= a && s.start_ms < b).then_some((s.start_ms, s.start_ms))
            } else {
                let (x, y) = (s.start_ms.max(a), s.end_ms.min(b));
                (x < y).then_some((x, y))
            }?;
            Piece::clipped(s, clip, prio.rank(&s.source, s.source_kind))
        })
        .collect();
    let (total, used) = merge_cumulative(&pieces)?;
    // Pieces exist only inside a non-empty window: b > a.
    let rate = total / ((b - a) as f64 / MIN_MS as f64);
    Some(WindowStats { n: used as i64, mean: rate, min: rate, max: rate, total })
}

/// The impact of one session from its candidate samples (any order, any superset of the samples
/// inside its windows), the user's source priority and the stream time.
pub fn impact(cfg: &Config, user: &str, session_id: &str, s: &Resolved, samples: &[&Sample], prio: &Priority, stream_time_ms: i64) -> SessionImpact {
    let catalog = Catalog::embedded();
    let mut sorted: Vec<&Sample> = samples.to_vec();
    sorted.sort_by(|a, b| (&a.source, &a.source_record_id).cmp(&(&b.source, &b.source_record_id)));
    let mut by_metric: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
    for x in sorted {
        by_metric.entry(&x.metric).or_default().push(x);
    }
    let w = cfg.windows(s);
    let mut metrics = Vec::new();
    for (metric, xs) in by_metric {
        let stats = |win: (i64, i64)| match catalog.get(metric).map(|m| m.kind) {
            Some(MetricKind::Discrete) => discrete_stats(&xs, win),
            Some(MetricKind::Cumulative) => cumulative_stats(&xs, win, prio),
            _ => None,
        };
        let before = stats(w.before);
        let during = w.during.and_then(stats);
        let after = w.after.and_then(stats);
        if before.is_none() && during.is_none() && after.is_none() {
            continue;
        }
        let delta = |x: &Option<WindowStats>| Some(x.as_ref()?.mean - before.as_ref()?.mean);
        metrics.push(WindowedMetric { metric: metric.to_owned(), delta_during: delta(&during), delta_after: delta(&after), before, during, after });
    }
    let status = match s.end_ms {
        Some(e) if stream_time_ms >= cfg.final_at(e) => ImpactStatus::Final,
        _ => ImpactStatus::Provisional,
    };
    SessionImpact {
        user_id: user.to_owned(),
        session_id: session_id.to_owned(),
        product_id: s.product_id.clone(),
        start_ms: s.start_ms,
        end_ms: s.end_ms,
        status,
        metrics,
        version_epoch: 0,
        version_seq: 0,
        deleted: false,
        source_offsets: vec![],
    }
}

/// The output key of a session.
pub fn output_key(user: &str, session_id: &str) -> String {
    format!("{user}|{session_id}")
}

impl crate::Versioned for SessionImpact {
    fn stamp(&mut self, epoch: i64, seq: i64, offsets: Vec<SourceOffset>) {
        self.version_epoch = epoch;
        self.version_seq = seq;
        self.source_offsets = offsets;
    }
    fn tombstone(user: &str, key: &str) -> SessionImpact {
        let session = key.strip_prefix(user).and_then(|k| k.strip_prefix('|')).unwrap_or(key);
        SessionImpact {
            user_id: user.to_owned(),
            session_id: session.to_owned(),
            product_id: None,
            start_ms: 0,
            end_ms: None,
            status: ImpactStatus::Provisional,
            metrics: vec![],
            version_epoch: 0,
            version_seq: 0,
            deleted: true,
            source_offsets: vec![],
        }
    }
}

// ---- streaming -------------------------------------------------------------------------------

/// Where sample identities live in this processor's state, and what of each is kept: the value
/// ([`impact`] reads source, record id, kind, metric, start, end and value; never the category,
/// which only category metrics have and they are not counted, nor the time zone: windows are in
/// UTC milliseconds).
const IDS: Identities = Identities { namespace: "id", keep: Keep { value: true, category: false, time_zone: false } };

fn sample_ix_prefix(b: i64) -> String {
    format!("ix{SEP}{b}{SEP}")
}
/// An entry of the sample index: bucket, then the identity as [`Identities`] keys it.
fn sample_ix_key(b: i64, code: u64, record: &str) -> String {
    let mut k = sample_ix_prefix(b);
    crate::keys::push_identity(&mut k, code, record);
    k
}
fn session_ix_prefix(b: i64) -> String {
    format!("sx{SEP}{b}{SEP}")
}
fn session_key(session_id: &str) -> String {
    format!("ss{SEP}{session_id}")
}

/// What is held per session.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Held {
    fold: SessionFold,
    /// The buckets the session is indexed under (`sx`).
    indexed: Option<(i64, i64)>,
    /// The value last emitted (`None`: nothing, or retracted).
    last: Option<SessionImpact>,
}

/// Recomputation is deferred to the end of the interval ([`crate::Processor::end_interval`]):
/// `process` applies a record to state (identities, the sample index `ix`, folds, priority) at
/// once and only collects the sessions it makes dirty; each dirty session is then re-derived
/// once, however many records of the interval touched it.
///
/// Why no session is missed although the session index `sx` is only maintained by
/// [`SessionImpactProcessor::recompute`] (so during an interval it may lag behind the folds):
/// the only thing that changes a session's range is a change of its fold — a session change
/// (start or end moved, deleted, or made consistent/inconsistent) — and the record that makes
/// that change marks the session dirty. So a session whose `sx` entries are stale is always
/// already dirty, and `recompute` at the end gathers its samples from its *current* range
/// (`ix`, which `process` keeps up to date), whatever buckets later samples of the interval
/// landed in. Stale entries the other way (buckets the session no longer covers) only make a
/// session dirty needlessly; re-deriving it is harmless (unchanged: nothing emitted). A priority
/// change marks every held session dirty; a sample change marks the sessions `sx` lists in its
/// buckets before and after. A timer (`on_timer`) re-derives its session at once from the same
/// current state (nothing it reads is deferred, only the recomputation), and fixes `sx` for it.
pub struct SessionImpactProcessor {
    cfg: Config,
    catalog: &'static Catalog,
    /// Per user: the sessions made dirty in this interval, re-derived at its end.
    dirty: BTreeMap<String, BTreeSet<String>>,
}

impl SessionImpactProcessor {
    pub fn new(cfg: Config) -> SessionImpactProcessor {
        SessionImpactProcessor { cfg, catalog: Catalog::embedded(), dirty: BTreeMap::new() }
    }
}

impl crate::Processor for SessionImpactProcessor {
    type Output = SessionImpact;
    /// 3: identity and sample-index keys name the source by a per-user code and a UUID record
    /// id by its 16 bytes (2 spelled both out; 2 and 3 both: identities as compact binary
    /// values, the fields this processor reads only; 1 was JSON `Sample`s).
    const STATE_FORMAT: i64 = 3;

    fn process(&mut self, input: &Input, state: &mut dyn State, out: &mut dyn Emitter<SessionImpact>) -> Result<(), Invalid> {
        // The only refusal, before anything is written or deferred.
        validate(&self.cfg, input)?;
        let _ = out; // outputs come at the end of the interval
        let mut buckets: BTreeSet<i64> = BTreeSet::new();
        // A refusal comes before anything is taken from the deferred work or written.
        let mut src = IDS.sources(state);
        match input {
            Input::Samples(b) => src.admit(b.samples.iter().map(|s| s.source.as_str()))?,
            Input::Changes(b) => src.admit(b.edits.iter().map(|s| s.source.as_str()).chain(b.deletions.iter().map(|d| d.source.as_str())))?,
            _ => {}
        }
        let mut dirty = self.dirty.remove(input.user_id()).unwrap_or_default();
        match input {
            Input::Samples(b) => {
                for s in &b.samples {
                    let c = IDS.upsert(state, &mut src, s);
                    self.reindex(state, &mut src, c.before.as_ref(), c.after.as_ref(), &mut buckets);
                }
            }
            Input::Changes(b) => {
                for s in &b.edits {
                    let c = IDS.upsert(state, &mut src, s);
                    self.reindex(state, &mut src, c.before.as_ref(), c.after.as_ref(), &mut buckets);
                }
                for d in &b.deletions {
                    let c = IDS.delete(state, &mut src, &d.source, &d.source_record_id, d.deleted_version);
                    self.reindex(state, &mut src, c.before.as_ref(), c.after.as_ref(), &mut buckets);
                }
            }
            Input::Domain(b) => {
                if Priority::apply(state, b) {
                    let prefix = session_key("");
                    for (k, _) in state.scan(&prefix) {
                        dirty.insert(k[prefix.len()..].to_owned());
                    }
                }
                for c in b.changes.iter().filter(|c| is_session_change(c.kind)) {
                    let Some(s) = &c.session else { continue };
                    let key = session_key(&s.session_id);
                    let mut held: Held = state.get_json(&key).unwrap_or_default();
                    if held.fold.apply(c) {
                        state.put_json(&key, &held);
                        dirty.insert(s.session_id.clone());
                    }
                }
            }
            Input::SessionImpact(_) => {} // not an input of this processor
        }
        for b in buckets {
            let prefix = session_ix_prefix(b);
            for (k, _) in state.scan(&prefix) {
                dirty.insert(k[prefix.len()..].to_owned());
            }
        }
        if !dirty.is_empty() {
            self.dirty.insert(input.user_id().to_owned(), dirty);
        }
        Ok(())
    }

    fn begin_interval(&mut self) {
        // Deferred by an interval that did not end: it is redone from the checkpoint.
        self.dirty.clear();
    }

    fn end_interval(&mut self, user: &str, state: &mut dyn State, out: &mut dyn Emitter<SessionImpact>) {
        for session_id in self.dirty.remove(user).unwrap_or_default() {
            self.recompute(user, &session_id, state, out);
        }
    }

    fn on_timer(&mut self, user: &str, name: &str, state: &mut dyn State, out: &mut dyn Emitter<SessionImpact>) {
        self.recompute(user, name, state, out);
    }
}

impl SessionImpactProcessor {
    /// Moves a sample identity's index entries from `before` to `after`; collects both buckets.
    fn reindex(&self, state: &mut dyn State, src: &mut Sources, before: Option<&Sample>, after: Option<&Sample>, buckets: &mut BTreeSet<i64>) {
        if before == after {
            return;
        }
        let kind = |s: &Sample| self.catalog.get(&s.metric).map(|m| m.kind);
        if let Some(s) = before {
            for b in kind(s).map(|k| sample_buckets(s, k)).unwrap_or_default() {
                let code = src.code_or_add(state, &s.source);
                state.delete(&sample_ix_key(b, code, &s.source_record_id));
                buckets.insert(b);
            }
        }
        if let Some(s) = after {
            for b in kind(s).map(|k| sample_buckets(s, k)).unwrap_or_default() {
                let code = src.code_or_add(state, &s.source);
                state.put(&sample_ix_key(b, code, &s.source_record_id), Vec::new());
                buckets.insert(b);
            }
        }
    }

    /// The effective samples indexed in buckets `lo..=hi`.
    fn gather(&self, state: &dyn State, (lo, hi): (i64, i64)) -> Vec<Sample> {
        let src = IDS.sources(state);
        let mut ids: BTreeSet<(String, String)> = BTreeSet::new();
        for b in lo..=hi {
            let prefix = sample_ix_prefix(b);
            for (k, _) in state.scan(&prefix) {
                match src.identity(&k[prefix.len()..]) {
                    Ok(id) => {
                        ids.insert(id);
                    }
                    Err(e) => state.fail(format!("state key {:?} does not deserialise: {e}", crate::keys::printable(&k))),
                }
            }
        }
        // In (source, source_record_id) order, as the aggregation adds them.
        ids.into_iter().filter_map(|(s, r)| IDS.get(state, &src, &s, &r)).collect()
    }

    /// Re-derives one session from state: upsert, retraction or nothing (unchanged); arms or
    /// disarms its timer.
    fn recompute(&self, user: &str, session_id: &str, state: &mut dyn State, out: &mut dyn Emitter<SessionImpact>) {
        let key = session_key(session_id);
        let Some(mut held) = state.get_json::<Held>(&key) else { return };
        let resolved = held.fold.resolve(&self.cfg);
        let range = resolved.as_ref().and_then(|r| self.cfg.buckets(r));
        if range != held.indexed {
            if let Some((lo, hi)) = held.indexed {
                (lo..=hi).for_each(|b| state.delete(&format!("{}{session_id}", session_ix_prefix(b))));
            }
            if let Some((lo, hi)) = range {
                (lo..=hi).for_each(|b| state.put(&format!("{}{session_id}", session_ix_prefix(b)), Vec::new()));
            }
            held.indexed = range;
        }
        match resolved {
            None => {
                state.cancel_timer(session_id);
                if held.last.take().is_some() {
                    out.retract(output_key(user, session_id));
                }
            }
            Some(r) => {
                let samples = range.map(|rg| self.gather(state, rg)).unwrap_or_default();
                let refs: Vec<&Sample> = samples.iter().collect();
                let prio = Priority::load(state);
                let value = impact(&self.cfg, user, session_id, &r, &refs, &prio, state.stream_time_ms());
                match (value.status, r.end_ms) {
                    (ImpactStatus::Provisional, Some(e)) => state.set_timer(session_id, self.cfg.final_at(e)),
                    _ => state.cancel_timer(session_id),
                }
                if held.last.as_ref() != Some(&value) {
                    out.upsert(output_key(user, session_id), value.clone());
                    held.last = Some(value);
                }
            }
        }
        state.put_json(&key, &held);
    }
}

// ---- the oracle ------------------------------------------------------------------------------

/// The batch oracle with the default config: the impacts the final set of inputs implies at
/// stream time `stream_time_ms`, in one pass with no streaming state. Keys as [`output_key`].
pub fn oracle(inputs: &[Input], stream_time_ms: i64) -> BTreeMap<String, SessionImpact> {
    oracle_with(&Config::default(), inputs, stream_time_ms)
}

/// [`oracle`] with a given config.
pub fn oracle_with(cfg: &Config, inputs: &[Input], stream_time_ms: i64) -> BTreeMap<String, SessionImpact> {
    let catalog = Catalog::embedded();
    let valid: Vec<Input> = inputs.iter().filter(|i| validate(cfg, i).is_ok()).cloned().collect();
    let samples = effective_samples(&valid);
    let prio = Priority::oracle(&valid);
    let mut folds: BTreeMap<(String, String), SessionFold> = BTreeMap::new();
    for input in &valid {
        if let Input::Domain(b) = input {
            for c in b.changes.iter().filter(|c| is_session_change(c.kind)) {
                if let Some(s) = &c.session {
                    folds.entry((b.user_id.clone(), s.session_id.clone())).or_default().apply(c);
                }
            }
        }
    }
    let none_p = Priority::default();
    let none_s = Vec::new();
    let mut out = BTreeMap::new();
    for ((user, session_id), fold) in folds {
        let Some(r) = fold.resolve(cfg) else { continue };
        let range = cfg.buckets(&r);
        let candidates: Vec<&Sample> = samples
            .get(&user)
            .unwrap_or(&none_s)
            .iter()
            .filter(|s| {
                let Some((lo, hi)) = range else { return false };
                let kind = catalog.get(&s.metric).map(|m| m.kind);
                kind.is_some_and(|k| sample_buckets(s, k).iter().any(|b| (lo..=hi).contains(b)))
            })
            .collect();
        let p = prio.get(&user).unwrap_or(&none_p);
        out.insert(output_key(&user, &session_id), impact(cfg, &user, &session_id, &r, &candidates, p, stream_time_ms));
    }
    out
}

/// Scenarios and generators, public under feature `testkit` (the runtime's takeover properties).
#[cfg(any(test, feature = "testkit"))]
#[cfg_attr(not(test), allow(dead_code, unused_imports, unused_macros))]
pub mod tests;
