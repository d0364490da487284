//! The command server: validates shop commands, appends their events durably to a sled
//! event log, and relays the log to NATS JetStream.
//!
//! How a command travels, one module per step:
//! - [`grpc`]: tonic adapter; protobuf request → validated [`domain::Command`]; every
//!   refusal → gRPC status in one place.
//! - [`writer`]: the bounded queue and the single writer thread: idempotency, optimistic
//!   concurrency, [`domain::decide`], commit records of whole commands, one sync per
//!   group (group commit), reply only once durable; on a standby, appending what the
//!   stream holds.
//! - [`domain`]: pure `decide`/`evolve` per aggregate (customer, product, order).
//! - [`log`]: the sled event log: key layout, crash-safe single inserts, durable sync,
//!   reads, the quarantine cut.
//! - [`relay`]: durable events → JetStream, stream sequence == log position, resumable.
//! - [`policy`]: customer deleted → cancel their open orders, via a durable consumer.
//! - [`failover`]: the writer lease, hot standbys following the stream, takeover, and the
//!   start-up check of the log against the stream (catch up, quarantine, or refuse).
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

use crate::failover::lease::{Holder, Lease, LeaseGuard};
use crate::failover::reconcile::{self, ReconcileError, StreamView};
use crate::failover::{Ended, Failover, Role};
use crate::log::{Durability, EventLog, LogError};
use crate::relay::{Relay, RelayConfig, RelayError, RelayStatus};
use crate::writer::{Writer, WriterConfig, WriterThreads, WriterWatch};

/// Health service name that reflects the relay (NATS reachable, stream verified, this
/// server the writer). The server as a whole (`""`) and, on the writer,
/// `shop.v1.CommandService` stay SERVING while NATS is away, since commands are still
/// accepted; they turn NOT_SERVING only when the log is unusable or the server is
/// shutting down. A standby's `shop.v1.CommandService` is NOT_SERVING.
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

    /// How long start-up waits for NATS to check the stream and the log against it
    /// before starting anyway, as a standby (it claims the writer lease once NATS
    /// answers), in milliseconds.
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

    /// The writer lease's time to live, in milliseconds (the JetStream key-value bucket
    /// `SHOP_LEASES`, key = the stream's name). The writer renews it every quarter of
    /// it; when it is not renewed for this long, a standby takes over. Every command
    /// server of a stream must use the same value.
    #[arg(long, env = "SHOP_LEASE_TTL_MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(100..))]
    pub lease_ttl_ms: u64,

    /// The address clients reach this server at, published in the lease while it is the
    /// writer and sent by standbys with NOT_LEADER (default: the listen address).
    #[arg(long, env = "SHOP_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
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
    /// The lease was lost or the log disagrees with the stream: run again (the start-up
    /// check decides what becomes of this server's log).
    #[error("restarting: {0}")]
    Restart(String),
}

impl ServerError {
    /// The log could not be opened or written because its filesystem is full: worth
    /// trying again once space is freed (see `main.rs`).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, ServerError::Log { source, .. } if source.is_disk_full())
    }

    /// The log's data dir was locked (see `LogError::is_locked`): right after an
    /// in-process restart, by the previous run's sled threads (see `main.rs`).
    pub fn is_log_locked(&self) -> bool {
        matches!(self, ServerError::Log { source, .. } if source.is_locked())
    }
}

