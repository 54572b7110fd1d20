//! What an nginx config serves: every `server` block's names, listens and proxy targets
//! (upstream blocks resolved to their servers), and the TLS certificates it presents, with
//! subject, DNS names and expiry read from the files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use sentinel_proto::v1::{NginxCertificate, NginxRoute, NginxServer};

use super::config::Directive;
use super::full_name;

/// The servers of a parsed config and the certificate files they use.
#[derive(Debug, Default)]
pub(super) struct Served {
    pub(super) servers: Vec<NginxServer>,
    /// Certificate path (as written, resolved) → the server names that serve it.
    pub(super) certificates: BTreeMap<String, BTreeSet<String>>,
}

impl Served {
    pub(super) fn from_tree(tree: &[Directive], conf_dir: &Path) -> Self {
        let mut out = Self::default();
        let http: Vec<&Directive> = tree.iter().filter(|d| d.name == "http").collect();
        // Upstreams may be declared after the servers that use them.
        let upstreams: BTreeMap<&str, Vec<String>> = http
            .iter()
            .flat_map(|h| h.children())
            .filter(|d| d.name == "upstream" && d.block.is_some())
            .filter_map(|u| {
                let servers = u
                    .children()
                    .iter()
                    .filter(|d| d.name == "server")
                    .filter_map(|d| d.arg(0).map(str::to_string))
                    .collect();
                u.arg(0).map(|name| (name, servers))
            })
            .collect();
        for h in http {
            // A server without its own ssl_certificate inherits the http level's.
            let inherited = cert_paths(h.children(), conf_dir);
            for server in h
                .children()
                .iter()
                .filter(|d| d.name == "server" && d.block.is_some())
            {
                out.add_server(server, &inherited, &upstreams, conf_dir);
            }
        }
        out
    }

    pub(super) fn add_server(
        &mut self,
        server: &Directive,
        inherited: &[String],
        upstreams: &BTreeMap<&str, Vec<String>>,
        conf_dir: &Path,
    ) {
        let directives = server.children();
        let server_names: Vec<String> = directives
            .iter()
            .filter(|d| d.name == "server_name")
            .flat_map(|d| d.args.iter().cloned())
            .collect();
        let listens: Vec<&Directive> = directives.iter().filter(|d| d.name == "listen").collect();
        let ssl = listens.iter().any(|l| l.args.iter().any(|a| a == "ssl"))
            || directives
                .iter()
                .any(|d| d.name == "ssl" && d.arg(0) == Some("on"));
        let own = cert_paths(directives, conf_dir);
        let certs = if own.is_empty() { inherited } else { &own };
        for cert in certs {
            let served_for = self.certificates.entry(cert.clone()).or_default();
            // Without TLS on a listen the certificate is configured but not served.
            if ssl {
                served_for.extend(server_names.iter().cloned());
            }
        }
        let mut routes = Vec::new();
        collect_routes(directives, None, upstreams, &mut routes);
        self.servers.push(NginxServer {
            server_names,
            listen: listens.iter().map(|l| l.args.join(" ")).collect(),
            routes,
            source: format!("{}:{}", server.file.display(), server.line),
        });
    }
}

/// The `ssl_certificate` files among `directives`, resolved against the conf dir. Paths with
/// variables (chosen per request) and inline `data:` certificates are kept as written.
pub(super) fn cert_paths(directives: &[Directive], conf_dir: &Path) -> Vec<String> {
    directives
        .iter()
        .filter(|d| d.name == "ssl_certificate")
        .filter_map(|d| d.arg(0))
        .map(|p| {
            if p.contains('$') || p.starts_with("data:") {
                p.to_string()
            } else {
                full_name(conf_dir, Path::new(p)).display().to_string()
            }
        })
        .collect()
}

/// The proxy targets under `directives`: every `proxy_pass`/`grpc_pass` in a `location`
/// (nested ones, and those in its `if` and `limit_except` blocks, included).
pub(super) fn collect_routes(
    directives: &[Directive],
    location: Option<&str>,
    upstreams: &BTreeMap<&str, Vec<String>>,
    routes: &mut Vec<NginxRoute>,
) {
    for d in directives {
        match (d.name.as_str(), location) {
            ("location", _) if d.block.is_some() => {
                let name = d.args.join(" ");
                collect_routes(d.children(), Some(&name), upstreams, routes);
            }
            ("if" | "limit_except", Some(_)) => {
                collect_routes(d.children(), location, upstreams, routes);
            }
            ("proxy_pass" | "grpc_pass", Some(location)) => {
                let Some(target) = d.arg(0) else { continue };
                let target = if d.name == "grpc_pass" && !target.contains("://") {
                    format!("grpc://{target}")
                } else {
                    target.to_string()
                };
                routes.push(NginxRoute {
                    location: location.to_string(),
                    upstream_servers: upstream_servers(&target, upstreams),
                    proxy_pass: target,
                });
            }
            _ => {}
        }
    }
}

