//! The Redis collector: for every configured instance, whether it answers and what `INFO`
//! says: version, role, memory, clients, persistence, and keys per database.
//!
//! Each collection connects afresh, sends one `INFO` and hangs up: at report intervals of
//! seconds a kept connection saves nothing worth a client slot, and a fresh one proves that
//! the instance accepts connections (and our credentials) right now. Instances are read
//! concurrently, each within [`INSTANCE_TIMEOUT`], so a hung Redis never stalls the report
//! loop. A failing instance is that instance's `error` (with `reachable = false`); the section
//! itself never fails. Passwords never reach the report, an error or a log line.

use std::path::Path;
use std::time::Duration;

use futures::future::join_all;
use sentinel_proto::v1::{RedisInstance, RedisState};

use crate::config::RedisInstanceConfig;

/// How long the TCP (and TLS) connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long each reply (the handshake's and `INFO`'s) may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The bound on one instance's whole collection (name resolution, connect, handshake,
/// `INFO`), whatever the steps above leave uncovered.
const INSTANCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the configured Redis instances.
pub struct RedisCollector {
    instances: Vec<RedisInstanceConfig>,
}

impl RedisCollector {
    /// A collector for `instances`. Does no I/O: problems show up per instance at collection.
    pub fn new(instances: &[RedisInstanceConfig]) -> Self {
        Self {
            instances: instances.to_vec(),
        }
    }

    /// Reads every instance, concurrently; one entry per instance, in config order.
    pub async fn collect(&self) -> RedisState {
        RedisState {
            instances: join_all(self.instances.iter().map(read_instance)).await,
        }
    }
}

/// One instance's entry: its `INFO`, or why it could not be read.
async fn read_instance(config: &RedisInstanceConfig) -> RedisInstance {
    let mut out = RedisInstance {
        name: config.name.clone(),
        address: config.redacted_url(),
        ..RedisInstance::default()
    };
    let secrets = match Secrets::of(config).await {
        Ok(secrets) => secrets,
        Err(message) => {
            out.error = message;
            return out;
        }
    };
    let info = match connection_info(config, &secrets) {
        Ok(info) => info,
        Err(message) => {
            out.error = secrets.redact(&message);
            return out;
        }
    };
    out.address = address(&info).unwrap_or(out.address);
    let result = match tokio::time::timeout(INSTANCE_TIMEOUT, query_info(config, info)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {INSTANCE_TIMEOUT:?}")),
    };
    match result {
        Ok(text) => {
            out.reachable = true;
            apply_info(&text, &mut out);
        }
        Err(message) => {
            out.error = secrets.redact(&format!("{}: {message}", out.address));
            tracing::debug!(instance = %config.name, error = %out.error, "redis collection failed");
        }
    }
    out
}

/// The passwords in play, kept to scrub them out of any message.
struct Secrets {
    /// From `password` or `password_file`.
    password: Option<String>,
    /// Every secret string to scrub, the URL's password (raw and percent-decoded) included.
    scrub: Vec<String>,
}

impl Secrets {
    async fn of(config: &RedisInstanceConfig) -> Result<Self, String> {
        let password = match (&config.password, &config.password_file) {
            (Some(password), _) => Some(password.clone()),
            (None, Some(path)) => Some(read_password_file(path).await?),
            (None, None) => None,
        };
        let mut scrub: Vec<String> = password.iter().cloned().collect();
        if let Ok(info) = ::redis::IntoConnectionInfo::into_connection_info(config.url.as_str()) {
            scrub.extend(info.redis_settings().password().map(str::to_string));
        }
        if let Some((_, rest)) = config.url.split_once("://") {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            if let Some((user_info, _)) = authority.rsplit_once('@') {
                scrub.extend(user_info.split_once(':').map(|(_, p)| p.to_string()));
            }
        }
        scrub.retain(|s| !s.is_empty());
        Ok(Self { password, scrub })
    }

    fn redact(&self, message: &str) -> String {
        self.scrub.iter().fold(message.to_string(), |m, secret| {
            m.replace(secret, "<redacted>")
        })
    }
}

/// The password in a `*_FILE`-style file, without its trailing newline.
async fn read_password_file(path: &Path) -> Result<String, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("cannot read password_file {}: {e}", path.display()))?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(format!("password_file {} is empty", path.display()));
    }
    Ok(password.to_string())
}

/// The URL with the configured user name and password applied.
fn connection_info(
    config: &RedisInstanceConfig,
    secrets: &Secrets,
) -> Result<::redis::ConnectionInfo, String> {
    use ::redis::IntoConnectionInfo;

    let info = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(|_| format!("{} is not a Redis URL", config.redacted_url()))?;
    let mut settings = info.redis_settings().clone();
    if let Some(username) = &config.username {
        settings = settings.set_username(username);
    }
    if let Some(password) = &secrets.password {
        settings = settings.set_password(password);
    }
    Ok(info.set_redis_settings(settings))
}

