//! Backups end to end: a real PostgreSQL cluster with data, the real pg_dump, pg_dumpall,
//! pg_restore and rsync, a backup agent ("argus") and a controller, driven through grpcurl and
//! the `sentinel backups` CLI. Clocks: retention runs on a simulated clock that the job carries
//! and the agent accepts only because its config allows it; the schedule test uses the real
//! clock and a fixed-offset time zone chosen so that 02:00 falls inside the test.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sentinel_e2e::backups::{
    age_keys, assert_state, backup_report, flag, sha256, strings, world, Options, World,
    AGE_HEADER, BACKUP_PASSWORD, CUSTOMERS, INVOICES, ORDERS,
};
use sentinel_e2e::fixture::{served, Variant};
use sentinel_e2e::postgres;
use sentinel_e2e::{bin, check_agent_config, eventually, eventually_within, run, Fleet, Value};

#[test]
fn a_backup_with_data_is_verified_and_restore_tested_with_equal_row_counts() {
    let offsite = tempfile::tempdir().unwrap();
    let w = world(Options {
        offsite: Some(offsite.path().display().to_string()),
        everything: true,
        ..Default::default()
    });
    let job = w.run("RunBackup", r#"{"reason":"first"}"#);
    assert_state(&job, "JOB_STATE_SUCCEEDED");
    let text = job.to_string();
    assert!(
        !text.contains(BACKUP_PASSWORD),
        "the password leaked into the job: {text}"
    );

    // The dump, the globals, the files tar and the run's manifest are in place.
    let dump = w.newest_dump();
    let entry = w.entry_for(&dump);
    assert_eq!(entry["sha256"], sha256(&dump).as_str());
    assert_eq!(entry["size"], std::fs::metadata(&dump).unwrap().len());
    assert!(
        entry["tool_version"]
            .as_str()
            .unwrap()
            .contains("pg_dump (PostgreSQL)"),
        "{entry}"
    );
    assert_eq!(entry["row_counts"]["public.customers"], CUSTOMERS);
    assert_eq!(entry["row_counts"]["public.orders"], ORDERS);
    assert_eq!(entry["row_counts"]["billing.invoices"], INVOICES);
    let manifests = w.manifests();
    let manifest = &manifests[0];
    let kinds: BTreeSet<&str> = manifest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["database", "globals", "files"]),
        "{manifest}"
    );
    let globals = manifest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "globals")
        .unwrap();
    let globals_sql =
        std::fs::read_to_string(w.backup_dir.join(globals["file"].as_str().unwrap())).unwrap();
    assert!(
        globals_sql.contains("CREATE ROLE backup_ro"),
        "{globals_sql}"
    );
    assert!(
        !globals_sql.contains("SCRAM-SHA-256"),
        "role passwords were dumped"
    );
    let files = manifest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "files")
        .unwrap();
    let listing = run(Command::new("tar")
        .arg("-tf")
        .arg(w.backup_dir.join(files["file"].as_str().unwrap())));
    let listing = String::from_utf8_lossy(&listing.stdout).to_string();
    assert!(listing.contains("secrets/production.env"), "{listing}");
    // pg_dump's own reader agrees it is a custom-format archive of our tables.
    let toc = run(Command::new(postgres::bin_dir().join("pg_restore"))
        .arg("--list")
        .arg(&dump));
    assert!(String::from_utf8_lossy(&toc.stdout).contains("TABLE DATA billing invoices"));

    // The offsite copy is byte for byte the same.
    let rel = dump.strip_prefix(&w.backup_dir).unwrap();
    assert_eq!(sha256(&offsite.path().join(rel)), sha256(&dump));
    assert!(offsite.path().join("manifests").read_dir().unwrap().count() >= 1);

    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_SUCCEEDED");
    assert!(
        verify["detail"]
            .as_str()
            .unwrap()
            .contains("checked 3 file(s)"),
        "{verify}"
    );

    let restore = w.run("RunRestoreTest", "{}");
    assert_state(&restore, "JOB_STATE_SUCCEEDED");
    // The scratch database is gone again.
    let left =
        w.pg.sql("SELECT count(*) FROM pg_database WHERE datname LIKE 'sentinel_restore_%'");
    assert_eq!(left, "0");

    let shop = w.shop();
    assert_eq!(shop["kept"], 1, "{shop}");
    assert_eq!(shop["lastVerifyOk"], true, "{shop}");
    assert_eq!(shop["lastRestoreTestOk"], true, "{shop}");
    let detail = shop["lastRestoreTestDetail"].as_str().unwrap();
    assert!(
        detail.contains("3 table(s) match the manifest") && detail.contains("3 invariant(s) hold"),
        "{detail}"
    );
    assert!(
        shop["newestGoodAgeSeconds"].as_f64().unwrap() < 600.0,
        "{shop}"
    );
    assert_eq!(shop["newestGoodSha256"], sha256(&dump).as_str());

    // The operator CLI shows the same, and follows a run to its end.
    let (ok, text) = w.cli(&["backups", "list"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("production/shop_prod")
            && text.contains("files")
            && text.contains("globals (backup_ro)"),
        "{text}"
    );
    let (ok, text) = w.cli(&["backups", "verify", "--wait"]);
    assert!(
        ok && text.contains("verify") && text.contains("succeeded"),
        "{text}"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn an_encrypted_backup_is_unreadable_as_plaintext_yet_verifies_and_restores_with_equal_row_counts()
{
    let keys = tempfile::tempdir().unwrap();
    let offsite = tempfile::tempdir().unwrap();
    let w = world(Options {
        offsite: Some(offsite.path().display().to_string()),
        everything: true,
        encryption: Some(age_keys(keys.path(), true)),
        ..Default::default()
    });
    let job = w.run("RunBackup", r#"{"reason":"encrypted"}"#);
    assert_state(&job, "JOB_STATE_SUCCEEDED");

    // Every file of the run is an age file, recorded as such, hashed as stored, and copied
    // offsite as the same ciphertext.
    let manifests = w.manifests();
    let entries = manifests[0]["entries"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 3, "{entries:?}");
    for e in &entries {
        let file = e["file"].as_str().unwrap();
        assert!(file.ends_with(".age"), "{e}");
        assert_eq!(e["encrypted"], true, "{e}");
        let path = w.backup_dir.join(file);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(AGE_HEADER), "{file} is not an age file");
        assert_eq!(e["sha256"], sha256(&path).as_str(), "{e}");
        assert_eq!(e["size"], bytes.len(), "{e}");
        assert_eq!(sha256(&offsite.path().join(file)), sha256(&path), "{file}");
    }
    // Nothing in them reads as plaintext: not a custom-format archive, no role, no secret.
    let dump = w.newest_dump();
    let bytes = std::fs::read(&dump).unwrap();
    assert!(!contains(&bytes, b"PGDMP"), "the dump is readable");
    let toc = run(Command::new(postgres::bin_dir().join("pg_restore"))
        .arg("--list")
        .arg(&dump));
    assert!(
        !toc.status.success(),
        "pg_restore read the encrypted dump: {}",
        String::from_utf8_lossy(&toc.stdout)
    );
    for e in &entries {
        let bytes = std::fs::read(w.backup_dir.join(e["file"].as_str().unwrap())).unwrap();
        for plain in [
            &b"CREATE ROLE"[..],
            b"backup_ro",
            b"DB_PASSWORD",
            b"customer 1",
        ] {
            assert!(!contains(&bytes, plain), "{} holds {plain:?}", e["file"]);
        }
    }
    // No plaintext left behind in the temp dir either.
    assert!(!w.backup_dir.join(".tmp").exists());
    // The row counts are still recorded (counted in the dump's snapshot).
    let entry = w.entry_for(&dump);
    assert_eq!(entry["row_counts"]["public.customers"], CUSTOMERS);
    assert_eq!(entry["row_counts"]["public.orders"], ORDERS);
    assert_eq!(entry["row_counts"]["billing.invoices"], INVOICES);

    // Verify decrypts the dump into pg_restore --list; nothing is checked by hash alone.
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_SUCCEEDED");
    let detail = verify["detail"].as_str().unwrap();
    assert!(
        detail.contains("checked 3 file(s)") && !detail.contains("only"),
        "{detail}"
    );
    // The restore test decrypts into pg_restore and finds the manifest's row counts.
    let restore = w.run("RunRestoreTest", "{}");
    assert_state(&restore, "JOB_STATE_SUCCEEDED");
    let shop = w.shop();
    assert_eq!(shop["lastVerifyOk"], true, "{shop}");
    assert_eq!(shop["lastRestoreTestOk"], true, "{shop}");
    let detail = shop["lastRestoreTestDetail"].as_str().unwrap();
    assert!(detail.contains("3 table(s) match the manifest"), "{detail}");
    let left =
        w.pg.sql("SELECT count(*) FROM pg_database WHERE datname LIKE 'sentinel_restore_%'");
    assert_eq!(left, "0");
}

#[test]
fn a_plaintext_dump_planted_where_an_encrypted_one_belongs_is_reported_by_verify() {
    let keys = tempfile::tempdir().unwrap();
    let w = world(Options {
        encryption: Some(age_keys(keys.path(), true)),
        ..Default::default()
    });
    assert_state(&w.backup_at("2026-03-01T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.backup_at("2026-03-02T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.run("VerifyBackups", "{}"), "JOB_STATE_SUCCEEDED");

    // A perfectly good plaintext dump of the same database under the newest encrypted name,
    // with its manifest entry's sha256 and size made to match: only the header gives it away.
    let newest = w.newest_dump();
    let out = run(Command::new(postgres::bin_dir().join("pg_dump"))
        .arg("--format=custom")
        .arg(format!("--file={}", newest.display()))
        .arg(format!(
            "--dbname={}",
            w.pg.dsn_without_password("backup_ro", "shop_prod")
        ))
        .env("PGPASSWORD", BACKUP_PASSWORD));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rel = newest
        .strip_prefix(&w.backup_dir)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let manifests = w.backup_dir.join("manifests");
    for m in std::fs::read_dir(&manifests).unwrap().flatten() {
        let mut json: Value = serde_json::from_slice(&std::fs::read(m.path()).unwrap()).unwrap();
        let mut changed = false;
        for e in json["entries"].as_array_mut().unwrap() {
            if e["file"] == rel.as_str() {
                e["sha256"] = sha256(&newest).into();
                e["size"] = std::fs::metadata(&newest).unwrap().len().into();
                changed = true;
            }
        }
        if changed {
            std::fs::write(m.path(), serde_json::to_vec_pretty(&json).unwrap()).unwrap();
        }
    }
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_FAILED");
    let detail = verify["detail"].as_str().unwrap();
    assert!(
        detail.contains("shop_prod-20260302T020000Z.dump.age")
            && detail.contains("should be encrypted but is not")
            && !detail.contains("sha256 mismatch"),
        "{detail}"
    );
    let shop = w.shop();
    assert_eq!(shop["damaged"], 1, "{shop}");
    assert!(
        shop["newestGoodFile"]
            .as_str()
            .unwrap()
            .ends_with("shop_prod-20260301T020000Z.dump.age"),
        "{shop}"
    );
}

#[test]
fn without_an_identity_verify_checks_hashes_only_and_says_so_and_the_restore_test_fails() {
    let keys = tempfile::tempdir().unwrap();
    let w = world(Options {
        encryption: Some(age_keys(keys.path(), false)),
        ..Default::default()
    });
    assert_state(&w.run("RunBackup", "{}"), "JOB_STATE_SUCCEEDED");
    assert!(std::fs::read(w.newest_dump())
        .unwrap()
        .starts_with(AGE_HEADER));
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_SUCCEEDED");
    let detail = verify["detail"].as_str().unwrap();
    assert!(
        detail.contains("1 encrypted file(s) checked by sha256 and age header only")
            && detail.contains("identity_file"),
        "{detail}"
    );
    let restore = w.run("RunRestoreTest", "{}");
    assert_state(&restore, "JOB_STATE_FAILED");
    let detail = restore["detail"].as_str().unwrap();
    assert!(
        detail.contains("no identity to decrypt it") && detail.contains("identity_file"),
        "{detail}"
    );
}

#[test]
fn a_bad_recipient_or_identity_in_the_agent_config_stops_the_agent_at_start_naming_the_line() {
    use hostagent::jobs::backup::encryption::generate_key_pair;
    let fleet = Fleet::new(&["argus"]);
    let backups = fleet.path("backups");
    let (_, good) = generate_key_pair();
    let config_with = |encryption: &str| {
        let toml = format!(
            "[jobs]\nallowed_kinds = [\"backup\"]\n[jobs.backups]\nbackup_dirs = [\"{}\"]\n\
             [jobs.backups.encryption]\n{encryption}",
            backups.display()
        );
        fleet.write_agent_config("argus", "argus", "127.0.0.1:9", &toml)
    };
    // Which line of the written config holds `key`.
    let line_of = |config: &Path, key: &str| {
        std::fs::read_to_string(config)
            .unwrap()
            .lines()
            .position(|l| l.starts_with(key))
            .map(|i| i + 1)
            .unwrap()
    };

    let config = config_with(&format!("recipients = [\"{good}\", \"age1notakey\"]\n"));
    let line = line_of(&config, "recipients");
    let (code, err) = check_agent_config(&config);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains(&format!("{}:{line}:", config.display()))
            && err.contains("jobs.backups.encryption.recipients[1]")
            && err.contains("age1notakey"),
        "{err}"
    );
    // Started for real, the agent stops at once the same way, having written nothing.
    let mut agent = Command::new(bin("hostagent"))
        .arg("--config")
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = eventually("the agent to refuse its config", || {
        agent
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "still running".to_string())
    });
    if status.code().is_none() {
        let _ = agent.kill();
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut agent.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(
        err.contains("jobs.backups.encryption.recipients[1]"),
        "{err}"
    );
    assert!(!backups.exists());

    let missing = fleet.path("no-such-identity.txt");
    let config = config_with(&format!(
        "recipients = [\"{good}\"]\nidentity_file = \"{}\"\n",
        missing.display()
    ));
    let line = line_of(&config, "identity_file");
    let (code, err) = check_agent_config(&config);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains(&format!("{}:{line}:", config.display()))
            && err.contains("identity_file")
            && err.contains("no-such-identity.txt"),
        "{err}"
    );

    // An identity that belongs to none of the recipients could never read a backup.
    let (stranger, _) = generate_key_pair();
    let identity = fleet.path("stranger.txt");
    std::fs::write(&identity, format!("{stranger}\n")).unwrap();
    let config = config_with(&format!(
        "recipients = [\"{good}\"]\nidentity_file = \"{}\"\n",
        identity.display()
    ));
    let (code, err) = check_agent_config(&config);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("none of its identities belongs to a recipient") && !err.contains(&stranger),
        "{err}"
    );
}

