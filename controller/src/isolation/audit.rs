//! The audit: a catalog snapshot and the policy in, violations out, with no I/O (so every rule
//! is unit-tested without a server).
//!
//! For every user of one environment and every database of another it looks for each way in,
//! and names the path:
//!
//! - **CONNECT** in the database's ACL (`datacl`, or its built-in default) granted to the user,
//!   to PUBLIC, or to any role the user inherits privileges from (`pg_auth_members`, following
//!   INHERIT: the member's `rolinherit` before PostgreSQL 16, the grant's `inherit_option`
//!   from 16 on), because that is what PostgreSQL checks when a session starts;
//! - **ownership** of the database by the user or by a role it can become (through inheritance
//!   or SET ROLE: an owner can `GRANT CONNECT` to itself from any database of the cluster);
//! - **membership** in another environment's user, directly or through a chain of roles;
//! - **SUPERUSER** (passes every check), **CREATEROLE** (can grant itself roles that reach the
//!   database) and **BYPASSRLS**, held by the user or by a role it can SET ROLE to.
//!
//! `has_database_privilege` is not used as evidence, since it cannot say *why*; when the
//! caller has its verdicts, any CONNECT it grants that none of the rules explains is reported
//! too, so a rule this module lacks cannot hide a hole.
//!
//! Users and databases the policy names but the cluster lacks are policy problems: the report
//! is not clean while there is one (a misspelt database would otherwise go unchecked). So is a
//! database of the cluster that is in no environment and not shared on purpose
//! (`shared_databases`): it is audited like a database of every other environment, each user
//! reaching it is reported, and the policy must say where it belongs.
//!
//! A CONNECT grant is revoked as the role that made it (PostgreSQL's REVOKE removes only the
//! grant of the role running it), and with CASCADE where the grantee passed its grant option
//! on; the path says so.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use sentinel_postgres::{Catalog, CatalogDatabase, CatalogRole, DatabaseGrant, Grantee};

use super::fix;
use super::policy::{IsolationConfig, Side};

/// `(user, database)` pairs for which `has_database_privilege(user, database, 'CONNECT')` is
/// true, as the server computed them.
pub type EffectiveConnect = BTreeSet<(String, String)>;

/// Database → role → how many objects in that database the role owns (`pg_shdepend`).
pub type ObjectOwners = BTreeMap<String, BTreeMap<String, i64>>;

/// How a user reaches a database of another environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ViolationKind {
    /// CONNECT granted to the user, PUBLIC or an inherited role.
    Connect,
    /// The user, or a role it can become, owns the database.
    Ownership,
    /// The user is a member of another environment's user.
    Membership,
    /// SUPERUSER, held or reachable by SET ROLE.
    Superuser,
    /// CREATEROLE, held or reachable by SET ROLE.
    CreateRole,
    /// BYPASSRLS, held or reachable by SET ROLE.
    BypassRls,
    /// The server says CONNECT is granted, and no rule here explains why.
    Unexplained,
}

impl ViolationKind {
    /// Whether this is a risk rather than a way in: BYPASSRLS grants no CONNECT by itself; it
    /// matters once the user is in by another path.
    pub fn is_risk(self) -> bool {
        self == ViolationKind::BypassRls
    }
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViolationKind::Connect => "connect",
            ViolationKind::Ownership => "ownership",
            ViolationKind::Membership => "membership",
            ViolationKind::Superuser => "superuser",
            ViolationKind::CreateRole => "createrole",
            ViolationKind::BypassRls => "bypassrls",
            ViolationKind::Unexplained => "unexplained",
        })
    }
}

/// One way a user of one environment reaches a database of another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The user (a role the policy lists for `user_environment`).
    pub user: String,
    /// The user's environment.
    pub user_environment: String,
    /// The database it reaches.
    pub database: String,
    /// The database's environment; empty for a database in no environment of the policy.
    pub database_environment: String,
    /// Which rule found it.
    pub kind: ViolationKind,
    /// How, e.g. "s60_hub_user → PUBLIC has CONNECT on s60_auth_prod".
    pub path: String,
    /// The statements that close this hole; empty when none can be derived.
    pub fix: Vec<String>,
}

/// Something the policy names that the cluster does not have.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyProblem {
    /// The environment concerned; `None` for cross-environment roles.
    pub environment: Option<String>,
    /// What is wrong, e.g. "database s60_mail_prod of production does not exist in the cluster".
    pub message: String,
}

/// What an audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    /// Every violation, sorted by user, database, kind and path.
    pub violations: Vec<Violation>,
    /// Policy entries the cluster lacks.
    pub problems: Vec<PolicyProblem>,
}

impl Audit {
    /// Whether nothing was found.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty() && self.problems.is_empty()
    }
}

/// A membership edge merged over grantors: `inherit` if any grant inherits, `usable` if any
/// grant inherits or allows SET ROLE.
#[derive(Debug, Clone, Copy)]
struct Edge<'a> {
    role: &'a str,
    inherit: bool,
    usable: bool,
}

/// The membership graph, member → the roles it was granted, sorted by role name so that paths
/// are deterministic.
struct Graph<'a> {
    edges: BTreeMap<&'a str, Vec<Edge<'a>>>,
}

