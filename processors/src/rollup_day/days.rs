//! `rollup_day`'s compact state: one value per (metric, local date) holding the effective samples
//! that count on it (only what the aggregation reads), and one small value per identity saying
//! which version it is at, what deletions removed and where its sample is held.
//!
//! Binary, versioned by a leading byte: a value of another format fails the task (it is never
//! read as "nothing held"). Strings that repeat within a day (source, time zone, category) are
//! written once per day; a canonical UUID record id (lowercase, or uppercase as HealthKit
//! writes it) takes 16 bytes.

use std::collections::BTreeMap;
use std::rc::Rc;

use chrono::NaiveDate;
use vitals_schemas::SourceKind;

use crate::codec::{kind_code, kind_of, R, W};
use crate::identity::{name, read_name, Deleted, METRICS};
use crate::keys::parse_uuid;
#[cfg(test)]
use crate::keys::{uuid_bytes, uuid_bytes_upper, uuid_text, uuid_text_upper};

/// 2: a canonical uppercase UUID record id (HealthKit's form) takes 16 bytes too (1 kept it as
/// text).
const DAY_FORMAT: u8 = 2;
/// 2: the metric of `at` as an [`METRICS`] code (1 wrote its name).
const ID_FORMAT: u8 = 2;

/// One effective sample as a day holds it (the identity is the map key).
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub kind: SourceKind,
    pub start_ms: i64,
    pub end_ms: i64,
    pub value: f64,
    pub category: Option<Rc<str>>,
    pub time_zone: Rc<str>,
}

/// An interned source name as a day's key holds it: ordered by its text, but the same
/// interned `Rc` (what nearly every comparison in a day meets) is equal without reading it.
#[derive(Debug, Clone)]
pub struct Src(pub Rc<str>);

impl std::ops::Deref for Src {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq for Src {
    fn eq(&self, o: &Src) -> bool {
        Rc::ptr_eq(&self.0, &o.0) || *self.0 == *o.0
    }
}
impl Eq for Src {}
impl PartialOrd for Src {
    fn partial_cmp(&self, o: &Src) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Src {
    fn cmp(&self, o: &Src) -> std::cmp::Ordering {
        if Rc::ptr_eq(&self.0, &o.0) {
            return std::cmp::Ordering::Equal;
        }
        (*self.0).cmp(&*o.0)
    }
}

/// A record id as a day's key holds it: a canonical UUID by its 16 bytes and case (no text
/// kept, no allocation), any other id as text. Equal and ordered exactly as the id's text is
/// (within one case a UUID's bytes order as its text does), so a day's order is unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rec {
    /// The bytes and whether the text is uppercase (it has a letter, all uppercase).
    Uuid([u8; 16], bool),
    /// Not a canonical UUID.
    Text(String),
}

impl Rec {
    /// `record`'s form, from its [`parse_uuid`] (`parsed` must be it).
    pub fn of(record: &str, parsed: Option<([u8; 16], bool)>) -> Rec {
        match parsed {
            Some((b, upper)) => Rec::Uuid(b, upper),
            None => Rec::Text(record.to_owned()),
        }
    }

    pub fn parse(record: &str) -> Rec {
        Rec::of(record, parse_uuid(record))
    }

    /// The id's text, written into `buf` when it is a UUID.
    pub fn text<'a>(&'a self, buf: &'a mut [u8; 36]) -> &'a str {
        match self {
            Rec::Text(t) => t,
            Rec::Uuid(b, upper) => {
                let hex: &[u8; 16] = if *upper { b"0123456789ABCDEF" } else { b"0123456789abcdef" };
                let mut j = 0;
                for (i, x) in b.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        buf[j] = b'-';
                        j += 1;
                    }
                    buf[j] = hex[(x >> 4) as usize];
                    buf[j + 1] = hex[(x & 15) as usize];
                    j += 2;
                }
                std::str::from_utf8(&buf[..]).expect("ASCII")
            }
        }
    }

    pub fn to_text(&self) -> String {
        self.text(&mut [0; 36]).to_owned()
    }
}

