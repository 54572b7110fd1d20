//! Jobs on the controller: signing, the durable queue, dispatch to connected agents, and the
//! lifecycle queued -> sent -> running -> succeeded / failed / cancelled / timed out (or
//! refused / interrupted, as the agent reports). Jobs for an offline host wait until it
//! returns or the job expires.

pub mod signer;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::RngCore;
use sentinel_proto::time::{system_time, timestamp};
use sentinel_proto::v1::{
    controller_message, job_event, job_spec, CancelJob, ControllerMessage, Job, JobEvent, JobKind,
    JobSpec, JobState, RefusalReason,
};
use tokio::sync::{broadcast, Notify};
use tonic::Status;
use tracing::{debug, info, warn};

use crate::registry::Registry;
use crate::store::{Store, StoreError, StoredJob};
pub use signer::Signer;

/// Events kept per job; older ones are dropped (the first few, which say how it started, stay).
const MAX_EVENTS: usize = 500;
const KEEP_FIRST_EVENTS: usize = 20;

/// Whether a job state is final.
pub fn is_final(state: JobState) -> bool {
    !matches!(
        state,
        JobState::Unspecified | JobState::Queued | JobState::Sent | JobState::Running
    )
}

struct Entry {
    job: Job,
    envelope: sentinel_proto::v1::SignedJob,
    /// Bundles this job may fetch (deploys).
    bundle: Option<String>,
}

/// The controller's jobs.
pub struct JobQueue {
    entries: Mutex<HashMap<String, Entry>>,
    /// Per host, the ids of its jobs that were unfinished when last looked at: dispatch reads
    /// these instead of scanning every job ever kept (a fan-out submits one job per host).
    /// Cleaned lazily by dispatch. Lock order: `entries` before `open`.
    open: Mutex<HashMap<String, HashSet<String>>>,
    dirty: crate::store::DirtyKeys,
    registry: Arc<Registry>,
    signer: Option<Signer>,
    changed: Notify,
    events: broadcast::Sender<JobEvent>,
    run_timeout: Duration,
}

/// What a caller asks to run.
pub struct NewJob {
    /// The host that runs it.
    pub target: String,
    /// The kind, matching `params`.
    pub kind: JobKind,
    /// Its parameters.
    pub params: job_spec::Params,
    /// How long the job may wait to be started.
    pub ttl: Duration,
    /// Who asked (operator name or "pipeline:<deploy id>").
    pub requested_by: String,
}

