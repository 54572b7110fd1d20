//! The agent's job journal: an append-only, fsynced JSON-lines file in the state directory.
//! It is the replay record (every nonce ever accepted) and the memory of how each job ended,
//! so that after a restart a job is reported, never run a second time.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How long a record is kept after its job's expiry. Past expiry (plus skew) a job is refused
/// as expired anyway, so its nonce no longer needs remembering; the margin covers clock skew.
const RETENTION_AFTER_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// A journal that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// I/O on the journal file.
    #[error("job journal {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A line that is not a record (the line number is 1-based).
    #[error("job journal {path}:{line}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Another agent process holds the state directory: two agents sharing one journal would
    /// each run jobs the other has already run.
    #[error(
        "job state directory {dir} is in use by another hostagent process; give each agent its \
         own jobs.state_dir"
    )]
    Busy {
        /// The directory.
        dir: PathBuf,
    },
}

/// Where a job stands in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Verified and queued.
    Accepted,
    /// Execution started.
    Running,
    /// Ended well.
    Succeeded,
    /// Ended badly.
    Failed,
    /// Cancelled by the controller.
    Cancelled,
    /// The agent stopped while it ran; never resumed.
    Interrupted,
}

impl Phase {
    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        !matches!(self, Phase::Accepted | Phase::Running)
    }
}

/// One journal line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The job.
    pub job_id: String,
    /// Its nonce, hex.
    pub nonce: String,
    /// Its expiry, Unix seconds.
    pub expires_at: u64,
    /// What happened.
    pub phase: Phase,
    /// The outcome's detail for final phases.
    #[serde(default)]
    pub detail: String,
    /// When, Unix seconds.
    pub at: u64,
}

struct State {
    file: File,
    by_job: HashMap<String, Record>,
    nonces: HashMap<String, String>,
}

/// The journal.
pub struct Journal {
    path: PathBuf,
    state: Mutex<State>,
    /// `dir/lock`, exclusively locked for as long as the journal is open.
    _lock: File,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Journal {
    /// Opens (or creates) `dir/jobs.journal`. Jobs that were accepted or running when the agent
    /// stopped are marked interrupted and returned, so the caller can report them. Old records
    /// are compacted away.
    pub fn open(dir: &Path) -> Result<(Self, Vec<Record>), JournalError> {
        let path = dir.join("jobs.journal");
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| JournalError::Io {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(JournalError::Busy {
                    dir: dir.to_path_buf(),
                })
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(JournalError::Io {
                    path: lock_path,
                    source,
                })
            }
        }
        let mut by_job: HashMap<String, Record> = HashMap::new();
        if path.exists() {
            let reader = BufReader::new(File::open(&path).map_err(io)?);
            for (i, line) in reader.lines().enumerate() {
                let line = line.map_err(io)?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Record>(&line) {
                    Ok(rec) => {
                        by_job.insert(rec.job_id.clone(), rec);
                    }
                    // A torn last line from a crash mid-append is expected; anything else is not.
                    Err(e) => {
                        tracing::warn!(path = %path.display(), line = i + 1, error = %e, "skipping unreadable journal line");
                    }
                }
            }
        }
        let now = SystemTime::now();
        let horizon = unix(now).saturating_sub(RETENTION_AFTER_EXPIRY.as_secs());
        by_job.retain(|_, r| r.expires_at >= horizon || !r.phase.is_final());
        let mut interrupted = Vec::new();
        for rec in by_job.values_mut() {
            if !rec.phase.is_final() {
                rec.phase = Phase::Interrupted;
                rec.detail =
                    "the agent stopped while this job was running; it will not be run again".into();
                rec.at = unix(now);
                interrupted.push(rec.clone());
            }
        }
        // Rewrite compacted, then append from there on.
        let tmp = dir.join("jobs.journal.tmp");
        {
            let mut f = File::create(&tmp).map_err(io)?;
            for rec in by_job.values() {
                let line = serde_json::to_string(rec).map_err(|e| JournalError::Corrupt {
                    path: path.clone(),
                    line: 0,
                    message: e.to_string(),
                })?;
                writeln!(f, "{line}").map_err(io)?;
            }
            f.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, &path).map_err(io)?;
        let file = OpenOptions::new().append(true).open(&path).map_err(io)?;
        let nonces = by_job
            .values()
            .map(|r| (r.nonce.clone(), r.job_id.clone()))
            .collect();
        Ok((
            Self {
                path,
                state: Mutex::new(State {
                    file,
                    by_job,
                    nonces,
                }),
                _lock: lock,
            },
            interrupted,
        ))
    }

