//! Stage `overload` (RELIABILITY.md: Overload): commands offered far beyond capacity, open loop.
//!
//! On a fresh stack, the capacity for PlaceOrder (two lines) is measured first with
//! closed-loop clients. Then PlaceOrder is offered at `multiple` × that rate on a fixed
//! schedule that never waits for answers (open loop: a slow or stalled server cannot
//! slow the offered load down, and latency counts from the scheduled send time, so
//! queueing in the bench is charged to the server), over many connections, while four
//! readers call GetCustomer in a closed loop on the query server and both servers' RSS is
//! sampled. Twice: alone, then with `watches` idle WatchCustomer streams on the query
//! server and `idle_connections` idle connections held open to each server.
//!
//! What it reports per run: offered, sent and admitted rates, shed (RESOURCE_EXHAUSTED)
//! count and how fast sheds were answered, other outcomes, the admitted p50/p99, the
//! readers' rate, p99 and errors, and the RSS of both servers before and at most.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use shop_shared::pb;
use shop_tests::{Nats, Server, ServerKind};
use tokio::sync::Semaphore;

use crate::stats::{self, Latency};
use crate::system;
use crate::workload::{self, Catalog, Conn};

use pb::command_service_client::CommandServiceClient;
use pb::query_service_client::QueryServiceClient;

/// Requests the bench keeps in flight at most; beyond, a scheduled request is counted as
/// not sent (so the bench's own memory stays bounded if a server stops answering).
const BENCH_IN_FLIGHT_MAX: usize = 20_000;
/// Each request's deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Readers on the query server during the run.
const READERS: usize = 4;

/// What the stage runs.
pub struct Plan {
    pub duration: Duration,
    /// Offered rates as multiples of the capacity, one run each; the last one again with
    /// the idle watches and connections.
    pub multiples: Vec<f64>,
    pub capacity_clients: usize,
    /// Connections the open-loop load is spread over.
    pub connections: usize,
    pub watches: usize,
    pub idle_connections: usize,
}

/// One open-loop run.
#[derive(Debug, Clone, Serialize, Default)]
pub struct OverloadRun {
    pub name: String,
    pub multiple: f64,
    pub offered_per_second: f64,
    pub sent_per_second: f64,
    /// Scheduled requests the bench could not send (its own in-flight cap).
    pub not_sent: u64,
    pub admitted: u64,
    pub admitted_per_second: f64,
    pub admitted_latency: Latency,
    /// From the moment the bench sent each request (without its own sending delay).
    pub admitted_latency_from_send: Latency,
    /// Answered RESOURCE_EXHAUSTED.
    pub shed: u64,
    pub shed_fraction: f64,
    pub shed_latency: Latency,
    /// Every other outcome, by gRPC code.
    pub other: BTreeMap<String, u64>,
    pub reads_per_second: f64,
    pub read_latency: Latency,
    pub read_errors: BTreeMap<String, u64>,
    pub command_rss_mb_before: f64,
    pub command_rss_mb_max: f64,
    pub query_rss_mb_before: f64,
    pub query_rss_mb_max: f64,
    /// From the end of the run (every answer in) until a command was admitted again.
    pub command_after_ms: f64,
}

/// The stage's results.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Overload {
    pub multiples: Vec<f64>,
    pub capacity_per_second: f64,
    pub capacity_latency: Latency,
    pub watches: usize,
    pub idle_connections: usize,
    pub runs: Vec<OverloadRun>,
}

/// Outcomes of the open-loop commands.
struct Outcomes {
    admitted: Histogram<u64>,
    /// The admitted ones from the moment the bench sent them (without the bench's own
    /// delay in sending).
    admitted_from_send: Histogram<u64>,
    shed: Histogram<u64>,
    other: BTreeMap<String, u64>,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, 59_000_000)
}

fn place_order(tag: &str, n: u64, catalog: Catalog) -> pb::PlaceOrderRequest {
    let i = n as usize;
    let first = i % catalog.skus;
    let second = (i * 7 + 1) % catalog.skus;
    let mut lines = vec![pb::OrderLineRequest {
        sku: Catalog::sku(first),
        quantity: 1,
    }];
    if second != first {
        lines.push(pb::OrderLineRequest {
            sku: Catalog::sku(second),
            quantity: 1,
        });
    }
    pb::PlaceOrderRequest {
        command_id: format!("{tag}-{n}"),
        order_id: format!("{tag}-{n}"),
        customer_id: Catalog::customer(i % catalog.customers),
        lines,
        ..Default::default()
    }
}

fn with_deadline<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(REQUEST_TIMEOUT);
    request
}

