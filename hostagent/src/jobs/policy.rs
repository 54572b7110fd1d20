//! The agent's local policy: which job kinds it runs and where deploys may write. The
//! controller's signature says a job is authentic; this says whether this host wants it.

use std::path::{Component, Path, PathBuf};

use sentinel_proto::v1::{job_spec, BlueGreen, JobSpec};

use super::backup::safe_name;
use crate::config::{BackupsConfig, BlueGreenPolicy, JobsConfig};
use sentinel_proto::kinds::kind_name;

/// Checks `spec` against the policy; the error is the refusal's detail.
pub fn check(spec: &JobSpec, config: &JobsConfig) -> Result<(), String> {
    let kind = kind_name(spec.kind());
    if !config.allowed_kinds.iter().any(|k| k == kind) {
        return Err(format!(
            "job kind {kind} is not allowed on this host (jobs.allowed_kinds = {:?})",
            config.allowed_kinds
        ));
    }
    let (app_dir, blue_green) = match &spec.params {
        Some(job_spec::Params::Deploy(p)) => (Some(p.app_dir.as_str()), p.blue_green.as_ref()),
        Some(job_spec::Params::Rollback(p)) => (Some(p.app_dir.as_str()), p.blue_green.as_ref()),
        None => return Err("job carries no parameters".into()),
        _ => (None, None),
    };
    if let Some(dir) = app_dir {
        check_app_dir(Path::new(dir), config)?;
    }
    if let Some(bg) = blue_green {
        check_blue_green(bg, &config.blue_green)?;
    }
    check_backup(spec, &config.backups)
}

/// A blue/green job: its upstream file under `upstream_dirs`, its reload and config test
/// each exactly one of `commands` (no shell is involved: the argv runs as given).
fn check_blue_green(bg: &BlueGreen, config: &BlueGreenPolicy) -> Result<(), String> {
    under(
        "upstream file",
        &bg.upstream_file,
        &config.upstream_dirs,
        "jobs.blue_green.upstream_dirs",
    )?;
    if config
        .upstream_dirs
        .iter()
        .any(|root| Path::new(&bg.upstream_file) == root)
    {
        return Err(format!(
            "upstream file {} is one of jobs.blue_green.upstream_dirs itself; it must name a file inside one",
            bg.upstream_file
        ));
    }
    for (what, argv) in [("reload", &bg.reload), ("config test", &bg.test)] {
        if argv.is_empty() {
            return Err(format!("the blue/green job has no {what} command"));
        }
        if !config.commands.iter().any(|allowed| allowed == argv) {
            return Err(format!(
                "{what} command {argv:?} is not in jobs.blue_green.commands {:?}",
                config.commands
            ));
        }
    }
    Ok(())
}

/// Backup, verify and restore-test jobs: the backup dir under `backup_dirs`, file paths under
/// `file_roots`, an offsite target from `offsite_targets`, DSN refs this agent holds, names
/// that are plain path components, and a simulated clock only where allowed.
fn check_backup(spec: &JobSpec, config: &BackupsConfig) -> Result<(), String> {
    let dsn = |name: &str| {
        if config.dsns.contains_key(name) {
            Ok(())
        } else {
            Err(format!(
                "DSN ref {name:?} is not in this agent's [jobs.backups.dsns]"
            ))
        }
    };
    let name = |what: &str, n: &str| {
        if safe_name(n) {
            Ok(())
        } else {
            Err(format!(
                "{what} {n:?} must be [A-Za-z0-9_.-]+ (it becomes a directory name)"
            ))
        }
    };
    match &spec.params {
        Some(job_spec::Params::Backup(p)) => {
            under(
                "backup dir",
                &p.backup_dir,
                &config.backup_dirs,
                "jobs.backups.backup_dirs",
            )?;
            for db in &p.databases {
                name("environment", &db.environment)?;
                name("database", &db.database)?;
                dsn(&db.dsn_ref)?;
            }
            if !p.globals_dsn_ref.is_empty() {
                name("DSN ref", &p.globals_dsn_ref)?;
                dsn(&p.globals_dsn_ref)?;
            }
            for path in &p.file_paths {
                under(
                    "file path",
                    path,
                    &config.file_roots,
                    "jobs.backups.file_roots",
                )?;
            }
            if !p.offsite_target.is_empty() && !config.offsite_targets.contains(&p.offsite_target) {
                return Err(format!(
                    "offsite target {:?} is not in jobs.backups.offsite_targets",
                    p.offsite_target
                ));
            }
            if p.retention
                .as_ref()
                .is_some_and(|r| r.simulated_now.is_some())
                && !config.allow_simulated_clock
            {
                return Err(
                    "the job carries a simulated clock; this agent does not accept one \
                            (jobs.backups.allow_simulated_clock = false)"
                        .into(),
                );
            }
            Ok(())
        }
        Some(job_spec::Params::VerifyBackups(p)) => under(
            "backup dir",
            &p.backup_dir,
            &config.backup_dirs,
            "jobs.backups.backup_dirs",
        ),
        Some(job_spec::Params::RestoreTest(p)) => {
            under(
                "backup dir",
                &p.backup_dir,
                &config.backup_dirs,
                "jobs.backups.backup_dirs",
            )?;
            dsn(&p.test_cluster_dsn_ref)
        }
        _ => Ok(()),
    }
}

