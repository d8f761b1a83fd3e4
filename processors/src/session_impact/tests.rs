//! `session_impact` through the test driver: hand-computed scenarios (windows, deltas, late
//! samples, the final timer, deletions, backfill, overlapping sources), then the property that
//! the streaming projection equals the batch oracle under any order, duplicates, edits,
//! deletions and stream-time timestamps.

use std::collections::HashMap;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use vitals_schemas::{ChangeBatch, Deletion, DomainChangeBatch, Lane, SampleBatch, Session, SourceKind};

use super::*;
use crate::Versioned;
use crate::driver::Driver;

/// 2026-05-04 at h:mi UTC.
pub fn t(h: u32, mi: u32) -> i64 {
    Utc.with_ymd_and_hms(2026, 5, 4, h, mi, 0).unwrap().timestamp_millis()
}

pub const DAY: i64 = 86_400_000;

pub fn sample(source: &str, kind: SourceKind, id: &str, metric: &str, start: i64, end: i64, value: f64) -> Sample {
    let unit = Catalog::embedded().get(metric).map(|m| m.unit.clone()).unwrap_or_default();
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
        time_zone: "UTC".into(),
        version: 1,
        metadata: HashMap::new(),
    }
}

/// A watch heart-rate reading.
pub fn hr(id: &str, at: i64, value: f64) -> Sample {
    sample("watch", SourceKind::Watch, id, "heart_rate", at, at, value)
}

pub fn batch(user: &str, lane: Lane, samples: Vec<Sample>) -> Input {
    Input::Samples(SampleBatch { request_id: "r".into(), user_id: user.into(), received_at_ms: 0, lane, samples })
}

pub fn hot(samples: Vec<Sample>) -> Input {
    batch("u", Lane::Hot, samples)
}

pub fn changes(user: &str, edits: Vec<Sample>, deletions: Vec<Deletion>) -> Input {
    Input::Changes(ChangeBatch { request_id: "r".into(), user_id: user.into(), received_at_ms: 0, edits, deletions })
}

pub fn change(id: &str, kind: DomainChangeKind, at: i64, session: Option<Session>) -> DomainChange {
    DomainChange { change_id: id.into(), kind, occurred_at_ms: at, session, product: None, privacy: None, source_priority: None }
}

pub fn domain(user: &str, changes: Vec<DomainChange>) -> Input {
    Input::Domain(DomainChangeBatch { request_id: "r".into(), user_id: user.into(), received_at_ms: 0, changes })
}

pub fn sess(id: &str, product: Option<&str>, start: Option<i64>, end: Option<i64>) -> Session {
    Session { session_id: id.into(), product_id: product.map(Into::into), start_ms: start, end_ms: end, time_zone: Some("UTC".into()) }
}

pub fn started(id: &str, product: &str, start: i64) -> Input {
    domain("u", vec![change(&format!("{id}-start"), DomainChangeKind::SessionStarted, start, Some(sess(id, Some(product), Some(start), None)))])
}

pub fn ended(id: &str, end: i64) -> Input {
    domain("u", vec![change(&format!("{id}-end"), DomainChangeKind::SessionEnded, end, Some(sess(id, None, None, Some(end))))])
}

pub fn deleted(id: &str, at: i64) -> Input {
    domain("u", vec![change(&format!("{id}-del"), DomainChangeKind::SessionDeleted, at, Some(sess(id, None, None, None)))])
}

pub fn priority(at: i64, sources: &[&str]) -> Input {
    domain("u", vec![DomainChange {
        source_priority: Some(sources.iter().map(|s| s.to_string()).collect()),
        ..change(&format!("p{at}"), DomainChangeKind::SourcePriorityUpdated, at, None)
    }])
}

pub fn driver() -> Driver<SessionImpactProcessor> {
    Driver::new(SessionImpactProcessor::new(Config::default()))
}

pub fn stats(n: i64, mean: f64, min: f64, max: f64, total: f64) -> Option<WindowStats> {
    Some(WindowStats { n, mean, min, max, total })
}

pub fn metric<'a>(i: &'a SessionImpact, name: &str) -> &'a WindowedMetric {
    i.metrics.iter().find(|m| m.metric == name).unwrap_or_else(|| panic!("no {name} in {i:?}"))
}

pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// The inputs of the hand-computed session: coffee from 10:00 to 10:30, so before = [09:00,
/// 10:00), during = [10:00, 10:30), after = [10:30, 12:30).
pub fn coffee_session() -> Vec<Input> {
    vec![
        started("s1", "coffee", t(10, 0)),
        ended("s1", t(10, 30)),
        hot(vec![
            hr("h0", t(8, 59), 50.0), // before the before window
            hr("h1", t(9, 10), 60.0),
            hr("h2", t(9, 50), 64.0),
            hr("h3", t(10, 0), 80.0), // at the start: during
            hr("h4", t(10, 20), 90.0),
            hr("h5", t(10, 30), 70.0), // at the end: after
            hr("h6", t(12, 29), 66.0),
            hr("h7", t(12, 30), 100.0), // after the after window
            // Every source counts for a discrete metric.
            sample("phone", SourceKind::Phone, "ph1", "heart_rate", t(9, 30), t(9, 30), 62.0),
            sample("watch", SourceKind::Watch, "v1", "hrv_sdnn", t(9, 40), t(9, 40), 40.0),
            sample("watch", SourceKind::Watch, "v2", "hrv_sdnn", t(11, 0), t(11, 0), 50.5),
            sample("watch", SourceKind::Watch, "st1", "steps", t(9, 0), t(10, 0), 600.0),
            // Instant and category metrics are not part of an impact.
            sample("scale", SourceKind::ThirdParty, "m1", "body_mass", t(9, 30), t(9, 30), 80.0),
        ]),
    ]
}

