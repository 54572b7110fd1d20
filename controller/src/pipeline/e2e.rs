//! E2E checks: HTTP requests against an environment's base URL with the expected status and
//! body text. Smoke is the subset marked `smoke`; standard runs them all.

use sentinel_proto::v1::E2eLevel;

use super::config::E2eCheck;

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// The check's name.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What happened (status, missing text, connection error).
    pub detail: String,
}

/// The checks a level runs.
pub fn selected(checks: &[E2eCheck], level: E2eLevel) -> Vec<&E2eCheck> {
    checks
        .iter()
        .filter(|c| level == E2eLevel::Standard || c.smoke)
        .collect()
}

/// Runs `checks` against `base_url`, one after the other.
pub async fn run(base_url: &str, checks: &[&E2eCheck]) -> Vec<CheckResult> {
    let mut out = Vec::with_capacity(checks.len());
    for check in checks {
        let url = format!("{}{}", base_url.trim_end_matches('/'), check.path);
        let result = match sentinel_daemon::http::request("GET", &url, None, check.timeout).await {
            Ok(resp) if resp.status != check.expect_status => CheckResult {
                name: check.name.clone(),
                ok: false,
                detail: format!(
                    "GET {url}: status {} (expected {})",
                    resp.status, check.expect_status
                ),
            },
            Ok(resp) if !resp.body.contains(&check.expect_body) => CheckResult {
                name: check.name.clone(),
                ok: false,
                detail: format!("GET {url}: body does not contain {:?}", check.expect_body),
            },
            Ok(resp) => CheckResult {
                name: check.name.clone(),
                ok: true,
                detail: format!("GET {url}: {}", resp.status),
            },
            Err(e) => CheckResult {
                name: check.name.clone(),
                ok: false,
                detail: e.to_string(),
            },
        };
        out.push(result);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn check(name: &str, smoke: bool) -> E2eCheck {
        E2eCheck {
            name: name.into(),
            path: "/".into(),
            expect_status: 200,
            expect_body: String::new(),
            smoke,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn smoke_is_a_subset_of_standard() {
        let checks = vec![check("a", true), check("b", false)];
        assert_eq!(selected(&checks, E2eLevel::Smoke).len(), 1);
        assert_eq!(selected(&checks, E2eLevel::Standard).len(), 2);
    }
}
