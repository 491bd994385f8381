//! Decoding of staging documents into merge records. A staging document is either decoded
//! completely or rejected with every reason found, never half-read. The reasons go to the
//! rejects collection, so each names the field as it appears in the document and the fix.

mod date;
mod number;

use chrono::{DateTime, Days, NaiveDate, Utc};
use chrono_tz::Tz;
use mongodb::bson::{Bson, Document};

use crate::config::{Config, MissingDate};
use crate::merge::{Key, MetricsRecord, Percentages, Record, SurveyRecord};

pub use date::{day_of_millis, ACCEPTED_FORMS};

use date::Day;

/// Staging collection of a change event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Metrics,
    Surveys,
}

impl Source {
    /// Returns the data type logged for events of this source.
    pub fn data_type(self) -> &'static str {
        match self {
            Source::Metrics => "metrics",
            Source::Surveys => "survey",
        }
    }
}

/// Settings the decoder needs, borrowed from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Decoder<'a> {
    config: &'a Config,
}

/// Facts about the moment of decoding that are not in the document.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// Today in `merge.timezone`; days after tomorrow are implausible.
    pub today: NaiveDate,
    /// The change event's wall time, used for `missing_date = "event_day"`.
    pub event_time: Option<DateTime<Utc>>,
}

impl Context {
    /// Returns the context for decoding now an event written at `event_time`.
    pub fn now(timezone: Tz, event_time: Option<DateTime<Utc>>) -> Context {
        Context {
            today: Utc::now().with_timezone(&timezone).date_naive(),
            event_time,
        }
    }
}

