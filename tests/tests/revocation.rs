//! Revocation: a revoked host's open stream closes within a second, it cannot come back, its
//! jobs are cancelled with the reason, `sentinel hosts` says so; a revoked operator is refused
//! every call; `forget` removes a retired host. The deny list survives a restart.

use std::time::{Duration, Instant};

use sentinel_e2e::{eventually, Controller, Fleet};

fn status_of(controller: &Controller, host: &str) -> String {
    controller
        .get_host(host)
        .map(|h| h["status"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn a_revoked_host_is_cut_off_within_a_second_refused_after_and_its_jobs_cancelled() {
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa", "argus"]);
    let controller = fleet.start_shop_controller("10m");
    let hub = fleet.start_rollback_agent(&controller, "hub-alfa");
    let _argus = fleet.start_rollback_agent(&controller, "argus");
    let mut prod = fleet.start_rollback_agent(&controller, "prod-alfa");
    let online = controller.wait_online("hub-alfa");
    // Expiry shows where operators look: GetHost, `sentinel hosts`.
    assert!(online["certNotAfter"].is_string(), "{online}");
    controller.wait_online("argus");
    controller.wait_online("prod-alfa");
    let (code, table) = controller.cli(&["hosts"]);
    assert_eq!(code, Some(0), "{table}");
    assert!(table.contains("EXPIRES"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("hub-alfa") && l.contains(" in ")),
        "{table}"
    );

    // prod-alfa goes away with a job queued for it.
    prod.stop();
    eventually("prod-alfa offline", || {
        match status_of(&controller, "prod-alfa").as_str() {
            "HOST_STATUS_OFFLINE" => Ok(()),
            other => Err(other.to_string()),
        }
    });
    let d = controller
        .grpcurl(
            Some(r#"{"app":"shop","environment":"production"}"#),
            "sentinel.v1.FleetService/Rollback",
        )
        .json()
        .unwrap();
    let deploy_id = d["deployId"].as_str().unwrap().to_string();
    let job_id = eventually("the rollback job queued", || {
        let d = controller
            .grpcurl(
                Some(&format!("{{\"deploy_id\":\"{deploy_id}\"}}")),
                "sentinel.v1.FleetService/GetDeploy",
            )
            .json()?;
        d["steps"][0]["jobId"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| d.to_string())
    });
    assert_eq!(
        controller.get_job(&job_id).unwrap()["state"],
        "JOB_STATE_QUEUED"
    );
    let (code, out) = controller.cli(&["hosts", "revoke", "prod-alfa", "--reason", "disk sold"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&job_id),
        "the answer names the cancelled job: {out}"
    );
    let job = controller.get_job(&job_id).unwrap();
    assert_eq!(job["state"], "JOB_STATE_CANCELLED", "{job}");
    let detail = job["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("revoked") && detail.contains("disk sold"),
        "{job}"
    );

    // hub-alfa is connected: its stream is closed within a second of the answer.
    let (code, out) = controller.cli(&[
        "hosts",
        "revoke",
        "hub-alfa",
        "--reason",
        "key stolen \"for real\"",
    ]);
    let answered = Instant::now();
    assert_eq!(code, Some(0), "{out}");
    let refusal = "was revoked at";
    loop {
        if hub.log_text().contains(refusal) {
            break;
        }
        assert!(
            answered.elapsed() < Duration::from_secs(1),
            "the agent's stream was not closed within a second:\n{}",
            hub.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // It keeps trying and is refused every time, before any call is served.
    eventually("the agent refused again on reconnecting", || {
        let n = hub.log_text().matches(refusal).count();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} refusal(s)"))
        }
    });
    let r = controller.grpcurl_as("host-hub-alfa", &[], "grpc.health.v1.Health/Check");
    assert!(!r.ok);
    assert!(
        r.stderr.contains("PermissionDenied") && r.stderr.contains("hosts forget hub-alfa"),
        "{}",
        r.stderr
    );
    let host = controller.get_host("hub-alfa").unwrap();
    assert_eq!(host["status"], "HOST_STATUS_REVOKED", "{host}");
    assert!(host["connectedSince"].is_null(), "{host}");
    assert_eq!(host["revocation"]["reason"], "key stolen \"for real\"");
    assert_eq!(host["revocation"]["revokedBy"], "admin");

    let (code, table) = controller.cli(&["hosts"]);
    assert_eq!(code, Some(0), "{table}");
    for name in ["hub-alfa", "prod-alfa"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(name) && l.contains("revoked")),
            "{table}"
        );
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("argus") && l.contains("online")),
        "{table}"
    );

    // A revoked host that comes back is refused too.
    let back = fleet.start_rollback_agent(&controller, "prod-alfa");
    eventually("the returning prod-alfa refused", || {
        if back.log_text().contains(refusal) {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert_eq!(status_of(&controller, "prod-alfa"), "HOST_STATUS_REVOKED");
    drop(back);

    // Bad names and unknown hosts are refused with what is wrong.
    let (code, out) = controller.cli(&["hosts", "revoke", "bad\"name\nx"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("InvalidArgument") && out.contains("host name"),
        "{out}"
    );
    let (code, out) = controller.cli(&["hosts", "revoke", "nosuch"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("no host named") && out.contains("argus"),
        "{out}"
    );

    // Forget: refused while online, done when offline; the name is free again.
    let (code, out) = controller.cli(&["hosts", "forget", "argus"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("FailedPrecondition") && out.contains("online"),
        "{out}"
    );
    let (code, out) = controller.cli(&["hosts", "forget", "prod-alfa"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("revocation is lifted"), "{out}");
    assert!(controller.get_host("prod-alfa").is_err());
    let list = controller
        .grpcurl(None, "sentinel.v1.FleetService/ListRevocations")
        .json()
        .unwrap();
    let names: Vec<&str> = list["revocations"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["hub-alfa"], "{list}");
    let _prod_again = fleet.start_rollback_agent(&controller, "prod-alfa");
    controller.wait_online("prod-alfa");
}

#[test]
fn a_revoked_operator_is_refused_until_unrevoked_also_after_a_restart() {
    let fleet = Fleet::new(&["hub-alfa"]);
    fleet.issue_operator("mallory", "admin");
    let mut controller = fleet.start_controller("");
    let list = |c: &Controller| {
        c.grpcurl_as(
            "operator-mallory",
            &[],
            "sentinel.v1.FleetService/ListHosts",
        )
    };
    assert!(list(&controller).ok, "{}", list(&controller).stderr);

    let (code, out) = controller.cli(&[
        "operators",
        "revoke",
        "mallory",
        "--reason",
        "left the team",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let refused = list(&controller);
    assert!(!refused.ok);
    assert!(
        refused.stderr.contains("PermissionDenied")
            && refused.stderr.contains("operator \"mallory\" was revoked")
            && refused.stderr.contains("left the team"),
        "{}",
        refused.stderr
    );
    // The CLI says the same in words, whatever call mallory tries.
    let c = &fleet.certs;
    let out = sentinel_e2e::run(
        std::process::Command::new(sentinel_e2e::bin("sentinel"))
            .args(["hosts", "--controller", &controller.addr])
            .arg("--ca")
            .arg(c.join("ca.pem"))
            .arg("--cert")
            .arg(c.join("operator-mallory.pem"))
            .arg("--key")
            .arg(c.join("operator-mallory.key")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the controller refused this certificate: operator \"mallory\" was revoked"),
        "{err}"
    );

    // An admin cannot lock itself out.
    let (code, out) = controller.cli(&["operators", "revoke", "admin"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("cannot revoke itself"), "{out}");

    // The deny list is in the store: a restarted controller still refuses mallory.
    controller.proc.stop();
    let controller = fleet.start_controller_on(&controller.addr, "");
    assert!(!list(&controller).ok);
    let (code, out) = controller.cli(&["operators", "revoked"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("operator")
            && l.contains("mallory")
            && l.contains("left the team")),
        "{out}"
    );

    let (code, out) = controller.cli(&["operators", "unrevoke", "mallory"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(list(&controller).ok, "{}", list(&controller).stderr);
    let (code, out) = controller.cli(&["operators", "unrevoke", "mallory"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("is not revoked"), "{out}");
}
