//! Signed jobs on the agent: the agent is the security boundary. A job runs only when its
//! signature verifies with a trusted key, it targets this host, it is inside its time window,
//! its nonce was never seen (the journal survives restarts), and local policy allows its kind
//! and app directory. Refusals go back to the controller and into the log.

pub mod backup;
pub mod blue_green;
pub mod bundle;
pub mod compose;
pub mod deploy;
pub mod events;
pub mod health;
pub mod journal;
pub mod policy;
pub mod probe;
pub mod release;
pub mod trust;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ed25519_dalek::VerifyingKey;
use sentinel_proto::envelope;
use sentinel_proto::v1::{
    job_event, job_finished, job_spec, JobAccepted, JobKind, JobRefused, JobSpec, JobState,
    RefusalReason, SignedJob,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::config::JobsConfig;
pub use bundle::Bundles;
pub use events::{JobError, JobEvents, Outbox};
use journal::{Journal, Phase};

use sentinel_proto::kinds::kind_name;

/// A job-subsystem setup failure (at agent start).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A trusted key file is unusable.
    #[error("trusted key {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The journal cannot be opened.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
}

/// Loads PEM public keys and indexes them by key id.
pub fn load_trusted_keys(paths: &[PathBuf]) -> Result<HashMap<String, VerifyingKey>, SetupError> {
    use ed25519_dalek::pkcs8::DecodePublicKey;
    let mut keys = HashMap::new();
    for path in paths {
        let pem = std::fs::read_to_string(path).map_err(|e| SetupError::Key {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let key = VerifyingKey::from_public_key_pem(&pem).map_err(|e| SetupError::Key {
            path: path.clone(),
            message: format!("not an Ed25519 public key in PEM: {e}"),
        })?;
        keys.insert(envelope::key_id(&key), key);
    }
    Ok(keys)
}

/// The job subsystem of one agent: verification, journal, a worker that runs accepted jobs
/// one at a time, and the outbox their events go through.
pub struct Jobs {
    host: String,
    trusted: trust::Trust,
    /// The policy in force; replaced by [`Jobs::set_config`] on SIGHUP.
    config: std::sync::RwLock<Arc<JobsConfig>>,
    journal: Journal,
    outbox: Outbox,
    bundles: Bundles,
    queue: mpsc::UnboundedSender<JobSpec>,
    running: Mutex<HashMap<String, CancellationToken>>,
}

impl Jobs {
    /// Sets up the job subsystem and starts its worker. Jobs interrupted by the previous
    /// agent run are marked so in the journal and reported once a session is up.
    pub fn start(host: &str, config: &JobsConfig, outbox: Outbox) -> Result<Arc<Self>, SetupError> {
        let (journal, interrupted) = Journal::open(&config.state_dir)?;
        let trusted =
            trust::Trust::load(load_trusted_keys(&config.trusted_keys)?, &config.state_dir)?;
        let (queue, rx) = mpsc::unbounded_channel();
        let jobs = Arc::new(Self {
            host: host.to_string(),
            trusted,
            config: std::sync::RwLock::new(Arc::new(config.clone())),
            journal,
            bundles: Bundles::new(outbox.clone(), config.state_dir.join("bundles")),
            outbox,
            queue,
            running: Mutex::new(HashMap::new()),
        });
        for rec in interrupted {
            // Reported by `report_recent` as soon as a session is up.
            warn!(job_id = %rec.job_id, "job was interrupted by an agent restart; it will not run again");
        }
        let worker = jobs.clone();
        tokio::spawn(async move { worker.work(rx).await }.instrument(tracing::info_span!("jobs")));
        Ok(jobs)
    }

    /// The `[jobs]` settings in force.
    fn config(&self) -> Arc<JobsConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts a new `[jobs]` policy in force (SIGHUP): the next job is checked against it, a
    /// running one finishes under the policy it was accepted with. `state_dir` and
    /// `trusted_keys` keep their running values (the journal and the keys are open).
    pub fn set_config(&self, new: &JobsConfig) {
        let mut config = new.clone();
        let running = self.config();
        config.state_dir = running.state_dir.clone();
        config.trusted_keys = running.trusted_keys.clone();
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }

    /// The outbox sessions drain.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Bundle chunks arriving from the controller.
    pub fn bundles(&self) -> &Bundles {
        &self.bundles
    }

    /// Re-reports how recently finished jobs ended (after a reconnect the controller may have
    /// missed it; it ignores duplicates).
    pub fn report_recent(&self) {
        let since = SystemTime::now() - Duration::from_secs(3600);
        for rec in self.journal.finished_since(since) {
            let state = match rec.phase {
                Phase::Succeeded => JobState::Succeeded,
                Phase::Failed => JobState::Failed,
                Phase::Cancelled => JobState::Cancelled,
                _ => JobState::Interrupted,
            };
            JobEvents::new(&rec.job_id, self.outbox.clone(), 1_000_000).finished(
                state,
                &rec.detail,
                None,
            );
        }
    }

    /// Takes a signed list of keys from the controller (a signing-key rotation): kept when a
    /// trusted key signed it, refused and logged otherwise.
    pub fn receive_keys(&self, keys: &sentinel_proto::v1::TrustedKeys) {
        if self.trusted.with(|k| k.is_empty()) {
            // No jobs.trusted_keys: this host runs no jobs, so no key can be checked or needed.
            debug!(signed_by = %keys.key_id, "no trusted keys configured; the controller's key list is ignored");
            return;
        }
        match self.trusted.accept(keys) {
            Ok(new) if new.is_empty() => {}
            Ok(new) => {
                info!(keys = ?new, signed_by = %keys.key_id, "now trusting job-signing key(s) the controller announced")
            }
            Err(e) => {
                warn!(error = %e, "refused a key list from the controller: not signed by a trusted key")
            }
        }
    }

    /// Handles a job from the controller: verify, check replay and policy, then queue it or
    /// refuse it. Never blocks on the job itself.
    pub fn receive(&self, job: SignedJob) {
        let now = SystemTime::now();
        let spec = match self.trusted.with(|trusted| {
            envelope::verify(&job, trusted, &self.host, now, self.config().max_clock_skew)
        }) {
            Ok(spec) => spec,
            Err(e) => {
                let job_id = best_effort_job_id(&job);
                self.refuse(&job_id, e.reason(), &e.to_string());
                return;
            }
        };
        let nonce = hex_nonce(&spec.nonce);
        if let Some(rec) = self.journal.job(&spec.job_id) {
            if !rec.phase.is_final() {
                // The controller re-sends unfinished jobs after a reconnect; this one runs.
                info!(job_id = %spec.job_id, "job already accepted and running");
                return;
            }
            // Seen and finished: say how it ended (the controller may have missed it), and
            // refuse to run it again.
            self.report_recent_one(&rec);
            self.refuse(
                &spec.job_id,
                RefusalReason::Replayed,
                &format!(
                    "job {} already ran ({:?}); never run twice",
                    spec.job_id, rec.phase
                ),
            );
            return;
        }
        if let Some(owner) = self.journal.nonce_owner(&nonce) {
            self.refuse(
                &spec.job_id,
                RefusalReason::Replayed,
                &format!("nonce {nonce} was already used by job {owner}"),
            );
            return;
        }
        if let Err(reason) = policy::check(&spec, &self.config()) {
            self.refuse(&spec.job_id, RefusalReason::Policy, &reason);
            return;
        }
        let expires = spec
            .expires_at
            .as_ref()
            .map(sentinel_proto::time::system_time)
            .unwrap_or(now);
        if let Err(e) = self
            .journal
            .record(&spec.job_id, &nonce, expires, Phase::Accepted, "")
        {
            // Without a durable replay record the job must not run.
            self.refuse(
                &spec.job_id,
                RefusalReason::Policy,
                &format!("cannot record the job: {e}"),
            );
            return;
        }
        info!(job_id = %spec.job_id, kind = kind_name(spec.kind()), "job accepted");
        JobEvents::new(&spec.job_id, self.outbox.clone(), 0)
            .raw(job_event::Event::Accepted(JobAccepted {}));
        let _ = self.queue.send(spec);
    }

    fn report_recent_one(&self, rec: &journal::Record) {
        let state = match rec.phase {
            Phase::Succeeded => JobState::Succeeded,
            Phase::Failed => JobState::Failed,
            Phase::Cancelled => JobState::Cancelled,
            _ => JobState::Interrupted,
        };
        JobEvents::new(&rec.job_id, self.outbox.clone(), 1_000_000).finished(
            state,
            &rec.detail,
            None,
        );
    }

    /// Cancels a queued or running job.
    pub fn cancel(&self, job_id: &str, reason: &str) {
        if let Some(token) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job_id)
        {
            info!(job_id, reason, "cancelling job");
            token.cancel();
        }
    }

    fn refuse(&self, job_id: &str, reason: RefusalReason, detail: &str) {
        warn!(job_id, reason = reason.as_str_name(), detail, "job refused");
        crate::metrics::get().job_refused(reason);
        JobEvents::new(job_id, self.outbox.clone(), 0).raw(job_event::Event::Refused(JobRefused {
            reason: reason as i32,
            detail: detail.to_string(),
        }));
    }

    async fn work(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<JobSpec>) {
        while let Some(spec) = rx.recv().await {
            let token = CancellationToken::new();
            self.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(spec.job_id.clone(), token.clone());
            let span =
                tracing::info_span!("job", job_id = %spec.job_id, kind = kind_name(spec.kind()));
            self.run_one(spec.clone(), token).instrument(span).await;
            self.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&spec.job_id);
        }
    }

    async fn run_one(&self, spec: JobSpec, token: CancellationToken) {
        let nonce = hex_nonce(&spec.nonce);
        let expires = spec
            .expires_at
            .as_ref()
            .map(sentinel_proto::time::system_time)
            .unwrap_or_else(SystemTime::now);
        let events = JobEvents::new(&spec.job_id, self.outbox.clone(), 1);
        if let Err(e) = self
            .journal
            .record(&spec.job_id, &nonce, expires, Phase::Running, "")
        {
            events.finished(
                JobState::Failed,
                &format!("cannot record the job start: {e}"),
                empty_result(spec.kind()),
            );
            return;
        }
        info!("job running");
        // What a cancelled deploy puts back: the release live when it started.
        let live_before = match &spec.params {
            Some(job_spec::Params::Deploy(p)) => {
                release::current_release(std::path::Path::new(&p.app_dir))
            }
            _ => None,
        };
        let (mut outcome, result) = tokio::select! {
            r = self.execute(&spec, &events) => r,
            _ = token.cancelled() => (
                Err(JobError::Cancelled("cancelled by the controller".into())),
                None,
            ),
        };
        if let (Err(JobError::Cancelled(why)), Some(job_spec::Params::Deploy(p))) =
            (&outcome, &spec.params)
        {
            outcome = Err(JobError::Cancelled(
                restore_after_cancel(p, live_before, why, &events).await,
            ));
        }
        let (phase, state, detail) = match outcome {
            Ok(summary) => (Phase::Succeeded, JobState::Succeeded, summary),
            Err(JobError::Cancelled(why)) => (Phase::Cancelled, JobState::Cancelled, why),
            Err(JobError::Failed(why)) => (Phase::Failed, JobState::Failed, why),
        };
        let detail = events.redact(&detail);
        if let Err(e) = self
            .journal
            .record(&spec.job_id, &nonce, expires, phase, &detail)
        {
            warn!(error = %e, "could not record the job's end");
        }
        info!(state = state.as_str_name(), detail = %detail, "job finished");
        crate::metrics::get().job_finished(spec.kind(), state);
        events.finished(state, &detail, result);
    }

    /// Runs a job: its outcome and its typed result (backups report what they wrote and hold).
    async fn execute(&self, spec: &JobSpec, events: &JobEvents) -> backup::Outcome {
        let config = self.config();
        let backups = &config.backups;
        match &spec.params {
            Some(job_spec::Params::Backup(p)) => backup::run_backup(p, backups, events).await,
            Some(job_spec::Params::VerifyBackups(p)) => {
                backup::verify::run_verify(p, backups, events).await
            }
            Some(job_spec::Params::RestoreTest(p)) => {
                backup::restore::run_restore_test(p, backups, events).await
            }
            Some(job_spec::Params::IsolationProbe(p)) => {
                probe::run_probe(p, &config.isolation_probe, events).await
            }
            Some(job_spec::Params::Rollback(p)) => {
                // Which release the rollback left live, for the controller's record.
                let app_dir = std::path::Path::new(&p.app_dir);
                let before = release::current_release(app_dir);
                let outcome = deploy::rollback(p, events).await;
                let report = sentinel_proto::v1::ReleaseReport {
                    commit: release::current_release(app_dir).unwrap_or_default(),
                    previous_commit: before.unwrap_or_default(),
                };
                (outcome, Some(job_finished::Result::Rollback(report)))
            }
            _ => (self.execute_deploy(spec, events).await, None),
        }
    }

    async fn execute_deploy(&self, spec: &JobSpec, events: &JobEvents) -> Result<String, JobError> {
        match &spec.params {
            Some(job_spec::Params::Deploy(p)) => {
                let bundle = self
                    .bundles
                    .fetch(&p.bundle_sha256, p.bundle_size, events)
                    .await?;
                // `bundle` removes its file when dropped, also when this future is (cancel).
                deploy::deploy(p, bundle.path(), events).await
            }
            _ => Err(JobError::Failed(format!(
                "this agent build cannot run {} jobs",
                kind_name(spec.kind())
            ))),
        }
    }
}

