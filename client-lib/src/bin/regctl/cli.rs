//! `regctl`, the command line for operators and scripts, in the manner of
//! etcdctl and `consul catalog`. The binary only parses [`Cli`] and calls
//! [`run`]; everything here is testable in-process.
//!
//! Output contract: tables go to stdout, aligned; `-o json` prints one JSON
//! object per line (stable field names, see the `Json*` types); diagnostics
//! and logs go to stderr only. Exit codes: [`EXIT_OK`], [`EXIT_ERROR`],
//! [`EXIT_USAGE`] (clap's own), [`EXIT_UNKNOWN_SERVICE`].

use std::{collections::BTreeMap, fmt::Write as _, io::Write, time::Duration};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use registry_api::v1::{
    DeregisterRequest, EventType, Instance, InstanceKey, ListServicesRequest, ResolveRequest,
    Snapshot, StatusRequest, WatchRequest, deregister_request::Target,
    registry_client::RegistryClient, watch_response::Kind,
};
use serde::Serialize;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, ClientTlsConfig, Endpoint},
};

/// Success.
pub(crate) const EXIT_OK: u8 = 0;
/// Any error: unreachable registry, rejected request, unknown lease.
pub(crate) const EXIT_ERROR: u8 = 1;
/// Bad command line (clap exits with this itself).
pub(crate) const EXIT_USAGE: u8 = 2;
/// `resolve` of a service the registry has never seen, so scripts can branch.
pub(crate) const EXIT_UNKNOWN_SERVICE: u8 = 3;

/// Where regctl looks when neither `--registry` nor `REGISTRY_ADDR` is set.
pub(crate) const DEFAULT_REGISTRY: &str = "http://127.0.0.1:7411";

/// Longest wait between reconnection attempts of `watch`.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Command line of `regctl`.
#[derive(Debug, Parser)]
#[command(
    name = "regctl",
    version,
    about = "Resolve, list, watch and register services in a registry"
)]
pub(crate) struct Cli {
    /// Registry address (several, comma-separated, are tried in order).
    #[arg(long, global = true, env = "REGISTRY_ADDR", default_value = DEFAULT_REGISTRY)]
    pub(crate) registry: String,
    /// Deadline for connecting and for each request (e.g. 500ms, 5s).
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    pub(crate) output: Format,
    /// Bearer token for a registry started with --auth-file.
    #[arg(long, global = true, env = "REGISTRY_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// CA (PEM) the registry's certificate must chain to: connect with TLS.
    #[arg(long, global = true, env = "REGISTRY_CACERT")]
    pub(crate) cacert: Option<String>,
    /// Client certificate (PEM) for mTLS; needs --key.
    #[arg(long, global = true, env = "REGISTRY_CERT", requires = "key")]
    pub(crate) cert: Option<String>,
    /// Client private key (PEM) for mTLS; needs --cert.
    #[arg(long, global = true, env = "REGISTRY_KEY", requires = "cert")]
    pub(crate) key: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON object per line for scripts.
    Json,
}

