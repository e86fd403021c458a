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

#[cfg(test)]
mod tests {
    use super::*;

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
