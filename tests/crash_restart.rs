//! Crash consistency of `--data-dir` against the real binary: the history
//! workload (`tests/common/history`) runs while the registry is killed with
//! SIGKILL at random moments and restarted on the same port and data
//! directory, again and again. Each life's history is checked as in
//! `tests/history.rs`, and every restart is checked against the guarantee:
//!
//! After `kill -9` at any moment, the restored catalog equals the state at
//! one revision R of the previous life, with R at or above the revision of
//! every write acknowledged before the kill; every restored lease existed
//! at R and holds exactly its instances at R (a lease that held instances
//! at R is renewable, one granted after R is NOT_FOUND); lease ids granted
//! by a new life never equal an id granted by any previous life.
//!
//! R is `Status.revision` right after the restart, before any new write
//! (revisions continue from R; the epoch changes). The previous life's
//! recorder watcher gives the state at each revision; it may have seen
//! revisions beyond R (visible before durable is allowed), but never fewer
//! than the acknowledged writes.
//!
//! `cargo test --test crash_restart` makes 10 kills (about 15 s). Longer:
//!
//! ```sh
//! CRASH_KILLS=200 CRASH_SEED=42 cargo test --test crash_restart -- --nocapture
//! ```

mod common;

use std::{collections::HashMap, fmt::Write as _, time::Duration};

use common::{
    binary::{BinaryServer, wait_ready},
    history::{
        Call, History,
        checker::{LeaseBook, Timeline, Violation, check, describe_op, max_acked_write},
        model::{Inst, diff},
        workload::{self, Config},
    },
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use registry_api::v1::{HeartbeatRequest, StatusRequest};

/// Kills in the default run.
const KILLS: usize = 10;
/// Leases at least this long must survive a restart that restored them.
const LONG_TTL_MS: u64 = 10_000;
/// How long each life runs before its kill, in ms.
const LIFE_MS: (u64, u64) = (300, 1_500);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
    })
}

