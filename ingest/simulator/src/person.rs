//! Who a simulated person is: home zone, habits, physiology, devices and the products they
//! consume. Drawn once per user from `(seed, user id)`.

use chrono::NaiveDate;
use chrono_tz::Tz;

use super::rng::{hash, Rng};

/// A data source: the `source` string and its `source_kind`.
#[derive(Debug, PartialEq, Eq)]
pub struct Source {
    pub name: &'static str,
    pub kind: &'static str,
}

/// The iPhone's built-in pedometer.
pub const PHONE: Source = Source { name: "com.apple.health.iphone", kind: "phone" };
/// The watch: steps, distance, energy, heart rate, sleep, mindfulness.
pub const WATCH: Source = Source { name: "com.apple.health.watch", kind: "watch" };
/// A third-party workout app writing active energy in kJ with fixed-offset zones (Health Connect style).
pub const WORKOUT_APP: Source = Source { name: "com.strava", kind: "third_party" };
/// A connected scale.
pub const SCALE: Source = Source { name: "com.withings.wiscale2", kind: "third_party" };
/// Manual entries in the Health app.
pub const MANUAL: Source = Source { name: "com.apple.Health", kind: "manual" };

/// Home zones; user `i` lives in `HOME_ZONES[i % HOME_ZONES.len()]` (so tests know who has DST).
pub const HOME_ZONES: [Tz; 8] = [
    chrono_tz::Europe::Berlin,
    chrono_tz::America::New_York,
    chrono_tz::Asia::Tokyo,
    chrono_tz::Europe::London,
    chrono_tz::America::Los_Angeles,
    chrono_tz::Australia::Sydney,
    chrono_tz::Asia::Kolkata,
    chrono_tz::America::Sao_Paulo,
];

/// A consumable product and its (simulated) physiological effect, so tests of `session_impact`
/// and `product_impact` know which sign to expect.
#[derive(Debug, PartialEq)]
pub struct ProductDef {
    pub product_id: &'static str,
    pub name: &'static str,
    pub category: &'static str,
    /// Heart-rate change at the peak (just after the session ends), bpm.
    pub hr_delta: f64,
    /// HRV (SDNN) change at the peak, ms.
    pub hrv_delta: f64,
    /// Session duration range, minutes.
    pub minutes: (f64, f64),
}

pub const PRODUCTS: [ProductDef; 6] = [
    ProductDef {
        product_id: "prod-espresso",
        name: "Double espresso",
        category: "coffee",
        hr_delta: 7.0,
        hrv_delta: -9.0,
        minutes: (3.0, 15.0),
    },
    ProductDef {
        product_id: "prod-filter-coffee",
        name: "Filter coffee",
        category: "coffee",
        hr_delta: 5.0,
        hrv_delta: -6.0,
        minutes: (10.0, 40.0),
    },
    ProductDef { product_id: "prod-green-tea", name: "Green tea", category: "tea", hr_delta: 2.0, hrv_delta: -2.0, minutes: (10.0, 35.0) },
    ProductDef {
        product_id: "prod-energy-drink",
        name: "Energy drink 250 ml",
        category: "energy_drink",
        hr_delta: 11.0,
        hrv_delta: -13.0,
        minutes: (5.0, 30.0),
    },
    ProductDef {
        product_id: "prod-nicotine-pouch",
        name: "Nicotine pouch 6 mg",
        category: "nicotine",
        hr_delta: 9.0,
        hrv_delta: -11.0,
        minutes: (20.0, 45.0),
    },
    ProductDef {
        product_id: "prod-chamomile",
        name: "Chamomile tea",
        category: "herbal_tea",
        hr_delta: -2.0,
        hrv_delta: 4.0,
        minutes: (10.0, 30.0),
    },
];

/// The product with this id.
pub fn product(product_id: &str) -> Option<&'static ProductDef> {
    PRODUCTS.iter().find(|p| p.product_id == product_id)
}

