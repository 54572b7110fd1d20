//! The deploy pipeline: staging deploy -> E2E -> (db_change: backup hook) -> production deploy
//! -> smoke -> report. One deploy per app at a time; any failure stops the pipeline, the failed
//! host is rolled back (by its agent for deploy failures, by a rollback job for E2E failures),
//! and production is never touched when staging failed.

pub mod bundle;
pub mod config;
pub mod e2e;
pub mod report;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use sentinel_daemon::metrics::enum_word;
use sentinel_proto::results::finished_result;
use sentinel_proto::time::now;
use sentinel_proto::v1::{
    job_event, job_finished, job_spec, BackupParams, BlueGreen, DeployParams, DeployRequest,
    Deployment, DeploymentEvent, DeploymentKind, DeploymentState, DeploymentStep, E2eLevel,
    HealthCheck, Job, JobEvent, JobKind, JobState, RollbackParams, StepStatus,
};
use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn, Instrument};

use crate::jobs::{JobQueue, NewJob};
use crate::store::{Store, StoreError};
pub use config::{AppConfig, EnvironmentConfig, PipelineConfig};

/// The built-in backup before production (the backups module): the host and parameters of a
/// fresh backup of an app's production databases, or None when none are configured (the
/// `pipeline.backup_hook` command then runs instead, if there is one).
pub trait PreDeployBackup: Send + Sync {
    /// The backup job for a `db_change` deploy of `app`.
    fn pre_deploy(
        &self,
        app: &str,
        deploy_id: &str,
        commit: &str,
    ) -> Option<(String, BackupParams)>;
}

/// Something that may hold deploys back (the isolation checker). `blocking` answers from the
/// latest report at submission; `check_now` runs a fresh check before production.
#[tonic::async_trait]
pub trait DeployGate: Send + Sync {
    /// Reasons deploys to `environment` are refused right now (empty: none).
    fn blocking(&self, environment: &str) -> Vec<String>;
    /// A fresh check for `environment`; the error says what blocks it.
    async fn check_now(&self, environment: &str) -> Result<(), String>;
}

struct State {
    deploys: HashMap<String, Deployment>,
    /// App -> the deploy holding its lock.
    running: HashMap<String, String>,
}

/// The pipeline and the deploy history.
pub struct Pipeline {
    /// The configured apps and the pipeline settings; replaced whole by [`Pipeline::reload`]
    /// (a deploy in flight keeps the copy it started with).
    settings: std::sync::RwLock<Arc<Settings>>,
    jobs: Arc<JobQueue>,
    bundles_dir: PathBuf,
    job_ttl: Duration,
    state: Mutex<State>,
    dirty: crate::store::DirtyKeys,
    events: broadcast::Sender<DeploymentEvent>,
    cancels: Mutex<HashMap<String, Arc<Cancel>>>,
    gate: Mutex<Option<Arc<dyn DeployGate>>>,
    backups: Mutex<Option<Arc<dyn PreDeployBackup>>>,
    /// App locks, consulted before every deploy and rollback.
    app_locks: Mutex<Option<Arc<crate::audit::Locks>>>,
}

/// What `[pipeline]` and `[[apps]]` say, as one value so a reload swaps both at once.
struct Settings {
    apps: HashMap<String, AppConfig>,
    config: PipelineConfig,
}

/// How a running deploy is cancelled: the token its run stops on, and who cancelled it and why.
#[derive(Default)]
struct Cancel {
    token: CancellationToken,
    /// (operator, reason), set by [`Pipeline::cancel`].
    by: Mutex<Option<(String, String)>>,
}

impl Cancel {
    /// `cancelled by WHO: REASON`, once cancelled.
    fn detail(&self) -> Option<String> {
        self.by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(who, reason)| format!("cancelled by {who}: {reason}"))
    }
}

/// The longest cancel reason kept (it goes into the history and every watcher's terminal).
const MAX_CANCEL_REASON: usize = 500;

/// How a pipeline run failed.
#[derive(Debug)]
struct Failure {
    detail: String,
    rolled_back: bool,
    cancelled: bool,
}

impl Failure {
    fn new(detail: impl Into<String>) -> Self {
        Self {
            detail: detail.into(),
            rolled_back: false,
            cancelled: false,
        }
    }
}

impl Pipeline {
    /// Loads the deploy history. Deploys that were running when the controller stopped end as
    /// failed, saying where they stood, so nothing is left half-applied without saying so.
    pub fn load(
        store: &dyn Store,
        apps: &[AppConfig],
        config: PipelineConfig,
        jobs: Arc<JobQueue>,
        bundles_dir: PathBuf,
        job_ttl: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let mut deploys = HashMap::new();
        let mut dirty = HashSet::new();
        for mut d in store.load_deploys()? {
            if d.state() == DeploymentState::Running && !d.cancelled_by.is_empty() {
                // The cancel was acknowledged (and stored) before the restart: it stands.
                d.state = DeploymentState::Cancelled as i32;
                d.detail = format!(
                    "cancelled by {}: {}; {}",
                    d.cancelled_by,
                    d.cancel_reason,
                    interrupted_detail(&d)
                );
                d.finished_at = Some(now());
                warn!(deploy_id = %d.deploy_id, detail = %d.detail, "cancelled deploy ended by restart");
                dirty.insert(d.deploy_id.clone());
            } else if d.state() == DeploymentState::Running {
                d.state = DeploymentState::Failed as i32;
                d.detail = interrupted_detail(&d);
                d.finished_at = Some(now());
                warn!(deploy_id = %d.deploy_id, detail = %d.detail, "deploy interrupted by restart");
                dirty.insert(d.deploy_id.clone());
            }
            deploys.insert(d.deploy_id.clone(), d);
        }
        let (events, _) = broadcast::channel(4096);
        Ok(Arc::new(Self {
            settings: std::sync::RwLock::new(Arc::new(Settings {
                apps: apps.iter().map(|a| (a.name.clone(), a.clone())).collect(),
                config,
            })),
            jobs,
            bundles_dir,
            job_ttl,
            state: Mutex::new(State {
                deploys,
                running: HashMap::new(),
            }),
            dirty: crate::store::DirtyKeys::with(dirty),
            events,
            cancels: Mutex::new(HashMap::new()),
            gate: Mutex::new(None),
            backups: Mutex::new(None),
            app_locks: Mutex::new(None),
        }))
    }

    /// Installs the gate consulted before deploys (the isolation checker).
    pub fn set_gate(&self, gate: Arc<dyn DeployGate>) {
        *self.gate.lock().unwrap_or_else(|p| p.into_inner()) = Some(gate);
    }

    fn gate(&self) -> Option<Arc<dyn DeployGate>> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs the built-in pre-production backup (the backups module).
    pub fn set_backups(&self, backups: Arc<dyn PreDeployBackup>) {
        *self.backups.lock().unwrap_or_else(|p| p.into_inner()) = Some(backups);
    }

    /// Installs the app locks that refuse deploys and rollbacks of a locked app.
    pub fn set_locks(&self, locks: Arc<crate::audit::Locks>) {
        *self.app_locks.lock().unwrap_or_else(|p| p.into_inner()) = Some(locks);
    }

