//! The agent's TOML configuration and its defaults (loaded with `sentinel_daemon::config`, whose
//! errors name file, line and key).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use sentinel_daemon::config::{load_toml, ConfigError};
use sentinel_daemon::tls::TlsFiles;

/// The agent's configuration (`/etc/hostagent/agent.toml`).
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name; must equal the name in its certificate. Default: the system host name.
    #[serde(default)]
    pub host_name: Option<String>,
    /// The controller's address, `host:port`.
    pub controller: String,
    /// TLS server name to expect in the controller's certificate; default: the address's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Fleet CA, host certificate and key.
    pub tls: TlsFiles,
    /// How often state is collected and reported.
    #[serde(default = "defaults::report_interval", with = "humantime_serde")]
    pub report_interval: Duration,
    /// Every this many reports, send a full snapshot even if nothing changed.
    #[serde(default = "defaults::full_report_every")]
    pub full_report_every: u32,
    /// Reconnect backoff.
    #[serde(default)]
    pub backoff: BackoffConfig,
    /// Which collectors run.
    #[serde(default)]
    pub collectors: CollectorsConfig,
    /// Free-form labels sent in the hello.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Which signed jobs this host runs, and whose signatures it trusts.
    #[serde(default)]
    pub jobs: JobsConfig,
    /// The Prometheus endpoint (`[metrics]`).
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// Where the agent serves its Prometheus metrics (`GET /metrics`, no authentication: keep it
/// on loopback, or behind a firewall).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Whether the endpoint runs.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// The address it listens on.
    #[serde(default = "defaults::metrics_listen")]
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: defaults::metrics_listen(),
        }
    }
}

/// The agent's job policy: the controller can only ask, this decides.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Where the job journal (replay record) and fetched bundles live.
    #[serde(default = "defaults::state_dir")]
    pub state_dir: PathBuf,
    /// PEM public keys (Ed25519, SPKI) whose signatures are trusted. Several, so keys can
    /// rotate. Empty: every job is refused.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    /// Job kinds this host runs: deploy, rollback, backup, verify_backups, restore_test,
    /// isolation_probe. Empty: none.
    #[serde(default)]
    pub allowed_kinds: Vec<String>,
    /// App directories deploys may write to must lie under one of these.
    #[serde(default)]
    pub app_dirs: Vec<PathBuf>,
    /// Clock difference tolerated at both ends of a job's validity window.
    #[serde(default = "defaults::max_clock_skew", with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// What backup, verify and restore-test jobs may do here (`[jobs.backups]`).
    #[serde(default, deserialize_with = "backups_config")]
    pub backups: BackupsConfig,
    /// The credentials isolation probes try (`[jobs.isolation_probe]`).
    #[serde(default, deserialize_with = "crate::jobs::probe::deserialize_config")]
    pub isolation_probe: crate::jobs::probe::ProbeConfig,
    /// What blue/green deploys may touch of the host's proxy (`[jobs.blue_green]`).
    #[serde(default)]
    pub blue_green: BlueGreenPolicy,
}

/// `[jobs.blue_green]`: a blue/green deploy writes an nginx upstream file and runs nginx's
/// config test and reload, both as the agent's user; the controller names them, this bounds
/// them. Empty lists: no blue/green deploy runs here.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BlueGreenPolicy {
    /// Directories upstream files may be written in (a job's `upstream_file` lies below one).
    #[serde(default)]
    pub upstream_dirs: Vec<PathBuf>,
    /// The exact command lines a job may run as its reload and its config test, e.g.
    /// `[["nginx", "-s", "reload"], ["nginx", "-t"]]`.
    #[serde(default)]
    pub commands: Vec<Vec<String>>,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            state_dir: defaults::state_dir(),
            trusted_keys: Vec::new(),
            allowed_kinds: Vec::new(),
            app_dirs: Vec::new(),
            max_clock_skew: defaults::max_clock_skew(),
            backups: BackupsConfig::default(),
            isolation_probe: Default::default(),
            blue_green: BlueGreenPolicy::default(),
        }
    }
}

