//! `readiness_baseline`: per (user, metric, local date) a personal baseline of resting heart rate
//! and HRV — what readiness scores build on. For each local date `D` with samples of the metric:
//!
//! * `value`: the day's mean (every source: both are discrete metrics, DOMAIN.md), `samples` its n;
//! * the baseline over the seven local dates before `D` (`D−7 ..= D−1`) that have data:
//!   `baseline_days`, `baseline_mean` (the mean of those days' means), `baseline_sd` (their
//!   sample standard deviation, from two days on);
//! * `delta = value − baseline_mean`, and `z = delta / baseline_sd` once three days make the
//!   baseline and it is not flat.
//!
//! Days are local to each sample's own zone (the date of its start). Identity, edits and deletions
//! are [`crate::identity`]'s; every change re-derives its day and the seven after it, and a day
//! left without samples is retracted. [`oracle`] computes the same from the final sample set in
//! one batch; the tests prove streaming equals it whatever the order, duplication and intervals.
//!
//! The whole projection — record, descriptor, processor, oracle, tests — is this one file, plus
//! its line in `processors!` (docs/adding-a-processor.md walks through it).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Days, NaiveDate};
use serde::{Deserialize, Serialize};
use vitals_schemas::projection::{BuiltFrom, Descriptor, Field, Order, Projected, Type};
use vitals_schemas::{Catalog, Sample, SourceOffset};

use crate::identity::{effective_samples, Change, Identities, Keep};
use crate::time::Zone;
use crate::{Emitter, Input, Invalid, Processor, ProcessorInfo, State, StateExt, Versioned};

pub const INFO: ProcessorInfo = ProcessorInfo {
    name: "readiness_baseline",
    description: "Resting heart rate and HRV per local date against the user's own 7-day baseline (mean, deviation, z-score)",
    inputs: crate::Inputs::Lanes,
};

/// The metrics it follows.
pub const METRICS: [&str; 2] = ["resting_heart_rate", "hrv_sdnn"];
/// How many local dates before a day make its baseline.
pub const WINDOW_DAYS: u64 = 7;
/// Baseline days needed before a z-score is given.
pub const MIN_DAYS_FOR_Z: i32 = 3;

/// One (user, metric, local date) against the user's baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadinessBaseline {
    pub user_id: String,
    pub metric: String,
    pub local_date: String,
    pub unit: String,
    pub value: f64,
    pub samples: i64,
    pub baseline_days: i32,
    pub baseline_mean: Option<f64>,
    pub baseline_sd: Option<f64>,
    pub delta: Option<f64>,
    pub z: Option<f64>,
    pub version_epoch: i64,
    pub version_seq: i64,
    pub deleted: bool,
    pub source_offsets: Vec<SourceOffset>,
}

const OPT_DOUBLE: Type = Type::Optional(&Type::Double);

pub const DESCRIPTOR: Descriptor = Descriptor {
    name: "readiness_baseline",
    record: "ReadinessBaseline",
    doc: "Resting heart rate or HRV of one local date against the user's 7-day baseline.",
    fields: &[
        Field::new("metric", Type::String).doc("resting_heart_rate or hrv_sdnn"),
        Field::new("local_date", Type::String).doc("YYYY-MM-DD in each sample's own zone."),
        Field::new("unit", Type::String),
        Field::new("value", Type::Double).doc("The day's mean."),
        Field::new("samples", Type::Long),
        Field::new("baseline_days", Type::Int).doc("Days with data among the 7 before."),
        Field::new("baseline_mean", OPT_DOUBLE),
        Field::new("baseline_sd", OPT_DOUBLE).doc("Sample standard deviation of the baseline days' means (2 days or more)."),
        Field::new("delta", OPT_DOUBLE).doc("value - baseline_mean"),
        Field::new("z", OPT_DOUBLE).doc("delta / baseline_sd, from 3 baseline days on and a baseline that is not flat."),
    ],
    key: &["metric", "local_date"],
    group: Some("metric"),
    day: Some("local_date"),
    at: None,
    order: Order::Day,
    built_from: BuiltFrom::Lanes,
};

impl Projected for ReadinessBaseline {
    const DESCRIPTOR: &'static Descriptor = &DESCRIPTOR;
}

