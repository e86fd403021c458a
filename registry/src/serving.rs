//! Which instances callers are sent to: the *served set* of a service.
//!
//! An instance is **serving** when it is `ACTIVE` (not draining, not in
//! maintenance) and its health is `PASSING` or `WARNING`. By default
//! Resolve, Watch, xDS, DNS and the HTTP API answer the serving instances
//! only. One exception keeps a bad check from emptying a service, as
//! Envoy's `healthy_panic_threshold` and Nacos' protect threshold do: when
//! fewer than the service's **panic threshold** (default 50%) of its
//! `ACTIVE` instances are serving, the service is in **panic mode** and
//! every `ACTIVE` instance is served, `CRITICAL` ones included. Draining and
//! disabled instances are never served: that is someone's explicit intent,
//! not a guess from a check.
//!
//! The served set is therefore a function of a whole service at one
//! revision. The catalog keeps per-service counts ([`Counts`]) so a commit
//! knows whether it moved a service in or out of panic mode, and marks
//! every event with whether its instance was served before and after (see
//! `catalog::CatalogEvent`); `watch` turns that into the events of a
//! serving-only watcher.
//!
//! Instances rest encoded in the catalog, so [`class_of_encoded`] reads the
//! two fields that decide an instance's class straight from its protobuf
//! encoding, without decoding (or allocating) the rest.

use std::{collections::HashMap, sync::Arc};

use prost::encoding::{WireType, decode_key, decode_varint};
use registry_api::v1::{AdminState, HealthState, Instance};

/// Default panic threshold, in percent of a service's `ACTIVE` instances:
/// Envoy's default `healthy_panic_threshold`. Below half healthy, the
/// healthy half would get the whole load and likely fall over too, and a
/// check that fails everywhere at once is more likely broken than the
/// service.
pub const DEFAULT_PANIC_THRESHOLD: f64 = 50.0;

/// Field number of `Instance.health`.
const HEALTH_FIELD: u32 = 9;
/// Field number of `Instance.admin_state`.
const ADMIN_FIELD: u32 = 11;

/// How an instance counts towards its service's served set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `ACTIVE` and `PASSING` or `WARNING`: served.
    Serving,
    /// `ACTIVE` but `CRITICAL`: served only while the service panics.
    Critical,
    /// `DRAINING` or `DISABLED`: never served by default.
    Inactive,
}

impl Class {
    /// From the two states.
    pub fn of(health: i32, admin: i32) -> Self {
        if admin != AdminState::Active as i32 {
            Class::Inactive
        } else if health == HealthState::Critical as i32 {
            Class::Critical
        } else {
            Class::Serving
        }
    }

    /// Whether an instance of this class is served when its service is
    /// (`panicked`) or is not in panic mode.
    pub fn served(self, panicked: bool) -> bool {
        match self {
            Class::Serving => true,
            Class::Critical => panicked,
            Class::Inactive => false,
        }
    }
}

/// The class of a decoded instance.
pub fn class_of(instance: &Instance) -> Class {
    Class::of(instance.health, instance.admin_state)
}

/// The class of an encoded instance, read from its `health` and
/// `admin_state` fields only (absent fields are `PASSING` / `ACTIVE`, the
/// zero values). Encodings the catalog made are well formed; anything
/// unreadable counts as serving, the state of an instance without checks.
pub fn class_of_encoded(mut buf: &[u8]) -> Class {
    let (mut health, mut admin) = (0i32, 0i32);
    while !buf.is_empty() {
        let Ok((tag, wire)) = decode_key(&mut buf) else {
            break;
        };
        match (tag, wire) {
            (HEALTH_FIELD | ADMIN_FIELD, WireType::Varint) => {
                let Ok(v) = decode_varint(&mut buf) else {
                    break;
                };
                if tag == HEALTH_FIELD {
                    health = v as i32;
                } else {
                    admin = v as i32;
                }
            }
            (_, WireType::Varint) => {
                if decode_varint(&mut buf).is_err() {
                    break;
                }
            }
            (_, WireType::LengthDelimited) => {
                let Ok(len) = decode_varint(&mut buf) else {
                    break;
                };
                let Some(rest) = buf.get(len as usize..) else {
                    break;
                };
                buf = rest;
            }
            (_, WireType::SixtyFourBit) => match buf.get(8..) {
                Some(rest) => buf = rest,
                None => break,
            },
            (_, WireType::ThirtyTwoBit) => match buf.get(4..) {
                Some(rest) => buf = rest,
                None => break,
            },
            _ => break,
        }
    }
    Class::of(health, admin)
}

