//! The `perfagg reset` command: parses the request, checks that it can succeed (a `--since`
//! time must still be inside the oplog window), shows what it will do, requests confirmation
//! on a terminal, and stores the request. The daemon performs it (see `perform`).

use std::io::{BufRead, IsTerminal, Write};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use mongodb::bson::oid::ObjectId;
use mongodb::bson::{doc, DateTime as BsonDateTime, Document, Timestamp};
use mongodb::{Client, Database};

use crate::config::Config;
use crate::deployment;
use crate::error::{Action, Error};
use crate::state::{timestamp_text, ResetMode, ResetRequest, Resume, StateStore};

/// Reset flags from the command line.
#[derive(Debug, Clone, Default)]
pub struct ResetArgs {
    /// `--since`: a time to replay from, or with `--rescan` the first day to rescan.
    pub since: Option<String>,
    pub rescan: bool,
    pub to_now: bool,
    pub rebuild: bool,
    /// `--yes`: skip the confirmation.
    pub yes: bool,
}

/// Accepted forms of `--since`, quoted in errors.
const TIME_FORMS: &str =
    "use an RFC 3339 timestamp such as 2025-09-25T08:00:00Z, or a day such as \
     2025-09-25 (its midnight in merge.timezone)";

/// Runs `perfagg reset`.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for a malformed or impossible request, a time outside the
/// oplog window or a missing confirmation; [`Error::Mongo`] when the server fails.
pub async fn run(config: &Config, args: &ResetArgs) -> Result<(), Error> {
    let mode = parse_mode(args, config.merge.timezone, Utc::now())?;
    let client = deployment::connect(config).await?;
    deployment::check(&client, config).await?;
    let db = client.database(&config.mongodb.database);
    check_database_in_use(&db, config).await?;
    if let ResetMode::Since(time) = &mode {
        check_oplog_window(&client, *time).await?;
    }

    let plan = describe_plan(&db, config, &mode).await?;
    println!("{plan}");
    if !args.yes {
        confirm()?;
    }

    let request = ResetRequest {
        id: ObjectId::new(),
        mode,
        requested_by: requested_by(),
        requested_at: BsonDateTime::now(),
    };
    let state = StateStore::new(&db, config);
    state.request_reset(&request).await?;
    println!(
        "Reset {} accepted. A running perfagg performs it within a few seconds, otherwise the next \
         `perfagg run` does; `perfagg status` shows when it is done.",
        request.id
    );
    Ok(())
}

/// Turns the flags into a reset mode; `now` bounds `--since`.
fn parse_mode(args: &ResetArgs, timezone: Tz, now: DateTime<Utc>) -> Result<ResetMode, Error> {
    let chosen = [args.rescan, args.to_now, args.rebuild]
        .iter()
        .filter(|flag| **flag)
        .count();
    if chosen > 1 {
        return Err(invalid("choose one of --rescan, --to-now and --rebuild"));
    }
    if args.rescan {
        let since = args.since.as_deref().map(parse_day).transpose()?;
        if let Some(day) = since.filter(|day| *day > now.with_timezone(&timezone).date_naive()) {
            return Err(invalid(&format!(
                "--since {day} is in the future; give a past day"
            )));
        }
        return Ok(ResetMode::Rescan(since));
    }
    if args.to_now || args.rebuild {
        if args.since.is_some() {
            return Err(invalid(
                "--since goes with --rescan or alone, not with --to-now or --rebuild",
            ));
        }
        return Ok(if args.to_now {
            ResetMode::ToNow
        } else {
            ResetMode::Rebuild
        });
    }
    let Some(since) = args.since.as_deref() else {
        return Err(invalid(
            "say what to reset: --since TIME, --rescan [--since DAY], --to-now or --rebuild",
        ));
    };
    let time = parse_time(since, timezone)?;
    if time > now {
        return Err(invalid(&format!(
            "--since {since} is in the future; give a past time"
        )));
    }
    let seconds = u32::try_from(time.timestamp()).map_err(|_| {
        invalid(&format!(
            "--since {since} is outside the range of cluster times"
        ))
    })?;
    Ok(ResetMode::Since(Timestamp {
        time: seconds,
        increment: 0,
    }))
}

/// Parses `--since` for a replay: RFC 3339, or a day meaning its midnight in `timezone`.
fn parse_time(text: &str, timezone: Tz) -> Result<DateTime<Utc>, Error> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let day = parse_day(text)
        .map_err(|_| invalid(&format!("--since `{text}` is not a time; {TIME_FORMS}")))?;
    let midnight = day.and_hms_opt(0, 0, 0).unwrap_or_default();
    timezone
        .from_local_datetime(&midnight)
        .earliest()
        .map(|time| time.with_timezone(&Utc))
        .ok_or_else(|| {
            invalid(&format!(
                "--since {text}: midnight does not exist in {}",
                timezone.name()
            ))
        })
}

