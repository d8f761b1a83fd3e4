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

use std::collections::BTreeMap;
use std::rc::Rc;

use chrono::NaiveDate;
use serde::Deserialize;
use vitals_schemas::catalog::{Catalog, MetricKind};
use vitals_schemas::{RollupDay, Sample, SourceKind};

use crate::identity::{effective_samples, Deleted, SOURCES_KEY};
use crate::keys::Sources;
use crate::sources::{merge_cumulative, Piece, Priority};
use crate::time::{date_span, dates_covered, Zone};
use crate::{Emitter, Input, Invalid, ProcessorInfo, State};

mod days;
use days::{Day, Held, Identity, Rec, Src};

pub const INFO: ProcessorInfo = ProcessorInfo {
    name: "rollup_day",
    description: "Daily rollups per (user, metric, local date): value-kind-aware, source priority, DST, edits, deletions, late backfill",
    inputs: crate::Inputs::Lanes,
};

/// Built with its default [`Config`] (what the registry runs).
impl Default for RollupDayProcessor {
    fn default() -> Self {
        RollupDayProcessor::new(Config::default())
    }
}

/// No tunables yet; unknown keys are refused so a typo never goes unnoticed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {}

/// A sample spanning more days than this is only counted in its first days.
const MAX_DAYS_PER_SAMPLE: usize = 31;
const SEP: char = '\u{1f}';

/// State keys: `i<identity>` an identity ([`Identity`]; the source's code in the user's
/// dictionary and the record id, as [`crate::keys::push_identity`] writes them);
/// `d<metric>SEP<date>` a day ([`Day`]); `src` the dictionary ([`Sources`]); `priority` the
/// user's source priority.
fn identity_key(code: u64, record: &str) -> String {
    let mut k = String::new();
    identity_key_into(&mut k, code, record, crate::keys::parse_uuid(record));
    k
}
/// [`identity_key`] written into `buf` (cleared first): no allocation once `buf` has grown;
/// `parsed` is `record`'s [`crate::keys::parse_uuid`], shared with the day's key.
fn identity_key_into(buf: &mut String, code: u64, record: &str, parsed: Option<([u8; 16], bool)>) {
    buf.clear();
    buf.push('i');
    crate::keys::push_identity_parsed(buf, code, record, parsed);
}
fn day_key(metric: &str, date: NaiveDate) -> String {
    format!("d{metric}{SEP}{date}")
}
const DAY_PREFIX: &str = "d";

/// The output key of a day.
pub fn output_key(user: &str, metric: &str, date: NaiveDate) -> String {
    format!("{user}|{metric}|{date}")
}

/// The dates a sample counts on (contiguous).
fn sample_dates(s: &Sample, kind: MetricKind) -> Vec<NaiveDate> {
    sample_dates_in(&Zone::parse(&s.time_zone), s, kind)
}

fn sample_dates_in(z: &Zone, s: &Sample, kind: MetricKind) -> Vec<NaiveDate> {
    let z = *z;
    match kind {
        MetricKind::Discrete | MetricKind::Instant => vec![z.local_date(s.start_ms)],
        MetricKind::Cumulative | MetricKind::Category => dates_covered(&z, s.start_ms, s.end_ms, MAX_DAYS_PER_SAMPLE),
    }
}

/// [`sample_dates_in`] as (first date, how many), without a vector: the dates are `first` and
/// its successors, as [`Identity::at`](days::Identity) records them.
fn sample_span(z: &Zone, s: &Sample, kind: MetricKind) -> (NaiveDate, usize) {
    match kind {
        MetricKind::Discrete | MetricKind::Instant => (z.local_date(s.start_ms), 1),
        MetricKind::Cumulative | MetricKind::Category => date_span(z, s.start_ms, s.end_ms, MAX_DAYS_PER_SAMPLE),
    }
}

/// The processor. Within an interval, the days a user's records touch are held decoded here and
/// recomputed once each when the interval ends ([`crate::Processor::end_interval`]), so a day
/// touched by many records (or many samples) is read, aggregated and written once.
pub struct RollupDayProcessor {
    catalog: &'static Catalog,
    /// Per user: the days touched in this interval, decoded, and whether their samples changed.
    touched: BTreeMap<String, Touched>,
    /// Interned strings (sources, zones, categories) shared by the decoded days.
    names: std::collections::HashSet<Rc<str>, FastHash>,
    /// Zones parsed in this interval.
    zones: std::collections::HashMap<Rc<str>, Zone, FastHash>,
    /// The last zone looked up (a record's samples nearly always share one).
    last_zone: Option<(Rc<str>, Zone)>,
    /// The metrics looked up in the catalog, most recent first (a user has a handful).
    specs: Vec<(&'static str, &'static vitals_schemas::catalog::MetricSpec)>,
    /// A reused buffer for identity keys.
    key: String,
}

