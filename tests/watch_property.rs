//! Property: for any sequence of register / replace / deregister / lease
//! revoke / expiry / health change / drain and maintenance, a watcher that
//! applies its snapshot and then its events holds exactly what Resolve
//! returns at the same revision — for a single-service watcher, a watch-all
//! watcher, a selector watcher, and a watcher that disconnects mid-way and
//! resumes from its last revision + 1; each both serving-only (the default:
//! the served set, panic mode included) and with `include_not_serving`.

use std::{collections::BTreeMap, time::Duration};

use futures::{FutureExt, Stream, StreamExt};
use proptest::prelude::*;
use registry::{
    Config, Registry,
    catalog::WatchFilter,
    pb::v1::{
        AdminState, EventType, HealthCheck, HealthState, Instance, RegisterRequest, TcpCheck,
        WatchResponse, health_check, watch_response::Kind,
    },
    watch,
};

#[derive(Debug, Clone)]
enum Op {
    Register {
        svc: u8,
        id: u8,
        zone: u8,
        attach: Option<u8>,
        checked: bool,
    },
    /// A health check result (instances registered with a check only).
    Health {
        svc: u8,
        id: u8,
        state: u8,
    },
    /// Drain, disable or re-activate.
    Admin {
        svc: u8,
        id: u8,
        state: u8,
    },
    DeregisterId {
        svc: u8,
        id: u8,
    },
    RevokeLease {
        idx: u8,
    },
    Heartbeat {
        idx: u8,
    },
    Advance {
        ms: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u8, 0..6u8, 0..2u8, proptest::option::of(0..8u8), proptest::bool::ANY)
            .prop_map(|(svc, id, zone, attach, checked)| Op::Register { svc, id, zone, attach, checked }),
        3 => (0..3u8, 0..6u8, 0..3u8).prop_map(|(svc, id, state)| Op::Health { svc, id, state }),
        1 => (0..3u8, 0..6u8, 0..3u8).prop_map(|(svc, id, state)| Op::Admin { svc, id, state }),
        2 => (0..3u8, 0..6u8).prop_map(|(svc, id)| Op::DeregisterId { svc, id }),
        1 => (0..8u8).prop_map(|idx| Op::RevokeLease { idx }),
        1 => (0..8u8).prop_map(|idx| Op::Heartbeat { idx }),
        2 => (0..1500u16).prop_map(|ms| Op::Advance { ms }),
    ]
}

type Key = (String, String);

/// A client-side view built only from what the stream says.
#[derive(Default)]
struct View {
    state: BTreeMap<Key, Instance>,
    revision: u64,
    pending_snapshot: Option<BTreeMap<Key, Instance>>,
}

impl View {
    fn apply(&mut self, msg: WatchResponse) {
        match msg.kind.expect("kind") {
            Kind::Snapshot(s) => {
                let snap = self.pending_snapshot.get_or_insert_with(BTreeMap::new);
                for i in s.instances {
                    snap.insert((i.service.clone(), i.id.clone()), i);
                }
                if !s.more {
                    self.state = self.pending_snapshot.take().unwrap();
                    assert!(s.revision >= self.revision, "snapshot went back in time");
                    self.revision = s.revision;
                }
            }
            Kind::Events(b) => {
                // Every event is newer than anything before this message (no
                // duplicates, no revision split across messages), and they
                // ascend within it.
                let base = self.revision;
                for e in b.events {
                    assert!(
                        e.revision > base && e.revision >= self.revision,
                        "event revision {} after {} (message base {base})",
                        e.revision,
                        self.revision
                    );
                    self.revision = e.revision;
                    let kind = e.r#type();
                    let i = e.instance.expect("instance");
                    let key = (i.service.clone(), i.id.clone());
                    match kind {
                        EventType::Put => {
                            self.state.insert(key, i);
                        }
                        EventType::Delete => {
                            assert!(
                                self.state.remove(&key).is_some(),
                                "DELETE of unknown {key:?}"
                            );
                        }
                        EventType::Unspecified => panic!("unspecified event"),
                    }
                }
            }
            Kind::Progress(_) => {}
        }
    }

    /// Applies everything the stream has ready without waiting.
    fn drain(
        &mut self,
        stream: &mut (impl Stream<Item = Result<WatchResponse, tonic::Status>> + Unpin),
    ) {
        while let Some(Some(msg)) = stream.next().now_or_never() {
            self.apply(msg.expect("stream error"));
        }
    }
}

async fn open(
    registry: &Registry,
    filter: WatchFilter,
    start: u64,
) -> impl Stream<Item = Result<WatchResponse, tonic::Status>> + Unpin {
    let (handle, start) = registry
        .watch(filter, start, 0, None, None)
        .await
        .expect("watch");
    // Frames go through a real encode/decode, as on the wire: shared and
    // coalesced encodings must decode to the same events.
    Box::pin(
        watch::stream(registry.clone(), handle, start, Duration::from_secs(3600)).map(|r| {
            r.map(|frame| {
                let bytes = prost::Message::encode_to_vec(&frame);
                <WatchResponse as prost::Message>::decode(bytes.as_slice()).expect("frame decodes")
            })
        }),
    )
}

fn expected(registry: &Registry, filter: &WatchFilter) -> BTreeMap<Key, Instance> {
    let services: Vec<String> = match &filter.service {
        Some(s) => vec![s.to_string()],
        None => registry
            .list_services(None)
            .services
            .into_iter()
            .map(|s| s.name)
            .collect(),
    };
    let selector = filter.selector.iter().cloned().collect();
    let mut out = BTreeMap::new();
    for s in services {
        for i in registry
            .resolve_with(&s, &selector, false, filter.include_not_serving, None)
            .unwrap()
            .instances
        {
            out.insert((i.service.clone(), i.id.clone()), i);
        }
    }
    out
}

