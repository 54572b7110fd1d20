//! Where a connection's DSN and secrets come from: [`PgClientConfig`] (inline DSN, `dsn_file`,
//! `password_file`, timeouts), parsing a libpq DSN (key/value or URL) into what tokio-postgres
//! understands and the TLS keys we apply ourselves, redaction for logs, and percent coding.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio_postgres::config::SslMode;

use crate::{describe, PgError};

/// How long a connection attempt (TCP, TLS and authentication) may take, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long reading the catalog may take, by default.
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Below this a timeout is a typo ("5ms" for "5s"), not a choice.
const MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// How to reach a PostgreSQL cluster: a DSN (inline or in a file), an optional password file and
/// timeouts. Used as `[isolation.auditor]` by the controller; the agent's
/// `[collectors.postgres]` has the same keys plus `enabled`.
///
/// The DSN is libpq's: `host=... port=... user=... dbname=... sslmode=...` or
/// `postgresql://user@host:port/dbname?sslmode=...`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PgClientConfig {
    /// The DSN itself. Prefer `dsn_file` when it carries a password.
    #[serde(default)]
    pub dsn: Option<String>,
    /// A file holding the DSN (the `*_FILE` convention); read at every connection, so a rotated
    /// secret is picked up. Surrounding whitespace is ignored.
    #[serde(default)]
    pub dsn_file: Option<PathBuf>,
    /// A file holding the password, which then must not be in the DSN. Read at every connection.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Bound on connecting: TCP, TLS and authentication together.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on the queries of one run.
    #[serde(default = "default_query_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// [`DEFAULT_CONNECT_TIMEOUT`], for serde.
pub fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}

/// [`DEFAULT_QUERY_TIMEOUT`], for serde.
pub fn default_query_timeout() -> Duration {
    DEFAULT_QUERY_TIMEOUT
}

impl Default for PgClientConfig {
    fn default() -> Self {
        Self {
            dsn: None,
            dsn_file: None,
            password_file: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout: DEFAULT_QUERY_TIMEOUT,
        }
    }
}

impl fmt::Debug for PgClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgClientConfig")
            .field("dsn", &self.dsn.as_deref().map(redacted_dsn))
            .field("dsn_file", &self.dsn_file)
            .field("password_file", &self.password_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl PgClientConfig {
    /// Why this config cannot work, naming the key (relative to its table), if it cannot. Files
    /// are not read here: they may be provisioned after the config is checked.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        match (&self.dsn, &self.dsn_file) {
            (None, None) => {
                return Some((
                    "dsn",
                    "give the connection string as `dsn` or `dsn_file`".into(),
                ))
            }
            (Some(_), Some(_)) => {
                return Some((
                    "dsn_file",
                    "give the connection string once: `dsn` or `dsn_file`, not both".into(),
                ))
            }
            (Some(dsn), None) => match PreparedDsn::parse(dsn) {
                Err(e) => return Some(("dsn", e)),
                Ok(prepared) => {
                    if self.password_file.is_some() && prepared.config.get_password().is_some() {
                        return Some((
                            "password_file",
                            "give the password once: in the DSN or in `password_file`".into(),
                        ));
                    }
                }
            },
            (None, Some(_)) => {}
        }
        if self.connect_timeout < MIN_TIMEOUT {
            return Some((
                "connect_timeout",
                format!("{:?} is below the minimum of 100ms", self.connect_timeout),
            ));
        }
        if self.timeout < MIN_TIMEOUT {
            return Some((
                "timeout",
                format!("{:?} is below the minimum of 100ms", self.timeout),
            ));
        }
        None
    }
}

/// A DSN with every `password` replaced by `<redacted>`, for logs and `Debug`.
pub fn redacted_dsn(dsn: &str) -> String {
    if let Some((scheme, rest)) = url_parts(dsn) {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rsplit_once('@') {
            Some((user_info, hosts)) => match user_info.split_once(':') {
                Some((user, _)) => format!("{user}:<redacted>@{hosts}"),
                None => authority.to_string(),
            },
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let params: Vec<String> = query
                    .split('&')
                    .map(|p| match p.split_once('=') {
                        Some((k, _)) if percent_decode(k) == "password" => {
                            format!("{k}=<redacted>")
                        }
                        _ => p.to_string(),
                    })
                    .collect();
                format!("{path}?{}", params.join("&"))
            }
            None => tail.to_string(),
        };
        return format!("{scheme}{authority}{tail}");
    }
    match key_values(dsn) {
        Ok(pairs) => pairs
            .iter()
            .map(|p| {
                if p.key == "password" {
                    "password=<redacted>".to_string()
                } else {
                    dsn[p.start..p.end].to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => "<unparsable DSN>".into(),
    }
}

/// A secret file's content, without surrounding whitespace.
pub(crate) fn read_secret(path: &Path, what: &'static str) -> Result<String, PgError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| PgError::Secret {
            what,
            path: path.to_path_buf(),
            source,
        })
}

