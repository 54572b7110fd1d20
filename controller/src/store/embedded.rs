//! The embedded store: a single redb file under the data directory. ACID transactions, so a
//! crash mid-write leaves the previous state intact.

use std::path::{Path, PathBuf};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use sentinel_proto::v1::{Deployment, Host, Job, Revocation, SignedJob};

use super::{EncodedHost, Store, StoreError, StoredJob};

/// Host name -> encoded `sentinel.v1.Host`.
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
/// Job id -> encoded `sentinel.v1.Job`.
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Job id -> encoded `sentinel.v1.SignedJob`.
const ENVELOPES: TableDefinition<&str, &[u8]> = TableDefinition::new("job_envelopes");
/// Deploy id -> encoded `sentinel.v1.Deployment`.
const DEPLOYS: TableDefinition<&str, &[u8]> = TableDefinition::new("deploys");
/// Backup bookkeeping key -> JSON (schedules' last runs, per-database summaries).
const BACKUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("backups");
/// Deny-list key (`host/NAME`, `operator/NAME`) -> encoded `sentinel.v1.Revocation`.
const REVOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("revocations");

/// redb's page cache. Its default (1 GiB) fills with pages the flusher writes and nothing
/// reads (the store is read once, at startup): at 5,000 agents it held 18 KiB of resident
/// memory per host. A second's worth of writes at 10,000 agents is under 10 MiB.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// One row to write: table, key, encoded value.
type Row<'a, V> = (Table, &'a str, V);
/// Every table maps a string key to an encoded protobuf message.
type Table = TableDefinition<'static, &'static str, &'static [u8]>;

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
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| backend(action.clone())(e.into()))?;
        // Create the tables up front so that readers never meet a missing table.
        let txn = db
            .begin_write()
            .map_err(|e| backend(action.clone())(e.into()))?;
        for table in [HOSTS, JOBS, ENVELOPES, DEPLOYS, BACKUPS, REVOCATIONS] {
            txn.open_table(table)
                .map_err(|e| backend(action.clone())(e.into()))?;
        }
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

impl EmbeddedStore {
    /// Writes `(table, key, value)` rows in one transaction.
    fn put<V: AsRef<[u8]>>(&self, action: &str, rows: &[Row<'_, V>]) -> Result<(), StoreError> {
        let err = |e: redb::Error| backend(action)(e);
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        for (def, key, value) in rows {
            let mut table = txn.open_table(*def).map_err(|e| err(e.into()))?;
            table
                .insert(*key, value.as_ref())
                .map_err(|e| err(e.into()))?;
        }
        txn.commit().map_err(|e| err(e.into()))
    }

    /// Removes `(table, key)` rows in one transaction; absent rows are no error.
    fn remove(
        &self,
        action: &str,
        rows: &[(TableDefinition<&str, &[u8]>, &str)],
    ) -> Result<(), StoreError> {
        let err = |e: redb::Error| backend(action)(e);
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        for (def, key) in rows {
            let mut table = txn.open_table(*def).map_err(|e| err(e.into()))?;
            table.remove(*key).map_err(|e| err(e.into()))?;
        }
        txn.commit().map_err(|e| err(e.into()))
    }

    /// Every row of a table, decoded.
    fn all<T: Message + Default>(
        &self,
        def: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let err = |e: redb::Error| backend(format!("loading {}", def.name()))(e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(def).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (key, value) = entry.map_err(|e| err(e.into()))?;
            let item = T::decode(value.value()).map_err(|e| StoreError::Corrupt {
                key: format!("{}/{}", def.name(), key.value()),
                message: e.to_string(),
            })?;
            out.push((key.value().to_string(), item));
        }
        Ok(out)
    }
}

impl Store for EmbeddedStore {
    fn save_backup_records(&self, records: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let rows: Vec<_> = records
            .iter()
            .map(|(k, v)| (BACKUPS, k.as_str(), v.clone()))
            .collect();
        self.put(&format!("saving {} backup record(s)", records.len()), &rows)
    }

    fn load_backup_records(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let err = |e: redb::Error| backend("loading backups")(e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(BACKUPS).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (key, value) = entry.map_err(|e| err(e.into()))?;
            out.push((key.value().to_string(), value.value().to_vec()));
        }
        Ok(out)
    }

    fn save_hosts(&self, hosts: &[Host]) -> Result<(), StoreError> {
        let rows: Vec<_> = hosts
            .iter()
            .map(|h| (HOSTS, h.name.as_str(), h.encode_to_vec()))
            .collect();
        self.put(&format!("saving {} host(s)", hosts.len()), &rows)
    }

