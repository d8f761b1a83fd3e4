//! `vitals simulate`: a realistic, deterministic phone client.
//!
//! It invents `users` people and `days` of their health data ending at `now_ms`, and uploads it
//! through the real HTTP API of the ingest edge in the order and batch sizes a phone would. The
//! demo, the integration tests and the benchmarks all use it, so:
//!
//! - **Deterministic.** [`plan`] is a pure function of [`SimConfig`]: same seed and `now_ms`, same
//!   bytes. Each person's days are drawn from streams seeded by `(seed, user, date, purpose)`, so a
//!   given date looks the same whatever `days`, `users` or `now_ms` is; only the cut-off at `now_ms`
//!   moves (nothing later than `now_ms` is ever sent, a night only once its final wake has passed,
//!   a session's end only once it has ended).
//! - **Inspectable.** [`plan`] returns every request that [`run`] sends; [`effective_samples`] and
//!   [`effective_sessions`] replay a plan with the domain's rules (versions, deletions, session
//!   updates) and the edge's own normalisation, which is what tests compute expected results from.
//! - **Valid.** Every item passes the edge's validation (the tests run the edge's own functions on
//!   every body); a 207/422 with rejections during [`run`] is a simulator bug and is counted in
//!   [`SimReport::rejected`].
//!
//! ## What a person looks like (`person.rs`, `day.rs`)
//! - Lives in an IANA zone (user `i` in [`HOME_ZONES`]`[i % 8]`: Berlin, New York, Tokyo, London,
//!   Los Angeles, Sydney, Kolkata, São Paulo); about 40% travel, a few days at a time, to another
//!   zone, and their samples then carry that zone. Days are built in absolute time from local
//!   wake/bed times, so DST days are 23 or 25 h and flights make for short or jet-lagged nights.
//! - Phone (`com.apple.health.iphone`) and watch (`com.apple.health.watch`) both count `steps` and
//!   `distance` (phone in m, watch in km) of the same walks, each in its own 10–30 / 10–20 min
//!   windows, so they overlap in time without matching; the phone misses bouts it was not carried
//!   on, the watch misses what happens while it charges after waking. The watch adds
//!   `active_energy` (kcal); a third-party workout app (`com.strava`) writes one `active_energy`
//!   sample per workout in kJ with a fixed `±HH:MM` zone; the phone adds `flights` now and then.
//! - `heart_rate` from the watch every 5 min while worn (every minute during workouts; in
//!   `count/min` or `bpm`), low in deep sleep, high during bouts, elevated after them and after
//!   consumption sessions by the product's [`ProductDef::hr_delta`]; `resting_heart_rate` once a
//!   day; `hrv_sdnn`, `respiratory_rate` and `spo2` (`%` or `fraction`) a few times a night, HRV
//!   also during the day (often just before and after a session, shifted by
//!   [`ProductDef::hrv_delta`]).
//! - `sleep_stage` from the watch each night: `in_bed` plus core/deep/rem/awake cycles (older
//!   watches: `asleep_unspecified`) with one to three awakenings; sometimes the person gets up for
//!   40–75 min and sleeps again (a second period), sometimes naps in the afternoon.
//! - `body_mass` every few days (scale app or manual entry; kg, lb for most Americans),
//!   `mindful` sessions for meditators.
//! - Domain changes: consent (`privacy_updated`) and 2–4 products (`product_upserted`) first; two
//!   sessions a day (`session_started`, `session_ended`), occasionally `session_updated` (product
//!   and start corrected) or `session_deleted`; for about a third of users one
//!   `source_priority_updated` (phone first) in the middle of the history.
//! - With [`SimConfig::edits_and_deletions`], after everything else: about 1% of the samples are
//!   re-sent as `version: 2` with another value, about 1% deleted (some with `version: 1`, and one
//!   edited sample deleted outright).
//!
//! ## Order of a user's requests
//! Consent and products; then day by day, oldest first: that day's domain changes, then its
//! samples in batches of at most `batch_size` (days before yesterday flagged `backfill: true`,
//! yesterday and today not); then edits; then deletions.