/// What the DSN says about TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DsnTls {
    /// `sslmode` absent, `disable`, `allow` or `prefer`: plain connection.
    Off,
    /// `require`, `verify-ca` or `verify-full`: TLS, and the certificate is verified (chain and
    /// host name) against `root_cert`, or the system's roots when it is absent or `system`.
    Verified { root_cert: Option<PathBuf> },
}

/// A DSN split into what tokio-postgres understands and the libpq TLS keys it does not
/// (`sslmode=verify-*`, `sslrootcert`), which we apply ourselves.
pub(crate) struct PreparedDsn {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) tls: DsnTls,
}

impl PreparedDsn {
    /// Parses a DSN. Errors never quote it (it may hold a password).
    pub(crate) fn parse(dsn: &str) -> Result<Self, String> {
        let dsn = dsn.trim();
        if dsn.is_empty() {
            return Err("the connection string is empty".into());
        }
        let (rest, sslmode, rootcert) = if let Some((scheme, body)) = url_parts(dsn) {
            split_url_tls(scheme, body)
        } else {
            split_key_value_tls(dsn)?
        };
        let tls = match sslmode.as_deref() {
            None | Some("disable") | Some("allow") | Some("prefer") => DsnTls::Off,
            Some("require") | Some("verify-ca") | Some("verify-full") => DsnTls::Verified {
                root_cert: rootcert
                    .filter(|r| r != "system" && !r.is_empty())
                    .map(PathBuf::from),
            },
            Some(other) => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, \
                     verify-full"
                ))
            }
        };
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| describe(&e))?;
        if config.get_user().is_none() {
            return Err("the connection string names no user".into());
        }
        config.ssl_mode(match tls {
            DsnTls::Off => SslMode::Disable,
            DsnTls::Verified { .. } => SslMode::Require,
        });
        Ok(Self { config, tls })
    }
}

/// `("postgresql://", rest)` for a URL DSN.
fn url_parts(dsn: &str) -> Option<(&str, &str)> {
    ["postgresql://", "postgres://"]
        .into_iter()
        .find_map(|scheme| dsn.strip_prefix(scheme).map(|rest| (scheme, rest)))
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query.
fn split_url_tls(scheme: &str, body: &str) -> (String, Option<String>, Option<String>) {
    // The query starts at the first `?` after the user info (a password may hold a raw `?`).
    let after_user = body.rfind('@').map_or(0, |at| at + 1);
    let Some(q) = body[after_user..].find('?').map(|q| q + after_user) else {
        return (format!("{scheme}{body}"), None, None);
    };
    let (head, query) = (&body[..q], &body[q + 1..]);
    let mut sslmode = None;
    let mut rootcert = None;
    let mut kept = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        match percent_decode(k).as_str() {
            "sslmode" => sslmode = Some(percent_decode(v)),
            "sslrootcert" => rootcert = Some(percent_decode(v)),
            _ => kept.push(param),
        }
    }
    let rest = if kept.is_empty() {
        format!("{scheme}{head}")
    } else {
        format!("{scheme}{head}?{}", kept.join("&"))
    };
    (rest, sslmode, rootcert)
}

/// Takes `sslmode` and `sslrootcert` out of a `key=value` DSN.
fn split_key_value_tls(dsn: &str) -> Result<(String, Option<String>, Option<String>), String> {
    let pairs = key_values(dsn)?;
    let mut sslmode = None;
    let mut rootcert = None;
    let mut kept = Vec::new();
    for p in pairs {
        match p.key.as_str() {
            "sslmode" => sslmode = Some(p.value),
            "sslrootcert" => rootcert = Some(p.value),
            _ => kept.push(&dsn[p.start..p.end]),
        }
    }
    Ok((kept.join(" "), sslmode, rootcert))
}

/// One `key=value` of a libpq DSN, with its byte span in the DSN.
struct KeyValue {
    key: String,
    value: String,
    start: usize,
    end: usize,
}

/// Splits a libpq `key=value` DSN: values may be single-quoted, with `\'` and `\\` escapes.
fn key_values(dsn: &str) -> Result<Vec<KeyValue>, String> {
    let bytes = dsn.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_space(i);
        if i >= bytes.len() {
            return Ok(out);
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = dsn[start..i].to_string();
        i = skip_space(i);
        if i >= bytes.len() || bytes[i] != b'=' {
            // Not quoting the word: in a malformed DSN it may be a stray password.
            return Err(format!(
                "expected `key=value` at byte {start} (the {}. word)",
                out.len() + 1
            ));
        }
        i = skip_space(i + 1);
        let mut value = Vec::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return Err(format!("unterminated quoted value of {key:?}")),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        value.push(bytes[i + 1]);
                        i += 2;
                    }
                    Some(&b) => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i]);
                i += 1;
            }
        }
        out.push(KeyValue {
            key,
            value: String::from_utf8_lossy(&value).into_owned(),
            start,
            end: i,
        });
    }
}

