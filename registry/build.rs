//! Generates the server side of `registry.v1.Registry` with tonic's manual
//! builder. The message types are the ones `registry-api` generates from the
//! proto; only Watch's response type differs: `WatchFrame`, which can carry
//! an event batch encoded once and shared by every watcher that sees it,
//! instead of being re-encoded per watcher. On the wire it is exactly a
//! `registry.v1.WatchResponse`, so clients use the ordinary generated types.

use tonic_build::manual::{Builder, Method, Service};

fn method(
    name: &str,
    route: &str,
    input: &str,
    output: &str,
) -> tonic_build::manual::MethodBuilder {
    Method::builder()
        .name(name)
        .route_name(route)
        .input_type(format!("registry_api::v1::{input}"))
        .output_type(output)
        .codec_path("tonic_prost::ProstCodec")
}

fn main() {
    let api = |t: &str| format!("registry_api::v1::{t}");
    let service = Service::builder()
        .name("Registry")
        .package("registry.v1")
        .method(
            method(
                "register",
                "Register",
                "RegisterRequest",
                &api("RegisterResponse"),
            )
            .build(),
        )
        .method(
            method(
                "heartbeat",
                "Heartbeat",
                "HeartbeatRequest",
                &api("HeartbeatResponse"),
            )
            .build(),
        )
        .method(
            method(
                "keep_alive",
                "KeepAlive",
                "HeartbeatRequest",
                &api("HeartbeatResponse"),
            )
            .client_streaming()
            .server_streaming()
            .build(),
        )
        .method(
            method(
                "deregister",
                "Deregister",
                "DeregisterRequest",
                &api("DeregisterResponse"),
            )
            .build(),
        )
        .method(
            method(
                "resolve",
                "Resolve",
                "ResolveRequest",
                "crate::frame::ResolveFrame",
            )
            .build(),
        )
        .method(
            method(
                "list_services",
                "ListServices",
                "ListServicesRequest",
                &api("ListServicesResponse"),
            )
            .build(),
        )
        .method(
            method("watch", "Watch", "WatchRequest", "crate::watch::WatchFrame")
                .server_streaming()
                .build(),
        )
        .method(method("status", "Status", "StatusRequest", &api("StatusResponse")).build())
        .method(
            method(
                "set_instance_state",
                "SetInstanceState",
                "SetInstanceStateRequest",
                &api("SetInstanceStateResponse"),
            )
            .build(),
        )
        .build();
    Builder::new()
        .build_client(false)
        .build_server(true)
        .compile(&[service]);
    println!("cargo:rerun-if-changed=build.rs");
}
