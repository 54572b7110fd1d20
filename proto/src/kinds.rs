//! The names job kinds go by outside the wire: in the agent's `jobs.allowed_kinds`, in logs and
//! in metric labels. One table, so the agent's policy and the controller's labels agree.

use crate::v1::JobKind;

/// Job kinds by their config names.
pub const KINDS: &[(&str, JobKind)] = &[
    ("deploy", JobKind::Deploy),
    ("rollback", JobKind::Rollback),
    ("backup", JobKind::Backup),
    ("verify_backups", JobKind::VerifyBackups),
    ("restore_test", JobKind::RestoreTest),
    ("isolation_probe", JobKind::IsolationProbe),
];

/// The config name of a kind.
pub fn kind_name(kind: JobKind) -> &'static str {
    KINDS
        .iter()
        .find(|(_, k)| *k == kind)
        .map_or("unspecified", |(n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_but_unspecified_has_one_name() {
        for (name, kind) in KINDS {
            assert_eq!(kind_name(*kind), *name);
        }
        assert_eq!(kind_name(JobKind::Unspecified), "unspecified");
    }
}
