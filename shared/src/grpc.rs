//! gRPC plumbing both servers share: health, reflection (v1 and v1alpha), request
//! deadlines, shutdown signals, error statuses with `google.rpc` details, and the mapping
//! of undecodable requests to client-error codes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "shop.v1";

/// Health of a server: the overall status (service name `""`) and one per service.
/// Each named service's status is also the gauge `shop_serving{service}` (1 SERVING, 0
/// NOT_SERVING), set at the same moment, so an alert sees what a health check sees.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    serving: Family<ServiceLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

/// The `grpc.health.v1.Health` service a [`Health`] reports to.
pub type HealthService =
    tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;

impl Health {
    /// The reporter and the `grpc.health.v1.Health` service to serve. Everything starts
    /// NOT_SERVING: tonic-health reports the server (`""`) as SERVING from the start, so
    /// that is overridden here, before anything is served (a client must never see
    /// SERVING before the server has checked its store and NATS).
    pub async fn new() -> (Self, HealthService) {
        let reporter = tonic_health::server::HealthReporter::new();
        let service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let health = Health {
            reporter,
            serving: Family::default(),
        };
        (health, service)
    }

    /// Registers `shop_serving` in `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "shop_serving",
            "1 while the gRPC service reports SERVING on grpc.health.v1.Health, else 0",
            self.serving.clone(),
        );
    }

    /// Sets the status of `service` (`""` is the server as a whole).
    pub async fn set(&self, service: &str, serving: bool) {
        if !service.is_empty() {
            self.serving
                .get_or_create(&ServiceLabel {
                    service: service.to_string(),
                })
                .set(i64::from(serving));
        }
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(service, status).await;
    }
}

/// Error building the reflection services.
pub type ReflectionError = tonic_reflection::server::Error;

/// gRPC server reflection, v1 and v1alpha (grpcurl 1.8 only speaks v1alpha), listing
/// `services` plus health and reflection. The `google.rpc` error-detail types are
/// registered too, so grpcurl can render the details of an error status.
pub fn reflection(
    services: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for service in services {
            builder = builder.with_service_name(*service);
        }
        builder
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// The client's deadline from the `grpc-timeout` header, if it sent one.
pub fn request_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    let duration = match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Some(duration)
}

/// The client's address, over plain TCP or TLS (`None` for other transports).
pub fn peer_addr(extensions: &http::Extensions) -> Option<std::net::SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    match extensions.get::<TcpConnectInfo>() {
        Some(info) => info.remote_addr,
        None => extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.get_ref().remote_addr),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// One bad field of a request: its path (e.g. `lines[3].quantity`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// `INVALID_ARGUMENT` with a `google.rpc.BadRequest` naming every bad field.
pub fn invalid_argument(violations: &[FieldViolation]) -> Status {
    let message = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    let mut details = ErrorDetails::new();
    for v in violations {
        details.add_bad_request_violation(v.field.clone(), v.description.clone());
    }
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {message}"),
        details,
    )
}

/// A status with a `google.rpc.ErrorInfo` carrying a machine-readable `reason` and
/// structured `metadata` (e.g. the actual stream version of a conflict).
pub fn with_reason(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    metadata: &[(&str, String)],
) -> Status {
    let metadata: std::collections::HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect();
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

/// The status of a request a server could not serve because its own storage failed
/// (the same on both servers): UNAVAILABLE, reason `STORAGE_UNAVAILABLE`. The detail
/// goes to the server's log, not to the client.
pub fn storage_unavailable(what: &str) -> Status {
    with_reason(
        Code::Unavailable,
        "STORAGE_UNAVAILABLE",
        format!("{what}; retry later, or ask the operator to check the server's log"),
        &[],
    )
}

/// Tower layer that corrects the codes tonic gives to requests it cannot decode, so that
/// bad input is the client's error, as the "bad input never harms" guarantee promises (README: Guarantees):
/// - a message over the size limit (tonic: `OUT_OF_RANGE`) becomes `RESOURCE_EXHAUSTED`;
/// - a message that is not valid protobuf, or has a string that is not UTF-8 (tonic:
///   `INTERNAL`, "failed to decode Protobuf message: <Message>.<field>: ...") becomes
///   `INVALID_ARGUMENT`, keeping prost's text, which names the field.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestErrorLayer;

impl<S> tower::Layer<S> for RequestErrorLayer {
    type Service = RequestErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestErrors { inner }
    }
}

