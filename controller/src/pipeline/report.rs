//! Deploy reports: a JSON document POSTed to each configured webhook (the relay API forwards
//! it to the PM and to the requesting agent), retried with backoff.

use std::time::Duration;

use sentinel_daemon::backoff::Backoff;
use sentinel_daemon::metrics::enum_word;

use sentinel_proto::v1::{Deployment, DeploymentKind, DeploymentState, StepStatus};
use serde_json::json;
use tracing::{info, warn};

use super::config::Webhook;

/// The report's JSON.
pub fn document(d: &Deployment) -> serde_json::Value {
    let state = enum_word(
        DeploymentState::try_from(d.state)
            .unwrap_or(DeploymentState::Unspecified)
            .as_str_name(),
        "DEPLOYMENT_STATE_",
    );
    let kind = enum_word(
        DeploymentKind::try_from(d.kind)
            .unwrap_or(DeploymentKind::Unspecified)
            .as_str_name(),
        "DEPLOYMENT_KIND_",
    );
    let steps: Vec<_> = d
        .steps
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "environment": s.environment,
                "host": s.host,
                "status": enum_word(
                    StepStatus::try_from(s.status)
                        .unwrap_or(StepStatus::Unspecified)
                        .as_str_name(),
                    "STEP_STATUS_",
                ),
                "detail": s.detail,
                "job_id": s.job_id,
            })
        })
        .collect();
    json!({
        "type": "deploy_report",
        "deploy_id": d.deploy_id,
        "kind": kind,
        "environment": d.environment,
        "app": d.app,
        "commit": d.commit,
        "state": state,
        "requested_by": d.requested_by,
        "db_change": d.db_change,
        "migration": d.migration,
        "detail": d.detail,
        "cancelled_by": d.cancelled_by,
        "cancel_reason": d.cancel_reason,
        "steps": steps,
    })
}

/// POSTs the report to one webhook, retrying; returns what happened for the history.
pub async fn deliver(
    hook: &Webhook,
    body: &serde_json::Value,
    attempts: u32,
) -> Result<String, String> {
    let bytes = body.to_string().into_bytes();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut last = String::new();
    for attempt in 1..=attempts.max(1) {
        match sentinel_daemon::http::request(
            "POST",
            &hook.url,
            Some(("application/json", &bytes)),
            Duration::from_secs(10),
        )
        .await
        {
            Ok(resp) if (200..300).contains(&resp.status) => {
                info!(webhook = %hook.name, attempt, "deploy report delivered");
                return Ok(format!("{}: delivered ({})", hook.name, resp.status));
            }
            Ok(resp) => last = format!("status {}", resp.status),
            Err(e) => last = e.to_string(),
        }
        warn!(webhook = %hook.name, attempt, error = %last, "deploy report not delivered");
        if attempt < attempts {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
    Err(format!(
        "{}: not delivered after {attempts} attempts: {last}",
        hook.name
    ))
}