impl Versioned for ReadinessBaseline {
    fn stamp(&mut self, epoch: i64, seq: i64, offsets: Vec<SourceOffset>) {
        self.version_epoch = epoch;
        self.version_seq = seq;
        self.source_offsets = offsets;
    }
    fn tombstone(user: &str, key: &str) -> ReadinessBaseline {
        // `<user>|<metric>|<date>`: neither metric nor date holds `|`.
        let rest = key.strip_prefix(user).and_then(|k| k.strip_prefix('|')).unwrap_or(key);
        let (metric, date) = rest.rsplit_once('|').unwrap_or((rest, ""));
        ReadinessBaseline { deleted: true, ..row(user, metric, date, 0.0, 0, &[]) }
    }
}

pub fn output_key(user: &str, metric: &str, date: NaiveDate) -> String {
    format!("{user}|{metric}|{date}")
}

/// The row of `date` from its day (mean, n) and the means of the baseline days before it, in
/// date order: the one computation streaming and the oracle share.
fn row(user: &str, metric: &str, date: &str, value: f64, samples: i64, baseline: &[f64]) -> ReadinessBaseline {
    let n = baseline.len();
    let mean = (n > 0).then(|| baseline.iter().sum::<f64>() / n as f64);
    let sd = mean.filter(|_| n >= 2).map(|m| (baseline.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64).sqrt());
    let delta = mean.map(|m| value - m);
    let z = match (delta, sd) {
        (Some(d), Some(s)) if n as i32 >= MIN_DAYS_FOR_Z && s > 0.0 => Some(d / s),
        _ => None,
    };
    ReadinessBaseline {
        user_id: user.to_owned(),
        metric: metric.to_owned(),
        local_date: date.to_owned(),
        unit: Catalog::embedded().get(metric).map(|s| s.unit.clone()).unwrap_or_default(),
        value,
        samples,
        baseline_days: n as i32,
        baseline_mean: mean,
        baseline_sd: sd,
        delta,
        z,
        version_epoch: 0,
        version_seq: 0,
        deleted: false,
        source_offsets: Vec::new(),
    }
}

/// The mean and n of one day's values (in identity order).
fn day_mean(values: &[f64]) -> Option<(f64, i64)> {
    (!values.is_empty()).then(|| (values.iter().sum::<f64>() / values.len() as f64, values.len() as i64))
}

/// The row of `date` from `day(d)` (the values of local date `d`), or `None` when `date` has none.
fn derive(user: &str, metric: &str, date: NaiveDate, day: impl Fn(NaiveDate) -> Vec<f64>) -> Option<ReadinessBaseline> {
    let (value, n) = day_mean(&day(date))?;
    let baseline: Vec<f64> = (1..=WINDOW_DAYS).rev().filter_map(|k| date.checked_sub_days(Days::new(k))).filter_map(|d| day_mean(&day(d)).map(|(m, _)| m)).collect();
    Some(row(user, metric, &date.to_string(), value, n, &baseline))
}

const SEP: char = '\u{1f}';
const IDS: Identities<'static> = Identities { namespace: "id", keep: Keep { value: true, category: false, time_zone: true } };

/// State: every identity ([`IDS`], whatever its metric: an edit may move a record to or from a
/// followed metric), the followed samples' values by day (`d␟metric␟date␟source␟record`, so a
/// day's values read back in identity order), and which rows were emitted (`e␟metric␟date`).
#[derive(Debug, Default)]
pub struct ReadinessBaselineProcessor;

fn day_prefix(metric: &str, date: NaiveDate) -> String {
    format!("d{SEP}{metric}{SEP}{date}{SEP}")
}

fn followed(s: &Sample) -> Option<(&'static str, NaiveDate)> {
    let m = METRICS.iter().copied().find(|m| *m == s.metric)?;
    Some((m, Zone::parse(&s.time_zone).local_date(s.start_ms)))
}

impl ReadinessBaselineProcessor {
    /// Moves the day index by one identity's change; returns the (metric, date) it touched.
    fn index(state: &mut dyn State, change: &Change, touched: &mut BTreeSet<(&'static str, NaiveDate)>) {
        if change.is_noop() {
            return;
        }
        if let Some(s) = &change.before {
            if let Some((m, d)) = followed(s) {
                state.delete(&format!("{}{}{SEP}{}", day_prefix(m, d), s.source, s.source_record_id));
                touched.insert((m, d));
            }
        }
        if let Some(s) = &change.after {
            if let Some((m, d)) = followed(s) {
                state.put_json(&format!("{}{}{SEP}{}", day_prefix(m, d), s.source, s.source_record_id), &s.value);
                touched.insert((m, d));
            }
        }
    }
}

impl Processor for ReadinessBaselineProcessor {
    type Output = ReadinessBaseline;

