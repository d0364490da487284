//! The command server: validates shop commands, appends their events durably to a sled
//! event log, and relays the log to NATS JetStream.
//!
//! How a command travels, one module per step:
//! - [`grpc`]: tonic adapter; protobuf request → validated [`domain::Command`]; every
//!   refusal → gRPC status in one place.
//! - [`writer`]: the bounded queue and the single writer thread: idempotency, optimistic
//!   concurrency, [`domain::decide`], one atomic sled batch per group of commands, one
//!   sync per group (group commit), reply only once durable.
//! - [`domain`]: pure `decide`/`evolve` per aggregate (customer, product, order).
//! - [`log`]: the sled event log: key layout, atomic batches, durable sync, reads.
//! - [`relay`]: durable events → JetStream, stream sequence == log position, resumable.
//! - [`policy`]: customer deleted → cancel their open orders, via a durable consumer.
//! - [`metrics`]: Prometheus metrics read at scrape time (`--metrics-listen`).
//!
//! [`run`] wires them together and owns start-up and graceful shutdown.

pub mod domain;
pub mod failover;
pub mod grpc;
pub mod log;
pub mod metrics;
pub mod policy;
pub mod relay;
pub mod writer;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shop_shared::config::{LogArgs, NatsArgs, SecurityArgs, TelemetryArgs};
use shop_shared::grpc::{Health, HealthService, RequestErrorLayer};
use shop_shared::limits::ConnectionArgs;
use shop_shared::metrics::{serve_until_stopped, MetricsListenError, ServerMetrics};
use shop_shared::pb::command_service_server::CommandServiceServer;
use shop_shared::pb::log_service_server::LogServiceServer;
use shop_shared::security::Security;
use shop_shared::task::{Severity, TaskError};
use shop_shared::telemetry::TraceLayer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::log::{Durability, EventLog, LogError};
use crate::relay::{Relay, RelayConfig, RelayError, RelayStatus};
use crate::writer::{Writer, WriterConfig, WriterThreads, WriterWatch};

/// Health service name that reflects the relay (NATS reachable, stream verified). The
/// server as a whole (`""`) and `shop.v1.CommandService` stay SERVING while NATS is away,
/// since commands are still accepted; they turn NOT_SERVING only when the log is unusable
/// or the server is shutting down.
pub const RELAY_HEALTH_SERVICE: &str = "shop.v1.Relay";
/// How long shutdown waits for the relay to publish what is left.
const RELAY_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Flags (each also read from an environment variable).
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "command-server",
    version,
    about = "Shop command server: validates commands, appends events durably to a sled log, relays them to NATS JetStream."
)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "SHOP_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Directory of the event log.
    #[arg(long, env = "SHOP_DATA_DIR", default_value = "./data/command")]
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

    /// When a command counts as durable: `fsync` (survives power loss) or `flush`
    /// (survives a process crash).
    #[arg(long, env = "SHOP_DURABILITY", value_enum, default_value_t = Durability::Fsync)]
    pub durability: Durability,

    /// Commands that may wait for the writer; beyond, RESOURCE_EXHAUSTED.
    #[arg(long, env = "SHOP_QUEUE_CAPACITY", default_value_t = 8192)]
    pub queue_capacity: usize,

    /// The longest a command may wait for the writer, in milliseconds (0: no limit).
    /// When the writer reaches a command that waited longer, it is refused with
    /// RESOURCE_EXHAUSTED instead of decided, and new commands are refused at once for the
    /// next as many milliseconds: under overload, admitted commands stay fast and the
    /// others learn it right away.
    #[arg(long, env = "SHOP_QUEUE_WAIT_MAX_MS", default_value_t = 500)]
    pub queue_wait_max_ms: u64,

    /// Commands decided into one batch (one group commit).
    #[arg(long, env = "SHOP_BATCH_COMMANDS_MAX", default_value_t = 1024)]
    pub batch_commands_max: usize,

    /// sled page cache size, in MiB.
    #[arg(long, env = "SHOP_CACHE_MB", default_value_t = 32)]
    pub cache_mb: u64,

    /// Largest request message accepted, in bytes; beyond, RESOURCE_EXHAUSTED.
    #[arg(long, env = "SHOP_REQUEST_BYTES_MAX", default_value_t = 64 * 1024)]
    pub request_bytes_max: usize,

    /// Requests one connection may have in flight; beyond, RESOURCE_EXHAUSTED (load
    /// shedding: in-flight work and memory stay bounded however clients behave).
    #[arg(long, env = "SHOP_REQUESTS_PER_CONNECTION_MAX", default_value_t = 1024)]
    pub requests_per_connection_max: usize,

    /// Relay publishes awaiting their JetStream ack at once (below 5000).
    #[arg(long, env = "SHOP_RELAY_WINDOW", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..5000))]
    pub relay_window: u64,

    /// How long start-up waits for NATS to verify the stream before serving anyway
    /// (the relay then keeps retrying in the background), in milliseconds.
    #[arg(long, env = "SHOP_NATS_STARTUP_WAIT_MS", default_value_t = 3000)]
    pub nats_startup_wait_ms: u64,

    /// Do not run the customer-deletion policy in this process.
    #[arg(long, env = "SHOP_NO_POLICY")]
    pub no_policy: bool,

    /// When a command is answered: `local` once its events are fsync'd in this server's
    /// log (the stream mirrors it), `replicated` once the stream has acknowledged them
    /// too (with `--stream-replicas 3`, a quorum of NATS nodes holds them), so that an
    /// answered command survives the loss of this machine.
    #[arg(long = "ack", env = "SHOP_ACK", value_enum, default_value_t = AckLevel::Local)]
    pub ack: AckLevel,

    /// With `--ack replicated`: how long a command waits for the stream's acknowledgement,
    /// in milliseconds; then it fails UNAVAILABLE (reason NOT_REPLICATED) and is not
    /// acknowledged. Its events stay in the log and are relayed when the stream is back:
    /// retrying with the same command_id answers the original result once they are.
    #[arg(long, env = "SHOP_REPLICATED_ACK_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub replicated_ack_timeout_ms: u64,
}

