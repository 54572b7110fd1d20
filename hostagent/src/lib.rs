//! The Sentinel host agent as a library: the `hostagent` binary and the controller's
//! `sentinel dev` mode both run it through [`run`].
#![forbid(unsafe_code)]

pub mod collectors;
pub mod config;
pub mod connection;
pub mod docs;
pub mod http;
pub mod jobs;
pub mod logging;
pub mod metrics;
pub mod systemd;
pub mod tls;

use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;

/// The agent's version, sent in its hello.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs the agent until `shutdown` is cancelled: connects to the controller, reports state and
/// reconnects with backoff whenever the channel drops.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tls = tls::client_config(&config.tls)?;
    let jobs = jobs::Jobs::start(&config.host_name(), &config.jobs, jobs::Outbox::default())?;
    metrics::start(&config.metrics, shutdown.clone()).await;
    systemd::ready(&format!("connecting to {}", config.controller));
    connection::run(config, tls, jobs, shutdown).await;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C), whichever comes first.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
