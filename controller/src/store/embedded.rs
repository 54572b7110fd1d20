//! The embedded store: a single redb file under the data directory. ACID transactions, so a
//! crash mid-write leaves the previous state intact.

use std::path::{Path, PathBuf};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sentinel_proto::v1::Host;

use super::{Store, StoreError};

/// Host name -> encoded `sentinel.v1.Host`.
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");

/// A redb-backed [`Store`].
pub struct EmbeddedStore {
    db: Database,
    path: PathBuf,
}

fn backend(action: impl Into<String>) -> impl FnOnce(redb::Error) -> StoreError {
    let action = action.into();
    move |e| StoreError::Backend {
        action,
        message: e.to_string(),
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let action = format!("opening {}", path.display());
        let db = Database::create(path).map_err(|e| backend(action.clone())(e.into()))?;
        // Create the tables up front so that readers never meet a missing table.
        let txn = db
            .begin_write()
            .map_err(|e| backend(action.clone())(e.into()))?;
        txn.open_table(HOSTS)
            .map_err(|e| backend(action.clone())(e.into()))?;
        txn.commit().map_err(|e| backend(action)(e.into()))?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
        })
    }

    /// The file backing this store.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Store for EmbeddedStore {
    fn save_hosts(&self, hosts: &[Host]) -> Result<(), StoreError> {
        let action = format!("saving {} host(s)", hosts.len());
        let err = |e: redb::Error| backend(action.clone())(e);
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut table = txn.open_table(HOSTS).map_err(|e| err(e.into()))?;
            for host in hosts {
                table
                    .insert(host.name.as_str(), host.encode_to_vec().as_slice())
                    .map_err(|e| err(e.into()))?;
            }
        }
        txn.commit().map_err(|e| err(e.into()))
    }

    fn load_hosts(&self) -> Result<Vec<Host>, StoreError> {
        let err = |e: redb::Error| backend("loading hosts")(e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(HOSTS).map_err(|e| err(e.into()))?;
        let mut hosts = Vec::new();
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (key, value) = entry.map_err(|e| err(e.into()))?;
            let host = Host::decode(value.value()).map_err(|e| StoreError::Corrupt {
                key: key.value().to_string(),
                message: e.to_string(),
            })?;
            hosts.push(host);
        }
        Ok(hosts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            let host = Host {
                name: "argus".into(),
                peer_address: "127.0.0.1:1".into(),
                ..Default::default()
            };
            store.save_hosts(&[host]).unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        let hosts = store.load_hosts().unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].name, "argus");
    }

    #[test]
    fn an_unwritable_path_is_named() {
        let err = EmbeddedStore::open(Path::new("/nonexistent/dir/s.redb"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/dir/s.redb"), "{err}");
    }
}
