//! Authentication and authorization: who is calling, and what they may do.
//!
//! - **Who**: a bearer token (`authorization: Bearer <token>`) whose SHA-256
//!   is listed in the auth file, or, with mTLS, the client certificate's
//!   subject common name. Tokens are never stored or logged in clear; the
//!   presented token is hashed and compared in constant time against every
//!   known hash.
//! - **What**: roles grant `register` (which covers renewing and revoking
//!   the caller's own leases), `read` (resolve, watch, list) and `admin`
//!   (everything, including other identities' leases) on service-name
//!   patterns: `prod` (exact), `payments.*` (prefix), `*` (all).
//! - **Where it is enforced**: [`AuthLayer`] wraps the whole gRPC server, so
//!   no RPC, header trick or client type gets past it: every request except
//!   `grpc.health.v1.Health` (open, so orchestrators can probe) is
//!   authenticated and rate limited before it reaches a service, and the
//!   resulting [`Identity`] travels in the request extensions to the
//!   per-service checks in `core` (permissions and lease ownership).
//! - **Reload**: [`Auth::reload`] swaps the policy atomically (the server
//!   calls it on SIGHUP); open connections and streams are not touched.
//!
//! The auth file (TOML):
//!
//! ```toml
//! [roles.prod-service]
//! register = ["prod"]
//! read = ["prod", "payments.*"]
//!
//! [roles.ops]
//! admin = ["*"]
//!
//! [[tokens]]
//! name = "prod-deployer"          # the identity: owns the leases it creates
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! roles = ["prod-service"]
//!
//! [[certs]]
//! common_name = "prod-1.internal" # mTLS client certificate subject CN
//! roles = ["prod-service"]
//! ```

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{
    Status,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

use crate::error::{Error, Result};

/// Service-name pattern: exact, `prefix*`, or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(s: &str) -> Self {
        if s == "*" {
            Pattern::Any
        } else if let Some(prefix) = s.strip_suffix('*') {
            Pattern::Prefix(prefix.to_string())
        } else {
            Pattern::Exact(s.to_string())
        }
    }

    fn matches(&self, service: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => e == service,
            Pattern::Prefix(p) => service.starts_with(p.as_str()),
        }
    }

    fn text(&self) -> String {
        match self {
            Pattern::Any => "*".into(),
            Pattern::Exact(e) => e.clone(),
            Pattern::Prefix(p) => format!("{p}*"),
        }
    }
}

/// An authenticated caller and its grants.
#[derive(Debug)]
pub struct Identity {
    /// Token name or certificate common name: owns the leases it creates.
    pub name: Arc<str>,
    register: Vec<Pattern>,
    read: Vec<Pattern>,
    admin: Vec<Pattern>,
}

/// What a caller wants to do with a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Resolve, watch, list.
    Read,
    /// Register instances (and renew or revoke the caller's own leases).
    Register,
    /// Anything, including other identities' leases and instances.
    Admin,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Register => "register",
            Action::Admin => "administer",
        }
    }
}

impl Identity {
    /// Whether this identity may do `action` on `service`. Admin implies
    /// every action.
    pub fn may(&self, action: Action, service: &str) -> bool {
        let any = |ps: &[Pattern]| ps.iter().any(|p| p.matches(service));
        any(&self.admin)
            || match action {
                Action::Read => any(&self.read),
                Action::Register => any(&self.register),
                Action::Admin => false,
            }
    }

    /// Whether this identity may read every service (so it needs no
    /// per-instance filtering).
    pub fn reads_everything(&self) -> bool {
        self.read
            .iter()
            .chain(self.admin.iter())
            .any(|p| *p == Pattern::Any)
    }

    /// `PERMISSION_DENIED` for `action` on `service`, naming what the
    /// identity may do instead.
    pub fn deny(&self, action: Action, service: &str) -> Error {
        let grants = |ps: &[Pattern]| {
            if ps.is_empty() {
                "nothing".to_string()
            } else {
                ps.iter().map(Pattern::text).collect::<Vec<_>>().join(", ")
            }
        };
        let granted = match action {
            Action::Read => grants(&self.read),
            Action::Register => grants(&self.register),
            Action::Admin => grants(&self.admin),
        };
        Error::PermissionDenied(format!(
            "identity {:?} may not {} service {service:?} (its roles grant {} on: {granted})",
            self.name,
            action.verb(),
            action.verb(),
        ))
    }

