//! One simulated day of one person, in absolute time: the night that ends this morning, the waking
//! day (activity bouts seen by phone and watch, consumption sessions, a nap, mindfulness, weight)
//! and the heart rate that follows from all of it. Produces samples and domain changes; nothing
//! after `now` is produced (a night only once its final wake has passed).

use chrono::{DateTime, Datelike, NaiveDate, Offset, SecondsFormat, TimeZone, Weekday};
use chrono_tz::Tz;
use serde_json::{json, Map, Value};

use super::person::{Person, ProductDef, Source, MANUAL, PHONE, WATCH, WORKOUT_APP};
use super::rng::{hash, unique_id, Rng};

pub(crate) const SEC: i64 = 1_000;
pub(crate) const MIN: i64 = 60 * SEC;
pub(crate) const HOUR: i64 = 60 * MIN;

/// Days since 1970-01-01.
pub(crate) fn day_number(date: NaiveDate) -> i64 {
    (date - NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")).num_days()
}

/// Minutes → ms, rounded to whole seconds (every simulated timestamp is a whole second).
fn mins(m: f64) -> i64 {
    (m * 60.0).round() as i64 * SEC
}

/// The instant `minutes` after local midnight of `date` in `tz` (may exceed 24 h). A local time in
/// a DST gap moves forward by an hour; an ambiguous one takes the earlier instant.
pub(crate) fn local_ms(tz: Tz, date: NaiveDate, minutes: f64) -> i64 {
    let mut t = date.and_hms_opt(0, 0, 0).expect("midnight") + chrono::Duration::seconds((minutes * 60.0).round() as i64);
    for _ in 0..3 {
        if let Some(dt) = tz.from_local_datetime(&t).earliest() {
            return dt.timestamp_millis();
        }
        t += chrono::Duration::hours(1);
    }
    tz.from_utc_datetime(&t).timestamp_millis()
}

fn at(tz: Tz, ms: i64) -> DateTime<Tz> {
    DateTime::from_timestamp_millis(ms).expect("timestamp in range").with_timezone(&tz)
}

/// RFC 3339 with the zone's offset at that instant, e.g. `2025-03-30T07:12:45+02:00`.
pub(crate) fn rfc3339(tz: Tz, ms: i64) -> String {
    at(tz, ms).to_rfc3339_opts(SecondsFormat::Secs, false)
}

/// The zone's offset at that instant as `±HH:MM` (what Health Connect style apps send).
pub(crate) fn fixed_offset(tz: Tz, ms: i64) -> String {
    let secs = at(tz, ms).offset().fix().local_minus_utc();
    let sign = if secs < 0 { '-' } else { '+' };
    let a = secs.abs();
    format!("{sign}{:02}:{:02}", a / 3600, (a % 3600) / 60)
}

pub(crate) fn local_date(tz: Tz, ms: i64) -> NaiveDate {
    at(tz, ms).date_naive()
}

fn round_to(v: f64, decimals: i32) -> f64 {
    let p = 10f64.powi(decimals);
    (v * p).round() / p
}

/// Whole numbers as JSON integers (`512`, not `512.0`).
fn num(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

fn overlap(a0: i64, a1: i64, b0: i64, b1: i64) -> i64 {
    (a1.min(b1) - a0.max(b0)).max(0)
}

/// One generated sample, before it becomes JSON.
#[derive(Debug, Clone)]
pub(crate) struct Gen {
    pub src: &'static Source,
    pub rid: String,
    pub metric: &'static str,
    pub start: i64,
    pub end: i64,
    pub value: Option<f64>,
    pub unit: Option<&'static str>,
    pub category: Option<&'static str>,
    pub zone: Tz,
    /// Send the zone as a fixed `±HH:MM` offset instead of its IANA name.
    pub fixed_offset: bool,
    pub version: i64,
    pub meta: Vec<(&'static str, &'static str)>,
}

impl Gen {
    pub(crate) fn json(&self) -> Value {
        let mut m = Map::new();
        m.insert("source".into(), self.src.name.into());
        m.insert("source_kind".into(), self.src.kind.into());
        m.insert("source_record_id".into(), self.rid.clone().into());
        m.insert("metric".into(), self.metric.into());
        m.insert("start".into(), rfc3339(self.zone, self.start).into());
        if self.end != self.start {
            m.insert("end".into(), rfc3339(self.zone, self.end).into());
        }
        if let Some(v) = self.value {
            m.insert("value".into(), num(v));
        }
        if let Some(u) = self.unit {
            m.insert("unit".into(), u.into());
        }
        if let Some(c) = self.category {
            m.insert("category".into(), c.into());
        }
        let tz = if self.fixed_offset { fixed_offset(self.zone, self.start) } else { self.zone.name().to_owned() };
        m.insert("time_zone".into(), tz.into());
        if self.version != 1 {
            m.insert("version".into(), self.version.into());
        }
        if !self.meta.is_empty() {
            let meta: Map<String, Value> = self.meta.iter().map(|(k, v)| ((*k).to_owned(), Value::from(*v))).collect();
            m.insert("metadata".into(), Value::Object(meta));
        }
        Value::Object(m)
    }
}

/// When a person is awake on one date, in the zone they are in that day.
#[derive(Debug, Clone)]
pub(crate) struct Sched {
    pub date: NaiveDate,
    pub zone: Tz,
    pub wake: i64,
    pub bed: i64,
}

/// What one day produces: samples (sorted by start) and domain changes (sorted by occurrence).
pub(crate) struct DayOut {
    pub samples: Vec<Gen>,
    pub changes: Vec<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BoutKind {
    Micro,
    Walk,
    Brisk,
    Run,
}

impl BoutKind {
    fn spm(self) -> f64 {
        match self {
            BoutKind::Micro => 70.0,
            BoutKind::Walk => 105.0,
            BoutKind::Brisk => 125.0,
            BoutKind::Run => 160.0,
        }
    }
    fn stride_factor(self) -> f64 {
        match self {
            BoutKind::Micro => 0.8,
            BoutKind::Walk => 1.0,
            BoutKind::Brisk => 1.08,
            BoutKind::Run => 1.45,
        }
    }
    fn kcal_per_min(self) -> f64 {
        match self {
            BoutKind::Micro => 2.2,
            BoutKind::Walk => 4.2,
            BoutKind::Brisk => 5.8,
            BoutKind::Run => 11.5,
        }
    }
    fn hr_boost(self) -> f64 {
        match self {
            BoutKind::Micro => 26.0,
            BoutKind::Walk => 40.0,
            BoutKind::Brisk => 56.0,
            BoutKind::Run => 88.0,
        }
    }
}

#[derive(Debug, Clone)]
struct Bout {
    s: i64,
    e: i64,
    kind: BoutKind,
    spm: f64,
    phone: bool,
    workout: bool,
}

/// A stretch of movement as one device saw it.
struct Piece {
    s: i64,
    e: i64,
    spm: f64,
    stride: f64,
    kcal_per_min: f64,
}

struct SessionPlan {
    id: String,
    product: &'static ProductDef,
    s: i64,
    e: i64,
}

#[derive(Clone, Copy)]
enum Level {
    Stage(&'static str),
    InBed,
    Calm,
    Bout(BoutKind),
}

/// Sleep of one night as the watch writes it.
struct Night {
    stages: Vec<(i64, i64, &'static str)>,
    in_bed: Vec<(i64, i64)>,
}

/// Record and change identifiers of one day: unique per user by construction.
struct Ids<'a> {
    seed: u64,
    user: &'a str,
    day: u64,
    records: u64,
}

impl Ids<'_> {
    fn record(&mut self, src: &Source) -> String {
        self.records += 1;
        unique_id(self.seed, self.user, src.name, ((self.day & 0xff_ffff_ffff) << 24) | self.records)
    }
    /// A change's id depends only on what it is (day, session slot, kind), not on what else was
    /// sent, so it is the same whatever `now` cuts off.
    fn change(&self, slot: u64, kind: u64) -> String {
        unique_id(self.seed, self.user, "change", ((self.day & 0xff_ffff_ffff) << 24) | (slot << 8) | kind)
    }
    fn session(&self, slot: u64) -> String {
        unique_id(self.seed, self.user, "session", ((self.day & 0xff_ffff_ffff) << 8) | slot)
    }
}

/// Collects a day's samples, giving each its record id.
struct Sink<'a> {
    ids: Ids<'a>,
    zone: Tz,
    out: Vec<Gen>,
}

impl Sink<'_> {
    fn push(&mut self, src: &'static Source, metric: &'static str, start: i64, end: i64) -> &mut Gen {
        let rid = self.ids.record(src);
        self.out.push(Gen {
            src,
            rid,
            metric,
            start,
            end,
            value: None,
            unit: None,
            category: None,
            zone: self.zone,
            fixed_offset: false,
            version: 1,
            meta: Vec::new(),
        });
        self.out.last_mut().expect("just pushed")
    }
    fn value(&mut self, src: &'static Source, metric: &'static str, start: i64, end: i64, value: f64, unit: &'static str) -> &mut Gen {
        let g = self.push(src, metric, start, end);
        g.value = Some(value);
        g.unit = Some(unit);
        g
    }
    fn category(&mut self, src: &'static Source, metric: &'static str, start: i64, end: i64, category: &'static str) -> &mut Gen {
        let g = self.push(src, metric, start, end);
        g.category = Some(category);
        g
    }
}

pub(crate) struct DayGen<'a> {
    seed: u64,
    p: &'a Person,
    now: i64,
}

