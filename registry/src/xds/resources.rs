//! The four xDS resources the registry serves for a service, built from the
//! catalog's view of it. Every resource of service `S` is named `S`:
//!
//! - **Listener `S`**: an API listener (what proxyless gRPC asks for when
//!   dialing `xds:///S`) whose HttpConnectionManager takes its routes over
//!   RDS from the same ADS stream, with the `router` HTTP filter that gRPC
//!   and Envoy both require as the last filter.
//! - **RouteConfiguration `S`**: one virtual host for the authority `S`
//!   (and `S:<port>`) routing every path to cluster `S`.
//! - **Cluster `S`**: EDS over ADS, round robin, HTTP/2 upstream (the
//!   instances serve gRPC; Envoy would otherwise speak HTTP/1.1 to them),
//!   locality-weighted, with outlier detection: the same rules as
//!   `registry-client`'s balanced channels (3 consecutive failures eject an
//!   endpoint for 1 s, doubling up to 30 s, at most half of them ejected,
//!   routing over all below half healthy), so gRPC clients in other
//!   languages and Envoy treat a dead instance as Rust callers do.
//! - **ClusterLoadAssignment `S`**: the live instances, one locality per
//!   `zone` metadata value, `weight` as the endpoint's load-balancing weight,
//!   and a health status from the served set (see [`crate::serving`]):
//!   served instances are `HEALTHY` (critical ones too while the service is
//!   in panic mode, since gRPC clients have no panic mode of their own),
//!   draining and disabled ones `DRAINING`, critical ones `UNHEALTHY`;
//!   gRPC and Envoy send calls to the healthy ones only.
//!
//! Listener, RouteConfiguration and Cluster depend only on the name; they
//! exist while the service has at least one live instance. The load
//! assignment exists while the catalog knows the service, possibly with no
//! endpoints, so that clients drop the last instance at once.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                Cluster, OutlierDetection,
                cluster::{
                    ClusterDiscoveryType, CommonLbConfig, DiscoveryType, EdsClusterConfig,
                    LbConfig, LbPolicy, RoundRobinLbConfig, SlowStartConfig,
                    common_lb_config::{LocalityConfigSpecifier, LocalityWeightedLbConfig},
                },
            },
            core::v3::{
                Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus,
                Http2ProtocolOptions, Locality, SocketAddress, address,
                config_source::ConfigSourceSpecifier, socket_address::PortSpecifier,
            },
            endpoint::v3::{
                ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
                lb_endpoint::HostIdentifier,
            },
            listener::v3::{ApiListener, Listener},
            route::v3::{
                Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route::Action,
                route_action::ClusterSpecifier, route_match::PathSpecifier,
            },
        },
        extensions::{
            filters::{
                http::router::v3::Router,
                network::http_connection_manager::v3::{
                    HttpConnectionManager, HttpFilter, Rds,
                    http_connection_manager::RouteSpecifier, http_filter::ConfigType,
                },
            },
            upstreams::http::v3::{
                HttpProtocolOptions,
                http_protocol_options::{
                    ExplicitHttpConfig, UpstreamProtocolOptions,
                    explicit_http_config::ProtocolConfig,
                },
            },
        },
        r#type::v3::Percent,
    },
    google::protobuf::{Any, Duration as PbDuration, UInt32Value},
};
use envoy_types::util::pack_any;
use registry_api::v1::{AdminState, Instance};
use std::sync::Arc;

use crate::{config::Config, serving::Served};

/// The metadata key whose value becomes an endpoint's locality zone.
pub const ZONE_KEY: &str = "zone";

/// Connect timeout Envoy uses for the instances: registry instances are on
/// the same network, so a connection that takes longer than this is to a
/// dead host and the next one should be tried.
const CONNECT_TIMEOUT_SECS: i64 = 5;

