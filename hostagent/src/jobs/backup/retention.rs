//! Which backups of one database to keep: the newest of each of the last `daily` days and the
//! newest of each of the last `weekly` ISO weeks (the union), never fewer than `minimum`.
//! A pure function of the backups, the policy, a clock and a time zone, so it can be tested
//! over any calendar without waiting for one.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// How many backups to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The newest backup of each of this many days (today included).
    pub daily: u32,
    /// The newest backup of each of this many ISO weeks (this week included).
    pub weekly: u32,
    /// Never keep fewer than this many (the newest ones make up the difference).
    pub minimum: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            daily: 7,
            weekly: 4,
            minimum: 3,
        }
    }
}

/// One backup as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// When it was taken (the run's clock).
    pub taken_at: Timestamp,
    /// False when a verify found it damaged: damaged backups never stand in for a day or week
    /// (a good one of that period does), but they age out like the others.
    pub good: bool,
}

/// Keep flags for `backups` (same order): see the module docs. Backups taken after `now` are
/// kept (a clock that went back must not delete the newest backups).
pub fn keep(backups: &[Candidate], policy: Policy, now: Timestamp, tz: &TimeZone) -> Vec<bool> {
    let good: Vec<bool> = backups.iter().map(|b| b.good).collect();
    let all = vec![true; backups.len()];
    let by_good = select(backups, &good, policy, now, tz);
    let by_all = select(backups, &all, policy, now, tz);
    let mut kept: Vec<bool> = (0..backups.len())
        .map(|i| by_good[i] || (!backups[i].good && by_all[i]))
        .collect();
    // The minimum: the newest not yet kept make up the difference, good ones first.
    let want = (policy.minimum as usize).min(backups.len());
    let mut order: Vec<usize> = (0..backups.len()).collect();
    order.sort_by_key(|&i| {
        (
            std::cmp::Reverse(backups[i].good),
            std::cmp::Reverse(backups[i].taken_at),
        )
    });
    for i in order {
        if kept.iter().filter(|k| **k).count() >= want {
            break;
        }
        kept[i] = true;
    }
    kept
}

/// The newest eligible backup of each day and week in the windows, plus future ones.
fn select(
    backups: &[Candidate],
    eligible: &[bool],
    policy: Policy,
    now: Timestamp,
    tz: &TimeZone,
) -> Vec<bool> {
    let today = now.to_zoned(tz.clone()).date();
    let today_n = day_number(today);
    let this_monday = today_n - i64::from(today.weekday().to_monday_zero_offset());
    let mut newest_of_day: std::collections::BTreeMap<i64, usize> = Default::default();
    let mut newest_of_week: std::collections::BTreeMap<i64, usize> = Default::default();
    let mut kept = vec![false; backups.len()];
    for (i, b) in backups.iter().enumerate() {
        if !eligible[i] {
            continue;
        }
        if b.taken_at > now {
            kept[i] = true;
            continue;
        }
        let date = b.taken_at.to_zoned(tz.clone()).date();
        let day = day_number(date);
        let monday = day - i64::from(date.weekday().to_monday_zero_offset());
        if today_n - day < i64::from(policy.daily) {
            let slot = newest_of_day.entry(day).or_insert(i);
            if backups[*slot].taken_at < b.taken_at {
                *slot = i;
            }
        }
        if (this_monday - monday) / 7 < i64::from(policy.weekly) {
            let slot = newest_of_week.entry(monday).or_insert(i);
            if backups[*slot].taken_at < b.taken_at {
                *slot = i;
            }
        }
    }
    for i in newest_of_day.values().chain(newest_of_week.values()) {
        kept[*i] = true;
    }
    kept
}

