//! `chaos`: the chaos runner (SPEC §9). Drives load with unique command ids against real
//! processes (nats-server, command servers, query server), injects faults at random
//! moments, and after every trial checks the guarantees (see `check.rs`). Prints a table
//! of trials, violations and recovery times per fault, and exits non-zero on any
//! violation.
//!
//! ```text
//! cargo run --release -p chaos -- --trials 20 --faults kill-command,pause-nats --seed 7
//! ```
//!
//! Each trial's fault schedule comes from its seed (printed for failing trials; rerun one
//! with `--faults <fault> --trial-seed <seed>`). Recovery time: from the end of the last
//! fault (the restart, SIGCONT, freed disk) until a command is acknowledged again and
//! the query server has applied it.

// A command-line tool: its report goes to stdout.
#![allow(clippy::print_stdout)]

mod check;
mod faults;
mod load;
mod world;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::FutureExt;
use rand::rngs::StdRng;
use rand::SeedableRng;
use shop_tests::pb;
use shop_tests::pb::query_service_client::QueryServiceClient;

use crate::faults::{Action, FaultKind, DEFAULT_FAULTS};
use crate::world::World;

#[derive(Parser, Debug)]
#[command(about = "Fault injection with a check of every guarantee after each trial")]
struct Args {
    /// Trials per fault kind.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Fault kinds, comma-separated; `a+b` injects two overlapping faults.
    #[arg(long, default_value = DEFAULT_FAULTS)]
    faults: String,
    /// The run's seed (trial seeds derive from it); random when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Runs one trial of each fault kind with this seed (a failing trial's, printed).
    #[arg(long)]
    trial_seed: Option<u64>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    /// Trials before a world (its processes and data) is replaced by a fresh one.
    #[arg(long, default_value_t = 10)]
    trials_per_world: usize,
    /// Also write the report (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the logs of failing trials go.
    #[arg(long, default_value = "target/chaos")]
    logs: PathBuf,
}

/// What one fault kind's trials found.
struct Row {
    kind: String,
    trials: usize,
    violations: Vec<(u64, String)>,
    recoveries: Vec<Duration>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kinds = FaultKind::parse_list(&args.faults).map_err(|e| anyhow::anyhow!(e))?;
    anyhow::ensure!(!kinds.is_empty(), "--faults lists nothing");
    shop_tests::prepare_binaries()?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let rows = runtime.block_on(run(&args, &kinds, seed))?;
    let report = report(&args, &rows, seed, started.elapsed());
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report)?;
    }
    let violations: usize = rows.iter().map(|r| r.violations.len()).sum();
    if violations > 0 {
        anyhow::bail!("{violations} trial(s) violated a guarantee");
    }
    Ok(())
}

