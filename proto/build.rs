//! Compiles `proto/sentinel/v1/*.proto` with protox (no `protoc` install needed) into Rust code
//! and an encoded file descriptor set that the controller serves through reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/sentinel/v1/state.proto",
    "proto/sentinel/v1/jobs.proto",
    "proto/sentinel/v1/agent.proto",
    "proto/sentinel/v1/audit.proto",
    "proto/sentinel/v1/fleet.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("sentinel_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_transport(false)
        // Sorted like the manifest's, so a report reads (and compares) the same every time.
        .btree_map(".sentinel.v1.BackupEntry.row_counts")
        .compile_fds(fds)?;
    Ok(())
}
