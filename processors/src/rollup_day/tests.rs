//! `rollup_day` through the test driver: hand-computed scenarios, then the property that the
//! streaming result equals the batch oracle under any order, duplicates, edits, deletions, DST
//! days and travel.

use std::collections::HashMap;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use vitals_schemas::{ChangeBatch, Deletion, DomainChange, DomainChangeBatch, Lane, Sample, SampleBatch, SourceKind};

use super::*;
use crate::driver::Driver;

pub fn ms(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap().timestamp_millis()
}

#[allow(clippy::too_many_arguments)]
pub fn sample(source: &str, kind: SourceKind, id: &str, metric: &str, start: i64, end: i64, value: f64, tz: &str) -> Sample {
    let unit = Catalog::embedded().get(metric).unwrap().unit.clone();
    Sample {
        source: source.into(),
        source_kind: kind,
        source_record_id: id.into(),
        metric: metric.into(),
        start_ms: start,
        end_ms: end,
        value,
        unit,
        category: None,
        time_zone: tz.into(),
        version: 1,
        metadata: HashMap::new(),
    }
}

pub fn batch(user: &str, samples: Vec<Sample>) -> Input {
    Input::Samples(SampleBatch { request_id: "r".into(), user_id: user.into(), received_at_ms: 0, lane: Lane::Hot, samples })
}

pub fn changes(user: &str, edits: Vec<Sample>, deletions: Vec<Deletion>) -> Input {
    Input::Changes(ChangeBatch { request_id: "r".into(), user_id: user.into(), received_at_ms: 0, edits, deletions })
}

pub fn priority(user: &str, at: i64, sources: &[&str]) -> Input {
    // A change id names one change: equal (occurred_at, change_id) means the same content.
    Input::Domain(DomainChangeBatch {
        request_id: "r".into(),
        user_id: user.into(),
        received_at_ms: 0,
        changes: vec![DomainChange {
            change_id: format!("p{at}-{}", sources.join(",")),
            kind: vitals_schemas::DomainChangeKind::SourcePriorityUpdated,
            occurred_at_ms: at,
            session: None,
            product: None,
            privacy: None,
            source_priority: Some(sources.iter().map(|s| s.to_string()).collect()),
        }],
    })
}

pub fn driver() -> Driver<RollupDayProcessor> {
    Driver::new(RollupDayProcessor::new(Config::default()))
}

