//! Request validation: names, ids, addresses, metadata, selectors and TTLs.
//! Everything is checked before any state changes, so a rejected request
//! leaves nothing behind.

use std::{collections::HashMap, net::Ipv4Addr, net::Ipv6Addr, time::Duration};

use crate::error::{Error, Result};

/// Longest service name: a DNS name's limit, so names can double as DNS labels.
pub const MAX_SERVICE_NAME: usize = 253;
/// Longest instance id.
pub const MAX_INSTANCE_ID: usize = 128;
/// Longest address (`[` IPv6 `]:port` or a 253-char hostname plus port).
pub const MAX_ADDRESS: usize = 253 + 6;
/// Most metadata entries per instance (and selector entries per request).
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY: usize = 128;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE: usize = 1024;

/// Longest excerpt of a rejected value quoted back in an error message, so a
/// 10 MB name does not come back as a 10 MB error.
const QUOTE_LIMIT: usize = 64;

fn quote(s: &str) -> String {
    if s.len() <= QUOTE_LIMIT {
        format!("{s:?}")
    } else {
        let mut end = QUOTE_LIMIT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{:?}... ({} bytes)", &s[..end], s.len())
    }
}

/// Checks a service name: 1..=253 chars of `[a-z0-9._-]`, starting with a
/// letter or digit.
pub fn service_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    if name.len() > MAX_SERVICE_NAME {
        return Err(Error::InvalidArgument(format!(
            "invalid service name {}: {field} is {} characters, the limit is {MAX_SERVICE_NAME}",
            quote(name),
            name.len()
        )));
    }
    for (i, c) in name.chars().enumerate() {
        let ok =
            c.is_ascii_lowercase() || c.is_ascii_digit() || (i > 0 && matches!(c, '.' | '_' | '-'));
        if !ok {
            let why = if i == 0 && matches!(c, '.' | '_' | '-') {
                "must start with a lowercase letter or digit".to_string()
            } else if c.is_ascii_uppercase() {
                format!("uppercase {c:?} at position {i} is not allowed")
            } else {
                format!("character {c:?} at position {i} is not allowed")
            };
            return Err(Error::InvalidArgument(format!(
                "invalid service name {}: {field} {why}; use 1..={MAX_SERVICE_NAME} characters of [a-z0-9._-]",
                quote(name)
            )));
        }
    }
    Ok(())
}

/// Checks an instance id: 1..=128 printable ASCII characters, no spaces.
pub fn instance_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    if id.len() > MAX_INSTANCE_ID {
        return Err(Error::InvalidArgument(format!(
            "invalid instance id {}: {field} is {} bytes, the limit is {MAX_INSTANCE_ID}",
            quote(id),
            id.len()
        )));
    }
    if let Some((i, c)) = id.char_indices().find(|(_, c)| !c.is_ascii_graphic()) {
        return Err(Error::InvalidArgument(format!(
            "invalid instance id {}: {field} has {c:?} at byte {i}; use printable ASCII without spaces",
            quote(id)
        )));
    }
    Ok(())
}

/// Checks `host:port` where host is IPv4, `[IPv6]` or a DNS hostname.
/// Refuses, with a message saying what to send instead, the two mistakes
/// that look valid to a parser but leave callers nothing to dial: a URL
/// with a scheme (`http://10.0.0.7:80`) and an unspecified host (`0.0.0.0`,
/// `[::]`, the bind-to-everything address a server listens on).
pub fn address(field: &str, addr: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "invalid address {}: {field} {why}; expected host:port with an IPv4 address, [IPv6] or a DNS name and a port 1..=65535",
            quote(addr)
        )))
    };
    if addr.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    if let Some((scheme, rest)) = addr.split_once("://") {
        let host_port = rest.split(['/', '?', '#']).next().unwrap_or_default();
        return Err(Error::InvalidArgument(format!(
            "invalid address {}: {field} has a URL scheme ({scheme}://); send host:port only, e.g. {}",
            quote(addr),
            quote(host_port)
        )));
    }
    if addr.len() > MAX_ADDRESS {
        return bad(&format!(
            "is {} bytes, the limit is {MAX_ADDRESS}",
            addr.len()
        ));
    }
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let Some((v6, port)) = rest.split_once("]:") else {
            return bad("has an unterminated [IPv6] host or no port");
        };
        match v6.parse::<Ipv6Addr>() {
            Err(_) => return bad("has an invalid IPv6 host"),
            Ok(ip) if ip.is_unspecified() => return unspecified(field, addr, "[::]"),
            Ok(_) => {}
        }
        (None, port)
    } else {
        let Some((host, port)) = addr.rsplit_once(':') else {
            return bad("has no port");
        };
        if host.contains(':') {
            return bad("has an IPv6 host without brackets");
        }
        (Some(host), port)
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return bad(&format!("has port {} outside 1..=65535", quote(port))),
    }
    if let Some(host) = host {
        if host.is_empty() {
            return bad("has an empty host");
        }
        let all_numeric = host.chars().all(|c| c.is_ascii_digit() || c == '.');
        if all_numeric {
            match host.parse::<Ipv4Addr>() {
                Err(_) => return bad("has an invalid IPv4 host"),
                Ok(ip) if ip.is_unspecified() => return unspecified(field, addr, host),
                Ok(_) => {}
            }
        } else if !is_dns_name(host) {
            return bad(
                "has an invalid DNS hostname (labels of 1..=63 [A-Za-z0-9-], not starting or ending with -)",
            );
        }
    }
    Ok(())
}

