//! Durable controller state behind a trait. The embedded backend (redb, one file, nothing to
//! install) is the default. Every method is one transaction of the backend, with no reliance on
//! an in-process lock, so a PostgreSQL backend shared by several controllers can implement the
//! same trait.
//!
//! Methods are synchronous: callers on the async runtime go through `spawn_blocking`.

pub mod commit;
pub mod embedded;

pub use commit::{CommitError, Commits};

use sentinel_proto::v1::{AppLock, AuditRecord, Deployment, Host, Job, Revocation, SignedJob};

/// A storage failure, naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed.
    #[error("store: {action}: {message}")]
    Backend {
        /// What we were doing ("saving 3 hosts").
        action: String,
        /// The backend's error.
        message: String,
    },
    /// A stored record could not be decoded (the key is named so it can be inspected).
    #[error("store: record {key:?} is corrupt: {message}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// The decoding error.
        message: String,
    },
}

/// What the controller keeps across restarts.
pub trait Store: Send + Sync + 'static {
    /// Upserts host records (their last known info, state and timestamps) atomically: either
    /// all of them are stored or none.
    fn save_hosts(&self, hosts: &[Host]) -> Result<(), StoreError>;

    /// Upserts host records already encoded as `sentinel.v1.Host`, atomically. The registry
    /// keeps host state encoded, so its flusher hands over bytes; this default decodes them for
    /// [`save_hosts`](Self::save_hosts), and a backend that stores the encoding as is (the
    /// embedded one) skips that.
    fn save_encoded_hosts(&self, hosts: &[EncodedHost]) -> Result<(), StoreError> {
        use prost::Message;
        let decoded = hosts
            .iter()
            .map(|h| {
                Host::decode(h.bytes.as_slice()).map_err(|e| StoreError::Corrupt {
                    key: format!("hosts/{}", h.name),
                    message: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.save_hosts(&decoded)
    }

    /// Every stored host record.
    fn load_hosts(&self) -> Result<Vec<Host>, StoreError>;

    /// Upserts jobs (state and events) with their signed envelopes, atomically.
    fn save_jobs(&self, jobs: &[StoredJob]) -> Result<(), StoreError>;

    /// Every stored job.
    fn load_jobs(&self) -> Result<Vec<StoredJob>, StoreError>;

    /// Deletes jobs (and their envelopes) past their retention, atomically.
    fn delete_jobs(&self, ids: &[String]) -> Result<(), StoreError>;

    /// Upserts deploys, atomically.
    fn save_deploys(&self, deploys: &[Deployment]) -> Result<(), StoreError>;

    /// Every stored deploy.
    fn load_deploys(&self) -> Result<Vec<Deployment>, StoreError>;

    /// Upserts backup bookkeeping records (schedules' last runs, per-database summaries) by
    /// key, atomically. Values are opaque to the store (JSON written by `backups`).
    fn save_backup_records(&self, records: &[(String, Vec<u8>)]) -> Result<(), StoreError>;

    /// Every backup bookkeeping record.
    fn load_backup_records(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Appends an audit record under its id (ids sort by time), committed on return.
    fn append_audit(&self, record: &AuditRecord) -> Result<(), StoreError>;

    /// Audit records whose id is at least `from`, newest first, at most `limit`; only
    /// `who`'s when it is not empty.
    fn load_audit(
        &self,
        from: &str,
        who: &str,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError>;

    /// Stores (or replaces) the lock of `lock.app`, committed on return.
    fn save_lock(&self, lock: &AppLock) -> Result<(), StoreError>;

    /// Removes the lock of `app` (none is no error), committed on return.
    fn delete_lock(&self, app: &str) -> Result<(), StoreError>;

    /// Every held lock.
    fn load_locks(&self) -> Result<Vec<AppLock>, StoreError>;
    /// Stores a new join token (its hash, never the token). Committed before it returns, so
    /// the token works as soon as the operator has it.
    fn save_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError>;

    /// Uses join token `id` for `host` at `now_unix` (seconds), in one transaction: the token
    /// must exist, match `secret_sha256`, name `host`, be unexpired and unused; then it is
    /// marked used (so it can never be used again, by any controller sharing the store) and
    /// returned. Any refusal changes nothing.
    fn redeem_join_token(
        &self,
        id: &str,
        secret_sha256: &[u8; 32],
        host: &str,
        now_unix: i64,
    ) -> Result<Redeemed, StoreError>;

    /// Upserts one deny-list entry under `key` (`host/NAME`, `operator/NAME`); committed when
    /// this returns, so a revocation the API confirmed survives a crash.
    fn save_revocation(&self, key: &str, revocation: &Revocation) -> Result<(), StoreError>;

    /// Removes the deny-list entry `key`, if any.
    fn delete_revocation(&self, key: &str) -> Result<(), StoreError>;

    /// Every deny-list entry.
    fn load_revocations(&self) -> Result<Vec<Revocation>, StoreError>;

    /// Removes host records (`sentinel hosts forget`) and, in the same transaction, the
    /// deny-list entries `revocation_keys`.
    fn delete_hosts(&self, names: &[String], revocation_keys: &[String]) -> Result<(), StoreError>;
}

/// A join token as stored: everything but the secret, of which only the SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoinTokenRecord {
    /// The token's public id (the key).
    pub id: String,
    /// SHA-256 of the token's secret, hex.
    pub secret_sha256: String,
    /// The host it enrols.
    pub host: String,
    /// Who made it (the operator's name).
    pub created_by: String,
    /// When it was made, Unix seconds.
    pub created_at: i64,
    /// When it stops working, Unix seconds.
    pub expires_at: i64,
    /// When it was used, Unix seconds; `None` while unused.
    pub used_at: Option<i64>,
}

/// The outcome of [`Store::redeem_join_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeemed {
    /// Accepted and now used up.
    Ok(JoinTokenRecord),
    /// No token with this id, or its secret does not match (not told apart, so a guess
    /// learns nothing).
    Unknown,
    /// It expired at this Unix time.
    Expired(i64),
    /// It was already used at this Unix time.
    Used(i64),
    /// It is for another host.
    OtherHost(String),
}

impl JoinTokenRecord {
    /// What redeeming this record for `host` with `secret_sha256` at `now_unix` gives; the
    /// one decision every backend applies inside its transaction.
    pub fn redeem(&self, secret_sha256: &[u8; 32], host: &str, now_unix: i64) -> Redeemed {
        use subtle_eq::ct_eq;
        if !ct_eq(
            hex::encode(secret_sha256).as_bytes(),
            self.secret_sha256.as_bytes(),
        ) {
            return Redeemed::Unknown;
        }
        if let Some(at) = self.used_at {
            return Redeemed::Used(at);
        }
        if now_unix >= self.expires_at {
            return Redeemed::Expired(self.expires_at);
        }
        if self.host != host {
            return Redeemed::OtherHost(self.host.clone());
        }
        let mut used = self.clone();
        used.used_at = Some(now_unix);
        Redeemed::Ok(used)
    }
}

/// Constant-time comparison, so the time a wrong secret takes says nothing about the right one.
mod subtle_eq {
    /// Whether `a == b`, in time that depends only on the lengths.
    pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// A host record encoded as `sentinel.v1.Host`, with its name (the key).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedHost {
    /// The host's name, as in the record.
    pub name: String,
    /// The encoded record.
    pub bytes: Vec<u8>,
}

/// A job as stored: its state and events, and the envelope exactly as signed (so that a job
/// queued before a restart is sent with its original signature, nonce and expiry).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredJob {
    /// State and events.
    pub job: Job,
    /// The signed envelope.
    pub envelope: SignedJob,
}

/// The keys of records changed since the last flush: the registry, the job table and the
/// pipeline mark what they change, the flusher takes the set, and puts it back when saving
/// failed. One lock of its own, so marking never waits on the records' lock.
#[derive(Debug, Default)]
pub struct DirtyKeys(std::sync::Mutex<std::collections::HashSet<String>>);

impl DirtyKeys {
    /// A set holding `keys` (records loaded but not yet stored in their current form).
    pub fn with(keys: impl IntoIterator<Item = String>) -> Self {
        Self(std::sync::Mutex::new(keys.into_iter().collect()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        // A panic elsewhere cannot leave a set of strings half-changed.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `key` changed.
    pub fn mark(&self, key: &str) {
        self.lock().insert(key.to_string());
    }

    /// Marks every key again after a failed flush.
    pub fn requeue<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        self.lock().extend(keys.into_iter().map(str::to_string));
    }

    /// Forgets `keys` (their records were deleted).
    pub fn forget<'a>(&self, keys: impl IntoIterator<Item = &'a String>) {
        let mut set = self.lock();
        for key in keys {
            set.remove(key);
        }
    }

    /// Takes the changed keys, leaving the set empty (the caller then reads their records,
    /// skipping deleted ones).
    pub fn take(&self) -> Vec<String> {
        self.lock().drain().collect()
    }
}

#[cfg(test)]
mod dirty_tests {
    use super::DirtyKeys;

    #[test]
    fn taken_keys_are_gone_until_marked_or_requeued_and_forgotten_keys_are_not_taken() {
        let dirty = DirtyKeys::with(["a".to_string()]);
        dirty.mark("b");
        dirty.mark("b");
        let mut taken = dirty.take();
        taken.sort();
        assert_eq!(taken, ["a", "b"]);
        assert!(dirty.take().is_empty());
        dirty.requeue(["c"]);
        assert_eq!(dirty.take(), ["c"]);
        dirty.mark("d");
        dirty.forget(&["d".to_string()]);
        assert!(dirty.take().is_empty());
    }
}
