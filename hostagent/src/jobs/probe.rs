//! Isolation probes (`JobKind::IsolationProbe`): from this host's own network position, each
//! credential the host holds (its apps' database users, `[[jobs.isolation_probe.credentials]]`)
//! tries to connect to every database of the other environments. A connection that succeeds is
//! a violation; a refusal is recorded with the server's message. The catalog audit on the
//! controller says what the grants allow; this says what actually happens on the wire
//! (pg_hba.conf, firewalls, a password reused across environments...).
//!
//! Credentials are read on the host when the job runs (from an app's `.env` or from a password
//! file) and never leave it: results name the user, never the password, and the password is
//! registered as a secret of the job so no event can carry it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use sentinel_proto::v1::{
    job_finished, IsolationProbeParams, ProbeAttempt, ProbeReport, ProbeTarget, StepStatus,
};
use serde::Deserialize;

use super::{JobError, JobEvents};
use sentinel_postgres::{connect_to, PgClientConfig, Redirect};

/// Connection attempts run at once: enough to finish a few dozen quickly without looking like
/// a connection storm to the cluster.
const PARALLEL_ATTEMPTS: usize = 8;
/// The default bound on one attempt when the job sets none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The variable of an app's env file holding its database URL, unless `url_var` says otherwise.
const DEFAULT_URL_VAR: &str = "DATABASE_URL";
/// Env files and password files are small; a bigger one is not what the config meant.
const MAX_SECRET_FILE: u64 = 1 << 20;

/// `[jobs.isolation_probe]`: the credentials this host probes with.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// One entry per database user an app on this host logs in as.
    #[serde(default)]
    pub credentials: Vec<ProbeCredential>,
}

/// One database user of this host and the environment it belongs to. The user and password
/// come either from an app's env file (`env_file` with `url_var`, or `user_var` and
/// `password_var`) or from the config (`user` and `password_file`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProbeCredential {
    /// The environment the user belongs to, as the controller's isolation policy names it.
    pub environment: String,
    /// An app's dotenv file (e.g. `/srv/apps/shop/current/.env`), read at every probe.
    #[serde(default)]
    pub env_file: Option<PathBuf>,
    /// The variable of `env_file` holding a `postgres://` URL (default `DATABASE_URL`); only
    /// its user, password and `sslmode` are used.
    #[serde(default)]
    pub url_var: Option<String>,
    /// The variable of `env_file` holding the user name (with `password_var`, instead of a URL).
    #[serde(default)]
    pub user_var: Option<String>,
    /// The variable of `env_file` holding the password.
    #[serde(default)]
    pub password_var: Option<String>,
    /// The user name, when not from an env file.
    #[serde(default)]
    pub user: Option<String>,
    /// A file holding the password of `user`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `sslmode` for `user`/`user_var` credentials: `require`, `verify-ca` or `verify-full`
    /// connect over TLS (the server's certificate verified); unset, `disable`, `allow` and
    /// `prefer` connect without TLS. A URL from `env_file` carries its own `sslmode`.
    #[serde(default)]
    pub sslmode: Option<String>,
}

/// Deserializes `[jobs.isolation_probe]` and rejects what cannot work, naming the key, at
/// start-up rather than at the first probe.
pub fn deserialize_config<'de, D>(deserializer: D) -> Result<ProbeConfig, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let config = ProbeConfig::deserialize(deserializer)?;
    match config.problem() {
        Some((key, message)) => Err(serde::de::Error::custom(format!(
            "jobs.isolation_probe.{key}: {message}"
        ))),
        None => Ok(config),
    }
}

impl ProbeConfig {
    /// Why this section cannot work, as (key under `jobs.isolation_probe`, message).
    pub fn problem(&self) -> Option<(String, String)> {
        self.credentials.iter().enumerate().find_map(|(i, c)| {
            c.problem()
                .map(|(k, m)| (format!("credentials[{i}].{k}"), m))
        })
    }
}