impl PartialOrd for Rec {
    fn partial_cmp(&self, o: &Rec) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Rec {
    fn cmp(&self, o: &Rec) -> std::cmp::Ordering {
        match (self, o) {
            (Rec::Uuid(a, ua), Rec::Uuid(b, ub)) if ua == ub => a.cmp(b),
            (Rec::Text(a), Rec::Text(b)) => a.cmp(b),
            _ => self.text(&mut [0; 36]).cmp(o.text(&mut [0; 36])),
        }
    }
}

/// A UUID's bytes as uppercase text have a letter (without one it is the lowercase form).
fn has_letter(b: &[u8]) -> bool {
    b.iter().any(|x| x >> 4 >= 10 || x & 15 >= 10)
}

/// One (metric, date), decoded: its samples by (source, source_record_id) — the order the
/// aggregation adds them in — and whether a row of it is out (so an empty day is retracted).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Day {
    pub emitted: bool,
    pub samples: BTreeMap<(Src, Rec), Held>,
}

/// What is held per identity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    /// The highest version seen as an upsert.
    pub version: Option<i64>,
    pub deleted: Option<Deleted>,
    /// Where its sample is held while it is effective: metric, first date, number of dates.
    pub at: Option<(String, NaiveDate, u8)>,
}

impl Identity {
    /// Whether a sample of `version` would count given the deletions seen.
    pub fn counts(&self, version: i64) -> bool {
        match self.deleted {
            Some(Deleted::All) => false,
            Some(Deleted::UpTo(v)) => version > v,
            None => true,
        }
    }
}

/// Interns the strings of one day while encoding, in order of first use. A day holds a handful
/// of distinct strings (its sources, zones and categories), so a list beats a hash map; the
/// decoded days share interned `Rc`s, so most lookups end at a pointer comparison.
#[derive(Default)]
struct Dict<'a> {
    names: Vec<&'a str>,
}

impl<'a> Dict<'a> {
    fn id(&mut self, s: &'a str) -> u64 {
        if let Some(i) = self.names.iter().position(|n| std::ptr::eq(*n, s)) {
            return i as u64;
        }
        if let Some(i) = self.names.iter().position(|n| *n == s) {
            return i as u64;
        }
        self.names.push(s);
        (self.names.len() - 1) as u64
    }
}

