//! Backups on the controller: the schedules (nightly backup, daily verify, monthly restore
//! test, as cron expressions in a time zone), the jobs they and operators start on the backup
//! host, what those jobs reported (kept in the store), the operator's view (`ListBackups`),
//! the pre-production backup of a `db_change` deploy, and the age of each database's newest
//! good backup for the metrics.
//!
//! The agent does the work and is the security boundary (the agent's `jobs::backup`); the
//! controller only decides when, and remembers what happened (the typed results of the jobs:
//! a finished job without its result, or with one it cannot read, is an error recorded for
//! the series the job covered and logged once, never a silent "no report"). Runs of one kind never overlap:
//! a run starts only when the previous one's jobs have all ended (a scheduled occurrence that
//! finds one still going is skipped and says so; an operator is told which job is running).

pub mod config;
pub mod schedule;
pub mod series;
pub mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use sentinel_proto::kinds::kind_name;
use sentinel_proto::results::finished_result;
use sentinel_proto::time::from_jiff;
use sentinel_proto::v1::{
    job_event, job_finished, job_spec, BackupDatabase, BackupParams, BackupSchedule, Job, JobKind,
    JobState, ListBackupsResponse, RestoreCheck, RestoreTestParams, RetentionPolicy,
    VerifyBackupsParams,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn, Instrument};

use crate::jobs::{is_final, JobQueue, NewJob};
use crate::store::{Store, StoreError};
pub use config::BackupsConfig;
use schedule::{OnStart, Schedule};
use series::{Kind, Series};
use state::State;

/// Run kinds, named as their schedules.
pub const BACKUP: &str = "backup";
/// Verify runs.
pub const VERIFY: &str = "verify";
/// Restore-test runs.
pub const RESTORE_TEST: &str = "restore_test";

/// Why a run did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The previous run of that kind is still going.
    #[error("a {kind} run is already in progress (job {jobs}); runs of one kind never overlap")]
    Busy {
        /// The kind.
        kind: &'static str,
        /// Its jobs.
        jobs: String,
    },
    /// It could not be submitted (no signing key, nothing configured...).
    #[error("{0}")]
    Refused(String),
}

impl From<StartError> for Status {
    fn from(e: StartError) -> Self {
        Status::failed_precondition(e.to_string())
    }
}

/// A started run: its first job, and a handle that ends with the run's outcome.
pub type Started = (Job, JoinHandle<String>);

fn kind_of(kind: JobKind) -> Option<&'static str> {
    match kind {
        JobKind::Backup => Some(BACKUP),
        JobKind::VerifyBackups => Some(VERIFY),
        JobKind::RestoreTest => Some(RESTORE_TEST),
        _ => None,
    }
}

