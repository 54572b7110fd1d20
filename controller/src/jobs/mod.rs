//! Jobs on the controller: signing, the durable queue, dispatch to connected agents, and the
//! lifecycle queued -> sent -> running -> succeeded / failed / cancelled / timed out (or
//! refused / interrupted, as the agent reports). Jobs for an offline host wait until it
//! returns or the job expires.

pub mod signer;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prost::Message;
use rand::RngCore;
use sentinel_proto::time::{system_time, timestamp};
use sentinel_proto::v1::{
    controller_message, job_event, job_spec, CancelJob, ControllerMessage, Job, JobEvent, JobKind,
    JobSpec, JobState, RefusalReason,
};
use tokio::sync::{broadcast, Notify};
use tonic::Status;
use tracing::{info, warn};

use crate::registry::Registry;
use crate::store::{Commits, Store, StoreError, StoredJob};
use crate::warn_limit::WarnLimiter;
pub use signer::Signer;

/// Events kept per job; older ones are dropped (the first few, which say how it started, stay).
const MAX_EVENTS: usize = 500;
const KEEP_FIRST_EVENTS: usize = 20;
/// Encoded bytes of events kept per job, whatever the host sends: with [`MAX_EVENTS`] this
/// bounds what one job costs in memory, in each store write and in a `GetJob` answer. A
/// deploy's whole output is far below it; a host sending more loses its oldest lines.
const MAX_JOB_EVENT_BYTES: usize = 512 * 1024;
/// Longest text kept from one event (a log line, a step's or a refusal's detail, a finish
/// detail); the rest is cut and the cut is said.
const MAX_EVENT_TEXT: usize = 4 * 1024;
/// Largest finish event (with its typed result) kept whole; a larger one loses its result
/// (a cut report is of no use) and the job's detail says so.
const MAX_RESULT_BYTES: usize = 256 * 1024;
/// Longest `detail` of a job.
const MAX_DETAIL: usize = 8 * 1024;
/// Encoded bytes of events kept over all jobs of one host. Past it the host's log and step
/// events are no longer kept (its state changes still are): one host certificate cannot make
/// the controller store more than this, however many jobs it is given.
const MAX_HOST_EVENT_BYTES: usize = 32 * 1024 * 1024;
/// What joins a cancelled job's detail to the host's own account of how it ended.
const HOST_ACCOUNT: &str = "; on the host: ";

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
    /// Encoded size of `job.events`.
    event_bytes: usize,
    /// Whether ignored events (late, or past a budget) were logged already: once per job, so
    /// that a host re-sending them cannot flood the log.
    ignored_logged: bool,
}

impl Entry {
    fn new(job: Job, envelope: sentinel_proto::v1::SignedJob) -> Self {
        let bundle = bundle_of(&envelope);
        let event_bytes = job.events.iter().map(|e| e.encoded_len()).sum();
        Self {
            job,
            envelope,
            bundle,
            event_bytes,
            ignored_logged: false,
        }
    }
}

