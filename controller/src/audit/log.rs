//! The audit log: append-only, time-ordered records in the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use sentinel_proto::v1::AuditRecord;
use tonic::Status;
use tracing::error;

use crate::identity::{Identity, PeerInfo};
use crate::store::Store;

/// How many records `ListAudit` answers when the request sets no limit.
pub const DEFAULT_LIMIT: usize = 100;
/// The most `ListAudit` answers at once.
const MAX_LIMIT: usize = 10_000;
/// Texts kept per field: a reason pasted by mistake must not grow the trail without bound.
const MAX_TEXT: usize = 2048;

/// Appends and reads audit records.
pub struct AuditLog {
    store: Arc<dyn Store>,
    /// Makes ids unique among records of the same nanosecond.
    seq: AtomicU64,
}

impl AuditLog {
    /// An audit log kept in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            seq: AtomicU64::new(0),
        }
    }

    /// Records that `peer` called `method` asking for `what`, and how it ended: `Ok(made)`
    /// with what the call made, or the error it answered. The record is committed before
    /// this returns; when the store fails the failure is logged (the write itself already
    /// happened, and answering an error would invite a second one).
    pub async fn record<T>(
        &self,
        peer: &PeerInfo,
        method: &str,
        what: String,
        result: Result<&T, &Status>,
        made: impl FnOnce(&T) -> String,
    ) {
        let (ok, outcome) = match result {
            Ok(v) => (true, made(v)),
            Err(s) => (false, format!("{:?}: {}", s.code(), s.message())),
        };
        let now = SystemTime::now();
        let nanos = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (who, credential) = match &peer.identity {
            Identity::Operator { name, role } => {
                (name.clone(), format!("operator certificate ({role})"))
            }
            Identity::Host(name) => (name.clone(), "host certificate".to_string()),
            Identity::Unauthenticated => (String::new(), "no client certificate".to_string()),
        };
        let credential = match peer.addr {
            Some(addr) => format!("{credential} from {addr}"),
            None => credential,
        };
        let record = AuditRecord {
            id: format!("{nanos:020}-{seq:06}"),
            at: Some(sentinel_proto::time::timestamp(now)),
            who,
            credential,
            method: method.to_string(),
            what: bounded(what),
            ok,
            outcome: bounded(outcome),
        };
        let store = self.store.clone();
        let id = record.id.clone();
        let saved = tokio::task::spawn_blocking(move || store.append_audit(&record)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(id, method, error = %e, "could not store an audit record"),
            Err(e) => error!(id, method, error = %e, "the audit task failed"),
        }
    }

    /// Records at or after `since`, newest first, only `who`'s when set, at most `limit`
    /// (0: [`DEFAULT_LIMIT`]).
    pub async fn list(
        &self,
        since: Option<&prost_types::Timestamp>,
        who: &str,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, Status> {
        let from = match since {
            None => String::new(),
            Some(t) => {
                let nanos = sentinel_proto::time::system_time(t)
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos();
                format!("{nanos:020}")
            }
        };
        let limit = match limit as usize {
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        };
        let store = self.store.clone();
        let who = who.to_string();
        tokio::task::spawn_blocking(move || store.load_audit(&from, &who, limit))
            .await
            .map_err(|e| Status::internal(format!("reading the audit trail: {e}")))?
            .map_err(|e| Status::unavailable(e.to_string()))
    }
}

fn bounded(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::scheme::Role;
    use crate::store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn a_record_names_who_how_what_and_the_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s")).unwrap());
        let log = AuditLog::new(store);
        let peer = PeerInfo {
            addr: "127.0.0.1:9".parse().ok(),
            validity: None,
            identity: Identity::Operator {
                name: "ana".into(),
                role: Role::Deployer,
            },
        };
        let ok: Result<u32, Status> = Ok(7);
        log.record(&peer, "SubmitDeploy", "deploy x".into(), ok.as_ref(), |n| {
            format!("made {n}")
        })
        .await;
        let failed: Result<u32, Status> = Err(Status::failed_precondition("locked"));
        log.record(
            &peer,
            "Rollback",
            "x".repeat(5000),
            failed.as_ref(),
            |_| unreachable!(),
        )
        .await;
        let records = log.list(None, "", 0).await.unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].method, "Rollback");
        assert!(!records[0].ok);
        assert_eq!(records[0].outcome, "FailedPrecondition: locked");
        assert!(records[0].what.len() < 2100, "bounded");
        assert_eq!(records[1].outcome, "made 7");
        assert_eq!(records[1].who, "ana");
        assert_eq!(
            records[1].credential,
            "operator certificate (deployer) from 127.0.0.1:9"
        );
        let later = sentinel_proto::time::timestamp(SystemTime::now());
        assert!(log.list(Some(&later), "", 0).await.unwrap().is_empty());
        assert!(log.list(None, "bo", 0).await.unwrap().is_empty());
    }
}