/// When a command is answered (`--ack`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckLevel {
    /// Once fsync'd in the local log.
    Local,
    /// Once fsync'd locally and acknowledged by the stream.
    Replicated,
}

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("event log in {dir}: {source}")]
    Log { dir: PathBuf, source: LogError },
    #[error("refusing to start: {0}")]
    StreamConflict(String),
    #[error("relay: {0}")]
    Relay(#[from] RelayError),
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
    #[error("task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs the command server on `listener` until `shutdown` resolves, then shuts down
/// gracefully: NOT_SERVING, stop accepting, finish in-flight commands, sync, publish
/// what is left (bounded), exit.
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
    let (log, writer, writer_watch, writer_threads) = open_log(&config).await?;

    let client = shop_shared::nats::connect(&config.nats, "command-server").await?;
    let (relay, relay_status) = relay(&config, &log, &writer_watch, &client).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let relay_task = tokio::spawn(relay.run(stop_rx.clone()));
    let policy_task = (!config.no_policy).then(|| {
        let policy = policy::Policy {
            client: client.clone(),
            stream_name: config.nats.stream.clone(),
            log: log.clone(),
            writer: writer.clone(),
        };
        tokio::spawn(policy.run(stop_rx.clone()))
    });
    let (serving_tx, serving_rx) = watch::channel(true);
    let health_task = tokio::spawn(watch_health(
        health.clone(),
        writer_watch.clone(),
        relay_status.clone(),
        serving_rx,
    ));
    let on_shutdown = {
        let health = health.clone();
        async move {
            shutdown.await;
            let _ = serving_tx.send(false);
            health.set("", false).await;
            health.set(SERVICE_NAME, false).await;
            tracing::info!("shutting down: no new requests; finishing in-flight commands");
        }
    };
    let services = Services {
        log: log.clone(),
        writer,
        watch: writer_watch,
        relay: relay_status,
        health,
        health_service,
        security,
    };
    let served = serve(&config, listener, services, stop_rx, on_shutdown).await;

    let _ = stop_tx.send(true);
    health_task.abort();
    let background = Background {
        policy: policy_task,
        writer: writer_threads,
        relay: relay_task,
    };
    background.finish(&log).await?;
    client.flush().await.ok();
    tracing::info!("command server stopped");
    served
}

