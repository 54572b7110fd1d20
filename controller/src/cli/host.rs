//! `sentinel host NAME [--json]`: one host's full state: who and where it is, system, the
//! containers table, nginx, Redis and PostgreSQL summaries, and every collector's error.

use std::fmt::Write as _;

use sentinel_proto::v1::{
    docker_section, nginx_section, postgres_section, redis_section, system_section, Container,
    GetHostRequest, Host, HostStatus,
};

use super::deploy::status_err;
use super::format::{
    ago, bytes, enum_word, one_line, paint, short_duration, state, truncate, untrusted, when, Tone,
};
use super::ClientArgs;

/// Fetches host `name` and prints it; `json` prints the API's `Host` message instead.
pub async fn show(client: &ClientArgs, name: String, json: bool) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let host = api
        .get_host(GetHostRequest { name })
        .await
        .map_err(status_err)?
        .into_inner();
    if json {
        super::json::print(&host, "sentinel.v1.Host")?;
    } else {
        print!("{}", render(&host, super::colour()));
    }
    Ok(0)
}

/// The human view of a host.
pub fn render(h: &Host, colour: bool) -> String {
    let mut out = String::new();
    let status = enum_word(
        HostStatus::try_from(h.status)
            .unwrap_or(HostStatus::Unspecified)
            .as_str_name(),
        "HOST_STATUS_",
    );
    // Every string below came from the host (or through it): escaped, so that a crafted
    // value cannot move the cursor, retitle the terminal or start a forged line.
    let _ = write!(out, "{} {}", one_line(&h.name), state(&status, colour));
    if !h.offline_reason.is_empty() {
        let _ = write!(out, " ({})", one_line(&h.offline_reason));
    }
    out.push('\n');
    if let Some(info) = &h.info {
        let _ = writeln!(
            out,
            "agent {} on {} (kernel {}, {})",
            one_line(&info.agent_version),
            one_line(&info.os),
            one_line(&info.kernel),
            one_line(&info.arch)
        );
        if !info.labels.is_empty() {
            let mut labels: Vec<String> = info
                .labels
                .iter()
                .map(|(k, v)| format!("{}={}", one_line(k), one_line(v)))
                .collect();
            labels.sort();
            let _ = writeln!(out, "labels: {}", labels.join(" "));
        }
    }
    if h.cert_not_after.is_some() {
        let _ = writeln!(
            out,
            "certificate valid {} to {} (expires {})",
            when(h.cert_not_before.as_ref()),
            when(h.cert_not_after.as_ref()),
            super::format::expires(h.cert_not_after.as_ref())
        );
    }
    if h.connected_since.is_some() {
        let _ = writeln!(
            out,
            "connected since {} from {}",
            when(h.connected_since.as_ref()),
            if h.peer_address.is_empty() {
                "-"
            } else {
                h.peer_address.as_str()
            }
        );
    }
    let _ = writeln!(
        out,
        "last seen {} ({})",
        when(h.last_seen.as_ref()),
        ago(h.last_seen.as_ref())
    );
    let _ = writeln!(
        out,
        "state collected {} ({:.1}s old), received {}",
        when(h.state_collected_at.as_ref()),
        h.state_age_seconds,
        when(h.state_received_at.as_ref())
    );
    let Some(s) = &h.state else {
        out.push_str("\nno state reported yet\n");
        return out;
    };
    let mut errors: Vec<(String, String)> = Vec::new();

    match s.system.as_ref().and_then(|x| x.result.as_ref()) {
        Some(system_section::Result::State(sys)) => {
            out.push_str("\nSYSTEM\n");
            let _ = writeln!(
                out,
                "  cpu {} × {:.1}%   load {:.2} {:.2} {:.2}   memory {} used of {} ({} available)   swap {} of {}   up {}",
                sys.cpu_count,
                sys.cpu_usage_percent,
                sys.load1,
                sys.load5,
                sys.load15,
                bytes(sys.memory_used_bytes),
                bytes(sys.memory_total_bytes),
                bytes(sys.memory_available_bytes),
                bytes(sys.swap_used_bytes),
                bytes(sys.swap_total_bytes),
                short_duration(std::time::Duration::from_secs(sys.uptime_seconds)),
            );
            let rows: Vec<Vec<String>> = sys
                .disks
                .iter()
                .map(|d| {
                    let used = d.total_bytes.saturating_sub(d.available_bytes);
                    let pct = if d.total_bytes == 0 {
                        0.0
                    } else {
                        used as f64 * 100.0 / d.total_bytes as f64
                    };
                    let pct_text = format!("{pct:.0}%");
                    let tone = if pct >= 90.0 {
                        Tone::Bad
                    } else if pct >= 80.0 {
                        Tone::Busy
                    } else {
                        Tone::Plain
                    };
                    vec![
                        one_line(&d.mount_point),
                        one_line(&d.device),
                        one_line(&d.file_system),
                        bytes(d.total_bytes),
                        bytes(d.available_bytes),
                        paint(&pct_text, tone, colour),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                super::table_into(
                    &mut out,
                    "  ",
                    &["MOUNT", "DEVICE", "FS", "SIZE", "AVAILABLE", "USED"],
                    &rows,
                );
            }
        }
        Some(system_section::Result::Error(e)) => errors.push(("system".into(), e.clone())),
        None => {}
    }

    match s.docker.as_ref().and_then(|x| x.result.as_ref()) {
        Some(docker_section::Result::State(d)) => {
            let running = d.containers.iter().filter(|c| c.state == "running").count();
            let _ = writeln!(
                out,
                "\nCONTAINERS ({} running of {}, Docker {})",
                running,
                d.containers.len(),
                one_line(&d.engine_version)
            );
            let mut containers: Vec<&Container> = d.containers.iter().collect();
            containers.sort_by(|a, b| {
                (&a.compose_project, &a.compose_service, &a.name).cmp(&(
                    &b.compose_project,
                    &b.compose_service,
                    &b.name,
                ))
            });
            let rows: Vec<Vec<String>> = containers
                .iter()
                .map(|c| {
                    vec![
                        dash(&c.compose_project),
                        dash(&c.compose_service),
                        one_line(&c.name),
                        truncate(&one_line(&c.image), 40),
                        state(&one_line(&c.state), colour),
                        if c.health.is_empty() {
                            "-".into()
                        } else {
                            state(&one_line(&c.health), colour)
                        },
                        c.restart_count.to_string(),
                        ports(c),
                    ]
                })
                .collect();
            if rows.is_empty() {
                out.push_str("  no containers\n");
            } else {
                super::table_into(
                    &mut out,
                    "  ",
                    &[
                        "PROJECT", "SERVICE", "NAME", "IMAGE", "STATE", "HEALTH", "RESTARTS",
                        "PORTS",
                    ],
                    &rows,
                );
            }
        }
        Some(docker_section::Result::Error(e)) => errors.push(("docker".into(), e.clone())),
        None => {}
    }

    match s.nginx.as_ref().and_then(|x| x.result.as_ref()) {
        Some(nginx_section::Result::State(n)) => {
            out.push_str("\nNGINX\n");
            let _ = writeln!(
                out,
                "  {} {}, config {}, {} server block(s), {} certificate(s)",
                if n.running {
                    state("running", colour)
                } else {
                    paint("not running", Tone::Bad, colour)
                },
                dash(&n.version),
                if n.config_ok {
                    state("ok", colour)
                } else {
                    paint("FAILS nginx -t", Tone::Bad, colour)
                },
                n.servers.len(),
                n.certificates.len()
            );
            if !n.config_ok && !n.config_test_output.is_empty() {
                errors.push(("nginx -t".into(), n.config_test_output.trim().to_string()));
            }
            if !n.config_parse_error.is_empty() {
                errors.push(("nginx config".into(), n.config_parse_error.clone()));
            }
            let mut certs: Vec<_> = n.certificates.iter().collect();
            certs.sort_by_key(|c| c.not_after.map(|t| t.seconds).unwrap_or(i64::MAX));
            for c in certs {
                if !c.error.is_empty() {
                    errors.push((format!("nginx certificate {}", c.path), c.error.clone()));
                    continue;
                }
                let _ = writeln!(
                    out,
                    "  certificate {} expires {} ({})",
                    one_line(&c.dns_names.join(",")),
                    when(c.not_after.as_ref()),
                    one_line(&c.path)
                );
            }
        }
        Some(nginx_section::Result::Error(e)) => errors.push(("nginx".into(), e.clone())),
        None => {}
    }

    match s.redis.as_ref().and_then(|x| x.result.as_ref()) {
        Some(redis_section::Result::State(r)) => {
            out.push_str("\nREDIS\n");
            for i in &r.instances {
                if !i.reachable || !i.error.is_empty() {
                    let _ = writeln!(
                        out,
                        "  {} {}: {}",
                        one_line(&i.name),
                        one_line(&i.address),
                        paint("unreachable", Tone::Bad, colour)
                    );
                    errors.push((format!("redis {}", i.name), dash(&i.error)));
                    continue;
                }
                let _ = writeln!(
                    out,
                    "  {} {}: {} {}, {} used{}, {} clients, last save {}{}",
                    one_line(&i.name),
                    one_line(&i.address),
                    dash(&i.version),
                    dash(&i.role),
                    bytes(i.used_memory_bytes),
                    if i.maxmemory_bytes > 0 {
                        format!(" of {}", bytes(i.maxmemory_bytes))
                    } else {
                        String::new()
                    },
                    i.connected_clients,
                    ago(i.last_save.as_ref()),
                    if i.last_save_ok { "" } else { " (FAILED)" }
                );
            }
        }
        Some(redis_section::Result::Error(e)) => errors.push(("redis".into(), e.clone())),
        None => {}
    }

    match s.postgres.as_ref().and_then(|x| x.result.as_ref()) {
        Some(postgres_section::Result::State(p)) => {
            let superusers: Vec<&str> = p
                .roles
                .iter()
                .filter(|r| r.superuser)
                .map(|r| r.name.as_str())
                .collect();
            let _ = writeln!(
                out,
                "\nPOSTGRESQL\n  {}: {} roles ({} can log in), {} databases{}",
                dash(&p.server_version),
                p.roles.len(),
                p.roles.iter().filter(|r| r.login).count(),
                p.databases.len(),
                if superusers.is_empty() {
                    String::new()
                } else {
                    format!(", superusers: {}", one_line(&superusers.join(", ")))
                }
            );
        }
        Some(postgres_section::Result::Error(e)) => errors.push(("postgres".into(), e.clone())),
        None => {}
    }

    if !errors.is_empty() {
        let _ = writeln!(out, "\n{}", paint("COLLECTOR ERRORS", Tone::Bad, colour));
        for (what, e) in errors {
            let _ = writeln!(
                out,
                "  {}: {}",
                one_line(&what),
                untrusted(&e).replace('\n', "\n    ")
            );
        }
    }
    out
}

/// `s` escaped for the terminal, or `-` when empty.
fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        one_line(s)
    }
}

