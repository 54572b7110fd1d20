//! The audit log: one line per deploy step in `APP_DIR/audit.log`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{io_fail, AUDIT_LOG};
use crate::jobs::events::JobError;

/// One line of the audit log. Fields are written as given: mask secrets
/// ([`JobEvents::redact`](crate::jobs::events::JobEvents::redact)) before.
#[derive(Clone, Debug, Default)]
pub struct AuditLine {
    /// The deploy (or rollback) this step belongs to.
    pub deploy_id: String,
    /// The app.
    pub app: String,
    /// The environment (production, staging...).
    pub environment: String,
    /// The release the step worked on.
    pub commit: String,
    /// The step ("unpack", "build", "health", "rollback"...).
    pub step: String,
    /// "succeeded", "failed" or "skipped".
    pub outcome: String,
    /// What happened, in a sentence.
    pub detail: String,
}

impl AuditLine {
    /// The line as written: RFC 3339 time, then `key=value` fields (values quoted when they
    /// contain spaces, quotes, `=` or control characters), newline-terminated.
    pub fn render(&self, at: &str) -> String {
        let detail: String = self.detail.chars().take(2000).collect();
        format!(
            "{at} deploy_id={} app={} env={} commit={} step={} outcome={} detail={}\n",
            field(&self.deploy_id),
            field(&self.app),
            field(&self.environment),
            field(&self.commit),
            field(&self.step),
            field(&self.outcome),
            field(&detail),
        )
    }
}

fn field(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '=' | '\\'));
    if plain {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Appends `line` to `APP_DIR/audit.log` (created with mode 0640) in one write, so lines of
/// concurrent writers never interleave.
pub fn audit(app_dir: &Path, line: &AuditLine) -> Result<(), JobError> {
    let path = app_dir.join(AUDIT_LOG);
    let text = line.render(&sentinel_proto::time::now().to_string());
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(&path)
        .map_err(|e| io_fail("opening", &path, e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| io_fail("appending to", &path, e))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn audit_lines_are_one_line_each_and_quoted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let line = AuditLine {
            deploy_id: "d1".into(),
            app: "web".into(),
            environment: "prod".into(),
            commit: "abc".into(),
            step: "build".into(),
            outcome: "failed".into(),
            detail: "exit code 1\nlast \"line\"".into(),
        };
        audit(dir.path(), &line).expect("audit");
        audit(dir.path(), &line).expect("audit");
        let text = fs::read_to_string(dir.path().join(AUDIT_LOG)).expect("read");
        assert_eq!(text.lines().count(), 2);
        let first = text.lines().next().unwrap_or_default();
        assert!(first.contains(" deploy_id=d1 app=web env=prod commit=abc step=build outcome=failed detail=\"exit code 1\\nlast \\\"line\\\"\""), "{first}");
        assert!(
            first.split(' ').next().unwrap_or_default().ends_with('Z'),
            "{first}"
        );
    }
}