impl<'a> Decoder<'a> {
    pub fn new(config: &'a Config) -> Decoder<'a> {
        Decoder { config }
    }

    /// Decodes a staging document of `source`.
    ///
    /// # Errors
    ///
    /// Every reason the document is invalid, each naming the field and the fix.
    pub fn decode(
        &self,
        source: Source,
        document: &Document,
        context: &Context,
    ) -> Result<Record, Vec<String>> {
        let mut reader = Reader {
            document,
            reasons: Vec::new(),
        };
        let record = match source {
            Source::Metrics => self.decode_metrics(&mut reader, context),
            Source::Surveys => self.decode_survey(&mut reader, context),
        };
        match record {
            Some(record) if reader.reasons.is_empty() => Ok(record),
            _ => Err(reader.reasons),
        }
    }

    fn decode_metrics(&self, reader: &mut Reader<'_>, context: &Context) -> Option<Record> {
        let fields = &self.config.fields.metrics;
        let key = self.decode_key(
            reader,
            &fields.entity_name,
            &fields.entity_type,
            &fields.date,
            context,
        );
        let sct = reader.required(&fields.sct, number::parse_non_negative);
        let cases = reader.required(&fields.cases, number::parse_count);
        let sample_cases = reader
            .optional(&fields.sample_cases, array)
            .flatten()
            .unwrap_or_default();
        let metadata = reader
            .optional(&fields.metadata, document)
            .flatten()
            .unwrap_or_default();
        Some(Record::Metrics(MetricsRecord {
            key: key?,
            sct: sct?,
            cases: cases?,
            sample_cases,
            metadata,
        }))
    }

    fn decode_survey(&self, reader: &mut Reader<'_>, context: &Context) -> Option<Record> {
        let fields = &self.config.fields.surveys;
        let key = self.decode_key(
            reader,
            &fields.entity_name,
            &fields.entity_type,
            &fields.date,
            context,
        );
        let csat = reader.required(&fields.csat, number::parse_count);
        let neutral = reader.required(&fields.neutral, number::parse_count);
        let dsat = reader.required(&fields.dsat, number::parse_count);
        let satisfaction = reader.optional(&fields.satisfaction, number::parse_percent);
        let percentages = reader.optional(&fields.percentages, percentages);
        let details = reader
            .optional(&fields.details, array)
            .flatten()
            .unwrap_or_default();
        Some(Record::Survey(SurveyRecord {
            key: key?,
            csat: csat?,
            neutral: neutral?,
            dsat: dsat?,
            satisfaction: satisfaction.flatten(),
            percentages: percentages.flatten(),
            details,
        }))
    }

    fn decode_key(
        &self,
        reader: &mut Reader<'_>,
        name_fields: &[String],
        type_fields: &[String],
        date_fields: &[String],
        context: &Context,
    ) -> Option<Key> {
        let entity_name = reader.required(name_fields, entity_name);
        let entity_type = reader.required(type_fields, entity_type);
        let date = self.decode_date(reader, date_fields, context);
        Some(Key {
            entity_name: entity_name?,
            entity_type: entity_type?,
            date: date?,
        })
    }

    fn decode_date(
        &self,
        reader: &mut Reader<'_>,
        fields: &[String],
        context: &Context,
    ) -> Option<NaiveDate> {
        let merge = &self.config.merge;
        let document = reader.document;
        let day = match (
            find(document, fields),
            merge.missing_date,
            context.event_time,
        ) {
            (Found::Value(name, value), _, _) => match date::parse(value, merge.timezone) {
                Ok(day) => Some((name, day)),
                Err(reason) => {
                    reader.reasons.push(format!("`{name}`: {reason}"));
                    None
                }
            },
            (_, MissingDate::EventDay, Some(event_time)) => {
                let date = event_time.with_timezone(&merge.timezone).date_naive();
                Some((fields[0].as_str(), Day::from_date(date)))
            }
            (found, _, _) => {
                reader.report_missing(fields, found);
                None
            }
        };
        let (name, day) = day?;

        // A day read from a number shows that number, because 20240513 or epoch seconds read
        // as milliseconds land in 1970 and the producer must see what it sent to fix it.
        if day.date < merge.min_date {
            let reason = match day.epoch_millis {
                Some(millis) => format!(
                    "`{name}`: {millis} read as epoch milliseconds is {}, before merge.min_date {}; \
                     send the day as YYYY-MM-DD",
                    day.date, merge.min_date
                ),
                None => format!(
                    "`{name}`: {} is before merge.min_date {}; n8n writes 1970-01-01 for a date it \
                     could not parse",
                    day.date, merge.min_date
                ),
            };
            reader.reasons.push(reason);
            return None;
        }
        let latest = context
            .today
            .checked_add_days(Days::new(1))
            .unwrap_or(NaiveDate::MAX);
        if day.date > latest {
            let today = format!("today is {} in {}", context.today, merge.timezone.name());
            let reason = match day.epoch_millis {
                Some(millis) => format!(
                    "`{name}`: {millis} read as epoch milliseconds is {}, more than one day in the \
                     future ({today}); send the day as YYYY-MM-DD",
                    day.date
                ),
                None => format!(
                    "`{name}`: {} is more than one day in the future ({today})",
                    day.date
                ),
            };
            reader.reasons.push(reason);
            return None;
        }
        Some(day.date)
    }
}

/// The result of looking a logical field up under its accepted names.
enum Found<'d> {
    Value(&'d str, &'d Bson),
    /// Present only as `null`, under this name.
    Null(&'d str),
    Missing,
}

/// Finds the first accepted name with a non-null value.
fn find<'x>(document: &'x Document, names: &'x [String]) -> Found<'x> {
    let mut null_name = None;
    for name in names {
        match document.get(name) {
            Some(Bson::Null | Bson::Undefined) => {
                null_name.get_or_insert(name.as_str());
            }
            Some(value) => return Found::Value(name, value),
            None => {}
        }
    }
    match null_name {
        Some(name) => Found::Null(name),
        None => Found::Missing,
    }
}

/// Reason fragments from a field parser: one, or one for each problem it found.
trait IntoReasons {
    fn into_reasons(self) -> Vec<String>;
}

impl IntoReasons for String {
    fn into_reasons(self) -> Vec<String> {
        vec![self]
    }
}

impl IntoReasons for Vec<String> {
    fn into_reasons(self) -> Vec<String> {
        self
    }
}

/// Reads fields from one staging document and collects the reasons it is invalid.
struct Reader<'d> {
    document: &'d Document,
    reasons: Vec<String>,
}

impl<'d> Reader<'d> {
    fn required<T, E: IntoReasons>(
        &mut self,
        names: &[String],
        parse: impl FnOnce(&Bson) -> Result<T, E>,
    ) -> Option<T> {
        let document = self.document;
        match find(document, names) {
            Found::Value(name, value) => self.check(name, value, parse),
            found => {
                self.report_missing(names, found);
                None
            }
        }
    }

    /// Reads an optional field: `None` when the field is invalid (the reason is recorded),
    /// `Some(None)` when it is absent or null.
    fn optional<T, E: IntoReasons>(
        &mut self,
        names: &[String],
        parse: impl FnOnce(&Bson) -> Result<T, E>,
    ) -> Option<Option<T>> {
        let document = self.document;
        match find(document, names) {
            Found::Value(name, value) => self.check(name, value, parse).map(Some),
            Found::Null(_) | Found::Missing => Some(None),
        }
    }

