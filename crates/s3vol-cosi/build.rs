//! Generates the COSI gRPC code from s3vol's COSI protocol definitions in `proto/cosi/`,
//! compiled in pure Rust by `protox` (no `protoc` binary needed). Both protocol versions go into one
//! `FileDescriptorSet`; their packages differ, so their generated modules do too.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto/cosi");
    let files = [
        root.join("v1alpha1/cosi.proto"),
        root.join("v1alpha2/cosi.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