/// `0.0.0.0` / `[::]` mean "every interface" to a listener and nothing to a
/// caller: the registered address is what callers dial.
fn unspecified(field: &str, addr: &str, host: &str) -> Result<()> {
    Err(Error::InvalidArgument(format!(
        "invalid address {}: {field} has the unspecified host {host}, which callers cannot dial; register the address they should use (this host's IP or DNS name, or 127.0.0.1 on one machine), not the one the server binds",
        quote(addr)
    )))
}

fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Checks a metadata map (or a selector, which has the same shape and limits).
pub fn metadata(field: &str, map: &HashMap<String, String>) -> Result<()> {
    if map.len() > MAX_METADATA_ENTRIES {
        return Err(Error::InvalidArgument(format!(
            "{field} has {} entries, the limit is {MAX_METADATA_ENTRIES}",
            map.len()
        )));
    }
    for (k, v) in map {
        if k.is_empty() {
            return Err(Error::InvalidArgument(format!("{field} has an empty key")));
        }
        if k.len() > MAX_METADATA_KEY {
            return Err(Error::InvalidArgument(format!(
                "{field} key {} is {} bytes, the limit is {MAX_METADATA_KEY}",
                quote(k),
                k.len()
            )));
        }
        if let Some(c) = k.chars().find(|c| !c.is_ascii_graphic() || *c == '=') {
            return Err(Error::InvalidArgument(format!(
                "{field} key {} has {c:?}; keys are printable ASCII without spaces or '='",
                quote(k)
            )));
        }
        if v.len() > MAX_METADATA_VALUE {
            return Err(Error::InvalidArgument(format!(
                "{field} value of key {} is {} bytes, the limit is {MAX_METADATA_VALUE}",
                quote(k),
                v.len()
            )));
        }
    }
    Ok(())
}

/// Checks a requested TTL against the configured bounds: below the minimum
/// (including zero) is `INVALID_ARGUMENT`, above the maximum `OUT_OF_RANGE`.
pub fn ttl(ttl_ms: u64, min: Duration, max: Duration) -> Result<Duration> {
    let ttl = Duration::from_millis(ttl_ms);
    if ttl < min {
        return Err(Error::InvalidArgument(format!(
            "ttl_ms {ttl_ms} ({}) is below the minimum {}",
            humantime::format_duration(ttl),
            humantime::format_duration(min)
        )));
    }
    if ttl > max {
        return Err(Error::OutOfRange(format!(
            "ttl_ms {ttl_ms} ({}) is above the maximum {}",
            humantime::format_duration(ttl),
            humantime::format_duration(max)
        )));
    }
    Ok(ttl)
}

// --- health checks and admin states (issue 17) ---

/// Default time between health checks: Consul's and Kubernetes' usual
/// period.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Longest time between health checks: a check rarer than this tells
/// callers nothing timely.
pub const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// Default (and, unless the interval is shorter, largest default) time one
/// check may take: an instance that needs longer to say it is healthy is
/// not serving its callers either.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Default failed checks in a row before a serving instance turns
/// CRITICAL: one lost packet or slow GC pause must not take it out
/// (Kubernetes' readiness `failureThreshold`).
pub const DEFAULT_FAILURES_BEFORE_CRITICAL: u32 = 3;
/// Default passing checks in a row before a CRITICAL instance serves again.
pub const DEFAULT_SUCCESSES_BEFORE_PASSING: u32 = 1;
/// Most consecutive results a threshold may ask for.
pub const MAX_CHECK_THRESHOLD: u32 = 100;
/// Longest HTTP check path, and gRPC check service name.
pub const MAX_CHECK_PATH: usize = 1024;
/// Longest admin-state reason, and recorded check output, in bytes.
pub const MAX_REASON: usize = 256;

