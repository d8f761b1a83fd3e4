//! Offline tests of the plan: determinism, validity by the edge's own rules, realism.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, FixedOffset};
use serde_json::Value;
use vitals_ingest::request::{parse_envelope, validate_changes, validate_deletions, validate_samples, BatchKind, Rules};
use vitals_schemas::Catalog;

use super::*;

/// 2025-06-18T15:30:00.123Z (not a whole second on purpose).
const NOW: i64 = 1_750_260_600_123;
/// 2025-04-02T10:00:00Z: a week back spans Europe's DST start (2025-03-30).
const NOW_AFTER_DST: i64 = 1_743_588_000_000;
/// 2025-11-04T12:00:00Z: ten days back span Europe's (Oct 26) and America's (Nov 2) DST end.
const NOW_AFTER_FALL_BACK: i64 = 1_762_257_600_000;

fn cfg(users: usize, days: u32, now_ms: i64) -> SimConfig {
    SimConfig {
        base_url: "http://127.0.0.1:1".into(),
        users,
        days,
        user_prefix: "t-".into(),
        seed: 7,
        now_ms,
        rate: None,
        concurrency: 2,
        batch_size: 500,
        jwt_secret: b"secret".to_vec(),
        jwt_issuer: "i".into(),
        jwt_audience: "a".into(),
        edits_and_deletions: true,
    }
}

fn ts(v: &Value) -> DateTime<FixedOffset> {
    DateTime::parse_from_rfc3339(v.as_str().expect("timestamp string")).expect("RFC 3339")
}

fn samples(plan: &[Upload]) -> impl Iterator<Item = (&Upload, &Value)> {
    plan.iter().filter(|u| u.endpoint == SAMPLES_PATH).flat_map(|u| u.items().iter().map(move |s| (u, s)))
}

fn changes<'a>(plan: &'a [Upload], kind: &'a str) -> impl Iterator<Item = (&'a Upload, &'a Value)> {
    plan.iter()
        .filter(|u| u.endpoint == CHANGES_PATH)
        .flat_map(|u| u.items().iter().map(move |c| (u, c)))
        .filter(move |(_, c)| c["kind"] == kind)
}

fn ms(v: &Value) -> i64 {
    ts(v).timestamp_millis()
}

/// Runs the edge's envelope parsing and item validation on every body.
fn assert_valid(cfg: &SimConfig, plan: &[Upload]) {
    let catalog = Catalog::embedded();
    let rules = Rules::default();
    let now = cfg.now_ms;
    for up in plan {
        let bytes = serde_json::to_vec(&up.body).unwrap();
        assert!(bytes.len() < MAX_BODY_BYTES, "{} bytes", bytes.len());
        let kind = match up.endpoint {
            SAMPLES_PATH => BatchKind::Samples,
            DELETIONS_PATH => BatchKind::Deletions,
            CHANGES_PATH => BatchKind::DomainChanges,
            other => panic!("unknown endpoint {other}"),
        };
        let (env, _, items) = parse_envelope(&bytes, kind, &up.user, &rules).unwrap_or_else(|e| panic!("{e:?}: {}", up.body));
        assert!(items.len() <= cfg.batch_size, "batch of {}", items.len());
        let rejected = match kind {
            BatchKind::Samples => validate_samples(items, env.backfill, None, catalog, &rules, now).1,
            BatchKind::Deletions => validate_deletions(items, catalog).1,
            BatchKind::DomainChanges => validate_changes(items, catalog, &rules, now).1,
        };
        assert!(rejected.is_empty(), "{} of {} rejected: {:?}", up.endpoint, up.user, &rejected[..rejected.len().min(5)]);
    }
    // Stricter than the edge: nothing after `now`, end >= start, one identity per sample except edits.
    let mut ids = HashSet::new();
    for (up, s) in samples(plan) {
        let start = ms(&s["start"]);
        let end = s.get("end").map_or(start, ms);
        assert!(end >= start && end <= now, "{s}");
        let version = s.get("version").and_then(Value::as_i64).unwrap_or(1);
        let key = (up.user.clone(), s["source"].to_string(), s["source_record_id"].to_string(), version);
        assert!(ids.insert(key), "duplicate identity {s}");
        if version > 1 {
            let v1 = (up.user.clone(), s["source"].to_string(), s["source_record_id"].to_string(), 1);
            assert!(ids.contains(&v1), "an edit of a sample never sent: {s}");
        }
    }
    for up in plan.iter().filter(|u| u.endpoint == CHANGES_PATH) {
        for c in up.items() {
            assert!(ms(&c["occurred_at"]) <= now, "{c}");
        }
    }
    let rids: HashSet<&str> = plan.iter().map(|u| u.request_id()).collect();
    assert_eq!(rids.len(), plan.len(), "request ids are unique");
}

