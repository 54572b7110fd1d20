//! Host enrolment with join tokens and short-lived certificates renewed over the agent
//! channel, against real controller and agent processes: a new host enrols with nothing but a
//! token, connects and reports; every refusal (token used twice, expired, garbage, a CSR for
//! another name, a wrong CA pin) says why; a client without a certificate reaches enrolment
//! and nothing else; renewal happens several times on the same stream; an expired certificate
//! says what to do.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sentinel_e2e::{
    bin, eventually, eventually_within, metric_sample, run, scrape_metrics, Controller, Fleet,
    Proc, AGENT_METRICS_LISTENING,
};

/// A dev PKI with an issuing CA (`sentinel pki init-issuer`).
fn fleet() -> Fleet {
    let fleet = Fleet::new(&["hub-alfa"]);
    let out = run(Command::new(bin("sentinel"))
        .args(["pki", "init-issuer", "--dir"])
        .arg(&fleet.certs));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet
}

/// The `[pki]` and `[signing]` sections for host certificates living `ttl`.
fn pki_toml(fleet: &Fleet, ttl: &str) -> String {
    let c = fleet.certs.display();
    format!(
        "[signing]\nkey = \"{c}/signing.key\"\n\n[pki]\nissuer_cert = \"{c}/issuer.pem\"\n\
         issuer_key = \"{c}/issuer.key\"\nhost_cert_ttl = \"{ttl}\"\n"
    )
}

/// `sentinel token create` as admin; the token (the first line of its output).
fn token(controller: &Controller, host: &str, ttl: &str) -> String {
    let (code, text) = controller.cli(&["token", "create", "--host", host, "--ttl", ttl]);
    assert_eq!(code, Some(0), "{text}");
    let token = text.lines().next().unwrap_or_default().to_owned();
    assert!(token.starts_with("sjt1_"), "{text}");
    assert!(text.contains("hostagent enroll --controller"), "{text}");
    token
}

