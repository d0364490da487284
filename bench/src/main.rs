//! The benchmark. Starts its own stack (nats-server, command server, query server, each a
//! process with its data in a temp dir) and measures, in one run:
//!
//! - commands: the mixed durable workload at each concurrency, next to the echo ceiling
//!   (a no-op tonic server, same request shapes, same concurrency) and a raw sled
//!   group-commit ceiling; ack → visible latency of sampled commands; query lag;
//! - half load: the same workload paced at half the best rate (p99, ack → visible);
//! - queries: GetOrder and ListOrders at each concurrency next to an echo GetOrder;
//! - pipeline: relay publishing a backlog vs raw JetStream publish; the query server
//!   applying a backlog and `query-server rebuild` vs a raw ordered-consumer read;
//! - growth: command rate, RSS and start-up time with 0, 1M (and, by flag, 10M) events;
//! - observability: the command workload with metrics and traces off and on, alternating;
//! - security: the same with plaintext, TLS, tokens, mTLS and JWTs, alternating.
//!
//! Output (in `--out`, default `bench-results/`): `results.json` (every figure),
//! `report.md` (tables, ratios next to ceilings, targets), `throughput.svg`,
//! `latency-cdf.svg`, and with `--perf` a profile of the command server.
//!
//! `cargo run --release -p bench` for the full run; `--quick` for a few seconds per
//! stage (CI: proves the harness works, numbers mean nothing).

// A command-line tool that prints its report (the servers log through `tracing`).
#![allow(clippy::print_stdout)]

mod ceilings;
mod report;
mod stages;
mod stats;
mod system;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use shop_tests::{Nats, Server, ServerKind};

use crate::report::{Results, Target};
use crate::stages::Stack;
use crate::stats::Latency;
use crate::workload::{Catalog, Load, QueryKind, Visibility};

