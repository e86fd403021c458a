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

use std::{collections::HashMap, time::Duration};

use common::{
    api::{InstanceExt, instance, register_request, resolve, resolve_request},
    artifacts::{ExampleProcess, example},
    binary::BinaryServer,
    otlp::{Collector, KIND_CLIENT, KIND_SERVER, Span, hex},
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

    let mut request = tonic::Request::new(register_request(
        instance("traced", "t-1").at("127.0.0.1:9"),
        60_000,
        0,
    ));
    let md = request.metadata_mut();
    md.insert("traceparent", traceparent(trace, register_parent));
    // Without an auth file the token is ignored; it must not be recorded.
    md.insert("authorization", "Bearer sekrit-token-19".parse().unwrap());
    let registered = client.register(request).await.unwrap().into_inner();

    let mut request = tonic::Request::new(resolve_request("traced"));
    request
        .metadata_mut()
        .insert("traceparent", traceparent(trace, resolve_parent));
    let resolved = client.resolve(request).await.unwrap().into_inner();
    assert_eq!(resolved.instances.len(), 1);

    // A caller's mistake is recorded, but is not an error of the registry.
    let mut request = tonic::Request::new(resolve_request("no spaces allowed"));
    request
        .metadata_mut()
        .insert("traceparent", traceparent(trace, bad_parent));
    let refused = client.resolve(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // Outside any trace: a trace of its own.
    resolve(&mut client, "untraced").await;
    drop(client);

    server.signal("-TERM");
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

/// How long an example may take to print a line or to exit.
const EXAMPLE_WAIT: Duration = Duration::from_secs(20);

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_prod_client_call_is_one_trace_through_registry_and_prod_service() {
    let (service_bin, client_bin) = (example("prod_service").await, example("prod_client").await);
    let collector = Collector::start().await;
    let registry = BinaryServer::start(&["--otlp-endpoint", &collector.url]).await;
    let url = registry.url.clone();
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str());

    let mut addrs = HashMap::new();
    let mut services = Vec::new();
    for id in ["tr-a", "tr-b"] {
        let resource = format!("service.instance.id={id}");
        let mut p = ExampleProcess::spawn_with_env(
            &service_bin,
            &["--registry", &url, "--id", id, "--ttl", "2s"],
            &[endpoint, ("OTEL_RESOURCE_ATTRIBUTES", &resource)],
        );
        let line = p.line(EXAMPLE_WAIT).await;
        assert!(
            line.starts_with(&format!("prod_service id={id} ")),
            "{line}"
        );
        addrs.insert(id, field(&line, "addr=").to_owned());
        services.push(p);
    }

    // No endpoint configured (a service name alone is not one): nothing is
    // exported, and the call works as ever.
    let mut silent = ExampleProcess::spawn_with_env(
        &client_bin,
        &["--registry", &url],
        &[("OTEL_SERVICE_NAME", "silent-client")],
    );
    let line = silent.line(EXAMPLE_WAIT).await;
    assert!(
        line.starts_with("prod_id=233 prod_stock=631 instance=tr-"),
        "{line}"
    );
    silent.exits_cleanly(EXAMPLE_WAIT).await;
    // The standard switch: an endpoint, but the SDK disabled.
    let mut disabled = ExampleProcess::spawn_with_env(
        &client_bin,
        &["--registry", &url],
        &[
            endpoint,
            ("OTEL_SERVICE_NAME", "disabled-client"),
            ("OTEL_SDK_DISABLED", "true"),
        ],
    );
    disabled.line(EXAMPLE_WAIT).await;
    disabled.exits_cleanly(EXAMPLE_WAIT).await;

    // The traced call. The client flushes its spans as it exits.
    let mut traced =
        ExampleProcess::spawn_with_env(&client_bin, &["--registry", &url], &[endpoint]);
    let line = traced.line(EXAMPLE_WAIT).await;
    let answered = field(&line, "instance=").to_owned();
    traced.exits_cleanly(EXAMPLE_WAIT).await;

    for p in &services {
        p.terminate();
    }
    registry.signal("-TERM");

    let call = "prod.v1.ProdService/GetProductStock";
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
        p.exits_cleanly(EXAMPLE_WAIT).await;
    }
}
