//! Backup schedules: a cron expression evaluated in a time zone (DST handled by croner over
//! jiff), and the rules that make a schedule survive restarts: the last occurrence run is
//! persisted, an occurrence missed while the controller was down runs once when it comes back
//! (however many were missed), and an occurrence whose previous run is still going is skipped.

use std::str::FromStr;

use jiff::tz::TimeZone;
use jiff::Timestamp;

/// One schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// "backup", "verify" or "restore_test".
    pub name: &'static str,
    /// The cron expression as configured.
    pub expr: String,
    /// The time zone's name as configured.
    pub time_zone: String,
    cron: croner::Cron,
    tz: TimeZone,
}

/// What to do when the controller starts, for one schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStart {
    /// Never ran here: start counting from now (nothing is owed).
    Baseline,
    /// Nothing was missed.
    UpToDate,
    /// At least one occurrence passed while the controller was down: run once, for the latest.
    RunMissed(Timestamp),
}

impl Schedule {
    /// Parses `expr` (5 fields, or 6 with seconds first) in `time_zone`.
    pub fn parse(name: &'static str, expr: &str, time_zone: &str) -> Result<Self, String> {
        let tz = sentinel_proto::backup::parse_time_zone(time_zone)?;
        let cron = croner::Cron::from_str(expr.trim())
            .map_err(|e| format!("{expr:?} is not a cron expression: {e}"))?;
        let schedule = Self {
            name,
            expr: expr.trim().to_string(),
            time_zone: time_zone.to_string(),
            cron,
            tz,
        };
        // A pattern that never matches (Feb 30) would leave the schedule silent forever.
        if schedule.next_after(Timestamp::now()).is_none() {
            return Err(format!("{expr:?} never matches"));
        }
        Ok(schedule)
    }

    /// The first occurrence strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_next_occurrence(&t.to_zoned(self.tz.clone()), false)
            .ok()
            .map(|z| z.timestamp())
    }

    /// The latest occurrence at or before `t`.
    pub fn latest_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_previous_occurrence(&t.to_zoned(self.tz.clone()), true)
            .ok()
            .map(|z| z.timestamp())
    }

    /// What is owed at start-up, given the last occurrence run (or counted from).
    pub fn on_start(&self, last_run: Option<Timestamp>, now: Timestamp) -> OnStart {
        let Some(last) = last_run else {
            return OnStart::Baseline;
        };
        match self.next_after(last) {
            Some(next) if next <= now => {
                OnStart::RunMissed(self.latest_at_or_before(now).unwrap_or(next))
            }
            _ => OnStart::UpToDate,
        }
    }

    /// `t` in the schedule's time zone, for messages ("2026-04-09 02:00 CEST").
    pub fn local(&self, t: Timestamp) -> String {
        t.to_zoned(self.tz.clone())
            .strftime("%Y-%m-%d %H:%M:%S %Z")
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn daily_at_two_follows_the_time_zone_across_dst() {
        let s = Schedule::parse("backup", "0 2 * * *", "Europe/Prague").unwrap();
        // Winter: 02:00 CET is 01:00 UTC.
        assert_eq!(
            s.next_after(at("2026-01-10T12:00:00Z")),
            Some(at("2026-01-11T01:00:00Z"))
        );
        // Summer: 02:00 CEST is 00:00 UTC.
        assert_eq!(
            s.next_after(at("2026-07-10T12:00:00Z")),
            Some(at("2026-07-11T00:00:00Z"))
        );
        assert_eq!(
            s.latest_at_or_before(at("2026-07-11T00:00:00Z")),
            Some(at("2026-07-11T00:00:00Z"))
        );
    }

    #[test]
    fn a_controller_down_over_two_runs_the_missed_backup_once() {
        let s = Schedule::parse("backup", "0 2 * * *", "UTC").unwrap();
        // Last ran the night of the 9th; down from the 10th 01:00 until the 12th 09:00.
        let owed = s.on_start(Some(at("2026-04-09T02:00:00Z")), at("2026-04-12T09:00:00Z"));
        // Once, for the latest missed night (not three times).
        assert_eq!(owed, OnStart::RunMissed(at("2026-04-12T02:00:00Z")));
        // Back before 02:00: nothing owed.
        assert_eq!(
            s.on_start(Some(at("2026-04-09T02:00:00Z")), at("2026-04-10T01:59:00Z")),
            OnStart::UpToDate
        );
        assert_eq!(
            s.on_start(None, at("2026-04-10T01:59:00Z")),
            OnStart::Baseline
        );
    }

    #[test]
    fn monthly_restore_tests_and_fixed_offsets() {
        let s = Schedule::parse("restore_test", "0 4 1 * *", "+01:00").unwrap();
        assert_eq!(
            s.next_after(at("2026-04-09T12:00:00Z")),
            Some(at("2026-05-01T03:00:00Z"))
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_refused() {
        assert!(Schedule::parse("backup", "0 25 * * *", "UTC").is_err());
        assert!(Schedule::parse("backup", "0 2 * * *", "Nowhere/City").is_err());
        assert!(Schedule::parse("backup", "0 0 30 2 *", "UTC")
            .unwrap_err()
            .contains("never"));
    }
}
