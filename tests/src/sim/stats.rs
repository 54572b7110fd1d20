//! What the simulated fleet counts: connection attempts and their outcomes, messages and their
//! encoded bytes by kind, TCP bytes (TLS records, HTTP/2 framing and all), and latencies.
//! Counters are plain atomics shared by every agent; benchmarks take [`Snapshot`]s and subtract.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// One counter of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Sessions started (TCP connect + TLS + HTTP/2 + hello), successful or not.
    Attempts,
    /// Attempts that failed before the stream opened (TCP, TLS, HTTP/2, timeouts).
    ConnectFailed,
    /// Attempts the controller answered with an error status.
    Refused,
    /// Sessions that ended after their welcome.
    Lost,
    /// Welcomes received.
    Welcomes,
    /// Full state reports sent.
    ReportsFull,
    /// Delta state reports sent.
    ReportsDelta,
    /// Heartbeats sent.
    Heartbeats,
    /// Encoded bytes of full reports (protobuf plus the 5-byte gRPC frame header).
    BytesFull,
    /// Encoded bytes of delta reports.
    BytesDelta,
    /// Encoded bytes of heartbeats.
    BytesHeartbeat,
    /// Encoded bytes of every other agent message (hellos, probes).
    BytesOtherUp,
    /// Encoded bytes of controller messages received.
    BytesDown,
    /// Bytes written to TCP (TLS records, so HTTP/2 framing, headers and pings included).
    TcpOut,
    /// Bytes read from TCP.
    TcpIn,
    /// Probe replies received.
    ProbeReplies,
}

impl Counter {
    const COUNT: usize = Counter::ProbeReplies as usize + 1;
}

/// Counters shared by every simulated agent.
pub struct Stats {
    counters: [AtomicU64; Counter::COUNT],
    connected: AtomicI64,
    welcome_latency_us: Mutex<Vec<u32>>,
    job_arrivals: Mutex<Vec<std::time::Instant>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            connected: AtomicI64::new(0),
            welcome_latency_us: Mutex::new(Vec::new()),
            job_arrivals: Mutex::new(Vec::new()),
        }
    }
}

impl Stats {
    /// Records that a signed job reached an agent (the dispatch benchmark's clock stop).
    pub fn job_arrived(&self, at: std::time::Instant) {
        self.job_arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(at);
    }

    /// The arrival times recorded since the last call.
    pub fn take_job_arrivals(&self) -> Vec<std::time::Instant> {
        std::mem::take(&mut *self.job_arrivals.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Adds `n` to `counter`.
    pub fn add(&self, counter: Counter, n: u64) {
        self.counters[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// The current value of `counter`.
    pub fn get(&self, counter: Counter) -> u64 {
        self.counters[counter as usize].load(Ordering::Relaxed)
    }

    /// Agents that hold a welcomed stream right now.
    pub fn connected(&self) -> u64 {
        u64::try_from(self.connected.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Marks one more agent connected; the guard marks it disconnected when dropped.
    pub fn connected_guard(&self) -> ConnectedGuard<'_> {
        self.connected.fetch_add(1, Ordering::Relaxed);
        ConnectedGuard(self)
    }

    /// Records how long a hello took to be answered with a welcome.
    pub fn record_welcome(&self, latency: Duration) {
        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        self.welcome_latency_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(us);
    }

    /// Takes the welcome latencies recorded so far.
    pub fn take_welcome_latencies(&self) -> Vec<Duration> {
        std::mem::take(
            &mut *self
                .welcome_latency_us
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
        .into_iter()
        .map(|us| Duration::from_micros(u64::from(us)))
        .collect()
    }

    /// Every counter now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(std::array::from_fn(|i| {
            self.counters[i].load(Ordering::Relaxed)
        }))
    }
}

/// Decrements the connected gauge on drop.
pub struct ConnectedGuard<'a>(&'a Stats);

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every counter at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot([u64; Counter::COUNT]);

impl Snapshot {
    /// One counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// What happened between `earlier` and this snapshot.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot(std::array::from_fn(|i| {
            self.0[i].saturating_sub(earlier.0[i])
        }))
    }

    /// Encoded bytes sent upstream, all kinds.
    pub fn bytes_up(&self) -> u64 {
        self.get(Counter::BytesFull)
            + self.get(Counter::BytesDelta)
            + self.get(Counter::BytesHeartbeat)
            + self.get(Counter::BytesOtherUp)
    }

    /// The summary as JSON, for `fleet-sim run`.
    pub fn to_json(self) -> serde_json::Value {
        use Counter::*;
        serde_json::json!({
            "attempts": self.get(Attempts),
            "connect_failed": self.get(ConnectFailed),
            "refused": self.get(Refused),
            "lost": self.get(Lost),
            "welcomes": self.get(Welcomes),
            "reports_full": self.get(ReportsFull),
            "reports_delta": self.get(ReportsDelta),
            "heartbeats": self.get(Heartbeats),
            "bytes_full": self.get(BytesFull),
            "bytes_delta": self.get(BytesDelta),
            "bytes_heartbeat": self.get(BytesHeartbeat),
            "bytes_other_up": self.get(BytesOtherUp),
            "bytes_down": self.get(BytesDown),
            "tcp_out": self.get(TcpOut),
            "tcp_in": self.get(TcpIn),
        })
    }
}

/// Latency percentiles of a sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    /// Sample size.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
}

impl Percentiles {
    /// Nearest-rank percentiles of `sample` (all zero when it is empty).
    pub fn of(mut sample: Vec<Duration>) -> Self {
        if sample.is_empty() {
            return Self::default();
        }
        sample.sort_unstable();
        let rank = |p: f64| {
            let i = ((p * sample.len() as f64).ceil() as usize).clamp(1, sample.len());
            sample[i - 1]
        };
        Self {
            count: sample.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: sample[sample.len() - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let sample: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(sample);
        assert_eq!(p.p50, Duration::from_millis(50));
        assert_eq!(p.p99, Duration::from_millis(99));
        assert_eq!(p.max, Duration::from_millis(100));
        assert_eq!(Percentiles::of(vec![]).count, 0);
    }

    #[test]
    fn snapshots_subtract() {
        let stats = Stats::default();
        stats.add(Counter::Attempts, 3);
        let before = stats.snapshot();
        stats.add(Counter::Attempts, 2);
        assert_eq!(stats.snapshot().since(&before).get(Counter::Attempts), 2);
        let guard = stats.connected_guard();
        assert_eq!(stats.connected(), 1);
        drop(guard);
        assert_eq!(stats.connected(), 0);
    }
}
