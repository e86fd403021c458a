//! Compiles `proto/` with protox (pure Rust, so no system `protoc`) and
//! tonic-prost-build, and writes the encoded file descriptor set that the
//! daemon serves through gRPC server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "registry/v1/registry.proto",
    "examples/prod.proto",
    "bench/echo.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let encoded = fds.encode_to_vec();
    fs::write(out.join("registry_descriptor.bin"), &encoded)?;
    // The proto3 JSON mapping of registry.v1 (lowerCamelCase names, 64-bit
    // integers as strings, enums by name, every field emitted as
    // grpc-gateway does) for the daemon's HTTP/JSON API.
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .emit_fields()
        .build(&[".registry.v1"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Boxed: rarely set, and large; the instance (held by the million
        // in change batches and events) stays small without them.
        .boxed(".registry.v1.Instance.check")
        .boxed(".registry.v1.Instance.last_check")
        .compile_fds(fds)?;
    // etcd's v3 API (the subset the registry's etcd store uses), client
    // only, and kept out of the reflection descriptor: it is not our API.
    let etcd = protox::compile(["etcd/etcdserverpb/rpc.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