#[derive(clap::Parser, Debug)]
#[command(
    name = "bench",
    about = "End-to-end benchmark of the shop stack, each figure next to a ceiling measured in the same run."
)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,

    /// A second or so per stage, tiny growth: proves the harness works (CI). Numbers mean nothing.
    #[arg(long)]
    quick: bool,

    /// Concurrent clients to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    clients: Vec<usize>,

    /// HTTP/2 connections the clients share.
    #[arg(long, default_value_t = 4)]
    connections: usize,

    /// Seconds per load run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,

    /// Log sizes (events) for the growth stage, besides the empty log. `1000000,10000000`
    /// for the manual run.
    #[arg(long, value_delimiter = ',', default_value = "1000000")]
    growth: Vec<u64>,

    /// Clients for the half-load, relay-drain and growth runs.
    #[arg(long, default_value_t = 64)]
    reference_clients: usize,

    /// Stages to run: commands, half, watchers, queries, mixed, pipeline, rebuild, cluster, growth,
    /// observability, security, overload.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "commands,half,watchers,queries,mixed,pipeline,rebuild,cluster,failover,growth,observability,security,overload"
    )]
    stages: Vec<String>,

    /// Stage `overload`: offered rates as multiples of the measured capacity, one run
    /// each; the last is run again with the idle watches and connections.
    #[arg(long, value_delimiter = ',', default_value = "2,10")]
    overload_multiples: Vec<f64>,

    /// Stage `overload`: connections the open-loop load is spread over.
    #[arg(long, default_value_t = 64)]
    overload_connections: usize,

    /// Stage `overload`: idle WatchCustomer streams held open during the second run.
    #[arg(long, default_value_t = 10_000)]
    overload_watches: usize,

    /// Stage `overload`: idle connections held open to each server during the second run.
    #[arg(long, default_value_t = 1_000)]
    overload_idle_connections: usize,

    /// Rounds of the observability and security stages (each runs every configuration once).
    #[arg(long, default_value_t = 3)]
    rounds: usize,

    /// Configurations of the observability stage to run (default: all): baseline, off,
    /// metrics, "metrics+traces 1%", "metrics+traces 100%".
    #[arg(long, value_delimiter = ',')]
    observability_configs: Vec<String>,

    /// Configurations of the security stage to run (default: all): plaintext, tls,
    /// tls+tokens, mtls+tokens, tls+jwt.
    #[arg(long, value_delimiter = ',')]
    security_configs: Vec<String>,

    /// Pace the observability and security stages at this total rate (commands/s) instead of as fast
    /// as possible: at a fixed rate, CPU per command compares configurations directly.
    #[arg(long)]
    observability_rate: Option<f64>,

    /// Stage `mixed`: pace the writes at this total rate (commands/s) instead of as fast
    /// as answered (reads next to writes that leave CPU free).
    #[arg(long)]
    mixed_write_rate: Option<f64>,

    /// Stage `failover`: writer kills (each timed until the new writer's first
    /// acknowledgement).
    #[arg(long, default_value_t = 20)]
    failover_trials: usize,

    /// Stage `failover`: the servers' `--lease-ttl-ms` (their default: 3000).
    #[arg(long, default_value_t = 3000)]
    failover_ttl_ms: u64,

    /// Server binaries of another build (e.g. an older commit's `target/release`): the
    /// observability stage then runs them too, as `baseline`, for a before/after.
    #[arg(long)]
    baseline_bin_dir: Option<PathBuf>,

    /// Record a CPU profile (perf, every CPU, call graphs) during the reference-clients
    /// command run: `perf-all.data`, `perf-top.txt` (hottest symbols per process) and,
    /// with python3, `profile.md` (each server's CPU split by part; scripts/perf-split.py).
    /// Build the servers with frame pointers for call graphs (scripts/profile.sh does).
    #[arg(long)]
    perf: bool,

    /// Where to write the results.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// Serve the no-op echo ceiling (used by the benchmark itself).
    EchoServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Drive a running stack with the mixed command workload (and optionally GetOrder)
    /// and print what it measured; starts nothing.
    Load {
        /// Command server, e.g. http://127.0.0.1:50051.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        command_addr: String,
        /// Query server; when given, ack → visible is sampled and GetOrder is loaded too.
        #[arg(long)]
        query_addr: Option<String>,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Total rate to pace at (commands/s); as fast as possible when absent.
        #[arg(long)]
        rate: Option<f64>,
        /// Register the bench customers and products first.
        #[arg(long)]
        setup: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    match args.command.take() {
        Some(Sub::EchoServer { listen }) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            return rt.block_on(ceilings::serve_echo(listen));
        }
        Some(Sub::Load {
            command_addr,
            query_addr,
            clients,
            connections,
            seconds,
            rate,
            setup,
        }) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let l = Load {
                concurrency: clients,
                connections,
                duration: Duration::from_secs(seconds),
                rate,
            };
            return rt.block_on(load_running(command_addr, query_addr, l, setup));
        }
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .init();
    if args.quick {
        args.clients = vec![4];
        args.connections = 2;
        args.seconds = 1;
        args.growth = vec![3_000];
        args.reference_clients = 8;
        args.rounds = 1;
        args.overload_connections = 8;
        args.overload_watches = 200;
        args.overload_idle_connections = 20;
        args.failover_trials = 2;
    }
    // Thousands of connections and watches in the overload stage.
    let _ = shop_shared::limits::raise_open_files_limit();
    let bin_dir = shop_tests::prepare_binaries()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args, bin_dir))
}

fn say(message: impl AsRef<str>) {
    eprintln!("[bench] {}", message.as_ref());
}

struct EchoProcess(std::process::Child, String);

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_echo() -> anyhow::Result<EchoProcess> {
    let port = shop_tests::free_port();
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["echo-server", "--listen", &format!("127.0.0.1:{port}")])
        .spawn()?;
    let endpoint = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if workload::channels(&endpoint.clone().into(), 1)
            .await
            .is_ok()
        {
            return Ok(EchoProcess(child, endpoint));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("echo server did not start")
}