    fn save_encoded_hosts(&self, hosts: &[EncodedHost]) -> Result<(), StoreError> {
        let rows: Vec<_> = hosts
            .iter()
            .map(|h| (HOSTS, h.name.as_str(), h.bytes.as_slice()))
            .collect();
        self.put(&format!("saving {} host(s)", hosts.len()), &rows)
    }

    fn load_hosts(&self) -> Result<Vec<Host>, StoreError> {
        Ok(self
            .all::<Host>(HOSTS)?
            .into_iter()
            .map(|(_, h)| h)
            .collect())
    }

    fn save_jobs(&self, jobs: &[StoredJob]) -> Result<(), StoreError> {
        let mut rows = Vec::with_capacity(jobs.len() * 2);
        for j in jobs {
            rows.push((JOBS, j.job.job_id.as_str(), j.job.encode_to_vec()));
            rows.push((ENVELOPES, j.job.job_id.as_str(), j.envelope.encode_to_vec()));
        }
        self.put(&format!("saving {} job(s)", jobs.len()), &rows)
    }

    fn load_jobs(&self) -> Result<Vec<StoredJob>, StoreError> {
        let mut envelopes: std::collections::HashMap<String, SignedJob> =
            self.all::<SignedJob>(ENVELOPES)?.into_iter().collect();
        Ok(self
            .all::<Job>(JOBS)?
            .into_iter()
            .map(|(id, job)| StoredJob {
                envelope: envelopes.remove(&id).unwrap_or_default(),
                job,
            })
            .collect())
    }

    fn delete_jobs(&self, ids: &[String]) -> Result<(), StoreError> {
        let rows: Vec<_> = ids
            .iter()
            .flat_map(|id| [(JOBS, id.as_str()), (ENVELOPES, id.as_str())])
            .collect();
        self.remove(&format!("deleting {} old job(s)", ids.len()), &rows)
    }

    fn save_deploys(&self, deploys: &[Deployment]) -> Result<(), StoreError> {
        let rows: Vec<_> = deploys
            .iter()
            .map(|d| (DEPLOYS, d.deploy_id.as_str(), d.encode_to_vec()))
            .collect();
        self.put(&format!("saving {} deploy(s)", deploys.len()), &rows)
    }

    fn load_deploys(&self) -> Result<Vec<Deployment>, StoreError> {
        Ok(self
            .all::<Deployment>(DEPLOYS)?
            .into_iter()
            .map(|(_, d)| d)
            .collect())
    }

    fn save_revocation(&self, key: &str, revocation: &Revocation) -> Result<(), StoreError> {
        self.put(
            &format!("saving revocation {key}"),
            &[(REVOCATIONS, key, revocation.encode_to_vec())],
        )
    }

    fn delete_revocation(&self, key: &str) -> Result<(), StoreError> {
        self.remove(&format!("deleting revocation {key}"), &[(REVOCATIONS, key)])
    }

    fn load_revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        Ok(self
            .all::<Revocation>(REVOCATIONS)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    fn delete_hosts(&self, names: &[String], revocation_keys: &[String]) -> Result<(), StoreError> {
        let rows: Vec<_> = names
            .iter()
            .map(|n| (HOSTS, n.as_str()))
            .chain(revocation_keys.iter().map(|k| (REVOCATIONS, k.as_str())))
            .collect();
        self.remove(&format!("deleting {} host(s)", names.len()), &rows)
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
    fn encoded_hosts_are_stored_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let host = Host {
            name: "argus".into(),
            peer_address: "127.0.0.1:1".into(),
            ..Default::default()
        };
        store
            .save_encoded_hosts(&[EncodedHost {
                name: "argus".into(),
                bytes: host.encode_to_vec(),
            }])
            .unwrap();
        assert_eq!(store.load_hosts().unwrap(), vec![host]);
    }

    #[test]
    fn revocations_survive_reopening_and_forgetting_a_host_removes_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let revocation = Revocation {
            name: "argus".into(),
            reason: "key stolen".into(),
            ..Default::default()
        };
        {
            let store = EmbeddedStore::open(&path).unwrap();
            store
                .save_hosts(&[Host {
                    name: "argus".into(),
                    ..Default::default()
                }])
                .unwrap();
            store.save_revocation("host/argus", &revocation).unwrap();
            store
                .save_revocation("operator/eve", &Revocation::default())
                .unwrap();
            store.delete_revocation("operator/eve").unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.load_revocations().unwrap(), vec![revocation]);
        store
            .delete_hosts(&["argus".into()], &["host/argus".into()])
            .unwrap();
        assert!(store.load_hosts().unwrap().is_empty());
        assert!(store.load_revocations().unwrap().is_empty());
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
