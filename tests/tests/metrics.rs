//! Prometheus metrics of a real controller and agent (started by the harness): the endpoints
//! answer in the text format, count what happens, and export every metric that the Grafana
//! dashboard and the alert rules in `packaging/` name; `promtool` accepts the rules and their
//! unit tests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use sentinel_e2e::{
    eventually, http_get, metric_sample as sample, run, scrape_metrics, Controller, Fleet, Proc,
    Value, AGENT_METRICS_LISTENING,
};

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

/// Every metric name the exposition declares (`# TYPE`) or has samples of.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                names.insert(name.to_string());
                if kind == "histogram" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Metric names in a PromQL expression: identifiers of our own prefixes (functions, label
/// names and values, keywords and Prometheus' own `up` are not ours to export).
fn referenced_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut current = String::new();
    let mut in_string = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_string = !in_string;
            current.clear();
            continue;
        }
        if in_string {
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            current.push(c);
        } else {
            if ["sentinel_", "hostagent_", "process_"]
                .iter()
                .any(|p| current.starts_with(p))
            {
                names.insert(current.clone());
            }
            current.clear();
        }
    }
    names
}

/// Every PromQL expression in the dashboard: `expr` of targets and the `query`/`definition`
/// of template variables.
fn dashboard_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// Every `expr:` of the rules file, with its alert name; block scalars (`>-`, `|`) included.
fn rule_exprs(yaml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut alert = String::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            alert = name.trim().to_string();
        } else if let Some(value) = trimmed.strip_prefix("expr:") {
            let value = value.trim();
            if value.starts_with(['|', '>']) {
                let indent = line.len() - trimmed.len();
                let mut block = String::new();
                while let Some(next) = lines.peek() {
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push_str(next.trim());
                    block.push(' ');
                    lines.next();
                }
                out.push((alert.clone(), block));
            } else {
                out.push((alert.clone(), value.trim_matches(['\'', '"']).to_string()));
            }
        }
    }
    out
}

struct World {
    fleet: Fleet,
    controller: Controller,
    agent: Proc,
    controller_metrics: u16,
    agent_metrics: u16,
}

fn start() -> World {
    let fleet = Fleet::new(&["argus"]);
    let controller = fleet.start_controller("");
    let controller_metrics = controller.metrics_port();
    let agent = fleet.start_agent(
        "argus",
        "argus",
        &controller.addr,
        &format!(
            "[jobs]\nstate_dir = \"{}\"\n",
            fleet.path("agent-state").display()
        ),
    );
    let agent_metrics = agent.logged_addr(AGENT_METRICS_LISTENING).port();
    controller.wait_online("argus");
    World {
        fleet,
        controller,
        agent,
        controller_metrics,
        agent_metrics,
    }
}

