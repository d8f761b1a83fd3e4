//! `sleep_night`: one row per (user, night date), as DOMAIN.md ("Sleep night") defines it, from the
//! user's `sleep_stage` samples (categories `in_bed`, `awake`, `core`, `deep`, `rem`,
//! `asleep_unspecified`). Every other metric is ignored.
//!
//! # How a night is derived
//!
//! 1. **One source's timeline.** A source's stage samples may overlap (a whole-night
//!    `asleep_unspecified` with detailed stages inside, a duplicate under another record id). At
//!    every instant the covering sample of highest precedence wins: `awake` > `deep` > `rem` >
//!    `core` > `asleep_unspecified`, then the smaller record id. A reported `awake` thus cuts the
//!    asleep time under it, and nothing is counted twice within a source. `in_bed` is not on this
//!    timeline: it overlaps the asleep stages and is never sleep (see 6). Samples with
//!    `end == start` carry no time and are ignored.
//! 2. **Periods and nights.** The asleep stretches of one source merge into a period while the gap
//!    between them is ≤ `merge_gap` (30 min); periods less than `night_gap` (3 h) apart belong to
//!    the same sleep episode. A gap of exactly 3 h separates: "less than 3 h apart" joins, so the
//!    doc's "more than 3 h away" is read as "not less than".
//! 3. **Naps.** An episode whose span (sleep onset to final wake, gaps included) is ≤ `nap_max`
//!    (3 h) is a nap: by construction it is at least 3 h away from any other sleep of its source.
//!    A short episode is a nap even when it was the only sleep of a night (the rule is about
//!    length and distance, not time of day).
//! 4. **One source per sleep.** Episodes of all sources whose spans overlap form a cluster (the
//!    same sleep seen by several devices). Each cluster takes exactly one source: the user's
//!    priority list, then the default kind order (manual > watch > phone > third-party), then
//!    coverage (most asleep minutes in the cluster), then the source name. The other sources'
//!    episodes of that cluster are dropped: never double counted. Sleep that only one device saw
//!    (a nap the phone recorded while the watch charged) is its own cluster and is kept.
//! 5. **Dating.** An episode is dated by the local date of its final wake, in the time zone of the
//!    sample that provides that final wake (travel: each sample's own zone; DST: all durations
//!    are real elapsed time).
//! 6. **One row per date.** The row of a date reports its *main* night: of the non-nap episodes
//!    dated that day, the one with the most sleep (then the latest final wake). `naps` lists every
//!    other episode dated that day, in time order: the naps, and in the rare case of two long
//!    sleeps ending on the same local date (shift work) the secondary one, so no sleep is silently
//!    lost or added to the main night (Fitbit's "main sleep" rule). A nap is thus attached to the
//!    row of the date it ends on, i.e. the night that ended that morning plus that day's naps. A
//!    date with naps but no night still has a row: `source` is its longest nap's source, the
//!    night figures are 0 (`total_sleep_minutes = 0`, timestamps 0, no stages) and `naps` holds
//!    the naps. `Nap` = sleep onset, final wake and asleep minutes of the episode.
//! 7. **Figures of the main night** (all from its one source):
//!    * `sleep_onset_ms` / `final_wake_ms`: start of its first / end of its last asleep stretch;
//!    * `stage_minutes`: asleep minutes per stage, plus `awake` = wake after sleep onset: every
//!      minute between onset and final wake that is not asleep, whether reported `awake`, not
//!      covered by any sample, or the gap between two periods. Awake time before onset (sleep
//!      latency) or after the final wake is not counted. Stages with 0 minutes are absent; `in_bed`
//!      is never a key;
//!    * `total_sleep_minutes`: the asleep minutes (core + deep + rem + asleep_unspecified);
//!    * `awakenings`: the maximal not-asleep stretches between onset and final wake that last at
//!      least `min_awakening` (5 min), and every gap between two periods (which is > 30 min anyway);
//!    * `in_bed_start_ms` / `in_bed_end_ms`: the earliest start / latest end of the onset–final
//!      wake span and the source's `in_bed` samples that overlap it or come within `merge_gap`
//!      of it (a night without `in_bed` samples is in bed from onset to final wake);
//!    * `efficiency`: asleep time / (in_bed_end − in_bed_start), in [0, 1] (the span, so time
//!      out of bed in the middle of the night counts as in bed, like the gap counts as awake).
//!
//! # Streaming
//!
//! The input is the user's `sleep_stage` samples and the deletions naming `sleep_stage`
//! (identity as [`crate::identity`]: duplicates, stale versions, edits, deletions in any order;
//! a record id is taken to keep its metric, a version under another metric is not an input here).
//! Effective samples are kept in state by identity, with an index by the UTC day of their start.
//! A sample is at most 24 h long (the catalog's range; longer ones are refused), so the samples
//! overlapping a time range are found by scanning a few day buckets.
//!
//! Samples less than 3 h apart (`max(night_gap, merge_gap)`) are *linked*; the derivation of a
//! night only ever looks at linked samples, so a maximal linked run ("block") is self-contained.
//! A change (a sample before and after an upsert or deletion) re-derives:
//! * R0: the blocks around the old and the new time range of the sample (in the new state, with
//!   the changed ranges standing in for removed samples, so the old blocks are covered too). Only
//!   episodes in R0 can have changed, and their final wakes lie in R0;
//! * C: the dates those final wakes can have: the UTC dates of R0 ± 1 day (a zone is less than
//!   24 h from UTC);
//! * R1: R0 plus the blocks of every sample within 24 h of a date in C, so every episode dated in
//!   C is derived from complete data.
//!
//! The dates of C are then recomputed from R1 with the same function as the oracle
//! ([`derive_nights`]); a date whose row changed is upserted, a date that no longer has a row and
//! had one is retracted. Rows emitted are kept in state (so retractions are exact and an unchanged
//! row is not re-sent). A source priority change (domain lane, latest `occurred_at` wins)
//! re-derives every night of the user.
//!
//! A `sleep_stage` sample without a category, with a category not in the list above, with
//! `end < start`, or longer than 24 h is refused ([`Invalid`] codes `missing_category`,
//! `unknown_category`, `end_before_start`, `sleep_stage_too_long`); the whole input record is
//! then refused, as by every processor.
//!
//! [`oracle`] applies [`derive_nights`] to the final effective samples in one batch; the tests
//! prove the streaming projection equals it under any order, duplicates, edits, deletions and
//! priority changes.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::NaiveDate;
use serde::Deserialize;
use vitals_schemas::{Nap, Sample, SleepNight, SourceKind, SourceOffset};