/// Runs the command server on `listener` until `shutdown` resolves, then shuts down
/// gracefully: NOT_SERVING, stop accepting, finish in-flight commands, sync, publish
/// what is left (bounded), release the writer lease, exit. Returns
/// [`ServerError::Restart`] when the server must start over (the caller runs it again).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let open_files = shop_shared::limits::raise_open_files_limit();
    tracing::debug!(?open_files, "open-file limit");
    let (health, health_service) = Health::new().await;
    let local_addr = listener.local_addr().unwrap_or(config.listen);
    let security = Security::load(&config.security, local_addr)?;
    let log = open_log(&config).await?;
    let client = shop_shared::nats::connect(&config.nats, "command-server").await?;
    let node = log.node_id().map_err(|source| log_error(&config, source))?;
    let me = Holder {
        node,
        addr: config
            .advertise_addr
            .clone()
            .unwrap_or_else(|| local_addr.to_string()),
    };
    check_at_startup(&config, &log, &client, &me).await?;
    let advertised = me.addr.clone();
    let (writer, writer_watch, writer_threads) = start_writer(&config, &log)?;

    let relay_status = Arc::new(RelayStatus::new(client.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (release_tx, release_rx) = watch::channel(false);
    let (restart_tx, mut restart_rx) = watch::channel(None::<String>);
    let restart_tx_space = restart_tx.clone();
    let restart_asked = restart_rx.clone();
    let (role_tx, role_rx) = watch::channel(Role::Standby { leader: None });
    let writer_tasks = Arc::new(std::sync::Mutex::new(WriterTasks::default()));
    let engine = tokio::spawn(
        RoleEngine {
            config: config.clone(),
            failover: failover_inputs(&config, &log, &writer, &writer_watch, &client, me, role_tx),
            relay_status: relay_status.clone(),
            tail: writer_watch.tail.clone(),
            tasks: writer_tasks.clone(),
            restart: restart_tx,
        }
        .run(stop_rx.clone(), release_rx),
    );
    let space_task = tokio::spawn(restart_when_space_returns(
        writer_watch.failure.clone(),
        config.data_dir.clone(),
        restart_tx_space,
    ));
    let (serving_tx, serving_rx) = watch::channel(true);
    let health_task = tokio::spawn(watch_health(
        health.clone(),
        writer_watch.clone(),
        relay_status.clone(),
        serving_rx,
        role_rx.clone(),
    ));
    let on_shutdown = {
        let health = health.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                _ = restart_rx.changed() => {}
            }
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
        role: role_rx,
        advertised,
        health,
        health_service,
        security,
    };
    let served = serve(&config, listener, services, stop_rx, on_shutdown).await;

    let _ = stop_tx.send(true);
    health_task.abort();
    space_task.abort();
    let background = Background {
        tasks: writer_tasks,
        writer: writer_threads,
        engine,
        release: release_tx,
    };
    let restart = background
        .finish(&log)
        .await?
        .or_else(|| restart_asked.borrow().clone());
    client.flush().await.ok();
    if let Some(why) = restart {
        tracing::warn!(reason = %why, "command server restarting");
        return Err(ServerError::Restart(why));
    }
    tracing::info!("command server stopped");
    served
}

/// How often a server whose disk filled up checks whether there is space again.
const SPACE_PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// What the check writes and syncs in the data dir: one log segment.
const SPACE_PROBE_BYTES: usize = 8 << 20;

/// A full disk stops the writer: the batch that failed was not acknowledged, and sled's
/// state in memory may hold more than its files. This waits until the data dir's
/// filesystem takes a segment's worth of bytes again (written and synced to a probe file,
/// then removed), then asks the server to restart, which reopens the log from what is on
/// disk and runs the start-up check. Commands meanwhile get `RESOURCE_EXHAUSTED`
/// `DISK_FULL`. Other storage failures stay: they need an operator.
async fn restart_when_space_returns(
    mut failure: watch::Receiver<Option<writer::Failure>>,
    dir: PathBuf,
    restart: watch::Sender<Option<String>>,
) {
    let disk_full = match failure.wait_for(Option::is_some).await {
        Ok(failure) => failure.as_ref().is_some_and(|f| f.disk_full),
        Err(_) => return,
    };
    if !disk_full {
        return;
    }
    tracing::warn!(dir = %dir.display(), "the disk under the event log is full; commands are refused until space is freed");
    loop {
        tokio::time::sleep(SPACE_PROBE_INTERVAL).await;
        let probe = dir.join(".space-probe");
        let written = tokio::task::spawn_blocking(move || {
            let written = write_probe(&probe);
            let _ = std::fs::remove_file(&probe);
            written
        })
        .await;
        if matches!(written, Ok(Ok(()))) {
            restart.send_replace(Some("the disk under the event log has space again".into()));
            return;
        }
    }
}

