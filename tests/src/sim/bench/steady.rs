//! Benchmark 1: the controller's resident memory and CPU with N connected agents at steady
//! state. One controller; the fleet grows level by level (e.g. 1,000, then 5,000, then
//! 10,000); at each level, once every agent is connected and a settle time has passed, the
//! controller process is sampled every second over a window: VmRSS from `/proc/PID/status`,
//! utime+stime from `/proc/PID/stat`. Then `ListHosts` must show every agent online.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use super::{header, remove_store, secs, table, BenchEnv, EnvArgs};
use crate::controller::{list_hosts, online_with_prefix};
use crate::procfs;
use crate::stats::Counter;
use crate::AgentArgs;

#[derive(Debug, Args)]
pub struct SteadyArgs {
    /// Fleet sizes, ascending.
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "1000,5000,10000")]
    agents: Vec<usize>,
    /// Wait after the last agent connected, so that the connect burst and the first full
    /// reports are over.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Measurement window.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    window: Duration,
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    env: EnvArgs,
}

pub async fn run(args: SteadyArgs) -> Result<()> {
    let env = BenchEnv::new(&args.env)?;
    let max = args.agents.iter().copied().max().unwrap_or(0);
    crate::check_open_files(max)?;
    let mut spec = env.controller("steady")?;
    let (mut controller, _) = spec.start().await?;
    let mut fleet = env.fleet(&spec, args.agent.spec())?;
    let me = std::process::id();
    let mut rows = Vec::new();
    for &n in &args.agents {
        fleet.grow_to(n, env.connect_rate).await?;
        let took = fleet
            .wait_all_connected(Duration::ZERO, env.connect_timeout(n))
            .await?;
        eprintln!(
            "fleet-sim: {n} agents connected; settling {:?}, then measuring {:?}",
            args.settle, args.window
        );
        tokio::time::sleep(args.settle).await;
        let before = fleet.stats().snapshot();
        let usage = procfs::measure(&[controller.pid, me], args.window).await?;
        let during = fleet.stats().snapshot().since(&before);
        let hosts = list_hosts(&env.certs, spec.addr).await?;
        let online = online_with_prefix(&hosts, "sim-");
        let (c, sim) = (usage[0], usage[1]);
        let messages = during.get(Counter::ReportsFull)
            + during.get(Counter::ReportsDelta)
            + during.get(Counter::Heartbeats);
        rows.push(vec![
            n.to_string(),
            secs(took),
            format!("{:.0} MiB (max {:.0})", c.rss_avg_mib, c.rss_max_mib),
            format!("{:.1} %", c.cpu_percent),
            format!("{:.0}/s", messages as f64 / c.window.as_secs_f64()),
            format!("{online}/{n}"),
            format!("{:.0} MiB, {:.0} %", sim.rss_avg_mib, sim.cpu_percent),
            format!("{:.0} %", c.machine_busy_percent),
        ]);
        if online != n {
            eprintln!("fleet-sim: only {online} of {n} hosts online in ListHosts");
        }
        if !controller.is_running() {
            bail!("the controller died; see {}", controller.log.display());
        }
    }
    fleet.shutdown().await;
    let _ = controller.stop(Duration::from_secs(30)).await;
    remove_store(&spec);

    header(&format!(
        "Controller at steady state (report interval {:?}, {} containers per host, window {:?})",
        args.agent.interval, args.agent.containers, args.window
    ));
    table(
        &[
            "agents",
            "all connected in",
            "controller RSS",
            "controller CPU (% of one core)",
            "messages in",
            "online (ListHosts)",
            "simulator RSS, CPU",
            "machine busy",
        ],
        &rows,
    );
    println!("Targets: 10,000 agents under 1 GiB resident and under one core (100 %) on average.");
    println!("Controller log: {}", controller.log.display());
    Ok(())
}
