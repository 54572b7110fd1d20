//! The isolation policy (`[isolation]` in the controller config): each environment with its
//! databases and users, the roles allowed to cross environments on purpose (a backup role), the
//! auditor's connection and the schedule. Nothing here knows any fleet's names; they come from
//! the config.

use std::collections::BTreeMap;
use std::time::Duration;

use sentinel_postgres::PgClientConfig;
use serde::Deserialize;

/// PostgreSQL truncates identifiers longer than this (NAMEDATALEN - 1), so a longer name in the
/// policy could never match the catalog.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// `[isolation]`: what must not reach what, and how the controller checks it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IsolationConfig {
    /// How often the controller audits the cluster (also once at start-up).
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Roles allowed to reach every environment's databases on purpose, e.g. the backup host's
    /// read-only role. They are not audited, and a user reaching a database through one of
    /// them is still a violation.
    #[serde(default)]
    pub cross_environment_roles: Vec<String>,
    /// Databases every role may reach on purpose, in no environment: by default `postgres`
    /// (where clients and tools, the auditor included, connect when they name no database)
    /// and the templates `template0`/`template1` (copied into every new database; keep
    /// application data out of them). Every other database of the cluster must be listed
    /// under an environment, or the report is not clean. Setting this replaces the default.
    #[serde(default = "default_shared_databases")]
    pub shared_databases: Vec<String>,
    /// How the controller reads the catalog: a login role that needs no privilege at all.
    pub auditor: PgClientConfig,
    /// Environment name (as the deploy pipeline names it, e.g. `production`) to its policy.
    pub environments: BTreeMap<String, EnvironmentPolicy>,
    /// Probing from the hosts (`[isolation.probe]`); absent: the catalog audit only.
    #[serde(default)]
    pub probe: Option<ProbeSettings>,
}

/// `[isolation.probe]`: which agents try their own environments' credentials against the
/// other environments' databases, and where they find the cluster.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProbeSettings {
    /// The agents (host names) that probe; each needs `isolation_probe` in its
    /// `jobs.allowed_kinds` and its credentials in `[jobs.isolation_probe]`.
    pub hosts: Vec<String>,
    /// The cluster's address as those hosts reach it.
    pub host: String,
    /// The cluster's port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// How long a check waits for the hosts' answers; a host that has not answered by then is
    /// reported as not probed.
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Bound on each connection attempt on the hosts.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Whether scheduled checks probe too (on-demand checks probe when asked).
    #[serde(default = "default_true")]
    pub on_schedule: bool,
    /// How often scheduled checks probe: the audit runs every `isolation.interval`, the
    /// probes (one job per host, kept in the job history) at most this often.
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    pub interval: Duration,
}

fn default_probe_interval() -> Duration {
    Duration::from_secs(3600)
}

fn default_port() -> u16 {
    5432
}

fn default_probe_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_true() -> bool {
    true
}

/// One environment: its databases and the users its apps log in as.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentPolicy {
    /// The environment's databases.
    pub databases: Vec<String>,
    /// The environment's users (login roles, or group roles of this environment).
    pub users: Vec<String>,
    /// Who `fix` gives a taken database back to when no user of the environment owns objects
    /// in it (the one that does, the app that built it, comes first); default: the first of
    /// `users`.
    #[serde(default)]
    pub owner: Option<String>,
}

/// `postgres` and the two templates, which every cluster has and every role may reach.
pub fn default_shared_databases() -> Vec<String> {
    ["postgres", "template0", "template1"]
        .map(String::from)
        .to_vec()
}

fn default_interval() -> Duration {
    Duration::from_secs(300)
}

/// Which side of the policy a role is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side<'a> {
    /// A user of this environment.
    Environment(&'a str),
    /// A role allowed to cross environments.
    Crossing,
    /// Not in the policy (admin roles, group roles, predefined roles...).
    Neutral,
}

