//! `sentinel.v1.FleetService`: the operator API. Reads answer from the registry (the fleet's
//! live state with its age); calls of capabilities this build does not have yet answer
//! UNIMPLEMENTED with a message saying so.

use std::sync::Arc;

use sentinel_proto::v1::fleet_service_server::FleetService;
use sentinel_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::registry::Registry;

/// The operator API service.
pub struct FleetApi {
    registry: Arc<Registry>,
}

impl FleetApi {
    /// A service over the shared registry.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not available in this controller build"))
}

#[tonic::async_trait]
impl FleetService for FleetApi {
    async fn list_hosts(
        &self,
        _request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        Ok(Response::new(ListHostsResponse {
            hosts: self.registry.summaries(),
        }))
    }

    async fn get_host(&self, request: Request<GetHostRequest>) -> Result<Response<Host>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument(
                "GetHost needs a host name (field `name`)",
            ));
        }
        self.registry.host(&name).map(Response::new).ok_or_else(|| {
            Status::not_found(format!(
                "no host named {name:?}; known hosts: {}",
                self.registry.names().join(", ")
            ))
        })
    }

    async fn list_jobs(
        &self,
        _request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Err(not_yet("the job queue"))
    }

    async fn get_job(&self, _request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Err(not_yet("the job queue"))
    }

    async fn cancel_job(
        &self,
        _request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        Err(not_yet("the job queue"))
    }

    async fn deploy(
        &self,
        _request: Request<DeployRequest>,
    ) -> Result<Response<Deployment>, Status> {
        Err(not_yet("the deploy pipeline"))
    }

    async fn rollback(
        &self,
        _request: Request<RollbackRequest>,
    ) -> Result<Response<Deployment>, Status> {
        Err(not_yet("the deploy pipeline"))
    }

    async fn get_deployment(
        &self,
        _request: Request<GetDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        Err(not_yet("the deploy pipeline"))
    }

    async fn list_deployments(
        &self,
        _request: Request<ListDeploymentsRequest>,
    ) -> Result<Response<ListDeploymentsResponse>, Status> {
        Err(not_yet("the deploy pipeline"))
    }

    async fn run_isolation_check(
        &self,
        _request: Request<RunIsolationCheckRequest>,
    ) -> Result<Response<IsolationReport>, Status> {
        Err(not_yet("database isolation checking"))
    }

    async fn get_isolation_report(
        &self,
        _request: Request<GetIsolationReportRequest>,
    ) -> Result<Response<IsolationReport>, Status> {
        Err(not_yet("database isolation checking"))
    }

    async fn list_backups(
        &self,
        _request: Request<ListBackupsRequest>,
    ) -> Result<Response<ListBackupsResponse>, Status> {
        Err(not_yet("backups"))
    }

    async fn run_backup(
        &self,
        _request: Request<RunBackupRequest>,
    ) -> Result<Response<Job>, Status> {
        Err(not_yet("backups"))
    }

    async fn verify_backups(
        &self,
        _request: Request<VerifyBackupsRequest>,
    ) -> Result<Response<Job>, Status> {
        Err(not_yet("backups"))
    }

    async fn run_restore_test(
        &self,
        _request: Request<RunRestoreTestRequest>,
    ) -> Result<Response<Job>, Status> {
        Err(not_yet("backups"))
    }
}
