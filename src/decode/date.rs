//! Dates in staging documents. Every accepted form becomes a calendar day in
//! `merge.timezone`; the host's own time zone is never consulted.

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use mongodb::bson::Bson;

use super::number::describe;

/// The accepted forms, quoted in every reason about an unreadable date.
pub const ACCEPTED_FORMS: &str = "use YYYY-MM-DD, an RFC 3339 timestamp, YYYY-MM-DD HH:MM[:SS] \
     (read in merge.timezone), a BSON date or epoch milliseconds";

const MILLIS_PER_DAY: i64 = 86_400_000;

/// Naive timestamp layouts, read as wall-clock time in `merge.timezone`.
const NAIVE_FORMATS: [&str; 4] = [
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
];

/// A day read from a staging field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Day {
    pub date: NaiveDate,
    /// The number the day was read from as milliseconds since the Unix epoch, if it came from
    /// a number rather than from text or a BSON date.
    pub epoch_millis: Option<i64>,
}

impl Day {
    /// Returns a day that did not come from epoch milliseconds.
    pub fn from_date(date: NaiveDate) -> Day {
        Day {
            date,
            epoch_millis: None,
        }
    }
}

/// Reads the day a staging document is about.
///
/// A BSON date at exactly 00:00:00.000 UTC is read as that calendar day, because that is how
/// n8n's Date Fields option and most drivers store a day without a time; any other instant
/// becomes its day in `timezone`.
///
/// # Errors
///
/// A reason fragment naming the value and the accepted forms.
pub fn parse(value: &Bson, timezone: Tz) -> Result<Day, String> {
    match value {
        Bson::String(text) => parse_text(text.trim(), timezone)
            .map(Day::from_date)
            .ok_or_else(|| format!("{} is not a date; {ACCEPTED_FORMS}", describe(value))),
        Bson::DateTime(date_time) => {
            let millis = date_time.timestamp_millis();
            if millis.rem_euclid(MILLIS_PER_DAY) == 0 {
                return instant_day(millis, Tz::UTC, value).map(Day::from_date);
            }
            instant_day(millis, timezone, value).map(Day::from_date)
        }
        Bson::Int32(millis) => epoch_millis_day(i64::from(*millis), timezone, value),
        Bson::Int64(millis) => epoch_millis_day(*millis, timezone, value),
        Bson::Double(millis) if millis.is_finite() && millis.fract() == 0.0 => {
            epoch_millis_day(*millis as i64, timezone, value)
        }
        other => Err(format!(
            "{} is not a date; {ACCEPTED_FORMS}",
            describe(other)
        )),
    }
}

/// Returns the day of an instant given in milliseconds since the Unix epoch.
pub fn day_of_millis(millis: i64, timezone: Tz) -> Option<NaiveDate> {
    let instant: DateTime<Utc> = DateTime::from_timestamp_millis(millis)?;
    Some(instant.with_timezone(&timezone).date_naive())
}

fn epoch_millis_day(millis: i64, timezone: Tz, value: &Bson) -> Result<Day, String> {
    let date = instant_day(millis, timezone, value)?;
    Ok(Day {
        date,
        epoch_millis: Some(millis),
    })
}

fn instant_day(millis: i64, timezone: Tz, value: &Bson) -> Result<NaiveDate, String> {
    day_of_millis(millis, timezone).ok_or_else(|| {
        format!(
            "{} is outside the supported range of dates",
            describe(value)
        )
    })
}

fn parse_text(text: &str, timezone: Tz) -> Option<NaiveDate> {
    // Every accepted text form starts with a zero-padded YYYY-MM-DD; requiring it up front
    // keeps chrono's lenient field parsing from accepting forms such as 2024-5-1.
    if !has_day_prefix(text) {
        return None;
    }
    if text.len() == 10 {
        return NaiveDate::parse_from_str(text, "%Y-%m-%d").ok();
    }
    if let Ok(date_time) = DateTime::parse_from_rfc3339(text) {
        return Some(date_time.with_timezone(&timezone).date_naive());
    }
    // A naive timestamp is wall-clock time in `timezone`, so its day is its own date part.
    // The zone is still applied so that a time that does not exist there (a daylight-saving
    // gap) or an invalid clock reading is refused rather than guessed.
    let naive = NAIVE_FORMATS
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())?;
    timezone
        .from_local_datetime(&naive)
        .earliest()
        .map(|_| naive.date())
}

