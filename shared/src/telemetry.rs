//! Logs and traces shared by both binaries (README: Observability).
//!
//! - Logs: `tracing` lines on stderr, text or JSON. Inside a request, a line carries the
//!   request span's `trace_id` and `span_id` (JSON: under `span`).
//! - Traces: [`TraceLayer`] opens one server span per RPC, child of the caller's W3C
//!   `traceparent` (or the root of a new trace). With `--otlp-endpoint`, spans are
//!   exported with OTLP over gRPC through `tracing-opentelemetry`; without, nothing is
//!   exported and the ids only tie log lines together.
//! - The trace crosses NATS in the `traceparent` header of each event (see
//!   [`RequestTrace`]), so the query server's span that applies an event is a child of
//!   the command's server span.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogArgs, LogFormat, TelemetryArgs};
use crate::grpc::{OnStatus, StatusBody};

/// Set once spans are exported: only then is a trace context worth carrying in events.
static EXPORTING: AtomicBool = AtomicBool::new(false);
/// `--otlp-sample-ratio` as a threshold on a random `u64` (`u64::MAX`: every trace).
static SAMPLE_THRESHOLD: AtomicU64 = AtomicU64::new(u64::MAX);

/// The `tracing` target of the spans that are exported. Only spans of this target reach
/// the OpenTelemetry layer (a static, per-callsite filter), so a request that is not
/// sampled costs what it costs without an exporter: the decision is taken before its
/// span is made ([`sampled`]), and an unsampled request gets a plain local span.
pub const EXPORT_TARGET: &str = "shop::trace";

/// The `tracing` target of the per-request spans that are not exported (they give log
/// lines their trace ids); a log filter can turn them off (`shop::request=off`).
pub const REQUEST_TARGET: &str = "shop::request";

/// Whether this process exports spans (`--otlp-endpoint`).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Whether the work continuing `parent` is exported: never without an exporter; as the
/// parent says when there is one; for a new trace, by `--otlp-sample-ratio`.
pub fn sampled(parent: Option<&TraceParent>) -> bool {
    exporting()
        && match parent {
            Some(parent) => parent.sampled,
            None => {
                let threshold = SAMPLE_THRESHOLD.load(Ordering::Relaxed);
                threshold == u64::MAX || random_u64() < threshold
            }
        }
}

/// What [`init`] set up; [`Telemetry::shutdown`] exports the spans still buffered.
#[must_use = "call shutdown() before exit, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// Installs the global subscriber: logs (`RUST_LOG`, when set, overrides `--log`) and,
/// with `--otlp-endpoint`, the OTLP span exporter. With an endpoint it must run inside
/// the tokio runtime (the exporter's gRPC channel lives there). Calling it twice (tests
/// running servers in-process) keeps the first subscriber.
pub fn init(
    log: &LogArgs,
    telemetry: &TelemetryArgs,
    service_name: &'static str,
) -> Result<Telemetry, TelemetryError> {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&log.log_filter).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let fmt = match log.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .boxed(),
    };
    let provider = match &telemetry.otlp_endpoint {
        Some(endpoint) => Some(provider(
            endpoint,
            telemetry.otlp_sample_ratio,
            service_name,
        )?),
        None => None,
    };
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service_name))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(EXPORT_TARGET, tracing::Level::INFO),
            )
    });
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        let ratio = telemetry.otlp_sample_ratio.clamp(0.0, 1.0);
        let threshold = if ratio >= 1.0 {
            u64::MAX
        } else {
            (ratio * u64::MAX as f64) as u64
        };
        SAMPLE_THRESHOLD.store(threshold, Ordering::Relaxed);
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!(
            endpoint = telemetry.otlp_endpoint.as_deref().unwrap_or_default(),
            sample_ratio = telemetry.otlp_sample_ratio,
            "exporting trace spans with OTLP"
        );
    }
    Ok(Telemetry { provider })
}

fn provider(
    endpoint: &str,
    ratio: f64,
    service_name: &'static str,
) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    // Only spans already chosen for export reach the SDK ([`sampled`] applied `ratio`).
    let _ = ratio;
    Ok(SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

impl Telemetry {
    /// Exports what is buffered (bounded by the SDK's timeout) and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "trace exporter shutdown");
            }
        }
    }
}

