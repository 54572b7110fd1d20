//! The Sentinel host agent as a library: the `hostagent` binary and the controller's
//! `sentinel dev` mode both run it through [`run`].
#![forbid(unsafe_code)]

pub mod collectors;
pub mod config;
pub mod connection;
pub mod credentials;
pub mod enroll;
pub mod jobs;
pub mod metrics;
pub mod reload;

use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;

/// The agent's version, sent in its hello.
pub const VERSION: &str = sentinel_daemon::VERSION;

/// Runs the agent until `shutdown` is cancelled: connects to the controller, reports state and
/// reconnects with backoff whenever the channel drops. With `config_file`, SIGHUP re-reads it
/// (see [`reload`]); without, SIGHUP is logged and ignored.
pub async fn run(
    config: AgentConfig,
    config_file: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut hangups = reload::hangups().context("installing the SIGHUP (reload) handler")?;
    let creds = std::sync::Arc::new(credentials::Credentials::load(
        &config.tls,
        &config.host_name(),
    )?);
    let jobs = jobs::Jobs::start(&config.host_name(), &config.jobs, jobs::Outbox::default())?;
    metrics::start(&config.metrics, shutdown.clone()).await;
    sentinel_daemon::systemd::ready(&format!("connecting to {}", config.controller));
    let (settings, watched) = tokio::sync::watch::channel(std::sync::Arc::new(config));
    match config_file {
        Some(path) => {
            tokio::spawn(reload::run(
                hangups,
                path,
                jobs.clone(),
                settings,
                shutdown.clone(),
            ));
        }
        None => {
            let stop = shutdown.clone();
            tokio::spawn(async move {
                // Held, so the connection's settings channel stays open.
                let _settings = settings;
                loop {
                    tokio::select! {
                        got = hangups.recv() => if got.is_none() { return },
                        _ = stop.cancelled() => return,
                    }
                    tracing::warn!("SIGHUP ignored: this agent has no config file to re-read");
                }
            });
        }
    }
    connection::run(watched, creds, jobs, shutdown).await;
    Ok(())
}