#[test]
pub fn windows_and_deltas_are_computed_by_hand() {
    let mut d = driver();
    for i in coffee_session() {
        d.feed(&i).unwrap();
    }
    let p = d.projection();
    assert_eq!(p.len(), 1);
    let i = &p[&output_key("u", "s1")];
    assert_eq!((i.user_id.as_str(), i.session_id.as_str(), i.product_id.as_deref()), ("u", "s1", Some("coffee")));
    assert_eq!((i.start_ms, i.end_ms, i.status, i.deleted), (t(10, 0), Some(t(10, 30)), ImpactStatus::Provisional, false));
    assert_eq!(i.metrics.iter().map(|m| m.metric.as_str()).collect::<Vec<_>>(), ["heart_rate", "hrv_sdnn", "steps"]);
    // Heart rate: before 60, 62 (phone), 64; during 80, 90; after 70, 66.
    assert_eq!(metric(i, "heart_rate"), &WindowedMetric {
        metric: "heart_rate".into(),
        before: stats(3, 62.0, 60.0, 64.0, 186.0),
        during: stats(2, 85.0, 80.0, 90.0, 170.0),
        after: stats(2, 68.0, 66.0, 70.0, 136.0),
        delta_during: Some(23.0),
        delta_after: Some(6.0),
    });
    // HRV: no reading during the session, so no delta_during.
    assert_eq!(metric(i, "hrv_sdnn"), &WindowedMetric {
        metric: "hrv_sdnn".into(),
        before: stats(1, 40.0, 40.0, 40.0, 40.0),
        during: None,
        after: stats(1, 50.5, 50.5, 50.5, 50.5),
        delta_during: None,
        delta_after: Some(10.5),
    });
    // Steps: 600 in the 60-minute before window, a rate of 10 per minute; nothing else.
    assert_eq!(metric(i, "steps"), &WindowedMetric {
        metric: "steps".into(),
        before: stats(1, 10.0, 10.0, 10.0, 600.0),
        during: None,
        after: None,
        delta_during: None,
        delta_after: None,
    });
    assert_eq!(p, oracle(&coffee_session(), d.stream_time_ms));
}

#[test]
pub fn a_late_sample_updates_a_provisional_impact() {
    let mut d = driver();
    for i in coffee_session() {
        d.feed(&i).unwrap();
    }
    let late = hot(vec![hr("h9", t(10, 10), 100.0)]);
    let out = d.feed(&late).unwrap();
    assert_eq!(out.len(), 1, "one session touched, one upsert");
    let i = out[0].value.as_ref().unwrap();
    let h = metric(i, "heart_rate");
    assert_eq!(h.during, stats(3, 90.0, 80.0, 100.0, 270.0));
    assert_eq!(h.delta_during, Some(28.0));
    assert_eq!(h.delta_after, Some(6.0));
    assert_eq!(i.status, ImpactStatus::Provisional);
    // The same sample again is a duplicate: nothing is emitted.
    assert!(d.feed(&late).unwrap().is_empty());
    // An edit of it moves it into the after window.
    let edit = Sample { version: 2, start_ms: t(11, 0), end_ms: t(11, 0), ..hr("h9", 0, 74.0) };
    let out = d.feed(&changes("u", vec![edit.clone()], vec![])).unwrap();
    let h = metric(out[0].value.as_ref().unwrap(), "heart_rate");
    assert_eq!((h.during.as_ref().unwrap().n, h.after.as_ref().unwrap().n), (2, 3));
    // After: 70, 66 and 74.
    assert_eq!(h.after, stats(3, 70.0, 66.0, 74.0, 210.0));
    assert_eq!(h.delta_after, Some(8.0));
    let mut all = coffee_session();
    all.extend([late, changes("u", vec![edit], vec![])]);
    assert_eq!(d.projection(), oracle(&all, d.stream_time_ms));
}