    fn process(&mut self, input: &Input, state: &mut dyn State, out: &mut dyn Emitter<ReadinessBaseline>) -> Result<(), Invalid> {
        let user = input.user_id().to_owned();
        let mut touched = BTreeSet::new();
        let mut sources = IDS.sources(state);
        match input {
            Input::Samples(b) => {
                for s in &b.samples {
                    let c = IDS.upsert(state, &mut sources, s);
                    Self::index(state, &c, &mut touched);
                }
            }
            Input::Changes(b) => {
                for s in &b.edits {
                    let c = IDS.upsert(state, &mut sources, s);
                    Self::index(state, &c, &mut touched);
                }
                for d in &b.deletions {
                    let c = IDS.delete(state, &mut sources, &d.source, &d.source_record_id, d.deleted_version);
                    Self::index(state, &c, &mut touched);
                }
            }
            Input::Domain(_) | Input::SessionImpact(_) => return Ok(()),
        }
        // A day's change moves its own row and the baseline of the seven days after it.
        let mut rows: BTreeSet<(&str, NaiveDate)> = BTreeSet::new();
        for (m, d) in touched {
            rows.extend((0..=WINDOW_DAYS).filter_map(|k| d.checked_add_days(Days::new(k))).map(|x| (m, x)));
        }
        // Each day a row reads (its own and its window's) is read from state once per record, not
        // once per row that reads it: the rows only write their `e␟` markers, never a day.
        let mut days: BTreeMap<(&str, NaiveDate), Vec<f64>> = BTreeMap::new();
        for &(m, date) in &rows {
            for d in (0..=WINDOW_DAYS).filter_map(|k| date.checked_sub_days(Days::new(k))) {
                days.entry((m, d)).or_insert_with(|| state.scan_json::<f64>(&day_prefix(m, d)).into_iter().map(|(_, v)| v).collect());
            }
        }
        for (m, date) in rows {
            let day = |d: NaiveDate| days.get(&(m, d)).cloned().unwrap_or_default();
            let emitted = format!("e{SEP}{m}{SEP}{date}");
            match derive(&user, m, date, day) {
                Some(r) => {
                    state.put(&emitted, vec![1]);
                    out.upsert(output_key(&user, m, date), r);
                }
                None if state.get(&emitted).is_some() => {
                    state.delete(&emitted);
                    out.retract(output_key(&user, m, date));
                }
                None => {}
            }
        }
        Ok(())
    }
}

/// Batch: every row from the final sample set of `inputs` (any order).
pub fn oracle(inputs: &[Input]) -> BTreeMap<String, ReadinessBaseline> {
    let mut days: BTreeMap<(String, &str, NaiveDate), Vec<f64>> = BTreeMap::new();
    // effective_samples lists a user's samples in (source, record) order: a day's values in
    // the order streaming reads them back.
    for (user, samples) in effective_samples(inputs) {
        for s in &samples {
            if let Some((m, d)) = followed(s) {
                days.entry((user.clone(), m, d)).or_default().push(s.value);
            }
        }
    }
    let mut out = BTreeMap::new();
    for (user, m, date) in days.keys() {
        let day = |d: NaiveDate| days.get(&(user.clone(), *m, d)).cloned().unwrap_or_default();
        if let Some(r) = derive(user, m, *date, day) {
            out.insert(output_key(user, m, *date), r);
        }
    }
    out
}

#[cfg(any(test, feature = "testkit"))]
pub mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use vitals_schemas::{ChangeBatch, Deletion, Lane, SampleBatch, SourceKind};

    use super::*;
    use crate::driver::Driver;

    pub const DAY_MS: i64 = 86_400_000;
    /// 2026-10-20T06:00Z: a week that holds Berlin's autumn DST change.
    pub const BASE: i64 = 1_792_476_000_000;