use crate::codec::{R, W};
use crate::identity::{effective_samples, Identities, Keep};
use crate::keys::Sources;
use crate::sources::{kind_rank, Priority};
use crate::time::Zone;
use crate::{Emitter, Input, Invalid, ProcessorInfo, State, StateExt};

pub const INFO: ProcessorInfo = ProcessorInfo {
    name: "sleep_night",
    description: "Sleep nights per (user, local date of final wake): periods, naps, stages, awakenings, efficiency, one source per night",
    inputs: crate::Inputs::Lanes,
};

/// Built with its default [`Config`] (what the registry runs).
impl Default for SleepNightProcessor {
    fn default() -> Self {
        SleepNightProcessor::new(Config::default())
    }
}

/// The metric this processor reads.
pub const METRIC: &str = "sleep_stage";
/// The categories of `sleep_stage` (as in the catalog).
pub const CATEGORIES: [&str; 6] = ["in_bed", "awake", "core", "deep", "rem", "asleep_unspecified"];

const MIN_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;
/// The longest stage sample accepted (the catalog's range for `sleep_stage`: 1440 min).
const MAX_SAMPLE_MS: i64 = DAY_MS;
const SEP: char = '\u{1f}';

/// Tunables, in minutes. Unknown keys are refused so a typo never goes unnoticed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Stage samples of one source merge into a period while the gap is at most this.
    pub merge_gap_minutes: i64,
    /// Periods less than this apart are one night.
    pub night_gap_minutes: i64,
    /// A sleep episode at most this long (onset to final wake) is a nap.
    pub nap_max_minutes: i64,
    /// A not-asleep stretch between onset and final wake counts as an awakening from this long.
    pub min_awakening_minutes: i64,
}

impl Default for Config {
    fn default() -> Config {
        Config { merge_gap_minutes: 30, night_gap_minutes: 180, nap_max_minutes: 180, min_awakening_minutes: 5 }
    }
}

fn minutes_ms(m: i64) -> i64 {
    m.max(0).saturating_mul(MIN_MS)
}

impl Config {
    fn merge_gap(&self) -> i64 {
        minutes_ms(self.merge_gap_minutes)
    }
    fn night_gap(&self) -> i64 {
        minutes_ms(self.night_gap_minutes)
    }
    /// Samples at most this far apart may end up in the same derivation (see the module doc).
    fn link(&self) -> i64 {
        self.night_gap().max(self.merge_gap())
    }
}

/// The output key of a night.
pub fn output_key(user: &str, night_date: NaiveDate) -> String {
    format!("{user}|{night_date}")
}