#[test]
pub fn the_timer_makes_it_final_exactly_at_end_plus_after_plus_grace() {
    let mut d = driver();
    let mut fed = Vec::new();
    for i in coffee_session() {
        d.feed_at(t(10, 35), &i).unwrap();
        fed.push(i);
    }
    let key = output_key("u", "s1");
    let due = t(13, 0); // 10:30 + 120 min + 30 min
    assert_eq!(d.states["u"].timers.get("s1"), Some(&due));
    assert_eq!(d.projection()[&key].status, ImpactStatus::Provisional);
    assert!(d.advance_to(due - 1).is_empty(), "not one millisecond early");
    assert_eq!(d.projection()[&key].status, ImpactStatus::Provisional);
    let fired = d.advance_to(due);
    assert_eq!(fired.len(), 1);
    let fin = fired[0].value.as_ref().unwrap();
    assert_eq!(fin.status, ImpactStatus::Final);
    assert_eq!(metric(fin, "heart_rate").delta_during, Some(23.0));
    assert!(d.states["u"].timers.is_empty());
    assert_eq!(d.projection(), oracle(&fed, d.stream_time_ms));
    assert_eq!(oracle(&fed, due - 1)[&key].status, ImpactStatus::Provisional);

    // A late sample after the end still updates the figures; the status stays final.
    let late = hot(vec![hr("h9", t(10, 10), 100.0)]);
    let out = d.feed_at(t(14, 0), &late).unwrap();
    fed.push(late);
    let i = out[0].value.as_ref().unwrap();
    assert_eq!((i.status, metric(i, "heart_rate").delta_during), (ImpactStatus::Final, Some(28.0)));
    assert!(d.states["u"].timers.is_empty());

    // The session's end is corrected to 12:00: final only from 14:30, so provisional again.
    let fix = domain("u", vec![change("s1-fix", DomainChangeKind::SessionUpdated, t(13, 50), Some(sess("s1", None, None, Some(t(12, 0)))))]);
    let out = d.feed_at(t(14, 0), &fix).unwrap();
    fed.push(fix);
    let i = out[0].value.as_ref().unwrap();
    assert_eq!((i.end_ms, i.status), (Some(t(12, 0)), ImpactStatus::Provisional));
    // During is now [10:00, 12:00): 80, 90, 100, 70 and the HRV reading of 11:00.
    assert_eq!(metric(i, "heart_rate").during, stats(4, 85.0, 70.0, 100.0, 340.0));
    assert_eq!(metric(i, "hrv_sdnn").delta_during, Some(10.5));
    assert_eq!(d.states["u"].timers.get("s1"), Some(&t(14, 30)));
    assert!(d.advance_to(t(14, 30) - 1).is_empty());
    assert_eq!(d.advance_to(t(14, 30))[0].value.as_ref().unwrap().status, ImpactStatus::Final);
    assert_eq!(d.projection(), oracle(&fed, d.stream_time_ms));
}

#[test]
pub fn a_session_ending_after_its_due_time_is_final_at_once() {
    let mut d = driver();
    d.feed_at(t(20, 0), &started("s1", "tea", t(10, 0))).unwrap();
    let out = d.feed_at(t(20, 0), &ended("s1", t(10, 30))).unwrap();
    assert_eq!(out[0].value.as_ref().unwrap().status, ImpactStatus::Final);
    assert!(d.states["u"].timers.is_empty(), "no timer for a final impact");
}

#[test]
pub fn a_deleted_session_is_retracted_and_stays_deleted() {
    let mut d = driver();
    for i in coffee_session() {
        d.feed_at(t(10, 35), &i).unwrap();
    }
    let key = output_key("u", "s1");
    assert!(d.projection().contains_key(&key));
    let out = d.feed(&deleted("s1", t(10, 40))).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].key.as_str(), out[0].value.as_ref()), (key.as_str(), None), "a retraction");
    assert!(d.projection().is_empty());
    assert!(d.states["u"].timers.is_empty(), "its timer is disarmed");
    // A later correction, a late sample, the due time: nothing brings it back.
    let fix = domain("u", vec![change("s1-fix", DomainChangeKind::SessionUpdated, t(11, 0), Some(sess("s1", Some("tea"), Some(t(10, 5)), None)))]);
    assert!(d.feed(&fix).unwrap().is_empty());
    assert!(d.feed(&hot(vec![hr("h9", t(10, 10), 100.0)])).unwrap().is_empty());
    assert!(d.advance_to(t(23, 0)).is_empty());
    assert!(d.projection().is_empty());
    // A deletion that arrives before everything else wins as well.
    let mut d2 = driver();
    d2.feed(&deleted("s1", t(10, 40))).unwrap();
    for i in coffee_session() {
        d2.feed(&i).unwrap();
    }
    assert!(d2.projection().is_empty());
    assert!(d2.log.is_empty(), "never emitted");
}

#[test]
pub fn a_session_created_after_its_samples_gathers_them() {
    let mut d = driver();
    // Backfill first: heart rate and a steps sample from 08:30 to 09:30 (two hour buckets, half
    // of it in the before window).
    d.feed(&batch("u", Lane::Cold, vec![
        hr("h1", t(9, 15), 58.0),
        hr("h2", t(10, 5), 75.0),
        hr("h3", t(11, 45), 61.0),
        sample("phone", SourceKind::Phone, "st", "steps", t(8, 30), t(9, 30), 600.0),
    ]))
    .unwrap();
    assert!(d.projection().is_empty(), "no session yet");
    d.feed(&ended("s1", t(10, 30))).unwrap();
    assert!(d.projection().is_empty(), "a session without a start is not emitted");
    d.feed(&started("s1", "coffee", t(10, 0))).unwrap();
    let i = &d.projection()[&output_key("u", "s1")];
    let h = metric(i, "heart_rate");
    assert_eq!((h.before.as_ref().unwrap().mean, h.during.as_ref().unwrap().mean, h.after.as_ref().unwrap().mean), (58.0, 75.0, 61.0));
    assert_eq!((h.delta_during, h.delta_after), (Some(17.0), Some(3.0)));
    assert_eq!(metric(i, "steps").before, stats(1, 5.0, 5.0, 5.0, 300.0));
}