impl<'a> Graph<'a> {
    fn new(catalog: &'a Catalog) -> Self {
        let mut merged: BTreeMap<(&str, &str), (bool, bool)> = BTreeMap::new();
        for m in &catalog.memberships {
            let e = merged
                .entry((m.member.as_str(), m.role.as_str()))
                .or_default();
            e.0 |= m.inherit;
            e.1 |= m.inherit || m.set;
        }
        let mut edges: BTreeMap<&str, Vec<Edge>> = BTreeMap::new();
        for ((member, role), (inherit, usable)) in merged {
            edges.entry(member).or_default().push(Edge {
                role,
                inherit,
                usable,
            });
        }
        Self { edges }
    }

    /// Every role reachable from `from` (itself included) with its shortest path, following
    /// only inheriting edges when `inherited_only`, else every usable edge.
    fn reach(&self, from: &'a str, inherited_only: bool) -> BTreeMap<&'a str, Vec<&'a str>> {
        let mut paths: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        paths.insert(from, vec![from]);
        let mut queue = VecDeque::from([from]);
        while let Some(role) = queue.pop_front() {
            let here = paths[role].clone();
            for edge in self.edges.get(role).into_iter().flatten() {
                let follow = if inherited_only {
                    edge.inherit
                } else {
                    edge.usable
                };
                if follow && !paths.contains_key(edge.role) {
                    let mut path = here.clone();
                    path.push(edge.role);
                    paths.insert(edge.role, path);
                    queue.push_back(edge.role);
                }
            }
        }
        paths
    }
}

/// Everything the rules need about one cluster and one policy.
struct Context<'a> {
    policy: &'a IsolationConfig,
    catalog: &'a Catalog,
    graph: Graph<'a>,
    roles: BTreeMap<&'a str, &'a CatalogRole>,
    databases: BTreeMap<&'a str, &'a CatalogDatabase>,
    /// Every policy role's side, looked up for every role on every path.
    sides: BTreeMap<&'a str, Side<'a>>,
    owners: &'a ObjectOwners,
}

impl<'a> Context<'a> {
    fn side(&self, role: &str) -> Side<'a> {
        self.sides.get(role).copied().unwrap_or(Side::Neutral)
    }
}

/// One user being audited, with the roles it reaches.
struct Subject<'a> {
    name: &'a str,
    environment: &'a str,
    /// Roles whose privileges it holds (inheritance only), with paths.
    inherited: BTreeMap<&'a str, Vec<&'a str>>,
    /// Roles it can act as (inheritance or SET ROLE), with paths.
    reachable: BTreeMap<&'a str, Vec<&'a str>>,
}

impl Subject<'_> {
    /// " (through SET ROLE)" when `role` is reachable only by switching to it.
    fn how(&self, role: &str) -> &'static str {
        if self.inherited.contains_key(role) {
            ""
        } else {
            " (through SET ROLE)"
        }
    }
}

fn chain(path: &[&str]) -> String {
    path.join(" → ")
}

/// Runs every rule. `effective`, when given, is the server's own CONNECT verdict for the
/// audited pairs, used to report what no rule explains.
pub fn audit(
    policy: &IsolationConfig,
    catalog: &Catalog,
    effective: Option<&EffectiveConnect>,
) -> Audit {
    audit_owned(policy, catalog, effective, &ObjectOwners::new())
}

/// [`audit`], knowing who owns the objects inside each database, so that a database whose
/// ownership was taken is given back to the user of its environment that built it.
pub fn audit_owned(
    policy: &IsolationConfig,
    catalog: &Catalog,
    effective: Option<&EffectiveConnect>,
    owners: &ObjectOwners,
) -> Audit {
    let cx = Context {
        owners,
        policy,
        catalog,
        graph: Graph::new(catalog),
        roles: catalog.roles.iter().map(|r| (r.name.as_str(), r)).collect(),
        databases: catalog
            .databases
            .iter()
            .map(|d| (d.name.as_str(), d))
            .collect(),
        sides: policy
            .environments
            .values()
            .flat_map(|e| e.users.iter())
            .chain(policy.cross_environment_roles.iter())
            .map(|r| (r.as_str(), policy.side(r)))
            .collect(),
    };
    let mut audit = Audit {
        problems: problems(&cx),
        ..Audit::default()
    };
    let unlisted = unlisted_databases(policy, catalog);
    let mut seen: BTreeSet<(String, String, String)> = BTreeSet::new();
    for (user_env, env_policy) in &policy.environments {
        for user in &env_policy.users {
            if !cx.roles.contains_key(user.as_str()) {
                continue; // a policy problem, reported once above
            }
            let subject = Subject {
                name: user,
                environment: user_env,
                inherited: cx.graph.reach(user, true),
                reachable: cx.graph.reach(user, false),
            };
            // Every other environment's databases (those the cluster has: a missing one is a
            // policy problem), then the databases no environment lists.
            let targets = policy
                .environments
                .iter()
                .filter(|(db_env, _)| *db_env != user_env)
                .flat_map(|(db_env, db_policy)| {
                    db_policy
                        .databases
                        .iter()
                        .filter_map(|d| cx.databases.get(d.as_str()))
                        .map(move |db| (*db, Some(db_env.as_str())))
                })
                .chain(unlisted.iter().map(|db| (*db, None)));
            for (db, db_env) in targets {
                let db_name = &db.name;
                {
                    let mut found = Vec::new();
                    connect_rule(&cx, &subject, db, db_env, &mut found);
                    ownership_rule(&cx, &subject, db, db_env, &mut found);
                    if let Some(db_env) = db_env {
                        membership_rule(&cx, &subject, db_env, &mut found);
                        attribute_rules(&cx, &subject, db, &mut found);
                    } else {
                        // SUPERUSER reaches it; the other attributes are about environments.
                        let mut attributes = Vec::new();
                        attribute_rules(&cx, &subject, db, &mut attributes);
                        found.extend(
                            attributes
                                .into_iter()
                                .filter(|(kind, _, _)| *kind == ViolationKind::Superuser),
                        );
                    }
                    let explained = found.iter().any(|(kind, _, _)| {
                        matches!(
                            kind,
                            ViolationKind::Connect
                                | ViolationKind::Ownership
                                | ViolationKind::Superuser
                        )
                    });
                    let server_says_yes =
                        effective.is_some_and(|e| e.contains(&(user.clone(), db_name.clone())));
                    if server_says_yes && !explained {
                        found.push((
                            ViolationKind::Unexplained,
                            format!(
                                "has_database_privilege({user}, {db_name}, 'CONNECT') is true, \
                                 but no grant, ownership or membership path explains it"
                            ),
                            Vec::new(),
                        ));
                    }
                    for (kind, mut path, statements) in found {
                        if db_env.is_none() {
                            path.push_str(" (a database no environment lists)");
                        }
                        // The same hole seen by two rules (a CONNECT through another
                        // environment's user is also a membership) is reported once, by the
                        // first rule: one line per user, database and fix.
                        let key = (
                            user.clone(),
                            db_name.clone(),
                            if statements.is_empty() {
                                path.clone()
                            } else {
                                statements.join("; ")
                            },
                        );
                        if !seen.insert(key) {
                            continue;
                        }
                        audit.violations.push(Violation {
                            user: user.clone(),
                            user_environment: user_env.clone(),
                            database: db_name.clone(),
                            database_environment: db_env.unwrap_or_default().to_string(),
                            kind,
                            path,
                            fix: statements,
                        });
                    }
                }
            }
        }
    }
    audit.violations.sort_by(|a, b| {
        (&a.user, &a.database, a.kind, &a.path).cmp(&(&b.user, &b.database, b.kind, &b.path))
    });
    for db in unlisted {
        audit.problems.push(unlisted_problem(&audit.violations, db));
    }
    audit.problems.sort();
    audit
}

