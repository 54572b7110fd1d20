//! Benchmark 4: the real agent.
//! - idle: a release `hostagent` with its default config (15 s reports, system and Docker
//!   collectors) connected to a release controller, sampled every second over the window:
//!   VmRSS and utime+stime from `/proc`;
//! - collection: 100 `sleep` containers started from a `FROM scratch` busybox image (no
//!   registry: Debian's busybox-static is copied in), then `DockerCollector::collect` timed
//!   in this process, the way the agent calls it. Containers and image are removed again.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use hostagent::collectors::docker::DockerCollector;

use super::{header, ms, remove_store, table, BenchEnv, EnvArgs};
use crate::controller::list_hosts;
use crate::procfs;
use crate::stats::Percentiles;

/// The image the collection benchmark builds and removes.
const IMAGE: &str = "sentinel-bench-busybox:latest";
/// Name prefix of its containers.
const CONTAINER_PREFIX: &str = "sentinel-bench";
/// The agent's host name.
const AGENT_HOST: &str = "bench-agent";
const DOCKER_SOCKET: &str = "/var/run/docker.sock";

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Idle measurement window (the target speaks of 10 minutes: `--idle 10m`).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// Containers to start for the collection benchmark.
    #[arg(long, default_value_t = 100)]
    containers: usize,
    /// Timed collections.
    #[arg(long, default_value_t = 20)]
    collections: usize,
    /// Skip the idle part.
    #[arg(long)]
    no_idle: bool,
    /// Skip the collection part.
    #[arg(long)]
    no_collection: bool,
    #[command(flatten)]
    env: EnvArgs,
}

pub async fn run(args: AgentArgs) -> Result<()> {
    let env = BenchEnv::new(&args.env)?;
    let mut idle_rows = Vec::new();
    if !args.no_idle {
        idle_rows.push(idle(&env, args.idle).await?);
    }
    let mut collection_rows = Vec::new();
    if !args.no_collection {
        docker_cli(&["version", "--format", "{{.Server.Version}}"])
            .context("the collection benchmark needs a Docker daemon")?;
        let cleanup = Cleanup::new(args.containers);
        cleanup.clear();
        build_image()?;
        eprintln!("fleet-sim: starting {} containers", args.containers);
        start_containers(&cleanup.names)?;
        // The same agent again, now with the containers to collect every 15 s.
        if !args.no_idle {
            idle_rows.push(idle(&env, args.idle).await?);
        }
        collection_rows = collection(args.containers, args.collections).await?;
        drop(cleanup);
    }
    if !idle_rows.is_empty() {
        header(&format!(
            "Agent idle (release build, default config: 15 s reports, system + Docker collectors; window {:?})",
            args.idle
        ));
        table(
            &[
                "containers on the machine",
                "agent RSS (VmRSS)",
                "of which anonymous + file-backed (binary, libc)",
                "agent CPU (% of one core)",
                "machine busy",
            ],
            &idle_rows,
        );
        println!("Targets: under 10 MiB resident, under 0.5 % of a core. Ten-minute windows: `tests/bench/4-agent.sh --idle 10m`.");
    }
    if !collection_rows.is_empty() {
        header("One Docker collection (DockerCollector::collect, list + inspect every container)");
        table(
            &[
                "containers",
                "first (connect + version)",
                "runs",
                "p50",
                "p90",
                "min",
                "max",
            ],
            &collection_rows,
        );
        println!("Target: a 100-container collection under 50 ms.");
    }
    Ok(())
}

