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
mod observability;
mod overload;
mod report;
mod stats;
mod system;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use shop_tests::{Kind, Nats, Server};

use crate::report::{CommandPoint, Drain, GrowthPoint, HalfLoad, QueryPoint, Results, Target};
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

    /// Stages to run: commands, half, watchers, queries, pipeline, rebuild, growth,
    /// observability, security, overload.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "commands,half,watchers,queries,pipeline,rebuild,growth,observability,security,overload"
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
    }
    // Thousands of connections and watches in the overload stage.
    let _ = shop_shared::limits::raise_open_files_limit();
    let bin_dir = system::prepare_binaries()?;
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
    let mut nats = Nats::start();
    let nats_bin = shop_tests::nats_server_bin();
    let command = Server::start(Kind::Command, &nats, &[]).await;
    let mut query = Server::start(Kind::Query, &nats, &[]).await;
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
    // Commands, with their echo and sled ceilings, at each concurrency.
    let mut orders: Vec<String> = Vec::new();
    let sweep: &[usize] = if stage("commands") || stage("queries") {
        &args.clients
    } else {
        &[]
    };
    for (run_index, &clients) in sweep.iter().enumerate() {
        let l = load(clients, &args);
        let echo_run = workload::run_echo(&echo.1.clone().into(), false, &l).await?;
        let before = workload::log_position(command_channel.clone()).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let monitor = tokio::spawn(workload::monitor_lag(
            command_channel.clone(),
            query_channel.clone(),
            Duration::from_millis(200),
            stop.clone(),
        ));
        let visibility = Visibility {
            query: shop_shared::pb::query_service_client::QueryServiceClient::new(
                query_channel.clone(),
            ),
            every: 20,
            latency: workload::shared_histogram(),
        };
        let profile = (args.perf && clients == args.reference_clients).then(|| perf_start(&args));
        let meter = system::CpuMeter::start(&[
            ("command-server", command.pid()),
            ("query-server", query.pid()),
            ("nats-server", nats.pid()),
            ("bench", Some(std::process::id())),
        ]);
        let run = workload::run_commands(
            &command.endpoint().into(),
            &format!("c{run_index}"),
            catalog,
            &l,
            Some(visibility.clone()),
        )
        .await?;
        let cpu = meter.stop();
        if let Some(Some(p)) = profile {
            perf_finish(p, &args.out);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let lag = monitor.await?;
        let after = workload::log_position(command_channel.clone()).await?;
        let drain = workload::wait_applied(query_channel.clone(), after, Duration::from_secs(60))
            .await
            .unwrap_or(Duration::from_secs(60));
        let events_per_command = (after - before) as f64 / run.summary.ok.max(1) as f64;
        let sled_dir = tempfile::tempdir()?;
        let record = (envelope_bytes * events_per_command) as usize;
        let sled = tokio::task::spawn_blocking({
            let dir = sled_dir.path().to_path_buf();
            let d = l.duration;
            move || ceilings::sled_group_commit(&dir, record, clients, d)
        })
        .await??;
        let vis = visibility
            .latency
            .lock()
            .map(|h| Latency::of(&h))
            .unwrap_or_default();
        say(format!(
            "commands x{clients}: {:.0}/s (echo {:.0}/s, sled ceiling {:.0}/s), p99 {:.2} ms, visible p99 {:.2} ms, drained in {:.2}s",
            run.summary.per_second, echo_run.per_second, sled.per_second, run.summary.latency.p99_ms, vis.p99_ms, drain.as_secs_f64()
        ));
        orders.extend(run.orders.iter().cloned());
        results.commands.push(CommandPoint {
            ratio_to_echo: run.summary.per_second / echo_run.per_second.max(1e-9),
            max_query_lag: lag.iter().map(|s| s.query_lag()).max().unwrap_or(0),
            max_relay_lag: lag
                .iter()
                .map(|s| s.log_position.saturating_sub(s.published))
                .max()
                .unwrap_or(0),
            commands: run.summary,
            kinds: run.kinds,
            events_per_command,
            echo: echo_run,
            sled_ceiling: sled,
            visibility: vis,
            drain_s: drain.as_secs_f64(),
            cpu,
            syncs: workload::syncs(command_channel.clone()).await,
            lag,
        });
    }

    // Half load: paced at half the best throughput.
    let best = results
        .commands
        .iter()
        .map(|p| p.commands.per_second)
        .fold(0.0, f64::max);
    if stage("half") && best > 0.0 {
        let mut l = load(args.reference_clients, &args);
        l.rate = Some(best / 2.0);
        let stop = Arc::new(AtomicBool::new(false));
        let monitor = tokio::spawn(workload::monitor_lag(
            command_channel.clone(),
            query_channel.clone(),
            Duration::from_millis(200),
            stop.clone(),
        ));
        let visibility = Visibility {
            query: shop_shared::pb::query_service_client::QueryServiceClient::new(
                query_channel.clone(),
            ),
            every: 10,
            latency: workload::shared_histogram(),
        };
        let run = workload::run_commands(
            &command.endpoint().into(),
            "half",
            catalog,
            &l,
            Some(visibility.clone()),
        )
        .await?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let lag = monitor.await?;
        let vis = visibility
            .latency
            .lock()
            .map(|h| Latency::of(&h))
            .unwrap_or_default();
        say(format!(
            "half load {:.0}/s: achieved {:.0}/s, p99 {:.2} ms, visible p99 {:.2} ms",
            best / 2.0,
            run.summary.per_second,
            run.summary.latency.p99_ms,
            vis.p99_ms
        ));
        results.half_load = Some(HalfLoad {
            target_rate: best / 2.0,
            syncs: workload::syncs(command_channel.clone()).await,
            commands: run.summary,
            visibility: vis,
            max_query_lag: lag.iter().map(|s| s.query_lag()).max().unwrap_or(0),
        });
    }

    // Idle watchers: the same paced load without and with 1,000 watches open.
    if stage("watchers") {
        results.watchers = Some(
            watchers_stage(
                &command,
                &query,
                &command_channel,
                &query_channel,
                catalog,
                &args,
                best,
            )
            .await?,
        );
    }

    // Queries.
    let orders = Arc::new(if orders.is_empty() {
        vec!["none".to_string()]
    } else {
        orders
    });
    let query_sweep: &[usize] = if stage("queries") { &args.clients } else { &[] };
    for &clients in query_sweep {
        let l = load(clients, &args);
        let echo_run = workload::run_echo(&echo.1.clone().into(), true, &l).await?;
        let get = workload::run_queries(
            &query.endpoint().into(),
            QueryKind::GetOrder,
            orders.clone(),
            catalog,
            &l,
        )
        .await?;
        let list = workload::run_queries(
            &query.endpoint().into(),
            QueryKind::ListOrders,
            orders.clone(),
            catalog,
            &l,
        )
        .await?;
        say(format!(
            "queries x{clients}: GetOrder {:.0}/s (echo {:.0}/s), ListOrders {:.0}/s",
            get.per_second, echo_run.per_second, list.per_second
        ));
        results.queries.push(QueryPoint {
            ratio_to_echo: get.per_second / echo_run.per_second.max(1e-9),
            get_order: get,
            list_orders: list,
            echo: echo_run,
        });
    }
    drop(echo);

    // Pipeline: the relay and the consumer draining a backlog, and the raw ceilings.
    if stage("pipeline") {
        query.terminate();
        nats.stop();
        let l = load(args.reference_clients, &args);
        workload::run_commands(&command.endpoint().into(), "backlog", catalog, &l, None).await?;
        let log_end = workload::log_position(command_channel.clone()).await?;
        let published =
            shop_shared::pb::log_service_client::LogServiceClient::new(command_channel.clone())
                .get_log_status(shop_shared::pb::GetLogStatusRequest {})
                .await?
                .into_inner()
                .published_position;
        nats.restart();
        let log =
            shop_shared::pb::log_service_client::LogServiceClient::new(command_channel.clone());
        let relay = drain(published, log_end, || {
            let mut log = log.clone();
            async move {
                log.get_log_status(shop_shared::pb::GetLogStatusRequest {})
                    .await
                    .map(|s| s.into_inner().published_position)
                    .ok()
            }
        })
        .await?;
        say(format!(
            "relay published a {}-event backlog at {:.0} events/s",
            relay.events, relay.per_second
        ));
        results.relay_drain = Some(relay);

        let applied_before = {
            query.spawn_until_listening();
            query.wait_serving().await;
            let q = workload::channels(&query.endpoint().into(), 1)
                .await?
                .remove(0);
            let s = shop_shared::pb::query_service_client::QueryServiceClient::new(q.clone())
                .get_status(shop_shared::pb::GetStatusRequest {})
                .await?
                .into_inner();
            (s.applied_position, q)
        };
        let q = shop_shared::pb::query_service_client::QueryServiceClient::new(
            applied_before.1.clone(),
        );
        let consumer = drain(applied_before.0, log_end, || {
            let mut q = q.clone();
            async move {
                q.get_status(shop_shared::pb::GetStatusRequest {})
                    .await
                    .map(|s| s.into_inner().applied_position)
                    .ok()
            }
        })
        .await?;
        say(format!(
            "query server applied a {}-event backlog at {:.0} events/s",
            consumer.events, consumer.per_second
        ));
        results.consumer_drain = Some(consumer);
    }
    if stage("pipeline") || stage("rebuild") {
        results.jetstream_publish = Some(
            ceilings::jetstream_publish(
                &nats.url(),
                envelope_bytes as usize,
                Duration::from_secs(args.seconds.max(2)),
                2048,
            )
            .await?,
        );
        results.ordered_read =
            Some(ceilings::ordered_consumer_read(&nats.url(), "SHOP_EVENTS").await?);
        say(format!(
            "ceilings: JetStream publish {:.0}/s, ordered read {:.0}/s",
            results
                .jetstream_publish
                .as_ref()
                .map_or(0.0, |c| c.per_second),
            results.ordered_read.as_ref().map_or(0.0, |c| c.per_second)
        ));
    }
    // Rebuild.
    if stage("rebuild") {
        query.terminate();
        let events = workload::log_position(command_channel.clone()).await?;
        let t = Instant::now();
        let out = std::process::Command::new(bin_dir.join("query-server"))
            .arg("rebuild")
            .arg("--data-dir")
            .arg(&query.data_dir)
            .arg("--nats-url")
            .arg(nats.url())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "rebuild failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seconds = t.elapsed().as_secs_f64();
        results.rebuild = Some(Drain {
            events,
            seconds,
            per_second: events as f64 / seconds.max(1e-9),
        });
        say(format!(
            "rebuild: {events} events in {seconds:.2}s = {:.0} events/s (process start included)",
            events as f64 / seconds
        ));
    }
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
        observability::Plan {
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
            observability::run(&plan, observability::Stage::Observability).await?;
        results.layer_costs =
            tokio::task::spawn_blocking(|| observability::layer_costs(200_000)).await?;
    }

    // TLS, tokens, mTLS, JWT next to plaintext.
    if stage("security") {
        let plan = plan(None, &args.security_configs);
        results.security = observability::run(&plan, observability::Stage::Security).await?;
        if results.layer_costs.bare_ns == 0.0 {
            results.layer_costs =
                tokio::task::spawn_blocking(|| observability::layer_costs(200_000)).await?;
        }
    }
    // Open-loop load far beyond capacity, alone and with idle watches and connections.
    if stage("overload") {
        let plan = overload::Plan {
            duration: Duration::from_secs(args.seconds),
            multiples: args.overload_multiples.clone(),
            capacity_clients: args.reference_clients,
            connections: args.overload_connections,
            watches: args.overload_watches,
            idle_connections: args.overload_idle_connections,
        };
        results.overload = Some(overload::run(&plan).await?);
    }

    // Growth, on a fresh stack.
    if stage("growth") {
        results.growth = growth(&args, catalog).await?;
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

/// Paced commands without, then with, `WATCHERS` idle watches open on the query server.
async fn watchers_stage(
    command: &Server,
    query: &Server,
    command_channel: &workload::Conn,
    query_channel: &workload::Conn,
    catalog: Catalog,
    args: &Args,
    best: f64,
) -> anyhow::Result<report::Watchers> {
    const WATCHERS: usize = 1_000;
    // Customers nobody orders for: their watches stay idle.
    let mut c =
        shop_shared::pb::command_service_client::CommandServiceClient::new(command_channel.clone());
    for i in 0..WATCHERS {
        let id = format!("idle{i}");
        let _ = c
            .register_customer(shop_shared::pb::RegisterCustomerRequest {
                customer_id: id.clone(),
                name: format!("Idle {i}"),
                email: format!("{id}@bench.example"),
                ..Default::default()
            })
            .await;
    }
    let position = workload::log_position(command_channel.clone()).await?;
    workload::wait_applied(query_channel.clone(), position, Duration::from_secs(60)).await;
    let rate = if best > 0.0 { best / 2.0 } else { 1_000.0 };
    let mut runs = Vec::new();
    let mut open = Vec::new();
    for with in [false, true] {
        if with {
            let clients = workload::channels(&query.endpoint().into(), 10).await?;
            for i in 0..WATCHERS {
                let mut q = shop_shared::pb::query_service_client::QueryServiceClient::new(
                    clients[i % clients.len()].clone(),
                );
                let stream = q
                    .watch_customer(shop_shared::pb::WatchCustomerRequest {
                        customer_id: format!("idle{i}"),
                        min_position: position,
                    })
                    .await?
                    .into_inner();
                open.push(stream);
            }
        }
        let mut l = load(args.reference_clients, args);
        l.rate = Some(rate);
        let visibility = Visibility {
            query: shop_shared::pb::query_service_client::QueryServiceClient::new(
                query_channel.clone(),
            ),
            every: 10,
            latency: workload::shared_histogram(),
        };
        let before = workload::log_position(command_channel.clone()).await?;
        let meter = system::CpuMeter::start(&[("query-server", query.pid())]);
        let tag = format!("watch{}", u8::from(with));
        workload::run_commands(
            &command.endpoint().into(),
            &tag,
            catalog,
            &l,
            Some(visibility.clone()),
        )
        .await?;
        let after = workload::log_position(command_channel.clone()).await?;
        workload::wait_applied(query_channel.clone(), after, Duration::from_secs(60)).await;
        let cores = meter.stop().first().map_or(0.0, |(_, c)| *c);
        let seconds = l.duration.as_secs_f64();
        let events = (after - before) as f64;
        runs.push(report::WatcherRun {
            events_per_second: events / seconds,
            query_cpu_ms_per_1k_events: cores * seconds * 1000.0 / (events / 1000.0).max(1e-9),
            visibility: visibility
                .latency
                .lock()
                .map(|h| Latency::of(&h))
                .unwrap_or_default(),
        });
    }
    drop(open);
    let with = runs.pop().ok_or_else(|| anyhow::anyhow!("no run"))?;
    let without = runs.pop().ok_or_else(|| anyhow::anyhow!("no run"))?;
    say(format!(
        "watchers: {:.2} -> {:.2} query-server core-ms per 1k events, visible p99 {:.2} -> {:.2} ms with {WATCHERS} idle watches",
        without.query_cpu_ms_per_1k_events, with.query_cpu_ms_per_1k_events, without.visibility.p99_ms, with.visibility.p99_ms
    ));
    Ok(report::Watchers {
        watchers: WATCHERS,
        rate,
        without,
        with,
    })
}

/// How fast a position moves from `from` to `to`, timed from its first move (so that
/// reconnecting and start-up are not counted).
async fn drain<F, Fut>(from: u64, to: u64, mut position: F) -> anyhow::Result<Drain>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<u64>>,
{
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut first, mut at_first) = (None, from);
    loop {
        let now = position().await.unwrap_or(from);
        if first.is_none() && now > from {
            first = Some(Instant::now());
            at_first = now;
        }
        if now >= to {
            let seconds = first.map_or(0.0, |t: Instant| t.elapsed().as_secs_f64());
            return Ok(Drain {
                events: to - from,
                seconds,
                per_second: (to - at_first) as f64 / seconds.max(1e-9),
            });
        }
        anyhow::ensure!(Instant::now() < deadline, "no progress from {from} to {to}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
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

async fn growth(args: &Args, catalog: Catalog) -> anyhow::Result<Vec<GrowthPoint>> {
    let nats = Nats::start();
    let mut command = Server::start(Kind::Command, &nats, &[]).await;
    let mut query = Server::start(Kind::Query, &nats, &[]).await;
    workload::setup(&command.endpoint().into(), catalog).await?;
    let channel = workload::channels(&command.endpoint().into(), 1)
        .await?
        .remove(0);
    let mut sizes = vec![0u64];
    sizes.extend(args.growth.iter().copied());
    let mut points: Vec<GrowthPoint> = Vec::new();
    let l = load(args.reference_clients, args);
    for (i, size) in sizes.into_iter().enumerate() {
        let mut chunk = 0;
        while workload::log_position(channel.clone()).await? < size {
            let mut fill = l.clone();
            fill.duration = Duration::from_secs(5);
            workload::run_commands(
                &command.endpoint().into(),
                &format!("fill{i}-{chunk}"),
                catalog,
                &fill,
                None,
            )
            .await?;
            chunk += 1;
            say(format!(
                "growth: filling the log: {} / {size} events",
                workload::log_position(channel.clone()).await?
            ));
        }
        let in_log = workload::log_position(channel.clone()).await?;
        let q = workload::channels(&query.endpoint().into(), 1)
            .await?
            .remove(0);
        workload::wait_applied(q, in_log, Duration::from_secs(600)).await;
        let run = workload::run_commands(
            &command.endpoint().into(),
            &format!("growth{i}"),
            catalog,
            &l,
            None,
        )
        .await?;
        let command_rss = command.pid().map_or(0.0, system::rss_mb);
        let query_rss = query.pid().map_or(0.0, system::rss_mb);
        // The first start scans what sled wrote since its last open (sled 0.34 writes its
        // page-table snapshot only when it opens a store); the second shows the cost after.
        let command_start = restart_time(&mut command).await;
        let command_restart = restart_time(&mut command).await;
        let query_start = restart_time(&mut query).await;
        let query_restart = restart_time(&mut query).await;
        let empty = points
            .first()
            .map_or(run.summary.per_second, |p| p.commands_per_second);
        say(format!(
            "growth: {in_log} events: {:.0} commands/s, RSS {command_rss:.0}/{query_rss:.0} MB, start {command_start:.2}/{query_start:.2} s (again {command_restart:.2}/{query_restart:.2} s)",
            run.summary.per_second
        ));
        points.push(GrowthPoint {
            events_in_log: in_log,
            commands_per_second: run.summary.per_second,
            ratio_to_empty: run.summary.per_second / empty.max(1e-9),
            command_server_rss_mb: command_rss,
            query_server_rss_mb: query_rss,
            command_server_start_s: command_start,
            query_server_start_s: query_start,
            command_server_restart_s: command_restart,
            query_server_restart_s: query_restart,
            command_data_mb: system::dir_mb(&command.data_dir),
            query_data_mb: system::dir_mb(&query.data_dir),
        });
    }
    Ok(points)
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

/// Graceful stop, then the time from spawn to health SERVING.
async fn restart_time(server: &mut Server) -> f64 {
    server.terminate();
    let t = Instant::now();
    server.spawn_until_listening();
    server.wait_serving().await;
    t.elapsed().as_secs_f64()
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
fn lag_bounded(lag: &[workload::LagSample]) -> bool {
    if lag.len() < 6 {
        return true;
    }
    let third = lag.len() / 3;
    let mean = |s: &[workload::LagSample]| {
        s.iter().map(|x| x.query_lag() as f64).sum::<f64>() / s.len().max(1) as f64
    };
    let middle = mean(&lag[third..2 * third]);
    let last = mean(&lag[2 * third..]);
    last <= middle * 1.5 + 2_000.0
}
