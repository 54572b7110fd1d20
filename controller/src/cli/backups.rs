//! `sentinel backups list|run|verify|restore-test [--wait]`: the backups at a glance (per
//! database the newest good backup and its age, how many are kept, the last verify and
//! restore test; the schedules; the offsite backlog), or a run started now. With `--wait` a
//! run is followed step by step and the exit code is its outcome (0 succeeded, 1 not).

use std::time::Duration;

use sentinel_proto::v1::{
    job_event, GetJobRequest, Job, JobState, ListBackupsRequest, RunBackupRequest,
    RunRestoreTestRequest, StepStatus, VerifyBackupsRequest,
};

use super::deploy::status_err;
use super::format::{ago, bytes, enum_word, state, truncate, when};
use super::{ClientArgs, EXIT_FAILED};

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
    follow(client, &job.job_id).await
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
                when(s.last_run_at.as_ref()),
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

/// Prints the job's steps and log lines as they arrive; 0 only when it succeeded.
async fn follow(client: &ClientArgs, job_id: &str) -> anyhow::Result<u8> {
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
    Ok(if job.state() == JobState::Succeeded {
        0
    } else {
        EXIT_FAILED
    })
}
