//! The deploy executor: turns a verified release bundle into the running release of a Compose
//! app, and rolls back on its own when anything fails after the switch.
//!
//! A deploy: verify the bundle against the signed hash → unpack → switch `current` → `compose
//! build` → `compose down` → migration (`compose run --rm`) → `compose up -d` → health check →
//! prune. `build` runs before `down`, so a release that does not build never stops the one
//! that serves. Any failure after the switch goes back: `current` points at the previous
//! release again and, when its containers were already stopped, it is rebuilt (the stable
//! project name means the image tag now holds the failed release's image; the layer cache
//! makes this quick) and started, then health-checked. The error says what failed and how
//! the rollback went.
//!
//! A job carrying `blue_green` goes to [`super::blue_green`] after unpack instead: the new
//! release starts beside the live one and the host's proxy switches to it.
//!
//! Every step is reported as a [`JobEvents::step`] (started, then succeeded/failed/skipped
//! with its duration) and appended to the app's audit log. Values from the releases' env
//! files are registered as secrets before any command runs.

use std::future::Future;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sentinel_proto::v1::{DeployParams, HealthCheck, RollbackParams, StepStatus};
use sha2::{Digest, Sha256};

use super::blue_green;
use super::compose::{self, Compose, ComposeFlavor};
use super::events::{JobError, JobEvents};
use super::health;
use super::release::{self, AuditLine};

/// Releases kept when the job does not say.
pub const DEFAULT_KEEP_RELEASES: usize = 5;

/// Deploys `params.commit` from `bundle` (a gzipped tar, checked against
/// `params.bundle_sha256`) and returns a one-line summary. See the module docs for the steps
/// and the automatic rollback.
pub async fn deploy(
    params: &DeployParams,
    bundle: &Path,
    events: &JobEvents,
) -> Result<String, JobError> {
    events.set_not_secret(&params.not_secret);
    let result = deploy_inner(params, bundle, events).await;
    log_outcome("deploy", &params.deploy_id, &params.app, &result, events);
    result.map_err(|e| redacted(e, events))
}

/// Rolls back to `params.to_commit` (which must be unpacked in `releases/`) or, when empty,
/// to the release before the current one: switch, build, down, up, health check. Returns a
/// one-line summary. A failure here is reported, not undone: `current` then names the
/// release that was being rolled back to.
pub async fn rollback(params: &RollbackParams, events: &JobEvents) -> Result<String, JobError> {
    events.set_not_secret(&params.not_secret);
    let result = rollback_inner(params, events).await;
    log_outcome("rollback", &params.deploy_id, &params.app, &result, events);
    result.map_err(|e| redacted(e, events))
}

