//! Load-balanced tonic channels that follow a [`Resolver`].

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use tokio::sync::mpsc::Sender;
use tonic::transport::{Channel, Endpoint, channel::Change};

use crate::{Instance, RegistryClient, Resolver};

/// Pending endpoint changes between the driver task and tonic's balancer.
/// Changes are tiny and applied immediately; 64 absorbs a whole fleet
/// appearing at once without blocking the driver.
const CHANGE_BUFFER: usize = 64;
/// Dialing an instance that just died fails fast; one that drops packets
/// should not hold a request for long either.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Balancer key: a re-registration of the same id at a new address is a
/// different endpoint (remove the old connection, dial the new one).
type Key = (String, String);

/// A [`Channel`] that spreads calls over the live instances of `service`
/// (power-of-two-choices, by in-flight requests) and follows the registry
/// as instances come and go. Callers never see an address:
///
/// ```no_run
/// # async fn f(client: registry_client::RegistryClient) {
/// use registry_api::prod::prod_service_client::ProdServiceClient;
/// let channel = registry_client::balanced_channel(&client, "prod");
/// let mut prod = ProdServiceClient::new(channel);
/// # }
/// ```
///
/// Behaviour worth knowing:
/// - While the service has no instance, calls wait for one to appear, so
///   put a deadline on them (`tonic::Request::set_timeout` or
///   `tokio::time::timeout`).
/// - Instance weights are not honoured: tonic's balancer is unweighted.
/// - Lifetime: a background task feeds the balancer from a [`Resolver`]. It
///   stops when every clone of the returned channel has been dropped, and
///   then drops its resolver (whose watch stops too unless shared).
///
/// Must be called inside a tokio runtime.
pub fn balanced_channel(client: &RegistryClient, service: &str) -> Channel {
    balanced_channel_from(client.resolver(service))
}

/// Like [`balanced_channel`], over an existing resolver (e.g. one with a
/// selector, or shared with other consumers).
pub fn balanced_channel_from(resolver: Resolver) -> Channel {
    balanced_channel_with(resolver, |endpoint| endpoint)
}

/// Like [`balanced_channel_from`], letting `configure` adjust every
/// instance's [`Endpoint`] (TLS, timeouts, window sizes...) before it is
/// dialed. Addresses are dialed as `http://{address}` unless `configure`
/// changes that.
pub fn balanced_channel_with<F>(resolver: Resolver, configure: F) -> Channel
where
    F: Fn(Endpoint) -> Endpoint + Send + 'static,
{
    let (channel, changes) = Channel::balance_channel::<Key>(CHANGE_BUFFER);
    tokio::spawn(drive(resolver, changes, configure));
    channel
}

/// Mirrors the resolver's instances into the balancer until the channel is
/// gone.
async fn drive<F>(resolver: Resolver, changes: Sender<Change<Key, Endpoint>>, configure: F)
where
    F: Fn(Endpoint) -> Endpoint,
{
    let service = resolver.service().to_owned();
    let mut rx = resolver.subscribe();
    drop(resolver);
    let mut current: HashSet<Key> = HashSet::new();
    loop {
        let instances = rx.borrow_and_update().instances.clone();
        let wanted: HashMap<Key, &Instance> = instances
            .iter()
            .map(|i| ((i.id.clone(), i.address.clone()), i))
            .collect();
        let gone: Vec<Key> = current
            .iter()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            current.remove(&key);
            tracing::debug!(%service, id = %key.0, address = %key.1, "balancer: remove");
            if changes.send(Change::Remove(key)).await.is_err() {
                return;
            }
        }
        for (key, instance) in wanted {
            if current.contains(&key) {
                continue;
            }
            let endpoint = match Endpoint::from_shared(format!("http://{}", instance.address)) {
                Ok(e) => configure(e.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true)),
                Err(e) => {
                    tracing::warn!(%service, id = %instance.id, address = %instance.address,
                        error = %e, "balancer: instance address is not dialable; skipped");
                    continue;
                }
            };
            tracing::debug!(%service, id = %key.0, address = %key.1, "balancer: insert");
            if changes
                .send(Change::Insert(key.clone(), endpoint))
                .await
                .is_err()
            {
                return;
            }
            current.insert(key);
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = changes.closed() => {
                tracing::debug!(%service, "balanced channel dropped; driver finished");
                return;
            }
        }
    }
}