/// The databases of `catalog` that no environment of `policy` lists and that are not shared
/// on purpose.
pub fn unlisted_databases<'a>(
    policy: &IsolationConfig,
    catalog: &'a Catalog,
) -> Vec<&'a CatalogDatabase> {
    catalog
        .databases
        .iter()
        .filter(|d| policy.environment_of_database(&d.name).is_none() && !policy.is_shared(&d.name))
        .collect()
}

/// The policy problem of a database in no environment, naming who reaches it.
fn unlisted_problem(violations: &[Violation], db: &CatalogDatabase) -> PolicyProblem {
    let mut reached_by: Vec<String> = violations
        .iter()
        .filter(|v| v.database == db.name && v.database_environment.is_empty() && !v.kind.is_risk())
        .map(|v| format!("{} ({})", v.user, v.user_environment))
        .collect();
    reached_by.dedup();
    let public = db
        .grants
        .iter()
        .any(|g| g.connect && g.grantee == Grantee::Public);
    let who = match (reached_by.is_empty(), public) {
        _ if !db.allow_connections => "nobody can connect to it now (datallowconn is off)".into(),
        (true, false) => "no user of the policy reaches it".to_string(),
        (true, true) => "PUBLIC has CONNECT on it".to_string(),
        (false, public) => format!(
            "{}reached by {} users of the policy: {}",
            if public {
                "PUBLIC has CONNECT on it; "
            } else {
                ""
            },
            reached_by.len(),
            reached_by.join(", ")
        ),
    };
    PolicyProblem {
        environment: None,
        message: format!(
            "database {} is in no environment and not in shared_databases ({who}): list it \
             under the environment it belongs to, or in shared_databases if every environment \
             may reach it",
            db.name
        ),
    }
}

type Found = Vec<(ViolationKind, String, Vec<String>)>;

fn problems(cx: &Context) -> Vec<PolicyProblem> {
    let mut out = Vec::new();
    for (env, policy) in &cx.policy.environments {
        for user in &policy.users {
            if !cx.roles.contains_key(user.as_str()) {
                out.push(PolicyProblem {
                    environment: Some(env.clone()),
                    message: format!("user {user} of {env} does not exist in the cluster"),
                });
            }
        }
        for db in &policy.databases {
            if !cx.databases.contains_key(db.as_str()) {
                out.push(PolicyProblem {
                    environment: Some(env.clone()),
                    message: format!("database {db} of {env} does not exist in the cluster"),
                });
            }
        }
    }
    for role in &cx.policy.cross_environment_roles {
        if !cx.roles.contains_key(role.as_str()) {
            out.push(PolicyProblem {
                environment: None,
                message: format!("cross-environment role {role} does not exist in the cluster"),
            });
        }
    }
    out.sort();
    out
}

