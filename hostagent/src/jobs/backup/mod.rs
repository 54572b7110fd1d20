//! Backups on the agent (the backup host, Argus): backup, verify and restore-test jobs.
//!
//! A backup run dumps every database of the job with `pg_dump --format=custom` as a read-only
//! role, the cluster's globals with `pg_dumpall --globals-only --no-role-passwords`, and tars
//! configured paths. Each file streams from the tool into a temp file, hashed (and encrypted
//! with age when `[jobs.backups.encryption]` says so) on the way ([`sink`], [`encryption`]),
//! then is fsynced and renamed into place. The run's manifest records every file's size,
//! sha256, whether it is encrypted, tool and server versions and the row count of every table
//! ([`manifest`]). Then, for each series whose new backup
//! succeeded (and only those), retention prunes what the policy no longer names
//! ([`retention`]), and the new files are copied offsite with rsync and checked there
//! ([`offsite`]); what could not be copied is retried at the next run.
//!
//! Verify ([`verify`]) checks every retained file against its manifest and that pg_restore can
//! read it; the restore test ([`restore`]) restores the newest good dump of each database into
//! a scratch database, compares row counts with the manifest, checks invariants and drops it.
//!
//! Every job answers a typed result (`BackupReport`, `VerifyReport`, `RestoreReport` of the
//! wire contract, in `JobFinished.result`) that the controller keeps for `ListBackups`; the
//! manifests on disk stay this module's own JSON format and are converted where a report is
//! built. Credentials never travel in jobs: `dsn_ref`s name DSNs in the agent's config.

pub mod dsn;
pub mod dump;
pub mod encryption;
pub mod manifest;
pub mod offsite;
pub mod restore;
pub mod retention;
pub mod sink;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jiff::Timestamp;
pub use sentinel_proto::backup::{safe_name, DIR_MODE, FILE_MODE};
use sentinel_proto::time::from_jiff;
use sentinel_proto::v1::{job_finished, BackupParams, BackupReport, RetentionPolicy, StepStatus};

use crate::config::BackupsConfig;
use crate::jobs::{JobError, JobEvents};
use manifest::{Entry, Failure, Kind, Manifest, Series};

/// What a job answers: its outcome (the detail the operator reads) and its typed result (None
/// for kinds without one).
pub type Outcome = (Result<String, JobError>, Option<job_finished::Result>);

/// What advice a role that can write gets.
const READ_ONLY_ADVICE: &str = "back up with a read-only role (e.g. one granted \
                                pg_read_all_data), or set [jobs.backups] require_read_only = \
                                false on the agent";