mod client;
mod day;
mod person;
mod rng;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use chrono::NaiveDate;
use serde_json::{json, Value};
use vitals_ingest::request::{validate_changes, validate_deletions, validate_samples, Rules};
use vitals_schemas::{Catalog, DomainChangeKind, Sample, Session};

pub use client::run;
pub use person::{product, ProductDef, Source, HOME_ZONES, MANUAL, PHONE, PRODUCTS, SCALE, WATCH, WORKOUT_APP};

use day::{DayGen, Gen, HOUR, MIN};
use person::Person;
use rng::{hash, unique_id};

/// `POST` path of sample batches.
pub const SAMPLES_PATH: &str = "/v1/health/samples:batch";
/// `POST` path of deletion batches.
pub const DELETIONS_PATH: &str = "/v1/health/deletions:batch";
/// `POST` path of domain-change batches.
pub const CHANGES_PATH: &str = "/v1/domain-changes:batch";

/// Bodies are split before they reach this size (the edge takes up to 2 MiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The edge's limit on items per request.
pub const MAX_ITEMS: usize = 2000;

/// What to simulate and where to send it.
#[derive(Clone)]
pub struct SimConfig {
    /// Base URL of the edge, e.g. `http://127.0.0.1:18080`.
    pub base_url: String,
    pub users: usize,
    /// History length in local days ending with today (the day of `now_ms`).
    pub days: u32,
    /// User ids are `format!("{user_prefix}{i}")`.
    pub user_prefix: String,
    pub seed: u64,
    /// The simulated "now" (ms since the epoch); nothing later is sent.
    pub now_ms: i64,
    /// Maximum requests per second over all users (retries included); `None` = as fast as possible.
    pub rate: Option<f64>,
    /// Users uploading at the same time.
    pub concurrency: usize,
    /// Maximum items per request (clamped to `1..=2000`).
    pub batch_size: usize,
    pub jwt_secret: Vec<u8>,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    /// Send some edits (version 2) and deletions after the history.
    pub edits_and_deletions: bool,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("base_url", &self.base_url)
            .field("users", &self.users)
            .field("days", &self.days)
            .field("user_prefix", &self.user_prefix)
            .field("seed", &self.seed)
            .field("now_ms", &self.now_ms)
            .field("rate", &self.rate)
            .field("concurrency", &self.concurrency)
            .field("batch_size", &self.batch_size)
            .field("jwt_secret", &"<redacted>")
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("edits_and_deletions", &self.edits_and_deletions)
            .finish()
    }
}

impl Default for SimConfig {
    /// The local development setup (`config/default.toml`), 1 user, 7 days ending at the wall
    /// clock, seed 42.
    fn default() -> SimConfig {
        SimConfig {
            base_url: "http://127.0.0.1:18080".into(),
            users: 1,
            days: 7,
            user_prefix: "sim-user-".into(),
            seed: 42,
            now_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
            rate: None,
            concurrency: 4,
            batch_size: 500,
            jwt_secret: b"vitals-local-dev-secret-change-me-0123456789".to_vec(),
            jwt_issuer: "vitals-dev".into(),
            jwt_audience: "vitals".into(),
            edits_and_deletions: true,
        }
    }
}

/// One request of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    pub user: String,
    /// The path, one of [`SAMPLES_PATH`], [`DELETIONS_PATH`], [`CHANGES_PATH`].
    pub endpoint: &'static str,
    /// The JSON body, exactly as sent.
    pub body: Value,
}

impl Upload {
    /// The name of the items array of this endpoint.
    pub fn items_field(&self) -> &'static str {
        match self.endpoint {
            SAMPLES_PATH => "samples",
            DELETIONS_PATH => "deletions",
            _ => "changes",
        }
    }
    /// The samples, deletions or changes of the body.
    pub fn items(&self) -> &[Value] {
        self.body.get(self.items_field()).and_then(Value::as_array).map_or(&[], Vec::as_slice)
    }
    pub fn request_id(&self) -> &str {
        self.body["request_id"].as_str().unwrap_or_default()
    }
    /// Whether the batch is flagged as backfill (COLD lane).
    pub fn backfill(&self) -> bool {
        self.body.get("backfill").and_then(Value::as_bool).unwrap_or(false)
    }
}