/// Closed loop: `clients` clients placing orders back to back; completions per second
/// and latency.
async fn capacity(
    conns: &[Conn],
    clients: usize,
    duration: Duration,
    catalog: Catalog,
) -> anyhow::Result<(f64, Latency)> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let mut c = CommandServiceClient::new(conns[client % conns.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut latency = stats::histogram();
            let mut n = 0u64;
            while start.elapsed() < duration {
                n += 1;
                let t = Instant::now();
                let order = place_order(&format!("cap{client}"), n, catalog);
                if c.place_order(with_deadline(order)).await.is_ok() {
                    let _ = latency.record(micros(t.elapsed()));
                }
            }
            latency
        }));
    }
    let mut all = stats::histogram();
    for t in tasks {
        let _ = all.add(&t.await?);
    }
    let per_second = all.len() as f64 / start.elapsed().as_secs_f64();
    Ok((per_second, Latency::of(&all)))
}

/// Open loop: PlaceOrder at `rate`/s for `duration`, whatever the answers.
async fn open_loop(
    conns: &[Conn],
    rate: f64,
    duration: Duration,
    tag: &str,
    catalog: Catalog,
) -> (Outcomes, u64, u64, Duration) {
    let outcomes = Arc::new(Mutex::new(Outcomes {
        admitted: stats::histogram(),
        admitted_from_send: stats::histogram(),
        shed: stats::histogram(),
        other: BTreeMap::new(),
    }));
    let in_flight = Arc::new(Semaphore::new(BENCH_IN_FLIGHT_MAX));
    let start = Instant::now();
    let (mut scheduled, mut not_sent) = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while start.elapsed() < duration {
        tick.tick().await;
        let due = (start.elapsed().min(duration).as_secs_f64() * rate) as u64;
        while scheduled < due {
            let at = start + Duration::from_secs_f64(scheduled as f64 / rate);
            let n = scheduled;
            scheduled += 1;
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                not_sent += 1;
                continue;
            };
            let mut c = CommandServiceClient::new(conns[n as usize % conns.len()].clone());
            let request = with_deadline(place_order(tag, n, catalog));
            let outcomes = outcomes.clone();
            tokio::spawn(async move {
                let sent = Instant::now();
                let answer = c.place_order(request).await;
                let took = micros(at.elapsed());
                let mut o = outcomes.lock().unwrap_or_else(|e| e.into_inner());
                let recorded = match answer {
                    Ok(_) => {
                        let _ = o.admitted_from_send.record(micros(sent.elapsed()));
                        o.admitted.record(took)
                    }
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => o.shed.record(took),
                    Err(s) => {
                        *o.other.entry(format!("{:?}", s.code())).or_default() += 1;
                        Ok(())
                    }
                };
                debug_assert!(recorded.is_ok(), "latencies are clamped to the histogram");
                drop(permit);
            });
        }
    }
    let sending = start.elapsed();
    // Every answer (or deadline) is in before the outcomes are read.
    let _ = tokio::time::timeout(
        REQUEST_TIMEOUT + Duration::from_secs(5),
        in_flight.acquire_many(BENCH_IN_FLIGHT_MAX as u32),
    )
    .await;
    let outcomes = outcomes.lock().unwrap_or_else(|e| e.into_inner());
    let copy = Outcomes {
        admitted: outcomes.admitted.clone(),
        admitted_from_send: outcomes.admitted_from_send.clone(),
        shed: outcomes.shed.clone(),
        other: outcomes.other.clone(),
    };
    (copy, scheduled, not_sent, sending)
}

/// Closed-loop GetCustomer readers until `stop`; (reads, latency, errors).
async fn readers(
    conn: Conn,
    catalog: Catalog,
    stop: Arc<AtomicBool>,
) -> (u64, Histogram<u64>, BTreeMap<String, u64>) {
    let mut tasks = Vec::new();
    for reader in 0..READERS {
        let mut q = QueryServiceClient::new(conn.clone());
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latency = stats::histogram();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = reader;
            while !stop.load(Ordering::Relaxed) {
                n += READERS;
                let t = Instant::now();
                let request = pb::GetCustomerRequest {
                    customer_id: Catalog::customer(n % catalog.customers),
                    ..Default::default()
                };
                match q.get_customer(with_deadline(request)).await {
                    Ok(_) => {
                        let _ = latency.record(micros(t.elapsed()));
                    }
                    Err(s) => *errors.entry(format!("{:?}", s.code())).or_default() += 1,
                }
            }
            (latency, errors)
        }));
    }
    let mut all = stats::histogram();
    let mut errors = BTreeMap::new();
    for t in tasks {
        if let Ok((latency, e)) = t.await {
            let _ = all.add(&latency);
            for (code, count) in e {
                *errors.entry(code).or_insert(0) += count;
            }
        }
    }
    (all.len(), all, errors)
}

