//! The controller's TOML configuration (`/etc/sentinel/sentinel.toml`) and its defaults.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sentinel_daemon::config::{load_toml, ConfigError};
use sentinel_daemon::tls::TlsFiles;
use serde::Deserialize;

/// The controller's configuration.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Where agents and operators connect (mTLS, gRPC).
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Where the embedded store lives.
    #[serde(default = "defaults::data_dir")]
    pub data_dir: PathBuf,
    /// Fleet CA, the controller's certificate and key.
    pub tls: TlsFiles,
    /// Agent liveness.
    #[serde(default)]
    pub agents: AgentsConfig,
    /// The job-signing key; without it no job can be sent.
    #[serde(default)]
    pub signing: Option<SigningConfig>,
    /// Job queue settings.
    #[serde(default)]
    pub jobs: JobsConfig,
    /// Deploy pipeline settings (backup hook, report webhooks).
    #[serde(default)]
    pub pipeline: crate::pipeline::PipelineConfig,
    /// The apps the pipeline deploys.
    #[serde(default)]
    pub apps: Vec<crate::pipeline::AppConfig>,
    /// Database isolation policy and auditor (`[isolation]`); absent: no isolation checks.
    #[serde(default)]
    pub isolation: Option<crate::isolation::IsolationConfig>,
    /// Backups (`[backups]`): what the backup host dumps, when, and how long it keeps it;
    /// absent: no backups.
    #[serde(default)]
    pub backups: Option<crate::backups::BackupsConfig>,
    /// The Prometheus endpoint (`[metrics]`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// How the controller's state is stored.
    #[serde(default)]
    pub store: StoreConfig,
    /// The online issuing CA (`[pki]`): enrolment with join tokens and certificate renewal
    /// over the agent channel; absent: neither (certificates are issued offline).
    #[serde(default)]
    pub pki: Option<PkiConfig>,
    /// The file this was read from (SIGHUP re-reads it); `None` for a config made in code
    /// (`sentinel dev`).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[pki]`: the issuing CA the controller signs host certificates with.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PkiConfig {
    /// The issuing CA's certificate (`issuer.pem` from `sentinel pki init-issuer`), signed by
    /// the fleet CA of `[tls] ca`.
    pub issuer_cert: PathBuf,
    /// Its private key, mode 0600.
    pub issuer_key: PathBuf,
    /// Lifetime of host certificates; agents renew at two thirds of it.
    #[serde(default = "defaults::host_cert_ttl", with = "humantime_serde")]
    pub host_cert_ttl: Duration,
}

/// Where the controller serves its Prometheus metrics (`GET /metrics`, no authentication:
/// keep it on loopback, or behind a firewall).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Whether the endpoint runs.
    #[serde(default = "defaults::metrics_enabled")]
    pub enabled: bool,
    /// The address it listens on.
    #[serde(default = "defaults::metrics_listen")]
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: defaults::metrics_enabled(),
            listen: defaults::metrics_listen(),
        }
    }
}

/// The Ed25519 key that signs every job.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// PKCS#8 PEM private key (`signing.key` from `sentinel pki init`), mode 0600.
    pub key: PathBuf,
    /// The next signing key's public half (`signing-next.pub` from `sentinel pki
    /// rotate-signing-key`): announced to agents, signed by `key`, before it signs anything.
    #[serde(default)]
    pub next_key: Option<PathBuf>,
}

/// Job queue settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// How long a job may wait for its host before it expires (the signed window).
    #[serde(default = "defaults::job_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// How long a started job may run past its window before it counts as timed out.
    #[serde(default = "defaults::job_run_timeout", with = "humantime_serde")]
    pub run_timeout: Duration,
    /// How long finished jobs are kept (memory, store, `ListJobs`/`GetJob`).
    #[serde(default = "defaults::job_keep_finished", with = "humantime_serde")]
    pub keep_finished: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            ttl: defaults::job_ttl(),
            run_timeout: defaults::job_run_timeout(),
            keep_finished: defaults::job_keep_finished(),
        }
    }
}

/// The store. Every write an RPC acknowledges, and every job transition the at-most-once
/// rule depends on, is committed before the answer; host state reports are write-behind.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// How often write-behind host state is saved (agents resend it on every connection).
    #[serde(default = "defaults::store_flush_interval", with = "humantime_serde")]
    pub flush_interval: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            flush_interval: defaults::store_flush_interval(),
        }
    }
}

/// How agents are kept track of.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentsConfig {
    /// How often agents must send a heartbeat (told to them in the welcome).
    #[serde(default = "defaults::heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Missed heartbeats after which a host is offline and its stream is closed.
    #[serde(default = "defaults::missed_heartbeats_offline")]
    pub missed_heartbeats_offline: u32,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: defaults::heartbeat_interval(),
            missed_heartbeats_offline: defaults::missed_heartbeats_offline(),
        }
    }
}