pub fn day(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

#[test]
pub fn overlapping_phone_and_watch_steps_are_never_double_counted() {
    let mut d = driver();
    let watch = sample("watch", SourceKind::Watch, "w1", "steps", ms(2026, 5, 4, 10, 0), ms(2026, 5, 4, 10, 30), 1000.0, "UTC");
    let phone = sample("phone", SourceKind::Phone, "p1", "steps", ms(2026, 5, 4, 10, 10), ms(2026, 5, 4, 10, 40), 900.0, "UTC");
    d.feed(&batch("u", vec![watch, phone])).unwrap();
    let p = d.projection();
    let row = &p[&output_key("u", "steps", day("2026-05-04"))];
    // Watch wins the overlap; the phone only adds its last 10 of 30 minutes.
    assert!((row.sum.unwrap() - 1300.0).abs() < 1e-9, "{row:?}");
    assert_eq!(row.primary_source.as_deref(), Some("watch"));

    // The user prefers the phone: the phone's 900 plus the watch's first 10 minutes.
    d.feed(&priority("u", 1, &["phone", "watch"])).unwrap();
    let row = &d.projection()[&output_key("u", "steps", day("2026-05-04"))];
    assert!((row.sum.unwrap() - (900.0 + 1000.0 / 3.0)).abs() < 1e-9, "{row:?}");
    // An older priority change arriving late changes nothing.
    d.feed(&priority("u", 0, &["watch"])).unwrap();
    let again = &d.projection()[&output_key("u", "steps", day("2026-05-04"))];
    assert_eq!(again.sum, row.sum);
}

#[test]
pub fn samples_straddling_midnight_are_split_pro_rata_in_their_own_zone() {
    let mut d = driver();
    // 23:00–01:00 in New York (UTC−4 in May): half on each local date.
    let s = sample("watch", SourceKind::Watch, "w", "steps", ms(2026, 5, 5, 3, 0), ms(2026, 5, 5, 5, 0), 1200.0, "America/New_York");
    d.feed(&batch("u", vec![s])).unwrap();
    let p = d.projection();
    assert_eq!(p[&output_key("u", "steps", day("2026-05-04"))].sum, Some(600.0));
    assert_eq!(p[&output_key("u", "steps", day("2026-05-05"))].sum, Some(600.0));
}

#[test]
pub fn dst_and_travel_use_each_samples_own_zone() {
    let mut d = driver();
    // Berlin, spring forward (2026-03-29 is 23 h long): 23:30 local on the 29th is 21:30 UTC.
    let late = sample("watch", SourceKind::Watch, "h1", "heart_rate", ms(2026, 3, 29, 21, 30), ms(2026, 3, 29, 21, 30), 60.0, "Europe/Berlin");
    // The same instant in Tokyo is already the 30th.
    let tokyo = sample("watch", SourceKind::Watch, "h2", "heart_rate", ms(2026, 3, 29, 21, 30), ms(2026, 3, 29, 21, 30), 80.0, "Asia/Tokyo");
    // A steps sample covering the whole Berlin day of the 29th: 23 real hours, all on that date.
    let all_day = sample("phone", SourceKind::Phone, "s1", "steps", ms(2026, 3, 28, 23, 0), ms(2026, 3, 29, 22, 0), 2300.0, "Europe/Berlin");
    d.feed(&batch("u", vec![late, tokyo, all_day])).unwrap();
    let p = d.projection();
    assert_eq!(p[&output_key("u", "heart_rate", day("2026-03-29"))].count, 1);
    assert_eq!(p[&output_key("u", "heart_rate", day("2026-03-30"))].mean, Some(80.0));
    assert_eq!(p[&output_key("u", "steps", day("2026-03-29"))].sum, Some(2300.0));
    assert!(!p.contains_key(&output_key("u", "steps", day("2026-03-30"))));
}

#[test]
pub fn edits_deletions_and_stale_versions() {
    let mut d = driver();
    let s1 = sample("scale", SourceKind::ThirdParty, "m1", "body_mass", ms(2026, 6, 1, 7, 0), ms(2026, 6, 1, 7, 0), 80.0, "UTC");
    let s2 = sample("scale", SourceKind::ThirdParty, "m2", "body_mass", ms(2026, 6, 1, 20, 0), ms(2026, 6, 1, 20, 0), 79.0, "UTC");
    d.feed(&batch("u", vec![s1.clone(), s2.clone()])).unwrap();
    let key = output_key("u", "body_mass", day("2026-06-01"));
    assert_eq!(d.projection()[&key].last, Some(79.0));
    // An edit of the evening weigh-in, then the stale original again: the edit stands.
    let edit = Sample { value: 78.5, version: 2, ..s2.clone() };
    d.feed(&changes("u", vec![edit], vec![])).unwrap();
    d.feed(&batch("u", vec![s2.clone()])).unwrap();
    let row = &d.projection()[&key];
    assert_eq!((row.last, row.min, row.max, row.count), (Some(78.5), Some(78.5), Some(80.0), 2));
    // Deleting both retracts the day.
    let del = |id: &str| Deletion { source: "scale".into(), source_record_id: id.into(), metric: "body_mass".into(), deleted_version: None };
    d.feed(&changes("u", vec![], vec![del("m1"), del("m2")])).unwrap();
    assert!(!d.projection().contains_key(&key));
    assert_eq!(d.log.last().unwrap().value, None, "a retraction was emitted");
    // A deletion that arrived first still wins over the sample arriving later.
    let mut d2 = driver();
    d2.feed(&changes("u", vec![], vec![del("m1")])).unwrap();
    d2.feed(&batch("u", vec![s1])).unwrap();
    assert!(d2.projection().is_empty());
}

#[test]
pub fn one_source_per_day_for_sleep_stages() {
    let mut d = driver();
    let stage = |src: &str, kind, id: &str, cat: &str, h0: u32, h1: u32| Sample {
        category: Some(cat.into()),
        ..sample(src, kind, id, "sleep_stage", ms(2026, 7, 2, h0, 0), ms(2026, 7, 2, h1, 0), ((h1 - h0) * 60) as f64, "UTC")
    };
    d.feed(&batch("u", vec![
        stage("watch", SourceKind::Watch, "a", "core", 1, 3),
        stage("watch", SourceKind::Watch, "b", "deep", 3, 4),
        stage("phone", SourceKind::Phone, "c", "asleep_unspecified", 1, 5),
    ]))
    .unwrap();
    let row = &d.projection()[&output_key("u", "sleep_stage", day("2026-07-02"))];
    assert_eq!(row.category_minutes, HashMap::from([("core".to_string(), 120.0), ("deep".to_string(), 60.0)]));
    assert_eq!(row.primary_source.as_deref(), Some("watch"));
}

// ---- the property: streaming == oracle ---------------------------------------------------------

pub const SOURCES: [(&str, SourceKind); 3] = [("watch", SourceKind::Watch), ("phone", SourceKind::Phone), ("app", SourceKind::ThirdParty)];
pub const ZONES: [&str; 4] = ["Europe/Berlin", "America/New_York", "+05:30", "UTC"];
pub const METRICS: [&str; 5] = ["steps", "heart_rate", "sleep_stage", "body_mass", "active_energy"];

#[derive(Debug, Clone)]
pub enum Event {
    Upsert { user: u8, src: usize, id: u8, metric: usize, start_min: i64, dur_min: i64, value: u32, zone: usize, version: i64 },
    Delete { user: u8, src: usize, id: u8, metric: usize, version: Option<i64> },
    Priority { user: u8, at: i64, order: Vec<usize> },
}

pub fn event() -> impl Strategy<Value = Event> {
    // Times around Berlin's autumn DST change (2026-10-25), over three days.
    prop_oneof![
        8 => (0u8..2, 0usize..3, 0u8..12, 0usize..5, 0i64..4320, 0i64..600, 1u32..200, 0usize..4, 1i64..4).prop_map(
            |(user, src, id, metric, start_min, dur_min, value, zone, version)| Event::Upsert { user, src, id, metric, start_min, dur_min, value, zone, version }),
        2 => (0u8..2, 0usize..3, 0u8..12, 0usize..5, proptest::option::of(1i64..4)).prop_map(
            |(user, src, id, metric, version)| Event::Delete { user, src, id, metric, version }),
        1 => (0u8..2, 0i64..5, Just(vec![0usize, 1, 2]).prop_shuffle()).prop_map(|(user, at, order)| Event::Priority { user, at, order }),
    ]
}

pub fn to_input(e: &Event) -> Input {
    let base = ms(2026, 10, 23, 12, 0);
    match e {
        Event::Upsert { user, src, id, metric, start_min, dur_min, value, zone, version } => {
            let m = METRICS[*metric];
            let kind = Catalog::embedded().get(m).unwrap().kind;
            let start = base + start_min * 60_000;
            // Discrete and instant samples are instants; the others intervals.
            let end = if matches!(kind, MetricKind::Discrete | MetricKind::Instant) { start } else { start + (dur_min + 1) * 60_000 };
            let (source, sk) = SOURCES[*src];
            // The identity decides the metric, as in real data (one record id, one type).
            // Fractional values: state must round-trip floats exactly.
            let mut s = sample(source, sk, &format!("{m}-{id}"), m, start, end, *value as f64 / 7.0 + 1.0, ZONES[*zone]);
            s.version = *version;
            if m == "sleep_stage" {
                s.category = Some(["core", "deep", "rem", "awake"][(*value % 4) as usize].into());
                s.value = (end - start) as f64 / 60_000.0;
            }
            if *version > 1 {
                changes(&format!("u{user}"), vec![s], vec![])
            } else {
                batch(&format!("u{user}"), vec![s])
            }
        }
        Event::Delete { user, src, id, metric, version } => {
            let m = METRICS[*metric];
            changes(&format!("u{user}"), vec![], vec![Deletion {
                source: SOURCES[*src].0.into(),
                source_record_id: format!("{m}-{id}"),
                metric: m.into(),
                deleted_version: *version,
            }])
        }
        Event::Priority { user, at, order } => {
            let names: Vec<&str> = order.iter().map(|i| SOURCES[*i].0).collect();
            priority(&format!("u{user}"), *at, &names)
        }
    }
}

/// One identity at one version is one sample (a re-send is identical): the first content
/// generated for (user, source, id, metric, version) stands for every copy.
pub fn inputs_of(events: Vec<Event>) -> Vec<Input> {
    let mut first: HashMap<(u8, usize, u8, usize, i64), Event> = HashMap::new();
    let events: Vec<Event> = events
        .into_iter()
        .map(|e| match e {
            Event::Upsert { user, src, id, metric, version, .. } => first.entry((user, src, id, metric, version)).or_insert(e).clone(),
            other => other,
        })
        .collect();
    events.iter().map(to_input).collect()
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=N for a longer hunt.
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn streaming_equals_the_oracle_whatever_the_order(
        events in proptest::collection::vec(event(), 1..60),
        dup_every in 2usize..6,
        seed in any::<u64>(),
    ) {
        let inputs = inputs_of(events);
        // Arrival order: a seeded shuffle of the inputs, with some delivered twice.
        let order = crate::driver::arrival_order(inputs.len(), dup_every, seed);
        let mut d = driver();
        for i in &order {
            d.feed(&inputs[*i]).unwrap();
        }
        let expected = oracle(&inputs);
        let got = d.projection();

        prop_assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
        for (k, v) in &expected {
            prop_assert_eq!(&got[k], v, "key {}", k);
        }
    }
}

proptest! {
    /// Intervals as the runtime cuts them: each touched day is recomputed once at the end of its
    /// interval, from the compact state, whatever the boundaries, order and duplicates.
    #[test]
    fn intervals_of_any_size_equal_the_oracle(
        events in proptest::collection::vec(event(), 1..60),
        cuts in proptest::collection::vec(1usize..8, 1..20),
        seed in any::<u64>(),
    ) {
        let inputs = inputs_of(events);
        let order = crate::driver::arrival_order(inputs.len(), 3, seed);
        let mut d = driver();
        prop_assert_eq!(d.feed_in_intervals(&inputs, &order, &cuts), 0, "no record is rejected");
        prop_assert_eq!(d.projection(), oracle(&inputs));
    }
}

/// The record ids of `inputs` as UUIDs: `m-2j` as a lowercase UUID, `m-2j+1` as the same
/// UUID in uppercase — two identities, as the ids differ (packed keys must not conflate them).
pub fn with_uuid_ids(inputs: &[Input]) -> Vec<Input> {
    fn uuid(id: &str) -> String {
        let (m, n) = id.rsplit_once('-').unwrap();
        let n: u64 = n.parse().unwrap();
        let m = METRICS.iter().position(|x| *x == m).unwrap();
        let u = format!("abcdef{m:02x}-0000-4000-8000-{:012x}", n / 2);
        if n % 2 == 1 {
            u.to_uppercase()
        } else {
            u
        }
    }
    inputs
        .iter()
        .cloned()
        .map(|mut i| {
            match &mut i {
                Input::Samples(b) => b.samples.iter_mut().for_each(|s| s.source_record_id = uuid(&s.source_record_id)),
                Input::Changes(b) => {
                    b.edits.iter_mut().for_each(|s| s.source_record_id = uuid(&s.source_record_id));
                    b.deletions.iter_mut().for_each(|d| d.source_record_id = uuid(&d.source_record_id));
                }
                _ => {}
            }
            i
        })
        .collect()
}

proptest! {
    /// A dictionary entry that leaked (a source coded but never used, codes in any order — what
    /// a rejected record would leave if its writes were not undone) changes nothing: the
    /// projection still equals the oracle, with UUID record ids in both cases.
    #[test]
    fn leaked_dictionary_entries_and_uuid_ids_change_nothing(
        events in proptest::collection::vec(event(), 1..60),
        junk in proptest::collection::vec(prop_oneof![Just("watch".to_owned()), Just("phone".to_owned()), Just("app".to_owned()), any::<String>()], 0..6),
        cuts in proptest::collection::vec(1usize..8, 1..20),
    ) {
        let inputs = with_uuid_ids(&inputs_of(events));
        let mut names: Vec<String> = Vec::new();
        for n in junk {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        let mut d = driver();
        for u in ["u0", "u1"] {
            let mut st = crate::driver::MemState::default();
            st.map.insert(SOURCES_KEY.to_owned(), Sources::encode(&names));
            d.states.insert(u.to_owned(), st);
        }
        let mut rest: &[Input] = &inputs;
        let mut c = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*c.next().unwrap()).min(rest.len());
            let interval: Vec<(i64, Input)> = rest[..n].iter().map(|i| (0, i.clone())).collect();
            let (_, rejected) = d.feed_interval(&interval);
            prop_assert_eq!(rejected, 0);
            rest = &rest[n..];
        }
        prop_assert_eq!(d.projection(), oracle(&inputs));
    }
}