impl Day {
    pub fn encode(&self) -> Vec<u8> {
        // The dictionary first (same order of first use as the body below), so the value is
        // written into one buffer.
        let mut dict = Dict::default();
        for ((source, _), h) in &self.samples {
            dict.id(source);
            dict.id(&h.time_zone);
            if let Some(c) = h.category.as_deref() {
                dict.id(c);
            }
        }
        let names: usize = dict.names.iter().map(|n| n.len() + 2).sum();
        let mut body = W(Vec::with_capacity(8 + names + self.samples.len() * 34));
        body.0.push(DAY_FORMAT);
        body.0.push(u8::from(self.emitted));
        body.u(dict.names.len() as u64);
        for n in &dict.names {
            body.s(n);
        }
        body.u(self.samples.len() as u64);
        for ((source, record), h) in &self.samples {
            body.u(dict.id(source));
            // Tag bits: 0x10 a UUID's 16 bytes follow, 0x20 (with 0x10) it is uppercase.
            match record {
                Rec::Uuid(b, upper) => {
                    body.0.push(kind_code(h.kind) | if *upper { 0x30 } else { 0x10 });
                    body.0.extend_from_slice(b);
                }
                Rec::Text(t) => {
                    body.0.push(kind_code(h.kind));
                    body.s(t);
                }
            }
            body.u(dict.id(&h.time_zone));
            body.u(h.category.as_deref().map_or(0, |c| dict.id(c) + 1));
            body.i(h.start_ms);
            body.i(h.end_ms - h.start_ms);
            body.0.extend_from_slice(&h.value.to_le_bytes());
        }
        body.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Day, String> {
        let mut r = R(bytes);
        let f = r.byte()?;
        if f != DAY_FORMAT {
            return Err(format!("day value of format {f}, this build reads {DAY_FORMAT}"));
        }
        let emitted = r.byte()? != 0;
        let n = r.u()? as usize;
        let mut dict: Vec<Rc<str>> = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            dict.push(Rc::from(r.s()?));
        }
        let at = |i: u64| dict.get(i as usize).cloned().ok_or_else(|| format!("string {i} of {}", dict.len()));
        let mut samples = BTreeMap::new();
        for _ in 0..r.u()? {
            let source = at(r.u()?)?;
            let tag = r.byte()?;
            let record = match tag & 0xf0 {
                // (A UUID written as text, or uppercase without a letter, reads as the form
                // the encoder writes, as its text always did.)
                0x00 => Rec::parse(r.s()?),
                0x10 => Rec::Uuid(r.take(16)?.try_into().map_err(|_| "truncated")?, false),
                0x30 => {
                    let b: [u8; 16] = r.take(16)?.try_into().map_err(|_| "truncated")?;
                    Rec::Uuid(b, has_letter(&b))
                }
                _ => return Err(format!("sample tag {tag:#04x}")),
            };
            let kind = kind_of(tag & 0x0f)?;
            let time_zone = at(r.u()?)?;
            let category = match r.u()? {
                0 => None,
                c => Some(at(c - 1)?),
            };
            let start_ms = r.i()?;
            let end_ms = start_ms + r.i()?;
            let value = f64::from_le_bytes(r.take(8)?.try_into().map_err(|_| "truncated")?);
            samples.insert((Src(source), record), Held { kind, start_ms, end_ms, value, category, time_zone });
        }
        if !r.0.is_empty() {
            return Err("trailing bytes".into());
        }
        Ok(Day { emitted, samples })
    }
}

