//! SIGHUP: the agent re-reads its config file. When the new file is invalid it says why and
//! keeps running on the old one. Otherwise the `[jobs]` policy applies to the next job at
//! once, and a change to the connection's settings (controller address, server name, report
//! interval, collectors, labels, backoff) reconnects with them; jobs in progress go on. What
//! only a restart changes (host name, TLS files, state directory, trusted keys, metrics
//! listener) is named in the log and keeps its running value.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AgentConfig;
use crate::jobs::Jobs;

/// How a new config differs from the running one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Keys put in force by the reload.
    pub applied: Vec<&'static str>,
    /// Keys that only a restart changes; their running values stay.
    pub need_restart: Vec<&'static str>,
    /// Whether the connection must be opened again for the applied keys.
    pub reconnect: bool,
}

/// Compares the running config with the new one.
pub fn changes(running: &AgentConfig, new: &AgentConfig) -> Changes {
    let mut out = Changes::default();
    let connection = [
        ("controller", running.controller != new.controller),
        ("server_name", running.server_name != new.server_name),
        (
            "report_interval",
            running.report_interval != new.report_interval,
        ),
        (
            "full_report_every",
            running.full_report_every != new.full_report_every,
        ),
        ("backoff", running.backoff != new.backoff),
        ("collectors", running.collectors != new.collectors),
        ("labels", running.labels != new.labels),
    ];
    for (key, changed) in connection {
        if changed {
            out.applied.push(key);
            out.reconnect = true;
        }
    }
    for (key, changed) in [
        (
            "jobs.state_dir",
            running.jobs.state_dir != new.jobs.state_dir,
        ),
        (
            "jobs.trusted_keys",
            running.jobs.trusted_keys != new.jobs.trusted_keys,
        ),
    ] {
        if changed {
            out.need_restart.push(key);
        }
    }
    let mut policy = new.jobs.clone();
    policy.state_dir = running.jobs.state_dir.clone();
    policy.trusted_keys = running.jobs.trusted_keys.clone();
    if policy != running.jobs {
        out.applied.push("jobs");
    }
    for (key, changed) in [
        ("host_name", running.host_name != new.host_name),
        ("tls", running.tls != new.tls),
        ("metrics", running.metrics != new.metrics),
    ] {
        if changed {
            out.need_restart.push(key);
        }
    }
    out
}

/// The SIGHUP stream, taken before anything slow: until it exists SIGHUP's default action
/// (exit 129) applies.
pub fn hangups() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Reloads on every SIGHUP until `shutdown`; the connection follows `settings`.
pub async fn run(
    mut hangups: tokio::signal::unix::Signal,
    path: PathBuf,
    jobs: Arc<Jobs>,
    settings: watch::Sender<Arc<AgentConfig>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            got = hangups.recv() => if got.is_none() { return },
            _ = shutdown.cancelled() => return,
        }
        let loaded = AgentConfig::load(&path).and_then(|c| c.check_files(&path).map(|()| c));
        match loaded {
            Err(e) => error!(
                file = %path.display(),
                error = %e,
                "config reload refused; the running config stays in force"
            ),
            Ok(mut new) => {
                let running = settings.borrow().clone();
                let changes = changes(&running, &new);
                for key in &changes.need_restart {
                    warn!(key, "changed in the config file, but only a restart puts it in force; the running value stays");
                }
                // What really runs: the restart-only keys stay as they are.
                new.host_name = running.host_name.clone();
                new.tls = running.tls.clone();
                new.metrics = running.metrics.clone();
                new.jobs.state_dir = running.jobs.state_dir.clone();
                new.jobs.trusted_keys = running.jobs.trusted_keys.clone();
                jobs.set_config(&new.jobs);
                if changes.reconnect {
                    settings.send_replace(Arc::new(new));
                } else {
                    // Kept for the next comparison without disturbing the session.
                    settings.send_if_modified(|c| {
                        *c = Arc::new(new);
                        false
                    });
                }
                if changes.applied.is_empty() {
                    info!(file = %path.display(), "config reloaded: nothing that a reload applies changed");
                } else {
                    info!(
                        file = %path.display(),
                        applied = %changes.applied.join(", "),
                        reconnect = changes.reconnect,
                        "config reloaded"
                    );
                }
            }
        }
    }
}