#[derive(Debug)]
pub(crate) struct Person {
    pub user: String,
    pub home: Tz,
    /// Minutes later (or earlier) than the average sleeper.
    pub chronotype_min: f64,
    pub rhr: f64,
    pub hrv: f64,
    pub weight_kg: f64,
    pub stride_m: f64,
    pub hr_unit: &'static str,
    pub resp_unit: &'static str,
    pub spo2_fraction: bool,
    pub mass_lb: bool,
    pub scale: &'static Source,
    pub commuter: bool,
    pub lunch_walker: bool,
    pub workout_prob: f64,
    pub runner: bool,
    pub workout_app: bool,
    pub meditator: bool,
    pub nap_prob: f64,
    /// Newer watches record core/deep/rem; older ones only `asleep_unspecified`.
    pub staged_sleep: bool,
    /// Probability, per week, of a trip to another zone.
    pub trip_prob: f64,
    pub phone_carry: f64,
    pub products: Vec<&'static ProductDef>,
    /// Sends one `source_priority_updated` (phone before watch) in the middle of the history.
    pub priority_update: bool,
}

impl Person {
    pub(crate) fn new(seed: u64, user: &str, index: usize) -> Person {
        let mut r = Rng::new(hash(seed, &[user.as_bytes(), b"person"]));
        let home = HOME_ZONES[index % HOME_ZONES.len()];
        let mut order: Vec<usize> = (0..PRODUCTS.len()).collect();
        for i in (1..order.len()).rev() {
            let j = r.int(0, i as i64) as usize;
            order.swap(i, j);
        }
        let n_products = r.int(2, 4) as usize;
        let us = home == chrono_tz::America::New_York || home == chrono_tz::America::Los_Angeles;
        Person {
            user: user.to_owned(),
            home,
            chronotype_min: r.range(-45.0, 60.0),
            rhr: r.range(50.0, 72.0),
            hrv: r.range(28.0, 75.0),
            weight_kg: r.range(52.0, 105.0),
            stride_m: r.range(0.66, 0.80),
            hr_unit: if r.chance(0.3) { "bpm" } else { "count/min" },
            resp_unit: if r.chance(0.5) { "breaths/min" } else { "count/min" },
            spo2_fraction: r.chance(0.4),
            mass_lb: if us { r.chance(0.85) } else { r.chance(0.05) },
            scale: if r.chance(0.6) { &SCALE } else { &MANUAL },
            commuter: r.chance(0.7),
            lunch_walker: r.chance(0.5),
            workout_prob: r.range(0.0, 0.5),
            runner: r.chance(0.5),
            workout_app: r.chance(0.35),
            meditator: r.chance(0.3),
            nap_prob: r.range(0.0, 0.25),
            staged_sleep: r.chance(0.9),
            trip_prob: if r.chance(0.4) { 0.35 } else { 0.0 },
            phone_carry: r.range(0.55, 0.95),
            products: order.into_iter().take(n_products).map(|i| &PRODUCTS[i]).collect(),
            priority_update: r.chance(0.35),
        }
    }

    /// The zone the person is in on `date`: home, or a trip's destination. Trips are drawn per
    /// week (absolute, so a date's zone does not depend on the simulated history).
    pub(crate) fn zone_on(&self, seed: u64, date: NaiveDate) -> Tz {
        if self.trip_prob <= 0.0 {
            return self.home;
        }
        let day = super::day::day_number(date);
        let week = day.div_euclid(7);
        for w in [week - 1, week] {
            let mut r = Rng::new(hash(seed, &[self.user.as_bytes(), b"trip", &w.to_le_bytes()]));
            if !r.chance(self.trip_prob) {
                continue;
            }
            let start = w * 7 + r.int(0, 4);
            let len = r.int(3, 6);
            let others: Vec<Tz> = HOME_ZONES.iter().copied().filter(|z| *z != self.home).collect();
            let dest = *r.pick(&others);
            if (start..start + len).contains(&day) {
                return dest;
            }
        }
        self.home
    }
}
