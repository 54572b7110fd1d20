//! SIGHUP: both daemons re-read their config file, put in force what can change while they
//! run, name what needs a restart, and keep running on the old config when the new file is
//! invalid.

use std::fs;
use std::process::Command;

use sentinel_e2e::{eventually, run, Controller, Fleet, Proc};

/// Sends SIGHUP and waits for the process to log `message` once more than it had.
fn hup_and_wait(proc: &Proc, message: &str) -> String {
    let before = proc.log_text().matches(message).count();
    proc.signal("HUP");
    eventually(&format!("{message:?} logged after SIGHUP"), || {
        let log = proc.log_text();
        if log.matches(message).count() > before {
            Ok(log)
        } else {
            Err(log.lines().rev().take(5).collect::<Vec<_>>().join("\n"))
        }
    })
}

fn rollback(controller: &Controller, app: &str) -> sentinel_e2e::GrpcResult {
    controller.grpcurl(
        Some(&format!(r#"{{"app":"{app}","environment":"staging"}}"#)),
        "sentinel.v1.FleetService/Rollback",
    )
}

/// The SHA-256 fingerprint of the certificate the server at `addr` presents.
fn served_fingerprint(addr: &str) -> String {
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "openssl s_client -connect {addr} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
    )));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn file_fingerprint(path: &std::path::Path) -> String {
    let out = run(Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(path));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_controller_applies_a_new_config_on_sighup_and_keeps_the_old_one_when_it_is_broken() {
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa"]);
    let mut controller = fleet.start_shop_controller("10m");
    let config = fleet.path("sentinel.toml");
    let original = fs::read_to_string(&config).unwrap();

    let before = rollback(&controller, "cart");
    assert!(
        before.stderr.contains("no app \"cart\""),
        "{}",
        before.stderr
    );

    // A new app, quotes and all in its directory name.
    let cart = format!(
        "\n[[apps]]\nname = \"cart\"\nrepo = \"{repo}\"\n[apps.staging]\nhost = \"hub-alfa\"\napp_dir = \"{dir}\"\n[apps.production]\nhost = \"prod-alfa\"\napp_dir = \"{dir}\"\n",
        repo = fleet.path("repo").display(),
        dir = fleet.path("apps-hub-alfa/cart \\\"x\\\"").display(),
    );
    fs::write(&config, format!("{original}{cart}")).unwrap();
    let log = hup_and_wait(&controller.proc, "config reloaded");
    assert!(log.contains("apps (added: cart)"), "{log}");
    let after = rollback(&controller, "cart");
    let deploy = after.json().expect("a rollback of the new app is taken");
    assert!(deploy["deployId"].as_str().is_some(), "{deploy}");

    // A broken file: refused, named, and the running config (with cart) stays.
    fs::write(&config, format!("{original}{cart}\n[[apps]]\nname = \n")).unwrap();
    let log = hup_and_wait(&controller.proc, "config reload refused");
    assert!(log.contains("sentinel.toml"), "{log}");
    assert!(
        controller.proc.is_running(),
        "the controller died on a broken reload"
    );
    let (code, out) = controller.cli(&["hosts"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!rollback(&controller, "cart").stderr.contains("no app"));

    // Valid, but naming a certificate file that is not there: refused as a whole.
    fs::write(
        &config,
        format!("{original}{cart}").replace("controller.pem", "missing.pem"),
    )
    .unwrap();
    let log = hup_and_wait(&controller.proc, "config reload refused");
    assert!(log.contains("missing.pem"), "{log}");

    // Only a restart changes the listen address: said, and the old one keeps serving.
    fs::write(
        &config,
        format!("{original}{cart}").replacen(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:1\"",
            1,
        ),
    )
    .unwrap();
    let log = hup_and_wait(&controller.proc, "only a restart puts it in force");
    assert!(log.contains("listen"), "{log}");
    let (code, out) = controller.cli(&["hosts"]);
    assert_eq!(code, Some(0), "{out}");

    // A new certificate and key under [tls] (here from a second PKI): new connections get it.
    let other = fleet.path("other-pki");
    let out = run(Command::new(sentinel_e2e::bin("sentinel"))
        .args(["pki", "init", "--no-hosts", "--dir"])
        .arg(&other));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = fleet.certs.display();
    let o = other.display();
    fs::write(
        &config,
        format!("{original}{cart}")
            .replace(
                &format!("{c}/controller.pem"),
                &format!("{o}/controller.pem"),
            )
            .replace(
                &format!("{c}/controller.key"),
                &format!("{o}/controller.key"),
            )
            .replace(&format!("{c}/ca.pem"), &format!("{o}/ca.pem")),
    )
    .unwrap();
    assert_eq!(
        served_fingerprint(&controller.addr),
        file_fingerprint(&fleet.certs.join("controller.pem"))
    );
    let log = hup_and_wait(&controller.proc, "config reloaded");
    assert!(log.contains("tls"), "{log}");
    assert_eq!(
        served_fingerprint(&controller.addr),
        file_fingerprint(&other.join("controller.pem")),
        "new connections get the reloaded certificate"
    );
    assert!(controller.proc.is_running());
    let status = controller.proc.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[test]
fn the_agent_applies_a_new_policy_and_labels_on_sighup_and_survives_a_broken_file() {
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa"]);
    let controller = fleet.start_shop_controller("10m");
    let mut agent = fleet.start_rollback_agent(&controller, "hub-alfa");
    controller.wait_online("hub-alfa");
    let config = fleet.path("agent-hub-alfa.toml");
    let original = fs::read_to_string(&config).unwrap();

    // Broken: refused, and the agent keeps its channel.
    fs::write(&config, format!("{original}\n[jobs\n")).unwrap();
    let log = hup_and_wait(&agent, "config reload refused");
    assert!(log.contains("agent-hub-alfa.toml"), "{log}");
    assert!(agent.is_running(), "the agent died on SIGHUP");

    // Labels (connection settings: it reconnects) and a policy that no longer runs rollbacks.
    let changed = format!("labels = {{ reloaded = \"yes\" }}\n{original}").replace(
        "allowed_kinds = [\"rollback\"]",
        "allowed_kinds = [\"backup\"]",
    );
    assert_ne!(
        changed,
        format!("labels = {{ reloaded = \"yes\" }}\n{original}")
    );
    fs::write(&config, changed).unwrap();
    let log = hup_and_wait(&agent, "config reloaded");
    assert!(log.contains("labels") && log.contains("jobs"), "{log}");
    eventually("the host's new label at the controller", || {
        let host = controller.get_host("hub-alfa")?;
        if host.to_string().contains("reloaded") {
            Ok(())
        } else {
            Err(host.to_string())
        }
    });
    let d = rollback(&controller, "shop").json().unwrap();
    let id = d["deployId"].as_str().unwrap().to_string();
    let ended = controller.wait_deploy_end(&id, sentinel_e2e::patience());
    assert!(
        ended.to_string().contains("allowed_kinds"),
        "the refusal names the policy key: {ended}"
    );
    assert!(agent.is_running());
    let status = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