fn parse_day(text: &str) -> Result<NaiveDate, Error> {
    let is_day = text.len() == 10 && NaiveDate::parse_from_str(text, "%Y-%m-%d").is_ok();
    if !is_day {
        return Err(invalid(&format!(
            "--since `{text}` is not a day; write it as YYYY-MM-DD"
        )));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|_| invalid(&format!("--since `{text}` is not a day")))
}

/// Rejects a reset of a database that contains neither perfagg's state nor a staging
/// collection, because most likely `--config` or `PERFAGG_DATABASE` names the wrong one.
async fn check_database_in_use(db: &Database, config: &Config) -> Result<(), Error> {
    let names = db
        .list_collection_names()
        .await
        .map_err(Error::mongo(Action::Status))?;
    let collections = &config.collections;
    let expected = [
        &collections.state,
        &collections.metrics,
        &collections.surveys,
    ];
    if expected.iter().any(|name| names.contains(name)) {
        return Ok(());
    }
    Err(invalid(&format!(
        "database `{}` has none of {}, {} and {}, so perfagg has never run on it; check \
         --config and PERFAGG_DATABASE",
        db.name(),
        collections.state,
        collections.metrics,
        collections.surveys
    )))
}

/// Refuses a replay from before the oldest entry of the oplog, which the server cannot serve.
async fn check_oplog_window(client: &Client, since: Timestamp) -> Result<(), Error> {
    let oldest = oldest_oplog_time(client).await?;
    if since < oldest {
        return Err(invalid(&format!(
            "--since {} is outside the oplog window: the oldest time still available is {}; \
             use `perfagg reset --rescan` to reprocess from the staging collections instead",
            timestamp_text(since),
            timestamp_text(oldest)
        )));
    }
    Ok(())
}

/// Returns the cluster time of the oldest oplog entry.
///
/// # Errors
///
/// [`Error::Mongo`] when the oplog cannot be read (the user needs read access to `local`).
pub async fn oldest_oplog_time(client: &Client) -> Result<Timestamp, Error> {
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    let first = oplog
        .find_one(doc! {})
        .sort(doc! { "$natural": 1 })
        .projection(doc! { "ts": 1 })
        .await
        .map_err(Error::mongo(Action::Status))?;
    first
        .and_then(|entry| entry.get_timestamp("ts").ok())
        .ok_or_else(|| invalid("the oplog is empty; is this a replica set member?"))
}

/// Describes what the reset will do, with the number of staging documents involved.
async fn describe_plan(db: &Database, config: &Config, mode: &ResetMode) -> Result<String, Error> {
    let collections = [&config.collections.metrics, &config.collections.surveys];
    let count = |filter: Document| async move {
        let mut total = 0;
        for name in collections {
            total += db
                .collection::<Document>(name)
                .count_documents(filter.clone())
                .await
                .map_err(Error::mongo(Action::Status))?;
        }
        Ok::<u64, Error>(total)
    };
    let written_since = |time: Timestamp| doc! { "_id": { "$gte": ObjectId::from_bytes(object_id_prefix(time.time)) } };
    let text = match mode {
        ResetMode::Since(time) => format!(
            "Replay the change stream from {}: about {} written since then (counted by the \
             creation time in their ObjectId).",
            timestamp_text(*time),
            staging_documents(count(written_since(*time)).await?)
        ),
        ResetMode::Rescan(since) => format!(
            "Read {} in insertion order and merge {}, then continue the change stream from the \
             moment the rescan begins.",
            staging_documents(count(doc! {}).await?),
            since.map_or_else(
                || "them all".to_string(),
                |day| format!("those dated on or after {day}")
            )
        ),
        ResetMode::ToNow => {
            let stored = StateStore::new(db, config).load().await?;
            let backlog = match stored.resume {
                Some(Resume::After(position)) => match position.cluster_time {
                    Some(time) => format!(
                        "changes after the stored position {} will not be merged (about {} were \
                         written since then)",
                        timestamp_text(time),
                        staging_documents(count(written_since(time)).await?)
                    ),
                    None => "the backlog after the stored position will not be merged".to_string(),
                },
                Some(Resume::AtTime(time)) => {
                    format!("the replay from {} will not happen", timestamp_text(time))
                }
                None => "there is no stored position yet".to_string(),
            };
            format!("Forget the stored position and continue from the current time: {backlog}.")
        }
        ResetMode::Rebuild => {
            let targets = db
                .collection::<Document>(&config.collections.target)
                .count_documents(doc! {})
                .await
                .map_err(Error::mongo(Action::Status))?;
            format!(
                "Clear perfagg's fields in {targets} target documents (fields of other writers stay; \
                 documents left with only their key are removed), then rescan {}. Dashboards see \
                 partial data until the rescan ends.",
                staging_documents(count(doc! {}).await?)
            )
        }
    };
    Ok(text)
}