    fn check<T, E: IntoReasons>(
        &mut self,
        name: &str,
        value: &Bson,
        parse: impl FnOnce(&Bson) -> Result<T, E>,
    ) -> Option<T> {
        match parse(value) {
            Ok(parsed) => Some(parsed),
            Err(reasons) => {
                let named = reasons
                    .into_reasons()
                    .into_iter()
                    .map(|reason| format!("`{name}`: {reason}"));
                self.reasons.extend(named);
                None
            }
        }
    }

    fn report_missing(&mut self, names: &[String], found: Found<'_>) {
        let reason = match found {
            Found::Null(name) => format!("`{name}` is null; it is required"),
            _ if names.len() == 1 => format!("missing required field `{}`", names[0]),
            _ => format!(
                "missing required field `{}` (accepted names: {})",
                names[0],
                names.join(", ")
            ),
        };
        self.reasons.push(reason);
    }
}

fn entity_name(value: &Bson) -> Result<String, String> {
    let Bson::String(text) = value else {
        return Err(format!("{} is not a string", number::describe(value)));
    };
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        return Err("is empty; an entity needs a name".to_string());
    }
    Ok(collapsed)
}

fn entity_type(value: &Bson) -> Result<String, String> {
    let Bson::String(text) = value else {
        return Err(format!("{} is not a string", number::describe(value)));
    };
    let trimmed = text.trim().to_lowercase();
    if trimmed.is_empty() {
        return Err("is empty; an entity needs a type such as `dpe` or `team`".to_string());
    }
    Ok(trimmed)
}

/// Reads an array for the target, after checking it contains no NaN or infinity.
fn array(value: &Bson) -> Result<Vec<Bson>, String> {
    let Bson::Array(items) = value else {
        return Err(format!("{} is not an array", number::describe(value)));
    };
    check_finite(value, "")?;
    Ok(items.clone())
}

/// Reads a document for the target, after checking it contains no NaN or infinity.
fn document(value: &Bson) -> Result<Document, String> {
    let Bson::Document(inner) = value else {
        return Err(format!("{} is not a document", number::describe(value)));
    };
    check_finite(value, "")?;
    Ok(inner.clone())
}

/// Reads the csat, neutral and dsat percentages, with a reason for each one that is missing
/// or invalid.
fn percentages(value: &Bson) -> Result<Percentages, Vec<String>> {
    let Bson::Document(inner) = value else {
        return Err(vec![format!(
            "{} is not a document of csat, neutral and dsat percentages",
            number::describe(value)
        )]);
    };
    let read = |field: &str| match inner.get(field) {
        Some(value) => number::parse_percent(value).map_err(|reason| format!("{field}: {reason}")),
        None => Err(format!(
            "missing {field}; give csat, neutral and dsat, or leave percentages out"
        )),
    };
    match (read("csat"), read("neutral"), read("dsat")) {
        (Ok(csat), Ok(neutral), Ok(dsat)) => Ok(Percentages {
            csat,
            neutral,
            dsat,
        }),
        (csat, neutral, dsat) => Err([csat.err(), neutral.err(), dsat.err()]
            .into_iter()
            .flatten()
            .collect()),
    }
}