/// Every default in one place.
mod defaults {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    pub fn listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 7443))
    }
    pub fn data_dir() -> PathBuf {
        PathBuf::from("/var/lib/sentinel")
    }
    pub fn heartbeat_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn missed_heartbeats_offline() -> u32 {
        3
    }
    pub fn store_flush_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn job_ttl() -> Duration {
        Duration::from_secs(600)
    }
    pub fn job_run_timeout() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn job_keep_finished() -> Duration {
        Duration::from_secs(14 * 86_400)
    }
    pub fn host_cert_ttl() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn metrics_enabled() -> bool {
        true
    }
    /// Loopback: the endpoint has no authentication. The agent's default is 9465, so both
    /// can run on one host.
    pub fn metrics_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9464))
    }
}

impl ControllerConfig {
    /// Loads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = load_toml(path)?;
        config.validate(path)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// One start-up log line saying what runs: plain values, no Rust structures.
    pub fn log_start(&self) {
        let sections: Vec<&str> = [
            ("signing", self.signing.is_some()),
            ("pki", self.pki.is_some()),
            ("isolation", self.isolation.is_some()),
            ("backups", self.backups.is_some()),
        ]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| name)
        .collect();
        tracing::info!(
            file = %self.source.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            listen = %self.listen,
            data_dir = %self.data_dir.display(),
            apps = %self.apps.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(","),
            sections = %sections.join(","),
            metrics = %if self.metrics.enabled { self.metrics.listen.to_string() } else { "off".into() },
            "sentinel starting"
        );
    }

    /// Loads `path` for a subcommand; when it is unusable, prints why and gives the exit code
    /// (64).
    pub fn load_for_command(path: &Path) -> Result<Self, u8> {
        Self::load(path).map_err(|e| {
            eprintln!("sentinel: invalid config: {e}");
            crate::cli::EXIT_USAGE
        })
    }

    /// Loads `path` for `serve` and `config check`: also checks the files it names (the TLS
    /// certificate, key and CA, the signing key). When anything is wrong, prints why (naming
    /// the key and the file) and gives the exit code (64).
    pub fn load_for_daemon(path: &Path) -> Result<Self, u8> {
        let config = Self::load_for_command(path)?;
        config.check_files(path).map_err(|e| {
            eprintln!("sentinel: invalid config: {e}");
            crate::cli::EXIT_USAGE
        })?;
        Ok(config)
    }

    /// Checks the files the config names: the TLS certificate (key matches, valid now,
    /// chains to the CA) and that the signing key is readable.
    pub fn check_files(&self, path: &Path) -> Result<(), ConfigError> {
        use sentinel_daemon::certcheck::{check_files, Usage};
        check_files(path, &self.tls, Usage::Server, std::time::SystemTime::now())?;
        if let Some(signing) = &self.signing {
            std::fs::File::open(&signing.key).map_err(|e| ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "signing.key".into(),
                message: format!("{}: {e}", signing.key.display()),
            })?;
            if let Some(next) = &signing.next_key {
                crate::pki::keys::load_verifying_key(next).map_err(|e| ConfigError::Invalid {
                    path: path.to_path_buf(),
                    key: "signing.next_key".into(),
                    message: e.to_string(),
                })?;
            }
        }
        Ok(())
    }

    /// Loads `path` and takes its `[isolation]` section, for `sentinel isolation`; when there
    /// is none or the file is unusable, prints why and gives the exit code (64).
    pub fn load_isolation_for_command(
        path: &Path,
    ) -> Result<crate::isolation::IsolationConfig, u8> {
        match Self::load_for_command(path)? {
            ControllerConfig {
                isolation: Some(policy),
                ..
            } => Ok(policy),
            _ => {
                eprintln!(
                    "sentinel isolation: {} has no [isolation] section",
                    path.display()
                );
                Err(crate::cli::EXIT_USAGE)
            }
        }
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        };
        if self.agents.heartbeat_interval < Duration::from_millis(100) {
            return Err(invalid(
                "agents.heartbeat_interval",
                format!(
                    "{:?} is below the minimum of 100ms",
                    self.agents.heartbeat_interval
                ),
            ));
        }
        if self.store.flush_interval < Duration::from_millis(10) {
            return Err(invalid(
                "store.flush_interval",
                format!(
                    "{:?} is below the minimum of 10ms",
                    self.store.flush_interval
                ),
            ));
        }
        crate::pipeline::config::validate(path, &self.pipeline, &self.apps)?;
        if self.agents.missed_heartbeats_offline == 0 {
            return Err(invalid(
                "agents.missed_heartbeats_offline",
                "must be at least 1".into(),
            ));
        }
        if self.jobs.keep_finished < Duration::from_secs(3600) {
            return Err(invalid(
                "jobs.keep_finished",
                format!(
                    "{:?} is below the minimum of 1h (finished jobs are the deploy and backup \
                     history operators read)",
                    self.jobs.keep_finished
                ),
            ));
        }
        if let Some((key, message)) = self.isolation.as_ref().and_then(|i| i.problem()) {
            return Err(invalid(&format!("isolation.{key}"), message));
        }
        if let Some((key, message)) = self.backups.as_ref().and_then(|b| b.problem()) {
            return Err(invalid(&format!("backups.{key}"), message));
        }
        if let Some(pki) = &self.pki {
            if pki.host_cert_ttl < Duration::from_secs(30) {
                return Err(invalid(
                    "pki.host_cert_ttl",
                    format!("{:?} is below the minimum of 30s", pki.host_cert_ttl),
                ));
            }
        }
        Ok(())
    }

    /// The embedded store's file.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("sentinel.redb")
    }
}