/// The servers of the upstream block a target names (`http://backend/path` → `backend`'s),
/// or nothing when it names a host, a unix socket or a variable.
pub(super) fn upstream_servers(
    target: &str,
    upstreams: &BTreeMap<&str, Vec<String>>,
) -> Vec<String> {
    let rest = target.split_once("://").map_or(target, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('$') || authority.starts_with("unix:") {
        return Vec::new();
    }
    let host = authority
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(authority, |(host, _)| host);
    upstreams
        .get(authority)
        .or_else(|| upstreams.get(host))
        .cloned()
        .unwrap_or_default()
}

/// Reads a certificate file's first certificate (the leaf; the chain follows it).
pub(super) fn read_certificate(path: &str, served_for: BTreeSet<String>) -> NginxCertificate {
    let mut cert = NginxCertificate {
        path: path.to_string(),
        served_for: served_for.into_iter().collect(),
        ..NginxCertificate::default()
    };
    if path.contains('$') {
        cert.error = "the path has variables: nginx picks the file per request".into();
        return cert;
    }
    if path.starts_with("data:") {
        cert.error = "the certificate is given inline (data:), not as a file".into();
        return cert;
    }
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) => {
            cert.error = format!("cannot read {path}: {e}");
            return cert;
        }
    };
    match describe_certificate(&pem) {
        Ok((subject, dns_names, not_after)) => {
            cert.subject = subject;
            cert.dns_names = dns_names;
            cert.not_after = Some(prost_types::Timestamp {
                seconds: not_after,
                nanos: 0,
            });
        }
        Err(e) => cert.error = format!("{path}: {e}"),
    }
    cert
}

/// Subject, DNS names and expiry (Unix seconds) of the first certificate in a PEM file.
pub(super) fn describe_certificate(pem: &[u8]) -> Result<(String, Vec<String>, i64), String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::pem::Pem;

    let mut found = None;
    for block in Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| format!("not a PEM file: {e}"))?;
        if block.label == "CERTIFICATE" {
            found = Some(block);
            break;
        }
    }
    let block = found.ok_or("no CERTIFICATE in the file")?;
    let x509 = block
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let dns_names = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some(dns.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("bad subjectAltName: {e}")),
    };
    Ok((
        x509.subject().to_string(),
        dns_names,
        x509.validity().not_after.timestamp(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collectors::nginx::config::tests::parse;

    #[test]
    pub(super) fn servers_routes_upstreams_and_certificates_are_resolved() {
        let tree = parse(
            "pid run/nginx.pid;\n\
             http {\n\
               ssl_certificate /certs/default.pem;\n\
               server {\n\
                 listen 443 ssl; server_name a.test b.test;\n\
                 location / { proxy_pass http://app/; }\n\
                 location /api/ {\n\
                   location /api/v2/ { if ($x) { proxy_pass http://app:8080; } }\n\
                   grpc_pass 127.0.0.1:9000;\n\
                 }\n\
                 location /direct { proxy_pass https://10.0.0.1:8443/x; }\n\
                 location /var { proxy_pass http://$backend; }\n\
               }\n\
               server { listen 80; server_name plain.test; }\n\
               server { listen 8443 ssl; server_name own.test; ssl_certificate own.pem; }\n\
               upstream app { server 10.0.0.2:8080 weight=2; server 10.0.0.3:8080 backup; }\n\
             }\n",
        )
        .unwrap();
        let served = Served::from_tree(&tree, Path::new("/etc/nginx"));
        let s = &served.servers;
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].server_names, ["a.test", "b.test"]);
        assert_eq!(s[0].listen, ["443 ssl"]);
        assert_eq!(s[0].source, "test.conf:4");
        let app = vec!["10.0.0.2:8080".to_string(), "10.0.0.3:8080".into()];
        let routes: Vec<_> = s[0]
            .routes
            .iter()
            .map(|r| {
                (
                    r.location.as_str(),
                    r.proxy_pass.as_str(),
                    &r.upstream_servers,
                )
            })
            .collect();
        assert_eq!(
            routes,
            [
                ("/", "http://app/", &app),
                ("/api/v2/", "http://app:8080", &app),
                ("/api/", "grpc://127.0.0.1:9000", &vec![]),
                ("/direct", "https://10.0.0.1:8443/x", &vec![]),
                ("/var", "http://$backend", &vec![]),
            ]
        );
        assert!(s[1].routes.is_empty());
        let certs: Vec<_> = served
            .certificates
            .iter()
            .map(|(p, names)| (p.as_str(), names.iter().map(String::as_str).collect()))
            .collect::<Vec<(&str, Vec<&str>)>>();
        // plain.test inherits the http-level certificate but has no TLS listen.
        assert_eq!(
            certs,
            [
                ("/certs/default.pem", vec!["a.test", "b.test"]),
                ("/etc/nginx/own.pem", vec!["own.test"]),
            ]
        );
    }
}