/// A service's panic threshold: served-all below this percentage of
/// serving `ACTIVE` instances.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold(f64);

impl Threshold {
    /// A threshold of `percent` (clamped to 0..=100). 0 never panics; 100
    /// panics as soon as one `ACTIVE` instance is not serving.
    pub fn percent(percent: f64) -> Self {
        Self(if percent.is_nan() {
            0.0
        } else {
            percent.clamp(0.0, 100.0)
        })
    }

    /// The percentage.
    pub fn value(self) -> f64 {
        self.0
    }

    /// Whether a service with these counts is in panic mode.
    pub fn panicked(self, counts: Counts) -> bool {
        counts.active > 0 && (counts.serving as f64) * 100.0 < self.0 * counts.active as f64
    }
}

impl Default for Threshold {
    fn default() -> Self {
        Self(DEFAULT_PANIC_THRESHOLD)
    }
}

/// Panic thresholds: one default and per-service overrides
/// (`--panic-threshold`, `--service-panic-threshold prod=30`). Fixed for
/// the life of the registry, so the served set at a revision is a function
/// of the catalog at that revision alone.
#[derive(Debug, Clone, Default)]
pub struct PanicThresholds {
    default: Threshold,
    services: Arc<HashMap<String, Threshold>>,
}

impl PanicThresholds {
    /// Every service at `percent`.
    pub fn new(percent: f64) -> Self {
        Self {
            default: Threshold::percent(percent),
            services: Arc::default(),
        }
    }

    /// Overrides the threshold of one service.
    pub fn with_service(mut self, service: impl Into<String>, percent: f64) -> Self {
        Arc::make_mut(&mut self.services).insert(service.into(), Threshold::percent(percent));
        self
    }

    /// The default threshold.
    pub fn default_threshold(&self) -> Threshold {
        self.default
    }

    /// The threshold of `service`.
    pub fn for_service(&self, service: &str) -> Threshold {
        self.services.get(service).copied().unwrap_or(self.default)
    }

    /// The per-service overrides, for logs and docs.
    pub fn overrides(&self) -> impl Iterator<Item = (&str, Threshold)> {
        self.services.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// The counts panic mode is decided on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// `ACTIVE` instances (serving or critical).
    pub active: usize,
    /// Serving instances.
    pub serving: usize,
}

impl Counts {
    /// Counts one more instance of `class`.
    pub fn add(&mut self, class: Class) {
        match class {
            Class::Serving => {
                self.active += 1;
                self.serving += 1;
            }
            Class::Critical => self.active += 1,
            Class::Inactive => {}
        }
    }

    /// Counts one instance of `class` less.
    pub fn remove(&mut self, class: Class) {
        match class {
            Class::Serving => {
                self.active = self.active.saturating_sub(1);
                self.serving = self.serving.saturating_sub(1);
            }
            Class::Critical => self.active = self.active.saturating_sub(1),
            Class::Inactive => {}
        }
    }
}

/// The served set of one service's instance list (in the list's order).
#[derive(Debug, Clone)]
pub struct Served {
    panicked: bool,
    /// `None`: every instance is served.
    mask: Option<Vec<bool>>,
}

impl Served {
    /// Every instance served (all of them serving: the common case, no
    /// scan needed).
    pub fn all() -> Self {
        Self {
            panicked: false,
            mask: None,
        }
    }

