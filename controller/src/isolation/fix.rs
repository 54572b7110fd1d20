//! The statements that close isolation holes: building them (identifiers quoted only where
//! PostgreSQL needs it), gathering them into one plan, printing it as a script, and applying it
//! in ONE transaction, so a fix is never half-applied.
//!
//! Names come from the cluster, and anyone who can create a role chooses one. Everything
//! printed must be safe to feed to `psql -f` as an administrator whatever the names hold: a
//! name with a control character (a newline would end a `--` comment and start a statement)
//! is written as a `U&"..."` identifier with the character escaped, and comments go through
//! [`one_line`].

use std::collections::BTreeMap;
use std::time::Duration;

use sentinel_postgres::{describe, Catalog, DatabaseGrant, Grantee, PgConnection};

use super::audit::Violation;
use crate::cli::format::one_line;

/// Keywords that cannot be a bare role or database name (PostgreSQL's reserved,
/// type/function-name and column-name keywords: `pg_get_keywords()` where `catcode <> 'U'`).
const NOT_BARE: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "between",
    "bigint",
    "binary",
    "bit",
    "boolean",
    "both",
    "case",
    "cast",
    "char",
    "character",
    "check",
    "coalesce",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "dec",
    "decimal",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "exists",
    "extract",
    "false",
    "fetch",
    "float",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "greatest",
    "group",
    "grouping",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "inout",
    "int",
    "integer",
    "intersect",
    "interval",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "least",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "national",
    "natural",
    "nchar",
    "none",
    "normalize",
    "not",
    "notnull",
    "null",
    "nullif",
    "numeric",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "out",
    "outer",
    "overlaps",
    "overlay",
    "placing",
    "position",
    "precision",
    "primary",
    "real",
    "references",
    "returning",
    "right",
    "row",
    "select",
    "session_user",
    "setof",
    "similar",
    "smallint",
    "some",
    "substring",
    "symmetric",
    "table",
    "tablesample",
    "then",
    "time",
    "timestamp",
    "to",
    "trailing",
    "treat",
    "trim",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "values",
    "varchar",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
    "xmlattributes",
    "xmlconcat",
    "xmlelement",
    "xmlexists",
    "xmlforest",
    "xmlnamespaces",
    "xmlparse",
    "xmlpi",
    "xmlroot",
    "xmlserialize",
    "xmltable",
    // PUBLIC means every role when bare.
    "public",
];