impl ProbeCredential {
    fn problem(&self) -> Option<(&'static str, String)> {
        if self.environment.trim().is_empty() {
            return Some(("environment", "must name an environment".into()));
        }
        let from_env =
            self.url_var.is_some() || self.user_var.is_some() || self.password_var.is_some();
        match (&self.env_file, &self.user) {
            (Some(_), Some(_)) => Some((
                "user",
                "give either `env_file` or `user` (with `password_file`), not both".into(),
            )),
            (None, None) => Some((
                "env_file",
                "give `env_file` (an app's .env) or `user` with `password_file`".into(),
            )),
            (Some(path), None) if !path.is_absolute() => Some((
                "env_file",
                format!("{} must be an absolute path", path.display()),
            )),
            (Some(_), None) if self.password_file.is_some() => Some((
                "password_file",
                "with `env_file` the password comes from the file (`password_var`)".into(),
            )),
            (Some(_), None) if self.user_var.is_some() != self.password_var.is_some() => Some((
                "user_var",
                "`user_var` and `password_var` go together".into(),
            )),
            (Some(_), None) if self.url_var.is_some() && self.user_var.is_some() => Some((
                "url_var",
                "give `url_var` or `user_var`/`password_var`, not both".into(),
            )),
            (None, Some(_)) if from_env => Some((
                "user",
                "`url_var`, `user_var` and `password_var` need `env_file`".into(),
            )),
            (None, Some(_)) if self.password_file.is_none() => {
                Some(("password_file", "`user` needs `password_file`".into()))
            }
            (None, Some(user)) if user.trim().is_empty() => {
                Some(("user", "must not be empty".into()))
            }
            _ => self
                .sslmode
                .as_deref()
                .filter(|m| {
                    !matches!(
                        *m,
                        "disable" | "allow" | "prefer" | "require" | "verify-ca" | "verify-full"
                    )
                })
                .map(|m| {
                    (
                        "sslmode",
                        format!(
                            "{m:?} is not one of disable, allow, prefer, require, verify-ca, \
                             verify-full"
                        ),
                    )
                }),
        }
    }

    /// How results name this credential when it could not be read: its user, or its file.
    fn label(&self) -> String {
        match (&self.user, &self.env_file) {
            (Some(user), _) => user.clone(),
            (None, Some(path)) => format!("env_file:{}", path.display()),
            (None, None) => String::new(),
        }
    }

    /// The connection string (with the password) this credential logs in with, its user, and
    /// the password in every form a message could show it (to register them as secrets).
    fn resolve(&self) -> Result<(String, String, Vec<String>), String> {
        let Some(path) = &self.env_file else {
            let user = self.user.clone().unwrap_or_default();
            let password = match &self.password_file {
                Some(p) => read_small(p, "password_file")?.trim().to_string(),
                None => String::new(),
            };
            let dsn = key_value_dsn(&user, &password, self.sslmode.as_deref());
            return Ok((dsn, user, vec![password]));
        };
        let text = read_small(path, "env_file")?;
        let var = |name: &str| {
            dotenv_value(&text, name)
                .ok_or_else(|| format!("env_file {}: no variable {name}", path.display()))
        };
        if let (Some(user_var), Some(password_var)) = (&self.user_var, &self.password_var) {
            let user = var(user_var)?;
            let password = var(password_var)?;
            let dsn = key_value_dsn(&user, &password, self.sslmode.as_deref());
            return Ok((dsn, user, vec![password]));
        }
        let name = self.url_var.as_deref().unwrap_or(DEFAULT_URL_VAR);
        let url = var(name)?;
        let user = url_user(&url).ok_or_else(|| {
            format!(
                "env_file {}: {name} is not a postgres:// URL with a user",
                path.display()
            )
        })?;
        let secrets = url_password(&url)
            .map(|raw| vec![sentinel_postgres::percent_decode(&raw), raw])
            .unwrap_or_default();
        Ok((url, user, secrets))
    }
}

fn read_small(path: &Path, what: &str) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE).read_to_string(&mut text))
        .map_err(|e| format!("reading {what} {}: {e}", path.display()))?;
    Ok(text)
}

/// The value of `key` in a dotenv text: `KEY=value`, `export KEY=value`, quoted or not, the
/// last assignment winning as in a shell.
fn dotenv_value(text: &str, key: &str) -> Option<String> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, raw)) = line.split_once('=') else {
            continue;
        };
        if k.trim() != key {
            continue;
        }
        let raw = raw.trim();
        let value = ['"', '\'']
            .into_iter()
            .find(|q| raw.len() >= 2 && raw.starts_with(*q) && raw.ends_with(*q))
            .map(|_| &raw[1..raw.len() - 1])
            .unwrap_or_else(|| raw.split_once(" #").map_or(raw, |(v, _)| v.trim()));
        found = Some(value.to_string());
    }
    found
}

