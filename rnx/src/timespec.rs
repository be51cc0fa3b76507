//! Times and durations on the command line: RFC 3339 (nanoseconds allowed) or a duration
//! (`10m`, `1h30m`) counted back from now (for --since/--until) or ahead (for --schedule).

use chrono::{DateTime, Utc};

fn duration(text: &str) -> Option<chrono::Duration> {
    let std = humantime::parse_duration(text).ok()?;
    chrono::Duration::from_std(std).ok()
}

/// A point in the past, as Unix nanoseconds.
pub fn parse_past(text: &str) -> Result<i64, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return time
            .timestamp_nanos_opt()
            .ok_or_else(|| format!("{text:?} is out of range"));
    }
    let ago = duration(text).ok_or_else(|| {
        format!("{text:?} is neither an RFC 3339 time (2026-01-02T03:04:05.123456789Z) nor a duration (10m, 1h30m)")
    })?;
    (Utc::now() - ago)
        .timestamp_nanos_opt()
        .ok_or_else(|| format!("{text:?} is out of range"))
}

/// A point in the future, as RFC 3339 for the RunJob `schedule` field.
pub fn parse_future(text: &str) -> Result<String, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc).to_rfc3339());
    }
    let ahead = duration(text).ok_or_else(|| {
        format!("{text:?} is neither an RFC 3339 time nor a duration like 30s or 1h30m")
    })?;
    Ok((Utc::now() + ahead).to_rfc3339())
}

/// Whether times are shown in UTC (`--utc`) rather than local time.
static UTC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn show_utc(utc: bool) {
    UTC.store(utc, std::sync::atomic::Ordering::Relaxed);
}

fn in_shown_zone(time: DateTime<Utc>) -> DateTime<chrono::FixedOffset> {
    if UTC.load(std::sync::atomic::Ordering::Relaxed) {
        time.fixed_offset()
    } else {
        time.with_timezone(&chrono::Local).fixed_offset()
    }
}

/// Unix nanoseconds as RFC 3339 with nanoseconds, in local time with its offset (`Z` in UTC).
pub fn format_ns(ns: i64) -> String {
    utc_of(ns)
        .map(|t| in_shown_zone(t).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
        .unwrap_or_else(|| ns.to_string())
}

/// Unix nanoseconds as RFC 3339 to the second, in the zone times are shown in.
pub fn format_s(ns: i64) -> String {
    utc_of(ns)
        .map(|t| in_shown_zone(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ns.to_string())
}

/// Unix nanoseconds as RFC 3339 in UTC with nanoseconds, as JSON output gives every time.
pub fn format_ns_utc(ns: i64) -> String {
    utc_of(ns)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
        .unwrap_or_else(|| ns.to_string())
}

fn utc_of(ns: i64) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp(
        ns.div_euclid(1_000_000_000),
        ns.rem_euclid(1_000_000_000) as u32,
    )
}

/// An RFC 3339 time from the server, for a table: local time to the second (`…Z` with
/// `--utc`); empty stays empty, anything unreadable is shown as it came.
pub fn for_table(rfc3339: &str) -> String {
    shown_as(rfc3339, "%Y-%m-%d %H:%M:%S")
}

/// An RFC 3339 time for `job status`: as [`for_table`], to the millisecond.
pub fn for_status(rfc3339: &str) -> String {
    shown_as(rfc3339, "%Y-%m-%d %H:%M:%S%.3f")
}

fn shown_as(rfc3339: &str, format: &str) -> String {
    match DateTime::parse_from_rfc3339(rfc3339) {
        Ok(time) => {
            let shown = in_shown_zone(time.with_timezone(&Utc));
            let zone = if UTC.load(std::sync::atomic::Ordering::Relaxed) {
                "Z"
            } else {
                ""
            };
            format!("{}{zone}", shown.format(format))
        }
        Err(_) => rfc3339.to_owned(),
    }
}

/// How long ago an RFC 3339 time was ("45s ago", "3m ago", "2h ago", "5d ago"; "in 3m" for
/// the future); empty for an empty or unreadable time.
pub fn ago(rfc3339: &str) -> String {
    let Ok(time) = DateTime::parse_from_rfc3339(rfc3339) else {
        return String::new();
    };
    let seconds = (Utc::now() - time.with_timezone(&Utc)).num_seconds();
    let span = |s: i64| match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    };
    if seconds >= 0 {
        format!("{} ago", span(seconds))
    } else {
        format!("in {}", span(-seconds))
    }
}

/// persist's bounds (`start_time`, `end_time`; 0 leaves a bound open) for `[since, until)`,
/// or `None` when nothing can be in the window: `until` at or before the epoch (no line is
/// stamped before 1970) or not after `since`. A `since` before the epoch is no bound at all.
pub fn persist_bounds(since: Option<i64>, until: Option<i64>) -> Option<(i64, i64)> {
    if let Some(until) = until
        && (until <= 0 || since.is_some_and(|since| until <= since))
    {
        return None;
    }
    Some((since.unwrap_or(0).max(0), until.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_mean_what_they_say() {
        assert_eq!(persist_bounds(None, None), Some((0, 0)));
        assert_eq!(
            persist_bounds(Some(-5), None),
            Some((0, 0)),
            "before 1970: no bound"
        );
        assert_eq!(
            persist_bounds(None, Some(0)),
            None,
            "until the epoch: nothing"
        );
        assert_eq!(
            persist_bounds(None, Some(-1)),
            None,
            "until before it: nothing"
        );
        assert_eq!(persist_bounds(Some(7), Some(7)), None, "an empty window");
        assert_eq!(persist_bounds(Some(7), Some(9)), Some((7, 9)));
        assert_eq!(persist_bounds(None, Some(1)), Some((0, 1)));
    }
}