impl JobQueue {
    /// Loads stored jobs. `signer` is None when no signing key is configured: jobs are then
    /// refused at submission with a clear error.
    pub fn load(
        store: &dyn Store,
        registry: Arc<Registry>,
        signer: Option<Signer>,
        run_timeout: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let mut entries = HashMap::new();
        let mut open: HashMap<String, HashSet<String>> = HashMap::new();
        for stored in store.load_jobs()? {
            if !is_final(stored.job.state()) {
                open.entry(stored.job.target_host.clone())
                    .or_default()
                    .insert(stored.job.job_id.clone());
            }
            let bundle = bundle_of(&stored.envelope);
            entries.insert(
                stored.job.job_id.clone(),
                Entry {
                    job: stored.job,
                    envelope: stored.envelope,
                    bundle,
                },
            );
        }
        let (events, _) = broadcast::channel(4096);
        Ok(Arc::new(Self {
            entries: Mutex::new(entries),
            open: Mutex::new(open),
            dirty: Default::default(),
            registry,
            signer,
            changed: Notify::new(),
            events,
            run_timeout,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self, id: &str) {
        self.dirty.mark(id);
        self.changed.notify_waiters();
    }

    /// Every job event as it arrives (for deploy watchers).
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    /// Signs, stores and (if the host is connected) sends a job.
    pub fn submit(&self, new: NewJob) -> Result<Job, Status> {
        let signer = self.signer.as_ref().ok_or_else(|| {
            Status::failed_precondition("no job-signing key configured ([signing] key)")
        })?;
        let now = SystemTime::now();
        let mut nonce = vec![0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce);
        let job_id = format!(
            "j-{}-{}",
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
            hex::encode(&nonce[..4])
        );
        let spec = JobSpec {
            job_id: job_id.clone(),
            target_host: new.target.clone(),
            kind: new.kind as i32,
            not_before: Some(timestamp(now)),
            expires_at: Some(timestamp(now + new.ttl)),
            nonce,
            key_id: String::new(),
            params: Some(new.params),
        };
        let envelope = signer.sign(spec);
        let job = Job {
            job_id: job_id.clone(),
            target_host: new.target.clone(),
            kind: new.kind as i32,
            state: JobState::Queued as i32,
            requested_by: new.requested_by,
            created_at: Some(timestamp(now)),
            updated_at: Some(timestamp(now)),
            expires_at: Some(timestamp(now + new.ttl)),
            detail: "waiting for the host".into(),
            events: Vec::new(),
        };
        let bundle = bundle_of(&envelope);
        self.lock().insert(
            job_id.clone(),
            Entry {
                job: job.clone(),
                envelope,
                bundle,
            },
        );
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(new.target.clone())
            .or_default()
            .insert(job_id.clone());
        self.touch(&job_id);
        info!(job_id = %job_id, host = %new.target, kind = new.kind.as_str_name(), "job queued");
        self.dispatch(&new.target);
        Ok(self.get(&job_id).unwrap_or(job))
    }

    /// Sends every unfinished job of `host` to it, if connected. Jobs already sent are sent
    /// again: the agent's journal recognises them and reports how they stand instead of
    /// running them twice, which settles jobs whose report was lost with a connection.
    pub fn dispatch(&self, host: &str) {
        let Some(tx) = self.registry.sender(host) else {
            return;
        };
        let mut sent = Vec::new();
        {
            let mut entries = self.lock();
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let Some(ids) = open.get_mut(host) else {
                return;
            };
            ids.retain(|id| entries.get(id).is_some_and(|e| !is_final(e.job.state())));
            if ids.is_empty() {
                open.remove(host);
                return;
            }
            let mut pending: Vec<&Entry> = ids.iter().filter_map(|id| entries.get(id)).collect();
            pending.sort_by_key(|e| e.job.created_at.map(|t| (t.seconds, t.nanos)));
            let pending: Vec<String> = pending.iter().map(|e| e.job.job_id.clone()).collect();
            drop(open);
            for id in pending {
                let Some(entry) = entries.get_mut(&id) else {
                    continue;
                };
                let msg = ControllerMessage {
                    msg: Some(controller_message::Msg::Job(entry.envelope.clone())),
                };
                if tx.try_send(Ok(msg)).is_err() {
                    break;
                }
                if entry.job.state() == JobState::Queued {
                    entry.job.state = JobState::Sent as i32;
                    entry.job.detail = "sent to the agent".into();
                    entry.job.updated_at = Some(sentinel_proto::time::now());
                }
                sent.push(entry.job.job_id.clone());
            }
        }
        for id in sent {
            self.touch(&id);
        }
    }

    /// Applies an event reported by `host`. Events for jobs of other hosts are refused: an
    /// agent can only speak about its own jobs.
    pub fn on_event(&self, host: &str, event: JobEvent) {
        let id = event.job_id.clone();
        {
            let mut entries = self.lock();
            let Some(entry) = entries.get_mut(&id) else {
                warn!(host, job_id = %id, "event for an unknown job ignored");
                return;
            };
            if entry.job.target_host != host {
                warn!(host, job_id = %id, target = %entry.job.target_host, "event from a host that is not the job's target ignored");
                return;
            }
            let job = &mut entry.job;
            let was_final = is_final(job.state());
            match &event.event {
                Some(job_event::Event::Accepted(_)) if !was_final => {
                    job.state = JobState::Running as i32;
                    job.detail = "running".into();
                }
                Some(job_event::Event::Refused(r)) if !was_final => {
                    job.state = JobState::Refused as i32;
                    let reason = RefusalReason::try_from(r.reason)
                        .unwrap_or(RefusalReason::Unspecified)
                        .as_str_name();
                    job.detail = format!("refused by the agent: {reason}: {}", r.detail);
                    warn!(host, job_id = %id, detail = %job.detail, "job refused");
                }
                Some(job_event::Event::Finished(f)) => {
                    if was_final {
                        // How a job cancelled here actually ended on the host (e.g. a deploy
                        // that put the live release back) is worth keeping; any other late
                        // report is a re-report after a reconnect.
                        let cancelled_here = job.state() == JobState::Cancelled
                            && f.state == JobState::Cancelled as i32
                            && !f.detail.is_empty()
                            && !job.detail.contains(&f.detail);
                        if !cancelled_here {
                            return;
                        }
                        job.detail = format!("{}; on the host: {}", job.detail, f.detail);
                        job.updated_at = Some(sentinel_proto::time::now());
                        job.events.push(event.clone());
                        drop(entries);
                        let _ = self.events.send(event);
                        self.touch(&id);
                        return;
                    }
                    let state = JobState::try_from(f.state).unwrap_or(JobState::Failed);
                    job.state = if is_final(state) {
                        state
                    } else {
                        JobState::Failed
                    } as i32;
                    job.detail = f.detail.clone();
                    info!(host, job_id = %id, state = state.as_str_name(), detail = %f.detail, "job finished");
                }
                Some(job_event::Event::Refused(r)) => {
                    // A job that already ended, re-sent after a reconnect and refused as a
                    // replay: that says nothing about how it ended, so it is not kept.
                    debug!(host, job_id = %id, detail = %r.detail, "refusal of a finished job ignored");
                    return;
                }
                _ => {}
            }
            if !was_final && is_final(job.state()) {
                crate::metrics::get().job_finished(job.kind(), job.state());
            }
            job.updated_at = Some(sentinel_proto::time::now());
            if job.events.len() >= MAX_EVENTS {
                job.events.remove(KEEP_FIRST_EVENTS);
            }
            job.events.push(event.clone());
        }
        let _ = self.events.send(event);
        self.touch(&id);
    }

    /// Whether `host` may fetch bundle `sha256`: only for its own unfinished deploy jobs,
    /// since a bundle carries the environment's secrets.
    pub fn bundle_allowed(&self, host: &str, sha256: &str) -> bool {
        // Through the host's open jobs: scanning every job kept would make each of a fleet's
        // requests cost as much as the whole job history.
        let entries = self.lock();
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(host).is_some_and(|ids| {
            ids.iter().filter_map(|id| entries.get(id)).any(|e| {
                e.job.target_host == host
                    && !is_final(e.job.state())
                    && e.bundle.as_deref() == Some(sha256)
            })
        })
    }

    /// One job.
    pub fn get(&self, id: &str) -> Option<Job> {
        self.lock().get(id).map(|e| e.job.clone())
    }

    /// Jobs, newest first, optionally of one host.
    pub fn list(&self, host: &str, limit: usize) -> Vec<Job> {
        let mut jobs: Vec<Job> = self
            .lock()
            .values()
            .filter(|e| host.is_empty() || e.job.target_host == host)
            .map(|e| {
                let mut j = e.job.clone();
                j.events.clear();
                j
            })
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.created_at.map(|t| (t.seconds, t.nanos))));
        jobs.truncate(limit);
        jobs
    }

    /// Cancels a job: a queued one never leaves; a sent or running one is told to stop.
    pub fn cancel(&self, id: &str, reason: &str) -> Result<Job, Status> {
        let host = {
            let mut entries = self.lock();
            let entry = entries
                .get_mut(id)
                .ok_or_else(|| Status::not_found(format!("no job {id:?}")))?;
            if is_final(entry.job.state()) {
                return Err(Status::failed_precondition(format!(
                    "job {id} already ended: {}",
                    entry.job.state().as_str_name()
                )));
            }
            entry.job.state = JobState::Cancelled as i32;
            crate::metrics::get().job_finished(entry.job.kind(), JobState::Cancelled);
            entry.job.detail = format!("cancelled: {reason}");
            entry.job.updated_at = Some(sentinel_proto::time::now());
            entry.job.target_host.clone()
        };
        if let Some(tx) = self.registry.sender(&host) {
            let _ = tx.try_send(Ok(ControllerMessage {
                msg: Some(controller_message::Msg::CancelJob(CancelJob {
                    job_id: id.to_string(),
                    reason: reason.to_string(),
                })),
            }));
        }
        self.touch(id);
        self.get(id)
            .ok_or_else(|| Status::not_found(id.to_string()))
    }

    /// Waits until job `id` is final (or gone) and returns it.
    pub async fn wait_final(&self, id: &str) -> Option<Job> {
        loop {
            let notified = self.changed.notified();
            let job = self.get(id)?;
            if is_final(job.state()) {
                return Some(job);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }

    /// Times out jobs that waited past their expiry, or ran longer than the run timeout.
    pub fn sweep(&self) {
        let now = SystemTime::now();
        let mut timed_out = Vec::new();
        {
            let mut entries = self.lock();
            for e in entries.values_mut() {
                let state = e.job.state();
                let expires = e.job.expires_at.as_ref().map(system_time);
                let reason = match state {
                    JobState::Queued | JobState::Sent if expires.is_some_and(|x| now > x) => {
                        Some("expired before the agent started it".to_string())
                    }
                    JobState::Running if expires.is_some_and(|x| now > x + self.run_timeout) => {
                        Some(format!(
                            "still running {:?} after its start window",
                            self.run_timeout
                        ))
                    }
                    _ => None,
                };
                if let Some(reason) = reason {
                    e.job.state = JobState::TimedOut as i32;
                    crate::metrics::get().job_finished(e.job.kind(), JobState::TimedOut);
                    e.job.detail = reason;
                    e.job.updated_at = Some(sentinel_proto::time::now());
                    timed_out.push((e.job.job_id.clone(), e.job.target_host.clone()));
                }
            }
        }
        for (id, host) in timed_out {
            warn!(job_id = %id, host = %host, "job timed out");
            if let Some(tx) = self.registry.sender(&host) {
                let _ = tx.try_send(Ok(ControllerMessage {
                    msg: Some(controller_message::Msg::CancelJob(CancelJob {
                        job_id: id.clone(),
                        reason: "timed out".into(),
                    })),
                }));
            }
            self.touch(&id);
        }
    }

    /// Forgets finished jobs whose last change is older than `keep` (a fleet probed every
    /// few minutes makes thousands of jobs a day) and returns their ids, for the store to
    /// delete. Unfinished jobs are never forgotten.
    pub fn prune(&self, keep: Duration) -> Vec<String> {
        let Some(horizon) = SystemTime::now().checked_sub(keep) else {
            return Vec::new();
        };
        let mut entries = self.lock();
        let old: Vec<String> = entries
            .values()
            .filter(|e| {
                is_final(e.job.state())
                    && e.job
                        .updated_at
                        .as_ref()
                        .is_some_and(|t| system_time(t) < horizon)
            })
            .map(|e| e.job.job_id.clone())
            .collect();
        for id in &old {
            entries.remove(id);
        }
        drop(entries);
        if !old.is_empty() {
            self.dirty.forget(&old);
            info!(
                jobs = old.len(),
                ?keep,
                "forgot finished jobs past their retention"
            );
        }
        old
    }

    /// Prunes finished jobs older than `keep` at once and then every hour, deleting them from
    /// `store` too, until `shutdown`.
    pub async fn run_retention(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        keep: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let old = self.prune(keep);
            if old.is_empty() {
                continue;
            }
            let store = store.clone();
            let deleted = tokio::task::spawn_blocking(move || store.delete_jobs(&old)).await;
            match deleted {
                Ok(Ok(())) => {}
                // They are gone from memory; the next start prunes them from the store again.
                Ok(Err(e)) => warn!(error = %e, "could not delete old jobs from the store"),
                Err(e) => warn!(error = %e, "the job-retention task failed"),
            }
        }
    }

    /// Takes the jobs changed since the last call, for the flusher.
    pub fn take_dirty(&self) -> Vec<StoredJob> {
        let ids = self.dirty.take();
        let entries = self.lock();
        ids.iter()
            .filter_map(|id| {
                entries.get(id).map(|e| StoredJob {
                    job: e.job.clone(),
                    envelope: e.envelope.clone(),
                })
            })
            .collect()
    }

    /// Puts jobs back after a failed flush.
    pub fn requeue(&self, jobs: &[StoredJob]) {
        self.dirty
            .requeue(jobs.iter().map(|j| j.job.job_id.as_str()));
    }
}

fn bundle_of(envelope: &sentinel_proto::v1::SignedJob) -> Option<String> {
    use prost::Message;
    match JobSpec::decode(envelope.spec.as_slice()).ok()?.params? {
        job_spec::Params::Deploy(d) => Some(d.bundle_sha256),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Liveness;
    use crate::store::embedded::EmbeddedStore;
    use sentinel_proto::v1::{JobFinished, RollbackParams};

    fn queue(store: &EmbeddedStore) -> Arc<JobQueue> {
        let registry = Registry::load(
            store,
            Liveness {
                heartbeat_interval: Duration::from_secs(10),
                missed_heartbeats_offline: 3,
            },
        )
        .unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        JobQueue::load(
            store,
            registry,
            Some(Signer::new(key)),
            Duration::from_secs(60),
        )
        .unwrap()
    }

    fn submit(jobs: &JobQueue) -> String {
        jobs.submit(NewJob {
            target: "web-1".into(),
            kind: JobKind::Rollback,
            params: job_spec::Params::Rollback(RollbackParams::default()),
            ttl: Duration::from_secs(60),
            requested_by: "test".into(),
        })
        .unwrap()
        .job_id
    }

    #[test]
    fn finished_jobs_past_their_retention_are_forgotten_and_deleted_open_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let jobs = queue(&store);
        let done = submit(&jobs);
        let open = submit(&jobs);
        jobs.on_event(
            "web-1",
            JobEvent {
                job_id: done.clone(),
                seq: 1,
                at: None,
                event: Some(job_event::Event::Finished(JobFinished {
                    state: JobState::Succeeded as i32,
                    ..Default::default()
                })),
            },
        );
        store.save_jobs(&jobs.take_dirty()).unwrap();
        // Nothing is old yet.
        assert!(jobs.prune(Duration::from_secs(3600)).is_empty());
        std::thread::sleep(Duration::from_millis(20));
        let old = jobs.prune(Duration::from_millis(10));
        assert_eq!(old, vec![done.clone()]);
        assert!(jobs.get(&done).is_none());
        assert!(jobs.get(&open).is_some());
        store.delete_jobs(&old).unwrap();
        let kept: Vec<String> = store
            .load_jobs()
            .unwrap()
            .into_iter()
            .map(|j| j.job.job_id)
            .collect();
        assert_eq!(kept, vec![open]);
    }
}