fn load(concurrency: usize, args: &Args) -> Load {
    Load {
        concurrency,
        connections: args.connections.min(concurrency).max(1),
        duration: Duration::from_secs(args.seconds),
        rate: None,
    }
}

async fn run(args: Args, bin_dir: PathBuf) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut results = Results {
        started_at: run_clock(),
        mode: if args.quick {
            "quick".into()
        } else {
            "full".into()
        },
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
        ..Default::default()
    };
    let nats = Nats::start();
    let nats_bin = shop_tests::nats_server_bin();
    let command = Server::start(ServerKind::Command, &nats, &[]).await;
    let query = Server::start(ServerKind::Query, &nats, &[]).await;
    results.machine = system::machine(&command.data_dir, &nats_bin);
    say(format!(
        "stack up (binaries from {}); {} cores",
        bin_dir.display(),
        results.machine.cores
    ));
    let echo = start_echo().await?;

    let max_clients = args
        .clients
        .iter()
        .copied()
        .max()
        .unwrap_or(64)
        .max(args.reference_clients);
    let catalog = Catalog {
        customers: (max_clients * 4).max(1000),
        skus: 200,
    };
    workload::setup(&command.endpoint().into(), catalog).await?;
    let command_channel = workload::channels(&command.endpoint().into(), 1)
        .await?
        .remove(0);
    let query_channel = workload::channels(&query.endpoint().into(), 1)
        .await?
        .remove(0);
    let (envelope_bytes, _) = envelope_size(command_channel.clone()).await?;

    let stage = |name: &str| args.stages.iter().any(|s| s == name);
    let mut stack = Stack {
        nats,
        command,
        query,
        command_channel,
        query_channel,
        catalog,
        envelope_bytes,
    };
    let sweep: &[usize] = if stage("commands") || stage("queries") {
        &args.clients
    } else {
        &[]
    };
    let orders = stages::commands::run(&stack, &args, sweep, &echo.1, &mut results).await?;
    let best = results
        .commands
        .iter()
        .map(|p| p.commands.per_second)
        .fold(0.0, f64::max);
    if stage("half") {
        stages::half_load::run(&stack, &args, &mut results).await?;
    }
    if stage("watchers") {
        results.watchers = Some(stages::watchers::run(&stack, &args, best).await?);
    }
    if stage("queries") {
        let orders = orders.clone();
        stages::queries::run(&stack, &args, &args.clients, &echo.1, orders, &mut results).await?;
    }
    if stage("mixed") {
        stages::mixed::run(&stack, &args, orders, &mut results).await?;
    }
    drop(echo);
    if stage("pipeline") {
        stages::pipeline::run(&mut stack, &args, &mut results).await?;
    }
    if stage("pipeline") || stage("rebuild") {
        stages::pipeline::ceilings(&stack, &args, &mut results).await?;
    }
    if stage("rebuild") {
        stages::rebuild::run(&mut stack, &bin_dir, &mut results).await?;
    }
    let Stack {
        nats,
        command,
        query,
        ..
    } = stack;
    save_logs(
        &args.out,
        &[
            ("command-server", command.log()),
            ("query-server", query.log()),
            ("nats-server", nats.log()),
        ],
    );
    drop(command);
    drop(query);
    drop(nats);

    // The observability and security stages: configurations alternating, each run on a
    // fresh stack, at the reference concurrency, paced when asked.
    let plan = |baseline_bin_dir: Option<PathBuf>, configs: &[String]| {
        let mut paced = load(args.reference_clients, &args);
        paced.rate = args.observability_rate;
        stages::observability::Plan {
            load: paced,
            rounds: args.rounds.max(1),
            catalog,
            baseline_bin_dir,
            configs: configs.to_vec(),
        }
    };
    if stage("observability") {
        let plan = plan(args.baseline_bin_dir.clone(), &args.observability_configs);
        results.observability =
            stages::observability::run(&plan, stages::observability::Stage::Observability).await?;
        results.layer_costs =
            tokio::task::spawn_blocking(|| stages::observability::layer_costs(200_000)).await?;
    }

    // TLS, tokens, mTLS, JWT next to plaintext.
    if stage("security") {
        let plan = plan(None, &args.security_configs);
        results.security =
            stages::observability::run(&plan, stages::observability::Stage::Security).await?;
        if results.layer_costs.bare_ns == 0.0 {
            results.layer_costs =
                tokio::task::spawn_blocking(|| stages::observability::layer_costs(200_000)).await?;
        }
    }
    // Open-loop load far beyond capacity, alone and with idle watches and connections.
    if stage("overload") {
        let plan = stages::overload::Plan {
            duration: Duration::from_secs(args.seconds),
            multiples: args.overload_multiples.clone(),
            capacity_clients: args.reference_clients,
            connections: args.overload_connections,
            watches: args.overload_watches,
            idle_connections: args.overload_idle_connections,
        };
        results.overload = Some(stages::overload::run(&plan).await?);
    }

    // One NATS node against a 3-node R3 cluster, --ack local and replicated.
    if stage("cluster") {
        results.cluster = stages::cluster::run(&args, catalog).await?;
    }

    // Writer kill → the standby's first acknowledgement; a standby's catch-up rate.
    if stage("failover") {
        results.failover = Some(stages::failover::run(&args, catalog).await?);
    }

    // Growth, on a fresh stack.
    if stage("growth") {
        results.growth = stages::growth::run(&args, catalog).await?;
    }

    results.targets = targets(&results, &args);
    results.write(&args.out)?;
    println!("{}", results.markdown());
    say(format!(
        "done in {:.0}s; results in {}",
        started.elapsed().as_secs_f64(),
        args.out.display()
    ));
    Ok(())
}