/// What [`run`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimReport {
    /// HTTP requests sent, retries included.
    pub requests: u64,
    /// Items (samples, deletions, changes) in the plan's requests, each counted once.
    pub items_sent: u64,
    /// Items the edge accepted.
    pub accepted: u64,
    /// Items the edge rejected (a simulator bug when non-zero).
    pub rejected: u64,
    /// Requests repeated after 503, 409 or a transport error.
    pub retries: u64,
    pub elapsed: std::time::Duration,
    /// Accepted samples (sample endpoint only) per second of `elapsed`.
    pub samples_per_sec: f64,
    /// Body bytes sent, retries included.
    pub bytes_sent: u64,
}

/// The id of user `index`.
pub fn user_id(cfg: &SimConfig, index: usize) -> String {
    format!("{}{index}", cfg.user_prefix)
}

/// Everything [`run`] will send, user by user, each user's requests in the order the phone sends
/// them. Pure and deterministic; holds every body in memory (for many users, see [`plan_user`]).
pub fn plan(cfg: &SimConfig) -> Vec<Upload> {
    (0..cfg.users).flat_map(|i| plan_user(cfg, i)).collect()
}

/// The requests of user `index` (see the module docs for their order).
pub fn plan_user(cfg: &SimConfig, index: usize) -> Vec<Upload> {
    let user = user_id(cfg, index);
    let person = Person::new(cfg.seed, &user, index);
    // Whole seconds, never after `now_ms`.
    let now = cfg.now_ms.div_euclid(1000) * 1000;
    let gen = DayGen::new(cfg.seed, &person, now);
    let today = day::local_date(person.home, now);
    let dates: Vec<NaiveDate> =
        (0..i64::from(cfg.days)).rev().filter_map(|k| today.checked_sub_days(chrono::Days::new(k as u64))).collect();
    let mut b = Builder { cfg, user: &user, uploads: Vec::new() };

    // Consent and products, before the history starts.
    let first = dates.first().map_or(now, |d| day::local_ms(person.home, *d, 0.0));
    let t0 = first.min(now) - 2 * HOUR;
    let at = |t: i64| day::rfc3339(person.home, t);
    let mut initial = vec![json!({
        "change_id": unique_id(cfg.seed, &user, "change", u64::MAX), "kind": "privacy_updated", "occurred_at": at(t0),
        "privacy": {"health_upload_allowed": true, "blocked_metrics": []}
    })];
    for (k, p) in (1u64..).zip(&person.products) {
        initial.push(json!({
            "change_id": unique_id(cfg.seed, &user, "change", u64::MAX - k), "kind": "product_upserted",
            "occurred_at": at(t0 + k as i64 * MIN),
            "product": {"product_id": p.product_id, "name": p.name, "category": p.category}
        }));
    }
    b.push(CHANGES_PATH, initial, false);

    let mut edits: Vec<Gen> = Vec::new();
    let mut deletions: Vec<(Gen, bool)> = Vec::new();
    let mut fallback: Option<(Gen, Gen)> = None;
    if let Some(first) = dates.first() {
        let mut prev = gen.schedule(first.pred_opt().unwrap_or(*first), None);
        for (i, date) in dates.iter().enumerate() {
            let sched = gen.schedule(*date, Some(prev.bed));
            let out = gen.day(&sched, prev.bed, person.priority_update && i == dates.len() / 2);
            b.push(CHANGES_PATH, out.changes, false);
            if cfg.edits_and_deletions {
                select_changes(cfg.seed, &user, &out.samples, &mut edits, &mut deletions, &mut fallback);
            }
            let backfill = i + 2 < dates.len();
            b.push(SAMPLES_PATH, out.samples.iter().map(Gen::json).collect(), backfill);
            prev = sched;
        }
    }
    if cfg.edits_and_deletions {
        if let Some((e, d)) = fallback {
            if edits.is_empty() {
                edits.push(e);
            }
            if deletions.is_empty() {
                deletions.push((d, false));
            }
        }
        let edited: Vec<Gen> = edits.iter().map(edited).collect();
        // An edited sample deleted afterwards (all versions), when there are edits to spare.
        if edited.len() >= 2 {
            deletions.push((edited[0].clone(), false));
        }
        b.push(SAMPLES_PATH, edited.iter().map(Gen::json).collect(), false);
        let items = deletions
            .iter()
            .map(|(g, v1)| {
                let mut d = json!({"source": g.src.name, "source_record_id": g.rid, "metric": g.metric});
                if *v1 {
                    d["version"] = json!(1);
                }
                d
            })
            .collect();
        b.push(DELETIONS_PATH, items, false);
    }
    b.uploads
}