/// The controller's jobs.
pub struct JobQueue {
    entries: Mutex<HashMap<String, Entry>>,
    /// Per host, the ids of its jobs that were unfinished when last looked at: dispatch reads
    /// these instead of scanning every job ever kept (a fan-out submits one job per host).
    /// Cleaned lazily by dispatch. Lock order: `entries` before `open`.
    open: Mutex<HashMap<String, HashSet<String>>>,
    dirty: crate::store::DirtyKeys,
    /// Per host, the encoded bytes of events kept over all its jobs (the sum of their
    /// `event_bytes`). Lock order: `entries` before `host_bytes`.
    host_bytes: Mutex<HashMap<String, usize>>,
    /// Warnings about events a host may send at will (unknown jobs, other hosts' jobs).
    ignored: WarnLimiter,
    registry: Arc<Registry>,
    signer: Option<Signer>,
    changed: Notify,
    events: broadcast::Sender<JobEvent>,
    run_timeout: Duration,
    /// The store's commit barrier: submissions, sends and final states wait on it.
    commits: Arc<Commits>,
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
        let mut host_bytes: HashMap<String, usize> = HashMap::new();
        for stored in store.load_jobs()? {
            if !is_final(stored.job.state()) {
                open.entry(stored.job.target_host.clone())
                    .or_default()
                    .insert(stored.job.job_id.clone());
            }
            let entry = Entry::new(stored.job, stored.envelope);
            *host_bytes.entry(entry.job.target_host.clone()).or_default() += entry.event_bytes;
            entries.insert(entry.job.job_id.clone(), entry);
        }
        let (events, _) = broadcast::channel(4096);
        Ok(Arc::new(Self {
            entries: Mutex::new(entries),
            open: Mutex::new(open),
            dirty: Default::default(),
            host_bytes: Mutex::new(host_bytes),
            ignored: WarnLimiter::new("ignored job events", 3, 20, Duration::from_secs(60)),
            registry,
            signer,
            changed: Notify::new(),
            events,
            run_timeout,
            commits: Arc::default(),
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
        self.lock()
            .insert(job_id.clone(), Entry::new(job.clone(), envelope));
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
    /// A job becomes SENT in the store before it leaves: the send waits for the commit.
    pub fn dispatch(&self, host: &str) {
        let Some(tx) = self.registry.sender(host) else {
            return;
        };
        let mut messages = Vec::new();
        let mut marked = Vec::new();
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
                messages.push(ControllerMessage {
                    msg: Some(controller_message::Msg::Job(entry.envelope.clone())),
                });
                if entry.job.state() == JobState::Queued {
                    entry.job.state = JobState::Sent as i32;
                    entry.job.detail = "sent to the agent".into();
                    entry.job.updated_at = Some(sentinel_proto::time::now());
                    marked.push(id);
                }
            }
        }
        for id in &marked {
            self.touch(id);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Outside a runtime (unit tests of the queue alone) nothing is flushed either.
            for msg in messages {
                if tx.try_send(Ok(msg)).is_err() {
                    break;
                }
            }
            return;
        };
        let commits = self.commits.clone();
        let host = host.to_string();
        runtime.spawn(async move {
            if let Err(e) = commits.commit().await {
                // The agent's journal still runs each job id once; only the controller's
                // record of "sent" may be behind.
                warn!(host = %host, error = %e, "sending jobs whose SENT state is not stored yet");
            }
            for msg in messages {
                // A closed stream: the jobs stay SENT and go again on the next connection.
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
    }

    /// The store's commit barrier, for callers that must have a write durable before they
    /// answer or act on it.
    pub fn commits(&self) -> &Arc<Commits> {
        &self.commits
    }

    /// Applies an event reported by `host`. Events for jobs of other hosts are refused: an
    /// agent can only speak about its own jobs. What a host sends is bounded before it is
    /// kept: texts per event, events and bytes per job, bytes over all the host's jobs, and
    /// a job that already ended takes no more events (but for one account of how a job
    /// cancelled here ended on the host).
    pub fn on_event(&self, host: &str, mut event: JobEvent) {
        let result_dropped = bound_event(&mut event);
        let id = event.job_id.clone();
        {
            let mut entries = self.lock();
            let Some(entry) = entries.get_mut(&id) else {
                self.ignored
                    .warn(host, || format!("event for an unknown job {id:?} ignored"));
                return;
            };
            if entry.job.target_host != host {
                self.ignored.warn(host, || {
                    format!(
                        "event for job {id:?} of host {:?} from another host ignored",
                        entry.job.target_host
                    )
                });
                return;
            }
            let was_final = is_final(entry.job.state());
            if was_final {
                if !self.apply_host_account(host, entry, &event) {
                    if !entry.ignored_logged {
                        entry.ignored_logged = true;
                        info!(host, job_id = ?id, state = entry.job.state().as_str_name(), "events for a job that already ended are ignored (said once per job)");
                    }
                    return;
                }
                drop(entries);
                let _ = self.events.send(event);
                self.touch(&id);
                return;
            }
            let job = &mut entry.job;
            match &event.event {
                Some(job_event::Event::Accepted(_)) => {
                    job.state = JobState::Running as i32;
                    job.detail = "running".into();
                }
                Some(job_event::Event::Refused(r)) => {
                    job.state = JobState::Refused as i32;
                    let reason = RefusalReason::try_from(r.reason)
                        .unwrap_or(RefusalReason::Unspecified)
                        .as_str_name();
                    job.detail = format!("refused by the agent: {reason}: {}", r.detail);
                    warn!(host, job_id = ?id, detail = ?job.detail, "job refused");
                }
                Some(job_event::Event::Finished(f)) => {
                    let state = JobState::try_from(f.state).unwrap_or(JobState::Failed);
                    job.state = if is_final(state) {
                        state
                    } else {
                        JobState::Failed
                    } as i32;
                    job.detail = f.detail.clone();
                    if let Some(len) = result_dropped {
                        job.detail.push_str(&format!(
                            " (its result of {len} bytes was dropped: over {MAX_RESULT_BYTES} bytes)"
                        ));
                    }
                    info!(host, job_id = ?id, state = state.as_str_name(), detail = ?f.detail, "job finished");
                }
                _ => {}
            }
            bound_text(&mut job.detail, MAX_DETAIL);
            if is_final(job.state()) {
                crate::metrics::get().job_finished(job.kind(), job.state());
            }
            job.updated_at = Some(sentinel_proto::time::now());
            if !self.keep_event(host, entry, &event) {
                // A log or step line past the host's budget: not kept, and nothing changed.
                return;
            }
        }
        let _ = self.events.send(event);
        self.touch(&id);
    }

    /// For a job that ended here: keeps the host's account of how a job cancelled here
    /// actually ended (e.g. a deploy that put the live release back), once. Any other late
    /// event is a re-report after a reconnect, or noise; returns whether it was kept.
    fn apply_host_account(&self, host: &str, entry: &mut Entry, event: &JobEvent) -> bool {
        let Some(job_event::Event::Finished(f)) = &event.event else {
            return false;
        };
        let account = entry.job.state() == JobState::Cancelled
            && f.state == JobState::Cancelled as i32
            && !f.detail.is_empty()
            && !entry.job.detail.contains(HOST_ACCOUNT);
        if !account {
            return false;
        }
        entry.job.detail = format!("{}{HOST_ACCOUNT}{}", entry.job.detail, f.detail);
        bound_text(&mut entry.job.detail, MAX_DETAIL);
        entry.job.updated_at = Some(sentinel_proto::time::now());
        self.keep_event(host, entry, event);
        true
    }

    /// Appends `event` to the job's events within the job's and the host's budgets, dropping
    /// the oldest events after the first few as needed. Log and step events of a host past
    /// its budget are not kept; returns whether the event was.
    fn keep_event(&self, host: &str, entry: &mut Entry, event: &JobEvent) -> bool {
        let size = event.encoded_len();
        let mut host_bytes = self.host_bytes.lock().unwrap_or_else(|p| p.into_inner());
        let total = host_bytes.entry(host.to_string()).or_default();
        let chatter = matches!(
            event.event,
            Some(job_event::Event::Log(_)) | Some(job_event::Event::Step(_))
        );
        if chatter && *total + size > MAX_HOST_EVENT_BYTES {
            if !entry.ignored_logged {
                entry.ignored_logged = true;
                warn!(host, job_id = ?entry.job.job_id, budget = MAX_HOST_EVENT_BYTES, "the host's job events exceed its budget: its log and step events are no longer kept (said once per job)");
            }
            return false;
        }
        let events = &mut entry.job.events;
        while events.len() > KEEP_FIRST_EVENTS
            && (events.len() >= MAX_EVENTS || entry.event_bytes + size > MAX_JOB_EVENT_BYTES)
        {
            let dropped = events.remove(KEEP_FIRST_EVENTS).encoded_len();
            entry.event_bytes -= dropped;
            *total = total.saturating_sub(dropped);
        }
        events.push(event.clone());
        entry.event_bytes += size;
        *total += size;
        true
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

    /// The bundles that unfinished jobs name (they must stay on disk until those end).
    pub fn open_bundles(&self) -> HashSet<String> {
        self.lock()
            .values()
            .filter(|e| !is_final(e.job.state()))
            .filter_map(|e| e.bundle.clone())
            .collect()
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

    /// The signed list of keys agents should trust, when a signing key is configured.
    pub fn trusted_keys(&self) -> Option<sentinel_proto::v1::TrustedKeys> {
        self.signer.as_ref().map(Signer::trusted_keys)
    }

    /// Waits until job `id` is final (or gone) and returns it, once its final state is in
    /// the store: callers act on it (the next pipeline step, a backup's bookkeeping).
    pub async fn wait_final(&self, id: &str) -> Option<Job> {
        loop {
            let notified = self.changed.notified();
            let job = self.get(id)?;
            if is_final(job.state()) {
                while let Err(e) = self.commits.commit().await {
                    warn!(job_id = %id, error = %e, "waiting for the store before acting on a finished job");
                }
                return Some(job);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }

    /// Times out jobs that waited past their expiry, or ran longer than the run timeout.
    pub fn sweep(&self) {
        self.ignored.flush();
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
        {
            let mut host_bytes = self.host_bytes.lock().unwrap_or_else(|p| p.into_inner());
            for id in &old {
                if let Some(e) = entries.remove(id) {
                    if let Some(total) = host_bytes.get_mut(&e.job.target_host) {
                        *total = total.saturating_sub(e.event_bytes);
                    }
                }
            }
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

/// Cuts the texts of an event a host sent to [`MAX_EVENT_TEXT`], and drops a finish result
/// over [`MAX_RESULT_BYTES`] (returning its length, for the job's detail).
fn bound_event(event: &mut JobEvent) -> Option<usize> {
    bound_text(&mut event.job_id, MAX_EVENT_TEXT);
    match &mut event.event {
        Some(job_event::Event::Refused(r)) => bound_text(&mut r.detail, MAX_EVENT_TEXT),
        Some(job_event::Event::Log(l)) => {
            bound_text(&mut l.stream, 64);
            bound_text(&mut l.line, MAX_EVENT_TEXT);
        }
        Some(job_event::Event::Step(st)) => {
            bound_text(&mut st.name, 256);
            bound_text(&mut st.detail, MAX_EVENT_TEXT);
        }
        Some(job_event::Event::Finished(f)) => {
            bound_text(&mut f.detail, MAX_EVENT_TEXT);
            let len = prost::Message::encoded_len(&*f);
            if len > MAX_RESULT_BYTES && f.result.is_some() {
                f.result = None;
                return Some(len);
            }
        }
        Some(job_event::Event::Accepted(_)) | None => {}
    }
    None
}

/// Cuts `text` to at most `max` bytes (on a character boundary) and says how much was cut.
fn bound_text(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let cut = text.len();
    let mut end = max.saturating_sub(40);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("… [{} bytes cut]", cut - end));
}

fn bundle_of(envelope: &sentinel_proto::v1::SignedJob) -> Option<String> {
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

    fn log(job_id: &str, seq: u64, line: &str) -> JobEvent {
        JobEvent {
            job_id: job_id.into(),
            seq,
            at: None,
            event: Some(job_event::Event::Log(sentinel_proto::v1::JobLog {
                stream: "stdout".into(),
                line: line.into(),
            })),
        }
    }

    #[test]
    fn what_one_host_makes_the_controller_keep_is_bounded_per_event_job_and_host() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let jobs = queue(&store);
        let line = "x".repeat(1 << 20);
        let mut kept = 0;
        // 100 jobs, each sent 200 one-MiB lines: 20 GiB offered.
        for _ in 0..100 {
            let id = submit(&jobs);
            for seq in 0..200 {
                jobs.on_event("web-1", log(&id, seq, &line));
            }
            let job = jobs.get(&id).unwrap();
            let bytes: usize = job.events.iter().map(|e| e.encoded_len()).sum();
            assert!(job.events.len() <= MAX_EVENTS);
            assert!(bytes <= MAX_JOB_EVENT_BYTES, "{bytes}");
            assert!(job
                .events
                .iter()
                .all(|e| e.encoded_len() < MAX_EVENT_TEXT + 200));
            kept += bytes;
        }
        assert!(kept <= MAX_HOST_EVENT_BYTES, "{kept}");
        // State changes still count past the budget.
        let id = submit(&jobs);
        jobs.on_event(
            "web-1",
            JobEvent {
                job_id: id.clone(),
                seq: 1,
                at: None,
                event: Some(job_event::Event::Finished(JobFinished {
                    state: JobState::Succeeded as i32,
                    detail: "d".repeat(1 << 20),
                    ..Default::default()
                })),
            },
        );
        let job = jobs.get(&id).unwrap();
        assert_eq!(job.state(), JobState::Succeeded);
        assert!(job.detail.len() <= MAX_DETAIL);
        // Nothing more is kept for a job that ended.
        jobs.on_event("web-1", log(&id, 2, "late"));
        assert_eq!(jobs.get(&id).unwrap().events.len(), 1);
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