/// Days since 1970-01-01 (negative before).
fn day_number(date: Date) -> i64 {
    // Through a UTC midnight: exact for every date jiff represents.
    date.to_zoned(TimeZone::UTC)
        .map(|z| z.timestamp().as_second().div_euclid(86_400))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn good(s: &str) -> Candidate {
        Candidate {
            taken_at: at(s),
            good: true,
        }
    }

    fn kept_times(backups: &[Candidate], policy: Policy, now: &str, tz: &TimeZone) -> Vec<String> {
        keep(backups, policy, at(now), tz)
            .iter()
            .zip(backups)
            .filter(|(k, _)| **k)
            .map(|(_, b)| b.taken_at.to_string())
            .collect()
    }

    #[test]
    fn nightly_backups_keep_seven_days_and_four_weeks() {
        // 2026-03-01 is a Sunday. Nightly at 02:00 UTC for 40 nights, up to Thu 2026-04-09.
        let mut backups = Vec::new();
        for d in 0..40 {
            let ts = at("2026-03-01T02:00:00Z") + jiff::SignedDuration::from_hours(24 * d);
            backups.push(Candidate {
                taken_at: ts,
                good: true,
            });
        }
        let kept = kept_times(
            &backups,
            Policy::default(),
            "2026-04-09T03:00:00Z",
            &TimeZone::UTC,
        );
        assert_eq!(
            kept,
            vec![
                // Newest of the ISO weeks starting Mar 16 and Mar 23 (Sundays)...
                "2026-03-22T02:00:00Z",
                "2026-03-29T02:00:00Z",
                // ...and the last 7 days Apr 3..9, whose Sunday Apr 5 ends a week too; the
                // week of Apr 6 is represented by today's backup.
                "2026-04-03T02:00:00Z",
                "2026-04-04T02:00:00Z",
                "2026-04-05T02:00:00Z",
                "2026-04-06T02:00:00Z",
                "2026-04-07T02:00:00Z",
                "2026-04-08T02:00:00Z",
                "2026-04-09T02:00:00Z",
            ]
        );
    }

    #[test]
    fn several_backups_a_day_keep_only_the_newest_of_that_day() {
        let backups = [
            good("2026-04-09T02:00:00Z"),
            good("2026-04-09T14:30:00Z"),
            good("2026-04-09T09:00:00Z"),
            good("2026-04-08T02:00:00Z"),
        ];
        let policy = Policy {
            daily: 7,
            weekly: 0,
            minimum: 0,
        };
        let kept = kept_times(&backups, policy, "2026-04-09T20:00:00Z", &TimeZone::UTC);
        assert_eq!(kept, vec!["2026-04-09T14:30:00Z", "2026-04-08T02:00:00Z"]);
    }

    #[test]
    fn days_are_counted_in_the_time_zone() {
        // 23:30 UTC on Apr 8 is already Apr 9 in Prague (UTC+2 in summer).
        let backups = [good("2026-04-08T23:30:00Z"), good("2026-04-09T05:00:00Z")];
        let policy = Policy {
            daily: 7,
            weekly: 0,
            minimum: 0,
        };
        let prague = sentinel_proto::backup::parse_time_zone("Europe/Prague").unwrap();
        assert_eq!(
            kept_times(&backups, policy, "2026-04-09T12:00:00Z", &prague),
            vec!["2026-04-09T05:00:00Z"]
        );
        assert_eq!(
            kept_times(&backups, policy, "2026-04-09T12:00:00Z", &TimeZone::UTC).len(),
            2
        );
    }

    #[test]
    fn the_minimum_keeps_the_newest_when_the_windows_are_empty() {
        // A backup host that was off for two months: everything is older than the windows.
        let backups = [
            good("2026-01-01T02:00:00Z"),
            good("2026-01-02T02:00:00Z"),
            good("2026-01-03T02:00:00Z"),
            good("2026-01-04T02:00:00Z"),
        ];
        let kept = kept_times(
            &backups,
            Policy::default(),
            "2026-04-09T02:00:00Z",
            &TimeZone::UTC,
        );
        assert_eq!(
            kept,
            vec![
                "2026-01-02T02:00:00Z",
                "2026-01-03T02:00:00Z",
                "2026-01-04T02:00:00Z"
            ]
        );
    }

    #[test]
    fn a_damaged_backup_does_not_stand_for_its_day_but_ages_out_normally() {
        let mut newest = good("2026-04-09T14:00:00Z");
        newest.good = false;
        let backups = [
            good("2026-04-09T02:00:00Z"),
            newest,
            good("2026-03-01T02:00:00Z"),
        ];
        let policy = Policy {
            daily: 7,
            weekly: 0,
            minimum: 0,
        };
        // The good one of Apr 9 is kept; the damaged newest is kept too (it is in the window),
        // so it can be inspected, but never counts as the day's backup.
        assert_eq!(
            kept_times(&backups, policy, "2026-04-09T20:00:00Z", &TimeZone::UTC),
            vec!["2026-04-09T02:00:00Z", "2026-04-09T14:00:00Z"]
        );
        // Once out of the window it goes.
        assert_eq!(
            kept_times(&backups, policy, "2026-04-20T20:00:00Z", &TimeZone::UTC),
            Vec::<String>::new()
        );
    }

    #[test]
    fn backups_from_the_future_are_kept() {
        let backups = [good("2026-05-01T02:00:00Z")];
        let policy = Policy {
            daily: 1,
            weekly: 0,
            minimum: 0,
        };
        assert_eq!(
            kept_times(&backups, policy, "2026-04-09T02:00:00Z", &TimeZone::UTC).len(),
            1
        );
    }
}