/// `[jobs.backups]`: the agent's side of backups. Jobs name databases by `dsn_ref`, a key of
/// `dsns`: credentials stay on this host and never travel in a job. Jobs may only write under
/// `backup_dirs`, only tar paths under `file_roots`, and only copy to `offsite_targets`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackupsConfig {
    /// Named connections (`[jobs.backups.dsns.NAME]`: `dsn` or `dsn_file`, `password_file`,
    /// `connect_timeout`). The DSN must not hold the password: it is handed to pg_dump on its
    /// command line, so the password goes in `password_file` (passed through a private
    /// PGPASSFILE).
    #[serde(default)]
    pub dsns: BTreeMap<String, sentinel_postgres::PgClientConfig>,
    /// Directories backup jobs may write into (a job's `backup_dir` is one of them or below).
    #[serde(default)]
    pub backup_dirs: Vec<PathBuf>,
    /// Paths file backups may read (each of a job's `file_paths` is one of them or below).
    #[serde(default)]
    pub file_roots: Vec<PathBuf>,
    /// Offsite destinations jobs may copy to, exactly as jobs name them: a local directory,
    /// `user@host:path` (rsync over ssh) or `rsync://host[:port]/module/path`.
    #[serde(default)]
    pub offsite_targets: Vec<String>,
    /// The PostgreSQL and rsync programs: paths, or names looked up in `PATH`.
    #[serde(default = "defaults::pg_dump")]
    pub pg_dump: PathBuf,
    /// `pg_dumpall`, for the cluster's globals.
    #[serde(default = "defaults::pg_dumpall")]
    pub pg_dumpall: PathBuf,
    /// `pg_restore`, for verify (`--list`) and restore tests.
    #[serde(default = "defaults::pg_restore")]
    pub pg_restore: PathBuf,
    /// `rsync`, for offsite copies.
    #[serde(default = "defaults::rsync")]
    pub rsync: PathBuf,
    /// Refuse to dump as a role that can write (superuser, or INSERT/UPDATE/DELETE/TRUNCATE on
    /// any table): backups read with a read-only role (e.g. one granted `pg_read_all_data`).
    #[serde(default = "defaults::yes")]
    pub require_read_only: bool,
    /// Bound on each pg_dump, pg_restore, rsync and row count of a job.
    #[serde(default = "defaults::backup_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Accept jobs that carry a simulated clock (`RetentionPolicy.simulated_now`). For test
    /// fleets only: it lets whoever signs jobs backdate backups and so steer pruning.
    #[serde(default)]
    pub allow_simulated_clock: bool,
    /// Encryption at rest (`[jobs.backups.encryption]`): when set, every file a backup job
    /// writes is encrypted to these age recipients. Absent: files are stored as written.
    #[serde(default, deserialize_with = "encryption_config")]
    pub encryption: Option<EncryptionConfig>,
}

/// `[jobs.backups.encryption]`: the age recipients every backup file is encrypted to, and the
/// identity verify and restore tests decrypt with. The agent on the backup host is the
/// security boundary: jobs cannot turn encryption off or choose the keys.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// X25519 age recipients (`age1…`), inline.
    #[serde(default, deserialize_with = "age_recipients")]
    pub recipients: Vec<String>,
    /// A file of recipients, one per line (`#` comments and blank lines ignored), as
    /// `age-keygen -y` writes them. Read at start-up and at every backup job.
    #[serde(default, deserialize_with = "age_recipients_file")]
    pub recipients_file: Option<PathBuf>,
    /// The age identity file (`AGE-SECRET-KEY-1…`) verify and restore tests decrypt with; it
    /// must hold the identity of at least one recipient. Without it verify still checks every
    /// file's sha256 and age header but cannot read the archives, and restore tests of
    /// encrypted dumps fail (keep the identity off the backup host on purpose that way).
    #[serde(default, deserialize_with = "age_identity_file")]
    pub identity_file: Option<PathBuf>,
}

// `[jobs.backups.encryption]` is checked key by key as it is read, so that an error carries
// the line of the key that is wrong (a malformed recipient, an unreadable file), and then as a
// whole, exactly as every job loads it (at least one recipient, an identity of one of them).
fn age_recipients<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let values = Vec::<String>::deserialize(d)?;
    crate::jobs::backup::encryption::parse_recipients(&values)
        .map_err(|e| serde::de::Error::custom(format!("jobs.backups.encryption.{e}")))?;
    Ok(values)
}

fn age_recipients_file<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<PathBuf>, D::Error> {
    let path = PathBuf::deserialize(d)?;
    crate::jobs::backup::encryption::read_recipients_file(&path)
        .map_err(|e| serde::de::Error::custom(format!("jobs.backups.encryption.{e}")))?;
    Ok(Some(path))
}

