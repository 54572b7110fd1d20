//! The agent is the security boundary: it runs a job only when the signature verifies with a
//! trusted key, the job targets it, the time window is open, the nonce is fresh (across
//! restarts) and local policy allows it. These tests drive a real agent process from a
//! stand-in controller that can send anything.

use std::time::{Duration, SystemTime};

use ed25519_dalek::SigningKey;
use sentinel_e2e::fake_controller::FakeController;
use sentinel_e2e::{eventually, Fleet, Proc};
use sentinel_proto::envelope;
use sentinel_proto::time::timestamp;
use sentinel_proto::v1::{
    job_event, job_spec, BackupParams, DeployParams, JobEvent, JobKind, JobSpec, JobState,
    RefusalReason, RollbackParams, SignedJob,
};

struct World {
    fleet: Fleet,
    fake: FakeController,
    key: SigningKey,
}

fn world() -> World {
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa"]);
    let fake = FakeController::start(&fleet.certs);
    let key = sentinel::pki::load_signing_key(&fleet.certs.join("signing.key")).unwrap();
    World { fleet, fake, key }
}

impl World {
    fn start_agent(&self) -> Proc {
        let before = self.fake.connects("hub-alfa");
        let c = self.fleet.certs.display();
        let jobs = format!(
            "[collectors]\ndocker = false\n[jobs]\nstate_dir = \"{}\"\ntrusted_keys = [\"{c}/signing.pub\"]\nallowed_kinds = [\"deploy\", \"rollback\"]\napp_dirs = [\"{}\"]\n",
            self.fleet.path("state").display(),
            self.fleet.path("apps").display(),
        );
        let agent = self
            .fleet
            .start_agent("hub-alfa", "hub-alfa", &self.fake.addr, &jobs);
        eventually("the agent to connect", || {
            if self.fake.connects("hub-alfa") > before {
                Ok(())
            } else {
                Err("not yet".into())
            }
        });
        agent
    }

    fn app_dir(&self) -> String {
        self.fleet.path("apps/shop").display().to_string()
    }

    fn spec(&self, id: &str) -> JobSpec {
        let now = SystemTime::now();
        JobSpec {
            job_id: id.into(),
            target_host: "hub-alfa".into(),
            kind: JobKind::Rollback as i32,
            not_before: Some(timestamp(now - Duration::from_secs(1))),
            expires_at: Some(timestamp(now + Duration::from_secs(300))),
            nonce: id.as_bytes().iter().copied().cycle().take(16).collect(),
            key_id: String::new(),
            params: Some(job_spec::Params::Rollback(RollbackParams {
                app: "shop".into(),
                environment: "staging".into(),
                app_dir: self.app_dir(),
                compose_project: "shop-staging".into(),
                ..Default::default()
            })),
        }
    }

    fn refusal(&self, job: SignedJob, id: &str) -> (RefusalReason, String) {
        self.fake.send_job("hub-alfa", job);
        let ev = self.fake.wait_event(id, |e| {
            matches!(e.event, Some(job_event::Event::Refused(_)))
        });
        let Some(job_event::Event::Refused(r)) = ev.event else {
            unreachable!()
        };
        assert!(
            accepted(&self.fake.events(id)) == 0,
            "refused job {id} was also accepted"
        );
        (RefusalReason::try_from(r.reason).unwrap(), r.detail)
    }
}

fn accepted(events: &[JobEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e.event, Some(job_event::Event::Accepted(_))))
        .count()
}

