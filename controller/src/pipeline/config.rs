//! The deploy pipeline's part of the controller config: apps, their environments, health and
//! E2E checks, the pre-production backup hook and the report webhooks.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sentinel_daemon::config::ConfigError;
use serde::Deserialize;

/// `[pipeline]` and `[[apps]]` of the controller config.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Runs before production when a deploy has `db_change` (e.g. a pg_dump wrapper). Its
    /// arguments may use `{app}`, `{commit}` and `{deploy_id}`. Empty: the step says it was
    /// skipped because no hook is configured.
    #[serde(default)]
    pub backup_hook: Vec<String>,
    /// How long the backup hook may run.
    #[serde(default = "defaults::hook_timeout", with = "humantime_serde")]
    pub backup_hook_timeout: Duration,
    /// Where deploy reports are POSTed as JSON (the relay API: PM, requesting agent).
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
    /// Deliveries per webhook before giving up (with backoff in between).
    #[serde(default = "defaults::webhook_attempts")]
    pub webhook_attempts: u32,
}

/// One report receiver.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// A name for logs and the deploy history.
    pub name: String,
    /// An http:// or https:// URL (https checked against the system's trusted roots).
    pub url: String,
}

/// One app: where its source is and where each environment runs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The app's name, as deploy requests give it.
    pub name: String,
    /// A git repository the controller can read (a path or anything `git -C` accepts).
    pub repo: PathBuf,
    /// Compose file, relative to the repository root.
    #[serde(default = "defaults::compose_file")]
    pub compose_file: String,
    /// Releases each host keeps for rollbacks.
    #[serde(default = "defaults::keep_releases")]
    pub keep_releases: u32,
    /// The compose service that runs migrations (`sh -c <migration>`).
    #[serde(default)]
    pub migration_service: String,
    /// Staging: deployed first, E2E-checked.
    pub staging: EnvironmentConfig,
    /// Production: deployed only after staging passed.
    pub production: EnvironmentConfig,
    /// HTTP checks run against each environment's `base_url` after its deploy.
    #[serde(default)]
    pub e2e: Vec<E2eCheck>,
}

/// Where one environment of an app runs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentConfig {
    /// The host (its agent's name).
    pub host: String,
    /// The app's directory on that host.
    pub app_dir: PathBuf,
    /// The environment's secrets, shipped as the release's `.env` (mode 0600 on the host).
    #[serde(default)]
    pub secrets_file: Option<PathBuf>,
    /// Keys of the secrets file whose values are settings (a port, a host name): shown as
    /// they are in events, details, reports and the host's audit log. Every other value of
    /// the file is masked as `***` there.
    #[serde(default)]
    pub not_secret: Vec<String>,
    /// Where E2E checks send their requests, e.g. `http://hub-alfa.internal:3100`.
    #[serde(default)]
    pub base_url: String,
    /// The agent's health check after `up`. On a blue/green environment its `url` names the
    /// slot's port as `{port}` (each slot is checked directly before the switch).
    #[serde(default)]
    pub health: HealthConfig,
    /// How a deploy replaces the running release.
    #[serde(default)]
    pub strategy: Strategy,
    /// `[apps.<env>.blue_green]`: the slots and the proxy; required by `strategy = "blue_green"`.
    #[serde(default)]
    pub blue_green: Option<BlueGreenConfig>,
}

/// How a deploy replaces the running release of an environment.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// `build`, `down`, `up` in one Compose project: the app is away during `down` + `up` + boot.
    #[default]
    Recreate,
    /// Two slots behind the host's nginx: the new release starts beside the old one, and the
    /// proxy switches once it is healthy.
    BlueGreen,
}

/// `[apps.<env>.blue_green]`: the two slots and how the agent switches the host's proxy.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BlueGreenConfig {
    /// Slot blue's port, then slot green's; compose sees the slot's as `SENTINEL_PORT`.
    pub ports: [u16; 2],
    /// Absolute path of the file the agent writes `server 127.0.0.1:PORT;` into; nginx
    /// `include`s it in an `upstream` block.
    pub upstream_file: PathBuf,
    /// How the host's nginx is reloaded, e.g. `["nginx", "-s", "reload"]`.
    pub reload: Vec<String>,
    /// How its config is checked before the reload; empty: the reload's program with `-t`.
    #[serde(default)]
    pub test: Vec<String>,
    /// Health as the public sees it, probed after the switch; empty: no such probe.
    #[serde(default)]
    pub through_proxy_url: String,
    /// How long the old slot keeps serving in-flight requests after the switch.
    #[serde(default = "defaults::drain", with = "humantime_serde")]
    pub drain: Duration,
    /// Stop the old slot rather than remove it, so a rollback restarts it without a rebuild.
    #[serde(default = "defaults::yes")]
    pub keep_previous: bool,
}

