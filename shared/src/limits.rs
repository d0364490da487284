//! Connection-level limits both servers apply below gRPC, so that no client behaviour
//! (connection floods, stream floods, huge headers) can exhaust memory or file
//! descriptors:
//! - at most `--connections-max` TCP connections at once: one beyond is accepted and
//!   closed at once (`shop_connections_refused_total`), so the client fails fast instead
//!   of waiting in the kernel's backlog;
//! - accept errors (out of file descriptors) pause accepting for a moment instead of
//!   spinning, and the open-file limit is raised to its hard limit at start;
//! - HTTP/2: at most `--streams-per-connection-max` streams open on a connection
//!   (SETTINGS_MAX_CONCURRENT_STREAMS: open watches count, and a client that opens more
//!   before it has read the setting gets REFUSED_STREAM, i.e. UNAVAILABLE; below it, the
//!   shedding layer answers requests beyond `--requests-per-connection-max` in flight
//!   with RESOURCE_EXHAUSTED) and a header block of at most `--header-bytes-max` bytes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long accepting pauses after an accept error (typically EMFILE).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Connection flags both servers take.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionArgs {
    /// TCP connections open at once; a connection beyond is closed as soon as it is
    /// accepted (counted in shop_connections_refused_total). The open-file limit is
    /// raised to its hard limit at start; keep this below it.
    #[arg(long, env = "SHOP_CONNECTIONS_MAX", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections_max: u32,

    /// Largest HTTP/2 header block of a request (all its metadata), in bytes; a request
    /// with more is refused by HTTP/2 before it reaches gRPC.
    #[arg(long, env = "SHOP_HEADER_BYTES_MAX", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1024..))]
    pub header_bytes_max: u32,

    /// Requests in flight on the whole server (all connections); beyond,
    /// RESOURCE_EXHAUSTED at once. Bounds the memory requests hold however many
    /// connections there are, and the time admitted requests spend waiting for a CPU
    /// when the machine is saturated (open watches count only while being set up).
    #[arg(long, env = "SHOP_REQUESTS_MAX", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub requests_max: u32,

    /// HTTP/2 streams one connection may have open at once (requests in flight and open
    /// watches); the client waits for a free one.
    #[arg(long, env = "SHOP_STREAMS_PER_CONNECTION_MAX", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub streams_per_connection_max: u32,
}

impl Default for ConnectionArgs {
    fn default() -> Self {
        ConnectionArgs {
            connections_max: 4096,
            header_bytes_max: 16 * 1024,
            streams_per_connection_max: 2048,
            requests_max: 1024,
        }
    }
}

impl ConnectionArgs {
    /// The shedding layer's limits, with the server's per-connection one.
    pub fn shed_limits(&self, requests_per_connection_max: usize) -> crate::metrics::ShedLimits {
        crate::metrics::ShedLimits {
            per_connection: requests_per_connection_max,
            total: self.requests_max as usize,
        }
    }

    /// The HTTP/2 limits on a server builder.
    pub fn apply(&self, builder: tonic::transport::Server) -> tonic::transport::Server {
        builder
            .max_concurrent_streams(self.streams_per_connection_max)
            .http2_max_header_list_size(self.header_bytes_max)
    }
}

/// `shop_connections_open` and `shop_connections_refused_total`.
#[derive(Clone, Default)]
pub struct ConnectionMetrics {
    open: Gauge,
    refused: Counter,
}

impl ConnectionMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ConnectionMetrics::default();
        registry.register(
            "shop_connections_open",
            "TCP connections to the gRPC port open now",
            metrics.open.clone(),
        );
        registry.register(
            "shop_connections_refused",
            "TCP connections closed at once because --connections-max were open",
            metrics.refused.clone(),
        );
        metrics
    }
}

/// Raises the soft open-file limit to the hard limit (as Go programs such as nats-server
/// do at start); returns the limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(error) => {
            tracing::warn!(%error, "could not raise the open-file limit");
            None
        }
    }
}

/// The accepted connections of `listener`, at most `max` open at once.
pub fn incoming(
    listener: TcpListener,
    max: u32,
    metrics: ConnectionMetrics,
) -> impl Stream<Item = io::Result<LimitedStream>> {
    let permits = Arc::new(Semaphore::new(max as usize));
    let last_warning = Arc::new(AtomicU64::new(0));
    futures::stream::unfold(listener, move |listener| {
        let permits = permits.clone();
        let metrics = metrics.clone();
        let last_warning = last_warning.clone();
        async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed; pausing accepts");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    metrics.refused.inc();
                    warn_refused(&last_warning, max);
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                metrics.open.inc();
                let limited = LimitedStream {
                    stream,
                    _permit: permit,
                    open: metrics.open.clone(),
                };
                return Some((Ok(limited), listener));
            }
        }
    })
}

/// Warns about refused connections at most once every 10 s.
fn warn_refused(last_warning: &AtomicU64, max: u32) {
    let now = crate::events::now_micros().max(0) as u64 / 1_000_000;
    let last = last_warning.load(Ordering::Relaxed);
    if now >= last + 10
        && last_warning
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            connections_max = max,
            "refusing connections: --connections-max are open (shop_connections_refused_total counts them)"
        );
    }
}

/// An accepted connection holding its place under `--connections-max` until it closes.
pub struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for LimitedStream {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