#[test]
pub fn phone_and_watch_steps_in_a_window_are_not_double_counted() {
    let mut d = driver();
    let watch = |id: &str, a: i64, b: i64, v: f64| sample("watch", SourceKind::Watch, id, "steps", a, b, v);
    let phone = |id: &str, a: i64, b: i64, v: f64| sample("phone", SourceKind::Phone, id, "steps", a, b, v);
    let inputs = vec![
        started("s1", "coffee", t(10, 0)),
        ended("s1", t(10, 30)),
        hot(vec![
            watch("w1", t(9, 0), t(9, 30), 1000.0),
            phone("p1", t(9, 10), t(9, 40), 900.0),
            // Straddles the start: 100 before, 100 during.
            watch("w2", t(9, 50), t(10, 10), 200.0),
            phone("p2", t(10, 0), t(10, 30), 300.0),
        ]),
    ];
    for i in &inputs {
        d.feed(i).unwrap();
    }
    let s = metric(&d.projection()[&output_key("u", "s1")], "steps").clone();
    // Before: watch 1000 (it wins 09:10–09:30 over the phone) + the phone's 09:30–09:40 (300)
    // + w2's first 10 minutes (100) = 1400 from 3 samples, 23.33/min over 60 minutes.
    let b = s.before.unwrap();
    assert!(close(b.total, 1400.0) && b.n == 3 && close(b.mean, 1400.0 / 60.0), "{b:?}");
    // During: w2's last 10 minutes (100, the watch beats the phone there) + the phone's
    // 10:10–10:30 (200) = 300, 10/min over 30 minutes.
    let du = s.during.unwrap();
    assert!(close(du.total, 300.0) && du.n == 2 && close(du.mean, 10.0), "{du:?}");
    assert!(close(s.delta_during.unwrap(), 10.0 - 1400.0 / 60.0));
    assert_eq!((s.after, s.delta_after), (None, None));

    // The user prefers the phone: before = w1's first 10 min (333.3) + phone 900 + w2's 100.
    d.feed(&priority(1, &["phone", "watch"])).unwrap();
    let s = metric(&d.projection()[&output_key("u", "s1")], "steps").clone();
    assert!(close(s.before.unwrap().total, 1000.0 / 3.0 + 1000.0));
    assert!(close(s.during.unwrap().total, 300.0));
    let mut all = inputs;
    all.push(priority(1, &["phone", "watch"]));
    assert_eq!(d.projection(), oracle(&all, d.stream_time_ms));
}

#[test]
pub fn the_session_fold_is_order_independent() {
    let updated = domain("u", vec![change("c3", DomainChangeKind::SessionUpdated, t(11, 0), Some(sess("s1", Some("tea"), Some(t(9, 55)), None)))]);
    let inputs = [started("s1", "coffee", t(10, 0)), ended("s1", t(10, 30)), updated, hot(vec![hr("h1", t(9, 50), 60.0), hr("h2", t(9, 58), 70.0)])];
    let orders = [[0, 1, 2, 3], [2, 1, 0, 3], [3, 2, 0, 1], [1, 3, 2, 0], [0, 2, 3, 1], [2, 3, 1, 0]];
    for order in orders {
        let mut d = driver();
        for i in order {
            d.feed(&inputs[i]).unwrap();
        }
        let p = d.projection();
        let i = &p[&output_key("u", "s1")];
        // The correction (latest occurred_at) wins product and start; the end is the ended's.
        assert_eq!((i.product_id.as_deref(), i.start_ms, i.end_ms), (Some("tea"), t(9, 55), Some(t(10, 30))), "{order:?}");
        // 09:58 is now during, 09:50 before.
        assert_eq!(metric(i, "heart_rate").delta_during, Some(10.0), "{order:?}");
        assert_eq!(p, oracle(&inputs, 0));
    }
}

#[test]
pub fn invalid_records_are_refused_and_inconsistent_sessions_not_emitted() {
    let mut d = driver();
    // Refused by the shared rules (the edge's): each unit on its own, before the processor.
    let backwards = domain("u", vec![change("c", DomainChangeKind::SessionUpdated, 1, Some(sess("s1", None, Some(t(10, 0)), Some(t(9, 0)))))]);
    let no_session = domain("u", vec![change("c", DomainChangeKind::SessionEnded, 1, None)]);
    let too_long = domain("u", vec![change("c", DomainChangeKind::SessionUpdated, 1, Some(sess("s1", None, Some(t(0, 0)), Some(t(0, 0) + DAY + 1))))]);
    let unknown = hot(vec![sample("watch", SourceKind::Watch, "x", "mood", t(9, 0), t(9, 0), 1.0)]);
    let nan = hot(vec![hr("h", t(9, 0), f64::NAN)]);
    let backwards_sample = hot(vec![sample("watch", SourceKind::Watch, "st", "steps", t(9, 0), t(8, 0), 10.0)]);
    let huge = hot(vec![sample("watch", SourceKind::Watch, "st", "steps", i64::MIN, i64::MAX, 10.0)]);
    for input in [&backwards, &no_session, &too_long, &unknown, &nan, &backwards_sample, &huge] {
        assert_eq!(d.feed(input).unwrap(), vec![]);
    }
    let codes: Vec<&str> = d.refused.iter().map(|r| r.violation.code).collect();
    assert_eq!(codes, ["end_before_start", "missing_field", "session_too_long", "unknown_metric", "value_not_finite", "end_before_start", "sample_too_long"]);
    // What reaches the processor without the shared rules is still refused by it.
    let mut bare = SessionImpactProcessor::new(Config::default());
    let mut state = crate::driver::MemState::default();
    let mut sink: Vec<()> = Vec::new();
    struct Drop<'a>(&'a mut Vec<()>);
    impl crate::Emitter<SessionImpact> for Drop<'_> {
        fn upsert(&mut self, _: String, _: vitals_schemas::SessionImpact) { self.0.push(()) }
        fn retract(&mut self, _: String) { self.0.push(()) }
    }
    for (input, code) in [(&backwards, "session_end_before_start"), (&no_session, "missing_session"), (&too_long, "session_too_long"), (&huge, "bad_sample_interval")] {
        assert_eq!(crate::Processor::process(&mut bare, input, &mut state, &mut Drop(&mut sink)).unwrap_err().code, code);
    }
    assert!(d.log.is_empty() && d.states.get("u").is_none_or(|s| s.map.is_empty()), "refused records leave no trace");

    // Each change valid on its own, but the fold ends before it starts: the (ongoing) session
    // that was emitted is retracted.
    d.feed(&started("s1", "coffee", t(10, 0))).unwrap();
    assert!(d.projection().contains_key(&output_key("u", "s1")));
    d.feed(&ended("s1", t(9, 0))).unwrap();
    assert!(d.projection().is_empty());
    assert_eq!(d.log.last().unwrap().value, None);
    // The end is corrected: emitted again.
    d.feed(&domain("u", vec![change("c9", DomainChangeKind::SessionUpdated, t(12, 0), Some(sess("s1", None, None, Some(t(10, 20)))))])).unwrap();
    assert_eq!(d.projection()[&output_key("u", "s1")].end_ms, Some(t(10, 20)));
}

