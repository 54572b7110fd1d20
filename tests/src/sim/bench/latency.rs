//! Benchmark 3: controller-to-agent message latency on live streams.
//!
//! This build has no job submission yet (signed jobs are being written), so the benchmark
//! times the downstream path that exists: an agent sends a `BundleRequest` on its open
//! `Connect` stream, the controller's stream task answers with a `BundleChunk` through the
//! agent's outbound queue (the same `AgentSender` the registry holds for jobs), and the agent
//! stops the clock when the chunk arrives. That is a full round trip (up, controller, down),
//! so it bounds the one-way dispatch from above. Two shapes:
//! - single: one probe at a time to a random agent, while the fleet reports as usual;
//! - fan-out: every connected agent probes at the same moment; the time until the last answer
//!   arrives is the figure to hold against "fan-out to 10,000 under 2 s".
//!
//! The hello → welcome time of every connection (a controller→agent message in answer to the
//! hello, on a fresh stream) is reported beside it.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use rand::Rng;

use super::{header, ms, remove_store, secs, table, BenchEnv, EnvArgs};
use crate::stats::Percentiles;
use crate::AgentArgs;

/// How long one probe may take before it counts as lost.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct LatencyArgs {
    /// Fleet sizes, ascending.
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "1000,10000")]
    agents: Vec<usize>,
    /// Single probes per fleet size.
    #[arg(long, default_value_t = 500)]
    samples: usize,
    /// Pause between single probes.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    gap: Duration,
    /// Fan-out rounds per fleet size.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Wait after the last agent connected.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    settle: Duration,
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    env: EnvArgs,
}

pub async fn run(args: LatencyArgs) -> Result<()> {
    let env = BenchEnv::new(&args.env)?;
    let max = args.agents.iter().copied().max().unwrap_or(0);
    crate::check_open_files(max)?;
    let spec = env.controller("latency")?;
    let (mut controller, _) = spec.start().await?;
    let mut fleet = env.fleet(&spec, args.agent.spec())?;
    let mut single_rows = Vec::new();
    let mut fanout_rows = Vec::new();
    let mut probe_id: u64 = 0;
    let mut next_id = || {
        probe_id += 1;
        format!("{probe_id:064x}")
    };
    for &n in &args.agents {
        fleet.grow_to(n, env.connect_rate).await?;
        fleet
            .wait_all_connected(Duration::ZERO, env.connect_timeout(n))
            .await?;
        let welcomes = Percentiles::of(fleet.stats().take_welcome_latencies());
        eprintln!(
            "fleet-sim: {n} agents connected; settling {:?}",
            args.settle
        );
        tokio::time::sleep(args.settle).await;

        // Single probes.
        let mut sample = Vec::with_capacity(args.samples);
        let mut lost = 0usize;
        for _ in 0..args.samples {
            let i = rand::thread_rng().gen_range(0..fleet.slots().len());
            let slot = &fleet.slots()[i];
            if !slot.is_connected() {
                continue;
            }
            match slot.probe(next_id()) {
                Some(rx) => match tokio::time::timeout(PROBE_TIMEOUT, rx).await {
                    Ok(Ok(rtt)) => sample.push(rtt),
                    _ => lost += 1,
                },
                None => lost += 1,
            }
            tokio::time::sleep(args.gap).await;
        }
        let single = Percentiles::of(sample);
        single_rows.push(vec![
            n.to_string(),
            single.count.to_string(),
            ms(single.p50),
            ms(single.p90),
            ms(single.p99),
            ms(single.max),
            lost.to_string(),
            format!("{} / {}", ms(welcomes.p50), ms(welcomes.p99)),
        ]);

        // Fan-out.
        for round in 1..=args.rounds {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let started = Instant::now();
            let receivers: Vec<_> = fleet
                .slots()
                .iter()
                .filter(|s| s.is_connected())
                .filter_map(|s| s.probe(next_id()))
                .collect();
            let sent = receivers.len();
            let queued = started.elapsed();
            let answers = futures::future::join_all(receivers.into_iter().map(|rx| async move {
                let rtt = tokio::time::timeout(PROBE_TIMEOUT, rx).await.ok()?.ok()?;
                Some((rtt, started.elapsed()))
            }))
            .await;
            let all = started.elapsed();
            let answered: Vec<(Duration, Duration)> = answers.into_iter().flatten().collect();
            let last = answered.iter().map(|a| a.1).max().unwrap_or_default();
            let rtts = Percentiles::of(answered.iter().map(|a| a.0).collect());
            fanout_rows.push(vec![
                n.to_string(),
                round.to_string(),
                format!("{}/{sent}", answered.len()),
                ms(queued),
                ms(rtts.p50),
                ms(rtts.p99),
                if answered.len() == sent {
                    ms(last)
                } else {
                    format!("incomplete after {}", secs(all))
                },
            ]);
        }
        if !controller.is_running() {
            bail!("the controller died; see {}", controller.log.display());
        }
    }
    fleet.shutdown().await;
    let _ = controller.stop(Duration::from_secs(30)).await;
    remove_store(&spec);

    header("Controller → agent latency on live streams (BundleRequest → BundleChunk round trip)");
    table(
        &[
            "agents",
            "single probes",
            "p50",
            "p90",
            "p99",
            "max",
            "lost",
            "hello → welcome p50 / p99 (while connecting)",
        ],
        &single_rows,
    );
    table(
        &[
            "agents",
            "fan-out round",
            "answered",
            "probes queued in",
            "round trip p50",
            "round trip p99",
            "all answered in",
        ],
        &fanout_rows,
    );
    println!("Targets (for job dispatch, not yet measurable): single p99 under 50 ms; fan-out to 10,000 under 2 s.");
    Ok(())
}
