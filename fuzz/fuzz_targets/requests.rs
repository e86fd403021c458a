//! Fuzz target: the request decode path and request validation.
//!
//! The input is a sequence of operations, each a kind byte, a little-endian
//! u16 length and that many bytes, decoded with prost exactly as tonic's
//! codec decodes a request body (`RegisterRequest`, `HeartbeatRequest`,
//! `DeregisterRequest`, `ResolveRequest`, `WatchRequest`). Whatever decodes
//! is fed to one fresh `Registry` handle, in order, so later operations see
//! the state earlier ones built (small lease ids are mapped to leases this
//! input was granted, to reach heartbeat and deregister paths).
//!
//! Checked: nothing panics; a refused request changes nothing; the
//! instance gauge always equals the sum over ListServices.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use registry::{
    Config, Registry,
    catalog::WatchFilter,
    pb::v1::{
        DeregisterRequest, HeartbeatRequest, RegisterRequest, ResolveRequest, WatchRequest,
        deregister_request::Target,
    },
    validate,
};

/// Operations per input: enough for register-then-use sequences, few
/// enough that one input stays fast.
const MAX_OPS: usize = 64;

/// Memory-mode writes complete without waiting: run them in place.
fn now<T>(f: impl std::future::Future<Output = T>) -> T {
    futures::executor::block_on(f)
}

fuzz_target!(|data: &[u8]| {
    let registry = Registry::new(Config {
        max_leases: 64,
        max_instances: 64,
        max_watchers: 16,
        ..Config::default()
    });
    let mut leases: Vec<u64> = Vec::new();
    let mut watchers = Vec::new();
    let mut rest = data;
    for _ in 0..MAX_OPS {
        let [kind, lo, hi, tail @ ..] = rest else {
            break;
        };
        let len = (u16::from_le_bytes([*lo, *hi]) as usize).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        let map_lease = |id: u64| match leases.get(id as usize) {
            Some(real) if id < 16 => *real,
            _ => id,
        };
        let before = registry.status();
        let refused = match kind % 6 {
            0 => {
                let Ok(mut req) = RegisterRequest::decode(payload) else {
                    continue;
                };
                req.lease_id = map_lease(req.lease_id);
                match now(registry.register(req, None)) {
                    Ok(resp) => {
                        leases.push(resp.lease_id);
                        false
                    }
                    Err(_) => true,
                }
            }
            1 => {
                let Ok(req) = HeartbeatRequest::decode(payload) else {
                    continue;
                };
                let ids: Vec<u64> = req.lease_ids.iter().map(|&id| map_lease(id)).collect();
                if let Ok(statuses) = registry.heartbeat(&ids, None) {
                    assert_eq!(statuses.len(), ids.len(), "one status per lease id");
                }
                false
            }
            2 => {
                let Ok(req) = DeregisterRequest::decode(payload) else {
                    continue;
                };
                match req.target {
                    Some(Target::LeaseId(id)) => {
                        now(registry.deregister_lease(map_lease(id), None)).is_err()
                    }
                    Some(Target::Instance(key)) => {
                        now(registry.deregister_instance(&key.service, &key.id, None)).is_err()
                    }
                    None => true,
                }
            }
            3 => {
                let Ok(req) = ResolveRequest::decode(payload) else {
                    continue;
                };
                if let Ok(resp) =
                    registry.resolve(&req.service, &req.selector, req.include_lease_ttl, None)
                {
                    for inst in &resp.instances {
                        assert_eq!(
                            inst.service, req.service,
                            "resolve returned another service"
                        );
                        for (k, v) in &req.selector {
                            assert_eq!(inst.metadata.get(k), Some(v), "selector not applied");
                        }
                    }
                }
                false
            }
            4 => {
                let Ok(req) = WatchRequest::decode(payload) else {
                    continue;
                };
                // The adapter's checks (service.rs), then the handle.
                let service = if req.service.is_empty() {
                    None
                } else if validate::service_name("service", &req.service).is_ok() {
                    Some(req.service.as_str().into())
                } else {
                    continue;
                };
                if validate::metadata("selector", &req.selector).is_err() {
                    continue;
                }
                let mut selector: Vec<_> = req.selector.into_iter().collect();
                selector.sort();
                let filter = WatchFilter {
                    service,
                    selector,
                    ..Default::default()
                };
                if let Ok(w) = now(registry.watch(filter, req.start_revision, req.epoch, None, None)) {
                    watchers.push(w);
                }
                false
            }
            _ => {
                // Expire whatever is due (nothing, usually: no time passes).
                registry.expire_due(16);
                false
            }
        };
        let after = registry.status();
        if refused {
            assert_eq!(
                (before.revision, before.instances, before.leases),
                (after.revision, after.instances, after.leases),
                "a refused request changed state"
            );
        }
        let listed: u64 = registry
            .list_services(None)
            .services
            .iter()
            .map(|s| u64::from(s.instance_count))
            .sum();
        assert_eq!(
            listed, after.instances,
            "instance gauge out of step with the catalog"
        );
    }
    drop(watchers);
});