/// A row of (user, date) with no figures (the body of a retraction, and of a date with only naps).
pub fn blank_row(user: &str, night_date: &str) -> SleepNight {
    SleepNight {
        user_id: user.to_owned(),
        night_date: night_date.to_owned(),
        source: String::new(),
        in_bed_start_ms: 0,
        in_bed_end_ms: 0,
        sleep_onset_ms: 0,
        final_wake_ms: 0,
        stage_minutes: HashMap::new(),
        total_sleep_minutes: 0.0,
        efficiency: 0.0,
        awakenings: 0,
        naps: vec![],
        version_epoch: 0,
        version_seq: 0,
        deleted: false,
        source_offsets: vec![],
    }
}

impl crate::Versioned for SleepNight {
    fn stamp(&mut self, epoch: i64, seq: i64, offsets: Vec<SourceOffset>) {
        self.version_epoch = epoch;
        self.version_seq = seq;
        self.source_offsets = offsets;
    }
    fn tombstone(user: &str, key: &str) -> SleepNight {
        // The date never contains `|`.
        let date = key.rsplit_once('|').map_or("", |(_, d)| d);
        SleepNight { deleted: true, ..blank_row(user, date) }
    }
}

/// Checks one `sleep_stage` sample; the codes are stable (dead-letter reasons).
pub fn validate(s: &Sample) -> Result<(), Invalid> {
    let who = || format!("sleep_stage sample {}/{}", s.source, s.source_record_id);
    match s.category.as_deref() {
        None => return Err(Invalid { code: "missing_category", reason: format!("{} has no category", who()) }),
        Some(c) if !CATEGORIES.contains(&c) => {
            return Err(Invalid { code: "unknown_category", reason: format!("{}: category `{c}` is not one of {}", who(), CATEGORIES.join(", ")) });
        }
        Some(_) => {}
    }
    let len = i128::from(s.end_ms) - i128::from(s.start_ms);
    if len < 0 {
        return Err(Invalid { code: "end_before_start", reason: format!("{}: end {} is before start {}", who(), s.end_ms, s.start_ms) });
    }
    if len > i128::from(MAX_SAMPLE_MS) {
        return Err(Invalid { code: "sleep_stage_too_long", reason: format!("{} lasts {} min, more than 1440", who(), len / i128::from(MIN_MS)) });
    }
    Ok(())
}

fn validate_all<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Result<(), Invalid> {
    samples.into_iter().filter(|s| s.metric == METRIC).try_for_each(validate)
}

// ---- the derivation, shared by streaming and the oracle -----------------------------------------

/// The stages of the timeline, in precedence order (the smaller wins an overlap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Awake,
    Deep,
    Rem,
    Core,
    Unspecified,
}

impl Stage {
    /// `None` for `in_bed` (not on the timeline) and anything unknown.
    fn of(category: &str) -> Option<Stage> {
        match category {
            "awake" => Some(Stage::Awake),
            "deep" => Some(Stage::Deep),
            "rem" => Some(Stage::Rem),
            "core" => Some(Stage::Core),
            "asleep_unspecified" => Some(Stage::Unspecified),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Stage::Awake => "awake",
            Stage::Deep => "deep",
            Stage::Rem => "rem",
            Stage::Core => "core",
            Stage::Unspecified => "asleep_unspecified",
        }
    }
}

/// A stretch `[a, b)` of one source's timeline with one stage.
#[derive(Debug, Clone)]
struct Seg {
    a: i64,
    b: i64,
    stage: Stage,
    /// The sample that won the end of the stretch (its zone dates a final wake).
    last: usize,
    /// The best source kind among the samples that won a part of it.
    kind: u8,
}

