//! The command lines do not drift: `--help` of both binaries and of every `sentinel`
//! subcommand (found by walking the help itself, so a new one cannot be missed) is compared
//! with `tests/snapshots/*.txt`. After an intended change, regenerate
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
    "HOSTAGENT_JOIN_TOKEN",
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
    let Ok(expected) = std::fs::read_to_string(&path) else {
        return Some(format!("{} does not exist yet", path.display()));
    };
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

/// The subcommands a help text lists under `Commands:` (`help` aside).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// `--help` of `binary args` and, recursively, of every subcommand it lists, each with its
/// snapshot file name (`sentinel-pki-init.txt`).
fn every_help(binary: &str, args: Vec<String>, out: &mut Vec<(String, String)>) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = help(binary, &refs);
    for sub in subcommands(&text) {
        let mut deeper = args.clone();
        deeper.push(sub);
        every_help(binary, deeper, out);
    }
    let name = std::iter::once(binary.to_string())
        .chain(args)
        .collect::<Vec<_>>()
        .join("-");
    out.push((format!("{name}.txt"), text));
}

#[test]
fn help_output_matches_the_snapshots() {
    let mut helps = Vec::new();
    every_help("hostagent", Vec::new(), &mut helps);
    every_help("sentinel", Vec::new(), &mut helps);
    assert!(
        helps.len() > 15,
        "{:?}",
        helps.iter().map(|(f, _)| f).collect::<Vec<_>>()
    );
    let mut mismatches: Vec<String> = helps
        .iter()
        .filter_map(|(file, text)| check_snapshot(file, text))
        .collect();
    // A snapshot of a subcommand that is gone.
    let updating = std::env::var_os("SENTINEL_UPDATE_SNAPSHOTS").is_some();
    for entry in std::fs::read_dir(snapshot_dir()).expect("tests/snapshots") {
        let path = entry.expect("a snapshot").path();
        let file = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if !helps.iter().any(|(f, _)| *f == file) {
            if updating {
                std::fs::remove_file(&path).expect("removing a stale snapshot");
            } else {
                mismatches.push(format!("{} belongs to no command any more", path.display()));
            }
        }
    }
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
