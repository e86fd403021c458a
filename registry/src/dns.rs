//! The DNS interface (`--dns-listen`, off by default; `127.0.0.1:8600` as
//! Consul uses): services as DNS names, for software that can only look up
//! names. Served with `hickory-server` over UDP and TCP.
//!
//! Names (the domain defaults to `registry.`):
//!
//! | Name | Answers |
//! | --- | --- |
//! | `<service>.service.<domain>` | `A` / `AAAA`: the serving instances whose address host is an IPv4 / IPv6 address; `SRV`: every serving instance (priority 1, weight, port, target) |
//! | `<sel>.<service>.service.<domain>` | the same, filtered: each label left of the service is a selector, `key=value`, or a bare value meaning `zone=value` |
//! | `_<service>._tcp.service.<domain>` | the same (RFC 2782 form) |
//! | `<hex>.addr.<domain>` | the `A` (8 hex digits) or `AAAA` (32) of an SRV target |
//! | `<domain>` | `SOA` |
//!
//! SRV targets: an instance registered with a DNS name has that name as its
//! target; one with an IP gets `<hex ip>.addr.<domain>`, whose `A`/`AAAA`
//! record is in the additional section. Answers are shuffled and carry the
//! `--dns-ttl` (5 s by default); over UDP they are truncated (TC set) past
//! 512 bytes, or the client's EDNS size, so resolvers retry over TCP.
//!
//! A name that is not a service answers `NXDOMAIN`; a known service with
//! nothing serving (or nothing matching the selector) answers `NOERROR`
//! with no records. Both carry the zone's `SOA` for negative caching, with
//! the same short TTL. Service names may contain dots (`payments.eu`): the
//! longest suffix of the labels that names a known service is the service,
//! the labels left of it are selectors. Names are case-insensitive, so
//! selector values are matched in lower case. Names outside the domain are
//! `REFUSED` (this is not a recursive resolver).
//!
//! DNS has no credentials: with `--auth-file` on, anyone who can reach the
//! DNS port can still resolve every service. Keep it on loopback or a
//! trusted network (the registry logs a warning).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    time::Duration,
};

