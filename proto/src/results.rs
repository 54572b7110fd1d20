//! Job results as the contract types them: which `JobFinished.result` each job kind carries,
//! and the check that a finished job carries the right one. A missing result, or one of
//! another kind, is an error naming the job and its kind, never a silent "no report".

use crate::kinds::kind_name;
use crate::v1::{job_event, job_finished, Job, JobKind, JobState};

/// The name of a result's kind (its `JobFinished.result` field).
pub fn result_name(result: &job_finished::Result) -> &'static str {
    match result {
        job_finished::Result::Backup(_) => "backup",
        job_finished::Result::Verify(_) => "verify",
        job_finished::Result::RestoreTest(_) => "restore_test",
        job_finished::Result::IsolationProbe(_) => "isolation_probe",
        job_finished::Result::Rollback(_) => "rollback",
    }
}

/// The result kind a job of `kind` carries when it ran, if any.
pub fn expected_result(kind: JobKind) -> Option<&'static str> {
    match kind {
        JobKind::Backup => Some("backup"),
        JobKind::VerifyBackups => Some("verify"),
        JobKind::RestoreTest => Some("restore_test"),
        JobKind::IsolationProbe => Some("isolation_probe"),
        JobKind::Rollback => Some("rollback"),
        _ => None,
    }
}

/// A finished job whose result does not fit its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResultError {
    /// It ran (succeeded or failed) and reported no result.
    #[error(
        "job {job_id} ({kind}) {state} without its result (JobFinished.{expected}), so what it \
         did is unknown here; the agent may run another version than the controller (run the same version \
         on both), or this is a re-report after a reconnect"
    )]
    Missing {
        /// The job.
        job_id: String,
        /// Its kind's name.
        kind: &'static str,
        /// How it ended ("succeeded", "failed").
        state: String,
        /// The result it should carry.
        expected: &'static str,
    },
    /// It carried a result of another kind.
    #[error(
        "job {job_id} ({kind}) carried a result of kind {found} where {expected} belongs; the \
         agent may run another version than the controller (run the same version on both)"
    )]
    WrongKind {
        /// The job.
        job_id: String,
        /// Its kind's name.
        kind: &'static str,
        /// The result it carried.
        found: &'static str,
        /// What it should carry ("its own (backup)", "none").
        expected: String,
    },
}

/// The result a finished `job` carries, checked against its kind. `Ok(None)` when it has none
/// to carry: a kind without results, or a job that did not run to an end on the agent
/// (refused, cancelled, interrupted, timed out).
pub fn finished_result(job: &Job) -> Result<Option<&job_finished::Result>, ResultError> {
    let finished: Vec<_> = job
        .events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::Finished(f)) => Some(f),
            _ => None,
        })
        .collect();
    let kind = job.kind();
    let expected = expected_result(kind);
    if let Some(result) = finished.iter().rev().find_map(|f| f.result.as_ref()) {
        let found = result_name(result);
        return match expected {
            Some(e) if e == found => Ok(Some(result)),
            _ => Err(ResultError::WrongKind {
                job_id: job.job_id.clone(),
                kind: kind_name(kind),
                found,
                expected: expected.map_or("none".into(), |e| format!("its own ({e})")),
            }),
        };
    }
    let ran = finished
        .iter()
        .map(|f| f.state())
        .find(|s| matches!(s, JobState::Succeeded | JobState::Failed));
    match (expected, ran) {
        (Some(expected), Some(state)) => Err(ResultError::Missing {
            job_id: job.job_id.clone(),
            kind: kind_name(kind),
            state: state
                .as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_ascii_lowercase(),
            expected,
        }),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{BackupReport, JobEvent, JobFinished, ProbeReport};

    fn job(kind: JobKind, state: JobState, result: Option<job_finished::Result>) -> Job {
        Job {
            job_id: "j-7".into(),
            kind: kind as i32,
            state: state as i32,
            events: vec![JobEvent {
                event: Some(job_event::Event::Finished(JobFinished {
                    state: state as i32,
                    detail: String::new(),
                    result,
                })),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_result_of_the_jobs_own_kind_is_its_result() {
        let backup = job_finished::Result::Backup(BackupReport::default());
        let j = job(JobKind::Backup, JobState::Failed, Some(backup.clone()));
        assert_eq!(finished_result(&j), Ok(Some(&backup)));
    }

    #[test]
    fn a_job_that_ran_without_a_result_is_an_error_naming_it() {
        let j = job(JobKind::IsolationProbe, JobState::Succeeded, None);
        let e = finished_result(&j).unwrap_err().to_string();
        assert!(
            e.contains("job j-7 (isolation_probe) succeeded without its result (JobFinished.isolation_probe)"),
            "{e}"
        );
    }

    #[test]
    fn a_result_of_another_kind_is_an_error_naming_both() {
        let probe = job_finished::Result::IsolationProbe(ProbeReport::default());
        let e = finished_result(&job(
            JobKind::VerifyBackups,
            JobState::Succeeded,
            Some(probe),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "job j-7 (verify_backups) carried a result of kind isolation_probe where its own \
             (verify) belongs"
            ),
            "{e}"
        );
        let backup = job_finished::Result::Backup(BackupReport::default());
        let e = finished_result(&job(JobKind::Deploy, JobState::Succeeded, Some(backup)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("where none belongs"), "{e}");
    }

    #[test]
    fn jobs_that_did_not_run_to_an_end_carry_nothing_to_check() {
        for state in [JobState::Cancelled, JobState::Interrupted] {
            assert_eq!(
                finished_result(&job(JobKind::Backup, state, None)),
                Ok(None)
            );
        }
        assert_eq!(
            finished_result(&job(JobKind::Deploy, JobState::Succeeded, None)),
            Ok(None)
        );
        let refused = Job {
            kind: JobKind::Backup as i32,
            state: JobState::Refused as i32,
            ..Default::default()
        };
        assert_eq!(finished_result(&refused), Ok(None));
    }
}
