//! The query server: consumes the shop event stream from NATS JetStream into sled views
//! and answers every read over gRPC.
//!
//! How an event becomes a view row, one module per step:
//! - [`consumer`]: JetStream (ordered consumer, from the checkpoint) → batches → one
//!   atomic sled write of views + indexes + events + checkpoint; wakes waiters, watchers.
//! - [`projections`]: pure `apply(views, event)`, one module per view.
//! - [`store`]: sled keys, indexes (derived from views), checkpoint, scans.
//! - [`grpc`]: the query handlers: `min_position` waits, reads, watches.
//! - [`paging`], [`as_of`], [`history`]: page tokens and list pages, as-of folds,
//!   history rendering (pure, fuzzed: `fuzz/`).
//! - [`watch`]: the bounded, non-blocking registry behind WatchOrder/WatchCustomer.
//! - [`freshness`]: `shop-applied-position` / `shop-lag-events` on every answer.
//! - [`metrics`]: Prometheus metrics read at scrape time (`--metrics-listen`).
//!
//! [`run`] serves; [`rebuild`] recomputes every view from sequence 1 and exits.

pub mod as_of;
pub mod consumer;
pub mod error;
pub mod freshness;
pub mod grpc;
pub mod history;
pub mod metrics;
pub mod paging;
pub mod projections;
pub mod store;
#[cfg(test)]
mod store_crash_tests;
pub mod watchers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shop_shared::config::{LogArgs, NatsArgs, SecurityArgs, TelemetryArgs};
use shop_shared::grpc::{Health, HealthService, RequestErrorLayer};
use shop_shared::limits::ConnectionArgs;
use shop_shared::metrics::{serve_until_stopped, MetricsListenError, ServerMetrics};
use shop_shared::pb::query_service_server::QueryServiceServer;
use shop_shared::security::Security;
use shop_shared::telemetry::TraceLayer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::consumer::{Consumer, ConsumerConfig, ConsumerError, ConsumerStatus};
use crate::freshness::FreshnessLayer;
use crate::store::{Store, StoreError};
use crate::watchers::Watchers;

/// Events per atomic write during a rebuild, at least.
const REBUILD_BATCH_EVENTS: usize = 10_000;

/// gRPC service name of the query API.
pub const SERVICE_NAME: &str = "shop.v1.QueryService";

