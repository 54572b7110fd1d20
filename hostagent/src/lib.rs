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

use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;

/// The agent's version, sent in its hello.
pub const VERSION: &str = sentinel_daemon::VERSION;

/// Runs the agent until `shutdown` is cancelled: connects to the controller, reports state and
/// reconnects with backoff whenever the channel drops.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let creds = std::sync::Arc::new(credentials::Credentials::load(
        &config.tls,
        &config.host_name(),
    )?);
    let jobs = jobs::Jobs::start(&config.host_name(), &config.jobs, jobs::Outbox::default())?;
    metrics::start(&config.metrics, shutdown.clone()).await;
    sentinel_daemon::systemd::ready(&format!("connecting to {}", config.controller));
    connection::run(config, creds, jobs, shutdown).await;
    Ok(())
}