/// Average envelope size of the log's first events, and how many were sampled.
async fn envelope_size(command: workload::Conn) -> anyhow::Result<(f64, usize)> {
    use prost::Message;
    let events = shop_shared::pb::log_service_client::LogServiceClient::new(command)
        .read_log(shop_shared::pb::ReadLogRequest {
            from_position: 1,
            limit: 1000,
        })
        .await?
        .into_inner()
        .events;
    let total: usize = events.iter().map(Message::encoded_len).sum();
    Ok((total as f64 / events.len().max(1) as f64, events.len()))
}

/// The `load` subcommand: the command workload (and GetOrder) against a running stack.
async fn load_running(
    command: String,
    query: Option<String>,
    l: Load,
    setup: bool,
) -> anyhow::Result<()> {
    let catalog = Catalog {
        customers: (l.concurrency * 4).max(1000),
        skus: 200,
    };
    if setup {
        workload::setup(&command.clone().into(), catalog).await?;
    }
    let visibility = match &query {
        Some(q) => Some(Visibility {
            query: shop_shared::pb::query_service_client::QueryServiceClient::new(
                workload::channels(&q.clone().into(), 1).await?.remove(0),
            ),
            every: 20,
            latency: workload::shared_histogram(),
        }),
        None => None,
    };
    let tag = format!("load{}", shop_shared::events::now_micros());
    let run = workload::run_commands(
        &command.clone().into(),
        &tag,
        catalog,
        &l,
        visibility.clone(),
    )
    .await?;
    let s = &run.summary;
    say(format!(
        "commands x{}: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, errors {:?}",
        s.concurrency,
        s.per_second,
        s.latency.p50_ms,
        s.latency.p99_ms,
        s.latency.p999_ms,
        s.errors
    ));
    if let (Some(q), Some(v)) = (query, visibility) {
        let vis = v
            .latency
            .lock()
            .map(|h| Latency::of(&h))
            .unwrap_or_default();
        say(format!(
            "ack → visible p50 {:.2} ms, p99 {:.2} ms",
            vis.p50_ms, vis.p99_ms
        ));
        let orders = Arc::new(if run.orders.is_empty() {
            vec!["none".to_string()]
        } else {
            run.orders
        });
        let get =
            workload::run_queries(&q.clone().into(), QueryKind::GetOrder, orders, catalog, &l)
                .await?;
        say(format!(
            "GetOrder x{}: {:.0}/s, p99 {:.2} ms",
            get.concurrency, get.per_second, get.latency.p99_ms
        ));
    }
    Ok(())
}