/// A libpq key-value connection string; values are quoted so that any character works.
fn key_value_dsn(user: &str, password: &str, sslmode: Option<&str>) -> String {
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut dsn = format!("user={}", quote(user));
    if !password.is_empty() {
        dsn.push_str(&format!(" password={}", quote(password)));
    }
    if let Some(mode) = sslmode {
        dsn.push_str(&format!(" sslmode={mode}"));
    }
    dsn
}

/// The password of a `postgres://user:password@...` URL, as written (percent-encoded).
fn url_password(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))?;
    let userinfo = &rest[..rest.rfind('@')?];
    userinfo
        .split_once(':')
        .map(|(_, p)| p.to_string())
        .filter(|p| !p.is_empty())
}

/// The user of a `postgres://user[:password]@...` URL, percent-decoded.
fn url_user(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))?;
    let userinfo = &rest[..rest.rfind('@')?];
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let config: tokio_postgres::Config = format!("postgres://{user}@x").parse().ok()?;
    config.get_user().map(str::to_string)
}

/// Runs a probe job: every credential against every target of another environment.
pub async fn run_probe(
    params: &IsolationProbeParams,
    config: &ProbeConfig,
    events: &JobEvents,
) -> super::backup::Outcome {
    let started = std::time::Instant::now();
    if config.credentials.is_empty() {
        return (
            Err(JobError::Failed(
                "this host holds no credentials to probe with \
                 ([[jobs.isolation_probe.credentials]] is empty)"
                    .into(),
            )),
            Some(job_finished::Result::IsolationProbe(ProbeReport::default())),
        );
    }
    let timeout = match params.connect_timeout_ms {
        0 => DEFAULT_CONNECT_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let mut attempts = Vec::new();
    let mut plans = Vec::new();
    for credential in &config.credentials {
        let others: Vec<&ProbeTarget> = params
            .targets
            .iter()
            .filter(|t| t.environment != credential.environment)
            .collect();
        match credential.resolve() {
            Ok((dsn, user, secrets)) => {
                for secret in secrets.iter().filter(|s| !s.is_empty()) {
                    events.add_secret(secret);
                }
                for target in others {
                    plans.push(Plan {
                        environment: credential.environment.clone(),
                        dsn: dsn.clone(),
                        user: user.clone(),
                        target: target.clone(),
                    });
                }
            }
            Err(why) => {
                events.log("stderr", &why);
                attempts.extend(others.into_iter().map(|t| ProbeAttempt {
                    user: credential.label(),
                    user_environment: credential.environment.clone(),
                    database: t.database.clone(),
                    database_environment: t.environment.clone(),
                    connected: false,
                    message: format!("not probed: {why}"),
                    probed: false,
                }));
            }
        }
    }
    // Owned plans: a stream of futures borrowing from here would not be `Send` for tokio.
    let tried: Vec<ProbeAttempt> = futures::stream::iter(plans)
        .map(|plan| attempt(plan, timeout))
        .buffered(PARALLEL_ATTEMPTS)
        .collect()
        .await;
    attempts.extend(tried);
    for a in &attempts {
        let line = format!(
            "{} ({}) -> {} ({}): {}",
            a.user,
            a.user_environment,
            a.database,
            a.database_environment,
            if a.connected {
                "CONNECTED (violation)".to_string()
            } else {
                a.message.clone()
            }
        );
        events.log(if a.connected { "stderr" } else { "stdout" }, &line);
    }
    let connected = attempts.iter().filter(|a| a.connected).count();
    let unprobed = attempts.iter().filter(|a| !a.probed).count();
    let summary = format!(
        "{} attempts: {connected} connected (violations), {} refused, {unprobed} not made",
        attempts.len(),
        attempts.len() - connected - unprobed
    );
    events.step("probe", StepStatus::Succeeded, &summary, started.elapsed());
    (
        Ok(summary),
        Some(job_finished::Result::IsolationProbe(ProbeReport {
            attempts,
        })),
    )
}

/// One connection attempt to make.
struct Plan {
    environment: String,
    dsn: String,
    user: String,
    target: ProbeTarget,
}

async fn attempt(plan: Plan, timeout: Duration) -> ProbeAttempt {
    let Plan {
        environment,
        dsn,
        user,
        target,
    } = plan;
    let mut result = ProbeAttempt {
        user,
        user_environment: environment,
        database: target.database.clone(),
        database_environment: target.environment.clone(),
        connected: false,
        message: String::new(),
        probed: true,
    };
    let Ok(port) = u16::try_from(target.port) else {
        result.probed = false;
        result.message = format!("not probed: port {} is out of range", target.port);
        return result;
    };
    let client = PgClientConfig {
        dsn: Some(dsn),
        connect_timeout: timeout,
        ..Default::default()
    };
    let redirect = Redirect {
        host: &target.host,
        port: if port == 0 { 5432 } else { port },
        dbname: &target.database,
    };
    match connect_to(&client, "sentinel-isolation-probe", Some(redirect)).await {
        Ok(_connection) => {
            result.connected = true;
            result.message = format!(
                "connected as {} to {} at {}:{}",
                result.user, target.database, redirect.host, redirect.port
            );
        }
        Err(e) => {
            result.message = e.to_string();
            // PostgreSQL says "no encryption" when only a `hostssl` line would let this login
            // in: the app, connecting over TLS, may well get in. Not evidence of isolation.
            if result.message.contains("no encryption") {
                result.probed = false;
                result.message = format!(
                    "not probed over TLS: {}; the server accepts this login only encrypted, so \
                     set sslmode = \"require\" (or verify-full) on the credential",
                    result.message
                );
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential() -> ProbeCredential {
        ProbeCredential {
            environment: "staging".into(),
            env_file: Some("/srv/apps/shop/.env".into()),
            url_var: None,
            user_var: None,
            password_var: None,
            user: None,
            password_file: None,
            sslmode: None,
        }
    }

    #[test]
    fn dotenv_values_are_found_in_every_usual_form() {
        let text = "# comment\nDATABASE_URL=postgres://a:b@h/db\nexport PGUSER=\"shop user\"\n\
                    OTHER=x # note\nOTHER=y\n";
        assert_eq!(
            dotenv_value(text, "DATABASE_URL").as_deref(),
            Some("postgres://a:b@h/db")
        );
        assert_eq!(dotenv_value(text, "PGUSER").as_deref(), Some("shop user"));
        assert_eq!(dotenv_value(text, "OTHER").as_deref(), Some("y"));
        assert_eq!(dotenv_value(text, "MISSING"), None);
    }

    #[test]
    fn url_users_are_decoded_and_passwords_quoted() {
        assert_eq!(
            url_user("postgres://shop%5Fuser:p%40ss@db:5432/shop").as_deref(),
            Some("shop_user")
        );
        assert_eq!(url_user("mysql://x@y/z"), None);
        assert_eq!(
            url_password("postgres://u:p%40ss@db/x").as_deref(),
            Some("p%40ss")
        );
        assert_eq!(url_password("postgres://u@db/x"), None);
        let dsn = key_value_dsn("u", "it's \\ odd", Some("require"));
        let parsed: tokio_postgres::Config = dsn.parse().unwrap();
        assert_eq!(parsed.get_password(), Some("it's \\ odd".as_bytes()));
    }

    #[test]
    fn the_example_in_the_shipped_agent_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config/agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let start = text
            .find("# [[jobs.isolation_probe.credentials]]")
            .expect("an isolation_probe example");
        let example: String = text[start..]
            .lines()
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .map(|l| l.replace("[[jobs.isolation_probe.credentials]]", "[[credentials]]"))
            .collect::<Vec<_>>()
            .join("\n");
        let parsed: ProbeConfig =
            toml::from_str(&example).unwrap_or_else(|e| panic!("{e}\n{example}"));
        assert_eq!(parsed.credentials.len(), 2);
        assert_eq!(parsed.problem(), None);
    }

    #[test]
    fn bad_credentials_name_their_key() {
        assert!(credential().problem().is_none());
        let mut c = credential();
        c.user = Some("x".into());
        assert_eq!(c.problem().unwrap().0, "user");
        let mut c = credential();
        c.env_file = None;
        assert_eq!(c.problem().unwrap().0, "env_file");
        c.user = Some("x".into());
        assert_eq!(c.problem().unwrap().0, "password_file");
        let mut c = credential();
        c.user_var = Some("U".into());
        assert_eq!(c.problem().unwrap().0, "user_var");
        let mut c = credential();
        c.env_file = Some("relative/.env".into());
        assert!(c.problem().unwrap().1.contains("absolute"));
        let mut c = credential();
        c.sslmode = Some("sometimes".into());
        assert_eq!(c.problem().unwrap().0, "sslmode");
        let config = ProbeConfig {
            credentials: vec![
                credential(),
                ProbeCredential {
                    environment: " ".into(),
                    ..credential()
                },
            ],
        };
        assert_eq!(config.problem().unwrap().0, "credentials[1].environment");
    }
}
