//! The nginx collector against a real throwaway nginx (Debian's `nginx-light`) in a temp
//! prefix: servers split across includes, upstreams resolved, a TLS certificate made here,
//! `nginx -t` verdicts good and bad, and a broken nginx not stopping the other collectors.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use hostagent::collectors::nginx::NginxCollector;
use hostagent::collectors::Collectors;
use hostagent::config::{CollectorsConfig, NginxCollectorConfig};
use sentinel_e2e::services::{nginx_binary, Nginx};
use sentinel_proto::v1::{nginx_section, system_section, NginxServer, NginxState};

/// A port for configs nginx only tests (`nginx -t` does not bind): nothing need be free.
const NOT_BOUND: u16 = 8081;

/// 2031-01-02T03:04:05Z, the test certificate's expiry.
const NOT_AFTER: i64 = 1_925_089_445;

fn collector_config(nginx: &Nginx, config: &Path) -> NginxCollectorConfig {
    NginxCollectorConfig {
        enabled: true,
        binary: nginx_binary().display().to_string(),
        config: config.to_path_buf(),
        prefix: Some(nginx.prefix().to_path_buf()),
    }
}

/// Writes a self-signed certificate and key for `names` under the prefix's `conf/tls/`.
fn self_signed(nginx: &Nginx, file: &str, names: &[&str]) {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0]);
    params.not_after = time::OffsetDateTime::from_unix_timestamp(NOT_AFTER).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    nginx.write(&format!("conf/tls/{file}.pem"), &cert.pem());
    nginx.write(&format!("conf/tls/{file}.key"), &key.serialize_pem());
}

/// The version `nginx -v` prints, e.g. `nginx/1.22.1`.
fn nginx_version() -> String {
    let out = Command::new(nginx_binary()).arg("-v").output().unwrap();
    String::from_utf8_lossy(&out.stderr)
        .trim()
        .strip_prefix("nginx version: ")
        .unwrap()
        .to_string()
}

fn server<'a>(state: &'a NginxState, name: &str) -> &'a NginxServer {
    state
        .servers
        .iter()
        .find(|s| s.server_names.iter().any(|n| n == name))
        .unwrap_or_else(|| panic!("no server {name} in {:#?}", state.servers))
}