async fn deploy_inner(
    params: &DeployParams,
    bundle: &Path,
    events: &JobEvents,
) -> Result<String, JobError> {
    let app_dir = validate_app_dir(&params.app_dir)?;
    let compose_rel = validate_compose_file(&params.compose_file)?;
    let project = validate_project(&params.compose_project)?;
    release::validate_commit(&params.commit)?;
    if !params.migration.is_empty() && params.migration_service.trim().is_empty() {
        return Err(failed(
            "the deploy has a migration but no migration_service to run it in",
        ));
    }
    let expected_sha = params.bundle_sha256.trim().to_ascii_lowercase();
    if expected_sha.is_empty() {
        return Err(failed(
            "the deploy carries no bundle_sha256; refusing an unverifiable bundle",
        ));
    }
    let commit = params.commit.as_str();
    let keep = match params.keep_releases {
        0 => DEFAULT_KEEP_RELEASES,
        n => usize::try_from(n).unwrap_or(DEFAULT_KEEP_RELEASES),
    };
    // Up front, so that even a refused bundle leaves its line in the audit log.
    std::fs::create_dir_all(&app_dir)
        .map_err(|e| failed(&format!("creating {}: {e}", app_dir.display())))?;
    let ctx = Ctx::new(
        events,
        &app_dir,
        &params.deploy_id,
        &params.app,
        &params.environment,
    );

    // What to go back to if this deploy fails. Redeploying the live commit replaces its
    // files, so then it is the release before it.
    let live = release::current_release(&app_dir);
    let fallback = match &live {
        Some(c) if c != commit => Some(c.clone()),
        Some(_) => release::previous_release(&app_dir),
        None => None,
    };
    // A rollback runs the fallback's containers, whose output may carry its secrets.
    if let Some(f) = &fallback {
        register_release_secrets(&app_dir, f, &compose_rel, events);
    }
    events.log(
        "agent",
        &format!(
            "deploying {}/{} commit {commit} into {} (live: {}; rollback target: {})",
            params.app,
            params.environment,
            app_dir.display(),
            live.as_deref().unwrap_or("none"),
            fallback.as_deref().unwrap_or("none"),
        ),
    );

    let release_dir = release::release_dir(&app_dir, commit);
    let compose_file = release_dir.join(&compose_rel);
    {
        let bundle = bundle.to_path_buf();
        let app_dir = app_dir.clone();
        let commit = commit.to_string();
        let size = params.bundle_size;
        let events = events.clone();
        let compose_file = compose_file.clone();
        let compose_rel = compose_rel.clone();
        ctx.step("unpack", commit.clone(), Kind::Ours, async move {
            tokio::task::spawn_blocking(move || {
                verify_bundle(&bundle, &expected_sha, size)?;
                let dir = release::unpack_bundle(&bundle, &app_dir, &commit, &events)?;
                if !compose_file.is_file() {
                    return Err(failed(&format!(
                        "the bundle has no compose file {}",
                        compose_rel.display()
                    )));
                }
                Ok(format!("sha256 verified; unpacked into {}", dir.display()))
            })
            .await
            .map_err(|e| failed(&format!("unpacking stopped: {e}")))?
        })
        .await?;
    }

    let flavor = ctx.timed(Kind::Compose, compose::detect()).await?;
    events.log("agent", &format!("using {}", flavor.name()));

    let mut summary_tail = String::new();
    if let Some(bg) = &params.blue_green {
        let slots = blue_green::Slots::new(&ctx, bg, flavor, &compose_rel, &project)?;
        summary_tail = slots.deploy(params).await.inspect_err(|_| {
            ctx.report_timing();
        })?;
    } else {
        ctx.step("switch", commit, Kind::Ours, async {
            release::switch_current(&app_dir, commit)?;
            Ok(format!("current -> releases/{commit}"))
        })
        .await?;

        // From here on, a failure rolls back.
        let compose = compose_for(flavor, &project, &compose_file);
        let mut progress = Progress {
            was_live: live.as_deref() == Some(commit),
            ..Progress::default()
        };
        if let Err(failure) = run_release(&ctx, &compose, params, &mut progress).await {
            let message = recover(
                &ctx,
                failure,
                commit,
                fallback.as_deref(),
                &compose_rel,
                flavor,
                &project,
                params.health.as_ref(),
                &progress,
            )
            .await;
            ctx.report_timing();
            return Err(JobError::Failed(message));
        }
    }

    let mut pruned = Vec::new();
    let prune_result = ctx
        .step("prune", commit, Kind::Ours, async {
            pruned = release::prune(&app_dir, keep)?;
            Ok(if pruned.is_empty() {
                format!("kept all releases (keep {keep})")
            } else {
                format!("removed {} (keep {keep})", pruned.join(", "))
            })
        })
        .await;
    let timing = ctx.report_timing();
    let mut summary = format!(
        "deployed {}/{} {commit} (previous: {}) in {timing}{summary_tail}",
        params.app,
        params.environment,
        live.as_deref().unwrap_or("none"),
    );
    match prune_result {
        // A healthy release stays even when old ones could not be removed.
        Err(e) => summary.push_str(&format!("; pruning failed: {e}")),
        Ok(()) if !pruned.is_empty() => {
            summary.push_str(&format!("; pruned {}", pruned.join(", ")))
        }
        Ok(()) => {}
    }
    Ok(summary)
}