#[test]
fn the_metrics_count_hosts_calls_collections_and_reconnects() {
    let mut w = start();
    let c = w.controller_metrics;
    let a = w.agent_metrics;

    // A call refused by authz counts too, with its code.
    let refused = w
        .controller
        .grpcurl_as("host-argus", &[], "sentinel.v1.FleetService/ListHosts");
    assert!(!refused.ok, "a host certificate may not list hosts");
    w.controller.get_host("argus").expect("GetHost");

    let text = eventually(
        "the controller's metrics to show the fleet and the calls",
        || {
            let text = scrape_metrics(c)?;
            let want = [
                ("sentinel_hosts{status=\"online\"}", 1.0),
                ("sentinel_host_up{host=\"argus\"}", 1.0),
                ("sentinel_build_info{version=\"0.1.0\"}", 1.0),
            ];
            for (series, value) in want {
                if sample(&text, series) != Some(value) {
                    return Err(format!("{series} is not {value} in:\n{text}"));
                }
            }
            for series in [
            "sentinel_agent_connections_total",
            "sentinel_state_reports_total",
            "sentinel_grpc_requests_total{method=\"sentinel.v1.FleetService/GetHost\",code=\"OK\"}",
            "sentinel_grpc_requests_total{method=\"sentinel.v1.FleetService/ListHosts\",code=\"PERMISSION_DENIED\"}",
            "sentinel_grpc_request_duration_seconds_count{method=\"sentinel.v1.FleetService/GetHost\"}",
            "process_resident_memory_bytes",
        ] {
            if !sample(&text, series).is_some_and(|v| v >= 1.0) {
                return Err(format!("no {series} in:\n{text}"));
            }
        }
            Ok(text)
        },
    );
    let age = sample(&text, "sentinel_host_state_age_seconds{host=\"argus\"}").expect("state age");
    assert!((0.0..30.0).contains(&age), "{age}");

    eventually(
        "the agent's metrics to show collections and the channel",
        || {
            let text = scrape_metrics(a)?;
            if sample(&text, "hostagent_connected") != Some(1.0) {
                return Err(format!("not connected:\n{text}"));
            }
            if !sample(
                &text,
                "hostagent_collector_duration_seconds_count{collector=\"system\"}",
            )
            .is_some_and(|v| v >= 1.0)
            {
                return Err(format!("no system collection:\n{text}"));
            }
            Ok(())
        },
    );

    // Anything but GET /metrics says where the metrics are.
    let (status, _, body) = http_get(c, "/").expect("GET /");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    assert!(body.contains("/metrics"), "{body}");

    // The controller goes away: the agent counts its reconnects and says it is disconnected.
    w.controller.proc.stop();
    eventually("the agent to count reconnects", || {
        let text = scrape_metrics(a)?;
        match (
            sample(&text, "hostagent_connected"),
            sample(&text, "hostagent_reconnects_total"),
        ) {
            (Some(0.0), Some(n)) if n >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    w.agent.stop();
    drop(w.fleet);
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_name_is_exported() {
    let w = start();
    let exported: BTreeSet<String> = [w.controller_metrics, w.agent_metrics]
        .into_iter()
        .flat_map(|port| {
            let text = eventually("a scrape", || scrape_metrics(port));
            exported_names(&text)
        })
        .collect();

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(packaging().join("grafana/sentinel.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "sentinel-fleet");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "{exprs:?}");

    let rules = std::fs::read_to_string(packaging().join("prometheus/sentinel.rules.yml"))
        .expect("alert rules");
    let alerts = rule_exprs(&rules);
    // The alerts the issue asks for, on the metrics that carry them.
    for (alert, needle) in [
        ("SentinelHostOffline", "sentinel_host_up == 0"),
        (
            "SentinelIsolationViolation",
            "sentinel_isolation_violations > 0",
        ),
        (
            "SentinelBackupTooOld",
            "sentinel_backup_newest_good_age_seconds > 26 * 3600",
        ),
        (
            "SentinelRestoreTestFailed",
            "sentinel_backup_restore_test_ok == 0",
        ),
        (
            "SentinelDeployFailed",
            "sentinel_deploys_total{outcome=~\"failed|rolled_back\"}",
        ),
        (
            "SentinelHostCertExpiring",
            "< sentinel_host_cert_lifetime_seconds / 3",
        ),
        (
            "SentinelControllerCertExpiring",
            "sentinel_controller_cert_seconds{bound=\"lifetime\"} / 3",
        ),
        (
            "HostagentCertificateRenewalFailing",
            "hostagent_certificate_renewals_total{outcome!=\"renewed\"}",
        ),
    ] {
        let expr = alerts
            .iter()
            .find(|(name, _)| name == alert)
            .map(|(_, e)| e.as_str())
            .unwrap_or_else(|| panic!("no alert {alert} in the rules"));
        assert!(expr.contains(needle), "{alert}: {expr}");
    }

    let mut missing = Vec::new();
    let mut named = BTreeSet::new();
    for expr in exprs.iter().chain(alerts.iter().map(|(_, e)| e)) {
        for name in referenced_names(expr) {
            if !exported.contains(&name) {
                missing.push(format!("{name} (in `{expr}`)"));
            }
            named.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "named by the dashboard or the alerts but not exported:\n{}\nexported: {exported:?}",
        missing.join("\n")
    );
    // The dashboard and rules cover both binaries.
    assert!(
        named.iter().any(|n| n.starts_with("hostagent_")),
        "{named:?}"
    );
    assert!(named.len() >= 20, "{named:?}");
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests() {
    let dir = packaging().join("prometheus");
    for args in [
        &["check", "rules", "sentinel.rules.yml"][..],
        &["test", "rules", "sentinel.rules.test.yml"][..],
    ] {
        let out = run(Command::new("promtool").args(args).current_dir(&dir));
        assert!(
            out.status.success(),
            "promtool {args:?} (apt-get install prometheus; tests/run.sh does):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn promql_names_and_rule_expressions_are_read_correctly() {
    let names = referenced_names(
        "histogram_quantile(0.95, sum by (le, app) (rate(sentinel_deploy_duration_seconds_bucket{app=\"sentinel_x\"}[5m]))) and up",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["sentinel_deploy_duration_seconds_bucket".to_string()]
    );
    let rules =
        "- alert: A\n  expr: x_total > 0\n- alert: B\n  expr: >-\n    sum(y)\n    > 1\n  for: 5m\n";
    assert_eq!(
        rule_exprs(rules),
        vec![
            ("A".to_string(), "x_total > 0".to_string()),
            ("B".to_string(), "sum(y) > 1 ".to_string())
        ]
    );
}
