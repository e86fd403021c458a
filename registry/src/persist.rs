//! Optional catalog snapshot on disk (`--data-dir`), so a restarted registry
//! answers with the previous catalog at once instead of being empty until
//! every service has re-registered (at most one heartbeat interval with
//! client-lib, but callers without a last known good list see nothing
//! meanwhile).
//!
//! What is saved: every instance and every lease (id, TTL, owner), plus the
//! lease epoch. What is restored: the same, with every lease given a fresh
//! TTL from the restart, as etcd does with its leases after a leader change.
//! A service that died while the registry was down therefore disappears one
//! TTL after the restart, and one that lives on keeps renewing the very
//! lease it had: the restored registry reports the previous life's
//! `lease_epoch`, so clients do not re-register. Revisions, on the other
//! hand, start a new epoch: the events between the last snapshot and the
//! crash are lost, so a watcher of the previous life gets a reset snapshot,
//! never a replay with a hole in it.
//!
//! The snapshot is periodic, not a write-ahead log: a crash loses the
//! changes of the last `snapshot_interval` (they come back when those
//! services re-register, which client-lib does on the first `NOT_FOUND`).
//! Writing walks the catalog one service lock at a time, copying each
//! instance's stored encoding as is (no decoding, no write lock), then
//! writes a temporary file, fsyncs it and renames it over the previous
//! snapshot, so a crash mid-write leaves the previous snapshot intact.
//!
//! File layout: `REGSNAP\x01`, CRC-32 of the payload (u32 LE), payload
//! length (u64 LE), payload (the protobuf `SnapshotFile` below). A file that
//! fails these checks is moved aside to `catalog.snap.corrupt` and the
//! registry starts empty (services re-register), rather than refusing to
//! start or serving half a catalog.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use prost::Message;
use registry_api::v1::Instance;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    core::Registry,
    error::{Error, Result},
    lease::Lease,
    validate,
};

/// Name of the snapshot in the data directory.
pub const SNAPSHOT_FILE: &str = "catalog.snap";
/// Where a snapshot that failed its checks is moved at start.
pub const CORRUPT_FILE: &str = "catalog.snap.corrupt";
const TEMP_FILE: &str = "catalog.snap.tmp";
const MAGIC: &[u8; 8] = b"REGSNAP\x01";
const HEADER_LEN: usize = MAGIC.len() + 4 + 8;
/// Field number of `SnapshotFile.instances`, written by
/// [`crate::catalog::Catalog::encode_all`] straight from the stored bytes.
const INSTANCES_TAG: u32 = 5;

/// The snapshot payload. Instances are kept as bytes when read, so each is
/// decoded once, straight into the catalog.
#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotFile {
    /// Catalog revision the snapshot reflects (at least).
    #[prost(uint64, tag = "1")]
    revision: u64,
    /// The server life the lease ids belong to.
    #[prost(uint64, tag = "2")]
    lease_epoch: u64,
    /// When it was written, Unix ms (for logs).
    #[prost(uint64, tag = "3")]
    written_unix_ms: u64,
    /// Every lease.
    #[prost(message, repeated, tag = "4")]
    leases: Vec<LeaseRecord>,
    /// Every instance, an encoded `registry.v1.Instance` each.
    #[prost(bytes = "bytes", repeated, tag = "5")]
    instances: Vec<Bytes>,
}

/// One lease of the snapshot.
#[derive(Clone, PartialEq, prost::Message)]
struct LeaseRecord {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(uint64, tag = "2")]
    ttl_ms: u64,
    /// Identity that created it (auth on), so only it may renew it still.
    #[prost(string, optional, tag = "3")]
    owner: Option<String>,
}

/// What one snapshot write saved.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// Instances saved.
    pub instances: usize,
    /// Leases saved.
    pub leases: usize,
    /// Size of the file.
    pub bytes: u64,
    /// Revision it reflects.
    pub revision: u64,
}

