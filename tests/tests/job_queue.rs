//! The controller's job queue: jobs for an offline host wait for it (until they expire), and
//! what the agent reports settles them.

use sentinel_e2e::{eventually, Controller, Fleet, Value};

fn job_of(controller: &Controller, deploy_id: &str) -> Result<Value, String> {
    let d = controller
        .grpcurl(
            Some(&format!("{{\"deploy_id\":\"{deploy_id}\"}}")),
            "sentinel.v1.FleetService/GetDeploy",
        )
        .json()?;
    let job_id = d["steps"][0]["jobId"]
        .as_str()
        .ok_or_else(|| d.to_string())?
        .to_string();
    controller
        .grpcurl(
            Some(&format!("{{\"job_id\":\"{job_id}\"}}")),
            "sentinel.v1.FleetService/GetJob",
        )
        .json()
}

#[test]
fn a_job_for_an_offline_host_waits_and_runs_when_the_host_returns() {
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa"]);
    let controller = fleet.start_shop_controller("10m");
    let d = controller
        .grpcurl(
            Some(r#"{"app":"shop","environment":"staging"}"#),
            "sentinel.v1.FleetService/Rollback",
        )
        .json()
        .unwrap();
    let id = d["deployId"].as_str().unwrap().to_string();
    let queued = eventually("the rollback job queued", || job_of(&controller, &id));
    assert_eq!(queued["state"], "JOB_STATE_QUEUED", "{queued}");
    assert_eq!(queued["targetHost"], "hub-alfa");

    let _agent = fleet.start_rollback_agent(&controller, "hub-alfa");
    let done = eventually("the job to run on the returning host", || {
        let j = job_of(&controller, &id)?;
        if j["state"] == "JOB_STATE_FAILED" {
            Ok(j)
        } else {
            Err(j.to_string())
        }
    });
    // It ran: there is no release to roll back to, and the agent said so.
    assert!(
        done["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("release"),
        "{done}"
    );
    assert!(
        done["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["accepted"].is_object()),
        "{done}"
    );
    let d = controller
        .grpcurl(
            Some(&format!("{{\"deploy_id\":\"{id}\"}}")),
            "sentinel.v1.FleetService/GetDeploy",
        )
        .json()
        .unwrap();
    assert_eq!(d["state"], "DEPLOYMENT_STATE_FAILED", "{d}");
}

#[test]
fn a_job_whose_host_stays_away_times_out_and_is_never_run_late() {
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa"]);
    let controller = fleet.start_shop_controller("2s");
    let d = controller
        .grpcurl(
            Some(r#"{"app":"shop","environment":"production"}"#),
            "sentinel.v1.FleetService/Rollback",
        )
        .json()
        .unwrap();
    let id = d["deployId"].as_str().unwrap().to_string();
    let timed_out = eventually("the job to time out", || {
        let j = job_of(&controller, &id)?;
        if j["state"] == "JOB_STATE_TIMED_OUT" {
            Ok(j)
        } else {
            Err(j.to_string())
        }
    });
    assert!(
        timed_out["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{timed_out}"
    );
    // The host comes back: the expired job is not sent, let alone run.
    let _agent = fleet.start_rollback_agent(&controller, "prod-alfa");
    controller.wait_online("prod-alfa");
    let later = job_of(&controller, &id).unwrap();
    assert_eq!(later["state"], "JOB_STATE_TIMED_OUT");
    assert!(
        later["events"].as_array().is_none_or(|e| e.is_empty()),
        "{later}"
    );
}