/// CONNECT through the ACL: to the user, to PUBLIC, or to a role it inherits from. For a
/// database in no environment (`db_env` None) nothing says who may hold it: no statement.
fn connect_rule(
    cx: &Context,
    subject: &Subject,
    db: &CatalogDatabase,
    db_env: Option<&str>,
    found: &mut Found,
) {
    for grant in db.grants.iter().filter(|g| g.connect) {
        let revoke = || {
            db_env
                .map(|env| revoke_connect_keeping(cx, db, env, grant))
                .unwrap_or_default()
        };
        let how = grant_note(db, grant);
        match &grant.grantee {
            Grantee::Public => found.push((
                ViolationKind::Connect,
                format!("{} → PUBLIC has CONNECT on {}{how}", subject.name, db.name),
                revoke(),
            )),
            Grantee::Role(role) if role == subject.name => found.push((
                ViolationKind::Connect,
                format!("{} has CONNECT on {}{how}", subject.name, db.name),
                revoke(),
            )),
            Grantee::Role(role) => {
                let Some(path) = subject.inherited.get(role.as_str()) else {
                    continue;
                };
                let statements = match db_env {
                    // The grant is right; the way in is the membership.
                    Some(env) if legitimate_holder(cx, role, env) => {
                        cut_at_boundary(cx, subject, path)
                    }
                    _ => revoke(),
                };
                found.push((
                    ViolationKind::Connect,
                    format!("{} has CONNECT on {}{how}", chain(path), db.name),
                    statements,
                ));
            }
        }
    }
}

/// The roles `grantee` passed its CONNECT on `db` on to (grants whose grantor it is).
fn passed_on<'a>(db: &'a CatalogDatabase, grantee: &Grantee) -> Vec<&'a DatabaseGrant> {
    let Grantee::Role(name) = grantee else {
        return Vec::new(); // PUBLIC grants nothing
    };
    if *name == db.owner {
        return Vec::new(); // the owner's grants come with ownership, not a grant option
    }
    db.grants
        .iter()
        .filter(|g| g.connect && g.grantee != *grantee)
        .filter(|g| g.connect_grantors.iter().any(|by| by == name))
        .collect()
}

/// What a path says about a grant beyond "has CONNECT": who granted it when that is not the
/// owner (the fix revokes it as them), and the grants a CASCADE takes with it.
fn grant_note(db: &CatalogDatabase, grant: &DatabaseGrant) -> String {
    let mut note = String::new();
    let others: Vec<&str> = grant
        .connect_grantors
        .iter()
        .filter(|g| **g != db.owner)
        .map(String::as_str)
        .collect();
    if !others.is_empty() {
        note.push_str(&format!(" (granted by {})", others.join(", ")));
    }
    let on: Vec<String> = passed_on(db, &grant.grantee)
        .iter()
        .map(|g| g.grantee.to_string())
        .collect();
    if !on.is_empty() {
        note.push_str(&format!(
            " WITH GRANT OPTION, passed on to {} (revoked with it: CASCADE)",
            on.join(", ")
        ));
    }
    note
}

/// The roles that lose CONNECT on `db` when `grantee`'s grant is revoked with CASCADE: those
/// whose every CONNECT grant was made by `grantee` or by a role that loses it.
fn lost_with<'a>(db: &'a CatalogDatabase, grantee: &Grantee) -> BTreeSet<&'a str> {
    let Grantee::Role(name) = grantee else {
        return BTreeSet::new();
    };
    if *name == db.owner {
        return BTreeSet::new();
    }
    let mut lost: BTreeSet<&str> = BTreeSet::new();
    loop {
        let more: Vec<&str> = db
            .grants
            .iter()
            .filter(|g| g.connect && !g.connect_grantors.is_empty())
            .filter_map(|g| match &g.grantee {
                Grantee::Role(r) if r != name && !lost.contains(r.as_str()) => Some((r, g)),
                _ => None,
            })
            .filter(|(_, g)| {
                g.connect_grantors
                    .iter()
                    .all(|by| by == name || lost.contains(by.as_str()))
            })
            .map(|(r, _)| r.as_str())
            .collect();
        if more.is_empty() {
            return lost;
        }
        lost.extend(more);
    }
}

/// Ownership by the user or by any role it can become.
fn ownership_rule(
    cx: &Context,
    subject: &Subject,
    db: &CatalogDatabase,
    db_env: Option<&str>,
    found: &mut Found,
) {
    let owner = db.owner.as_str();
    let Some(path) = subject.reachable.get(owner) else {
        return;
    };
    let statements = match db_env {
        None => Vec::new(),
        Some(env) if owner != subject.name && cx.side(owner) == Side::Environment(env) => {
            // The right owner; the way in is the membership.
            cut_at_boundary(cx, subject, path)
        }
        Some(env) => alter_owner(cx, db, env),
    };
    let path = if owner == subject.name {
        format!("{} owns {}", subject.name, db.name)
    } else {
        format!("{} owns {}{}", chain(path), db.name, subject.how(owner))
    };
    found.push((ViolationKind::Ownership, path, statements));
}

/// Membership (any chain) in a user of the database's environment.
fn membership_rule(cx: &Context, subject: &Subject, db_env: &str, found: &mut Found) {
    for (role, path) in &subject.reachable {
        if *role == subject.name || cx.side(role) != Side::Environment(db_env) {
            continue;
        }
        found.push((
            ViolationKind::Membership,
            format!("{}, a user of {db_env}{}", chain(path), subject.how(role)),
            cut_at_boundary(cx, subject, path),
        ));
    }
}

