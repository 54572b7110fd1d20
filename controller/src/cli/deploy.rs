//! `sentinel deploy`, `sentinel deploy watch|cancel` and `sentinel rollback`: start one, and
//! with `--wait` (or `deploy watch`) follow its steps live and exit 0 only when it succeeded;
//! Ctrl-C stops following, not the deploy, and says how to watch or cancel it.

use futures::StreamExt;
use sentinel_proto::v1::{
    CancelDeployRequest, DeployRequest, Deployment, DeploymentKind, DeploymentState, E2eLevel,
    GetDeployRequest, RollbackRequest, StepStatus,
};

use super::format::{enum_word, one_line, untrusted};
use super::{ClientArgs, EXIT_FAILED};

/// Exit code when the operator pressed Ctrl-C while following (128 + SIGINT, as shells do).
pub const EXIT_INTERRUPTED: u8 = 130;

/// `sentinel deploy watch|cancel`: commands on a deploy that already started.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DeployCommand {
    /// Follow a deploy or rollback (from its first step) and exit with its outcome.
    Watch {
        /// The deploy's id (`d-…`, as `sentinel deploys` lists it).
        id: String,
    },
    /// Cancel a running deploy or rollback: its current job stops and the host puts the live
    /// release back.
    Cancel {
        /// The deploy's id.
        id: String,
        /// Why (kept in the deploy's history with your operator name).
        #[arg(long)]
        reason: String,
    },
}

/// What `sentinel deploy` asks for.
#[derive(Debug, Clone, clap::Args)]
pub struct DeployArgs {
    /// The app, as named in the controller's config.
    #[arg(required = true)]
    pub app: Option<String>,
    /// The commit (sha or ref) to deploy.
    #[arg(long, required = true)]
    pub commit: Option<String>,
    /// The release changes the database: back up production first and run the migration.
    #[arg(long)]
    pub db_change: bool,
    /// The migration command (run in the app's migration service).
    #[arg(long, default_value = "")]
    pub migration: String,
    /// E2E level on staging.
    #[arg(long, value_enum, default_value_t = Level::Smoke)]
    pub e2e: Level,
    /// Follow the deploy and exit with its outcome.
    #[arg(long)]
    pub wait: bool,
}

/// E2E levels.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Level {
    /// The smoke subset.
    Smoke,
    /// Every check.
    Standard,
}

/// `sentinel deploy`: a subcommand on an existing deploy, or a new deploy. Returns the
/// process exit code.
pub async fn command(
    client: &ClientArgs,
    command: Option<DeployCommand>,
    args: DeployArgs,
) -> anyhow::Result<u8> {
    match command {
        Some(DeployCommand::Watch { id }) => follow(client, &id).await,
        Some(DeployCommand::Cancel { id, reason }) => cancel(client, &id, &reason).await,
        None => deploy(client, args).await,
    }
}