    /// Refuses when `app` is locked.
    fn check_unlocked(&self, app: &str) -> Result<(), Status> {
        match &*self.app_locks.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(locks) => locks.check(app),
            None => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ok when `name` is a configured app, else NOT_FOUND naming the configured ones.
    pub fn configured_app(&self, name: &str) -> Result<(), Status> {
        self.app(name).map(|_| ())
    }

    /// The settings in force now.
    fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts new `[[apps]]` and `[pipeline]` settings in force (SIGHUP). Deploys already
    /// running finish with the settings they started with; the next one uses these.
    pub fn reload(&self, apps: &[AppConfig], config: PipelineConfig) {
        let settings = Arc::new(Settings {
            apps: apps.iter().map(|a| (a.name.clone(), a.clone())).collect(),
            config,
        });
        crate::metrics::get().init_deploys(settings.apps.keys().map(String::as_str));
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    fn app(&self, name: &str) -> Result<AppConfig, Status> {
        let settings = self.settings();
        settings.apps.get(name).cloned().ok_or_else(|| {
            let mut known: Vec<&str> = settings.apps.keys().map(String::as_str).collect();
            known.sort();
            Status::not_found(format!(
                "no app {name:?}; configured apps: {}",
                known.join(", ")
            ))
        })
    }

    /// Starts a deploy; refuses a second one of the same app with the running one's id, who
    /// started it and when.
    pub async fn submit(
        self: &Arc<Self>,
        req: DeployRequest,
        who: &str,
    ) -> Result<Deployment, Status> {
        let app = self.app(&req.app)?;
        self.check_unlocked(&app.name)?;
        if req.commit.is_empty() {
            return Err(Status::invalid_argument(
                "a deploy needs a commit (field `commit`)",
            ));
        }
        if req.db_change && !req.migration.is_empty() && app.migration_service.is_empty() {
            return Err(Status::invalid_argument(format!(
                "app {} has no migration_service configured to run migration {:?}",
                app.name, req.migration
            )));
        }
        if let Some(gate) = self.gate() {
            for env in ["staging", "production"] {
                let reasons = gate.blocking(env);
                if !reasons.is_empty() {
                    return Err(Status::failed_precondition(format!(
                        "deploys to {env} are blocked by database isolation violations: {}",
                        reasons.join("; ")
                    )));
                }
            }
        }
        let commit = bundle::resolve_commit(&app.repo, &req.commit)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let requested_by = if req.requested_by.is_empty() {
            who.to_string()
        } else {
            format!("{} (via {who})", req.requested_by)
        };
        let deploy = self.start(
            &app.name,
            &commit,
            &req,
            &requested_by,
            (DeploymentKind::Deploy, ""),
        )?;
        let me = self.clone();
        let id = deploy.deploy_id.clone();
        let span = tracing::info_span!("deploy", deploy_id = %id, app = %app.name);
        tokio::spawn(
            async move {
                let run = Run {
                    id: &id,
                    app: &app,
                    commit: &commit,
                    req: &req,
                };
                me.drive(&id, &app.name, me.run(&run)).await;
            }
            .instrument(span),
        );
        Ok(deploy)
    }

    /// Runs a deploy's or rollback's work until it ends or is cancelled, then finishes it
    /// (report included). The one place a run's cancel token is made and consulted.
    async fn drive(
        &self,
        id: &str,
        app: &str,
        work: impl std::future::Future<Output = Result<String, Failure>>,
    ) {
        let cancel = Arc::new(Cancel::default());
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), cancel.clone());
        let outcome = tokio::select! {
            // The cancel first: a cancel is said as one, not as the job it stopped failing.
            biased;
            _ = cancel.token.cancelled() => Err(Failure::new("cancelled")),
            r = work => r,
        };
        // A cancelled job may end the work before the token is seen: it is still a cancel.
        let outcome = match (outcome, cancel.detail()) {
            (Err(f), Some(why)) => Err(Failure {
                detail: if f.detail == "cancelled" {
                    why
                } else {
                    format!("{why} ({})", f.detail)
                },
                cancelled: true,
                ..f
            }),
            (outcome, _) => outcome,
        };
        // Nothing is left to cancel: only the report is still to go out.
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.finish(id, app, outcome).await;
    }

    /// Records a new running deploy under the app's lock.
    fn start(
        &self,
        app: &str,
        commit: &str,
        req: &DeployRequest,
        who: &str,
        (kind, environment): (DeploymentKind, &str),
    ) -> Result<Deployment, Status> {
        let mut state = self.lock();
        if let Some(running) = state.running.get(app).and_then(|id| state.deploys.get(id)) {
            let since = running
                .started_at
                .as_ref()
                .map(|t| {
                    humantime::format_rfc3339_seconds(sentinel_proto::time::system_time(t))
                        .to_string()
                })
                .unwrap_or_default();
            return Err(Status::failed_precondition(format!(
                "app {app} is being deployed by {} (deploy {}, started {since}); one deploy per app at a time",
                running.requested_by, running.deploy_id
            )));
        }
        let mut rnd = [0u8; 3];
        rand::thread_rng().fill_bytes(&mut rnd);
        let deploy_id = format!(
            "d-{}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
            hex::encode(rnd)
        );
        let d = Deployment {
            deploy_id: deploy_id.clone(),
            app: app.to_string(),
            commit: commit.to_string(),
            state: DeploymentState::Running as i32,
            requested_by: who.to_string(),
            started_at: Some(now()),
            finished_at: None,
            steps: Vec::new(),
            db_change: req.db_change,
            migration: req.migration.clone(),
            e2e: req.e2e,
            detail: String::new(),
            kind: kind as i32,
            environment: environment.to_string(),
            cancelled_by: String::new(),
            cancel_reason: String::new(),
        };
        state.running.insert(app.to_string(), deploy_id.clone());
        state.deploys.insert(deploy_id.clone(), d.clone());
        drop(state);
        self.touch(&deploy_id);
        info!(deploy_id = %deploy_id, app, commit, requested_by = who, "deploy started");
        Ok(d)
    }

    fn touch(&self, id: &str) {
        self.dirty.mark(id);
    }

    /// Starts (or updates) a step and tells watchers.
    fn step(&self, id: &str, step: DeploymentStep) {
        {
            let mut state = self.lock();
            let Some(d) = state.deploys.get_mut(id) else {
                return;
            };
            match d
                .steps
                .iter_mut()
                .rev()
                .find(|s| s.name == step.name && s.environment == step.environment)
            {
                Some(existing) if existing.status == StepStatus::Started as i32 => {
                    let job_id = std::mem::take(&mut existing.job_id);
                    *existing = step.clone();
                    if existing.job_id.is_empty() {
                        existing.job_id = job_id;
                    }
                }
                _ => d.steps.push(step.clone()),
            }
        }
        self.touch(id);
        let _ = self.events.send(DeploymentEvent {
            deploy_id: id.to_string(),
            at: Some(now()),
            step: Some(step),
            ..Default::default()
        });
    }

    /// Runs `f` as a named step: STARTED, then SUCCEEDED or FAILED with its detail.
    async fn run_step<T, F>(
        &self,
        id: &str,
        name: &str,
        env: &str,
        host: &str,
        f: F,
    ) -> Result<(T, String), Failure>
    where
        F: std::future::Future<Output = Result<(T, String), Failure>>,
    {
        let started = now();
        let base = DeploymentStep {
            name: name.to_string(),
            environment: env.to_string(),
            host: host.to_string(),
            status: StepStatus::Started as i32,
            started_at: Some(started),
            ..Default::default()
        };
        self.step(id, base.clone());
        let result = f.await;
        let mut done = base;
        done.finished_at = Some(now());
        match &result {
            Ok((_, detail)) => {
                done.status = StepStatus::Succeeded as i32;
                done.detail = detail.clone();
            }
            Err(f) => {
                done.status = StepStatus::Failed as i32;
                done.detail = f.detail.clone();
            }
        }
        self.step(id, done);
        result
    }

    fn set_step_job(&self, id: &str, name: &str, env: &str, job_id: &str) {
        let mut state = self.lock();
        if let Some(step) = state.deploys.get_mut(id).and_then(|d| {
            d.steps
                .iter_mut()
                .rev()
                .find(|s| s.name == name && s.environment == env)
        }) {
            step.job_id = job_id.to_string();
        }
    }

    /// Runs the deploy's stages in order; the first failure ends it, so production is never
    /// touched when staging (or the backup, or the isolation check) failed.
    async fn run(&self, run: &Run<'_>) -> Result<String, Failure> {
        for stage in stages(run.app, run.req) {
            match stage {
                Stage::Environment(target) => self.environment(run, &target).await?,
                Stage::Backup => self.backup_hook(run.id, run.app, run.commit).await?,
                Stage::IsolationCheck => self.isolation_check(run).await?,
            }
        }
        Ok(deployed_detail(run))
    }

