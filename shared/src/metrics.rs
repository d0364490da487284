//! Prometheus metrics both servers serve at `--metrics-listen` (README: Observability).
//!
//! - [`GrpcMetricsLayer`]: `grpc_server_started_total`, `grpc_server_handled_total` and the
//!   `grpc_server_handling_seconds` histogram, named and labelled as the widely used gRPC
//!   Prometheus middleware (go-grpc-prometheus) does, so existing dashboards work.
//! - [`ShedLayer`]: the per-connection in-flight limit; what it refuses is answered
//!   `RESOURCE_EXHAUSTED` and counted in `shop_shed_requests_total`.
//! - [`register_gauge_fn`]: a gauge whose value is read at scrape time from the state the
//!   status RPCs read, so a scrape and `GetLogStatus`/`GetStatus` never disagree.
//! - [`serve`]: `GET /metrics` in the Prometheus text format (0.0.4) over HTTP/1.1.
//!
//! Recording costs a hash lookup of static labels and an atomic add (a short uncontended
//! lock for histograms); nothing is allocated per request once a label set exists.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::Body;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;
use prost::Message;
use tokio::net::TcpListener;

use crate::grpc::{Health, OnStatus, StatusBody};

/// Upper bounds (seconds) of the latency histograms: 100 µs to 10 s. Our commands take a
/// few ms and reads well under one, so the middleware's default (5 ms and up) would put
/// nearly everything in its first bucket.
pub const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A histogram with [`LATENCY_BUCKETS_SECONDS`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_SECONDS)
}

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry as text, in the Prometheus exposition format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    if let Err(error) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::error!(%error, "metrics could not be encoded");
    }
    out
}

/// A gauge read when Prometheus scrapes: `read` runs on every scrape.
struct GaugeFn {
    name: &'static str,
    help: &'static str,
    read: Box<dyn Fn() -> i64 + Send + Sync>,
}

impl std::fmt::Debug for GaugeFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GaugeFn").field("name", &self.name).finish()
    }
}

impl Collector for GaugeFn {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new((self.read)());
        let metric = encoder.encode_descriptor(self.name, self.help, None, gauge.metric_type())?;
        gauge.encode(metric)
    }
}

/// Registers a gauge whose value `read` returns at scrape time.
pub fn register_gauge_fn(
    registry: &mut Registry,
    name: &'static str,
    help: &'static str,
    read: impl Fn() -> i64 + Send + Sync + 'static,
) {
    registry.register_collector(Box::new(GaugeFn {
        name,
        help,
        read: Box::new(read),
    }));
}

/// A `u64` position or count as a gauge value (saturating: gauges are `i64`).
pub fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Scrape connections served at once; more are closed at once (a scraper needs one).
const SCRAPE_CONNECTIONS_MAX: usize = 64;
/// A connection must send its request headers within this long.
const SCRAPE_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(SCRAPE_CONNECTIONS_MAX));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(scrape(&request, &registry)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _closed = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(SCRAPE_HEADER_TIMEOUT)
                .serve_connection(io, service)
                .await;
            drop(slot);
        });
    }
}

fn scrape<B>(
    request: &http::Request<B>,
    registry: &Registry,
) -> http::Response<http_body_util::Full<Bytes>> {
    let (status, content_type, body) = if request.uri().path() != "/metrics" {
        (
            404,
            "text/plain",
            "not found: metrics are at /metrics\n".to_string(),
        )
    } else if request.method() != http::Method::GET && request.method() != http::Method::HEAD {
        (405, "text/plain", "use GET\n".to_string())
    } else {
        (200, CONTENT_TYPE, encode(registry))
    };
    let mut response = http::Response::new(http_body_util::Full::new(Bytes::from(body)));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// Binds `addr` and serves metrics there in the background until `shutdown` resolves;
/// returns the bound address (useful with port 0).
async fn spawn_server(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, registry, shutdown));
    tracing::info!(addr = %bound, "serving Prometheus metrics at /metrics");
    Ok(bound)
}

/// What both servers register the same way: the gRPC metrics of their services (and
/// health), the per-connection shedding limit, open connections, and `shop_serving`.
pub struct ServerMetrics {
    /// Where each server adds its own metrics before serving them.
    pub registry: Registry,
    pub grpc: GrpcMetrics,
    pub shed_layer: ShedLayer,
    /// `shop_shed_requests_total`, for the server's other refusals at a limit.
    pub shed: Counter,
    /// Open and refused connections (`--connections-max`).
    pub connections: crate::limits::ConnectionMetrics,
}