/// The tasks and threads that outlive the gRPC server, until they have finished.
struct Background {
    policy: Option<tokio::task::JoinHandle<()>>,
    writer: WriterThreads,
    relay: tokio::task::JoinHandle<Result<(), RelayError>>,
}

impl Background {
    /// In-flight commands are answered (the server is done) and `stop` is set: stops
    /// the producers of commands, then the writer, then lets the relay publish the rest.
    async fn finish(self, log: &Arc<EventLog>) -> Result<(), ServerError> {
        if let Some(task) = self.policy {
            let _ = task.await;
        }
        // Every Writer handle is gone now: the writer drains, the flusher syncs and answers.
        let writer = self.writer;
        tokio::task::spawn_blocking(move || writer.join()).await?;
        match tokio::time::timeout(RELAY_DRAIN_TIMEOUT, self.relay).await {
            Ok(Ok(Err(error))) => tracing::warn!(%error, "relay had stopped with an error"),
            Ok(_) => {}
            Err(_) => tracing::warn!(
                "relay did not finish publishing in time; the rest is published after restart"
            ),
        }
        let final_sync = log.clone();
        if let Err(error) = tokio::task::spawn_blocking(move || final_sync.sync()).await? {
            tracing::error!(%error, "final sync failed");
        }
        Ok(())
    }
}

/// The relay over the log, its stream checked against the log (see
/// [`verify_stream_at_startup`]).
async fn relay(
    config: &Config,
    log: &Arc<EventLog>,
    writer: &WriterWatch,
    client: &async_nats::Client,
) -> Result<(Relay, Arc<RelayStatus>), ServerError> {
    let status = Arc::new(RelayStatus::new(client.clone()));
    let relay = Relay::new(
        log.clone(),
        writer.tail.clone(),
        client.clone(),
        config.nats.stream.clone(),
        writer.durable_position.clone(),
        status.clone(),
        RelayConfig {
            window: usize::try_from(config.relay_window).unwrap_or(2048),
            read_chunk: 1024,
            replicas: usize::from(config.nats.stream_replicas),
        },
    );
    let startup_wait = Duration::from_millis(config.nats_startup_wait_ms);
    verify_stream_at_startup(&relay, client, startup_wait).await?;
    Ok((relay, status))
}

/// Opens the event log and starts the writer over it (after its recovery).
async fn open_log(
    config: &Config,
) -> Result<(Arc<EventLog>, Writer, WriterWatch, WriterThreads), ServerError> {
    let dir = config.data_dir.clone();
    let (durability, cache_bytes) = (config.durability, config.cache_mb.saturating_mul(1 << 20));
    let log_error = |source| ServerError::Log {
        dir: config.data_dir.clone(),
        source,
    };
    let log = tokio::task::spawn_blocking(move || EventLog::open(&dir, durability, cache_bytes))
        .await?
        .map_err(log_error)?;
    let log = Arc::new(log);
    let writer_config = WriterConfig {
        queue_capacity: config.queue_capacity,
        batch_commands_max: config.batch_commands_max,
        queue_wait_max: (config.queue_wait_max_ms > 0)
            .then(|| Duration::from_millis(config.queue_wait_max_ms)),
    };
    let (writer, watch, threads) = Writer::start(log.clone(), writer_config).map_err(log_error)?;
    tracing::info!(
        dir = %config.data_dir.display(),
        log_position = *watch.durable_position.borrow(),
        durability = durability.as_str(),
        "event log open"
    );
    Ok((log, writer, watch, threads))
}

