//! Property: request validation never panics, and `Registry::register`
//! accepts a request exactly when it is valid, with the documented code
//! when it is not and no state change on refusal.
//!
//! Validity comes from an oracle written here from the API's documented
//! rules (proto comments), not from `validate.rs`: each generated field
//! carries the verdict it was built to have (a valid shape or one specific
//! defect), and arbitrary strings, whose verdict the generator cannot know,
//! are checked against a small independent re-statement of the rules.

use std::{collections::HashMap, time::Duration};

use proptest::prelude::*;
use registry::{
    Config, Error, Registry,
    pb::v1::{Instance, RegisterRequest},
    validate,
};

/// A generated value and whether the API's rules accept it (`None`: the
/// generator cannot tell; only "never panics, refuses cleanly" is checked).
#[derive(Debug, Clone)]
struct Field<T> {
    value: T,
    valid: Option<bool>,
}

fn field<T>(value: T, valid: bool) -> Field<T> {
    Field {
        value,
        valid: Some(valid),
    }
}

/// Service names: valid shapes, each kind of defect, and arbitrary text
/// judged by the oracle.
fn service() -> impl Strategy<Value = Field<String>> {
    prop_oneof![
        4 => "[a-z0-9][a-z0-9._-]{0,40}".prop_map(|s| field(s, true)),
        1 => Just(field("a".repeat(253), true)),
        1 => Just(field("a".repeat(254), false)),
        1 => Just(field(String::new(), false)),
        1 => "[._-][a-z0-9]{0,8}".prop_map(|s| field(s, false)),
        1 => "[a-z]{1,5}[A-Z /:é\u{0}][a-z]{0,5}".prop_map(|s| field(s, false)),
        2 => any::<String>().prop_map(|s| {
            let ok = service_oracle(&s);
            field(s, ok)
        }),
    ]
}

fn service_oracle(s: &str) -> bool {
    // "1..=253 chars of [a-z0-9._-], starting with [a-z0-9]"
    let first_ok = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first_ok
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c))
}

fn instance_id() -> impl Strategy<Value = Field<String>> {
    prop_oneof![
        4 => "[!-~]{1,40}".prop_map(|s| field(s, true)),
        1 => Just(field("x".repeat(128), true)),
        1 => Just(field("x".repeat(129), false)),
        1 => Just(field(String::new(), false)),
        1 => "[a-z]{0,4}[ \t\u{7f}é][a-z]{0,4}".prop_map(|s| field(s, false)),
        2 => any::<String>().prop_map(|s| {
            // "1..=128 printable ASCII characters" (no spaces)
            let ok = !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic());
            field(s, ok)
        }),
    ]
}

fn address() -> impl Strategy<Value = Field<String>> {
    let port = 1u16..=65535;
    prop_oneof![
        // The unspecified hosts (0.0.0.0, [::]) are refused: nothing can
        // dial them.
        2 => (any::<[u8; 4]>(), port.clone()).prop_map(|(ip, p)| {
            let ip = std::net::Ipv4Addr::from(ip);
            field(format!("{ip}:{p}"), !ip.is_unspecified())
        }),
        2 => (any::<[u16; 8]>(), port.clone()).prop_map(|(ip, p)| {
            let ip = std::net::Ipv6Addr::from(ip);
            field(format!("[{ip}]:{p}"), !ip.is_unspecified())
        }),
        2 => ("[a-z]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z0-9]{1,10}){0,3}", port.clone())
            .prop_map(|(h, p)| field(format!("{h}:{p}"), true)),
        1 => any::<[u8; 4]>()
            .prop_map(|ip| field(format!("{}:0", std::net::Ipv4Addr::from(ip)), false)),
        1 => (65536u32..1_000_000)
            .prop_map(|p| field(format!("10.0.0.1:{p}"), false)),
        1 => "[a-z]{1,10}".prop_map(|h| field(h, false)),
        1 => any::<[u16; 8]>()
            .prop_map(|ip| field(format!("{}:80", std::net::Ipv6Addr::from(ip)), false)),
        1 => ("-[a-z]{1,5}|[a-z]{1,5}-|[a-z]{1,3}_[a-z]{1,3}")
            .prop_map(|h| field(format!("{h}:80"), false)),
        1 => Just(field(format!("{}:80", "a".repeat(300)), false)),
        1 => Just(field(String::new(), false)),
        // Arbitrary text: without a ':' it cannot be host:port; with one,
        // no oracle short of re-implementing the parser.
        1 => any::<String>().prop_map(|s| {
            let valid = (!s.contains(':')).then_some(false);
            Field { value: s, valid }
        }),
    ]
}