/// Why a backup, verify or restore-test step failed. Each variant renders the text the
/// operator reads in the step's detail and the job's result.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing `path` failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A file operation on `path` failed: "creating /backups/.tmp: Permission denied".
    #[error("{doing} {path}: {source}")]
    File {
        /// What was being done to it ("creating", "renaming into", ...).
        doing: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Reading a stream (a tool's output) failed.
    #[error("reading {what}: {source}")]
    Read {
        /// The stream ("the tool's output", "pg_restore's list").
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A blocking task ended without an answer (it panicked or was cancelled).
    #[error("{what} failed: {source}")]
    Task {
        /// The task ("file task", "feeding pg_restore").
        what: String,
        /// Why.
        source: tokio::task::JoinError,
    },
    /// Adding a path to the tar failed.
    #[error("adding {path} to the tar: {source}")]
    TarAdd {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Ending the tar failed.
    #[error("{doing} the tar: {source}")]
    Tar {
        /// "finishing" or "writing".
        doing: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A tool could not be started.
    #[error("starting {what} ({program}): {source}")]
    ToolStart {
        /// What ran ("pg_dump").
        what: String,
        /// The program as configured.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// A tool's standard input or output could not be taken over.
    #[error("{what}'s standard {stream}: {source}")]
    ToolPipe {
        /// What ran.
        what: String,
        /// "input" or "output".
        stream: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A tool's standard output was not piped.
    #[error("no standard output")]
    NoStdout,
    /// A tool ran over its timeout and was killed.
    #[error("{what} took longer than {timeout:?} and was stopped")]
    ToolTimeout {
        /// What ran.
        what: String,
        /// The timeout.
        timeout: Duration,
    },
    /// Waiting for a tool's exit failed.
    #[error("waiting for {what}: {source}")]
    ToolWait {
        /// What ran.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A tool exited unsuccessfully: its status, the last lines it printed, and what failed
    /// feeding or draining it.
    #[error("{what} failed ({status}){}{}", said_suffix(.said), also_suffix(.also))]
    ToolFailed {
        /// What ran.
        what: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its last standard error lines, joined with " / ".
        said: String,
        /// Feed or drain errors besides.
        also: Vec<BackupError>,
    },
    /// `PROGRAM --version` could not run.
    #[error("running {program} --version: {source}")]
    VersionRun {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `PROGRAM --version` exited unsuccessfully.
    #[error("{program} --version failed: {status}")]
    VersionFailed {
        /// The program.
        program: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// A query failed: "listing tables on db:5432/app: permission denied ...".
    #[error("{doing}: {message}")]
    Query {
        /// What the query was for (and where, when that is not obvious).
        doing: String,
        /// PostgreSQL's answer ([`sentinel_postgres::describe`]).
        message: String,
    },
    /// Connecting to PostgreSQL failed.
    #[error(transparent)]
    Connect(#[from] sentinel_postgres::PgError),
    /// Counting rows ran over the command timeout.
    #[error("counting rows took longer than {0:?}")]
    CountTimeout(Duration),
    /// The backup role is a superuser while the agent requires a read-only one.
    #[error("role {role} is a superuser, not a read-only role ({target}): {READ_ONLY_ADVICE}")]
    Superuser {
        /// The role.
        role: String,
        /// The server, for messages.
        target: String,
    },
    /// The backup role may write to tables while the agent requires a read-only one.
    #[error(
        "role {role} is not read-only: it may write to {tables} in {database}: {READ_ONLY_ADVICE}"
    )]
    Writable {
        /// The role.
        role: String,
        /// Some tables it may write to, joined with ", ".
        tables: String,
        /// The database.
        database: String,
    },
    /// The job carries a simulated clock the agent does not accept.
    #[error(
        "the job carries a simulated clock, which this agent does not accept \
         ([jobs.backups] allow_simulated_clock = false)"
    )]
    SimulatedClockRefused,
    /// The job's simulated clock is not a valid time.
    #[error("simulated clock out of range: {0}")]
    SimulatedClockRange(String),
    /// A DSN ref could not be resolved.
    #[error(transparent)]
    Dsn(#[from] dsn::DsnError),
    /// Keys or an age file.
    #[error(transparent)]
    Encryption(#[from] encryption::EncryptionError),
}

/// ": LINE / LINE" after a failed tool's status, or nothing when it printed nothing.
fn said_suffix(said: &str) -> String {
    if said.is_empty() {
        String::new()
    } else {
        format!(": {said}")
    }
}

/// "; ERROR" for each feed or drain error after a failed tool's message.
fn also_suffix(also: &[BackupError]) -> String {
    also.iter().map(|e| format!("; {e}")).collect()
}

/// The run's clock: the job's simulated one when it has one (refused unless the agent allows
/// it), else now.
pub fn clock(
    retention: Option<&RetentionPolicy>,
    config: &BackupsConfig,
) -> Result<(Timestamp, bool), BackupError> {
    match retention.and_then(|r| r.simulated_now.as_ref()) {
        None => Ok((Timestamp::now(), false)),
        Some(_) if !config.allow_simulated_clock => Err(BackupError::SimulatedClockRefused),
        Some(ts) => Timestamp::new(ts.seconds, ts.nanos.clamp(0, 999_999_999))
            .map(|t| (t, true))
            .map_err(|e| BackupError::SimulatedClockRange(e.to_string())),
    }
}

/// The policy a job asks for; the agent never keeps fewer than one backup of a series.
fn policy_of(r: &RetentionPolicy) -> retention::Policy {
    retention::Policy {
        daily: r.daily,
        weekly: r.weekly,
        minimum: r.minimum.max(1),
    }
}

/// Runs `cmd` with stdin closed, logging its stderr lines as job events, within `timeout`
/// (the process is killed when it runs over or the job is cancelled). Returns its stdout; the
/// error names the tool, its exit status and the last lines it printed.
pub async fn run_tool(
    cmd: tokio::process::Command,
    what: &str,
    timeout: Duration,
    events: &JobEvents,
) -> Result<String, BackupError> {
    run_tool_io(cmd, what, timeout, events, None, |mut out| {
        use std::io::Read;
        let mut buf = Vec::new();
        out.read_to_end(&mut buf)
            .map_err(|source| BackupError::Read {
                what: "the output",
                source,
            })?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })
    .await
}

/// Feeds a tool's standard input on a blocking thread; closing the file ends the input.
pub type Feed = Box<dyn FnOnce(std::fs::File) -> Result<(), BackupError> + Send>;

/// [`run_tool`] with the tool's standard input fed by `feed` (else closed) and its standard
/// output handed to `drain`, both on blocking threads with plain blocking files, so that large
/// streams (a dump, a decrypted archive) pass through without a detour through the runtime.
/// When the tool fails, its error comes first and a feed or drain error is added to it; when
/// it succeeds, a feed or drain error is the result.
pub async fn run_tool_io<R: Send + 'static>(
    mut cmd: tokio::process::Command,
    what: &str,
    timeout: Duration,
    events: &JobEvents,
    feed: Option<Feed>,
    drain: impl FnOnce(std::fs::File) -> Result<R, BackupError> + Send + 'static,
) -> Result<R, BackupError> {
    use tokio::io::AsyncBufReadExt;
    let stdin = if feed.is_some() {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    };
    cmd.stdin(stdin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().map_err(|source| BackupError::ToolStart {
        what: what.to_string(),
        program: program.clone(),
        source,
    })?;
    // Blocking files: a killed tool closes its pipes, so these threads end with it.
    let stdout = child
        .stdout
        .take()
        .map(|s| s.into_owned_fd().map(std::fs::File::from))
        .transpose()
        .map_err(|source| BackupError::ToolPipe {
            what: what.to_string(),
            stream: "output",
            source,
        })?;
    let stdin = child
        .stdin
        .take()
        .map(|s| s.into_owned_fd().map(std::fs::File::from))
        .transpose()
        .map_err(|source| BackupError::ToolPipe {
            what: what.to_string(),
            stream: "input",
            source,
        })?;
    let stderr = child.stderr.take();
    let drained = tokio::task::spawn_blocking(move || match stdout {
        Some(out) => drain(out),
        None => Err(BackupError::NoStdout),
    });
    let fed = match (feed, stdin) {
        (Some(feed), Some(input)) => Some(tokio::task::spawn_blocking(move || feed(input))),
        _ => None,
    };
    let work = async move {
        let read_err = async {
            let mut tail: Vec<String> = Vec::new();
            if let Some(err) = stderr {
                let mut lines = tokio::io::BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let line = without_tool_prefix(&line, what, &program).to_string();
                    events.log("stderr", &format!("{what}: {line}"));
                    tail.push(line);
                    if tail.len() > 8 {
                        tail.remove(0);
                    }
                }
            }
            tail
        };
        let fed = async {
            match fed {
                Some(task) => task
                    .await
                    .map_err(|source| BackupError::Task {
                        what: format!("feeding {what}"),
                        source,
                    })
                    .and_then(|r| r),
                None => Ok(()),
            }
        };
        let drained = async {
            drained
                .await
                .map_err(|source| BackupError::Task {
                    what: format!("reading {what}'s output"),
                    source,
                })
                .and_then(|r| r)
        };
        let (tail, fed, drained) = tokio::join!(read_err, fed, drained);
        let status = child.wait().await;
        (tail, fed, drained, status)
    };
    match tokio::time::timeout(timeout, work).await {
        Err(_) => Err(BackupError::ToolTimeout {
            what: what.to_string(),
            timeout,
        }),
        Ok((_, _, _, Err(source))) => Err(BackupError::ToolWait {
            what: what.to_string(),
            source,
        }),
        Ok((tail, fed, drained, Ok(status))) => {
            if status.success() {
                fed?;
                drained
            } else {
                Err(BackupError::ToolFailed {
                    what: what.to_string(),
                    status,
                    said: tail.join(" / "),
                    also: [fed.err(), drained.err()].into_iter().flatten().collect(),
                })
            }
        }
    }
}

/// Creates `dir` and its missing parents as private directories ([`DIR_MODE`], whatever the
/// process's umask). Existing directories are left as they are.
pub fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let missing: Vec<&Path> = dir.ancestors().take_while(|a| !a.exists()).collect();
    for d in missing.into_iter().rev() {
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(DIR_MODE);
        }
        match builder.create(d) {
            Ok(()) => set_mode(d, DIR_MODE)?,
            // Another run (or the operator) made it meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates (or truncates) `path` for writing, private ([`FILE_MODE`], whatever the umask).
pub fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(FILE_MODE);
    }
    let file = options.open(path)?;
    // The mode given to open only applies to a new file, and the umask may take bits off.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    }
    Ok(file)
}

/// Sets `path`'s permission bits to `mode`.
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// The permission bits of `meta` when they give more than `allowed` (group or other bits on
/// a private file or directory), else None.
pub fn wider_mode(meta: &std::fs::Metadata, allowed: u32) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        (mode & !allowed != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = (meta, allowed);
        None
    }
}

/// `line` without the `NAME: ` the tool starts its messages with (pg_restore, pg_dump, rsync
/// do), so that prefixed with what ran it names the tool once: "pg_restore: error: ...".
fn without_tool_prefix<'a>(line: &'a str, what: &str, program: &str) -> &'a str {
    let binary = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    let first = what.split_whitespace().next().unwrap_or(what);
    [binary, first]
        .iter()
        .find_map(|name| line.strip_prefix(name)?.strip_prefix(": "))
        .unwrap_or(line)
}

/// Puts a finished (already fsynced) temp file in place: rename, then fsync of the directory
/// so the rename survives a crash. Missing directories are created private.
pub async fn place(tmp: &Path, dest: &Path) -> Result<(), BackupError> {
    let (tmp, dest) = (tmp.to_path_buf(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let fail = |doing: &'static str, p: &Path, source: std::io::Error| BackupError::File {
            doing,
            path: p.to_path_buf(),
            source,
        };
        let parent = dest.parent().unwrap_or(Path::new("."));
        create_private_dir_all(parent).map_err(|e| fail("creating", parent, e))?;
        std::fs::rename(&tmp, &dest).map_err(|e| fail("renaming into", &dest, e))?;
        sentinel_daemon::fs::sync_dir(parent).map_err(|e| fail("syncing", parent, e))
    })
    .await
    .map_err(|source| BackupError::Task {
        what: "file task".into(),
        source,
    })?
}

/// Writes `bytes` to `path` atomically and privately ([`FILE_MODE`], in a directory created
/// private when missing): [`sentinel_daemon::fs::write_atomic`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    create_private_dir_all(parent).map_err(|e| BackupError::Io {
        path: parent.to_path_buf(),
        message: e.to_string(),
    })?;
    sentinel_daemon::fs::write_atomic(path, bytes, FILE_MODE).map_err(|e| BackupError::Io {
        message: e.source.to_string(),
        path: e.path,
    })
}

