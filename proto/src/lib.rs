//! Sentinel's wire contract, shared by the controller, the agent and the tests: the generated
//! `sentinel.v1` types and services, the descriptor set for server reflection, and small
//! helpers that belong to the contract itself.
#![forbid(unsafe_code)]

pub mod backup;
pub mod envelope;
pub mod kinds;
pub mod results;
pub mod time;

/// The `sentinel.v1` package: agent channel, operator API, host state and jobs.
pub mod v1 {
    #![allow(
        missing_docs,
        clippy::large_enum_variant,
        clippy::doc_lazy_continuation
    )]
    tonic::include_proto!("sentinel.v1");
}

/// Encoded `FileDescriptorSet` of every `sentinel.v1` file (with their imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sentinel_descriptor.bin"));

/// Fully qualified gRPC service names, as they appear in request paths.
pub mod services {
    /// The agent channel.
    pub const AGENT: &str = "sentinel.v1.AgentService";
    /// The operator API.
    pub const FLEET: &str = "sentinel.v1.FleetService";
    /// Enrolment, the one service callable without a client certificate.
    pub const ENROLL: &str = "sentinel.v1.EnrollService";
}