    pub fn sample(src: &str, id: &str, metric: &str, at: i64, value: f64, tz: &str, version: i64) -> Sample {
        Sample {
            source: src.into(),
            source_kind: SourceKind::Watch,
            source_record_id: id.into(),
            metric: metric.into(),
            start_ms: at,
            end_ms: at,
            value,
            unit: Catalog::embedded().get(metric).map(|s| s.unit.clone()).unwrap_or_default(),
            category: None,
            time_zone: tz.into(),
            version,
            metadata: HashMap::new(),
        }
    }

    pub fn batch(user: &str, samples: Vec<Sample>) -> Input {
        Input::Samples(SampleBatch { request_id: "r".into(), user_id: user.into(), received_at_ms: 0, lane: Lane::Hot, samples })
    }

    pub fn changes(user: &str, edits: Vec<Sample>, deletions: Vec<Deletion>) -> Input {
        Input::Changes(ChangeBatch { request_id: "r".into(), user_id: user.into(), received_at_ms: 0, edits, deletions })
    }

    pub fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    pub fn driver() -> Driver<ReadinessBaselineProcessor> {
        Driver::new(ReadinessBaselineProcessor)
    }

    #[test]
    fn the_baseline_is_the_seven_days_before_and_z_needs_three() {
        let mut d = driver();
        // Resting HR 60, 62, 64 on three days, then 70 with two samples (68 and 72).
        let rhr = |id: &str, day: i64, v: f64| sample("watch", id, "resting_heart_rate", BASE + day * DAY_MS, v, "UTC", 1);
        d.feed(&batch("u", vec![rhr("a", 0, 60.0), rhr("b", 1, 62.0), rhr("c", 2, 64.0)])).unwrap();
        d.feed(&batch("u", vec![rhr("d", 3, 68.0), rhr("e", 3, 72.0)])).unwrap();
        let p = d.projection();
        let first = &p[&output_key("u", "resting_heart_rate", date("2026-10-20"))];
        assert_eq!((first.baseline_days, first.baseline_mean, first.z), (0, None, None), "{first:?}");
        let two = &p[&output_key("u", "resting_heart_rate", date("2026-10-22"))];
        assert_eq!((two.baseline_days, two.baseline_mean, two.baseline_sd, two.z), (2, Some(61.0), Some(2f64.sqrt()), None), "{two:?}");
        let r = &p[&output_key("u", "resting_heart_rate", date("2026-10-23"))];
        assert_eq!((r.value, r.samples, r.baseline_days, r.baseline_mean, r.baseline_sd, r.delta), (70.0, 2, 3, Some(62.0), Some(2.0), Some(8.0)));
        assert_eq!((r.z, r.unit.as_str()), (Some(4.0), "count/min"));
        // A day more than seven days back is out of the window.
        d.feed(&batch("u", vec![rhr("f", 10, 61.0), rhr("g", 11, 61.0)])).unwrap();
        let p = d.projection();
        let day10 = &p[&output_key("u", "resting_heart_rate", date("2026-10-30"))];
        assert_eq!((day10.baseline_days, day10.baseline_mean), (1, Some(70.0)), "only 10-23 is within 10-23..=10-29");
        let day11 = &p[&output_key("u", "resting_heart_rate", date("2026-10-31"))];
        assert_eq!((day11.baseline_days, day11.baseline_mean), (1, Some(61.0)), "10-23 has left the window");
    }

    #[test]
    fn edits_and_deletions_re_derive_the_days_after() {
        let mut d = driver();
        let hrv = |id: &str, day: i64, v: f64, version: i64| sample("watch", id, "hrv_sdnn", BASE + day * DAY_MS, v, "UTC", version);
        d.feed(&batch("u", vec![hrv("a", 0, 40.0, 1), hrv("b", 1, 50.0, 1)])).unwrap();
        let k1 = output_key("u", "hrv_sdnn", date("2026-10-21"));
        assert_eq!(d.projection()[&k1].baseline_mean, Some(40.0));
        d.feed(&changes("u", vec![hrv("a", 0, 44.0, 2)], vec![])).unwrap();
        assert_eq!(d.projection()[&k1].baseline_mean, Some(44.0), "the edit of day 0 moved day 1's baseline");
        // An edit that moves the record to another metric takes it out of HRV altogether.
        d.feed(&changes("u", vec![sample("watch", "a", "heart_rate", BASE, 44.0, "UTC", 3)], vec![])).unwrap();
        assert!(!d.projection().contains_key(&output_key("u", "hrv_sdnn", date("2026-10-20"))));
        assert_eq!(d.projection()[&k1].baseline_days, 0);
        d.feed(&changes("u", vec![], vec![Deletion { source: "watch".into(), source_record_id: "b".into(), metric: "hrv_sdnn".into(), deleted_version: None }])).unwrap();
        assert!(d.projection().is_empty(), "{:?}", d.projection());
        assert_eq!(d.log.last().unwrap().value, None, "a retraction was emitted");
    }

