//! Generates the Rust types and tonic services from `proto/*.proto` into OUT_DIR, using the
//! vendored protoc so that a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Log content is arbitrary bytes and travels through several hops: `bytes::Bytes` makes
    // those hops reference-counted instead of copying.
    config.bytes(["."]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &[
            "proto/joblet.proto",
            "proto/persist.proto",
            "proto/ipc.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