/// The service made by [`RequestErrorLayer`].
#[derive(Clone, Debug)]
pub struct RequestErrors<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RequestErrors<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            rewrite_request_errors(response.headers_mut());
            Ok(response)
        })
    }
}

/// tonic writes a status raised before the handler runs into the response headers
/// (trailers-only response), percent-encoded.
fn rewrite_request_errors(headers: &mut http::HeaderMap) {
    let Some(status) = headers.get("grpc-status") else {
        return;
    };
    let message = headers
        .get("grpc-message")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    match status.as_bytes() {
        b"11" if message.starts_with(b"Error,%20decoded%20message%20length%20too%20large") => {
            headers.insert("grpc-status", http::HeaderValue::from_static("8"));
            headers.insert(
                "grpc-message",
                http::HeaderValue::from_static(
                    "request%20message%20too%20large%20for%20this%20server%20(field:%20request)",
                ),
            );
        }
        b"13" if message.starts_with(b"failed%20to%20decode%20Protobuf%20message") => {
            headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        }
        _ => {}
    }
}

/// Told the gRPC status of an RPC once it is known.
pub trait OnStatus {
    fn finish(self, code: Code);
}

pin_project_lite::pin_project! {
    /// A response body that tells its [`OnStatus`] the RPC's status: from the response
    /// headers of a trailers-only response (refusals before or by a unary handler), else
    /// from the trailers at the end of the body; a body dropped before its trailers (the
    /// client went away) is `CANCELLED`.
    pub struct StatusBody<B, S: OnStatus> {
        #[pin]
        inner: B,
        pending: Option<S>,
    }

    impl<B, S: OnStatus> PinnedDrop for StatusBody<B, S> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(pending) = this.project().pending.take() {
                pending.finish(Code::Cancelled);
            }
        }
    }
}

impl<B, S: OnStatus> StatusBody<B, S> {
    /// Wraps `response`'s body; `sink` is told at once when the headers hold the status.
    pub fn watch(response: http::Response<B>, sink: S) -> http::Response<Self> {
        let pending = match response.headers().get("grpc-status") {
            Some(status) => {
                sink.finish(code_of_header(status));
                None
            }
            None => Some(sink),
        };
        response.map(|inner| StatusBody { inner, pending })
    }
}

fn code_of_header(value: &http::HeaderValue) -> Code {
    value
        .to_str()
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .map_or(Code::Unknown, Code::from_i32)
}

impl<B, S> http_body::Body for StatusBody<B, S>
where
    B: http_body::Body,
    S: OnStatus,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .and_then(|t| t.get("grpc-status"))
                .map(code_of_header),
            Poll::Ready(Some(Err(_))) => Some(Code::Unknown),
            Poll::Ready(None) | Poll::Pending => None,
        };
        if let Some(code) = code {
            if let Some(pending) = this.pending.take() {
                pending.finish(code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

    #[test]
    fn rewrites_only_decode_failures() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", http::HeaderValue::from_static("11"));
        h.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "Error,%20decoded%20message%20length%20too%20large:%20found%205%20bytes",
            ),
        );
        rewrite_request_errors(&mut h);
        assert_eq!(h["grpc-status"], "8");

        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", http::HeaderValue::from_static("13"));
        h.insert(
            "grpc-message",
            http::HeaderValue::from_static("failed%20to%20decode%20Protobuf%20message:%20X.name"),
        );
        rewrite_request_errors(&mut h);
        assert_eq!(h["grpc-status"], "3");

        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", http::HeaderValue::from_static("11"));
        h.insert("grpc-message", http::HeaderValue::from_static("other"));
        rewrite_request_errors(&mut h);
        assert_eq!(h["grpc-status"], "11");
    }
}