/// `name` as an SQL identifier: bare when PostgreSQL reads it back unchanged, else quoted; a
/// name holding a control character as a Unicode-escaped `U&"..."` identifier, so the
/// statement stays one printable line that means the same to the server.
pub fn quote_ident(name: &str) -> String {
    if name.chars().any(char::is_control) {
        let mut out = String::from("U&\"");
        for c in name.chars() {
            match c {
                '"' => out.push_str("\"\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\{:04x}", u32::from(c))),
                c => out.push(c),
            }
        }
        out.push('"');
        return out;
    }
    let simple = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if simple && !NOT_BARE.contains(&name) {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

fn grantee_sql(grantee: &Grantee) -> String {
    match grantee {
        Grantee::Public => "PUBLIC".into(),
        Grantee::Role(name) => quote_ident(name),
    }
}

/// `REVOKE CONNECT ON DATABASE db FROM grantee`.
pub fn revoke_connect(db: &str, grantee: &Grantee) -> String {
    format!(
        "REVOKE CONNECT ON DATABASE {} FROM {}",
        quote_ident(db),
        grantee_sql(grantee)
    )
}

/// The statements that take `grant`'s CONNECT on `db` (owned by `owner`) away, one per
/// grantor: a REVOKE only removes the grant of the role that runs it (of the owner when a
/// superuser runs it), so a grant made by another role is revoked as that role (`SET ROLE`,
/// which needs a superuser). With `cascade` (the grantee passed its grant option on), the
/// grants it made go too: PostgreSQL refuses the REVOKE otherwise ("dependent privileges
/// exist").
pub fn revoke_connect_grant(
    db: &str,
    owner: &str,
    grant: &DatabaseGrant,
    cascade: bool,
) -> Vec<String> {
    let revoke = format!(
        "{}{}",
        revoke_connect(db, &grant.grantee),
        if cascade { " CASCADE" } else { "" }
    );
    let others: Vec<&String> = grant
        .connect_grantors
        .iter()
        .filter(|g| *g != owner)
        .collect();
    let mut out = Vec::new();
    // A grant by a former owner is the owner's now (ALTER DATABASE OWNER rewrites the ACL),
    // and an ACL read without grantors has only the owner's: the plain REVOKE covers both.
    if others.len() < grant.connect_grantors.len() || grant.connect_grantors.is_empty() {
        out.push(revoke.clone());
    }
    for grantor in others {
        out.push(format!(
            "SET ROLE {}; {revoke}; RESET ROLE",
            quote_ident(grantor)
        ));
    }
    out
}

/// `GRANT CONNECT ON DATABASE db TO a, b`, or nothing for no role.
pub fn grant_connect(db: &str, roles: &[&str]) -> Option<String> {
    if roles.is_empty() {
        return None;
    }
    let roles: Vec<String> = roles.iter().map(|r| quote_ident(r)).collect();
    Some(format!(
        "GRANT CONNECT ON DATABASE {} TO {}",
        quote_ident(db),
        roles.join(", ")
    ))
}

/// `REVOKE role FROM member`. From PostgreSQL 16 a membership may have been granted several
/// times by different grantors, and a REVOKE only removes the grant of the grantor it names:
/// one statement per grantor then.
pub fn revoke_membership(catalog: &Catalog, role: &str, member: &str) -> Vec<String> {
    let base = format!("REVOKE {} FROM {}", quote_ident(role), quote_ident(member));
    if catalog.server_version_num < 160_000 {
        return vec![base];
    }
    let mut grantors: Vec<&str> = catalog
        .memberships
        .iter()
        .filter(|m| m.role == role && m.member == member && !m.grantor.is_empty())
        .map(|m| m.grantor.as_str())
        .collect();
    grantors.sort_unstable();
    grantors.dedup();
    if grantors.is_empty() {
        return vec![base];
    }
    grantors
        .into_iter()
        .map(|g| format!("{base} GRANTED BY {}", quote_ident(g)))
        .collect()
}

/// `ALTER ROLE role ATTRIBUTE`, e.g. `NOSUPERUSER`.
pub fn alter_role(role: &str, attribute: &str) -> String {
    format!("ALTER ROLE {} {attribute}", quote_ident(role))
}

/// `ALTER DATABASE db OWNER TO owner`.
pub fn alter_owner(db: &str, owner: &str) -> String {
    format!(
        "ALTER DATABASE {} OWNER TO {}",
        quote_ident(db),
        quote_ident(owner)
    )
}

/// Every statement that closes the holes of an audit, each once, with the violations it closes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FixPlan {
    /// Groups of violations sharing the same fix, in the order their statements run.
    pub groups: Vec<FixGroup>,
    /// Violations no statement can close (found only by the server's own verdict).
    pub unfixable: Vec<String>,
}

/// Statements and the violations (paths) they close.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FixGroup {
    /// The violations' paths.
    pub closes: Vec<String>,
    /// The statements, minus those an earlier group already has.
    pub statements: Vec<String>,
}

impl FixPlan {
    /// The plan for `violations`.
    pub fn new(violations: &[Violation]) -> Self {
        let mut by_fix: BTreeMap<(u8, Vec<String>), Vec<String>> = BTreeMap::new();
        let mut unfixable = Vec::new();
        for v in violations {
            if v.fix.is_empty() {
                unfixable.push(v.path.clone());
                continue;
            }
            let order = v.fix.first().map_or(9, |s| rank(s));
            by_fix
                .entry((order, v.fix.clone()))
                .or_default()
                .push(v.path.clone());
        }
        let mut emitted: Vec<String> = Vec::new();
        let mut groups = Vec::new();
        for ((_, statements), closes) in by_fix {
            let statements: Vec<String> = statements
                .into_iter()
                .filter(|s| !emitted.contains(s))
                .collect();
            emitted.extend(statements.iter().cloned());
            groups.push(FixGroup { closes, statements });
        }
        Self { groups, unfixable }
    }