/// SUPERUSER, CREATEROLE and BYPASSRLS on the user or a role it can SET ROLE to.
fn attribute_rules(cx: &Context, subject: &Subject, db: &CatalogDatabase, found: &mut Found) {
    for (role_name, path) in &subject.reachable {
        let Some(role) = cx.roles.get(role_name) else {
            continue;
        };
        let own = *role_name == subject.name;
        let who = if own {
            subject.name.to_string()
        } else {
            format!("{}{}", chain(path), subject.how(role_name))
        };
        let rules: [(bool, ViolationKind, &str, String); 3] = [
            (
                role.superuser,
                ViolationKind::Superuser,
                "NOSUPERUSER",
                format!(
                    "{who} is SUPERUSER, which passes every privilege check (CONNECT on {} too)",
                    db.name
                ),
            ),
            (
                role.createrole,
                ViolationKind::CreateRole,
                "NOCREATEROLE",
                format!(
                    "{who} has CREATEROLE, so it can grant itself roles that reach {}",
                    db.name
                ),
            ),
            (
                role.bypassrls,
                ViolationKind::BypassRls,
                "NOBYPASSRLS",
                format!(
                    "{who} has BYPASSRLS, so row-level security would not hold it back in {}",
                    db.name
                ),
            ),
        ];
        for (holds, kind, undo, text) in rules {
            if !holds {
                continue;
            }
            let statements = if own {
                vec![fix::alter_role(subject.name, undo)]
            } else {
                // Cut the grant of the powerful role itself: that is the dangerous link.
                last_edge(cx, path)
            };
            found.push((kind, text, statements));
        }
    }
}

/// Whether `role` may hold CONNECT on a database of `db_env`: one of its users, or a role
/// allowed to cross environments.
fn legitimate_holder(cx: &Context, role: &str, db_env: &str) -> bool {
    let side = cx.side(role);
    side == Side::Crossing || side == Side::Environment(db_env)
}

/// REVOKE CONNECT from `grant`'s grantee (as each grantor, with CASCADE when it passed the
/// grant on), and GRANT it explicitly to the users of the database's own environment and the
/// cross-environment roles that had it through the grantee, so the fix never locks an app (or
/// the backups) out.
fn revoke_connect_keeping(
    cx: &Context,
    db: &CatalogDatabase,
    db_env: &str,
    grant: &DatabaseGrant,
) -> Vec<String> {
    let grantee = &grant.grantee;
    let lost = lost_with(db, grantee);
    let mut keepers: Vec<&str> = Vec::new();
    let candidates = cx.policy.environments[db_env]
        .users
        .iter()
        .chain(cx.policy.cross_environment_roles.iter());
    for role in candidates {
        if !cx.roles.contains_key(role.as_str()) || keepers.contains(&role.as_str()) {
            continue;
        }
        let relied_on_it = match grantee {
            Grantee::Public => true,
            Grantee::Role(holder) => {
                lost.contains(role.as_str())
                    || cx.graph.reach(role, true).contains_key(holder.as_str())
            }
        };
        if relied_on_it {
            keepers.push(role);
        }
    }
    let cascade = !passed_on(db, grantee).is_empty();
    let mut statements = fix::revoke_connect_grant(&db.name, &db.owner, grant, cascade);
    if let Some(grant) = fix::grant_connect(&db.name, &keepers) {
        statements.push(grant);
    }
    statements
}

/// ALTER DATABASE ... OWNER TO its original owner: the user of its environment owning the most
/// objects in it (the app that built it; ties go to the first in the policy), else the
/// environment's `owner`.
fn alter_owner(cx: &Context, db: &CatalogDatabase, db_env: &str) -> Vec<String> {
    let env = &cx.policy.environments[db_env];
    let mut builder: Option<(&str, i64)> = None;
    if let Some(by_role) = cx.owners.get(&db.name) {
        for user in env
            .users
            .iter()
            .filter(|u| cx.roles.contains_key(u.as_str()))
        {
            if let Some(&objects) = by_role.get(user) {
                if builder.is_none_or(|(_, most)| objects > most) {
                    builder = Some((user, objects));
                }
            }
        }
    }
    match builder.map(|(user, _)| user).or_else(|| env.owner()) {
        Some(owner) => vec![fix::alter_owner(&db.name, owner)],
        None => Vec::new(),
    }
}

/// Revokes the membership where the path first enters a role of another environment (or a
/// cross-environment role): the link that breaks isolation. Without one, the path's last link.
fn cut_at_boundary(cx: &Context, subject: &Subject, path: &[&str]) -> Vec<String> {
    let boundary = (1..path.len()).find(|&i| match cx.side(path[i]) {
        Side::Environment(env) => env != subject.environment,
        Side::Crossing => true,
        Side::Neutral => false,
    });
    match boundary {
        Some(i) => fix::revoke_membership(cx.catalog, path[i], path[i - 1]),
        None => last_edge(cx, path),
    }
}

