//! Benchmark 3: job dispatch latency, and controller-to-agent message latency on live streams.
//!
//! **Job dispatch** goes through the real operator path: `RunIsolationCheck { probe: true }`,
//! the RPC that fans signed `IsolationProbe` jobs out to the hosts of `[isolation.probe]`
//! (here: every simulated host). The controller signs one job per host, stores it, and puts it
//! on the host's live stream; the clock starts just before the RPC is sent and stops when the
//! simulated agent decodes the `SignedJob` (same process, same clock). Simulated agents answer
//! a probe at once with no attempts, so the RPC returns when every host has answered; that
//! time is reported beside it. Two shapes:
//! - single: `hosts: [one random host]`, one at a time, while the fleet reports as usual;
//! - fan-out: every host at once; the last arrival is the figure to hold against "fan-out to
//!   10,000 under 2 s".
//!
//! **Round trip**: an agent sends a `BundleRequest` on its open `Connect` stream and the
//! controller's stream task answers with a `BundleChunk` through the agent's outbound queue;
//! the agent stops the clock when the chunk arrives (up, controller, down).
//!
//! The hello → welcome time of every connection is reported beside them.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::Rng;
use sentinel_proto::v1::fleet_service_client::FleetServiceClient;
use sentinel_proto::v1::RunIsolationCheckRequest;
use tonic::transport::Channel;

use super::{header, ms, remove_store, secs, table, BenchEnv, EnvArgs};
use crate::controller::operator;
use crate::stats::{Percentiles, Stats};
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
    /// Single job dispatches per fleet size.
    #[arg(long, default_value_t = 200)]
    dispatch_samples: usize,
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

/// The controller sections job dispatch needs: the signing key, and an isolation policy whose
/// probe hosts are the first `max` simulated hosts. The auditor points at a closed port: the
/// audit fails at once, which the probes do not depend on.
fn dispatch_config(env: &BenchEnv, prefix: &str, max: usize) -> String {
    let hosts: Vec<String> = (0..max)
        .map(|i| format!("\"{}\"", crate::fleet::Fleet::host_name(prefix, i)))
        .collect();
    format!(
        "[signing]\nkey = \"{}\"\n\n[isolation]\ninterval = \"24h\"\n\n\
         [isolation.auditor]\ndsn = \"host=127.0.0.1 port=1 user=sim_auditor\"\nconnect_timeout = \"1s\"\n\n\
         [isolation.environments.alpha]\ndatabases = [\"alpha_db\"]\nusers = [\"alpha_user\"]\n\n\
         [isolation.environments.beta]\ndatabases = [\"beta_db\"]\nusers = [\"beta_user\"]\n\n\
         [isolation.probe]\nhosts = [{}]\nhost = \"127.0.0.1\"\nport = 1\ntimeout = \"60s\"\n\
         on_schedule = false\n",
        env.certs.join(sentinel::pki::SIGNING_KEY_FILE).display(),
        hosts.join(", ")
    )
}

/// One `RunIsolationCheck` with probes from `hosts` (empty: every probe host): the time from
/// sending it to each job's arrival at its agent, and to the RPC's answer.
async fn dispatch(
    client: &mut FleetServiceClient<Channel>,
    stats: &Stats,
    hosts: Vec<String>,
) -> Result<(Vec<Duration>, Duration, usize)> {
    stats.take_job_arrivals();
    let started = Instant::now();
    let report = client
        .run_isolation_check(RunIsolationCheckRequest { probe: true, hosts })
        .await
        .context("RunIsolationCheck")?
        .into_inner();
    let answered = started.elapsed();
    let arrivals = stats
        .take_job_arrivals()
        .into_iter()
        .map(|at| at.saturating_duration_since(started))
        .collect();
    let not_probed = report.probes.iter().filter(|p| !p.probed).count();
    Ok((arrivals, answered, not_probed))
}

pub async fn run(args: LatencyArgs) -> Result<()> {
    let env = BenchEnv::new(&args.env)?;
    let max = args.agents.iter().copied().max().unwrap_or(0);
    crate::check_open_files(max)?;
    let mut spec = env.controller("latency")?;
    spec.extra_toml = dispatch_config(&env, super::HOST_PREFIX, max);
    let (mut controller, _) = spec.start().await?;
    let mut fleet = env.fleet(&spec, args.agent.spec())?;
    let mut client = operator(&env.certs, spec.addr).await?;
    let mut single_rows = Vec::new();
    let mut fanout_rows = Vec::new();
    let mut dispatch_rows = Vec::new();
    let mut dispatch_fanout_rows = Vec::new();
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

        // Job dispatch, single: one probe job to one random connected host at a time.
        let mut arrivals = Vec::with_capacity(args.dispatch_samples);
        let mut answers = Vec::with_capacity(args.dispatch_samples);
        let mut lost = 0usize;
        for _ in 0..args.dispatch_samples {
            let i = rand::thread_rng().gen_range(0..fleet.slots().len());
            let slot = &fleet.slots()[i];
            if !slot.is_connected() {
                continue;
            }
            let (arrived, answered, _) =
                dispatch(&mut client, fleet.stats(), vec![slot.name.clone()]).await?;
            match arrived.first() {
                Some(first) if arrived.len() == 1 => {
                    arrivals.push(*first);
                    answers.push(answered);
                }
                _ => lost += 1,
            }
            tokio::time::sleep(args.gap).await;
        }
        let arrivals = Percentiles::of(arrivals);
        let answers = Percentiles::of(answers);
        dispatch_rows.push(vec![
            n.to_string(),
            arrivals.count.to_string(),
            ms(arrivals.p50),
            ms(arrivals.p90),
            ms(arrivals.p99),
            ms(arrivals.max),
            lost.to_string(),
            format!("{} / {}", ms(answers.p50), ms(answers.p99)),
        ]);

        // Job dispatch, fan-out: one probe job to every probe host at once.
        for round in 1..=args.rounds {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let connected = fleet.slots().iter().filter(|s| s.is_connected()).count();
            let (arrived, answered, not_probed) =
                dispatch(&mut client, fleet.stats(), Vec::new()).await?;
            let last = arrived.iter().max().copied().unwrap_or_default();
            let spread = Percentiles::of(arrived.clone());
            dispatch_fanout_rows.push(vec![
                n.to_string(),
                round.to_string(),
                format!("{}/{connected}", arrived.len()),
                ms(spread.p50),
                ms(spread.p99),
                ms(last),
                ms(answered),
                (not_probed.saturating_sub(max - connected)).to_string(),
            ]);
        }

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

    header("Job dispatch: RunIsolationCheck { probe: true } → signed job at the agent");
    table(
        &[
            "agents",
            "single jobs",
            "p50",
            "p90",
            "p99",
            "max",
            "lost",
            "RPC answered p50 / p99",
        ],
        &dispatch_rows,
    );
    table(
        &[
            "agents",
            "fan-out round",
            "jobs arrived",
            "arrival p50",
            "arrival p99",
            "last arrival",
            "RPC answered (all hosts' results in)",
            "connected hosts not probed",
        ],
        &dispatch_fanout_rows,
    );
    println!("Targets: single-job dispatch p99 under 50 ms; fan-out to 10,000 under 2 s.");

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
    Ok(())
}
