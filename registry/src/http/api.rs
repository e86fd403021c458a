//! The JSON routes: reads with ETags and long-poll, and the write RPCs.
//!
//! Query parameters of the reads:
//! - `wait=30s&after_revision=N` (with optional `epoch=E`): hold the
//!   request until something in the service (for `/v1/services`: anywhere)
//!   changes at a revision above N, at most `wait` (capped at
//!   [`longpoll::MAX_WAIT`], plus up to 1/16 of jitter so timed-out pollers
//!   do not return in lockstep). An `after_revision` the server has not
//!   reached, or an `epoch` of another server life, answers at once.
//! - `/v1/services/{name}` only: `include_lease_ttl=true`,
//!   `health=passing|warning|critical|serving|any`, and every other
//!   parameter is a selector pair (`?version=1.4.2&zone=eu-1`); write
//!   `selector.wait=x` for a metadata key that collides with a parameter.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::{
        Path, Query, State,
        rejection::{BytesRejection, QueryRejection},
    },
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
};
use rand::Rng;
use registry_api::v1::{
    DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse, Instance,
    RegisterRequest, ResolveResponse, deregister_request::Target,
};
use serde::de::DeserializeOwned;

use super::{ApiError, CallerExt, HttpApi, etag, json_answer, longpoll};
use crate::error::Error;

/// Health of a listed instance: the state of its health check (see
/// [`crate::health`]); an instance without a check is passing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Serving.
    Passing,
    /// Serving, with a warning.
    Warning,
    /// Not serving.
    Critical,
}

impl Health {
    /// The name used in JSON, labels and the dashboard.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }

    /// Whether callers should be sent to it (DNS, the `serving` filter).
    pub fn serving(self) -> bool {
        matches!(self, Health::Passing | Health::Warning)
    }
}

/// The health of a listed instance (see [`Health`]).
pub fn health_of(instance: &Instance) -> Health {
    match registry_api::v1::HealthState::try_from(instance.health) {
        Ok(registry_api::v1::HealthState::Warning) => Health::Warning,
        Ok(registry_api::v1::HealthState::Critical) => Health::Critical,
        _ => Health::Passing,
    }
}

/// Which health states a read keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HealthFilter {
    One(Health),
    Serving,
    Any,
}

impl HealthFilter {
    fn parse(s: &str) -> Result<Self, ApiError> {
        Ok(match s {
            "passing" => Self::One(Health::Passing),
            "warning" => Self::One(Health::Warning),
            "critical" => Self::One(Health::Critical),
            "serving" => Self::Serving,
            "any" | "" => Self::Any,
            other => {
                return Err(ApiError::invalid(format!(
                    "health {other:?} is not one of passing, warning, critical, serving, any"
                )));
            }
        })
    }

    fn keeps(self, instance: &Instance) -> bool {
        match self {
            Self::One(want) => health_of(instance) == want,
            // Resolve answered the served set already.
            Self::Serving | Self::Any => true,
        }
    }

    /// Whether the read needs instances that are not served: every filter
    /// but `serving` (the default, what gRPC Resolve answers).
    fn needs_all(self) -> bool {
        !matches!(self, Self::Serving)
    }
}

/// Query parameters of a read.
#[derive(Debug, Default)]
struct ReadParams {
    wait: Option<Duration>,
    after_revision: Option<u64>,
    epoch: Option<u64>,
    include_lease_ttl: bool,
    health: Option<HealthFilter>,
    selector: HashMap<String, String>,
}

/// Parses a `u64` query parameter.
pub(crate) fn parse_u64(name: &str, value: &str) -> Result<u64, ApiError> {
    value.parse().map_err(|_| {
        ApiError::invalid(format!(
            "{name} {value:?} is not an unsigned integer (0..=18446744073709551615)"
        ))
    })
}

/// Parses a boolean query parameter (`true`, `false`, `1`, `0`, or empty for
/// true, as in `?include_lease_ttl`).
pub(crate) fn parse_bool(name: &str, value: &str) -> Result<bool, ApiError> {
    match value {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(ApiError::invalid(format!(
            "{name} {value:?} is not a boolean (true or false)"
        ))),
    }
}

