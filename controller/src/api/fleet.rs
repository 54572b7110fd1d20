//! `sentinel.v1.FleetService`: the operator API. Reads answer from the registry (the fleet's
//! live state with its age); calls of capabilities the config leaves out answer
//! FAILED_PRECONDITION naming the section that would enable them.

use std::sync::Arc;

use sentinel_proto::v1::fleet_service_server::FleetService;
use sentinel_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::context::Context;
use crate::identity::PeerInfo;
use crate::isolation::IsolationState;
use crate::registry::Registry;

/// The operator API service.
pub struct FleetApi {
    ctx: Arc<Context>,
    registry: Arc<Registry>,
    /// Database isolation, when `[isolation]` is configured.
    isolation: Option<Arc<IsolationState>>,
}

impl FleetApi {
    /// A service over the shared controller state.
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            registry: ctx.registry.clone(),
            ctx,
            isolation: None,
        }
    }

    /// The same service answering the isolation calls from `isolation` (None: they answer
    /// FAILED_PRECONDITION saying isolation is not configured).
    pub fn with_isolation(mut self, isolation: Option<Arc<IsolationState>>) -> Self {
        self.isolation = isolation;
        self
    }

    /// Answers with `value` once the write that made it is in the store: an acknowledged job,
    /// deploy or cancel survives a `kill -9` right after the answer.
    async fn committed<T>(&self, value: T) -> Result<Response<T>, Status> {
        self.ctx
            .jobs
            .commits()
            .commit()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(value))
    }

    /// Appends the audit record of a write call and answers its result.
    async fn audited<T>(
        &self,
        peer: &PeerInfo,
        method: &str,
        what: String,
        result: Result<Response<T>, Status>,
        made: impl FnOnce(&T) -> String,
    ) -> Result<Response<T>, Status> {
        self.ctx
            .audit
            .record(
                peer,
                method,
                what,
                result.as_ref().map(|r| r.get_ref()),
                made,
            )
            .await;
        result
    }

    fn backups(&self) -> Result<&Arc<crate::backups::Backups>, Status> {
        self.ctx.backups.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "backups are not configured: add a [backups] section to the controller config",
            )
        })
    }

    fn isolation(&self) -> Result<&Arc<IsolationState>, Status> {
        self.isolation.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "database isolation is not configured: add an [isolation] section to the \
                 controller config",
            )
        })
    }
}

/// One page of `hosts` (sorted by name): those after `token` (a host name, the last of the
/// previous page), at most `size` of them (0: all).
fn page_of_hosts(hosts: Vec<HostSummary>, size: u32, token: &str) -> ListHostsResponse {
    let total = u32::try_from(hosts.len()).unwrap_or(u32::MAX);
    let mut rest: Vec<HostSummary> = hosts
        .into_iter()
        .filter(|h| token.is_empty() || h.name.as_str() > token)
        .collect();
    let size = if size == 0 { rest.len() } else { size as usize };
    let more = rest.len() > size;
    rest.truncate(size);
    let next_page_token = if more {
        rest.last().map(|h| h.name.clone()).unwrap_or_default()
    } else {
        String::new()
    };
    ListHostsResponse {
        hosts: rest,
        next_page_token,
        total,
    }
}

#[tonic::async_trait]
impl FleetService for FleetApi {
    async fn list_hosts(
        &self,
        request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        let req = request.into_inner();
        let mut hosts = self.registry.summaries();
        super::revoke::overlay_summaries(&self.ctx, &mut hosts);
        Ok(Response::new(page_of_hosts(
            hosts,
            req.page_size,
            &req.page_token,
        )))
    }