/// How far a deploy got, which decides what a rollback must undo.
#[derive(Default)]
struct Progress {
    /// `down` was started: the previous release's containers may be gone.
    down_started: bool,
    /// The migration ran (it is never reverted, but the operator must know).
    migrated: bool,
    /// `up` was started: the new release's containers may be running.
    up_started: bool,
    /// The deployed commit was already the live one (a redeploy).
    was_live: bool,
}

/// A failed step after the switch.
struct Failure {
    step: &'static str,
    error: JobError,
}

/// The steps after the switch: build, down, migrate, up, health.
async fn run_release(
    ctx: &Ctx<'_>,
    compose: &Compose,
    params: &DeployParams,
    progress: &mut Progress,
) -> Result<(), Failure> {
    let commit = params.commit.as_str();
    let events = ctx.events;
    let at = |step: &'static str| move |error| Failure { step, error };

    ctx.step("build", commit, Kind::Compose, async {
        compose.build(events, "build").await?;
        Ok("images built".to_string())
    })
    .await
    .map_err(at("build"))?;

    progress.down_started = true;
    ctx.step("down", commit, Kind::Compose, async {
        compose
            .run(&["down", "--remove-orphans"], events, "down")
            .await?;
        Ok(format!("stopped project {}", compose.project))
    })
    .await
    .map_err(at("down"))?;

    if params.migration.is_empty() {
        ctx.skip("migrate", commit, "no migration");
    } else {
        progress.migrated = true;
        let service = params.migration_service.trim();
        ctx.step("migrate", commit, Kind::Compose, async {
            compose
                .run(
                    &["run", "--rm", "-T", service, "sh", "-c", &params.migration],
                    events,
                    "migrate",
                )
                .await?;
            Ok(format!("migration ran in {service}"))
        })
        .await
        .map_err(at("migration"))?;
    }

    progress.up_started = true;
    ctx.step("up", commit, Kind::Compose, async {
        compose
            .run(&["up", "-d", "--remove-orphans"], events, "up")
            .await?;
        Ok(format!("started project {}", compose.project))
    })
    .await
    .map_err(at("up"))?;

    match &params.health {
        Some(check) => ctx
            .step("health", commit, Kind::Health, async {
                health::wait_healthy(check, &compose.project, events).await?;
                Ok(describe_check(check))
            })
            .await
            .map_err(at("health check"))?,
        None => ctx.skip("health", commit, "no health check configured"),
    }
    Ok(())
}

