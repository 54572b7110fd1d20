//! Blue/green deploys behind the host's nginx: two slots, each its own Compose project
//! (`<project>-blue`, `<project>-green`) started with `SENTINEL_PORT` set to the slot's port,
//! and an upstream file (`server 127.0.0.1:PORT;`) that nginx includes and that says which
//! slot the public reaches.
//!
//! A deploy: build and start the new release in the idle slot (the migration runs there,
//! while the live slot still serves), check its health on the slot's port, write the
//! upstream file, run the proxy's config test (on failure the file is restored), reload,
//! check health through the proxy, then drain (the old slot keeps running for `drain`) and
//! stop the old slot (`keep_previous`) or remove it. Until the old slot is stopped, any
//! failure puts the upstream back on it: the public never loses it. A rollback starts the
//! previous release's kept slot again (no rebuild) or, when it is gone, starts that release
//! in the idle slot, and switches the same way.
//!
//! Which slot is live, and which release each slot holds, is kept in `APP_DIR/slots.json`
//! beside the release history, so it survives an agent restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use sentinel_proto::v1::{BlueGreen, DeployParams, HealthCheck, StepStatus};

use super::compose::{self, Compose, ComposeFlavor};
use super::deploy::{compose_for, describe_check, failed, validate_project, Ctx, Kind};
use super::events::JobError;
use super::health;
use super::release;

/// The slot state, inside the app directory.
pub const SLOTS_FILE: &str = "slots.json";
/// The placeholder a blue/green environment's health URL has where the slot's port goes.
pub const PORT_PLACEHOLDER: &str = "{port}";
/// The variable compose sees holding the slot's port.
pub const PORT_VARIABLE: &str = "SENTINEL_PORT";
/// Permission bits of the upstream file (nginx's workers read it).
const UPSTREAM_MODE: u32 = 0o644;

/// One of the two slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// The first port.
    Blue,
    /// The second port.
    Green,
}

impl Slot {
    /// The slot's name, as in its project name and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Slot::Blue => "blue",
            Slot::Green => "green",
        }
    }

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::Blue => Slot::Green,
            Slot::Green => Slot::Blue,
        }
    }
}

/// What a slot holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRelease {
    /// The release its containers were made from.
    pub commit: String,
    /// Whether they were left running (false: stopped, kept for a rollback).
    pub running: bool,
}

/// `slots.json`: which slot the upstream file points at, and what each slot holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    /// The slot the public reaches; none before the first blue/green deploy.
    pub live: Option<Slot>,
    /// Slot blue's release; none when it has no containers.
    pub blue: Option<SlotRelease>,
    /// Slot green's release.
    pub green: Option<SlotRelease>,
}

impl SlotState {
    /// Reads `APP_DIR/slots.json`; a missing file is the empty state, an unreadable one an
    /// error (guessing which slot serves could stop the live one).
    pub fn load(app_dir: &Path) -> Result<Self, JobError> {
        let path = app_dir.join(SLOTS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                failed(&format!(
                    "{} is not a slot state: {e} (fix or remove it; it says which slot serves)",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(failed(&format!("reading {}: {e}", path.display()))),
        }
    }

    fn save(&self, app_dir: &Path) -> Result<(), JobError> {
        let path = app_dir.join(SLOTS_FILE);
        let mut bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| failed(&format!("encoding the slot state: {e}")))?;
        bytes.push(b'\n');
        sentinel_daemon::fs::write_atomic(&path, &bytes, 0o644)
            .map_err(|e| failed(&format!("writing the slot state: {e}")))
    }

    /// What `slot` holds.
    pub fn get(&self, slot: Slot) -> Option<&SlotRelease> {
        match slot {
            Slot::Blue => self.blue.as_ref(),
            Slot::Green => self.green.as_ref(),
        }
    }

    fn set(&mut self, slot: Slot, value: Option<SlotRelease>) {
        match slot {
            Slot::Blue => self.blue = value,
            Slot::Green => self.green = value,
        }
    }
}

/// The lines of the upstream file that send the public to `port`.
pub fn upstream_text(slot: Slot, commit: &str, port: u16) -> String {
    format!(
        "# Written by hostagent (blue/green): slot {}, release {commit}. Do not edit.\n\
         server 127.0.0.1:{port};\n",
        slot.name()
    )
}

/// One blue/green environment as a deploy or rollback drives it.
pub(super) struct Slots<'a> {
    ctx: &'a Ctx<'a>,
    bg: &'a BlueGreen,
    flavor: ComposeFlavor,
    compose_rel: &'a Path,
    project: &'a str,
    upstream_file: PathBuf,
    ports: [u16; 2],
    /// A rollback job (its failure does not "roll back to" the release that kept serving).
    rolling_back: bool,
}