/// One source's stage samples (not `in_bed`) resolved into stretches: at every instant the
/// covering sample of the highest precedence, then the smallest record id, wins.
fn timeline(samples: &[&Sample]) -> Vec<Seg> {
    let staged: Vec<(usize, Stage)> = samples
        .iter()
        .enumerate()
        .filter(|(_, s)| s.end_ms > s.start_ms)
        .filter_map(|(i, s)| Some((i, Stage::of(s.category.as_deref()?)?)))
        .collect();
    let mut by_start = staged.clone();
    by_start.sort_by_key(|(i, _)| samples[*i].start_ms);
    let mut by_end = staged.clone();
    by_end.sort_by_key(|(i, _)| samples[*i].end_ms);
    let mut cuts: Vec<i64> = staged.iter().flat_map(|(i, _)| [samples[*i].start_ms, samples[*i].end_ms]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut active: BTreeSet<(Stage, &str, usize)> = BTreeSet::new();
    let (mut i, mut j) = (0, 0);
    let mut segs: Vec<Seg> = Vec::new();
    for w in cuts.windows(2) {
        let (x, y) = (w[0], w[1]);
        while let Some(&(k, st)) = by_start.get(i).filter(|(k, _)| samples[*k].start_ms <= x) {
            active.insert((st, samples[k].source_record_id.as_str(), k));
            i += 1;
        }
        while let Some(&(k, st)) = by_end.get(j).filter(|(k, _)| samples[*k].end_ms <= x) {
            active.remove(&(st, samples[k].source_record_id.as_str(), k));
            j += 1;
        }
        if let Some(&(stage, _, k)) = active.first() {
            let kind = kind_rank(samples[k].source_kind);
            match segs.last_mut() {
                Some(l) if l.b == x && l.stage == stage => {
                    l.b = y;
                    l.last = k;
                    l.kind = l.kind.min(kind);
                }
                _ => segs.push(Seg { a: x, b: y, stage, last: k, kind }),
            }
        }
    }
    segs
}

/// One source's sleep episode: periods less than `night_gap` apart.
#[derive(Debug, Clone)]
struct Episode {
    source: String,
    /// (position in the user's list, source kind): lower is better.
    rank: (usize, u8),
    onset: i64,
    wake: i64,
    asleep_ms: i64,
    stage_ms: BTreeMap<Stage, i64>,
    awakenings: i32,
    /// The zone of the sample that provides the final wake.
    zone: String,
}

impl Episode {
    fn is_nap(&self, cfg: &Config) -> bool {
        self.wake - self.onset <= minutes_ms(cfg.nap_max_minutes)
    }
    fn date(&self) -> NaiveDate {
        Zone::parse(&self.zone).local_date(self.wake)
    }
    fn nap(&self) -> Nap {
        Nap { start_ms: self.onset, end_ms: self.wake, minutes: self.asleep_ms as f64 / MIN_MS as f64 }
    }
}

/// One source's episodes from its timeline.
fn episodes(source: &str, samples: &[&Sample], segs: &[Seg], prio: &Priority, cfg: &Config) -> Vec<Episode> {
    let (merge_gap, night_gap, min_awake) = (cfg.merge_gap(), cfg.night_gap(), minutes_ms(cfg.min_awakening_minutes));
    let listed = prio.rank(source, SourceKind::Manual).0;
    let build = |run: &[&Seg]| -> Option<Episode> {
        let (first, last) = (run.first()?, run.last()?);
        let mut stage_ms: BTreeMap<Stage, i64> = BTreeMap::new();
        for s in run {
            *stage_ms.entry(s.stage).or_default() += s.b - s.a;
        }
        let awakenings = run
            .windows(2)
            .filter(|w| {
                let gap = w[1].a - w[0].b;
                gap > 0 && (gap >= min_awake || gap > merge_gap)
            })
            .count();
        Some(Episode {
            source: source.to_owned(),
            rank: (listed, run.iter().map(|s| s.kind).min().unwrap_or(u8::MAX)),
            onset: first.a,
            wake: last.b,
            asleep_ms: stage_ms.values().sum(),
            stage_ms,
            awakenings: i32::try_from(awakenings).unwrap_or(i32::MAX),
            zone: samples[last.last].time_zone.clone(),
        })
    };
    let mut out = Vec::new();
    let mut run: Vec<&Seg> = Vec::new();
    for seg in segs.iter().filter(|s| s.stage != Stage::Awake) {
        if let Some(prev) = run.last() {
            let gap = seg.a - prev.b;
            if gap >= night_gap && gap > merge_gap {
                out.extend(build(&run));
                run.clear();
            }
        }
        run.push(seg);
    }
    out.extend(build(&run));
    out
}

/// Per cluster of overlapping episodes (all sources), the episodes of its one chosen source.
fn choose(mut all: Vec<Episode>) -> Vec<Episode> {
    all.sort_by(|x, y| (x.onset, x.wake, &x.source).cmp(&(y.onset, y.wake, &y.source)));
    let mut chosen = Vec::new();
    let mut i = 0;
    while i < all.len() {
        let mut end = all[i].wake;
        let mut j = i + 1;
        while j < all.len() && all[j].onset < end {
            end = end.max(all[j].wake);
            j += 1;
        }
        let cluster = &all[i..j];
        // Per source: best rank, asleep time in the cluster.
        let mut per: BTreeMap<&str, ((usize, u8), i64)> = BTreeMap::new();
        for e in cluster {
            let p = per.entry(&e.source).or_insert((e.rank, 0));
            p.0 = p.0.min(e.rank);
            p.1 += e.asleep_ms;
        }
        let best = per.iter().min_by_key(|(s, (rank, asleep))| (*rank, Reverse(*asleep), *s)).map(|(s, _)| s.to_string());
        chosen.extend(cluster.iter().filter(|e| Some(&e.source) == best.as_ref()).cloned());
        i = j;
    }
    chosen
}

/// The rows of a user from a set of effective samples (anything but valid `sleep_stage` samples
/// is ignored), keyed by night date. Deterministic in the set of samples, whatever their order.
/// Streaming calls it on complete blocks and keeps the dates it knows to be complete; the oracle
/// calls it on everything.
pub fn derive_nights(user: &str, samples: &[&Sample], prio: &Priority, cfg: &Config) -> BTreeMap<NaiveDate, SleepNight> {
    let mut by_source: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.metric == METRIC && validate(s).is_ok() && s.end_ms > s.start_ms) {
        by_source.entry(&s.source).or_default().push(s);
    }
    let mut all = Vec::new();
    let mut in_bed: BTreeMap<&str, Vec<(i64, i64)>> = BTreeMap::new();
    for (source, mut ss) in by_source {
        ss.sort_by(|a, b| (a.start_ms, &a.source_record_id).cmp(&(b.start_ms, &b.source_record_id)));
        let segs = timeline(&ss);
        all.extend(episodes(source, &ss, &segs, prio, cfg));
        in_bed.insert(source, ss.iter().filter(|s| s.category.as_deref() == Some("in_bed")).map(|s| (s.start_ms, s.end_ms)).collect());
    }
    let mut by_date: BTreeMap<NaiveDate, Vec<Episode>> = BTreeMap::new();
    for e in choose(all) {
        by_date.entry(e.date()).or_default().push(e);
    }
    let gap = cfg.merge_gap();
    by_date
        .into_iter()
        .map(|(date, mut eps)| {
            eps.sort_by(|x, y| (x.onset, x.wake, &x.source).cmp(&(y.onset, y.wake, &y.source)));
            let main = eps
                .iter()
                .enumerate()
                .filter(|(_, e)| !e.is_nap(cfg))
                .max_by_key(|(_, e)| (e.asleep_ms, e.wake, Reverse(e.source.clone())))
                .map(|(i, _)| i);
            let mut row = blank_row(user, &date.to_string());
            match main {
                Some(i) => {
                    let m = eps.remove(i);
                    let beds = in_bed.get(m.source.as_str()).map(Vec::as_slice).unwrap_or_default();
                    let attached = beds.iter().filter(|(a, b)| *b >= m.onset - gap && *a <= m.wake + gap);
                    row.in_bed_start_ms = attached.clone().map(|(a, _)| *a).fold(m.onset, i64::min);
                    row.in_bed_end_ms = attached.map(|(_, b)| *b).fold(m.wake, i64::max);
                    row.sleep_onset_ms = m.onset;
                    row.final_wake_ms = m.wake;
                    let mut stages: HashMap<String, f64> = m.stage_ms.iter().filter(|(_, ms)| **ms > 0).map(|(s, ms)| (s.name().to_owned(), *ms as f64 / MIN_MS as f64)).collect();
                    let awake = m.wake - m.onset - m.asleep_ms;
                    if awake > 0 {
                        stages.insert(Stage::Awake.name().to_owned(), awake as f64 / MIN_MS as f64);
                    }
                    row.stage_minutes = stages;
                    row.total_sleep_minutes = m.asleep_ms as f64 / MIN_MS as f64;
                    row.efficiency = m.asleep_ms as f64 / (row.in_bed_end_ms - row.in_bed_start_ms) as f64;
                    row.awakenings = m.awakenings;
                    row.source = m.source;
                }
                None => {
                    row.source = eps.iter().max_by_key(|e| (e.asleep_ms, e.wake, Reverse(e.source.clone()))).map(|e| e.source.clone()).unwrap_or_default();
                }
            }
            row.naps = eps.iter().map(Episode::nap).collect();
            (date, row)
        })
        .collect()
}