fn write_probe(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(&vec![0u8; SPACE_PROBE_BYTES])?;
    file.sync_all()
}

/// The tasks only the writer runs, started when this server becomes the writer.
#[derive(Default)]
struct WriterTasks {
    relay: Option<tokio::task::JoinHandle<Result<(), RelayError>>>,
    policy: Option<tokio::task::JoinHandle<()>>,
}

/// The tasks and threads that outlive the gRPC server, until they have finished.
struct Background {
    tasks: Arc<std::sync::Mutex<WriterTasks>>,
    writer: WriterThreads,
    engine: tokio::task::JoinHandle<Option<String>>,
    release: watch::Sender<bool>,
}

impl Background {
    /// In-flight commands are answered (the server is done) and `stop` is set: stops
    /// the producers of commands, then the writer, then lets the relay publish the rest,
    /// then releases the lease. Why the server must restart, if it must.
    async fn finish(self, log: &Arc<EventLog>) -> Result<Option<String>, ServerError> {
        let WriterTasks { relay, policy } = self
            .tasks
            .lock()
            .map(|mut tasks| std::mem::take(&mut *tasks))
            .unwrap_or_default();
        if let Some(task) = policy {
            let _ = task.await;
        }
        // Every Writer handle is gone now (a standby's follower stops at `stop`): the
        // writer drains, the flusher syncs and answers.
        let writer = self.writer;
        tokio::task::spawn_blocking(move || writer.join()).await?;
        if let Some(relay) = relay {
            match tokio::time::timeout(RELAY_DRAIN_TIMEOUT, relay).await {
                Ok(Ok(Err(error))) => tracing::warn!(%error, "relay had stopped with an error"),
                Ok(_) => {}
                Err(_) => tracing::warn!(
                    "relay did not finish publishing in time; the rest is published after restart"
                ),
            }
        }
        // Only now may a standby take over: everything this writer acknowledged is in
        // the stream (or it waits in this log for the next start).
        let _ = self.release.send(true);
        let restart = self.engine.await.unwrap_or_else(|e| Some(e.to_string()));
        let final_sync = log.clone();
        if let Err(error) = tokio::task::spawn_blocking(move || final_sync.sync()).await? {
            tracing::error!(%error, "final sync failed");
        }
        Ok(restart)
    }
}

/// The role engine's task: standby, then writer (see `failover/mod.rs`).
struct RoleEngine {
    config: Config,
    failover: Failover,
    relay_status: Arc<RelayStatus>,
    tail: Arc<crate::log::LogTail>,
    tasks: Arc<std::sync::Mutex<WriterTasks>>,
    restart: watch::Sender<Option<String>>,
}

impl RoleEngine {
    /// Runs until stopped (a standby) or released (the writer); why the server must
    /// restart, if it must (also signalled at once on `restart`).
    async fn run(
        self,
        mut stop: watch::Receiver<bool>,
        mut release: watch::Receiver<bool>,
    ) -> Option<String> {
        use futures::FutureExt as _;
        let restart = self.restart.clone();
        let engine = async {
            match self.serve(&mut stop).await {
                Ok((held, guard)) => match failover::keep(held, &guard, &mut release).await {
                    Ok(()) => Ended::Stopped,
                    Err(ended) => ended,
                },
                Err(ended) => ended,
            }
        };
        // A panic here would leave a writer answering commands with nobody renewing its
        // lease (or a standby that never takes over): the server restarts instead.
        let ended = match std::panic::AssertUnwindSafe(engine).catch_unwind().await {
            Ok(ended) => ended,
            Err(panic) => Ended::Restart(format!(
                "the role engine panicked: {}",
                shop_shared::storage::panic_message(&*panic)
            )),
        };
        match ended {
            Ended::Stopped => None,
            Ended::Restart(why) => {
                tracing::error!(reason = %why, "this command server can no longer write; restarting");
                restart.send_replace(Some(why.clone()));
                Some(why)
            }
        }
    }