impl BlueGreenConfig {
    /// The command that checks the proxy's config: `test`, else the reload's program with `-t`.
    pub fn test_command(&self) -> Vec<String> {
        if !self.test.is_empty() {
            return self.test.clone();
        }
        self.reload
            .first()
            .map(|program| vec![program.clone(), "-t".to_string()])
            .unwrap_or_default()
    }
}

/// The health check an agent runs after `up`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// http:// or https:// URL probed from the host; empty: no HTTP probe.
    #[serde(default)]
    pub url: String,
    /// Expected status.
    #[serde(default = "defaults::status_ok")]
    pub expect_status: u16,
    /// Between probes.
    #[serde(default = "defaults::probe_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Per probe.
    #[serde(default = "defaults::probe_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Overall.
    #[serde(default = "defaults::health_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// Also wait for the containers' own health checks.
    #[serde(default)]
    pub container_health: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            expect_status: defaults::status_ok(),
            interval: defaults::probe_interval(),
            timeout: defaults::probe_timeout(),
            deadline: defaults::health_deadline(),
            container_health: false,
        }
    }
}

/// One E2E check: `GET base_url + path` answers `expect_status` and contains `expect_body`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct E2eCheck {
    /// Shown in the deploy's steps.
    pub name: String,
    /// Path (and query) under the environment's base URL.
    pub path: String,
    /// Expected status.
    #[serde(default = "defaults::status_ok")]
    pub expect_status: u16,
    /// Text the body must contain; empty: anything.
    #[serde(default)]
    pub expect_body: String,
    /// Part of the smoke subset (run on production and for smoke deploys); standard runs all.
    #[serde(default)]
    pub smoke: bool,
    /// Per request.
    #[serde(default = "defaults::probe_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

mod defaults {
    use std::time::Duration;

    pub fn hook_timeout() -> Duration {
        Duration::from_secs(1800)
    }
    pub fn webhook_attempts() -> u32 {
        5
    }
    pub fn compose_file() -> String {
        "docker-compose.yml".into()
    }
    pub fn keep_releases() -> u32 {
        5
    }
    pub fn status_ok() -> u16 {
        200
    }
    pub fn probe_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn probe_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_deadline() -> Duration {
        Duration::from_secs(60)
    }
    pub fn drain() -> Duration {
        Duration::from_secs(10)
    }
    pub fn yes() -> bool {
        true
    }
}

