//! `sentinel dev`: the whole product on one machine in one command. Creates a dev PKI if there
//! is none, runs the controller with its embedded store and a local agent in this process, and
//! prints the grpcurl commands that query it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use hostagent::config::{AgentConfig, BackoffConfig, CollectorsConfig};
use hostagent::tls::TlsFiles;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentsConfig, ControllerConfig, SigningConfig};
use crate::pki;

/// What `sentinel dev` runs.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// State and certificates go here.
    pub data_dir: PathBuf,
    /// The controller's listen address.
    pub listen: SocketAddr,
    /// The local agent's report interval.
    pub report_interval: Duration,
    /// Where the controller's (and the local agent's) metrics are served.
    pub metrics_listen: SocketAddr,
}

/// This machine's host name, made into a valid fleet name (lowercase, dashes for anything
/// else), or "localhost" when it has none.
pub fn local_host_name() -> String {
    let raw = sysinfo::System::host_name().unwrap_or_default();
    let cleaned: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cleaned = cleaned.trim_matches(['-', '.']).to_string();
    if pki::validate_name(&cleaned).is_ok() {
        cleaned
    } else {
        "localhost".into()
    }
}

/// Makes sure `dir` holds a dev PKI with a certificate for `host`.
fn ensure_pki(dir: &Path, host: &str) -> anyhow::Result<()> {
    if !dir.join(pki::CA_CERT_FILE).exists() {
        let mut hosts = pki::default_hosts(host);
        if !hosts.iter().any(|h| h == host) {
            hosts.push(host.to_string());
        }
        pki::init(&pki::InitOptions {
            dir: dir.to_path_buf(),
            extra_sans: Vec::new(),
            hosts,
            force: false,
        })
        .with_context(|| format!("creating the dev PKI in {}", dir.display()))?;
        println!(
            "created a dev PKI in {} (dev only: see certs-dev/README.md)",
            dir.display()
        );
    } else if !pki::host_files(dir, host).0.exists() {
        pki::issue_host(dir, host, false)
            .with_context(|| format!("issuing a dev certificate for {host}"))?;
    }
    Ok(())
}

/// Runs controller and local agent until `shutdown`.
pub async fn run(opts: DevOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let certs = opts.data_dir.join("certs");
    let host = local_host_name();
    ensure_pki(&certs, &host)?;
    let controller = ControllerConfig {
        listen: opts.listen,
        data_dir: opts.data_dir.clone(),
        tls: TlsFiles {
            ca: certs.join(pki::CA_CERT_FILE),
            cert: certs.join(pki::CONTROLLER_CERT_FILE),
            key: certs.join(pki::CONTROLLER_KEY_FILE),
        },
        agents: AgentsConfig::default(),
        signing: Some(SigningConfig {
            key: certs.join(pki::SIGNING_KEY_FILE),
        }),
        jobs: crate::config::JobsConfig::default(),
        pipeline: Default::default(),
        apps: Vec::new(),
        isolation: None,
        backups: None,
        metrics: crate::config::MetricsConfig {
            enabled: true,
            listen: opts.metrics_listen,
        },
    };
    let (ready_tx, ready_rx) = oneshot::channel();
    let mut controller_task = tokio::spawn(crate::server::run(
        controller,
        shutdown.clone(),
        Some(ready_tx),
    ));
    let bound = tokio::select! {
        addr = ready_rx => addr.context("controller stopped before listening")?,
        result = &mut controller_task => {
            result.context("controller task")??;
            anyhow::bail!("controller stopped before listening");
        }
    };
    // A wildcard listen address is reachable on loopback; the dev certificate names 127.0.0.1.
    let dial = if bound.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], bound.port()))
    } else {
        bound
    };
    let (host_cert, host_key) = pki::host_files(&certs, &host);
    let agent = AgentConfig {
        host_name: Some(host.clone()),
        controller: dial.to_string(),
        server_name: None,
        tls: TlsFiles {
            ca: certs.join(pki::CA_CERT_FILE),
            cert: host_cert,
            key: host_key,
        },
        report_interval: opts.report_interval,
        full_report_every: 20,
        backoff: BackoffConfig::default(),
        collectors: CollectorsConfig::default(),
        labels: [("mode".to_string(), "dev".to_string())].into(),
        jobs: hostagent::config::JobsConfig {
            state_dir: opts.data_dir.join("agent"),
            trusted_keys: vec![certs.join(pki::SIGNING_PUB_FILE)],
            allowed_kinds: hostagent::jobs::KINDS
                .iter()
                .map(|(n, _)| n.to_string())
                .collect(),
            app_dirs: vec![opts.data_dir.join("apps")],
            ..hostagent::config::JobsConfig::default()
        },
        // The controller's listener serves the local agent's metrics too (one process).
        metrics: hostagent::config::MetricsConfig {
            enabled: false,
            ..Default::default()
        },
    };
    let agent_task = tokio::spawn(hostagent::run(agent, shutdown.clone()));
    print_banner(&certs, dial, &host, opts.metrics_listen);

    let controller_result = controller_task.await.context("controller task")?;
    shutdown.cancel();
    let _ = agent_task.await;
    controller_result
}

fn print_banner(certs: &Path, addr: SocketAddr, host: &str, metrics: SocketAddr) {
    let c = certs.display();
    let grpcurl = format!(
        "grpcurl -cacert {c}/ca.pem -cert {c}/operator-admin.pem -key {c}/operator-admin.key"
    );
    println!(
        "\nSentinel dev mode: controller on {addr}, local agent \"{host}\".\n\
         Query it with grpcurl:\n\n  \
         {grpcurl} {addr} list\n  \
         {grpcurl} {addr} sentinel.v1.FleetService/ListHosts\n  \
         {grpcurl} -d '{{\"name\":\"{host}\"}}' {addr} sentinel.v1.FleetService/GetHost\n  \
         {grpcurl} {addr} grpc.health.v1.Health/Check\n\n\
         Metrics (controller and local agent): curl http://{metrics}/metrics\n\n\
         Stop with Ctrl-C.\n"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_host_name_is_always_a_valid_fleet_name() {
        assert!(pki::validate_name(&local_host_name()).is_ok());
    }
}