impl<'a> DayGen<'a> {
    pub(crate) fn new(seed: u64, p: &'a Person, now: i64) -> DayGen<'a> {
        DayGen { seed, p, now }
    }

    /// An independent stream per (user, date, purpose): a day's data does not shift when
    /// another part of the model changes.
    fn rng(&self, date: NaiveDate, what: &str) -> Rng {
        Rng::new(hash(self.seed, &[self.p.user.as_bytes(), what.as_bytes(), &day_number(date).to_le_bytes()]))
    }

    /// Wake and bed time of `date`; the wake is at least 4.5 h after the previous bed time (after
    /// an eastward flight the person sleeps in).
    pub(crate) fn schedule(&self, date: NaiveDate, prev_bed: Option<i64>) -> Sched {
        let zone = self.p.zone_on(self.seed, date);
        let mut r = self.rng(date, "schedule");
        let weekend = matches!(date.weekday(), Weekday::Sat | Weekday::Sun);
        let wake_m = if weekend { r.normal(500.0, 30.0) } else { r.normal(415.0, 20.0) } + self.p.chronotype_min;
        let bed_m = if weekend { r.normal(1410.0, 30.0) } else { r.normal(1370.0, 25.0) } + self.p.chronotype_min;
        let mut wake = local_ms(zone, date, wake_m.clamp(330.0, 660.0));
        if let Some(pb) = prev_bed {
            wake = wake.max(pb + 4 * HOUR + 30 * MIN);
        }
        let bed = local_ms(zone, date, bed_m.clamp(1260.0, 1560.0)).max(wake + 12 * HOUR);
        Sched { date, zone, wake, bed }
    }

    /// Everything of `s.date`: the night before it (from `prev_bed`), the waking day, the heart
    /// rate from `prev_bed` to `s.bed`, and the day's domain changes.
    pub(crate) fn day(&self, s: &Sched, prev_bed: i64, priority_update: bool) -> DayOut {
        let p = self.p;
        let z = s.zone;
        let now = self.now;
        let weekend = matches!(s.date.weekday(), Weekday::Sat | Weekday::Sun);
        let mut sink =
            Sink { ids: Ids { seed: self.seed, user: &p.user, day: day_number(s.date) as u64, records: 0 }, zone: z, out: Vec::new() };

        // The night ending this morning (after a westward flight the night would be very long:
        // the person stays up and sleeps ~8 h before waking).
        let mut rn = self.rng(s.date, "night");
        let night_start = if s.wake - prev_bed > 10 * HOUR + 30 * MIN { s.wake - mins(rn.range(450.0, 540.0)) } else { prev_bed };
        let night = sleep_night(&mut rn, p.staged_sleep, night_start, s.wake);
        let mut stages = night.stages.clone();
        let mut in_bed = night.in_bed.clone();
        if s.wake <= now {
            for &(a, b) in &night.in_bed {
                sink.category(&WATCH, "sleep_stage", a, b, "in_bed");
            }
            for &(a, b, c) in &night.stages {
                sink.category(&WATCH, "sleep_stage", a, b, c);
            }
        }

        // Two consumption sessions: mid-morning and afternoon.
        let mut rs = self.rng(s.date, "sessions");
        let mut sessions = Vec::new();
        let m_start = s.wake + mins(rs.range(80.0, 170.0));
        let prod = pick_product(&mut rs, p);
        let m_end = m_start + mins(rs.range(prod.minutes.0, prod.minutes.1));
        sessions.push(SessionPlan { id: sink.ids.session(0), product: prod, s: m_start, e: m_end });
        let target = local_ms(z, s.date, rs.range(810.0, 1020.0));
        let a_start = target.max(m_end + 150 * MIN).min(s.bed - 3 * HOUR);
        let prod = pick_product(&mut rs, p);
        let a_end = a_start + mins(rs.range(prod.minutes.0, prod.minutes.1));
        sessions.push(SessionPlan { id: sink.ids.session(1), product: prod, s: a_start, e: a_end });

        // Nap, mindfulness.
        let mut rd = self.rng(s.date, "day");
        let mut busy: Vec<(i64, i64)> = sessions.iter().map(|x| (x.s, x.e)).collect();
        let nap_p = if weekend { p.nap_prob * 2.0 } else { p.nap_prob };
        let nap_draw = (rd.chance(nap_p), rd.range(810.0, 960.0), rd.range(20.0, 70.0), rd.range(3.0, 8.0), rd.range(1.0, 4.0));
        if nap_draw.0 {
            let ns = local_ms(z, s.date, nap_draw.1);
            let ne = ns + mins(nap_draw.2);
            let clear = sessions.iter().all(|x| overlap(ns, ne, x.s - 15 * MIN, x.e + 15 * MIN) == 0);
            if ns >= s.wake + 4 * HOUR && ne <= s.bed - 4 * HOUR && clear {
                let (a, b) = (ns + mins(nap_draw.3), ne - mins(nap_draw.4));
                let cat = if p.staged_sleep { "core" } else { "asleep_unspecified" };
                stages.push((a, b, cat));
                in_bed.push((ns, ne));
                busy.push((ns, ne));
                if ne <= now {
                    sink.category(&WATCH, "sleep_stage", ns, ne, "in_bed");
                    sink.category(&WATCH, "sleep_stage", a, b, cat);
                }
            }
        }
        let mut calm: Vec<(i64, i64)> = Vec::new();
        let mind_draw = (rd.chance(0.45), rd.range(1170.0, 1290.0), rd.range(5.0, 20.0));
        if p.meditator && mind_draw.0 {
            let ms = local_ms(z, s.date, mind_draw.1);
            let me = ms + mins(mind_draw.2);
            if ms >= s.wake && me <= s.bed - 15 * MIN && busy.iter().all(|&(a, b)| overlap(ms, me, a, b) == 0) {
                busy.push((ms, me));
                calm.push((ms, me));
                sink.category(&WATCH, "mindful", ms, me, "mindful");
            }
        }

        // Activity bouts.
        let bouts = self.bouts(s, weekend, &busy);
        let charge_anchor = bouts.iter().find(|b| b.workout && b.s < s.wake + 2 * HOUR).map_or(s.wake, |b| b.e);
        let charge_s = charge_anchor + mins(rd.range(8.0, 20.0));
        let charge = (charge_s, charge_s + mins(rd.range(35.0, 70.0)));

        // Steps, distance, energy, flights from phone and watch, in their own windows.
        let mut rp = self.rng(s.date, "phone");
        let phone_pieces: Vec<Piece> = bouts
            .iter()
            .filter(|b| b.phone)
            .map(|b| Piece {
                s: b.s,
                e: b.e,
                spm: b.spm * rp.range(0.94, 1.04),
                stride: p.stride_m * b.kind.stride_factor(),
                kcal_per_min: 0.0,
            })
            .collect();
        for (ws, we) in windows(&mut rp, s.wake, s.bed, 10.0, 30.0) {
            let flights = rp.chance(0.1).then(|| rp.int(1, 4) as f64);
            let Some((a, b, steps, dist, _)) = aggregate(&phone_pieces, ws, we) else { continue };
            let steps = steps.round();
            if steps < 1.0 {
                continue;
            }
            sink.value(&PHONE, "steps", a, b, steps, "count");
            sink.value(&PHONE, "distance", a, b, round_to(dist, 1), "m");
            if let Some(f) = flights {
                sink.value(&PHONE, "flights", a, b, f, "count");
            }
        }
        let mut rw = self.rng(s.date, "watch");
        let weight_factor = p.weight_kg / 75.0;
        let mut watch_pieces = Vec::new();
        for b in &bouts {
            let spm = b.spm * rw.range(0.97, 1.03);
            for (a, e) in [(b.s, b.e.min(charge.0)), (b.s.max(charge.1), b.e)] {
                if e > a {
                    let kcal_per_min = b.kind.kcal_per_min() * weight_factor;
                    watch_pieces.push(Piece { s: a, e, spm, stride: p.stride_m * b.kind.stride_factor(), kcal_per_min });
                }
            }
        }
        for (ws, we) in windows(&mut rw, s.wake, s.bed, 10.0, 20.0) {
            let Some((a, b, steps, dist, kcal)) = aggregate(&watch_pieces, ws, we) else { continue };
            let steps = steps.round();
            if steps < 1.0 {
                continue;
            }
            sink.value(&WATCH, "steps", a, b, steps, "count");
            let km = round_to(dist / 1000.0, 4);
            if km > 0.0 {
                sink.value(&WATCH, "distance", a, b, km, "km");
            }
            let kcal = round_to(kcal, 1);
            if kcal > 0.0 {
                sink.value(&WATCH, "active_energy", a, b, kcal, "kcal");
            }
        }
        // The workout app: one energy sample per workout, in kJ, zone as a fixed offset.
        for b in bouts.iter().filter(|b| b.workout) {
            let minutes = (b.e - b.s) as f64 / MIN as f64;
            let kj = round_to(minutes * b.kind.kcal_per_min() * weight_factor * 4.184 * rw.range(0.9, 1.1), 1);
            if p.workout_app && kj > 0.0 {
                let kind = if b.kind == BoutKind::Run { "running" } else { "walking" };
                let g = sink.value(&WORKOUT_APP, "active_energy", b.s, b.e, kj, "kJ");
                g.fixed_offset = true;
                g.meta.push(("workout_type", kind));
            }
        }

        // Heart rate from the watch: every 5 min while worn, every minute during workouts.
        let mut levels: Vec<(i64, i64, Level)> = Vec::new();
        levels.extend(stages.iter().map(|&(a, b, c)| (a, b, Level::Stage(c))));
        levels.extend(bouts.iter().map(|b| (b.s, b.e, Level::Bout(b.kind))));
        levels.extend(in_bed.iter().map(|&(a, b)| (a, b, Level::InBed)));
        levels.extend(calm.iter().map(|&(a, b)| (a, b, Level::Calm)));
        let mut rh = self.rng(s.date, "heart");
        let rhr_today = p.rhr + rh.normal(0.0, 1.5);
        let physio = Physio { rhr: rhr_today, hrv: p.hrv, levels: &levels, bouts: &bouts, sessions: &sessions };
        let worn = |t: i64| !(charge.0..charge.1).contains(&t);
        let mut t = prev_bed.div_euclid(5 * MIN) * 5 * MIN + 5 * MIN;
        while t < s.bed {
            let ts = t + rh.int(0, 40) * SEC;
            let in_workout = bouts.iter().any(|b| b.workout && ts >= b.s && ts < b.e);
            if worn(ts) && !in_workout && ts < s.bed {
                let v = physio.hr(ts, &mut rh);
                sink.value(&WATCH, "heart_rate", ts, ts, v, p.hr_unit);
            }
            t += 5 * MIN;
        }
        for b in bouts.iter().filter(|b| b.workout) {
            let mut t = b.s + 30 * SEC;
            while t < b.e {
                if worn(t) {
                    let v = physio.hr(t, &mut rh);
                    sink.value(&WATCH, "heart_rate", t, t, v, p.hr_unit);
                }
                t += MIN;
            }
        }

        // Night-time vitals: HRV, respiratory rate, SpO2 a few times while asleep.
        let mut rv = self.rng(s.date, "vitals");
        let asleep: Vec<(i64, i64, &'static str)> = night.stages.iter().copied().filter(|x| x.2 != "awake").collect();
        for _ in 0..rv.int(3, 5) {
            if let Some((t, stage)) = pick_time(&mut rv, &asleep) {
                let deep = if stage == "deep" { 6.0 } else { 0.0 };
                let v = round_to((p.hrv * (1.0 + rv.normal(0.0, 0.12)) + deep).clamp(8.0, 250.0), 1);
                sink.value(&WATCH, "hrv_sdnn", t, t, v, "ms");
            }
        }
        for _ in 0..rv.int(3, 5) {
            if let Some((t, _)) = pick_time(&mut rv, &asleep) {
                let v = round_to(rv.normal(14.5, 1.0).clamp(9.0, 22.0), 1);
                sink.value(&WATCH, "respiratory_rate", t, t, v, p.resp_unit);
            }
        }
        for _ in 0..rv.int(3, 5) {
            if let Some((t, _)) = pick_time(&mut rv, &asleep) {
                let pct = rv.normal(96.2, 1.2).clamp(89.0, 100.0).round();
                if p.spo2_fraction {
                    sink.value(&WATCH, "spo2", t, t, round_to(pct / 100.0, 2), "fraction");
                } else {
                    sink.value(&WATCH, "spo2", t, t, pct, "%");
                }
            }
        }
        // Daytime HRV: a random reading, and often one before and one after each session.
        let mut hrv_times = vec![s.wake + mins(rv.range(180.0, 600.0))];
        for x in &sessions {
            let (b, a) = (rv.chance(0.7), rv.chance(0.7));
            let (tb, ta) = (x.s - mins(rv.range(10.0, 45.0)), x.e + mins(rv.range(15.0, 90.0)));
            if b {
                hrv_times.push(tb);
            }
            if a {
                hrv_times.push(ta);
            }
        }
        for t in hrv_times {
            let moving = bouts.iter().any(|b| t >= b.s && t < b.e);
            if t > s.wake && t < s.bed && worn(t) && !moving {
                let v = round_to(physio.hrv_awake(t, &mut rv), 1);
                sink.value(&WATCH, "hrv_sdnn", t, t, v, "ms");
            }
        }
        // Resting heart rate, once a day in the evening.
        let t = s.bed - mins(rv.range(30.0, 90.0));
        let v = (rhr_today + rv.normal(0.0, 1.0)).round().clamp(35.0, 110.0);
        sink.value(&WATCH, "resting_heart_rate", t, t, v, p.hr_unit);
        // Body mass every few days, in the morning.
        let (weigh, wt, noise) = (rv.chance(0.35), rv.range(5.0, 25.0), rv.normal(0.0, 0.25));
        if weigh {
            let t = s.wake + mins(wt);
            let kg = p.weight_kg + 0.6 * (day_number(s.date) as f64 * std::f64::consts::TAU / 11.0).sin() + noise;
            let (v, unit) = if p.mass_lb { (round_to(kg / 0.453_592_37, 1), "lb") } else { (round_to(kg, 1), "kg") };
            let g = sink.value(p.scale, "body_mass", t, t, v, unit);
            if p.scale.name == MANUAL.name {
                g.meta.push(("HKWasUserEntered", "1"));
            }
        }

        // Domain changes: the sessions, their corrections, a source-priority change.
        let mut changes: Vec<(i64, Value)> = Vec::new();
        for (slot, x) in (0u64..).zip(&sessions) {
            let follow = rs.unit();
            let (upd_at, del_at) = (x.e + mins(rs.range(10.0, 180.0)), x.e + mins(rs.range(5.0, 600.0)));
            let other = if p.products.len() > 1 { *rs.pick(&p.products) } else { x.product };
            let shift = mins(rs.range(-10.0, -1.0));
            if x.s > now {
                continue;
            }
            changes.push((
                x.s,
                json!({
                    "change_id": sink.ids.change(slot, 1), "kind": "session_started", "occurred_at": rfc3339(z, x.s),
                    "session": {"session_id": x.id, "product_id": x.product.product_id, "start": rfc3339(z, x.s), "time_zone": z.name()}
                }),
            ));
            if x.e > now {
                continue;
            }
            changes.push((
                x.e,
                json!({
                    "change_id": sink.ids.change(slot, 2), "kind": "session_ended", "occurred_at": rfc3339(z, x.e),
                    "session": {"session_id": x.id, "end": rfc3339(z, x.e)}
                }),
            ));
            if follow < 0.05 && upd_at <= now {
                // The user corrects the product and the start time afterwards.
                let start = x.s + shift;
                changes.push((
                    upd_at,
                    json!({
                        "change_id": sink.ids.change(slot, 3), "kind": "session_updated", "occurred_at": rfc3339(z, upd_at),
                        "session": {"session_id": x.id, "product_id": other.product_id, "start": rfc3339(z, start),
                                    "end": rfc3339(z, x.e), "time_zone": z.name()}
                    }),
                ));
            } else if (0.05..0.08).contains(&follow) && del_at <= now {
                changes.push((
                    del_at,
                    json!({
                        "change_id": sink.ids.change(slot, 4), "kind": "session_deleted", "occurred_at": rfc3339(z, del_at),
                        "session": {"session_id": x.id}
                    }),
                ));
            }
        }
        if priority_update {
            let t = (s.wake + 3 * HOUR).min(now);
            let mut list = vec![PHONE.name, WATCH.name, MANUAL.name];
            if p.scale.name != MANUAL.name {
                list.push(p.scale.name);
            }
            if p.workout_app {
                list.push(WORKOUT_APP.name);
            }
            changes.push((
                t,
                json!({
                    "change_id": sink.ids.change(255, 5), "kind": "source_priority_updated", "occurred_at": rfc3339(z, t),
                    "source_priority": list
                }),
            ));
        }
        changes.sort_by_key(|c| c.0);

        let mut out = sink.out;
        out.retain(|g| g.end <= now);
        out.sort_by(|a, b| (a.start, a.end, a.metric).cmp(&(b.start, b.end, b.metric)));
        DayOut { samples: out, changes: changes.into_iter().map(|c| c.1).collect() }
    }

    /// The day's movement: workout, commutes, lunch walk, weekend walk and many short bouts
    /// around the house or office; none overlaps another, a session, the nap or meditation.
    fn bouts(&self, s: &Sched, weekend: bool, busy: &[(i64, i64)]) -> Vec<Bout> {
        let p = self.p;
        let z = s.zone;
        let mut r = self.rng(s.date, "activity");
        let mut cands: Vec<(i64, f64, BoutKind, bool, f64)> = Vec::new(); // start, minutes, kind, workout, phone p
        let workout = r.chance(p.workout_prob);
        let morning = r.chance(0.4);
        let (wk, wmin, wphone) =
            if p.runner { (BoutKind::Run, r.range(25.0, 60.0), 0.35) } else { (BoutKind::Brisk, r.range(30.0, 75.0), 0.7) };
        let wstart = if morning { s.wake + mins(r.range(15.0, 40.0)) } else { local_ms(z, s.date, r.range(1065.0, 1170.0)) };
        if workout {
            cands.push((wstart, wmin, wk, true, wphone));
        }
        let commute =
            (s.wake + mins(r.range(60.0, 100.0)), r.range(12.0, 25.0), local_ms(z, s.date, r.range(1020.0, 1125.0)), r.range(12.0, 25.0));
        if !weekend && p.commuter {
            cands.push((commute.0, commute.1, BoutKind::Walk, false, 0.97));
            cands.push((commute.2, commute.3, BoutKind::Walk, false, 0.97));
        }
        let lunch = (r.chance(0.7), local_ms(z, s.date, r.range(720.0, 810.0)), r.range(10.0, 30.0));
        if !weekend && p.lunch_walker && lunch.0 {
            cands.push((lunch.1, lunch.2, BoutKind::Walk, false, 0.97));
        }
        let long = (r.chance(0.5), local_ms(z, s.date, r.range(840.0, 1020.0)), r.range(30.0, 90.0));
        if weekend && long.0 {
            cands.push((long.1, long.2, BoutKind::Walk, false, 0.97));
        }
        let span = (s.bed - s.wake) as f64 / MIN as f64;
        for _ in 0..r.int(10, 22) {
            let start = s.wake + mins(r.range(0.0, span));
            cands.push((start, r.range(1.0, 6.0), BoutKind::Micro, false, p.phone_carry));
        }
        let mut bouts: Vec<Bout> = Vec::new();
        for (start, minutes, kind, workout, phone_p) in cands {
            let e = start + mins(minutes);
            let phone = r.chance(phone_p);
            let spm = kind.spm() * r.range(0.92, 1.08);
            let inside = start >= s.wake + 3 * MIN && e <= s.bed - 10 * MIN;
            let free = busy.iter().all(|&(a, b)| overlap(start, e, a - 2 * MIN, b + 2 * MIN) == 0)
                && bouts.iter().all(|b| overlap(start, e, b.s - MIN, b.e + MIN) == 0);
            if inside && free {
                bouts.push(Bout { s: start, e, kind, spm, phone, workout });
            }
        }
        bouts.sort_by_key(|b| b.s);
        bouts
    }
}

fn pick_product(r: &mut Rng, p: &Person) -> &'static ProductDef {
    if r.chance(0.5) {
        p.products[0]
    } else {
        p.products[r.int(0, p.products.len() as i64 - 1) as usize]
    }
}

/// Consecutive recording windows of random length covering `[from, to)`.
fn windows(r: &mut Rng, from: i64, to: i64, lo_min: f64, hi_min: f64) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut t = from;
    while t < to {
        let e = (t + mins(r.range(lo_min, hi_min))).min(to);
        out.push((t, e));
        t = e;
    }
    out
}

