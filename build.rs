//! Generates the Rust bindings of `proto/autoscaler.proto` (Ray's GCS autoscaler API).
//!
//! The proto is parsed by `protox`, a pure-Rust compiler, so building needs no `protoc` binary.
//! Only the client is generated: the operator calls the GCS, it serves nothing over gRPC.
//! Protobuf maps become `BTreeMap`s so that resource maps iterate in key order, the order the
//! autoscaler's decision works in, and so that encoded messages are deterministic.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto/autoscaler.proto");
    let descriptors = protox::compile(["autoscaler.proto"], ["proto"])?;
    tonic_prost_build::configure().build_server(false).build_client(true).btree_map(".").compile_fds(descriptors)?;
    Ok(())
}