impl ServerMetrics {
    pub fn new(services: &[&str], limits: ShedLimits, health: &Health) -> Self {
        let mut registry = Registry::default();
        let mut services = services.to_vec();
        services.push("grpc.health.v1.Health");
        let grpc = GrpcMetrics::register(&mut registry, &services);
        let (shed_layer, shed) = ShedLayer::register(&mut registry, limits);
        health.register_metrics(&mut registry);
        let connections = crate::limits::ConnectionMetrics::register(&mut registry);
        ServerMetrics {
            registry,
            grpc,
            shed_layer,
            shed,
            connections,
        }
    }
}

/// Serves `registry` at `addr` (when set: `--metrics-listen`) until `stop` turns true.
pub async fn serve_until_stopped(
    addr: Option<SocketAddr>,
    registry: Registry,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), MetricsListenError> {
    let Some(addr) = addr else {
        return Ok(());
    };
    spawn_server(addr, Arc::new(registry), async move {
        let _ = stop.wait_for(|stop| *stop).await;
    })
    .await
    .map(|_| ())
    .map_err(|source| MetricsListenError { addr, source })
}

/// The metrics address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("metrics listener on {addr}: {source}")]
pub struct MetricsListenError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

// ---- gRPC server metrics -------------------------------------------------------------

/// Labels of `grpc_server_started_total` and `grpc_server_handling_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
}

/// Labels of `grpc_server_handled_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

/// Labels of an unknown path: a client may send any path, and each must not become a
/// series of its own (unbounded memory).
const UNKNOWN: MethodLabels = MethodLabels {
    grpc_type: "unary",
    grpc_service: "unknown",
    grpc_method: "unknown",
};

/// Every gRPC method either server may serve, by path (`/package.Service/Method`): ours
/// from the contract's descriptors, plus health and reflection. Built once per process.
fn known_methods() -> &'static HashMap<String, MethodLabels> {
    static METHODS: OnceLock<HashMap<String, MethodLabels>> = OnceLock::new();
    METHODS.get_or_init(|| {
        let mut methods = HashMap::new();
        for set in [
            crate::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    let full = format!("{}.{}", file.package(), service.name());
                    let full: &'static str = Box::leak(full.into_boxed_str());
                    for method in &service.method {
                        let name: &'static str =
                            Box::leak(method.name().to_string().into_boxed_str());
                        let grpc_type = match (method.client_streaming(), method.server_streaming())
                        {
                            (false, false) => "unary",
                            (false, true) => "server_stream",
                            (true, false) => "client_stream",
                            (true, true) => "bidi_stream",
                        };
                        methods.insert(
                            format!("/{full}/{name}"),
                            MethodLabels {
                                grpc_type,
                                grpc_service: full,
                                grpc_method: name,
                            },
                        );
                    }
                }
            }
        }
        methods
    })
}

/// The methods of `service` (e.g. `shop.v1.CommandService`), by name.
pub fn methods_of(service: &str) -> Vec<&'static str> {
    let mut methods: Vec<&'static str> = known_methods()
        .values()
        .filter(|m| m.grpc_service == service)
        .map(|m| m.grpc_method)
        .collect();
    methods.sort_unstable();
    methods
}

/// The gRPC code names as the middleware spells them (Go's `codes.Code.String()`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// The gRPC server metrics of one process.
#[derive(Clone)]
pub struct GrpcMetrics {
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling: Family<MethodLabels, Histogram, fn() -> Histogram>,
    /// The served methods' series, by path, resolved once: recording an RPC is then one
    /// hash of its path and atomic adds, no label lookups.
    served: Arc<HashMap<&'static str, Arc<MethodSeries>>>,
}

/// One served method's series.
struct MethodSeries {
    labels: MethodLabels,
    started: Counter,
    handling: Histogram,
    /// `grpc_code="OK"`, the common case; other codes go through the family.
    ok: Counter,
}

/// What an RPC in flight records into.
#[derive(Clone)]
enum Series {
    Served(Arc<MethodSeries>),
    Other(MethodLabels),
}