#[test]
pub fn an_ongoing_session_reports_only_its_before_window() {
    let mut d = driver();
    d.feed(&hot(vec![hr("h1", t(9, 30), 60.0), hr("h2", t(10, 10), 80.0)])).unwrap();
    d.feed(&started("s1", "coffee", t(10, 0))).unwrap();
    let i = d.projection()[&output_key("u", "s1")].clone();
    assert_eq!((i.end_ms, i.status), (None, ImpactStatus::Provisional));
    assert_eq!(i.metrics, vec![WindowedMetric {
        metric: "heart_rate".into(),
        before: stats(1, 60.0, 60.0, 60.0, 60.0),
        during: None,
        after: None,
        delta_during: None,
        delta_after: None,
    }]);
    assert!(d.states["u"].timers.is_empty());
    assert!(d.advance_to(t(23, 0)).is_empty(), "an open session never becomes final");
    let out = d.feed(&ended("s1", t(10, 30))).unwrap();
    let i = out[0].value.as_ref().unwrap();
    assert_eq!((metric(i, "heart_rate").delta_during, i.status), (Some(20.0), ImpactStatus::Final));
}

#[test]
pub fn a_sample_change_rederives_only_the_sessions_it_touches() {
    let mut d = driver();
    for i in [started("a", "coffee", t(10, 0)), ended("a", t(10, 30)), started("b", "tea", t(10, 0) + DAY), ended("b", t(10, 30) + DAY)] {
        d.feed(&i).unwrap();
    }
    let keys = |out: Vec<crate::driver::Emitted<SessionImpact>>| out.into_iter().map(|e| e.key).collect::<Vec<_>>();
    assert_eq!(keys(d.feed(&hot(vec![hr("h1", t(9, 30), 60.0)])).unwrap()), [output_key("u", "a")]);
    assert_eq!(keys(d.feed(&hot(vec![hr("h2", t(12, 0) + DAY, 70.0)])).unwrap()), [output_key("u", "b")]);
    // Far from both: nothing. In a bucket of a's range but outside its windows: recomputed, unchanged, not emitted.
    assert!(d.feed(&hot(vec![hr("h3", t(18, 0), 90.0), hr("h4", t(12, 40), 90.0)])).unwrap().is_empty());
    // Deleting h2 touches b only.
    let del = Deletion { source: "watch".into(), source_record_id: "h2".into(), metric: "heart_rate".into(), deleted_version: None };
    let out = d.feed(&changes("u", vec![], vec![del])).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].key, output_key("u", "b"));
    assert!(out[0].value.as_ref().unwrap().metrics.is_empty(), "b has no data left but still exists");
}