fn run(ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        // svc0 at the default 50%, svc1 panics as soon as one is not
        // serving, svc2 never panics.
        let registry = Registry::new(Config {
            history_events: 10_000,
            panic: registry::serving::PanicThresholds::default()
                .with_service("svc1", 100.0)
                .with_service("svc2", 0.0),
            ..Config::default()
        });
        let base = [
            WatchFilter {
                service: Some("svc0".into()),
                ..WatchFilter::default()
            },
            WatchFilter::default(),
            WatchFilter {
                service: Some("svc1".into()),
                selector: vec![("zone".into(), "z1".into())],
                ..WatchFilter::default()
            },
        ];
        let filters: Vec<WatchFilter> = base
            .iter()
            .cloned()
            .chain(base.iter().cloned().map(|f| WatchFilter {
                include_not_serving: true,
                ..f
            }))
            .collect();
        let mut views: Vec<View> = filters.iter().map(|_| View::default()).collect();
        let mut streams = Vec::new();
        for f in &filters {
            streams.push(open(&registry, f.clone(), 0).await);
        }
        // A watcher that will disconnect half-way and resume.
        let resumed_filter = WatchFilter {
            service: Some("svc2".into()),
            ..WatchFilter::default()
        };
        let mut resumed_view = View::default();
        let mut resumed = Some(open(&registry, resumed_filter.clone(), 0).await);

        let mut leases: Vec<u64> = Vec::new();
        let half = ops.len() / 2;
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Register {
                    svc,
                    id,
                    zone,
                    attach,
                    checked,
                } => {
                    let mut inst = Instance {
                        service: format!("svc{svc}"),
                        id: format!("i{id}"),
                        address: format!("10.0.0.{id}:80"),
                        check: checked.then(|| {
                            Box::new(HealthCheck {
                                kind: Some(health_check::Kind::Tcp(TcpCheck::default())),
                                ..Default::default()
                            })
                        }),
                        ..Default::default()
                    };
                    inst.metadata.insert("zone".into(), format!("z{zone}"));
                    let lease_id = attach
                        .and_then(|i| leases.get(i as usize).copied())
                        .unwrap_or(0);
                    let req = RegisterRequest {
                        instance: Some(inst),
                        ttl_ms: 1000,
                        lease_id,
                    };
                    match registry.register(req, None).await {
                        Ok(r) => {
                            if !leases.contains(&r.lease_id) {
                                leases.push(r.lease_id);
                            }
                        }
                        Err(registry::Error::NotFound(_)) => {} // attached to an expired lease
                        Err(e) => panic!("{e}"),
                    }
                }
                Op::Health { svc, id, state } => {
                    let (service, id) = (format!("svc{svc}"), format!("i{id}"));
                    let current = registry
                        .resolve_with(&service, &Default::default(), false, true, None)
                        .unwrap()
                        .instances
                        .into_iter()
                        .find(|i| i.id == id);
                    if let Some(target) = current.as_ref().and_then(registry::health::Target::of) {
                        let health = HealthState::try_from(state as i32).unwrap();
                        registry
                            .record_check(registry::core::CheckRecord {
                                service,
                                id,
                                target,
                                health,
                                output: format!("{health:?}"),
                                at_unix_ms: n as u64,
                            })
                            .await
                            .unwrap();
                    }
                }
                Op::Admin { svc, id, state } => {
                    let state = AdminState::try_from(state as i32).unwrap();
                    let _ = registry
                        .set_instance_state(
                            &format!("svc{svc}"),
                            &format!("i{id}"),
                            state,
                            "test",
                            None,
                        )
                        .await;
                }
                Op::DeregisterId { svc, id } => {
                    let _ = registry
                        .deregister_instance(&format!("svc{svc}"), &format!("i{id}"), None)
                        .await;
                }
                Op::RevokeLease { idx } => {
                    if let Some(id) = leases.get(idx as usize) {
                        let _ = registry.deregister_lease(*id, None).await;
                    }
                }
                Op::Heartbeat { idx } => {
                    if let Some(id) = leases.get(idx as usize) {
                        registry.heartbeat(&[*id], None).unwrap();
                    }
                }
                Op::Advance { ms } => {
                    tokio::time::advance(Duration::from_millis(ms as u64)).await;
                    registry.expire_due(usize::MAX);
                }
            }
            if n == half {
                let s = resumed.as_mut().unwrap();
                resumed_view.drain(s);
                resumed = None; // disconnect
            }
            if resumed.is_none() && (n == half + 3 || (n > half && n % 5 == 0)) {
                resumed =
                    Some(open(&registry, resumed_filter.clone(), resumed_view.revision + 1).await);
            }
            for (view, stream) in views.iter_mut().zip(streams.iter_mut()) {
                view.drain(stream);
            }
        }
        if resumed.is_none() {
            resumed =
                Some(open(&registry, resumed_filter.clone(), resumed_view.revision + 1).await);
        }
        resumed_view.drain(resumed.as_mut().expect("just opened"));
        for (view, stream) in views.iter_mut().zip(streams.iter_mut()) {
            view.drain(stream);
        }
        for (view, filter) in views.iter().zip(filters.iter()) {
            assert_eq!(view.state, expected(&registry, filter), "filter {filter:?}");
        }
        assert_eq!(
            resumed_view.state,
            expected(&registry, &resumed_filter),
            "resumed watcher"
        );
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn watched_state_equals_resolve(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops);
    }
}
