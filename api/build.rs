//! Compiles `proto/weft/v1/*.proto` into Rust (messages, client and server)
//! in `OUT_DIR`. The protos are parsed by `protox`, in pure Rust, so building
//! needs no system `protoc`.

use std::error::Error;

const PROTOS: &[&str] = &["proto/weft/v1/control_plane.proto"];
const INCLUDES: &[&str] = &["proto"];

fn main() -> Result<(), Box<dyn Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, INCLUDES)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Ordered maps, like `weft_config::Metadata::labels`, so conversions
        // are plain clones and encodings are deterministic.
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
