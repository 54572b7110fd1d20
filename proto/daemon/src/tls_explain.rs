//! Certificate failures in words: what is wrong and what to do, instead of
//! `Unknown: transport error`, a tonic Debug dump, or `not valid after 1796075397`. The
//! controller logs a peer's refused certificate with [`peer_certificate`]; the agent and the
//! CLI turn a failed call into a sentence with [`status`], which finds the rustls error (or the
//! controller's alert) inside the transport error's chain.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::UnixTime;
use rustls::{AlertDescription, CertificateError};

use crate::certcheck::{rfc3339, short};

fn time(t: &UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.as_secs())
}

fn expired(not_after: &UnixTime, now: &UnixTime) -> String {
    format!(
        "expired at {} ({} ago)",
        rfc3339(time(not_after)),
        short(
            time(now)
                .duration_since(time(not_after))
                .unwrap_or_default()
        )
    )
}

fn not_yet(not_before: &UnixTime, now: &UnixTime) -> String {
    format!(
        "not valid before {} (in {}; is a clock wrong?)",
        rfc3339(time(not_before)),
        short(
            time(not_before)
                .duration_since(time(now))
                .unwrap_or_default()
        )
    )
}

/// What is wrong with a certificate, in words (`expired at 2026-…`, `not issued by the fleet
/// CA`); `None` for errors that are not about a certificate.
pub fn certificate(e: &rustls::Error) -> Option<String> {
    let rustls::Error::InvalidCertificate(cert) = e else {
        return None;
    };
    Some(match cert {
        CertificateError::ExpiredContext { time, not_after } => expired(not_after, time),
        CertificateError::Expired => "expired".into(),
        CertificateError::NotValidYetContext { time, not_before } => not_yet(not_before, time),
        CertificateError::NotValidYet => "not valid yet (is a clock wrong?)".into(),
        CertificateError::UnknownIssuer => "not issued by the fleet CA".into(),
        // Two CAs of the same name: the issuer matches, its signature does not.
        CertificateError::BadSignature => {
            "not issued by the fleet CA (its signature does not verify against it)".into()
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("not valid for the name dialled ({cert})")
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!("issued for another purpose ({cert})")
        }
        other => other.to_string(),
    })
}

/// The controller's log line for a client certificate its handshake refused.
pub fn peer_certificate(e: &rustls::Error) -> String {
    match certificate(e) {
        Some(what) => format!("client certificate {what}"),
        None => e.to_string(),
    }
}

/// A client's sentence for a TLS failure: the controller refused our certificate (an alert),
/// or we refused the controller's.
pub fn client(e: &rustls::Error) -> Option<String> {
    if let rustls::Error::AlertReceived(alert) = e {
        let (what, todo) = match alert {
            AlertDescription::CertificateExpired => (
                "it has expired or is not valid yet",
                "renew it (`sentinel pki issue-host NAME` or `issue-operator`, or enrol the host \
                 again) and check the clocks",
            ),
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::DecryptError
            | AlertDescription::UnsupportedCertificate => (
                "it is not issued by the fleet CA the controller trusts",
                "use a certificate issued by this fleet's CA (check `tls.cert` and `tls.ca`)",
            ),
            AlertDescription::CertificateRequired => (
                "none was sent",
                "configure a client certificate (`tls.cert`, `tls.key`)",
            ),
            AlertDescription::CertificateRevoked => (
                "it is revoked",
                "ask an admin (`sentinel operators revoked`)",
            ),
            _ => return Some(format!("the controller ended the TLS handshake: {alert:?}")),
        };
        return Some(format!(
            "the controller refused this certificate: {what}; {todo}"
        ));
    }
    certificate(e).map(|what| {
        format!(
            "the controller's certificate is {what}: check `tls.ca` (the fleet CA) and the \
             controller's certificate"
        )
    })
}

/// The first rustls error in `e`'s source chain (through I/O errors, which carry it).
pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(tls);
            }
        }
        next = err.source();
    }
    None
}

/// The alerts a controller sends about a client certificate.
const CERTIFICATE_ALERTS: [AlertDescription; 8] = [
    AlertDescription::CertificateExpired,
    AlertDescription::UnknownCA,
    AlertDescription::BadCertificate,
    AlertDescription::CertificateUnknown,
    AlertDescription::DecryptError,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::CertificateRequired,
    AlertDescription::CertificateRevoked,
];

/// The alert named in an error's text. HTTP/2 keeps only the text of the I/O error that ended
/// a connection (`received fatal alert: CertificateExpired`), not the rustls error itself.
fn alert_in(text: &str) -> Option<rustls::Error> {
    CERTIFICATE_ALERTS
        .into_iter()
        .find(|a| text.contains(&format!("received fatal alert: {a:?}")))
        .map(rustls::Error::AlertReceived)
}

/// A failed call in words: the certificate problem when there is one in the chain, else the
/// status code and message (never the status' Debug form).
pub fn status(s: &tonic::Status) -> String {
    use std::error::Error as _;
    if let Some(text) = s.source().and_then(find).and_then(client) {
        return text;
    }
    let chain = s.source().map(crate::error_chain).unwrap_or_default();
    if let Some(text) = alert_in(&chain).as_ref().and_then(client) {
        return text;
    }
    let mut out = format!("{:?}: {}", s.code(), s.message());
    if !chain.is_empty() && !out.contains(&chain) {
        out.push_str(" (");
        out.push_str(&chain);
        out.push(')');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_certificate_reads_as_a_date_and_an_age() {
        let now = UnixTime::since_unix_epoch(Duration::from_secs(1_796_075_397));
        let not_after = UnixTime::since_unix_epoch(Duration::from_secs(1_796_075_397 - 7200));
        let e = rustls::Error::InvalidCertificate(CertificateError::ExpiredContext {
            time: now,
            not_after,
        });
        let line = peer_certificate(&e);
        assert!(line.contains("expired at 2026-"), "{line}");
        assert!(line.contains("2h0m ago"), "{line}");
        assert!(!line.contains("1796075397"), "{line}");
    }

    #[test]
    fn an_alert_inside_an_io_error_is_found_and_explained() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateExpired),
        );
        let found = find(&io).and_then(client).unwrap();
        assert!(found.starts_with("the controller refused this certificate: it has expired"));
    }
}