const EDITABLE: [&str; 5] = ["steps", "distance", "active_energy", "heart_rate", "body_mass"];

/// Picks ~1.2% of the editable samples for an edit and ~0.8% of all samples for deletion (by a
/// hash of the record id, so the choice does not depend on `now`); remembers a fallback pair so
/// that a short history still has one of each.
fn select_changes(
    seed: u64,
    user: &str,
    samples: &[Gen],
    edits: &mut Vec<Gen>,
    deletions: &mut Vec<(Gen, bool)>,
    fallback: &mut Option<(Gen, Gen)>,
) {
    for g in samples {
        let h = hash(seed, &[user.as_bytes(), g.rid.as_bytes(), b"edit"]);
        let k = h % 1000;
        let editable = EDITABLE.contains(&g.metric);
        if editable && k < 12 {
            edits.push(g.clone());
        } else if (500..508).contains(&k) {
            deletions.push((g.clone(), h & (1 << 20) != 0));
        } else if fallback.is_none() && editable {
            if let Some(d) = samples.iter().find(|d| d.rid != g.rid) {
                *fallback = Some((g.clone(), d.clone()));
            }
        }
    }
}

/// The edit of a sample: version 2 and a plausibly corrected value.
fn edited(g: &Gen) -> Gen {
    let v = g.value.unwrap_or(0.0);
    let nv = match g.metric {
        "steps" => ((v * 0.9).round()).max(1.0),
        "heart_rate" => v + 3.0,
        "body_mass" => ((v - 0.4) * 10.0).round() / 10.0,
        _ => ((v * 0.9) * 10_000.0).round() / 10_000.0,
    };
    let nv = if nv == v { v + 1.0 } else { nv };
    Gen { version: 2, value: Some(nv), ..g.clone() }
}

/// Turns item lists into requests: at most `batch_size` items and [`MAX_BODY_BYTES`] per body,
/// request ids from `(seed, now, user, index)`.
struct Builder<'a> {
    cfg: &'a SimConfig,
    user: &'a str,
    uploads: Vec<Upload>,
}

impl Builder<'_> {
    fn push(&mut self, endpoint: &'static str, items: Vec<Value>, backfill: bool) {
        let max_items = self.cfg.batch_size.clamp(1, MAX_ITEMS);
        let mut chunk: Vec<Value> = Vec::new();
        let mut bytes = 0;
        for item in items {
            let size = serde_json::to_vec(&item).map_or(0, |v| v.len()) + 1;
            if !chunk.is_empty() && (chunk.len() >= max_items || bytes + size > MAX_BODY_BYTES - 4096) {
                self.emit(endpoint, std::mem::take(&mut chunk), backfill);
                bytes = 0;
            }
            bytes += size;
            chunk.push(item);
        }
        if !chunk.is_empty() {
            self.emit(endpoint, chunk, backfill);
        }
    }

    fn emit(&mut self, endpoint: &'static str, items: Vec<Value>, backfill: bool) {
        let index = self.uploads.len() as u64;
        // `now` is part of the namespace: a later run with another `now` sends other bodies, and
        // reusing a request id for another body is refused by the edge (422).
        let namespace = format!("request/{}", self.cfg.now_ms);
        let request_id = unique_id(self.cfg.seed, self.user, &namespace, index).to_lowercase();
        let field = match endpoint {
            SAMPLES_PATH => "samples",
            DELETIONS_PATH => "deletions",
            _ => "changes",
        };
        let mut body = json!({"request_id": request_id, "user_id": self.user});
        if backfill {
            body["backfill"] = json!(true);
        }
        body[field] = Value::Array(items);
        self.uploads.push(Upload { user: self.user.to_owned(), endpoint, body });
    }
}