impl GrpcMetrics {
    /// Registers the metrics, with zero series for every method of `services` (so rates
    /// and dashboards have a series before the first call).
    pub fn register(registry: &mut Registry, services: &[&str]) -> Self {
        let started = Family::<MethodLabels, Counter>::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let handling: Family<MethodLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "grpc_server_started",
            "RPCs started on the server",
            started.clone(),
        );
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status code",
            handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to its status (for streams: the whole stream)",
            handling.clone(),
        );
        let served = known_methods()
            .iter()
            .filter(|(_, labels)| services.contains(&labels.grpc_service))
            .map(|(path, labels)| {
                let series = MethodSeries {
                    labels: labels.clone(),
                    started: started.get_or_create_owned(labels),
                    handling: handling.get_or_create_owned(labels),
                    ok: handled.get_or_create_owned(&labels.handled(code_name(tonic::Code::Ok))),
                };
                (path.as_str(), Arc::new(series))
            })
            .collect();
        GrpcMetrics {
            started,
            handled,
            handling,
            served: Arc::new(served),
        }
    }

    /// The tower layer that records every RPC.
    pub fn layer(&self) -> GrpcMetricsLayer {
        GrpcMetricsLayer {
            metrics: self.clone(),
        }
    }

    /// Counts an RPC to `path` as started; what to record its end into.
    fn start(&self, path: &str) -> Series {
        match self.served.get(path) {
            Some(series) => {
                series.started.inc();
                Series::Served(series.clone())
            }
            None => {
                let labels = known_methods().get(path).cloned().unwrap_or(UNKNOWN);
                self.started.get_or_create(&labels).inc();
                Series::Other(labels)
            }
        }
    }

    fn finish(&self, series: &Series, code: tonic::Code, started: Instant) {
        let seconds = started.elapsed().as_secs_f64();
        match series {
            Series::Served(s) => {
                if code == tonic::Code::Ok {
                    s.ok.inc();
                } else {
                    self.handled
                        .get_or_create(&s.labels.handled(code_name(code)))
                        .inc();
                }
                s.handling.observe(seconds);
            }
            Series::Other(labels) => {
                self.handled
                    .get_or_create(&labels.handled(code_name(code)))
                    .inc();
                self.handling.get_or_create(labels).observe(seconds);
            }
        }
    }
}

impl MethodLabels {
    fn handled(&self, grpc_code: &'static str) -> HandledLabels {
        HandledLabels {
            grpc_type: self.grpc_type,
            grpc_service: self.grpc_service,
            grpc_method: self.grpc_method,
            grpc_code,
        }
    }
}

/// Records each RPC in [`GrpcMetrics`] once its status is known ([`StatusBody`]).
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: GrpcMetrics,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service made by [`GrpcMetricsLayer`].
#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = http::Response<StatusBody<ResBody, Pending>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        let series = self.metrics.start(request.uri().path());
        MeteredFuture {
            inner: self.inner.call(request),
            pending: Some(Pending {
                metrics: self.metrics.clone(),
                series,
                started,
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`GrpcMetricsService`] (a named future: nothing boxed).
    pub struct MeteredFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
    }
}

impl<F, ResBody, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<StatusBody<ResBody, Pending>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let Some(pending) = this.pending.take() else {
            // Polled again after completion: a contract violation by the caller.
            return Poll::Pending;
        };
        Poll::Ready(match result {
            Ok(response) => Ok(StatusBody::watch(response, pending)),
            Err(error) => {
                pending.finish(tonic::Code::Unknown);
                Err(error)
            }
        })
    }
}

/// An RPC whose status is not known yet (it comes in the trailers).
pub struct Pending {
    metrics: GrpcMetrics,
    series: Series,
    started: Instant,
}

impl OnStatus for Pending {
    fn finish(self, code: tonic::Code) {
        self.metrics.finish(&self.series, code, self.started);
    }
}

// ---- load shedding -------------------------------------------------------------------

/// Bounds the requests one connection may have in flight, and all connections together;
/// beyond, `RESOURCE_EXHAUSTED` at once (never a queue), counted in
/// `shop_shed_requests_total`. The total bounds the memory requests hold however many
/// connections there are. This replaces tonic's
/// `concurrency_limit_per_connection` + `load_shed`, which shed outside every layer, where
/// neither the count nor the gRPC metrics could see it. A request's slot is held until
/// its response headers are ready (for a watch: until it is set up, not for its life),
/// as tonic's limit did.
#[derive(Clone)]
pub struct ShedLayer {
    state: Arc<ShedState>,
}

