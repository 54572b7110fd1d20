//! Benchmark 2: the reconnect storm. N agents are connected and settled; the controller gets
//! SIGTERM (it ends every stream and flushes its store), is started again on the same port and
//! data directory, and the clock runs until every agent holds a stream welcomed after the
//! SIGTERM. Agents reconnect exactly like `hostagent`: a jittered delay of 250-500 ms after
//! their stream ends, then exponential backoff (×2 up to 30 s, equal jitter) while the
//! controller is down. Connection attempts are counted per agent.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;

use super::{header, remove_store, secs, table, BenchEnv, EnvArgs};
use crate::controller::{list_hosts, online_with_prefix};
use crate::procfs;
use crate::stats::Counter;
use crate::AgentArgs;

#[derive(Debug, Args)]
pub struct StormArgs {
    /// Fleet sizes, ascending; the controller restarts once at each.
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "10000")]
    agents: Vec<usize>,
    /// Wait after the last agent connected before the restart.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Give up waiting for the reconnect after this long.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    env: EnvArgs,
}

pub async fn run(args: StormArgs) -> Result<()> {
    let env = BenchEnv::new(&args.env)?;
    let max = args.agents.iter().copied().max().unwrap_or(0);
    crate::check_open_files(max)?;
    let mut spec = env.controller("storm")?;
    let (mut controller, _) = spec.start().await?;
    let mut fleet = env.fleet(&spec, args.agent.spec())?;
    let ticks = procfs::clock_ticks() as f64;
    let mut rows = Vec::new();
    for &n in &args.agents {
        fleet.grow_to(n, env.connect_rate).await?;
        fleet
            .wait_all_connected(Duration::ZERO, env.connect_timeout(n))
            .await?;
        eprintln!(
            "fleet-sim: {n} agents connected; settling {:?}",
            args.settle
        );
        tokio::time::sleep(args.settle).await;

        let attempts_before: Vec<u32> = fleet.slots().iter().map(|s| s.attempts()).collect();
        let before = fleet.stats().snapshot();
        let since = fleet.now();
        let t0 = Instant::now();
        eprintln!("fleet-sim: restarting the controller");
        let (stop_took, killed) = controller.stop(Duration::from_secs(60)).await?;
        let (restarted, listen_took) = spec.start().await?;
        controller = restarted;
        let listening_at = Instant::now();
        let cpu_before = procfs::sample(controller.pid)?;
        let _ = fleet.wait_all_connected(since, args.timeout).await?;
        let all_at = Instant::now();
        let cpu_after = procfs::sample(controller.pid)?;
        let during = fleet.stats().snapshot().since(&before);
        let per_agent: Vec<u32> = fleet
            .slots()
            .iter()
            .zip(&attempts_before)
            .map(|(s, b)| s.attempts() - b)
            .collect();
        let total: u64 = per_agent.iter().map(|a| u64::from(*a)).sum();
        let most = per_agent.iter().copied().max().unwrap_or(0);
        let hosts = list_hosts(&env.certs, spec.addr).await?;
        let online = online_with_prefix(&hosts, "sim-");
        rows.push(vec![
            n.to_string(),
            format!(
                "{}{}",
                secs(stop_took),
                if killed { " (SIGKILL)" } else { "" }
            ),
            secs(listen_took),
            secs(all_at - listening_at),
            secs(all_at - t0),
            format!("{total} ({:.2}/agent, max {most})", total as f64 / n as f64),
            format!(
                "{} failed, {} refused",
                during.get(Counter::ConnectFailed),
                during.get(Counter::Refused)
            ),
            format!(
                "{:.1} s",
                cpu_after.cpu_ticks.saturating_sub(cpu_before.cpu_ticks) as f64 / ticks
            ),
            format!("{:.0} MiB", cpu_after.rss_kib as f64 / 1024.0),
            format!("{online}/{n}"),
        ]);
        if !controller.is_running() {
            bail!("the controller died; see {}", controller.log.display());
        }
    }
    fleet.shutdown().await;
    let _ = controller.stop(Duration::from_secs(30)).await;
    remove_store(&spec);

    header(&format!(
        "Reconnect storm after a controller restart (backoff {:?} to {:?}, jittered)",
        args.agent.backoff_initial, args.agent.backoff_max
    ));
    table(
        &[
            "agents",
            "SIGTERM → exited",
            "start → listening",
            "listening → all connected",
            "SIGTERM → all connected",
            "connection attempts",
            "failed attempts",
            "controller CPU during reconnect",
            "controller RSS after",
            "online (ListHosts)",
        ],
        &rows,
    );
    println!("Target: all 10,000 reconnected within 60 s of the restart.");
    println!("Controller log: {}", controller.log.display());
    Ok(())
}
