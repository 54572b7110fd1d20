//! The benchmarks. Each starts its own release `sentinel serve` (and, for the agent benchmark,
//! `hostagent`) on loopback with a fresh data directory, drives it with the simulated fleet,
//! measures from `/proc`, prints a Markdown table with the targets beside the figures, and
//! stops by itself. Certificates are cached under the work directory; everything else of a run
//! (config, logs) stays in `WORK/runs/NAME-TIME/` for a look afterwards, minus the store.

mod agent;
mod bytes;
mod latency;
mod steady;
mod storm;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::agent::AgentSpec;
use crate::controller::ControllerSpec;
use crate::fleet::{Fleet, FleetConfig};
use crate::net::Dialer;
use crate::stats::Stats;
use crate::{certs, net, procfs, DialArgs};

/// The host-name prefix of every benchmark fleet (`sim-00000`, ...).
pub const HOST_PREFIX: &str = "sim";

/// Which benchmark.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// 1. Controller resident memory and CPU with N connected agents, steady state.
    Steady(steady::SteadyArgs),
    /// 2. Time and connection attempts for N agents to reconnect after a controller restart.
    Storm(storm::StormArgs),
    /// 3. Controller-to-agent message latency on live streams, single and fanned out.
    Latency(latency::LatencyArgs),
    /// 4. The real agent: idle memory and CPU, and one Docker collection with many containers.
    Agent(agent::AgentArgs),
    /// 5. Bytes per agent per hour on the wire at the agent's default interval.
    Bytes(bytes::BytesArgs),
}

/// Runs one benchmark.
pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Steady(a) => steady::run(a).await,
        BenchCommand::Storm(a) => storm::run(a).await,
        BenchCommand::Latency(a) => latency::run(a).await,
        BenchCommand::Agent(a) => agent::run(a).await,
        BenchCommand::Bytes(a) => bytes::run(a).await,
    }
}

/// Where the binaries and the work directory are.
#[derive(Debug, Clone, Args)]
pub struct EnvArgs {
    /// Directory with the release `sentinel` and `hostagent` binaries (default: the one
    /// fleet-sim runs from).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Certificate cache and run directories (default: BIN_DIR/../fleet-sim).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[command(flatten)]
    pub dial: DialArgs,
}

/// Resolved paths and dial settings of a benchmark run.
pub struct BenchEnv {
    /// The `sentinel` binary.
    pub sentinel: PathBuf,
    /// The `hostagent` binary.
    pub hostagent: PathBuf,
    /// Work directory.
    pub work: PathBuf,
    /// The cached PKI.
    pub certs: PathBuf,
    /// Loopback source addresses.
    pub sources: Vec<IpAddr>,
    /// First connection attempts per second while a fleet grows.
    pub connect_rate: f64,
}

impl BenchEnv {
    /// Checks the binaries and makes the PKI if needed.
    pub fn new(args: &EnvArgs) -> Result<Self> {
        let bin_dir = match &args.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()
                .context("locating fleet-sim")?
                .parent()
                .map(PathBuf::from)
                .context("fleet-sim has no directory")?,
        };
        let sentinel = bin_dir.join("sentinel");
        let hostagent = bin_dir.join("hostagent");
        for bin in [&sentinel, &hostagent] {
            if !bin.exists() {
                bail!(
                    "{} is missing: `cargo build --release --bins` first",
                    bin.display()
                );
            }
        }
        let work = match &args.work_dir {
            Some(dir) => dir.clone(),
            None => bin_dir.join("..").join("fleet-sim"),
        };
        let certs = work.join("certs");
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        certs::ensure_pki(&certs)?;
        Ok(Self {
            sentinel,
            hostagent,
            certs,
            work,
            sources: net::loopback_sources(args.dial.source_addrs),
            connect_rate: args.dial.connect_rate,
        })
    }

    /// A controller with a fresh data directory under `WORK/runs/NAME-TIME`.
    pub fn controller(&self, name: &str) -> Result<ControllerSpec> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let run_dir = self.work.join("runs").join(format!("{name}-{stamp}"));
        Ok(ControllerSpec {
            bin: self.sentinel.clone(),
            certs: self.certs.clone(),
            data_dir: run_dir.join("data"),
            run_dir,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            extra_toml: String::new(),
        })
    }

    /// An empty simulated fleet aimed at `controller`.
    pub fn fleet(&self, controller: &ControllerSpec, spec: AgentSpec) -> Result<Fleet> {
        let dialer = Dialer {
            controller: controller.addr,
            server_name: sentinel_daemon::tls::server_name_for(&controller.addr.to_string(), None)
                .map_err(anyhow::Error::msg)?,
            stats: Arc::new(Stats::default()),
        };
        Ok(Fleet::new(
            FleetConfig {
                certs: self.certs.clone(),
                name_prefix: HOST_PREFIX.into(),
                sources: self.sources.clone(),
                spec,
            },
            dialer,
        ))
    }

    /// How long growing a fleet by `n` may take: the ramp plus two minutes.
    pub fn connect_timeout(&self, n: usize) -> Duration {
        let ramp = if self.connect_rate > 0.0 {
            n as f64 / self.connect_rate
        } else {
            0.0
        };
        Duration::from_secs_f64(ramp + 120.0)
    }
}

/// Removes a run's store (it can be hundreds of MiB), keeping config and logs.
pub fn remove_store(spec: &ControllerSpec) {
    let _ = std::fs::remove_dir_all(&spec.data_dir);
}

/// Prints the heading of a benchmark's output: what, on which machine, under which load.
pub fn header(title: &str) {
    println!("\n## {title}\n");
    println!("- machine: {}", procfs::machine_description());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "- load average at start: {} (the machine is shared with other builds)",
        load.join(" ")
    );
    println!(
        "- open-files limit: {}",
        procfs::open_files_limit().map_or("unknown".into(), |l| l.to_string())
    );
    println!();
}

/// Prints a Markdown table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    println!("| {} |", headers.join(" | "));
    println!("|{}", headers.iter().map(|_| " --- |").collect::<String>());
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
    println!();
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Seconds with one decimal.
pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