/// Paths of the health service, which the shedding layer lets through.
const HEALTH_PATH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The in-flight limits of [`ShedLayer`] (each at least 1).
#[derive(Debug, Clone, Copy)]
pub struct ShedLimits {
    pub per_connection: usize,
    pub total: usize,
}

struct ShedState {
    limits: ShedLimits,
    in_flight: Mutex<InFlight>,
    shed: Counter,
}

#[derive(Default)]
struct InFlight {
    by_peer: HashMap<SocketAddr, usize>,
    total: usize,
}

/// Which limit a shed request met.
enum Full {
    Connection,
    Server,
}

impl ShedLayer {
    /// In-flight limits per connection and in total; registers
    /// `shop_shed_requests_total` and returns the counter, which other refusals for
    /// overload (a full queue, too many watchers) also increment.
    pub fn register(registry: &mut Registry, limits: ShedLimits) -> (Self, Counter) {
        let shed = Counter::default();
        registry.register(
            "shop_shed_requests",
            "Requests refused with RESOURCE_EXHAUSTED because the server was at a limit (per-connection requests, queue, watchers)",
            shed.clone(),
        );
        let layer = ShedLayer {
            state: Arc::new(ShedState {
                limits: ShedLimits {
                    per_connection: limits.per_connection.max(1),
                    total: limits.total.max(1),
                },
                in_flight: Mutex::new(InFlight::default()),
                shed: shed.clone(),
            }),
        };
        (layer, shed)
    }
}

impl ShedState {
    /// Takes a slot for the connection at `peer`, or says which limit is reached.
    fn acquire(self: &Arc<Self>, peer: SocketAddr) -> Result<Slot, Full> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if in_flight.total >= self.limits.total {
            return Err(Full::Server);
        }
        let count = in_flight.by_peer.entry(peer).or_insert(0);
        if *count >= self.limits.per_connection {
            return Err(Full::Connection);
        }
        *count += 1;
        in_flight.total += 1;
        Ok(Slot {
            state: self.clone(),
            peer,
        })
    }
}

/// One request's place in its connection's limit, given back on drop.
pub struct Slot {
    state: Arc<ShedState>,
    peer: SocketAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut in_flight = self
            .state
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        in_flight.total = in_flight.total.saturating_sub(1);
        if let Some(count) = in_flight.by_peer.get_mut(&self.peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                in_flight.by_peer.remove(&self.peer);
            }
        }
    }
}

impl<S> tower::Layer<S> for ShedLayer {
    type Service = ShedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ShedService {
            inner,
            state: self.state.clone(),
        }
    }
}

/// The service made by [`ShedLayer`].
#[derive(Clone)]
pub struct ShedService<S> {
    inner: S,
    state: Arc<ShedState>,
}

impl<S, ReqBody> tower::Service<http::Request<ReqBody>> for ShedService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ShedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // Health checks are never shed: an overloaded server is alive, and a probe that
        // failed for overload would have it restarted when it is busiest.
        let peer = if request.uri().path().starts_with(HEALTH_PATH_PREFIX) {
            None
        } else {
            crate::grpc::peer_addr(request.extensions())
        };
        let slot = match peer.map(|peer| self.state.acquire(peer)) {
            Some(Ok(slot)) => Some(slot),
            Some(Err(full)) => {
                self.state.shed.inc();
                let message = match full {
                    Full::Connection => format!(
                        "too many requests in flight on this connection (limit {}); retry later or use more connections",
                        self.state.limits.per_connection
                    ),
                    Full::Server => format!(
                        "too many requests in flight on this server (limit {}); retry later",
                        self.state.limits.total
                    ),
                };
                return ShedFuture::Shed {
                    response: Some(tonic::Status::resource_exhausted(message).into_http()),
                };
            }
            // A health check, or not a TCP connection (in-process tests): not limited.
            None => None,
        };
        ShedFuture::Admitted {
            inner: self.inner.call(request),
            slot,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`ShedService`]: the refusal, or the admitted request
    /// holding its slot until its response is ready.
    #[project = ShedProjection]
    pub enum ShedFuture<F> {
        Shed { response: Option<http::Response<tonic::body::Body>> },
        Admitted { #[pin] inner: F, slot: Option<Slot> },
    }
}

