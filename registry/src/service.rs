//! gRPC adapter: implements `registry.v1.Registry` over a [`Registry`]
//! handle. Each method validates its transport-level input, calls the
//! handle, and maps domain errors to status codes; no state lives here.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use registry_api::v1::{
    DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse,
    ListServicesRequest, ListServicesResponse, RegisterRequest, RegisterResponse,
    ResolveRequest, ResolveResponse, StatusRequest, StatusResponse, WatchRequest, WatchResponse,
    deregister_request::Target, registry_server,
};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    catalog::WatchFilter,
    core::Registry,
    error::Error,
    validate,
    watch::{self, MIN_PROGRESS_INTERVAL},
};

/// Boxed response stream, as tonic's generated trait wants.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The `registry.v1.Registry` service.
#[derive(Debug, Clone)]
pub struct RegistryService {
    registry: Registry,
}

impl RegistryService {
    /// Serves the given registry.
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }
}

#[tonic::async_trait]
impl registry_server::Registry for RegistryService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(self.registry.register(request.into_inner())?))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let ids = request.into_inner().lease_ids;
        let leases = self.registry.heartbeat(&ids)?;
        if let [only] = leases.as_slice()
            && !only.found
        {
            return Err(Error::NotFound(format!(
                "lease {} not found: it expired or was revoked; register again",
                only.lease_id
            ))
            .into());
        }
        Ok(Response::new(HeartbeatResponse {
            leases,
            server: Some(self.registry.server_info()),
        }))
    }

    type KeepAliveStream = BoxStream<HeartbeatResponse>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<HeartbeatRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let registry = self.registry.clone();
        let shutdown = registry.shutdown_token().clone();
        let inbound = request.into_inner();
        let out = inbound
            .take_until(shutdown.cancelled_owned())
            .map(move |req| {
                let req = req?;
                let leases = registry.heartbeat(&req.lease_ids)?;
                Ok(HeartbeatResponse {
                    leases,
                    server: Some(registry.server_info()),
                })
            });
        Ok(Response::new(Box::pin(out)))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let (revision, removed) = match request.into_inner().target {
            Some(Target::LeaseId(id)) => self.registry.deregister_lease(id)?,
            Some(Target::Instance(key)) => {
                self.registry.deregister_instance(&key.service, &key.id)?
            }
            None => {
                return Err(Status::invalid_argument(
                    "target is required: set lease_id or instance",
                ));
            }
        };
        Ok(Response::new(DeregisterResponse { revision, removed }))
    }

    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.registry.resolve(
            &req.service,
            &req.selector,
            req.include_lease_ttl,
        )?))
    }

    async fn list_services(
        &self,
        _request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        Ok(Response::new(self.registry.list_services()))
    }

    type WatchStream = BoxStream<WatchResponse>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let conn = request.remote_addr();
        let req = request.into_inner();
        let service: Option<Arc<str>> = if req.service.is_empty() {
            None
        } else {
            validate::service_name("service", &req.service)?;
            Some(req.service.as_str().into())
        };
        validate::metadata("selector", &req.selector)?;
        let mut selector: Vec<_> = req.selector.into_iter().collect();
        selector.sort();
        let progress = match req.progress_interval_ms {
            0 => self.registry.config().watch_progress_interval,
            ms => Duration::from_millis(ms).max(MIN_PROGRESS_INTERVAL),
        };
        let filter = WatchFilter { service, selector };
        let (handle, start) =
            self.registry
                .watch(filter, req.start_revision, req.epoch, conn)?;
        Ok(Response::new(Box::pin(watch::stream(
            self.registry.clone(),
            handle,
            start,
            progress,
        ))))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.registry.status()))
    }
}