/// A fast, deterministic hasher for the interval's small string tables (FxHash's mixing step);
/// they hold names the processor interns, never keyed by anything an attacker chooses freely
/// beyond one user's own sources and zones.
#[derive(Default, Clone, Copy)]
struct FastHash;

impl std::hash::BuildHasher for FastHash {
    type Hasher = FxHasher;
    fn build_hasher(&self) -> FxHasher {
        FxHasher(0)
    }
}

struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(c.try_into().expect("8 bytes"))).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }
    fn write_u8(&mut self, b: u8) {
        self.write(&[b]);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl RollupDayProcessor {
    pub fn new(_config: Config) -> RollupDayProcessor {
        RollupDayProcessor {
            catalog: Catalog::embedded(),
            touched: BTreeMap::new(),
            names: Default::default(),
            zones: Default::default(),
            last_zone: None,
            specs: Vec::new(),
            key: String::new(),
        }
    }
}

impl crate::Processor for RollupDayProcessor {
    type Output = RollupDay;
    /// 3: identity keys name the source by a per-user code and a UUID record id by its 16
    /// bytes, identity values the metric by a code (2 spelled them out; 2 and 3: compact binary
    /// days and identities; 1 was JSON samples with a per-day index).
    const STATE_FORMAT: i64 = 3;

    fn begin_interval(&mut self) {
        self.touched.clear();
        self.names.clear();
        self.zones.clear();
        self.last_zone = None;
    }

    fn process(&mut self, input: &Input, state: &mut dyn State, _out: &mut dyn Emitter<RollupDay>) -> Result<(), Invalid> {
        let user = input.user_id();
        // Refused before anything changes (nothing is deferred for a rejected record).
        let upserts: &[Sample] = match input {
            Input::Samples(b) => &b.samples,
            Input::Changes(b) => &b.edits,
            _ => &[],
        };
        if let Some(s) = upserts.iter().find(|s| self.spec(&s.metric).is_none()) {
            return Err(Invalid { code: "unknown_metric", reason: format!("metric `{}` is not in the catalog", s.metric) });
        }
        // A refusal comes before anything is taken from the deferred work or written.
        let mut src = Sources::load(state, SOURCES_KEY);
        match input {
            Input::Samples(b) => src.admit(b.samples.iter().map(|s| s.source.as_str()))?,
            Input::Changes(b) => src.admit(b.edits.iter().map(|s| s.source.as_str()).chain(b.deletions.iter().map(|d| d.source.as_str())))?,
            _ => {}
        }
        let mut touched = self.touched.remove(user).unwrap_or_default();
        match input {
            Input::Samples(b) => {
                for s in &b.samples {
                    self.upsert(state, &mut src, s, &mut touched);
                }
            }
            Input::Changes(b) => {
                for s in &b.edits {
                    self.upsert(state, &mut src, s, &mut touched);
                }
                for d in &b.deletions {
                    self.delete(state, &mut src, &d.source, &d.source_record_id, d.deleted_version, &mut touched);
                }
            }
            Input::SessionImpact(_) => {} // not an input of this processor
            Input::Domain(b) => {
                if Priority::apply(state, b) {
                    // Every day of the user may change: re-derive them all.
                    for (k, v) in state.scan(DAY_PREFIX) {
                        let Some((metric, date)) = k[DAY_PREFIX.len()..].split_once(SEP) else { continue };
                        let Ok(date) = date.parse::<NaiveDate>() else { continue };
                        if !touched.get(metric).is_some_and(|m| m.contains_key(&date)) {
                            match Day::decode(&v) {
                                Ok(day) => {
                                    let day = self.intern(day);
                                    touched.entry(metric.to_owned()).or_default().insert(date, (day, false));
                                }
                                Err(e) => state.fail(format!("state value {k:?} does not deserialise: {e}")),
                            }
                        }
                    }
                }
            }
        }
        self.touched.insert(user.to_owned(), touched);
        Ok(())
    }

    fn end_interval(&mut self, user: &str, state: &mut dyn State, out: &mut dyn Emitter<RollupDay>) {
        let Some(touched) = self.touched.remove(user) else { return };
        let prio = Priority::load(state);
        for ((metric, date), (mut day, changed)) in touched.into_iter().flat_map(|(m, days)| days.into_iter().map(move |(d, v)| ((m.clone(), d), v))) {
            let was = day.emitted;
            let row = if day.samples.is_empty() { None } else { aggregate(user, &metric, date, day.samples.iter().map(point), &prio) };
            match row {
                Some(row) => {
                    day.emitted = true;
                    out.upsert(output_key(user, &metric, date), row);
                }
                None => {
                    if day.emitted {
                        day.emitted = false;
                        out.retract(output_key(user, &metric, date));
                    }
                }
            }
            let key = day_key(&metric, date);
            if day.samples.is_empty() && !day.emitted {
                if changed || was {
                    state.delete(&key);
                }
            } else if changed || was != day.emitted {
                state.put(&key, day.encode());
            }
        }
    }
}

fn point<'a>(((source, record), h): (&'a (Src, Rec), &'a Held)) -> Point<'a> {
    Point { source, kind: h.kind, record: RecordRef::Held(record), start_ms: h.start_ms, end_ms: h.end_ms, value: h.value, category: h.category.as_deref(), time_zone: &h.time_zone }
}

/// The days touched in an interval, by metric then date (the (metric, date) order), decoded,
/// and whether their samples changed.
type Touched = BTreeMap<String, BTreeMap<NaiveDate, (Day, bool)>>;

impl RollupDayProcessor {
    /// The catalog's entry for `metric` (those looked up are remembered).
    fn spec(&mut self, metric: &str) -> Option<&'static vitals_schemas::catalog::MetricSpec> {
        if let Some(&(_, spec)) = self.specs.iter().find(|(m, _)| *m == metric) {
            return Some(spec);
        }
        let (m, spec) = self.catalog.metrics.get_key_value(metric)?;
        if self.specs.len() < 64 {
            self.specs.push((m.as_str(), spec));
        }
        Some(spec)
    }

    /// The zone named `tz`, parsed once per interval.
    fn zone(&mut self, tz: &str) -> (Rc<str>, Zone) {
        if let Some((n, z)) = &self.last_zone {
            if &**n == tz {
                return (n.clone(), *z);
            }
        }
        let found = match self.zones.get_key_value(tz) {
            Some((n, z)) => (n.clone(), *z),
            None => {
                let z = Zone::parse(tz);
                let name = self.name(tz);
                self.zones.insert(name.clone(), z);
                (name, z)
            }
        };
        self.last_zone = Some(found.clone());
        found
    }

    fn name(&mut self, s: &str) -> Rc<str> {
        if let Some(n) = self.names.get(s) {
            return n.clone();
        }
        let n: Rc<str> = Rc::from(s);
        self.names.insert(n.clone());
        n
    }

    /// A decoded day whose strings share this interval's interned copies.
    fn intern(&mut self, day: Day) -> Day {
        let samples = day
            .samples
            .into_iter()
            .map(|((source, record), h)| {
                let held = Held { time_zone: self.name(&h.time_zone), category: h.category.as_deref().map(|c| self.name(c)), ..h };
                ((Src(self.name(&source)), record), held)
            })
            .collect();
        Day { emitted: day.emitted, samples }
    }

    /// The day `(metric, date)` of this interval: decoded from state on first touch.
    fn day<'t>(&mut self, state: &dyn State, touched: &'t mut Touched, metric: &str, date: NaiveDate) -> &'t mut (Day, bool) {
        if !touched.contains_key(metric) {
            touched.insert(metric.to_owned(), BTreeMap::new());
        }
        let days = touched.get_mut(metric).expect("just inserted");
        match days.entry(date) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let day = match state.get(&day_key(metric, date)) {
                    None => Day::default(),
                    Some(v) => match Day::decode(&v) {
                        Ok(d) => self.intern(d),
                        Err(err) => {
                            state.fail(format!("state value {:?} does not deserialise: {err}", day_key(metric, date)));
                            Day::default()
                        }
                    },
                };
                e.insert((day, false))
            }
        }
    }

    fn identity(&self, state: &dyn State, key: &str) -> Identity {
        let mut id = Ok(Identity::default());
        state.read(key, &mut |v| id = Identity::decode(v));
        id.unwrap_or_else(|e| {
            state.fail(format!("state value {:?} does not deserialise: {e}", crate::keys::printable(key)));
            Identity::default()
        })
    }

    /// Takes the identity's sample out of the days it is held in.
    fn unhold(&mut self, state: &dyn State, touched: &mut Touched, source: &str, record: Rec, at: &(String, NaiveDate, u8)) {
        let (metric, first, n) = at;
        let mut d = *first;
        let key = (Src(self.name(source)), record);
        for _ in 0..*n {
            let (day, changed) = self.day(state, touched, metric, d);
            if day.samples.remove(&key).is_some() {
                *changed = true;
            }
            d = d.succ_opt().unwrap_or(d);
        }
    }

    /// An upsert (sample batch or edit): a higher version replaces, the same or lower is ignored.
    fn upsert(&mut self, state: &mut dyn State, src: &mut Sources, s: &Sample, touched: &mut Touched) {
        let Some(spec) = self.spec(&s.metric) else { return };
        let mut key = std::mem::take(&mut self.key);
        // One UUID parse for the identity's key and the day's.
        let parsed = crate::keys::parse_uuid(&s.source_record_id);
        identity_key_into(&mut key, src.code_or_add(state, &s.source), &s.source_record_id, parsed);
        self.upsert_at(state, s, spec.kind, &key, parsed, touched);
        self.key = key;
    }

    fn upsert_at(&mut self, state: &mut dyn State, s: &Sample, kind: MetricKind, key: &str, parsed: Option<([u8; 16], bool)>, touched: &mut Touched) {
        let mut id = self.identity(state, key);
        if id.version.is_some_and(|v| v >= s.version) {
            return; // a duplicate or a stale version
        }
        if let Some(at) = id.at.take() {
            self.unhold(state, touched, &s.source, Rec::of(&s.source_record_id, parsed), &at);
        }
        id.version = Some(s.version);
        if id.counts(s.version) {
            let (time_zone, zone) = self.zone(&s.time_zone);
            let (first, n) = sample_span(&zone, s, kind);
            let source = self.name(&s.source);
            let held = Held { kind: s.source_kind, start_ms: s.start_ms, end_ms: s.end_ms, value: s.value, category: s.category.as_deref().map(|c| self.name(c)), time_zone };
            let rec = Rec::of(&s.source_record_id, parsed);
            let mut d = first;
            for _ in 0..n {
                let (day, changed) = self.day(state, touched, &s.metric, d);
                day.samples.insert((Src(source.clone()), rec.clone()), held.clone());
                *changed = true;
                d = d.succ_opt().unwrap_or(d);
            }
            id.at = Some((s.metric.clone(), first, n as u8));
        }
        state.put(key, id.encode());
    }

    /// A deletion of the versions up to `version` (every version when `None`).
    fn delete(&mut self, state: &mut dyn State, src: &mut Sources, source: &str, record: &str, version: Option<i64>, touched: &mut Touched) {
        let key = identity_key(src.code_or_add(state, source), record);
        let mut id = self.identity(state, &key);
        let deleted = Deleted::merge(id.deleted, version);
        if id.deleted == Some(deleted) {
            return; // nothing more is deleted
        }
        id.deleted = Some(deleted);
        if let (Some(v), Some(at)) = (id.version, id.at.clone()) {
            if !id.counts(v) {
                self.unhold(state, touched, source, Rec::parse(record), &at);
                id.at = None;
            }
        }
        state.put(&key, id.encode());
    }
}