    /// Every statement, in order, each once.
    pub fn statements(&self) -> Vec<&str> {
        self.groups
            .iter()
            .flat_map(|g| g.statements.iter().map(String::as_str))
            .collect()
    }

    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.groups.iter().all(|g| g.statements.is_empty())
    }

    /// The plan as a psql script: one transaction, each group preceded by the violations it
    /// closes.
    pub fn script(&self) -> String {
        let mut out = String::new();
        if self.is_empty() {
            out.push_str("-- nothing to run\n");
        } else {
            out.push_str("BEGIN;\n");
            for group in &self.groups {
                for path in &group.closes {
                    out.push_str(&format!("-- closes: {}\n", one_line(path)));
                }
                for statement in &group.statements {
                    out.push_str(&format!("{statement};\n"));
                }
            }
            out.push_str("COMMIT;\n");
        }
        for path in &self.unfixable {
            out.push_str(&format!(
                "-- no statement derived for: {}\n",
                one_line(path)
            ));
        }
        out
    }
}

/// Run order: roles lose their powers first, then ownership moves, then memberships go, then
/// grants made by other grantors are revoked as them, then CONNECT is revoked (CASCADE, where
/// a grant was passed on, finds nothing already revoked by its grantor) and granted back
/// explicitly.
fn rank(statement: &str) -> u8 {
    if statement.starts_with("ALTER ROLE") {
        0
    } else if statement.starts_with("ALTER DATABASE") {
        1
    } else if statement.starts_with("SET ROLE") {
        3
    } else if statement.starts_with("REVOKE CONNECT") {
        4
    } else if statement.starts_with("REVOKE") {
        2
    } else {
        5
    }
}

/// What an applied fix did: the statements that changed the catalog, and those that changed
/// nothing (the privilege was not there as the statement's role sees it, or already granted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Statements after which the catalog differed.
    pub changed: Vec<String>,
    /// Statements after which it did not.
    pub unchanged: Vec<String>,
}

/// A digest of everything a fix statement can change: database owners and ACLs, role
/// attributes, memberships. Compared before and after each statement, inside the transaction.
const FINGERPRINT_SQL: &str = "\
SELECT pg_catalog.md5(concat_ws('|', \
  (SELECT string_agg(concat_ws(':', d.oid, d.datdba, d.datacl), ',' ORDER BY d.oid) \
     FROM pg_catalog.pg_database d), \
  (SELECT string_agg(concat_ws(':', r.oid, r.rolsuper, r.rolcreaterole, r.rolbypassrls, \
          r.rolinherit, r.rolcanlogin), ',' ORDER BY r.oid) FROM pg_catalog.pg_roles r), \
  (SELECT string_agg(m::text, ',' ORDER BY m::text) FROM pg_catalog.pg_auth_members m)))";

/// A fix that could not be applied; nothing of it was.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A statement failed; the transaction was rolled back.
    #[error("{statement}: {message} (the whole fix was rolled back)")]
    Statement {
        /// The statement.
        statement: String,
        /// The server's reason.
        message: String,
    },
    /// Starting or committing the transaction failed.
    #[error("{what} on {target}: {message} (nothing was applied)")]
    Transaction {
        /// "BEGIN" or "COMMIT".
        what: &'static str,
        /// `user@host:port/db`.
        target: String,
        /// The server's reason.
        message: String,
    },
    /// The whole fix took longer than allowed.
    #[error("applying the fix on {target} took longer than {after:?} (nothing was applied)")]
    Timeout {
        /// `user@host:port/db`.
        target: String,
        /// The bound.
        after: Duration,
    },
}

