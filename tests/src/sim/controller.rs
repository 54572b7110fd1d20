//! The controller under test as the benchmarks drive it: a real `sentinel serve` process with
//! its own config and data directory, stopped with SIGTERM (SIGKILL only if it hangs), and the
//! operator API reached with the `admin` operator certificate to check what it says.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sentinel_daemon::tls::TlsFiles;
use sentinel_proto::v1::fleet_service_client::FleetServiceClient;
use sentinel_proto::v1::{HostStatus, HostSummary, ListHostsRequest};
use tonic::transport::Channel;

use crate::net::Dialer;
use crate::stats::Stats;

/// A running `sentinel serve`.
pub struct ControllerProc {
    child: Option<Child>,
    /// Its process id.
    pub pid: u32,
    /// Its log file.
    pub log: PathBuf,
}

/// How to start one.
#[derive(Debug, Clone)]
pub struct ControllerSpec {
    /// The `sentinel` binary.
    pub bin: PathBuf,
    /// PKI directory (ca.pem, controller.pem/.key).
    pub certs: PathBuf,
    /// Its data directory (the redb store).
    pub data_dir: PathBuf,
    /// Where config and logs go.
    pub run_dir: PathBuf,
    /// Listen address; port 0 lets the controller choose, and [`start`](Self::start) then
    /// sets the address it got (a restart reuses it: agents know no other).
    pub addr: SocketAddr,
    /// Appended to the generated config (sections a benchmark needs, e.g. `[signing]`).
    pub extra_toml: String,
}

impl ControllerSpec {
    /// Writes the config and starts the process; returns once it accepts TCP connections.
    pub async fn start(&mut self) -> Result<(ControllerProc, Duration)> {
        fs::create_dir_all(&self.run_dir)
            .with_context(|| format!("creating {}", self.run_dir.display()))?;
        let config = self.run_dir.join("sentinel.toml");
        let c = self.certs.display();
        fs::write(
            &config,
            format!(
                "listen = \"{}\"\ndata_dir = \"{}\"\n\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/controller.pem\"\nkey = \"{c}/controller.key\"\n\n{}\n",
                self.addr,
                self.data_dir.display(),
                self.extra_toml
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let log = self.run_dir.join(format!("controller-{stamp}.log"));
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("cloning the log handle")?;
        let started = Instant::now();
        // The line naming the bound address must be logged whatever RUST_LOG says.
        let filter = match std::env::var("RUST_LOG") {
            Ok(f) if !f.is_empty() => format!("{f},sentinel::server=info"),
            _ => "info".to_string(),
        };
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let mut proc = ControllerProc {
            pid: child.id(),
            child: Some(child),
            log,
        };
        let deadline = Duration::from_secs(60);
        loop {
            if self.addr.port() == 0 {
                let text = fs::read_to_string(&proc.log).unwrap_or_default();
                if let Some(bound) =
                    sentinel_e2e::logged_addr(&text, sentinel_e2e::CONTROLLER_LISTENING)
                {
                    self.addr = bound;
                }
            }
            if self.addr.port() != 0 && tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok((proc, started.elapsed()));
            }
            if !proc.is_running() {
                bail!(
                    "the controller exited during startup; see {}",
                    proc.log.display()
                );
            }
            if started.elapsed() > deadline {
                bail!(
                    "the controller did not listen on {} within {deadline:?}",
                    self.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl ControllerProc {
    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, then waits up to `grace` before SIGKILL. Returns how long it took to exit and
    /// whether it had to be killed.
    pub async fn stop(&mut self, grace: Duration) -> Result<(Duration, bool)> {
        let Some(mut child) = self.child.take() else {
            return Ok((Duration::ZERO, false));
        };
        let started = Instant::now();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid);
        }
        while started.elapsed() < grace {
            if child
                .try_wait()
                .context("waiting for the controller")?
                .is_some()
            {
                return Ok((started.elapsed(), false));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill().context("killing the controller")?;
        child.wait().context("reaping the controller")?;
        Ok((started.elapsed(), true))
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The operator API as the `admin` operator of the PKI in `certs`.
pub async fn operator(certs: &Path, addr: SocketAddr) -> Result<FleetServiceClient<Channel>> {
    let tls = sentinel_daemon::tls::client_config(&TlsFiles {
        ca: certs.join(sentinel::pki::CA_CERT_FILE),
        cert: certs.join("operator-admin.pem"),
        key: certs.join("operator-admin.key"),
    })
    .context("loading the admin operator certificate")?;
    let dialer = Dialer {
        controller: addr,
        server_name: sentinel_daemon::tls::server_name_for(&addr.to_string(), None)
            .map_err(anyhow::Error::msg)?,
        stats: std::sync::Arc::new(Stats::default()),
    };
    let channel = dialer
        .channel(std::net::IpAddr::from([127, 0, 0, 1]), tls)
        .await
        .map_err(anyhow::Error::msg)
        .context("connecting to the operator API")?;
    Ok(FleetServiceClient::new(channel).max_decoding_message_size(64 << 20))
}

/// `ListHosts` as the `admin` operator of the PKI in `certs`.
pub async fn list_hosts(certs: &Path, addr: SocketAddr) -> Result<Vec<HostSummary>> {
    let hosts = operator(certs, addr)
        .await?
        .list_hosts(ListHostsRequest::default())
        .await
        .context("ListHosts")?
        .into_inner()
        .hosts;
    Ok(hosts)
}

/// How many of `hosts` whose name starts with `prefix` are online.
pub fn online_with_prefix(hosts: &[HostSummary], prefix: &str) -> usize {
    hosts
        .iter()
        .filter(|h| h.name.starts_with(prefix) && h.status == HostStatus::Online as i32)
        .count()
}