/// Where the instance is, as reported: scheme, host, port and database, never credentials.
fn address(info: &::redis::ConnectionInfo) -> Option<String> {
    let db = info.redis_settings().db();
    match info.addr() {
        ::redis::ConnectionAddr::Tcp(host, port) => Some(format!("redis://{host}:{port}/{db}")),
        ::redis::ConnectionAddr::TcpTls { host, port, .. } => {
            Some(format!("rediss://{host}:{port}/{db}"))
        }
        ::redis::ConnectionAddr::Unix(path) if db == 0 => {
            Some(format!("unix://{}", path.display()))
        }
        ::redis::ConnectionAddr::Unix(path) => Some(format!("unix://{}?db={db}", path.display())),
        _ => None,
    }
}

/// Connects and sends `INFO` (its default sections include memory, persistence, replication
/// and keyspace: one round trip, and no `CONFIG` right needed under ACLs).
async fn query_info(
    config: &RedisInstanceConfig,
    info: ::redis::ConnectionInfo,
) -> Result<String, String> {
    let client = match &config.ca {
        Some(ca) => {
            let pem = tokio::fs::read(ca)
                .await
                .map_err(|e| format!("cannot read ca {}: {e}", ca.display()))?;
            ::redis::Client::build_with_tls(
                info,
                ::redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
        }
        None => ::redis::Client::open(info),
    }
    .map_err(|e| format!("invalid connection settings: {e}"))?;
    let settings = ::redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let mut connection = client
        .get_multiplexed_async_connection_with_config(&settings)
        .await
        .map_err(|e| describe(&e, "cannot connect"))?;
    ::redis::cmd("INFO")
        .query_async::<String>(&mut connection)
        .await
        .map_err(|e| describe(&e, "INFO failed"))
}

/// A Redis error as an operator reads it.
fn describe(e: &::redis::RedisError, doing: &str) -> String {
    // The crate drops the server's WRONGPASS text and says only "Password authentication
    // failed - AuthenticationFailed"; say it once, plainly.
    if e.kind() == ::redis::ErrorKind::AuthenticationFailed {
        return "authentication failed: the server refused the user name or password".into();
    }
    if matches!(e.code(), Some("WRONGPASS" | "NOAUTH")) {
        return format!("authentication failed: {e}");
    }
    if e.is_timeout() {
        return format!("{doing}: no answer within {RESPONSE_TIMEOUT:?} ({e})");
    }
    format!("{doing}: {e}")
}

/// Fills `out` from `INFO`'s `key:value` lines.
fn apply_info(text: &str, out: &mut RedisInstance) {
    for line in text.lines() {
        let Some((key, value)) = line.trim_end().split_once(':') else {
            continue;
        };
        match key {
            "redis_version" => out.version = value.to_string(),
            "role" => {
                out.role = match value {
                    "slave" => "replica".into(),
                    other => other.into(),
                }
            }
            "used_memory" => out.used_memory_bytes = value.parse().unwrap_or(0),
            "maxmemory" => out.maxmemory_bytes = value.parse().unwrap_or(0),
            "connected_clients" => out.connected_clients = value.parse().unwrap_or(0),
            "rdb_last_save_time" => {
                out.last_save = value
                    .parse::<i64>()
                    .ok()
                    .filter(|seconds| *seconds > 0)
                    .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 });
            }
            "rdb_last_bgsave_status" => out.last_save_ok = value == "ok",
            "aof_enabled" => out.aof_enabled = value == "1",
            db if is_db_name(db) => {
                // db0:keys=12,expires=0,avg_ttl=0
                let keys = value
                    .split(',')
                    .find_map(|field| field.strip_prefix("keys="))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                out.keyspace_keys.insert(db.to_string(), keys);
            }
            _ => {}
        }
    }
}