/// Checks the apps: unique names, usable paths and URLs, sane counts. Errors name the key as
/// `apps[i].field` so the operator finds it.
pub fn validate(
    path: &Path,
    pipeline: &PipelineConfig,
    apps: &[AppConfig],
) -> Result<(), ConfigError> {
    let invalid = |key: String, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        message,
    };
    for (i, hook) in pipeline.webhooks.iter().enumerate() {
        if !is_http_url(&hook.url) {
            return Err(invalid(
                format!("pipeline.webhooks[{i}].url"),
                format!("{:?} must be an http:// or https:// URL", hook.url),
            ));
        }
    }
    let mut names = HashSet::new();
    for (i, app) in apps.iter().enumerate() {
        let key = |field: &str| format!("apps[{i}].{field}");
        if app.name.is_empty()
            || !app
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                key("name"),
                format!("{:?} must be [A-Za-z0-9_-]+", app.name),
            ));
        }
        if !names.insert(app.name.clone()) {
            return Err(invalid(
                key("name"),
                format!("app {:?} is declared twice", app.name),
            ));
        }
        if app.keep_releases < 2 {
            return Err(invalid(
                key("keep_releases"),
                "must be at least 2 (current and previous)".into(),
            ));
        }
        if app.compose_file.starts_with('/') || app.compose_file.split('/').any(|c| c == "..") {
            return Err(invalid(
                key("compose_file"),
                "must be relative to the repository, without `..`".into(),
            ));
        }
        for (env_name, env) in [("staging", &app.staging), ("production", &app.production)] {
            let key = |field: &str| format!("apps[{i}].{env_name}.{field}");
            if env.host.is_empty() {
                return Err(invalid(key("host"), "must name the host's agent".into()));
            }
            if !env.app_dir.is_absolute() {
                return Err(invalid(
                    key("app_dir"),
                    format!("{} must be absolute", env.app_dir.display()),
                ));
            }
            if let Err(message) = check_not_secret(env) {
                return Err(invalid(key("not_secret"), message));
            }
            if !env.health.url.is_empty() && !is_http_url(&env.health.url) {
                return Err(invalid(
                    key("health.url"),
                    format!("{:?} must be an http:// or https:// URL", env.health.url),
                ));
            }
            if !app.e2e.is_empty() && !is_http_url(&env.base_url) {
                return Err(invalid(
                    key("base_url"),
                    "E2E checks need an http:// or https:// base_url".into(),
                ));
            }
            validate_strategy(env, env_name)
                .map_err(|(field, message)| invalid(key(field), message))?;
        }
        if app.staging.host == app.production.host && app.staging.app_dir == app.production.app_dir
        {
            return Err(invalid(
                key("production.app_dir"),
                "staging and production share host and app_dir".into(),
            ));
        }
        for (j, check) in app.e2e.iter().enumerate() {
            if !check.path.starts_with('/') {
                return Err(invalid(
                    format!("apps[{i}].e2e[{j}].path"),
                    format!("{:?} must start with /", check.path),
                ));
            }
        }
    }
    Ok(())
}

/// Parts of a key name that say its value is a secret: such a key cannot be `not_secret`.
const SECRET_WORDS: [&str; 11] = [
    "PASSWORD",
    "PASSWD",
    "PASS",
    "PWD",
    "SECRET",
    "TOKEN",
    "KEY",
    "APIKEY",
    "PRIVATE",
    "CREDENTIALS",
    "DSN",
];

/// An environment's `not_secret` list: env-file key names, each once, none whose name says
/// it is a secret (`DB_PASSWORD`, `API_KEY`), and only with a secrets file to refer to.
fn check_not_secret(env: &EnvironmentConfig) -> Result<(), String> {
    if !env.not_secret.is_empty() && env.secrets_file.is_none() {
        return Err("names keys of secrets_file, and there is no secrets_file".into());
    }
    let mut seen = HashSet::new();
    for key in &env.not_secret {
        let valid = key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(format!(
                "{key:?} is not an env file key ([A-Za-z_][A-Za-z0-9_]*)"
            ));
        }
        if !seen.insert(key.as_str()) {
            return Err(format!("{key:?} is listed twice"));
        }
        let upper = key.to_ascii_uppercase();
        if let Some(word) = upper.split('_').find(|part| SECRET_WORDS.contains(part)) {
            return Err(format!(
                "{key:?} names a secret ({word}); its value stays masked"
            ));
        }
    }
    Ok(())
}

