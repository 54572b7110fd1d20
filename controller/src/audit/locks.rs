//! App locks: while one is held, deploys and rollbacks of the app are refused with its reason.
//! Kept in the store (written through before the call answers) and in memory for the checks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use sentinel_proto::v1::AppLock;
use tonic::Status;

use crate::store::{Store, StoreError};

/// The longest reason kept.
const MAX_REASON: usize = 500;

/// The held locks.
pub struct Locks {
    store: Arc<dyn Store>,
    held: Mutex<BTreeMap<String, AppLock>>,
}

impl Locks {
    /// Loads the locks held in `store`.
    pub fn load(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let held = store
            .load_locks()?
            .into_iter()
            .map(|l| (l.app.clone(), l))
            .collect();
        Ok(Arc::new(Self {
            store,
            held: Mutex::new(held),
        }))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, AppLock>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses when `app` is locked, naming who locked it, when and why.
    pub fn check(&self, app: &str) -> Result<(), Status> {
        match self.held().get(app) {
            None => Ok(()),
            Some(l) => Err(Status::failed_precondition(format!(
                "app {app} is locked by {} since {}: {}; `sentinel unlock {app}` when the work is done",
                l.locked_by,
                l.locked_at
                    .as_ref()
                    .and_then(sentinel_proto::time::to_jiff)
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
                l.reason
            ))),
        }
    }

    /// Locks `app` (an app the caller checked exists) for `reason`. Locking a locked app is
    /// refused, naming the holder: the second operator must learn what the first is doing.
    pub async fn lock(&self, app: &str, reason: &str, who: &str) -> Result<AppLock, Status> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(Status::invalid_argument(
                "a lock needs a reason (field `reason`, CLI --reason): it is what others are told",
            ));
        }
        if reason.chars().count() > MAX_REASON {
            return Err(Status::invalid_argument(format!(
                "the reason is over {MAX_REASON} characters"
            )));
        }
        if let Err(held) = self.check(app) {
            return Err(Status::already_exists(held.message().to_string()));
        }
        let lock = AppLock {
            app: app.to_string(),
            reason: reason.to_string(),
            locked_by: who.to_string(),
            locked_at: Some(sentinel_proto::time::now()),
        };
        let store = self.store.clone();
        let saved = lock.clone();
        tokio::task::spawn_blocking(move || store.save_lock(&saved))
            .await
            .map_err(|e| Status::internal(format!("storing the lock: {e}")))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.held().insert(app.to_string(), lock.clone());
        Ok(lock)
    }

    /// Removes the lock of `app` and answers it; an app that is not locked is NOT_FOUND.
    pub async fn unlock(&self, app: &str) -> Result<AppLock, Status> {
        let lock = self
            .held()
            .get(app)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("app {app} is not locked")))?;
        let store = self.store.clone();
        let name = app.to_string();
        tokio::task::spawn_blocking(move || store.delete_lock(&name))
            .await
            .map_err(|e| Status::internal(format!("removing the lock: {e}")))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.held().remove(app);
        Ok(lock)
    }

    /// Every held lock, in app name order.
    pub fn list(&self) -> Vec<AppLock> {
        self.held().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn a_lock_refuses_with_its_reason_survives_reopening_and_unlocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        {
            let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
            let locks = Locks::load(store).unwrap();
            assert!(locks.lock("till", "  ", "ana").await.is_err());
            locks.lock("till", "migrating the DB", "ana").await.unwrap();
            let again = locks.lock("till", "mine", "bo").await.unwrap_err();
            assert_eq!(again.code(), tonic::Code::AlreadyExists);
            assert!(again.message().contains("ana"), "{again:?}");
        }
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
        let locks = Locks::load(store).unwrap();
        let refused = locks.check("till").unwrap_err();
        assert!(
            refused.message().contains("migrating the DB"),
            "{refused:?}"
        );
        assert!(locks.check("other").is_ok());
        locks.unlock("till").await.unwrap();
        assert!(locks.check("till").is_ok());
        assert_eq!(
            locks.unlock("till").await.unwrap_err().code(),
            tonic::Code::NotFound
        );
    }
}