#[test]
fn forged_foreign_expired_early_misaddressed_and_disallowed_jobs_are_refused_with_their_reason() {
    let w = world();
    let agent = w.start_agent();

    let mut forged = envelope::sign(w.spec("forged"), &w.key);
    let last = forged.spec.len() - 1;
    forged.spec[last] ^= 0x01;
    assert_eq!(w.refusal(forged, "forged").0, RefusalReason::BadSignature);

    let stranger = SigningKey::from_bytes(&[7u8; 32]);
    assert_eq!(
        w.refusal(envelope::sign(w.spec("foreign"), &stranger), "foreign")
            .0,
        RefusalReason::UnknownKey
    );

    let mut expired = w.spec("expired");
    expired.expires_at = Some(timestamp(SystemTime::now() - Duration::from_secs(120)));
    assert_eq!(
        w.refusal(envelope::sign(expired, &w.key), "expired").0,
        RefusalReason::Expired
    );

    let mut early = w.spec("early");
    early.not_before = Some(timestamp(SystemTime::now() + Duration::from_secs(600)));
    early.expires_at = Some(timestamp(SystemTime::now() + Duration::from_secs(900)));
    assert_eq!(
        w.refusal(envelope::sign(early, &w.key), "early").0,
        RefusalReason::NotYetValid
    );

    let mut elsewhere = w.spec("elsewhere");
    elsewhere.target_host = "prod-alfa".into();
    assert_eq!(
        w.refusal(envelope::sign(elsewhere, &w.key), "elsewhere").0,
        RefusalReason::WrongTarget
    );

    let mut backup = w.spec("backup");
    backup.kind = JobKind::Backup as i32;
    backup.params = Some(job_spec::Params::Backup(BackupParams::default()));
    let (reason, detail) = w.refusal(envelope::sign(backup, &w.key), "backup");
    assert_eq!(reason, RefusalReason::Policy);
    assert!(detail.contains("backup"), "{detail}");

    let mut outside = w.spec("outside");
    outside.params = Some(job_spec::Params::Rollback(RollbackParams {
        app_dir: "/etc/shop".into(),
        ..Default::default()
    }));
    let (reason, detail) = w.refusal(envelope::sign(outside, &w.key), "outside");
    assert_eq!(reason, RefusalReason::Policy);
    assert!(detail.contains("/etc/shop"), "{detail}");

    let log = agent.log_text();
    assert!(log.contains("job refused"), "{log}");
}

#[test]
fn a_replayed_job_is_refused_also_after_an_agent_restart() {
    let w = world();
    let mut agent = w.start_agent();
    let job = envelope::sign(w.spec("once"), &w.key);
    w.fake.send_job("hub-alfa", job.clone());
    // It runs (and fails: there is no release to roll back to) exactly once.
    w.fake.wait_event("once", |e| {
        matches!(e.event, Some(job_event::Event::Finished(_)))
    });

    w.fake.send_job("hub-alfa", job.clone());
    w.fake.wait_event("once", |e| matches!(&e.event, Some(job_event::Event::Refused(r)) if r.reason == RefusalReason::Replayed as i32));

    agent.stop();
    let _agent = w.start_agent();
    let refusals_before = w.fake.events("once").len();
    w.fake.send_job("hub-alfa", job);
    eventually("a second replay refusal after the restart", || {
        let refusals = w
            .fake
            .events("once")
            .iter()
            .filter(|e| matches!(&e.event, Some(job_event::Event::Refused(r)) if r.reason == RefusalReason::Replayed as i32))
            .count();
        if refusals >= 2 && w.fake.events("once").len() > refusals_before {
            Ok(())
        } else {
            Err(format!("{refusals}"))
        }
    });
    assert_eq!(
        accepted(&w.fake.events("once")),
        1,
        "the job ran more than once"
    );
}

#[test]
fn an_agent_killed_mid_job_reports_it_interrupted_once_and_never_runs_it_again() {
    let w = world();
    let agent = w.start_agent();
    let mut spec = w.spec("midway");
    spec.kind = JobKind::Deploy as i32;
    // The stand-in never serves this bundle, so the job stays in its first step.
    spec.params = Some(job_spec::Params::Deploy(DeployParams {
        app: "shop".into(),
        environment: "staging".into(),
        commit: "abc123".into(),
        bundle_sha256: "ab".repeat(32),
        bundle_size: 1000,
        app_dir: w.app_dir(),
        compose_file: "docker-compose.yml".into(),
        compose_project: "shop-staging".into(),
        keep_releases: 5,
        ..Default::default()
    }));
    let job = envelope::sign(spec, &w.key);
    w.fake.send_job("hub-alfa", job.clone());
    w.fake.wait_event("midway", |e| {
        matches!(e.event, Some(job_event::Event::Accepted(_)))
    });
    agent.signal("KILL");
    drop(agent);

    let _agent = w.start_agent();
    let ev = w.fake.wait_event("midway", |e| {
        matches!(e.event, Some(job_event::Event::Finished(_)))
    });
    let Some(job_event::Event::Finished(f)) = ev.event else {
        unreachable!()
    };
    assert_eq!(f.state, JobState::Interrupted as i32, "{f:?}");
    assert!(f.detail.contains("will not be run again"), "{}", f.detail);

    // The controller sending it again (as it does after reconnects) does not run it.
    w.fake.send_job("hub-alfa", job);
    w.fake.wait_event("midway", |e| matches!(&e.event, Some(job_event::Event::Refused(r)) if r.reason == RefusalReason::Replayed as i32));
    assert_eq!(accepted(&w.fake.events("midway")), 1);
    let finished = w
        .fake
        .events("midway")
        .iter()
        .filter(|e| matches!(&e.event, Some(job_event::Event::Finished(f)) if f.state == JobState::Interrupted as i32))
        .count();
    assert!(finished >= 1);
}