fn age_identity_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let path = PathBuf::deserialize(d)?;
    crate::jobs::backup::encryption::read_identity_file(&path)
        .map_err(|e| serde::de::Error::custom(format!("jobs.backups.encryption.{e}")))?;
    Ok(Some(path))
}

fn encryption_config<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<EncryptionConfig>, D::Error> {
    let config = EncryptionConfig::deserialize(d)?;
    crate::jobs::backup::encryption::Keys::load(&config)
        .map_err(|e| serde::de::Error::custom(format!("jobs.backups.encryption: {e}")))?;
    Ok(Some(config))
}

impl Default for BackupsConfig {
    fn default() -> Self {
        Self {
            dsns: BTreeMap::new(),
            backup_dirs: Vec::new(),
            file_roots: Vec::new(),
            offsite_targets: Vec::new(),
            pg_dump: defaults::pg_dump(),
            pg_dumpall: defaults::pg_dumpall(),
            pg_restore: defaults::pg_restore(),
            rsync: defaults::rsync(),
            require_read_only: true,
            command_timeout: defaults::backup_command_timeout(),
            allow_simulated_clock: false,
            encryption: None,
        }
    }
}

/// Deserializes `[jobs.backups]` and rejects what cannot work (a DSN entry without a DSN, a
/// password inside an inline DSN, relative directories), naming the key, at start-up.
fn backups_config<'de, D>(deserializer: D) -> Result<BackupsConfig, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let config = BackupsConfig::deserialize(deserializer)?;
    for (name, dsn) in &config.dsns {
        if let Some((key, problem)) = dsn.problem() {
            return Err(D::Error::custom(format!(
                "jobs.backups.dsns.{name}.{key}: {problem}"
            )));
        }
        if let Some(inline) = &dsn.dsn {
            if crate::jobs::backup::dsn::has_password(inline) {
                return Err(D::Error::custom(format!(
                    "jobs.backups.dsns.{name}.dsn: holds a password; pg_dump gets the DSN on \
                     its command line, so put the password in `password_file`"
                )));
            }
        }
    }
    for (key, dirs) in [
        ("backup_dirs", &config.backup_dirs),
        ("file_roots", &config.file_roots),
    ] {
        if let Some(dir) = dirs.iter().find(|d| !d.is_absolute()) {
            return Err(D::Error::custom(format!(
                "jobs.backups.{key}: {} must be an absolute path",
                dir.display()
            )));
        }
    }
    if config.command_timeout < Duration::from_secs(1) {
        return Err(D::Error::custom(format!(
            "jobs.backups.command_timeout: {:?} is below the minimum of 1s",
            config.command_timeout
        )));
    }
    Ok(config)
}

/// Reconnect backoff: exponential from `initial` to `max`, each delay jittered.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// First delay after a failure.
    #[serde(default = "defaults::backoff_initial", with = "humantime_serde")]
    pub initial: Duration,
    /// Upper bound on the delay.
    #[serde(default = "defaults::backoff_max", with = "humantime_serde")]
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: defaults::backoff_initial(),
            max: defaults::backoff_max(),
        }
    }
}

/// Which collectors run, and their settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CollectorsConfig {
    /// CPU, memory, disks, load, uptime.
    #[serde(default = "defaults::yes")]
    pub system: bool,
    /// Containers through the Docker Engine API.
    #[serde(default = "defaults::yes")]
    pub docker: bool,
    /// The Docker socket.
    #[serde(default = "defaults::docker_socket")]
    pub docker_socket: String,
    /// The nginx collector (`[collectors.nginx]`), off by default.
    #[serde(default)]
    pub nginx: NginxCollectorConfig,
    /// The Redis instances to watch (`[[collectors.redis]]`); none by default, and the Redis
    /// collector runs only when there is at least one.
    #[serde(default, deserialize_with = "redis_instances")]
    pub redis: Vec<RedisInstanceConfig>,
    /// The PostgreSQL roles collector (`[collectors.postgres]`), off by default.
    #[serde(default, deserialize_with = "postgres_collector")]
    pub postgres: PostgresCollectorConfig,
}

impl CollectorsConfig {
    /// The collectors that run, by name (`system,docker,redis`), for the start-up log.
    pub fn enabled_names(&self) -> String {
        [
            ("system", self.system),
            ("docker", self.docker),
            ("nginx", self.nginx.enabled),
            ("redis", !self.redis.is_empty()),
            ("postgres", self.postgres.enabled),
        ]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| name)
        .collect::<Vec<_>>()
        .join(",")
    }
}

