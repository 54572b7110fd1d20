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
    /// Bundles are written under `dir`.
    pub fn new(outbox: Outbox, dir: PathBuf) -> Self {
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

    /// Fetches bundle `sha256` of `size` bytes into a file and checks its digest.
    pub async fn fetch(
        &self,
        sha256: &str,
        size: u64,
        events: &JobEvents,
    ) -> Result<PathBuf, JobError> {
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
        let mut file = std::fs::File::create(&path)
            .map_err(|e| io(&format!("creating {}", path.display()), e))?;
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
            let _ = std::fs::remove_file(&path);
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
        Ok(path)
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