/// The set of backups (as UTC stamps) the policy 7 daily + 4 weekly, minimum 3, keeps at
/// `now` out of `taken` (unix seconds), worked out with the `time` crate (the agent uses jiff).
fn expected_kept(taken: &[i64], now: i64) -> BTreeSet<String> {
    use std::collections::BTreeMap;
    use time::OffsetDateTime;
    let date = |t: i64| OffsetDateTime::from_unix_timestamp(t).unwrap().date();
    let today = date(now);
    let mut newest_day: BTreeMap<i32, i64> = BTreeMap::new();
    let mut newest_week: BTreeMap<(i32, u8), i64> = BTreeMap::new();
    let weeks: Vec<(i32, u8)> = (0..4)
        .map(|k| {
            let d = today - time::Duration::days(7 * k);
            let (y, w, _) = d.to_iso_week_date();
            (y, w)
        })
        .collect();
    for &t in taken.iter().filter(|&&t| t <= now) {
        let d = date(t);
        let age_days = today.to_julian_day() - d.to_julian_day();
        if age_days < 7 {
            let e = newest_day.entry(d.to_julian_day()).or_insert(t);
            *e = (*e).max(t);
        }
        let (y, w, _) = d.to_iso_week_date();
        if weeks.contains(&(y, w)) {
            let e = newest_week.entry((y, w)).or_insert(t);
            *e = (*e).max(t);
        }
    }
    let mut kept: BTreeSet<i64> = newest_day
        .values()
        .chain(newest_week.values())
        .copied()
        .collect();
    let mut newest_first: Vec<i64> = taken.iter().copied().filter(|&t| t <= now).collect();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    for t in newest_first {
        if kept.len() >= 3 {
            break;
        }
        kept.insert(t);
    }
    kept.into_iter().map(stamp).collect()
}