/// The keys are short: a UUID identity takes 22 bytes (`i`, the source code, `u` and 19 packed
/// characters), whatever the source's name.
#[test]
pub fn an_identity_key_is_short() {
    let mut d = driver();
    let id = "3f2c8a0e-5b1d-4c7e-9a60-1d2e3f405162";
    d.feed(&batch("u", vec![sample("com.apple.health.watch", SourceKind::Watch, id, "heart_rate", ms(2026, 10, 23, 12, 0), ms(2026, 10, 23, 12, 0), 61.0, "UTC")])).unwrap();
    let ids: Vec<&String> = d.states["u"].map.keys().filter(|k| k.starts_with('i')).collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].len(), 22, "{ids:?}");
    assert_eq!(Sources::load(&d.states["u"], SOURCES_KEY).name(0), Some("com.apple.health.watch"));
}

/// A user's source dictionary is read for every record: one user may not grow it without bound.
/// The record that would bring a source past `keys::MAX_SOURCES` is refused (`too_many_sources`)
/// and leaves no trace; what the interval did before it, for that user, still lands, and records
/// with known sources go on.
#[test]
pub fn a_record_past_the_source_cap_is_refused_and_the_interval_keeps_its_work() {
    use crate::keys::MAX_SOURCES;
    let at = ms(2026, 5, 4, 10, 0);
    let hr = |src: &str, id: &str| sample(src, SourceKind::Watch, id, "heart_rate", at, at, 60.0, "UTC");
    let mut d = driver();
    // MAX_SOURCES distinct sources, in records of 500.
    let many: Vec<Sample> = (0..MAX_SOURCES).map(|i| hr(&format!("src-{i}"), &format!("r{i}"))).collect();
    for chunk in many.chunks(500) {
        let (_, rejected) = d.feed_interval(&[(at, batch("u", chunk.to_vec()))]);
        assert_eq!(rejected, 0);
    }
    // One interval: a steps sample of a known source, then a record with one source too many.
    let steps = sample("src-0", SourceKind::Watch, "s1", "steps", at, at + 60_000, 100.0, "UTC");
    let (_, rejected) = d.feed_interval(&[(at, batch("u", vec![steps])), (at, batch("u", vec![hr("src-0", "ok"), hr("one-too-many", "x")]))]);
    assert_eq!(rejected, 1, "the record bringing source {} is refused", MAX_SOURCES + 1);
    let p = d.projection();
    let steps_row = p.get(&output_key("u", "steps", day("2026-05-04"))).expect("the interval's earlier record still lands");
    assert_eq!(steps_row.sum, Some(100.0));
    assert_eq!(p[&output_key("u", "heart_rate", day("2026-05-04"))].count, MAX_SOURCES as i64, "the refused record left no trace");
    let err = d.feed(&batch("u", vec![hr("another-new", "y")])).unwrap_err();
    assert_eq!(err.code, "too_many_sources");
    // Known sources go on; another user is not affected.
    d.feed(&batch("u", vec![hr("src-7", "z")])).unwrap();
    d.feed(&batch("w", vec![hr("one-too-many", "x")])).unwrap();
    assert_eq!(d.projection()[&output_key("u", "heart_rate", day("2026-05-04"))].count, MAX_SOURCES as i64 + 1);
}
