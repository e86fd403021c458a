//! The DNS interface over the wire: A/AAAA/SRV for
//! `<service>.service.registry.`, selector labels, NXDOMAIN for unknown
//! names and NOERROR-empty for a known service with nothing serving, short
//! TTLs, shuffled answers, truncation over UDP with the full answer over
//! TCP, and `dig` (Debian `dnsutils`, which `.ci/run` installs) against it.

mod common;

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use common::{
    api::{self, InstanceExt, deregister_instance, instance},
    http::HttpServer,
};
use hickory_net::{
    client::{Client, ClientHandle},
    proto::{
        op::{Message, MessageType, OpCode, Query, ResponseCode},
        rr::{DNSClass, Name, RData, RecordType},
    },
    runtime::TokioRuntimeProvider,
    udp::UdpClientStream,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

/// Every instance here has weight 7 (the SRV weight) and a zone (a
/// selector label).
async fn register(server: &HttpServer, service: &str, id: &str, addr: &str, zone: &str) {
    let instance = instance(service, id).at(addr).weight(7).meta("zone", zone);
    api::register(&mut server.client().await, instance, 30_000, 0).await;
}

fn query_bytes(name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    // From raw labels: DNS allows any byte in a label (`zone=us-1`), the
    // text parser only host-name ones.
    let labels: Vec<&[u8]> = name
        .trim_end_matches('.')
        .split('.')
        .map(str::as_bytes)
        .collect();
    let mut name = Name::from_labels(labels).unwrap();
    name.set_fqdn(true);
    m.add_query(Query::query(name, rtype));
    m.to_vec().unwrap()
}

fn rand_id() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        & 0xffff) as u16
}

/// One query over UDP (no EDNS: the 512-byte limit applies).
async fn udp(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&query_bytes(name, rtype), server)
        .await
        .unwrap();
    let mut buf = vec![0u8; 65_535];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("DNS answer over UDP within 5 s")
        .unwrap();
    Message::from_vec(&buf[..n]).expect("answer decodes")
}

/// One query over TCP (two-byte length prefix, RFC 1035 4.2.2).
async fn tcp(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(server).await.unwrap();
        let q = query_bytes(name, rtype);
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q).await.unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).await.unwrap();
        Message::from_vec(&buf).expect("answer decodes")
    })
    .await
    .expect("DNS answer over TCP within 5 s")
}

fn ips(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn answers_records_codes_and_ttls() {
    let server = HttpServer::start().await;
    register(&server, "prod", "prod-1", "10.0.0.1:8080", "eu-1").await;
    register(&server, "prod", "prod-2", "10.0.0.2:8081", "us-1").await;
    register(&server, "prod", "prod-3", "[2001:db8::3]:8082", "eu-1").await;
    register(&server, "prod", "prod-4", "prod4.internal:8083", "eu-1").await;
    register(&server, "empty", "e-1", "10.0.0.9:80", "eu-1").await;
    let gone = deregister_instance("empty", "e-1");
    api::deregister(&mut server.client().await, gone).await;

    // A standard client library first.
    let stream = UdpClientStream::builder(server.dns, TokioRuntimeProvider::default()).build();
    let (mut client, bg) = Client::<TokioRuntimeProvider>::from_sender(stream);
    tokio::spawn(bg);
    let a = client
        .query(
            Name::from_str("prod.service.registry.").unwrap(),
            DNSClass::IN,
            RecordType::A,
        )
        .await
        .unwrap();
    let mut got = ips(&a);
    got.sort();
    assert_eq!(
        got,
        [
            "10.0.0.1".parse::<IpAddr>().unwrap(),
            "10.0.0.2".parse().unwrap()
        ]
    );
    assert!(a.metadata.authoritative);
    assert!(a.answers.iter().all(|r| r.ttl == 5), "default TTL 5 s");

    let aaaa = udp(server.dns, "prod.service.registry.", RecordType::AAAA).await;
    assert_eq!(ips(&aaaa), ["2001:db8::3".parse::<IpAddr>().unwrap()]);

    let srv = udp(server.dns, "prod.service.registry.", RecordType::SRV).await;
    assert_eq!(srv.metadata.response_code, ResponseCode::NoError);
    let mut targets: Vec<(String, u16, u16)> = srv
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.target.to_ascii(), s.port, s.weight)),
            _ => None,
        })
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            ("0a000001.addr.registry.".to_string(), 8080, 7),
            ("0a000002.addr.registry.".to_string(), 8081, 7),
            (
                "20010db8000000000000000000000003.addr.registry.".to_string(),
                8082,
                7
            ),
            ("prod4.internal.".to_string(), 8083, 7),
        ]
    );
    assert_eq!(srv.additionals.len(), 3, "addresses of the IP targets");
    let target = udp(server.dns, "0a000002.addr.registry.", RecordType::A).await;
    assert_eq!(ips(&target), ["10.0.0.2".parse::<IpAddr>().unwrap()]);

    // Selector labels: bare value = zone, or key=value; RFC 2782 form.
    let eu = udp(server.dns, "eu-1.prod.service.registry.", RecordType::A).await;
    assert_eq!(ips(&eu), ["10.0.0.1".parse::<IpAddr>().unwrap()]);
    let us = udp(
        server.dns,
        "zone=us-1.prod.service.registry.",
        RecordType::A,
    )
    .await;
    assert_eq!(ips(&us), ["10.0.0.2".parse::<IpAddr>().unwrap()]);
    let rfc = udp(server.dns, "_prod._tcp.service.registry.", RecordType::SRV).await;
    assert_eq!(rfc.answers.len(), 4);

    // Unknown: NXDOMAIN; known but nothing serving: NOERROR, no records.
    // Both carry the SOA for negative caching.
    let unknown = udp(server.dns, "web.service.registry.", RecordType::A).await;
    assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
    assert!(unknown.answers.is_empty());
    assert!(matches!(unknown.authorities[0].data, RData::SOA(_)));
    let empty = udp(server.dns, "empty.service.registry.", RecordType::A).await;
    assert_eq!(empty.metadata.response_code, ResponseCode::NoError);
    assert!(empty.answers.is_empty());
    assert!(matches!(empty.authorities[0].data, RData::SOA(_)));
    let nobody = udp(server.dns, "ap-1.prod.service.registry.", RecordType::A).await;
    assert_eq!(nobody.metadata.response_code, ResponseCode::NoError);
    assert!(nobody.answers.is_empty());
    let outside = udp(server.dns, "example.com.", RecordType::A).await;
    assert_eq!(outside.metadata.response_code, ResponseCode::Refused);

    // Follows the catalog.
    let gone = deregister_instance("prod", "prod-1");
    api::deregister(&mut server.client().await, gone).await;
    let a = udp(server.dns, "prod.service.registry.", RecordType::A).await;
    assert_eq!(ips(&a), ["10.0.0.2".parse::<IpAddr>().unwrap()]);
    server.stop().await;
}