/// Starts a deploy; with `--wait`, follows it. Returns the process exit code.
pub async fn deploy(client: &ClientArgs, args: DeployArgs) -> anyhow::Result<u8> {
    let (Some(app), Some(commit)) = (args.app.clone(), args.commit.clone()) else {
        anyhow::bail!("a deploy needs the app and --commit");
    };
    let mut api = client.connect().await?;
    let d = api
        .submit_deploy(DeployRequest {
            app,
            commit,
            db_change: args.db_change,
            migration: args.migration.clone(),
            e2e: match args.e2e {
                Level::Smoke => E2eLevel::Smoke,
                Level::Standard => E2eLevel::Standard,
            } as i32,
            requested_by: String::new(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    println!(
        "deploy {} of {} at {} started",
        one_line(&d.deploy_id),
        one_line(&d.app),
        one_line(&d.commit)
    );
    if !args.wait {
        return Ok(0);
    }
    follow(client, &d.deploy_id).await
}

/// Starts a manual rollback; with `wait`, follows it.
pub async fn rollback(
    client: &ClientArgs,
    app: String,
    env: String,
    to: Option<String>,
    wait: bool,
) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let d = api
        .rollback(RollbackRequest {
            app,
            environment: env,
            to_commit: to.unwrap_or_default(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    println!(
        "rollback {} of {} started",
        one_line(&d.deploy_id),
        one_line(&d.app)
    );
    if !wait {
        return Ok(0);
    }
    follow(client, &d.deploy_id).await
}

/// Cancels a running deploy, saying why; exit 0 once the controller took the cancel.
async fn cancel(client: &ClientArgs, id: &str, reason: &str) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let d = api
        .cancel_deploy(CancelDeployRequest {
            deploy_id: id.to_string(),
            reason: reason.to_string(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    println!(
        "deploy {} of {} is being cancelled by {}: {}",
        one_line(&d.deploy_id),
        one_line(&d.app),
        one_line(&d.cancelled_by),
        one_line(&d.cancel_reason)
    );
    println!(
        "follow it to its end with: sentinel deploy watch {}",
        one_line(&d.deploy_id)
    );
    Ok(0)
}

/// Prints each step as it happens; the exit code is 0 only for a successful deploy, and
/// [`EXIT_INTERRUPTED`] when Ctrl-C stopped the following (the deploy goes on).
async fn follow(client: &ClientArgs, id: &str) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let mut stream = api
        .watch_deploy(GetDeployRequest {
            deploy_id: id.to_string(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let colour = super::colour();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            _ = &mut ctrl_c => {
                let id = one_line(id);
                eprintln!("stopped following; deploy {id} goes on on the controller");
                eprintln!("  watch it:  sentinel deploy watch {id}");
                eprintln!("  cancel it: sentinel deploy cancel {id} --reason TEXT");
                return Ok(EXIT_INTERRUPTED);
            }
        };
        let Some(ev) = ev else { break };
        let ev = ev.map_err(status_err)?;
        if let Some(step) = ev.step {
            let status = StepStatus::try_from(step.status).unwrap_or(StepStatus::Unspecified);
            let word = enum_word(status.as_str_name(), "STEP_STATUS_");
            let word = match (colour, status) {
                (true, StepStatus::Succeeded) => format!("\x1b[32m{word}\x1b[0m"),
                (true, StepStatus::Failed) => format!("\x1b[31m{word}\x1b[0m"),
                _ => word,
            };
            let place = if step.environment.is_empty() {
                String::new()
            } else {
                format!(
                    " [{} on {}]",
                    one_line(&step.environment),
                    one_line(&step.host)
                )
            };
            let detail = if step.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", one_line(&step.detail))
            };
            println!("{:<16} {word}{place}{detail}", one_line(&step.name));
        } else if !ev.log_line.is_empty() {
            // A container's output: its escape sequences must not reach the terminal.
            println!("    {}", one_line(&ev.log_line));
        }
        if ev.final_state != 0 {
            break;
        }
    }
    let d = api
        .get_deploy(GetDeployRequest {
            deploy_id: id.to_string(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    Ok(summary(&d))
}

fn summary(d: &Deployment) -> u8 {
    let state = d.state();
    let word = enum_word(state.as_str_name(), "DEPLOYMENT_STATE_");
    let what = match d.kind() {
        DeploymentKind::Rollback => "rollback",
        _ => "deploy",
    };
    println!(
        "{what} {} {word}{}",
        one_line(&d.deploy_id),
        if d.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", untrusted(&d.detail))
        }
    );
    if state == DeploymentState::Succeeded {
        0
    } else {
        EXIT_FAILED
    }
}

/// A gRPC status as an error that says what the controller said.
pub fn status_err(s: tonic::Status) -> anyhow::Error {
    // The message may carry text a host sent (a job's detail, say).
    anyhow::anyhow!("{}", untrusted(&sentinel_daemon::tls_explain::status(&s)))
}
