//! Restarts, configs and the dev PKI from the operator's side of the command line.

use std::process::Command;

use sentinel_e2e::{bin, eventually, logged_addr, run, Fleet, CONTROLLER_LISTENING};

#[test]
fn after_a_controller_restart_the_state_is_kept_and_the_agent_is_back_within_its_backoff() {
    let fleet = Fleet::new(&["prod-alfa"]);
    let mut controller = fleet.start_controller("");
    let _agent = fleet.start_agent("prod-alfa", "prod-alfa", &controller.addr, "");
    let before = controller.wait_online("prod-alfa");
    let status = controller.proc.stop().expect("controller exit status");
    assert!(
        status.success(),
        "controller did not stop cleanly: {status:?}"
    );

    // On the address the first run got: the agent knows no other.
    let controller = fleet.start_controller_on(&controller.addr, "");
    // The stored state answers right away, even before the agent is back.
    let restored = controller
        .get_host("prod-alfa")
        .expect("host restored from the store");
    assert_eq!(restored["info"]["name"], "prod-alfa");
    assert!(restored["state"]["system"].is_object(), "{restored}");
    assert_eq!(
        restored["info"]["agentVersion"],
        before["info"]["agentVersion"]
    );
    // The agent's backoff is capped at 2s in the harness config.
    let after = controller.wait_online("prod-alfa");
    assert_ne!(after["connectedSince"], before["connectedSince"]);
}

#[test]
fn a_broken_agent_config_names_file_line_and_key() {
    let fleet = Fleet::new(&["argus"]);
    let config =
        fleet.write_agent_config("argus", "argus", "127.0.0.1:1", "report_intervall = \"5s\"");
    let out = run(Command::new(bin("hostagent"))
        .arg("--check-config")
        .arg("--config")
        .arg(&config));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:4:", config.display())), "{err}");
    assert!(err.contains("report_intervall"), "{err}");

    // Starting the agent with it fails the same way instead of running half-configured.
    let out = run(Command::new(bin("hostagent")).arg("--config").arg(&config));
    assert_eq!(out.status.code(), Some(64));

    let good = fleet.write_agent_config("argus", "argus", "127.0.0.1:1", "");
    let out = run(Command::new(bin("hostagent"))
        .arg("--check-config")
        .arg("--config")
        .arg(&good));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_broken_controller_config_names_file_line_and_key() {
    let fleet = Fleet::new(&[]);
    let config = fleet.path("bad.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:7443\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[agents]\nheartbeat_interval = 5\n",
    )
    .unwrap();
    let out = run(Command::new(bin("sentinel"))
        .args(["config", "check"])
        .arg(&config));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:7:", config.display())), "{err}");
    assert!(
        err.contains("heartbeat_interval") || err.contains("invalid type"),
        "{err}"
    );
    let out = run(Command::new(bin("sentinel"))
        .arg("serve")
        .arg("--config")
        .arg(&config));
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn pki_init_refuses_to_overwrite_and_keeps_keys_private() {
    use std::os::unix::fs::PermissionsExt;
    let fleet = Fleet::new(&["hub-alfa"]);
    for file in [
        "ca.key",
        "controller.key",
        "host-hub-alfa.key",
        "operator-admin.key",
        "signing.key",
    ] {
        let mode = std::fs::metadata(fleet.certs.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let ca_before = std::fs::read(fleet.certs.join("ca.pem")).unwrap();
    let out = run(Command::new(bin("sentinel"))
        .args(["pki", "init", "--dir"])
        .arg(&fleet.certs));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(
        std::fs::read(fleet.certs.join("ca.pem")).unwrap(),
        ca_before
    );
    let out = run(Command::new(bin("sentinel"))
        .args(["pki", "issue-host", "new-host", "--dir"])
        .arg(&fleet.certs));
    assert!(out.status.success());
    assert!(fleet.certs.join("host-new-host.pem").exists());
    let out = run(Command::new(bin("sentinel"))
        .args(["pki", "issue-host", "Bad_Name", "--dir"])
        .arg(&fleet.certs));
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn sentinel_dev_runs_a_controller_and_a_local_agent_in_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dev.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(bin("sentinel"))
        .args([
            "dev",
            "--report-interval",
            "1s",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--agent-metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let certs = dir.path().join("data/certs");
    let addr = eventually("sentinel dev to log its bound address", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        logged_addr(&text, CONTROLLER_LISTENING).ok_or(text)
    });
    let hosts = eventually("the local agent in ListHosts", || {
        let o = run(Command::new("grpcurl")
            .arg("-cacert")
            .arg(certs.join("ca.pem"))
            .arg("-cert")
            .arg(certs.join("operator-admin.pem"))
            .arg("-key")
            .arg(certs.join("operator-admin.key"))
            .arg(addr.to_string())
            .arg("sentinel.v1.FleetService/ListHosts"));
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        if text.contains("HOST_STATUS_ONLINE") {
            Ok(text)
        } else {
            Err(String::from_utf8_lossy(&o.stderr).to_string())
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        hosts.contains("\"mode\"") || hosts.contains("agentVersion"),
        "{hosts}"
    );
    let printed = std::fs::read_to_string(&log).unwrap();
    assert!(printed.contains("grpcurl -cacert"), "{printed}");
    // The CLI's settings, with absolute paths, so `sentinel hosts` works from anywhere.
    let ca = std::fs::canonicalize(&certs).unwrap().join("ca.pem");
    assert!(
        printed.contains(&format!("SENTINEL_CA={}", ca.display())),
        "{printed}"
    );
    // The banner names the address the controller got, not the `:0` it was asked for.
    assert!(
        printed.contains(&format!("controller on {addr},")),
        "{printed}"
    );
    assert!(
        printed.contains("see the \"controller metrics listening\" log line"),
        "{printed}"
    );
}
