//! Benchmark 5: bytes per agent per hour at the agent's default interval (15 s reports, a full
//! one every 20, deltas in between, heartbeats every 10 s as welcomed). Counted two ways over
//! a window after the fleet settled: the encoded gRPC messages (protobuf plus the 5-byte frame
//! header) by kind, and the TCP bytes under TLS (records, HTTP/2 frames and headers, keepalive
//! pings). The default window is one full-report cycle (20 × 15 s), so every agent sends one
//! full report in it.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::{header, remove_store, table, BenchEnv, EnvArgs};
use crate::stats::{Counter, Snapshot};
use crate::AgentArgs;

#[derive(Debug, Args)]
pub struct BytesArgs {
    /// Agents.
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Wait after the last agent connected (past its first full report).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Counting window.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    window: Duration,
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    env: EnvArgs,
}

pub async fn run(args: BytesArgs) -> Result<()> {
    let env = BenchEnv::new(&args.env)?;
    crate::check_open_files(args.agents)?;
    let mut spec = env.controller("bytes")?;
    let (mut controller, _) = spec.start().await?;
    let mut fleet = env.fleet(&spec, args.agent.spec())?;
    fleet.grow_to(args.agents, env.connect_rate).await?;
    fleet
        .wait_all_connected(Duration::ZERO, env.connect_timeout(args.agents))
        .await?;
    eprintln!(
        "fleet-sim: {} agents connected; settling {:?}, then counting for {:?}",
        args.agents, args.settle, args.window
    );
    tokio::time::sleep(args.settle).await;
    let before = fleet.stats().snapshot();
    let started = std::time::Instant::now();
    tokio::time::sleep(args.window).await;
    let d = fleet.stats().snapshot().since(&before);
    let elapsed = started.elapsed();
    let reconnects = d.get(Counter::Attempts);
    fleet.shutdown().await;
    let _ = controller.stop(Duration::from_secs(30)).await;
    remove_store(&spec);

    let per_hour = 3600.0 / elapsed.as_secs_f64() / args.agents as f64;
    let row = |what: &str, count: Option<u64>, bytes: u64| -> Vec<String> {
        let mean = count
            .filter(|c| *c > 0)
            .map_or("".into(), |c| format!("{:.0} B", bytes as f64 / c as f64));
        vec![
            what.into(),
            count.map_or("".into(), |c| format!("{:.0}", c as f64 * per_hour)),
            mean,
            kib(bytes as f64 * per_hour),
        ]
    };
    let rows = rows(&d, row);
    header(&format!(
        "Bytes per agent per hour (report interval {:?}, full every {}, {} containers per host; {} agents over {:?})",
        args.agent.interval, args.agent.full_every, args.agent.containers, args.agents, elapsed
    ));
    table(
        &["what", "messages/agent/h", "mean size", "bytes/agent/h"],
        &rows,
    );
    println!(
        "Per day: {} per agent on the wire (TCP, both directions). Reconnect attempts during the window: {reconnects}.",
        kib((d.get(Counter::TcpIn) + d.get(Counter::TcpOut)) as f64 * per_hour * 24.0)
    );
    Ok(())
}

fn rows(d: &Snapshot, row: impl Fn(&str, Option<u64>, u64) -> Vec<String>) -> Vec<Vec<String>> {
    use Counter::*;
    let reports = d.get(ReportsFull) + d.get(ReportsDelta);
    vec![
        row("full reports", Some(d.get(ReportsFull)), d.get(BytesFull)),
        row(
            "delta reports",
            Some(d.get(ReportsDelta)),
            d.get(BytesDelta),
        ),
        row("heartbeats", Some(d.get(Heartbeats)), d.get(BytesHeartbeat)),
        row("other agent messages", None, d.get(BytesOtherUp)),
        row("controller messages", None, d.get(BytesDown)),
        row(
            "**encoded gRPC messages, total**",
            Some(reports + d.get(Heartbeats)),
            d.bytes_up() + d.get(BytesDown),
        ),
        row("TCP agent → controller (TLS)", None, d.get(TcpOut)),
        row("TCP controller → agent (TLS)", None, d.get(TcpIn)),
        row(
            "**TCP total (TLS, HTTP/2, pings)**",
            None,
            d.get(TcpOut) + d.get(TcpIn),
        ),
    ]
}

/// "123.4 KiB" or "1.2 MiB".
fn kib(bytes: f64) -> String {
    if bytes >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", bytes / 1024.0 / 1024.0)
    } else {
        format!("{:.1} KiB", bytes / 1024.0)
    }
}
