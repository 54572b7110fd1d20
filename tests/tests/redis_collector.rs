//! The Redis collector against real throwaway `redis-server`s: what `INFO` says, passwords
//! right and wrong (and never shown), a stopped and a hung instance reported without stalling
//! or hiding the others, and TLS with the instance's CA.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use hostagent::collectors::redis::RedisCollector;
use hostagent::collectors::Collectors;
use hostagent::config::{CollectorsConfig, RedisInstanceConfig};
use sentinel_e2e::services::{RedisServer, RedisTls};
use sentinel_proto::v1::{redis_section, system_section, RedisInstance, RedisState};

const PASSWORD: &str = "s3cret-Redis-Pw";

fn instance(name: &str, url: &str) -> RedisInstanceConfig {
    RedisInstanceConfig {
        name: name.into(),
        url: url.into(),
        username: None,
        password: None,
        password_file: None,
        ca: None,
    }
}

/// The version `redis-server --version` prints (`v=7.0.15`).
fn redis_version() -> String {
    let out = Command::new("redis-server")
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap()
        .to_string()
}

fn by_name<'a>(state: &'a RedisState, name: &str) -> &'a RedisInstance {
    state
        .instances
        .iter()
        .find(|i| i.name == name)
        .unwrap_or_else(|| panic!("no instance {name} in {state:#?}"))
}

#[tokio::test]
async fn an_instance_without_password_reports_version_role_memory_persistence_and_keyspace() {
    let redis = RedisServer::start(None);
    redis.cli(&["SET", "a", "1"]);
    redis.cli(&["SET", "b", "2"]);
    redis.cli(&["-n", "3", "SET", "c", "3"]);
    redis.cli(&["CONFIG", "SET", "maxmemory", "64mb"]);

    let collector = RedisCollector::new(&[instance("cache", &redis.url)]);
    let started = Instant::now();
    let state = collector.collect().await;
    eprintln!("redis collection took {:?}", started.elapsed());

    let cache = by_name(&state, "cache");
    assert!(cache.reachable, "{cache:#?}");
    assert_eq!(cache.error, "");
    assert_eq!(cache.address, redis.url);
    assert_eq!(cache.version, redis_version());
    assert_eq!(cache.role, "master");
    assert!(cache.used_memory_bytes > 0);
    assert_eq!(cache.maxmemory_bytes, 64 * 1024 * 1024);
    assert!(cache.connected_clients >= 1);
    assert!(cache.last_save.is_some_and(|t| t.seconds > 1_700_000_000));
    assert!(cache.last_save_ok);
    assert!(!cache.aof_enabled);
    assert_eq!(cache.keyspace_keys.len(), 2, "{:?}", cache.keyspace_keys);
    assert_eq!(cache.keyspace_keys["db0"], 2);
    assert_eq!(cache.keyspace_keys["db3"], 1);

    redis.cli(&["CONFIG", "SET", "appendonly", "yes"]);
    let state = collector.collect().await;
    assert!(by_name(&state, "cache").aof_enabled);
}

