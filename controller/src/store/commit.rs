//! The commit barrier between the controller's in-memory state and its store: a write that
//! must be durable before it is acknowledged (an RPC answering with a job, a deploy, a cancel;
//! a job transition at-most-once depends on) asks the flusher for a commit and waits until a
//! flush that began after the write has been saved. Writes that arrive while a flush runs are
//! grouped into the next one, so one store transaction serves many waiters.
//!
//! Host state reports do not wait: agents resend their state on every connection, so they
//! stay write-behind (flushed once a second).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// How long a write waits for the store before its caller is told the write may not be kept.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a write could not be confirmed durable.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The store did not save the write in time (it keeps retrying; see the controller's log).
    #[error(
        "the controller's store did not confirm the write within {0:?}; it may be lost if the \
         controller stops now (the store keeps retrying: see the controller's log)"
    )]
    Timeout(Duration),
}

/// The barrier. One per controller, shared by everything that writes.
#[derive(Debug)]
pub struct Commits {
    /// Commit requests made so far; a flush covers every request counted before it began.
    requested: AtomicU64,
    /// The highest request known saved.
    saved: watch::Sender<u64>,
    /// Wakes the flusher early.
    wake: Notify,
    /// Whether a flusher serves this barrier. Without one (unit tests of in-memory parts)
    /// there is nothing to wait for.
    served: AtomicBool,
}

impl Default for Commits {
    fn default() -> Self {
        Self {
            requested: AtomicU64::new(0),
            saved: watch::channel(0).0,
            wake: Notify::new(),
            served: AtomicBool::new(false),
        }
    }
}

impl Commits {
    /// Waits until everything written to memory before this call is saved in the store.
    pub async fn commit(&self) -> Result<(), CommitError> {
        if !self.served.load(Ordering::Acquire) {
            return Ok(());
        }
        let want = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut saved = self.saved.subscribe();
        self.wake.notify_one();
        // `wait_for` fails only when the sender is gone, and `self` owns it.
        let reached = tokio::time::timeout(COMMIT_TIMEOUT, saved.wait_for(|s| *s >= want))
            .await
            .is_ok_and(|r| r.is_ok());
        if reached {
            Ok(())
        } else {
            Err(CommitError::Timeout(COMMIT_TIMEOUT))
        }
    }

    /// Called by the flusher once, before it serves requests.
    pub fn serve(&self) {
        self.served.store(true, Ordering::Release);
    }

    /// Called by the flusher before it takes what changed: the requests a successful flush
    /// will then cover.
    pub fn pending(&self) -> u64 {
        self.requested.load(Ordering::SeqCst)
    }

    /// Called by the flusher after everything it took was saved.
    pub fn saved(&self, upto: u64) {
        self.saved.send_if_modified(|s| {
            if upto > *s {
                *s = upto;
                true
            } else {
                false
            }
        });
    }

    /// Resolves when a writer asks for a commit (or at once if one asked since the last call).
    pub async fn requested(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_commit_waits_for_a_flush_that_began_after_it() {
        let c = Arc::new(Commits::default());
        c.serve();
        let before = c.pending();
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.commit().await }
        });
        c.requested().await;
        // A flush that began before the request does not release it.
        c.saved(before);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        let upto = c.pending();
        c.saved(upto);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn without_a_flusher_there_is_nothing_to_wait_for() {
        Commits::default().commit().await.unwrap();
    }
}
