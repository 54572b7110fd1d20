//! Durable on acknowledgement: a write RPC that answered has committed its write, so a
//! `kill -9` of the controller right after the answer loses nothing. Each case kills the
//! controller the moment the answer arrives and checks the write after a restart.

use sentinel_e2e::fixture::one_commit_repo;
use sentinel_e2e::{Controller, Fleet, Value};

/// A controller whose apps and backups point at hosts that never connect: every job it
/// queues stays queued, so what a restart shows is what the store kept. Its write-behind
/// flush waits an hour: only the commit an answer waits for can have saved a write.
fn config(fleet: &Fleet) -> String {
    let c = fleet.certs.display();
    let repo = fleet.path("repo");
    one_commit_repo(&repo);
    let app = |env: &str, host: &str| {
        format!(
            "[apps.{env}]\nhost = \"{host}\"\napp_dir = \"{}\"\n",
            fleet.path(&format!("apps-{host}/till")).display()
        )
    };
    format!(
        "[signing]\nkey = \"{c}/signing.key\"\n[jobs]\nttl = \"1h\"\n[store]\nflush_interval = \"1h\"\n\n\
         [backups]\nhost = \"vault-1\"\nbackup_dir = \"/srv/backups\"\n\
         [[backups.databases]]\nenvironment = \"production\"\ndatabase = \"till_prod\"\ndsn_ref = \"ro\"\n\n\
         [[apps]]\nname = \"till\"\nrepo = \"{}\"\n{}{}",
        repo.display(),
        app("staging", "edge-7"),
        app("production", "edge-8"),
    )
}

/// Calls `method` and kills the controller (SIGKILL) as soon as the answer is in.
fn answer_then_kill(controller: &mut Controller, data: &str, method: &str) -> Value {
    let r = controller.grpcurl(Some(data), method);
    controller.proc.signal("KILL");
    let answer = r.json().unwrap_or_else(|e| panic!("{method}: {e}"));
    let _ = controller.proc.stop();
    answer
}

fn restart(fleet: &Fleet, old: &Controller) -> Controller {
    fleet.start_controller_on(&old.addr, &config(fleet))
}

fn get(controller: &Controller, method: &str, data: &str) -> Value {
    controller
        .grpcurl(Some(data), method)
        .json()
        .unwrap_or_else(|e| panic!("{method} {data} after the restart: {e}"))
}

fn kept_job(controller: &Controller, id: &str) -> Value {
    get(
        controller,
        "sentinel.v1.FleetService/GetJob",
        &format!(r#"{{"job_id":"{id}"}}"#),
    )
}

fn kept_deploy(controller: &Controller, id: &str) -> Value {
    get(
        controller,
        "sentinel.v1.FleetService/GetDeploy",
        &format!(r#"{{"deploy_id":"{id}"}}"#),
    )
}

#[test]
fn every_answered_write_survives_a_kill_9_right_after_the_answer() {
    let fleet = Fleet::new(&["vault-1", "edge-7", "edge-8"]);
    let mut controller = fleet.start_controller(&config(&fleet));

    // RunBackup: the queued job is there.
    let job = answer_then_kill(
        &mut controller,
        r#"{"reason":"before the upgrade"}"#,
        "sentinel.v1.FleetService/RunBackup",
    );
    let backup_id = job["jobId"].as_str().expect("a job id").to_string();
    assert_eq!(job["state"], "JOB_STATE_QUEUED", "{job}");
    let mut controller = restart(&fleet, &controller);
    let kept = kept_job(&controller, &backup_id);
    assert_eq!(kept["state"], "JOB_STATE_QUEUED", "{kept}");
    assert_eq!(kept["targetHost"], "vault-1", "{kept}");

    // CancelJob: the cancel is there.
    let cancelled = answer_then_kill(
        &mut controller,
        &format!(r#"{{"job_id":"{backup_id}","reason":"wrong night"}}"#),
        "sentinel.v1.FleetService/CancelJob",
    );
    assert_eq!(cancelled["state"], "JOB_STATE_CANCELLED", "{cancelled}");
    let mut controller = restart(&fleet, &controller);
    let kept = kept_job(&controller, &backup_id);
    assert_eq!(kept["state"], "JOB_STATE_CANCELLED", "{kept}");
    assert!(
        kept["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("wrong night"),
        "{kept}"
    );

    // SubmitDeploy: the deploy is there (ended by the restart, saying so).
    let deploy = answer_then_kill(
        &mut controller,
        r#"{"app":"till","commit":"main","requested_by":"relay"}"#,
        "sentinel.v1.FleetService/SubmitDeploy",
    );
    let deploy_id = deploy["deployId"]
        .as_str()
        .expect("a deploy id")
        .to_string();
    let mut controller = restart(&fleet, &controller);
    let kept = kept_deploy(&controller, &deploy_id);
    assert_eq!(kept["app"], "till", "{kept}");
    assert_eq!(kept["state"], "DEPLOYMENT_STATE_FAILED", "{kept}");
    assert!(
        kept["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("restart"),
        "{kept}"
    );

    // Rollback: the rollback deploy is there.
    let rollback = answer_then_kill(
        &mut controller,
        r#"{"app":"till","environment":"production"}"#,
        "sentinel.v1.FleetService/Rollback",
    );
    let rollback_id = rollback["deployId"]
        .as_str()
        .expect("a deploy id")
        .to_string();
    let mut controller = restart(&fleet, &controller);
    let kept = kept_deploy(&controller, &rollback_id);
    assert_eq!(kept["app"], "till", "{kept}");

    // CancelDeploy: a deploy started, then cancelled; the cancel is there.
    let running = controller
        .grpcurl(
            Some(r#"{"app":"till","commit":"main"}"#),
            "sentinel.v1.FleetService/SubmitDeploy",
        )
        .json()
        .unwrap();
    let running_id = running["deployId"].as_str().unwrap().to_string();
    let cancelled = answer_then_kill(
        &mut controller,
        &format!(r#"{{"deploy_id":"{running_id}","reason":"wrong commit"}}"#),
        "sentinel.v1.FleetService/CancelDeploy",
    );
    assert_eq!(cancelled["deployId"], running_id.as_str(), "{cancelled}");
    let controller = restart(&fleet, &controller);
    let kept = kept_deploy(&controller, &running_id);
    assert_eq!(kept["state"], "DEPLOYMENT_STATE_CANCELLED", "{kept}");
    assert_eq!(kept["cancelledBy"], "admin", "{kept}");
    assert_eq!(kept["cancelReason"], "wrong commit", "{kept}");
    let step_job = cancelled["steps"]
        .as_array()
        .and_then(|s| s.iter().rev().find_map(|s| s["jobId"].as_str()))
        .expect("the deploy's running step has a job")
        .to_string();
    let step = kept_job(&controller, &step_job);
    assert_eq!(step["state"], "JOB_STATE_CANCELLED", "{step}");
}