/// Keeps the processes' logs with the results (their temp dirs go away).
fn save_logs(out: &std::path::Path, logs: &[(&str, String)]) {
    let dir = out.join("logs");
    if std::fs::create_dir_all(&dir).is_ok() {
        for (name, log) in logs {
            let _ = std::fs::write(dir.join(format!("{name}.log")), log);
        }
    }
}

/// A perf recording of every CPU, if perf is available.
struct Perf {
    child: std::process::Child,
    data: PathBuf,
}

fn perf_start(args: &Args) -> Option<Perf> {
    std::fs::create_dir_all(&args.out).ok()?;
    let data = args.out.join("perf-all.data");
    let child = std::process::Command::new("perf")
        .args(["record", "-a", "-g", "-e", "cpu-clock", "-F", "499", "-o"])
        .arg(&data)
        .args(["--", "sleep", &args.seconds.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| say(format!("perf not started ({e}); no profile")))
        .ok()?;
    Some(Perf { child, data })
}

fn perf_finish(mut perf: Perf, out: &std::path::Path) {
    let _ = perf.child.wait();
    let top = std::process::Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "comm,dso,symbol",
        ])
        .args(["--percent-limit", "0.5", "-g", "none", "-i"])
        .arg(&perf.data)
        .output();
    if let Ok(r) = top {
        let _ = std::fs::write(out.join("perf-top.txt"), r.stdout);
    }
    // Each server's CPU split by part (scripts/perf-split.py), if python3 is there.
    let split = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/perf-split.py");
    let script = std::process::Command::new("perf")
        .args(["script", "-F", "comm,pid,ip,sym", "-i"])
        .arg(&perf.data)
        .stderr(std::process::Stdio::null())
        .output();
    if let Ok(dump) = script {
        let child = std::process::Command::new("python3")
            .arg(&split)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn();
        if let Ok(mut child) = child {
            if let Some(mut stdin) = child.stdin.take() {
                use std::io::Write;
                let _ = stdin.write_all(&dump.stdout);
            }
            if let Ok(o) = child.wait_with_output() {
                let _ = std::fs::write(out.join("profile.md"), o.stdout);
            }
        }
    }
}