/// Decodes `%XX` escapes (URL user info, query values); invalid escapes stay as written,
/// invalid UTF-8 is replaced.
pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// What [`percent_encode`] leaves as is: RFC 3986's unreserved characters.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Escapes everything but unreserved characters as `%XX`, for a URL DSN's path (a database
/// name).
pub fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_are_decoded_and_broken_ones_kept_as_written() {
        assert_eq!(percent_decode("p%40ss%2Fw%C3%B6rd"), "p@ss/wörd");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
        assert_eq!(percent_encode("app db/ö-1.x_~"), "app%20db%2F%C3%B6-1.x_~");
        assert_eq!(percent_decode(&percent_encode("a b%c")), "a b%c");
    }

    #[test]
    fn key_value_dsns_lose_their_tls_keys_and_keep_the_rest() {
        let p = PreparedDsn::parse(
            "host=db.example port=25060 user=auditor password='p w\\'x' dbname=defaultdb \
             sslmode=verify-full sslrootcert=/etc/sentinel/do-ca.pem",
        )
        .unwrap();
        assert_eq!(
            p.tls,
            DsnTls::Verified {
                root_cert: Some(PathBuf::from("/etc/sentinel/do-ca.pem"))
            }
        );
        assert_eq!(p.config.get_user(), Some("auditor"));
        assert_eq!(p.config.get_password(), Some(&b"p w'x"[..]));
        assert_eq!(p.config.get_ports(), &[25060]);
        assert_eq!(p.config.get_ssl_mode(), SslMode::Require);
    }

    #[test]
    fn url_dsns_lose_their_tls_keys_and_keep_the_rest() {
        let p = PreparedDsn::parse(
            "postgresql://doadmin:s3cr%3Ft@db.example:25060/defaultdb?sslmode=require&application_name=x",
        )
        .unwrap();
        assert_eq!(p.tls, DsnTls::Verified { root_cert: None });
        assert_eq!(p.config.get_password(), Some(&b"s3cr?t"[..]));
        assert_eq!(p.config.get_dbname(), Some("defaultdb"));
        let p = PreparedDsn::parse("postgres://u@h/db?sslrootcert=%2Fca.pem&sslmode=verify-ca")
            .unwrap();
        assert_eq!(
            p.tls,
            DsnTls::Verified {
                root_cert: Some(PathBuf::from("/ca.pem"))
            }
        );
    }

    #[test]
    fn tls_is_off_unless_the_dsn_asks_for_it() {
        for dsn in [
            "host=h user=u",
            "host=h user=u sslmode=disable",
            "host=h user=u sslmode=prefer",
            "postgresql://u@h/db",
        ] {
            let p = PreparedDsn::parse(dsn).unwrap();
            assert_eq!(p.tls, DsnTls::Off, "{dsn}");
            assert_eq!(p.config.get_ssl_mode(), SslMode::Disable, "{dsn}");
        }
        let err = PreparedDsn::parse("host=h user=u sslmode=sometimes").err();
        assert!(err.unwrap_or_default().contains("sslmode"));
    }

    #[test]
    fn dsn_errors_and_debug_never_show_the_password() {
        for dsn in [
            "host=h user=u password=hunter2 bogus=1",
            "host=h user=u password='hunter2",
            "host=h user=u hunter2",
            "postgresql://u:hunter2@h:notaport/db",
        ] {
            let err = PreparedDsn::parse(dsn).err().unwrap_or_default();
            assert!(!err.contains("hunter2"), "{err}");
        }
        let config = PgClientConfig {
            dsn: Some("host=h user=u password=hunter2".into()),
            ..Default::default()
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("password=<redacted>"), "{debug}");
        let url = redacted_dsn("postgresql://u:hunter2@h/db?password=hunter2&sslmode=require");
        assert!(!url.contains("hunter2"), "{url}");
        assert!(url.contains("sslmode=require"), "{url}");
    }

    #[test]
    fn config_problems_name_the_key() {
        let none = PgClientConfig::default();
        assert_eq!(none.problem().unwrap().0, "dsn");
        let both = PgClientConfig {
            dsn: Some("host=h user=u".into()),
            dsn_file: Some("/x".into()),
            ..Default::default()
        };
        assert_eq!(both.problem().unwrap().0, "dsn_file");
        let twice = PgClientConfig {
            dsn: Some("host=h user=u password=p".into()),
            password_file: Some("/p".into()),
            ..Default::default()
        };
        assert_eq!(twice.problem().unwrap().0, "password_file");
        let fast = PgClientConfig {
            dsn: Some("host=h user=u".into()),
            timeout: Duration::from_millis(5),
            ..Default::default()
        };
        assert_eq!(fast.problem().unwrap().0, "timeout");
        let no_user = PgClientConfig {
            dsn: Some("host=h".into()),
            ..Default::default()
        };
        assert_eq!(no_user.problem().unwrap().0, "dsn");
    }
}
