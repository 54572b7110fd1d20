//! SIGHUP: the controller re-reads its config file and puts in force what can change while it
//! runs (apps, the pipeline's webhooks and hooks, backup settings and schedules, the isolation
//! policy, the TLS certificate, key and CA), logs what changed, and keeps running on the old
//! config when the new file is invalid, saying why. What only a restart can change (listen
//! addresses, data directory, store, signing key, enrolment CA, agent liveness, job timing) is
//! named in the log and keeps its running value.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::ControllerConfig;

/// What a reload reaches: the parts that take new settings while running.
pub struct Reloadable {
    /// Apps and `[pipeline]`.
    pub pipeline: Arc<crate::pipeline::Pipeline>,
    /// `[isolation]`, when the controller started with one.
    pub isolation: Option<Arc<crate::isolation::IsolationState>>,
    /// `[backups]`, when the controller started with one.
    pub backups: Option<Arc<crate::backups::Backups>>,
    /// The server's TLS settings for new connections.
    pub tls: Arc<crate::tls::ServerTls>,
    /// The issuing CA's certificate (`[pki]`), which client chains may use.
    pub issuer_der: Option<rustls::pki_types::CertificateDer<'static>>,
}

/// How the sections of two configs differ.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Changed sections put in force now (e.g. `apps (added: shop)`, `isolation`).
    pub applied: Vec<String>,
    /// Changed sections that only a restart puts in force (their running values stay).
    pub need_restart: Vec<String>,
}

/// Compares `running` with `new`, section by section.
pub fn changes(running: &ControllerConfig, new: &ControllerConfig) -> Changes {
    let mut out = Changes::default();
    if running.apps != new.apps {
        out.applied
            .push(format!("apps ({})", app_changes(running, new)));
    }
    if running.pipeline != new.pipeline {
        out.applied.push("pipeline".into());
    }
    optional_section(
        &mut out,
        "isolation",
        running.isolation.as_ref(),
        new.isolation.as_ref(),
    );
    optional_section(
        &mut out,
        "backups",
        running.backups.as_ref(),
        new.backups.as_ref(),
    );
    if running.tls != new.tls {
        out.applied.push("tls".into());
    }
    let restart_only = [
        ("listen", running.listen != new.listen),
        ("data_dir", running.data_dir != new.data_dir),
        ("store", running.store != new.store),
        ("signing", running.signing != new.signing),
        ("pki", running.pki != new.pki),
        ("agents", running.agents != new.agents),
        ("jobs", running.jobs != new.jobs),
        ("metrics", running.metrics != new.metrics),
    ];
    out.need_restart.extend(
        restart_only
            .into_iter()
            .filter(|(_, changed)| *changed)
            .map(|(name, _)| name.to_string()),
    );
    out
}

/// A section that may be absent: changed values are applied, but adding or removing the
/// section starts or stops a whole subsystem, which takes a restart.
fn optional_section<T: PartialEq>(out: &mut Changes, name: &str, old: Option<&T>, new: Option<&T>) {
    match (old, new) {
        (Some(a), Some(b)) if a != b => out.applied.push(name.into()),
        (None, Some(_)) => out.need_restart.push(format!("{name} (section added)")),
        (Some(_), None) => out.need_restart.push(format!("{name} (section removed)")),
        _ => {}
    }
}

/// `added: a, b; removed: c; changed: d`.
fn app_changes(running: &ControllerConfig, new: &ControllerConfig) -> String {
    let find = |c: &ControllerConfig, name: &str| c.apps.iter().find(|a| a.name == name).cloned();
    let mut parts = Vec::new();
    let added: Vec<&str> = new
        .apps
        .iter()
        .filter(|a| find(running, &a.name).is_none())
        .map(|a| a.name.as_str())
        .collect();
    let removed: Vec<&str> = running
        .apps
        .iter()
        .filter(|a| find(new, &a.name).is_none())
        .map(|a| a.name.as_str())
        .collect();
    let changed: Vec<&str> = new
        .apps
        .iter()
        .filter(|a| find(running, &a.name).is_some_and(|old| old != **a))
        .map(|a| a.name.as_str())
        .collect();
    for (label, names) in [("added", added), ("removed", removed), ("changed", changed)] {
        if !names.is_empty() {
            parts.push(format!("{label}: {}", names.join(", ")));
        }
    }
    if parts.is_empty() {
        "reordered".into()
    } else {
        parts.join("; ")
    }
}