#[tokio::test]
async fn shuffled_and_truncated_over_udp_complete_over_tcp() {
    let server = HttpServer::start_with(registry::Config {
        dns_ttl: Duration::from_secs(2),
        ..common::TestServer::no_warmup_config()
    })
    .await;
    for i in 0..60 {
        register(
            &server,
            "wide",
            &format!("w-{i}"),
            &format!("10.1.0.{i}:80"),
            "eu-1",
        )
        .await;
    }
    let full = tcp(server.dns, "wide.service.registry.", RecordType::A).await;
    assert_eq!(full.answers.len(), 60);
    assert!(full.answers.iter().all(|r| r.ttl == 2), "configured TTL");
    assert!(!full.metadata.truncation);
    let cut = udp(server.dns, "wide.service.registry.", RecordType::A).await;
    assert!(
        cut.metadata.truncation,
        "60 A records exceed 512 bytes: TC set"
    );
    assert!(cut.answers.len() < 60);

    let mut orders = HashSet::new();
    for _ in 0..10 {
        let m = tcp(server.dns, "wide.service.registry.", RecordType::A).await;
        orders.insert(ips(&m));
    }
    assert!(orders.len() > 1, "answers are shuffled");
    server.stop().await;
}

#[tokio::test]
async fn dig_resolves_a_service() {
    let dig = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("dig"))
                .any(|p| p.is_file())
        })
        .unwrap_or(false);
    if !dig {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("dig is required in CI (.ci/run installs dnsutils)");
        }
        eprintln!("SKIPPED dig_resolves_a_service: no dig on PATH (apt-get install dnsutils)");
        return;
    }
    let server = HttpServer::start().await;
    register(&server, "prod", "prod-1", "10.0.0.1:8080", "eu-1").await;
    let out = tokio::process::Command::new("dig")
        .arg(format!("@{}", server.dns.ip()))
        .args(["-p", &server.dns.port().to_string()])
        .args([
            "+time=2",
            "+tries=1",
            "+short",
            "prod.service.registry",
            "SRV",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dig failed: {text}");
    assert_eq!(text.trim(), "1 7 8080 0a000001.addr.registry.");
    let out = tokio::process::Command::new("dig")
        .arg(format!("@{}", server.dns.ip()))
        .args(["-p", &server.dns.port().to_string()])
        .args(["+time=2", "+tries=1", "nothing.service.registry", "A"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("status: NXDOMAIN"), "{text}");
    server.stop().await;
}