/// What a device records for one window: the span of movement inside it, steps, metres, kcal.
fn aggregate(pieces: &[Piece], ws: i64, we: i64) -> Option<(i64, i64, f64, f64, f64)> {
    let mut span: Option<(i64, i64)> = None;
    let (mut steps, mut dist, mut kcal) = (0.0, 0.0, 0.0);
    for pc in pieces {
        let ov = overlap(pc.s, pc.e, ws, we);
        if ov <= 0 {
            continue;
        }
        let (a, b) = (pc.s.max(ws), pc.e.min(we));
        span = Some(span.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
        let m = ov as f64 / MIN as f64;
        steps += m * pc.spm;
        dist += m * pc.spm * pc.stride;
        kcal += m * pc.kcal_per_min;
    }
    span.map(|(a, b)| (a, b, steps, dist, kcal))
}

/// A uniformly random whole-second instant within the given intervals, and its label.
fn pick_time(r: &mut Rng, spans: &[(i64, i64, &'static str)]) -> Option<(i64, &'static str)> {
    let total: i64 = spans.iter().map(|x| x.1 - x.0).sum();
    if total <= 0 {
        return None;
    }
    let mut u = (r.unit() * total as f64) as i64;
    for &(a, b, label) in spans {
        if u < b - a {
            return Some(((a + u).div_euclid(SEC) * SEC, label));
        }
        u -= b - a;
    }
    None
}

/// Heart rate and HRV as functions of what the person is doing.
struct Physio<'a> {
    rhr: f64,
    hrv: f64,
    levels: &'a [(i64, i64, Level)],
    bouts: &'a [Bout],
    sessions: &'a [SessionPlan],
}

impl Physio<'_> {
    fn level(&self, t: i64) -> Option<Level> {
        self.levels.iter().find(|l| t >= l.0 && t < l.1).map(|l| l.2)
    }

    /// The effect of consumption sessions at `t` as a fraction of the product's peak: half
    /// during the session, full at its end, fading over 150 min.
    fn session_effect(&self, t: i64, pick: impl Fn(&ProductDef) -> f64) -> f64 {
        let mut v = 0.0;
        for x in self.sessions {
            if t >= x.s && t < x.e {
                v += 0.5 * pick(x.product);
            } else if t >= x.e && t < x.e + 150 * MIN {
                v += pick(x.product) * (1.0 - (t - x.e) as f64 / (150 * MIN) as f64);
            }
        }
        v
    }

    fn hr(&self, t: i64, r: &mut Rng) -> f64 {
        let rhr = self.rhr;
        let (base, sd) = match self.level(t) {
            Some(Level::Stage("deep")) => (rhr - 6.0, 1.5),
            Some(Level::Stage("rem")) => (rhr + 2.0, 2.0),
            Some(Level::Stage("awake")) => (rhr + 7.0, 2.5),
            Some(Level::Stage(_)) => (rhr - 3.0, 1.5),
            Some(Level::InBed) => (rhr + 5.0, 2.0),
            Some(Level::Calm) => (rhr + 4.0, 2.0),
            Some(Level::Bout(k)) => (rhr + k.hr_boost(), 5.0),
            None => (rhr + 16.0, 4.0),
        };
        // Recovery: elevated for 15 min after a bout.
        let mut recovery: f64 = 0.0;
        for b in self.bouts {
            if t >= b.e && t < b.e + 15 * MIN {
                recovery = recovery.max(0.5 * b.kind.hr_boost() * (1.0 - (t - b.e) as f64 / (15 * MIN) as f64));
            }
        }
        let v = base + recovery + self.session_effect(t, |p| p.hr_delta) + r.normal(0.0, sd);
        v.round().clamp(38.0, 195.0)
    }

    fn hrv_awake(&self, t: i64, r: &mut Rng) -> f64 {
        (self.hrv * 0.85 * (1.0 + r.normal(0.0, 0.1)) + self.session_effect(t, |p| p.hrv_delta)).clamp(8.0, 250.0)
    }
}

/// The watch's sleep record of one night: one `in_bed` span (two if the person got up for a while),
/// sleep cycles of core → deep → core → REM (deep shrinking and REM growing through the night),
/// one to three awakenings of 5–15 min plus brief ones, and sometimes a second period after a gap
/// of more than 30 min.
fn sleep_night(r: &mut Rng, staged: bool, start: i64, wake: i64) -> Night {
    let onset = start + mins(r.range(5.0, 25.0));
    let final_wake = wake - mins(r.range(2.0, 12.0));
    let split = r.chance(0.15);
    let gap = mins(r.range(40.0, 75.0));
    let tail = mins(r.range(50.0, 110.0));
    let mut periods = Vec::new();
    let mut in_bed = Vec::new();
    if split && final_wake - onset > 6 * HOUR {
        let (g1, g2) = (final_wake - tail - gap, final_wake - tail);
        periods.push((onset, g1));
        periods.push((g2, final_wake));
        in_bed.push((start, g1 + 2 * MIN));
        in_bed.push((g2 - 3 * MIN, wake));
    } else {
        periods.push((onset, final_wake));
        in_bed.push((start, wake));
    }
    let mut stages: Vec<(i64, i64, &'static str)> = Vec::new();
    let mut awakenings = r.int(1, 3);
    let mut cycle = 0.0;
    for (ps, pe) in periods {
        let mut t = ps;
        while t < pe {
            let mut seq: Vec<(&'static str, f64)> = if staged {
                vec![
                    ("core", r.range(15.0, 35.0)),
                    ("deep", (r.range(25.0, 45.0) - 10.0 * cycle).max(0.0)),
                    ("core", r.range(8.0, 20.0)),
                    ("rem", (r.range(5.0, 15.0) + 7.0 * cycle).min(45.0)),
                ]
            } else {
                vec![("asleep_unspecified", r.range(80.0, 110.0))]
            };
            if awakenings > 0 && cycle >= 1.0 && r.chance(0.5) {
                seq.push(("awake", r.range(5.0, 15.0)));
                awakenings -= 1;
            } else if r.chance(0.3) {
                seq.push(("awake", r.range(1.0, 3.0)));
            }
            for (cat, m) in seq {
                if m < 1.0 || t >= pe {
                    continue;
                }
                let e = (t + mins(m)).min(pe);
                match stages.last_mut() {
                    // A sliver at the end of the period, or the same stage again (no deep sleep
                    // late in the night), extends the stage before it.
                    Some(last) if last.1 == t && (e - t < MIN || last.2 == cat) => last.1 = e,
                    _ => stages.push((t, e, cat)),
                }
                t = e;
            }
            cycle += 1.0;
        }
    }
    Night { stages, in_bed }
}
