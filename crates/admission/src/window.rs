//! Calling windows: "calls may start between 09:00 and 18:00 in Europe/London, from 2026-03-02".
//! Pure functions of an explicit `now`, so every instant (midnight, a DST change) is testable.
//!
//! A window opens each local day at `first` and closes at `last` (exclusive: a call may start
//! at 17:59:59, not at 18:00). When `last` is earlier than `first` the window crosses midnight
//! (22:00–06:00) and belongs to the day it opens: the early hours of the start date belong to
//! the previous day's window, which is before the start date, so they are closed.
//!
//! Local times are resolved in the IANA zone: a time that does not exist (inside a spring-
//! forward gap) moves to the first local time after the gap; a time that occurs twice (autumn)
//! takes the earlier instant.

use chrono::{DateTime, Duration, LocalResult, NaiveDate, NaiveTime, TimeZone, Utc};
pub use chrono_tz::Tz;

/// Why a window was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("time zone {0:?} is not an IANA time zone (e.g. Europe/London)")]
    TimeZone(String),
    #[error("{field} {value:?} is not a time of day (HH:MM)")]
    Time { field: &'static str, value: String },
    #[error("first_call_time and last_call_time must differ")]
    Empty,
}

/// A validated calling window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    first: NaiveTime,
    last: NaiveTime,
    zone: Tz,
    start_date: NaiveDate,
}

/// How far ahead [`Window::next_open`] looks for an opening; a window always opens within two
/// days of its start date, so this only bounds pathological zones.
const SEARCH_DAYS: i64 = 8;

/// Parses `HH:MM` or `HH:MM:SS`.
pub fn parse_time(field: &'static str, value: &str) -> Result<NaiveTime, WindowError> {
    let value = value.trim();
    NaiveTime::parse_from_str(value, "%H:%M")
        .or_else(|_| NaiveTime::parse_from_str(value, "%H:%M:%S"))
        .map_err(|_| WindowError::Time {
            field,
            value: value.to_owned(),
        })
}

/// Parses an IANA zone name.
pub fn parse_zone(value: &str) -> Result<Tz, WindowError> {
    value
        .trim()
        .parse::<Tz>()
        .map_err(|_| WindowError::TimeZone(value.to_owned()))
}

impl Window {
    pub fn new(
        first: NaiveTime,
        last: NaiveTime,
        zone: Tz,
        start_date: NaiveDate,
    ) -> Result<Self, WindowError> {
        if first == last {
            return Err(WindowError::Empty);
        }
        Ok(Self {
            first,
            last,
            zone,
            start_date,
        })
    }

    /// From stored or requested parts: the zone by name.
    pub fn parse(
        first: NaiveTime,
        last: NaiveTime,
        zone: &str,
        start_date: NaiveDate,
    ) -> Result<Self, WindowError> {
        Self::new(first, last, parse_zone(zone)?, start_date)
    }

    pub fn crosses_midnight(&self) -> bool {
        self.last < self.first
    }

    /// The instant a local date and time happens in the window's zone.
    fn resolve(&self, date: NaiveDate, time: NaiveTime) -> DateTime<Utc> {
        let local = date.and_time(time);
        match self.zone.from_local_datetime(&local) {
            LocalResult::Single(at) => at.with_timezone(&Utc),
            LocalResult::Ambiguous(earliest, _) => earliest.with_timezone(&Utc),
            LocalResult::None => {
                // Inside a gap: the first minute after it (gaps are at most a few hours).
                let mut probe = local;
                for _ in 0..(24 * 60) {
                    probe += Duration::minutes(1);
                    if let Some(at) = self.zone.from_local_datetime(&probe).earliest() {
                        return at.with_timezone(&Utc);
                    }
                }
                Utc.from_utc_datetime(&local)
            }
        }
    }

    /// The window that opens on local day `day`: `[open, close)` in UTC.
    fn on_day(&self, day: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
        let close_day = if self.crosses_midnight() {
            day.succ_opt().unwrap_or(day)
        } else {
            day
        };
        (
            self.resolve(day, self.first),
            self.resolve(close_day, self.last),
        )
    }

    /// The instant the window opens for the first time: `first` on the start date.
    pub fn first_open(&self) -> DateTime<Utc> {
        self.on_day(self.start_date).0
    }

    /// `now` when the window is open at `now`, else the next instant it opens.
    pub fn next_open(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let today = now.with_timezone(&self.zone).date_naive();
        let from = (today - Duration::days(1)).max(self.start_date);
        let mut day = from;
        for _ in 0..SEARCH_DAYS + (from - today).num_days().max(0) + 2 {
            let (open, close) = self.on_day(day);
            if now < close && open < close {
                return open.max(now);
            }
            match day.succ_opt() {
                Some(next) => day = next,
                None => break,
            }
        }
        // Unreachable for real zones; never claim open.
        now + Duration::days(1)
    }

    /// Whether a call may start at `now`.
    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        self.next_open(now) == now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> NaiveTime {
        parse_time("t", s).unwrap()
    }

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn window(first: &str, last: &str, zone: &str, start: &str) -> Window {
        Window::parse(t(first), t(last), zone, d(start)).unwrap()
    }

    #[test]
    fn a_day_window_is_open_from_first_until_before_last() {
        let w = window("09:00", "18:00", "Europe/London", "2026-01-01");
        // London is UTC in January.
        assert!(!w.is_open(utc("2026-01-15T08:59:59Z")));
        assert!(w.is_open(utc("2026-01-15T09:00:00Z")));
        assert!(w.is_open(utc("2026-01-15T17:59:59Z")));
        assert!(!w.is_open(utc("2026-01-15T18:00:00Z")));
        assert_eq!(
            w.next_open(utc("2026-01-15T18:00:00Z")),
            utc("2026-01-16T09:00:00Z")
        );
        assert_eq!(
            w.next_open(utc("2026-01-15T03:00:00Z")),
            utc("2026-01-15T09:00:00Z")
        );
    }