/// Within one interval the session index lags the folds (it is updated when a session is
/// re-derived, at the interval's end): samples landing in buckets a session has only just
/// gained, or in the ones it has just lost, a deletion among samples, a priority change — each
/// session still comes out once per interval, equal to the oracle.
#[test]
pub fn one_interval_rederives_each_session_once_even_when_its_range_moves() {
    let at0 = |i: Input| (0i64, i);
    let key = output_key("u", "s1");
    let mut d = driver();
    let mut all: Vec<Input> = vec![started("s1", "coffee", t(10, 0)), ended("s1", t(10, 30))];
    d.feed_interval(&all.iter().cloned().map(at0).collect::<Vec<_>>());
    assert_eq!(d.projection()[&key].end_ms, Some(t(10, 30)));

    // The end moves from 10:30 to 13:00: after = [13:00, 15:00), hours 13 and 14 are new. The
    // samples of the new hours come after the move, in the same interval.
    let mut second = vec![ended("s1", t(13, 0))];
    second.extend((0..20).map(|n| hot(vec![hr(&format!("d{n}"), t(10, 5) + n * 60_000, 80.0 + n as f64)])));
    second.push(hot(vec![hr("a1", t(14, 30), 70.0), hr("b1", t(9, 30), 60.0)]));
    second.push(hot(vec![sample("watch", SourceKind::Watch, "st", "steps", t(12, 30), t(14, 30), 1200.0)]));
    all.extend(second.iter().cloned());
    let (out, rejected) = d.feed_interval(&second.into_iter().map(at0).collect::<Vec<_>>());
    assert_eq!(rejected, 0);
    assert_eq!(out.iter().filter(|e| e.key == key).count(), 1, "one upsert for the whole interval");
    assert_eq!(d.projection(), oracle(&all, d.stream_time_ms));
    let i = &d.projection()[&key];
    assert_eq!(metric(i, "heart_rate").after.as_ref().map(|s| s.n), Some(1), "the 14:30 sample, in a bucket gained this interval");

    // The end moves back to 10:30 and a sample lands in an hour the session just lost; a
    // priority change too.
    let third = vec![
        domain("u", vec![change("back", DomainChangeKind::SessionUpdated, t(14, 0), Some(sess("s1", None, None, Some(t(10, 30)))))]),
        hot(vec![hr("a2", t(14, 40), 75.0)]),
        priority(1, &["phone", "watch"]),
        hot(vec![hr("d99", t(10, 29), 99.0)]),
    ];
    all.extend(third.iter().cloned());
    let (out, _) = d.feed_interval(&third.into_iter().map(at0).collect::<Vec<_>>());
    assert_eq!(out.iter().filter(|e| e.key == key).count(), 1);
    assert_eq!(d.projection(), oracle(&all, d.stream_time_ms));
    assert_eq!(d.projection()[&key].end_ms, Some(t(10, 30)));

    // Samples, the deletion, more samples: one retraction.
    let fourth = vec![hot(vec![hr("e1", t(10, 1), 81.0)]), deleted("s1", t(15, 0)), hot(vec![hr("e2", t(10, 2), 82.0)])];
    all.extend(fourth.iter().cloned());
    let (out, _) = d.feed_interval(&fourth.into_iter().map(at0).collect::<Vec<_>>());
    let mine: Vec<_> = out.iter().filter(|e| e.key == key).collect();
    assert_eq!(mine.len(), 1);
    assert!(mine[0].value.is_none(), "a retraction");
    assert!(d.projection().is_empty());
    assert!(oracle(&all, d.stream_time_ms).is_empty());
    assert!(d.states["u"].map.keys().all(|k| !k.starts_with(&format!("sx{SEP}"))), "a deleted session leaves no index entries");
}