/// `hostagent enroll`: (exit code, stdout then stderr).
fn enroll(controller: &str, token: &str, dir: &Path) -> (Option<i32>, String) {
    let out = run(Command::new(bin("hostagent"))
        .args([
            "enroll",
            "--controller",
            controller,
            "--token",
            token,
            "--dir",
        ])
        .arg(dir));
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The written `agent.toml`, with what a test needs on top (its own state dir, metrics on
/// port 0, a fast report interval and backoff); the agent started with it.
fn start_enrolled_agent(fleet: &Fleet, dir: &Path) -> Proc {
    let written = std::fs::read_to_string(dir.join("agent.toml")).expect("agent.toml");
    let config = dir.join("agent-test.toml");
    let text = written
        .replace(
            "[jobs]\n",
            &format!(
                "[jobs]\nstate_dir = \"{}\"\n",
                dir.join("state").display()
            ),
        )
        .replacen(
            "\n[tls]",
            "report_interval = \"1s\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[backoff]\ninitial = \"200ms\"\nmax = \"1s\"\n\n[tls]",
            1,
        );
    std::fs::write(&config, text).expect("write config");
    let mut cmd = Command::new(bin("hostagent"));
    cmd.arg("--config").arg(&config);
    Proc::spawn(
        cmd,
        fleet.path(&format!(
            "agent-{}.log",
            dir.file_name().unwrap_or_default().to_string_lossy()
        )),
        "enrolled agent",
    )
}

/// (serial, notAfter) of the first certificate in a PEM file, as openssl prints them.
fn serial_and_expiry(pem: &Path) -> (String, String) {
    let out = run(Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-enddate", "-in"])
        .arg(pem));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .to_owned()
    };
    (field("serial="), field("notAfter="))
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn a_new_host_enrols_with_a_token_reports_state_and_renews_on_the_same_stream() {
    let fleet = fleet();
    let controller = fleet.start_controller(&pki_toml(&fleet, "30s"));
    let token = token(&controller, "newbie", "15m");
    let dir = fleet.path("newbie");
    let (code, text) = enroll(&controller.addr, &token, &dir);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("enrolled host \"newbie\""), "{text}");
    assert_eq!(mode(&dir.join("host.key")), 0o600);
    for file in ["host.pem", "ca.pem", "signing-1.pub", "agent.toml"] {
        assert_eq!(mode(&dir.join(file)), 0o644, "{file}");
    }
    // The key was made here: it is in no file of the admin's PKI directory.
    let key = std::fs::read_to_string(dir.join("host.key")).expect("key");
    for entry in std::fs::read_dir(&fleet.certs).expect("certs") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).unwrap_or_default();
        assert!(!text.contains(key.trim()), "the host key left the host");
    }
    let (code, text) = sentinel_e2e::check_agent_config(&dir.join("agent.toml"));
    assert_eq!(code, Some(0), "the written config does not load: {text}");
    // The audit trail says a token was made for newbie, and never holds the token.
    let audit = controller
        .grpcurl(None, "sentinel.v1.FleetService/ListAudit")
        .stdout;
    assert!(
        audit.contains("CreateJoinToken") && audit.contains("token for newbie"),
        "{audit}"
    );
    let secret = token.rsplit('_').nth(1).expect("the token's secret part");
    assert!(
        !audit.contains(secret),
        "the token is in the audit trail: {audit}"
    );

    let mut agent = start_enrolled_agent(&fleet, &dir);
    controller.wait_online("newbie");
    let metrics_port = agent.logged_addr(AGENT_METRICS_LISTENING).port();
    let first = serial_and_expiry(&dir.join("host.pem"));

    // Renewal at two thirds of 30s: three of them within ~75s, on the stream of the start.
    let mut seen = vec![first.clone()];
    eventually_within(Duration::from_secs(120), "three renewals", || {
        let now = serial_and_expiry(&dir.join("host.pem"));
        if !seen.contains(&now) {
            seen.push(now);
        }
        let metrics = scrape_metrics(metrics_port)?;
        let renewed = metric_sample(
            &metrics,
            "hostagent_certificate_renewals_total{outcome=\"renewed\"}",
        )
        .unwrap_or(0.0);
        if renewed >= 3.0 && seen.len() >= 4 {
            Ok(())
        } else {
            Err(format!("renewed {renewed}, certificates seen {seen:?}"))
        }
    });
    let serials: std::collections::BTreeSet<_> = seen.iter().map(|(s, _)| s).collect();
    let expiries: std::collections::BTreeSet<_> = seen.iter().map(|(_, e)| e).collect();
    assert_eq!(serials.len(), seen.len(), "{seen:?}");
    assert!(expiries.len() >= 3, "notAfter did not move: {seen:?}");

    // The same stream all along: no reconnect, one connection in the controller's log, and
    // state still flowing.
    let metrics = scrape_metrics(metrics_port).expect("scrape");
    assert_eq!(
        metric_sample(&metrics, "hostagent_reconnects_total"),
        Some(0.0),
        "{metrics}"
    );
    let log = controller.proc.log_text();
    assert_eq!(log.matches("agent connected").count(), 1, "{log}");
    assert!(
        log.matches("host certificate renewed").count() >= 3,
        "{log}"
    );
    let host = controller.wait_online("newbie");
    assert!(
        host["stateAgeSeconds"].as_f64().unwrap_or(99.0) < 5.0,
        "state stopped flowing: {host}"
    );
    assert!(agent.is_running());

    // The first certificate has expired by now; the next dial uses the renewed one.
    let addr = controller.addr.clone();
    drop(controller);
    let controller = fleet.start_controller_on(&addr, &pki_toml(&fleet, "30s"));
    controller.wait_online("newbie");
    let metrics = scrape_metrics(metrics_port).expect("scrape");
    assert!(
        metric_sample(&metrics, "hostagent_reconnects_total").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
}

