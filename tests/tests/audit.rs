//! The audit trail and app locks, through the CLI and grpcurl: every write leaves a record
//! naming who, how, what and the outcome (refusals too); a lock refuses deploys and
//! rollbacks with its reason, survives a restart, and only a deployer may take it.

use sentinel_e2e::fixture::one_commit_repo;
use sentinel_e2e::{Controller, Fleet, Value};

fn config(fleet: &Fleet) -> String {
    let c = fleet.certs.display();
    let repo = fleet.path("repo");
    one_commit_repo(&repo);
    let app = |env: &str, host: &str| {
        format!(
            "[apps.{env}]\nhost = \"{host}\"\napp_dir = \"{}\"\n",
            fleet.path(&format!("apps-{host}/ledger")).display()
        )
    };
    format!(
        "[signing]\nkey = \"{c}/signing.key\"\n\n[[apps]]\nname = \"ledger\"\nrepo = \"{}\"\n{}{}",
        repo.display(),
        app("staging", "tiny-1"),
        app("production", "tiny-2"),
    )
}

fn audit(controller: &Controller, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["audit", "--json"];
    all.extend_from_slice(args);
    let (code, out) = controller.cli(&all);
    assert_eq!(code, Some(0), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["records"].as_array().cloned().unwrap_or_default()
}

/// The newest record of `method` with outcome `ok` whose outcome text contains `says`.
fn find<'a>(records: &'a [Value], method: &str, ok: bool, says: &str) -> &'a Value {
    records
        .iter()
        .find(|r| {
            r["method"] == method
                && r["ok"] == ok
                && r["outcome"].as_str().unwrap_or_default().contains(says)
        })
        .unwrap_or_else(|| panic!("no {method} record with ok={ok} saying {says:?} in {records:?}"))
}

#[test]
fn locks_refuse_deploys_with_their_reason_and_every_write_is_in_the_audit_trail() {
    let fleet = Fleet::new(&["tiny-1", "tiny-2"]);
    fleet.issue_operator("ana", "deployer");
    fleet.issue_operator("vic", "viewer");
    let mut controller = fleet.start_controller(&config(&fleet));

    // A viewer may not lock; an unknown app and an empty reason are refused by name.
    let (code, out) = controller.cli_as("operator-vic", &["lock", "ledger", "--reason", "x"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("deployer"), "{out}");
    let (code, out) = controller.cli_as("operator-ana", &["lock", "nope", "--reason", "x"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("no app \"nope\""), "{out}");
    let (code, out) = controller.cli_as("operator-ana", &["lock", "ledger", "--reason", " "]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("reason"), "{out}");

    // A reason with a newline and an escape sequence is kept, and printed on one line.
    let reason = "moving the DB\n\u{1b}[31mrow forged";
    let (code, out) = controller.cli_as("operator-ana", &["lock", "ledger", "--reason", reason]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = controller.cli(&["locks"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains('\u{1b}'), "{out:?}");
    let line = out
        .lines()
        .find(|l| l.starts_with("ledger"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("ana") && line.contains("moving the DB"),
        "{out}"
    );
    assert!(!out.lines().any(|l| l.starts_with("row forged")), "{out}");

    // Deploys and rollbacks are refused, with the reason; a second lock names the holder.
    let refused = controller.grpcurl(
        Some(r#"{"app":"ledger","commit":"main"}"#),
        "sentinel.v1.FleetService/SubmitDeploy",
    );
    assert!(!refused.ok, "{}", refused.stdout);
    assert!(
        refused.stderr.contains("FailedPrecondition"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("moving the DB"),
        "{}",
        refused.stderr
    );
    let (code, out) = controller.cli(&["rollback", "ledger", "--env", "production"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("locked by ana"), "{out}");
    let (code, out) = controller.cli(&["lock", "ledger", "--reason", "mine now"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("locked by ana"), "{out}");

    // The lock survives a restart.
    controller.proc.signal("KILL");
    let _ = controller.proc.stop();
    let controller = fleet.start_controller_on(&controller.addr, &config(&fleet));
    let locks = controller
        .grpcurl(None, "sentinel.v1.FleetService/ListLocks")
        .json()
        .unwrap();
    assert_eq!(locks["locks"][0]["app"], "ledger", "{locks}");
    assert_eq!(locks["locks"][0]["reason"], reason, "{locks}");

    // Unlocked, the deploy goes.
    let (code, out) = controller.cli_as("operator-ana", &["unlock", "ledger"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("unlocked"), "{out}");
    let (code, out) = controller.cli_as("operator-ana", &["unlock", "ledger"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("not locked"), "{out}");
    let deploy = controller
        .grpcurl(
            Some(r#"{"app":"ledger","commit":"main","requested_by":"relay-bot"}"#),
            "sentinel.v1.FleetService/SubmitDeploy",
        )
        .json()
        .unwrap();
    let deploy_id = deploy["deployId"].as_str().unwrap().to_string();

    // Every write is there, across the restart, newest first, with who and the outcome.
    let records = audit(&controller, &[]);
    let ids: Vec<&str> = records.iter().filter_map(|r| r["id"].as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids, sorted, "newest first");
    let lock = find(&records, "LockApp", true, "locked");
    assert_eq!(lock["who"], "ana", "{lock}");
    assert!(
        lock["credential"]
            .as_str()
            .unwrap_or_default()
            .starts_with("operator certificate (deployer) from 127.0.0.1:"),
        "{lock}"
    );
    assert!(
        lock["what"].as_str().unwrap().contains("lock ledger"),
        "{lock}"
    );
    let unknown = find(&records, "LockApp", false, "NotFound");
    assert_eq!(unknown["what"], "lock nope: x", "{unknown}");
    find(&records, "LockApp", false, "InvalidArgument");
    find(&records, "LockApp", false, "AlreadyExists");
    let denied = find(&records, "LockApp", false, "PermissionDenied");
    assert_eq!(denied["who"], "vic", "{denied}");
    let refused = find(&records, "SubmitDeploy", false, "locked by ana");
    assert_eq!(refused["who"], "admin", "{refused}");
    find(&records, "Rollback", false, "locked by ana");
    find(&records, "UnlockApp", true, "unlocked");
    find(&records, "UnlockApp", false, "not locked");
    let made = find(&records, "SubmitDeploy", true, "deploy d-");
    assert!(
        made["what"].as_str().unwrap().contains("for relay-bot"),
        "{made}"
    );
    assert_eq!(made["outcome"], format!("deploy {deploy_id}"), "{made}");

    // Filters: by caller, and by time (a bad --since is a usage error).
    let ana = audit(&controller, &["--who", "ana"]);
    assert!(
        !ana.is_empty() && ana.iter().all(|r| r["who"] == "ana"),
        "{ana:?}"
    );
    assert!(audit(&controller, &["--since", "2099-01-01T00:00:00Z"]).is_empty());
    assert_eq!(audit(&controller, &["--since", "1h"]).len(), records.len());
    let (code, out) = controller.cli(&["audit", "--since", "last tuesday"]);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("last tuesday"), "{out}");
    // A viewer reads the trail (grpcurl, the API's own JSON).
    let as_viewer = controller.grpcurl_as(
        "operator-vic",
        &["-d", r#"{"who":"ana","limit":1}"#],
        "sentinel.v1.FleetService/ListAudit",
    );
    let v = as_viewer.json().unwrap();
    assert_eq!(v["records"].as_array().map(Vec::len), Some(1), "{v}");
}