#[test]
pub fn tombstones_parse_the_key_and_both_processors_declare_their_inputs() {
    let ts = SessionImpact::tombstone("u-1", "u-1|sess|x");
    assert_eq!((ts.user_id.as_str(), ts.session_id.as_str(), ts.deleted), ("u-1", "sess|x", true));
    let mut v = ts;
    v.stamp(3, 7, vec![]);
    assert_eq!((v.version_epoch, v.version_seq), (3, 7));
    assert_eq!(INFO.inputs, crate::Inputs::Lanes);
    assert_eq!(crate::product_impact::INFO.inputs, crate::Inputs::SessionImpacts);
    let cfg: Config = serde_json::from_str(r#"{"before_min": 30}"#).unwrap();
    assert_eq!((cfg.before_min, cfg.after_min, cfg.grace_min), (30, 120, 30));
    assert!(serde_json::from_str::<Config>(r#"{"befor_min": 30}"#).is_err(), "unknown keys are refused");
}

// ---- the property: streaming == oracle ---------------------------------------------------------

pub const SOURCES: [(&str, SourceKind); 2] = [("watch", SourceKind::Watch), ("phone", SourceKind::Phone)];
/// Weighted towards heart rate and steps; one identity has one metric (its record id names it).
pub const METRICS: [&str; 7] = ["heart_rate", "heart_rate", "hrv_sdnn", "steps", "steps", "active_energy", "body_mass"];

#[derive(Debug, Clone)]
pub enum Event {
    Upsert { user: u8, src: usize, id: u8, metric: usize, start_min: i64, dur_min: i64, value: u32, version: i64 },
    Delete { user: u8, src: usize, id: u8, metric: usize, version: Option<i64> },
    Session { user: u8, sid: u8, kind: u8, at: i64, product: Option<u8>, start_min: i64, end_min: i64, bad: bool },
    Priority { user: u8, at: i64, phone_first: bool },
}

pub fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        12 => (0u8..2, 0usize..2, 0u8..16, 0usize..7, -120i64..720, 0i64..180, 1u32..200, 1i64..4).prop_map(
            |(user, src, id, metric, start_min, dur_min, value, version)| Event::Upsert { user, src, id, metric, start_min, dur_min, value, version }),
        2 => (0u8..2, 0usize..2, 0u8..16, 0usize..7, proptest::option::of(1i64..4)).prop_map(
            |(user, src, id, metric, version)| Event::Delete { user, src, id, metric, version }),
        5 => (0u8..2, 0u8..3, 0u8..10, 0i64..6, proptest::option::of(0u8..2), 0i64..480, 0i64..600, proptest::bool::weighted(0.05)).prop_map(
            |(user, sid, kind, at, product, start_min, end_min, bad)| Event::Session { user, sid, kind, at, product, start_min, end_min, bad }),
        2 => (0u8..2, 0i64..5, any::<bool>()).prop_map(|(user, at, phone_first)| Event::Priority { user, at, phone_first }),
    ]
}

pub fn base() -> i64 {
    t(8, 0)
}

pub fn to_input(i: usize, e: &Event) -> Input {
    let at_min = |m: i64| base() + m * 60_000;
    match e {
        Event::Upsert { user, src, id, metric, start_min, dur_min, value, version } => {
            let m = METRICS[*metric];
            let kind = Catalog::embedded().get(m).unwrap().kind;
            let start = at_min(*start_min);
            let end = if kind == MetricKind::Cumulative && *dur_min > 0 { start + dur_min * 60_000 } else { start };
            let (source, sk) = SOURCES[*src];
            let mut s = sample(source, sk, &format!("{m}-{id}"), m, start, end, *value as f64 / 7.0 + 1.0);
            s.version = *version;
            if *version > 1 {
                changes(&format!("u{user}"), vec![s], vec![])
            } else {
                batch(&format!("u{user}"), Lane::Cold, vec![s])
            }
        }
        Event::Delete { user, src, id, metric, version } => {
            let m = METRICS[*metric];
            changes(&format!("u{user}"), vec![], vec![Deletion { source: SOURCES[*src].0.into(), source_record_id: format!("{m}-{id}"), metric: m.into(), deleted_version: *version }])
        }
        Event::Session { user, sid, kind, at, product, start_min, end_min, bad } => {
            let product = product.map(|p| format!("prod{p}"));
            let (start, end) = (Some(at_min(*start_min)), Some(at_min(*start_min + *end_min % 150)));
            let (kind, session) = match kind {
                0..=2 => (DomainChangeKind::SessionStarted, sess("", product.as_deref(), start, None)),
                3..=5 => (DomainChangeKind::SessionEnded, sess("", None, None, Some(at_min(*end_min)))),
                6..=8 if *bad => (DomainChangeKind::SessionUpdated, sess("", product.as_deref(), end, start.map(|s| s - 60_000))),
                6..=8 => (DomainChangeKind::SessionUpdated, sess("", product.as_deref(), start, end)),
                _ => (DomainChangeKind::SessionDeleted, sess("", None, None, None)),
            };
            // A change id names one change: the event's index.
            let c = change(&format!("c{i}"), kind, *at, Some(Session { session_id: format!("s{sid}"), ..session }));
            domain(&format!("u{user}"), vec![c])
        }
        Event::Priority { user, at, phone_first } => {
            let order = if *phone_first { vec!["phone".to_string(), "watch".to_string()] } else { vec!["watch".to_string(), "phone".to_string()] };
            domain(&format!("u{user}"), vec![DomainChange {
                source_priority: Some(order),
                ..change(&format!("p{at}-{phone_first}"), DomainChangeKind::SourcePriorityUpdated, *at, None)
            }])
        }
    }
}

/// One identity at one version is one sample: the first content generated stands for every copy.
pub fn inputs_of(events: Vec<Event>) -> Vec<Input> {
    let mut first: HashMap<(u8, usize, u8, &str, i64), Event> = HashMap::new();
    let events: Vec<Event> = events
        .into_iter()
        .map(|e| match e {
            Event::Upsert { user, src, id, metric, version, .. } => first.entry((user, src, id, METRICS[metric], version)).or_insert(e).clone(),
            other => other,
        })
        .collect();
    events.iter().enumerate().map(|(i, e)| to_input(i, e)).collect()
}

/// A delivery of `n` inputs: every one, every `dup_every`-th again, shuffled by `seed`; and
/// their log timestamps (minutes after 08:00, scaled by `span`/1000), which mostly grow through
/// the delivery and sometimes go back (stream time is their running maximum), so sessions are
/// last touched before their due time and only the timer can make them final.
pub fn delivery(n: usize, dup_every: usize, seed: u64, times: &[i64], span: i64) -> (Vec<usize>, Vec<i64>) {
    let order = crate::driver::arrival_order(n, dup_every, seed);
    let mut times: Vec<i64> = times[..order.len()].iter().map(|t| t * span / 1000).collect();
    times.sort_unstable();
    for (n, t) in times.iter_mut().enumerate() {
        if n % 7 == 3 {
            *t -= 300;
        }
    }
    (order, times)
}

/// Advances to the optional `tail` (minutes after 08:00), then requires the driver's projection
/// to be the oracle's at its stream time, key by key.
pub fn equals_the_oracle(d: &mut Driver<SessionImpactProcessor>, inputs: &[Input], tail: Option<i64>) -> Result<(), TestCaseError> {
    if let Some(m) = tail {
        d.advance_to(base() + m * 60_000);
    }
    let expected = oracle(inputs, d.stream_time_ms);
    let got = d.projection();
    prop_assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    for (k, v) in &expected {
        prop_assert_eq!(&got[k], v, "key {}", k);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn streaming_equals_the_oracle_whatever_the_order_and_stream_time(
        events in proptest::collection::vec(event(), 1..80),
        dup_every in 2usize..6,
        seed in any::<u64>(),
        // Stream-time timestamps of the deliveries (minutes after 08:00), and a final advance.
        times in proptest::collection::vec(0i64..1000, 120),
        span in 100i64..1000,
        tail in proptest::option::of(0i64..1000),
    ) {
        let inputs = inputs_of(events);
        let (order, times) = delivery(inputs.len(), dup_every, seed, &times, span);
        let mut d = driver();
        for (n, i) in order.iter().enumerate() {
            // Refused records (the rare invalid session change) leave no trace, in both.
            // (The runtime fires due timers after a refused record too; the driver returns early.)
            if d.feed_at(base() + times[n] * 60_000, &inputs[*i]).is_err() {
                d.advance_to(d.stream_time_ms);
            }
        }
        equals_the_oracle(&mut d, &inputs, tail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)))]

    /// Intervals as the runtime cuts them (`feed_interval`: every record of the interval, timers
    /// firing as stream time reaches them, then the end of the interval for each user), whatever
    /// the boundaries, order, duplicates and stream-time timestamps: the projection equals the
    /// oracle. A guarantee, whether recomputation happens per record or at the interval's end.
    #[test]
    fn intervals_of_any_size_equal_the_oracle(
        events in proptest::collection::vec(event(), 1..80),
        dup_every in 2usize..6,
        seed in any::<u64>(),
        cuts in proptest::collection::vec(1usize..25, 1..20),
        times in proptest::collection::vec(0i64..1000, 120),
        span in 0i64..1000,
        tail in proptest::option::of(0i64..1000),
    ) {
        let inputs = inputs_of(events);
        let (order, times) = delivery(inputs.len(), dup_every, seed, &times, span);
        let stamped: Vec<(i64, Input)> = order.iter().zip(&times).map(|(i, t)| (base() + t * 60_000, inputs[*i].clone())).collect();
        let mut d = driver();
        let mut rest: &[(i64, Input)] = &stamped;
        let mut c = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*c.next().unwrap()).min(rest.len());
            // Refused records (the rare invalid session change) leave no trace, in both.
            let _ = d.feed_interval(&rest[..n]);
            rest = &rest[n..];
        }
        // The driver ends a user's interval at the stream time of that user's last record (the
        // runtime: at the interval's); a timer armed then that is already due fires now.
        d.advance_to(d.stream_time_ms);
        equals_the_oracle(&mut d, &inputs, tail)?;
    }
}