async fn idle(env: &BenchEnv, window: Duration) -> Result<Vec<String>> {
    let names = vec![AGENT_HOST.to_string()];
    crate::certs::ensure_hosts(&env.certs, &names)?;
    let mut spec = env.controller("agent")?;
    let (mut controller, _) = spec.start().await?;
    let config = spec.run_dir.join("agent.toml");
    let c = env.certs.display();
    std::fs::write(
        &config,
        format!(
            "host_name = \"{AGENT_HOST}\"\ncontroller = \"{}\"\n\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/host-{AGENT_HOST}.pem\"\nkey = \"{c}/host-{AGENT_HOST}.key\"\n\n[jobs]\nstate_dir = \"{}\"\n",
            spec.addr,
            spec.run_dir.join("agent-state").display()
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let log = spec.run_dir.join("agent.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut agent = Command::new(&env.hostagent)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", env.hostagent.display()))?;
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let hosts = list_hosts(&env.certs, spec.addr).await.unwrap_or_default();
            if crate::controller::online_with_prefix(&hosts, AGENT_HOST) == 1 {
                break;
            }
            if Instant::now() > deadline {
                bail!("the agent did not come online; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("fleet-sim: agent online; settling 20s, then measuring {window:?}");
        tokio::time::sleep(Duration::from_secs(20)).await;
        let usage = procfs::measure(&[agent.id()], window).await?;
        let split = procfs::rss_split(agent.id())?;
        Ok((usage[0], split))
    }
    .await;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(agent.id().to_string())
        .status();
    let _ = agent.wait();
    let _ = controller.stop(Duration::from_secs(30)).await;
    remove_store(&spec);
    let (usage, (anon, file)) = result?;
    let containers = docker_cli(&["ps", "-aq"])
        .map(|out| out.lines().count().to_string())
        .unwrap_or_else(|_| "Docker not reachable".into());
    Ok(vec![
        containers,
        format!(
            "{:.1} MiB (max {:.1})",
            usage.rss_avg_mib, usage.rss_max_mib
        ),
        format!(
            "{:.1} MiB + {:.1} MiB",
            anon as f64 / 1024.0,
            file as f64 / 1024.0
        ),
        format!(
            "{:.3} % ({:.2} s in {:.0} s; one tick is 0.01 s)",
            usage.cpu_percent,
            usage.cpu_percent / 100.0 * usage.window.as_secs_f64(),
            usage.window.as_secs_f64()
        ),
        format!("{:.0} %", usage.machine_busy_percent),
    ])
}

async fn collection(count: usize, runs: usize) -> Result<Vec<Vec<String>>> {
    let mut collector = DockerCollector::new(DOCKER_SOCKET);
    let started = Instant::now();
    let first = collector
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let first_took = started.elapsed();
    let mut sample = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        collector
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        sample.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let p = Percentiles::of(sample.clone());
    let min = sample.iter().min().copied().unwrap_or_default();
    Ok(vec![vec![
        format!("{} ({count} started here)", first.containers.len()),
        ms(first_took),
        p.count.to_string(),
        ms(p.p50),
        ms(p.p90),
        ms(min),
        ms(p.max),
    ]])
}

/// Builds the busybox image `FROM scratch` (nothing can be pulled).
fn build_image() -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("busybox-static is not installed (apt-get install busybox-static)")?;
    let ctx = tempfile::tempdir().context("creating a build context")?;
    std::fs::copy(busybox, ctx.path().join("busybox")).context("copying busybox")?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT []\n",
    )
    .context("writing the Dockerfile")?;
    let context = ctx.path().to_string_lossy().into_owned();
    docker_cli(&["build", "-q", "-t", IMAGE, &context]).map(|_| ())
}

/// Starts the containers, four `docker run`s at a time.
fn start_containers(names: &[String]) -> Result<()> {
    let chunk = names.len().div_ceil(4).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = names
            .chunks(chunk)
            .map(|names| {
                scope.spawn(move || -> Result<()> {
                    for (i, name) in names.iter().enumerate() {
                        let project = format!("com.docker.compose.project=bench{}", i % 5);
                        let service = format!("com.docker.compose.service={name}");
                        docker_cli(&[
                            "run",
                            "-d",
                            "--name",
                            name,
                            "--label",
                            &project,
                            "--label",
                            &service,
                            IMAGE,
                            "/bin/busybox",
                            "sleep",
                            "3600",
                        ])?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| anyhow::anyhow!("a docker worker panicked"))?
        })
    })
}

/// Removes the benchmark's containers and image when dropped (also on errors).
struct Cleanup {
    names: Vec<String>,
}

impl Cleanup {
    fn new(count: usize) -> Self {
        Self {
            names: (0..count)
                .map(|i| format!("{CONTAINER_PREFIX}-{i:03}"))
                .collect(),
        }
    }

    /// Removes leftovers of an interrupted run.
    fn clear(&self) {
        for batch in self.names.chunks(50) {
            let mut args = vec!["rm", "-f"];
            args.extend(batch.iter().map(String::as_str));
            let _ = Command::new("docker")
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        eprintln!("fleet-sim: removing {} containers", self.names.len());
        self.clear();
        let _ = Command::new("docker")
            .args(["rmi", "-f", IMAGE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `docker ARGS`; its stdout, or the error with its stderr.
fn docker_cli(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running docker")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