#[tokio::test]
async fn a_password_protected_instance_reads_with_the_right_password_and_names_a_wrong_one() {
    let redis = RedisServer::start(Some(PASSWORD));
    let password_file = redis.dir().join("redis-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();

    let right = RedisInstanceConfig {
        password_file: Some(password_file),
        ..instance("right", &redis.url)
    };
    let wrong = RedisInstanceConfig {
        password: Some("not-the-Password".into()),
        ..instance("wrong", &redis.url)
    };
    let in_url = instance(
        "in-url",
        &redis.url.replace("redis://", "redis://:not-the-Password@"),
    );
    let missing = instance("missing", &redis.url);
    let configs = [right, wrong, in_url, missing];
    for config in &configs {
        let debug = format!("{config:?}");
        assert!(!debug.contains("not-the-Password"), "{debug}");
    }
    let state = RedisCollector::new(&configs).collect().await;
    let shown = format!("{state:?}");
    assert!(!shown.contains("not-the-Password"), "{shown}");
    assert!(!shown.contains(PASSWORD), "{shown}");

    let right = by_name(&state, "right");
    assert!(right.reachable, "{right:#?}");
    assert_eq!(right.address, redis.url);

    for name in ["wrong", "in-url"] {
        let wrong = by_name(&state, name);
        assert!(!wrong.reachable);
        assert_eq!(wrong.address, redis.url);
        assert!(
            wrong
                .error
                .starts_with(&format!("{}: authentication failed", redis.url)),
            "{}",
            wrong.error
        );
        assert!(
            wrong.error.contains("refused the user name or password"),
            "{}",
            wrong.error
        );
        assert_eq!(wrong.version, "");
    }

    let missing = by_name(&state, "missing");
    assert!(!missing.reachable);
    assert!(missing.error.contains("NOAUTH"), "{}", missing.error);
}

#[tokio::test]
async fn a_stopped_instance_is_unreachable_while_the_other_sections_still_flow() {
    let live = RedisServer::start(None);
    let mut gone = RedisServer::start(None);
    let gone_url = gone.url.clone();
    gone.stop();

    let mut collectors = Collectors::new(&CollectorsConfig {
        system: true,
        docker: false,
        redis: vec![instance("live", &live.url), instance("gone", &gone_url)],
        ..CollectorsConfig::default()
    });
    assert!(collectors
        .capabilities()
        .contains(&"collector.redis".to_string()));
    let started = Instant::now();
    let state = collectors.collect().await;
    assert!(started.elapsed() < Duration::from_secs(5));

    let Some(redis_section::Result::State(redis)) = state.redis.and_then(|s| s.result) else {
        panic!("no redis state");
    };
    assert_eq!(
        redis
            .instances
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        ["live", "gone"]
    );
    assert!(by_name(&redis, "live").reachable);
    let gone = by_name(&redis, "gone");
    assert!(!gone.reachable);
    assert!(
        gone.error
            .starts_with(&format!("{gone_url}: cannot connect")),
        "{}",
        gone.error
    );
    assert!(gone.error.contains("refused"), "{}", gone.error);
    assert!(matches!(
        state.system.and_then(|s| s.result),
        Some(system_section::Result::State(_))
    ));
}

#[tokio::test]
async fn a_hung_instance_times_out_instead_of_stalling_the_report() {
    let hung = RedisServer::start(None);
    let live = RedisServer::start(None);
    hung.signal("STOP");
    let collector =
        RedisCollector::new(&[instance("hung", &hung.url), instance("live", &live.url)]);
    let started = Instant::now();
    let state = collector.collect().await;
    let took = started.elapsed();
    hung.signal("CONT");

    assert!(took < Duration::from_secs(6), "took {took:?}");
    let hung = by_name(&state, "hung");
    assert!(!hung.reachable);
    assert!(hung.error.contains("no answer within"), "{}", hung.error);
    assert!(by_name(&state, "live").reachable);
}

/// A CA and a server certificate for 127.0.0.1 signed by it, written into `dir`.
fn tls_files(dir: &std::path::Path) -> RedisTls {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sentinel test redis CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();

    let write = |name: &str, text: String| -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    RedisTls {
        cert: write("server.pem", cert.pem()),
        key: write("server.key", key.serialize_pem()),
        ca: write("ca.pem", ca_cert.pem()),
    }
}

#[tokio::test]
async fn a_tls_instance_is_read_over_rediss_with_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_files(dir.path());
    let ca = tls.ca.clone();
    let redis = RedisServer::start_tls(Some(PASSWORD), tls);
    assert!(redis.url.starts_with("rediss://"));

    let with_ca = RedisInstanceConfig {
        password: Some(PASSWORD.into()),
        ca: Some(ca),
        ..instance("tls", &redis.url)
    };
    let without_ca = RedisInstanceConfig {
        password: Some(PASSWORD.into()),
        ..instance("tls-system-roots", &redis.url)
    };
    let plain = RedisInstanceConfig {
        password: Some(PASSWORD.into()),
        ..instance("plaintext", &redis.url.replace("rediss://", "redis://"))
    };
    let state = RedisCollector::new(&[with_ca, without_ca, plain])
        .collect()
        .await;

    let tls = by_name(&state, "tls");
    assert!(tls.reachable, "{tls:#?}");
    assert_eq!(tls.address, redis.url);
    assert_eq!(tls.role, "master");

    // Our CA is not among the system's roots: the certificate is refused.
    let untrusted = by_name(&state, "tls-system-roots");
    assert!(!untrusted.reachable);
    assert!(
        untrusted.error.to_lowercase().contains("certificate"),
        "{}",
        untrusted.error
    );
    // Plain text to a TLS port gets no Redis answer.
    assert!(!by_name(&state, "plaintext").reachable);
}