/// regctl's subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Live instances of a service (exit 3 if the service is unknown).
    Resolve {
        /// Service name.
        service: String,
        /// Only instances with this metadata (repeatable, all must match).
        #[arg(long = "selector", short = 's', value_name = "K=V", value_parser = parse_kv)]
        selector: Vec<(String, String)>,
    },
    /// Services with their instance counts.
    List,
    /// Snapshot, then one line per change until Ctrl-C; survives registry restarts.
    Watch {
        /// Service name; all services when omitted.
        service: Option<String>,
        /// Only instances with this metadata (repeatable, all must match).
        #[arg(long = "selector", short = 's', value_name = "K=V", value_parser = parse_kv)]
        selector: Vec<(String, String)>,
    },
    /// Register an instance and keep it alive until Ctrl-C, then deregister it.
    Register {
        /// Service name.
        service: String,
        /// host:port callers should dial.
        address: String,
        /// Instance id (default: hostname-pid-random).
        #[arg(long)]
        id: Option<String>,
        /// Lease TTL.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Metadata label (repeatable).
        #[arg(long = "meta", short = 'm', value_name = "K=V", value_parser = parse_kv)]
        meta: Vec<(String, String)>,
        /// Load-balancing weight.
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Remove one instance (SERVICE ID), or a lease with all its instances (--lease).
    #[command(group = clap::ArgGroup::new("target").required(true).args(["service", "lease"]))]
    Deregister {
        /// Service name.
        #[arg(requires = "id")]
        service: Option<String>,
        /// Instance id.
        id: Option<String>,
        /// Lease id to revoke.
        #[arg(long, conflicts_with_all = ["service", "id"])]
        lease: Option<u64>,
    },
    /// Registry address, health, version, uptime and sizes.
    Status,
    /// Print a shell completion script.
    Completions {
        /// Shell to generate for.
        shell: clap_complete::Shell,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// A failure with its exit code; the message is printed as `regctl: {msg}`.
#[derive(Debug)]
pub(crate) struct Failure {
    /// Process exit code.
    pub(crate) code: u8,
    /// One line for stderr.
    pub(crate) message: String,
}

impl Failure {
    fn error(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_ERROR,
            message: message.into(),
        }
    }
}

/// Describes a status from the registry the way a person wants to read it:
/// transport failures become "cannot reach registry at ADDR: cause", server
/// refusals pass the server's own message through.
fn status_failure(addr: &str, status: tonic::Status) -> Failure {
    use std::error::Error as _;
    if matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown
    ) && status.source().is_some()
    {
        return Failure::error(format!(
            "cannot reach registry at {addr}: {}",
            root_cause(&status)
        ));
    }
    if status.code() == tonic::Code::DeadlineExceeded || status.code() == tonic::Code::Cancelled {
        return Failure::error(format!(
            "registry at {addr} did not answer in time: {}",
            status.message()
        ));
    }
    Failure::error(status.message().to_string())
}

/// The innermost error in a chain, lower-cased and without "(os error N)",
/// e.g. "connection refused".
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let mut msg = cur.to_string();
    if let Some(i) = msg.find(" (os error") {
        msg.truncate(i);
    }
    let mut chars = msg.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => msg,
    }
}

type Transport = InterceptedService<Channel, registry_client::Credentials>;

struct Ctx {
    addr: String,
    timeout: Duration,
    format: Format,
    bearer: registry_client::Credentials,
    tls: Option<ClientTlsConfig>,
    client_options: registry_client::ClientOptions,
}

impl Ctx {
    /// Connects to the first reachable of the configured addresses.
    async fn connect(&self) -> Result<RegistryClient<Transport>, Failure> {
        Ok(RegistryClient::new(self.channel().await?).max_decoding_message_size(64 << 20))
    }

