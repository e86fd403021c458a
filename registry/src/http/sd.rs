//! `GET /v1/prometheus/sd`: Prometheus HTTP service discovery (`http_sd`).
//!
//! The answer is the `http_sd` format: a JSON list of target groups, each
//! `{"targets": ["host:port", ...], "labels": {...}}`. By default one group
//! per instance, labelled
//!
//! - `__meta_registry_service`, `__meta_registry_instance_id`,
//!   `__meta_registry_zone` (metadata `zone`, empty without one),
//!   `__meta_registry_health`, `__meta_registry_weight`,
//!   `__meta_registry_lease_id`;
//! - `__meta_registry_metadata_<key>` for every metadata key, the key
//!   sanitised to a label name (`[a-zA-Z0-9_]`, anything else becomes `_`;
//!   when two keys sanitise alike, the first in byte order wins).
//!
//! `?group_by=service` gives one group per service instead, with only the
//! labels every target of a group shares (`__meta_registry_service`).
//! `?service=NAME` (repeatable) limits the answer to those services. Only
//! serving instances are targets. The answer carries an `ETag` over its
//! content and honours `If-None-Match`, so a poller that sends it costs
//! the server one catalog read and no body.

use std::collections::BTreeMap;

use axum::{
    extract::{Query, State, rejection::QueryRejection},
    http::HeaderMap,
    response::Response,
};
use registry_api::v1::Instance;
use serde::Serialize;

use super::{
    ApiError, CallerExt, HttpApi,
    api::{health_of, query_pairs},
    etag, json_answer,
};
use crate::validate;

/// One `http_sd` target group.
#[derive(Debug, Serialize, PartialEq, Eq, Hash)]
pub struct TargetGroup {
    /// `host:port` of each target.
    pub targets: Vec<String>,
    /// Labels of every target of the group.
    pub labels: BTreeMap<String, String>,
}

/// Prefix of every label.
const PREFIX: &str = "__meta_registry_";

/// A metadata key as the suffix of a Prometheus label name.
pub fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The labels of one instance.
pub fn instance_labels(instance: &Instance) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        labels.insert(format!("{PREFIX}{k}"), v);
    };
    put("service", instance.service.clone());
    put("instance_id", instance.id.clone());
    put(
        "zone",
        instance.metadata.get("zone").cloned().unwrap_or_default(),
    );
    put("health", health_of(instance).as_str().to_string());
    put("weight", instance.weight.to_string());
    put("lease_id", instance.lease_id.to_string());
    let mut keys: Vec<_> = instance.metadata.iter().collect();
    keys.sort();
    for (k, v) in keys {
        labels
            .entry(format!("{PREFIX}metadata_{}", sanitize(k)))
            .or_insert_with(|| v.clone());
    }
    labels
}

/// `GET /v1/prometheus/sd`.
pub async fn targets(
    State(api): State<HttpApi>,
    caller: CallerExt,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut services = Vec::new();
    let mut per_service = false;
    for (k, v) in query_pairs(query)? {
        match k.as_str() {
            "service" => {
                validate::service_name("service", &v)?;
                services.push(v);
            }
            "group_by" => {
                per_service = match v.as_str() {
                    "service" => true,
                    "instance" => false,
                    other => {
                        return Err(ApiError::invalid(format!(
                            "group_by {other:?} is not one of instance, service"
                        )));
                    }
                }
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {other:?}: expected service, group_by"
                )));
            }
        }
    }
    let registry = api.registry();
    let list = registry.list_services(caller.identity());
    let (revision, epoch) = (list.revision, registry.epoch());
    if services.is_empty() {
        services = list.services.into_iter().map(|s| s.name).collect();
    } else {
        services.sort();
        services.dedup();
    }
    let none = std::collections::HashMap::new();
    let mut groups = Vec::new();
    for service in &services {
        let answer = registry.resolve(service, &none, false, caller.identity())?;
        // The served set (see `crate::serving`), as callers see it.
        let serving = answer.instances.into_iter();
        if per_service {
            let targets: Vec<String> = serving.map(|i| i.address).collect();
            if !targets.is_empty() {
                groups.push(TargetGroup {
                    targets,
                    labels: BTreeMap::from([(format!("{PREFIX}service"), service.clone())]),
                });
            }
        } else {
            groups.extend(serving.map(|i| TargetGroup {
                labels: instance_labels(&i),
                targets: vec![i.address],
            }));
        }
    }
    Ok(json_answer(
        &headers,
        &etag((epoch, &groups)),
        revision,
        epoch,
        &groups,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_sanitised_and_complete() {
        let i = Instance {
            service: "prod".into(),
            id: "prod-1".into(),
            address: "10.0.0.1:8080".into(),
            weight: 3,
            lease_id: 42,
            metadata: [
                ("zone".to_string(), "eu-1".to_string()),
                ("app.kubernetes.io/name".to_string(), "prod".to_string()),
                ("version".to_string(), "1.4.2".to_string()),
            ]
            .into(),
            ..Default::default()
        };
        let l = instance_labels(&i);
        assert_eq!(l["__meta_registry_service"], "prod");
        assert_eq!(l["__meta_registry_instance_id"], "prod-1");
        assert_eq!(l["__meta_registry_zone"], "eu-1");
        assert_eq!(l["__meta_registry_health"], "passing");
        assert_eq!(l["__meta_registry_metadata_app_kubernetes_io_name"], "prod");
        assert_eq!(l["__meta_registry_metadata_version"], "1.4.2");
        let name = regex_like_label_name();
        assert!(l.keys().all(|k| name(k)), "{l:?}");
    }

    fn regex_like_label_name() -> impl Fn(&str) -> bool {
        |k: &str| {
            let mut c = k.chars();
            c.next()
                .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
                && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        }
    }
}