    /// The served set of instances of these classes, in order.
    pub fn compute(classes: impl IntoIterator<Item = Class>, threshold: Threshold) -> Self {
        let classes: Vec<Class> = classes.into_iter().collect();
        let mut counts = Counts::default();
        for c in &classes {
            counts.add(*c);
        }
        let panicked = threshold.panicked(counts);
        let mask: Vec<bool> = classes.iter().map(|c| c.served(panicked)).collect();
        Self {
            panicked,
            mask: (!mask.iter().all(|m| *m)).then_some(mask),
        }
    }

    /// The served set of encoded instances.
    pub fn of_encoded<'a>(
        encoded: impl IntoIterator<Item = &'a [u8]>,
        threshold: Threshold,
    ) -> Self {
        Self::compute(encoded.into_iter().map(class_of_encoded), threshold)
    }

    /// Whether the service is in panic mode.
    pub fn panicked(&self) -> bool {
        self.panicked
    }

    /// Whether the `i`th instance is served.
    pub fn includes(&self, i: usize) -> bool {
        self.mask
            .as_ref()
            .is_none_or(|m| m.get(i).copied().unwrap_or(false))
    }

    /// Whether every instance is served.
    pub fn is_all(&self) -> bool {
        self.mask.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn inst(health: HealthState, admin: AdminState) -> Instance {
        Instance {
            service: "prod".into(),
            id: "prod-1".into(),
            address: "10.0.0.1:80".into(),
            metadata: [("version".to_owned(), "1".to_owned())].into(),
            weight: 3,
            lease_id: 77,
            revision: 9,
            health: health as i32,
            last_check: Some(Box::new(registry_api::v1::CheckResult {
                unix_ms: 1_700_000_000_000,
                output: "HTTP 200".into(),
            })),
            admin_state: admin as i32,
            admin_reason: "deploy".into(),
            check: Some(Box::new(registry_api::v1::HealthCheck {
                interval_ms: 1000,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn the_encoded_class_equals_the_decoded_one() {
        for h in [
            HealthState::Passing,
            HealthState::Warning,
            HealthState::Critical,
        ] {
            for a in [
                AdminState::Active,
                AdminState::Draining,
                AdminState::Disabled,
            ] {
                let i = inst(h, a);
                assert_eq!(
                    class_of_encoded(&i.encode_to_vec()),
                    class_of(&i),
                    "{h:?} {a:?}"
                );
            }
        }
        assert_eq!(class_of_encoded(&[]), Class::Serving);
        assert_eq!(class_of_encoded(&[0xff, 0xff]), Class::Serving);
    }

    #[test]
    fn panic_below_the_threshold_of_active_instances() {
        use Class::*;
        let t = Threshold::default();
        // 3 of 4 critical: 25% serving < 50%: everyone active is served.
        let s = Served::compute([Serving, Critical, Critical, Critical], t);
        assert!(s.panicked());
        assert!(s.is_all());
        // 2 of 4: exactly 50% is not below it.
        let s = Served::compute([Serving, Serving, Critical, Critical], t);
        assert!(!s.panicked());
        assert_eq!(
            (0..4).map(|i| s.includes(i)).collect::<Vec<_>>(),
            [true, true, false, false]
        );
        // Draining instances never count and are never served.
        let s = Served::compute([Serving, Inactive, Inactive, Critical], t);
        assert!(!s.panicked(), "1 of 2 active serving");
        assert!(!s.includes(1) && !s.includes(3));
        let s = Served::compute([Critical, Inactive], t);
        assert!(s.panicked());
        assert!(s.includes(0) && !s.includes(1));
        // Threshold 0 never panics; nothing active never panics.
        assert!(!Served::compute([Critical], Threshold::percent(0.0)).panicked());
        assert!(!Served::compute([Inactive], t).panicked());
        assert!(Served::compute([Serving, Critical], Threshold::percent(100.0)).panicked());
    }
}