fn metadata() -> impl Strategy<Value = Field<HashMap<String, String>>> {
    let good = proptest::collection::hash_map("[!-<>-~]{1,20}", "\\PC{0,30}", 0..8)
        .prop_map(|m| field(m, true));
    prop_oneof![
        4 => good,
        1 => Just(field(
            (0..64).map(|i| (format!("k{i}"), String::new())).collect(),
            true
        )),
        1 => Just(field(
            (0..65).map(|i| (format!("k{i}"), String::new())).collect(),
            false
        )),
        1 => "[a-z]{0,3}[= é][a-z]{0,3}".prop_map(|k| field([(k, "v".into())].into(), false)),
        1 => Just(field([(String::new(), "v".into())].into(), false)),
        1 => Just(field([("k".repeat(129), "v".into())].into(), false)),
        1 => Just(field([("k".into(), "v".repeat(1025))].into(), false)),
        1 => Just(field([("k".into(), "v".repeat(1024))].into(), true)),
    ]
}

/// TTL in ms and its verdict under [`config`]'s bounds (1 s ..= 1 h):
/// `None` valid, `Some(true)` below the minimum, `Some(false)` above.
fn ttl() -> impl Strategy<Value = (u64, Option<bool>)> {
    prop_oneof![
        4 => (1_000u64..=3_600_000).prop_map(|t| (t, None)),
        1 => (0u64..1_000).prop_map(|t| (t, Some(true))),
        1 => (3_600_001u64..=u64::MAX).prop_map(|t| (t, Some(false))),
    ]
}

/// The TTL bounds the `ttl()` generator's verdicts are built for; not the
/// shared test config (whose 100 ms minimum would change them).
fn config() -> Config {
    Config {
        min_ttl: Duration::from_secs(1),
        max_ttl: Duration::from_secs(3600),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// The validate.rs functions agree with the oracle on every field kind.
    #[test]
    fn field_validators_match_the_documented_rules(
        svc in service(),
        id in instance_id(),
        addr in address(),
        md in metadata(),
    ) {
        prop_assert_eq!(Some(validate::service_name("s", &svc.value).is_ok()), svc.valid, "{:?}", svc.value);
        prop_assert_eq!(Some(validate::instance_id("i", &id.value).is_ok()), id.valid, "{:?}", id.value);
        let addr_ok = validate::address("a", &addr.value).is_ok();
        if let Some(valid) = addr.valid {
            prop_assert_eq!(addr_ok, valid, "{:?}", addr.value);
        }
        prop_assert_eq!(Some(validate::metadata("m", &md.value).is_ok()), md.valid, "{:?}", md.value);
    }

    /// Register accepts exactly the valid requests; refusals carry the
    /// documented code and change nothing.
    #[test]
    fn register_accepts_exactly_the_valid_requests(
        svc in service(),
        id in instance_id(),
        addr in address(),
        md in metadata(),
        (ttl_ms, ttl_defect) in ttl(),
        weight in any::<u32>(),
        missing_instance in proptest::bool::weighted(0.05),
        unknown_lease in proptest::bool::weighted(0.1),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = rt.enter();
        let registry = Registry::new(config());
        let req = RegisterRequest {
            instance: (!missing_instance).then(|| Instance {
                service: svc.value.clone(),
                id: id.value.clone(),
                address: addr.value.clone(),
                metadata: md.value.clone(),
                weight,
                ..Default::default()
            }),
            ttl_ms,
            lease_id: if unknown_lease { 42 } else { 0 },
        };
        // Some(false) if any field is known invalid, None if validity hinges
        // on an unjudged address, Some(true) if all are valid.
        let fields_valid = if missing_instance {
            Some(false)
        } else {
            [svc.valid, id.valid, addr.valid, md.valid]
                .into_iter()
                .try_fold(true, |all, v| v.map(|v| all && v))
                .or_else(|| {
                    let known_bad = [svc.valid, id.valid, md.valid].contains(&Some(false));
                    known_bad.then_some(false)
                })
        };
        // Memory-mode writes complete without waiting.
        let result = futures::executor::block_on(registry.register(req, None));
        let status = registry.status();
        match &result {
            Ok(resp) => {
                prop_assert_ne!(fields_valid, Some(false), "accepted an invalid request");
                prop_assert!(!unknown_lease, "attached to a lease that does not exist");
                prop_assert!(ttl_defect.is_none(), "accepted ttl {}", ttl_ms);
                prop_assert_eq!(status.instances, 1);
                prop_assert_eq!(resp.ttl_ms, ttl_ms);
            }
            Err(err) => {
                prop_assert_eq!((status.instances, status.leases, status.revision), (0, 0, 0));
                if fields_valid == Some(false) {
                    prop_assert!(matches!(err, Error::InvalidArgument(_)), "{}", err);
                } else if fields_valid.is_none() {
                    // An unjudged address: "refused cleanly" is all we know;
                    // if the address was the reason, it is INVALID_ARGUMENT.
                    let addr_bad = validate::address("a", &addr.value).is_err();
                    prop_assert!(!addr_bad || matches!(err, Error::InvalidArgument(_)), "{}", err);
                } else if unknown_lease {
                    prop_assert!(matches!(err, Error::NotFound(_)), "{}", err);
                } else {
                    match ttl_defect {
                        Some(true) => prop_assert!(matches!(err, Error::InvalidArgument(_)), "{}", err),
                        Some(false) => prop_assert!(matches!(err, Error::OutOfRange(_)), "{}", err),
                        None => prop_assert!(false, "refused a valid request: {}", err),
                    }
                }
            }
        }
    }
}
