//! `sentinel backups list|run|verify|restore-test [--wait]`: the backups at a glance (per
//! database the newest good backup and its age, how many are kept, the last verify and
//! restore test; the schedules; the offsite backlog), or a run started now. With `--wait` a
//! run is followed step by step and the exit code is its outcome: 0 succeeded, 1 not,
//! [`EXIT_OFFSITE_FAILED`] a backup that succeeded here whose offsite copy (or pruning there)
//! failed.

use std::time::Duration;

use sentinel_proto::v1::{
    job_event, job_finished, GetJobRequest, Job, JobState, ListBackupsRequest, RunBackupRequest,
    RunRestoreTestRequest, StepStatus, VerifyBackupsRequest,
};

use super::deploy::status_err;
use super::format::{ago, bytes, enum_word, one_line, state, truncate, when};
use super::{ClientArgs, EXIT_FAILED};

/// Exit code of `backups run --wait` when the backup succeeded on the backup host but its
/// offsite copy, or pruning there, failed (what was not copied is retried at the next run).
pub const EXIT_OFFSITE_FAILED: u8 = 3;

/// `sentinel backups …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BackupsCommand {
    /// Per database: newest good backup and its age, backups kept, last verify and restore
    /// test; then the schedules and the offsite backlog.
    List {
        /// JSON for scripts (the API's ListBackupsResponse, as grpcurl prints it).
        #[arg(long)]
        json: bool,
    },
    /// Back up every configured database (and the globals and files) now.
    Run {
        /// Why, recorded in the manifest and the job.
        #[arg(long, default_value = "")]
        reason: String,
        /// Follow it and exit with its outcome.
        #[arg(long)]
        wait: bool,
    },
    /// Check every retained backup against its manifest (sha256, pg_restore --list).
    Verify {
        /// Follow it and exit with its outcome.
        #[arg(long)]
        wait: bool,
    },
    /// Restore each database's newest good backup into a scratch database and compare.
    RestoreTest {
        /// Follow it and exit with its outcome.
        #[arg(long)]
        wait: bool,
    },
}

/// Runs a `sentinel backups` command; returns the exit code.
pub async fn backups(client: &ClientArgs, command: BackupsCommand) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let (job, wait) = match command {
        BackupsCommand::List { json } => return list(client, json).await,
        BackupsCommand::Run { reason, wait } => {
            let job = api
                .run_backup(RunBackupRequest {
                    reason,
                    simulated_now: None,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            (job, wait)
        }
        BackupsCommand::Verify { wait } => {
            let job = api
                .verify_backups(VerifyBackupsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            (job, wait)
        }
        BackupsCommand::RestoreTest { wait } => {
            let job = api
                .run_restore_test(RunRestoreTestRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            (job, wait)
        }
    };
    println!("job {} started on {}", job.job_id, job.target_host);
    if !wait {
        return Ok(0);
    }
    let job = follow(client, &job.job_id).await?;
    Ok(exit_code(&job))
}

/// The exit code of a followed run: see the module docs.
fn exit_code(job: &Job) -> u8 {
    if job.state() != JobState::Succeeded {
        return EXIT_FAILED;
    }
    let offsite = match sentinel_proto::results::finished_result(job) {
        Ok(Some(job_finished::Result::Backup(r))) => r.offsite.as_ref(),
        Ok(_) => None,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
    };
    match offsite {
        Some(offsite) if !offsite.ok() => EXIT_OFFSITE_FAILED,
        _ => 0,
    }
}

async fn list(client: &ClientArgs, json: bool) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let list = api
        .list_backups(ListBackupsRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if json {
        super::json::print(&list, "sentinel.v1.ListBackupsResponse")?;
        return Ok(0);
    }
    let colour = super::colour();
    let verdict = |at: Option<&prost_types::Timestamp>, ok: bool| match at {
        None => "never".to_string(),
        Some(_) => format!(
            "{} {}",
            state(if ok { "ok" } else { "failed" }, colour),
            ago(at)
        ),
    };
    let rows: Vec<Vec<String>> = list
        .databases
        .iter()
        .map(|d| {
            let name = match d.kind.as_str() {
                "database" => format!("{}/{}", d.environment, d.database),
                "globals" => format!("globals ({})", d.database),
                _ => "files".to_string(),
            };
            vec![
                name,
                if d.newest_good_at.is_some() {
                    when(d.newest_good_at.as_ref())
                } else {
                    "none".into()
                },
                if d.newest_good_at.is_some() {
                    ago(d.newest_good_at.as_ref())
                } else {
                    "-".into()
                },
                if d.newest_good_file.is_empty() {
                    "-".into()
                } else {
                    one_line(&d.newest_good_file)
                },
                bytes(d.newest_good_size),
                format!(
                    "{}{}",
                    d.kept,
                    if d.damaged > 0 {
                        format!(" ({} damaged)", d.damaged)
                    } else {
                        String::new()
                    }
                ),
                verdict(d.last_verify_at.as_ref(), d.last_verify_ok),
                verdict(d.last_restore_test_at.as_ref(), d.last_restore_test_ok),
                truncate(&d.last_error, 60),
            ]
        })
        .collect();
    println!("backups on {}", list.host);
    super::table(
        &[
            "BACKUP",
            "NEWEST GOOD",
            "AGE",
            "FILE",
            "SIZE",
            "KEPT",
            "VERIFY",
            "RESTORE TEST",
            "LAST ERROR",
        ],
        &rows,
    );
    println!();
    let rows: Vec<Vec<String>> = list
        .schedules
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                format!("{} ({})", s.cron, s.time_zone),
                match &s.last_run_at {
                    None => "never".into(),
                    Some(t) => when(Some(t)),
                },
                when(s.next_run_at.as_ref()),
                if s.running {
                    "running".into()
                } else {
                    truncate(&s.last_outcome, 60)
                },
            ]
        })
        .collect();
    super::table(
        &["SCHEDULE", "CRON", "LAST RUN", "NEXT RUN", "OUTCOME"],
        &rows,
    );
    if list.offsite_pending > 0 || !list.offsite_error.is_empty() {
        println!(
            "\noffsite: {} file(s) pending{}",
            list.offsite_pending,
            if list.offsite_error.is_empty() {
                String::new()
            } else {
                format!(" ({})", list.offsite_error)
            }
        );
    }
    Ok(0)
}