/// Rolls back after `failure` and says what happened, for the job's error.
#[allow(clippy::too_many_arguments)]
async fn recover(
    ctx: &Ctx<'_>,
    failure: Failure,
    commit: &str,
    fallback: Option<&str>,
    compose_rel: &Path,
    flavor: ComposeFlavor,
    project: &str,
    health_check: Option<&HealthCheck>,
    progress: &Progress,
) -> String {
    let events = ctx.events;
    let what = format!("{} failed: {}", failure.step, failure.error);
    let not_reverted = if progress.migrated {
        " (the migration that ran is not reverted)"
    } else {
        ""
    };
    let Some(target) = fallback else {
        // First deploy (or a redeploy with nothing before it): nothing to go back to.
        let left = if progress.up_started {
            "; its containers were left as they are for inspection"
        } else {
            ""
        };
        let detail = if progress.was_live {
            // A redeploy of the live commit: it stays current, as it was before.
            format!("no previous release to roll back to; current stays at {commit}{left}")
        } else {
            match release::clear_current(ctx.app_dir, commit) {
                Ok(()) => format!("no previous release to roll back to; current removed{left}"),
                Err(e) => {
                    format!("no previous release to roll back to; removing current failed: {e}")
                }
            }
        };
        ctx.finish(
            "rollback",
            commit,
            StepStatus::Skipped,
            &detail,
            Duration::ZERO,
        );
        return format!("{what}; {detail}{not_reverted}");
    };

    let compose = compose_for(
        flavor,
        project,
        &release::release_dir(ctx.app_dir, target).join(compose_rel),
    );
    let restart = progress.down_started;
    let rolled = ctx
        .step("rollback", target, Kind::Compose, async {
            release::switch_back(ctx.app_dir, target)?;
            if !restart {
                return Ok(format!(
                    "current -> releases/{target} again; its containers were never stopped"
                ));
            }
            // The project's image tags now hold the failed release's images: rebuild
            // (from the layer cache) before stopping anything.
            compose.build(events, "rollback").await?;
            compose
                .run(&["down", "--remove-orphans"], events, "rollback")
                .await?;
            compose
                .run(&["up", "-d", "--remove-orphans"], events, "rollback")
                .await?;
            Ok(format!("current -> releases/{target}; rebuilt and started"))
        })
        .await;
    if let Err(e) = rolled {
        return format!("{what}; rollback to {target} failed: {e}{not_reverted}");
    }
    if !restart {
        return format!(
            "{what}; rolled back to {target} (its containers were never stopped){not_reverted}"
        );
    }
    let Some(check) = health_check else {
        ctx.skip("rollback-health", target, "no health check configured");
        return format!(
            "{what}; rolled back to {target} (no health check configured){not_reverted}"
        );
    };
    let healthy = ctx
        .step("rollback-health", target, Kind::Health, async {
            health::wait_healthy(check, project, events).await?;
            Ok(describe_check(check))
        })
        .await;
    match healthy {
        Ok(()) => format!("{what}; rolled back to {target}, healthy again{not_reverted}"),
        Err(e) => format!(
            "{what}; rolled back to {target} but it is not healthy either: {e}{not_reverted}"
        ),
    }
}

async fn rollback_inner(params: &RollbackParams, events: &JobEvents) -> Result<String, JobError> {
    let app_dir = validate_app_dir(&params.app_dir)?;
    let compose_rel = validate_compose_file(&params.compose_file)?;
    let project = validate_project(&params.compose_project)?;
    let live = release::current_release(&app_dir);
    let target = if params.to_commit.trim().is_empty() {
        release::previous_release(&app_dir).ok_or_else(|| {
            failed(&format!(
                "no previous release to roll back to in {} (current: {})",
                app_dir.display(),
                live.as_deref().unwrap_or("none")
            ))
        })?
    } else {
        let target = params.to_commit.trim().to_string();
        release::validate_commit(&target)?;
        if !release::release_dir(&app_dir, &target).is_dir() {
            return Err(failed(&format!(
                "release {target} is not on this host (have: {})",
                list_releases(&app_dir)
            )));
        }
        target
    };
    let ctx = Ctx::new(
        events,
        &app_dir,
        &params.deploy_id,
        &params.app,
        &params.environment,
    );
    for commit in [Some(&target), live.as_ref()].into_iter().flatten() {
        register_release_secrets(&app_dir, commit, &compose_rel, events);
    }
    events.log(
        "agent",
        &format!(
            "rolling back {}/{} from {} to {target}",
            params.app,
            params.environment,
            live.as_deref().unwrap_or("none")
        ),
    );
    let compose_file = release::release_dir(&app_dir, &target).join(&compose_rel);
    if !compose_file.is_file() {
        return Err(failed(&format!(
            "release {target} has no compose file {}",
            compose_rel.display()
        )));
    }
    let flavor = ctx.timed(Kind::Compose, compose::detect()).await?;
    if let Some(bg) = &params.blue_green {
        let slots = blue_green::Slots::new(&ctx, bg, flavor, &compose_rel, &project)?;
        let result = slots.rollback(&target, params.health.as_ref()).await;
        let timing = ctx.report_timing();
        let tail = result?;
        return Ok(format!(
            "rolled back {}/{} from {} to {target} in {timing}{tail}",
            params.app,
            params.environment,
            live.as_deref().unwrap_or("none"),
        ));
    }
    let compose = compose_for(flavor, &project, &compose_file);
    let t = target.as_str();
    let steps = async {
        ctx.step("switch", t, Kind::Ours, async {
            release::switch_back(&app_dir, t)?;
            Ok(format!("current -> releases/{t}"))
        })
        .await?;
        // The project's image tags hold the current release's images: rebuild the target's
        // (from the layer cache) before stopping anything.
        ctx.step("build", t, Kind::Compose, async {
            compose.build(events, "build").await?;
            Ok("images built".to_string())
        })
        .await?;
        for (step, args) in [
            ("down", &["down", "--remove-orphans"][..]),
            ("up", &["up", "-d", "--remove-orphans"][..]),
        ] {
            ctx.step(step, t, Kind::Compose, async {
                compose.run(args, events, step).await?;
                Ok(format!("{step} of project {}", compose.project))
            })
            .await?;
        }
        match &params.health {
            Some(check) => {
                ctx.step("health", t, Kind::Health, async {
                    health::wait_healthy(check, &project, events).await?;
                    Ok(describe_check(check))
                })
                .await
            }
            None => {
                ctx.skip("health", t, "no health check configured");
                Ok(())
            }
        }
    };
    if let Err(e) = steps.await {
        ctx.report_timing();
        return Err(failed(&format!(
            "rollback to {target} failed: {e}; current now points to {target}"
        )));
    }
    let timing = ctx.report_timing();
    Ok(format!(
        "rolled back {}/{} from {} to {target} in {timing}{}",
        params.app,
        params.environment,
        live.as_deref().unwrap_or("none"),
        if params.health.is_some() {
            "; healthy"
        } else {
            ""
        }
    ))
}

