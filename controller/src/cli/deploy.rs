//! `sentinel deploy` and `sentinel rollback`: start one, and with `--wait` follow its steps
//! live and exit 0 only when it succeeded.

use futures::StreamExt;
use sentinel_proto::v1::{
    DeployRequest, Deployment, DeploymentState, E2eLevel, GetDeployRequest, RollbackRequest,
    StepStatus,
};

use super::format::{one_line, untrusted};
use super::{ClientArgs, EXIT_FAILED};

/// What `sentinel deploy` asks for.
#[derive(Debug, Clone, clap::Args)]
pub struct DeployArgs {
    /// The app, as named in the controller's config.
    pub app: String,
    /// The commit (sha or ref) to deploy.
    #[arg(long)]
    pub commit: String,
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

/// Starts a deploy; with `--wait`, follows it. Returns the process exit code.
pub async fn deploy(client: &ClientArgs, args: DeployArgs) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let d = api
        .submit_deploy(DeployRequest {
            app: args.app.clone(),
            commit: args.commit.clone(),
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

/// Prints each step as it happens; the exit code is 0 only for a successful deploy.
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
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(status_err)?;
        if let Some(step) = ev.step {
            let status = StepStatus::try_from(step.status).unwrap_or(StepStatus::Unspecified);
            let word = status
                .as_str_name()
                .trim_start_matches("STEP_STATUS_")
                .to_ascii_lowercase();
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
    let word = state
        .as_str_name()
        .trim_start_matches("DEPLOYMENT_STATE_")
        .to_ascii_lowercase();
    println!(
        "deploy {} {word}{}",
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