impl Default for CollectorsConfig {
    fn default() -> Self {
        Self {
            system: true,
            docker: true,
            docker_socket: defaults::docker_socket(),
            nginx: NginxCollectorConfig::default(),
            redis: Vec::new(),
            postgres: PostgresCollectorConfig::default(),
        }
    }
}

/// The nginx collector: is it running, its version, the `nginx -t` verdict, and what its
/// config serves.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NginxCollectorConfig {
    /// Whether the collector runs.
    #[serde(default)]
    pub enabled: bool,
    /// The nginx binary: a path, or a name looked up in `PATH`.
    #[serde(default = "defaults::nginx_binary")]
    pub binary: String,
    /// The main config file, as given to `nginx -c`; relative paths are relative to the prefix.
    #[serde(default = "defaults::nginx_config")]
    pub config: PathBuf,
    /// nginx's prefix (`nginx -p`); default: the prefix nginx was built with.
    #[serde(default)]
    pub prefix: Option<PathBuf>,
}

impl Default for NginxCollectorConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            binary: defaults::nginx_binary(),
            config: defaults::nginx_config(),
            prefix: None,
        }
    }
}

/// One Redis instance the Redis collector reads (`[[collectors.redis]]`).
///
/// Its `Debug` hides the password, whether given as `password` or inside `url`.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisInstanceConfig {
    /// The name the instance is reported under, e.g. `cache`.
    pub name: String,
    /// `redis://host:port/db`, `rediss://host:port/db` (TLS) or `unix:///path/redis.sock`.
    pub url: String,
    /// ACL user name; default: the URL's, else Redis's `default` user.
    #[serde(default)]
    pub username: Option<String>,
    /// The password. Prefer `password_file`, which keeps it out of this file.
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the password (the `*_FILE` convention); read at every collection, so a
    /// rotated secret is picked up. A trailing newline is ignored.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the server's certificate, for `rediss://`; default: the
    /// system's trusted roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

impl RedisInstanceConfig {
    /// The URL with any password in it replaced by `<redacted>`, for logs and errors.
    pub fn redacted_url(&self) -> String {
        let Some((scheme, rest)) = self.url.split_once("://") else {
            return self.url.clone();
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        // The last `@` ends the user info: a password may itself contain `@` unescaped.
        let Some((user_info, host)) = authority.rsplit_once('@') else {
            return self.url.clone();
        };
        match user_info.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}{tail}"),
            None => self.url.clone(),
        }
    }

    /// Why this entry cannot work, if it cannot.
    fn problem(&self) -> Option<String> {
        if self.name.trim().is_empty() {
            return Some("`name` must not be empty".into());
        }
        // The redis crate's own parser, so that what passes here also connects; its error is
        // not shown because it may quote the URL, password included.
        let info = match ::redis::IntoConnectionInfo::into_connection_info(self.url.as_str()) {
            Ok(info) => info,
            Err(_) => {
                return Some(format!(
                "`url` {} is not a Redis URL (redis://HOST:PORT/DB, rediss://... or unix:///PATH)",
                self.redacted_url()
            ))
            }
        };
        let in_url = info.redis_settings().password().is_some();
        if [
            in_url,
            self.password.is_some(),
            self.password_file.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count()
            > 1
        {
            return Some(
                "give the password only once: in `url`, `password` or `password_file`".into(),
            );
        }
        let tls = matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. });
        if self.ca.is_some() && !tls {
            return Some("`ca` needs a rediss:// URL".into());
        }
        None
    }
}

impl fmt::Debug for RedisInstanceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisInstanceConfig")
            .field("name", &self.name)
            .field("url", &self.redacted_url())
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("ca", &self.ca)
            .finish()
    }
}

/// Deserializes `[[collectors.redis]]` and rejects entries that cannot work, so that a bad one
/// fails at start-up (exit 64, naming the file and line) rather than at every collection.
fn redis_instances<'de, D>(deserializer: D) -> Result<Vec<RedisInstanceConfig>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let instances = Vec::<RedisInstanceConfig>::deserialize(deserializer)?;
    let mut names = std::collections::BTreeSet::new();
    for instance in &instances {
        if let Some(problem) = instance.problem() {
            return Err(serde::de::Error::custom(format!(
                "collectors.redis {:?}: {problem}",
                instance.name
            )));
        }
        if !names.insert(instance.name.as_str()) {
            return Err(serde::de::Error::custom(format!(
                "collectors.redis: the name {:?} is used twice",
                instance.name
            )));
        }
    }
    Ok(instances)
}