/// A sample's record id as the aggregation orders it: by its text, whether a day holds it as
/// [`Rec`] or a sample's text is at hand.
#[derive(Debug, Clone, Copy)]
pub enum RecordRef<'a> {
    Text(&'a str),
    Held(&'a Rec),
}

impl RecordRef<'_> {
    fn text<'b>(&'b self, buf: &'b mut [u8; 36]) -> &'b str {
        match self {
            RecordRef::Text(t) => t,
            RecordRef::Held(r) => r.text(buf),
        }
    }
}

impl PartialEq for RecordRef<'_> {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o).is_eq()
    }
}
impl Eq for RecordRef<'_> {}
impl PartialOrd for RecordRef<'_> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for RecordRef<'_> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        match (self, o) {
            (RecordRef::Held(a), RecordRef::Held(b)) => a.cmp(b),
            _ => self.text(&mut [0; 36]).cmp(o.text(&mut [0; 36])),
        }
    }
}

/// What the aggregation reads of one effective sample.
#[derive(Debug, Clone, Copy)]
pub struct Point<'a> {
    pub source: &'a str,
    pub kind: SourceKind,
    pub record: RecordRef<'a>,
    pub start_ms: i64,
    pub end_ms: i64,
    pub value: f64,
    pub category: Option<&'a str>,
    pub time_zone: &'a str,
}