/// What a start restored from the data directory.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// The lease epoch of the snapshot, which the registry reports from now
    /// on so that clients keep their leases.
    pub lease_epoch: u64,
    /// Leases restored (with a fresh TTL).
    pub leases: usize,
    /// Instances restored.
    pub instances: usize,
    /// Instances or leases left out: over a configured cap, under a lease
    /// that was not saved, or not valid any more.
    pub dropped: usize,
    /// Revision of the snapshot.
    pub revision: u64,
}

/// Saves the registry's catalog and leases in `dir`, atomically replacing
/// the previous snapshot. Blocking (file I/O): call it off the runtime.
pub fn write(registry: &Registry, dir: &Path) -> Result<Written> {
    let io = |what: &str, path: &Path, e: std::io::Error| {
        Error::DataDir(format!("{what} {}: {e}", path.display()))
    };
    let mut payload =
        Vec::with_capacity(registry.catalog().stats.instances.load(Ordering::Relaxed) * 128 + 64);
    // Instances first, then leases: a lease revoked during the walk is then
    // missing from the file, and its instances are dropped on restore, as
    // they were in the registry.
    let (instances, revision) = registry.catalog().encode_all(INSTANCES_TAG, &mut payload);
    let leases: Vec<LeaseRecord> = registry
        .leases()
        .records()
        .into_iter()
        .map(|(id, ttl_ms, owner)| LeaseRecord {
            id,
            ttl_ms,
            owner: owner.map(|o| o.to_string()),
        })
        .collect();
    let head = SnapshotFile {
        revision,
        lease_epoch: registry.lease_epoch(),
        written_unix_ms: unix_ms(),
        leases,
        instances: Vec::new(),
    };
    let lease_count = head.leases.len();
    // Protobuf fields may come in any order; repeated ones concatenate.
    head.encode(&mut payload).expect("a Vec grows as needed");

    let tmp = dir.join(TEMP_FILE);
    let path = dir.join(SNAPSHOT_FILE);
    let mut file = fs::File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    header[12..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    file.write_all(&header)
        .and_then(|_| file.write_all(&payload))
        .and_then(|_| file.sync_all())
        .map_err(|e| io("cannot write", &tmp, e))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(|e| io("cannot rename to", &path, e))?;
    // The rename itself is durable only once the directory is synced.
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Written {
        instances,
        leases: lease_count,
        bytes: (HEADER_LEN + payload.len()) as u64,
        revision,
    })
}