#[test]
fn simulate_plan_is_deterministic() {
    let c = cfg(3, 5, NOW);
    let a = plan(&c);
    assert_eq!(a, plan(&c));
    assert_eq!(a, (0..3).flat_map(|i| plan_user(&c, i)).collect::<Vec<_>>());
    let other = plan(&SimConfig { seed: 8, ..c.clone() });
    assert_ne!(a, other);
    // A day looks the same whatever the history length: the last 5 days of a 9-day plan hold the
    // same samples as a 5-day plan.
    let long = plan(&SimConfig { days: 9, ..c.clone() });
    let short_ids: BTreeSet<String> = samples(&a)
        .filter(|(u, s)| u.user == "t-0" && s.get("version").is_none())
        .map(|(_, s)| s["source_record_id"].to_string())
        .collect();
    let long_ids: BTreeSet<String> =
        samples(&long).filter(|(u, _)| u.user == "t-0").map(|(_, s)| s["source_record_id"].to_string()).collect();
    assert!(short_ids.is_subset(&long_ids));
}

#[test]
fn simulate_every_item_passes_the_edge_validation() {
    for now in [NOW, NOW_AFTER_DST, NOW_AFTER_FALL_BACK, NOW + 11 * 3_600_000, NOW + 17 * 3_600_000] {
        let c = cfg(8, 10, now);
        assert_valid(&c, &plan(&c));
    }
    let small = SimConfig { batch_size: 37, ..cfg(2, 3, NOW) };
    let p = plan(&small);
    assert_valid(&small, &p);
    assert!(p.iter().any(|u| u.items().len() == 37));
    let big = SimConfig { batch_size: 5000, ..cfg(1, 14, NOW) };
    assert_valid(&SimConfig { batch_size: MAX_ITEMS, ..big.clone() }, &plan(&big));
    // Degenerate histories still make a consent request and nothing invalid.
    for days in [0, 1] {
        let c = cfg(2, days, NOW);
        let p = plan(&c);
        assert_valid(&c, &p);
        assert_eq!(p[0].items()[0]["kind"], "privacy_updated");
    }
}

#[test]
fn simulate_orders_requests_like_a_phone() {
    let c = cfg(2, 7, NOW);
    let p = plan(&c);
    for user in ["t-0", "t-1"] {
        let mine: Vec<&Upload> = p.iter().filter(|u| u.user == user).collect();
        assert_eq!(mine[0].endpoint, CHANGES_PATH);
        assert_eq!(mine[0].items()[0]["kind"], "privacy_updated");
        assert_eq!(mine[0].items()[0]["privacy"]["health_upload_allowed"], true);
        assert!(mine[0].items()[1..].iter().all(|c| c["kind"] == "product_upserted"));
        // Backfill first, then recent, then the edits (version 2), then deletions.
        let kinds: Vec<(&str, bool, bool)> = mine
            .iter()
            .filter(|u| u.endpoint != CHANGES_PATH)
            .map(|u| (u.endpoint, u.backfill(), u.items().iter().any(|s| s.get("version").is_some())))
            .collect();
        let first_recent = kinds.iter().position(|k| k.0 == SAMPLES_PATH && !k.1).unwrap();
        assert!(first_recent > 0 && kinds[..first_recent].iter().all(|k| k.1));
        assert!(kinds[first_recent..].iter().all(|k| !k.1));
        let edits = kinds.iter().position(|k| k.2).unwrap();
        assert!(kinds[edits..].iter().all(|k| k.2 || k.0 == DELETIONS_PATH));
        assert_eq!(kinds.last().unwrap().0, DELETIONS_PATH);
        // Backfill is older than the recent part.
        let end_of = |u: &Upload| u.items().iter().map(|s| ms(s.get("end").unwrap_or(&s["start"]))).max().unwrap();
        let backfill_end = mine.iter().filter(|u| u.backfill()).map(|u| end_of(u)).max().unwrap();
        assert!(backfill_end < NOW - 24 * 3_600_000);
    }
}

