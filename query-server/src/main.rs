//! `query-server`: parses flags, sets up logging, and serves queries until SIGINT/SIGTERM
//! (or, with `rebuild`, recomputes every view from the stream and exits).

use anyhow::Context;

/// sled allocates on every insert; mimalloc makes that markedly cheaper than glibc's
/// malloc (measured in BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::Parser;

#[derive(clap::Parser, Debug)]
#[command(
    name = "query-server",
    version,
    about = "Shop query server: consumes the event stream from NATS JetStream into sled views and answers queries over gRPC."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    config: query_server::Config,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Serve queries (the default).
    Serve,
    /// Recompute every view from stream sequence 1, showing progress, then exit.
    Rebuild,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("query-server")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let telemetry =
            shop_shared::telemetry::init(&cli.config.log, &cli.config.telemetry, "query-server")?;
        let result = serve_or_rebuild(cli).await;
        telemetry.shutdown().await;
        result
    })
}

async fn serve_or_rebuild(cli: Cli) -> anyhow::Result<()> {
    {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                let listener = tokio::net::TcpListener::bind(cli.config.listen)
                    .await
                    .with_context(|| format!("binding {}", cli.config.listen))?;
                tracing::info!(addr = %listener.local_addr()?, "listening");
                query_server::run(cli.config, listener, shop_shared::grpc::shutdown_signal())
                    .await?;
            }
            Command::Rebuild => {
                query_server::rebuild(cli.config).await?;
            }
        }
        Ok(())
    }
}