    /// Checks `action` on `service`.
    pub fn check(&self, action: Action, service: &str) -> Result<()> {
        if self.may(action, service) {
            Ok(())
        } else {
            Err(self.deny(action, service))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    roles: HashMap<String, RoleSpec>,
    #[serde(default)]
    tokens: Vec<TokenSpec>,
    #[serde(default)]
    certs: Vec<CertSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleSpec {
    #[serde(default)]
    register: Vec<String>,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    admin: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenSpec {
    name: String,
    sha256: String,
    roles: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertSpec {
    common_name: String,
    roles: Vec<String>,
}

/// A parsed auth file.
#[derive(Debug)]
struct Policy {
    tokens: Vec<([u8; 32], Arc<Identity>)>,
    certs: HashMap<String, Arc<Identity>>,
}

impl Policy {
    fn parse(text: &str, origin: &str) -> Result<Self> {
        let bad = |msg: String| Error::InvalidArgument(format!("auth file {origin}: {msg}"));
        let file: AuthFile = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let identity = |name: &str, roles: &[String]| -> Result<Arc<Identity>> {
            let mut id = Identity {
                name: name.into(),
                register: Vec::new(),
                read: Vec::new(),
                admin: Vec::new(),
            };
            for role in roles {
                let spec = file
                    .roles
                    .get(role)
                    .ok_or_else(|| bad(format!("{name:?} refers to unknown role {role:?}")))?;
                id.register
                    .extend(spec.register.iter().map(|p| Pattern::parse(p)));
                id.read.extend(spec.read.iter().map(|p| Pattern::parse(p)));
                id.admin
                    .extend(spec.admin.iter().map(|p| Pattern::parse(p)));
            }
            Ok(Arc::new(id))
        };
        let mut tokens = Vec::new();
        for t in &file.tokens {
            let hash = hex::decode(t.sha256.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "token {:?}: sha256 must be 64 hex digits (the SHA-256 of the token)",
                        t.name
                    ))
                })?;
            tokens.push((hash, identity(&t.name, &t.roles)?));
        }
        let mut certs = HashMap::new();
        for c in &file.certs {
            certs.insert(c.common_name.clone(), identity(&c.common_name, &c.roles)?);
        }
        Ok(Self { tokens, certs })
    }
}

/// Hex SHA-256 of a token, as the auth file stores it.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The loaded policy, swappable at run time.
#[derive(Debug)]
pub struct Auth {
    path: Option<PathBuf>,
    policy: ArcSwap<Policy>,
}

impl Auth {
    /// Loads the auth file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::InvalidArgument(format!("cannot read auth file {}: {e}", path.display()))
        })?;
        let policy = Policy::parse(&text, &path.display().to_string())?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            policy: ArcSwap::from_pointee(policy),
        })
    }

    /// A policy from TOML text (tests, embedding).
    pub fn from_toml(text: &str) -> Result<Self> {
        Ok(Self {
            path: None,
            policy: ArcSwap::from_pointee(Policy::parse(text, "(inline)")?),
        })
    }

    /// Re-reads the file; on error the old policy stays in force.
    pub fn reload(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::InvalidArgument(format!("cannot read auth file {}: {e}", path.display()))
        })?;
        let policy = Policy::parse(&text, &path.display().to_string())?;
        self.policy.store(Arc::new(policy));
        Ok(())
    }

    /// Number of tokens and certificate identities, for the reload log line.
    pub fn sizes(&self) -> (usize, usize) {
        let p = self.policy.load();
        (p.tokens.len(), p.certs.len())
    }

    /// Identifies the caller from its headers and (with mTLS) certificate.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        peer_cert: Option<&[u8]>,
    ) -> Result<Arc<Identity>, Status> {
        let policy = self.policy.load();
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim)
                .ok_or_else(|| {
                    Status::unauthenticated(
                        "malformed authorization header: expected \"Bearer <token>\"",
                    )
                })?;
            let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            // Constant time: compare against every hash, never stop early.
            let mut found: Option<&Arc<Identity>> = None;
            for (hash, id) in &policy.tokens {
                let eq: bool = hash.ct_eq(&presented).into();
                if eq {
                    found = Some(id);
                }
            }
            return found
                .cloned()
                .ok_or_else(|| Status::unauthenticated("unknown token"));
        }
        if let Some(der) = peer_cert {
            let cn = common_name(der).ok_or_else(|| {
                Status::unauthenticated("client certificate has no subject common name")
            })?;
            return policy.certs.get(&cn).cloned().ok_or_else(|| {
                Status::unauthenticated(format!(
                    "client certificate {cn:?} is not mapped to a role in the auth file"
                ))
            });
        }
        Err(Status::unauthenticated(
            "missing credentials: send \"authorization: Bearer <token>\" (or a client certificate)",
        ))
    }
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// Per-identity token bucket: each identity (token name, certificate name,
/// or client IP when auth is off) may make `rate` requests per second with
/// bursts of `burst`.
#[derive(Debug)]
pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
    rate: u32,
}

impl RateLimit {
    /// `None` when `rate` is 0 (no limit).
    pub fn new(rate: u32, burst: u32) -> Option<Self> {
        let per_second = NonZeroU32::new(rate)?;
        let burst = NonZeroU32::new(burst.max(rate)).unwrap_or(per_second);
        Some(Self {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            rate,
        })
    }