/// A step: STARTED now, then SUCCEEDED or FAILED with its detail and duration.
pub(crate) struct Step<'a> {
    events: &'a JobEvents,
    name: String,
    started: Instant,
}

impl<'a> Step<'a> {
    pub(crate) fn start(events: &'a JobEvents, name: impl Into<String>) -> Self {
        let name = name.into();
        events.step(&name, StepStatus::Started, "", Duration::ZERO);
        Self {
            events,
            name,
            started: Instant::now(),
        }
    }

    pub(crate) fn end(self, result: &Result<String, String>) {
        let (status, detail) = match result {
            Ok(d) => (StepStatus::Succeeded, d.as_str()),
            Err(e) => (StepStatus::Failed, e.as_str()),
        };
        self.events
            .step(&self.name, status, detail, self.started.elapsed());
    }
}

/// Creates the backup dir (private, see [`DIR_MODE`]; an existing one wider than that is
/// narrowed when the agent may, and verify reports it when not) and empties its private temp
/// dir (`.tmp`): whatever a crashed run left there is incomplete by construction.
pub(crate) fn prepare_dir(dir: &Path) -> Result<PathBuf, BackupError> {
    let fail = |doing: &'static str, p: &Path, source: std::io::Error| BackupError::File {
        doing,
        path: p.to_path_buf(),
        source,
    };
    create_private_dir_all(dir).map_err(|e| fail("creating", dir, e))?;
    if let Ok(meta) = std::fs::metadata(dir) {
        if wider_mode(&meta, DIR_MODE).is_some() {
            // Best effort: the agent may not own a mount point; verify reports what stays open.
            let _ = set_mode(dir, DIR_MODE);
        }
    }
    let tmp = dir.join(".tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| fail("clearing", &tmp, e))?;
    }
    create_private_dir_all(&tmp).map_err(|e| fail("creating", &tmp, e))?;
    Ok(tmp)
}