    /// A channel (with credentials) to the first reachable address.
    async fn channel(&self) -> Result<Transport, Failure> {
        let mut last = None;
        for addr in self
            .addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
        {
            let mut endpoint = Endpoint::from_shared(addr.to_string())
                .map_err(|e| Failure {
                    code: EXIT_USAGE,
                    message: format!("invalid registry address {addr:?}: {e}"),
                })?
                .connect_timeout(self.timeout)
                .timeout(self.timeout);
            if let Some(tls) = &self.tls {
                endpoint = endpoint.tls_config(tls.clone()).map_err(|e| Failure {
                    code: EXIT_USAGE,
                    message: format!("TLS configuration: {e}"),
                })?;
            }
            match endpoint.connect().await {
                Ok(channel) => return Ok(InterceptedService::new(channel, self.bearer.clone())),
                Err(e) => {
                    last = Some(Failure::error(format!(
                        "cannot reach registry at {addr}: {}",
                        root_cause(&e)
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| Failure {
            code: EXIT_USAGE,
            message: "no registry address given".into(),
        }))
    }

    fn status(&self, s: tonic::Status) -> Failure {
        status_failure(&self.addr, s)
    }
}

/// Runs one regctl command, writing results to `out`. Returns the exit code;
/// failures are reported on stderr as one line.
pub(crate) async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> u8 {
    match dispatch(cli, out).await {
        Ok(code) => code,
        Err(f) => {
            eprintln!("regctl: {}", f.message);
            f.code
        }
    }
}

async fn dispatch(cli: Cli, out: &mut (dyn Write + Send)) -> Result<u8, Failure> {
    let usage = |message: String| Failure {
        code: EXIT_USAGE,
        message,
    };
    let bearer = registry_client::Credentials::bearer(cli.token.as_deref())
        .map_err(|_| usage("--token must be printable ASCII".into()))?;
    let tls = match &cli.cacert {
        None => None,
        Some(ca) => Some(
            registry_client::tls_from_files(ca, cli.cert.as_deref(), cli.key.as_deref(), None)
                .map_err(|e| usage(e.to_string()))?,
        ),
    };
    let mut client_options = registry_client::ClientOptions::default();
    if let Some(t) = &cli.token {
        client_options = client_options.with_token(t.clone());
    }
    if let Some(tls) = &tls {
        client_options = client_options.with_tls(tls.clone());
    }
    let ctx = Ctx {
        addr: cli.registry,
        timeout: cli.timeout,
        format: cli.output,
        bearer,
        tls,
        client_options,
    };
    let io = |e: std::io::Error| Failure::error(format!("cannot write output: {e}"));
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "regctl", out);
            Ok(EXIT_OK)
        }
        Command::Resolve { service, selector } => resolve(&ctx, service, selector, out).await,
        Command::List => {
            let mut c = ctx.connect().await?;
            let list = c
                .list_services(ListServicesRequest {})
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            match ctx.format {
                Format::Json => {
                    for s in &list.services {
                        json_line(
                            out,
                            &JsonService {
                                service: &s.name,
                                instances: s.instance_count,
                            },
                        )
                        .map_err(io)?;
                    }
                }
                Format::Table => {
                    let rows = list
                        .services
                        .iter()
                        .map(|s| vec![s.name.clone(), s.instance_count.to_string()])
                        .collect();
                    write!(out, "{}", table(&["SERVICE", "INSTANCES"], rows)).map_err(io)?;
                }
            }
            Ok(EXIT_OK)
        }
        Command::Deregister { service, id, lease } => {
            let target = match (service, id, lease) {
                (_, _, Some(lease)) => Target::LeaseId(lease),
                (Some(service), Some(id), None) => Target::Instance(InstanceKey { service, id }),
                _ => {
                    return Err(Failure {
                        code: EXIT_USAGE,
                        message: "give SERVICE ID, or --lease ID".into(),
                    });
                }
            };
            let mut c = ctx.connect().await?;
            let resp = c
                .deregister(DeregisterRequest {
                    target: Some(target.clone()),
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            let what = match &target {
                Target::LeaseId(id) => format!("lease {id}"),
                Target::Instance(k) => format!("{}/{}", k.service, k.id),
            };
            match ctx.format {
                Format::Json => json_line(
                    out,
                    &JsonDeregistered {
                        deregistered: &what,
                        removed: resp.removed,
                        revision: resp.revision,
                    },
                )
                .map_err(io)?,
                Format::Table => writeln!(
                    out,
                    "deregistered {what}: {} instance(s) removed at revision {}",
                    resp.removed, resp.revision
                )
                .map_err(io)?,
            }
            Ok(EXIT_OK)
        }
        Command::Status => status(&ctx, out).await,
        Command::Watch { service, selector } => watch(&ctx, service, selector, out).await,
        Command::Register {
            service,
            address,
            id,
            ttl,
            meta,
            weight,
        } => register(&ctx, service, address, id, ttl, meta, weight, out).await,
    }
}

async fn resolve(
    ctx: &Ctx,
    service: String,
    selector: Vec<(String, String)>,
    out: &mut (dyn Write + Send),
) -> Result<u8, Failure> {
    let io = |e: std::io::Error| Failure::error(format!("cannot write output: {e}"));
    let mut c = ctx.connect().await?;
    let resp = c
        .resolve(ResolveRequest {
            service: service.clone(),
            selector: selector.into_iter().collect(),
            include_lease_ttl: true,
        })
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner();
    match ctx.format {
        Format::Json => json_line(
            out,
            &JsonResolve {
                service: &service,
                known: resp.service_known,
                revision: resp.revision,
                warming_up: resp.server.is_some_and(|s| s.warming_up),
                instances: resp.instances.iter().map(JsonInstance::from).collect(),
            },
        )
        .map_err(io)?,
        Format::Table if resp.service_known => {
            let rows = resp
                .instances
                .iter()
                .map(|i| {
                    vec![
                        i.id.clone(),
                        i.address.clone(),
                        i.weight.to_string(),
                        format_ttl(i.lease_remaining_ms),
                        format_metadata(&i.metadata),
                    ]
                })
                .collect();
            write!(
                out,
                "{}",
                table(&["ID", "ADDRESS", "WEIGHT", "TTL", "METADATA"], rows)
            )
            .map_err(io)?;
        }
        Format::Table => {}
    }
    if resp.service_known {
        Ok(EXIT_OK)
    } else {
        Err(Failure {
            code: EXIT_UNKNOWN_SERVICE,
            message: format!("unknown service {service:?}"),
        })
    }
}

async fn status(ctx: &Ctx, out: &mut (dyn Write + Send)) -> Result<u8, Failure> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let io = |e: std::io::Error| Failure::error(format!("cannot write output: {e}"));
    let mut c = ctx.connect().await?;
    let st = c
        .status(StatusRequest {})
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner();
    let channel = ctx.channel().await?;
    let health = match HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(r) => r.into_inner().status().as_str_name().to_string(),
        Err(s) => format!("UNKNOWN ({})", s.message()),
    };
    let server = st.server.unwrap_or_default();
    let uptime = humantime::format_duration(Duration::from_secs(st.uptime_ms / 1000)).to_string();
    match ctx.format {
        Format::Json => json_line(
            out,
            &JsonStatus {
                registry: &ctx.addr,
                health: &health,
                version: &st.version,
                uptime_ms: st.uptime_ms,
                epoch: server.epoch,
                lease_epoch: registry_client::ServerInfo::from(Some(server)).lease_epoch,
                warming_up: server.warming_up,
                revision: st.revision,
                services: st.services,
                instances: st.instances,
                leases: st.leases,
                watchers: st.watchers,
                watcher_resets: st.watcher_resets,
            },
        )
        .map_err(io)?,
        Format::Table => {
            let warm = if server.warming_up {
                format!(" (warming up, {}ms left)", server.warmup_remaining_ms)
            } else {
                String::new()
            };
            let rows = vec![
                vec!["registry".into(), ctx.addr.clone()],
                vec!["health".into(), format!("{health}{warm}")],
                vec!["version".into(), st.version.clone()],
                vec!["uptime".into(), uptime],
                vec!["revision".into(), st.revision.to_string()],
                vec!["services".into(), st.services.to_string()],
                vec!["instances".into(), st.instances.to_string()],
                vec!["leases".into(), st.leases.to_string()],
                vec!["watchers".into(), st.watchers.to_string()],
            ];
            write!(out, "{}", table_rows(rows)).map_err(io)?;
        }
    }
    Ok(EXIT_OK)
}

/// Watches until Ctrl-C; on a broken stream (registry restart) reconnects
/// with backoff and resumes from the last revision seen, so nothing is lost
/// and nothing repeats (a restarted registry answers with a reset snapshot).
async fn watch(
    ctx: &Ctx,
    service: Option<String>,
    selector: Vec<(String, String)>,
    out: &mut (dyn Write + Send),
) -> Result<u8, Failure> {
    let selector: BTreeMap<_, _> = selector.into_iter().collect();
    let mut last_revision = 0u64;
    let mut epoch = 0u64;
    let mut backoff = Duration::from_millis(100);
    let mut connected_once = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let attempt = async {
            let mut c = ctx.connect().await?;
            let mut stream = c
                .watch(WatchRequest {
                    service: service.clone().unwrap_or_default(),
                    start_revision: if last_revision == 0 {
                        0
                    } else {
                        last_revision + 1
                    },
                    selector: selector.clone().into_iter().collect(),
                    epoch,
                    progress_interval_ms: 0,
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            let mut pending: Option<Snapshot> = None;
            loop {
                let msg = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(Failure::error("watch stream ended")),
                    Err(s) => return Err(ctx.status(s)),
                };
                match msg.kind {
                    Some(Kind::Snapshot(s)) => {
                        let more = s.more;
                        match &mut pending {
                            Some(p) => p.instances.extend(s.instances),
                            None => pending = Some(s),
                        }
                        if !more {
                            let snap = pending.take().expect("set above");
                            last_revision = snap.revision;
                            if let Some(server) = snap.server {
                                epoch = server.epoch;
                            }
                            print_snapshot(ctx.format, &snap, out)?;
                        }
                    }
                    Some(Kind::Events(batch)) => {
                        for e in &batch.events {
                            print_event(ctx.format, e, out)?;
                            last_revision = last_revision.max(e.revision);
                        }
                    }
                    Some(Kind::Progress(p)) => {
                        last_revision = last_revision.max(p.revision);
                        if let Some(server) = p.server {
                            epoch = server.epoch;
                        }
                    }
                    None => {}
                }
                out.flush().ok();
            }
            #[allow(unreachable_code)]
            Ok::<(), Failure>(())
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = &mut ctrl_c => return Ok(EXIT_OK),
        };
        if let Err(f) = result {
            if !connected_once && last_revision == 0 && epoch == 0 {
                // Never got anywhere: a wrong address or a refusal is an
                // error, not something to wait out.
                return Err(f);
            }
            eprintln!("regctl: watch interrupted ({}); reconnecting", f.message);
        }
        connected_once = true;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut ctrl_c => return Ok(EXIT_OK),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn print_snapshot(
    format: Format,
    snap: &Snapshot,
    out: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    let io = |e: std::io::Error| Failure::error(format!("cannot write output: {e}"));
    match format {
        Format::Json => json_line(
            out,
            &JsonSnapshot {
                kind: "snapshot",
                revision: snap.revision,
                reset: snap.reset,
                reason: reset_reason(snap),
                instances: snap.instances.iter().map(JsonInstance::from).collect(),
            },
        )
        .map_err(io),
        Format::Table => {
            let reset = if snap.reset {
                format!(" reset ({})", reset_reason(snap).unwrap_or("unspecified"))
            } else {
                String::new()
            };
            writeln!(
                out,
                "SNAPSHOT rev {} {} instance(s){reset}",
                snap.revision,
                snap.instances.len()
            )
            .map_err(io)?;
            for i in &snap.instances {
                writeln!(out, "  {}", describe(i)).map_err(io)?;
            }
            Ok(())
        }
    }
}

fn reset_reason(snap: &Snapshot) -> Option<&'static str> {
    snap.reset.then(|| match snap.reason() {
        registry_api::v1::ResetReason::Compacted => "compacted",
        registry_api::v1::ResetReason::SlowConsumer => "slow_consumer",
        registry_api::v1::ResetReason::EpochChanged => "epoch_changed",
        registry_api::v1::ResetReason::Unspecified => "unspecified",
    })
}

fn print_event(
    format: Format,
    e: &registry_api::v1::Event,
    out: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    let io = |e: std::io::Error| Failure::error(format!("cannot write output: {e}"));
    let default = Instance::default();
    let inst = e.instance.as_ref().unwrap_or(&default);
    let (kind, reason) = match e.r#type() {
        EventType::Put => ("put", None),
        EventType::Delete => (
            "delete",
            Some(match e.reason() {
                registry_api::v1::DeleteReason::Deregistered => "deregistered",
                registry_api::v1::DeleteReason::Expired => "expired",
                registry_api::v1::DeleteReason::Replaced => "replaced",
                registry_api::v1::DeleteReason::Unspecified => "unspecified",
            }),
        ),
        EventType::Unspecified => ("unspecified", None),
    };
    match format {
        Format::Json => json_line(
            out,
            &JsonEvent {
                kind,
                revision: e.revision,
                reason,
                instance: JsonInstance::from(inst),
            },
        )
        .map_err(io),
        Format::Table => {
            let reason = reason.map(|r| format!(" ({r})")).unwrap_or_default();
            writeln!(
                out,
                "{:<6} rev {} {}{reason}",
                kind.to_uppercase(),
                e.revision,
                describe(inst)
            )
            .map_err(io)
        }
    }
}

fn describe(i: &Instance) -> String {
    let meta = format_metadata(&i.metadata);
    let meta = if meta.is_empty() {
        String::new()
    } else {
        format!(" {meta}")
    };
    format!("{}/{} {}{meta}", i.service, i.id, i.address)
}

#[allow(clippy::too_many_arguments)]
async fn register(
    ctx: &Ctx,
    service: String,
    address: String,
    id: Option<String>,
    ttl: Duration,
    meta: Vec<(String, String)>,
    weight: u32,
    out: &mut (dyn Write + Send),
) -> Result<u8, Failure> {
    use registry_client::{
        Instance as ClientInstance, RegistrationState, RegistryClient as Client,
    };
    let io = |e: std::io::Error| Failure::error(format!("cannot write output: {e}"));
    let mut instance = ClientInstance::new(service, address).with_weight(weight);
    if let Some(id) = id {
        instance = instance.with_id(id);
    }
    for (k, v) in meta {
        instance = instance.with_metadata(k, v);
    }
    let client = tokio::time::timeout(
        ctx.timeout,
        Client::connect_with(&ctx.addr, ctx.client_options.clone()),
    )
    .await
    .map_err(|_| Failure::error(format!("cannot reach registry at {}: timed out", ctx.addr)))?
    .map_err(|e| client_failure(ctx, e))?;
    let registration = tokio::time::timeout(ctx.timeout, client.register(instance).ttl(ttl))
        .await
        .map_err(|_| Failure::error(format!("cannot reach registry at {}: timed out", ctx.addr)))?
        .map_err(|e| client_failure(ctx, e))?;
    let inst = registration.instance().clone();
    let ttl_text = humantime::format_duration(ttl).to_string();
    match ctx.format {
        Format::Json => json_line(
            out,
            &JsonRegistered {
                registered: true,
                service: &inst.service,
                id: &inst.id,
                address: &inst.address,
                ttl_ms: ttl.as_millis() as u64,
            },
        )
        .map_err(io)?,
        Format::Table => writeln!(
            out,
            "registered {}/{} at {} (ttl {ttl_text}); Ctrl-C to deregister",
            inst.service, inst.id, inst.address
        )
        .map_err(io)?,
    }
    out.flush().ok();

    let mut state = registration.state();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = *state.borrow_and_update();
                let text = match now {
                    RegistrationState::Registered => "registered",
                    RegistrationState::Reregistering => "re-registering",
                    RegistrationState::Unreachable => "registry unreachable, retrying",
                    _ => "unknown state",
                };
                eprintln!("regctl: {}/{}: {text}", inst.service, inst.id);
            }
        }
    }
    registration
        .deregister()
        .await
        .map_err(|e| client_failure(ctx, e))?;
    match ctx.format {
        Format::Json => json_line(
            out,
            &JsonDeregistered {
                deregistered: &format!("{}/{}", inst.service, inst.id),
                removed: 1,
                revision: 0,
            },
        )
        .map_err(io)?,
        Format::Table => writeln!(out, "deregistered {}/{}", inst.service, inst.id).map_err(io)?,
    }
    Ok(EXIT_OK)
}

