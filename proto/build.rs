//! Generates the gRPC code of `dpo/v1/*.proto` with the vendored `protoc` (no
//! system protoc needed), plus the file descriptor set served by reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["dpo/v1/run.proto", "dpo/v1/worker.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("dpo_v1_descriptor.bin"))
        .compile_with_config(config, &protos, &["."])?;
    Ok(())
}
