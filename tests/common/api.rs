//! The registry API as the tests call it: instances, Register, Resolve,
//! Deregister and Watch, one signature each. The request builders serve
//! any client (one with a bearer token, too); the async helpers take the
//! plain raw client and panic, naming the call, when it fails.

use std::{path::PathBuf, time::Duration};

use registry_api::v1::{
    DeregisterRequest, DeregisterResponse, Event, Instance, InstanceKey, RegisterRequest,
    RegisterResponse, ResolveRequest, ResolveResponse, Snapshot, WatchRequest, WatchResponse,
    deregister_request::Target, registry_client::RegistryClient, watch_response::Kind,
};
use tonic::{
    Status, Streaming,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

/// The raw generated client on a plain channel.
pub type Client = RegistryClient<Channel>;

/// How long the watch helpers wait for a message they expect.
pub const WATCH_WAIT: Duration = Duration::from_secs(5);

/// `service/id` at `10.0.0.1:80`, weight and metadata unset; the
/// [`InstanceExt`] methods change what a test cares about.
pub fn instance(service: &str, id: &str) -> Instance {
    Instance {
        service: service.into(),
        id: id.into(),
        address: "10.0.0.1:80".into(),
        ..Default::default()
    }
}

/// Builder-style changes to an [`Instance`].
pub trait InstanceExt {
    /// Another address.
    fn at(self, address: impl Into<String>) -> Self;
    /// One more metadata entry.
    fn meta(self, key: &str, value: &str) -> Self;
    /// Metadata entries, added in order.
    fn metas(self, entries: &[(&str, &str)]) -> Self;
    /// A load-balancing weight.
    fn weight(self, weight: u32) -> Self;
}

impl InstanceExt for Instance {
    fn at(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    fn meta(mut self, key: &str, value: &str) -> Self {
        self.metadata.insert(key.to_owned(), value.to_owned());
        self
    }

    fn metas(self, entries: &[(&str, &str)]) -> Self {
        entries.iter().fold(self, |i, (k, v)| i.meta(k, v))
    }

    fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// Register `instance` on a new lease of `ttl_ms` (`lease_id` 0), or on
/// the existing lease `lease_id` (`ttl_ms` then 0), the fields as sent.
pub fn register_request(instance: Instance, ttl_ms: u64, lease_id: u64) -> RegisterRequest {
    RegisterRequest {
        instance: Some(instance),
        ttl_ms,
        lease_id,
    }
}

/// Register, expected to succeed.
pub async fn register(
    c: &mut Client,
    instance: Instance,
    ttl_ms: u64,
    lease_id: u64,
) -> RegisterResponse {
    let what = format!("{}/{}", instance.service, instance.id);
    try_register(c, instance, ttl_ms, lease_id)
        .await
        .unwrap_or_else(|e| panic!("register {what}: {e}"))
}

/// Register, its outcome.
pub async fn try_register(
    c: &mut Client,
    instance: Instance,
    ttl_ms: u64,
    lease_id: u64,
) -> Result<RegisterResponse, Status> {
    c.register(register_request(instance, ttl_ms, lease_id))
        .await
        .map(tonic::Response::into_inner)
}

/// Resolve every instance of `service` (no selector).
pub fn resolve_request(service: &str) -> ResolveRequest {
    ResolveRequest {
        service: service.into(),
        ..Default::default()
    }
}

/// Resolve, expected to succeed.
pub async fn resolve(c: &mut Client, service: &str) -> ResolveResponse {
    c.resolve(resolve_request(service))
        .await
        .unwrap_or_else(|e| panic!("resolve {service}: {e}"))
        .into_inner()
}

/// The instance ids of an answer, in its order.
pub fn ids(r: &ResolveResponse) -> Vec<&str> {
    r.instances.iter().map(|i| i.id.as_str()).collect()
}

/// Deregister one instance.
pub fn deregister_instance(service: &str, id: &str) -> DeregisterRequest {
    DeregisterRequest {
        target: Some(Target::Instance(InstanceKey {
            service: service.into(),
            id: id.into(),
        })),
    }
}

/// Deregister a lease and every instance on it.
pub fn deregister_lease(lease_id: u64) -> DeregisterRequest {
    DeregisterRequest {
        target: Some(Target::LeaseId(lease_id)),
    }
}

/// Deregister, expected to succeed.
pub async fn deregister(c: &mut Client, request: DeregisterRequest) -> DeregisterResponse {
    let what = format!("{:?}", request.target);
    c.deregister(request)
        .await
        .unwrap_or_else(|e| panic!("deregister {what}: {e}"))
        .into_inner()
}

/// Opens a watch, expected to succeed.
pub async fn watch(c: &mut Client, request: WatchRequest) -> Streaming<WatchResponse> {
    c.watch(request).await.expect("watch").into_inner()
}

/// The next message of a watch stream, within [`WATCH_WAIT`].
pub async fn next(stream: &mut Streaming<WatchResponse>) -> Kind {
    tokio::time::timeout(WATCH_WAIT, stream.message())
        .await
        .expect("watch message within 5 s")
        .expect("watch stream error")
        .expect("watch stream ended")
        .kind
        .expect("message kind")
}

/// Reads a whole (possibly chunked) snapshot.
pub async fn snapshot(stream: &mut Streaming<WatchResponse>) -> Snapshot {
    let mut whole: Option<Snapshot> = None;
    loop {
        match next(stream).await {
            Kind::Snapshot(s) => {
                let more = s.more;
                match &mut whole {
                    None => whole = Some(s),
                    Some(w) => {
                        assert_eq!(w.revision, s.revision, "chunks share a revision");
                        w.instances.extend(s.instances);
                    }
                }
                if !more {
                    return whole.unwrap();
                }
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }
}

/// Reads event messages until `n` events have arrived (progress messages
/// are skipped); exactly `n`, or it panics.
pub async fn events(stream: &mut Streaming<WatchResponse>, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < n {
        match next(stream).await {
            Kind::Events(b) => out.extend(b.events),
            Kind::Progress(_) => {}
            Kind::Snapshot(s) => panic!("unexpected snapshot (reset {}) mid-stream", s.reset),
        }
    }
    assert_eq!(out.len(), n, "more events than expected: {out:?}");
    out
}

/// Adds this `authorization` header value (normally `Bearer <token>`) to
/// every call, or nothing.
#[derive(Clone)]
pub struct Bearer(pub Option<MetadataValue<Ascii>>);

impl Bearer {
    /// For `token`; `None` sends no header.
    pub fn new(token: Option<&str>) -> Self {
        Self(token.map(|t| format!("Bearer {t}").parse().expect("token is ASCII")))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A raw client sending `token` with every call.
pub type AuthClient = RegistryClient<InterceptedService<Channel, Bearer>>;

/// A raw client on `channel` that sends `token` (or none).
pub fn with_token(channel: Channel, token: Option<&str>) -> AuthClient {
    RegistryClient::new(InterceptedService::new(channel, Bearer::new(token)))
}

/// An auth policy (`--auth-file`): `roles` (TOML role tables, and any
/// other sections) and one `[[tokens]]` entry per (name, secret, roles).
pub fn auth_toml(roles: &str, tokens: &[(&str, &str, &[&str])]) -> String {
    let mut toml = roles.to_owned();
    for (name, secret, token_roles) in tokens {
        let token_roles: Vec<String> = token_roles.iter().map(|r| format!("{r:?}")).collect();
        toml.push_str(&format!(
            "\n[[tokens]]\nname = {name:?}\nsha256 = \"{}\"\nroles = [{}]\n",
            registry::auth::hash_token(secret),
            token_roles.join(", ")
        ));
    }
    toml
}

/// [`auth_toml`] written to a new file of its own (kept: the server reads
/// it, and reloads it on SIGHUP).
pub fn auth_file(roles: &str, tokens: &[(&str, &str, &[&str])]) -> PathBuf {
    let file = tempfile::Builder::new()
        .prefix("registry-auth-")
        .suffix(".toml")
        .tempfile()
        .expect("create an auth file");
    std::fs::write(file.path(), auth_toml(roles, tokens)).expect("write the auth file");
    file.into_temp_path().keep().expect("keep the auth file")
}
