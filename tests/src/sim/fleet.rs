//! The simulated fleet: N agents in this process, each with its own host certificate and TLS
//! config, spread over loopback source addresses, started at a bounded rate so the initial
//! connect is not itself a storm. Benchmarks grow it, wait on it and probe it.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng;
use sentinel_daemon::tls::TlsFiles;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentEnv, AgentSlot, AgentSpec};
use crate::certs;
use crate::net::Dialer;
use crate::stats::Stats;

/// How a fleet is made.
#[derive(Clone)]
pub struct FleetConfig {
    /// The PKI directory: fleet CA (with its key) and the cached host certificates.
    pub certs: PathBuf,
    /// Host names are `PREFIX-00000`, `PREFIX-00001`, ...
    pub name_prefix: String,
    /// Source addresses, used round-robin.
    pub sources: Vec<IpAddr>,
    /// Agent behaviour.
    pub spec: AgentSpec,
}

/// A running simulated fleet.
pub struct Fleet {
    config: FleetConfig,
    env: Arc<AgentEnv>,
    slots: Vec<Arc<AgentSlot>>,
    tasks: JoinSet<()>,
    shutdown: CancellationToken,
}

impl Fleet {
    /// An empty fleet that will dial through `dialer`.
    pub fn new(config: FleetConfig, dialer: Dialer) -> Self {
        let env = Arc::new(AgentEnv {
            stats: dialer.stats.clone(),
            dialer,
            spec: config.spec.clone(),
            epoch: Instant::now(),
        });
        Self {
            config,
            env,
            slots: Vec::new(),
            tasks: JoinSet::new(),
            shutdown: CancellationToken::new(),
        }
    }

    /// The shared counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.env.stats
    }

    /// Every agent.
    pub fn slots(&self) -> &[Arc<AgentSlot>] {
        &self.slots
    }

    /// The host name of agent `index`.
    pub fn host_name(prefix: &str, index: usize) -> String {
        format!("{prefix}-{index:05}")
    }

    /// Adds agents until there are `n`, their first connection attempts spread evenly over
    /// `n_new / connect_rate` seconds. Certificates missing from the cache are issued first.
    pub async fn grow_to(&mut self, n: usize, connect_rate: f64) -> Result<()> {
        let from = self.slots.len();
        if n <= from {
            return Ok(());
        }
        let names: Vec<String> = (from..n)
            .map(|i| Self::host_name(&self.config.name_prefix, i))
            .collect();
        let dir = self.config.certs.clone();
        let issue_names = names.clone();
        let issued = tokio::task::spawn_blocking(move || certs::ensure_hosts(&dir, &issue_names))
            .await
            .context("certificate task")??;
        eprintln!(
            "fleet-sim: host certificates: {} issued, {} cached ({:.1}s)",
            issued.issued,
            issued.reused,
            issued.took.as_secs_f64()
        );
        let dir = self.config.certs.clone();
        let load_names = names.clone();
        let configs = tokio::task::spawn_blocking(move || {
            load_names
                .iter()
                .map(|name| {
                    let (cert, key) = sentinel::pki::host_files(&dir, name);
                    sentinel_daemon::tls::client_config(&TlsFiles {
                        ca: dir.join(sentinel::pki::CA_CERT_FILE),
                        cert,
                        key,
                    })
                    .with_context(|| format!("TLS config of {name}"))
                })
                .collect::<Result<Vec<_>>>()
        })
        .await
        .context("TLS config task")??;

        let ramp = if connect_rate > 0.0 {
            Duration::from_secs_f64((n - from) as f64 / connect_rate)
        } else {
            Duration::ZERO
        };
        let sources = &self.config.sources;
        if sources.is_empty() {
            bail!("no source addresses");
        }
        let mut rng = rand::thread_rng();
        for (offset, (name, tls)) in names.into_iter().zip(configs).enumerate() {
            let index = from + offset;
            let source = sources[index % sources.len()];
            let (slot, probes) = AgentSlot::new(index, name, source);
            let slot = Arc::new(slot);
            let delay = if ramp.is_zero() {
                Duration::ZERO
            } else {
                ramp.mul_f64(rng.gen_range(0.0..1.0))
            };
            self.tasks.spawn(agent::run(
                slot.clone(),
                self.env.clone(),
                tls,
                probes,
                delay,
                self.shutdown.clone(),
            ));
            self.slots.push(slot);
        }
        Ok(())
    }

    /// Waits until every agent holds a stream welcomed after `since` (a fleet-epoch offset
    /// taken with [`Fleet::now`]), printing progress; fails after `timeout`. Returns the wait.
    pub async fn wait_all_connected(&self, since: Duration, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let ready = self
                .slots
                .iter()
                .filter(|s| s.is_connected() && s.welcomed_at().is_some_and(|t| t >= since))
                .count();
            if ready == self.slots.len() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "only {ready} of {} agents connected after {timeout:?}",
                    self.slots.len()
                );
            }
            if last_print.elapsed() >= Duration::from_secs(5) {
                last_print = Instant::now();
                eprintln!(
                    "fleet-sim: {ready}/{} connected, {} attempts so far",
                    self.slots.len(),
                    self.stats().get(crate::stats::Counter::Attempts)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Now, as an offset from the fleet epoch.
    pub fn now(&self) -> Duration {
        self.env.epoch.elapsed()
    }

    /// Stops every agent and waits for their tasks.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}