impl Identity {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(24));
        w.0.push(ID_FORMAT);
        match self.version {
            None => w.0.push(0),
            Some(v) => {
                w.0.push(1);
                w.i(v);
            }
        }
        match self.deleted {
            None => w.0.push(0),
            Some(Deleted::All) => w.0.push(1),
            Some(Deleted::UpTo(v)) => {
                w.0.push(2);
                w.i(v);
            }
        }
        match &self.at {
            None => w.0.push(0),
            Some((metric, date, n)) => {
                w.0.push(1);
                name(&mut w, &METRICS, metric);
                w.i(i64::from(chrono::Datelike::num_days_from_ce(date)));
                w.0.push(*n);
            }
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Identity, String> {
        let mut r = R(bytes);
        let f = r.byte()?;
        if f != ID_FORMAT {
            return Err(format!("identity value of format {f}, this build reads {ID_FORMAT}"));
        }
        let version = match r.byte()? {
            0 => None,
            _ => Some(r.i()?),
        };
        let deleted = match r.byte()? {
            0 => None,
            1 => Some(Deleted::All),
            _ => Some(Deleted::UpTo(r.i()?)),
        };
        let at = match r.byte()? {
            0 => None,
            _ => {
                let metric = read_name(&mut r, &METRICS)?;
                let days = i32::try_from(r.i()?).map_err(|e| e.to_string())?;
                let date = NaiveDate::from_num_days_from_ce_opt(days).ok_or("date out of range")?;
                Some((metric, date, r.byte()?))
            }
        };
        if !r.0.is_empty() {
            return Err("trailing bytes".into());
        }
        Ok(Identity { version, deleted, at })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn held() -> impl Strategy<Value = Held> {
        (0u8..4, any::<i64>().prop_map(|x| x / 4), 0i64..10_000_000, any::<f64>(), proptest::option::of("[a-z]{0,6}"), "[A-Za-z/_+:0-9]{0,20}").prop_map(|(k, start_ms, d, value, category, tz)| Held {
            kind: kind_of(k).unwrap(),
            start_ms,
            end_ms: start_ms + d,
            value,
            category: category.map(Rc::from),
            time_zone: Rc::from(tz.as_str()),
        })
    }

    fn record() -> impl Strategy<Value = String> {
        prop_oneof![any::<[u8; 16]>().prop_map(|b| uuid_text(&b)), any::<[u8; 16]>().prop_map(|b| uuid_text_upper(&b)), ".{0,40}", "[0-9A-F-]{36}", "[0-9a-fA-F-]{36}"]
    }

    proptest! {
        /// A day's key orders and equates record ids exactly as their text does (the day's order,
        /// and so every aggregate, must not move with the key's form).
        #[test]
        fn a_record_key_orders_and_equates_as_its_text(a in record(), b in record(), digits in "[0-9]{8}-[0-9]{4}-[0-9]{4}-[0-9]{4}-[0-9]{12}") {
            for (x, y) in [(&a, &b), (&a, &a), (&digits, &b), (&a, &digits), (&digits, &digits.to_uppercase())] {
                let (rx, ry) = (Rec::parse(x), Rec::parse(y));
                prop_assert_eq!(rx.cmp(&ry), x.cmp(y), "{} vs {}", x, y);
                prop_assert_eq!(rx == ry, x == y, "{} vs {}", x, y);
                prop_assert_eq!(rx.to_text(), x.clone());
            }
        }

        #[test]
        fn a_day_round_trips(emitted in any::<bool>(), items in proptest::collection::vec((".{0,12}", record(), held()), 0..30)) {
            let day = Day { emitted, samples: items.into_iter().map(|(s, r, h)| ((Src(Rc::from(s.as_str())), Rec::parse(&r)), h)).collect() };
            let back = Day::decode(&day.encode()).unwrap();
            // NaN != NaN: compare the bits.
            prop_assert_eq!(back.emitted, day.emitted);
            prop_assert_eq!(back.samples.len(), day.samples.len());
            for ((k, a), (k2, b)) in day.samples.iter().zip(back.samples.iter()) {
                prop_assert_eq!(k, k2);
                prop_assert_eq!((a.kind, a.start_ms, a.end_ms, a.value.to_bits(), &a.category, &a.time_zone), (b.kind, b.start_ms, b.end_ms, b.value.to_bits(), &b.category, &b.time_zone));
            }
        }

        #[test]
        fn an_identity_round_trips(version in proptest::option::of(any::<i64>()), del in 0u8..3, upto in any::<i64>(), at in proptest::option::of(("[a-z_]{1,20}", -100_000i32..3_000_000, any::<u8>()))) {
            let deleted = match del { 0 => None, 1 => Some(Deleted::All), _ => Some(Deleted::UpTo(upto)) };
            let at = at.and_then(|(m, d, n)| NaiveDate::from_num_days_from_ce_opt(d).map(|d| (m, d, n)));
            let id = Identity { version, deleted, at };
            prop_assert_eq!(Identity::decode(&id.encode()).unwrap(), id);
        }

        #[test]
        fn garbage_is_refused_never_misread(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Whatever it returns, it does not panic; a foreign format byte is refused.
            let _ = Day::decode(&bytes);
            let _ = Identity::decode(&bytes);
            if bytes.first().is_some_and(|b| *b != DAY_FORMAT) {
                prop_assert!(Day::decode(&bytes).is_err());
            }
        }
    }

    #[test]
    fn uuid_text_order_is_byte_order() {
        let a = "0a1b2c3d-0000-4000-8000-00000000000f";
        let b = "f0000000-0000-4000-8000-000000000000";
        assert_eq!(uuid_text(&uuid_bytes(a).unwrap()), a);
        assert!(a < b && uuid_bytes(a).unwrap() < uuid_bytes(b).unwrap());
        assert!(uuid_bytes("0A1B2C3D-0000-4000-8000-00000000000F").is_none(), "uppercase is not lowercase (it would not round-trip)");
        let upper = "0A1B2C3D-0000-4000-8000-00000000000F";
        assert_eq!(uuid_text_upper(&uuid_bytes_upper(upper).unwrap()), upper);
    }
}