fn client_failure(ctx: &Ctx, e: registry_client::Error) -> Failure {
    match e.status() {
        Some(s) => ctx.status(s.clone()),
        None => Failure::error(format!(
            "cannot reach registry at {}: {}",
            ctx.addr,
            root_cause(&e)
        )),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn format_ttl(ms: u64) -> String {
    if ms == 0 {
        "-".into()
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
    }
}

fn format_metadata(m: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = m.iter().collect();
    let mut s = String::new();
    for (k, v) in sorted {
        if !s.is_empty() {
            s.push(',');
        }
        let _ = write!(s, "{k}={v}");
    }
    s
}

/// Aligned columns with a header; the last column is not padded.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut all = vec![headers.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    all.extend(rows);
    table_rows(all)
}

fn table_rows(rows: Vec<Vec<String>>) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn json_line(out: &mut (dyn Write + Send), value: &impl Serialize) -> std::io::Result<()> {
    let line = serde_json::to_string(value).map_err(std::io::Error::other)?;
    writeln!(out, "{line}")
}

/// An instance in JSON output.
#[derive(Debug, Serialize)]
struct JsonInstance<'a> {
    service: &'a str,
    id: &'a str,
    address: &'a str,
    weight: u32,
    metadata: BTreeMap<&'a str, &'a str>,
    lease_id: u64,
    revision: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_ttl_ms: Option<u64>,
}

