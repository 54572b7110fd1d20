//! Where a job's events go. Jobs outlive connections, so events wait in an agent-wide outbox
//! that each session drains into its stream; secrets are masked before anything is queued.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sentinel_proto::v1::{
    agent_message, job_event, job_finished, AgentMessage, BackupSeries, JobEvent, JobFinished,
    JobLog, JobState, JobStep, SeriesInventory, StepStatus,
};
use tokio::sync::Notify;

/// Messages queued for the controller beyond this are dropped oldest-first (log lines only
/// matter while someone watches; the final outcome is also in the journal).
const OUTBOX_LIMIT: usize = 10_000;

/// The agent-wide queue of messages for the controller.
#[derive(Clone, Default)]
pub struct Outbox {
    inner: Arc<OutboxInner>,
}

#[derive(Default)]
struct OutboxInner {
    queue: Mutex<VecDeque<AgentMessage>>,
    notify: Notify,
}

impl Outbox {
    /// Queues a message and wakes the session.
    pub fn push(&self, msg: agent_message::Msg) {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= OUTBOX_LIMIT {
            q.pop_front();
        }
        q.push_back(AgentMessage { msg: Some(msg) });
        drop(q);
        self.inner.notify.notify_one();
    }

    /// Takes everything queued.
    pub fn drain(&self) -> Vec<AgentMessage> {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.drain(..).collect()
    }

    /// Puts messages back at the front (the session could not send them).
    pub fn requeue(&self, msgs: Vec<AgentMessage>) {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        for m in msgs.into_iter().rev() {
            q.push_front(m);
        }
    }

    /// Resolves when something was pushed since the last wait.
    pub async fn notified(&self) {
        self.inner.notify.notified().await
    }
}

/// One job's event stream: numbered events, secrets masked.
#[derive(Clone)]
pub struct JobEvents {
    job_id: String,
    seq: Arc<AtomicU64>,
    outbox: Outbox,
    secrets: Arc<Mutex<Vec<String>>>,
    /// Env-file keys whose values are settings: [`JobEvents::add_env_value`] skips them.
    not_secret: Arc<Mutex<Vec<String>>>,
}

impl JobEvents {
    /// Events of `job_id`, numbered after `first_seq`.
    pub fn new(job_id: &str, outbox: Outbox, first_seq: u64) -> Self {
        Self {
            job_id: job_id.to_string(),
            seq: Arc::new(AtomicU64::new(first_seq)),
            outbox,
            secrets: Arc::new(Mutex::new(Vec::new())),
            not_secret: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The job this stream belongs to.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Registers a secret value (e.g. from `.env`): it is masked in every later event.
    /// Values shorter than 4 characters are not masked, since masking them would shred logs.
    pub fn add_secret(&self, value: &str) {
        if value.len() >= 4 {
            self.secrets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(value.to_string());
        }
    }

    /// Names the env-file keys whose values are settings, not secrets (the job's
    /// `not_secret`): [`JobEvents::add_env_value`] leaves their values readable. Set before
    /// any env file is read.
    pub fn set_not_secret(&self, keys: &[String]) {
        *self.not_secret.lock().unwrap_or_else(|p| p.into_inner()) = keys.to_vec();
    }

    /// Registers the value of env-file key `key`: a secret ([`JobEvents::add_secret`]) unless
    /// the key is one of [`JobEvents::set_not_secret`]'s. The one masking rule for events,
    /// results and the audit log, which all go through [`JobEvents::redact`].
    pub fn add_env_value(&self, key: &str, value: &str) {
        let setting = self
            .not_secret
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|k| k == key);
        if !setting {
            self.add_secret(value);
        }
    }

    /// `text` with every registered secret replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let secrets = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = text.to_string();
        for s in secrets.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }

    fn emit(&self, event: job_event::Event) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.outbox.push(agent_message::Msg::JobEvent(JobEvent {
            job_id: self.job_id.clone(),
            seq,
            at: Some(sentinel_proto::time::now()),
            event: Some(event),
        }));
    }

    /// A log line from a command (`stream` is "stdout", "stderr" or "agent").
    pub fn log(&self, stream: &str, line: &str) {
        self.emit(job_event::Event::Log(JobLog {
            stream: stream.to_string(),
            line: self.redact(line),
        }));
    }

    /// A step started, ended or was skipped.
    pub fn step(&self, name: &str, status: StepStatus, detail: &str, duration: Duration) {
        self.emit(job_event::Event::Step(JobStep {
            name: name.to_string(),
            status: status as i32,
            detail: self.redact(detail),
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        }));
    }

    /// The job's end, with its typed result (every string in it masked too). Sent once by
    /// the runner.
    pub fn finished(&self, state: JobState, detail: &str, result: Option<job_finished::Result>) {
        let mut result = result;
        if let Some(r) = result.as_mut() {
            let has_secrets = !self
                .secrets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
            if has_secrets {
                result_strings(r, &mut |s: &mut String| {
                    let masked = self.redact(s);
                    if masked != *s {
                        *s = masked;
                    }
                });
            }
        }
        self.emit(job_event::Event::Finished(JobFinished {
            state: state as i32,
            detail: self.redact(detail),
            result,
        }));
    }

    /// Emits a raw event (accepted / refused).
    pub fn raw(&self, event: job_event::Event) {
        self.emit(event);
    }
}

/// Calls `f` on every string of a job result (messages, errors, names, paths), so that no
/// secret a job registered leaves the host inside one. A field added to a result message
/// must be added here too.
fn result_strings(result: &mut job_finished::Result, f: &mut dyn FnMut(&mut String)) {
    fn all<'a>(strings: impl IntoIterator<Item = &'a mut String>, f: &mut dyn FnMut(&mut String)) {
        strings.into_iter().for_each(f);
    }
    fn opt(s: &mut Option<String>, f: &mut dyn FnMut(&mut String)) {
        all(s.as_mut(), f);
    }
    fn series(s: &mut Option<BackupSeries>, f: &mut dyn FnMut(&mut String)) {
        if let Some(s) = s {
            f(&mut s.environment);
            f(&mut s.database);
        }
    }
    fn inventory(inv: &mut [SeriesInventory], f: &mut dyn FnMut(&mut String)) {
        for i in inv {
            series(&mut i.series, f);
            for b in &mut i.backups {
                f(&mut b.file);
                f(&mut b.sha256);
                opt(&mut b.damaged, f);
            }
        }
    }
    match result {
        job_finished::Result::Backup(r) => {
            f(&mut r.run_id);
            f(&mut r.reason);
            for e in &mut r.written {
                series(&mut e.series, f);
                for s in [
                    &mut e.file,
                    &mut e.sha256,
                    &mut e.tool_version,
                    &mut e.server_version,
                ] {
                    f(s);
                }
                let counts = std::mem::take(&mut e.row_counts);
                e.row_counts = counts
                    .into_iter()
                    .map(|(mut table, n)| {
                        f(&mut table);
                        (table, n)
                    })
                    .collect();
                all(&mut e.paths, f);
                opt(&mut e.damaged, f);
            }
            for x in &mut r.failures {
                series(&mut x.series, f);
                f(&mut x.error);
            }
            all(&mut r.pruned, f);
            if let Some(o) = &mut r.offsite {
                f(&mut o.target);
                all(
                    o.copied
                        .iter_mut()
                        .chain(&mut o.pending)
                        .chain(&mut o.pruned),
                    f,
                );
                opt(&mut o.error, f);
                opt(&mut o.prune_error, f);
            }
            inventory(&mut r.inventory, f);
        }
        job_finished::Result::Verify(r) => {
            for d in &mut r.damaged {
                series(&mut d.series, f);
                f(&mut d.file);
                f(&mut d.error);
            }
            all(
                r.problems
                    .iter_mut()
                    .chain(&mut r.unlisted)
                    .chain(&mut r.unread),
                f,
            );
            inventory(&mut r.inventory, f);
            all(r.exposed.iter_mut().map(|e| &mut e.path), f);
        }
        job_finished::Result::RestoreTest(r) => {
            for x in &mut r.results {
                series(&mut x.series, f);
                f(&mut x.file);
                all(&mut x.mismatches, f);
                for i in &mut x.invariants {
                    f(&mut i.sql);
                    opt(&mut i.error, f);
                }
                opt(&mut x.error, f);
            }
        }
        job_finished::Result::IsolationProbe(r) => {
            for a in &mut r.attempts {
                for s in [
                    &mut a.user,
                    &mut a.user_environment,
                    &mut a.database,
                    &mut a.database_environment,
                    &mut a.message,
                ] {
                    f(s);
                }
            }
        }
        job_finished::Result::Rollback(r) => {
            f(&mut r.commit);
            f(&mut r.previous_commit);
        }
    }
}