/// The batch oracle with the default config: the rows the final set of inputs implies, computed
/// in one pass with no streaming state. Keys as [`output_key`].
pub fn oracle(inputs: &[Input]) -> BTreeMap<String, SleepNight> {
    oracle_with(inputs, &Config::default())
}

/// [`oracle`] with a config. An input the processor would refuse (an invalid `sleep_stage`
/// sample) is left out, as the processor leaves no trace of it.
pub fn oracle_with(inputs: &[Input], cfg: &Config) -> BTreeMap<String, SleepNight> {
    let prio = Priority::oracle(inputs);
    let sleep_only: Vec<Input> = inputs
        .iter()
        .filter_map(|input| match input {
            Input::Samples(b) => {
                validate_all(&b.samples).ok()?;
                let mut b = b.clone();
                b.samples.retain(|s| s.metric == METRIC);
                Some(Input::Samples(b))
            }
            Input::Changes(b) => {
                validate_all(&b.edits).ok()?;
                let mut b = b.clone();
                b.edits.retain(|s| s.metric == METRIC);
                b.deletions.retain(|d| d.metric == METRIC);
                Some(Input::Changes(b))
            }
            Input::Domain(_) | Input::SessionImpact(_) => None,
        })
        .collect();
    let none = Priority::default();
    let mut out = BTreeMap::new();
    for (user, samples) in effective_samples(&sleep_only) {
        let refs: Vec<&Sample> = samples.iter().collect();
        for (date, row) in derive_nights(&user, &refs, prio.get(&user).unwrap_or(&none), cfg) {
            out.insert(output_key(&user, date), row);
        }
    }
    out
}

