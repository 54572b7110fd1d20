//! The deny list: hosts and operators whose certificates the controller refuses. Entries are by
//! name, not by serial, so every certificate issued for a revoked name so far (and any issued
//! later by mistake) is refused: a stolen key and every copy of its certificate stop at once.
//! A host's entry goes with `sentinel hosts forget` (the host must be offline, which a revoked
//! host always is); an operator's with `sentinel operators unrevoke`.
//!
//! The list lives in the [`Store`] (committed before the API answers) and is held here in
//! memory for the per-connection and per-call checks; [`DenyList::refresh`] re-reads it, so
//! controllers sharing one store see each other's revocations.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sentinel_proto::v1::{Revocation, RevocationKind};

use crate::identity::Identity;
use crate::store::{Store, StoreError};

/// The deny list, in memory and in the store.
pub struct DenyList {
    store: Arc<dyn Store>,
    entries: RwLock<HashMap<String, Revocation>>,
}

/// The store key of an entry: `host/NAME` or `operator/NAME`.
pub fn key(kind: RevocationKind, name: &str) -> String {
    let prefix = match kind {
        RevocationKind::Operator => "operator",
        RevocationKind::Host | RevocationKind::Unspecified => "host",
    };
    format!("{prefix}/{name}")
}

/// The entry key an identity would be refused under (none for a peer without a certificate:
/// there is nothing to revoke, and it may only enrol).
fn identity_key(identity: &Identity) -> Option<String> {
    match identity {
        Identity::Host(name) => Some(key(RevocationKind::Host, name)),
        Identity::Operator { name, .. } => Some(key(RevocationKind::Operator, name)),
        Identity::Unauthenticated => None,
    }
}

/// What a refused peer is told: what happened, when, why, and what to do.
pub fn refusal_message(r: &Revocation) -> String {
    let at = r
        .revoked_at
        .as_ref()
        .map(|t| {
            humantime::format_rfc3339_seconds(sentinel_proto::time::system_time(t)).to_string()
        })
        .unwrap_or_else(|| "an unknown time".into());
    let by = if r.revoked_by.is_empty() {
        String::new()
    } else {
        format!(" by {}", r.revoked_by)
    };
    let reason = if r.reason.is_empty() {
        "no reason given".to_string()
    } else {
        r.reason.clone()
    };
    match r.kind() {
        RevocationKind::Operator => format!(
            "the controller refused this certificate: operator {:?} was revoked at {at}{by} \
             ({reason}); ask an admin to run `sentinel operators unrevoke {}` and issue a new \
             certificate",
            r.name, r.name
        ),
        _ => format!(
            "the controller refused this certificate: host {:?} was revoked at {at}{by} \
             ({reason}); every certificate of this name is refused until an admin runs \
             `sentinel hosts forget {}` and the host is enrolled again",
            r.name, r.name
        ),
    }
}

impl DenyList {
    /// The list as stored.
    pub fn load(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let list = Arc::new(Self {
            store,
            entries: RwLock::new(HashMap::new()),
        });
        list.refresh()?;
        Ok(list)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Revocation>> {
        // Entries are replaced whole under the lock, never left half-written.
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Revocation>> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the list from the store (revocations made by another controller).
    pub fn refresh(&self) -> Result<(), StoreError> {
        let loaded: HashMap<String, Revocation> = self
            .store
            .load_revocations()?
            .into_iter()
            .map(|r| (key(r.kind(), &r.name), r))
            .collect();
        *self.write() = loaded;
        Ok(())
    }

    /// The entry that refuses `identity`, if any.
    pub fn refusal(&self, identity: &Identity) -> Option<Revocation> {
        self.read().get(&identity_key(identity)?).cloned()
    }

    /// The entry of host `name`, if it is revoked.
    pub fn host(&self, name: &str) -> Option<Revocation> {
        self.read().get(&key(RevocationKind::Host, name)).cloned()
    }

    /// Adds (or replaces) an entry: stored first, then in effect here.
    pub fn add(&self, revocation: Revocation) -> Result<(), StoreError> {
        let key = key(revocation.kind(), &revocation.name);
        self.store.save_revocation(&key, &revocation)?;
        self.write().insert(key, revocation);
        Ok(())
    }

    /// Removes an entry, returning it; `None` when there was none.
    pub fn remove(
        &self,
        kind: RevocationKind,
        name: &str,
    ) -> Result<Option<Revocation>, StoreError> {
        let key = key(kind, name);
        if !self.read().contains_key(&key) {
            return Ok(None);
        }
        self.store.delete_revocation(&key)?;
        Ok(self.write().remove(&key))
    }

    /// Forgets the in-memory entry of host `name` after the store removed it with the host.
    pub fn forget_host(&self, name: &str) -> Option<Revocation> {
        self.write().remove(&key(RevocationKind::Host, name))
    }

    /// Every entry, sorted by key.
    pub fn list(&self) -> Vec<Revocation> {
        let entries = self.read();
        let mut keys: Vec<&String> = entries.keys().collect();
        keys.sort();
        keys.into_iter().map(|k| entries[k].clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Role;
    use crate::store::embedded::EmbeddedStore;

    #[test]
    fn an_entry_refuses_every_role_of_its_name_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let eve = |role| Identity::Operator {
            name: "eve".into(),
            role,
        };
        {
            let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
            let list = DenyList::load(store).unwrap();
            list.add(Revocation {
                kind: RevocationKind::Operator as i32,
                name: "eve".into(),
                reason: "left".into(),
                ..Default::default()
            })
            .unwrap();
            assert!(list.refusal(&eve(Role::Viewer)).is_some());
            assert!(list.refusal(&eve(Role::Admin)).is_some());
            // A host of the same name is another identity.
            assert!(list.refusal(&Identity::Host("eve".into())).is_none());
        }
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
        let list = DenyList::load(store).unwrap();
        let entry = list.refusal(&eve(Role::Deployer)).unwrap();
        assert!(refusal_message(&entry).contains("operators unrevoke eve"));
        assert!(list
            .remove(RevocationKind::Operator, "eve")
            .unwrap()
            .is_some());
        assert!(list.refusal(&eve(Role::Viewer)).is_none());
        assert!(list
            .remove(RevocationKind::Operator, "eve")
            .unwrap()
            .is_none());
    }
}
