//! Compiles the protobuf definitions with protox (pure Rust), so no `protoc` is needed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let zds = ["proto/zds.proto"];
    // Istio's control-plane protocols: the CA service, delta ADS and the resources it carries.
    let control_plane = [
        "proto/istio/citadel.proto",
        "proto/envoy/discovery.proto",
        "proto/istio/workload.proto",
        "proto/istio/authorization.proto",
    ];
    for p in zds.iter().chain(&control_plane) {
        println!("cargo:rerun-if-changed={p}");
    }
    prost_build::Config::new().compile_fds(protox::compile(zds, ["proto"])?)?;
    // Messages and services are generated always (cheap); the crate compiles them only with feature `grpc`.
    tonic_prost_build::configure().compile_fds(protox::compile(control_plane, ["proto"])?)?;
    Ok(())
}