// ---- streaming ----------------------------------------------------------------------------------

/// Where sample identities live in this processor's state, and what of each is kept: category
/// and time zone ([`derive_nights`] reads source, record id, kind, metric, start, end, category
/// and the zone of a final wake; never the value: a stage's minutes are its interval's).
const IDS: Identities = Identities { namespace: "id", keep: Keep { value: false, category: true, time_zone: true } };

/// An index entry: one effective sample with an interval, under the UTC day of its start. The
/// key ([`ix_key`]) names the identity; the value holds the interval only ([`Entry::encode`]).
#[derive(Debug, Clone)]
struct Entry {
    s: String,
    r: String,
    a: i64,
    b: i64,
}

/// The first byte of an index value: anything else is refused (an older build's JSON starts
/// with `{`).
const ENTRY_FORMAT: u8 = 1;

impl Entry {
    /// The value: [`ENTRY_FORMAT`], start and end − start as zigzag varints.
    fn encode(&self) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(12));
        w.0.push(ENTRY_FORMAT);
        w.i(self.a);
        w.i(self.b.wrapping_sub(self.a));
        w.0
    }

    /// The entry of an index key ([`ix_key`]) and its value.
    fn decode(src: &Sources, key: &str, value: &[u8]) -> Result<Entry, String> {
        let identity = key.strip_prefix(IX).and_then(|k| k.split_once(SEP)).map(|(_, id)| id).ok_or("not an index key")?;
        let (s, r) = src.identity(identity)?;
        let mut v = R(value);
        let f = v.byte()?;
        if f != ENTRY_FORMAT {
            return Err(format!("index value of format {f}, this build reads {ENTRY_FORMAT}"));
        }
        let a = v.i()?;
        let b = a.wrapping_add(v.i()?);
        v.end()?;
        Ok(Entry { s, r, a, b })
    }
}

/// The index entries under `prefix` (`ix SEP`, or one day's [`ix_prefix`]). An entry that does not
/// decode fails the task ([`State::fail`]).
fn scan_index(state: &dyn State, src: &Sources, prefix: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for (k, v) in state.scan(prefix) {
        match Entry::decode(src, &k, &v) {
            Ok(e) => out.push(e),
            Err(e) => state.fail(format!("state value {:?} does not deserialise: {e}", crate::keys::printable(&k))),
        }
    }
    out
}

fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}
fn date_of_day(day: i64) -> Option<NaiveDate> {
    // Day 0 is 1970-01-01, day 719 163 of the common era.
    NaiveDate::from_num_days_from_ce_opt(i32::try_from(day.checked_add(719_163)?).ok()?)
}
/// Every index key starts with this.
const IX: &str = "ix\u{1f}";
fn ix_prefix(day: i64) -> String {
    format!("{IX}{day}{SEP}")
}
/// An index key: the day's [`ix_prefix`], then the identity as [`Identities`] keys it (the
/// source's code in the user's dictionary, the record id).
fn ix_key(s: &Sample, code: u64) -> String {
    let mut k = ix_prefix(day_of(s.start_ms));
    crate::keys::push_identity(&mut k, code, &s.source_record_id);
    k
}
fn out_key(date: NaiveDate) -> String {
    format!("out{SEP}{date}")
}

/// A row as kept in state: the stage map sorted, so state bytes are deterministic.
type Kept = (SleepNight, BTreeMap<String, f64>);
fn kept(row: &SleepNight) -> Kept {
    let mut r = row.clone();
    let stages = std::mem::take(&mut r.stage_minutes).into_iter().collect();
    (r, stages)
}

/// Reads the index, one day bucket at a time, each at most once per input record.
struct Index<'s> {
    state: &'s dyn State,
    src: Sources,
    days: BTreeMap<i64, Vec<Entry>>,
}