async fn run(args: &Args, kinds: &[FaultKind], seed: u64) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for kind in kinds {
        let mut row = Row {
            kind: kind.name(),
            trials: 0,
            violations: Vec::new(),
            recoveries: Vec::new(),
        };
        let trials = if args.trial_seed.is_some() {
            1
        } else {
            args.trials
        };
        let with_disk = kind.faults.contains(&faults::Fault::DiskFull);
        let with_power = kind.faults.contains(&faults::Fault::PowerCut);
        let mut world: Option<World> = None;
        for i in 0..trials {
            let trial_seed = args
                .trial_seed
                .unwrap_or_else(|| faults::trial_seed(seed, kind, i));
            if world
                .as_ref()
                .is_none_or(|w| w.trials >= args.trials_per_world)
            {
                // The old world's processes stop before the new one's start.
                drop(world.take());
                world =
                    Some(World::start(kind.world(), with_disk, with_power, args.clients).await?);
            }
            let Some(w) = world.as_mut() else { continue };
            w.trials += 1;
            row.trials += 1;
            let mut rng = StdRng::seed_from_u64(trial_seed);
            let schedule = kind.schedule(&mut rng);
            let outcome = std::panic::AssertUnwindSafe(trial(w, kind, &schedule, &mut rng))
                .catch_unwind()
                .await;
            let outcome = match outcome {
                Ok(Ok(recovery)) => Ok(recovery),
                Ok(Err(violation)) => Err(violation),
                Err(panic) => Err(shop_shared::storage::panic_message(panic.as_ref())),
            };
            match outcome {
                Ok(recovery) => {
                    row.recoveries.push(recovery);
                    eprintln!(
                        "[chaos] {} trial {}/{trials} (seed {trial_seed}): {}; recovered in {} ms",
                        row.kind,
                        i + 1,
                        schedule.describe(),
                        recovery.as_millis()
                    );
                }
                Err(violation) => {
                    let dir = args.logs.join(format!("{}-{trial_seed}", row.kind));
                    w.save_logs(&dir);
                    eprintln!(
                        "[chaos] {} trial {}/{trials} (seed {trial_seed}): {}: VIOLATION: {violation}\n\
                         [chaos] logs in {}",
                        row.kind,
                        i + 1,
                        schedule.describe(),
                        dir.display()
                    );
                    row.violations.push((trial_seed, violation));
                    // Its processes and data are suspect: the next trial gets a new world.
                    world = None;
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

/// One trial: load, the schedule's faults, the wait for recovery, the checks. The
/// recovery time, or what was violated.
async fn trial(
    world: &mut World,
    kind: &FaultKind,
    schedule: &faults::Schedule,
    rng: &mut StdRng,
) -> Result<Duration, String> {
    let load = world.clients.start();
    let before = world.clients.acked();
    let progress = Instant::now();
    while world.clients.acked() < before + 10 {
        if progress.elapsed() > world.patience() {
            load.finish().await;
            return Err("no commands acknowledged before the fault".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = Instant::now();
    for (at, action) in schedule.actions() {
        tokio::time::sleep((start + at).saturating_duration_since(Instant::now())).await;
        match action {
            Action::Inject(i) => world
                .inject(i, &schedule.steps[i])
                .await
                .map_err(|e| format!("injecting {}: {e}", kind.name()))?,
            Action::Heal(i) => world.heal(i, &schedule.steps[i]),
        }
    }
    let healed = Instant::now();
    let recovered = recover(world, healed).await;
    load.finish().await;
    let recovery = recovered?;
    let exited = world.exited();
    if !exited.is_empty() {
        return Err(exited.join("; "));
    }
    check::check(world, rng).await;
    Ok(recovery)
}

/// Waits until a command is acknowledged after `healed` and the query server has
/// applied it; how long that took.
async fn recover(world: &World, healed: Instant) -> Result<Duration, String> {
    let channel = tonic::transport::Channel::from_shared(world.query.endpoint())
        .map_err(|e| e.to_string())?
        .connect_lazy();
    let mut q = QueryServiceClient::new(channel);
    loop {
        let acked = world
            .clients
            .ledger
            .lock()
            .map_err(|e| e.to_string())?
            .first_ack_after(healed);
        if let Some(position) = acked {
            let applied = q
                .get_status(pb::GetStatusRequest {})
                .await
                .map(|s| s.into_inner().applied_position)
                .unwrap_or(0);
            if applied >= position {
                return Ok(healed.elapsed());
            }
        }
        if healed.elapsed() > world.patience() {
            return Err(format!(
                "not recovered {} s after the fault ended (acknowledged after it: {acked:?})",
                world.patience().as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank.
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

fn report(args: &Args, rows: &[Row], seed: u64, took: Duration) -> String {
    use std::fmt::Write as _;
    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{}", d.as_millis()));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "chaos: seed {seed}, {} clients, {} trials per world, {:.0} s\n",
        args.clients,
        args.trials_per_world,
        took.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| fault | trials | violations | recovery p50 (ms) | recovery max (ms) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for row in rows {
        let mut sorted = row.recoveries.clone();
        sorted.sort();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.kind,
            row.trials,
            row.violations.len(),
            ms(percentile(&sorted, 0.5)),
            ms(sorted.last().copied())
        );
    }
    let failing: Vec<&(u64, String)> = rows.iter().flat_map(|r| &r.violations).collect();
    if !failing.is_empty() {
        let _ = writeln!(
            out,
            "\nFailing trials (rerun with --faults F --trial-seed S):"
        );
        for row in rows {
            for (s, v) in &row.violations {
                let _ = writeln!(out, "- {} --trial-seed {s}: {v}", row.kind);
            }
        }
    }
    out
}