fn has_day_prefix(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() >= 10
        && bytes[..10]
            .iter()
            .enumerate()
            .all(|(index, byte)| match index {
                4 | 7 => *byte == b'-',
                _ => byte.is_ascii_digit(),
            })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::DateTime as BsonDateTime;

    fn day(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").expect("test day")
    }

    fn text(value: &str) -> Bson {
        Bson::String(value.to_string())
    }

    fn date(value: &Bson, timezone: Tz) -> Result<NaiveDate, String> {
        parse(value, timezone).map(|day| day.date)
    }

    #[test]
    fn accepted_forms_in_utc() {
        let utc = Tz::UTC;
        let cases = [
            (text("2025-09-25"), "2025-09-25"),
            (text(" 2025-09-25 "), "2025-09-25"),
            (text("2025-09-25T23:30:00Z"), "2025-09-25"),
            (text("2025-09-25T23:30:00.123+00:00"), "2025-09-25"),
            (text("2025-09-25T23:30:00-02:00"), "2025-09-26"),
            (text("2025-09-25 23:30"), "2025-09-25"),
            (text("2025-09-25T23:30:00"), "2025-09-25"),
            (text("2025-09-25 23:30:59.5"), "2025-09-25"),
            (Bson::Int64(1_758_842_400_000), "2025-09-25"),
            (Bson::Double(1_758_842_400_000.0), "2025-09-25"),
            (
                Bson::DateTime(BsonDateTime::from_millis(1_758_842_400_000)),
                "2025-09-25",
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(date(&value, utc), Ok(day(expected)), "{value:?}");
        }
    }

    #[test]
    fn timestamp_lands_on_zone_day() {
        let tokyo: Tz = "Asia/Tokyo".parse().expect("known zone");
        let new_york: Tz = "America/New_York".parse().expect("known zone");
        assert_eq!(
            date(&text("2025-09-25T20:00:00Z"), tokyo),
            Ok(day("2025-09-26"))
        );
        assert_eq!(
            date(&text("2025-09-25T02:00:00Z"), new_york),
            Ok(day("2025-09-24"))
        );
        // A naive timestamp is already local time in the configured zone.
        assert_eq!(
            date(&text("2025-09-25 23:30"), tokyo),
            Ok(day("2025-09-25"))
        );
        // Epoch milliseconds for 2025-09-25T20:00Z.
        assert_eq!(
            date(&Bson::Int64(1_758_830_400_000), tokyo),
            Ok(day("2025-09-26"))
        );
    }

    #[test]
    fn bson_date_at_utc_midnight_is_that_day() {
        let new_york: Tz = "America/New_York".parse().expect("known zone");
        let midnight = Bson::DateTime(BsonDateTime::from_millis(1_758_758_400_000));
        assert_eq!(date(&midnight, new_york), Ok(day("2025-09-25")));
        let one_am = Bson::DateTime(BsonDateTime::from_millis(1_758_762_000_000));
        assert_eq!(date(&one_am, new_york), Ok(day("2025-09-24")));
    }

    #[test]
    fn daylight_saving_gap_is_refused() {
        let berlin: Tz = "Europe/Berlin".parse().expect("known zone");
        assert!(parse(&text("2025-03-30 02:30"), berlin).is_err());
        assert_eq!(
            date(&text("2025-10-26 02:30"), berlin),
            Ok(day("2025-10-26"))
        );
    }

    #[test]
    fn other_forms_are_refused() {
        for value in [
            text("13/05/2024"),
            text("20240513"),
            text("2024-5-13"),
            text("2024-13-01"),
            text("2024-02-30"),
            text("2025-09-25T25:00"),
            text("yesterday"),
            text(""),
            Bson::Double(1.5),
            Bson::Boolean(false),
        ] {
            let reason = parse(&value, Tz::UTC).expect_err("invalid date form");
            assert!(reason.contains("YYYY-MM-DD"), "{value:?}: {reason}");
        }
    }

    #[test]
    fn epoch_millis_kept_only_for_numbers() {
        let numbers = [
            Bson::Int32(20_240_513),
            Bson::Int64(20_240_513),
            Bson::Double(20_240_513.0),
        ];
        for value in numbers {
            let parsed = parse(&value, Tz::UTC).expect("epoch milliseconds");
            assert_eq!(parsed.epoch_millis, Some(20_240_513), "{value:?}");
            assert_eq!(parsed.date, day("1970-01-01"), "{value:?}");
        }
        let written = [
            text("1970-01-01"),
            text("1970-01-01T00:00:00Z"),
            Bson::DateTime(BsonDateTime::from_millis(0)),
        ];
        for value in written {
            let parsed = parse(&value, Tz::UTC).expect("a written day");
            assert_eq!(parsed.epoch_millis, None, "{value:?}");
        }
    }
}
