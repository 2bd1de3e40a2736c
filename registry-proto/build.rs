//! Compiles `proto/` into Rust types, tonic client and server stubs, and an
//! encoded descriptor set for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let registry_proto = proto_root.join("registry/v1/registry.proto");

    // The vendored protoc and its bundled google/protobuf/*.proto: no system
    // protoc is needed, and every machine compiles with the same version.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;

    tonic_prost_build::configure()
        // 1 KiB starting buffers per call instead of 8 KiB: see src/codec.rs.
        .codec_path("crate::codec::SmallBufferCodec")
        .file_descriptor_set_path(out_dir.join("registry_v1_descriptor.bin"))
        .compile_with_config(config, &[registry_proto], &[proto_root.clone(), well_known])?;

    println!("cargo:rerun-if-changed={}", proto_root.display());
    Ok(())
}