/// Loads the snapshot in `dir` into a fresh registry, creating `dir` if
/// needed. `Ok(None)` when there is no usable snapshot (first start, or a
/// corrupt file, which is moved aside and logged). Errors only when the
/// directory cannot be used at all: the operator asked for persistence, so
/// running without it silently would be worse than not starting.
pub fn restore(registry: &Registry, dir: &Path) -> Result<Option<Restored>> {
    fs::create_dir_all(dir)
        .map_err(|e| Error::DataDir(format!("cannot create {}: {e}", dir.display())))?;
    // Fail now, not at the first snapshot, if the directory is read-only.
    let probe = dir.join(TEMP_FILE);
    fs::File::create(&probe)
        .and_then(|_| fs::remove_file(&probe))
        .map_err(|e| Error::DataDir(format!("{} is not writable: {e}", dir.display())))?;

    let path = dir.join(SNAPSHOT_FILE);
    let data = match fs::read(&path) {
        Ok(d) => Bytes::from(d),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            info!(dir = %dir.display(), "no catalog snapshot yet; starting empty");
            return Ok(None);
        }
        Err(e) => {
            return Err(Error::DataDir(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    let started = Instant::now();
    let file = match decode(&data) {
        Ok(f) => f,
        Err(why) => {
            let aside = dir.join(CORRUPT_FILE);
            let moved = fs::rename(&path, &aside).is_ok();
            error!(
                file = %path.display(),
                moved_to = %aside.display(),
                moved,
                why,
                "catalog snapshot unusable; starting empty (services re-register on their next heartbeat)"
            );
            return Ok(None);
        }
    };
    let restored = apply(registry, file)?;
    let m = registry.metrics();
    m.restored_instances
        .store(restored.instances as u64, Ordering::Relaxed);
    m.restored_leases
        .store(restored.leases as u64, Ordering::Relaxed);
    info!(
        instances = restored.instances,
        leases = restored.leases,
        dropped = restored.dropped,
        revision = restored.revision,
        took = ?started.elapsed(),
        "catalog restored from snapshot; leases renewed for one TTL"
    );
    Ok(Some(restored))
}

/// Checks the header and decodes the payload.
fn decode(data: &Bytes) -> std::result::Result<SnapshotFile, String> {
    if data.len() < HEADER_LEN || &data[..8] != MAGIC {
        return Err("not a registry snapshot (bad magic or too short)".into());
    }
    let crc = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(data[12..HEADER_LEN].try_into().expect("8 bytes"));
    let payload = data.slice(HEADER_LEN..);
    if payload.len() as u64 != len {
        return Err(format!(
            "truncated: payload is {} bytes, the header says {len}",
            payload.len()
        ));
    }
    if crc32fast::hash(&payload) != crc {
        return Err("checksum mismatch".into());
    }
    SnapshotFile::decode(payload).map_err(|e| format!("cannot decode: {e}"))
}

/// Puts a decoded snapshot into the registry, within its configured caps.
fn apply(registry: &Registry, file: SnapshotFile) -> Result<Restored> {
    let config = registry.config();
    let table = registry.leases();
    let mut dropped = 0;
    let mut leases: HashMap<u64, (Arc<Lease>, usize)> = HashMap::with_capacity(file.leases.len());
    for record in file.leases {
        // A TTL outside the bounds configured now is brought within them.
        let ttl =
            std::time::Duration::from_millis(record.ttl_ms).clamp(config.min_ttl, config.max_ttl);
        if leases.len() >= config.max_leases {
            dropped += 1;
            continue;
        }
        match table.restore(record.id, ttl, record.owner.map(Into::into)) {
            Some(lease) => {
                leases.insert(record.id, (lease, 0));
            }
            None => dropped += 1,
        }
    }
    let mut per_service: HashMap<String, usize> = HashMap::new();
    let mut total = 0usize;
    let instances = file.instances.into_iter().filter_map(|bytes| {
        let Ok(instance) = Instance::decode(bytes) else {
            dropped += 1;
            return None;
        };
        let valid = validate::service_name("service", &instance.service).is_ok()
            && validate::instance_id("id", &instance.id).is_ok()
            && validate::address("address", &instance.address).is_ok();
        let Some((_, on_lease)) = leases.get_mut(&instance.lease_id).filter(|_| valid) else {
            dropped += 1;
            return None;
        };
        let services = per_service.len();
        let in_service = match per_service.get_mut(&instance.service) {
            Some(n) => n,
            None if services < config.max_services => {
                per_service.entry(instance.service.clone()).or_default()
            }
            None => {
                dropped += 1;
                return None;
            }
        };
        if total >= config.max_instances
            || *in_service >= config.max_instances_per_service
            || *on_lease >= config.max_instances_per_lease
        {
            dropped += 1;
            return None;
        }
        *in_service += 1;
        *on_lease += 1;
        total += 1;
        Some(instance)
    });
    // Keys are attached to their leases afterwards: the filter above holds
    // the lease map.
    let mut attach = Vec::new();
    let restored = registry
        .catalog()
        .restore(file.revision, instances, |key, lease_id| {
            attach.push((key, lease_id))
        })?;
    for (key, lease_id) in attach {
        if let Some((lease, _)) = leases.get(&lease_id) {
            lease.instances.lock().push(key);
        }
    }
    Ok(Restored {
        lease_epoch: if file.lease_epoch == 0 {
            registry.epoch()
        } else {
            file.lease_epoch
        },
        leases: leases.len(),
        instances: restored,
        dropped,
        revision: registry.catalog().revision(),
    })
}

/// Rewrites the snapshot every `snapshot_interval` while anything changed
/// (catalog revision or lease count; renewals change nothing saved), and
/// once more when `stop` is cancelled: the server cancels it after draining,
/// so the final snapshot has every call that completed.
pub fn spawn(registry: Registry, dir: PathBuf, stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let interval = registry.config().snapshot_interval;
        let mut saved = None;
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(interval) => false,
            };
            let mark = (registry.catalog().revision(), registry.leases().len());
            if saved != Some(mark) {
                let (r, d) = (registry.clone(), dir.clone());
                let started = Instant::now();
                let result = tokio::task::spawn_blocking(move || write(&r, &d))
                    .await
                    .unwrap_or_else(|e| Err(Error::DataDir(format!("snapshot task failed: {e}"))));
                let m = registry.metrics();
                match result {
                    Ok(w) => {
                        saved = Some(mark);
                        m.snapshots_written.fetch_add(1, Ordering::Relaxed);
                        m.snapshot_bytes.store(w.bytes, Ordering::Relaxed);
                        m.snapshot_unix_ms.store(unix_ms(), Ordering::Relaxed);
                        m.snapshot_duration_us
                            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                        debug!(
                            instances = w.instances,
                            leases = w.leases,
                            bytes = w.bytes,
                            revision = w.revision,
                            took = ?started.elapsed(),
                            "catalog snapshot written"
                        );
                    }
                    Err(e) => {
                        m.snapshot_failures.fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, "catalog snapshot failed; the previous one stays in place");
                    }
                }
            }
            if stopping {
                return;
            }
        }
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use registry_api::v1::{Instance, RegisterRequest};

    use super::*;
    use crate::config::Config;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "registry-persist-{name}-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn config(dir: &TempDir) -> Config {
        Config {
            data_dir: Some(dir.0.clone()),
            ..Config::default()
        }
    }

    fn register(r: &Registry, service: &str, id: &str, ttl_ms: u64, lease_id: u64) -> u64 {
        r.register(RegisterRequest {
            instance: Some(Instance {
                service: service.into(),
                id: id.into(),
                address: format!("10.0.0.1:{}", 8000 + id.len()),
                metadata: HashMap::from([("version".into(), "v2".into())]),
                ..Default::default()
            }),
            ttl_ms,
            lease_id,
        })
        .unwrap()
        .lease_id
    }

    fn ids(r: &Registry, service: &str) -> Vec<(String, String, u64)> {
        r.resolve(service, &HashMap::new(), false)
            .unwrap()
            .instances
            .into_iter()
            .map(|i| (i.id, i.address, i.lease_id))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn restart_restores_instances_and_leases_with_a_fresh_ttl() {
        let dir = TempDir::new("roundtrip");
        let before = Registry::open(config(&dir)).unwrap();
        let shared = register(&before, "prod", "a", 3000, 0);
        register(&before, "prod", "bb", 0, shared);
        let own = register(&before, "cart", "c", 10_000, 0);
        let expiring = register(&before, "gone", "g", 1000, 0);
        before.deregister_lease(expiring).unwrap();
        let written = write(&before, &dir.0).unwrap();
        assert_eq!((written.instances, written.leases), (3, 2));
        let revision = before.catalog().revision();

        // Time passes while the registry is down: longer than the TTLs.
        tokio::time::advance(Duration::from_secs(60)).await;
        let after = Registry::open(config(&dir)).unwrap();
        assert_eq!(ids(&after, "prod"), ids(&before, "prod"));
        assert_eq!(ids(&after, "cart"), ids(&before, "cart"));
        assert!(
            after
                .resolve("gone", &HashMap::new(), false)
                .unwrap()
                .instances
                .is_empty(),
            "revoked before the snapshot"
        );
        assert_eq!(
            after.catalog().revision(),
            revision,
            "revisions go on from the snapshot"
        );
        assert_eq!(
            after.lease_epoch(),
            before.lease_epoch(),
            "leases of the previous life stay valid"
        );
        assert_eq!(after.server_info().lease_epoch, before.epoch());
        assert_eq!(
            after.metrics().restored_instances.load(Ordering::Relaxed),
            3
        );

        // Each lease got a fresh TTL from the restart: renewable now, and a
        // new register may attach to it.
        assert_eq!(after.heartbeat(&[shared, own]).unwrap().len(), 2);
        assert!(after.heartbeat(&[shared]).unwrap()[0].found);
        register(&after, "prod", "ccc", 0, shared);
        assert!(
            register(&after, "x", "1", 5000, 0) > own.max(shared),
            "new ids above restored ones"
        );

        // Nobody renews `own`: it expires one TTL after the restart, not before.
        tokio::time::advance(Duration::from_millis(9_900)).await;
        after.expire_due(100);
        assert_eq!(ids(&after, "cart").len(), 1);
        tokio::time::advance(Duration::from_millis(200)).await;
        after.expire_due(100);
        assert!(ids(&after, "cart").is_empty());
    }

    #[tokio::test]
    async fn an_old_life_watcher_gets_a_reset_snapshot() {
        let dir = TempDir::new("watch");
        let before = Registry::open(config(&dir)).unwrap();
        register(&before, "prod", "a", 5000, 0);
        write(&before, &dir.0).unwrap();
        let revision = before.catalog().revision();
        let after = Registry::open(config(&dir)).unwrap();
        let (_, start) = after
            .catalog()
            .watch(crate::catalog::WatchFilter::default(), revision, true, None)
            .unwrap();
        match start {
            crate::catalog::WatchStart::Snapshot {
                instances, reset, ..
            } => {
                assert_eq!(instances.len(), 1);
                assert!(reset.is_some(), "history before the snapshot is gone");
            }
            crate::catalog::WatchStart::Replay(_) => panic!("replayed across a restart"),
        }
    }

    #[tokio::test]
    async fn a_corrupt_snapshot_is_moved_aside_and_the_registry_starts_empty() {
        let dir = TempDir::new("corrupt");
        let before = Registry::open(config(&dir)).unwrap();
        register(&before, "prod", "a", 5000, 0);
        write(&before, &dir.0).unwrap();
        let path = dir.0.join(SNAPSHOT_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let after = Registry::open(config(&dir)).unwrap();
        assert!(ids(&after, "prod").is_empty());
        assert!(!path.exists());
        assert!(dir.0.join(CORRUPT_FILE).exists());
        assert_eq!(after.lease_epoch(), after.epoch());

        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(
            ids(&Registry::open(config(&dir)).unwrap(), "prod").is_empty(),
            "truncated"
        );
        fs::write(&path, b"hello").unwrap();
        assert!(
            ids(&Registry::open(config(&dir)).unwrap(), "prod").is_empty(),
            "not a snapshot"
        );
    }

    #[tokio::test]
    async fn restore_keeps_within_the_configured_caps() {
        let dir = TempDir::new("caps");
        let before = Registry::open(config(&dir)).unwrap();
        let lease = register(&before, "prod", "0", 5000, 0);
        for i in 1..5 {
            register(&before, "prod", &i.to_string(), 0, lease);
        }
        write(&before, &dir.0).unwrap();
        let after = Registry::open(Config {
            max_instances_per_service: 3,
            ..config(&dir)
        })
        .unwrap();
        assert_eq!(ids(&after, "prod").len(), 3);
        assert_eq!(after.leases().get(lease).unwrap().instance_count(), 3);
        assert_eq!(after.status().instances, 3);
    }

    #[test]
    fn an_unusable_data_dir_refuses_to_start() {
        let dir = TempDir::new("file");
        fs::write(&dir.0, b"a file, not a directory").unwrap();
        let err = Registry::open(config(&dir)).unwrap_err();
        assert!(err.to_string().contains("data dir"), "{err}");
        let _ = fs::remove_file(&dir.0);
    }
}