/// Runs every statement of `plan` in one transaction: all or nothing. Says which statements
/// changed something: a REVOKE of a grant the running role did not make succeeds silently.
pub async fn apply(
    connection: &mut PgConnection,
    plan: &FixPlan,
    timeout: Duration,
) -> Result<Applied, ApplyError> {
    let target = connection.target.clone();
    let PgConnection {
        client, notices, ..
    } = connection;
    let run = async {
        let tx = client
            .transaction()
            .await
            .map_err(|e| ApplyError::Transaction {
                what: "BEGIN",
                target: target.clone(),
                message: describe(&e),
            })?;
        let fingerprint = || async {
            let row = tx.query_one(FINGERPRINT_SQL, &[]).await?;
            row.try_get::<_, Option<String>>(0)
        };
        let mut applied = Applied::default();
        let mut before = fingerprint().await.map_err(|e| ApplyError::Statement {
            statement: "reading the catalog before the fix".into(),
            message: describe(&e),
        })?;
        for statement in plan.statements() {
            // Dropping the transaction on an early return rolls it back.
            if let Err(e) = tx.batch_execute(statement).await {
                return Err(ApplyError::Statement {
                    statement: statement.to_string(),
                    message: describe(&e),
                });
            }
            // A GRANT or REVOKE the role may not make does not fail: it warns and does
            // nothing. A fix that silently did nothing must not commit as if it had worked.
            while let Ok(notice) = notices.try_recv() {
                if notice.severity() == "WARNING" {
                    return Err(ApplyError::Statement {
                        statement: statement.to_string(),
                        message: format!(
                            "WARNING: {}: the role applying the fix lacks the right (apply as \
                             the databases' owner or a superuser, e.g. with --dsn-file)",
                            notice.message()
                        ),
                    });
                }
            }
            let after = fingerprint().await.map_err(|e| ApplyError::Statement {
                statement: format!("reading the catalog after {statement}"),
                message: describe(&e),
            })?;
            if after == before {
                applied.unchanged.push(statement.to_string());
            } else {
                applied.changed.push(statement.to_string());
            }
            before = after;
        }
        tx.commit().await.map_err(|e| ApplyError::Transaction {
            what: "COMMIT",
            target: target.clone(),
            message: describe(&e),
        })?;
        Ok(applied)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(result) => result,
        Err(_) => Err(ApplyError::Timeout {
            target: target.clone(),
            after: timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolation::audit::ViolationKind;

    #[test]
    fn identifiers_are_quoted_only_when_needed() {
        assert_eq!(quote_ident("s60_auth_prod"), "s60_auth_prod");
        assert_eq!(quote_ident("user"), "\"user\"");
        assert_eq!(quote_ident("public"), "\"public\"");
        assert_eq!(quote_ident("App-Prod"), "\"App-Prod\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_ident("9lives"), "\"9lives\"");
        assert_eq!(quote_ident(""), "\"\"");
        // A control character: one printable line, the same name to the server.
        assert_eq!(
            quote_ident("ops\nALTER ROLE x SUPERUSER;\n-- \"q\" \\"),
            "U&\"ops\\000aALTER ROLE x SUPERUSER;\\000a-- \"\"q\"\" \\\\\""
        );
    }

    #[test]
    fn names_cannot_break_out_of_the_scripts_comments() {
        let plan = FixPlan::new(&[
            violation(
                "u → ops\nALTER ROLE u SUPERUSER;\n-- x has CONNECT on d",
                &["REVOKE CONNECT ON DATABASE d FROM U&\"ops\\000a\""],
            ),
            violation("evil\r\nDROP DATABASE d;", &[]),
        ]);
        let script = plan.script();
        for line in script.lines() {
            assert!(
                line.starts_with("--") || line.ends_with(';'),
                "a line neither comment nor statement: {line:?}\n{script}"
            );
        }
        assert!(
            !script.lines().any(|l| l.starts_with("ALTER ROLE")),
            "{script}"
        );
        assert!(!script.lines().any(|l| l.starts_with("DROP")), "{script}");
    }

    fn violation(path: &str, fix: &[&str]) -> Violation {
        Violation {
            user: "u".into(),
            user_environment: "a".into(),
            database: "d".into(),
            database_environment: "b".into(),
            kind: ViolationKind::Connect,
            path: path.into(),
            fix: fix.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_plan_runs_each_statement_once_in_a_sensible_order() {
        let plan = FixPlan::new(&[
            violation(
                "u → PUBLIC has CONNECT on d",
                &[
                    "REVOKE CONNECT ON DATABASE d FROM PUBLIC",
                    "GRANT CONNECT ON DATABASE d TO x",
                ],
            ),
            violation(
                "v → PUBLIC has CONNECT on d",
                &[
                    "REVOKE CONNECT ON DATABASE d FROM PUBLIC",
                    "GRANT CONNECT ON DATABASE d TO x",
                ],
            ),
            violation("u is SUPERUSER", &["ALTER ROLE u NOSUPERUSER"]),
            violation("unexplained", &[]),
        ]);
        assert_eq!(
            plan.statements(),
            [
                "ALTER ROLE u NOSUPERUSER",
                "REVOKE CONNECT ON DATABASE d FROM PUBLIC",
                "GRANT CONNECT ON DATABASE d TO x"
            ]
        );
        let script = plan.script();
        assert!(
            script.starts_with("BEGIN;\n-- closes: u is SUPERUSER\nALTER ROLE"),
            "{script}"
        );
        assert!(script.contains("-- closes: u → PUBLIC has CONNECT on d\n-- closes: v → PUBLIC"));
        assert!(script.contains("COMMIT;\n-- no statement derived for: unexplained\n"));
        assert!(FixPlan::new(&[]).is_empty());
    }
}