#[test]
fn simulate_one_user_week_has_a_sensible_volume() {
    let c = SimConfig { edits_and_deletions: false, ..cfg(1, 7, NOW) };
    let p = plan(&c);
    let mut per_metric: BTreeMap<String, usize> = BTreeMap::new();
    for (_, s) in samples(&p) {
        *per_metric.entry(s["metric"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let total: usize = per_metric.values().sum();
    assert!((2_000..8_000).contains(&total), "{total} samples: {per_metric:?}");
    let n = |m: &str| per_metric.get(m).copied().unwrap_or(0);
    assert!((1_500..2_400).contains(&n("heart_rate")), "{per_metric:?}");
    assert!((100..1_000).contains(&n("steps")), "{per_metric:?}");
    assert!((6..=7).contains(&n("resting_heart_rate")), "{per_metric:?}");
    assert!((40..400).contains(&n("sleep_stage")), "{per_metric:?}");
    assert!(n("hrv_sdnn") >= 18 && n("spo2") >= 18 && n("respiratory_rate") >= 18, "{per_metric:?}");
    assert!(n("distance") > 0 && n("active_energy") > 0, "{per_metric:?}");
    assert!(p.len() < 40, "{} requests", p.len());
    // Daily steps (watch) in a human range.
    let mut per_day: BTreeMap<String, f64> = BTreeMap::new();
    for (_, s) in samples(&p).filter(|(_, s)| s["metric"] == "steps" && s["source"] == WATCH.name) {
        *per_day.entry(s["start"].as_str().unwrap()[..10].to_owned()).or_default() += s["value"].as_f64().unwrap();
    }
    let full_days: Vec<f64> = per_day.values().take(per_day.len().saturating_sub(1)).copied().collect();
    assert!(full_days.iter().all(|d| (1_500.0..30_000.0).contains(d)), "{per_day:?}");
}

#[test]
fn simulate_phone_and_watch_steps_overlap() {
    let c = cfg(4, 5, NOW);
    let p = plan(&c);
    let mut overlaps = 0;
    for user in 0..4 {
        let user = format!("t-{user}");
        let spans = |src: &str| -> Vec<(i64, i64)> {
            samples(&p)
                .filter(|(u, s)| u.user == user && s["metric"] == "steps" && s["source"] == src && s.get("version").is_none())
                .map(|(_, s)| (ms(&s["start"]), ms(&s["end"])))
                .collect()
        };
        let (phone, watch) = (spans(PHONE.name), spans(WATCH.name));
        assert!(!phone.is_empty() && !watch.is_empty());
        overlaps += phone.iter().filter(|a| watch.iter().any(|b| a.0 < b.1 && b.0 < a.1)).count();
        // Each device on its own never overlaps itself.
        for list in [&phone, &watch] {
            assert!(list.windows(2).all(|w| w[0].1 <= w[1].0));
        }
    }
    assert!(overlaps > 20, "{overlaps} overlapping phone/watch step samples");
}

#[test]
fn simulate_two_sessions_a_day() {
    let c = cfg(3, 7, NOW);
    let p = plan(&c);
    for user in 0..3 {
        let user = format!("t-{user}");
        let mut per_date: BTreeMap<String, usize> = BTreeMap::new();
        for (_, ch) in changes(&p, "session_started").filter(|(u, _)| u.user == user) {
            let s = &ch["session"];
            assert!(s["product_id"].as_str().unwrap().starts_with("prod-"));
            *per_date.entry(s["start"].as_str().unwrap()[..10].to_owned()).or_default() += 1;
        }
        let ended = changes(&p, "session_ended").filter(|(u, _)| u.user == user).count();
        let started: usize = per_date.values().sum();
        assert!(ended >= started.saturating_sub(2) && ended <= started);
        // Every day but today has exactly two.
        let full: Vec<usize> = per_date.values().take(6).copied().collect();
        assert_eq!(full, vec![2; 6], "{user}: {per_date:?}");
        // Products used were upserted first.
        let products: HashSet<String> =
            changes(&p, "product_upserted").filter(|(u, _)| u.user == user).map(|(_, c)| c["product"]["product_id"].to_string()).collect();
        assert!(changes(&p, "session_started")
            .filter(|(u, _)| u.user == user)
            .all(|(_, c)| products.contains(&c["session"]["product_id"].to_string())));
    }
    // Over many users and days, corrections and deletions of sessions and priority changes happen.
    let c = cfg(12, 21, NOW);
    let p = plan(&c);
    assert!(changes(&p, "session_updated").count() > 0);
    assert!(changes(&p, "session_deleted").count() > 0);
    assert!(changes(&p, "source_priority_updated").count() > 0);
    let sessions = effective_sessions(&p);
    let started = changes(&p, "session_started").count();
    let deleted = changes(&p, "session_deleted").count();
    assert_eq!(sessions.len(), started - deleted);
    assert!(sessions.iter().all(|(_, s)| s.product_id.is_some() && s.start_ms.is_some()));
}

#[test]
fn simulate_sleep_nights_naps_and_heart_rate_are_plausible() {
    let c = cfg(8, 21, NOW);
    let p = plan(&c);
    let sleep: Vec<(&str, i64, i64, &str)> = samples(&p)
        .filter(|(_, s)| s["metric"] == "sleep_stage")
        .map(|(u, s)| (u.user.as_str(), ms(&s["start"]), ms(&s["end"]), s["category"].as_str().unwrap()))
        .collect();
    let cats: HashSet<&str> = sleep.iter().map(|s| s.3).collect();
    for cat in ["in_bed", "core", "deep", "rem", "awake"] {
        assert!(cats.contains(cat), "{cat} missing");
    }
    // In-bed spans: nights of 5–12 h, naps under 2 h in the afternoon, and split nights (two
    // in-bed spans less than 3 h apart).
    let mut in_bed: Vec<(&str, i64, i64)> = sleep.iter().filter(|s| s.3 == "in_bed").map(|s| (s.0, s.1, s.2)).collect();
    in_bed.sort();
    let short = in_bed.iter().filter(|s| s.2 - s.1 < 2 * 3_600_000).count();
    let split = in_bed.windows(2).filter(|w| w[0].0 == w[1].0 && w[1].1 - w[0].2 < 3 * 3_600_000).count();
    assert!(short > 3, "naps: {short}");
    assert!(split > 3, "split nights: {split}");
    // A person's sleep stages never overlap (travel and DST included), nor do two heart rates share an instant.
    let mut stages: Vec<(&str, i64, i64)> = sleep.iter().filter(|s| s.3 != "in_bed").map(|s| (s.0, s.1, s.2)).collect();
    stages.sort();
    assert!(stages.windows(2).all(|w| w[0].0 != w[1].0 || w[0].2 <= w[1].1));
    let hr_instants: HashSet<(&str, i64)> = samples(&p)
        .filter(|(_, s)| s["metric"] == "heart_rate" && s.get("version").is_none())
        .map(|(u, s)| (u.user.as_str(), ms(&s["start"])))
        .collect();
    assert_eq!(hr_instants.len(), samples(&p).filter(|(_, s)| s["metric"] == "heart_rate" && s.get("version").is_none()).count());
    // Awakenings of at least 5 minutes happen.
    assert!(sleep.iter().filter(|s| s.3 == "awake" && s.2 - s.1 >= 5 * 60_000).count() > 50);
    // Heart rate: lower while asleep than during workouts.
    let hr: Vec<(&str, i64, f64)> = samples(&p)
        .filter(|(_, s)| s["metric"] == "heart_rate")
        .map(|(u, s)| (u.user.as_str(), ms(&s["start"]), s["value"].as_f64().unwrap()))
        .collect();
    let deep: Vec<(&str, i64, i64)> = sleep.iter().filter(|s| s.3 == "deep").map(|s| (s.0, s.1, s.2)).collect();
    let asleep_hr: Vec<f64> = hr.iter().filter(|h| deep.iter().any(|d| d.0 == h.0 && h.1 >= d.1 && h.1 < d.2)).map(|h| h.2).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let all = mean(&hr.iter().map(|h| h.2).collect::<Vec<_>>());
    assert!(asleep_hr.len() > 100 && mean(&asleep_hr) + 10.0 < all, "deep {} vs all {all}", mean(&asleep_hr));
}

#[test]
fn simulate_zones_travel_and_dst_show_up() {
    // User 0 lives in Berlin: the week before NOW_AFTER_DST has +01:00 and +02:00 offsets.
    let c = cfg(1, 7, NOW_AFTER_DST);
    let p = plan(&c);
    let offsets: BTreeSet<String> = samples(&p).map(|(_, s)| s["start"].as_str().unwrap()[19..].to_owned()).collect();
    assert!(offsets.contains("+01:00") && offsets.contains("+02:00"), "{offsets:?}");
    // Someone travels: samples in a zone other than the home zone.
    let c = cfg(16, 28, NOW);
    let p = plan(&c);
    let travellers = (0..16)
        .filter(|&i| {
            let user = format!("t-{i}");
            let home = HOME_ZONES[i % HOME_ZONES.len()].name();
            samples(&p).any(|(u, s)| u.user == user && s["source"] == WATCH.name && s["time_zone"] != home)
        })
        .count();
    assert!(travellers >= 2, "{travellers} travellers");
    // Third-party samples carry fixed offsets and kJ.
    assert!(samples(&p)
        .any(|(_, s)| s["source"] == WORKOUT_APP.name && s["unit"] == "kJ" && s["time_zone"].as_str().unwrap().starts_with(['+', '-'])));
    // Units vary between people.
    for (metric, unit) in [
        ("heart_rate", "bpm"),
        ("heart_rate", "count/min"),
        ("spo2", "fraction"),
        ("spo2", "%"),
        ("body_mass", "lb"),
        ("body_mass", "kg"),
        ("distance", "km"),
        ("distance", "m"),
    ] {
        assert!(samples(&p).any(|(_, s)| s["metric"] == metric && s["unit"] == unit), "{metric} in {unit}");
    }
}

#[test]
fn simulate_edits_and_deletions_apply() {
    let c = cfg(3, 10, NOW);
    let p = plan(&c);
    let v1 = samples(&p).filter(|(_, s)| s.get("version").is_none()).count();
    let edits = samples(&p).filter(|(_, s)| s["version"] == 2).count();
    let deletions: usize = p.iter().filter(|u| u.endpoint == DELETIONS_PATH).map(|u| u.items().len()).sum();
    assert!(edits >= 3 && deletions >= 3, "{edits} edits, {deletions} deletions");
    let effective = effective_samples(&p);
    assert_eq!(effective.len(), v1 - deletions);
    let edited_held = effective.iter().filter(|(_, s)| s.version == 2).count();
    assert!(edited_held > 0 && edited_held < edits + 1);
    // Canonical units after the edge's normalisation.
    assert!(effective.iter().filter(|(_, s)| s.metric == "heart_rate").all(|(_, s)| s.unit == "count/min"));
    assert!(effective.iter().filter(|(_, s)| s.metric == "spo2").all(|(_, s)| (80.0..=100.0).contains(&s.value)));
    // Without the flag: no version 2, no deletions.
    let p = plan(&SimConfig { edits_and_deletions: false, ..c });
    assert!(samples(&p).all(|(_, s)| s.get("version").is_none()));
    assert!(p.iter().all(|u| u.endpoint != DELETIONS_PATH));
}

/// A stand-in for the edge on loopback: records every call and answers as scripted by call number.
mod fake_edge {
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode, Uri};
    use axum::response::{IntoResponse, Response};
    use axum::{Json, Router};
    use serde_json::{json, Value};

    pub type Script = fn(usize, &Value) -> Option<Response>;

    #[derive(Default)]
    pub struct Calls(pub Mutex<Vec<(String, String, Value)>>);

    pub async fn start(script: Script) -> (String, Arc<Calls>) {
        let calls = Arc::new(Calls::default());
        let app = Router::new()
            .fallback(move |State(c): State<Arc<Calls>>, uri: Uri, headers: HeaderMap, body: Bytes| async move {
                let v: Value = serde_json::from_slice(&body).expect("JSON body");
                let auth = headers.get("authorization").and_then(|h| h.to_str().ok()).unwrap_or_default().to_owned();
                let n = {
                    let mut calls = c.0.lock().unwrap();
                    calls.push((uri.path().to_owned(), auth, v.clone()));
                    calls.len()
                };
                if let Some(r) = script(n, &v) {
                    return r;
                }
                let items =
                    ["samples", "deletions", "changes"].iter().find_map(|f| v.get(*f)).and_then(Value::as_array).map_or(0, Vec::len);
                (StatusCode::OK, Json(json!({"request_id": v["request_id"], "accepted": items, "lanes": {}, "rejected": []})))
                    .into_response()
            })
            .with_state(calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("fake edge") });
        (format!("http://{addr}/"), calls)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_run_sends_the_plan_and_retries_with_the_same_request() {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use serde_json::json;
    let (base, calls) = fake_edge::start(|n, v| match n {
        2 => Some(
            (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "0")], axum::Json(json!({"error": {"code": "broker_unavailable"}})))
                .into_response(),
        ),
        5 => Some((StatusCode::CONFLICT, axum::Json(json!({"error": {"code": "request_in_flight"}}))).into_response()),
        7 => Some(
            (
                StatusCode::MULTI_STATUS,
                axum::Json(json!({"request_id": v["request_id"], "accepted": 0, "lanes": {},
                "rejected": [{"index": 0, "field": "value", "code": "value_out_of_range", "message": "test"}]})),
            )
                .into_response(),
        ),
        _ => None,
    })
    .await;
    let c = SimConfig { base_url: base, rate: Some(500.0), ..cfg(3, 2, NOW) };
    let http = reqwest::Client::new();
    let report = run(&c, &http).await.expect("run");
    let p = plan(&c);
    let items: u64 = p.iter().map(|u| u.items().len() as u64).sum();
    let calls = calls.0.lock().unwrap().clone();
    assert_eq!(calls.len(), p.len() + 2);
    assert_eq!((report.requests, report.retries, report.items_sent), (p.len() as u64 + 2, 2, items));
    assert_eq!(report.rejected, 1);
    assert!(report.accepted < items && report.accepted > items / 2);
    assert!(report.bytes_sent > 0 && report.samples_per_sec > 0.0);
    // Each user's calls are its plan in order, a retry being the same call again (same request id,
    // body and token); users interleave.
    let mut repeats = 0;
    for user in 0..3 {
        let user = format!("t-{user}");
        let mine: Vec<&(String, String, Value)> = calls.iter().filter(|c| c.2["user_id"] == user.as_str()).collect();
        let mut sent: Vec<(&str, &Value)> = Vec::new();
        for (i, c) in mine.iter().enumerate() {
            if i > 0 && mine[i - 1] == *c {
                repeats += 1;
            } else {
                sent.push((c.0.as_str(), &c.2));
            }
        }
        let planned: Vec<(&str, &Value)> = p.iter().filter(|u| u.user == user).map(|u| (u.endpoint, &u.body)).collect();
        assert_eq!(sent, planned);
        let tokens: HashSet<&str> = mine.iter().map(|c| c.1.as_str()).collect();
        assert_eq!(tokens.len(), 1);
        assert!(tokens.iter().all(|t| t.starts_with("Bearer ") && t.split('.').count() == 3));
    }
    assert_eq!(repeats, 2);

    // Any other failure stops the run with the edge's answer in the error.
    let (base, _) = fake_edge::start(|n, _| {
        (n == 3)
            .then(|| (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(json!({"error": {"code": "idempotency_key_reused"}}))).into_response())
    })
    .await;
    let err = run(&SimConfig { base_url: base, ..cfg(1, 2, NOW) }, &http).await.unwrap_err();
    assert!(format!("{err:#}").contains("idempotency_key_reused"), "{err:#}");
}

#[test]
fn simulate_sessions_move_heart_rate_by_product() {
    let c = SimConfig { edits_and_deletions: false, ..cfg(12, 21, NOW) };
    let p = plan(&c);
    let samples = effective_samples(&p);
    let mut hr: BTreeMap<&str, Vec<(i64, f64)>> = BTreeMap::new();
    for (u, s) in samples.iter().filter(|(_, s)| s.metric == "heart_rate") {
        hr.entry(u.as_str()).or_default().push((s.start_ms, s.value));
    }
    let mean = |v: &[f64]| if v.is_empty() { None } else { Some(v.iter().sum::<f64>() / v.len() as f64) };
    let mut deltas: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (u, s) in effective_sessions(&p) {
        let (Some(start), Some(end)) = (s.start_ms, s.end_ms) else { continue };
        let Some(series) = hr.get(u.as_str()) else { continue };
        let window = |a: i64, b: i64| series.iter().filter(|x| x.0 >= a && x.0 < b).map(|x| x.1).collect::<Vec<_>>();
        if let (Some(before), Some(after)) = (mean(&window(start - 3_600_000, start)), mean(&window(end, end + 3_600_000))) {
            deltas.entry(s.product_id.unwrap()).or_default().push(after - before);
        }
    }
    let avg = |id: &str| mean(&deltas[id]).unwrap();
    assert!(avg("prod-energy-drink") > avg("prod-chamomile") + 4.0, "{:?}", deltas.keys().map(|k| (k, avg(k))).collect::<Vec<_>>());
    assert!(avg("prod-espresso") > avg("prod-chamomile") + 2.0);
}
