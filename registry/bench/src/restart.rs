//! Workload 8: restart to complete catalog. A `registry` process holds
//! `clients × instances-per-client` instances registered through
//! registry-client (one connection and keepalive stream per client, as many
//! service processes would have); it is killed with SIGKILL and started
//! again on the same port. Measured from the restart: when it serves, and
//! when its catalog holds every instance again. Run once without a data
//! directory (services re-register on their own) and once with
//! `--data-dir` (the catalog is restored from it: every acknowledged
//! registration was durable before its answer, so the kill may come at once).

use std::{path::Path, time::Duration};

use futures::{StreamExt, stream};
use registry_api::v1::{StatusRequest, registry_client::RegistryClient as Raw};
use registry_client::{Instance, Registration, RegistryClient};
use tokio::time::Instant;

use super::{BenchError, Options, report::Row, target::Target};

/// Clients registering at once during setup.
const SETUP_PARALLELISM: usize = 64;

/// Both runs: without and with `--data-dir`.
pub(crate) async fn restart(options: &Options) -> Result<Vec<Row>, BenchError> {
    let path = Target::binary(options)?;
    let mut rows = Vec::new();
    for with_data_dir in [false, true] {
        rows.push(run(options, &path, with_data_dir).await?);
    }
    Ok(rows)
}

async fn instances(raw: &mut Raw<tonic::transport::Channel>) -> Option<u64> {
    raw.status(StatusRequest {})
        .await
        .ok()
        .map(|s| s.into_inner().instances)
}

async fn run(options: &Options, path: &Path, with_data_dir: bool) -> Result<Row, BenchError> {
    let (clients, per_client) = (
        options.restart_clients,
        options.restart_instances_per_client,
    );
    let ttl = options.restart_ttl;
    let total = (clients * per_client) as u64;
    let dir = std::env::temp_dir().join(format!(
        "registry-bench-restart-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let extra: Vec<String> = if with_data_dir {
        vec!["--data-dir".into(), dir.display().to_string()]
    } else {
        Vec::new()
    };
    let listen = Target::free_listen()?;
    let mut target = Target::spawn_at(path, &listen, &extra).await?;
    let url = target.url.clone();

    let setup = Instant::now();
    let held: Vec<(RegistryClient, Vec<Registration>)> = stream::iter(0..clients)
        .map(|c| {
            let url = url.clone();
            async move {
                let client = RegistryClient::connect(&url)
                    .await
                    .map_err(|e| BenchError::Setup(format!("client {c}: {e}")))?;
                let mut regs = Vec::with_capacity(per_client);
                for i in 0..per_client {
                    let instance = Instance::new(
                        format!("bench-restart-{}", c % 100),
                        format!("127.0.0.1:{}", 10_000 + i),
                    )
                    .with_id(format!("c{c}-{i}"));
                    regs.push(
                        client
                            .register(instance)
                            .ttl(ttl)
                            .await
                            .map_err(|e| BenchError::Setup(format!("register: {e}")))?,
                    );
                }
                Ok::<_, BenchError>((client, regs))
            }
        })
        .buffer_unordered(SETUP_PARALLELISM)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let setup = setup.elapsed();
    let mut raw = Raw::new(target.connect(1).await?.remove(0));
    let held_now = instances(&mut raw).await.unwrap_or(0);
    if held_now != total {
        return Err(BenchError::Setup(format!(
            "restart: {held_now} of {total} instances registered"
        )));
    }
    target.kill();
    let restarted = Instant::now();
    // The port may take a moment to be free again.
    let target = loop {
        match Target::spawn_at(path, &listen, &extra).await {
            Ok(t) => break t,
            Err(e) if restarted.elapsed() > Duration::from_secs(10) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let serving = restarted.elapsed();
    let mut raw = Raw::new(target.connect(1).await?.remove(0));
    let first = instances(&mut raw).await.unwrap_or(0);
    let deadline = restarted + ttl * 3;
    let complete = loop {
        if instances(&mut raw).await == Some(total) {
            break Some(restarted.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Deregister while the registry still runs, so no client is left
    // retrying against a registry about to be killed.
    stream::iter(held)
        .for_each_concurrent(SETUP_PARALLELISM, |(_client, regs)| async move {
            for r in regs {
                let _ = r.deregister().await;
            }
        })
        .await;
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);

    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    let mut row = Row {
        name: format!(
            "restart {total}{}",
            if with_data_dir { " --data-dir" } else { "" }
        ),
        ops: total,
        unit: "instances",
        errors: u64::from(complete.is_none()),
        ..Row::default()
    };
    row.notes.push(format!("serving {}", ms(serving)));
    row.notes.push(match complete {
        Some(d) => format!("complete catalog {}", ms(d)),
        None => format!("catalog incomplete after {}", ms(ttl * 3)),
    });
    row.notes
        .push(format!("{first} of {total} in the first answer"));
    row.notes.push(format!(
        "{clients} clients x {per_client}, ttl {}, registered in {}",
        humantime::format_duration(ttl),
        ms(setup)
    ));
    Ok(row)
}
