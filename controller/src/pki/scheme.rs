//! The identity scheme: how a fleet certificate names its holder. The issuer ([`super::issue`])
//! writes these names and the controller's identity check (`crate::identity`) reads them back,
//! so both take them from here:
//!
//! * host: subject `CN=NAME, O=Sentinel fleet, OU=host`, SAN URI
//!   `sentinel://host/NAME` ([`HOST_URI_PREFIX`]), EKU clientAuth;
//! * operator: subject `CN=NAME, O=Sentinel fleet, OU=operator`, SAN URI
//!   `sentinel://operator/ROLE/NAME` ([`OPERATOR_URI_PREFIX`]), EKU clientAuth.

use std::fmt;
use std::str::FromStr;

use super::PkiError;

/// Prefix of the SAN URI that names a host: `sentinel://host/NAME`.
pub const HOST_URI_PREFIX: &str = sentinel_daemon::csr::HOST_URI_PREFIX;
/// Prefix of the SAN URI that names an operator: `sentinel://operator/ROLE/NAME`.
pub const OPERATOR_URI_PREFIX: &str = "sentinel://operator/";
/// Subject organisation (O) of every fleet certificate.
pub const FLEET_ORGANIZATION: &str = "Sentinel fleet";
/// Subject organisational unit (OU) of host certificates.
pub const HOST_OU: &str = "host";
/// Subject organisational unit (OU) of operator certificates.
pub const OPERATOR_OU: &str = "operator";
/// Subject organisational unit (OU) of the controller's server certificate.
pub const CONTROLLER_OU: &str = "controller";
/// Common name (CN) of the development fleet CA.
pub const CA_COMMON_NAME: &str = "Sentinel dev fleet CA";
/// Common name (CN) of the online issuing CA (`sentinel pki init-issuer`).
pub const ISSUER_COMMON_NAME: &str = "Sentinel fleet issuing CA";
/// Common name (CN) of the controller's server certificate.
pub const CONTROLLER_COMMON_NAME: &str = "Sentinel controller";

/// Longest accepted host or operator name.
const MAX_NAME_LEN: usize = 63;

/// Operator roles, ordered by privilege: viewer < deployer < admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Role {
    /// Read-only access to fleet state.
    Viewer,
    /// May deploy, in addition to viewing.
    Deployer,
    /// Full control of the fleet.
    Admin,
}

impl Role {
    /// Every role, lowest privilege first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Deployer, Role::Admin];

    /// The role's name as used on the command line and in SAN URIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;

    /// Parses `viewer`, `deployer` or `admin` (exactly, lowercase).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| PkiError::InvalidRole {
                value: s.to_owned(),
            })
    }
}

/// Checks that `name` is usable as a host or operator name: a lowercase
/// DNS-label-like string matching `[a-z0-9]([a-z0-9-.]{0,61}[a-z0-9])?`,
/// additionally without empty labels (`..`).
pub fn validate_name(name: &str) -> Result<(), PkiError> {
    let invalid = |reason: String| {
        Err(PkiError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("must not be empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return invalid(format!("must be at most {MAX_NAME_LEN} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '.'))
    {
        return invalid(format!(
            "contains {c:?}; only lowercase letters, digits, '-' and '.' are allowed"
        ));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return invalid("must start and end with a lowercase letter or digit".to_owned());
    }
    if name.contains("..") {
        return invalid("must not contain \"..\"".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_display_and_order() {
        for role in Role::ALL {
            assert_eq!(role.to_string().parse::<Role>().expect("parse"), role);
        }
        assert!(Role::Viewer < Role::Deployer && Role::Deployer < Role::Admin);
        assert!(matches!(
            "Admin".parse::<Role>(),
            Err(PkiError::InvalidRole { .. })
        ));
        assert!(matches!(
            "root".parse::<Role>(),
            Err(PkiError::InvalidRole { .. })
        ));
    }

    #[test]
    fn invalid_names_are_refused() {
        for bad in [
            "Bad_Name",
            "",
            "../x",
            "a/b",
            "-a",
            "a-",
            ".a",
            "a..b",
            "UPPER",
            "sp ace",
            &"a".repeat(64),
        ] {
            match validate_name(bad) {
                Err(PkiError::InvalidName { name, .. }) => assert_eq!(name, bad),
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
        for good in ["a", "0", "hub-alfa", "web1.example", &"a".repeat(63)] {
            validate_name(good).unwrap_or_else(|e| panic!("{good:?} refused: {e}"));
        }
    }
}