/// What a restart reported before any new write.
struct Restart {
    life: usize,
    revision: u64,
    /// Heartbeat of every lease id granted so far: id -> found.
    renewed: HashMap<u64, bool>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_nothing_acknowledged() {
    let seed = env_u64("CRASH_SEED").unwrap_or_else(|| rand::random::<u32>() as u64);
    let kills = env_u64("CRASH_KILLS").map_or(KILLS, |k| k as usize);
    println!(
        "crash_restart: seed {seed}, {kills} kills (rerun: CRASH_SEED={seed} CRASH_KILLS={kills})"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap().to_owned();
    let mut server = BinaryServer::start(&[
        "--data-dir",
        &data_dir,
        "--min-ttl",
        "100ms",
        "--rate-limit",
        "0",
    ])
    .await;

    let mut book = LeaseBook::default();
    let mut violations: Vec<(usize, Violation)> = Vec::new();
    let mut summary = String::new();
    let mut previous: Option<(History, Timeline)> = None;
    // Leases whose revocation was acknowledged in some life.
    let mut revoked: HashMap<u64, String> = HashMap::new();

    for life in 0..=kills {
        let mut control = wait_ready(&server).await;
        let mut restart = None;
        if life > 0 {
            let status = control
                .status(StatusRequest {})
                .await
                .expect("Status right after the restart")
                .into_inner();
            let ids: Vec<u64> = book.grants.keys().copied().collect();
            let mut renewed = HashMap::new();
            // Under --max-heartbeat-batch (10,000) however long the run.
            for chunk in ids.chunks(5_000) {
                let answer = control
                    .heartbeat(HeartbeatRequest {
                        lease_ids: chunk.to_vec(),
                    })
                    .await
                    .expect("Heartbeat of every lease granted so far")
                    .into_inner();
                renewed.extend(answer.leases.iter().map(|l| (l.lease_id, l.found)));
            }
            restart = Some(Restart {
                life,
                revision: status.revision,
                renewed,
            });
        }
        let mut cfg = Config::new(seed.wrapping_add(life as u64));
        cfg.life = life;
        let running = workload::start(&server.url, &cfg).await;
        let run_for = Duration::from_millis(rng.random_range(LIFE_MS.0..=LIFE_MS.1));
        tokio::time::sleep(run_for).await;
        let history = if life == kills {
            running.finish(Some(&mut control)).await
        } else {
            server.kill9().await;
            running.finish(None).await
        };
        let report = check(&history, &mut book);
        violations.extend(report.violations.iter().cloned().map(|v| (life, v)));
        let acked = max_acked_write(&history).map_or(0, |(r, _)| r);
        let _ = writeln!(
            summary,
            "  life {life}: {}recorder started at revision {}, ran {run_for:?}, {} ops, highest acknowledged write revision {acked}, recorder saw up to {}{}",
            restart.as_ref().map_or(String::new(), |r| format!(
                "Status.revision {} after the restart, ",
                r.revision
            )),
            report.timeline.start,
            history.ops.len(),
            report.timeline.last,
            if life == kills {
                ", stopped"
            } else {
                ", kill -9"
            },
        );
        if let (Some(restart), Some((prev, prev_t))) = (&restart, &previous) {
            check_restart(
                restart,
                prev,
                prev_t,
                &report.timeline,
                &book,
                &revoked,
                &mut violations,
                &mut summary,
            );
        }
        for op in &history.ops {
            if let (Call::DeregisterLease { lease_id }, Ok(_)) = (&op.call, &op.outcome) {
                revoked.insert(*lease_id, format!("life {life} {}", describe_op(op)));
            }
        }
        previous = Some((history, report.timeline));
        if life < kills {
            server.restart().await;
        }
    }

    if !violations.is_empty() {
        violations.sort_by_key(|(life, v)| (*life, v.revision, v.at));
        let mut msg = format!(
            "crash consistency violated (seed {seed}, {kills} kills; rerun: CRASH_SEED={seed} CRASH_KILLS={kills} cargo test --test crash_restart): {} violation(s), the first divergence first:\n",
            violations.len()
        );
        for (i, (life, v)) in violations.iter().take(15).enumerate() {
            let _ = writeln!(
                msg,
                "{:>3}. life {life} [revision {}] {}",
                i + 1,
                v.revision,
                v.what
            );
        }
        if violations.len() > 15 {
            let _ = writeln!(msg, "     ... and {} more", violations.len() - 15);
        }
        panic!("{msg}lives:\n{summary}");
    }
    println!("crash_restart: {kills} kills, no violation\n{summary}");
}

/// The restart of `restart.life` against the history of the life before.
#[allow(clippy::too_many_arguments)]
fn check_restart(
    restart: &Restart,
    prev: &History,
    prev_t: &Timeline,
    now: &Timeline,
    book: &LeaseBook,
    revoked: &HashMap<u64, String>,
    out: &mut Vec<(usize, Violation)>,
    summary: &mut String,
) {
    let life = restart.life;
    let r = restart.revision;
    let mut push = |revision: u64, what: String| {
        out.push((
            life,
            Violation {
                revision,
                at: Duration::ZERO,
                what,
            },
        ))
    };
    if let Some((acked, op)) = max_acked_write(prev)
        && r < acked
    {
        let lost = prev
            .ops
            .iter()
            .filter(|o| {
                matches!(o.outcome.as_ref().ok().and_then(|a| a.revision()), Some(x) if x > r)
                    && o.call.is_write()
            })
            .count();
        push(
            r,
            format!(
                "the restart restored revision {r}, but the previous life had acknowledged writes up to revision {acked} ({lost} acknowledged write(s) above {r} lost; the last: {})",
                describe_op(op)
            ),
        );
    }
    if r < prev_t.start {
        push(
            r,
            format!(
                "the restart restored revision {r}, older than revision {} the previous life started from",
                prev_t.start
            ),
        );
    }
    // The restored state, as the new life's recorder saw it before any write.
    if now.start != r {
        let _ = writeln!(
            summary,
            "    note: the new life's recorder started at revision {} (Status said {r}); restored state not compared",
            now.start
        );
    } else if let Some(model) = prev_t.model_at(r) {
        let expected = model.view("").cloned().unwrap_or_default();
        let got: Vec<Inst> = now.start_state.clone();
        let same = got.len() == expected.len()
            && got.iter().all(|g| expected.map.get(&g.key()) == Some(g));
        if !same {
            push(
                r,
                format!(
                    "the restored catalog is not the state at revision {r} of the previous life: {}",
                    diff(&expected.map, &got)
                ),
            );
        }
        for (lease, found) in &restart.renewed {
            let held = model.lease_members(*lease);
            let grant = &book.grants[lease];
            // A short lease's fresh TTL after the restart could in principle
            // run out before this heartbeat; a long one cannot.
            if !found && !held.is_empty() && grant.ttl_ms >= LONG_TTL_MS {
                push(
                    r,
                    format!(
                        "lease {lease} held {} instance(s) at the restored revision {r} ({:?}...), but the restarted registry answers its heartbeat NOT_FOUND",
                        held.len(),
                        held.iter().next()
                    ),
                );
            }
            if *found && held.is_empty() && grant.life == life - 1 && grant.revision > r {
                push(
                    r,
                    format!(
                        "lease {lease} was granted at revision {} of the previous life, after the restored revision {r}, yet its heartbeat answers found:true (a renewal of a lease from the lost window must be NOT_FOUND)",
                        grant.revision
                    ),
                );
            }
            if *found
                && held.is_empty()
                && let Some(by) = revoked.get(lease)
            {
                push(
                    r,
                    format!(
                        "lease {lease} was revoked ({by}), yet after the restart its heartbeat answers found:true"
                    ),
                );
            }
        }
    } else {
        let _ = writeln!(
            summary,
            "    note: restored revision {r} is beyond what the previous life's recorder saw ({}); restored state not compared",
            prev_t.last
        );
    }
}