impl<F, E> Future for ShedFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ShedProjection::Shed { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Pending,
            },
            ShedProjection::Admitted { inner, slot } => {
                let result = std::task::ready!(inner.poll(cx));
                drop(slot.take());
                Poll::Ready(result)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_method_is_known_with_its_type() {
        let methods = known_methods();
        let place = &methods["/shop.v1.CommandService/PlaceOrder"];
        assert_eq!(place.grpc_type, "unary");
        assert_eq!(place.grpc_service, "shop.v1.CommandService");
        assert_eq!(
            methods["/shop.v1.QueryService/WatchOrder"].grpc_type,
            "server_stream"
        );
        assert_eq!(methods["/grpc.health.v1.Health/Check"].grpc_type, "unary");
        assert_eq!(
            methods["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"].grpc_type,
            "bidi_stream"
        );
    }

    #[test]
    fn scrape_time_gauges_and_zero_series_are_encoded() {
        let mut registry = Registry::default();
        let value = Arc::new(std::sync::atomic::AtomicU64::new(7));
        let read = value.clone();
        register_gauge_fn(&mut registry, "shop_log_position", "help", move || {
            gauge_value(read.load(std::sync::atomic::Ordering::Relaxed))
        });
        let grpc = GrpcMetrics::register(&mut registry, &["shop.v1.CommandService"]);
        for (path, code) in [
            (
                "/shop.v1.CommandService/PlaceOrder",
                tonic::Code::InvalidArgument,
            ),
            ("/shop.v1.CommandService/PlaceOrder", tonic::Code::Ok),
            ("/shop.v1.QueryService/GetOrder", tonic::Code::Ok),
            ("/no.such/Method", tonic::Code::Unimplemented),
        ] {
            let series = grpc.start(path);
            grpc.finish(&series, code, Instant::now());
        }
        let text = encode(&registry);
        assert!(text.contains("shop_log_position 7\n"), "{text}");
        value.store(9, std::sync::atomic::Ordering::Relaxed);
        assert!(encode(&registry).contains("shop_log_position 9\n"));
        for line in [
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"shop.v1.CommandService\",grpc_method=\"PlaceOrder\",grpc_code=\"InvalidArgument\"} 1",
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"shop.v1.CommandService\",grpc_method=\"PlaceOrder\",grpc_code=\"OK\"} 1",
            "grpc_server_handling_seconds_count{grpc_type=\"unary\",grpc_service=\"shop.v1.CommandService\",grpc_method=\"PlaceOrder\"} 2",
            "grpc_server_started_total{grpc_type=\"unary\",grpc_service=\"shop.v1.CommandService\",grpc_method=\"PlaceOrder\"} 2",
            "grpc_server_started_total{grpc_type=\"unary\",grpc_service=\"shop.v1.CommandService\",grpc_method=\"RenameCustomer\"} 0",
            // A method of a service not served here is still counted under its name; an
            // unknown path under `unknown`.
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"shop.v1.QueryService\",grpc_method=\"GetOrder\",grpc_code=\"OK\"} 1",
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"unknown\",grpc_method=\"unknown\",grpc_code=\"Unimplemented\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
        assert!(
            !text.contains("grpc_method=\"ListOrders\""),
            "only the served services get zero series"
        );
        assert!(text.contains("# TYPE grpc_server_handling_seconds histogram"));
    }

    #[test]
    fn slots_are_bounded_per_connection_and_in_total_and_given_back() {
        let mut registry = Registry::default();
        let limits = ShedLimits {
            per_connection: 2,
            total: 3,
        };
        let (layer, shed) = ShedLayer::register(&mut registry, limits);
        let a: SocketAddr = "127.0.0.1:1000".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:1001".parse().expect("addr");
        let c: SocketAddr = "127.0.0.1:1002".parse().expect("addr");
        let first = layer.state.acquire(a).ok().expect("slot");
        let _second = layer.state.acquire(a).ok().expect("slot");
        assert!(
            matches!(layer.state.acquire(a), Err(Full::Connection)),
            "third on one connection"
        );
        let _third = layer
            .state
            .acquire(b)
            .ok()
            .expect("another connection has its own");
        assert!(
            matches!(layer.state.acquire(c), Err(Full::Server)),
            "a fourth in total"
        );
        drop(first);
        assert!(
            layer.state.acquire(c).is_ok(),
            "a slot is given back on drop, to the total too"
        );
        assert_eq!(shed.get(), 0, "acquire alone counts nothing");
    }
}
