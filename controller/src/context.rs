//! What the controller's services share: the live fleet, the job queue, the deploy pipeline.
//! One struct, so adding a capability means adding a field, not rewiring every service.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backups::Backups;
use crate::jobs::JobQueue;
use crate::pipeline::Pipeline;
use crate::registry::Registry;
use crate::revocation::DenyList;
use crate::store::Store;

/// Shared controller state, handed to every service.
pub struct Context {
    /// Connected agents and the latest state of every host.
    pub registry: Arc<Registry>,
    /// Signed jobs and their lifecycle.
    pub jobs: Arc<JobQueue>,
    /// Deploys and their history.
    pub pipeline: Arc<Pipeline>,
    /// Where release bundles are kept (`DATA_DIR/bundles/<sha256>.tar.gz`).
    pub bundles_dir: PathBuf,
    /// Backups, when `[backups]` is configured (also the metrics' backup ages).
    pub backups: Option<Arc<Backups>>,
    /// The audit trail of operator writes.
    pub audit: Arc<crate::audit::AuditLog>,
    /// App locks (also installed in the pipeline, which refuses locked apps).
    pub locks: Arc<crate::audit::Locks>,
    /// Enrolment and renewal, when `[pki]` configures an issuing CA.
    pub enrolment: Option<Arc<crate::enroll::Enrolment>>,
    /// Revoked hosts and operators.
    pub deny: Arc<DenyList>,
    /// The durable store, for the calls that must commit before they answer (revocation,
    /// forgetting a host).
    pub store: Arc<dyn Store>,
}

impl Context {
    /// The file of bundle `sha256`, if the name is a well-formed digest.
    pub fn bundle_path(&self, sha256: &str) -> Option<PathBuf> {
        (sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| self.bundles_dir.join(format!("{sha256}.tar.gz")))
    }
}