/// After a deploy was cancelled part-way (its files unpacked, containers stopped or half
/// started), puts the release that was live when it started back up, the way an automatic
/// rollback does; says what happened, for the job's detail.
async fn restore_after_cancel(
    p: &sentinel_proto::v1::DeployParams,
    live_before: Option<String>,
    why: &str,
    events: &JobEvents,
) -> String {
    let Some(live) = live_before else {
        return format!("{why}; no release was live before it, so there is nothing to restore");
    };
    events.log(
        "agent",
        &format!("deploy cancelled: restoring the release live before it ({live})"),
    );
    let params = sentinel_proto::v1::RollbackParams {
        app: p.app.clone(),
        environment: p.environment.clone(),
        app_dir: p.app_dir.clone(),
        to_commit: live.clone(),
        compose_file: p.compose_file.clone(),
        health: p.health.clone(),
        deploy_id: p.deploy_id.clone(),
        compose_project: p.compose_project.clone(),
        not_secret: p.not_secret.clone(),
        blue_green: p.blue_green.clone(),
    };
    match deploy::rollback(&params, events).await {
        Ok(summary) => format!("{why}; restored {live}: {summary}"),
        Err(e) => format!("{why}; restoring {live} failed: {e}"),
    }
}

/// The result a job of `kind` answers when it fails before doing anything: empty, but of its
/// kind, so the controller can tell it from an agent that does not report results.
fn empty_result(kind: JobKind) -> Option<job_finished::Result> {
    use sentinel_proto::v1::{
        BackupReport, ProbeReport, ReleaseReport, RestoreReport, VerifyReport,
    };
    match kind {
        JobKind::Backup => Some(job_finished::Result::Backup(BackupReport::default())),
        JobKind::VerifyBackups => Some(job_finished::Result::Verify(VerifyReport::default())),
        JobKind::RestoreTest => Some(job_finished::Result::RestoreTest(RestoreReport::default())),
        JobKind::IsolationProbe => {
            Some(job_finished::Result::IsolationProbe(ProbeReport::default()))
        }
        JobKind::Rollback => Some(job_finished::Result::Rollback(ReleaseReport::default())),
        _ => None,
    }
}

fn best_effort_job_id(job: &SignedJob) -> String {
    use prost::Message;
    JobSpec::decode(job.spec.as_slice())
        .map(|s| s.job_id)
        .unwrap_or_default()
}

fn hex_nonce(nonce: &[u8]) -> String {
    nonce.iter().map(|b| format!("{b:02x}")).collect()
}
