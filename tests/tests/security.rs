//! Who may call what: mTLS with the fleet CA only, host certificates on the agent channel only
//! and only under their own name, operator certificates on the operator API with roles.

use sentinel_e2e::{eventually, free_port, Fleet};

#[test]
fn a_client_without_a_certificate_is_refused() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller(free_port(), "");
    let out = std::process::Command::new("grpcurl")
        .arg("-cacert")
        .arg(fleet.certs.join("ca.pem"))
        .arg(&controller.addr)
        .arg("list")
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The controller is still serving others.
    assert!(controller.grpcurl(None, "list").ok);
}

#[test]
fn a_certificate_of_another_ca_is_refused() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let other = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller(free_port(), "");
    let out = std::process::Command::new("grpcurl")
        .arg("-cacert")
        .arg(fleet.certs.join("ca.pem"))
        .arg("-cert")
        .arg(other.certs.join("operator-admin.pem"))
        .arg("-key")
        .arg(other.certs.join("operator-admin.key"))
        .arg(&controller.addr)
        .args(["sentinel.v1.FleetService/ListHosts"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The refusal is logged by the accept loop, which may not have written it yet.
    eventually("the controller to log the refused handshake", || {
        if controller.proc.log_text().contains("TLS handshake refused") {
            Ok(())
        } else {
            Err(controller.proc.log_text())
        }
    });
}

#[test]
fn a_host_certificate_cannot_call_the_operator_api() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller(free_port(), "");
    let r = controller.grpcurl_as("host-hub-alfa", &[], "sentinel.v1.FleetService/ListHosts");
    assert!(!r.ok);
    assert!(r.stderr.contains("PermissionDenied"), "{}", r.stderr);
    assert!(
        r.stderr.contains("operator certificates only"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_operator_certificate_cannot_open_the_agent_channel() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller(free_port(), "");
    let r = controller.grpcurl_as(
        "operator-admin",
        &["-d", r#"{"hello":{"host":{"name":"hub-alfa"}}}"#],
        "sentinel.v1.AgentService/Connect",
    );
    assert!(!r.ok);
    assert!(r.stderr.contains("PermissionDenied"), "{}", r.stderr);
    let hosts = controller
        .grpcurl(None, "sentinel.v1.FleetService/ListHosts")
        .json()
        .unwrap();
    assert!(
        hosts["hosts"].as_array().is_none_or(|h| h.is_empty()),
        "{hosts}"
    );
}

#[test]
fn a_host_speaking_under_another_hosts_name_is_refused_and_logged() {
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa"]);
    let controller = fleet.start_controller(free_port(), "");
    let r = controller.grpcurl_as(
        "host-hub-alfa",
        &["-d", r#"{"hello":{"host":{"name":"prod-alfa"}}}"#],
        "sentinel.v1.AgentService/Connect",
    );
    assert!(!r.ok);
    assert!(r.stderr.contains("PermissionDenied"), "{}", r.stderr);
    assert!(r.stderr.contains("prod-alfa"), "{}", r.stderr);

    // A real agent misconfigured the same way never shows up as prod-alfa.
    let mut agent = fleet.start_agent("prod-alfa", "hub-alfa", &controller.addr, "");
    sentinel_e2e::eventually("the refusal in the controller log", || {
        let log = controller.proc.log_text();
        if log.contains("hello claims another host's name") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert!(
        agent.is_running(),
        "the agent keeps retrying instead of exiting"
    );
    assert!(controller.get_host("prod-alfa").is_err());
    assert!(controller.get_host("hub-alfa").is_err());
}

#[test]
fn a_viewer_reads_but_cannot_start_work() {
    let fleet = Fleet::new(&["hub-alfa"]);
    fleet.issue_operator("vera", "viewer");
    let controller = fleet.start_controller(free_port(), "");
    let read = controller.grpcurl_as("operator-vera", &[], "sentinel.v1.FleetService/ListHosts");
    assert!(read.ok, "{}", read.stderr);
    let write = controller.grpcurl_as(
        "operator-vera",
        &["-d", r#"{"app":"auth","commit":"abc"}"#],
        "sentinel.v1.FleetService/SubmitDeploy",
    );
    assert!(!write.ok);
    assert!(
        write.stderr.contains("PermissionDenied"),
        "{}",
        write.stderr
    );
    assert!(write.stderr.contains("deployer"), "{}", write.stderr);
}