    #[test]
    fn summer_time_moves_the_window_in_utc() {
        let w = window("09:00", "18:00", "Europe/London", "2026-01-01");
        // BST (UTC+1) in July: 09:00 local is 08:00 UTC.
        assert!(w.is_open(utc("2026-07-01T08:00:00Z")));
        assert!(!w.is_open(utc("2026-07-01T07:59:59Z")));
        assert!(!w.is_open(utc("2026-07-01T17:00:00Z")));
    }

    #[test]
    fn a_window_crossing_midnight_is_open_late_and_early() {
        let w = window("22:00", "06:00", "America/New_York", "2026-01-10");
        // New York is UTC-5 in January. 23:00 local on the 12th = 04:00Z on the 13th.
        assert!(w.is_open(utc("2026-01-13T04:00:00Z")));
        // 05:59 local on the 13th.
        assert!(w.is_open(utc("2026-01-13T10:59:00Z")));
        // 06:00 local: closed until 22:00 local.
        assert!(!w.is_open(utc("2026-01-13T11:00:00Z")));
        assert_eq!(
            w.next_open(utc("2026-01-13T11:00:00Z")),
            utc("2026-01-14T03:00:00Z")
        );
        // Midnight exactly is inside.
        assert!(w.is_open(utc("2026-01-13T05:00:00Z")));
    }

    #[test]
    fn the_early_hours_of_the_start_date_belong_to_the_day_before() {
        let w = window("22:00", "06:00", "UTC", "2026-01-10");
        assert!(!w.is_open(utc("2026-01-10T02:00:00Z")));
        assert_eq!(
            w.next_open(utc("2026-01-10T02:00:00Z")),
            utc("2026-01-10T22:00:00Z")
        );
        assert!(w.is_open(utc("2026-01-11T02:00:00Z")));
    }

    #[test]
    fn a_future_start_date_waits_for_its_first_window() {
        let w = window("09:00", "18:00", "Asia/Tokyo", "2026-05-01");
        // Tokyo is UTC+9: 09:00 on May 1st is 00:00Z.
        assert!(!w.is_open(utc("2026-04-30T03:00:00Z")));
        assert_eq!(
            w.next_open(utc("2026-04-20T03:00:00Z")),
            utc("2026-05-01T00:00:00Z")
        );
    }

    #[test]
    fn the_first_opening_is_on_the_start_date() {
        let w = window("22:00", "06:00", "America/New_York", "2026-01-10");
        assert_eq!(w.first_open(), utc("2026-01-11T03:00:00Z"));
        assert_eq!(w.next_open(utc("2026-01-01T00:00:00Z")), w.first_open());
        let w = window("09:00", "18:00", "Asia/Tokyo", "2026-05-01");
        assert_eq!(w.first_open(), utc("2026-05-01T00:00:00Z"));
    }

    #[test]
    fn spring_forward_gap_opens_at_the_first_real_minute() {
        // Europe/London jumps 01:00 → 02:00 on 2026-03-29. A window opening at 01:30 opens at
        // 02:00 BST (01:00Z) that day.
        let w = window("01:30", "05:00", "Europe/London", "2026-03-01");
        assert_eq!(
            w.next_open(utc("2026-03-29T00:10:00Z")),
            utc("2026-03-29T01:00:00Z")
        );
        assert!(!w.is_open(utc("2026-03-29T00:59:00Z")));
        // 05:00 BST is 04:00Z.
        assert!(w.is_open(utc("2026-03-29T03:59:00Z")));
        assert!(!w.is_open(utc("2026-03-29T04:00:00Z")));
    }

    #[test]
    fn autumn_back_takes_the_earlier_instant_and_crossing_windows_last_an_hour_longer() {
        // Europe/London goes 02:00 BST → 01:00 GMT on 2026-10-25. A 22:00–06:00 window opening
        // on the 24th (21:00Z) closes at 06:00 GMT (06:00Z): nine hours instead of eight.
        let w = window("22:00", "06:00", "Europe/London", "2026-10-01");
        assert!(w.is_open(utc("2026-10-24T21:00:00Z")));
        assert!(!w.is_open(utc("2026-10-24T20:59:59Z")));
        assert!(w.is_open(utc("2026-10-25T05:59:59Z")));
        assert!(!w.is_open(utc("2026-10-25T06:00:00Z")));
        // Opening at 01:30 that night happens twice; the earlier (00:30Z, BST) counts.
        let w = window("01:30", "03:00", "Europe/London", "2026-10-01");
        assert_eq!(
            w.next_open(utc("2026-10-25T00:00:00Z")),
            utc("2026-10-25T00:30:00Z")
        );
    }

    #[test]
    fn windows_are_validated() {
        assert_eq!(
            Window::parse(t("09:00"), t("09:00"), "UTC", d("2026-01-01")),
            Err(WindowError::Empty)
        );
        assert!(matches!(
            Window::parse(t("09:00"), t("10:00"), "Mars/Olympus", d("2026-01-01")),
            Err(WindowError::TimeZone(_))
        ));
        assert!(parse_time("first_call_time", "25:00").is_err());
        assert_eq!(parse_time("x", "09:30:15").unwrap(), t("09:30:15"));
    }
}