    /// The job that used `nonce`, if any.
    pub fn nonce_owner(&self, nonce: &str) -> Option<String> {
        self.lock().nonces.get(nonce).cloned()
    }

    /// The latest record of a job.
    pub fn job(&self, job_id: &str) -> Option<Record> {
        self.lock().by_job.get(job_id).cloned()
    }

    /// Final records written since `since`, for re-reporting after a reconnect.
    pub fn finished_since(&self, since: SystemTime) -> Vec<Record> {
        let since = unix(since);
        let mut out: Vec<Record> = self
            .lock()
            .by_job
            .values()
            .filter(|r| r.phase.is_final() && r.at >= since)
            .cloned()
            .collect();
        out.sort_by_key(|r| r.at);
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a record and fsyncs it before returning: once this returns, a restart knows.
    pub fn record(
        &self,
        job_id: &str,
        nonce: &str,
        expires_at: SystemTime,
        phase: Phase,
        detail: &str,
    ) -> Result<(), JournalError> {
        let rec = Record {
            job_id: job_id.to_string(),
            nonce: nonce.to_string(),
            expires_at: unix(expires_at),
            phase,
            detail: detail.to_string(),
            at: unix(SystemTime::now()),
        };
        let line = serde_json::to_string(&rec).map_err(|e| JournalError::Corrupt {
            path: self.path.clone(),
            line: 0,
            message: e.to_string(),
        })?;
        let mut state = self.lock();
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        writeln!(state.file, "{line}").map_err(io)?;
        state.file.sync_data().map_err(io)?;
        state.nonces.insert(rec.nonce.clone(), rec.job_id.clone());
        state.by_job.insert(rec.job_id.clone(), rec);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_job_is_interrupted_after_reopening_and_its_nonce_stays_spent() {
        let dir = tempfile::tempdir().unwrap();
        let exp = SystemTime::now() + Duration::from_secs(600);
        {
            let (j, interrupted) = Journal::open(dir.path()).unwrap();
            assert!(interrupted.is_empty());
            j.record("a", "n1", exp, Phase::Accepted, "").unwrap();
            j.record("a", "n1", exp, Phase::Running, "").unwrap();
            j.record("b", "n2", exp, Phase::Accepted, "").unwrap();
            j.record("b", "n2", exp, Phase::Running, "").unwrap();
            j.record("b", "n2", exp, Phase::Succeeded, "ok").unwrap();
        }
        let (j, interrupted) = Journal::open(dir.path()).unwrap();
        assert_eq!(interrupted.len(), 1);
        assert_eq!(interrupted[0].job_id, "a");
        assert_eq!(j.job("a").unwrap().phase, Phase::Interrupted);
        assert_eq!(j.job("b").unwrap().phase, Phase::Succeeded);
        assert_eq!(j.nonce_owner("n1").as_deref(), Some("a"));
        // Reopening again does not report it twice.
        drop(j);
        let (_, again) = Journal::open(dir.path()).unwrap();
        assert!(again.is_empty());
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let exp = SystemTime::now() + Duration::from_secs(600);
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            j.record("a", "n1", exp, Phase::Succeeded, "").unwrap();
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("jobs.journal"))
            .unwrap();
        write!(f, "{{\"job_id\":\"b\",\"non").unwrap();
        drop(f);
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert!(j.job("a").is_some());
        assert!(j.job("b").is_none());
    }

    #[test]
    fn a_second_agent_on_the_same_state_dir_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_first, _) = Journal::open(dir.path()).unwrap();
        let err = Journal::open(dir.path())
            .err()
            .expect("the second open fails");
        assert!(matches!(err, JournalError::Busy { .. }));
        assert!(err.to_string().contains(&dir.path().display().to_string()));
        drop(_first);
        assert!(
            Journal::open(dir.path()).is_ok(),
            "free again once the first is gone"
        );
    }
}