/// `path` is absolute, has no `..`, and is one of `roots` or below one.
fn under(what: &str, path: &str, roots: &[PathBuf], key: &str) -> Result<(), String> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{what} {path:?} must be absolute without `..`"));
    }
    if roots.iter().any(|root| p.starts_with(root)) {
        Ok(())
    } else {
        Err(format!("{what} {path} is outside {key} {roots:?}"))
    }
}

fn check_app_dir(dir: &Path, config: &JobsConfig) -> Result<(), String> {
    if !dir.is_absolute() || dir.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "app directory {} must be absolute without `..`",
            dir.display()
        ));
    }
    if config
        .app_dirs
        .iter()
        .any(|allowed| dir.starts_with(allowed) && dir != allowed)
    {
        Ok(())
    } else {
        Err(format!(
            "app directory {} is outside jobs.app_dirs {:?}",
            dir.display(),
            config.app_dirs
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_proto::v1::{DeployParams, JobKind};

    fn config() -> JobsConfig {
        JobsConfig {
            allowed_kinds: vec!["deploy".into()],
            app_dirs: vec!["/srv/apps".into()],
            ..Default::default()
        }
    }

    fn deploy(dir: &str) -> JobSpec {
        JobSpec {
            kind: JobKind::Deploy as i32,
            params: Some(job_spec::Params::Deploy(DeployParams {
                app_dir: dir.into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn policy_allows_only_listed_kinds_and_app_dirs() {
        assert!(check(&deploy("/srv/apps/auth"), &config()).is_ok());
        assert!(check(&deploy("/etc/passwd"), &config())
            .unwrap_err()
            .contains("outside"));
        assert!(check(&deploy("/srv/apps/../../etc"), &config()).is_err());
        assert!(check(&deploy("/srv/apps"), &config()).is_err());
        let mut rollback = deploy("/srv/apps/auth");
        rollback.kind = JobKind::Backup as i32;
        assert!(check(&rollback, &config())
            .unwrap_err()
            .contains("not allowed"));
    }

    #[test]
    fn blue_green_jobs_only_write_allowed_upstream_files_and_run_allowed_commands() {
        let config = JobsConfig {
            blue_green: BlueGreenPolicy {
                upstream_dirs: vec!["/etc/nginx/sentinel".into()],
                commands: vec![
                    vec!["nginx".into(), "-s".into(), "reload".into()],
                    vec!["nginx".into(), "-t".into()],
                ],
            },
            ..config()
        };
        let job_with = |config: &JobsConfig, file: &str, reload: &[&str], test: &[&str]| {
            let mut spec = deploy("/srv/apps/auth");
            if let Some(job_spec::Params::Deploy(p)) = &mut spec.params {
                p.blue_green = Some(BlueGreen {
                    blue_port: 8101,
                    green_port: 8102,
                    upstream_file: file.into(),
                    reload: reload.iter().map(|s| s.to_string()).collect(),
                    test: test.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                });
            }
            check(&spec, config)
        };
        let job =
            |file: &str, reload: &[&str], test: &[&str]| job_with(&config, file, reload, test);
        let reload = ["nginx", "-s", "reload"];
        let test = ["nginx", "-t"];
        assert_eq!(job("/etc/nginx/sentinel/auth.conf", &reload, &test), Ok(()));
        let e = job("/etc/passwd", &reload, &test).unwrap_err();
        assert!(
            e.contains("upstream file /etc/passwd is outside jobs.blue_green.upstream_dirs"),
            "{e}"
        );
        let e = job("/etc/nginx/sentinel/../nginx.conf", &reload, &test).unwrap_err();
        assert!(e.contains("without `..`"), "{e}");
        let e = job("sentinel/auth.conf", &reload, &test).unwrap_err();
        assert!(e.contains("must be absolute"), "{e}");
        let e = job("/etc/nginx/sentinel", &reload, &test).unwrap_err();
        assert!(e.contains("must name a file inside one"), "{e}");
        let e = job(
            "/etc/nginx/sentinel/a.conf",
            &["sh", "-c", "nginx -s reload"],
            &test,
        )
        .unwrap_err();
        assert!(e.contains("reload command [\"sh\", \"-c\", \"nginx -s reload\"] is not in jobs.blue_green.commands"), "{e}");
        let e = job(
            "/etc/nginx/sentinel/a.conf",
            &reload,
            &["nginx", "-t", "-c", "/tmp/x"],
        )
        .unwrap_err();
        assert!(e.contains("config test command"), "{e}");
        let e = job("/etc/nginx/sentinel/a.conf", &reload, &[]).unwrap_err();
        assert!(e.contains("no config test command"), "{e}");
        let unset = JobsConfig {
            blue_green: BlueGreenPolicy::default(),
            ..config.clone()
        };
        assert!(
            job_with(&unset, "/etc/nginx/sentinel/auth.conf", &reload, &test)
                .unwrap_err()
                .contains("outside")
        );
    }
}
