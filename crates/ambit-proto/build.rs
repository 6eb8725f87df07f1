//! Compiles the `.proto` files under `proto/` with protox (pure Rust: no `protoc` needed).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let istio = [
        "istio/ca.proto",
        "istio/workload.proto",
        "istio/authorization.proto",
        "istio/zds.proto",
        "envoy/discovery.proto",
        "envoy/external_auth.proto",
        "otel/trace.proto",
    ];
    let ambit = ["ambit/waypoint.proto", "ambit/telemetry.proto"];
    for file in istio.iter().chain(&ambit) {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(protox::compile(istio, [&root])?)?;
    // Ambit's own types refer to Istio's already generated above (the generated modules
    // are flat: `crate::security`, not nested by package).
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".istio.security", "crate::security")
        .compile_fds(protox::compile(ambit, [&root])?)?;
    Ok(())
}