use hickory_server::{
    Server,
    net::runtime::Time,
    proto::{
        op::{Edns, Header, HeaderCounts, LowerQuery, MessageType, Metadata, OpCode, ResponseCode},
        rr::{
            Name, RData, Record, RecordType,
            rdata::{A, AAAA, SOA, SRV},
        },
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use rand::seq::SliceRandom;
use registry_api::v1::Instance;
use tokio::net::{TcpListener, UdpSocket};
use tracing::{info, warn};

use crate::{
    core::Registry,
    error::{Error, Result},
};

/// A TCP client that sends nothing for this long is disconnected.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);

/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;

/// SOA timers (refresh, retry, expire): nobody transfers this zone, but
/// the record needs them.
const SOA_TIMERS: (i32, i32, i32) = (3600, 600, 86_400);

/// The DNS server of a registry.
#[derive(Debug)]
pub struct DnsServer {
    handler: Handler,
    udp: Option<UdpSocket>,
    tcp: Option<TcpListener>,
}

/// Answers queries from the registry.
#[derive(Debug, Clone)]
pub struct Handler {
    registry: Registry,
    domain: Name,
    ttl: u32,
}

impl DnsServer {
    /// A server for `registry` on the given sockets, with the config's
    /// domain and TTL. `auth_on`: warn that DNS bypasses auth.
    pub fn new(
        registry: Registry,
        auth_on: bool,
        udp: Option<UdpSocket>,
        tcp: Option<TcpListener>,
    ) -> Result<Self> {
        let handler = Handler::new(registry)?;
        if auth_on {
            warn!(
                "DNS answers are not authenticated: with --auth-file on, anyone who can reach \
                 --dns-listen can still resolve every service"
            );
        }
        Ok(Self { handler, udp, tcp })
    }

    /// Serves until the registry shuts down.
    pub async fn run(self) {
        let token = self.handler.registry.shutdown_token().clone();
        let mut server = Server::new(self.handler);
        if let Some(udp) = self.udp {
            if let Ok(addr) = udp.local_addr() {
                info!(%addr, "DNS listening (UDP)");
            }
            server.register_socket(udp);
        }
        if let Some(tcp) = self.tcp {
            if let Ok(addr) = tcp.local_addr() {
                info!(%addr, "DNS listening (TCP)");
            }
            server.register_listener(tcp, TCP_TIMEOUT, TCP_RESPONSE_BUFFER);
        }
        token.cancelled().await;
        if let Err(e) = server.shutdown_gracefully().await {
            warn!(error = %e, "DNS server stopped with an error");
        }
    }
}

/// What one query is answered with.
#[derive(Debug, Default)]
pub struct Answer {
    /// Response code.
    pub code: ResponseCode,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section (the SOA of a negative answer).
    pub soa: Vec<Record>,
    /// Additional section (addresses of SRV targets).
    pub additionals: Vec<Record>,
}

impl Handler {
    /// A handler with `registry`'s DNS config.
    pub fn new(registry: Registry) -> Result<Self> {
        let config = registry.config();
        let mut domain = Name::from_str(&config.dns_domain).map_err(|e| {
            Error::InvalidArgument(format!(
                "dns_domain {:?} is not a domain name: {e}",
                config.dns_domain
            ))
        })?;
        domain.set_fqdn(true);
        if domain.is_root() {
            return Err(Error::InvalidArgument(
                "dns_domain must not be the root: use e.g. registry.".into(),
            ));
        }
        let ttl = config.dns_ttl.as_secs();
        if ttl > i32::MAX as u64 {
            return Err(Error::InvalidArgument(format!(
                "dns_ttl {}s is above the maximum {}s (RFC 2181)",
                ttl,
                i32::MAX
            )));
        }
        Ok(Self {
            domain: domain.to_lowercase(),
            ttl: ttl as u32,
            registry,
        })
    }

    /// The answer to one question.
    pub fn answer(&self, name: &Name, qtype: RecordType) -> Answer {
        let name = name.to_lowercase();
        if !self.domain.zone_of(&name) {
            return Answer {
                code: ResponseCode::Refused,
                ..Answer::default()
            };
        }
        let extra = (name.num_labels() - self.domain.num_labels()) as usize;
        let labels: Vec<String> = name
            .iter()
            .take(extra)
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let mut answer = match labels.split_last() {
            None => self.apex(qtype),
            Some((last, rest)) if last == "service" => self.service(&name, rest, qtype),
            Some((last, [hex])) if last == "addr" => self.addr(&name, hex, qtype),
            Some(_) => self.nxdomain(),
        };
        if answer.answers.is_empty() && answer.code != ResponseCode::Refused {
            answer.soa = vec![self.soa()];
        }
        answer
    }

    fn nxdomain(&self) -> Answer {
        Answer {
            code: ResponseCode::NXDomain,
            ..Answer::default()
        }
    }

    fn soa(&self) -> Record {
        let label = |l: &str| {
            Name::from_str(l)
                .and_then(|n| n.append_domain(&self.domain))
                .unwrap_or_else(|_| self.domain.clone())
        };
        let (refresh, retry, expire) = SOA_TIMERS;
        Record::from_rdata(
            self.domain.clone(),
            self.ttl,
            RData::SOA(SOA::new(
                label("ns"),
                label("hostmaster"),
                self.registry.catalog().revision() as u32,
                refresh,
                retry,
                expire,
                self.ttl,
            )),
        )
    }

    fn apex(&self, qtype: RecordType) -> Answer {
        let mut answer = Answer::default();
        if matches!(qtype, RecordType::SOA | RecordType::ANY) {
            answer.answers.push(self.soa());
        }
        answer
    }

    /// `[selectors.]<service>.service.<domain>`, or `_<service>._tcp...`.
    fn service(&self, name: &Name, labels: &[String], qtype: RecordType) -> Answer {
        let none = HashMap::new();
        let known = |service: &str| {
            self.registry
                .resolve(service, &none, false, None)
                .is_ok_and(|r| r.service_known)
        };
        // RFC 2782: _service._proto.
        let split = match labels {
            [rest @ .., svc, proto]
                if (proto == "_tcp" || proto == "_udp") && svc.starts_with('_') =>
            {
                let service = svc[1..].to_string();
                known(&service).then(|| (rest.to_vec(), service))
            }
            _ => (0..labels.len()).find_map(|k| {
                let service = labels[k..].join(".");
                known(&service).then(|| (labels[..k].to_vec(), service))
            }),
        };
        let Some((selectors, service)) = split else {
            return self.nxdomain();
        };
        let mut selector = HashMap::new();
        for label in selectors {
            let (k, v) = match label.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => ("zone".to_string(), label),
            };
            if selector.insert(k, v).is_some() {
                return self.nxdomain();
            }
        }
        let Ok(resolved) = self.registry.resolve(&service, &selector, false, None) else {
            return self.nxdomain();
        };
        // Resolve answers the served set: serving instances, or every
        // active one while the service panics (see `crate::serving`).
        let mut serving: Vec<&Instance> = resolved.instances.iter().collect();
        serving.shuffle(&mut rand::rng());
        let mut answer = Answer::default();
        for instance in serving {
            let Some((host, port)) = split_address(&instance.address) else {
                continue;
            };
            match qtype {
                RecordType::A | RecordType::AAAA | RecordType::ANY => {
                    if let Some(rdata) = address_rdata(host, qtype) {
                        answer
                            .answers
                            .push(Record::from_rdata(name.clone(), self.ttl, rdata));
                    }
                }
                RecordType::SRV => {
                    let target = match host {
                        Host::Ip(ip) => {
                            let target = self.addr_name(ip);
                            if let Some(rdata) = address_rdata(host, RecordType::ANY) {
                                answer.additionals.push(Record::from_rdata(
                                    target.clone(),
                                    self.ttl,
                                    rdata,
                                ));
                            }
                            target
                        }
                        Host::Name(n) => match Name::from_str(n) {
                            Ok(mut n) => {
                                n.set_fqdn(true);
                                n
                            }
                            Err(_) => continue,
                        },
                    };
                    let weight = instance.weight.min(u16::MAX as u32) as u16;
                    answer.answers.push(Record::from_rdata(
                        name.clone(),
                        self.ttl,
                        RData::SRV(SRV::new(1, weight, port, target)),
                    ));
                }
                _ => {}
            }
        }
        answer
    }

    /// `<hex ip>.addr.<domain>`.
    fn addr_name(&self, ip: IpAddr) -> Name {
        let hex = match ip {
            IpAddr::V4(v4) => hex::encode(v4.octets()),
            IpAddr::V6(v6) => hex::encode(v6.octets()),
        };
        Name::from_str(&hex)
            .and_then(|n| n.append_domain(&Name::from_str("addr").expect("valid label")))
            .and_then(|n| n.append_domain(&self.domain))
            .expect("hex labels make a valid name")
    }

    fn addr(&self, name: &Name, hex_label: &str, qtype: RecordType) -> Answer {
        let ip = match hex::decode(hex_label).ok().as_deref() {
            Some(&[a, b, c, d]) => IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            Some(bytes) if bytes.len() == 16 => {
                let octets: [u8; 16] = bytes.try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(octets))
            }
            _ => return self.nxdomain(),
        };
        let mut answer = Answer::default();
        if let Some(rdata) = address_rdata(Host::Ip(ip), qtype) {
            answer
                .answers
                .push(Record::from_rdata(name.clone(), self.ttl, rdata));
        }
        answer
    }
}

