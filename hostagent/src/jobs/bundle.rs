//! Fetching release bundles from the controller over the agent's own channel, in chunks,
//! with the digest checked against the one in the signed job.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sentinel_proto::v1::{agent_message, BundleChunk, BundleRequest};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{JobError, JobEvents, Outbox};

/// Bytes asked for per request: small enough to stay far below gRPC's message limit.
const CHUNK: u32 = 256 * 1024;
/// A request unanswered this long is sent again (the channel may have dropped meanwhile).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts per chunk before the fetch fails.
const ATTEMPTS: u32 = 5;
/// Bundles larger than this are refused outright.
const MAX_BUNDLE: u64 = 2 * 1024 * 1024 * 1024;

/// Routes chunks from the session to the fetch waiting for them.
#[derive(Clone)]
pub struct Bundles {
    outbox: Outbox,
    dir: PathBuf,
    waiters: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<BundleChunk>>>>,
}

impl Bundles {
    /// Bundles are written under `dir`. Bundles left there (by a crash: every other ending
    /// removes its bundle) are removed now, since a bundle holds its environment's secrets.
    pub fn new(outbox: Outbox, dir: PathBuf) -> Self {
        sweep(&dir);
        Self {
            outbox,
            dir,
            waiters: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Hands a chunk from the controller to its fetch (dropped if nobody waits).
    pub fn deliver(&self, chunk: BundleChunk) {
        if let Some(tx) = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&chunk.sha256)
        {
            let _ = tx.send(chunk);
        }
    }

    /// Fetches bundle `sha256` of `size` bytes into a file (mode 0600: it holds the `.env`)
    /// and checks its digest. The file is removed when the returned [`BundleFile`] is dropped,
    /// or at once if the fetch fails or is cancelled (its future dropped).
    pub async fn fetch(
        &self,
        sha256: &str,
        size: u64,
        events: &JobEvents,
    ) -> Result<BundleFile, JobError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(JobError::Failed(format!(
                "bundle digest {sha256:?} is not a sha256"
            )));
        }
        if size > MAX_BUNDLE {
            return Err(JobError::Failed(format!(
                "bundle of {size} bytes exceeds the {MAX_BUNDLE}-byte limit"
            )));
        }
        let io = |what: &str, e: std::io::Error| JobError::Failed(format!("{what}: {e}"));
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| io(&format!("creating {}", self.dir.display()), e))?;
        let path = self.dir.join(format!("{sha256}.tar.gz"));
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            // A leftover of the same bundle (same digest) may be there: replaced, and created
            // 0600 from the start so that no other user can read it meanwhile.
            let _ = std::fs::remove_file(&path);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io(&format!("creating {}", path.display()), e))?
        };
        let bundle = BundleFile { path };
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha256.to_string(), tx);
        let _guard = WaiterGuard(self.waiters.clone(), sha256.to_string());
        let started = std::time::Instant::now();
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        while offset < size {
            let mut attempt = 0;
            let chunk = loop {
                attempt += 1;
                self.outbox
                    .push(agent_message::Msg::BundleRequest(BundleRequest {
                        sha256: sha256.to_string(),
                        offset,
                        max_len: CHUNK,
                    }));
                match tokio::time::timeout(CHUNK_TIMEOUT, rx.recv()).await {
                    Ok(Some(c)) if c.offset == offset => break c,
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err(JobError::Failed("bundle channel closed".into())),
                    Err(_) if attempt < ATTEMPTS => continue,
                    Err(_) => {
                        return Err(JobError::Failed(format!(
                        "bundle {sha256}: no answer for offset {offset} after {ATTEMPTS} attempts"
                    )))
                    }
                }
            };
            if !chunk.error.is_empty() {
                return Err(JobError::Failed(format!("controller: {}", chunk.error)));
            }
            if chunk.data.is_empty() || chunk.total_size != size {
                return Err(JobError::Failed(format!(
                    "bundle {sha256}: controller sent {} bytes of a {}-byte bundle at offset {offset}, job says {size}",
                    chunk.data.len(),
                    chunk.total_size
                )));
            }
            hasher.update(&chunk.data);
            file.write_all(&chunk.data)
                .map_err(|e| io("writing the bundle", e))?;
            offset += chunk.data.len() as u64;
        }
        file.sync_all().map_err(|e| io("syncing the bundle", e))?;
        let got = hex::encode(hasher.finalize());
        if got != sha256 {
            return Err(JobError::Failed(format!(
                "bundle digest mismatch: signed job says {sha256}, received {got}"
            )));
        }
        events.log(
            "agent",
            &format!(
                "fetched bundle {sha256} ({size} bytes) in {:?}",
                started.elapsed()
            ),
        );
        Ok(bundle)
    }
}

/// A fetched bundle on disk, removed when dropped: however the deploy ends (done, failed,
/// cancelled, timed out), its secrets do not stay behind.
#[derive(Debug)]
pub struct BundleFile {
    path: PathBuf,
}

impl BundleFile {
    /// Where the bundle is.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for BundleFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove a release bundle (it holds secrets): remove it by hand");
            }
        }
    }
}

/// Removes every file in the bundle directory (none is in use when the agent starts).
fn sweep(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a release bundle left by an earlier run")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove a leftover release bundle (it holds secrets)")
                }
            }
        }
    }
}

struct WaiterGuard(
    Arc<Mutex<HashMap<String, mpsc::UnboundedSender<BundleChunk>>>>,
    String,
);

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn a_bundle_is_private_while_fetched_and_gone_when_the_fetch_is_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let bundles_dir = dir.path().join("bundles");
        let outbox = Outbox::default();
        let bundles = Bundles::new(outbox.clone(), bundles_dir.clone());
        let events = JobEvents::new("job", outbox.clone(), 0);
        let sha = "a".repeat(64);
        let path = bundles_dir.join(format!("{sha}.tar.gz"));
        let fetch = {
            let (bundles, events, sha) = (bundles.clone(), events.clone(), sha.clone());
            tokio::spawn(async move { bundles.fetch(&sha, 10, &events).await.map(|_| ()) })
        };
        // No chunk ever comes: the fetch waits, with its file open.
        for _ in 0..100 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fetch.abort();
        let _ = fetch.await;
        assert!(!path.exists(), "a cancelled fetch left its bundle behind");
    }

    #[test]
    fn bundles_left_by_a_crash_are_swept_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let leftover = dir.path().join(format!("{}.tar.gz", "b".repeat(64)));
        std::fs::write(&leftover, b"secrets").unwrap();
        let _ = Bundles::new(Outbox::default(), dir.path().to_path_buf());
        assert!(!leftover.exists());
    }

    #[test]
    fn a_bundle_file_is_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tar.gz");
        std::fs::write(&path, b"secrets").unwrap();
        drop(BundleFile { path: path.clone() });
        assert!(!path.exists());
    }
}