fn last_edge(cx: &Context, path: &[&str]) -> Vec<String> {
    match path {
        [.., member, role] => fix::revoke_membership(cx.catalog, role, member),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolation::policy::tests::policy;
    use sentinel_postgres::{CatalogMembership, CatalogRole};

    fn role(name: &str) -> CatalogRole {
        CatalogRole {
            name: name.into(),
            login: true,
            inherit: true,
            connection_limit: -1,
            ..Default::default()
        }
    }

    fn grant(grantee: Grantee, connect: bool) -> DatabaseGrant {
        DatabaseGrant {
            grantee,
            connect,
            create: false,
            temporary: true,
            connect_grantors: Vec::new(),
            connect_grantable: false,
        }
    }

    fn owner_grant(owner: &str) -> DatabaseGrant {
        DatabaseGrant {
            grantee: Grantee::Role(owner.into()),
            connect: true,
            create: true,
            temporary: true,
            connect_grantors: vec![owner.into()],
            connect_grantable: true,
        }
    }

    fn database(name: &str, owner: &str, public_connect: bool) -> CatalogDatabase {
        CatalogDatabase {
            oid: 0,
            name: name.into(),
            owner: owner.into(),
            allow_connections: true,
            is_template: false,
            default_acl: public_connect,
            grants: vec![owner_grant(owner), grant(Grantee::Public, public_connect)],
        }
    }

    fn member(role: &str, member: &str, inherit: bool) -> CatalogMembership {
        CatalogMembership {
            role: role.into(),
            member: member.into(),
            grantor: "postgres".into(),
            inherit,
            set: true,
            admin: false,
        }
    }

    /// The policy's layout, fixed: no PUBLIC CONNECT, each environment's users hold it
    /// explicitly, the backup role on every database.
    fn clean() -> Catalog {
        let mut roles: Vec<CatalogRole> = ["stg_user", "prod_user", "pulse_prod_user", "backup_ro"]
            .into_iter()
            .map(role)
            .collect();
        roles.push(CatalogRole {
            superuser: true,
            createrole: true,
            bypassrls: true,
            ..role("postgres")
        });
        let mut databases = Vec::new();
        for (db, owner, users) in [
            ("auth_stg", "stg_user", &["stg_user"][..]),
            ("pulse_stg", "stg_user", &["stg_user"][..]),
            (
                "auth_prod",
                "prod_user",
                &["prod_user", "pulse_prod_user"][..],
            ),
            (
                "pulse_prod",
                "prod_user",
                &["prod_user", "pulse_prod_user"][..],
            ),
        ] {
            let mut d = database(db, owner, false);
            for u in users.iter().chain(["backup_ro"].iter()) {
                if *u != owner {
                    d.grants.push(grant(Grantee::Role(u.to_string()), true));
                }
            }
            databases.push(d);
        }
        Catalog {
            server_version: "15.8".into(),
            server_version_num: 150008,
            roles,
            memberships: Vec::new(),
            databases,
        }
    }

    fn db_mut<'a>(c: &'a mut Catalog, name: &str) -> &'a mut CatalogDatabase {
        c.databases.iter_mut().find(|d| d.name == name).unwrap()
    }

    fn role_mut<'a>(c: &'a mut Catalog, name: &str) -> &'a mut CatalogRole {
        c.roles.iter_mut().find(|r| r.name == name).unwrap()
    }

    fn paths(a: &Audit) -> Vec<String> {
        a.violations
            .iter()
            .map(|v| format!("{} | {} | {}", v.kind, v.path, v.fix.join("; ")))
            .collect()
    }

    #[test]
    fn a_clean_layout_has_no_violation() {
        let a = audit(&policy(), &clean(), None);
        assert!(a.is_clean(), "{:#?}", a);
    }

    #[test]
    fn the_default_public_connect_is_found_for_every_foreign_user_and_fixed_keeping_owners() {
        let mut c = clean();
        db_mut(&mut c, "auth_prod").grants[1].connect = true;
        let a = audit(&policy(), &c, None);
        assert_eq!(a.violations.len(), 1, "{:#?}", paths(&a));
        let v = &a.violations[0];
        assert_eq!(
            (v.user.as_str(), v.user_environment.as_str()),
            ("stg_user", "staging")
        );
        assert_eq!(
            (v.database.as_str(), v.database_environment.as_str()),
            ("auth_prod", "production")
        );
        assert_eq!(v.kind, ViolationKind::Connect);
        assert_eq!(v.path, "stg_user → PUBLIC has CONNECT on auth_prod");
        assert_eq!(
            v.fix,
            [
                "REVOKE CONNECT ON DATABASE auth_prod FROM PUBLIC",
                "GRANT CONNECT ON DATABASE auth_prod TO prod_user, pulse_prod_user, backup_ro"
            ]
        );
    }

    #[test]
    fn a_direct_grant_is_found() {
        let mut c = clean();
        db_mut(&mut c, "pulse_stg")
            .grants
            .push(grant(Grantee::Role("pulse_prod_user".into()), true));
        let a = audit(&policy(), &c, None);
        assert_eq!(
            paths(&a),
            ["connect | pulse_prod_user has CONNECT on pulse_stg | \
              REVOKE CONNECT ON DATABASE pulse_stg FROM pulse_prod_user"]
        );
    }

    #[test]
    fn a_grant_to_an_inherited_role_is_found_through_a_chain_of_two_roles() {
        let mut c = clean();
        c.roles.push(CatalogRole {
            login: false,
            ..role("ops_bridge")
        });
        c.roles.push(CatalogRole {
            login: false,
            ..role("prod_readers")
        });
        c.memberships.push(member("ops_bridge", "stg_user", true));
        c.memberships
            .push(member("prod_readers", "ops_bridge", true));
        db_mut(&mut c, "auth_prod")
            .grants
            .push(grant(Grantee::Role("prod_readers".into()), true));
        let a = audit(&policy(), &c, None);
        assert_eq!(
            paths(&a),
            [
                "connect | stg_user → ops_bridge → prod_readers has CONNECT on auth_prod | \
              REVOKE CONNECT ON DATABASE auth_prod FROM prod_readers"
            ]
        );
        // Without inheritance on the first link the grant does not apply at login.
        c.memberships[0].inherit = false;
        assert!(audit(&policy(), &c, None).is_clean());
    }

    #[test]
    fn membership_in_another_environments_user_is_found_and_cut_where_it_crosses() {
        let mut c = clean();
        c.roles.push(CatalogRole {
            login: false,
            ..role("helper")
        });
        c.memberships.push(member("helper", "stg_user", true));
        c.memberships.push(member("prod_user", "helper", true));
        let a = audit(&policy(), &c, None);
        let p = paths(&a);
        // prod_user holds CONNECT on both production databases (and owns them): one line each,
        // all closed by the same REVOKE.
        assert!(
            p.contains(
                &"connect | stg_user → helper → prod_user has CONNECT on pulse_prod | \
                  REVOKE prod_user FROM helper"
                    .to_string()
            ),
            "{p:#?}"
        );
        assert!(a
            .violations
            .iter()
            .all(|v| v.fix == ["REVOKE prod_user FROM helper"]));
        assert_eq!(a.violations.len(), 2, "{p:#?}");

        // Through SET ROLE only (NOINHERIT), the membership and the ownership still count.
        c.memberships[0].inherit = false;
        let p = paths(&audit(&policy(), &c, None));
        assert!(
            p.contains(
                &"ownership | stg_user → helper → prod_user owns auth_prod (through SET ROLE) | \
                  REVOKE prod_user FROM helper"
                    .to_string()
            ),
            "{p:#?}"
        );
    }

    #[test]
    fn a_superuser_app_user_is_found_for_every_foreign_database() {
        let mut c = clean();
        role_mut(&mut c, "stg_user").superuser = true;
        let a = audit(&policy(), &c, None);
        assert_eq!(a.violations.len(), 2);
        assert!(a
            .violations
            .iter()
            .all(|v| v.kind == ViolationKind::Superuser
                && v.fix == ["ALTER ROLE stg_user NOSUPERUSER"]));
        assert_eq!(
            a.violations[0].path,
            "stg_user is SUPERUSER, which passes every privilege check (CONNECT on auth_prod too)"
        );
    }

    #[test]
    fn a_role_it_can_become_with_superuser_is_found() {
        let mut c = clean();
        c.memberships.push(member("postgres", "prod_user", false));
        let a = audit(&policy(), &c, None);
        // postgres also has CREATEROLE and BYPASSRLS: the same link, so one line per database.
        assert_eq!(a.violations.len(), 2, "{:#?}", paths(&a));
        assert!(a
            .violations
            .iter()
            .all(|v| v.kind == ViolationKind::Superuser));
        assert!(a
            .violations
            .iter()
            .all(|v| v.fix == ["REVOKE postgres FROM prod_user"]));
        assert!(a.violations[0].path.contains("(through SET ROLE)"));
    }

    #[test]
    fn ownership_by_another_environments_user_is_found_and_given_back() {
        let mut c = clean();
        db_mut(&mut c, "pulse_prod").owner = "stg_user".into();
        let a = audit(&policy(), &c, None);
        assert_eq!(
            paths(&a),
            ["ownership | stg_user owns pulse_prod | \
              ALTER DATABASE pulse_prod OWNER TO prod_user"]
        );
    }

    #[test]
    fn bypassrls_and_createrole_are_found() {
        let mut c = clean();
        role_mut(&mut c, "pulse_prod_user").bypassrls = true;
        role_mut(&mut c, "stg_user").createrole = true;
        let p = paths(&audit(&policy(), &c, None));
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(p.iter().any(
            |l| l.starts_with("bypassrls | pulse_prod_user has BYPASSRLS")
                && l.ends_with("ALTER ROLE pulse_prod_user NOBYPASSRLS")
        ));
        assert!(p
            .iter()
            .any(|l| l.starts_with("createrole | stg_user has CREATEROLE")
                && l.ends_with("ALTER ROLE stg_user NOCREATEROLE")));
    }

    #[test]
    fn the_cross_environment_role_is_allowed_but_not_a_way_in_for_others() {
        let mut c = clean();
        assert!(audit(&policy(), &c, None).is_clean());
        c.memberships.push(member("backup_ro", "stg_user", true));
        let a = audit(&policy(), &c, None);
        assert_eq!(a.violations.len(), 2, "{:#?}", paths(&a));
        assert!(a
            .violations
            .iter()
            .all(|v| v.fix == ["REVOKE backup_ro FROM stg_user"]));
    }

    #[test]
    fn missing_users_and_databases_are_problems_not_a_clean_report() {
        let mut c = clean();
        c.roles
            .retain(|r| r.name != "pulse_prod_user" && r.name != "backup_ro");
        c.databases.retain(|d| d.name != "pulse_stg");
        let a = audit(&policy(), &c, None);
        assert!(!a.is_clean());
        let messages: Vec<_> = a.problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "cross-environment role backup_ro does not exist in the cluster",
                "user pulse_prod_user of production does not exist in the cluster",
                "database pulse_stg of staging does not exist in the cluster",
            ]
        );
    }

    #[test]
    fn what_the_server_grants_and_no_rule_explains_is_reported() {
        let c = clean();
        let effective: EffectiveConnect = [("stg_user".to_string(), "auth_prod".to_string())]
            .into_iter()
            .collect();
        let a = audit(&policy(), &c, Some(&effective));
        assert_eq!(a.violations.len(), 1);
        assert_eq!(a.violations[0].kind, ViolationKind::Unexplained);
        assert!(a.violations[0].fix.is_empty());
    }

    #[test]
    fn postgres_16_memberships_are_revoked_per_grantor() {
        let mut c = clean();
        c.server_version_num = 160004;
        c.memberships.push(member("prod_user", "stg_user", true));
        let mut second = member("prod_user", "stg_user", false);
        second.grantor = "ops admin".into();
        c.memberships.push(second);
        let a = audit(&policy(), &c, None);
        assert!(a.violations.iter().all(|v| v.fix
            == [
                "REVOKE prod_user FROM stg_user GRANTED BY \"ops admin\"",
                "REVOKE prod_user FROM stg_user GRANTED BY postgres"
            ]));
    }

    #[test]
    fn a_database_no_environment_lists_is_a_problem_naming_who_reaches_it() {
        let mut c = clean();
        c.databases.push(database("archive", "prod_user", true));
        c.databases.push(database("postgres", "postgres", true));
        let a = audit(&policy(), &c, None);
        assert!(!a.is_clean());
        // postgres is shared by default; archive is in no environment.
        assert!(a.violations.iter().all(|v| v.database == "archive"));
        let p = paths(&a);
        assert!(
            p.contains(
                &"connect | stg_user → PUBLIC has CONNECT on archive (a database no \
                  environment lists) | "
                    .to_string()
            ),
            "{p:#?}"
        );
        assert!(a
            .violations
            .iter()
            .all(|v| v.database_environment.is_empty()));
        assert_eq!(a.problems.len(), 1, "{:#?}", a.problems);
        let message = &a.problems[0].message;
        assert!(
            message
                .starts_with("database archive is in no environment and not in shared_databases")
                && message.contains("PUBLIC has CONNECT on it; reached by 3 users of the policy")
                && message.contains("stg_user (staging)"),
            "{message}"
        );
        assert_eq!(a.problems[0].environment, None);
    }

    #[test]
    fn a_grant_by_another_grantor_is_revoked_as_that_grantor_and_a_passed_on_one_with_cascade() {
        let mut c = clean();
        // pulse_prod_user holds CONNECT WITH GRANT OPTION and granted it to stg_user.
        let auth_prod = db_mut(&mut c, "auth_prod");
        for g in &mut auth_prod.grants {
            if g.grantee == Grantee::Role("pulse_prod_user".into()) {
                g.connect_grantors = vec!["prod_user".into()];
                g.connect_grantable = true;
            }
        }
        auth_prod.grants.push(DatabaseGrant {
            connect_grantors: vec!["pulse_prod_user".into()],
            ..grant(Grantee::Role("stg_user".into()), true)
        });
        let a = audit(&policy(), &c, None);
        assert_eq!(
            paths(&a),
            [
                "connect | stg_user has CONNECT on auth_prod (granted by pulse_prod_user) | \
              SET ROLE pulse_prod_user; REVOKE CONNECT ON DATABASE auth_prod FROM stg_user; \
              RESET ROLE"
            ]
        );

        // stg_user holds it WITH GRANT OPTION and passed it on to prod_user: CASCADE, and
        // prod_user (which had it only from stg_user) gets it back explicitly.
        let mut c = clean();
        let pulse_stg = db_mut(&mut c, "pulse_stg");
        pulse_stg.grants.push(DatabaseGrant {
            connect_grantors: vec!["stg_user".into()],
            ..grant(Grantee::Role("prod_user".into()), true)
        });
        let auth_prod = db_mut(&mut c, "auth_prod");
        auth_prod.grants.push(DatabaseGrant {
            connect_grantors: vec!["prod_user".into()],
            connect_grantable: true,
            ..grant(Grantee::Role("stg_user".into()), true)
        });
        auth_prod
            .grants
            .retain(|g| g.grantee != Grantee::Role("pulse_prod_user".into()));
        auth_prod.grants.push(DatabaseGrant {
            connect_grantors: vec!["stg_user".into()],
            ..grant(Grantee::Role("pulse_prod_user".into()), true)
        });
        let a = audit(&policy(), &c, None);
        let p = paths(&a);
        assert!(
            p.contains(
                &"connect | stg_user has CONNECT on auth_prod WITH GRANT OPTION, passed on to \
                  pulse_prod_user (revoked with it: CASCADE) | REVOKE CONNECT ON DATABASE \
                  auth_prod FROM stg_user CASCADE; GRANT CONNECT ON DATABASE auth_prod TO \
                  pulse_prod_user"
                    .to_string()
            ),
            "{p:#?}"
        );
    }

    #[test]
    fn bypassrls_is_a_risk_not_a_way_in() {
        assert!(ViolationKind::BypassRls.is_risk());
        assert!(!ViolationKind::Connect.is_risk());
        assert!(!ViolationKind::CreateRole.is_risk());
    }

    #[test]
    fn a_taken_database_goes_back_to_the_user_that_built_it() {
        let mut c = clean();
        c.roles.push(CatalogRole {
            login: false,
            ..role("takeover")
        });
        c.memberships.push(member("takeover", "stg_user", true));
        db_mut(&mut c, "pulse_prod").owner = "takeover".into();
        let fix_of = |owners: &ObjectOwners| {
            audit_owned(&policy(), &c, None, owners)
                .violations
                .iter()
                .find(|v| v.kind == ViolationKind::Ownership)
                .map(|v| v.fix.clone())
        };
        // Without evidence: the environment's owner.
        assert_eq!(
            fix_of(&ObjectOwners::new()),
            Some(vec![
                "ALTER DATABASE pulse_prod OWNER TO prod_user".to_string()
            ])
        );
        let owners: ObjectOwners = [(
            "pulse_prod".to_string(),
            [
                ("pulse_prod_user".to_string(), 12),
                ("prod_user".to_string(), 1),
                ("takeover".to_string(), 40),
            ]
            .into(),
        )]
        .into();
        assert_eq!(
            fix_of(&owners),
            Some(vec![
                "ALTER DATABASE pulse_prod OWNER TO pulse_prod_user".to_string()
            ])
        );
    }
}
