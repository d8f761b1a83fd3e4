//! `product_impact` through the test driver: hand-computed means and spreads, versions (zombie
//! and replayed records), provisional impacts, product changes and retractions, the chain from
//! `session_impact`'s own output; then the property that the streaming projection equals the
//! oracle under shuffled, duplicated and re-versioned session-impact records.

use std::collections::HashMap;

use proptest::prelude::*;
use vitals_schemas::WindowedMetric;

use super::*;
use crate::Versioned;
use crate::driver::Driver;

type Deltas<'a> = &'a [(&'a str, Option<f64>, Option<f64>)];

pub fn imp(session: &str, product: Option<&str>, status: ImpactStatus, (epoch, seq): (i64, i64), deltas: Deltas) -> SessionImpact {
    SessionImpact {
        user_id: "u".into(),
        session_id: session.into(),
        product_id: product.map(Into::into),
        start_ms: 1_000,
        end_ms: Some(2_000),
        status,
        metrics: deltas
            .iter()
            .map(|(m, dd, da)| WindowedMetric { metric: m.to_string(), before: None, during: None, after: None, delta_during: *dd, delta_after: *da })
            .collect(),
        version_epoch: epoch,
        version_seq: seq,
        deleted: false,
        source_offsets: vec![],
    }
}

pub fn fin(session: &str, product: &str, v: (i64, i64), deltas: Deltas) -> SessionImpact {
    imp(session, Some(product), ImpactStatus::Final, v, deltas)
}

pub fn tomb(session: &str, (epoch, seq): (i64, i64)) -> SessionImpact {
    let mut t = SessionImpact::tombstone("u", &format!("u|{session}"));
    t.stamp(epoch, seq, vec![]);
    t
}

pub fn driver() -> Driver<ProductImpactProcessor> {
    Driver::new(ProductImpactProcessor::new(Config::default()))
}

pub fn feed(d: &mut Driver<ProductImpactProcessor>, r: &SessionImpact) -> Vec<crate::driver::Emitted<ProductImpact>> {
    d.feed(&Input::SessionImpact(r.clone())).unwrap()
}

#[test]
pub fn mean_and_sample_sd_of_the_deltas_by_hand() {
    let mut d = driver();
    let records = [
        fin("a", "coffee", (1, 1), &[("heart_rate", Some(10.0), Some(4.0)), ("spo2", None, None)]),
        fin("b", "coffee", (1, 2), &[("heart_rate", Some(20.0), Some(8.0)), ("hrv_sdnn", None, Some(5.0))]),
        fin("c", "coffee", (1, 3), &[("heart_rate", Some(30.0), None)]),
    ];
    for r in &records {
        feed(&mut d, r);
    }
    let p = d.projection();
    assert_eq!(p.len(), 1);
    let row = &p[&output_key("u", "coffee")];
    assert_eq!((row.user_id.as_str(), row.product_id.as_str(), row.sessions, row.deleted), ("u", "coffee", 3, false));
    assert_eq!(row.metrics, vec![
        // during: 10, 20, 30 → mean 20, sd √((100 + 0 + 100) / 2) = 10; after: 4, 8 → 6, √8.
        DeltaSummary { metric: "heart_rate".into(), n: 3, mean_delta_during: Some(20.0), sd_delta_during: Some(10.0), mean_delta_after: Some(6.0), sd_delta_after: Some(8f64.sqrt()) },
        // One value: a mean, no spread. spo2 has no delta at all: absent.
        DeltaSummary { metric: "hrv_sdnn".into(), n: 1, mean_delta_during: None, sd_delta_during: None, mean_delta_after: Some(5.0), sd_delta_after: None },
    ]);
    assert_eq!(p, oracle(&records));
}

#[test]
pub fn provisional_impacts_count_only_once_final() {
    let mut d = driver();
    let prov = imp("a", Some("coffee"), ImpactStatus::Provisional, (1, 1), &[("heart_rate", Some(10.0), Some(2.0))]);
    assert!(feed(&mut d, &prov).is_empty(), "a provisional impact alone makes no product");
    let out = feed(&mut d, &fin("a", "coffee", (1, 2), &[("heart_rate", Some(12.0), Some(3.0))]));
    assert_eq!(out.len(), 1);
    let row = out[0].value.as_ref().unwrap();
    assert_eq!((row.sessions, row.metrics[0].mean_delta_during), (1, Some(12.0)));
    // A second session, provisional: not counted, nothing emitted.
    assert!(feed(&mut d, &imp("b", Some("coffee"), ImpactStatus::Provisional, (1, 3), &[("heart_rate", Some(40.0), None)])).is_empty());
    // The first goes back to provisional (its end moved): the product has nothing final left.
    let out = feed(&mut d, &imp("a", Some("coffee"), ImpactStatus::Provisional, (1, 4), &[("heart_rate", Some(12.0), Some(3.0))]));
    assert_eq!((out.len(), out[0].value.as_ref()), (1, None), "retracted");
    assert!(d.projection().is_empty());
}

#[test]
pub fn an_older_version_delivered_after_a_newer_one_changes_nothing() {
    let mut d = driver();
    let key = output_key("u", "coffee");
    feed(&mut d, &fin("a", "coffee", (1, 5), &[("heart_rate", Some(10.0), None)]));
    let before = d.projection();
    // A zombie's older write, a duplicate, an older tombstone: all ignored.
    assert!(feed(&mut d, &fin("a", "coffee", (1, 3), &[("heart_rate", Some(99.0), None)])).is_empty());
    assert!(feed(&mut d, &fin("a", "tea", (1, 5), &[("heart_rate", Some(10.0), None)])).is_empty(), "an equal version is the same record");
    assert!(feed(&mut d, &tomb("a", (1, 4))).is_empty());
    assert_eq!(d.projection(), before);
    // A new epoch wins even with a smaller sequence.
    let out = feed(&mut d, &fin("a", "coffee", (2, 1), &[("heart_rate", Some(12.0), None)]));
    assert_eq!(out[0].value.as_ref().unwrap().metrics[0].mean_delta_during, Some(12.0));
    // Deleted: the product is retracted; the older upsert replayed afterwards cannot revive it.
    feed(&mut d, &tomb("a", (2, 2)));
    assert!(d.projection().is_empty());
    assert!(feed(&mut d, &fin("a", "coffee", (2, 1), &[("heart_rate", Some(12.0), None)])).is_empty());
    assert!(!d.projection().contains_key(&key));
}

#[test]
pub fn a_session_whose_product_changes_moves_between_products() {
    let mut d = driver();
    feed(&mut d, &fin("a", "coffee", (1, 1), &[("heart_rate", Some(10.0), None)]));
    feed(&mut d, &fin("b", "coffee", (1, 2), &[("heart_rate", Some(20.0), None)]));
    assert_eq!(d.projection()[&output_key("u", "coffee")].metrics[0].mean_delta_during, Some(15.0));
    // a was tea after all.
    let out = feed(&mut d, &fin("a", "tea", (1, 3), &[("heart_rate", Some(10.0), None)]));
    assert_eq!(out.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["u|coffee", "u|tea"]);
    let p = d.projection();
    assert_eq!((p["u|coffee"].sessions, p["u|coffee"].metrics[0].mean_delta_during), (1, Some(20.0)));
    assert_eq!((p["u|tea"].sessions, p["u|tea"].metrics[0].mean_delta_during), (1, Some(10.0)));
    // b too: coffee has no session left and is retracted.
    feed(&mut d, &fin("b", "tea", (1, 4), &[("heart_rate", Some(20.0), None)]));
    let p = d.projection();
    assert_eq!(p.keys().collect::<Vec<_>>(), ["u|tea"]);
    assert_eq!((p["u|tea"].sessions, p["u|tea"].metrics[0].mean_delta_during, p["u|tea"].metrics[0].n), (2, Some(15.0), 2));
    assert!(d.log.iter().any(|e| e.key == "u|coffee" && e.value.is_none()));
    // A session that loses its product counts nowhere.
    feed(&mut d, &imp("b", None, ImpactStatus::Final, (1, 5), &[("heart_rate", Some(20.0), None)]));
    assert_eq!(d.projection()["u|tea"].sessions, 1);
}

#[test]
pub fn invalid_records_are_refused() {
    let mut d = driver();
    let nan = fin("a", "coffee", (1, 1), &[("heart_rate", Some(f64::NAN), None)]);
    assert_eq!(d.feed(&Input::SessionImpact(nan)).unwrap_err().code, "value_not_finite");
    assert_eq!(d.feed(&Input::SessionImpact(fin("", "coffee", (1, 1), &[]))).unwrap_err().code, "missing_session");
    assert_eq!(d.feed(&Input::SessionImpact(fin("a", "co\u{1f}ffee", (1, 1), &[]))).unwrap_err().code, "bad_id");
    assert!(d.log.is_empty() && d.states["u"].map.is_empty());
    let ts = ProductImpact::tombstone("u", "u|prod|x");
    assert_eq!((ts.user_id.as_str(), ts.product_id.as_str(), ts.deleted, ts.sessions), ("u", "prod|x", true, 0));
}

#[test]
pub fn chained_from_session_impacts_own_output() {
    use crate::session_impact::{SessionImpactProcessor, Config as SiConfig};
    use vitals_schemas::{DomainChange, DomainChangeBatch, DomainChangeKind, Lane, Sample, SampleBatch, Session, SourceKind};
    let h = 3_600_000;
    let hr = |id: &str, at: i64, v: f64| Sample {
        source: "watch".into(),
        source_kind: SourceKind::Watch,
        source_record_id: id.into(),
        metric: "heart_rate".into(),
        start_ms: at,
        end_ms: at,
        value: v,
        unit: "count/min".into(),
        category: None,
        time_zone: "UTC".into(),
        version: 1,
        metadata: HashMap::new(),
    };
    let session = |id: &str, start: i64| Input::Domain(DomainChangeBatch {
        request_id: "r".into(),
        user_id: "u".into(),
        received_at_ms: 0,
        changes: vec![DomainChange {
            change_id: id.into(),
            kind: DomainChangeKind::SessionUpdated,
            occurred_at_ms: 0,
            session: Some(Session { session_id: id.into(), product_id: Some("coffee".into()), start_ms: Some(start), end_ms: Some(start + h / 2), time_zone: None }),
            product: None,
            privacy: None,
            source_priority: None,
        }],
    });
    // Two sessions a day apart: heart rate 60 before, 70 then 74 during.
    let mut si = Driver::new(SessionImpactProcessor::new(SiConfig::default()));
    let day = 24 * h;
    si.feed_at(10 * h, &session("s1", 10 * h)).unwrap();
    si.feed_at(10 * h, &Input::Samples(SampleBatch {
        request_id: "r".into(),
        user_id: "u".into(),
        received_at_ms: 0,
        lane: Lane::Hot,
        samples: vec![hr("a", 9 * h, 60.0), hr("b", 10 * h + 60_000, 70.0), hr("c", day + 9 * h, 60.0), hr("d", day + 10 * h + 60_000, 74.0)],
    }))
    .unwrap();
    si.feed_at(12 * h, &session("s2", day + 10 * h)).unwrap();
    si.advance_to(2 * day);
    // Its whole output log, stamped as the runtime would, delivered twice in reverse order.
    let records: Vec<SessionImpact> = si
        .log
        .iter()
        .map(|e| {
            let mut r = e.value.clone().unwrap_or_else(|| SessionImpact::tombstone(e.key.split_once('|').map_or("", |(u, _)| u), &e.key));
            r.stamp(1, e.version as i64, vec![]);
            r
        })
        .collect();
    assert!(records.iter().filter(|r| r.status == ImpactStatus::Provisional).count() >= 2);
    let mut d = driver();
    for r in records.iter().rev().chain(records.iter()) {
        feed(&mut d, r);
    }
    let row = &d.projection()["u|coffee"];
    assert_eq!(row.sessions, 2);
    assert_eq!(row.metrics, vec![DeltaSummary {
        metric: "heart_rate".into(),
        n: 2,
        mean_delta_during: Some(12.0),
        sd_delta_during: Some(8f64.sqrt()),
        mean_delta_after: None,
        sd_delta_after: None,
    }]);
    assert_eq!(d.projection(), oracle(&records));
}

// ---- the property: streaming == oracle ---------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Rec {
    user: u8,
    session: u8,
    version: (i64, i64),
    deleted: bool,
    product: Option<u8>,
    is_final: bool,
    deltas: Vec<(u8, Option<i32>, Option<i32>)>,
}

pub fn rec() -> impl Strategy<Value = Rec> {
    (
        0u8..2,
        0u8..5,
        (1i64..3, 0i64..12),
        proptest::bool::weighted(0.15),
        proptest::option::weighted(0.9, 0u8..3),
        proptest::bool::weighted(0.7),
        proptest::collection::vec((0u8..3, proptest::option::of(-80i32..80), proptest::option::of(-80i32..80)), 0..3),
    )
        .prop_map(|(user, session, version, deleted, product, is_final, deltas)| Rec { user, session, version, deleted, product, is_final, deltas })
}

pub const METRIC_NAMES: [&str; 3] = ["heart_rate", "hrv_sdnn", "steps"];

pub fn to_impact(r: &Rec) -> SessionImpact {
    let user = format!("u{}", r.user);
    let session = format!("s{}", r.session);
    if r.deleted {
        let mut t = SessionImpact::tombstone(&user, &format!("{user}|{session}"));
        t.stamp(r.version.0, r.version.1, vec![]);
        return t;
    }
    let mut metrics: Vec<WindowedMetric> = Vec::new();
    for (m, dd, da) in &r.deltas {
        let name = METRIC_NAMES[*m as usize];
        if metrics.iter().all(|x| x.metric != name) {
            // Quarters: fractional values whose sums are not all exact.
            let q = |x: &Option<i32>| x.map(|v| v as f64 / 3.0 + 0.25);
            metrics.push(WindowedMetric { metric: name.into(), before: None, during: None, after: None, delta_during: q(dd), delta_after: q(da) });
        }
    }
    SessionImpact {
        user_id: user,
        session_id: session,
        product_id: r.product.map(|p| format!("prod{p}")),
        start_ms: 0,
        end_ms: Some(1),
        status: if r.is_final { ImpactStatus::Final } else { ImpactStatus::Provisional },
        metrics,
        version_epoch: r.version.0,
        version_seq: r.version.1,
        deleted: false,
        source_offsets: vec![],
    }
}

/// One version of one session is one record (the first content generated stands), plus replays:
/// the same value re-emitted under a new, higher epoch (a restarted owner).
pub fn impacts_of(recs: Vec<Rec>, replay_every: usize) -> Vec<SessionImpact> {
    let mut first: HashMap<(u8, u8, (i64, i64)), Rec> = HashMap::new();
    let recs: Vec<Rec> = recs.into_iter().map(|r| first.entry((r.user, r.session, r.version)).or_insert(r).clone()).collect();
    let mut records: Vec<SessionImpact> = recs.iter().map(to_impact).collect();
    let replays: Vec<SessionImpact> = records
        .iter()
        .enumerate()
        .step_by(replay_every)
        .map(|(i, r)| SessionImpact { version_epoch: 5, version_seq: 100 + i as i64, ..r.clone() })
        .collect();
    records.extend(replays);
    records
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn streaming_equals_the_oracle_under_shuffled_duplicated_and_reversioned_records(
        recs in proptest::collection::vec(rec(), 1..50),
        replay_every in 2usize..6,
        dup_every in 2usize..6,
        seed in any::<u64>(),
    ) {
        let records = impacts_of(recs, replay_every);
        let order = crate::driver::arrival_order(records.len(), dup_every, seed);
        let mut d = driver();
        for i in &order {
            d.feed(&Input::SessionImpact(records[*i].clone())).unwrap();
        }
        let expected = oracle(&records);
        let got = d.projection();
        prop_assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
        for (k, v) in &expected {
            prop_assert_eq!(&got[k], v, "key {}", k);
        }
    }
}

