//! `command-server`: parses flags, sets up logging, and runs [`command_server::run`]
//! until SIGINT/SIGTERM (again when it asks to restart: see `failover/mod.rs`).

use anyhow::Context;

/// sled allocates on every insert; mimalloc makes that markedly cheaper than glibc's
/// malloc (measured in BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::Parser;

/// How long a restarted server waits for its log's lock, held by the run before it.
const RESTART_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    let config = command_server::Config::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("command-server")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let telemetry =
            shop_shared::telemetry::init(&config.log, &config.telemetry, "command-server")?;
        // When the last in-process restart began (see the lock wait below).
        let mut restarted: Option<std::time::Instant> = None;
        let result = loop {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            tracing::info!(addr = %listener.local_addr()?, "listening");
            match command_server::run(
                config.clone(),
                listener,
                shop_shared::grpc::shutdown_signal(),
            )
            .await
            {
                // Lost the writer lease, or the log and the stream disagree: start over,
                // the start-up check deciding what becomes of the log.
                Err(command_server::ServerError::Restart(_)) => {
                    restarted = Some(std::time::Instant::now());
                    continue;
                }
                // Just restarted: the previous run's sled threads can hold the data dir's
                // lock for a moment after its last handle is gone (found by the chaos
                // runner: the server exited instead of starting over). Wait for it.
                Err(error)
                    if error.is_log_locked()
                        && restarted.is_some_and(|at| at.elapsed() < RESTART_LOCK_WAIT) =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                // Started on a full disk (sled cannot open its log): wait for space rather
                // than exit, as a running server does (`restart_when_space_returns`).
                Err(error) if error.is_disk_full() => {
                    tracing::error!(%error, "the disk under the event log is full; trying again in 1 s");
                    tokio::select! {
                        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                        () = shop_shared::grpc::shutdown_signal() => break Ok(()),
                    }
                }
                other => break other,
            }
        };
        telemetry.shutdown().await;
        result.map_err(anyhow::Error::from)
    })
}