impl<'a> From<&'a Instance> for JsonInstance<'a> {
    fn from(i: &'a Instance) -> Self {
        Self {
            service: &i.service,
            id: &i.id,
            address: &i.address,
            weight: i.weight,
            metadata: i
                .metadata
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            lease_id: i.lease_id,
            revision: i.revision,
            lease_ttl_ms: (i.lease_remaining_ms > 0).then_some(i.lease_remaining_ms),
        }
    }
}

#[derive(Debug, Serialize)]
struct JsonResolve<'a> {
    service: &'a str,
    known: bool,
    revision: u64,
    warming_up: bool,
    instances: Vec<JsonInstance<'a>>,
}

#[derive(Debug, Serialize)]
struct JsonService<'a> {
    service: &'a str,
    instances: u32,
}

#[derive(Debug, Serialize)]
struct JsonSnapshot<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    revision: u64,
    reset: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    instances: Vec<JsonInstance<'a>>,
}

#[derive(Debug, Serialize)]
struct JsonEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    revision: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    instance: JsonInstance<'a>,
}

#[derive(Debug, Serialize)]
struct JsonStatus<'a> {
    registry: &'a str,
    health: &'a str,
    version: &'a str,
    uptime_ms: u64,
    epoch: u64,
    lease_epoch: u64,
    warming_up: bool,
    revision: u64,
    services: u64,
    instances: u64,
    leases: u64,
    watchers: u64,
    watcher_resets: u64,
}

#[derive(Debug, Serialize)]
struct JsonRegistered<'a> {
    registered: bool,
    service: &'a str,
    id: &'a str,
    address: &'a str,
    ttl_ms: u64,
}

#[derive(Debug, Serialize)]
struct JsonDeregistered<'a> {
    deregistered: &'a str,
    removed: u32,
    revision: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let t = table(
            &["ID", "ADDRESS", "METADATA"],
            vec![
                vec!["a".into(), "10.0.0.1:80".into(), "".into()],
                vec!["long-id".into(), "h:1".into(), "k=v".into()],
            ],
        );
        assert_eq!(
            t,
            "ID       ADDRESS      METADATA\na        10.0.0.1:80\nlong-id  h:1          k=v\n"
        );
    }

    #[test]
    fn kv_parsing() {
        assert_eq!(parse_kv("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_kv("novalue").is_err());
        assert!(parse_kv("=v").is_err());
    }

    #[test]
    fn ttl_format() {
        assert_eq!(format_ttl(0), "-");
        assert_eq!(format_ttl(9_840), "9.8s");
        assert_eq!(format_ttl(3_600_000), "1h");
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