    /// A fresh isolation check before production, when a gate is installed.
    async fn isolation_check(&self, run: &Run<'_>) -> Result<(), Failure> {
        let Some(gate) = self.gate() else {
            return Ok(());
        };
        let host = run.app.production.host.clone();
        self.run_step(run.id, "isolation-check", "production", &host, async {
            gate.check_now("production")
                .await
                .map(|()| ((), "no isolation violation".to_string()))
                .map_err(Failure::new)
        })
        .await?;
        Ok(())
    }

    /// One environment's part of a deploy: bundle, deploy job, E2E checks, and a rollback
    /// of that environment when its E2E checks fail.
    async fn environment(&self, run: &Run<'_>, target: &Target<'_>) -> Result<(), Failure> {
        let Run {
            id, app, commit, ..
        } = *run;
        let Target {
            name: env_name,
            env,
            e2e: level,
        } = *target;
        let host = env.host.as_str();
        let _timer = crate::metrics::get().deploy_timer(&app.name, env_name);
        let started = Instant::now();
        let (bundle, _) = self
            .run_step(id, "bundle", env_name, host, async {
                let b = bundle::build(
                    &app.repo,
                    commit,
                    env.secrets_file.as_deref(),
                    &self.bundles_dir,
                )
                .await
                .map_err(|e| Failure::new(e.to_string()))?;
                let detail = format!("{} bytes, sha256 {}", b.size, b.sha256);
                Ok((b, detail))
            })
            .await?;
        let overhead = started.elapsed();
        let params = deploy_params(run, target, &bundle);
        info!(
            env = env_name,
            host,
            overhead_ms = overhead.as_millis() as u64,
            "bundle ready"
        );
        self.run_step(id, "deploy", env_name, host, async {
            let job = self
                .run_job(
                    id,
                    "deploy",
                    env_name,
                    host,
                    JobKind::Deploy,
                    job_spec::Params::Deploy(params),
                )
                .await?;
            Ok(((), job.detail))
        })
        .await?;

        let checks = e2e::selected(&app.e2e, level);
        if checks.is_empty() {
            return Ok(());
        }
        let step_name = e2e_step_name(level);
        let e2e_result = self
            .run_step(id, step_name, env_name, host, async {
                let results = e2e::run(&env.base_url, &checks).await;
                let failed: Vec<String> = results
                    .iter()
                    .filter(|r| !r.ok)
                    .map(|r| format!("{}: {}", r.name, r.detail))
                    .collect();
                if failed.is_empty() {
                    Ok(((), format!("{} check(s) passed", results.len())))
                } else {
                    Err(Failure::new(format!(
                        "E2E failed on {env_name}: {}",
                        failed.join("; ")
                    )))
                }
            })
            .await;
        let Err(mut failure) = e2e_result else {
            return Ok(());
        };
        // The release is up but wrong: put the previous one back.
        let params = rollback_params(app, env_name, env, "", id);
        let rollback = self
            .run_step(id, "rollback", env_name, host, async {
                let job = self
                    .run_job(
                        id,
                        "rollback",
                        env_name,
                        host,
                        JobKind::Rollback,
                        job_spec::Params::Rollback(params),
                    )
                    .await?;
                Ok(((), job.detail))
            })
            .await;
        match rollback {
            Ok(_) => {
                failure
                    .detail
                    .push_str(&format!("; {env_name} rolled back to its previous release"));
                failure.rolled_back = true;
            }
            Err(e) => failure.detail.push_str(&format!(
                "; rollback of {env_name} failed too: {}",
                e.detail
            )),
        }
        Err(failure)
    }

