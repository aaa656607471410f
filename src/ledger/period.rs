//! Budget periods on a calendar: an hour, a day, a week (from Monday), a month start at
//! midnight in the configured time zone; `total` never resets.

use jiff::civil::Weekday;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// Used for `tokens_per_minute`; also allowed as a budget period.
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Total,
}

impl Period {
    /// Every period, in the order of [`Period::index`].
    pub const ALL: [Period; 6] = [
        Period::Minute,
        Period::Hour,
        Period::Day,
        Period::Week,
        Period::Month,
        Period::Total,
    ];

    /// A dense index, for per-period arrays.
    pub fn index(self) -> usize {
        match self {
            Period::Minute => 0,
            Period::Hour => 1,
            Period::Day => 2,
            Period::Week => 3,
            Period::Month => 4,
            Period::Total => 5,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    /// The window containing `now`: its start and its end (when the budget resets), as
    /// Unix seconds. `total` starts at 0 and never ends.
    pub fn window(self, now: Timestamp, tz: &TimeZone) -> (i64, Option<i64>) {
        let zoned = now.to_zoned(tz.clone());
        let start: Option<Zoned> = match self {
            Period::Total => None,
            Period::Minute => zoned.with().second(0).subsec_nanosecond(0).build().ok(),
            Period::Hour => zoned
                .with()
                .minute(0)
                .second(0)
                .subsec_nanosecond(0)
                .build()
                .ok(),
            Period::Day => zoned.start_of_day().ok(),
            Period::Week => {
                let back = zoned.weekday().since(Weekday::Monday);
                zoned
                    .start_of_day()
                    .ok()
                    .and_then(|d| d.checked_sub(i64::from(back).days()).ok())
            }
            Period::Month => zoned
                .first_of_month()
                .ok()
                .and_then(|d| d.start_of_day().ok()),
        };
        let Some(start) = start else {
            return (0, None);
        };
        let end = match self {
            Period::Minute => start.checked_add(1.minute()),
            Period::Hour => start.checked_add(1.hour()),
            Period::Day => start.checked_add(1.day()),
            Period::Week => start.checked_add(1.week()),
            Period::Month => start.checked_add(1.month()),
            Period::Total => return (0, None),
        };
        (
            start.timestamp().as_second(),
            end.ok().map(|e| e.timestamp().as_second()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn window(p: Period, now: &str, tz: &str) -> (String, Option<String>) {
        let tz = TimeZone::get(tz).unwrap();
        let (start, end) = p.window(at(now), &tz);
        let show = |s: i64| Timestamp::from_second(s).unwrap().to_string();
        (show(start), end.map(show))
    }

    #[test]
    fn calendar_windows_in_utc() {
        let now = "2026-11-29T15:47:12Z"; // a Sunday
        assert_eq!(
            window(Period::Minute, now, "UTC"),
            (
                "2026-11-29T15:47:00Z".into(),
                Some("2026-11-29T15:48:00Z".into())
            )
        );
        assert_eq!(
            window(Period::Hour, now, "UTC"),
            (
                "2026-11-29T15:00:00Z".into(),
                Some("2026-11-29T16:00:00Z".into())
            )
        );
        assert_eq!(
            window(Period::Day, now, "UTC"),
            (
                "2026-11-29T00:00:00Z".into(),
                Some("2026-11-30T00:00:00Z".into())
            )
        );
        assert_eq!(
            window(Period::Week, now, "UTC"),
            (
                "2026-11-23T00:00:00Z".into(),
                Some("2026-11-30T00:00:00Z".into())
            )
        );
        assert_eq!(
            window(Period::Month, now, "UTC"),
            (
                "2026-11-01T00:00:00Z".into(),
                Some("2026-12-01T00:00:00Z".into())
            )
        );
        assert_eq!(
            window(Period::Total, now, "UTC"),
            ("1970-01-01T00:00:00Z".into(), None)
        );
    }

    #[test]
    fn days_start_at_local_midnight() {
        // 23:30 UTC is already the next day in Berlin.
        let (start, end) = window(Period::Day, "2026-11-29T23:30:00Z", "Europe/Berlin");
        assert_eq!(start, "2026-11-29T23:00:00Z");
        assert_eq!(end.unwrap(), "2026-11-30T23:00:00Z");
    }
}