/// Prints the job's steps and log lines as they arrive; returns the job once it ended.
async fn follow(client: &ClientArgs, job_id: &str) -> anyhow::Result<Job> {
    let mut api = client.connect().await?;
    let mut seen = 0u64;
    let job: Job = loop {
        let job = api
            .get_job(GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .map_err(status_err)?
            .into_inner();
        let since = seen;
        for ev in job.events.iter().filter(|e| e.seq > since) {
            seen = seen.max(ev.seq);
            match &ev.event {
                Some(job_event::Event::Step(s)) => {
                    let status = StepStatus::try_from(s.status).unwrap_or(StepStatus::Unspecified);
                    let word = enum_word(status.as_str_name(), "STEP_STATUS_");
                    let detail = if s.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", s.detail)
                    };
                    println!("{:<32} {}{detail}", s.name, state(&word, super::colour()));
                }
                Some(job_event::Event::Log(l)) => println!("    {}", l.line),
                _ => {}
            }
        }
        if crate::jobs::is_final(job.state()) {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let word = enum_word(job.state().as_str_name(), "JOB_STATE_");
    println!("job {} {word}: {}", job.job_id, job.detail);
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_proto::v1::{
        BackupReport, JobEvent, JobFinished, JobKind, OffsiteReport, VerifyReport,
    };

    fn finished(state: JobState, report: &BackupReport) -> Job {
        Job {
            kind: JobKind::Backup as i32,
            state: state as i32,
            events: vec![JobEvent {
                event: Some(job_event::Event::Finished(JobFinished {
                    state: state as i32,
                    detail: String::new(),
                    result: Some(job_finished::Result::Backup(report.clone())),
                })),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_backup_whose_offsite_copy_failed_has_its_own_exit_code() {
        let copied = BackupReport {
            offsite: Some(OffsiteReport::default()),
            ..Default::default()
        };
        assert_eq!(exit_code(&finished(JobState::Succeeded, &copied)), 0);
        let mut failed = copied.clone();
        if let Some(o) = failed.offsite.as_mut() {
            o.error = Some("rsync failed".into());
        }
        assert_eq!(
            exit_code(&finished(JobState::Succeeded, &failed)),
            EXIT_OFFSITE_FAILED
        );
        let mut prune = copied.clone();
        if let Some(o) = prune.offsite.as_mut() {
            o.prune_error = Some("rsync failed".into());
        }
        assert_eq!(
            exit_code(&finished(JobState::Succeeded, &prune)),
            EXIT_OFFSITE_FAILED
        );
        // A failed backup is a failure first.
        assert_eq!(exit_code(&finished(JobState::Failed, &failed)), EXIT_FAILED);
        assert_eq!(exit_code(&Job::default()), EXIT_FAILED);
        // Verify and restore-test results are not backup reports.
        let mut verify = finished(JobState::Succeeded, &copied);
        verify.kind = JobKind::VerifyBackups as i32;
        if let Some(job_event::Event::Finished(f)) = &mut verify.events[0].event {
            f.result = Some(job_finished::Result::Verify(VerifyReport {
                checked: 3,
                ..Default::default()
            }));
        }
        assert_eq!(exit_code(&verify), 0);
        // A backup that succeeded without its report is not taken for a good one.
        let mut bare = finished(JobState::Succeeded, &copied);
        if let Some(job_event::Event::Finished(f)) = &mut bare.events[0].event {
            f.result = None;
        }
        assert_eq!(exit_code(&bare), EXIT_FAILED);
    }
}
