//! Warnings that peers can trigger at will (a failed TLS handshake, an event for a job that
//! does not exist): a few per peer and per window are logged as they come, the rest are
//! counted and summed up in one line per window, so that one client cannot flood the log.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

/// Peers tracked per window; warnings of further peers are counted under one shared key.
const MAX_KEYS: usize = 1024;
/// Key of the peers beyond [`MAX_KEYS`].
const OTHERS: &str = "(other peers)";

/// A rate limit for one kind of warning.
pub struct WarnLimiter {
    what: &'static str,
    per_key: u32,
    total: u32,
    window: Duration,
    state: Mutex<Option<Window>>,
}

struct Window {
    started: Instant,
    /// Per key, warnings logged and warnings held back in this window.
    seen: HashMap<String, (u32, u64)>,
    logged: u32,
    suppressed: u64,
    /// Keys with at least one suppressed warning.
    suppressed_keys: usize,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            seen: HashMap::new(),
            logged: 0,
            suppressed: 0,
            suppressed_keys: 0,
        }
    }
}

impl WarnLimiter {
    /// At most `per_key` warnings per key and `total` over all keys are logged per `window`;
    /// `what` names them in the summary line.
    pub const fn new(what: &'static str, per_key: u32, total: u32, window: Duration) -> Self {
        Self {
            what,
            per_key,
            total,
            window,
            state: Mutex::new(None),
        }
    }

    /// Logs `message()` as a warning with `key` (the peer), unless its budget is spent. The
    /// message is written as it is: outside strings in it must already be escaped (format
    /// them with `{:?}`).
    pub fn warn(&self, key: &str, message: impl FnOnce() -> String) {
        let now = Instant::now();
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.roll(&mut guard, now);
        let window = guard.get_or_insert_with(|| Window::new(now));
        let key = if window.seen.contains_key(key) || window.seen.len() < MAX_KEYS {
            key
        } else {
            OTHERS
        };
        let (logged, held) = window.seen.entry(key.to_string()).or_default();
        if *logged < self.per_key && window.logged < self.total {
            *logged += 1;
            window.logged += 1;
            let message = message();
            drop(guard);
            warn!(peer = %key, "{message}");
            return;
        }
        if *held == 0 {
            window.suppressed_keys += 1;
        }
        *held += 1;
        window.suppressed += 1;
    }

    /// Writes the summary of a window that is over, if anything was held back. Called by
    /// [`WarnLimiter::warn`] and periodically, so that a flood that stops is still summed up.
    pub fn flush(&self) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.roll(&mut guard, Instant::now());
    }

    fn roll(&self, state: &mut Option<Window>, now: Instant) {
        let Some(window) = state else {
            return;
        };
        if now.duration_since(window.started) < self.window {
            return;
        }
        if window.suppressed > 0 {
            warn!(
                suppressed = window.suppressed,
                peers = window.suppressed_keys,
                window_secs = self.window.as_secs(),
                "{}: {} more not logged in the last {}s (rate limit)",
                self.what,
                window.suppressed,
                self.window.as_secs()
            );
        }
        *state = None;
    }

    /// How many warnings were held back in the current window (for tests).
    pub fn suppressed(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |w| w.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_from_one_peer_logs_a_few_and_counts_the_rest() {
        let limiter = WarnLimiter::new("test warnings", 3, 10, Duration::from_secs(60));
        let mut logged = 0;
        for _ in 0..1000 {
            limiter.warn("10.0.0.1", || {
                logged += 1;
                "x".into()
            });
        }
        assert_eq!(logged, 3);
        assert_eq!(limiter.suppressed(), 997);
        // Another peer still gets its own few.
        let mut other = 0;
        for _ in 0..5 {
            limiter.warn("10.0.0.2", || {
                other += 1;
                "y".into()
            });
        }
        assert_eq!(other, 3);
    }

    #[test]
    fn many_peers_share_the_total_budget_and_memory_stays_bounded() {
        let limiter = WarnLimiter::new("test warnings", 3, 10, Duration::from_secs(60));
        let mut logged = 0;
        for i in 0..5000 {
            limiter.warn(&format!("peer-{i}"), || {
                logged += 1;
                String::new()
            });
        }
        assert_eq!(logged, 10);
        let keys = limiter
            .state
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |w| w.seen.len());
        assert!(keys <= MAX_KEYS + 1, "{keys}");
    }

    #[test]
    fn a_new_window_starts_after_the_old_one_is_over() {
        let limiter = WarnLimiter::new("test warnings", 1, 10, Duration::from_millis(20));
        limiter.warn("a", String::new);
        limiter.warn("a", String::new);
        assert_eq!(limiter.suppressed(), 1);
        std::thread::sleep(Duration::from_millis(30));
        limiter.flush();
        assert_eq!(limiter.suppressed(), 0);
        let mut logged = false;
        limiter.warn("a", || {
            logged = true;
            String::new()
        });
        assert!(logged);
    }
}