impl<'a> Point<'a> {
    pub fn of(s: &'a Sample) -> Point<'a> {
        Point {
            source: &s.source,
            kind: s.source_kind,
            record: RecordRef::Text(&s.source_record_id),
            start_ms: s.start_ms,
            end_ms: s.end_ms,
            value: s.value,
            category: s.category.as_deref(),
            time_zone: &s.time_zone,
        }
    }
}

impl crate::Versioned for RollupDay {
    fn stamp(&mut self, epoch: i64, seq: i64, offsets: Vec<vitals_schemas::SourceOffset>) {
        self.version_epoch = epoch;
        self.version_seq = seq;
        self.source_offsets = offsets;
    }
    fn tombstone(user: &str, key: &str) -> RollupDay {
        // `<user>|<metric>|<date>`: neither metric nor date contains `|`.
        let rest = key.strip_prefix(user).and_then(|k| k.strip_prefix('|')).unwrap_or(key);
        let (metric, date) = rest.rsplit_once('|').unwrap_or((rest, ""));
        RollupDay { deleted: true, ..blank_row(user, metric, date) }
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
    let mut points: Vec<Point> = samples.iter().map(|s| Point::of(s)).collect();
    points.sort_by(|a, b| (a.source, a.record).cmp(&(b.source, b.record)));
    aggregate(user, metric, date, points.into_iter(), prio)
}

/// [`aggregate_day`] over points already in (source, source_record_id) order — the one
/// aggregation, used by the streaming processor and by the oracle alike.
fn aggregate<'a>(user: &str, metric: &str, date: NaiveDate, points: impl Iterator<Item = Point<'a>>, prio: &Priority) -> Option<RollupDay> {
    let spec = Catalog::embedded().get(metric)?;
    let samples: Vec<Point> = points.collect();
    if samples.is_empty() {
        return None;
    }
    // Ranks per source and day bounds per zone, each computed once.
    let mut ranks: Vec<(&str, SourceKind, crate::sources::Rank)> = Vec::new();
    let mut rank = |s: &Point<'a>| -> crate::sources::Rank {
        if let Some((_, _, r)) = ranks.iter().find(|(n, k, _)| *n == s.source && *k == s.kind) {
            return r.clone();
        }
        let r = prio.rank(s.source, s.kind);
        ranks.push((s.source, s.kind, r.clone()));
        r
    };
    let mut bounds: Vec<(&str, (i64, i64))> = Vec::new();
    let mut clip = |s: &Point<'a>| -> Option<(i64, i64)> {
        let (a, b) = match bounds.iter().find(|(z, _)| *z == s.time_zone) {
            Some((_, b)) => *b,
            None => {
                let b = Zone::parse(s.time_zone).day_bounds(date);
                bounds.push((s.time_zone, b));
                b
            }
        };
        if s.end_ms <= s.start_ms {
            return (s.start_ms >= a && s.start_ms < b).then_some((s.start_ms, s.start_ms));
        }
        let (x, y) = (s.start_ms.max(a), s.end_ms.min(b));
        (x < y).then_some((x, y))
    };
    let best_source: Option<String> = {
        let mut best: Option<(crate::sources::Rank, &str)> = None;
        for s in &samples {
            let r = rank(s);
            if best.as_ref().is_none_or(|(b, n)| (&r, s.source) < (b, *n)) {
                best = Some((r, s.source));
            }
        }
        best.map(|(_, s)| s.to_owned())
    };
    let mut row = blank_row(user, metric, &date.to_string());
    row.primary_source = best_source.clone();
    match spec.kind {
        MetricKind::Cumulative => {
            let mut pieces: Vec<Piece> = Vec::with_capacity(samples.len());
            for s in &samples {
                if let Some(c) = clip(s) {
                    pieces.push(Piece::of(s.start_ms, s.end_ms, s.value, c, rank(s)));
                }
            }
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
            let mut sorted = values;
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
                    *minutes.entry(s.category.unwrap_or_default().to_owned()).or_default() += (b - a) as f64 / 60_000.0;
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
            let mine: Vec<&Point> = samples.iter().filter(|s| s.source == source).collect();
            row.count = mine.len() as i64;
            row.min = mine.iter().map(|s| s.value).reduce(f64::min);
            row.max = mine.iter().map(|s| s.value).reduce(f64::max);
            row.last = mine.iter().max_by(|a, b| (a.start_ms, a.record).cmp(&(b.start_ms, b.record))).map(|s| s.value);
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

/// Scenarios and generators, public under feature `testkit` (the runtime's takeover properties).
#[cfg(any(test, feature = "testkit"))]
#[cfg_attr(not(test), allow(dead_code, unused_imports, unused_macros))]
pub mod tests;