/// How a release gets into a slot.
enum Bring<'p> {
    /// Build it and start it, running the migration first when there is one.
    Build {
        migration: Option<(&'p str, &'p str)>,
    },
    /// Start the slot's kept containers again; no build.
    StartKept,
}

impl<'a> Slots<'a> {
    /// Checks the job's slot settings (ports, upstream file, commands, slot project names).
    pub(super) fn new(
        ctx: &'a Ctx<'a>,
        bg: &'a BlueGreen,
        flavor: ComposeFlavor,
        compose_rel: &'a Path,
        project: &'a str,
    ) -> Result<Self, JobError> {
        let port = |p: u32, which: &str| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| failed(&format!("blue_green {which}_port {p} is not a port")))
        };
        let ports = [port(bg.blue_port, "blue")?, port(bg.green_port, "green")?];
        if ports[0] == ports[1] {
            return Err(failed(&format!(
                "blue_green ports must differ (both are {})",
                ports[0]
            )));
        }
        let upstream_file = PathBuf::from(&bg.upstream_file);
        if !upstream_file.is_absolute() {
            return Err(failed(&format!(
                "blue_green upstream_file {:?} must be an absolute path",
                bg.upstream_file
            )));
        }
        if bg.reload.is_empty() || bg.test.is_empty() {
            return Err(failed(
                "blue_green needs both a reload and a config test command",
            ));
        }
        for slot in [Slot::Blue, Slot::Green] {
            validate_project(&format!("{project}-{}", slot.name()))?;
        }
        Ok(Self {
            ctx,
            bg,
            flavor,
            compose_rel,
            project,
            upstream_file,
            ports,
            rolling_back: false,
        })
    }

    fn port(&self, slot: Slot) -> u16 {
        match slot {
            Slot::Blue => self.ports[0],
            Slot::Green => self.ports[1],
        }
    }

    fn slot_project(&self, slot: Slot) -> String {
        format!("{}-{}", self.project, slot.name())
    }

    /// The slot's Compose project with release `commit`'s compose file and its port.
    fn compose(&self, slot: Slot, commit: &str) -> Compose {
        let file = release::release_dir(self.ctx.app_dir, commit).join(self.compose_rel);
        let mut compose = compose_for(self.flavor, &self.slot_project(slot), &file);
        compose.env = vec![(PORT_VARIABLE.to_string(), self.port(slot).to_string())];
        compose
    }

    /// How a failure names the release that kept serving: a failed deploy "rolled back to" it
    /// (the words the controller reads as ROLLED_BACK, as for recreate); a failed rollback
    /// left it live.
    fn kept(&self, commit: &str) -> String {
        if self.rolling_back {
            format!("{commit} is still live: ")
        } else {
            format!("rolled back to {commit}: ")
        }
    }

    /// "slot green (port 8102)".
    fn describe(&self, slot: Slot) -> String {
        format!("slot {} (port {})", slot.name(), self.port(slot))
    }

    /// Deploys `params.commit` (already unpacked) into the idle slot and switches to it.
    /// Returns what the summary adds ("; slot green live on port 8102, ...").
    pub(super) async fn deploy(&self, params: &DeployParams) -> Result<String, JobError> {
        let commit = params.commit.as_str();
        let mut state = SlotState::load(self.ctx.app_dir)?;
        let old = state.live;
        let new = old.map(Slot::other).unwrap_or(Slot::Blue);
        self.ctx.events.log(
            "agent",
            &format!(
                "blue/green: {} live; deploying {commit} into {}",
                old.map(|s| self.describe(s))
                    .unwrap_or_else(|| "no slot".to_string()),
                self.describe(new)
            ),
        );
        let migration = if params.migration.is_empty() {
            None
        } else {
            Some((params.migration_service.trim(), params.migration.as_str()))
        };
        self.bring_up(
            &mut state,
            new,
            commit,
            Bring::Build { migration },
            params.health.as_ref(),
        )
        .await?;
        self.cut_over(&mut state, new, commit, old, params.health.as_ref(), false)
            .await
    }

    /// Rolls back to `target` (a release on this host): starts the slot that still holds it,
    /// or starts it in the idle slot, and switches to it. Returns what the summary adds.
    pub(super) async fn rollback(
        mut self,
        target: &str,
        check: Option<&HealthCheck>,
    ) -> Result<String, JobError> {
        self.rolling_back = true;
        let mut state = SlotState::load(self.ctx.app_dir)?;
        let live = state.live;
        if let Some(slot) = live.filter(|s| state.get(*s).is_some_and(|r| r.commit == target)) {
            // The target already serves (a cancelled deploy that never switched): make sure
            // the upstream says so and nothing else runs.
            self.ctx
                .step("switch", target, Kind::Ours, async {
                    self.write_checked(slot, target).await?;
                    Ok(format!(
                        "upstream -> {} (it was already live)",
                        self.describe(slot)
                    ))
                })
                .await?;
            release::switch_back(self.ctx.app_dir, target)?;
            let idle = slot.other();
            let retired = match state.get(idle) {
                Some(r) if r.running => self.retire(&mut state, idle, self.bg.keep_previous).await,
                _ => String::new(),
            };
            return Ok(format!("; {} live{retired}", self.describe(slot)));
        }
        let idle = live.map(Slot::other).unwrap_or(Slot::Blue);
        let kept = state.get(idle).is_some_and(|r| r.commit == target);
        let how = if kept {
            self.ctx.events.log(
                "agent",
                &format!(
                    "blue/green: {target} is kept in {}; starting it again (no rebuild)",
                    self.describe(idle)
                ),
            );
            Bring::StartKept
        } else {
            self.ctx.events.log(
                "agent",
                &format!(
                    "blue/green: no slot holds {target}; starting it in {}",
                    self.describe(idle)
                ),
            );
            Bring::Build { migration: None }
        };
        self.bring_up(&mut state, idle, target, how, check).await?;
        self.cut_over(&mut state, idle, target, live, check, true)
            .await
    }

    /// Puts `commit` into `slot` and checks it there (on its own port); the live slot is not
    /// touched. On failure the slot is stopped again and the error says the old one serves.
    async fn bring_up(
        &self,
        state: &mut SlotState,
        slot: Slot,
        commit: &str,
        how: Bring<'_>,
        check: Option<&HealthCheck>,
    ) -> Result<(), JobError> {
        let ctx = self.ctx;
        let events = ctx.events;
        let compose = self.compose(slot, commit);
        if !compose.file.is_file() {
            return Err(failed(&format!(
                "release {commit} has no compose file {}",
                self.compose_rel.display()
            )));
        }
        let serving = state.live.map(|s| self.describe(s));
        // Set once the slot's containers are the new release's (they must be stopped again
        // on failure); before that the slot still holds what it held.
        let touched = AtomicBool::new(false);
        let steps = async {
            match how {
                Bring::StartKept => {
                    ctx.step("start", commit, Kind::Compose, async {
                        compose.run(&["start"], events, "start").await?;
                        Ok(format!(
                            "started the kept containers of {}",
                            self.describe(slot)
                        ))
                    })
                    .await?;
                    touched.store(true, Ordering::Relaxed);
                    self.mark(state, slot, commit, true)?;
                }
                Bring::Build { migration } => {
                    ctx.step("build", commit, Kind::Compose, async {
                        compose.build(events, "build").await?;
                        Ok(format!("images of {} built", self.describe(slot)))
                    })
                    .await?;
                    match migration {
                        None => ctx.skip("migrate", commit, "no migration"),
                        Some((service, script)) => {
                            if service.is_empty() {
                                return Err(failed(
                                    "the deploy has a migration but no migration_service to run it in",
                                ));
                            }
                            ctx.step("migrate", commit, Kind::Compose, async {
                                compose
                                    .run(
                                        &["run", "--rm", "-T", service, "sh", "-c", script],
                                        events,
                                        "migrate",
                                    )
                                    .await?;
                                Ok(format!(
                                    "migration ran in {service} of {} while {} served",
                                    self.describe(slot),
                                    serving.as_deref().unwrap_or("no slot")
                                ))
                            })
                            .await?;
                        }
                    }
                    // Containers from now on: remember them even if `up` fails half-way.
                    touched.store(true, Ordering::Relaxed);
                    self.mark(state, slot, commit, true)?;
                    ctx.step("up", commit, Kind::Compose, async {
                        compose
                            .run(&["up", "-d", "--remove-orphans"], events, "up")
                            .await?;
                        Ok(format!("started {}", self.describe(slot)))
                    })
                    .await?;
                }
            }
            match check {
                Some(check) => {
                    let direct = self.direct_check(check, slot);
                    ctx.step("health", commit, Kind::Health, async {
                        health::wait_healthy(&direct, &self.slot_project(slot), events).await?;
                        Ok(format!(
                            "{} on {}",
                            describe_check(&direct),
                            self.describe(slot)
                        ))
                    })
                    .await
                }
                None => {
                    ctx.skip("health", commit, "no health check configured");
                    Ok(())
                }
            }
        };
        let Err(e) = steps.await else {
            return Ok(());
        };
        // Nothing was switched: the live slot served all along. Stop the new one so it
        // holds no port and no memory; its containers stay for inspection.
        let stopped = if touched.load(Ordering::Relaxed) {
            match compose.run(&["stop"], events, "stop").await {
                Ok(()) => {
                    let _ = self.mark(state, slot, commit, false);
                    format!("; {} stopped", self.describe(slot))
                }
                Err(stop) => format!("; stopping {} failed too: {stop}", self.describe(slot)),
            }
        } else {
            String::new()
        };
        let live_commit = state
            .live
            .and_then(|s| state.get(s))
            .map(|r| r.commit.clone());
        let serving = match (serving, live_commit) {
            (Some(s), Some(c)) => format!(
                "; {}the upstream was never switched, {s} kept serving",
                self.kept(&c)
            ),
            (Some(s), None) => format!("; the upstream was never switched: {s} kept serving"),
            (None, _) => "; no slot was live before, so nothing serves".to_string(),
        };
        Err(failed(&format!("{e}{stopped}{serving}")))
    }

    /// Switches the upstream from `old` to `new` (healthy on its port), checks health through
    /// the proxy, then drains and retires `old`. Until `old` is stopped a failure switches
    /// back to it. `rollback` only changes how `current` moves.
    async fn cut_over(
        &self,
        state: &mut SlotState,
        new: Slot,
        commit: &str,
        old: Option<Slot>,
        check: Option<&HealthCheck>,
        rollback: bool,
    ) -> Result<String, JobError> {
        let ctx = self.ctx;
        let events = ctx.events;
        let old_commit = old.and_then(|s| state.get(s)).map(|r| r.commit.clone());
        let switched = ctx
            .step("switch", commit, Kind::Ours, async {
                self.write_checked(new, commit).await?;
                Ok(format!(
                    "upstream -> {}{}",
                    self.describe(new),
                    old.map(|s| format!(", was {}", self.describe(s)))
                        .unwrap_or_default()
                ))
            })
            .await;
        if let Err(e) = switched {
            return Err(self
                .failed_back(state, new, commit, old, &old_commit, e, false)
                .await);
        }
        state.live = Some(new);
        self.save(state)?;

        let proxied = match (self.bg.through_proxy_url.trim(), check) {
            ("", _) => {
                ctx.skip("health-proxy", commit, "no through_proxy_url configured");
                Ok(())
            }
            (url, check) => {
                let via = self.proxy_check(url, check);
                ctx.step("health-proxy", commit, Kind::Health, async {
                    health::wait_healthy(&via, &self.slot_project(new), events).await?;
                    Ok(describe_check(&via))
                })
                .await
            }
        };
        if let Err(e) = proxied {
            return Err(self
                .failed_back(state, new, commit, old, &old_commit, e, true)
                .await);
        }
        let moved = if rollback {
            release::switch_back(ctx.app_dir, commit)
        } else {
            release::switch_current(ctx.app_dir, commit)
        };
        moved?;

        let Some(old) = old.filter(|s| state.get(*s).is_some_and(|r| r.running)) else {
            return Ok(format!("; {} live", self.describe(new)));
        };
        let drain = Duration::from_millis(u64::from(self.bg.drain_ms));
        ctx.step("drain", commit, Kind::Ours, async {
            tokio::time::sleep(drain).await;
            Ok(format!(
                "{} kept running {}ms for in-flight requests",
                self.describe(old),
                drain.as_millis()
            ))
        })
        .await?;
        let retired = self.retire(state, old, self.bg.keep_previous).await;
        Ok(format!("; {} live{retired}", self.describe(new)))
    }

    /// After a failed switch or proxy check: the upstream back on `old` (if any), the new
    /// slot stopped, and the error that says so.
    #[allow(clippy::too_many_arguments)]
    async fn failed_back(
        &self,
        state: &mut SlotState,
        new: Slot,
        commit: &str,
        old: Option<Slot>,
        old_commit: &Option<String>,
        error: JobError,
        after_switch: bool,
    ) -> JobError {
        let ctx = self.ctx;
        let what = if after_switch {
            format!("health through the proxy failed: {error}")
        } else {
            error.to_string()
        };
        let (Some(old), Some(old_commit)) = (old, old_commit.as_deref()) else {
            let detail = if after_switch {
                format!(
                    "no slot was live before; the upstream stays on {}",
                    self.describe(new)
                )
            } else {
                "no slot was live before; nothing serves".to_string()
            };
            ctx.finish(
                "switch-back",
                commit,
                StepStatus::Skipped,
                &detail,
                Duration::ZERO,
            );
            return failed(&format!("{what}; {detail}"));
        };
        let back = if after_switch {
            let t = std::time::Instant::now();
            ctx.events
                .step("switch-back", StepStatus::Started, "", Duration::ZERO);
            let result = self.write_checked(old, old_commit).await;
            let status = if result.is_ok() {
                StepStatus::Succeeded
            } else {
                StepStatus::Failed
            };
            let detail = match &result {
                Ok(()) => format!("upstream -> {} again", self.describe(old)),
                Err(e) => format!("switching back to {} failed: {e}", self.describe(old)),
            };
            ctx.finish("switch-back", old_commit, status, &detail, t.elapsed());
            match result {
                Ok(()) => {
                    state.live = Some(old);
                    let _ = self.save(state);
                    format!(
                        "{}the upstream is back on {}, which was never stopped",
                        self.kept(old_commit),
                        self.describe(old)
                    )
                }
                Err(e) => format!(
                    "switching the upstream back to {} FAILED: {e}",
                    self.describe(old)
                ),
            }
        } else {
            format!(
                "{}the upstream stayed on {}, which was never stopped",
                self.kept(old_commit),
                self.describe(old)
            )
        };
        let compose = self.compose(new, commit);
        let stopped = match compose.run(&["stop"], ctx.events, "stop").await {
            Ok(()) => {
                let _ = self.mark(state, new, commit, false);
                format!("; {} stopped", self.describe(new))
            }
            Err(e) => format!("; stopping {} failed: {e}", self.describe(new)),
        };
        failed(&format!("{what}; {back}{stopped}"))
    }

    /// Stops (`keep`) or removes the old slot; a failure is reported, not fatal: the new
    /// release serves. Returns what the summary adds.
    async fn retire(&self, state: &mut SlotState, slot: Slot, keep: bool) -> String {
        let Some(commit) = state.get(slot).map(|r| r.commit.clone()) else {
            return String::new();
        };
        let compose = self.compose(slot, &commit);
        let (step, args): (&str, &[&str]) = if keep {
            ("stop-old", &["stop"])
        } else {
            ("remove-old", &["down", "--remove-orphans"])
        };
        let done = self
            .ctx
            .step(step, &commit, Kind::Compose, async {
                compose.run(args, self.ctx.events, step).await?;
                Ok(if keep {
                    format!(
                        "{} ({commit}) stopped, kept for a rollback",
                        self.describe(slot)
                    )
                } else {
                    format!("{} ({commit}) removed", self.describe(slot))
                })
            })
            .await;
        match done {
            Ok(()) => {
                let value = keep.then(|| SlotRelease {
                    commit: commit.clone(),
                    running: false,
                });
                state.set(slot, value);
                match self.save(state) {
                    Ok(()) if keep => format!(", {} ({commit}) stopped", self.describe(slot)),
                    Ok(()) => format!(", {} ({commit}) removed", self.describe(slot)),
                    Err(e) => format!(", {} retired but {e}", self.describe(slot)),
                }
            }
            Err(e) => format!("; retiring {} failed: {e}", self.describe(slot)),
        }
    }

    /// Writes the upstream file for `slot`, runs the config test (restoring the previous
    /// file when it fails) and reloads (restoring, and reloading again, when that fails).
    async fn write_checked(&self, slot: Slot, commit: &str) -> Result<(), JobError> {
        let events = self.ctx.events;
        let file = &self.upstream_file;
        let before = match std::fs::read(file) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(failed(&format!("reading {}: {e}", file.display()))),
        };
        let text = upstream_text(slot, commit, self.port(slot));
        sentinel_daemon::fs::write_atomic(file, text.as_bytes(), UPSTREAM_MODE)
            .map_err(|e| failed(&format!("writing the upstream file: {e}")))?;
        if let Err(e) = compose::run_argv(&self.bg.test, events, "switch").await {
            let restored = self.restore(before.as_deref());
            return Err(failed(&format!(
                "the proxy's config test failed: {e}; {restored}"
            )));
        }
        if let Err(e) = compose::run_argv(&self.bg.reload, events, "switch").await {
            let restored = self.restore(before.as_deref());
            // nginx keeps its old config when a reload fails; this is for a later reload.
            return Err(failed(&format!(
                "reloading the proxy failed: {e}; {restored}"
            )));
        }
        events.log(
            "agent",
            &format!(
                "upstream {} -> {}; proxy reloaded",
                file.display(),
                self.describe(slot)
            ),
        );
        Ok(())
    }

    /// Puts the upstream file back as it was; says how that went.
    fn restore(&self, before: Option<&[u8]>) -> String {
        let file = &self.upstream_file;
        let result = match before {
            Some(bytes) => sentinel_daemon::fs::write_atomic(file, bytes, UPSTREAM_MODE)
                .map_err(|e| e.to_string()),
            None => std::fs::remove_file(file).map_err(|e| e.to_string()),
        };
        match result {
            Ok(()) => format!("{} restored", file.display()),
            Err(e) => format!("restoring {} FAILED: {e}", file.display()),
        }
    }

    fn mark(
        &self,
        state: &mut SlotState,
        slot: Slot,
        commit: &str,
        running: bool,
    ) -> Result<(), JobError> {
        state.set(
            slot,
            Some(SlotRelease {
                commit: commit.to_string(),
                running,
            }),
        );
        self.save(state)
    }

    fn save(&self, state: &SlotState) -> Result<(), JobError> {
        state.save(self.ctx.app_dir)
    }

    /// The environment's check aimed at `slot`: `{port}` in its URL becomes the slot's port.
    fn direct_check(&self, check: &HealthCheck, slot: Slot) -> HealthCheck {
        HealthCheck {
            http_url: check
                .http_url
                .replace(PORT_PLACEHOLDER, &self.port(slot).to_string()),
            ..check.clone()
        }
    }

    /// Health as the public sees it: GET `url` (the expected status and timing of the
    /// environment's check); the containers were checked directly already.
    fn proxy_check(&self, url: &str, check: Option<&HealthCheck>) -> HealthCheck {
        let base = check.cloned().unwrap_or_default();
        HealthCheck {
            http_url: url.to_string(),
            container_health: false,
            ..base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_state_round_trips_and_a_corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(SlotState::load(dir.path()).ok(), Some(SlotState::default()));
        let state = SlotState {
            live: Some(Slot::Green),
            blue: Some(SlotRelease {
                commit: "abc".into(),
                running: false,
            }),
            green: Some(SlotRelease {
                commit: "def".into(),
                running: true,
            }),
        };
        state.save(dir.path()).expect("save");
        assert_eq!(SlotState::load(dir.path()).ok(), Some(state));
        let text = std::fs::read_to_string(dir.path().join(SLOTS_FILE)).expect("read");
        assert!(text.contains("\"live\": \"green\""), "{text}");
        std::fs::write(dir.path().join(SLOTS_FILE), "{\"live\": \"purple\"}").expect("write");
        let e = SlotState::load(dir.path())
            .expect_err("corrupt")
            .to_string();
        assert!(e.contains("slots.json is not a slot state"), "{e}");
    }

    #[test]
    fn the_upstream_names_the_slot_port() {
        let text = upstream_text(Slot::Green, "abc123", 8102);
        assert!(
            text.lines().any(|l| l == "server 127.0.0.1:8102;"),
            "{text}"
        );
        assert!(text.starts_with('#') && text.contains("slot green, release abc123"));
        assert_eq!(Slot::Blue.other(), Slot::Green);
    }
}
