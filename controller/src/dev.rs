//! `sentinel dev`: the whole product on one machine in one command. Creates a dev PKI if there
//! is none, runs the controller with its embedded store in this process and the real `hostagent`
//! binary beside it as the local agent, and prints the grpcurl commands that query it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use sentinel_daemon::tls::TlsFiles;
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
    /// Where the controller's metrics are served.
    pub metrics_listen: SocketAddr,
    /// Where the local agent's metrics are served.
    pub agent_metrics_listen: SocketAddr,
    /// The local agent's log format (the controller's is set by the caller).
    pub log_format: sentinel_daemon::logging::LogFormat,
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
        pki::issue_host(dir, host, None, false)
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
            next_key: None,
        }),
        jobs: crate::config::JobsConfig::default(),
        pipeline: Default::default(),
        apps: Vec::new(),
        isolation: None,
        backups: None,
        store: Default::default(),
        // The dev fleet's hosts get their certificates from `ensure_pki`, not by enrolment.
        pki: None,
        source: None,
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
    let bound = match ready_rx.await {
        Ok(addr) => addr,
        // The controller dropped its side without listening: its own error says why (a port
        // in use, a locked store), not the closed channel.
        Err(_) => {
            controller_task.await.context("controller task")??;
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
    let agent_config = opts.data_dir.join("agent.toml");
    let text = agent_toml(&AgentFiles {
        host: &host,
        controller: dial,
        ca: &certs.join(pki::CA_CERT_FILE),
        cert: &host_cert,
        key: &host_key,
        trusted_key: &certs.join(pki::SIGNING_PUB_FILE),
        state_dir: &opts.data_dir.join("agent"),
        app_dir: &opts.data_dir.join("apps"),
        report_interval: opts.report_interval,
        metrics_listen: opts.agent_metrics_listen,
    });
    std::fs::write(&agent_config, text).with_context(|| {
        format!(
            "writing the local agent's config {}",
            agent_config.display()
        )
    })?;
    let binary = agent_binary()?;
    // The agent is its own process, as on a real host; the pipe on its standard input closes
    // when this process ends in any way (SIGKILL included), and the agent then stops.
    let mut agent = tokio::process::Command::new(&binary)
        .arg("--config")
        .arg(&agent_config)
        .arg("--exit-with-stdin")
        .arg("--log-format")
        .arg(match opts.log_format {
            sentinel_daemon::logging::LogFormat::Text => "text",
            sentinel_daemon::logging::LogFormat::Json => "json",
        })
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the local agent {}", binary.display()))?;
    // Held until the end: `wait()` would close a pipe left in the child.
    let agent_stdin = agent.stdin.take();
    print_banner(
        &certs,
        dial,
        &host,
        opts.metrics_listen,
        opts.agent_metrics_listen,
    );

    let controller_result = tokio::select! {
        result = &mut controller_task => result.context("controller task")?,
        status = agent.wait() => {
            shutdown.cancel();
            let _ = controller_task.await;
            let status = status.context("waiting for the local agent")?;
            anyhow::bail!(
                "the local agent ({}) stopped: {status}; its log is above",
                agent_config.display()
            );
        }
    };
    shutdown.cancel();
    // Closing its standard input stops the agent; give it the same grace as a SIGTERM.
    drop(agent_stdin);
    if tokio::time::timeout(AGENT_STOP_GRACE, agent.wait())
        .await
        .is_err()
    {
        let _ = agent.kill().await;
    }
    controller_result
}

/// How long the local agent may take to stop once told to (it finishes its report and closes
/// its stream).
const AGENT_STOP_GRACE: Duration = Duration::from_secs(5);

/// What the local agent's config names.
struct AgentFiles<'a> {
    host: &'a str,
    controller: SocketAddr,
    ca: &'a Path,
    cert: &'a Path,
    key: &'a Path,
    trusted_key: &'a Path,
    state_dir: &'a Path,
    app_dir: &'a Path,
    report_interval: Duration,
    metrics_listen: SocketAddr,
}

/// The local agent's `agent.toml`: this machine's host certificate, the dev signing key
/// trusted, every job kind allowed (it is a dev fleet of one), state and apps in the data dir.
fn agent_toml(f: &AgentFiles<'_>) -> String {
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let p = |p: &Path| q(&p.display().to_string());
    let kinds: Vec<String> = sentinel_proto::kinds::KINDS
        .iter()
        .map(|(name, _)| q(name))
        .collect();
    format!(
        "# Written by `sentinel dev` at every start: edit the dev options instead.\n\
         host_name = {host}\n\
         controller = {controller}\n\
         report_interval = {interval}\n\n\
         [tls]\nca = {ca}\ncert = {cert}\nkey = {key}\n\n\
         [labels]\nmode = \"dev\"\n\n\
         [metrics]\nlisten = {metrics}\n\n\
         [jobs]\nstate_dir = {state}\ntrusted_keys = [{trusted}]\nallowed_kinds = [{kinds}]\n\
         app_dirs = [{apps}]\n",
        host = q(f.host),
        controller = q(&f.controller.to_string()),
        interval = q(&humantime::format_duration(f.report_interval).to_string()),
        ca = p(f.ca),
        cert = p(f.cert),
        key = p(f.key),
        metrics = q(&f.metrics_listen.to_string()),
        state = p(f.state_dir),
        trusted = p(f.trusted_key),
        kinds = kinds.join(", "),
        apps = p(f.app_dir),
    )
}

/// The `hostagent` binary: next to this one (a cargo build or the packages' /usr/bin), else
/// from `PATH`.
fn agent_binary() -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("hostagent"))
        .filter(|p| p.is_file());
    if let Some(path) = beside {
        return Ok(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("hostagent"))
        .find(|p| p.is_file());
    on_path.ok_or_else(|| {
        anyhow::anyhow!(
            "sentinel dev runs the agent binary `hostagent`, found neither next to this binary \
             nor on PATH: build it (`cargo build --bins`) or install the hostagent package"
        )
    })
}

fn print_banner(
    certs: &Path,
    addr: SocketAddr,
    host: &str,
    metrics: SocketAddr,
    agent_metrics: SocketAddr,
) {
    let c = certs.display();
    // The CLI's settings must work from wherever the operator runs it next.
    let absolute = std::fs::canonicalize(certs).unwrap_or_else(|_| certs.to_path_buf());
    // A metrics port of 0 is chosen at bind time, and only the listener's log line knows it.
    let scrape = |what: &str, listen: SocketAddr| {
        if listen.port() == 0 {
            format!("see the \"{what} metrics listening\" log line for the address")
        } else {
            format!("curl http://{listen}/metrics")
        }
    };
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
         Or with the sentinel CLI, from any directory:\n\n  \
         export SENTINEL_CONTROLLER={addr} SENTINEL_CA={a}/ca.pem \
         SENTINEL_CERT={a}/operator-admin.pem SENTINEL_KEY={a}/operator-admin.key\n  \
         sentinel hosts\n\n\
         Metrics: {} (controller), {} (local agent)\n\n\
         Stop with Ctrl-C.\n",
        scrape("controller", metrics),
        scrape("agent", agent_metrics),
        a = absolute.display(),
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
