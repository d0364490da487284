//! Logs and traces shared by both binaries (SPEC section 7).
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
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

/// Whether this process exports spans (`--otlp-endpoint`).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
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
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
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
    Ok(SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub span_id: String,
    pub sampled: bool,
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` unless well-formed with non-zero ids.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                && s.bytes().any(|b| b != b'0')
        };
        // Version ff is invalid; a future version may append fields, version 00 may not.
        let version_ok =
            version.len() == 2 && version != "ff" && u8::from_str_radix(version, 16).is_ok();
        if !version_ok || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if !hex(trace_id, 32) || !hex(span_id, 16) || flags.len() != 2 {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(TraceParent {
            trace_id: trace_id.to_string(),
            span_id: span_id.to_string(),
            sampled: flags & 1 == 1,
        })
    }

    /// The header value.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{}",
            self.trace_id,
            self.span_id,
            if self.sampled { "01" } else { "00" }
        )
    }

    /// A fresh context (a new trace, not sampled): used for log correlation only.
    fn fresh() -> Self {
        let trace = uuid::Uuid::now_v7().simple().to_string();
        let span = uuid::Uuid::now_v7().simple().to_string();
        TraceParent {
            trace_id: trace,
            span_id: span[16..].to_string(),
            sampled: false,
        }
    }

    fn of_context(cx: &opentelemetry::Context) -> Option<Self> {
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| TraceParent {
            trace_id: sc.trace_id().to_string(),
            span_id: sc.span_id().to_string(),
            sampled: sc.is_sampled(),
        })
    }
}

/// Makes `span` continue the trace of `parent` (a `traceparent` value; `None` or an
/// invalid one starts a new trace), records its `trace_id` and `span_id` fields (log
/// lines inside it carry them), and returns the `traceparent` to hand on to what the span
/// causes: the span's own context when spans are exported; else the parent's as given
/// (our span id would lead nowhere); `None` when there is neither.
pub fn continue_trace(span: &tracing::Span, parent: Option<&str>) -> Option<String> {
    let parent = parent.and_then(TraceParent::parse);
    let (own, propagate) = if exporting() {
        if let Some(parent) = &parent {
            let mut carrier = std::collections::HashMap::with_capacity(1);
            carrier.insert("traceparent".to_string(), parent.header());
            let _ = span.set_parent(TraceContextPropagator::new().extract(&carrier));
        }
        let own = TraceParent::of_context(&span.context());
        let propagate = own.as_ref().map(TraceParent::header);
        (own, propagate)
    } else {
        let propagate = parent.as_ref().map(TraceParent::header);
        let own = parent.map(|t| TraceParent {
            span_id: TraceParent::fresh().span_id,
            ..t
        });
        (own, propagate)
    };
    let own = own.unwrap_or_else(TraceParent::fresh);
    span.record("trace_id", own.trace_id.as_str());
    span.record("span_id", own.span_id.as_str());
    propagate
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
        let span = tracing::info_span!(
            "grpc",
            otel.name = method,
            otel.kind = "server",
            rpc.system.name = "grpc",
            rpc.method = method,
            rpc.response.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        let parent = request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok());
        let propagate = continue_trace(&span, parent);
        request.extensions_mut().insert(RequestTrace { propagate });
        let future = self.inner.call(request);
        // The span lasts until the status is known: the end of the response body.
        let status = SpanStatus(span.clone());
        Box::pin(
            async move {
                let response = future.await?;
                Ok(StatusBody::watch(response, status))
            }
            .instrument(span),
        )
    }
}

/// Records the RPC's status code on its server span, which closes with it.
pub struct SpanStatus(tracing::Span);

impl OnStatus for SpanStatus {
    fn finish(self, code: tonic::Code) {
        self.0.record("rpc.response.status_code", code as i32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_as_w3c_says() {
        let t = TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .expect("valid");
        assert_eq!(t.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(t.span_id, "b7ad6b7169203331");
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
    fn fresh_contexts_are_valid_and_distinct() {
        let a = TraceParent::fresh();
        let b = TraceParent::fresh();
        assert_eq!(TraceParent::parse(&a.header()), Some(a.clone()));
        assert_ne!(a.trace_id, b.trace_id);
    }
}
