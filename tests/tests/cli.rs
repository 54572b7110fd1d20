//! The command lines do not drift: `--help` of both binaries and of every `sentinel`
//! subcommand is compared with `tests/snapshots/*.txt`. After an intended change, regenerate
//! them with `SENTINEL_UPDATE_SNAPSHOTS=1 cargo test -p sentinel-e2e --test cli` and review the
//! diff. Also: usage errors exit 64, as the README says.

use std::path::{Path, PathBuf};
use std::process::Command;

use sentinel_e2e::{bin, run};

/// Environment variables clap shows in help (`[env: NAME=value]`): cleared so the output does
/// not depend on the caller's environment.
const SHOWN_ENV: &[&str] = &[
    "SENTINEL_CONFIG",
    "SENTINEL_CONTROLLER",
    "SENTINEL_CA",
    "SENTINEL_CERT",
    "SENTINEL_KEY",
    "HOSTAGENT_CONFIG",
];

fn help(binary: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(bin(binary));
    cmd.args(args).arg("--help").env("NO_COLOR", "1");
    for var in SHOWN_ENV {
        cmd.env_remove(var);
    }
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn snapshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots")
}

/// Compares `actual` with the snapshot `name`, or writes it when SENTINEL_UPDATE_SNAPSHOTS is
/// set. Returns a description of the mismatch, if any.
fn check_snapshot(name: &str, actual: &str) -> Option<String> {
    let path = snapshot_dir().join(name);
    if std::env::var_os("SENTINEL_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(snapshot_dir()).expect("creating tests/snapshots");
        std::fs::write(&path, actual).expect("writing a snapshot");
        return None;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected == actual {
        return None;
    }
    let first_difference = expected
        .lines()
        .zip(actual.lines())
        .position(|(e, a)| e != a)
        .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
    Some(format!(
        "{} differs from the binary's output at line {}:\n  snapshot: {:?}\n  now:      {:?}",
        path.display(),
        first_difference + 1,
        expected.lines().nth(first_difference).unwrap_or("<end>"),
        actual.lines().nth(first_difference).unwrap_or("<end>"),
    ))
}

#[test]
fn help_output_matches_the_snapshots() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("hostagent", &[], "hostagent.txt"),
        ("sentinel", &[], "sentinel.txt"),
        ("sentinel", &["serve"], "sentinel-serve.txt"),
        ("sentinel", &["dev"], "sentinel-dev.txt"),
        (
            "sentinel",
            &["config", "check"],
            "sentinel-config-check.txt",
        ),
        ("sentinel", &["pki", "init"], "sentinel-pki-init.txt"),
        (
            "sentinel",
            &["pki", "issue-host"],
            "sentinel-pki-issue-host.txt",
        ),
        (
            "sentinel",
            &["pki", "issue-operator"],
            "sentinel-pki-issue-operator.txt",
        ),
        (
            "sentinel",
            &["isolation", "check"],
            "sentinel-isolation-check.txt",
        ),
        (
            "sentinel",
            &["isolation", "fix"],
            "sentinel-isolation-fix.txt",
        ),
        ("sentinel", &["hosts"], "sentinel-hosts.txt"),
        ("sentinel", &["host"], "sentinel-host.txt"),
        ("sentinel", &["jobs"], "sentinel-jobs.txt"),
        ("sentinel", &["deploys"], "sentinel-deploys.txt"),
        ("sentinel", &["deploy"], "sentinel-deploy.txt"),
        ("sentinel", &["rollback"], "sentinel-rollback.txt"),
    ];
    let mismatches: Vec<String> = cases
        .iter()
        .filter_map(|(binary, args, file)| check_snapshot(file, &help(binary, args)))
        .collect();
    assert!(
        mismatches.is_empty(),
        "--help changed; if intended, run `SENTINEL_UPDATE_SNAPSHOTS=1 cargo test -p sentinel-e2e --test cli` and review the diff:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn a_usage_error_exits_64_and_help_and_version_exit_0() {
    for (binary, args) in [
        ("sentinel", &["hosts", "--no-such-flag"][..]),
        ("sentinel", &["no-such-command"][..]),
        ("hostagent", &["--no-such-flag"][..]),
    ] {
        let out = run(Command::new(bin(binary)).args(args));
        assert_eq!(out.status.code(), Some(64), "{binary} {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error:"), "{err}");
    }
    for binary in ["sentinel", "hostagent"] {
        let out = run(Command::new(bin(binary)).arg("--version"));
        assert_eq!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(binary));
    }
}

#[test]
fn an_unreachable_controller_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(bin("sentinel"))
        .args(["hosts", "--controller", "127.0.0.1:1", "--ca"])
        .arg(dir.path().join("missing-ca.pem")));
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