/// Why a reload was refused; the running config stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The controller was started without a config file (`sentinel dev`).
    #[error("this controller has no config file to re-read (sentinel dev writes its own)")]
    NoFile,
    /// The file does not load or does not validate.
    #[error("{0}")]
    Invalid(#[from] sentinel_daemon::config::ConfigError),
    /// The TLS files it names do not make a server config.
    #[error("the TLS files of [tls]: {0}")]
    Tls(#[from] sentinel_daemon::tls::TlsError),
}

impl Reloadable {
    /// Re-reads `path` and puts what can change in force. On success the config now running
    /// (the new one, with the restart-only sections kept from `running`) replaces `running`,
    /// and the changes are returned; on error nothing changed.
    pub fn reload(
        &self,
        path: Option<&PathBuf>,
        running: &mut ControllerConfig,
    ) -> Result<Changes, ReloadError> {
        let path = path.ok_or(ReloadError::NoFile)?;
        let mut new = ControllerConfig::load(path)?;
        new.check_files(path)?;
        // Built before anything is applied: a broken certificate refuses the whole reload.
        let tls = crate::tls::server_config(&new.tls, self.issuer_der.clone())?;
        let changes = changes(running, &new);
        self.pipeline.reload(&new.apps, new.pipeline.clone());
        if let (Some(state), Some(policy)) = (&self.isolation, &new.isolation) {
            state.reload(policy.clone());
        }
        if let (Some(backups), Some(config)) = (&self.backups, &new.backups) {
            backups.reload(config.clone());
        }
        // Always: the files may hold a renewed certificate under the same names.
        self.tls.replace(tls);
        keep_restart_only(&mut new, running);
        *running = new;
        Ok(changes)
    }
}

/// Carries the sections only a restart changes from `running` into `new`, so that the
/// config kept as running describes what really runs (and the next reload reports them
/// again while they still differ from the file).
fn keep_restart_only(new: &mut ControllerConfig, running: &ControllerConfig) {
    new.listen = running.listen;
    new.data_dir = running.data_dir.clone();
    new.store = running.store.clone();
    new.signing = running.signing.clone();
    new.pki = running.pki.clone();
    new.agents = running.agents.clone();
    new.jobs = running.jobs.clone();
    new.metrics = running.metrics.clone();
    if running.isolation.is_some() != new.isolation.is_some() {
        new.isolation = running.isolation.clone();
    }
    if running.backups.is_some() != new.backups.is_some() {
        new.backups = running.backups.clone();
    }
}

/// The SIGHUP stream, taken as early as possible: until it exists SIGHUP's default action
/// (exit) applies.
pub fn hangups() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Reloads on every SIGHUP until `shutdown`.
pub async fn run(
    mut hangups: tokio::signal::unix::Signal,
    reloadable: Reloadable,
    mut running: ControllerConfig,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            got = hangups.recv() => if got.is_none() { return },
            _ = shutdown.cancelled() => return,
        }
        let path = running.source.clone();
        match reloadable.reload(path.as_ref(), &mut running) {
            Ok(changes) => {
                for section in &changes.need_restart {
                    warn!(
                        section = %section,
                        "changed in the config file, but only a restart puts it in force; the running value stays"
                    );
                }
                if changes.applied.is_empty() {
                    info!(
                        file = %file_name(path.as_ref()),
                        "config reloaded: nothing that a reload applies changed (certificates re-read)"
                    );
                } else {
                    info!(
                        file = %file_name(path.as_ref()),
                        applied = %changes.applied.join(", "),
                        "config reloaded"
                    );
                }
            }
            Err(e) => error!(
                file = %file_name(path.as_ref()),
                error = %e,
                "config reload refused; the running config stays in force"
            ),
        }
    }
}

fn file_name(path: Option<&PathBuf>) -> String {
    path.map(|p| p.display().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> ControllerConfig {
        let text =
            format!("{extra}\n[tls]\nca = \"/ca.pem\"\ncert = \"/c.pem\"\nkey = \"/c.key\"\n");
        toml::from_str(&text).expect("test config parses")
    }

    #[test]
    fn restart_only_sections_are_named_and_kept_running() {
        let running = config("listen = \"127.0.0.1:7443\"\n");
        let mut new = config("listen = \"127.0.0.1:7444\"\n[jobs]\nttl = \"5m\"\n");
        let c = changes(&running, &new);
        assert_eq!(c.applied, Vec::<String>::new());
        assert_eq!(c.need_restart, ["listen", "jobs"]);
        keep_restart_only(&mut new, &running);
        assert_eq!(new, running);
    }

    #[test]
    fn no_change_is_no_change() {
        let a = config("");
        assert_eq!(changes(&a, &a.clone()), Changes::default());
    }
}