/// A W3C trace context, `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// Never zero.
    pub trace_id: u128,
    /// Never zero.
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` unless well-formed with non-zero ids.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Lowercase hex of exactly `len` digits.
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        // Version ff is invalid; a future version may append fields, version 00 may not.
        if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
            return None;
        }
        let parent = TraceParent {
            trace_id: u128::from_str_radix(trace_id, 16).ok()?,
            span_id: u64::from_str_radix(span_id, 16).ok()?,
            sampled: u8::from_str_radix(flags, 16).ok()? & 1 == 1,
        };
        (parent.trace_id != 0 && parent.span_id != 0).then_some(parent)
    }

    /// The header value.
    pub fn header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{}",
            self.trace_id,
            self.span_id,
            if self.sampled { "01" } else { "00" }
        )
    }

    /// A fresh trace context, not sampled (for log correlation only).
    fn fresh() -> Self {
        let trace_id = (u128::from(random_u64()) << 64 | u128::from(random_u64())).max(1);
        TraceParent {
            trace_id,
            span_id: fresh_span_id(),
            sampled: false,
        }
    }

    /// The context of a span that is not exported: the parent's trace (or a new one),
    /// a fresh span id.
    fn local_child(parent: Option<TraceParent>) -> Self {
        match parent {
            Some(p) => TraceParent {
                span_id: fresh_span_id(),
                ..p
            },
            None => TraceParent::fresh(),
        }
    }

    fn of_context(cx: &opentelemetry::Context) -> Option<Self> {
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| TraceParent {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            sampled: sc.is_sampled(),
        })
    }

    /// As the remote parent of an OpenTelemetry span.
    fn as_remote_parent(&self) -> opentelemetry::Context {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(self.trace_id.to_be_bytes()),
            SpanId::from_bytes(self.span_id.to_be_bytes()),
            flags,
            true,
            TraceState::default(),
        ))
    }
}

/// A random non-zero span id.
fn fresh_span_id() -> u64 {
    random_u64().max(1)
}

/// Ids for log correlation need to be unique, not unpredictable: a per-thread splitmix64
/// seeded once from a UUIDv7 (a UUIDv7 per id cost ~400 ns here, a tenth of a request).
fn random_u64() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(uuid::Uuid::now_v7().as_u128() as u64);
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// An id as fixed-width lowercase hex, written straight into a log line.
struct Hex<T>(T);

impl std::fmt::Display for Hex<u128> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::fmt::Display for Hex<u64> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Makes the exported `span` (of target [`EXPORT_TARGET`]) a child of `parent` (or the
/// root of a new trace), records its `trace_id` and `span_id` fields (log lines inside
/// it carry them), and returns its context as a `traceparent` for what it causes.
pub fn export_context(span: &tracing::Span, parent: Option<&TraceParent>) -> Option<String> {
    if let Some(parent) = parent {
        let _ = span.set_parent(parent.as_remote_parent());
    }
    let own = TraceParent::of_context(&span.context());
    if let Some(own) = &own {
        span.record("trace_id", tracing::field::display(Hex(own.trace_id)));
        span.record("span_id", tracing::field::display(Hex(own.span_id)));
    }
    own.as_ref().map(TraceParent::header)
}

/// The ids for a span that is not exported (the parent's trace, or a new one; a fresh
/// span id), as `trace_id` and `span_id` field values for log lines.
pub fn local_ids(parent: Option<&TraceParent>) -> (impl std::fmt::Display, impl std::fmt::Display) {
    let own = TraceParent::local_child(parent.copied());
    (Hex(own.trace_id), Hex(own.span_id))
}

/// What a handler needs of its request's trace (in the request's extensions).
#[derive(Debug, Clone, Default)]
pub struct RequestTrace {
    /// The context to hand on to what this request causes (the events a command appends
    /// carry it to NATS): this server's span when spans are exported, else the caller's
    /// `traceparent` as sent; `None` when there is neither (the relay then derives one).
    pub propagate: Option<String>,
}

/// Opens a server span per RPC (`rpc.system.name=grpc`, `rpc.method`, the response
/// code), a child of the caller's `traceparent`, and puts a [`RequestTrace`] into the
/// request's extensions.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceService { inner }
    }
}

/// The service made by [`TraceLayer`].
#[derive(Clone, Debug)]
pub struct TraceService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TraceService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<StatusBody<ResBody, SpanStatus>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let method = request.uri().path().trim_start_matches('/');
        let parent = request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        let exported = sampled(parent.as_ref());
        let (span, propagate) = if exported {
            let span = tracing::info_span!(
                target: EXPORT_TARGET,
                "grpc",
                otel.name = method,
                otel.kind = "server",
                rpc.system.name = "grpc",
                rpc.method = method,
                rpc.response.status_code = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
            );
            let propagate = export_context(&span, parent.as_ref());
            (span, propagate)
        } else {
            // Not exported: log lines need only the method and the ids, known before the
            // span is made (recording them afterwards would format every field twice);
            // what the request causes carries the caller's context, if any. The span
            // costs ~7 µs of CPU per command (BENCHMARKS.md); `--log
            // info,shop::request=off` drops it, and log lines then carry no trace id.
            let span = if tracing::enabled!(target: REQUEST_TARGET, tracing::Level::INFO) {
                let (trace_id, span_id) = local_ids(parent.as_ref());
                tracing::info_span!(
                    target: REQUEST_TARGET,
                    "grpc",
                    rpc.method = method,
                    trace_id = %trace_id,
                    span_id = %span_id,
                )
            } else {
                tracing::Span::none()
            };
            (span, parent.as_ref().map(TraceParent::header))
        };
        request.extensions_mut().insert(RequestTrace { propagate });
        let future = self.inner.call(request);
        // The span lasts until the status is known: the end of the response body.
        let status = SpanStatus(exported.then(|| span.clone()));
        Box::pin(
            async move {
                let response = future.await?;
                Ok(StatusBody::watch(response, status))
            }
            .instrument(span),
        )
    }
}

/// Records the RPC's status code on its exported server span, which closes with it.
pub struct SpanStatus(Option<tracing::Span>);

impl OnStatus for SpanStatus {
    fn finish(self, code: tonic::Code) {
        if let Some(span) = self.0 {
            span.record("rpc.response.status_code", code as i32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_as_w3c_says() {
        let t = TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .expect("valid");
        assert_eq!(t.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(t.span_id, 0xb7ad6b7169203331);
        assert!(t.sampled);
        assert_eq!(
            t.header(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        let unsampled =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
                .expect("valid");
        assert!(!unsampled.sampled);
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-zz",
            "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version may append fields.
        assert!(
            TraceParent::parse("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more")
                .is_some()
        );
    }

    #[test]
    fn ids_are_written_as_fixed_width_hex() {
        assert_eq!(Hex(0xabu128).to_string(), format!("{}ab", "0".repeat(30)));
        assert_eq!(Hex(1u64).to_string(), "0000000000000001");
    }

    #[test]
    fn fresh_contexts_are_valid_and_distinct() {
        let a = TraceParent::fresh();
        let b = TraceParent::fresh();
        assert_eq!(TraceParent::parse(&a.header()), Some(a));
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.span_id, b.span_id);
    }
}