/// Human-readable bytes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Runs a backup job. See the module docs.
pub async fn run_backup(p: &BackupParams, config: &BackupsConfig, events: &JobEvents) -> Outcome {
    let mut report = BackupReport {
        reason: p.reason.clone(),
        ..Default::default()
    };
    let result = backup(p, config, events, &mut report).await;
    (result, Some(job_finished::Result::Backup(report)))
}

async fn backup(
    p: &BackupParams,
    config: &BackupsConfig,
    events: &JobEvents,
    report: &mut BackupReport,
) -> Result<String, JobError> {
    let failed = JobError::Failed;
    let retention_params = p.retention.clone().unwrap_or_default();
    let (taken_at, simulated) =
        clock(p.retention.as_ref(), config).map_err(|e| failed(e.to_string()))?;
    let tz =
        sentinel_proto::backup::parse_time_zone(&retention_params.time_zone).map_err(failed)?;
    // Before anything is written: keys that stopped loading (a file changed since start-up)
    // fail the run whole, never leaving a plaintext backup where an encrypted one belongs.
    let keys = config
        .encryption
        .as_ref()
        .map(encryption::Keys::load)
        .transpose()
        .map_err(|e| {
            JobError::Failed(format!(
                "[jobs.backups.encryption]: {e}; nothing was backed up"
            ))
        })?;
    let dir = PathBuf::from(&p.backup_dir);
    let tmp = prepare_dir(&dir).map_err(|e| failed(e.to_string()))?;
    let mut run_id = taken_at.strftime("%Y%m%dT%H%M%SZ").to_string();
    let mut n = 2;
    while Manifest::path(&dir, &run_id).exists() {
        run_id = format!("{}-{n}", taken_at.strftime("%Y%m%dT%H%M%SZ"));
        n += 1;
    }
    report.run_id = run_id.clone();
    report.taken_at = Some(from_jiff(taken_at));
    if simulated {
        events.log(
            "agent",
            &format!("using the job's simulated clock: {taken_at}"),
        );
    }
    let started_at = Timestamp::now();
    let ctx = dump::RunCtx {
        dir: &dir,
        tmp: &tmp,
        run_id: &run_id,
        taken_at,
        config,
        keys: keys.as_ref(),
        events,
    };

    let mut entries: Vec<Entry> = Vec::new();
    let mut failures: Vec<Failure> = Vec::new();
    let pg_dump_version = if p.databases.is_empty() {
        Ok(String::new())
    } else {
        // Every database's failure repeats it, so it is kept as the text they show.
        dump::tool_version(&config.pg_dump)
            .await
            .map_err(|e| e.to_string())
    };
    for db in &p.databases {
        let series = Series {
            kind: Kind::Database,
            environment: db.environment.clone(),
            database: db.database.clone(),
        };
        let step = Step::start(events, format!("dump {series}"));
        let result = match &pg_dump_version {
            Ok(version) => dump::database(&ctx, db, version)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        record(step, series, result, &mut entries, &mut failures);
    }
    if !p.globals_dsn_ref.is_empty() {
        let series = Series {
            kind: Kind::Globals,
            environment: String::new(),
            database: p.globals_dsn_ref.clone(),
        };
        let step = Step::start(events, format!("dump {series}"));
        let result = match dump::tool_version(&config.pg_dumpall).await {
            Ok(version) => dump::globals(&ctx, &p.globals_dsn_ref, &version).await,
            Err(e) => Err(e),
        };
        record(step, series, result, &mut entries, &mut failures);
    }
    if !p.file_paths.is_empty() {
        let series = Series {
            kind: Kind::Files,
            environment: String::new(),
            database: "files".into(),
        };
        let step = Step::start(events, "tar files");
        let result = dump::files(&ctx, &p.file_paths).await;
        record(step, series, result, &mut entries, &mut failures);
    }
    let _ = std::fs::remove_dir_all(&tmp);

    let manifest = Manifest {
        version: 1,
        run_id: run_id.clone(),
        reason: p.reason.clone(),
        taken_at,
        simulated_clock: simulated,
        started_at,
        finished_at: Timestamp::now(),
        entries: entries.clone(),
        failures: failures.clone(),
    };
    let mut to_copy: Vec<offsite::Pending> = entries
        .iter()
        .map(|e| offsite::Pending {
            file: e.file.clone(),
            sha256: Some(e.sha256.clone()),
        })
        .collect();
    if !entries.is_empty() {
        manifest
            .save(&dir)
            .map_err(|e| JobError::Failed(format!("writing the run's manifest: {e}")))?;
        to_copy.push(offsite::Pending {
            file: Manifest::relative(&run_id),
            sha256: None,
        });
    }
    report.written = entries.iter().map(Entry::to_proto).collect();
    report.failures = failures.iter().map(Failure::to_proto).collect();

    // Retention, only for the series whose new backup just succeeded.
    let done: BTreeSet<Series> = entries.iter().map(|e| e.series.clone()).collect();
    if p.retention.is_some() && !done.is_empty() {
        let step = Step::start(events, "prune");
        let (mut manifests, problems) = manifest::load_all(&dir);
        for (path, e) in &problems {
            events.log(
                "agent",
                &format!("manifest {} unreadable, left alone: {e}", path.display()),
            );
        }
        let (pruned, rewritten, errors) = prune(
            &dir,
            &mut manifests,
            &done,
            policy_of(&retention_params),
            taken_at,
            &tz,
        );
        for run in rewritten {
            to_copy.push(offsite::Pending {
                file: Manifest::relative(&run),
                sha256: None,
            });
        }
        let detail = if errors.is_empty() {
            Ok(format!("removed {} file(s)", pruned.len()))
        } else {
            Err(format!(
                "removed {} file(s); {}",
                pruned.len(),
                errors.join("; ")
            ))
        };
        step.end(&detail);
        report.pruned = pruned;
    }

    if !p.offsite_target.is_empty() {
        let target = p.offsite_target.as_str();
        let step = Step::start(events, "offsite");
        let mut r = offsite::sync(config, &dir, target, to_copy, events).await;
        step.end(&match &r.error {
            None => Ok(format!("copied and checked {} file(s)", r.copied.len())),
            Some(e) => Err(format!(
                "{e}; {} file(s) pending, retried at the next run",
                r.pending.len()
            )),
        });
        if p.retention.is_some() && !done.is_empty() {
            const STEP: &str = "offsite prune";
            if r.error.is_none() && r.pending.is_empty() {
                let step = Step::start(events, STEP);
                let policy = policy_of(&retention_params);
                match offsite::prune(config, &dir, target, &done, policy, taken_at, &tz, events)
                    .await
                {
                    Ok(pruned) => {
                        step.end(&Ok(format!("removed {} file(s) at {target}", pruned.len())));
                        r.pruned = pruned;
                    }
                    Err(e) => {
                        let e = e.to_string();
                        step.end(&Err(e.clone()));
                        r.prune_error = Some(e);
                    }
                }
            } else {
                // Pruning against an incomplete copy could leave the target with fewer
                // backups than the policy promises.
                events.step(
                    STEP,
                    StepStatus::Skipped,
                    "the copy is incomplete; pruning waits for a complete, checked copy",
                    Duration::ZERO,
                );
            }
        }
        report.offsite = Some(r);
    }

    let (manifests, _) = manifest::load_all(&dir);
    report.inventory = manifest::inventory(&manifests);

    let bytes: u64 = entries.iter().map(|e| e.size).sum();
    let mut summary = format!(
        "run {run_id}: backed up {} of {} ({})",
        entries.len(),
        entries.len() + failures.len(),
        human_bytes(bytes)
    );
    if p.retention.is_some() {
        summary.push_str(&format!("; pruned {} file(s) here", report.pruned.len()));
    }
    if let Some(o) = &report.offsite {
        match &o.error {
            None => summary.push_str(&format!(
                "; offsite: {} file(s) copied and checked",
                o.copied.len()
            )),
            Some(e) => summary.push_str(&format!(
                "; offsite copy FAILED ({e}): {} file(s) pending, retried at the next run",
                o.pending.len()
            )),
        }
        if p.retention.is_some() {
            match &o.prune_error {
                None if o.error.is_none() => summary.push_str(&format!(
                    ", pruned {} file(s) at {}",
                    o.pruned.len(),
                    o.target
                )),
                None => summary.push_str(", nothing pruned there until a complete copy"),
                Some(e) => summary.push_str(&format!(", pruning there FAILED ({e})")),
            }
        }
    }
    if failures.is_empty() {
        Ok(summary)
    } else {
        let what: Vec<String> = failures
            .iter()
            .map(|f| format!("{}: {}", f.series, f.error))
            .collect();
        Err(JobError::Failed(format!(
            "backup failed for {}; nothing of {} was pruned ({summary})",
            what.join("; "),
            if failures.len() == 1 { "it" } else { "them" }
        )))
    }
}

fn record(
    step: Step<'_>,
    series: Series,
    result: Result<Entry, impl std::fmt::Display>,
    entries: &mut Vec<Entry>,
    failures: &mut Vec<Failure>,
) {
    match result {
        Ok(entry) => {
            let rows: i64 = entry.row_counts.values().sum();
            let mut detail = format!(
                "{}, {}, sha256 {}",
                entry.file,
                human_bytes(entry.size),
                &entry.sha256[..16.min(entry.sha256.len())]
            );
            if entry.series.kind == Kind::Database {
                detail.push_str(&format!(
                    ", {} table(s), {rows} row(s)",
                    entry.row_counts.len()
                ));
            }
            step.end(&Ok(detail));
            entries.push(entry);
        }
        Err(error) => {
            let error = error.to_string();
            step.end(&Err(error.clone()));
            failures.push(Failure { series, error });
        }
    }
}

/// Applies retention to each series in `done`: deletes the files the policy does not keep,
/// marks them pruned in their manifests (a manifest whose files are all gone goes too).
/// Returns the files removed, the runs whose manifests were rewritten, and errors.
fn prune(
    dir: &Path,
    manifests: &mut [Manifest],
    done: &BTreeSet<Series>,
    policy: retention::Policy,
    now: Timestamp,
    tz: &jiff::tz::TimeZone,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut pruned = Vec::new();
    let mut errors = Vec::new();
    let mut changed: BTreeMap<usize, ()> = BTreeMap::new();
    for series in done {
        let slots: Vec<(usize, usize)> = manifests
            .iter()
            .enumerate()
            .flat_map(|(mi, m)| {
                m.entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| &e.series == series && e.pruned_at.is_none())
                    .map(move |(ei, _)| (mi, ei))
            })
            .collect();
        let candidates: Vec<retention::Candidate> = slots
            .iter()
            .map(|&(mi, ei)| {
                let e = &manifests[mi].entries[ei];
                retention::Candidate {
                    taken_at: e.taken_at,
                    good: e.damaged.is_none(),
                }
            })
            .collect();
        let keep = retention::keep(&candidates, policy, now, tz);
        for (&(mi, ei), kept) in slots.iter().zip(keep) {
            if kept {
                continue;
            }
            let entry = &mut manifests[mi].entries[ei];
            match std::fs::remove_file(dir.join(&entry.file)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    errors.push(format!("removing {}: {e}", entry.file));
                    continue;
                }
            }
            entry.pruned_at = Some(now);
            pruned.push(entry.file.clone());
            changed.insert(mi, ());
        }
    }
    let mut rewritten = Vec::new();
    for mi in changed.keys() {
        let m = &manifests[*mi];
        if m.all_pruned() {
            if let Err(e) = std::fs::remove_file(Manifest::path(dir, &m.run_id)) {
                errors.push(format!("removing the manifest of run {}: {e}", m.run_id));
            }
        } else if let Err(e) = m.save(dir) {
            errors.push(format!("rewriting the manifest of run {}: {e}", m.run_id));
        } else {
            rewritten.push(m.run_id.clone());
        }
    }
    (pruned, rewritten, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_clock_needs_the_agents_consent() {
        let mut retention = RetentionPolicy {
            simulated_now: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        let mut config = BackupsConfig::default();
        assert!(clock(Some(&retention), &config)
            .unwrap_err()
            .to_string()
            .contains("allow_simulated_clock"));
        config.allow_simulated_clock = true;
        let (now, simulated) = clock(Some(&retention), &config).unwrap();
        assert!(simulated);
        assert_eq!(now.as_second(), 1_800_000_000);
        retention.simulated_now = None;
        assert!(!clock(Some(&retention), &config).unwrap().1);
    }

    #[test]
    fn a_tools_own_prefix_is_not_repeated() {
        let bin = "/usr/lib/postgresql/15/bin/pg_restore";
        let line = "pg_restore: error: could not read input file";
        assert_eq!(
            format!(
                "pg_restore: {}",
                without_tool_prefix(line, "pg_restore", bin)
            ),
            "pg_restore: error: could not read input file"
        );
        assert_eq!(
            without_tool_prefix(line, "pg_restore --list", bin),
            "error: could not read input file"
        );
        assert_eq!(
            without_tool_prefix("rsync error: some files", "rsync", "rsync"),
            "rsync error: some files"
        );
        assert_eq!(without_tool_prefix("plain", "tar", "tar"), "plain");
    }

    #[test]
    fn private_files_and_directories_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a/b/c.json");
        // The test process's umask (usually 022) would give 0644 and 0755.
        write_atomic(&file, b"{}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_dir(dir.path()).unwrap();
        assert_eq!(mode(dir.path()), 0o700, "the backup dir is narrowed");
        assert_eq!(mode(&dir.path().join(".tmp")), 0o700);
    }

    #[test]
    fn error_texts_read_as_the_operator_has_always_read_them() {
        use std::os::unix::process::ExitStatusExt;
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let status = std::process::ExitStatus::from_raw(1 << 8);
        let failed = |said: &str, also: Vec<BackupError>| BackupError::ToolFailed {
            what: "pg_restore".into(),
            status,
            said: said.into(),
            also,
        };
        assert_eq!(
            failed("", Vec::new()).to_string(),
            "pg_restore failed (exit status: 1)"
        );
        assert_eq!(
            failed(
                "error: a / error: b",
                vec![BackupError::Read {
                    what: "pg_restore's output",
                    source: io(),
                }]
            )
            .to_string(),
            "pg_restore failed (exit status: 1): error: a / error: b; reading pg_restore's \
             output: permission denied"
        );
        assert_eq!(
            BackupError::File {
                doing: "renaming into",
                path: "/b/x.dump".into(),
                source: io(),
            }
            .to_string(),
            "renaming into /b/x.dump: permission denied"
        );
        assert_eq!(
            BackupError::ToolTimeout {
                what: "rsync".into(),
                timeout: Duration::from_secs(5),
            }
            .to_string(),
            "rsync took longer than 5s and was stopped"
        );
        assert_eq!(
            BackupError::Superuser {
                role: "postgres".into(),
                target: "db:5432/app".into(),
            }
            .to_string(),
            "role postgres is a superuser, not a read-only role (db:5432/app): back up with a \
             read-only role (e.g. one granted pg_read_all_data), or set [jobs.backups] \
             require_read_only = false on the agent"
        );
        assert_eq!(
            BackupError::Writable {
                role: "app".into(),
                tables: "public.a, public.b".into(),
                database: "shop".into(),
            }
            .to_string(),
            "role app is not read-only: it may write to public.a, public.b in shop: back up \
             with a read-only role (e.g. one granted pg_read_all_data), or set [jobs.backups] \
             require_read_only = false on the agent"
        );
        assert_eq!(
            BackupError::SimulatedClockRefused.to_string(),
            "the job carries a simulated clock, which this agent does not accept \
             ([jobs.backups] allow_simulated_clock = false)"
        );
        assert_eq!(
            BackupError::Dsn(dsn::DsnError::InlinePassword {
                name: "prod".into(),
            })
            .to_string(),
            "DSN \"prod\" holds a password; pg_dump would show it on its command line, so put \
             the password in `password_file`"
        );
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