/// Failed calls in a row that eject an endpoint (Envoy's consecutive 5xx
/// and gateway failures, which include refused connections and gRPC
/// `UNAVAILABLE`). Same as `registry-client`'s
/// `OutlierDetection::default().consecutive_failures`.
pub const OUTLIER_CONSECUTIVE_FAILURES: u32 = 3;
/// First ejection time; Envoy multiplies it by the number of ejections.
/// Same as the client's `base_ejection`.
pub const OUTLIER_BASE_EJECTION_SECS: i64 = 1;
/// Longest ejection time. Same as the client's `max_ejection`.
pub const OUTLIER_MAX_EJECTION_SECS: i64 = 30;
/// At most this share of a cluster's endpoints ejected at once (Envoy and
/// gRPC always allow one). Same as the client's `max_ejected_share`.
pub const OUTLIER_MAX_EJECTION_PERCENT: u32 = 50;
/// How often ejections are evaluated (gRPC evaluates failure percentages
/// per interval; Envoy's consecutive counters act at once).
const OUTLIER_INTERVAL_SECS: i64 = 1;
/// gRPC's proxyless clients implement failure-percentage ejection, not
/// consecutive counters (gRFC A50): an endpoint failing at least this share
/// of at least [`OUTLIER_CONSECUTIVE_FAILURES`] calls in an interval is
/// ejected, the closest equivalent of "N failures in a row".
const OUTLIER_FAILURE_PERCENT: u32 = 50;
/// Below this share of healthy endpoints, route over all of them (Envoy's
/// panic mode; the client's panic mode when every candidate is ejected).
/// The registry's default panic threshold; a service's own threshold (see
/// [`crate::serving`]) is what its cluster carries.
pub const HEALTHY_PANIC_PERCENT: f64 = crate::serving::DEFAULT_PANIC_THRESHOLD;

/// Name of the terminal HTTP filter both gRPC and Envoy expect.
const ROUTER_FILTER: &str = "envoy.filters.http.router";

/// Key under which Envoy looks up upstream HTTP options in a cluster.
const HTTP_PROTOCOL_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// A config source meaning "the same ADS stream this came on".
fn ads_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

/// The API listener gRPC resolves `xds:///service` through.
pub fn listener(service: &str) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: service.to_owned(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_source()),
            route_config_name: service.to_owned(),
        })),
        http_filters: vec![HttpFilter {
            name: ROUTER_FILTER.to_owned(),
            config_type: Some(ConfigType::TypedConfig(pack_any(Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: service.to_owned(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(hcm)),
        }),
        ..Default::default()
    }
}

/// Routes everything addressed to the service to its cluster.
pub fn route_configuration(service: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: service.to_owned(),
        virtual_hosts: vec![VirtualHost {
            name: service.to_owned(),
            // gRPC matches the dialed authority (`xds:///prod` -> "prod");
            // Envoy matches the Host header, which may carry a port.
            domains: vec![service.to_owned(), format!("{service}:*")],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix("/".to_owned())),
                    ..Default::default()
                }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(service.to_owned())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An EDS cluster whose endpoints come over the same ADS stream, with the
/// service's panic threshold and, when `config.slow_start_window` is set, a
/// slow start (a new endpoint's weight ramps up linearly over the window,
/// from 10%).
pub fn cluster(service: &str, config: &Config) -> Cluster {
    let window = config.slow_start_window;
    let lb_config = (!window.is_zero()).then(|| {
        LbConfig::RoundRobinLbConfig(RoundRobinLbConfig {
            slow_start_config: Some(SlowStartConfig {
                slow_start_window: Some(PbDuration {
                    seconds: window.as_secs() as i64,
                    nanos: window.subsec_nanos() as i32,
                }),
                ..Default::default()
            }),
        })
    });
    let http2 = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                    Http2ProtocolOptions::default(),
                )),
            },
        )),
        ..Default::default()
    };
    Cluster {
        name: service.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads_source()),
            service_name: service.to_owned(),
        }),
        lb_policy: LbPolicy::RoundRobin as i32,
        connect_timeout: Some(PbDuration {
            seconds: CONNECT_TIMEOUT_SECS,
            nanos: 0,
        }),
        outlier_detection: Some(outlier_detection()),
        common_lb_config: Some(CommonLbConfig {
            healthy_panic_threshold: Some(Percent {
                value: config.panic.for_service(service).value(),
            }),
            // Traffic across zones follows the locality weights of the load
            // assignment (the sum of each zone's instance weights).
            locality_config_specifier: Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(
                LocalityWeightedLbConfig {},
            )),
            ..Default::default()
        }),
        typed_extension_protocol_options: HashMap::from([(
            HTTP_PROTOCOL_OPTIONS_KEY.to_owned(),
            pack_any(http2),
        )]),
        lb_config,
        ..Default::default()
    }
}

