//! Freshness on every answer (README: Observability): each `QueryService` response, refusals and
//! streams included, carries `shop-applied-position` (the position the views reflect) and
//! `shop-lag-events` (the stream's end, as last seen, minus that), so a client sees how
//! fresh an answer is without a second call. Read after the handler has read, the
//! position is never behind the answer (it may be a little ahead of it).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::consumer::ConsumerStatus;

/// Response header: the applied position.
pub const APPLIED_HEADER: &str = "shop-applied-position";
/// Response header: events in the stream not applied yet.
pub const LAG_HEADER: &str = "shop-lag-events";
/// Requests of this prefix get the headers.
const QUERY_PATH_PREFIX: &str = "/shop.v1.QueryService/";

/// Adds the freshness headers to every `QueryService` response.
#[derive(Clone)]
pub struct FreshnessLayer {
    pub status: Arc<ConsumerStatus>,
}

impl<S> tower::Layer<S> for FreshnessLayer {
    type Service = Freshness<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Freshness {
            inner,
            status: self.status.clone(),
        }
    }
}

/// The service made by [`FreshnessLayer`].
#[derive(Clone)]
pub struct Freshness<S> {
    inner: S,
    status: Arc<ConsumerStatus>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Freshness<S>
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
        let wanted = request.uri().path().starts_with(QUERY_PATH_PREFIX);
        let status = self.status.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            if wanted {
                let freshness = status.freshness();
                let headers = response.headers_mut();
                headers.insert(APPLIED_HEADER, http::HeaderValue::from(freshness.applied));
                headers.insert(LAG_HEADER, http::HeaderValue::from(freshness.lag));
            }
            Ok(response)
        })
    }
}