/// The PostgreSQL roles collector (`[collectors.postgres]`): roles, memberships and database
/// privileges of the cluster its DSN points to. Any login role can read them; give it one with
/// no other privilege.
///
/// Its `Debug` hides the password, whether in `dsn` or in a file.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PostgresCollectorConfig {
    /// Whether the collector runs.
    #[serde(default)]
    pub enabled: bool,
    /// libpq DSN (`host=... user=... dbname=... sslmode=verify-full sslrootcert=...` or a
    /// `postgresql://` URL). Prefer `dsn_file` when it carries a password.
    #[serde(default)]
    pub dsn: Option<String>,
    /// A file holding the DSN; read at every collection.
    #[serde(default)]
    pub dsn_file: Option<PathBuf>,
    /// A file holding the password (then not in the DSN); read at every collection.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Bound on connecting (TCP, TLS, authentication).
    #[serde(
        default = "sentinel_postgres::default_connect_timeout",
        with = "humantime_serde"
    )]
    pub connect_timeout: Duration,
    /// Bound on reading the catalog.
    #[serde(
        default = "sentinel_postgres::default_query_timeout",
        with = "humantime_serde"
    )]
    pub timeout: Duration,
}

impl Default for PostgresCollectorConfig {
    fn default() -> Self {
        let client = sentinel_postgres::PgClientConfig::default();
        Self {
            enabled: false,
            dsn: None,
            dsn_file: None,
            password_file: None,
            connect_timeout: client.connect_timeout,
            timeout: client.timeout,
        }
    }
}

impl PostgresCollectorConfig {
    /// The connection settings, defaults filled in.
    pub fn client(&self) -> sentinel_postgres::PgClientConfig {
        sentinel_postgres::PgClientConfig {
            dsn: self.dsn.clone(),
            dsn_file: self.dsn_file.clone(),
            password_file: self.password_file.clone(),
            connect_timeout: self.connect_timeout,
            timeout: self.timeout,
        }
    }
}

impl fmt::Debug for PostgresCollectorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresCollectorConfig")
            .field("enabled", &self.enabled)
            .field("client", &self.client())
            .finish()
    }
}

/// Deserializes `[collectors.postgres]` and rejects a config that cannot work when enabled, so
/// that it fails at start-up (exit 64, naming file and line) rather than at every collection.
fn postgres_collector<'de, D>(deserializer: D) -> Result<PostgresCollectorConfig, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let config = PostgresCollectorConfig::deserialize(deserializer)?;
    if config.enabled {
        if let Some((key, problem)) = config.client().problem() {
            return Err(serde::de::Error::custom(format!(
                "collectors.postgres.{key}: {problem}"
            )));
        }
    }
    Ok(config)
}

/// Every default in one place.
mod defaults {
    use std::path::PathBuf;
    use std::time::Duration;

    pub fn state_dir() -> PathBuf {
        PathBuf::from("/var/lib/hostagent")
    }
    pub fn max_clock_skew() -> Duration {
        Duration::from_secs(30)
    }

    pub fn report_interval() -> Duration {
        Duration::from_secs(15)
    }
    pub fn full_report_every() -> u32 {
        20
    }
    pub fn backoff_initial() -> Duration {
        Duration::from_millis(500)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(30)
    }
    pub fn yes() -> bool {
        true
    }
    pub fn docker_socket() -> String {
        "/var/run/docker.sock".into()
    }
    pub fn nginx_binary() -> String {
        "nginx".into()
    }
    pub fn nginx_config() -> PathBuf {
        PathBuf::from("/etc/nginx/nginx.conf")
    }
    /// Next to the controller's 9464, so both can run on one host.
    pub fn metrics_listen() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 9465))
    }
    pub fn pg_dump() -> PathBuf {
        PathBuf::from("pg_dump")
    }
    pub fn pg_dumpall() -> PathBuf {
        PathBuf::from("pg_dumpall")
    }
    pub fn pg_restore() -> PathBuf {
        PathBuf::from("pg_restore")
    }
    pub fn rsync() -> PathBuf {
        PathBuf::from("rsync")
    }
    pub fn backup_command_timeout() -> Duration {
        Duration::from_secs(6 * 3600)
    }
}