/// What the gRPC server serves.
struct Services {
    log: Arc<EventLog>,
    /// The last handle but the policy's: dropped once the server is built, so that the
    /// writer ends when the server and the policy are done.
    writer: Writer,
    watch: WriterWatch,
    relay: Arc<RelayStatus>,
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
        log,
        writer,
        watch,
        relay,
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
        &[SERVICE_NAME, LOG_SERVICE_NAME],
        config
            .connections
            .shed_limits(config.requests_per_connection_max),
        &health,
    );
    let command_metrics = metrics::register(&mut registry, &watch, &relay, shed);
    serve_until_stopped(config.telemetry.metrics_listen, registry, stop).await?;

    let (reflection_v1, reflection_v1alpha) =
        shop_shared::grpc::reflection(&[SERVICE_NAME, LOG_SERVICE_NAME])?;
    let replication = (config.ack == AckLevel::Replicated).then(|| grpc::Replication {
        relay: relay.clone(),
        timeout: Duration::from_millis(config.replicated_ack_timeout_ms),
    });
    let commands = CommandServiceServer::new(grpc::Commands {
        writer,
        metrics: command_metrics,
        replication,
    })
    .max_decoding_message_size(config.request_bytes_max);
    let reader = LogServiceServer::new(grpc::LogReader {
        log,
        watch,
        relay,
        stream: config.nats.stream.clone(),
    })
    .max_decoding_message_size(config.request_bytes_max);
    let incoming = shop_shared::limits::incoming(
        listener,
        config.connections.connections_max,
        connection_metrics,
    );
    tracing::info!("command server ready");
    // Outermost first: the span covers everything; metrics see refused (unauthenticated,
    // shed) requests and the corrected codes of undecodable ones.
    config
        .connections
        .apply(security.server_builder()?)
        .layer(TraceLayer)
        .layer(grpc_metrics.layer())
        .layer(security.auth_layer())
        .layer(shed_layer)
        .layer(RequestErrorLayer)
        .add_service(health_service)
        .add_optional_service(security.reflection.then_some(reflection_v1))
        .add_optional_service(security.reflection.then_some(reflection_v1alpha))
        .add_service(commands)
        .add_service(reader)
        .serve_with_incoming_shutdown(incoming, on_shutdown)
        .await?;
    Ok(())
}

/// The gRPC service name of the command API (for health and reflection).
pub const SERVICE_NAME: &str = "shop.v1.CommandService";
/// The gRPC service name of the log reader.
pub const LOG_SERVICE_NAME: &str = "shop.v1.LogService";

/// At start-up, give NATS a moment and check the stream against the log: a stream that
/// holds events the log does not is a reason to refuse to start. When NATS does not
/// answer in time the server starts anyway and the relay checks once it is reachable.
async fn verify_stream_at_startup(
    relay: &Relay,
    client: &async_nats::Client,
    wait: Duration,
) -> Result<(), ServerError> {
    let deadline = tokio::time::Instant::now() + wait;
    let (_stop, never) = tokio::sync::watch::channel(false);
    if !shop_shared::task::wait_connected(client, wait, &never).await {
        tracing::warn!(
            "NATS not reachable at start-up; accepting commands and relaying once it is"
        );
        return Ok(());
    }
    match tokio::time::timeout_at(
        deadline.max(tokio::time::Instant::now() + Duration::from_secs(1)),
        relay.prepare(),
    )
    .await
    {
        Ok(Err(RelayError::Conflict(reason))) => Err(ServerError::StreamConflict(reason)),
        Ok(Err(error)) if error.severity() == Severity::Fatal => Err(ServerError::Relay(error)),
        Ok(Err(error)) => {
            tracing::warn!(%error, "stream not verified at start-up; the relay retries in the background");
            Ok(())
        }
        Ok(Ok(_)) => Ok(()),
        Err(_) => {
            tracing::warn!(
                "stream verification timed out at start-up; the relay retries in the background"
            );
            Ok(())
        }
    }
}

/// Keeps health in line with the log (overall and command service) and the relay.
async fn watch_health(
    health: Health,
    writer: writer::WriterWatch,
    relay: Arc<RelayStatus>,
    serving: watch::Receiver<bool>,
) {
    let mut last: Option<(bool, bool)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let log_ok = writer.failure.borrow().is_none() && *serving.borrow();
        let relay_ok = relay.connected() && log_ok;
        if last != Some((log_ok, relay_ok)) {
            // Named services first: "" SERVING then implies them.
            health.set(SERVICE_NAME, log_ok).await;
            health.set(LOG_SERVICE_NAME, log_ok).await;
            health.set(RELAY_HEALTH_SERVICE, relay_ok).await;
            health.set("", log_ok).await;
            if last.is_some_and(|(_, was)| was != relay_ok) {
                if relay_ok {
                    tracing::info!("relay healthy again");
                } else {
                    tracing::warn!(
                        reason = relay.error().unwrap_or_default(),
                        "relay degraded; commands are still accepted"
                    );
                }
            }
            last = Some((log_ok, relay_ok));
        }
    }
}
