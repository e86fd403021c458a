//! `regctl`, the command line for operators and scripts, in the manner of
//! etcdctl and `consul catalog`. Like etcdctl on clientv3, it is built on
//! `registry-client`'s public API only: connecting, resolve, list, status,
//! deregister, watch (with its resume) and register all go through the
//! library a service links; this module only parses and prints.
//!
//! Output contract: tables go to stdout, aligned; `-o json` prints one JSON
//! object per line (stable field names, see the `Json*` types); diagnostics
//! and logs go to stderr only. Exit codes: [`EXIT_OK`], [`EXIT_ERROR`],
//! [`EXIT_USAGE`] (clap's own), [`EXIT_UNKNOWN_SERVICE`].

use std::{collections::BTreeMap, fmt::Write as _, io::Write, time::Duration};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use registry_client::{
    AdminState, DeregisterTarget, Error, HealthCheck, HealthState, Instance, Query,
    RegistrationState, RegistryClient, Snapshot, WatchEvent, WatchOptions, shutdown_signal,
};
use serde::Serialize;

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

/// Command line of `regctl`.
#[derive(Debug, Parser)]
#[command(
    name = "regctl",
    version,
    about = "Resolve, list, watch, register, drain and maintain services in a registry"
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

/// `regctl maint on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum MaintMode {
    /// Disable: out of rotation.
    On,
    /// Active again.
    Off,
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
        /// Also instances callers are not sent to (critical, draining,
        /// disabled).
        #[arg(long)]
        all: bool,
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
        /// Also instances callers are not sent to (critical, draining,
        /// disabled), with every change of their state.
        #[arg(long)]
        all: bool,
    },
    /// Drain an instance: callers move off at once, its registration stays.
    Drain {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// Why (shown by resolve --all and watch).
        #[arg(long, default_value = "drained with regctl")]
        reason: String,
    },
    /// Maintenance mode of an instance: `on` takes it out of rotation
    /// until `off`.
    Maint {
        /// `on` or `off`.
        mode: MaintMode,
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// Why (shown by resolve --all and watch).
        #[arg(long, default_value = "maintenance")]
        reason: String,
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
        /// A health check for the registry to run against it.
        #[command(flatten)]
        check: Box<CheckArgs>,
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

/// `regctl register --check ...`: the registry probes the instance and
/// serves it only while the check passes.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CheckArgs {
    /// Health check the registry runs: `grpc` (grpc.health.v1, whole
    /// server), `grpc:SERVICE`, `http:/PATH` (2xx passes, 429 warns) or
    /// `tcp` (connect).
    #[arg(long, value_name = "KIND", value_parser = parse_check)]
    check: Option<HealthCheck>,
    /// `host:port` to check instead of the instance's address.
    #[arg(long, requires = "check")]
    check_address: Option<String>,
    /// Time between checks (registry default 10s).
    #[arg(long, requires = "check", value_parser = humantime::parse_duration)]
    check_interval: Option<Duration>,
    /// Time one check may take (registry default: the interval, at most 5s).
    #[arg(long, requires = "check", value_parser = humantime::parse_duration)]
    check_timeout: Option<Duration>,
    /// Failed checks in a row before the instance turns critical (default 3).
    #[arg(long, requires = "check")]
    failures_before_critical: Option<u32>,
    /// Passing checks in a row before a critical instance serves again
    /// (default 1).
    #[arg(long, requires = "check")]
    successes_before_passing: Option<u32>,
    /// Serve it from the start, before its first check passes (default:
    /// critical until then).
    #[arg(long, requires = "check")]
    initially_passing: bool,
}

impl CheckArgs {
    /// The check these flags describe, if any.
    fn build(self) -> Option<HealthCheck> {
        let mut check = self.check?;
        if let Some(a) = self.check_address {
            check = check.address(a);
        }
        if let Some(d) = self.check_interval {
            check = check.interval(d);
        }
        if let Some(d) = self.check_timeout {
            check = check.timeout(d);
        }
        if let Some(n) = self.failures_before_critical {
            check = check.failures_before_critical(n);
        }
        if let Some(n) = self.successes_before_passing {
            check = check.successes_before_passing(n);
        }
        if self.initially_passing {
            check = check.initial_state(HealthState::Passing);
        }
        Some(check)
    }
}

