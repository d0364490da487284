//! Load generators: the mixed command workload, the query workloads, the echo ceiling,
//! ack→visible probes, and the lag monitor. Every generator is closed-loop (a client
//! sends its next request when the previous one returned), optionally paced to a target
//! rate for the half-load runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shop_shared::pb;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::report::{LagSample, Syncs};
use crate::stats::{histogram, Recorder, RunSummary, Timeline};
use pb::command_service_client::CommandServiceClient;
use pb::log_service_client::LogServiceClient;
use pb::query_service_client::QueryServiceClient;

/// The catalogue the workload runs against.
#[derive(Debug, Clone, Copy)]
pub struct Catalog {
    pub customers: usize,
    pub skus: usize,
}

impl Catalog {
    pub fn customer(i: usize) -> String {
        format!("bc{i}")
    }

    pub fn sku(i: usize) -> String {
        format!("bp{i}")
    }

    pub fn price(i: usize) -> i64 {
        100 + 10 * i as i64
    }
}

/// Where a server is and how the bench reaches it: plaintext, or TLS and a bearer token
/// (stage `security`).
#[derive(Clone)]
pub struct Target {
    pub url: String,
    pub tls: Option<ClientTlsConfig>,
    pub token: Option<String>,
}

impl From<String> for Target {
    fn from(url: String) -> Self {
        Target {
            url,
            tls: None,
            token: None,
        }
    }
}

impl From<&str> for Target {
    fn from(url: &str) -> Self {
        Target::from(url.to_string())
    }
}

/// A connection: a channel whose requests carry the target's bearer token, if any.
pub type Conn = InterceptedService<Channel, Credentials>;