/// The controller's backups.
pub struct Backups {
    /// Replaced whole by [`Backups::reload`]; a run in progress keeps the copy it started with.
    config: std::sync::RwLock<Arc<BackupsConfig>>,
    jobs: Arc<JobQueue>,
    store: Arc<dyn Store>,
    /// The config's schedules, parsed.
    schedules: Mutex<Vec<Schedule>>,
    /// Stops the running schedule tasks (a reload starts new ones).
    schedule_tasks: Mutex<Option<CancellationToken>>,
    /// The controller's shutdown, parent of the schedules' token.
    shutdown: Mutex<Option<CancellationToken>>,
    state: Mutex<State>,
    /// Run kind -> the jobs of its run in flight.
    running: Mutex<HashMap<&'static str, Vec<String>>>,
    /// Job id -> the series it was meant to cover (jobs started here).
    covered: Mutex<HashMap<String, Vec<Series>>>,
    /// Jobs whose result is already in the state, and what was wrong with it (None: nothing).
    applied: Mutex<HashMap<String, Option<String>>>,
    /// Keeps store writes in order.
    persisting: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Backups {
    /// Loads what the store remembers. The config was validated with the rest of the file.
    pub fn load(
        config: BackupsConfig,
        jobs: Arc<JobQueue>,
        store: Arc<dyn Store>,
    ) -> Result<Arc<Self>, StoreError> {
        let (state, bad) = State::from_records(store.load_backup_records()?);
        for key in bad {
            warn!(key, "unreadable backup record ignored");
        }
        let backups = Arc::new(Self {
            config: std::sync::RwLock::new(Arc::new(config)),
            jobs,
            store,
            schedules: Mutex::new(Vec::new()),
            schedule_tasks: Mutex::new(None),
            shutdown: Mutex::new(None),
            state: Mutex::new(state),
            running: Mutex::new(HashMap::new()),
            covered: Mutex::new(HashMap::new()),
            applied: Mutex::new(HashMap::new()),
            persisting: tokio::sync::Mutex::new(()),
        });
        backups.parse_schedules();
        backups.publish_metrics();
        Ok(backups)
    }

    /// Hands each configured database's newest good backup, last verify and last restore
    /// test to the metrics endpoint.
    fn publish_metrics(&self) {
        let metrics = crate::metrics::get();
        let st = lock(&self.state);
        for series in self
            .configured_series()
            .iter()
            .filter(|s| s.kind == Kind::Database)
        {
            let Some(s) = st.series.get(series) else {
                continue;
            };
            let (env, db) = (series.environment.as_str(), series.database.as_str());
            if let Some(newest) = s.newest_good() {
                metrics.set_newest_good_backup(env, db, newest.taken_at.into());
            }
            if s.last_verify_at.is_some() {
                metrics.set_backup_verify(env, db, s.last_verify_ok);
            }
            if let Some(at) = s.last_restore_at {
                metrics.set_restore_test(env, db, s.last_restore_ok, at.into());
            }
        }
    }

    /// The backup host.
    pub fn host(&self) -> String {
        self.config().host.clone()
    }

    /// The `[backups]` settings in force now.
    fn config(&self) -> Arc<BackupsConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts the schedules and the task that records job results. Runs left going by a
    /// previous controller are waited for, so a new run of their kind does not overlap them.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        let mut adopted: HashMap<&'static str, Vec<String>> = HashMap::new();
        for job in self.jobs.list("", usize::MAX) {
            if let (Some(kind), false) = (kind_of(job.kind()), is_final(job.state())) {
                adopted.entry(kind).or_default().push(job.job_id);
            }
        }
        for (kind, ids) in adopted {
            info!(kind, jobs = ?ids, "waiting for the backup jobs a previous controller started");
            lock(&self.running).insert(kind, ids.clone());
            drop(self.watch(kind, ids));
        }
        let me = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(
            async move { me.record_results(stop).await }
                .instrument(tracing::info_span!("backup_results")),
        );
        *lock(&self.shutdown) = Some(shutdown);
        self.start_schedules();
    }

    /// Starts one task per schedule of the config in force, stopping those of an earlier one.
    fn start_schedules(self: &Arc<Self>) {
        let Some(shutdown) = lock(&self.shutdown).clone() else {
            return;
        };
        let stop = shutdown.child_token();
        if let Some(old) = lock(&self.schedule_tasks).replace(stop.clone()) {
            old.cancel();
        }
        for schedule in lock(&self.schedules).clone() {
            let me = self.clone();
            let stop = stop.clone();
            let span = tracing::info_span!("backup_schedule", schedule = schedule.name);
            tokio::spawn(async move { me.run_schedule(schedule, stop).await }.instrument(span));
        }
    }

    /// Parses the schedules of the config in force.
    fn parse_schedules(&self) {
        let config = self.config();
        let mut parsed = Vec::new();
        for (name, expr) in config.schedule.entries() {
            match Schedule::parse(name, expr, &config.time_zone) {
                Ok(s) => parsed.push(s),
                Err(e) => warn!(schedule = name, error = %e, "schedule ignored"),
            }
        }
        *lock(&self.schedules) = parsed;
    }