    /// Takes one request from `key`'s bucket, or `RESOURCE_EXHAUSTED`
    /// (shared by the gRPC layer and the HTTP API, so an identity has one
    /// budget whichever it uses).
    pub fn check(&self, key: &Arc<str>) -> Result<(), Status> {
        self.limiter.check_key(key).map_err(|_| {
            Status::resource_exhausted(format!(
                "rate limit exceeded: {key} may make {} requests per second (rate_limit)",
                self.rate
            ))
        })
    }

    /// Forgets idle keys so a stream of distinct callers cannot grow memory.
    pub fn shrink(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// The gRPC paths that stay open without credentials.
fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// Tower layer enforcing authentication and rate limits on every request.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Option<Arc<Auth>>,
    rate: Option<Arc<RateLimit>>,
}

impl AuthLayer {
    /// Authenticates with `auth` (when set) and rate-limits with `rate`.
    pub fn new(auth: Option<Arc<Auth>>, rate: Option<Arc<RateLimit>>) -> Self {
        Self { auth, rate }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service produced by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

fn peer_ip<B>(req: &http::Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if is_open(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let mut key: Option<Arc<str>> = None;
        if let Some(auth) = &self.layer.auth {
            let cert = req
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.peer_certs())
                .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
            match auth.authenticate(req.headers(), cert.as_deref()) {
                Ok(identity) => {
                    key = Some(identity.name.clone());
                    req.extensions_mut().insert(identity);
                }
                Err(status) => {
                    tracing::debug!(
                        path = req.uri().path(),
                        reason = status.message(),
                        "unauthenticated request"
                    );
                    return Box::pin(std::future::ready(Ok(status.into_http())));
                }
            }
        }
        if let Some(rate) = &self.layer.rate {
            let key = key.unwrap_or_else(|| {
                peer_ip(&req)
                    .map(|ip| Arc::from(ip.to_string()))
                    .unwrap_or_else(|| Arc::from("unknown"))
            });
            if let Err(status) = rate.check(&key) {
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

/// The caller of a request, as the [`AuthLayer`] identified it; `None` when
/// auth is off.
pub fn caller<T>(req: &tonic::Request<T>) -> Option<Arc<Identity>> {
    req.extensions().get::<Arc<Identity>>().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [roles.prod-service]
        register = ["prod"]
        read = ["prod", "payments.*"]

        [roles.ops]
        admin = ["*"]

        [[tokens]]
        name = "deployer"
        sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        roles = ["prod-service"]

        [[tokens]]
        name = "oncall"
        sha256 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
        roles = ["ops"]
    "#;

    fn bearer(token: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn hashes_match_the_file_format() {
        assert_eq!(
            hash_token("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn tokens_identify_and_roles_grant() {
        let auth = Auth::from_toml(FILE).unwrap();
        let id = auth.authenticate(&bearer("test"), None).unwrap();
        assert_eq!(&*id.name, "deployer");
        assert!(id.may(Action::Register, "prod"));
        assert!(!id.may(Action::Register, "payments.eu"));
        assert!(id.may(Action::Read, "payments.eu"));
        assert!(!id.may(Action::Read, "payments"), "prefix is payments.");
        assert!(!id.may(Action::Admin, "prod"));
        assert!(!id.reads_everything());
        let msg = id.deny(Action::Register, "web").to_string();
        assert!(
            msg.contains("\"deployer\"") && msg.contains("register on: prod"),
            "{msg}"
        );

        let ops = auth.authenticate(&bearer("test2"), None).unwrap();
        assert!(ops.may(Action::Admin, "anything") && ops.may(Action::Register, "x"));
        assert!(ops.reads_everything());
    }

    #[test]
    fn missing_unknown_and_malformed_credentials() {
        let auth = Auth::from_toml(FILE).unwrap();
        let code = |h: &http::HeaderMap| auth.authenticate(h, None).unwrap_err().code();
        assert_eq!(code(&http::HeaderMap::new()), tonic::Code::Unauthenticated);
        assert_eq!(code(&bearer("nope")), tonic::Code::Unauthenticated);
        let mut basic = http::HeaderMap::new();
        basic.insert(
            http::header::AUTHORIZATION,
            "Basic dGVzdA==".parse().unwrap(),
        );
        assert_eq!(code(&basic), tonic::Code::Unauthenticated);
    }

    #[test]
    fn bad_files_are_rejected_with_the_reason() {
        for (text, needle) in [
            (
                "[[tokens]]\nname='a'\nsha256='xyz'\nroles=[]",
                "64 hex digits",
            ),
            (
                "[[tokens]]\nname='a'\nsha256='9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'\nroles=['ghost']",
                "unknown role \"ghost\"",
            ),
            ("[roles.x]\nwrite=['a']", "unknown field"),
        ] {
            let err = Auth::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn rate_limit_is_per_key() {
        let rl = RateLimit::new(2, 2).unwrap();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        assert!(rl.check(&a).is_ok());
        assert!(rl.check(&a).is_ok());
        let err = rl.check(&a).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(rl.check(&b).is_ok(), "another identity has its own bucket");
        assert!(RateLimit::new(0, 0).is_none());
    }
}