fn is_db_name(key: &str) -> bool {
    key.strip_prefix("db")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> RedisInstanceConfig {
        RedisInstanceConfig {
            name: "cache".into(),
            url: url.into(),
            username: None,
            password: None,
            password_file: None,
            ca: None,
        }
    }

    #[test]
    fn info_fields_are_read() {
        let mut out = RedisInstance::default();
        apply_info(
            "# Server\r\nredis_version:7.0.15\r\n# Clients\r\nconnected_clients:3\r\n\
             # Memory\r\nused_memory:1048576\r\nmaxmemory:268435456\r\n\
             # Persistence\r\nrdb_last_save_time:1764198000\r\nrdb_last_bgsave_status:err\r\n\
             aof_enabled:1\r\n# Replication\r\nrole:slave\r\n\
             # Keyspace\r\ndb0:keys=12,expires=1,avg_ttl=0\r\ndb3:keys=1,expires=0,avg_ttl=0\r\n",
            &mut out,
        );
        assert_eq!(out.version, "7.0.15");
        assert_eq!(out.role, "replica");
        assert_eq!(out.connected_clients, 3);
        assert_eq!(out.used_memory_bytes, 1_048_576);
        assert_eq!(out.maxmemory_bytes, 268_435_456);
        assert_eq!(out.last_save.map(|t| t.seconds), Some(1_764_198_000));
        assert!(!out.last_save_ok);
        assert!(out.aof_enabled);
        assert_eq!(out.keyspace_keys["db0"], 12);
        assert_eq!(out.keyspace_keys["db3"], 1);
        assert_eq!(out.keyspace_keys.len(), 2);
    }

    #[test]
    fn addresses_and_debug_output_never_carry_the_password() {
        let mut c = config("redis://alice:s3cret@127.0.0.1:6380/2");
        assert_eq!(
            c.redacted_url(),
            "redis://alice:<redacted>@127.0.0.1:6380/2"
        );
        let info = ::redis::IntoConnectionInfo::into_connection_info(c.url.as_str()).unwrap();
        assert_eq!(address(&info).unwrap(), "redis://127.0.0.1:6380/2");
        c.password = None;
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");

        let mut c = config("rediss://cache.internal:6379/0");
        c.password = Some("hunter2".into());
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
        let info = ::redis::IntoConnectionInfo::into_connection_info(c.url.as_str()).unwrap();
        assert_eq!(address(&info).unwrap(), "rediss://cache.internal:6379/0");
    }

    #[tokio::test]
    async fn secrets_are_scrubbed_from_messages() {
        let mut c = config("redis://:in%40url@127.0.0.1:1/0");
        c.username = Some("bob".into());
        let secrets = Secrets::of(&c).await.unwrap();
        assert_eq!(
            secrets.redact("x in@url y in%40url z"),
            "x <redacted> y <redacted> z"
        );
    }

    #[tokio::test]
    async fn a_password_file_is_read_without_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "hunter2\n").unwrap();
        assert_eq!(read_password_file(&path).await.unwrap(), "hunter2");
        std::fs::write(&path, "").unwrap();
        assert!(read_password_file(&path)
            .await
            .unwrap_err()
            .contains("empty"));
        let err = read_password_file(&dir.path().join("nope"))
            .await
            .unwrap_err();
        assert!(err.contains("cannot read password_file"), "{err}");
    }
}

#[cfg(test)]
mod config_tests {
    use std::path::Path;

    use crate::config::AgentConfig;
    use sentinel_daemon::config::parse_toml;

    const BASE: &str = "controller = \"127.0.0.1:7443\"\n\n[tls]\nca = \"/ca.pem\"\ncert = \"/h.pem\"\nkey = \"/h.key\"\n\n";

    #[test]
    fn redis_and_nginx_tables_parse_and_bad_entries_name_file_and_line() {
        let text = format!(
            "{BASE}[collectors.nginx]\nenabled = true\nprefix = \"/srv/nginx\"\n\n\
             [[collectors.redis]]\nname = \"cache\"\nurl = \"redis://127.0.0.1:6379/0\"\npassword_file = \"/run/pw\"\n\n\
             [[collectors.redis]]\nname = \"sessions\"\nurl = \"rediss://redis.internal:6380/1\"\nusername = \"sentinel\"\npassword = \"pw\"\nca = \"/ca.pem\"\n"
        );
        let c: AgentConfig = parse_toml(Path::new("a.toml"), &text).unwrap();
        assert!(c.collectors.nginx.enabled);
        assert_eq!(c.collectors.nginx.binary, "nginx");
        assert_eq!(c.collectors.redis.len(), 2);
        let debug = format!("{c:?}");
        assert!(!debug.contains("\"pw\""), "{debug}");

        for (bad, why) in [
            ("name = \"a\"\nurl = \"http://x\"\n", "not a Redis URL"),
            (
                "name = \"a\"\nurl = \"redis://:p@h:1/0\"\npassword = \"q\"\n",
                "only once",
            ),
            (
                "name = \"a\"\nurl = \"redis://h:1/0\"\nca = \"/ca.pem\"\n",
                "rediss://",
            ),
            ("name = \"\"\nurl = \"redis://h:1/0\"\n", "`name`"),
            (
                "name = \"a\"\nurl = \"redis://h:1/0\"\npasword = \"x\"\n",
                "pasword",
            ),
        ] {
            let text = format!("{BASE}[[collectors.redis]]\n{bad}");
            let err = parse_toml::<AgentConfig>(Path::new("a.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("a.toml:"), "{err}");
            assert!(err.contains(why), "{err}");
            assert!(!err.contains(":p@"), "{err}");
        }
        let twice = format!(
            "{BASE}[[collectors.redis]]\nname = \"a\"\nurl = \"redis://h:1/0\"\n\
             [[collectors.redis]]\nname = \"a\"\nurl = \"redis://h:2/0\"\n"
        );
        let err = parse_toml::<AgentConfig>(Path::new("a.toml"), &twice)
            .unwrap_err()
            .to_string();
        assert!(err.contains("used twice"), "{err}");
    }
}