impl AgentConfig {
    /// Loads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = load_toml(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        };
        // server_name_for takes the name from the override when there is one, so the port
        // is checked here for every address.
        let port = self
            .controller
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .filter(|port| *port != 0);
        if port.is_none() {
            return Err(invalid(
                "controller",
                format!(
                    "{:?} has no port: write it as host:port (e.g. \"{}:7443\")",
                    self.controller,
                    self.controller.trim_end_matches(':')
                ),
            ));
        }
        if let Err(e) =
            sentinel_daemon::tls::server_name_for(&self.controller, self.server_name.as_deref())
        {
            return Err(invalid("controller", e));
        }
        if self.report_interval < Duration::from_secs(1) {
            return Err(invalid(
                "report_interval",
                format!("{:?} is below the minimum of 1s", self.report_interval),
            ));
        }
        if self.full_report_every == 0 {
            return Err(invalid("full_report_every", "must be at least 1".into()));
        }
        let bg = &self.jobs.blue_green;
        if let Some(dir) = bg.upstream_dirs.iter().find(|d| {
            !d.is_absolute() || d.components().any(|c| c == std::path::Component::ParentDir)
        }) {
            return Err(invalid(
                "jobs.blue_green.upstream_dirs",
                format!("{} must be an absolute path without `..`", dir.display()),
            ));
        }
        if let Some(argv) = bg
            .commands
            .iter()
            .find(|argv| argv.first().is_none_or(|p| p.trim().is_empty()))
        {
            return Err(invalid(
                "jobs.blue_green.commands",
                format!("{argv:?}: every command needs a program as its first word"),
            ));
        }
        if self.backoff.initial.is_zero() || self.backoff.max < self.backoff.initial {
            return Err(invalid(
                "backoff",
                format!(
                    "need 0 < initial ({:?}) <= max ({:?})",
                    self.backoff.initial, self.backoff.max
                ),
            ));
        }
        if let Some(name) = &self.host_name {
            if name.is_empty() || name.chars().any(|c| c.is_whitespace()) {
                return Err(invalid("host_name", format!("{name:?} is not a host name")));
            }
        }
        Ok(())
    }

    /// Checks the files the config names: the TLS certificate (key matches, valid now,
    /// chains to the CA, names this `host_name`) and that the trusted signing keys are
    /// readable. What `--check-config` and the start-up run, so both fail alike (exit 64).
    pub fn check_files(&self, path: &Path) -> Result<(), ConfigError> {
        use sentinel_daemon::certcheck::{check_files, Usage};
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        };
        let name = self.host_name();
        let now = std::time::SystemTime::now();
        let checked = check_files(path, &self.tls, Usage::Client, now).map_err(|e| {
            // An expired host certificate is renewed by enrolling again, not by hand.
            match sentinel_daemon::certcheck::validity(&self.tls.cert) {
                Some((_, not_after)) if now > not_after => invalid(
                    "tls.cert",
                    format!(
                        "certificate {} expired at {}; enrol again with a new token: run \
                         `sentinel token create --host {name}` where the fleet is administered, \
                         then `hostagent enroll --controller ADDR --token TOKEN` here",
                        self.tls.cert.display(),
                        sentinel_daemon::certcheck::rfc3339(not_after)
                    ),
                ),
                _ => e,
            }
        })?;
        let wanted = format!("sentinel://host/{name}");
        if !checked.identities.contains(&wanted) {
            let key = if self.host_name.is_some() {
                "host_name"
            } else {
                "host_name (unset: the system host name)"
            };
            return Err(invalid(
                key,
                format!(
                    "{name:?} is not the host the certificate {} is for ({}): set host_name to \
                     the certificate's name, or issue a certificate for {name:?}",
                    self.tls.cert.display(),
                    if checked.identities.is_empty() {
                        "it carries no sentinel:// identity".to_string()
                    } else {
                        checked.identities.join(", ")
                    }
                ),
            ));
        }
        for (i, key) in self.jobs.trusted_keys.iter().enumerate() {
            std::fs::File::open(key).map_err(|e| {
                invalid(
                    &format!("jobs.trusted_keys[{i}]"),
                    format!("{}: {e}", key.display()),
                )
            })?;
        }
        Ok(())
    }

    /// The host name this agent speaks as.
    pub fn host_name(&self) -> String {
        self.host_name
            .clone()
            .or_else(|| sysinfo::System::host_name().ok())
            .unwrap_or_else(|| "localhost".into())
    }
}