/// Checks a health check and fills in its defaults (see the proto's
/// `HealthCheck`). `min_interval` is `--min-check-interval`.
pub fn health_check(
    field: &str,
    check: &mut registry_api::v1::HealthCheck,
    min_interval: Duration,
) -> Result<()> {
    use registry_api::v1::{HealthState, health_check::Kind};
    let bad = |msg: String| Err(Error::InvalidArgument(msg));
    let target = match &mut check.kind {
        None => {
            return bad(format!("{field} has no kind; set one of grpc, http or tcp"));
        }
        Some(Kind::Grpc(g)) => {
            if g.service.len() > MAX_CHECK_PATH || g.service.chars().any(|c| !c.is_ascii_graphic())
            {
                return bad(format!(
                    "{field}.grpc.service {} must be at most {MAX_CHECK_PATH} bytes of printable ASCII",
                    quote(&g.service)
                ));
            }
            &g.address
        }
        Some(Kind::Http(h)) => {
            if h.path.is_empty() {
                h.path = "/".into();
            }
            if !h.path.starts_with('/')
                || h.path.len() > MAX_CHECK_PATH
                || h.path.chars().any(|c| !c.is_ascii_graphic())
            {
                return bad(format!(
                    "{field}.http.path {} must start with '/' and be at most {MAX_CHECK_PATH} bytes of printable ASCII without spaces",
                    quote(&h.path)
                ));
            }
            &h.address
        }
        Some(Kind::Tcp(t)) => &t.address,
    };
    if !target.is_empty() {
        address(&format!("{field}.address"), target)?;
    }
    let interval = match check.interval_ms {
        0 => DEFAULT_CHECK_INTERVAL.max(min_interval),
        ms => Duration::from_millis(ms),
    };
    if interval < min_interval || interval > MAX_CHECK_INTERVAL {
        return Err(Error::OutOfRange(format!(
            "{field}.interval_ms {} ({}) is outside {}..={} (min_check_interval)",
            check.interval_ms,
            humantime::format_duration(interval),
            humantime::format_duration(min_interval),
            humantime::format_duration(MAX_CHECK_INTERVAL)
        )));
    }
    let timeout = match check.timeout_ms {
        0 => interval.min(DEFAULT_CHECK_TIMEOUT),
        ms => Duration::from_millis(ms),
    };
    if timeout > interval {
        return Err(Error::OutOfRange(format!(
            "{field}.timeout_ms {} is above interval_ms {}: a check must end before the next one starts",
            timeout.as_millis(),
            interval.as_millis()
        )));
    }
    for (name, v, default) in [
        (
            "failures_before_critical",
            &mut check.failures_before_critical,
            DEFAULT_FAILURES_BEFORE_CRITICAL,
        ),
        (
            "successes_before_passing",
            &mut check.successes_before_passing,
            DEFAULT_SUCCESSES_BEFORE_PASSING,
        ),
    ] {
        if *v == 0 {
            *v = default;
        }
        if *v > MAX_CHECK_THRESHOLD {
            return Err(Error::OutOfRange(format!(
                "{field}.{name} {v} is above the maximum {MAX_CHECK_THRESHOLD}"
            )));
        }
    }
    let initial = check.initial_state.unwrap_or(HealthState::Critical as i32);
    if HealthState::try_from(initial).is_err() {
        return bad(format!(
            "{field}.initial_state {initial} is not a health state (0 PASSING, 1 WARNING, 2 CRITICAL)"
        ));
    }
    check.initial_state = Some(initial);
    check.interval_ms = interval.as_millis() as u64;
    check.timeout_ms = timeout.as_millis() as u64;
    Ok(())
}

