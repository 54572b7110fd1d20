//! `fleet-sim`: N simulated Sentinel agents in one process, and the benchmarks built on them.
//!
//! Every simulated agent has its own host certificate (issued in bulk from the fleet CA and
//! cached on disk), holds a real mTLS `Connect` stream to the controller through the generated
//! `AgentServiceClient`, and behaves like `hostagent`: hello, welcome, a state report every
//! interval (full, then deltas), heartbeats at the welcomed interval, reconnects with jittered
//! exponential backoff. Connections come from several loopback source addresses so that ports
//! never run out. See `BENCHMARKS.md` and `tests/bench/` for the benchmark commands.
#![forbid(unsafe_code)]

mod agent;
mod bench;
mod certs;
mod controller;
mod fleet;
mod host;
mod net;
mod procfs;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::agent::AgentSpec;
use crate::fleet::{Fleet, FleetConfig};
use crate::net::Dialer;
use crate::stats::{Counter, Stats};

/// Simulated Sentinel agents and benchmarks.
#[derive(Debug, Parser)]
#[command(name = "fleet-sim", about, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Issue (or find cached) host certificates for N simulated agents.
    Certs {
        /// PKI directory holding the fleet CA (ca.pem, ca.key); made with `sentinel pki init`
        /// if it does not exist.
        #[arg(long)]
        certs: PathBuf,
        /// How many agents.
        #[arg(long)]
        agents: usize,
        /// Host names are PREFIX-00000, PREFIX-00001, ...
        #[arg(long, default_value = "sim")]
        name_prefix: String,
    },
    /// Run N simulated agents against a controller until --duration ends or Ctrl-C; prints a
    /// JSON summary of the counters on exit.
    Run(RunArgs),
    /// Benchmarks; each prints a table. See BENCHMARKS.md.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The controller's address.
    #[arg(long)]
    controller: SocketAddr,
    /// Name expected in the controller's certificate (default: the address's IP).
    #[arg(long)]
    server_name: Option<String>,
    /// PKI directory with the fleet CA and its key; host certificates are issued into it.
    #[arg(long)]
    certs: PathBuf,
    /// How many agents.
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Host names are PREFIX-00000, PREFIX-00001, ...
    #[arg(long, default_value = "sim")]
    name_prefix: String,
    /// Stop after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[command(flatten)]
    dial: DialArgs,
    #[command(flatten)]
    agent: AgentArgs,
}

/// How the fleet connects.
#[derive(Debug, Clone, Args)]
pub struct DialArgs {
    /// Loopback source addresses to spread connections over (127.0.0.2 onwards).
    #[arg(long, default_value_t = 8)]
    pub source_addrs: u8,
    /// First connection attempts per second while the fleet grows (0: all at once).
    #[arg(long, default_value_t = 500.0)]
    pub connect_rate: f64,
}

/// How every simulated agent behaves (the agent's defaults).
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Report interval.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// A full report every N reports, deltas in between.
    #[arg(long, default_value_t = 20)]
    pub full_every: u32,
    /// Containers on each simulated host.
    #[arg(long, default_value_t = 30)]
    pub containers: usize,
    /// Reconnect backoff start.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub backoff_initial: Duration,
    /// Reconnect backoff cap.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
}

impl AgentArgs {
    /// The agent spec these flags describe.
    pub fn spec(&self) -> AgentSpec {
        AgentSpec {
            report_interval: self.interval,
            full_report_every: self.full_every,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            containers: self.containers,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleet-sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Certs {
                certs,
                agents,
                name_prefix,
            } => {
                certs::ensure_pki(&certs)?;
                let names: Vec<String> = (0..agents)
                    .map(|i| Fleet::host_name(&name_prefix, i))
                    .collect();
                let done = certs::ensure_hosts(&certs, &names)?;
                println!(
                    "{} issued, {} cached, {:.1}s",
                    done.issued,
                    done.reused,
                    done.took.as_secs_f64()
                );
                Ok(())
            }
            Command::Run(args) => run(args).await,
            Command::Bench(cmd) => bench::run(cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Fails with advice when this process may not open `needed` more files.
pub fn check_open_files(needed: usize) -> Result<()> {
    if let Some(limit) = procfs::open_files_limit() {
        let needed = needed as u64 + 256;
        if limit < needed {
            bail!(
                "the open-files limit is {limit}, {needed} are needed: raise it first \
                 (`ulimit -n 65536`; the scripts in tests/bench do)"
            );
        }
    }
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    check_open_files(args.agents)?;
    certs::ensure_pki(&args.certs)?;
    let stats = Arc::new(Stats::default());
    let dialer = Dialer {
        controller: args.controller,
        server_name: sentinel_daemon::tls::server_name_for(
            &args.controller.to_string(),
            args.server_name.as_deref(),
        )
        .map_err(anyhow::Error::msg)?,
        stats: stats.clone(),
    };
    let mut fleet = Fleet::new(
        FleetConfig {
            certs: args.certs.clone(),
            name_prefix: args.name_prefix.clone(),
            sources: net::loopback_sources(args.dial.source_addrs),
            spec: args.agent.spec(),
        },
        dialer,
    );
    fleet
        .grow_to(args.agents, args.dial.connect_rate)
        .await
        .context("starting the agents")?;
    let started = Instant::now();
    let stop = tokio::time::sleep(args.duration);
    tokio::pin!(stop);
    let signal = sentinel_daemon::signal::shutdown();
    tokio::pin!(signal);
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = &mut signal => break,
            _ = progress.tick() => {
                let s = stats.snapshot();
                eprintln!(
                    "fleet-sim: {:>6.0}s {}/{} connected, {} attempts, {} reports, {} heartbeats, {:.1} MiB up",
                    started.elapsed().as_secs_f64(),
                    stats.connected(),
                    args.agents,
                    s.get(Counter::Attempts),
                    s.get(Counter::ReportsFull) + s.get(Counter::ReportsDelta),
                    s.get(Counter::Heartbeats),
                    s.bytes_up() as f64 / 1048576.0,
                );
            }
        }
    }
    let summary = stats.snapshot();
    let connected = stats.connected();
    fleet.shutdown().await;
    let mut json = summary.to_json();
    json["agents"] = args.agents.into();
    json["connected_at_end"] = connected.into();
    json["seconds"] = started.elapsed().as_secs_f64().into();
    println!("{json}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_given_again_replace_the_scripts_defaults() {
        let cli = Cli::try_parse_from([
            "fleet-sim",
            "bench",
            "steady",
            "--agents",
            "1000,5000,10000",
            "--window",
            "60s",
            "--agents",
            "200",
            "--window",
            "5s",
        ])
        .unwrap();
        let text = format!("{cli:?}");
        assert!(text.contains("agents: [200]"), "{text}");
        assert!(text.contains("window: 5s"), "{text}");
    }
}
