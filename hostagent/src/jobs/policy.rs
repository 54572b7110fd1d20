//! The agent's local policy: which job kinds it runs and where deploys may write. The
//! controller's signature says a job is authentic; this says whether this host wants it.

use std::path::{Component, Path};

use sentinel_proto::v1::{job_spec, JobSpec};

use super::kind_name;
use crate::config::JobsConfig;

/// Checks `spec` against the policy; the error is the refusal's detail.
pub fn check(spec: &JobSpec, config: &JobsConfig) -> Result<(), String> {
    let kind = kind_name(spec.kind());
    if !config.allowed_kinds.iter().any(|k| k == kind) {
        return Err(format!(
            "job kind {kind} is not allowed on this host (jobs.allowed_kinds = {:?})",
            config.allowed_kinds
        ));
    }
    let app_dir = match &spec.params {
        Some(job_spec::Params::Deploy(p)) => Some(p.app_dir.as_str()),
        Some(job_spec::Params::Rollback(p)) => Some(p.app_dir.as_str()),
        None => return Err("job carries no parameters".into()),
        _ => None,
    };
    if let Some(dir) = app_dir {
        check_app_dir(Path::new(dir), config)?;
    }
    Ok(())
}

fn check_app_dir(dir: &Path, config: &JobsConfig) -> Result<(), String> {
    if !dir.is_absolute() || dir.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("app directory {} must be absolute without `..`", dir.display()));
    }
    if config.app_dirs.iter().any(|allowed| dir.starts_with(allowed) && dir != allowed) {
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
        assert!(check(&deploy("/etc/passwd"), &config()).unwrap_err().contains("outside"));
        assert!(check(&deploy("/srv/apps/../../etc"), &config()).is_err());
        assert!(check(&deploy("/srv/apps"), &config()).is_err());
        let mut rollback = deploy("/srv/apps/auth");
        rollback.kind = JobKind::Backup as i32;
        assert!(check(&rollback, &config()).unwrap_err().contains("not allowed"));
    }
}
