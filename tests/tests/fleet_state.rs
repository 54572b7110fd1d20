//! The operator's view through grpcurl: services listed by reflection, hosts and their state.

use sentinel_e2e::{docker, eventually, Fleet};

#[test]
fn grpcurl_lists_every_service_through_reflection() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller("");
    let r = controller.grpcurl(None, "list");
    assert!(r.ok, "{}", r.stderr);
    for service in [
        "sentinel.v1.AgentService",
        "sentinel.v1.FleetService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            r.stdout.lines().any(|l| l == service),
            "{service} missing from:\n{}",
            r.stdout
        );
    }
    let described = controller.grpcurl(None, "describe sentinel.v1.FleetService");
    assert!(
        described.stdout.contains("rpc GetHost"),
        "{}",
        described.stdout
    );
    let health = controller
        .grpcurl(None, "grpc.health.v1.Health/Check")
        .json()
        .unwrap();
    assert_eq!(health["status"], "SERVING");
}

#[test]
fn an_agent_reports_system_state_and_a_container_the_test_started() {
    assert!(docker::available(), "these tests need a Docker daemon");
    docker::build_busybox_image();
    let name = format!("sentinel-e2e-web-{}", std::process::id());
    let _container = docker::Container::run(&name, "shop", "web");

    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller("");
    let _agent = fleet.start_agent(
        "hub-alfa",
        "hub-alfa",
        &controller.addr,
        "[labels]\nrole = \"staging\"",
    );

    let host = eventually("the container in GetHost", || {
        let host = controller.wait_online("hub-alfa");
        let containers = host["state"]["docker"]["state"]["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        containers
            .iter()
            .find(|c| c["name"] == name.as_str())
            .cloned()
            .map(|c| (host.clone(), c))
            .ok_or_else(|| format!("{name} not among {} containers", containers.len()))
    });
    let (host, container) = host;
    assert_eq!(container["composeProject"], "shop");
    assert_eq!(container["composeService"], "web");
    assert_eq!(container["state"], "running");
    assert_eq!(container["image"], docker::IMAGE);
    assert!(container["created"].is_string());

    let system = &host["state"]["system"]["state"];
    assert!(system["cpuCount"].as_u64().unwrap_or(0) >= 1, "{system}");
    assert!(system["memoryTotalBytes"].as_str().is_some(), "{system}");
    assert!(host["stateCollectedAt"].is_string());
    assert!(host["stateAgeSeconds"].as_f64().is_some());
    assert_eq!(host["info"]["labels"]["role"], "staging");
    assert!(host["info"]["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "collector.docker"));

    let list = controller
        .grpcurl(None, "sentinel.v1.FleetService/ListHosts")
        .json()
        .unwrap();
    let summary = &list["hosts"][0];
    assert_eq!(summary["name"], "hub-alfa");
    assert_eq!(summary["status"], "HOST_STATUS_ONLINE");
    assert!(
        summary["containersRunning"].as_u64().unwrap_or(0) >= 1,
        "{summary}"
    );

    // The CLI's --json is the API's own message, as grpcurl prints it.
    let c = &fleet.certs;
    let out = sentinel_e2e::run(
        std::process::Command::new(sentinel_e2e::bin("sentinel"))
            .args(["hosts", "--json", "--controller", &controller.addr])
            .arg("--ca")
            .arg(c.join("ca.pem"))
            .arg("--cert")
            .arg(c.join("operator-admin.pem"))
            .arg("--key")
            .arg(c.join("operator-admin.key")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: sentinel_e2e::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(cli["hosts"][0]["name"], "hub-alfa");
    assert_eq!(cli["hosts"][0]["status"], "HOST_STATUS_ONLINE");
    assert!(
        cli["hosts"][0]["containersRunning"].as_u64().unwrap_or(0) >= 1,
        "{cli}"
    );
    assert_eq!(cli["total"], 1);
}

#[test]
fn a_failing_collector_reports_its_error_while_the_others_keep_flowing() {
    let fleet = Fleet::new(&["argus"]);
    let controller = fleet.start_controller("");
    let _agent = fleet.start_agent(
        "argus",
        "argus",
        &controller.addr,
        "[collectors]\ndocker_socket = \"/nonexistent/docker.sock\"",
    );
    let host = controller.wait_online("argus");
    let error = host["state"]["docker"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("/nonexistent/docker.sock"), "{host}");
    assert!(host["state"]["system"]["state"].is_object(), "{host}");
    let list = controller
        .grpcurl(None, "sentinel.v1.FleetService/ListHosts")
        .json()
        .unwrap();
    assert_eq!(list["hosts"][0]["failingCollectors"][0], "docker");
}

#[test]
fn an_unknown_host_is_not_found_with_the_known_names() {
    let fleet = Fleet::new(&["argus"]);
    let controller = fleet.start_controller("");
    let _agent = fleet.start_agent("argus", "argus", &controller.addr, "");
    controller.wait_online("argus");
    let err = controller.get_host("nosuch").unwrap_err();
    assert!(err.contains("NotFound") && err.contains("argus"), "{err}");
}

#[test]
fn a_silent_agent_is_marked_offline_after_missed_heartbeats_and_recovers() {
    let fleet = Fleet::new(&["cerebro"]);
    let controller = fleet.start_controller(
        "[agents]\nheartbeat_interval = \"300ms\"\nmissed_heartbeats_offline = 3",
    );
    let agent = fleet.start_agent("cerebro", "cerebro", &controller.addr, "");
    controller.wait_online("cerebro");
    agent.signal("STOP");
    let host = eventually("cerebro offline", || {
        let h = controller.get_host("cerebro")?;
        if h["status"] == "HOST_STATUS_OFFLINE" {
            Ok(h)
        } else {
            Err(h["status"].to_string())
        }
    });
    agent.signal("CONT");
    assert!(
        host["offlineReason"]
            .as_str()
            .unwrap_or_default()
            .contains("missed 3 heartbeats"),
        "{host}"
    );
    // The state it had is still there, with its age.
    assert!(host["state"]["system"].is_object());
    controller.wait_online("cerebro");
}

#[test]
fn a_job_or_deploy_filter_naming_nothing_known_is_not_found_and_an_empty_list_is_printed_as_one() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller("");
    let _agent = fleet.start_agent("hub-alfa", "hub-alfa", &controller.addr, "");
    controller.wait_online("hub-alfa");

    let api = controller.grpcurl(
        Some(r#"{"host":"hub-alfq"}"#),
        "sentinel.v1.FleetService/ListJobs",
    );
    assert!(!api.ok, "{}", api.stdout);
    assert!(api.stderr.contains("NotFound"), "{}", api.stderr);
    assert!(
        api.stderr
            .contains("no host named \"hub-alfq\"; known hosts: hub-alfa"),
        "{}",
        api.stderr
    );
    // A known host without jobs is an empty answer, not an error.
    let known = controller.grpcurl(
        Some(r#"{"host":"hub-alfa"}"#),
        "sentinel.v1.FleetService/ListJobs",
    );
    assert!(known.ok, "{}", known.stderr);

    let cli = |args: &[&str]| {
        let c = &fleet.certs;
        sentinel_e2e::run(
            std::process::Command::new(sentinel_e2e::bin("sentinel"))
                .args(args)
                .args(["--controller", &controller.addr])
                .arg("--ca")
                .arg(c.join("ca.pem"))
                .arg("--cert")
                .arg(c.join("operator-admin.pem"))
                .arg("--key")
                .arg(c.join("operator-admin.key")),
        )
    };
    let jobs = cli(&["jobs", "--host", "hub-alfq"]);
    assert_eq!(jobs.status.code(), Some(2));
    let err = String::from_utf8_lossy(&jobs.stderr);
    assert!(err.contains("no host named \"hub-alfq\""), "{err}");
    let deploys = cli(&["deploys", "--app", "pulsee"]);
    assert_eq!(deploys.status.code(), Some(2));
    let err = String::from_utf8_lossy(&deploys.stderr);
    assert!(err.contains("no app \"pulsee\""), "{err}");

    // No jobs at all: `--json` prints the empty list, so `jq '.jobs[]'` works.
    let empty = cli(&["jobs", "--json"]);
    assert!(
        empty.status.success(),
        "{}",
        String::from_utf8_lossy(&empty.stderr)
    );
    let json: sentinel_e2e::Value = serde_json::from_slice(&empty.stdout).expect("JSON");
    assert_eq!(json["jobs"], serde_json::json!([]), "{json}");
}