impl EnvironmentPolicy {
    /// The role that should own this environment's databases.
    pub fn owner(&self) -> Option<&str> {
        self.owner
            .as_deref()
            .or_else(|| self.users.first().map(String::as_str))
    }
}

impl IsolationConfig {
    /// The environment a database belongs to.
    pub fn environment_of_database(&self, database: &str) -> Option<&str> {
        self.environments
            .iter()
            .find(|(_, e)| e.databases.iter().any(|d| d == database))
            .map(|(name, _)| name.as_str())
    }

    /// Whether `database` is shared on purpose (`shared_databases`).
    pub fn is_shared(&self, database: &str) -> bool {
        self.shared_databases.iter().any(|d| d == database)
    }

    /// Which side `role` is on.
    pub fn side(&self, role: &str) -> Side<'_> {
        if let Some((name, _)) = self
            .environments
            .iter()
            .find(|(_, e)| e.users.iter().any(|u| u == role))
        {
            return Side::Environment(name);
        }
        if self.cross_environment_roles.iter().any(|r| r == role) {
            return Side::Crossing;
        }
        Side::Neutral
    }

    /// Why this policy cannot work, as (dotted key under `isolation`, message), if it cannot.
    pub fn problem(&self) -> Option<(String, String)> {
        if let Some((key, message)) = self.auditor.problem() {
            return Some((format!("auditor.{key}"), message));
        }
        if self.interval < Duration::from_secs(1) {
            return Some((
                "interval".into(),
                format!("{:?} is below the minimum of 1s", self.interval),
            ));
        }
        if self.environments.is_empty() {
            return Some((
                "environments".into(),
                "name at least one environment ([isolation.environments.NAME])".into(),
            ));
        }
        if let Some(problem) = self
            .cross_environment_roles
            .iter()
            .find_map(|r| name_problem(r))
        {
            return Some(("cross_environment_roles".into(), problem));
        }
        if let Some(problem) = self.shared_databases.iter().find_map(|d| name_problem(d)) {
            return Some(("shared_databases".into(), problem));
        }
        if let Some(probe) = &self.probe {
            if probe.hosts.is_empty() {
                return Some((
                    "probe.hosts".into(),
                    "name at least one host that probes".into(),
                ));
            }
            if let Some(h) = probe
                .hosts
                .iter()
                .find(|h| h.trim().is_empty() || h.contains(char::is_whitespace))
            {
                return Some(("probe.hosts".into(), format!("{h:?} is not a host name")));
            }
            if let Some((i, h)) = probe
                .hosts
                .iter()
                .enumerate()
                .find(|(i, h)| probe.hosts[..*i].contains(h))
            {
                return Some((
                    "probe.hosts".into(),
                    format!("{h:?} is listed twice (again at position {})", i + 1),
                ));
            }
            if probe.host.trim().is_empty() {
                return Some((
                    "probe.host".into(),
                    "give the cluster's address as the hosts reach it".into(),
                ));
            }
            if probe.interval < Duration::from_secs(1) {
                return Some((
                    "probe.interval".into(),
                    format!("{:?} is below the minimum of 1s", probe.interval),
                ));
            }
            if probe.timeout < Duration::from_secs(1) || probe.connect_timeout.is_zero() {
                return Some((
                    "probe.timeout".into(),
                    format!(
                        "need timeout >= 1s (is {:?}) and connect_timeout > 0",
                        probe.timeout
                    ),
                ));
            }
            if probe.connect_timeout >= probe.timeout {
                return Some((
                    "probe.connect_timeout".into(),
                    format!(
                        "{:?} must be shorter than probe.timeout ({:?})",
                        probe.connect_timeout, probe.timeout
                    ),
                ));
            }
        }
        for (env, policy) in &self.environments {
            if env.trim().is_empty() {
                return Some(("environments".into(), "an environment name is empty".into()));
            }
            for (field, names) in [("databases", &policy.databases), ("users", &policy.users)] {
                let key = format!("environments.{env}.{field}");
                if names.is_empty() {
                    return Some((key, format!("list at least one of {env}'s {field}")));
                }
                if let Some(problem) = names.iter().find_map(|n| name_problem(n)) {
                    return Some((key, problem));
                }
            }
            if let Some(owner) = &policy.owner {
                if !policy.users.contains(owner) {
                    return Some((
                        format!("environments.{env}.owner"),
                        format!("{owner:?} is not one of {env}'s users"),
                    ));
                }
            }
        }
        // A database or a role in two places would make "which environment is this?" ambiguous.
        let mut databases: BTreeMap<&str, &str> = BTreeMap::new();
        let mut roles: BTreeMap<&str, String> = BTreeMap::new();
        for role in &self.cross_environment_roles {
            let here = "cross_environment_roles".to_string();
            if roles.insert(role, here.clone()).is_some() {
                return Some((here, format!("role {role:?} is listed twice")));
            }
        }
        for db in &self.shared_databases {
            if databases.insert(db, "shared_databases").is_some() {
                return Some((
                    "shared_databases".into(),
                    format!("database {db:?} is listed twice"),
                ));
            }
        }
        for (env, policy) in &self.environments {
            for db in &policy.databases {
                if let Some(other) = databases.insert(db, env) {
                    return Some((
                        format!("environments.{env}.databases"),
                        format!("database {db:?} is also listed for {other}"),
                    ));
                }
            }
            for user in &policy.users {
                let here = format!("environments.{env}.users");
                if let Some(other) = roles.insert(user, here.clone()) {
                    return Some((here, format!("role {user:?} is also listed in {other}")));
                }
            }
        }
        None
    }
}