impl<'s> Index<'s> {
    fn new(state: &'s dyn State) -> Index<'s> {
        Index { state, src: IDS.sources(state), days: BTreeMap::new() }
    }

    /// The entries whose interval meets `[x, y]` (closed).
    fn meeting(&mut self, x: i64, y: i64) -> Vec<Entry> {
        let mut out = Vec::new();
        for day in day_of(x.saturating_sub(MAX_SAMPLE_MS))..=day_of(y) {
            let (state, src) = (self.state, &self.src);
            let bucket = self.days.entry(day).or_insert_with(|| scan_index(state, src, &ix_prefix(day)));
            out.extend(bucket.iter().filter(|e| e.b >= x && e.a <= y).cloned());
        }
        out
    }

    /// The whole blocks around `ranges`: merged, disjoint intervals that no sample outside them
    /// is linked to.
    fn blocks(&mut self, ranges: Vec<(i64, i64)>, link: i64) -> Vec<(i64, i64)> {
        let mut out: Vec<(i64, i64)> = Vec::new();
        for r in merged(ranges) {
            // A range inside a block already found has nothing more to add.
            if out.last().is_some_and(|l| l.0 <= r.0 && r.1 <= l.1) {
                continue;
            }
            out.push(self.block(r, link));
        }
        merged(out)
    }

    /// Grows `[a, b]` until no sample outside it is linked to one inside (within `link`).
    fn block(&mut self, (mut a, mut b): (i64, i64), link: i64) -> (i64, i64) {
        loop {
            let (mut na, mut nb) = (a, b);
            for e in self.meeting(a.saturating_sub(link), b.saturating_add(link)) {
                na = na.min(e.a);
                nb = nb.max(e.b);
            }
            if (na, nb) == (a, b) {
                return (a, b);
            }
            (a, b) = (na, nb);
        }
    }
}

/// Sorts and merges intervals that overlap or touch.
fn merged(mut v: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    v.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(l) if a <= l.1 => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

pub struct SleepNightProcessor {
    cfg: Config,
    /// How many samples the last re-derivation read from state: a diagnostic, with which the
    /// tests check that a change stays local.
    pub last_loaded: usize,
}

impl SleepNightProcessor {
    pub fn new(cfg: Config) -> SleepNightProcessor {
        SleepNightProcessor { cfg, last_loaded: 0 }
    }
}

impl crate::Processor for SleepNightProcessor {
    type Output = SleepNight;
    /// 3: identity and index keys name the source by a per-user code and a UUID record id by
    /// its 16 bytes (2 spelled both out). 2 and 3: identities as compact binary values, the
    /// fields this processor reads only, and index entries as their interval alone (1 was JSON
    /// `Sample`s, and entries that repeated their key).
    const STATE_FORMAT: i64 = 3;

    fn process(&mut self, input: &Input, state: &mut dyn State, out: &mut dyn Emitter<SleepNight>) -> Result<(), Invalid> {
        let user = input.user_id().to_owned();
        // The time ranges of the samples that changed, before and after.
        let mut dirty: Vec<(i64, i64)> = Vec::new();
        match input {
            Input::Samples(b) => {
                validate_all(&b.samples)?;
                let mut src = IDS.sources(state);
                src.admit(b.samples.iter().filter(|s| s.metric == METRIC).map(|s| s.source.as_str()))?;
                for s in b.samples.iter().filter(|s| s.metric == METRIC) {
                    let c = IDS.upsert(state, &mut src, s);
                    reindex(state, &mut src, c.before.as_ref(), c.after.as_ref(), &mut dirty);
                }
            }
            Input::Changes(b) => {
                validate_all(&b.edits)?;
                let mut src = IDS.sources(state);
                src.admit(b.edits.iter().filter(|s| s.metric == METRIC).map(|s| s.source.as_str()).chain(b.deletions.iter().filter(|d| d.metric == METRIC).map(|d| d.source.as_str())))?;
                for s in b.edits.iter().filter(|s| s.metric == METRIC) {
                    let c = IDS.upsert(state, &mut src, s);
                    reindex(state, &mut src, c.before.as_ref(), c.after.as_ref(), &mut dirty);
                }
                for d in b.deletions.iter().filter(|d| d.metric == METRIC) {
                    let c = IDS.delete(state, &mut src, &d.source, &d.source_record_id, d.deleted_version);
                    reindex(state, &mut src, c.before.as_ref(), c.after.as_ref(), &mut dirty);
                }
            }
            Input::Domain(b) => {
                if Priority::apply(state, b) {
                    self.rederive_all(&user, state, out);
                }
                return Ok(());
            }
            Input::SessionImpact(_) => return Ok(()), // not an input of this processor
        }
        if !dirty.is_empty() {
            self.rederive(&user, dirty, state, out);
        }
        Ok(())
    }
}

/// Moves an identity's index entry from `before` to `after`; records both time ranges.
fn reindex(state: &mut dyn State, src: &mut Sources, before: Option<&Sample>, after: Option<&Sample>, dirty: &mut Vec<(i64, i64)>) {
    if before == after {
        return;
    }
    if let Some(b) = before {
        let code = src.code_or_add(state, &b.source);
        state.delete(&ix_key(b, code));
        dirty.push((b.start_ms, b.end_ms));
    }
    if let Some(a) = after {
        if a.end_ms > a.start_ms {
            let e = Entry { s: a.source.clone(), r: a.source_record_id.clone(), a: a.start_ms, b: a.end_ms };
            let code = src.code_or_add(state, &a.source);
            state.put(&ix_key(a, code), e.encode());
        }
        dirty.push((a.start_ms, a.end_ms));
    }
}

impl SleepNightProcessor {
    /// Re-derives the dates a change of `dirty` can affect (see the module doc), from complete
    /// blocks of samples.
    fn rederive(&mut self, user: &str, dirty: Vec<(i64, i64)>, state: &mut dyn State, out: &mut dyn Emitter<SleepNight>) {
        let link = self.cfg.link();
        let prio = Priority::load(state);
        let (dates, rows) = {
            let mut ix = Index::new(&*state);
            let r0 = ix.blocks(dirty, link);
            let days: BTreeSet<i64> = r0.iter().flat_map(|(a, b)| day_of(*a) - 1..=day_of(*b) + 1).collect();
            // Everything within 24 h of those dates, as whole blocks.
            let windows = days.iter().map(|d| (d.saturating_sub(1).saturating_mul(DAY_MS), d.saturating_add(2).saturating_mul(DAY_MS)));
            let r1 = ix.blocks(r0.iter().copied().chain(windows).collect(), link);
            let mut entries: BTreeMap<(String, String), Entry> = BTreeMap::new();
            for (a, b) in r1 {
                for e in ix.meeting(a, b) {
                    entries.insert((e.s.clone(), e.r.clone()), e);
                }
            }
            let samples: Vec<Sample> = entries.values().filter_map(|e| IDS.get(&*state, &ix.src, &e.s, &e.r)).collect();
            self.last_loaded = samples.len();
            let refs: Vec<&Sample> = samples.iter().collect();
            let dates: Vec<NaiveDate> = days.into_iter().filter_map(date_of_day).collect();
            (dates, derive_nights(user, &refs, &prio, &self.cfg))
        };
        let mut rows = rows;
        for date in dates {
            publish(user, date, rows.remove(&date), state, out);
        }
    }

    /// Re-derives every night of the user (a source priority change).
    fn rederive_all(&mut self, user: &str, state: &mut dyn State, out: &mut dyn Emitter<SleepNight>) {
        let prio = Priority::load(state);
        let src = IDS.sources(&*state);
        let mut entries = scan_index(&*state, &src, IX);
        // In the order of the index keys before source codes: day, source name, record id.
        entries.sort_by_cached_key(|e| format!("{}{SEP}{}{SEP}{}", day_of(e.a), e.s, e.r));
        let samples: Vec<Sample> = entries.into_iter().filter_map(|e| IDS.get(&*state, &src, &e.s, &e.r)).collect();
        self.last_loaded = samples.len();
        let refs: Vec<&Sample> = samples.iter().collect();
        let mut rows = derive_nights(user, &refs, &prio, &self.cfg);
        let prefix = format!("out{SEP}");
        let mut dates: BTreeSet<NaiveDate> = rows.keys().copied().collect();
        dates.extend(state.scan(&prefix).into_iter().filter_map(|(k, _)| k.strip_prefix(&prefix)?.parse::<NaiveDate>().ok()));
        for date in dates {
            publish(user, date, rows.remove(&date), state, out);
        }
    }
}

/// Emits the new row of `date` if it changed, or its retraction if it had one and no longer has.
fn publish(user: &str, date: NaiveDate, row: Option<SleepNight>, state: &mut dyn State, out: &mut dyn Emitter<SleepNight>) {
    let k = out_key(date);
    match row {
        Some(row) => {
            let new = kept(&row);
            if state.get_json::<Kept>(&k).as_ref() != Some(&new) {
                state.put_json(&k, &new);
                out.upsert(output_key(user, date), row);
            }
        }
        None => {
            if state.get(&k).is_some() {
                state.delete(&k);
                out.retract(output_key(user, date));
            }
        }
    }
}

/// Scenarios and generators, public under feature `testkit` (the runtime's takeover properties).
#[cfg(any(test, feature = "testkit"))]
#[cfg_attr(not(test), allow(dead_code, unused_imports, unused_macros))]
pub mod tests;