    async fn get_host(&self, request: Request<GetHostRequest>) -> Result<Response<Host>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument(
                "GetHost needs a host name (field `name`)",
            ));
        }
        let mut host = self.registry.host(&name).ok_or_else(|| {
            Status::not_found(format!(
                "no host named {name:?}; known hosts: {}",
                self.registry.names().join(", ")
            ))
        })?;
        super::revoke::overlay_host(&self.ctx, &mut host);
        Ok(Response::new(host))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit as usize
        };
        let jobs = self.ctx.jobs.list(&req.host, limit);
        // A filter naming a host nobody knows is a typo, not "no jobs": say so, as GetHost does.
        if !req.host.is_empty() && jobs.is_empty() && self.registry.host(&req.host).is_none() {
            return Err(Status::not_found(format!(
                "no host named {:?}; known hosts: {}",
                req.host,
                self.registry.names().join(", ")
            )));
        }
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let id = request.into_inner().job_id;
        self.ctx
            .jobs
            .get(&id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no job {id:?}")))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let peer = super::peer(&request)?;
        let what = {
            let r = request.get_ref();
            format!("cancel job {}: {}", r.job_id, r.reason)
        };
        let result = async {
            let who = super::operator_name(&request)?;
            let req = request.into_inner();
            let reason = if req.reason.is_empty() {
                format!("by {who}")
            } else {
                format!("{} (by {who})", req.reason)
            };
            let job = self.ctx.jobs.cancel(&req.job_id, &reason)?;
            self.committed(job).await
        }
        .await;
        self.audited(&peer, "CancelJob", what, result, |j| {
            format!(
                "job {} {}",
                j.job_id,
                crate::cli::format::enum_word(j.state().as_str_name(), "JOB_STATE_")
            )
        })
        .await
    }

    async fn submit_deploy(
        &self,
        request: Request<DeployRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let peer = super::peer(&request)?;
        let what = {
            let r = request.get_ref();
            format!(
                "deploy {} at {}{}{}",
                r.app,
                r.commit,
                if r.db_change { " with a db change" } else { "" },
                if r.requested_by.is_empty() {
                    String::new()
                } else {
                    format!(" for {}", r.requested_by)
                }
            )
        };
        let result = async {
            let who = super::operator_name(&request)?;
            let d = self.ctx.pipeline.submit(request.into_inner(), &who).await?;
            self.committed(d).await
        }
        .await;
        self.audited(&peer, "SubmitDeploy", what, result, |d| {
            format!("deploy {}", d.deploy_id)
        })
        .await
    }

    async fn cancel_deploy(
        &self,
        request: Request<CancelDeployRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let peer = super::peer(&request)?;
        let who = super::operator_name(&request)?;
        let what = {
            let r = request.get_ref();
            format!("cancel deploy {}: {}", r.deploy_id, r.reason)
        };
        let result = async {
            let req = request.into_inner();
            let d = self
                .ctx
                .pipeline
                .cancel(&req.deploy_id, &who, &req.reason)?;
            self.committed(d).await
        }
        .await;
        self.audited(&peer, "CancelDeploy", what, result, |d| {
            format!("deploy {}", d.deploy_id)
        })
        .await
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let peer = super::peer(&request)?;
        let what = {
            let r = request.get_ref();
            format!(
                "roll {} {} back to {}",
                r.app,
                r.environment,
                if r.to_commit.is_empty() {
                    "the previous release"
                } else {
                    r.to_commit.as_str()
                }
            )
        };
        let result = async {
            let who = super::operator_name(&request)?;
            let req = request.into_inner();
            let d = self
                .ctx
                .pipeline
                .rollback(&req.app, &req.environment, &req.to_commit, &who)
                .await?;
            self.committed(d).await
        }
        .await;
        self.audited(&peer, "Rollback", what, result, |d| {
            format!("deploy {}", d.deploy_id)
        })
        .await
    }

    async fn get_deploy(
        &self,
        request: Request<GetDeployRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let id = request.into_inner().deploy_id;
        self.ctx
            .pipeline
            .get(&id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no deploy {id:?}")))
    }

    async fn list_deploys(
        &self,
        request: Request<ListDeploysRequest>,
    ) -> Result<Response<ListDeploysResponse>, Status> {
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            50
        } else {
            req.limit as usize
        };
        let deployments = self.ctx.pipeline.list(&req.app, limit);
        // An app that is neither configured nor in the history is a typo, not "no deploys".
        if !req.app.is_empty() && deployments.is_empty() {
            self.ctx.pipeline.configured_app(&req.app)?;
        }
        Ok(Response::new(ListDeploysResponse { deployments }))
    }

    type WatchDeployStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<DeploymentEvent, Status>> + Send>>;

    async fn watch_deploy(
        &self,
        request: Request<GetDeployRequest>,
    ) -> Result<Response<Self::WatchDeployStream>, Status> {
        let id = request.into_inner().deploy_id;
        let (deploy, mut rx) = self.ctx.pipeline.watch(&id)?;
        let (tx, out) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for step in deploy.steps.iter().cloned() {
                let ev = DeploymentEvent {
                    deploy_id: id.clone(),
                    at: step.started_at,
                    step: Some(step),
                    ..Default::default()
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            if deploy.state() != DeploymentState::Running {
                let _ = tx
                    .send(Ok(DeploymentEvent {
                        deploy_id: id.clone(),
                        at: deploy.finished_at,
                        final_state: deploy.state,
                        ..Default::default()
                    }))
                    .await;
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.deploy_id == id => {
                        let last = ev.final_state != 0;
                        if tx.send(Ok(ev)).await.is_err() || last {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Ok(DeploymentEvent {
                                deploy_id: id.clone(),
                                log_line: format!("({n} events skipped: this watcher fell behind)"),
                                ..Default::default()
                            }))
                            .await;
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn run_isolation_check(
        &self,
        request: Request<RunIsolationCheckRequest>,
    ) -> Result<Response<IsolationReport>, Status> {
        let peer = super::peer(&request)?;
        let what = {
            let r = request.get_ref();
            if r.probe {
                format!(
                    "isolation check with probes from {}",
                    if r.hosts.is_empty() {
                        "the configured hosts".to_string()
                    } else {
                        r.hosts.join(", ")
                    }
                )
            } else {
                "isolation check".to_string()
            }
        };
        let result = async {
            let isolation = self.isolation()?;
            let who = super::operator_name(&request)?;
            let req = request.into_inner();
            if !req.probe {
                if !req.hosts.is_empty() {
                    return Err(Status::invalid_argument(
                        "hosts names where to probe from: set probe too",
                    ));
                }
                return Ok(Response::new(isolation.check_now(None, &who).await));
            }
            let hosts = isolation.probe_hosts(&req.hosts).map_err(|e| {
                if isolation.policy().probe.is_none() {
                    Status::failed_precondition(e)
                } else {
                    Status::invalid_argument(e)
                }
            })?;
            Ok(Response::new(isolation.check_now(Some(&hosts), &who).await))
        }
        .await;
        self.audited(&peer, "RunIsolationCheck", what, result, |r| {
            format!("{} violation(s)", r.violations.len())
        })
        .await
    }

    async fn get_isolation_report(
        &self,
        _request: Request<GetIsolationReportRequest>,
    ) -> Result<Response<IsolationReport>, Status> {
        self.isolation()?
            .latest()
            .map(Response::new)
            .ok_or_else(|| {
                Status::not_found(
                    "no isolation check has completed yet; RunIsolationCheck runs one",
                )
            })
    }

    async fn list_backups(
        &self,
        _request: Request<ListBackupsRequest>,
    ) -> Result<Response<ListBackupsResponse>, Status> {
        Ok(Response::new(self.backups()?.list()))
    }

    async fn run_backup(
        &self,
        request: Request<RunBackupRequest>,
    ) -> Result<Response<Job>, Status> {
        let peer = super::peer(&request)?;
        let what = {
            let r = request.get_ref();
            format!("backup now: {}", r.reason)
        };
        let result = async {
            let who = super::operator_name(&request)?;
            let req = request.into_inner();
            let reason = if req.reason.is_empty() {
                format!("requested by {who}")
            } else {
                format!("{} (requested by {who})", req.reason)
            };
            let (job, _) = self
                .backups()?
                .start_backup(&reason, &who, req.simulated_now)?;
            self.committed(job).await
        }
        .await;
        self.audited(&peer, "RunBackup", what, result, |j| {
            format!("job {}", j.job_id)
        })
        .await
    }

    async fn verify_backups(
        &self,
        request: Request<VerifyBackupsRequest>,
    ) -> Result<Response<Job>, Status> {
        let peer = super::peer(&request)?;
        let what = "verify backups now".to_string();
        let result = async {
            let who = super::operator_name(&request)?;
            let (job, _) = self.backups()?.start_verify(&who)?;
            self.committed(job).await
        }
        .await;
        self.audited(&peer, "VerifyBackups", what, result, |j| {
            format!("job {}", j.job_id)
        })
        .await
    }

    async fn run_restore_test(
        &self,
        request: Request<RunRestoreTestRequest>,
    ) -> Result<Response<Job>, Status> {
        let peer = super::peer(&request)?;
        let what = "restore test now".to_string();
        let result = async {
            let who = super::operator_name(&request)?;
            let (job, _) = self.backups()?.start_restore_test(&who)?;
            self.committed(job).await
        }
        .await;
        self.audited(&peer, "RunRestoreTest", what, result, |j| {
            format!("job {}", j.job_id)
        })
        .await
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let req = request.into_inner();
        let records = self
            .ctx
            .audit
            .list(req.since.as_ref(), &req.who, req.limit)
            .await?;
        Ok(Response::new(ListAuditResponse { records }))
    }

    async fn lock_app(
        &self,
        request: Request<LockAppRequest>,
    ) -> Result<Response<AppLock>, Status> {
        let peer = super::peer(&request)?;
        let who = super::operator_name(&request)?;
        let req = request.into_inner();
        let what = format!("lock {}: {}", req.app, req.reason);
        let result = async {
            self.ctx.pipeline.configured_app(&req.app)?;
            let lock = self.ctx.locks.lock(&req.app, &req.reason, &who).await?;
            Ok(Response::new(lock))
        }
        .await;
        self.audited(&peer, "LockApp", what, result, |l| {
            format!("{} locked", l.app)
        })
        .await
    }

    async fn unlock_app(
        &self,
        request: Request<UnlockAppRequest>,
    ) -> Result<Response<AppLock>, Status> {
        let peer = super::peer(&request)?;
        let req = request.into_inner();
        let what = format!("unlock {}", req.app);
        let result = self.ctx.locks.unlock(&req.app).await.map(Response::new);
        self.audited(&peer, "UnlockApp", what, result, |l| {
            format!(
                "{} unlocked (locked by {}: {})",
                l.app, l.locked_by, l.reason
            )
        })
        .await
    }

    async fn list_locks(
        &self,
        _request: Request<ListLocksRequest>,
    ) -> Result<Response<ListLocksResponse>, Status> {
        Ok(Response::new(ListLocksResponse {
            locks: self.ctx.locks.list(),
        }))
    }

    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<JoinToken>, Status> {
        let peer = super::peer(&request)?;
        let what = format!("join token for host {}", request.get_ref().host_name);
        let result = async {
            let who = super::operator_name(&request)?;
            let enrolment = crate::enroll::configured(&self.ctx.enrolment)?;
            let req = request.into_inner();
            let ttl = req.ttl.as_ref().map(sentinel_proto::time::std_duration);
            let host = req.host_name.clone();
            let made = tokio::task::spawn_blocking(move || {
                let made = enrolment.create_token(&host, ttl, &who);
                (enrolment, made)
            })
            .await
            .map_err(|e| Status::internal(format!("token task failed: {e}")))?;
            let (enrolment, made) = made;
            let (token, expires_at) = made.map_err(|e| match e {
                crate::enroll::TokenError::Store(e) => Status::unavailable(e.to_string()),
                other => Status::invalid_argument(other.to_string()),
            })?;
            Ok(Response::new(JoinToken {
                token: token.to_string(),
                host_name: req.host_name,
                expires_at: Some(sentinel_proto::time::timestamp(expires_at)),
                ca_sha256: enrolment.ca_sha256().to_owned(),
            }))
        }
        .await;
        // Never the token itself: the trail is readable by viewers.
        self.audited(&peer, "CreateJoinToken", what, result, |t| {
            format!(
                "token for {} until {}",
                t.host_name,
                crate::cli::format::when(t.expires_at.as_ref())
            )
        })
        .await
    }

    async fn revoke_host(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<Revocation>, Status> {
        let peer = super::peer(&request)?;
        let who = super::operator_name(&request)?;
        let req = request.into_inner();
        let what = format!("revoke host {}: {}", req.name, req.reason);
        let result = async {
            let r = super::revoke::revoke_host(&self.ctx, &who, req).await?;
            // The cancelled jobs are stored before the answer, as the entry is.
            self.committed(r).await
        }
        .await;
        self.audited(&peer, "RevokeHost", what, result, |r| {
            format!(
                "{} revoked, {} job(s) cancelled",
                r.name,
                r.cancelled_jobs.len()
            )
        })
        .await
    }

    async fn forget_host(
        &self,
        request: Request<ForgetHostRequest>,
    ) -> Result<Response<ForgetHostResponse>, Status> {
        let peer = super::peer(&request)?;
        let name = request.into_inner().name;
        let what = format!("forget host {name}");
        let result = super::revoke::forget_host(&self.ctx, name)
            .await
            .map(Response::new);
        self.audited(&peer, "ForgetHost", what, result, |r| {
            format!("{} forgotten", r.name)
        })
        .await
    }

    async fn revoke_operator(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<Revocation>, Status> {
        let peer = super::peer(&request)?;
        let who = super::operator_name(&request)?;
        let req = request.into_inner();
        let what = format!("revoke operator {}: {}", req.name, req.reason);
        let result = super::revoke::revoke_operator(&self.ctx, &who, req)
            .await
            .map(Response::new);
        self.audited(&peer, "RevokeOperator", what, result, |r| {
            format!("{} revoked", r.name)
        })
        .await
    }

    async fn unrevoke_operator(
        &self,
        request: Request<UnrevokeOperatorRequest>,
    ) -> Result<Response<Revocation>, Status> {
        let peer = super::peer(&request)?;
        let name = request.into_inner().name;
        let what = format!("unrevoke operator {name}");
        let result = super::revoke::unrevoke_operator(&self.ctx, name)
            .await
            .map(Response::new);
        self.audited(&peer, "UnrevokeOperator", what, result, |r| {
            format!("{} no longer revoked", r.name)
        })
        .await
    }

    async fn list_revocations(
        &self,
        _request: Request<ListRevocationsRequest>,
    ) -> Result<Response<ListRevocationsResponse>, Status> {
        Ok(Response::new(ListRevocationsResponse {
            revocations: self.ctx.deny.list(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_of_hosts_cover_every_host_once_in_name_order() {
        let hosts: Vec<HostSummary> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|n| HostSummary {
                name: n.to_string(),
                ..Default::default()
            })
            .collect();
        let all = page_of_hosts(hosts.clone(), 0, "");
        assert_eq!(
            (all.hosts.len(), all.next_page_token.as_str(), all.total),
            (5, "", 5)
        );
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = page_of_hosts(hosts.clone(), 2, &token);
            assert!(page.hosts.len() <= 2);
            assert_eq!(page.total, 5);
            seen.extend(page.hosts.iter().map(|h| h.name.clone()));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(seen, ["a", "b", "c", "d", "e"]);
        assert!(page_of_hosts(hosts, 2, "e").hosts.is_empty());
    }
}