    /// Puts new `[backups]` settings in force (SIGHUP): runs in flight finish as they
    /// started; the schedules restart on the new times, treated as at a controller start (a
    /// run the new times say was missed since the last one runs now).
    pub fn reload(self: &Arc<Self>, config: BackupsConfig) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        self.parse_schedules();
        self.publish_metrics();
        self.start_schedules();
    }

    fn retention(&self, simulated_now: Option<prost_types::Timestamp>) -> RetentionPolicy {
        RetentionPolicy {
            daily: self.config().retention.daily,
            weekly: self.config().retention.weekly,
            minimum: self.config().retention.minimum,
            simulated_now,
            time_zone: self.config().time_zone.clone(),
        }
    }

    fn databases(&self, filter: impl Fn(&config::DatabaseConfig) -> bool) -> Vec<BackupDatabase> {
        self.config()
            .databases
            .iter()
            .filter(|d| filter(d))
            .map(|d| BackupDatabase {
                environment: d.environment.clone(),
                database: d.database.clone(),
                dsn_ref: d.dsn_ref.clone(),
            })
            .collect()
    }

    fn files_host(&self) -> String {
        let config = self.config();
        config
            .files_host
            .clone()
            .unwrap_or_else(|| config.host.clone())
    }

    /// Every series the config asks for, in config order.
    pub fn configured_series(&self) -> Vec<Series> {
        let mut out: Vec<Series> = self
            .config()
            .databases
            .iter()
            .map(|d| Series {
                kind: Kind::Database,
                environment: d.environment.clone(),
                database: d.database.clone(),
            })
            .collect();
        if !self.config().globals_dsn_ref.is_empty() {
            out.push(Series {
                kind: Kind::Globals,
                environment: String::new(),
                database: self.config().globals_dsn_ref.clone(),
            });
        }
        if !self.config().file_paths.is_empty() {
            out.push(Series {
                kind: Kind::Files,
                environment: String::new(),
                database: "files".into(),
            });
        }
        out
    }

    /// Claims `kind` for a new run.
    fn begin(&self, kind: &'static str) -> Result<(), StartError> {
        let mut running = lock(&self.running);
        if let Some(ids) = running.get(kind) {
            return Err(StartError::Busy {
                kind,
                jobs: ids.join(", "),
            });
        }
        running.insert(kind, Vec::new());
        Ok(())
    }

    fn submit(
        &self,
        kind: &'static str,
        host: &str,
        params: job_spec::Params,
        who: &str,
        covered: Vec<Series>,
    ) -> Result<Job, StartError> {
        let job_kind = match &params {
            job_spec::Params::Backup(_) => JobKind::Backup,
            job_spec::Params::VerifyBackups(_) => JobKind::VerifyBackups,
            _ => JobKind::RestoreTest,
        };
        let job = self
            .jobs
            .submit(NewJob {
                target: host.to_string(),
                kind: job_kind,
                params,
                ttl: self.config().job_ttl,
                requested_by: who.to_string(),
            })
            .map_err(|s| StartError::Refused(s.message().to_string()))?;
        lock(&self.covered).insert(job.job_id.clone(), covered);
        if let Some(ids) = lock(&self.running).get_mut(kind) {
            ids.push(job.job_id.clone());
        }
        info!(kind, job_id = %job.job_id, host, requested_by = who, "backup run started");
        Ok(job)
    }

    /// Waits for a run's jobs, records their results, frees the kind; ends with the outcome.
    fn watch(self: &Arc<Self>, kind: &'static str, ids: Vec<String>) -> JoinHandle<String> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for id in &ids {
                match me.jobs.wait_final(id).await {
                    Some(job) => {
                        let problem = me.apply(&job).await;
                        let state = sentinel_daemon::metrics::enum_word(
                            job.state().as_str_name(),
                            "JOB_STATE_",
                        );
                        let mut outcome = if job.state() == JobState::Succeeded {
                            state
                        } else {
                            format!("{state}: {}", job.detail)
                        };
                        if let Some(problem) = problem {
                            outcome.push_str(&format!("; {problem}"));
                        }
                        outcomes.push(outcome);
                    }
                    None => outcomes.push(format!("job {id} vanished")),
                }
            }
            lock(&me.running).remove(kind);
            outcomes.join("; ")
        })
    }

    /// Starts a backup of everything configured. `simulated_now` is for test fleets (the agent
    /// refuses it unless its config allows a simulated clock).
    pub fn start_backup(
        self: &Arc<Self>,
        reason: &str,
        who: &str,
        simulated_now: Option<prost_types::Timestamp>,
    ) -> Result<Started, StartError> {
        self.begin(BACKUP)?;
        let result = (|| {
            let separate_files =
                self.files_host() != self.config().host && !self.config().file_paths.is_empty();
            let file_paths: Vec<String> = self
                .config()
                .file_paths
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let base = BackupParams {
                databases: Vec::new(),
                file_paths: Vec::new(),
                backup_dir: self.config().backup_dir.display().to_string(),
                retention: Some(self.retention(simulated_now)),
                offsite_target: self.config().offsite_target.clone(),
                reason: reason.to_string(),
                globals_dsn_ref: String::new(),
            };
            let main = BackupParams {
                databases: self.databases(|_| true),
                file_paths: if separate_files {
                    Vec::new()
                } else {
                    file_paths.clone()
                },
                globals_dsn_ref: self.config().globals_dsn_ref.clone(),
                ..base.clone()
            };
            let covered: Vec<Series> = self
                .configured_series()
                .into_iter()
                .filter(|s| !(separate_files && s.kind == Kind::Files))
                .collect();
            let job = self.submit(
                BACKUP,
                &self.config().host,
                job_spec::Params::Backup(main),
                who,
                covered,
            )?;
            let mut ids = vec![job.job_id.clone()];
            if separate_files {
                let files = BackupParams { file_paths, ..base };
                let covered = vec![Series {
                    kind: Kind::Files,
                    environment: String::new(),
                    database: "files".into(),
                }];
                match self.submit(
                    BACKUP,
                    &self.files_host(),
                    job_spec::Params::Backup(files),
                    who,
                    covered,
                ) {
                    Ok(j) => ids.push(j.job_id),
                    Err(e) => warn!(error = %e, "the files backup could not start"),
                }
            }
            Ok((job, ids))
        })();
        self.started(BACKUP, result)
    }

    /// Starts a verify of every retained backup.
    pub fn start_verify(self: &Arc<Self>, who: &str) -> Result<Started, StartError> {
        self.begin(VERIFY)?;
        let result = (|| {
            let params = VerifyBackupsParams {
                backup_dir: self.config().backup_dir.display().to_string(),
            };
            let covered = self.configured_series();
            let job = self.submit(
                VERIFY,
                &self.config().host,
                job_spec::Params::VerifyBackups(params),
                who,
                covered,
            )?;
            let ids = vec![job.job_id.clone()];
            Ok((job, ids))
        })();
        self.started(VERIFY, result)
    }

    /// Starts a restore test of the newest good backup of every configured database.
    pub fn start_restore_test(self: &Arc<Self>, who: &str) -> Result<Started, StartError> {
        if self.config().restore_test.cluster_dsn_ref.is_empty() {
            return Err(StartError::Refused(
                "no restore test cluster: set [backups.restore_test] cluster_dsn_ref".into(),
            ));
        }
        self.begin(RESTORE_TEST)?;
        let result = (|| {
            let databases = self.databases(|_| true);
            let checks = self
                .config()
                .databases
                .iter()
                .flat_map(|d| {
                    d.invariants.iter().map(|sql| RestoreCheck {
                        environment: d.environment.clone(),
                        database: d.database.clone(),
                        sql: sql.clone(),
                    })
                })
                .collect();
            let params = RestoreTestParams {
                backup_dir: self.config().backup_dir.display().to_string(),
                test_cluster_dsn_ref: self.config().restore_test.cluster_dsn_ref.clone(),
                invariants: self.config().restore_test.invariants.clone(),
                checks,
                databases,
            };
            let covered = self
                .configured_series()
                .into_iter()
                .filter(|s| s.kind == Kind::Database)
                .collect();
            let job = self.submit(
                RESTORE_TEST,
                &self.config().host,
                job_spec::Params::RestoreTest(params),
                who,
                covered,
            )?;
            let ids = vec![job.job_id.clone()];
            Ok((job, ids))
        })();
        self.started(RESTORE_TEST, result)
    }

    fn started(
        self: &Arc<Self>,
        kind: &'static str,
        result: Result<(Job, Vec<String>), StartError>,
    ) -> Result<Started, StartError> {
        match result {
            Ok((job, ids)) => Ok((job, self.watch(kind, ids))),
            Err(e) => {
                lock(&self.running).remove(kind);
                Err(e)
            }
        }
    }

    /// Records the result of a finished backup, verify or restore-test job (once per job).
    /// Returns what was wrong with its result, if anything (the same every time it is asked;
    /// logged the first time): a job that ran without a result of its kind, or with one that
    /// does not convert, counts as a failure of every series it covered, with the error as
    /// the detail the operator reads in `ListBackups`.
    async fn apply(&self, job: &Job) -> Option<String> {
        let kind = kind_of(job.kind())?;
        if !is_final(job.state()) {
            return None;
        }
        // Held until the result is in the state: the results task and a run's watcher may
        // apply the same job at once, and both must get its problem.
        let problem = {
            let mut applied_jobs = lock(&self.applied);
            if let Some(problem) = applied_jobs.get(&job.job_id) {
                return problem.clone();
            }
            let problem = self.record(kind, job);
            applied_jobs.insert(job.job_id.clone(), problem.clone());
            problem
        };
        match &problem {
            None => {
                info!(kind, job_id = %job.job_id, state = job.state().as_str_name(), "backup job result recorded")
            }
            Some(p) => {
                warn!(kind, job_id = %job.job_id, state = job.state().as_str_name(), error = %p, "backup job result unusable; its series are marked failed")
            }
        }
        self.publish_metrics();
        self.persist().await;
        problem
    }

    /// Puts a finished job's result (or what is wrong with it) in the state; returns the
    /// problem, if any.
    fn record(&self, kind: &'static str, job: &Job) -> Option<String> {
        let covered = lock(&self.covered).remove(&job.job_id).unwrap_or_default();
        let ok = job.state() == JobState::Succeeded;
        let now = Timestamp::now();
        {
            let mut st = lock(&self.state);
            let applied = match finished_result(job) {
                // It names the job and its kind.
                Err(e) => Err(e.to_string()),
                Ok(result) => match result {
                    Some(job_finished::Result::Backup(r)) => {
                        st.apply_backup(Some(r), ok, &job.detail, &covered, now)
                    }
                    Some(job_finished::Result::Verify(r)) => {
                        st.apply_verify(Some(r), ok, &job.detail, &covered, now)
                    }
                    Some(job_finished::Result::RestoreTest(r)) => {
                        st.apply_restore(Some(r), ok, &job.detail, &covered, now)
                    }
                    // finished_result checked the kind: only "none to expect" gets here.
                    _ => apply_none(&mut st, kind, ok, &job.detail, &covered, now),
                }
                .map_err(|e| {
                    format!(
                        "job {} ({}) carried a result that cannot be read: {e}; the agent may \
                         run another version than the controller (run the same version on \
                         both)",
                        job.job_id,
                        kind_name(job.kind())
                    )
                }),
            };
            match applied {
                Ok(()) => None,
                Err(problem) => {
                    let detail = if job.detail.is_empty() {
                        problem.clone()
                    } else {
                        format!("{problem} (the job said: {})", job.detail)
                    };
                    let _ = apply_none(&mut st, kind, false, &detail, &covered, now);
                    Some(problem)
                }
            }
        }
    }

    /// Writes the state to the store (small: one record per series and schedule).
    async fn persist(&self) {
        let _order = self.persisting.lock().await;
        let records = lock(&self.state).records();
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.save_backup_records(&records)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "saving backup state failed; kept in memory"),
            Err(e) => warn!(error = %e, "backup state task failed"),
        }
    }

    /// Records every backup-kind job that ends, whoever started it (the deploy pipeline's
    /// pre-production backups too).
    async fn record_results(self: Arc<Self>, shutdown: CancellationToken) {
        let mut rx = self.jobs.subscribe();
        loop {
            let event = tokio::select! {
                e = rx.recv() => e,
                _ = shutdown.cancelled() => return,
            };
            match event {
                Ok(ev) => {
                    if matches!(
                        ev.event,
                        Some(job_event::Event::Finished(_)) | Some(job_event::Event::Refused(_))
                    ) {
                        if let Some(job) = self.jobs.get(&ev.job_id) {
                            self.apply(&job).await;
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(skipped = n, "job events skipped; results of jobs started elsewhere may be missed until the next run");
                }
                Err(_) => return,
            }
        }
    }

    /// Where schedule `name` counts from: its last run, else when it started counting.
    fn since(&self, name: &str) -> Option<Timestamp> {
        lock(&self.state)
            .schedules
            .get(name)
            .and_then(|s| s.since())
    }

    async fn set_schedule(&self, name: &str, f: impl FnOnce(&mut state::ScheduleState)) {
        {
            let mut st = lock(&self.state);
            f(st.schedules.entry(name.to_string()).or_default());
        }
        self.persist().await;
    }

    async fn run_schedule(self: Arc<Self>, schedule: Schedule, shutdown: CancellationToken) {
        let now = Timestamp::now();
        match schedule.on_start(self.since(schedule.name), now) {
            OnStart::Baseline => {
                info!(cron = %schedule.expr, tz = %schedule.time_zone, "schedule starts counting now");
                // Not a run: LAST RUN stays empty until one happens.
                self.set_schedule(schedule.name, |s| {
                    s.counting_since = Some(now);
                    s.last_outcome = state::NOT_RUN_YET.into();
                })
                .await;
            }
            OnStart::UpToDate => {}
            OnStart::RunMissed(occurrence) => {
                warn!(missed = %schedule.local(occurrence), "a scheduled run was missed while the controller was down; running it now");
                self.fire(&schedule, occurrence, true).await;
            }
        }
        loop {
            let last = self.since(schedule.name).unwrap_or_else(Timestamp::now);
            let Some(next) = schedule.next_after(last) else {
                warn!(cron = %schedule.expr, "schedule has no next occurrence; stopping it");
                return;
            };
            // Sleeps in slices: wall-clock time can jump (suspend, NTP), tokio's clock does not.
            loop {
                let now = Timestamp::now();
                if now >= next {
                    break;
                }
                let wait = next.duration_since(now).as_secs_f64().clamp(0.01, 30.0);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs_f64(wait)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            let occurrence = schedule
                .latest_at_or_before(Timestamp::now())
                .unwrap_or(next);
            self.fire(&schedule, occurrence, false).await;
        }
    }

    /// Runs one occurrence of a schedule (or records why it was skipped).
    async fn fire(self: &Arc<Self>, schedule: &Schedule, occurrence: Timestamp, missed: bool) {
        let when = schedule.local(occurrence);
        let who = format!(
            "schedule:{} ({when}{})",
            schedule.name,
            if missed {
                ", missed while the controller was down"
            } else {
                ""
            }
        );
        let started = match schedule.name {
            BACKUP => self.start_backup(&format!("nightly ({when})"), &who, None),
            VERIFY => self.start_verify(&who),
            _ => self.start_restore_test(&who),
        };
        let name = schedule.name;
        match started {
            Ok((job, handle)) => {
                let job_id = job.job_id.clone();
                self.set_schedule(name, |s| {
                    s.last_run_at = Some(occurrence);
                    s.last_job_id = job_id.clone();
                    s.last_outcome = "running".into();
                })
                .await;
                let me = self.clone();
                tokio::spawn(
                    async move {
                        let outcome = handle
                            .await
                            .unwrap_or_else(|e| format!("watcher failed: {e}"));
                        info!(job_id = %job_id, outcome = %outcome, "scheduled run ended");
                        me.set_schedule(name, |s| {
                            if s.last_job_id == job_id {
                                s.last_outcome = outcome;
                            }
                        })
                        .await;
                    }
                    .in_current_span(),
                );
            }
            Err(e) => {
                warn!(error = %e, occurrence = %when, "scheduled run skipped");
                self.set_schedule(name, |s| {
                    s.last_run_at = Some(occurrence);
                    s.last_outcome = format!("skipped: {e}");
                })
                .await;
            }
        }
    }

    /// The operator's view: every configured series (and any other the backup host still
    /// holds), the schedules and the offsite backlog.
    pub fn list(&self) -> ListBackupsResponse {
        let now = Timestamp::now();
        let st = lock(&self.state);
        let mut series = self.configured_series();
        for (s, v) in &st.series {
            if !series.contains(s) && !v.kept.is_empty() {
                series.push(s.clone());
            }
        }
        let running = lock(&self.running);
        let schedules = lock(&self.schedules)
            .iter()
            .map(|s| {
                let saved = st.schedules.get(s.name).cloned().unwrap_or_default();
                BackupSchedule {
                    name: s.name.to_string(),
                    cron: s.expr.clone(),
                    time_zone: s.time_zone.clone(),
                    last_run_at: saved.last_run_at.map(from_jiff),
                    next_run_at: s
                        .next_after(saved.since().unwrap_or(now).max(now))
                        .map(from_jiff),
                    running: running.contains_key(s.name),
                    last_job_id: saved.last_job_id,
                    last_outcome: saved.last_outcome,
                }
            })
            .collect();
        ListBackupsResponse {
            databases: series.iter().map(|s| st.summary(s, now)).collect(),
            host: self.config().host.clone(),
            schedules,
            offsite_pending: st.offsite.pending.len() as u32,
            offsite_error: st.offsite.error.clone().unwrap_or_default(),
        }
    }

    /// Seconds since the newest good backup of each configured database, as (environment,
    /// database, age); `f64::INFINITY` for a database that has none. For the metrics endpoint
    /// (`sentinel_backup_newest_good_age_seconds`).
    pub fn newest_good_ages(&self) -> Vec<(String, String, f64)> {
        let now = Timestamp::now();
        let st = lock(&self.state);
        self.configured_series()
            .into_iter()
            .filter(|s| s.kind == Kind::Database)
            .map(|s| {
                let age = st
                    .series
                    .get(&s)
                    .and_then(|v| v.newest_good())
                    .map(|i| now.duration_since(i.taken_at).as_secs_f64().max(0.0))
                    .unwrap_or(f64::INFINITY);
                (s.environment, s.database, age)
            })
            .collect()
    }
}

/// Records a job of run kind `kind` that left no report: every series it covered gets
/// `detail` (a failure unless `ok`).
fn apply_none(
    st: &mut State,
    kind: &str,
    ok: bool,
    detail: &str,
    covered: &[Series],
    now: Timestamp,
) -> Result<(), String> {
    match kind {
        BACKUP => st.apply_backup(None, ok, detail, covered, now),
        VERIFY => st.apply_verify(None, ok, detail, covered, now),
        _ => st.apply_restore(None, ok, detail, covered, now),
    }
}

impl crate::pipeline::PreDeployBackup for Backups {
    fn pre_deploy(
        &self,
        app: &str,
        deploy_id: &str,
        commit: &str,
    ) -> Option<(String, BackupParams)> {
        let databases =
            self.databases(|d| d.environment == "production" && d.app.as_deref() == Some(app));
        if databases.is_empty() {
            return None;
        }
        Some((
            self.config().host.clone(),
            BackupParams {
                databases,
                file_paths: Vec::new(),
                backup_dir: self.config().backup_dir.display().to_string(),
                retention: Some(self.retention(None)),
                offsite_target: self.config().offsite_target.clone(),
                reason: format!("before deploy {deploy_id} of {app} at {commit}"),
                globals_dsn_ref: String::new(),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Liveness, Registry};
    use crate::store::embedded::EmbeddedStore;

    fn backups(dir: &std::path::Path) -> Arc<Backups> {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("s.redb")).unwrap());
        let registry = Registry::load(
            store.as_ref(),
            Liveness {
                heartbeat_interval: Duration::from_secs(10),
                missed_heartbeats_offline: 3,
            },
        )
        .unwrap();
        let jobs = JobQueue::load(store.as_ref(), registry, None, Duration::from_secs(60)).unwrap();
        let config: BackupsConfig = sentinel_daemon::config::parse_toml(
            std::path::Path::new("s.toml"),
            "host = \"argus\"\nbackup_dir = \"/var/backups/s\"\n[[databases]]\nenvironment = \"production\"\ndatabase = \"auth\"\ndsn_ref = \"ro\"\napp = \"auth\"\n",
        )
        .unwrap();
        Backups::load(config, jobs, store).unwrap()
    }

    #[test]
    fn runs_of_one_kind_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let b = backups(dir.path());
        b.begin(BACKUP).unwrap();
        let busy = b.begin(BACKUP).unwrap_err().to_string();
        assert!(busy.contains("already in progress"), "{busy}");
        // Other kinds are independent.
        b.begin(VERIFY).unwrap();
        lock(&b.running).clear();
        // A run that cannot start (no signing key here) frees its kind again.
        let refused = b.start_backup("test", "me", None).unwrap_err();
        assert!(matches!(refused, StartError::Refused(_)), "{refused}");
        b.begin(BACKUP).unwrap();
    }

    #[test]
    fn a_db_change_deploy_backs_up_only_that_apps_production_databases() {
        use crate::pipeline::PreDeployBackup;
        let dir = tempfile::tempdir().unwrap();
        let b = backups(dir.path());
        let (host, params) = b.pre_deploy("auth", "d-1", "abc").unwrap();
        assert_eq!(host, "argus");
        assert_eq!(params.databases.len(), 1);
        assert!(params.reason.contains("d-1"));
        assert!(params.file_paths.is_empty() && params.globals_dsn_ref.is_empty());
        assert!(b.pre_deploy("pulse", "d-2", "abc").is_none());
        let ages = b.newest_good_ages();
        assert_eq!(
            ages,
            vec![("production".to_string(), "auth".to_string(), f64::INFINITY)]
        );
    }

    fn finished_backup(id: &str, result: Option<job_finished::Result>) -> Job {
        use sentinel_proto::v1::{JobEvent, JobFinished};
        Job {
            job_id: id.into(),
            kind: JobKind::Backup as i32,
            state: JobState::Succeeded as i32,
            detail: "run 20260409T020000Z: backed up 1 of 1".into(),
            events: vec![JobEvent {
                event: Some(job_event::Event::Finished(JobFinished {
                    state: JobState::Succeeded as i32,
                    detail: String::new(),
                    result,
                })),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Applies `job` as a job started here for every configured series; returns the problem
    /// and what ListBackups then says of production/auth.
    async fn apply_started_here(b: &Backups, job: &Job) -> (Option<String>, String) {
        lock(&b.covered).insert(job.job_id.clone(), b.configured_series());
        let problem = b.apply(job).await;
        // Asked again (the watcher after the results task): the same answer.
        assert_eq!(b.apply(job).await, problem);
        let auth = b.list().databases.remove(0);
        assert_eq!(auth.database, "auth");
        (problem, auth.last_error)
    }

    #[tokio::test]
    async fn a_finished_backup_job_without_a_result_is_an_error_naming_the_job_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let b = backups(dir.path());
        let (problem, shown) = apply_started_here(&b, &finished_backup("j-1", None)).await;
        let problem = problem.expect("a problem");
        assert!(
            problem.contains("job j-1 (backup) succeeded without its result"),
            "{problem}"
        );
        assert!(shown.contains(&problem), "{shown}");
        assert!(
            shown.contains("the job said: run 20260409T020000Z"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn a_finished_backup_job_with_a_result_of_another_kind_is_an_error_naming_both() {
        use sentinel_proto::v1::ProbeReport;
        let dir = tempfile::tempdir().unwrap();
        let b = backups(dir.path());
        let probe = job_finished::Result::IsolationProbe(ProbeReport::default());
        let (problem, shown) = apply_started_here(&b, &finished_backup("j-2", Some(probe))).await;
        let problem = problem.expect("a problem");
        assert!(
            problem.contains(
                "job j-2 (backup) carried a result of kind isolation_probe where its own \
                 (backup) belongs"
            ),
            "{problem}"
        );
        assert!(shown.contains(&problem), "{shown}");
    }

    #[tokio::test]
    async fn a_backup_result_that_does_not_convert_is_an_error_naming_the_job() {
        use sentinel_proto::v1::{BackupFailure, BackupReport, BackupSeries};
        let dir = tempfile::tempdir().unwrap();
        let b = backups(dir.path());
        let report = job_finished::Result::Backup(BackupReport {
            failures: vec![BackupFailure {
                series: Some(BackupSeries {
                    kind: 99,
                    environment: "production".into(),
                    database: "auth".into(),
                }),
                error: "pg_dump failed".into(),
            }],
            ..Default::default()
        });
        let (problem, shown) = apply_started_here(&b, &finished_backup("j-3", Some(report))).await;
        let problem = problem.expect("a problem");
        assert!(
            problem.contains("job j-3 (backup) carried a result that cannot be read")
                && problem.contains("unknown kind (99)"),
            "{problem}"
        );
        assert!(shown.contains(&problem), "{shown}");
    }

    #[tokio::test]
    async fn a_finished_backup_job_with_its_report_is_recorded_without_a_problem() {
        use sentinel_proto::v1::{BackupReport, BackupSeries, SeriesKind};
        let dir = tempfile::tempdir().unwrap();
        let b = backups(dir.path());
        let report = job_finished::Result::Backup(BackupReport {
            failures: vec![sentinel_proto::v1::BackupFailure {
                series: Some(BackupSeries {
                    kind: SeriesKind::Database as i32,
                    environment: "production".into(),
                    database: "auth".into(),
                }),
                error: "pg_dump failed: no such database".into(),
            }],
            ..Default::default()
        });
        let (problem, shown) = apply_started_here(&b, &finished_backup("j-4", Some(report))).await;
        assert_eq!(problem, None);
        assert_eq!(shown, "pg_dump failed: no such database");
    }
}