/// Adds `authorization: Bearer ...` to every request (nothing when there is no token).
#[derive(Clone)]
pub struct Credentials(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Opens `n` HTTP/2 connections.
pub async fn channels(target: &Target, n: usize) -> anyhow::Result<Vec<Conn>> {
    let credentials = match &target.token {
        Some(token) => Some(format!("Bearer {token}").parse()?),
        None => None,
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let mut endpoint = Channel::from_shared(target.url.clone())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        if let Some(tls) = &target.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        out.push(InterceptedService::new(
            endpoint.connect().await?,
            Credentials(credentials.clone()),
        ));
    }
    Ok(out)
}

/// Registers the customers and creates the products (with effectively unlimited stock).
pub async fn setup(endpoint: &Target, catalog: Catalog) -> anyhow::Result<()> {
    let channels = channels(endpoint, 4).await?;
    let mut tasks = Vec::new();
    for (t, channel) in channels.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut c = CommandServiceClient::new(channel);
            for i in (t..catalog.customers).step_by(4) {
                let id = Catalog::customer(i);
                let _ = c
                    .register_customer(pb::RegisterCustomerRequest {
                        customer_id: id.clone(),
                        name: format!("Bench Customer {i}"),
                        email: format!("{id}@bench.example"),
                        ..Default::default()
                    })
                    .await;
            }
            for i in (t..catalog.skus).step_by(4) {
                let _ = c
                    .create_product(pb::CreateProductRequest {
                        sku: Catalog::sku(i),
                        name: format!("Bench Product {i}"),
                        price_cents: Catalog::price(i),
                        initial_stock: 1_000_000_000,
                        ..Default::default()
                    })
                    .await;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

/// How a load run is shaped.
#[derive(Debug, Clone)]
pub struct Load {
    pub concurrency: usize,
    pub connections: usize,
    pub duration: Duration,
    /// Total target rate (requests/s) for paced runs; `None` = as fast as possible.
    pub rate: Option<f64>,
}

impl Load {
    /// Sleeps until this client's next slot when paced.
    fn interval(&self) -> Option<Duration> {
        self.rate
            .map(|r| Duration::from_secs_f64(self.concurrency as f64 / r.max(1e-9)))
    }
}

/// Where ack→visible probes go, and how often.
#[derive(Clone)]
pub struct Visibility {
    pub query: QueryServiceClient<Conn>,
    /// Probe one command in this many.
    pub every: u64,
    pub latency: Arc<Mutex<Histogram<u64>>>,
}

impl Visibility {
    /// Probes one command in `every` through `query`.
    pub fn new(query: Conn, every: u64) -> Self {
        Visibility {
            query: QueryServiceClient::new(query),
            every,
            latency: shared_histogram(),
        }
    }
}

/// The pipeline's positions sampled every 200 ms in the background during a run.
pub struct LagMonitor {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<LagSample>>,
}

impl LagMonitor {
    pub fn start(command: Conn, query: Conn) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn(monitor_lag(
            command,
            query,
            Duration::from_millis(200),
            stop.clone(),
        ));
        LagMonitor { stop, task }
    }

    /// Stops sampling; the samples.
    pub async fn finish(self) -> Result<Vec<LagSample>, tokio::task::JoinError> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await
    }
}

/// What a command run produced.
pub struct CommandRun {
    pub summary: RunSummary,
    /// A sample of the orders placed (for the query runs).
    pub orders: Vec<String>,
    /// Commands per kind that succeeded.
    pub kinds: [u64; 6],
}

/// The step each client takes next.
enum Step {
    Place,
    Pay { order: String, total: i64 },
    Ship { order: String },
    Cancel { order: String },
}

/// The mixed command workload: PlaceOrder (1–5 lines) → PayOrder → ShipOrder, 10% of
/// orders cancelled instead of paid, and 5% each of RegisterCustomer and RestockProduct.
pub async fn run_commands(
    endpoint: &Target,
    tag: &str,
    catalog: Catalog,
    load: &Load,
    visibility: Option<Visibility>,
) -> anyhow::Result<CommandRun> {
    let channels = channels(endpoint, load.connections).await?;
    let start = Instant::now();
    let end = start + load.duration;
    let timeline = Arc::new(Timeline::new(start, load.duration.as_secs() + 1));
    let kinds: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let mut tasks = Vec::new();
    for client in 0..load.concurrency {
        let mut c = CommandServiceClient::new(channels[client % channels.len()].clone());
        let timeline = timeline.clone();
        let kinds = kinds.clone();
        let tag = tag.to_string();
        let interval = load.interval();
        let visibility = visibility.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(client as u64 * 7919 + 1);
            let mut rec = Recorder::default();
            let mut orders = Vec::new();
            let mut step = Step::Place;
            let mut n = 0u64;
            let mut next_at = Instant::now()
                + interval.map_or(Duration::ZERO, |i| i.mul_f64(rng.random::<f64>()));
            while Instant::now() < end {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(next_at.into()).await;
                    next_at += interval;
                }
                n += 1;
                let command_id = format!("{tag}-{client}-{n}");
                let t0 = Instant::now();
                let (kind, result, order) = match &step {
                    Step::Place if rng.random_bool(0.05) => {
                        let id = format!("{tag}-new-{client}-{n}");
                        let r = c
                            .register_customer(pb::RegisterCustomerRequest {
                                command_id,
                                customer_id: id.clone(),
                                name: format!("New {id}"),
                                email: format!("{id}@bench.example"),
                                ..Default::default()
                            })
                            .await;
                        (3, r, None)
                    }
                    Step::Place if rng.random_bool(0.05) => {
                        let r = c
                            .restock_product(pb::RestockProductRequest {
                                command_id,
                                sku: Catalog::sku(rng.random_range(0..catalog.skus)),
                                quantity: 100,
                                ..Default::default()
                            })
                            .await;
                        (4, r, None)
                    }
                    Step::Place => {
                        let order = format!("{tag}-{client}-{n}");
                        let lines = rng.random_range(1..=5usize);
                        let first = rng.random_range(0..catalog.skus);
                        let mut total = 0;
                        let lines: Vec<pb::OrderLineRequest> = (0..lines)
                            .map(|k| {
                                let i = (first + k * 7) % catalog.skus;
                                let quantity = rng.random_range(1..=3);
                                total += quantity * Catalog::price(i);
                                pb::OrderLineRequest {
                                    sku: Catalog::sku(i),
                                    quantity,
                                }
                            })
                            .collect();
                        let r = c
                            .place_order(pb::PlaceOrderRequest {
                                command_id,
                                order_id: order.clone(),
                                customer_id: Catalog::customer(
                                    rng.random_range(0..catalog.customers),
                                ),
                                lines,
                                ..Default::default()
                            })
                            .await;
                        step = if rng.random_bool(0.1) {
                            Step::Cancel {
                                order: order.clone(),
                            }
                        } else {
                            Step::Pay {
                                order: order.clone(),
                                total,
                            }
                        };
                        (0, r, Some(order))
                    }
                    Step::Pay { order, total } => {
                        let order = order.clone();
                        let r = c
                            .pay_order(pb::PayOrderRequest {
                                command_id,
                                order_id: order.clone(),
                                amount_cents: *total,
                                payment_ref: format!("pay-{order}"),
                                ..Default::default()
                            })
                            .await;
                        step = Step::Ship {
                            order: order.clone(),
                        };
                        (1, r, Some(order))
                    }
                    Step::Ship { order } => {
                        let order = order.clone();
                        let r = c
                            .ship_order(pb::ShipOrderRequest {
                                command_id,
                                order_id: order.clone(),
                                tracking: format!("trk-{order}"),
                                ..Default::default()
                            })
                            .await;
                        step = Step::Place;
                        (2, r, Some(order))
                    }
                    Step::Cancel { order } => {
                        let order = order.clone();
                        let r = c
                            .cancel_order(pb::CancelOrderRequest {
                                command_id,
                                order_id: order.clone(),
                                reason: "bench".into(),
                                ..Default::default()
                            })
                            .await;
                        step = Step::Place;
                        (5, r, Some(order))
                    }
                };
                let elapsed = t0.elapsed();
                match result {
                    Ok(reply) => {
                        rec.record_ok(elapsed);
                        timeline.tick();
                        kinds[kind].fetch_add(1, Ordering::Relaxed);
                        let position = reply.get_ref().position;
                        if let Some(order) = &order {
                            if kind == 0 && orders.len() < 2_000 {
                                orders.push(order.clone());
                            }
                            if let Some(v) = visibility.as_ref().filter(|v| n % v.every == 0) {
                                tokio::spawn(probe_visibility(
                                    v.clone(),
                                    order.clone(),
                                    position,
                                    Instant::now(),
                                ));
                            }
                        }
                    }
                    Err(status) => {
                        rec.record_error(status.code());
                        step = Step::Place;
                    }
                }
            }
            (rec, orders)
        }));
    }
    let mut recorder = Recorder::default();
    let mut orders = Vec::new();
    for t in tasks {
        let (rec, o) = t.await?;
        recorder.merge(rec);
        orders.extend(o);
    }
    let elapsed = start.elapsed();
    let counts = std::array::from_fn(|i| kinds[i].load(Ordering::Relaxed));
    Ok(CommandRun {
        summary: RunSummary::new(
            "commands",
            load.concurrency,
            load.connections,
            elapsed,
            &recorder,
            timeline.series(load.duration.as_secs()),
        ),
        orders,
        kinds: counts,
    })
}