/// The Compose project `project` of the release whose compose file is `file`.
pub(super) fn compose_for(flavor: ComposeFlavor, project: &str, file: &Path) -> Compose {
    Compose {
        flavor,
        project: project.to_string(),
        file: file.to_path_buf(),
        workdir: file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/")),
        env: Vec::new(),
    }
}

fn register_release_secrets(app_dir: &Path, commit: &str, compose_rel: &Path, events: &JobEvents) {
    let dir = release::release_dir(app_dir, commit);
    release::register_env_secrets(&dir, events);
    if let Some(sub) = compose_rel.parent().filter(|p| !p.as_os_str().is_empty()) {
        release::register_env_secrets(&dir.join(sub), events);
    }
}

/// What a passed health check checked, for a step's detail.
pub(super) fn describe_check(check: &HealthCheck) -> String {
    let mut parts = Vec::new();
    if !check.http_url.is_empty() {
        let status = if check.expect_status == 0 {
            200
        } else {
            check.expect_status
        };
        parts.push(format!("GET {} answered {status}", check.http_url));
    }
    if check.container_health {
        parts.push("all containers running and healthy".to_string());
    }
    parts.join("; ")
}

fn list_releases(app_dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(app_dir.join(release::RELEASES_DIR))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| release::validate_commit(n).is_ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// Checks the bundle against the hash (and size, when given) the controller signed.
fn verify_bundle(bundle: &Path, expected_sha: &str, expected_size: u64) -> Result<(), JobError> {
    use std::io::Read;
    let mut file = std::fs::File::open(bundle)
        .map_err(|e| failed(&format!("opening bundle {}: {e}", bundle.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| failed(&format!("reading bundle {}: {e}", bundle.display())))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let actual = hex::encode(hasher.finalize());
    if actual != expected_sha {
        return Err(failed(&format!(
            "bundle {} has sha256 {actual}, but the job says {expected_sha}",
            bundle.display()
        )));
    }
    if expected_size != 0 && size != expected_size {
        return Err(failed(&format!(
            "bundle {} has {size} bytes, but the job says {expected_size}",
            bundle.display()
        )));
    }
    Ok(())
}

/// An absolute app directory without `..`, and not `/` itself.
fn validate_app_dir(app_dir: &str) -> Result<PathBuf, JobError> {
    let path = Path::new(app_dir);
    let normal = path
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count();
    let clean = path.components().all(|c| {
        matches!(
            c,
            Component::RootDir | Component::Normal(_) | Component::CurDir
        )
    });
    if !path.is_absolute() || !clean || normal == 0 {
        return Err(failed(&format!(
            "app_dir {app_dir:?} must be an absolute path below / without `..`"
        )));
    }
    Ok(path.to_path_buf())
}

/// A relative compose file path without `..` (it is looked up inside the release).
fn validate_compose_file(file: &str) -> Result<PathBuf, JobError> {
    let path = Path::new(file);
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => {
                return Err(failed(&format!(
                    "compose_file {file:?} must be a relative path inside the release, without `..`"
                )))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(failed("compose_file is empty"));
    }
    Ok(out)
}

/// A Compose project name as both Compose versions accept it unchanged: lowercase letters,
/// digits, `-` and `_`, starting with a letter or digit.
pub(super) fn validate_project(project: &str) -> Result<String, JobError> {
    let ok = project
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && project.len() <= 63
        && project
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(project.to_string())
    } else {
        Err(failed(&format!(
            "compose_project {project:?} must be 1 to 63 of [a-z0-9_-], starting with a letter or digit"
        )))
    }
}

/// A failed job with `message`.
pub(super) fn failed(message: &str) -> JobError {
    JobError::Failed(message.to_string())
}

fn redacted(error: JobError, events: &JobEvents) -> JobError {
    match error {
        JobError::Failed(m) => JobError::Failed(events.redact(&m)),
        JobError::Cancelled(m) => JobError::Cancelled(events.redact(&m)),
    }
}

fn log_outcome(
    what: &str,
    deploy_id: &str,
    app: &str,
    result: &Result<String, JobError>,
    events: &JobEvents,
) {
    match result {
        Ok(summary) => tracing::info!(deploy_id, app, "{what}: {}", events.redact(summary)),
        Err(e) => tracing::warn!(
            deploy_id,
            app,
            "{what} failed: {}",
            events.redact(&e.to_string())
        ),
    }
}

/// Which part of the time a step counts toward.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    /// The agent's own work (unpack, switch, prune, audit).
    Ours,
    /// Compose commands (and finding Compose).
    Compose,
    /// Waiting for health.
    Health,
}

/// One deploy's reporting: steps as events and audit lines, and where the time went.
pub(super) struct Ctx<'a> {
    pub(super) events: &'a JobEvents,
    pub(super) app_dir: &'a Path,
    deploy_id: &'a str,
    app: &'a str,
    environment: &'a str,
    started: Instant,
    /// Microseconds spent in Compose and in health waits; atomics keep the future `Send`.
    compose_us: AtomicU64,
    health_us: AtomicU64,
}

