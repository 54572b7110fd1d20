//! The audit trail and app locks: day-2 records every controller keeps in its store.
//! [`AuditLog`] appends one record per write made through the operator API (who, by which
//! credential, what, when, outcome) before the call answers; [`Locks`] holds the app locks
//! that refuse deploys and rollbacks with their reason (as `kamal lock` does).

mod locks;
mod log;

pub use locks::Locks;
pub use log::{AuditLog, DEFAULT_LIMIT};