/// The query pairs, or the reason they do not parse.
pub(crate) fn query_pairs(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Vec<(String, String)>, ApiError> {
    query
        .map(|Query(pairs)| pairs)
        .map_err(|e| ApiError::invalid(format!("malformed query string: {}", e.body_text())))
}

impl ReadParams {
    /// `selector_allowed`: unknown parameters are selector pairs (resolve)
    /// rather than errors (list).
    fn parse(pairs: Vec<(String, String)>, selector_allowed: bool) -> Result<Self, ApiError> {
        let mut p = Self::default();
        let mut seen = std::collections::HashSet::new();
        for (k, v) in pairs {
            if !seen.insert(k.clone()) {
                return Err(ApiError::invalid(format!(
                    "query parameter {k:?} is given more than once"
                )));
            }
            match k.as_str() {
                "wait" => {
                    let d = humantime::parse_duration(&v).map_err(|e| {
                        ApiError::invalid(format!(
                            "wait {v:?} is not a duration ({e}); use e.g. 30s or 500ms"
                        ))
                    })?;
                    if d > longpoll::MAX_WAIT {
                        return Err(ApiError::new(
                            tonic::Code::OutOfRange,
                            format!(
                                "wait {} is above the maximum {}",
                                humantime::format_duration(d),
                                humantime::format_duration(longpoll::MAX_WAIT)
                            ),
                        ));
                    }
                    p.wait = Some(d);
                }
                "after_revision" | "afterRevision" => {
                    p.after_revision = Some(parse_u64("after_revision", &v)?)
                }
                "epoch" => p.epoch = Some(parse_u64("epoch", &v)?),
                "include_lease_ttl" | "includeLeaseTtl" if selector_allowed => {
                    p.include_lease_ttl = parse_bool("include_lease_ttl", &v)?
                }
                "health" if selector_allowed => p.health = Some(HealthFilter::parse(&v)?),
                _ if selector_allowed => {
                    let key = k.strip_prefix("selector.").unwrap_or(&k).to_string();
                    p.selector.insert(key, v);
                }
                _ => {
                    return Err(ApiError::invalid(format!(
                        "unknown query parameter {k:?}: expected wait, after_revision, epoch"
                    )));
                }
            }
        }
        if p.wait.is_some() && p.after_revision.is_none() {
            return Err(ApiError::invalid(
                "wait needs after_revision: the revision of the answer you hold (its \
                 \"revision\" field or X-Registry-Revision header)",
            ));
        }
        Ok(p)
    }

    /// Whether a long-poll should wait at all: it was asked for, the revision
    /// belongs to this server life and is not ahead of it.
    fn should_wait(&self, api: &HttpApi) -> Option<(u64, Duration)> {
        let (wait, after) = (self.wait?, self.after_revision?);
        let registry = api.registry();
        if self.epoch.is_some_and(|e| e != registry.epoch())
            || after > registry.catalog().revision()
        {
            return None;
        }
        let jitter = rand::rng().random_range(0..=wait.as_millis() as u64 / 16);
        Some((after, wait + Duration::from_millis(jitter)))
    }
}

/// `GET /v1/services`: every service the caller may read, with instance
/// counts.
pub async fn list_services(
    State(api): State<HttpApi>,
    caller: CallerExt,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = ReadParams::parse(query_pairs(query)?, false)?;
    let registry = api.registry();
    if let Some((after, wait)) = params.should_wait(&api) {
        api.waiters.wait(None, after, wait).await?;
    }
    let answer = registry.list_services(caller.identity());
    let server = answer.server.unwrap_or_default();
    let tag = etag((
        server.epoch,
        server.warming_up,
        server.stale,
        answer
            .services
            .iter()
            .map(|s| (&s.name, s.instance_count))
            .collect::<Vec<_>>(),
    ));
    Ok(json_answer(
        &headers,
        &tag,
        answer.revision,
        server.epoch,
        &answer,
    ))
}

/// `GET /v1/services/{name}`: Resolve.
pub async fn resolve(
    State(api): State<HttpApi>,
    caller: CallerExt,
    Path(name): Path<String>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = ReadParams::parse(query_pairs(query)?, true)?;
    let registry = api.registry();
    let resolve = || -> Result<ResolveResponse, ApiError> {
        let mut answer = registry.resolve_with(
            &name,
            &params.selector,
            params.include_lease_ttl,
            params.health.is_some_and(HealthFilter::needs_all),
            caller.identity(),
        )?;
        if let Some(filter) = params.health {
            answer.instances.retain(|i| filter.keeps(i));
        }
        Ok(answer)
    };
    // Validates and checks permission before anything waits.
    let mut answer = resolve()?;
    if let Some((after, wait)) = params.should_wait(&api) {
        let service: Arc<str> = name.as_str().into();
        if api.waiters.wait(Some(service), after, wait).await? {
            answer = resolve()?;
        }
    }
    let server = answer.server.unwrap_or_default();
    let tag = etag((
        server.epoch,
        server.warming_up,
        server.stale,
        answer.service_known,
        answer.panicked,
        instance_versions(&answer.instances, params.include_lease_ttl),
    ));
    Ok(json_answer(
        &headers,
        &tag,
        answer.revision,
        server.epoch,
        &answer,
    ))
}

/// What an instance list's content depends on: within one server life an
/// instance only changes by a put, which gives it a new revision.
fn instance_versions(instances: &[Instance], with_ttl: bool) -> Vec<(&str, u64, u64)> {
    instances
        .iter()
        .map(|i| {
            let ttl = if with_ttl { i.lease_remaining_ms } else { 0 };
            (i.id.as_str(), i.revision, ttl)
        })
        .collect()
}

/// `GET /v1/status`.
pub async fn status(
    State(api): State<HttpApi>,
    _caller: CallerExt,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let s = api.registry().status();
    let server = s.server.unwrap_or_default();
    let tag = etag((
        server.epoch,
        server.warming_up,
        server.stale,
        s.revision,
        (
            s.services,
            s.instances,
            s.leases,
            s.watchers,
            s.watcher_resets,
        ),
    ));
    Ok(json_answer(&headers, &tag, s.revision, server.epoch, &s))
}

/// The bytes of a request body, or why not: larger than
/// `max_message_size` is `RESOURCE_EXHAUSTED`, as over gRPC.
fn body_bytes(api: &HttpApi, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                tonic::Code::ResourceExhausted,
                format!(
                    "request body is larger than {} bytes (max_message_size)",
                    api.registry().config().max_message_size
                ),
            )
        } else {
            ApiError::invalid(format!("cannot read the request body: {}", e.body_text()))
        }
    })
}