/// Issue 9, item 2: one record with a valid session (10:00-10:30) and a 30-hour one. Before, the
/// whole record was refused (`session_too_long`) and the valid session never appeared.
#[test]
pub fn a_refused_session_does_not_take_the_valid_one_of_its_record_with_it() {
    let mut d = driver();
    let both = domain(
        "u",
        vec![
            change("ok", DomainChangeKind::SessionEnded, 1, Some(sess("good", Some("coffee"), Some(t(10, 0)), Some(t(10, 30))))),
            change("long", DomainChangeKind::SessionEnded, 2, Some(sess("long", None, Some(t(0, 0)), Some(t(0, 0) + 30 * 3_600_000)))),
        ],
    );
    d.feed(&both).unwrap();
    assert!(d.projection().contains_key(&output_key("u", "good")), "the valid session is kept");
    assert!(!d.projection().contains_key(&output_key("u", "long")));
    assert_eq!(d.refused.len(), 1);
    assert_eq!((d.refused[0].unit.as_str(), d.refused[0].violation.code), ("changes[1]", "session_too_long"));
    // And a sample batch keeps its good samples around a bad one.
    let mixed = hot(vec![hr("h1", t(10, 10), 70.0), hr("bad", t(10, 11), f64::NAN), hr("h2", t(10, 12), 72.0)]);
    d.feed(&mixed).unwrap();
    assert_eq!(d.refused.len(), 2);
    assert_eq!(d.refused[1].unit, "samples[1]");
    let i = &d.projection()[&output_key("u", "good")];
    assert_eq!(metric(i, "heart_rate").during.as_ref().map(|s| s.n), Some(2), "both valid samples count");
}

/// The source cap (`keys::MAX_SOURCES`) refuses the record that passes it before the user's
/// deferred sessions are taken: the interval's impact is still computed from everything else.
#[test]
pub fn a_record_past_the_source_cap_is_refused_and_the_interval_keeps_its_work() {
    use crate::keys::MAX_SOURCES;
    let mut d = driver();
    // Far from the session's windows: MAX_SOURCES minus the session's own three sources.
    let far = t(10, 0) - 3 * DAY;
    let fill: Vec<Sample> = (0..MAX_SOURCES - 3).map(|i| sample(&format!("src-{i}"), SourceKind::Watch, &format!("f{i}"), "heart_rate", far, far, 60.0)).collect();
    for chunk in fill.chunks(500) {
        assert_eq!(d.feed_interval(&[(0, hot(chunk.to_vec()))]).1, 0);
    }
    let mut interval: Vec<(i64, Input)> = coffee_session().into_iter().map(|i| (0, i)).collect();
    interval.push((0, hot(vec![sample("one-too-many", SourceKind::Watch, "x", "heart_rate", t(10, 10), t(10, 10), 200.0)])));
    let (_, rejected) = d.feed_interval(&interval);
    assert_eq!(rejected, 1, "the record bringing source {} is refused", MAX_SOURCES + 1);
    let p = d.projection();
    let i = p.get(&output_key("u", "s1")).expect("the interval's session is still computed");
    let hr = metric(i, "heart_rate");
    assert_eq!((hr.during.clone(), hr.delta_during), (stats(2, 85.0, 80.0, 90.0, 170.0), Some(23.0)), "without the refused reading");
}