// Keeps the config loggable at start-up without dumping paths of private keys as if they were
// secrets: nothing in this config is secret, but labels may be long, so this stays compact.
impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("host_name", &self.host_name())
            .field("controller", &self.controller)
            .field("report_interval", &self.report_interval)
            .field("collectors", &self.collectors)
            .field("labels", &self.labels.len())
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_daemon::config::parse_toml;

    const GOOD: &str = r#"
controller = "127.0.0.1:7443"
host_name = "hub-alfa"
report_interval = "5s"

[tls]
ca = "/etc/hostagent/ca.pem"
cert = "/etc/hostagent/host.pem"
key = "/etc/hostagent/host.key"

[labels]
role = "staging"
"#;

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c: AgentConfig = parse_toml(Path::new("agent.toml"), GOOD).unwrap();
        c.validate(Path::new("agent.toml")).unwrap();
        assert_eq!(c.report_interval, Duration::from_secs(5));
        assert_eq!(c.full_report_every, 20);
        assert!(c.collectors.docker);
        assert_eq!(c.labels["role"], "staging");
        assert_eq!(c.host_name(), "hub-alfa");
    }

    #[test]
    fn an_unknown_key_names_file_line_and_key() {
        let text = GOOD.replace("report_interval = \"5s\"", "report_intervall = \"5s\"");
        let err = parse_toml::<AgentConfig>(Path::new("/etc/hostagent/agent.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/hostagent/agent.toml:4:"), "{err}");
        assert!(err.contains("report_intervall"), "{err}");
    }

    #[test]
    fn a_bad_value_names_the_key() {
        let text = GOOD.replace("\"5s\"", "\"five\"");
        let err = parse_toml::<AgentConfig>(Path::new("a.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("a.toml:4:"), "{err}");
        let text = GOOD.replace("\"5s\"", "\"10ms\"");
        let c: AgentConfig = parse_toml(Path::new("a.toml"), &text).unwrap();
        let err = c.validate(Path::new("a.toml")).unwrap_err().to_string();
        assert!(err.contains("`report_interval`"), "{err}");
    }

    #[test]
    fn blue_green_policy_parses_and_bad_entries_name_the_key() {
        let with = |section: &str| -> Result<AgentConfig, String> {
            let text = format!("{GOOD}\n[jobs.blue_green]\n{section}\n");
            let c: AgentConfig =
                parse_toml(Path::new("a.toml"), &text).map_err(|e| e.to_string())?;
            c.validate(Path::new("a.toml")).map_err(|e| e.to_string())?;
            Ok(c)
        };
        let c = with(
            "upstream_dirs = [\"/etc/nginx/sentinel\"]\ncommands = [[\"nginx\", \"-s\", \"reload\"], [\"nginx\", \"-t\"]]",
        )
        .expect("valid");
        assert_eq!(
            c.jobs.blue_green.upstream_dirs,
            [PathBuf::from("/etc/nginx/sentinel")]
        );
        assert_eq!(c.jobs.blue_green.commands[1], ["nginx", "-t"]);
        let e = with("upstream_dirs = [\"nginx/sentinel\"]").expect_err("relative");
        assert!(
            e.contains("jobs.blue_green.upstream_dirs") && e.contains("absolute"),
            "{e}"
        );
        let e = with("upstream_dirs = [\"/etc/nginx/../x\"]").expect_err("dotdot");
        assert!(e.contains("without `..`"), "{e}");
        let e = with("commands = [[]]").expect_err("empty argv");
        assert!(
            e.contains("jobs.blue_green.commands") && e.contains("program"),
            "{e}"
        );
        let e = with("reload = [\"nginx\"]").expect_err("unknown key");
        assert!(e.contains("reload"), "{e}");
    }

    #[test]
    fn a_missing_required_key_is_named() {
        let text = GOOD.replace("controller = \"127.0.0.1:7443\"", "");
        let err = parse_toml::<AgentConfig>(Path::new("a.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("controller"), "{err}");
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    #[test]
    fn the_shipped_default_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config/agent.toml");
        let config = AgentConfig::load(&path).unwrap();
        assert_eq!(config, {
            let mut c = config.clone();
            c.report_interval = defaults::report_interval();
            c
        });
    }
}