/// Why `name` cannot be a PostgreSQL identifier, if it cannot.
fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a name is empty".into());
    }
    if name.contains('\0') {
        return Some(format!("{name:?} contains a NUL byte"));
    }
    if name.len() > MAX_IDENTIFIER_BYTES {
        return Some(format!(
            "{name:?} is longer than PostgreSQL's {MAX_IDENTIFIER_BYTES}-byte identifier limit"
        ));
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small two-environment policy for unit tests.
    pub(crate) fn policy() -> IsolationConfig {
        IsolationConfig {
            interval: default_interval(),
            cross_environment_roles: vec!["backup_ro".into()],
            shared_databases: default_shared_databases(),
            auditor: PgClientConfig {
                dsn: Some("host=db user=auditor".into()),
                ..Default::default()
            },
            environments: [
                (
                    "staging".to_string(),
                    EnvironmentPolicy {
                        databases: vec!["auth_stg".into(), "pulse_stg".into()],
                        users: vec!["stg_user".into()],
                        owner: None,
                    },
                ),
                (
                    "production".to_string(),
                    EnvironmentPolicy {
                        databases: vec!["auth_prod".into(), "pulse_prod".into()],
                        users: vec!["prod_user".into(), "pulse_prod_user".into()],
                        owner: None,
                    },
                ),
            ]
            .into(),
            probe: None,
        }
    }

    #[test]
    fn a_good_policy_has_no_problem() {
        assert_eq!(policy().problem(), None);
        assert_eq!(policy().side("prod_user"), Side::Environment("production"));
        assert_eq!(policy().side("backup_ro"), Side::Crossing);
        assert_eq!(policy().side("postgres"), Side::Neutral);
        assert_eq!(
            policy().environment_of_database("pulse_stg"),
            Some("staging")
        );
        assert_eq!(
            policy().environments["production"].owner(),
            Some("prod_user")
        );
    }

    #[test]
    fn the_example_in_the_shipped_config_is_a_valid_policy() {
        // The commented `[isolation]` example, uncommented: its keys must stay in sync.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/config/sentinel.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let start = text
            .find("# [isolation]\n")
            .expect("an [isolation] example");
        let example: String = text[start..]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.starts_with('[')
                    || l.split_once(" = ")
                        .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            })
            .collect::<Vec<_>>()
            .join("\n");
        #[derive(Deserialize)]
        struct Wrapper {
            isolation: IsolationConfig,
        }
        let parsed: Wrapper = toml::from_str(&example).unwrap_or_else(|e| panic!("{e}\n{example}"));
        assert_eq!(parsed.isolation.problem(), None);
        assert_eq!(parsed.isolation.environments.len(), 3);
        assert_eq!(parsed.isolation.cross_environment_roles, ["s60_backup_ro"]);
        let probe = parsed
            .isolation
            .probe
            .expect("an [isolation.probe] example");
        assert_eq!(probe.hosts.len(), 3);
        assert_eq!(probe.port, 5432);
    }

    #[test]
    fn probe_settings_that_cannot_work_name_their_key() {
        let settings = ProbeSettings {
            hosts: vec!["web-1".into()],
            host: "10.0.0.5".into(),
            port: 5432,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            on_schedule: true,
            interval: Duration::from_secs(3600),
        };
        let with = |s: ProbeSettings| IsolationConfig {
            probe: Some(s),
            ..policy()
        };
        assert_eq!(with(settings.clone()).problem(), None);
        let cases = [
            (
                "probe.hosts",
                ProbeSettings {
                    hosts: vec![],
                    ..settings.clone()
                },
            ),
            (
                "probe.hosts",
                ProbeSettings {
                    hosts: vec!["a b".into()],
                    ..settings.clone()
                },
            ),
            (
                "probe.host",
                ProbeSettings {
                    host: " ".into(),
                    ..settings.clone()
                },
            ),
            (
                "probe.connect_timeout",
                ProbeSettings {
                    connect_timeout: Duration::from_secs(60),
                    ..settings.clone()
                },
            ),
            (
                "probe.interval",
                ProbeSettings {
                    interval: Duration::from_millis(10),
                    ..settings.clone()
                },
            ),
            (
                "probe.hosts",
                ProbeSettings {
                    hosts: vec!["web-1".into(), "web-2".into(), "web-1".into()],
                    ..settings.clone()
                },
            ),
        ];
        for (key, s) in cases {
            assert_eq!(with(s).problem().map(|p| p.0), Some(key.to_string()));
        }
    }

    #[test]
    fn problems_name_the_key() {
        let mut p = policy();
        p.environments
            .get_mut("staging")
            .unwrap()
            .databases
            .push("auth_prod".into());
        let (key, message) = p.problem().unwrap();
        assert_eq!(key, "environments.staging.databases");
        assert!(message.contains("auth_prod"), "{message}");

        let mut p = policy();
        p.environments
            .get_mut("staging")
            .unwrap()
            .users
            .push("backup_ro".into());
        assert_eq!(p.problem().unwrap().0, "environments.staging.users");

        let mut p = policy();
        p.environments.get_mut("production").unwrap().owner = Some("stg_user".into());
        assert_eq!(p.problem().unwrap().0, "environments.production.owner");

        let mut p = policy();
        p.environments.get_mut("production").unwrap().users.clear();
        assert_eq!(p.problem().unwrap().0, "environments.production.users");

        let mut p = policy();
        p.auditor.dsn = None;
        assert_eq!(p.problem().unwrap().0, "auditor.dsn");

        let mut p = policy();
        p.environments.clear();
        assert_eq!(p.problem().unwrap().0, "environments");

        let mut p = policy();
        p.cross_environment_roles.push("x".repeat(64));
        assert_eq!(p.problem().unwrap().0, "cross_environment_roles");

        // A database both shared and in an environment: which is it?
        let mut p = policy();
        p.shared_databases.push("auth_prod".into());
        let (key, message) = p.problem().unwrap();
        assert_eq!(key, "environments.production.databases");
        assert!(message.contains("shared_databases"), "{message}");

        let mut p = policy();
        p.shared_databases.push(String::new());
        assert_eq!(p.problem().unwrap().0, "shared_databases");
    }
}
