//! Tracing over OTLP (issue 19), against an in-test collector
//! (`common::otlp`): the registry exports its RPC spans and joins the trace
//! of an incoming `traceparent`; one `prod_client` -> `prod_service` call,
//! run as real processes, is one trace in which the client span names the
//! instance that answered and ProdService's server span is its child; a
//! client with no endpoint configured exports nothing.
//!
//! Every process is stopped with SIGTERM before its spans are awaited: the
//! batch exporters' schedule (5 s) has not come round by then, so the spans
//! arrive only if shutdown flushes them.

#![cfg(unix)]

mod common;

use std::{collections::HashMap, path::PathBuf, process::Stdio, time::Duration};

use common::{
    binary::BinaryServer,
    otlp::{Collector, KIND_CLIENT, KIND_SERVER, Span, hex},
};
use registry_api::v1::{Instance, RegisterRequest, ResolveRequest};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
    time::timeout,
};

/// How long spans may take to arrive once their process is told to stop.
const ARRIVAL: Duration = Duration::from_secs(15);

/// A W3C `traceparent` for a sampled span `parent` of trace `trace`.
fn traceparent(
    trace: &str,
    parent: &str,
) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    format!("00-{trace}-{parent}-01").parse().unwrap()
}

fn sigterm(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
}

fn find(spans: &[Span], what: impl Fn(&Span) -> bool) -> Option<&Span> {
    spans.iter().find(|s| what(s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_spans_of_register_and_resolve_join_the_callers_trace() {
    let collector = Collector::start().await;
    let server = BinaryServer::start(&["--otlp-endpoint", &collector.url]).await;
    let mut client = server.client().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (register_parent, resolve_parent, bad_parent) =
        ("00f067aa0ba902b7", "b7ad6b7169203331", "53995c3f42cd8ad8");

    let mut request = tonic::Request::new(RegisterRequest {
        instance: Some(Instance {
            service: "traced".into(),
            id: "t-1".into(),
            address: "127.0.0.1:9".into(),
            ..Default::default()
        }),
        ttl_ms: 60_000,
        lease_id: 0,
    });
    let md = request.metadata_mut();
    md.insert("traceparent", traceparent(trace, register_parent));
    // Without an auth file the token is ignored; it must not be recorded.
    md.insert("authorization", "Bearer sekrit-token-19".parse().unwrap());
    let registered = client.register(request).await.unwrap().into_inner();

    let mut request = tonic::Request::new(ResolveRequest {
        service: "traced".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent(trace, resolve_parent));
    let resolved = client.resolve(request).await.unwrap().into_inner();
    assert_eq!(resolved.instances.len(), 1);

    // A caller's mistake is recorded, but is not an error of the registry.
    let mut request = tonic::Request::new(ResolveRequest {
        service: "no spaces allowed".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent(trace, bad_parent));
    let refused = client.resolve(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // Outside any trace: a trace of its own.
    client
        .resolve(ResolveRequest {
            service: "untraced".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(client);

    sigterm(server.pid());
    let name = |method: &str| format!("registry.v1.Registry/{method}");
    let in_trace =
        |s: &Span, parent: &str| hex(&s.trace_id) == trace && hex(&s.parent_span_id) == parent;
    let spans = collector
        .wait_for(
            ARRIVAL,
            "the registry's Register and Resolve spans",
            |spans| {
                find(spans, |s| s.name == name("Register")).is_some()
                    && find(spans, |s| in_trace(s, resolve_parent)).is_some()
                    && find(spans, |s| in_trace(s, bad_parent)).is_some()
                    && find(spans, |s| s.attr("registry.service") == Some("untraced")).is_some()
            },
        )
        .await;

    let register = find(&spans, |s| s.name == name("Register")).unwrap();
    assert!(in_trace(register, register_parent), "{register:?}");
    assert_eq!(register.service, "registry", "{register:?}");
    assert_eq!(register.kind, KIND_SERVER, "{register:?}");
    let expect = HashMap::from([
        ("rpc.system", "grpc".to_owned()),
        ("rpc.service", "registry.v1.Registry".to_owned()),
        ("rpc.method", "Register".to_owned()),
        ("rpc.grpc.status_code", "0".to_owned()),
        ("registry.service", "traced".to_owned()),
        ("registry.instance_id", "t-1".to_owned()),
        ("registry.lease_id", registered.lease_id.to_string()),
        ("registry.revision", registered.revision.to_string()),
    ]);
    for (key, value) in &expect {
        assert_eq!(
            register.attr(key),
            Some(value.as_str()),
            "{key}: {register:?}"
        );
    }

    let resolve = find(&spans, |s| in_trace(s, resolve_parent)).unwrap();
    assert_eq!(resolve.name, name("Resolve"), "{resolve:?}");
    assert_eq!(resolve.attr("registry.service"), Some("traced"));
    assert_eq!(
        resolve.attr("registry.revision"),
        Some(resolved.revision.to_string().as_str())
    );
    assert_eq!(resolve.status, 0, "unset status: {resolve:?}");

    let bad = find(&spans, |s| in_trace(s, bad_parent)).unwrap();
    assert_eq!(bad.attr("rpc.grpc.status_code"), Some("3"), "{bad:?}");
    assert_ne!(
        bad.status, 2,
        "INVALID_ARGUMENT is not a server error: {bad:?}"
    );

    let untraced = find(&spans, |s| s.attr("registry.service") == Some("untraced")).unwrap();
    assert!(untraced.parent_span_id.is_empty(), "{untraced:?}");
    assert_ne!(hex(&untraced.trace_id), trace);

    for s in &spans {
        for value in s.attributes.values().chain(s.resource.values()) {
            assert!(!value.contains("sekrit"), "token recorded: {s:?}");
        }
    }
}

/// An example process whose stdout is read line by line.
struct Proc {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Proc {
    /// Starts `path` with no inherited `OTEL_*` variable, then `env`.
    fn spawn(path: &PathBuf, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(path);
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")) {
            command.env_remove(key);
        }
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn example");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    async fn line(&mut self) -> String {
        timeout(Duration::from_secs(20), self.lines.next_line())
            .await
            .expect("example printed nothing in time")
            .expect("read example stdout")
            .expect("example closed stdout")
    }

    async fn exits_cleanly(&mut self) {
        let status = timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("example did not exit in time")
            .unwrap();
        assert!(status.success(), "{status:?}");
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_prod_client_call_is_one_trace_through_registry_and_prod_service() {
    let (service_bin, client_bin) = tokio::task::spawn_blocking(|| {
        let example = |name| common::built_artifact(env!("CARGO_PKG_NAME"), "example", name);
        (example("prod_service"), example("prod_client"))
    })
    .await
    .unwrap();
    let collector = Collector::start().await;
    let registry = BinaryServer::start(&["--otlp-endpoint", &collector.url]).await;
    let url = registry.url.clone();
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str());

    let mut addrs = HashMap::new();
    let mut services = Vec::new();
    for id in ["tr-a", "tr-b"] {
        let resource = format!("service.instance.id={id}");
        let mut p = Proc::spawn(
            &service_bin,
            &["--registry", &url, "--id", id, "--ttl", "2s"],
            &[endpoint, ("OTEL_RESOURCE_ATTRIBUTES", &resource)],
        );
        let line = p.line().await;
        assert!(
            line.starts_with(&format!("prod_service id={id} ")),
            "{line}"
        );
        addrs.insert(id, field(&line, "addr=").to_owned());
        services.push(p);
    }

    // No endpoint configured (a service name alone is not one): nothing is
    // exported, and the call works as ever.
    let mut silent = Proc::spawn(
        &client_bin,
        &["--registry", &url],
        &[("OTEL_SERVICE_NAME", "silent-client")],
    );
    let line = silent.line().await;
    assert!(
        line.starts_with("prod_id=233 prod_stock=631 instance=tr-"),
        "{line}"
    );
    silent.exits_cleanly().await;
    // The standard switch: an endpoint, but the SDK disabled.
    let mut disabled = Proc::spawn(
        &client_bin,
        &["--registry", &url],
        &[
            endpoint,
            ("OTEL_SERVICE_NAME", "disabled-client"),
            ("OTEL_SDK_DISABLED", "true"),
        ],
    );
    disabled.line().await;
    disabled.exits_cleanly().await;

    // The traced call. The client flushes its spans as it exits.
    let mut traced = Proc::spawn(&client_bin, &["--registry", &url], &[endpoint]);
    let line = traced.line().await;
    let answered = field(&line, "instance=").to_owned();
    traced.exits_cleanly().await;

    for p in &services {
        sigterm(p.child.id().unwrap());
    }
    sigterm(registry.pid());

    let call = "prod.ProdService/GetProductStock";
    let client_span = |s: &Span| s.service == "prod_client" && s.name == call;
    let spans = collector
        .wait_for(
            ARRIVAL,
            "client, server and registry spans of the call",
            |spans| {
                let Some(client) = find(spans, client_span) else {
                    return false;
                };
                let same_trace = |s: &Span| s.trace_id == client.trace_id;
                find(spans, |s| {
                    s.service == "prod_service" && s.parent_span_id == client.span_id
                })
                .is_some()
                    && find(spans, |s| s.service == "registry" && same_trace(s)).is_some()
            },
        )
        .await;

    let client = find(&spans, client_span).unwrap();
    assert_eq!(client.kind, KIND_CLIENT, "{client:?}");
    assert_eq!(
        client.attr("registry.instance_id"),
        Some(answered.as_str()),
        "{client:?}"
    );
    let addr = &addrs[answered.as_str()];
    assert_eq!(
        client.attr("registry.instance_address"),
        Some(addr.as_str())
    );
    let port = addr.rsplit_once(':').unwrap().1;
    assert_eq!(client.attr("server.port"), Some(port), "{client:?}");
    assert_eq!(client.attr("server.address"), Some("127.0.0.1"));
    assert_eq!(client.attr("registry.service"), Some("prod"));
    assert_eq!(client.attr("rpc.grpc.status_code"), Some("0"));

    let server = find(&spans, |s| {
        s.service == "prod_service" && s.parent_span_id == client.span_id
    })
    .unwrap();
    assert_eq!(server.trace_id, client.trace_id);
    assert_eq!(server.kind, KIND_SERVER, "{server:?}");
    assert_eq!(server.name, call);
    assert_eq!(
        server.resource.get("service.instance.id"),
        Some(&answered),
        "the instance that answered served it: {server:?}"
    );
    assert_eq!(server.attr("rpc.grpc.status_code"), Some("0"));

    // The caller's root span holds the call and the registry's Resolve.
    let root = find(&spans, |s| s.span_id == client.parent_span_id).expect("root span");
    assert_eq!(root.service, "prod_client");
    assert!(root.parent_span_id.is_empty(), "{root:?}");
    let resolve_call = find(&spans, |s| {
        s.service == "prod_client"
            && s.kind == KIND_CLIENT
            && s.name == "registry.v1.Registry/Resolve"
    })
    .expect("the client's Resolve span");
    assert_eq!(resolve_call.parent_span_id, root.span_id);
    let resolve = find(&spans, |s| {
        s.service == "registry" && s.trace_id == client.trace_id
    })
    .unwrap();
    assert_eq!(resolve.name, "registry.v1.Registry/Resolve");
    assert_eq!(resolve.parent_span_id, resolve_call.span_id);
    assert_eq!(resolve.attr("registry.service"), Some("prod"));

    for quiet in ["silent-client", "disabled-client"] {
        assert!(
            find(&spans, |s| s.service == quiet).is_none(),
            "{quiet} exported spans"
        );
    }
    for p in &mut services {
        p.exits_cleanly().await;
    }
}
