//! The revocation calls of the operator API: `RevokeHost`, `ForgetHost`, `RevokeOperator`,
//! `UnrevokeOperator`, `ListRevocations`, and the overlay that shows revoked hosts as
//! `revoked` in `ListHosts` and `GetHost`. Every change is committed to the store before the
//! call answers.

use std::sync::Arc;

use sentinel_proto::v1::{
    ForgetHostResponse, Host, HostStatus, HostSummary, Revocation, RevocationKind, RevokeRequest,
};
use tonic::Status;
use tracing::{info, warn};

use crate::context::Context;
use crate::registry::ForgetError;
use crate::store::StoreError;

fn store_err(e: StoreError) -> Status {
    Status::internal(format!("{e}; nothing was changed"))
}

fn valid_name(what: &str, name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument(format!(
            "a {what} name is needed (field `name`)"
        )));
    }
    crate::pki::scheme::validate_name(name)
        .map_err(|e| Status::invalid_argument(format!("{what} name: {e}")))
}

/// Runs a blocking store call off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("store task failed: {e}")))?
        .map_err(store_err)
}

/// Puts host `req.name` on the deny list, closes its stream and cancels its open jobs.
/// Revoking a revoked host answers its existing entry.
pub async fn revoke_host(
    ctx: &Arc<Context>,
    who: &str,
    req: RevokeRequest,
) -> Result<Revocation, Status> {
    valid_name("host", &req.name)?;
    if let Some(existing) = ctx.deny.host(&req.name) {
        return Ok(existing);
    }
    if ctx.registry.host(&req.name).is_none() {
        return Err(Status::not_found(format!(
            "no host named {:?}; known hosts: {}",
            req.name,
            ctx.registry.names().join(", ")
        )));
    }
    let open: Vec<String> = ctx
        .jobs
        .list(&req.name, usize::MAX)
        .into_iter()
        .filter(|j| !crate::jobs::is_final(j.state()))
        .map(|j| j.job_id)
        .collect();
    let entry = Revocation {
        kind: RevocationKind::Host as i32,
        name: req.name.clone(),
        reason: req.reason.clone(),
        revoked_at: Some(sentinel_proto::time::now()),
        revoked_by: who.to_string(),
        cancelled_jobs: open.clone(),
    };
    let deny = ctx.deny.clone();
    let stored = entry.clone();
    blocking(move || deny.add(stored)).await?;
    let closed = ctx.registry.close(&req.name);
    let reason = if req.reason.is_empty() {
        format!("host {} revoked by {who}", req.name)
    } else {
        format!("host {} revoked by {who}: {}", req.name, req.reason)
    };
    for id in &open {
        // A job that ended in the meantime is no error: it is simply not running any more.
        if let Err(e) = ctx.jobs.cancel(id, &reason) {
            warn!(job = %id, error = %e.message(), "could not cancel a job of a revoked host");
        }
    }
    info!(host = %req.name, by = %who, reason = ?req.reason, stream_closed = closed, cancelled_jobs = open.len(), "host revoked");
    Ok(entry)
}

/// Removes an offline host's record and its deny-list entry, and cancels its open jobs.
pub async fn forget_host(ctx: &Arc<Context>, name: String) -> Result<ForgetHostResponse, Status> {
    valid_name("host", &name)?;
    ctx.registry.forget(&name).map_err(|e| match e {
        ForgetError::Unknown { .. } => Status::not_found(format!(
            "{e}; known hosts: {}",
            ctx.registry.names().join(", ")
        )),
        ForgetError::Online { .. } => Status::failed_precondition(e.to_string()),
    })?;
    let store = ctx.store.clone();
    let (names, keys) = (
        vec![name.clone()],
        vec![crate::revocation::key(RevocationKind::Host, &name)],
    );
    blocking(move || store.delete_hosts(&names, &keys)).await?;
    let was_revoked = ctx.deny.forget_host(&name).is_some();
    for job in ctx.jobs.list(&name, usize::MAX) {
        if !crate::jobs::is_final(job.state()) {
            let _ = ctx
                .jobs
                .cancel(&job.job_id, &format!("host {name} forgotten"));
        }
    }
    info!(host = %name, was_revoked, "host forgotten");
    Ok(ForgetHostResponse { name, was_revoked })
}

/// Puts operator `req.name` on the deny list (every role). An operator cannot revoke itself:
/// that would lock out the only admin as easily as a thief.
pub async fn revoke_operator(
    ctx: &Arc<Context>,
    who: &str,
    req: RevokeRequest,
) -> Result<Revocation, Status> {
    valid_name("operator", &req.name)?;
    if req.name == who {
        return Err(Status::failed_precondition(format!(
            "operator {who:?} cannot revoke itself; ask another admin"
        )));
    }
    if let Some(existing) = ctx.deny.refusal(&crate::identity::Identity::Operator {
        name: req.name.clone(),
        role: crate::pki::Role::Viewer,
    }) {
        return Ok(existing);
    }
    let entry = Revocation {
        kind: RevocationKind::Operator as i32,
        name: req.name.clone(),
        reason: req.reason,
        revoked_at: Some(sentinel_proto::time::now()),
        revoked_by: who.to_string(),
        cancelled_jobs: Vec::new(),
    };
    let deny = ctx.deny.clone();
    let stored = entry.clone();
    blocking(move || deny.add(stored)).await?;
    info!(operator = %req.name, by = %who, reason = ?entry.reason, "operator revoked");
    Ok(entry)
}

/// Takes operator `name` off the deny list.
pub async fn unrevoke_operator(ctx: &Arc<Context>, name: String) -> Result<Revocation, Status> {
    valid_name("operator", &name)?;
    let deny = ctx.deny.clone();
    let who = name.clone();
    blocking(move || deny.remove(RevocationKind::Operator, &who))
        .await?
        .ok_or_else(|| Status::not_found(format!("operator {name:?} is not revoked")))
}

/// Shows a revoked host as `revoked` with its entry.
pub fn overlay_host(ctx: &Context, host: &mut Host) {
    if let Some(entry) = ctx.deny.host(&host.name) {
        host.status = HostStatus::Revoked as i32;
        host.offline_reason = format!("revoked by {}: {}", entry.revoked_by, entry.reason);
        host.revocation = Some(entry);
    }
}

/// Shows revoked hosts as `revoked` in a list.
pub fn overlay_summaries(ctx: &Context, hosts: &mut [HostSummary]) {
    for host in hosts {
        if let Some(entry) = ctx.deny.host(&host.name) {
            host.status = HostStatus::Revoked as i32;
            host.revocation = Some(entry);
        }
    }
}