fn run_clock() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// P1–P6 against this run's figures.
fn targets(r: &Results, args: &Args) -> Vec<Target> {
    let mut t = Vec::new();
    let reference = r
        .commands
        .iter()
        .find(|p| p.commands.concurrency == args.reference_clients)
        .or_else(|| {
            r.commands
                .iter()
                .max_by(|a, b| a.commands.per_second.total_cmp(&b.commands.per_second))
        });
    if let Some(p) = reference {
        t.push(Target {
            id: "P1".into(),
            goal: "durable mixed commands ≥ 50% of the echo ceiling at the same concurrency".into(),
            measured: format!(
                "{:.0}/s vs echo {:.0}/s at {} clients = {:.0}%",
                p.commands.per_second,
                p.echo.per_second,
                p.commands.concurrency,
                100.0 * p.ratio_to_echo
            ),
            met: p.ratio_to_echo >= 0.5,
        });
    }
    if let Some(h) = &r.half_load {
        t.push(Target {
            id: "P2".into(),
            goal: "command p99 ≤ 5 ms at half of the maximum throughput".into(),
            measured: format!(
                "p99 {:.2} ms at {:.0}/s",
                h.commands.latency.p99_ms, h.commands.per_second
            ),
            met: h.commands.latency.p99_ms <= 5.0,
        });
        let max_load = r
            .commands
            .iter()
            .max_by(|a, b| a.commands.per_second.total_cmp(&b.commands.per_second));
        let bounded = max_load.is_some_and(|p| lag_bounded(&p.lag));
        t.push(Target {
            id: "P3".into(),
            goal: "ack → visible p99 ≤ 20 ms at half load; query lag bounded at maximum load".into(),
            measured: format!(
                "visible p99 {:.2} ms; at max load lag peaked at {} events and drained in {:.2} s ({})",
                h.visibility.p99_ms,
                max_load.map_or(0, |p| p.max_query_lag),
                max_load.map_or(0.0, |p| p.drain_s),
                if bounded { "not growing" } else { "growing" }
            ),
            met: h.visibility.p99_ms <= 20.0 && bounded,
        });
    }
    if let (Some(rb), Some(oc)) = (&r.rebuild, &r.ordered_read) {
        let ratio = rb.per_second / oc.per_second.max(1e-9);
        t.push(Target {
            id: "P4".into(),
            goal: "rebuild ≥ 50% of the raw ordered-consumer ceiling".into(),
            measured: format!(
                "{:.0} events/s vs {:.0}/s = {:.0}%",
                rb.per_second,
                oc.per_second,
                100.0 * ratio
            ),
            met: ratio >= 0.5,
        });
    }
    if let Some(q) = r
        .queries
        .iter()
        .find(|q| q.get_order.concurrency == args.reference_clients)
        .or_else(|| r.queries.last())
    {
        t.push(Target {
            id: "P5".into(),
            goal: "GetOrder ≥ 70% of the echo ceiling".into(),
            measured: format!(
                "{:.0}/s vs echo {:.0}/s at {} clients = {:.0}%",
                q.get_order.per_second,
                q.echo.per_second,
                q.get_order.concurrency,
                100.0 * q.ratio_to_echo
            ),
            met: q.ratio_to_echo >= 0.7,
        });
    }
    if let Some(g) = r.growth.last() {
        t.push(Target {
            id: "P6".into(),
            goal: "with 10M events: each server starts ≤ 2 s, RSS ≤ 300 MB, command rate within 10% of the empty log".into(),
            measured: format!(
                "at {} events: start {:.2}/{:.2} s (again {:.2}/{:.2} s), RSS {:.0}/{:.0} MB, rate {:.0}% of empty",
                g.events_in_log,
                g.command_server_start_s,
                g.query_server_start_s,
                g.command_server_restart_s,
                g.query_server_restart_s,
                g.command_server_rss_mb,
                g.query_server_rss_mb,
                100.0 * g.ratio_to_empty
            ),
            met: g.events_in_log >= 10_000_000
                && g.command_server_start_s <= 2.0
                && g.query_server_start_s <= 2.0
                && g.command_server_rss_mb <= 300.0
                && g.query_server_rss_mb <= 300.0
                && g.ratio_to_empty >= 0.9,
        });
    }
    t
}

/// Whether the query lag stayed bounded: the lag in the last third of the run is not
/// well above the lag in the middle third.
fn lag_bounded(lag: &[crate::report::LagSample]) -> bool {
    if lag.len() < 6 {
        return true;
    }
    let third = lag.len() / 3;
    let mean = |s: &[crate::report::LagSample]| {
        s.iter().map(|x| x.query_lag() as f64).sum::<f64>() / s.len().max(1) as f64
    };
    let middle = mean(&lag[third..2 * third]);
    let last = mean(&lag[2 * third..]);
    last <= middle * 1.5 + 2_000.0
}
