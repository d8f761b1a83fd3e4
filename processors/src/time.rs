//! Local time in a sample's own zone: local dates and the bounds of a local day, which is 23, 24
//! or 25 hours long. Zones are IANA names, `UTC`/`Z`, or fixed offsets `±HH:MM` (as the edge
//! accepts them).

use chrono::{DateTime, Duration, FixedOffset, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;

/// A parsed zone.
#[derive(Debug, Clone, Copy)]
pub enum Zone {
    Named(Tz),
    Fixed(FixedOffset),
}

impl Zone {
    /// Parses a zone the edge accepted; anything else is treated as UTC (the edge never lets one through).
    pub fn parse(s: &str) -> Zone {
        if let Ok(tz) = s.parse::<Tz>() {
            return Zone::Named(tz);
        }
        let b = s.as_bytes();
        if b.len() == 6 && (b[0] == b'+' || b[0] == b'-') && b[3] == b':' {
            if let (Ok(h), Ok(m)) = (s[1..3].parse::<i32>(), s[4..6].parse::<i32>()) {
                let secs = (h * 3600 + m * 60) * if b[0] == b'-' { -1 } else { 1 };
                if let Some(o) = FixedOffset::east_opt(secs) {
                    return Zone::Fixed(o);
                }
            }
        }
        Zone::Fixed(Utc.fix())
    }

    /// The local date of the instant `ms` in this zone.
    pub fn local_date(&self, ms: i64) -> NaiveDate {
        let utc = DateTime::from_timestamp_millis(ms).unwrap_or_default().naive_utc();
        match self {
            Zone::Named(tz) => tz.from_utc_datetime(&utc).date_naive(),
            Zone::Fixed(o) => o.from_utc_datetime(&utc).date_naive(),
        }
    }

    /// The first instant (ms) at or after local midnight of `date`. Where midnight does not exist
    /// (a DST gap at 00:00), the day starts at the first local time that does.
    pub fn day_start_ms(&self, date: NaiveDate) -> i64 {
        let mut local: NaiveDateTime = date.and_hms_opt(0, 0, 0).expect("midnight exists");
        for _ in 0..4 {
            let r = match self {
                Zone::Named(tz) => map(tz.from_local_datetime(&local)),
                Zone::Fixed(o) => map(o.from_local_datetime(&local)),
            };
            if let Some(ms) = r {
                return ms;
            }
            local += Duration::minutes(30);
        }
        // Unreachable for real zones; fall back to UTC midnight.
        Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight exists")).timestamp_millis()
    }

    /// `[start, end)` of the local day `date`, in ms.
    pub fn day_bounds(&self, date: NaiveDate) -> (i64, i64) {
        (self.day_start_ms(date), self.day_start_ms(date.succ_opt().unwrap_or(date)))
    }
}

fn map<T: TimeZone>(r: LocalResult<DateTime<T>>) -> Option<i64> {
    match r {
        LocalResult::Single(t) => Some(t.timestamp_millis()),
        // Midnight happens twice: the day starts at the first.
        LocalResult::Ambiguous(a, _) => Some(a.timestamp_millis()),
        LocalResult::None => None,
    }
}

/// The local dates `[start, end)` touches in `zone` (the start's date for an instant), at most `cap`.
pub fn dates_covered(zone: &Zone, start: i64, end: i64, cap: usize) -> Vec<NaiveDate> {
    let (first, n) = date_span(zone, start, end, cap);
    std::iter::successors(Some(first), |d| Some(d.succ_opt().unwrap_or(*d))).take(n).collect()
}

/// [`dates_covered`] without a vector: the first date and how many (the first and its
/// successors).
pub fn date_span(zone: &Zone, start: i64, end: i64, cap: usize) -> (NaiveDate, usize) {
    let first = zone.local_date(start);
    if end <= start {
        return (first, 1);
    }
    let last = zone.local_date(end - 1);
    let (mut d, mut n) = (first, 1);
    while d < last && n < cap {
        d = d.succ_opt().unwrap_or(d);
        n += 1;
    }
    (first, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn dst_days_are_23_and_25_hours() {
        let berlin = Zone::parse("Europe/Berlin");
        let (a, b) = berlin.day_bounds(day("2026-03-29"));
        assert_eq!(b - a, 23 * 3600 * 1000);
        let (a, b) = berlin.day_bounds(day("2026-10-25"));
        assert_eq!(b - a, 25 * 3600 * 1000);
        let (a, b) = berlin.day_bounds(day("2026-07-01"));
        assert_eq!(b - a, 24 * 3600 * 1000);
    }

    #[test]
    fn fixed_offsets_and_dates() {
        let plus2 = Zone::parse("+02:00");
        // 2026-01-01T23:30:00Z is 01:30 on Jan 2 at +02:00.
        let ms = Utc.with_ymd_and_hms(2026, 1, 1, 23, 30, 0).unwrap().timestamp_millis();
        assert_eq!(plus2.local_date(ms), day("2026-01-02"));
        assert_eq!(Zone::parse("UTC").local_date(ms), day("2026-01-01"));
        let (a, b) = plus2.day_bounds(day("2026-01-02"));
        assert_eq!((a, b - a), (Utc.with_ymd_and_hms(2026, 1, 1, 22, 0, 0).unwrap().timestamp_millis(), 86_400_000));
    }

    #[test]
    fn a_sample_over_midnight_covers_two_dates_and_end_is_exclusive() {
        let z = Zone::parse("UTC");
        let t = |h: u32| Utc.with_ymd_and_hms(2026, 5, 1, h, 0, 0).unwrap().timestamp_millis();
        assert_eq!(dates_covered(&z, t(22), t(23) + 2 * 3600 * 1000, 31), vec![day("2026-05-01"), day("2026-05-02")]);
        assert_eq!(dates_covered(&z, t(22), t(23) + 3600 * 1000, 31), vec![day("2026-05-01")]);
        assert_eq!(dates_covered(&z, t(5), t(5), 31), vec![day("2026-05-01")]);
    }
}