/// Formats a count of staging documents with the right plural.
fn staging_documents(count: u64) -> String {
    match count {
        1 => "1 staging document".to_string(),
        count => format!("{count} staging documents"),
    }
}

/// Returns the 12 bytes of the smallest ObjectId created at `seconds`.
fn object_id_prefix(seconds: u32) -> [u8; 12] {
    let mut bytes = [0_u8; 12];
    bytes[..4].copy_from_slice(&seconds.to_be_bytes());
    bytes
}

/// Asks on the terminal; refuses without one.
fn confirm() -> Result<(), Error> {
    if !std::io::stdin().is_terminal() {
        return Err(invalid(
            "standard input is not a terminal, so the reset cannot be confirmed; rerun with --yes",
        ));
    }
    print!("Proceed? [y/N] ");
    std::io::stdout().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|error| invalid(&format!("cannot read the confirmation: {error}")))?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        return Ok(());
    }
    Err(invalid("reset not confirmed; nothing was changed"))
}

fn requested_by() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_string());
    let host = hostname::get()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-host".to_string());
    format!("{user}@{host}")
}

fn invalid(message: &str) -> Error {
    Error::InvalidArgument {
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(since: Option<&str>) -> ResetArgs {
        ResetArgs {
            since: since.map(str::to_string),
            ..ResetArgs::default()
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-04T12:00:00Z")
            .expect("valid time")
            .with_timezone(&Utc)
    }

    fn message(result: Result<ResetMode, Error>) -> String {
        match result {
            Err(error) => error.to_string(),
            Ok(mode) => panic!("expected an error, got {mode:?}"),
        }
    }

    #[test]
    fn since_accepts_rfc3339_and_day() {
        let berlin: Tz = "Europe/Berlin".parse().expect("known zone");
        let mode = parse_mode(&args(Some("2025-09-25T08:00:00Z")), Tz::UTC, now()).expect("valid");
        assert_eq!(
            mode,
            ResetMode::Since(Timestamp {
                time: 1_758_787_200,
                increment: 0
            })
        );
        let mode = parse_mode(&args(Some("2025-09-25")), berlin, now()).expect("valid");
        // Midnight in Berlin (UTC+2 in September) is 22:00 UTC the day before.
        assert_eq!(
            mode,
            ResetMode::Since(Timestamp {
                time: 1_758_751_200,
                increment: 0
            })
        );
    }

    #[test]
    fn malformed_since_names_forms() {
        let text = message(parse_mode(&args(Some("25/09/2025")), Tz::UTC, now()));
        assert!(text.contains("is not a time"), "{text}");
        assert!(text.contains("RFC 3339"), "{text}");
        let text = message(parse_mode(&args(Some("2030-01-01")), Tz::UTC, now()));
        assert!(text.contains("in the future"), "{text}");
    }

    #[test]
    fn modes_are_exclusive() {
        let both = ResetArgs {
            to_now: true,
            rebuild: true,
            ..ResetArgs::default()
        };
        assert!(message(parse_mode(&both, Tz::UTC, now())).contains("choose one"));
        let since_to_now = ResetArgs {
            to_now: true,
            since: Some("2025-01-01".into()),
            ..ResetArgs::default()
        };
        assert!(message(parse_mode(&since_to_now, Tz::UTC, now())).contains("not with --to-now"));
        assert!(message(parse_mode(&ResetArgs::default(), Tz::UTC, now()))
            .contains("say what to reset"));
    }

    #[test]
    fn rescan_since_takes_day() {
        let rescan = ResetArgs {
            rescan: true,
            since: Some("2025-09-01".into()),
            ..ResetArgs::default()
        };
        let day = NaiveDate::from_ymd_opt(2025, 9, 1).expect("valid day");
        assert_eq!(
            parse_mode(&rescan, Tz::UTC, now()).expect("valid"),
            ResetMode::Rescan(Some(day))
        );
        let rescan_time = ResetArgs {
            rescan: true,
            since: Some("2025-09-01T00:00:00Z".into()),
            ..ResetArgs::default()
        };
        assert!(message(parse_mode(&rescan_time, Tz::UTC, now())).contains("is not a day"));
    }

    #[test]
    fn rescan_since_future_day_refused() {
        let rescan = ResetArgs {
            rescan: true,
            since: Some("2026-12-06".into()),
            ..ResetArgs::default()
        };
        assert!(message(parse_mode(&rescan, Tz::UTC, now())).contains("in the future"));
    }

    #[test]
    fn object_id_prefix_encodes_seconds() {
        let id = ObjectId::from_bytes(object_id_prefix(1_758_787_200));
        assert_eq!(id.timestamp().timestamp_millis(), 1_758_787_200_000);
    }
}
