//! The embedded store: a single redb file under the data directory. ACID transactions, so a
//! crash mid-write leaves the previous state intact.

use std::path::{Path, PathBuf};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use sentinel_proto::v1::{AppLock, AuditRecord, Deployment, Host, Job, Revocation, SignedJob};

use super::{EncodedHost, JoinTokenRecord, Redeemed, Store, StoreError, StoredJob};

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
/// Audit record id (time-ordered) -> encoded `sentinel.v1.AuditRecord`.
const AUDIT: TableDefinition<&str, &[u8]> = TableDefinition::new("audit");
/// App name -> encoded `sentinel.v1.AppLock`.
const LOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("locks");
/// Join token id -> JSON [`JoinTokenRecord`] (the secret's hash, never the secret).
const JOIN_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("join_tokens");
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
        for table in [
            HOSTS,
            JOBS,
            ENVELOPES,
            DEPLOYS,
            BACKUPS,
            AUDIT,
            LOCKS,
            JOIN_TOKENS,
            REVOCATIONS,
        ] {
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

    fn append_audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.put(
            &format!("appending audit record {}", record.id),
            &[(AUDIT, record.id.as_str(), record.encode_to_vec())],
        )
    }

    fn load_audit(
        &self,
        from: &str,
        who: &str,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let err = |e: redb::Error| backend("reading the audit trail")(e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(AUDIT).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for entry in table.range(from..).map_err(|e| err(e.into()))?.rev() {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry.map_err(|e| err(e.into()))?;
            let record = AuditRecord::decode(value.value()).map_err(|e| StoreError::Corrupt {
                key: format!("audit/{}", key.value()),
                message: e.to_string(),
            })?;
            if who.is_empty() || record.who == who {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn save_lock(&self, lock: &AppLock) -> Result<(), StoreError> {
        self.put(
            &format!("locking app {:?}", lock.app),
            &[(LOCKS, lock.app.as_str(), lock.encode_to_vec())],
        )
    }

    fn delete_lock(&self, app: &str) -> Result<(), StoreError> {
        self.remove(&format!("unlocking app {app:?}"), &[(LOCKS, app)])
    }

    fn load_locks(&self) -> Result<Vec<AppLock>, StoreError> {
        Ok(self
            .all::<AppLock>(LOCKS)?
            .into_iter()
            .map(|(_, l)| l)
            .collect())
    }

    fn save_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError> {
        let action = format!("saving join token {}", token.id);
        let value = serde_json::to_vec(token).map_err(|e| StoreError::Backend {
            action: action.clone(),
            message: e.to_string(),
        })?;
        let err = |e: redb::Error| backend(action.clone())(e);
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut table = txn.open_table(JOIN_TOKENS).map_err(|e| err(e.into()))?;
            if table
                .get(token.id.as_str())
                .map_err(|e| err(e.into()))?
                .is_some()
            {
                return Err(StoreError::Backend {
                    action: action.clone(),
                    message: "a token with this id exists".to_owned(),
                });
            }
            table
                .insert(token.id.as_str(), value.as_slice())
                .map_err(|e| err(e.into()))?;
        }
        txn.commit().map_err(|e| err(e.into()))
    }

    fn redeem_join_token(
        &self,
        id: &str,
        secret_sha256: &[u8; 32],
        host: &str,
        now_unix: i64,
    ) -> Result<Redeemed, StoreError> {
        let action = format!("using join token {id}");
        let err = |e: redb::Error| backend(action.clone())(e);
        // One write transaction: redb serialises writers, so two enrolments with the same
        // token cannot both see it unused.
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        let outcome = {
            let mut table = txn.open_table(JOIN_TOKENS).map_err(|e| err(e.into()))?;
            let record =
                match table.get(id).map_err(|e| err(e.into()))? {
                    None => return Ok(Redeemed::Unknown),
                    Some(value) => serde_json::from_slice::<JoinTokenRecord>(value.value())
                        .map_err(|e| StoreError::Corrupt {
                            key: format!("join_tokens/{id}"),
                            message: e.to_string(),
                        })?,
                };
            let outcome = record.redeem(secret_sha256, host, now_unix);
            if let Redeemed::Ok(used) = &outcome {
                let value = serde_json::to_vec(used).map_err(|e| StoreError::Backend {
                    action: action.clone(),
                    message: e.to_string(),
                })?;
                table
                    .insert(id, value.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            outcome
        };
        if matches!(outcome, Redeemed::Ok(_)) {
            txn.commit().map_err(|e| err(e.into()))?;
        }
        Ok(outcome)
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
    fn audit_records_read_newest_first_from_a_time_and_by_caller() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        for (i, who) in ["ana", "bo", "ana"].iter().enumerate() {
            store
                .append_audit(&AuditRecord {
                    id: format!("{:020}-{i}", 1000 + i),
                    who: who.to_string(),
                    ..Default::default()
                })
                .unwrap();
        }
        let ids = |v: Vec<AuditRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        let all = ids(store.load_audit("", "", 10).unwrap());
        assert_eq!(all.len(), 3);
        assert!(all[0] > all[1] && all[1] > all[2], "{all:?}");
        assert_eq!(ids(store.load_audit("", "ana", 10).unwrap()).len(), 2);
        assert_eq!(
            ids(store.load_audit(&format!("{:020}", 1001), "", 10).unwrap()).len(),
            2
        );
        assert_eq!(ids(store.load_audit("", "", 1).unwrap()).len(), 1);
    }

    #[test]
    fn a_join_token_is_used_once_and_refusals_change_nothing() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let secret: [u8; 32] = Sha256::digest(b"secret").into();
        let wrong: [u8; 32] = Sha256::digest(b"wrong").into();
        let record = JoinTokenRecord {
            id: "t1".into(),
            secret_sha256: hex::encode(secret),
            host: "newbie".into(),
            created_by: "admin".into(),
            created_at: 100,
            expires_at: 200,
            used_at: None,
        };
        {
            let store = EmbeddedStore::open(&path).unwrap();
            store.save_join_token(&record).unwrap();
            assert!(store.save_join_token(&record).is_err(), "duplicate id");
            let redeem = |s: &[u8; 32], host: &str, now| {
                store.redeem_join_token("t1", s, host, now).unwrap()
            };
            assert_eq!(redeem(&wrong, "newbie", 150), Redeemed::Unknown);
            assert_eq!(
                store
                    .redeem_join_token("t2", &secret, "newbie", 150)
                    .unwrap(),
                Redeemed::Unknown
            );
            assert_eq!(
                redeem(&secret, "argus", 150),
                Redeemed::OtherHost("newbie".into())
            );
            assert_eq!(redeem(&secret, "newbie", 200), Redeemed::Expired(200));
        }
        // Reopened: the refusals left it unused; the first use takes it, for good.
        let store = EmbeddedStore::open(&path).unwrap();
        let used = match store
            .redeem_join_token("t1", &secret, "newbie", 150)
            .unwrap()
        {
            Redeemed::Ok(used) => used,
            other => panic!("expected Ok, got {other:?}"),
        };
        assert_eq!(used.used_at, Some(150));
        assert_eq!(
            store
                .redeem_join_token("t1", &secret, "newbie", 151)
                .unwrap(),
            Redeemed::Used(150)
        );
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