    /// Submits a job and waits for its end, relaying its log lines to the deploy's watchers.
    async fn run_job(
        &self,
        id: &str,
        step: &str,
        env: &str,
        host: &str,
        kind: JobKind,
        params: job_spec::Params,
    ) -> Result<Job, Failure> {
        let mut events = self.jobs.subscribe();
        let job = self
            .jobs
            .submit(NewJob {
                target: host.to_string(),
                kind,
                params,
                ttl: self.job_ttl,
                requested_by: format!("pipeline:{id}"),
            })
            .map_err(|s| Failure::new(s.message().to_string()))?;
        self.set_step_job(id, step, env, &job.job_id);
        let wait = self.jobs.wait_final(&job.job_id);
        tokio::pin!(wait);
        // The host's end arrives on the event channel after everything it sent before it, so
        // leaving on it relays every event in order. A job that ends here (cancelled, timed
        // out) ends through `wait`; what the channel still holds is relayed after.
        let finished = loop {
            tokio::select! {
                done = &mut wait => break done,
                ev = events.recv() => match ev {
                    Ok(ev) if ev.job_id == job.job_id => {
                        let end = matches!(
                            ev.event,
                            Some(job_event::Event::Finished(_)) | Some(job_event::Event::Refused(_))
                        );
                        self.relay(id, host, ev);
                        if end {
                            break self.jobs.get(&job.job_id);
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => self.relay_lag(id, host, n),
                    Err(broadcast::error::RecvError::Closed) => break wait.await,
                },
            }
        };
        loop {
            match events.try_recv() {
                Ok(ev) if ev.job_id == job.job_id => self.relay(id, host, ev),
                Ok(_) => {}
                Err(TryRecvError::Lagged(n)) => self.relay_lag(id, host, n),
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        let job = finished.ok_or_else(|| Failure::new(format!("job {} vanished", job.job_id)))?;
        if job.state() == JobState::Succeeded {
            Ok(job)
        } else {
            Err(job_failure(step, host, &job))
        }
    }

    /// Tells the deploy's watchers one of its job's log lines or agent steps.
    fn relay(&self, id: &str, host: &str, ev: JobEvent) {
        let line = match ev.event {
            Some(job_event::Event::Log(l)) => format!("[{host} {}] {}", l.stream, l.line),
            Some(job_event::Event::Step(s)) => format!(
                "[{host}] step {} {}{}",
                s.name,
                enum_word(
                    StepStatus::try_from(s.status)
                        .unwrap_or(StepStatus::Unspecified)
                        .as_str_name(),
                    "STEP_STATUS_"
                ),
                if s.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", s.detail)
                }
            ),
            _ => return,
        };
        self.log_line(id, line);
    }

    /// Says that `n` job events passed before this deploy could relay them (the controller
    /// was too busy); GetJob still has them.
    fn relay_lag(&self, id: &str, host: &str, n: u64) {
        self.log_line(
            id,
            format!("[{host}] ({n} job events of the fleet were not relayed here: the controller fell behind; GetJob has this job's)"),
        );
    }

    /// One log line to the deploy's watchers.
    fn log_line(&self, id: &str, line: String) {
        let _ = self.events.send(DeploymentEvent {
            deploy_id: id.to_string(),
            at: Some(now()),
            log_line: line,
            ..Default::default()
        });
    }

    async fn backup_hook(&self, id: &str, app: &AppConfig, commit: &str) -> Result<(), Failure> {
        let built_in = self
            .backups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .and_then(|b| b.pre_deploy(&app.name, id, commit));
        if let Some((host, params)) = built_in {
            // A fresh backup of the app's production databases; no migration without it.
            return self
                .run_step(id, "backup", "production", &host, async {
                    let job = self
                        .run_job(
                            id,
                            "backup",
                            "production",
                            &host,
                            JobKind::Backup,
                            job_spec::Params::Backup(params),
                        )
                        .await
                        .map_err(|f| Failure::new(format!("{}; not migrating", f.detail)))?;
                    Ok(((), job.detail))
                })
                .await
                .map(|_| ());
        }
        let host = app.production.host.clone();
        let settings = self.settings();
        let hook = settings.config.backup_hook.clone();
        let timeout = settings.config.backup_hook_timeout;
        self.run_step(id, "backup", "production", &host, async move {
            if hook.is_empty() {
                return Ok((
                    (),
                    "skipped: no [backups] database of this app and no pipeline.backup_hook configured".to_string(),
                ));
            }
            let args = hook_args(&hook, &app.name, commit, id);
            let mut cmd = tokio::process::Command::new(&args[0]);
            cmd.args(&args[1..]).stdin(std::process::Stdio::null()).kill_on_drop(true);
            match tokio::time::timeout(timeout, cmd.output()).await {
                Err(_) => Err(Failure::new(format!("backup hook {:?} timed out after {timeout:?}; not migrating", args[0]))),
                Ok(Err(e)) => Err(Failure::new(format!("backup hook {:?} could not start: {e}; not migrating", args[0]))),
                Ok(Ok(out)) if !out.status.success() => Err(Failure::new(format!(
                    "backup hook {:?} failed ({}): {}; not migrating",
                    args[0],
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))),
                Ok(Ok(_)) => Ok(((), format!("backup hook {:?} succeeded", args[0]))),
            }
        })
        .await
        .map(|_| ())
    }

    /// Ends a run: its report step (the webhooks, streamed like any step), then its final
    /// state, so a watcher's stream and `deploy --wait` end only after the report went out.
    async fn finish(&self, id: &str, app: &str, outcome: Result<String, Failure>) {
        let (state, detail) = final_state(outcome);
        let snapshot = {
            let mut s = self.lock();
            s.running.remove(app);
            let Some(d) = s.deploys.get_mut(id) else {
                return;
            };
            d.detail = detail.clone();
            let mut snapshot = d.clone();
            snapshot.state = state as i32;
            snapshot.finished_at = Some(now());
            snapshot
        };
        let settings = self.settings();
        if !settings.config.webhooks.is_empty() {
            let doc = report::document(&snapshot);
            let _ = self
                .run_step(id, "report", "", "", async {
                    let mut lines = Vec::new();
                    for hook in &settings.config.webhooks {
                        let line =
                            match report::deliver(hook, &doc, settings.config.webhook_attempts)
                                .await
                            {
                                Ok(l) | Err(l) => l,
                            };
                        self.log_line(id, format!("[report] {line}"));
                        lines.push(line);
                    }
                    report_outcome(&lines)
                })
                .await;
        }
        {
            let mut s = self.lock();
            if let Some(d) = s.deploys.get_mut(id) {
                d.state = state as i32;
                d.finished_at = snapshot.finished_at;
            }
        }
        self.touch(id);
        crate::metrics::get().deploy_finished(app, state);
        info!(state = state.as_str_name(), detail = %detail, "deploy finished");
        let _ = self.events.send(DeploymentEvent {
            deploy_id: id.to_string(),
            at: Some(now()),
            final_state: state as i32,
            ..Default::default()
        });
    }

    /// A manual rollback of one environment, recorded like a deploy (and under the app's lock).
    pub async fn rollback(
        self: &Arc<Self>,
        app_name: &str,
        env_name: &str,
        to_commit: &str,
        who: &str,
    ) -> Result<Deployment, Status> {
        let app = self.app(app_name)?;
        self.check_unlocked(&app.name)?;
        let env = environment_config(&app, env_name)?.clone();
        let req = DeployRequest {
            app: app_name.to_string(),
            commit: to_commit.to_string(),
            ..Default::default()
        };
        let d = self.start(
            app_name,
            to_commit,
            &req,
            who,
            (DeploymentKind::Rollback, env_name),
        )?;
        let me = self.clone();
        let id = d.deploy_id.clone();
        let env_name = env_name.to_string();
        let to_commit = to_commit.to_string();
        let span = tracing::info_span!("rollback", deploy_id = %id, app = %app.name);
        tokio::spawn(
            async move {
                let params = rollback_params(&app, &env_name, &env, &to_commit, &id);
                let work = async {
                    let (_, detail) = me
                        .run_step(&id, "rollback", &env_name, &env.host, async {
                            let job = me
                                .run_job(
                                    &id,
                                    "rollback",
                                    &env_name,
                                    &env.host,
                                    JobKind::Rollback,
                                    job_spec::Params::Rollback(params),
                                )
                                .await?;
                            let unknown = me.record_release(&id, &job);
                            Ok(((), format!("{}{unknown}", job.detail)))
                        })
                        .await?;
                    Ok(format!("{env_name} on {}: {detail}", env.host))
                };
                me.drive(&id, &app.name, work).await;
            }
            .instrument(span),
        );
        Ok(d)
    }

    /// Records the commit a rollback left live (its job's `ReleaseReport`) as the record's
    /// commit, so "the previous release" is named once known. Returns what to add to the
    /// detail when the agent did not say.
    fn record_release(&self, id: &str, job: &Job) -> String {
        let commit = match finished_result(job) {
            Ok(Some(job_finished::Result::Rollback(r))) if !r.commit.is_empty() => r.commit.clone(),
            Ok(_) => return " (the agent named no live release)".to_string(),
            Err(e) => {
                warn!(deploy_id = id, error = %e, "rollback result unusable");
                return format!(" ({e})");
            }
        };
        if let Some(d) = self.lock().deploys.get_mut(id) {
            d.commit = commit;
        }
        self.touch(id);
        String::new()
    }

    /// Cancels a running deploy or rollback (and its current job), recording who (the
    /// operator's certificate name) and why. Refused once it ended, or while only its report
    /// is still going out.
    pub fn cancel(&self, id: &str, who: &str, reason: &str) -> Result<Deployment, Status> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(Status::invalid_argument(
                "a cancel needs a reason (field `reason`): it goes into the deploy's history",
            ));
        }
        let mut reason = reason.to_string();
        if reason.len() > MAX_CANCEL_REASON {
            let mut end = MAX_CANCEL_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
            reason.push('…');
        }
        let d = self
            .get(id)
            .ok_or_else(|| Status::not_found(format!("no deploy {id:?}")))?;
        if d.state() != DeploymentState::Running {
            return Err(Status::failed_precondition(format!(
                "deploy {id} already ended ({})",
                enum_word(d.state().as_str_name(), "DEPLOYMENT_STATE_")
            )));
        }
        let cancel = self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "deploy {id} has done its work and is sending its report; nothing is left to cancel"
                ))
            })?;
        {
            let mut by = cancel.by.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((earlier, _)) = by.as_ref() {
                return Err(Status::failed_precondition(format!(
                    "deploy {id} is already being cancelled (by {earlier})"
                )));
            }
            *by = Some((who.to_string(), reason.clone()));
        }
        let d = {
            let mut s = self.lock();
            let Some(d) = s.deploys.get_mut(id) else {
                return Err(Status::not_found(format!("no deploy {id:?}")));
            };
            d.cancelled_by = who.to_string();
            d.cancel_reason = reason.clone();
            d.clone()
        };
        self.touch(id);
        info!(deploy_id = id, cancelled_by = who, reason = %reason, "deploy cancel requested");
        for step in d
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Started as i32 && !s.job_id.is_empty())
        {
            let _ = self.jobs.cancel(
                &step.job_id,
                &format!("deploy {id} cancelled by {who}: {reason}"),
            );
        }
        cancel.token.cancel();
        Ok(d)
    }

    /// One deploy.
    pub fn get(&self, id: &str) -> Option<Deployment> {
        self.lock().deploys.get(id).cloned()
    }

    /// Deploys, newest first.
    pub fn list(&self, app: &str, limit: usize) -> Vec<Deployment> {
        let mut out: Vec<Deployment> = self
            .lock()
            .deploys
            .values()
            .filter(|d| app.is_empty() || d.app == app)
            .cloned()
            .collect();
        out.sort_by_key(|d| std::cmp::Reverse(d.started_at.map(|t| (t.seconds, t.nanos))));
        out.truncate(limit);
        out
    }

    /// Every event of deploy `id` from now on, after its steps so far.
    pub fn watch(
        &self,
        id: &str,
    ) -> Result<(Deployment, broadcast::Receiver<DeploymentEvent>), Status> {
        let rx = self.events.subscribe();
        let d = self
            .get(id)
            .ok_or_else(|| Status::not_found(format!("no deploy {id:?}")))?;
        Ok((d, rx))
    }

    /// Takes the deploys changed since the last call, for the flusher.
    pub fn take_dirty(&self) -> Vec<Deployment> {
        let ids = self.dirty.take();
        let s = self.lock();
        ids.iter()
            .filter_map(|id| s.deploys.get(id).cloned())
            .collect()
    }

    /// Puts deploys back after a failed flush.
    pub fn requeue(&self, deploys: &[Deployment]) {
        self.dirty
            .requeue(deploys.iter().map(|d| d.deploy_id.as_str()));
    }
}