/// Why a job failed; the message is what the operator reads.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job ran and failed.
    #[error("{0}")]
    Failed(String),
    /// The controller cancelled it.
    #[error("cancelled: {0}")]
    Cancelled(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_in_every_event() {
        let outbox = Outbox::default();
        let ev = JobEvents::new("j1", outbox.clone(), 0);
        ev.add_secret("hunter22");
        ev.log("stdout", "DB_PASSWORD=hunter22 connecting");
        ev.step(
            "up",
            StepStatus::Failed,
            "password hunter22 refused",
            Duration::ZERO,
        );
        let msgs = outbox.drain();
        assert_eq!(msgs.len(), 2);
        let text = format!("{msgs:?}");
        assert!(!text.contains("hunter22"), "{text}");
        assert!(text.contains("***"));
    }

    #[test]
    fn env_values_are_secrets_unless_their_key_is_a_setting() {
        let outbox = Outbox::default();
        let ev = JobEvents::new("j1", outbox.clone(), 0);
        ev.set_not_secret(&["PORT".to_string()]);
        ev.add_env_value("PORT", "8101");
        ev.add_env_value("DB_PASSWORD", "hunter22");
        // A key is a setting only by its exact name.
        ev.add_env_value("port", "7777");
        assert_eq!(
            ev.redact("GET http://127.0.0.1:8101/health as hunter22 on 7777"),
            "GET http://127.0.0.1:8101/health as *** on ***"
        );
    }

    #[test]
    fn secrets_are_masked_in_every_kind_of_result() {
        use sentinel_proto::v1::{
            BackupFailure, BackupReport, OffsiteReport, ProbeAttempt, ProbeReport, ReleaseReport,
            RestoreReport, RestoreResult, VerifyReport,
        };
        let outbox = Outbox::default();
        let ev = JobEvents::new("j1", outbox.clone(), 0);
        ev.add_secret("hunter22");
        let leak = || "password=hunter22 refused".to_string();
        let results = [
            job_finished::Result::Backup(BackupReport {
                failures: vec![BackupFailure {
                    series: None,
                    error: leak(),
                }],
                offsite: Some(OffsiteReport {
                    error: Some(leak()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            job_finished::Result::Verify(VerifyReport {
                problems: vec![leak()],
                ..Default::default()
            }),
            job_finished::Result::RestoreTest(RestoreReport {
                results: vec![RestoreResult {
                    error: Some(leak()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            job_finished::Result::IsolationProbe(ProbeReport {
                attempts: vec![ProbeAttempt {
                    message: leak(),
                    ..Default::default()
                }],
            }),
            job_finished::Result::Rollback(ReleaseReport {
                commit: leak(),
                previous_commit: String::new(),
            }),
        ];
        for r in results {
            ev.finished(JobState::Failed, "done", Some(r));
        }
        let text = format!("{:?}", outbox.drain());
        assert!(!text.contains("hunter22"), "{text}");
        assert_eq!(text.matches("password=*** refused").count(), 6, "{text}");
    }
}