/// The ejection rules of the module docs, in Envoy's and gRPC's terms.
fn outlier_detection() -> OutlierDetection {
    let u32v = |value| Some(UInt32Value { value });
    let secs = |seconds| Some(PbDuration { seconds, nanos: 0 });
    OutlierDetection {
        consecutive_5xx: u32v(OUTLIER_CONSECUTIVE_FAILURES),
        enforcing_consecutive_5xx: u32v(100),
        consecutive_gateway_failure: u32v(OUTLIER_CONSECUTIVE_FAILURES),
        enforcing_consecutive_gateway_failure: u32v(100),
        interval: secs(OUTLIER_INTERVAL_SECS),
        base_ejection_time: secs(OUTLIER_BASE_EJECTION_SECS),
        max_ejection_time: secs(OUTLIER_MAX_EJECTION_SECS),
        max_ejection_percent: u32v(OUTLIER_MAX_EJECTION_PERCENT),
        // Success-rate ejection (statistics over many calls) is not what the
        // client does: off (0 also tells gRPC to leave it out).
        enforcing_success_rate: u32v(0),
        failure_percentage_threshold: u32v(OUTLIER_FAILURE_PERCENT),
        enforcing_failure_percentage: u32v(100),
        failure_percentage_minimum_hosts: u32v(2),
        failure_percentage_request_volume: u32v(OUTLIER_CONSECUTIVE_FAILURES),
        ..Default::default()
    }
}

/// The service's instances as endpoints, grouped into one locality per
/// `zone` (instances without one share the empty locality), each with the
/// health status of the module docs (`served` is the service's served set,
/// in the order of `instances`). Instances whose address is a DNS name are
/// left out: gRPC and Envoy both require IP addresses in EDS, and one bad
/// endpoint would make them reject the whole assignment.
pub fn load_assignment(
    service: &str,
    instances: &[Arc<Instance>],
    served: &Served,
) -> ClusterLoadAssignment {
    let mut zones: BTreeMap<&str, Vec<LbEndpoint>> = BTreeMap::new();
    for (n, inst) in instances.iter().enumerate() {
        let Ok(addr) = inst.address.parse::<SocketAddr>() else {
            tracing::debug!(
                service,
                id = %inst.id,
                address = %inst.address,
                "xds: instance with a non-IP address left out of the load assignment"
            );
            continue;
        };
        let zone = inst.metadata.get(ZONE_KEY).map_or("", String::as_str);
        zones.entry(zone).or_default().push(LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: addr.ip().to_string(),
                        port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            health_status: if served.includes(n) {
                HealthStatus::Healthy
            } else if inst.admin_state != AdminState::Active as i32 {
                HealthStatus::Draining
            } else {
                HealthStatus::Unhealthy
            } as i32,
            load_balancing_weight: Some(UInt32Value {
                value: inst.weight.max(1),
            }),
            ..Default::default()
        });
    }
    let endpoints = zones
        .into_iter()
        .map(|(zone, lb_endpoints)| {
            // A locality's weight is the sum of its endpoints' weights, so
            // traffic across zones follows the instance weights. gRPC drops
            // localities of weight 0, hence at least 1.
            let weight = lb_endpoints
                .iter()
                .map(|e| e.load_balancing_weight.map_or(1, |w| w.value))
                .fold(0u32, u32::saturating_add)
                .max(1);
            LocalityLbEndpoints {
                locality: Some(Locality {
                    zone: zone.to_owned(),
                    ..Default::default()
                }),
                lb_endpoints,
                load_balancing_weight: Some(UInt32Value { value: weight }),
                priority: 0,
                ..Default::default()
            }
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: service.to_owned(),
        endpoints,
        ..Default::default()
    }
}