/// The host of an instance address.
#[derive(Debug, Clone, Copy)]
enum Host<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

/// `host:port` as validated by `validate::address`: `v4:port`,
/// `[v6]:port` or `name:port`.
fn split_address(address: &str) -> Option<(Host<'_>, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some(match host.parse::<IpAddr>() {
        Ok(ip) => (Host::Ip(ip), port),
        Err(_) => (Host::Name(host), port),
    })
}

/// The A or AAAA record data of a host, if it is an IP of the asked family
/// (`ANY`: either).
fn address_rdata(host: Host<'_>, qtype: RecordType) -> Option<RData> {
    match (host, qtype) {
        (Host::Ip(IpAddr::V4(v4)), RecordType::A | RecordType::ANY) => Some(RData::A(A(v4))),
        (Host::Ip(IpAddr::V6(v6)), RecordType::AAAA | RecordType::ANY) => {
            Some(RData::AAAA(AAAA(v6)))
        }
        _ => None,
    }
}

#[tonic::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = false;
        let mut edns = None;
        if let Some(req) = &request.edns {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().max(512));
            edns = Some(e);
        }
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let answer = if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            Answer {
                code: ResponseCode::NotImp,
                ..Answer::default()
            }
        } else {
            match request.request_info() {
                Ok(info) => self.answer_query(info.query),
                Err(_) => Answer {
                    code: ResponseCode::FormErr,
                    ..Answer::default()
                },
            }
        };
        metadata.response_code = answer.code;
        let response = builder.build(
            metadata,
            answer.answers.iter(),
            std::iter::empty(),
            answer.soa.iter(),
            answer.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                warn!(error = %e, "DNS response not sent");
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

impl Handler {
    fn answer_query(&self, query: &LowerQuery) -> Answer {
        let name: Name = query.name().clone().into();
        self.answer(&name, query.query_type())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use registry_api::v1::RegisterRequest;

    fn registry() -> Registry {
        let r = Registry::new(Config::default());
        for (id, addr, zone) in [
            ("a", "10.0.0.1:8080", "eu-1"),
            ("b", "[2001:db8::1]:8081", "us-1"),
            ("c", "prod-c.internal:8082", "eu-1"),
        ] {
            let req = RegisterRequest {
                instance: Some(Instance {
                    service: "prod".into(),
                    id: id.into(),
                    address: addr.into(),
                    metadata: [("zone".to_string(), zone.to_string())].into(),
                    weight: 5,
                    ..Default::default()
                }),
                ttl_ms: 10_000,
                lease_id: 0,
            };
            futures::executor::block_on(r.register(req, None)).unwrap();
        }
        r
    }

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    #[test]
    fn names_map_to_services_selectors_and_codes() {
        let h = Handler::new(registry()).unwrap();
        let a = h.answer(&name("prod.service.registry."), RecordType::A);
        assert_eq!(a.code, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        let aaaa = h.answer(&name("PROD.service.Registry."), RecordType::AAAA);
        assert_eq!(aaaa.answers.len(), 1);
        let srv = h.answer(&name("prod.service.registry."), RecordType::SRV);
        assert_eq!(srv.answers.len(), 3);
        assert_eq!(srv.additionals.len(), 2, "A/AAAA of the two IP targets");
        let zoned = h.answer(&name("eu-1.prod.service.registry."), RecordType::SRV);
        assert_eq!(zoned.answers.len(), 2);
        let rfc = h.answer(&name("_prod._tcp.service.registry."), RecordType::SRV);
        assert_eq!(rfc.answers.len(), 3);
        let nobody = h.answer(&name("ap-1.prod.service.registry."), RecordType::A);
        assert_eq!(nobody.code, ResponseCode::NoError);
        assert!(nobody.answers.is_empty() && nobody.soa.len() == 1);
        let unknown = h.answer(&name("web.service.registry."), RecordType::A);
        assert_eq!(unknown.code, ResponseCode::NXDomain);
        assert_eq!(unknown.soa.len(), 1);
        let outside = h.answer(&name("example.com."), RecordType::A);
        assert_eq!(outside.code, ResponseCode::Refused);
        let addr = h.answer(&name("0a000001.addr.registry."), RecordType::A);
        assert_eq!(addr.answers.len(), 1);
        match &addr.answers[0].data {
            RData::A(a) => assert_eq!(a.0, Ipv4Addr::new(10, 0, 0, 1)),
            other => panic!("{other:?}"),
        }
    }
}