/// Far enough ahead that replaying a plan never meets the edge's "future" check.
const FAR_FUTURE_MS: i64 = i64::MAX / 4;

/// The samples that hold after the plan is applied in order, normalised by the edge's own
/// validation (canonical units): a higher version replaces, the same or a lower one is ignored, a
/// deletion removes the versions up to its `version` (all when absent). Sorted by
/// `(user, source, source_record_id)`.
pub fn effective_samples(plan: &[Upload]) -> Vec<(String, Sample)> {
    let catalog = Catalog::embedded();
    let rules = Rules::default();
    let mut held: BTreeMap<(String, String, String), Sample> = BTreeMap::new();
    for up in plan {
        match up.endpoint {
            SAMPLES_PATH => {
                let (ok, _) = validate_samples(up.items().to_vec(), up.backfill(), None, catalog, &rules, FAR_FUTURE_MS);
                for r in ok {
                    let key = (up.user.clone(), r.sample.source.clone(), r.sample.source_record_id.clone());
                    if held.get(&key).is_none_or(|h| h.version < r.sample.version) {
                        held.insert(key, r.sample);
                    }
                }
            }
            DELETIONS_PATH => {
                let (ok, _) = validate_deletions(up.items().to_vec(), catalog);
                for d in ok {
                    let key = (up.user.clone(), d.source, d.source_record_id);
                    if held.get(&key).is_some_and(|h| d.deleted_version.is_none_or(|v| h.version <= v)) {
                        held.remove(&key);
                    }
                }
            }
            _ => {}
        }
    }
    held.into_iter().map(|((user, _, _), s)| (user, s)).collect()
}

/// The sessions that hold after the plan's domain changes are applied in order (started, ended,
/// updated field by field, deleted), sorted by user and start.
pub fn effective_sessions(plan: &[Upload]) -> Vec<(String, Session)> {
    let catalog = Catalog::embedded();
    let rules = Rules::default();
    let mut held: BTreeMap<(String, String), Session> = BTreeMap::new();
    for up in plan.iter().filter(|u| u.endpoint == CHANGES_PATH) {
        let (ok, _) = validate_changes(up.items().to_vec(), catalog, &rules, FAR_FUTURE_MS);
        for c in ok {
            let Some(s) = c.session else { continue };
            let key = (up.user.clone(), s.session_id.clone());
            match c.kind {
                DomainChangeKind::SessionDeleted => {
                    held.remove(&key);
                }
                DomainChangeKind::SessionStarted | DomainChangeKind::SessionEnded | DomainChangeKind::SessionUpdated => {
                    let e = held.entry(key).or_insert_with(|| Session {
                        session_id: s.session_id.clone(),
                        product_id: None,
                        start_ms: None,
                        end_ms: None,
                        time_zone: None,
                    });
                    e.product_id = s.product_id.or(e.product_id.take());
                    e.start_ms = s.start_ms.or(e.start_ms);
                    e.end_ms = s.end_ms.or(e.end_ms);
                    e.time_zone = s.time_zone.or(e.time_zone.take());
                }
                _ => {}
            }
        }
    }
    let mut out: Vec<(String, Session)> = held.into_iter().map(|((u, _), s)| (u, s)).collect();
    out.sort_by(|a, b| (&a.0, a.1.start_ms).cmp(&(&b.0, b.1.start_ms)));
    out
}