impl<'a> Ctx<'a> {
    fn new(
        events: &'a JobEvents,
        app_dir: &'a Path,
        deploy_id: &'a str,
        app: &'a str,
        environment: &'a str,
    ) -> Self {
        Self {
            events,
            app_dir,
            deploy_id,
            app,
            environment,
            started: Instant::now(),
            compose_us: AtomicU64::new(0),
            health_us: AtomicU64::new(0),
        }
    }

    fn account(&self, kind: Kind, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        match kind {
            Kind::Ours => {}
            Kind::Compose => {
                self.compose_us.fetch_add(us, Ordering::Relaxed);
            }
            Kind::Health => {
                self.health_us.fetch_add(us, Ordering::Relaxed);
            }
        }
    }

    /// Awaits `fut`, counting its time toward `kind`.
    pub(super) async fn timed<T>(&self, kind: Kind, fut: impl Future<Output = T>) -> T {
        let t = Instant::now();
        let out = fut.await;
        self.account(kind, t.elapsed());
        out
    }

    /// Runs one step: STARTED, then SUCCEEDED with the detail `fut` returns or FAILED with
    /// its error, each end also written to the audit log.
    pub(super) async fn step(
        &self,
        name: &str,
        commit: impl AsRef<str>,
        kind: Kind,
        fut: impl Future<Output = Result<String, JobError>>,
    ) -> Result<(), JobError> {
        let commit = commit.as_ref();
        self.events
            .step(name, StepStatus::Started, "", Duration::ZERO);
        let t = Instant::now();
        let result = fut.await;
        let elapsed = t.elapsed();
        self.account(kind, elapsed);
        match result {
            Ok(detail) => {
                self.finish(name, commit, StepStatus::Succeeded, &detail, elapsed);
                Ok(())
            }
            Err(e) => {
                let e = redacted(e, self.events);
                self.finish(name, commit, StepStatus::Failed, &e.to_string(), elapsed);
                Err(e)
            }
        }
    }