fn health_check(h: &config::HealthConfig) -> HealthCheck {
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    HealthCheck {
        http_url: h.url.clone(),
        expect_status: u32::from(h.expect_status),
        interval_ms: ms(h.interval),
        timeout_ms: ms(h.timeout),
        deadline_ms: ms(h.deadline),
        container_health: h.container_health,
    }
}

/// One deploy's run: what every stage of it needs.
#[derive(Clone, Copy)]
struct Run<'a> {
    id: &'a str,
    app: &'a AppConfig,
    commit: &'a str,
    req: &'a DeployRequest,
}

/// One environment's part of a deploy: where the release goes and how much E2E checks it.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    /// `staging` or `production`.
    name: &'static str,
    env: &'a EnvironmentConfig,
    e2e: E2eLevel,
}

/// A stage of a deploy, in the order [`stages`] gives them.
#[derive(Debug)]
enum Stage<'a> {
    /// Bundle, deploy and E2E-check one environment.
    Environment(Target<'a>),
    /// The backup before a `db_change` reaches production.
    Backup,
    /// A fresh isolation check before production (skipped without a gate).
    IsolationCheck,
}

/// A deploy's stages: staging (with the requested E2E level), the backup when the deploy
/// changes the database, the isolation check, then production (smoke checks only).
fn stages<'a>(app: &'a AppConfig, req: &DeployRequest) -> Vec<Stage<'a>> {
    let staging_e2e = if req.e2e == E2eLevel::Standard as i32 {
        E2eLevel::Standard
    } else {
        E2eLevel::Smoke
    };
    let mut stages = vec![Stage::Environment(Target {
        name: "staging",
        env: &app.staging,
        e2e: staging_e2e,
    })];
    if req.db_change {
        stages.push(Stage::Backup);
    }
    stages.push(Stage::IsolationCheck);
    stages.push(Stage::Environment(Target {
        name: "production",
        env: &app.production,
        e2e: E2eLevel::Smoke,
    }));
    stages
}

/// The config of `app`'s environment `name`, for a manual rollback.
fn environment_config<'a>(app: &'a AppConfig, name: &str) -> Result<&'a EnvironmentConfig, Status> {
    match name {
        "staging" => Ok(&app.staging),
        "production" => Ok(&app.production),
        other => Err(Status::invalid_argument(format!(
            "environment {other:?}: expected staging or production"
        ))),
    }
}

/// The deploy job's parameters for one environment; the migration runs only for a db_change.
fn deploy_params(run: &Run<'_>, target: &Target<'_>, bundle: &bundle::Bundle) -> DeployParams {
    let Run {
        id,
        app,
        commit,
        req,
    } = *run;
    let (env_name, env) = (target.name, target.env);
    DeployParams {
        app: app.name.clone(),
        environment: env_name.to_string(),
        commit: commit.to_string(),
        bundle_sha256: bundle.sha256.clone(),
        bundle_size: bundle.size,
        app_dir: env.app_dir.display().to_string(),
        compose_file: app.compose_file.clone(),
        health: Some(health_check(&env.health)),
        keep_releases: app.keep_releases,
        deploy_id: id.to_string(),
        compose_project: format!("{}-{}", app.name, env_name),
        migration: if req.db_change {
            req.migration.clone()
        } else {
            String::new()
        },
        migration_service: app.migration_service.clone(),
        build: true,
        not_secret: env.not_secret.clone(),
        blue_green: blue_green(env),
    }
}

/// A rollback job's parameters: back to `to_commit`, or to the previous release when empty.
fn rollback_params(
    app: &AppConfig,
    env_name: &str,
    env: &EnvironmentConfig,
    to_commit: &str,
    deploy_id: &str,
) -> RollbackParams {
    RollbackParams {
        app: app.name.clone(),
        environment: env_name.to_string(),
        app_dir: env.app_dir.display().to_string(),
        to_commit: to_commit.to_string(),
        compose_file: app.compose_file.clone(),
        health: Some(health_check(&env.health)),
        deploy_id: deploy_id.to_string(),
        compose_project: format!("{}-{}", app.name, env_name),
        not_secret: env.not_secret.clone(),
        blue_green: blue_green(env),
    }
}

/// The slots and proxy of a blue/green environment, as the agent gets them; `None` for
/// `strategy = "recreate"`.
fn blue_green(env: &EnvironmentConfig) -> Option<BlueGreen> {
    if env.strategy != config::Strategy::BlueGreen {
        return None;
    }
    let bg = env.blue_green.as_ref()?;
    Some(BlueGreen {
        blue_port: u32::from(bg.ports[0]),
        green_port: u32::from(bg.ports[1]),
        upstream_file: bg.upstream_file.display().to_string(),
        reload: bg.reload.clone(),
        test: bg.test_command(),
        through_proxy_url: bg.through_proxy_url.clone(),
        drain_ms: u32::try_from(bg.drain.as_millis()).unwrap_or(u32::MAX),
        keep_previous: bg.keep_previous,
    })
}

/// The name of the E2E step at `level`.
fn e2e_step_name(level: E2eLevel) -> &'static str {
    if level == E2eLevel::Standard {
        "e2e-standard"
    } else {
        "e2e-smoke"
    }
}

/// How a job that did not succeed fails its step.
fn job_failure(step: &str, host: &str, job: &Job) -> Failure {
    // The agent rolls a failed deploy back itself and says so in the detail.
    let rolled_back = job.detail.contains("rolled back to");
    Failure {
        detail: format!(
            "{step} on {host} {}: {}",
            enum_word(job.state().as_str_name(), "JOB_STATE_"),
            job.detail
        ),
        rolled_back,
        cancelled: false,
    }
}

/// The backup hook's command line with `{app}`, `{commit}` and `{deploy_id}` filled in.
fn hook_args(hook: &[String], app: &str, commit: &str, deploy_id: &str) -> Vec<String> {
    hook.iter()
        .map(|a| {
            a.replace("{app}", app)
                .replace("{commit}", commit)
                .replace("{deploy_id}", deploy_id)
        })
        .collect()
}

/// What a deploy that went through did: the commit on both environments, and the migration.
fn deployed_detail(run: &Run<'_>) -> String {
    let commit = run.commit.get(..12).unwrap_or(run.commit);
    let migration = if run.req.db_change && !run.req.migration.is_empty() {
        format!(
            "; migration {:?} ran before production's up",
            run.req.migration
        )
    } else {
        String::new()
    };
    format!(
        "deployed {commit} to staging on {} and production on {}{migration}",
        run.app.staging.host, run.app.production.host
    )
}

/// A finished run's state and detail: a cancel wins over a rollback, which wins over a plain
/// failure.
fn final_state(outcome: Result<String, Failure>) -> (DeploymentState, String) {
    match outcome {
        Ok(detail) => (DeploymentState::Succeeded, detail),
        Err(f) if f.cancelled => (DeploymentState::Cancelled, f.detail),
        Err(f) if f.rolled_back => (DeploymentState::RolledBack, f.detail),
        Err(f) => (DeploymentState::Failed, f.detail),
    }
}

/// The `report` step's outcome: succeeded only when every webhook took the report; its
/// detail says what each one did.
fn report_outcome(lines: &[String]) -> Result<((), String), Failure> {
    let detail = lines.join("; ");
    if lines.iter().all(|l| l.contains("delivered (")) {
        Ok(((), detail))
    } else {
        Err(Failure::new(detail))
    }
}

