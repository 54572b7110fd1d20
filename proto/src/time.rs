//! Conversions between `SystemTime` (and jiff's `Timestamp`) and the protobuf well-known time
//! types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A protobuf timestamp for a system time (times before 1970 clamp to the epoch).
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The protobuf timestamp of now.
pub fn now() -> prost_types::Timestamp {
    timestamp(SystemTime::now())
}

/// The system time of a protobuf timestamp; negative or malformed values clamp to the epoch.
pub fn system_time(ts: &prost_types::Timestamp) -> SystemTime {
    let secs = u64::try_from(ts.seconds).unwrap_or(0);
    let nanos = u32::try_from(ts.nanos).unwrap_or(0).min(999_999_999);
    UNIX_EPOCH + Duration::new(secs, nanos)
}

/// Seconds elapsed from `ts` until `now` (0 if `ts` lies in the future).
pub fn age_seconds(ts: &prost_types::Timestamp, now: SystemTime) -> f64 {
    now.duration_since(system_time(ts))
        .unwrap_or_default()
        .as_secs_f64()
}

/// A protobuf duration.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A std duration from a protobuf one; negative values clamp to zero.
pub fn std_duration(d: &prost_types::Duration) -> Duration {
    Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0).min(999_999_999),
    )
}

/// A protobuf timestamp for a jiff one (job results carry the agent's jiff timestamps).
pub fn from_jiff(t: jiff::Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond(),
    }
}

/// The jiff timestamp of a protobuf one; None when it is out of jiff's range or malformed.
pub fn to_jiff(ts: &prost_types::Timestamp) -> Option<jiff::Timestamp> {
    jiff::Timestamp::new(ts.seconds, ts.nanos).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123);
        assert_eq!(system_time(&timestamp(t)), t);
    }

    #[test]
    fn jiff_timestamps_round_trip_and_bad_ones_are_none() {
        let t: jiff::Timestamp = "2026-04-09T02:00:00.5Z".parse().unwrap();
        assert_eq!(to_jiff(&from_jiff(t)), Some(t));
        let bad = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        };
        assert_eq!(to_jiff(&bad), None);
    }

    #[test]
    fn negative_timestamps_clamp_to_epoch() {
        let ts = prost_types::Timestamp {
            seconds: -5,
            nanos: -1,
        };
        assert_eq!(system_time(&ts), UNIX_EPOCH);
    }
}