impl fmt::Debug for ControllerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerConfig")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("tls", &self.tls)
            .field("agents", &self.agents)
            .field("signing", &self.signing)
            .field("jobs", &self.jobs)
            .field(
                "apps",
                &self.apps.iter().map(|a| &a.name).collect::<Vec<_>>(),
            )
            .field("isolation", &self.isolation)
            .field("backups", &self.backups)
            .field("metrics", &self.metrics)
            .field("pki", &self.pki)
            .finish_non_exhaustive()
    }
}

/// `sentinel config check FILE`: prints `FILE: ok`, or why the file (or a file it names) is
/// invalid and exits 64.
pub fn check_command(file: &Path) -> u8 {
    match ControllerConfig::load_for_daemon(file) {
        Ok(_) => {
            println!("{}: ok", file.display());
            0
        }
        Err(code) => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_daemon::config::parse_toml;

    const GOOD: &str = r#"
listen = "127.0.0.1:7443"
data_dir = "/tmp/s"

[tls]
ca = "ca.pem"
cert = "controller.pem"
key = "controller.key"

[agents]
heartbeat_interval = "2s"
"#;

    #[test]
    fn subcommands_exit_64_on_an_invalid_file_or_a_missing_isolation_section() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let good = tmp.path().join("good.toml");
        std::fs::write(&good, GOOD).expect("write");
        // The file is fine, the TLS files it names do not exist (e2e tests check real ones).
        assert_eq!(check_command(&good), 64);
        assert!(ControllerConfig::load_for_command(&good).is_ok());
        assert_eq!(
            ControllerConfig::load_isolation_for_command(&good).err(),
            Some(64)
        );

        let bad = tmp.path().join("bad.toml");
        std::fs::write(&bad, GOOD.replace("heartbeat_interval", "heartbeat")).expect("write");
        let missing = tmp.path().join("missing.toml");
        for file in [&bad, &missing] {
            assert_eq!(check_command(file), 64, "{}", file.display());
            assert_eq!(ControllerConfig::load_for_command(file).err(), Some(64));
            assert_eq!(
                ControllerConfig::load_isolation_for_command(file).err(),
                Some(64)
            );
        }
    }

    #[test]
    fn a_store_flush_interval_below_10ms_is_refused_by_name() {
        let text = format!("{GOOD}\n[store]\nflush_interval = \"0s\"\n");
        let c: ControllerConfig = parse_toml(Path::new("s.toml"), &text).unwrap();
        let err = c.validate(Path::new("s.toml")).unwrap_err().to_string();
        assert!(err.contains("store.flush_interval"), "{err}");
        let text = format!("{GOOD}\n[store]\nflush_interval = \"5m\"\n");
        let c: ControllerConfig = parse_toml(Path::new("s.toml"), &text).unwrap();
        c.validate(Path::new("s.toml")).unwrap();
        assert_eq!(c.store.flush_interval, Duration::from_secs(300));
    }

    #[test]
    fn a_good_config_parses() {
        let c: ControllerConfig = parse_toml(Path::new("s.toml"), GOOD).unwrap();
        c.validate(Path::new("s.toml")).unwrap();
        assert_eq!(c.agents.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(c.agents.missed_heartbeats_offline, 3);
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let text = GOOD.replace("heartbeat_interval", "heartbeat");
        let err = parse_toml::<ControllerConfig>(Path::new("/etc/sentinel/sentinel.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/sentinel/sentinel.toml:11:"), "{err}");
        assert!(err.contains("heartbeat"), "{err}");
        let text = GOOD.replace("127.0.0.1:7443", "nowhere");
        let err = parse_toml::<ControllerConfig>(Path::new("s.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("s.toml:2:"), "{err}");
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    #[test]
    fn the_shipped_default_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config/sentinel.toml");
        let config = ControllerConfig::load(&path).unwrap();
        assert_eq!(config.listen, defaults::listen());
        assert_eq!(config.agents, AgentsConfig::default());
    }
}