    pub(super) fn skip(&self, name: &str, commit: &str, why: &str) {
        self.finish(name, commit, StepStatus::Skipped, why, Duration::ZERO);
    }

    pub(super) fn finish(
        &self,
        name: &str,
        commit: &str,
        status: StepStatus,
        detail: &str,
        took: Duration,
    ) {
        self.events.step(name, status, detail, took);
        let outcome = match status {
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Started => "started",
            StepStatus::Unspecified => "unknown",
        };
        let r = |s: &str| self.events.redact(s);
        let line = AuditLine {
            deploy_id: r(self.deploy_id),
            app: r(self.app),
            environment: r(self.environment),
            commit: r(commit),
            step: name.to_string(),
            outcome: outcome.to_string(),
            detail: r(&format!("{detail} ({}ms)", took.as_millis())),
        };
        // The audit log is a record, not a gate: a full disk must not fail a healthy deploy.
        if let Err(e) = release::audit(self.app_dir, &line) {
            self.events
                .log("agent", &format!("could not append to the audit log: {e}"));
        }
    }

    /// Logs where the time went and returns it as text ("12.3s (agent 45ms, ...)").
    pub(super) fn report_timing(&self) -> String {
        let total = self.started.elapsed();
        let compose = Duration::from_micros(self.compose_us.load(Ordering::Relaxed));
        let health = Duration::from_micros(self.health_us.load(Ordering::Relaxed));
        let ours = total.saturating_sub(compose).saturating_sub(health);
        let text = format!(
            "{:.2}s (agent {:.1}ms, compose {:.2}s, health {:.2}s)",
            total.as_secs_f64(),
            ours.as_secs_f64() * 1000.0,
            compose.as_secs_f64(),
            health.as_secs_f64()
        );
        self.events.log("agent", &format!("timing: {text}"));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_validated() {
        assert!(validate_app_dir("/srv/shop").is_ok());
        for bad in ["", "srv/shop", "/", "/srv/../etc", "./x"] {
            assert!(validate_app_dir(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            validate_compose_file("./deploy/compose.yml").ok(),
            Some(PathBuf::from("deploy/compose.yml"))
        );
        for bad in ["", ".", "/etc/compose.yml", "../compose.yml", "a/../../b"] {
            assert!(validate_compose_file(bad).is_err(), "{bad:?}");
        }
        assert!(validate_project("shop_web-2").is_ok());
        for bad in ["", "Shop", "-x", "a b", "x.y", &"a".repeat(64)] {
            assert!(validate_project(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bundles_are_checked_against_the_signed_hash_and_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b");
        std::fs::write(&path, b"abc").expect("write");
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert!(verify_bundle(&path, sha, 3).is_ok());
        assert!(verify_bundle(&path, sha, 0).is_ok());
        let e = verify_bundle(&path, sha, 4).expect_err("size").to_string();
        assert!(e.contains("has 3 bytes, but the job says 4"), "{e}");
        let e = verify_bundle(&path, &"0".repeat(64), 3)
            .expect_err("hash")
            .to_string();
        assert!(e.contains(&format!("has sha256 {sha}")), "{e}");
    }
}