fn parse_check(s: &str) -> Result<HealthCheck, String> {
    match s.split_once(':') {
        None if s == "grpc" => Ok(HealthCheck::grpc("")),
        None if s == "tcp" => Ok(HealthCheck::tcp()),
        Some(("grpc", service)) => Ok(HealthCheck::grpc(service)),
        Some(("http", path)) if path.starts_with('/') => Ok(HealthCheck::http(path)),
        _ => Err(format!(
            "{s:?}: expected grpc, grpc:SERVICE, http:/PATH or tcp"
        )),
    }
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

fn io(e: std::io::Error) -> Failure {
    Failure::error(format!("cannot write output: {e}"))
}

struct Ctx {
    addr: String,
    format: Format,
    client: RegistryClient,
}

/// Describes a client error the way a person wants to read it: transport
/// failures become "cannot reach registry at ADDR: cause", server refusals
/// pass the server's own message through, bad settings are usage errors.
fn failure(addr: &str, e: Error) -> Failure {
    match e {
        Error::Rejected(status) => Failure::error(status.message().to_string()),
        Error::Unavailable { registry, status } => {
            let at = if registry.is_empty() { addr } else { &registry };
            let e = Error::Unavailable {
                registry: at.to_owned(),
                status,
            };
            let status = e.status().expect("unavailable has a status");
            let detail = e.to_string();
            let detail = detail
                .split_once(" unavailable: ")
                .map_or(detail.clone(), |(_, d)| d.to_owned());
            if matches!(
                status.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) {
                Failure::error(format!("registry at {at} did not answer in time: {detail}"))
            } else {
                Failure::error(format!("cannot reach registry at {at}: {detail}"))
            }
        }
        e @ (Error::InvalidAddress { .. } | Error::InvalidConfig { .. }) => Failure {
            code: EXIT_USAGE,
            message: e.to_string(),
        },
        e => Failure::error(e.to_string()),
    }
}

impl Ctx {
    fn fail(&self, e: Error) -> Failure {
        failure(&self.addr, e)
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
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "regctl", out);
        return Ok(EXIT_OK);
    }
    let usage = |message: String| Failure {
        code: EXIT_USAGE,
        message,
    };
    let mut builder = RegistryClient::builder()
        .address(cli.registry.clone())
        .connect_timeout(cli.timeout)
        .request_timeout(cli.timeout);
    if let Some(token) = &cli.token {
        builder = builder.token(token.clone());
    }
    if let Some(ca) = &cli.cacert {
        builder = builder.tls(
            registry_client::tls_from_files(ca, cli.cert.as_deref(), cli.key.as_deref(), None)
                .map_err(|e| usage(e.to_string()))?,
        );
    }
    let client = builder
        .connect()
        .await
        .map_err(|e| failure(&cli.registry, e))?;
    let ctx = Ctx {
        addr: cli.registry,
        format: cli.output,
        client,
    };
    match cli.command {
        Command::Completions { .. } => unreachable!("handled above"),
        Command::Resolve {
            service,
            selector,
            all,
        } => resolve(&ctx, service, selector, all, out).await,
        Command::Drain {
            service,
            id,
            reason,
        } => set_state(&ctx, service, id, AdminState::Draining, reason, out).await,
        Command::Maint {
            mode,
            service,
            id,
            reason,
        } => {
            let state = match mode {
                MaintMode::On => AdminState::Disabled,
                MaintMode::Off => AdminState::Active,
            };
            set_state(&ctx, service, id, state, reason, out).await
        }
        Command::List => list(&ctx, out).await,
        Command::Deregister { service, id, lease } => {
            let target = match (service, id, lease) {
                (_, _, Some(lease)) => DeregisterTarget::Lease(lease),
                (Some(service), Some(id), None) => DeregisterTarget::Instance { service, id },
                _ => {
                    return Err(Failure {
                        code: EXIT_USAGE,
                        message: "give SERVICE ID, or --lease ID".into(),
                    });
                }
            };
            let what = match &target {
                DeregisterTarget::Lease(id) => format!("lease {id}"),
                DeregisterTarget::Instance { service, id } => format!("{service}/{id}"),
            };
            let done = ctx
                .client
                .deregister(target)
                .await
                .map_err(|e| ctx.fail(e))?;
            match ctx.format {
                Format::Json => json_line(
                    out,
                    &JsonDeregistered {
                        deregistered: &what,
                        removed: done.removed,
                        revision: done.revision,
                    },
                )
                .map_err(io)?,
                Format::Table => writeln!(
                    out,
                    "deregistered {what}: {} instance(s) removed at revision {}",
                    done.removed, done.revision
                )
                .map_err(io)?,
            }
            Ok(EXIT_OK)
        }
        Command::Status => status(&ctx, out).await,
        Command::Watch {
            service,
            selector,
            all,
        } => watch(&ctx, service, selector, all, out).await,
        Command::Register {
            service,
            address,
            id,
            ttl,
            meta,
            weight,
            check,
        } => register(&ctx, service, address, id, ttl, meta, weight, *check, out).await,
    }
}

