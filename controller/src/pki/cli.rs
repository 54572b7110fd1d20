//! `sentinel pki init|init-issuer|issue-host|issue-operator`: each writes its files and lists them
//! (`wrote PATH`), or prints why it refused and exits 64 (a refused run writes nothing).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{InitOptions, PkiError, Role};
use crate::cli::EXIT_USAGE;

/// `sentinel pki init`: a fresh dev PKI in `opts.dir`; no hosts given means the dev fleet's
/// default hosts and this machine (see [`super::default_hosts`]), unless `no_hosts` (hosts
/// that enrol with join tokens need none).
pub fn init_command(mut opts: InitOptions, no_hosts: bool) -> u8 {
    if opts.hosts.is_empty() && !no_hosts {
        opts.hosts = super::default_hosts(&crate::dev::local_host_name());
    }
    report(super::init(&opts))
}

/// `sentinel pki issue-host NAME`: a host certificate signed by the CA in `dir`.
pub fn issue_host_command(dir: &Path, name: &str, ttl: Option<Duration>, force: bool) -> u8 {
    report(super::issue_host(dir, name, ttl, force))
}

/// `sentinel pki issue-operator NAME --role ROLE [--ttl]`: an operator certificate signed by
/// the CA in `dir`.
pub fn issue_operator_command(
    dir: &Path,
    name: &str,
    role: Role,
    ttl: Option<Duration>,
    force: bool,
) -> u8 {
    report(super::issue_operator(dir, name, role, ttl, force))
}

/// `sentinel pki init-issuer`: the online issuing CA, signed by the CA in `dir`.
pub fn init_issuer_command(dir: &Path, ttl: Option<Duration>, force: bool) -> u8 {
    report(super::issuer::init_issuer(dir, ttl, force))
}

/// `sentinel pki rotate-signing-key --dir DIR [--promote]`.
pub fn rotate_signing_key_command(dir: &Path, promote: bool, force: bool) -> u8 {
    report(super::keys::rotate_signing_key(dir, promote, force))
}

/// Lists the files written, or prints the error with its causes; the exit code.
fn report(result: Result<Vec<PathBuf>, PkiError>) -> u8 {
    match result {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            0
        }
        Err(e) => {
            eprintln!("sentinel pki: {:#}", anyhow::Error::from(e));
            EXIT_USAGE
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::pki::{host_files, CA_CERT_FILE};

    #[test]
    fn init_without_hosts_issues_the_default_fleet_and_refuses_a_second_run() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        let opts = InitOptions {
            dir: dir.clone(),
            ..InitOptions::default()
        };
        assert_eq!(init_command(opts.clone(), false), 0);
        for host in crate::pki::default_hosts(&crate::dev::local_host_name()) {
            assert!(
                host_files(&dir, &host).0.exists(),
                "no certificate for {host}"
            );
        }
        let ca = std::fs::read(dir.join(CA_CERT_FILE)).expect("ca");
        assert_eq!(init_command(opts, false), EXIT_USAGE);
        assert_eq!(std::fs::read(dir.join(CA_CERT_FILE)).expect("ca"), ca);
    }

    #[test]
    fn issuing_exits_64_without_a_ca_or_with_a_bad_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        assert_eq!(issue_host_command(dir, "argus", None, false), EXIT_USAGE);
        assert_eq!(
            issue_operator_command(dir, "ada", Role::Admin, None, false),
            EXIT_USAGE
        );
        let opts = InitOptions {
            dir: dir.to_owned(),
            hosts: vec!["argus".into()],
            ..InitOptions::default()
        };
        assert_eq!(init_command(opts, false), 0);
        assert_eq!(issue_host_command(dir, "Bad_Name", None, false), EXIT_USAGE);
        assert_eq!(issue_host_command(dir, "new-host", None, false), 0);
        assert_eq!(
            issue_operator_command(dir, "dan", Role::Deployer, None, false),
            0
        );
        assert_eq!(
            issue_operator_command(
                dir,
                "tiny",
                Role::Viewer,
                Some(Duration::from_secs(5)),
                false
            ),
            EXIT_USAGE,
            "a 5s certificate is refused"
        );
        assert_eq!(init_issuer_command(dir, None, false), 0);
        assert_eq!(init_issuer_command(dir, None, false), EXIT_USAGE);
        assert_eq!(
            issue_operator_command(dir, "dan", Role::Deployer, None, false),
            EXIT_USAGE,
            "re-issuing needs --force"
        );
    }
}
