//! `sentinel jobs` and `sentinel deploys`: the job and deploy history, newest first, as tables
//! or (`--json`) as the API's `ListJobsResponse` / `ListDeploysResponse`.

use sentinel_proto::v1::{
    Deployment, DeploymentKind, DeploymentState, JobKind, JobState, ListDeploysRequest,
    ListJobsRequest,
};

use super::deploy::status_err;
use super::format::{ago, between, enum_word, one_line, state, truncate};
use super::ClientArgs;

/// Widest detail shown in a table; `--json` has it all.
const DETAIL_WIDTH: usize = 72;

/// What `sentinel jobs` shows.
#[derive(Debug, Clone, clap::Args)]
pub struct JobsArgs {
    /// Only this host's jobs.
    #[arg(long)]
    pub host: Option<String>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// JSON for scripts (the API's ListJobsResponse, as grpcurl prints it).
    #[arg(long)]
    pub json: bool,
}

/// What `sentinel deploys` shows.
#[derive(Debug, Clone, clap::Args)]
pub struct DeploysArgs {
    /// Only this app's deploys.
    #[arg(long)]
    pub app: Option<String>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// JSON for scripts (the API's ListDeploysResponse, as grpcurl prints it).
    #[arg(long)]
    pub json: bool,
}

/// Prints the job history.
pub async fn jobs(client: &ClientArgs, args: JobsArgs) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let list = api
        .list_jobs(ListJobsRequest {
            host: args.host.unwrap_or_default(),
            limit: args.limit,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if args.json {
        super::json::print(&list, "sentinel.v1.ListJobsResponse")?;
        return Ok(0);
    }
    let colour = super::colour();
    let rows: Vec<Vec<String>> = list
        .jobs
        .iter()
        .map(|j| {
            let kind = JobKind::try_from(j.kind).unwrap_or(JobKind::Unspecified);
            let word = enum_word(
                JobState::try_from(j.state)
                    .unwrap_or(JobState::Unspecified)
                    .as_str_name(),
                "JOB_STATE_",
            );
            vec![
                one_line(&j.job_id),
                one_line(&j.target_host),
                sentinel_proto::kinds::kind_name(kind).to_string(),
                state(&word, colour),
                ago(j.created_at.as_ref()),
                ago(j.updated_at.as_ref()),
                truncate(&one_line(&j.requested_by), 30),
                truncate(&one_line(&j.detail), DETAIL_WIDTH),
            ]
        })
        .collect();
    super::table(
        &[
            "JOB", "HOST", "KIND", "STATE", "CREATED", "UPDATED", "BY", "DETAIL",
        ],
        &rows,
    );
    Ok(0)
}

/// Prints the deploy history.
pub async fn deploys(client: &ClientArgs, args: DeploysArgs) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let list = api
        .list_deploys(ListDeploysRequest {
            app: args.app.unwrap_or_default(),
            limit: args.limit,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if args.json {
        super::json::print(&list, "sentinel.v1.ListDeploysResponse")?;
        return Ok(0);
    }
    let colour = super::colour();
    let rows: Vec<Vec<String>> = list
        .deployments
        .iter()
        .map(|d| {
            let word = enum_word(
                DeploymentState::try_from(d.state)
                    .unwrap_or(DeploymentState::Unspecified)
                    .as_str_name(),
                "DEPLOYMENT_STATE_",
            );
            let took = if d.finished_at.is_some() {
                between(d.started_at.as_ref(), d.finished_at.as_ref())
            } else {
                between(d.started_at.as_ref(), Some(&sentinel_proto::time::now()))
            };
            vec![
                one_line(&d.deploy_id),
                one_line(&d.app),
                run_kind(d),
                if d.commit.is_empty() {
                    "previous".to_string()
                } else {
                    one_line(&d.commit.chars().take(12).collect::<String>())
                },
                state(&word, colour),
                ago(d.started_at.as_ref()),
                took,
                truncate(&one_line(&d.requested_by), 30),
                truncate(&one_line(&deploy_detail(d)), DETAIL_WIDTH),
            ]
        })
        .collect();
    super::table(
        &[
            "DEPLOY", "APP", "KIND", "COMMIT", "STATE", "STARTED", "TOOK", "BY", "DETAIL",
        ],
        &rows,
    );
    Ok(0)
}

/// `deploy`, or `rollback ENV` for a rollback of one environment.
fn run_kind(d: &Deployment) -> String {
    match d.kind() {
        DeploymentKind::Rollback => format!("rollback {}", one_line(&d.environment)),
        _ => "deploy".to_string(),
    }
}

/// What the history says of a deploy: its detail, or while a cancel settles, who asked.
fn deploy_detail(d: &Deployment) -> String {
    if d.detail.is_empty() && !d.cancelled_by.is_empty() {
        format!("cancelling (by {}: {})", d.cancelled_by, d.cancel_reason)
    } else {
        d.detail.clone()
    }
}