    #[test]
    fn days_are_local_to_each_samples_zone_and_other_metrics_are_ignored() {
        let mut d = driver();
        // 23:30 UTC on 10-20 is already 10-21 in Tokyo.
        let late = BASE + 17 * 3_600_000 + 30 * 60_000;
        d.feed(&batch("u", vec![
            sample("watch", "t", "resting_heart_rate", late, 55.0, "Asia/Tokyo", 1),
            sample("watch", "s", "steps", late, 1000.0, "UTC", 1),
        ]))
        .unwrap();
        let keys: Vec<String> = d.projection().into_keys().collect();
        assert_eq!(keys, [output_key("u", "resting_heart_rate", date("2026-10-21"))]);
    }

    // ---- the property: streaming == oracle ----------------------------------------------------

    pub const ZONES: [&str; 3] = ["UTC", "Europe/Berlin", "-07:00"];
    const SOURCES: [&str; 2] = ["watch", "ring"];
    const ALL_METRICS: [&str; 3] = ["resting_heart_rate", "hrv_sdnn", "heart_rate"];

    #[derive(Debug, Clone)]
    pub enum Event {
        Upsert { user: u8, src: usize, id: u8, metric: usize, day: i64, hour: i64, value: u16, zone: usize, version: i64 },
        Delete { user: u8, src: usize, id: u8, version: Option<i64> },
    }

    pub fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            8 => (0u8..2, 0usize..2, 0u8..10, 0usize..3, 0i64..12, 0i64..24, 20u16..200, 0usize..3, 1i64..4).prop_map(
                |(user, src, id, metric, day, hour, value, zone, version)| Event::Upsert { user, src, id, metric, day, hour, value, zone, version }),
            2 => (0u8..2, 0usize..2, 0u8..10, proptest::option::of(1i64..4)).prop_map(|(user, src, id, version)| Event::Delete { user, src, id, version }),
        ]
    }

    /// The inputs of `events`; one (identity, version) always carries one content, as a real
    /// client's does (a version is an edit).
    pub fn inputs_of(events: Vec<Event>) -> Vec<Input> {
        let mut first: HashMap<(u8, usize, u8, i64), Event> = HashMap::new();
        events
            .into_iter()
            .map(|e| match e {
                Event::Upsert { user, src, id, version, .. } => first.entry((user, src, id, version)).or_insert(e).clone(),
                other => other,
            })
            .map(|e| match e {
                Event::Upsert { user, src, id, metric, day, hour, value, zone, version } => {
                    // Fractional values: state must round-trip floats exactly.
                    let s = sample(SOURCES[src], &format!("r{id}"), ALL_METRICS[metric], BASE + day * DAY_MS + hour * 3_600_000, value as f64 / 3.0, ZONES[zone], version);
                    batch(&format!("u{user}"), vec![s])
                }
                Event::Delete { user, src, id, version } => changes(
                    &format!("u{user}"),
                    vec![],
                    vec![Deletion { source: SOURCES[src].into(), source_record_id: format!("r{id}"), metric: "heart_rate".into(), deleted_version: version }],
                ),
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(128)))]

        /// Any arrival order, some records delivered twice, intervals of any size: the rows equal
        /// the batch oracle exactly (no tolerance: sums are taken in one order).
        #[test]
        fn streaming_equals_the_oracle_whatever_the_order(
            events in proptest::collection::vec(event(), 1..60),
            dup_every in 2usize..6,
            cuts in proptest::collection::vec(1usize..6, 1..10),
            seed in any::<u64>(),
        ) {
            let inputs = inputs_of(events);
            let order = crate::driver::arrival_order(inputs.len(), dup_every, seed);
            let mut d = driver();
            prop_assert_eq!(d.feed_in_intervals(&inputs, &order, &cuts), 0, "no record is rejected");
            prop_assert_eq!(d.projection(), oracle(&inputs));
        }
    }
}