/// Why a deploy that was running when the controller stopped failed: where it stood, and
/// whether production may have been touched.
fn interrupted_detail(d: &Deployment) -> String {
    let at = d
        .steps
        .last()
        .map(|s| {
            format!(
                "{} on {} ({}{})",
                s.name,
                s.host,
                enum_word(
                    StepStatus::try_from(s.status)
                        .unwrap_or(StepStatus::Unspecified)
                        .as_str_name(),
                    "STEP_STATUS_"
                ),
                if s.job_id.is_empty() {
                    String::new()
                } else {
                    format!(", job {}", s.job_id)
                }
            )
        })
        .unwrap_or_else(|| "before its first step".into());
    format!(
        "interrupted by a controller restart at step {at}; the host keeps whatever that step left (see the job) and production was {}",
        if d.steps.iter().any(|s| s.environment == "production") { "possibly touched" } else { "not touched" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::Signer;
    use crate::registry::{Liveness, Registry};
    use crate::store::embedded::EmbeddedStore;
    use config::{E2eCheck, HealthConfig};
    use sentinel_proto::v1::{JobEvent, JobFinished};
    use std::path::Path;
    use std::process::Command;

    fn environment(host: &str, dir: &str) -> EnvironmentConfig {
        EnvironmentConfig {
            host: host.into(),
            app_dir: dir.into(),
            secrets_file: None,
            not_secret: Vec::new(),
            base_url: String::new(),
            health: HealthConfig::default(),
            strategy: config::Strategy::Recreate,
            blue_green: None,
        }
    }

    fn app(repo: &Path) -> AppConfig {
        AppConfig {
            name: "web".into(),
            repo: repo.to_owned(),
            compose_file: "compose.yaml".into(),
            keep_releases: 3,
            migration_service: "api".into(),
            staging: environment("stage-1", "/srv/web-staging"),
            production: environment("prod-1", "/srv/web"),
            e2e: Vec::new(),
        }
    }

    fn request(db_change: bool, e2e: E2eLevel) -> DeployRequest {
        DeployRequest {
            app: "web".into(),
            commit: "HEAD".into(),
            db_change,
            migration: "bin/migrate".into(),
            e2e: e2e as i32,
            ..Default::default()
        }
    }

    fn stage_names(stages: &[Stage<'_>]) -> Vec<String> {
        stages
            .iter()
            .map(|s| match s {
                Stage::Environment(t) => format!("{} ({})", t.name, e2e_step_name(t.e2e)),
                Stage::Backup => "backup".into(),
                Stage::IsolationCheck => "isolation-check".into(),
            })
            .collect()
    }

    /// A git repository with one commit holding a compose file.
    fn repo(dir: &Path) -> PathBuf {
        let repo = dir.join("repo");
        fs_write(&repo.join("compose.yaml"), "services: {}\n");
        for args in [
            &["init", "-q"][..],
            &["add", "compose.yaml"],
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.invalid",
                "commit",
                "-q",
                "-m",
                "first",
            ],
        ] {
            let out = Command::new("git")
                .arg("-C")
                .arg(&repo)
                .args(args)
                .output()
                .expect("run git");
            assert!(out.status.success(), "git {args:?}: {out:?}");
        }
        repo
    }

    fn fs_write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        jobs: Arc<JobQueue>,
        pipeline: Arc<Pipeline>,
    }

    fn fixture_with(app: impl FnOnce(&Path) -> AppConfig, stored: &[Deployment]) -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&tmp.path().join("store.redb")).expect("store");
        store.save_deploys(stored).expect("save deploys");
        let registry = Registry::load(
            &store,
            Liveness {
                heartbeat_interval: Duration::from_secs(10),
                missed_heartbeats_offline: 3,
            },
        )
        .expect("registry");
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let jobs = JobQueue::load(
            &store,
            registry,
            Some(Signer::new(key)),
            Duration::from_secs(60),
        )
        .expect("jobs");
        let app = app(tmp.path());
        let pipeline = Pipeline::load(
            &store,
            &[app],
            PipelineConfig::default(),
            jobs.clone(),
            tmp.path().join("bundles"),
            Duration::from_secs(60),
        )
        .expect("pipeline");
        Fixture {
            _tmp: tmp,
            jobs,
            pipeline,
        }
    }

    fn fixture() -> Fixture {
        fixture_with(|dir| app(&repo(dir)), &[])
    }

    /// Plays the agent of `host`: waits for its next unfinished job and ends it.
    async fn agent_finishes(jobs: &JobQueue, host: &str, state: JobState, detail: &str) -> Job {
        for _ in 0..500 {
            if let Some(job) = jobs
                .list(host, 100)
                .into_iter()
                .find(|j| !crate::jobs::is_final(j.state()))
            {
                jobs.on_event(
                    host,
                    JobEvent {
                        job_id: job.job_id.clone(),
                        seq: 1,
                        at: None,
                        event: Some(job_event::Event::Finished(JobFinished {
                            state: state as i32,
                            detail: detail.into(),
                            ..Default::default()
                        })),
                    },
                );
                return job;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no job reached {host}");
    }

    async fn wait_finished(pipeline: &Pipeline, id: &str) -> Deployment {
        for _ in 0..500 {
            let d = pipeline.get(id).expect("deploy");
            if d.state() != DeploymentState::Running && pipeline.lock().running.is_empty() {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("deploy {id} did not finish");
    }

    fn steps(d: &Deployment) -> Vec<(String, String, StepStatus)> {
        d.steps
            .iter()
            .map(|s| {
                (
                    s.environment.clone(),
                    s.name.clone(),
                    StepStatus::try_from(s.status).unwrap_or(StepStatus::Unspecified),
                )
            })
            .collect()
    }

    fn step(env: &str, name: &str, status: StepStatus) -> (String, String, StepStatus) {
        (env.into(), name.into(), status)
    }

    #[test]
    fn stages_run_staging_then_backup_and_isolation_check_then_production() {
        let app = app(Path::new("/repo"));
        assert_eq!(
            stage_names(&stages(&app, &request(true, E2eLevel::Standard))),
            [
                "staging (e2e-standard)",
                "backup",
                "isolation-check",
                "production (e2e-smoke)"
            ]
        );
        assert_eq!(
            stage_names(&stages(&app, &request(false, E2eLevel::Smoke))),
            [
                "staging (e2e-smoke)",
                "isolation-check",
                "production (e2e-smoke)"
            ]
        );
        // An unset level means smoke; production is only ever smoke-checked.
        assert_eq!(
            stage_names(&stages(&app, &request(false, E2eLevel::Unspecified))),
            [
                "staging (e2e-smoke)",
                "isolation-check",
                "production (e2e-smoke)"
            ]
        );
        let all = stages(&app, &request(true, E2eLevel::Standard));
        let hosts: Vec<&str> = all
            .iter()
            .filter_map(|s| match s {
                Stage::Environment(t) => Some(t.env.host.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(hosts, ["stage-1", "prod-1"]);
    }

    #[test]
    fn deploy_params_carry_the_migration_only_for_a_db_change() {
        let app = app(Path::new("/repo"));
        let bundle = bundle::Bundle {
            sha256: "ab".repeat(32),
            size: 42,
            path: PathBuf::from("/bundles/x"),
        };
        let plain = request(false, E2eLevel::Smoke);
        let run = Run {
            id: "d-1",
            app: &app,
            commit: "c0ffee",
            req: &plain,
        };
        let [Stage::Environment(staging), ..] = stages(&app, &plain)[..] else {
            panic!("staging comes first");
        };
        let params = deploy_params(&run, &staging, &bundle);
        assert_eq!(params.environment, "staging");
        assert_eq!(params.app_dir, "/srv/web-staging");
        assert_eq!(params.compose_project, "web-staging");
        assert_eq!(params.commit, "c0ffee");
        assert_eq!(params.bundle_sha256, bundle.sha256);
        assert_eq!(params.bundle_size, 42);
        assert_eq!(params.keep_releases, 3);
        assert_eq!(params.deploy_id, "d-1");
        assert!(params.build);
        assert_eq!(params.migration, "");

        let db = request(true, E2eLevel::Smoke);
        let run = Run { req: &db, ..run };
        let params = deploy_params(&run, &staging, &bundle);
        assert_eq!(params.migration, "bin/migrate");
        assert_eq!(params.migration_service, "api");
    }

    #[test]
    fn a_blue_green_environment_sends_its_slots_to_the_agent_and_recreate_sends_none() {
        let mut app = app(Path::new("/repo"));
        assert_eq!(
            rollback_params(&app, "production", &app.production, "", "d-1").blue_green,
            None
        );
        app.production.strategy = config::Strategy::BlueGreen;
        app.production.blue_green = Some(config::BlueGreenConfig {
            ports: [8101, 8102],
            upstream_file: "/etc/nginx/sentinel/web.conf".into(),
            reload: vec!["nginx".into(), "-s".into(), "reload".into()],
            test: Vec::new(),
            through_proxy_url: "http://127.0.0.1/health".into(),
            drain: Duration::from_millis(2500),
            keep_previous: false,
        });
        let bg = rollback_params(&app, "production", &app.production, "", "d-1")
            .blue_green
            .expect("blue/green");
        assert_eq!((bg.blue_port, bg.green_port), (8101, 8102));
        assert_eq!(bg.upstream_file, "/etc/nginx/sentinel/web.conf");
        assert_eq!(bg.reload, ["nginx", "-s", "reload"]);
        assert_eq!(bg.test, ["nginx", "-t"], "the default config test");
        assert_eq!(bg.through_proxy_url, "http://127.0.0.1/health");
        assert_eq!(bg.drain_ms, 2500);
        assert!(!bg.keep_previous);
        let req = request(false, E2eLevel::Smoke);
        let run = Run {
            id: "d-1",
            app: &app,
            commit: "c0ffee",
            req: &req,
        };
        let bundle = bundle::Bundle {
            sha256: "ab".repeat(32),
            size: 42,
            path: PathBuf::from("/bundles/x"),
        };
        let stages = stages(&app, &req);
        let Some(Stage::Environment(production)) = stages.last() else {
            panic!("production comes last");
        };
        assert_eq!(
            deploy_params(&run, production, &bundle).blue_green,
            Some(bg)
        );
        let Some(Stage::Environment(staging)) = stages.first() else {
            panic!("staging comes first");
        };
        assert_eq!(deploy_params(&run, staging, &bundle).blue_green, None);
    }

    #[test]
    fn rollbacks_target_the_failed_environment_and_the_previous_release_by_default() {
        let app = app(Path::new("/repo"));
        let after_e2e = rollback_params(&app, "staging", &app.staging, "", "d-1");
        assert_eq!(after_e2e.environment, "staging");
        assert_eq!(after_e2e.app_dir, "/srv/web-staging");
        assert_eq!(after_e2e.to_commit, "", "empty: the previous release");
        assert_eq!(after_e2e.compose_project, "web-staging");
        assert_eq!(after_e2e.deploy_id, "d-1");
        assert_eq!(
            after_e2e.health.expect("health").expect_status,
            u32::from(app.staging.health.expect_status)
        );

        let env = environment_config(&app, "production").expect("production");
        let manual = rollback_params(&app, "production", env, "abc123", "d-2");
        assert_eq!(manual.app_dir, "/srv/web");
        assert_eq!(manual.to_commit, "abc123");
        assert_eq!(manual.compose_project, "web-production");

        let err = environment_config(&app, "qa").expect_err("qa is no environment");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("\"qa\""), "{}", err.message());
    }

    #[test]
    fn a_cancel_outranks_a_rollback_which_outranks_a_failure() {
        let failure = |rolled_back, cancelled| {
            Err(Failure {
                detail: "why".into(),
                rolled_back,
                cancelled,
            })
        };
        assert_eq!(
            final_state(Ok("deployed c0ffee".into())),
            (DeploymentState::Succeeded, "deployed c0ffee".to_string())
        );
        assert_eq!(
            final_state(failure(true, true)).0,
            DeploymentState::Cancelled
        );
        assert_eq!(
            final_state(failure(true, false)),
            (DeploymentState::RolledBack, "why".to_string())
        );
        assert_eq!(
            final_state(failure(false, false)).0,
            DeploymentState::Failed
        );
    }

    #[test]
    fn a_failed_job_names_step_host_and_state_and_notes_the_agents_rollback() {
        let job = |state: JobState, detail: &str| Job {
            state: state as i32,
            detail: detail.into(),
            ..Default::default()
        };
        let f = job_failure(
            "deploy",
            "stage-1",
            &job(JobState::Failed, "health check failed; rolled back to abc"),
        );
        assert_eq!(
            f.detail,
            "deploy on stage-1 failed: health check failed; rolled back to abc"
        );
        assert!(f.rolled_back && !f.cancelled);
        let f = job_failure(
            "rollback",
            "prod-1",
            &job(JobState::TimedOut, "no answer in 60s"),
        );
        assert_eq!(f.detail, "rollback on prod-1 timed_out: no answer in 60s");
        assert!(!f.rolled_back);
    }

    #[test]
    fn the_backup_hook_gets_app_commit_and_deploy_id() {
        let hook = [
            "/bin/backup",
            "--app={app}",
            "{commit}@{deploy_id}",
            "plain",
        ]
        .map(String::from);
        assert_eq!(
            hook_args(&hook, "web", "c0ffee", "d-1"),
            ["/bin/backup", "--app=web", "c0ffee@d-1", "plain"]
        );
    }

    #[test]
    fn the_report_step_succeeds_only_when_every_webhook_took_the_report() {
        let ok = "pm: delivered (200)".to_string();
        let bad = "agent: gave up after 3 attempts".to_string();
        let (_, detail) = report_outcome(&[ok.clone(), ok.clone()]).expect("delivered");
        assert_eq!(detail, format!("{ok}; {ok}"));
        let failure = report_outcome(&[ok.clone(), bad.clone()]).expect_err("one undelivered");
        assert_eq!(failure.detail, format!("{ok}; {bad}"));
    }

    #[test]
    fn a_deploy_running_at_restart_ends_failed_saying_where_it_stood() {
        let running = |id: &str, steps: Vec<DeploymentStep>| Deployment {
            deploy_id: id.into(),
            app: "web".into(),
            state: DeploymentState::Running as i32,
            steps,
            ..Default::default()
        };
        let staging_deploy = DeploymentStep {
            name: "deploy".into(),
            environment: "staging".into(),
            host: "stage-1".into(),
            status: StepStatus::Started as i32,
            job_id: "j-1".into(),
            ..Default::default()
        };
        let production_bundle = DeploymentStep {
            name: "bundle".into(),
            environment: "production".into(),
            host: "prod-1".into(),
            status: StepStatus::Started as i32,
            ..Default::default()
        };
        let done = Deployment {
            deploy_id: "d-done".into(),
            state: DeploymentState::Succeeded as i32,
            detail: "deployed to staging and production".into(),
            ..Default::default()
        };
        let f = fixture_with(
            app,
            &[
                running("d-none", Vec::new()),
                running("d-staging", vec![staging_deploy.clone()]),
                running("d-prod", vec![staging_deploy, production_bundle]),
                done.clone(),
            ],
        );
        let get = |id: &str| f.pipeline.get(id).expect("deploy");
        for id in ["d-none", "d-staging", "d-prod"] {
            assert_eq!(get(id).state(), DeploymentState::Failed, "{id}");
            assert!(get(id).finished_at.is_some(), "{id}");
        }
        assert!(get("d-none")
            .detail
            .contains("at step before its first step"));
        assert!(get("d-none").detail.ends_with("production was not touched"));
        assert!(get("d-staging")
            .detail
            .contains("at step deploy on stage-1 (started, job j-1)"));
        assert!(get("d-staging")
            .detail
            .ends_with("production was not touched"));
        assert!(get("d-prod")
            .detail
            .ends_with("production was possibly touched"));
        assert_eq!(get("d-done"), done);
    }

    #[test]
    fn one_deploy_per_app_at_a_time() {
        let f = fixture();
        let req = request(false, E2eLevel::Smoke);
        let first = f
            .pipeline
            .start("web", "c1", &req, "ada", (DeploymentKind::Deploy, ""))
            .expect("first");
        let err = f
            .pipeline
            .start("web", "c2", &req, "dan", (DeploymentKind::Deploy, ""))
            .expect_err("second deploy of web");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains(&first.deploy_id),
            "{}",
            err.message()
        );
        assert!(err.message().contains("by ada"), "{}", err.message());
        f.pipeline
            .start("api", "c1", &req, "dan", (DeploymentKind::Deploy, ""))
            .expect("another app");
    }

    #[tokio::test]
    async fn unknown_apps_and_environments_and_ended_deploys_are_refused() {
        let f = fixture();
        let err = f
            .pipeline
            .rollback("nope", "staging", "", "ada")
            .await
            .expect_err("unknown app");
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert!(
            err.message().contains("configured apps: web"),
            "{}",
            err.message()
        );
        let err = f
            .pipeline
            .rollback("web", "qa", "", "ada")
            .await
            .expect_err("unknown environment");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(f.pipeline.list("", 10).is_empty(), "nothing was recorded");

        let err = f
            .pipeline
            .submit(
                DeployRequest {
                    commit: String::new(),
                    ..request(false, E2eLevel::Smoke)
                },
                "ada",
            )
            .await
            .expect_err("no commit");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);

        let d = f
            .pipeline
            .rollback("web", "staging", "", "ada")
            .await
            .expect("rollback");
        agent_finishes(&f.jobs, "stage-1", JobState::Succeeded, "rolled back").await;
        let d = wait_finished(&f.pipeline, &d.deploy_id).await;
        assert_eq!(d.state(), DeploymentState::Succeeded);
        assert_eq!(d.kind(), DeploymentKind::Rollback);
        assert_eq!(d.environment, "staging");
        // This agent sent no ReleaseReport: the commit stays "previous", and the detail says so.
        assert_eq!(d.commit, "");
        assert!(
            d.detail
                .starts_with("staging on stage-1: rolled back (job ")
                && d.detail
                    .contains("without its result (JobFinished.rollback)"),
            "{}",
            d.detail
        );
        let err = f
            .pipeline
            .cancel(&d.deploy_id, "ada", "too late")
            .expect_err("already ended");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn a_deploy_goes_to_staging_then_production_and_its_report_says_so() {
        let f = fixture();
        let d = f
            .pipeline
            .submit(request(true, E2eLevel::Smoke), "ada")
            .await
            .expect("submit");
        let staging = agent_finishes(&f.jobs, "stage-1", JobState::Succeeded, "up").await;
        assert_eq!(staging.kind(), JobKind::Deploy);
        assert!(
            f.jobs.list("prod-1", 10).is_empty(),
            "production waits for staging"
        );
        let production = agent_finishes(&f.jobs, "prod-1", JobState::Succeeded, "up").await;
        assert_eq!(production.kind(), JobKind::Deploy);
        assert_eq!(production.requested_by, format!("pipeline:{}", d.deploy_id));

        let d = wait_finished(&f.pipeline, &d.deploy_id).await;
        assert_eq!(d.state(), DeploymentState::Succeeded);
        assert_eq!(
            steps(&d),
            [
                step("staging", "bundle", StepStatus::Succeeded),
                step("staging", "deploy", StepStatus::Succeeded),
                step("production", "backup", StepStatus::Succeeded),
                step("production", "bundle", StepStatus::Succeeded),
                step("production", "deploy", StepStatus::Succeeded),
            ]
        );
        assert!(d.steps[2]
            .detail
            .starts_with("skipped: no [backups] database"));
        assert_eq!(d.steps[1].job_id, staging.job_id);

        let doc = report::document(&d);
        assert_eq!(doc["type"], "deploy_report");
        assert_eq!(doc["deploy_id"], d.deploy_id.as_str());
        assert_eq!(doc["app"], "web");
        assert_eq!(doc["commit"], d.commit.as_str());
        assert_eq!(doc["state"], "succeeded");
        assert_eq!(doc["requested_by"], "ada");
        assert_eq!(doc["db_change"], true);
        assert_eq!(doc["migration"], "bin/migrate");
        assert_eq!(
            doc["detail"],
            format!(
                "deployed {} to staging on stage-1 and production on prod-1; migration \"bin/migrate\" ran before production's up",
                &d.commit[..12]
            )
        );
        assert_eq!(doc["steps"].as_array().expect("steps").len(), 5);
        assert_eq!(doc["steps"][4]["environment"], "production");
        assert_eq!(doc["steps"][4]["host"], "prod-1");
        assert_eq!(doc["steps"][4]["status"], "succeeded");
        assert_eq!(doc["steps"][1]["job_id"], staging.job_id.as_str());
    }

    #[tokio::test]
    async fn a_staging_bundle_failure_never_touches_production() {
        let f = fixture_with(
            |dir| {
                let mut app = app(&repo(dir));
                app.staging.secrets_file = Some(dir.join("missing.env"));
                app
            },
            &[],
        );
        let d = f
            .pipeline
            .submit(request(false, E2eLevel::Smoke), "ada")
            .await
            .expect("submit");
        let d = wait_finished(&f.pipeline, &d.deploy_id).await;
        assert_eq!(d.state(), DeploymentState::Failed);
        assert_eq!(steps(&d), [step("staging", "bundle", StepStatus::Failed)]);
        assert!(d.detail.contains("missing.env"), "{}", d.detail);
        assert!(f.jobs.list("stage-1", 10).is_empty());
        assert!(f.jobs.list("prod-1", 10).is_empty());
    }

    #[tokio::test]
    async fn a_failed_staging_deploy_stops_the_pipeline_and_keeps_the_agents_rollback() {
        let f = fixture();
        let d = f
            .pipeline
            .submit(request(false, E2eLevel::Smoke), "ada")
            .await
            .expect("submit");
        agent_finishes(
            &f.jobs,
            "stage-1",
            JobState::Failed,
            "health check failed; rolled back to abc",
        )
        .await;
        let d = wait_finished(&f.pipeline, &d.deploy_id).await;
        assert_eq!(d.state(), DeploymentState::RolledBack);
        assert_eq!(
            d.detail,
            "deploy on stage-1 failed: health check failed; rolled back to abc"
        );
        assert_eq!(
            steps(&d),
            [
                step("staging", "bundle", StepStatus::Succeeded),
                step("staging", "deploy", StepStatus::Failed),
            ]
        );
        assert!(f.jobs.list("prod-1", 10).is_empty());
    }

    #[tokio::test]
    async fn a_staging_e2e_failure_rolls_staging_back_and_never_touches_production() {
        let f = fixture_with(
            |dir| {
                let mut app = app(&repo(dir));
                // Nothing listens on the discard port: the check fails.
                app.staging.base_url = "http://127.0.0.1:9".into();
                app.e2e = vec![E2eCheck {
                    name: "home".into(),
                    path: "/".into(),
                    expect_status: 200,
                    expect_body: String::new(),
                    smoke: true,
                    timeout: Duration::from_secs(2),
                }];
                app
            },
            &[],
        );
        let d = f
            .pipeline
            .submit(request(false, E2eLevel::Smoke), "ada")
            .await
            .expect("submit");
        agent_finishes(&f.jobs, "stage-1", JobState::Succeeded, "up").await;
        let rollback = agent_finishes(&f.jobs, "stage-1", JobState::Succeeded, "back").await;
        assert_eq!(rollback.kind(), JobKind::Rollback);
        let d = wait_finished(&f.pipeline, &d.deploy_id).await;
        assert_eq!(d.state(), DeploymentState::RolledBack);
        assert!(
            d.detail.starts_with("E2E failed on staging: home: "),
            "{}",
            d.detail
        );
        assert!(
            d.detail
                .ends_with("; staging rolled back to its previous release"),
            "{}",
            d.detail
        );
        assert_eq!(
            steps(&d),
            [
                step("staging", "bundle", StepStatus::Succeeded),
                step("staging", "deploy", StepStatus::Succeeded),
                step("staging", "e2e-smoke", StepStatus::Failed),
                step("staging", "rollback", StepStatus::Succeeded),
            ]
        );
        assert!(f.jobs.list("prod-1", 10).is_empty());
    }
}