/// Checks an admin state (a known value) and its reason (at most
/// [`MAX_REASON`] bytes).
pub fn admin_state(field: &str, state: i32, reason: &str) -> Result<()> {
    if registry_api::v1::AdminState::try_from(state).is_err() {
        return Err(Error::InvalidArgument(format!(
            "{field} {state} is not an admin state (0 ACTIVE, 1 DRAINING, 2 DISABLED)"
        )));
    }
    if reason.len() > MAX_REASON {
        return Err(Error::InvalidArgument(format!(
            "reason {} is {} bytes, the limit is {MAX_REASON}",
            quote(reason),
            reason.len()
        )));
    }
    Ok(())
}

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_checks_get_defaults_and_bounds() {
        use registry_api::v1::{HealthCheck, HttpCheck, health_check::Kind};
        let min = Duration::from_secs(1);
        let mut c = HealthCheck {
            kind: Some(Kind::Http(HttpCheck::default())),
            ..Default::default()
        };
        health_check("check", &mut c, min).unwrap();
        assert_eq!((c.interval_ms, c.timeout_ms), (10_000, 5_000));
        assert_eq!(
            (c.failures_before_critical, c.successes_before_passing),
            (3, 1)
        );
        assert_eq!(c.initial_state, Some(2));
        let Some(Kind::Http(h)) = &c.kind else {
            panic!()
        };
        assert_eq!(h.path, "/");
        let msg = |mut c: HealthCheck| health_check("check", &mut c, min).unwrap_err().to_string();
        assert!(msg(HealthCheck::default()).contains("check has no kind"));
        let fast = HealthCheck {
            interval_ms: 10,
            ..c.clone()
        };
        assert!(msg(fast).contains("check.interval_ms 10 (10ms) is outside 1s..=1h"));
        let slow = HealthCheck {
            timeout_ms: 20_000,
            ..c.clone()
        };
        assert!(msg(slow).contains("timeout_ms 20000 is above interval_ms 10000"));
        let path = HealthCheck {
            kind: Some(Kind::Http(HttpCheck {
                path: "health".into(),
                address: String::new(),
            })),
            ..c.clone()
        };
        assert!(msg(path).contains("must start with '/'"));
        let addr = HealthCheck {
            kind: Some(Kind::Http(HttpCheck {
                path: "/".into(),
                address: "0.0.0.0:80".into(),
            })),
            ..c.clone()
        };
        assert!(msg(addr).contains("check.address"));
        assert!(admin_state("state", 7, "").is_err());
        assert!(
            admin_state("state", 1, &"x".repeat(300))
                .unwrap_err()
                .to_string()
                .contains("the limit is 256")
        );
        assert_eq!(truncate("héllo", 2), "h");
    }

    #[test]
    fn service_names() {
        for ok in ["prod", "a", "payments.v2", "x-y_z.0", &"a".repeat(253)] {
            service_name("service", ok).unwrap();
        }
        for bad in ["", "Prod", "-x", ".x", "a b", "a/b", "é", &"a".repeat(254)] {
            let err = service_name("service", bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
        }
        let msg = service_name("instance.service", "Prod")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("\"Prod\"") && msg.contains("uppercase"),
            "{msg}"
        );
    }

    #[test]
    fn instance_ids() {
        instance_id("id", "host-1:8080/a").unwrap();
        for bad in ["", "a b", "tab\t", "é", &"x".repeat(129)] {
            assert!(instance_id("id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn addresses() {
        for ok in [
            "127.0.0.1:80",
            "[::1]:8080",
            "[2001:db8::1]:65535",
            "prod-1.example.com:443",
            "localhost:1",
            "localhost.:1",
        ] {
            address("address", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "::1:80",
            "[::1:80",
            "[zz]:80",
            "999.1.1.1:80",
            "-bad.com:80",
            "bad_host:80",
            ":80",
            "host:port",
            "0.0.0.0:9",
            "[::]:80",
            "[0:0:0:0:0:0:0:0]:80",
            "http://127.0.0.1:80",
            "grpc://prod:1",
        ] {
            assert!(address("address", bad).is_err(), "{bad:?} accepted");
        }
        let e = address("instance.address", "http://127.0.0.1:80/x").unwrap_err();
        assert!(
            e.to_string()
                .contains("has a URL scheme (http://); send host:port only, e.g. \"127.0.0.1:80\""),
            "{e}"
        );
        let e = address("instance.address", "0.0.0.0:9").unwrap_err();
        assert!(e.to_string().contains("unspecified host 0.0.0.0"), "{e}");
    }

    #[test]
    fn metadata_limits() {
        let mut m = HashMap::new();
        m.insert("version".to_string(), "1.2".to_string());
        metadata("metadata", &m).unwrap();
        m.insert("k=v".to_string(), String::new());
        assert!(metadata("metadata", &m).is_err());
        let big: HashMap<_, _> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(
            metadata("metadata", &big)
                .unwrap_err()
                .to_string()
                .contains("64")
        );
        let mut v = HashMap::new();
        v.insert("k".to_string(), "x".repeat(1025));
        assert!(
            metadata("metadata", &v)
                .unwrap_err()
                .to_string()
                .contains("1024")
        );
    }

    #[test]
    fn ttl_bounds() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(3600));
        assert!(matches!(ttl(0, min, max), Err(Error::InvalidArgument(_))));
        assert!(matches!(ttl(999, min, max), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            ttl(3_600_001, min, max),
            Err(Error::OutOfRange(_))
        ));
        assert_eq!(ttl(1000, min, max).unwrap(), min);
        let msg = ttl(0, min, max).unwrap_err().to_string();
        assert!(msg.contains("below the minimum 1s"), "{msg}");
    }
}