/// The strategy of one environment and its `blue_green` table agree and the table is usable;
/// the error is the field (below the environment) and why.
fn validate_strategy(
    env: &EnvironmentConfig,
    env_name: &str,
) -> Result<(), (&'static str, String)> {
    let has_port = env.health.url.contains("{port}");
    let bg = match (env.strategy, &env.blue_green) {
        (Strategy::Recreate, None) if has_port => return Err((
            "health.url",
            "{port} names a blue/green slot's port; this environment uses strategy = \"recreate\""
                .into(),
        )),
        (Strategy::Recreate, None) => return Ok(()),
        (Strategy::Recreate, Some(_)) => {
            return Err((
                "blue_green",
                "is only used with strategy = \"blue_green\" (the strategy is \"recreate\")".into(),
            ))
        }
        (Strategy::BlueGreen, None) => {
            return Err((
                "blue_green",
                format!("strategy = \"blue_green\" needs an [apps.{env_name}.blue_green] table"),
            ))
        }
        (Strategy::BlueGreen, Some(bg)) => bg,
    };
    if bg.ports.contains(&0) {
        return Err((
            "blue_green.ports",
            format!("{:?}: ports must not be 0", bg.ports),
        ));
    }
    if bg.ports[0] == bg.ports[1] {
        return Err((
            "blue_green.ports",
            format!("{:?}: blue and green need two different ports", bg.ports),
        ));
    }
    let file = &bg.upstream_file;
    let clean = file.components().all(|c| {
        matches!(
            c,
            std::path::Component::RootDir | std::path::Component::Normal(_)
        )
    });
    if !file.is_absolute() || !clean || file.file_name().is_none() {
        return Err((
            "blue_green.upstream_file",
            format!(
                "{} must be an absolute file path without `..`",
                file.display()
            ),
        ));
    }
    for (field, argv) in [
        ("blue_green.reload", &bg.reload),
        ("blue_green.test", &bg.test),
    ] {
        if field == "blue_green.reload" && argv.is_empty() {
            return Err((
                field,
                "must name the command that reloads nginx, e.g. [\"nginx\", \"-s\", \"reload\"]"
                    .into(),
            ));
        }
        if argv
            .first()
            .is_some_and(|program| program.trim().is_empty())
        {
            return Err((
                field,
                format!("{argv:?}: the program (first word) is empty"),
            ));
        }
    }
    if !bg.through_proxy_url.is_empty() && !is_http_url(&bg.through_proxy_url) {
        return Err((
            "blue_green.through_proxy_url",
            format!(
                "{:?} must be an http:// or https:// URL",
                bg.through_proxy_url
            ),
        ));
    }
    if !env.health.url.is_empty() && !has_port {
        return Err((
            "health.url",
            format!(
                "{:?}: a blue/green environment checks each slot directly; put {{port}} where the slot's port goes (e.g. http://127.0.0.1:{{port}}/health)",
                env.health.url
            ),
        ));
    }
    Ok(())
}

