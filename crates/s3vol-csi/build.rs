//! Generates the CSI gRPC code from s3vol's CSI protocol definition `proto/csi/csi.proto`,
//! compiled in pure Rust by `protox` (no `protoc` binary needed).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto/csi");
    let proto = root.join("csi.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let fds = protox::compile([&proto], [&root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