fn routes(server: &NginxServer) -> Vec<(&str, &str, Vec<&str>)> {
    server
        .routes
        .iter()
        .map(|r| {
            (
                r.location.as_str(),
                r.proxy_pass.as_str(),
                r.upstream_servers.iter().map(String::as_str).collect(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_config_split_across_includes_reports_servers_routes_upstreams_and_certificates() {
    let mut nginx = Nginx::new();
    self_signed(
        &nginx,
        "secure",
        &["secure.example.test", "www.secure.example.test"],
    );
    let write = |nginx: &Nginx, [shop_port, api_port, tls_port]: [u16; 3]| {
        nginx.write(
            "conf/sites/shop.conf",
            &format!(
                "server {{\n\
                 \x20   listen 127.0.0.1:{shop_port};\n\
                 \x20   server_name shop.example.test www.shop.example.test;\n\
                 \x20   location / {{ proxy_pass http://app_backend; }}\n\
                 \x20   location /static/ {{ root html; }}\n\
                 }}\n"
            ),
        );
        nginx.write(
            "conf/sites/api.conf",
            &format!(
                "# the API goes straight to one backend\n\
                 server {{\n\
                 \x20   listen 127.0.0.1:{api_port};\n\
                 \x20   server_name \"api.example.test\";\n\
                 \x20   location /v1/ {{ proxy_pass http://127.0.0.1:9100/; }}\n\
                 }}\n"
            ),
        );
        nginx.write(
            "conf/nginx.conf",
            &nginx.main_config(&format!(
                "    upstream app_backend {{\n\
                 \x20       server 127.0.0.1:9001;\n\
                 \x20       server 127.0.0.1:9002 backup;\n\
                 \x20   }}\n\
                 \x20   include sites/*.conf;\n\
                 \x20   server {{\n\
                 \x20       listen 127.0.0.1:{tls_port} ssl;\n\
                 \x20       server_name secure.example.test;\n\
                 \x20       ssl_certificate tls/secure.pem;\n\
                 \x20       ssl_certificate_key tls/secure.key;\n\
                 \x20       location / {{ proxy_pass http://app_backend; }}\n\
                 \x20   }}\n"
            )),
        )
    };
    // Before nginx runs, any ports do: `nginx -t` does not bind. Starting rewrites the config
    // on ports reserved for it.
    let config = write(&nginx, [NOT_BOUND, NOT_BOUND + 1, NOT_BOUND + 2]);
    let collector = NginxCollector::new(&collector_config(&nginx, &config));

    let stopped = collector.collect().await.unwrap();
    assert!(!stopped.running, "{stopped:#?}");
    assert!(stopped.config_ok, "{}", stopped.config_test_output);

    let (_, [shop_port, api_port, tls_port]) = nginx.start(write);
    let started = Instant::now();
    let state = collector.collect().await.unwrap();
    eprintln!("nginx collection took {:?}", started.elapsed());

    assert!(state.running);
    assert_eq!(state.version, nginx_version());
    assert!(state.config_ok, "{}", state.config_test_output);
    assert!(
        state.config_test_output.contains("test is successful"),
        "{}",
        state.config_test_output
    );
    assert_eq!(state.config_parse_error, "");
    assert_eq!(state.servers.len(), 3, "{:#?}", state.servers);

    let backend = vec!["127.0.0.1:9001", "127.0.0.1:9002"];
    let shop = server(&state, "shop.example.test");
    assert_eq!(
        shop.server_names,
        ["shop.example.test", "www.shop.example.test"]
    );
    assert_eq!(shop.listen, [format!("127.0.0.1:{shop_port}")]);
    assert_eq!(routes(shop), [("/", "http://app_backend", backend.clone())]);
    let shop_file = nginx.prefix().join("conf/sites/shop.conf");
    assert_eq!(shop.source, format!("{}:1", shop_file.display()));

    let api = server(&state, "api.example.test");
    assert_eq!(api.listen, [format!("127.0.0.1:{api_port}")]);
    assert_eq!(
        routes(api),
        [("/v1/", "http://127.0.0.1:9100/", Vec::<&str>::new())]
    );
    assert!(
        api.source.ends_with("conf/sites/api.conf:2"),
        "{}",
        api.source
    );

    let secure = server(&state, "secure.example.test");
    assert_eq!(secure.listen, [format!("127.0.0.1:{tls_port} ssl")]);
    assert_eq!(routes(secure), [("/", "http://app_backend", backend)]);

    assert_eq!(state.certificates.len(), 1, "{:#?}", state.certificates);
    let cert = &state.certificates[0];
    assert_eq!(
        Path::new(&cert.path),
        nginx.prefix().join("conf/tls/secure.pem")
    );
    assert_eq!(cert.error, "");
    assert_eq!(cert.subject, "CN=secure.example.test");
    assert_eq!(
        cert.dns_names,
        ["secure.example.test", "www.secure.example.test"]
    );
    assert_eq!(cert.not_after.map(|t| t.seconds), Some(NOT_AFTER));
    assert_eq!(cert.served_for, ["secure.example.test"]);

    nginx.stop();
    let after = collector.collect().await.unwrap();
    assert!(!after.running);
    assert_eq!(after.servers, state.servers);
}

#[tokio::test]
async fn a_broken_config_is_reported_by_nginx_while_the_other_sections_still_flow() {
    let nginx = Nginx::new();
    let port = NOT_BOUND;
    let config = nginx.write(
        "conf/nginx.conf",
        &nginx.main_config(&format!(
            "    server {{\n\
             \x20       listen 127.0.0.1:{port};\n\
             \x20       server_name broken.example.test;\n\
             \x20       bogus_directive on;\n\
             \x20   }}\n"
        )),
    );
    let mut collectors = Collectors::new(&CollectorsConfig {
        system: true,
        docker: false,
        nginx: collector_config(&nginx, &config),
        ..CollectorsConfig::default()
    });
    assert!(collectors
        .capabilities()
        .contains(&"collector.nginx".to_string()));

    let state = collectors.collect().await;
    let Some(nginx_section::Result::State(section)) = state.nginx.and_then(|s| s.result) else {
        panic!("no nginx state");
    };
    assert!(!section.config_ok);
    let expected = format!(
        "nginx: [emerg] unknown directive \"bogus_directive\" in {}:",
        config.display()
    );
    assert!(
        section.config_test_output.starts_with(&expected),
        "{}",
        section.config_test_output
    );
    assert!(
        section.config_test_output.contains("test failed"),
        "{}",
        section.config_test_output
    );
    // nginx refuses the directive; the agent still reads the layout around it.
    assert_eq!(section.config_parse_error, "");
    assert_eq!(section.servers[0].server_names, ["broken.example.test"]);
    assert!(matches!(
        state.system.and_then(|s| s.result),
        Some(system_section::Result::State(_))
    ));

    // A file that does not even parse: the agent names the file and line too.
    nginx.write(
        "conf/nginx.conf",
        &nginx.main_config(&format!(
            "    server {{\n        listen 127.0.0.1:{port};\n        location / {{\n"
        )),
    );
    let state = collectors.collect().await;
    let Some(nginx_section::Result::State(section)) = state.nginx.and_then(|s| s.result) else {
        panic!("no nginx state");
    };
    assert!(!section.config_ok);
    assert!(
        section
            .config_test_output
            .contains("unexpected end of file"),
        "{}",
        section.config_test_output
    );
    assert!(
        section
            .config_parse_error
            .starts_with(&format!("{}:", config.display())),
        "{}",
        section.config_parse_error
    );
    assert!(
        section
            .config_parse_error
            .contains("unexpected end of file"),
        "{}",
        section.config_parse_error
    );
    assert!(section.servers.is_empty());
    assert!(state.system.is_some());
}

#[tokio::test]
async fn a_missing_nginx_binary_is_the_section_error_and_the_others_still_flow() {
    let mut collectors = Collectors::new(&CollectorsConfig {
        system: true,
        docker: false,
        nginx: NginxCollectorConfig {
            enabled: true,
            binary: "/nonexistent/sbin/nginx".into(),
            ..NginxCollectorConfig::default()
        },
        ..CollectorsConfig::default()
    });
    let state = collectors.collect().await;
    let Some(nginx_section::Result::Error(error)) = state.nginx.and_then(|s| s.result) else {
        panic!("no nginx error");
    };
    assert!(error.contains("/nonexistent/sbin/nginx"), "{error}");
    assert!(matches!(
        state.system.and_then(|s| s.result),
        Some(system_section::Result::State(_))
    ));
}

#[tokio::test]
async fn sections_are_absent_when_the_collectors_are_off() {
    let mut collectors = Collectors::new(&CollectorsConfig {
        system: true,
        docker: false,
        ..CollectorsConfig::default()
    });
    let caps = collectors.capabilities();
    assert!(!caps
        .iter()
        .any(|c| c == "collector.nginx" || c == "collector.redis"));
    let state = collectors.collect().await;
    assert!(state.nginx.is_none());
    assert!(state.redis.is_none());
}