/// Whether `url` is one the HTTP client takes (`sentinel_daemon::http`).
fn is_http_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apps(not_secret: &str, secrets_file: bool) -> Vec<AppConfig> {
        let secrets = if secrets_file {
            "secrets_file = \"/etc/sentinel/web.env\"\n"
        } else {
            ""
        };
        let text = format!(
            "[[apps]]\nname = \"web\"\nrepo = \"/repo\"\n[apps.staging]\nhost = \"stage-1\"\napp_dir = \"/srv/web\"\n{secrets}not_secret = {not_secret}\n[apps.production]\nhost = \"prod-1\"\napp_dir = \"/srv/web\"\n"
        );
        #[derive(Deserialize)]
        struct File {
            apps: Vec<AppConfig>,
        }
        toml::from_str::<File>(&text).expect("parses").apps
    }

    fn check_listed(not_secret: &str, secrets_file: bool) -> Result<(), String> {
        validate(
            Path::new("/etc/sentinel/sentinel.toml"),
            &PipelineConfig::default(),
            &apps(not_secret, secrets_file),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn not_secret_names_settings_of_the_secrets_file_only() {
        check_listed("[\"PORT\", \"PUBLIC_HOST\"]", true).expect("settings");
        check_listed("[]", false).expect("nothing listed, no file needed");
        for (list, file, says) in [
            ("[\"DB_PASSWORD\"]", true, "names a secret (PASSWORD)"),
            ("[\"stripe_api_key\"]", true, "names a secret (KEY)"),
            ("[\"DATABASE_DSN\"]", true, "names a secret (DSN)"),
            ("[\"PORT\", \"PORT\"]", true, "listed twice"),
            ("[\"PORT=80\"]", true, "is not an env file key"),
            ("[\"\"]", true, "is not an env file key"),
            ("[\"1PORT\"]", true, "is not an env file key"),
            ("[\"PORT\"]", false, "there is no secrets_file"),
        ] {
            let err = check_listed(list, file).expect_err(list);
            assert!(
                err.contains("apps[0].staging.not_secret") && err.contains(says),
                "{list}: {err}"
            );
        }
    }

    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        pipeline: PipelineConfig,
        apps: Vec<AppConfig>,
    }

    const APP: &str = r#"
[[apps]]
name = "pulse"
repo = "/srv/git/pulse"
[apps.staging]
host = "hub"
app_dir = "/srv/apps/pulse-staging"
[apps.production]
host = "prod"
app_dir = "/srv/apps/pulse"
strategy = "blue_green"
health = { url = "http://127.0.0.1:{port}/health" }
[apps.production.blue_green]
ports = [8101, 8102]
upstream_file = "/etc/nginx/sentinel/pulse.conf"
reload = ["nginx", "-s", "reload"]
through_proxy_url = "http://127.0.0.1/health"
drain = "2s"
"#;

    fn check(text: &str) -> Result<Vec<AppConfig>, String> {
        let path = Path::new("controller.toml");
        let file: File =
            sentinel_daemon::config::parse_toml(path, text).map_err(|e| e.to_string())?;
        validate(path, &file.pipeline, &file.apps).map_err(|e| e.to_string())?;
        Ok(file.apps)
    }

    #[test]
    fn a_blue_green_environment_parses_with_its_defaults() {
        let apps = check(APP).expect("valid");
        assert_eq!(apps[0].staging.strategy, Strategy::Recreate);
        assert_eq!(apps[0].staging.blue_green, None);
        let bg = apps[0].production.blue_green.as_ref().expect("table");
        assert_eq!(apps[0].production.strategy, Strategy::BlueGreen);
        assert_eq!(bg.ports, [8101, 8102]);
        assert_eq!(bg.drain, Duration::from_secs(2));
        assert!(bg.keep_previous);
        assert_eq!(bg.test_command(), ["nginx", "-t"]);
    }

    #[test]
    fn bad_blue_green_settings_name_their_key() {
        let cases = [
            (
                APP.replace("[8101, 8102]", "[8101, 8101]"),
                "apps[0].production.blue_green.ports",
                "two different ports",
            ),
            (
                APP.replace("[8101, 8102]", "[0, 8102]"),
                "apps[0].production.blue_green.ports",
                "must not be 0",
            ),
            (
                APP.replace(
                    "\"/etc/nginx/sentinel/pulse.conf\"",
                    "\"sentinel/pulse.conf\"",
                ),
                "apps[0].production.blue_green.upstream_file",
                "absolute",
            ),
            (
                APP.replace(
                    "\"/etc/nginx/sentinel/pulse.conf\"",
                    "\"/etc/nginx/../pulse.conf\"",
                ),
                "apps[0].production.blue_green.upstream_file",
                "without `..`",
            ),
            (
                APP.replace("[\"nginx\", \"-s\", \"reload\"]", "[]"),
                "apps[0].production.blue_green.reload",
                "must name the command",
            ),
            (
                APP.replace("[\"nginx\", \"-s\", \"reload\"]", "[\" \", \"-s\"]"),
                "apps[0].production.blue_green.reload",
                "program (first word) is empty",
            ),
            (
                APP.replace("\"http://127.0.0.1/health\"", "\"127.0.0.1/health\""),
                "apps[0].production.blue_green.through_proxy_url",
                "http://",
            ),
            (
                APP.replace(":{port}/health", ":8101/health"),
                "apps[0].production.health.url",
                "put {port}",
            ),
            (
                APP.replace("strategy = \"blue_green\"", ""),
                "apps[0].production.blue_green",
                "only used with strategy",
            ),
        ];
        for (text, key, why) in cases {
            let e = check(&text).expect_err(key);
            assert!(e.contains(key) && e.contains(why), "{key}: {e}");
        }
        let no_table = APP
            .split("[apps.production.blue_green]")
            .next()
            .unwrap_or_default()
            .to_string();
        let e = check(&no_table).expect_err("no table");
        assert!(
            e.contains("apps[0].production.blue_green")
                && e.contains("needs an [apps.production.blue_green] table"),
            "{e}"
        );
        let e = check(&APP.replace("\"blue_green\"\nhealth", "\"blue-green\"\nhealth"))
            .expect_err("word");
        assert!(
            e.contains("controller.toml:") && e.contains("blue-green") && e.contains("recreate"),
            "{e}"
        );
        let e = check(&APP.replace("drain = \"2s\"", "drain = \"2s\"\nports_typo = 1"))
            .expect_err("unknown key");
        assert!(e.contains("ports_typo"), "{e}");
    }
}