    /// Standby until this server holds the lease, then starts the writer's tasks; the
    /// lease to keep. Consumes the engine: nothing of it (no writer handle) outlives this.
    async fn serve(
        self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(failover::Held, LeaseGuard), Ended> {
        let failover = &self.failover;
        let Some(lease) = failover.open_lease(stop).await else {
            return Err(Ended::Stopped);
        };
        let held = failover.standby(lease, stop).await?;
        let config = &self.config;
        let relay = Relay::new(
            failover.log.clone(),
            self.tail.clone(),
            failover.client.clone(),
            config.nats.stream.clone(),
            failover.durable.clone(),
            self.relay_status.clone(),
            RelayConfig {
                window: usize::try_from(config.relay_window).unwrap_or(2048),
                read_chunk: 1024,
                replicas: usize::from(config.nats.stream_replicas),
            },
        )
        .fenced(failover.guard.clone());
        let restart = self.restart.clone();
        let relay_stop = stop.clone();
        let relay = tokio::spawn(async move {
            let outcome = relay.run(relay_stop).await;
            if let Err(RelayError::Conflict(why)) = &outcome {
                restart.send_replace(Some(format!("the relay found a conflict: {why}")));
            }
            outcome
        });
        let policy = (!config.no_policy).then(|| {
            let policy = policy::Policy {
                client: failover.client.clone(),
                stream_name: config.nats.stream.clone(),
                log: failover.log.clone(),
                writer: failover.writer.clone(),
            };
            tokio::spawn(policy.run(stop.clone()))
        });
        if let Ok(mut tasks) = self.tasks.lock() {
            *tasks = WriterTasks {
                relay: Some(relay),
                policy,
            };
        }
        failover.role.send_replace(Role::Writer);
        tracing::info!(addr = %failover.me.addr, "serving as the writer");
        Ok((held, failover.guard.clone()))
    }
}

/// The role engine's inputs.
fn failover_inputs(
    config: &Config,
    log: &Arc<EventLog>,
    writer: &Writer,
    watch: &WriterWatch,
    client: &async_nats::Client,
    me: Holder,
    role: watch::Sender<Role>,
) -> Failover {
    Failover {
        client: client.clone(),
        js: async_nats::jetstream::new(client.clone()),
        stream: config.nats.stream.clone(),
        log: log.clone(),
        writer: writer.clone(),
        durable: watch.durable_position.clone(),
        me,
        ttl: Duration::from_millis(config.lease_ttl_ms),
        replicas: usize::from(config.nats.stream_replicas),
        role,
        guard: LeaseGuard::default(),
    }
}

fn log_error(config: &Config, source: LogError) -> ServerError {
    ServerError::Log {
        dir: config.data_dir.clone(),
        source,
    }
}

/// Opens the event log.
async fn open_log(config: &Config) -> Result<Arc<EventLog>, ServerError> {
    let dir = config.data_dir.clone();
    let (durability, cache_bytes) = (config.durability, config.cache_mb.saturating_mul(1 << 20));
    let log = tokio::task::spawn_blocking(move || EventLog::open(&dir, durability, cache_bytes))
        .await?
        .map_err(|source| log_error(config, source))?;
    Ok(Arc::new(log))
}

/// Starts the writer over the log (after its recovery).
fn start_writer(
    config: &Config,
    log: &Arc<EventLog>,
) -> Result<(Writer, WriterWatch, WriterThreads), ServerError> {
    let writer_config = WriterConfig {
        queue_capacity: config.queue_capacity,
        batch_commands_max: config.batch_commands_max,
        queue_wait_max: (config.queue_wait_max_ms > 0)
            .then(|| Duration::from_millis(config.queue_wait_max_ms)),
    };
    let (writer, watch, threads) =
        Writer::start(log.clone(), writer_config).map_err(|source| log_error(config, source))?;
    tracing::info!(
        dir = %config.data_dir.display(),
        log_position = *watch.durable_position.borrow(),
        durability = config.durability.as_str(),
        "event log open"
    );
    Ok((writer, watch, threads))
}

/// At start-up, give NATS a moment, check the stream's configuration (a conflicting one
/// is a reason to refuse to start) and the log against the stream (see
/// `failover/reconcile.rs`: a log the stream has other events for is quarantined in
/// replicated mode and refused in local mode). When NATS does not answer in time the
/// server starts anyway, as a standby; the check runs again if following finds the log
/// and the stream disagree.
async fn check_at_startup(
    config: &Config,
    log: &Arc<EventLog>,
    client: &async_nats::Client,
    me: &Holder,
) -> Result<(), ServerError> {
    let wait = Duration::from_millis(config.nats_startup_wait_ms);
    let (_stop, never) = watch::channel(false);
    if !shop_shared::task::wait_connected(client, wait, &never).await {
        tracing::warn!("NATS not reachable at start-up; starting as a standby until it is");
        return Ok(());
    }
    let js = async_nats::jetstream::new(client.clone());
    let replicas = usize::from(config.nats.stream_replicas);
    let check = async {
        relay::ensure_stream(&js, &config.nats.stream, replicas).await?;
        let lease = Lease::open(
            &js,
            &config.nats.stream,
            me.clone(),
            Duration::from_millis(config.lease_ttl_ms),
            replicas,
        )
        .await
        .map_err(|e| RelayError::Nats(e.to_string()))?;
        let view = StreamView {
            js: &js,
            name: &config.nats.stream,
        };
        reconcile::reconcile(log, &view, &lease, &me.node, config.ack)
            .await
            .map_err(|e| match e {
                ReconcileError::Diverged(why) => RelayError::Conflict(why),
                ReconcileError::Log(e) => RelayError::Log(e),
                other => RelayError::Nats(other.to_string()),
            })
    };
    let deadline = wait.max(Duration::from_secs(1)) * 2;
    match tokio::time::timeout(deadline, check).await {
        Ok(Err(RelayError::Conflict(reason))) => Err(ServerError::StreamConflict(reason)),
        Ok(Err(error)) if error.severity() == Severity::Fatal => Err(ServerError::Relay(error)),
        Ok(Err(error)) => {
            tracing::warn!(%error, "stream not checked at start-up; starting as a standby");
            Ok(())
        }
        Ok(Ok(())) => Ok(()),
        Err(_) => {
            tracing::warn!("stream check timed out at start-up; starting as a standby");
            Ok(())
        }
    }
}

/// What the gRPC server serves.
struct Services {
    log: Arc<EventLog>,
    /// The last handle but the policy's: dropped once the server is built, so that the
    /// writer ends when the server and the policy are done.
    writer: Writer,
    watch: WriterWatch,
    relay: Arc<RelayStatus>,
    role: watch::Receiver<Role>,
    /// This server's address as published in the lease.
    advertised: String,
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
        role,
        advertised,
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
        role: role.clone(),
    })
    .max_decoding_message_size(config.request_bytes_max);
    let reader = LogServiceServer::new(grpc::LogReader {
        log,
        watch,
        relay,
        stream: config.nats.stream.clone(),
        role,
        advertised,
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

/// Keeps health in line with the log, the role (a standby does not serve commands) and
/// the relay.
async fn watch_health(
    health: Health,
    writer: writer::WriterWatch,
    relay: Arc<RelayStatus>,
    serving: watch::Receiver<bool>,
    role: watch::Receiver<Role>,
) {
    let mut last: Option<(bool, bool, bool)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let log_ok = writer.failure.borrow().is_none() && *serving.borrow();
        let writing = log_ok && *role.borrow() == Role::Writer;
        let relay_ok = relay.connected() && writing;
        if last != Some((log_ok, writing, relay_ok)) {
            // Named services first: "" SERVING then implies them.
            health.set(SERVICE_NAME, writing).await;
            health.set(LOG_SERVICE_NAME, log_ok).await;
            health.set(RELAY_HEALTH_SERVICE, relay_ok).await;
            health.set("", log_ok).await;
            if let Some((_, was_writing, was_relay_ok)) = last {
                if was_writing && was_relay_ok != relay_ok {
                    if relay_ok {
                        tracing::info!("relay healthy again");
                    } else {
                        tracing::warn!(
                            reason = relay.error().unwrap_or_default(),
                            "relay degraded; commands are still accepted"
                        );
                    }
                }
            }
            last = Some((log_ok, writing, relay_ok));
        }
    }
}
