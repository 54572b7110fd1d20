//! Probing from the hosts: one signed `IsolationProbe` job per `[isolation.probe]` host, each
//! listing every database of the policy; the agent tries its own environments' credentials on
//! the other environments' databases and answers with every attempt. A connection that got in
//! is a violation; a host that is offline, refuses the job or does not answer in time is
//! reported as not probed (no evidence either way), never as clean.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sentinel_proto::results::finished_result;
use sentinel_proto::v1::{
    job_event, job_finished, job_spec, IsolationProbeParams, IsolationViolation, Job, JobKind,
    JobState, ProbeResult, ProbeTarget,
};
use tracing::warn;

use super::policy::{IsolationConfig, ProbeSettings};
use crate::jobs::{is_final, JobQueue, NewJob};
use crate::registry::Registry;
use tokio::sync::broadcast;

/// Sends probe jobs and gathers their answers.
pub struct Prober {
    jobs: Arc<JobQueue>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober").finish_non_exhaustive()
    }
}

impl Prober {
    /// A prober over the controller's job queue and live fleet.
    pub fn new(jobs: Arc<JobQueue>, registry: Arc<Registry>) -> Self {
        Self { jobs, registry }
    }

    /// Probes from `hosts` at once and waits (at most `settings.timeout`) for their answers:
    /// one result per attempt, or one per host that could not probe.
    pub async fn run(
        &self,
        policy: &IsolationConfig,
        settings: &ProbeSettings,
        hosts: &[String],
        requested_by: &str,
    ) -> Vec<ProbeResult> {
        let params = params(policy, settings);
        let mut results = Vec::new();
        // Subscribed before the first job goes out, so no answer can slip by.
        let mut events = self.jobs.subscribe();
        let mut waiting: HashMap<String, String> = HashMap::new();
        for host in hosts {
            if self.registry.sender(host).is_none() {
                results.push(not_probed(
                    host,
                    "not probed: the host is not connected".into(),
                ));
                continue;
            }
            let submitted = self.jobs.submit(NewJob {
                target: host.clone(),
                kind: JobKind::IsolationProbe,
                params: job_spec::Params::IsolationProbe(params.clone()),
                // A probe that has not started by the time the check gives up must not run
                // later, when nobody reads it.
                ttl: settings.timeout,
                requested_by: requested_by.to_string(),
            });
            match submitted {
                Ok(job) => {
                    waiting.insert(job.job_id, host.clone());
                }
                Err(status) => results.push(not_probed(
                    host,
                    format!("not probed: {}", status.message()),
                )),
            }
        }
        // If this future is dropped (shutdown, the API caller gone), the jobs still waiting are
        // cancelled rather than left to run for nobody.
        let mut guard = CancelOnDrop {
            jobs: &self.jobs,
            ids: waiting.keys().cloned().collect(),
        };
        let deadline = tokio::time::Instant::now() + settings.timeout;
        // Answers arrive as job events; a full rescan only when events were missed (the
        // broadcast lagged) and once a second for states no event announces (timeouts).
        let mut rescan = true;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while !waiting.is_empty() {
            if rescan {
                let done: Vec<String> = waiting
                    .keys()
                    .filter(|id| self.jobs.get(id).is_none_or(|j| is_final(j.state())))
                    .cloned()
                    .collect();
                for id in done {
                    if let Some(host) = waiting.remove(&id) {
                        results.extend(self.collect(&host, &id));
                    }
                }
                rescan = false;
                continue;
            }
            tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => {
                        let finished = matches!(
                            event.event,
                            Some(job_event::Event::Finished(_) | job_event::Event::Refused(_))
                        );
                        if finished {
                            if let Some(host) = waiting.remove(&event.job_id) {
                                results.extend(self.collect(&host, &event.job_id));
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => rescan = true,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick() => rescan = true,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        guard.ids.clear();
        for (id, host) in waiting {
            let _ = self.jobs.cancel(&id, "the isolation check stopped waiting");
            results.push(not_probed(
                &host,
                format!(
                    "not probed: no answer within {:?} (job {id})",
                    settings.timeout
                ),
            ));
        }
        results
            .sort_by(|a, b| (&a.host, &a.user, &a.database).cmp(&(&b.host, &b.user, &b.database)));
        results
    }

    /// The results of job `id` of `host`, now that it is final (or gone).
    fn collect(&self, host: &str, id: &str) -> Vec<ProbeResult> {
        match self.jobs.get(id) {
            Some(job) => answer(host, &job),
            None => vec![not_probed(host, format!("not probed: job {id} vanished"))],
        }
    }
}

/// Cancels the probe jobs in `ids` when dropped.
struct CancelOnDrop<'a> {
    jobs: &'a JobQueue,
    ids: Vec<String>,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            if self.jobs.get(id).is_some_and(|j| !is_final(j.state())) {
                let _ = self.jobs.cancel(id, "the isolation check was abandoned");
            }
        }
    }
}

fn not_probed(host: &str, message: String) -> ProbeResult {
    ProbeResult {
        host: host.to_string(),
        message,
        probed: false,
        ..Default::default()
    }
}

/// The probe job's parameters: every database of the policy, at the cluster's address as the
/// hosts reach it.
fn params(policy: &IsolationConfig, settings: &ProbeSettings) -> IsolationProbeParams {
    let targets = policy
        .environments
        .iter()
        .flat_map(|(env, p)| {
            p.databases.iter().map(move |db| ProbeTarget {
                environment: env.clone(),
                database: db.clone(),
                host: settings.host.clone(),
                port: u32::from(settings.port),
            })
        })
        .collect();
    IsolationProbeParams {
        targets,
        connect_timeout_ms: u32::try_from(settings.connect_timeout.as_millis()).unwrap_or(u32::MAX),
    }
}

/// What a finished probe job says: its attempts, or why there are none. A job that ran
/// without its result, or with one of another kind, is a "not probed" naming the job and the
/// error (logged here, once per job: each job is answered once).
fn answer(host: &str, job: &Job) -> Vec<ProbeResult> {
    let report = match finished_result(job) {
        Ok(Some(job_finished::Result::IsolationProbe(report))) => Some(report),
        Ok(_) => None,
        Err(e) => {
            warn!(host, job_id = %job.job_id, error = %e, "probe job result unusable");
            return vec![not_probed(host, format!("not probed: {e}"))];
        }
    };
    match report {
        Some(report) if job.state() == JobState::Succeeded => report
            .attempts
            .iter()
            .cloned()
            .map(|a| ProbeResult {
                host: host.to_string(),
                user_environment: a.user_environment,
                database: a.database,
                connected: a.connected,
                message: a.message,
                user: a.user,
                database_environment: a.database_environment,
                probed: a.probed,
            })
            .collect(),
        _ => {
            let state =
                sentinel_daemon::metrics::enum_word(job.state().as_str_name(), "JOB_STATE_");
            vec![ProbeResult {
                host: host.to_string(),
                message: format!(
                    "not probed: probe job {} {state}: {}",
                    job.job_id, job.detail
                ),
                probed: false,
                ..Default::default()
            }]
        }
    }
}

/// The probe results after a run: a host's results are replaced only by a run that gave
/// evidence from it (at least one attempt made). A host that this run could not probe (offline,
/// refused the job, no answer) keeps its earlier attempts, a connection that got in included,
/// beside the new "not probed" entry; hosts this run did not ask keep theirs.
pub fn merge_run(previous: Vec<ProbeResult>, run: Vec<ProbeResult>) -> Vec<ProbeResult> {
    use std::collections::HashSet;
    let asked: HashSet<&str> = run.iter().map(|r| r.host.as_str()).collect();
    let evidence: HashSet<&str> = run
        .iter()
        .filter(|r| r.probed)
        .map(|r| r.host.as_str())
        .collect();
    let mut out: Vec<ProbeResult> = previous
        .into_iter()
        .filter(|p| {
            let host = p.host.as_str();
            !asked.contains(host) || (p.probed && !evidence.contains(host))
        })
        .collect();
    out.extend(run);
    out.sort_by(|a, b| (&a.host, &a.user, &a.database).cmp(&(&b.host, &b.user, &b.database)));
    out
}

/// The violations a set of probe results proves: every connection that got in.
pub fn violations(probes: &[ProbeResult]) -> Vec<IsolationViolation> {
    probes
        .iter()
        .filter(|p| p.connected)
        .map(|p| IsolationViolation {
            user: p.user.clone(),
            user_environment: p.user_environment.clone(),
            database: p.database.clone(),
            database_environment: p.database_environment.clone(),
            path: format!(
                "probe from {}: {} ({}) connected to {} ({})",
                p.host, p.user, p.user_environment, p.database, p.database_environment
            ),
            fix: String::new(),
            kind: "probe".into(),
            risk: false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolation::policy::tests::policy;
    use sentinel_proto::v1::{BackupReport, JobEvent, JobFinished, ProbeAttempt, ProbeReport};

    fn settings() -> ProbeSettings {
        ProbeSettings {
            hosts: vec!["web-1".into()],
            host: "10.0.0.5".into(),
            port: 5433,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            on_schedule: true,
            interval: Duration::from_secs(3600),
        }
    }

    #[test]
    fn every_database_of_the_policy_is_a_target() {
        let p = params(&policy(), &settings());
        assert_eq!(p.targets.len(), 4);
        assert!(p
            .targets
            .iter()
            .any(|t| t.environment == "staging" && t.database == "auth_stg" && t.port == 5433));
        assert_eq!(p.connect_timeout_ms, 5000);
    }

    fn finished(state: JobState, result: Option<job_finished::Result>) -> Job {
        Job {
            job_id: "j-1".into(),
            kind: JobKind::IsolationProbe as i32,
            state: state as i32,
            detail: "boom".into(),
            events: vec![JobEvent {
                event: Some(job_event::Event::Finished(JobFinished {
                    state: state as i32,
                    result,
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn attempt(database: &str, connected: bool, message: &str) -> ProbeAttempt {
        ProbeAttempt {
            user: "stg_user".into(),
            user_environment: "staging".into(),
            database: database.into(),
            database_environment: "production".into(),
            connected,
            message: message.into(),
            probed: true,
        }
    }

    #[test]
    fn answers_become_results_and_connections_violations() {
        let report = job_finished::Result::IsolationProbe(ProbeReport {
            attempts: vec![
                attempt("auth_prod", true, "connected"),
                attempt("pulse_prod", false, "FATAL: permission denied for database"),
            ],
        });
        let results = answer("web-1", &finished(JobState::Succeeded, Some(report)));
        assert_eq!(results.len(), 2);
        assert!(results.iter().all(|r| r.host == "web-1" && r.probed));
        let v = violations(&results);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].database, "auth_prod");
        assert!(v[0].path.contains("probe from web-1"), "{}", v[0].path);

        let failed = answer("web-1", &finished(JobState::Refused, None));
        assert_eq!(failed.len(), 1);
        assert!(!failed[0].probed);
        assert!(
            failed[0].message.contains("refused: boom"),
            "{}",
            failed[0].message
        );
        assert!(violations(&failed).is_empty());
    }

    #[test]
    fn a_probe_that_succeeded_without_its_result_is_not_probed_and_names_the_job() {
        let none = answer("web-1", &finished(JobState::Succeeded, None));
        assert_eq!(none.len(), 1);
        assert!(!none[0].probed);
        assert!(
            none[0]
                .message
                .contains("job j-1 (isolation_probe) succeeded without its result"),
            "{}",
            none[0].message
        );
        let backup = job_finished::Result::Backup(BackupReport::default());
        let other = answer("web-1", &finished(JobState::Succeeded, Some(backup)));
        assert!(!other[0].probed);
        assert!(
            other[0]
                .message
                .contains("job j-1 (isolation_probe) carried a result of kind backup"),
            "{}",
            other[0].message
        );
        assert!(violations(&other).is_empty());
    }

    #[test]
    fn a_run_without_evidence_from_a_host_keeps_what_that_host_proved() {
        let got_in = |host: &str| ProbeResult {
            host: host.into(),
            user: "stg_user".into(),
            database: "auth_prod".into(),
            connected: true,
            probed: true,
            ..Default::default()
        };
        let previous = vec![got_in("web-1"), got_in("web-2")];
        // web-1 is offline this time; web-2 was not asked.
        let offline = not_probed("web-1", "not probed: the host is not connected".into());
        let merged = merge_run(previous.clone(), vec![offline.clone()]);
        assert_eq!(merged.len(), 3);
        assert_eq!(violations(&merged).len(), 2, "{merged:#?}");
        // web-1 answers and is refused now: its violation is gone, web-2's stays.
        let refused = ProbeResult {
            connected: false,
            message: "FATAL: permission denied for database".into(),
            ..got_in("web-1")
        };
        let merged = merge_run(merged, vec![refused]);
        assert_eq!(merged.len(), 2);
        let v = violations(&merged);
        assert_eq!(v.len(), 1);
        assert!(v[0].path.contains("web-2"));
    }
}