/// Samples the peak RSS of two processes until `stop`.
async fn peak_rss(pids: [Option<u32>; 2], stop: Arc<AtomicBool>) -> [f64; 2] {
    let mut peak = [0.0f64; 2];
    while !stop.load(Ordering::Relaxed) {
        for (p, pid) in peak.iter_mut().zip(pids) {
            *p = p.max(pid.map_or(0.0, system::rss_mb));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak
}

/// One overload run on a running stack.
async fn overload_run(
    name: &str,
    tag: &str,
    stack: (&Server, &Server),
    (rate, capacity): (f64, f64),
    plan: &Plan,
    catalog: Catalog,
) -> anyhow::Result<OverloadRun> {
    let (command, query) = stack;
    let conns = workload::channels(&command.endpoint().into(), plan.connections).await?;
    let reader_conn = workload::channels(&query.endpoint().into(), 1)
        .await?
        .remove(0);
    let rss_before = [
        command.pid().map_or(0.0, system::rss_mb),
        query.pid().map_or(0.0, system::rss_mb),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(peak_rss([command.pid(), query.pid()], stop.clone()));
    let reading = tokio::spawn(readers(reader_conn, catalog, stop.clone()));
    let read_start = Instant::now();
    let (outcomes, scheduled, not_sent, sending) =
        open_loop(&conns, rate, plan.duration, tag, catalog).await;
    stop.store(true, Ordering::Relaxed);
    let read_seconds = read_start.elapsed().as_secs_f64();
    let (reads, read_latency, read_errors) = reading.await?;
    let rss_max = sampler.await?;
    // Right after the load: how long until a command is admitted again.
    let t = Instant::now();
    let mut c = CommandServiceClient::new(conns[0].clone());
    for attempt in 0u64.. {
        let order = place_order(&format!("{tag}-after"), attempt, catalog);
        match c.place_order(with_deadline(order)).await {
            Ok(_) => break,
            Err(s)
                if s.code() == tonic::Code::ResourceExhausted && t.elapsed() < REQUEST_TIMEOUT =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => return Err(s.into()),
        }
    }
    let command_after_ms = t.elapsed().as_secs_f64() * 1000.0;
    let seconds = sending.as_secs_f64().max(1e-9);
    let admitted = outcomes.admitted.len();
    let shed = outcomes.shed.len();
    let answered = admitted + shed + outcomes.other.values().sum::<u64>();
    Ok(OverloadRun {
        name: name.to_string(),
        multiple: rate / capacity,
        offered_per_second: rate,
        sent_per_second: (scheduled - not_sent) as f64 / seconds,
        not_sent,
        admitted,
        admitted_per_second: admitted as f64 / seconds,
        admitted_latency: Latency::of(&outcomes.admitted),
        admitted_latency_from_send: Latency::of(&outcomes.admitted_from_send),
        shed,
        shed_fraction: shed as f64 / answered.max(1) as f64,
        shed_latency: Latency::of(&outcomes.shed),
        other: outcomes.other,
        reads_per_second: reads as f64 / read_seconds.max(1e-9),
        read_latency: Latency::of(&read_latency),
        read_errors,
        command_rss_mb_before: rss_before[0],
        command_rss_mb_max: rss_max[0].max(rss_before[0]),
        query_rss_mb_before: rss_before[1],
        query_rss_mb_max: rss_max[1].max(rss_before[1]),
        command_after_ms,
    })
}

/// Registers `n` customers nobody orders for and opens a WatchCustomer on each; the
/// streams stay open (idle) while the result is held.
async fn idle_watches(
    command: &Server,
    query: &Server,
    n: usize,
) -> anyhow::Result<Vec<tonic::Streaming<pb::Customer>>> {
    let conns = workload::channels(&command.endpoint().into(), 4).await?;
    let mut tasks = Vec::new();
    for (t, conn) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut c = CommandServiceClient::new(conn);
            for i in (t..n).step_by(4) {
                let id = format!("watched{i}");
                let request = pb::RegisterCustomerRequest {
                    command_id: id.clone(),
                    customer_id: id.clone(),
                    name: format!("Watched {i}"),
                    email: format!("{id}@bench.example"),
                    ..Default::default()
                };
                // Right after an overload run, admission may still be closed for a moment.
                for _ in 0..500 {
                    match c.register_customer(request.clone()).await {
                        Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        _ => break,
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let command_conn = workload::channels(&command.endpoint().into(), 1)
        .await?
        .remove(0);
    let position = workload::log_position(command_conn).await?;
    let query_conns = workload::channels(&query.endpoint().into(), n.div_ceil(100)).await?;
    let opening = (0..n).map(|i| {
        let mut q = QueryServiceClient::new(query_conns[i / 100].clone());
        async move {
            q.watch_customer(pb::WatchCustomerRequest {
                customer_id: format!("watched{i}"),
                min_position: position,
            })
            .await
            .map(tonic::Response::into_inner)
        }
    });
    let opened: Vec<_> = futures::stream::iter(opening)
        .buffer_unordered(200)
        .collect()
        .await;
    opened
        .into_iter()
        .map(|s| s.map_err(anyhow::Error::from))
        .collect()
}

/// Runs the stage on a fresh stack.
pub async fn run(plan: &Plan) -> anyhow::Result<Overload> {
    let nats = Nats::start();
    let command = Server::start(ServerKind::Command, &nats, &[]).await;
    let query = Server::start(ServerKind::Query, &nats, &[]).await;
    let catalog = Catalog {
        customers: 1000,
        skus: 200,
    };
    workload::setup(&command.endpoint().into(), catalog).await?;
    let conns = workload::channels(&command.endpoint().into(), 4).await?;
    let (capacity_per_second, capacity_latency) =
        capacity(&conns, plan.capacity_clients, plan.duration, catalog).await?;
    say(format!(
        "overload: capacity {capacity_per_second:.0} PlaceOrder/s (p99 {:.1} ms)",
        capacity_latency.p99_ms
    ));
    let mut runs = Vec::new();
    for (i, multiple) in plan.multiples.iter().enumerate() {
        let rate = (capacity_per_second * multiple, capacity_per_second);
        let (name, tag) = (format!("{multiple}x"), format!("ov{i}"));
        let run = overload_run(&name, &tag, (&command, &query), rate, plan, catalog);
        runs.push(run.await?);
        say_run(&runs[runs.len() - 1]);
    }
    let multiple = plan.multiples.last().copied().unwrap_or(10.0);
    let watches = idle_watches(&command, &query, plan.watches).await?;
    let mut idle = workload::channels(&command.endpoint().into(), plan.idle_connections).await?;
    idle.extend(workload::channels(&query.endpoint().into(), plan.idle_connections).await?);
    let name = format!(
        "{multiple}x + {} watches + {} idle connections per server",
        plan.watches, plan.idle_connections
    );
    let rate = (capacity_per_second * multiple, capacity_per_second);
    let run = overload_run(&name, "ovw", (&command, &query), rate, plan, catalog);
    runs.push(run.await?);
    say_run(&runs[runs.len() - 1]);
    drop(watches);
    drop(idle);
    Ok(Overload {
        multiples: plan.multiples.clone(),
        capacity_per_second,
        capacity_latency,
        watches: plan.watches,
        idle_connections: plan.idle_connections,
        runs,
    })
}

fn say(message: String) {
    eprintln!("[bench] {message}");
}

fn say_run(r: &OverloadRun) {
    say(format!("overload {}", row(r)));
}

/// A run as a row of the report's table.
fn row(r: &OverloadRun) -> String {
    format!(
        "| {} | {:.0} | {:.0} | {:.0} | {:.1} / {:.1} | {:.1} | {:.1}% | {:.1} | {:?} | {:.0} | {:.1} | {:?} | {:.0} → {:.0} | {:.0} → {:.0} | {:.1} |",
        r.name,
        r.offered_per_second,
        r.sent_per_second,
        r.admitted_per_second,
        r.admitted_latency.p50_ms,
        r.admitted_latency.p99_ms,
        r.admitted_latency_from_send.p99_ms,
        r.shed_fraction * 100.0,
        r.shed_latency.p99_ms,
        r.other,
        r.reads_per_second,
        r.read_latency.p99_ms,
        r.read_errors,
        r.command_rss_mb_before,
        r.command_rss_mb_max,
        r.query_rss_mb_before,
        r.query_rss_mb_max,
        r.command_after_ms
    )
}

/// The stage's section of the report.
pub fn markdown(o: &Overload) -> String {
    use std::fmt::Write;
    let mut md = String::new();
    let _ = writeln!(md, "## Overload (open loop, multiples of capacity)\n");
    let _ = writeln!(
        md,
        "Capacity (closed loop, PlaceOrder with two lines): {:.0}/s, p99 {:.1} ms. Then PlaceOrder offered at {:?} × that on a fixed schedule (latency from the scheduled send, and from the actual send); `sent` is what the bench managed to send on the same machine. Readers: {READERS} closed-loop GetCustomer on the query server. `command after`: from the end of a run until a command is admitted again.\n",
        o.capacity_per_second, o.capacity_latency.p99_ms, o.multiples
    );
    md.push_str("| run | offered/s | sent/s | admitted/s | admitted p50 / p99 ms (from schedule) | admitted p99 ms (from send) | shed | shed p99 ms | other | reads/s | read p99 ms | read errors | command RSS MB | query RSS MB | command after ms |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in &o.runs {
        let _ = writeln!(md, "{}", row(r));
    }
    md.push('\n');
    md
}