/// Packs a resource for a `DiscoveryResponse`.
pub fn any<T: prost::Name>(resource: T) -> Any {
    pack_any(resource)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn inst(id: &str, address: &str, weight: u32, zone: Option<&str>) -> Arc<Instance> {
        Arc::new(Instance {
            service: "prod".into(),
            id: id.into(),
            address: address.into(),
            weight,
            metadata: zone
                .map(|z| [(ZONE_KEY.to_owned(), z.to_owned())].into())
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    #[test]
    fn load_assignment_groups_by_zone_and_keeps_weights() {
        let cla = load_assignment(
            "prod",
            &[
                inst("a", "10.0.0.1:80", 3, Some("z1")),
                inst("b", "[::1]:81", 1, Some("z2")),
                inst("c", "10.0.0.3:82", 2, Some("z1")),
                inst("d", "db.internal:83", 1, None),
                inst("e", "10.0.0.5:84", 1, None),
            ],
            &Served::all(),
        );
        assert_eq!(cla.cluster_name, "prod");
        /// (zone, locality weight, [(ip, port, weight)])
        type Summary = Vec<(String, u32, Vec<(String, u32, u32)>)>;
        let summary: Summary = cla
            .endpoints
            .iter()
            .map(|l| {
                (
                    l.locality.as_ref().unwrap().zone.clone(),
                    l.load_balancing_weight.unwrap().value,
                    l.lb_endpoints
                        .iter()
                        .map(|e| {
                            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                                panic!("no endpoint");
                            };
                            let Some(address::Address::SocketAddress(sa)) =
                                &ep.address.as_ref().unwrap().address
                            else {
                                panic!("no socket address");
                            };
                            let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else {
                                panic!("no port");
                            };
                            (
                                sa.address.clone(),
                                port,
                                e.load_balancing_weight.unwrap().value,
                            )
                        })
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("".into(), 1, vec![("10.0.0.5".into(), 84, 1)]),
                (
                    "z1".into(),
                    5,
                    vec![("10.0.0.1".into(), 80, 3), ("10.0.0.3".into(), 82, 2)]
                ),
                ("z2".into(), 1, vec![("::1".into(), 81, 1)]),
            ],
            "the DNS-named instance is left out"
        );
    }

    #[test]
    fn listener_points_at_rds_over_ads_with_the_router_filter() {
        let l = listener("prod");
        let any = l.api_listener.unwrap().api_listener.unwrap();
        assert_eq!(
            any.type_url,
            "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
        );
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
            panic!("not RDS");
        };
        assert_eq!(rds.route_config_name, "prod");
        assert!(matches!(
            rds.config_source.unwrap().config_source_specifier,
            Some(ConfigSourceSpecifier::Ads(_))
        ));
        assert_eq!(hcm.http_filters.last().unwrap().name, ROUTER_FILTER);
    }

    #[test]
    fn route_and_cluster_name_the_service() {
        let rc = route_configuration("prod");
        let vh = &rc.virtual_hosts[0];
        assert!(vh.domains.contains(&"prod".to_owned()));
        let Some(Action::Route(ra)) = &vh.routes[0].action else {
            panic!("no route action");
        };
        assert_eq!(
            ra.cluster_specifier,
            Some(ClusterSpecifier::Cluster("prod".into()))
        );
        let c = cluster("prod", &Config::default());
        assert_eq!(
            c.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
        );
        assert_eq!(c.eds_cluster_config.unwrap().service_name, "prod");
    }

    #[test]
    fn endpoint_health_follows_the_served_set() {
        use crate::serving::{Class, Threshold};
        use registry_api::v1::HealthState;
        let mut draining = Instance::clone(&inst("b", "10.0.0.2:80", 1, None));
        draining.admin_state = AdminState::Draining as i32;
        let mut critical = Instance::clone(&inst("c", "10.0.0.3:80", 1, None));
        critical.health = HealthState::Critical as i32;
        let instances = vec![
            inst("a", "10.0.0.1:80", 1, None),
            Arc::new(draining),
            Arc::new(critical),
            inst("d", "10.0.0.4:80", 1, None),
        ];
        let served = Served::compute(
            instances.iter().map(|i| crate::serving::class_of(i)),
            Threshold::default(),
        );
        let statuses = |cla: ClusterLoadAssignment| -> Vec<i32> {
            cla.endpoints[0]
                .lb_endpoints
                .iter()
                .map(|e| e.health_status)
                .collect()
        };
        assert_eq!(
            statuses(load_assignment("prod", &instances, &served)),
            [
                HealthStatus::Healthy as i32,
                HealthStatus::Draining as i32,
                HealthStatus::Unhealthy as i32,
                HealthStatus::Healthy as i32,
            ]
        );
        // 1 of 2 active serving is not below 50%; 1 of 3 is: the critical
        // one is sent as healthy, the draining one never.
        let panicked = Served::compute(
            [
                Class::Serving,
                Class::Inactive,
                Class::Critical,
                Class::Critical,
            ],
            Threshold::default(),
        );
        assert!(panicked.panicked());
        assert_eq!(
            statuses(load_assignment("prod", &instances, &panicked)),
            [
                HealthStatus::Healthy as i32,
                HealthStatus::Draining as i32,
                HealthStatus::Healthy as i32,
                HealthStatus::Healthy as i32,
            ]
        );
    }

    #[test]
    fn slow_start_and_panic_threshold_come_from_the_config() {
        let config = Config {
            slow_start_window: std::time::Duration::from_secs(30),
            panic: crate::serving::PanicThresholds::new(50.0).with_service("prod", 20.0),
            ..Config::default()
        };
        let c = cluster("prod", &config);
        let Some(LbConfig::RoundRobinLbConfig(rr)) = c.lb_config else {
            panic!("no round robin config");
        };
        assert_eq!(
            rr.slow_start_config
                .unwrap()
                .slow_start_window
                .unwrap()
                .seconds,
            30
        );
        let threshold = |c: Cluster| {
            c.common_lb_config
                .unwrap()
                .healthy_panic_threshold
                .unwrap()
                .value
        };
        assert_eq!(threshold(cluster("prod", &config)), 20.0);
        assert_eq!(threshold(cluster("other", &config)), 50.0);
        assert!(cluster("prod", &Config::default()).lb_config.is_none());
    }
}