/// Flags (each also read from an environment variable).
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(
        long,
        env = "SHOP_LISTEN",
        default_value = "127.0.0.1:50052",
        global = true
    )]
    pub listen: SocketAddr,

    /// Directory of the view database.
    #[arg(
        long,
        env = "SHOP_DATA_DIR",
        default_value = "./data/query",
        global = true
    )]
    pub data_dir: PathBuf,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub log: LogArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    #[command(flatten)]
    pub security: SecurityArgs,

    #[command(flatten)]
    pub connections: ConnectionArgs,

    /// Events applied per atomic write, at most.
    #[arg(
        long,
        env = "SHOP_BATCH_EVENTS_MAX",
        default_value_t = 2000,
        global = true
    )]
    pub batch_events_max: usize,

    /// sled page cache size, in MiB.
    #[arg(long, env = "SHOP_CACHE_MB", default_value_t = 64, global = true)]
    pub cache_mb: u64,

    /// Open WatchOrder/WatchCustomer streams, at most.
    #[arg(
        long,
        env = "SHOP_WATCHERS_MAX",
        default_value_t = 10_000,
        global = true
    )]
    pub watchers_max: usize,

    /// Requests one connection may have in flight; beyond, RESOURCE_EXHAUSTED (load
    /// shedding: in-flight work and memory stay bounded however clients behave).
    #[arg(
        long,
        env = "SHOP_REQUESTS_PER_CONNECTION_MAX",
        default_value_t = 1024,
        global = true
    )]
    pub requests_per_connection_max: usize,

    /// Largest request message accepted, in bytes.
    #[arg(long, env = "SHOP_REQUEST_BYTES_MAX", default_value_t = 16 * 1024, global = true)]
    pub request_bytes_max: usize,
}

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("view store in {dir}: {source}")]
    Store { dir: PathBuf, source: StoreError },
    #[error("consumer: {0}")]
    Consumer(#[from] ConsumerError),
    #[error("NATS client: {0}")]
    Nats(#[from] shop_shared::nats::ConnectError),
    #[error(transparent)]
    Security(#[from] shop_shared::security::SecurityError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Metrics(#[from] MetricsListenError),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] shop_shared::grpc::ReflectionError),
    #[error("descriptors: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error("task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Opens the view store; a damaged one is replaced by an empty store (the views are
/// rebuilt from the stream: [`Store::open_or_replace`]) when `replace_damaged`.
async fn open_store(config: &Config, replace_damaged: bool) -> Result<Arc<Store>, ServerError> {
    let dir = config.data_dir.clone();
    let cache = config.cache_mb.saturating_mul(1 << 20);
    let store = tokio::task::spawn_blocking(move || {
        if replace_damaged {
            Store::open_or_replace(&dir, cache).map(|(store, _)| store)
        } else {
            Store::open(&dir, cache)
        }
    })
    .await?
    .map_err(|source| ServerError::Store {
        dir: config.data_dir.clone(),
        source,
    })?;
    Ok(Arc::new(store))
}

/// Runs the query server on `listener` until `shutdown` resolves, then stops gracefully:
/// NOT_SERVING, end watches, finish in-flight reads, stop consuming, flush.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let open_files = shop_shared::limits::raise_open_files_limit();
    tracing::debug!(?open_files, "open-file limit");
    let (health, health_service) = Health::new().await;
    let security = Security::load(
        &config.security,
        listener.local_addr().unwrap_or(config.listen),
    )?;
    let store = open_store(&config, true).await?;
    let (applied, _) = store.checkpoint().map_err(|source| ServerError::Store {
        dir: config.data_dir.clone(),
        source,
    })?;
    tracing::info!(dir = %config.data_dir.display(), applied, "view store open");
    let status = ConsumerStatus::new(applied);
    let watchers = Watchers::new(config.watchers_max);
    let client = shop_shared::nats::connect(&config.nats, "query-server").await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let consumer = Consumer {
        store: store.clone(),
        client: client.clone(),
        stream_name: config.nats.stream.clone(),
        status: status.clone(),
        watchers: watchers.clone(),
        config: ConsumerConfig {
            batch_events_max: config.batch_events_max.max(1),
        },
    };
    let consumer_task = tokio::spawn(consumer.run(stop_rx.clone(), None));
    let (serving_tx, serving_rx) = watch::channel(true);
    let health_task = tokio::spawn(watch_health(
        health.clone(),
        status.clone(),
        client.clone(),
        serving_rx,
    ));

    let on_shutdown = {
        let health = health.clone();
        let watchers = watchers.clone();
        async move {
            shutdown.await;
            let _ = serving_tx.send(false);
            health.set("", false).await;
            health.set(SERVICE_NAME, false).await;
            // Open watches would keep their connections (and shutdown) waiting forever.
            watchers.close_all();
            tracing::info!("shutting down: no new requests; finishing in-flight reads");
        }
    };
    let services = Services {
        store,
        status: status.clone(),
        watchers,
        health,
        health_service,
        security,
    };
    let served = serve(&config, listener, services, stop_rx, on_shutdown).await;

    let _ = stop_tx.send(true);
    match consumer_task.await? {
        Ok(()) => {}
        Err(error) => tracing::warn!(%error, "consumer had stopped with an error"),
    }
    health_task.abort();
    tracing::info!(applied = status.applied(), "query server stopped");
    served
}

/// What the gRPC server serves.
struct Services {
    store: Arc<Store>,
    status: Arc<ConsumerStatus>,
    watchers: Arc<Watchers>,
    health: Health,
    health_service: HealthService,
    security: Security,
}

/// Serves gRPC (and metrics) until `on_shutdown` completes and in-flight requests end.
async fn serve(
    config: &Config,
    listener: TcpListener,
    services: Services,
    stop: watch::Receiver<bool>,
    on_shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let Services {
        store,
        status,
        watchers,
        health,
        health_service,
        security,
    } = services;
    let ServerMetrics {
        mut registry,
        grpc: grpc_metrics,
        shed_layer,
        shed,
        connections: connection_metrics,
    } = ServerMetrics::new(
        &[SERVICE_NAME],
        config
            .connections
            .shed_limits(config.requests_per_connection_max),
        &health,
    );
    metrics::register(&mut registry, &status, &watchers);
    serve_until_stopped(config.telemetry.metrics_listen, registry, stop).await?;

    let descriptors = prost_reflect::DescriptorPool::decode(shop_shared::FILE_DESCRIPTOR_SET)?;
    let (reflection_v1, reflection_v1alpha) = shop_shared::grpc::reflection(&[SERVICE_NAME])?;
    let queries = QueryServiceServer::new(grpc::Queries {
        store,
        status: status.clone(),
        watchers,
        descriptors,
        stream: config.nats.stream.clone(),
        shed,
    })
    .max_decoding_message_size(config.request_bytes_max);
    let incoming = shop_shared::limits::incoming(
        listener,
        config.connections.connections_max,
        connection_metrics,
    );
    tracing::info!("query server ready");
    // Outermost first: the span covers everything; metrics see refused (unauthenticated,
    // shed) requests and the corrected codes of undecodable ones; every answer to an
    // authenticated caller, refusals included, gets its freshness headers.
    config
        .connections
        .apply(security.server_builder()?)
        .layer(TraceLayer)
        .layer(grpc_metrics.layer())
        .layer(security.auth_layer())
        .layer(FreshnessLayer { status })
        .layer(shed_layer)
        .layer(RequestErrorLayer)
        .add_service(health_service)
        .add_optional_service(security.reflection.then_some(reflection_v1))
        .add_optional_service(security.reflection.then_some(reflection_v1alpha))
        .add_service(queries)
        .serve_with_incoming_shutdown(incoming, on_shutdown)
        .await?;
    Ok(())
}

/// Health: SERVING while the consumer is connected and applying; NOT_SERVING while NATS
/// is unreachable, the consumer is stuck (gap, conflict), or the server shuts down. Reads
/// are still answered meanwhile (from views as of the applied position).
async fn watch_health(
    health: Health,
    status: Arc<ConsumerStatus>,
    client: async_nats::Client,
    serving: watch::Receiver<bool>,
) {
    let mut last = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let connected = shop_shared::nats::is_connected(&client);
        status.set_connected(connected);
        let ok = status.healthy() && *serving.borrow();
        if last != Some(ok) {
            // Named service first: "" SERVING then implies it.
            health.set(SERVICE_NAME, ok).await;
            health.set("", ok).await;
            if last.is_some() {
                if ok {
                    tracing::info!("consumer applying events");
                } else if !connected {
                    tracing::warn!("NATS unreachable: not applying events; reads are answered from the views as they are");
                } else {
                    tracing::warn!(
                        reason = status.error().unwrap_or_default(),
                        "consumer not applying events"
                    );
                }
            }
            last = Some(ok);
        }
    }
}

/// Rebuilds every view from sequence 1 up to the stream's last sequence at start, with a
/// progress line every second, then exits. The server must not be running on the same
/// data directory (sled locks it).
pub async fn rebuild(config: Config) -> Result<RebuildReport, ServerError> {
    // Start from an empty store: removing the old one is far faster than deleting its
    // rows one by one. Only a directory that is a sled store is removed.
    let dir = config.data_dir.clone();
    let wiped = tokio::task::spawn_blocking(move || Store::remove(&dir)).await?;
    wiped.map_err(|source| ServerError::Store {
        dir: config.data_dir.clone(),
        source,
    })?;
    let store = open_store(&config, false).await?;
    let client = shop_shared::nats::connect(&config.nats, "query-server-rebuild").await?;
    let js = async_nats::jetstream::new(client.clone());
    let target = loop {
        match js.get_stream(&config.nats.stream).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => break info.state.last_sequence,
                Err(e) => tracing::warn!(error = %e, "stream info; retrying"),
            },
            Err(e) => tracing::warn!(error = %e, "stream not reachable; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    tracing::info!(stream = %config.nats.stream, events = target, "rebuilding views from sequence 1");
    let status = ConsumerStatus::new(0);
    let consumer = Consumer {
        store: store.clone(),
        client,
        stream_name: config.nats.stream.clone(),
        status: status.clone(),
        watchers: Watchers::new(0),
        config: ConsumerConfig {
            // Nobody waits on a rebuild: bigger batches fold more updates of a view into one write.
            batch_events_max: config.batch_events_max.max(REBUILD_BATCH_EVENTS),
        },
    };
    let started = Instant::now();
    let (_stop_tx, stop_rx) = watch::channel(false);
    let mut task = tokio::spawn(consumer.run(stop_rx, Some(target)));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let result = loop {
        tokio::select! {
            done = &mut task => break done?,
            _ = tick.tick() => {
                let applied = status.applied();
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                tracing::info!(
                    applied,
                    target,
                    percent = format!("{:.1}", 100.0 * applied as f64 / target.max(1) as f64),
                    events_per_sec = (applied as f64 / secs) as u64,
                    "rebuild progress"
                );
            }
        }
    };
    result?;
    let elapsed = started.elapsed();
    let report = RebuildReport {
        events: status.applied(),
        elapsed,
    };
    tracing::info!(
        events = report.events,
        seconds = format!("{:.3}", elapsed.as_secs_f64()),
        events_per_sec = (report.events as f64 / elapsed.as_secs_f64().max(1e-9)) as u64,
        "rebuild done"
    );
    Ok(report)
}

/// What a rebuild did.
#[derive(Debug, Clone, Copy)]
pub struct RebuildReport {
    pub events: u64,
    pub elapsed: Duration,
}