/// Fails on the first NaN or infinity inside `value`, naming its path.
fn check_finite(value: &Bson, path: &str) -> Result<(), String> {
    let join = |part: &str| {
        if path.is_empty() {
            part.to_string()
        } else {
            format!("{path}.{part}")
        }
    };
    match value {
        Bson::Double(double) if !double.is_finite() => {
            let at = if path.is_empty() {
                String::new()
            } else {
                format!(" at {path}")
            };
            Err(format!(
                "{double}{at} is not a finite number; NaN and infinities are not stored"
            ))
        }
        Bson::Decimal128(decimal) if number::is_nan_or_infinity(decimal) => {
            let at = if path.is_empty() {
                String::new()
            } else {
                format!(" at {path}")
            };
            Err(format!("decimal128 {decimal}{at} is not a finite number; NaN and infinities are not stored"))
        }
        Bson::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(index, item)| check_finite(item, &join(&index.to_string()))),
        Bson::Document(inner) => inner
            .iter()
            .try_for_each(|(field, item)| check_finite(item, &join(field))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Environment;
    use mongodb::bson::{doc, DateTime as BsonDateTime, Decimal128};

    fn config(text: &str) -> Config {
        Config::from_toml(text, "test.toml", &Environment::default()).expect("valid test config")
    }

    fn context() -> Context {
        Context {
            today: NaiveDate::from_ymd_opt(2026, 12, 4).expect("valid day"),
            event_time: Some(
                DateTime::from_timestamp(1_764_806_400 + 3_600, 0).expect("valid instant"),
            ),
        }
    }

    fn decode_with(
        config: &Config,
        source: Source,
        document: Document,
    ) -> Result<Record, Vec<String>> {
        Decoder::new(config).decode(source, &document, &context())
    }

    fn decode(source: Source, document: Document) -> Result<Record, Vec<String>> {
        decode_with(&config(""), source, document)
    }

    fn metrics(document: Document) -> MetricsRecord {
        match decode(Source::Metrics, document) {
            Ok(Record::Metrics(record)) => record,
            other => panic!("expected metrics, got {other:?}"),
        }
    }

    fn survey(document: Document) -> SurveyRecord {
        match decode(Source::Surveys, document) {
            Ok(Record::Survey(record)) => record,
            other => panic!("expected a survey, got {other:?}"),
        }
    }

    /// Asserts that `document` is rejected with a reason containing each of `expected`.
    fn rejected(source: Source, document: Document, expected: &[&str]) {
        let reasons = decode(source, document.clone()).expect_err("document must be rejected");
        for fragment in expected {
            assert!(
                reasons.iter().any(|reason| reason.contains(fragment)),
                "{document}: no reason contains {fragment:?}: {reasons:?}"
            );
        }
    }

    #[test]
    fn metrics_seed_document() {
        let record = metrics(doc! {
            "entity_name": "  John   Doe ", "entity_type": "DPE", "date": "2025-09-25",
            "sct": 2.5, "cases": 15, "sample_cases": ["A", "B"], "metadata": { "k": 1 },
        });
        assert_eq!(record.key.entity_name, "John Doe");
        assert_eq!(record.key.entity_type, "dpe");
        assert_eq!(record.key.date_string(), "2025-09-25");
        assert_eq!(record.sct, 2.5);
        assert_eq!(record.cases, 15);
        assert_eq!(record.sample_cases.len(), 2);
        assert_eq!(record.metadata, doc! { "k": 1 });
    }

    #[test]
    fn aliases_and_numeric_types() {
        let record = metrics(doc! {
            "entityName": "Jane", "entityType": "team", "date": "2025-09-25",
            "SCT": "3", "closed_cases": Decimal128::from_bytes([0; 16]), "sampleCases": [],
        });
        assert_eq!(record.sct, 3.0);
        assert_eq!(record.cases, 0);
        let record = metrics(doc! {
            "entity_name": "Jane", "entity_type": "team", "date": "2025-09-25",
            "sct": 7_i64, "cases_count": " 7 ",
        });
        assert_eq!(record.cases, 7);
        let record = survey(doc! {
            "entity_name": "Jane", "entity_type": "team", "date": "2025-09-25",
            "CSAT": 13_i64, "Neutral": "2", "DSAT": 0.0, "survey_details": [{ "a": 1 }],
        });
        assert_eq!((record.csat, record.neutral, record.dsat), (13, 2, 0));
        assert_eq!(record.details.len(), 1);
    }

    #[test]
    fn null_optional_fields_are_absent() {
        let record = survey(doc! {
            "entity_name": "Jane", "entity_type": "team", "date": "2025-09-25",
            "csat": 1, "neutral": 0, "dsat": 0,
            "satisfaction": null, "percentages": null, "survey_details": null,
        });
        assert_eq!(record.satisfaction, None);
        assert_eq!(record.percentages, None);
        assert!(record.details.is_empty());
    }

    #[test]
    fn required_null_and_missing_named() {
        rejected(
            Source::Metrics,
            doc! { "entity_name": null, "entity_type": "dpe", "date": "2025-09-25", "sct": 1 },
            &[
                "`entity_name` is null; it is required",
                "missing required field `cases` (accepted names: cases, closed_cases",
            ],
        );
    }

    #[test]
    fn every_reason_is_reported() {
        rejected(
            Source::Surveys,
            doc! {
                "entity_name": "   ", "entity_type": 5, "date": "13/05/2024",
                "csat": -1, "neutral": 1.5, "dsat": "abc", "satisfaction": 101,
                "percentages": { "csat": 1 }, "surveys": "none",
            },
            &[
                "`entity_name`: is empty",
                "`entity_type`: 5 is not a string",
                "`date`: \"13/05/2024\" is not a date",
                "`csat`: -1 is negative",
                "`neutral`: 1.5 is not a whole number",
                "`dsat`: \"abc\" is not a number",
                "`satisfaction`: 101 is outside 0..100",
                "`percentages`: missing neutral",
                "`surveys`: \"none\" is not an array",
            ],
        );
    }

    #[test]
    fn implausible_days_rejected() {
        let base = |date: Bson| doc! { "entity_name": "J", "entity_type": "t", "date": date, "sct": 1, "cases": 1 };
        rejected(
            Source::Metrics,
            base(Bson::String("1970-01-01".into())),
            &["before merge.min_date 2000-01-01"],
        );
        rejected(
            Source::Metrics,
            base(Bson::String("2026-12-06".into())),
            &["more than one day in the future"],
        );
        rejected(
            Source::Metrics,
            base(Bson::Int32(20_240_513)),
            &["before merge.min_date"],
        );
        rejected(
            Source::Metrics,
            base(Bson::String("20240513".into())),
            &["is not a date"],
        );
        assert_eq!(
            metrics(base(Bson::String("2026-12-05".into())))
                .key
                .date_string(),
            "2026-12-05"
        );
    }

    #[test]
    fn missing_date_uses_event_day_when_configured() {
        let document = doc! { "entity_name": "J", "entity_type": "t", "sct": 1, "cases": 1 };
        rejected(
            Source::Metrics,
            document.clone(),
            &["missing required field `date`"],
        );
        let event_day =
            config("[merge]\nmissing_date = \"event_day\"\ntimezone = \"Asia/Tokyo\"\n");
        match decode_with(&event_day, Source::Metrics, document) {
            // The event time is 2025-12-04 01:00 UTC, 10:00 in Tokyo.
            Ok(record) => assert_eq!(record.key().date_string(), "2025-12-04"),
            Err(reasons) => panic!("rejected: {reasons:?}"),
        }
    }

    #[test]
    fn zone_moves_timestamp_day() {
        let tokyo = config("[merge]\ntimezone = \"Asia/Tokyo\"\n");
        let document = doc! {
            "entity_name": "J", "entity_type": "t", "date": "2025-09-25T20:00:00Z", "sct": 1, "cases": 1,
        };
        let record = decode_with(&tokyo, Source::Metrics, document).expect("valid");
        assert_eq!(record.key().date_string(), "2025-09-26");
        let document = doc! {
            "entity_name": "J", "entity_type": "t", "date": BsonDateTime::from_millis(1_758_758_400_000),
            "sct": 1, "cases": 1,
        };
        let record = decode_with(&tokyo, Source::Metrics, document).expect("valid");
        assert_eq!(record.key().date_string(), "2025-09-25");
    }

    #[test]
    fn nan_anywhere_is_rejected() {
        rejected(
            Source::Metrics,
            doc! { "entity_name": "J", "entity_type": "t", "date": "2025-09-25", "sct": f64::NAN, "cases": 1,
            "sample_cases": [{ "score": f64::INFINITY }], "metadata": { "x": [1.0, f64::NAN] } },
            &[
                "`sct`: NaN is not a finite number",
                "inf at 0.score",
                "NaN at x.1",
            ],
        );
    }

    #[test]
    fn mapped_field_names_replace_defaults() {
        let mapped = config("[fields.metrics]\nsct = \"avg_solution_time\"\n");
        let document = doc! { "entity_name": "J", "entity_type": "t", "date": "2025-09-25", "avg_solution_time": 4, "cases": 1 };
        let record = decode_with(&mapped, Source::Metrics, document).expect("mapped name accepted");
        let Record::Metrics(record) = record else {
            panic!("metrics expected")
        };
        assert_eq!(record.sct, 4.0);
        let document = doc! { "entity_name": "J", "entity_type": "t", "date": "2025-09-25", "sct": 4, "cases": 1 };
        let reasons = decode_with(&mapped, Source::Metrics, document)
            .expect_err("default name no longer accepted");
        assert_eq!(
            reasons,
            vec!["missing required field `avg_solution_time`".to_string()]
        );
    }

    #[test]
    fn epoch_millis_day_shows_number() {
        let base = |date: Bson| doc! { "entity_name": "J", "entity_type": "t", "date": date, "sct": 1, "cases": 1 };
        let compact_dates = [
            Bson::Int32(20_240_513),
            Bson::Int64(20_240_513),
            Bson::Double(20_240_513.0),
        ];
        for date in compact_dates {
            let reasons = decode(Source::Metrics, base(date)).expect_err("day before min_date");
            assert_eq!(
                reasons,
                vec![
                    "`date`: 20240513 read as epoch milliseconds is 1970-01-01, before \
                      merge.min_date 2000-01-01; send the day as YYYY-MM-DD"
                        .to_string()
                ]
            );
        }
        let reasons = decode(Source::Metrics, base(Bson::Int64(4_102_444_800_000)))
            .expect_err("day in the future");
        assert_eq!(
            reasons,
            vec![
                "`date`: 4102444800000 read as epoch milliseconds is 2100-01-01, more \
                  than one day in the future (today is 2026-12-04 in UTC); send the day as \
                  YYYY-MM-DD"
                    .to_string()
            ]
        );
    }

    #[test]
    fn epoch_day_keeps_n8n_hint() {
        let base = |date: Bson| doc! { "entity_name": "J", "entity_type": "t", "date": date, "sct": 1, "cases": 1 };
        let epoch_days = [
            Bson::String("1970-01-01".into()),
            Bson::DateTime(BsonDateTime::from_millis(0)),
        ];
        for date in epoch_days {
            let reasons = decode(Source::Metrics, base(date)).expect_err("day before min_date");
            assert_eq!(
                reasons,
                vec![
                    "`date`: 1970-01-01 is before merge.min_date 2000-01-01; n8n writes \
                      1970-01-01 for a date it could not parse"
                        .to_string()
                ]
            );
        }
    }

    #[test]
    fn percentages_report_every_sub_field() {
        let base = |percentages: Document| {
            doc! {
                "entity_name": "J", "entity_type": "t", "date": "2025-09-25",
                "csat": 1, "neutral": 0, "dsat": 0, "percentages": percentages,
            }
        };
        let reasons = decode(
            Source::Surveys,
            base(doc! { "csat": 120, "neutral": -1, "dsat": "x" }),
        )
        .expect_err("every percentage is invalid");
        assert_eq!(
            reasons,
            vec![
                "`percentages`: csat: 120 is outside 0..100; percentages must be numbers from \
                 0 to 100",
                "`percentages`: neutral: -1 is outside 0..100; percentages must be numbers \
                 from 0 to 100",
                "`percentages`: dsat: \"x\" is not a number; percentages must be numbers from \
                 0 to 100",
            ]
        );
        rejected(
            Source::Surveys,
            base(doc! { "csat": 100 }),
            &[
                "`percentages`: missing neutral",
                "`percentages`: missing dsat",
            ],
        );
    }

    #[test]
    fn negative_zero_stored_as_zero() {
        let record = metrics(doc! {
            "entity_name": "J", "entity_type": "t", "date": "2025-09-25", "sct": -0.0, "cases": 0,
        });
        assert_eq!(
            record.sct.to_bits(),
            0.0_f64.to_bits(),
            "sct {}",
            record.sct
        );
        let record = survey(doc! {
            "entity_name": "J", "entity_type": "t", "date": "2025-09-25",
            "csat": 0, "neutral": 0, "dsat": 1, "satisfaction": -0.0,
            "percentages": { "csat": -0.0, "neutral": "-0", "dsat": 100 },
        });
        assert_eq!(
            record.satisfaction.map(f64::to_bits),
            Some(0.0_f64.to_bits()),
            "satisfaction {:?}",
            record.satisfaction
        );
        let percentages = record.percentages.expect("percentages given");
        assert_eq!(
            percentages.csat.to_bits(),
            0.0_f64.to_bits(),
            "csat {}",
            percentages.csat
        );
        assert_eq!(
            percentages.neutral.to_bits(),
            0.0_f64.to_bits(),
            "neutral {}",
            percentages.neutral
        );
    }

    #[test]
    fn nested_decimal128_only_nan_and_infinity_rejected() {
        let base = |metadata: Document| {
            doc! {
                "entity_name": "J", "entity_type": "t", "date": "2025-09-25", "sct": 1, "cases": 1,
                "metadata": metadata,
            }
        };
        let decimal = |text: &str| {
            text.parse::<Decimal128>()
                .expect("valid decimal128 literal")
        };
        let large = doc! { "x": decimal("1E+400"), "y": decimal("-1E+400") };
        assert_eq!(metrics(base(large.clone())).metadata, large);
        for special in ["NaN", "Infinity", "-Infinity"] {
            rejected(
                Source::Metrics,
                base(doc! { "x": decimal(special) }),
                &[&format!("decimal128 {special} at x is not a finite number")],
            );
        }
    }
}