#[test]
fn each_refusal_says_why_and_a_refused_attempt_does_not_burn_the_token() {
    let fleet = fleet();
    let other = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller(&pki_toml(&fleet, "1h"));
    let dir = fleet.path("enrolled");

    // Garbage.
    let (code, text) = enroll(&controller.addr, "hello", &dir);
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("not a join token"), "{text}");
    assert!(!dir.exists(), "a refused enrolment wrote files");

    // A token pinning another fleet's CA: the agent refuses the controller before sending it.
    let good = token(&controller, "newbie", "15m");
    let fingerprint = good.rsplit('_').next().expect("fingerprint").to_owned();
    let other_ca = sentinel_daemon::tls::load_certs(&other.certs.join("ca.pem"), "CA")
        .expect("other CA")
        .remove(0);
    let wrong_pin = good.replace(
        &fingerprint,
        &sentinel_daemon::csr::ca_fingerprint(other_ca.as_ref()),
    );
    let (code, text) = enroll(&controller.addr, &wrong_pin, &dir);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("does not chain to the CA the join token pins"),
        "{text}"
    );
    assert!(!dir.exists());

    // A CSR for another name than the token's (grpcurl, a key made by openssl): refused, and
    // the token still works afterwards.
    let key = fleet.path("other.key");
    let csr = fleet.path("other.csr");
    let out = run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", "/CN=prod-alfa", "-outform", "DER", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(Command::new("openssl")
        .args(["base64", "-A", "-in"])
        .arg(&csr));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csr_b64 = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let r = anonymous_grpcurl(
        &fleet,
        &controller,
        &format!(r#"{{"token":"{good}","csr_der":"{csr_b64}"}}"#),
        "sentinel.v1.EnrollService/Enroll",
    );
    assert!(!r.0, "{}", r.1);
    assert!(r.1.contains("InvalidArgument"), "{}", r.1);
    assert!(r.1.contains("prod-alfa"), "{}", r.1);
    assert!(r.1.contains("may be issued here"), "{}", r.1);

    // Now the real enrolment, then the same token again.
    let (code, text) = enroll(&controller.addr, &good, &dir);
    assert_eq!(code, Some(0), "{text}");
    let again = fleet.path("again");
    let (code, text) = enroll(&controller.addr, &good, &again);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("already used"), "{text}");
    assert!(
        text.contains("sentinel token create --host newbie"),
        "{text}"
    );
    assert!(!again.exists());

    // An expired token.
    let short = token(&controller, "late", "1s");
    std::thread::sleep(Duration::from_millis(2100));
    let (code, text) = enroll(&controller.addr, &short, &again);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("expired at"), "{text}");

    // A well-formed token the controller never made.
    let forged = good.replacen(
        &good[5 + "newbie_".len()..5 + "newbie_".len() + 16],
        "0123456789abcdef",
        1,
    );
    let (code, text) = enroll(&controller.addr, &forged, &again);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("unknown join token"), "{text}");

    // Only admins make tokens; bad names and lifetimes are refused.
    fleet.issue_operator("dan", "deployer");
    let r = controller.grpcurl_as(
        "operator-dan",
        &["-d", r#"{"host_name":"x"}"#],
        "sentinel.v1.FleetService/CreateJoinToken",
    );
    assert!(r.stderr.contains("PermissionDenied"), "{}", r.stderr);
    let (code, text) = controller.cli(&["token", "create", "--host", "Bad\"Name\n"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("invalid name"), "{text}");
    let (code, text) = controller.cli(&["token", "create", "--host", "ok", "--ttl", "30d"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("at most 7days"), "{text}");
}

/// grpcurl without a client certificate: (success, stdout then stderr). Calls of our own
/// services take their descriptors from the .proto files, since reflection (like everything
/// but enrolment) is closed to such a client.
fn anonymous_grpcurl(
    fleet: &Fleet,
    controller: &Controller,
    data: &str,
    method: &str,
) -> (bool, String) {
    let mut cmd = Command::new("grpcurl");
    cmd.arg("-cacert").arg(fleet.certs.join("ca.pem"));
    if method.starts_with("sentinel.") {
        cmd.arg("-import-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto"))
            .args([
                "-proto",
                "sentinel/v1/agent.proto",
                "-proto",
                "sentinel/v1/fleet.proto",
            ]);
    }
    if !data.is_empty() {
        cmd.args(["-d", data]);
    }
    cmd.arg(&controller.addr).args(method.split(' '));
    let out = run(&mut cmd);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn without_a_certificate_only_enrolment_is_reachable() {
    let fleet = fleet();
    let controller = fleet.start_controller(&pki_toml(&fleet, "1h"));
    for (data, method) in [
        ("", "list"),
        ("", "sentinel.v1.FleetService/ListHosts"),
        (
            r#"{"host_name":"x"}"#,
            "sentinel.v1.FleetService/CreateJoinToken",
        ),
        (
            r#"{"hello":{"host":{"name":"hub-alfa"}}}"#,
            "sentinel.v1.AgentService/Connect",
        ),
        ("", "grpc.health.v1.Health/Check"),
    ] {
        let (ok, text) = anonymous_grpcurl(&fleet, &controller, data, method);
        assert!(!ok, "{method} answered without a certificate: {text}");
        assert!(
            text.contains("PermissionDenied") || text.contains("PERMISSION_DENIED"),
            "{method}: {text}"
        );
    }
    // Enrolment itself is reached (and refuses the garbage token with its reason).
    let (ok, text) = anonymous_grpcurl(
        &fleet,
        &controller,
        r#"{"token":"garbage"}"#,
        "sentinel.v1.EnrollService/Enroll",
    );
    assert!(!ok);
    assert!(text.contains("Unauthenticated"), "{text}");
    assert!(text.contains("not a join token"), "{text}");
    // Certificates still work as before.
    assert!(
        controller
            .grpcurl(None, "sentinel.v1.FleetService/ListHosts")
            .ok
    );
}

#[test]
fn with_an_issuing_ca_a_rogue_ca_certificate_under_the_root_still_cannot_mint_an_admin() {
    let fleet = fleet();
    sentinel_e2e::forge_operator_through_intermediate(&fleet, "eve", "admin");
    let controller = fleet.start_controller(&pki_toml(&fleet, "1h"));
    let r = controller.grpcurl_as("operator-eve", &[], "sentinel.v1.FleetService/ListHosts");
    assert!(!r.ok, "{}", r.stdout);
    eventually("the controller to log why", || {
        let log = controller.proc.log_text();
        if log.contains("NotIssuedByFleetCa") {
            Ok(())
        } else {
            Err(log)
        }
    });
    // A certificate of the configured issuing CA works (enrolled), as does the root's admin.
    let token = token(&controller, "newbie", "15m");
    let (code, text) = enroll(&controller.addr, &token, &fleet.path("newbie"));
    assert_eq!(code, Some(0), "{text}");
    assert!(
        controller
            .grpcurl(None, "sentinel.v1.FleetService/ListHosts")
            .ok
    );
}

#[test]
fn an_agent_whose_certificate_expired_while_offline_says_to_enrol_again() {
    let fleet = fleet();
    let controller = fleet.start_controller(&pki_toml(&fleet, "30s"));
    let token = token(&controller, "sleeper", "15m");
    let dir: PathBuf = fleet.path("sleeper");
    let (code, text) = enroll(&controller.addr, &token, &dir);
    assert_eq!(code, Some(0), "{text}");
    drop(controller);
    // 30s of life, back-dated by 3s: expired once 30s have passed.
    std::thread::sleep(Duration::from_secs(31));
    // It refuses to start (exit 64, as its config check), saying what to do.
    let mut agent = start_enrolled_agent(&fleet, &dir);
    eventually("the agent to refuse to start", || {
        if agent.is_running() {
            Err("still running".to_string())
        } else {
            Ok(())
        }
    });
    let status = agent.stop();
    let log = agent.log_text();
    assert_eq!(status.and_then(|s| s.code()), Some(64), "{log}");
    assert!(
        log.contains("expired at") && log.contains("enrol again with a new token"),
        "{log}"
    );
    assert!(
        log.contains("sentinel token create --host sleeper"),
        "{log}"
    );
    assert!(log.contains("hostagent enroll"), "{log}");
}
