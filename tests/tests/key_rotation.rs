//! Signing-key rotation: the next key reaches a connected agent over the channel, signed by
//! the key it trusts, and a job signed by the new key is then accepted, with no file on the
//! host touched by hand. A key list signed by a key the agent does not trust is refused.

use std::path::Path;
use std::process::Command;

use sentinel_e2e::{bin, eventually, run, Controller, Fleet, Value};

fn controller_on(fleet: &Fleet, addr: &str, signing: &str) -> Controller {
    let extra = format!(
        "[signing]\n{signing}\n\n[[apps]]\nname = \"shop\"\nrepo = \"{}\"\n[apps.staging]\nhost = \"hub-alfa\"\napp_dir = \"{}\"\n[apps.production]\nhost = \"hub-alfa\"\napp_dir = \"{}\"\n",
        fleet.path("repo").display(),
        fleet.path("apps/shop-staging").display(),
        fleet.path("apps/shop-production").display(),
    );
    fleet.start_controller_on(addr, &extra)
}

fn rotate(dir: &Path, promote: bool) -> String {
    let mut cmd = Command::new(bin("sentinel"));
    cmd.args(["pki", "rotate-signing-key", "--dir"]).arg(dir);
    if promote {
        cmd.arg("--promote");
    }
    let out = run(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

/// Starts a rollback of staging and returns its job once it ended.
fn rollback_job(controller: &Controller) -> Value {
    let d = controller
        .grpcurl(
            Some(r#"{"app":"shop","environment":"staging"}"#),
            "sentinel.v1.FleetService/Rollback",
        )
        .json()
        .unwrap();
    let id = d["deployId"].as_str().unwrap().to_string();
    eventually("the rollback job to end", || {
        let d = controller
            .grpcurl(
                Some(&format!("{{\"deploy_id\":\"{id}\"}}")),
                "sentinel.v1.FleetService/GetDeploy",
            )
            .json()?;
        let job_id = d["steps"][0]["jobId"]
            .as_str()
            .ok_or_else(|| d.to_string())?;
        let job = controller.get_job(job_id)?;
        match job["state"].as_str() {
            Some("JOB_STATE_QUEUED" | "JOB_STATE_SENT" | "JOB_STATE_STARTED") | None => {
                Err(job.to_string())
            }
            _ => Ok(job),
        }
    })
}

#[test]
fn a_new_signing_key_reaches_a_connected_agent_over_the_channel_and_signs_accepted_jobs() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let c = fleet.certs.display().to_string();
    let controller = controller_on(&fleet, "127.0.0.1:0", &format!("key = \"{c}/signing.key\""));
    let addr = controller.addr.clone();
    let state = fleet.path("state-hub-alfa");
    let agent = fleet.start_agent(
        "hub-alfa",
        "hub-alfa",
        &addr,
        &format!(
            "[collectors]\ndocker = false\n[jobs]\nstate_dir = \"{}\"\ntrusted_keys = [\"{c}/signing.pub\"]\nallowed_kinds = [\"rollback\"]\napp_dirs = [\"{}\"]\n",
            state.display(),
            fleet.path("apps").display()
        ),
    );
    controller.wait_online("hub-alfa");
    let agent_config = std::fs::read(fleet.path("agent-hub-alfa.toml")).unwrap();

    // A controller with a key the agent never trusted: its key list and its job are refused.
    drop(controller);
    let rogue = fleet.path("rogue");
    rotate(&rogue, false);
    let controller = controller_on(
        &fleet,
        &addr,
        &format!("key = \"{}/signing-next.key\"", rogue.display()),
    );
    controller.wait_online("hub-alfa");
    eventually("the agent to refuse the untrusted key list", || {
        if agent
            .log_text()
            .contains("refused a key list from the controller")
        {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });
    let job = rollback_job(&controller);
    assert_eq!(job["state"], "JOB_STATE_REFUSED", "{job}");
    drop(controller);

    // Step 1: a next key, announced by the controller signed with the current one.
    let out = rotate(&fleet.certs, false);
    assert!(out.contains("signing-next.key"), "{out}");
    let controller = controller_on(
        &fleet,
        &addr,
        &format!("key = \"{c}/signing.key\"\nnext_key = \"{c}/signing-next.pub\""),
    );
    controller.wait_online("hub-alfa");
    eventually("the agent to trust the next key", || {
        if agent.log_text().contains("now trusting job-signing key(s)") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });
    assert!(state.join("trusted-keys").exists());
    drop(controller);

    // Step 2: the next key signs. The agent, never restarted and its files untouched by hand,
    // accepts the job (it runs: there is no release to roll back to, and it says so).
    rotate(&fleet.certs, true);
    assert!(fleet.certs.join("signing-old.key").exists());
    let controller = controller_on(&fleet, &addr, &format!("key = \"{c}/signing.key\""));
    controller.wait_online("hub-alfa");
    let job = rollback_job(&controller);
    assert_eq!(job["state"], "JOB_STATE_FAILED", "{job}");
    assert!(
        job["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("release"),
        "{job}"
    );
    assert_eq!(
        std::fs::read(fleet.path("agent-hub-alfa.toml")).unwrap(),
        agent_config
    );
    drop(agent);
}