fn stamp(t: i64) -> String {
    let d = time::OffsetDateTime::from_unix_timestamp(t).unwrap();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        d.year(),
        u8::from(d.month()),
        d.day(),
        d.hour(),
        d.minute(),
        d.second()
    )
}

fn rfc3339(t: i64) -> String {
    let s = stamp(t);
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    )
}

#[test]
fn retention_over_sixty_simulated_nights_keeps_exactly_what_the_policy_names() {
    let w = world(Options::default());
    // Nightly at 02:00 UTC from Thursday 2026-01-01, plus an afternoon backup every ninth day
    // (a pre-deploy one, say), which then is that day's newest.
    let start = 1_767_232_800; // 2026-01-01T02:00:00Z
    let mut taken = Vec::new();
    let mut runs = Vec::new();
    for night in 0..60i64 {
        runs.push(start + night * 86_400);
        if night % 9 == 4 {
            runs.push(start + night * 86_400 + 12 * 3600 + 17 * 60);
        }
    }
    for t in runs {
        let job = w.backup_at(&rfc3339(t));
        assert_state(&job, "JOB_STATE_SUCCEEDED");
        taken.push(t);
        assert_eq!(
            w.dumps(),
            expected_kept(&taken, t),
            "after the run at {}",
            rfc3339(t)
        );
    }
    // 7 days + the newest of 3 earlier ISO weeks, and nothing else: no orphaned manifest.
    let kept = w.dumps();
    assert_eq!(kept.len(), 10, "{kept:?}");
    let listed: BTreeSet<String> = w
        .manifests()
        .iter()
        .flat_map(|m| m["entries"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["pruned_at"].is_null())
        .map(|e| e["file"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed.len(), kept.len(), "{listed:?}");
    assert_eq!(
        w.manifests().len(),
        kept.len(),
        "manifests whose files all went should go too"
    );
    assert_eq!(w.shop()["kept"], 10);
}

#[test]
fn a_corrupted_byte_is_caught_by_verify_and_a_truncated_dump_fails_the_restore_test() {
    let w = world(Options::default());
    assert_state(&w.backup_at("2026-03-01T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.backup_at("2026-03-02T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.run("VerifyBackups", "{}"), "JOB_STATE_SUCCEEDED");

    // One flipped byte in the middle of the newest dump.
    let newest = w.newest_dump();
    let mut bytes = std::fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&newest, &bytes).unwrap();
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_FAILED");
    let detail = verify["detail"].as_str().unwrap();
    assert!(
        detail.contains("shop_prod-20260302T020000Z.dump") && detail.contains("sha256 mismatch"),
        "{detail}"
    );
    let shop = w.shop();
    assert!(!flag(&shop["lastVerifyOk"]), "{shop}");
    assert_eq!(shop["damaged"], 1, "{shop}");
    // The newest *good* backup is now the older one.
    assert!(
        shop["newestGoodFile"]
            .as_str()
            .unwrap()
            .ends_with("shop_prod-20260301T020000Z.dump"),
        "{shop}"
    );

    // The restore test takes the newest good dump; cut it in half.
    let older = w
        .backup_dir
        .join("production/shop_prod/shop_prod-20260301T020000Z.dump");
    let len = std::fs::metadata(&older).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&older)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let restore = w.run("RunRestoreTest", "{}");
    assert_state(&restore, "JOB_STATE_FAILED");
    let detail = restore["detail"].as_str().unwrap();
    assert!(
        detail.contains("pg_restore failed"),
        "the restore itself must fail: {detail}"
    );
    assert!(
        detail.contains("size"),
        "and the file check says why: {detail}"
    );
    let shop = w.shop();
    assert!(!flag(&shop["lastRestoreTestOk"]), "{shop}");
    let left =
        w.pg.sql("SELECT count(*) FROM pg_database WHERE datname LIKE 'sentinel_restore_%'");
    assert_eq!(
        left, "0",
        "the scratch database is dropped after a failed restore too"
    );
}

#[test]
fn a_wrong_password_fails_the_backup_with_a_clear_error_and_prunes_nothing() {
    let w = world(Options {
        retention: "daily = 1\nweekly = 0\nminimum = 1\n",
        ..Default::default()
    });
    assert_state(&w.backup_at("2026-05-01T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.backup_at("2026-05-02T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    let before = w.dumps();
    assert_eq!(
        before,
        BTreeSet::from(["20260502T020000Z".to_string()]),
        "daily = 1 keeps one"
    );

    std::fs::write(&w.password_file, "not-the-password\n").unwrap();
    let job = w.backup_at("2026-05-03T02:00:00Z");
    assert_state(&job, "JOB_STATE_FAILED");
    let detail = job["detail"].as_str().unwrap();
    assert!(
        detail.contains("production/shop_prod")
            && detail.contains("password authentication failed for user \"backup_ro\""),
        "{detail}"
    );
    assert!(detail.contains("nothing of it was pruned"), "{detail}");
    assert!(
        !job.to_string().contains("not-the-password"),
        "the (wrong) password leaked: {job}"
    );
    assert_eq!(w.dumps(), before, "a failed backup prunes nothing");
    let shop = w.shop();
    assert!(
        shop["lastError"]
            .as_str()
            .unwrap()
            .contains("password authentication failed"),
        "{shop}"
    );
    assert!(
        shop["newestGoodFile"]
            .as_str()
            .unwrap()
            .contains("20260502T020000Z"),
        "{shop}"
    );

    std::fs::write(&w.password_file, format!("{BACKUP_PASSWORD}\n")).unwrap();
    assert_state(&w.backup_at("2026-05-04T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_eq!(w.dumps(), BTreeSet::from(["20260504T020000Z".to_string()]));
    assert_eq!(w.shop()["lastError"], Value::Null, "{}", w.shop());
}

#[test]
fn an_offsite_target_that_is_down_leaves_local_backups_intact_and_is_caught_up_next_run() {
    // Reserved, not bound: nothing listens there until the test starts the daemon.
    let reserved = sentinel_e2e::ports::reserve();
    let port = reserved.get();
    let target = format!("rsync://127.0.0.1:{port}/offsite");
    let w = world(Options {
        offsite: Some(target.clone()),
        ..Default::default()
    });
    // Nothing listens yet: the copy fails, the backup does not.
    let first = w.backup_at("2026-06-01T02:00:00Z");
    assert_state(&first, "JOB_STATE_SUCCEEDED");
    let detail = first["detail"].as_str().unwrap();
    assert!(
        detail.contains("offsite copy FAILED") && detail.contains("retried at the next run"),
        "{detail}"
    );
    let dump = w.newest_dump();
    assert_eq!(
        w.entry_for(&dump)["sha256"],
        sha256(&dump).as_str(),
        "the local backup is intact"
    );
    let list = w.list();
    assert!(
        list["offsitePending"].as_u64().unwrap() >= 2,
        "dump and manifest pending: {list}"
    );
    assert!(
        list["offsiteError"].as_str().unwrap().contains("rsync"),
        "{list}"
    );

    // The target comes back; the next run copies both runs' files and checks them.
    let remote = w.fleet.path("offsite");
    std::fs::create_dir_all(&remote).unwrap();
    let _daemon = w.rsync_daemon(port, &remote);
    let second = w.backup_at("2026-06-02T02:00:00Z");
    assert_state(&second, "JOB_STATE_SUCCEEDED");
    let detail = second["detail"].as_str().unwrap();
    assert!(detail.contains("file(s) copied and checked"), "{detail}");
    for stamp in ["20260601T020000Z", "20260602T020000Z"] {
        let rel = format!("production/shop_prod/shop_prod-{stamp}.dump");
        assert_eq!(
            sha256(&remote.join(&rel)),
            sha256(&w.backup_dir.join(&rel)),
            "{rel}"
        );
        assert!(remote.join(format!("manifests/{stamp}.json")).exists());
    }
    let list = w.list();
    assert_eq!(
        list["offsitePending"],
        Value::Null,
        "nothing pending (0 is omitted): {list}"
    );
    assert_eq!(list["offsiteError"], Value::Null, "{list}");
}

/// A fixed UTC offset ("+HH:MM") in which `t` (unix seconds, on a minute) is 02:00.
fn zone_where_two_oclock_is(t: i64) -> String {
    let minute_of_day = (t.rem_euclid(86_400) / 60) as i32;
    let mut offset = (120 - minute_of_day).rem_euclid(1440);
    if offset > 720 {
        offset -= 1440;
    }
    let sign = if offset < 0 { '-' } else { '+' };
    format!("{sign}{:02}:{:02}", offset.abs() / 60, offset.abs() % 60)
}

#[test]
fn the_controller_down_over_two_oclock_runs_the_missed_backup_once_when_it_returns() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // 02:00 in the chosen zone is the next whole minute at least 25 s away; 02:01 (verify)
    // follows a minute later, while the controller is up again.
    let two = (now + 25 + 59) / 60 * 60;
    let zone = zone_where_two_oclock_is(two);
    let mut w = world(Options {
        time_zone: zone,
        schedule: "backup = \"0 2 * * *\"\nverify = \"1 2 * * *\"\nrestore_test = \"\"\n".into(),
        ..Default::default()
    });
    // The first start only starts counting (nothing is owed on a new install), and that is
    // not a run: LAST RUN stays empty.
    eventually("the schedule to start counting", || {
        let list = w.list();
        let s = list["schedules"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "backup").cloned());
        match s {
            Some(s)
                if s["lastOutcome"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("not run yet")) =>
            {
                assert!(s["lastRunAt"].is_null(), "{s}");
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });
    let (ok, text) = w.cli(&["backups", "list"]);
    let row = text
        .lines()
        .find(|l| l.starts_with("backup "))
        .unwrap_or_else(|| panic!("no backup schedule row in {text}"));
    assert!(
        ok && row.contains("never"),
        "LAST RUN before any run: {text}"
    );
    assert!(w.scheduled_jobs("backup").is_empty());
    w.controller.proc.stop();

    // Down over 02:00.
    while (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64)
        < two + 2
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    // On the address the first run got: the agent knows no other.
    w.controller = w
        .fleet
        .start_controller_on(&w.controller.addr, &w.controller_toml);
    let job = eventually("the missed backup to run", || {
        let jobs = w.scheduled_jobs("backup");
        jobs.into_iter()
            .next()
            .ok_or_else(|| "no scheduled backup yet".to_string())
    });
    let by = job["requestedBy"].as_str().unwrap();
    assert!(
        by.contains("02:00:00") && by.contains("missed while the controller was down"),
        "{by}"
    );
    let done = w.wait_job(job["jobId"].as_str().unwrap());
    assert_state(&done, "JOB_STATE_SUCCEEDED");
    assert_eq!(w.dumps().len(), 1);

    // Up at 02:01: the verify fires on time; the backup did not run a second time.
    let verify = eventually_within(Duration::from_secs(120), "the 02:01 verify", || {
        w.scheduled_jobs("verify")
            .into_iter()
            .next()
            .ok_or_else(|| "not yet".to_string())
    });
    assert!(
        !verify["requestedBy"].as_str().unwrap().contains("missed"),
        "{verify}"
    );
    assert_state(
        &w.wait_job(verify["jobId"].as_str().unwrap()),
        "JOB_STATE_SUCCEEDED",
    );
    assert_eq!(
        w.scheduled_jobs("backup").len(),
        1,
        "the missed backup ran exactly once"
    );
    let list = w.list();
    let backup = list["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "backup")
        .unwrap()
        .clone();
    assert_eq!(backup["lastRunAt"], rfc3339(two).as_str(), "{backup}");
    assert_eq!(
        backup["nextRunAt"],
        rfc3339(two + 86_400).as_str(),
        "{backup}"
    );
    assert_eq!(backup["lastOutcome"], "succeeded", "{backup}");
}

/// Benchmark, not a test: backup jobs of a database of `SENTINEL_BENCH_BACKUP_MIB` MiB
/// (default 256) against plain `pg_dump --format=custom` to a file (same role, same cluster,
/// pg_dump's own fsync), first as the agent stores them, then encrypted with age; each pair
/// `SENTINEL_BENCH_RUNS` times (default 3), interleaved, medians reported. Run by
/// `tests/bench/6-backup-throughput.sh` (release binaries):
/// `cargo test --release -p sentinel-e2e --test backups -- --ignored --nocapture backup_throughput`
#[test]
#[ignore]
fn backup_throughput_against_plain_pg_dump() {
    let env_num = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let mib = env_num("SENTINEL_BENCH_BACKUP_MIB", 256);
    let runs = env_num("SENTINEL_BENCH_RUNS", 3).max(1) as usize;
    let mut w = world(Options::default());
    // ~0.5 KiB rows of random hex text (compresses about 2:1, like real text columns).
    let rows = mib * 2048;
    let filled = std::time::Instant::now();
    w.pg.sql_on(
        "shop_prod",
        &format!(
            "CREATE TABLE bulk (id bigint PRIMARY KEY, body text);
             INSERT INTO bulk SELECT g, md5(random()::text) || md5(random()::text) || md5(random()::text)
               || md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
               || md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
               || md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
               || md5(random()::text) FROM generate_series(1, {rows}) g;
             VACUUM ANALYZE bulk;
             CHECKPOINT;"
        ),
    );
    let size: i64 =
        w.pg.sql("SELECT pg_database_size('shop_prod')")
            .parse()
            .unwrap();
    let db_mib = size as f64 / 1048576.0;
    eprintln!(
        "filled {db_mib:.0} MiB (pg_database_size) in {:.1?}",
        filled.elapsed()
    );

    let plain_file = w.fleet.path("plain.dump");
    let dsn = w.pg.dsn_without_password("backup_ro", "shop_prod");
    let plain_dump = || {
        let _ = std::fs::remove_file(&plain_file);
        let started = std::time::Instant::now();
        let out = run(Command::new(postgres::bin_dir().join("pg_dump"))
            .arg("--format=custom")
            .arg(format!("--file={}", plain_file.display()))
            .arg(format!("--dbname={dsn}"))
            .env("PGPASSWORD", BACKUP_PASSWORD));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed().as_secs_f64()
    };
    // (dump step, whole job) in seconds, and the dump's size.
    let job = |w: &World| {
        let started = std::time::Instant::now();
        let job = w.run("RunBackup", r#"{"reason":"benchmark"}"#);
        let whole = started.elapsed().as_secs_f64();
        assert_state(&job, "JOB_STATE_SUCCEEDED");
        let step_ms = job["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.get("step"))
            .find(|s| {
                s["name"] == "dump production/shop_prod" && s["status"] == "STEP_STATUS_SUCCEEDED"
            })
            .and_then(|s| s["durationMs"].as_str().and_then(|v| v.parse::<f64>().ok()))
            .expect("the dump step's duration");
        let bytes = std::fs::metadata(w.newest_dump()).unwrap().len();
        (step_ms / 1000.0, whole, bytes)
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut table = String::new();
    let mut measure = |w: &World, label: &str| {
        let (mut plain, mut step, mut whole, mut bytes) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for i in 0..runs {
            plain.push(plain_dump());
            let (s, j, b) = job(w);
            step.push(s);
            whole.push(j);
            bytes = b;
            eprintln!(
                "{label} run {}: plain pg_dump {:.1} s, dump step {:.1} s, whole job {:.1} s",
                i + 1,
                plain[i],
                s,
                j
            );
        }
        let (p, s, j) = (median(plain), median(step), median(whole));
        table.push_str(&format!(
            "| {label} | {:.0} MiB | {p:.1} s ({:.1} MiB/s) | {s:.1} s ({:.1} MiB/s) | {:+.1} % | {j:.1} s | {:+.1} % |\n",
            bytes as f64 / 1048576.0,
            db_mib / p,
            db_mib / s,
            (s / p - 1.0) * 100.0,
            (j / p - 1.0) * 100.0,
        ));
    };
    measure(&w, "stored as written");
    let keys = tempfile::tempdir().unwrap();
    w.restart_agent(&format!(
        "[jobs.backups.encryption]\n{}",
        age_keys(keys.path(), true)
    ));
    measure(&w, "encrypted (age)");
    println!(
        "\ndatabase {db_mib:.0} MiB, plain pg_dump file {:.0} MiB, medians of {runs} run(s)\n\n\
         | backup | file | plain pg_dump to a file | backup job's dump step (dump, row counts, \
         sha256, fsync) | step vs plain | whole job (API to final state) | job vs plain |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n{table}",
        std::fs::metadata(&plain_file).unwrap().len() as f64 / 1048576.0,
    );
}

#[test]
fn a_db_change_deploy_backs_up_the_apps_production_database_first_and_does_not_migrate_when_that_fails(
) {
    let w = world(Options {
        with_app: true,
        ..Default::default()
    });
    let app = w.app.as_ref().unwrap();
    let v1 = app.repo.commit(&app.app, "v1", Variant::Healthy, |_| {});
    let v2 = app.repo.commit(&app.app, "v2", Variant::Healthy, |_| {});

    let d = w.deploy_db_change(&v1);
    assert_eq!(d["state"], "DEPLOYMENT_STATE_SUCCEEDED", "{d}");
    let steps = d["steps"].as_array().unwrap();
    let at = |name: &str, env: &str| {
        steps
            .iter()
            .position(|s| s["name"] == name && s["environment"] == env)
    };
    let backup = at("backup", "production").expect("a backup step");
    assert!(
        backup < at("deploy", "production").unwrap(),
        "backed up before production: {d}"
    );
    assert_eq!(steps[backup]["host"], "argus");
    assert!(steps[backup]["jobId"].is_string(), "{d}");
    // The dump is of this app's production database, taken for this deploy.
    let manifests = w.manifests();
    assert_eq!(manifests.len(), 1);
    assert!(
        manifests[0]["reason"]
            .as_str()
            .unwrap()
            .contains(d["deployId"].as_str().unwrap()),
        "{}",
        manifests[0]
    );
    assert_eq!(manifests[0]["entries"][0]["database"], "shop_prod");
    assert!(served(app.production_port).contains("version v1"));
    let job = w.wait_job(
        steps[at("deploy", "production").unwrap()]["jobId"]
            .as_str()
            .unwrap(),
    );
    assert!(
        job.to_string().contains("migrating the schema"),
        "the migration ran after the backup: {job}"
    );

    // The backup cannot be taken: no migration, production untouched.
    std::fs::write(&w.password_file, "wrong\n").unwrap();
    let d = w.deploy_db_change(&v2);
    assert_eq!(d["state"], "DEPLOYMENT_STATE_FAILED", "{d}");
    let detail = d["detail"].as_str().unwrap();
    assert!(
        detail.contains("password authentication failed") && detail.contains("not migrating"),
        "{detail}"
    );
    assert!(
        !d["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["environment"] == "production" && s["name"] == "deploy"),
        "production was touched: {d}"
    );
    assert!(served(app.production_port).contains("version v1"));
    assert_eq!(w.manifests().len(), 1, "no new backup");
}

/// Every file and directory under `root` (not `root` itself), relative, with its mode.
fn modes_under(root: &Path) -> Vec<(String, bool, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = e.metadata().unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            out.push((rel, meta.is_dir(), meta.permissions().mode() & 0o7777));
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn backup_files_are_private_whatever_the_umask_here_and_offsite() {
    let offsite = tempfile::tempdir().unwrap();
    // A mount point as an operator leaves it: readable by all.
    set_mode(offsite.path(), 0o755);
    let mut w = world(Options {
        offsite: Some(offsite.path().display().to_string()),
        everything: true,
        ..Default::default()
    });
    let _agent = w.restart_agent_with_umask("022");
    assert_state(&w.backup_at("2026-05-01T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.backup_at("2026-05-02T02:00:00Z"), "JOB_STATE_SUCCEEDED");

    assert_eq!(mode_of(&w.backup_dir), 0o700, "the backup dir");
    for (root, name) in [
        (w.backup_dir.as_path(), "here"),
        (offsite.path(), "offsite"),
    ] {
        let all = modes_under(root);
        assert!(
            all.iter().any(|(p, _, _)| p.ends_with(".dump"))
                && all.iter().any(|(p, _, _)| p.starts_with("manifests/"))
                && all.iter().any(|(p, _, _)| p.starts_with("globals/"))
                && all.iter().any(|(p, _, _)| p.starts_with("files/")),
            "{name}: {all:?}"
        );
        let wide: Vec<_> = all
            .iter()
            .filter(|(_, dir, mode)| *mode != if *dir { 0o700 } else { 0o600 })
            .collect();
        assert!(
            wide.is_empty(),
            "{name}: not 0600 files and 0700 directories: {wide:?}"
        );
    }
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_SUCCEEDED");

    // The list names the newest good file.
    let newest = w.newest_dump();
    let rel = newest
        .strip_prefix(&w.backup_dir)
        .unwrap()
        .display()
        .to_string();
    let (ok, text) = w.cli(&["backups", "list"]);
    let row = text
        .lines()
        .find(|l| l.starts_with("production/shop_prod"))
        .unwrap_or_else(|| panic!("no shop_prod row in {text}"));
    assert!(ok && row.contains(&rel), "{rel} not in {text}");
}

#[test]
fn verify_reports_a_backup_file_whose_mode_is_wider() {
    let w = world(Options::default());
    assert_state(&w.backup_at("2026-05-01T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.run("VerifyBackups", "{}"), "JOB_STATE_SUCCEEDED");
    let dump = w.newest_dump();
    let rel = dump
        .strip_prefix(&w.backup_dir)
        .unwrap()
        .display()
        .to_string();
    set_mode(&dump, 0o644);
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_FAILED");
    let detail = verify["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("{rel} is mode 0644, wider than 0600")),
        "{detail}"
    );
    let shop = w.shop();
    assert!(!flag(&shop["lastVerifyOk"]), "{shop}");
    assert!(
        shop["lastVerifyDetail"]
            .as_str()
            .unwrap()
            .contains("readable by other users"),
        "{shop}"
    );
    // The content is fine: it is not called damaged, and stays the newest good backup.
    assert_eq!(shop["newestGoodFile"], rel.as_str(), "{shop}");

    // A directory too.
    set_mode(&dump, 0o600);
    set_mode(&w.backup_dir.join("production"), 0o755);
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_FAILED");
    assert!(
        verify["detail"]
            .as_str()
            .unwrap()
            .contains("production is mode 0755, wider than 0700"),
        "{verify}"
    );
}

#[test]
fn offsite_copies_are_pruned_with_the_same_retention_after_a_verified_copy() {
    let parent = tempfile::tempdir().unwrap();
    let offsite = parent.path().join("offsite");
    std::fs::create_dir(&offsite).unwrap();
    let w = world(Options {
        offsite: Some(offsite.display().to_string()),
        // Two days, but never fewer than three.
        retention: "daily = 2\nweekly = 0\nminimum = 3\n",
        ..Default::default()
    });
    let offsite_dumps = |root: &Path| -> BTreeSet<String> {
        std::fs::read_dir(root.join("production/shop_prod"))
            .map(|r| {
                r.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_prefix("shop_prod-")?
                            .strip_suffix(".dump")
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let manifests_at = |root: &Path| -> BTreeSet<String> {
        std::fs::read_dir(root.join("manifests"))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let day = |d: u32| format!("2026-07-{d:02}T02:00:00Z");

    // What an earlier version left there: a dump whose local manifest is long gone.
    assert_state(&w.backup_at(&day(1)), "JOB_STATE_SUCCEEDED");
    let planted = offsite.join("production/shop_prod/shop_prod-20260601T020000Z.dump");
    std::fs::copy(w.newest_dump(), &planted).unwrap();
    std::fs::write(offsite.join("manifests/20260601T020000Z.json"), "{}").unwrap();

    for d in 2..=4 {
        let job = w.backup_at(&day(d));
        assert_state(&job, "JOB_STATE_SUCCEEDED");
        if d == 2 {
            // Two here; there the minimum keeps the old one as a third.
            let mut expected = w.dumps();
            expected.insert("20260601T020000Z".into());
            assert_eq!(offsite_dumps(&offsite), expected, "day {d}");
            continue;
        }
        assert_eq!(offsite_dumps(&offsite), w.dumps(), "day {d}");
        assert_eq!(
            manifests_at(&offsite),
            manifests_at(&w.backup_dir),
            "day {d}"
        );
        if d == 4 {
            // The report says what went where.
            let report = backup_report(&job);
            assert_eq!(
                strings(&report["pruned"]),
                BTreeSet::from(
                    ["production/shop_prod/shop_prod-20260701T020000Z.dump".to_string()]
                ),
                "{report}"
            );
            assert_eq!(
                report["offsite"]["target"],
                offsite.display().to_string().as_str()
            );
            assert!(
                strings(&report["offsite"]["pruned"])
                    .contains("production/shop_prod/shop_prod-20260701T020000Z.dump"),
                "{report}"
            );
            let detail = job["detail"].as_str().unwrap();
            assert!(
                detail.contains("pruned 1 file(s) here")
                    && detail.contains(&format!("at {}", offsite.display())),
                "{detail}"
            );
        }
    }
    assert!(
        !planted.exists(),
        "the earlier version's extra dump went too"
    );
    assert_eq!(w.dumps().len(), 3);
    // Every file an offsite manifest calls pruned is gone, and every other one is there.
    for name in manifests_at(&offsite) {
        let m: Value =
            serde_json::from_slice(&std::fs::read(offsite.join("manifests").join(&name)).unwrap())
                .unwrap();
        for e in m["entries"].as_array().unwrap() {
            let there = offsite.join(e["file"].as_str().unwrap()).exists();
            assert_eq!(there, e["pruned_at"].is_null(), "{name}: {e}");
        }
    }

    // The target goes away for two nights: nothing is pruned there meanwhile.
    let away = parent.path().join("unmounted");
    std::fs::rename(&offsite, &away).unwrap();
    let held = offsite_dumps(&away);
    for d in 5..=6 {
        let job = w.backup_at(&day(d));
        assert_state(&job, "JOB_STATE_SUCCEEDED");
        assert!(
            job["detail"]
                .as_str()
                .unwrap()
                .contains("nothing pruned there until a complete copy"),
            "{job}"
        );
    }
    assert_eq!(offsite_dumps(&away), held);
    assert!(held.len() >= 3, "never fewer than the minimum: {held:?}");

    // Back: the copy catches up, then the same retention leaves what is here.
    std::fs::rename(&away, &offsite).unwrap();
    let job = w.backup_at(&day(7));
    assert_state(&job, "JOB_STATE_SUCCEEDED");
    assert_eq!(offsite_dumps(&offsite), w.dumps());
    assert_eq!(manifests_at(&offsite), manifests_at(&w.backup_dir));
    assert_eq!(
        w.dumps(),
        BTreeSet::from([
            "20260705T020000Z".to_string(),
            "20260706T020000Z".to_string(),
            "20260707T020000Z".to_string()
        ])
    );
}

#[test]
fn a_failed_offsite_copy_makes_backups_run_wait_exit_with_its_own_code() {
    let parent = tempfile::tempdir().unwrap();
    let offsite = parent.path().join("offsite");
    let w = world(Options {
        offsite: Some(offsite.display().to_string()),
        ..Default::default()
    });
    // Not mounted: the copy fails, the backup here does not.
    let (code, text) = w
        .controller
        .cli(&["backups", "run", "--reason", "test", "--wait"]);
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("offsite copy FAILED"), "{text}");
    assert_eq!(w.dumps().len(), 1);

    std::fs::create_dir(&offsite).unwrap();
    let (code, text) = w
        .controller
        .cli(&["backups", "run", "--reason", "test", "--wait"]);
    assert_eq!(code, Some(0), "{text}");
}

#[test]
fn an_interrupted_backup_ends_interrupted_and_says_so_for_what_it_never_reached() {
    let mut w = world(Options {
        everything: true,
        ..Default::default()
    });
    // A pg_dump slow enough to be interrupted.
    let slow = w.fleet.path("slow_pg_dump");
    std::fs::write(
        &slow,
        format!(
            "#!/bin/sh\nsleep 3\nexec {}/pg_dump \"$@\"\n",
            postgres::bin_dir().display()
        ),
    )
    .unwrap();
    set_mode(&slow, 0o755);
    w.agent_toml = w.agent_toml.replace(
        &format!("pg_dump = \"{}/pg_dump\"", postgres::bin_dir().display()),
        &format!("pg_dump = \"{}\"", slow.display()),
    );
    w.restart_agent("");
    let job = w
        .controller
        .grpcurl(
            Some(r#"{"reason":"test","simulated_now":"2026-08-01T02:00:00Z"}"#),
            "sentinel.v1.FleetService/RunBackup",
        )
        .json()
        .expect("RunBackup");
    let id = job["jobId"].as_str().unwrap().to_string();
    eventually("the dump to start", || {
        let j = w.controller.get_job(&id)?;
        if j.to_string().contains("dump production/shop_prod") {
            Ok(())
        } else {
            Err(j["state"].to_string())
        }
    });
    w.agent.signal("KILL");
    w.restart_agent("");
    let done = w.wait_job(&id);
    assert_state(&done, "JOB_STATE_INTERRUPTED");
    // Let a re-sent copy of the job reach the agent and be refused, if it is going to.
    std::thread::sleep(Duration::from_secs(3));
    let done = w.controller.get_job(&id).unwrap();
    let last = done["events"].as_array().unwrap().last().cloned().unwrap();
    assert!(last["refused"].is_null(), "a trailing refusal: {last}");
    assert_state(&done, "JOB_STATE_INTERRUPTED");
    let list = w.list();
    for d in list["databases"].as_array().unwrap() {
        let error = d["lastError"].as_str().unwrap_or("");
        assert!(
            !error.contains("REPLAYED")
                && error.contains("the agent stopped while this job was running"),
            "{d}"
        );
    }
}