fn query(service: String, selector: Vec<(String, String)>) -> Query {
    selector
        .into_iter()
        .fold(Query::new(service), |q, (k, v)| q.with_selector(k, v))
}

async fn set_state(
    ctx: &Ctx,
    service: String,
    id: String,
    state: AdminState,
    reason: String,
    out: &mut (dyn Write + Send),
) -> Result<u8, Failure> {
    let done = ctx
        .client
        .set_instance_state(&service, &id, state, reason)
        .await
        .map_err(|e| ctx.fail(e))?;
    match ctx.format {
        Format::Json => json_line(
            out,
            &JsonStateSet {
                service: &service,
                id: &id,
                admin_state: state.as_str(),
                revision: done.revision,
                instance: JsonInstance::from(&done.instance),
            },
        )
        .map_err(io)?,
        Format::Table => writeln!(
            out,
            "{service}/{id} is {} at revision {}",
            state.as_str(),
            done.revision
        )
        .map_err(io)?,
    }
    Ok(EXIT_OK)
}

async fn resolve(
    ctx: &Ctx,
    service: String,
    selector: Vec<(String, String)>,
    all: bool,
    out: &mut (dyn Write + Send),
) -> Result<u8, Failure> {
    let mut request = ctx
        .client
        .resolve(query(service.clone(), selector))
        .with_lease_ttl();
    if all {
        request = request.include_not_serving();
    }
    let resp = request.await.map_err(|e| ctx.fail(e))?;
    if resp.panicked {
        eprintln!(
            "regctl: service {service:?} is in panic mode: too few instances are healthy, so every active one is served"
        );
    }
    match ctx.format {
        Format::Json => json_line(
            out,
            &JsonResolve {
                service: &service,
                known: resp.service_known,
                revision: resp.revision,
                warming_up: resp.server.warming_up,
                panicked: resp.panicked,
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
                        i.health.as_str().to_owned(),
                        i.admin_state.as_str().to_owned(),
                        format_ttl(i.lease_remaining),
                        format_metadata(&i.metadata),
                    ]
                })
                .collect();
            write!(
                out,
                "{}",
                table(
                    &[
                        "ID", "ADDRESS", "WEIGHT", "HEALTH", "STATE", "TTL", "METADATA"
                    ],
                    rows
                )
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

async fn list(ctx: &Ctx, out: &mut (dyn Write + Send)) -> Result<u8, Failure> {
    let list = ctx.client.list_services().await.map_err(|e| ctx.fail(e))?;
    match ctx.format {
        Format::Json => {
            for s in &list.services {
                json_line(
                    out,
                    &JsonService {
                        service: &s.name,
                        instances: s.instances,
                    },
                )
                .map_err(io)?;
            }
        }
        Format::Table => {
            let rows = list
                .services
                .iter()
                .map(|s| vec![s.name.clone(), s.instances.to_string()])
                .collect();
            write!(out, "{}", table(&["SERVICE", "INSTANCES"], rows)).map_err(io)?;
        }
    }
    Ok(EXIT_OK)
}

async fn status(ctx: &Ctx, out: &mut (dyn Write + Send)) -> Result<u8, Failure> {
    let st = ctx.client.status().await.map_err(|e| ctx.fail(e))?;
    let health = st.health.to_string();
    let uptime = humantime::format_duration(Duration::from_secs(st.uptime.as_secs())).to_string();
    match ctx.format {
        Format::Json => json_line(
            out,
            &JsonStatus {
                registry: &ctx.addr,
                health: &health,
                version: &st.version,
                uptime_ms: st.uptime.as_millis() as u64,
                epoch: st.server.epoch,
                lease_epoch: st.server.lease_epoch,
                warming_up: st.server.warming_up,
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
            let warm = if st.server.warming_up {
                format!(
                    " (warming up, {}ms left)",
                    st.server.warmup_remaining.as_millis()
                )
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

/// Watches until Ctrl-C. The client's watch reconnects with backoff and
/// resumes from the last revision seen by itself, so nothing is lost and
/// nothing repeats (a restarted registry answers with a reset snapshot);
/// regctl only reports the interruptions.
async fn watch(
    ctx: &Ctx,
    service: Option<String>,
    selector: Vec<(String, String)>,
    all: bool,
    out: &mut (dyn Write + Send),
) -> Result<u8, Failure> {
    let mut stream = ctx.client.watch(
        query(service.unwrap_or_default(), selector),
        WatchOptions::default().include_not_serving(all),
    );
    let mut seen_anything = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = &mut ctrl_c => return Ok(EXIT_OK),
        };
        match event {
            None => return Err(Failure::error("watch stream ended")),
            Some(Err(e)) => return Err(ctx.fail(e)),
            Some(Ok(WatchEvent::Interrupted { error, .. })) => {
                if !seen_anything {
                    // Never got anywhere: a wrong address or a refusal is
                    // an error, not something to wait out.
                    return Err(ctx.fail(error));
                }
                eprintln!(
                    "regctl: watch interrupted ({}); reconnecting",
                    ctx.fail(error).message
                );
            }
            Some(Ok(WatchEvent::Snapshot(snapshot))) => {
                seen_anything = true;
                print_snapshot(ctx.format, &snapshot, out)?;
            }
            Some(Ok(WatchEvent::Put { revision, instance })) => {
                seen_anything = true;
                print_event(ctx.format, "put", revision, None, &instance, out)?;
            }
            Some(Ok(WatchEvent::Delete {
                revision,
                instance,
                reason,
            })) => {
                seen_anything = true;
                print_event(
                    ctx.format,
                    "delete",
                    revision,
                    Some(reason.as_str()),
                    &instance,
                    out,
                )?;
            }
            Some(Ok(_)) => seen_anything = true,
        }
        out.flush().ok();
    }
}

fn print_snapshot(
    format: Format,
    snap: &Snapshot,
    out: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    let reason = snap.reset.map(|r| r.as_str());
    match format {
        Format::Json => json_line(
            out,
            &JsonSnapshot {
                kind: "snapshot",
                revision: snap.revision,
                reset: snap.reset.is_some(),
                reason,
                instances: snap.instances.iter().map(JsonInstance::from).collect(),
            },
        )
        .map_err(io),
        Format::Table => {
            let reset = reason.map(|r| format!(" reset ({r})")).unwrap_or_default();
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

fn print_event(
    format: Format,
    kind: &'static str,
    revision: u64,
    reason: Option<&'static str>,
    instance: &Instance,
    out: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    match format {
        Format::Json => json_line(
            out,
            &JsonEvent {
                kind,
                revision,
                reason,
                instance: JsonInstance::from(instance),
            },
        )
        .map_err(io),
        Format::Table => {
            let reason = reason.map(|r| format!(" ({r})")).unwrap_or_default();
            writeln!(
                out,
                "{:<6} rev {revision} {}{reason}",
                kind.to_uppercase(),
                describe(instance)
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
    // Only what is unusual: a serving instance reads as before.
    let mut state = String::new();
    if i.health != registry_client::HealthState::Passing {
        let _ = write!(state, " [{}]", i.health.as_str());
    }
    if i.admin_state != AdminState::Active {
        let _ = write!(state, " [{}", i.admin_state.as_str());
        if !i.admin_reason.is_empty() {
            let _ = write!(state, ": {}", i.admin_reason);
        }
        state.push(']');
    }
    format!("{}/{} {}{meta}{state}", i.service, i.id, i.address)
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
    check: CheckArgs,
    out: &mut (dyn Write + Send),
) -> Result<u8, Failure> {
    let mut instance = Instance::new(service, address).with_weight(weight);
    if let Some(check) = check.build() {
        instance = instance.with_check(check);
    }
    if let Some(id) = id {
        instance = instance.with_id(id);
    }
    for (k, v) in meta {
        instance = instance.with_metadata(k, v);
    }
    let registration = ctx
        .client
        .register(instance)
        .ttl(ttl)
        .await
        .map_err(|e| ctx.fail(e))?;
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
                    RegistrationState::Registered => "registered".to_owned(),
                    RegistrationState::Reregistering => "re-registering".to_owned(),
                    RegistrationState::Unreachable => "registry unreachable, retrying".to_owned(),
                    RegistrationState::Replaced { lease_id } => format!(
                        "replaced by lease {lease_id} (another process registered the same id); waiting for it to go"
                    ),
                    _ => "unknown state".to_owned(),
                };
                eprintln!("regctl: {}/{}: {text}", inst.service, inst.id);
            }
        }
    }
    let done = registration.deregister().await.map_err(|e| ctx.fail(e))?;
    match ctx.format {
        Format::Json => json_line(
            out,
            &JsonDeregistered {
                deregistered: &format!("{}/{}", inst.service, inst.id),
                removed: done.removed,
                revision: done.revision,
            },
        )
        .map_err(io)?,
        Format::Table => writeln!(out, "deregistered {}/{}", inst.service, inst.id).map_err(io)?,
    }
    Ok(EXIT_OK)
}

fn format_ttl(left: Option<Duration>) -> String {
    let ms = left.map_or(0, |d| d.as_millis() as u64);
    if ms == 0 {
        "-".into()
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
    }
}

fn format_metadata(m: &BTreeMap<String, String>) -> String {
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
    health: &'static str,
    admin_state: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    admin_reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_check: Option<&'a str>,
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
            lease_ttl_ms: i.lease_remaining.map(|d| d.as_millis() as u64),
            health: i.health.as_str(),
            admin_state: i.admin_state.as_str(),
            admin_reason: &i.admin_reason,
            last_check: i.last_check.as_ref().map(|c| c.output.as_str()),
        }
    }
}

#[derive(Debug, Serialize)]
struct JsonResolve<'a> {
    service: &'a str,
    known: bool,
    revision: u64,
    warming_up: bool,
    panicked: bool,
    instances: Vec<JsonInstance<'a>>,
}

#[derive(Debug, Serialize)]
struct JsonStateSet<'a> {
    service: &'a str,
    id: &'a str,
    admin_state: &'static str,
    revision: u64,
    instance: JsonInstance<'a>,
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
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(format_ttl(None), "-");
        assert_eq!(format_ttl(ms(9_840)), "9.8s");
        assert_eq!(format_ttl(ms(3_600_000)), "1h");
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