/// A JSON request body: needs `Content-Type: application/json` (which
/// a cross-site form cannot send without a CORS preflight we never grant).
pub(crate) fn parse_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return Err(ApiError::media_type(format!(
            "the body of {what} must be JSON: send Content-Type: application/json"
        )));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid {what} JSON: {e}")))
}

fn json_ok<T: serde::Serialize>(body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => ApiError::from(Error::InvalidArgument(format!(
            "answer does not serialize: {e}"
        )))
        .into_response(),
    }
}

/// `POST /v1/register`, body `RegisterRequest`.
pub async fn register(
    State(api): State<HttpApi>,
    caller: CallerExt,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(&api, body)?;
    let req: RegisterRequest = parse_body(&headers, &body, "RegisterRequest")?;
    let resp = api.registry().register(req, caller.identity()).await?;
    Ok(json_ok(&resp))
}

/// `POST /v1/heartbeat`, body `HeartbeatRequest`: renews leases, with
/// gRPC Heartbeat's rule that a single unknown lease is `NOT_FOUND`.
pub async fn heartbeat(
    State(api): State<HttpApi>,
    caller: CallerExt,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(&api, body)?;
    let req: HeartbeatRequest = parse_body(&headers, &body, "HeartbeatRequest")?;
    let registry = api.registry();
    let leases = registry.heartbeat(&req.lease_ids, caller.identity())?;
    if let [only] = leases.as_slice()
        && !only.found
    {
        return Err(Error::NotFound(format!(
            "lease {} not found: it expired or was revoked; register again",
            only.lease_id
        ))
        .into());
    }
    Ok(json_ok(&HeartbeatResponse {
        leases,
        server: Some(registry.server_info()),
    }))
}

/// `POST /v1/deregister`, body `DeregisterRequest` (`{"leaseId": "..."}`
/// or `{"instance": {"service": ..., "id": ...}}`).
pub async fn deregister(
    State(api): State<HttpApi>,
    caller: CallerExt,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(&api, body)?;
    let req: DeregisterRequest = parse_body(&headers, &body, "DeregisterRequest")?;
    let registry = api.registry();
    let (revision, removed) = match req.target {
        Some(Target::LeaseId(id)) => registry.deregister_lease(id, caller.identity()).await?,
        Some(Target::Instance(key)) => {
            registry
                .deregister_instance(&key.service, &key.id, caller.identity())
                .await?
        }
        None => {
            return Err(ApiError::invalid(
                "target is required: set leaseId or instance",
            ));
        }
    };
    Ok(json_ok(&DeregisterResponse { revision, removed }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn read_params() {
        let p = ReadParams::parse(
            pairs(&[
                ("wait", "30s"),
                ("after_revision", "7"),
                ("version", "1.4"),
                ("selector.wait", "x"),
                ("include_lease_ttl", ""),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(p.wait, Some(Duration::from_secs(30)));
        assert_eq!(p.after_revision, Some(7));
        assert!(p.include_lease_ttl);
        assert_eq!(p.selector.get("version").map(String::as_str), Some("1.4"));
        assert_eq!(p.selector.get("wait").map(String::as_str), Some("x"));

        for (q, needle) in [
            (vec![("wait", "30s")], "wait needs after_revision"),
            (
                vec![("wait", "soon"), ("after_revision", "1")],
                "not a duration",
            ),
            (
                vec![("wait", "11m"), ("after_revision", "1")],
                "above the maximum 10m",
            ),
            (vec![("after_revision", "-1")], "not an unsigned integer"),
            (vec![("health", "sick")], "not one of passing"),
        ] {
            let err = ReadParams::parse(pairs(&q), true).unwrap_err();
            assert!(err.message.contains(needle), "{q:?}: {}", err.message);
        }
        let err = ReadParams::parse(pairs(&[("version", "1")]), false).unwrap_err();
        assert!(err.message.contains("unknown query parameter"));
    }
}