/// Time from a command's reply to a query with its position returning the change.
async fn probe_visibility(mut v: Visibility, order: String, position: u64, replied: Instant) {
    let r = v
        .query
        .get_order(pb::GetOrderRequest {
            order_id: order,
            min_position: position,
            ..Default::default()
        })
        .await;
    if r.is_ok() {
        let us = u64::try_from(replied.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        if let Ok(mut h) = v.latency.lock() {
            let _ = h.record(us.min(60_000_000));
        }
    }
}

/// Which query to load.
#[derive(Debug, Clone, Copy)]
pub enum QueryKind {
    GetOrder,
    ListOrders,
}

/// A query workload over known orders and customers, as fast as answered or paced at
/// `load.rate`.
pub async fn run_queries(
    endpoint: &Target,
    kind: QueryKind,
    orders: Arc<Vec<String>>,
    catalog: Catalog,
    load: &Load,
) -> anyhow::Result<RunSummary> {
    let channels = channels(endpoint, load.connections).await?;
    let start = Instant::now();
    let end = start + load.duration;
    let timeline = Arc::new(Timeline::new(start, load.duration.as_secs() + 1));
    let mut tasks = Vec::new();
    for client in 0..load.concurrency {
        let mut q = QueryServiceClient::new(channels[client % channels.len()].clone());
        let timeline = timeline.clone();
        let orders = orders.clone();
        let interval = load.interval();
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(client as u64 + 17);
            let mut rec = Recorder::default();
            let mut next_at = Instant::now()
                + interval.map_or(Duration::ZERO, |i| i.mul_f64(rng.random::<f64>()));
            while Instant::now() < end {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(next_at.into()).await;
                    next_at += interval;
                }
                let t0 = Instant::now();
                let ok = match kind {
                    QueryKind::GetOrder => {
                        let id = orders[rng.random_range(0..orders.len())].clone();
                        q.get_order(pb::GetOrderRequest {
                            order_id: id,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                    }
                    QueryKind::ListOrders => q
                        .list_orders(pb::ListOrdersRequest {
                            customer_id: Catalog::customer(rng.random_range(0..catalog.customers)),
                            page_size: 20,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                };
                match ok {
                    Ok(()) => {
                        rec.record_ok(t0.elapsed());
                        timeline.tick();
                    }
                    Err(s) => rec.record_error(s.code()),
                }
            }
            rec
        }));
    }
    let mut recorder = Recorder::default();
    for t in tasks {
        recorder.merge(t.await?);
    }
    let name = match kind {
        QueryKind::GetOrder => "GetOrder",
        QueryKind::ListOrders => "ListOrders",
    };
    Ok(RunSummary::new(
        name,
        load.concurrency,
        load.connections,
        start.elapsed(),
        &recorder,
        timeline.series(load.duration.as_secs()),
    ))
}

/// The echo ceiling: the same request shapes against a server that does nothing.
pub async fn run_echo(endpoint: &Target, query: bool, load: &Load) -> anyhow::Result<RunSummary> {
    let channels = channels(endpoint, load.connections).await?;
    let start = Instant::now();
    let end = start + load.duration;
    let timeline = Arc::new(Timeline::new(start, load.duration.as_secs() + 1));
    let mut tasks = Vec::new();
    for client in 0..load.concurrency {
        let channel = channels[client % channels.len()].clone();
        let timeline = timeline.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = CommandServiceClient::new(channel.clone());
            let mut q = QueryServiceClient::new(channel);
            let mut rec = Recorder::default();
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                let t0 = Instant::now();
                let r = if query {
                    q.get_order(pb::GetOrderRequest {
                        order_id: format!("echo-{client}-{n}"),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                } else {
                    c.place_order(pb::PlaceOrderRequest {
                        command_id: format!("echo-{client}-{n}"),
                        order_id: format!("echo-{client}-{n}"),
                        customer_id: Catalog::customer(client),
                        lines: (0..3)
                            .map(|i| pb::OrderLineRequest {
                                sku: Catalog::sku(i),
                                quantity: 2,
                            })
                            .collect(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                };
                match r {
                    Ok(()) => {
                        rec.record_ok(t0.elapsed());
                        timeline.tick();
                    }
                    Err(s) => rec.record_error(s.code()),
                }
            }
            rec
        }));
    }
    let mut recorder = Recorder::default();
    for t in tasks {
        recorder.merge(t.await?);
    }
    let name = if query {
        "echo GetOrder"
    } else {
        "echo PlaceOrder"
    };
    Ok(RunSummary::new(
        name,
        load.concurrency,
        load.connections,
        start.elapsed(),
        &recorder,
        timeline.series(load.duration.as_secs()),
    ))
}

/// Samples log, relay and query positions every `every` until `stop` is set.
pub async fn monitor_lag(
    command: Conn,
    query: Conn,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<LagSample> {
    let mut log = LogServiceClient::new(command);
    let mut q = QueryServiceClient::new(query);
    let start = Instant::now();
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let (Ok(l), Ok(s)) = (
            log.get_log_status(pb::GetLogStatusRequest {}).await,
            q.get_status(pb::GetStatusRequest {}).await,
        ) {
            let (l, s) = (l.into_inner(), s.into_inner());
            out.push(LagSample {
                t_s: start.elapsed().as_secs_f64(),
                log_position: l.log_position,
                published: l.published_position,
                applied: s.applied_position,
            });
        }
        tokio::time::sleep(every).await;
    }
    out
}

/// Waits until the query server has applied `position`; how long that took.
pub async fn wait_applied(query: Conn, position: u64, timeout: Duration) -> Option<Duration> {
    let mut q = QueryServiceClient::new(query);
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(s) = q.get_status(pb::GetStatusRequest {}).await {
            if s.into_inner().applied_position >= position {
                return Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// The log's last position.
pub async fn log_position(command: Conn) -> anyhow::Result<u64> {
    Ok(LogServiceClient::new(command)
        .get_log_status(pb::GetLogStatusRequest {})
        .await?
        .into_inner()
        .log_position)
}

/// A new histogram behind a mutex, for visibility probes.
pub fn shared_histogram() -> Arc<Mutex<Histogram<u64>>> {
    Arc::new(Mutex::new(histogram()))
}

/// The command server's recent group commits.
pub async fn syncs(command: Conn) -> Syncs {
    match LogServiceClient::new(command)
        .get_log_status(pb::GetLogStatusRequest {})
        .await
    {
        Ok(s) => {
            let s = s.into_inner();
            Syncs {
                p50_ms: s.sync_p50_us as f64 / 1000.0,
                p99_ms: s.sync_p99_us as f64 / 1000.0,
                max_ms: s.sync_max_us as f64 / 1000.0,
                commands_per_sync: s.commands_per_sync,
            }
        }
        Err(_) => Syncs::default(),
    }
}