/// Published ports as `0.0.0.0:8080->80/tcp`; unpublished ones as `80/tcp`.
fn ports(c: &Container) -> String {
    let mut out: Vec<String> = c
        .ports
        .iter()
        .map(|p| {
            if p.public_port == 0 {
                format!("{}/{}", p.private_port, p.protocol)
            } else {
                let ip = if p.ip.is_empty() {
                    "0.0.0.0"
                } else {
                    p.ip.as_str()
                };
                format!("{ip}:{}->{}/{}", p.public_port, p.private_port, p.protocol)
            }
        })
        .collect();
    out.dedup();
    if out.is_empty() {
        "-".into()
    } else {
        one_line(&out.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_proto::v1::{
        DockerSection, DockerState, HostInfo, HostState, Port, SystemSection,
    };

    #[test]
    fn the_view_has_the_containers_table_and_the_collectors_errors() {
        let host = Host {
            name: "hub-alfa".into(),
            status: HostStatus::Online as i32,
            info: Some(HostInfo {
                name: "hub-alfa".into(),
                agent_version: "0.1.0".into(),
                os: "Debian 12".into(),
                ..Default::default()
            }),
            state: Some(HostState {
                system: Some(SystemSection {
                    collection: None,
                    result: Some(system_section::Result::Error("no /proc".into())),
                }),
                docker: Some(DockerSection {
                    collection: None,
                    result: Some(docker_section::Result::State(DockerState {
                        engine_version: "24.0".into(),
                        containers: vec![Container {
                            name: "auth-backend-1".into(),
                            image: "s60/auth:abc".into(),
                            compose_project: "auth-staging".into(),
                            compose_service: "backend".into(),
                            state: "running".into(),
                            health: "healthy".into(),
                            restart_count: 2,
                            ports: vec![Port {
                                private_port: 3002,
                                public_port: 3002,
                                ip: "127.0.0.1".into(),
                                protocol: "tcp".into(),
                            }],
                            ..Default::default()
                        }],
                    })),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = render(&host, false);
        assert!(
            text.starts_with("hub-alfa online\nagent 0.1.0 on Debian 12"),
            "{text}"
        );
        assert!(
            text.contains("CONTAINERS (1 running of 1, Docker 24.0)"),
            "{text}"
        );
        assert!(text.contains("  PROJECT       SERVICE  NAME"), "{text}");
        assert!(text.contains("auth-staging  backend  auth-backend-1  s60/auth:abc  running  healthy  2         127.0.0.1:3002->3002/tcp"), "{text}");
        assert!(
            text.contains("COLLECTOR ERRORS\n  system: no /proc\n"),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "no colour off a terminal");
    }

    #[test]
    fn escape_sequences_and_line_breaks_a_host_reports_are_shown_escaped() {
        let evil = "\x1b]0;pwned\x07\x1b[2J\x1b[32mdeploy succeeded\x1b[0m\nfake-row";
        let host = Host {
            name: "hub-alfa".into(),
            offline_reason: evil.into(),
            info: Some(HostInfo {
                agent_version: evil.into(),
                os: evil.into(),
                ..Default::default()
            }),
            state: Some(HostState {
                system: Some(SystemSection {
                    collection: None,
                    result: Some(system_section::Result::Error(evil.into())),
                }),
                docker: Some(DockerSection {
                    collection: None,
                    result: Some(docker_section::Result::State(DockerState {
                        engine_version: evil.into(),
                        containers: vec![Container {
                            name: evil.into(),
                            image: evil.into(),
                            compose_project: evil.into(),
                            state: evil.into(),
                            ..Default::default()
                        }],
                    })),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = render(&host, false);
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(!text.contains('\x07'), "{text:?}");
        assert!(!text.lines().any(|l| l.starts_with("fake-row")), "{text}");
        assert!(text.contains("\\u{1b}[2J"), "{text}");
    }
}
